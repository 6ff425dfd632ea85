//! The decoder's configuration: shapes, rope (with its scaling), special ids, and the family
//! switches (data the shared decoder reads; each family's file in [`super::family`] decides
//! them). Its serde form is a Hugging Face llama `config.json`; the other families' files
//! translate their own config.json or GGUF metadata into it.

use serde::{Deserialize, Serialize};

use super::family::ArchRef;

/// Shapes and settings of a decoder (serialized as a llama `config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<EosTokenId>,
    /// `null`/absent, or `{"rope_type": "linear" | "llama3", ...}`; other types refuse to load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Per-frequency divisors from a GGUF's `rope_freqs.weight` (llama.cpp's form of Llama 3's
    /// rope scaling): frequency i is divided by `rope_freq_factors[i]`. No config.json field.
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    /// HF fields this implementation does not have, read only to refuse a config that sets them.
    #[serde(flatten)]
    pub unimplemented: Unimplemented,
    /// Which decoder family, and what in its layers differs from llama's (set by the loader
    /// from `model_type` or the GGUF architecture, never read from config.json itself).
    #[serde(skip)]
    pub family: Family,
}

/// HF config.json fields this implementation does not have: they are read only so that a
/// config that sets them to anything but the llama defaults is refused by [`Config::validate`]
/// (never written back).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Unimplemented {
    #[serde(default, skip_serializing)]
    pub attention_bias: bool,
    #[serde(default, skip_serializing)]
    pub mlp_bias: bool,
    #[serde(default, skip_serializing)]
    pub hidden_act: Option<String>,
    #[serde(default, skip_serializing)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default, skip_serializing)]
    pub sliding_window: Option<serde_json::Value>,
    #[serde(default, skip_serializing)]
    pub quantization_config: Option<serde_json::Value>,
}

/// The switches a family's layers differ by (llama.cpp keys the same switches on its `arch`),
/// set by the family's constructor in its file ([`super::family`]). The default is
/// [`super::family::DEFAULT`]'s: every switch off.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    /// Which family these switches are of (its file in [`super::family`] decided them).
    pub arch: ArchRef,
    /// Biases on the q/k/v projections (Qwen2).
    pub qkv_bias: bool,
    /// RMS norm of each head's query and key before the rotary embedding (Gemma 3).
    pub qk_norm: bool,
    /// That norm after the rotary embedding instead (nanochat).
    pub qk_norm_after_rope: bool,
    /// The rotary embedding turns by −θ (nanochat's `apply_rotary_emb`, kept for its
    /// checkpoints): the frequencies are negated, so cos is unchanged and sin changes sign.
    pub rope_reversed: bool,
    /// Norms on the attention and MLP outputs too, and the MLP's input norm named
    /// `pre_feedforward_layernorm` (Gemma 2/3).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Embeddings multiplied by √hidden_size, rounded to the weights' dtype (Gemma).
    pub embed_scale: bool,
    /// Local layers attend to the last `window` positions (the query's own included), and
    /// use `local_rope_theta`; layer i is global when (i + 1) % `global_every` == 0 (with
    /// `global_every` 0, no layer is: Mistral's window on every layer).
    pub sliding: Option<Sliding>,
    /// Attention scores scaled by 1/√`attn_scalar` instead of 1/√head_dim (Gemma's
    /// `query_pre_attn_scalar`).
    pub attn_scalar: Option<f64>,
    /// Attention scores soft-capped, `cap · tanh(s / cap)`, before the mask (Gemma 2).
    pub attn_softcap: Option<f64>,
    /// Logits soft-capped the same way after the head (Gemma 2).
    pub final_softcap: Option<f64>,
    /// LayerNorm (mean removed, with a bias) in place of RMS norm (GPT-2).
    pub layer_norm: bool,
    /// Learned absolute position embeddings added to the token embeddings, and no rotary
    /// embedding (GPT-2).
    pub learned_positions: bool,
    /// Biases on the attention output and both MLP projections too (GPT-2).
    pub dense_bias: bool,
    /// The MLP is `down(act(gate(x)) · up(x))`; without it, `down(act(up(x)))` (GPT-2).
    pub gated_mlp: bool,
}

