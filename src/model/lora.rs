//! LoRA adapters in Hugging Face PEFT's format: a folder with `adapter_config.json` and
//! `adapter_model.safetensors` (`base_model.model.model.layers.N.<module>.lora_A.weight`, shape
//! `[r, in]`, and `lora_B.weight`, `[out, r]`). Served unmerged, as PEFT computes them: each
//! targeted projection gives `W x + scale · B (A x)` with `scale = lora_alpha / r` (or
//! `lora_alpha / √r` with `use_rslora`), the base's weights untouched (packed GGUF blocks stay
//! packed). What the format allows and this does not implement (DoRA, biases, per-module rank or
//! alpha patterns, saved modules, fan-in-fan-out layers) is refused, naming the setting.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use serde_json::Value;

use super::{ModelError, Result};

/// The projections an adapter may target, by PEFT's (Hugging Face's) module names, with the
/// layer-relative path the decoder knows them by.
pub const MODULES: [(&str, &str); 7] = [
    ("q_proj", "self_attn.q_proj"),
    ("k_proj", "self_attn.k_proj"),
    ("v_proj", "self_attn.v_proj"),
    ("o_proj", "self_attn.o_proj"),
    ("gate_proj", "mlp.gate_proj"),
    ("up_proj", "mlp.up_proj"),
    ("down_proj", "mlp.down_proj"),
];

/// (out, in) of a module's projection in every layer of `cfg`'s decoder, or `None` when the
/// family has no such projection.
pub fn module_dims(cfg: &super::Config, module: &str) -> Option<(usize, usize)> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let q = cfg.num_attention_heads * cfg.head_dim();
    let kv = cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads) * cfg.head_dim();
    match module {
        "q_proj" => Some((q, h)),
        "k_proj" | "v_proj" => Some((kv, h)),
        "o_proj" => Some((h, q)),
        "gate_proj" if cfg.family.gated_mlp => Some((i, h)),
        "up_proj" => Some((i, h)),
        "down_proj" => Some((h, i)),
        _ => None,
    }
}

/// Checks an adapter's matrices, `(tensor name, shape)` as its safetensors header lists them,
/// against the projections of the base `cfg`: the first that does not fit is the error (the
/// adapter was made for another base).
pub fn check_shapes(
    cfg: &super::Config,
    shapes: &[(String, Vec<u64>)],
) -> std::result::Result<(), String> {
    for (key, shape) in shapes {
        let Some((layer, rest)) = key
            .strip_prefix("base_model.model.model.layers.")
            .and_then(|r| r.split_once('.'))
        else {
            continue;
        };
        let (path, is_a) = match (
            rest.strip_suffix(".lora_A.weight"),
            rest.strip_suffix(".lora_B.weight"),
        ) {
            (Some(p), _) => (p, true),
            (_, Some(p)) => (p, false),
            _ => continue,
        };
        let Some((name, _)) = MODULES.iter().find(|(_, p)| *p == path) else {
            continue;
        };
        let layer: usize = layer.parse().unwrap_or(usize::MAX);
        let Some((out, inp)) = module_dims(cfg, name).filter(|_| layer < cfg.num_hidden_layers)
        else {
            return Err(format!(
                "`{key}`: the base ({}, {} layers) has no such projection: the adapter was made for another base",
                cfg.family.arch.name(),
                cfg.num_hidden_layers
            ));
        };
        let fits = match (is_a, shape.as_slice()) {
            (true, [_, cols]) => *cols == inp as u64,
            (false, [rows, _]) => *rows == out as u64,
            _ => false,
        };
        if !fits {
            return Err(format!(
                "`{key}` is {shape:?}, but the base's {name} is {out} × {inp}: the adapter was made for another base"
            ));
        }
    }
    Ok(())
}

/// Largest adapter file read (an adapter is the size of a few low-rank matrices per layer).
const MAX_ADAPTER_BYTES: u64 = 2 << 30;

/// `adapter_config.json`, as far as it decides the maths.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// PEFT's module names (`q_proj`, …).
    pub target_modules: Vec<String>,
    /// The base the adapter was trained on: a path, or a model id of this server.
    pub base_model: Option<String>,
}

impl AdapterConfig {
    /// The factor on `B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

/// Whether `dir` holds a PEFT adapter.
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join("adapter_config.json").is_file()
}

fn bad(dir: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Corrupt {
        path: dir.join("adapter_config.json"),
        reason: reason.into(),
    }
}

