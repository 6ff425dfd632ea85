//! The llama family (Llama 2/3, SmolLM, TinyLlama, ...), written for both inference and training.
//!
//! candle-transformers' stock llama cannot train: its fused rms_norm, softmax and rope have no
//! backward pass (gradients silently reach only the embeddings) and it returns logits for the
//! last position only. This file keeps one set of weights and two forward paths:
//! - [`Llama::forward`]: fused kernels, a KV cache, logits only for the positions asked for;
//! - [`Llama::forward_train`]: every op differentiable, logits for every position.
//!
//! A test proves that both paths give the same logits.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// Hugging Face `config.json` fields of a `LlamaForCausalLM`.
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
    /// HF fields this implementation does not have: they are read only so that a config that
    /// sets them to anything but the llama defaults is refused by [`Config::validate`].
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
            attention_bias: false,
            mlp_bias: false,
            hidden_act: None,
            partial_rotary_factor: None,
            sliding_window: None,
            quantization_config: None,
        }
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
                f as f32
            })
            .collect())
    }

    /// Refuses every config feature this llama does not implement, naming it: a model either
    /// loads exactly or does not load.
    fn check_supported(&self) -> std::result::Result<(), String> {
        let unsupported = |what: &str| {
            Err(format!(
                "{what} is not supported by the llama implementation"
            ))
        };
        if self.attention_bias {
            return unsupported("attention_bias = true (biases on q/k/v/o)");
        }
        if self.mlp_bias {
            return unsupported("mlp_bias = true (biases on the MLP projections)");
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return unsupported(&format!("hidden_act `{act}` (only silu)"));
        }
        if self.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return unsupported("partial_rotary_factor != 1");
        }
        if self.sliding_window.as_ref().is_some_and(|v| !v.is_null()) {
            return unsupported("sliding_window attention");
        }
        if self.quantization_config.is_some() {
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

/// Initialisation of fresh weights (HF's `initializer_range` = 0.02).
const INIT_WEIGHT: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// A projection whose weight is dense (any float dtype), kept in a GGUF quantized format, or
/// dense plus packed blocks for the exact short-input kernel.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    Quantized(QMatMul),
    Packed(
        candle_nn::Linear,
        std::sync::Arc<super::packed::PackedMatrix>,
    ),
}

impl Linear {
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, None))
    }
    fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        // The init hint only matters when training from scratch (a VarMap-backed builder).
        Ok(Self::dense(vb.get_with_hints(
            (out_dim, in_dim),
            "weight",
            INIT_WEIGHT,
        )?))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(xs),
            Self::Quantized(q) => q.forward(xs),
            Self::Packed(dense, packed) => {
                let dims = xs.dims().to_vec();
                let cols = dims.last().copied().unwrap_or(0);
                let n = xs.elem_count() / cols.max(1);
                let usable = n <= super::packed::MAX_ROWS
                    && xs.dtype() == DType::F32
                    && xs.device().is_cpu()
                    && cols == packed.cols()
                    && !xs.track_op();
                if !usable {
                    return dense.forward(xs);
                }
                let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
                let y = packed.matmul(&x, n);
                let mut out_dims = dims;
                if let Some(last) = out_dims.last_mut() {
                    *last = packed.rows();
                }
                Tensor::from_vec(y, out_dims, xs.device())
            }
        }
    }
}

/// A prefilled sequence: its KV cache and the logits of its last position.
pub type Prefilled = (Cache, Vec<f32>);

/// The KV cache of one sequence, per layer in one of two forms: candle tensors (b, n_kv, t,
/// head_dim) for candle's ops, or host vectors the fused CPU path appends to in place. A layer
/// may hold both only while they agree: whichever path appends clears the other form, and a
/// path that finds only the other form converts it once.
#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub(super) kvs: Vec<Option<(Tensor, Tensor)>>,
    pub(super) host: Vec<Option<HostKv>>,
    pub(super) len: usize,
}

/// One layer's keys and values for the fused path, position-major: (positions, n_kv,
/// head_dim). Shared copy-on-write, so caching a sequence (prefix cache, a truncated view)
/// copies nothing until it is appended to.
#[derive(Debug, Clone)]
pub(super) struct HostKv {
    pub k: std::sync::Arc<Vec<f32>>,
    pub v: std::sync::Arc<Vec<f32>>,
    /// Positions in use (the vectors may hold more: a truncated view of a longer sequence).
    pub len: usize,
}

