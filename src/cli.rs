//! Command-line interface (clap derive); every flag can also come from a `TOKENSCOPE_*` variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::engine::scoring::Target;
use crate::engine::{GenerateParams, LogprobsMode};
use crate::model::q8::Activations;
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
    /// Fine-tune (or train from scratch) the model; writes a directory `serve --model DIR` loads.
    Train(TrainArgs),
    /// Drive a running server: status, models, load/unload, generate, training jobs.
    Client(ClientArgs),
    /// Print the OpenAPI document of the HTTP API.
    Openapi,
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    /// The server's base URL.
    #[arg(
        long,
        env = "TOKENSCOPE_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub url: String,
    /// Bearer key, when the server asks for one.
    #[arg(
        long,
        env = "TOKENSCOPE_API_KEY",
        hide_env_values = true,
        global = true
    )]
    pub api_key: Option<String>,
    /// Print the server's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: ClientCommand,
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Service, models and machine.
    Status,
    /// The models the server offers.
    Models,
    /// Load a model (`--wait`: until it is loaded or failed).
    Load {
        id: String,
        #[arg(long)]
        wait: bool,
    },
    /// Unload a model.
    Unload { id: String },
    /// The next-token table for a prompt.
    Generate {
        prompt: String,
        #[arg(short = 'k', long, default_value_t = 5)]
        top_k: u32,
        #[arg(short = 't', long, default_value_t = 1.0)]
        temperature: f64,
        #[arg(short = 'n', long, default_value_t = 1)]
        max_tokens: u32,
        /// A model id (default: the server's default model).
        #[arg(long)]
        model: Option<String>,
    },
    /// Upload a file and start a training job.
    Train(ClientTrainArgs),
    /// Training jobs (`ID`: one job with its history; `--follow`: until it ends).
    Jobs {
        id: Option<String>,
        #[arg(long, requires = "id")]
        follow: bool,
    },
    /// Pause a training job (it checkpoints).
    Pause { id: String },
    /// Resume a paused or interrupted job from its last checkpoint.
    Resume { id: String },
    /// Cancel a training job.
    Cancel { id: String },
    /// Evaluate a model: perplexity and bits per byte of a text file, and, with
    /// `--references`, BLEU, ROUGE-L, diversity and length of its continuations.
    Evaluate {
        /// A model id from `client models`.
        model: String,
        /// Text (.txt) or JSONL with a `text` field per line (.jsonl) to score.
        #[arg(long)]
        data: Option<PathBuf>,
        /// JSONL with `prompt` and `reference` per line: prompts to continue and the
        /// continuations expected.
        #[arg(long)]
        references: Option<PathBuf>,
        /// A name to find the evaluation by.
        #[arg(long, default_value = "evaluation")]
        name: String,
        /// Most tokens generated per reference prompt.
        #[arg(long, default_value_t = 64)]
        max_tokens: u64,
        /// End each continuation at its first newline.
        #[arg(long)]
        stop_on_newline: bool,
    },
    /// Evaluations (`ID`: one with every reference's continuation).
    Evaluations { id: Option<String> },
    /// Platform statistics: models, jobs, evaluations, generations.
    Stats,
    /// Two models on the same text: per-token KL, top-1 agreement, log-prob deltas (the
    /// positions where they differ most first).
    Compare {
        /// Model A (the reference).
        a: String,
        /// Model B.
        b: String,
        /// The text (every token after the first is scored).
        text: String,
        /// Score only this continuation of `text` (then `text` is the prompt).
        #[arg(long)]
        continuation: Option<String>,
        /// Alternatives per position and model.
        #[arg(short = 'k', long, default_value_t = 5)]
        top_k: u32,
        /// Positions listed (worst first).
        #[arg(long, default_value_t = 20)]
        rows: usize,
    },
}

