//! One model's own thread (the text-embeddings-inference pattern; the registry starts one per
//! loaded model): it loads the model (one load at a time in the process), then loops on a
//! bounded channel of already-tokenized jobs, each carrying a oneshot for its reply. HTTP
//! handlers never touch the model: they tokenize on a small blocking pool, check the length
//! limits, enqueue token ids and await the reply with a timeout. Jobs that wait together are
//! run as one batch where they can be (short prompts that are not scored: see
//! [`super::batch`]); the rest run one after another. The model's state is published on a
//! watch channel ([`ModelState`]), which /health and /status read.
//!
//! A supervisor keeps the thread alive. Each job runs under `catch_unwind`, so a job's panic
//! fails only that job; a panic in the serve loop itself is counted, published as
//! `Restarting` with the reason, and the serve loop restarts at once on the already-loaded
//! weights with a fresh prefix cache (the state goes back to `Ready`); queued jobs are served
//! after it. More than [`MAX_RESTARTS`] within [`RESTART_WINDOW`] is a broken process: the
//! state becomes `Failed` for good, queued and later jobs are refused, and when this is the
//! default model's thread `tokenscope serve` exits non-zero so that an orchestrator restarts it.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::batch;
use super::generate::{self, EngineError, Event, GenerateParams};
use super::output::{GenerateResponse, PromptToken, Step};
use super::prefix_cache::PrefixCache;
use crate::model::{self, LoadOptions, LoadedModel, ModelSource, TextTokenizer};

/// What the service reports about its model, and what the HTTP side needs to prepare jobs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub device: String,
    pub dtype: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub load_seconds: f64,
    /// Resident memory the load added (MiB; loads run one at a time, so the difference is this
    /// model's), `None` for a model loaded outside the worker.
    pub memory_mb: Option<f64>,
    /// When the load finished (RFC 3339).
    pub loaded_at: String,
    /// The model's tokenizer: prompts are tokenized before they are queued.
    pub tokenizer: Arc<TextTokenizer>,
}

/// Published on a watch channel; /health and /status read it.
#[derive(Debug, Clone)]
pub enum ModelState {
    Loading,
    Ready(Arc<ModelInfo>),
    /// Not loaded (never asked for, or unloaded): a registry entry without a worker.
    Unloaded,
    /// The model thread panicked and is being restarted (the reason says why).
    Restarting(String),
    /// The model failed to load, or its thread died too often to keep restarting it.
    Failed(String),
}

/// What a submission does when the queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Answer `Overloaded` at once (a new request meets a busy server).
    Refuse,
    /// Wait for room (the further jobs of a request already admitted: a request with more
    /// choices than the queue holds is served in turn, not refused).
    Wait,
}

/// Most jobs one request has queued or running at once. A request with many choices queues
/// the next as earlier ones finish, so jobs of requests that arrive meanwhile are taken in
/// between: a 234-choice completion otherwise held the model for its whole run and other
/// requests timed out behind it (found by the fuzzer).
pub const REQUEST_WINDOW: usize = 8;

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
    #[error("the model is unloaded")]
    Unloaded,
    #[error("the worker stopped")]
    Stopped,
    #[error("cancelled: nobody waits for the answer any more")]
    Cancelled,
    #[error("generation failed: {0}")]
    Failed(String),
    #[error("token id {id} is outside the vocabulary (0 to {})", vocab - 1)]
    InvalidTokenId { id: u32, vocab: usize },
    #[error("target {index} is empty after tokenization")]
    EmptyTarget { index: usize },
}

/// A prompt as a client sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text, tokenized by the model's own rules (BOS when the model asks for one).
    Text(String),
    /// Text with its special tokens already written out (a rendered chat template): special
    /// tokens in it are parsed, none is added.
    Rendered(String),
    /// Token ids, run exactly as given (nothing added).
    Ids(Vec<u32>),
}

/// What a streaming job reports as it runs; `index` tells the jobs of one request apart.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Prompt {
        index: usize,
        tokens: Vec<PromptToken>,
    },
    Step {
        index: usize,
        step: Box<Step>,
        /// The text this step added to the generated text (the events' pieces in order are
        /// the text so far; a step that cut a stop string off adds nothing: the response's
        /// `generated_text` is the final word).
        appended: String,
    },
}

/// Where a streaming job sends its events (unbounded: a job produces at most `max_tokens` + 1
/// of them, and the model thread must never wait for a slow client).
pub type EventSender = mpsc::UnboundedSender<StreamEvent>;

/// The reply a handler awaits.
pub type Reply = oneshot::Receiver<Result<GenerateResponse, WorkerError>>;

