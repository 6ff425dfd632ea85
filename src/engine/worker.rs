//! The model's own thread (the text-embeddings-inference pattern): it loads the model, then
//! loops on a bounded channel of jobs, each carrying a oneshot for its reply. HTTP handlers
//! never touch the model; they enqueue and await with a timeout. Health is published on a
//! watch channel. The loop takes one job at a time today; because jobs queue up here, several
//! could be drained and run as one batched forward pass without changing the API.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use super::batch;
use super::generate::{self, EngineError, GenerateParams};
use super::output::GenerateResponse;
use super::prefix_cache::PrefixCache;
use crate::model::{self, LoadOptions, LoadedModel, ModelSource};

/// What the service reports about its model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub device: String,
    pub dtype: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub load_seconds: f64,
}

/// Published on a watch channel; /health and /status read it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelState {
    Loading,
    Ready(Arc<ModelInfo>),
    Failed(String),
}

/// Why a job produced no response.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("prompt exceeds maximum length of {limit} tokens (prompt has {prompt_tokens} tokens, max_tokens is {max_tokens})")]
    PromptTooLong {
        limit: usize,
        prompt_tokens: usize,
        max_tokens: usize,
    },
    #[error("prompt is empty")]
    EmptyPrompt,
    #[error("the queue is full")]
    Overloaded,
    #[error("the model is not loaded")]
    NotLoaded,
    #[error("the worker stopped")]
    Stopped,
    #[error("cancelled: nobody waits for the answer any more")]
    Cancelled,
    #[error("generation failed: {0}")]
    Failed(String),
}

/// Counters the worker keeps (read by /metrics and tests).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Jobs stopped or skipped because their client had gone (timeout, disconnect).
    pub cancelled: std::sync::atomic::AtomicU64,
}

/// One request for the model thread.
pub struct Job {
    pub prompt: String,
    pub params: GenerateParams,
    pub reply: oneshot::Sender<Result<GenerateResponse, WorkerError>>,
    pub enqueued: Instant,
}

/// Limits the worker applies to every job.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// Cap on prompt tokens (in addition to context length − max_tokens).
    pub max_prompt_tokens: Option<usize>,
    /// Tokens kept in the prefix KV cache (0 = off).
    pub prefix_cache_tokens: usize,
}

impl Default for WorkerLimits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: None,
            prefix_cache_tokens: DEFAULT_PREFIX_CACHE_TOKENS,
        }
    }
}

/// ≈ 46 KB per token for the default model (30 layers × K and V × 3 heads × 64 × f32).
pub const DEFAULT_PREFIX_CACHE_TOKENS: usize = 2048;

/// The handlers' side: a bounded sender and the model state.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Job>,
    state: watch::Receiver<ModelState>,
    capacity: usize,
    stats: Arc<WorkerStats>,
}

impl WorkerHandle {
    pub fn state(&self) -> ModelState {
        self.state.borrow().clone()
    }
    pub fn subscribe(&self) -> watch::Receiver<ModelState> {
        self.state.clone()
    }
    /// Jobs waiting in the queue (not counting the one running).
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.tx.capacity()
    }
    pub fn queue_capacity(&self) -> usize {
        self.capacity
    }
    pub fn cancelled_jobs(&self) -> u64 {
        self.stats
            .cancelled
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Enqueues without waiting: a full queue is an immediate `Overloaded`.
    pub fn submit(
        &self,
        prompt: String,
        params: GenerateParams,
    ) -> Result<oneshot::Receiver<Result<GenerateResponse, WorkerError>>, WorkerError> {
        if !matches!(*self.state.borrow(), ModelState::Ready(_)) {
            return Err(WorkerError::NotLoaded);
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            prompt,
            params,
            reply,
            enqueued: Instant::now(),
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => WorkerError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => WorkerError::Stopped,
        })?;
        Ok(rx)
    }
}

/// Starts the model thread: it loads `source` and then serves jobs until every handle is gone.
pub fn spawn(
    source: Result<ModelSource, String>,
    options: LoadOptions,
    limits: WorkerLimits,
    queue: usize,
) -> WorkerHandle {
    let capacity = queue.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let (state_tx, state_rx) = watch::channel(ModelState::Loading);
    let stats = Arc::new(WorkerStats::default());
    let worker_stats = stats.clone();
    let spawned = std::thread::Builder::new()
        .name("tokenscope-model".into())
        .spawn(move || run(source, options, limits, rx, state_tx, &worker_stats));
    if let Err(e) = spawned {
        tracing::error!("cannot start the model thread: {e}");
    }
    WorkerHandle {
        tx,
        state: state_rx,
        capacity,
        stats,
    }
}

