//! Packed GGUF weights and a matrix–vector kernel for decoding and short prompts.
//!
//! A forward pass over few tokens is memory-bound: dense f32 weights are ≈ 540 MB for the
//! default model, its Q4_1/Q8_0 blocks ≈ 100 MB. This kernel reads the blocks, dequantizes each
//! weight exactly as candle does (`q as f32 * d + m`, in f32, no fused multiply-add) and
//! multiplies with f32 activations. The result is therefore the same maths as the dense f32
//! path on the dequantized weights, up to summation order — unlike llama.cpp's (and candle's)
//! quantized matmul, which also quantizes the activations to 8 bits.

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
pub const MAX_ROWS: usize = 8;

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
        if cols % BLOCK != 0 {
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
        assert!(n <= MAX_ROWS && x.len() == n * self.cols);
        // Measured: 32-row tasks beat fewer, larger ones (better balance across the cores).
        let rows_per_task = 32;
        // Computed as yᵀ (rows × n) so each task owns a contiguous slice, then transposed.
        let mut yt = vec![0f32; self.rows * n];
        yt.par_chunks_mut(rows_per_task * n)
            .enumerate()
            .for_each(|(task, out)| {
                let r0 = task * rows_per_task;
                rows_kernel(self, x, n, r0, out);
            });
        let mut y = vec![0f32; n * self.rows];
        for r in 0..self.rows {
            for t in 0..n {
                y[t * self.rows + r] = yt[r * n + t];
            }
        }
        y
    }
}

fn rows_kernel(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX-512F and FMA (checked just above).
            unsafe { rows_avx512(m, x, n, r0, out) };
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
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn rows_avx512(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    // 16-wide vectors for the same loops.
    rows_generic::<true>(m, x, n, r0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    // The same code, compiled with AVX2 enabled so that LLVM vectorises the 32-wide loops,
    // with explicit fused multiply-adds (Rust never contracts `a + x * w` by itself).
    rows_generic::<true>(m, x, n, r0, out);
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn q4_1_blocks(rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut data = Vec::new();
        let mut s = seed;
        let mut next = || {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as u8
        };
        for _ in 0..rows * cols / 32 {
            data.extend_from_slice(&f16::from_f32(0.01 + (next() as f32) / 5000.0).to_le_bytes());
            data.extend_from_slice(&f16::from_f32(-0.05 + (next() as f32) / 9000.0).to_le_bytes());
            for _ in 0..16 {
                data.push(next());
            }
        }
        data
    }

    #[test]
    fn matches_dense_dot_products() {
        let (rows, cols) = (70, 96);
        let data = q4_1_blocks(rows, cols, 3);
        let m = PackedMatrix::from_blocks(Kind::Q4_1, rows, cols, &data, None).unwrap();
        for n in [1usize, 3, 8] {
            let x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let y = m.matmul(&x, n);
            for t in 0..n {
                for r in 0..rows {
                    let w = m.dequantize_row(r);
                    let dense: f32 = (0..cols).map(|j| x[t * cols + j] * w[j]).sum();
                    let got = y[t * rows + r];
                    assert!(
                        (got - dense).abs() <= 1e-4 * dense.abs().max(1.0),
                        "{got} vs {dense}"
                    );
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