#[derive(Debug, Args)]
pub struct ClientTrainArgs {
    /// The model to start from (an id from `client models`).
    #[arg(long)]
    pub base: String,
    /// Training text (.txt) or JSONL with a `text` field per line (.jsonl).
    #[arg(long)]
    pub data: PathBuf,
    /// Id of the model the job produces.
    #[arg(long)]
    pub name: String,
    /// Optimizer steps (default 100, unless --epochs).
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<u64>,
    /// Passes over the training windows instead of --steps.
    #[arg(long)]
    pub epochs: Option<f64>,
    /// A name for the job.
    #[arg(long)]
    pub job_name: Option<String>,
    /// Train a LoRA adapter of this rank (the base frozen) instead of every weight.
    #[arg(long)]
    pub lora_r: Option<u64>,
    #[arg(long, requires = "lora_r")]
    pub lora_alpha: Option<f64>,
    #[arg(long, requires = "lora_r")]
    pub lora_dropout: Option<f64>,
    /// Modules to adapt, by PEFT's names (default: q_proj,k_proj,v_proj,o_proj).
    #[arg(long, value_delimiter = ',', requires = "lora_r")]
    pub lora_targets: Vec<String>,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 4)]
    pub batch_size: u64,
    #[arg(long, default_value_t = 128)]
    pub seq_len: u64,
    #[arg(long, default_value_t = 10)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    #[arg(long)]
    pub warmup: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Show progress until the job ends.
    #[arg(long)]
    pub follow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A model to serve: a .gguf file, a Hugging Face directory or a hub id (repeatable; the
    /// first is the default model, loaded at start; default: models/SmolLM2-135M-Instruct.Q4_1.gguf).
    #[arg(long = "model", env = "TOKENSCOPE_MODEL")]
    pub models: Vec<String>,
    /// The step of a nanochat checkpoint folder given with --model: `step_002920`, `002920`
    /// or `2920` (default: the latest; --models-dir offers every step).
    #[arg(long, env = "TOKENSCOPE_CHECKPOINT")]
    pub checkpoint: Option<String>,
    /// The base of the PEFT adapter folders given with --model: a model id of this server
    /// (another --model) or a model path, in place of the base_model_name_or_path their
    /// adapter_config.json names.
    #[arg(long)]
    pub base: Option<String>,
    /// Offer every .gguf file and Hugging Face directory in this folder too (loaded on demand).
    #[arg(long, env = "TOKENSCOPE_MODELS_DIR")]
    pub models_dir: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Models loaded at once (loading another unloads the least recently used idle one).
    /// Default: 1 on CPU, 4 on a GPU.
    #[arg(long, env = "TOKENSCOPE_MAX_LOADED_MODELS", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_loaded_models: Option<u32>,
    /// Resident memory (MiB) the loaded models may take together; a load that would exceed it
    /// unloads idle models first, else is refused (507 INSUFFICIENT_MEMORY).
    #[arg(long, env = "TOKENSCOPE_MAX_MEMORY")]
    pub max_memory: Option<u64>,
    /// Load an unloaded model when a request names it, instead of answering 409
    /// MODEL_NOT_LOADED (the load counts against the request timeout).
    #[arg(long, env = "TOKENSCOPE_AUTOLOAD")]
    pub autoload: bool,
    /// Where jobs, their history, uploads and trained models are kept (SQLite: state.db).
    #[arg(long, env = "TOKENSCOPE_STATE_DIR", default_value = "state")]
    pub state_dir: PathBuf,
    /// Training data jobs may name by relative path (`data.path`); nothing outside it is read.
    #[arg(long, env = "TOKENSCOPE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Threads training jobs use (the rest stay with inference). Default: half the cores.
    #[arg(long, env = "TOKENSCOPE_TRAIN_THREADS", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub train_threads: Option<u32>,
    /// Bound on the state directory's size in bytes (uploads, checkpoints, trained models): a
    /// write that would pass it is refused with 507 DISK_FULL. Unbounded by default.
    #[arg(long, env = "TOKENSCOPE_MAX_DISK", value_parser = parse_bytes)]
    pub max_disk: Option<u64>,
    /// Bound on one training job's memory (e.g. 4G): a job whose estimated peak (weights,
    /// gradients, optimizer state, activations, logits) is larger is refused with 507, and a
    /// running job whose memory grows past it is stopped (failed). Default: three quarters of
    /// the memory available when the server starts (bounded by the address-space limit, if any).
    #[arg(long, env = "TOKENSCOPE_MAX_JOB_MEMORY", value_parser = parse_bytes)]
    pub max_job_memory: Option<u64>,
    /// Largest training upload (bytes).
    #[arg(long, env = "TOKENSCOPE_MAX_UPLOAD_BYTES", default_value_t = 64 << 20)]
    pub max_upload_bytes: usize,
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
    /// An admin key (repeatable; TOKENSCOPE_ADMIN_KEYS takes a comma-separated list): it may
    /// also load, unload and delete models and manage every job.
    #[arg(
        long = "admin-key",
        env = "TOKENSCOPE_ADMIN_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_keys: Vec<String>,
    /// A file of keys, read at start: one per line, `KEY` or `KEY ROLE` (role `user` or
    /// `admin`; `#` starts a comment line).
    #[arg(long, visible_alias = "api-keys-file", env = "TOKENSCOPE_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Require the API key for /docs, /redoc and /openapi.json too.
    #[arg(long, env = "TOKENSCOPE_PROTECT_DOCS")]
    pub protect_docs: bool,
    /// Most tokens one OpenAI-style request may generate per choice: the default when the
    /// request names none (chat otherwise runs to the end of the context), and a cap on what
    /// it names (shortened to it, `finish_reason: length`). Unbounded by default, like vLLM.
    #[arg(long, env = "TOKENSCOPE_MAX_NEW_TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_new_tokens: Option<u32>,
    /// Allow browser apps from this origin to call the API (CORS; repeatable; `*` for any).
    /// Off by default.
    #[arg(
        long = "cors-origin",
        env = "TOKENSCOPE_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// Serve /metrics without the API key.
    #[arg(long, env = "TOKENSCOPE_PUBLIC_METRICS")]
    pub public_metrics: bool,
    /// Cap on prompt tokens (always also ≤ context length − max_tokens).
    #[arg(long, env = "TOKENSCOPE_MAX_PROMPT_TOKENS")]
    pub max_prompt_tokens: Option<usize>,
    /// Prefix KV cache size in prompt tokens (0 = off): repeated or extended prompts only
    /// compute their new tokens. Each entry's stored logits count as the tokens of equal memory.
    #[arg(long, env = "TOKENSCOPE_PREFIX_CACHE_TOKENS", default_value_t = crate::engine::worker::DEFAULT_PREFIX_CACHE_TOKENS)]
    pub prefix_cache_tokens: usize,
    /// Requests allowed to wait for the model; more are answered 503 OVERLOADED.
    #[arg(long, env = "TOKENSCOPE_MAX_QUEUE", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_queue: u32,
    /// Seconds a request may take (queueing included) before 504 TIMEOUT.
    #[arg(long, env = "TOKENSCOPE_REQUEST_TIMEOUT", default_value_t = 60.0, value_parser = parse_positive_secs)]
    pub request_timeout: f64,
    /// Largest accepted request body in bytes (413 beyond).
    #[arg(long, env = "TOKENSCOPE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a client has to send its request headers (also how long an idle keep-alive
    /// connection is kept, and the longest pause allowed within a request body).
    #[arg(long, env = "TOKENSCOPE_HEADER_TIMEOUT", default_value_t = 10.0, value_parser = parse_positive_secs)]
    pub header_timeout: f64,
    /// Most open connections; more are answered 503 and closed.
    #[arg(long, env = "TOKENSCOPE_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Most open connections from one client address; more are answered 503 and closed.
    #[arg(long, env = "TOKENSCOPE_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_client: u32,
    /// text | json (one JSON object per line).
    #[arg(long, env = "TOKENSCOPE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--arch`'s help: the families that train from scratch, and the default.
fn arch_help() -> String {
    use crate::model::family;
    format!(
        "With --from-scratch and --config tiny|small: {} (default {})",
        family::fresh_names().join(" | "),
        family::DEFAULT.name()
    )
}

fn parse_positive_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !(v > 0.0 && v <= 86_400.0) {
        return Err("must be between 0 and 86400 seconds".into());
    }
    Ok(v)
}

