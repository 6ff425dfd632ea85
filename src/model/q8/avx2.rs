//! Hand-written AVX2 kernels of the q8 mode for the formats of common GGUF files (Q4_0, Q4_1,
//! Q5_0, Q8_0, Q4_K, Q6_K): each weight block is expanded once into 8-bit integers in
//! registers and multiplied with every input row's block by byte multiply-adds
//! (`vpmaddubsw`: unsigned × signed bytes, pairs summed into 16 bits, then `vpmaddwd` into 32),
//! the sign of a signed weight moved onto the input (`vpsignb`) as ggml does. Integer sums
//! are exact; each block's sum is scaled and accumulated in 8 f32 lanes (`vfmadd`), summed
//! at the end of the row: the same operations whatever the number of input rows, so batching
//! stays invisible. (Hand-written because no crate multiplies GGUF blocks with 8-bit
//! activations; candle's quantized matmul computes another ggml version's q8_K.)

use std::arch::x86_64::*;

use super::{QuantizedRows, QK_K};
use crate::model::packed::PackedMatrix;
use crate::model::quant::{scale_min_k4, Format};
use crate::model::simd::avx2::{bits_as_bytes, half_to_f32, hsum, nibbles};

/// The formats these kernels read; the others take the portable kernel.
pub(super) fn reads(format: Format) -> bool {
    matches!(
        format,
        Format::Q4_0 | Format::Q4_1 | Format::Q5_0 | Format::Q8_0 | Format::Q4K | Format::Q6K
    )
}

/// Input rows per pass over a weight row (their accumulators stay in L1).
const CHUNK: usize = 16;

/// Weight rows `r0..` (out.len() / n of them) times the n quantized input rows, row-major
/// (row, input).
///
/// # Safety
/// The CPU has AVX2, FMA and F16C; `m` is in a format the kernels [`reads`]; `q` holds n
/// input rows of `m.cols()` values quantized for it.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows(
    m: &PackedMatrix,
    q: &QuantizedRows,
    n: usize,
    r0: usize,
    out: &mut [f32],
) {
    let format = m.format();
    let cols = m.cols();
    assert!(reads(format) && q.cols == cols && q.qs.len() >= n * cols);
    let blocks = cols / format.block_len();
    assert!(q.d.len() >= n * blocks);
    if format == Format::Q4_1 {
        assert!(q.s.len() >= n * blocks);
    }
    if matches!(format, Format::Q4K | Format::Q6K) {
        assert!(q.bsums.len() >= n * blocks * 16);
    }
    let rows = out.len() / n;
    for i in 0..rows {
        let row = m.row(r0 + i);
        assert_eq!(row.len(), blocks * format.block_bytes());
        let out = &mut out[i * n..(i + 1) * n];
        let mut t0 = 0;
        while t0 < n {
            let width = CHUNK.min(n - t0);
            let mut acc = [_mm256_setzero_ps(); CHUNK];
            let mut extra = [0f32; CHUNK];
            // SAFETY: the row holds `blocks` blocks and q every block of inputs t0..t0+width
            // (asserted above); the features are the caller's promise.
            unsafe {
                match format {
                    Format::Q4K => q4k(row, q, t0, width, &mut acc, &mut extra),
                    Format::Q6K => q6k(row, q, t0, width, &mut acc),
                    _ => small(format, row, q, t0, width, &mut acc, &mut extra),
                }
            }
            for k in 0..width {
                // SAFETY: AVX2 (the caller's promise).
                out[t0 + k] = unsafe { hsum(acc[k]) } + extra[k];
            }
            t0 += width;
        }
    }
}

/// Σ of 32 signed byte products, as 8 i32 lanes.
#[inline(always)]
unsafe fn dot_i8(w: __m256i, y: __m256i) -> __m256i {
    // SAFETY: AVX2 (the callers' target features).
    unsafe {
        let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(y, w));
        _mm256_madd_epi16(p, _mm256_set1_epi16(1))
    }
}

/// The 32-weight formats, one copy per format (`F`: 0 Q4_0, 1 Q4_1, 2 Q5_0, 3 Q8_0).
#[inline(always)]
unsafe fn small(
    format: Format,
    row: &[u8],
    q: &QuantizedRows,
    t0: usize,
    width: usize,
    acc: &mut [__m256; CHUNK],
    extra: &mut [f32; CHUNK],
) {
    // SAFETY: the caller's bounds, passed on.
    unsafe {
        match format {
            Format::Q4_0 => small_f::<0>(row, q, t0, width, acc, extra),
            Format::Q4_1 => small_f::<1>(row, q, t0, width, acc, extra),
            Format::Q5_0 => small_f::<2>(row, q, t0, width, acc, extra),
            _ => small_f::<3>(row, q, t0, width, acc, extra),
        }
    }
}

