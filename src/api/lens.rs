//! POST /lens: the logit lens at the next position — the distribution each layer's residual
//! stream gives through the model's final norm and head.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use super::error::ApiError;
use super::extract::{BodySchema, FieldType, ValidJson};
use super::routes::{check_prompt_and_targets, run_job};
use super::AppState;
use crate::api::error::ErrorCode;
use crate::engine::lens::LensLayer;
use crate::engine::scoring::Target;
use crate::engine::{GenerateParams, Metadata};

/// Body of POST /lens.
#[derive(Debug, Clone, Deserialize, ToSchema, Validate)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "The capital of France is", "top_k": 5, "targets": [" Paris"]}))]
pub struct LensRequest {
    /// Input text prompt: at least one character that is neither whitespace nor a control
    /// character.
    #[schema(
        min_length = 1,
        pattern = r"[^\s\x00-\x1f\x7f-\x9f\ufeff]",
        example = "The capital of France is"
    )]
    pub prompt: String,
    /// Tokens listed per layer.
    #[serde(default = "default_top_k")]
    #[validate(range(min = 1, max = crate::api::bounds::TOP_K_MAX))]
    #[schema(default = 5, minimum = 1, example = 5)]
    pub top_k: i64,
    /// Continuations whose first token is looked up in every layer's distribution (each
    /// tokenized on its own, without special tokens).
    #[serde(default)]
    #[validate(length(max = crate::api::bounds::MAX_TARGETS_LEN))]
    #[schema(schema_with = super::types::targets_schema)]
    pub targets: Vec<String>,
    /// The model to ask (an id from GET /models; default: the server's default model).
    #[serde(default)]
    #[schema(example = json!(null))]
    pub model: Option<String>,
}

fn default_top_k() -> i64 {
    5
}

impl BodySchema for LensRequest {
    const FIELDS: &'static [(&'static str, FieldType, bool)] = &[
        ("prompt", FieldType::String, true),
        ("top_k", FieldType::Integer, false),
        ("targets", FieldType::StringList, false),
        ("model", FieldType::OptionalString, false),
    ];
    fn range_code(field: &str) -> Option<ErrorCode> {
        match field {
            "top_k" => Some(ErrorCode::InvalidTopK),
            _ => None,
        }
    }
}

/// Response of POST /lens.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LensResponse {
    /// One entry per decoder layer, first to last; the last is the model's own output
    /// distribution (what /generate reports at T = 1).
    pub layers: Vec<LensLayer>,
    pub metadata: LensMetadata,
}

/// What the lens ran on. The lens has no sampling: every layer's distribution is the
/// softmax of that layer's logits at temperature 1, which `temperature` and
/// `distribution` state.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LensMetadata {
    pub model_name: String,
    pub architecture: String,
    /// Prompt length in characters.
    pub prompt_length: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Wall time on the model thread, in milliseconds.
    pub generation_time_ms: f64,
    /// Always 1: the distributions are the model's own.
    #[schema(example = 1.0)]
    pub temperature: f64,
    /// Always `softmax(logits) at T = 1`, for every layer.
    #[schema(example = "softmax(logits) at T = 1")]
    pub distribution: String,
    pub device: String,
    pub dtype: String,
    /// How activations met the quantized weights: `f32` (exact products, the default) or `q8`
    /// (llama.cpp's arithmetic, `serve --activations q8`).
    #[schema(example = "f32")]
    pub activations: String,
}

impl From<Metadata> for LensMetadata {
    fn from(m: Metadata) -> Self {
        Self {
            model_name: m.model_name,
            architecture: m.architecture,
            prompt_length: m.prompt_length,
            prompt_tokens: m.prompt_tokens,
            generation_time_ms: m.generation_time_ms,
            temperature: 1.0,
            distribution: "softmax(logits) at T = 1".into(),
            device: m.device,
            dtype: m.dtype,
            activations: m.activations,
        }
    }
}

/// The logit lens: for each layer, the next-token distribution its residual stream gives.
///
/// After each decoder layer, the residual stream at the last prompt position goes through the
/// model's own final norm (RMS norm, or LayerNorm for GPT-2) and LM head (with any final logit
/// processing the family has), then softmax at T = 1. Nothing else is applied: the layer's own
/// output norms (Gemma's post-norms) are part of the residual stream already, and no extra
/// norm is trained. The last layer's entry is the model's output itself. One forward pass,
/// queued and bounded like /generate.
#[utoipa::path(
    post,
    path = "/lens",
    operation_id = "logit_lens",
    tag = "generation",
    request_body = LensRequest,
    responses(
        (status = 200, description = "Each layer's top-k tokens, entropy and targets", body = LensResponse),
        (status = 400, description = "EMPTY_PROMPT or PROMPT_TOO_LONG", body = super::error::ErrorBody),
        (status = 401, description = "UNAUTHORIZED: missing or wrong bearer key", body = super::error::ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND: `model` names no model of this server", body = super::error::ErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED: the model is unloaded (POST /models/{id}/load); TOO_MANY_MODELS (--autoload)", body = super::error::ErrorBody),
        (status = 507, description = "INSUFFICIENT_MEMORY (--autoload under --max-memory)", body = super::error::ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::error::ErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE: body is not application/json", body = super::error::ErrorBody),
        (status = 422, description = "INVALID_TOP_K or VALIDATION_ERROR, with a FastAPI-style list in `detail`", body = super::error::ErrorBody),
        (status = 500, description = "GENERATION_FAILED", body = super::error::ErrorBody),
        (status = 503, description = "MODEL_NOT_LOADED or OVERLOADED (Retry-After set)", body = super::error::ErrorBody),
        (status = 504, description = "TIMEOUT", body = super::error::ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn lens(
    State(state): State<AppState>,
    ValidJson(req): ValidJson<LensRequest>,
) -> Result<Json<LensResponse>, ApiError> {
    check_prompt_and_targets(&req.prompt, &req.targets)?;
    let state = state.select(req.model.as_deref()).await?;
    let _in_flight = super::metrics::InFlight::start();
    // Greedy: the one token the job also picks is not reported, and greedy needs no seed (the
    // lens itself is always the model's own distribution, T = 1).
    let params = GenerateParams {
        temperature: 0.0,
        max_tokens: 1,
        top_k: req.top_k.clamp(1, 50) as usize,
        targets: Target::named(&req.targets),
        lens: true,
        ..GenerateParams::default()
    };
    let resp = run_job(&state, req.prompt, params).await?;
    if let Some(m) = super::metrics::metrics() {
        m.prompt_tokens.inc_by(resp.metadata.prompt_tokens as u64);
    }
    Ok(Json(LensResponse {
        layers: resp.lens.unwrap_or_default(),
        metadata: resp.metadata.into(),
    }))
}
