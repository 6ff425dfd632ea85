//! Model families: one file each saying everything that is specific to it, and the one table,
//! [`ARCHS`], that maps architecture names to them.
//!
//! A family's file holds an [`Arch`]: how it reads its hyper-parameters from a GGUF's metadata
//! and from `config.json`, its tensor names and layouts in both (fused, transposed, shifted),
//! the `config.json` written for a trained model, the settings of a model trained from
//! scratch, and the constructor of its [`Family`] (the per-layer switches the shared decoder
//! reads: norms, attention variant, rope, MLP, soft-caps, scalings). Everything shared
//! (attention, norms, rope, KV cache, packed matmul, the GGUF → HF tensor names common to
//! llama.cpp's architectures) stays in `super`.
//!
//! Adding a family: its file here, one row of [`ARCHS`], and its tests.

use std::collections::HashMap;

use candle_core::Tensor;

use super::config::{Activation, Config, Family};
use super::error::{ModelError, Result};
use super::gguf::GgufFile;

pub mod gemma2;
pub mod gemma3;
pub mod gpt2;
pub mod llama;
pub mod mistral;
pub mod nanochat;
pub mod phi3;
pub mod qwen2;

/// Every supported family. Every list of supported names (GGUF architectures, HF
/// `model_type`s, `--arch`, and the error messages naming them) is read from here, in this
/// order.
pub static ARCHS: &[&dyn Arch] = &[
    &llama::Llama,
    &mistral::Mistral,
    &qwen2::Qwen2,
    &phi3::Phi3,
    &gemma2::Gemma2,
    &gemma3::Gemma3,
    &gpt2::Gpt2,
    &nanochat::Nanochat,
];

/// The family of a config that names none (a `config.json` read as it is, `--config FILE`,
/// [`Family::default`]): plain decoder layers, every switch off.
pub const DEFAULT: ArchRef = ArchRef(&llama::Llama);

/// What a family does differently. Every method but [`Arch::name`] has the default of a family
/// without that form or that difference.
pub trait Arch: Sync {
    /// Its name: `--arch`, the architecture reported for a Hugging Face model, error messages.
    fn name(&self) -> &'static str;

    /// The GGUF `general.architecture` values it reads (none: llama.cpp has no form of it).
    fn gguf_architectures(&self) -> &'static [&'static str] {
        &[]
    }
    /// Its switches from the GGUF metadata (`cfg`: the shapes, already read).
    fn family_from_gguf(&self, _file: &GgufFile, _cfg: &Config) -> Result<Family> {
        Err(ModelError::Config(format!(
            "{} models are not read from GGUF files",
            self.name()
        )))
    }
    /// Whether its GGUF metadata may set logit soft-caps (any other family's are refused).
    fn gguf_softcaps(&self) -> bool {
        false
    }
    /// Whether llama.cpp's converter permuted its q/k rows for the interleaved rope
    /// (`LlamaModel.permute`), so that the reader undoes it; other families are written as
    /// they are.
    fn gguf_qk_permuted(&self) -> bool {
        false
    }
    /// The projections (HF names under `model.layers.N.`) a fused GGUF tensor `blk.N.<part>`
    /// holds, in row order; `None` for a tensor that is not fused.
    fn gguf_fused(&self, part: &str) -> Option<&'static [(&'static str, Rows)]> {
        fused_qkv(part)
    }

    /// Its Hugging Face `model_type` (none: no Hugging Face directory of it is read or
    /// written, so it is not fine-tuned either: a fine-tune's result is one).
    fn hf_model_type(&self) -> Option<&'static str> {
        None
    }
    /// A `config.json` of its `model_type` as a decoder [`Config`] (the error: why not).
    fn config_from_hf(&self, _json: serde_json::Value) -> std::result::Result<Config, String> {
        Err(format!(
            "{} models are not read from config.json",
            self.name()
        ))
    }
    /// The `config.json` of a model of this family (written for trained models).
    fn hf_config(
        &self,
        _cfg: &Config,
        _torch_dtype: &str,
    ) -> std::result::Result<serde_json::Value, String> {
        Err(format!(
            "writing a {} model as a Hugging Face directory is not supported",
            self.name()
        ))
    }
    /// Whether its Hugging Face projections are the decoder's, one per matrix (`q_proj`, …,
    /// `down_proj`), as PEFT names LoRA adapters by them: false where HF fuses or transposes
    /// them.
    fn peft_projections(&self) -> bool {
        true
    }
    /// Whether its Hugging Face tensors differ from the decoder's names and layouts (then they
    /// are read into memory and converted by [`Arch::hf_to_decoder`], not memory-mapped).
    fn hf_converts(&self) -> bool {
        false
    }
    /// Its Hugging Face tensors → the decoder's names and layouts.
    fn hf_to_decoder(
        &self,
        _cfg: &Config,
        tensors: HashMap<String, Tensor>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        Ok(tensors)
    }
    /// The decoder's tensors → its Hugging Face names and layouts (the inverse).
    fn decoder_to_hf(
        &self,
        _cfg: &Config,
        tensors: HashMap<String, Tensor>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        Ok(tensors)
    }

    /// `base` (a size, `--config tiny|small`) as a model of this family to train from scratch,
    /// with the family's usual settings; `None` where it cannot be trained from scratch.
    fn fresh_config(&self, _base: Config) -> Option<Config> {
        None
    }
}

