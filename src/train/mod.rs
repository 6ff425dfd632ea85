//! `tokenscope train`: fine-tunes (or trains from scratch) the model core's own llama through its
//! differentiable path, and writes a Hugging Face directory that `serve`/`inspect` load as-is.

pub mod checkpoint;
pub mod data;
pub mod jobs;
pub mod lora;
pub mod memory;
pub mod optim;

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::model::{
    self, gguf::GgufFile, gguf::PackedWeights, hf_dir, Config, Decoder, ModelError, ModelSource,
    TextTokenizer,
};
use checkpoint::TrainState;
use optim::{AdamW, AdamWParams};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("data: {0}")]
    Data(String),
    #[error("invalid settings: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Every training setting (the CLI maps its flags onto this).
#[derive(Debug, Clone, Serialize)]
pub struct TrainOptions {
    pub model: Option<String>,
    pub data: Option<PathBuf>,
    pub output: PathBuf,
    pub steps: Option<usize>,
    pub epochs: Option<f64>,
    pub batch_size: usize,
    pub seq_len: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub clip: f64,
    pub eval_every: usize,
    pub eval_fraction: f64,
    pub max_eval_windows: usize,
    pub save_every: usize,
    pub resume: bool,
    pub seed: u64,
    pub device: String,
    pub dtype: String,
    pub from_scratch: bool,
    /// With `from_scratch` and a named config (tiny, small): the family (default llama).
    pub arch: Option<String>,
    pub config: Option<String>,
    /// Stop (with a checkpoint) after this many steps in this run, as an interruption would.
    pub stop_after: Option<usize>,
    pub progress: bool,
    /// Measure only: no evaluation, no files; prints the time split of a step.
    pub bench: bool,
    /// Train a LoRA adapter (the base frozen) instead of every weight.
    pub lora: Option<lora::LoraOptions>,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            model: None,
            data: None,
            output: PathBuf::from("trained"),
            steps: None,
            epochs: None,
            batch_size: 4,
            seq_len: 256,
            grad_accum: 1,
            lr: 1e-4,
            warmup: 10,
            weight_decay: 0.0,
            clip: 1.0,
            eval_every: 50,
            eval_fraction: 0.05,
            max_eval_windows: 64,
            save_every: 0,
            resume: false,
            seed: 0,
            device: "auto".into(),
            dtype: "f32".into(),
            from_scratch: false,
            arch: None,
            config: None,
            stop_after: None,
            progress: true,
            bench: false,
            lora: None,
        }
    }
}

/// What a run did (for tests and the final message).
#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    pub steps_done: usize,
    pub total_steps: usize,
    pub losses: Vec<(usize, f64)>,
    pub evals: Vec<(usize, f64)>,
    pub interrupted: bool,
    pub seconds: f64,
    pub output: PathBuf,
    /// Per step: forward, backward and optimizer seconds, and tokens/s.
    pub timings: Vec<(f64, f64, f64, f64)>,
}

/// One optimizer step, as an observer sees it.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub seconds: f64,
}

/// Who watches a run: the terminal (progress bar, Ctrl-C) or a training job (the database).
pub trait TrainObserver {
    /// After every optimizer step.
    fn step(&self, _report: &StepReport) {}
    /// Once the data is tokenized: its training windows and the steps the run makes.
    fn data(&self, _train_windows: usize, _total_steps: usize) {}
    /// After every evaluation.
    fn eval(&self, _step: usize, _loss: f64) {}
    /// Checked after every step: true stops the run with a checkpoint, as Ctrl-C does.
    fn should_stop(&self) -> bool {
        false
    }
    /// A line of news ("resuming from …", "eval @ step …").
    fn say(&self, message: &str) {
        eprintln!("{message}");
    }
    /// Whether the run owns the terminal: a progress bar, and Ctrl-C stops it.
    fn console(&self) -> bool {
        true
    }
}

/// The terminal: what `tokenscope train` uses.
pub struct Console;
impl TrainObserver for Console {}

/// Set by Ctrl-C: the loop checkpoints and stops at the next step boundary.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

