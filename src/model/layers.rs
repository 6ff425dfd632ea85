//! Building blocks shared by the architectures: where weights come from, projections and
//! embeddings (dense, GGUF-quantized, packed), RMS norm and LayerNorm, rotary embeddings, grouped-query head
//! repetition and the causal mask.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::config::Activation;
use super::packed::PackedMatrix;

/// Initialisation of fresh weights (HF's `initializer_range` = 0.02).
pub(crate) const INIT_WEIGHT: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Packed projection (and embedding) matrices by HF name, which take the place of dense
/// weights (GGUF on the CPU in f32: no dense copy is made).
pub type PackedWeights = HashMap<String, Arc<PackedMatrix>>;

/// Where a model's parameters come from: candle tensors by name, and the packed matrices
/// that replace some of them.
#[derive(Clone)]
pub(crate) struct Weights<'a> {
    pub vb: VarBuilder<'a>,
    packed: Rc<RefCell<PackedWeights>>,
}

impl<'a> Weights<'a> {
    pub fn new(vb: VarBuilder<'a>, packed: PackedWeights) -> Self {
        Self {
            vb,
            packed: Rc::new(RefCell::new(packed)),
        }
    }
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        Self {
            vb: self.vb.pp(s),
            packed: self.packed.clone(),
        }
    }
    /// The packed matrix `name` under this prefix, if there is one.
    pub fn packed(&self, name: &str) -> Option<Arc<PackedMatrix>> {
        let prefix = self.vb.prefix();
        let key = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        };
        self.packed.borrow().get(&key).cloned()
    }
}

/// A projection whose weight is dense (any float dtype), kept in a GGUF quantized format for
/// candle's quantized matmul, or packed for our exact kernels; each with an optional bias.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    /// GGUF blocks through candle's quantized matmul (`--dtype gguf`).
    Quantized(QMatMul, Option<Tensor>),
    /// GGUF blocks through [`PackedMatrix::matmul`] (exact with respect to the dequantized
    /// weights; f32 on the CPU, inference only).
    Packed(Arc<PackedMatrix>, Option<Tensor>),
    /// A base projection with a LoRA adapter beside it, unmerged (PEFT's arithmetic):
    /// `base(x) + scale · (x Aᵀ) Bᵀ`, A `[r, in]` and B `[out, r]` in f32.
    Lora {
        base: Box<Linear>,
        a: Tensor,
        b: Tensor,
        scale: f64,
        /// While training: the dropout on the adapter's input, and this projection's salt.
        dropout: Option<(Arc<super::lora::DropoutKey>, u64)>,
    },
}

impl Linear {
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, None))
    }

    /// (out, in): the weight's shape.
    pub fn dims(&self) -> candle_core::Result<(usize, usize)> {
        match self {
            Self::Dense(l) => l.weight().dims2(),
            Self::Packed(p, _) => Ok((p.rows(), p.cols())),
            Self::Quantized(QMatMul::QTensor(q), _) => q.shape().dims2(),
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t), _) => t.dims2(),
            Self::Lora { base, .. } => base.dims(),
        }
    }
    pub(crate) fn load(w: Weights, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        Self::load_biased(w, in_dim, out_dim, false)
    }

    /// With `bias`, the checkpoint's `bias` vector is added after the product. A packed
    /// matrix of that name is used as it is (its shape checked).
    pub(crate) fn load_biased(
        w: Weights,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Self> {
        let vb = &w.vb;
        let bias = match bias {
            true => Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?),
            false => None,
        };
        if let Some(p) = w.packed("weight") {
            if (p.rows(), p.cols()) != (out_dim, in_dim) {
                candle_core::bail!(
                    "{}.weight: shape ({}, {}), expected ({out_dim}, {in_dim})",
                    vb.prefix(),
                    p.rows(),
                    p.cols()
                );
            }
            return Ok(Self::Packed(p, bias));
        }
        // The init hint only matters when training from scratch (a VarMap-backed builder).
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", INIT_WEIGHT)?;
        Ok(Self::Dense(candle_nn::Linear::new(weight, bias)))
    }
}

