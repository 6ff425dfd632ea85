//! GPT-2: learned absolute positions, LayerNorm with biases, multi-head attention from one
//! fused `c_attn`, biases on every projection, an ungated GELU (tanh) MLP, tied head. HF
//! checkpoints store the projections as `Conv1D` weights, (in, out): they are transposed on
//! load and on save.

use std::collections::HashMap;

use candle_core::Tensor;

use super::{Arch, ArchRef};
use crate::model::config::{Activation, Config, Family, Unimplemented};
use crate::model::error::Result;
use crate::model::gguf::GgufFile;

pub struct Gpt2;

impl Family {
    pub fn gpt2() -> Self {
        Self {
            arch: ArchRef(&Gpt2),
            qkv_bias: true,
            activation: Activation::GeluTanh,
            layer_norm: true,
            learned_positions: true,
            dense_bias: true,
            gated_mlp: false,
            ..Self::default()
        }
    }
}

impl Arch for Gpt2 {
    fn name(&self) -> &'static str {
        "gpt2"
    }

    fn gguf_architectures(&self) -> &'static [&'static str] {
        &["gpt2"]
    }
    /// Its fused `attn_qkv` is split by [`Arch::gguf_fused`]'s default.
    fn family_from_gguf(&self, _file: &GgufFile, _cfg: &Config) -> Result<Family> {
        Ok(Family::gpt2())
    }

    fn hf_model_type(&self) -> Option<&'static str> {
        Some("gpt2")
    }
    fn config_from_hf(&self, json: serde_json::Value) -> std::result::Result<Config, String> {
        let get = |key: &str| json.get(key).filter(|v| !v.is_null());
        let int = |key: &str| {
            get(key)
                .and_then(|v| v.as_u64())
                .map(|v| v as usize)
                .ok_or(format!("GPT-2 config.json needs `{key}`"))
        };
        let flag = |key: &str| get(key).and_then(|v| v.as_bool()) == Some(true);
        let activation = match get("activation_function").and_then(|v| v.as_str()) {
            None | Some("gelu_new" | "gelu_pytorch_tanh") => Activation::GeluTanh,
            // The exact GELU (what nanoGPT trains with).
            Some("gelu") => Activation::GeluErf,
            Some(other) => {
                return Err(format!(
                    "GPT-2 activation_function `{other}` is not supported (gelu_new or gelu)"
                ))
            }
        };
        for unsupported in ["scale_attn_by_inverse_layer_idx", "add_cross_attention"] {
            if flag(unsupported) {
                return Err(format!("GPT-2 {unsupported} = true is not supported"));
            }
        }
        if get("scale_attn_weights").and_then(|v| v.as_bool()) == Some(false) {
            return Err("GPT-2 scale_attn_weights = false is not supported".into());
        }
        let hidden = int("n_embd")?;
        let id = |key: &str| get(key).and_then(|v| v.as_u64()).map(|v| v as u32);
        Ok(Config {
            hidden_size: hidden,
            intermediate_size: int("n_inner").unwrap_or(4 * hidden),
            vocab_size: int("vocab_size")?,
            num_hidden_layers: int("n_layer")?,
            num_attention_heads: int("n_head")?,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: get("layer_norm_epsilon")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e-5),
            rope_theta: 10_000.0,
            max_position_embeddings: int("n_positions")?,
            tie_word_embeddings: get("tie_word_embeddings")
                .and_then(|v| v.as_bool())
                .unwrap_or(true),
            bos_token_id: id("bos_token_id"),
            eos_token_id: id("eos_token_id").map(crate::model::config::EosTokenId::One),
            rope_scaling: None,
            rope_freq_factors: None,
            unimplemented: Unimplemented::default(),
            family: Family {
                activation,
                ..Family::gpt2()
            },
        })
    }
    /// The inverse of [`Arch::config_from_hf`] (null ids kept as nulls).
    fn hf_config(
        &self,
        cfg: &Config,
        torch_dtype: &str,
    ) -> std::result::Result<serde_json::Value, String> {
        let mut json = serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.hidden_size,
            "n_inner": cfg.intermediate_size,
            "n_layer": cfg.num_hidden_layers,
            "n_head": cfg.num_attention_heads,
            "n_positions": cfg.max_position_embeddings,
            "n_ctx": cfg.max_position_embeddings,
            "activation_function": match cfg.family.activation {
                Activation::GeluErf => "gelu",
                _ => "gelu_new",
            },
            "layer_norm_epsilon": cfg.rms_norm_eps,
            "tie_word_embeddings": cfg.tie_word_embeddings,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        });
        json["torch_dtype"] = torch_dtype.into();
        Ok(json)
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
        to_decoder(cfg, tensors)
    }
    fn decoder_to_hf(
        &self,
        cfg: &Config,
        tensors: HashMap<String, Tensor>,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        from_decoder(cfg, tensors)
    }

    /// Multi-head attention and a 4× MLP.
    fn fresh_config(&self, mut base: Config) -> Option<Config> {
        base.num_key_value_heads = None;
        base.intermediate_size = 4 * base.hidden_size;
        base.family = Family::gpt2();
        Some(base)
    }
}

