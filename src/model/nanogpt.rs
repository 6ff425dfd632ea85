//! nanoGPT checkpoints: the `ckpt.pt` that karpathy/nanoGPT's `train.py` writes (`model_args`,
//! the `model` state dict — keys perhaps behind torch.compile's `_orig_mod.` —, `iter_num`,
//! `best_val_loss`, `config`), read with [`super::torch_file`] and run on the decoder as GPT-2
//! with nanoGPT's differences: the exact (erf) GELU of `nn.GELU()`, and with `bias=False` no
//! biases in the linears or LayerNorms (those load as zeros, which add exactly nothing).
//!
//! The tokenizer follows nanoGPT's `sample.py`: a character-level `meta.pkl` (`stoi`/`itos`)
//! beside the checkpoint, in `data/<dataset>/` of the run's nanoGPT folder, or given with
//! `--tokenizer`; otherwise GPT-2's BPE. nanoGPT pads GPT-2's 50,257 tokens to 50,304 rows for
//! speed: the padding rows are no tokens, so the embedding and head are cut to the tokenizer's
//! size and probabilities are over real tokens only (the logits are upstream's exactly).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use super::config::{Activation, Config, EosTokenId, Family, Unimplemented};
use super::error::{ModelError, Result};
use super::pickle::{Node, Pickle};
use super::torch_file::{TensorRef, TorchFile};
use super::TextTokenizer;

/// How these models are listed (`architecture`): GPT-2's layers, nanoGPT's file.
pub const ARCHITECTURE: &str = "nanogpt";

/// `model_args` as nanoGPT's `GPTConfig` holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelArgs {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub vocab_size: usize,
    pub bias: bool,
}

/// What the checkpoint says about its training (for `GET /models` and `GET /info`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainingInfo {
    pub step: Option<u64>,
    pub val_loss: Option<f64>,
    /// `config["dataset"]`: where nanoGPT's sample.py looks for `meta.pkl`.
    pub dataset: Option<String>,
    /// Validation bits per byte (what nanochat records instead of a loss).
    pub val_bpb: Option<f64>,
    /// The checkpoint's name where the format names its steps (nanochat: `step_002920`).
    pub checkpoint: Option<String>,
}

/// A checkpoint's header: everything but the weights' numbers.
pub struct Checkpoint {
    pub path: PathBuf,
    pub args: ModelArgs,
    pub info: TrainingInfo,
    /// The state dict's tensors by nanoGPT's names (`_orig_mod.` removed).
    pub tensors: HashMap<String, TensorRef>,
    file: TorchFile,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Checkpoint {
    /// Reads and checks the header: `model_args`, and a state dict with exactly the tensors
    /// (names and shapes) those arguments make.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = TorchFile::open(path).map_err(|e| corrupt(path, e))?;
        let p = &file.pickle;
        let root = p.root;
        let missing = |key: &str| corrupt(path, format!("not a nanoGPT checkpoint: no `{key}`"));
        let margs = p
            .get(root, "model_args")
            .ok_or_else(|| missing("model_args"))?;
        let arg = |key: &str, max: usize| -> Result<usize> {
            let v = p
                .get(margs, key)
                .and_then(|v| p.int(v))
                .ok_or_else(|| corrupt(path, format!("model_args has no integer `{key}`")))?;
            usize::try_from(v)
                .ok()
                .filter(|&v| (1..=max).contains(&v))
                .ok_or_else(|| corrupt(path, format!("model_args.{key} = {v} (1 to {max})")))
        };
        let args = ModelArgs {
            n_layer: arg("n_layer", 1024)?,
            n_head: arg("n_head", 1024)?,
            n_embd: arg("n_embd", 1 << 16)?,
            block_size: arg("block_size", 1 << 20)?,
            vocab_size: arg("vocab_size", 1 << 22)?,
            // GPTConfig's default.
            bias: match p.get(margs, "bias") {
                None => true,
                Some(v) => p
                    .bool(v)
                    .ok_or_else(|| corrupt(path, "model_args.bias is not a boolean"))?,
            },
        };
        if !args.n_embd.is_multiple_of(args.n_head) {
            return Err(corrupt(
                path,
                format!(
                    "n_embd {} is not a multiple of n_head {}",
                    args.n_embd, args.n_head
                ),
            ));
        }
        // A Python float, or (once a validation has run) a one-element tensor.
        let best = p.get(root, "best_val_loss");
        let val_float = best.and_then(|v| p.float(v));
        let val_tensor = best
            .and_then(|v| file.tensor_ref(v))
            .and_then(|t| t.ok())
            .filter(|t| t.numel() == 1);
        let mut info = TrainingInfo {
            step: p
                .get(root, "iter_num")
                .and_then(|v| p.int(v))
                .and_then(|v| u64::try_from(v).ok()),
            val_loss: val_float,
            dataset: p
                .get(root, "config")
                .and_then(|c| p.get(c, "dataset"))
                .and_then(|v| p.str(v))
                .map(str::to_string),
            ..TrainingInfo::default()
        };
        let model = p.get(root, "model").ok_or_else(|| missing("model"))?;
        let items = dict_items(p, model).ok_or_else(|| corrupt(path, "`model` is not a dict"))?;
        let mut tensors = HashMap::new();
        for &(k, v) in items {
            let name = p
                .str(k)
                .ok_or_else(|| corrupt(path, "a state-dict key that is not a string"))?;
            let name = name.strip_prefix("_orig_mod.").unwrap_or(name).to_string();
            let t = file
                .tensor_ref(v)
                .ok_or_else(|| corrupt(path, format!("`{name}` is not a tensor")))?
                .map_err(|e| corrupt(path, format!("`{name}`: {e}")))?;
            tensors.insert(name, t);
        }
        check_names_and_shapes(&args, &tensors).map_err(|e| corrupt(path, e))?;
        if let Some(t) = val_tensor {
            info.val_loss = file
                .load(&t, &mut HashMap::new())
                .ok()
                .and_then(|t| t.flatten_all().ok()?.to_vec1::<f32>().ok())
                // As the f32 prints (3.2875, not 3.2874999046325684).
                .and_then(|v| v.first().and_then(|x| x.to_string().parse().ok()));
        }
        info.val_loss = info.val_loss.filter(|v| v.is_finite());
        Ok(Self {
            path: path.to_path_buf(),
            args,
            info,
            tensors,
            file,
        })
    }

