//! POST /compare: two models on the same text, position by position (see
//! [`crate::engine::compare`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody, ErrorCode, FieldError};
use super::AppState;
use crate::engine::compare::{compare_streams, ComparePosition, CompareSummary, Comparer};
use crate::engine::worker::{ModelInfo, WorkerError};

/// Score a whole text: every token after the first.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompareText {
    /// Two model ids from GET /models: A (the reference) and B.
    #[schema(min_items = 2, max_items = 2, example = json!(["SmolLM2-135M-Instruct.Q4_1", "SmolLM2-135M-Instruct.Q4_1"]))]
    pub models: Vec<ModelId>,
    /// The text (tokenized as a prompt: with BOS when the models add one).
    #[schema(
        min_length = 1,
        pattern = r"[^\s\x00-\x1f\x7f-\x9f\ufeff]",
        example = "The quick brown fox jumps over the lazy dog."
    )]
    pub text: String,
    /// Alternatives listed per position and model.
    #[serde(default = "default_top_k")]
    #[schema(default = 5, minimum = 1, maximum = 50)]
    pub top_k: i64,
}

/// Score only a continuation after a prompt (tokenized apart, the continuation without
/// special tokens, as targets are).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompareContinuation {
    #[schema(min_items = 2, max_items = 2)]
    pub models: Vec<ModelId>,
    #[schema(min_length = 1, pattern = r"[^\s\x00-\x1f\x7f-\x9f\ufeff]")]
    pub prompt: String,
    #[schema(min_length = 1, pattern = r"[^\s\x00-\x1f\x7f-\x9f\ufeff]")]
    pub continuation: String,
    #[serde(default = "default_top_k")]
    #[schema(default = 5, minimum = 1, maximum = 50)]
    pub top_k: i64,
}

/// A model id.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(value_type = String, pattern = ".")]
pub struct ModelId(pub String);

fn default_top_k() -> i64 {
    5
}

/// Body of POST /compare: `models` and `text`, or `models`, `prompt` and `continuation`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum CompareRequest {
    Text(CompareText),
    Continuation(CompareContinuation),
}

/// Response of POST /compare.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CompareResponse {
    /// The two model ids, A then B.
    pub models: Vec<String>,
    /// The tokenizer both share (its digest, as GET /models shows it).
    pub tokenizer: String,
    /// Tokens of the text (prompt and continuation together).
    pub tokens: usize,
    /// One entry per scored position, in order.
    pub positions: Vec<ComparePosition>,
    pub summary: CompareSummary,
}

fn parse(bytes: &[u8]) -> Result<(Vec<String>, String, Option<String>, usize), ApiError> {
    let invalid = |loc: Vec<serde_json::Value>, msg: String| {
        ApiError::validation(
            vec![FieldError {
                loc,
                msg,
                kind: "value_error".into(),
            }],
            None,
        )
    };
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(vec!["body".into()], format!("JSON decode error: {e}")))?;
    let value = super::openai::error::integral_floats_as_integers(value);
    let req: CompareRequest = serde_json::from_value(value).map_err(|_| {
        invalid(
            vec!["body".into()],
            "expected {\"models\": [A, B], \"text\": ...} or {\"models\": [A, B], \"prompt\": ..., \
             \"continuation\": ...}, with an optional integer top_k"
                .into(),
        )
    })?;
    let (models, text, continuation, top_k) = match req {
        CompareRequest::Text(t) => (t.models, t.text, None, t.top_k),
        CompareRequest::Continuation(c) => (c.models, c.prompt, Some(c.continuation), c.top_k),
    };
    if models.len() != 2 {
        return Err(invalid(
            vec!["body".into(), "models".into()],
            "models must name exactly two models".into(),
        ));
    }
    if models.iter().any(|m| m.0.is_empty()) {
        return Err(invalid(
            vec!["body".into(), "models".into()],
            "a model id is empty".into(),
        ));
    }
    if !(1..=super::bounds::TOP_K_MAX).contains(&top_k) {
        return Err(ApiError::validation(
            vec![FieldError {
                loc: vec!["body".into(), "top_k".into()],
                msg: format!(
                    "ensure this value is between 1 and {}",
                    super::bounds::TOP_K_MAX
                ),
                kind: "value_error.number".into(),
            }],
            Some(ErrorCode::InvalidTopK),
        ));
    }
    // The schema's pattern, checked as /generate checks its prompt: nothing but whitespace
    // and control characters may have no token at all.
    if super::types::is_blank(&text) || continuation.as_deref().is_some_and(super::types::is_blank)
    {
        return Err(ApiError::empty_prompt());
    }
    Ok((
        models.into_iter().map(|m| m.0).collect(),
        text,
        continuation,
        top_k as usize,
    ))
}

