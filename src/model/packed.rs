//! Packed GGUF weights and a matrix–vector kernel for decoding and short prompts.
//!
//! A forward pass over few tokens is memory-bound: dense f32 weights are ≈ 540 MB for the
//! default model, its Q4_1/Q8_0 blocks ≈ 100 MB. This kernel reads the blocks, converts each
//! weight to f32 (`q·d + m` for Q4_1 — in one fused multiply-add in the AVX-512 kernel, so
//! within half an ulp of candle's two-step `q as f32 * d + m`; `q·d` for Q8_0) and multiplies
//! with f32 activations, accumulating with fused multiply-adds where the CPU has FMA. The
//! result is the same maths as the dense f32 path on the dequantized weights, up to that
//! rounding and summation order — unlike llama.cpp's (and candle's) quantized matmul, which
//! also quantizes the activations to 8 bits.

use half::f16;
use rayon::prelude::*;

/// Weights of one linear layer (rows = outputs, cols = inputs) in 32-wide blocks.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    kind: Kind,
    /// Per block: scale `d`.
    scale: Vec<f32>,
    /// Per block: offset `m` (Q4_1 only; empty for Q8_0).
    min: Vec<f32>,
    /// Q4_1: 16 bytes per block (low nibbles = weights 0..16, high = 16..32); Q8_0: 32 i8.
    qs: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Q4_1,
    Q8_0,
}

const BLOCK: usize = 32;
/// Up to this many activation rows go through the kernel; more use the dense GEMM.
pub const MAX_ROWS: usize = 16;

