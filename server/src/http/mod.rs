//! The REST API (axum). The CLI and the pipeline use the same routes.
//!
//! ```text
//! GET  /healthz                              {"status":"ok"}
//! GET  /api/v1/keys                          the manifest signing key
//! POST /api/v1/models                        multipart: metadata (JSON) + model (ONNX)
//! GET  /api/v1/models[/{slot}/{version}]     model records
//! GET  /artifacts/{sha256}                   model bytes (Range requests answered with 206)
//! POST /api/v1/rollouts                      {"slot","version","devices"|"selector"|"channel"}, Idempotency-Key
//! GET  /api/v1/rollouts[/{id}]               rollouts and their per-device progress
//! POST /api/v1/rollouts/{id}/{pause|resume|abort|rollback}
//! POST /api/v1/rollouts/{id}/install         {"devices":[..]} or nothing: order the install
//! GET  /api/v1/channels[/{name}]            channels and the devices that follow them
//! PUT  /api/v1/channels/{name}              {"selector","priority","pins":{slot: version}}
//! DELETE /api/v1/channels/{name}
//! GET  /api/v1/openapi.json                  this API as an OpenAPI 3.1 document
//! GET  /metrics                              Prometheus text: rollouts, devices, events
//! GET  /api/v1/devices[/{id}]                devices: status, info, telemetry
//! PUT  /api/v1/devices/{id}/labels          {"labels":{..}}: replace the operator labels
//! PATCH /api/v1/devices/{id}/labels         {"set":{..},"remove":[..]}: edit them
//! GET  /api/v1/devices/{id}/telemetry        the last hour of telemetry (`?since=`)
//! PUT|HEAD /api/v1/devices/{id}/samples/{sha256}   a robot's sample upload (device token)
//! POST /api/v1/devices/{id}/capture          {"slot","requests"}: a signed capture order
//! GET  /api/v1/samples[/summary|/{sha256}[/file|/thumbnail.png]]   samples and their files
//! POST /api/v1/datasets                      {"name", devices?, selector?, slots?, rules?, …}
//! GET  /api/v1/datasets[/{id}[/manifest|/export]]   data sets, manifests, tar exports
//! GET  /api/v1/events/stream                 server-sent change notices (`?ticket=`)
//! POST /api/v1/events/ticket                 a 60 s ticket to open the stream with
//! GET  /api/v1/session                       the caller's role
//! GET  / and /web/{file}                     the dashboard (embedded)
//! With `[auth]` tokens configured, `/api` needs `Authorization: Bearer <token>`.
//! ```
//! Every error is JSON: `{"error": "<one line>"}`.

mod access;
mod channels;
mod dashboard;
pub mod datasets;
mod devices;
mod history;
mod metrics;
mod models;
mod openapi;
mod rollouts;
pub mod samples;
mod stream;

use std::error::Error as StdError;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::fleet::Fleet;
use crate::registry::Registry;
use crate::rollouts::create::RolloutService;

/// Slack for the multipart framing and the metadata part above the model size cap.
const BODY_SLACK: u64 = 1024 * 1024;
/// The largest rollout request: one naming its devices by id is about 22 bytes a device
/// (2.2 MB for 100,000, past axum's 2 MiB default), so room for a few million.
const ROLLOUT_BODY_LIMIT: usize = 64 * 1024 * 1024;

/// What the handlers share.
#[derive(Debug)]
pub struct App {
    pub registry: Arc<Registry>,
    pub rollouts: Arc<RolloutService>,
    pub fleet: Arc<Fleet>,
    pub key_id: String,
    pub public_key: String,
    pub max_model_bytes: u64,
    /// Cardinality limits of the per-device metrics.
    pub metrics: crate::config::MetricsConfig,
    /// API tokens and stream tickets.
    pub access: Arc<crate::auth::Access>,
    /// Samples, data sets and capture orders.
    pub data: Arc<crate::data::DataService>,
    /// Cancelled when the server stops: long-lived responses (the event stream) end then.
    pub stop: tokio_util::sync::CancellationToken,
}

type AppState = State<Arc<App>>;

