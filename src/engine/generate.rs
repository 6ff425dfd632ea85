//! The generation loop: prompt → forward → distribution → pick → repeat, with a KV cache.

use std::time::Instant;

use candle_core::Tensor;

use super::detokenize::IncrementalText;
use super::distribution::{self, Distribution, NonFiniteLogits, MIN_TEMPERATURE};
use super::lens;
use super::output::{
    Decoding, FinishReason, GenerateResponse, LogprobsMode, Metadata, PromptToken, Step,
    TokenProbability,
};
use super::prefix_cache::{PrefixCache, Reuse};
use super::scoring::{self, Target};
use crate::model::LoadedModel;

/// Validated generation parameters (the API checks ranges before they get here).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateParams {
    /// Below [`MIN_TEMPERATURE`] (0 included) = greedy. Kept in f64 so that
    /// `temperature_used` echoes the request exactly.
    pub temperature: f64,
    pub max_tokens: usize,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub logprobs_mode: LogprobsMode,
    /// Nucleus sampling: draw from the smallest set of most likely tokens whose probability
    /// reaches `top_p` (1 = the whole distribution). Reported distributions are not truncated.
    pub top_p: f64,
    /// Score every prompt token (the response's `prompt`, and `metadata.prompt_perplexity`).
    pub prompt_logprobs: bool,
    /// Continuations to score after the prompt (the response's `targets`).
    pub targets: Vec<Target>,
    /// Shorten `max_tokens` to what the context leaves after the prompt instead of refusing
    /// (the OpenAI routes; `usize::MAX` then means "to the end of the context").
    pub fit_context: bool,
    /// Also read the logit lens at the last prompt position (the response's `lens`); the
    /// targets are then looked up in every layer's distribution instead of being scored.
    pub lens: bool,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            max_tokens: 1,
            top_k: 5,
            seed: None,
            stop: Vec::new(),
            logprobs_mode: LogprobsMode::Processed,
            top_p: 1.0,
            prompt_logprobs: false,
            targets: Vec::new(),
            fit_context: false,
            lens: false,
        }
    }
}

/// What a running job reports as it goes (streaming responses forward these).
pub enum Event<'a> {
    /// The prompt's tokens, scored (only with `prompt_logprobs`), before any new token.
    Prompt(&'a [PromptToken]),
    /// A new token, and the whole generated text so far (a matched stop string cut off).
    Step { step: &'a Step, text: &'a str },
}

/// An observer that ignores everything.
pub fn no_events(_: Event<'_>) {}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("prompt is empty after tokenization")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens plus {max_tokens} new tokens exceeds the limit of {limit}")]
    TooLong {
        prompt: usize,
        max_tokens: usize,
        limit: usize,
    },
    #[error("cancelled")]
    Cancelled,
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    NonFinite(#[from] NonFiniteLogits),
    #[error("inference: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Prompt tokens evaluated per forward pass during prefill.
pub const PREFILL_CHUNK: usize = 256;

/// Size of the final prefill chunk (1..=PREFILL_CHUNK), whose last position gives the logits.
fn tail_len(n: usize) -> usize {
    match n % PREFILL_CHUNK {
        0 => PREFILL_CHUNK.min(n),
        r => r,
    }
}

/// Tokenizes a prompt.
pub fn tokenize(model: &LoadedModel, prompt: &str) -> Result<Vec<u32>, EngineError> {
    model
        .tokenizer
        .encode(prompt)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))
}

/// Runs one request start to finish. `cancelled` is polled between steps so that a request
/// nobody waits for any more stops using the model.
pub fn generate(
    model: &LoadedModel,
    prompt: &str,
    prompt_ids: &[u32],
    params: &GenerateParams,
    cancelled: &dyn Fn() -> bool,
) -> Result<GenerateResponse, EngineError> {
    generate_cached(
        model,
        prompt,
        prompt_ids,
        params,
        cancelled,
        None,
        &mut no_events,
    )
}