impl HostKv {
    /// Appends `k`/`v` rows of `stride` = n_kv · head_dim values each: in place when this is
    /// the vectors' only owner and nothing follows `len`, else into fresh copies.
    pub(super) fn append(&mut self, k: &[f32], v: &[f32], stride: usize) {
        let keep = self.len * stride;
        for (store, new) in [(&mut self.k, k), (&mut self.v, v)] {
            match std::sync::Arc::get_mut(store) {
                Some(vec) if vec.len() == keep => vec.extend_from_slice(new),
                _ => {
                    let mut fresh = Vec::with_capacity((keep + new.len()).next_power_of_two());
                    fresh.extend_from_slice(&store[..keep]);
                    fresh.extend_from_slice(new);
                    *store = std::sync::Arc::new(fresh);
                }
            }
        }
        self.len += k.len() / stride;
    }
}

impl Cache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            kvs: vec![None; n_layers],
            host: vec![None; n_layers],
            len: 0,
        }
    }
    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The cache of batch row `row`, first `len` positions: one sequence out of a batched
    /// prefill. Copied (≈ 46 KB per position for the default model) rather than a view, so that
    /// keeping it — e.g. in the prefix cache — does not keep the whole batch's tensors alive.
    pub fn row(&self, row: usize, len: usize) -> candle_core::Result<Self> {
        if len > self.len {
            candle_core::bail!("cannot take {len} positions of a cache of {}", self.len);
        }
        if row == 0 && self.host.iter().any(Option::is_some) {
            // A single sequence's cache (only batched prefills have other rows).
            return self.truncated(len);
        }
        let kvs = self
            .kvs
            .iter()
            .map(|kv| match kv {
                Some((k, v)) => Ok(Some((
                    k.narrow(0, row, 1)?.narrow(2, 0, len)?.force_contiguous()?,
                    v.narrow(0, row, 1)?.narrow(2, 0, len)?.force_contiguous()?,
                ))),
                None => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            host: vec![None; self.kvs.len()],
            kvs,
            len,
        })
    }

    /// The cache of the first `len` positions (views, no copy).
    pub fn truncated(&self, len: usize) -> candle_core::Result<Self> {
        if len > self.len {
            candle_core::bail!("cannot truncate a cache of {} to {len}", self.len);
        }
        let kvs = self
            .kvs
            .iter()
            .map(|kv| match kv {
                Some((k, v)) => Ok(Some((k.narrow(2, 0, len)?, v.narrow(2, 0, len)?))),
                None => Ok(None),
            })
            .collect::<candle_core::Result<_>>()?;
        let host = self
            .host
            .iter()
            .map(|h| {
                h.as_ref().map(|h| HostKv {
                    k: h.k.clone(),
                    v: h.v.clone(),
                    len,
                })
            })
            .collect();
        Ok(Self { kvs, host, len })
    }

    /// Layer `layer` as host vectors holding this cache's `len` positions (converted from the
    /// tensors if that is the form it is in), for the fused path.
    pub(super) fn host_layer(
        &mut self,
        layer: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> candle_core::Result<&mut HostKv> {
        self.fit(layer + 1);
        let len = self.len;
        let fresh = match (&self.host[layer], &self.kvs[layer]) {
            (Some(h), _) if h.len == len => None,
            (_, Some((k, v))) if len > 0 => {
                let to_host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    if t.dims() != [1, n_kv, len, head_dim] {
                        candle_core::bail!("KV cache of shape {:?} for {len} positions", t.dims());
                    }
                    t.squeeze(0)?
                        .transpose(0, 1)?
                        .flatten_all()?
                        .to_vec1::<f32>()
                };
                Some(HostKv {
                    k: std::sync::Arc::new(to_host(k)?),
                    v: std::sync::Arc::new(to_host(v)?),
                    len,
                })
            }
            _ if len == 0 => Some(HostKv {
                k: Default::default(),
                v: Default::default(),
                len: 0,
            }),
            _ => candle_core::bail!("KV cache missing for {len} cached positions"),
        };
        if let Some(h) = fresh {
            self.host[layer] = Some(h);
        }
        self.host[layer]
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("KV cache missing".into()))
    }

    /// Before candle's ops append to layer `layer`: its tensors, converted from the host
    /// vectors if that is the form it is in. The host form is dropped (it is about to be stale).
    fn tensors_for_candle(
        &mut self,
        layer: usize,
        n_kv: usize,
        head_dim: usize,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<()> {
        self.fit(layer + 1);
        if let Some(h) = self.host[layer].take() {
            let stale = !matches!(&self.kvs[layer], Some((k, _)) if k.dim(2)? == self.len);
            if stale && self.len > 0 {
                let n = self.len * n_kv * head_dim;
                let to_tensor = |data: &[f32]| -> candle_core::Result<Tensor> {
                    Tensor::from_slice(&data[..n], (1, self.len, n_kv, head_dim), device)?
                        .transpose(1, 2)?
                        .contiguous()?
                        .to_dtype(dtype)
                };
                self.kvs[layer] = Some((to_tensor(&h.k)?, to_tensor(&h.v)?));
            }
        }
        Ok(())
    }

    fn fit(&mut self, n_layers: usize) {
        if self.kvs.len() < n_layers {
            self.kvs.resize(n_layers, None);
        }
        if self.host.len() < n_layers {
            self.host.resize(n_layers, None);
        }
    }
}

