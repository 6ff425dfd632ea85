//! Request and response bodies of the OpenAI-compatible routes, as OpenAI's API reference and
//! vLLM define them (only the fields tokenscope implements; unknown request fields are
//! ignored).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A prompt: a string, a list of strings, a list of token ids, or a list of such lists. Token
/// ids are run exactly as given (no BOS is added); strings follow the model's own BOS rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// Most prompts in one request.
pub use crate::api::bounds::MAX_PROMPTS;

/// The schema says what the handler accepts: non-blank strings (the native prompt's pattern),
/// non-empty lists, at most [`MAX_PROMPTS`] prompts, token ids as `TokenId` (whose maximum the
/// served document sets to the loaded vocabulary's last id).
impl utoipa::PartialSchema for PromptField {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let text = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .pattern(Some(crate::api::types::PROMPT_PATTERN))
        };
        let ids = || ArrayBuilder::new().items(token_id_ref()).min_items(Some(1));
        OneOfBuilder::new()
            .item(text())
            .item(
                ArrayBuilder::new()
                    .items(text())
                    .min_items(Some(1))
                    .max_items(Some(MAX_PROMPTS)),
            )
            .item(ids())
            .item(
                ArrayBuilder::new()
                    .items(ids())
                    .min_items(Some(1))
                    .max_items(Some(MAX_PROMPTS)),
            )
            .description(Some(
                "A string, a list of strings, a list of token ids, or a list of lists of token ids.",
            ))
            .into()
    }
}

impl ToSchema for PromptField {}

/// A reference to the `TokenId` component.
pub fn token_id_ref() -> utoipa::openapi::Ref {
    utoipa::openapi::Ref::from_schema_name("TokenId")
}

/// `TokenId`: an id in the model's vocabulary (the served document adds the maximum).
pub fn token_id_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(0))
        .description(Some(
            "A token id: 0 to the vocabulary's size − 1 (GET /openapi.json of a running server states the maximum).",
        ))
        .build()
}

/// A list of token ids for `schema_with`.
pub fn token_ids_schema() -> utoipa::openapi::schema::Array {
    utoipa::openapi::schema::ArrayBuilder::new()
        .items(token_id_ref())
        .build()
}

/// One server-sent event as the OpenAPI document describes a `text/event-stream` item.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ServerSentEvent {
    /// A JSON chunk (`CompletionResponse` or `ChatChunk` with one choice, or a usage chunk,
    /// or `{"error": ...}`), or `[DONE]` last.
    pub data: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<u64>,
}

/// One stop string or a list of up to 4, each 1 to 256 characters.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

impl utoipa::PartialSchema for StopField {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use crate::api::types::{MAX_STOP_CHARS, MAX_STOP_STRINGS};
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Type};
        let text = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_STOP_CHARS))
        };
        OneOfBuilder::new()
            .item(text())
            .item(
                ArrayBuilder::new()
                    .items(text())
                    .max_items(Some(MAX_STOP_STRINGS)),
            )
            .into()
    }
}

impl ToSchema for StopField {}

impl StopField {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(try_from = "JsonObject")]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// A JSON object and nothing else: serde's derived `Deserialize` for a struct also accepts an
/// array of its fields in order (`"stream_options": []` was taken as `{}`), which the schema
/// does not allow. Objects are deserialized through this, then into the fields.
pub type JsonObject = serde_json::Map<String, serde_json::Value>;

#[derive(Deserialize)]
struct StreamOptionsFields {
    #[serde(default)]
    include_usage: bool,
}

impl TryFrom<JsonObject> for StreamOptions {
    type Error = serde_json::Error;
    fn try_from(object: JsonObject) -> Result<Self, Self::Error> {
        let f: StreamOptionsFields = serde_json::from_value(serde_json::Value::Object(object))?;
        Ok(Self {
            include_usage: f.include_usage,
        })
    }
}

/// Body of POST /v1/completions.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"prompt": "The capital of France is", "max_tokens": 1,
    "logprobs": 5, "echo": true, "temperature": 0}))]
pub struct CompletionRequest {
    /// The model to ask (an id from `GET /v1/models`; default: the server's default model).
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptField,
    /// Tokens to generate (default 16); 0 is allowed with `echo` (scoring only).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2147483647)]
    pub max_tokens: Option<u32>,
    /// 0 to 2 (default 1); below 1e-5 is greedy.
    #[serde(default)]
    #[schema(minimum = 0.0)]
    pub temperature: Option<f64>,
    /// Nucleus sampling, (0, 1] (default 1).
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Choices per prompt, 1 to 4.
    #[serde(default)]
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    /// Makes sampling reproducible; choice i of a prompt uses seed + i.
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Also return the log-probability of each token and the `logprobs` most likely
    /// alternatives at each position (0 to 20): the model's own distribution (T = 1).
    #[serde(default)]
    #[schema(minimum = 0)]
    pub logprobs: Option<u32>,
    /// Put the prompt before the completion, in `text` and (with `logprobs`) in `logprobs`:
    /// every prompt token scored, the first with `null`.
    #[serde(default)]
    pub echo: bool,
    /// Server-sent events, one token per chunk, then `data: [DONE]`.
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// vLLM's option: name every token `token_id:N` in `tokens` and `top_logprobs`.
    #[serde(default)]
    pub return_tokens_as_token_ids: bool,
}

