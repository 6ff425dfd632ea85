//! Running an evaluation on a model's worker: documents scored window by window, reference
//! prompts continued greedily, each a job on the model's queue like any request's.

use std::time::Duration;

use super::{diversity, EvalMetrics, EvalRequest, EvalSample, MAX_EVAL_TOKENS, MAX_WINDOW};
use crate::engine::generate::GenerateParams;
use crate::engine::output::GenerateResponse;
use crate::engine::worker::{PromptInput, WhenFull, WorkerError, WorkerHandle};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// One of its jobs waited or ran longer than the request timeout.
    #[error("a step of the evaluation took longer than {0:?}")]
    Timeout(Duration),
    /// More text than one evaluation scores.
    #[error("{0}")]
    TooLarge(String),
}

/// Bytes of text beyond which the token count is surely over [`MAX_EVAL_TOKENS`] is not
/// worth tokenizing to find out (no tokenizer's tokens average 64 bytes).
const MAX_EVAL_BYTES: usize = MAX_EVAL_TOKENS * 64;

/// One job on the queue, awaited within `timeout` (a full queue is waited for, within it).
async fn run_job(
    worker: &WorkerHandle,
    prompt: PromptInput,
    params: GenerateParams,
    timeout: Duration,
) -> Result<GenerateResponse, EvalError> {
    let work = async {
        let rx = worker
            .submit_input(prompt, params, None, WhenFull::Wait, None)
            .await?;
        rx.await.map_err(|_| WorkerError::Stopped)?
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(EvalError::Timeout(timeout)),
        Ok(result) => Ok(result?),
    }
}

/// Evaluates the model behind `worker` on `documents` and `req.references`.
pub async fn evaluate(
    worker: &WorkerHandle,
    documents: Vec<String>,
    req: &EvalRequest,
    timeout: Duration,
) -> Result<(EvalMetrics, Vec<EvalSample>), EvalError> {
    let info = worker.ready()?;
    let bytes: usize = documents.iter().map(String::len).sum();
    if bytes > MAX_EVAL_BYTES {
        return Err(too_large(format!("{bytes} bytes of text")));
    }
    let mut tokenized = Vec::with_capacity(documents.len());
    for doc in documents {
        tokenized.push(worker.tokenize_text(doc).await?);
    }
    let scored: usize = tokenized
        .iter()
        .map(|ids| ids.len().saturating_sub(1))
        .sum();
    if scored > MAX_EVAL_TOKENS {
        return Err(too_large(format!("{scored} tokens to score")));
    }
    let window = info
        .context_length
        .min(worker.max_prompt_tokens().unwrap_or(usize::MAX))
        .clamp(2, MAX_WINDOW);

    let mut metrics = EvalMetrics {
        documents: tokenized.len() as u64,
        references: req.references.len() as u64,
        ..EvalMetrics::default()
    };
    let mut nll = 0.0f64;
    for ids in &tokenized {
        let mut start = 0;
        while start + 1 < ids.len() {
            let end = (start + window).min(ids.len());
            let params = GenerateParams {
                max_tokens: 0,
                top_k: 0,
                prompt_logprobs: true,
                ..GenerateParams::default()
            };
            let resp = run_job(
                worker,
                PromptInput::Ids(ids[start..end].to_vec()),
                params,
                timeout,
            )
            .await?;
            // The window's first token has no prediction: it was the last one of the window
            // before, or the document's first.
            for token in resp.prompt.iter().flatten().skip(1) {
                let Some(lp) = token.logprob else { continue };
                nll -= lp;
                metrics.tokens_scored += 1;
                metrics.bytes_scored += token.bytes.len() as u64;
            }
            start = end - 1;
        }
    }
    if metrics.tokens_scored > 0 {
        metrics.perplexity = finite((nll / metrics.tokens_scored as f64).exp());
        if metrics.bytes_scored > 0 {
            metrics.bits_per_byte =
                finite(nll / std::f64::consts::LN_2 / metrics.bytes_scored as f64);
        }
    }

    let mut samples = Vec::with_capacity(req.references.len());
    for pair in &req.references {
        let params = GenerateParams {
            temperature: 0.0,
            max_tokens: req.max_tokens as usize,
            top_k: 1,
            stop: if req.stop_on_newline {
                vec!["\n".to_string()]
            } else {
                Vec::new()
            },
            fit_context: true,
            ..GenerateParams::default()
        };
        let resp = run_job(
            worker,
            PromptInput::Text(pair.prompt.clone()),
            params,
            timeout,
        )
        .await?;
        samples.push(EvalSample {
            rouge_l: super::rouge::rouge_l_f1(&pair.reference, &resp.generated_text),
            prompt: pair.prompt.clone(),
            reference: pair.reference.clone(),
            response_tokens: resp.steps.len() as u64,
            response: resp.generated_text,
        });
    }
    if !samples.is_empty() {
        let responses: Vec<&str> = samples.iter().map(|s| s.response.as_str()).collect();
        metrics.bleu_score = finite(super::bleu::corpus_bleu(
            samples
                .iter()
                .map(|s| (s.response.as_str(), s.reference.as_str())),
        ));
        metrics.rouge_score =
            finite(samples.iter().map(|s| s.rouge_l).sum::<f64>() / samples.len() as f64);
        metrics.response_diversity =
            diversity::distinct_n(&responses, diversity::DIVERSITY_N).and_then(finite);
        metrics.avg_response_length = diversity::mean_words(&responses).and_then(finite);
        metrics.avg_response_tokens = finite(
            samples.iter().map(|s| s.response_tokens).sum::<u64>() as f64 / samples.len() as f64,
        );
    }
    Ok((metrics, samples))
}

fn too_large(what: String) -> EvalError {
    EvalError::TooLarge(format!(
        "the data has {what}; one evaluation scores at most {MAX_EVAL_TOKENS} tokens: evaluate a part of it"
    ))
}

/// A metric as reported: never NaN or infinite (`null` instead).
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}