/// An error answer: a status and one line of text.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl std::fmt::Display) -> Self {
        Self {
            status,
            message: message.to_string().replace(['\n', '\r'], " "),
        }
    }

    /// An error whose whole cause chain the client should read.
    pub fn from_error(status: StatusCode, err: &(dyn StdError + 'static)) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        if status.is_server_error() {
            tracing::error!(%status, error = %message, "request failed");
        }
        Self::new(status, message)
    }

    pub fn not_found(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::NOT_FOUND, what)
    }

    pub fn bad_request(what: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, what)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorBody {
                error: &self.message,
            }),
        )
            .into_response()
    }
}

/// `Path`, with its rejections (bad percent-encoding, …) answered as JSON errors.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError::new(rejection.status(), rejection.body_text())),
        }
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
}

async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize)]
struct KeyInfo<'a> {
    key_id: &'a str,
    public_key: &'a str,
}

async fn keys(State(app): AppState) -> Response {
    Json(KeyInfo {
        key_id: &app.key_id,
        public_key: &app.public_key,
    })
    .into_response()
}

async fn no_route() -> ApiError {
    ApiError::not_found("no such route; the API lives under /api/v1")
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// The whole API.
pub fn router(app: Arc<App>) -> Router {
    let upload_limit =
        usize::try_from(app.max_model_bytes.saturating_add(BODY_SLACK)).unwrap_or(usize::MAX);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/keys", get(keys))
        .route(
            "/api/v1/models",
            get(models::list)
                .post(models::upload)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/api/v1/models/{slot}/{version}", get(models::get))
        .route("/artifacts/{sha256}", get(models::artifact))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list)
                .post(rollouts::create)
                .layer(DefaultBodyLimit::max(ROLLOUT_BODY_LIMIT)),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::get))
        .route("/api/v1/rollouts/{id}/pause", post(rollouts::pause))
        .route("/api/v1/rollouts/{id}/resume", post(rollouts::resume))
        .route("/api/v1/rollouts/{id}/abort", post(rollouts::abort))
        .route("/api/v1/rollouts/{id}/rollback", post(rollouts::rollback))
        .route("/api/v1/rollouts/{id}/install", post(rollouts::install))
        .route("/api/v1/channels", get(channels::list))
        .route(
            "/api/v1/channels/{name}",
            get(channels::get)
                .put(channels::put)
                .delete(channels::delete),
        )
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/metrics", get(metrics::metrics))
        .route("/api/v1/devices", get(devices::list))
        .route("/api/v1/devices/{id}", get(devices::get))
        .route(
            "/api/v1/devices/{id}/labels",
            put(devices::replace_labels).patch(devices::patch_labels),
        )
        .route("/api/v1/devices/{id}/telemetry", get(history::telemetry))
        .route(
            "/api/v1/devices/{id}/samples/{sha256}",
            put(samples::upload).head(samples::head),
        )
        .route("/api/v1/devices/{id}/capture", post(samples::capture))
        .route("/api/v1/samples", get(samples::list))
        .route("/api/v1/samples/summary", get(samples::summary))
        .route("/api/v1/samples/{sha256}", get(samples::get))
        .route("/api/v1/samples/{sha256}/file", get(samples::file))
        .route(
            "/api/v1/samples/{sha256}/thumbnail.png",
            get(samples::thumbnail),
        )
        .route(
            "/api/v1/datasets",
            get(datasets::list).post(datasets::create),
        )
        .route("/api/v1/datasets/{id}", get(datasets::get))
        .route("/api/v1/datasets/{id}/manifest", get(datasets::manifest))
        .route("/api/v1/datasets/{id}/export", get(datasets::export))
        .route(access::STREAM_PATH, get(stream::stream))
        .route("/api/v1/events/ticket", post(access::new_ticket))
        .route("/api/v1/session", get(access::session))
        .route("/", get(dashboard::index))
        .route("/web/{*path}", get(dashboard::file))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        // Last, so that it guards every route above, whoever added it.
        .layer(axum::middleware::from_fn_with_state(
            app.access.clone(),
            access::check,
        ))
        .with_state(app)
}
