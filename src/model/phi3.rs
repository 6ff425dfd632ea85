//! Phi-3 (mini, medium): llama's layers with q/k/v in one `qkv_proj` and gate/up in one
//! `gate_up_proj` (split on load, joined again on save), NeoX rope left unpermuted by
//! llama.cpp's converter, and HF's sliding window when the config sets one. Long-context
//! variants (`rope_scaling` longrope/su, GGUF `rope_factors_*`) are refused.

use std::collections::HashMap;

use candle_core::Tensor;

use super::config::{Config, Family};

/// A `model_type: phi3` config.json as a decoder [`Config`].
pub fn config_from_hf(mut json: serde_json::Value) -> Result<Config, String> {
    let obj = json.as_object_mut().ok_or("config.json is not an object")?;
    if let Some(kind) = obj
        .get("rope_scaling")
        .filter(|v| !v.is_null())
        .map(|v| v.get("type").or_else(|| v.get("rope_type")).cloned())
    {
        return Err(format!(
            "Phi-3 rope_scaling {} (long-context rope) is not supported; only the default rope is",
            kind.unwrap_or_default()
        ));
    }
    if obj.get("partial_rotary_factor").and_then(|v| v.as_f64()) == Some(1.0) {
        obj.remove("partial_rotary_factor");
    }
    let window = super::config::take_sliding_window(obj)?;
    let mut cfg: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
    cfg.family = Family::phi3(window, cfg.rope_theta);
    Ok(cfg)
}

/// HF tensors → the decoder's names: `qkv_proj` into q, k, v and `gate_up_proj` into gate,
/// up (rows in that order).
pub fn split_fused(
    cfg: &Config,
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim(),
        cfg.n_kv_heads() * cfg.head_dim(),
    );
    let i = cfg.intermediate_size;
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let parts: &[(&str, usize)] = if name.contains("self_attn.qkv_proj.") {
            &[("q_proj", q), ("k_proj", kv), ("v_proj", kv)]
        } else if name.contains("mlp.gate_up_proj.") {
            &[("gate_proj", i), ("up_proj", i)]
        } else {
            out.insert(name, t);
            continue;
        };
        let fused = if name.contains("qkv_proj") {
            "qkv_proj"
        } else {
            "gate_up_proj"
        };
        let rows: usize = parts.iter().map(|p| p.1).sum();
        if t.dim(0)? != rows {
            candle_core::bail!("{name}: {} rows, expected {rows}", t.dim(0)?);
        }
        let mut start = 0;
        for (part, n) in parts {
            out.insert(
                name.replace(fused, part),
                t.narrow(0, start, *n)?.contiguous()?,
            );
            start += n;
        }
    }
    Ok(out)
}

/// The decoder's names → HF's fused tensors (the inverse of [`split_fused`]).
pub fn join_fused(
    cfg: &Config,
    mut tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (fused, parts) in [
            (
                "self_attn.qkv_proj",
                &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"][..],
            ),
            ("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"][..]),
        ] {
            let ts = parts
                .iter()
                .map(|part| {
                    tensors
                        .remove(&format!("{p}.{part}.weight"))
                        .ok_or_else(|| {
                            candle_core::Error::Msg(format!("{p}.{part}.weight missing"))
                        })
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            tensors.insert(format!("{p}.{fused}.weight"), Tensor::cat(&ts, 0)?);
        }
    }
    Ok(tensors)
}
