//! Mistral: llama's layers, with a sliding window on every layer in v0.1 (`sliding_window`;
//! null from v0.2 on). llama.cpp converts Mistral to its `llama` architecture, which has no
//! window: such GGUFs load as llama (so this family reads no GGUF architecture).

use super::{Arch, ArchRef};
use crate::model::config::{Config, Family, Sliding};

pub struct Mistral;

impl Family {
    /// Llama's layers with a sliding window on every layer (`None`: a Mistral without one,
    /// as v0.2 and later are).
    pub fn mistral(window: Option<usize>, rope_theta: f64) -> Self {
        Self {
            arch: ArchRef(&Mistral),
            sliding: window.map(|w| Sliding::every_layer(w, rope_theta)),
            ..Self::default()
        }
    }
}

impl Arch for Mistral {
    fn name(&self) -> &'static str {
        "mistral"
    }

    fn hf_model_type(&self) -> Option<&'static str> {
        Some("mistral")
    }
    fn config_from_hf(&self, mut json: serde_json::Value) -> Result<Config, String> {
        let obj = json.as_object_mut().ok_or("config.json is not an object")?;
        let window = crate::model::config::take_sliding_window(obj)?;
        let mut cfg: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
        cfg.family = Family::mistral(window, cfg.rope_theta);
        Ok(cfg)
    }
    fn hf_config(&self, cfg: &Config, torch_dtype: &str) -> Result<serde_json::Value, String> {
        let window = cfg.family.sliding.map(|s| s.window);
        super::llama_like_hf_config(cfg, "MistralForCausalLM", torch_dtype, |obj| {
            obj.insert("sliding_window".into(), serde_json::json!(window));
        })
    }

    fn fresh_config(&self, mut base: Config) -> Option<Config> {
        base.family = Family::mistral(None, base.rope_theta);
        Some(base)
    }
}