/// One position's `top_logprobs`: names and log-probs, written as a JSON object whose keys
/// come most likely first, as OpenAI orders them (a sorted map would put them in alphabetical
/// order).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobMap(pub Vec<(String, f64)>);

impl Serialize for TopLogprobMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Log-probabilities of a completion choice, in OpenAI's legacy layout.
#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct CompletionLogprobs {
    /// Each token's name: its text (a byte-fallback token's too), or `bytes:\xNN...` when its
    /// bytes are not UTF-8 on their own.
    pub tokens: Vec<String>,
    /// Each token's log-probability given what precedes it; `null` for the first echoed prompt
    /// token. −inf is written −9999.0.
    pub token_logprobs: Vec<Option<f64>>,
    /// At each position, the chosen token and the top alternatives with their log-probs
    /// (`null` for the first echoed prompt token). The chosen token's value equals
    /// `token_logprobs` bit for bit.
    #[schema(value_type = Vec<Option<BTreeMap<String, f64>>>)]
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
    /// Character offset of each token in `text` (of the tokens' concatenated text).
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionChoice {
    pub index: usize,
    pub text: String,
    /// `stop` (end of sequence or a stop string) or `length`; `null` in stream chunks before
    /// the last.
    pub finish_reason: Option<String>,
    pub logprobs: Option<CompletionLogprobs>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

/// Response of POST /v1/completions (and each stream chunk, with one choice).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CompletionResponse {
    pub id: String,
    /// `text_completion`
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A chat message's content: a string, or a list of parts of which only `text` ones are
/// supported.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// A text part (images and audio are not supported).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: PartKind,
    pub text: String,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PartKind {
    Text,
}

/// The roles a chat message may have (OpenAI's, which the chat templates know).
pub const KNOWN_ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool"];

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(try_from = "JsonObject")]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Required (not null) except in an assistant's message, as OpenAI has it.
    #[serde(default)]
    pub content: Option<MessageContent>,
}

#[derive(Deserialize)]
struct ChatMessageFields {
    role: String,
    #[serde(default)]
    content: Option<MessageContent>,
}

impl TryFrom<JsonObject> for ChatMessageIn {
    type Error = serde_json::Error;
    fn try_from(object: JsonObject) -> Result<Self, Self::Error> {
        let f: ChatMessageFields = serde_json::from_value(serde_json::Value::Object(object))?;
        if !KNOWN_ROLES.contains(&f.role.as_str()) {
            return Err(serde::de::Error::custom(format!(
                "role `{}` is not one of {}",
                f.role,
                KNOWN_ROLES.join(", ")
            )));
        }
        if f.content.is_none() && f.role != "assistant" {
            return Err(serde::de::Error::custom(format!(
                "a `{}` message needs `content` (only an assistant's may leave it out)",
                f.role
            )));
        }
        Ok(Self {
            role: f.role,
            content: f.content,
        })
    }
}

/// Body of POST /v1/chat/completions.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[schema(example = json!({"messages": [{"role": "user", "content": "What is the capital of France?"}],
    "max_tokens": 8, "logprobs": true, "top_logprobs": 3, "temperature": 0}))]
pub struct ChatRequest {
    /// The model to ask (an id from `GET /v1/models`; default: the server's default model).
    #[serde(default)]
    pub model: Option<String>,
    /// Rendered with the model's own chat template.
    #[schema(min_items = 1)]
    pub messages: Vec<ChatMessageIn>,
    /// Tokens to generate (at most what the context leaves; the server's `--max-new-tokens`
    /// caps it).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub max_tokens: Option<u32>,
    /// The newer name of `max_tokens` (wins when both are given).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2147483647)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0.0)]
    pub temperature: Option<f64>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub n: Option<u32>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    /// Return each generated token's log-probability (the model's own distribution, T = 1).
    #[serde(default)]
    pub logprobs: bool,
    /// Alternatives per position, 0 to 20; needs `logprobs: true`.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub top_logprobs: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatMessageOut {
    /// `assistant`
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// Response of POST /v1/chat/completions.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatResponse {
    pub id: String,
    /// `chat.completion`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Default, Serialize, ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatChunk {
    pub id: String,
    /// `chat.completion.chunk`
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    /// `model`
    pub object: String,
    /// Unix seconds when the server started.
    pub created: u64,
    pub owned_by: String,
    /// Context length in tokens (vLLM's field; while the model is loaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
    /// loaded | loading | unloaded | failed (tokenscope's field: GET /models has the rest).
    pub status: crate::engine::registry::LoadStatus,
}

/// Response of GET /v1/models.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`
    pub object: String,
    pub data: Vec<ModelCard>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Objects in the schema are objects on the wire: an array of the fields is refused.
    #[test]
    fn objects_are_not_taken_from_arrays() {
        assert!(serde_json::from_str::<StreamOptions>("[]").is_err());
        assert!(serde_json::from_str::<StreamOptions>("[true]").is_err());
        assert!(
            serde_json::from_str::<StreamOptions>(r#"{"include_usage": true}"#)
                .unwrap()
                .include_usage
        );
        assert!(serde_json::from_str::<ChatMessageIn>(r#"["user", "hi"]"#).is_err());
        let m: ChatMessageIn =
            serde_json::from_str(r#"{"role": "user", "content": "hi"}"#).unwrap();
        assert_eq!(m.role, "user");
    }
}
