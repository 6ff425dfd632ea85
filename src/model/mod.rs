//! Everything candle: where a model comes from, how its weights and tokenizer are read, the
//! decoder every family runs on, its layers, kernels and KV cache, and one file per family
//! for what is specific to it (`family/`).

pub mod chat_template;
pub mod config;
pub mod decoder;
pub mod error;
pub mod family;
mod fused;
pub mod gguf;
pub mod gguf_header;
pub mod hf_dir;
pub mod init;
pub mod kv_cache;
mod layers;
pub mod lora;
pub mod nanochat;
pub mod nanogpt;
pub mod packed;
pub mod pickle;
pub mod probe;
pub mod q8;
pub mod quant;
pub mod simd;
pub mod source;
pub mod tokenizer;
pub mod torch_file;

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

pub use config::{Config, EosTokenId, Family};
pub use decoder::Decoder;
pub use error::{ModelError, Result};
pub use family::{Arch, ArchRef};
pub use kv_cache::{Cache, Prefilled};
pub use source::ModelSource;
pub use tokenizer::TextTokenizer;

/// File name of the default model inside `models/` (fetched by `scripts/setup.sh`).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `--device auto|cpu|cuda[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!("invalid device `{s}` (expected auto, cpu, cuda or cuda:N)")
                }),
        }
    }
}

impl DeviceChoice {
    pub fn resolve(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(ModelError::Device(
                        "CUDA was requested but this build has no CUDA support (rebuild with --features cuda)".into(),
                    ));
                }
                Device::new_cuda(n).map_err(|e| ModelError::Device(format!("cuda:{n}: {e}")))
            }
        }
    }
}

/// `--dtype auto|f32|f16|bf16|gguf`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
    /// Keep GGUF weights in their quantized blocks (activations in f32).
    Gguf,
}

impl FromStr for DtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "gguf" | "quantized" => Ok(Self::Gguf),
            _ => Err(format!(
                "invalid dtype `{s}` (expected auto, f32, f16, bf16 or gguf)"
            )),
        }
    }
}

impl DtypeChoice {
    /// `auto` is f16 on CUDA and f32 on CPU (measured: f16 matmuls on CPU are ~2.5x slower).
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cuda() => DType::F16,
            Self::Auto | Self::F32 | Self::Gguf => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub device: DeviceChoice,
    pub dtype: DtypeChoice,
    /// GGUF on the CPU in f32: dequantize every weight into a dense f32 copy instead of keeping
    /// the packed blocks (the reference the packed kernels are checked against; ≈ 4 bytes per
    /// weight). `TOKENSCOPE_DENSE_ONLY=1` sets it too.
    pub dense_reference: bool,
    /// `--tokenizer`: for checkpoints that carry none (nanoGPT), instead of the one found
    /// beside them or GPT-2's.
    pub tokenizer: Option<PathBuf>,
    /// `--activations`: f32 (exact, the default) or q8, llama.cpp's arithmetic ([`q8`]): only
    /// for GGUF files on the CPU with their blocks kept packed; other models are refused.
    pub activations: q8::Activations,
}

/// A model ready to run: weights, tokenizer and what to report about them.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub model: Decoder,
    /// Shared with the HTTP side, which tokenizes before queueing.
    pub tokenizer: std::sync::Arc<TextTokenizer>,
    pub name: String,
    pub architecture: String,
    pub eos_ids: Vec<u32>,
    /// `cpu` or `cuda:N`.
    pub device_label: String,
    /// `f32`, `f16`, `bf16`, or `gguf-<type>` for kept-quantized weights.
    pub dtype_label: String,
    /// Bytes its weights take in memory (packed blocks as stored, dense tensors in their
    /// dtype): the model's own memory, whatever else the process holds or frees meanwhile. An
    /// adapter on a base this process held already counts its own weights only.
    pub weight_bytes: u64,
    /// The loaded base whose weights this model shares (an adapter's), kept alive with it.
    pub shares: Option<std::sync::Arc<LoadedModel>>,
}