/// Sets its flag when dropped: the handler's future is dropped when the client leaves or the
/// request times out, and the comparison (on the blocking pool) then stops.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Two models on the same text: per-token KL both ways, top-1 agreement and log-prob deltas.
///
/// For every scored position: the actual token with its log-prob under A and under B and
/// the difference, KL(A‖B) and KL(B‖A) over the whole vocabulary, both top-1s and whether
/// they agree, both top-k lists; and a summary as `llama-perplexity --kl-divergence` prints
/// it (mean, median, p99 and max KL, top-1 agreement, each perplexity, RMS Δp). The models
/// must share their tokenizer (`tokenizer` in GET /models); both are run on their own
/// threads at once, their logits streamed and compared in f64 as they come.
#[utoipa::path(
    post,
    path = "/compare",
    operation_id = "compare_models",
    tag = "generation",
    request_body = CompareRequest,
    responses(
        (status = 200, description = "Every scored position, and the summary", body = CompareResponse),
        (status = 400, description = "EMPTY_PROMPT or PROMPT_TOO_LONG (longer than either model's context)", body = ErrorBody),
        (status = 401, description = "UNAUTHORIZED: missing or wrong bearer key", body = ErrorBody),
        (status = 404, description = "MODEL_NOT_FOUND: a model id names no model of this server", body = ErrorBody),
        (status = 409, description = "MODEL_NOT_LOADED: a model is unloaded (POST /models/{id}/load); TOO_MANY_MODELS (--autoload)", body = ErrorBody),
        (status = 413, description = "PAYLOAD_TOO_LARGE", body = ErrorBody),
        (status = 415, description = "UNSUPPORTED_MEDIA_TYPE: body is not application/json", body = ErrorBody),
        (status = 422, description = "TOKENIZER_MISMATCH: the models tokenize differently (the detail says where); INVALID_TOP_K or VALIDATION_ERROR", body = ErrorBody),
        (status = 500, description = "GENERATION_FAILED", body = ErrorBody),
        (status = 503, description = "MODEL_NOT_LOADED or OVERLOADED (Retry-After set)", body = ErrorBody),
        (status = 504, description = "TIMEOUT", body = ErrorBody),
        (status = 507, description = "INSUFFICIENT_MEMORY (--autoload under --max-memory)", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn compare(
    State(state): State<AppState>,
    req: Request<Body>,
) -> Result<Json<CompareResponse>, ApiError> {
    let bytes = super::extract::json_body_bytes(req, state.config.max_body_bytes).await?;
    let (models, text, continuation, top_k) = parse(&bytes)?;
    let a = state.select(Some(&models[0])).await?;
    let b = state.select(Some(&models[1])).await?;
    let _in_flight = super::metrics::InFlight::start();
    let ready = |s: &AppState| {
        s.worker()
            .ready()
            .map_err(|e| super::routes::worker_error(s, e))
    };
    let (info_a, info_b) = (ready(&a)?, ready(&b)?);
    if let Some(diff) = info_a.tokenizer.difference(&info_b.tokenizer) {
        return Err(ApiError::new(
            ErrorCode::TokenizerMismatch,
            format!(
                "`{}` and `{}` do not share a tokenizer ({diff}); compare needs the same token ids under both",
                a.model_id(),
                b.model_id()
            ),
        ));
    }
    if info_a.vocab_size != info_b.vocab_size {
        return Err(ApiError::new(
            ErrorCode::TokenizerMismatch,
            format!(
                "`{}` has {} output rows and `{}` {}: their distributions cannot be compared",
                a.model_id(),
                info_a.vocab_size,
                b.model_id(),
                info_b.vocab_size
            ),
        ));
    }
    // Tokenized under both: the digests agreeing makes a difference unlikely, this makes it
    // impossible for this text.
    let (ta, tb) = (info_a.tokenizer.clone(), info_b.tokenizer.clone());
    let (ids, first_row, same_ids) = tokio::task::spawn_blocking(move || {
        let tokenize = |t: &crate::model::TextTokenizer| {
            crate::engine::compare::tokenize(t, &text, continuation.as_deref())
                .map_err(|e| WorkerError::Failed(e.to_string()))
        };
        let (ids, first_row) = tokenize(&ta)?;
        let same = tokenize(&tb)?.0 == ids;
        Ok::<_, WorkerError>((ids, first_row, same))
    })
    .await
    .map_err(|_| ApiError::generation_failed())?
    .map_err(|e| super::routes::worker_error(&a, e))?;
    if !same_ids {
        return Err(ApiError::new(
            ErrorCode::TokenizerMismatch,
            format!(
                "`{}` and `{}` tokenize this text differently; compare needs the same token ids under both",
                a.model_id(),
                b.model_id()
            ),
        ));
    }
    let limit = info_a.context_length.min(info_b.context_length);
    if ids.len() > limit {
        return Err(ApiError::new(
            ErrorCode::PromptTooLong,
            format!(
                "The text has {} tokens; the models' context holds {limit}",
                ids.len()
            ),
        ));
    }
    let timeout = state.config.request_timeout;
    let work = run(&a, &b, &info_a, ids, first_row, top_k);
    let (tokens, positions, summary) = tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ApiError::timeout(timeout.as_secs_f64()))??;
    if let Some(m) = super::metrics::metrics() {
        m.compare_requests.inc();
        m.prompt_tokens.inc_by(2 * tokens as u64);
    }
    Ok(Json(CompareResponse {
        models: vec![a.model_id(), b.model_id()],
        tokenizer: info_a.tokenizer.digest().to_string(),
        tokens,
        positions,
        summary,
    }))
}

/// Streams both models' logits and compares them as they come.
async fn run(
    a: &AppState,
    b: &AppState,
    info: &Arc<ModelInfo>,
    ids: Vec<u32>,
    first_row: usize,
    top_k: usize,
) -> Result<(usize, Vec<ComparePosition>, CompareSummary), ApiError> {
    let tokens = ids.len();
    let rows = tokens.saturating_sub(1).saturating_sub(first_row);
    if rows == 0 {
        let (positions, summary) = Comparer::new(&info.tokenizer, &ids, first_row, top_k).finish();
        return Ok((tokens, positions, summary));
    }
    let same = a.worker().same_worker(&b.worker());
    let stream_a = a
        .worker()
        .submit_logits(ids.clone(), first_row)
        .map_err(|e| super::routes::worker_error(a, e))?;
    // The same model thread twice: one stream serves both sides (its KL is then exactly 0).
    let stream_b = if same {
        None
    } else {
        Some(
            b.worker()
                .submit_logits(ids.clone(), first_row)
                .map_err(|e| super::routes::worker_error(b, e))?,
        )
    };
    let cancel = Arc::new(AtomicBool::new(false));
    let _guard = CancelOnDrop(cancel.clone());
    let tokenizer = info.tokenizer.clone();
    let vocab = info.vocab_size;
    let compared = tokio::task::spawn_blocking(move || {
        compare_streams(
            &tokenizer, &ids, first_row, top_k, vocab, stream_a, stream_b, &cancel,
        )
    })
    .await
    .map_err(|_| ApiError::generation_failed())?;
    match compared {
        Ok((positions, summary)) => Ok((tokens, positions, summary)),
        Err(e) => {
            tracing::error!("compare failed: {e}");
            Err(ApiError::generation_failed())
        }
    }
}
