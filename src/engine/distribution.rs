//! Distribution maths over one position's logits: log-softmax (with temperature), top-k with
//! 1-based ranks (ties broken by token id), entropy, full-vocabulary rank, sampling.
//!
//! The model's logits are f32; everything here is computed in f64 from them. That keeps any
//! accepted temperature finite: logits / T for T ≥ [`MIN_TEMPERATURE`] stays far inside f64's
//! range (|f32| ≤ 3.4e38, / 1e-5 ≤ 3.4e43), where f32 would overflow to ±inf for T ≈ 1e-38
//! and turn log-softmax into NaN.

use rand::RngCore;
use rand_chacha::ChaCha20Rng;

/// Temperatures below this are greedy decoding (vLLM's rule, `_SAMPLING_EPS`): the sampler
/// could only ever pick the argmax, and the processed distribution would be a spike.
pub const MIN_TEMPERATURE: f64 = 1e-5;

/// The model returned a logit that is NaN or infinite: no distribution can be reported.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("the model produced a non-finite logit ({value}) for token {token_id}")]
pub struct NonFiniteLogits {
    pub token_id: u32,
    pub value: f32,
}

/// The log-probabilities of one position over the whole vocabulary.
#[derive(Debug, Clone)]
pub struct Distribution {
    logprobs: Vec<f64>,
}

impl Distribution {
    /// log_softmax(logits / temperature), in f64. `temperature` must be ≥ [`MIN_TEMPERATURE`]
    /// (1.0 = the model's own distribution); smaller values are clamped to it. Logits that are
    /// NaN or ±inf are an error rather than a distribution with holes.
    pub fn from_logits(logits: &[f32], temperature: f64) -> Result<Self, NonFiniteLogits> {
        if let Some((i, &v)) = logits.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(NonFiniteLogits {
                token_id: i as u32,
                value: v,
            });
        }
        let t = temperature.max(MIN_TEMPERATURE);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        // (x - max) / T ≤ 0 for every x, so no exponential overflows; the max contributes 1.
        let scaled = |x: f32| (x as f64 - max) / t;
        let sum: f64 = logits.iter().map(|&x| scaled(x).exp()).sum();
        let lse = sum.ln();
        Ok(Self {
            logprobs: logits.iter().map(|&x| scaled(x) - lse).collect(),
        })
    }

    pub fn len(&self) -> usize {
        self.logprobs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.logprobs.is_empty()
    }
    pub fn logprobs(&self) -> &[f64] {
        &self.logprobs
    }
    /// The log-probability of `id` (−inf for an id outside the vocabulary).
    pub fn logprob(&self, id: u32) -> f64 {
        self.logprobs
            .get(id as usize)
            .copied()
            .unwrap_or(f64::NEG_INFINITY)
    }

    /// The `k` most likely tokens, best first; equal log-probs rank by lower token id.
    /// Partial selection, then a sort of the k survivors only.
    pub fn top_k(&self, k: usize) -> Vec<(u32, f64)> {
        let k = k.min(self.logprobs.len());
        if k == 0 {
            return Vec::new();
        }
        let mut idx: Vec<u32> = (0..self.logprobs.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| self.order(*a, *b);
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_unstable_by(cmp);
        idx.into_iter()
            .map(|i| (i, self.logprobs[i as usize]))
            .collect()
    }

    /// Best-first order: higher log-prob first, then lower id. NaN sorts last.
    fn order(&self, a: u32, b: u32) -> std::cmp::Ordering {
        let (la, lb) = (self.logprobs[a as usize], self.logprobs[b as usize]);
        lb.total_cmp(&la)
            .then_with(|| {
                // total_cmp puts NaN above +inf; push NaN to the end explicitly.
                la.is_nan().cmp(&lb.is_nan())
            })
            .then(a.cmp(&b))
    }

    /// 1-based rank of `id` in the whole vocabulary, with the same tie rule as [`Self::top_k`].
    pub fn rank(&self, id: u32) -> usize {
        let lp = self.logprob(id);
        1 + self
            .logprobs
            .iter()
            .enumerate()
            .filter(|&(j, &l)| l > lp || (l == lp && (j as u32) < id))
            .count()
    }

    /// The most likely token (rank 1).
    pub fn argmax(&self) -> u32 {
        self.top_k(1).first().map_or(0, |&(id, _)| id)
    }

    /// Shannon entropy in nats.
    pub fn entropy(&self) -> f64 {
        -self
            .logprobs
            .iter()
            .filter(|l| l.is_finite())
            .map(|&l| l.exp() * l)
            .sum::<f64>()
    }

    /// Draws a token id with probability exp(logprob), by inverse CDF in token-id order, with
    /// one [`uniform`] draw.
    pub fn sample(&self, rng: &mut ChaCha20Rng) -> u32 {
        let u = uniform(rng);
        let mut acc = 0.0f64;
        let mut last_possible = None;
        for (i, &l) in self.logprobs.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            acc += l.exp();
            last_possible = Some(i as u32);
            if u < acc {
                return i as u32;
            }
        }
        // Rounding can leave the total a hair under 1.
        last_possible.unwrap_or_else(|| self.argmax())
    }

    /// Nucleus sampling: draws from the smallest best-first prefix of the vocabulary whose
    /// probability reaches `top_p`, renormalized, with one [`uniform`] draw (inverse CDF in
    /// best-first order). `top_p` ≥ 1 is [`Self::sample`] exactly.
    pub fn sample_top_p(&self, top_p: f64, rng: &mut ChaCha20Rng) -> u32 {
        if top_p >= 1.0 {
            return self.sample(rng);
        }
        // Growing k until the mass suffices keeps the common small-nucleus case cheap.
        let mut k = 64;
        let (nucleus, mass) = loop {
            let top = self.top_k(k);
            let mut nucleus: Vec<(u32, f64)> = Vec::new();
            let mut mass = 0.0f64;
            for &(id, lp) in &top {
                nucleus.push((id, lp.exp()));
                mass += lp.exp();
                if mass >= top_p {
                    break;
                }
            }
            if mass >= top_p || top.len() < k {
                break (nucleus, mass);
            }
            k *= 4;
        };
        let u = uniform(rng) * mass;
        let mut acc = 0.0;
        for &(id, p) in &nucleus {
            acc += p;
            if u < acc {
                return id;
            }
        }
        nucleus.last().map_or_else(|| self.argmax(), |&(id, _)| id)
    }
}

