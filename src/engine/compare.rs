//! Two models on the same text: at every scored position, both full-vocabulary distributions
//! (log-softmax in f64 of the f32 logits, as everywhere), the KL divergence both ways, the
//! actual token's log-prob under each and their difference, both top-1s and whether they
//! agree, both top-k; and the summary `llama-perplexity --kl-divergence` prints (mean, median,
//! p99 and max KL, top-1 agreement, each perplexity, RMS Δp), so its users can check one
//! against the other.
//!
//! Each model's thread streams its logits a chunk of positions at a time ([`stream_logits`],
//! run by the worker) into a bounded channel; [`Comparer`] consumes both streams in lockstep,
//! so memory stays at a few chunks whatever the text's length and the two forward passes run
//! in parallel on their own threads.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::distribution::Distribution;
use super::generate::{candidate, EngineError};
use super::output::TokenProbability;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::model::{LoadedModel, TextTokenizer};

/// Where a compare job's logits go, a chunk of positions at a time (flat: rows × vocabulary);
/// bounded, so that a reader that falls behind holds the model thread back instead of
/// letting memory grow. An `Err` says why the stream stopped.
pub type LogitRows = std::sync::mpsc::SyncSender<Result<Vec<f32>, String>>;

/// The reading end of [`LogitRows`].
pub type LogitStream = std::sync::mpsc::Receiver<Result<Vec<f32>, String>>;

/// Streams the logits of every position from `first_row` on (row `i` predicts `ids[i + 1]`;
/// the last token predicts nothing here and is not run), a chunk of rows at a time, flat
/// (rows × vocabulary). `send` returns false when nobody reads any more: the run stops.
pub fn stream_logits(
    model: &LoadedModel,
    ids: &[u32],
    first_row: usize,
    send: &mut dyn FnMut(Vec<f32>) -> bool,
) -> Result<(), EngineError> {
    if ids.len() < 2 {
        return Err(EngineError::EmptyPrompt);
    }
    let lm = &model.model;
    let run = &ids[..ids.len() - 1];
    let chunk = super::scoring::logit_chunk(lm.config().vocab_size);
    let mut cache = lm.new_cache();
    for (c, part) in run.chunks(chunk).enumerate() {
        let input = candle_core::Tensor::new(part, lm.device())?.unsqueeze(0)?;
        let logits = lm.forward_all(&input, &mut cache)?.squeeze(0)?;
        let start = c * chunk;
        if start + part.len() <= first_row {
            continue;
        }
        let skip = first_row.saturating_sub(start);
        let rows = logits.narrow(0, skip, part.len() - skip)?;
        let flat: Vec<f32> = rows.flatten_all()?.to_vec1()?;
        if !send(flat) {
            return Err(EngineError::Cancelled);
        }
    }
    Ok(())
}

/// The ids a compare scores and the first row it reports: `text` alone (every token after the
/// first), or `text` as a prompt followed by `continuation` (tokenized apart, without special
/// tokens, as targets are), whose tokens alone are scored.
pub fn tokenize(
    tokenizer: &TextTokenizer,
    text: &str,
    continuation: Option<&str>,
) -> crate::model::Result<(Vec<u32>, usize)> {
    let mut ids = tokenizer.encode(text)?;
    let first_row = match continuation {
        None => 0,
        Some(c) => {
            let prompt = ids.len();
            ids.extend(tokenizer.encode_without_special(c)?);
            prompt.saturating_sub(1)
        }
    };
    Ok((ids, first_row))
}

/// Compares row after row from each stream (their chunks may differ in size; `b` None: the
/// same stream serves both sides), stopping when `cancel` is set.
#[allow(clippy::too_many_arguments)]
pub fn compare_streams(
    tokenizer: &TextTokenizer,
    ids: &[u32],
    first_row: usize,
    top_k: usize,
    vocab: usize,
    a: LogitStream,
    b: Option<LogitStream>,
    cancel: &AtomicBool,
) -> Result<(Vec<ComparePosition>, CompareSummary), String> {
    let rows = ids.len().saturating_sub(1).saturating_sub(first_row);
    struct Side {
        stream: LogitStream,
        chunk: Vec<f32>,
        at: usize,
    }
    impl Side {
        /// The next row, receiving the next chunk when this one is used up.
        fn row(&mut self, vocab: usize) -> Result<&[f32], String> {
            if self.at * vocab >= self.chunk.len() {
                self.chunk = self
                    .stream
                    .recv()
                    .map_err(|_| "the model thread stopped".to_string())??;
                self.at = 0;
                if self.chunk.is_empty() || !self.chunk.len().is_multiple_of(vocab) {
                    return Err("a chunk of logits has the wrong size".into());
                }
            }
            let row = &self.chunk[self.at * vocab..(self.at + 1) * vocab];
            self.at += 1;
            Ok(row)
        }
    }
    let side = |stream| Side {
        stream,
        chunk: Vec::new(),
        at: 0,
    };
    let mut sa = side(a);
    let mut sb = b.map(side);
    let mut comparer = Comparer::new(tokenizer, ids, first_row, top_k);
    for _ in 0..rows {
        if cancel.load(Ordering::SeqCst) {
            return Err("cancelled: the client went away".into());
        }
        let row_a = sa.row(vocab)?;
        match sb.as_mut() {
            Some(sb) => {
                let row_b = sb.row(vocab)?;
                comparer.add(row_a, row_b)
            }
            None => comparer.add(row_a, row_a),
        }
        .map_err(|e| e.to_string())?;
    }
    Ok(comparer.finish())
}

