//! Every family on generated weights against llama.cpp: `scripts/families/generate.py` (run by
//! `scripts/families.sh`, which the README's test command runs) writes a tiny random-weight
//! model per family as an F32 GGUF (names and metadata as llama.cpp's converter writes them,
//! a real vocabulary from llama.cpp's test files) and as a Hugging Face directory, plus
//! llama-cpp-python's log-probabilities at every position (`logits_all=True`).
//!
//! Checked here, per family: our tokenizer gives llama.cpp's ids; the GGUF's full-vocabulary
//! log-probs at every position match llama.cpp's within what f32 rounding explains in two f32
//! evaluations (`common::f32_logprob_bound`; on a short prompt and one longer than the sliding
//! window); the HF directory gives the GGUF path's logits within 1e-5; and
//! training works on each (differentiable path = inference path, gradients everywhere, loss
//! falls, the output directory is in the family's HF layout and loads back).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

fn family_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/families")
        .join(name);
    assert!(
        dir.join("reference.json").is_file(),
        "{}: missing; run ./scripts/families.sh (the README's test command does)",
        dir.display()
    );
    dir
}

struct Reference {
    ids: Vec<u32>,
    /// positions × vocab.
    logprobs: Vec<f32>,
    vocab: usize,
    prompt: String,
}

