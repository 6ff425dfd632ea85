//! The runner: one thread that takes queued jobs in order and runs each as `tokenscope
//! train` on the training pool, writing its progress to the database as it goes and settling
//! its status ([`super::status::settle`]) when it ends.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::status::{self, RunEnd, StopRequest};
use super::store::JobRow;
use super::{models_dir, upload_path, DataSpec, JobManager, JobSpec, JobStatus, Running};
use crate::engine::registry::{now_rfc3339, Origin};
use crate::model::ModelSource;
use crate::train::{StepReport, TrainObserver, TrainOptions};

impl JobManager {
    pub(super) fn run_loop(self: Arc<Self>) {
        let pool = match rayon::ThreadPoolBuilder::new()
            .num_threads(self.settings.train_threads.max(1))
            .thread_name(|i| format!("tokenscope-train-{i}"))
            .build()
        {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("cannot start the training thread pool: {e}");
                return;
            }
        };
        loop {
            let Some((row, stop)) = self.next_job() else {
                return;
            };
            pool.install(|| self.run_job(row, &stop));
        }
    }

    /// Waits for a queued job and marks it running.
    fn next_job(&self) -> Option<(JobRow, Arc<AtomicU8>)> {
        let mut live = self.live();
        loop {
            if live.shutdown {
                return None;
            }
            match self.store.next_queued() {
                Ok(Some(mut row)) => {
                    row.status = JobStatus::Running;
                    row.error = None;
                    if row.started_at.is_none() {
                        row.started_at = Some(now_rfc3339());
                    }
                    if let Err(e) = self.store.update_job(&row) {
                        tracing::error!("job {}: {e}", row.id);
                    }
                    let stop = Arc::new(AtomicU8::new(StopRequest::None as u8));
                    live.running = Some(Running {
                        id: row.id.clone(),
                        stop: stop.clone(),
                        eta: super::eta::Eta::default(),
                    });
                    return Some((row, stop));
                }
                Ok(None) => {}
                Err(e) => tracing::error!("reading the job queue: {e}"),
            }
            live = self
                .wake
                .wait_timeout(live, std::time::Duration::from_secs(5))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn run_job(&self, row: JobRow, stop: &AtomicU8) {
        let id = row.id.clone();
        tracing::info!(job = %id, "training job started");
        let observer = JobObserver {
            manager: self,
            row: Mutex::new(row.clone()),
            stop,
            first: AtomicU8::new(1),
            rss_start: crate::system::process_rss_bytes(),
            models_start: self.registry.loaded_weight_bytes(),
            over_memory: Mutex::new(None),
        };
        let outcome = self
            .options(&row)
            .and_then(|o| crate::train::run_observed(&o, &observer).map_err(|e| e.to_string()));
        let over_memory = observer
            .over_memory
            .into_inner()
            .unwrap_or_else(|p| p.into_inner());
        let mut row = observer.row.into_inner().unwrap_or_else(|p| p.into_inner());
        // The run's buffers are freed by now; give their pages back to the system.
        let before = crate::system::process_rss_bytes();
        crate::system::release_free_memory();
        tracing::info!(
            job = %id,
            "training buffers released: resident {} MiB -> {} MiB",
            before >> 20,
            crate::system::process_rss_bytes() >> 20
        );
        let end = match outcome {
            // Stopped by the memory guard: failed, with the reason (its last checkpoint stays).
            _ if over_memory.is_some() => {
                tracing::warn!(job = %id, "training job stopped: {over_memory:?}");
                row.error = over_memory;
                RunEnd::Error
            }
            Ok(summary) if summary.interrupted => RunEnd::Stopped,
            Ok(summary) => {
                if let Some(&(_, l)) = summary.evals.last() {
                    row.eval_loss = Some(l);
                }
                row.step = summary.steps_done as u64;
                match self.register(&row) {
                    Ok(()) => RunEnd::Finished,
                    Err(e) => {
                        row.error = Some(e);
                        RunEnd::Error
                    }
                }
            }
            Err(e) => {
                tracing::warn!(job = %id, "training job failed: {e}");
                row.error = Some(e);
                RunEnd::Error
            }
        };
        // Settled under the live lock, from the stop request pending now: a command that came
        // after the training loop stopped (a resume withdrawing the pause) still counts.
        let mut live = self.live();
        let pending = StopRequest::from_u8(stop.load(Ordering::SeqCst));
        row.status = status::settle(end, pending, live.shutdown);
        if row.status.is_final() {
            row.finished_at = Some(now_rfc3339());
        }
        if matches!(row.status, JobStatus::Failed | JobStatus::Cancelled) {
            self.keep_last_checkpoint(&row);
        }
        tracing::info!(job = %id, status = %row.status, step = row.step, "training job ended");
        if let Err(e) = self.store.update_job(&row) {
            tracing::error!("job {id}: {e}");
        }
        live.running = None;
        if row.status == JobStatus::Queued {
            self.wake.notify_all();
        }
    }

    /// The job's `tokenscope train` settings.
    fn options(&self, row: &JobRow) -> Result<TrainOptions, String> {
        let spec: JobSpec =
            serde_json::from_str(&row.spec).map_err(|e| format!("unreadable settings: {e}"))?;
        let base = self
            .registry
            .find(&spec.base_model)
            .and_then(|id| self.registry.source_of(&id))
            .ok_or_else(|| format!("base model `{}` is no longer offered", spec.base_model))?;
        let base = match base {
            ModelSource::Gguf(p) | ModelSource::HfDir(p) | ModelSource::NanoGpt(p) => {
                p.to_string_lossy().into_owned()
            }
            ModelSource::Hub { repo, revision } => format!("{repo}@{revision}"),
            ModelSource::Nanochat { .. } => {
                return Err(format!(
                    "base model `{}` is a nanochat checkpoint, which is served but not trained",
                    spec.base_model
                ))
            }
            ModelSource::Adapter { .. } => {
                return Err(format!(
                    "base model `{}` is a LoRA adapter: train its base instead",
                    spec.base_model
                ))
            }
        };
        let data = match &spec.data {
            DataSpec::Upload(u) => {
                let upload = self
                    .store
                    .upload(&u.upload_id)
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("upload `{}` is gone", u.upload_id))?;
                upload_path(&self.settings.state_dir, &upload)
            }
            DataSpec::Path(p) => self.data_path(&p.path).map_err(|e| e.to_string())?,
            DataSpec::Text(_) => return Err("text data is stored as an upload".into()),
        };
        let steps = spec.fixed_steps().map(|s| s as usize);
        Ok(TrainOptions {
            model: Some(base),
            data: Some(data),
            output: models_dir(&self.settings.state_dir).join(&spec.output_name),
            steps,
            epochs: spec.epochs,
            batch_size: spec.batch_size as usize,
            seq_len: spec.seq_len as usize,
            lr: spec.lr,
            warmup: match (spec.warmup, steps) {
                (Some(w), Some(steps)) => (w as usize).min(steps),
                (Some(w), None) => w as usize,
                (None, Some(steps)) => (steps / 10).min(10),
                // An epochs job: steps unknown until its data is read (the schedule caps it).
                (None, None) => 10,
            },
            eval_every: spec.eval_every as usize,
            save_every: spec.save_every as usize,
            resume: true,
            seed: spec.seed,
            device: self.settings.device.clone(),
            progress: false,
            lora: spec.lora.as_ref().map(|l| l.options()),
            ..TrainOptions::default()
        })
    }

    /// Offers a completed job's directory as a model; its checkpoints are dropped.
    fn register(&self, row: &JobRow) -> Result<(), String> {
        let spec: JobSpec = serde_json::from_str(&row.spec).map_err(|e| e.to_string())?;
        let dir = models_dir(&self.settings.state_dir).join(&spec.output_name);
        let _ = std::fs::remove_dir_all(crate::train::checkpoint::checkpoints_dir(&dir));
        // A LoRA job wrote a PEFT adapter on its base; a full job a Hugging Face folder.
        let source = match ModelSource::from_path(&dir) {
            Some(s @ ModelSource::Adapter { .. }) => s,
            _ => ModelSource::HfDir(dir.clone()),
        };
        self.registry
            .add_named(&spec.output_name, source, Origin::Trained)
            .map_err(|e| e.to_string())?;
        self.store
            .insert_model(&spec.output_name, &dir, &row.id, &now_rfc3339())
            .map_err(|e| e.to_string())
    }
}

