//! The handlers' side of the queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::job::{Command, InFlight, Job, LogitsJob};
use super::tokenize::{self, check_prompt};
use super::{
    EventSender, ModelInfo, ModelState, PromptInput, Reply, WhenFull, WorkerError, WorkerLimits,
    WorkerStats,
};
use crate::engine::generate::GenerateParams;

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
    pub(super) fn new(
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
    /// holds `window` (a permit of its request's [`super::REQUEST_WINDOW`]) until it is done.
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
        let targets = std::mem::take(&mut params.targets);
        let vocab = info.vocab_size;
        let tokenized = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            tokenize::tokenize(&tokenizer, prompt, targets, vocab)
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
        job.window = window;
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

    /// Tokenizes `text` as a prompt (BOS when the model asks for one) on the same pool as
    /// [`Self::submit_input`], without the length rules: for callers that cut a long text
    /// into windows themselves (evaluations).
    pub async fn tokenize_text(&self, text: String) -> Result<Vec<u32>, WorkerError> {
        let info = self.ready_info()?;
        let permit = self
            .tokenize_permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| WorkerError::Stopped)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            tokenize::tokenize(
                &info.tokenizer,
                PromptInput::Text(text),
                Vec::new(),
                info.vocab_size,
            )
        })
        .await
        .map_err(|e| WorkerError::Failed(format!("tokenization task: {e}")))?
        .map(|(_, ids, _)| ids)
    }

    /// The prompt-token cap of `--max-prompt-tokens`, if any.
    pub fn max_prompt_tokens(&self) -> Option<usize> {
        self.limits.max_prompt_tokens
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
            window: None,
            _in_flight: InFlight::new(&self.stats),
            reported: AtomicUsize::new(0),
        };
        Ok((job, rx))
    }

    /// Queues a compare job's half: the model streams the logits of every position of `ids`
    /// from `first_row` on (row `i` predicts `ids[i + 1]`), two chunks ahead of the reader at
    /// most. A full queue is an immediate `Overloaded`.
    pub fn submit_logits(
        &self,
        ids: Vec<u32>,
        first_row: usize,
    ) -> Result<super::LogitStream, WorkerError> {
        self.ready_info()?;
        let (rows, stream) = std::sync::mpsc::sync_channel(2);
        self.send(Command::Logits(Box::new(LogitsJob {
            ids,
            first_row,
            rows,
            _in_flight: InFlight::new(&self.stats),
        })))?;
        Ok(stream)
    }

    /// The model's state when it is ready to take jobs.
    pub fn ready(&self) -> Result<Arc<ModelInfo>, WorkerError> {
        self.ready_info()
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