/// The sampler's generator for `seed`, specified so that it never changes with a dependency's
/// version: ChaCha20 (D. J. Bernstein's variant: 64-bit block counter, nonce 0) keyed by the
/// seed's 8 little-endian bytes followed by 24 zero bytes. Same model, request, seed and build
/// → same tokens; any ChaCha20 implementation reproduces the draws.
pub fn seeded_rng(seed: u64) -> ChaCha20Rng {
    use rand::SeedableRng;
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    ChaCha20Rng::from_seed(key)
}

/// One uniform draw in [0, 1): the top 53 bits of the next 64-bit output word (little-endian
/// keystream bytes), times 2⁻⁵³. Written out rather than `rng.random::<f64>()`, whose
/// conversion is `rand`'s to change.
pub fn uniform(rng: &mut ChaCha20Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Numerically stable log-softmax in f32 (the exponential sum accumulated in f64).
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x
        .iter()
        .copied()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // All -inf (or empty): nothing is possible; report -inf everywhere rather than NaN.
        return vec![f32::NEG_INFINITY; x.len()];
    }
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = sum.ln() as f32;
    x.iter().map(|&v| (v - max) - lse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_matches_definition() {
        let x = [1.0f32, 2.0, 3.0, -1.0];
        let lp = log_softmax(&x);
        let z: f64 = x.iter().map(|&v| (v as f64).exp()).sum();
        for (l, v) in lp.iter().zip(x) {
            assert!((*l as f64 - (v as f64 - z.ln())).abs() < 1e-6);
        }
        let total: f64 = lp.iter().map(|&l| (l as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn log_softmax_is_stable_for_large_logits() {
        let lp = log_softmax(&[1000.0, 1000.0]);
        assert!((lp[0] - (-std::f32::consts::LN_2)).abs() < 1e-6);
    }

    #[test]
    fn ties_rank_by_token_id() {
        let d = Distribution::from_logits(&[0.5, 2.0, 2.0, 1.0, 2.0], 1.0).unwrap();
        let top: Vec<u32> = d.top_k(4).into_iter().map(|(i, _)| i).collect();
        assert_eq!(top, [1, 2, 4, 3]);
        assert_eq!(d.rank(1), 1);
        assert_eq!(d.rank(2), 2);
        assert_eq!(d.rank(4), 3);
        assert_eq!(d.rank(3), 4);
        assert_eq!(d.rank(0), 5);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [3.0f32, 1.0, 0.0];
        let cold = Distribution::from_logits(&logits, 0.5).unwrap();
        let hot = Distribution::from_logits(&logits, 2.0).unwrap();
        assert!(cold.logprob(0) > hot.logprob(0));
        assert!(cold.entropy() < hot.entropy());
        let expected = log_softmax(&[6.0, 2.0, 0.0]);
        for (a, b) in cold.logprobs().iter().zip(expected) {
            assert!((a - b as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn entropy_of_uniform_is_ln_n() {
        let d = Distribution::from_logits(&[0.0; 8], 1.0).unwrap();
        assert!((d.entropy() - (8f64).ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_larger_than_vocab_is_clamped() {
        let d = Distribution::from_logits(&[0.0, 1.0], 1.0).unwrap();
        assert_eq!(d.top_k(50).len(), 2);
    }

    /// Every accepted temperature gives finite log-probabilities that sum to 1 — including
    /// those whose f32 scaling overflowed (1e-300 became 0 in f32: logits / 0 = inf, NaN out).
    #[test]
    fn tiny_temperatures_stay_finite_and_normalised() {
        let logits = [12.5f32, 11.0, -3.0, 0.25, 12.5 - 1e-3];
        for t in [1e-300, 1e-30, 1e-6, MIN_TEMPERATURE, 1e-4, 0.01, 1.0, 2.0] {
            let d = Distribution::from_logits(&logits, t).unwrap();
            assert!(d.logprobs().iter().all(|l| l.is_finite()), "T={t}");
            let total: f64 = d.logprobs().iter().map(|l| l.exp()).sum();
            assert!((total - 1.0).abs() < 1e-12, "T={t}: total {total}");
            assert!(d.entropy().is_finite());
            assert_eq!(d.argmax(), 0);
            // The exact value: log_softmax of logits / T in f64.
            let te = t.max(MIN_TEMPERATURE);
            let s: Vec<f64> = logits.iter().map(|&x| x as f64 / te).collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            for (got, v) in d.logprobs().iter().zip(&s) {
                let want = v - lse;
                assert!((got - want).abs() <= 1e-9 * want.abs().max(1.0), "T={t}");
            }
        }
    }

    #[test]
    fn non_finite_logits_are_an_error() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let err = Distribution::from_logits(&[0.0, bad, 1.0], 1.0).unwrap_err();
            assert_eq!(err.token_id, 1);
        }
    }

    /// The sampler's stream is the published ChaCha20 keystream: with seed 0 (the all-zero
    /// key, nonce 0, block 0) its first bytes are 76 b8 e0 ad a0 f1 3d 90 40 5d 6a e5 53 86 bd
    /// 28 (RFC 7539's test vector A.1 #1), so a seed means the same draws in every build.
    #[test]
    fn seeded_rng_is_the_published_chacha20_stream() {
        let mut rng = seeded_rng(0);
        assert_eq!(
            rng.next_u64(),
            u64::from_le_bytes([0x76, 0xb8, 0xe0, 0xad, 0xa0, 0xf1, 0x3d, 0x90])
        );
        assert_eq!(
            rng.next_u64(),
            u64::from_le_bytes([0x40, 0x5d, 0x6a, 0xe5, 0x53, 0x86, 0xbd, 0x28])
        );
        let mut a = seeded_rng(1234);
        let mut b = seeded_rng(1234);
        let first = uniform(&mut a);
        assert!((0.0..1.0).contains(&first));
        assert_eq!(first, uniform(&mut b));
        assert_ne!(uniform(&mut seeded_rng(1)), uniform(&mut seeded_rng(2)));
    }
}
