//! What the API says about jobs: the body that creates one, the view of one, and the errors.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::status::JobStatus;
use super::store::{HistoryPoint, StoreError};

/// Training data: text in the request, an earlier upload, or a file under `--data-dir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DataSpec {
    Text(TextData),
    Upload(UploadData),
    Path(PathData),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TextData {
    /// The training text itself (at least one character that is not whitespace; no NUL).
    #[schema(min_length = 1, pattern = r"^[^\x00]*[^\s\x00][^\x00]*$")]
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadData {
    /// An id from POST /train/uploads.
    pub upload_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PathData {
    /// A `.txt` or `.jsonl` file (or a folder of them) relative to the server's `--data-dir`.
    pub path: String,
}

/// Body of POST /train/jobs: what to train and how (the `tokenscope train` flags of the same
/// names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"base_model": "SmolLM2-135M-Instruct.Q4_1", "data": {"text": "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump!"}, "output_name": "smollm2-fox", "steps": 5, "seq_len": 8}))]
pub struct JobSpec {
    /// The model to start from (an id from GET /models; `model_id` is accepted as well, as
    /// the LLM platform names it).
    #[serde(alias = "model_id")]
    pub base_model: String,
    /// A name for people to recognise the job by (any text; the platform's `job_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 200)]
    pub job_name: Option<String>,
    pub data: DataSpec,
    /// Id of the model the job produces (letters, digits, `.`, `_`, `-`).
    #[schema(
        pattern = r"^[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?$",
        max_length = 128
    )]
    pub output_name: String,
    /// Optimizer steps (default 100 unless `epochs` is given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(default = 100, minimum = 1, maximum = 1000000)]
    pub steps: Option<u64>,
    /// Passes over the training windows instead of `steps` (fractions allowed): the steps are
    /// ⌈epochs × windows ÷ batch_size⌉, known once the data is tokenized.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0, maximum = 1000)]
    pub epochs: Option<f64>,
    /// Peak learning rate (linear warm-up, cosine decay; `learning_rate` is accepted as well).
    #[serde(default = "default_lr", alias = "learning_rate")]
    #[schema(default = 0.0001, exclusive_minimum = 0, maximum = 1)]
    pub lr: f64,
    #[serde(default = "default_batch_size")]
    #[schema(default = 4, minimum = 1, maximum = 256)]
    pub batch_size: u64,
    /// Tokens per training window.
    #[serde(default = "default_seq_len")]
    #[schema(default = 128, minimum = 2, maximum = 8192)]
    pub seq_len: u64,
    /// Evaluate on the held-out windows every this many steps (0: only at the start and end).
    #[serde(default = "default_eval_every")]
    #[schema(default = 10, minimum = 0, maximum = 1000000)]
    pub eval_every: u64,
    /// Checkpoint every this many steps (what a resume continues from).
    #[serde(default = "default_save_every")]
    #[schema(default = 50, minimum = 1, maximum = 1000000)]
    pub save_every: u64,
    /// Warm-up steps (default: a tenth of the steps, at most 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, maximum = 1000000)]
    pub warmup: Option<u64>,
    #[serde(default)]
    #[schema(default = 0, minimum = 0, maximum = 9223372036854775807_i64)]
    pub seed: u64,
    /// `full` (every weight; a Hugging Face folder) or `lora` (an adapter beside the frozen
    /// base; a PEFT folder). Default `full`, or `lora` when LoRA settings are given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<TrainMethod>,
    /// LoRA settings (with `method: "lora"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraSpec>,
    /// The LLM platform's LoRA fields: the same as `lora.r`, `lora.alpha`, `lora.dropout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 65536)]
    pub lora_r: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(exclusive_minimum = 0)]
    pub lora_alpha: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 0, exclusive_maximum = 1)]
    pub lora_dropout: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TrainMethod {
    Full,
    Lora,
}

/// A LoRA adapter's shape: `r` (rank), `alpha` (the update is scaled by alpha / r), the
/// dropout on its input while training, and the projections it adapts by PEFT's names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    #[serde(default = "default_lora_r")]
    #[schema(default = 8, minimum = 1, maximum = 65536)]
    pub r: u64,
    #[serde(default = "default_lora_alpha")]
    #[schema(default = 32, exclusive_minimum = 0)]
    pub alpha: f64,
    #[serde(default = "default_lora_dropout")]
    #[schema(default = 0.05, minimum = 0, exclusive_maximum = 1)]
    pub dropout: f64,
    /// Default: the attention projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`); also
    /// `gate_proj`, `up_proj`, `down_proj`.
    #[serde(default = "default_targets")]
    pub target_modules: Vec<String>,
}

fn default_lora_r() -> u64 {
    8
}
fn default_lora_alpha() -> f64 {
    32.0
}
fn default_lora_dropout() -> f64 {
    0.05
}
fn default_targets() -> Vec<String> {
    crate::train::lora::DEFAULT_TARGETS
        .iter()
        .map(|t| t.to_string())
        .collect()
}

impl LoraSpec {
    pub fn options(&self) -> crate::train::lora::LoraOptions {
        crate::train::lora::LoraOptions {
            r: self.r as usize,
            alpha: self.alpha,
            dropout: self.dropout,
            targets: self.target_modules.clone(),
        }
    }
}

