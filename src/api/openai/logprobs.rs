//! The engine's scored tokens in OpenAI's two log-probability layouts.

use super::types::{ChatTokenLogprob, CompletionLogprobs, TopLogprob, TopLogprobMap};
use crate::engine::{PromptToken, Step, TokenProbability};
use crate::model::TextTokenizer;

/// OpenAI's stand-in for −inf (JSON has no infinities).
pub const NEG_INF_LOGPROB: f64 = -9999.0;

/// `x`, or −9999.0 when it is not finite.
pub fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        NEG_INF_LOGPROB
    }
}

/// How tokens are named in `tokens` and as `top_logprobs` keys.
#[derive(Clone, Copy)]
pub struct Naming<'a> {
    pub tokenizer: &'a TextTokenizer,
    /// vLLM's `return_tokens_as_token_ids`: `token_id:N` for every token.
    pub as_ids: bool,
}

impl Naming<'_> {
    pub fn name(&self, id: u32) -> String {
        if self.as_ids {
            format!("token_id:{id}")
        } else {
            self.tokenizer.token_key(id)
        }
    }
}

/// Appends tokens to a legacy `logprobs` object, keeping `text_offset` running.
pub struct LegacyBuilder<'a> {
    naming: Naming<'a>,
    pub out: CompletionLogprobs,
    /// Bytes of the tokens so far, to count characters across token boundaries.
    bytes: Vec<u8>,
}

impl<'a> LegacyBuilder<'a> {
    pub fn new(naming: Naming<'a>) -> Self {
        Self {
            naming,
            out: CompletionLogprobs::default(),
            bytes: Vec::new(),
        }
    }

    /// Starts offsets at `chars` (a stream chunk continues the text before it).
    pub fn starting_at(naming: Naming<'a>, chars: usize) -> Self {
        let mut b = Self::new(naming);
        b.bytes = " ".repeat(chars).into_bytes();
        b
    }

    fn push(&mut self, id: u32, logprob: Option<f64>, top: Option<TopLogprobMap>) {
        // Characters so far; a character split across tokens counts once it is complete.
        let at = match std::str::from_utf8(&self.bytes) {
            Ok(s) => s.chars().count(),
            Err(e) => String::from_utf8_lossy(&self.bytes[..e.valid_up_to()])
                .chars()
                .count(),
        };
        self.out.tokens.push(self.naming.name(id));
        self.out.token_logprobs.push(logprob.map(finite));
        self.out.top_logprobs.push(top);
        self.out.text_offset.push(at);
        // Special tokens (BOS, end of turn) are not part of the text.
        if !self.naming.tokenizer.is_special(id) {
            self.bytes
                .extend_from_slice(self.naming.tokenizer.token_bytes(id));
        }
    }

    /// The chosen token and the alternatives, keyed by name; the chosen token's value is the
    /// same f64 as its `token_logprobs` entry.
    fn top_map(&self, chosen: u32, logprob: f64, top: &[TokenProbability]) -> TopLogprobMap {
        let mut entries: Vec<(u32, f64)> = top
            .iter()
            .map(|t| (t.token_id, finite(t.logprob)))
            .collect();
        match entries.iter_mut().find(|(id, _)| *id == chosen) {
            Some(entry) => entry.1 = finite(logprob),
            None => entries.push((chosen, finite(logprob))),
        }
        // Most likely first (the alternatives come ranked; the chosen token, if sampled from
        // below them, goes where its log-prob puts it). Stable: ties keep their rank order.
        entries.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Keys are names; two tokens that write the same text (Gemma's byte-fallback `<0x0A>`
        // and its `\n`) would merge into one key. The chosen token keeps its name (what
        // `tokens` says, so that `top_logprobs[i][tokens[i]]` is its log-prob); of the others,
        // the likelier keeps it and the rest are keyed by their ids.
        let chosen_name = self.naming.name(chosen);
        let mut named: Vec<(String, f64)> = Vec::with_capacity(entries.len());
        for (id, lp) in entries {
            let mut name = self.naming.name(id);
            if id != chosen && (name == chosen_name || named.iter().any(|(n, _)| *n == name)) {
                name = format!("token_id:{id}");
            }
            named.push((name, lp));
        }
        TopLogprobMap(named)
    }

    pub fn prompt(&mut self, tokens: &[PromptToken], k: usize) {
        for t in tokens {
            let top = t
                .logprob
                .map(|lp| self.top_map(t.token_id, lp, &t.top[..t.top.len().min(k)]));
            self.push(t.token_id, t.logprob, top);
        }
    }

    pub fn step(&mut self, step: &Step, k: usize) {
        let top = self.top_map(
            step.token_id,
            step.logprob,
            &step.top[..step.top.len().min(k)],
        );
        self.push(step.token_id, Some(step.logprob), Some(top));
    }
}

/// A generated token in the chat layout (text names; `bytes` are exact).
pub fn chat_token(tokenizer: &TextTokenizer, step: &Step, k: usize) -> ChatTokenLogprob {
    ChatTokenLogprob {
        token: step.token.clone(),
        logprob: finite(step.logprob),
        bytes: step.bytes.clone(),
        top_logprobs: step
            .top
            .iter()
            .take(k)
            .map(|t| TopLogprob {
                token: tokenizer.token_text(t.token_id).to_string(),
                logprob: finite(t.logprob),
                bytes: t.bytes.clone(),
            })
            .collect(),
    }
}
