//! nanochat checkpoints against an independent implementation: `scripts/nanochat/generate.py`
//! (run by `scripts/nanochat.sh`, which the README's test command runs) trains a small BPE
//! tokenizer and saves it as nanochat does (a pickled `tiktoken.Encoding`), saves random-weight
//! checkpoints as nanochat's `save_checkpoint` does (`model_<step>.pt` + `meta_<step>.json`;
//! one in bf16 embeddings as GPU runs save them), and computes their log-probs with a PyTorch
//! transcription of upstream's `GPT.forward` (commit 92d63d4) in float64, token ids from
//! tiktoken itself.

mod common;

use std::path::{Path, PathBuf};

use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/nanochat");
    assert!(
        dir.join("mha/reference_000005.json").is_file(),
        "{}: missing; run ./scripts/nanochat.sh (the README's test command does)",
        dir.display()
    );
    dir
}

fn d4() -> PathBuf {
    fixtures().join("base/base_checkpoints/d4")
}

fn load(source: &ModelSource) -> LoadedModel {
    model::load(source, &LoadOptions::default()).unwrap_or_else(|e| panic!("{source:?}: {e}"))
}

fn load_err(dir: &Path) -> String {
    let source = ModelSource::Nanochat {
        dir: dir.to_path_buf(),
        step: 1,
    };
    match model::load(&source, &LoadOptions::default()) {
        Ok(_) => panic!("{dir:?} loaded"),
        Err(e) => e.to_string(),
    }
}

/// The largest |Δ log-prob| against the reference of step `step` in `dir`, over every position
/// and token: the whole text at once, and again prefilled to half and then a token at a time
/// (the smear reads the token before each new one from the cache). Token ids: `<|bos|>` first,
/// then tiktoken's.
fn against_reference(dir: &Path, step: u64) -> f32 {
    let m = load(&ModelSource::Nanochat {
        dir: dir.to_path_buf(),
        step,
    });
    let reference = dir.join(format!("reference_{step:06}.json"));
    common::against_reference(&m, &reference, &format!("step {step}"))
}

#[test]
fn a_gqa_checkpoint_with_sliding_windows_equals_upstreams_forward() {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d4().join("reference_000010.json")).unwrap())
            .unwrap();
    let longest = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["ids"].as_array().unwrap().len())
        .max()
        .unwrap();
    // Upstream's short window at sequence_len 1024 is 256 keys back: the text goes past it.
    assert!(longest > 300, "{longest} tokens");
    for step in [10, 20] {
        let worst = against_reference(&d4(), step);
        eprintln!("d4 step {step}: max |Δ log-prob| {worst:e}");
    }
}

#[test]
fn a_multi_head_checkpoint_with_its_tokenizer_beside_it_equals_upstream() {
    let worst = against_reference(&fixtures().join("mha"), 5);
    eprintln!("mha: max |Δ log-prob| {worst:e}");
}

/// The engine's other paths keep the smear's previous token: a batched, right-padded prefill
/// split into rows, and a cache cut short (the prefix cache) and continued with several tokens.
#[test]
fn batched_rows_and_a_cut_cache_give_the_same_numbers() {
    let m = load(&ModelSource::Nanochat {
        dir: d4(),
        step: 10,
    });
    let a = m
        .tokenizer
        .encode("The quick brown fox jumps over the lazy dog.")
        .unwrap();
    let b = m.tokenizer.encode("Hello, naïve café!").unwrap();
    let alone = |ids: &[u32]| m.model.next_logits(ids, &mut m.model.new_cache()).unwrap();
    let t = a.len().max(b.len());
    let pad = |ids: &[u32]| {
        let mut v = ids.to_vec();
        v.resize(t, 0);
        v
    };
    let rows = candle_core::Tensor::new(vec![pad(&a), pad(&b)], &candle_core::Device::Cpu).unwrap();
    let mut cache = m.model.new_cache();
    let logits = m
        .model
        .forward_rows(&rows, &mut cache, &[a.len() - 1, b.len() - 1])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (i, ids) in [&a, &b].into_iter().enumerate() {
        assert!(
            common::max_abs_diff(&logits[i], &alone(ids)) < 1e-4,
            "row {i}"
        );
        // The row's own cache, continued by one token.
        let mut row = cache.row(i, ids.len()).unwrap();
        let next = m.model.next_logits(&[42], &mut row).unwrap();
        let mut longer = ids.clone();
        longer.push(42);
        assert!(
            common::max_abs_diff(&next, &alone(&longer)) < 1e-4,
            "row {i} + 1"
        );
    }
    let mut full = m.model.new_cache();
    m.model.next_logits(&a, &mut full).unwrap();
    let mut cut = full.truncated(4).unwrap();
    let rest = m.model.next_logits(&a[4..], &mut cut).unwrap();
    assert!(common::max_abs_diff(&rest, &alone(&a)) < 1e-4);
}

