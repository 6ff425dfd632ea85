//! Tokenizers: built from GGUF metadata or read from `tokenizer.json`, plus per-token text
//! and raw bytes (a byte-level token can be part of a UTF-8 character).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use super::error::{ModelError, Result};

/// GGUF `tokenizer.ggml.pre` values we know how to rebuild exactly.
pub const SUPPORTED_GGUF_PRE: &[&str] =
    &["smollm", "gpt2", "gpt-2", "default", "qwen2", "llama-bpe"];

/// llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), which spell the original
/// tokenizer.json's case-insensitive contractions `(?i:'s|...)` as explicit classes.
const QWEN2_PRE_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PRE_REGEX: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's regexes for a byte-level vocabulary without a `pre` type, applied in turn.
const DEFAULT_PRE_REGEXES: &[&str] = &[
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
];

/// Regex splits applied in turn, each re-splitting the pieces of the one before with every
/// match its own piece (llama.cpp's unicode_regex_split), then the byte-level mapping without
/// GPT-2's own regex.
fn regex_then_bytes(regexes: &[&str]) -> Result<PreTokenizerWrapper> {
    let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
    for regex in regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(tok_err)?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, true, false).into());
    Ok(Sequence::new(steps).into())
}

/// The text whose ids go into [`TextTokenizer::digest`].
const DIGEST_PROBE: &str =
    "The quick brown fox jumps over the lazy dog. 0123456789 3.14 1,000,000 \
    +-*/=<>[]{}()@#$%^&_~`|\\ \n\n\t    indented  naïve café Übermaß — “quotes” ‘single’ \
    東京 Москва 😀 <|endoftext|><|im_start|>user <s> </s> [INST] <bos><eos> don't I'm we'll";

/// A tokenizer with the per-id tables the engine reports.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    token_bytes: Vec<Vec<u8>>,
    token_text: Vec<String>,
    special: Vec<bool>,
    /// A copy that reads special tokens' text as plain text (see [`Self::encode_literal`]),
    /// made on first use: it duplicates the vocabulary.
    literal: std::sync::Arc<std::sync::OnceLock<Tokenizer>>,
    end_of_generation: Vec<u32>,
    /// See [`Self::digest`] (computed on first use).
    digest: std::sync::Arc<std::sync::OnceLock<String>>,
    /// A character-level vocabulary's characters: text with any other is refused, naming it.
    alphabet: Option<std::sync::Arc<std::collections::HashSet<char>>>,
    pub info: TokenizerInfo,
}

/// What clients ask about a tokenizer (`GET /tokenizer_info`) and what chat needs.
#[derive(Debug, Clone, Default)]
pub struct TokenizerInfo {
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Whether [`TextTokenizer::encode`] puts BOS first.
    pub add_bos: bool,
    /// The model's chat template, compiled (None: the model has none, or it did not compile —
    /// `chat_template_error` says why).
    pub chat_template: Option<std::sync::Arc<super::chat_template::ChatTemplate>>,
    pub chat_template_error: Option<String>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.token_bytes.len())
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

impl TextTokenizer {
    /// Builds the tokenizer a GGUF describes in its `tokenizer.ggml.*` metadata: a byte-level
    /// BPE (`model = gpt2`, with the pre-tokenizer its `pre` names) or a SentencePiece-style
    /// vocabulary of scored pieces (`model = llama`). Both encode exactly as llama.cpp does
    /// (tests: llama.cpp's own test vectors).
    ///
    /// candle's own `TokenizerFromGguf` adds a prefix space for SmolLM2, so it is not used.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let meta = GgufVocab::read(md)?;
        let mut tk = match meta.model.as_str() {
            "gpt2" => byte_level_bpe(md, &meta)?,
            "llama" => sentencepiece(md, &meta)?,
            other => {
                return Err(tok_err(format!(
                    "GGUF tokenizer model `{other}` is not supported (supported: gpt2 byte-level \
                     BPE, llama SentencePiece)"
                )))
            }
        };
        // Control tokens (type 3) are special; user-defined ones (type 4) match as wholes in
        // the raw text, before any normalization (llama.cpp's tokenizer_st_partition splits
        // them out first even with parse_special off: Gemma's runs of spaces and newlines).
        let eog = meta.end_of_generation();
        let special: Vec<AddedToken> = meta
            .tokens
            .iter()
            .enumerate()
            .filter(|&(i, _)| meta.types[i] == 3 || eog.contains(&(i as u32)))
            .map(|(_, s)| AddedToken::from(s.clone(), true))
            .collect();
        let user: Vec<AddedToken> = meta
            .tokens
            .iter()
            .enumerate()
            .filter(|&(i, _)| meta.types[i] == 4 && !eog.contains(&(i as u32)))
            .map(|(_, s)| AddedToken::from(s.clone(), false).normalized(false))
            .collect();
        tk.add_special_tokens(special).map_err(tok_err)?;
        tk.add_tokens(user).map_err(tok_err)?;

