//! Hand-written AVX2 kernel of the exact mode for the 32-weight formats (Q4_0, Q4_1, Q5_0,
//! Q8_0): the AVX-512 kernel's operations on 8-lane registers, for the many CPUs without
//! AVX-512 (AMD before Zen 4, most Intel client parts). Each block is converted once to f32
//! (rounded as ggml rounds it: `(q − bias)·d`, or `q·d + m` for Q4_1) and multiplied with
//! every input row: four fused multiply-adds per block and input into one 8-lane accumulator,
//! the same operations in the same order whatever the number of rows (batching is invisible).
//! LLVM's vectorisation of the portable kernel converts and sums the same values but keeps 32
//! partial sums per input and re-reads the block for each: measured 1.5–2× slower on a 2-core
//! AMD EPYC without AVX-512.

use std::arch::x86_64::*;

use super::{Format, PackedMatrix, MAX_ROWS};

/// Software prefetch distance, in blocks (as the AVX-512 kernel's).
const PREFETCH: usize = 128;
const BLOCK: usize = 32;

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
/// The CPU must support AVX2, FMA and F16C; the matrix is in a format the kernel [`reads`].
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

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_n<const N: usize>(m: &PackedMatrix, x: &[f32], r0: usize, out: &mut [f32]) {
    const { assert!(N >= 1 && N <= MAX_ROWS) };
    let rows = out.len() / N;
    assert!(x.len() == N * m.cols);
    assert!(reads(m.format));
    assert!(m.data.len() >= (r0 + rows) * m.row_bytes());
    // With few inputs, two weight rows at a time: two independent accumulator chains per
    // input (16 registers: 2·N accumulators and a block's 4 vectors).
    let mut i = 0;
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

/// The f16 at `p` (little-endian, unaligned) as f32, exactly (F16C).
///
/// # Safety
/// F16C; two bytes readable at `p`.
#[inline(always)]
unsafe fn half_to_f32(p: *const u8) -> f32 {
    // SAFETY: the caller guarantees the feature and the bytes.
    unsafe {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
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
        let lanes = [
            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15),
            _mm256_setr_epi32(16, 17, 18, 19, 20, 21, 22, 23),
            _mm256_setr_epi32(24, 25, 26, 27, 28, 29, 30, 31),
        ];
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
                        // q·d, then + m: two roundings, as ggml's `x0*d + m`.
                        [
                            _mm256_add_ps(_mm256_mul_ps(u8x8_f32(lo), d), mv),
                            _mm256_add_ps(_mm256_mul_ps(u8x8_f32(_mm_srli_si128::<8>(lo)), d), mv),
                            _mm256_add_ps(_mm256_mul_ps(u8x8_f32(hi), d), mv),
                            _mm256_add_ps(_mm256_mul_ps(u8x8_f32(_mm_srli_si128::<8>(hi)), d), mv),
                        ]
                    }
                    _ => {
                        // Q4_0 (bias 8) and Q5_0 (bias 16): (q − bias)·d, the subtraction in
                        // integers as ggml does it, then one rounding.
                        let q5 = format == Format::Q5_0;
                        let q =
                            _mm_loadu_si128(block.add(if q5 { 6 } else { 2 }) as *const __m128i);
                        let lo = _mm_and_si128(q, mask);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), mask);
                        let mut ints = [
                            _mm256_cvtepu8_epi32(lo),
                            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(lo)),
                            _mm256_cvtepu8_epi32(hi),
                            _mm256_cvtepu8_epi32(_mm_srli_si128::<8>(hi)),
                        ];
                        if q5 {
                            // Bit j of `qh` is bit 4 of weight j.
                            let qh =
                                _mm256_set1_epi32((block.add(2) as *const i32).read_unaligned());
                            let one = _mm256_set1_epi32(1);
                            for k in 0..4 {
                                let bit = _mm256_and_si256(_mm256_srlv_epi32(qh, lanes[k]), one);
                                ints[k] = _mm256_or_si256(ints[k], _mm256_slli_epi32::<4>(bit));
                            }
                        }
                        let bias = _mm256_set1_epi32(if q5 { 16 } else { 8 });
                        let mut w = [_mm256_setzero_ps(); 4];
                        for k in 0..4 {
                            let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(ints[k], bias));
                            w[k] = _mm256_mul_ps(v, d);
                        }
                        w
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
                let s = _mm_add_ps(_mm256_castps256_ps128(*a), _mm256_extractf128_ps::<1>(*a));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_movehdup_ps(s));
                out[j * N + t] = _mm_cvtss_f32(s);
            }
        }
    }
}