impl Default for Family {
    fn default() -> Self {
        Self {
            arch: super::family::DEFAULT,
            qkv_bias: false,
            qk_norm: false,
            qk_norm_after_rope: false,
            rope_reversed: false,
            sandwich_norms: false,
            activation: Activation::Silu,
            embed_scale: false,
            sliding: None,
            attn_scalar: None,
            attn_softcap: None,
            final_softcap: None,
            layer_norm: false,
            learned_positions: false,
            dense_bias: false,
            gated_mlp: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sliding {
    pub window: usize,
    pub global_every: usize,
    pub local_rope_theta: f64,
    /// Which layers are local as a pattern tiled over the layers (in place of `global_every`).
    pub tiled: Option<TiledWindows>,
}

/// A pattern of global and local layers tiled over the layers, the last layer always global
/// (nanochat's `window_pattern`, e.g. `SSSL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TiledWindows {
    /// Bit i: the pattern's character i is global (`L`).
    pub global: u64,
    /// The pattern's length (1 to 64).
    pub len: u8,
    pub last_layer: usize,
}

impl TiledWindows {
    pub fn is_local(&self, layer: usize) -> bool {
        let i = layer % usize::from(self.len.max(1));
        layer != self.last_layer && self.global & (1 << i) == 0
    }
}

impl Sliding {
    /// A window on every layer (no global layer), with the global rope base.
    pub fn every_layer(window: usize, rope_theta: f64) -> Self {
        Self {
            window,
            global_every: 0,
            local_rope_theta: rope_theta,
            tiled: None,
        }
    }
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    #[default]
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
    /// Exact GELU, `x · Φ(x)` with the error function (PyTorch's `nn.GELU()`: nanoGPT).
    GeluErf,
    /// `relu(x)²` (nanochat).
    ReluSquared,
}

impl Activation {
    /// `act(x)` with candle's ops (the differentiable path and every non-fused one).
    pub fn apply(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(x),
            // candle's `gelu` is the tanh approximation, `gelu_erf` the exact one.
            Self::GeluTanh => x.gelu(),
            Self::GeluErf => x.gelu_erf(),
            Self::ReluSquared => x.relu()?.sqr(),
        }
    }
}

impl Family {
    /// Whether layer `i` attends to a sliding window (else to every earlier position).
    pub fn is_local(&self, layer: usize) -> bool {
        self.sliding.is_some_and(|s| match s.tiled {
            Some(tiled) => tiled.is_local(layer),
            None => !(layer + 1).is_multiple_of(s.global_every),
        })
    }
    /// Whether the fused CPU path implements these layers (everything but soft-capping and
    /// GPT-2's LayerNorm, positions, biases and ungated MLP: those run on candle's ops).
    pub fn fused_supported(&self) -> bool {
        self.attn_softcap.is_none()
            && self.final_softcap.is_none()
            && !self.layer_norm
            && !self.learned_positions
            && !self.dense_bias
            && self.gated_mlp
            && !self.qk_norm_after_rope
            && !self.rope_reversed
    }
}

/// Removes a config.json's `sliding_window` and reads it: `None` when absent or null, else a
/// positive window (anything else is refused: a window of 0 would mask every key).
pub fn take_sliding_window(
    obj: &mut serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<Option<usize>, String> {
    match obj.remove("sliding_window") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|w| *w > 0)
            .map(|w| Some(w as usize))
            .ok_or_else(|| "sliding_window must be a positive integer or null".into()),
    }
}