        // Without the key, llama.cpp's default: BOS for SentencePiece and Llama 3 vocabularies.
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok());
        let bos_by_default = meta.model == "llama" || pre.is_some_and(|p| p == "llama-bpe");
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(bos_by_default);
        if add_bos {
            let bos_id = md
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.to_u32().ok())
                .ok_or_else(|| tok_err("add_bos_token is set but bos_token_id is missing"))?;
            let bos = meta
                .tokens
                .get(bos_id as usize)
                .ok_or_else(|| tok_err("bos_token_id is outside the vocabulary"))?
                .clone();
            let post = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
                .map_err(tok_err)?
                .special_tokens(vec![(bos.clone(), bos_id)])
                .build()
                .map_err(tok_err)?;
            tk.with_post_processor(Some(post));
        }
        let mut tk = Self::new(tk, meta.tokens.len())?;
        tk.end_of_generation = eog;
        let id = |key: &str| md.get(key).and_then(|v| v.to_u32().ok());
        tk.info.bos_token_id = id("tokenizer.ggml.bos_token_id");
        tk.info.eos_token_id = id("tokenizer.ggml.eos_token_id");
        tk.info.add_bos = add_bos;
        if let Some(source) = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            tk.set_chat_template(source);
        }
        Ok(tk)
    }

    /// Compiles `source` as the chat template (with this vocabulary's BOS and EOS texts); a
    /// template that does not compile is kept out, and chat requests are refused saying why.
    pub fn set_chat_template(&mut self, source: &str) {
        let text = |id: Option<u32>| id.map_or(String::new(), |i| self.token_text(i).to_string());
        let (bos, eos) = (text(self.info.bos_token_id), text(self.info.eos_token_id));
        match super::chat_template::ChatTemplate::new(source, &bos, &eos) {
            Ok(t) => self.info.chat_template = Some(std::sync::Arc::new(t)),
            Err(e) => {
                tracing::warn!("the model's chat template does not compile: {e}");
                self.info.chat_template_error = Some(e.to_string());
            }
        }
    }

    /// Token `id` named as OpenAI names tokens: its text when its bytes are valid UTF-8 (a
    /// SentencePiece byte-fallback token like `<0x41>` is named by what it writes, `A`),
    /// otherwise `bytes:` followed by `\xNN` for every byte (a piece of a multi-byte
    /// character). Two tokens can share a name (`<0x41>` and `A`): a `top_logprobs` object
    /// keyed by names resolves that where it is built.
    pub fn token_key(&self, id: u32) -> String {
        let bytes = self.token_bytes(id);
        match std::str::from_utf8(bytes) {
            Ok(text) => text.to_string(),
            Err(_) => {
                let mut key = String::from("bytes:");
                for b in bytes {
                    key.push_str(&format!("\\x{b:02x}"));
                }
                key
            }
        }
    }

    /// Tokens that end generation besides the configured EOS (llama.cpp's EOG list: chat
    /// turn ends, `<|endoftext|>`, `</s>`, ...), for GGUF vocabularies.
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path, vocab_size: usize) -> Result<Self> {
        let tk = Tokenizer::from_file(path).map_err(|e| ModelError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("not a valid tokenizer.json ({e})"),
        })?;
        let mut tk = Self::new(tk, vocab_size)?;
        tk.read_tokenizer_config(path);
        Ok(tk)
    }

    /// BOS/EOS, whether BOS is added, and the chat template, from the `tokenizer_config.json`
    /// beside `tokenizer.json` (when there is one).
    fn read_tokenizer_config(&mut self, tokenizer_json: &Path) {
        let probe = self.encode_without_special("a").unwrap_or_default();
        let with = self.encode("a").unwrap_or_default();
        self.info.add_bos = with.len() > probe.len() && with.first() != probe.first();
        let Some(cfg) = tokenizer_json
            .parent()
            .and_then(|d| std::fs::read_to_string(d.join("tokenizer_config.json")).ok())
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        else {
            return;
        };
        // A token is written as a string or as {"content": "..."}.
        let inner = &self.inner;
        let token = |key: &str| {
            let v = cfg.get(key)?;
            let text = v.as_str().or_else(|| v.get("content")?.as_str())?;
            inner.token_to_id(text)
        };
        let (bos, eos) = (token("bos_token"), token("eos_token"));
        self.info.bos_token_id = bos;
        self.info.eos_token_id = eos;
        // Either one template, or a list of named ones ("default" is the chat template).
        let template = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        if let Some(t) = template {
            self.set_chat_template(&t);
        }
    }

    fn new(inner: Tokenizer, vocab_size: usize) -> Result<Self> {
        let size = vocab_size.max(inner.get_vocab_size(true));
        let byte_level = inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|s| s.contains("\"ByteLevel\""));
        let specials: std::collections::HashSet<u32> = inner
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let char_bytes = byte_level_char_to_byte();
        let mut token_bytes = Vec::with_capacity(size);
        let mut token_text = Vec::with_capacity(size);
        let mut special = Vec::with_capacity(size);
        for id in 0..size as u32 {
            let piece = inner.id_to_token(id).unwrap_or_default();
            let is_special = specials.contains(&id);
            let bytes = if is_special {
                piece.as_bytes().to_vec()
            } else {
                piece_bytes(&piece, byte_level, &char_bytes)
            };
            token_text.push(String::from_utf8_lossy(&bytes).into_owned());
            token_bytes.push(bytes);
            special.push(is_special);
        }
        Ok(Self {
            inner,
            token_bytes,
            token_text,
            special,
            literal: Default::default(),
            end_of_generation: Vec::new(),
            digest: Default::default(),
            alphabet: None,
            info: TokenizerInfo::default(),
        })
    }

    /// A character-level tokenizer (nanoGPT's `meta.pkl`): each character its own token, by
    /// the given ids; text with a character outside the vocabulary is an error naming it.
    pub fn from_chars(chars: Vec<(u32, String)>) -> Result<Self> {
        let size = chars
            .iter()
            .map(|(id, _)| *id as usize + 1)
            .max()
            .unwrap_or(0);
        let vocab: HashMap<String, u32> = chars.iter().map(|(id, c)| (c.clone(), *id)).collect();
        if vocab.len() != chars.len() || size != chars.len() {
            return Err(tok_err(
                "the character vocabulary's ids are not 0..n, each character once",
            ));
        }
        let model = tokenizers::models::wordlevel::WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .build()
            .map_err(tok_err)?;
        let mut tk = Tokenizer::new(model);
        tk.with_pre_tokenizer(Some(PreTokenizerWrapper::Split(
            Split::new(
                SplitPattern::Regex(r"(?m).".into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(tok_err)?,
        )));
        tk.with_decoder(Some(DecoderWrapper::Fuse(Fuse::new())));
        let mut tk = Self::new(tk, size)?;
        for (id, c) in &chars {
            tk.token_bytes[*id as usize] = c.as_bytes().to_vec();
            tk.token_text[*id as usize] = c.clone();
        }
        tk.alphabet = Some(std::sync::Arc::new(
            chars.iter().filter_map(|(_, c)| c.chars().next()).collect(),
        ));
        Ok(tk)
    }

    /// GPT-2's byte-level BPE from its published `encoder.json` and `vocab.bpe` (the files
    /// tiktoken's `gpt2` encoding is built from): GPT-2's regex, no prefix space, and
    /// `<|endoftext|>` (50256) a special token that also ends generation.
    pub fn gpt2_bpe(encoder_json: &Path, vocab_bpe: &Path) -> Result<Self> {
        let (e, v) = (encoder_json.to_string_lossy(), vocab_bpe.to_string_lossy());
        let bpe = BPE::from_file(&e, &v)
            .build()
            .map_err(|err| ModelError::Corrupt {
                path: encoder_json.to_path_buf(),
                reason: format!("not GPT-2's encoder.json + vocab.bpe ({err})"),
            })?;
        let mut tk = Tokenizer::new(bpe);
        let pre: PreTokenizerWrapper = ByteLevel::new(false, true, true).into();
        tk.with_pre_tokenizer(Some(pre));
        tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        tk.add_special_tokens([AddedToken::from("<|endoftext|>", true)])
            .map_err(tok_err)?;
        let eot = tk.token_to_id("<|endoftext|>");
        let size = tk.get_vocab_size(true);
        let mut tk = Self::new(tk, size)?;
        tk.end_of_generation = eot.into_iter().collect();
        tk.info.eos_token_id = eot;
        Ok(tk)
    }

    /// A tiktoken encoding (nanochat's `tokenizer.pkl`) as byte-level BPE: `ranks` maps each
    /// token's bytes to its id, `specials` the special tokens' texts to theirs, and `bos` (a
    /// special token's text) is put first by [`Self::encode`], as nanochat prepends it.
    ///
    /// tiktoken merges, in each regex piece, the adjacent pair whose concatenation has the
    /// lowest rank, and takes a piece that is itself a token whole. The same as HF BPE: a merge
    /// for every split of a token into two tokens, ranked by the merged token's rank (ties by
    /// the halves' ranks, as transformers' TikTokenConverter orders them), and
    /// `ignore_merges` for whole pieces.
    pub fn tiktoken(
        pat_str: &str,
        ranks: &[(Vec<u8>, u32)],
        specials: &[(String, u32)],
        bos: Option<&str>,
    ) -> Result<Self> {
        let byte_char: HashMap<u8, char> = byte_level_char_to_byte()
            .into_iter()
            .map(|(c, b)| (b, c))
            .collect();
        let text = |bytes: &[u8]| -> String { bytes.iter().map(|b| byte_char[b]).collect() };
        let by_bytes: HashMap<&[u8], u32> = ranks.iter().map(|(b, r)| (b.as_slice(), *r)).collect();
        if by_bytes.len() != ranks.len() {
            return Err(tok_err("the encoding lists a token twice"));
        }
        let mut merges: Vec<(u32, u32, u32, String, String)> = Vec::new();
        for (bytes, rank) in ranks {
            let mut splits: Vec<(u32, u32, usize)> = (1..bytes.len())
                .filter_map(|i| {
                    let (l, r) = (by_bytes.get(&bytes[..i])?, by_bytes.get(&bytes[i..])?);
                    Some((*l, *r, i))
                })
                .collect();
            splits.sort_unstable();
            for (l, r, i) in splits {
                merges.push((*rank, l, r, text(&bytes[..i]), text(&bytes[i..])));
            }
        }
        merges.sort_unstable_by_key(|m| (m.0, m.1, m.2));
        let vocab: tokenizers::models::bpe::Vocab =
            ranks.iter().map(|(b, r)| (text(b), *r)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges.into_iter().map(|m| (m.3, m.4)).collect())
            .ignore_merges(true)
            .build()
            .map_err(tok_err)?;
        let mut tk = Tokenizer::new(bpe);
        let split = Split::new(
            SplitPattern::Regex(pat_str.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err(format!("the encoding's pattern: {e}")))?;
        let pre: PreTokenizerWrapper = Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])
        .into();
        tk.with_pre_tokenizer(Some(pre));
        tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
        let mut specials = specials.to_vec();
        specials.sort_by_key(|(_, id)| *id);
        for (name, id) in &specials {
            tk.add_special_tokens([AddedToken::from(name.as_str(), true)])
                .map_err(tok_err)?;
            if tk.token_to_id(name) != Some(*id) {
                return Err(tok_err(format!(
                    "the special token {name:?} has id {id}, but the ids are not the ranks' \
                     successors (tiktoken numbers them after the {} tokens)",
                    ranks.len()
                )));
            }
        }
        let bos_id = match bos {
            Some(b) => Some(
                tk.token_to_id(b)
                    .ok_or_else(|| tok_err(format!("the encoding has no {b:?}")))?,
            ),
            None => None,
        };
        if let (Some(b), Some(id)) = (bos, bos_id) {
            let post = TemplateProcessing::builder()
                .try_single(format!("{b} $A"))
                .and_then(|t| t.try_pair(format!("{b} $A {b} $B")))
                .map_err(tok_err)?
                .special_tokens(vec![(b.to_string(), id)])
                .build()
                .map_err(tok_err)?;
            tk.with_post_processor(Some(post));
        }
        let size = tk.get_vocab_size(true);
        let mut tk = Self::new(tk, size)?;
        tk.info.bos_token_id = bos_id;
        tk.info.add_bos = bos_id.is_some();
        Ok(tk)
    }

    /// Sets the tokens that end generation (the first is reported as EOS).
    pub fn set_end_of_generation(&mut self, ids: Vec<u32>) {
        self.info.eos_token_id = ids.first().copied();
        self.end_of_generation = ids;
    }

    /// Whether `text` can be written in this vocabulary: always, except for a
    /// character-level one, which refuses a character it lacks (naming it).
    pub fn check_alphabet(&self, text: &str) -> Result<()> {
        let Some(alphabet) = &self.alphabet else {
            return Ok(());
        };
        match text.chars().find(|c| !alphabet.contains(c)) {
            None => Ok(()),
            Some(c) => Err(tok_err(format!(
                "the character {c:?} (U+{:04X}) is not in this model's character vocabulary \
                 ({} characters)",
                c as u32,
                alphabet.len()
            ))),
        }
    }

    /// Token ids of `text`, with the tokenizer's own special-token rules (BOS if configured).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.check_alphabet(text)?;
        let enc = self.inner.encode(text, true).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes with neither added special tokens (no BOS) nor special-token parsing: the text
    /// of a control token like `<start_of_turn>` is tokenized as plain text (user-defined
    /// pieces still match whole). llama.cpp's `llama_tokenize(add_special = false,
    /// parse_special = false)`, which its tokenizer test vectors use.
    pub fn encode_literal(&self, text: &str) -> Result<Vec<u32>> {
        self.check_alphabet(text)?;
        let literal = self.literal.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let enc = literal.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes without the model's added special tokens (no BOS): a continuation or a target
    /// scored after a prompt, or llama.cpp's `add_special = false`.
    pub fn encode_without_special(&self, text: &str) -> Result<Vec<u32>> {
        self.check_alphabet(text)?;
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tok_err)
    }

    /// Raw bytes of `ids` concatenated, special tokens left out.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter()
            .filter(|&&id| !self.is_special(id))
            .flat_map(|&id| self.token_bytes(id).iter().copied())
            .collect()
    }

    pub fn token_text(&self, id: u32) -> &str {
        self.token_text.get(id as usize).map_or("", |s| s.as_str())
    }
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes
            .get(id as usize)
            .map_or(&[], |b| b.as_slice())
    }
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    /// What makes two tokenizers the same, as a SHA-256 (hex, first 16 bytes) of: every
    /// token's bytes, the BOS a text gets (if any), and the ids of a probe text
    /// (letters, digits, punctuation, whitespace runs, accents, CJK, Cyrillic, an emoji,
    /// special-token markup) — so that merges, normalization and pre-tokenization count too,
    /// not how a tokenizer file happens to be written (a GGUF's tokenizer and the
    /// `tokenizer.json` written from it agree). POST /compare also checks the request's own
    /// text under both.
    pub fn digest(&self) -> &str {
        self.digest.get_or_init(|| {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for id in 0..self.vocab_size() as u32 {
                let bytes = self.token_bytes(id);
                h.update((bytes.len() as u32).to_le_bytes());
                h.update(bytes);
            }
            // The BOS id matters only where it is added (a GGUF names one either way).
            let bos = self.info.bos_token_id.filter(|_| self.info.add_bos);
            h.update(bos.unwrap_or(u32::MAX).to_le_bytes());
            for id in self.encode(DIGEST_PROBE).unwrap_or_default() {
                h.update(id.to_le_bytes());
            }
            h.finalize()[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect()
        })
    }

    /// Where two tokenizers differ, in words (for a mismatch error); None when their digests
    /// agree.
    pub fn difference(&self, other: &TextTokenizer) -> Option<String> {
        if self.digest() == other.digest() {
            return None;
        }
        if self.vocab_size() != other.vocab_size() {
            return Some(format!(
                "vocabularies of {} and {} tokens",
                self.vocab_size(),
                other.vocab_size()
            ));
        }
        if let Some(id) =
            (0..self.vocab_size() as u32).find(|&i| self.token_bytes(i) != other.token_bytes(i))
        {
            return Some(format!(
                "token {id} is {:?} in one and {:?} in the other",
                self.token_text(id),
                other.token_text(id)
            ));
        }
        if self.info.add_bos != other.info.add_bos {
            return Some("one adds a BOS token, the other does not".into());
        }
        Some("the same vocabulary, but a probe text is tokenized differently: other merges, normalization or pre-tokenization".into())
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len()
    }
    /// The underlying `tokenizers` object (to save it as tokenizer.json).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Raw bytes of a vocabulary piece.
/// The vocabulary part of a GGUF's tokenizer metadata.
struct GgufVocab {
    model: String,
    tokens: Vec<String>,
    /// llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    /// 6 byte.
    types: Vec<i32>,
}

impl GgufVocab {
    fn read(md: &HashMap<String, Value>) -> Result<Self> {
        let get = |k: &str| {
            md.get(k)
                .ok_or_else(|| tok_err(format!("GGUF metadata has no `{k}`")))
        };
        let model = get("tokenizer.ggml.model")?
            .to_string()
            .map_err(tok_err)?
            .clone();
        let tokens: Vec<String> = get("tokenizer.ggml.tokens")?
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|v| v.to_string().cloned().map_err(tok_err))
            .collect::<Result<_>>()?;
        let types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
            None => vec![1; tokens.len()],
            Some(v) => v
                .to_vec()
                .map_err(tok_err)?
                .iter()
                .map(|t| t.to_i32().map_err(tok_err))
                .collect::<Result<_>>()?,
        };
        if types.len() != tokens.len() {
            return Err(tok_err(
                "tokenizer.ggml.token_type and tokens differ in length",
            ));
        }
        Ok(Self {
            model,
            tokens,
            types,
        })
    }

    /// llama.cpp's end-of-generation tokens by name (llama-vocab.cpp): they end generation
    /// and are control tokens whatever type the file gives them (so their text is not matched
    /// when special tokens are not parsed), except a `</s>` in vocabularies where it is a
    /// normal word (those with `<|tool_response>` or `<|plamo:eos|>`).
    fn end_of_generation(&self) -> Vec<u32> {
        const NAMES: &[&str] = &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<|return|>",
            "<|call|>",
            "<|flush|>",
            "<|calls|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "</s>",
            "<|eom_id|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "[EOS]",
            "<|end_of_text|>",
            "<end_of_utterance>",
            "<eos>",
            "<turn|>",
            "<|tool_response>",
            "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
            "[e~[",
        ];
        let normal_s = self
            .tokens
            .iter()
            .any(|t| t == "<|tool_response>" || t == "<|plamo:eos|>");
        let is_eog = |t: &str| NAMES.contains(&t) && !(normal_s && t == "</s>");
        // The first id of each name, as text_to_token resolves a duplicated piece.
        let mut seen = std::collections::HashSet::new();
        self.tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| is_eog(t) && seen.insert(t.as_str()))
            .map(|(i, _)| i as u32)
            .collect()
    }

    fn vocab(&self) -> tokenizers::models::bpe::Vocab {
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(self.tokens.len());
        for (i, t) in self.tokens.iter().enumerate() {
            // A duplicated piece resolves to its first id, as llama.cpp's text_to_token does.
            vocab.entry(t.clone()).or_insert(i as u32);
        }
        vocab
    }
}

