//! The local inference API: KServe Open Inference Protocol v2 over HTTP (REST, JSON tensors),
//! so Triton and KServe clients work unchanged.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use botfleet_engine::{EngineError, Tensor, TensorData};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::slots::{ServingModel, Slot, Slots};

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
}

/// The router, ready to serve.
pub fn router(slots: Arc<Slots>, max_request_bytes: usize) -> Router {
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
        .layer(DefaultBodyLimit::max(max_request_bytes))
        .with_state(Api { slots })
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "botfleet-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": [],
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
        "platform": "onnx_tract",
        "inputs": ports(&m.inputs),
        "outputs": ports(&m.outputs),
        "parameters": {
            "release": m.release,
            "sha256": m.artifact.sha256,
            "quantization": m.artifact.quantization,
        },
    })))
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

/// Tensor values as sent: a flat or nested JSON array of numbers (or booleans).
#[derive(Debug, Default)]
struct FlatValues(Vec<f64>);

impl<'de> Deserialize<'de> for FlatValues {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Flatten<'a>(&'a mut Vec<f64>);

        impl<'de> de::DeserializeSeed<'de> for Flatten<'_> {
            type Value = ();
            fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
                d.deserialize_any(self)
            }
        }

        impl<'de> Visitor<'de> for Flatten<'_> {
            type Value = ();
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number, a boolean, or a (nested) array of them")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
                self.0.push(v);
                Ok(())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
                self.0.push(v as f64);
                Ok(())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
                self.0.push(v as f64);
                Ok(())
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
                self.0.push(f64::from(u8::from(v)));
                Ok(())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
                while seq.next_element_seed(Flatten(&mut *self.0))?.is_some() {}
                Ok(())
            }
        }

        let mut out = Vec::new();
        deserializer.deserialize_any(Flatten(&mut out))?;
        Ok(FlatValues(out))
    }
}

#[derive(Debug, Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InputTensor>,
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
}

#[derive(Debug, Deserialize)]
struct InputTensor {
    name: String,
    shape: Vec<usize>,
    datatype: DataType,
    data: FlatValues,
}

#[derive(Debug, Deserialize)]
struct RequestedOutput {
    name: String,
}

#[derive(Debug, Serialize)]
struct OutputTensor {
    name: String,
    shape: Vec<usize>,
    datatype: &'static str,
    data: serde_json::Value,
}

fn to_engine(t: InputTensor) -> Result<Tensor, ApiError> {
    let v = t.data.0;
    let bad = |what: &str| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("input {:?}: values are not all {what}", t.name),
        )
    };
    let ints = |lo: f64, hi: f64| v.iter().all(|x| x.fract() == 0.0 && *x >= lo && *x <= hi);
    let data = match t.datatype {
        DataType::Fp32 => TensorData::Fp32(v.iter().map(|&x| x as f32).collect()),
        DataType::Fp64 => TensorData::Fp64(v),
        DataType::Int64 if ints(i64::MIN as f64, i64::MAX as f64) => {
            TensorData::Int64(v.iter().map(|&x| x as i64).collect())
        }
        DataType::Int32 if ints(f64::from(i32::MIN), f64::from(i32::MAX)) => {
            TensorData::Int32(v.iter().map(|&x| x as i32).collect())
        }
        DataType::Int8 if ints(-128.0, 127.0) => {
            TensorData::Int8(v.iter().map(|&x| x as i8).collect())
        }
        DataType::Uint8 if ints(0.0, 255.0) => {
            TensorData::Uint8(v.iter().map(|&x| x as u8).collect())
        }
        DataType::Bool if ints(0.0, 1.0) => TensorData::Bool(v.iter().map(|&x| x != 0.0).collect()),
        DataType::Fp16 => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!(
                    "input {:?}: FP16 is not supported over JSON; send FP32",
                    t.name
                ),
            ));
        }
        other => return Err(bad(&format!("{} values", other.as_str()))),
    };
    Ok(Tensor {
        name: t.name,
        shape: t.shape,
        data,
    })
}

fn to_json(t: Tensor) -> OutputTensor {
    let datatype = t.data.datatype().as_str();
    let data = match t.data {
        TensorData::Bool(v) => json!(v),
        TensorData::Uint8(v) => json!(v),
        TensorData::Int8(v) => json!(v),
        TensorData::Int32(v) => json!(v),
        TensorData::Int64(v) => json!(v),
        TensorData::Fp32(v) => json!(v),
        TensorData::Fp64(v) => json!(v),
    };
    OutputTensor {
        name: t.name,
        shape: t.shape,
        datatype,
        data,
    }
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
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    run_inference(api, name, None, body).await
}

async fn infer_versioned(
    State(api): State<Api>,
    Path((name, version)): Path<(String, String)>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    run_inference(api, name, Some(version), body).await
}

async fn run_inference(
    api: Api,
    name: String,
    version: Option<String>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (slot, model) = serving(&api, &name, version.as_deref())?;
    let result = infer_on(&model, body).await;
    // Latency as the robot's caller sees the engine, not including JSON decoding.
    match &result {
        Ok((_, ms)) => slot.record(&model, Some(*ms)),
        // A malformed request is the caller's fault, not the model's.
        Err(e) if e.0.is_server_error() => slot.record(&model, None),
        Err(_) => {}
    }
    let (response, _) = result?;
    Ok(Json(json!({
        "model_name": name,
        "model_version": model.manifest.version,
        "id": response.0,
        "outputs": response.1,
    })))
}

type Answer = (Option<String>, Vec<OutputTensor>);

async fn infer_on(
    model: &Arc<ServingModel>,
    body: Result<Json<InferRequest>, JsonRejection>,
) -> Result<(Answer, f64), ApiError> {
    let Json(request) =
        body.map_err(|e| ApiError(e.status(), format!("bad request body: {}", e.body_text())))?;
    let inputs = request
        .inputs
        .into_iter()
        .map(to_engine)
        .collect::<Result<Vec<_>, _>>()?;
    let wanted: Option<Vec<String>> = request
        .outputs
        .map(|o| o.into_iter().map(|r| r.name).collect());
    if let Some(wanted) = &wanted
        && let Some(unknown) = wanted
            .iter()
            .find(|w| !model.model.output_names().contains(w))
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
    let (outputs, ms) = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let out = engine.run(inputs);
        (out, started.elapsed().as_secs_f64() * 1e3)
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("inference task failed: {e}"),
        )
    })?;
    let outputs = outputs
        .map_err(engine_error)?
        .into_iter()
        .filter(|t| wanted.as_ref().is_none_or(|w| w.contains(&t.name)))
        .map(to_json)
        .collect();
    Ok(((request.id, outputs), ms))
}
