//! nanochat checkpoints (karpathy/nanochat's `checkpoint_manager.save_checkpoint`): a folder of
//! `model_<step>.pt` (the model's state dict, `torch.save`d) and `meta_<step>.json`
//! (`model_config`, `step`, `val_bpb`, …), one pair per saved step, and the tokenizer the run
//! trained, `tokenizer.pkl` (a pickled `tiktoken.Encoding`). Read without running Python: the
//! state dict through [`super::torch_file`], the tokenizer through the allow-listed
//! [`super::pickle`] reader, which records the `Encoding` it names and never constructs it.
//!
//! A checkpoint loads when it has exactly the tensors today's `gpt.py` has for its config
//! (upstream loads with `strict=True`), after upstream's own two patches for older files
//! (`window_pattern` "L", `resid_lambdas` 1 and `x0_lambdas` 0 when absent); anything else is
//! refused, naming what is missing or unexpected. The architecture is
//! [`super::family::nanochat`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::{Config, Unimplemented};
use super::error::{ModelError, Result};
use super::family::nanochat as arch;
use super::nanogpt::TrainingInfo;
use super::pickle::{Node, Pickle};
use super::torch_file::{TensorRef, TorchFile};
use super::TextTokenizer;

/// How these models are listed (`architecture`).
pub const ARCHITECTURE: &str = "nanochat";

/// upstream's `GPTConfig`, from `meta_<step>.json`'s `model_config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    pub sequence_len: usize,
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub n_embd: usize,
    pub window_pattern: String,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
    /// Rows of the embedding and head: the vocabulary padded to a multiple of 64 (upstream's
    /// `pad_vocab_size_to`); the padding rows are never tokens.
    pub fn padded_vocab(&self) -> usize {
        self.vocab_size.div_ceil(64) * 64
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The steps saved in `dir` (a `model_<step>.pt` with its `meta_<step>.json`), ascending.
pub fn steps(dir: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name();
                    let digits = name.to_str()?.strip_prefix("model_")?.strip_suffix(".pt")?;
                    let step = digits
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                        .then(|| digits.parse::<u64>().ok())??;
                    dir.join(format!("meta_{digits}.json"))
                        .is_file()
                        .then_some(step)
                })
                .collect()
        })
        .unwrap_or_default();
    steps.sort_unstable();
    steps.dedup();
    steps
}

/// Whether `dir` is a nanochat checkpoint folder.
pub fn is_checkpoint_dir(dir: &Path) -> bool {
    dir.is_dir() && !steps(dir).is_empty()
}

/// A step as `--checkpoint` takes it: `step_002920`, `002920`, `2920` or `model_002920.pt`.
pub fn parse_step(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_prefix("step_").unwrap_or(s);
    let s = s
        .strip_prefix("model_")
        .and_then(|r| r.strip_suffix(".pt"))
        .unwrap_or(s);
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
        .then(|| s.parse().ok())
        .flatten()
}

/// The nanochat server's name of a step, `step_002920`.
pub fn step_label(step: u64) -> String {
    format!("step_{step:06}")
}

/// The file of `step` in `dir` (upstream writes six digits; a longer number is written whole).
fn step_file(dir: &Path, prefix: &str, step: u64, ext: &str) -> PathBuf {
    dir.join(format!("{prefix}_{step:06}.{ext}"))
}

/// A checkpoint's header: everything but the weights' numbers.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub step: u64,
    pub config: ModelConfig,
    pub info: TrainingInfo,
    /// The state dict's tensors (`_orig_mod.` removed).
    tensors: HashMap<String, TensorRef>,
    /// Upstream's patches for files older than today's model: name → constant value.
    patched: Vec<(String, f32)>,
    file: TorchFile,
}