impl LoadedModel {
    pub fn context_length(&self) -> usize {
        self.model.config().max_position_embeddings
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        _ => "other",
    }
}

fn device_label(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Finds `relative` under the working directory or under any ancestor of the executable (so
/// `target/release/tokenscope` finds the repository's `models/` and `assets/`).
pub fn find_installed_file(relative: &std::path::Path) -> Option<PathBuf> {
    let mut roots = vec![std::env::current_dir().ok()];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(|p| Some(p.to_path_buf())));
    }
    roots
        .into_iter()
        .flatten()
        .map(|r| r.join(relative))
        .find(|p| p.is_file())
}

/// Where the default model lives: `models/` (see [`find_installed_file`]).
pub fn default_model_path() -> Option<PathBuf> {
    find_installed_file(&std::path::Path::new("models").join(DEFAULT_MODEL_FILE))
}

/// Resolves `--model` (or the default) to a source, with a helpful message when absent.
pub fn resolve_source(model: Option<&str>) -> Result<ModelSource> {
    match model {
        Some(m) => ModelSource::parse(m),
        None => default_model_path().map(ModelSource::Gguf).ok_or_else(|| {
            ModelError::NotFound(format!(
                "models/{DEFAULT_MODEL_FILE} (the default model; run ./scripts/setup.sh to fetch it, or pass --model)"
            ))
        }),
    }
}

/// [`resolve_source`], at step `checkpoint` of a nanochat checkpoint folder when given.
pub fn resolve_source_at(model: Option<&str>, checkpoint: Option<&str>) -> Result<ModelSource> {
    let source = resolve_source(model)?;
    match checkpoint {
        Some(c) => source.at_checkpoint(c),
        None => Ok(source),
    }
}

/// `TOKENSCOPE_DENSE_ONLY=1`: GGUF weights dequantized into dense f32 copies rather than kept
/// packed, for serving and for LoRA training's frozen base (the reference the packed kernels
/// are checked against).
pub fn dense_only() -> bool {
    std::env::var("TOKENSCOPE_DENSE_ONLY").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `--dtype gguf` (candle's quantized matmul) needs GGUF blocks: refused for `what`.
fn refuse_gguf_dtype(choice: DtypeChoice, what: &str) -> Result<()> {
    if choice == DtypeChoice::Gguf {
        return Err(ModelError::Config(format!(
            "--dtype gguf needs a .gguf model; use f32, f16 or bf16 for {what}"
        )));
    }
    Ok(())
}

/// The models this process holds, by source and load options (see [`load_shared`]).
static RESIDENT: std::sync::Mutex<Vec<(String, std::sync::Weak<LoadedModel>)>> =
    std::sync::Mutex::new(Vec::new());

/// [`load`], sharing weights with what this process holds already: a source loaded before
/// with the same options and still in use (a base that is served while an adapter on it
/// loads, or one under another adapter) is not read again; the same weights serve both, since
/// a clone of a [`LoadedModel`] shares every tensor and packed block. Returns the model and
/// whether it was held already.
pub fn load_shared(
    source: &ModelSource,
    opts: &LoadOptions,
) -> Result<(std::sync::Arc<LoadedModel>, bool)> {
    let key = format!("{:?}|{opts:?}", source.canonical());
    let resident = |key: &str| {
        let mut held = RESIDENT.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|(_, m)| m.strong_count() > 0);
        held.iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, m)| m.upgrade())
    };
    if let Some(m) = resident(&key) {
        return Ok((m, true));
    }
    let model = std::sync::Arc::new(load(source, opts)?);
    let mut held = RESIDENT.lock().unwrap_or_else(|p| p.into_inner());
    held.push((key, std::sync::Arc::downgrade(&model)));
    Ok((model, false))
}