fn validate(o: &TrainOptions) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Config(m.into()));
    if o.batch_size == 0 {
        return bad("--batch-size must be at least 1");
    }
    if o.seq_len < 2 {
        return bad("--seq-len must be at least 2");
    }
    if o.grad_accum == 0 {
        return bad("--grad-accum must be at least 1");
    }
    if !(o.lr > 0.0 && o.lr.is_finite()) {
        return bad("--lr must be a positive number");
    }
    if !(0.0..1.0).contains(&o.eval_fraction) {
        return bad("--eval-fraction must be in [0, 1)");
    }
    if o.weight_decay < 0.0 || o.clip < 0.0 {
        return bad("--weight-decay and --clip must not be negative");
    }
    if o.steps.is_some() && o.epochs.is_some() {
        return bad("give --steps or --epochs, not both");
    }
    if let Some(e) = o.epochs {
        if !(e > 0.0 && e.is_finite()) {
            return bad("--epochs must be positive");
        }
    }
    if o.data.is_none() && o.steps != Some(0) {
        return bad("--data is required (only --steps 0, the conversion mode, runs without data)");
    }
    if o.config.is_some() && !o.from_scratch {
        return bad("--config only applies with --from-scratch");
    }
    if o.arch.is_some() && !o.from_scratch {
        return bad("--arch only applies with --from-scratch");
    }
    if o.lora.is_some() && o.from_scratch {
        return bad("--lora-r adapts a trained model; it does not apply with --from-scratch");
    }
    Ok(())
}

/// The starting weights (f32, HF names), config and tokenizer.
/// The starting point of a run: config, tokenizer, the weights (f32, HF names), the weights
/// kept packed (a LoRA run on a GGUF base in f32 on the CPU keeps its frozen base in the
/// file's blocks, QLoRA-style, where `keep_packed`), and the source's name.
type Start = (
    Config,
    TextTokenizer,
    HashMap<String, Tensor>,
    PackedWeights,
    String,
);