/// Steps of a job that names neither `steps` nor `epochs`.
pub const DEFAULT_STEPS: u64 = 100;
fn default_lr() -> f64 {
    1e-4
}
fn default_batch_size() -> u64 {
    4
}
fn default_seq_len() -> u64 {
    128
}
fn default_eval_every() -> u64 {
    10
}
fn default_save_every() -> u64 {
    50
}

/// A job as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub base_model: String,
    pub output_name: String,
    pub step: u64,
    /// Steps in all (0 until an `epochs` job has tokenized its data).
    pub total_steps: u64,
    /// Percent of the steps done (100 once completed).
    pub progress: f64,
    /// Passes over the training windows the job makes (as asked, or what its steps come to),
    /// once its data is tokenized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<f64>,
    /// The pass under way (1-based), once the data is tokenized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_epoch: Option<u64>,
    /// The latest step's training loss (the platform's name for `train_loss`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_loss: Option<f64>,
    /// Windows of training data (each `seq_len` + 1 tokens), once tokenized.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_windows: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Seconds left at the current speed (while running).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes the job's folder takes in the state directory (checkpoints while it runs or
    /// after it failed; the model once completed).
    pub disk_bytes: u64,
    pub settings: JobSpec,
    /// Loss per step (GET /train/jobs/{id} only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<HistoryPoint>>,
    /// What happened, one line each (`Epoch 2/5 completed with loss 3.2100`, evaluations,
    /// the end): GET /train/jobs/{id} only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
}

/// What a job names that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    BaseModel,
    Upload,
    Data,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job `{0}` not found")]
    NotFound(String),
    /// A model, upload or data path the request names does not exist.
    #[error("{1}")]
    Missing(Missing, String),
    /// A data path the server will not read.
    #[error("{0}")]
    Forbidden(String),
    /// A model the API may not delete (the operator's own file).
    #[error("{0}")]
    NotDeletable(String),
    #[error("{0}")]
    Invalid(String, &'static str),
    #[error("{0}")]
    Conflict(String),
    /// The output_name is taken by a model or by a job that is not failed or cancelled.
    #[error("{0}")]
    OutputExists(String),
    /// The job's estimated peak memory is more than `--max-job-memory`.
    #[error("{0}")]
    Memory(String),
    #[error("upload exceeds the limit of {0} bytes")]
    TooLarge(usize),
    /// The state directory would pass `--max-disk` (the message says what uses the space).
    #[error("{0}")]
    DiskFull(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Io(String),
}

impl JobError {
    pub(super) fn invalid(field: &'static str, msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into(), field)
    }
}

impl JobSpec {
    /// The steps asked for (`None` for an `epochs` job, whose steps follow from its data).
    pub fn fixed_steps(&self) -> Option<u64> {
        match (self.steps, self.epochs) {
            (Some(s), _) => Some(s),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_STEPS),
        }
    }
}

impl JobSpec {
    /// Settles the LoRA fields into `method` and `lora` (the platform's `lora_r` & co. into
    /// `lora`), or names the field that contradicts the rest.
    pub fn settle_method(&mut self) -> Result<(), (&'static str, String)> {
        let platform =
            self.lora_r.is_some() || self.lora_alpha.is_some() || self.lora_dropout.is_some();
        if platform {
            if self.lora.is_some() {
                return Err((
                    "lora_r",
                    "give lora or lora_r/lora_alpha/lora_dropout, not both".into(),
                ));
            }
            self.lora = Some(LoraSpec {
                r: self.lora_r.take().unwrap_or_else(default_lora_r),
                alpha: self.lora_alpha.take().unwrap_or_else(default_lora_alpha),
                dropout: self
                    .lora_dropout
                    .take()
                    .unwrap_or_else(default_lora_dropout),
                target_modules: default_targets(),
            });
        }
        match (self.method, self.lora.is_some()) {
            (Some(TrainMethod::Full), true) => {
                return Err(("method", "LoRA settings need method \"lora\"".into()))
            }
            (Some(TrainMethod::Lora), false) => {
                self.lora = Some(LoraSpec {
                    r: default_lora_r(),
                    alpha: default_lora_alpha(),
                    dropout: default_lora_dropout(),
                    target_modules: default_targets(),
                })
            }
            (None, true) => self.method = Some(TrainMethod::Lora),
            _ => {}
        }
        let Some(l) = &self.lora else { return Ok(()) };
        if !(1..=65536).contains(&l.r) {
            return Err(("r", "lora.r must be between 1 and 65536".into()));
        }
        if !(l.alpha > 0.0 && l.alpha.is_finite()) {
            return Err(("alpha", "lora.alpha must be a positive number".into()));
        }
        if !(0.0..1.0).contains(&l.dropout) {
            return Err(("dropout", "lora.dropout must be in [0, 1)".into()));
        }
        if l.target_modules.is_empty() {
            return Err((
                "target_modules",
                "lora.target_modules names no module".into(),
            ));
        }
        let known: Vec<&str> = crate::model::lora::MODULES
            .iter()
            .map(|(n, _)| *n)
            .collect();
        if let Some(t) = l
            .target_modules
            .iter()
            .find(|t| !known.contains(&t.as_str()))
        {
            return Err((
                "target_modules",
                format!(
                    "lora.target_modules: `{t}` is not one of {}",
                    known.join(", ")
                ),
            ));
        }
        Ok(())
    }
}