    /// Parameters as the model holds them (a tied head counted once).
    pub fn parameters(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|(n, _)| !(n.ends_with(".attn.bias") || self.tied() && *n == "lm_head.weight"))
            .map(|(_, t)| t.numel() as u64)
            .sum()
    }

    /// Whether the head is the token embedding (nanoGPT ties them; the state dict then names
    /// one storage twice).
    pub fn tied(&self) -> bool {
        self.tensors.get("lm_head.weight") == self.tensors.get("transformer.wte.weight")
    }

    /// The decoder config for a tokenizer of `tokens` tokens (the rows past it are padding).
    pub fn config(&self, tokens: usize, eos: Option<u32>) -> Config {
        let a = &self.args;
        Config {
            hidden_size: a.n_embd,
            intermediate_size: 4 * a.n_embd,
            vocab_size: tokens,
            num_hidden_layers: a.n_layer,
            num_attention_heads: a.n_head,
            num_key_value_heads: None,
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: a.block_size,
            tie_word_embeddings: self.tied(),
            bos_token_id: None,
            eos_token_id: eos.map(EosTokenId::One),
            rope_scaling: None,
            rope_freq_factors: None,
            unimplemented: Unimplemented::default(),
            family: Family {
                activation: Activation::GeluErf,
                ..Family::gpt2()
            },
        }
    }

    /// The weights under the decoder's names, the embedding and head cut to `tokens` rows.
    pub fn decoder_tensors(&mut self, tokens: usize) -> Result<HashMap<String, Tensor>> {
        let (c, bias, tied) = (self.args.n_embd, self.args.bias, self.tied());
        let path = self.path.clone();
        let bad = |e: String| corrupt(&path, e);
        // (nanoGPT's name, the decoder's, its bias length)
        let mut pairs = vec![("transformer.ln_f".to_string(), "model.norm".to_string(), c)];
        for l in 0..self.args.n_layer {
            let (h, m) = (format!("transformer.h.{l}"), format!("model.layers.{l}"));
            for (from, to, n) in [
                ("ln_1", "input_layernorm", c),
                ("ln_2", "post_attention_layernorm", c),
                ("attn.c_attn", "self_attn.qkv", 3 * c),
                ("attn.c_proj", "self_attn.o_proj", c),
                ("mlp.c_fc", "mlp.up_proj", 4 * c),
                ("mlp.c_proj", "mlp.down_proj", c),
            ] {
                pairs.push((format!("{h}.{from}"), format!("{m}.{to}"), n));
            }
        }
        let mut cache = HashMap::new();
        let mut read = |name: &str| -> Result<Tensor> {
            let t = self
                .tensors
                .get(name)
                .ok_or_else(|| bad(format!("no `{name}`")))?;
            self.file
                .load(t, &mut cache)
                .map_err(|e| bad(format!("`{name}`: {e}")))
        };
        let mut out = HashMap::new();
        let wte = read("transformer.wte.weight")?;
        out.insert(
            "model.embed_tokens.weight".into(),
            wte.narrow(0, 0, tokens)?,
        );
        out.insert(
            "model.embed_positions.weight".into(),
            read("transformer.wpe.weight")?,
        );
        if !tied {
            let head = read("lm_head.weight")?;
            out.insert("lm_head.weight".into(), head.narrow(0, 0, tokens)?);
        }
        for (from, to, n) in pairs {
            let weight = read(&format!("{from}.weight"))?;
            let b = if bias {
                read(&format!("{from}.bias"))?
            } else {
                Tensor::zeros(n, candle_core::DType::F32, &candle_core::Device::Cpu)?
            };
            let Some(m) = to.strip_suffix(".qkv") else {
                out.insert(format!("{to}.weight"), weight);
                out.insert(format!("{to}.bias"), b);
                continue;
            };
            // q, k, v = c_attn(x).split(n_embd, dim=2)
            for (i, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                out.insert(
                    format!("{m}.{proj}.weight"),
                    weight.narrow(0, i * c, c)?.contiguous()?,
                );
                out.insert(
                    format!("{m}.{proj}.bias"),
                    b.narrow(0, i * c, c)?.contiguous()?,
                );
            }
        }
        Ok(out)
    }
}

