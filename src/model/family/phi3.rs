//! Phi-3 (mini, medium): llama's layers with q/k/v in one `qkv_proj` and gate/up in one
//! `gate_up_proj` (split on load, joined again on save), NeoX rope left unpermuted by
//! llama.cpp's converter, and HF's sliding window when the config sets one. Long-context
//! variants (`rope_scaling` longrope/su, GGUF `rope_factors_*`) are refused.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{Arch, ArchRef, Rows};
use crate::model::config::{Config, Family, Sliding};
use crate::model::error::{ModelError, Result};
use crate::model::gguf::GgufFile;

pub struct Phi3;

impl Family {
    /// Llama's layers, stored as fused q/k/v and gate/up tensors (split on load), with HF's
    /// sliding window on every layer when the config sets one.
    pub fn phi3(window: Option<usize>, rope_theta: f64) -> Self {
        Self {
            arch: ArchRef(&Phi3),
            sliding: window.map(|w| Sliding::every_layer(w, rope_theta)),
            ..Self::default()
        }
    }
}

impl Arch for Phi3 {
    fn name(&self) -> &'static str {
        "phi3"
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["phi3"]
    }
    /// Phi-3 with its default rope. Its long-context variants carry per-frequency factors
    /// (`rope_factors_long`/`_short`, from `longrope`/`su` scaling), which are refused.
    fn family_from_gguf(&self, file: &GgufFile, cfg: &Config) -> Result<Family> {
        let infos = &file.content.tensor_infos;
        if let Some(name) = infos.keys().find(|n| n.starts_with("rope_factors_")) {
            return Err(ModelError::Config(format!(
                "this Phi-3 uses long-context rope scaling (`{name}`: rope_scaling type \
                 longrope/su), which is not supported; only the default rope is"
            )));
        }
        // HF applies the window (llama.cpp currently does not: its loader warns and turns
        // Phi-3's window off); the two agree on prompts shorter than it.
        let window = file
            .md_u32("phi3.attention.sliding_window")?
            .filter(|w| *w > 0);
        Ok(Family::phi3(window.map(|w| w as usize), cfg.rope_theta))
    }
    /// `attn_qkv` is q, k, v (as for every family); `ffn_up` is gate then up (llama.cpp's
    /// SWIGLU takes the first half as the gate, as HF's `gate_up_proj.chunk(2)` does).
    fn gguf_fused(&self, part: &str) -> Option<&'static [(&'static str, Rows)]> {
        const GATE_UP: &[(&str, Rows)] = &[
            ("mlp.gate_proj", Rows::Intermediate),
            ("mlp.up_proj", Rows::Intermediate),
        ];
        match part {
            "ffn_up" => Some(GATE_UP),
            _ => super::fused_qkv(part),
        }
    }

    fn hf_model_type(&self) -> Option<&'static str> {
        Some("phi3")
    }
    fn config_from_hf(&self, mut json: serde_json::Value) -> std::result::Result<Config, String> {
        let obj = json.as_object_mut().ok_or("config.json is not an object")?;
        if let Some(kind) = obj
            .get("rope_scaling")
            .filter(|v| !v.is_null())
            .map(|v| v.get("type").or_else(|| v.get("rope_type")).cloned())
        {
            return Err(format!(
                "Phi-3 rope_scaling {} (long-context rope) is not supported; only the default \
                 rope is",
                kind.unwrap_or_default()
            ));
        }
        if obj.get("partial_rotary_factor").and_then(|v| v.as_f64()) == Some(1.0) {
            obj.remove("partial_rotary_factor");
        }
        let window = crate::model::config::take_sliding_window(obj)?;
        let mut cfg: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
        cfg.family = Family::phi3(window, cfg.rope_theta);
        Ok(cfg)
    }
    fn hf_config(
        &self,
        cfg: &Config,
        torch_dtype: &str,
    ) -> std::result::Result<serde_json::Value, String> {
        let window = cfg.family.sliding.map(|s| s.window);
        super::llama_like_hf_config(cfg, "Phi3ForCausalLM", torch_dtype, |obj| {
            obj.insert("sliding_window".into(), serde_json::json!(window));
        })
    }
    fn hf_converts(&self) -> bool {
        true
    }
    fn peft_projections(&self) -> bool {
        false
    }
    fn hf_to_decoder(
        &self,
        cfg: &Config,
        tensors: HashMap<String, Tensor>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        split_fused(cfg, tensors)
    }
    fn decoder_to_hf(
        &self,
        cfg: &Config,
        tensors: HashMap<String, Tensor>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        join_fused(cfg, tensors)
    }

    fn fresh_config(&self, mut base: Config) -> Option<Config> {
        base.family = Family::phi3(None, base.rope_theta);
        Some(base)
    }
}

/// HF tensors → the decoder's names: `qkv_proj` into q, k, v and `gate_up_proj` into gate,
/// up (rows in that order).
fn split_fused(
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
fn join_fused(
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
