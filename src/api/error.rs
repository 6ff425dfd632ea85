//! The one error type of the HTTP API. [`ErrorCode`] names every error the API answers with
//! and states, once each, its HTTP status, its `error_code` and the `type` OpenAI clients see;
//! [`ApiError`] is an error of that kind with its message. The native routes write it as
//! `{"detail": ..., "error_code": ...}` (here), the OpenAI routes as `{"error": {...}}`
//! (`openai/error.rs`): one conversion each.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// Error body of every non-2xx response.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"detail": "Prompt cannot be empty", "error_code": "EMPTY_PROMPT"}))]
pub struct ErrorBody {
    pub detail: ErrorDetail,
    /// Machine-readable code, e.g. EMPTY_PROMPT, INVALID_TEMPERATURE, OVERLOADED.
    pub error_code: String,
    /// The request's `x-request-id`, to find it in the logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// A message (every status but 422), or (422) a list of `{"loc", "msg", "type"}` objects, as
/// FastAPI writes them.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(untagged)]
pub enum ErrorDetail {
    Message(String),
    Fields(Vec<FieldError>),
}

/// One FastAPI-style validation error.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FieldError {
    /// Where: `"body"`, then field names (strings) and list indices or JSON columns (integers).
    #[schema(schema_with = loc_schema)]
    pub loc: Vec<Value>,
    pub msg: String,
    #[serde(rename = "type")]
    pub kind: String,
}

fn loc_schema() -> utoipa::openapi::schema::Array {
    use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
    ArrayBuilder::new()
        .items(
            OneOfBuilder::new()
                .item(ObjectBuilder::new().schema_type(Type::String))
                .item(ObjectBuilder::new().schema_type(Type::Integer)),
        )
        .build()
}

/// Every error the API answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    EmptyPrompt,
    PromptTooLong,
    /// A request field out of its schema (422, FastAPI's shape).
    Validation,
    InvalidTemperature,
    InvalidTopK,
    InvalidMaxTokens,
    PayloadTooLarge,
    UnsupportedMediaType,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    ModelNotFound,
    /// The model is loading (or restarting): retry shortly.
    ModelLoading,
    /// The model is not loaded: load it first (POST /models/{id}/load).
    ModelUnloaded,
    ModelNotLoadable,
    ModelExists,
    TooManyModels,
    InsufficientMemory,
    /// The request queue is full: retry shortly.
    Overloaded,
    Timeout,
    GenerationFailed,
    Internal,
    NoChatTemplate,
    ChatTemplateError,
    JobNotFound,
    JobConflict,
    OutputExists,
    PathNotAllowed,
    /// POST /compare with two models that tokenize differently.
    TokenizerMismatch,
    /// The key may not do this (an admin route called with an ordinary key).
    Forbidden,
    /// The state directory would pass `--max-disk`.
    DiskFull,
    UploadNotFound,
    DataNotFound,
    TrainingUnavailable,
    EvaluationNotFound,
}

