//! The fused CPU path for short inputs: one sequence, at most [`MAX_TOKENS`] new tokens (a short
//! prompt, a prompt's last tokens after the prefix cache, or one decoding step).
//!
//! Such a pass is dominated not by arithmetic but by fixed costs: through candle it is ≈ 30
//! tensor operations per layer, each allocating its output and dispatching to the thread pool.
//! Here a layer is straight-line code over a few reusable buffers: RMS norm, q/k/v in one
//! packed-kernel pass, rotary embedding, attention over the KV cache, o_proj, RMS norm,
//! gate/up in one pass, SiLU, down_proj. The maths is the same as [`super::decoder`]'s inference
//! path — same formulas, same f32 activations, same weights — only summation orders differ
//! (tests hold the two within 1e-4 over the vocabulary).

use std::sync::Arc;

use rayon::prelude::*;

use super::config::Activation;
use super::kv_cache::Cache;
use super::layers::{gated_in, RotaryEmbedding};
use super::packed::{matmul_many, PackedMatrix, MAX_ROWS};
use super::q8;
use super::simd;

/// One decoder layer's weights for the fused path, with the family's extras.
#[derive(Debug, Clone)]
pub(crate) struct FusedLayer {
    pub attn_norm: Vec<f32>,
    pub q: Arc<PackedMatrix>,
    pub k: Arc<PackedMatrix>,
    pub v: Arc<PackedMatrix>,
    /// Biases of q, k and v (Qwen2).
    pub qkv_bias: Option<[Vec<f32>; 3]>,
    /// Per-head RMS norms of queries and keys, before the rotary embedding (Gemma 3).
    pub qk_norm: Option<[Vec<f32>; 2]>,
    pub o: Arc<PackedMatrix>,
    /// Norm of the attention output before the residual add (Gemma's sandwich norms).
    pub attn_out_norm: Option<Vec<f32>>,
    pub mlp_norm: Vec<f32>,
    pub gate: Arc<PackedMatrix>,
    pub up: Arc<PackedMatrix>,
    pub down: Arc<PackedMatrix>,
    /// Norm of the MLP output before the residual add.
    pub mlp_out_norm: Option<Vec<f32>>,
    /// Attends to a sliding window with the local rotary embedding.
    pub local: bool,
}

/// Sliding-window attention of the local layers (Gemma 3).
#[derive(Debug, Clone)]
pub(crate) struct LocalAttention {
    /// A query sees itself and the `window` − 1 positions before it.
    pub window: usize,
    /// The local layers' own rotary embedding.
    pub rope: RotaryEmbedding,
}

#[derive(Debug, Clone)]
pub(crate) struct Fused {
    pub layers: Vec<FusedLayer>,
    pub norm: Vec<f32>,
    pub head: Arc<PackedMatrix>,
    /// The token embeddings, shared with the candle path.
    pub embed: super::layers::Embedding,
    /// The same rotary embedding as the candle path's.
    pub rope: RotaryEmbedding,
    /// Positions the model takes (its context length).
    pub context: usize,
    pub local: Option<LocalAttention>,
    /// Multiplies the embeddings (√hidden, Gemma).
    pub embed_scale: Option<f32>,
    /// Multiplies the attention scores (1/√head_dim, or Gemma's 1/√query_pre_attn_scalar).
    pub attn_scale: f32,
    pub activation: Activation,
    pub hidden: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub intermediate: usize,
    pub eps: f32,
    /// llama.cpp's arithmetic around the matmuls (`--activations q8`; the packed matrices
    /// carry their own): keys, values, queries and attention weights rounded to f16, GELU
    /// through ggml's f16 table.
    pub llama_cpp: bool,
}

/// Reusable activations of one pass.
struct Buffers {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// Each row's rotary cos/sin, (t, head_dim / 2): global, then the local layers' own.
    rope: RowTables,
    rope_local: Option<RowTables>,
}

/// cos and sin per row at the row's position.
#[derive(Default)]
struct RowTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RowTables {
    fn new(rope: &RotaryEmbedding, segments: &[Segment]) -> Self {
        let mut t = Self::default();
        for g in segments {
            rope.extend_tables(g.offset..g.offset + g.len, &mut t.cos, &mut t.sin);
        }
        t
    }
}

