//! Training jobs over the API: queued in SQLite, run one at a time on a thread of their own
//! inside a dedicated rayon pool (`--train-threads`, so that inference keeps the other cores),
//! with pause / resume / cancel at step boundaries. A job's run is `tokenscope train` itself
//! ([`super::run_observed`]) writing into `<state-dir>/models/<output_name>`, always with
//! `--resume`: a job that was paused, or interrupted by a crash, continues from its last
//! checkpoint, bit for bit as if it had not stopped. A completed job's directory is registered
//! as a model.
//!
//! The rooms: [`status`] (the state machine: every status, and what each command does in
//! each), `spec` (the API's bodies, views and errors), this file (the manager: checks, queue,
//! commands), `runner` (the thread that runs jobs and reports their progress) and `store`
//! (their SQLite database).

mod eta;
mod progress;
mod runner;
mod spec;
pub mod status;
pub mod store;

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use sha2::{Digest, Sha256};

pub use spec::*;
pub use status::JobStatus;
use status::{Command, Effect, StopRequest};

use crate::engine::registry::{self, now_rfc3339, ModelRegistry, Origin};
use crate::model::ModelSource;
use store::{JobRow, Store, UploadRow};

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
    /// Bound on the state directory's size in bytes (`--max-disk`): uploads, checkpoints and
    /// trained models.
    pub max_disk: Option<u64>,
    /// Bound on a job's memory in bytes (`--max-job-memory`): jobs are admitted by their
    /// estimated peak ([`crate::train::memory`]) and stopped if the process grows past it.
    pub max_job_memory: u64,
}

/// Who asks: the owner recorded on what they create (a digest of their API key; `None` on a
/// server without keys) and whether they see everyone's jobs and uploads (admin keys, and
/// everyone on a server without keys). Another owner's job or upload is "not found" to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub owner: Option<String>,
    pub sees_all: bool,
}

impl Requester {
    /// Everyone, on a server without keys.
    pub fn anyone() -> Self {
        Self {
            owner: None,
            sees_all: true,
        }
    }

    pub fn may_see(&self, owner: Option<&str>) -> bool {
        self.sees_all || (self.owner.is_some() && self.owner.as_deref() == owner)
    }
}

struct Running {
    id: String,
    /// The pending [`StopRequest`], read by the training loop at each step boundary.
    stop: Arc<AtomicU8>,
    /// The smoothed time per step, for `eta_s`.
    eta: eta::Eta,
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
    /// Serializes job creation (see [`JobManager::create`]).
    creating: Mutex<()>,
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
            let source = if path.join("config.json").is_file() {
                Some(ModelSource::HfDir(path))
            } else if crate::model::lora::is_adapter_dir(&path) {
                ModelSource::from_path(&path)
            } else {
                None
            };
            if let Some(source) = source {
                if let Err(e) = registry.add_named(&id, source, Origin::Trained) {
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
            creating: Mutex::new(()),
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
            r.stop.store(StopRequest::Pause as u8, Ordering::SeqCst);
        }
        self.wake.notify_all();
    }

