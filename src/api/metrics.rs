//! Prometheus metrics (GET /metrics): requests and latency by route and status, errors by
//! error_code, queue depth and in-flight requests (the autoscaling signals), token counters,
//! model-load time and process memory.

use std::sync::OnceLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use super::AppState;
use crate::engine::worker::ModelState;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub latency: HistogramVec,
    pub errors: IntCounterVec,
    pub in_flight: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    /// POST /compare requests answered.
    pub compare_requests: IntCounter,
    queue_depth: IntGauge,
    queue_capacity: IntGauge,
    model_loaded: IntGauge,
    model_load_seconds: Gauge,
    memory_bytes: IntGauge,
    cancelled: IntCounter,
    restarts: IntCounter,
    /// Per model: 1 when loaded, its queue and the memory its load added.
    models_loaded: IntGaugeVec,
    models_queue_depth: IntGaugeVec,
    models_memory_bytes: IntGaugeVec,
    /// Training jobs by status.
    training_jobs: IntGaugeVec,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("tokenscope".into()), None)?;
    let requests = IntCounterVec::new(
        Opts::new(
            "http_requests_total",
            "HTTP requests by route, method and status",
        ),
        &["route", "method", "status"],
    )?;
    let latency = HistogramVec::new(
        HistogramOpts::new(
            "http_request_duration_seconds",
            "HTTP request latency by route",
        )
        .buckets(vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]),
        &["route", "method", "status"],
    )?;
    let errors = IntCounterVec::new(
        Opts::new("errors_total", "Error responses by error_code"),
        &["error_code"],
    )?;
    let in_flight = IntGauge::new(
        "requests_in_flight",
        "Generation requests queued or running on the model",
    )?;
    let prompt_tokens = IntCounter::new("prompt_tokens_total", "Prompt tokens evaluated")?;
    let generated_tokens = IntCounter::new("generated_tokens_total", "Tokens generated")?;
    let compare_requests = IntCounter::new(
        "compare_requests_total",
        "POST /compare requests answered (two models on one text)",
    )?;
    registry.register(Box::new(compare_requests.clone()))?;
    let queue_depth = IntGauge::new("queue_depth", "Requests waiting for the model thread")?;
    let queue_capacity = IntGauge::new("queue_capacity", "Size of the request queue")?;
    let model_loaded = IntGauge::new("model_loaded", "1 once the model is loaded")?;
    let model_load_seconds = Gauge::new("model_load_seconds", "Time the model took to load")?;
    let memory_bytes = IntGauge::new("process_resident_memory_bytes", "Resident memory")?;
    let cancelled = IntCounter::new(
        "cancelled_requests_total",
        "Generations stopped because their client had gone (timeout, disconnect)",
    )?;
    let restarts = IntCounter::new(
        "worker_restarts_total",
        "Times the model thread was restarted after a panic",
    )?;
    registry.register(Box::new(cancelled.clone()))?;
    registry.register(Box::new(restarts.clone()))?;
    registry.register(Box::new(requests.clone()))?;
    registry.register(Box::new(latency.clone()))?;
    registry.register(Box::new(errors.clone()))?;
    registry.register(Box::new(in_flight.clone()))?;
    registry.register(Box::new(prompt_tokens.clone()))?;
    registry.register(Box::new(generated_tokens.clone()))?;
    registry.register(Box::new(queue_depth.clone()))?;
    registry.register(Box::new(queue_capacity.clone()))?;
    registry.register(Box::new(model_loaded.clone()))?;
    registry.register(Box::new(model_load_seconds.clone()))?;
    registry.register(Box::new(memory_bytes.clone()))?;
    let models_loaded = IntGaugeVec::new(
        Opts::new(
            "model_loaded_by_id",
            "1 when the model is loaded, per model id",
        ),
        &["model"],
    )?;
    let models_queue_depth = IntGaugeVec::new(
        Opts::new(
            "model_queue_depth",
            "Requests waiting for the model, per model id",
        ),
        &["model"],
    )?;
    let models_memory_bytes = IntGaugeVec::new(
        Opts::new(
            "model_memory_bytes",
            "Memory the model's weights take, per model id",
        ),
        &["model"],
    )?;
    let training_jobs = IntGaugeVec::new(
        Opts::new("training_jobs", "Training jobs by status"),
        &["status"],
    )?;
    registry.register(Box::new(models_loaded.clone()))?;
    registry.register(Box::new(models_queue_depth.clone()))?;
    registry.register(Box::new(models_memory_bytes.clone()))?;
    registry.register(Box::new(training_jobs.clone()))?;
    Ok(Metrics {
        models_loaded,
        models_queue_depth,
        models_memory_bytes,
        training_jobs,
        registry,
        requests,
        latency,
        errors,
        in_flight,
        prompt_tokens,
        generated_tokens,
        compare_requests,
        queue_depth,
        queue_capacity,
        model_loaded,
        model_load_seconds,
        memory_bytes,
        cancelled,
        restarts,
    })
}

