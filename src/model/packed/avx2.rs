//! Hand-written AVX2 kernel of the exact mode, for the many CPUs without AVX-512 (AMD before
//! Zen 4, most Intel client parts): the 32-weight formats (Q4_0, Q4_1, Q5_0, Q8_0: the AVX-512
//! kernel's operations on 8-lane registers) and the 256-weight K-quants (Q4_K, Q5_K, Q6_K: most
//! of a Q4_K_M file). Each block is converted once to f32, rounded as ggml rounds it (`(q −
//! bias)·d`, `q·d + m` for Q4_1, `d·sc·q − dmin·m` for Q4_K/Q5_K, `(d·sc)·q` for Q6_K), and
//! multiplied with every input row by fused multiply-adds: the same operations in the same
//! order whatever the number of rows (batching is invisible). LLVM's vectorisation of the
//! portable kernel converts and sums the same values but keeps 32 partial sums per input and
//! re-reads the block for each: measured 1.5–2× slower on a 2-core AMD EPYC without AVX-512.

use std::arch::x86_64::*;

use super::{Format, PackedMatrix, MAX_ROWS};
use crate::model::quant::scale_min_k4;
use crate::model::simd::avx2::{bits_as_bytes, half_to_f32, hsum, nibbles};

/// Software prefetch distance, in blocks (as the AVX-512 kernel's).
const PREFETCH: usize = 128;
const BLOCK: usize = 32;

/// Whether this kernel takes `n` input rows of a matrix in `format` (the others go to the
/// portable one). K-quants only up to [`K_MAX_INPUTS`]: with more, its four accumulators per
/// input no longer fit in registers and the portable kernel (the same bits) is faster.
pub fn reads(format: Format, n: usize) -> bool {
    small_blocks(format) || (k_quant(format) && n <= K_MAX_INPUTS)
}

/// Up to this many inputs the K-quant kernel is faster than the portable one (measured on a
/// 2-core AMD EPYC without AVX-512, Q4_K 640×2048, portable → this kernel: 1 input 203 → 128
/// µs, 2: 235 → 142, 4: 340 → 264, 8: 532 → 633, 16: 954 → 2008).
const K_MAX_INPUTS: usize = 4;

/// 32-weight blocks with one scale.
fn small_blocks(format: Format) -> bool {
    matches!(
        format,
        Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q8_0
    )
}

/// 256-weight blocks of eight or sixteen scaled sub-blocks.
fn k_quant(format: Format) -> bool {
    matches!(format, Format::Q4K | Format::Q5K | Format::Q6K)
}

