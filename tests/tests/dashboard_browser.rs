//! The dashboard in real headless Chromium (Debian's `chromium`, driven by `playwright-core`
//! from `tests/browser/`): a real server with tokens configured, a real Mosquitto, simulated
//! agents speaking the real protocol, a real model. The script logs in, starts a rollout
//! with a bake time, watches it progress live, pauses and resumes it with the confirm
//! dialog, waits for completion, sees the page reconnect by itself and stay correct and live
//! across a server restart, and checks a device page's plot has data points. A second test
//! uploads samples as robots do and checks the Data page: counts per device, slot and rule,
//! thumbnails, a filter, a data set and its export.
//! Screenshots land in `target/browser-artifacts/`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use botfleet_e2e::Mosquitto;
use botfleet_e2e::simulated::{Behaviour, SimAgent};
use botfleet_e2e::watch::mqtt_options;
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::sample::{self, CaptureRule, SampleHeader, SampleModel, SampleTensor};
use botfleet_protocol::tensor::DataType;
use botfleet_protocol::{DeviceId, TopicKind, Topics};
use botfleet_server::auth::{Role, TokenConfig};
use botfleet_server::data::DeviceSecret;
use rumqttc::{AsyncClient, QoS};
use serde_json::{Value, json};
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

/// The broker CI gives (`BOTFLEET_MOSQUITTO_URL`), else one started for this test.
async fn broker() -> (Option<Mosquitto>, String) {
    match std::env::var("BOTFLEET_MOSQUITTO_URL") {
        Ok(url) => (None, url),
        Err(_) => {
            let mosquitto = Mosquitto::start().await.unwrap();
            let url = mosquitto.url();
            (Some(mosquitto), url)
        }
    }
}

/// A server in `dir` that wants the operator token.
fn server_config(dir: &Path, broker: &str, tag: &str) -> botfleet_server::Config {
    let mut config = botfleet_server::Config {
        data_dir: dir.join("server"),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        topic_prefix: format!("botfleet-test/{tag}"),
        ..Default::default()
    };
    config.mqtt.url = broker.to_owned();
    config.mqtt.client_id = format!("botfleet-server-{tag}");
    config.auth.tokens = vec![TokenConfig {
        name: "browser".into(),
        role: Role::Operator,
        token: OPERATOR.into(),
    }];
    config
}