/// Where and in which precision models run.
#[derive(Debug, Clone, Args)]
pub struct DeviceArgs {
    /// auto | cpu | cuda | cuda:N
    #[arg(long, env = "TOKENSCOPE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// auto | f32 | f16 | bf16 | gguf (auto = f16 on CUDA, f32 on CPU).
    #[arg(long, env = "TOKENSCOPE_DTYPE", default_value = "auto")]
    pub dtype: DtypeChoice,
    /// The tokenizer of nanoGPT checkpoints (a meta.pkl, a tokenizer.json, or a folder with
    /// GPT-2's encoder.json + vocab.bpe; default: a meta.pkl beside the checkpoint, else
    /// GPT-2's) and of nanochat ones (a tokenizer.pkl; default: beside the checkpoints, or
    /// nanochat's <base>/tokenizer/).
    #[arg(long, env = "TOKENSCOPE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// f32 | q8: how activations meet quantized GGUF weights. f32 (default): exact products
    /// with the dequantized weights. q8: llama.cpp's CPU arithmetic (activations quantized to
    /// 8 bits, integer dot products, f16 keys/values, GELU via its f16 table): llama.cpp's kind
    /// of numbers for the same file (within llama.cpp's own spread: see the README), faster
    /// decoding, slower long prompts.
    #[arg(long, env = "TOKENSCOPE_ACTIVATIONS", default_value = "f32")]
    pub activations: Activations,
}

