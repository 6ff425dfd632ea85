//! LoRA training: the base frozen (plain tensors, no gradients, no optimizer state), a pair of
//! low-rank matrices per targeted projection trained, initialised as PEFT initialises them
//! (A Kaiming-uniform with bound 1/√in, B zero: the adapter starts as the identity), with
//! PEFT's dropout on the adapter's input during training only. Dropout masks come from a
//! seeded generator keyed by (seed, step, micro-batch, projection), so a resumed run draws the
//! same masks and its losses are bit-identical. The result is written in PEFT's format (see
//! [`crate::model::lora`]), which PEFT and this server load.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;

pub use crate::model::lora::DropoutKey;
use serde::Serialize;

use crate::model::lora::{Adapter, AdapterConfig, LoraPair, MODULES};
use crate::model::Config;

/// PEFT's module names targeted when none are named: the attention projections.
pub const DEFAULT_TARGETS: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];

/// A LoRA run's settings (`--lora-r` and the rest).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraOptions {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// PEFT's module names.
    pub targets: Vec<String>,
}

pub use crate::model::lora::module_dims;

/// The settings checked against the model: `(field, message)` for the first that is wrong.
pub fn check(o: &LoraOptions, cfg: &Config) -> Result<(), (&'static str, String)> {
    // PEFT's keys are the Hugging Face names: a family whose HF projections are fused or
    // transposed has no adapter layout of ours.
    if !cfg.family.arch.peft_projections() {
        return Err((
            "method",
            format!(
                "LoRA training of {} models is not supported (their projections are fused or transposed in PEFT's layout)",
                cfg.family.arch.name()
            ),
        ));
    }
    if o.targets.is_empty() {
        return Err(("target_modules", "name at least one module".into()));
    }
    for t in &o.targets {
        let Some((out, inp)) = module_dims(cfg, t) else {
            let known: Vec<&str> = MODULES
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| module_dims(cfg, n).is_some())
                .collect();
            return Err((
                "target_modules",
                format!(
                    "`{t}` is not a projection of {} models (they have {})",
                    cfg.family.arch.name(),
                    known.join(", ")
                ),
            ));
        };
        if o.r == 0 || o.r > out.min(inp) {
            return Err((
                "r",
                format!(
                    "r must be between 1 and {} (the narrowest side of {t}, {out} × {inp})",
                    out.min(inp)
                ),
            ));
        }
    }
    if !(o.alpha > 0.0 && o.alpha.is_finite()) {
        return Err(("alpha", "alpha must be a positive number".into()));
    }
    if !(0.0..1.0).contains(&o.dropout) {
        return Err(("dropout", "dropout must be in [0, 1)".into()));
    }
    Ok(())
}

/// PEFT's key of a matrix.
pub fn key(layer: usize, module: &str, half: char) -> String {
    let path = MODULES
        .iter()
        .find(|(n, _)| *n == module)
        .map_or(module, |(_, p)| p);
    format!("base_model.model.model.layers.{layer}.{path}.lora_{half}.weight")
}

/// Fresh matrices, as PEFT initialises them: A uniform in ±1/√in (Kaiming-uniform with a =
/// √5), B zero.
pub fn init(
    o: &LoraOptions,
    cfg: &Config,
    seed: u64,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed ^ 0x4C6F_5241);
    let mut out = HashMap::new();
    for layer in 0..cfg.num_hidden_layers {
        for t in &o.targets {
            let (rows, cols) = module_dims(cfg, t).unwrap_or((0, 0));
            let bound = 1.0 / (cols as f32).sqrt();
            let a: Vec<f32> = (0..o.r * cols)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            out.insert(
                key(layer, t, 'A'),
                Tensor::from_vec(a, (o.r, cols), device)?,
            );
            out.insert(
                key(layer, t, 'B'),
                Tensor::zeros((rows, o.r), DType::F32, device)?,
            );
        }
    }
    Ok(out)
}

/// The adapter the trained variables make (their tensors: gradients flow to them).
pub fn adapter(o: &LoraOptions, named: &[(String, Var)]) -> Adapter {
    let by_name: HashMap<&str, &Var> = named.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut pairs = HashMap::new();
    for (name, var) in named {
        let Some(prefix) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let Some(b) = by_name.get(format!("{prefix}.lora_B.weight").as_str()) else {
            continue;
        };
        let Some((layer, path)) = prefix
            .strip_prefix("base_model.model.model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, p)| Some((l.parse::<usize>().ok()?, p.to_string())))
        else {
            continue;
        };
        pairs.insert(
            (layer, path),
            LoraPair {
                a: var.as_tensor().clone(),
                b: b.as_tensor().clone(),
            },
        );
    }
    Adapter {
        config: AdapterConfig {
            r: o.r,
            lora_alpha: o.alpha,
            use_rslora: false,
            target_modules: o.targets.clone(),
            base_model: None,
        },
        pairs,
        bytes: 0,
    }
}

/// Writes the adapter in PEFT's format into `dir` (each file written whole, then renamed).
pub fn save_peft(
    dir: &Path,
    o: &LoraOptions,
    named: &[(String, Var)],
    base_model: &str,
) -> std::io::Result<u64> {
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": o.r,
        "lora_alpha": o.alpha,
        "lora_dropout": o.dropout,
        "target_modules": o.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "inference_mode": true,
        "init_lora_weights": true,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let tensors: HashMap<String, Tensor> = named
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let io = |e: candle_core::Error| std::io::Error::other(e.to_string());
    let tmp = dir.join("adapter_model.safetensors.part");
    candle_core::safetensors::save(&tensors, &tmp).map_err(io)?;
    let bytes = std::fs::metadata(&tmp)?.len();
    std::fs::rename(&tmp, dir.join("adapter_model.safetensors"))?;
    let tmp = dir.join("adapter_config.json.part");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&config).unwrap_or_default() + "\n",
    )?;
    std::fs::rename(&tmp, dir.join("adapter_config.json"))?;
    Ok(bytes)
}