fn artifacts() -> PathBuf {
    let artifacts = workspace().join("target/browser-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    artifacts
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

    let (_mosquitto, broker) = broker().await;
    let mut config = server_config(dir.path(), &broker, &tag);
    let prefix = config.topic_prefix.clone();
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

    let artifacts = artifacts();
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

const DIGITS: &str = "digits";
const IMU: &str = "imu";
const SIDE: usize = 28;

/// A 28x28 "7" drawn with a pen `shift` pixels to the right: a pattern one can see in the
/// thumbnail, and a different file (digest) per sample.
fn seven(shift: usize) -> Vec<f32> {
    let mut pixels = vec![0.0f32; SIDE * SIDE];
    for y in 0..SIDE {
        for x in 0..SIDE {
            let bar = (5..9).contains(&y) && (6 + shift..22 + shift).contains(&x);
            let stem_x = 21 + shift - y.saturating_sub(5) / 3;
            let stem = (6..24).contains(&y) && (stem_x.saturating_sub(2)..=stem_x).contains(&x);
            if bar || stem {
                pixels[y * SIDE + x] = 1.0;
            }
        }
    }
    pixels
}

fn le_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// One captured sample as a robot's spool holds it: an image for the digits slot, a plain
/// vector (no image) for the IMU slot.
fn sample_file(device: &str, slot: &str, rule: CaptureRule, n: usize, age_h: i64) -> Vec<u8> {
    let (name, shape, values) = if slot == DIGITS {
        ("input", vec![1, 1, SIDE, SIDE], seven(n % 4))
    } else {
        (
            "features",
            vec![16],
            (0..16).map(|i| (i + n) as f32).collect(),
        )
    };
    let detail = match rule {
        CaptureRule::LowConfidence => Some("top-1 0.41 < 0.6".to_owned()),
        CaptureRule::OutOfRange => Some("value 14.0 outside [-12, 12]".to_owned()),
        _ => None,
    };
    let logits: Vec<f32> = (0..10).map(|i| i as f32 / 10.0).collect();
    let header = SampleHeader {
        schema: sample::SAMPLE_SCHEMA,
        device: device.parse().unwrap(),
        slot: slot.parse().unwrap(),
        model: SampleModel {
            version: "1.0.0".into(),
            release: 1,
            sha256: Sha256Digest::of(slot.as_bytes()),
        },
        engine: EngineKind::Tract,
        captured_at: jiff::Timestamp::now() - jiff::SignedDuration::from_hours(age_h),
        rule,
        detail,
        candidate: None,
        latency_ms: Some(1.5),
        inputs: vec![SampleTensor {
            name: name.into(),
            datatype: DataType::Fp32,
            shape,
        }],
        outputs: vec![SampleTensor {
            name: "logits".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 10],
        }],
        candidate_outputs: vec![],
    };
    sample::encode(&header, &[&le_bytes(&values), &le_bytes(&logits)]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_sees_samples_per_device_and_rule_with_thumbnails_and_exports_a_data_set() {
    let browser_dir = require_browser();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tag = format!("{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir().unwrap();
    let (_mosquitto, broker) = broker().await;
    let config = server_config(dir.path(), &broker, &tag);
    let server = botfleet_server::start(config.clone()).await.unwrap();
    let base = format!("{}/", server.base_url());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    // The upload tokens, as `botfleet-server device-token ID` derives them.
    let secret = DeviceSecret::load(&config.device_secret_file()).unwrap();
    let token = |device: &str| secret.token(&DeviceId::new(device).unwrap());

    // Two robots upload what their capture rules kept, some of it hours ago.
    let one = format!("robot-{tag}-1");
    let two = format!("robot-{tag}-2");
    let uploads = [
        (&one, DIGITS, CaptureRule::LowConfidence, 0),
        (&one, DIGITS, CaptureRule::LowConfidence, 1),
        (&one, DIGITS, CaptureRule::LowConfidence, 2),
        (&one, DIGITS, CaptureRule::Sampled, 0),
        (&one, DIGITS, CaptureRule::Sampled, 1),
        (&two, DIGITS, CaptureRule::Sampled, 0),
        (&two, DIGITS, CaptureRule::LowConfidence, 1),
        (&two, IMU, CaptureRule::OutOfRange, 0),
    ];
    let mut not_image = String::new();
    for (n, (device, slot, rule, age_h)) in uploads.iter().enumerate() {
        let file = sample_file(device, slot, *rule, n, *age_h);
        let sha = Sha256Digest::of(&file).to_hex();
        let put = http
            .put(format!("{base}api/v1/devices/{device}/samples/{sha}"))
            .bearer_auth(token(device))
            .body(file)
            .send()
            .await
            .unwrap();
        let status = put.status();
        assert_eq!(status, 201, "{}", put.text().await.unwrap());
        if *slot == IMU {
            not_image = sha;
        }
    }

    // A data set of the unsure digits.
    let made = http
        .post(format!("{base}api/v1/datasets"))
        .bearer_auth(OPERATOR)
        .json(&json!({"name": "unsure-digits", "rules": ["low_confidence"]}))
        .send()
        .await
        .unwrap();
    assert!(made.status().is_success(), "{}", made.status());
    let set: Value = made.json().await.unwrap();
    assert_eq!(set["samples"], 4, "{set}");

    let expected = json!({
        "rows": [
            {"device": one, "slot": DIGITS, "rules": {"sampled": 2, "low_confidence": 3}, "total": 5},
            {"device": two, "slot": DIGITS, "rules": {"sampled": 1, "low_confidence": 1}, "total": 2},
            {"device": two, "slot": IMU, "rules": {"out_of_range": 1}, "total": 1},
        ],
        "total": uploads.len(),
        "images": uploads.len() - 1,
        "not_image": {"sha256": not_image, "shape": "features FP32 16"},
        "dataset": {"id": set["id"], "name": "unsure-digits", "samples": 4},
        "filter": {"rule": "out_of_range", "samples": 1},
    });
    let artifacts = artifacts();
    let script = tokio::process::Command::new("node")
        .arg(browser_dir.join("data.mjs"))
        .args([base.as_str(), OPERATOR])
        .arg(&artifacts)
        .arg(expected.to_string())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SCRIPT_LIMIT, script)
        .await
        .expect("the browser script did not finish in time")
        .expect("node could not be started (apt-get install -y nodejs)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains("data: all checks passed"),
        "browser script failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    println!("{stdout}");
    for shot in ["data.png", "data-filtered.png"] {
        assert!(artifacts.join(shot).is_file(), "no screenshot {shot}");
    }
    server.shutdown().await.unwrap();
}