impl DeviceArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            dtype: self.dtype,
            tokenizer: self.tokenizer.clone(),
            activations: self.activations,
            ..LoadOptions::default()
        }
    }
}

/// Flags shared by every command that loads a model.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// A .gguf file, a Hugging Face model directory, or a hub id `org/name[@revision]`
    /// (default: models/SmolLM2-135M-Instruct.Q4_1.gguf, fetched by scripts/setup.sh).
    #[arg(long, env = "TOKENSCOPE_MODEL")]
    pub model: Option<String>,
    /// The step of a nanochat checkpoint folder: `step_002920`, `002920` or `2920` (default:
    /// the latest).
    #[arg(long, env = "TOKENSCOPE_CHECKPOINT")]
    pub checkpoint: Option<String>,
    /// The base of a PEFT adapter folder given with --model (a model path or hub id), in place
    /// of the base_model_name_or_path its adapter_config.json names.
    #[arg(long)]
    pub base: Option<String>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, env = "TOKENSCOPE_DEVICE", default_value = "auto")]
    pub device: DeviceChoice,
    /// auto | f32 | f16 | bf16 | gguf (auto = f16 on CUDA, f32 on CPU).
    #[arg(long, env = "TOKENSCOPE_DTYPE", default_value = "auto")]
    pub dtype: DtypeChoice,
    /// The tokenizer of a nanoGPT checkpoint (a meta.pkl, a tokenizer.json, or a folder with
    /// GPT-2's encoder.json + vocab.bpe; default: a meta.pkl beside it, else GPT-2's) or of a
    /// nanochat one (a tokenizer.pkl; default: beside it, or nanochat's <base>/tokenizer/).
    #[arg(long, env = "TOKENSCOPE_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
    /// f32 | q8: how activations meet quantized GGUF weights. f32 (default): exact products
    /// with the dequantized weights. q8: llama.cpp's CPU arithmetic (activations quantized to
    /// 8 bits, integer dot products, f16 keys/values, GELU via its f16 table): llama.cpp's kind
    /// of numbers for the same file (within llama.cpp's own spread: see the README), faster
    /// decoding, slower long prompts.
    #[arg(long, env = "TOKENSCOPE_ACTIVATIONS", default_value = "f32")]
    pub activations: Activations,
}

