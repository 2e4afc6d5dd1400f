//! Devices as the server sees them.

use axum::Json;
use axum::extract::State;
use botfleet_protocol::DeviceId;

use super::{ApiError, ApiPath, AppState};
use crate::devices::DeviceView;

/// `GET /api/v1/devices`
pub async fn list(State(app): AppState) -> Json<Vec<DeviceView>> {
    Json(app.fleet.devices().list())
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