/// Dispatches on the number of input rows so that each variant keeps its accumulators in
/// registers.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; the matrix is in a format the kernel [`reads`].
pub unsafe fn rows(m: &PackedMatrix, x: &[f32], n: usize, r0: usize, out: &mut [f32]) {
    // SAFETY: the caller guarantees the CPU features.
    unsafe { super::by_input_rows!(n, rows_n(m, x, r0, out)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_n<const N: usize>(m: &PackedMatrix, x: &[f32], r0: usize, out: &mut [f32]) {
    const { assert!(N >= 1 && N <= MAX_ROWS) };
    let rows = out.len() / N;
    assert!(x.len() == N * m.cols);
    assert!(reads(m.format, N));
    assert!(m.data.len() >= (r0 + rows) * m.row_bytes());
    if k_quant(m.format) {
        for i in 0..rows {
            // SAFETY: row r0 + i is inside the asserted bounds.
            unsafe { k_quant_row::<N>(m, x, r0 + i, &mut out[i * N..(i + 1) * N]) };
        }
        return;
    }
    // Each (row, input) sum is one chain of dependent fused multiply-adds (4 per block): with
    // few inputs, several weight rows at a time so that independent chains overlap (decoding
    // is otherwise bound by the FMA latency, not by memory). The arithmetic of each sum is the
    // same whatever the grouping.
    let mut i = 0;
    if N <= 2 {
        while i + 4 <= rows {
            // SAFETY: rows r0 + i .. r0 + i + 4 are inside the asserted bounds.
            unsafe { weight_rows::<N, 4>(m, x, r0 + i, &mut out[i * N..(i + 4) * N]) };
            i += 4;
        }
    }
    if N <= 4 {
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

/// The low 8 bytes of `v` (unsigned) as 8 f32 lanes.
#[inline(always)]
unsafe fn u8x8_f32(v: __m128i) -> __m256 {
    // SAFETY: AVX2 (the caller's target features).
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)) }
}

/// The 8 signed bytes at `p` times `d`, as 8 f32 lanes.
#[inline(always)]
unsafe fn i8x8_times(p: *const u8, d: __m256) -> __m256 {
    // SAFETY: AVX2; 8 readable bytes (the caller's promise).
    unsafe {
        let q = _mm_loadl_epi64(p as *const __m128i);
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d)
    }
}

/// Dot products of weight rows r..r + R with the N input rows; writes (R × N) values.
///
/// # Safety
/// AVX2, FMA and F16C; rows r..r + R exist in `m` (a format the kernel [`reads`]); x holds N
/// rows of `m.cols`.
// Plain index loops: closures and iterator adapters are not always inlined into the AVX2
// instance, and would then run without it.
#[allow(clippy::needless_range_loop)]
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
    let format = m.format;
    // SAFETY (whole body): the caller guarantees the CPU features and that every block
    // (r + j) * nb + b below is inside the matrix; x holds N rows of `cols` values;
    // prefetches never fault, even past the end.
    unsafe {
        let mask = _mm_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); N]; R];
        for b in 0..nb {
            for (j, acc) in acc.iter_mut().enumerate() {
                let block = m.data.as_ptr().add(((r + j) * nb + b) * bytes);
                _mm_prefetch::<_MM_HINT_T0>(block.wrapping_add(PREFETCH * bytes) as *const i8);
                let d = _mm256_set1_ps(half_to_f32(block));
                // The block's 32 weights as four 8-lane vectors, weights 0-7, 8-15, 16-23, 24-31.
                let w = match format {
                    Format::Q8_0 => [
                        i8x8_times(block.add(2), d),
                        i8x8_times(block.add(10), d),
                        i8x8_times(block.add(18), d),
                        i8x8_times(block.add(26), d),
                    ],
                    Format::Q4_1 => {
                        let q = _mm_loadu_si128(block.add(4) as *const __m128i);
                        let lo = _mm_and_si128(q, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                        let mv = _mm256_set1_ps(half_to_f32(block.add(2)));
                        // ggml's `x0*d + m` rounds twice, but q·d is exact in f32 (a 4-bit
                        // integer times an f16's 11-bit significand), so one fused
                        // multiply-add gives the same bits.
                        [
                            _mm256_fmadd_ps(u8x8_f32(lo), d, mv),
                            _mm256_fmadd_ps(u8x8_f32(_mm_srli_si128::<8>(lo)), d, mv),
                            _mm256_fmadd_ps(u8x8_f32(hi), d, mv),
                            _mm256_fmadd_ps(u8x8_f32(_mm_srli_si128::<8>(hi)), d, mv),
                        ]
                    }
                    _ => {
                        // Q4_0 (bias 8) and Q5_0 (bias 16, bit j of `qh` as bit 4 of weight
                        // j): (q − bias)·d, the subtraction in integers as ggml does it, then
                        // one rounding.
                        let q5 = format == Format::Q5_0;
                        let mut q = nibbles(block.add(if q5 { 6 } else { 2 }));
                        if q5 {
                            let high =
                                _mm256_and_si256(bits_as_bytes(block.add(2)), _mm256_set1_epi8(16));
                            q = _mm256_or_si256(q, high);
                        }
                        let q = _mm256_sub_epi8(q, _mm256_set1_epi8(if q5 { 16 } else { 8 }));
                        let q = bytes_f32::<true>(q);
                        [
                            _mm256_mul_ps(q[0], d),
                            _mm256_mul_ps(q[1], d),
                            _mm256_mul_ps(q[2], d),
                            _mm256_mul_ps(q[3], d),
                        ]
                    }
                };
                // Four fused multiply-adds per input row, in the same order whatever the
                // number of rows.
                for t in 0..N {
                    let xb = xp.add(t * cols + b * BLOCK);
                    let mut a = acc[t];
                    a = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xb), a);
                    a = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb.add(8)), a);
                    a = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb.add(16)), a);
                    a = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb.add(24)), a);
                    acc[t] = a;
                }
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            for (t, a) in acc.iter().enumerate() {
                out[j * N + t] = hsum(*a);
            }
        }
    }
}

