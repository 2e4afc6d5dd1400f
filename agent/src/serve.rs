//! The local inference API: KServe Open Inference Protocol v2 over HTTP (REST, JSON tensors,
//! and the binary tensor data extension), so Triton and KServe clients work unchanged.

mod binary;
mod tensors;

use botfleet_protocol::engine::EngineKind;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use botfleet_engine::EngineError;
use botfleet_protocol::tensor::TensorSpec;
use bytes::Bytes;
use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;

use crate::capture::{Capture, Served};
use crate::slots::{ServingModel, Slot, Slots};
use tensors::{InferRequest, OutputTensor, input_to_engine, to_output};

/// A tensor's values as little-endian bytes (the binary extension's layout, and a sample
/// file's).
pub(crate) use binary::encode as encode_tensor;

/// An API error: status plus one clear sentence, as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!("model {name:?} is not loaded on this robot"),
    )
}

/// Shared state of the API.
#[derive(Debug, Clone)]
struct Api {
    slots: Arc<Slots>,
    /// The largest request body taken, in bytes (413 beyond).
    max_request_bytes: usize,
    /// Where requests the robot's capture policy keeps are copied (`None`: capture off).
    capture: Option<Arc<Capture>>,
}

/// Listens on the Unix socket `path`, mode 0660 (the agent's group may connect). A socket
/// left there by an earlier run is replaced; any other file is refused, not removed.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// The router, ready to serve, capturing nothing.
pub fn router(slots: Arc<Slots>, max_request_bytes: usize) -> Router {
    router_capturing(slots, max_request_bytes, None)
}

/// The router, copying the requests `capture`'s policy keeps.
pub fn router_capturing(
    slots: Arc<Slots>,
    max_request_bytes: usize,
    capture: Option<Arc<Capture>>,
) -> Router {
    Router::new()
        .route("/v2", get(server_metadata))
        .route(
            "/v2/health/live",
            get(|| async { Json(json!({ "live": true })) }),
        )
        .route(
            "/v2/health/ready",
            get(|| async { Json(json!({ "ready": true })) }),
        )
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_versioned),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_versioned),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_versioned),
        )
        .with_state(Api {
            slots,
            max_request_bytes,
            capture,
        })
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "botfleet-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// The model serving `name`, checked against a requested version.
fn serving(
    api: &Api,
    name: &str,
    version: Option<&str>,
) -> Result<(Arc<Slot>, Arc<ServingModel>), ApiError> {
    let slot = api.slots.get(name).ok_or_else(|| not_found(name))?;
    let model = slot.current().ok_or_else(|| not_found(name))?;
    if let Some(version) = version
        && version != model.manifest.version
    {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "model {name:?} version {version:?} is not loaded (serving {:?})",
                model.manifest.version
            ),
        ));
    }
    Ok((slot, model))
}

#[derive(Serialize)]
struct PortMetadata<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
}

fn ports(specs: &[TensorSpec]) -> Vec<PortMetadata<'_>> {
    specs
        .iter()
        .map(|s| PortMetadata {
            name: &s.name,
            datatype: s.datatype.as_str(),
            shape: &s.shape,
        })
        .collect()
}

fn metadata(
    api: &Api,
    name: &str,
    version: Option<&str>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (_, model) = serving(api, name, version)?;
    let m = &model.manifest;
    Ok(Json(json!({
        "name": name,
        "versions": [m.version],
        "platform": platform(model.model.engine()),
        "inputs": ports(&m.inputs),
        "outputs": ports(&m.outputs),
        "parameters": {
            "release": m.release,
            "sha256": m.artifact.sha256,
            "quantization": m.artifact.quantization,
            "engine": model.model.engine(),
        },
    })))
}

/// KServe's platform name for the engine serving a model.
fn platform(engine: EngineKind) -> &'static str {
    match engine {
        EngineKind::Tract => "onnx_tract",
        EngineKind::OnnxruntimeCpu | EngineKind::OnnxruntimeCuda => "onnxruntime_onnx",
        _ => "onnxruntime_tensorrt",
    }
}

async fn model_metadata(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    metadata(&api, &name, None)
}

async fn model_metadata_versioned(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    metadata(&api, &name, Some(&version))
}

async fn model_ready(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    serving(&api, &name, None).map(|_| Json(json!({ "name": name, "ready": true })))
}

async fn model_ready_versioned(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    serving(&api, &name, Some(&version)).map(|_| Json(json!({ "name": name, "ready": true })))
}

fn bad_request(message: String) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message)
}

