//! Gemma 2: Gemma 3's layers without the q/k norms, with soft-capped attention scores (50)
//! and logits (30), every other layer on a 4096-token sliding window (the local layers use
//! the same rope base), scores scaled by `query_pre_attn_scalar`. HF checkpoints store each
//! norm weight as `w` and multiply by `1 + w`; the decoder (like llama.cpp's GGUF) holds
//! `1 + w`.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::config::{Config, Family, Sliding};

/// A `model_type: gemma2` config.json as a decoder [`Config`].
pub fn config_from_hf(mut json: serde_json::Value) -> Result<Config, String> {
    let obj = json.as_object_mut().ok_or("config.json is not an object")?;
    for key in ["hidden_activation", "hidden_act"] {
        match obj.remove(key).as_ref().and_then(|v| v.as_str()) {
            None | Some("gelu_pytorch_tanh") => {}
            Some(other) => {
                return Err(format!(
                    "Gemma 2 {key} `{other}` is not supported (only gelu_pytorch_tanh)"
                ))
            }
        }
    }
    let num = |obj: &serde_json::Map<String, serde_json::Value>, key: &str| {
        obj.get(key).and_then(|v| v.as_f64())
    };
    let window = super::config::take_sliding_window(obj)?.unwrap_or(4096);
    let attn_cap = num(obj, "attn_logit_softcapping").unwrap_or(0.0);
    let final_cap = num(obj, "final_logit_softcapping").unwrap_or(0.0);
    let scalar = num(obj, "query_pre_attn_scalar");
    for inert in [
        "sliding_window_size",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "cache_implementation",
    ] {
        obj.remove(inert);
    }
    obj.entry("tie_word_embeddings").or_insert(true.into());
    let mut cfg: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
    cfg.family = Family::gemma2(
        Sliding {
            window,
            global_every: 2,
            local_rope_theta: cfg.rope_theta,
        },
        scalar.unwrap_or(cfg.head_dim() as f64),
        attn_cap,
        final_cap,
    );
    Ok(cfg)
}

/// HF's norm weights `w` → `1 + w` (added in f32, as HF's `1.0 + weight.float()`); with
/// `back`, the inverse (for saving).
pub fn shift_norms(
    tensors: HashMap<String, Tensor>,
    back: bool,
) -> candle_core::Result<HashMap<String, Tensor>> {
    tensors
        .into_iter()
        .map(|(name, t)| {
            if !name.ends_with("norm.weight") {
                return Ok((name, t));
            }
            let dtype = t.dtype();
            let f = t.to_dtype(DType::F32)?;
            let shifted = if back { (f - 1.0)? } else { (f + 1.0)? };
            Ok((name, shifted.to_dtype(dtype)?))
        })
        .collect()
}