/// `model = gpt2`: byte-level BPE with the listed merges and the `pre` pre-tokenizer.
fn byte_level_bpe(md: &HashMap<String, Value>, meta: &GgufVocab) -> Result<Tokenizer> {
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(v) => v.to_string().map_err(tok_err)?.clone(),
        None => "default".to_string(),
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre.as_str() {
        "smollm" => Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        "gpt2" | "gpt-2" => ByteLevel::new(false, true, true).into(),
        "qwen2" => regex_then_bytes(&[QWEN2_PRE_REGEX])?,
        "llama-bpe" => regex_then_bytes(&[LLAMA3_PRE_REGEX])?,
        // A byte-level GGUF without `pre` (converted before llama.cpp recorded it): llama.cpp
        // splits with its default chain, not GPT-2's regex alone.
        "default" => {
            tracing::warn!(
                "this GGUF's byte-level vocabulary has no tokenizer.ggml.pre: splitting with \
                 llama.cpp's default regexes, as llama.cpp does (which may differ from the \
                 model's own tokenizer; a re-converted GGUF or its Hugging Face directory is exact)"
            );
            regex_then_bytes(DEFAULT_PRE_REGEXES)?
        }
        other => {
            return Err(tok_err(format!(
                "GGUF pre-tokenizer `{other}` is not supported (supported: {}); \
                 use the model's Hugging Face directory with its tokenizer.json instead",
                SUPPORTED_GGUF_PRE.join(", ")
            )))
        }
    };
    let merges: Vec<(String, String)> = match md.get("tokenizer.ggml.merges") {
        None => Vec::new(),
        Some(v) => v
            .to_vec()
            .map_err(tok_err)?
            .iter()
            .map(|m| {
                let m = m.to_string().map_err(tok_err)?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| tok_err(format!("malformed merge `{m}`")))
            })
            .collect::<Result<_>>()?,
    };
    let bpe = BPE::builder()
        .vocab_and_merges(meta.vocab(), merges)
        // Llama 3's vocabulary takes a pre-tokenized word that is itself a token whole,
        // without merging (llama.cpp: `ignore_merges` for the llama-bpe pre type).
        .ignore_merges(pre == "llama-bpe")
        .build()
        .map_err(tok_err)?;
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(pre_tokenizer));
    tk.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tk)
}

