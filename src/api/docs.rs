//! The OpenAPI document, Swagger UI (vendored assets) and ReDoc (standalone bundle served by
//! this process when `assets/redoc.standalone.js` is present; otherwise its CDN).

use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ErrorBody, ErrorDetail, FieldError};
use super::openai::{self, tokenize, types as oai};
use super::types::*;
use crate::engine::{
    FinishReason, GenerateResponse, LogprobsMode, Metadata, PromptToken, Step, TargetScore,
    TokenProbability,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tokenscope",
        description = "What does a causal language model think comes next, and how sure is it? \
Top-k next tokens with probability, percentage, log-probability and rank.\n\n\
Errors are `{\"detail\": ..., \"error_code\": ...}`. When API keys are configured, every route \
but /health needs `Authorization: Bearer <key>` (use the Authorize button).\n\n\
The `openai` routes speak OpenAI's API (`base_url = http://HOST:PORT/v1`): their errors are \
`{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` and unknown request fields are \
ignored. Log-probs there are the model's own distribution (T = 1); token-id prompts are run \
exactly as given (no BOS added); `top_logprobs` keys name tokens uniquely: the token's text, \
`bytes:\\xNN...` when its bytes are not UTF-8 on their own, `token_id:N` when a lower id has the \
same bytes.",
        license(name = "Apache-2.0")
    ),
    components(schemas(
        GenerateRequest, GenerateResponse, TokenProbability, Step, Metadata, FinishReason,
        LogprobsMode, HealthResponse, StatusResponse, ServiceStatus, ModelStatus, SystemStatus,
        RootResponse, EndpointInfo, ModelRuntime, ErrorBody, ErrorDetail, FieldError, LiveResponse,
        PromptToken, TargetScore, super::lens::LensRequest, super::lens::LensResponse,
        crate::engine::lens::LensLayer, crate::engine::lens::LensTarget,
        oai::CompletionRequest, oai::CompletionResponse, oai::CompletionChoice,
        oai::CompletionLogprobs, oai::PromptField, oai::StopField, oai::StreamOptions, oai::Usage,
        oai::ChatRequest, oai::ChatResponse, oai::ChatChoice, oai::ChatMessageIn,
        oai::ChatMessageOut, oai::MessageContent, oai::ContentPart, oai::ChatLogprobs,
        oai::ChatTokenLogprob, oai::TopLogprob, oai::ChatChunk, oai::ChatChunkChoice,
        oai::ChatDelta, oai::ModelList, oai::ModelCard, openai::error::OpenAiErrorBody,
        openai::error::OpenAiErrorInfo, tokenize::TokenizeRequest, tokenize::TokenizePrompt, tokenize::TokenizeChat,
        tokenize::TokenizeResponse, oai::ServerSentEvent,
        tokenize::DetokenizeRequest, tokenize::DetokenizeResponse,
        tokenize::TokenizerInfoResponse,
        crate::engine::registry::ModelView, crate::engine::registry::LoadStatus,
        crate::engine::registry::Origin,
        crate::train::jobs::JobSpec, crate::train::jobs::JobView, crate::train::jobs::JobStatus,
        crate::train::jobs::DataSpec,
        crate::train::jobs::TextData, crate::train::jobs::UploadData, crate::train::jobs::PathData,
        crate::train::jobs::store::HistoryPoint, crate::train::jobs::store::UploadRow,
        super::jobs::UploadText,
        crate::eval::EvalRequest, crate::eval::ReferencePair, crate::eval::EvalView,
        crate::eval::EvalMetrics, crate::eval::EvalSample, crate::eval::EvalList,
        super::evaluations::Statistics
    )),
    modifiers(&BearerScheme),
    tags(
        (name = "generation", description = "Next-token distributions"),
        (name = "service", description = "Health, status and overview"),
        (name = "openai", description = "OpenAI-compatible completions, chat and models"),
        (name = "tokenizer", description = "vLLM-compatible tokenizer endpoints"),
        (name = "models", description = "The models this server offers; loading and unloading them"),
        (name = "training", description = "Training jobs: uploads, queue, progress, pause/resume/cancel"),
        (name = "evaluations", description = "Perplexity, BLEU and ROUGE of a model; platform statistics"),
    )
)]
pub struct ApiDoc;

