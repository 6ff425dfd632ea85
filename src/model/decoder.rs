//! The decoder-only transformer every supported family runs on (llama's layers, with the
//! family switches of [`Family`](super::config::Family)), written for both inference and
//! training.
//!
//! candle-transformers' stock models cannot train: their fused rms_norm, softmax and rope have
//! no backward pass (gradients silently reach only the embeddings) and they return logits for
//! the last position only. This file keeps one set of weights and two forward paths:
//! - [`Decoder::forward`]: fused kernels, a KV cache, logits only for the positions asked for
//!   (and, for short inputs, the fused CPU path of [`super::fused`] when every projection is
//!   packed from a GGUF and the model runs in f32 on the CPU: every family but Gemma 2 and
//!   GPT-2, whose soft-capping and LayerNorm it lacks);
//! - [`Decoder::forward_train`]: every op differentiable, logits for every position.
//!
//! A test proves that both paths give the same logits.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{Activation, Config};
use super::family::nanochat::{self, Extras};
use super::kv_cache::{Cache, Prefilled};
use super::layers::{
    causal_mask, gated_activation, repeat_kv, Embedding, Linear, Norm, PackedWeights, RopeAt,
    RotaryEmbedding, Weights,
};
use super::q8::Activations;

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Per-head RMS norms of queries and keys (Gemma 3).
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Multiplies the scores: 1/√head_dim, or 1/√query_pre_attn_scalar.
    scale: f64,
    /// `cap · tanh(score / cap)` before the mask (Gemma 2).
    softcap: Option<f64>,
    /// Rotary embedding of q and k (all but GPT-2, whose positions are in its embeddings).
    rotary: bool,
    /// q and k are normed after the rotary embedding, not before (nanochat).
    qk_norm_after_rope: bool,
    /// In llama.cpp's arithmetic ([`Activations::Q8`]): keys and values kept in f16, queries
    /// and attention weights rounded to f16 for their products, as ggml does by default.
    f16_attention: bool,
}

impl Attention {
    fn load(w: Weights, cfg: &Config) -> candle_core::Result<Self> {
        let vb = &w.vb;
        let h = cfg.hidden_size;
        let hd = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
        let bias = cfg.family.qkv_bias;
        Ok(Self {
            q_proj: Linear::load_biased(w.pp("q_proj"), h, nh * hd, bias)?,
            k_proj: Linear::load_biased(w.pp("k_proj"), h, nkv * hd, bias)?,
            v_proj: Linear::load_biased(w.pp("v_proj"), h, nkv * hd, bias)?,
            o_proj: Linear::load_biased(w.pp("o_proj"), nh * hd, h, cfg.family.dense_bias)?,
            q_norm: cfg
                .family
                .qk_norm
                .then(|| Norm::load(vb.pp("q_norm"), hd, cfg.rms_norm_eps))
                .transpose()?,
            k_norm: cfg
                .family
                .qk_norm
                .then(|| Norm::load(vb.pp("k_norm"), hd, cfg.rms_norm_eps))
                .transpose()?,
            n_head: nh,
            n_kv_head: nkv,
            head_dim: hd,
            scale: 1.0 / cfg.family.attn_scalar.unwrap_or(hd as f64).sqrt(),
            softcap: cfg.family.attn_softcap,
            rotary: !cfg.family.learned_positions,
            qk_norm_after_rope: cfg.family.qk_norm_after_rope,
            f16_attention: false,
        })
    }

