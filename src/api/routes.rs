//! Handlers: /generate, /health, /status, /.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::{ApiError, ErrorBody};
use super::extract::ValidJson;
use super::types::*;
use super::AppState;
use crate::api::error::ErrorCode;
use crate::engine::registry::now_rfc3339;
use crate::engine::worker::{ModelInfo, ModelState, WorkerError};
use crate::engine::GenerateResponse;

/// Next-token distribution (and optional generation) for a prompt.
#[utoipa::path(
    post,
    path = "/generate",
    operation_id = "generate",
    tag = "generation",
    request_body = GenerateRequest,
    responses(
        (status = 200, description = "Top-k next tokens with probabilities, and each generated step", body = GenerateResponse),
        (status = 400, description = "EMPTY_PROMPT or PROMPT_TOO_LONG", body = ErrorBody,
            example = json!({"detail": "Prompt cannot be empty", "error_code": "EMPTY_PROMPT"})),
        (status = 401, description = "UNAUTHORIZED: missing or wrong bearer key", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND: `model` names no model of this server", body = ErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED: the model is unloaded (POST /models/{id}/load); TOO_MANY_MODELS (--autoload)", body = ErrorBody),
        (status = 507, description = "INSUFFICIENT_MEMORY (--autoload under --max-memory)", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE: body is not application/json", body = ErrorBody),
        (status = 422, description = "INVALID_TEMPERATURE, INVALID_MAX_TOKENS, INVALID_TOP_K or VALIDATION_ERROR, with a FastAPI-style list in `detail`", body = ErrorBody,
            example = json!({"detail": [{"loc": ["body", "temperature"], "msg": "ensure this value is less than or equal to 2.0", "type": "value_error.number.not_le"}], "error_code": "INVALID_TEMPERATURE"})),
        (status = 500, description = "GENERATION_FAILED", body = ErrorBody),
        (status = 503, description = "MODEL_NOT_LOADED or OVERLOADED (Retry-After set)", body = ErrorBody),
        (status = 504, description = "TIMEOUT", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn generate(
    State(state): State<AppState>,
    ValidJson(req): ValidJson<GenerateRequest>,
) -> Result<Json<GenerateResponse>, ApiError> {
    check_prompt_and_targets(&req.prompt, &req.targets)?;
    let state = state.select(req.model.as_deref()).await?;
    let _in_flight = super::metrics::InFlight::start();
    let params = req.params();
    let resp = run_job(&state, req.prompt, params).await?;
    state.count_generation();
    if let Some(m) = super::metrics::metrics() {
        m.prompt_tokens.inc_by(resp.metadata.prompt_tokens as u64);
        m.generated_tokens
            .inc_by(resp.metadata.completion_tokens as u64);
    }
    Ok(Json(resp))
}

/// The checks the schema states but the extractor cannot: a prompt with a character that
/// carries text (EMPTY_PROMPT), and targets that are not control characters alone (those
/// tokenize to nothing). Shared by /generate and /lens.
pub(crate) fn check_prompt_and_targets(prompt: &str, targets: &[String]) -> Result<(), ApiError> {
    if is_blank(prompt) {
        return Err(ApiError::empty_prompt());
    }
    if let Some(i) = targets
        .iter()
        .position(|t| !t.chars().any(|c| !c.is_control()))
    {
        return Err(ApiError::validation(
            vec![super::error::FieldError {
                loc: vec!["body".into(), "targets".into(), i.into()],
                msg: format!("string does not match regex \"{TARGET_PATTERN}\""),
                kind: "value_error.str.regex".into(),
            }],
            None,
        ));
    }
    Ok(())
}

/// Queues one job for the model and awaits its response. Tokenizing (on the blocking pool),
/// queueing and the model's work all count against the request timeout. Dropping the reply
/// receiver (timeout, or the client going away and axum dropping this future) is seen by the
/// worker, which then stops generating for nobody.
pub(crate) async fn run_job(
    state: &AppState,
    prompt: String,
    params: crate::engine::GenerateParams,
) -> Result<GenerateResponse, ApiError> {
    let timeout = state.config.request_timeout;
    let work = async {
        let rx = state.worker().submit(prompt, params).await?;
        rx.await.map_err(|_| WorkerError::Stopped)?
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(ApiError::timeout(timeout.as_secs_f64())),
        Ok(Err(e)) => Err(worker_error(state, e)),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// Liveness: 200 while the process runs, whatever the model's state (for orchestrators).
#[utoipa::path(
    get,
    path = "/live",
    operation_id = "live",
    tag = "service",
    responses((status = 200, description = "The process is up", body = LiveResponse))
)]
pub async fn live() -> Json<LiveResponse> {
    Json(LiveResponse {
        status: "alive".into(),
    })
}

pub(crate) fn worker_error(state: &AppState, e: WorkerError) -> ApiError {
    match e {
        WorkerError::EmptyPrompt => ApiError::empty_prompt(),
        WorkerError::PromptTooLong { .. } => {
            ApiError::new(ErrorCode::PromptTooLong, capitalize(&e.to_string()))
        }
        WorkerError::Overloaded => ApiError::overloaded(),
        WorkerError::Unloaded => ApiError::model_unloaded(&state.model_id()),
        WorkerError::NotLoaded => match state.worker().state() {
            ModelState::Failed(_) => ApiError::not_loaded(
                "Model failed to load; see GET /health for the reason and the service log for details.",
            ),
            ModelState::Restarting(_) => ApiError::not_loaded(
                "The model thread is restarting after an internal error. Please retry shortly.",
            ),
            _ => ApiError::not_loaded("Model is not loaded. Please wait for model loading to complete."),
        },
        WorkerError::Cancelled => ApiError::timeout(state.config.request_timeout.as_secs_f64()),
        WorkerError::InvalidTokenId { .. }
        | WorkerError::EmptyTarget { .. }
        | WorkerError::Untokenizable(_) => ApiError::new(ErrorCode::Validation,
            capitalize(&e.to_string()),
        ),
        WorkerError::Stopped | WorkerError::Failed(_) => ApiError::generation_failed(),
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// Liveness and readiness: 200 once the model is loaded, 503 before or after a failed load.
#[utoipa::path(
    get,
    path = "/health",
    operation_id = "health",
    tag = "service",
    responses(
        (status = 200, description = "The model is loaded and serving", body = HealthResponse),
        (status = 503, description = "Loading, or unhealthy with a reason", body = HealthResponse,
            example = json!({"status": "loading", "timestamp": "2026-01-01T12:00:00Z"})),
    )
)]
pub async fn health(State(state): State<AppState>) -> Response {
    let (code, status, reason) = match state.worker().state() {
        ModelState::Ready(_) => (StatusCode::OK, "healthy", None),
        // Unloaded on purpose (or to make room): healthy while another model serves.
        ModelState::Unloaded if any_loaded(&state) => (StatusCode::OK, "healthy", None),
        ModelState::Unloaded => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            Some("no model is loaded; load one with POST /models/{id}/load".to_string()),
        ),
        ModelState::Loading => (StatusCode::SERVICE_UNAVAILABLE, "loading", None),
        // /health answers without a key: the reason names the model's file, not where it is.
        ModelState::Failed(r) | ModelState::Restarting(r) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy",
            Some(super::error::without_paths(&r)),
        ),
    };
    let body = HealthResponse {
        status: status.into(),
        timestamp: now_rfc3339(),
        reason,
    };
    (code, Json(body)).into_response()
}

/// True when some model is ready to serve.
fn any_loaded(state: &AppState) -> bool {
    state
        .models
        .loaded()
        .iter()
        .any(|(_, w)| matches!(w.state(), ModelState::Ready(_)))
}

/// Service, model and machine status.
#[utoipa::path(
    get,
    path = "/status",
    operation_id = "status",
    tag = "service",
    responses(
        (status = 200, description = "Status retrieved", body = StatusResponse),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 503, description = "The model is still loading (or failed); same body", body = StatusResponse),
    ),
    security((), ("bearer" = []))
)]
pub async fn status(State(state): State<AppState>) -> Response {
    let model_state = state.worker().state();
    let body = tokio::task::spawn_blocking(move || status_body(&state, &model_state))
        .await
        .ok();
    match body {
        Some((code, body)) => (code, Json(body)).into_response(),
        None => ApiError::new(ErrorCode::Internal, "status unavailable").into_response(),
    }
}

