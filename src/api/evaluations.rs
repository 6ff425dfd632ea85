//! Evaluations and platform statistics (the LLM platform's `/models/{id}/evaluate`,
//! `/evaluations` and `/statistics`): see [`crate::eval`] for what is measured and how.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody, ErrorCode, FieldError};
use super::jobs::{blocking, deserialize_body};
use super::AppState;
use crate::engine::registry::now_rfc3339;
use crate::eval::{self, records, EvalError, EvalList, EvalRequest, EvalView};
use crate::train::jobs::{JobError, JobManager};

fn manager(state: &AppState) -> Result<Arc<JobManager>, ApiError> {
    state.jobs.clone().ok_or_else(|| {
        ApiError::new(
            ErrorCode::TrainingUnavailable,
            "This server keeps no state directory: evaluations are not available",
        )
    })
}

fn invalid(field: &str, msg: impl Into<String>) -> ApiError {
    ApiError::validation(
        vec![FieldError {
            loc: vec!["body".into(), field.into()],
            msg: msg.into(),
            kind: "value_error".into(),
        }],
        None,
    )
}

/// The checks serde cannot make.
fn check(req: &EvalRequest) -> Result<(), ApiError> {
    if req.data.is_none() && req.references.is_empty() {
        return Err(invalid(
            "data",
            "give data (a text to score), references (prompts with expected continuations), or both",
        ));
    }
    if req.eval_name.chars().count() > 200 {
        return Err(invalid(
            "eval_name",
            "eval_name is longer than 200 characters",
        ));
    }
    if req.references.len() > eval::MAX_REFERENCES {
        return Err(invalid(
            "references",
            format!("at most {} references per evaluation", eval::MAX_REFERENCES),
        ));
    }
    // The schema's pattern: some character that is not whitespace, a control or a BOM.
    if let Some(i) = req.references.iter().position(|r| {
        !r.prompt
            .chars()
            .any(|c| !c.is_whitespace() && !c.is_control() && c != '\u{feff}')
    }) {
        return Err(ApiError::validation(
            vec![FieldError {
                loc: vec![
                    "body".into(),
                    "references".into(),
                    i.into(),
                    "prompt".into(),
                ],
                msg: "the prompt has no text".into(),
                kind: "value_error".into(),
            }],
            None,
        ));
    }
    if !(1..=eval::MAX_EVAL_NEW_TOKENS).contains(&req.max_tokens) {
        return Err(invalid(
            "max_tokens",
            format!(
                "max_tokens must be between 1 and {}",
                eval::MAX_EVAL_NEW_TOKENS
            ),
        ));
    }
    Ok(())
}

