//! vLLM's tokenizer endpoints (lm-evaluation-harness's `tokenizer_backend=remote` calls them):
//! POST /tokenize, POST /detokenize, GET /tokenizer_info.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::completions::ready;
use super::error::{OpenAiError, OpenAiJson};
use super::types::ChatMessageIn;
use crate::api::error::ErrorCode;
use crate::api::AppState;
use crate::engine::worker::WorkerError;

/// Body of POST /tokenize: a `prompt`, or `messages` rendered with the chat template.
#[derive(Debug, Clone, ToSchema)]
#[serde(untagged)]
pub enum TokenizeRequest {
    Prompt(TokenizePrompt),
    Chat(TokenizeChat),
}

impl TokenizeRequest {
    /// The model it names (default: the server's default model).
    pub fn model(&self) -> Option<&str> {
        match self {
            Self::Prompt(p) => p.model.as_deref(),
            Self::Chat(c) => c.model.as_deref(),
        }
    }
}

/// Exactly one of the two shapes, as the schema's `oneOf` says: a body that is both (a
/// `prompt` and `messages`) is refused rather than read as whichever comes first.
impl<'de> Deserialize<'de> for TokenizeRequest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        match (
            TokenizePrompt::deserialize(&value),
            TokenizeChat::deserialize(&value),
        ) {
            (Ok(_), Ok(_)) => Err(D::Error::custom("give either prompt or messages, not both")),
            (Ok(prompt), Err(_)) => Ok(Self::Prompt(prompt)),
            (Err(_), Ok(chat)) => Ok(Self::Chat(chat)),
            // The error of the shape the body seems to mean.
            (Err(prompt), Err(chat)) => Err(D::Error::custom(
                if value.get("prompt").is_none() && value.get("messages").is_some() {
                    chat
                } else {
                    prompt
                },
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"prompt": "The capital of France is", "add_special_tokens": true, "return_token_strs": true}))]
pub struct TokenizePrompt {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: String,
    /// Add the model's special tokens (BOS when the model asks for one; default true).
    /// Special tokens written in the text are always read as such.
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// Also return each token's text (`token_strs`) and byte offsets (`offsets`).
    #[serde(default)]
    pub return_token_strs: bool,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct TokenizeChat {
    #[serde(default)]
    pub model: Option<String>,
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessageIn>,
    /// Add the model's special tokens (default false: the template writes them).
    #[serde(default)]
    pub add_special_tokens: Option<bool>,
    /// End with the assistant's turn opening (default true).
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub return_token_strs: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    pub count: usize,
    /// The model's context length.
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each token's text (with `return_token_strs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_strs: Option<Vec<String>>,
    /// Each token's [start, end) byte range in the text (with `return_token_strs`; special
    /// tokens the tokenizer added have an empty range).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offsets: Option<Vec<[usize; 2]>>,
}

/// Token ids of a text (vLLM's shape).
#[utoipa::path(
    post,
    path = "/tokenize",
    operation_id = "tokenize",
    tag = "tokenizer",
    request_body = TokenizeRequest,
    responses(
        (status = 200, description = "The token ids", body = TokenizeResponse),
        (status = 400, description = "NO_CHAT_TEMPLATE or CHAT_TEMPLATE_ERROR", body = super::error::OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer key", body = super::error::OpenAiErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND: `model` names no model of this server", body = super::error::OpenAiErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED: the model is unloaded (POST /models/{id}/load); TOO_MANY_MODELS (--autoload)", body = super::error::OpenAiErrorBody),
        (status = 507, description = "INSUFFICIENT_MEMORY (--autoload under --max-memory)", body = super::error::OpenAiErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::error::OpenAiErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = super::error::OpenAiErrorBody),
        (status = 422, description = "Neither or both of prompt and messages, or a wrong type", body = super::error::OpenAiErrorBody),
        (status = 503, description = "MODEL_NOT_LOADED", body = super::error::OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn tokenize(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, OpenAiError> {
    let state = state.select(req.model()).await?;
    let info = ready(&state)?;
    let (text, add_special, want_strs) = match req {
        TokenizeRequest::Prompt(p) => (
            p.prompt,
            p.add_special_tokens.unwrap_or(true),
            p.return_token_strs,
        ),
        TokenizeRequest::Chat(c) => {
            let messages = super::chat::chat_messages(&c.messages)?;
            let Some(template) = info.tokenizer.info.chat_template.clone() else {
                return Err(crate::api::ApiError::new(
                    ErrorCode::NoChatTemplate,
                    "the model has no usable chat template",
                )
                .into());
            };
            let generation = c.add_generation_prompt.unwrap_or(true);
            let text = template.render(&messages, generation).map_err(|e| {
                OpenAiError::from(crate::api::ApiError::new(
                    ErrorCode::ChatTemplateError,
                    e.to_string(),
                ))
            })?;
            (
                text,
                c.add_special_tokens.unwrap_or(false),
                c.return_token_strs,
            )
        }
    };
    let tokenizer = info.tokenizer.clone();
    if let Err(e) = tokenizer.check_alphabet(&text) {
        let reason = match e {
            crate::model::ModelError::Tokenizer(r) => r,
            other => other.to_string(),
        };
        return Err(
            OpenAiError::from(crate::api::ApiError::new(ErrorCode::Validation, reason))
                .with_param("prompt"),
        );
    }
    let encoded = tokio::task::spawn_blocking(move || {
        let enc = tokenizer.inner().encode(text.as_str(), add_special).ok()?;
        let ids = enc.get_ids().to_vec();
        let strs = want_strs.then(|| {
            ids.iter()
                .map(|&id| tokenizer.token_text(id).to_string())
                .collect()
        });
        let offsets = want_strs.then(|| enc.get_offsets().iter().map(|&(a, b)| [a, b]).collect());
        Some((ids, strs, offsets))
    })
    .await
    .ok()
    .flatten()
    .ok_or_else(|| OpenAiError::from(crate::api::ApiError::generation_failed()))?;
    let (tokens, token_strs, offsets) = encoded;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: info.context_length,
        tokens,
        token_strs,
        offsets,
    }))
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"tokens": [504, 3575, 282, 4649, 314]}))]
pub struct DetokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[schema(schema_with = super::types::token_ids_schema)]
    pub tokens: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The text of the tokens (special tokens included as written).
    pub prompt: String,
}

