//! Packed GGUF weights: the file's own blocks, kept as they are (no dense f32 copy), and the
//! kernels that multiply f32 activations with them.
//!
//! - Few input rows (decoding, short prompts: ≤ [`MAX_ROWS`]) are memory-bound: each kernel
//!   streams the blocks once, converts each block to f32 exactly as ggml dequantizes it
//!   ([`super::quant`]) and multiplies it with every input row, accumulating in f32.
//! - Many input rows (long prompts) are compute-bound: [`PackedMatrix::matmul`] dequantizes a
//!   tile of weight rows into a cache-resident f32 panel and multiplies all the inputs with it
//!   in a GEMM (the `gemm` crate candle itself uses), so prefill needs no dense copy either.
//!
//! Either way the products are those of the dense f32 path on the dequantized weights, up to
//! summation order — unlike llama.cpp's (and candle's) quantized matmul, which also quantizes
//! the activations to 8 bits (what a matrix set to [`Activations::Q8`] does instead: see
//! [`super::q8`]). Hand-written SIMD (AVX-512 below, AVX2 in [`avx2`]) is here because no
//! maintained crate multiplies f32 activations with GGUF blocks without quantizing them.

use rayon::prelude::*;

use super::q8::Activations;
use super::quant::Format;
use super::simd;

#[cfg(target_arch = "x86_64")]
mod avx2;

/// `f::<N>(args)` with N = `n` (1..=[`MAX_ROWS`]; more runs [`MAX_ROWS`]): the hand-written
/// kernels have one instance per number of input rows, so that each keeps its accumulators in
/// registers.
#[cfg(target_arch = "x86_64")]
macro_rules! by_input_rows {
    ($n:expr, $f:ident($($arg:expr),*)) => {
        match $n {
            1 => $f::<1>($($arg),*),
            2 => $f::<2>($($arg),*),
            3 => $f::<3>($($arg),*),
            4 => $f::<4>($($arg),*),
            5 => $f::<5>($($arg),*),
            6 => $f::<6>($($arg),*),
            7 => $f::<7>($($arg),*),
            8 => $f::<8>($($arg),*),
            9 => $f::<9>($($arg),*),
            10 => $f::<10>($($arg),*),
            11 => $f::<11>($($arg),*),
            12 => $f::<12>($($arg),*),
            13 => $f::<13>($($arg),*),
            14 => $f::<14>($($arg),*),
            15 => $f::<15>($($arg),*),
            _ => $f::<16>($($arg),*),
        }
    };
}
#[cfg(target_arch = "x86_64")]
use by_input_rows;

/// Up to this many input rows go through the streaming kernels; more through the tiled GEMM.
pub const MAX_ROWS: usize = 16;
/// Size of one f32 panel of the tiled GEMM (per thread: about an L2 cache).
const PANEL_BYTES: usize = 256 * 1024;

/// Weights of one linear layer (rows = outputs, cols = inputs) as GGUF blocks, row after row.
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    rows: usize,
    cols: usize,
    format: Format,
    data: Vec<u8>,
    /// f32 (exact) or llama.cpp's 8-bit activations ([`super::q8`]).
    activations: Activations,
}