/// Loads a model from any supported source.
pub fn load(source: &ModelSource, opts: &LoadOptions) -> Result<LoadedModel> {
    let device = opts.device.resolve()?;
    let dtype = opts.dtype.resolve(&device);
    if opts.activations == q8::Activations::Q8 && !matches!(source, ModelSource::Gguf(_)) {
        return Err(ModelError::Config(format!(
            "{}: --activations q8 is llama.cpp's arithmetic on a GGUF file's blocks; this is \
             not a GGUF file (serve it with --activations f32)",
            source.display_name()
        )));
    }
    match source {
        ModelSource::Gguf(path) => load_gguf(path, source, opts, dtype, &device),
        ModelSource::HfDir(dir) => {
            load_hf_dir(dir, source.display_name(), opts.dtype, dtype, &device)
        }
        ModelSource::NanoGpt(path) => load_nanogpt(path, source, opts, dtype, &device),
        ModelSource::Nanochat { dir, step } => {
            load_nanochat(dir, *step, source, opts, dtype, &device)
        }
        ModelSource::Hub { repo, revision } => {
            let dir = source::resolve_hub(repo, revision)?;
            load_hf_dir(&dir, source.display_name(), opts.dtype, dtype, &device)
        }
        ModelSource::Adapter { dir, base } => load_adapter(dir, base.as_deref(), source, opts),
    }
}

/// A PEFT LoRA adapter on its base: the base loaded as it would be on its own, the adapter's
/// pairs beside the projections they target.
fn load_adapter(
    dir: &std::path::Path,
    base: Option<&ModelSource>,
    source: &ModelSource,
    opts: &LoadOptions,
) -> Result<LoadedModel> {
    let Some(base) = base else {
        let named = lora::read_config(dir)?.base_model.unwrap_or_default();
        return Err(ModelError::Corrupt {
            path: dir.join("adapter_config.json"),
            reason: format!(
                "its base_model_name_or_path `{named}` is neither a model folder or file nor a model id of this server"
            ),
        });
    };
    let (base_model, held) = load_shared(base, opts)?;
    let mut model = (*base_model).clone();
    let adapter = lora::load(dir, model.model.config().num_hidden_layers, &Device::Cpu)?;
    model
        .model
        .apply_adapter(&adapter, None)
        .map_err(|reason| ModelError::Corrupt {
            path: dir.join("adapter_model.safetensors"),
            reason,
        })?;
    model.name = source.display_name();
    model.weight_bytes = match held {
        // The base's weights were in memory already: only the adapter's are added.
        true => adapter.bytes,
        false => model.weight_bytes + adapter.bytes,
    };
    model.shares = Some(base_model);
    Ok(model)
}