/// Up to this many new tokens take the fused path, in pieces of [`MAX_ROWS`]; longer inputs
/// go through candle's dense GEMM, which wins once there is enough arithmetic to amortise
/// reading the f32 weights (measured on the default model, 2 cores: 32 tokens 71 ms fused vs
/// 101 ms dense, 64 tokens 153 vs 146 ms).
pub(crate) const MAX_TOKENS: usize = 48;

/// Consecutive rows of a piece that belong to one sequence.
#[derive(Clone, Copy)]
struct Segment {
    /// Index of the sequence (and of its cache).
    seq: usize,
    /// First row in the piece.
    start: usize,
    /// Number of rows.
    len: usize,
    /// Positions already in the sequence's cache before these rows.
    offset: usize,
}

impl Fused {
    /// Whether `t` new tokens after a cache can take this path.
    pub fn accepts(&self, t: usize) -> bool {
        (1..=MAX_TOKENS).contains(&t)
    }

    /// Runs `ids` after the positions in `cache`, appends their keys and values to it, and
    /// returns the logits of the last position.
    pub fn forward(&self, ids: &[u32], cache: &mut Cache) -> candle_core::Result<Vec<f32>> {
        let mut out = self.run(&[ids], &mut [cache], None)?;
        out.pop()
            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))
    }

    /// [`Self::forward`], also returning the residual stream at the last position after each
    /// layer (the logit lens's input).
    pub fn forward_with_layers(
        &self,
        ids: &[u32],
        cache: &mut Cache,
    ) -> candle_core::Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut out = self.run(&[ids], &mut [cache], Some(&mut layers))?;
        let logits = out
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no logits".into()))?;
        Ok((logits, layers))
    }

    /// Several sequences at once (dynamic batching): their new tokens, one after the other and
    /// without padding, are the rows of pieces of up to [`MAX_ROWS`], so each weight block is
    /// read and converted once per piece rather than once per sequence. Each row attends only
    /// to its own sequence's cache. Returns each sequence's last-position logits.
    pub fn forward_many(
        &self,
        seqs: &[&[u32]],
        caches: &mut [&mut Cache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        self.run(seqs, caches, None)
    }

    /// [`Self::forward_many`]; with `layers`, also collects the last row's residual stream
    /// after each layer (meaningful for one sequence: its last position).
    fn run(
        &self,
        seqs: &[&[u32]],
        caches: &mut [&mut Cache],
        mut layers: Option<&mut Vec<Vec<f32>>>,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        if seqs.len() != caches.len() {
            candle_core::bail!("one cache per sequence");
        }
        for (ids, cache) in seqs.iter().zip(caches.iter_mut()) {
            if !self.accepts(ids.len()) {
                candle_core::bail!(
                    "the fused path takes 1 to {MAX_TOKENS} tokens, not {}",
                    ids.len()
                );
            }
            let total = cache.len + ids.len();
            let limit = self.context;
            if total > limit {
                candle_core::bail!(
                    "sequence of {total} tokens exceeds the model's context of {limit}"
                );
            }
            if cache.kvs.len() != self.layers.len() {
                **cache = Cache::new(self.layers.len());
            }
        }
        // The whole pass runs on a thread-pool thread: its ~120 parallel matmuls per piece then
        // start from inside the pool (work stealing between threads that are still spinning)
        // instead of each one waking sleeping workers and putting the caller to sleep.
        rayon::scope(|_| {
            // (sequence, token) for every new token, in order.
            let rows: Vec<(usize, u32)> = seqs
                .iter()
                .enumerate()
                .flat_map(|(s, ids)| ids.iter().map(move |&id| (s, id)))
                .collect();
            let h = self.hidden;
            let mut last = vec![0f32; seqs.len() * h];
            let pieces = rows.len().div_ceil(MAX_ROWS);
            for (p, piece) in rows.chunks(MAX_ROWS).enumerate() {
                let mut segments: Vec<Segment> = Vec::new();
                for (i, &(seq, _)) in piece.iter().enumerate() {
                    match segments.last_mut() {
                        Some(g) if g.seq == seq => g.len += 1,
                        _ => segments.push(Segment {
                            seq,
                            start: i,
                            len: 1,
                            offset: caches[seq].len,
                        }),
                    }
                }
                let ids: Vec<u32> = piece.iter().map(|&(_, id)| id).collect();
                let observe = layers.as_deref_mut().filter(|_| p + 1 == pieces);
                let x = self.piece(&ids, &segments, caches, observe)?;
                for g in &segments {
                    let row = g.start + g.len - 1;
                    last[g.seq * h..(g.seq + 1) * h].copy_from_slice(&x[row * h..(row + 1) * h]);
                }
            }
            let mut normed = vec![0f32; seqs.len() * h];
            for (x, n) in last.chunks_exact(h).zip(normed.chunks_exact_mut(h)) {
                rms_norm(x, &self.norm, self.eps, n);
            }
            let vocab = self.head.rows();
            let mut logits = Vec::with_capacity(seqs.len());
            for group in normed.chunks(MAX_ROWS * h) {
                let n = group.len() / h;
                let mut out = vec![0f32; n * vocab];
                matmul_many(&mut [(&self.head, &mut out)], group, n);
                logits.extend(out.chunks_exact(vocab).map(<[f32]>::to_vec));
            }
            Ok(logits)
        })
    }

    /// Runs one piece (at most [`MAX_ROWS`] rows, made of `segments`) through the layers and
    /// advances each segment's cache; returns the rows' final hidden states.
    fn piece(
        &self,
        ids: &[u32],
        segments: &[Segment],
        caches: &mut [&mut Cache],
        mut observe: Option<&mut Vec<Vec<f32>>>,
    ) -> candle_core::Result<Vec<f32>> {
        let t = ids.len();
        let (h, qd, kvd) = (
            self.hidden,
            self.n_head * self.head_dim,
            self.n_kv_head * self.head_dim,
        );
        let mut b = Buffers {
            x: vec![0f32; t * h],
            xn: vec![0f32; t * h],
            q: vec![0f32; t * qd],
            k: vec![0f32; t * kvd],
            v: vec![0f32; t * kvd],
            att: vec![0f32; t * qd],
            o: vec![0f32; t * h],
            gate: vec![0f32; t * self.intermediate],
            up: vec![0f32; t * self.intermediate],
            rope: RowTables::new(&self.rope, segments),
            rope_local: self
                .local
                .as_ref()
                .map(|l| RowTables::new(&l.rope, segments)),
        };
        for (&id, out) in ids.iter().zip(b.x.chunks_exact_mut(h)) {
            self.embed.row_into(id as usize, out)?;
            if let Some(scale) = self.embed_scale {
                out.iter_mut().for_each(|v| *v *= scale);
            }
        }
        for (l, layer) in self.layers.iter().enumerate() {
            self.layer(layer, l, &mut b, segments, caches)?;
            if let Some(out) = observe.as_deref_mut() {
                out.push(b.x[(t - 1) * h..t * h].to_vec());
            }
        }
        for g in segments {
            caches[g.seq].len += g.len;
        }
        Ok(b.x)
    }

    fn layer(
        &self,
        layer: &FusedLayer,
        index: usize,
        b: &mut Buffers,
        segments: &[Segment],
        caches: &mut [&mut Cache],
    ) -> candle_core::Result<()> {
        let t = b.x.len() / self.hidden;
        let (h, hd) = (self.hidden, self.head_dim);
        let (qd, kvd) = (self.n_head * hd, self.n_kv_head * hd);
        for (x, xn) in b.x.chunks_exact(h).zip(b.xn.chunks_exact_mut(h)) {
            rms_norm(x, &layer.attn_norm, self.eps, xn);
        }
        matmul_many(
            &mut [
                (&layer.q, &mut b.q),
                (&layer.k, &mut b.k),
                (&layer.v, &mut b.v),
            ],
            &b.xn,
            t,
        );
        if let Some([qb, kb, vb]) = &layer.qkv_bias {
            for (y, bias) in [(&mut b.q, qb), (&mut b.k, kb), (&mut b.v, vb)] {
                for row in y.chunks_exact_mut(bias.len()) {
                    row.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
                }
            }
        }
        if let Some([qn, kn]) = &layer.qk_norm {
            for (y, norm) in [(&mut b.q, qn), (&mut b.k, kn)] {
                for head in y.chunks_exact_mut(hd) {
                    let x = head.to_vec();
                    rms_norm(&x, norm, self.eps, head);
                }
            }
        }
        let (tables, window) = match (&self.local, &b.rope_local, layer.local) {
            (Some(l), Some(tables), true) => (tables, Some(l.window)),
            _ => (&b.rope, None),
        };
        let half = hd / 2;
        for g in segments {
            let rows = g.start..g.start + g.len;
            let tables = (
                &tables.cos[rows.start * half..rows.end * half],
                &tables.sin[rows.start * half..rows.end * half],
            );
            self.rope(
                &mut b.q[rows.start * qd..rows.end * qd],
                self.n_head,
                tables,
            );
            self.rope(
                &mut b.k[rows.start * kvd..rows.end * kvd],
                self.n_kv_head,
                tables,
            );
            if self.llama_cpp {
                q8::f16_round_all(&mut b.q[rows.start * qd..rows.end * qd]);
                q8::f16_round_all(&mut b.k[rows.start * kvd..rows.end * kvd]);
                q8::f16_round_all(&mut b.v[rows.start * kvd..rows.end * kvd]);
            }
            let cache = &mut *caches[g.seq];
            let kv = cache.host_layer(index, self.n_kv_head, hd)?;
            if kv.len != g.offset {
                candle_core::bail!("KV cache of {} positions, expected {}", kv.len, g.offset);
            }
            kv.append(
                &b.k[rows.start * kvd..rows.end * kvd],
                &b.v[rows.start * kvd..rows.end * kvd],
                kvd,
            );
            attention(
                &b.q[rows.start * qd..rows.end * qd],
                &kv.k[..kv.len * kvd],
                &kv.v[..kv.len * kvd],
                Shape {
                    t: g.len,
                    offset: g.offset,
                    n_head: self.n_head,
                    n_kv_head: self.n_kv_head,
                    head_dim: hd,
                    scale: self.attn_scale,
                    window,
                    f16_weights: self.llama_cpp,
                },
                &mut b.att[rows.start * qd..rows.end * qd],
            );
            // The tensor form of this layer is now behind.
            cache.kvs[index] = None;
        }

        matmul_many(&mut [(&layer.o, &mut b.o)], &b.att, t);
        self.add_residual(&mut b.x, &mut b.o, layer.attn_out_norm.as_deref());
        for (x, xn) in b.x.chunks_exact(h).zip(b.xn.chunks_exact_mut(h)) {
            rms_norm(x, &layer.mlp_norm, self.eps, xn);
        }
        matmul_many(
            &mut [(&layer.gate, &mut b.gate), (&layer.up, &mut b.up)],
            &b.xn,
            t,
        );
        // Across the pool: an exp or a tanh per value is a tenth of a 16-row piece's time.
        let (act, table) = (self.activation, self.llama_cpp);
        b.gate
            .par_chunks_mut(self.intermediate)
            .zip(b.up.par_chunks(self.intermediate))
            .for_each(|(g, u)| {
                for (g, &u) in g.iter_mut().zip(u) {
                    *g = gated_in(act, table, *g, u);
                }
            });
        matmul_many(&mut [(&layer.down, &mut b.o)], &b.gate, t);
        self.add_residual(&mut b.x, &mut b.o, layer.mlp_out_norm.as_deref());
        Ok(())
    }

    /// x += out, the output RMS-normed first where the family has that norm.
    fn add_residual(&self, x: &mut [f32], out: &mut [f32], norm: Option<&[f32]>) {
        if let Some(w) = norm {
            for row in out.chunks_exact_mut(self.hidden) {
                let y = row.to_vec();
                rms_norm(&y, w, self.eps, row);
            }
        }
        for (x, o) in x.iter_mut().zip(out.iter()) {
            *x += o;
        }
    }

    /// Rotary embedding in place on (t, heads, head_dim) with the rows' (t, head_dim/2)
    /// tables, pairing dimension i with i + head_dim/2 (HF's `rotate_half`, candle's `rope`).
    fn rope(&self, x: &mut [f32], heads: usize, tables: (&[f32], &[f32])) {
        let hd = self.head_dim;
        let half = hd / 2;
        for (i, token) in x.chunks_exact_mut(heads * hd).enumerate() {
            let cos = &tables.0[i * half..(i + 1) * half];
            let sin = &tables.1[i * half..(i + 1) * half];
            for head in token.chunks_exact_mut(hd) {
                let (a, b) = head.split_at_mut(half);
                for j in 0..half {
                    let (x1, x2) = (a[j], b[j]);
                    a[j] = x1 * cos[j] - x2 * sin[j];
                    b[j] = x1 * sin[j] + x2 * cos[j];
                }
            }
        }
    }
}