/// A dict's items, through an `OrderedDict` that carried attributes (`_metadata`: a BUILD).
fn dict_items(p: &Pickle, id: usize) -> Option<&[(usize, usize)]> {
    match p.node(id) {
        Node::Build(obj, _) => p.dict(*obj),
        _ => p.dict(id),
    }
}

/// The tensors `args` make, by name and shape; anything else in the state dict is refused.
fn check_names_and_shapes(
    a: &ModelArgs,
    tensors: &HashMap<String, TensorRef>,
) -> std::result::Result<(), String> {
    let (c, v, b) = (a.n_embd, a.vocab_size, a.block_size);
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("transformer.wte.weight".into(), vec![v, c]),
        ("transformer.wpe.weight".into(), vec![b, c]),
        ("transformer.ln_f.weight".into(), vec![c]),
        ("lm_head.weight".into(), vec![v, c]),
    ];
    let mut biases = vec![("transformer.ln_f.bias".to_string(), vec![c])];
    for l in 0..a.n_layer {
        let h = format!("transformer.h.{l}");
        for (name, w, bias) in [
            ("ln_1", vec![c], c),
            ("attn.c_attn", vec![3 * c, c], 3 * c),
            ("attn.c_proj", vec![c, c], c),
            ("ln_2", vec![c], c),
            ("mlp.c_fc", vec![4 * c, c], 4 * c),
            ("mlp.c_proj", vec![c, 4 * c], c),
        ] {
            want.push((format!("{h}.{name}.weight"), w));
            biases.push((format!("{h}.{name}.bias"), vec![bias]));
        }
    }
    if a.bias {
        want.extend(biases);
    }
    for (name, shape) in &want {
        match tensors.get(name) {
            None => {
                return Err(format!(
                    "the state dict has no `{name}`, which model_args (n_layer {}, bias {}) need",
                    a.n_layer,
                    if a.bias { "True" } else { "False" }
                ))
            }
            Some(t) if &t.shape != shape => {
                return Err(format!(
                    "`{name}` has shape {:?}, model_args make it {shape:?}",
                    t.shape
                ))
            }
            Some(_) => {}
        }
    }
    let known: std::collections::HashSet<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    let mut unknown: Vec<&str> = tensors
        .keys()
        .map(String::as_str)
        // The causal mask buffer of nanoGPT's attention without flash attention.
        .filter(|n| {
            !(known.contains(n) || n.starts_with("transformer.h.") && n.ends_with(".attn.bias"))
        })
        .collect();
    unknown.sort();
    if let Some(first) = unknown.first() {
        return Err(format!(
            "the state dict has {} tensor(s) a nanoGPT model with these model_args does not, e.g. `{first}`{}",
            unknown.len(),
            if a.bias { "" } else { " (bias=False, yet a bias is present?)" }
        ));
    }
    Ok(())
}

