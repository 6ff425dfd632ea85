//! Building blocks shared by the architectures: projections (dense, GGUF-quantized, packed),
//! RMS norm, rotary embeddings, grouped-query head repetition and the causal mask.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

/// Initialisation of fresh weights (HF's `initializer_range` = 0.02).
pub(crate) const INIT_WEIGHT: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// A projection whose weight is dense (any float dtype), kept in a GGUF quantized format, or
/// dense plus packed blocks for the exact short-input kernel.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense(candle_nn::Linear),
    /// GGUF blocks through candle's quantized matmul, and the bias if the layer has one.
    Quantized(QMatMul, Option<Tensor>),
    Packed(
        candle_nn::Linear,
        std::sync::Arc<super::packed::PackedMatrix>,
    ),
}

impl Linear {
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, None))
    }
    pub(crate) fn load(vb: VarBuilder, in_dim: usize, out_dim: usize) -> candle_core::Result<Self> {
        Self::load_biased(vb, in_dim, out_dim, false)
    }

    /// With `bias`, the checkpoint's `bias` vector is added after the product.
    pub(crate) fn load_biased(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> candle_core::Result<Self> {
        // The init hint only matters when training from scratch (a VarMap-backed builder).
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", INIT_WEIGHT)?;
        let bias = match bias {
            true => Some(vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?),
            false => None,
        };
        Ok(Self::Dense(candle_nn::Linear::new(weight, bias)))
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(l) => l.forward(xs),
            Self::Quantized(q, bias) => {
                let y = q.forward(xs)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
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
                let y = Tensor::from_vec(y, out_dims, xs.device())?;
                match dense.bias() {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }
}

/// Rotary embedding tables (NeoX style: the two halves of each head rotate together).
#[derive(Debug, Clone)]
pub(crate) struct RotaryEmbedding {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryEmbedding {
    /// Tables for positions 0..max_positions from the inverse frequencies.
    pub fn new(
        inv_freq: &[f32],
        max_positions: usize,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Self> {
        let n = inv_freq.len();
        let inv_freq = Tensor::from_slice(inv_freq, (1, n), dev)?;
        let positions = Tensor::arange(0u32, max_positions as u32, dev)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }

    pub fn apply(
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
pub(crate) struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(size, "weight", candle_nn::Init::Const(1.0))?,
            eps,
        })
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

    pub fn forward(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        if differentiable {
            candle_nn::ops::rms_norm_slow(x, &self.weight, self.eps as f32)
        } else {
            candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
        }
    }
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