/// RMS norm as candle's fused op computes it: x / sqrt(mean(x²) + eps) · w, in f32.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let sum2: f32 = x.iter().map(|v| v * v).sum();
    let m = (sum2 / x.len() as f32 + eps).sqrt();
    for ((o, x), w) in out.iter_mut().zip(x).zip(w) {
        *o = *x / m * *w;
    }
}

#[derive(Clone, Copy)]
struct Shape {
    t: usize,
    offset: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    /// Multiplies the scores.
    scale: f32,
    /// Sliding window (keys at most `window` − 1 positions back), if any.
    window: Option<usize>,
    /// Attention weights rounded to f16 before they multiply the values (llama.cpp).
    f16_weights: bool,
}

/// Causal attention of the t new queries (t, n_head, head_dim) over the cached keys and values
/// (offset + t, n_kv, head_dim); writes (t, n_head, head_dim). Grouped heads share a KV head.
fn attention(q: &[f32], k: &[f32], v: &[f32], s: Shape, out: &mut [f32]) {
    let total = s.offset + s.t;
    let work = |(item, out): (usize, &mut [f32])| {
        let (i, head) = (item / s.n_head, item % s.n_head);
        let kv_head = head / (s.n_head / s.n_kv_head);
        let qv = &q[item * s.head_dim..(item + 1) * s.head_dim];
        // Query i sits at position offset + i and sees positions from..=offset + i: all of
        // them, or the last `window` in a sliding-window layer.
        let end = s.offset + i + 1;
        let from = s.window.map_or(0, |w| end.saturating_sub(w));
        let stride = s.n_kv_head * s.head_dim;
        let at = Strided {
            first: from * stride + kv_head * s.head_dim,
            stride,
            len: s.head_dim,
        };
        head_attention(qv, k, v, at, end - from, (s.scale, s.f16_weights), out);
    };
    // Splitting across threads pays only once there is enough context to scan.
    if s.t * total >= 64 {
        out.par_chunks_mut(s.head_dim).enumerate().for_each(work);
    } else {
        out.chunks_mut(s.head_dim).enumerate().for_each(work);
    }
}

