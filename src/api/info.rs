//! GET /info: the nanochat server's model information, for any model this server offers.

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::AppState;
use crate::engine::registry::LoadStatus;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InfoQuery {
    /// A model id from GET /models (default: the default model).
    pub model: Option<String>,
}

/// What a model is. The first six fields are the nanochat server's; a field the model's
/// format does not carry is `null` (a GGUF records no training step), never invented.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InfoResponse {
    /// The training checkpoint it was loaded from (a nanochat step, `step_002920`, or the
    /// path of a nanoGPT `ckpt.pt`); `null` for formats that are not training checkpoints.
    pub checkpoint: Option<String>,
    /// The training step the checkpoint was saved at.
    pub step: Option<u64>,
    /// The checkpoint's best validation loss, as its run recorded it (nanochat records bits
    /// per byte instead: `val_bpb`).
    pub val_loss: Option<f64>,
    /// Validation bits per byte, where the run recorded them (nanochat).
    pub val_bpb: Option<f64>,
    pub model_layers: Option<u64>,
    /// The width of its hidden states.
    pub model_dim: Option<u64>,
    /// Rows of its embedding as the file holds them (nanoGPT pads GPT-2's 50,257 tokens to
    /// 50,304 rows; the padding is never a token).
    pub vocab_size: Option<u64>,
    pub id: String,
    pub architecture: Option<String>,
    pub parameters: Option<u64>,
    /// `gguf`, `huggingface`, `nanogpt`, `nanochat`, `peft-lora` (a LoRA adapter on its base) or `hub`.
    pub format: String,
    /// The longest context, in tokens.
    pub context_length: Option<u64>,
    pub status: LoadStatus,
}

/// Model information (the nanochat server's `GET /info`), read from the model's files: it
/// works for unloaded models too.
#[utoipa::path(
    get,
    path = "/info",
    operation_id = "model_info",
    tag = "models",
    params(InfoQuery),
    responses(
        (status = 200, description = "The model's checkpoint, step, validation loss and sizes", body = InfoResponse),
        (status = 401, description = "UNAUTHORIZED", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND", body = ErrorBody),
        (status = 422, description = "VALIDATION_ERROR: a malformed query string", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn info(
    State(state): State<AppState>,
    query: Result<Query<InfoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<InfoResponse>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::new(
            super::error::ErrorCode::Validation,
            format!("query string: {}", e.body_text()),
        )
    })?;
    let models = &state.models;
    let id = match q.model.as_deref() {
        None => models.default_id(),
        Some(name) => models.find(name),
    }
    .ok_or_else(|| ApiError::model_not_found(q.model.as_deref().unwrap_or("")))?;
    let (Some(view), Some(card)) = (models.view(&id), models.card_of(&id)) else {
        return Err(ApiError::model_not_found(&id));
    };
    let shape = card.shape;
    let training = card.training.as_ref();
    Ok(Json(InfoResponse {
        checkpoint: training.map(|t| t.checkpoint.clone().unwrap_or(view.source.clone())),
        step: training.and_then(|t| t.step),
        val_loss: training.and_then(|t| t.val_loss),
        val_bpb: training.and_then(|t| t.val_bpb),
        model_layers: shape.map(|s| s.layers),
        model_dim: shape.map(|s| s.hidden),
        vocab_size: shape.map(|s| s.vocab),
        id,
        architecture: view.architecture,
        parameters: view.parameters,
        format: view.format,
        context_length: shape.map(|s| s.context),
        status: view.status,
    }))
}