fn starting_point(
    o: &TrainOptions,
    device: &Device,
    keep_packed: bool,
) -> Result<Start, TrainError> {
    let source = model::resolve_source(o.model.as_deref())?;
    let name = source.display_name();
    let dir = match &source {
        ModelSource::Hub { repo, revision } => Some(model::source::resolve_hub(repo, revision)?),
        ModelSource::HfDir(d) => Some(d.clone()),
        ModelSource::Gguf(_) | ModelSource::NanoGpt(_) => None,
        ModelSource::Nanochat { dir, .. } => {
            return Err(TrainError::Config(format!(
                "{} is a nanochat checkpoint: training one is not supported (its value \
                 embeddings, smear and backout have no Hugging Face form to write the result \
                 in); serve and inspect work",
                dir.display()
            )))
        }
        ModelSource::Adapter { dir, .. } => {
            return Err(TrainError::Config(format!(
                "{} is a LoRA adapter: train from its base model instead",
                dir.display()
            )))
        }
    };
    // Checked before any weight is read (a refusal should not first load gigabytes).
    let refuse_untrainable = |cfg: &Config| {
        // The result of a fine-tune is a Hugging Face directory of the same family.
        if o.from_scratch || cfg.family.arch.hf_model_type().is_some() {
            return Ok(());
        }
        Err(TrainError::Config(format!(
            "training {} models is not supported yet (its Hugging Face directory cannot be \
             written; `--from-scratch` trains a new model with this tokenizer); serve and \
             inspect work",
            cfg.family.arch.name()
        )))
    };
    let (mut cfg, tokenizer, mut tensors, packed) = match (&source, dir) {
        (ModelSource::Gguf(path), _) => {
            let mut file = GgufFile::open(path)?;
            let mut cfg = file.config()?;
            refuse_untrainable(&cfg)?;
            let tk = TextTokenizer::from_gguf(file.metadata())?;
            // The converted directory stops where the GGUF model stops.
            let eos = model::gguf_eos_ids(&cfg, file.metadata(), &tk);
            cfg.eos_token_id = match eos.as_slice() {
                [] => None,
                [one] => Some(model::EosTokenId::One(*one)),
                many => Some(model::EosTokenId::Many(many.to_vec())),
            };
            let (tensors, packed) = if o.from_scratch {
                (HashMap::new(), PackedWeights::new())
            } else if keep_packed {
                file.tensors_with_packed(&cfg, device)?
            } else {
                (
                    file.tensors(&cfg, DType::F32, device, false)?.0,
                    PackedWeights::new(),
                )
            };
            (cfg, tk, tensors, packed)
        }
        // A nanoGPT run trains on as the GPT-2 it is (exact GELU; a bias-free run's biases
        // start at zero and train), and is written as a Hugging Face GPT-2 directory.
        (ModelSource::NanoGpt(path), _) => {
            let mut ck = model::nanogpt::Checkpoint::open(path)?;
            let tk = model::nanogpt::tokenizer_for(&ck, None)?;
            let tokens = tk.vocab_size();
            let cfg = ck.config(tokens, tk.info.eos_token_id);
            refuse_untrainable(&cfg)?;
            let tensors = if o.from_scratch {
                HashMap::new()
            } else {
                ck.decoder_tensors(tokens)?
            };
            (cfg, tk, tensors, PackedWeights::new())
        }
        (_, Some(dir)) => {
            let parts = hf_dir::inspect(&dir)?;
            refuse_untrainable(&parts.config)?;
            let tk = TextTokenizer::from_file(&parts.tokenizer, parts.config.vocab_size)?;
            let mut tensors = HashMap::new();
            if !o.from_scratch {
                for f in &parts.weights {
                    for (k, t) in candle_core::safetensors::load(f, device)? {
                        tensors.insert(k, t.to_dtype(DType::F32)?);
                    }
                }
                tensors = hf_dir::to_decoder(&parts.config, tensors)?;
            }
            (parts.config, tk, tensors, PackedWeights::new())
        }
        _ => unreachable!("every source kind is covered above"),
    };
    if o.from_scratch {
        let vocab = tokenizer.vocab_size();
        let arch = o.arch.as_deref().unwrap_or(model::family::DEFAULT.name());
        let mut fresh = match o.config.as_deref().unwrap_or("tiny") {
            "tiny" => Config::tiny_of(arch, vocab).map_err(TrainError::Config)?,
            "small" => Config::small_of(arch, vocab).map_err(TrainError::Config)?,
            file => {
                let raw = std::fs::read_to_string(file)
                    .map_err(|e| TrainError::Config(format!("--config {file}: {e}")))?;
                serde_json::from_str::<Config>(&raw)
                    .map_err(|e| TrainError::Config(format!("--config {file}: {e}")))?
            }
        };
        if fresh.vocab_size < vocab {
            return Err(TrainError::Config(format!(
                "the config's vocab_size ({}) is smaller than the tokenizer's ({vocab})",
                fresh.vocab_size
            )));
        }
        fresh.validate().map_err(TrainError::Config)?;
        fresh.bos_token_id = cfg.bos_token_id;
        fresh.eos_token_id = cfg.eos_token_id.clone();
        cfg = fresh;
        tensors = model::init::random_weights(&cfg, o.seed, device)?;
    }
    if cfg.tie_word_embeddings {
        tensors.remove("lm_head.weight");
    } else if !tensors.contains_key("lm_head.weight") && !packed.contains_key("lm_head.weight") {
        // A checkpoint without a head ties it to the embeddings.
        cfg.tie_word_embeddings = true;
    }
    Ok((cfg, tokenizer, tensors, packed, name))
}

fn resolve_device(o: &TrainOptions) -> Result<(Device, DType), TrainError> {
    let device: model::DeviceChoice = o.device.parse().map_err(TrainError::Config)?;
    let device = device.resolve()?;
    let dtype = match o.dtype.as_str() {
        // `auto` (also what a shared TOKENSCOPE_DTYPE=auto means for serve) trains in f32.
        "f32" | "auto" => DType::F32,
        "bf16" if device.is_cuda() => DType::BF16,
        "bf16" => {
            return Err(TrainError::Config(
                "bf16 training needs a GPU (--device cuda); use f32 on CPU".into(),
            ))
        }
        other => {
            return Err(TrainError::Config(format!(
                "--dtype {other}: expected f32 or bf16"
            )))
        }
    };
    Ok((device, dtype))
}

struct Batcher<'a> {
    windows: &'a [Vec<u32>],
    seed: u64,
    epoch: Option<(usize, Vec<usize>)>,
}