impl Checkpoint {
    /// Opens step `step` of the folder `dir` and checks its tensors against its config.
    pub fn open(dir: &Path, step: u64) -> Result<Self> {
        let model_path = step_file(dir, "model", step, "pt");
        let meta_path = step_file(dir, "meta", step, "json");
        if !model_path.is_file() || !meta_path.is_file() {
            let have: Vec<String> = steps(dir).into_iter().map(step_label).collect();
            return Err(ModelError::NotFound(format!(
                "checkpoint {} in {} (it holds {})",
                step_label(step),
                dir.display(),
                if have.is_empty() {
                    "no model_<step>.pt with its meta_<step>.json".to_string()
                } else {
                    have.join(", ")
                }
            )));
        }
        let (config, info) = read_meta(&meta_path, step)?;
        let file = TorchFile::open(&model_path).map_err(|e| corrupt(&model_path, e))?;
        let p = &file.pickle;
        let items = match p.node(p.root) {
            Node::Dict(items) => items.clone(),
            // An OrderedDict with attributes (`_metadata`): a BUILD around the dict.
            Node::Build(obj, _) => p
                .dict(*obj)
                .or_else(|| match p.node(*obj) {
                    Node::Call(_, args) => p.items(*args)?.first().and_then(|d| p.dict(*d)),
                    _ => None,
                })
                .map(<[_]>::to_vec)
                .ok_or_else(|| corrupt(&model_path, "not a state dict"))?,
            _ => return Err(corrupt(&model_path, "not a state dict (a dict of tensors)")),
        };
        let mut tensors = HashMap::new();
        for (k, v) in items {
            let name = p
                .str(k)
                .ok_or_else(|| corrupt(&model_path, "a state-dict key that is not a string"))?;
            let name = name.strip_prefix("_orig_mod.").unwrap_or(name).to_string();
            let t = file
                .tensor_ref(v)
                .ok_or_else(|| corrupt(&model_path, format!("`{name}` is not a tensor")))?
                .map_err(|e| corrupt(&model_path, format!("`{name}`: {e}")))?;
            tensors.insert(name, t);
        }
        let mut patched = Vec::new();
        for (name, value) in [("resid_lambdas", 1.0), ("x0_lambdas", 0.0)] {
            if !tensors.contains_key(name) {
                patched.push((name.to_string(), value));
            }
        }
        check_tensors(&config, &tensors, &patched).map_err(|e| corrupt(&model_path, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            step,
            config,
            info,
            tensors,
            patched,
            file,
        })
    }

    /// Parameters as the model holds them (padding rows included, as upstream counts them).
    pub fn parameters(&self) -> u64 {
        let patched: u64 = self.patched.len() as u64 * self.config.n_layer as u64;
        self.tensors.values().map(|t| t.numel() as u64).sum::<u64>() + patched
    }

    /// The storage type of the token embedding (`F32`, `BF16`, `F16`).
    pub fn embedding_dtype(&self) -> Option<&'static str> {
        self.tensors
            .get("transformer.wte.weight")
            .map(|t| match t.storage_type.as_str() {
                "HalfStorage" => "F16",
                "BFloat16Storage" => "BF16",
                _ => "F32",
            })
    }

    /// The decoder config, `eos` its end-of-generation id.
    pub fn decoder_config(&self, eos: Option<u32>) -> Config {
        let c = &self.config;
        let mut family = arch::family(&c.window_pattern, c.sequence_len, c.n_layer);
        family.attn_scalar = Some(arch::attn_scalar(c.head_dim()));
        Config {
            hidden_size: c.n_embd,
            intermediate_size: 4 * c.n_embd,
            vocab_size: c.vocab_size,
            num_hidden_layers: c.n_layer,
            num_attention_heads: c.n_head,
            num_key_value_heads: Some(c.n_kv_head),
            head_dim: None,
            // F.rms_norm without eps: torch.finfo(float32).eps.
            rms_norm_eps: f64::from(f32::EPSILON),
            rope_theta: arch::ROPE_THETA,
            max_position_embeddings: c.sequence_len,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: eos.map(super::config::EosTokenId::One),
            rope_scaling: None,
            rope_freq_factors: None,
            unimplemented: Unimplemented::default(),
            family,
        }
    }

    /// The weights under the decoder's names (nanochat's own under `nanochat.`), tables and
    /// head cut to the vocabulary, and the parameter-free norms as weights of ones.
    pub fn decoder_tensors(&mut self) -> Result<HashMap<String, Tensor>> {
        let c = self.config.clone();
        let path = step_file(&self.dir, "model", self.step, "pt");
        let bad = |e: String| corrupt(&path, e);
        let mut cache = HashMap::new();
        let mut out = HashMap::new();
        let names: Vec<String> = self.tensors.keys().cloned().collect();
        for name in names {
            let t = &self.tensors[&name];
            let tensor = self
                .file
                .load(t, &mut cache)
                .map_err(|e| bad(format!("`{name}`: {e}")))?;
            let Some((to, cut)) = decoder_name(&name) else {
                return Err(bad(format!("unexpected tensor `{name}`")));
            };
            let tensor = match cut {
                true => tensor.narrow(0, 0, c.vocab_size)?,
                false => tensor,
            };
            out.insert(to, tensor);
        }
        for (name, value) in &self.patched {
            let t = Tensor::full(*value, c.n_layer, &Device::Cpu)?;
            out.insert(format!("nanochat.{name}"), t);
        }
        let ones = |n: usize| Tensor::ones(n, DType::F32, &Device::Cpu);
        out.insert("model.norm.weight".into(), ones(c.n_embd)?);
        for l in 0..c.n_layer {
            let m = format!("model.layers.{l}");
            for norm in ["input_layernorm", "post_attention_layernorm"] {
                out.insert(format!("{m}.{norm}.weight"), ones(c.n_embd)?);
            }
            for norm in ["q_norm", "k_norm"] {
                out.insert(format!("{m}.self_attn.{norm}.weight"), ones(c.head_dim())?);
            }
        }
        Ok(out)
    }
}

