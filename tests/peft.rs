//! LoRA adapters made by Hugging Face PEFT load on their base and give PEFT's own log-probs:
//! `scripts/peft.sh` (run by the README's test command) saves a tiny random Llama and two
//! adapters with PEFT's `save_pretrained`, and `PeftModel.from_pretrained` computes their
//! log-probs in float64. Bad adapters are refused naming what is wrong, and a server offers an
//! adapter from `--models-dir` on a base it names by model id.

mod common;

use std::path::{Path, PathBuf};

use common::server::Server;
use serde_json::{json, Value};
use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/peft");
    assert!(
        dir.join("prompts.json").is_file(),
        "{}: missing; run ./scripts/peft.sh (the README's test command does)",
        dir.display()
    );
    dir
}

fn load(path: &Path) -> Result<LoadedModel, String> {
    let source = ModelSource::from_path(path).ok_or("not a model path")?;
    model::load(&source, &LoadOptions::default()).map_err(|e| e.to_string())
}

fn prompts() -> Vec<(String, Vec<u32>)> {
    let raw = std::fs::read_to_string(fixtures().join("prompts.json")).unwrap();
    let v: Value = serde_json::from_str(&raw).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["prompt"].as_str().unwrap().to_string(),
                p["ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|i| i.as_u64().unwrap() as u32)
                    .collect(),
            )
        })
        .collect()
}

/// The largest |Δ log-prob| against PEFT over every position and token of the prompts.
fn against_peft(name: &str) -> f32 {
    let dir = fixtures().join(name);
    let source = ModelSource::from_path(&dir).unwrap();
    assert!(
        matches!(&source, ModelSource::Adapter { base: Some(_), .. }),
        "{source:?}"
    );
    let m = load(&dir).unwrap();
    let plain = load(&fixtures().join("base")).unwrap();
    let vocab = m.model.config().vocab_size;
    let mut worst = 0f32;
    for (i, (prompt, ids)) in prompts().iter().enumerate() {
        assert_eq!(
            &m.tokenizer.encode(prompt).unwrap(),
            ids,
            "tokens of {prompt:?}"
        );
        let theirs = common::read_f32(&dir.join(format!("logprobs{i}.f32")));
        let ours = common::all_logprobs(&m, ids);
        let base = common::all_logprobs(&plain, ids);
        for (pos, lp) in ours.iter().enumerate() {
            let d = common::max_abs_diff(lp, &theirs[pos * vocab..(pos + 1) * vocab]);
            assert!(
                d <= 1e-4,
                "{name}: position {pos} of {prompt:?} differs by {d}"
            );
            worst = worst.max(d);
            // The adapter is really applied: without it the numbers are far off.
            let off = common::max_abs_diff(&base[pos], &theirs[pos * vocab..(pos + 1) * vocab]);
            assert!(
                off > 0.05,
                "{name}: position {pos}: the base alone is within {off}"
            );
        }
    }
    worst
}

#[test]
fn peft_adapters_give_pefts_log_probs() {
    let a = against_peft("all-modules");
    let b = against_peft("attention-rslora");
    eprintln!(
        "max |Δ logprob| vs PEFT (float64): all modules {a:.2e}, attention with rsLoRA {b:.2e}"
    );
}

/// Copies an adapter into `dir`, changing its config with `edit` and, if given, its tensors.
fn variant(dir: &Path, name: &str, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let src = fixtures().join("all-modules");
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        out.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    cfg["base_model_name_or_path"] = json!(fixtures().join("base").to_str().unwrap());
    edit(&mut cfg);
    std::fs::write(out.join("adapter_config.json"), cfg.to_string()).unwrap();
    out
}

