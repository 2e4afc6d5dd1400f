//! The dashboard's static files, compiled into the binary (`server/web/`): the server
//! needs nothing on disk and no Node.js to show it. Every URL in them is relative, so the
//! page works behind a reverse proxy under a path prefix.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ApiError, ApiPath};

/// One embedded file: its path under `web/`, its media type, its bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset {
            path: $path,
            content_type: $type,
            bytes: include_bytes!(concat!("../../web/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("ui.js", JS),
    asset!("fleet.js", JS),
    asset!("device.js", JS),
    asset!("rollouts.js", JS),
    asset!("rollout.js", JS),
    asset!("models.js", JS),
    asset!("channels.js", JS),
    asset!("data.js", JS),
    asset!("vendor/uPlot.esm.js", JS),
    asset!("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    asset!("vendor/LICENSE", "text/plain; charset=utf-8"),
];

fn serve(asset: &Asset) -> Response {
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            // Small files, and a new server version must show at once.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        asset.bytes,
    )
        .into_response()
}

/// `GET /`: the page.
pub async fn index() -> Response {
    match ASSETS.iter().find(|a| a.path == "index.html") {
        Some(asset) => serve(asset),
        None => ApiError::not_found("the dashboard is not built in").into_response(),
    }
}

/// `GET /web/{*path}`: scripts, styles, the charting library.
pub async fn file(ApiPath(path): ApiPath<String>) -> Response {
    match ASSETS.iter().find(|a| a.path == path) {
        Some(asset) => serve(asset),
        None => ApiError::not_found(format!("no dashboard file {path}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_page_stays_small() {
        let total: usize = ASSETS.iter().map(|a| a.bytes.len()).sum();
        let ours: usize = ASSETS
            .iter()
            .filter(|a| !a.path.starts_with("vendor/"))
            .map(|a| a.bytes.len())
            .sum();
        println!("dashboard assets: {total} bytes, {ours} of them ours");
        assert!(total < 256 * 1024, "{total} bytes");
    }

    #[test]
    fn every_url_in_the_page_is_relative() {
        for asset in ASSETS.iter().filter(|a| !a.path.starts_with("vendor/")) {
            let text = String::from_utf8_lossy(asset.bytes);
            for quote in ['"', '\'', '`', '('] {
                for root in ["/api", "/web", "/metrics", "/#"] {
                    let absolute = format!("{quote}{root}");
                    assert!(!text.contains(&absolute), "{} has {absolute}", asset.path);
                }
            }
        }
    }
}