#[test]
fn the_tokenizer_gives_tiktokens_ids() {
    let tk =
        model::nanochat::read_tokenizer(&fixtures().join("base/tokenizer/tokenizer.pkl")).unwrap();
    let raw = std::fs::read_to_string(fixtures().join("tokens.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&raw).unwrap();
    assert!(cases.len() >= 10);
    let bos = tk.token_to_id("<|bos|>").unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let mut ours = tk.encode(text).unwrap();
        assert_eq!(ours.remove(0), bos, "<|bos|> first");
        assert_eq!(ours, want, "{text:?}");
        assert_eq!(tk.decode(&ours, false).unwrap(), text);
    }
    // Special tokens: nanochat's, after the merges, ending generation where its engine stops.
    let end = tk.end_of_generation();
    assert_eq!(end.len(), 2);
    assert_eq!(tk.token_text(end[0]), "<|assistant_end|>");
    assert_eq!(end[1], bos);
    assert!(tk.is_special(bos));
}

#[test]
fn steps_are_chosen_by_name_and_the_latest_is_the_default() {
    let dir = d4();
    assert_eq!(model::nanochat::steps(&dir), [10, 20]);
    let latest = ModelSource::parse(dir.to_str().unwrap()).unwrap();
    assert_eq!(
        latest,
        ModelSource::Nanochat {
            dir: dir.clone(),
            step: 20
        }
    );
    assert_eq!(latest.display_name(), "d4-step_000020");
    for name in ["step_000010", "000010", "10", "model_000010.pt"] {
        let s = latest.clone().at_checkpoint(name).unwrap();
        assert_eq!(
            s,
            ModelSource::Nanochat {
                dir: dir.clone(),
                step: 10
            },
            "{name}"
        );
    }
    let e = latest
        .clone()
        .at_checkpoint("step_7")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("step_000007") && e.contains("step_000010, step_000020"),
        "{e}"
    );
    let e = latest.at_checkpoint("latest").unwrap_err().to_string();
    assert!(e.contains("step_002920"), "{e}");
    // A folder of such folders offers every step as its own model.
    let offered = tokenscope::engine::registry::models_in(dir.parent().unwrap());
    assert_eq!(
        offered,
        [10, 20]
            .map(|step| ModelSource::Nanochat {
                dir: dir.clone(),
                step
            })
            .to_vec()
    );
}

#[test]
fn the_model_card_shows_the_run() {
    let card = model::probe::probe(&ModelSource::Nanochat {
        dir: d4(),
        step: 20,
    });
    assert_eq!(card.error, None);
    assert_eq!(card.architecture.as_deref(), Some("nanochat"));
    assert_eq!(card.quantization.as_deref(), Some("BF16"));
    let t = card.training.unwrap();
    assert_eq!(t.step, Some(20));
    assert_eq!(t.checkpoint.as_deref(), Some("step_000020"));
    assert!(t.val_bpb.is_some() && t.val_loss.is_none(), "{t:?}");
    let shape = card.shape.unwrap();
    assert_eq!((shape.layers, shape.hidden, shape.context), (4, 64, 1024));
    // 565 tokens padded to 576 rows, as upstream pads them.
    assert_eq!(shape.vocab, 576);
    // wte + lm_head + 2 value embeddings (576 × 32) + 4 blocks + 2 ve gates + the scalars.
    let (v, h, kv) = (576u64, 64u64, 32u64);
    let block = h * h + 2 * kv * h + h * h + 8 * h * h;
    assert_eq!(
        card.parameters,
        Some(2 * v * h + 2 * v * kv + 4 * block + 2 * 2 * 12 + 2 * 4 + 24 + 2)
    );
}

#[test]
fn bad_checkpoints_are_refused_with_the_reason() {
    let bad = fixtures().join("bad");
    let cases = [
        ("missing-key", "smear_gate.weight"),
        ("wrong-shape", "shape"),
        ("foreign-class", "numpy"),
        ("truncated", "zip"),
        ("bad-tokenizer", "os.system"),
    ];
    for (name, needle) in cases {
        let e = load_err(&bad.join(name));
        assert!(e.contains(needle), "{name}: {e}");
    }
    for (name, needle) in &cases[..4] {
        let card = model::probe::probe(&ModelSource::Nanochat {
            dir: bad.join(name),
            step: 1,
        });
        assert!(card.error.is_some_and(|r| r.contains(needle)), "{name}");
    }
}

