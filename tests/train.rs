//! Training mechanics on tiny random models (fast): gradients reach every parameter, loss falls,
//! a resumed run equals an uninterrupted one, outputs load back, bad input is refused clearly.
//! Plus the `--steps 0` conversion of the real default model.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use tokenscope::model::{self, Config, LoadOptions, ModelSource};
use tokenscope::train::{self, TrainError, TrainOptions};

fn corpus(dir: &Path) -> std::path::PathBuf {
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(40)
        + &"Pack my box with five dozen liquor jugs. ".repeat(40);
    let p = dir.join("corpus.txt");
    std::fs::write(&p, text).unwrap();
    p
}

/// Rank and probability of " dog" after "The quick brown fox jumps over the lazy" (what a
/// model trained on [`corpus`] should have learned).
fn dog_after_the_lazy(m: &model::LoadedModel) -> (usize, f32) {
    let ids = m
        .tokenizer
        .encode("The quick brown fox jumps over the lazy")
        .unwrap();
    let logits = m.model.next_logits(&ids, &mut m.model.new_cache()).unwrap();
    let d = tokenscope::engine::Distribution::from_logits(&logits, 1.0).unwrap();
    let dog = m.tokenizer.encode(" dog").unwrap()[0];
    (d.rank(dog), d.logprob(dog).exp() as f32)
}

fn tiny_options(data: &Path, output: &Path) -> TrainOptions {
    TrainOptions {
        model: Some(common::default_gguf().to_string_lossy().into()),
        data: Some(data.to_path_buf()),
        output: output.to_path_buf(),
        from_scratch: true,
        config: Some("tiny".into()),
        steps: Some(30),
        batch_size: 4,
        seq_len: 32,
        lr: 1e-2,
        warmup: 3,
        eval_every: 10,
        eval_fraction: 0.1,
        progress: false,
        seed: 7,
        ..Default::default()
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let mut cfg = Config::tiny(512);
    cfg.tie_word_embeddings = false;
    let tensors = model::init::random_weights(&cfg, 1, &Device::Cpu).unwrap();
    let n_params = tensors.len();
    let (lm, named) = train::trainable(&cfg, tensors, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(named.len(), n_params);
    let ids: Vec<u32> = (0..2 * 17).map(|i| (i * 37 % 512) as u32).collect();
    let w = Tensor::from_vec(ids, (2, 17), &Device::Cpu).unwrap();
    let x = w.narrow(1, 0, 16).unwrap();
    let y = w.narrow(1, 1, 16).unwrap();
    let missing = train::parameters_without_gradient(&lm, &named, &x, &y).unwrap();
    assert!(missing.is_empty(), "no gradient for: {missing:?}");
    // The inference path (fused kernels) would not give these gradients: guard the guard.
    assert!(named.iter().any(|(n, _)| n.contains("q_proj")));
    assert!(named.iter().any(|(n, _)| n == "lm_head.weight"));
}

#[test]
fn loss_falls_and_the_output_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let out = dir.path().join("out");
    let s = train::run(&tiny_options(&data, &out)).unwrap();
    assert_eq!(s.steps_done, 30);
    let first = s.losses[0].1;
    let last = s.losses.last().unwrap().1;
    assert!(last < first * 0.5, "loss {first} -> {last}");
    let (e0, e1) = (s.evals[0].1, s.evals.last().unwrap().1);
    assert!(e1 < e0, "held-out loss {e0} -> {e1}");

    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "train_log.jsonl",
        "train_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let log = std::fs::read_to_string(out.join("train_log.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        records.iter().filter(|r| r.get("loss").is_some()).count(),
        30
    );
    assert!(records.iter().all(|r| r["step"].is_u64()));
    assert!(records
        .iter()
        .filter(|r| r.get("loss").is_some())
        .all(|r| r["lr"].is_f64() && r["tokens_per_s"].is_f64()));
    assert!(records
        .iter()
        .filter(|r| r.get("eval_loss").is_some())
        .all(|r| r["eval_perplexity"].is_f64()));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("train_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["data"]["sha256"].as_str().unwrap().len(), 64);
    assert!(cfg["data"]["tokens"].as_u64().unwrap() > 100);

    // The directory loads through the HF-directory path and has learned the corpus.
    let m = model::load(&ModelSource::HfDir(out.clone()), &LoadOptions::default()).unwrap();
    let (rank, p) = dog_after_the_lazy(&m);
    // From uniform (p ≈ 2e-5) to a top candidate in 30 steps.
    assert!(rank <= 3, "rank of ' dog': {rank}");
    assert!(p > 0.05, "p(' dog') = {p}");
}

#[test]
fn resumed_run_equals_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let opts = |out: &str| TrainOptions {
        steps: Some(8),
        eval_every: 0,
        ..tiny_options(&data, &dir.path().join(out))
    };

    let full = train::run(&opts("full")).unwrap();
    let first = train::run(&TrainOptions {
        stop_after: Some(3),
        ..opts("resumed")
    })
    .unwrap();
    assert!(first.interrupted);
    assert_eq!(first.steps_done, 3);
    assert!(dir
        .path()
        .join("resumed/checkpoints/step-0000003/optimizer.safetensors")
        .is_file());
    let second = train::run(&TrainOptions {
        resume: true,
        ..opts("resumed")
    })
    .unwrap();
    assert_eq!(second.steps_done, 8);
    let resumed: Vec<(usize, f64)> = first.losses.iter().chain(&second.losses).copied().collect();
    assert_eq!(resumed.len(), full.losses.len());
    for ((s1, l1), (s2, l2)) in full.losses.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert!((l1 - l2).abs() < 1e-5, "step {s1}: {l1} vs {l2}");
    }
    // Same final weights too.
    let a = candle_core::safetensors::load(dir.path().join("full/model.safetensors"), &Device::Cpu)
        .unwrap();
    let b =
        candle_core::safetensors::load(dir.path().join("resumed/model.safetensors"), &Device::Cpu)
            .unwrap();
    for (k, ta) in &a {
        let diff = common::max_abs_diff_tensors(ta, &b[k]);
        assert!(diff < 1e-5, "{k}: {diff}");
    }
}

