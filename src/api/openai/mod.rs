//! The OpenAI-compatible surface (`/v1/completions`, `/v1/chat/completions`, `/v1/models`) and
//! vLLM's tokenizer endpoints (`/tokenize`, `/detokenize`, `/tokenizer_info`), on the same
//! worker, batching and prefix cache as `/generate`. Errors here use OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}` with the status codes of the native API;
//! unknown request fields are ignored (OpenAI clients send extras).

pub mod chat;
pub mod completions;
pub mod error;
pub mod logprobs;
pub mod run;
pub mod stream;
pub mod tokenize;
pub mod types;

use axum::extract::State;
use axum::Json;

pub use error::{OpenAiError, OpenAiJson};
use types::{ModelCard, ModelList};

use super::AppState;
use crate::engine::worker::ModelState;

/// Paths whose errors use OpenAI's shape.
pub fn is_openai_path(path: &str) -> bool {
    path.starts_with("/v1/")
        || path == "/v1"
        || matches!(path, "/tokenize" | "/detokenize" | "/tokenizer_info")
}

/// The models this server offers (the same ids as GET /models; requests name one in `model`).
#[utoipa::path(
    get,
    path = "/v1/models",
    operation_id = "list_openai_models",
    tag = "openai",
    responses(
        (status = 200, description = "The models this server offers, the default first", body = ModelList),
        (status = 401, description = "Missing or wrong bearer key", body = error::OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    let models = state.models.clone();
    let views = tokio::task::spawn_blocking(move || models.list())
        .await
        .unwrap_or_default();
    let data = views
        .into_iter()
        .map(|v| ModelCard {
            max_model_len: match state.models.model_state(&v.id) {
                ModelState::Ready(info) => Some(info.context_length),
                _ => None,
            },
            id: v.id,
            object: "model".into(),
            created: run::created_at(&state),
            owned_by: "tokenscope".into(),
            status: v.status,
        })
        .collect();
    Json(ModelList {
        object: "list".into(),
        data,
    })
}