impl<'a> Batcher<'a> {
    /// The window at global position `index`: each epoch is a seeded permutation.
    fn window(&mut self, index: usize) -> &'a [u32] {
        let n = self.windows.len();
        let epoch = index / n;
        if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(
                self.seed.wrapping_add(epoch as u64 * 0x9E37_79B9),
            );
            perm.shuffle(&mut rng);
            self.epoch = Some((epoch, perm));
        }
        let perm = &self.epoch.as_ref().map(|e| &e.1).expect("set above");
        &self.windows[perm[index % n]]
    }

    fn batch(
        &mut self,
        start: usize,
        size: usize,
        device: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let rows: Vec<&[u32]> = (start..start + size).map(|i| self.window(i)).collect();
        xy(&rows, device)
    }
}

/// Inputs (all but the last token) and targets (all but the first) of windows.
fn xy(rows: &[&[u32]], device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let t = rows[0].len() - 1;
    let x: Vec<u32> = rows.iter().flat_map(|r| r[..t].iter().copied()).collect();
    let y: Vec<u32> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
    Ok((
        Tensor::from_vec(x, (rows.len(), t), device)?,
        Tensor::from_vec(y, (rows.len(), t), device)?,
    ))
}

/// Mean next-token cross-entropy over every position.
pub fn loss(model: &Decoder, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    let logits = model.forward_train(x)?.to_dtype(DType::F32)?;
    let (b, t, v) = logits.dims3()?;
    candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &y.reshape(b * t)?)
}

fn evaluate(
    model: &Decoder,
    eval: &[Vec<u32>],
    batch: usize,
    device: &Device,
) -> candle_core::Result<f64> {
    let mut total = 0f64;
    let mut count = 0usize;
    for chunk in eval.chunks(batch) {
        let rows: Vec<&[u32]> = chunk.iter().map(|w| w.as_slice()).collect();
        let (x, y) = xy(&rows, device)?;
        let l = loss(model, &x, &y)?.to_scalar::<f32>()? as f64;
        total += l * chunk.len() as f64;
        count += chunk.len();
    }
    Ok(if count == 0 {
        f64::NAN
    } else {
        total / count as f64
    })
}

struct Log {
    file: std::fs::File,
}

impl Log {
    fn record(&mut self, v: serde_json::Value) -> Result<(), TrainError> {
        writeln!(self.file, "{v}")?;
        Ok(())
    }
}

/// Runs training as configured, on the terminal.
pub fn run(o: &TrainOptions) -> Result<TrainSummary, TrainError> {
    run_observed(o, &Console)
}