fn precision_name(dtype: &str) -> String {
    match dtype {
        "f32" => "float32".into(),
        "f16" => "float16".into(),
        "bf16" => "bfloat16".into(),
        other => other.into(),
    }
}

fn status_body(state: &AppState, model_state: &ModelState) -> (StatusCode, StatusResponse) {
    let (loaded, info, error): (bool, Option<Arc<ModelInfo>>, Option<String>) = match model_state {
        ModelState::Ready(i) => (true, Some(i.clone()), None),
        ModelState::Loading => (false, None, None),
        ModelState::Unloaded => (any_loaded(state), None, None),
        ModelState::Failed(r) | ModelState::Restarting(r) => (false, None, Some(r.clone())),
    };
    let gpu = crate::system::gpu();
    let model = match &info {
        Some(i) => ModelStatus {
            name: i.name.clone(),
            loaded,
            device: i.device.clone(),
            precision: precision_name(&i.dtype),
            activations: i.activations.clone(),
            max_length: i.context_length,
            vocab_size: i.vocab_size,
            architecture: i.architecture.clone(),
            load_time_seconds: Some(i.load_seconds),
            error: None,
        },
        None => ModelStatus {
            name: state.config.model_name.clone(),
            loaded,
            device: String::new(),
            precision: String::new(),
            activations: String::new(),
            max_length: 0,
            vocab_size: 0,
            architecture: String::new(),
            load_time_seconds: None,
            error,
        },
    };
    let workers = state.models.loaded();
    let body = StatusResponse {
        service: ServiceStatus {
            status: if loaded {
                "running"
            } else if model.error.is_some() {
                "degraded"
            } else {
                "loading"
            }
            .into(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: state.started.elapsed().as_secs(),
            memory_usage_mb: crate::system::process_rss_mb(),
            queue_depth: state.worker().queue_depth(),
            queue_capacity: state.worker().queue_capacity(),
            auth_enabled: state.config.keys_on(),
        },
        model,
        models: state
            .models
            .list()
            .into_iter()
            .map(|v| {
                let w = workers.iter().find(|(id, _)| *id == v.id);
                ModelRuntime {
                    queue_depth: w.as_ref().map_or(0, |(_, w)| w.queue_depth()),
                    queue_capacity: w.as_ref().map_or(0, |(_, w)| w.queue_capacity()),
                    jobs_received: w.as_ref().map_or(0, |(_, w)| w.jobs_received()),
                    id: v.id,
                    status: v.status,
                    memory_mb: v.memory_mb,
                }
            })
            .collect(),
        system: SystemStatus {
            gpu_available: gpu.is_some(),
            gpu_name: gpu.as_ref().map(|g| g.name.clone()),
            gpu_memory_total_mb: gpu.as_ref().map(|g| g.memory_total_mb),
            gpu_memory_used_mb: gpu.as_ref().map(|g| g.memory_used_mb),
            cpu_cores: crate::system::cpu_cores(),
            system_memory_gb: crate::system::system_memory_gb(),
        },
    };
    let code = if loaded {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

/// Service overview (JSON); browsers are redirected to the inspector page.
#[utoipa::path(
    get,
    path = "/",
    operation_id = "overview",
    tag = "service",
    responses(
        (status = 200, description = "Name, version, model, status and endpoints", body = RootResponse),
        (status = 303, description = "A browser (`Accept: text/html`) is sent to the inspector page, /ui"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn root(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if super::ui::wants_html(&headers) {
        return super::ui::redirect();
    }
    overview(&state).into_response()
}

fn overview(state: &AppState) -> Json<RootResponse> {
    let (status, model) = match state.worker().state() {
        ModelState::Ready(i) => ("ready", i.name.clone()),
        ModelState::Loading => ("loading", state.config.model_name.clone()),
        ModelState::Unloaded => ("unloaded", state.model_id()),
        ModelState::Restarting(_) => ("restarting", state.config.model_name.clone()),
        ModelState::Failed(_) => ("failed", state.config.model_name.clone()),
    };
    Json(RootResponse {
        name: "tokenscope".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        description: "Next-token distributions of a causal language model".into(),
        model,
        status: status.into(),
        docs: super::SWAGGER_PATH.into(),
        endpoints: endpoints(),
    })
}

/// Every operation of the OpenAPI document (its summary as the description), then the pages
/// outside it: the list follows the route table by itself.
fn endpoints() -> Vec<EndpointInfo> {
    static LIST: std::sync::OnceLock<Vec<EndpointInfo>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        let doc = super::routes().into_openapi();
        let mut list = Vec::new();
        for (path, item) in &doc.paths.paths {
            let ops = [
                ("GET", &item.get),
                ("POST", &item.post),
                ("PUT", &item.put),
                ("PATCH", &item.patch),
                ("DELETE", &item.delete),
            ];
            for (name, op) in ops {
                if let Some(op) = op {
                    list.push(EndpointInfo {
                        method: name.into(),
                        path: path.clone(),
                        description: op.summary.clone().unwrap_or_default(),
                    });
                }
            }
        }
        for (path, about) in super::page_list() {
            list.push(EndpointInfo {
                method: "GET".into(),
                path: path.into(),
                description: about.into(),
            });
        }
        list
    })
    .clone()
}

/// 404 for a path no route matches, in OpenAI's shape under the OpenAI paths.
pub async fn not_found(uri: axum::http::Uri) -> Response {
    in_shape_for(&uri, ApiError::not_found())
}

/// 405 for a method a route does not have, in OpenAI's shape under the OpenAI paths.
pub async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    in_shape_for(&uri, ApiError::method_not_allowed())
}

fn in_shape_for(uri: &axum::http::Uri, err: ApiError) -> Response {
    if super::openai::is_openai_path(uri.path()) {
        super::openai::OpenAiError::from(err).into_response()
    } else {
        err.into_response()
    }
}
