//! `--activations q8` against llama.cpp itself. `scripts/q8.sh` (run by the README's test
//! command) has stock llama.cpp (llama-cpp-python's vendored copy, built by
//! scripts/families.sh) (1) multiply random inputs with every weight format through its own
//! CPU kernels (`from_float` of the dot type, then `vec_dot`, called through ctypes), and
//! (2) evaluate the three real test models — SmolLM2 Q4_1, Gemma 3 Q4_K_M, Qwen2.5 Q4_K_M —
//! on a short and a long prompt, with and without flash attention, keeping its
//! log-probabilities over the whole vocabulary.
//!
//! Checked here: our q8 matmuls are ggml's, product for product (≤ 1e-5 relative: only the
//! order of f32 sums differs); whole models are as close to llama.cpp as llama.cpp's two
//! attention paths are to each other — not closer, and no implementation can be: 8-bit
//! activations turn any last-bit difference upstream (an f16 rounding, the order of a sum)
//! into a different integer downstream, so llama.cpp with and without flash attention, same
//! build, same machine, differs by up to 1.3 in a log-prob (see the README); batching stays
//! invisible in q8 mode too; the models the mode cannot run are refused, saying why.

mod common;

use std::path::{Path, PathBuf};

use tokenscope::model::packed::PackedMatrix;
use tokenscope::model::q8::Activations;
use tokenscope::model::quant::Format;
use tokenscope::model::{self, LoadOptions, LoadedModel, ModelSource};

fn reference_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/q8");
    assert!(
        dir.join("index.json").is_file(),
        "{}: missing; run ./scripts/q8.sh (the README's test command does)",
        dir.display()
    );
    dir
}

struct Reference {
    ids: Vec<u32>,
    positions: Vec<usize>,
    vocab: usize,
    /// positions × vocab, without and with flash attention.
    nofa: Vec<f32>,
    fa: Vec<f32>,
}

