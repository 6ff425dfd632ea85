//! Command-line interface (clap derive); every flag can also come from a `TOKENSCOPE_*` variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::{GenerateParams, LogprobsMode};
use crate::model::{DeviceChoice, DtypeChoice, LoadOptions};

#[derive(Debug, Parser)]
#[command(
    name = "tokenscope",
    version,
    about = "What does a causal language model think comes next?"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the HTTP service (the model loads in the background; /health is 503 until ready).
    Serve(ServeArgs),
    /// Print the next-token table for one prompt (no server).
    Inspect(InspectArgs),
    /// Print the OpenAPI document of the HTTP API.
    Openapi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on (0.0.0.0 to accept connections from other machines).
    #[arg(long, env = "TOKENSCOPE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "TOKENSCOPE_PORT", default_value_t = 8000)]
    pub port: u16,
    /// An accepted bearer key (repeatable; TOKENSCOPE_API_KEYS takes a comma-separated list).
    #[arg(
        long = "api-key",
        env = "TOKENSCOPE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// A file with one accepted key per line.
    #[arg(long, env = "TOKENSCOPE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Require the API key for /docs, /redoc and /openapi.json too.
    #[arg(long, env = "TOKENSCOPE_PROTECT_DOCS")]
    pub protect_docs: bool,
    /// Serve /metrics without the API key.
    #[arg(long, env = "TOKENSCOPE_PUBLIC_METRICS")]
    pub public_metrics: bool,
    /// Cap on prompt tokens (always also ≤ context length − max_tokens).
    #[arg(long, env = "TOKENSCOPE_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Requests allowed to wait for the model; more are answered 503 OVERLOADED.
    #[arg(long, env = "TOKENSCOPE_MAX_QUEUE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,
    /// Seconds a request may take (queueing included) before 504 TIMEOUT.
    #[arg(long, env = "TOKENSCOPE_REQUEST_TIMEOUT", default_value_t = 60.0, value_parser = parse_positive_secs)]
    pub request_timeout: f64,
    /// Largest accepted request body in bytes (413 beyond).
    #[arg(long, env = "TOKENSCOPE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// text | json (one JSON object per line).
    #[arg(long, env = "TOKENSCOPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_positive_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err("must be between 0 and 86400 seconds".into());
    }
    Ok(v)
}

/// Flags shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face model directory, or a hub id `org/name[@revision]`
    /// (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched by scripts/setup.sh).
    #[arg(long, env = "TOKENSCOPE_MODEL")]
    pub model: Option<String>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, env = "TOKENSCOPE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// auto | f32 | f16 | bf16 | gguf (auto = f16 on CUDA, f32 on CPU).
    #[arg(long, env = "TOKENSCOPE_DTYPE", default_value = "auto")]
    pub dtype: DtypeChoice,
}

impl ModelArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            dtype: self.dtype,
        }
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The prompt whose continuation to inspect.
    pub prompt: String,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Alternatives shown per position (1–50).
    #[arg(long, short = 'k', default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub top_k: u32,
    /// Tokens to generate (1–100).
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy, up to 2).
    #[arg(long, short = 't', default_value_t = 1.0, value_parser = parse_temperature)]
    pub temperature: f32,
    /// Seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop after this string appears (repeatable, up to 4).
    #[arg(long)]
    pub stop: Vec<String>,
    /// processed | raw
    #[arg(long, default_value = "processed", value_parser = parse_mode)]
    pub logprobs_mode: LogprobsMode,
    /// Print the JSON body POST /generate would return.
    #[arg(long)]
    pub json: bool,
}

impl InspectArgs {
    pub fn params(&self) -> GenerateParams {
        GenerateParams {
            temperature: self.temperature,
            max_tokens: self.max_tokens as usize,
            top_k: self.top_k as usize,
            seed: self.seed,
            stop: self.stop.clone(),
            logprobs_mode: self.logprobs_mode,
        }
    }
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    let t: f32 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(0.0..=2.0).contains(&t) {
        return Err("temperature must be between 0.0 and 2.0".into());
    }
    Ok(t)
}

fn parse_mode(s: &str) -> Result<LogprobsMode, String> {
    match s {
        "processed" => Ok(LogprobsMode::Processed),
        "raw" => Ok(LogprobsMode::Raw),
        _ => Err("expected processed or raw".into()),
    }
}

/// A file of API keys, one per line (blank lines and `#` comments ignored).
pub fn read_key_file(path: &PathBuf) -> std::io::Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}
