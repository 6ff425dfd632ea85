//! POST /compare (issue 28) on generated-weight models: every figure equals an independent
//! numpy computation (scripts/compare/reference.py) from the two models' full-vocabulary
//! logits within 1e-6 relative; a model compared with itself has KL exactly 0; a continuation
//! is scored alone; models that tokenize differently are refused with TOKENIZER_MISMATCH.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use tokenscope::api::{self, AppState, ServeConfig};
use tokenscope::engine::registry::{ModelRegistry, Origin, RegistrySettings};
use tokenscope::engine::worker::ModelState;
use tokenscope::model::{self, LoadOptions, ModelSource};

const TEXT: &str =
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.";

/// The Python of the reference environment scripts/families.sh builds (numpy), where
/// scripts/lib/cache.sh keeps it.
fn reference_python() -> PathBuf {
    let cache = common::cache_dir();
    let python = cache.join("venv-ref/bin/python");
    assert!(
        python.exists(),
        "{}: missing; run ./scripts/families.sh (the README's test command does)",
        python.display()
    );
    python
}

struct Models {
    app: axum::Router,
    ids: Vec<String>,
    dirs: Vec<PathBuf>,
    _tmp: tempfile::TempDir,
}

/// Two tiny random llamas (seeds 1 and 2, the default model's tokenizer) and Gemma 3 (another
/// tokenizer), loaded in one registry behind the router.
fn models() -> Models {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = [1u64, 2]
        .iter()
        .map(|&seed| {
            let dir = tmp.path().join(format!("tiny-{seed}"));
            common::write_tiny_llama(&dir, seed);
            dir
        })
        .collect();
    let registry = Arc::new(ModelRegistry::new(RegistrySettings {
        max_loaded: 4,
        ..Default::default()
    }));
    let mut ids: Vec<String> = dirs
        .iter()
        .map(|d| registry.add(ModelSource::HfDir(d.clone()), Origin::Configured))
        .collect();
    ids.push(registry.add(ModelSource::Gguf(common::gemma3_path()), Origin::Configured));
    for id in &ids {
        registry.load(id).unwrap();
    }
    common::wait_until("models loaded", Duration::from_secs(120), || {
        ids.iter()
            .all(|id| matches!(registry.model_state(id), ModelState::Ready(_)))
    });
    let app = api::router(AppState::with_models(
        registry,
        None,
        ServeConfig::default(),
    ));
    Models {
        app,
        ids,
        dirs,
        _tmp: tmp,
    }
}

async fn compare(app: &axum::Router, body: Value) -> (u16, Value) {
    let (status, v) = common::http::post(app, "/compare", body).await;
    (status.as_u16(), v)
}

