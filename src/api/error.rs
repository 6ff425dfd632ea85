//! The one error type of the HTTP API: `{"detail": ..., "error_code": ...}` with a status.

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

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: ErrorDetail,
    pub retry_after: Option<u64>,
    pub www_authenticate: bool,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self {
            status,
            code,
            detail: ErrorDetail::Message(detail.into()),
            retry_after: None,
            www_authenticate: false,
        }
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// 422 with a list of field errors; the code names the first offending known field.
    pub fn validation(errors: Vec<FieldError>, range_code: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::UNPROCESSABLE_ENTITY,
            code: range_code.unwrap_or("VALIDATION_ERROR"),
            detail: ErrorDetail::Fields(errors),
            retry_after: None,
            www_authenticate: false,
        }
    }

    pub fn empty_prompt() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "EMPTY_PROMPT",
            "Prompt cannot be empty",
        )
    }
    pub fn not_loaded(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "MODEL_NOT_LOADED", detail).retry_after(5)
    }
    pub fn model_not_found(name: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "MODEL_NOT_FOUND",
            if name.is_empty() {
                "This server offers no model".to_string()
            } else {
                format!("Model `{name}` not found; GET /models lists the models this server offers")
            },
        )
    }
    pub fn model_unloaded(id: &str) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "MODEL_NOT_LOADED",
            format!("Model `{id}` is not loaded; load it with POST /models/{id}/load (or start the server with --autoload)"),
        )
    }
    pub fn overloaded() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "OVERLOADED",
            "The request queue is full. Please retry shortly.",
        )
        .retry_after(1)
    }
    pub fn timeout(secs: f64) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "TIMEOUT",
            format!("The request did not complete within {secs} seconds"),
        )
    }
    pub fn generation_failed() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "GENERATION_FAILED",
            "Token generation failed due to internal error",
        )
    }
    pub fn unauthorized(detail: &str) -> Self {
        Self {
            www_authenticate: true,
            ..Self::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", detail)
        }
    }
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", "Not Found")
    }
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "METHOD_NOT_ALLOWED",
            "Method Not Allowed",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        super::metrics::record_error(self.code);
        let body = ErrorBody {
            detail: self.detail,
            error_code: self.code.to_string(),
            request_id: super::request_id::current(),
        };
        let mut resp = (self.status, axum::Json(body)).into_response();
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
            E::TooManyLoaded { .. } => {
                Self::new(StatusCode::CONFLICT, "TOO_MANY_MODELS", e.to_string())
            }
            E::MemoryLimit { .. } => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "INSUFFICIENT_MEMORY",
                e.to_string(),
            ),
            E::NoSource(_) => Self::new(StatusCode::CONFLICT, "MODEL_NOT_LOADABLE", e.to_string()),
            E::Exists(_) => Self::new(StatusCode::CONFLICT, "MODEL_EXISTS", e.to_string()),
        }
    }
}
