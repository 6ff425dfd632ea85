//! The llama family (Llama 2/3, SmolLM, TinyLlama, ...): the decoder's plain layers, every
//! switch of [`Family`] off, and a `config.json` that is [`Config`]'s own serde form. llama.cpp
//! writes Mistral, TinyLlama and Llama 2/3 alike as its `llama` architecture, with q/k rows
//! permuted for its interleaved rope.

use super::Arch;
use crate::model::config::{Config, Family};
use crate::model::error::Result;
use crate::model::gguf::GgufFile;

pub struct Llama;

impl Family {
    pub fn llama() -> Self {
        Self::default()
    }
}

impl Arch for Llama {
    fn name(&self) -> &'static str {
        "llama"
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["llama"]
    }
    fn family_from_gguf(&self, _file: &GgufFile, _cfg: &Config) -> Result<Family> {
        Ok(Family::llama())
    }
    fn gguf_qk_permuted(&self) -> bool {
        true
    }

    fn hf_model_type(&self) -> Option<&'static str> {
        Some("llama")
    }
    fn config_from_hf(&self, json: serde_json::Value) -> std::result::Result<Config, String> {
        serde_json::from_value::<Config>(json).map_err(|e| e.to_string())
    }
    fn hf_config(
        &self,
        cfg: &Config,
        torch_dtype: &str,
    ) -> std::result::Result<serde_json::Value, String> {
        super::llama_like_hf_config(cfg, "LlamaForCausalLM", torch_dtype, |_| {})
    }

    fn fresh_config(&self, mut base: Config) -> Option<Config> {
        base.family = Family::llama();
        Some(base)
    }
}
