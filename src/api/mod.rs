//! The HTTP API (axum): routes, request/response types, errors, auth and docs. The model is
//! never touched here — handlers talk to the engine's worker thread.

pub mod auth;
pub mod bounds;
pub mod compare;
pub mod docs;
pub mod error;
pub mod evaluations;
pub mod extract;
pub mod info;
pub mod jobs;
pub mod lens;
pub mod metrics;
pub mod models;
pub mod openai;
pub mod request_id;
pub mod routes;
pub mod server;
pub mod types;
pub mod ui;
pub mod unread_body;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{Html, Response};
use axum::routing::{get, MethodRouter};
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

pub use error::ApiError;

use crate::engine::registry::ModelRegistry;
use crate::engine::worker::WorkerHandle;

/// Settings the HTTP layer needs (the model's own settings live with the worker).
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Ordinary keys: query, and their own jobs and uploads.
    pub api_keys: Vec<String>,
    /// Admin keys: also load, unload and delete models, and every job.
    pub admin_keys: Vec<String>,
    pub protect_docs: bool,
    pub public_metrics: bool,
    pub request_timeout: Duration,
    pub max_body_bytes: usize,
    /// Shown before the model has loaded.
    pub model_name: String,
    /// ReDoc standalone bundle, when installed.
    pub redoc_bundle: Option<Arc<Vec<u8>>>,
    /// Origins allowed to call the API from a browser (`*` = any); empty = no CORS headers.
    pub cors_origins: Vec<String>,
    /// Bound on tokens generated per choice by the OpenAI routes (`--max-new-tokens`).
    pub max_new_tokens: Option<usize>,
    /// The longest pause allowed within a request body (`--header-timeout`).
    pub body_timeout: Duration,
}