/// The decoder's name of a nanochat tensor, and whether its rows are cut to the vocabulary.
fn decoder_name(name: &str) -> Option<(String, bool)> {
    let rest = |prefix: &str| name.strip_prefix(prefix);
    if name == "transformer.wte.weight" {
        return Some(("model.embed_tokens.weight".into(), true));
    }
    if name == "lm_head.weight" {
        return Some(("lm_head.weight".into(), true));
    }
    if let Some(r) = rest("value_embeds.") {
        return Some((format!("nanochat.value_embeds.{r}"), true));
    }
    if let Some(r) = rest("transformer.h.") {
        let (layer, part) = r.split_once('.')?;
        let to = match part {
            "attn.c_q.weight" => "self_attn.q_proj.weight",
            "attn.c_k.weight" => "self_attn.k_proj.weight",
            "attn.c_v.weight" => "self_attn.v_proj.weight",
            "attn.c_proj.weight" => "self_attn.o_proj.weight",
            "mlp.c_fc.weight" => "mlp.up_proj.weight",
            "mlp.c_proj.weight" => "mlp.down_proj.weight",
            "attn.ve_gate.weight" => {
                return Some((format!("nanochat.ve_gate.{layer}.weight"), false))
            }
            _ => return None,
        };
        return Some((format!("model.layers.{layer}.{to}"), false));
    }
    match name {
        "resid_lambdas" | "x0_lambdas" | "smear_gate.weight" | "smear_lambda"
        | "backout_lambda" => Some((format!("nanochat.{name}"), false)),
        _ => None,
    }
}

/// Every tensor today's `GPT` has for `c`, with its shape.
fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, hd, v) = (c.n_embd, c.head_dim(), c.padded_vocab());
    let kv = c.n_kv_head * hd;
    let mut out = vec![
        ("transformer.wte.weight".to_string(), vec![v, h]),
        ("lm_head.weight".to_string(), vec![v, h]),
        ("resid_lambdas".to_string(), vec![c.n_layer]),
        ("x0_lambdas".to_string(), vec![c.n_layer]),
        (
            "smear_gate.weight".to_string(),
            vec![1, arch::SMEAR_CHANNELS],
        ),
        ("smear_lambda".to_string(), vec![1]),
        ("backout_lambda".to_string(), vec![1]),
    ];
    for l in 0..c.n_layer {
        let p = format!("transformer.h.{l}");
        out.extend([
            (format!("{p}.attn.c_q.weight"), vec![c.n_head * hd, h]),
            (format!("{p}.attn.c_k.weight"), vec![kv, h]),
            (format!("{p}.attn.c_v.weight"), vec![kv, h]),
            (format!("{p}.attn.c_proj.weight"), vec![h, h]),
            (format!("{p}.mlp.c_fc.weight"), vec![4 * h, h]),
            (format!("{p}.mlp.c_proj.weight"), vec![h, 4 * h]),
        ]);
        if arch::has_value_embedding(l, c.n_layer) {
            out.push((format!("value_embeds.{l}.weight"), vec![v, kv]));
            out.push((
                format!("{p}.attn.ve_gate.weight"),
                vec![c.n_kv_head, arch::VE_GATE_CHANNELS],
            ));
        }
    }
    out
}