fn references(dir: &Path) -> Vec<Reference> {
    let raw = std::fs::read_to_string(dir.join("reference.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let logprobs = common::read_f32(&dir.join(p["file"].as_str().unwrap()));
            let vocab = p["vocab"].as_u64().unwrap() as usize;
            let ids: Vec<u32> = p["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(logprobs.len(), ids.len() * vocab);
            Reference {
                ids,
                logprobs,
                vocab,
                prompt: p["prompt"].as_str().unwrap().to_string(),
            }
        })
        .collect()
}

fn load(source: ModelSource) -> LoadedModel {
    model::load(&source, &LoadOptions::default()).unwrap_or_else(|e| panic!("{source:?}: {e}"))
}

/// The largest |Δ log-prob| against llama.cpp over every position and the whole vocabulary.
fn gguf_against_llama_cpp(name: &str) -> f32 {
    let dir = family_dir(name);
    let m = load(ModelSource::Gguf(dir.join("model.gguf")));
    let mut worst = 0f32;
    for r in references(&dir) {
        assert_eq!(m.model.config().vocab_size, r.vocab, "{name}");
        let ours_ids = m.tokenizer.encode(&r.prompt).unwrap();
        assert_eq!(ours_ids, r.ids, "{name}: tokens of {:?}", r.prompt);
        let ours = common::all_logprobs(&m, &r.ids);
        let bound = |pos: usize, logprobs: &[f32]| {
            let pass = common::pass_of(m.model.config(), pos + 1);
            common::f32_logprob_bound(pass, logprobs, 2) as f32
        };
        for (pos, row) in ours.iter().enumerate() {
            let theirs = &r.logprobs[pos * r.vocab..(pos + 1) * r.vocab];
            let d = common::max_abs_diff(row, theirs);
            let b = bound(pos, theirs);
            assert!(
                d <= b,
                "{name}: position {pos} of {} differs from llama.cpp by {d} > {b}",
                r.ids.len()
            );
            worst = worst.max(d);
        }
        // The incremental path (prefill, then one token at a time) gives the same numbers.
        let half = r.ids.len() / 2;
        let mut cache = m.model.new_cache();
        m.model.next_logits(&r.ids[..half], &mut cache).unwrap();
        for (pos, &id) in r.ids.iter().enumerate().skip(half) {
            let l = m.model.next_logits(&[id], &mut cache).unwrap();
            let d = common::max_abs_diff(
                &tokenscope::engine::distribution::log_softmax(&l),
                &ours[pos],
            );
            let b = bound(pos, &ours[pos]);
            assert!(d <= b, "{name}: decode step at {pos} differs by {d} > {b}");
        }
    }
    eprintln!("{name}: GGUF vs llama.cpp, max |Δ log-prob| = {worst:.2e}");
    worst
}

/// The HF directory of the same weights against the GGUF path (the largest |Δ logit|).
fn hf_against_gguf(name: &str) -> f32 {
    let dir = family_dir(name);
    let gguf = load(ModelSource::Gguf(dir.join("model.gguf")));
    let hf_dir = hf_copy(name, &gguf);
    let hf = load(ModelSource::HfDir(hf_dir.path().to_path_buf()));
    assert_eq!(hf.architecture, family_arch(name), "{name}");
    let mut worst = 0f32;
    for r in references(&dir) {
        let input = Tensor::new(r.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let a = gguf
            .model
            .forward_all(&input, &mut gguf.model.new_cache())
            .unwrap();
        let b = hf
            .model
            .forward_all(&input, &mut hf.model.new_cache())
            .unwrap();
        let d = common::max_abs_diff_tensors(&a, &b);
        assert!(d <= 1e-5, "{name}: HF directory differs from GGUF by {d}");
        worst = worst.max(d);
    }
    eprintln!("{name}: HF directory vs GGUF, max |Δ logit| = {worst:.2e}");
    worst
}

/// A copy of the family's HF directory with a tokenizer.json: the vocabularies come as GGUF
/// metadata only, so it is written from ours (what the HF path reads under test is the
/// weights and config.json).
fn hf_copy(name: &str, gguf: &LoadedModel) -> tempfile::TempDir {
    let dir = family_dir(name);
    let out = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(dir.join("hf").join(f), out.path().join(f)).unwrap();
    }
    gguf.tokenizer
        .inner()
        .save(out.path().join("tokenizer.json"), false)
        .unwrap();
    out
}

/// Training: the differentiable path gives the inference path's logits (≤ 1e-4), every
/// parameter gets a gradient, and fine-tuning the HF directory lowers the loss and writes a
/// directory in the family's own layout that loads back with the trained logits.
fn trains(name: &str) {
    use tokenscope::train::{self, TrainOptions};
    let dir = family_dir(name);
    let m = load(ModelSource::Gguf(dir.join("model.gguf")));
    let r = references(&dir).pop().unwrap();
    let x = Tensor::new(r.ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let fast = m.model.forward_all(&x, &mut m.model.new_cache()).unwrap();
    let slow = m.model.forward_train(&x).unwrap();
    let d = common::max_abs_diff_tensors(&fast, &slow);
    assert!(d <= 1e-4, "{name}: differentiable path differs by {d}");
    eprintln!("{name}: inference vs differentiable, max |Δ logit| = {d:.2e}");

    let hf = hf_copy(name, &m);
    let parts = model::hf_dir::inspect(hf.path()).unwrap();
    let raw =
        candle_core::safetensors::load(hf.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let tensors = model::hf_dir::to_decoder(&parts.config, raw).unwrap();
    let n = tensors.len();
    let (lm, named) = train::trainable(
        &parts.config,
        tensors,
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(named.len(), n);
    let t = r.ids.len() - 1;
    let xs = Tensor::new(&r.ids[..t], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let ys = Tensor::new(&r.ids[1..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let missing = train::parameters_without_gradient(&lm, &named, &xs, &ys).unwrap();
    assert!(missing.is_empty(), "{name}: no gradient for {missing:?}");

    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("corpus.txt");
    std::fs::write(
        &data,
        "The quick brown fox jumps over the lazy dog. ".repeat(30),
    )
    .unwrap();
    let out = work.path().join("out");
    let summary = train::run(&TrainOptions {
        model: Some(hf.path().to_string_lossy().into()),
        data: Some(data),
        output: out.clone(),
        steps: Some(12),
        batch_size: 2,
        seq_len: 16,
        lr: 3e-3,
        warmup: 2,
        eval_every: 0,
        progress: false,
        seed: 3,
        ..Default::default()
    })
    .unwrap();
    let first = summary.losses[0].1;
    let last = summary.losses.last().unwrap().1;
    assert!(last < first, "{name}: loss {first} -> {last}");
    let trained = load(ModelSource::HfDir(out.clone()));
    assert_eq!(trained.architecture, family_arch(name));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], family_arch(name));
    // The trained weights, not the starting ones.
    let before = m.model.forward_all(&x, &mut m.model.new_cache()).unwrap();
    let after = trained
        .model
        .forward_all(&x, &mut trained.model.new_cache())
        .unwrap();
    assert!(
        common::max_abs_diff_tensors(&before, &after) > 1e-3,
        "{name}"
    );
}

fn family_arch(name: &str) -> &'static str {
    match name {
        "llama3" | "llama2" => "llama",
        "mistral" => "mistral",
        "phi3" => "phi3",
        "gemma2" => "gemma2",
        "gpt2" => "gpt2",
        other => panic!("unknown family {other}"),
    }
}

macro_rules! family_tests {
    ($($name:ident),*) => {$(
        mod $name {
            #[test]
            fn gguf_matches_llama_cpp() {
                super::gguf_against_llama_cpp(stringify!($name));
            }
            #[test]
            fn hf_directory_matches_gguf() {
                super::hf_against_gguf(stringify!($name));
            }
            #[test]
            fn trains() {
                super::trains(stringify!($name));
            }
        }
    )*};
}

family_tests!(llama3, llama2, mistral, phi3, gemma2, gpt2);

/// Quantized fused tensors (GPT-2's `attn_qkv`, Phi-3's `attn_qkv` and gate+up `ffn_up`, in
/// Q8_0) are split by rows into packed matrices: the packed model gives the logits of the
/// same file with every weight dequantized to a dense f32 copy.
#[test]
fn quantized_fused_tensors_split_exactly() {
    for name in ["phi3", "gpt2"] {
        let path = family_dir(name).join("model-q8_0.gguf");
        let packed = load(ModelSource::Gguf(path.clone()));
        let dense = model::load(
            &ModelSource::Gguf(path),
            &LoadOptions {
                dense_reference: true,
                ..Default::default()
            },
        )
        .unwrap();
        let r = references(&family_dir(name)).pop().unwrap();
        let a = common::all_logprobs(&packed, &r.ids);
        let b = common::all_logprobs(&dense, &r.ids);
        for (pos, (x, y)) in a.iter().zip(&b).enumerate() {
            common::assert_f32_close(
                &format!("{name}: packed Q8_0 vs dense at {pos}"),
                x,
                y,
                common::pass_of(dense.model.config(), pos + 1),
            );
        }
    }
}