impl ErrorCode {
    /// (HTTP status, `error_code`, OpenAI `type`): the one table.
    const fn spec(self) -> (StatusCode, &'static str, &'static str) {
        use ErrorCode::*;
        const INVALID: &str = "invalid_request_error";
        match self {
            EmptyPrompt => (StatusCode::BAD_REQUEST, "EMPTY_PROMPT", INVALID),
            PromptTooLong => (StatusCode::BAD_REQUEST, "PROMPT_TOO_LONG", INVALID),
            Validation => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "VALIDATION_ERROR",
                INVALID,
            ),
            InvalidTemperature => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_TEMPERATURE",
                INVALID,
            ),
            InvalidTopK => (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_TOP_K", INVALID),
            InvalidMaxTokens => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_MAX_TOKENS",
                INVALID,
            ),
            PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE", INVALID),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UNSUPPORTED_MEDIA_TYPE",
                INVALID,
            ),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication_error",
            ),
            NotFound => (StatusCode::NOT_FOUND, "NOT_FOUND", "not_found_error"),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "METHOD_NOT_ALLOWED",
                INVALID,
            ),
            ModelNotFound => (StatusCode::NOT_FOUND, "MODEL_NOT_FOUND", "not_found_error"),
            ModelLoading => (
                StatusCode::SERVICE_UNAVAILABLE,
                "MODEL_NOT_LOADED",
                "server_error",
            ),
            ModelUnloaded => (StatusCode::CONFLICT, "MODEL_NOT_LOADED", INVALID),
            ModelNotLoadable => (StatusCode::CONFLICT, "MODEL_NOT_LOADABLE", INVALID),
            ModelExists => (StatusCode::CONFLICT, "MODEL_EXISTS", INVALID),
            TooManyModels => (StatusCode::CONFLICT, "TOO_MANY_MODELS", INVALID),
            InsufficientMemory => (
                StatusCode::INSUFFICIENT_STORAGE,
                "INSUFFICIENT_MEMORY",
                "server_error",
            ),
            Overloaded => (
                StatusCode::SERVICE_UNAVAILABLE,
                "OVERLOADED",
                "rate_limit_error",
            ),
            Timeout => (StatusCode::GATEWAY_TIMEOUT, "TIMEOUT", "timeout_error"),
            GenerationFailed => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "GENERATION_FAILED",
                "server_error",
            ),
            Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL_ERROR",
                "server_error",
            ),
            NoChatTemplate => (StatusCode::BAD_REQUEST, "NO_CHAT_TEMPLATE", INVALID),
            ChatTemplateError => (StatusCode::BAD_REQUEST, "CHAT_TEMPLATE_ERROR", INVALID),
            JobNotFound => (StatusCode::NOT_FOUND, "JOB_NOT_FOUND", "not_found_error"),
            JobConflict => (StatusCode::CONFLICT, "JOB_CONFLICT", INVALID),
            OutputExists => (StatusCode::CONFLICT, "OUTPUT_EXISTS", INVALID),
            PathNotAllowed => (
                StatusCode::FORBIDDEN,
                "PATH_NOT_ALLOWED",
                "permission_error",
            ),
            Forbidden => (StatusCode::FORBIDDEN, "FORBIDDEN", "permission_error"),
            TokenizerMismatch => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "TOKENIZER_MISMATCH",
                INVALID,
            ),
            DiskFull => (
                StatusCode::INSUFFICIENT_STORAGE,
                "DISK_FULL",
                "insufficient_storage",
            ),
            UploadNotFound => (StatusCode::NOT_FOUND, "UPLOAD_NOT_FOUND", "not_found_error"),
            DataNotFound => (StatusCode::NOT_FOUND, "DATA_NOT_FOUND", "not_found_error"),
            TrainingUnavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "TRAINING_UNAVAILABLE",
                "server_error",
            ),
            EvaluationNotFound => (
                StatusCode::NOT_FOUND,
                "EVALUATION_NOT_FOUND",
                "not_found_error",
            ),
        }
    }

    pub fn status(self) -> StatusCode {
        self.spec().0
    }
    /// The native API's `error_code` (OpenAI's `code`).
    pub fn as_str(self) -> &'static str {
        self.spec().1
    }
    /// The `type` of OpenAI's error shape.
    pub fn openai_type(self) -> &'static str {
        self.spec().2
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub detail: ErrorDetail,
    pub retry_after: Option<u64>,
    pub www_authenticate: bool,
}

impl ApiError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: ErrorDetail::Message(for_clients(&detail.into())),
            retry_after: None,
            www_authenticate: false,
        }
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 422 with a list of field errors; the code names the first offending known field.
    pub fn validation(errors: Vec<FieldError>, range_code: Option<ErrorCode>) -> Self {
        Self {
            code: range_code.unwrap_or(ErrorCode::Validation),
            detail: ErrorDetail::Fields(errors),
            retry_after: None,
            www_authenticate: false,
        }
    }

    pub fn empty_prompt() -> Self {
        Self::new(ErrorCode::EmptyPrompt, "Prompt cannot be empty")
    }
    pub fn not_loaded(detail: impl Into<String>) -> Self {
        Self::new(ErrorCode::ModelLoading, detail).retry_after(5)
    }
    pub fn model_not_found(name: &str) -> Self {
        Self::new(
            ErrorCode::ModelNotFound,
            if name.is_empty() {
                "This server offers no model".to_string()
            } else {
                format!("Model `{name}` not found; GET /models lists the models this server offers")
            },
        )
    }
    pub fn model_unloaded(id: &str) -> Self {
        Self::new(ErrorCode::ModelUnloaded,
            format!("Model `{id}` is not loaded; load it with POST /models/{id}/load (or start the server with --autoload)"),
        )
    }
    pub fn overloaded() -> Self {
        Self::new(
            ErrorCode::Overloaded,
            "The request queue is full. Please retry shortly.",
        )
        .retry_after(1)
    }
    pub fn timeout(secs: f64) -> Self {
        Self::new(
            ErrorCode::Timeout,
            format!("The request did not complete within {secs} seconds"),
        )
    }
    pub fn generation_failed() -> Self {
        Self::new(
            ErrorCode::GenerationFailed,
            "Token generation failed due to internal error",
        )
    }
    pub fn unauthorized(detail: &str) -> Self {
        Self {
            www_authenticate: true,
            ..Self::new(ErrorCode::Unauthorized, detail)
        }
    }
    pub fn not_found() -> Self {
        Self::new(ErrorCode::NotFound, "Not Found")
    }
    pub fn method_not_allowed() -> Self {
        Self::new(ErrorCode::MethodNotAllowed, "Method Not Allowed")
    }
}

