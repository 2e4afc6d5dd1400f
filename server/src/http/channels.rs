//! Channels: a selector with a pinned model per slot (see `crate::channels`).

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;

use super::{ApiError, ApiPath, AppState};
use crate::channels::{ChannelName, ChannelRequest, ChannelView};
use crate::rollouts::follow::ChannelOpError;

impl From<ChannelOpError> for ApiError {
    fn from(err: ChannelOpError) -> Self {
        let status = match err {
            // An unknown version pinned (404), the database, …: as for a rollout.
            ChannelOpError::Step(inner) => return inner.into(),
            ChannelOpError::Invalid(_) => StatusCode::BAD_REQUEST,
            ChannelOpError::Unknown(_) => StatusCode::NOT_FOUND,
            ChannelOpError::Busy { .. } => StatusCode::CONFLICT,
        };
        ApiError::from_error(status, &err)
    }
}

fn name(text: &str) -> Result<ChannelName, ApiError> {
    ChannelName::new(text).map_err(ApiError::bad_request)
}

/// `GET /api/v1/channels`: every channel, with how many devices follow it.
pub async fn list(State(app): AppState) -> Json<Vec<ChannelView>> {
    Json(app.rollouts.channel_views(None, false).await)
}

/// `GET /api/v1/channels/{name}`: one channel and each device that follows it.
pub async fn get(
    State(app): AppState,
    ApiPath(text): ApiPath<String>,
) -> Result<Json<ChannelView>, ApiError> {
    let name = name(&text)?;
    app.rollouts
        .channel_views(Some(&name), true)
        .await
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no channel {name}")))
}

/// `PUT /api/v1/channels/{name}`: creates (201) or changes (200) a channel; the same body
/// again changes nothing.
pub async fn put(
    State(app): AppState,
    ApiPath(text): ApiPath<String>,
    body: Result<Json<ChannelRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<ChannelView>), ApiError> {
    let name = name(&text)?;
    let Json(request) = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let created = app.rollouts.put_channel(name.clone(), request).await?;
    let view = app
        .rollouts
        .channel_views(Some(&name), false)
        .await
        .pop()
        .ok_or_else(|| ApiError::not_found(format!("no channel {name}")))?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

/// `DELETE /api/v1/channels/{name}`: 204; its devices keep what they were told last.
pub async fn delete(
    State(app): AppState,
    ApiPath(text): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let name = name(&text)?;
    app.rollouts.delete_channel(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