/// A family, as [`Family`] holds it: compared and printed by name.
#[derive(Clone, Copy)]
pub struct ArchRef(pub &'static dyn Arch);

impl std::ops::Deref for ArchRef {
    type Target = dyn Arch;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl PartialEq for ArchRef {
    fn eq(&self, other: &Self) -> bool {
        self.name() == other.name()
    }
}

impl Eq for ArchRef {}

impl std::fmt::Debug for ArchRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The family a GGUF `general.architecture` names.
pub fn by_gguf_architecture(name: &str) -> Option<ArchRef> {
    find(|a| a.gguf_architectures().contains(&name))
}

/// The family a `config.json`'s `model_type` names.
pub fn by_model_type(model_type: &str) -> Option<ArchRef> {
    find(|a| a.hf_model_type() == Some(model_type))
}

/// The family of this name (`--arch`).
pub fn by_name(name: &str) -> Option<ArchRef> {
    find(|a| a.name() == name)
}

fn find(pred: impl Fn(&dyn Arch) -> bool) -> Option<ArchRef> {
    ARCHS.iter().find(|a| pred(**a)).map(|a| ArchRef(*a))
}

/// Every GGUF `general.architecture` read.
pub fn gguf_architectures() -> Vec<&'static str> {
    ARCHS
        .iter()
        .flat_map(|a| a.gguf_architectures().iter().copied())
        .collect()
}

/// Every `config.json` `model_type` read.
pub fn hf_model_types() -> Vec<&'static str> {
    ARCHS.iter().filter_map(|a| a.hf_model_type()).collect()
}

/// The families that train from scratch (`--arch`).
pub fn fresh_names() -> Vec<&'static str> {
    ARCHS
        .iter()
        .filter(|a| a.fresh_config(Config::tiny(1)).is_some())
        .map(|a| a.name())
        .collect()
}

/// How many rows of a fused tensor a projection takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// The query projection: heads × head_dim.
    Q,
    /// A key or value projection: kv heads × head_dim.
    Kv,
    /// A gate or up projection: intermediate_size.
    Intermediate,
}

impl Rows {
    pub fn of(self, cfg: &Config) -> usize {
        match self {
            Self::Q => cfg.num_attention_heads * cfg.head_dim(),
            Self::Kv => cfg.n_kv_heads() * cfg.head_dim(),
            Self::Intermediate => cfg.intermediate_size,
        }
    }
}