    /// `value`: a value embedding (b, t, n_kv · head_dim) and its gate, added to the values
    /// (nanochat's value residual).
    fn forward(
        &self,
        x: &Tensor,
        rope: &RopeAt,
        mask: Option<&Tensor>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        value: Option<(Tensor, &Tensor)>,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let shape = |n| (b, t, n, self.head_dim);
        // Each head RMS-normed where the family does it: before the rotary embedding (on
        // (b, t, heads, head_dim)), or after it (on (b, heads, t, head_dim)).
        let (norm_before, norm_after) = match self.qk_norm_after_rope {
            false => ((&self.q_norm, &self.k_norm), (&None, &None)),
            true => ((&None, &None), (&self.q_norm, &self.k_norm)),
        };
        let heads = |proj: &Linear, n, norm: &Option<Norm>| -> candle_core::Result<Tensor> {
            let y = proj.forward(x)?.reshape(shape(n))?;
            Norm::apply_if(norm, y, differentiable)?.transpose(1, 2)
        };
        let q = heads(&self.q_proj, self.n_head, norm_before.0)?;
        let k = heads(&self.k_proj, self.n_kv_head, norm_before.1)?;
        let v = self.v_proj.forward(x)?.reshape(shape(self.n_kv_head))?;
        let v = match value {
            Some((ve, gate)) => {
                let ve = ve.reshape(shape(self.n_kv_head))?;
                super::family::nanochat::value_residual(&v, x, &ve, gate)?
            }
            None => v,
        };
        let v = v.transpose(1, 2)?;
        let (q, k) = if self.rotary {
            (
                rope.apply(&q, differentiable)?,
                rope.apply(&k, differentiable)?,
            )
        } else {
            // The rope's output is contiguous; the matmuls (and their backward) need it.
            (q.contiguous()?, k.contiguous()?)
        };
        let q = Norm::apply_if(norm_after.0, q, differentiable)?;
        let k = Norm::apply_if(norm_after.1, k, differentiable)?;
        let v = if differentiable { v } else { v.contiguous()? };
        let (q, k, v) = match self.f16_attention {
            true => (f16_rounded(&q)?, f16_rounded(&k)?, f16_rounded(&v)?),
            false => (q, k, v),
        };

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
        let att = (q.matmul(&k.t()?)? * self.scale)?;
        let att = match self.softcap {
            Some(cap) => ((att / cap)?.tanh()? * cap)?,
            None => att,
        };
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = if differentiable {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let att = match self.f16_attention {
            true => f16_rounded(&att)?,
            false => att,
        };
        let y = att.matmul(&v.contiguous()?)?;
        let y = y
            .transpose(1, 2)?
            .reshape((b, t, self.n_head * self.head_dim))?;
        self.o_proj.forward(&y)
    }
}

/// Each value rounded to f16 and back (what ggml stores in, or converts to, an f16 tensor).
fn f16_rounded(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() != DType::F32 || !t.device().is_cpu() {
        return t.to_dtype(DType::F16)?.to_dtype(DType::F32);
    }
    let mut values = t.flatten_all()?.to_vec1::<f32>()?;
    super::q8::f16_round_all(&mut values);
    Tensor::from_vec(values, t.shape(), t.device())
}

#[derive(Debug, Clone)]
struct Mlp {
    /// `None`: an ungated MLP, `down(act(up(x)))` (GPT-2).
    gate_proj: Option<Linear>,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
    /// GELU through ggml's f16 table ([`Activations::Q8`]).
    gelu_table: bool,
}

impl Mlp {
    fn load(w: Weights, cfg: &Config) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let bias = cfg.family.dense_bias;
        Ok(Self {
            gate_proj: cfg
                .family
                .gated_mlp
                .then(|| Linear::load(w.pp("gate_proj"), h, i))
                .transpose()?,
            up_proj: Linear::load_biased(w.pp("up_proj"), h, i, bias)?,
            down_proj: Linear::load_biased(w.pp("down_proj"), i, h, bias)?,
            activation: cfg.family.activation,
            gelu_table: false,
        })
    }
    fn forward(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        let Some(gate_proj) = &self.gate_proj else {
            let up = self.up_proj.forward(x)?;
            let h = match self.gelu_table && self.activation == Activation::GeluTanh {
                true => up.flatten_all()?.to_vec1::<f32>().and_then(|v| {
                    let v: Vec<f32> = v.into_iter().map(super::q8::gelu_table).collect();
                    Tensor::from_vec(v, up.shape(), up.device())
                })?,
                false => self.activation.apply(&up)?,
            };
            return self.down_proj.forward(&h);
        };
        let gate = gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        let h = if differentiable {
            (self.activation.apply(&gate)? * up)?
        } else {
            gated_activation(self.activation, self.gelu_table, &gate, &up)?
        };
        self.down_proj.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Block {
    /// Before attention (`input_layernorm`).
    attn_norm: Norm,
    self_attn: Attention,
    /// On the attention output, before the residual add (Gemma's `post_attention_layernorm`).
    attn_out_norm: Option<Norm>,
    /// Before the MLP (llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`).
    ffn_norm: Norm,
    mlp: Mlp,
    /// On the MLP output, before the residual add (Gemma's `post_feedforward_layernorm`).
    ffn_out_norm: Option<Norm>,
    /// Attends to a sliding window, with the local rotary embedding.
    local: bool,
}

impl Block {
    /// The layer's projections with their HF names (relative to `model.layers.N`).
    fn projections_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        let mut out = vec![
            ("self_attn.q_proj", &mut self.self_attn.q_proj),
            ("self_attn.k_proj", &mut self.self_attn.k_proj),
            ("self_attn.v_proj", &mut self.self_attn.v_proj),
            ("self_attn.o_proj", &mut self.self_attn.o_proj),
            ("mlp.up_proj", &mut self.mlp.up_proj),
            ("mlp.down_proj", &mut self.mlp.down_proj),
        ];
        if let Some(gate) = self.mlp.gate_proj.as_mut() {
            out.push(("mlp.gate_proj", gate));
        }
        out
    }

    /// The layer's trained tensors (variables): weights, biases and norms in a full run, the
    /// adapter's matrices in a LoRA run.
    fn variables(&mut self) -> Vec<Tensor> {
        let mut out = Vec::new();
        let mut norms = vec![&self.attn_norm, &self.ffn_norm];
        norms.extend(self.attn_out_norm.iter());
        norms.extend(self.ffn_out_norm.iter());
        norms.extend(self.self_attn.q_norm.iter());
        norms.extend(self.self_attn.k_norm.iter());
        for n in norms {
            out.push(n.weight.clone());
            out.extend(n.bias.iter().cloned());
        }
        for (_, l) in self.projections_mut() {
            match l {
                Linear::Dense(d) => {
                    out.push(d.weight().clone());
                    out.extend(d.bias().cloned());
                }
                Linear::Lora { a, b, .. } => out.extend([a.clone(), b.clone()]),
                _ => {}
            }
        }
        out.retain(|t| t.is_variable());
        out
    }

    fn load(w: Weights, cfg: &Config, layer: usize) -> candle_core::Result<Self> {
        let norm = |name: &str| {
            let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
            Norm::load_kind(w.vb.pp(name), h, eps, cfg.family.layer_norm)
        };
        let sandwich = cfg.family.sandwich_norms;
        Ok(Self {
            attn_norm: norm("input_layernorm")?,
            self_attn: Attention::load(w.pp("self_attn"), cfg)?,
            attn_out_norm: sandwich
                .then(|| norm("post_attention_layernorm"))
                .transpose()?,
            ffn_norm: norm(if sandwich {
                "pre_feedforward_layernorm"
            } else {
                "post_attention_layernorm"
            })?,
            mlp: Mlp::load(w.pp("mlp"), cfg)?,
            ffn_out_norm: sandwich
                .then(|| norm("post_feedforward_layernorm"))
                .transpose()?,
            local: cfg.family.is_local(layer),
        })
    }

    /// x + attn(norm(x)), then + mlp(norm(·)), with the family's extra output norms.
    fn forward(
        &self,
        x: Tensor,
        rope: &RopeAt,
        mask: Option<&Tensor>,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        value: Option<(Tensor, &Tensor)>,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        let out_norm = |norm, h| Norm::apply_if(norm, h, differentiable);
        let h = self.attn_norm.forward(&x, differentiable)?;
        let h = self
            .self_attn
            .forward(&h, rope, mask, kv, value, differentiable)?;
        let x = (x + out_norm(&self.attn_out_norm, h)?)?;
        let h = self.ffn_norm.forward(&x, differentiable)?;
        let h = out_norm(&self.ffn_out_norm, self.mlp.forward(&h, differentiable)?)?;
        x + h
    }
}

/// Gradients of a checkpointed layer's variables, computed in its backward pass (see
/// [`LayerCheckpoint`]) outside the GradStore of the pass: the training loop adds them.
#[derive(Debug, Default)]
pub struct GradSink(std::sync::Mutex<Vec<(Tensor, Tensor)>>);

impl GradSink {
    /// Every (variable, gradient) collected since the last call.
    pub fn drain(&self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// One layer of a training pass with gradient checkpointing: the forward pass keeps only the
/// layer's input and output (none of its intermediates); the backward pass runs the layer again
/// from the input, with the same ops (and the same dropout masks, which are keyed, not drawn),
/// and back-propagates through that copy: the input's gradient goes on through the pass, the
/// layer's variables' gradients into the [`GradSink`]. Activation memory is then one layer's,
/// not every layer's, for a second forward pass's time.
struct LayerCheckpoint {
    block: Block,
    variables: Vec<Tensor>,
    rope: RopeAt,
    mask: Option<Tensor>,
    sink: std::sync::Arc<GradSink>,
}

impl LayerCheckpoint {
    fn run(&self, x: Tensor) -> candle_core::Result<Tensor> {
        self.block
            .forward(x, &self.rope, self.mask.as_ref(), None, None, true)
    }
}

impl candle_core::CustomOp1 for LayerCheckpoint {
    fn name(&self) -> &'static str {
        "layer-checkpoint"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = super::layers::contiguous_f32(storage, layout, self.name())?;
        let x = Tensor::from_slice(x, layout.shape(), &Device::Cpu)?;
        // The graph this builds (through the variables) is dropped with `y`.
        let y = self.run(x)?.detach();
        let shape = y.shape().clone();
        let values = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((candle_core::CpuStorage::F32(values), shape))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let x = candle_core::Var::from_tensor(&arg.detach())?;
        let y = self.run(x.as_tensor().clone())?;
        let store = (y * grad_res.detach())?.sum_all()?.backward()?;
        let mut sink = self.sink.0.lock().unwrap_or_else(|p| p.into_inner());
        for v in &self.variables {
            if let Some(g) = store.get(v) {
                sink.push((v.clone(), g.clone()));
            }
        }
        Ok(store.get(x.as_tensor()).cloned())
    }
}

/// A decoder-only transformer with its LM head.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed_tokens: Embedding,
    /// Learned absolute positions (GPT-2): row p is added at position p.
    embed_positions: Option<Embedding>,
    layers: Vec<Block>,
    norm: Norm,
    lm_head: Linear,
    /// The final norm and head in f32 when the weights are f16/bf16: logits near 20 in f16 are
    /// rounded in steps of 1/64, which moves log-probs by up to ~0.01 (inference only).
    head_f32: Option<(Norm, Linear)>,
    rope: RotaryEmbedding,
    /// The local layers' rotary embedding, when the family has a sliding window.
    rope_local: Option<RotaryEmbedding>,
    cfg: Config,
    dtype: DType,
    device: Device,
    /// The fused CPU path for short inputs, when every projection is packed (GGUF, CPU, f32).
    fused: Option<std::sync::Arc<super::fused::Fused>>,
    /// What nanochat adds around the layers (embedding norm and smear, residual mixes, value
    /// embeddings, backout).
    extras: Option<std::sync::Arc<Extras>>,
    /// Training with gradient checkpointing per layer (f32 on the CPU), the variables'
    /// gradients collected here.
    checkpointing: Option<std::sync::Arc<GradSink>>,
    /// f32 (exact) or llama.cpp's arithmetic.
    activations: Activations,
}

impl Decoder {
    /// Loads from HF names (`model.layers.N.self_attn.q_proj.weight`, ...).
    pub fn load(vb: VarBuilder, cfg: &Config) -> candle_core::Result<Self> {
        Self::load_packed(vb, cfg, PackedWeights::new())
    }