struct BearerScheme;

impl Modify for BearerScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.schemas.insert(
            "TokenId".into(),
            crate::api::openai::types::token_id_schema().into(),
        );
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API key given to the server with --api-key or --admin-key",
                    ))
                    .build(),
            ),
        );
    }
}

/// The document as served at /openapi.json and printed by `tokenscope openapi`.
pub fn openapi_json() -> String {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(build_openapi_json).clone()
}

fn build_openapi_json() -> String {
    let mut doc = super::routes().into_openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let Ok(mut value) = serde_json::to_value(&doc) else {
        return "{}".into();
    };
    add_dependent_schemas(&mut value);
    super::bounds::apply(&mut value);
    serde_json::to_string_pretty(&value).unwrap_or_else(|_| "{}".into())
}

/// Rules between fields, which utoipa's schema types cannot state (JSON Schema 2020-12's
/// `dependentSchemas`): a chat request's `top_logprobs` needs `logprobs: true` (vLLM's rule).
fn add_dependent_schemas(doc: &mut serde_json::Value) {
    // A chat message: a known role, and content unless it is the assistant's.
    let message = &mut doc["components"]["schemas"]["ChatMessageIn"];
    if message.is_object() {
        message["properties"]["role"]["enum"] = serde_json::json!(oai::KNOWN_ROLES);
        message["anyOf"] = serde_json::json!([
            {"properties": {"role": {"const": "assistant"}}},
            {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        ]);
    }
    // An evaluation needs something to evaluate.
    let eval = &mut doc["components"]["schemas"]["EvalRequest"];
    if eval.is_object() {
        eval["anyOf"] = serde_json::json!([
            {"required": ["data"], "properties": {"data": {"not": {"type": "null"}}}},
            {"required": ["references"], "properties": {"references": {"minItems": 1}}},
        ]);
    }
    // A job: steps or epochs; LoRA settings one way or the other, and not with `full`.
    let job = &mut doc["components"]["schemas"]["JobSpec"];
    if job.is_object() {
        let platform = serde_json::json!([
            {"required": ["lora_r"], "properties": {"lora_r": {"type": "integer"}}},
            {"required": ["lora_alpha"], "properties": {"lora_alpha": {"type": "number"}}},
            {"required": ["lora_dropout"], "properties": {"lora_dropout": {"type": "number"}}},
        ]);
        let lora =
            serde_json::json!({"required": ["lora"], "properties": {"lora": {"type": "object"}}});
        let full = serde_json::json!({"required": ["method"], "properties": {"method": {"const": "full"}}});
        job["allOf"] = serde_json::json!([
            {"not": {"required": ["steps", "epochs"],
                     "properties": {"steps": {"type": "integer"}, "epochs": {"type": "number"}}}},
            {"not": {"allOf": [full, lora]}},
            {"not": {"allOf": [full, {"anyOf": platform}]}},
            {"not": {"allOf": [lora, {"anyOf": platform}]}},
        ]);
    }
    let targets = &mut doc["components"]["schemas"]["LoraSpec"]["properties"]["target_modules"];
    if targets.is_object() {
        targets["minItems"] = serde_json::json!(1);
        targets["items"]["enum"] = serde_json::json!(crate::model::lora::MODULES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>());
    }
    let chat = &mut doc["components"]["schemas"]["ChatRequest"];
    if chat.is_object() {
        chat["dependentSchemas"] = serde_json::json!({
            "top_logprobs": {"anyOf": [
                {"properties": {"top_logprobs": {"type": "null"}}},
                {"required": ["logprobs"], "properties": {"logprobs": {"const": true}}},
            ]}
        });
    }
}

/// The document as this server runs: the loaded model's largest token id (`TokenId`'s
/// maximum), and, when keys are configured, operations that need the key say so alone (the
/// static document's `[{}, bearer]` means "a key if the server has keys").
pub async fn openapi_handler(
    axum::extract::State(state): axum::extract::State<super::AppState>,
) -> Response {
    let mut doc = openapi_json();
    let ready = match state.worker().state() {
        crate::engine::worker::ModelState::Ready(info) => Some(info.vocab_size),
        _ => None,
    };
    let keys_on = state.config.keys_on();
    if ready.is_some() || keys_on {
        if let Ok(mut value) = serde_json::from_str::<serde_json::Value>(&doc) {
            if let Some(vocab_size) = ready {
                let token_id = &mut value["components"]["schemas"]["TokenId"];
                if token_id.is_object() {
                    token_id["maximum"] = serde_json::json!(vocab_size.saturating_sub(1));
                }
            }
            if keys_on {
                require_bearer(&mut value);
            }
            doc = value.to_string();
        }
    }
    ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
}

/// Every operation that accepts a bearer key requires it (its `{}` alternative dropped).
fn require_bearer(doc: &mut serde_json::Value) {
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for item in paths.values_mut() {
        let Some(ops) = item.as_object_mut() else {
            continue;
        };
        for op in ops.values_mut() {
            if let Some(security) = op.get_mut("security").and_then(|s| s.as_array_mut()) {
                let bearer = security.iter().any(|s| s.get("bearer").is_some());
                if bearer {
                    security.retain(|s| s.as_object().is_some_and(|o| !o.is_empty()));
                }
            }
        }
    }
}

pub const REDOC_CDN: &str = "https://cdn.redoc.ly/redoc/v2.5.1/bundles/redoc.standalone.js";

/// ReDoc's page. `Redoc.init` is called from the page so that it works with the bundle
/// served locally (offline) or from the CDN.
pub fn redoc_page(local_bundle: bool) -> String {
    let src = if local_bundle {
        "/redoc/redoc.standalone.js"
    } else {
        REDOC_CDN
    };
    format!(
        r#"<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8"/>
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>tokenscope — ReDoc</title>
<style>body {{ margin: 0; padding: 0; }}</style>
</head>
<body>
<div id="redoc-container"></div>
<script src="{src}"></script>
<script>
fetch("/openapi.json").then(function (r) {{ return r.json(); }}).then(function (spec) {{
  Redoc.init(spec, {{}}, document.getElementById("redoc-container"));
}});
</script>
</body>
</html>
"#
    )
}

pub async fn redoc_bundle(bundle: Option<std::sync::Arc<Vec<u8>>>) -> Response {
    match bundle {
        Some(b) => (
            [
                (
                    header::CONTENT_TYPE,
                    "application/javascript; charset=utf-8",
                ),
                (header::CACHE_CONTROL, "public, max-age=86400"),
            ],
            b.as_ref().clone(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, Html("ReDoc bundle not installed")).into_response(),
    }
}

include!(concat!(env!("OUT_DIR"), "/redoc.rs"));

/// Finds `assets/redoc.standalone.js` under the working directory or the executable's ancestors.
pub fn find_redoc_bundle() -> Option<std::path::PathBuf> {
    crate::model::find_installed_file(std::path::Path::new("assets/redoc.standalone.js"))
}

/// The ReDoc bundle: embedded at build time (build.rs), else the installed file, else none
/// (the page then loads ReDoc from its CDN).
pub fn redoc_bundle_bytes() -> Option<Vec<u8>> {
    REDOC_EMBEDDED
        .map(<[u8]>::to_vec)
        .or_else(|| find_redoc_bundle().and_then(|p| std::fs::read(p).ok()))
}
