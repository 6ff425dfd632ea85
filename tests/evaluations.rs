//! Evaluations and statistics over real HTTP on the default model: the perplexity equals
//! exp(−mean) of POST /v1/completions' echo log-probs on the same documents, BLEU and ROUGE-L
//! equal sacreBLEU's and rouge-score's on the same strings (scripts/evaluations/reference.py
//! in the venv `scripts/evaluations.sh` makes), the continuations are /generate's greedy ones,
//! results and counters survive a restart, and bad requests get clear errors.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::server::Server;
use serde_json::{json, Value};
use tokenscope::eval::{bleu, diversity, rouge};

fn reference_python() -> PathBuf {
    let cache = common::cache_dir();
    let python = cache.join("venv-metrics/bin/python");
    assert!(
        python.exists(),
        "{}: missing; run ./scripts/evaluations.sh (the README's test command does)",
        python.display()
    );
    python
}

/// sacreBLEU and rouge-score on `pairs` (hypothesis, reference).
fn reference(pairs: &[(String, String)]) -> Value {
    use std::io::Write;
    let mut child = Command::new(reference_python())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/evaluations/reference.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let input = json!({ "pairs": pairs }).to_string();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "reference.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn close(a: f64, b: f64, what: &str) {
    assert!(
        (a - b).abs() <= 1e-12 * b.abs().max(1.0),
        "{what}: {a} vs {b}"
    );
}

/// Strings that exercise every rule of the 13a tokenizer and rouge-score's tokenizer:
/// punctuation next to digits, entities, dashes, Unicode letters and spaces, case, empty and
/// disjoint hypotheses, and repeated n-grams (clipped counts).
fn hard_pairs() -> Vec<(String, String)> {
    [
        ("The cat sat on the mat.", "The cat sat on the mat."),
        (
            "It costs $3.50, or 1,000-2,000 (approx.)!",
            "It costs $3.50 or about 1,000 - 2,000.",
        ),
        (
            "a &amp; b &quot;quoted&quot; &lt;tag&gt;",
            "a & b \"quoted\" <tag>",
        ),
        ("the the the the the the", "the cat is on the mat"),
        ("Café naïve — résumé… ok", "cafe naive resume ok"),
        ("", "nothing was generated"),
        ("Line one\nline two-\nthree", "Line one line twothree"),
        ("UPPER lower MiXeD 42x 7.5.3", "upper LOWER mixed 42x 7.5.3"),
        ("trailing spaces   \t", "trailing spaces"),
        ("sep\u{1c}arated\u{2003}words", "sep arated words"),
        ("x,y.z 3.x x.3 ,, ..", "x , y . z"),
    ]
    .iter()
    .map(|(h, r)| (h.to_string(), r.to_string()))
    .collect()
}

#[test]
fn bleu_rouge_and_distinct_2_equal_sacrebleu_and_rouge_score_on_hard_strings() {
    let pairs = hard_pairs();
    let want = reference(&pairs);
    let mut stats = bleu::BleuStats::default();
    for (h, r) in &pairs {
        stats.add(h, r);
    }
    assert_eq!(stats.hyp_len, want["sys_len"].as_u64().unwrap());
    assert_eq!(stats.ref_len, want["ref_len"].as_u64().unwrap());
    for n in 0..bleu::MAX_ORDER {
        assert_eq!(
            stats.matches[n],
            want["counts"][n].as_u64().unwrap(),
            "order {}",
            n + 1
        );
        assert_eq!(
            stats.totals[n],
            want["totals"][n].as_u64().unwrap(),
            "order {}",
            n + 1
        );
    }
    let score = stats.score();
    assert!(score > 0.0 && score < 1.0, "{score}");
    close(score, want["bleu"].as_f64().unwrap() / 100.0, "BLEU");
    for (i, (h, r)) in pairs.iter().enumerate() {
        close(
            rouge::rouge_l_f1(r, h),
            want["rouge_l"][i].as_f64().unwrap(),
            h,
        );
    }
    let hyps: Vec<&str> = pairs.iter().map(|(h, _)| h.as_str()).collect();
    close(
        diversity::distinct_n(&hyps, 2).unwrap(),
        want["distinct_2"].as_f64().unwrap(),
        "distinct-2",
    );
    close(
        diversity::mean_words(&hyps).unwrap(),
        want["mean_words"].as_f64().unwrap(),
        "mean words",
    );
    // One pair at a time too: a corpus of one, where smoothing and the brevity penalty bite.
    for (h, r) in &pairs {
        let one = [(h.clone(), r.clone())];
        close(
            bleu::corpus_bleu([(h.as_str(), r.as_str())]),
            reference(&one)["bleu"].as_f64().unwrap() / 100.0,
            h,
        );
    }
}

const DOCS: [&str; 2] = [
    "The quick brown fox jumps over the lazy dog. It was not amused, and said so at length.",
    "Paris is the capital of France. Berlin is the capital of Germany. Madrid is the capital of Spain.",
];

