//! Training jobs over the API: queued in SQLite, run one at a time on a thread of their own
//! inside a dedicated rayon pool (`--train-threads`, so that inference keeps the other cores),
//! with pause / resume / cancel at step boundaries. A job's run is `tokenscope train` itself
//! ([`super::run_observed`]) writing into `<state-dir>/models/<output_name>`, always with
//! `--resume`: a job that was paused, or interrupted by a crash, continues from its last
//! checkpoint, bit for bit as if it had not stopped. A completed job's directory is registered
//! as a model.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::store::{HistoryPoint, JobRow, Store, StoreError, UploadRow};
use super::{StepReport, TrainObserver, TrainOptions};
use crate::engine::registry::{self, now_rfc3339, ModelRegistry, Origin};
use crate::model::ModelSource;

/// Where jobs keep their files and how they run.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub state_dir: PathBuf,
    /// Server-side training data a job may name by relative path (nothing outside it).
    pub data_dir: Option<PathBuf>,
    /// Threads of the training pool.
    pub train_threads: usize,
    pub max_upload_bytes: usize,
    /// `--device` of the server (jobs train where inference runs).
    pub device: String,
}

/// Training data: text in the request, an earlier upload, or a file under `--data-dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DataSpec {
    Text(TextData),
    Upload(UploadData),
    Path(PathData),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextData {
    /// The training text itself (at least one character that is not whitespace; no NUL).
    #[schema(min_length = 1, pattern = r"^[^\x00]*[^\s\x00][^\x00]*$")]
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadData {
    /// An id from POST /train/uploads.
    pub upload_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PathData {
    /// A `.txt` or `.jsonl` file (or a folder of them) relative to the server's `--data-dir`.
    pub path: String,
}

/// Body of POST /train/jobs: what to train and how (the `tokenscope train` flags of the same
/// names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"base_model": "SmolLM2-135M-Instruct.Q4_1", "data": {"text": "The quick brown fox jumps over the lazy dog."}, "output_name": "smollm2-fox", "steps": 20}))]
pub struct JobSpec {
    /// The model to start from (an id from GET /models).
    pub base_model: String,
    pub data: DataSpec,
    /// Id of the model the job produces (letters, digits, `.`, `_`, `-`).
    #[schema(
        pattern = r"^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$",
        max_length = 128
    )]
    pub output_name: String,
    /// Optimizer steps.
    #[serde(default = "default_steps")]
    #[schema(default = 100, minimum = 1, maximum = 1000000)]
    pub steps: u64,
    /// Peak learning rate (linear warm-up, cosine decay).
    #[serde(default = "default_lr")]
    #[schema(default = 0.0001, exclusive_minimum = 0, maximum = 1)]
    pub lr: f64,
    #[serde(default = "default_batch_size")]
    #[schema(default = 4, minimum = 1, maximum = 256)]
    pub batch_size: u64,
    /// Tokens per training window.
    #[serde(default = "default_seq_len")]
    #[schema(default = 128, minimum = 2, maximum = 8192)]
    pub seq_len: u64,
    /// Evaluate on the held-out windows every this many steps (0: only at the start and end).
    #[serde(default = "default_eval_every")]
    #[schema(default = 10, minimum = 0, maximum = 1000000)]
    pub eval_every: u64,
    /// Checkpoint every this many steps (what a resume continues from).
    #[serde(default = "default_save_every")]
    #[schema(default = 50, minimum = 1, maximum = 1000000)]
    pub save_every: u64,
    /// Warm-up steps (default: a tenth of the steps, at most 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1000000)]
    pub warmup: Option<u64>,
    #[serde(default)]
    #[schema(default = 0, minimum = 0, maximum = 9223372036854775807_i64)]
    pub seed: u64,
}

fn default_steps() -> u64 {
    100
}
fn default_lr() -> f64 {
    1e-4
}
fn default_batch_size() -> u64 {
    4
}
fn default_seq_len() -> u64 {
    128
}
fn default_eval_every() -> u64 {
    10
}
fn default_save_every() -> u64 {
    50
}

