//! The router in-process (tower `oneshot`, no socket): what the HTTP-level tests share.

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use tokenscope::api::{self, AppState, ServeConfig};
use tokenscope::engine::worker::{self, WorkerHandle, WorkerLimits};
use tokenscope::model::LoadedModel;

/// The API serving `model` on a worker of its own (a queue of `queue` jobs), and that worker.
pub fn router(
    model: &LoadedModel,
    limits: WorkerLimits,
    queue: usize,
    config: ServeConfig,
) -> (Router, WorkerHandle) {
    let worker = worker::spawn_loaded(model.clone(), limits, queue);
    (api::router(AppState::new(worker.clone(), config)), worker)
}

/// Sends `req`: the status, the headers and the body as text.
pub async fn send(app: &Router, req: Request<Body>) -> (StatusCode, HeaderMap, String) {
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// A body as JSON, or as a JSON string of its text when it is not JSON (so that an assertion
/// on it still shows what came back).
pub fn json_or_text(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

/// GET `path`.
pub fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

/// POST `body` (JSON, sent exactly as written) to `path`.
pub fn post_json(path: &str, body: &str) -> Request<Body> {
    Request::post(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// POSTs `body` to `path`: the status and the body ([`json_or_text`]).
pub async fn post(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, text) = send(app, post_json(path, &body.to_string())).await;
    (status, json_or_text(text))
}
