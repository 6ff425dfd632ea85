//! Which of our hand-written kernel paths this process runs: one decision, made once, that
//! every kernel (packed matmul, fused attention, row dequantization) dispatches on.
//!
//! The levels, best first:
//! - `avx512`: AVX-512 F/BW/VL with FMA and F16C (x86-64-v4 CPUs: recent AMD Zen 4/5, Intel
//!   server parts and some client parts);
//! - `avx2`: AVX2 with FMA and F16C (x86-64-v3: nearly every x86 laptop and desktop since 2015);
//! - `portable`: plain Rust, what LLVM makes of it for the build target (every other CPU,
//!   ARM included).
//!
//! The best level the CPU has is used, unless the environment variable `TOKENSCOPE_SIMD`
//! (`avx512`, `avx2` or `portable`) caps it lower: that is how the test suite runs the
//! exactness tests on every path this machine can run, so that a user whose CPU has a lower
//! level than the developer's gets what the tests promise. A cap above what the CPU has is
//! lowered to what it has (running an instruction the CPU lacks would crash).
//!
//! Candle's own matmul (the `gemm` crate, used for the dense f32 weights) dispatches by itself
//! on the CPU's features and cache sizes; this switch does not reach it.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The environment variable that caps the level.
pub const ENV: &str = "TOKENSCOPE_SIMD";

/// A kernel path, ordered from the least to the most capable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    Avx2,
    Avx512,
}

impl Level {
    pub const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Level {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "portable" | "scalar" | "none" => Ok(Level::Portable),
            "avx2" => Ok(Level::Avx2),
            "avx512" | "avx-512" => Ok(Level::Avx512),
            other => Err(format!(
                "{ENV}={other:?} is not a kernel level (avx512, avx2 or portable)"
            )),
        }
    }
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl");
        if avx512 {
            return Level::Avx512;
        }
        if avx2 {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// Every level this CPU can run, least capable first.
pub fn runnable() -> Vec<Level> {
    let best = detected();
    Level::ALL.into_iter().filter(|l| *l <= best).collect()
}

/// The cap `TOKENSCOPE_SIMD` asks for, if any (an error names a value that is not a level).
pub fn requested() -> Result<Option<Level>, String> {
    match std::env::var(ENV) {
        Ok(v) if !v.trim().is_empty() => v.parse().map(Some),
        _ => Ok(None),
    }
}

/// The level the kernels run at: the detected one, capped by `TOKENSCOPE_SIMD`. Decided on
/// first use and fixed for the life of the process (a kernel must not change path between
/// two halves of one forward pass). An unreadable cap is ignored here; `serve` and the other
/// commands refuse it at start through [`requested`].
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let best = detected();
        match requested() {
            Ok(Some(cap)) => cap.min(best),
            _ => best,
        }
    })
}

/// AVX2 building blocks shared by the exact-mode kernels (`packed`) and the q8 ones (`q8`).
/// Plain `#[inline(always)]` functions: they take the target features of the kernel they are
/// inlined into, and are only called from kernels compiled with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// The f16 at `p` (little-endian, unaligned) as f32, exactly (F16C).
    ///
    /// # Safety
    /// F16C; two bytes readable at `p`.
    #[inline(always)]
    pub(crate) unsafe fn half_to_f32(p: *const u8) -> f32 {
        // SAFETY: the caller guarantees the feature and the bytes.
        unsafe {
            let bits = (p as *const u16).read_unaligned();
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        }
    }

    /// The sum of the 8 lanes of `v` (pairwise: high half onto low, then within).
    ///
    /// # Safety
    /// AVX.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: the caller guarantees the feature.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// 32 nibbles (16 bytes at `p`: low nibbles are weights 0-15, high ones 16-31) as 32 bytes
    /// 0..15, in weight order.
    ///
    /// # Safety
    /// AVX2; 16 readable bytes at `p`.
    #[inline(always)]
    pub(crate) unsafe fn nibbles(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees the feature and the bytes.
        unsafe {
            let lo = _mm_loadu_si128(p as *const __m128i);
            let hi = _mm_srli_epi16(lo, 4);
            _mm256_and_si256(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(0x0F))
        }
    }

    /// The 32 bits at `p` as 32 bytes, 0xFF where bit j is set (ggml's `bytes_from_bits_32`).
    ///
    /// # Safety
    /// AVX2; 4 readable bytes at `p`.
    #[inline(always)]
    pub(crate) unsafe fn bits_as_bytes(p: *const u8) -> __m256i {
        // SAFETY: the caller guarantees the feature and the bytes.
        unsafe {
            let x = (p as *const u32).read_unaligned() as i32;
            // Byte j takes byte j / 8 of the bits, then every bit but bit j % 8 is set.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(x),
                _mm256_set_epi64x(
                    0x0303030303030303,
                    0x0202020202020202,
                    0x0101010101010101,
                    0,
                ),
            );
            let with = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
            _mm256_cmpeq_epi8(with, _mm256_set1_epi64x(-1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!("AVX2".parse::<Level>(), Ok(Level::Avx2));
        assert_eq!("avx512".parse::<Level>(), Ok(Level::Avx512));
        assert_eq!("portable".parse::<Level>(), Ok(Level::Portable));
        assert!("sse9".parse::<Level>().unwrap_err().contains("sse9"));
        assert!(Level::Portable < Level::Avx2 && Level::Avx2 < Level::Avx512);
    }

    #[test]
    fn the_level_in_force_is_runnable() {
        assert!(runnable().contains(&level()));
        assert!(level() <= detected());
        if let Ok(Some(cap)) = requested() {
            assert_eq!(level(), cap.min(detected()), "{ENV} caps the level");
        }
    }
}
