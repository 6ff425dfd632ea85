//! Request and response bodies (besides the generate response, which lives in the engine so
//! that `inspect --json` prints exactly the same thing).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::Validate;

use crate::engine::{GenerateParams, LogprobsMode};

pub const MAX_STOP_STRINGS: usize = 4;
pub const MAX_STOP_CHARS: usize = 256;

/// Body of POST /generate.
#[derive(Debug, Clone, Deserialize, ToSchema, Validate)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "The capital of France is", "temperature": 1.0, "max_tokens": 1, "top_k": 5}))]
pub struct GenerateRequest {
    /// Input text prompt (non-empty after trimming).
    #[schema(min_length = 1, example = "The capital of France is")]
    pub prompt: String,
    /// Sampling temperature; 0 = greedy decoding.
    #[serde(default = "default_temperature")]
    #[validate(range(min = 0.0, max = 2.0))]
    #[schema(default = 1.0, minimum = 0.0, maximum = 2.0, example = 1.0)]
    pub temperature: f64,
    /// Tokens to generate.
    #[serde(default = "default_max_tokens")]
    #[validate(range(min = 1, max = 100))]
    #[schema(default = 1, minimum = 1, maximum = 100, example = 1)]
    pub max_tokens: i64,
    /// Alternatives returned per position.
    #[serde(default = "default_top_k")]
    #[validate(range(min = 1, max = 50))]
    #[schema(default = 5, minimum = 1, maximum = 50, example = 5)]
    pub top_k: i64,
    /// Seed that makes sampling reproducible (ignored when greedy).
    #[serde(default)]
    #[schema(minimum = 0, nullable)]
    pub seed: Option<u64>,
    /// Generation stops after any of these strings appears (not included in generated_text).
    #[serde(default)]
    #[validate(length(max = 4))]
    #[schema(max_items = 4, default = json!([]))]
    pub stop: Vec<String>,
    /// `processed` reports softmax(logits / T); `raw` reports softmax(logits).
    #[serde(default)]
    #[schema(default = "processed")]
    pub logprobs_mode: LogprobsMode,
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
        GenerateParams {
            temperature: self.temperature,
            max_tokens: self.max_tokens.clamp(1, 100) as usize,
            top_k: self.top_k.clamp(1, 50) as usize,
            seed: self.seed,
            stop: self.stop.clone(),
            logprobs_mode: self.logprobs_mode,
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
    pub model: ModelStatus,
    pub system: SystemStatus,
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