fn check_tensors(
    c: &ModelConfig,
    tensors: &HashMap<String, TensorRef>,
    patched: &[(String, f32)],
) -> std::result::Result<(), String> {
    let expected = expected_tensors(c);
    let mut missing = Vec::new();
    for (name, shape) in &expected {
        if patched.iter().any(|(p, _)| p == name) {
            continue;
        }
        match tensors.get(name) {
            None => missing.push(name.clone()),
            Some(t) if &t.shape != shape => {
                return Err(format!(
                    "`{name}` has shape {:?}, but model_config (n_embd {}, n_head {}, n_kv_head {}, vocab_size {} padded to {}) makes it {shape:?}",
                    t.shape,
                    c.n_embd,
                    c.n_head,
                    c.n_kv_head,
                    c.vocab_size,
                    c.padded_vocab()
                ))
            }
            Some(_) => {}
        }
    }
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.iter().any(|(n, _)| n == *k))
        .collect();
    unexpected.sort();
    missing.sort();
    let list = |v: &[String]| {
        let shown: Vec<&str> = v.iter().take(5).map(String::as_str).collect();
        let more = v.len().saturating_sub(5);
        format!(
            "{}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    };
    if !missing.is_empty() {
        return Err(format!(
            "not today's nanochat model (gpt.py as of July 2026): missing {}",
            list(&missing)
        ));
    }
    if !unexpected.is_empty() {
        let names: Vec<String> = unexpected.into_iter().cloned().collect();
        return Err(format!(
            "tensors this nanochat model does not have: {}",
            list(&names)
        ));
    }
    Ok(())
}

/// `meta_<step>.json`: the model config (bounded) and what the run recorded.
fn read_meta(path: &Path, step: u64) -> Result<(ModelConfig, TrainingInfo)> {
    let bad = |r: String| corrupt(path, r);
    let len = std::fs::metadata(path)?.len();
    if len > 16 << 20 {
        return Err(bad(format!("{len} bytes (a meta file is a few kB)")));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(path)?).map_err(|e| bad(format!("not JSON: {e}")))?;
    let mc = json
        .get("model_config")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `model_config` object: not a nanochat meta file".into()))?;
    let int = |key: &str, max: usize| -> Result<usize> {
        let v = mc
            .get(key)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| bad(format!("model_config has no integer `{key}`")))?;
        usize::try_from(v)
            .ok()
            .filter(|&v| (1..=max).contains(&v))
            .ok_or_else(|| bad(format!("model_config.{key} = {v} (1 to {max})")))
    };
    let known = [
        "sequence_len",
        "vocab_size",
        "n_layer",
        "n_head",
        "n_kv_head",
        "n_embd",
        "window_pattern",
    ];
    if let Some(other) = mc.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(format!(
            "model_config sets `{other}`, which today's nanochat model does not have"
        )));
    }
    // Upstream's patch: files from before sliding windows attended to the whole context.
    let window_pattern = match mc.get("window_pattern") {
        None => "L".to_string(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| bad("model_config.window_pattern is not a string".into()))?
            .to_string(),
    };
    if window_pattern.is_empty()
        || window_pattern.len() > 64
        || !window_pattern.chars().all(|c| "SLsl".contains(c))
    {
        return Err(bad(format!(
            "model_config.window_pattern {window_pattern:?}: 1 to 64 of S and L"
        )));
    }
    let c = ModelConfig {
        sequence_len: int("sequence_len", 1 << 20)?,
        vocab_size: int("vocab_size", 1 << 22)?,
        n_layer: int("n_layer", 1024)?,
        n_head: int("n_head", 1024)?,
        n_kv_head: int("n_kv_head", 1024)?,
        n_embd: int("n_embd", 1 << 16)?,
        window_pattern,
    };
    if !c.n_embd.is_multiple_of(c.n_head)
        || !c.n_head.is_multiple_of(c.n_kv_head)
        || c.n_kv_head > c.n_head
        || !c.head_dim().is_multiple_of(2)
    {
        return Err(bad(format!(
            "n_embd {} / n_head {} / n_kv_head {}: the heads must divide n_embd into an even head size, and n_kv_head divide n_head",
            c.n_embd, c.n_head, c.n_kv_head
        )));
    }
    if c.n_embd < arch::SMEAR_CHANNELS {
        return Err(bad(format!(
            "n_embd {} is below the {} channels the smear gate reads",
            c.n_embd,
            arch::SMEAR_CHANNELS
        )));
    }
    let number = |key: &str| {
        json.get(key)
            .and_then(|v| v.as_f64())
            .filter(|v| v.is_finite())
    };
    let info = TrainingInfo {
        step: Some(json.get("step").and_then(|v| v.as_u64()).unwrap_or(step)),
        val_loss: number("val_loss"),
        val_bpb: number("val_bpb"),
        checkpoint: Some(step_label(step)),
        dataset: None,
    };
    Ok((c, info))
}

