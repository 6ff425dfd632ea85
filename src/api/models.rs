//! /models: the models this server offers, and loading and unloading them at run time.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::engine::registry::{LoadStatus, ModelView};

fn view(state: &AppState, id: &str) -> Result<ModelView, ApiError> {
    state
        .models
        .view(id)
        .ok_or_else(|| ApiError::model_not_found(id))
}

/// Every model this server offers, loaded or not (the first is the default model).
#[utoipa::path(
    get,
    path = "/models",
    operation_id = "list_models",
    tag = "models",
    responses(
        (status = 200, description = "The models: `--model`, `--models-dir` and trained ones", body = Vec<ModelView>),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn list(State(state): State<AppState>) -> Json<Vec<ModelView>> {
    let models = state.models.clone();
    // Listing reads --models-dir (new files appear) and probes their headers: off the runtime.
    let list = tokio::task::spawn_blocking(move || models.list())
        .await
        .unwrap_or_default();
    Json(list)
}

/// One model.
#[utoipa::path(
    get,
    path = "/models/{id}",
    operation_id = "get_model",
    tag = "models",
    params(("id" = String, Path, description = "A model id from GET /models")),
    responses(
        (status = 200, description = "The model", body = ModelView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    view(&state, &id).map(Json)
}

/// Loads a model in the background: 202 while it loads (poll GET /models/{id} until `status`
/// is `loaded` or `failed`), 200 when it was loaded already. When `--max-loaded-models` or
/// `--max-memory` leave no room, idle models are unloaded first, least recently used first.
#[utoipa::path(
    post,
    path = "/models/{id}/load",
    operation_id = "load_model",
    tag = "models",
    params(("id" = String, Path, description = "A model id from GET /models")),
    responses(
        (status = 200, description = "Loaded already", body = ModelView),
        (status = 202, description = "Loading", body = ModelView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: not an admin key", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "TOO_MANY_MODELS: every loaded model is busy; MODEL_NOT_LOADABLE", body = ErrorBody),
        (status = 507, description = "INSUFFICIENT_MEMORY: the load would exceed --max-memory", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn load(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require_admin("load models")?;
    state.models.load(&id)?;
    let v = view(&state, &id)?;
    let code = match v.status {
        LoadStatus::Loaded => StatusCode::OK,
        _ => StatusCode::ACCEPTED,
    };
    Ok((code, Json(v)).into_response())
}

/// Unloads a model: it takes no new requests; its memory is freed when the requests it is
/// running finish.
#[utoipa::path(
    post,
    path = "/models/{id}/unload",
    operation_id = "unload_model",
    tag = "models",
    params(("id" = String, Path, description = "A model id from GET /models")),
    responses(
        (status = 200, description = "Unloaded (or it was not loaded)", body = ModelView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: not an admin key", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn unload(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ModelView>, ApiError> {
    caller.require_admin("unload models")?;
    state.models.unload(&id)?;
    view(&state, &id).map(Json)
}

/// Deletes a model a training job made: unloads it and removes its folder from the state
/// directory. Models the operator configured (`--model`, `--models-dir`) are not deleted.
#[utoipa::path(
    delete,
    path = "/models/{id}",
    operation_id = "delete_model",
    tag = "models",
    params(("id" = String, Path, description = "A trained model's id (origin `trained`)")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 403, description = "FORBIDDEN: not an admin key, or not a trained model", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_admin("delete models")?;
    let jobs = state.jobs.clone().ok_or_else(|| {
        ApiError::new(
            super::error::ErrorCode::TrainingUnavailable,
            "This server runs no training jobs, so it has no trained models to delete",
        )
    })?;
    super::jobs::blocking(move || jobs.delete_model(&id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
