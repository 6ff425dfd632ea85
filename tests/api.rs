//! Router-level tests (tower `oneshot`) on the real default model: every endpoint, every error
//! code, auth on and off, the docs pages.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

use common::http::get;
use tokenscope::api::{self, AppState, ServeConfig};
use tokenscope::engine::worker::{self, WorkerLimits};

fn app_with(config: ServeConfig, limits: WorkerLimits, queue: usize) -> Router {
    common::http::router(common::smollm(), limits, queue, config).0
}

fn app() -> Router {
    app_with(
        ServeConfig::default(),
        WorkerLimits {
            max_prompt_tokens: None,
            ..Default::default()
        },
        16,
    )
}

/// [`common::http::send`] with the body as JSON (or its text as a JSON string).
async fn send(app: &Router, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Value) {
    let (status, headers, text) = common::http::send(app, req).await;
    let mut body = common::http::json_or_text(text);
    // Error bodies carry the request id (as the header does); it is removed here so that tests
    // compare the contract part (`detail`, `error_code`) exactly.
    if let Some(obj) = body.as_object_mut() {
        if obj.contains_key("error_code") {
            let id = obj
                .remove("request_id")
                .expect("error bodies carry request_id");
            let header_id = headers.get("x-request-id").and_then(|v| v.to_str().ok());
            assert_eq!(id.as_str(), header_id);
        }
    }
    (status, headers, body)
}

/// POST /generate with `body` as written.
fn post_json(body: &str) -> Request<Body> {
    common::http::post_json("/generate", body)
}

async fn generate(app: &Router, body: Value) -> (StatusCode, Value) {
    let (s, _, b) = send(app, post_json(&body.to_string())).await;
    (s, b)
}

