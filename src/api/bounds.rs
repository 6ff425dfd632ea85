//! Request bounds, defined once. Validation names these constants (validator's attributes and
//! the OpenAI routes' checks), the OpenAPI document gets them from [`apply`] (so the schema
//! attributes carry no numbers of their own), and the inspector page from [`page_values`].

use serde_json::{json, Value};

/// Largest sampling temperature (`/generate`, OpenAI routes).
pub const TEMPERATURE_MAX: f64 = 2.0;
/// Most tokens `/generate` generates per request.
pub const MAX_TOKENS_MAX: i64 = 100;
/// Most alternatives per position (`/generate`, `/lens`).
pub const TOP_K_MAX: i64 = 50;
/// Most stop strings per request.
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string or target, in characters.
pub const MAX_STOP_CHARS: usize = 256;
/// Most targets scored per request.
pub const MAX_TARGETS: usize = 16;
/// Most prompts in one OpenAI completion request.
pub const MAX_PROMPTS: usize = 64;
/// Most choices (`n`) per OpenAI request.
pub const MAX_N: u32 = 4;
/// Most alternatives per position in OpenAI log-probs (`logprobs`, `top_logprobs`).
pub const MAX_LOGPROBS: u32 = 20;
/// Tokens a chat completion generates when the request names no `max_tokens` (a chat model
/// that never says its end token must not run to the context's end).
pub const DEFAULT_CHAT_MAX_TOKENS: usize = 512;

// validator's `length` takes u64 constants.
pub(crate) const MAX_STOP_STRINGS_LEN: u64 = MAX_STOP_STRINGS as u64;
pub(crate) const MAX_TARGETS_LEN: u64 = MAX_TARGETS as u64;

/// Where each bound goes in the OpenAPI document: (schema, property, keyword, value).
fn schema_bounds() -> Vec<(&'static str, &'static str, &'static str, Value)> {
    vec![
        (
            "GenerateRequest",
            "temperature",
            "maximum",
            json!(TEMPERATURE_MAX),
        ),
        (
            "GenerateRequest",
            "max_tokens",
            "maximum",
            json!(MAX_TOKENS_MAX),
        ),
        ("GenerateRequest", "top_k", "maximum", json!(TOP_K_MAX)),
        ("LensRequest", "top_k", "maximum", json!(TOP_K_MAX)),
        ("CompletionRequest", "n", "maximum", json!(MAX_N)),
        (
            "CompletionRequest",
            "logprobs",
            "maximum",
            json!(MAX_LOGPROBS),
        ),
        ("ChatRequest", "n", "maximum", json!(MAX_N)),
        (
            "ChatRequest",
            "top_logprobs",
            "maximum",
            json!(MAX_LOGPROBS),
        ),
        (
            "ChatRequest",
            "temperature",
            "maximum",
            json!(TEMPERATURE_MAX),
        ),
        (
            "CompletionRequest",
            "temperature",
            "maximum",
            json!(TEMPERATURE_MAX),
        ),
        (
            "ChatRequest",
            "max_tokens",
            "default",
            json!(DEFAULT_CHAT_MAX_TOKENS),
        ),
    ]
}

/// Writes the bounds into the document's schemas. Returns the (schema, property) pairs it
/// could not find (a renamed field), which the tests require to be none.
pub fn apply(doc: &mut Value) -> Vec<String> {
    let mut missing = Vec::new();
    for (schema, property, keyword, value) in schema_bounds() {
        let slot = &mut doc["components"]["schemas"][schema]["properties"][property];
        if slot.is_object() {
            slot[keyword] = value;
        } else {
            missing.push(format!("{schema}.{property}"));
        }
    }
    missing
}

/// The bounds the inspector page's inputs carry (`{{NAME}}` placeholders in its HTML).
pub fn page_values() -> [(&'static str, String); 4] {
    [
        ("{{MAX_TARGETS}}", MAX_TARGETS.to_string()),
        ("{{TEMPERATURE_MAX}}", TEMPERATURE_MAX.to_string()),
        ("{{MAX_TOKENS_MAX}}", MAX_TOKENS_MAX.to_string()),
        ("{{TOP_K_MAX}}", TOP_K_MAX.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_bound_finds_its_property() {
        let doc: serde_json::Value =
            serde_json::from_str(&super::super::docs::openapi_json()).unwrap();
        let mut doc = doc;
        assert_eq!(super::apply(&mut doc), Vec::<String>::new());
    }
}
