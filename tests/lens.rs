//! POST /lens on the real models: one entry per layer, the last equal to /generate's
//! distribution, the fused path's lens equal to candle's on every layer, and the bounds.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::http::post;
use tokenscope::api::ServeConfig;
use tokenscope::engine::lens;
use tokenscope::engine::scoring::Target;
use tokenscope::engine::worker::WorkerLimits;
use tokenscope::model::LoadedModel;

fn app(model: &LoadedModel, limits: WorkerLimits) -> Router {
    common::http::router(model, limits, 8, ServeConfig::default()).0
}

/// The lens's last layer against /generate's distribution (T = 1) for the same prompt: every
/// top-k token and log-prob, and each target's first-token log-prob and rank.
async fn last_layer_equals_generate(app: &Router, prompt: &str, layers: usize) -> Value {
    let (status, lens) = post(
        app,
        "/lens",
        json!({"prompt": prompt, "top_k": 10, "targets": [" Paris", " Lyon"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{lens}");
    let entries = lens["layers"].as_array().unwrap();
    assert_eq!(entries.len(), layers);
    for (i, l) in entries.iter().enumerate() {
        assert_eq!(l["layer"], i + 1);
        assert_eq!(l["top"].as_array().unwrap().len(), 10);
        assert!(l["entropy"].as_f64().unwrap() >= 0.0);
        assert_eq!(l["targets"].as_array().unwrap().len(), 2);
    }
    let (status, gen) = post(
        app,
        "/generate",
        json!({"prompt": prompt, "top_k": 10, "targets": [" Paris", " Lyon"]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{gen}");
    let last = entries.last().unwrap();
    for (a, b) in last["top"]
        .as_array()
        .unwrap()
        .iter()
        .zip(gen["tokens"].as_array().unwrap())
    {
        assert_eq!(a["token_id"], b["token_id"]);
        let d = (a["logprob"].as_f64().unwrap() - b["logprob"].as_f64().unwrap()).abs();
        assert!(d <= 1e-6, "{prompt:?}: {a} vs {b}");
    }
    for (a, b) in last["targets"]
        .as_array()
        .unwrap()
        .iter()
        .zip(gen["targets"].as_array().unwrap())
    {
        assert_eq!(a["token_id"], b["token_ids"][0]);
        assert_eq!(a["rank"], b["rank"]);
        if b["token_ids"].as_array().unwrap().len() == 1 {
            let d = (a["logprob"].as_f64().unwrap() - b["logprob"].as_f64().unwrap()).abs();
            assert!(d <= 1e-6, "{prompt:?}: {a} vs {b}");
        }
    }
    lens
}

#[tokio::test]
async fn last_layer_is_the_models_distribution() {
    let app = app(common::smollm(), WorkerLimits::default());
    let lens = last_layer_equals_generate(&app, "The capital of France is", 30).await;
    let last = lens["layers"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["top"][0]["token"], " Paris");
    let p = last["top"][0]["probability"].as_f64().unwrap();
    assert!((0.7..0.85).contains(&p), "{p}");
    // Early layers do not know the answer yet: " Paris" ranks far down at layer 1.
    let first_rank = lens["layers"][0]["targets"][0]["rank"].as_u64().unwrap();
    assert!(first_rank > 100, "{first_rank}");
    // A prompt over the fused path's 48 tokens goes through candle's path; same rule.
    let long = format!(
        "{} The capital of France is",
        "Paris is a city in Europe.".repeat(12)
    );
    last_layer_equals_generate(&app, &long, 30).await;
}

#[tokio::test]
async fn gemma3_last_layer_is_the_models_distribution() {
    let app = app(common::gemma3(), WorkerLimits::default());
    last_layer_equals_generate(&app, "The capital of France is", 18).await;
}

/// The fused path's residual streams (straight-line kernels) and candle's (tensor ops) are
/// two implementations of the same layers: their lens agrees on every layer.
#[test]
fn fused_and_candle_paths_agree_on_every_layer() {
    for m in [common::smollm(), common::gemma3()] {
        let ids = tokenscope::engine::tokenize(m, "The capital of France is").unwrap();
        let targets = [Target {
            text: " Paris".into(),
            ids: m.tokenizer.encode_without_special(" Paris").unwrap(),
        }];
        assert!(m.model.has_fused_path());
        let mut candle = m.clone();
        candle.model = candle.model.without_fused_path();
        let read = |model: &LoadedModel| {
            let (_, logits, residuals) = lens::prefill_with_layers(model, &ids, &|| false).unwrap();
            lens::layers(model, &logits, &residuals, 5, &targets).unwrap()
        };
        let (a, b) = (read(m), read(&candle));
        assert_eq!(a.len(), m.model.config().num_hidden_layers);
        let mut worst = 0f64;
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.top[0].token_id, y.top[0].token_id, "layer {}", x.layer);
            for (p, q) in x.top.iter().zip(&y.top) {
                worst = worst.max((p.logprob - q.logprob).abs());
            }
            worst = worst.max((x.targets[0].logprob - y.targets[0].logprob).abs());
        }
        eprintln!(
            "{}: fused vs candle lens, max |Δ logprob| = {worst:e}",
            m.name
        );
        // Two f32 orders of the same layers: within what rounding explains after the prompt.
        let pass = common::pass_of(m.model.config(), ids.len());
        let bound = common::f32_logprob_bound(pass, &common::next_logprobs(&m.model, &ids), 2);
        assert!(worst <= bound, "{worst} > {bound}");
    }
}

#[tokio::test]
async fn lens_is_bounded_like_generate() {
    let limits = WorkerLimits {
        max_prompt_tokens: Some(8),
        ..Default::default()
    };
    let app = app(common::smollm(), limits);
    let cases = [
        (
            json!({"prompt": "Hi", "top_k": 0}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_TOP_K",
        ),
        (
            json!({"prompt": "Hi", "top_k": 51}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "INVALID_TOP_K",
        ),
        (
            json!({"prompt": "   "}),
            StatusCode::BAD_REQUEST,
            "EMPTY_PROMPT",
        ),
        (
            json!({"prompt": "Hi", "targets": ["\u{1}"]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
        ),
        (
            json!({"prompt": "Hi", "max_tokens": 3}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_ERROR",
        ),
        (
            json!({"prompt": "one two three four five six seven eight nine ten"}),
            StatusCode::BAD_REQUEST,
            "PROMPT_TOO_LONG",
        ),
    ];
    for (body, status, code) in cases {
        let (s, v) = post(&app, "/lens", body.clone()).await;
        assert_eq!(
            (s, v["error_code"].as_str()),
            (status, Some(code)),
            "{body}: {v}"
        );
    }
    let (s, v) = post(&app, "/lens", json!({"prompt": "Hi", "top_k": 3})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["layers"][29]["top"].as_array().unwrap().len(), 3);
    assert!(v["metadata"]["prompt_tokens"].as_u64().unwrap() >= 1);
    // The lens has no sampling: its metadata says which distribution it shows, not "greedy".
    assert_eq!(v["metadata"]["temperature"], 1.0);
    assert_eq!(v["metadata"]["distribution"], "softmax(logits) at T = 1");
    assert!(
        v["metadata"].get("decoding").is_none() && v["metadata"].get("temperature_used").is_none()
    );
}

#[tokio::test]
async fn browsers_are_sent_to_the_page_and_api_clients_keep_json() {
    let app = app(common::smollm(), WorkerLimits::default());
    let get = |accept: &str| {
        Request::get("/")
            .header(header::ACCEPT, accept)
            .body(Body::empty())
            .unwrap()
    };
    let resp = app
        .clone()
        .oneshot(get("text/html,application/xhtml+xml,*/*;q=0.8"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/ui");
    let resp = app.clone().oneshot(get("application/json")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = app
        .clone()
        .oneshot(Request::get("/ui").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8_lossy(&html);
    assert!(html.contains("tokenscope inspector"));
    // Nothing from elsewhere: no absolute URLs in src/href attributes.
    for attr in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "href='http",
        "@import",
        "url(http",
    ] {
        assert!(!html.contains(attr), "{attr}");
    }
}

/// `tokenscope inspect --lens`: the same layers in the terminal and as JSON.
#[test]
fn inspect_prints_the_lens() {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenscope"))
            .args([
                "inspect",
                "The capital of France is",
                "--lens",
                "--target",
                " Paris",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let json: Value = serde_json::from_str(&run(&["--json"])).unwrap();
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 30);
    assert_eq!(layers[29]["top"][0]["token"], " Paris");
    assert_eq!(layers[29]["targets"][0]["rank"], 1);
    let text = run(&[]);
    assert!(text.contains("30 layers"), "{text}");
    let last_row = text
        .lines()
        .find(|l| l.trim_start().starts_with("30 "))
        .unwrap();
    assert!(
        last_row.contains("#1") && last_row.contains("␣Paris 77."),
        "{last_row}"
    );
}
