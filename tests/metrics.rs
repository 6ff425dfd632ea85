//! /metrics moves as requests are made; request ids are echoed and put in error bodies.

mod common;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;

use common::http::send;
use tokenscope::api::ServeConfig;
use tokenscope::engine::worker::WorkerLimits;

fn app(config: ServeConfig) -> Router {
    let limits = WorkerLimits {
        max_prompt_tokens: None,
        ..Default::default()
    };
    common::http::router(common::smollm(), limits, 8, config).0
}

/// The value of a sample line `name{labels} value` (labels matched as a substring).
fn sample(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(labels)
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

async fn scrape(app: &Router) -> String {
    let (s, h, text) = send(app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(h[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    text
}

fn generate(body: &str) -> Request<Body> {
    common::http::post_json("/generate", body)
}

#[tokio::test]
async fn metrics_move_with_requests() {
    let app = app(ServeConfig::default());
    let before = scrape(&app).await;
    assert_eq!(sample(&before, "tokenscope_model_loaded", ""), 1.0);
    assert!(sample(&before, "tokenscope_process_resident_memory_bytes", "") > 1e8);
    assert_eq!(sample(&before, "tokenscope_queue_capacity", ""), 8.0);
    for name in [
        "tokenscope_queue_depth",
        "tokenscope_requests_in_flight",
        "tokenscope_model_load_seconds",
    ] {
        assert!(before.contains(name), "{name} missing:\n{before}");
    }
    let ok_before = sample(
        &before,
        "tokenscope_http_requests_total",
        r#"route="/generate""#,
    );
    let gen_before = sample(&before, "tokenscope_generated_tokens_total", "");
    let prompt_before = sample(&before, "tokenscope_prompt_tokens_total", "");

    let (s, _, _) = send(
        &app,
        generate(r#"{"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}"#),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, _) = send(&app, generate(r#"{"prompt": "hi", "top_k": 99}"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    send(
        &app,
        Request::get("/no/such/path/123")
            .body(Body::empty())
            .unwrap(),
    )
    .await;

    let after = scrape(&app).await;
    // Metrics are per process and other tests of this binary run alongside: compare with >=.
    assert!(
        sample(
            &after,
            "tokenscope_http_requests_total",
            r#"route="/generate""#
        ) >= ok_before + 2.0
    );
    assert!(sample(&after, "tokenscope_http_requests_total", r#"status="200""#) >= 1.0);
    assert!(sample(&after, "tokenscope_http_requests_total", r#"status="422""#) >= 1.0);
    assert!(
        sample(
            &after,
            "tokenscope_errors_total",
            r#"error_code="INVALID_TOP_K""#
        ) >= 1.0
    );
    assert!(
        sample(
            &after,
            "tokenscope_errors_total",
            r#"error_code="NOT_FOUND""#
        ) >= 1.0
    );
    assert!(
        after.contains(r#"route="unmatched""#),
        "unknown paths share one label"
    );
    // Every route is labelled by its pattern, from the router itself: the page, the lens, and
    // a route with a parameter (one label, whatever the id).
    for req in [
        Request::get("/ui").body(Body::empty()).unwrap(),
        common::http::post_json("/lens", r#"{"prompt": "Hi", "top_k": 2}"#),
        Request::get("/models/no-such-model")
            .body(Body::empty())
            .unwrap(),
    ] {
        send(&app, req).await;
    }
    let labelled = scrape(&app).await;
    for route in ["/ui", "/lens", "/models/{id}"] {
        assert!(
            labelled.contains(&format!(r#"route="{route}""#)),
            "{route} has no label"
        );
    }
    assert!(!labelled.contains("no-such-model"));
    assert!(!after.contains("/no/such/path"));
    assert!(sample(&after, "tokenscope_generated_tokens_total", "") >= gen_before + 3.0);
    assert!(sample(&after, "tokenscope_prompt_tokens_total", "") >= prompt_before + 5.0);
    assert!(
        sample(
            &after,
            "tokenscope_http_request_duration_seconds_count",
            r#"route="/generate""#
        ) >= 2.0
    );
}

#[tokio::test]
async fn metrics_need_the_key_unless_public() {
    let keys = vec!["k-123".to_string()];
    let private = app(ServeConfig {
        api_keys: keys.clone(),
        ..Default::default()
    });
    let (s, _, _) = send(
        &private,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let public = app(ServeConfig {
        api_keys: keys,
        public_metrics: true,
        ..Default::default()
    });
    let (s, _, _) = send(
        &public,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    // Liveness never needs a key and never depends on the model.
    let (s, _, body) = send(&public, Request::get("/live").body(Body::empty()).unwrap()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body.contains("alive"));
}

#[tokio::test]
async fn request_ids_are_echoed_and_reported_in_errors() {
    let app = app(ServeConfig::default());
    let req = Request::get("/health")
        .header("x-request-id", "trace-abc-123")
        .body(Body::empty())
        .unwrap();
    let (_, h, _) = send(&app, req).await;
    assert_eq!(h["x-request-id"], "trace-abc-123");
    let (_, h, _) = send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
    let generated = h["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 32);
    // An unusable incoming id (too long / odd characters) is replaced.
    let req = Request::get("/health")
        .header("x-request-id", "x".repeat(500))
        .body(Body::empty())
        .unwrap();
    let (_, h, _) = send(&app, req).await;
    assert_ne!(h["x-request-id"].to_str().unwrap().len(), 500);
    let mut req = generate(r#"{"prompt": ""}"#);
    req.headers_mut()
        .insert("x-request-id", "req-42".parse().unwrap());
    let (s, h, body) = send(&app, req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(h["x-request-id"], "req-42");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["request_id"], "req-42");
    assert_eq!(v["error_code"], "EMPTY_PROMPT");
}