/// `x ↦ x Wᵀ` for a weight that does not train (a LoRA run's frozen base). Through candle's
/// matmul the backward pass computes the weight's gradient anyway, and for a batched input
/// (the weight broadcast over the batch) keeps a batch × weight-sized gradient per projection
/// until the pass ends: 2 GiB for the default model at batch 4, more than the whole full
/// fine-tune holds. As a custom op only the input's gradient, `g W`, is computed.
struct FrozenMatmul {
    weight: Tensor,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = Tensor::from_slice(
            contiguous_f32(storage, layout, self.name())?,
            layout.shape(),
            &candle_core::Device::Cpu,
        )?;
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        grad_res.broadcast_matmul(&self.weight).map(Some)
    }
}

/// A custom op's f32 input, which must be contiguous (its callers make it so).
pub(crate) fn contiguous_f32<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: the input must be contiguous"),
    }
}

/// `x ↦ x Wᵀ` for a packed (GGUF) weight in a LoRA run whose base stays packed (QLoRA-style):
/// the forward pass is the packed kernel's (exact w.r.t. the dequantized weights, as at
/// inference), the backward pass the input's gradient `g W`, with W dequantized for that
/// product only and dropped after it (one projection at a time).
struct FrozenPacked {
    packed: Arc<PackedMatrix>,
}

impl candle_core::CustomOp1 for FrozenPacked {
    fn name(&self) -> &'static str {
        "frozen-packed-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let cols = self.packed.cols();
        let mut dims = layout.dims().to_vec();
        if dims.last() != Some(&cols) {
            candle_core::bail!("input width {:?}, expected {cols}", dims.last());
        }
        let y = self.packed.matmul(x, x.len() / cols);
        if let Some(last) = dims.last_mut() {
            *last = self.packed.rows();
        }
        Ok((candle_core::CpuStorage::F32(y), dims.into()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, cols) = (self.packed.rows(), self.packed.cols());
        let mut w = vec![0f32; rows * cols];
        for (r, out) in w.chunks_exact_mut(cols).enumerate() {
            self.packed.dequantize_row_into(r, out);
        }
        let w = Tensor::from_vec(w, (rows, cols), grad_res.device())?;
        grad_res.broadcast_matmul(&w).map(Some)
    }
}

/// Whether `l` is a frozen f32 CPU projection fed an input that carries gradients.
fn frozen_training(l: &candle_nn::Linear, xs: &Tensor) -> bool {
    xs.track_op()
        && !l.weight().is_variable()
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && l.weight().dtype() == DType::F32
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (y, bias) = match self {
            Self::Dense(l) if frozen_training(l, xs) => {
                let y = xs.contiguous()?.apply_op1(FrozenMatmul {
                    weight: l.weight().clone(),
                })?;
                (y, &l.bias().cloned())
            }
            Self::Dense(l) => return l.forward(xs),
            Self::Lora {
                base,
                a,
                b,
                scale,
                dropout,
            } => {
                let y = base.forward(xs)?;
                let mut x = xs.to_dtype(DType::F32)?;
                if let Some((key, salt)) = dropout {
                    if let Some(mask) = key.mask(x.shape(), *salt, x.device())? {
                        x = (x * mask)?;
                    }
                }
                let low = x.broadcast_matmul(&a.t()?)?;
                let delta = (low.broadcast_matmul(&b.t()?)? * *scale)?;
                let delta = delta.to_dtype(y.dtype())?;
                return y + delta;
            }
            Self::Quantized(q, bias) => (q.forward(xs)?, bias),
            Self::Packed(packed, bias) if xs.track_op() => {
                if xs.dtype() != DType::F32 || !xs.device().is_cpu() {
                    candle_core::bail!("packed GGUF weights multiply f32 CPU inputs");
                }
                let y = xs.contiguous()?.apply_op1(FrozenPacked {
                    packed: packed.clone(),
                })?;
                (y, bias)
            }
            Self::Packed(packed, bias) => {
                if xs.dtype() != DType::F32 || !xs.device().is_cpu() {
                    candle_core::bail!("packed GGUF weights multiply f32 CPU inputs");
                }
                let mut dims = xs.dims().to_vec();
                let cols = dims.last().copied().unwrap_or(0);
                if cols != packed.cols() {
                    candle_core::bail!("input width {cols}, expected {}", packed.cols());
                }
                let n = xs.elem_count() / cols.max(1);
                let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
                let y = packed.matmul(&x, n);
                if let Some(last) = dims.last_mut() {
                    *last = packed.rows();
                }
                (Tensor::from_vec(y, dims, xs.device())?, bias)
            }
        };
        match bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// Token embeddings: a dense table, or the packed matrix (each looked-up row dequantized).
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(candle_nn::Embedding),
    Packed(Arc<PackedMatrix>),
}

