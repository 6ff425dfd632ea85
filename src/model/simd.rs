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
