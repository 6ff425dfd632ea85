//! The inspector page (GET /ui): one self-contained HTML file (its CSS and JS inline, no CDN,
//! no fonts to fetch), compiled into the binary so `cargo build` alone serves it offline. It
//! talks to the public API (/generate, /lens, /status) with the key the user enters.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::AppState;

const PAGE: &str = include_str!("ui/index.html");

pub async fn page(State(state): State<AppState>) -> Response {
    // The page asks for a key up front when the server needs one (no request meets a 401).
    let auth = if !state.config.keys_on() {
        "data-auth=\"\""
    } else {
        "data-auth=\"required\""
    };
    let mut page = PAGE.replacen("data-auth=\"\"", auth, 1);
    // The inputs' bounds are the API's (src/api/bounds.rs), not numbers of the page's own.
    for (placeholder, value) in super::bounds::page_values() {
        page = page.replace(placeholder, &value);
    }
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            // The page loads nothing from elsewhere; say so to the browser too.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src 'self' data:; connect-src 'self'",
            ),
        ],
        Html(page),
    )
        .into_response()
}

/// Whether a request to `/` comes from a browser (it asks for HTML): it is sent to the page,
/// while API clients keep the JSON overview.
pub fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.split(',').any(|m| m.trim().starts_with("text/html")))
}

pub fn redirect() -> Response {
    Redirect::to("/ui").into_response()
}
