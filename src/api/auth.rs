//! Bearer API keys: constant-time comparison against every configured key; /health is always
//! public, the docs are public unless `--protect-docs`. Keys are never logged.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::AppState;

/// Paths of the documentation (Swagger UI, ReDoc, the OpenAPI document).
pub fn is_docs_path(path: &str) -> bool {
    path == "/docs"
        || path.starts_with("/docs/")
        || path == "/redoc"
        || path.starts_with("/redoc/")
        || path == "/openapi.json"
}

/// True when `token` equals one of `keys`. Every key is compared in constant time (no early
/// exit on the first match either), so timing reveals neither which key nor how much matched.
pub fn key_matches(keys: &[String], token: &str) -> bool {
    let mut found = subtle::Choice::from(0u8);
    for k in keys {
        found |= k.as_bytes().ct_eq(token.as_bytes());
    }
    found.into()
}

pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    let path = req.uri().path();
    let public = keys.is_empty()
        || path == "/health"
        || path == "/live"
        || (is_docs_path(path) && !state.config.protect_docs)
        || (path == "/metrics" && state.config.public_metrics);
    if public {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = header.and_then(|h| {
        let (scheme, rest) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    match token {
        Some(t) if key_matches(keys, t) => next.run(req).await,
        Some(_) => ApiError::unauthorized("Invalid API key").into_response(),
        None => {
            ApiError::unauthorized("Missing API key: send the header `Authorization: Bearer <key>`")
                .into_response()
        }
    }
}