/// Reads and checks `dir/adapter_config.json`.
pub fn read_config(dir: &Path) -> Result<AdapterConfig> {
    let path = dir.join("adapter_config.json");
    let raw = std::fs::read(&path).map_err(|e| bad(dir, format!("cannot read: {e}")))?;
    if raw.len() > 1 << 20 {
        return Err(bad(dir, "larger than 1 MiB"));
    }
    let v: Value = serde_json::from_slice(&raw).map_err(|e| bad(dir, format!("not JSON: {e}")))?;
    let field = |name: &str| v.get(name).filter(|x| !x.is_null());
    match field("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        other => {
            return Err(bad(
                dir,
                format!("peft_type {other:?}: only LoRA adapters (\"LORA\") are supported"),
            ))
        }
    }
    let unsupported = |name: &str, why: &str| bad(dir, format!("{name}: {why} is not supported"));
    if field("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("use_dora", "DoRA"));
    }
    if field("fan_in_fan_out").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported(
            "fan_in_fan_out",
            "a transposed (Conv1D, GPT-2) layer",
        ));
    }
    if let Some(b) = field("bias")
        .and_then(Value::as_str)
        .filter(|b| *b != "none")
    {
        return Err(unsupported("bias", &format!("training biases ({b:?})")));
    }
    for name in ["rank_pattern", "alpha_pattern"] {
        if field(name)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(unsupported(name, "a rank or alpha per module"));
        }
    }
    for name in [
        "modules_to_save",
        "layers_to_transform",
        "layer_replication",
    ] {
        if field(name).is_some_and(|x| x.as_array().is_none_or(|a| !a.is_empty())) {
            return Err(unsupported(name, "anything but null"));
        }
    }
    let r = field("r")
        .and_then(Value::as_u64)
        .filter(|&r| (1..=1 << 16).contains(&r))
        .ok_or_else(|| bad(dir, "r must be a whole number from 1 to 65536"))? as usize;
    let lora_alpha = field("lora_alpha")
        .and_then(Value::as_f64)
        .filter(|a| a.is_finite() && *a > 0.0)
        .ok_or_else(|| bad(dir, "lora_alpha must be a positive number"))?;
    let target_modules: Vec<String> = match field("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|m| m.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(dir, "target_modules must be a list of module names"))?,
        Some(Value::String(s)) => {
            return Err(bad(
                dir,
                format!("target_modules {s:?}: a regular expression is not supported; list the module names"),
            ))
        }
        _ => return Err(bad(dir, "target_modules is missing")),
    };
    if target_modules.is_empty() {
        return Err(bad(dir, "target_modules is empty"));
    }
    if let Some(m) = target_modules
        .iter()
        .find(|m| !MODULES.iter().any(|(name, _)| name == m))
    {
        let known: Vec<&str> = MODULES.iter().map(|(n, _)| *n).collect();
        return Err(bad(
            dir,
            format!(
                "target module `{m}` is not a projection this server adapts (it adapts {})",
                known.join(", ")
            ),
        ));
    }
    Ok(AdapterConfig {
        r,
        lora_alpha,
        use_rslora: field("use_rslora").and_then(Value::as_bool) == Some(true),
        target_modules,
        base_model: field("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

/// The base an adapter names, when it names a path that holds a model (absolute, or relative
/// to the adapter's folder).
pub fn base_path(dir: &Path, cfg: &AdapterConfig) -> Option<PathBuf> {
    let name = cfg.base_model.as_deref()?;
    let p = Path::new(name);
    [p.to_path_buf(), dir.join(p)]
        .into_iter()
        .find(|c| !name.is_empty() && c.exists())
}

/// One projection's low-rank pair: `A` (`[r, in]`) and `B` (`[out, r]`).
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// An adapter read from its folder: its pairs by (layer, decoder path).
#[derive(Debug, Clone)]
pub struct Adapter {
    pub config: AdapterConfig,
    pub pairs: HashMap<(usize, String), LoraPair>,
    pub bytes: u64,
}

/// Reads `dir`'s adapter for a base of `layers` layers, as f32 on `device`. Every tensor must
/// be a pair of a targeted module of an existing layer, of rank `r`; shapes against the base
/// are checked when the adapter is applied.
pub fn load(dir: &Path, layers: usize, device: &Device) -> Result<Adapter> {
    let config = read_config(dir)?;
    let path = dir.join("adapter_model.safetensors");
    let corrupt = |reason: String| ModelError::Corrupt {
        path: path.clone(),
        reason,
    };
    let len = std::fs::metadata(&path)
        .map_err(|e| corrupt(format!("cannot read: {e}")))?
        .len();
    if len > MAX_ADAPTER_BYTES {
        return Err(corrupt(format!(
            "{len} bytes: larger than an adapter can be"
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| corrupt(format!("cannot read: {e}")))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| corrupt(format!("not a safetensors file: {e}")))?;
    let mut halves: HashMap<(usize, String), (Option<Tensor>, Option<Tensor>)> = HashMap::new();
    for (key, tensor) in tensors {
        let parsed = key
            .strip_prefix("base_model.model.model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(layer, rest)| {
                let layer: usize = layer.parse().ok()?;
                let (module, half) = rest
                    .strip_suffix(".lora_A.weight")
                    .map(|m| (m, 0))
                    .or_else(|| rest.strip_suffix(".lora_B.weight").map(|m| (m, 1)))?;
                Some((layer, module.to_string(), half))
            });
        let Some((layer, module, half)) = parsed else {
            return Err(corrupt(format!(
                "tensor `{key}` is not a LoRA matrix of a decoder layer's projection"
            )));
        };
        let Some((name, _)) = MODULES.iter().find(|(_, path)| *path == module) else {
            return Err(corrupt(format!(
                "tensor `{key}`: unknown module `{module}`"
            )));
        };
        if !config.target_modules.iter().any(|m| m == name) {
            return Err(corrupt(format!(
                "tensor `{key}`: module `{name}` is not in target_modules"
            )));
        }
        if layer >= layers {
            return Err(corrupt(format!(
                "tensor `{key}`: the base has {layers} layers"
            )));
        }
        let tensor = tensor
            .to_dtype(DType::F32)
            .map_err(|e| corrupt(e.to_string()))?;
        let entry = halves.entry((layer, module)).or_default();
        if half == 0 {
            entry.0 = Some(tensor);
        } else {
            entry.1 = Some(tensor);
        }
    }
    let mut pairs = HashMap::new();
    let mut seen_modules = BTreeSet::new();
    for ((layer, module), halves) in halves {
        let (Some(a), Some(b)) = halves else {
            return Err(corrupt(format!(
                "layer {layer} {module}: lora_A and lora_B must both be present"
            )));
        };
        let (ra, _) = a.dims2().map_err(|e| corrupt(e.to_string()))?;
        let (_, rb) = b.dims2().map_err(|e| corrupt(e.to_string()))?;
        if ra != config.r || rb != config.r {
            return Err(corrupt(format!(
                "layer {layer} {module}: rank {ra} × {rb}, but adapter_config.json says r = {}",
                config.r
            )));
        }
        seen_modules.insert(module.clone());
        pairs.insert((layer, module), LoraPair { a, b });
    }
    if pairs.is_empty() {
        return Err(corrupt("holds no LoRA matrices".into()));
    }
    Ok(Adapter {
        config,
        pairs,
        bytes: len,
    })
}

/// Where the adapter's dropout masks come from: off (evaluation, inference) until the training
/// loop names the micro-batch it runs.
#[derive(Debug)]
pub struct DropoutKey {
    pub p: f64,
    seed: u64,
    key: AtomicU64,
}

const OFF: u64 = u64::MAX;

impl DropoutKey {
    pub fn new(p: f64, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            p,
            seed,
            key: AtomicU64::new(OFF),
        })
    }

    /// Masks for micro-batch `micro` of step `step` (0-based) from now on.
    pub fn train(&self, step: usize, micro: usize) {
        self.key
            .store(((step as u64) << 16) | micro as u64, Ordering::SeqCst);
    }

    /// No dropout (evaluation).
    pub fn off(&self) {
        self.key.store(OFF, Ordering::SeqCst);
    }

    /// The mask for projection `salt` (0 or 1 / (1 − p), f32, `shape`), or `None` when off.
    pub fn mask(
        &self,
        shape: &candle_core::Shape,
        salt: u64,
        device: &Device,
    ) -> candle_core::Result<Option<Tensor>> {
        let key = self.key.load(Ordering::SeqCst);
        if key == OFF || self.p <= 0.0 {
            return Ok(None);
        }
        let seed = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(key.wrapping_mul(0xBF58_476D_1CE4_E5B9))
            .wrapping_add(salt.wrapping_mul(0x94D0_49BB_1331_11EB));
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let keep = (1.0 / (1.0 - self.p)) as f32;
        let p = self.p as f32;
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| if rng.random::<f32>() < p { 0.0 } else { keep })
            .collect();
        Tensor::from_vec(values, shape, device).map(Some)
    }
}