#[test]
fn a_nanochat_checkpoint_is_not_trained_and_says_why() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenscope"))
        .args(["train", "--model"])
        .arg(d4())
        .args(["--data", "README.md", "--steps", "1", "--output"])
        .arg(std::env::temp_dir().join("tokenscope-nanochat-train"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nanochat checkpoint"), "{err}");
}

/// Two steps of one run side by side (the nanochat server's "compare checkpoints"), each
/// described by GET /info, and --checkpoint choosing the step of a --model folder.
#[test]
fn a_models_dir_serves_every_step_and_info_describes_each() {
    let root = tempfile::tempdir().unwrap();
    let server = common::server::Server::start(
        &root.path().join("state"),
        &[
            "--models-dir",
            d4().parent().unwrap().to_str().unwrap(),
            "--max-loaded-models",
            "2",
        ],
    );
    let ids: Vec<String> = server
        .get("/models")
        .1
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["d4-step_000010", "d4-step_000020"]);
    let mut tops = Vec::new();
    for (id, step) in [("d4-step_000010", 10), ("d4-step_000020", 20)] {
        let (code, r) = server.post(&format!("/models/{id}/load"), serde_json::json!({}));
        assert!(code == 200 || code == 202, "{code} {r}");
        server.wait(std::time::Duration::from_secs(60), "loaded", |s| {
            s.model(id)["status"] == "loaded"
        });
        let (code, info) = server.get(&format!("/info?model={id}"));
        assert_eq!(code, 200, "{info}");
        assert_eq!(info["checkpoint"], format!("step_{step:06}"));
        assert_eq!(info["step"], step);
        assert!(info["val_loss"].is_null(), "nanochat records no loss");
        assert!(info["val_bpb"].as_f64().is_some(), "{info}");
        assert_eq!(info["model_layers"], 4);
        assert_eq!(info["model_dim"], 64);
        assert_eq!(info["vocab_size"], 576);
        assert_eq!(info["architecture"], "nanochat");
        assert_eq!(info["format"], "nanochat");
        assert_eq!(info["context_length"], 1024);
        let (code, r) = server.post(
            "/generate",
            serde_json::json!({"model": id, "prompt": "The quick brown fox", "temperature": 0,
                               "max_tokens": 3, "top_k": 3, "stop_on_newline": true}),
        );
        assert_eq!(code, 200, "{r}");
        tops.push(r["tokens"].clone());
    }
    assert_ne!(tops[0], tops[1], "two steps, two models");
    // Chat: nanochat's render_conversation (the system message joined to the first user turn).
    let (code, t) = server.post(
        "/tokenize",
        serde_json::json!({"model": "d4-step_000010", "return_token_strs": true, "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Why?"}]}),
    );
    assert_eq!(code, 200, "{t}");
    let text: String = t["token_strs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        "<|bos|><|user_start|>Be brief.\n\nHi<|user_end|><|assistant_start|>Hello<|assistant_end|>\
         <|user_start|>Why?<|user_end|><|assistant_start|>"
    );
    let (code, r) = server.post(
        "/v1/chat/completions",
        serde_json::json!({"model": "d4-step_000010", "max_tokens": 2, "logprobs": true,
                           "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(code, 200, "{r}");
    // Not a base for training jobs: refused at creation, naming the field.
    let (code, e) = server.post(
        "/train/jobs",
        serde_json::json!({"base_model": "d4-step_000010", "data": {"text": "some text to learn"},
                           "output_name": "never", "steps": 1}),
    );
    assert_eq!(code, 422, "{e}");
    assert!(
        e.to_string().contains("base_model") && e.to_string().contains("nanochat"),
        "{e}"
    );
    let loaded = server
        .get("/models")
        .1
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"] == "loaded")
        .count();
    assert_eq!(loaded, 2, "side by side");
    server.kill();

    let server = common::server::Server::start(
        &root.path().join("state2"),
        &[
            "--model",
            d4().to_str().unwrap(),
            "--checkpoint",
            "step_000010",
        ],
    );
    let (_, info) = server.get("/info");
    assert_eq!(info["checkpoint"], "step_000010");
    server.kill();
}