/// [`generate`] with a prefix cache (the cached part of the prompt is not recomputed) and an
/// observer of the job's progress.
pub fn generate_cached(
    model: &LoadedModel,
    prompt: &str,
    prompt_ids: &[u32],
    params: &GenerateParams,
    cancelled: &dyn Fn() -> bool,
    prefix: Option<&mut PrefixCache>,
    observer: &mut dyn FnMut(Event<'_>),
) -> Result<GenerateResponse, EngineError> {
    let start = Instant::now();
    if prompt_ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let limit = model.context_length();
    let longest_target = params.targets.iter().map(|t| t.ids.len()).max();
    let new_tokens = params.max_tokens.max(longest_target.unwrap_or(0));
    if prompt_ids.len() + new_tokens > limit {
        return Err(EngineError::TooLong {
            prompt: prompt_ids.len(),
            max_tokens: new_tokens,
            limit,
        });
    }
    if params.lens {
        let (cache, logits, residuals) = lens::prefill_with_layers(model, prompt_ids, cancelled)?;
        let layers = lens::layers(model, &logits, &residuals, params.top_k, &params.targets)?;
        let mut resp = decode_from(
            model, prompt, prompt_ids, params, cancelled, cache, logits, start, observer,
        )?;
        resp.lens = Some(layers);
        return Ok(resp);
    }
    if !params.prompt_logprobs && params.targets.is_empty() {
        let (cache, logits) = prefill(model, prompt_ids, cancelled, prefix)?;
        return decode_from(
            model, prompt, prompt_ids, params, cancelled, cache, logits, start, observer,
        );
    }
    // Scoring the prompt needs every position's logits, which the prefix cache does not keep,
    // so a scored prompt is computed whole (and not cached: its last logits come from a
    // different kernel path than a plain prefill's, and cached answers must not depend on
    // which request came first).
    let (scored, cache, logits) = if params.prompt_logprobs {
        let scored = scoring::score_prompt(model, prompt_ids, params.top_k, cancelled)?;
        observer(Event::Prompt(&scored.tokens));
        let (cache, logits) = (scored.cache.clone(), scored.last_logits.clone());
        (Some(scored), cache, logits)
    } else {
        let (cache, logits) = prefill(model, prompt_ids, cancelled, prefix)?;
        (None, cache, logits)
    };
    let targets = match params.targets.is_empty() {
        true => None,
        false => {
            let next = Distribution::from_logits(&logits, 1.0)?;
            Some(scoring::score_targets(
                model,
                &cache,
                &next,
                &params.targets,
            )?)
        }
    };
    let mut resp = decode_from(
        model, prompt, prompt_ids, params, cancelled, cache, logits, start, observer,
    )?;
    if let Some(scored) = scored {
        resp.metadata.prompt_perplexity = scored.perplexity();
        resp.prompt = Some(scored.tokens);
    }
    resp.targets = targets;
    Ok(resp)
}

/// Runs the prompt (what the prefix cache does not already hold) and returns its KV cache and
/// the logits of its last position.
fn prefill(
    model: &LoadedModel,
    prompt_ids: &[u32],
    cancelled: &dyn Fn() -> bool,
    mut prefix: Option<&mut PrefixCache>,
) -> Result<(crate::model::Cache, Vec<f32>), EngineError> {
    let lm = &model.model;
    let (mut cache, done, cached_logits) = match prefix.as_deref_mut().map(|p| p.lookup(prompt_ids))
    {
        Some(Reuse::Exact(c, logits)) => (c, prompt_ids.len(), Some(logits)),
        Some(Reuse::Prefix(c, n)) => (c, n, None),
        _ => (lm.new_cache(), 0, None),
    };
    if let Some(logits) = cached_logits {
        return Ok((cache, logits));
    }
    let last_chunk = run_all_but_last_chunk(model, &prompt_ids[done..], &mut cache, cancelled)?;
    let logits = lm.next_logits(last_chunk, &mut cache)?;
    if let Some(p) = &mut prefix {
        p.insert(prompt_ids, &cache, &logits);
    }
    Ok((cache, logits))
}

/// Runs `ids` after `cache` except their last chunk, which it returns: the caller runs that
/// one for its logits. Long prompts are evaluated in chunks so that cancellation (timeout,
/// disconnect) is seen within one chunk's time, and attention memory stays bounded by
/// chunk × context.
pub(crate) fn run_all_but_last_chunk<'a>(
    model: &LoadedModel,
    ids: &'a [u32],
    cache: &mut crate::model::Cache,
    cancelled: &dyn Fn() -> bool,
) -> Result<&'a [u32], EngineError> {
    let lm = &model.model;
    let (head, last_chunk) = ids.split_at(ids.len() - tail_len(ids.len()));
    for chunk in head.chunks(PREFILL_CHUNK) {
        if cancelled() {
            return Err(EngineError::Cancelled);
        }
        lm.forward(&Tensor::new(chunk, lm.device())?.unsqueeze(0)?, cache)?;
    }
    Ok(last_chunk)
}

