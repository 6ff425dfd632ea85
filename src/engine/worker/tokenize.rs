//! The stage before the queue: prompts and targets become token ids (on tokio's blocking pool:
//! a 1 MB prompt takes a while, and neither the async runtime nor the model thread should wait
//! for it), and the length rules are checked before anything is queued.

use super::{PromptInput, WorkerError};
use crate::engine::scoring::Target;
use crate::model::TextTokenizer;

/// A prompt as text and token ids, with its targets tokenized (each on its own, without special
/// tokens).
pub(super) type Tokenized = (String, Vec<u32>, Vec<Target>);

/// Tokenizes `prompt` by its kind's rules and every target; token ids given by the client are
/// checked against the vocabulary (`vocab`) instead.
pub(super) fn tokenize(
    tokenizer: &TextTokenizer,
    prompt: PromptInput,
    mut targets: Vec<Target>,
    vocab: usize,
) -> Result<Tokenized, WorkerError> {
    let fail = |e: crate::model::ModelError| match e {
        crate::model::ModelError::Tokenizer(reason) => WorkerError::Untokenizable(reason),
        other => WorkerError::Failed(other.to_string()),
    };
    let (text, ids) = match prompt {
        PromptInput::Text(text) => {
            let ids = tokenizer.encode(&text).map_err(fail)?;
            (text, ids)
        }
        PromptInput::Rendered(text) => {
            let ids = tokenizer.encode_without_special(&text).map_err(fail)?;
            (text, ids)
        }
        PromptInput::Ids(ids) => {
            if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(WorkerError::InvalidTokenId { id, vocab });
            }
            (tokenizer.decode(&ids, false).map_err(fail)?, ids)
        }
    };
    for (index, target) in targets.iter_mut().enumerate() {
        target.ids = tokenizer
            .encode_without_special(&target.text)
            .map_err(fail)?;
        if target.ids.is_empty() {
            return Err(WorkerError::EmptyTarget { index });
        }
    }
    Ok((text, ids, targets))
}

/// The length rules, decided before a prompt is queued: non-empty, and at most
/// min(context − max_tokens, `max_prompt_tokens`) tokens.
pub fn check_prompt(
    prompt_tokens: usize,
    context_length: usize,
    max_prompt_tokens: Option<usize>,
    max_tokens: usize,
) -> Result<(), WorkerError> {
    if prompt_tokens == 0 {
        return Err(WorkerError::EmptyPrompt);
    }
    let mut limit = context_length.saturating_sub(max_tokens);
    if let Some(cap) = max_prompt_tokens {
        limit = limit.min(cap);
    }
    if prompt_tokens > limit {
        return Err(WorkerError::PromptTooLong {
            limit,
            prompt_tokens,
            max_tokens,
        });
    }
    Ok(())
}