#[test]
fn bad_adapters_are_refused_naming_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            variant(tmp.path(), "dora", |c| c["use_dora"] = json!(true)),
            "use_dora",
        ),
        (variant(tmp.path(), "rank", |c| c["r"] = json!(8)), "r = 8"),
        (
            variant(tmp.path(), "fewer-targets", |c| {
                c["target_modules"] = json!(["q_proj"])
            }),
            "not in target_modules",
        ),
        (
            variant(tmp.path(), "unknown-target", |c| {
                c["target_modules"] = json!(["c_attn"])
            }),
            "c_attn",
        ),
        (
            variant(tmp.path(), "regex", |c| {
                c["target_modules"] = json!(".*proj")
            }),
            "regular expression",
        ),
        (
            variant(tmp.path(), "no-base", |c| {
                c["base_model_name_or_path"] = json!("meta-llama/Llama-3.2-1B")
            }),
            "meta-llama/Llama-3.2-1B",
        ),
        (
            variant(tmp.path(), "prompt-tuning", |c| {
                c["peft_type"] = json!("PROMPT_TUNING")
            }),
            "PROMPT_TUNING",
        ),
    ];
    for (dir, needle) in cases {
        let err = load(&dir).err().unwrap_or_else(|| panic!("{dir:?} loaded"));
        assert!(err.contains(needle), "{dir:?}: {err}");
    }
    // Another base (the default model: other widths) and a truncated tensor file.
    let other = variant(tmp.path(), "other-base", |c| {
        c["base_model_name_or_path"] = json!(common::default_gguf().to_str().unwrap())
    });
    let err = load(&other).err().unwrap();
    assert!(err.contains("made for another base"), "{err}");
    // Listed, it is failed with that reason before any load is tried.
    let card = tokenscope::model::probe::probe(
        &tokenscope::model::ModelSource::parse(other.to_str().unwrap()).unwrap(),
    );
    assert!(
        card.error
            .as_deref()
            .is_some_and(|e| e.contains("made for another base")),
        "{card:?}"
    );
    let cut = variant(tmp.path(), "truncated", |_| {});
    let file = cut.join("adapter_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let err = load(&cut).err().unwrap();
    assert!(err.contains("safetensors"), "{err}");
}

/// A models folder with a base and an adapter that names it by model id: both listed, the
/// adapter's card is its base's with its own parameters added, and it answers as the model
/// loaded directly does.
#[test]
fn a_server_offers_an_adapter_on_a_base_named_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&fixtures().join("base"), &models.join("tiny-llama"));
    for (from, to) in [
        ("all-modules", "tiny-lora"),
        ("attention-rslora", "tiny-lora-rs"),
    ] {
        copy(&fixtures().join(from), &models.join(to));
        let cfg_path = models.join(to).join("adapter_config.json");
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        cfg["base_model_name_or_path"] = json!("tiny-llama");
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    }

    let server = Server::start(
        &tmp.path().join("state"),
        &[
            "--model",
            models.join("tiny-llama").to_str().unwrap(),
            "--models-dir",
            models.to_str().unwrap(),
            "--max-loaded-models",
            "3",
        ],
    );
    let (_, list) = server.get("/models");
    let ids: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny-llama", "tiny-lora", "tiny-lora-rs"], "{list}");
    let adapter = &list[1];
    assert_eq!(adapter["format"], "peft-lora", "{adapter}");
    assert_eq!(adapter["architecture"], list[0]["architecture"]);
    assert!(
        adapter["parameters"].as_u64().unwrap() > list[0]["parameters"].as_u64().unwrap(),
        "{list}"
    );
    for id in ["tiny-lora", "tiny-lora-rs"] {
        let (code, m) = server.post(&format!("/models/{id}/load"), json!({}));
        assert!(code == 200 || code == 202, "{m}");
        server.wait(std::time::Duration::from_secs(60), "adapter loaded", |s| {
            s.model(id)["status"] == "loaded"
        });
    }
    // Both adapters run on the base's weights in memory: each adds only its own.
    let mb = |id: &str| server.model(id)["memory_mb"].as_f64().unwrap();
    let base_mb = mb("tiny-llama");
    let adapter_bytes = |dir: &str| {
        std::fs::metadata(models.join(dir).join("adapter_model.safetensors"))
            .unwrap()
            .len() as f64
    };
    for (id, dir) in [("tiny-lora", "tiny-lora"), ("tiny-lora-rs", "tiny-lora-rs")] {
        let own = adapter_bytes(dir) / (1024.0 * 1024.0);
        assert!(
            mb(id) < base_mb / 4.0,
            "{id}: {} MiB on a {base_mb} MiB base",
            mb(id)
        );
        assert!(
            (mb(id) - own).abs() <= 0.1 + own * 0.1,
            "{id}: {} MiB, file {own} MiB",
            mb(id)
        );
    }
    // The served distribution is the adapter's (as loaded here directly), not the base's.
    let direct = load(&fixtures().join("all-modules")).unwrap();
    let (prompt, ids) = &prompts()[0];
    let want = common::all_logprobs(&direct, ids);
    let (code, r) = server.post(
        "/generate",
        json!({"model": "tiny-lora", "prompt": prompt, "max_tokens": 1, "top_k": 3, "temperature": 1}),
    );
    assert_eq!(code, 200, "{r}");
    let last = want.last().unwrap();
    for t in r["tokens"].as_array().unwrap() {
        let id = t["token_id"].as_u64().unwrap() as usize;
        let lp = t["logprob"].as_f64().unwrap();
        assert!((lp - last[id] as f64).abs() < 1e-4, "{t} vs {}", last[id]);
    }
}