/// Runs training as configured, reporting to `observer`.
pub fn run_observed(
    o: &TrainOptions,
    observer: &dyn TrainObserver,
) -> Result<TrainSummary, TrainError> {
    validate(o)?;
    let started = Instant::now();
    let (device, dtype) = resolve_device(o)?;
    let keep_packed =
        o.lora.is_some() && device.is_cpu() && dtype == DType::F32 && !model::dense_only();
    let (cfg, tokenizer, mut tensors, packed, base_name) = starting_point(o, &device, keep_packed)?;
    if let Some(l) = &o.lora {
        lora::check(l, &cfg)
            .map_err(|(field, msg)| TrainError::Config(format!("LoRA {field}: {msg}")))?;
    }
    // A LoRA run's checkpoints hold the adapter only; the base is read from its source.
    let mut adapter_weights = None;

    // Data first: bad data fails before any compute.
    let dataset = match &o.data {
        Some(path) => {
            let separator = tokenizer
                .token_to_id("<|endoftext|>")
                .or_else(|| {
                    cfg.eos_token_id
                        .as_ref()
                        .and_then(|e| e.ids().first().copied())
                })
                .unwrap_or(0);
            let seq_len = o.seq_len.min(cfg.max_position_embeddings);
            let mut d = data::build(path, &tokenizer, separator, seq_len, o.eval_fraction)?;
            d.eval.truncate(o.max_eval_windows.max(1));
            Some(d)
        }
        None => None,
    };
    let per_step = o.batch_size * o.grad_accum;
    let total_steps = match (o.steps, o.epochs, &dataset) {
        (Some(s), _, _) => s,
        (None, Some(e), Some(d)) => ((d.train.len() as f64 * e) / per_step as f64).ceil() as usize,
        (None, None, Some(d)) => d.train.len().div_ceil(per_step).max(1),
        _ => 0,
    };
    if let Some(d) = &dataset {
        observer.data(d.train.len(), total_steps);
    }

    std::fs::create_dir_all(&o.output)?;
    let mut state = TrainState {
        step: 0,
        consumed: 0,
        seed: o.seed,
        total_steps,
    };
    let mut opt_state = None;
    if o.resume {
        match checkpoint::load_latest(&o.output, &device)? {
            Some(ck) => {
                if ck.state.total_steps != total_steps || ck.state.seed != o.seed {
                    return Err(TrainError::Config(format!(
                        "{} was made with {} total steps and seed {}; resume with the same settings",
                        ck.dir.display(),
                        ck.state.total_steps,
                        ck.state.seed
                    )));
                }
                observer.say(&format!(
                    "resuming from {} (step {})",
                    ck.dir.display(),
                    ck.state.step
                ));
                if o.lora.is_some() {
                    adapter_weights = Some(ck.weights);
                } else {
                    tensors = ck.weights;
                }
                opt_state = Some(ck.optimizer);
                state = ck.state;
            }
            None => observer.say(&format!(
                "--resume: no checkpoint in {}; starting fresh",
                o.output.display()
            )),
        }
    }

    let dropout = o
        .lora
        .as_ref()
        .map(|l| lora::DropoutKey::new(l.dropout, o.seed));
    let (lm, named) = match &o.lora {
        None => trainable(&cfg, tensors, dtype, &device),
        Some(l) => {
            let adapter = match adapter_weights {
                Some(w) => w,
                None => lora::init(l, &cfg, o.seed, &device)?,
            };
            trainable_lora(
                &cfg,
                (tensors, packed),
                adapter,
                l,
                dropout.as_ref(),
                dtype,
                &device,
            )
        }
    }
    .map_err(|e| TrainError::Config(format!("the weights do not fit the config: {e}")))?;
    let mut opt = AdamW::new(
        &named,
        AdamWParams {
            weight_decay: o.weight_decay,
            ..Default::default()
        },
    )?;
    if let Some(s) = &opt_state {
        opt.load_state(s, state.step)?;
    }

    let mut log = Log {
        file: std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(o.output.join("train_log.jsonl"))?,
    };
    let config_record = serde_json::json!({
        "settings": o,
        "base_model": base_name,
        "model_config": cfg,
        "device": format!("{:?}", device.location()),
        "dtype": model::dtype_name(dtype),
        "data": dataset.as_ref().map(|d| serde_json::json!({
            "files": d.files,
            "sha256": d.sha256,
            "documents": d.documents,
            "tokens": d.total_tokens,
            "train_windows": d.train.len(),
            "eval_windows": d.eval.len(),
            "window_tokens": d.train.first().map(|w| w.len()),
        })),
        "total_steps": total_steps,
        "parameters": named.iter().map(|(_, v)| v.elem_count()).sum::<usize>(),
    });
    std::fs::write(
        o.output.join("train_config.json"),
        serde_json::to_string_pretty(&config_record).unwrap_or_default() + "\n",
    )?;

    if observer.console() {
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
        INTERRUPTED.store(false, Ordering::SeqCst);
    }

    let mut summary = TrainSummary {
        total_steps,
        output: o.output.clone(),
        ..Default::default()
    };
    let eval_now =
        |step: usize, log: &mut Log, summary: &mut TrainSummary| -> Result<(), TrainError> {
            if let Some(d) = &dataset {
                if !d.eval.is_empty() {
                    if let Some(k) = &dropout {
                        k.off();
                    }
                    let l = evaluate(&lm, &d.eval, o.batch_size, &device)?;
                    log.record(
                    serde_json::json!({"step": step, "eval_loss": l, "eval_perplexity": l.exp()}),
                )?;
                    observer.say(&format!(
                        "eval @ step {step}: loss {l:.4}, perplexity {:.2}",
                        l.exp()
                    ));
                    observer.eval(step, l);
                    summary.evals.push((step, l));
                }
            }
            Ok(())
        };
    if !o.bench {
        eval_now(state.step, &mut log, &mut summary)?;
    }

    let bar = progress_bar(o.progress && observer.console(), total_steps, state.step);
    let save_checkpoint = |state: &TrainState, opt: &AdamW| -> Result<PathBuf, TrainError> {
        let weights: HashMap<String, Tensor> = named
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::save(&o.output, state, &weights, &opt.state()?)
    };
    let mut batcher = dataset.as_ref().map(|d| Batcher {
        windows: &d.train,
        seed: o.seed,
        epoch: None,
    });
    let tokens_per_step = per_step * (o.seq_len.min(cfg.max_position_embeddings));
    let mut steps_this_run = 0usize;
    while state.step < total_steps {
        let Some(batcher) = batcher.as_mut() else {
            break;
        };
        let t0 = Instant::now();
        let lr = optim::learning_rate(state.step, o.warmup, total_steps, o.lr);
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut step_loss = 0f64;
        let (mut fwd_s, mut bwd_s) = (0f64, 0f64);
        for micro in 0..o.grad_accum {
            if let Some(k) = &dropout {
                k.train(state.step, micro);
            }
            let (x, y) = batcher.batch(state.consumed, o.batch_size, &device)?;
            state.consumed += o.batch_size;
            let tf = Instant::now();
            let l = loss(&lm, &x, &y)?;
            step_loss += l.to_scalar::<f32>()? as f64 / o.grad_accum as f64;
            fwd_s += tf.elapsed().as_secs_f64();
            let tb = Instant::now();
            let store = (l / o.grad_accum as f64)?.backward()?;
            bwd_s += tb.elapsed().as_secs_f64();
            let mut pass = optim::collect_grads(&named, &store);
            // Checkpointed layers' variables got theirs in their own backward passes.
            if let Some(sink) = lm.grad_sink() {
                for (var, g) in sink.drain() {
                    if let Some((n, _)) = named.iter().find(|(_, v)| v.as_tensor().id() == var.id())
                    {
                        let g = match pass.remove(n) {
                            Some(acc) => (acc + g)?,
                            None => g,
                        };
                        pass.insert(n.clone(), g);
                    }
                }
            }
            for (n, g) in pass {
                let g = match grads.remove(&n) {
                    Some(acc) => (acc + g)?,
                    None => g,
                };
                grads.insert(n, g);
            }
        }
        let to = Instant::now();
        let grad_norm = optim::clip_grad_norm(&mut grads, o.clip)?;
        opt.step(&grads, lr)?;
        let opt_s = to.elapsed().as_secs_f64();
        state.step += 1;
        steps_this_run += 1;
        let secs = t0.elapsed().as_secs_f64();
        let tps = tokens_per_step as f64 / secs;
        log.record(serde_json::json!({
            "step": state.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tps, "seconds": secs,
            "forward_s": fwd_s, "backward_s": bwd_s, "optimizer_s": opt_s,
        }))?;
        observer.step(&StepReport {
            step: state.step,
            total_steps,
            loss: step_loss,
            lr,
            tokens_per_s: tps,
            seconds: secs,
        });
        summary.timings.push((fwd_s, bwd_s, opt_s, tps));
        summary.losses.push((state.step, step_loss));
        bar.set_position(state.step as u64);
        bar.set_message(format!(
            "loss {step_loss:.4} · lr {lr:.2e} · {tps:.0} tok/s"
        ));

        if !o.bench
            && o.eval_every > 0
            && state.step.is_multiple_of(o.eval_every)
            && state.step < total_steps
        {
            bar.suspend(|| eval_now(state.step, &mut log, &mut summary))?;
        }
        let interrupted = (observer.console() && INTERRUPTED.load(Ordering::SeqCst))
            || observer.should_stop()
            || o.stop_after
                .is_some_and(|n| steps_this_run >= n && state.step < total_steps);
        if (o.save_every > 0 && state.step.is_multiple_of(o.save_every)) || interrupted {
            let dir = save_checkpoint(&state, &opt)?;
            bar.suspend(|| observer.say(&format!("checkpoint: {}", dir.display())));
        }
        if interrupted {
            bar.abandon_with_message("interrupted; continue with --resume");
            summary.interrupted = true;
            summary.steps_done = state.step;
            summary.seconds = started.elapsed().as_secs_f64();
            return Ok(summary);
        }
    }
    bar.finish_and_clear();
    if o.bench {
        summary.steps_done = state.step;
        summary.seconds = started.elapsed().as_secs_f64();
        print_bench(&summary);
        return Ok(summary);
    }
    if total_steps > 0 {
        eval_now(state.step, &mut log, &mut summary)?;
    }

    if let Some(l) = &o.lora {
        let base = o.model.clone().unwrap_or(base_name.clone());
        lora::save_peft(&o.output, l, &named, &base)?;
    } else {
        let final_weights: HashMap<String, Tensor> = named
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        hf_dir::save(&o.output, &cfg, &final_weights, &tokenizer, dtype)?;
    }
    summary.steps_done = state.step;
    summary.seconds = started.elapsed().as_secs_f64();
    observer.say(&format!(
        "wrote {} ({} steps in {:.1}s); try: tokenscope inspect --model {} \"...\"",
        o.output.display(),
        state.step,
        summary.seconds,
        o.output.display()
    ));
    Ok(summary)
}

