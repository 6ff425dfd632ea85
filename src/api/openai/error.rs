//! OpenAI's error shape, and the JSON extractor of the OpenAI routes.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::api::error::ErrorCode;
use crate::api::error::{ApiError, ErrorDetail};
use crate::api::AppState;

/// Body of every error under `/v1/` and of the tokenizer endpoints.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"error": {"message": "max_tokens must be at least 1 unless echo is set",
    "type": "invalid_request_error", "param": "max_tokens", "code": "INVALID_MAX_TOKENS"}}))]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorInfo,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiErrorInfo {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, `rate_limit_error`
    /// (queue full), `timeout_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The offending request field, when one is to blame.
    pub param: Option<String>,
    /// tokenscope's error code (the native API's `error_code`: EMPTY_PROMPT, ...).
    pub code: String,
}

/// An error of the OpenAI surface: the native error (status, code, headers) in OpenAI's shape.
#[derive(Debug, Clone)]
pub struct OpenAiError {
    pub inner: ApiError,
    pub param: Option<String>,
}

impl OpenAiError {
    /// A 422 naming the request field at fault.
    /// `code` is one of the 422 kinds (Validation or a named range).
    pub fn invalid(param: &str, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            inner: ApiError::new(code, message),
            param: Some(param.to_string()),
        }
    }
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }
}

impl From<ApiError> for OpenAiError {
    fn from(inner: ApiError) -> Self {
        Self { inner, param: None }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let e = self.inner;
        crate::api::metrics::record_error(e.code.as_str());
        let (message, param) = match e.detail {
            ErrorDetail::Message(m) => (m, self.param),
            ErrorDetail::Fields(fields) => {
                // The first field's name (after "body") is the param.
                let param = self.param.or_else(|| {
                    fields
                        .first()
                        .and_then(|f| f.loc.get(1))
                        .and_then(|v| v.as_str())
                        .map(str::to_string)
                });
                let message = fields
                    .iter()
                    .map(|f| {
                        let at: Vec<String> = f
                            .loc
                            .iter()
                            .skip(1)
                            .map(|v| v.as_str().map_or(v.to_string(), str::to_string))
                            .collect();
                        format!("{}: {}", at.join("."), f.msg)
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                (message, param)
            }
        };
        let body = OpenAiErrorBody {
            error: OpenAiErrorInfo {
                message,
                kind: e.code.openai_type().into(),
                param,
                code: e.code.as_str().to_string(),
            },
        };
        let mut resp = (e.code.status(), axum::Json(body)).into_response();
        if let Some(secs) = e.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if e.www_authenticate {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A JSON body for the OpenAI routes: media type and size checked as for `/generate`, unknown
/// fields ignored, type errors reported as 422 `VALIDATION_ERROR` naming the field.
pub struct OpenAiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = OpenAiError;

    async fn from_request(req: Request<Body>, state: &AppState) -> Result<Self, OpenAiError> {
        let bytes = crate::api::extract::json_body_bytes(req, state.config.max_body_bytes).await?;
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            OpenAiError::invalid(
                "body",
                ErrorCode::Validation,
                format!("JSON decode error: {e}"),
            )
        })?;
        if !value.is_object() {
            return Err(OpenAiError::invalid(
                "body",
                ErrorCode::Validation,
                "the body must be a JSON object",
            ));
        }
        // JSON Schema's integers include 5.0: so do ours (token ids, max_tokens, n, ...).
        let value = integral_floats_as_integers(value);
        // The error's path names the field at fault.
        serde_path_to_error::deserialize(value)
            .map(OpenAiJson)
            .map_err(|e| {
                let message = e.inner().to_string();
                // A missing field is reported at the object's own path: take it from the text.
                let missing = message
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next());
                let field = match (e.path().iter().next(), missing) {
                    (Some(segment), _) => segment.to_string(),
                    (None, Some(name)) => name.to_string(),
                    (None, None) => "body".to_string(),
                };
                OpenAiError::invalid(&field, ErrorCode::Validation, message)
            })
    }
}

/// Every float with no fractional part (and in u64/i64 range) as an integer.
pub(crate) fn integral_floats_as_integers(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f >= 0.0 && f < u64::MAX as f64 {
                Value::from(f as u64)
            } else if f.fract() == 0.0 && f < 0.0 && f > i64::MIN as f64 {
                Value::from(f as i64)
            } else {
                Value::Number(n)
            }
        }
        Value::Array(items) => {
            Value::Array(items.into_iter().map(integral_floats_as_integers).collect())
        }
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k, integral_floats_as_integers(v)))
                .collect(),
        ),
        other => other,
    }
}