#[test]
fn steps_zero_converts_the_default_gguf_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hf");
    let s = train::run(&TrainOptions {
        model: Some(common::default_gguf().to_string_lossy().into()),
        steps: Some(0),
        output: out.clone(),
        progress: false,
        ..Default::default()
    })
    .unwrap();
    assert_eq!(s.steps_done, 0);
    let converted = model::load(&ModelSource::HfDir(out), &LoadOptions::default()).unwrap();
    let base = common::smollm();
    for prompt in [
        "The capital of France is",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    ] {
        let ids = base.tokenizer.encode(prompt).unwrap();
        assert_eq!(converted.tokenizer.encode(prompt).unwrap(), ids);
        let lp = |m: &tokenscope::model::LoadedModel| common::next_logprobs(&m.model, &ids);
        let (a, b) = (lp(base), lp(&converted));
        // The packed file's kernels vs the converted dense weights through candle's matmul.
        common::assert_smollm_close(prompt, &a, &b, ids.len());
    }
    assert_eq!(converted.eos_ids, base.eos_ids);
}

fn expect_err(opts: TrainOptions, needle: &str) {
    let err = train::run(&opts).unwrap_err();
    assert!(
        err.to_string().contains(needle),
        "expected {needle:?} in: {err}"
    );
}

#[test]
fn bad_data_and_flags_fail_clearly_before_compute() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let base = tiny_options(&corpus(dir.path()), &out);
    let with_data = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        TrainOptions {
            data: Some(p),
            ..base.clone()
        }
    };
    expect_err(with_data("empty.txt", b""), "no non-empty");
    expect_err(with_data("blank.txt", b"   \n\n  "), "contains no text");
    expect_err(
        with_data("binary.txt", &[0x7f, 0x45, 0x4c, 0x46, 0, 1, 2, 0]),
        "binary",
    );
    expect_err(
        with_data("latin1.txt", &[0x63, 0x61, 0x66, 0xe9, 0x20, 0x61]),
        "not UTF-8",
    );
    expect_err(
        with_data("short.txt", b"Just a few words."),
        "too little data",
    );
    expect_err(
        with_data("bad.jsonl", b"{\"text\": \"ok\"}\nnot json\n"),
        "line 2",
    );
    expect_err(
        with_data("nofield.jsonl", b"{\"body\": \"no text field\"}\n"),
        "`text`",
    );
    expect_err(
        TrainOptions {
            data: Some(dir.path().join("missing.txt")),
            ..base.clone()
        },
        "does not exist",
    );
    expect_err(
        TrainOptions {
            data: None,
            ..base.clone()
        },
        "--data is required",
    );
    expect_err(
        TrainOptions {
            batch_size: 0,
            ..base.clone()
        },
        "--batch-size",
    );
    expect_err(
        TrainOptions {
            eval_fraction: 1.5,
            ..base.clone()
        },
        "--eval-fraction",
    );
    expect_err(
        TrainOptions {
            lr: -1.0,
            ..base.clone()
        },
        "--lr",
    );
    expect_err(
        TrainOptions {
            epochs: Some(1.0),
            ..base.clone()
        },
        "not both",
    );
    expect_err(
        TrainOptions {
            dtype: "bf16".into(),
            device: "cpu".into(),
            ..base.clone()
        },
        "bf16 training needs a GPU",
    );
    expect_err(
        TrainOptions {
            config: Some("/no/such/config.json".into()),
            ..base.clone()
        },
        "--config",
    );
    assert!(matches!(
        train::run(&TrainOptions {
            model: Some("/no/model.gguf".into()),
            ..base.clone()
        })
        .unwrap_err(),
        TrainError::Model(_)
    ));
    // Nothing was trained or written by any of these.
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn jsonl_and_folders_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("docs");
    std::fs::create_dir(&folder).unwrap();
    for i in 0..3 {
        std::fs::write(
            folder.join(format!("{i}.txt")),
            format!("Document {i}. ").repeat(60),
        )
        .unwrap();
    }
    let jsonl = dir.path().join("data.jsonl");
    let lines: Vec<String> = (0..30)
        .map(|i| {
            serde_json::json!({"text": format!("Line {i} of JSONL data, fairly short.")})
                .to_string()
        })
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let tk = &common::smollm().tokenizer;
    let a = train::data::build(&folder, tk, 0, 16, 0.1).unwrap();
    assert_eq!(a.documents, 3);
    assert!(!a.eval.is_empty() && !a.train.is_empty());
    assert!(a.train.iter().chain(&a.eval).all(|w| w.len() == 17));
    let b = train::data::build(&jsonl, tk, 0, 16, 0.1).unwrap();
    assert_eq!(b.documents, 30);
    // Deterministic split.
    let c = train::data::build(&jsonl, tk, 0, 16, 0.1).unwrap();
    assert_eq!(b.eval, c.eval);
}