/// The 32 bytes of `v` as four 8-lane f32 vectors (bytes 0-7, 8-15, 16-23, 24-31), unsigned or
/// signed.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn bytes_f32<const SIGNED: bool>(v: __m256i) -> [__m256; 4] {
    // SAFETY: AVX2 (the caller's target features).
    unsafe {
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256::<1>(v);
        let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
        let mut f = [_mm256_setzero_ps(); 4];
        for k in 0..4 {
            f[k] = if SIGNED {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k]))
            } else {
                u8x8_f32(parts[k])
            };
        }
        f
    }
}

/// A K-quant block's f32 scales: per sub-block, `d·sc` and (Q4_K, Q5_K) `dmin·m`; Q6_K has 16
/// sub-blocks of 16 weights and no minimum.
struct KScales {
    scale: [f32; 16],
    min: [f32; 8],
}

/// The scales of the K-quant block at `block`, rounded as ggml's dequantizers round them.
///
/// # Safety
/// F16C; a whole block of `format` readable at `block`.
#[inline(always)]
unsafe fn k_scales(format: Format, block: *const u8) -> KScales {
    let mut s = KScales {
        scale: [0.0; 16],
        min: [0.0; 8],
    };
    // SAFETY: the caller guarantees the feature and the block's bytes.
    unsafe {
        if format == Format::Q6K {
            let d = half_to_f32(block.add(208));
            for j in 0..16 {
                s.scale[j] = d * (*block.add(192 + j) as i8) as f32;
            }
        } else {
            let (d, dmin) = (half_to_f32(block), half_to_f32(block.add(2)));
            let packed = std::slice::from_raw_parts(block.add(4), 12);
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, packed);
                s.scale[j] = d * sc as f32;
                s.min[j] = dmin * m as f32;
            }
        }
    }
    s
}