/// `model = llama`: SentencePiece-style pieces with scores, encoded as llama.cpp's
/// `llm_tokenizer_spm` does: spaces become `▁` (and one is prepended with `add_space_prefix`,
/// llama.cpp's default), the text starts as single characters, and the adjacent pair whose
/// concatenation is the highest-scoring piece is merged until none is; a character that is
/// no piece becomes its UTF-8 bytes' `<0xNN>` pieces. That is a BPE whose merges are every
/// split (a, b) of every piece ab with a and b pieces too, ranked by ab's score — built here.
fn sentencepiece(md: &HashMap<String, Value>, meta: &GgufVocab) -> Result<Tokenizer> {
    let scores: Vec<f32> = md
        .get("tokenizer.ggml.scores")
        .ok_or_else(|| tok_err("GGUF metadata has no `tokenizer.ggml.scores`"))?
        .to_vec()
        .map_err(tok_err)?
        .iter()
        .map(|v| v.to_f32().map_err(tok_err))
        .collect::<Result<_>>()?;
    if scores.len() != meta.tokens.len() {
        return Err(tok_err("tokenizer.ggml.scores and tokens differ in length"));
    }
    let vocab = meta.vocab();
    // Best score first; equal scores by id (llama.cpp breaks such ties by position, which
    // only matters for two different pieces of exactly equal score competing at once).
    let mut order: Vec<usize> = (0..meta.tokens.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for id in order {
        let piece = &meta.tokens[id];
        if vocab.get(piece) != Some(&(id as u32)) || meta.types[id] == 6 {
            continue; // a duplicate, or a <0xNN> byte piece (never the result of a merge)
        }
        for (k, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(k);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                merges.push((a.to_string(), b.to_string()));
            }
        }
    }
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true);
    if let Some(unk) = md
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|id| meta.tokens.get(id as usize))
    {
        builder = builder.unk_token(unk.clone());
    }
    let bpe = builder.build().map_err(tok_err)?;
    let mut tk = Tokenizer::new(bpe);
    let add_space_prefix = md
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(true);
    let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("\u{2581}".into()).into());
    }
    normalizers.push(Replace::new(" ", "\u{2581}").map_err(tok_err)?.into());
    tk.with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(tok_err)?;
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("\u{2581}", " ").map_err(tok_err)?.into(),
        ByteFallback::default().into(),
        Fuse::default().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tk)
}

fn piece_bytes(piece: &str, byte_level: bool, char_bytes: &HashMap<char, u8>) -> Vec<u8> {
    if byte_level {
        if let Some(bytes) = piece
            .chars()
            .map(|c| char_bytes.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
        {
            return bytes;
        }
    }
    // SentencePiece byte-fallback pieces look like <0x0A>.
    if piece.len() == 6 && piece.starts_with("<0x") && piece.ends_with('>') {
        if let Ok(b) = u8::from_str_radix(&piece[3..5], 16) {
            return vec![b];
        }
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// GPT-2's reversible byte ↔ printable-character table, inverted.
fn byte_level_char_to_byte() -> HashMap<char, u8> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}
