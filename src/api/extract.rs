//! `ValidJson<T>`: the one extractor for JSON bodies. It checks the media type and size, parses
//! JSON, checks every known field's JSON type (so errors carry a precise `loc`), rejects unknown
//! fields, then runs the `validator` rules — all reported FastAPI-style (pydantic v1 messages,
//! as in the seed contract), with INVALID_<FIELD> codes for range violations.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use validator::{Validate, ValidationErrors, ValidationErrorsKind};

use super::error::{ApiError, FieldError};
use super::AppState;
use crate::api::error::ErrorCode;

/// The JSON type each known field must have.
#[derive(Debug, Clone, Copy)]
pub enum FieldType {
    String,
    Number,
    Integer,
    OptionalUnsigned,
    /// A string or null.
    OptionalString,
    Boolean,
    StringList,
    Enum(&'static [&'static str]),
}

/// A body type that declares its fields for type checking and its range error codes.
pub trait BodySchema: DeserializeOwned + Validate {
    const FIELDS: &'static [(&'static str, FieldType, bool)];
    /// error_code for a range violation on a field.
    fn range_code(field: &str) -> Option<ErrorCode>;
}

impl BodySchema for super::types::GenerateRequest {
    const FIELDS: &'static [(&'static str, FieldType, bool)] = &[
        ("prompt", FieldType::String, true),
        ("temperature", FieldType::Number, false),
        ("max_tokens", FieldType::Integer, false),
        ("top_k", FieldType::Integer, false),
        ("seed", FieldType::OptionalUnsigned, false),
        ("stop", FieldType::StringList, false),
        ("stop_on_newline", FieldType::Boolean, false),
        (
            "logprobs_mode",
            FieldType::Enum(&["processed", "raw"]),
            false,
        ),
        ("prompt_logprobs", FieldType::Boolean, false),
        ("targets", FieldType::StringList, false),
        ("model", FieldType::OptionalString, false),
    ];
    fn range_code(field: &str) -> Option<ErrorCode> {
        match field {
            "temperature" => Some(ErrorCode::InvalidTemperature),
            "max_tokens" => Some(ErrorCode::InvalidMaxTokens),
            "top_k" => Some(ErrorCode::InvalidTopK),
            _ => None,
        }
    }
}

pub struct ValidJson<T>(pub T);

fn err(loc: &[&str], msg: impl Into<String>, kind: &str) -> FieldError {
    FieldError {
        loc: loc.iter().map(|s| json!(s)).collect(),
        msg: msg.into(),
        kind: kind.to_string(),
    }
}

impl<T: BodySchema> FromRequest<AppState> for ValidJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request<Body>, state: &AppState) -> Result<Self, ApiError> {
        let bytes = json_body_bytes(req, state.config.max_body_bytes).await?;
        parse_body::<T>(&bytes).map(ValidJson)
    }
}

/// The body of a JSON request: 415 unless the media type is JSON, 413 beyond `limit` bytes.
/// Shared by every JSON extractor (native and OpenAI).
pub async fn json_body_bytes(
    req: Request<Body>,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        });
    if !is_json {
        return Err(ApiError::new(
            ErrorCode::UnsupportedMediaType,
            "Content-Type must be application/json",
        ));
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("Request body exceeds the limit of {limit} bytes"),
            )
        })
}

/// Parses and validates a body (separate from the extractor so it can be unit-tested).
pub fn parse_body<T: BodySchema>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::validation(
            vec![FieldError {
                loc: vec![json!("body"), json!(e.column())],
                msg: format!("JSON decode error: {e}"),
                kind: "value_error.jsondecode".into(),
            }],
            None,
        )
    })?;
    let mut value = value;
    let Value::Object(obj) = &mut value else {
        return Err(ApiError::validation(
            vec![err(
                &["body"],
                "value is not a valid dict",
                "type_error.dict",
            )],
            None,
        ));
    };
    let errors = check_types::<T>(obj);
    normalize_integers::<T>(obj);
    if !errors.is_empty() {
        return Err(ApiError::validation(errors, None));
    }
    let parsed: T = serde_json::from_value(value).map_err(|e| {
        // Types were checked above, so this is rare (e.g. an integer beyond 64 bits).
        ApiError::validation(vec![err(&["body"], e.to_string(), "value_error")], None)
    })?;
    if let Err(errors) = parsed.validate() {
        let list = range_errors(&errors);
        let code = list.iter().find_map(|e| {
            e.loc
                .get(1)
                .and_then(|f| f.as_str())
                .and_then(T::range_code)
        });
        return Err(ApiError::validation(list, code));
    }
    Ok(parsed)
}

/// An integral float within the u64 range as that integer (exact: such an f64 is an integer).
fn integral_u64(n: &serde_json::Number) -> Option<u64> {
    n.as_f64()
        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0)
        .map(|f| f as u64)
}

/// Integral floats (5.0) become integers, saturating at the i64 range so that the range check
/// (not a parse error) reports values like 1e20; for unsigned fields, within the u64 range.
fn normalize_integers<T: BodySchema>(obj: &mut Map<String, Value>) {
    for (name, ty, _) in T::FIELDS {
        if matches!(ty, FieldType::OptionalUnsigned) {
            if let Some(Value::Number(n)) = obj.get(*name) {
                if let Some(v) = (!n.is_u64()).then(|| integral_u64(n)).flatten() {
                    obj.insert((*name).to_string(), Value::from(v));
                }
            }
            continue;
        }
        if !matches!(ty, FieldType::Integer) {
            continue;
        }
        if let Some(Value::Number(n)) = obj.get(*name) {
            let replacement = if n.is_i64() {
                None
            } else if n.is_u64() {
                Some(i64::MAX)
            } else {
                n.as_f64()
                    .map(|f| f.clamp(i64::MIN as f64, i64::MAX as f64) as i64)
            };
            if let Some(v) = replacement {
                obj.insert((*name).to_string(), Value::from(v));
            }
        }
    }
}