/// Block `p` of format `F` as 32 integers (signed, or unsigned for Q4_1), its scale and (Q4_1)
/// its minimum.
#[inline(always)]
unsafe fn block32<const F: u8>(p: *const u8) -> (__m256i, f32, f32) {
    // SAFETY: AVX2 and F16C; a whole block readable at p (the callers' promise).
    unsafe {
        let w = match F {
            0 => _mm256_sub_epi8(nibbles(p.add(2)), _mm256_set1_epi8(8)),
            1 => nibbles(p.add(4)),
            2 => {
                let high = _mm256_andnot_si256(bits_as_bytes(p.add(2)), _mm256_set1_epi8(-16));
                _mm256_or_si256(nibbles(p.add(6)), high)
            }
            _ => _mm256_loadu_si256(p.add(2) as *const __m256i),
        };
        let m = if F == 1 { half_to_f32(p.add(2)) } else { 0.0 };
        (w, half_to_f32(p), m)
    }
}

/// Σ w·y over a block of format `F`, as 8 i32 lanes.
#[inline(always)]
unsafe fn dot32<const F: u8>(w: __m256i, y: __m256i) -> __m256i {
    // SAFETY: AVX2 (the callers' promise).
    unsafe {
        if F == 1 {
            _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), _mm256_set1_epi16(1))
        } else {
            dot_i8(w, y)
        }
    }
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn small_f<const F: u8>(
    row: &[u8],
    q: &QuantizedRows,
    t0: usize,
    width: usize,
    acc: &mut [__m256; CHUNK],
    extra: &mut [f32; CHUNK],
) {
    let bytes = [18, 20, 22, 34][F as usize];
    let blocks = q.cols / 32;
    // SAFETY (whole body): block b of the row is row[b·bytes..(b+1)·bytes]; input t's block
    // b is qs[t·cols + 32b..][..32], its scale d[t·blocks + b] (the caller's bounds).
    unsafe {
        if width == 1 {
            // Decoding: one input, its accumulator in a register (the same operations in the
            // same order as below).
            let y = q.qs.as_ptr().add(t0 * q.cols);
            let (d, s) = (q.d.as_ptr().add(t0 * blocks), q.s.as_ptr());
            let (mut a, mut e) = (acc[0], extra[0]);
            for b in 0..blocks {
                let (w, dw, mw) = block32::<F>(row.as_ptr().add(b * bytes));
                let yb = _mm256_loadu_si256(y.add(b * 32) as *const __m256i);
                let sum = dot32::<F>(w, yb);
                a = _mm256_fmadd_ps(_mm256_set1_ps(dw * *d.add(b)), _mm256_cvtepi32_ps(sum), a);
                if F == 1 {
                    e += mw * *s.add(t0 * blocks + b);
                }
            }
            acc[0] = a;
            extra[0] = e;
            return;
        }
        for b in 0..blocks {
            let (w, dw, mw) = block32::<F>(row.as_ptr().add(b * bytes));
            for k in 0..width {
                let t = t0 + k;
                let y =
                    _mm256_loadu_si256(q.qs.as_ptr().add(t * q.cols + b * 32) as *const __m256i);
                let sum = dot32::<F>(w, y);
                let scale = _mm256_set1_ps(dw * *q.d.get_unchecked(t * blocks + b));
                acc[k] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sum), acc[k]);
                if F == 1 {
                    extra[k] += mw * *q.s.get_unchecked(t * blocks + b);
                }
            }
        }
    }
}

