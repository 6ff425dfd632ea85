//! Output assembly, after the model: the engine's results become a job's reply, its events
//! the stream events a client reads.

use std::sync::atomic::Ordering;

use super::job::Job;
use super::{StreamEvent, WorkerError, WorkerStats};
use crate::engine::generate::{EngineError, Event};
use crate::engine::output::GenerateResponse;

impl Job {
    /// Sends an engine event to the job's stream, if it has one (only the text new since the
    /// last event: copying the whole text at every step would make a long stream quadratic).
    pub(super) fn report(&self, event: Event<'_>) {
        let Some((index, tx)) = &self.stream else {
            return;
        };
        let index = *index;
        let _ = tx.send(match event {
            Event::Prompt(tokens) => StreamEvent::Prompt {
                index,
                tokens: tokens.to_vec(),
            },
            Event::Step { step, text } => {
                // Only what is new since the last event: copying the whole text at every step
                // would make a long stream quadratic.
                let from = self.reported.load(Ordering::Relaxed);
                let appended = text.get(from..).unwrap_or_default().to_string();
                self.reported.store(from.max(text.len()), Ordering::Relaxed);
                StreamEvent::Step {
                    index,
                    step: Box::new(step.clone()),
                    appended,
                }
            }
        });
    }
}

pub(super) fn finish(job: Job, result: Result<GenerateResponse, WorkerError>, stats: &WorkerStats) {
    match &result {
        Err(WorkerError::Cancelled) => {
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            tracing::info!("request abandoned by its client; generation stopped");
        }
        Err(WorkerError::Failed(e)) => {
            let waited = job.enqueued.elapsed().as_millis() as u64;
            tracing::error!(since_enqueued_ms = waited, "generation failed: {e}");
        }
        _ => {}
    }
    // The job stops counting as in flight before its answer leaves: a client that acts on
    // the answer at once (loading another model) must find this model idle.
    let Job {
        reply,
        _in_flight,
        window,
        ..
    } = job;
    drop(_in_flight);
    drop(window);
    let _ = reply.send(result);
}

pub(super) fn engine_error(e: EngineError, job: &Job) -> WorkerError {
    match e {
        EngineError::EmptyPrompt => WorkerError::EmptyPrompt,
        EngineError::Cancelled => WorkerError::Cancelled,
        EngineError::TooLong { limit, .. } => WorkerError::PromptTooLong {
            limit,
            prompt_tokens: job.ids.len(),
            max_tokens: job.params.max_tokens,
        },
        other => WorkerError::Failed(other.to_string()),
    }
}
