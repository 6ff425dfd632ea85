//! What the completion and chat routes share: request checks, one worker job per choice, the
//! replies awaited under the request timeout, ids and timestamps.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::error::OpenAiError;
use super::types::{StopField, Usage};
use crate::api::error::ErrorCode;
use crate::api::types::{MAX_STOP_CHARS, MAX_STOP_STRINGS};
use crate::api::AppState;
use crate::engine::worker::{
    EventSender, PromptInput, Reply, WhenFull, WorkerError, REQUEST_WINDOW,
};
use crate::engine::{GenerateParams, GenerateResponse, LogprobsMode};

// MAX_N: choices decode one after another (no batched decoding yet), so the bound keeps the
// largest request (64 prompts × 4 choices, each scored with `echo`) to tens of seconds on
// 2 cores; with 16 it took 145 s in a debug build.
pub use crate::api::bounds::{MAX_LOGPROBS, MAX_N, TEMPERATURE_MAX};

/// Unix seconds when the server started (`created` of `/v1/models`).
pub fn created_at(state: &AppState) -> u64 {
    now_unix().saturating_sub(state.started.elapsed().as_secs())
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `prefix-` and 24 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

/// The sampling settings both routes share, checked.
pub struct Sampling {
    pub temperature: f64,
    pub top_p: f64,
    pub n: u32,
    pub seed: Option<i64>,
    pub stop: Vec<String>,
}

impl Sampling {
    pub fn check(
        temperature: Option<f64>,
        top_p: Option<f64>,
        n: Option<u32>,
        seed: Option<i64>,
        stop: Option<StopField>,
    ) -> Result<Self, OpenAiError> {
        let temperature = temperature.unwrap_or(1.0);
        if !(0.0..=TEMPERATURE_MAX).contains(&temperature) {
            return Err(OpenAiError::invalid(
                "temperature",
                ErrorCode::InvalidTemperature,
                format!("temperature must be between 0 and {TEMPERATURE_MAX}"),
            ));
        }
        let top_p = top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(OpenAiError::invalid(
                "top_p",
                ErrorCode::Validation,
                "top_p must be greater than 0 and at most 1",
            ));
        }
        let n = n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(OpenAiError::invalid(
                "n",
                ErrorCode::Validation,
                format!("n must be between 1 and {MAX_N}"),
            ));
        }
        let stop = stop.map(StopField::into_vec).unwrap_or_default();
        if stop.len() > MAX_STOP_STRINGS
            || stop
                .iter()
                .any(|s| s.is_empty() || s.chars().count() > MAX_STOP_CHARS)
        {
            return Err(OpenAiError::invalid(
                "stop",
                ErrorCode::Validation,
                format!(
                    "stop must be at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"
                ),
            ));
        }
        Ok(Self {
            temperature,
            top_p,
            n,
            seed,
            stop,
        })
    }

    /// Engine parameters for choice `j` of a prompt: the model's own distribution is reported
    /// (T = 1, as OpenAI and vLLM report log-probs), `top_k` alternatives per position.
    pub fn params(&self, j: u32, max_tokens: usize, top_k: usize) -> GenerateParams {
        GenerateParams {
            temperature: self.temperature,
            max_tokens,
            top_k,
            // A seed makes every choice reproducible; choices differ by their index.
            seed: self.seed.map(|s| (s as u64).wrapping_add(j as u64)),
            stop: self.stop.clone(),
            logprobs_mode: LogprobsMode::Raw,
            top_p: self.top_p,
            fit_context: true,
            ..GenerateParams::default()
        }
    }
}

/// Queues a request's jobs one by one: the first is refused at once when the queue is full
/// (`OVERLOADED`); each later one waits for room, and — past the request's window of
/// [`REQUEST_WINDOW`] jobs — for one of its earlier jobs to finish, so that a request with
/// many choices is served in turn with other requests.
pub struct Submitter {
    state: AppState,
    worker: crate::engine::worker::WorkerHandle,
    window: std::sync::Arc<tokio::sync::Semaphore>,
    deadline: Instant,
}

impl Submitter {
    pub fn new(state: &AppState, deadline: Instant) -> Self {
        Self {
            state: state.clone(),
            worker: state.worker(),
            window: std::sync::Arc::new(tokio::sync::Semaphore::new(REQUEST_WINDOW)),
            deadline,
        }
    }

