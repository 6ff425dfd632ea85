//! GGUF block formats the packed kernels read, and their exact dequantization.
//!
//! Each `dequantize` below computes what ggml's `dequantize_row_*` (and candle's `to_float`)
//! computes, operation for operation: the same products and sums in the same order, each
//! rounded to f32 once, never fused (`q·d + m` is a product then a sum). The tests hold every
//! format bit-identical to candle's dequantization.

use candle_core::quantized::GgmlDType;
use half::f16;

/// Weights per K-quant super-block.
const QK_K: usize = 256;

/// A block format the packed kernels read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// IEEE half floats, taken 32 at a time.
    F16,
}

impl Format {
    /// The packed format of a GGUF tensor type; `None` for types without a packed kernel.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => Self::Q4_0,
            GgmlDType::Q4_1 => Self::Q4_1,
            GgmlDType::Q5_0 => Self::Q5_0,
            GgmlDType::Q5_1 => Self::Q5_1,
            GgmlDType::Q8_0 => Self::Q8_0,
            GgmlDType::Q4K => Self::Q4K,
            GgmlDType::Q5K => Self::Q5K,
            GgmlDType::Q6K => Self::Q6K,
            GgmlDType::F16 => Self::F16,
            _ => return None,
        })
    }

    /// Weights per block.
    pub const fn block_len(self) -> usize {
        match self {
            Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            _ => 32,
        }
    }

    /// Bytes per block in the file (and in memory: blocks are kept as the file has them).
    pub const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::F16 => 64,
        }
    }

    /// Dequantizes one block (`block_bytes()` bytes) into `out` (`block_len()` values).
    #[inline(always)]
    pub fn dequantize(self, b: &[u8], out: &mut [f32]) {
        self.dequantize_with::<false>(b, out)
    }

    /// [`Self::dequantize`]; with `F16C`, the block's f16 scales are converted by the F16C
    /// instruction (the same exact conversion, inline: a block of 32 weights would otherwise
    /// spend much of its time in the library call).
    ///
    /// `F16C` must only be set where the CPU has F16C (the kernels check it before dispatching).
    #[inline(always)]
    pub fn dequantize_with<const F16C: bool>(self, b: &[u8], out: &mut [f32]) {
        match self {
            Self::Q4_0 => q4_0::<F16C>(b, out),
            Self::Q4_1 => q4_1::<F16C>(b, out),
            Self::Q5_0 => q5_0::<F16C>(b, out),
            Self::Q5_1 => q5_1::<F16C>(b, out),
            Self::Q8_0 => q8_0::<F16C>(b, out),
            Self::Q4K => q4k::<F16C>(b, out),
            Self::Q5K => q5k::<F16C>(b, out),
            Self::Q6K => q6k::<F16C>(b, out),
            Self::F16 => f16s::<F16C>(b, out),
        }
    }
}

#[inline(always)]
fn half<const F16C: bool>(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    #[cfg(target_arch = "x86_64")]
    if F16C {
        use std::arch::x86_64::{_mm_cvtph_ps, _mm_cvtsi32_si128, _mm_cvtss_f32};
        // SAFETY: callers set F16C only on CPUs that have it.
        return unsafe { _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32))) };
    }
    f16::from_bits(bits).to_f32()
}

#[inline(always)]
fn q4_0<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let d = half::<F16C>(b, 0);
    let qs = &b[2..18];
    let (lo, hi) = out[..32].split_at_mut(16);
    for j in 0..16 {
        lo[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

#[inline(always)]
fn q4_1<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half::<F16C>(b, 0), half::<F16C>(b, 2));
    let qs = &b[4..20];
    let (lo, hi) = out[..32].split_at_mut(16);
    for j in 0..16 {
        lo[j] = (qs[j] & 0x0F) as f32 * d + m;
        hi[j] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5 block (`qs` low nibbles | bit j of `qh` as bit 4 for weight j,
/// high nibbles | bit j + 16 for weight j + 16), in i32 lanes (a form LLVM vectorises).
#[inline(always)]
fn q5_values(qs: &[u8], qh: u32) -> ([i32; 16], [i32; 16]) {
    let mut lo = [0i32; 16];
    let mut hi = [0i32; 16];
    for j in 0..16 {
        lo[j] = (qs[j] & 0x0F) as i32 | ((((qh >> j) & 1) as i32) << 4);
        hi[j] = (qs[j] >> 4) as i32 | ((((qh >> (j + 16)) & 1) as i32) << 4);
    }
    (lo, hi)
}

#[inline(always)]
fn q5_0<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let d = half::<F16C>(b, 0);
    let (lo, hi) = q5_values(&b[6..22], u32::from_le_bytes([b[2], b[3], b[4], b[5]]));
    let (out_lo, out_hi) = out[..32].split_at_mut(16);
    for j in 0..16 {
        out_lo[j] = (lo[j] - 16) as f32 * d;
        out_hi[j] = (hi[j] - 16) as f32 * d;
    }
}

#[inline(always)]
fn q5_1<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let (d, m) = (half::<F16C>(b, 0), half::<F16C>(b, 2));
    let (lo, hi) = q5_values(&b[8..24], u32::from_le_bytes([b[4], b[5], b[6], b[7]]));
    let (out_lo, out_hi) = out[..32].split_at_mut(16);
    for j in 0..16 {
        out_lo[j] = lo[j] as f32 * d + m;
        out_hi[j] = hi[j] as f32 * d + m;
    }
}

#[inline(always)]
fn q8_0<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let d = half::<F16C>(b, 0);
    for (o, &q) in out[..32].iter_mut().zip(&b[2..34]) {
        *o = (q as i8) as f32 * d;
    }
}