impl ModelArgs {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            device: self.device,
            dtype: self.dtype,
            tokenizer: self.tokenizer.clone(),
            activations: self.activations,
            ..LoadOptions::default()
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
    #[arg(long, short = 'k', default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=50), env = "TOKENSCOPE_TOP_K")]
    pub top_k: u32,
    /// Tokens to generate (1–100).
    #[arg(long, short = 'n', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100), env = "TOKENSCOPE_MAX_TOKENS")]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy, up to 2).
    #[arg(long, short = 't', default_value_t = 1.0, value_parser = parse_temperature, env = "TOKENSCOPE_TEMPERATURE")]
    pub temperature: f64,
    /// Seed for reproducible sampling.
    #[arg(long, env = "TOKENSCOPE_SEED")]
    pub seed: Option<u64>,
    /// Stop after this string appears (repeatable, up to 4).
    #[arg(long, env = "TOKENSCOPE_STOP")]
    pub stop: Vec<String>,
    /// processed | raw
    #[arg(long, default_value = "processed", value_parser = parse_mode, env = "TOKENSCOPE_LOGPROBS_MODE")]
    pub logprobs_mode: LogprobsMode,
    /// Print the JSON body POST /generate would return.
    #[arg(long, env = "TOKENSCOPE_JSON")]
    pub json: bool,
    /// Instead of generating, score this text as the continuation of the prompt: the
    /// probability and rank of each of its tokens (teacher-forced, T = 1).
    #[arg(long, env = "TOKENSCOPE_CONTINUATION")]
    pub continuation: Option<String>,
    /// Also score every prompt token: its log-probability, rank and the top-k the model
    /// expected there, and the prompt's perplexity.
    #[arg(long, env = "TOKENSCOPE_PROMPT_LOGPROBS")]
    pub prompt_logprobs: bool,
    /// Score this continuation after the prompt (repeatable, up to 16): its total
    /// log-probability and the rank of its first token.
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Instead of generating, show the logit lens: the next-token distribution read off the
    /// residual stream after every layer (the final norm and head applied), with each
    /// target's rank per layer.
    #[arg(long, env = "TOKENSCOPE_LENS")]
    pub lens: bool,
    /// Compare with this model (a .gguf file, a Hugging Face directory or a hub id): score
    /// the prompt (or `--continuation` after it) under both, per-token KL, top-1 agreement
    /// and log-prob deltas, the positions where they differ most first.
    #[arg(long, env = "TOKENSCOPE_COMPARE")]
    pub compare: Option<String>,
    /// Only tokenize: print the prompt's token ids and pieces as JSON (special tokens parsed,
    /// BOS per the model's rule), without running the model.
    #[arg(long, env = "TOKENSCOPE_TOKENIZE")]
    pub tokenize: bool,
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
            prompt_logprobs: self.prompt_logprobs,
            targets: Target::named(&self.targets),
            ..GenerateParams::default()
        }
    }
}