/// A job as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: String,
    /// queued | running | paused | completed | failed | cancelled | interrupted
    #[schema(example = "running")]
    pub status: String,
    pub base_model: String,
    pub output_name: String,
    pub step: u64,
    pub total_steps: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Seconds left at the current speed (while running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub settings: JobSpec,
    /// Loss per step (GET /train/jobs/{id} only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<HistoryPoint>>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job `{0}` not found")]
    NotFound(String),
    /// A model, upload or data path the request names does not exist.
    #[error("{1}")]
    Missing(&'static str, String),
    /// A data path the server will not read.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String, &'static str),
    #[error("{0}")]
    Conflict(String),
    #[error("upload exceeds the limit of {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
}

impl JobError {
    fn invalid(field: &'static str, msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into(), field)
    }
}

const STOP_NONE: u8 = 0;
const STOP_PAUSE: u8 = 1;
const STOP_CANCEL: u8 = 2;

struct Running {
    id: String,
    stop: Arc<AtomicU8>,
    /// When this run started, and the step it started from (for the ETA).
    since: Instant,
    first_step: Option<u64>,
    last_step: u64,
}

#[derive(Default)]
struct Live {
    running: Option<Running>,
    shutdown: bool,
}

pub struct JobManager {
    store: Arc<Store>,
    registry: Arc<ModelRegistry>,
    settings: JobSettings,
    live: Mutex<Live>,
    wake: Condvar,
}

impl JobManager {
    /// Opens the state, marks jobs that were running as interrupted, offers the models jobs
    /// produced, and starts the runner thread.
    pub fn start(
        settings: JobSettings,
        store: Arc<Store>,
        registry: Arc<ModelRegistry>,
    ) -> Result<Arc<Self>, JobError> {
        let interrupted = store.mark_interrupted()?;
        if interrupted > 0 {
            tracing::warn!(
                "{interrupted} training job(s) were running when the server stopped: marked interrupted (POST /train/jobs/{{id}}/resume continues them)"
            );
        }
        for (id, path) in store.models()? {
            if path.join("config.json").is_file() {
                if let Err(e) = registry.add_named(&id, ModelSource::HfDir(path), Origin::Trained) {
                    tracing::warn!("trained model {id}: {e}");
                }
            }
        }
        for dir in [
            uploads_dir(&settings.state_dir),
            models_dir(&settings.state_dir),
        ] {
            std::fs::create_dir_all(&dir).map_err(|e| JobError::Io(e.to_string()))?;
        }
        let manager = Arc::new(Self {
            store,
            registry,
            settings,
            live: Mutex::new(Live::default()),
            wake: Condvar::new(),
        });
        let runner = manager.clone();
        std::thread::Builder::new()
            .name("tokenscope-train".into())
            .spawn(move || runner.run_loop())
            .map_err(|e| JobError::Io(format!("cannot start the training thread: {e}")))?;
        Ok(manager)
    }

    pub fn settings(&self) -> &JobSettings {
        &self.settings
    }

    fn live(&self) -> MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the runner after the current job's step (tests; the process exit does it too).
    pub fn shutdown(&self) {
        let mut live = self.live();
        live.shutdown = true;
        if let Some(r) = &live.running {
            r.stop.store(STOP_PAUSE, Ordering::SeqCst);
        }
        self.wake.notify_all();
    }

    /// Stores an uploaded training file (UTF-8 text, or JSONL with a `text` field per line).
    pub fn upload(&self, bytes: &[u8], jsonl: bool) -> Result<UploadRow, JobError> {
        if bytes.len() > self.settings.max_upload_bytes {
            return Err(JobError::TooLarge(self.settings.max_upload_bytes));
        }
        let docs = super::data::documents(bytes, jsonl, "the upload")
            .map_err(|m| JobError::invalid("body", m))?;
        if docs.is_empty() {
            return Err(JobError::invalid("body", "the upload contains no text"));
        }
        let row = UploadRow {
            id: new_id("upload"),
            format: if jsonl { "jsonl" } else { "text" }.into(),
            bytes: bytes.len() as u64,
            sha256: format!("{:x}", Sha256::digest(bytes)),
            created_at: now_rfc3339(),
        };
        let path = upload_path(&self.settings.state_dir, &row);
        write_atomically(&path, bytes).map_err(|e| JobError::Io(e.to_string()))?;
        self.store.insert_upload(&row)?;
        Ok(row)
    }

    /// Checks and queues a job.
    pub fn create(&self, mut spec: JobSpec) -> Result<JobView, JobError> {
        self.check(&spec)?;
        if let DataSpec::Text(t) = &spec.data {
            // Kept as an upload, so that the job's settings stay small and the text is read
            // back exactly on resume.
            let upload = self.upload(t.text.as_bytes(), false)?;
            spec.data = DataSpec::Upload(UploadData {
                upload_id: upload.id,
            });
        }
        let out = models_dir(&self.settings.state_dir).join(&spec.output_name);
        if out.exists() {
            // Left by an earlier job of this name that failed or was cancelled (active ones
            // were refused by `check`): its checkpoints must not seed this one.
            std::fs::remove_dir_all(&out).map_err(|e| JobError::Io(e.to_string()))?;
        }
        let row = JobRow {
            id: new_id("job"),
            spec: serde_json::to_string(&spec).map_err(|e| JobError::Io(e.to_string()))?,
            status: "queued".into(),
            step: 0,
            total_steps: spec.steps,
            train_loss: None,
            eval_loss: None,
            tokens_per_s: None,
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            error: None,
        };
        self.store.insert_job(&row)?;
        tracing::info!(job = %row.id, output = %spec.output_name, "training job queued");
        let _live = self.live();
        self.wake.notify_all();
        self.view(&row, false)
    }

    fn check(&self, spec: &JobSpec) -> Result<(), JobError> {
        let inv = |field: &'static str, msg: &str| JobError::invalid(field, msg);
        if self.registry.find(&spec.base_model).is_none() {
            return Err(JobError::Missing(
                "MODEL_NOT_FOUND",
                format!(
                    "base_model `{}` is not a model of this server (GET /models lists them)",
                    spec.base_model
                ),
            ));
        }
        if !registry::is_valid_id(&spec.output_name) {
            return Err(inv(
                "output_name",
                "output_name must be 1 to 128 letters, digits, `.`, `_` or `-`, not starting or ending with `.` or `-`",
            ));
        }
        if !(1..=1_000_000).contains(&spec.steps) {
            return Err(inv("steps", "steps must be between 1 and 1000000"));
        }
        if !(spec.lr > 0.0 && spec.lr <= 1.0) {
            return Err(inv("lr", "lr must be greater than 0 and at most 1"));
        }
        if !(1..=256).contains(&spec.batch_size) {
            return Err(inv("batch_size", "batch_size must be between 1 and 256"));
        }
        if !(2..=8192).contains(&spec.seq_len) {
            return Err(inv("seq_len", "seq_len must be between 2 and 8192"));
        }
        if !(1..=1_000_000).contains(&spec.save_every) {
            return Err(inv(
                "save_every",
                "save_every must be between 1 and 1000000",
            ));
        }
        if spec.eval_every > 1_000_000 {
            return Err(inv("eval_every", "eval_every must be at most 1000000"));
        }
        if spec.warmup.is_some_and(|w| w > 1_000_000) {
            return Err(inv("warmup", "warmup must be at most 1000000"));
        }
        if spec.seed > i64::MAX as u64 {
            return Err(inv("seed", &format!("seed must be at most {}", i64::MAX)));
        }
        match &spec.data {
            DataSpec::Text(t) if t.text.trim().is_empty() => {
                return Err(inv("data", "data.text contains no text"))
            }
            DataSpec::Text(t) if t.text.len() > self.settings.max_upload_bytes => {
                return Err(JobError::TooLarge(self.settings.max_upload_bytes))
            }
            DataSpec::Upload(u) => {
                if self.store.upload(&u.upload_id)?.is_none() {
                    return Err(JobError::Missing(
                        "UPLOAD_NOT_FOUND",
                        format!("upload `{}` not found (POST /train/uploads)", u.upload_id),
                    ));
                }
            }
            DataSpec::Path(p) => {
                self.data_path(&p.path)?;
            }
            DataSpec::Text(_) => {}
        }
        if self.registry.contains(&spec.output_name) {
            return Err(JobError::Conflict(format!(
                "a model named `{}` exists already; choose another output_name",
                spec.output_name
            )));
        }
        for row in self.store.jobs()? {
            let other: Option<JobSpec> = serde_json::from_str(&row.spec).ok();
            let active = !matches!(row.status.as_str(), "failed" | "cancelled");
            if active && other.is_some_and(|o| o.output_name == spec.output_name) {
                return Err(JobError::Conflict(format!(
                    "job {} already writes `{}`; choose another output_name",
                    row.id, spec.output_name
                )));
            }
        }
        Ok(())
    }

    /// `path` under `--data-dir`, refusing anything that leaves it (`..`, absolute paths,
    /// symbolic links pointing out).
    fn data_path(&self, path: &str) -> Result<PathBuf, JobError> {
        let inv = JobError::Forbidden;
        let Some(root) = &self.settings.data_dir else {
            return Err(inv(
                "data.path needs a server started with --data-dir; upload the data (POST /train/uploads) or send it as data.text".into(),
            ));
        };
        let rel = Path::new(path);
        if path.is_empty()
            || rel
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(inv(format!(
                "data.path `{path}` must be a relative path inside --data-dir (no `..`, no absolute path)"
            )));
        }
        let root = std::fs::canonicalize(root)
            .map_err(|e| JobError::Io(format!("--data-dir is not readable: {e}")))?;
        let full = std::fs::canonicalize(root.join(rel)).map_err(|_| {
            JobError::Missing(
                "DATA_NOT_FOUND",
                format!("data.path `{path}` does not exist in --data-dir"),
            )
        })?;
        if !full.starts_with(&root) {
            return Err(inv(format!("data.path `{path}` leads outside --data-dir")));
        }
        Ok(full)
    }

    pub fn list(&self) -> Result<Vec<JobView>, JobError> {
        self.store
            .jobs()?
            .iter()
            .map(|row| self.view(row, false))
            .collect()
    }

    pub fn get(&self, id: &str) -> Result<JobView, JobError> {
        let row = self
            .store
            .job(id)?
            .ok_or_else(|| JobError::NotFound(id.into()))?;
        self.view(&row, true)
    }

    fn view(&self, row: &JobRow, history: bool) -> Result<JobView, JobError> {
        let spec: JobSpec = serde_json::from_str(&row.spec)
            .map_err(|e| JobError::Io(format!("job {}: unreadable settings ({e})", row.id)))?;
        let eta_s = if row.status == "running" {
            let live = self.live();
            live.running
                .as_ref()
                .filter(|r| r.id == row.id)
                .and_then(|r| {
                    let done = r.last_step.saturating_sub(r.first_step?.saturating_sub(1));
                    (done > 0).then(|| {
                        let per_step = r.since.elapsed().as_secs_f64() / done as f64;
                        (row.total_steps.saturating_sub(row.step) as f64 * per_step).round()
                    })
                })
        } else {
            None
        };
        Ok(JobView {
            id: row.id.clone(),
            status: row.status.clone(),
            base_model: spec.base_model.clone(),
            output_name: spec.output_name.clone(),
            step: row.step,
            total_steps: row.total_steps,
            train_loss: row.train_loss.filter(|x| x.is_finite()),
            eval_loss: row.eval_loss.filter(|x| x.is_finite()),
            eval_perplexity: row.eval_loss.map(f64::exp).filter(|x| x.is_finite()),
            tokens_per_s: row.tokens_per_s.filter(|x| x.is_finite()),
            eta_s,
            created_at: row.created_at.clone(),
            started_at: row.started_at.clone(),
            finished_at: row.finished_at.clone(),
            error: row.error.clone(),
            settings: spec,
            history: if history {
                Some(
                    self.store
                        .history(&row.id)?
                        .into_iter()
                        .map(|mut p| {
                            p.train_loss = p.train_loss.filter(|x| x.is_finite());
                            p.eval_loss = p.eval_loss.filter(|x| x.is_finite());
                            p
                        })
                        .collect(),
                )
            } else {
                None
            },
        })
    }

    /// Pauses a job: a running one checkpoints and stops at its next step boundary (its status
    /// says `running` until then); a queued or interrupted one is simply held.
    pub fn pause(&self, id: &str) -> Result<JobView, JobError> {
        self.control(id, |status| match status {
            "running" => Ok(Action::Signal(STOP_PAUSE)),
            "queued" | "interrupted" => Ok(Action::Set("paused")),
            "paused" => Ok(Action::Nothing),
            other => Err(format!("a {other} job cannot be paused")),
        })
    }

    /// Queues a paused or interrupted job again; it continues from its last checkpoint.
    pub fn resume(&self, id: &str) -> Result<JobView, JobError> {
        self.control(id, |status| match status {
            "paused" | "interrupted" => Ok(Action::Set("queued")),
            "queued" | "running" => Ok(Action::Nothing),
            other => Err(format!("a {other} job cannot be resumed")),
        })
    }

    /// Cancels a job (a running one stops at its next step boundary).
    pub fn cancel(&self, id: &str) -> Result<JobView, JobError> {
        self.control(id, |status| match status {
            "running" => Ok(Action::Signal(STOP_CANCEL)),
            "queued" | "paused" | "interrupted" => Ok(Action::Set("cancelled")),
            "cancelled" => Ok(Action::Nothing),
            other => Err(format!("a {other} job cannot be cancelled")),
        })
    }

    fn control(
        &self,
        id: &str,
        decide: impl Fn(&str) -> Result<Action, String>,
    ) -> Result<JobView, JobError> {
        // Under the live lock: the runner takes jobs under it too, so a job cannot start
        // between reading its status and changing it.
        let live = self.live();
        let mut row = self
            .store
            .job(id)?
            .ok_or_else(|| JobError::NotFound(id.into()))?;
        match decide(&row.status).map_err(JobError::Conflict)? {
            Action::Nothing => {}
            Action::Set(status) => {
                row.status = status.into();
                if status == "cancelled" {
                    row.finished_at = Some(now_rfc3339());
                }
                if status == "queued" {
                    row.error = None;
                }
                self.store.update_job(&row)?;
                self.wake.notify_all();
            }
            Action::Signal(stop) => {
                if let Some(r) = live.running.as_ref().filter(|r| r.id == id) {
                    r.stop.store(stop, Ordering::SeqCst);
                }
            }
        }
        drop(live);
        self.view(&row, false)
    }

    fn run_loop(self: Arc<Self>) {
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
                    row.status = "running".into();
                    row.error = None;
                    if row.started_at.is_none() {
                        row.started_at = Some(now_rfc3339());
                    }
                    if let Err(e) = self.store.update_job(&row) {
                        tracing::error!("job {}: {e}", row.id);
                    }
                    let stop = Arc::new(AtomicU8::new(STOP_NONE));
                    live.running = Some(Running {
                        id: row.id.clone(),
                        stop: stop.clone(),
                        since: Instant::now(),
                        first_step: None,
                        last_step: row.step,
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
        };
        let outcome = self
            .options(&row)
            .and_then(|o| super::run_observed(&o, &observer).map_err(|e| e.to_string()));
        let mut row = observer.row.into_inner().unwrap_or_else(|p| p.into_inner());
        let stopped = stop.load(Ordering::SeqCst);
        match outcome {
            Ok(summary) if summary.interrupted => {
                row.status = if stopped == STOP_CANCEL {
                    row.finished_at = Some(now_rfc3339());
                    "cancelled"
                } else {
                    "paused"
                }
                .into();
            }
            Ok(summary) => {
                if let Some(&(_, l)) = summary.evals.last() {
                    row.eval_loss = Some(l);
                }
                match self.register(&row) {
                    Ok(()) => {
                        row.status = "completed".into();
                        row.step = summary.steps_done as u64;
                    }
                    Err(e) => {
                        row.status = "failed".into();
                        row.error = Some(e);
                    }
                }
                row.finished_at = Some(now_rfc3339());
            }
            Err(e) => {
                tracing::warn!(job = %id, "training job failed: {e}");
                row.status = "failed".into();
                row.error = Some(e);
                row.finished_at = Some(now_rfc3339());
            }
        }
        tracing::info!(job = %id, status = %row.status, step = row.step, "training job ended");
        let mut live = self.live();
        if live.shutdown && row.status == "paused" {
            // Stopped by the process ending, not by a user: a restart resumes it.
            row.status = "interrupted".into();
        }
        if let Err(e) = self.store.update_job(&row) {
            tracing::error!("job {id}: {e}");
        }
        live.running = None;
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
            ModelSource::Gguf(p) | ModelSource::HfDir(p) => p.to_string_lossy().into_owned(),
            ModelSource::Hub { repo, revision } => format!("{repo}@{revision}"),
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
        let steps = spec.steps as usize;
        Ok(TrainOptions {
            model: Some(base),
            data: Some(data),
            output: models_dir(&self.settings.state_dir).join(&spec.output_name),
            steps: Some(steps),
            batch_size: spec.batch_size as usize,
            seq_len: spec.seq_len as usize,
            lr: spec.lr,
            warmup: spec
                .warmup
                .map_or((steps / 10).min(10), |w| (w as usize).min(steps)),
            eval_every: spec.eval_every as usize,
            save_every: spec.save_every as usize,
            resume: true,
            seed: spec.seed,
            device: self.settings.device.clone(),
            progress: false,
            ..TrainOptions::default()
        })
    }

    /// Offers a completed job's directory as a model; its checkpoints are dropped.
    fn register(&self, row: &JobRow) -> Result<(), String> {
        let spec: JobSpec = serde_json::from_str(&row.spec).map_err(|e| e.to_string())?;
        let dir = models_dir(&self.settings.state_dir).join(&spec.output_name);
        let _ = std::fs::remove_dir_all(super::checkpoint::checkpoints_dir(&dir));
        self.registry
            .add_named(
                &spec.output_name,
                ModelSource::HfDir(dir.clone()),
                Origin::Trained,
            )
            .map_err(|e| e.to_string())?;
        self.store
            .insert_model(&spec.output_name, &dir, &row.id, &now_rfc3339())
            .map_err(|e| e.to_string())
    }
}

enum Action {
    Nothing,
    Set(&'static str),
    Signal(u8),
}

/// Writes a running job's progress to the database as it goes.
struct JobObserver<'a> {
    manager: &'a JobManager,
    row: Mutex<JobRow>,
    stop: &'a AtomicU8,
    first: AtomicU8,
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
            let mut live = self.manager.live();
            if let Some(run) = live.running.as_mut() {
                run.since = Instant::now();
                run.first_step = Some(r.step as u64);
            }
        }
        row.step = r.step as u64;
        row.total_steps = r.total_steps as u64;
        row.train_loss = Some(r.loss);
        row.tokens_per_s = Some((r.tokens_per_s * 10.0).round() / 10.0);
        if let Some(run) = self.manager.live().running.as_mut() {
            run.last_step = r.step as u64;
        }
        let write = store
            .record_train_loss(&row.id, r.step as u64, r.loss)
            .and_then(|_| store.update_job(&row));
        if let Err(e) = write {
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
        self.stop.load(Ordering::SeqCst) != STOP_NONE
    }

    fn say(&self, message: &str) {
        tracing::info!(job = %self.row().id, "{message}");
    }

    fn console(&self) -> bool {
        false
    }
}

fn uploads_dir(state: &Path) -> PathBuf {
    state.join("uploads")
}

/// Where jobs write their models.
pub fn models_dir(state: &Path) -> PathBuf {
    state.join("models")
}

fn upload_path(state: &Path, u: &UploadRow) -> PathBuf {
    let ext = if u.format == "jsonl" { "jsonl" } else { "txt" };
    uploads_dir(state).join(format!("{}.{ext}", u.id))
}

fn new_id(prefix: &str) -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{prefix}-{n:016x}")
}

/// Write, fsync, rename: a crash leaves the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