/// Where nanoGPT's sample.py would find the run's `meta.pkl`: beside the checkpoint, or in
/// `data/<dataset>/` of the nanoGPT folder (the checkpoint's `out*/` folder's parent, or the
/// working directory).
pub fn find_meta(ckpt: &Path, dataset: Option<&str>) -> Option<PathBuf> {
    let dir = ckpt.parent()?;
    let mut candidates = vec![dir.join("meta.pkl")];
    if let Some(ds) = dataset.filter(|d| !d.contains("..") && !d.starts_with('/')) {
        if let Some(root) = dir.parent() {
            candidates.push(root.join("data").join(ds).join("meta.pkl"));
        }
        candidates.push(Path::new("data").join(ds).join("meta.pkl"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// A character-level tokenizer from a nanoGPT `meta.pkl` (`{'vocab_size', 'itos', 'stoi'}`).
pub fn char_tokenizer(meta: &Path) -> Result<TextTokenizer> {
    let bad = |r: String| corrupt(meta, r);
    let len = std::fs::metadata(meta)?.len();
    if len > 64 << 20 {
        return Err(bad(format!("{len} bytes (a meta.pkl is a few kB)")));
    }
    let data = std::fs::read(meta)?;
    let p = Pickle::parse(&data, &[]).map_err(|e| bad(e.to_string()))?;
    let itos = p
        .get(p.root, "itos")
        .and_then(|d| p.dict(d))
        .ok_or_else(|| bad("no `itos` dict: not a character-level meta.pkl".into()))?;
    let mut chars: Vec<(u32, String)> = Vec::with_capacity(itos.len());
    for &(k, v) in itos {
        let id = p.int(k).and_then(|i| u32::try_from(i).ok());
        let s = p.str(v);
        match (id, s) {
            (Some(id), Some(s)) if s.chars().count() == 1 => chars.push((id, s.to_string())),
            _ => {
                return Err(bad(
                    "itos maps an id to something that is not one character".into(),
                ))
            }
        }
    }
    TextTokenizer::from_chars(chars).map_err(|e| bad(e.to_string()))
}

/// The tokenizer a checkpoint runs with: `explicit` (`--tokenizer`: a `meta.pkl`, a
/// `tokenizer.json`, or a folder of GPT-2's `encoder.json` + `vocab.bpe` or `vocab.json` +
/// `merges.txt`), else a `meta.pkl` where nanoGPT's sample.py looks, else GPT-2's BPE as
/// `./scripts/setup.sh` installs it (`models/gpt2-tokenizer/`).
pub fn tokenizer_for(ck: &Checkpoint, explicit: Option<&Path>) -> Result<TextTokenizer> {
    if let Some(path) = explicit {
        return tokenizer_at(path);
    }
    if let Some(meta) = find_meta(&ck.path, ck.info.dataset.as_deref()) {
        return char_tokenizer(&meta);
    }
    let installed = super::find_installed_file(
        &Path::new("models")
            .join(GPT2_TOKENIZER_DIR)
            .join("encoder.json"),
    );
    match installed {
        Some(encoder) => tokenizer_at(encoder.parent().unwrap_or(Path::new("."))),
        None => Err(ModelError::NotFound(format!(
            "a tokenizer for {}: no meta.pkl beside it (a character-level run) and GPT-2's BPE is not installed \
             (models/{GPT2_TOKENIZER_DIR}/: run ./scripts/setup.sh, or pass --tokenizer)",
            ck.path.display()
        ))),
    }
}

/// The folder under `models/` that holds GPT-2's `encoder.json` and `vocab.bpe`.
pub const GPT2_TOKENIZER_DIR: &str = "gpt2-tokenizer";

fn tokenizer_at(path: &Path) -> Result<TextTokenizer> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "pkl") {
            return char_tokenizer(path);
        }
        return TextTokenizer::from_file(path, 0);
    }
    for (vocab, merges) in [("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt")] {
        let (v, m) = (path.join(vocab), path.join(merges));
        if v.is_file() && m.is_file() {
            return TextTokenizer::gpt2_bpe(&v, &m);
        }
    }
    for (name, is_meta) in [("meta.pkl", true), ("tokenizer.json", false)] {
        let p = path.join(name);
        if p.is_file() {
            return if is_meta {
                char_tokenizer(&p)
            } else {
                TextTokenizer::from_file(&p, 0)
            };
        }
    }
    Err(ModelError::NotFound(format!(
        "a tokenizer in {}: expected meta.pkl, tokenizer.json, encoder.json + vocab.bpe, or vocab.json + merges.txt",
        path.display()
    )))
}