    /// Like [`Self::load`], with packed matrices (GGUF blocks, f32 on the CPU) in place of the
    /// dense weights of the same names: `vb` then holds only the rest (norms, biases, weights
    /// in formats without a packed kernel). With every projection packed (and f32 on the CPU),
    /// the families the fused short-input path implements also get it (see `build_fused`).
    pub fn load_packed(
        vb: VarBuilder,
        cfg: &Config,
        packed: PackedWeights,
    ) -> candle_core::Result<Self> {
        let any_packed = !packed.is_empty();
        let w = Weights::new(vb.clone(), packed);
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let embed_tokens = Embedding::load(&w, cfg.vocab_size, cfg.hidden_size)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Block::load(w.pp(format!("model.layers.{i}")), cfg, i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let norm = Norm::load_kind(
            vb.pp("model.norm"),
            cfg.hidden_size,
            cfg.rms_norm_eps,
            cfg.family.layer_norm,
        )?;
        let embed_positions = match cfg.family.learned_positions {
            true => Some(Embedding::load_named(
                &w,
                "model.embed_positions",
                cfg.max_position_embeddings,
                cfg.hidden_size,
            )?),
            false => None,
        };
        // A checkpoint without lm_head shares the embedding matrix (tied embeddings).
        let has_head = vb.contains_tensor("lm_head.weight") || w.packed("lm_head.weight").is_some();
        let lm_head = if cfg.tie_word_embeddings || !has_head {
            embed_tokens.as_linear()
        } else {
            Linear::load(w.pp("lm_head"), cfg.hidden_size, cfg.vocab_size)?
        };
        let inv_freq = cfg.rope_inv_freq().map_err(candle_core::Error::Msg)?;
        let rope = RotaryEmbedding::new(&inv_freq);
        let rope_local = match cfg.family.sliding {
            Some(s) => {
                let local = cfg.with_rope_theta(s.local_rope_theta).rope_inv_freq();
                Some(RotaryEmbedding::new(
                    &local.map_err(candle_core::Error::Msg)?,
                ))
            }
            None => None,
        };
        let head_f32 = match (&lm_head, dtype) {
            (_, DType::F32) => None,
            (Linear::Dense(l), _) => Some((
                Norm {
                    weight: norm.weight.to_dtype(DType::F32)?,
                    bias: norm
                        .bias
                        .as_ref()
                        .map(|b| b.to_dtype(DType::F32))
                        .transpose()?,
                    eps: norm.eps,
                },
                Linear::dense(l.weight().to_dtype(DType::F32)?),
            )),
            _ => None,
        };
        let extras = match cfg.family.arch == super::family::ArchRef(&nanochat::Nanochat) {
            true => Some(std::sync::Arc::new(Extras::load(vb.clone(), cfg)?)),
            false => None,
        };
        let mut model = Self {
            checkpointing: None,
            extras,
            embed_tokens,
            embed_positions,
            layers,
            norm,
            lm_head,
            head_f32,
            rope,
            rope_local,
            cfg: cfg.clone(),
            dtype,
            device,
            fused: None,
            activations: Activations::F32,
        };
        if any_packed {
            model.fused = model.build_fused().map(std::sync::Arc::new);
        }
        Ok(model)
    }

    /// Puts a LoRA adapter beside the projections it targets (unmerged: the base weights are
    /// untouched). Every pair must fit its projection; the fused short-input path, which
    /// knows only plain packed projections, is turned off.
    pub fn apply_adapter(
        &mut self,
        adapter: &super::lora::Adapter,
        dropout: Option<&std::sync::Arc<super::lora::DropoutKey>>,
    ) -> Result<(), String> {
        let scale = adapter.config.scale();
        let mut keys: Vec<&(usize, String)> = adapter.pairs.keys().collect();
        keys.sort();
        for key in keys {
            let (layer, module) = key;
            let pair = &adapter.pairs[key];
            let Some(block) = self.layers.get_mut(*layer) else {
                return Err(format!(
                    "layer {layer}: the base has {} layers",
                    self.cfg.num_hidden_layers
                ));
            };
            let Some((_, slot)) = block
                .projections_mut()
                .into_iter()
                .find(|(name, _)| name == module)
            else {
                return Err(format!(
                    "layer {layer}: the base ({}) has no projection `{module}`",
                    self.cfg.family.arch.name()
                ));
            };
            let (out, inp) = slot.dims().map_err(|e| e.to_string())?;
            let (a_r, a_in) = pair.a.dims2().map_err(|e| e.to_string())?;
            let (b_out, b_r) = pair.b.dims2().map_err(|e| e.to_string())?;
            if a_in != inp || b_out != out || a_r != b_r {
                return Err(format!(
                    "layer {layer} {module}: lora_A is {a_r} × {a_in} and lora_B {b_out} × {b_r}, \
                     but the base's projection is {out} × {inp}: the adapter was made for another base"
                ));
            }
            let a = pair.a.to_device(&self.device).map_err(|e| e.to_string())?;
            let b = pair.b.to_device(&self.device).map_err(|e| e.to_string())?;
            let salt = (*layer as u64) << 8
                | super::lora::MODULES
                    .iter()
                    .position(|(_, path)| path == module)
                    .unwrap_or(0) as u64;
            *slot = Linear::Lora {
                base: Box::new(slot.clone()),
                a,
                b,
                scale,
                dropout: dropout.map(|d| (d.clone(), salt)),
            };
        }
        self.fused = None;
        Ok(())
    }

    /// Replaces the dense projections with quantized ones (for `--dtype gguf`).
    pub fn with_quantized(mut self, mut take: impl FnMut(&str) -> Option<QMatMul>) -> Self {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (name, slot) in layer.projections_mut() {
                if let Some(q) = take(&format!("model.layers.{i}.{name}.weight")) {
                    let bias = match &*slot {
                        Linear::Dense(l) => l.bias().cloned(),
                        _ => None,
                    };
                    *slot = Linear::Quantized(q, bias);
                }
            }
        }
        if let Some(q) = take("lm_head.weight") {
            self.lm_head = Linear::Quantized(q, None);
        }
        self
    }