fn engine_error(e: EngineError) -> ApiError {
    let status = match e {
        EngineError::MissingInput { .. }
        | EngineError::UnknownInput { .. }
        | EngineError::WrongDatatype { .. }
        | EngineError::WrongShape { .. }
        | EngineError::WrongLength { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string())
}

async fn infer(
    State(api): State<Api>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    run_inference(api, name, None, &headers, body).await
}

async fn infer_versioned(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    run_inference(api, name, Some(version), &headers, body).await
}

async fn run_inference(
    api: Api,
    name: String,
    version: Option<String>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (slot, model) = serving(&api, &name, version.as_deref())?;
    let body = read_body(headers, body, api.max_request_bytes).await?;
    let capture = api.capture.as_ref().map(|c| (c, name.as_str()));
    let result = infer_on(&model, slot.tap(), capture, headers, body).await;
    // Latency as the robot's caller sees the engine, not including JSON decoding.
    match &result {
        Ok((_, ms)) => slot.record(&model, Some(*ms)),
        // A malformed request is the caller's fault, not the model's.
        Err(e) if e.0.is_server_error() => slot.record(&model, None),
        Err(_) => {}
    }
    let ((id, outputs, binary), _) = result?;
    let header = json!({
        "model_name": name,
        "model_version": model.manifest.version,
        "id": id,
        "parameters": { "engine": model.model.engine() },
        "outputs": outputs,
    });
    if binary.is_empty() {
        return Ok(Json(header).into_response());
    }
    let json = serde_json::to_vec(&header).map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the answer: {e}"),
        )
    })?;
    let json_len = json.len();
    // Two chunks, written with one vectored write: the outputs are not copied again.
    let parts = [Bytes::from(json), Bytes::from(binary)];
    let body = Body::from_stream(futures_util::stream::iter(
        parts.map(Ok::<_, std::convert::Infallible>),
    ));
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(binary::HEADER_LENGTH),
                HeaderValue::from(json_len),
            ),
        ],
        body,
    )
        .into_response())
}

/// Request id, JSON outputs and the binary part of the answer (empty when all are JSON).
type Answer = (Option<String>, Vec<OutputTensor>, Vec<u8>);

/// The request body as its chunks arrived, at most `limit` bytes (413 beyond, before
/// reading anything when `Content-Length` says so).
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<binary::Chunks, ApiError> {
    let too_large = |n: String| {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body of {n} bytes is over this robot's limit of {limit} (inference.max_request_bytes)"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared
        && n > limit as u64
    {
        return Err(too_large(n.to_string()));
    }
    let mut chunks = binary::Chunks::default();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad_request(format!("bad request body: {e}")))?;
        chunks.push(chunk);
        if chunks.len() > limit {
            return Err(too_large(format!("more than {limit}")));
        }
    }
    Ok(chunks)
}

async fn infer_on(
    model: &Arc<ServingModel>,
    tap: Option<Arc<crate::shadow::Tap>>,
    capture: Option<(&Arc<Capture>, &str)>,
    headers: &HeaderMap,
    body: binary::Chunks,
) -> Result<(Answer, f64), ApiError> {
    let (json_part, mut binary_part) =
        binary::split(headers, body).map_err(|e| bad_request(e.to_string()))?;
    let request: InferRequest = serde_json::from_slice(&json_part)
        .map_err(|e| bad_request(format!("bad request body: {e}")))?;
    let inputs = request
        .inputs
        .into_iter()
        .map(|t| input_to_engine(t, &mut binary_part))
        .collect::<Result<Vec<_>, _>>()?;
    binary::finish(&binary_part).map_err(|e| bad_request(e.to_string()))?;
    let default_binary = request.parameters.binary_data_output;
    // Requested outputs with their binary choice; `None` means all, in the model's order.
    let wanted: Option<Vec<(String, bool)>> = request.outputs.map(|o| {
        o.into_iter()
            .map(|r| {
                let binary = r.parameters.binary_data.unwrap_or(default_binary);
                (r.name, binary)
            })
            .collect()
    });
    if let Some(wanted) = &wanted
        && let Some((unknown, _)) = wanted
            .iter()
            .find(|(w, _)| !model.model.output_names().contains(w))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "output {unknown:?} is not an output of this model (outputs: {:?})",
                model.model.output_names()
            ),
        ));
    }
    // The request holds its own Arc: a swap during inference does not touch it.
    let engine = model.model.clone();
    // A sampled request is copied for a shadowed candidate: its inputs before the run, the
    // serving model's outputs after; the copy is handed over without waiting.
    let shadow = tap
        .filter(|t| t.wants())
        .map(|t| (t, inputs.clone(), Served::of(model)));
    // Capture decides before the run whether the inputs are copied (the run consumes them),
    // and checks its output rules after it; its copy too is handed over without waiting.
    let capture = capture.and_then(|(c, slot)| c.plan(slot)).map(|plan| {
        let copy = plan.copies_inputs().then(|| inputs.clone());
        (plan, copy, Served::of(model))
    });
    let (outputs, ms) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = engine.run(inputs);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if let Ok(outputs) = &out {
            if let Some((tap, inputs, served)) = shadow {
                tap.offer(crate::shadow::Sample {
                    inputs,
                    outputs: outputs.clone(),
                    serving_ms: ms,
                    served: Some(served),
                });
            }
            if let Some((plan, inputs, served)) = capture {
                plan.finish(inputs, outputs, served, ms);
            }
        }
        (out, ms)
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("inference task failed: {e}"),
        )
    })?;
    let mut binary_out = Vec::new();
    let outputs = outputs
        .map_err(engine_error)?
        .into_iter()
        .filter_map(|t| {
            let binary = match &wanted {
                None => Some(default_binary),
                Some(w) => w.iter().find(|(n, _)| *n == t.name).map(|(_, b)| *b),
            }?;
            Some(to_output(t, binary, &mut binary_out))
        })
        .collect();
    Ok(((request.id, outputs, binary_out), ms))
}
