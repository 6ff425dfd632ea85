//! Hugging Face model directories: config.json, (sharded) safetensors, tokenizer.json.

use std::path::{Path, PathBuf};

use std::collections::HashMap;

use candle_core::Tensor;

use super::config::Config;
use super::error::{ModelError, Result};
use super::family;

/// The parts of a model directory, checked to exist.
pub struct HfDir {
    pub config: Config,
    pub weights: Vec<PathBuf>,
    pub tokenizer: PathBuf,
    pub extra_eos: Vec<u32>,
}

pub fn inspect(dir: &Path) -> Result<HfDir> {
    let missing = |what: &str| ModelError::MissingFile {
        dir: dir.to_path_buf(),
        what: what.to_string(),
    };
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(missing("config.json"));
    }
    let raw = std::fs::read_to_string(&config_path)?;
    let json: serde_json::Value = serde_json::from_str(&raw).map_err(|e| ModelError::Corrupt {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("<missing model_type>");
    let Some(arch) = family::by_model_type(model_type) else {
        return Err(ModelError::UnsupportedArchitecture {
            found: model_type.to_string(),
            supported: family::hf_model_types().join(", "),
        });
    };
    let config = arch
        .config_from_hf(json)
        .map_err(|reason| ModelError::Corrupt {
            path: config_path.clone(),
            reason,
        })?;
    config
        .validate()
        .map_err(|e| ModelError::Config(format!("{}: {e}", config_path.display())))?;

    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if single.is_file() {
        vec![single]
    } else if index.is_file() {
        shard_files(&index)?
            .into_iter()
            .map(|f| {
                let p = dir.join(&f);
                if p.is_file() {
                    Ok(p)
                } else {
                    Err(missing(&format!(
                        "shard {f} (named in model.safetensors.index.json)"
                    )))
                }
            })
            .collect::<Result<_>>()?
    } else {
        return Err(missing(
            "model.safetensors (or model.safetensors.index.json)",
        ));
    };

    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        return Err(missing("tokenizer.json"));
    }
    let mut extra_eos = Vec::new();
    if let Ok(raw) = std::fs::read_to_string(dir.join("generation_config.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&raw) {
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => {
                    extra_eos.extend(n.as_u64().map(|x| x as u32))
                }
                Some(serde_json::Value::Array(a)) => {
                    extra_eos.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
    }
    Ok(HfDir {
        config,
        weights,
        tokenizer,
        extra_eos,
    })
}

/// Whether the family's HF tensors differ from the decoder's names and layouts (then they are
/// read into memory and converted by [`to_decoder`], rather than memory-mapped as they are).
pub fn needs_conversion(config: &Config) -> bool {
    config.family.arch.hf_converts()
}

/// A family's HF tensors → the decoder's names and layouts.
pub fn to_decoder(
    config: &Config,
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    config.family.arch.hf_to_decoder(config, tensors)
}

/// The decoder's tensors → the family's HF names and layouts (the inverse of [`to_decoder`]).
pub fn from_decoder(
    config: &Config,
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    config.family.arch.decoder_to_hf(config, tensors)
}

/// The config.json of a decoder config, in its family's HF form.
fn hf_config(config: &Config, dtype: candle_core::DType) -> Result<serde_json::Value> {
    config
        .family
        .arch
        .hf_config(config, torch_dtype(dtype))
        .map_err(ModelError::Config)
}

/// Refuses checkpoints with tensors the llama implementation would not use (a bias, an extra
/// norm): loading would silently compute another model. Rotary `inv_freq` buffers, which old
/// checkpoints carry, are recomputed from the config and may be present.
pub fn check_tensor_names(names: &[String], config: &Config) -> Result<()> {
    let known: std::collections::HashSet<String> = super::decoder::parameter_shapes(config)
        .into_iter()
        .map(|(n, _)| n)
        .chain(["lm_head.weight".to_string()])
        .collect();
    let unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| !known.contains(*n) && !n.ends_with("rotary_emb.inv_freq"))
        .collect();
    super::error::refuse_unknown_tensors(unknown, &config.family)
}

/// The distinct shard file names listed in a `model.safetensors.index.json`.
pub fn shard_files(index: &Path) -> Result<Vec<String>> {
    let raw = std::fs::read_to_string(index)?;
    let corrupt = |reason: String| ModelError::Corrupt {
        path: index.to_path_buf(),
        reason,
    };
    let v: serde_json::Value = serde_json::from_str(&raw).map_err(|e| corrupt(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| corrupt("no weight_map".into()))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    if files.iter().any(|f| f.contains("..") || f.starts_with('/')) {
        return Err(corrupt("shard names must stay inside the directory".into()));
    }
    Ok(files)
}

/// Writes a Hugging Face model directory that this crate and `transformers` both load:
/// config.json, model.safetensors (in `dtype`), tokenizer.json, generation_config.json.
pub fn save(
    dir: &Path,
    config: &Config,
    tensors: &std::collections::HashMap<String, candle_core::Tensor>,
    tokenizer: &super::TextTokenizer,
    dtype: candle_core::DType,
) -> Result<()> {
    if config.rope_freq_factors.is_some() {
        return Err(ModelError::Config(
            "this GGUF's rope frequency factors (rope_freqs.weight) have no config.json equivalent; \
             it cannot be written as a Hugging Face directory"
                .into(),
        ));
    }
    let json = hf_config(config, dtype)?;
    std::fs::create_dir_all(dir)?;
    write_json(&dir.join("config.json"), &json)?;
    let mut gen = serde_json::json!({"_from_model_config": true});
    if let Some(bos) = config.bos_token_id {
        gen["bos_token_id"] = bos.into();
    }
    if let Some(eos) = &config.eos_token_id {
        gen["eos_token_id"] = serde_json::to_value(eos).unwrap_or_default();
    }
    write_json(&dir.join("generation_config.json"), &gen)?;

    let converted = tensors
        .iter()
        // Tied embeddings: the head is the embedding matrix, saved once.
        .filter(|(k, _)| !(config.tie_word_embeddings && k.as_str() == "lm_head.weight"))
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?.contiguous()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    let converted = from_decoder(config, converted)?;
    let tmp = dir.join("model.safetensors.part");
    candle_core::safetensors::save(&converted, &tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors"))?;
    tokenizer
        .inner()
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(())
}

fn torch_dtype(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::F16 => "float16",
        candle_core::DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| ModelError::Config(e.to_string()))?;
    std::fs::write(path, s + "\n")?;
    Ok(())
}
