//! Devices as the server sees them, and the labels operators set on them.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use botfleet_protocol::DeviceId;
use serde::Deserialize;

use super::{ApiError, ApiPath, AppState};
use crate::devices::{DeviceView, LabelChange, LabelChangeError};
use crate::fleet::LabelError;
use crate::labels::LabelPatch;

impl From<LabelError> for ApiError {
    fn from(err: LabelError) -> Self {
        let status = match &err {
            LabelError::Refused(LabelChangeError::UnknownDevice(_)) => StatusCode::NOT_FOUND,
            LabelError::Refused(LabelChangeError::Invalid(_)) => StatusCode::BAD_REQUEST,
            LabelError::Store(_) | LabelError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_error(status, &err)
    }
}

/// A JSON body, with its rejections answered as JSON errors (415 without a JSON type).
fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(|r| {
        let status = match r.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, r.body_text())
    })
}

/// `GET /api/v1/devices`
pub async fn list(
    State(app): AppState,
    axum::extract::Query(query): axum::extract::Query<ListQuery>,
) -> Result<Json<Vec<DeviceView>>, ApiError> {
    let devices = app.fleet.devices().list();
    let Some(selector) = query
        .selector
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    else {
        return Ok(Json(devices));
    };
    // The rollouts' selector syntax, so the dashboard shows what a rollout would target.
    let selector: crate::rollouts::Selector = selector.parse().map_err(ApiError::bad_request)?;
    Ok(Json(
        devices
            .into_iter()
            .filter(|d| selector.matches(&d.labels))
            .collect(),
    ))
}

/// `GET /api/v1/devices?selector=site=lab,!quarantine`
#[derive(Debug, Deserialize)]
pub struct ListQuery {
    selector: Option<String>,
}

/// `GET /api/v1/devices/{id}`
pub async fn get(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = DeviceId::new(id).map_err(ApiError::bad_request)?;
    app.fleet
        .devices()
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no device {id} has reported")))
}

/// The body of `PUT /api/v1/devices/{id}/labels`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelSet {
    labels: BTreeMap<String, String>,
}

/// `PUT /api/v1/devices/{id}/labels`: `{"labels": {...}}` becomes the operator set.
/// Repeating it changes nothing, so a retry needs no idempotency key.
pub async fn replace_labels(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
    body: Result<Json<LabelSet>, JsonRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = DeviceId::new(id).map_err(ApiError::bad_request)?;
    let LabelSet { labels } = json_body(body)?;
    let view = app
        .fleet
        .change_labels(&id, LabelChange::Replace(labels))
        .await?;
    Ok(Json(view))
}

/// `PATCH /api/v1/devices/{id}/labels`: `{"set": {...}, "remove": [...]}`; the other
/// operator labels stay. Setting and removing are idempotent, so is a retry.
pub async fn patch_labels(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
    body: Result<Json<LabelPatch>, JsonRejection>,
) -> Result<Json<DeviceView>, ApiError> {
    let id = DeviceId::new(id).map_err(ApiError::bad_request)?;
    let patch = json_body(body)?;
    let view = app
        .fleet
        .change_labels(&id, LabelChange::Patch(patch))
        .await?;
    Ok(Json(view))
}