/// Counters the worker keeps (read by /metrics and tests).
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Jobs stopped or skipped because their client had gone (timeout, disconnect).
    pub cancelled: AtomicU64,
    /// Times the supervisor restarted the serve loop after a panic.
    pub restarts: AtomicU64,
    /// Jobs the model thread has received (prompts refused before queueing never count).
    pub received: AtomicU64,
    /// Jobs submitted and not yet finished (queued or running): see [`InFlight`].
    pub in_flight: AtomicUsize,
}

/// Counts a job among its model's in-flight jobs for as long as the job exists (it is dropped
/// when the model thread is done with it, answered or not).
struct InFlight(Arc<WorkerStats>);

impl InFlight {
    fn new(stats: &Arc<WorkerStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::SeqCst);
        Self(stats.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One request for the model thread: a prompt already tokenized and checked against the limits.
pub struct Job {
    /// The prompt text (for the response's metadata only; the model sees `ids`).
    pub prompt: String,
    pub ids: Vec<u32>,
    pub params: GenerateParams,
    pub reply: oneshot::Sender<Result<GenerateResponse, WorkerError>>,
    pub enqueued: Instant,
    /// Streaming: the job's index within its request and where its events go.
    pub stream: Option<(usize, EventSender)>,
    /// Its place in its request's window, given back when the job is dropped (done).
    _window: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Keeps the model busy (not unloadable) until the job is done.
    _in_flight: InFlight,
    /// Bytes of the generated text already sent as stream events.
    reported: AtomicUsize,
}

impl Job {
    /// True once nobody waits for the answer (the handler timed out or its client left).
    fn abandoned(&self) -> bool {
        self.reply.is_closed() || self.stream.as_ref().is_some_and(|(_, tx)| tx.is_closed())
    }

    /// Whether its prompt must be computed whole (scored, or read through the lens), not
    /// batched or taken from the cache.
    fn scores(&self) -> bool {
        self.params.prompt_logprobs || !self.params.targets.is_empty() || self.params.lens
    }

    fn report(&self, event: Event<'_>) {
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

/// What the model thread is asked to do.
enum Command {
    Generate(Box<Job>),
    /// Panics in the serve loop itself, outside any job's `catch_unwind`: how the tests prove
    /// that the supervisor notices and restarts (see [`WorkerHandle::crash_for_test`]).
    Panic,
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

/// Restarts tolerated within [`RESTART_WINDOW`] before the worker gives up.
pub const MAX_RESTARTS: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The handlers' side: a bounded sender, the model state and the tokenization pool's permits.
#[derive(Clone)]
pub struct WorkerHandle {
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<ModelState>,
    capacity: usize,
    stats: Arc<WorkerStats>,
    limits: WorkerLimits,
    /// Tokenizations running at once on tokio's blocking pool (a 1 MB prompt takes a while;
    /// this keeps a burst of them from taking every core).
    tokenize_permits: Arc<Semaphore>,
    /// One count per clone of this handle: a request holds one from choosing the model until
    /// its answer is sent, so more than the registry's own means the model is in use.
    holders: Arc<()>,
}

impl WorkerHandle {
    fn new(
        tx: mpsc::Sender<Command>,
        state: watch::Receiver<ModelState>,
        capacity: usize,
        stats: Arc<WorkerStats>,
        limits: WorkerLimits,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            tx,
            state,
            capacity,
            stats,
            limits,
            tokenize_permits: Arc::new(Semaphore::new(cores.max(2))),
            holders: Arc::new(()),
        }
    }

    /// Whether a request is using the model: another handle than this one exists (a request
    /// between choosing the model and its answer), or a job is queued or running. The
    /// registry, which holds one handle per loaded model, never unloads a model in use.
    pub fn in_use_elsewhere(&self) -> bool {
        Arc::strong_count(&self.holders) > 1 || self.stats.in_flight.load(Ordering::SeqCst) > 0
    }

    /// Whether two handles lead to the same model thread.
    pub fn same_worker(&self, other: &WorkerHandle) -> bool {
        Arc::ptr_eq(&self.stats, &other.stats)
    }

    /// A handle for a model that is not loaded: every submission is `Unloaded`.
    pub fn unloaded() -> Self {
        let (tx, _) = mpsc::channel(1);
        let (_, state) = watch::channel(ModelState::Unloaded);
        Self::new(tx, state, 1, Arc::default(), WorkerLimits::default())
    }

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
        self.stats.cancelled.load(Ordering::Relaxed)
    }
    pub fn restarts(&self) -> u64 {
        self.stats.restarts.load(Ordering::Relaxed)
    }
    pub fn jobs_received(&self) -> u64 {
        self.stats.received.load(Ordering::Relaxed)
    }

    fn ready_info(&self) -> Result<Arc<ModelInfo>, WorkerError> {
        match &*self.state.borrow() {
            ModelState::Ready(info) => Ok(info.clone()),
            ModelState::Unloaded => Err(WorkerError::Unloaded),
            _ => Err(WorkerError::NotLoaded),
        }
    }

    /// Tokenizes `prompt` off the async runtime and off the model thread, checks it against
    /// the limits, and queues the token ids. A full queue is an immediate `Overloaded`.
    pub async fn submit(
        &self,
        prompt: String,
        params: GenerateParams,
    ) -> Result<Reply, WorkerError> {
        self.submit_input(
            PromptInput::Text(prompt),
            params,
            None,
            WhenFull::Refuse,
            None,
        )
        .await
    }

    /// [`Self::submit`] for any kind of prompt, tokenizing the targets too (each on its own,
    /// without special tokens); a streaming job also sends its events to `stream`. The job
    /// holds `window` (a permit of its request's [`REQUEST_WINDOW`]) until it is done.
    pub async fn submit_input(
        &self,
        prompt: PromptInput,
        mut params: GenerateParams,
        stream: Option<(usize, EventSender)>,
        when_full: WhenFull,
        window: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Reply, WorkerError> {
        let info = self.ready_info()?;
        let permit = self
            .tokenize_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| WorkerError::Stopped)?;
        let tokenizer = info.tokenizer.clone();
        let mut targets = std::mem::take(&mut params.targets);
        let vocab = info.vocab_size;
        let tokenized = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let fail = |e: crate::model::ModelError| WorkerError::Failed(e.to_string());
            let (text, ids) = match prompt {
                PromptInput::Text(text) => {
                    let ids = tokenizer.encode(&text).map_err(fail)?;
                    (text, ids)
                }
                PromptInput::Rendered(text) => {
                    let ids = tokenizer.encode_without_special(&text).map_err(fail)?;
                    (text, ids)
                }
                PromptInput::Ids(ids) => {
                    if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                        return Err(WorkerError::InvalidTokenId { id, vocab });
                    }
                    (tokenizer.decode(&ids, false).map_err(fail)?, ids)
                }
            };
            for (index, target) in targets.iter_mut().enumerate() {
                target.ids = tokenizer
                    .encode_without_special(&target.text)
                    .map_err(fail)?;
                if target.ids.is_empty() {
                    return Err(WorkerError::EmptyTarget { index });
                }
            }
            Ok((text, ids, targets))
        })
        .await
        .map_err(|e| WorkerError::Failed(format!("tokenization task: {e}")))?;
        let (text, ids, targets) = tokenized?;
        params.targets = targets;
        if params.fit_context {
            // Shortened to what the context leaves after the prompt (llama.cpp's rule).
            let room = info.context_length.saturating_sub(ids.len());
            params.max_tokens = params.max_tokens.min(room);
        }
        let longest_target = params.targets.iter().map(|t| t.ids.len()).max();
        check_prompt(
            ids.len(),
            info.context_length,
            self.limits.max_prompt_tokens,
            params.max_tokens.max(longest_target.unwrap_or(0)),
        )?;
        let (mut job, reply) = self.job(text, ids, params, stream)?;
        job._window = window;
        match when_full {
            WhenFull::Refuse => self.send(Command::Generate(Box::new(job)))?,
            WhenFull::Wait => self
                .tx
                .send(Command::Generate(Box::new(job)))
                .await
                .map_err(|_| WorkerError::Stopped)?,
        }
        Ok(reply)
    }

