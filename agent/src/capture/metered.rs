//! Whether the robot's link is metered (LTE, a paid hotspot): its own software says so on
//! the local API (`PUT /v1/link {"metered": true}`, `GET /v1/link`), and uploads wait while
//! it is. The flag is kept in `{data_dir}/link.json`, so a restart on LTE does not start
//! uploading.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

const FILE: &str = "link.json";

/// The link's state as the API and the file carry it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkState {
    pub metered: bool,
}

/// The metered flag; cheap to clone and share.
#[derive(Debug, Clone)]
pub struct Metered {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    flag: watch::Sender<bool>,
}

impl Metered {
    /// The flag kept in `data_dir` (not metered when there is none). An unreadable file is
    /// logged and read as not metered (it is replaced on the next change).
    pub fn open(data_dir: &Path) -> Self {
        let path = data_dir.join(FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<LinkState>(&bytes).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "ignoring an unreadable link file");
                LinkState::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => LinkState::default(),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot read the link file");
                LinkState::default()
            }
        };
        Self {
            inner: Arc::new(Inner {
                path,
                flag: watch::Sender::new(state.metered),
            }),
        }
    }

    pub fn get(&self) -> bool {
        *self.inner.flag.borrow()
    }

    /// Sets the flag now and keeps it on disk; the flag holds even when the write fails
    /// (then only until a restart, and the error says so).
    pub fn set(&self, metered: bool) -> Result<(), crate::store::StoreError> {
        let changed = self.inner.flag.send_if_modified(|m| {
            let changed = *m != metered;
            *m = metered;
            changed
        });
        if changed {
            info!(metered, "link metering changed");
        }
        let bytes = serde_json::to_vec(&LinkState { metered }).unwrap_or_default();
        crate::store::write_atomic(&self.inner.path, &bytes)
    }

    /// Changes whenever the flag does.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.inner.flag.subscribe()
    }
}

/// `GET /v1/link`, `PUT /v1/link`.
pub fn router(metered: Metered) -> Router {
    Router::new()
        .route("/v1/link", get(read).put(write))
        .with_state(metered)
}

async fn read(State(metered): State<Metered>) -> Json<LinkState> {
    Json(LinkState {
        metered: metered.get(),
    })
}

async fn write(
    State(metered): State<Metered>,
    body: Result<Json<LinkState>, JsonRejection>,
) -> Response {
    let Json(asked) = match body {
        Ok(body) => body,
        Err(e) => {
            let message = format!("the link is {{\"metered\": true|false}}: {}", e.body_text());
            let body = serde_json::json!({ "error": message });
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
    };
    match metered.set(asked.metered) {
        Ok(()) => Json(asked).into_response(),
        Err(e) => {
            warn!(error = %e, "link metering set but not persisted");
            let message = format!("set until the agent restarts, but not saved: {e}");
            let body = serde_json::json!({ "error": message });
            (StatusCode::INTERNAL_SERVER_ERROR, Json(body)).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves `app` on a loopback port; answers (status, JSON body) per call.
    async fn serve(app: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/link", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    async fn call(url: &str, body: Option<&str>) -> (StatusCode, serde_json::Value) {
        let http = crate::capture::test_http();
        let request = match body {
            None => http.get(url),
            Some(body) => http
                .put(url)
                .header("content-type", "application/json")
                .body(body.to_owned()),
        };
        let response = request.send().await.unwrap();
        let status = StatusCode::from_u16(response.status().as_u16()).unwrap();
        (status, response.json().await.unwrap())
    }

    #[tokio::test]
    async fn the_flag_is_set_on_the_api_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let metered = Metered::open(dir.path());
        let url = serve(router(metered.clone())).await;
        let mut changes = metered.subscribe();
        let (status, body) = call(&url, None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, serde_json::json!({ "metered": false }));
        let (status, body) = call(&url, Some(r#"{"metered": true}"#)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, serde_json::json!({ "metered": true }));
        assert!(changes.has_changed().unwrap());
        assert!(*changes.borrow_and_update());
        assert!(Metered::open(dir.path()).get(), "kept on disk");
        let (status, body) = call(&url, Some(r#"{"metered": "yes"}"#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body["error"].as_str().unwrap().contains("metered"));
        assert!(metered.get(), "a bad request changes nothing");
    }

    #[test]
    fn an_unreadable_file_means_not_metered() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), b"{oops").unwrap();
        assert!(!Metered::open(dir.path()).get());
    }
}
