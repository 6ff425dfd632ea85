//! POST /v1/chat/completions: messages rendered with the model's own chat template, then
//! generated like a completion whose special tokens are already written out (none is added).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::completions::ready;
use super::error::{OpenAiError, OpenAiJson};
use super::logprobs::chat_token;
use super::run::{self, Sampling};
use super::stream::ChatShape;
use super::types::*;
use crate::api::error::ErrorCode;
use crate::api::AppState;
use crate::engine::worker::{ModelInfo, PromptInput};
use crate::model::chat_template::ChatMessage;

/// Chat completions with per-token log-probabilities.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    operation_id = "create_chat_completion",
    tag = "openai",
    request_body = ChatRequest,
    responses(
        (status = 200, description = "The reply; with `stream`, server-sent events of `ChatChunk`s then `data: [DONE]`", content(
            (ChatResponse = "application/json"),
            (ServerSentEvent = "text/event-stream"),
        )),
        (status = 400, description = "EMPTY_PROMPT, PROMPT_TOO_LONG, NO_CHAT_TEMPLATE or CHAT_TEMPLATE_ERROR", body = super::error::OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer key", body = super::error::OpenAiErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND: `model` names no model of this server", body = super::error::OpenAiErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED: the model is unloaded (POST /models/{id}/load); TOO_MANY_MODELS (--autoload)", body = super::error::OpenAiErrorBody),
        (status = 507, description = "INSUFFICIENT_MEMORY (--autoload under --max-memory)", body = super::error::OpenAiErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = super::error::OpenAiErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE", body = super::error::OpenAiErrorBody),
        (status = 422, description = "A field out of range or of the wrong type (`param` names it)", body = super::error::OpenAiErrorBody),
        (status = 500, description = "GENERATION_FAILED", body = super::error::OpenAiErrorBody),
        (status = 503, description = "MODEL_NOT_LOADED or OVERLOADED", body = super::error::OpenAiErrorBody),
        (status = 504, description = "TIMEOUT", body = super::error::OpenAiErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    OpenAiJson(req): OpenAiJson<ChatRequest>,
) -> Result<Response, OpenAiError> {
    let state = state.select(req.model.as_deref()).await?;
    let deadline = run::deadline(&state);
    let info = ready(&state)?;
    let sampling = Sampling::check(
        req.temperature,
        req.top_p,
        req.n,
        req.seed,
        req.stop.clone(),
    )?;
    let k = req.top_logprobs.unwrap_or(0);
    if k > run::MAX_LOGPROBS {
        return Err(OpenAiError::invalid(
            "top_logprobs",
            ErrorCode::Validation,
            format!("top_logprobs must be between 0 and {}", run::MAX_LOGPROBS),
        ));
    }
    if req.top_logprobs.is_some() && !req.logprobs {
        return Err(OpenAiError::invalid(
            "top_logprobs",
            ErrorCode::Validation,
            "top_logprobs needs logprobs: true",
        ));
    }
    let text = render(&info, &req.messages).await?;
    // Both names are checked even though max_completion_tokens wins: a request is refused for
    // any out-of-range field (schemathesis sent max_tokens 0 beside a valid
    // max_completion_tokens).
    for (field, value) in [
        ("max_tokens", req.max_tokens),
        ("max_completion_tokens", req.max_completion_tokens),
    ] {
        if value == Some(0) {
            return Err(OpenAiError::invalid(
                field,
                ErrorCode::InvalidMaxTokens,
                format!("{field} must be at least 1"),
            ));
        }
        run::max_new_tokens(&state, value, 0)?;
    }
    // Without a bound from the request a chat model that never says its end token would run
    // until the request times out: a documented default bounds it (finish_reason `length`).
    let requested = req.max_completion_tokens.or(req.max_tokens);
    let max_tokens = run::max_new_tokens(
        &state,
        requested,
        crate::api::bounds::DEFAULT_CHAT_MAX_TOKENS,
    )?;
    let jobs: Vec<_> = (0..sampling.n)
        .map(|j| {
            let params = sampling.params(j, max_tokens, k as usize);
            (PromptInput::Rendered(text.clone()), params)
        })
        .collect();
    let shape = ChatShape {
        id: run::new_id("chatcmpl"),
        created: run::now_unix(),
        model: state.model_id(),
        n: sampling.n as usize,
        logprobs: req.logprobs.then_some(k as usize),
    };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let stream =
            super::stream::chat(state.clone(), info, jobs, shape, include_usage, deadline).await;
        if stream.is_ok() {
            state.count_generation();
        }
        return stream;
    }
    let replies = run::submit_all(&state, jobs, deadline).await?;
    let responses = run::await_all(&state, replies, deadline).await?;
    state.count_generation();
    let choices = responses
        .iter()
        .enumerate()
        .map(|(index, r)| ChatChoice {
            index,
            message: ChatMessageOut {
                role: "assistant".into(),
                content: r.generated_text.clone(),
            },
            logprobs: shape.logprobs.map(|k| ChatLogprobs {
                content: r
                    .steps
                    .iter()
                    .map(|s| chat_token(&info.tokenizer, s, k))
                    .collect(),
            }),
            finish_reason: run::finish_reason(r.finish_reason),
        })
        .collect();
    let body = ChatResponse {
        id: shape.id,
        object: "chat.completion".into(),
        created: shape.created,
        model: shape.model,
        choices,
        usage: run::usage(&responses, 1),
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// The prompt text for `messages` (text parts only), rendered off the async runtime.
pub async fn render(info: &ModelInfo, messages: &[ChatMessageIn]) -> Result<String, OpenAiError> {
    let messages = chat_messages(messages)?;
    let Some(template) = info.tokenizer.info.chat_template.clone() else {
        let why = info
            .tokenizer
            .info
            .chat_template_error
            .clone()
            .map_or("the model has no chat template".to_string(), |e| {
                format!("the model's chat template does not compile: {e}")
            });
        return Err(bad_request(ErrorCode::NoChatTemplate, why));
    };
    tokio::task::spawn_blocking(move || template.render(&messages, true))
        .await
        .map_err(|e| bad_request(ErrorCode::ChatTemplateError, e.to_string()))?
        .map_err(|e| {
            bad_request(ErrorCode::ChatTemplateError, e.to_string()).with_param("messages")
        })
}

fn bad_request(code: ErrorCode, message: String) -> OpenAiError {
    crate::api::ApiError::new(code, message).into()
}

/// Messages as the template sees them: content parts joined by newlines; only text parts.
pub fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, OpenAiError> {
    if messages.is_empty() {
        return Err(OpenAiError::invalid(
            "messages",
            ErrorCode::Validation,
            "messages must not be empty",
        ));
    }
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(s)) => s.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .map(|p| p.text.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        };
        out.push(ChatMessage {
            role: m.role.clone(),
            content,
        });
    }
    Ok(out)
}