/// Gemma 3 loads and serves, but its Hugging Face directory cannot be written yet: training
/// it is refused by name before any weight is read.
#[test]
fn training_gemma3_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::default_gguf().parent().unwrap().to_path_buf();
    let opts = TrainOptions {
        model: Some(
            models
                .join("gemma-3-270m-q4_k_m.gguf")
                .to_string_lossy()
                .into(),
        ),
        from_scratch: false,
        config: None,
        steps: Some(0),
        ..tiny_options(&corpus(dir.path()), &dir.path().join("gemma3"))
    };
    expect_err(opts, "training gemma3 models is not supported yet");
}

/// The nanoGPT demo: a GPT-2 from scratch (`--from-scratch --arch gpt2 --config tiny`) with
/// GPT-2's real vocabulary learns a small corpus, and its output is a Hugging Face GPT-2
/// directory (Conv1D layout, fused c_attn) that loads back.
#[test]
fn gpt2_from_scratch_learns_and_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let vocab = common::default_gguf()
        .parent()
        .unwrap()
        .join("vocab/ggml-vocab-gpt-2.gguf");
    let out = dir.path().join("gpt2");
    let opts = TrainOptions {
        model: Some(vocab.to_string_lossy().into()),
        arch: Some("gpt2".into()),
        ..tiny_options(&corpus(dir.path()), &out)
    };
    let s = train::run(&opts).unwrap();
    let (first, last) = (s.losses[0].1, s.losses.last().unwrap().1);
    assert!(last < first * 0.5, "loss {first} -> {last}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "gpt2");
    assert_eq!(config["n_embd"], 64);
    let names: Vec<String> =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
    assert!(names.contains(&"transformer.h.0.attn.c_attn.weight".to_string()));
    assert!(names.contains(&"transformer.wpe.weight".to_string()));

    let m = model::load(&ModelSource::HfDir(out), &LoadOptions::default()).unwrap();
    assert_eq!(m.architecture, "gpt2");
    let (rank, _) = dog_after_the_lazy(&m);
    assert!(rank <= 3, "rank of ' dog': {rank}");
}