/// Text of token ids (vLLM's shape).
#[utoipa::path(
    post,
    path = "/detokenize",
    operation_id = "detokenize",
    tag = "tokenizer",
    request_body = DetokenizeRequest,
    responses(
        (status = 200, description = "The text", body = DetokenizeResponse),
        (status = 401, description = "Missing or wrong bearer key", body = super::error::OpenAiErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND: `model` names no model of this server", body = super::error::OpenAiErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED: the model is unloaded (POST /models/{id}/load); TOO_MANY_MODELS (--autoload)", body = super::error::OpenAiErrorBody),
        (status = 507, description = "INSUFFICIENT_MEMORY (--autoload under --max-memory)", body = super::error::OpenAiErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::error::OpenAiErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = super::error::OpenAiErrorBody),
        (status = 422, description = "A token id outside the vocabulary", body = super::error::OpenAiErrorBody),
        (status = 503, description = "MODEL_NOT_LOADED", body = super::error::OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn detokenize(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, OpenAiError> {
    let state = state.select(req.model.as_deref()).await?;
    let info = ready(&state)?;
    let vocab = info.vocab_size;
    if let Some(&id) = req.tokens.iter().find(|&&id| id as usize >= vocab) {
        let e = WorkerError::InvalidTokenId { id, vocab };
        return Err(OpenAiError::invalid(
            "tokens",
            ErrorCode::Validation,
            e.to_string(),
        ));
    }
    let prompt = info
        .tokenizer
        .decode(&req.tokens, false)
        .map_err(|_| OpenAiError::from(crate::api::ApiError::generation_failed()))?;
    Ok(Json(DetokenizeResponse { prompt }))
}

/// The tokenizer's settings (vLLM's `/tokenizer_info`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizerInfoResponse {
    /// `tokenscope`: the model's own vocabulary (GGUF metadata or tokenizer.json).
    pub tokenizer_class: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Whether a text prompt gets BOS first.
    pub add_bos_token: bool,
    pub model_max_length: usize,
    pub vocab_size: usize,
    pub chat_template: Option<String>,
}

#[utoipa::path(
    get,
    path = "/tokenizer_info",
    operation_id = "tokenizer_info",
    tag = "tokenizer",
    responses(
        (status = 200, description = "Special tokens, BOS rule, context length, chat template", body = TokenizerInfoResponse),
        (status = 401, description = "Missing or wrong bearer key", body = super::error::OpenAiErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED: the default model is unloaded", body = super::error::OpenAiErrorBody),
        (status = 503, description = "MODEL_NOT_LOADED", body = super::error::OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn tokenizer_info(
    State(state): State<AppState>,
) -> Result<Json<TokenizerInfoResponse>, OpenAiError> {
    let info = ready(&state)?;
    let t = &info.tokenizer;
    let text = |id: Option<u32>| id.map(|i| t.token_text(i).to_string());
    Ok(Json(TokenizerInfoResponse {
        tokenizer_class: "tokenscope".into(),
        bos_token: text(t.info.bos_token_id),
        eos_token: text(t.info.eos_token_id),
        pad_token: None,
        bos_token_id: t.info.bos_token_id,
        eos_token_id: t.info.eos_token_id,
        add_bos_token: t.info.add_bos,
        model_max_length: info.context_length,
        vocab_size: info.vocab_size,
        chat_template: t
            .info
            .chat_template
            .as_ref()
            .map(|c| c.source().to_string()),
    }))
}
