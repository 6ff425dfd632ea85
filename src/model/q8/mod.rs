//! `--activations q8`: llama.cpp's arithmetic on GGUF blocks, for users who want the numbers
//! their llama.cpp deployment computes (and its speed) rather than the exact products.
//!
//! ggml's CPU backend does not multiply f32 activations with a quantized weight: it first
//! quantizes each activation row to the weight format's "dot type" — 8-bit integers per block
//! of 32 with an f16 scale (`q8_0`; `q8_1` also keeps the block's scaled sum, for the formats
//! with a minimum), or per block of 256 with an f32 scale and sums of 16 (`q8_K`, for the
//! K-quants) — and then takes integer dot products block by block, scaled in f32. Those
//! roundings move log-probabilities by up to ~0.25 against the exact products. Here each step
//! is done as ggml does it on x86 (`quantize_row_q8_0`/`_q8_1` of its AVX code, which every
//! x86-64-v3 CPU runs, `quantize_row_q8_K_ref`, `ggml_vec_dot_*`): the same multiplier and
//! rounding (half to even), the same scale rounded to f16 where ggml stores an f16, the same
//! integer sums per sub-block; only the order of the final f32 sums differs (≈ 1e-7
//! relative). An f16 weight takes its input rounded to f16, as ggml's `F16` dot does.
//!
//! The rest of llama.cpp's default arithmetic that differs from the exact path — keys and
//! values stored in f16, queries rounded to f16 for `K·Q`, attention weights rounded to f16
//! for `V·softmax` (its path without flash attention), and GELU through an f16 table — is in
//! [`f16_round`] and [`gelu_table`], applied by the decoder in this mode.
//!
//! Each (weight row, input row) dot product is computed the same way however many input rows
//! come together, so batching stays invisible in the numbers, as in the exact mode.

use std::fmt;
use std::str::FromStr;

use half::f16;

use super::packed::PackedMatrix;
use super::quant::{scale_min_k4, Format};
use super::simd;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// How activations meet quantized weights: the model's mode, fixed at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activations {
    /// f32 activations times the exactly dequantized weights (the default).
    #[default]
    F32,
    /// 8-bit activations and integer dot products, as llama.cpp's CPU backend computes.
    Q8,
}

impl Activations {
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8 => "q8",
        }
    }
}

impl fmt::Display for Activations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Activations {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "exact" => Ok(Self::F32),
            "q8" | "llama.cpp" | "llamacpp" => Ok(Self::Q8),
            other => Err(format!(
                "{other:?} is not an activations mode (f32: exact, the default; q8: llama.cpp's)"
            )),
        }
    }
}