/// Everything after the prompt: picks tokens from `logits` (the last prompt position's) on,
/// extending `cache` (which holds the prompt), until EOS, a stop string or `max_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn decode_from(
    model: &LoadedModel,
    prompt: &str,
    prompt_ids: &[u32],
    params: &GenerateParams,
    cancelled: &dyn Fn() -> bool,
    mut cache: crate::model::Cache,
    logits: Vec<f32>,
    start: Instant,
    observer: &mut dyn FnMut(Event<'_>),
) -> Result<GenerateResponse, EngineError> {
    let lm = &model.model;
    let greedy = params.temperature < MIN_TEMPERATURE;
    let seed = match (greedy, params.seed) {
        (true, _) => None,
        (false, Some(s)) => Some(s),
        (false, None) => Some(rand::random::<u64>()),
    };
    let mut rng = distribution::seeded_rng(seed.unwrap_or(0));
    // The reported distribution: processed = what the sampler draws from (T = 1 if greedy).
    let report_t = match (params.logprobs_mode, greedy) {
        (LogprobsMode::Processed, false) => params.temperature,
        _ => 1.0,
    };
    let mut logits = logits;
    // The token picked last step, still to be fed to the model (none before the first step,
    // whose logits come from the prompt).
    let mut last: Option<u32> = None;
    let temperature = params.temperature;
    let mut steps: Vec<Step> = Vec::new();
    let mut finish = FinishReason::Length;
    let mut text = IncrementalText::new();
    // Stop strings are looked for in the text each step added, plus the longest stop's length
    // before it (a stop may straddle steps): linear in the generation, like the decoding.
    let stops: Vec<&str> = params
        .stop
        .iter()
        .map(String::as_str)
        .filter(|s| !s.is_empty())
        .collect();
    let longest_stop = stops.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut cut: Option<usize> = None;

    while steps.len() < params.max_tokens {
        if cancelled() {
            return Err(EngineError::Cancelled);
        }
        if let Some(token) = last {
            logits = lm.next_logits(&[token], &mut cache)?;
        }
        let reported = Distribution::from_logits(&logits, report_t)?;
        let next = if greedy {
            reported.argmax()
        } else if report_t == temperature {
            reported.sample_top_p(params.top_p, &mut rng)
        } else {
            Distribution::from_logits(&logits, temperature)?.sample_top_p(params.top_p, &mut rng)
        };
        steps.push(make_step(model, &reported, next, params.top_k));

        let searched = text.text().len();
        let now = text
            .push(&model.tokenizer, next)
            .map_err(EngineError::Tokenizer)?;
        if model.eos_ids.contains(&next) {
            finish = FinishReason::Eos;
        } else if !stops.is_empty() && now.len() > searched {
            cut = first_stop(now, &stops, searched.saturating_sub(longest_stop));
            if cut.is_some() {
                finish = FinishReason::Stop;
            }
        }
        if let Some(step) = steps.last() {
            let shown = &now[..cut.unwrap_or(now.len())];
            observer(Event::Step { step, text: shown });
        }
        if finish != FinishReason::Length {
            break;
        }
        last = Some(next);
    }

    let text = match cut {
        Some(at) => text.text()[..at].to_string(),
        None => {
            // The end may hold text not yet searched: complete characters before an
            // incomplete one at the very end (the incremental text waits for it).
            let committed = text.text().len();
            let mut full = text
                .finish(&model.tokenizer)
                .map_err(EngineError::Tokenizer)?;
            if let Some(at) = first_stop(&full, &stops, committed.saturating_sub(longest_stop)) {
                full.truncate(at);
                finish = FinishReason::Stop;
            }
            full
        }
    };
    let tokens = steps.first().map(|s| s.top.clone()).unwrap_or_default();
    Ok(GenerateResponse {
        generated_text: text,
        tokens,
        finish_reason: finish,
        metadata: Metadata {
            model_name: model.name.clone(),
            architecture: model.architecture.clone(),
            prompt_length: prompt.chars().count(),
            prompt_tokens: prompt_ids.len(),
            completion_tokens: steps.len(),
            generation_time_ms: start.elapsed().as_secs_f64() * 1000.0,
            temperature_used: params.temperature,
            decoding: if greedy {
                Decoding::Greedy
            } else {
                Decoding::Sampling
            },
            logprobs_mode: params.logprobs_mode,
            device: model.device_label.clone(),
            dtype: model.dtype_label.clone(),
            activations: model.model.activations().name().into(),
            seed,
            prompt_perplexity: None,
        },
        steps,
        prompt: None,
        targets: None,
        lens: None,
    })
}