/// Mean time split of the measured steps (the first, which warms caches, is left out).
fn print_bench(s: &TrainSummary) {
    let rows: Vec<_> = s
        .timings
        .iter()
        .skip(usize::from(s.timings.len() > 1))
        .collect();
    if rows.is_empty() {
        return;
    }
    let n = rows.len() as f64;
    let mean = |f: fn(&(f64, f64, f64, f64)) -> f64| rows.iter().map(|r| f(r)).sum::<f64>() / n;
    let (f, b, o, t) = (mean(|r| r.0), mean(|r| r.1), mean(|r| r.2), mean(|r| r.3));
    println!(
        "train bench over {} steps: {:.3} s/step = forward {f:.3} + backward {b:.3} + optimizer {o:.3}; {t:.0} tokens/s",
        rows.len(),
        f + b + o
    );
}

fn progress_bar(enabled: bool, total: usize, start: usize) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_position(start as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} · {msg} · ETA {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// Checks that gradients reach every parameter (the stock candle llama silently trains only
/// the embeddings). Returns the names of parameters whose gradient is missing or all zero.
pub fn parameters_without_gradient(
    model: &Decoder,
    named: &[(String, Var)],
    x: &Tensor,
    y: &Tensor,
) -> candle_core::Result<Vec<String>> {
    let store = loss(model, x, y)?.backward()?;
    let grads = optim::collect_grads(named, &store);
    let mut missing = Vec::new();
    for (n, _) in named {
        let ok = match grads.get(n) {
            Some(g) => g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0,
            None => false,
        };
        if !ok {
            missing.push(n.clone());
        }
    }
    Ok(missing)
}

/// Parameters as Vars (sorted by name, a fixed order) and a model that reads those same
/// tensors, so gradients of its outputs reach them.
pub fn trainable(
    cfg: &Config,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Decoder, Vec<(String, Var)>)> {
    let mut names: Vec<String> = tensors.keys().cloned().collect();
    names.sort();
    let named: Vec<(String, Var)> = names
        .into_iter()
        .map(|n| Ok((n.clone(), Var::from_tensor(&tensors[&n].to_dtype(dtype)?)?)))
        .collect::<candle_core::Result<_>>()?;
    let map = named
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let lm = Decoder::load(VarBuilder::from_tensors(map, dtype, device), cfg)?;
    Ok((lm, named))
}

/// A LoRA run's model: the base's tensors as plain (frozen) tensors and its packed matrices
/// as they are, the adapter's as the trained variables (PEFT's names), applied with `dropout`.
pub fn trainable_lora(
    cfg: &Config,
    (base, packed): (HashMap<String, Tensor>, PackedWeights),
    adapter: HashMap<String, Tensor>,
    o: &lora::LoraOptions,
    dropout: Option<&std::sync::Arc<lora::DropoutKey>>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Decoder, Vec<(String, Var)>)> {
    let base = base
        .into_iter()
        .map(|(n, t)| Ok((n, t.to_dtype(dtype)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let mut lm = Decoder::load_packed(VarBuilder::from_tensors(base, dtype, device), cfg, packed)?;
    let mut names: Vec<String> = adapter.keys().cloned().collect();
    names.sort();
    let named: Vec<(String, Var)> = names
        .into_iter()
        .map(|n| {
            Ok((
                n.clone(),
                Var::from_tensor(&adapter[&n].to_dtype(DType::F32)?)?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    lm.apply_adapter(&lora::adapter(o, &named), dropout)
        .map_err(candle_core::Error::msg)?;
    // Activations, not weights, are most of a LoRA run's memory: keep one layer's at a time.
    lm.checkpoint_layers(true);
    Ok((lm, named))
}