    /// Queues an already-tokenized prompt (the caller has checked it with [`check_prompt`]).
    pub fn submit_ids(
        &self,
        prompt: String,
        ids: Vec<u32>,
        params: GenerateParams,
    ) -> Result<Reply, WorkerError> {
        let (job, reply) = self.job(prompt, ids, params, None)?;
        self.send(Command::Generate(Box::new(job)))?;
        Ok(reply)
    }

    fn job(
        &self,
        prompt: String,
        ids: Vec<u32>,
        params: GenerateParams,
        stream: Option<(usize, EventSender)>,
    ) -> Result<(Job, Reply), WorkerError> {
        self.ready_info()?;
        let (reply, rx) = oneshot::channel();
        let job = Job {
            prompt,
            ids,
            params,
            reply,
            enqueued: Instant::now(),
            stream,
            _window: None,
            _in_flight: InFlight::new(&self.stats),
            reported: AtomicUsize::new(0),
        };
        Ok((job, rx))
    }

    /// Makes the model thread panic outside any job (only tests call this: it is how they
    /// prove that a dead serve loop is noticed and restarted).
    #[doc(hidden)]
    pub fn crash_for_test(&self) -> Result<(), WorkerError> {
        self.send(Command::Panic)
    }

    fn send(&self, command: Command) -> Result<(), WorkerError> {
        self.tx.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => WorkerError::Overloaded,
            mpsc::error::TrySendError::Closed(_) => WorkerError::Stopped,
        })
    }
}

