//! Evaluations: how well a model predicts a text (perplexity and bits per byte, from the same
//! scoring path as prompt log-probs), and how its greedy continuations of prompts compare with
//! expected ones (BLEU, ROUGE-L, diversity, length). An evaluation answers within its request:
//! the text is cut into windows that are queued one at a time like any other request (so
//! other clients are served in between), each bounded by `--request-timeout`, and the whole
//! is bounded in size ([`MAX_EVAL_TOKENS`], [`MAX_REFERENCES`]). Results are kept in the state
//! database (`GET /evaluations`).

pub mod bleu;
pub mod diversity;
pub mod records;
pub mod rouge;
mod run;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use run::{evaluate, EvalError};

use crate::train::jobs::DataSpec;

/// Most tokens one evaluation scores (over all its documents).
pub const MAX_EVAL_TOKENS: usize = 65_536;
/// Most prompt → reference pairs per evaluation.
pub const MAX_REFERENCES: usize = 256;
/// Most tokens generated per reference prompt.
pub const MAX_EVAL_NEW_TOKENS: u64 = 256;
/// Longest window scored at once: a longer text is scored in windows of this many tokens
/// (or the model's context, if shorter) that overlap by one token, so that every token after
/// the first is scored exactly once.
pub const MAX_WINDOW: usize = 2048;

/// A prompt and the continuation expected of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReferencePair {
    #[schema(min_length = 1, pattern = r"[^\s\x00-\x1f\x7f-\x9f\ufeff]")]
    pub prompt: String,
    pub reference: String,
}

/// Body of POST /models/{id}/evaluate: a text to score (`data`, as training jobs take it),
/// prompts with expected continuations (`references`), or both.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"eval_name": "fox", "data": {"text": "The quick brown fox jumps over the lazy dog."}, "references": [{"prompt": "The capital of France is", "reference": " Paris."}], "max_tokens": 8}))]
pub struct EvalRequest {
    /// A name to find it by (default `evaluation`).
    #[serde(default = "default_name")]
    #[schema(default = "evaluation", max_length = 200)]
    pub eval_name: String,
    /// The text whose perplexity is measured: `{"text"}`, `{"upload_id"}` (a JSONL upload is
    /// one document per line) or `{"path"}` under `--data-dir`. Each document is scored on
    /// its own, as a prompt (with BOS when the model adds one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSpec>,
    /// Prompts and the continuations expected of them: each prompt is continued greedily
    /// and the continuations are compared with the references.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(max_items = 256)]
    pub references: Vec<ReferencePair>,
    /// Most tokens generated per reference prompt.
    #[serde(default = "default_max_tokens")]
    #[schema(default = 64, minimum = 1, maximum = 256)]
    pub max_tokens: u64,
    /// Generation stops at the first newline (the newline is not part of the continuation).
    #[serde(default)]
    pub stop_on_newline: bool,
}

fn default_name() -> String {
    "evaluation".into()
}
fn default_max_tokens() -> u64 {
    64
}

/// What an evaluation measured. A metric whose input was not given is `null`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvalMetrics {
    /// exp(−mean log-prob) over every scored token of `data` (token-weighted over all
    /// documents): the same log-probs as POST /v1/completions with `echo` on each document.
    pub perplexity: Option<f64>,
    /// −Σ log₂ p over the scored tokens ÷ the UTF-8 bytes those tokens spell: comparable
    /// between models with different tokenizers.
    pub bits_per_byte: Option<f64>,
    /// Tokens scored: every token of each document after its first.
    pub tokens_scored: u64,
    /// UTF-8 bytes of the scored tokens.
    pub bytes_scored: u64,
    pub documents: u64,
    /// Corpus BLEU-4 of the continuations against the references, as sacreBLEU computes it
    /// (13a tokenizer, exponential smoothing), as a fraction in [0, 1] (sacreBLEU's score / 100).
    pub bleu_score: Option<f64>,
    /// Mean over the pairs of ROUGE-L F1, as Google's rouge-score computes it (no stemming).
    pub rouge_score: Option<f64>,
    /// Distinct-2: distinct word bigrams over all continuations ÷ all their word bigrams.
    pub response_diversity: Option<f64>,
    /// Mean words per continuation (split at whitespace).
    pub avg_response_length: Option<f64>,
    /// Mean tokens generated per continuation.
    pub avg_response_tokens: Option<f64>,
    pub references: u64,
}

/// One reference prompt, its continuation and its scores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvalSample {
    pub prompt: String,
    pub reference: String,
    /// The model's greedy continuation.
    pub response: String,
    pub response_tokens: u64,
    /// ROUGE-L F1 of this pair.
    pub rouge_l: f64,
}

/// An evaluation as the API reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EvalView {
    pub id: String,
    pub model_id: String,
    pub eval_name: String,
    pub status: String,
    pub created_at: String,
    /// Seconds the evaluation took.
    pub duration_s: f64,
    pub metrics: EvalMetrics,
    /// Every reference pair with the continuation (GET /evaluations/{id} and the response of
    /// POST /models/{id}/evaluate; not in the list).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples: Option<Vec<EvalSample>>,
}

/// Response of GET /evaluations.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EvalList {
    pub evaluations: Vec<EvalView>,
}