/// `--arch` names a family or fails clearly, and only goes with --from-scratch.
#[test]
fn arch_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    expect_err(
        TrainOptions {
            arch: Some("bert".into()),
            ..tiny_options(&data, &dir.path().join("a"))
        },
        "--arch bert: expected llama, mistral, qwen2, phi3, gemma2 or gpt2",
    );
    expect_err(
        TrainOptions {
            arch: Some("gpt2".into()),
            from_scratch: false,
            config: None,
            ..tiny_options(&data, &dir.path().join("b"))
        },
        "--arch only applies with --from-scratch",
    );
}

/// A LoRA run on a GGUF base keeps the frozen base packed (QLoRA-style: the file's blocks, no
/// f32 copy) and trains as it would on the dequantized dense base
/// (`TOKENSCOPE_DENSE_ONLY=1`): the same losses at every step, to float rounding.
#[test]
fn lora_on_a_packed_gguf_base_trains_as_on_its_dense_weights() {
    let dir = tempfile::tempdir().unwrap();
    let data = corpus(dir.path());
    let losses = |dense: bool| -> Vec<f64> {
        let out = dir.path().join(if dense { "dense" } else { "packed" });
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_tokenscope"))
            .args(["train", "--model"])
            .arg(common::default_gguf())
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
            .args(["--warmup", "0", "--lora-r", "4", "--lora-dropout", "0.1"])
            .env("TOKENSCOPE_DENSE_ONLY", if dense { "1" } else { "0" })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read_to_string(out.join("train_log.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
            .collect()
    };
    let (packed, dense) = (losses(false), losses(true));
    assert_eq!(packed.len(), 3);
    for (p, d) in packed.iter().zip(&dense) {
        assert!(
            (p - d).abs() <= 1e-4 * d.abs(),
            "packed {packed:?} vs dense {dense:?}"
        );
    }
}

/// Gradient checkpointing (what LoRA runs train with) changes no number: the loss and every
/// adapter gradient equal those of the pass that keeps all activations.
#[test]
fn checkpointed_layers_give_the_same_gradients() {
    let dev = Device::Cpu;
    let cfg = Config::tiny_of("llama", 300).unwrap();
    let base = model::init::random_weights(&cfg, 5, &dev).unwrap();
    let o = train::lora::LoraOptions {
        r: 4,
        alpha: 8.0,
        dropout: 0.2,
        targets: ["q_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
    };
    // B starts at zero (PEFT's init); random here, so that A's gradients are not zero too.
    let adapter: std::collections::HashMap<String, Tensor> = train::lora::init(&o, &cfg, 1, &dev)
        .unwrap()
        .into_iter()
        .map(|(n, t)| match n.contains("lora_B") {
            true => (n, t.randn_like(0.0, 0.1).unwrap()),
            false => (n, t),
        })
        .collect();
    let key = train::lora::DropoutKey::new(o.dropout, 9);
    key.train(0, 0);
    let (mut lm, named) = train::trainable_lora(
        &cfg,
        (base, Default::default()),
        adapter,
        &o,
        Some(&key),
        DType::F32,
        &dev,
    )
    .unwrap();
    let ids: Vec<u32> = (0..2 * 16).map(|i| (i * 37 % 300) as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (2, 16), &dev).unwrap();
    let y = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % 300).collect::<Vec<u32>>(),
        (2, 16),
        &dev,
    )
    .unwrap();
    let grads = |lm: &model::Decoder| {
        let l = train::loss(lm, &x, &y).unwrap();
        let store = l.backward().unwrap();
        let mut g = train::optim::collect_grads(&named, &store);
        if let Some(sink) = lm.grad_sink() {
            for (var, grad) in sink.drain() {
                let (n, _) = named
                    .iter()
                    .find(|(_, v)| v.as_tensor().id() == var.id())
                    .unwrap();
                assert!(g.insert(n.clone(), grad).is_none(), "{n} twice");
            }
        }
        (l.to_scalar::<f32>().unwrap(), g)
    };
    assert!(
        lm.grad_sink().is_some(),
        "LoRA runs checkpoint their layers"
    );
    let (l1, g1) = grads(&lm);
    lm.checkpoint_layers(false);
    let (l2, g2) = grads(&lm);
    assert_eq!(l1, l2);
    assert_eq!(g1.len(), named.len());
    assert_eq!(g2.len(), named.len());
    for (n, a) in &g1 {
        let d = common::max_abs_diff_tensors(a, &g2[n]);
        let scale: f32 = g2[n].abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d <= 1e-5 * scale.max(1e-3), "{n}: {d} (of {scale})");
        assert!(scale > 0.0, "{n} has a gradient");
    }
}
