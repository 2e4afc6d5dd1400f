//! `GET /api/v1/devices/{id}/telemetry?since=…`: a device's recent telemetry points.

use axum::Json;
use axum::extract::{Query, State};
use botfleet_protocol::DeviceId;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiPath, AppState};
use crate::history::Point;

#[derive(Debug, Deserialize)]
pub struct Since {
    /// RFC 3339; only later points are returned.
    since: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct TelemetryHistory {
    pub device_id: DeviceId,
    /// Oldest first, at most an hour of them.
    pub points: Vec<Point>,
}

/// `GET /api/v1/devices/{id}/telemetry`
pub async fn telemetry(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
    Query(query): Query<Since>,
) -> Result<Json<TelemetryHistory>, ApiError> {
    let id = DeviceId::new(id).map_err(ApiError::bad_request)?;
    let since = match query.since.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => Some(text.parse::<Timestamp>().map_err(|err| {
            ApiError::bad_request(format!("since must be an RFC 3339 time: {err}"))
        })?),
    };
    let points = app.fleet.history().since(&id, since).ok_or_else(|| {
        ApiError::not_found(format!("no telemetry from device {id} in the last hour"))
    })?;
    Ok(Json(TelemetryHistory {
        device_id: id,
        points,
    }))
}