impl Embedding {
    pub(crate) fn load(w: &Weights, vocab: usize, hidden: usize) -> candle_core::Result<Self> {
        Self::load_named(w, "model.embed_tokens", vocab, hidden)
    }

    /// The table `{name}.weight`: `vocab` rows of `hidden` values.
    pub(crate) fn load_named(
        w: &Weights,
        name: &str,
        vocab: usize,
        hidden: usize,
    ) -> candle_core::Result<Self> {
        let w = w.pp(name);
        if let Some(p) = w.packed("weight") {
            if (p.rows(), p.cols()) != (vocab, hidden) {
                candle_core::bail!(
                    "{name}.weight: shape ({}, {}), expected ({vocab}, {hidden})",
                    p.rows(),
                    p.cols()
                );
            }
            return Ok(Self::Packed(p));
        }
        let weight =
            w.vb.get_with_hints((vocab, hidden), "weight", INIT_WEIGHT)?;
        Ok(Self::Dense(candle_nn::Embedding::new(weight, hidden)))
    }

    /// The same matrix as a (tied) LM head.
    pub fn as_linear(&self) -> Linear {
        match self {
            Self::Dense(e) => Linear::dense(e.embeddings().clone()),
            Self::Packed(p) => Linear::Packed(p.clone(), None),
        }
    }

    pub fn vocab(&self) -> usize {
        match self {
            Self::Dense(e) => e.embeddings().dim(0).unwrap_or(0),
            Self::Packed(p) => p.rows(),
        }
    }

    /// Row `id` into `out` (f32 models only).
    pub fn row_into(&self, id: usize, out: &mut [f32]) -> candle_core::Result<()> {
        if id >= self.vocab() {
            candle_core::bail!(
                "token id {id} is outside the vocabulary of {}",
                self.vocab()
            );
        }
        match self {
            Self::Dense(e) => {
                let row: Vec<f32> = e.embeddings().get(id)?.to_dtype(DType::F32)?.to_vec1()?;
                out.copy_from_slice(&row);
            }
            Self::Packed(p) => p.dequantize_row_into(id, out),
        }
        Ok(())
    }

    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(e) => e.forward(ids),
            Self::Packed(p) => {
                let h = p.cols();
                let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let mut x = vec![0f32; flat.len() * h];
                for (&id, out) in flat.iter().zip(x.chunks_exact_mut(h)) {
                    self.row_into(id as usize, out)?;
                }
                let mut dims = ids.dims().to_vec();
                dims.push(h);
                Tensor::from_vec(x, dims, ids.device())
            }
        }
    }
}

/// The tanh GELU of one value, in f32, as candle (and ggml's `ggml_gelu_f32`) computes it.
#[inline]
pub(crate) fn gelu_tanh(g: f32) -> f32 {
    #[allow(clippy::excessive_precision)]
    const SQRT_TWO_OVER_PI: f32 = 0.79788456080286535587989211986876373;
    0.5 * g * (1.0 + f32::tanh(SQRT_TWO_OVER_PI * g * (1.0 + 0.044715 * g * g)))
}