fn check_types<T: BodySchema>(obj: &Map<String, Value>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    for (name, ty, required) in T::FIELDS {
        let loc = ["body", name];
        let Some(v) = obj.get(*name) else {
            if *required {
                errors.push(err(&loc, "field required", "value_error.missing"));
            }
            continue;
        };
        let bad = |msg: &str, kind: &str| Some(err(&loc, msg, kind));
        let problem = match ty {
            FieldType::String if !v.is_string() => bad("str type expected", "type_error.str"),
            FieldType::OptionalString if !(v.is_string() || v.is_null()) => {
                bad("str type expected", "type_error.str")
            }
            FieldType::Number if !v.is_number() => {
                bad("value is not a valid float", "type_error.float")
            }
            FieldType::Boolean if !v.is_boolean() => {
                bad("value could not be parsed to a boolean", "type_error.bool")
            }
            FieldType::Integer => match v {
                Value::Number(n) if n.is_i64() || n.is_u64() => None,
                // 5.0 is accepted as 5; 5.5 is not.
                Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => None,
                _ => bad("value is not a valid integer", "type_error.integer"),
            },
            FieldType::OptionalUnsigned => match v {
                Value::Null => None,
                Value::Number(n) if n.is_u64() => None,
                // 1191.0 is the integer 1191 (JSON Schema's reading); 1191.5 is not.
                Value::Number(n) if integral_u64(n).is_some() => None,
                Value::Number(n) if n.is_i64() => Some(err(
                    &loc,
                    "ensure this value is greater than or equal to 0",
                    "value_error.number.not_ge",
                )),
                _ => bad(
                    "value is not a valid integer (0 to 2^64-1)",
                    "type_error.integer",
                ),
            },
            FieldType::StringList => match v {
                Value::Array(items) => items.iter().enumerate().find_map(|(i, item)| match item {
                    Value::String(s) if s.is_empty() => Some(FieldError {
                        loc: vec![json!("body"), json!(name), json!(i)],
                        msg: "ensure this value has at least 1 characters".into(),
                        kind: "value_error.any_str.min_length".into(),
                    }),
                    Value::String(s) if s.chars().count() > super::types::MAX_STOP_CHARS => {
                        Some(FieldError {
                            loc: vec![json!("body"), json!(name), json!(i)],
                            msg: format!(
                                "ensure this value has at most {} characters",
                                super::types::MAX_STOP_CHARS
                            ),
                            kind: "value_error.any_str.max_length".into(),
                        })
                    }
                    Value::String(_) => None,
                    _ => Some(FieldError {
                        loc: vec![json!("body"), json!(name), json!(i)],
                        msg: "str type expected".into(),
                        kind: "type_error.str".into(),
                    }),
                }),
                _ => bad("value is not a valid list", "type_error.list"),
            },
            FieldType::Enum(allowed) => match v.as_str() {
                Some(s) if allowed.contains(&s) => None,
                _ => Some(err(
                    &loc,
                    format!(
                        "value is not a valid enumeration member; permitted: {}",
                        allowed
                            .iter()
                            .map(|a| format!("'{a}'"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    "type_error.enum",
                )),
            },
            _ => None,
        };
        errors.extend(problem);
    }
    let known: Vec<&str> = T::FIELDS.iter().map(|f| f.0).collect();
    for key in obj.keys() {
        if !known.contains(&key.as_str()) {
            errors.push(FieldError {
                loc: vec![json!("body"), json!(key)],
                msg: "extra fields not permitted".into(),
                kind: "value_error.extra".into(),
            });
        }
    }
    errors
}

/// validator's errors → FastAPI-style entries, in field declaration order.
fn range_errors(errors: &ValidationErrors) -> Vec<FieldError> {
    let mut out = Vec::new();
    let mut fields: Vec<_> = errors.errors().iter().collect();
    fields.sort_by_key(|(name, _)| name.to_string());
    for (field, kind) in fields {
        let ValidationErrorsKind::Field(list) = kind else {
            continue;
        };
        for e in list {
            let loc = ["body", field.as_ref()];
            let value = e.params.get("value").and_then(|v| v.as_f64());
            let min = e.params.get("min").and_then(|v| v.as_f64());
            let max = e.params.get("max").and_then(|v| v.as_f64());
            let fmt = |x: f64| {
                if *field == "temperature" {
                    format!("{x:.1}")
                } else {
                    format!("{x}")
                }
            };
            let entry = match (e.code.as_ref(), value, min, max) {
                ("range", Some(v), _, Some(hi)) if v > hi => err(
                    &loc,
                    format!("ensure this value is less than or equal to {}", fmt(hi)),
                    "value_error.number.not_le",
                ),
                ("range", Some(_), Some(lo), _) => err(
                    &loc,
                    format!("ensure this value is greater than or equal to {}", fmt(lo)),
                    "value_error.number.not_ge",
                ),
                ("length", _, _, Some(hi)) => err(
                    &loc,
                    format!("ensure this value has at most {hi} items"),
                    "value_error.list.max_items",
                ),
                _ => err(&loc, format!("invalid value ({})", e.code), "value_error"),
            };
            out.push(entry);
        }
    }
    out
}
