//! nanoGPT checkpoints against an independent implementation: `scripts/nanogpt/generate.py`
//! (run by `scripts/nanogpt.sh`, which the README's test command runs) saves random-weight
//! checkpoints as nanoGPT's train.py does (`torch.save` of model_args, the state dict, the
//! optimizer, iter_num, best_val_loss, config) and Hugging Face's GPT2LMHeadModel's float64
//! log-probs for the same weights, with token ids from tiktoken's gpt2 encoding or the run's
//! meta.pkl.

mod common;

use std::path::{Path, PathBuf};

use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nanogpt");
    assert!(
        dir.join("gpt2-bias/reference.json").is_file(),
        "{}: missing; run ./scripts/nanogpt.sh (the README's test command does)",
        dir.display()
    );
    dir
}

fn load(path: &Path) -> LoadedModel {
    let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
    assert!(matches!(source, ModelSource::NanoGpt(_)), "{source:?}");
    model::load(&source, &LoadOptions::default()).unwrap_or_else(|e| panic!("{path:?}: {e}"))
}

fn load_err(path: &Path) -> String {
    let source = ModelSource::NanoGpt(path.to_path_buf());
    match model::load(&source, &LoadOptions::default()) {
        Ok(_) => panic!("{path:?} loaded"),
        Err(e) => e.to_string(),
    }
}

/// The largest |Δ log-prob| against the reference over every position and token (also
/// incrementally).
fn against_reference(name: &str) -> f32 {
    let dir = fixtures().join(name);
    common::against_reference(&load(&dir), &dir.join("reference.json"), name)
}

#[test]
fn a_gpt2_token_checkpoint_with_biases_equals_transformers_gpt2() {
    let worst = against_reference("gpt2-bias");
    eprintln!("gpt2-bias: max |Δ log-prob| {worst:e}");
}

#[test]
fn a_character_level_checkpoint_without_biases_equals_the_reference() {
    let worst = against_reference("char-nobias");
    eprintln!("char-nobias: max |Δ log-prob| {worst:e}");
}

#[test]
fn gpt2_bpe_gives_tiktokens_ids() {
    let m = load(&fixtures().join("gpt2-bias"));
    let raw = std::fs::read_to_string(fixtures().join("gpt2-tokens.json")).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&raw).unwrap();
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = m.tokenizer.encode(text).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(m.tokenizer.decode(&ids, false).unwrap(), text);
    }
    // `<|endoftext|>` ends generation; the 47 padding rows past GPT-2's 50,257 tokens are cut.
    assert_eq!(m.eos_ids, vec![50256]);
    assert_eq!(m.tokenizer.vocab_size(), 50257);
}

#[test]
fn a_character_outside_the_vocabulary_is_named() {
    let m = load(&fixtures().join("char-nobias"));
    let e = m.tokenizer.encode("Speak 😀").unwrap_err().to_string();
    assert!(e.contains("'😀'") && e.contains("U+1F600"), "{e}");
    assert_eq!(
        m.tokenizer
            .decode(&m.tokenizer.encode("All:\nSpeak").unwrap(), false)
            .unwrap(),
        "All:\nSpeak"
    );
}

#[test]
fn the_model_card_shows_the_run() {
    let card = model::probe::probe(&ModelSource::NanoGpt(fixtures().join("gpt2-bias/ckpt.pt")));
    assert_eq!(card.error, None);
    assert_eq!(card.architecture.as_deref(), Some("nanogpt"));
    let t = card.training.unwrap();
    assert_eq!(t.step, Some(5000));
    assert!((t.val_loss.unwrap() - 3.2875).abs() < 1e-6, "{t:?}");
    // wte (tied head) + wpe + 2 blocks of 12·32² + 13·32 + LayerNorms.
    let c = 32u64;
    let block = 12 * c * c + 13 * c;
    assert_eq!(
        card.parameters,
        Some(50304 * c + 64 * c + 2 * block + 2 * c)
    );
    let char_card = model::probe::probe(&ModelSource::NanoGpt(
        fixtures().join("char-nobias/ckpt.pt"),
    ));
    assert_eq!(char_card.training.unwrap().step, Some(250));
}

#[test]
fn bad_checkpoints_are_refused_with_the_reason() {
    let bad = fixtures().join("bad");
    let cases = [
        ("missing-key.pt", "ln_2"),
        ("wrong-shape.pt", "shape"),
        ("foreign-class.pt", "numpy"),
        ("truncated.pt", "zip"),
    ];
    for (file, needle) in cases {
        let e = load_err(&bad.join(file));
        assert!(e.contains(needle), "{file}: {e}");
        let card = model::probe::probe(&ModelSource::NanoGpt(bad.join(file)));
        assert!(card.error.is_some_and(|r| r.contains(needle)), "{file}");
    }
}

/// A nanoGPT run is a base for `tokenscope train`: with no steps the written Hugging Face
/// GPT-2 directory computes what the checkpoint does (the exact GELU survives the round
/// trip), and a few steps lower the loss.
#[test]
fn a_checkpoint_trains_as_a_base() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("corpus.txt");
    std::fs::write(
        &data,
        "First Citizen:\nSpeak, speak.\n\nAll:\nResolved. resolved.\n".repeat(30),
    )
    .unwrap();
    let base = fixtures().join("char-nobias");
    let train = |steps: usize, out: &str| {
        let o = tokenscope::train::TrainOptions {
            model: Some(base.to_string_lossy().into()),
            data: Some(data.clone()),
            output: tmp.path().join(out),
            steps: Some(steps),
            seq_len: 32,
            batch_size: 4,
            lr: 3e-3,
            progress: false,
            ..Default::default()
        };
        tokenscope::train::run(&o).unwrap();
        tmp.path().join(out)
    };
    let copy = train(0, "copy");
    let ours = load(&base);
    let written = model::load(&ModelSource::HfDir(copy), &LoadOptions::default()).unwrap();
    let ids = ours.tokenizer.encode("MENENIUS:\nWhy, masters").unwrap();
    assert_eq!(
        written.tokenizer.encode("MENENIUS:\nWhy, masters").unwrap(),
        ids
    );
    let a = common::next_logprobs(&ours.model, &ids);
    let b = common::next_logprobs(&written.model, &ids);
    let d = common::max_abs_diff(&a, &b);
    assert!(d < 1e-5, "the written directory differs by {d}");

    let trained = train(20, "trained");
    let log = std::fs::read_to_string(trained.join("train_log.jsonl")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert!(
        losses.len() >= 2 && losses.last() < losses.first(),
        "{losses:?}"
    );
}