/// llama.cpp's fused q/k/v, `attn_qkv` (GPT-2 and Phi-3 are written so): the default of
/// [`Arch::gguf_fused`], so every family's reader splits it.
pub fn fused_qkv(part: &str) -> Option<&'static [(&'static str, Rows)]> {
    const QKV: &[(&str, Rows)] = &[
        ("self_attn.q_proj", Rows::Q),
        ("self_attn.k_proj", Rows::Kv),
        ("self_attn.v_proj", Rows::Kv),
    ];
    (part == "attn_qkv").then_some(QKV)
}

/// HF's name of an MLP activation (`hidden_act`).
pub fn hf_activation(activation: Activation) -> &'static str {
    match activation {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_pytorch_tanh",
        Activation::GeluErf => "gelu",
        Activation::ReluSquared => "relu2",
    }
}

/// The `config.json` of a family whose HF config is llama's plus a few fields: `cfg`'s own
/// serde form with the model type, `class` (HF's `architectures`), the dtype and the
/// switches HF's llama reads, then `extra` (the family's own fields), nulls dropped.
pub fn llama_like_hf_config(
    cfg: &Config,
    class: &str,
    torch_dtype: &str,
    extra: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> std::result::Result<serde_json::Value, String> {
    let f = &cfg.family;
    let mut json = serde_json::to_value(cfg).map_err(|e| e.to_string())?;
    let obj = json.as_object_mut().ok_or("config is not an object")?;
    obj.insert("model_type".into(), f.arch.name().into());
    obj.insert("architectures".into(), serde_json::json!([class]));
    obj.insert("torch_dtype".into(), torch_dtype.into());
    obj.insert("hidden_act".into(), hf_activation(f.activation).into());
    obj.insert("attention_bias".into(), f.qkv_bias.into());
    obj.insert("mlp_bias".into(), false.into());
    obj.insert("initializer_range".into(), 0.02.into());
    obj.insert("use_cache".into(), true.into());
    extra(obj);
    obj.retain(|_, v| !v.is_null());
    Ok(json)
}

/// `a, b or c`.
pub fn or_list(names: &[&str]) -> String {
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => (*last).to_string(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_finds_one_family() {
        let mut names: Vec<&str> = ARCHS.iter().map(|a| a.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ARCHS.len(), "family names must be distinct");
        let mut gguf = gguf_architectures();
        gguf.sort_unstable();
        gguf.dedup();
        assert_eq!(gguf.len(), gguf_architectures().len());
        for a in ARCHS {
            assert_eq!(by_name(a.name()).map(|f| f.name()), Some(a.name()));
            for g in a.gguf_architectures() {
                assert_eq!(by_gguf_architecture(g).map(|f| f.name()), Some(a.name()));
            }
            if let Some(t) = a.hf_model_type() {
                assert_eq!(by_model_type(t).map(|f| f.name()), Some(a.name()));
            }
        }
        assert!(by_name("olmo2").is_none() && by_gguf_architecture("mistral").is_none());
    }

    /// The lists (and so the error messages) read from the table, in its order.
    #[test]
    fn supported_lists() {
        assert_eq!(
            gguf_architectures(),
            ["llama", "qwen2", "phi3", "gemma2", "gemma3", "gpt2"]
        );
        assert_eq!(
            hf_model_types(),
            ["llama", "mistral", "qwen2", "phi3", "gemma2", "gpt2"]
        );
        assert_eq!(
            or_list(&fresh_names()),
            "llama, mistral, qwen2, phi3, gemma2 or gpt2"
        );
        assert_eq!(DEFAULT.name(), "llama");
    }

    /// A family's constructor names its own [`Arch`], and the default family is the default
    /// arch's with every switch off.
    #[test]
    fn constructors_name_their_family() {
        assert_eq!(Family::default().arch, DEFAULT);
        assert_eq!(Family::qwen2().arch.name(), "qwen2");
        assert_eq!(Family::gpt2().arch.name(), "gpt2");
        assert_eq!(Family::phi3(None, 1e4).arch.name(), "phi3");
        assert_ne!(Family::mistral(None, 1e4), Family::phi3(None, 1e4));
        assert_eq!(
            Family::mistral(Some(8), 1e4).sliding,
            Family::phi3(Some(8), 1e4).sliding
        );
    }
}