/// The process-wide metrics (one service per process).
pub fn metrics() -> Option<&'static Metrics> {
    static M: OnceLock<Option<Metrics>> = OnceLock::new();
    M.get_or_init(|| match build() {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::error!("metrics disabled: {e}");
            None
        }
    })
    .as_ref()
}

/// Decrements the in-flight gauge when a generation request ends, however it ends.
pub struct InFlight;

impl InFlight {
    pub fn start() -> Self {
        if let Some(m) = metrics() {
            m.in_flight.inc();
        }
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(m) = metrics() {
            m.in_flight.dec();
        }
    }
}

fn catch_up(counter: &IntCounter, total: u64) {
    counter.inc_by(total.saturating_sub(counter.get()));
}

pub fn record_request(route: &str, method: &str, status: u16, seconds: f64) {
    if let Some(m) = metrics() {
        let status = status.to_string();
        let labels = [route, method, status.as_str()];
        m.requests.with_label_values(&labels).inc();
        m.latency.with_label_values(&labels).observe(seconds);
    }
}

pub fn record_error(code: &str) {
    if let Some(m) = metrics() {
        m.errors.with_label_values(&[code]).inc();
    }
}

/// Prometheus text exposition format.
pub async fn handler(State(state): State<AppState>) -> Response {
    let Some(m) = metrics() else {
        return super::ApiError::generation_failed().into_response();
    };
    m.queue_depth.set(state.worker().queue_depth() as i64);
    m.queue_capacity.set(state.worker().queue_capacity() as i64);
    // The worker keeps the totals; the counters catch up to them (they only ever grow).
    catch_up(&m.cancelled, state.worker().cancelled_jobs());
    catch_up(&m.restarts, state.worker().restarts());
    match state.worker().state() {
        ModelState::Ready(info) => {
            m.model_loaded.set(1);
            m.model_load_seconds.set(info.load_seconds);
        }
        _ => m.model_loaded.set(0),
    }
    let models = state.models.clone();
    let jobs = state.jobs.clone();
    let (rss, views, job_list) = tokio::task::spawn_blocking(move || {
        let jobs = jobs
            .and_then(|j| j.list(&crate::train::jobs::Requester::anyone()).ok())
            .unwrap_or_default();
        (crate::system::process_rss_bytes(), models.list(), jobs)
    })
    .await
    .unwrap_or_default();
    m.memory_bytes.set(rss as i64);
    let loaded = state.models.loaded();
    for v in &views {
        let worker = loaded.iter().find(|(id, _)| *id == v.id).map(|(_, w)| w);
        let is_loaded = matches!(v.status, crate::engine::registry::LoadStatus::Loaded);
        m.models_loaded
            .with_label_values(&[v.id.as_str()])
            .set(i64::from(is_loaded));
        m.models_queue_depth
            .with_label_values(&[v.id.as_str()])
            .set(worker.map_or(0, |w| w.queue_depth() as i64));
        m.models_memory_bytes
            .with_label_values(&[v.id.as_str()])
            .set((v.memory_mb * 1024.0 * 1024.0) as i64);
    }
    m.training_jobs.reset();
    for status in crate::train::jobs::JobStatus::ALL {
        let n = job_list.iter().filter(|j| j.status == status).count();
        m.training_jobs
            .with_label_values(&[status.as_str()])
            .set(n as i64);
    }
    let mut buf = Vec::new();
    if TextEncoder::new()
        .encode(&m.registry.gather(), &mut buf)
        .is_err()
    {
        return super::ApiError::generation_failed().into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        buf,
    )
        .into_response()
}
