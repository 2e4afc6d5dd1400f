//! Rollout requests and progress.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use botfleet_protocol::RolloutId;

use super::{ApiError, ApiPath, AppState};
use crate::intake::ModelVersion;
use crate::link::PublishError;
use crate::rollouts::create::CreateError;
use crate::rollouts::operate::{OperateError, Operation};
use crate::rollouts::{CreatedRollout, IdempotencyKey, RolloutBody, RolloutView};

const IDEMPOTENCY_KEY: &str = "idempotency-key";

impl From<CreateError> for ApiError {
    fn from(err: CreateError) -> Self {
        let status = match &err {
            CreateError::Targets(_) | CreateError::Version(_) => StatusCode::BAD_REQUEST,
            CreateError::UnknownModel { .. } | CreateError::UnknownChannel(_) => {
                StatusCode::NOT_FOUND
            }
            CreateError::NoDevices
            | CreateError::NoMatch { .. }
            | CreateError::NoFollower { .. }
            | CreateError::KeyReused
            | CreateError::TooManyForEmbeddedBroker { .. }
            | CreateError::Publish(PublishError::TooLarge { .. }) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            CreateError::Conflict { .. } | CreateError::FollowsChannel { .. } => {
                StatusCode::CONFLICT
            }
            CreateError::Publish(PublishError::LinkGone(_) | PublishError::FanOutStopped) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            CreateError::Publish(PublishError::Encode { .. })
            | CreateError::Desired(_)
            | CreateError::Db(_)
            | CreateError::DbTask(_)
            | CreateError::Id(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_error(status, &err)
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| {
        ApiError::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters")
    })?;
    IdempotencyKey::new(text)
        .map(Some)
        .map_err(ApiError::bad_request)
}

/// `POST /api/v1/rollouts`: 202 with the rollout id and its devices; 409 before anything
/// is recorded when `sha256` is given and the version's artifact has another digest.
pub async fn create(
    State(app): AppState,
    headers: HeaderMap,
    body: Result<Json<RolloutBody>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedRollout>), ApiError> {
    let key = idempotency_key(&headers)?;
    let Json(body) = body.map_err(|r| {
        // 415 for a missing JSON content type; any other malformed body is a 400.
        let status = match r.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, r.body_text())
    })?;
    // A version's bytes never change once registered, so this holds for the create below.
    // An unknown slot or version is left to it (400, 404).
    let registered = ModelVersion::new(&body.request.version)
        .ok()
        .and_then(|version| app.registry.get(&body.request.slot, &version));
    if let Some(model) = registered {
        body.check_sha256(&model.stored.sha256)
            .map_err(|err| ApiError::from_error(StatusCode::CONFLICT, &err))?;
    }
    let created = app.rollouts.create(body.request, key).await?;
    Ok((StatusCode::ACCEPTED, Json(created.response)))
}

/// `GET /api/v1/rollouts`: every rollout, without per-device detail.
pub async fn list(State(app): AppState) -> Json<Vec<RolloutView>> {
    Json(app.fleet.rollouts().list())
}

/// `GET /api/v1/rollouts/{id}`
pub async fn get(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RolloutView>, ApiError> {
    let id = RolloutId::new(id).map_err(ApiError::bad_request)?;
    app.fleet
        .rollouts()
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))
}

impl From<OperateError> for ApiError {
    fn from(err: OperateError) -> Self {
        match err {
            OperateError::Unknown(_) => ApiError::from_error(StatusCode::NOT_FOUND, &err),
            OperateError::WrongState { .. } | OperateError::NotOnCommand { .. } => {
                ApiError::from_error(StatusCode::CONFLICT, &err)
            }
            OperateError::NotTargeted { .. } => ApiError::from_error(StatusCode::BAD_REQUEST, &err),
            OperateError::Step(inner) => inner.into(),
        }
    }
}

async fn operate(
    app: &super::App,
    id: String,
    op: Operation,
) -> Result<Json<RolloutView>, ApiError> {
    let id = RolloutId::new(id).map_err(ApiError::bad_request)?;
    app.rollouts.operate(&id, op).await?;
    view_of(app, &id)
}

/// The rollout's view after an operation on it.
fn view_of(app: &super::App, id: &RolloutId) -> Result<Json<RolloutView>, ApiError> {
    app.fleet
        .rollouts()
        .get(id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no rollout {id}")))
}

/// `POST /api/v1/rollouts/{id}/pause`: no device is started until it is resumed.
pub async fn pause(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RolloutView>, ApiError> {
    operate(&app, id, Operation::Pause).await
}

/// `POST /api/v1/rollouts/{id}/resume`: goes on; the paused wave's thresholds are waived.
pub async fn resume(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RolloutView>, ApiError> {
    operate(&app, id, Operation::Resume).await
}

/// `POST /api/v1/rollouts/{id}/abort`: devices that have not taken the model keep theirs.
pub async fn abort(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RolloutView>, ApiError> {
    operate(&app, id, Operation::Abort).await
}

/// `POST /api/v1/rollouts/{id}/rollback`: devices that took the model get the previous one.
pub async fn rollback(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<RolloutView>, ApiError> {
    operate(&app, id, Operation::Rollback).await
}

/// The body of `POST /api/v1/rollouts/{id}/install`: the devices, or none for all.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallOrder {
    #[serde(default)]
    devices: Option<Vec<botfleet_protocol::DeviceId>>,
}

/// `POST /api/v1/rollouts/{id}/install`: devices of a rollout that installs on command
/// swap; without a body (or without `devices`), every device, those commanded later too.
pub async fn install(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
    body: axum::body::Bytes,
) -> Result<Json<RolloutView>, ApiError> {
    let order: InstallOrder = if body.is_empty() {
        InstallOrder::default()
    } else {
        serde_json::from_slice(&body).map_err(ApiError::bad_request)?
    };
    let id = RolloutId::new(id).map_err(ApiError::bad_request)?;
    app.rollouts.order_install(&id, order.devices).await?;
    view_of(&app, &id)
}