/// The MLP's gated activation of one value: act(gate) · up, in f32 exactly as candle computes
/// `silu(gate) * up` and `gelu(gate) * up` (its tanh GELU), so the fused path, the parallel op
/// below and candle's own ops agree bit for bit.
#[inline]
pub(crate) fn gated(act: Activation, g: f32, u: f32) -> f32 {
    let a = match act {
        Activation::Silu => g / (1.0 + (-g).exp()),
        Activation::GeluTanh => gelu_tanh(g),
        Activation::GeluErf => {
            (candle_core::cpu::erf::erf_f32(g * std::f32::consts::FRAC_1_SQRT_2) + 1.) * 0.5 * g
        }
        Activation::ReluSquared => g.max(0.0) * g.max(0.0),
    };
    a * u
}

/// [`gated`], with GELU through ggml's f16 table where `gelu_table` is set (`--activations
/// q8`: llama.cpp's arithmetic).
#[inline]
pub(crate) fn gated_in(act: Activation, gelu_table: bool, g: f32, u: f32) -> f32 {
    match (gelu_table, act) {
        (true, Activation::GeluTanh) => super::q8::gelu_table(g) * u,
        _ => gated(act, g, u),
    }
}

/// act(gate) · up for inference. On the CPU in f32 it runs across the thread pool: candle's
/// unary ops run on one thread, and for long prompts the activation (an exp or a tanh per
/// value: 18 M of them for 500 tokens on Gemma 3) was a sixth of the time with the other core
/// idle. Elsewhere, candle's ops.
pub(crate) fn gated_activation(
    act: Activation,
    gelu_table: bool,
    gate: &Tensor,
    up: &Tensor,
) -> candle_core::Result<Tensor> {
    if gate.device().is_cpu() && gate.dtype() == DType::F32 && gate.shape() == up.shape() {
        return gate
            .contiguous()?
            .apply_op2_no_bwd(&up.contiguous()?, &GatedActivation(act, gelu_table));
    }
    act.apply(gate)? * up
}

struct GatedActivation(Activation, bool);

impl candle_core::CustomOp2 for GatedActivation {
    fn name(&self) -> &'static str {
        "gated-activation"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        fn slice<'a>(
            s: &'a candle_core::CpuStorage,
            l: &candle_core::Layout,
        ) -> candle_core::Result<&'a [f32]> {
            match l.contiguous_offsets() {
                Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
                None => candle_core::bail!("gated-activation needs contiguous inputs"),
            }
        }
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        if g.len() != u.len() {
            candle_core::bail!("gated-activation: {} gate values, {} up", g.len(), u.len());
        }
        let (act, table) = (self.0, self.1);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = gated_in(act, table, g, u);
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Rotary embedding (NeoX style: the two halves of each head rotate together). Keeps only the
/// inverse frequencies: each pass computes cos/sin for its own positions. A table for the whole
/// context would hold 2 × context × head_dim/2 floats — 32 MiB per rope for Gemma 3's 32k
/// context, twice over with its local rope — almost all of it never read.
#[derive(Debug, Clone)]
pub(crate) struct RotaryEmbedding {
    inv_freq: Arc<[f32]>,
}

impl RotaryEmbedding {
    pub fn new(inv_freq: &[f32]) -> Self {
        Self {
            inv_freq: inv_freq.into(),
        }
    }

    /// head_dim / 2.
    pub fn half(&self) -> usize {
        self.inv_freq.len()
    }