fn parse_temperature(s: &str) -> Result<f64, String> {
    let t: f64 = s.parse().map_err(|_| format!("`{s}` is not a number"))?;
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
pub fn read_key_file(path: &PathBuf) -> anyhow::Result<Vec<(String, bool)>> {
    let text = std::fs::read_to_string(path)?;
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let key = words.next().unwrap_or_default().to_string();
        let admin = match (words.next(), words.next()) {
            (None, _) | (Some("user"), None) => false,
            (Some("admin"), None) => true,
            _ => anyhow::bail!(
                "line {}: expected `KEY` or `KEY ROLE` with ROLE `user` or `admin`",
                n + 1
            ),
        };
        keys.push((key, admin));
    }
    Ok(keys)
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Starting model: .gguf, HF directory or hub id (default: the default model). With
    /// --from-scratch only its tokenizer is used.
    #[arg(long, env = "TOKENSCOPE_MODEL")]
    pub model: Option<String>,
    /// A UTF-8 text file, a folder of .txt files, or JSONL with a `text` field.
    #[arg(long, env = "TOKENSCOPE_DATA")]
    pub data: Option<PathBuf>,
    /// Output model directory (config.json, model.safetensors, tokenizer.json, logs, checkpoints).
    #[arg(long, env = "TOKENSCOPE_OUTPUT")]
    pub output: PathBuf,
    /// Optimizer steps (0 = write the starting model as an HF directory: a GGUF → HF converter).
    #[arg(long, conflicts_with = "epochs", env = "TOKENSCOPE_STEPS")]
    pub steps: Option<usize>,
    /// Passes over the training windows (default 1 when --steps is not given).
    #[arg(long, env = "TOKENSCOPE_EPOCHS")]
    pub epochs: Option<f64>,
    #[arg(long, default_value_t = 4, env = "TOKENSCOPE_BATCH_SIZE")]
    pub batch_size: usize,
    /// Tokens per training window.
    #[arg(long, default_value_t = 256, env = "TOKENSCOPE_SEQ_LEN")]
    pub seq_len: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, env = "TOKENSCOPE_GRAD_ACCUM")]
    pub grad_accum: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 1e-4, env = "TOKENSCOPE_LR")]
    pub lr: f64,
    /// Linear warm-up steps before cosine decay (to 10% of --lr).
    #[arg(long, default_value_t = 10, env = "TOKENSCOPE_WARMUP")]
    pub warmup: usize,
    #[arg(long, default_value_t = 0.0, env = "TOKENSCOPE_WEIGHT_DECAY")]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0, env = "TOKENSCOPE_CLIP")]
    pub clip: f64,
    /// Evaluate on the held-out split every N steps (also before and after).
    #[arg(long, default_value_t = 50, env = "TOKENSCOPE_EVAL_EVERY")]
    pub eval_every: usize,
    /// Fraction of windows held out for evaluation.
    #[arg(long, default_value_t = 0.05, env = "TOKENSCOPE_EVAL_FRACTION")]
    pub eval_fraction: f64,
    /// Cap on held-out windows evaluated.
    #[arg(long, default_value_t = 64, env = "TOKENSCOPE_MAX_EVAL_WINDOWS")]
    pub max_eval_windows: usize,
    /// Checkpoint every N steps (and always on Ctrl-C); 0 = only on Ctrl-C.
    #[arg(long, default_value_t = 0, env = "TOKENSCOPE_SAVE_EVERY")]
    pub save_every: usize,
    /// Continue from the newest checkpoint in --output.
    #[arg(long, env = "TOKENSCOPE_RESUME")]
    pub resume: bool,
    #[arg(long, default_value_t = 0, env = "TOKENSCOPE_SEED")]
    pub seed: u64,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto", env = "TOKENSCOPE_DEVICE")]
    pub device: String,
    /// f32 | bf16 (bf16 on GPU only; auto = f32). Also the dtype of the written model.safetensors.
    #[arg(long, default_value = "f32", env = "TOKENSCOPE_DTYPE")]
    pub dtype: String,
    /// Train a new model (random weights) with --model's tokenizer.
    #[arg(long, env = "TOKENSCOPE_FROM_SCRATCH")]
    pub from_scratch: bool,
    /// With --from-scratch: tiny | small | a config.json file.
    #[arg(long, env = "TOKENSCOPE_CONFIG")]
    pub config: Option<String>,
    // The families are the registry's (`model::family::ARCHS`).
    #[arg(long, env = "TOKENSCOPE_ARCH", help = arch_help())]
    pub arch: Option<String>,
    /// Stop with a checkpoint after N steps of this run (as Ctrl-C would); resume later.
    #[arg(long, env = "TOKENSCOPE_STOP_AFTER")]
    pub stop_after: Option<usize>,
    /// Measure: run a few steps and print seconds per step and tokens/s, without writing a model.
    #[arg(long, env = "TOKENSCOPE_BENCH")]
    pub bench: bool,
    /// Train a LoRA adapter of this rank instead of every weight (the base stays frozen; the
    /// output is a PEFT adapter folder).
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA's alpha: the update is scaled by alpha / r.
    #[arg(long, default_value_t = 32.0, requires = "lora_r")]
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    #[arg(long, default_value_t = 0.05, requires = "lora_r")]
    pub lora_dropout: f64,
    /// Modules to adapt, by PEFT's names (default: q_proj,k_proj,v_proj,o_proj).
    #[arg(long, value_delimiter = ',', requires = "lora_r")]
    pub lora_targets: Vec<String>,
}

impl TrainArgs {
    pub fn options(&self) -> crate::train::TrainOptions {
        crate::train::TrainOptions {
            model: self.model.clone(),
            data: self.data.clone(),
            output: self.output.clone(),
            steps: self.steps,
            epochs: self.epochs,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            grad_accum: self.grad_accum,
            lr: self.lr,
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            clip: self.clip,
            eval_every: self.eval_every,
            eval_fraction: self.eval_fraction,
            max_eval_windows: self.max_eval_windows,
            save_every: self.save_every,
            resume: self.resume,
            seed: self.seed,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            from_scratch: self.from_scratch,
            config: self.config.clone(),
            arch: self.arch.clone(),
            stop_after: self.stop_after,
            progress: true,
            bench: self.bench,
            lora: self.lora_r.map(|r| crate::train::lora::LoraOptions {
                r,
                alpha: self.lora_alpha,
                dropout: self.lora_dropout,
                targets: if self.lora_targets.is_empty() {
                    crate::train::lora::DEFAULT_TARGETS
                        .iter()
                        .map(|t| t.to_string())
                        .collect()
                } else {
                    self.lora_targets.clone()
                },
            }),
        }
    }
}

/// A size in bytes, with an optional K, M, G or T suffix (powers of 1024; `B` and `iB` allowed).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 500M, 20G, 1073741824)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}