fn torch_python() -> PathBuf {
    let cache = common::cache_dir();
    cache.join("venv-torch/bin/python")
}

/// PEFT's log-probs (float64) for `adapter` on `base` at every position of `ids`.
fn peft_logprobs(base: &Path, adapter: &Path, ids: &[u32], vocab: usize) -> Vec<Vec<f32>> {
    let out = adapter.join("peft-logprobs.f32");
    let status = std::process::Command::new(torch_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peft/logprobs.py"))
        .arg(base)
        .arg(adapter)
        .arg(serde_json::to_string(ids).unwrap())
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "logprobs.py failed");
    let all = common::read_f32(&out);
    all.chunks(vocab).map(|c| c.to_vec()).collect()
}

fn lora_options(
    base: &Path,
    data: &Path,
    out: &Path,
    steps: usize,
) -> tokenscope::train::TrainOptions {
    tokenscope::train::TrainOptions {
        model: Some(base.to_string_lossy().into()),
        data: Some(data.to_path_buf()),
        output: out.to_path_buf(),
        steps: Some(steps),
        batch_size: 4,
        seq_len: 32,
        lr: 5e-2,
        warmup: 2,
        eval_every: 4,
        save_every: 4,
        seed: 5,
        progress: false,
        lora: Some(tokenscope::train::lora::LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            targets: vec!["q_proj".into(), "v_proj".into(), "gate_proj".into()],
        }),
        ..Default::default()
    }
}

/// `tokenscope train --lora-r` trains only the adapter (the base frozen), learns, checkpoints
/// the adapter alone (kilobytes), resumes bit-identically with dropout on, and writes a PEFT
/// folder that PEFT loads and computes as tokenscope does.
#[test]
fn lora_training_writes_an_adapter_peft_reads_and_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("base");
    let data = tmp.path().join("corpus.txt");
    std::fs::write(
        &data,
        "The quick brown fox jumps over the lazy dog. ".repeat(30)
            + &"Pack my box with five dozen liquor jugs. ".repeat(30),
    )
    .unwrap();

    let whole = tmp.path().join("whole");
    let a = tokenscope::train::run(&lora_options(&base, &data, &whole, 12)).unwrap();
    // The held-out loss falls. (A random base predicts almost uniformly, ln 50257 ≈ 10.8, and
    // its frozen head is small: an adapter alone moves it slowly.)
    let first = a.evals.first().unwrap().1;
    let last = a.evals.last().unwrap().1;
    assert!(last < first - 0.1, "the adapter learns: {first} → {last}");
    assert!(whole.join("adapter_config.json").is_file());
    assert!(
        !whole.join("model.safetensors").exists(),
        "the base is not copied"
    );
    let adapter_bytes = std::fs::metadata(whole.join("adapter_model.safetensors"))
        .unwrap()
        .len();
    // 2 layers × (q, v: 4 × (64 + 64); gate: 4 × (64 + 96)) f32, plus the header.
    assert!(adapter_bytes < 64 << 10, "{adapter_bytes} bytes");
    let checkpoints = whole.join("checkpoints");
    let ck_bytes = tokenscope::train::jobs::dir_bytes(&checkpoints);
    assert!(
        ck_bytes > 0 && ck_bytes < 1 << 20,
        "checkpoints: {ck_bytes} bytes"
    );

    // Stopped after 5 steps, resumed: the same losses, bit for bit.
    let split = tmp.path().join("split");
    let mut o = lora_options(&base, &data, &split, 12);
    o.stop_after = Some(5);
    let b1 = tokenscope::train::run(&o).unwrap();
    assert!(b1.interrupted);
    o.stop_after = None;
    o.resume = true;
    let b2 = tokenscope::train::run(&o).unwrap();
    let resumed: Vec<(usize, f64)> = b1.losses.iter().chain(&b2.losses).copied().collect();
    assert_eq!(
        resumed, a.losses,
        "a resumed run's losses are the uninterrupted run's"
    );

    // PEFT reads the adapter and computes what tokenscope computes with it.
    let m = load(&whole).unwrap();
    let (_, ids) = &prompts()[1];
    let ours = common::all_logprobs(&m, ids);
    let theirs = peft_logprobs(&base, &whole, ids, m.model.config().vocab_size);
    let mut worst = 0f32;
    for (pos, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        let d = common::max_abs_diff(o, t);
        assert!(d <= 1e-4, "position {pos}: {d}");
        worst = worst.max(d);
    }
    eprintln!("trained adapter: max |Δ logprob| vs PEFT {worst:.2e}; {adapter_bytes} bytes; checkpoints {ck_bytes} bytes");
}

