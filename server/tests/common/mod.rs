//! Shared helpers: a real server on loopback ports in a temp dir, an HTTP client, and an
//! MQTT client that plays a robot or an observer.
#![allow(dead_code)]
// each test binary uses a different part
// Test helpers (not `#[test]` functions, so clippy's test exemption misses them): a failed
// set-up should panic right here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod moto;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use botfleet_protocol::manifest::SignedManifest;
use botfleet_protocol::{DeviceId, ExpiryCheck, Manifest, TopicKind, Topics, TrustedKeys};
use botfleet_server::{Config, Running};
use reqwest::multipart::{Form, Part};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use serde_json::Value;
use tempfile::TempDir;

/// Upper bound for anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(20);

/// A device topic under the default prefix.
pub fn topic(device: &str, kind: TopicKind) -> String {
    Topics::default().device(&DeviceId::new(device).unwrap(), kind)
}

/// Verifies a model record's signed manifest with `public_key`, as an agent would.
pub fn verify(record: &Value, public_key: &str) -> Manifest {
    let signed: SignedManifest = serde_json::from_value(record["signed_manifest"].clone()).unwrap();
    let trusted = TrustedKeys::parse([public_key]).unwrap();
    signed
        .verify(&trusted, ExpiryCheck::At(jiff::Timestamp::now()))
        .unwrap()
        .into_inner()
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/models"
    ))
    .join(name)
}

pub fn fixture_bytes(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

pub struct TestServer {
    pub running: Running,
    pub dir: TempDir,
    pub http: reqwest::Client,
}

pub fn test_config(dir: &TempDir) -> Config {
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    config.mqtt.embedded_listen = "127.0.0.1:0".parse().unwrap();
    config.mqtt.connect_timeout_s = 20;
    config
}

pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(WAIT)
        .build()
        .unwrap()
}

impl TestServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir).await
    }

    pub async fn start_in(dir: TempDir) -> Self {
        Self::start_with(dir, |_| {}).await
    }

    /// Starts with `edit` applied to the test config.
    pub async fn start_with(dir: TempDir, edit: impl FnOnce(&mut Config)) -> Self {
        let mut config = test_config(&dir);
        edit(&mut config);
        let running = botfleet_server::start(config).await.unwrap();
        Self {
            running,
            dir,
            http: http_client(),
        }
    }

    /// Stops the server, keeping its data dir.
    pub async fn stop(self) -> TempDir {
        self.running.shutdown().await.unwrap();
        self.dir
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.running.base_url())
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.running
            .mqtt_url()
            .strip_prefix("mqtt://")
            .unwrap()
            .parse()
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    pub async fn upload(&self, metadata: &Value, model: Vec<u8>) -> (u16, Value) {
        let form = Form::new()
            .text("metadata", metadata.to_string())
            .part("model", Part::bytes(model).file_name("model.onnx"));
        let response = self
            .http
            .post(self.url("/api/v1/models"))
            .multipart(form)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// POST without a body; the answer must be 200.
    pub async fn post(&self, path: &str) -> Value {
        let response = self
            .http
            .post(format!("{}{path}", self.running.base_url()))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 200, "POST {path}: {body}");
        body
    }

    pub async fn rollout(&self, body: &Value, key: Option<&str>) -> (u16, Value) {
        let mut request = self.http.post(self.url("/api/v1/rollouts")).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap())
    }

    /// `PUT` with a JSON body.
    pub async fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        let response = self
            .http
            .put(self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// `DELETE`; the status, and the error's JSON when there is one.
    pub async fn delete(&self, path: &str) -> (u16, Value) {
        let response = self.http.delete(self.url(path)).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Uploads the small pnet fixture into `slot` as `version`.
    pub async fn upload_pnet(&self, slot: &str, version: &str) -> Value {
        let meta = serde_json::json!({
            "slot": slot, "name": "mtcnn-pnet", "version": version,
            "inputs": [{"name": "input_1", "datatype": "FP32", "shape": [1, 12, 12, 3]}]
        });
        let (status, record) = self.upload(&meta, fixture_bytes("mtcnn_pnet.onnx")).await;
        assert_eq!(status, 201, "{record}");
        record
    }

    /// Polls `path` until `done` holds for its JSON (the server folds MQTT messages
    /// asynchronously; there is no event to wait on over HTTP).
    pub async fn wait_for(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(WAIT, async {
            loop {
                let (status, body) = self.get(path).await;
                if status == 200 && done(&body) {
                    return body;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{path} never reached the expected state"))
    }
}

/// An MQTT client on the server's broker.
pub struct MqttClient {
    pub client: AsyncClient,
    pub eventloop: EventLoop,
}

impl MqttClient {
    pub async fn connect(addr: SocketAddr, id: &str) -> Self {
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_max_packet_size(
            botfleet_protocol::MAX_PACKET_BYTES,
            botfleet_protocol::MAX_PACKET_BYTES,
        );
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .unwrap();
        Self { client, eventloop }
    }

    pub async fn subscribe(&mut self, topic: &str) {
        self.client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = self.eventloop.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .unwrap();
    }

    /// Waits for the next publish on `topic`.
    pub async fn next_publish(&mut self, topic: &str) -> Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = self.eventloop.poll().await.unwrap()
                    && p.topic == topic
                {
                    return p;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing published on {topic}"))
    }

    /// Waits for the next publish on a topic that `filter` (with `+` wildcards) matches.
    pub async fn next_publish_matching(&mut self, filter: &str) -> Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) = self.eventloop.poll().await.unwrap()
                    && rumqttc::matches(&p.topic, filter)
                {
                    return p;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("nothing published on {filter}"))
    }

    /// Publishes and drives the event loop until the broker acknowledged it.
    pub async fn publish(&mut self, topic: &str, retain: bool, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload)
            .await
            .unwrap();
        tokio::time::timeout(WAIT, async {
            loop {
                if let Event::Incoming(Packet::PubAck(_)) = self.eventloop.poll().await.unwrap() {
                    return;
                }
            }
        })
        .await
        .unwrap();
    }
}

/// A device's retained `info` payload with `labels`.
pub fn info(labels: Value) -> Vec<u8> {
    serde_json::json!({
        "agent_version": "0.1.0", "hostname": "h", "arch": "x86_64",
        "cpu_cores": 2, "memory_total_bytes": 1024, "labels": labels
    })
    .to_string()
    .into_bytes()
}