fn load_gguf(
    path: &std::path::Path,
    source: &ModelSource,
    opts: &LoadOptions,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    let (choice, dense_reference) = (opts.dtype, opts.dense_reference);
    let mut file = gguf::GgufFile::open(path)?;
    let architecture = file.architecture()?;
    let cfg = file.config()?;
    let tokenizer = TextTokenizer::from_gguf(file.metadata())?;
    let keep_quantized = choice == DtypeChoice::Gguf;
    // On the CPU in f32 the file's blocks are kept packed (exact w.r.t. the dequantized
    // weights, no dense copy); the dense reference dequantizes everything.
    let dense_reference = dense_reference || dense_only();
    let use_packed = !keep_quantized && dtype == DType::F32 && device.is_cpu() && !dense_reference;
    if opts.activations == q8::Activations::Q8 && !use_packed {
        return Err(ModelError::Config(format!(
            "{}: --activations q8 runs on the CPU in f32 with the file's blocks kept packed \
             (not with --dtype {}, a dense reference or another device)",
            source.display_name(),
            format!("{choice:?}").to_lowercase()
        )));
    }
    let (tensors, mut quantized, packed) = if use_packed {
        let (t, mut p) = file.tensors_with_packed(&cfg, device)?;
        if opts.activations == q8::Activations::Q8 {
            p = p
                .into_iter()
                .map(|(name, m)| {
                    let m = std::sync::Arc::unwrap_or_clone(m).with_activations(opts.activations);
                    (name, std::sync::Arc::new(m))
                })
                .collect();
        }
        (t, HashMap::new(), p)
    } else {
        let (t, q) = file.tensors(&cfg, dtype, device, keep_quantized)?;
        (t, q, HashMap::new())
    };
    let mut quant_type = None;
    if keep_quantized {
        quant_type = file
            .content
            .tensor_infos
            .get("blk.0.ffn_up.weight")
            .map(|t| format!("{:?}", t.ggml_dtype).to_lowercase());
    }
    let weight_bytes = dense_bytes(tensors.values(), dtype)
        + packed.values().map(|p| p.bytes() as u64).sum::<u64>()
        + quantized
            .values()
            .map(|q| match q {
                candle_core::quantized::QMatMul::QTensor(t) => t.storage_size_in_bytes() as u64,
                candle_core::quantized::QMatMul::Tensor(t)
                | candle_core::quantized::QMatMul::TensorF16(t) => {
                    (t.elem_count() * t.dtype().size_in_bytes()) as u64
                }
            })
            .sum::<u64>();
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let mut model = Decoder::load_packed(vb, &cfg, packed).map_err(|e| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    if keep_quantized {
        model = model.with_quantized(|name| quantized.remove(name));
    }
    let model = model.with_activations(opts.activations);
    let eos_ids = gguf_eos_ids(&cfg, file.metadata(), &tokenizer);
    Ok(LoadedModel {
        model,
        tokenizer: std::sync::Arc::new(tokenizer),
        name: source.display_name(),
        architecture,
        eos_ids,
        device_label: device_label(device),
        dtype_label: match quant_type {
            Some(q) => format!("gguf-{q}"),
            None => dtype_name(dtype).to_string(),
        },
        weight_bytes,
        shares: None,
    })
}

/// Bytes of `tensors` once in `dtype` (what the model holds of them).
fn dense_bytes<'a>(tensors: impl Iterator<Item = &'a candle_core::Tensor>, dtype: DType) -> u64 {
    tensors
        .map(|t| (t.elem_count() * dtype.size_in_bytes()) as u64)
        .sum()
}

/// Every token that ends generation for a GGUF model: `eos_token_id`, `eot_token_id`, and
/// llama.cpp's end-of-generation tokens by name ([`TextTokenizer::end_of_generation`]).
pub fn gguf_eos_ids(
    cfg: &Config,
    md: &HashMap<String, candle_core::quantized::gguf_file::Value>,
    tokenizer: &TextTokenizer,
) -> Vec<u32> {
    let mut ids: Vec<u32> = cfg.eos_token_id.iter().flat_map(|e| e.ids()).collect();
    ids.extend_from_slice(tokenizer.end_of_generation());
    ids.extend(
        md.get("tokenizer.ggml.eot_token_id")
            .and_then(|v| v.to_u32().ok()),
    );
    ids.sort();
    ids.dedup();
    ids
}

fn load_nanochat(
    dir: &std::path::Path,
    step: u64,
    source: &ModelSource,
    opts: &LoadOptions,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    refuse_gguf_dtype(opts.dtype, "a nanochat checkpoint")?;
    let mut ck = nanochat::Checkpoint::open(dir, step)?;
    let tokenizer = nanochat::tokenizer_for(dir, opts.tokenizer.as_deref())?;
    let tokens = tokenizer.vocab_size();
    if tokens != ck.config.vocab_size {
        return Err(ModelError::Config(format!(
            "the tokenizer has {tokens} tokens, the checkpoint's vocab_size is {}: not the tokenizer it was trained with",
            ck.config.vocab_size
        )));
    }
    let eos_ids = tokenizer.end_of_generation().to_vec();
    let cfg = ck.decoder_config(eos_ids.first().copied());
    let tensors = ck.decoder_tensors()?;
    let parts = (cfg, tensors, tokenizer, eos_ids);
    from_checkpoint(dir, parts, source, nanochat::ARCHITECTURE, dtype, device)
}

