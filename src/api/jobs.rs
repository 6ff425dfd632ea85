//! /train: training data uploads and training jobs (queued, run one at a time, paused,
//! resumed, cancelled, deleted; persisted in the state database). Each job and upload belongs
//! to the key that created it: another ordinary key gets 404 for it; admin keys see every one
//! (and so does everyone on a server without keys).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::auth::Caller;
use super::error::{ApiError, ErrorBody, FieldError};
use super::AppState;
use crate::api::error::ErrorCode;
use crate::train::jobs::store::UploadRow;
use crate::train::jobs::{JobError, JobManager, JobSpec, JobView, Missing};

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::NotFound(_) => Self::new(ErrorCode::JobNotFound, e.to_string()),
            JobError::Missing(what, msg) => Self::new(
                match what {
                    Missing::BaseModel => ErrorCode::ModelNotFound,
                    Missing::Upload => ErrorCode::UploadNotFound,
                    Missing::Data => ErrorCode::DataNotFound,
                },
                msg,
            ),
            JobError::Forbidden(msg) => Self::new(ErrorCode::PathNotAllowed, msg),
            JobError::NotDeletable(msg) => Self::new(ErrorCode::Forbidden, msg),
            JobError::Invalid(msg, field) => Self::validation(
                vec![FieldError {
                    loc: vec!["body".into(), field.into()],
                    msg,
                    kind: "value_error".into(),
                }],
                None,
            ),
            JobError::Conflict(msg) => Self::new(ErrorCode::JobConflict, msg),
            JobError::OutputExists(msg) => Self::new(ErrorCode::OutputExists, msg),
            JobError::TooLarge(_) => Self::new(ErrorCode::PayloadTooLarge, e.to_string()),
            JobError::DiskFull(msg) => Self::new(ErrorCode::DiskFull, msg),
            JobError::Memory(msg) => Self::new(ErrorCode::InsufficientMemory, msg),
            JobError::Store(_) | JobError::Io(_) => {
                tracing::error!("training jobs: {e}");
                Self::new(
                    ErrorCode::Internal,
                    "The job store failed; see the service log",
                )
            }
        }
    }
}

/// An upload's body: UTF-8 text with at least one non-space character and no NUL.
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, pattern = r"^[^\x00]*[^\s\x00][^\x00]*$")]
pub struct UploadText(#[allow(dead_code)] String);

fn manager(state: &AppState) -> Result<Arc<JobManager>, ApiError> {
    state.jobs.clone().ok_or_else(|| {
        ApiError::new(
            ErrorCode::TrainingUnavailable,
            "This server runs no training jobs",
        )
    })
}

/// Runs job-store work off the async runtime (SQLite and file writes block).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, JobError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ApiError::generation_failed())?
        .map_err(ApiError::from)
}

/// What is read and dropped of a refused upload's body before the connection closes.
const UPLOAD_DRAIN_BYTES: usize = 16 << 20;

