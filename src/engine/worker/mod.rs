//! One model's own thread (the text-embeddings-inference pattern; the registry starts one per
//! loaded model), split by stage:
//!
//! 1. [`tokenize`]: prompts and targets become token ids on a small blocking pool, off the
//!    async runtime and off the model thread, and are checked against the length limits;
//! 2. [`handle`]: the handlers' side of the bounded queue ([`WorkerHandle`]): already-tokenized
//!    [`job::Job`]s, each carrying a oneshot for its reply, a full queue refused at once;
//! 3. [`backend`]: the model thread itself: it loads the model (one load at a time in the
//!    process), publishes its state on a watch channel ([`ModelState`], read by /health and
//!    /status), and keeps the serve loop alive under a supervisor;
//! 4. [`schedule`]: the batching policy: jobs that wait together run as one batch where they
//!    can (short prompts that are not scored: see [`super::batch`]), the rest one after another;
//! 5. [`reply`]: output assembly: the engine's results and events become replies and stream
//!    events.
//!
//! Each job runs under `catch_unwind`, so a job's panic fails only that job; a panic in the
//! serve loop itself is counted, published as `Restarting` with the reason, and the serve loop
//! restarts at once on the already-loaded weights with a fresh prefix cache (the state goes
//! back to `Ready`); queued jobs are served after it. More than [`MAX_RESTARTS`] within
//! [`RESTART_WINDOW`] is a broken process: the state becomes `Failed` for good, queued and
//! later jobs are refused, and when this is the default model's thread `tokenscope serve`
//! exits non-zero so that an orchestrator restarts it.

mod backend;
mod handle;
mod job;
mod reply;
mod schedule;
mod tokenize;

use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::output::{GenerateResponse, PromptToken, Step};
use crate::model::TextTokenizer;

pub use backend::{spawn, spawn_loaded};
pub use handle::WorkerHandle;
pub use tokenize::check_prompt;

/// What the service reports about its model, and what the HTTP side needs to prepare jobs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: String,
    pub device: String,
    pub dtype: String,
    /// `f32` or `q8` (llama.cpp's arithmetic).
    pub activations: String,
    pub context_length: usize,
    pub vocab_size: usize,
    pub load_seconds: f64,
    /// Memory its weights take (MiB): the model's own, counted from its tensors and packed
    /// blocks, not a difference of process RSS (which other loads, unloads and the allocator
    /// move meanwhile).
    pub memory_mb: f64,
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
    /// The text cannot be written in the model's tokens (a character outside a
    /// character-level vocabulary): the client's input, not a failure.
    #[error("{0}")]
    Untokenizable(String),
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

pub use crate::engine::compare::{LogitRows, LogitStream};

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
