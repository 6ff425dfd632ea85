//! Request and response bodies (besides the generate response, which lives in the engine so
//! that `inspect --json` prints exactly the same thing).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use crate::engine::scoring::Target;
use crate::engine::{GenerateParams, LogprobsMode};

pub use super::bounds::{MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TARGETS};
use super::bounds::{
    MAX_STOP_STRINGS_LEN, MAX_TARGETS_LEN, MAX_TOKENS_MAX, TEMPERATURE_MAX, TOP_K_MAX,
};

/// True when `s` has no character that carries text (EMPTY_PROMPT): every character is
/// whitespace or a control character (C0/C1: byte-level vocabularies may have no token for
/// them — llama.cpp drops them too — so such a prompt can tokenize to nothing), or U+FEFF.
/// The schema's pattern `PROMPT_PATTERN` says the same in every regex engine that reads it:
/// the engines' whitespace sets differ only in characters this also excludes (Python's
/// U+001C–001F and U+0085 are controls; ECMAScript's U+FEFF is listed).
pub fn is_blank(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_whitespace() || c.is_control() || c == '\u{feff}')
}
/// The schema's pattern for a prompt: at least one character that is neither whitespace nor a
/// control character (see [`is_blank`]).
pub const PROMPT_PATTERN: &str = r"[^\s\x00-\x1f\x7f-\x9f\ufeff]";
/// The schema's pattern for a target: at least one character that is not a control character
/// (byte-level vocabularies may have no token for those: see [`is_blank`]).
pub const TARGET_PATTERN: &str = r"[^\x00-\x1f\x7f-\x9f]";

/// Body of POST /generate.
#[derive(Debug, Clone, Deserialize, ToSchema, Validate)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "The capital of France is", "temperature": 1.0, "max_tokens": 1, "top_k": 5}))]
pub struct GenerateRequest {
    /// Input text prompt: at least one character that is neither whitespace nor a control
    /// character.
    #[schema(
        min_length = 1,
        pattern = r"[^\s\x00-\x1f\x7f-\x9f\ufeff]",
        example = "The capital of France is"
    )]
    pub prompt: String,
    /// Sampling temperature; 0 = greedy decoding.
    #[serde(default = "default_temperature")]
    #[validate(range(min = 0.0, max = TEMPERATURE_MAX))]
    #[schema(default = 1.0, minimum = 0.0, example = 1.0)]
    pub temperature: f64,
    /// Tokens to generate.
    #[serde(default = "default_max_tokens")]
    #[validate(range(min = 1, max = MAX_TOKENS_MAX))]
    #[schema(default = 1, minimum = 1, example = 1)]
    pub max_tokens: i64,
    /// Alternatives returned per position.
    #[serde(default = "default_top_k")]
    #[validate(range(min = 1, max = TOP_K_MAX))]
    #[schema(default = 5, minimum = 1, example = 5)]
    pub top_k: i64,
    /// Seed that makes sampling reproducible (ignored when greedy): 0 to 2^64 − 1.
    #[serde(default)]
    #[schema(schema_with = seed_schema)]
    pub seed: Option<u64>,
    /// Generation stops after any of these strings appears (not included in generated_text).
    #[serde(default)]
    #[validate(length(max = MAX_STOP_STRINGS_LEN))]
    #[schema(schema_with = stop_schema)]
    pub stop: Vec<String>,
    /// End generation at the first newline (the nanochat server's field): the newline, and
    /// anything after it in the same token, is left out of `generated_text`, and
    /// `finish_reason` is `stop`. The same as `"\n"` in `stop`.
    #[serde(default)]
    #[schema(default = false)]
    pub stop_on_newline: bool,
    /// `processed` reports softmax(logits / T); `raw` reports softmax(logits).
    #[serde(default)]
    #[schema(default = "processed")]
    pub logprobs_mode: LogprobsMode,
    /// Also score every prompt token (the response's `prompt`: log-probability, rank, entropy
    /// and top-k at each position, the model's own distribution at T = 1), and report
    /// `metadata.prompt_perplexity`.
    #[serde(default)]
    #[schema(default = false)]
    pub prompt_logprobs: bool,
    /// Continuations to score after the prompt (the response's `targets`), each tokenized on
    /// its own without special tokens: total log-probability teacher-forced (T = 1), and the
    /// full-vocabulary rank of its first token.
    #[serde(default)]
    #[validate(length(max = MAX_TARGETS_LEN))]
    #[schema(schema_with = targets_schema)]
    pub targets: Vec<String>,
    /// The model to ask (an id from GET /models; default: the server's default model).
    #[serde(default)]
    #[schema(example = json!(null))]
    pub model: Option<String>,
}