    /// Queues job `i` of the request; with `stream`, it reports its events under index i.
    pub async fn submit(
        &self,
        i: usize,
        prompt: PromptInput,
        params: GenerateParams,
        stream: Option<&EventSender>,
    ) -> Result<Reply, OpenAiError> {
        let when_full = if i == 0 {
            WhenFull::Refuse
        } else {
            WhenFull::Wait
        };
        let state = &self.state;
        let permit =
            tokio::time::timeout_at(self.deadline.into(), self.window.clone().acquire_owned())
                .await
                .map_err(|_| timeout(state))?
                .map_err(|_| worker_error(state, WorkerError::Stopped))?;
        let submit = self.worker.submit_input(
            prompt,
            params,
            stream.map(|tx| (i, tx.clone())),
            when_full,
            Some(permit),
        );
        tokio::time::timeout_at(self.deadline.into(), submit)
            .await
            .map_err(|_| timeout(state))?
            .map_err(|e| worker_error(state, e))
    }
}

/// Queues one job per (prompt, params) through a [`Submitter`].
pub async fn submit_all(
    state: &AppState,
    jobs: Vec<(PromptInput, GenerateParams)>,
    deadline: Instant,
) -> Result<Vec<Reply>, OpenAiError> {
    let submitter = Submitter::new(state, deadline);
    let mut replies = Vec::with_capacity(jobs.len());
    for (i, (prompt, params)) in jobs.into_iter().enumerate() {
        replies.push(submitter.submit(i, prompt, params, None).await?);
    }
    Ok(replies)
}

/// Awaits every reply, in order, until `deadline`.
pub async fn await_all(
    state: &AppState,
    replies: Vec<Reply>,
    deadline: Instant,
) -> Result<Vec<GenerateResponse>, OpenAiError> {
    let mut out = Vec::with_capacity(replies.len());
    for rx in replies {
        let resp = tokio::time::timeout_at(deadline.into(), rx)
            .await
            .map_err(|_| timeout(state))?
            .map_err(|_| worker_error(state, WorkerError::Stopped))?
            .map_err(|e| worker_error(state, e))?;
        if let Some(m) = crate::api::metrics::metrics() {
            m.prompt_tokens.inc_by(resp.metadata.prompt_tokens as u64);
            m.generated_tokens
                .inc_by(resp.metadata.completion_tokens as u64);
        }
        out.push(resp);
    }
    Ok(out)
}

/// Tokens to generate per choice: what the request names (`requested`), else `default`, at
/// most the server's `--max-new-tokens`; the worker then shortens it to what the context leaves
/// after the prompt (llama.cpp's rule: `finish_reason` says `length`).
pub fn max_new_tokens(
    state: &AppState,
    requested: Option<u32>,
    default: usize,
) -> Result<usize, OpenAiError> {
    // The schema says int32 (what OpenAI's clients send); larger is out of contract.
    if requested.is_some_and(|n| n > i32::MAX as u32) {
        return Err(OpenAiError::invalid(
            "max_tokens",
            ErrorCode::InvalidMaxTokens,
            format!("max_tokens must be at most {}", i32::MAX),
        ));
    }
    let n = requested.map_or(default, |n| n as usize);
    Ok(state.config.max_new_tokens.map_or(n, |cap| n.min(cap)))
}

pub fn deadline(state: &AppState) -> Instant {
    Instant::now()
        + state
            .config
            .request_timeout
            .min(Duration::from_secs(86_400))
}

pub fn timeout(state: &AppState) -> OpenAiError {
    crate::api::ApiError::timeout(state.config.request_timeout.as_secs_f64()).into()
}

pub fn worker_error(state: &AppState, e: WorkerError) -> OpenAiError {
    let param = match &e {
        WorkerError::InvalidTokenId { .. }
        | WorkerError::EmptyPrompt
        | WorkerError::Untokenizable(_) => Some("prompt"),
        WorkerError::PromptTooLong { .. } => Some("max_tokens"),
        _ => None,
    };
    let err = OpenAiError::from(crate::api::routes::worker_error(state, e));
    match param {
        Some(p) => err.with_param(p),
        None => err,
    }
}

/// Usage of a request: each prompt counted once (the first of its `n` choices).
pub fn usage(responses: &[GenerateResponse], n: usize) -> Usage {
    let prompt_tokens = responses
        .iter()
        .step_by(n.max(1))
        .map(|r| r.metadata.prompt_tokens)
        .sum();
    let completion_tokens = responses.iter().map(|r| r.metadata.completion_tokens).sum();
    Usage {
        prompt_tokens,
        completion_tokens,
        total_tokens: prompt_tokens + completion_tokens,
    }
}

/// OpenAI's finish reasons: an end-of-sequence token and a stop string are both `stop`.
pub fn finish_reason(r: crate::engine::FinishReason) -> String {
    match r {
        crate::engine::FinishReason::Length => "length",
        _ => "stop",
    }
    .into()
}