impl ServeConfig {
    /// Whether requests need a key (any key configured).
    pub fn keys_on(&self) -> bool {
        !self.api_keys.is_empty() || !self.admin_keys.is_empty()
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            protect_docs: false,
            public_metrics: false,
            request_timeout: Duration::from_secs(60),
            max_body_bytes: 1 << 20,
            model_name: String::new(),
            redoc_bundle: None,
            cors_origins: Vec::new(),
            max_new_tokens: None,
            body_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub struct AppState {
    pub models: Arc<ModelRegistry>,
    /// Training jobs (absent in the router tests that serve one in-process model).
    pub jobs: Option<Arc<crate::train::jobs::JobManager>>,
    pub config: Arc<ServeConfig>,
    pub started: Instant,
    /// The model a request named (see [`AppState::select`]); else the default one.
    selected: Option<(String, WorkerHandle)>,
}

impl AppState {
    /// One model, already running (the router tests and benches).
    pub fn new(worker: WorkerHandle, config: ServeConfig) -> Self {
        let id = match worker.state() {
            crate::engine::worker::ModelState::Ready(info) => info.name.clone(),
            _ => config.model_name.clone(),
        };
        Self::with_models(Arc::new(ModelRegistry::single(&id, worker)), None, config)
    }

    pub fn with_models(
        models: Arc<ModelRegistry>,
        jobs: Option<Arc<crate::train::jobs::JobManager>>,
        config: ServeConfig,
    ) -> Self {
        Self {
            models,
            jobs,
            config: Arc::new(config),
            started: Instant::now(),
            selected: None,
        }
    }

    /// The worker of the selected model, or of the default model.
    pub fn worker(&self) -> WorkerHandle {
        match &self.selected {
            Some((_, w)) => w.clone(),
            None => self.models.default_handle(),
        }
    }

    /// Counts a generation request answered (GET /statistics).
    pub fn count_generation(&self) {
        if let Some(jobs) = &self.jobs {
            jobs.store().count_generation();
        }
    }

    /// The id of the selected (or default) model.
    pub fn model_id(&self) -> String {
        match &self.selected {
            Some((id, _)) => id.clone(),
            None => self.models.default_id().unwrap_or_default(),
        }
    }

    /// This state with the model a request names (`None`: the default model). An unknown
    /// name is 404 MODEL_NOT_FOUND; an unloaded model is 409 MODEL_NOT_LOADED, or, with
    /// `--autoload`, loaded first (the wait counts against the request timeout).
    pub async fn select(&self, name: Option<&str>) -> Result<AppState, ApiError> {
        let id = match name {
            None => self
                .models
                .default_id()
                .ok_or_else(|| ApiError::model_not_found(""))?,
            Some(n) => self
                .models
                .find(n)
                .ok_or_else(|| ApiError::model_not_found(n))?,
        };
        let mut worker = self.models.handle(&id);
        if matches!(worker.state(), crate::engine::worker::ModelState::Unloaded) {
            if !self.models.settings().autoload {
                return Err(ApiError::model_unloaded(&id));
            }
            self.models.load(&id).map_err(ApiError::from)?;
            worker = self.models.handle(&id);
            let mut state = worker.subscribe();
            let loaded = tokio::time::timeout(self.config.request_timeout, async {
                while matches!(
                    &*state.borrow_and_update(),
                    crate::engine::worker::ModelState::Loading
                ) {
                    if state.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            if loaded.is_err() {
                return Err(ApiError::timeout(self.config.request_timeout.as_secs_f64()));
            }
        }
        Ok(AppState {
            selected: Some((id, worker)),
            ..self.clone()
        })
    }
}

/// Every API route with its OpenAPI operation, listed once: the router and the document
/// (`/openapi.json`, and the endpoint list of `GET /`) both come from this table. A path
/// with several methods is one `routes!` call (utoipa-axum routes each call's paths to all
/// of its handlers).
pub fn routes() -> OpenApiRouter<AppState> {
    use openai::{chat, completions, tokenize};
    OpenApiRouter::with_openapi(docs::ApiDoc::openapi())
        .routes(utoipa_axum::routes!(routes::generate))
        .routes(utoipa_axum::routes!(lens::lens))
        .routes(utoipa_axum::routes!(compare::compare))
        .routes(utoipa_axum::routes!(routes::health))
        .routes(utoipa_axum::routes!(routes::live))
        .routes(utoipa_axum::routes!(routes::status))
        .routes(utoipa_axum::routes!(routes::root))
        .routes(utoipa_axum::routes!(models::list))
        .routes(utoipa_axum::routes!(info::info))
        .routes(utoipa_axum::routes!(models::get, models::delete))
        .routes(utoipa_axum::routes!(models::load))
        .routes(utoipa_axum::routes!(models::unload))
        .routes(utoipa_axum::routes!(jobs::upload))
        .routes(utoipa_axum::routes!(jobs::create, jobs::list))
        .routes(utoipa_axum::routes!(jobs::get, jobs::delete))
        .routes(utoipa_axum::routes!(jobs::delete_upload))
        .routes(utoipa_axum::routes!(jobs::pause))
        .routes(utoipa_axum::routes!(jobs::resume))
        .routes(utoipa_axum::routes!(jobs::cancel))
        .routes(utoipa_axum::routes!(evaluations::evaluate))
        .routes(utoipa_axum::routes!(evaluations::list))
        .routes(utoipa_axum::routes!(evaluations::get))
        .routes(utoipa_axum::routes!(evaluations::statistics))
        .routes(utoipa_axum::routes!(completions::create))
        .routes(utoipa_axum::routes!(chat::create))
        .routes(utoipa_axum::routes!(openai::models))
        .routes(utoipa_axum::routes!(tokenize::tokenize))
        .routes(utoipa_axum::routes!(tokenize::detokenize))
        .routes(utoipa_axum::routes!(tokenize::tokenizer_info))
}

/// Where Swagger UI is served (its routes come from utoipa-swagger-ui).
pub const SWAGGER_PATH: &str = "/docs";

/// A page outside the OpenAPI document (HTML, the document itself, Prometheus text): its
/// path, what `GET /` says of it, and its handler (`None`: routed by Swagger UI's router).
pub struct Page {
    pub path: &'static str,
    pub about: &'static str,
    route: Option<MethodRouter<AppState>>,
}

/// The pages, listed once: routed by [`router`] and listed by `GET /`.
fn pages(redoc: Option<Arc<Vec<u8>>>) -> Vec<Page> {
    let local_redoc = redoc.is_some();
    let page = |path, about, route| Page { path, about, route };
    vec![
        page(
            "/ui",
            "Inspector: a web page to explore the distributions",
            Some(get(ui::page)),
        ),
        page(
            "/metrics",
            "Prometheus metrics",
            Some(get(metrics::handler)),
        ),
        page(SWAGGER_PATH, "Swagger UI", None),
        page(
            "/redoc",
            "ReDoc",
            Some(get(
                move || async move { Html(docs::redoc_page(local_redoc)) },
            )),
        ),
        page(
            "/redoc/redoc.standalone.js",
            "ReDoc's bundle (served by this process, for offline use)",
            Some(get(move || docs::redoc_bundle(redoc.clone()))),
        ),
        page(
            "/openapi.json",
            "OpenAPI document",
            Some(get(docs::openapi_handler)),
        ),
    ]
}

/// Path and description of every page outside the OpenAPI document (for `GET /`).
pub fn page_list() -> Vec<(&'static str, &'static str)> {
    pages(None).iter().map(|p| (p.path, p.about)).collect()
}

/// The whole application.
pub fn router(state: AppState) -> Router {
    let (mut api, _) = routes().split_for_parts();
    for page in pages(state.config.redoc_bundle.clone()) {
        if let Some(route) = page.route {
            api = api.route(page.path, route);
        }
    }
    let api = api
        .method_not_allowed_fallback(routes::method_not_allowed)
        .fallback(routes::not_found);
    // Swagger UI's own routes (vendored assets, no network) point at our /openapi.json.
    let swagger: Router = SwaggerUi::new(SWAGGER_PATH)
        .config(utoipa_swagger_ui::Config::from("/openapi.json"))
        .into();
    let cors = cors_layer(&state.config.cors_origins);
    // The longest pause within a request body (a client trickling one: the connection is
    // closed rather than held).
    let body_timeout = state.config.body_timeout;
    let app = api
        .with_state(state.clone())
        .merge(swagger)
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            body_timeout,
        ))
        .layer(middleware::from_fn_with_state(state, auth::require_key))
        .layer(middleware::from_fn(log_request))
        .layer(middleware::from_fn(request_id::assign))
        // Outside auth and routing, so that their refusals' unread bodies are read too.
        .layer(middleware::from_fn(unread_body::drain));
    // Outermost, so that a preflight OPTIONS is answered before auth asks for a key.
    match cors {
        Some(cors) => app.layer(cors),
        None => app,
    }
}

/// CORS for browser apps (SillyTavern, mikupad): the given origins, any method and header,
/// no credentials (keys travel in the Authorization header).
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::HeaderValue;
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o.trim() == "*") {
        AllowOrigin::any()
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o.trim().trim_end_matches('/')).ok())
            .collect();
        AllowOrigin::list(list)
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any)
            .expose_headers(Any)
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// One line per request, like uvicorn's access log, and the request metrics. Headers (and so
/// keys) are never logged.
async fn log_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // The route's pattern as the router matched it ("/models/{id}"): a bounded set of labels
    // that follows the route table by itself; anything the router did not match is one label.
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string());
    let resp = next.run(req).await;
    let secs = start.elapsed().as_secs_f64();
    let status = resp.status().as_u16();
    let id = request_id::current().unwrap_or_default();
    tracing::info!(
        target: "tokenscope::access",
        method = %method, path = %path, status, latency_ms = secs * 1000.0, request_id = %id,
        "{method} {path} {status} {:.1}ms",
        secs * 1000.0
    );
    metrics::record_request(
        route.as_deref().unwrap_or("unmatched"),
        method.as_str(),
        status,
        secs,
    );
    resp
}