/// The length rules, decided before a prompt is queued: non-empty, and at most
/// min(context − max_tokens, `max_prompt_tokens`) tokens.
pub fn check_prompt(
    prompt_tokens: usize,
    context_length: usize,
    max_prompt_tokens: Option<usize>,
    max_tokens: usize,
) -> Result<(), WorkerError> {
    if prompt_tokens == 0 {
        return Err(WorkerError::EmptyPrompt);
    }
    let mut limit = context_length.saturating_sub(max_tokens);
    if let Some(cap) = max_prompt_tokens {
        limit = limit.min(cap);
    }
    if prompt_tokens > limit {
        return Err(WorkerError::PromptTooLong {
            limit,
            prompt_tokens,
            max_tokens,
        });
    }
    Ok(())
}

/// Starts the model thread: it loads `source` and then serves jobs until every handle is gone.
pub fn spawn(
    source: Result<ModelSource, String>,
    options: LoadOptions,
    limits: WorkerLimits,
    queue: usize,
) -> WorkerHandle {
    start(
        limits,
        queue,
        ModelState::Loading,
        move |state, rx, stats| run(source, options, limits, rx, state, stats),
    )
}

/// A worker for an already-loaded model (tests, benches).
pub fn spawn_loaded(model: LoadedModel, limits: WorkerLimits, queue: usize) -> WorkerHandle {
    let info = Arc::new(info_of(&model, 0.0, None));
    let ready = ModelState::Ready(info.clone());
    start(limits, queue, ready, move |state, rx, stats| {
        supervise(&model, &info, limits, rx, &state, stats)
    })
}

fn start(
    limits: WorkerLimits,
    queue: usize,
    initial: ModelState,
    body: impl FnOnce(watch::Sender<ModelState>, mpsc::Receiver<Command>, &WorkerStats) + Send + 'static,
) -> WorkerHandle {
    let capacity = queue.max(1);
    let (tx, rx) = mpsc::channel(capacity);
    let (state_tx, state_rx) = watch::channel(initial);
    let stats = Arc::new(WorkerStats::default());
    let worker_stats = stats.clone();
    let spawned = std::thread::Builder::new()
        .name("tokenscope-model".into())
        .spawn(move || body(state_tx, rx, &worker_stats));
    if let Err(e) = spawned {
        tracing::error!("cannot start the model thread: {e}");
    }
    WorkerHandle::new(tx, state_rx, capacity, stats, limits)
}

fn info_of(m: &LoadedModel, load_seconds: f64, memory_mb: Option<f64>) -> ModelInfo {
    ModelInfo {
        name: m.name.clone(),
        architecture: m.architecture.clone(),
        device: m.device_label.clone(),
        dtype: m.dtype_label.clone(),
        context_length: m.context_length(),
        vocab_size: m.model.config().vocab_size,
        load_seconds,
        memory_mb,
        loaded_at: super::registry::now_rfc3339(),
        tokenizer: m.tokenizer.clone(),
    }
}

/// Held while a model loads (see [`run`]).
static LOAD_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run(
    source: Result<ModelSource, String>,
    options: LoadOptions,
    limits: WorkerLimits,
    rx: mpsc::Receiver<Command>,
    state: watch::Sender<ModelState>,
    stats: &WorkerStats,
) {
    // One load at a time: two loads would share the cores and blur each other's memory figure.
    let load_turn = LOAD_TURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let started = Instant::now();
    let rss_before = crate::system::process_rss_bytes();
    let loaded = source.and_then(|s| {
        tracing::info!(model = %s.display_name(), "loading model");
        std::panic::catch_unwind(AssertUnwindSafe(|| model::load(&s, &options)))
            .map_err(|_| "the model loader panicked".to_string())?
            .map_err(|e| e.to_string())
    });
    let added_mb =
        crate::system::process_rss_bytes().saturating_sub(rss_before) as f64 / (1024.0 * 1024.0);
    drop(load_turn);
    match loaded {
        Ok(m) => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                model = %m.name, device = %m.device_label, dtype = %m.dtype_label,
                "model loaded in {secs:.2}s"
            );
            let info = Arc::new(info_of(&m, secs, Some((added_mb * 10.0).round() / 10.0)));
            let _ = state.send(ModelState::Ready(info.clone()));
            supervise(&m, &info, limits, rx, &state, stats);
        }
        Err(reason) => {
            tracing::error!("model failed to load: {reason}");
            let _ = state.send(ModelState::Failed(reason));
            refuse_all(rx);
        }
    }
}