/// Where one KV head's vector of position p lies: `first + p · stride`, `len` values.
#[derive(Clone, Copy)]
struct Strided {
    first: usize,
    stride: usize,
    len: usize,
}

impl Strided {
    #[inline(always)]
    fn at<'a>(&self, data: &'a [f32], p: usize) -> &'a [f32] {
        let start = self.first + p * self.stride;
        &data[start..start + self.len]
    }
}

/// `(scale, f16_weights)`: what multiplies the scores, and whether the attention weights are
/// rounded to f16 (llama.cpp's arithmetic: the portable kernel does that).
fn head_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    at: Strided,
    seen: usize,
    (scale, f16_weights): (f32, bool),
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        let level = simd::level();
        if level >= simd::Level::Avx512 && !f16_weights {
            // SAFETY (both arms): the CPU supports AVX-512F and FMA (the level is never above
            // what it detected); the head dimension is 16 · H.
            match at.len {
                64 => return unsafe { head_attention_avx512::<4>(q, k, v, at, seen, scale, out) },
                128 => return unsafe { head_attention_avx512::<8>(q, k, v, at, seen, scale, out) },
                _ => {}
            }
        }
        if level >= simd::Level::Avx2 {
            // SAFETY: the CPU supports AVX2 and FMA (as above).
            unsafe { head_attention_avx2(q, k, v, at, seen, (scale, f16_weights), out) };
            return;
        }
    }
    head_attention_generic(q, k, v, at, seen, (scale, f16_weights), out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn head_attention_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    at: Strided,
    seen: usize,
    scale: (f32, bool),
    out: &mut [f32],
) {
    // The portable code, vectorised by LLVM with AVX2 enabled.
    head_attention_generic(q, k, v, at, seen, scale, out);
}