/// Evaluates a model: the perplexity and bits per byte of `data` (every document scored as
/// POST /v1/completions with `echo` scores it), and, for `references`, the model's greedy
/// continuation of each prompt compared with the expected one (BLEU-4 as sacreBLEU, ROUGE-L
/// F1 as rouge-score, distinct-2, mean length). Answers when done (at most 65,536 tokens
/// scored and 256 references; each step bounded by the request timeout) and keeps the result
/// (GET /evaluations).
#[utoipa::path(
    post,
    path = "/models/{id}/evaluate",
    operation_id = "evaluate_model",
    tag = "evaluations",
    params(("id" = String, Path, description = "A model id from GET /models", example = "SmolLM2-135M-Instruct.Q4_1")),
    request_body = EvalRequest,
    responses(
        (status = 201, description = "Evaluated", body = EvalView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "PATH_NOT_ALLOWED: data.path outside --data-dir, or no --data-dir", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND, UPLOAD_NOT_FOUND or DATA_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE: more text than one evaluation scores", body = ErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = ErrorBody),
        (status = 422, description = "VALIDATION_ERROR", body = ErrorBody),
        (status = 503, description = "OVERLOADED", body = ErrorBody),
        (status = 504, description = "TIMEOUT: a step took longer than the request timeout", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn evaluate(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let jobs = manager(&state)?;
    let bytes = super::extract::json_body_bytes(req, state.config.max_body_bytes).await?;
    let mut body: EvalRequest = deserialize_body(&bytes)?;
    check(&body)?;
    // `--max-new-tokens` bounds every generation this server makes.
    if let Some(cap) = state.config.max_new_tokens {
        body.max_tokens = body.max_tokens.min(cap as u64);
    }
    let state = state.select(Some(&id)).await?;
    let by = caller.requester();
    let documents = match body.data.clone() {
        Some(data) => {
            let (jobs, by) = (jobs.clone(), by.clone());
            blocking(move || jobs.documents(&data, &by)).await?
        }
        None => Vec::new(),
    };
    let started = Instant::now();
    let created_at = now_rfc3339();
    let timeout = state.config.request_timeout;
    let (metrics, samples) = eval::evaluate(&state.worker(), documents, &body, timeout)
        .await
        .map_err(|e| match e {
            EvalError::Worker(e) => super::routes::worker_error(&state, e),
            EvalError::Timeout(t) => ApiError::timeout(t.as_secs_f64()),
            EvalError::TooLarge(msg) => ApiError::new(ErrorCode::PayloadTooLarge, msg),
        })?;
    let view = EvalView {
        id: new_id(),
        model_id: state.model_id(),
        eval_name: body.eval_name,
        status: "completed".into(),
        created_at,
        duration_s: (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        metrics,
        samples: Some(samples),
    };
    let saved = view.clone();
    blocking(move || records::save(jobs.store(), &saved, &by).map_err(JobError::from)).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

fn new_id() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("eval-{n:016x}")
}

/// Every evaluation, oldest first (without their samples).
#[utoipa::path(
    get,
    path = "/evaluations",
    operation_id = "list_evaluations",
    tag = "evaluations",
    responses(
        (status = 200, description = "The evaluations", body = EvalList),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<EvalList>, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    let evaluations =
        blocking(move || records::list(jobs.store(), &by).map_err(JobError::from)).await?;
    Ok(Json(EvalList { evaluations }))
}

/// One evaluation, with every reference's continuation.
#[utoipa::path(
    get,
    path = "/evaluations/{id}",
    operation_id = "get_evaluation",
    tag = "evaluations",
    params(("id" = String, Path, description = "An evaluation id")),
    responses(
        (status = 200, description = "The evaluation", body = EvalView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "EVALUATION_NOT_FOUND (also another key's)", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<EvalView>, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    let wanted = id.clone();
    blocking(move || records::get(jobs.store(), &wanted, &by).map_err(JobError::from))
        .await?
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::EvaluationNotFound,
                format!("evaluation `{id}` not found"),
            )
        })
}

/// Response of GET /statistics (the LLM platform's fields). Jobs and evaluations count what
/// the caller's key may see (everything for admin keys and on a server without keys).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Statistics {
    /// Models this server offers (GET /models), loaded or not.
    pub total_models: u64,
    pub loaded_models: u64,
    pub total_training_jobs: u64,
    pub running_training_jobs: u64,
    pub completed_training_jobs: u64,
    pub total_evaluations: u64,
    /// Generation requests answered (POST /generate, /v1/completions, /v1/chat/completions)
    /// since the state directory was made.
    pub total_generations: u64,
    /// When these were counted (RFC 3339).
    pub timestamp: String,
}

/// Platform statistics: models, training jobs, evaluations and generations.
#[utoipa::path(
    get,
    path = "/statistics",
    operation_id = "get_statistics",
    tag = "evaluations",
    responses(
        (status = 200, description = "The counts", body = Statistics),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn statistics(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Statistics>, ApiError> {
    let jobs = manager(&state)?;
    let models = state.models.list();
    let total_models = models.len() as u64;
    let loaded_models = state.models.loaded().len() as u64;
    let by = caller.requester();
    blocking(move || {
        let (total, running, completed) = jobs.counts(&by)?;
        Ok(Statistics {
            total_models,
            loaded_models,
            total_training_jobs: total,
            running_training_jobs: running,
            completed_training_jobs: completed,
            total_evaluations: records::count(jobs.store(), &by)?,
            total_generations: jobs.store().generations(),
            timestamp: now_rfc3339(),
        })
    })
    .await
    .map(Json)
}
