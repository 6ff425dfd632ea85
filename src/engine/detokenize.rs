//! The generated text, decoded as tokens arrive, in time linear in the generation's length.
//!
//! Decoding every generated id again at each step costs O(n²) over a generation. Instead each
//! step decodes a short window (the tokens since the last complete piece of text, plus the ones
//! before them for context) and appends what the new tokens added — the method of Hugging
//! Face's text-generation-inference. The context matters: a SentencePiece decoder drops the
//! leading space of a sequence's first word, and a byte-level token may hold part of a UTF-8
//! character; decoding the window with its context and taking the difference keeps both exact,
//! and text is only taken once it no longer ends in an incomplete character (U+FFFD), so the
//! result is the same string as decoding every id at once (tested on every test tokenizer).

use crate::model::TextTokenizer;

pub struct IncrementalText {
    ids: Vec<u32>,
    text: String,
    /// Where the context window of the next decode starts.
    prefix: usize,
    /// Ids before this are in `text`.
    read: usize,
}

impl IncrementalText {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            text: String::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// Adds one generated id; returns the whole text so far.
    pub fn push(&mut self, tokenizer: &TextTokenizer, id: u32) -> Result<&str, String> {
        self.ids.push(id);
        let (context, window) = self.context_and_window(tokenizer)?;
        if window.starts_with(&context) {
            if window.len() > context.len() && !window.ends_with('\u{FFFD}') {
                self.text.push_str(&window[context.len()..]);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        } else if !window.ends_with('\u{FFFD}') {
            // The window's text does not extend its context's: a decoder whose output for a
            // token depends on what follows (SentencePiece's byte fallback turns a whole run
            // of byte tokens into U+FFFDs while its last character is incomplete, which is
            // why that case waits above). Decode everything once and go on from here.
            let whole = tokenizer
                .decode(&self.ids, true)
                .map_err(|e| e.to_string())?;
            match whole.strip_prefix(self.text.as_str()) {
                Some(rest) => {
                    let rest = rest.to_string();
                    self.text.push_str(&rest);
                }
                None => self.text = whole,
            }
            self.prefix = self.ids.len();
            self.read = self.ids.len();
        }
        Ok(&self.text)
    }

    /// The text so far, pending incomplete characters included (what decoding every id at
    /// once gives): for the end of a generation.
    pub fn finish(&self, tokenizer: &TextTokenizer) -> Result<String, String> {
        if self.read == self.ids.len() {
            return Ok(self.text.clone());
        }
        let (context, window) = self.context_and_window(tokenizer)?;
        match window.strip_prefix(context.as_str()) {
            Some(rest) => Ok(format!("{}{rest}", self.text)),
            None => tokenizer.decode(&self.ids, true).map_err(|e| e.to_string()),
        }
    }

    /// The decoded context (ids already in `text` that the window starts with) and the
    /// decoded window (the context plus every id not yet in `text`).
    fn context_and_window(&self, tokenizer: &TextTokenizer) -> Result<(String, String), String> {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| e.to_string());
        Ok((
            decode(&self.ids[self.prefix..self.read])?,
            decode(&self.ids[self.prefix..])?,
        ))
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

impl Default for IncrementalText {
    fn default() -> Self {
        Self::new()
    }
}