    /// Appends cos and sin of position × frequency for each position, `half` values per
    /// position: the product rounded to f32, then f32 cos/sin — the values candle's
    /// `positions.matmul(inv_freq).cos()` table held (a test keeps them bit for bit equal).
    pub fn extend_tables(
        &self,
        positions: std::ops::Range<usize>,
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        for p in positions {
            let p = p as f32;
            for &f in self.inv_freq.iter() {
                let a = p * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
    }

    /// The tables for positions offset..offset + t, as (t, head_dim / 2) tensors.
    pub fn at(
        &self,
        offset: usize,
        t: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<RopeAt> {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        self.extend_tables(offset..offset + t, &mut cos, &mut sin);
        let table = |v: Vec<f32>| Tensor::from_vec(v, (t, self.half()), dev)?.to_dtype(dtype);
        Ok(RopeAt {
            cos: table(cos)?,
            sin: table(sin)?,
        })
    }
}

/// A rotary embedding's cos/sin for the positions of one pass.
#[derive(Debug, Clone)]
pub(crate) struct RopeAt {
    cos: Tensor,
    sin: Tensor,
}

impl RopeAt {
    /// Rotates x (b, heads, t, head_dim).
    pub fn apply(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        if differentiable {
            candle_nn::rotary_emb::rope_slow(x, &self.cos, &self.sin)
        } else {
            candle_nn::rotary_emb::rope(&x.contiguous()?, &self.cos, &self.sin)
        }
    }
}

/// RMS norm (`x / rms(x) · w`), or with a bias LayerNorm (`(x − mean) / σ · w + b`, GPT-2).
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    pub weight: Tensor,
    /// LayerNorm's bias; `None` for RMS norm.
    pub bias: Option<Tensor>,
    pub eps: f64,
}

impl Norm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            bias: None,
            eps,
        })
    }
    /// RMS norm, or LayerNorm with its bias when `layer_norm`.
    pub fn load_kind(
        vb: VarBuilder,
        size: usize,
        eps: f64,
        layer_norm: bool,
    ) -> candle_core::Result<Self> {
        let mut norm = Self::load(vb.clone(), size, eps)?;
        if layer_norm {
            norm.bias = Some(vb.get_with_hints(size, "bias", candle_nn::Init::Const(0.0))?);
        }
        Ok(norm)
    }
    /// `norm(x)` where the family has the norm, else `x` itself.
    pub fn apply_if(
        norm: &Option<Self>,
        x: Tensor,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        match norm {
            Some(n) => n.forward(&x, differentiable),
            None => Ok(x),
        }
    }

    pub fn is_rms(&self) -> bool {
        self.bias.is_none()
    }

    pub fn forward(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        match (&self.bias, differentiable) {
            (None, true) => candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32),
            (None, false) => candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32),
            (Some(bias), true) => layer_norm_slow(x, &self.weight, bias, self.eps),
            (Some(bias), false) => {
                candle_nn::ops::layer_norm(x, &self.weight, bias, self.eps as f32)
            }
        }
    }
}

/// LayerNorm from differentiable ops (in f32, like candle's fused one).
fn layer_norm_slow(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(candle_core::D::Minus1)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let y = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

pub(crate) fn repeat_kv(xs: Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs);
    }
    let (b, n_kv, t, hd) = xs.dims4()?;
    Tensor::cat(&vec![&xs; n_rep], 2)?.reshape((b, n_kv * n_rep, t, hd))
}

