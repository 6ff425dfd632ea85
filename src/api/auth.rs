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

/// True when `token` equals one of `keys`. What is compared are SHA-256 digests, 32 bytes
/// whatever the lengths (`ct_eq` on the raw bytes returns at once on a length mismatch, which
/// would time-leak a key's length), each in constant time, and every key is compared (no exit
/// on the first match), so timing reveals neither which key nor how much of it matched.
pub fn key_matches(keys: &[String], token: &str) -> bool {
    let token = digest(token);
    let mut found = subtle::Choice::from(0u8);
    for k in keys {
        found |= digest(k).ct_eq(&token);
    }
    found.into()
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes()).into()
}

pub async fn require_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let keys = &state.config.api_keys;
    let path = req.uri().path();
    let public = keys.is_empty()
        || path == "/health"
        || path == "/live"
        || (is_docs_path(path) && !state.config.protect_docs)
        || (path == "/metrics" && state.config.public_metrics)
        // The inspector page holds no data (it asks for the key), and a browser sent from `/`
        // gets only the redirect to it.
        || path == "/ui"
        || (path == "/" && super::ui::wants_html(req.headers()));
    if public {
        return next.run(req).await;
    }
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // `Bearer ` with nothing after it (what OpenAI clients send with no key set) is a wrong
    // key, not a missing header.
    let token = header.and_then(|h| {
        let h = h.trim();
        let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    let error = match token {
        Some(t) if key_matches(keys, t) => return next.run(req).await,
        Some(_) => ApiError::unauthorized("Invalid API key"),
        None => {
            ApiError::unauthorized("Missing API key: send the header `Authorization: Bearer <key>`")
        }
    };
    if super::openai::is_openai_path(path) {
        super::openai::OpenAiError::from(error).into_response()
    } else {
        error.into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly_whatever_their_lengths() {
        let keys = vec![
            "short".to_string(),
            "a-much-longer-key-0123456789".to_string(),
        ];
        assert!(key_matches(&keys, "short"));
        assert!(key_matches(&keys, "a-much-longer-key-0123456789"));
        for wrong in ["", "shor", "shortt", "Short", "a-much-longer-key-012345678"] {
            assert!(!key_matches(&keys, wrong), "{wrong:?}");
        }
        assert!(!key_matches(&[], "short"));
    }

    /// The comparison never sees the raw lengths: both sides are 32-byte digests.
    #[test]
    fn compared_values_have_one_length() {
        assert_eq!(digest("").len(), digest(&"k".repeat(4096)).len());
        assert_ne!(digest("a"), digest("b"));
    }
}