/// Rope scaling, as `rope_scaling` describes it in a config.json.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency divided by it).
    Linear { factor: f64 },
    /// Llama 3.1's: low frequencies divided by `factor`, high ones kept, a smooth ramp between
    /// (HF `_compute_llama3_parameters`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// Parses `rope_scaling`; `None` for absent, null or type `default`.
    pub fn parse(v: Option<&serde_json::Value>) -> std::result::Result<Option<Self>, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else {
            return Ok(None);
        };
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .ok_or("rope_scaling has no rope_type")?;
        let num = |key: &str| {
            v.get(key)
                .and_then(|x| x.as_f64())
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or(format!("rope_scaling ({kind}) needs a positive `{key}`"))
        };
        match kind {
            "default" => Ok(None),
            "linear" => Ok(Some(Self::Linear {
                factor: num("factor")?,
            })),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(
                        "rope_scaling (llama3) needs high_freq_factor > low_freq_factor".into(),
                    );
                }
                Ok(Some(Self::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }))
            }
            other => Err(format!(
                "rope_scaling type `{other}` is not supported (supported: default, linear, llama3)"
            )),
        }
    }

    /// Applies the scaling to one inverse frequency.
    fn apply(self, inv_freq: f64) -> f64 {
        match self {
            Self::Linear { factor } => inv_freq / factor,
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let wavelen = std::f64::consts::TAU / inv_freq;
                if wavelen < old / high_freq_factor {
                    inv_freq
                } else if wavelen > old / low_freq_factor {
                    inv_freq / factor
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

/// `eos_token_id` is a single id or a list in HF configs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EosTokenId {
    One(u32),
    Many(Vec<u32>),
}

impl EosTokenId {
    pub fn ids(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}

impl Config {
    /// A small llama for tests and from-scratch training (`--config tiny`).
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            hidden_size: 64,
            intermediate_size: 128,
            vocab_size,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 512,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            rope_scaling: None,
            rope_freq_factors: None,
            unimplemented: Unimplemented::default(),
            family: Family::default(),
        }
    }

    /// [`Self::tiny`] of another family (`--arch`): GPT-2's is multi-head with a 4× MLP.
    pub fn tiny_of(arch: &str, vocab_size: usize) -> std::result::Result<Self, String> {
        Self::tiny(vocab_size).with_arch(arch)
    }
    /// [`Self::small`] of another family (`--arch`).
    pub fn small_of(arch: &str, vocab_size: usize) -> std::result::Result<Self, String> {
        Self::small(vocab_size).with_arch(arch)
    }

    /// The same size in another family, with that family's usual settings.
    fn with_arch(self, arch: &str) -> std::result::Result<Self, String> {
        super::family::by_name(arch)
            .and_then(|a| a.fresh_config(self))
            .ok_or_else(|| {
                let names = super::family::fresh_names();
                format!("--arch {arch}: expected {}", super::family::or_list(&names))
            })
    }

    /// A SmolLM-shaped model of ~30M parameters (`--config small`).
    pub fn small(vocab_size: usize) -> Self {
        Self {
            hidden_size: 384,
            intermediate_size: 1024,
            num_hidden_layers: 6,
            num_attention_heads: 6,
            num_key_value_heads: Some(2),
            max_position_embeddings: 2048,
            rope_theta: 100_000.0,
            ..Self::tiny(vocab_size)
        }
    }

    pub fn n_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// The rotary inverse frequencies θ_i = base^(−2i/d), with the configured scaling and any
    /// GGUF frequency factors applied (computed in f64, rounded once to f32).
    pub fn rope_inv_freq(&self) -> std::result::Result<Vec<f32>, String> {
        let hd = self.head_dim();
        let scaling = RopeScaling::parse(self.rope_scaling.as_ref())?;
        let factors = self.rope_freq_factors.as_deref();
        if let Some(f) = factors {
            if f.len() != hd / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(format!(
                    "rope_freqs has {} factors, expected {} positive ones",
                    f.len(),
                    hd / 2
                ));
            }
        }
        Ok((0..hd / 2)
            .map(|i| {
                let mut f = 1.0 / self.rope_theta.powf(2.0 * i as f64 / hd as f64);
                if let Some(s) = scaling {
                    f = s.apply(f);
                }
                if let Some(factors) = factors {
                    f /= factors[i] as f64;
                }
                if self.family.rope_reversed {
                    f = -f;
                }
                f as f32
            })
            .collect())
    }

    /// The same shapes with another rope base and no scaling: the rope of a family's local
    /// (sliding-window) layers, which scaling never applies to (Gemma 3).
    pub fn with_rope_theta(&self, theta: f64) -> Self {
        Self {
            rope_theta: theta,
            rope_scaling: None,
            rope_freq_factors: None,
            ..self.clone()
        }
    }

    /// Refuses every config feature this llama does not implement, naming it: a model either
    /// loads exactly or does not load.
    fn check_supported(&self) -> std::result::Result<(), String> {
        let u = &self.unimplemented;
        let unsupported = |what: &str| {
            Err(format!(
                "{what} is not supported by the llama implementation"
            ))
        };
        if u.attention_bias {
            return unsupported("attention_bias = true (biases on q/k/v/o)");
        }
        if u.mlp_bias {
            return unsupported("mlp_bias = true (biases on the MLP projections)");
        }
        if let Some(act) = u.hidden_act.as_deref().filter(|a| *a != "silu") {
            return unsupported(&format!("hidden_act `{act}` (only silu)"));
        }
        if u.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return unsupported("partial_rotary_factor != 1");
        }
        if u.sliding_window.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("sliding_window attention");
        }
        if u.quantization_config.is_some() {
            return unsupported("quantization_config (pre-quantized safetensors: GPTQ, AWQ, ...)");
        }
        RopeScaling::parse(self.rope_scaling.as_ref())?;
        Ok(())
    }

    /// Rejects shapes that would otherwise fail deep inside a matmul, and unsupported features.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.check_supported()?;
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.n_kv_heads() == 0 || !self.num_attention_heads.is_multiple_of(self.n_kv_heads()) {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.n_kv_heads()
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim ({}) must be even", self.head_dim()));
        }
        Ok(())
    }
}