/// softmax(q·kᵀ · scale) · v for one query over `seen` positions, the softmax as candle's
/// (max subtracted, exp, divided by the sum).
/// [`head_attention_generic`] for a head dimension of 16·H with the query and the output held
/// in H vector registers across the whole scan (the portable code reloads and stores the
/// output for every position).
///
/// # Safety
/// AVX-512F and FMA; `q` and `out` hold 16·H values, `at.len == 16 * H`, and `k`/`v` hold
/// `seen` positions at `at`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn head_attention_avx512<const H: usize>(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    at: Strided,
    seen: usize,
    scale: f32,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    assert!(q.len() == 16 * H && out.len() == 16 * H && at.len == 16 * H);
    assert!(seen == 0 || (at.first + (seen - 1) * at.stride + at.len <= k.len().min(v.len())));
    // SAFETY (whole body): every load and store below is inside q, out, or a position
    // p < seen of k and v (asserted above).
    unsafe {
        let mut qv = [_mm512_setzero_ps(); H];
        for (h, r) in qv.iter_mut().enumerate() {
            *r = _mm512_loadu_ps(q.as_ptr().add(16 * h));
        }
        let mut scores = vec![0f32; seen];
        let mut max = f32::NEG_INFINITY;
        for (p, score) in scores.iter_mut().enumerate() {
            let kp = k.as_ptr().add(at.first + p * at.stride);
            let mut acc = _mm512_setzero_ps();
            for (h, r) in qv.iter().enumerate() {
                acc = _mm512_fmadd_ps(*r, _mm512_loadu_ps(kp.add(16 * h)), acc);
            }
            let s = _mm512_reduce_add_ps(acc) * scale;
            *score = s;
            max = max.max(s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let mut o = [_mm512_setzero_ps(); H];
        for (p, score) in scores.iter().enumerate() {
            let w = _mm512_set1_ps(score / sum);
            let vp = v.as_ptr().add(at.first + p * at.stride);
            for (h, r) in o.iter_mut().enumerate() {
                *r = _mm512_fmadd_ps(w, _mm512_loadu_ps(vp.add(16 * h)), *r);
            }
        }
        for (h, r) in o.iter().enumerate() {
            _mm512_storeu_ps(out.as_mut_ptr().add(16 * h), *r);
        }
    }
}

// Plain loops rather than iterator adapters: their closures are not always inlined into the
// AVX2 instance, and would then run without it.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
fn head_attention_generic(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    at: Strided,
    seen: usize,
    (scale, f16_weights): (f32, bool),
    out: &mut [f32],
) {
    let mut scores = vec![0f32; seen];
    let mut max = f32::NEG_INFINITY;
    for p in 0..seen {
        let s = dot(q, at.at(k, p)) * scale;
        scores[p] = s;
        max = max.max(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for p in 0..seen {
        let mut w = scores[p] / sum;
        if f16_weights {
            w = q8::f16_round(w);
        }
        for (o, x) in out.iter_mut().zip(at.at(v, p)) {
            *o += w * x;
        }
    }
}

/// Dot product with 16 independent partial sums (vectorisable; no long dependency chain).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let mut tail = 0f32;
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        tail += x * y;
    }
    for (x, y) in ca.zip(cb) {
        for j in 0..16 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut total = 0f32;
    for x in acc {
        total += x;
    }
    total + tail
}
