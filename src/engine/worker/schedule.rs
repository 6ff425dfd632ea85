//! The batching policy: which waiting jobs run together, which alone.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::backend::panic_message;
use super::job::{Job, LogitsJob};
use super::reply::{engine_error, finish};
use super::{WorkerError, WorkerStats};
use crate::engine::batch;
use crate::engine::generate::{self, EngineError};
use crate::engine::output::GenerateResponse;
use crate::engine::prefix_cache::PrefixCache;
use crate::model::LoadedModel;

/// True (and counted as cancelled) when the job's client gave up while it waited: such a job
/// is not run.
fn abandoned(job: &Job, stats: &WorkerStats) -> bool {
    let gone = job.abandoned();
    if gone {
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    gone
}

/// Streams a compare job's logits; a failure (or a panic) is sent down the stream, and a
/// reader that went away stops the run.
pub(super) fn run_logits(model: &LoadedModel, job: &LogitsJob) {
    let run = std::panic::catch_unwind(AssertUnwindSafe(|| {
        crate::engine::compare::stream_logits(model, &job.ids, job.first_row, &mut |rows| {
            job.rows.send(Ok(rows)).is_ok()
        })
    }));
    let failure = match run {
        Ok(Ok(())) | Ok(Err(EngineError::Cancelled)) => return,
        Ok(Err(e)) => e.to_string(),
        Err(panic) => format!("panic in the model thread: {}", panic_message(&panic)),
    };
    tracing::error!("compare: {failure}");
    let _ = job.rows.send(Err(failure));
}

pub(super) fn drop_abandoned(jobs: Vec<Job>, stats: &WorkerStats) -> Vec<Job> {
    jobs.into_iter().filter(|j| !abandoned(j, stats)).collect()
}

/// Runs `f` for `job`; a panic inside is that job's failure (logged), not the thread's.
fn guarded(
    job: &Job,
    f: impl FnOnce() -> Result<GenerateResponse, EngineError>,
) -> Result<GenerateResponse, WorkerError> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.map_err(|e| engine_error(e, job)),
        Err(panic) => Err(WorkerError::Failed(format!(
            "panic in the model thread: {}",
            panic_message(&panic)
        ))),
    }
}

pub(super) fn run_single(
    model: &LoadedModel,
    job: Job,
    prefix: &mut PrefixCache,
    stats: &WorkerStats,
) {
    let result = guarded(&job, || {
        let cancelled = || job.abandoned();
        generate::generate_cached(
            model,
            &job.prompt,
            &job.ids,
            &job.params,
            &cancelled,
            Some(prefix),
            &mut |event| job.report(event),
        )
    });
    finish(job, result, stats);
}

/// Several jobs: short prompts are prefilled in one forward pass, then each job continues on
/// its own slice of the KV cache. Long prompts, and the jobs of a batch that fails as a whole,
/// run alone, so one bad input cannot fail the others.
pub(super) fn run_batch(
    model: &LoadedModel,
    jobs: Vec<Job>,
    prefix: &mut PrefixCache,
    stats: &WorkerStats,
) {
    let start = Instant::now();
    let (mut batched, mut alone): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|job| job.ids.len() <= batch::MAX_BATCHED_PROMPT && !job.scores());
    if batched.len() == 1 {
        alone.append(&mut batched);
    }
    if !batched.is_empty() {
        let prompts: Vec<&[u32]> = batched.iter().map(|job| job.ids.as_slice()).collect();
        let prefilled =
            std::panic::catch_unwind(AssertUnwindSafe(|| batch::prefill_batch(model, &prompts)));
        match prefilled {
            Ok(Ok(states)) => {
                for (job, (cache, logits)) in batched.into_iter().zip(states) {
                    let result = guarded(&job, || {
                        prefix.insert(&job.ids, &cache, &logits);
                        let cancelled = || job.abandoned();
                        generate::decode_from(
                            model,
                            &job.prompt,
                            &job.ids,
                            &job.params,
                            &cancelled,
                            cache,
                            logits,
                            start,
                            &mut |event| job.report(event),
                        )
                    });
                    finish(job, result, stats);
                }
            }
            _ => alone.extend(batched),
        }
    }
    for job in alone {
        // Checked just before each run: earlier jobs may have taken long enough for it to go.
        if !abandoned(&job, stats) {
            run_single(model, job, prefix, stats);
        }
    }
}