/// Uploads training data for a later job (`data: {"upload_id": ...}`): the raw body, UTF-8
/// text, at most `--max-upload-bytes`. JSONL (one object with a `text` field per line) is
/// accepted too: send it as `Content-Type: application/jsonl` (or `application/x-ndjson`), or
/// add `?format=jsonl` (`?format=text` forces text).
#[utoipa::path(
    post,
    path = "/train/uploads",
    operation_id = "upload_training_data",
    tag = "training",
    request_body(content(
        (UploadText = "text/plain"),
    ), description = "The training text (UTF-8)"),
    responses(
        (status = 201, description = "Stored", body = UploadRow),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 507, description = "DISK_FULL: the state directory would pass --max-disk", body = ErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = ErrorBody),
        (status = 422, description = "VALIDATION_ERROR: not UTF-8 text, empty, or a JSONL line without `text`", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    query: Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let jobs = manager(&state)?;
    let media = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let jsonl_media = matches!(
        media.as_str(),
        "application/jsonl"
            | "application/x-ndjson"
            | "application/x-jsonlines"
            | "application/jsonlines"
    );
    let text_media = media.starts_with("text/") || media == "application/octet-stream";
    if !jsonl_media && !text_media {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be text/plain or application/jsonl",
        ));
    }
    let format = query.ok().and_then(|Query(q)| q.get("format").cloned());
    let jsonl = match format.as_deref() {
        None => jsonl_media,
        Some("jsonl") => true,
        Some("text") => false,
        Some(other) => {
            return Err(ApiError::validation(
                vec![FieldError {
                    loc: vec!["query".into(), "format".into()],
                    msg: format!("format must be text or jsonl, not {other:?}"),
                    kind: "value_error".into(),
                }],
                None,
            ))
        }
    };
    // The body goes to disk as it arrives (a few chunks in flight), never whole in memory.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, String>>(4);
    let by = caller.requester();
    let writer = blocking(move || {
        jobs.upload_chunks(std::iter::from_fn(move || rx.blocking_recv()), jsonl, &by)
    });
    let feed = async move {
        let mut body = req.into_body().into_data_stream();
        let mut writing = true;
        let mut discarded = 0usize;
        while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
            let chunk = chunk
                .map(|b| b.to_vec())
                .map_err(|e| format!("the body could not be read: {e}"));
            let failed = chunk.is_err();
            if writing {
                // A closed channel: the writer stopped (too large, or a disk error); it says why.
                writing = tx.send(chunk).await.is_ok();
            } else if let Ok(c) = &chunk {
                discarded += c.len();
            }
            // After a refusal the rest of the body is read and dropped (up to a bound), so that
            // a client still sending it receives the answer instead of a broken pipe.
            if failed || discarded > UPLOAD_DRAIN_BYTES {
                break;
            }
        }
    };
    let (row, ()) = tokio::join!(writer, feed);
    Ok((StatusCode::CREATED, Json(row?)).into_response())
}

/// A JSON body deserialized with the path of the first bad field in the error's `loc`
/// (integral floats count as integers, as in JSON Schema). Shared by the bodies that are
/// not [`super::extract::ValidJson`]'s (jobs, evaluations).
pub(super) fn deserialize_body<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::validation(
            vec![FieldError {
                loc: vec!["body".into()],
                msg: format!("JSON decode error: {e}"),
                kind: "value_error.jsondecode".into(),
            }],
            None,
        )
    })?;
    // JSON Schema's integers include 5.0: so do ours (steps, batch_size, ...).
    let value = super::openai::error::integral_floats_as_integers(value);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut loc: Vec<serde_json::Value> = vec!["body".into()];
        loc.extend(
            e.path()
                .to_string()
                .split('.')
                .filter(|p| !p.is_empty() && *p != "?")
                .map(|p| serde_json::Value::from(p.to_string())),
        );
        let msg = e.inner().to_string();
        let msg = if msg.contains("did not match any variant") {
            "data must be {\"text\": ...}, {\"upload_id\": ...} or {\"path\": ...}".into()
        } else {
            msg
        };
        ApiError::validation(
            vec![FieldError {
                loc,
                msg,
                kind: "value_error".into(),
            }],
            None,
        )
    })
}

