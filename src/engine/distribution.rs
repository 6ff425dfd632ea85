//! Distribution maths over one position's logits, in f32: log-softmax (with temperature),
//! top-k with 1-based ranks (ties broken by token id), entropy, full-vocabulary rank, sampling.

use rand::Rng;

/// The log-probabilities of one position over the whole vocabulary.
#[derive(Debug, Clone)]
pub struct Distribution {
    logprobs: Vec<f32>,
}

impl Distribution {
    /// log_softmax(logits / temperature). `temperature` must be > 0 (1.0 = the model's own).
    pub fn from_logits(logits: &[f32], temperature: f32) -> Self {
        let scaled: Vec<f32> = if temperature == 1.0 {
            logits.to_vec()
        } else {
            logits.iter().map(|&x| x / temperature).collect()
        };
        Self {
            logprobs: log_softmax(&scaled),
        }
    }

    pub fn len(&self) -> usize {
        self.logprobs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.logprobs.is_empty()
    }
    pub fn logprobs(&self) -> &[f32] {
        &self.logprobs
    }
    pub fn logprob(&self, id: u32) -> f32 {
        self.logprobs
            .get(id as usize)
            .copied()
            .unwrap_or(f32::NEG_INFINITY)
    }

    /// The `k` most likely tokens, best first; equal log-probs rank by lower token id.
    /// Partial selection, then a sort of the k survivors only.
    pub fn top_k(&self, k: usize) -> Vec<(u32, f32)> {
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
            .map(|&l| {
                let l = l as f64;
                l.exp() * l
            })
            .sum::<f64>()
    }

    /// Draws a token id with probability exp(logprob), by inverse CDF in token-id order.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        let u: f64 = rng.random::<f64>();
        let mut acc = 0.0f64;
        let mut last_possible = None;
        for (i, &l) in self.logprobs.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            acc += (l as f64).exp();
            last_possible = Some(i as u32);
            if u < acc {
                return i as u32;
            }
        }
        // Rounding can leave the total a hair under 1.
        last_possible.unwrap_or_else(|| self.argmax())
    }
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
        let d = Distribution::from_logits(&[0.5, 2.0, 2.0, 1.0, 2.0], 1.0);
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
        let cold = Distribution::from_logits(&logits, 0.5);
        let hot = Distribution::from_logits(&logits, 2.0);
        assert!(cold.logprob(0) > hot.logprob(0));
        assert!(cold.entropy() < hot.entropy());
        let expected = log_softmax(&[6.0, 2.0, 0.0]);
        assert_eq!(cold.logprobs(), expected.as_slice());
    }

    #[test]
    fn entropy_of_uniform_is_ln_n() {
        let d = Distribution::from_logits(&[0.0; 8], 1.0);
        assert!((d.entropy() - (8f64).ln()).abs() < 1e-6);
    }

    #[test]
    fn top_k_larger_than_vocab_is_clamped() {
        let d = Distribution::from_logits(&[0.0, 1.0], 1.0);
        assert_eq!(d.top_k(50).len(), 2);
    }
}