#[derive(Debug, Clone)]
struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    fn new(cfg: &Config, dtype: DType, dev: &Device) -> candle_core::Result<Self> {
        let inv_freq = cfg.rope_inv_freq().map_err(candle_core::Error::Msg)?;
        let n = inv_freq.len();
        let inv_freq = Tensor::from_vec(inv_freq, (1, n), dev)?;
        let positions = Tensor::arange(0u32, cfg.max_position_embeddings as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((cfg.max_position_embeddings, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    fn apply(
        &self,
        x: &Tensor,
        offset: usize,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        let (_b, _h, t, _d) = x.dims4()?;
        let cos = self.cos.narrow(0, offset, t)?;
        let sin = self.sin.narrow(0, offset, t)?;
        if differentiable {
            candle_nn::rotary_emb::rope_slow(x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &cos, &sin)
        }
    }
}

#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        if differentiable {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)
        } else {
            candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), h, nh * hd)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, nkv * hd)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, nkv * hd)?,
            o_proj: Linear::load(vb.pp("o_proj"), nh * hd, h)?,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        mask: Option<&Tensor>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        offset: usize,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let shape = |n| (b, t, n, self.head_dim);
        let q = self
            .q_proj
            .forward(x)?
            .reshape(shape(self.n_head))?
            .transpose(1, 2)?;
        let k = self
            .k_proj
            .forward(x)?
            .reshape(shape(self.n_kv_head))?
            .transpose(1, 2)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape(shape(self.n_kv_head))?
            .transpose(1, 2)?;
        let q = rope.apply(&q, offset, differentiable)?;
        let k = rope.apply(&k, offset, differentiable)?;
        let v = if differentiable { v } else { v.contiguous()? };

        let (k, v) = match kv {
            Some(slot) => {
                let (k, v) = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
            None => (k, v),
        };

        let n_rep = self.n_head / self.n_kv_head;
        let k = repeat_kv(k, n_rep)?;
        let v = repeat_kv(v, n_rep)?;
        let att = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = if differentiable {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.matmul(&v.contiguous()?)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.n_head * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}

fn repeat_kv(xs: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs);
    }
    let (b, n_kv, t, hd) = xs.dims4()?;
    Tensor::cat(&vec![&xs; n_rep], 2)?.reshape((b, n_kv * n_rep, t, hd))
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: Linear::load(vb.pp("gate_proj"), h, i)?,
            up_proj: Linear::load(vb.pp("up_proj"), h, i)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h)?,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&(gate * self.up_proj.forward(x)?)?)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Block {
    /// The layer's seven projections with their HF names (relative to `model.layers.N`).
    fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        [
            ("self_attn.q_proj", &mut self.self_attn.q_proj),
            ("self_attn.k_proj", &mut self.self_attn.k_proj),
            ("self_attn.v_proj", &mut self.self_attn.v_proj),
            ("self_attn.o_proj", &mut self.self_attn.o_proj),
            ("mlp.gate_proj", &mut self.mlp.gate_proj),
            ("mlp.up_proj", &mut self.mlp.up_proj),
            ("mlp.down_proj", &mut self.mlp.down_proj),
        ]
    }

    fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(
                vb.pp("input_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                vb.pp("post_attention_layernorm"),
                cfg.hidden_size,
                cfg.rms_norm_eps,
            )?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }
}

