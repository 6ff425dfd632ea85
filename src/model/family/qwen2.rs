//! Qwen2 (Qwen2, Qwen2.5, Qwen2.5-Coder): llama's layers with biases on the q/k/v projections
//! (none on o), NeoX rope whose q/k rows llama.cpp's converter leaves unpermuted, and a
//! byte-level BPE tokenizer with its own pre-tokenizer (`pre = qwen2`, in the tokenizer).

use super::{Arch, ArchRef};
use crate::model::config::{Config, Family};
use crate::model::error::Result;
use crate::model::gguf::GgufFile;

pub struct Qwen2;

impl Family {
    pub fn qwen2() -> Self {
        Self {
            arch: ArchRef(&Qwen2),
            qkv_bias: true,
            ..Self::default()
        }
    }
}

impl Arch for Qwen2 {
    fn name(&self) -> &'static str {
        "qwen2"
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["qwen2"]
    }
    fn family_from_gguf(&self, _file: &GgufFile, _cfg: &Config) -> Result<Family> {
        Ok(Family::qwen2())
    }

    fn hf_model_type(&self) -> Option<&'static str> {
        Some("qwen2")
    }
    /// Qwen2's sliding window is only used with `use_sliding_window: true` (refused: not
    /// implemented); otherwise its `sliding_window`/`max_window_layers` fields are inert and
    /// dropped.
    fn config_from_hf(&self, mut json: serde_json::Value) -> std::result::Result<Config, String> {
        let obj = json.as_object_mut().ok_or("config.json is not an object")?;
        if obj.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) {
            return Err(
                "use_sliding_window = true (Qwen2 sliding-window attention) is not supported"
                    .into(),
            );
        }
        for inert in ["use_sliding_window", "sliding_window", "max_window_layers"] {
            obj.remove(inert);
        }
        let mut cfg: Config = serde_json::from_value(json).map_err(|e| e.to_string())?;
        cfg.family = Family::qwen2();
        Ok(cfg)
    }
    /// Llama's, without `attention_bias` (Qwen2's q/k/v biases are implied by its type).
    fn hf_config(
        &self,
        cfg: &Config,
        torch_dtype: &str,
    ) -> std::result::Result<serde_json::Value, String> {
        super::llama_like_hf_config(cfg, "Qwen2ForCausalLM", torch_dtype, |obj| {
            obj.remove("attention_bias");
        })
    }

    fn fresh_config(&self, mut base: Config) -> Option<Config> {
        base.family = Family::qwen2();
        Some(base)
    }
}
