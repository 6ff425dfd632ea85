//! What travels on the queue: a tokenized, checked job and its reply channel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::oneshot;

use super::{EventSender, WorkerError, WorkerStats};
use crate::engine::generate::GenerateParams;
use crate::engine::output::GenerateResponse;

/// Counts a job among its model's in-flight jobs for as long as the job exists (it is dropped
/// when the model thread is done with it, answered or not).
pub(super) struct InFlight(Arc<WorkerStats>);

impl InFlight {
    pub(super) fn new(stats: &Arc<WorkerStats>) -> Self {
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
    pub(super) window: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Keeps the model busy (not unloadable) until the job is done.
    pub(super) _in_flight: InFlight,
    /// Bytes of the generated text already sent as stream events.
    pub(super) reported: AtomicUsize,
}

impl Job {
    /// True once nobody waits for the answer (the handler timed out or its client left).
    pub(super) fn abandoned(&self) -> bool {
        self.reply.is_closed() || self.stream.as_ref().is_some_and(|(_, tx)| tx.is_closed())
    }

    /// Whether its prompt must be computed whole (scored, or read through the lens), not
    /// batched or taken from the cache.
    pub(super) fn scores(&self) -> bool {
        self.params.prompt_logprobs || !self.params.targets.is_empty() || self.params.lens
    }
}

/// A compare job's half: stream the logits of every position from `first_row` on into
/// `rows` (see [`crate::engine::compare`]).
pub(super) struct LogitsJob {
    pub ids: Vec<u32>,
    pub first_row: usize,
    pub rows: super::LogitRows,
    /// Keeps the model busy (not unloadable) until the job is done.
    pub _in_flight: InFlight,
}

/// What the model thread is asked to do.
pub(super) enum Command {
    Generate(Box<Job>),
    Logits(Box<LogitsJob>),
    /// Panics in the serve loop itself, outside any job's `catch_unwind`: how the tests prove
    /// that the supervisor notices and restarts (see [`super::WorkerHandle::crash_for_test`]).
    Panic,
}
