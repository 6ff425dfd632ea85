//! POST /v1/completions: OpenAI's legacy completions, with exact `echo` log-probs (what
//! lm-evaluation-harness scores multiple-choice tasks with).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::{OpenAiError, OpenAiJson};
use super::logprobs::{LegacyBuilder, Naming};
use super::run::{self, Sampling};
use super::types::*;
use crate::api::error::ErrorCode;
use crate::api::types::is_blank;
use crate::api::{ApiError, AppState};
use crate::engine::worker::{ModelInfo, ModelState, PromptInput, WorkerError};
use crate::engine::GenerateResponse;

/// `max_tokens` when the request leaves it out (OpenAI's default).
pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// Completions with exact log-probabilities.
#[utoipa::path(
    post,
    path = "/v1/completions",
    operation_id = "create_completion",
    tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion; with `stream`, server-sent events of `CompletionResponse` chunks then `data: [DONE]`", content(
            (CompletionResponse = "application/json"),
            (ServerSentEvent = "text/event-stream"),
        )),
        (status = 400, description = "EMPTY_PROMPT or PROMPT_TOO_LONG", body = super::error::OpenAiErrorBody),
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
    OpenAiJson(req): OpenAiJson<CompletionRequest>,
) -> Result<Response, OpenAiError> {
    let state = state.select(req.model.as_deref()).await?;
    let deadline = run::deadline(&state);
    let info = ready(&state)?;
    let prompts = prompts(req.prompt.clone())?;
    let sampling = Sampling::check(
        req.temperature,
        req.top_p,
        req.n,
        req.seed,
        req.stop.clone(),
    )?;
    // 0 scores the prompt (with echo) and generates nothing.
    let max_tokens = run::max_new_tokens(&state, req.max_tokens, DEFAULT_MAX_TOKENS as usize)?;
    let k = req.logprobs.unwrap_or(0);
    if k > run::MAX_LOGPROBS {
        return Err(OpenAiError::invalid(
            "logprobs",
            ErrorCode::Validation,
            format!("logprobs must be between 0 and {}", run::MAX_LOGPROBS),
        ));
    }
    let echo_texts: Vec<String> = prompts
        .iter()
        .map(|p| match p {
            PromptInput::Text(s) | PromptInput::Rendered(s) => s.clone(),
            PromptInput::Ids(ids) => info.tokenizer.decode(ids, true).unwrap_or_default(),
        })
        .collect();
    let mut jobs = Vec::new();
    for prompt in &prompts {
        for j in 0..sampling.n {
            let mut params = sampling.params(j, max_tokens, k as usize);
            // Echoed log-probs score every prompt token (in the same pass as the prompt).
            params.prompt_logprobs = req.echo && req.logprobs.is_some();
            jobs.push((prompt.clone(), params));
        }
    }
    let shape = Shape {
        id: run::new_id("cmpl"),
        created: run::now_unix(),
        model: state.model_id(),
        n: sampling.n as usize,
        echo: req.echo,
        logprobs: req.logprobs.map(|k| k as usize),
        as_ids: req.return_tokens_as_token_ids,
        echo_texts,
    };
    if req.stream {
        let include_usage = req.stream_options.is_some_and(|o| o.include_usage);
        let stream =
            super::stream::completions(state.clone(), info, jobs, shape, include_usage, deadline)
                .await;
        if stream.is_ok() {
            state.count_generation();
        }
        return stream;
    }
    let replies = run::submit_all(&state, jobs, deadline).await?;
    let responses = run::await_all(&state, replies, deadline).await?;
    state.count_generation();
    let body = CompletionResponse {
        choices: responses
            .iter()
            .enumerate()
            .map(|(i, r)| shape.choice(&info, i, r))
            .collect(),
        usage: Some(run::usage(&responses, shape.n)),
        ..shape.response()
    };
    Ok((StatusCode::OK, Json(body)).into_response())
}

/// The loaded model's info, or 503.
pub fn ready(state: &AppState) -> Result<std::sync::Arc<ModelInfo>, OpenAiError> {
    match state.worker().state() {
        ModelState::Ready(info) => Ok(info),
        ModelState::Unloaded => Err(run::worker_error(state, WorkerError::Unloaded)),
        _ => Err(run::worker_error(state, WorkerError::NotLoaded)),
    }
}

/// The request's prompts, each checked to be non-empty.
fn prompts(field: PromptField) -> Result<Vec<PromptInput>, OpenAiError> {
    let prompts: Vec<PromptInput> = match field {
        PromptField::Text(s) => vec![PromptInput::Text(s)],
        PromptField::Texts(v) => v.into_iter().map(PromptInput::Text).collect(),
        PromptField::Ids(ids) => vec![PromptInput::Ids(ids)],
        PromptField::IdLists(v) => v.into_iter().map(PromptInput::Ids).collect(),
    };
    if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
        return Err(OpenAiError::invalid(
            "prompt",
            ErrorCode::Validation,
            format!("prompt must hold between 1 and {MAX_PROMPTS} prompts"),
        ));
    }
    let empty = prompts.iter().any(|p| match p {
        PromptInput::Text(s) | PromptInput::Rendered(s) => is_blank(s),
        PromptInput::Ids(ids) => ids.is_empty(),
    });
    if empty {
        return Err(OpenAiError::from(ApiError::empty_prompt()).with_param("prompt"));
    }
    Ok(prompts)
}

/// What every choice and chunk of one response shares.
pub struct Shape {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub n: usize,
    pub echo: bool,
    pub logprobs: Option<usize>,
    pub as_ids: bool,
    /// The text each prompt echoes (token-id prompts decoded, special tokens left out).
    pub echo_texts: Vec<String>,
}

impl Shape {
    pub fn response(&self) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices: Vec::new(),
            usage: None,
        }
    }

    pub fn naming<'a>(&self, info: &'a ModelInfo) -> Naming<'a> {
        Naming {
            tokenizer: &info.tokenizer,
            as_ids: self.as_ids,
        }
    }

    /// Choice `index` (prompt index / n, choice index % n) from its job's response.
    pub fn choice(&self, info: &ModelInfo, index: usize, r: &GenerateResponse) -> CompletionChoice {
        let echo = match self.echo {
            true => self.echo_texts[index / self.n.max(1)].as_str(),
            false => "",
        };
        let logprobs = self.logprobs.map(|k| {
            let mut b = LegacyBuilder::new(self.naming(info));
            if let Some(prompt) = r.prompt.as_deref().filter(|_| self.echo) {
                b.prompt(prompt, k);
            }
            for step in &r.steps {
                b.step(step, k);
            }
            b.out
        });
        CompletionChoice {
            index,
            text: format!("{echo}{}", r.generated_text),
            finish_reason: Some(run::finish_reason(r.finish_reason)),
            logprobs,
        }
    }
}
