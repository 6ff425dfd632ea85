//! The model thread: load, publish the state, serve under a supervisor.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};

use super::handle::WorkerHandle;
use super::job::Command;
use super::schedule::{drop_abandoned, run_batch, run_logits, run_single};
use super::{ModelInfo, ModelState, WorkerError, WorkerLimits, WorkerStats};
use super::{MAX_RESTARTS, RESTART_WINDOW};
use crate::engine::batch;
use crate::engine::prefix_cache::{self, PrefixCache};
use crate::model::{self, LoadOptions, LoadedModel, ModelSource};

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
    let info = Arc::new(info_of(&model, 0.0));
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

fn info_of(m: &LoadedModel, load_seconds: f64) -> ModelInfo {
    let memory_mb = m.weight_bytes as f64 / (1024.0 * 1024.0);
    ModelInfo {
        name: m.name.clone(),
        architecture: m.architecture.clone(),
        device: m.device_label.clone(),
        dtype: m.dtype_label.clone(),
        activations: m.model.activations().name().into(),
        context_length: m.context_length(),
        vocab_size: m.model.config().vocab_size,
        load_seconds,
        memory_mb: (memory_mb * 10.0).round() / 10.0,
        loaded_at: crate::engine::registry::now_rfc3339(),
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
    // One load at a time: two loads at once would share the cores and the memory guard's
    // headroom.
    let load_turn = LOAD_TURN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // Unloaded while it waited for its turn (every handle gone): nobody wants it any more,
    // and a storm of load/unload calls must not make the next model wait for each of them.
    if rx.is_closed() {
        tracing::info!("a pending load was cancelled: the model was unloaded before its turn");
        return;
    }
    let started = Instant::now();
    let loaded = source.and_then(|s| {
        tracing::info!(model = %s.display_name(), "loading model");
        std::panic::catch_unwind(AssertUnwindSafe(|| model::load_shared(&s, &options)))
            .map_err(|_| "the model loader panicked".to_string())?
            .map(|(m, _)| m)
            .map_err(|e| e.to_string())
    });
    drop(load_turn);
    match loaded {
        Ok(m) => {
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                model = %m.name, device = %m.device_label, dtype = %m.dtype_label,
                activations = %m.model.activations(),
                "model loaded in {secs:.2}s"
            );
            let info = Arc::new(info_of(&m, secs));
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
        match command {
            Command::Generate(job) => {
                let _ = job.reply.send(Err(WorkerError::NotLoaded));
            }
            Command::Logits(job) => {
                let _ = job.rows.send(Err(WorkerError::NotLoaded.to_string()));
            }
            Command::Panic => {}
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

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
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
        prefix_cache::logits_cost(cfg.vocab_size, kv_values),
    );
    while let Some(first) = rx.blocking_recv() {
        // Everything already waiting joins this round (dynamic batching).
        let mut jobs = Vec::new();
        let mut streams = Vec::new();
        let mut command = Some(first);
        while let Some(c) = command {
            match c {
                Command::Generate(job) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    jobs.push(*job)
                }
                Command::Logits(job) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    streams.push(job)
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
        for job in streams {
            run_logits(model, &job);
        }
    }
}