/// A model from a training checkpoint's tensors (dense, the decoder's names), its config,
/// tokenizer and end-of-generation ids.
fn from_checkpoint(
    path: &std::path::Path,
    (cfg, tensors, tokenizer, eos_ids): (Config, HashMap<String, Tensor>, TextTokenizer, Vec<u32>),
    source: &ModelSource,
    architecture: &str,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    let weight_bytes = dense_bytes(tensors.values(), dtype);
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    let model = Decoder::load(vb, &cfg).map_err(|e| ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(LoadedModel {
        model,
        tokenizer: std::sync::Arc::new(tokenizer),
        name: source.display_name(),
        architecture: architecture.into(),
        eos_ids,
        device_label: device_label(device),
        dtype_label: dtype_name(dtype).to_string(),
        weight_bytes,
        shares: None,
    })
}

fn load_nanogpt(
    path: &std::path::Path,
    source: &ModelSource,
    opts: &LoadOptions,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    refuse_gguf_dtype(opts.dtype, "a nanoGPT checkpoint")?;
    let mut ck = nanogpt::Checkpoint::open(path)?;
    let tokenizer = nanogpt::tokenizer_for(&ck, opts.tokenizer.as_deref())?;
    let tokens = tokenizer.vocab_size();
    if tokens > ck.args.vocab_size {
        return Err(ModelError::Config(format!(
            "the tokenizer has {tokens} tokens, the checkpoint's vocab_size is {}: not the tokenizer it was trained with",
            ck.args.vocab_size
        )));
    }
    let eos = tokenizer.info.eos_token_id;
    let cfg = ck.config(tokens, eos);
    let tensors = ck.decoder_tensors(tokens)?;
    let parts = (cfg, tensors, tokenizer, eos.into_iter().collect());
    from_checkpoint(path, parts, source, nanogpt::ARCHITECTURE, dtype, device)
}

fn load_hf_dir(
    dir: &std::path::Path,
    name: String,
    choice: DtypeChoice,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel> {
    refuse_gguf_dtype(choice, "a Hugging Face directory")?;
    let parts = hf_dir::inspect(dir)?;
    let tokenizer = TextTokenizer::from_file(&parts.tokenizer, parts.config.vocab_size)?;
    // SAFETY: the files are memory-mapped read-only; like every safetensors loader we rely on
    // them not being modified while the model is loaded.
    let weights = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&parts.weights) }
        .map_err(|e| ModelError::Corrupt {
            path: dir.to_path_buf(),
            reason: format!("safetensors: {e}"),
        })?;
    let corrupt = |e: candle_core::Error| ModelError::Corrupt {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    };
    let weight_bytes: u64 = weights
        .tensors()
        .iter()
        .map(|(_, view)| (view.shape().iter().product::<usize>() * dtype.size_in_bytes()) as u64)
        .sum();
    let vb = if hf_dir::needs_conversion(&parts.config) {
        // Fused or transposed tensors: read, converted to the decoder's names and layouts.
        let tensors = weights
            .tensors()
            .into_iter()
            .map(|(n, _)| Ok((n.clone(), weights.load(&n, &Device::Cpu)?)))
            .collect::<candle_core::Result<HashMap<_, _>>>()
            .map_err(corrupt)?;
        let tensors = hf_dir::to_decoder(&parts.config, tensors).map_err(corrupt)?;
        let names: Vec<String> = tensors.keys().cloned().collect();
        hf_dir::check_tensor_names(&names, &parts.config)?;
        VarBuilder::from_tensors(tensors, dtype, device)
    } else {
        let names: Vec<String> = weights.tensors().into_iter().map(|(n, _)| n).collect();
        hf_dir::check_tensor_names(&names, &parts.config)?;
        VarBuilder::from_backend(Box::new(weights), dtype, device.clone())
    };
    let model = Decoder::load(vb, &parts.config).map_err(|e| ModelError::Corrupt {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut eos_ids: Vec<u32> = parts
        .config
        .eos_token_id
        .iter()
        .flat_map(|e| e.ids())
        .chain(parts.extra_eos.iter().copied())
        .collect();
    eos_ids.sort();
    eos_ids.dedup();
    Ok(LoadedModel {
        model,
        tokenizer: std::sync::Arc::new(tokenizer),
        name,
        architecture: parts.config.family.arch.name().into(),
        eos_ids,
        device_label: device_label(device),
        dtype_label: dtype_name(dtype).to_string(),
        weight_bytes,
        shares: None,
    })
}
