//! The response body of POST /generate (also printed by `tokenscope inspect --json`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Which distribution is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogprobsMode {
    /// softmax(logits / T), the distribution the sampler draws from (T = 1 when greedy).
    #[default]
    Processed,
    /// The model's own distribution, softmax(logits), whatever the temperature.
    Raw,
}

impl LogprobsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Raw => "raw",
        }
    }
}

/// How tokens were picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Decoding {
    /// The most likely token each step: temperature 0, or below 1e-5 (whose distribution
    /// could only ever yield the argmax).
    Greedy,
    /// Drawn from softmax(logits / T).
    Sampling,
}

/// One candidate token with its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"token": " Paris", "token_id": 7042, "bytes": [32, 80, 97, 114, 105, 115],
    "probability": 0.7712, "percentage": 77.12, "logprob": -0.2598, "rank": 1}))]
pub struct TokenProbability {
    /// The token's text (lossy when the token is only part of a UTF-8 character).
    pub token: String,
    pub token_id: u32,
    /// The token's raw bytes.
    pub bytes: Vec<u8>,
    /// Probability, 0.0–1.0.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub probability: f64,
    /// 100 × probability.
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub percentage: f64,
    /// Natural-log probability (log-softmax of the f32 logits, computed in f64).
    pub logprob: f64,
    /// 1-based rank in the whole vocabulary (ties broken by token id).
    #[schema(minimum = 1)]
    pub rank: usize,
}

/// One generated position: the chosen token and the alternatives at that position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Step {
    pub token: String,
    pub token_id: u32,
    pub bytes: Vec<u8>,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub probability: f64,
    pub logprob: f64,
    /// Rank of the chosen token in the whole vocabulary.
    #[schema(minimum = 1)]
    pub rank: usize,
    /// Entropy (nats) of this position's reported distribution.
    pub entropy: f64,
    /// The top-k alternatives at this position.
    pub top: Vec<TokenProbability>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string appeared in the generated text.
    Stop,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Metadata {
    pub model_name: String,
    /// The model's architecture: `llama`, `qwen2`, ...
    pub architecture: String,
    /// Prompt length in characters.
    pub prompt_length: usize,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Wall time on the model thread, in milliseconds: the forward passes and the maths from
    /// the job's start (a batched prompt's: its batch's) to its last token. Tokenization and
    /// the wait in the queue come before and are not included.
    pub generation_time_ms: f64,
    /// The request's temperature, echoed.
    pub temperature_used: f64,
    /// `greedy` for temperatures below 1e-5 (0 included), else `sampling`.
    pub decoding: Decoding,
    pub logprobs_mode: LogprobsMode,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Weight format: `f32`, `f16`, `bf16`, or `gguf-<type>`.
    pub dtype: String,
    /// How activations met the quantized weights: `f32` (exact products, the default) or `q8`
    /// (llama.cpp's arithmetic, `serve --activations q8`).
    #[schema(example = "f32")]
    pub activations: String,
    /// The seed used for sampling (absent for greedy decoding).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// exp(−mean log-prob) over the prompt's tokens after the first (with `prompt_logprobs`,
    /// when the prompt has at least two tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_perplexity: Option<f64>,
}

/// One prompt token and how likely the model found it after the tokens before it (the
/// model's own distribution, T = 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"token": " capital", "token_id": 3575, "bytes": [32, 99, 97, 112, 105, 116, 97, 108],
    "logprob": -6.93, "rank": 38, "entropy": 5.1, "top": []}))]
pub struct PromptToken {
    pub token: String,
    pub token_id: u32,
    pub bytes: Vec<u8>,
    /// Natural-log probability of this token given the ones before it; null for the first
    /// token, which nothing predicts.
    pub logprob: Option<f64>,
    /// Its 1-based rank in the whole vocabulary at this position (null for the first token).
    #[schema(minimum = 1)]
    pub rank: Option<usize>,
    /// Entropy (nats) of the distribution this token was drawn against (null for the first).
    pub entropy: Option<f64>,
    /// The top-k tokens the model expected here (empty for the first token).
    pub top: Vec<TokenProbability>,
}

/// A continuation the user named, scored after the prompt (the model's own distribution,
/// T = 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"text": " Paris", "token_ids": [7042], "tokens": [" Paris"],
    "logprob": -0.2598, "probability": 0.7712, "rank": 1}))]
pub struct TargetScore {
    /// The target as sent.
    pub text: String,
    /// Its tokens, tokenized on its own without special tokens.
    pub token_ids: Vec<u32>,
    pub tokens: Vec<String>,
    /// Sum of the log-probabilities of its tokens, each teacher-forced after the prompt and
    /// the target's tokens before it.
    pub logprob: f64,
    /// exp(logprob): the probability that the model continues the prompt with exactly these
    /// tokens.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub probability: f64,
    /// Full-vocabulary rank of its first token at the next position.
    #[schema(minimum = 1)]
    pub rank: usize,
}

/// Response of POST /generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GenerateResponse {
    /// The generated text (a matched stop string is not included).
    pub generated_text: String,
    /// Top-k tokens at the first generated position, ranked 1..k.
    pub tokens: Vec<TokenProbability>,
    /// One entry per generated token.
    pub steps: Vec<Step>,
    pub finish_reason: FinishReason,
    pub metadata: Metadata,
    /// Every prompt token scored (with `prompt_logprobs: true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<PromptToken>>,
    /// The requested targets scored, in request order (with `targets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<TargetScore>>,
    /// The logit lens, for POST /lens (which reports it in its own body).
    #[serde(skip)]
    pub lens: Option<Vec<super::lens::LensLayer>>,
}