/// Up to 16 strings of 1 to 256 characters, not all control characters.
pub(crate) fn targets_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_STOP_CHARS))
                .pattern(Some(TARGET_PATTERN)),
        )
        .max_items(Some(MAX_TARGETS))
        .default(Some(serde_json::json!([])))
        .examples([serde_json::json!([" Paris", " Lyon"])])
        .description(Some(
            "Continuations to score after the prompt, each tokenized on its own without special tokens: total log-probability (teacher-forced, T = 1) and the full-vocabulary rank of its first token.",
        ))
        .build()
}

/// An unsigned 64-bit integer or null. Written by hand: utoipa would say `format: int64`, whose
/// range stops at 2^63 − 1, and write the maximum as a float (2^64 after rounding).
fn seed_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
        .description(Some(
            "Seed that makes sampling reproducible (ignored when greedy): 0 to 2^64 − 1.",
        ))
        .minimum(Some(utoipa::Number::UInt(0)))
        .maximum(Some(utoipa::Number::UInt(u64::MAX as usize)))
        .build()
}

/// Up to 4 non-empty strings of at most 256 characters (the item bounds are not expressible
/// with utoipa's field attributes).
fn stop_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Type};
    ArrayBuilder::new()
        .items(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_STOP_CHARS)),
        )
        .max_items(Some(MAX_STOP_STRINGS))
        .default(Some(serde_json::json!([])))
        .description(Some(
            "Generation stops after any of these strings appears (not included in generated_text).",
        ))
        .build()
}

fn default_temperature() -> f64 {
    1.0
}
fn default_max_tokens() -> i64 {
    1
}
fn default_top_k() -> i64 {
    5
}

impl GenerateRequest {
    /// Parameters for the engine (call after validation).
    pub fn params(&self) -> GenerateParams {
        let mut stop = self.stop.clone();
        if self.stop_on_newline && !stop.iter().any(|s| s == "\n") {
            stop.push("\n".into());
        }
        GenerateParams {
            temperature: self.temperature,
            max_tokens: self.max_tokens.clamp(1, 100) as usize,
            top_k: self.top_k.clamp(1, 50) as usize,
            seed: self.seed,
            stop,
            logprobs_mode: self.logprobs_mode,
            prompt_logprobs: self.prompt_logprobs,
            targets: Target::named(&self.targets),
            ..GenerateParams::default()
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"status": "healthy", "timestamp": "2026-01-01T12:00:00Z"}))]
pub struct HealthResponse {
    /// healthy | loading | unhealthy
    pub status: String,
    /// RFC 3339, UTC.
    pub timestamp: String,
    /// Why the model is not serving (absent when healthy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceStatus {
    /// running | loading | degraded
    pub status: String,
    pub version: String,
    pub uptime_seconds: u64,
    /// Resident memory of this process.
    pub memory_usage_mb: u64,
    /// Requests waiting for the model.
    pub queue_depth: usize,
    pub queue_capacity: usize,
    pub auth_enabled: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelStatus {
    pub name: String,
    pub loaded: bool,
    pub device: String,
    /// float32 | float16 | bfloat16 | gguf-<type>
    pub precision: String,
    /// How activations met the quantized weights: `f32` (exact products, the default) or `q8`
    /// (llama.cpp's arithmetic, `serve --activations q8`); empty while no model is loaded.
    #[schema(example = "f32")]
    pub activations: String,
    /// Context length in tokens.
    pub max_length: usize,
    pub vocab_size: usize,
    pub architecture: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_time_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SystemStatus {
    pub gpu_available: bool,
    pub gpu_name: Option<String>,
    pub gpu_memory_total_mb: Option<u64>,
    pub gpu_memory_used_mb: Option<u64>,
    pub cpu_cores: usize,
    pub system_memory_gb: f64,
}

/// Body of GET /status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct StatusResponse {
    pub service: ServiceStatus,
    /// The default model.
    pub model: ModelStatus,
    pub system: SystemStatus,
    /// Every model the server offers, with its queue.
    pub models: Vec<ModelRuntime>,
}

/// A model's load state and queue (one entry per model in /status).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ModelRuntime {
    pub id: String,
    pub status: crate::engine::registry::LoadStatus,
    pub memory_mb: f64,
    /// Requests waiting for this model (not counting the one running).
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// Jobs the model thread has taken since it loaded.
    pub jobs_received: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EndpointInfo {
    pub method: String,
    pub path: String,
    pub description: String,
}

/// Body of GET /.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RootResponse {
    pub name: String,
    pub version: String,
    pub description: String,
    pub model: String,
    /// loading | ready | restarting | failed
    pub status: String,
    pub docs: String,
    pub endpoints: Vec<EndpointInfo>,
}

/// Body of GET /live.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LiveResponse {
    pub status: String,
}