/// Both models in this process (`tokenscope inspect --compare`): each streams its logits
/// from a thread of its own, as the server's workers do.
pub fn compare_models(
    a: &LoadedModel,
    b: &LoadedModel,
    ids: &[u32],
    first_row: usize,
    top_k: usize,
) -> Result<(Vec<ComparePosition>, CompareSummary), String> {
    if let Some(diff) = a.tokenizer.difference(&b.tokenizer) {
        return Err(format!("the models do not share a tokenizer ({diff})"));
    }
    let vocab = a.model.config().vocab_size;
    if vocab != b.model.config().vocab_size {
        return Err("the models' vocabularies differ in size".into());
    }
    if ids.len() < 2 {
        return Ok(Comparer::new(&a.tokenizer, ids, first_row, top_k).finish());
    }
    let stream = |m: &LoadedModel, tx: LogitRows| {
        let run = stream_logits(m, ids, first_row, &mut |rows| tx.send(Ok(rows)).is_ok());
        if let Err(e) = run {
            let _ = tx.send(Err(e.to_string()));
        }
    };
    std::thread::scope(|scope| {
        let (tx_a, rx_a) = std::sync::mpsc::sync_channel(2);
        let (tx_b, rx_b) = std::sync::mpsc::sync_channel(2);
        scope.spawn(move || stream(a, tx_a));
        scope.spawn(move || stream(b, tx_b));
        let cancel = AtomicBool::new(false);
        compare_streams(
            &a.tokenizer,
            ids,
            first_row,
            top_k,
            vocab,
            rx_a,
            Some(rx_b),
            &cancel,
        )
    })
}

/// One scored position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ComparePosition {
    /// Index of the scored token in the text's tokens (the first token is never scored:
    /// nothing predicts it).
    pub position: usize,
    pub token: String,
    pub token_id: u32,
    pub bytes: Vec<u8>,
    /// Its log-probability under A and under B.
    pub logprob_a: f64,
    pub logprob_b: f64,
    /// `logprob_b − logprob_a`.
    pub delta_logprob: f64,
    /// KL(A‖B) = Σ p_A (log p_A − log p_B) over the whole vocabulary (nats, ≥ 0).
    #[schema(minimum = 0.0)]
    pub kl_ab: f64,
    /// KL(B‖A).
    #[schema(minimum = 0.0)]
    pub kl_ba: f64,
    /// Whether the two models' most likely tokens are the same.
    pub top1_agree: bool,
    /// A's top-k (the first is its top-1).
    pub top_a: Vec<TokenProbability>,
    pub top_b: Vec<TokenProbability>,
}

/// The whole text's figures, as `llama-perplexity --kl-divergence` reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CompareSummary {
    /// Scored positions.
    pub positions: usize,
    #[schema(minimum = 0.0)]
    pub kl_mean: f64,
    /// The median of KL(A‖B) (linear interpolation between the two middle values).
    #[schema(minimum = 0.0)]
    pub kl_median: f64,
    /// The 99th percentile of KL(A‖B) (linear interpolation, numpy's default).
    #[schema(minimum = 0.0)]
    pub kl_p99: f64,
    #[schema(minimum = 0.0)]
    pub kl_max: f64,
    /// Where the largest KL(A‖B) is (a token position).
    pub kl_max_position: usize,
    /// Mean of KL(B‖A).
    #[schema(minimum = 0.0)]
    pub kl_ba_mean: f64,
    /// Positions where both top-1s agree, in percent.
    #[schema(minimum = 0.0, maximum = 100.0)]
    pub top1_agreement_percent: f64,
    /// exp(−mean log-prob of the scored tokens) under each model.
    pub perplexity_a: f64,
    pub perplexity_b: f64,
    /// √(mean (p_B − p_A)²) of the actual token's probability, in percent (llama.cpp's
    /// "RMS Δp").
    #[schema(minimum = 0.0)]
    pub rms_delta_p_percent: f64,
}

/// Accumulates positions as both models' rows arrive.
pub struct Comparer<'a> {
    tokenizer: &'a TextTokenizer,
    ids: &'a [u32],
    top_k: usize,
    next: usize,
    positions: Vec<ComparePosition>,
}

impl<'a> Comparer<'a> {
    /// Compares from row `first_row` on (row `i` scores `ids[i + 1]`).
    pub fn new(
        tokenizer: &'a TextTokenizer,
        ids: &'a [u32],
        first_row: usize,
        top_k: usize,
    ) -> Self {
        Self {
            tokenizer,
            ids,
            top_k,
            next: first_row,
            positions: Vec::new(),
        }
    }

