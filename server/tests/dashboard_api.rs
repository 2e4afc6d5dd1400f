//! What the dashboard reads: the change stream, telemetry history, access by role, and the
//! embedded page itself. A real server on loopback, real MQTT, real HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botfleet_protocol::TopicKind;
use botfleet_server::auth::{Role, TokenConfig};
use common::{MqttClient, TestServer, WAIT, topic};
use futures_util::StreamExt;
use serde_json::{Value, json};

const READ: &str = "read-token-0123456789abcdef";
const OPERATOR: &str = "operator-token-0123456789abcdef";

async fn with_tokens() -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    TestServer::start_with(dir, |config| {
        config.auth.tokens = vec![
            TokenConfig {
                name: "viewer".into(),
                role: Role::Read,
                token: READ.into(),
            },
            TokenConfig {
                name: "ops".into(),
                role: Role::Operator,
                token: OPERATOR.into(),
            },
        ];
    })
    .await
}

/// Reads server-sent events until one whose data satisfies `done`.
struct Events {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl Events {
    async fn open(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        let kind = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        Self {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event as (name, data).
    async fn next(&mut self) -> (String, String) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let field = |name: &str| {
                    block
                        .lines()
                        .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
                };
                if let Some(event) = field("event:") {
                    return (event, field("data:").unwrap_or_default());
                }
                continue; // a keep-alive comment
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("no server-sent event in time")
                .expect("the stream ended")
                .unwrap();
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    async fn until(&mut self, done: impl Fn(&str, &Value) -> bool) -> Value {
        loop {
            let (event, data) = self.next().await;
            let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
            if done(&event, &value) {
                return value;
            }
        }
    }
}

#[tokio::test]
async fn the_stream_delivers_a_change_notice_after_a_rollout_is_paused() {
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1"]});
    let (status, created) = server.rollout(&body, None).await;
    assert_eq!(status, 202, "{created}");
    let id = created["rollout_id"].as_str().unwrap().to_owned();

    let stream = server.http.get(server.url("/api/v1/events/stream"));
    let mut events = Events::open(stream.send().await.unwrap()).await;
    // Every stream starts by telling the page to fetch everything.
    assert_eq!(events.next().await.0, "resync");
    server.post(&format!("/api/v1/rollouts/{id}/pause")).await;
    let notice = events
        .until(|event, v| event == "change" && v["kind"] == "rollout" && v["id"] == id.as_str())
        .await;
    assert_eq!(notice, json!({"kind": "rollout", "id": id}));
    let (_, view) = server.get(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(view["state"], "paused");
    server.stop().await;
}

/// The dashboard test restarts its server on the same data directory while the page holds
/// an event stream open: once `shutdown` returns, the database must be closed, however
/// the connection tasks and the runtime's threads happen to be scheduled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shut_down_with_streams_open_starts_again_at_once_on_its_data() {
    let mut dir = tempfile::tempdir().unwrap();
    for round in 0..8 {
        let server = TestServer::start_in(dir).await;
        if round == 0 {
            server.upload_pnet("faces", "1.0.0").await;
        }
        let stream = server.http.get(server.url("/api/v1/events/stream"));
        let mut events = Events::open(stream.send().await.unwrap()).await;
        assert_eq!(events.next().await.0, "resync");
        let (status, models) = server.get("/api/v1/models").await;
        assert_eq!(status, 200, "{models}");
        // The stream and the pooled connection stay open across the shutdown.
        dir = server.stop().await;
        drop(events);
    }
}

fn telemetry(cpu: f64) -> Vec<u8> {
    json!({
        "at": "2026-01-01T00:00:00Z", "uptime_s": 1, "cpu_percent": cpu,
        "memory_used_bytes": 100, "memory_total_bytes": 200,
        "temperatures_c": {"cpu-thermal": 41.5},
        "gpus": [{"source": "jetson_sysfs", "load_percent": 12.0}],
        "inference": {"faces": {"requests": 10, "errors": 0, "p50_ms": 1.5, "p99_ms": 3.0}}
    })
    .to_string()
    .into_bytes()
}

#[tokio::test]
async fn telemetry_history_is_ordered_bounded_and_filtered_by_since() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/api/v1/devices/robot-1/telemetry").await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string());

    let mut robot = MqttClient::connect(server.mqtt_addr(), "robot-1").await;
    let samples = 730; // more than the 720 points kept per device
    for i in 0..samples {
        robot
            .publish(
                &topic("robot-1", TopicKind::Telemetry),
                false,
                telemetry(f64::from(i)),
            )
            .await;
    }
    let last = f64::from(samples - 1);
    let history = server
        .wait_for("/api/v1/devices/robot-1/telemetry", |v| {
            v["points"]
                .as_array()
                .and_then(|p| p.last())
                .is_some_and(|p| p["cpu_percent"] == last)
        })
        .await;
    let points = history["points"].as_array().unwrap();
    assert_eq!(points.len(), 720, "bounded per device");
    assert_eq!(points[0]["cpu_percent"], f64::from(samples - 720));
    let times: Vec<jiff::Timestamp> = points
        .iter()
        .map(|p| p["at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "oldest first");
    let first = &points[0];
    assert_eq!(first["gpu_load_percent"], 12.0);
    assert_eq!(first["temperatures_c"]["cpu-thermal"], 41.5);
    assert_eq!(first["inference"]["faces"]["p99_ms"], 3.0);

    let since = times[700].to_string();
    let path = format!("/api/v1/devices/robot-1/telemetry?since={since}");
    let (status, after) = server.get(&path).await;
    assert_eq!(status, 200);
    let after = after["points"].as_array().unwrap();
    assert!(after.len() <= 19, "only points after {since}");
    assert!(after.iter().all(|p| {
        p["at"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap()
            > times[700]
    }));
    let (status, _) = server
        .get("/api/v1/devices/robot-1/telemetry?since=yesterday")
        .await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test]
async fn without_a_token_the_api_answers_401_with_a_json_error() {
    let server = with_tokens().await;
    let response = server
        .http
        .get(server.url("/api/v1/rollouts"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    let wrong = server
        .http
        .get(server.url("/api/v1/devices"))
        .bearer_auth("not-a-token-at-all")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let stream = server
        .http
        .get(server.url("/api/v1/events/stream?ticket=forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 401);
    // What carries no data stays open: the page, its files, metrics, health.
    for path in ["/", "/web/app.js", "/metrics", "/healthz"] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn a_read_token_can_look_but_not_change_and_an_operator_can_change() {
    let server = with_tokens().await;
    let get = |token: &'static str, path: &str| {
        server.http.get(server.url(path)).bearer_auth(token).send()
    };
    for path in [
        "/api/v1/rollouts",
        "/api/v1/devices",
        "/api/v1/models",
        "/api/v1/session",
    ] {
        assert_eq!(get(READ, path).await.unwrap().status(), 200, "{path}");
    }
    let session: Value = get(READ, "/api/v1/session")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        session,
        json!({"auth": true, "name": "viewer", "role": "read"})
    );

    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1"]});
    let refused = server
        .http
        .post(server.url("/api/v1/rollouts"))
        .bearer_auth(READ)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let error: Value = refused.json().await.unwrap();
    assert!(
        error["error"].as_str().unwrap().contains("operator"),
        "{error}"
    );

    // An operator uploads and starts a rollout.
    let meta = json!({
        "slot": "faces", "name": "mtcnn-pnet", "version": "1.0.0",
        "inputs": [{"name": "input_1", "datatype": "FP32", "shape": [1, 12, 12, 3]}]
    });
    let form = reqwest::multipart::Form::new()
        .text("metadata", meta.to_string())
        .part(
            "model",
            reqwest::multipart::Part::bytes(common::fixture_bytes("mtcnn_pnet.onnx"))
                .file_name("m.onnx"),
        );
    let upload = server
        .http
        .post(server.url("/api/v1/models"))
        .bearer_auth(OPERATOR)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 201);
    let created = server
        .http
        .post(server.url("/api/v1/rollouts"))
        .bearer_auth(OPERATOR)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 202);

    // A reader may open the stream: with a ticket, since browsers cannot send headers.
    let ticket: Value = server
        .http
        .post(server.url("/api/v1/events/ticket"))
        .bearer_auth(READ)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = ticket["ticket"].as_str().unwrap();
    let url = server.url(&format!("/api/v1/events/stream?ticket={ticket}"));
    let mut events = Events::open(server.http.get(url).send().await.unwrap()).await;
    assert_eq!(events.next().await.0, "resync");
    server.stop().await;
}

#[tokio::test]
async fn the_dashboard_is_served_from_the_binary_with_content_types_and_relative_urls() {
    let server = TestServer::start().await;
    let fetch = |path: &str| server.http.get(server.url(path)).send();
    let page = fetch("/").await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(html.contains("src=\"web/app.js\""), "relative script URL");
    assert!(!html.contains("=\"/"), "no absolute URL in the page");
    for (path, kind) in [
        ("/web/app.js", "text/javascript; charset=utf-8"),
        ("/web/rollout.js", "text/javascript; charset=utf-8"),
        ("/web/vendor/uPlot.esm.js", "text/javascript; charset=utf-8"),
        ("/web/style.css", "text/css; charset=utf-8"),
        ("/web/vendor/uPlot.min.css", "text/css; charset=utf-8"),
        ("/web/vendor/LICENSE", "text/plain; charset=utf-8"),
    ] {
        let response = fetch(path).await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(response.headers()["content-type"], kind, "{path}");
        assert!(!response.bytes().await.unwrap().is_empty(), "{path}");
    }
    let app = fetch("/web/app.js").await.unwrap().text().await.unwrap();
    assert!(
        !app.contains("'/api") && !app.contains("`/api"),
        "API calls are relative"
    );
    let missing = fetch("/web/nope.js").await.unwrap();
    assert_eq!(missing.status(), 404);
    server.stop().await;
}

#[tokio::test]
async fn the_fleet_list_filters_by_a_label_selector() {
    let server = TestServer::start().await;
    let mut robot = MqttClient::connect(server.mqtt_addr(), "robot-fixture").await;
    for (device, site) in [("robot-a", "lab"), ("robot-b", "field")] {
        let info = json!({"agent_version": "0.1.0", "hostname": device, "arch": "aarch64",
            "cpu_cores": 4, "memory_total_bytes": 1024, "labels": {"site": site}});
        robot
            .publish(
                &topic(device, TopicKind::Info),
                true,
                info.to_string().into_bytes(),
            )
            .await;
    }
    server
        .wait_for("/api/v1/devices", |v| {
            v.as_array().is_some_and(|a| a.len() == 2)
        })
        .await;
    let (status, lab) = server.get("/api/v1/devices?selector=site%3Dlab").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = lab
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["robot-a"]);
    let (status, not_lab) = server.get("/api/v1/devices?selector=site%21%3Dlab").await;
    assert_eq!(status, 200);
    assert_eq!(not_lab.as_array().unwrap().len(), 1);
    let (status, error) = server
        .get("/api/v1/devices?selector=site%20in%20(lab")
        .await;
    assert_eq!(status, 400, "{error}");
    assert!(error["error"].is_string());
    server.stop().await;
}