/// The most bytes a `tokenizer.pkl` may have (nanochat's 65,536-token one is about 1 MB).
const MAX_TOKENIZER_BYTES: u64 = 256 << 20;

/// Where nanochat keeps the tokenizer of the checkpoints in `dir`: beside them, or, in its
/// base-dir layout (`<base>/base_checkpoints/<tag>/`, `<base>/chatsft_checkpoints/<tag>/`),
/// in `<base>/tokenizer/`; then `$NANOCHAT_BASE_DIR/tokenizer/` and
/// `~/.cache/nanochat/tokenizer/`, where upstream's `get_tokenizer` reads it.
pub fn find_tokenizer(dir: &Path) -> std::result::Result<PathBuf, Vec<PathBuf>> {
    let mut candidates = vec![dir.join("tokenizer.pkl")];
    if let Some(base) = dir.parent().and_then(Path::parent) {
        candidates.push(base.join("tokenizer").join("tokenizer.pkl"));
    }
    if let Some(base) = std::env::var_os("NANOCHAT_BASE_DIR") {
        candidates.push(Path::new(&base).join("tokenizer").join("tokenizer.pkl"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cache/nanochat/tokenizer/tokenizer.pkl"));
    }
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Ok(p.clone()),
        None => Err(candidates),
    }
}

/// The tokenizer of the checkpoints in `dir`: `explicit` (`--tokenizer`: a `tokenizer.pkl` or
/// the folder holding one), else where [`find_tokenizer`] finds it.
pub fn tokenizer_for(dir: &Path, explicit: Option<&Path>) -> Result<TextTokenizer> {
    let path = match explicit {
        Some(p) if p.is_dir() => p.join("tokenizer.pkl"),
        Some(p) => p.to_path_buf(),
        None => find_tokenizer(dir).map_err(|looked| {
            let places: Vec<String> = looked.iter().map(|p| p.display().to_string()).collect();
            ModelError::NotFound(format!(
                "the tokenizer of {} (nanochat's tokenizer.pkl): looked in {}; pass --tokenizer",
                dir.display(),
                places.join(", ")
            ))
        })?,
    };
    read_tokenizer(&path)
}

/// A pickled `tiktoken.Encoding` (what nanochat's `RustBPETokenizer.save` writes), with
/// `<|bos|>` first in every encoding and `<|assistant_end|>` and `<|bos|>` ending generation
/// (nanochat's engine stops at either).
pub fn read_tokenizer(path: &Path) -> Result<TextTokenizer> {
    let bad = |r: String| corrupt(path, r);
    let len = std::fs::metadata(path)?.len();
    if len > MAX_TOKENIZER_BYTES {
        return Err(bad(format!("{len} bytes (at most {MAX_TOKENIZER_BYTES})")));
    }
    let data = std::fs::read(path)?;
    let p = Pickle::parse(&data, &[("tiktoken.core", "Encoding")])
        .map_err(|e| bad(format!("not a pickled tiktoken encoding: {e}")))?;
    // Encoding.__reduce_ex__: NEWOBJ of the class, then BUILD with __getstate__'s value.
    let Node::Build(obj, state) = p.node(p.root) else {
        return Err(bad("not a pickled tiktoken Encoding".into()));
    };
    let is_encoding = match p.node(*obj) {
        Node::Call(f, _) => p.global(*f) == Some(("tiktoken.core", "Encoding")),
        _ => false,
    };
    if !is_encoding {
        return Err(bad("not a pickled tiktoken Encoding".into()));
    }
    if let Some(name) = p.str(*state) {
        return Err(bad(format!(
            "it names tiktoken's registered encoding `{name}`, whose vocabulary is not in the file"
        )));
    }
    let field = |key: &str| {
        p.get(*state, key)
            .ok_or_else(|| bad(format!("the encoding has no `{key}`")))
    };
    let pat_str = p
        .str(field("pat_str")?)
        .ok_or_else(|| bad("pat_str is not a string".into()))?
        .to_string();
    let ranks_id = field("mergeable_ranks")?;
    let items = p
        .dict(ranks_id)
        .ok_or_else(|| bad("mergeable_ranks is not a dict".into()))?;
    let mut ranks = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let bytes = match p.node(k) {
            Node::Bytes(b) if !b.is_empty() => b.clone(),
            _ => return Err(bad("a mergeable_ranks key that is not bytes".into())),
        };
        let rank = p
            .int(v)
            .and_then(|r| u32::try_from(r).ok())
            .ok_or_else(|| bad("a rank that is not a small integer".into()))?;
        ranks.push((bytes, rank));
    }
    let mut ids: Vec<u32> = ranks.iter().map(|(_, r)| *r).collect();
    ids.sort_unstable();
    if ids.iter().enumerate().any(|(i, &r)| r as usize != i) {
        return Err(bad("the ranks are not 0..n, each once".into()));
    }
    if (0..=255u8).any(|b| !ranks.iter().any(|(t, _)| t.as_slice() == [b])) {
        return Err(bad(
            "not a byte-level encoding: a single byte is not a token".into(),
        ));
    }
    let mut specials = Vec::new();
    if let Some(items) = p.dict(field("special_tokens")?) {
        for &(k, v) in items {
            match (p.str(k), p.int(v).and_then(|i| u32::try_from(i).ok())) {
                (Some(name), Some(id)) => specials.push((name.to_string(), id)),
                _ => return Err(bad("a special token that is not text → id".into())),
            }
        }
    }
    let has = |name: &str| specials.iter().any(|(n, _)| n == name);
    let bos = has("<|bos|>").then_some("<|bos|>");
    let mut tk = TextTokenizer::tiktoken(&pat_str, &ranks, &specials, bos)
        .map_err(|e| bad(e.to_string()))?;
    let end: Vec<u32> = ["<|assistant_end|>", "<|bos|>"]
        .iter()
        .filter_map(|n| tk.token_to_id(n))
        .collect();
    tk.set_end_of_generation(end);
    if has("<|user_start|>") && has("<|assistant_start|>") {
        tk.set_chat_template(CHAT_TEMPLATE);
    }
    Ok(tk)
}

/// nanochat's `render_conversation` for text messages: `<|bos|>`, each user turn between
/// `<|user_start|>` and `<|user_end|>` (a system message joined to the first user turn with a
/// blank line, as upstream merges it), each assistant turn between `<|assistant_start|>` and
/// `<|assistant_end|>`; the generation prompt is `<|assistant_start|>`.
const CHAT_TEMPLATE: &str = "{{ bos_token }}{% set ns = namespace(system='') %}\
{% for m in messages %}{% if m.role == 'system' %}{% set ns.system = m.content + '\\n\\n' %}\
{% elif m.role == 'user' %}<|user_start|>{{ ns.system + m.content }}<|user_end|>{% set ns.system = '' %}\
{% elif m.role == 'assistant' %}<|assistant_start|>{{ m.content }}<|assistant_end|>{% endif %}{% endfor %}\
{% if add_generation_prompt %}<|assistant_start|>{% endif %}";