/// Answers every queued and future job with `NotLoaded` (rather than leaving senders hanging).
fn refuse_all(mut rx: mpsc::Receiver<Command>) {
    while let Some(command) = rx.blocking_recv() {
        if let Command::Generate(job) = command {
            let _ = job.reply.send(Err(WorkerError::NotLoaded));
        }
    }
}

/// Runs the serve loop, restarting it on the same weights when it panics (see the module
/// comment); returns when every handle is gone or after too many restarts.
fn supervise(
    model: &LoadedModel,
    info: &Arc<ModelInfo>,
    limits: WorkerLimits,
    mut rx: mpsc::Receiver<Command>,
    state: &watch::Sender<ModelState>,
    stats: &WorkerStats,
) {
    let mut recent: VecDeque<Instant> = VecDeque::new();
    loop {
        // The receiver survives a panic: jobs still queued are served after the restart. The
        // prefix cache does not (it may be half-updated); serve() makes a fresh one.
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| serve(model, limits, &mut rx, stats)));
        let Err(panic) = outcome else {
            return;
        };
        let reason = format!("the model thread panicked: {}", panic_message(&panic));
        stats.restarts.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        recent.push_back(now);
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() > MAX_RESTARTS {
            let reason = format!(
                "{reason} ({} times within {} s; giving up)",
                recent.len(),
                RESTART_WINDOW.as_secs()
            );
            tracing::error!("{reason}");
            let _ = state.send(ModelState::Failed(reason));
            refuse_all(rx);
            return;
        }
        tracing::error!("{reason}; restarting it on the loaded weights");
        let _ = state.send(ModelState::Restarting(reason));
        let _ = state.send(ModelState::Ready(info.clone()));
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn serve(
    model: &LoadedModel,
    limits: WorkerLimits,
    rx: &mut mpsc::Receiver<Command>,
    stats: &WorkerStats,
) {
    let cfg = model.model.config();
    let kv_values = cfg.num_hidden_layers * 2 * cfg.n_kv_heads() * cfg.head_dim();
    let mut prefix = PrefixCache::new(
        limits.prefix_cache_tokens,
        super::prefix_cache::logits_cost(cfg.vocab_size, kv_values),
    );
    while let Some(first) = rx.blocking_recv() {
        // Everything already waiting joins this round (dynamic batching).
        let mut jobs = Vec::new();
        let mut command = Some(first);
        while let Some(c) = command {
            match c {
                Command::Generate(job) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    jobs.push(*job)
                }
                // Jobs drained with it are dropped: their handlers answer GENERATION_FAILED.
                Command::Panic => panic!("deliberate panic (WorkerHandle::crash_for_test)"),
            }
            command = if jobs.len() < batch::MAX_BATCH {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        let jobs = drop_abandoned(jobs, stats);
        if jobs.len() > 1 {
            run_batch(model, jobs, &mut prefix, stats);
        } else {
            for job in jobs {
                run_single(model, job, &mut prefix, stats);
            }
        }
    }
}

/// True (and counted as cancelled) when the job's client gave up while it waited: such a job
/// is not run.
fn abandoned(job: &Job, stats: &WorkerStats) -> bool {
    let gone = job.abandoned();
    if gone {
        stats.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    gone
}

fn drop_abandoned(jobs: Vec<Job>, stats: &WorkerStats) -> Vec<Job> {
    jobs.into_iter().filter(|j| !abandoned(j, stats)).collect()
}

fn finish(job: Job, result: Result<GenerateResponse, WorkerError>, stats: &WorkerStats) {
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
    let _ = job.reply.send(result);
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

fn run_single(model: &LoadedModel, job: Job, prefix: &mut PrefixCache, stats: &WorkerStats) {
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
fn run_batch(model: &LoadedModel, jobs: Vec<Job>, prefix: &mut PrefixCache, stats: &WorkerStats) {
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

fn engine_error(e: EngineError, job: &Job) -> WorkerError {
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
