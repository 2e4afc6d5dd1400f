//! Data capture as `start` wires it: the configuration checked at start, samples a
//! previous run spooled uploaded with the device token, oldest first, and the link's
//! metering on the local API, kept across a restart. No broker is needed for any of it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use botfleet_agent::capture::settings::SpoolBounds;
use botfleet_agent::capture::spool::{Spool, unix_ns};
use botfleet_agent::{AgentError, Config, ConfigError};
use jiff::Timestamp;
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

fn config(data_dir: &std::path::Path, upload_url: &str) -> Config {
    let key = botfleet_protocol::manifest::format_public_key(
        &botfleet_protocol::ManifestSigner::from_secret([3; 32]).public_key(),
    );
    let token_file = data_dir.join("device-token");
    std::fs::create_dir_all(data_dir).unwrap();
    std::fs::write(&token_file, "tok-123\n").unwrap();
    let mut config: Config = toml::from_str(&format!(
        r#"
        device_id = "robot-1"
        trusted_keys = ["{key}"]
        [capture.slots.digits]
        sample_every = 10
        [upload]
        url = "{upload_url}"
        "#
    ))
    .unwrap();
    config.data_dir = data_dir.to_owned();
    config.upload.token_file = token_file;
    config.mqtt.url = "mqtt://127.0.0.1:9".into();
    config.inference.listen = "127.0.0.1:0".parse().unwrap();
    config
}

/// A PUT the test server received: (path's sha256, authorization).
type Put = (String, Option<String>);

async fn upload_server() -> (String, mpsc::UnboundedReceiver<Put>) {
    async fn take(
        State(tx): State<Arc<mpsc::UnboundedSender<Put>>>,
        Path((_device, sha)): Path<(String, String)>,
        headers: HeaderMap,
        _body: Bytes,
    ) -> StatusCode {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let _ = tx.send((sha, auth));
        StatusCode::CREATED
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let app = Router::new()
        .route("/api/v1/devices/{id}/samples/{sha}", put(take))
        .with_state(Arc::new(tx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, rx)
}

#[tokio::test]
async fn samples_spooled_before_a_restart_are_uploaded_oldest_first_with_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (url, mut puts) = upload_server().await;
    let bounds = SpoolBounds {
        max_bytes: 1 << 20,
        max_samples: 10,
        max_age: None,
    };
    let (older, newer) = {
        let spool = Spool::open(&data.join("spool"), bounds, Timestamp::now());
        let now = Timestamp::now();
        let earlier = now - jiff::SignedDuration::from_secs(60);
        let newer = spool.write(unix_ns(now), b"second sample", now).unwrap();
        let older = spool.write(unix_ns(earlier), b"first sample", now).unwrap();
        (older, newer)
    };
    let running = botfleet_agent::start(config(&data, &url)).await.unwrap();
    let first = tokio::time::timeout(WAIT, puts.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.0, older.sha256.to_hex());
    assert_eq!(first.1.as_deref(), Some("Bearer tok-123"));
    let second = tokio::time::timeout(WAIT, puts.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.0, newer.sha256.to_hex());
    // The first was deleted once the server had it, before the next went.
    let left: Vec<String> = std::fs::read_dir(data.join("spool"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.contains(&older.sha256.to_hex())),
        "{left:?}"
    );
    running.shutdown().await;
}

#[tokio::test]
async fn the_metered_flag_is_set_on_the_local_api_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (url, _puts) = upload_server().await;
    let running = botfleet_agent::start(config(&data, &url)).await.unwrap();
    let link = format!("http://{}/v1/link", running.inference_addr());
    let http = reqwest::Client::new();
    let got: serde_json::Value = http.get(&link).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, serde_json::json!({ "metered": false }));
    let put = http
        .put(&link)
        .json(&serde_json::json!({ "metered": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), reqwest::StatusCode::OK);
    running.shutdown().await;

    let running = botfleet_agent::start(config(&data, &url)).await.unwrap();
    let link = format!("http://{}/v1/link", running.inference_addr());
    let got: serde_json::Value = http.get(&link).send().await.unwrap().json().await.unwrap();
    assert_eq!(got, serde_json::json!({ "metered": true }));
    running.shutdown().await;
}

#[tokio::test]
async fn capture_without_a_device_token_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = config(&data, "http://127.0.0.1:9");
    config.upload.token_file = data.join("missing-token");
    let err = botfleet_agent::start(config).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Config(ConfigError::Invalid { key, .. }) if key == "upload.token_file"),
        "{err}"
    );
}
