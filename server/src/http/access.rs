//! The access check in front of `/api`: bearer tokens and roles (see `crate::auth`).
//!
//! `/metrics`, `/healthz`, the artifacts (signed model bytes the robots fetch) and the
//! dashboard's static files stay open: the files carry no data, the page asks for a token.
//! A robot's sample upload takes its device token instead, checked by the route itself.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::{ApiError, AppState};
use crate::auth::{Access, Caller, Role};

/// The event stream: the one route that takes a ticket in its query string.
pub const STREAM_PATH: &str = "/api/v1/events/stream";
/// Getting a ticket changes nothing: a reader may.
const TICKET_PATH: &str = "/api/v1/events/ticket";

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::new(StatusCode::UNAUTHORIZED, message).into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

fn bearer(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn ticket(request: &Request) -> Option<&str> {
    request
        .uri()
        .query()?
        .split('&')
        .find_map(|pair| pair.strip_prefix("ticket="))
}

/// Lets a request through, or answers 401 (no or unknown token) / 403 (role too low).
pub async fn check(
    State(access): State<Arc<Access>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if access.is_open() || !path.starts_with("/api/") || super::samples::is_upload_path(path) {
        return next.run(request).await;
    }
    let caller = match bearer(&request) {
        Some(token) => access.check(token),
        None if path == STREAM_PATH => {
            ticket(&request).and_then(|t| access.redeem(t, Instant::now()))
        }
        None => {
            return unauthorized("this API needs a token: send `Authorization: Bearer <token>`");
        }
    };
    let Some(caller) = caller else {
        return unauthorized("the token (or stream ticket) is not valid");
    };
    let reads = matches!(*request.method(), Method::GET | Method::HEAD) || path == TICKET_PATH;
    if !reads && caller.role < Role::Operator {
        let message = format!(
            "token {:?} may only read; this needs an operator token",
            caller.name
        );
        return ApiError::new(StatusCode::FORBIDDEN, message).into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// Who the dashboard talks as.
#[derive(Debug, Serialize)]
pub struct Session {
    /// False: no token is configured and everyone is an operator.
    pub auth: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub role: Role,
}

fn caller_of(request: &Request) -> Option<Caller> {
    request.extensions().get::<Caller>().cloned()
}

/// `GET /api/v1/session`: checks a token and says its role.
pub async fn session(State(app): AppState, request: Request) -> Json<Session> {
    let caller = caller_of(&request);
    Json(Session {
        auth: !app.access.is_open(),
        role: caller.as_ref().map_or(Role::Operator, |c| c.role),
        name: caller.map(|c| c.name),
    })
}

#[derive(Debug, Serialize)]
pub struct Ticket {
    pub ticket: String,
    pub expires_in_s: u64,
}

/// `POST /api/v1/events/ticket`: a short-lived ticket to open the event stream with.
pub async fn new_ticket(State(app): AppState, request: Request) -> Json<Ticket> {
    let caller = caller_of(&request).unwrap_or(Caller {
        name: "anonymous".to_owned(),
        role: Role::Operator,
    });
    Json(Ticket {
        ticket: app.access.ticket(caller, Instant::now()),
        expires_in_s: crate::auth::TICKET_TTL.as_secs(),
    })
}