fn references(model: &str) -> Vec<Reference> {
    let dir = reference_dir();
    let raw = std::fs::read_to_string(dir.join("index.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let nums = |v: &serde_json::Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    json["models"][model]
        .as_array()
        .unwrap_or_else(|| panic!("no reference for {model}"))
        .iter()
        .map(|p| {
            let r = Reference {
                ids: nums(&p["ids"]).into_iter().map(|x| x as u32).collect(),
                positions: nums(&p["positions"])
                    .into_iter()
                    .map(|x| x as usize)
                    .collect(),
                vocab: p["vocab"].as_u64().unwrap() as usize,
                nofa: common::read_f32(&dir.join(p["nofa"].as_str().unwrap())),
                fa: common::read_f32(&dir.join(p["fa"].as_str().unwrap())),
            };
            assert_eq!(r.nofa.len(), r.positions.len() * r.vocab);
            assert_eq!(r.fa.len(), r.nofa.len());
            r
        })
        .collect()
}

fn load(file: &str, activations: Activations) -> LoadedModel {
    model::load(
        &ModelSource::Gguf(common::test_asset(file)),
        &LoadOptions {
            activations,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Mean over the kept positions of KL(reference ‖ ours), in nats.
fn mean_kl(ours: &[Vec<f32>], theirs: &[f32], vocab: usize) -> f64 {
    let mut total = 0f64;
    for (row, want) in ours.iter().zip(theirs.chunks_exact(vocab)) {
        assert_eq!(row.len(), vocab);
        for (&p, &q) in want.iter().zip(row) {
            assert!(q.is_finite(), "a log-prob is {q}");
            total += (p as f64).exp() * (p as f64 - q as f64);
        }
    }
    total / ours.len() as f64
}

const MODELS: [&str; 3] = [
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma-3-270m-q4_k_m.gguf",
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
];

#[test]
fn q8_matmuls_are_ggmls_kernels() {
    let dir = reference_dir();
    let raw = std::fs::read_to_string(dir.join("index.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let kernels = json["kernels"].as_array().unwrap();
    assert_eq!(kernels.len(), 9, "every packed format");
    for k in kernels {
        let name = k["format"].as_str().unwrap();
        let format = match name {
            "Q4_0" => Format::Q4_0,
            "Q4_1" => Format::Q4_1,
            "Q5_0" => Format::Q5_0,
            "Q5_1" => Format::Q5_1,
            "Q8_0" => Format::Q8_0,
            "Q4_K" => Format::Q4K,
            "Q5_K" => Format::Q5K,
            "Q6_K" => Format::Q6K,
            "F16" => Format::F16,
            other => panic!("unknown format {other}"),
        };
        let dim = |key: &str| k[key].as_u64().unwrap() as usize;
        let (rows, cols, n) = (dim("rows"), dim("cols"), dim("n"));
        let prefix = dir.join(k["prefix"].as_str().unwrap());
        let blocks = std::fs::read(prefix.with_extension("w")).unwrap();
        let x = common::read_f32(&prefix.with_extension("x"));
        let want = common::read_f32(&prefix.with_extension("y"));
        let m = PackedMatrix::from_blocks(format, rows, cols, blocks, None)
            .unwrap()
            .with_activations(Activations::Q8);
        let got = m.matmul(&x, n);
        let exact = m.clone().with_activations(Activations::F32).matmul(&x, n);
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let (mut worst, mut moved) = (0f32, 0f32);
        for ((g, w), e) in got.iter().zip(&want).zip(&exact) {
            worst = worst.max((g - w).abs() / scale);
            moved = moved.max((e - w).abs() / scale);
        }
        eprintln!("{name}: q8 vs ggml {worst:.1e}, f32 vs ggml {moved:.1e} (of the largest)");
        assert!(worst <= 1e-5, "{name}: {worst} from ggml's kernel");
        if format != Format::F16 {
            // The quantized activations are visible: what makes the mode llama.cpp's.
            assert!(
                moved > 1e-4,
                "{name}: the exact products are only {moved} away"
            );
        }
    }
}

#[test]
fn whole_models_are_as_close_to_llama_cpp_as_its_own_two_paths() {
    // KL at the first position (where llama.cpp's two attention paths agree exactly: one key),
    // summed over the models, for q8 and for the exact mode.
    let (mut first_q8, mut first_f32) = (0f64, 0f64);
    for file in MODELS {
        let q8 = load(file, Activations::Q8);
        assert_eq!(q8.model.activations(), Activations::Q8);
        let refs = references(file);
        let first = &refs[0];
        assert_eq!(first.positions[0], 0);
        let row0 = |m: &LoadedModel| vec![common::all_logprobs(m, &first.ids[..1]).remove(0)];
        let want0 = &first.nofa[..first.vocab];
        assert_eq!(want0, &first.fa[..first.vocab], "one key: both paths agree");
        first_q8 += mean_kl(&row0(&q8), want0, first.vocab);
        first_f32 += mean_kl(&row0(&load(file, Activations::F32)), want0, first.vocab);
        for r in refs {
            let all = common::all_logprobs(&q8, &r.ids);
            let ours: Vec<Vec<f32>> = r.positions.iter().map(|&p| all[p].clone()).collect();
            let fa: Vec<Vec<f32>> = r.fa.chunks_exact(r.vocab).map(<[f32]>::to_vec).collect();
            let (kl, spread) = (
                mean_kl(&ours, &r.nofa, r.vocab),
                mean_kl(&fa, &r.nofa, r.vocab),
            );
            eprintln!(
                "{file} ({} tokens): KL(llama.cpp ‖ q8) {kl:.2e} nats; llama.cpp's two \
                 attention paths: {spread:.2e}",
                r.ids.len()
            );
            assert!(
                kl <= 2.0 * spread,
                "{file}: KL {kl} vs llama.cpp's own {spread}"
            );
        }
    }
    eprintln!("first position, summed over the models: KL q8 {first_q8:.2e}, f32 {first_f32:.2e}");
    assert!(
        first_q8 < 0.5 * first_f32,
        "q8 {first_q8} is not nearer llama.cpp than the exact mode ({first_f32})"
    );
}

#[test]
fn batching_is_invisible_in_q8_mode() {
    let m = load(MODELS[0], Activations::Q8);
    let tok = |s: &str| m.tokenizer.encode(s).unwrap();
    let (a, b, c) = (
        tok("The capital of France is"),
        tok("def fib(n):"),
        tok("Once upon a time, in a small village at the edge of a great forest"),
    );
    let alone = m.model.prefill_fused(&[&a]).unwrap();
    let together = m.model.prefill_fused(&[&b, &a, &c]).unwrap();
    assert_eq!(alone[0].1, together[1].1, "a's logits alone and batched");
    // A longer sequence through candle's ops: each position's numbers do not depend on what
    // follows, nor on the batch it is in.
    let long: Vec<u32> = [a.clone(), c.clone(), c.clone(), c].concat();
    let full = common::all_logprobs(&m, &long);
    let prefix = common::all_logprobs(&m, &long[..long.len() - 7]);
    assert_eq!(full[..prefix.len()], prefix[..]);
    // Decoding continues the prefilled cache: a step after the batch equals a step after the
    // single prefill.
    let (mut one, mut many) = (alone[0].0.clone(), together[1].0.clone());
    let next = m.model.next_logits(&[a[0]], &mut one).unwrap();
    assert_eq!(next, m.model.next_logits(&[a[0]], &mut many).unwrap());
}

#[test]
fn models_the_mode_cannot_run_are_refused_saying_why() {
    let q8 = LoadOptions {
        activations: Activations::Q8,
        ..Default::default()
    };
    let tmp = tempfile::tempdir().unwrap();
    common::write_tiny_llama(tmp.path(), 1);
    let err = model::load(&ModelSource::HfDir(tmp.path().to_path_buf()), &q8)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--activations q8") && err.contains("not a GGUF"),
        "{err}"
    );
    let err = model::load(
        &ModelSource::Gguf(common::default_gguf()),
        &LoadOptions {
            dense_reference: true,
            ..q8.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("--activations q8") && err.contains("packed"),
        "{err}"
    );
    // The exact mode is the default.
    let m = model::load(
        &ModelSource::Gguf(common::default_gguf()),
        &LoadOptions::default(),
    );
    assert_eq!(m.unwrap().model.activations(), Activations::F32);
}