#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q4k(
    row: &[u8],
    q: &QuantizedRows,
    t0: usize,
    width: usize,
    acc: &mut [__m256; CHUNK],
    extra: &mut [f32; CHUNK],
) {
    let blocks = q.cols / QK_K;
    // The minimums' part in four lanes per input, as ggml sums it (pairs of sub-blocks).
    let mut acc_m = [[0f32; 4]; CHUNK];
    // SAFETY (whole body): as in `small`, with 144-byte blocks of 256 weights and 16 sums of
    // 16 per input block.
    unsafe {
        for b in 0..blocks {
            let block = &row[b * 144..(b + 1) * 144];
            let p = block.as_ptr();
            let (d, dmin) = (half_to_f32(p), half_to_f32(p.add(2)));
            let mut sc = [0i16; 8];
            let mut mins = [0i32; 8];
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &block[4..16]);
                sc[j] = s as i16;
                mins[j] = m as i32;
            }
            let mut w = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let q4 = _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
                let mask = _mm256_set1_epi8(0x0F);
                w[2 * c] = _mm256_and_si256(q4, mask);
                w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q4, 4), mask);
            }
            for k in 0..width {
                let t = t0 + k;
                let y = q.qs.as_ptr().add(t * q.cols + b * QK_K);
                let mut sumi = _mm256_setzero_si256();
                for j in 0..8 {
                    let yj = _mm256_loadu_si256(y.add(32 * j) as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(w[j], yj);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, _mm256_set1_epi16(sc[j])));
                }
                let yd = *q.d.get_unchecked(t * blocks + b);
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(yd * d), _mm256_cvtepi32_ps(sumi), acc[k]);
                let bsums = &q.bsums[(t * blocks + b) * 16..(t * blocks + b + 1) * 16];
                let neg = -yd * dmin;
                for (i, lane) in acc_m[k].iter_mut().enumerate() {
                    let pair = |j: usize| bsums[2 * j] as i32 + bsums[2 * j + 1] as i32;
                    let prod = mins[2 * i] * pair(2 * i) + mins[2 * i + 1] * pair(2 * i + 1);
                    *lane = neg.mul_add(prod as f32, *lane);
                }
            }
        }
    }
    for k in 0..width {
        let m = acc_m[k];
        extra[k] += (m[0] + m[2]) + (m[1] + m[3]);
    }
}

// Plain index loops: closures and iterator adapters are not always inlined into the AVX2
// instance, and would then run without it.
#[allow(clippy::needless_range_loop)]
#[inline(always)]
unsafe fn q6k(row: &[u8], q: &QuantizedRows, t0: usize, width: usize, acc: &mut [__m256; CHUNK]) {
    let blocks = q.cols / QK_K;
    // SAFETY (whole body): as in `q4k`, with 210-byte blocks.
    unsafe {
        for b in 0..blocks {
            let block = &row[b * 210..(b + 1) * 210];
            let p = block.as_ptr();
            let d = half_to_f32(p.add(208));
            let sc = &block[192..208];
            let mut w = [_mm256_setzero_si256(); 8];
            let mut scales = [_mm256_setzero_si256(); 8];
            let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
            let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(sc.as_ptr() as *const __m128i));
            for h in 0..2 {
                let ql_a = _mm256_loadu_si256(p.add(64 * h) as *const __m256i);
                let ql_b = _mm256_loadu_si256(p.add(64 * h + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                // Bits 0-1, 2-3, 4-5, 6-7 of qh, moved to bits 4-5 of each byte.
                let h0 = _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m2), 4);
                let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m2), 4);
                let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m2), 4);
                let lo_a = _mm256_and_si256(ql_a, m4);
                let lo_b = _mm256_and_si256(ql_b, m4);
                let hi_a = _mm256_and_si256(_mm256_srli_epi16(ql_a, 4), m4);
                let hi_b = _mm256_and_si256(_mm256_srli_epi16(ql_b, 4), m4);
                let vs = [
                    _mm256_or_si256(lo_a, h0),
                    _mm256_or_si256(lo_b, h1),
                    _mm256_or_si256(hi_a, h2),
                    _mm256_or_si256(hi_b, h3),
                ];
                for v in 0..4 {
                    let val = vs[v];
                    // Unsigned (0..63): the −32 is taken off once per block through the
                    // inputs' sums of 16, as ggml does (the same integers in each lane).
                    w[4 * h + v] = val;
                    // Weights 128h + 32v.. are sub-blocks 8h + 2v and 8h + 2v + 1 of 16.
                    let (s0, s1) = (sc[8 * h + 2 * v] as i8, sc[8 * h + 2 * v + 1] as i8);
                    scales[4 * h + v] =
                        _mm256_set_m128i(_mm_set1_epi16(s1 as i16), _mm_set1_epi16(s0 as i16));
                }
            }
            for k in 0..width {
                let t = t0 + k;
                let y = q.qs.as_ptr().add(t * q.cols + b * QK_K);
                let mut sumi = _mm256_setzero_si256();
                for j in 0..8 {
                    let yj = _mm256_loadu_si256(y.add(32 * j) as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(w[j], yj);
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p16, scales[j]));
                }
                let bsums = q.bsums.as_ptr().add((t * blocks + b) * 16);
                let sums16 = _mm256_loadu_si256(bsums as *const __m256i);
                let minus = _mm256_slli_epi32(_mm256_madd_epi16(sums16, scales16), 5);
                sumi = _mm256_sub_epi32(sumi, minus);
                let yd = *q.d.get_unchecked(t * blocks + b);
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(yd * d), _mm256_cvtepi32_ps(sumi), acc[k]);
            }
        }
    }
}