/// Writes a running job's progress to the database as it goes.
struct JobObserver<'a> {
    manager: &'a JobManager,
    row: Mutex<JobRow>,
    stop: &'a AtomicU8,
    first: AtomicU8,
    /// The process's resident memory when the job started, and the loaded models' weights
    /// then: what the process grows by, less what models loaded meanwhile added, is the job's.
    rss_start: u64,
    models_start: u64,
    /// Set when the job grew past `--max-job-memory`: it stops at this step boundary.
    over_memory: Mutex<Option<String>>,
}

impl JobObserver<'_> {
    fn row(&self) -> MutexGuard<'_, JobRow> {
        self.row.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TrainObserver for JobObserver<'_> {
    fn step(&self, r: &StepReport) {
        let store = &self.manager.store;
        let mut row = self.row();
        if self.first.swap(0, Ordering::SeqCst) == 1 {
            // A resumed run recomputes the steps after its checkpoint: their old points go.
            let _ = store.truncate_history(&row.id, r.step as u64);
        }
        let models_grown = self
            .manager
            .registry
            .loaded_weight_bytes()
            .saturating_sub(self.models_start);
        let grown = crate::system::process_rss_bytes()
            .saturating_sub(self.rss_start)
            .saturating_sub(models_grown);
        let limit = self.manager.settings.max_job_memory;
        if grown > limit {
            let mut over = self.over_memory.lock().unwrap_or_else(|p| p.into_inner());
            over.get_or_insert_with(|| {
                format!(
                    "stopped at step {}: the job's memory grew by {:.2} GiB, past --max-job-memory {:.2} GiB",
                    r.step,
                    grown as f64 / (1u64 << 30) as f64,
                    limit as f64 / (1u64 << 30) as f64
                )
            });
        }
        row.step = r.step as u64;
        row.total_steps = r.total_steps as u64;
        row.train_loss = Some(r.loss);
        row.tokens_per_s = Some((r.tokens_per_s * 10.0).round() / 10.0);
        if let Some(run) = self.manager.live().running.as_mut() {
            run.eta.step(r.step as u64, Instant::now());
        }
        let write = store
            .record_train_loss(&row.id, r.step as u64, r.loss)
            .and_then(|_| store.update_job(&row));
        if let Err(e) = write {
            tracing::error!("job {}: {e}", row.id);
        }
    }

    fn data(&self, train_windows: usize, total_steps: usize) {
        let mut row = self.row();
        row.train_windows = Some(train_windows as u64);
        row.total_steps = total_steps as u64;
        if let Err(e) = self.manager.store.update_job(&row) {
            tracing::error!("job {}: {e}", row.id);
        }
    }

    fn eval(&self, step: usize, loss: f64) {
        let mut row = self.row();
        row.eval_loss = Some(loss);
        let store = &self.manager.store;
        let write = store
            .record_eval_loss(&row.id, step as u64, loss)
            .and_then(|_| store.update_job(&row));
        if let Err(e) = write {
            tracing::error!("job {}: {e}", row.id);
        }
    }

    fn should_stop(&self) -> bool {
        StopRequest::from_u8(self.stop.load(Ordering::SeqCst)) != StopRequest::None
            || self.over_memory.lock().is_ok_and(|over| over.is_some())
    }

    fn say(&self, message: &str) {
        tracing::info!(job = %self.row().id, "{message}");
    }

    fn console(&self) -> bool {
        false
    }
}