/// A worker for an already-loaded model (tests, benches).
pub fn spawn_loaded(model: LoadedModel, limits: WorkerLimits, queue: usize) -> WorkerHandle {
    let capacity = queue.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let (state_tx, state_rx) = watch::channel(ModelState::Ready(Arc::new(info_of(&model, 0.0))));
    let stats = Arc::new(WorkerStats::default());
    let worker_stats = stats.clone();
    let _ = std::thread::Builder::new()
        .name("tokenscope-model".into())
        .spawn(move || {
            // Holding the sender keeps the state readable for as long as the worker runs.
            let _state = state_tx;
            serve(&model, limits, rx, &worker_stats);
        });
    WorkerHandle {
        tx,
        state: state_rx,
        capacity,
        stats,
    }
}

fn info_of(m: &LoadedModel, load_seconds: f64) -> ModelInfo {
    ModelInfo {
        name: m.name.clone(),
        architecture: m.architecture.clone(),
        device: m.device_label.clone(),
        dtype: m.dtype_label.clone(),
        context_length: m.context_length(),
        vocab_size: m.model.config().vocab_size,
        load_seconds,
    }
}

fn run(
    source: Result<ModelSource, String>,
    options: LoadOptions,
    limits: WorkerLimits,
    rx: mpsc::Receiver<Job>,
    state: watch::Sender<ModelState>,
    stats: &WorkerStats,
) {
    let started = Instant::now();
    let loaded = source.and_then(|s| {
        tracing::info!(model = %s.display_name(), "loading model");
        std::panic::catch_unwind(AssertUnwindSafe(|| model::load(&s, &options)))
            .map_err(|_| "the model loader panicked".to_string())?
            .map_err(|e| e.to_string())
    });
    match loaded {
        Ok(m) => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                model = %m.name, device = %m.device_label, dtype = %m.dtype_label,
                "model loaded in {secs:.2}s"
            );
            let _ = state.send(ModelState::Ready(Arc::new(info_of(&m, secs))));
            serve(&m, limits, rx, stats);
        }
        Err(reason) => {
            tracing::error!("model failed to load: {reason}");
            let _ = state.send(ModelState::Failed(reason));
            // Keep draining so that queued senders get an answer rather than hanging.
            let mut rx = rx;
            while let Some(job) = rx.blocking_recv() {
                let _ = job.reply.send(Err(WorkerError::NotLoaded));
            }
        }
    }
}

fn serve(
    model: &LoadedModel,
    limits: WorkerLimits,
    mut rx: mpsc::Receiver<Job>,
    stats: &WorkerStats,
) {
    let mut prefix = PrefixCache::new(limits.prefix_cache_tokens);
    while let Some(first) = rx.blocking_recv() {
        // Everything already waiting joins this round (dynamic batching).
        let mut jobs = vec![first];
        while jobs.len() < batch::MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let jobs = drop_abandoned(jobs, stats);
        if jobs.len() > 1 {
            run_batch(model, limits, jobs, &mut prefix, stats);
        } else {
            for job in jobs {
                run_single(model, limits, job, &mut prefix, stats);
            }
        }
    }
}