/// `x` rounded to the nearest f16 (ties to even), as f32: what ggml stores in an f16.
#[inline]
pub fn f16_round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Every value of `xs` rounded to f16 (by the F16C instructions where the CPU has them: the
/// same rounding, 8 values per instruction instead of a software conversion each).
pub fn f16_round_all(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= simd::Level::Avx2 {
        // SAFETY: the level is never above what the CPU has (AVX2 implies F16C here).
        unsafe { f16_round_f16c(xs) };
        return;
    }
    for x in xs {
        *x = f16_round(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_round_f16c(xs: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut chunks = xs.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: 8 values in c; the features are the caller's promise.
        unsafe {
            let v = _mm256_loadu_ps(c.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm256_storeu_ps(c.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    for x in chunks.into_remainder() {
        *x = f16_round(*x);
    }
}

/// `v` rounded to the nearest integer, ties to even, for |v| ≤ 2²²: ggml's `nearest_int`
/// (and what its AVX code's `_mm256_round_ps` gives). Adding 1.5·2²³ leaves the integer in the
/// low mantissa bits; plain arithmetic, so LLVM vectorises it (`round_ties_even` is a library
/// call on a baseline x86-64 build).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's GELU on the CPU: the input rounded to f16, looked up in a table of the tanh GELU
/// of every f16 (itself rounded to f16); the ends are exact (0 at or below −10, x at or above
/// 10).
#[inline]
pub fn gelu_table(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let h = f16_round(x);
        f16_round(super::layers::gelu_tanh(h))
    }
}

/// ggml's dot type of a weight format: how the activations are quantized for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DotType {
    Q8_0,
    Q8_1,
    Q8K,
    F16,
}

const QK_K: usize = 256;

fn dot_type(format: Format) -> DotType {
    match format {
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => DotType::Q8_0,
        Format::Q4_1 | Format::Q5_1 => DotType::Q8_1,
        Format::Q4K | Format::Q5K | Format::Q6K => DotType::Q8K,
        Format::F16 => DotType::F16,
    }
}

/// Input rows quantized for one dot type: per row `cols` integers, per block a scale (`d`),
/// for q8_1 the block's scaled sum (`s`), for q8_K the sums of 16 (`bsums`); for f16 the
/// rounded values.
struct QuantizedRows {
    cols: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    bsums: Vec<i16>,
    halves: Vec<f32>,
}

impl QuantizedRows {
    fn new(kind: DotType, x: &[f32], cols: usize) -> Self {
        let mut q = Self {
            cols,
            qs: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            bsums: Vec::new(),
            halves: Vec::new(),
        };
        match kind {
            DotType::F16 => q.halves = x.iter().map(|&v| f16_round(v)).collect(),
            DotType::Q8_0 | DotType::Q8_1 => {
                q.qs = vec![0; x.len()];
                for (xb, qb) in x.chunks_exact(32).zip(q.qs.chunks_exact_mut(32)) {
                    // quantize_row_q8_0 / quantize_row_q8_1 as ggml runs them on x86 (its
                    // AVX/AVX2 code, every x86-64-v3 CPU): the multiplier is 127 / max, and
                    // products round half to even.
                    let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                    let mut sum = 0i32;
                    for (o, &v) in qb.iter_mut().zip(xb) {
                        *o = nearest_int(v * id) as i8;
                        sum += *o as i32;
                    }
                    q.d.push(f16_round(d));
                    if kind == DotType::Q8_1 {
                        q.s.push(f16_round(d * sum as f32));
                    }
                }
            }
            DotType::Q8K => {
                q.qs = vec![0; x.len()];
                for (xb, qb) in x.chunks_exact(QK_K).zip(q.qs.chunks_exact_mut(QK_K)) {
                    // quantize_row_q8_K_ref: the scale from the value of largest magnitude
                    // (the first one, on ties), sign included.
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in xb {
                        if v.abs() > amax {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    if amax == 0.0 {
                        q.d.push(0.0);
                        q.bsums.extend([0; QK_K / 16]);
                        continue;
                    }
                    let iscale = -127.0 / max;
                    for (o, &v) in qb.iter_mut().zip(xb) {
                        *o = nearest_int(iscale * v).min(127) as i8;
                    }
                    for s in qb.chunks_exact(16) {
                        // At most 16 · 127: an i16, as ggml keeps it.
                        q.bsums.push(s.iter().map(|&v| v as i16).sum());
                    }
                    q.d.push(1.0 / iscale);
                }
            }
        }
        q
    }
}

/// One weight block unpacked: its integers in element order, and its scales.
struct Unpacked {
    w: [i8; QK_K],
    /// The block's scale (f16 read as f32); for K-quants the super-block's.
    d: f32,
    /// Q4_1/Q5_1: the block's minimum; Q4_K/Q5_K: the super-block's `dmin`.
    m: f32,
    /// K-quants: the sub-blocks' integer scales (8 of 32 weights, Q6_K 16 of 16).
    sc: [i32; 16],
    /// Q4_K/Q5_K: the sub-blocks' integer minimums.
    mins: [i32; 8],
}

#[inline(always)]
fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

#[inline(always)]
fn unpack(format: Format, b: &[u8], u: &mut Unpacked) {
    let w = &mut u.w;
    match format {
        Format::Q4_0 | Format::Q4_1 => {
            let (off, sub) = if format == Format::Q4_0 {
                (2, 8)
            } else {
                (4, 0)
            };
            u.d = half_at(b, 0);
            if format == Format::Q4_1 {
                u.m = half_at(b, 2);
            }
            let qs = &b[off..off + 16];
            for j in 0..16 {
                w[j] = (qs[j] & 0x0F) as i8 - sub;
                w[j + 16] = (qs[j] >> 4) as i8 - sub;
            }
        }
        Format::Q5_0 | Format::Q5_1 => {
            let (off, sub) = if format == Format::Q5_0 {
                (2, 16)
            } else {
                (4, 0)
            };
            u.d = half_at(b, 0);
            if format == Format::Q5_1 {
                u.m = half_at(b, 2);
            }
            let qh = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
            let qs = &b[off + 4..off + 20];
            for j in 0..16 {
                let h0 = (((qh >> j) & 1) << 4) as u8;
                let h1 = (((qh >> (j + 16)) & 1) << 4) as u8;
                w[j] = ((qs[j] & 0x0F) | h0) as i8 - sub;
                w[j + 16] = ((qs[j] >> 4) | h1) as i8 - sub;
            }
        }
        Format::Q8_0 => {
            u.d = half_at(b, 0);
            for (o, &q) in w[..32].iter_mut().zip(&b[2..34]) {
                *o = q as i8;
            }
        }
        Format::Q4K | Format::Q5K => {
            u.d = half_at(b, 0);
            u.m = half_at(b, 2);
            let scales = &b[4..16];
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, scales);
                u.sc[j] = sc as i32;
                u.mins[j] = m as i32;
            }
            let (qh, qs) = if format == Format::Q4K {
                (None, &b[16..144])
            } else {
                (Some(&b[16..48]), &b[48..176])
            };
            for c in 0..4 {
                let q = &qs[c * 32..c * 32 + 32];
                for j in 0..32 {
                    let (mut lo, mut hi) = (q[j] & 0xF, q[j] >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[j] >> (2 * c)) & 1) << 4;
                        hi |= ((qh[j] >> (2 * c + 1)) & 1) << 4;
                    }
                    w[c * 64 + j] = lo as i8;
                    w[c * 64 + 32 + j] = hi as i8;
                }
            }
        }
        Format::Q6K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            u.d = half_at(b, 208);
            for (o, &s) in u.sc.iter_mut().zip(sc) {
                *o = s as i8 as i32;
            }
            for half_block in 0..2 {
                let ql = &ql[64 * half_block..64 * half_block + 64];
                let qh = &qh[32 * half_block..32 * half_block + 32];
                let y = &mut w[128 * half_block..128 * half_block + 128];
                for l in 0..32 {
                    y[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    y[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                }
            }
        }
        Format::F16 => unreachable!("f16 weights are not unpacked to integers"),
    }
}

/// Σ w·a over equal-length slices, in i32 (LLVM vectorises it: sign-extend and multiply-add).
#[inline(always)]
fn idot(w: &[i8], a: &[i8]) -> i32 {
    w.iter()
        .zip(a)
        .map(|(&w, &a)| w as i16 as i32 * a as i16 as i32)
        .sum()
}

/// One block's contribution to the dot product of a weight row with quantized input row `t`.
#[inline(always)]
fn block_dot(format: Format, u: &Unpacked, q: &QuantizedRows, t: usize, b: usize) -> f32 {
    let len = format.block_len();
    let per_row = q.cols / len;
    let a = &q.qs[t * q.cols + b * len..t * q.cols + (b + 1) * len];
    let d = q.d[t * per_row + b];
    match format {
        Format::Q4_0 | Format::Q5_0 | Format::Q8_0 => idot(&u.w[..32], a) as f32 * (u.d * d),
        Format::Q4_1 | Format::Q5_1 => {
            (u.d * d) * idot(&u.w[..32], a) as f32 + u.m * q.s[t * per_row + b]
        }
        Format::Q4K | Format::Q5K => {
            let bsums = &q.bsums[(t * per_row + b) * 16..(t * per_row + b + 1) * 16];
            let mut sumi = 0i32;
            let mut mins = 0i32;
            for j in 0..8 {
                sumi += u.sc[j] * idot(&u.w[j * 32..j * 32 + 32], &a[j * 32..j * 32 + 32]);
                mins += u.mins[j] * (bsums[2 * j] as i32 + bsums[2 * j + 1] as i32);
            }
            (u.d * d) * sumi as f32 - (u.m * d) * mins as f32
        }
        Format::Q6K => {
            let mut sumi = 0i32;
            for j in 0..16 {
                sumi += u.sc[j] * idot(&u.w[j * 16..j * 16 + 16], &a[j * 16..j * 16 + 16]);
            }
            (u.d * d) * sumi as f32
        }
        Format::F16 => unreachable!(),
    }
}

/// Weight rows `r0..` (out.len() / n of them) times the n quantized input rows, row-major
/// (row, input).
#[inline(always)]
fn rows_q8(m: &PackedMatrix, q: &QuantizedRows, n: usize, r0: usize, out: &mut [f32]) {
    let format = m.format();
    let rows = out.len() / n;
    if format == Format::F16 {
        let mut w = [0f32; 32];
        for i in 0..rows {
            let row = m.row(r0 + i);
            for t in 0..n {
                let x = &q.halves[t * q.cols..(t + 1) * q.cols];
                let mut acc = [0f32; 32];
                for (blk, xb) in row.chunks_exact(64).zip(x.chunks_exact(32)) {
                    format.dequantize(blk, &mut w);
                    for j in 0..32 {
                        acc[j] += w[j] * xb[j];
                    }
                }
                out[i * n + t] = acc.iter().sum();
            }
        }
        return;
    }
    let bytes = format.block_bytes();
    let mut u = Unpacked {
        w: [0; QK_K],
        d: 0.0,
        m: 0.0,
        sc: [0; 16],
        mins: [0; 8],
    };
    let mut acc = [0f32; 64];
    for i in 0..rows {
        let row = m.row(r0 + i);
        let out = &mut out[i * n..(i + 1) * n];
        for chunk in (0..n).step_by(acc.len()) {
            let width = acc.len().min(n - chunk);
            acc[..width].fill(0.0);
            for (b, block) in row.chunks_exact(bytes).enumerate() {
                unpack(format, block, &mut u);
                for (k, a) in acc[..width].iter_mut().enumerate() {
                    *a += block_dot(format, &u, q, chunk + k, b);
                }
            }
            out[chunk..chunk + width].copy_from_slice(&acc[..width]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_q8_avx2(m: &PackedMatrix, q: &QuantizedRows, n: usize, r0: usize, out: &mut [f32]) {
    rows_q8(m, q, n, r0, out)
}

fn rows_kernel(m: &PackedMatrix, q: &QuantizedRows, n: usize, r0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= simd::Level::Avx2 && avx2::reads(m.format()) {
        // SAFETY: the CPU has AVX2, FMA and F16C; the format is one the kernels read; q
        // holds the n inputs quantized for it (matmul_many).
        unsafe { avx2::rows(m, q, n, r0, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd::level() >= simd::Level::Avx2 {
        // SAFETY: the CPU has AVX2, FMA and F16C (the level never exceeds what it detected).
        unsafe { rows_q8_avx2(m, q, n, r0, out) };
        return;
    }
    rows_q8(m, q, n, r0, out)
}

/// Several matrices applied to the same `n` input rows (token-major, `cols` each), in
/// llama.cpp's arithmetic: `parts[i].1` receives `n × rows` values, token-major. Any `n`.
pub(crate) fn matmul_many(parts: &mut [(&PackedMatrix, &mut [f32])], x: &[f32], n: usize) {
    let Some(cols) = parts.first().map(|(m, _)| m.cols()) else {
        return;
    };
    assert!(n >= 1 && x.len() == n * cols);
    let mut quantized: Vec<(DotType, QuantizedRows)> = Vec::new();
    for (m, y) in parts.iter() {
        assert!(m.cols() == cols && y.len() == n * m.rows());
        let kind = dot_type(m.format());
        if !quantized.iter().any(|(k, _)| *k == kind) {
            quantized.push((kind, QuantizedRows::new(kind, x, cols)));
        }
    }
    let quantized_for = |m: &PackedMatrix| -> &QuantizedRows {
        let kind = dot_type(m.format());
        &quantized
            .iter()
            .find(|(k, _)| *k == kind)
            .expect("quantized above")
            .1
    };
    super::packed::in_row_tasks(parts, n, |m, r0, out| {
        rows_kernel(m, quantized_for(m), n, r0, out)
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// A (rows × cols) matrix of a GGUF type, quantized by candle from pseudo-random values.
    fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: usize) -> PackedMatrix {
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0) * 0.5)
            .collect();
        let t = Tensor::from_vec(vals, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let format = Format::from_ggml(dtype).unwrap();
        PackedMatrix::from_blocks(format, rows, cols, q.data().unwrap().into_owned(), None).unwrap()
    }

    fn input(n: usize, cols: usize, seed: usize) -> Vec<f32> {
        (0..n * cols)
            .map(|i| ((((i + seed) * 2_654_435_761) % 10_007) as f32 / 5003.5 - 1.0) * 3.0)
            .collect()
    }

    /// Dequantized activations times dequantized weights, in f64: what the integer dot
    /// products must add up to (for Q4_1/Q5_1 the minimum meets the block's f16 sum `s`, as in
    /// ggml).
    fn reference(m: &PackedMatrix, q: &QuantizedRows, t: usize, r: usize) -> f64 {
        let w = m.dequantize_row(r);
        let cols = q.cols;
        if m.format() == Format::F16 {
            return (0..cols)
                .map(|j| w[j] as f64 * q.halves[t * cols + j] as f64)
                .sum();
        }
        let len = match dot_type(m.format()) {
            DotType::Q8K => QK_K,
            _ => 32,
        };
        let per_row = cols / len;
        let mut sum = 0f64;
        for b in 0..per_row {
            let d = q.d[t * per_row + b] as f64;
            let range = b * len..(b + 1) * len;
            let acts = &q.qs[t * cols + range.start..t * cols + range.end];
            for (&wj, &aj) in w[range].iter().zip(acts) {
                sum += wj as f64 * aj as f64 * d;
            }
            if matches!(m.format(), Format::Q4_1 | Format::Q5_1) {
                // w = d·q + m: the minimum's part through s instead of Σ m·a.
                let mins: f64 = (b * len..(b + 1) * len)
                    .map(|j| q.qs[t * cols + j] as f64 * d)
                    .sum();
                let mut u = Unpacked {
                    w: [0; QK_K],
                    d: 0.0,
                    m: 0.0,
                    sc: [0; 16],
                    mins: [0; 8],
                };
                let bytes = m.format().block_bytes();
                unpack(m.format(), &m.row(r)[b * bytes..(b + 1) * bytes], &mut u);
                sum += u.m as f64 * (q.s[t * per_row + b] as f64 - mins);
            }
        }
        sum
    }

    /// The integer bookkeeping (unpacking, sub-block scales and minimums, sums of 16) against
    /// the dequantized arithmetic. (Against ggml's own kernels: tests/activations_q8.rs.)
    #[test]
    fn integer_dots_add_up_to_the_dequantized_products() {
        let (rows, cols, n) = (40, 512, 3);
        for dtype in crate::model::quant::GGML_TYPES {
            let m = quantized(dtype, rows, cols, 3);
            let x = input(n, cols, 11);
            let mut ours = vec![0f32; n * rows];
            matmul_many(&mut [(&m, &mut ours)], &x, n);
            let q = QuantizedRows::new(dot_type(m.format()), &x, cols);
            for t in 0..n {
                for r in 0..rows {
                    let want = reference(&m, &q, t, r);
                    let got = ours[t * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                        "{dtype:?} ({t}, {r}): {got} vs {want}"
                    );
                }
            }
            // The activations' rounding is visible: not the exact products.
            let mut moved = 0f32;
            for t in 0..n {
                for r in 0..rows {
                    let w = m.dequantize_row(r);
                    let e: f32 = w
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| a * b)
                        .sum();
                    moved = moved.max((ours[t * rows + r] - e).abs() / e.abs().max(1.0));
                }
            }
            assert!(
                moved > 1e-4,
                "{dtype:?}: only {moved} from the exact products"
            );
        }
    }

    #[test]
    fn batched_rows_equal_single_rows_bit_for_bit() {
        let (rows, cols) = (37, 256);
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            let m = quantized(dtype, rows, cols, 5);
            let n = 70;
            let x = input(n, cols, 2);
            let mut all = vec![0f32; n * rows];
            matmul_many(&mut [(&m, &mut all)], &x, n);
            for t in [0, 1, 33, 69] {
                let mut one = vec![0f32; rows];
                matmul_many(&mut [(&m, &mut one)], &x[t * cols..(t + 1) * cols], 1);
                assert_eq!(one, all[t * rows..(t + 1) * rows], "{dtype:?} row {t}");
            }
        }
    }

    #[test]
    fn rounding_helpers_round_as_ggml() {
        for v in [
            0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.0, 3.49, -3.51, 0.0, 127.0,
        ] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
        let mut xs: Vec<f32> = (0..37)
            .map(|i| (i as f32 - 18.0) * 1.37e-3 + 1e-7)
            .collect();
        // Tiny (f16 subnormal), past f16's range, and a tie between two f16 values.
        xs.extend([
            6e-8,
            -3e-6,
            65519.0,
            1.0 + 2f32.powi(-10),
            1.0 + 2f32.powi(-11),
        ]);
        let want: Vec<f32> = xs.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        f16_round_all(&mut xs);
        assert_eq!(xs, want);
    }

    #[test]
    fn the_gelu_table_is_ggmls() {
        assert_eq!(gelu_table(-12.0), 0.0);
        assert_eq!(gelu_table(11.5), 11.5);
        // 1.0 is an f16; its GELU (0.841192) rounded to f16.
        assert_eq!(
            gelu_table(1.0),
            f16_round(super::super::layers::gelu_tanh(1.0))
        );
        assert_eq!(gelu_table(1.0001), gelu_table(1.0));
        assert_eq!("Q8".parse::<Activations>(), Ok(Activations::Q8));
        assert!("q4".parse::<Activations>().is_err());
    }
}