/// A message as a client may see it: without a backtrace (candle appends one to its errors
/// when `RUST_BACKTRACE` is set; it names the server's source files and is no client's
/// business). The log keeps the whole error.
pub fn for_clients(message: &str) -> String {
    let mut kept = Vec::new();
    for line in message.lines() {
        let t = line.trim_start();
        let frame = t
            .split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if frame || t.starts_with("stack backtrace:") || t.starts_with("Stack backtrace:") {
            break;
        }
        kept.push(line);
    }
    kept.join("\n").trim_end().to_string()
}

/// `text` with every absolute path cut to its last component: a model's file name says which
/// model failed; the folders it lives in are the operator's business (for public routes such
/// as /health).
pub fn without_paths(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('/') {
        let starts_token = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| c.is_whitespace() || "\"'`([{=:".contains(c));
        if !starts_token {
            out.push_str(&rest[..=i]);
            rest = &rest[i + 1..];
            continue;
        }
        out.push_str(&rest[..i]);
        let path_len = rest[i..]
            .find(|c: char| c.is_whitespace() || "\"'`)]},;".contains(c))
            .unwrap_or(rest.len() - i);
        let path = &rest[i..i + path_len];
        // A trailing colon or full stop ends the sentence, not the path.
        let trimmed = path.trim_end_matches([':', '.']);
        let name = trimmed.rsplit('/').next().unwrap_or_default();
        out.push_str(if name.is_empty() { "/" } else { name });
        out.push_str(&path[trimmed.len()..]);
        rest = &rest[i + path_len..];
    }
    out.push_str(rest);
    out
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        super::metrics::record_error(self.code.as_str());
        let body = ErrorBody {
            detail: self.detail,
            error_code: self.code.as_str().to_string(),
            request_id: super::request_id::current(),
        };
        let mut resp = (self.code.status(), axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.www_authenticate {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<crate::engine::registry::RegistryError> for ApiError {
    fn from(e: crate::engine::registry::RegistryError) -> Self {
        use crate::engine::registry::RegistryError as E;
        match &e {
            E::NotFound(name) => Self::model_not_found(name),
            E::TooManyLoaded { .. } => Self::new(ErrorCode::TooManyModels, e.to_string()),
            E::MemoryLimit { .. } => Self::new(ErrorCode::InsufficientMemory, e.to_string()),
            E::NoSource(_) | E::Unreadable { .. } => {
                Self::new(ErrorCode::ModelNotLoadable, e.to_string())
            }
            E::Exists(_) => Self::new(ErrorCode::ModelExists, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{for_clients, without_paths};

    #[test]
    fn backtraces_stay_on_the_server() {
        let candle = "shape mismatch in matmul, lhs: [1, 2], rhs: [3, 4]\n   0: candle_core::error::Error::bt\n             at /root/.cargo/registry/src/candle-core/src/error.rs:253:25\n   1: main";
        assert_eq!(
            for_clients(candle),
            "shape mismatch in matmul, lhs: [1, 2], rhs: [3, 4]"
        );
        let std_bt = "failed\nstack backtrace:\n   0: std::backtrace";
        assert_eq!(for_clients(std_bt), "failed");
        let plain = "Model `x` not found; GET /models lists the models\nsecond line: kept";
        assert_eq!(for_clients(plain), plain);
    }

    #[test]
    fn absolute_paths_become_file_names() {
        assert_eq!(
            without_paths("loading /srv/models/secret/here.gguf: No such file or directory"),
            "loading here.gguf: No such file or directory"
        );
        assert_eq!(
            without_paths("cannot read `/home/me/m.gguf` (tensor blk.0)"),
            "cannot read `m.gguf` (tensor blk.0)"
        );
        assert_eq!(without_paths("a/b and 3/4 stay"), "a/b and 3/4 stay");
        assert_eq!(without_paths("nothing here"), "nothing here");
    }
}
