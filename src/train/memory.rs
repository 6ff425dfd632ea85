//! What a training run will hold in memory at its peak, estimated before it starts, so that a
//! job that cannot fit is refused instead of letting the kernel's OOM killer end the whole
//! server (inference included).
//!
//! The terms, all f32: the weights, their gradients and AdamW's two moments (four copies of
//! the parameters); the activations the backward pass keeps, per token and layer — the
//! residual stream and its norms, q, k, v, the attention output and projection (about ten
//! hidden-size vectors), the MLP's gate, up, activation and product (about five of its
//! width) and the attention probabilities with their softmax (two per head and key
//! position); and the logits with their log-softmax and gradient (three vocabulary-size
//! vectors per token). Generous on purpose: it bounds, it does not predict.

use serde::Serialize;

pub use crate::model::probe::ModelShape;

/// The estimate, term by term (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct JobMemory {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub logits: u64,
}

impl JobMemory {
    pub fn total(&self) -> u64 {
        self.weights
            .saturating_add(self.gradients)
            .saturating_add(self.optimizer)
            .saturating_add(self.activations)
            .saturating_add(self.logits)
    }

    /// "3.2 GiB (weights 0.5, gradients 0.5, …)" for messages.
    pub fn describe(&self) -> String {
        let g = |b: u64| b as f64 / (1u64 << 30) as f64;
        format!(
            "{:.2} GiB (weights {:.2}, gradients {:.2}, optimizer {:.2}, activations {:.2}, logits {:.2})",
            g(self.total()),
            g(self.weights),
            g(self.gradients),
            g(self.optimizer),
            g(self.activations),
            g(self.logits)
        )
    }
}

/// The peak of a full fine-tune of `params` parameters shaped `shape`, on batches of `batch`
/// windows of `seq` tokens.
pub fn estimate(params: u64, shape: &ModelShape, batch: u64, seq: u64) -> JobMemory {
    const F32: u64 = 4;
    let tokens = batch.saturating_mul(seq);
    let per_token_layer = (10 * shape.hidden)
        .saturating_add(5 * shape.ffn)
        .saturating_add((2 * shape.heads).saturating_mul(seq));
    let weights = params.saturating_mul(F32);
    JobMemory {
        weights,
        gradients: weights,
        optimizer: weights.saturating_mul(2),
        activations: tokens
            .saturating_mul(shape.layers)
            .saturating_mul(per_token_layer)
            .saturating_mul(F32),
        logits: tokens.saturating_mul(shape.vocab).saturating_mul(3 * F32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M's sizes: a batch of 256 windows of 1024 tokens (the schema's bounds allow
    /// it) needs far more than any machine this runs on; the tests' small jobs need little.
    #[test]
    fn the_terms_scale_as_they_should() {
        let smol = ModelShape {
            layers: 30,
            hidden: 576,
            ffn: 1536,
            heads: 9,
            vocab: 49152,
        };
        let small = estimate(134_515_008, &smol, 4, 128);
        assert_eq!(small.weights, 134_515_008 * 4);
        assert_eq!(small.optimizer, 2 * small.weights);
        assert_eq!(small.logits, 4 * 128 * 49152 * 12);
        let huge = estimate(134_515_008, &smol, 256, 1024);
        assert!(huge.total() > 1 << 40, "{}", huge.describe());
        assert!(small.total() < 8 << 30, "{}", small.describe());
        // Doubling the batch doubles activations and logits, nothing else.
        let double = estimate(134_515_008, &smol, 8, 128);
        assert_eq!(double.activations, 2 * small.activations);
        assert_eq!(double.logits, 2 * small.logits);
        assert_eq!(double.weights, small.weights);
    }
}