/// Additive causal mask (t, offset + t): 0 where query i (at position offset + i) may look at
/// key j, −inf where it may not: later keys, and with a `window`, keys `window` or more
/// positions back (the query sees itself and the `window` − 1 before it, as HF and llama.cpp
/// define Gemma's and Mistral's sliding window). `None` when nothing is masked.
pub(crate) fn causal_mask(
    t: usize,
    offset: usize,
    window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let total = offset + t;
    let windowed = window.is_some_and(|w| total > w);
    if t == 1 && !windowed {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            let q = i + offset;
            (0..total).map(move |j| {
                let too_old = window.is_some_and(|w| q >= j + w);
                if j > q || too_old {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A packed projection in a run with gradients (a QLoRA base): the packed kernel's
    /// product forward, and the input's gradient equal to the dense dequantized weight's.
    #[test]
    fn a_packed_projection_passes_gradients_like_its_dense_weight() -> candle_core::Result<()> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dev = Device::Cpu;
        let (rows, cols) = (48, 256);
        let w = (Tensor::randn(0f32, 0.1, (rows, cols), &dev)?).contiguous()?;
        let q = QTensor::quantize(&w, GgmlDType::Q4K)?;
        let format = super::super::quant::Format::from_ggml(GgmlDType::Q4K).unwrap();
        let packed =
            PackedMatrix::from_blocks(format, rows, cols, q.data()?.into_owned(), None).unwrap();
        let dequantized: Vec<f32> = (0..rows).flat_map(|r| packed.dequantize_row(r)).collect();
        let dense = Linear::dense(Tensor::from_vec(dequantized, (rows, cols), &dev)?);
        let packed = Linear::Packed(Arc::new(packed), None);
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, cols), &dev)?)?;
        let weights = Tensor::randn(0f32, 1.0, (2, 5, rows), &dev)?;
        let run = |l: &Linear| -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
            let y = l.forward(x.as_tensor())?;
            let grads = (&y * &weights)?.sum_all()?.backward()?;
            let dx = grads.get(x.as_tensor()).expect("a gradient for x");
            Ok((y.flatten_all()?.to_vec1()?, dx.flatten_all()?.to_vec1()?))
        };
        let (yp, gp) = run(&packed)?;
        let (yd, gd) = run(&dense)?;
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max)
        };
        assert!(diff(&yp, &yd) < 1e-4, "forward {}", diff(&yp, &yd));
        assert!(diff(&gp, &gd) < 1e-4, "input gradient {}", diff(&gp, &gd));
        assert!(gp.iter().any(|v| *v != 0.0));
        Ok(())
    }

    /// The parallel CPU activation equals candle's ops bit for bit.
    #[test]
    fn gated_activation_equals_candles_ops() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let gate = (Tensor::randn(0f32, 4.0, (3, 5000), &dev)? - 1.0)?;
        let up = Tensor::randn(0f32, 1.0, (3, 5000), &dev)?;
        let bits = |t: &Tensor| -> candle_core::Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|v| v.to_bits())
                .collect())
        };
        for (act, reference) in [
            (Activation::Silu, (candle_nn::ops::silu(&gate)? * &up)?),
            (Activation::GeluTanh, (gate.gelu()? * &up)?),
            (Activation::GeluErf, (gate.gelu_erf()? * &up)?),
        ] {
            let ours = gated_activation(act, false, &gate, &up)?;
            assert_eq!(bits(&ours)?, bits(&reference)?, "{act:?}");
        }
        Ok(())
    }

    /// The per-pass tables equal, bit for bit, the whole-context tables candle computed before
    /// (positions as f32, a (positions, 1) × (1, half) matmul, then cos/sin).
    #[test]
    fn rope_tables_equal_candles_matmul_tables() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let half = 64;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / 1_000_000f64.powf(2.0 * i as f64 / (2 * half) as f64) as f32)
            .collect();
        let max = 40_000;
        let positions = Tensor::arange(0u32, max as u32, &dev)?
            .to_dtype(DType::F32)?
            .reshape((max, 1))?;
        let freqs = positions.matmul(&Tensor::from_slice(&inv_freq, (1, half), &dev)?)?;
        let want_cos: Vec<f32> = freqs.cos()?.flatten_all()?.to_vec1()?;
        let want_sin: Vec<f32> = freqs.sin()?.flatten_all()?.to_vec1()?;
        let rope = RotaryEmbedding::new(&inv_freq);
        for (offset, t) in [(0, 1), (0, 300), (31_990, 10), (39_999, 1)] {
            let at = rope.at(offset, t, DType::F32, &dev)?;
            let range = offset * half..(offset + t) * half;
            let cos: Vec<f32> = at.cos.flatten_all()?.to_vec1()?;
            let sin: Vec<f32> = at.sin.flatten_all()?.to_vec1()?;
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&cos),
                bits(&want_cos[range.clone()]),
                "cos at {offset}"
            );
            assert_eq!(bits(&sin), bits(&want_sin[range]), "sin at {offset}");
        }
        Ok(())
    }
}