    /// The fused short-input path needs f32 on the CPU, a family it implements
    /// ([`Family::fused_supported`](super::config::Family::fused_supported): no soft-capping,
    /// none of GPT-2's LayerNorm, learned positions, dense biases or ungated MLP) and every
    /// projection packed (biases only on q/k/v); within that it runs the families' extras
    /// (q/k/v biases, q/k norms, sandwich norms, GELU, embedding scale, sliding windows,
    /// attention scalar).
    fn build_fused(&self) -> Option<super::fused::Fused> {
        use super::fused::{Fused, FusedLayer, LocalAttention};
        if self.dtype != DType::F32 || !self.device.is_cpu() || !self.cfg.family.fused_supported() {
            return None;
        }
        let packed = |l: &Linear| match l {
            Linear::Packed(p, None) => Some(p.clone()),
            _ => None,
        };
        let vector = |t: &Tensor| t.flatten_all().ok()?.to_vec1::<f32>().ok();
        let biased = |l: &Linear| match l {
            Linear::Packed(p, bias) => Some((p.clone(), bias.as_ref().and_then(vector))),
            _ => None,
        };
        let norm = |n: &Norm| n.is_rms().then(|| vector(&n.weight))?;
        let norm_opt = |n: &Option<Norm>| n.as_ref().map(norm);
        // `None` when the norm exists but cannot be read.
        let out_norm = |n: &Option<Norm>| match n {
            None => Some(None),
            Some(n) => norm(n).map(Some),
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                let ((q, qb), (k, kb), (v, vb)) =
                    (biased(&a.q_proj)?, biased(&a.k_proj)?, biased(&a.v_proj)?);
                let qkv_bias = match (qb, kb, vb) {
                    (Some(q), Some(k), Some(v)) => Some([q, k, v]),
                    (None, None, None) => None,
                    _ => return None,
                };
                let qk_norm = match (norm_opt(&a.q_norm), norm_opt(&a.k_norm)) {
                    (Some(q), Some(k)) => Some([q?, k?]),
                    (None, None) => None,
                    _ => return None,
                };
                Some(FusedLayer {
                    attn_norm: norm(&l.attn_norm)?,
                    q,
                    k,
                    v,
                    qkv_bias,
                    qk_norm,
                    o: packed(&a.o_proj)?,
                    attn_out_norm: out_norm(&l.attn_out_norm)?,
                    mlp_norm: norm(&l.ffn_norm)?,
                    gate: packed(l.mlp.gate_proj.as_ref()?)?,
                    up: packed(&l.mlp.up_proj)?,
                    down: packed(&l.mlp.down_proj)?,
                    mlp_out_norm: out_norm(&l.ffn_out_norm)?,
                    local: l.local,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        let local = match (self.cfg.family.sliding, &self.rope_local) {
            (Some(s), Some(rope)) => Some(LocalAttention {
                window: s.window,
                rope: rope.clone(),
            }),
            (None, _) => None,
            _ => return None,
        };
        let hd = self.cfg.head_dim();
        Some(Fused {
            layers,
            norm: norm(&self.norm)?,
            head: packed(&self.lm_head)?,
            embed: self.embed_tokens.clone(),
            rope: self.rope.clone(),
            context: self.cfg.max_position_embeddings,
            local,
            embed_scale: self
                .cfg
                .family
                .embed_scale
                .then(|| (self.cfg.hidden_size as f32).sqrt()),
            attn_scale: (1.0 / self.cfg.family.attn_scalar.unwrap_or(hd as f64).sqrt()) as f32,
            activation: self.cfg.family.activation,
            hidden: self.cfg.hidden_size,
            n_head: self.cfg.num_attention_heads,
            n_kv_head: self.cfg.n_kv_heads(),
            head_dim: hd,
            intermediate: self.cfg.intermediate_size,
            eps: self.cfg.rms_norm_eps as f32,
            llama_cpp: self.activations == Activations::Q8,
        })
    }

    /// Runs attention and the GELU in llama.cpp's arithmetic with [`Activations::Q8`] (the
    /// packed matrices carry their own setting: [`super::packed::PackedMatrix::with_activations`]).
    pub fn with_activations(mut self, activations: Activations) -> Self {
        let q8 = activations == Activations::Q8;
        self.activations = activations;
        for layer in &mut self.layers {
            layer.self_attn.f16_attention = q8;
            layer.mlp.gelu_table = q8;
        }
        if self.fused.is_some() {
            self.fused = self.build_fused().map(std::sync::Arc::new);
        }
        self
    }

    /// The arithmetic the model runs in.
    pub fn activations(&self) -> Activations {
        self.activations
    }

    /// Trains with gradient checkpointing per layer from now on (f32 on the CPU, families
    /// without nanochat's extras): [`Self::forward_train`] keeps one layer's activations at a
    /// time and recomputes each in the backward pass; the variables' gradients are collected
    /// in the returned sink, which the training loop adds to the pass's.
    pub fn checkpoint_layers(&mut self, on: bool) -> Option<std::sync::Arc<GradSink>> {
        let able = self.dtype == DType::F32 && self.device.is_cpu() && self.extras.is_none();
        self.checkpointing = (on && able).then(|| std::sync::Arc::new(GradSink::default()));
        self.checkpointing.clone()
    }

    /// The sink of checkpointed layers' gradients, when training with checkpointing.
    pub fn grad_sink(&self) -> Option<&std::sync::Arc<GradSink>> {
        self.checkpointing.as_ref()
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
        let hidden = self.hidden_states(ids, cache, None)?;
        let last = hidden.narrow(1, t - 1, 1)?;
        self.logits(&last)?.squeeze(1)
    }

    /// Final norm and head over hidden states (b, t, hidden) → f32 logits (b, t, vocab), in f32
    /// whatever the weights' dtype.
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let logits = match &self.head_f32 {
            Some((norm, head)) => {
                head.forward(&norm.forward(&hidden.to_dtype(DType::F32)?, false)?)?
            }
            None => self
                .lm_head
                .forward(&self.norm.forward(hidden, false)?)?
                .to_dtype(DType::F32)?,
        };
        self.cap_logits(logits)
    }

    /// The family's final soft-capping, `cap · tanh(logit / cap)` (Gemma 2), if any.
    fn cap_logits(&self, logits: Tensor) -> candle_core::Result<Tensor> {
        match self.cfg.family.final_softcap {
            Some(cap) => (logits / cap)?.tanh()? * cap,
            None => Ok(logits),
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
        let hidden = self.hidden_states(ids, cache, None)?;
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
        let hidden = self.hidden_states(ids, cache, None)?;
        self.logits(&hidden)
    }

    /// [`Self::next_logits`] (the same path, so the same logits) that also returns the
    /// residual stream at the last position after each layer, in f32: what the logit lens
    /// reads (see [`Self::lens_logits`]).
    pub fn next_logits_with_layers(
        &self,
        ids: &[u32],
        cache: &mut Cache,
    ) -> candle_core::Result<(Vec<f32>, Vec<Vec<f32>>)> {
        if let Some(fused) = self.fused.as_ref().filter(|f| f.accepts(ids.len())) {
            return fused.forward_with_layers(ids, cache);
        }
        let t = ids.len();
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        let mut layers = Vec::with_capacity(self.layers.len());
        let hidden = self.hidden_states(&input, cache, Some(&mut layers))?;
        let last = hidden.narrow(1, t - 1, 1)?;
        let logits = self.logits(&last)?.squeeze(1)?.squeeze(0)?.to_vec1()?;
        Ok((logits, layers))
    }

    /// The logit lens: the model's own final norm and head (and whatever the family applies
    /// after them, as [`Self::logits`] does) on residual-stream vectors; f32 logits for each.
    pub fn lens_logits(&self, hidden: &[Vec<f32>]) -> candle_core::Result<Vec<Vec<f32>>> {
        if hidden.is_empty() {
            return Ok(Vec::new());
        }
        let h = self.cfg.hidden_size;
        let flat: Vec<f32> = hidden.concat();
        let x = Tensor::from_vec(flat, (1, hidden.len(), h), &self.device)?.to_dtype(self.dtype)?;
        self.logits(&x)?.squeeze(0)?.to_vec2()
    }

    /// Runs `ids` after `cache` through the layers (candle's ops); with `layers`, also collects
    /// the residual stream at the last position after each layer.
    fn hidden_states(
        &self,
        ids: &Tensor,
        cache: &mut Cache,
        layers: Option<&mut Vec<Vec<f32>>>,
    ) -> candle_core::Result<Tensor> {
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
        let prev = self.token_before(cache)?;
        let x = self.embed(ids, offset)?;
        let pass = self.pass_inputs(t, offset)?;
        let x = self.run_layers(
            ids,
            x,
            prev.as_ref(),
            &pass,
            Some(&mut cache.kvs),
            layers,
            false,
        )?;
        if self.extras.is_some() {
            let rows: Vec<Vec<u32>> = ids.to_vec2()?;
            cache.tokens.resize(rows.len(), Vec::new());
            for (kept, row) in cache.tokens.iter_mut().zip(rows) {
                kept.extend(row);
            }
        }
        cache.len = offset + t;
        Ok(x)
    }

    /// The normed embedding (b, 1, h) of the cached position before a pass, where the model
    /// reads it (nanochat's smear) and the cache is not empty.
    fn token_before(&self, cache: &Cache) -> candle_core::Result<Option<Tensor>> {
        let Some(extras) = &self.extras else {
            return Ok(None);
        };
        if cache.len == 0 {
            return Ok(None);
        }
        let last: Vec<u32> = cache
            .tokens
            .iter()
            .map(|t| t.last().copied())
            .collect::<Option<_>>()
            .filter(|l: &Vec<u32>| {
                !l.is_empty() && cache.tokens.iter().all(|t| t.len() == cache.len)
            })
            .ok_or_else(|| {
                candle_core::Error::Msg("the cache does not record its tokens".into())
            })?;
        let n = last.len();
        let ids = Tensor::from_vec(last, (n, 1), &self.device)?;
        Ok(Some(extras.normed(&self.embed_tokens.forward(&ids)?)?))
    }

    /// The layers over embeddings `x` of `ids` (with nanochat's extras around them, `prev`
    /// the position before the first), appending to the KV cache `kvs` if given and
    /// collecting the residual stream at the last position after each layer into `layers`.
    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        ids: &Tensor,
        x: Tensor,
        prev: Option<&Tensor>,
        pass: &PassInputs,
        mut kvs: Option<&mut Vec<Option<(Tensor, Tensor)>>>,
        mut layers: Option<&mut Vec<Vec<f32>>>,
        differentiable: bool,
    ) -> candle_core::Result<Tensor> {
        let t = x.dim(1)?;
        let extras = self.extras.as_deref();
        let (mut x, x0) = match extras {
            Some(e) => {
                let x0 = e.embed(&x, prev, differentiable)?;
                (x0.clone(), Some(x0))
            }
            None => (x, None),
        };
        let mut mid = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let (rope, mask) = pass.for_layer(layer);
            let mut value = None;
            if let (Some(e), Some(x0)) = (extras, &x0) {
                x = e.mix(i, &x, x0)?;
                value = e.value_embedding(i, ids)?;
            }
            let kv = kvs.as_deref_mut().and_then(|k| k.get_mut(i));
            x = match (
                &self.checkpointing,
                differentiable && kv.is_none() && value.is_none(),
            ) {
                (Some(sink), true) => {
                    let mut block = layer.clone();
                    let op = LayerCheckpoint {
                        variables: block.variables(),
                        block,
                        rope: rope.clone(),
                        mask: mask.cloned(),
                        sink: sink.clone(),
                    };
                    // The first layer's input (frozen embeddings) carries no graph: as a
                    // variable it does, so that the op's backward pass is reached.
                    let x = match x.track_op() {
                        true => x.contiguous()?,
                        false => candle_core::Var::from_tensor(&x.contiguous()?)?.into_inner(),
                    };
                    x.apply_op1(op)?
                }
                _ => layer.forward(x, rope, mask, kv, value, differentiable)?,
            };
            if extras.is_some_and(|e| e.backout_layer() == i) {
                mid = Some(x.clone());
            }
            if let Some(out) = layers.as_deref_mut() {
                let last = x.narrow(1, t - 1, 1)?.flatten_all()?;
                out.push(last.to_dtype(DType::F32)?.to_vec1()?);
            }
        }
        match (extras, mid) {
            (Some(e), Some(mid)) => e.backout(&x, &mid),
            _ => Ok(x),
        }
    }

    /// Token embeddings, times √hidden_size where the family scales them (the factor rounded
    /// to the weights' dtype, as HF computes it), plus the learned embeddings of positions
    /// `offset..` where the family has them.
    fn embed(&self, ids: &Tensor, offset: usize) -> candle_core::Result<Tensor> {
        let x = self.embed_tokens.forward(ids)?;
        if let Some(positions) = &self.embed_positions {
            let (b, t) = ids.dims2()?;
            let at = Tensor::arange(offset as u32, (offset + t) as u32, &self.device)?;
            let p = positions.forward(&at)?.unsqueeze(0)?;
            return x.broadcast_add(&p.expand((b, t, self.cfg.hidden_size))?);
        }
        if !self.cfg.family.embed_scale {
            return Ok(x);
        }
        let scale = Tensor::new(&[(self.cfg.hidden_size as f32).sqrt()], &self.device)?
            .to_dtype(self.dtype)?;
        x.broadcast_mul(&scale)
    }

    /// The rotary tables and causal masks ((t, offset + t)) of t new positions after `offset`:
    /// the global ones and, with a sliding window, the local layers' own.
    fn pass_inputs(&self, t: usize, offset: usize) -> candle_core::Result<PassInputs> {
        let (dtype, dev) = (self.dtype, &self.device);
        let global = (
            self.rope.at(offset, t, dtype, dev)?,
            causal_mask(t, offset, None, dtype, dev)?,
        );
        let local = match (self.cfg.family.sliding, &self.rope_local) {
            (Some(s), Some(rope)) => Some((
                rope.at(offset, t, dtype, dev)?,
                causal_mask(t, offset, Some(s.window), dtype, dev)?,
            )),
            _ => None,
        };
        Ok(PassInputs { global, local })
    }

    /// Training: every op has a backward pass; returns logits (b, t, vocab) in the model dtype.
    pub fn forward_train(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (_b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!("sequence longer than the model's context");
        }
        let x = self.embed(ids, 0)?;
        let pass = self.pass_inputs(t, 0)?;
        let x = self.run_layers(ids, x, None, &pass, None, None, true)?;
        self.cap_logits(self.lm_head.forward(&self.norm.forward(&x, true)?)?)
    }
}

/// Rotary tables and additive masks (`None` where no position needs masking) for one pass.
struct PassInputs {
    global: (RopeAt, Option<Tensor>),
    /// The local layers' own, with a sliding window.
    local: Option<(RopeAt, Option<Tensor>)>,
}

impl PassInputs {
    fn for_layer(&self, layer: &Block) -> (&RopeAt, Option<&Tensor>) {
        let (rope, mask) = match (&self.local, layer.local) {
            (Some(local), true) => local,
            _ => &self.global,
        };
        (rope, mask.as_ref())
    }
}

/// Names and shapes of every parameter, in HF naming (tied models have no `lm_head`).
pub fn parameter_shapes(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let hd = cfg.head_dim();
    let (nh, nkv) = (cfg.num_attention_heads, cfg.n_kv_heads());
    let f = &cfg.family;
    let mut out = vec![
        ("model.embed_tokens.weight".to_string(), vec![v, h]),
        ("model.norm.weight".to_string(), vec![h]),
    ];
    if f.layer_norm {
        out.push(("model.norm.bias".to_string(), vec![h]));
    }
    if f.learned_positions {
        let n = cfg.max_position_embeddings;
        out.push(("model.embed_positions.weight".to_string(), vec![n, h]));
    }
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![nh * hd, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![nkv * hd, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![nkv * hd, h]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, nh * hd]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
        if f.gated_mlp {
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        }
        if f.layer_norm {
            out.extend([
                (format!("{p}.input_layernorm.bias"), vec![h]),
                (format!("{p}.post_attention_layernorm.bias"), vec![h]),
            ]);
        }
        if f.dense_bias {
            out.extend([
                (format!("{p}.self_attn.o_proj.bias"), vec![h]),
                (format!("{p}.mlp.up_proj.bias"), vec![i]),
                (format!("{p}.mlp.down_proj.bias"), vec![h]),
            ]);
        }
        if cfg.family.sandwich_norms {
            out.extend([
                (format!("{p}.pre_feedforward_layernorm.weight"), vec![h]),
                (format!("{p}.post_feedforward_layernorm.weight"), vec![h]),
            ]);
        }
        if cfg.family.qk_norm {
            out.extend([
                (format!("{p}.self_attn.q_norm.weight"), vec![hd]),
                (format!("{p}.self_attn.k_norm.weight"), vec![hd]),
            ]);
        }
        if cfg.family.qkv_bias {
            out.extend([
                (format!("{p}.self_attn.q_proj.bias"), vec![nh * hd]),
                (format!("{p}.self_attn.k_proj.bias"), vec![nkv * hd]),
                (format!("{p}.self_attn.v_proj.bias"), vec![nkv * hd]),
            ]);
        }
    }
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}
