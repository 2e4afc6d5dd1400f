//! Model intake, model records and artifact downloads.

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::{Field, MultipartError, MultipartRejection};
use axum::extract::{Multipart, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use botfleet_protocol::SlotName;
use botfleet_protocol::manifest::Sha256Digest;
use bytes::Bytes;
use tower::ServiceExt as _;
use tower_http::services::ServeFile;

use super::{ApiError, ApiPath, AppState};
use crate::intake::{ModelMetadata, ModelVersion};
use crate::registry::{Intake, ModelRecord, RegistryError};

/// Largest metadata part accepted.
const METADATA_MAX_BYTES: u64 = 1024 * 1024;
/// Largest evaluation set accepted (what robots accept too).
const EVALUATION_MAX_BYTES: u64 = botfleet_protocol::evaluation::MAX_EVALUATION_BYTES;

impl From<RegistryError> for ApiError {
    fn from(err: RegistryError) -> Self {
        let status = match &err {
            RegistryError::Intake(_) => StatusCode::BAD_REQUEST,
            RegistryError::VersionTaken { .. } | RegistryError::ReleaseNotNewer { .. } => {
                StatusCode::CONFLICT
            }
            RegistryError::Io { .. }
            | RegistryError::Db(_)
            | RegistryError::Sign(_)
            | RegistryError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_error(status, &err)
    }
}

fn multipart_error(err: &MultipartError) -> ApiError {
    ApiError::new(
        err.status(),
        format!("cannot read the upload: {}", err.body_text()),
    )
}

/// Reads a part, refusing it as soon as it grows past `max` bytes.
async fn read_capped(mut field: Field<'_>, max: u64, what: &str) -> Result<Bytes, ApiError> {
    let mut data = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(|e| multipart_error(&e))? {
        if (data.len() + chunk.len()) as u64 > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the {what} is larger than the {max} bytes allowed"),
            ));
        }
        data.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(data))
}

/// `POST /api/v1/models`: multipart with `metadata` (JSON), `model` (the ONNX file) and,
/// for an accuracy gate, `evaluation` (the evaluation set, JSON).
/// 201 for a new model, 200 when the same slot, version and bytes were uploaded before.
pub async fn upload(
    State(app): AppState,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<(StatusCode, Json<ModelRecord>), ApiError> {
    let mut multipart = multipart.map_err(|r| {
        ApiError::new(
            r.status(),
            format!(
                "send multipart/form-data with parts `metadata` and `model`: {}",
                r.body_text()
            ),
        )
    })?;
    let (mut metadata, mut model, mut evaluation) = (None, None, None);
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| multipart_error(&e))?
    {
        let name = field.name().unwrap_or_default().to_owned();
        let slot = match name.as_str() {
            "metadata" => &mut metadata,
            "model" => &mut model,
            "evaluation" => &mut evaluation,
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected part {other:?}; send `metadata` (JSON), `model` (the ONNX file) \
                     and optionally `evaluation` (the accuracy gate's evaluation set)"
                )));
            }
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!(
                "part {name:?} appears twice"
            )));
        }
        let (cap, what) = match name.as_str() {
            "model" => (app.max_model_bytes, "model (max_model_bytes)"),
            "evaluation" => (EVALUATION_MAX_BYTES, "evaluation set"),
            _ => (METADATA_MAX_BYTES, "metadata"),
        };
        *slot = Some(read_capped(field, cap, what).await?);
    }
    let metadata =
        metadata.ok_or_else(|| ApiError::bad_request("missing the `metadata` part (JSON)"))?;
    let model = model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("missing or empty `model` part (the ONNX file)"))?;
    let meta = ModelMetadata::parse(&metadata).map_err(RegistryError::from)?;
    match app.registry.add(meta, model, evaluation).await? {
        Intake::Created(record) => Ok((StatusCode::CREATED, Json(record))),
        Intake::Existing(record) => Ok((StatusCode::OK, Json(record))),
    }
}

/// `GET /api/v1/models`
pub async fn list(State(app): AppState) -> Json<Vec<ModelRecord>> {
    Json(app.registry.list())
}

/// `GET /api/v1/models/{slot}/{version}`
pub async fn get(
    State(app): AppState,
    ApiPath((slot, version)): ApiPath<(String, String)>,
) -> Result<Json<ModelRecord>, ApiError> {
    let slot = SlotName::new(slot).map_err(ApiError::bad_request)?;
    let version = ModelVersion::new(&version).map_err(ApiError::bad_request)?;
    app.registry
        .get(&slot, &version)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no model {slot}/{version}")))
}

/// `GET /artifacts/{sha256}`: the bytes, with Range, HEAD and conditional requests.
pub async fn artifact(
    State(app): AppState,
    ApiPath(sha256): ApiPath<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let digest: Sha256Digest = sha256.parse().map_err(ApiError::bad_request)?;
    let path = app
        .registry
        .artifact_path(&digest)
        .ok_or_else(|| ApiError::not_found(format!("no artifact {digest}")))?;
    if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
        tracing::error!(path = %path.display(), "artifact file missing");
        return Err(ApiError::not_found(format!(
            "artifact {digest} is missing on the server"
        )));
    }
    let response = match ServeFile::new(path).oneshot(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    Ok(response.map(Body::new).into_response())
}