#[inline(always)]
fn f16s<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    for (j, o) in out[..32].iter_mut().enumerate() {
        *o = half::<F16C>(b, 2 * j);
    }
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block (ggml's `get_scale_min_k4`).
#[inline(always)]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[inline(always)]
fn q4k<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half::<F16C>(b, 0), half::<F16C>(b, 2));
    let scales = &b[4..16];
    let qs = &b[16..144];
    for c in 0..4 {
        let q = &qs[c * 32..c * 32 + 32];
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        let (lo, hi) = out[c * 64..c * 64 + 64].split_at_mut(32);
        for j in 0..32 {
            lo[j] = d1 * (q[j] & 0xF) as f32 - m1;
            hi[j] = d2 * (q[j] >> 4) as f32 - m2;
        }
    }
}

#[inline(always)]
fn q5k<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (half::<F16C>(b, 0), half::<F16C>(b, 2));
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for c in 0..4 {
        let q = &qs[c * 32..c * 32 + 32];
        let (sc, m) = scale_min_k4(2 * c, scales);
        let (d1, m1) = (d * sc as f32, dmin * m as f32);
        let (sc, m) = scale_min_k4(2 * c + 1, scales);
        let (d2, m2) = (d * sc as f32, dmin * m as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let (lo, hi) = out[c * 64..c * 64 + 64].split_at_mut(32);
        for j in 0..32 {
            let h1 = if qh[j] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[j] & u2 != 0 { 16 } else { 0 };
            lo[j] = d1 * ((q[j] & 0xF) + h1) as f32 - m1;
            hi[j] = d2 * ((q[j] >> 4) + h2) as f32 - m2;
        }
    }
}

#[inline(always)]
fn q6k<const F16C: bool>(b: &[u8], out: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = half::<F16C>(b, 208);
    for half_block in 0..2 {
        let ql = &ql[64 * half_block..64 * half_block + 64];
        let qh = &qh[32 * half_block..32 * half_block + 32];
        let sc = &sc[8 * half_block..8 * half_block + 8];
        let y = &mut out[128 * half_block..128 * half_block + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

/// Every GGUF type with a [`Format`] (what the tests of this module and of the kernels cover).
#[cfg(test)]
pub(crate) const GGML_TYPES: [GgmlDType; 9] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::F16,
];

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every format, bit for bit against candle's dequantization of the same blocks (candle's
    /// `to_float` is ggml's `dequantize_row_*` in Rust).
    #[test]
    fn dequantization_is_candles_bit_for_bit() {
        let (rows, cols) = (3, 512);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.45) * (1.0 + (i % 13) as f32))
            .collect();
        let dense = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        for dtype in GGML_TYPES {
            let q = QTensor::quantize(&dense, dtype).unwrap();
            let theirs: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let format = Format::from_ggml(dtype).unwrap();
            let data = q.data().unwrap();
            assert_eq!(
                data.len(),
                rows * cols / format.block_len() * format.block_bytes()
            );
            let mut ours = vec![0f32; rows * cols];
            for (b, out) in data
                .chunks_exact(format.block_bytes())
                .zip(ours.chunks_exact_mut(format.block_len()))
            {
                format.dequantize(b, out);
            }
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{dtype:?} weight {i}: {a} vs {b}");
            }
        }
    }
}