/// True (and counted as cancelled) when the job's client gave up while it waited: such a job
/// is not run.
fn abandoned(job: &Job, stats: &WorkerStats) -> bool {
    let gone = job.reply.is_closed();
    if gone {
        stats
            .cancelled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    gone
}

fn drop_abandoned(jobs: Vec<Job>, stats: &WorkerStats) -> Vec<Job> {
    jobs.into_iter().filter(|j| !abandoned(j, stats)).collect()
}

fn finish(job: Job, result: Result<GenerateResponse, WorkerError>, stats: &WorkerStats) {
    match &result {
        Err(WorkerError::Cancelled) => {
            stats
                .cancelled
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::info!("request abandoned by its client; generation stopped");
        }
        Err(WorkerError::Failed(e)) => {
            let waited = job.enqueued.elapsed().as_millis() as u64;
            tracing::error!(since_enqueued_ms = waited, "generation failed: {e}");
        }
        _ => {}
    }
    let _ = job.reply.send(result);
}

fn run_single(
    model: &LoadedModel,
    limits: WorkerLimits,
    job: Job,
    prefix: &mut PrefixCache,
    stats: &WorkerStats,
) {
    let result =
        std::panic::catch_unwind(AssertUnwindSafe(|| run_job(model, limits, &job, prefix)))
            .unwrap_or_else(|_| Err(WorkerError::Failed("panic in the model thread".into())));
    finish(job, result, stats);
}

/// Tokenizes and checks a job's prompt against the limits.
fn checked_ids(
    model: &LoadedModel,
    limits: WorkerLimits,
    job: &Job,
) -> Result<Vec<u32>, WorkerError> {
    let ids =
        generate::tokenize(model, &job.prompt).map_err(|e| WorkerError::Failed(e.to_string()))?;
    if ids.is_empty() {
        return Err(WorkerError::EmptyPrompt);
    }
    let max_tokens = job.params.max_tokens;
    let mut limit = model.context_length().saturating_sub(max_tokens);
    if let Some(cap) = limits.max_prompt_tokens {
        limit = limit.min(cap);
    }
    if ids.len() > limit {
        return Err(WorkerError::PromptTooLong {
            limit,
            prompt_tokens: ids.len(),
            max_tokens,
        });
    }
    Ok(ids)
}

/// Several jobs: short prompts are prefilled in one forward pass, then each job continues on
/// its own slice of the KV cache. Long prompts, and the jobs of a batch that fails as a whole,
/// run alone, so one bad input cannot fail the others.
fn run_batch(
    model: &LoadedModel,
    limits: WorkerLimits,
    jobs: Vec<Job>,
    prefix: &mut PrefixCache,
    stats: &WorkerStats,
) {
    let start = Instant::now();
    let mut batched: Vec<(Job, Vec<u32>)> = Vec::new();
    let mut alone: Vec<Job> = Vec::new();
    for job in jobs {
        match checked_ids(model, limits, &job) {
            Err(e) => finish(job, Err(e), stats),
            Ok(ids) if ids.len() <= batch::MAX_BATCHED_PROMPT => batched.push((job, ids)),
            Ok(_) => alone.push(job),
        }
    }
    if batched.len() == 1 {
        alone.extend(batched.drain(..).map(|(j, _)| j));
    }
    if !batched.is_empty() {
        let prompts: Vec<&[u32]> = batched.iter().map(|(_, ids)| ids.as_slice()).collect();
        let prefilled =
            std::panic::catch_unwind(AssertUnwindSafe(|| batch::prefill_batch(model, &prompts)));
        match prefilled {
            Ok(Ok(states)) => {
                for ((job, ids), (cache, logits)) in batched.into_iter().zip(states) {
                    prefix.insert(&ids, &cache, &logits);
                    let cancelled = || job.reply.is_closed();
                    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        generate::decode_from(
                            model,
                            &job.prompt,
                            &ids,
                            &job.params,
                            &cancelled,
                            cache,
                            logits,
                            start,
                        )
                    }))
                    .unwrap_or_else(|_| {
                        Err(EngineError::Tokenizer("panic in the model thread".into()))
                    })
                    .map_err(|e| engine_error(e, &ids, &job));
                    finish(job, result, stats);
                }
            }
            _ => alone.extend(batched.into_iter().map(|(j, _)| j)),
        }
    }
    for job in alone {
        // Checked just before each run: earlier jobs may have taken long enough for it to go.
        if !abandoned(&job, stats) {
            run_single(model, limits, job, prefix, stats);
        }
    }
}

fn engine_error(e: EngineError, ids: &[u32], job: &Job) -> WorkerError {
    match e {
        EngineError::EmptyPrompt => WorkerError::EmptyPrompt,
        EngineError::Cancelled => WorkerError::Cancelled,
        EngineError::TooLong { limit, .. } => WorkerError::PromptTooLong {
            limit,
            prompt_tokens: ids.len(),
            max_tokens: job.params.max_tokens,
        },
        other => WorkerError::Failed(other.to_string()),
    }
}

fn run_job(
    model: &LoadedModel,
    limits: WorkerLimits,
    job: &Job,
    prefix: &mut PrefixCache,
) -> Result<GenerateResponse, WorkerError> {
    let ids = checked_ids(model, limits, job)?;
    let cancelled = || job.reply.is_closed();
    generate::generate_cached(
        model,
        &job.prompt,
        &ids,
        &job.params,
        &cancelled,
        Some(prefix),
    )
    .map_err(|e| engine_error(e, &ids, job))
}

/// How long a client should wait before retrying, for Retry-After.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);
