//! Dynamic batching: prompts waiting together are prefilled in one forward pass, so the weights
//! are read once for all of them. On the fused CPU path (short prompts, GGUF on CPU) their
//! tokens are simply concatenated; otherwise sequences are right-padded for candle's dense
//! GEMM: under the causal mask a real token never attends to the padding after it, so each row
//! gets its own sequence's logits.

use candle_core::Tensor;

use super::generate::EngineError;
use crate::model::Prefilled;
use crate::model::{Cache, LoadedModel};

/// Most jobs prefilled together.
pub const MAX_BATCH: usize = 16;
/// Longer prompts are prefilled alone (in chunks), so a batch stays small in memory and time.
pub const MAX_BATCHED_PROMPT: usize = 256;

/// Prefills `prompts` (each non-empty) together; returns each one's KV cache and the logits of
/// its last position.
pub fn prefill_batch(
    model: &LoadedModel,
    prompts: &[&[u32]],
) -> Result<Vec<(Cache, Vec<f32>)>, EngineError> {
    let lm = &model.model;
    let b = prompts.len();
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if b == 0 || t == 0 || prompts.iter().any(|p| p.is_empty()) {
        return Err(EngineError::EmptyPrompt);
    }
    // Short prompts on the fused CPU path (no padding, packed weights, bit-identical to
    // unbatched); the others, if any, padded through candle's path.
    let (short, long): (Vec<usize>, Vec<usize>) =
        (0..b).partition(|&i| lm.fused_accepts(prompts[i].len()));
    if short.is_empty() {
        return prefill_padded(model, prompts);
    }
    let pick = |set: &[usize]| set.iter().map(|&i| prompts[i]).collect::<Vec<_>>();
    let mut states: Vec<(usize, Prefilled)> = short
        .iter()
        .copied()
        .zip(lm.prefill_fused(&pick(&short))?)
        .collect();
    if !long.is_empty() {
        states.extend(
            long.iter()
                .copied()
                .zip(prefill_padded(model, &pick(&long))?),
        );
    }
    states.sort_by_key(|(i, _)| *i);
    Ok(states.into_iter().map(|(_, state)| state).collect())
}

/// Right-padded prefill through candle's ops (one dense GEMM per projection for the batch).
fn prefill_padded(
    model: &LoadedModel,
    prompts: &[&[u32]],
) -> Result<Vec<(Cache, Vec<f32>)>, EngineError> {
    let lm = &model.model;
    let b = prompts.len();
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    for p in prompts {
        ids.extend_from_slice(p);
        // Any valid id works as padding: nothing real attends to it.
        ids.extend(std::iter::repeat_n(p[0], t - p.len()));
    }
    let input = Tensor::from_vec(ids, (b, t), lm.device())?;
    let last: Vec<usize> = prompts.iter().map(|p| p.len() - 1).collect();
    let mut cache = lm.new_cache();
    let logits = lm.forward_rows(&input, &mut cache, &last)?;
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let row: Vec<f32> = logits.get(i)?.to_vec1()?;
            Ok((cache.row(i, p.len())?, row))
        })
        .collect()
}
