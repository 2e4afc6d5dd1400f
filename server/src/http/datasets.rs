//! Data sets: selections of samples frozen into immutable manifests, and their exports
//! (see `crate::data::dataset`).

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiPath, AppState};
use crate::data::{Dataset, DatasetRequest};

/// The header that names a manifest's digest (the SHA-256 of its exact bytes).
pub const DIGEST_HEADER: &str = "x-botfleet-dataset-digest";

fn id(text: &str) -> Result<&str, ApiError> {
    if crate::data::dataset::valid_id(text) {
        Ok(text)
    } else {
        Err(ApiError::not_found(format!("no data set {text:?}")))
    }
}

/// `POST /api/v1/datasets`: freezes the selected samples (201).
pub async fn create(
    State(app): AppState,
    body: Result<Json<DatasetRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Dataset>), ApiError> {
    let Json(request) = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let dataset = app.data.create_dataset(request).await?;
    Ok((StatusCode::CREATED, Json(dataset)))
}

/// `GET /api/v1/datasets`: newest first.
pub async fn list(State(app): AppState) -> Result<Json<Vec<Dataset>>, ApiError> {
    Ok(Json(app.data.datasets().await?))
}

/// `GET /api/v1/datasets/{id}`
pub async fn get(
    State(app): AppState,
    ApiPath(text): ApiPath<String>,
) -> Result<Json<Dataset>, ApiError> {
    Ok(Json(app.data.dataset(id(&text)?).await?))
}

/// `GET /api/v1/datasets/{id}/manifest`: the manifest's exact bytes.
pub async fn manifest(
    State(app): AppState,
    ApiPath(text): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (dataset, bytes) = app.data.manifest(id(&text)?).await?;
    Ok((
        [
            (header::CONTENT_TYPE.as_str(), "application/json".to_owned()),
            (DIGEST_HEADER, dataset.digest.to_hex()),
        ],
        bytes,
    )
        .into_response())
}

/// `GET /api/v1/datasets/{id}/export`: `manifest.json`, then each sample file, as a tar
/// streamed from the store.
pub async fn export(
    State(app): AppState,
    ApiPath(text): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (dataset, length, stream) = app.data.export(id(&text)?).await?;
    Ok((
        [
            (
                header::CONTENT_TYPE.as_str(),
                "application/x-tar".to_owned(),
            ),
            (header::CONTENT_LENGTH.as_str(), length.to_string()),
            (
                header::CONTENT_DISPOSITION.as_str(),
                format!("attachment; filename=\"{}.tar\"", dataset.id),
            ),
            (DIGEST_HEADER, dataset.digest.to_hex()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}
