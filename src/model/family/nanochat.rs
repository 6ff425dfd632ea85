//! nanochat (karpathy/nanochat, `nanochat/gpt.py` as of commit 92d63d4, July 2026): llama's
//! pre-norm layers with these differences, each read from upstream's `GPT.forward`:
//! - every RMS norm is parameter-free (`F.rms_norm` without a weight, `eps` = f32's machine
//!   epsilon, PyTorch's default): the decoder's norms load with weights of ones, which multiply
//!   exactly;
//! - the token embedding is normed, then "smeared": from the second position on,
//!   `x[t] += λ · σ(smear_gate · x[t][..24]) · x[t−1]`;
//! - before layer i, `x = resid_λ[i] · x + x0_λ[i] · x0` (x0: the smeared embedding);
//! - on alternate layers (the last always included) a value embedding of the token is added to
//!   the attention's values, gated per kv head by `3 · σ(ve_gate · x[..12])` (x: the layer's
//!   normed input);
//! - rotary embeddings rotate by −θ (base 100,000), then q and k are RMS-normed and each scaled
//!   by 1.2 (so scores by 1.44/√head_dim);
//! - window_pattern tiles `S` (a window of ⌈sequence_len/4/128⌉·128 keys before the query) and
//!   `L` (the whole context) over the layers, the last layer always `L`;
//! - the MLP is ungated, `c_proj(relu(c_fc(x))²)`, with no biases anywhere;
//! - after the layers, `x −= backout_λ · x_mid` (x_mid: the output of layer n_layer/2);
//! - the head is untied and its logits are soft-capped, `15 · tanh(logit / 15)`.
//!
//! The first four are [`Extras`], which the decoder calls around its layers; the rest are the
//! decoder's own switches. The checkpoint format itself is read by [`crate::model::nanochat`].

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::Arch;
use crate::model::config::{Activation, Config, Family, Sliding, TiledWindows};

pub struct Nanochat;

impl Arch for Nanochat {
    fn name(&self) -> &'static str {
        "nanochat"
    }
    // No GGUF or Hugging Face form: loaded from nanochat's own checkpoints only, and not
    // fine-tuned (a fine-tune's result is written as a Hugging Face directory).
}

/// Channels of the embedding the smear gate reads.
pub const SMEAR_CHANNELS: usize = 24;
/// Channels of the layer input the value-embedding gate reads.
pub const VE_GATE_CHANNELS: usize = 12;
/// The factor each of q and k is scaled by after their norm.
const QK_SCALE: f64 = 1.2;
/// The logit soft-cap.
const SOFTCAP: f64 = 15.0;
/// The rotary base upstream's `_precompute_rotary_embeddings` uses.
pub const ROPE_THETA: f64 = 100_000.0;

/// Whether layer `layer` of `n_layer` has a value embedding (upstream's `has_ve`: alternating,
/// the last layer always included).
pub fn has_value_embedding(layer: usize, n_layer: usize) -> bool {
    layer % 2 == (n_layer - 1) % 2
}

/// The short window of upstream's `_compute_window_sizes`: a quarter of the context, rounded up
/// to a multiple of 128.
pub fn short_window(sequence_len: usize) -> usize {
    (sequence_len / 4).div_ceil(128) * 128
}

/// nanochat's layer switches for a model trained at `sequence_len` with `window_pattern`
/// (only `S` and `L`, at most 64 characters: checked by the checkpoint reader).
pub fn family(window_pattern: &str, sequence_len: usize, n_layer: usize) -> Family {
    let mut global = 0u64;
    for (i, c) in window_pattern.chars().enumerate() {
        if c.eq_ignore_ascii_case(&'L') {
            global |= 1 << i;
        }
    }
    let tiled = TiledWindows {
        global,
        len: window_pattern.chars().count().clamp(1, 64) as u8,
        last_layer: n_layer.saturating_sub(1),
    };
    // Upstream masks keys more than `window` positions before the query (window + 1 keys in
    // all); the decoder's window counts the query's own position.
    let sliding = (0..n_layer).any(|l| tiled.is_local(l)).then_some(Sliding {
        window: short_window(sequence_len) + 1,
        global_every: 0,
        local_rope_theta: ROPE_THETA,
        tiled: Some(tiled),
    });
    Family {
        arch: super::ArchRef(&Nanochat),
        qk_norm: true,
        qk_norm_after_rope: true,
        rope_reversed: true,
        activation: Activation::ReluSquared,
        gated_mlp: false,
        sliding,
        final_softcap: Some(SOFTCAP),
        ..Family::default()
    }
}

/// The `attn_scalar` that makes the decoder's score scale 1/√attn_scalar equal upstream's
/// (1.2 q)·(1.2 k)/√head_dim = 1.44 q·k/√head_dim.
pub fn attn_scalar(head_dim: usize) -> f64 {
    head_dim as f64 / QK_SCALE.powi(4)
}

/// What nanochat adds around the decoder's layers (see the module's text). Loaded from the
/// decoder's tensors under `nanochat.`.
#[derive(Debug, Clone)]
pub struct Extras {
    /// Per layer: the residual's and the embedding's factors.
    resid_lambdas: Vec<f64>,
    x0_lambdas: Vec<f64>,
    smear_gate: Tensor,
    smear_lambda: Tensor,
    backout_lambda: Tensor,
    /// The layer whose output is backed out (n_layer / 2).
    backout_layer: usize,
    /// Per layer: its value embedding table and gate (None on layers without one).
    value_embeds: Vec<Option<(candle_nn::Embedding, Tensor)>>,
    /// The norm's weights (ones) and epsilon, for the embedding.
    ones: Tensor,
    eps: f32,
}

