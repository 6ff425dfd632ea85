//! The logit lens: the next-token distribution read off the residual stream after every
//! layer, through the model's own final norm and head (nostalgebraist's logit lens, as ecco
//! and TransformerLens compute it), in the same forward pass that gives the model's answer.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::distribution::Distribution;
use super::generate::{run_all_but_last_chunk, token_probability, EngineError};
use super::output::TokenProbability;
use super::scoring::Target;
use crate::model::{Cache, LoadedModel};

/// The distribution one layer's residual stream gives at the last prompt position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LensLayer {
    /// 1 = after the first decoder layer; the last entry (the number of layers) is the
    /// model's own output distribution.
    #[schema(minimum = 1)]
    pub layer: usize,
    /// Top-k tokens of this layer's distribution (T = 1), ranked 1..k.
    pub top: Vec<TokenProbability>,
    /// Shannon entropy of this layer's distribution, in nats.
    #[schema(minimum = 0.0)]
    pub entropy: f64,
    /// The requested targets' first tokens in this layer's distribution, in request order.
    pub targets: Vec<LensTarget>,
}

/// A target's first token as one layer sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LensTarget {
    /// The target as sent.
    pub text: String,
    /// Its first token (tokenized on its own, without special tokens).
    pub token_id: u32,
    pub token: String,
    pub logprob: f64,
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub probability: f64,
    /// Full-vocabulary rank in this layer's distribution.
    #[schema(minimum = 1)]
    pub rank: usize,
}

/// A prefilled prompt read through the lens: its KV cache, the model's logits at the last
/// position, and the residual stream there after each layer.
pub type LensPrefill = (Cache, Vec<f32>, Vec<Vec<f32>>);

/// Runs the prompt as a plain prefill does (same chunks, same kernels: the last layer's
/// logits are the ones /generate uses) and keeps the residual stream at the last position
/// after each layer. Returns the cache, the model's logits and those residuals.
pub fn prefill_with_layers(
    model: &LoadedModel,
    prompt_ids: &[u32],
    cancelled: &dyn Fn() -> bool,
) -> Result<LensPrefill, EngineError> {
    if prompt_ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let lm = &model.model;
    let mut cache = lm.new_cache();
    let last_chunk = run_all_but_last_chunk(model, prompt_ids, &mut cache, cancelled)?;
    let (logits, layers) = lm.next_logits_with_layers(last_chunk, &mut cache)?;
    Ok((cache, logits, layers))
}

/// One entry per layer: the final norm and head applied to each layer's residual stream;
/// the last layer's entry is the model's output (`logits`) itself.
pub fn layers(
    model: &LoadedModel,
    logits: &[f32],
    residuals: &[Vec<f32>],
    top_k: usize,
    targets: &[Target],
) -> Result<Vec<LensLayer>, EngineError> {
    let inner = residuals.len().saturating_sub(1);
    let mut all = model.model.lens_logits(&residuals[..inner])?;
    all.push(logits.to_vec());
    all.iter()
        .enumerate()
        .map(|(i, l)| {
            let dist = Distribution::from_logits(l, 1.0)?;
            let top = dist
                .top_k(top_k)
                .into_iter()
                .enumerate()
                .map(|(r, (id, lp))| token_probability(model, id, lp, r + 1))
                .collect();
            let targets = targets
                .iter()
                .filter_map(|t| t.ids.first().map(|&id| (t, id)))
                .map(|(t, id)| {
                    let logprob = dist.logprob(id);
                    LensTarget {
                        text: t.text.clone(),
                        token_id: id,
                        token: model.tokenizer.token_text(id).to_string(),
                        logprob,
                        probability: logprob.exp(),
                        rank: dist.rank(id),
                    }
                })
                .collect();
            Ok(LensLayer {
                layer: i + 1,
                top,
                entropy: dist.entropy(),
                targets,
            })
        })
        .collect()
}
