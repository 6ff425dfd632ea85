//! Scoring: how likely the model finds text it did not generate. Every prompt position's
//! distribution (prompt log-probs, echo), and named continuations ("targets") teacher-forced
//! after the prompt on a copy of its KV cache, so the prompt is computed once for all of them.
//! Always the model's own distribution (T = 1): these are measurements, not sampling.

use candle_core::Tensor;

use super::distribution::Distribution;
use super::generate::{token_probability, EngineError};
use super::output::{PromptToken, TargetScore};
use crate::model::{Cache, LoadedModel};

/// A continuation to score after the prompt: its text and its tokens (tokenized on its own,
/// without special tokens, before the job was queued).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub text: String,
    pub ids: Vec<u32>,
}

impl Target {
    /// Targets from their texts, to be tokenized before the job is queued.
    pub fn named(texts: &[String]) -> Vec<Self> {
        texts
            .iter()
            .map(|text| Self {
                text: text.clone(),
                ids: Vec::new(),
            })
            .collect()
    }
}

/// Most logits held at once while scoring (rows × vocabulary): 8 Mi f32 = 32 MiB, so a chunk
/// is ~170 positions for a 49k vocabulary and 32 for Gemma's 262k.
const MAX_LOGIT_VALUES: usize = 8 << 20;

/// Positions computed at once when every position's logits are kept (bounded by
/// [`MAX_LOGIT_VALUES`]).
pub(crate) fn logit_chunk(vocab: usize) -> usize {
    (MAX_LOGIT_VALUES / vocab.max(1)).clamp(1, super::generate::PREFILL_CHUNK)
}

/// The prompt scored: one entry per token, the KV cache of the whole prompt and the logits of
/// its last position (which predict the first new token).
pub struct ScoredPrompt {
    pub tokens: Vec<PromptToken>,
    pub cache: Cache,
    pub last_logits: Vec<f32>,
}

impl ScoredPrompt {
    /// exp(−mean log-prob) over the tokens after the first; None for a one-token prompt.
    pub fn perplexity(&self) -> Option<f64> {
        let lps: Vec<f64> = self.tokens.iter().filter_map(|t| t.logprob).collect();
        (!lps.is_empty()).then(|| (-lps.iter().sum::<f64>() / lps.len() as f64).exp())
    }
}

/// Runs the whole prompt, keeping every position's logits long enough to score the token that
/// follows it (with its `top_k` alternatives). Positions are processed in chunks so that memory
/// stays bounded, and `cancelled` is polled between chunks.
pub fn score_prompt(
    model: &LoadedModel,
    ids: &[u32],
    top_k: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<ScoredPrompt, EngineError> {
    let Some(&first) = ids.first() else {
        return Err(EngineError::EmptyPrompt);
    };
    let lm = &model.model;
    let chunk = logit_chunk(lm.config().vocab_size);
    let mut cache = lm.new_cache();
    let mut tokens = vec![PromptToken {
        token: model.tokenizer.token_text(first).to_string(),
        token_id: first,
        bytes: model.tokenizer.token_bytes(first).to_vec(),
        logprob: None,
        rank: None,
        entropy: None,
        top: Vec::new(),
    }];
    let mut last_logits = Vec::new();
    for (c, part) in ids.chunks(chunk).enumerate() {
        if cancelled() {
            return Err(EngineError::Cancelled);
        }
        let input = Tensor::new(part, lm.device())?.unsqueeze(0)?;
        let logits = lm.forward_all(&input, &mut cache)?.squeeze(0)?;
        for row in 0..part.len() {
            let values: Vec<f32> = logits.get(row)?.to_vec1()?;
            // Row `row` of chunk `c` predicts the token at position c·chunk + row + 1.
            match ids.get(c * chunk + row + 1) {
                Some(&next) => {
                    let dist = Distribution::from_logits(&values, 1.0)?;
                    tokens.push(prompt_token(model, &dist, next, top_k));
                }
                None => last_logits = values,
            }
        }
    }
    Ok(ScoredPrompt {
        tokens,
        cache,
        last_logits,
    })
}

fn prompt_token(model: &LoadedModel, dist: &Distribution, id: u32, top_k: usize) -> PromptToken {
    let logprob = dist.logprob(id);
    PromptToken {
        token: model.tokenizer.token_text(id).to_string(),
        token_id: id,
        bytes: model.tokenizer.token_bytes(id).to_vec(),
        logprob: Some(logprob),
        rank: Some(dist.rank(id)),
        entropy: Some(dist.entropy()),
        top: dist
            .top_k(top_k)
            .into_iter()
            .enumerate()
            .map(|(i, (t, lp))| token_probability(model, t, lp, i + 1))
            .collect(),
    }
}

/// Scores each target after the prompt: its first token from `next` (the prompt's last
/// position's distribution, T = 1), the rest in one pass over the target on a copy of the
/// prompt's KV cache (copy-on-write: the prompt is not recomputed).
pub fn score_targets(
    model: &LoadedModel,
    cache: &Cache,
    next: &Distribution,
    targets: &[Target],
) -> Result<Vec<TargetScore>, EngineError> {
    let lm = &model.model;
    targets
        .iter()
        .map(|target| {
            let Some(&first) = target.ids.first() else {
                return Err(EngineError::EmptyPrompt);
            };
            let mut logprob = next.logprob(first);
            let teacher = &target.ids[..target.ids.len() - 1];
            if !teacher.is_empty() {
                let mut cache = cache.clone();
                let input = Tensor::new(teacher, lm.device())?.unsqueeze(0)?;
                let logits = lm.forward_all(&input, &mut cache)?.squeeze(0)?;
                for (row, &id) in target.ids[1..].iter().enumerate() {
                    let values: Vec<f32> = logits.get(row)?.to_vec1()?;
                    logprob += Distribution::from_logits(&values, 1.0)?.logprob(id);
                }
            }
            Ok(TargetScore {
                text: target.text.clone(),
                token_ids: target.ids.clone(),
                tokens: target
                    .ids
                    .iter()
                    .map(|&id| model.tokenizer.token_text(id).to_string())
                    .collect(),
                logprob,
                probability: logprob.exp(),
                rank: next.rank(first),
            })
        })
        .collect()
}
