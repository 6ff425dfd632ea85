//! Request bodies a handler did not read (`POST /models/{id}/unload` with `{}`, an auth or
//! routing refusal of a POST): read and dropped here before the response goes out, or the
//! connection is announced closed.
//!
//! Why: hyper keeps a keep-alive connection only if the request body was read to its end. When
//! a handler drops a body that has not fully arrived yet (the client wrote the headers and the
//! body in two segments), hyper closes the connection after the response *without* saying
//! `connection: close`, so a client that pools connections (ureq, requests, httpx) sends its
//! next request into a closed socket and gets "peer disconnected" — seen in CI, and by a raw
//! socket writing `{}` 50 ms after the headers. Reading the rest (bounded in bytes and time,
//! like nginx's discarding of unread bodies) keeps the connection; past the bounds the
//! response says `connection: close`, so no client is surprised.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

/// The most of an unread body read to keep its connection open.
const DRAIN_BYTES: usize = 64 * 1024;
/// The longest wait for the rest of an unread body.
const DRAIN_TIME: Duration = Duration::from_secs(1);

/// The request body, shared between the handler (which may read it) and [`drain`] (which reads
/// what is left once the handler is done), and whether the handler ever asked for it.
#[derive(Clone)]
struct Shared(Arc<Mutex<Body>>, Arc<AtomicBool>);

impl http_body::Body for Shared {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.1.store(true, Ordering::Relaxed);
        let mut body = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Pin::new(&mut *body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        let body = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let body = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        body.size_hint()
    }
}

/// Middleware: runs the request, then reads what the handler left of its body (see the module
/// documentation).
pub async fn drain(req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    if body.is_end_stream() {
        // No body (a GET) or an empty one: nothing can be left unread.
        return next.run(Request::from_parts(parts, body)).await;
    }
    // A client that sent `expect: 100-continue` sends the body only once asked (hyper asks
    // when the body is first read): a body its handler never asked for is not asked for here
    // either, and a body too large to read out is not read; either way the connection closes.
    let expects_continue = parts
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let too_large = body.size_hint().lower() > DRAIN_BYTES as u64;
    let shared = Shared(Arc::new(Mutex::new(body)), Arc::new(AtomicBool::new(false)));
    let mut response = next
        .run(Request::from_parts(parts, Body::new(shared.clone())))
        .await;
    let asked = shared.1.load(Ordering::Relaxed);
    let read_out = if too_large || (expects_continue && !asked) {
        shared.is_end_stream()
    } else {
        read_rest(shared).await
    };
    if !read_out {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads the body to its end within [`DRAIN_BYTES`] and [`DRAIN_TIME`]; whether it got there.
async fn read_rest(mut body: Shared) -> bool {
    if body.is_end_stream() {
        return true;
    }
    let rest = async {
        let mut read = 0usize;
        loop {
            match body.frame().await {
                None => return true,
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_BYTES {
                        return false;
                    }
                }
                Some(Err(_)) => return false,
            }
        }
    };
    tokio::time::timeout(DRAIN_TIME, rest)
        .await
        .unwrap_or(false)
}
