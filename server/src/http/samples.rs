//! Samples: the robots' uploads (device tokens), their records, files and thumbnails, and
//! capture orders (see `crate::data`).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::sample::CaptureRule;
use botfleet_protocol::{DeviceId, SlotName};
use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt as _, TryStreamExt as _};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiPath, AppState};
use crate::data::{
    CaptureError, CaptureRequest, Captured, DataError, DatasetError, SampleFilter, SampleRecord,
    StoreError, Stored, Summary, ThumbnailError, UploadError,
};

/// Records listed when `limit` is not given, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;
/// The widest summary bucket: a year.
const MAX_BUCKET_S: u64 = 366 * 24 * 3600;

/// Whether `path` is a sample upload (`/api/v1/devices/{id}/samples/{sha256}`): those take
/// device tokens, not API tokens.
pub fn is_upload_path(path: &str) -> bool {
    let mut parts = path.split('/');
    matches!(
        (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next()
        ),
        (
            Some(""),
            Some("api"),
            Some("v1"),
            Some("devices"),
            Some(id),
            Some("samples"),
            Some(sha),
            None
        ) if !id.is_empty() && !sha.is_empty()
    )
}

impl From<DataError> for ApiError {
    fn from(err: DataError) -> Self {
        let status = match &err {
            DataError::NoSample(_) | DataError::NoDataset(_) => StatusCode::NOT_FOUND,
            DataError::Dataset(_) => StatusCode::BAD_REQUEST,
            DataError::Thumbnail(ThumbnailError::Encode(_)) => StatusCode::INTERNAL_SERVER_ERROR,
            DataError::Thumbnail(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            DataError::Store(StoreError::Backend { .. }) => StatusCode::SERVICE_UNAVAILABLE,
            DataError::Store(_)
            | DataError::Db(_)
            | DataError::Task(_)
            | DataError::Corrupt { .. }
            | DataError::Encode(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_error(status, &err)
    }
}

impl From<DatasetError> for ApiError {
    fn from(err: DatasetError) -> Self {
        ApiError::from(DataError::from(err))
    }
}

impl From<UploadError> for ApiError {
    fn from(err: UploadError) -> Self {
        let status = match &err {
            UploadError::NoToken | UploadError::BadToken(_) => StatusCode::UNAUTHORIZED,
            UploadError::OtherDevice { .. } => StatusCode::FORBIDDEN,
            UploadError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UploadError::Busy => StatusCode::TOO_MANY_REQUESTS,
            UploadError::BadDigest(_)
            | UploadError::DigestMismatch { .. }
            | UploadError::Malformed(_)
            | UploadError::DeviceMismatch { .. }
            | UploadError::Body(_) => StatusCode::BAD_REQUEST,
            UploadError::Store(_) | UploadError::Db(_) => StatusCode::SERVICE_UNAVAILABLE,
            UploadError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::from_error(status, &err)
    }
}

impl From<CaptureError> for ApiError {
    fn from(err: CaptureError) -> Self {
        let status = match &err {
            CaptureError::Requests(_) | CaptureError::Reason => StatusCode::BAD_REQUEST,
            CaptureError::UnknownDevice(_) => StatusCode::NOT_FOUND,
            CaptureError::Publish(_) => StatusCode::SERVICE_UNAVAILABLE,
            CaptureError::Sign(_) | CaptureError::Id(_) | CaptureError::Time(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::from_error(status, &err)
    }
}

fn device(text: &str) -> Result<DeviceId, ApiError> {
    DeviceId::new(text).map_err(ApiError::bad_request)
}

fn digest(text: &str) -> Result<Sha256Digest, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!("{text:?} is not a SHA-256 digest (64 hex digits)"))
    })
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// An upload refusal: counted, logged, answered (401s say how to authenticate).
fn refused(app: &super::App, device: &str, err: UploadError) -> Response {
    app.data.counters.refuse(err.refusal());
    tracing::warn!(%device, reason = err.refusal().as_str(), error = %err, "sample upload refused");
    let unauthorized = matches!(err, UploadError::NoToken | UploadError::BadToken(_));
    let busy = matches!(err, UploadError::Busy);
    let mut response = ApiError::from(err).into_response();
    if unauthorized {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if busy {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}

#[derive(Serialize)]
struct Uploaded {
    sha256: Sha256Digest,
    /// True when the server had this sample already.
    already_stored: bool,
}

/// `PUT /api/v1/devices/{id}/samples/{sha256}`: 201 stored, 200 stored already.
pub async fn upload(
    State(app): AppState,
    ApiPath((id, sha)): ApiPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match put_sample(&app, &id, &sha, &headers, body).await {
        Ok((sha256, stored)) => {
            let status = match stored {
                Stored::New => StatusCode::CREATED,
                Stored::Already => StatusCode::OK,
            };
            let already_stored = stored == Stored::Already;
            tracing::debug!(device = %id, %sha256, already_stored, "sample upload taken");
            (
                status,
                Json(Uploaded {
                    sha256,
                    already_stored,
                }),
            )
                .into_response()
        }
        Err(Rejected::Upload(err)) => refused(&app, &id, err),
        Err(Rejected::Request(err)) => err.into_response(),
    }
}

enum Rejected {
    /// Counted as a refused upload.
    Upload(UploadError),
    /// A request that is not an upload at all (a bad device id in the path).
    Request(ApiError),
}

async fn put_sample(
    app: &super::App,
    id: &str,
    sha: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Sha256Digest, Stored), Rejected> {
    let device = device(id).map_err(Rejected::Request)?;
    let data = &app.data;
    data.authorize(&device, bearer(headers))
        .map_err(Rejected::Upload)?;
    let sha256: Sha256Digest = sha
        .parse()
        .map_err(|_| Rejected::Upload(UploadError::BadDigest(sha.chars().take(80).collect())))?;
    let limit = data.max_sample_bytes();
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(Rejected::Upload(UploadError::TooLarge { limit }));
    }
    // Held until the sample is stored or refused: a body without a length is counted at
    // the largest a sample may be.
    let _room = data
        .reserve(declared.unwrap_or(limit))
        .map_err(Rejected::Upload)?;
    let file = read_at_most(body, limit).await.map_err(Rejected::Upload)?;
    let stored = data
        .upload(&device, sha256, file)
        .await
        .map_err(Rejected::Upload)?;
    Ok((sha256, stored))
}

/// The body, refused as soon as it passes `limit` bytes.
async fn read_at_most(body: Body, limit: u64) -> Result<Bytes, UploadError> {
    let mut chunks = body.into_data_stream();
    let mut file = BytesMut::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| UploadError::Body(e.to_string()))?;
        if (file.len() + chunk.len()) as u64 > limit {
            return Err(UploadError::TooLarge { limit });
        }
        file.extend_from_slice(&chunk);
    }
    Ok(file.freeze())
}

/// `HEAD /api/v1/devices/{id}/samples/{sha256}`: 200 when stored, else 404.
pub async fn head(
    State(app): AppState,
    ApiPath((id, sha)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let device = match device(&id) {
        Ok(device) => device,
        Err(err) => return err.into_response(),
    };
    if let Err(err) = app.data.authorize(&device, bearer(&headers)) {
        return refused(&app, &id, err);
    }
    let sha256 = match digest(&sha) {
        Ok(sha256) => sha256,
        Err(err) => return err.into_response(),
    };
    match app.data.has(&device, sha256).await {
        Ok(true) => StatusCode::OK.into_response(),
        Ok(false) => StatusCode::NOT_FOUND.into_response(),
        Err(err) => ApiError::from(err).into_response(),
    }
}

/// The filters of `GET /api/v1/samples` and its summary; empty values are no filter.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleQuery {
    device: Option<String>,
    slot: Option<String>,
    rule: Option<String>,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
    bucket_s: Option<String>,
}

fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn time(name: &str, value: &Option<String>) -> Result<Option<Timestamp>, ApiError> {
    given(value)
        .map(|v| {
            v.parse::<Timestamp>().map_err(|e| {
                ApiError::bad_request(format!("{name}={v:?} is not an RFC 3339 time: {e}"))
            })
        })
        .transpose()
}

fn number(
    name: &str,
    value: &Option<String>,
    range: std::ops::RangeInclusive<u64>,
) -> Result<Option<u64>, ApiError> {
    given(value)
        .map(|v| {
            v.parse::<u64>()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "{name} must be a number from {} to {}, not {v:?}",
                        range.start(),
                        range.end()
                    ))
                })
        })
        .transpose()
}