#[tokio::test]
async fn seed_contract_request_returns_paris() {
    let app = app();
    // Exactly the seed document's request.
    let (s, b) = generate(
        &app,
        json!({"prompt": "The capital of France is", "temperature": 1.0, "max_tokens": 1, "top_k": 5}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let tokens = b["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    assert_eq!(tokens[0]["token"], " Paris");
    assert_eq!(tokens[0]["rank"], 1);
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(t["rank"], i + 1);
        let p = t["probability"].as_f64().unwrap();
        assert_eq!(t["percentage"].as_f64().unwrap(), p * 100.0);
        assert!((t["logprob"].as_f64().unwrap().exp() - p).abs() < 1e-12);
        assert!(t["token_id"].is_u64() && t["bytes"].is_array());
    }
    let p = tokens[0]["probability"].as_f64().unwrap();
    assert!((p - 0.7725).abs() < 0.005, "{p}");
    let m = &b["metadata"];
    for key in [
        "model_name",
        "prompt_length",
        "prompt_tokens",
        "completion_tokens",
        "generation_time_ms",
        "temperature_used",
        "logprobs_mode",
        "device",
        "dtype",
    ] {
        assert!(!m[key].is_null(), "metadata.{key} missing: {m}");
    }
    assert_eq!(m["prompt_length"], 24);
    assert_eq!(m["prompt_tokens"], 5);
    assert_eq!(m["completion_tokens"], 1);
    assert_eq!(m["temperature_used"], 1.0);
    assert_eq!(m["device"], "cpu");
    assert_eq!(b["steps"].as_array().unwrap().len(), 1);
    assert_eq!(b["steps"][0]["top"], b["tokens"]);
    assert!(["length", "eos", "stop"].contains(&b["finish_reason"].as_str().unwrap()));
}

#[tokio::test]
async fn greedy_generation_with_stop_and_defaults() {
    let app = app();
    let (s, b) = generate(&app, json!({"prompt": "The capital of France is"})).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        b["tokens"].as_array().unwrap().len(),
        5,
        "top_k defaults to 5"
    );
    assert_eq!(
        b["metadata"]["completion_tokens"], 1,
        "max_tokens defaults to 1"
    );
    assert_eq!(b["metadata"]["logprobs_mode"], "processed");

    let (s, b) = generate(
        &app,
        json!({"prompt": "The capital of France is", "temperature": 0, "max_tokens": 20, "stop": ["\n"], "top_k": 2}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["generated_text"], " Paris.");
    assert_eq!(b["finish_reason"], "stop");
    let steps = b["steps"].as_array().unwrap();
    assert!(steps
        .iter()
        .all(|st| st["rank"] == 1 && st["top"].as_array().unwrap().len() == 2));
    assert!(steps.iter().all(|st| st["entropy"].as_f64().unwrap() > 0.0));
}

/// The nanochat server's `stop_on_newline`: the text up to the first newline the model writes,
/// finish_reason `stop`.
#[tokio::test]
async fn stop_on_newline_ends_at_the_first_newline() {
    let app = app();
    let ask = |stop: bool| {
        json!({"prompt": "Shopping list:\n1. apples\n2. pears\n3.", "temperature": 0,
               "max_tokens": 24, "stop_on_newline": stop})
    };
    let (s, free) = generate(&app, ask(false)).await;
    assert_eq!(s, StatusCode::OK, "{free}");
    let text = free["generated_text"].as_str().unwrap();
    let cut = text
        .find('\n')
        .expect("the model writes a newline in 24 tokens");
    assert!(cut > 0, "{text:?}");
    let (s, b) = generate(&app, ask(true)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["generated_text"], text[..cut]);
    assert_eq!(b["finish_reason"], "stop");
    assert!(b["steps"].as_array().unwrap().len() < free["steps"].as_array().unwrap().len());
}

#[tokio::test]
async fn seeded_requests_repeat_and_raw_mode_ignores_temperature() {
    let app = app();
    let req =
        json!({"prompt": "Once upon a time", "temperature": 1.3, "max_tokens": 8, "seed": 42});
    let (_, a) = generate(&app, req.clone()).await;
    let (_, b) = generate(&app, req).await;
    assert_eq!(a["generated_text"], b["generated_text"]);
    assert_eq!(a["steps"], b["steps"]);

    let (_, raw) = generate(
        &app,
        json!({"prompt": "The capital of France is", "temperature": 1.7, "logprobs_mode": "raw", "seed": 1}),
    )
    .await;
    let (_, plain) = generate(
        &app,
        json!({"prompt": "The capital of France is", "temperature": 0}),
    )
    .await;
    assert_eq!(raw["tokens"], plain["tokens"]);
    assert_eq!(raw["metadata"]["logprobs_mode"], "raw");
}

#[tokio::test]
async fn empty_and_too_long_prompts() {
    let app = app_with(
        ServeConfig::default(),
        WorkerLimits {
            max_prompt_tokens: Some(8),
            ..Default::default()
        },
        4,
    );
    for prompt in [
        "",
        "   ",
        "\n\t ",
        "\u{1c}\u{feff} ",
        "\u{4}",
        "\u{85}\u{9f}\u{0}",
    ] {
        let (s, b) = generate(&app, json!({ "prompt": prompt })).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(
            b,
            json!({"detail": "Prompt cannot be empty", "error_code": "EMPTY_PROMPT"})
        );
    }
    let (s, b) = generate(
        &app,
        json!({"prompt": "one two three four five six seven eight nine ten"}),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["error_code"], "PROMPT_TOO_LONG");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("maximum length of 8 tokens"),
        "{b}"
    );
    // Without a cap, the limit is the context length (8192) minus max_tokens.
    let app = self::app();
    let long = "word ".repeat(8200);
    let (s, b) = generate(&app, json!({"prompt": long, "max_tokens": 10})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(b["detail"].as_str().unwrap().contains("8182"), "{b}");
}

async fn expect_422(app: &Router, body: &str, code: &str, loc: Value) {
    let (s, _, b) = send(app, post_json(body)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {b}");
    assert_eq!(b["error_code"], code, "{body}: {b}");
    let detail = b["detail"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}: detail is a list: {b}"));
    assert!(
        detail
            .iter()
            .any(|d| d["loc"] == loc && d["msg"].is_string() && d["type"].is_string()),
        "{body}: no entry at {loc}: {b}"
    );
}

#[tokio::test]
async fn validation_errors_are_fastapi_style() {
    let app = app();
    let p = r#""prompt": "hi""#;
    expect_422(
        &app,
        &format!("{{{p}, \"temperature\": 2.5}}"),
        "INVALID_TEMPERATURE",
        json!(["body", "temperature"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"temperature\": -0.1}}"),
        "INVALID_TEMPERATURE",
        json!(["body", "temperature"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"max_tokens\": 0}}"),
        "INVALID_MAX_TOKENS",
        json!(["body", "max_tokens"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"max_tokens\": 101}}"),
        "INVALID_MAX_TOKENS",
        json!(["body", "max_tokens"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"top_k\": 0}}"),
        "INVALID_TOP_K",
        json!(["body", "top_k"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"top_k\": 51}}"),
        "INVALID_TOP_K",
        json!(["body", "top_k"]),
    )
    .await;
    expect_422(
        &app,
        r#"{"temperature": 1.0}"#,
        "VALIDATION_ERROR",
        json!(["body", "prompt"]),
    )
    .await;
    expect_422(
        &app,
        r#"{"prompt": 5}"#,
        "VALIDATION_ERROR",
        json!(["body", "prompt"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"temperature\": \"hot\"}}"),
        "VALIDATION_ERROR",
        json!(["body", "temperature"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"top_k\": 2.5}}"),
        "VALIDATION_ERROR",
        json!(["body", "top_k"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"max_tokens\": null}}"),
        "VALIDATION_ERROR",
        json!(["body", "max_tokens"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"seed\": -1}}"),
        "VALIDATION_ERROR",
        json!(["body", "seed"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"stop\": [\"a\",\"b\",\"c\",\"d\",\"e\"]}}"),
        "VALIDATION_ERROR",
        json!(["body", "stop"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"stop\": \"a\"}}"),
        "VALIDATION_ERROR",
        json!(["body", "stop"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"stop\": [\"\"]}}"),
        "VALIDATION_ERROR",
        json!(["body", "stop", 0]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"logprobs_mode\": \"cooked\"}}"),
        "VALIDATION_ERROR",
        json!(["body", "logprobs_mode"]),
    )
    .await;
    expect_422(
        &app,
        &format!("{{{p}, \"n_probs\": 5}}"),
        "VALIDATION_ERROR",
        json!(["body", "n_probs"]),
    )
    .await;
    expect_422(&app, r#"["prompt"]"#, "VALIDATION_ERROR", json!(["body"])).await;
    for malformed in [
        r#"{"prompt": "hi", "#,
        "",
        "{'prompt': 'hi'}",
        r#"{"prompt": "hi", "top_k": 1e400}"#,
    ] {
        let (s, _, b) = send(&app, post_json(malformed)).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{malformed}");
        assert_eq!(b["error_code"], "VALIDATION_ERROR");
        assert_eq!(b["detail"][0]["loc"][0], "body");
        assert_eq!(b["detail"][0]["type"], "value_error.jsondecode");
    }

    // The seed's exact message for the seed's example.
    let (_, _, b) = send(&app, post_json(&format!("{{{p}, \"temperature\": 3}}"))).await;
    assert_eq!(
        b["detail"][0],
        json!({"loc": ["body", "temperature"], "msg": "ensure this value is less than or equal to 2.0", "type": "value_error.number.not_le"})
    );
    // Integral floats are integers; big seeds are fine.
    let (s, b) = generate(
        &app,
        json!({"prompt": "hi", "top_k": 3.0, "seed": u64::MAX, "temperature": 0.7}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["tokens"].as_array().unwrap().len(), 3);
    // An integral float seed is that integer (JSON Schema's `integer`; schemathesis found it).
    let (s, a) = generate(
        &app,
        json!({"prompt": "hi", "seed": 1191.0, "temperature": 0.7}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{a}");
    let (_, b) = generate(
        &app,
        json!({"prompt": "hi", "seed": 1191, "temperature": 0.7}),
    )
    .await;
    assert_eq!(a["metadata"]["seed"], 1191);
    assert_eq!(a["tokens"], b["tokens"]);
    for bad in ["1191.5", "18446744073709551616", "1e30", "-1.0"] {
        let (s, _, b) = send(&app, post_json(&format!("{{{p}, \"seed\": {bad}}}"))).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "seed {bad}: {b}");
        assert_eq!(b["detail"][0]["loc"], json!(["body", "seed"]));
    }
    // After all that, the service still answers.
    let (s, _) = generate(&app, json!({"prompt": "still alive?"})).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn media_type_and_size_limits() {
    let app = app_with(
        ServeConfig {
            max_body_bytes: 256,
            ..Default::default()
        },
        WorkerLimits {
            max_prompt_tokens: None,
            ..Default::default()
        },
        4,
    );
    let no_type = Request::post("/generate")
        .body(Body::from(r#"{"prompt":"hi"}"#))
        .unwrap();
    let (s, _, b) = send(&app, no_type).await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(b["error_code"], "UNSUPPORTED_MEDIA_TYPE");
    let text = Request::post("/generate")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from(r#"{"prompt":"hi"}"#))
        .unwrap();
    assert_eq!(send(&app, text).await.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let charset = Request::post("/generate")
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from(r#"{"prompt":"hi"}"#))
        .unwrap();
    assert_eq!(send(&app, charset).await.0, StatusCode::OK);
    let big = json!({ "prompt": "x".repeat(1000) }).to_string();
    let (s, _, b) = send(&app, post_json(&big)).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(b["error_code"], "PAYLOAD_TOO_LARGE");
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json() {
    let app = app();
    let (s, _, b) = send(&app, get("/nope")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(b, json!({"detail": "Not Found", "error_code": "NOT_FOUND"}));
    let (s, _, b) = send(&app, get("/generate")).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(b["error_code"], "METHOD_NOT_ALLOWED");
    let (s, _, b) = send(
        &app,
        Request::builder()
            .method(Method::DELETE)
            .uri("/health")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(b["error_code"], "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn health_status_and_root() {
    let app = app();
    let (s, _, b) = send(&app, get("/health")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["status"], "healthy");
    let ts = b["timestamp"].as_str().unwrap();
    assert!(
        chrono::DateTime::parse_from_rfc3339(ts).is_ok() && ts.ends_with('Z'),
        "{ts}"
    );

    let (s, _, b) = send(&app, get("/status")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["service"]["status"], "running");
    assert_eq!(b["service"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(b["service"]["uptime_seconds"].is_u64());
    assert!(
        b["service"]["memory_usage_mb"].as_u64().unwrap() > 100,
        "RSS holds the model: {b}"
    );
    assert_eq!(b["model"]["loaded"], true);
    assert_eq!(b["model"]["name"], "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(b["model"]["device"], "cpu");
    assert_eq!(b["model"]["precision"], "float32");
    assert_eq!(b["model"]["max_length"], 8192);
    assert_eq!(b["model"]["vocab_size"], 49152);
    assert!(b["system"]["gpu_available"].is_boolean());
    assert!(b["system"]["cpu_cores"].as_u64().unwrap() >= 1);
    assert!(b["system"]["system_memory_gb"].as_f64().unwrap() > 0.0);
    for k in ["gpu_name", "gpu_memory_total_mb", "gpu_memory_used_mb"] {
        assert!(b["system"].get(k).is_some(), "{k}");
    }

    let (s, _, b) = send(&app, get("/")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(b["name"], "tokenscope");
    assert_eq!(b["status"], "ready");
    let paths: Vec<&str> = b["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    for p in [
        "/generate",
        "/health",
        "/status",
        "/docs",
        "/redoc",
        "/openapi.json",
    ] {
        assert!(paths.contains(&p), "{p}");
    }
}

#[tokio::test]
async fn failed_load_keeps_serving_errors() {
    let worker = worker::spawn(
        Err("model source `nope` does not exist".into()),
        Default::default(),
        WorkerLimits {
            max_prompt_tokens: None,
            ..Default::default()
        },
        4,
    );
    let app = api::router(AppState::new(worker, ServeConfig::default()));
    // The model thread publishes `Failed` once its load has failed.
    common::wait_until_async(
        "/health to report the failed load",
        Duration::from_secs(60),
        || async { send(&app, get("/health")).await.2["status"] == "unhealthy" },
    )
    .await;
    let (s, _, b) = send(&app, get("/health")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b["status"], "unhealthy");
    assert!(b["reason"].as_str().unwrap().contains("nope"));
    let (s, h, b) = send(&app, post_json(r#"{"prompt": "hi"}"#)).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b["error_code"], "MODEL_NOT_LOADED");
    assert!(h.contains_key(header::RETRY_AFTER));
    let (s, _, b) = send(&app, get("/status")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b["model"]["loaded"], false);
}

#[tokio::test]
async fn internal_failures_are_500_without_internals() {
    // A model whose vocabulary (100) is smaller than its tokenizer's: embedding lookups of real
    // token ids fail inside candle.
    let dir = tempfile::tempdir().unwrap();
    let cfg = tokenscope::model::Config::tiny(100);
    common::write_llama(dir.path(), &cfg, 11);
    let broken = tokenscope::model::load(
        &tokenscope::model::ModelSource::HfDir(dir.path().into()),
        &Default::default(),
    )
    .unwrap();
    let worker = worker::spawn_loaded(
        broken,
        WorkerLimits {
            max_prompt_tokens: None,
            ..Default::default()
        },
        4,
    );
    let app = api::router(AppState::new(worker, ServeConfig::default()));
    let (s, _, b) = send(&app, post_json(r#"{"prompt": "The capital of France is"}"#)).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        b,
        json!({"detail": "Token generation failed due to internal error", "error_code": "GENERATION_FAILED"})
    );
    // The worker survived and serves the next request (ids < 100 work).
    let tk = &common::smollm().tokenizer;
    let small_ids = (17u32..100)
        .map(|id| tk.token_text(id).to_string())
        .find(|t| !t.trim().is_empty() && tk.encode(t).unwrap().iter().all(|&i| i < 100))
        .unwrap();
    let (s, _, b) = send(&app, post_json(&json!({ "prompt": small_ids }).to_string())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn timeout_answers_504_and_the_worker_stops_the_abandoned_job() {
    let worker = worker::spawn_loaded(common::smollm().clone(), WorkerLimits::default(), 4);
    let short = api::router(AppState::new(
        worker.clone(),
        ServeConfig {
            request_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    ));
    let patient = api::router(AppState::new(worker.clone(), ServeConfig::default()));
    let (s, b) = generate(
        &short,
        json!({"prompt": "Write a long story about the sea:", "max_tokens": 100, "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::GATEWAY_TIMEOUT, "{b}");
    assert_eq!(b["error_code"], "TIMEOUT");
    // The worker notices between steps that nobody waits and stops generating for nobody.
    common::wait_until_async(
        "the abandoned job to be cancelled",
        Duration::from_secs(60),
        || async { worker.cancelled_jobs() > 0 },
    )
    .await;
    let (s, b) = generate(&patient, json!({"prompt": "Hi", "temperature": 0})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_get_answers_or_overloaded() {
    let app = app_with(
        ServeConfig::default(),
        WorkerLimits {
            max_prompt_tokens: None,
            ..Default::default()
        },
        2,
    );
    let mut tasks = Vec::new();
    for i in 0..64 {
        let app = app.clone();
        tasks.push(tokio::spawn(async move {
            let body = json!({"prompt": format!("Request number {i} says"), "max_tokens": 3, "temperature": 0});
            let resp = app.oneshot(post_json(&body.to_string())).await.unwrap();
            let status = resp.status();
            let retry = resp.headers().contains_key(header::RETRY_AFTER);
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, retry, serde_json::from_slice::<Value>(&bytes).unwrap())
        }));
    }
    let (mut ok, mut overloaded) = (0, 0);
    for t in tasks {
        let (status, retry, body) = tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .unwrap()
            .unwrap();
        match status {
            StatusCode::OK => {
                assert_eq!(body["steps"].as_array().unwrap().len(), 3);
                ok += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(body["error_code"], "OVERLOADED");
                assert!(retry);
                overloaded += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert!(
        ok >= 1 && overloaded >= 1,
        "ok={ok} overloaded={overloaded}"
    );
    assert_eq!(ok + overloaded, 64);
    let (s, _) = generate(&app, json!({"prompt": "after the storm"})).await;
    assert_eq!(s, StatusCode::OK);
}

fn with_keys(protect_docs: bool) -> Router {
    app_with(
        ServeConfig {
            api_keys: vec!["key-one-secret".into(), "second-key".into()],
            protect_docs,
            ..Default::default()
        },
        WorkerLimits {
            max_prompt_tokens: None,
            ..Default::default()
        },
        8,
    )
}

fn authed(req: Request<Body>, auth: &str) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    parts
        .headers
        .insert(header::AUTHORIZATION, auth.parse().unwrap());
    Request::from_parts(parts, body)
}

#[tokio::test]
async fn bearer_keys_protect_everything_but_health_and_docs() {
    let app = with_keys(false);
    let body = r#"{"prompt": "The capital of France is"}"#;
    let (s, h, b) = send(&app, post_json(body)).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert_eq!(b["error_code"], "UNAUTHORIZED");
    assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
    for bad in [
        "Bearer wrong",
        "Bearer key-one",
        "Bearer KEY-ONE-SECRET",
        "Bearer key-one-secretX",
        "Basic key-one-secret",
        "key-one-secret",
        "Bearer ",
    ] {
        let (s, h, _) = send(&app, authed(post_json(body), bad)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad}");
        assert_eq!(h[header::WWW_AUTHENTICATE], "Bearer");
    }
    for good in [
        "Bearer key-one-secret",
        "Bearer second-key",
        "bearer second-key",
    ] {
        let (s, _, b) = send(&app, authed(post_json(body), good)).await;
        assert_eq!(s, StatusCode::OK, "{good}: {b}");
    }
    for path in ["/status", "/", "/nope"] {
        assert_eq!(
            send(&app, get(path)).await.0,
            StatusCode::UNAUTHORIZED,
            "{path}"
        );
    }
    assert_eq!(
        send(&app, authed(get("/status"), "Bearer second-key"))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(send(&app, get("/health")).await.0, StatusCode::OK);
    for path in ["/docs/", "/redoc", "/openapi.json"] {
        assert_eq!(
            send(&app, get(path)).await.0,
            StatusCode::OK,
            "{path} public by default"
        );
    }
    let app = with_keys(true);
    for path in ["/docs/", "/redoc", "/openapi.json"] {
        assert_eq!(
            send(&app, get(path)).await.0,
            StatusCode::UNAUTHORIZED,
            "{path} protected"
        );
        assert_eq!(
            send(&app, authed(get(path), "Bearer second-key")).await.0,
            StatusCode::OK
        );
    }
    assert_eq!(send(&app, get("/health")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn docs_pages_and_openapi_document() {
    let app = app_with(
        ServeConfig {
            redoc_bundle: Some(std::sync::Arc::new(b"/* redoc */".to_vec())),
            ..Default::default()
        },
        WorkerLimits {
            max_prompt_tokens: None,
            ..Default::default()
        },
        4,
    );
    let (s, _, b) = send(&app, get("/docs/")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.as_str().unwrap().contains("swagger-ui"), "{b}");
    let (s, _, b) = send(&app, get("/docs/swagger-ui-bundle.js")).await;
    assert_eq!(s, StatusCode::OK, "vendored Swagger UI assets are served");
    assert!(b.as_str().unwrap().len() > 100_000);
    let (s, _, b) = send(&app, get("/docs/swagger-initializer.js")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.as_str().unwrap().contains("/openapi.json"));
    let (s, _, b) = send(&app, get("/redoc")).await;
    assert_eq!(s, StatusCode::OK);
    let page = b.as_str().unwrap();
    assert!(
        page.contains("/redoc/redoc.standalone.js") && page.contains("Redoc.init"),
        "{page}"
    );
    assert!(!page.contains("cdn."), "local bundle preferred");
    assert_eq!(
        send(&app, get("/redoc/redoc.standalone.js")).await.0,
        StatusCode::OK
    );

    let (s, _, mut doc) = send(&app, get("/openapi.json")).await;
    assert_eq!(s, StatusCode::OK);
    // The served document states the loaded vocabulary's largest token id; otherwise it is
    // the static one.
    let token_id = doc["components"]["schemas"]["TokenId"]
        .as_object_mut()
        .unwrap();
    assert_eq!(token_id.remove("maximum"), Some(json!(49151)));
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(&api::docs::openapi_json()).unwrap()
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let req = &doc["components"]["schemas"]["GenerateRequest"]["properties"];
    // The bounds validation enforces (src/api/bounds.rs) are the schema's.
    use api::bounds;
    assert_eq!(
        req["temperature"]["maximum"],
        json!(bounds::TEMPERATURE_MAX)
    );
    assert_eq!(req["temperature"]["default"], 1.0);
    assert_eq!(req["max_tokens"]["maximum"], json!(bounds::MAX_TOKENS_MAX));
    assert_eq!(req["top_k"]["maximum"], json!(bounds::TOP_K_MAX));
    assert_eq!(req["top_k"]["default"], 5);
    let over = json!({"prompt": "Hi", "top_k": bounds::TOP_K_MAX + 1});
    let (s, _, e) = send(&app, post_json(&over.to_string())).await;
    assert_eq!(
        (s, e["error_code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("INVALID_TOP_K"))
    );
    let at = json!({"prompt": "Hi", "top_k": bounds::TOP_K_MAX});
    let (s, _, _) = send(&app, post_json(&at.to_string())).await;
    assert_eq!(s, StatusCode::OK);

    // Every operation has its own id (Swagger UI's "Try it out" finds an operation by it: a
    // shared id sent POST /v1/completions to /train/jobs), and GET / lists every route.
    let mut ids = std::collections::BTreeMap::new();
    let (_, _, root) = send(&app, get("/")).await;
    let listed: Vec<(String, String)> = root["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["method"].as_str().unwrap().to_string(),
                e["path"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"].as_str().unwrap().to_string();
            if let Some(other) = ids.insert(id.clone(), format!("{method} {path}")) {
                panic!("operationId {id} is used by {other} and {method} {path}");
            }
            assert!(
                listed.contains(&(method.to_uppercase(), path.clone())),
                "GET / lists {method} {path}"
            );
        }
    }
    for page in ["/ui", "/docs", "/redoc", "/metrics", "/openapi.json"] {
        assert!(listed.iter().any(|(_, p)| p == page), "GET / lists {page}");
        let (s, _, _) = send(&app, get(page)).await;
        assert!(s != StatusCode::NOT_FOUND, "{page} is routed");
    }
    let responses = &doc["paths"]["/generate"]["post"]["responses"];
    for code in [
        "200", "400", "401", "413", "415", "422", "500", "503", "504",
    ] {
        assert!(responses.get(code).is_some(), "/generate documents {code}");
    }

    // Without the bundle, ReDoc falls back to its CDN.
    let (_, _, b) = send(&self::app(), get("/redoc")).await;
    assert!(b.as_str().unwrap().contains(api::docs::REDOC_CDN));
}

#[test]
fn checked_in_openapi_matches_the_code() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let checked_in = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        checked_in.trim_end(),
        api::docs::openapi_json().trim_end(),
        "openapi/openapi.json is stale: run `cargo run -- openapi > openapi/openapi.json`"
    );
}

/// Every number in a response is a finite JSON number (serde writes NaN and ±inf as `null`).
fn assert_all_numbers_finite(v: &Value, path: &str) {
    match v {
        Value::Null => panic!("null at {path}"),
        Value::Number(n) => assert!(n.as_f64().is_some_and(f64::is_finite), "{n} at {path}"),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| assert_all_numbers_finite(x, &format!("{path}[{i}]"))),
        Value::Object(o) => o
            .iter()
            .for_each(|(k, x)| assert_all_numbers_finite(x, &format!("{path}.{k}"))),
        _ => {}
    }
}

/// Any accepted temperature gives finite, correct numbers. In f32, 1e-300 became 0 and the
/// scaled logits ±inf: `<|endoftext|>` at rank 1 with logprob null, status 200.
#[tokio::test]
async fn every_accepted_temperature_gives_finite_correct_numbers() {
    let app = app();
    let prompt = "The capital of France is";
    let (_, greedy) = generate(
        &app,
        json!({"prompt": prompt, "temperature": 0, "top_k": 10}),
    )
    .await;
    let (_, raw) = generate(
        &app,
        json!({"prompt": prompt, "temperature": 1, "top_k": 10, "logprobs_mode": "raw"}),
    )
    .await;
    for t in [0.0, 1e-300, 1e-30, 1e-6, 1e-5, 0.01, 1.0, 2.0] {
        let (s, b) = generate(
            &app,
            json!({"prompt": prompt, "temperature": t, "top_k": 10, "max_tokens": 3, "seed": 7}),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "T={t}: {b}");
        assert_all_numbers_finite(&b, &format!("T={t}"));
        assert_eq!(b["metadata"]["temperature_used"], json!(t));
        let top = &b["tokens"];
        assert_eq!(top[0]["token"], " Paris", "T={t}");
        let total: f64 = top
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["probability"].as_f64().unwrap())
            .sum();
        assert!(total <= 1.0 + 1e-9, "T={t}: top-10 mass {total}");
        if t < 1e-5 {
            // Greedy (and reported as such): the model's own distribution, as with T = 0.
            assert_eq!(b["metadata"]["decoding"], "greedy", "T={t}");
            assert_eq!(b["tokens"], greedy["tokens"], "T={t}");
            assert!(b["metadata"].get("seed").is_none());
        } else {
            assert_eq!(b["metadata"]["decoding"], "sampling", "T={t}");
            // processed logprob_i = (raw_i − raw_1)/T − log Σ_j exp((raw_j − raw_1)/T): for
            // small T the top-10 carry the whole sum, so the values can be checked from them.
            if t <= 0.01 {
                let raw_lp: Vec<f64> = raw["tokens"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x["logprob"].as_f64().unwrap())
                    .collect();
                let scaled: Vec<f64> = raw_lp.iter().map(|l| (l - raw_lp[0]) / t).collect();
                let lse = scaled.iter().map(|x| x.exp()).sum::<f64>().ln();
                for (i, x) in top.as_array().unwrap().iter().enumerate() {
                    let want = scaled[i] - lse;
                    let got = x["logprob"].as_f64().unwrap();
                    // raw log-probs are from f32 logits: ~1e-6 each, divided by T.
                    assert!(
                        (got - want).abs() <= 2e-6 / t * want.abs().max(1.0),
                        "T={t} rank {}: {got} vs {want}",
                        i + 1
                    );
                }
            }
        }
    }
}

/// Tokenization and the length check happen before the queue: a prompt over the limit never
/// reaches the model thread (which, before, tokenized every prompt itself).
#[tokio::test]
async fn long_prompts_are_refused_before_reaching_the_model_thread() {
    let worker = worker::spawn_loaded(common::smollm().clone(), WorkerLimits::default(), 4);
    let app = api::router(AppState::new(
        worker.clone(),
        ServeConfig {
            max_body_bytes: 2 << 20,
            ..Default::default()
        },
    ));
    let huge = "All work and no play makes Jack a dull boy. ".repeat(20_000); // ~900 KB
    let (s, b) = generate(&app, json!({ "prompt": huge })).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    assert_eq!(b["error_code"], "PROMPT_TOO_LONG");
    assert_eq!(
        worker.jobs_received(),
        0,
        "the model thread saw the long prompt"
    );
    let (s, b) = generate(&app, json!({"prompt": "Hello", "temperature": 0})).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(worker.jobs_received(), 1);
}

/// A panic outside any job's catch_unwind used to end the model thread for good while /health
/// kept saying healthy. Now the supervisor counts it, publishes `Restarting` with the reason,
/// and restarts the serve loop on the loaded weights.
#[tokio::test]
async fn a_dead_model_thread_is_reported_and_restarted() {
    let worker = worker::spawn_loaded(common::smollm().clone(), WorkerLimits::default(), 4);
    let app = api::router(AppState::new(worker.clone(), ServeConfig::default()));
    let mut states = worker.subscribe();
    states.borrow_and_update();
    worker.crash_for_test().unwrap();
    // the worker's supervisor (`engine/worker/backend.rs`) counts the restart, publishes `Restarting(reason)`, then at once
    // `Ready` again. A watch channel keeps only its latest value, so whether a reader sees the
    // brief `Restarting` is a race (this test used to accept either). Certain: the first change
    // is this restart, counted before it was published, and the state ends `Ready`.
    states.changed().await.unwrap();
    let back = tokio::time::timeout(
        Duration::from_secs(30),
        states.wait_for(|s| matches!(s, worker::ModelState::Ready(_))),
    )
    .await
    .map(|ready| ready.is_ok());
    assert!(
        matches!(back, Ok(true)),
        "the model thread did not come back"
    );
    assert_eq!(worker.restarts(), 1);
    let (s, _, b) = send(&app, get("/health")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["status"], "healthy");
    let (s, b) = generate(
        &app,
        json!({"prompt": "The capital of France is", "temperature": 0}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["tokens"][0]["token"], " Paris");
    let (_, _, metrics) = send(&app, get("/metrics")).await;
    let text = metrics.as_str().unwrap();
    assert!(text.contains("tokenscope_worker_restarts_total "), "{text}");
}

/// A thread that keeps dying is given up on: health stays unhealthy (503) with the reason,
/// and requests get MODEL_NOT_LOADED (`tokenscope serve` watches for this state and exits
/// non-zero so that an orchestrator starts a fresh process).
#[tokio::test]
async fn a_model_thread_that_keeps_dying_is_given_up() {
    let worker = worker::spawn_loaded(common::smollm().clone(), WorkerLimits::default(), 16);
    let app = api::router(AppState::new(worker.clone(), ServeConfig::default()));
    for _ in 0..=worker::MAX_RESTARTS {
        common::wait_until_async("room in the queue", Duration::from_secs(30), || async {
            worker.crash_for_test().is_ok()
        })
        .await;
    }
    // Not just any unhealthy: each restart is briefly unhealthy too (`Restarting`).
    common::wait_until_async(
        "/health to report giving up",
        Duration::from_secs(30),
        || async {
            let (_, _, b) = send(&app, get("/health")).await;
            b["reason"]
                .as_str()
                .is_some_and(|r| r.contains("giving up"))
        },
    )
    .await;
    let (s, _, b) = send(&app, get("/health")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    let reason = b["reason"].as_str().unwrap();
    assert!(
        reason.contains("panicked") && reason.contains("giving up"),
        "{reason}"
    );
    // `Failed` is final: still 503 a moment later (this sleep waits for nothing, it lets time
    // pass).
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, _, b) = send(&app, get("/health")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    let (s, b) = generate(&app, json!({"prompt": "Hi"})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(b["error_code"], "MODEL_NOT_LOADED");
}

/// Non-finite logits from the model are GENERATION_FAILED, never a 200 with nulls.
#[tokio::test]
async fn non_finite_logits_are_a_generation_failure() {
    use candle_core::{DType, Device, IndexOp, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let cfg = tokenscope::model::Config::tiny(49152);
    let mut tensors = tokenscope::model::init::random_weights(&cfg, 12, &Device::Cpu).unwrap();
    // One NaN in the (tied) embedding row of a token the prompt does not use: the hidden states
    // stay finite, that token's logit is NaN.
    let embed = &tensors["model.embed_tokens.weight"];
    let mut rows: Vec<Tensor> = (0..3).map(|i| embed.i(i).unwrap()).collect();
    rows[2] = Tensor::full(f32::NAN, cfg.hidden_size, &Device::Cpu).unwrap();
    let head = Tensor::stack(&rows, 0).unwrap();
    let rest = embed.i(3..).unwrap();
    let broken = Tensor::cat(&[&head, &rest], 0).unwrap();
    tensors.insert("model.embed_tokens.weight".into(), broken);
    tokenscope::model::hf_dir::save(
        dir.path(),
        &cfg,
        &tensors,
        &common::smollm().tokenizer,
        DType::F32,
    )
    .unwrap();
    let model = tokenscope::model::load(
        &tokenscope::model::ModelSource::HfDir(dir.path().into()),
        &Default::default(),
    )
    .unwrap();
    let worker = worker::spawn_loaded(model, WorkerLimits::default(), 4);
    let app = api::router(AppState::new(worker, ServeConfig::default()));
    let (s, b) = generate(&app, json!({"prompt": "The capital of France is"})).await;
    assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR, "{b}");
    assert_eq!(b["error_code"], "GENERATION_FAILED");
}

/// `detail` is a string for every status but 422, where it is FastAPI's list: the document
/// says exactly that (it said `object`, which no error body ever was).
#[tokio::test]
async fn openapi_declares_error_detail_as_string_or_list() {
    let (_, _, doc) = send(&app(), get("/openapi.json")).await;
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["ErrorBody"]["properties"]["detail"]["$ref"],
        "#/components/schemas/ErrorDetail"
    );
    let variants = schemas["ErrorDetail"]["oneOf"].as_array().unwrap();
    assert_eq!(variants.len(), 2, "{variants:?}");
    assert_eq!(variants[0]["type"], "string");
    assert_eq!(variants[1]["type"], "array");
    assert_eq!(
        variants[1]["items"]["$ref"],
        "#/components/schemas/FieldError"
    );
}