/// A ranked candidate as reported to the user.
pub fn token_probability(
    model: &LoadedModel,
    id: u32,
    logprob: f64,
    rank: usize,
) -> TokenProbability {
    candidate(&model.tokenizer, id, logprob, rank)
}

/// [`token_probability`] with a tokenizer alone.
pub fn candidate(
    tokenizer: &crate::model::TextTokenizer,
    id: u32,
    logprob: f64,
    rank: usize,
) -> TokenProbability {
    let probability = logprob.exp();
    TokenProbability {
        token: tokenizer.token_text(id).to_string(),
        token_id: id,
        bytes: tokenizer.token_bytes(id).to_vec(),
        probability,
        percentage: probability * 100.0,
        logprob,
        rank,
    }
}

fn make_step(model: &LoadedModel, dist: &Distribution, chosen: u32, top_k: usize) -> Step {
    let top: Vec<TokenProbability> = dist
        .top_k(top_k)
        .into_iter()
        .enumerate()
        .map(|(i, (id, lp))| token_probability(model, id, lp, i + 1))
        .collect();
    let logprob = dist.logprob(chosen);
    Step {
        token: model.tokenizer.token_text(chosen).to_string(),
        token_id: chosen,
        bytes: model.tokenizer.token_bytes(chosen).to_vec(),
        probability: logprob.exp(),
        logprob,
        rank: dist.rank(chosen),
        entropy: dist.entropy(),
        top,
    }
}

/// One token of a scored continuation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScoredToken {
    pub token: String,
    pub token_id: u32,
    pub logprob: f64,
    pub probability: f64,
    pub rank: usize,
}

/// Teacher-forced scoring: the model's log-probability and rank of each token of
/// `continuation` after `prompt_ids` (T = 1, the model's own distribution).
pub fn score_continuation(
    model: &LoadedModel,
    prompt_ids: &[u32],
    continuation: &[u32],
) -> Result<Vec<ScoredToken>, EngineError> {
    if prompt_ids.is_empty() {
        return Err(EngineError::EmptyPrompt);
    }
    let all: Vec<u32> = prompt_ids.iter().chain(continuation).copied().collect();
    let limit = model.context_length();
    if all.len() > limit {
        return Err(EngineError::TooLong {
            prompt: prompt_ids.len(),
            max_tokens: continuation.len(),
            limit,
        });
    }
    let lm = &model.model;
    let mut cache = lm.new_cache();
    let input = Tensor::new(all.as_slice(), lm.device())?.unsqueeze(0)?;
    // Logits at positions prompt_len-1 .. end-1 predict the continuation tokens.
    let logits = lm.forward_all(&input, &mut cache)?.squeeze(0)?;
    let start = prompt_ids.len() - 1;
    continuation
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let row: Vec<f32> = logits.get(start + i)?.to_vec1()?;
            let d = Distribution::from_logits(&row, 1.0)?;
            let lp = d.logprob(id);
            Ok(ScoredToken {
                token: model.tokenizer.token_text(id).to_string(),
                token_id: id,
                logprob: lp,
                probability: lp.exp(),
                rank: d.rank(id),
            })
        })
        .collect()
}

/// Where the earliest of `stops` begins in `text`, looking from byte `from` on (moved back to
/// a character boundary: `from` is counted in bytes back from the end of what was searched).
fn first_stop(text: &str, stops: &[&str], from: usize) -> Option<usize> {
    let mut from = from.min(text.len());
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    stops
        .iter()
        .filter_map(|s| text[from..].find(s).map(|at| from + at))
        .min()
}