impl Extras {
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        let n = cfg.num_hidden_layers;
        let h = cfg.hidden_size;
        let kv_dim = cfg.n_kv_heads() * cfg.head_dim();
        let vb = vb.pp("nanochat");
        let scalars = |name: &str| -> candle_core::Result<Vec<f64>> {
            let v: Vec<f32> = vb.get(n, name)?.to_dtype(DType::F32)?.to_vec1()?;
            Ok(v.into_iter().map(f64::from).collect())
        };
        let value_embeds = (0..n)
            .map(|l| {
                if !has_value_embedding(l, n) {
                    return Ok(None);
                }
                let table = vb.get(
                    (cfg.vocab_size, kv_dim),
                    &format!("value_embeds.{l}.weight"),
                )?;
                let gate = vb.get(
                    (cfg.n_kv_heads(), VE_GATE_CHANNELS),
                    &format!("ve_gate.{l}.weight"),
                )?;
                Ok(Some((candle_nn::Embedding::new(table, kv_dim), gate)))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            resid_lambdas: scalars("resid_lambdas")?,
            x0_lambdas: scalars("x0_lambdas")?,
            smear_gate: vb.get((1, SMEAR_CHANNELS), "smear_gate.weight")?,
            smear_lambda: vb.get(1, "smear_lambda")?,
            backout_lambda: vb.get(1, "backout_lambda")?,
            backout_layer: n / 2,
            value_embeds,
            ones: Tensor::ones(h, vb.dtype(), vb.device())?,
            eps: cfg.rms_norm_eps as f32,
        })
    }

    fn norm(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        if differentiable {
            candle_nn::ops::rms_norm_slow(x, &self.ones, self.eps)
        } else {
            candle_nn::ops::rms_norm(x, &self.ones, self.eps)
        }
    }

    /// The normed embeddings `x` (b, t, h) of new positions, smeared with the one before each;
    /// `prev` is the normed embedding of the position before the first (b, 1, h), if any.
    pub fn embed(
        &self,
        x: &Tensor,
        prev: Option<&Tensor>,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        let x = self.norm(x, differentiable)?;
        let t = x.dim(1)?;
        // gate(x) = λ · σ(x[..24] · smear_gateᵀ), one per position.
        let gate = |cur: &Tensor| -> candle_core::Result<Tensor> {
            let g = cur
                .narrow(2, 0, SMEAR_CHANNELS)?
                .broadcast_matmul(&self.smear_gate.t()?)?;
            candle_nn::ops::sigmoid(&g)?.broadcast_mul(&self.smear_lambda)
        };
        let smear = |cur: Tensor, before: Tensor| -> candle_core::Result<Tensor> {
            cur.clone() + gate(&cur)?.broadcast_mul(&before)?
        };
        match prev {
            Some(p) => {
                let before = match t {
                    1 => p.clone(),
                    _ => Tensor::cat(&[p, &x.narrow(1, 0, t - 1)?], 1)?,
                };
                smear(x, before)
            }
            None if t == 1 => Ok(x),
            None => {
                let rest = smear(x.narrow(1, 1, t - 1)?, x.narrow(1, 0, t - 1)?)?;
                Tensor::cat(&[&x.narrow(1, 0, 1)?, &rest], 1)
            }
        }
    }

    /// The normed, unsmeared embedding rows `x` (b, 1, h) of the position before a pass, as
    /// [`Self::embed`] takes it.
    pub fn normed(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.norm(x, false)
    }

    /// `resid_λ[layer] · x + x0_λ[layer] · x0`, before layer `layer`.
    pub fn mix(&self, layer: usize, x: &Tensor, x0: &Tensor) -> candle_core::Result<Tensor> {
        (x * self.resid_lambdas[layer])? + (x0 * self.x0_lambdas[layer])?
    }

    /// Layer `layer`'s value embeddings of `ids` and its gate, where it has them.
    pub fn value_embedding(
        &self,
        layer: usize,
        ids: &Tensor,
    ) -> candle_core::Result<Option<(Tensor, &Tensor)>> {
        use candle_core::Module;
        match &self.value_embeds[layer] {
            Some((table, gate)) => Ok(Some((table.forward(ids)?, gate))),
            None => Ok(None),
        }
    }

    /// The layer whose output [`Self::backout`] subtracts.
    pub fn backout_layer(&self) -> usize {
        self.backout_layer
    }

    /// `x − backout_λ · x_mid`, after the last layer.
    pub fn backout(&self, x: &Tensor, mid: &Tensor) -> candle_core::Result<Tensor> {
        x - mid.broadcast_mul(&self.backout_lambda)?
    }
}

/// `v + 3·σ(x[..12] · gateᵀ) · ve`, the gate one value per kv head: v and ve (b, t, n_kv,
/// head_dim), x the layer's normed input (b, t, h).
pub fn value_residual(
    v: &Tensor,
    x: &Tensor,
    ve: &Tensor,
    gate: &Tensor,
) -> candle_core::Result<Tensor> {
    let g = x
        .narrow(2, 0, VE_GATE_CHANNELS)?
        .broadcast_matmul(&gate.t()?)?;
    let g = (candle_nn::ops::sigmoid(&g)? * 3.0)?.unsqueeze(3)?;
    v + g.broadcast_mul(ve)?
}