/// `--base` puts an adapter on a base its adapter_config.json does not name (a base moved or
/// renamed since), and GET /models names the base of each adapter.
#[test]
fn base_chooses_an_adapters_base() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter) = (tmp.path().join("llama"), tmp.path().join("lora"));
    for (from, to) in [("base", &base), ("all-modules", &adapter)] {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(fixtures().join(from)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let cfg_path = adapter.join("adapter_config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["base_model_name_or_path"] = json!("/nowhere/llama");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let server = Server::start(
        &tmp.path().join("state"),
        &[
            "--model",
            base.to_str().unwrap(),
            "--model",
            adapter.to_str().unwrap(),
            // The same folder by another path.
            "--base",
            adapter.join("../llama").to_str().unwrap(),
            "--max-loaded-models",
            "2",
        ],
    );
    let (_, list) = server.get("/models");
    assert_eq!(list[1]["id"], "lora", "{list}");
    assert_eq!(list[1]["base"], list[0]["id"], "{list}");
    assert!(list[0].get("base").is_none(), "{list}");
    let (code, m) = server.post("/models/lora/load", json!({}));
    assert!(code == 200 || code == 202, "{m}");
    server.wait(std::time::Duration::from_secs(60), "adapter loaded", |s| {
        s.model("lora")["status"] == "loaded"
    });
    // On the served base's weights: the adapter adds only its own.
    let mb = |id: &str| server.model(id)["memory_mb"].as_f64().unwrap();
    assert!(
        mb("lora") < mb("llama") / 4.0,
        "{} on {}",
        mb("lora"),
        mb("llama")
    );
    server.kill();
    // The same from the command line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenscope"))
        .args(["inspect", "--model"])
        .arg(&adapter)
        .arg("--base")
        .arg(&base)
        .arg("Hello")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// QLoRA end to end: an adapter trained on the default GGUF (its base kept packed) gives, in
/// PEFT on transformers reading the same GGUF (its blocks dequantized by the `gguf` package),
/// the log-probs tokenscope serves for it.
#[test]
fn an_adapter_trained_on_the_gguf_gives_pefts_log_probs_on_transformers_reading_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("corpus.txt");
    std::fs::write(
        &data,
        "The quick brown fox jumps over the lazy dog. ".repeat(30)
            + &"Pack my box with five dozen liquor jugs. ".repeat(30),
    )
    .unwrap();
    let gguf = common::default_gguf();
    let out = tmp.path().join("fox-lora");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tokenscope"))
        .args(["train", "--model"])
        .arg(&gguf)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&out)
        .args([
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "0.01",
        ])
        .args([
            "--warmup",
            "0",
            "--lora-r",
            "4",
            "--lora-targets",
            "q_proj,v_proj,down_proj",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let m = load(&out).unwrap();
    let base = tokenscope::model::load(
        &tokenscope::model::ModelSource::Gguf(gguf.clone()),
        &Default::default(),
    )
    .unwrap();
    let ids = m
        .tokenizer
        .encode("The quick brown fox jumps over the")
        .unwrap();
    let ours = common::all_logprobs(&m, &ids);
    let plain = common::all_logprobs(&base, &ids);
    assert!(
        ours.iter()
            .zip(&plain)
            .any(|(a, b)| common::max_abs_diff(a, b) > 1e-3),
        "the adapter changes the distribution"
    );
    let theirs = peft_logprobs(&gguf, &out, &ids, m.model.config().vocab_size);
    let mut worst = 0f32;
    for (pos, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        let d = common::max_abs_diff(o, t);
        assert!(d <= 1e-3, "position {pos}: {d}");
        worst = worst.max(d);
    }
    eprintln!("adapter on the GGUF: max |Δ logprob| vs PEFT on transformers' GGUF {worst:.2e}");
}