    /// The state database (evaluations and counters live there too).
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The documents `data` stands for, read now (an evaluation's text): the text itself, an
    /// upload `by` may see (JSONL: one document per line), or a file or folder under
    /// `--data-dir` (with the same checks as a job's).
    pub fn documents(&self, data: &DataSpec, by: &Requester) -> Result<Vec<String>, JobError> {
        let docs = match data {
            DataSpec::Text(t) => {
                if t.text.trim().is_empty() {
                    return Err(JobError::invalid("data", "data.text contains no text"));
                }
                if t.text.contains('\0') {
                    return Err(JobError::invalid(
                        "data",
                        "data.text contains a NUL character",
                    ));
                }
                vec![t.text.clone()]
            }
            DataSpec::Upload(u) => {
                let upload = self
                    .store
                    .upload(&u.upload_id)?
                    .filter(|row| by.may_see(row.owner.as_deref()))
                    .ok_or_else(|| {
                        JobError::Missing(
                            Missing::Upload,
                            format!("upload `{}` not found (POST /train/uploads)", u.upload_id),
                        )
                    })?;
                let path = upload_path(&self.settings.state_dir, &upload);
                let bytes = std::fs::read(&path)
                    .map_err(|e| JobError::Io(format!("upload {}: {e}", upload.id)))?;
                crate::train::data::documents(&bytes, upload.format == "jsonl", &upload.id)
                    .map_err(|e| JobError::invalid("data", e))?
            }
            DataSpec::Path(p) => {
                let full = self.data_path(&p.path)?;
                crate::train::data::read_documents(&full)
                    .map_err(|e| JobError::Missing(Missing::Data, format!("data.path: {e}")))?
                    .0
            }
        };
        Ok(docs)
    }

    /// (all, running, completed) training jobs `by` may see.
    pub fn counts(&self, by: &Requester) -> Result<(u64, u64, u64), JobError> {
        let mut counts = (0, 0, 0);
        for row in self.store.jobs()? {
            if by.may_see(row.owner.as_deref()) {
                counts.0 += 1;
                counts.1 += u64::from(row.status == JobStatus::Running);
                counts.2 += u64::from(row.status == JobStatus::Completed);
            }
        }
        Ok(counts)
    }

    /// Stores an uploaded training file (UTF-8 text, or JSONL with a `text` field per line).
    pub fn upload(&self, bytes: &[u8], jsonl: bool, by: &Requester) -> Result<UploadRow, JobError> {
        self.upload_chunks(std::iter::once(Ok(bytes.to_vec())), jsonl, by)
    }

    /// Stores an upload that arrives in chunks (an HTTP body): each chunk is written to disk
    /// and hashed as it comes, so that memory stays bounded by a chunk whatever the upload's
    /// size; past `--max-upload-bytes` it stops at once (413). The stored file is then checked
    /// as [`super::data::documents`] checks it, reading it back a piece at a time.
    pub fn upload_chunks(
        &self,
        chunks: impl Iterator<Item = Result<Vec<u8>, String>>,
        jsonl: bool,
        by: &Requester,
    ) -> Result<UploadRow, JobError> {
        use std::io::Write;
        let id = new_id("upload");
        let format = if jsonl { "jsonl" } else { "text" };
        let part = uploads_dir(&self.settings.state_dir).join(format!("{id}.part"));
        // Removes the partial file on every way out but success.
        struct Partial<'a>(&'a Path, bool);
        impl Drop for Partial<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    let _ = std::fs::remove_file(self.0);
                }
            }
        }
        let mut guard = Partial(&part, false);
        let io = |e: std::io::Error| JobError::Io(e.to_string());
        let mut file = std::fs::File::create(&part).map_err(io)?;
        let mut hasher = Sha256::new();
        let mut bytes: u64 = 0;
        let room = self.disk_room()?;
        for chunk in chunks {
            let chunk = chunk.map_err(|e| JobError::invalid("body", e))?;
            bytes += chunk.len() as u64;
            if bytes > self.settings.max_upload_bytes as u64 {
                return Err(JobError::TooLarge(self.settings.max_upload_bytes));
            }
            if bytes > room {
                return Err(self.disk_full(bytes));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        drop(file);
        if !super::data::file_has_documents(&part, jsonl, "the upload")
            .map_err(|m| JobError::invalid("body", m))?
        {
            return Err(JobError::invalid("body", "the upload contains no text"));
        }
        let row = UploadRow {
            id,
            format: format.into(),
            bytes,
            sha256: format!("{:x}", hasher.finalize()),
            created_at: now_rfc3339(),
            owner: by.owner.clone(),
        };
        let path = upload_path(&self.settings.state_dir, &row);
        std::fs::rename(&part, &path).map_err(io)?;
        guard.1 = true;
        self.store.insert_upload(&row)?;
        Ok(row)
    }

    /// Checks and queues a job.
    pub fn create(&self, mut spec: JobSpec, by: &Requester) -> Result<JobView, JobError> {
        // Held from the check until the job is stored, so that two requests for one
        // output_name cannot both pass the check (the name is reserved by the stored job).
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        self.check(&spec, by)?;
        spec.settle_method()
            .map_err(|(field, msg)| JobError::Invalid(msg, field))?;
        self.check_memory(&spec)?;
        let needs = self.disk_estimate(&spec);
        if needs > self.disk_room()? {
            return Err(self.disk_full(needs));
        }
        if let DataSpec::Text(t) = &spec.data {
            // Kept as an upload, so that the job's settings stay small and the text is read
            // back exactly on resume.
            let upload = self.upload(t.text.as_bytes(), false, by)?;
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
            status: JobStatus::Queued,
            step: 0,
            total_steps: spec.fixed_steps().unwrap_or(0),
            train_windows: None,
            train_loss: None,
            eval_loss: None,
            tokens_per_s: None,
            created_at: now_rfc3339(),
            started_at: None,
            finished_at: None,
            error: None,
            owner: by.owner.clone(),
        };
        self.store.insert_job(&row)?;
        tracing::info!(job = %row.id, output = %spec.output_name, "training job queued");
        let _live = self.live();
        self.wake.notify_all();
        self.view(&row, false)
    }

    fn check(&self, spec: &JobSpec, by: &Requester) -> Result<(), JobError> {
        let inv = |field: &'static str, msg: &str| JobError::invalid(field, msg);
        if self.registry.find(&spec.base_model).is_none() {
            return Err(JobError::Missing(
                Missing::BaseModel,
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
        if spec.steps.is_some_and(|s| !(1..=1_000_000).contains(&s)) {
            return Err(inv("steps", "steps must be between 1 and 1000000"));
        }
        let mut settled = spec.clone();
        if let Err((field, msg)) = settled.settle_method() {
            return Err(JobError::Invalid(msg, field));
        }
        self.check_base(&settled)?;
        if let Some(e) = spec.epochs {
            if spec.steps.is_some() {
                return Err(inv("epochs", "give steps or epochs, not both"));
            }
            if !(e > 0.0 && e <= 1000.0) {
                return Err(inv(
                    "epochs",
                    "epochs must be greater than 0 and at most 1000",
                ));
            }
        }
        if spec
            .job_name
            .as_ref()
            .is_some_and(|n| n.chars().count() > 200)
        {
            return Err(inv("job_name", "job_name is longer than 200 characters"));
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
                let upload = self.store.upload(&u.upload_id)?;
                if !upload.is_some_and(|u| by.may_see(u.owner.as_deref())) {
                    return Err(JobError::Missing(
                        Missing::Upload,
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
            return Err(JobError::OutputExists(format!(
                "a model named `{}` exists already; choose another output_name",
                spec.output_name
            )));
        }
        for row in self.store.jobs()? {
            let other: Option<JobSpec> = serde_json::from_str(&row.spec).ok();
            let active = !matches!(row.status, JobStatus::Failed | JobStatus::Cancelled);
            if active && other.is_some_and(|o| o.output_name == spec.output_name) {
                // Another key's job is not named: its existence is not theirs to know.
                let who = if by.may_see(row.owner.as_deref()) {
                    format!("job {}", row.id)
                } else {
                    "another job".to_string()
                };
                return Err(JobError::OutputExists(format!(
                    "{who} already writes `{}`; choose another output_name",
                    spec.output_name
                )));
            }
        }
        Ok(())
    }

    /// `path` under `--data-dir`, refusing anything that leaves it (`..`, absolute paths,
    /// symbolic links pointing out: the path itself and every file a folder holds, each
    /// resolved), and data larger in all than `--max-upload-bytes`. Checked when the job is
    /// created and again when it runs (the folder may have changed in between).
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
                Missing::Data,
                format!("data.path `{path}` does not exist in --data-dir"),
            )
        })?;
        if !full.starts_with(&root) {
            return Err(inv(format!("data.path `{path}` leads outside --data-dir")));
        }
        let files = crate::train::data::document_files(&full)
            .map_err(|e| JobError::Missing(Missing::Data, format!("data.path `{path}`: {e}")))?;
        let mut total: u64 = 0;
        for file in &files {
            let name = file.file_name().unwrap_or_default().to_string_lossy();
            let resolved = std::fs::canonicalize(file).map_err(|e| {
                JobError::Missing(Missing::Data, format!("data.path `{path}`: {name}: {e}"))
            })?;
            if !resolved.starts_with(&root) {
                return Err(inv(format!(
                    "data.path `{path}`: `{name}` leads outside --data-dir"
                )));
            }
            total = total.saturating_add(resolved.metadata().map(|m| m.len()).unwrap_or(0));
        }
        if total > self.settings.max_upload_bytes as u64 {
            return Err(JobError::TooLarge(self.settings.max_upload_bytes));
        }
        Ok(full)
    }

    /// The jobs `by` may see, oldest first.
    pub fn list(&self, by: &Requester) -> Result<Vec<JobView>, JobError> {
        self.store
            .jobs()?
            .iter()
            .filter(|row| by.may_see(row.owner.as_deref()))
            .map(|row| self.view(row, false))
            .collect()
    }

    pub fn get(&self, id: &str, by: &Requester) -> Result<JobView, JobError> {
        let row = self.job_row(id, by)?;
        self.view(&row, true)
    }

    /// The job, if `by` may see it (another owner's job is "not found": its existence is not
    /// theirs to know).
    fn job_row(&self, id: &str, by: &Requester) -> Result<JobRow, JobError> {
        self.store
            .job(id)?
            .filter(|row| by.may_see(row.owner.as_deref()))
            .ok_or_else(|| JobError::NotFound(id.into()))
    }

    /// Deletes an ended job (completed, failed or cancelled) with its history and whatever
    /// it left in the state directory (checkpoints; a completed job's model stays, as a model:
    /// DELETE /models/{id} removes it). A job that may still run is a conflict: cancel it first.
    pub fn delete(&self, id: &str, by: &Requester) -> Result<(), JobError> {
        let live = self.live();
        let row = self.job_row(id, by)?;
        if !row.status.is_final() {
            return Err(JobError::Conflict(format!(
                "job {id} is {}: cancel it first (POST /train/jobs/{id}/cancel)",
                row.status
            )));
        }
        if row.status != JobStatus::Completed {
            if let Ok(spec) = serde_json::from_str::<JobSpec>(&row.spec) {
                let out = models_dir(&self.settings.state_dir).join(&spec.output_name);
                // The folder is this job's unless a newer job of the same name took it over
                // (allowed once this one ended): then it is that job's, and stays.
                let taken = self.store.jobs()?.iter().any(|other| {
                    other.id != row.id
                        && serde_json::from_str::<JobSpec>(&other.spec)
                            .is_ok_and(|o| o.output_name == spec.output_name)
                        && other.created_at >= row.created_at
                });
                if !taken && !self.registry.contains(&spec.output_name) {
                    let _ = std::fs::remove_dir_all(out);
                }
            }
        }
        self.store.delete_job(id)?;
        drop(live);
        Ok(())
    }

    /// Deletes a model a job trained: unloads it, forgets it and removes its folder. Models
    /// the server did not make (`--model`, `--models-dir`) are the operator's files, not the
    /// API's to delete.
    pub fn delete_model(&self, id: &str) -> Result<(), JobError> {
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let view = self.registry.view(id).ok_or_else(|| {
            JobError::Missing(Missing::BaseModel, format!("model `{id}` not found"))
        })?;
        for row in self.store.jobs()? {
            let ended = row.status.is_final();
            let based = serde_json::from_str::<JobSpec>(&row.spec)
                .is_ok_and(|s| self.registry.find(&s.base_model).as_deref() == Some(id));
            if based && !ended {
                return Err(JobError::Conflict(format!(
                    "model `{id}` is the base of a job that may still run ({}); cancel or wait for it first",
                    row.status
                )));
            }
        }
        if view.origin != Origin::Trained {
            return Err(JobError::NotDeletable(format!(
                "model `{id}` was not trained by this server (it is a file the operator \
                 configured); only trained models can be deleted"
            )));
        }
        self.registry
            .remove(id)
            .map_err(|e| JobError::Missing(Missing::BaseModel, e.to_string()))?;
        self.store.delete_model(id)?;
        let dir = models_dir(&self.settings.state_dir).join(id);
        std::fs::remove_dir_all(&dir).or_else(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Ok(()),
            _ => Err(JobError::Io(format!("removing {}: {e}", dir.display()))),
        })?;
        tracing::info!(model = %id, "trained model deleted");
        Ok(())
    }

    /// Deletes an upload, unless a job that may still run reads it.
    pub fn delete_upload(&self, id: &str, by: &Requester) -> Result<(), JobError> {
        // Not between a job's check of its upload and its insertion (see `create`).
        let _creating = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        let upload = self
            .store
            .upload(id)?
            .filter(|u| by.may_see(u.owner.as_deref()))
            .ok_or_else(|| {
                JobError::Missing(Missing::Upload, format!("upload `{id}` not found"))
            })?;
        for row in self.store.jobs()? {
            let uses = serde_json::from_str::<JobSpec>(&row.spec)
                .is_ok_and(|s| matches!(&s.data, DataSpec::Upload(u) if u.upload_id == id));
            let ended = row.status.is_final();
            if uses && !ended {
                return Err(JobError::Conflict(format!(
                    "upload {id} is the data of job {} ({}); cancel or delete that job first",
                    row.id, row.status
                )));
            }
        }
        let _ = std::fs::remove_file(upload_path(&self.settings.state_dir, &upload));
        self.store.delete_upload(id)?;
        Ok(())
    }

    fn view(&self, row: &JobRow, history: bool) -> Result<JobView, JobError> {
        let spec: JobSpec = serde_json::from_str(&row.spec)
            .map_err(|e| JobError::Io(format!("job {}: unreadable settings ({e})", row.id)))?;
        let eta_s = if row.status == JobStatus::Running {
            let live = self.live();
            live.running
                .as_ref()
                .filter(|r| r.id == row.id)
                .and_then(|r| r.eta.seconds_left(row.total_steps, Instant::now()))
        } else {
            None
        };
        let points = if history {
            Some(
                self.store
                    .history(&row.id)?
                    .into_iter()
                    .map(|mut p| {
                        p.train_loss = p.train_loss.filter(|x| x.is_finite());
                        p.eval_loss = p.eval_loss.filter(|x| x.is_finite());
                        p
                    })
                    .collect::<Vec<_>>(),
            )
        } else {
            None
        };
        Ok(JobView {
            logs: points.as_ref().map(|p| progress::logs(row, &spec, p)),
            id: row.id.clone(),
            status: row.status,
            base_model: spec.base_model.clone(),
            output_name: spec.output_name.clone(),
            step: row.step,
            total_steps: row.total_steps,
            progress: progress::percent(row),
            epochs: progress::epochs(row, &spec),
            current_epoch: progress::current_epoch(row, &spec),
            current_loss: row.train_loss.filter(|x| x.is_finite()),
            train_windows: row.train_windows,
            train_loss: row.train_loss.filter(|x| x.is_finite()),
            eval_loss: row.eval_loss.filter(|x| x.is_finite()),
            eval_perplexity: row.eval_loss.map(f64::exp).filter(|x| x.is_finite()),
            tokens_per_s: row.tokens_per_s.filter(|x| x.is_finite()),
            eta_s,
            created_at: row.created_at.clone(),
            started_at: row.started_at.clone(),
            finished_at: row.finished_at.clone(),
            error: row.error.clone(),
            disk_bytes: self.job_disk_bytes(&spec),
            settings: spec,
            history: points,
        })
    }

    /// Pauses a job: a running one checkpoints and stops at its next step boundary (its status
    /// says `running` until then); a queued or interrupted one is simply held.
    pub fn pause(&self, id: &str, by: &Requester) -> Result<JobView, JobError> {
        self.control(id, Command::Pause, by)
    }

    /// Queues a paused or interrupted job again; it continues from its last checkpoint. A
    /// running job's pause that has not taken effect yet is withdrawn.
    pub fn resume(&self, id: &str, by: &Requester) -> Result<JobView, JobError> {
        self.control(id, Command::Resume, by)
    }

    /// Cancels a job (a running one stops at its next step boundary; this overrides a pause).
    pub fn cancel(&self, id: &str, by: &Requester) -> Result<JobView, JobError> {
        self.control(id, Command::Cancel, by)
    }

    /// Applies a command by the transition table ([`status::decide`]). The decision is made
    /// and applied under the live lock, which the runner also holds when it takes a job and
    /// when it settles one: no other command or runner step can act on a stale status.
    fn control(&self, id: &str, command: Command, by: &Requester) -> Result<JobView, JobError> {
        let live = self.live();
        let mut row = self.job_row(id, by)?;
        let running = live.running.as_ref().filter(|r| r.id == id);
        let pending = running.map_or(StopRequest::None, |r| {
            StopRequest::from_u8(r.stop.load(Ordering::SeqCst))
        });
        match status::decide(row.status, pending, command).map_err(JobError::Conflict)? {
            Effect::Nothing => {}
            Effect::Become(next) => {
                row.status = next;
                if next == JobStatus::Cancelled {
                    row.finished_at = Some(now_rfc3339());
                    self.keep_last_checkpoint(&row);
                }
                if next == JobStatus::Queued {
                    row.error = None;
                }
                self.store.update_job(&row)?;
                self.wake.notify_all();
            }
            Effect::Request(stop) => {
                if let Some(r) = running {
                    r.stop.store(stop as u8, Ordering::SeqCst);
                }
            }
        }
        drop(live);
        self.view(&row, false)
    }
}

impl JobManager {
    /// Bytes the state directory may still take under `--max-disk` (unbounded without it):
    /// what it does not hold yet, less what jobs that may still run are expected to write
    /// beyond what they wrote already (their estimates are reserved when they are admitted).
    fn disk_room(&self) -> Result<u64, JobError> {
        let Some(max) = self.settings.max_disk else {
            return Ok(u64::MAX);
        };
        let mut reserved = 0u64;
        for row in self.store.jobs()? {
            if row.status.is_final() {
                continue;
            }
            if let Ok(spec) = serde_json::from_str::<JobSpec>(&row.spec) {
                reserved = reserved.saturating_add(
                    self.disk_estimate(&spec)
                        .saturating_sub(self.job_disk_bytes(&spec)),
                );
            }
        }
        Ok(max
            .saturating_sub(dir_bytes(&self.settings.state_dir))
            .saturating_sub(reserved))
    }

    /// 507 `DISK_FULL`, saying what uses the space.
    fn disk_full(&self, needs: u64) -> JobError {
        let state = &self.settings.state_dir;
        let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
        JobError::DiskFull(format!(
            "this needs {} but the state directory is bounded by --max-disk {} and holds {} \
             (uploads {}, training jobs' checkpoints and trained models {}); delete uploads \
             (DELETE /train/uploads/{{id}}), ended jobs (DELETE /train/jobs/{{id}}) or trained \
             models (DELETE /models/{{id}})",
            mb(needs),
            mb(self.settings.max_disk.unwrap_or(0)),
            mb(dir_bytes(state)),
            mb(dir_bytes(&uploads_dir(state))),
            mb(dir_bytes(&models_dir(state))),
        ))
    }

    /// Refuses, before anything is written, a base no job can train (an adapter, a nanochat
    /// checkpoint) and LoRA settings the base's projections do not allow (a module the family
    /// lacks, `r` wider than the projection): the same checks the run makes at its start.
    fn check_base(&self, spec: &JobSpec) -> Result<(), JobError> {
        let Some(id) = self.registry.find(&spec.base_model) else {
            return Ok(());
        };
        match self.registry.source_of(&id) {
            Some(ModelSource::Adapter { .. }) => {
                return Err(JobError::invalid(
                    "base_model",
                    format!("base_model `{id}` is a LoRA adapter: train its base instead"),
                ))
            }
            Some(ModelSource::Nanochat { .. }) => {
                return Err(JobError::invalid(
                    "base_model",
                    format!(
                    "base_model `{id}` is a nanochat checkpoint, which is served but not trained"
                ),
                ))
            }
            _ => {}
        }
        if let (Some(lora), Some(cfg)) = (&spec.lora, self.registry.config_of(&id)) {
            crate::train::lora::check(&lora.options(), &cfg)
                .map_err(|(field, msg)| JobError::Invalid(msg, field))?;
        }
        Ok(())
    }

    /// Refuses a job whose estimated peak memory passes `--max-job-memory`, naming both.
    fn check_memory(&self, spec: &JobSpec) -> Result<(), JobError> {
        let shape = self
            .registry
            .find(&spec.base_model)
            .and_then(|id| self.registry.shape_of(&id));
        let Some((params, shape)) = shape else {
            // A hub model not in the local cache yet: its sizes are unknown until it loads.
            tracing::warn!(base = %spec.base_model, "job admitted without a memory estimate (the base model's sizes are unknown)");
            return Ok(());
        };
        let need = match &spec.lora {
            None => crate::train::memory::estimate(params, &shape, spec.batch_size, spec.seq_len),
            Some(_) => {
                // A GGUF base stays packed (its file's size); any other is held in f32.
                let view = self
                    .registry
                    .find(&spec.base_model)
                    .and_then(|id| self.registry.view(&id));
                let base_bytes = match view {
                    Some(v) if v.format == "gguf" => v
                        .file_mb
                        .map_or(params.saturating_mul(4), |mb| (mb * 1048576.0) as u64),
                    _ => params.saturating_mul(4),
                };
                crate::train::memory::estimate_lora(
                    base_bytes,
                    &shape,
                    spec.batch_size,
                    spec.seq_len,
                )
            }
        };
        let limit = self.settings.max_job_memory;
        if need.total() > limit {
            return Err(JobError::Memory(format!(
                "this job would need about {} at its peak, more than --max-job-memory {:.2} GiB; \
                 lower batch_size or seq_len (activations and logits grow with both)",
                need.describe(),
                limit as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(())
    }

    /// What a job will write at most: two checkpoints (f32 weights and AdamW's two moments
    /// each) and the model (f32), from the base model's parameter count.
    /// A LoRA job writes its adapter's parameters only: at most r × (in + out) per targeted
    /// projection and layer.
    fn disk_estimate(&self, spec: &JobSpec) -> u64 {
        let id = self.registry.find(&spec.base_model);
        let mut params = id
            .as_ref()
            .and_then(|id| self.registry.view(id))
            .and_then(|v| v.parameters)
            .unwrap_or(0);
        if let (Some(l), Some((_, shape))) = (
            &spec.lora,
            id.as_ref().and_then(|id| self.registry.shape_of(id)),
        ) {
            let per_layer: u64 = l
                .target_modules
                .iter()
                .map(|t| match t.as_str() {
                    "gate_proj" | "up_proj" | "down_proj" => shape.hidden + shape.ffn,
                    _ => 2 * shape.hidden,
                })
                .sum();
            params = params.min(shape.layers.saturating_mul(l.r).saturating_mul(per_layer));
        }
        let data = match &spec.data {
            DataSpec::Text(t) => t.text.len() as u64,
            _ => 0,
        };
        params
            .saturating_mul(4)
            .saturating_mul(2 * 3 + 1)
            .saturating_add(data)
    }

    /// A failed or cancelled job keeps only its newest checkpoint (enough to look at, or to
    /// start a new job from by hand); the older one is space nobody will use.
    fn keep_last_checkpoint(&self, row: &JobRow) {
        if let Ok(spec) = serde_json::from_str::<JobSpec>(&row.spec) {
            let out = models_dir(&self.settings.state_dir).join(&spec.output_name);
            crate::train::checkpoint::keep_latest_only(&out);
        }
    }

    /// Bytes a job's folder takes (checkpoints while it runs; the model once completed).
    fn job_disk_bytes(&self, spec: &JobSpec) -> u64 {
        dir_bytes(&models_dir(&self.settings.state_dir).join(&spec.output_name))
    }
}

/// Bytes of the files under `dir` (links not followed; 0 when it does not exist).
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
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