/// Weights 32c..32c + 32 of the K-quant block at `block` as four 8-lane vectors.
///
/// # Safety
/// AVX2, FMA and F16C; a whole block of `format` readable at `block`; c < 8.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn k_chunk(format: Format, block: *const u8, c: usize, s: &KScales) -> [__m256; 4] {
    // SAFETY (whole body): the caller guarantees the features and the block's bytes.
    unsafe {
        let low4 = _mm256_set1_epi8(0x0F);
        let mut w = [_mm256_setzero_ps(); 4];
        if format == Format::Q6K {
            // Half h of the block (128 weights): quarter i takes the low (i < 2) or high
            // nibbles of ql[0..32] (i even) or ql[32..64] (i odd), and bits 2i, 2i + 1 of qh.
            let (h, i) = (c / 4, c % 4);
            let ql = _mm256_loadu_si256(block.add(64 * h + 32 * (i % 2)) as *const __m256i);
            let nibbles = if i < 2 {
                _mm256_and_si256(ql, low4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16::<4>(ql), low4)
            };
            let qh = _mm256_loadu_si256(block.add(128 + 32 * h) as *const __m256i);
            let high = _mm256_and_si256(
                _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * i as i32)),
                _mm256_set1_epi8(3),
            );
            let q = _mm256_sub_epi8(
                _mm256_or_si256(nibbles, _mm256_slli_epi16::<4>(high)),
                _mm256_set1_epi8(32),
            );
            let q = bytes_f32::<true>(q);
            for k in 0..4 {
                // (d·sc)·q, a scale per 16 weights.
                let scale = _mm256_set1_ps(s.scale[8 * h + 2 * i + k / 2]);
                w[k] = _mm256_mul_ps(scale, q[k]);
            }
        } else {
            let p = c / 2;
            let at = if format == Format::Q5K { 48 } else { 16 };
            let qs = _mm256_loadu_si256(block.add(at + 32 * p) as *const __m256i);
            let mut q = if c.is_multiple_of(2) {
                _mm256_and_si256(qs, low4)
            } else {
                _mm256_and_si256(_mm256_srli_epi16::<4>(qs), low4)
            };
            if format == Format::Q5K {
                // Bit c of qh[l] is bit 4 of weight l of this chunk.
                let qh = _mm256_loadu_si256(block.add(16) as *const __m256i);
                let bit = _mm256_set1_epi8((1u8 << c) as i8);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit);
                q = _mm256_or_si256(q, _mm256_and_si256(set, _mm256_set1_epi8(16)));
            }
            let q = bytes_f32::<false>(q);
            let (scale, min) = (_mm256_set1_ps(s.scale[c]), _mm256_set1_ps(s.min[c]));
            for k in 0..4 {
                // ggml's `d1 * q - m1` rounds twice, but d1·q is exact in f32 (d·sc is
                // an f16's 11-bit significand times a 6-bit integer, times a 5-bit q:
                // 22 bits), so one fused multiply-add gives the same bits.
                w[k] = _mm256_fmsub_ps(scale, q[k], min);
            }
        }
        w
    }
}

/// Dot products of K-quant weight row r with the N input rows. Four accumulators per input
/// (one per 8-weight vector of a 32-weight chunk: short dependency chains when decoding). The
/// arithmetic is the portable kernel's at this level (`rows_avx2`: the same dequantized
/// values, the same fused multiply-adds into the same 32 partial sums, the same final sum), so
/// the two give the same bits and [`reads`] can choose by the number of inputs.
///
/// # Safety
/// AVX2, FMA and F16C; row r exists in `m` (a K-quant format); x holds N rows of `m.cols`.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn k_quant_row<const N: usize>(m: &PackedMatrix, x: &[f32], r: usize, out: &mut [f32]) {
    const K_BLOCK: usize = 256;
    let cols = m.cols;
    let nb = cols / K_BLOCK;
    let bytes = m.format.block_bytes();
    let format = m.format;
    let xp = x.as_ptr();
    // SAFETY (whole body): the caller guarantees the CPU features, that row r's blocks are in
    // the matrix and that x holds N rows of `cols` values; prefetches never fault.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 4]; N];
        for b in 0..nb {
            let block = m.data.as_ptr().add((r * nb + b) * bytes);
            let ahead = block.wrapping_add(K_PREFETCH * bytes);
            for line in (0..bytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
            }
            let scales = k_scales(format, block);
            for c in 0..8 {
                let w = k_chunk(format, block, c, &scales);
                for t in 0..N {
                    let xb = xp.add(t * cols + b * K_BLOCK + c * 32);
                    for k in 0..4 {
                        acc[t][k] =
                            _mm256_fmadd_ps(w[k], _mm256_loadu_ps(xb.add(8 * k)), acc[t][k]);
                    }
                }
            }
        }
        // Lane l of accumulator k holds the partial sum of weight 8k + l of every 32-weight
        // chunk: the portable kernel's 32 partial sums, added up in its order.
        for t in 0..N {
            let mut lanes = [0f32; 32];
            for k in 0..4 {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * k), acc[t][k]);
            }
            out[t] = lanes.iter().sum();
        }
    }
}

/// Software prefetch distance of the K-quant kernel, in 256-weight blocks.
const K_PREFETCH: usize = 8;
