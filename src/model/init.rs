//! The fresh initialisation training from scratch starts from, for every family: HF's llama
//! scheme over the names and shapes of [`parameter_shapes`].

use candle_core::{Device, Tensor};

use super::config::Config;
use super::decoder::parameter_shapes;

/// Fresh weights from a seed (candle's CPU RNG cannot be seeded): norms at 1, biases at 0,
/// everything else N(0, 0.02²), as HF initialises llama (any family: the names and shapes
/// are [`parameter_shapes`]'s).
pub fn random_weights(
    cfg: &Config,
    seed: u64,
    device: &Device,
) -> candle_core::Result<std::collections::HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    parameter_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else if name.ends_with(".bias") {
                vec![0.0; n]
            } else {
                (0..n)
                    .map(|_| {
                        // Box–Muller.
                        let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                        let u2: f32 = rng.random();
                        0.02 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
                    })
                    .collect()
            };
            Ok((name, Tensor::from_vec(data, shape, device)?))
        })
        .collect()
}