/// A llama decoder with its LM head.
#[derive(Debug, Clone)]
pub struct Llama {
    embed_tokens: candle_nn::Embedding,
    layers: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    /// The final norm and head in f32 when the weights are f16/bf16: logits near 20 in f16 are
    /// rounded in steps of 1/64, which moves log-probs by up to ~0.01 (inference only).
    head_f32: Option<(RmsNorm, Linear)>,
    rope: RotaryEmbedding,
    cfg: Config,
    dtype: DType,
    device: Device,
    /// The fused CPU path for short inputs, when every projection is packed (GGUF, CPU, f32).
    fused: Option<std::sync::Arc<super::fused::Fused>>,
}

impl Llama {
    /// Loads from HF names (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let embed_weight = vb.pp("model.embed_tokens").get_with_hints(
            (cfg.vocab_size, cfg.hidden_size),
            "weight",
            INIT_WEIGHT,
        )?;
        let embed_tokens = candle_nn::Embedding::new(embed_weight.clone(), cfg.hidden_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(vb.pp(format!("model.layers.{i}")), cfg))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = RmsNorm::load(vb.pp("model.norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        // A checkpoint without lm_head shares the embedding matrix (tied embeddings).
        let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            Linear::dense(embed_weight)
        } else {
            Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size)?
        };
        let rope = RotaryEmbedding::new(cfg, dtype, &device)?;
        let head_f32 = match (&lm_head, dtype) {
            (_, DType::F32) => None,
            (Linear::Dense(l), _) => Some((
                RmsNorm {
                    weight: norm.weight.to_dtype(DType::F32)?,
                    eps: norm.eps,
                },
                Linear::dense(l.weight().to_dtype(DType::F32)?),
            )),
            _ => None,
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            lm_head,
            head_f32,
            rope,
            cfg: cfg.clone(),
            dtype,
            device,
            fused: None,
        })
    }

    /// Replaces the dense projections with quantized ones (for `--dtype gguf`).
    pub fn with_quantized(mut self, mut take: impl FnMut(&str) -> Option<QMatMul>) -> Self {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, slot) in layer.projections_mut() {
                if let Some(q) = take(&format!("model.layers.{i}.{name}.weight")) {
                    *slot = Linear::Quantized(q);
                }
            }
        }
        if let Some(q) = take("lm_head.weight") {
            self.lm_head = Linear::Quantized(q);
        }
        self
    }

    /// Adds packed blocks to the dense projections that have them (GGUF on CPU, f32).
    pub fn with_packed(
        mut self,
        mut take: impl FnMut(&str) -> Option<std::sync::Arc<super::packed::PackedMatrix>>,
    ) -> Self {
        let pack = |slot: &mut Linear, p: Option<std::sync::Arc<super::packed::PackedMatrix>>| {
            if let (Linear::Dense(d), Some(p)) = (&*slot, p) {
                *slot = Linear::Packed(d.clone(), p);
            }
        };
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, slot) in layer.projections_mut() {
                pack(slot, take(&format!("model.layers.{i}.{name}.weight")));
            }
        }
        pack(&mut self.lm_head, take("lm_head.weight"));
        self.fused = self.build_fused().map(std::sync::Arc::new);
        self
    }

    /// The fused short-input path needs every projection packed and f32 on the CPU.
    fn build_fused(&self) -> Option<super::fused::Fused> {
        use super::fused::{Fused, FusedLayer};
        if self.dtype != DType::F32 || !self.device.is_cpu() {
            return None;
        }
        let packed = |l: &Linear| match l {
            Linear::Packed(_, p) => Some(p.clone()),
            _ => None,
        };
        let norm = |n: &RmsNorm| n.weight.to_vec1::<f32>().ok();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Some(FusedLayer {
                    attn_norm: norm(&l.input_layernorm)?,
                    q: packed(&l.self_attn.q_proj)?,
                    k: packed(&l.self_attn.k_proj)?,
                    v: packed(&l.self_attn.v_proj)?,
                    o: packed(&l.self_attn.o_proj)?,
                    mlp_norm: norm(&l.post_attention_layernorm)?,
                    gate: packed(&l.mlp.gate_proj)?,
                    up: packed(&l.mlp.up_proj)?,
                    down: packed(&l.mlp.down_proj)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let flat = |t: &Tensor| t.flatten_all().ok()?.to_vec1::<f32>().ok();
        Some(Fused {
            layers,
            norm: norm(&self.norm)?,
            head: packed(&self.lm_head)?,
            embed: self.embed_tokens.embeddings().clone(),
            cos: flat(&self.rope.cos)?,
            sin: flat(&self.rope.sin)?,
            hidden: self.cfg.hidden_size,
            n_head: self.cfg.num_attention_heads,
            n_kv_head: self.cfg.n_kv_heads(),
            head_dim: self.cfg.head_dim(),
            intermediate: self.cfg.intermediate_size,
            eps: self.cfg.rms_norm_eps as f32,
        })
    }

    /// Whether short inputs take the fused CPU path.
    pub fn has_fused_path(&self) -> bool {
        self.fused.is_some()
    }

    /// Whether `t` new tokens of one sequence take the fused CPU path.
    pub fn fused_accepts(&self, t: usize) -> bool {
        self.fused.as_ref().is_some_and(|f| f.accepts(t))
    }

    /// The same model without the fused path (every input through candle's ops): to compare
    /// the two, and an escape hatch.
    pub fn without_fused_path(mut self) -> Self {
        self.fused = None;
        self
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn new_cache(&self) -> Cache {
        Cache::new(self.cfg.num_hidden_layers)
    }

    /// Inference: runs `ids` (b, t) after the positions already in `cache`, appends their keys
    /// and values to it, and returns f32 logits (b, vocab) of the last position only.
    pub fn forward(&self, ids: &Tensor, cache: &mut Cache) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if let Some(fused) = self.fused.as_ref().filter(|f| b == 1 && f.accepts(t)) {
            let logits = fused.forward(&ids.squeeze(0)?.to_vec1::<u32>()?, cache)?;
            let n = logits.len();
            return Tensor::from_vec(logits, (1, n), &self.device);
        }
        let hidden = self.hidden_states(ids, cache)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        self.logits(&last)?.squeeze(1)
    }

    /// Final norm and head over hidden states (b, t, hidden) → f32 logits (b, t, vocab), in f32
    /// whatever the weights' dtype.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        match &self.head_f32 {
            Some((norm, head)) => {
                head.forward(&norm.forward(&hidden.to_dtype(DType::F32)?, false)?)
            }
            None => self
                .lm_head
                .forward(&self.norm.forward(hidden, false)?)?
                .to_dtype(DType::F32),
        }
    }

    /// Batched prefill of right-padded sequences: `ids` (b, t) from an empty `cache`, and the
    /// f32 logits (b, vocab) at each row's own last position `last[i]`. Under the causal mask a
    /// real token never attends to the padding after it, so each row's logits are those of
    /// its sequence alone.
    pub fn forward_rows(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        last: &[usize],
    ) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if last.len() != b || last.iter().any(|&p| p >= t) {
            candle_core::bail!("one last position per row, inside the sequence");
        }
        let hidden = self.hidden_states(ids, cache)?;
        let h = hidden.dim(2)?;
        let index: Vec<u32> = last
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * t + p) as u32)
            .collect();
        let index = Tensor::new(index.as_slice(), &self.device)?;
        let picked = hidden
            .reshape((b * t, h))?
            .index_select(&index, 0)?
            .unsqueeze(1)?;
        self.logits(&picked)?.squeeze(1)
    }

    /// Batched prefill on the fused CPU path (each prompt at most 48 tokens: see
    /// [`Self::fused_accepts`]): the prompts' tokens share packed-kernel passes without padding.
    /// Returns each prompt's KV cache and last-position logits.
    pub fn prefill_fused(&self, prompts: &[&[u32]]) -> candle_core::Result<Vec<Prefilled>> {
        let Some(fused) = self.fused.as_ref() else {
            candle_core::bail!("this model has no fused CPU path");
        };
        let mut caches: Vec<Cache> = prompts.iter().map(|_| self.new_cache()).collect();
        let logits = {
            let mut refs: Vec<&mut Cache> = caches.iter_mut().collect();
            fused.forward_many(prompts, &mut refs)?
        };
        Ok(caches.into_iter().zip(logits).collect())
    }

    /// [`Self::forward`] for one sequence of token ids: the f32 logits of its last position.
    pub fn next_logits(&self, ids: &[u32], cache: &mut Cache) -> candle_core::Result<Vec<f32>> {
        if let Some(fused) = self.fused.as_ref().filter(|f| f.accepts(ids.len())) {
            return fused.forward(ids, cache);
        }
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        self.forward(&input, cache)?.squeeze(0)?.to_vec1()
    }

    /// Inference like [`Self::forward`] but returns f32 logits (b, t, vocab) for every new
    /// position (used to score text and to compare with the training path).
    pub fn forward_all(&self, ids: &Tensor, cache: &mut Cache) -> candle_core::Result<Tensor> {
        let hidden = self.hidden_states(ids, cache)?;
        self.logits(&hidden)
    }

    fn hidden_states(&self, ids: &Tensor, cache: &mut Cache) -> candle_core::Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        let offset = cache.len;
        if offset + t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "sequence of {} tokens exceeds the model's context of {}",
                offset + t,
                self.cfg.max_position_embeddings
            );
        }
        if cache.kvs.len() != self.layers.len() {
            *cache = self.new_cache();
        }
        let (n_kv, hd) = (self.cfg.n_kv_heads(), self.cfg.head_dim());
        for l in 0..self.layers.len() {
            cache.tensors_for_candle(l, n_kv, hd, &self.device, self.dtype)?;
        }
        let mask = causal_mask(t, offset, self.dtype, &self.device)?;
        let mut x = self.embed_tokens.forward(ids)?;
        for (layer, kv) in self.layers.iter().zip(cache.kvs.iter_mut()) {
            let h = layer.input_layernorm.forward(&x, false)?;
            let h =
                layer
                    .self_attn
                    .forward(&h, &self.rope, mask.as_ref(), Some(kv), offset, false)?;
            x = (x + h)?;
            let h = layer.post_attention_layernorm.forward(&x, false)?;
            x = (&x + layer.mlp.forward(&h)?)?;
        }
        cache.len = offset + t;
        Ok(x)
    }

    /// Training: every op has a backward pass; returns logits (b, t, vocab) in the model dtype.
    pub fn forward_train(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!("sequence longer than the model's context");
        }
        let mask = causal_mask(t, 0, self.dtype, &self.device)?;
        let mut x = self.embed_tokens.forward(ids)?;
        for layer in &self.layers {
            let h = layer.input_layernorm.forward(&x, true)?;
            let h = layer
                .self_attn
                .forward(&h, &self.rope, mask.as_ref(), None, 0, true)?;
            x = (x + h)?;
            let h = layer.post_attention_layernorm.forward(&x, true)?;
            x = (&x + layer.mlp.forward(&h)?)?;
        }
        self.lm_head.forward(&self.norm.forward(&x, true)?)
    }
}

/// Additive causal mask (t, offset + t): 0 where a query may look, -inf where it may not.
fn causal_mask(
    t: usize,
    offset: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let total = offset + t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > i + offset {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(mask, (t, total), device)?.to_dtype(dtype)?,
    ))
}

/// Names and shapes of every parameter, in HF naming (tied models have no `lm_head`).
pub fn parameter_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let hd = cfg.head_dim();
    let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![nh * hd, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![nkv * hd, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![nkv * hd, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, nh * hd]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// Fresh weights from a seed (candle's CPU RNG cannot be seeded): norms at 1, everything
/// else N(0, 0.02²), as HF initialises llama.
pub fn random_weights(
    cfg: &Config,
    seed: u64,
    device: &Device,
) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    parameter_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n)
                    .map(|_| {
                        // Box–Muller.
                        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                        let u2: f32 = rng.random();
                        0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            Ok((name, Tensor::from_vec(data, shape, device)?))
        })
        .collect()
}