/// A filter of the one value given, if any.
fn one<T: Ord>(
    value: Option<&str>,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<std::collections::BTreeSet<T>>, ApiError> {
    value
        .map(|v| parse(v).map(|x| [x].into()).map_err(ApiError::bad_request))
        .transpose()
}

impl SampleQuery {
    fn filter(&self) -> Result<SampleFilter, ApiError> {
        Ok(SampleFilter {
            devices: one(given(&self.device), |v| {
                DeviceId::new(v).map_err(|e| e.to_string())
            })?,
            slots: one(given(&self.slot), |v| {
                SlotName::new(v).map_err(|e| e.to_string())
            })?,
            rules: one(given(&self.rule), |v| v.parse::<CaptureRule>())?,
            models: None,
            since: time("since", &self.since)?,
            until: time("until", &self.until)?,
        })
    }
}

fn query(query: Result<Query<SampleQuery>, QueryRejection>) -> Result<SampleQuery, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|r| ApiError::bad_request(r.body_text()))
}

/// `GET /api/v1/samples`: records, newest first.
pub async fn list(
    State(app): AppState,
    q: Result<Query<SampleQuery>, QueryRejection>,
) -> Result<Json<Vec<SampleRecord>>, ApiError> {
    let q = query(q)?;
    let limit =
        number("limit", &q.limit, 0..=MAX_LIMIT as u64)?.map_or(DEFAULT_LIMIT, |n| n as usize);
    Ok(Json(app.data.list(q.filter()?, limit).await?))
}

