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
    /// Print the next-token table for one prompt (no server).
    Inspect(InspectArgs),
    /// Print the OpenAPI document of the HTTP API.
    Openapi,
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
