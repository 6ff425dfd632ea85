//! `tokenscope serve`: wires the CLI settings to the worker and the router, then serves until
//! Ctrl-C / SIGTERM, draining in-flight requests.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, AppState, ServeConfig};
use crate::cli::{read_key_file, ServeArgs};
use crate::engine::registry::{ModelRegistry, Origin, RegistrySettings};
use crate::engine::worker::{self, WorkerHandle, WorkerLimits};
use crate::model::{self, DeviceChoice, ModelSource};
use crate::train::jobs::store::Store;
use crate::train::jobs::{JobManager, JobSettings};

/// The keys, (ordinary, admin): --api-key / TOKENSCOPE_API_KEYS, --admin-key /
/// TOKENSCOPE_ADMIN_KEYS and --api-key-file, blanks dropped; a key given as both is an admin's.
pub fn collect_keys(args: &ServeArgs) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let mut users: Vec<String> = args.api_keys.iter().map(|k| k.trim().to_string()).collect();
    let mut admins: Vec<String> = args
        .admin_keys
        .iter()
        .map(|k| k.trim().to_string())
        .collect();
    if let Some(path) = &args.api_key_file {
        let listed = read_key_file(path)
            .with_context(|| format!("reading --api-key-file {}", path.display()))?;
        for (key, admin) in listed {
            if admin {
                admins.push(key);
            } else {
                users.push(key);
            }
        }
    }
    for keys in [&mut users, &mut admins] {
        keys.retain(|k| !k.is_empty());
        keys.sort();
        keys.dedup();
    }
    users.retain(|k| !admins.contains(k));
    Ok((users, admins))
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tokenscope-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let (keys, admin_keys) = collect_keys(&args)?;
    let ip: IpAddr = args.host.parse().or_else(|_| {
        if args.host == "localhost" {
            Ok("127.0.0.1".parse().expect("literal address"))
        } else {
            Err(anyhow::anyhow!(
                "--host `{}` is not an IP address",
                args.host
            ))
        }
    })?;
    if keys.is_empty() && admin_keys.is_empty() {
        if ip.is_loopback() {
            tracing::warn!(
                "API key authentication is OFF: no --api-key given (listening on loopback only)"
            );
        } else {
            tracing::warn!(
                "!!! API key authentication is OFF and the service listens on {ip}: anyone who can reach \
                 this port can use it. Pass --api-key or TOKENSCOPE_API_KEYS. !!!"
            );
        }
    } else {
        tracing::info!(
            "API key authentication is on ({} ordinary key(s), {} admin key(s))",
            keys.len(),
            admin_keys.len()
        );
        if admin_keys.is_empty() {
            tracing::warn!(
                "no admin key (--admin-key): no client can load, unload or delete models"
            );
        }
    }

    tracing::info!(
        "CPU kernels: {} (best this CPU has: {}; {} caps it)",
        model::simd::level(),
        model::simd::detected(),
        model::simd::ENV
    );
    // The state directory first: a second server on it stops here, before loading anything.
    let store = Store::open(&args.state_dir).with_context(|| {
        format!(
            "opening the state directory {} (--state-dir)",
            args.state_dir.display()
        )
    })?;
    let (models, default_worker) = model_registry(&args)?;
    let jobs = training_jobs(&args, store, models.clone())?;
    let model_name = models.default_id().unwrap_or_default();
    let redoc_bundle = api::docs::redoc_bundle_bytes().map(Arc::new);
    if redoc_bundle.is_none() {
        tracing::warn!("the ReDoc bundle was neither embedded at build time nor found in assets/ (run ./scripts/setup.sh, then build); /redoc will use the CDN");
    }
    let config = ServeConfig {
        api_keys: keys,
        admin_keys,
        protect_docs: args.protect_docs,
        public_metrics: args.public_metrics,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        max_body_bytes: args.max_body_bytes,
        model_name,
        redoc_bundle,
        cors_origins: args.cors_origins.clone(),
        max_new_tokens: args.max_new_tokens.map(|n| n as usize),
        body_timeout: Duration::from_secs_f64(args.header_timeout),
    };
    let worker_died = worker_gave_up(default_worker.subscribe());
    // Held no longer than that: a held handle counts as a request in use, and would keep the
    // default model from ever being unloaded to make room.
    drop(default_worker);
    // The generation counter is written every few seconds and at shutdown, never by a request.
    let counters = jobs.store().clone();
    let flusher = tokio::spawn({
        let counters = counters.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                let store = counters.clone();
                let written = tokio::task::spawn_blocking(move || store.flush_counters()).await;
                if let Ok(Err(e)) = written {
                    tracing::warn!("writing the statistics counters: {e}");
                }
            }
        }
    });
    let app = api::router(AppState::with_models(models, Some(jobs), config));
    let addr = SocketAddr::new(ip, args.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr().unwrap_or(addr);
    tracing::info!("tokenscope listening on http://{local} (docs at http://{local}/docs)");
    let (died_tx, died_rx) = tokio::sync::oneshot::channel();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal() => {},
            reason = worker_died => {
                tracing::error!("stopping: {reason}");
                let _ = died_tx.send(reason);
            }
        }
    };
    let limits = api::server::ConnectionLimits {
        max_connections: args.max_connections as usize,
        max_per_client: args.max_connections_per_client as usize,
        header_timeout: Duration::from_secs_f64(args.header_timeout),
    };
    let drain = Duration::from_secs_f64(args.request_timeout).min(Duration::from_secs(3600));
    api::server::serve(listener, app, limits, stop, drain).await;
    flusher.abort();
    if let Err(e) = counters.flush_counters() {
        tracing::warn!("writing the statistics counters: {e}");
    }
    if let Ok(reason) = died_rx.await {
        // Non-zero, so that an orchestrator (systemd, Kubernetes) starts a fresh process.
        anyhow::bail!("the model thread died: {reason}");
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// The models of `--model` (the first is the default, loaded now) and `--models-dir`.
fn model_registry(args: &ServeArgs) -> anyhow::Result<(Arc<ModelRegistry>, WorkerHandle)> {
    let load = args.device.load_options();
    let on_gpu = load.device.resolve().is_ok_and(|d| d.is_cuda());
    let settings = RegistrySettings {
        load,
        limits: WorkerLimits {
            max_prompt_tokens: args.max_prompt_tokens,
            prefix_cache_tokens: args.prefix_cache_tokens,
        },
        queue: args.max_queue as usize,
        max_loaded: args
            .max_loaded_models
            .map_or(if on_gpu { 4 } else { 1 }, |n| n as usize),
        max_memory_mb: args.max_memory,
        autoload: args.autoload,
        models_dir: args.models_dir.clone(),
    };
    if let Some(dir) = &args.models_dir {
        if !dir.is_dir() {
            anyhow::bail!("--models-dir {} is not a directory", dir.display());
        }
    }
    let registry = Arc::new(ModelRegistry::new(settings));
    let named: Vec<Option<&str>> = if args.models.is_empty() && args.models_dir.is_none() {
        vec![None]
    } else {
        args.models.iter().map(|m| Some(m.as_str())).collect()
    };
    let (mut checkpoint_used, mut base_used) = (false, false);
    for (i, name) in named.into_iter().enumerate() {
        // --checkpoint chooses the step of the nanochat folders among them.
        let source = model::resolve_source(name).and_then(|s| match &args.checkpoint {
            Some(c) if matches!(s, ModelSource::Nanochat { .. }) => {
                checkpoint_used = true;
                s.at_checkpoint(c)
            }
            _ => Ok(s),
        });
        // --base: an earlier --model's id, or a path.
        let source = source.and_then(|s| match &args.base {
            Some(b) if matches!(s, ModelSource::Adapter { .. }) => {
                base_used = true;
                let base = match registry.find(b).and_then(|id| registry.source_of(&id)) {
                    Some(known) => known,
                    None => ModelSource::parse(b)?,
                };
                s.on_base(base)
            }
            _ => Ok(s),
        });
        match source {
            Ok(source) => {
                registry.add(source, Origin::Configured);
            }
            // The default model's failure is reported on /health (the service stays up to say
            // why); another one's is a start-up error.
            Err(e) if i == 0 => registry.add_unresolvable(name.unwrap_or("default"), e.to_string()),
            Err(e) => anyhow::bail!("--model {}: {e}", name.unwrap_or_default()),
        }
    }
    if let (Some(b), false) = (&args.base, base_used) {
        anyhow::bail!(
            "--base {b}: it chooses the base of a PEFT adapter folder given with --model, and none is"
        );
    }
    if let (Some(c), false) = (&args.checkpoint, checkpoint_used) {
        anyhow::bail!(
            "--checkpoint {c}: it chooses the step of a nanochat checkpoint folder given with --model, and none is"
        );
    }
    registry.scan_models_dir();
    if let Some(id) = registry.default_id() {
        if let Err(e) = registry.load(&id) {
            tracing::warn!("default model {id}: {e}");
        }
    } else {
        tracing::warn!("no model: --models-dir is empty and no --model was given");
    }
    let default_worker = registry.default_handle();
    Ok((registry, default_worker))
}

/// The state database and the training-job runner.
fn training_jobs(
    args: &ServeArgs,
    store: Store,
    models: Arc<ModelRegistry>,
) -> anyhow::Result<Arc<JobManager>> {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let settings = JobSettings {
        state_dir: args.state_dir.clone(),
        data_dir: args.data_dir.clone(),
        train_threads: args
            .train_threads
            .map_or((cores / 2).max(1), |n| n as usize),
        max_upload_bytes: args.max_upload_bytes,
        device: match args.device.device {
            DeviceChoice::Auto => "auto".into(),
            DeviceChoice::Cpu => "cpu".into(),
            DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        },
        max_disk: args.max_disk,
        max_job_memory: args
            .max_job_memory
            .unwrap_or_else(|| crate::system::available_memory_bytes() / 4 * 3),
    };
    tracing::info!(
        "training jobs: state in {}, {} training thread(s) of {cores}, at most {:.2} GiB per job",
        args.state_dir.display(),
        settings.train_threads,
        settings.max_job_memory as f64 / (1u64 << 30) as f64
    );
    Ok(JobManager::start(settings, Arc::new(store), models)?)
}

/// Resolves when a model that was serving fails for good (its thread panicked too often to
/// keep restarting it: see `engine::worker`). A model that never loaded does not count: the
/// service then stays up to report why on /health.
async fn worker_gave_up(mut state: tokio::sync::watch::Receiver<worker::ModelState>) -> String {
    use worker::ModelState;
    let mut served = false;
    loop {
        match &*state.borrow_and_update() {
            ModelState::Ready(_) | ModelState::Restarting(_) => served = true,
            ModelState::Failed(reason) if served => return reason.clone(),
            _ => {}
        }
        if state.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested; draining in-flight requests");
}