impl PackedMatrix {
    /// From raw GGUF block data of a (rows × cols) matrix. `row_order[r]` is the source row of
    /// output row `r` (to un-permute q/k: whole rows move, nothing is re-quantized); `None`
    /// keeps the order. `None` when the data does not fit the shape.
    pub fn from_blocks(
        format: Format,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
        row_order: Option<&[usize]>,
    ) -> Option<Self> {
        if cols == 0 || !cols.is_multiple_of(format.block_len()) {
            return None;
        }
        let row_bytes = cols / format.block_len() * format.block_bytes();
        if data.len() != rows * row_bytes || row_order.is_some_and(|o| o.len() != rows) {
            return None;
        }
        let data = match row_order {
            None => data,
            Some(order) => {
                let mut out = Vec::with_capacity(data.len());
                for &src in order {
                    out.extend_from_slice(data.get(src * row_bytes..(src + 1) * row_bytes)?);
                }
                out
            }
        };
        Some(Self {
            rows,
            cols,
            format,
            data,
            activations: Activations::F32,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    pub fn format(&self) -> Format {
        self.format
    }
    /// The same blocks multiplied in the given arithmetic.
    pub fn with_activations(mut self, activations: Activations) -> Self {
        self.activations = activations;
        self
    }
    pub fn activations(&self) -> Activations {
        self.activations
    }
    /// Memory held by the blocks.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.format.block_len() * self.format.block_bytes()
    }

    pub(crate) fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Dequantized row `r` into `out` (`cols` values), exactly as ggml dequantizes it.
    pub fn dequantize_row_into(&self, r: usize, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if simd::level() >= simd::Level::Avx2 {
            // SAFETY: the CPU has AVX2 and F16C (the level is never above what it detected).
            unsafe { self.dequantize_row_avx2(r, out) };
            return;
        }
        self.dequantize_row_generic::<false>(r, out);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn dequantize_row_avx2(&self, r: usize, out: &mut [f32]) {
        self.dequantize_row_generic::<true>(r, out);
    }

    #[inline(always)]
    fn dequantize_row_generic<const F16C: bool>(&self, r: usize, out: &mut [f32]) {
        let (len, bytes) = (self.format.block_len(), self.format.block_bytes());
        for (b, o) in self
            .row(r)
            .chunks_exact(bytes)
            .zip(out[..self.cols].chunks_exact_mut(len))
        {
            self.format.dequantize_with::<F16C>(b, o);
        }
    }

    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.cols];
        self.dequantize_row_into(r, &mut out);
        out
    }

    /// y (n × rows) = x (n × cols) · Wᵀ, token-major, for any n.
    pub fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        assert_eq!(x.len(), n * self.cols);
        if n == 0 {
            return Vec::new();
        }
        if n <= MAX_ROWS || self.activations == Activations::Q8 {
            let mut y = vec![0f32; n * self.rows];
            matmul_many(&mut [(self, &mut y)], x, n);
            return y;
        }
        self.matmul_tiled(x, n)
    }

