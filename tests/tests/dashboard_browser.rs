//! The dashboard in real headless Chromium (Debian's `chromium`, driven by `playwright-core`
//! from `tests/browser/`): a real server with tokens configured, a real Mosquitto, simulated
//! agents speaking the real protocol, a real model. The script logs in, starts a rollout
//! with a bake time, watches it progress live, pauses and resumes it with the confirm
//! dialog, waits for completion, sees the page reconnect by itself and stay correct and live
//! across a server restart, and checks a device page's plot has data points.
//! Screenshots land in `target/browser-artifacts/`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use botfleet_e2e::Mosquitto;
use botfleet_e2e::simulated::{Behaviour, SimAgent};
use botfleet_e2e::watch::mqtt_options;
use botfleet_protocol::{DeviceId, TopicKind, Topics};
use botfleet_server::auth::{Role, TokenConfig};
use rumqttc::{AsyncClient, QoS};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

const CHROMIUM: &str = "/usr/bin/chromium";
const OPERATOR: &str = "browser-operator-token-0123456789";
/// The whole browser script, set-up included, ends well within this.
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Fails with the command that installs what is missing.
fn require_browser() -> PathBuf {
    let browser_dir = workspace().join("tests/browser");
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install it with `apt-get install -y chromium` (.ci/run does)"
    );
    assert!(
        browser_dir.join("node_modules/playwright-core").is_dir(),
        "playwright-core is missing: run `npm ci --prefix tests/browser` (.ci/run does)"
    );
    browser_dir
}

/// Publishes a telemetry sample for each device every 200 ms, as agents would (faster).
fn feed_telemetry(client: AsyncClient, topics: Topics, devices: Vec<String>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        for n in 0u32.. {
            tick.tick().await;
            for (i, device) in devices.iter().enumerate() {
                let wave = f64::from((n + i as u32) % 20);
                let sample = json!({
                    "at": jiff::Timestamp::now(), "uptime_s": n, "cpu_percent": 20.0 + wave,
                    "memory_used_bytes": (2u64 << 30) + u64::from(n) * 1024 * 1024,
                    "memory_total_bytes": 8u64 << 30,
                    "temperatures_c": {"cpu-thermal": 45.0 + wave / 2.0, "gpu-thermal": 43.0},
                    "gpus": [{"source": "jetson_sysfs", "load_percent": 30.0 + wave}],
                    "inference": {"faces": {"requests": 50, "errors": 0,
                        "p50_ms": 2.0 + wave / 10.0, "p99_ms": 4.0 + wave / 5.0}}
                });
                let topic = topics.device(
                    &DeviceId::new(device.as_str()).unwrap(),
                    TopicKind::Telemetry,
                );
                if client
                    .publish(topic, QoS::AtMostOnce, false, sample.to_string())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_a_rollout_live_pauses_resumes_and_sees_device_plots() {
    let browser_dir = require_browser();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tag = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir().unwrap();

    let mosquitto = match std::env::var("BOTFLEET_MOSQUITTO_URL") {
        Ok(_) => None,
        Err(_) => Some(Mosquitto::start().await.unwrap()),
    };
    let broker = match &mosquitto {
        Some(m) => m.url(),
        None => std::env::var("BOTFLEET_MOSQUITTO_URL").unwrap(),
    };
    let prefix = format!("botfleet-test/{tag}");
    let mut config = botfleet_server::Config {
        data_dir: dir.path().join("server"),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        topic_prefix: prefix.clone(),
        ..Default::default()
    };
    config.mqtt.url = broker.clone();
    config.mqtt.client_id = format!("botfleet-server-{tag}");
    config.auth.tokens = vec![TokenConfig {
        name: "browser".into(),
        role: Role::Operator,
        token: OPERATOR.into(),
    }];
    let server = botfleet_server::start(config.clone()).await.unwrap();
    let base = format!("{}/", server.base_url());

    // A real model, registered through the protected API.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let meta = json!({"slot": "faces", "name": "mtcnn-pnet", "version": "1.0.0",
        "inputs": [{"name": "input_1", "datatype": "FP32", "shape": [1, 12, 12, 3]}]});
    let model = std::fs::read(botfleet_e2e::fixture("mtcnn_pnet.onnx")).unwrap();
    let form = reqwest::multipart::Form::new()
        .text("metadata", meta.to_string())
        .part(
            "model",
            reqwest::multipart::Part::bytes(model).file_name("pnet.onnx"),
        );
    let upload = http
        .post(format!("{base}api/v1/models"))
        .bearer_auth(OPERATOR)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 201);

    // Four robots that take two seconds to answer, so progress is there to be watched.
    let key = server.public_key();
    let mut agents = Vec::new();
    let mut devices = Vec::new();
    for i in 1..=4 {
        let id = format!("robot-{tag}-{i}");
        let slow = Behaviour::Slow(Duration::from_secs(2));
        let labels = [("site", "lab"), ("board", "orin-nano")];
        agents.push(
            SimAgent::start(&broker, &prefix, &id, &key, &labels, slow)
                .await
                .unwrap(),
        );
        devices.push(id);
    }
    let (feeder, mut eventloop) = AsyncClient::new(
        mqtt_options(&broker, format!("telemetry-{tag}")).unwrap(),
        64,
    );
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    feed_telemetry(
        feeder,
        Topics::new(prefix.clone()).unwrap(),
        devices.clone(),
    );

    let artifacts = workspace().join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let mut script = tokio::process::Command::new("node");
    script
        .arg(browser_dir.join("dashboard.mjs"))
        .args([base.as_str(), OPERATOR])
        .arg(&artifacts)
        .arg(&devices[0])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = script
        .spawn()
        .expect("node could not be started (apt-get install -y nodejs)");
    let mut answers = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let stderr = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut text = String::new();
        let _ = BufReader::new(stderr).read_to_string(&mut text).await;
        text
    });
    let mut server = Some(server);
    let mut stdout = String::new();
    let finished = tokio::time::timeout(SCRIPT_LIMIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            stdout.push_str(&line);
            stdout.push('\n');
            if line == "dashboard: restart the server" {
                // Same data directory and port: the page must reconnect by itself.
                let old = server.take().unwrap();
                config.http_listen = old.http_addr();
                old.shutdown().await.unwrap();
                server = Some(botfleet_server::start(config.clone()).await.unwrap());
                answers.write_all(b"restarted\n").await.unwrap();
            }
        }
        child.wait().await.unwrap()
    })
    .await;
    let Ok(status) = finished else {
        let _ = child.kill().await;
        let stderr = stderr.await.unwrap_or_default();
        panic!("the browser script did not finish in time:\n{stdout}\n{stderr}");
    };
    let stderr = stderr.await.unwrap_or_default();
    assert!(
        status.success(),
        "browser script failed ({status}):\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("dashboard: all checks passed"),
        "{stdout}\n{stderr}"
    );
    for shot in [
        "rollout-live.png",
        "rollout-paused.png",
        "rollout-completed.png",
        "fleet-after-restart.png",
        "channels.png",
        "device.png",
    ] {
        assert!(artifacts.join(shot).is_file(), "no screenshot {shot}");
    }
    drop(agents);
    server.unwrap().shutdown().await.unwrap();
}