/// exp(−mean) of /v1/completions' echo log-probs over `docs`, and the tokens scored.
fn completions_perplexity(server: &Server, model: &str) -> (f64, u64) {
    let (mut nll, mut n) = (0.0, 0u64);
    for doc in DOCS {
        let (code, r) = server.post(
            "/v1/completions",
            json!({"model": model, "prompt": doc, "echo": true, "logprobs": 0, "max_tokens": 0}),
        );
        assert_eq!(code, 200, "{r}");
        for lp in r["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
        {
            if let Some(lp) = lp.as_f64() {
                nll -= lp;
                n += 1;
            }
        }
    }
    ((nll / n as f64).exp(), n)
}

fn sigterm(server: Server) {
    // A graceful stop (the counters are written at shutdown), then the child is reaped.
    unsafe {
        libc::kill(server.child.id() as i32, libc::SIGTERM);
    }
    let mut server = server;
    let _ = server.child.wait();
}

#[test]
fn an_evaluation_scores_like_echo_and_continues_like_generate_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let default = common::default_gguf();
    let args = ["--model", default.to_str().unwrap()];
    let server = Server::start(&state, &args);
    let (_, models) = server.get("/models");
    let model = models[0]["id"].as_str().unwrap().to_string();

    // Data as a JSONL upload: one document per line.
    let jsonl: String = DOCS
        .iter()
        .map(|d| json!({ "text": d }).to_string() + "\n")
        .collect();
    let mut r = server
        .agent
        .post(&format!("{}/train/uploads", server.base))
        .content_type("application/jsonl")
        .send(jsonl.as_bytes())
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let upload: Value = r.body_mut().read_json().unwrap();
    let references = json!([
        {"prompt": "The capital of France is", "reference": " Paris, a city of two million people."},
        {"prompt": "Water boils at", "reference": " 100 degrees Celsius at sea level."},
        {"prompt": "One, two, three,", "reference": " four, five, six, seven."},
    ]);
    let (code, eval) = server.post(
        &format!("/models/{model}/evaluate"),
        json!({"eval_name": "smoke", "data": {"upload_id": upload["id"]},
               "references": references, "max_tokens": 12}),
    );
    assert_eq!(code, 201, "{eval}");
    let m = &eval["metrics"];

    // Perplexity: the same log-probs as echo (same scoring path), token-weighted over both
    // documents.
    let (want_ppl, want_n) = completions_perplexity(&server, &model);
    assert_eq!(m["tokens_scored"].as_u64().unwrap(), want_n);
    assert_eq!(m["documents"], 2);
    let ppl = m["perplexity"].as_f64().unwrap();
    assert!(
        (ppl - want_ppl).abs() <= 1e-9 * want_ppl,
        "{ppl} vs {want_ppl}"
    );
    assert!(ppl > 1.0 && ppl < 1000.0, "{ppl}");
    // Bits per byte: the same total in bits over the bytes the scored tokens spell (SmolLM2
    // adds no BOS: every byte of a document but its first token's).
    let mut bytes = 0u64;
    for doc in DOCS {
        let (code, t) = server.post("/tokenize", json!({"model": model, "prompt": doc}));
        assert_eq!(code, 200, "{t}");
        let first = t["tokens"][0].as_u64().unwrap() as u32;
        let (code, d) = server.post("/detokenize", json!({"model": model, "tokens": [first]}));
        assert_eq!(code, 200, "{d}");
        bytes += (doc.len() - d["prompt"].as_str().unwrap().len()) as u64;
    }
    assert_eq!(m["bytes_scored"].as_u64().unwrap(), bytes);
    let bpb = m["bits_per_byte"].as_f64().unwrap();
    let want_bpb = want_n as f64 * want_ppl.ln() / std::f64::consts::LN_2 / bytes as f64;
    assert!(
        (bpb - want_bpb).abs() <= 1e-9 * want_bpb,
        "{bpb} vs {want_bpb}"
    );

    // The continuations are /generate's greedy ones, and the metrics are sacreBLEU's and
    // rouge-score's on them.
    let samples = eval["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    let mut pairs = Vec::new();
    for s in samples {
        let (code, g) = server.post(
            "/generate",
            json!({"model": model, "prompt": s["prompt"], "temperature": 0, "max_tokens": 12, "top_k": 1}),
        );
        assert_eq!(code, 200, "{g}");
        assert_eq!(s["response"], g["generated_text"], "{s}");
        pairs.push((
            s["response"].as_str().unwrap().to_string(),
            s["reference"].as_str().unwrap().to_string(),
        ));
    }
    let want = reference(&pairs);
    close(
        m["bleu_score"].as_f64().unwrap(),
        want["bleu"].as_f64().unwrap() / 100.0,
        "BLEU",
    );
    let rouge: Vec<f64> = want["rouge_l"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for (s, r) in samples.iter().zip(&rouge) {
        close(s["rouge_l"].as_f64().unwrap(), *r, "ROUGE-L");
    }
    close(
        m["rouge_score"].as_f64().unwrap(),
        rouge.iter().sum::<f64>() / rouge.len() as f64,
        "mean ROUGE-L",
    );
    close(
        m["response_diversity"].as_f64().unwrap(),
        want["distinct_2"].as_f64().unwrap(),
        "distinct-2",
    );
    close(
        m["avg_response_length"].as_f64().unwrap(),
        want["mean_words"].as_f64().unwrap(),
        "mean words",
    );

    // Kept: listed without samples, fetched with them; counted.
    let id = eval["id"].as_str().unwrap().to_string();
    let (code, list) = server.get("/evaluations");
    assert_eq!(code, 200);
    assert_eq!(list["evaluations"].as_array().unwrap().len(), 1);
    assert_eq!(list["evaluations"][0]["id"], id.as_str());
    assert!(list["evaluations"][0].get("samples").is_none());
    let (code, one) = server.get(&format!("/evaluations/{id}"));
    assert_eq!(code, 200);
    assert_eq!(one, eval);
    let (code, stats) = server.get("/statistics");
    assert_eq!(code, 200, "{stats}");
    assert_eq!(stats["total_models"], 1);
    assert_eq!(stats["total_evaluations"], 1);
    assert_eq!(stats["total_training_jobs"], 0);
    // Two echo completions and three /generate calls; the evaluation's own jobs are not
    // requests.
    assert_eq!(stats["total_generations"], 5, "{stats}");

    // The client reads the same.
    let (ok, out) = server.client(&["stats"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("total generations") && out.contains('5'),
        "{out}"
    );
    let (ok, out) = server.client(&["evaluations"]);
    assert!(ok && out.contains(&id) && out.contains("smoke"), "{out}");

    // Kept across a restart (the counter is written at shutdown).
    sigterm(server);
    let server = Server::start(&state, &args);
    let (_, stats) = server.get("/statistics");
    assert_eq!(stats["total_generations"], 5, "{stats}");
    assert_eq!(stats["total_evaluations"], 1, "{stats}");
    let (code, again) = server.get(&format!("/evaluations/{id}"));
    assert_eq!((code, &again), (200, &eval));

    // The client evaluates a file.
    let text = dir.path().join("doc.txt");
    std::fs::write(&text, DOCS[0]).unwrap();
    let (ok, out) = server.client(&["evaluate", &model, "--data", text.to_str().unwrap()]);
    assert!(ok && out.contains("perplexity"), "{out}");
}

#[test]
fn bad_evaluations_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let default = common::default_gguf();
    let server = Server::start(
        &dir.path().join("state"),
        &["--model", default.to_str().unwrap()],
    );
    let (_, models) = server.get("/models");
    let model = models[0]["id"].as_str().unwrap().to_string();
    let path = format!("/models/{model}/evaluate");
    let refs = json!([{"prompt": "Hello", "reference": " world"}]);
    for (body, code, error, field) in [
        (json!({}), 422, "VALIDATION_ERROR", "data"),
        (
            json!({"references": refs, "max_tokens": 0}),
            422,
            "VALIDATION_ERROR",
            "max_tokens",
        ),
        (
            json!({"references": [{"prompt": "  ", "reference": "x"}]}),
            422,
            "VALIDATION_ERROR",
            "references",
        ),
        (
            json!({"references": [{"prompt": "x"}]}),
            422,
            "VALIDATION_ERROR",
            "references",
        ),
        (
            json!({"data": {"text": " "}}),
            422,
            "VALIDATION_ERROR",
            "data",
        ),
        (
            json!({"data": {"upload_id": "upload-none"}}),
            404,
            "UPLOAD_NOT_FOUND",
            "",
        ),
        (
            json!({"data": {"path": "x.txt"}}),
            403,
            "PATH_NOT_ALLOWED",
            "",
        ),
        (
            json!({"data": {"text": "fox "}, "bogus": 1}),
            422,
            "VALIDATION_ERROR",
            "bogus",
        ),
        // More than one evaluation scores (65,536 tokens): refused before any scoring.
        (
            json!({"data": {"text": "fox ".repeat(70_000)}}),
            413,
            "PAYLOAD_TOO_LARGE",
            "",
        ),
    ] {
        let (got, e) = server.post(&path, body.clone());
        assert_eq!(
            (got, e["error_code"].as_str()),
            (code, Some(error)),
            "{body}: {e}"
        );
        if !field.is_empty() {
            assert!(e.to_string().contains(field), "{body}: {e}");
        }
    }
    let (code, e) = server.post("/models/nope/evaluate", json!({"data": {"text": "x"}}));
    assert_eq!(
        (code, e["error_code"].as_str()),
        (404, Some("MODEL_NOT_FOUND"))
    );
    let (code, e) = server.get("/evaluations/eval-none");
    assert_eq!(
        (code, e["error_code"].as_str()),
        (404, Some("EVALUATION_NOT_FOUND"))
    );
    // Nothing was kept, and the server still answers.
    let (_, stats) = server.get("/statistics");
    assert_eq!(stats["total_evaluations"], 0);
    let (code, _) = server.post(&path, json!({"data": {"text": DOCS[0]}}));
    assert_eq!(code, 201);
}