/// Queues a training job: fine-tunes `base_model` on the data and registers the result as the
/// model `output_name`. Jobs run one at a time on `--train-threads` threads.
#[utoipa::path(
    post,
    path = "/train/jobs",
    operation_id = "create_training_job",
    tag = "training",
    request_body = JobSpec,
    responses(
        (status = 202, description = "Queued", body = JobView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 409, description = "JOB_CONFLICT: output_name is taken by a model or another job", body = ErrorBody),
        (status = 403, description = "PATH_NOT_ALLOWED: data.path outside --data-dir, or no --data-dir", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND, UPLOAD_NOT_FOUND or DATA_NOT_FOUND", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 507, description = "DISK_FULL: the state directory would pass --max-disk; INSUFFICIENT_MEMORY: the job's estimated peak memory passes --max-job-memory", body = ErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = ErrorBody),
        (status = 422, description = "VALIDATION_ERROR: settings out of range, malformed body", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    req: Request<Body>,
) -> Result<Response, ApiError> {
    let jobs = manager(&state)?;
    let bytes = super::extract::json_body_bytes(req, state.config.max_body_bytes).await?;
    let spec: JobSpec = deserialize_body(&bytes)?;
    let by = caller.requester();
    let view = blocking(move || jobs.create(spec, &by)).await?;
    Ok((StatusCode::ACCEPTED, Json(view)).into_response())
}

/// Every job, oldest first (without the loss history; GET /train/jobs/{id} has it).
#[utoipa::path(
    get,
    path = "/train/jobs",
    operation_id = "list_training_jobs",
    tag = "training",
    responses(
        (status = 200, description = "The jobs", body = Vec<JobView>),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<JobView>>, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    blocking(move || jobs.list(&by)).await.map(Json)
}

/// One job, with its loss history.
#[utoipa::path(
    get,
    path = "/train/jobs/{id}",
    operation_id = "get_training_job",
    tag = "training",
    params(("id" = String, Path, description = "A job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    blocking(move || jobs.get(&id, &by)).await.map(Json)
}

/// Pauses a job: a running one checkpoints and stops after its current step.
#[utoipa::path(
    post,
    path = "/train/jobs/{id}/pause",
    operation_id = "pause_training_job",
    tag = "training",
    params(("id" = String, Path, description = "A job id")),
    responses(
        (status = 200, description = "Pausing (a running job shows `running` until its step ends) or paused", body = JobView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "JOB_CONFLICT: the job has ended", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    blocking(move || jobs.pause(&id, &by)).await.map(Json)
}

/// Queues a paused or interrupted job again: it continues from its last checkpoint.
#[utoipa::path(
    post,
    path = "/train/jobs/{id}/resume",
    operation_id = "resume_training_job",
    tag = "training",
    params(("id" = String, Path, description = "A job id")),
    responses(
        (status = 200, description = "Queued again", body = JobView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "JOB_CONFLICT: the job has ended", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    blocking(move || jobs.resume(&id, &by)).await.map(Json)
}

/// Cancels a job (a running one stops after its current step).
#[utoipa::path(
    post,
    path = "/train/jobs/{id}/cancel",
    operation_id = "cancel_training_job",
    tag = "training",
    params(("id" = String, Path, description = "A job id")),
    responses(
        (status = 200, description = "Cancelled (a running job shows `running` until its step ends)", body = JobView),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND", body = ErrorBody),
        (status = 409, description = "JOB_CONFLICT: the job has ended", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    blocking(move || jobs.cancel(&id, &by)).await.map(Json)
}

/// Deletes an ended job (completed, failed or cancelled), its history and the checkpoints it
/// left; a completed job's model stays (DELETE /models/{id} removes it).
#[utoipa::path(
    delete,
    path = "/train/jobs/{id}",
    operation_id = "delete_training_job",
    tag = "training",
    params(("id" = String, Path, description = "A job id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "JOB_NOT_FOUND (also another key's job)", body = ErrorBody),
        (status = 409, description = "JOB_CONFLICT: the job may still run; cancel it first", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    blocking(move || jobs.delete(&id, &by)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes an upload, unless a job that may still run reads it.
#[utoipa::path(
    delete,
    path = "/train/uploads/{id}",
    operation_id = "delete_training_upload",
    tag = "training",
    params(("id" = String, Path, description = "An upload id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "UPLOAD_NOT_FOUND (also another key's upload)", body = ErrorBody),
        (status = 409, description = "JOB_CONFLICT: a job that may still run reads it", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn delete_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let jobs = manager(&state)?;
    let by = caller.requester();
    blocking(move || jobs.delete_upload(&id, &by)).await?;
    Ok(StatusCode::NO_CONTENT)
}