/// `GET /api/v1/samples/summary`: counts per device, slot, rule and time bucket.
pub async fn summary(
    State(app): AppState,
    q: Result<Query<SampleQuery>, QueryRejection>,
) -> Result<Json<Summary>, ApiError> {
    let q = query(q)?;
    let bucket_s = number("bucket_s", &q.bucket_s, 1..=MAX_BUCKET_S)?.unwrap_or(3600);
    Ok(Json(app.data.summary(q.filter()?, bucket_s).await?))
}

/// `GET /api/v1/samples/{sha256}`: the record.
pub async fn get(
    State(app): AppState,
    ApiPath(sha): ApiPath<String>,
) -> Result<Json<SampleRecord>, ApiError> {
    Ok(Json(app.data.record(digest(&sha)?).await?))
}

/// `GET /api/v1/samples/{sha256}/file`: the sample file, streamed from the store.
pub async fn file(
    State(app): AppState,
    ApiPath(sha): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (record, chunks) = app.data.file(digest(&sha)?).await?;
    let body = Body::from_stream(chunks.map_err(std::io::Error::other));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, record.bytes.to_string()),
            (header::ETAG, format!("\"{}\"", record.sha256)),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{}.bfs\"", record.sha256),
            ),
        ],
        body,
    )
        .into_response())
}

/// `GET /api/v1/samples/{sha256}/thumbnail.png`: the first input drawn (415 when it is not
/// shaped like an image).
pub async fn thumbnail(
    State(app): AppState,
    ApiPath(sha): ApiPath<String>,
) -> Result<Response, ApiError> {
    let png = app.data.thumbnail(digest(&sha)?).await?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

/// `POST /api/v1/devices/{id}/capture`: a signed capture order, sent (202).
pub async fn capture(
    State(app): AppState,
    ApiPath(id): ApiPath<String>,
    body: Result<Json<CaptureRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Captured>), ApiError> {
    let device = device(&id)?;
    let Json(request) = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    let captured = app.data.capture(device, request).await?;
    Ok((StatusCode::ACCEPTED, Json(captured)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_upload_route_takes_device_tokens() {
        assert!(is_upload_path(&format!(
            "/api/v1/devices/robot-1/samples/{}",
            "ab".repeat(32)
        )));
        for other in [
            "/api/v1/devices/robot-1",
            "/api/v1/devices/robot-1/samples",
            "/api/v1/devices/robot-1/samples/",
            "/api/v1/devices//samples/x",
            "/api/v1/devices/robot-1/samples/x/y",
            "/api/v1/devices/robot-1/labels/x",
            "/api/v1/samples/x",
        ] {
            assert!(!is_upload_path(other), "{other}");
        }
    }
}