    /// One row of each model's logits (the same position).
    pub fn add(&mut self, logits_a: &[f32], logits_b: &[f32]) -> Result<(), EngineError> {
        let a = Distribution::from_logits(logits_a, 1.0)?;
        let b = Distribution::from_logits(logits_b, 1.0)?;
        let position = self.next + 1;
        let id = self.ids[position];
        let (kl_ab, kl_ba) = kl_both(a.logprobs(), b.logprobs());
        let top = |d: &Distribution| -> Vec<TokenProbability> {
            d.top_k(self.top_k.max(1))
                .into_iter()
                .enumerate()
                .map(|(i, (t, lp))| candidate(self.tokenizer, t, lp, i + 1))
                .collect()
        };
        let top_a = top(&a);
        let top_b = top(&b);
        let (la, lb) = (a.logprob(id), b.logprob(id));
        self.positions.push(ComparePosition {
            position,
            token: self.tokenizer.token_text(id).to_string(),
            token_id: id,
            bytes: self.tokenizer.token_bytes(id).to_vec(),
            logprob_a: la,
            logprob_b: lb,
            delta_logprob: lb - la,
            kl_ab,
            kl_ba,
            top1_agree: a.argmax() == b.argmax(),
            top_a: top_a.into_iter().take(self.top_k).collect(),
            top_b: top_b.into_iter().take(self.top_k).collect(),
        });
        self.next += 1;
        Ok(())
    }

    /// The positions and their summary.
    pub fn finish(self) -> (Vec<ComparePosition>, CompareSummary) {
        let summary = summarize(&self.positions);
        (self.positions, summary)
    }
}

/// KL(A‖B) and KL(B‖A) from two log-prob vectors. A term whose probability underflows to 0
/// contributes 0 (its limit), so the sums stay finite; both are clamped at 0 against rounding.
fn kl_both(a: &[f64], b: &[f64]) -> (f64, f64) {
    let mut ab = 0.0f64;
    let mut ba = 0.0f64;
    for (&la, &lb) in a.iter().zip(b) {
        let (pa, pb) = (la.exp(), lb.exp());
        if pa > 0.0 {
            ab += pa * (la - lb);
        }
        if pb > 0.0 {
            ba += pb * (lb - la);
        }
    }
    (ab.max(0.0), ba.max(0.0))
}

/// numpy's default percentile: linear interpolation between the closest ranks of the sorted
/// values, at `q` in [0, 1].
fn percentile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        n => {
            let at = q * (n - 1) as f64;
            let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
        }
    }
}

fn summarize(positions: &[ComparePosition]) -> CompareSummary {
    let n = positions.len();
    let mean = |f: &dyn Fn(&ComparePosition) -> f64| {
        if n == 0 {
            0.0
        } else {
            positions.iter().map(f).sum::<f64>() / n as f64
        }
    };
    let mut kl: Vec<f64> = positions.iter().map(|p| p.kl_ab).collect();
    kl.sort_by(f64::total_cmp);
    // The first of the largest (numpy's argmax), so an all-zero text names its first token.
    let (kl_max_position, kl_max) = positions
        .iter()
        .fold(None, |best: Option<(usize, f64)>, p| match best {
            Some(b) if b.1 >= p.kl_ab => Some(b),
            _ => Some((p.position, p.kl_ab)),
        })
        .unwrap_or((0, 0.0));
    let agree = positions.iter().filter(|p| p.top1_agree).count();
    CompareSummary {
        positions: n,
        kl_mean: mean(&|p| p.kl_ab),
        kl_median: percentile(&kl, 0.5),
        kl_p99: percentile(&kl, 0.99),
        kl_max,
        kl_max_position,
        kl_ba_mean: mean(&|p| p.kl_ba),
        top1_agreement_percent: if n == 0 {
            0.0
        } else {
            100.0 * agree as f64 / n as f64
        },
        perplexity_a: mean(&|p| -p.logprob_a).exp(),
        perplexity_b: mean(&|p| -p.logprob_b).exp(),
        rms_delta_p_percent: 100.0
            * mean(&|p| (p.logprob_b.exp() - p.logprob_a.exp()).powi(2)).sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_distributions_and_positive_otherwise() {
        let a = Distribution::from_logits(&[1.0, 2.0, 3.0, -1.0], 1.0).unwrap();
        let b = Distribution::from_logits(&[3.0, 2.0, 1.0, 0.0], 1.0).unwrap();
        assert_eq!(kl_both(a.logprobs(), a.logprobs()), (0.0, 0.0));
        let (ab, ba) = kl_both(a.logprobs(), b.logprobs());
        assert!(ab > 0.0 && ba > 0.0 && ab != ba);
    }

    #[test]
    fn percentiles_interpolate_as_numpy_does() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 0.5), 2.5);
        assert!((percentile(&v, 0.99) - 3.97).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }
}