impl Kind {
    fn bytes_per_block(self) -> usize {
        match self {
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }
    fn qs_per_block(self) -> usize {
        match self {
            Kind::Q4_1 => 16,
            Kind::Q8_0 => 32,
        }
    }
}

impl PackedMatrix {
    /// From raw GGUF block data of a (rows × cols) matrix. `row_order[r]` is the source row of
    /// output row `r` (to un-permute q/k); `None` keeps the order.
    pub fn from_blocks(
        kind: Kind,
        rows: usize,
        cols: usize,
        data: &[u8],
        row_order: Option<&[usize]>,
    ) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) {
            return None;
        }
        let nb = cols / BLOCK;
        let row_bytes = nb * kind.bytes_per_block();
        if data.len() != rows * row_bytes || row_order.is_some_and(|o| o.len() != rows) {
            return None;
        }
        let qpb = kind.qs_per_block();
        let mut scale = Vec::with_capacity(rows * nb);
        let mut min = Vec::with_capacity(if kind == Kind::Q4_1 { rows * nb } else { 0 });
        let mut qs = Vec::with_capacity(rows * nb * qpb);
        for r in 0..rows {
            let src = row_order.map_or(r, |o| o[r]);
            let row = data.get(src * row_bytes..(src + 1) * row_bytes)?;
            for b in row.chunks_exact(kind.bytes_per_block()) {
                scale.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
                match kind {
                    Kind::Q4_1 => {
                        min.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
                        qs.extend_from_slice(&b[4..20]);
                    }
                    Kind::Q8_0 => qs.extend_from_slice(&b[2..34]),
                }
            }
        }
        Some(Self {
            rows,
            cols,
            kind,
            scale,
            min,
            qs,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Dequantized row `r` (as candle's `dequantize` computes it).
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let mut out = vec![0f32; self.cols];
        for b in 0..nb {
            let w = self.block(r * nb + b);
            out[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&w);
        }
        out
    }

    #[inline(always)]
    fn block(&self, i: usize) -> [f32; BLOCK] {
        let d = self.scale[i];
        let mut w = [0f32; BLOCK];
        match self.kind {
            Kind::Q4_1 => {
                let m = self.min[i];
                let q = &self.qs[i * 16..i * 16 + 16];
                for j in 0..16 {
                    w[j] = (q[j] & 0x0F) as f32 * d + m;
                    w[j + 16] = (q[j] >> 4) as f32 * d + m;
                }
            }
            Kind::Q8_0 => {
                let q = &self.qs[i * 32..i * 32 + 32];
                for j in 0..BLOCK {
                    w[j] = (q[j] as i8) as f32 * d;
                }
            }
        }
        w
    }

    /// y (n × rows) = x (n × cols) · Wᵀ, for n ≤ [`MAX_ROWS`]. Rows are split across threads.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.rows];
        matmul_many(&mut [(self, &mut y)], x, n);
        y
    }
}

/// Several matrices applied to the same input (q, k and v; gate and up) in one parallel pass:
/// one hand-off to the thread pool instead of one per matrix. `parts[i].1` receives
/// `n × parts[i].0.rows()` values, token-major like [`PackedMatrix::matmul`].
pub fn matmul_many(parts: &mut [(&PackedMatrix, &mut [f32])], x: &[f32], n: usize) {
    let Some(cols) = parts.first().map(|(m, _)| m.cols) else {
        return;
    };
    assert!((1..=MAX_ROWS).contains(&n) && x.len() == n * cols);
    for (m, y) in parts.iter() {
        assert!(m.cols == cols && y.len() == n * m.rows);
    }
    // Measured: 32-row tasks beat fewer, larger ones (better balance across the cores).
    let rows_per_task = 32;
    if n == 1 {
        let mut tasks = Vec::new();
        for (m, y) in parts.iter_mut() {
            for (i, out) in y.chunks_mut(rows_per_task).enumerate() {
                tasks.push((*m, i * rows_per_task, out));
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(m, r0, out)| rows_kernel(m, x, 1, r0, out));
        return;
    }
    // Computed as yᵀ (rows × n) so each task owns a contiguous slice, then transposed.
    let mut yts: Vec<Vec<f32>> = parts.iter().map(|(m, _)| vec![0f32; m.rows * n]).collect();
    let mut tasks = Vec::new();
    for ((m, _), yt) in parts.iter().zip(yts.iter_mut()) {
        for (i, out) in yt.chunks_mut(rows_per_task * n).enumerate() {
            tasks.push((*m, i * rows_per_task, out));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(m, r0, out)| rows_kernel(m, x, n, r0, out));
    for ((m, y), yt) in parts.iter_mut().zip(&yts) {
        for r in 0..m.rows {
            for t in 0..n {
                y[t * m.rows + r] = yt[r * n + t];
            }
        }
    }
}

fn rows_kernel(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512::available() {
            // SAFETY: the CPU supports the features the kernel is compiled for (checked above).
            unsafe { avx512::rows(m, x, n, r0, out) };
            return;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            unsafe { rows_avx2(m, x, n, r0, out) };
            return;
        }
    }
    rows_generic::<false>(m, x, n, r0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    // The portable code, compiled with AVX2 enabled so that LLVM vectorises the 32-wide loops,
    // with explicit fused multiply-adds (Rust never contracts `a + x * w` by itself).
    rows_generic::<true>(m, x, n, r0, out);
}

/// Portable kernel: dequantizes each weight (`q · d + m`) and multiplies with f32 activations.
/// `FMA`: accumulate with `mul_add` (only where the CPU has FMA; in software it is slow).
#[inline(always)]
fn rows_generic<const FMA: bool>(
    m: &PackedMatrix,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &mut [f32],
) {
    let nb = m.cols / BLOCK;
    let rows = out.len() / n;
    for i in 0..rows {
        let r = r0 + i;
        let mut acc = [[0f32; BLOCK]; MAX_ROWS];
        for b in 0..nb {
            let w = m.block(r * nb + b);
            for (t, a) in acc.iter_mut().enumerate().take(n) {
                let xb = &x[t * m.cols + b * BLOCK..t * m.cols + (b + 1) * BLOCK];
                for j in 0..BLOCK {
                    a[j] = if FMA {
                        xb[j].mul_add(w[j], a[j])
                    } else {
                        a[j] + xb[j] * w[j]
                    };
                }
            }
        }
        for t in 0..n {
            out[i * n + t] = acc[t].iter().sum();
        }
    }
}

/// Hand-written AVX-512 kernel: each 32-weight block is converted once to f32 (`q·d + m` in one
/// fused multiply-add for Q4_1, `q·d` for Q8_0) and multiplied with every input row; the same
/// real numbers as the portable kernel, rounded at most half an ulp differently per weight.
/// Integer quants become f32 exactly (they are at most 8 bits).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Kind, PackedMatrix, BLOCK, MAX_ROWS};
    use std::arch::x86_64::*;

    /// Software prefetch distance, in blocks (measured: 64-128 best on the dev machine).
    const PREFETCH: usize = 128;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("fma")
    }

    /// Dispatches on the number of input rows so that each variant keeps its accumulators in
    /// registers.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL and FMA ([`available`]).
    pub unsafe fn rows(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
        // SAFETY (all arms): the caller guarantees the CPU features.
        unsafe {
            match n {
                1 => rows_n::<1>(m, x, r0, out),
                2 => rows_n::<2>(m, x, r0, out),
                3 => rows_n::<3>(m, x, r0, out),
                4 => rows_n::<4>(m, x, r0, out),
                5 => rows_n::<5>(m, x, r0, out),
                6 => rows_n::<6>(m, x, r0, out),
                7 => rows_n::<7>(m, x, r0, out),
                8 => rows_n::<8>(m, x, r0, out),
                9 => rows_n::<9>(m, x, r0, out),
                10 => rows_n::<10>(m, x, r0, out),
                11 => rows_n::<11>(m, x, r0, out),
                12 => rows_n::<12>(m, x, r0, out),
                13 => rows_n::<13>(m, x, r0, out),
                14 => rows_n::<14>(m, x, r0, out),
                15 => rows_n::<15>(m, x, r0, out),
                _ => rows_n::<16>(m, x, r0, out),
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
    unsafe fn rows_n<const N: usize>(m: &PackedMatrix, x: &[f32], r0: usize, out: &mut [f32]) {
        const { assert!(N >= 1 && N <= MAX_ROWS) };
        let nb = m.cols / BLOCK;
        let rows = out.len() / N;
        assert!(x.len() == N * m.cols);
        assert!(
            m.scale.len() >= (r0 + rows) * nb
                && m.qs.len() >= (r0 + rows) * nb * m.kind.qs_per_block()
        );
        if m.kind == Kind::Q4_1 {
            assert!(m.min.len() >= (r0 + rows) * nb);
        }
        // With few inputs, two weight rows at a time: two independent accumulator chains per
        // input. Each (row, input) dot product is computed the same way either way.
        let mut i = 0;
        if N <= 8 {
            while i + 2 <= rows {
                // SAFETY: rows r0 + i and r0 + i + 1 are inside the asserted bounds.
                unsafe { weight_rows::<N, 2>(m, x, r0 + i, &mut out[i * N..(i + 2) * N]) };
                i += 2;
            }
        }
        while i < rows {
            // SAFETY: row r0 + i is inside the asserted bounds.
            unsafe { weight_rows::<N, 1>(m, x, r0 + i, &mut out[i * N..(i + 1) * N]) };
            i += 1;
        }
    }

    /// Dot products of weight rows r..r + R with the N input rows; writes (R × N) values.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and FMA; rows r..r + R exist in `m`; x holds N rows of `m.cols`.
    #[inline(always)]
    unsafe fn weight_rows<const N: usize, const R: usize>(
        m: &PackedMatrix,
        x: &[f32],
        r: usize,
        out: &mut [f32],
    ) {
        let cols = m.cols;
        let nb = cols / BLOCK;
        let xp = x.as_ptr();
        let qpb = m.kind.qs_per_block();
        // SAFETY (whole body): the caller guarantees the CPU features and that every block
        // index (r + j) * nb + b below is inside the matrix; x holds N rows of `cols` values;
        // prefetches never fault, even past the end.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            for b in 0..nb {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let bi = (r + j) * nb + b;
                    // Streaming ~100 MB of weights per token: ask for the data of the blocks
                    // PREFETCH ahead now.
                    _mm_prefetch::<_MM_HINT_T0>(
                        m.qs.as_ptr().wrapping_add((bi + PREFETCH) * qpb) as *const i8
                    );
                    _mm_prefetch::<_MM_HINT_T0>(
                        m.scale.as_ptr().wrapping_add(bi + PREFETCH) as *const i8
                    );
                    if m.kind == Kind::Q4_1 {
                        _mm_prefetch::<_MM_HINT_T0>(
                            m.min.as_ptr().wrapping_add(bi + PREFETCH) as *const i8
                        );
                    }
                    let (lo, hi) = match m.kind {
                        Kind::Q4_1 => {
                            let q = _mm_loadu_si128(m.qs.as_ptr().add(bi * 16) as *const __m128i);
                            let mask = _mm_set1_epi8(0x0F);
                            let lo = _mm_and_si128(q, mask);
                            let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                            (
                                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)),
                                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)),
                            )
                        }
                        Kind::Q8_0 => {
                            let p = m.qs.as_ptr().add(bi * 32);
                            let lo = _mm_loadu_si128(p as *const __m128i);
                            let hi = _mm_loadu_si128(p.add(16) as *const __m128i);
                            (
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)),
                                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)),
                            )
                        }
                    };
                    let d = _mm512_set1_ps(*m.scale.get_unchecked(bi));
                    // Each weight once: q·d (+ m for Q4_1, in one fused multiply-add: within
                    // half an ulp of the exact value; candle's dequantization rounds twice).
                    // Then two fused multiply-adds per input row: the same operations in the
                    // same order whatever the number of rows, so a sequence gets bit-identical
                    // results alone or batched with others.
                    let (lo, hi) = if m.kind == Kind::Q4_1 {
                        let mv = _mm512_set1_ps(*m.min.get_unchecked(bi));
                        (_mm512_fmadd_ps(lo, d, mv), _mm512_fmadd_ps(hi, d, mv))
                    } else {
                        (_mm512_mul_ps(lo, d), _mm512_mul_ps(hi, d))
                    };
                    for (t, a) in acc.iter_mut().enumerate() {
                        let xb = xp.add(t * cols + b * BLOCK);
                        *a = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xb), *a);
                        *a = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xb.add(16)), *a);
                    }
                }
            }
            for (j, acc) in acc.iter_mut().enumerate() {
                for (t, a) in acc.iter().enumerate() {
                    out[j * N + t] = _mm512_reduce_add_ps(*a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(kind: Kind, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut data = Vec::new();
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as u8
        };
        for _ in 0..rows * cols / 32 {
            data.extend_from_slice(&f16::from_f32(0.01 + (next() as f32) / 5000.0).to_le_bytes());
            if kind == Kind::Q4_1 {
                data.extend_from_slice(
                    &f16::from_f32(-0.05 + (next() as f32) / 9000.0).to_le_bytes(),
                );
            }
            for _ in 0..kind.qs_per_block() {
                data.push(next());
            }
        }
        data
    }

    fn q4_1_blocks(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        blocks(Kind::Q4_1, rows, cols, seed)
    }

    /// Every kernel (the one this CPU dispatches to, the hand-written AVX-512 one where the CPU
    /// has it, the portable one) against dot products with the dequantized rows, for every
    /// input-row count, both formats, row counts that are odd or not a multiple of the task
    /// size, and several block counts.
    #[test]
    fn matches_dense_dot_products() {
        for kind in [Kind::Q4_1, Kind::Q8_0] {
            for (rows, cols) in [(70usize, 96usize), (33, 576), (5, 1056)] {
                let data = blocks(kind, rows, cols, 3 + rows as u32);
                let m = PackedMatrix::from_blocks(kind, rows, cols, &data, None).unwrap();
                let w: Vec<Vec<f32>> = (0..rows).map(|r| m.dequantize_row(r)).collect();
                for n in 1..=MAX_ROWS {
                    let x: Vec<f32> = (0..n * cols)
                        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                        .collect();
                    let check = |y: &[f32], transposed: bool, what: &str| {
                        for t in 0..n {
                            for r in 0..rows {
                                let dense: f64 = (0..cols)
                                    .map(|j| x[t * cols + j] as f64 * w[r][j] as f64)
                                    .sum();
                                let got = if transposed {
                                    y[r * n + t]
                                } else {
                                    y[t * rows + r]
                                };
                                assert!(
                                    (got as f64 - dense).abs() <= 1e-5 * dense.abs().max(1.0),
                                    "{what} {kind:?} {rows}x{cols} n={n}: {got} vs {dense}"
                                );
                            }
                        }
                    };
                    check(&m.matmul(&x, n), false, "dispatched");
                    let mut yt = vec![0f32; rows * n];
                    rows_generic::<false>(&m, &x, n, 0, &mut yt);
                    check(&yt, true, "portable");
                    #[cfg(target_arch = "x86_64")]
                    if avx512::available() {
                        let mut yt = vec![0f32; rows * n];
                        // SAFETY: the CPU has the features (checked).
                        unsafe { avx512::rows(&m, &x, n, 0, &mut yt) };
                        check(&yt, true, "avx512");
                    }
                }
            }
        }
    }

    #[test]
    fn row_order_permutes_whole_rows() {
        let (rows, cols) = (4, 32);
        let data = q4_1_blocks(rows, cols, 9);
        let plain = PackedMatrix::from_blocks(Kind::Q4_1, rows, cols, &data, None).unwrap();
        let order = [2usize, 0, 3, 1];
        let perm = PackedMatrix::from_blocks(Kind::Q4_1, rows, cols, &data, Some(&order)).unwrap();
        for (r, &src) in order.iter().enumerate() {
            assert_eq!(perm.dequantize_row(r), plain.dequantize_row(src));
        }
    }
}