/// Every position's logits (rows × vocabulary, f32 little-endian) of the model in `dir`: the
/// same forward pass the server runs, written for the reference.
fn write_logits(dir: &Path, ids: &[u32], out: &Path) -> usize {
    let m = model::load(
        &ModelSource::HfDir(dir.to_path_buf()),
        &LoadOptions::default(),
    )
    .unwrap();
    let input = candle_core::Tensor::new(&ids[..ids.len() - 1], &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits = m
        .model
        .forward_all(&input, &mut m.model.new_cache())
        .unwrap();
    let values: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(out, bytes).unwrap();
    m.model.config().vocab_size
}

fn close(what: &str, ours: f64, reference: f64) {
    let tol = 1e-6 * reference.abs().max(1e-9);
    assert!(
        (ours - reference).abs() <= tol,
        "{what}: {ours:e} vs numpy {reference:e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_agrees_with_numpy_and_refuses_what_it_cannot_compare() {
    let m = tokio::task::spawn_blocking(models).await.unwrap();
    let (a, b, gemma) = (m.ids[0].clone(), m.ids[1].clone(), m.ids[2].clone());
    let tmp = tempfile::tempdir().unwrap();

    // The whole text.
    let (status, resp) = compare(&m.app, json!({"models": [a, b], "text": TEXT, "top_k": 3})).await;
    assert_eq!(status, 200, "{resp}");
    let tokenizer =
        tokenscope::model::TextTokenizer::from_file(&m.dirs[0].join("tokenizer.json"), 49152)
            .unwrap();
    let ids = tokenizer.encode(TEXT).unwrap();
    assert_eq!(resp["tokens"], ids.len());
    let positions = resp["positions"].as_array().unwrap();
    assert_eq!(positions.len(), ids.len() - 1);
    let (la, lb) = (tmp.path().join("a.f32"), tmp.path().join("b.f32"));
    let vocab = write_logits(&m.dirs[0], &ids, &la);
    write_logits(&m.dirs[1], &ids, &lb);
    let reference = run_reference(&la, &lb, &ids, 0, vocab, tmp.path());
    compare_with(&resp, &reference, 3);
    // Two different random models do disagree somewhere: the comparison is not vacuous.
    assert!(
        resp["summary"]["kl_mean"].as_f64().unwrap() > 1e-6,
        "{}",
        resp["summary"]
    );
    assert!(positions.len() > 10);

    // `tokenscope inspect --compare` (no server) gives the same figures.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenscope"))
        .args(["inspect", "--model"])
        .arg(&m.dirs[0])
        .arg("--compare")
        .arg(&m.dirs[1])
        .args([TEXT, "--json", "-k", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let local: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(local["positions"], resp["positions"]);
    assert_eq!(local["summary"], resp["summary"]);
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_tokenscope"))
        .args(["inspect", "--model"])
        .arg(&m.dirs[0])
        .arg("--compare")
        .arg(&m.dirs[1])
        .arg(TEXT)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("KL(A‖B) mean") && table.contains("differ most"),
        "{table}"
    );

    // A continuation alone: the positions after the prompt.
    let (status, cont) = compare(
        &m.app,
        json!({"models": [a, b], "prompt": "The quick brown fox", "continuation": " jumps over the lazy dog."}),
    )
    .await;
    assert_eq!(status, 200, "{cont}");
    let prompt = tokenizer.encode("The quick brown fox").unwrap();
    let mut ids2 = prompt.clone();
    ids2.extend(
        tokenizer
            .encode_without_special(" jumps over the lazy dog.")
            .unwrap(),
    );
    write_logits(&m.dirs[0], &ids2, &la);
    write_logits(&m.dirs[1], &ids2, &lb);
    let reference = run_reference(&la, &lb, &ids2, prompt.len() - 1, vocab, tmp.path());
    assert_eq!(cont["positions"][0]["position"], prompt.len(), "{cont}");
    compare_with(&cont, &reference, 5);

    // A model with itself: exactly 0 everywhere, full agreement.
    let (status, same) = compare(&m.app, json!({"models": [a, a], "text": TEXT})).await;
    assert_eq!(status, 200, "{same}");
    for p in same["positions"].as_array().unwrap() {
        assert_eq!(
            (p["kl_ab"].as_f64(), p["kl_ba"].as_f64()),
            (Some(0.0), Some(0.0)),
            "{p}"
        );
        assert_eq!(p["delta_logprob"].as_f64(), Some(0.0));
    }
    assert_eq!(
        same["summary"]["top1_agreement_percent"].as_f64(),
        Some(100.0)
    );
    assert_eq!(same["summary"]["kl_max"].as_f64(), Some(0.0));

    // Different tokenizers: refused, naming the difference.
    let (status, e) = compare(&m.app, json!({"models": [a, gemma], "text": TEXT})).await;
    assert_eq!(
        (status, e["error_code"].as_str()),
        (422, Some("TOKENIZER_MISMATCH")),
        "{e}"
    );
    assert!(e["detail"].as_str().unwrap().contains("tokens"), "{e}");
    // Unknown model, bad bodies.
    let (status, e) = compare(&m.app, json!({"models": [a, "nope"], "text": TEXT})).await;
    assert_eq!(
        (status, e["error_code"].as_str()),
        (404, Some("MODEL_NOT_FOUND")),
        "{e}"
    );
    for bad in [
        json!({"models": [a], "text": TEXT}),
        json!({"models": [a, b], "text": TEXT, "prompt": "x"}),
        json!({"models": [a, b]}),
    ] {
        let (status, e) = compare(&m.app, bad.clone()).await;
        assert_eq!(
            (status, e["error_code"].as_str()),
            (422, Some("VALIDATION_ERROR")),
            "{bad}: {e}"
        );
    }
    let (status, e) = compare(&m.app, json!({"models": [a, b], "text": TEXT, "top_k": 0})).await;
    assert_eq!(
        (status, e["error_code"].as_str()),
        (422, Some("INVALID_TOP_K")),
        "{e}"
    );
    // The digest GET /models shows is the one the response names.
    let (_, _, body) = common::http::send(&m.app, common::http::get("/models")).await;
    let models: Value = serde_json::from_str(&body).unwrap();
    let digest = models
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["id"] == a.as_str())
        .unwrap()["tokenizer"]
        .clone();
    assert_eq!(digest, resp["tokenizer"]);
}

fn run_reference(
    la: &Path,
    lb: &Path,
    ids: &[u32],
    first_row: usize,
    vocab: usize,
    dir: &Path,
) -> Value {
    let ids_path = dir.join("ids.json");
    std::fs::write(&ids_path, serde_json::to_string(ids).unwrap()).unwrap();
    let out = dir.join("reference.json");
    let status = std::process::Command::new(reference_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/compare/reference.py"))
        .args([la, lb, &ids_path])
        .args([first_row.to_string(), vocab.to_string()])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "reference.py failed");
    serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap()
}

fn compare_with(resp: &Value, reference: &Value, top_k: usize) {
    let ours = resp["positions"].as_array().unwrap();
    let theirs = reference["positions"].as_array().unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (o, t) in ours.iter().zip(theirs) {
        assert_eq!(o["position"], t["position"]);
        assert_eq!(o["token_id"], t["token_id"]);
        for f in ["logprob_a", "logprob_b", "kl_ab", "kl_ba"] {
            close(
                &format!("{f} at {}", o["position"]),
                o[f].as_f64().unwrap(),
                t[f].as_f64().unwrap(),
            );
        }
        close(
            "delta",
            o["delta_logprob"].as_f64().unwrap(),
            t["logprob_b"].as_f64().unwrap() - t["logprob_a"].as_f64().unwrap(),
        );
        assert_eq!(o["top1_agree"], t["top1_agree"]);
        assert_eq!(o["top_a"][0]["token_id"], t["top1_a"]);
        assert_eq!(o["top_b"][0]["token_id"], t["top1_b"]);
        assert_eq!(o["top_a"].as_array().unwrap().len(), top_k);
    }
    let (s, r) = (&resp["summary"], &reference["summary"]);
    assert_eq!(s["positions"], r["positions"]);
    assert_eq!(s["kl_max_position"], r["kl_max_position"]);
    for f in [
        "kl_mean",
        "kl_median",
        "kl_p99",
        "kl_max",
        "kl_ba_mean",
        "top1_agreement_percent",
        "perplexity_a",
        "perplexity_b",
        "rms_delta_p_percent",
    ] {
        close(f, s[f].as_f64().unwrap(), r[f].as_f64().unwrap());
    }
}