    /// Long inputs: per tile of weight rows, dequantize into an f32 panel and multiply every
    /// input row with it (one GEMM per tile, tiles across threads).
    fn matmul_tiled(&self, x: &[f32], n: usize) -> Vec<f32> {
        let cols = self.cols;
        let tile = (PANEL_BYTES / (4 * cols)).clamp(16, 512) / 8 * 8;
        let tiles: Vec<(usize, Vec<f32>)> = (0..self.rows)
            .step_by(tile)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|r0| {
                let width = tile.min(self.rows - r0);
                let mut panel = vec![0f32; width * cols];
                for (i, out) in panel.chunks_exact_mut(cols).enumerate() {
                    self.dequantize_row_into(r0 + i, out);
                }
                let mut yt = vec![0f32; n * width];
                // SAFETY: dst is n × width (row stride width), lhs is x: n × cols (row stride
                // cols), rhs is the panel read as cols × width (element (k, j) at j·cols + k);
                // all three buffers have exactly those sizes and do not overlap.
                unsafe {
                    gemm::gemm(
                        n,
                        width,
                        cols,
                        yt.as_mut_ptr(),
                        1,
                        width as isize,
                        false,
                        x.as_ptr(),
                        1,
                        cols as isize,
                        panel.as_ptr(),
                        cols as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                (r0, yt)
            })
            .collect();
        let mut y = vec![0f32; n * self.rows];
        for (r0, yt) in tiles {
            let width = yt.len() / n;
            for t in 0..n {
                y[t * self.rows + r0..t * self.rows + r0 + width]
                    .copy_from_slice(&yt[t * width..(t + 1) * width]);
            }
        }
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
    if parts[0].0.activations == Activations::Q8 {
        return super::q8::matmul_many(parts, x, n);
    }
    assert!((1..=MAX_ROWS).contains(&n) && x.len() == n * cols);
    for (m, y) in parts.iter() {
        assert!(m.cols == cols && y.len() == n * m.rows);
    }
    in_row_tasks(parts, n, |m, r0, out| rows_kernel(m, x, n, r0, out));
}

/// Runs `kernel(m, r0, out)` over every part's weight rows, 32 rows per task across the thread
/// pool (one hand-off for all the parts), `out` receiving (rows × n) values row-major; then
/// writes each part's `y` token-major (n × rows). Shared by both arithmetics' `matmul_many`.
pub(crate) fn in_row_tasks(
    parts: &mut [(&PackedMatrix, &mut [f32])],
    n: usize,
    kernel: impl Fn(&PackedMatrix, usize, &mut [f32]) + Sync,
) {
    // Measured: 32-row tasks beat fewer, larger ones (better balance across the cores).
    let rows_per_task = 32;
    if n == 1 {
        // One input: (rows × 1) is already token-major.
        let mut tasks = Vec::new();
        for (m, y) in parts.iter_mut() {
            for (i, out) in y.chunks_mut(rows_per_task).enumerate() {
                tasks.push((*m, i * rows_per_task, out));
            }
        }
        tasks
            .into_par_iter()
            .for_each(|(m, r0, out)| kernel(m, r0, out));
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
        .for_each(|(m, r0, out)| kernel(m, r0, out));
    for ((m, y), yt) in parts.iter_mut().zip(&yts) {
        for r in 0..m.rows {
            for t in 0..n {
                y[t * m.rows + r] = yt[r * n + t];
            }
        }
    }
}

/// Weight rows r0.. (out.len() / n of them) times the n input rows, written row-major
/// (row, input): the best kernel the process's [`simd::level`] allows for the matrix's format.
fn rows_kernel(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    rows_kernel_at(simd::level(), m, x, n, r0, out)
}

/// [`rows_kernel`] at a given level (the tests run every level the CPU has). A level above
/// what the CPU detected runs the best one it has instead.
fn rows_kernel_at(
    level: simd::Level,
    m: &PackedMatrix,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    match level.min(simd::detected()) {
        simd::Level::Avx512 => {
            if avx512::reads(m.format) {
                // SAFETY: the CPU supports AVX-512 F/BW/VL, FMA and F16C (the level is capped
                // by what it detected).
                unsafe { avx512::rows(m, x, n, r0, out) };
            } else {
                // SAFETY: as above.
                unsafe { rows_avx512(m, x, n, r0, out) };
            }
            return;
        }
        simd::Level::Avx2 => {
            if avx2::reads(m.format, n) {
                // SAFETY: the CPU supports AVX2, FMA and F16C (as above).
                unsafe { avx2::rows(m, x, n, r0, out) };
            } else {
                // SAFETY: as above.
                unsafe { rows_avx2(m, x, n, r0, out) };
            }
            return;
        }
        simd::Level::Portable => {}
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = level;
    rows_generic::<false, false>(m, x, n, r0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    // The portable code, compiled with AVX2 enabled so that LLVM vectorises the block loops,
    // with explicit fused multiply-adds (Rust never contracts `a + x * w` by itself) and F16C
    // for the blocks' scales.
    rows_generic::<true, true>(m, x, n, r0, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
unsafe fn rows_avx512(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    rows_generic::<true, true>(m, x, n, r0, out);
}

/// Every format, in the order of [`rows_format`]'s `F` parameter.
const FORMATS: [Format; 9] = [
    Format::Q4_0,
    Format::Q4_1,
    Format::Q5_0,
    Format::Q5_1,
    Format::Q8_0,
    Format::Q4K,
    Format::Q5K,
    Format::Q6K,
    Format::F16,
];

/// Portable kernel, one copy per format (so that each block's dequantization and the loops
/// over it are specialised). `FMA`: accumulate with `mul_add` (only where the CPU has FMA; in
/// software it is slow). `F16C`: see [`Format::dequantize_with`].
#[inline(always)]
fn rows_generic<const FMA: bool, const F16C: bool>(
    m: &PackedMatrix,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &mut [f32],
) {
    match m.format {
        Format::Q4_0 => rows_format::<FMA, F16C, 0>(m, x, n, r0, out),
        Format::Q4_1 => rows_format::<FMA, F16C, 1>(m, x, n, r0, out),
        Format::Q5_0 => rows_format::<FMA, F16C, 2>(m, x, n, r0, out),
        Format::Q5_1 => rows_format::<FMA, F16C, 3>(m, x, n, r0, out),
        Format::Q8_0 => rows_format::<FMA, F16C, 4>(m, x, n, r0, out),
        Format::Q4K => rows_format::<FMA, F16C, 5>(m, x, n, r0, out),
        Format::Q5K => rows_format::<FMA, F16C, 6>(m, x, n, r0, out),
        Format::Q6K => rows_format::<FMA, F16C, 7>(m, x, n, r0, out),
        Format::F16 => rows_format::<FMA, F16C, 8>(m, x, n, r0, out),
    }
}

/// Each block is dequantized once into an f32 buffer, then multiplied with every input row
/// into 32 running sums per row. The same operations in the same order whatever `n`, so a
/// sequence gets bit-identical results alone or batched with others.
#[inline(always)]
fn rows_format<const FMA: bool, const F16C: bool, const F: usize>(
    m: &PackedMatrix,
    x: &[f32],
    n: usize,
    r0: usize,
    out: &mut [f32],
) {
    let format = FORMATS[F];
    let (len, bytes) = (format.block_len(), format.block_bytes());
    let cols = m.cols;
    let rows = out.len() / n;
    let mut w = [0f32; 256];
    for i in 0..rows {
        let row = m.row(r0 + i);
        let mut acc = [[0f32; 32]; MAX_ROWS];
        for (b, block) in row.chunks_exact(bytes).enumerate() {
            format.dequantize_with::<F16C>(block, &mut w[..len]);
            for (t, a) in acc.iter_mut().enumerate().take(n) {
                let xb = &x[t * cols + b * len..t * cols + (b + 1) * len];
                for (xc, wc) in xb.chunks_exact(32).zip(w[..len].chunks_exact(32)) {
                    for j in 0..32 {
                        a[j] = if FMA {
                            xc[j].mul_add(wc[j], a[j])
                        } else {
                            a[j] + xc[j] * wc[j]
                        };
                    }
                }
            }
        }
        for t in 0..n {
            out[i * n + t] = acc[t].iter().sum();
        }
    }
}

/// Hand-written AVX-512 kernel for four of the 32-weight formats (Q4_0, Q4_1, Q5_0, Q8_0, not
/// Q5_1: the default model's, and most of Gemma 3's and Qwen2.5's Q4_K_M files): each block is
/// converted once to f32 (rounded as ggml rounds it) and multiplied with every input row. The
/// other formats take the portable kernel, compiled with AVX-512 enabled.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Format, PackedMatrix, BLOCK, MAX_ROWS};
    use crate::model::simd::avx2::half_to_f32;
    use std::arch::x86_64::*;

    /// Software prefetch distance, in blocks (measured: 64-128 best on the dev machine).
    const PREFETCH: usize = 128;

    /// The formats this kernel reads (the others go to the portable one).
    pub fn reads(format: Format) -> bool {
        matches!(
            format,
            Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q8_0
        )
    }

    /// Dispatches on the number of input rows so that each variant keeps its accumulators in
    /// registers.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F/BW/VL, FMA and F16C (the `avx512` level); the matrix is in a
    /// format the kernel [`reads`].
    pub unsafe fn rows(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
        // SAFETY: the caller guarantees the CPU features.
        unsafe { super::by_input_rows!(n, rows_n(m, x, r0, out)) }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn rows_n<const N: usize>(m: &PackedMatrix, x: &[f32], r0: usize, out: &mut [f32]) {
        const { assert!(N >= 1 && N <= MAX_ROWS) };
        let rows = out.len() / N;
        assert!(x.len() == N * m.cols);
        assert!(reads(m.format));
        assert!(m.data.len() >= (r0 + rows) * m.row_bytes());
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
    /// AVX-512 F/BW/VL, FMA and F16C; rows r..r + R exist in `m` (a format the kernel
    /// [`reads`]); x holds N rows of `m.cols`.
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
        let bytes = m.format.block_bytes();
        let q4_1 = m.format == Format::Q4_1;
        let (signed_nibbles, qs_at) = match m.format {
            Format::Q4_0 => (Some(8), 2),
            Format::Q5_0 => (Some(16), 6),
            _ => (None, 0),
        };
        // SAFETY (whole body): the caller guarantees the CPU features and that every block
        // (r + j) * nb + b below is inside the matrix; x holds N rows of `cols` values;
        // prefetches never fault, even past the end.
        unsafe {
            // Lane i of the low half holds weight i, of the high half weight i + 16: the bit of
            // Q5_0's `qh` each lane takes.
            let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            let lanes_hi = _mm512_add_epi32(lanes, _mm512_set1_epi32(16));
            let mut acc = [[_mm512_setzero_ps(); N]; R];
            for b in 0..nb {
                for (j, acc) in acc.iter_mut().enumerate() {
                    let block = m.data.as_ptr().add(((r + j) * nb + b) * bytes);
                    // Streaming the weights once per token: ask for the blocks PREFETCH ahead.
                    _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH * bytes) as *const i8);
                    let d = _mm512_set1_ps(half_to_f32(block));
                    let (lo, hi) = if let Some(bias) = signed_nibbles {
                        // Q4_0 (bias 8) and Q5_0 (bias 16): (q − bias)·d, the subtraction in
                        // integers as ggml does it, then one rounding.
                        let q = _mm_loadu_si128(block.add(qs_at) as *const __m128i);
                        let mask = _mm_set1_epi8(0x0F);
                        let mut lo = _mm512_cvtepu8_epi32(_mm_and_si128(q, mask));
                        let mut hi =
                            _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16::<4>(q), mask));
                        if bias == 16 {
                            let qh =
                                _mm512_set1_epi32((block.add(2) as *const i32).read_unaligned());
                            let one = _mm512_set1_epi32(1);
                            let bit = |shift| {
                                _mm512_slli_epi32::<4>(_mm512_and_si512(
                                    _mm512_srlv_epi32(qh, shift),
                                    one,
                                ))
                            };
                            lo = _mm512_or_si512(lo, bit(lanes));
                            hi = _mm512_or_si512(hi, bit(lanes_hi));
                        }
                        let bias = _mm512_set1_epi32(bias);
                        (
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(lo, bias)), d),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(hi, bias)), d),
                        )
                    } else if q4_1 {
                        let q = _mm_loadu_si128(block.add(4) as *const __m128i);
                        let mask = _mm_set1_epi8(0x0F);
                        let lo = _mm_and_si128(q, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                        let mv = _mm512_set1_ps(half_to_f32(block.add(2)));
                        // q·d, then + m: two roundings, as ggml's `x0*d + m`.
                        let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
                        let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
                        (
                            _mm512_add_ps(_mm512_mul_ps(lo, d), mv),
                            _mm512_add_ps(_mm512_mul_ps(hi, d), mv),
                        )
                    } else {
                        let lo = _mm_loadu_si128(block.add(2) as *const __m128i);
                        let hi = _mm_loadu_si128(block.add(18) as *const __m128i);
                        (
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d),
                        )
                    };
                    // Two fused multiply-adds per input row: the same operations in the same
                    // order whatever the number of rows, so a sequence gets bit-identical
                    // results alone or batched with others.
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

/// Weights per block of every format the AVX-512 kernel reads (`avx512::reads`: Q4_0, Q4_1,
/// Q5_0 and Q8_0, all 32-weight blocks).
#[cfg(target_arch = "x86_64")]
const BLOCK: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn quantized(dtype: GgmlDType, rows: usize, cols: usize, seed: usize) -> PackedMatrix {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&dense, dtype).unwrap();
        let format = Format::from_ggml(dtype).unwrap();
        PackedMatrix::from_blocks(format, rows, cols, q.data().unwrap().into_owned(), None).unwrap()
    }

    use crate::model::quant::GGML_TYPES as ALL;

    /// Every kernel (the one this process dispatches to, and the one of every SIMD level this
    /// CPU can run: the hand-written AVX-512 one, AVX2, portable) against f64 dot products with the dequantized
    /// rows, for every format, every input-row count up to the kernels' limit and beyond, row
    /// counts that are odd or not a multiple of the task size, and several block counts.
    #[test]
    fn matches_dense_dot_products() {
        for dtype in ALL {
            for (rows, cols) in [(70usize, 256usize), (33, 768), (5, 1280)] {
                let m = quantized(dtype, rows, cols, rows);
                let w: Vec<Vec<f32>> = (0..rows).map(|r| m.dequantize_row(r)).collect();
                for n in (1..=MAX_ROWS).chain([17, 40]) {
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
                                    "{what} {dtype:?} {rows}x{cols} n={n}: {got} vs {dense}"
                                );
                            }
                        }
                    };
                    check(&m.matmul(&x, n), false, "dispatched");
                    if n > MAX_ROWS {
                        continue;
                    }
                    for level in simd::runnable() {
                        let mut yt = vec![0f32; rows * n];
                        rows_kernel_at(level, &m, &x, n, 0, &mut yt);
                        check(&yt, true, level.name());
                    }
                }
            }
        }
    }

    /// A sequence's results do not depend on what it is batched with (streaming kernels).
    #[test]
    fn batched_rows_equal_single_rows_bit_for_bit() {
        for dtype in ALL {
            let (rows, cols) = (40, 512);
            let m = quantized(dtype, rows, cols, 7);
            let x: Vec<f32> = (0..4 * cols).map(|i| (i % 17) as f32 / 9.0 - 0.8).collect();
            let batched = m.matmul(&x, 4);
            for t in 0..4 {
                let alone = m.matmul(&x[t * cols..(t + 1) * cols], 1);
                assert_eq!(
                    alone,
                    batched[t * rows..(t + 1) * rows],
                    "{dtype:?} row {t}"
                );
            }
            // The same at every level this CPU can run, kernel by kernel (output row-major
            // (weight row, input)).
            for level in simd::runnable() {
                let mut batched = vec![0f32; rows * 4];
                rows_kernel_at(level, &m, &x, 4, 0, &mut batched);
                for t in 0..4 {
                    let mut alone = vec![0f32; rows];
                    rows_kernel_at(level, &m, &x[t * cols..(t + 1) * cols], 1, 0, &mut alone);
                    for r in 0..rows {
                        assert_eq!(
                            alone[r].to_bits(),
                            batched[r * 4 + t].to_bits(),
                            "{level} {dtype:?} row {r} input {t}"
                        );
                    }
                }
            }
        }
    }

    /// The AVX2 K-quant kernel takes few inputs and the portable kernel (at the same level)
    /// many: batching stays invisible only if the two give the same bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_k_quant_kernel_gives_the_portable_kernels_bits() {
        if simd::detected() < simd::Level::Avx2 {
            return;
        }
        for dtype in [GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K] {
            let (rows, cols) = (37, 1280);
            let m = quantized(dtype, rows, cols, 3);
            for n in 1..=MAX_ROWS {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919) % 211) as f32 / 97.0 - 1.1)
                    .collect();
                let mut portable = vec![0f32; rows * n];
                // SAFETY: the CPU has AVX2, FMA and F16C (checked above).
                unsafe { rows_avx2(&m, &x, n, 0, &mut portable) };
                if !avx2::reads(m.format, n) {
                    continue;
                }
                let mut kernel = vec![0f32; rows * n];
                // SAFETY: as above; the kernel reads this format at this n.
                unsafe { avx2::rows(&m, &x, n, 0, &mut kernel) };
                for (i, (a, b)) in kernel.iter().zip(&portable).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} n={n} value {i}");
                }
            }
        }
    }

    #[test]
    fn row_order_permutes_whole_rows() {
        let plain = quantized(GgmlDType::Q4K, 4, 256, 9);
        let order = [2usize, 0, 3, 1];
        let perm = PackedMatrix::from_blocks(Format::Q4K, 4, 256, plain.data.clone(), Some(&order))
            .unwrap();
        for (r, &src) in order.iter().enumerate() {
            assert_eq!(perm.dequantize_row(r), plain.dequantize_row(src));
        }
    }
}
