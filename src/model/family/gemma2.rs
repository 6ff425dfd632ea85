//! Gemma 2: Gemma 3's layers without the q/k norms, with soft-capped attention scores (50)
//! and logits (30), every other layer on a 4096-token sliding window (the local layers use
//! the same rope base), scores scaled by `query_pre_attn_scalar`. HF checkpoints store each
//! norm weight as `w` and multiply by `1 + w`; the decoder (like llama.cpp's GGUF) holds
//! `1 + w`.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use super::{Arch, ArchRef};
use crate::model::config::{Activation, Config, Family, Sliding};
use crate::model::error::Result;
use crate::model::gguf::{shortest_f64, GgufFile};

pub struct Gemma2;

impl Family {
    pub fn gemma2(sliding: Sliding, attn_scalar: f64, attn_cap: f64, final_cap: f64) -> Self {
        Self {
            arch: ArchRef(&Gemma2),
            sandwich_norms: true,
            activation: Activation::GeluTanh,
            embed_scale: true,
            sliding: Some(sliding),
            attn_scalar: Some(attn_scalar),
            attn_softcap: Some(attn_cap).filter(|c| *c > 0.0),
            final_softcap: Some(final_cap).filter(|c| *c > 0.0),
            ..Self::default()
        }
    }
}

impl Arch for Gemma2 {
    fn name(&self) -> &'static str {
        "gemma2"
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["gemma2"]
    }
    /// llama.cpp's defaults where the file is silent (window 4096, every 2nd layer global,
    /// caps 50 and 30, scores scaled by 1/√head_dim except on the 46-layer 27B model:
    /// hidden / heads). Norm weights are stored as `1 + w`, as for Gemma 3.
    fn family_from_gguf(&self, file: &GgufFile, cfg: &Config) -> Result<Family> {
        let window = file
            .md_u32("gemma2.attention.sliding_window")?
            .unwrap_or(4096);
        let every = file
            .md_u32("gemma2.attention.sliding_window_pattern")?
            .unwrap_or(2);
        let local_theta = match file.md_f32("gemma2.rope.freq_base_swa")? {
            Some(t) => shortest_f64(t),
            None => cfg.rope_theta,
        };
        let scalar = if cfg.num_hidden_layers == 46 {
            (cfg.hidden_size / cfg.num_attention_heads) as f64
        } else {
            cfg.head_dim() as f64
        };
        let cap = |key: &str, default: f32| -> Result<f64> {
            Ok(shortest_f64(file.md_f32(key)?.unwrap_or(default)))
        };
        Ok(Family::gemma2(
            Sliding {
                window: window as usize,
                global_every: every as usize,
                local_rope_theta: local_theta,
                tiled: None,
            },
            scalar,
            cap("gemma2.attn_logit_softcapping", 50.0)?,
            cap("gemma2.final_logit_softcapping", 30.0)?,
        ))
    }
    fn gguf_softcaps(&self) -> bool {
        true
    }

    fn hf_model_type(&self) -> Option<&'static str> {
        Some("gemma2")
    }
    fn config_from_hf(&self, mut json: serde_json::Value) -> std::result::Result<Config, String> {
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
        let window = crate::model::config::take_sliding_window(obj)?.unwrap_or(4096);
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
                tiled: None,
            },
            scalar.unwrap_or(cfg.head_dim() as f64),
            attn_cap,
            final_cap,
        );
        Ok(cfg)
    }
    fn hf_config(
        &self,
        cfg: &Config,
        torch_dtype: &str,
    ) -> std::result::Result<serde_json::Value, String> {
        let f = &cfg.family;
        let act = super::hf_activation(f.activation);
        super::llama_like_hf_config(cfg, "Gemma2ForCausalLM", torch_dtype, |obj| {
            let s = f.sliding.map(|s| s.window).unwrap_or(4096);
            obj.insert("hidden_activation".into(), act.into());
            obj.insert("sliding_window".into(), s.into());
            obj.insert(
                "query_pre_attn_scalar".into(),
                serde_json::json!(f.attn_scalar),
            );
            obj.insert(
                "attn_logit_softcapping".into(),
                serde_json::json!(f.attn_softcap),
            );
            obj.insert(
                "final_logit_softcapping".into(),
                serde_json::json!(f.final_softcap),
            );
        })
    }
    fn hf_converts(&self) -> bool {
        true
    }
    fn hf_to_decoder(
        &self,
        _cfg: &Config,
        tensors: HashMap<String, Tensor>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        shift_norms(tensors, false)
    }
    fn decoder_to_hf(
        &self,
        _cfg: &Config,
        tensors: HashMap<String, Tensor>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        shift_norms(tensors, true)
    }

    /// A window of 4096 on every other layer, caps 50 and 30, tied embeddings.
    fn fresh_config(&self, mut base: Config) -> Option<Config> {
        let window = Sliding {
            window: 4096,
            global_every: 2,
            local_rope_theta: base.rope_theta,
            tiled: None,
        };
        base.family = Family::gemma2(window, base.head_dim() as f64, 50.0, 30.0);
        base.tie_word_embeddings = true;
        Some(base)
    }
}

/// HF's norm weights `w` → `1 + w` (added in f32, as HF's `1.0 + weight.float()`); with
/// `back`, the inverse (for saving).
fn shift_norms(
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