/// HF GPT-2 tensors (with or without the `transformer.` prefix) → the decoder's names:
/// Conv1D weights transposed, `c_attn` split into q, k, v; the causal-mask buffers
/// (`attn.bias`, `attn.masked_bias`) dropped.
fn to_decoder(
    cfg: &Config,
    tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let h = cfg.hidden_size;
    let mut out = HashMap::new();
    for (name, t) in tensors {
        let name = name
            .strip_prefix("transformer.")
            .unwrap_or(&name)
            .to_string();
        let (first, rest) = name.split_once('.').unwrap_or((name.as_str(), ""));
        let mapped = match (first, rest) {
            ("wte", "weight") => "model.embed_tokens.weight".to_string(),
            ("wpe", "weight") => "model.embed_positions.weight".to_string(),
            ("ln_f", part) => format!("model.norm.{part}"),
            ("lm_head", "weight") => "lm_head.weight".to_string(),
            ("h", rest) => {
                let (layer, part) = rest.split_once('.').unwrap_or((rest, ""));
                let p = format!("model.layers.{layer}");
                let conv = |t: &Tensor, suffix: &str| -> candle_core::Result<Tensor> {
                    match suffix {
                        "weight" => t.t()?.contiguous(),
                        _ => Ok(t.clone()),
                    }
                };
                match part.rsplit_once('.') {
                    Some(("attn", "bias" | "masked_bias")) => continue,
                    Some(("ln_1", s)) => format!("{p}.input_layernorm.{s}"),
                    Some(("ln_2", s)) => format!("{p}.post_attention_layernorm.{s}"),
                    Some(("attn.c_attn", s)) => {
                        let t = conv(&t, s)?;
                        if t.dim(0)? != 3 * h {
                            candle_core::bail!("{name}: {} rows, expected {}", t.dim(0)?, 3 * h);
                        }
                        for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            out.insert(
                                format!("{p}.self_attn.{proj}.{s}"),
                                t.narrow(0, i * h, h)?.contiguous()?,
                            );
                        }
                        continue;
                    }
                    Some(("attn.c_proj", s)) => {
                        out.insert(format!("{p}.self_attn.o_proj.{s}"), conv(&t, s)?);
                        continue;
                    }
                    Some(("mlp.c_fc", s)) => {
                        out.insert(format!("{p}.mlp.up_proj.{s}"), conv(&t, s)?);
                        continue;
                    }
                    Some(("mlp.c_proj", s)) => {
                        out.insert(format!("{p}.mlp.down_proj.{s}"), conv(&t, s)?);
                        continue;
                    }
                    // Anything else keeps its name and is refused by the name check.
                    _ => format!("transformer.{name}"),
                }
            }
            _ => format!("transformer.{name}"),
        };
        out.insert(mapped, t);
    }
    Ok(out)
}

/// The decoder's names → HF GPT-2 (`transformer.` prefix, Conv1D layout, fused `c_attn`):
/// the inverse of [`to_decoder`].
fn from_decoder(
    cfg: &Config,
    mut tensors: HashMap<String, Tensor>,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut take = |name: &str| {
        tensors
            .remove(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("{name} missing")))
    };
    out.insert(
        "transformer.wte.weight".into(),
        take("model.embed_tokens.weight")?,
    );
    out.insert(
        "transformer.wpe.weight".into(),
        take("model.embed_positions.weight")?,
    );
    for s in ["weight", "bias"] {
        out.insert(
            format!("transformer.ln_f.{s}"),
            take(&format!("model.norm.{s}"))?,
        );
    }
    for l in 0..cfg.num_hidden_layers {
        let (p, h) = (format!("model.layers.{l}"), format!("transformer.h.{l}"));
        for s in ["weight", "bias"] {
            let conv = |t: Tensor| -> candle_core::Result<Tensor> {
                if s == "weight" {
                    t.t()?.contiguous()
                } else {
                    Ok(t)
                }
            };
            out.insert(
                format!("{h}.ln_1.{s}"),
                take(&format!("{p}.input_layernorm.{s}"))?,
            );
            out.insert(
                format!("{h}.ln_2.{s}"),
                take(&format!("{p}.post_attention_layernorm.{s}"))?,
            );
            let qkv = ["q_proj", "k_proj", "v_proj"]
                .iter()
                .map(|proj| take(&format!("{p}.self_attn.{proj}.{s}")))
                .collect::<candle_core::Result<Vec<_>>>()?;
            out.insert(format!("{h}.attn.c_attn.{s}"), conv(Tensor::cat(&qkv, 0)?)?);
            out.insert(
                format!("{h}.attn.c_proj.{s}"),
                conv(take(&format!("{p}.self_attn.o_proj.{s}"))?)?,
            );
            out.insert(
                format!("{h}.mlp.c_fc.{s}"),
                conv(take(&format!("{p}.mlp.up_proj.{s}"))?)?,
            );
            out.insert(
                format!("{h}.mlp.c_proj.{s}"),
                conv(take(&format!("{p}.mlp.down_proj.{s}"))?)?,
            );
        }
    }
    Ok(out)
}
