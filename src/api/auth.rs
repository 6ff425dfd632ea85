//! Bearer API keys: constant-time comparison against every configured key; /health is always
//! public, the docs are public unless `--protect-docs`. Keys are never logged. A key is
//! ordinary or admin ([`Role`]); the request carries its [`Caller`] to the handlers.

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

/// What a key may do. Ordinary keys query any loaded model and manage their own jobs and
/// uploads; admin keys also load, unload and delete models and see every job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Admin,
}

/// Who sent a request (put in its extensions by [`require_key`]): the role, and the owner
/// recorded on what they create — a digest of their key, never the key. A server without keys
/// is open as it always was: every caller is an admin without an owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
    pub owner: Option<String>,
}

impl Caller {
    /// The caller of a server without keys.
    pub fn open() -> Self {
        Self {
            role: Role::Admin,
            owner: None,
        }
    }

    /// 403 `FORBIDDEN` unless an admin key sent the request.
    pub fn require_admin(&self, what: &str) -> Result<(), ApiError> {
        match self.role {
            Role::Admin => Ok(()),
            Role::User => Err(ApiError::new(
                super::error::ErrorCode::Forbidden,
                format!("Only an admin key may {what} (the server's --admin-key)"),
            )),
        }
    }

    /// The job manager's view of this caller.
    pub fn requester(&self) -> crate::train::jobs::Requester {
        crate::train::jobs::Requester {
            owner: self.owner.clone(),
            sees_all: self.role == Role::Admin,
        }
    }
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    /// Set by [`require_key`] on every route that needs a key; a request without it (a public
    /// route) is the least a caller can be, not an admin.
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("Missing API key"))
    }
}

/// The configured key `token` equals, if any. What is compared are SHA-256 digests, 32 bytes
/// whatever the lengths (`ct_eq` on the raw bytes returns at once on a length mismatch, which
/// would time-leak a key's length), each in constant time, and every key is compared (no exit
/// on the first match), so timing reveals neither which key nor how much of it matched.
pub fn matching_key(keys: &[String], token: &str) -> Option<usize> {
    use subtle::ConditionallySelectable;
    let token = digest(token);
    let mut found = subtle::Choice::from(0u8);
    let mut index = 0u64;
    for (i, k) in keys.iter().enumerate() {
        let eq = digest(k).ct_eq(&token);
        index = u64::conditional_select(&index, &(i as u64), eq);
        found |= eq;
    }
    bool::from(found).then_some(index as usize)
}

/// True when `token` equals one of `keys` (see [`matching_key`]).
pub fn key_matches(keys: &[String], token: &str) -> bool {
    matching_key(keys, token).is_some()
}

fn digest(s: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes()).into()
}

/// The owner recorded for a key: a hex digest (domain-separated from the comparison's, and
/// short: it names an owner in the state database, it is not a credential).
pub fn owner_of(key: &str) -> String {
    let d = digest(&format!("tokenscope-owner:{key}"));
    d[..12].iter().map(|b| format!("{b:02x}")).collect()
}

pub async fn require_key(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let config = &state.config;
    if config.api_keys.is_empty() && config.admin_keys.is_empty() {
        req.extensions_mut().insert(Caller::open());
        return next.run(req).await;
    }
    let path = req.uri().path();
    let public = path == "/health"
        || path == "/live"
        || (is_docs_path(path) && !config.protect_docs)
        || (path == "/metrics" && config.public_metrics)
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
        Some(t) => {
            // Both lists are always compared, so timing does not tell an admin key apart.
            let admin = matching_key(&config.admin_keys, t).is_some();
            let user = matching_key(&config.api_keys, t).is_some();
            if admin || user {
                let owner = owner_of(t);
                req.extensions_mut().insert(Caller {
                    role: if admin { Role::Admin } else { Role::User },
                    owner: Some(owner),
                });
                return next.run(req).await;
            }
            ApiError::unauthorized("Invalid API key")
        }
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
        assert_eq!(matching_key(&keys, "a-much-longer-key-0123456789"), Some(1));
        assert_eq!(matching_key(&keys, "short"), Some(0));
    }

    #[test]
    fn owners_are_digests_not_keys() {
        let owner = owner_of("secret-key");
        assert_eq!(owner.len(), 24);
        assert!(!owner.contains("secret"));
        assert_eq!(owner, owner_of("secret-key"));
        assert_ne!(owner, owner_of("secret-key2"));
    }

    /// The comparison never sees the raw lengths: both sides are 32-byte digests.
    #[test]
    fn compared_values_have_one_length() {
        assert_eq!(digest("").len(), digest(&"k".repeat(4096)).len());
        assert_ne!(digest("a"), digest("b"));
    }
}
