//! Rollouts end to end through the embedded broker: desired documents out, events in.

mod common;

use std::collections::BTreeMap;

use botfleet_protocol::messages::Desired;
use botfleet_protocol::{ExpiryCheck, TopicKind, TrustedKeys};
use common::{MqttClient, TestServer, info, topic};
use serde_json::{Value, json};

#[tokio::test]
async fn a_rollout_publishes_a_retained_desired_document_signed_by_the_server() {
    let server = TestServer::start().await;
    let record = server.upload_pnet("faces", "1.0.0").await;
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1"]});
    let (status, created) = server.rollout(&body, None).await;
    assert_eq!(status, 202, "{created}");
    let rollout_id = created["rollout_id"].as_str().unwrap().to_owned();
    assert!(
        rollout_id.starts_with("r-") && rollout_id.len() == 14,
        "{rollout_id}"
    );
    assert_eq!(created["devices"], json!(["robot-1"]));

    // Subscribed after the publish: the broker hands over the retained document.
    let mut observer = MqttClient::connect(server.mqtt_addr(), "observer").await;
    let desired_topic = topic("robot-1", TopicKind::Desired);
    observer.subscribe(&desired_topic).await;
    let publish = observer.next_publish(&desired_topic).await;
    assert!(publish.retain, "a late subscriber gets it as retained");
    let desired: Desired = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(desired.generation, 1);
    let slot = &desired.slots[&"faces".parse().unwrap()];
    assert_eq!(slot.rollout_id.as_ref().unwrap().as_str(), rollout_id);
    assert_eq!(slot.artifact_url, record["artifact_url"].as_str().unwrap());
    let trusted = TrustedKeys::parse([server.running.public_key().as_str()]).unwrap();
    let manifest = slot
        .manifest
        .verify(&trusted, ExpiryCheck::At(jiff::Timestamp::now()))
        .unwrap();
    assert_eq!(
        manifest.artifact.sha256.to_hex(),
        record["sha256"].as_str().unwrap()
    );

    // The next rollout to the same device raises the generation and keeps other slots.
    server.upload_pnet("faces-b", "1.0.0").await;
    let body = json!({"slot": "faces-b", "version": "1.0.0", "devices": ["robot-1"]});
    assert_eq!(server.rollout(&body, None).await.0, 202);
    let publish = observer.next_publish(&desired_topic).await;
    let desired: Desired = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(desired.generation, 2);
    assert_eq!(desired.slots.len(), 2);

    let (status, view) = server.get(&format!("/api/v1/rollouts/{rollout_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(view["state"], "in_progress");
    assert_eq!(view["devices"]["robot-1"]["outcome"], "pending");
    assert_eq!(view["release"], 1);
    server.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_replays_the_same_rollout_and_refuses_another_body() {
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1", "robot-2"]});
    let (status, first) = server.rollout(&body, Some("airflow-run-7")).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = server.rollout(&body, Some("airflow-run-7")).await;
    assert_eq!((status, &again), (202, &first));
    let (_, list) = server.get("/api/v1/rollouts").await;
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "nothing made twice: {list}"
    );

    let other = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-3"]});
    let (status, body) = server.rollout(&other, Some("airflow-run-7")).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Idempotency-Key"));

    // Generations moved once per device, not twice.
    let saved = std::fs::read(server.dir.path().join("desired/robot-1.json")).unwrap();
    let desired: Desired = serde_json::from_slice(&saved).unwrap();
    assert_eq!(desired.generation, 1);
    server.stop().await;
}

#[tokio::test]
async fn a_rollout_naming_other_bytes_than_the_versions_is_refused_before_anything_is_recorded() {
    let server = TestServer::start().await;
    let record = server.upload_pnet("faces", "1.0.0").await;
    let registered = record["sha256"].as_str().unwrap();
    let other = "ab".repeat(32);
    let body = json!({
        "slot": "faces", "version": "1.0.0", "devices": ["robot-1"], "sha256": other
    });
    let (status, answer) = server.rollout(&body, Some("airflow-run-8")).await;
    assert_eq!(status, 409, "{answer}");
    let message = answer["error"].as_str().unwrap();
    assert!(
        message.contains(registered) && message.contains(&other),
        "{message}"
    );
    let (_, list) = server.get("/api/v1/rollouts").await;
    assert_eq!(list, json!([]), "no rollout recorded");
    assert!(
        !server.dir.path().join("desired/robot-1.json").exists(),
        "no desired document written"
    );

    // The refused request did not use up its idempotency key; the right digest goes through,
    // and its replay answers the same rollout.
    let body = json!({
        "slot": "faces", "version": "1.0.0", "devices": ["robot-1"], "sha256": registered
    });
    let (status, created) = server.rollout(&body, Some("airflow-run-8")).await;
    assert_eq!(status, 202, "{created}");
    let (status, again) = server.rollout(&body, Some("airflow-run-8")).await;
    assert_eq!((status, &again), (202, &created));
    let id = created["rollout_id"].as_str().unwrap();
    let (_, view) = server.get(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(view["sha256"], registered);

    let malformed = json!({
        "slot": "faces", "version": "1.0.0", "devices": ["robot-1"], "sha256": "AB"
    });
    let (status, answer) = server.rollout(&malformed, None).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("sha256"),
        "{answer}"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_rollout_requests_get_clear_errors() {
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    let cases = [
        (
            json!({"slot": "faces", "version": "9.9.9", "devices": ["r1"]}),
            404,
        ),
        (
            json!({"slot": "faces", "version": "1.0.0", "devices": []}),
            422,
        ),
        (
            json!({"slot": "faces", "version": "1.0.0", "selector": "site=nowhere"}),
            422,
        ),
        (json!({"slot": "faces", "version": "1.0.0"}), 400),
        (
            json!({"slot": "faces", "version": "1.0.0", "devices": ["r1"], "selector": "a=b"}),
            400,
        ),
        (
            json!({"slot": "faces", "version": "1.0.0", "devices": ["a/b"]}),
            400,
        ),
        (
            json!({"slot": "faces", "version": "1.0.0", "selector": "site in (lab"}),
            400,
        ),
    ];
    for (body, want) in cases {
        let (status, answer) = server.rollout(&body, None).await;
        assert_eq!(status, want, "{body} → {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, _) = server.get("/api/v1/rollouts/r-000000000000").await;
    assert_eq!(status, 404);
    server.stop().await;
}

#[tokio::test]
async fn the_embedded_broker_refuses_a_rollout_larger_than_it_carries_and_names_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_with(dir, |config| {
        config.mqtt.embedded_max_rollout_devices = 2;
    })
    .await;
    server.upload_pnet("faces", "1.0.0").await;
    let three = json!({"slot": "faces", "version": "1.0.0", "devices": ["r1", "r2", "r3"]});
    let (status, answer) = server.rollout(&three, Some("too-big")).await;
    assert_eq!(status, 422, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.contains("3 devices") && error.contains("at most 2") && error.contains("Mosquitto"),
        "{error}"
    );
    // Nothing was recorded: no rollout, no desired document, the key still free.
    let (_, list) = server.get("/api/v1/rollouts").await;
    assert_eq!(list, json!([]));
    assert!(!server.dir.path().join("desired/r1.json").exists());
    let two = json!({"slot": "faces", "version": "1.0.0", "devices": ["r1", "r2"]});
    let (status, created) = server.rollout(&two, Some("too-big")).await;
    assert_eq!(status, 202, "{created}");
    server.stop().await;
}

#[tokio::test]
async fn a_rollout_naming_200000_devices_by_id_is_read_whole() {
    // 3 MB of device ids: past axum's default body limit of 2 MiB.
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    let devices: Vec<String> = (0..200_000).map(|i| format!("robot-{i:06}")).collect();
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": devices});
    assert!(body.to_string().len() > 2 << 20);
    let (status, answer) = server.rollout(&body, None).await;
    // Parsed, then refused for the embedded broker's size (not for its length).
    assert_eq!(status, 422, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("200000 devices"), "{error}");
    server.stop().await;
}

#[tokio::test]
async fn a_selector_targets_devices_by_the_labels_of_their_info() {
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    let mut robot = MqttClient::connect(server.mqtt_addr(), "robot-fixture").await;
    let lab = info(json!({"site": "lab", "arch": "x86_64"}));
    robot
        .publish(&topic("robot-a", TopicKind::Info), true, lab)
        .await;
    let field = info(json!({"site": "field"}));
    robot
        .publish(&topic("robot-b", TopicKind::Info), true, field)
        .await;
    server
        .wait_for("/api/v1/devices", |v| {
            v.as_array().is_some_and(|a| a.len() == 2)
        })
        .await;

    let body = json!({"slot": "faces", "version": "1.0.0", "selector": "site=lab,arch=x86_64"});
    let (status, created) = server.rollout(&body, None).await;
    assert_eq!(status, 202, "{created}");
    assert_eq!(created["devices"], json!(["robot-a"]));

    let (status, device) = server.get("/api/v1/devices/robot-a").await;
    assert_eq!(status, 200);
    assert_eq!(device["info"]["labels"]["site"], "lab");
    assert_eq!(device["online"], false);
    server.stop().await;
}

fn event(device: &str, rollout: &str, sha: &str, at: &str, stage: Value) -> Vec<u8> {
    let mut event = json!({
        "device": device, "rollout_id": rollout, "slot": "faces", "sha256": sha, "at": at
    });
    for (k, v) in stage.as_object().into_iter().flatten() {
        event[k] = v.clone();
    }
    event.to_string().into_bytes()
}

#[tokio::test]
async fn device_events_fold_into_the_rollout_status() {
    let server = TestServer::start().await;
    let record = server.upload_pnet("faces", "1.0.0").await;
    let sha = record["sha256"].as_str().unwrap();
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1", "robot-2"]});
    let (_, created) = server.rollout(&body, None).await;
    let id = created["rollout_id"].as_str().unwrap();

    let mut robot = MqttClient::connect(server.mqtt_addr(), "robot-1").await;
    let status = json!({"online": true, "agent_version": "0.1.0", "at": "2025-01-01T00:00:00Z"});
    robot
        .publish(
            &topic("robot-1", TopicKind::Status),
            true,
            status.to_string().into_bytes(),
        )
        .await;
    let events = topic("robot-1", TopicKind::Events);
    let bench = json!({"stage": "benchmarked", "runs": 20, "p50_ms": 1.0, "p99_ms": 2.0,
                       "mean_ms": 1.2, "passed": true});
    for (at, stage) in [
        ("2025-01-01T00:00:01Z", json!({"stage": "received"})),
        ("2025-01-01T00:00:02Z", bench),
        ("2025-01-01T00:00:02Z", json!({"stage": "received"})), // a late, out-of-order stage
        (
            "2025-01-01T00:00:03Z",
            json!({"stage": "active", "swap_micros": 40}),
        ),
    ] {
        robot
            .publish(&events, false, event("robot-1", id, sha, at, stage))
            .await;
    }
    // A duplicate, another rollout's event and malformed JSON change nothing.
    let active = json!({"stage": "active", "swap_micros": 40});
    let dup = event("robot-1", id, sha, "2025-01-01T00:00:03Z", active.clone());
    robot.publish(&events, false, dup).await;
    let foreign = event(
        "robot-1",
        "r-ffffffffffff",
        sha,
        "2025-01-01T00:00:09Z",
        json!({"stage": "failed", "message": "x"}),
    );
    robot.publish(&events, false, foreign).await;
    robot.publish(&events, false, b"{not json".to_vec()).await;
    let rejected =
        json!({"stage": "rejected", "reason": "gate_missed", "message": "p99 over budget"});
    let robot2 = event("robot-2", id, sha, "2025-01-01T00:00:04Z", rejected);
    robot
        .publish(&topic("robot-2", TopicKind::Events), false, robot2)
        .await;

    let path = format!("/api/v1/rollouts/{id}");
    let view = server.wait_for(&path, |v| v["state"] == "completed").await;
    assert_eq!(
        view["summary"],
        json!({"pending": 0, "in_progress": 0, "active": 1, "rejected": 1, "failed": 0})
    );
    let one = &view["devices"]["robot-1"];
    assert_eq!(one["outcome"], "active");
    assert_eq!(one["stage"], "active");
    assert_eq!(one["bench"]["p99_ms"], 2.0);
    assert_eq!(one["history"].as_array().unwrap().len(), 4, "{one}");
    let two = &view["devices"]["robot-2"];
    assert_eq!(
        (&two["outcome"], &two["reason"]),
        (&json!("rejected"), &json!("gate_missed"))
    );
    assert_eq!(two["message"], "p99 over budget");

    let device = server
        .wait_for("/api/v1/devices/robot-1", |d| d["online"] == true)
        .await;
    assert_eq!(device["status"]["agent_version"], "0.1.0");
    server.stop().await;
}

/// Waves are published after the request is answered, by one task in order: a device's
/// newer document is never overtaken by an older one, live or retained.
#[tokio::test]
async fn a_superseding_rollout_right_after_another_leaves_every_device_its_newest_document() {
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    server.upload_pnet("faces", "2.0.0").await;
    // Both waves stay inside the embedded broker's window of unacknowledged messages to one
    // subscriber (100): past it, rumqttd holds back the tail for a wildcard subscriber.
    let devices: Vec<String> = (0..40).map(|i| format!("robot-{i:02}")).collect();
    let wildcard = botfleet_protocol::Topics::default().all_devices(TopicKind::Desired);
    let mut live = MqttClient::connect(server.mqtt_addr(), "live").await;
    live.subscribe(&wildcard).await;

    let all = json!({"waves": [{"percent": 100}]});
    let first = json!({"slot": "faces", "version": "1.0.0", "devices": devices,
        "strategy": all});
    assert_eq!(server.rollout(&first, None).await.0, 202);
    let second = json!({"slot": "faces", "version": "2.0.0", "devices": devices,
        "strategy": all, "supersede": true});
    let (status, created) = server.rollout(&second, None).await;
    assert_eq!(status, 202, "{created}");

    let generation = |payload: &[u8]| {
        serde_json::from_slice::<Desired>(payload)
            .unwrap()
            .generation
    };
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    while newest.len() < devices.len() || newest.values().any(|&g| g < 2) {
        let publish = live.next_publish_matching(&wildcard).await;
        let device = publish.topic.split('/').rev().nth(1).unwrap().to_owned();
        let seen = generation(&publish.payload);
        let before = newest.insert(device.clone(), seen).unwrap_or(0);
        assert!(
            seen >= before,
            "{device}: generation {seen} published after {before}"
        );
    }
    // What a robot connecting now is handed: its newest document.
    let mut late = MqttClient::connect(server.mqtt_addr(), "late").await;
    late.subscribe(&wildcard).await;
    for _ in &devices {
        let publish = late.next_publish_matching(&wildcard).await;
        assert!(publish.retain, "{}", publish.topic);
        assert_eq!(generation(&publish.payload), 2, "{}", publish.topic);
    }
    server.stop().await;
}

#[tokio::test]
async fn desired_documents_are_published_again_after_a_restart_and_generations_keep_growing() {
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1"]});
    assert_eq!(server.rollout(&body, None).await.0, 202);
    let dir = server.stop().await;

    // A fresh embedded broker holds no retained messages: the server publishes them again.
    let server = TestServer::start_in(dir).await;
    let mut observer = MqttClient::connect(server.mqtt_addr(), "observer").await;
    let desired_topic = topic("robot-1", TopicKind::Desired);
    observer.subscribe(&desired_topic).await;
    let publish = observer.next_publish(&desired_topic).await;
    let desired: Desired = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(desired.generation, 1);

    // The rollout survived the restart and still owns robot-1's slot.
    let (status, refused) = server.rollout(&body, None).await;
    assert_eq!(status, 409, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("supersede"));
    let (_, list) = server.get("/api/v1/rollouts").await;
    assert_eq!(list[0]["state"], "in_progress", "{list}");

    let mut body = body;
    body["supersede"] = json!(true);
    assert_eq!(server.rollout(&body, None).await.0, 202);
    let (_, list) = server.get("/api/v1/rollouts").await;
    assert_eq!(list[0]["state"], "superseded", "{list}");
    let publish = observer.next_publish(&desired_topic).await;
    let desired: Desired = serde_json::from_slice(&publish.payload).unwrap();
    assert_eq!(desired.generation, 2);
    server.stop().await;
}

#[tokio::test]
async fn metrics_count_rollouts_by_state_and_the_api_describes_itself() {
    let server = TestServer::start().await;
    server.upload_pnet("faces", "1.0.0").await;
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1", "robot-2"]});
    let (_, created) = server.rollout(&body, None).await;
    let id = created["rollout_id"].as_str().unwrap();
    let paused = server.post(&format!("/api/v1/rollouts/{id}/pause")).await;
    assert_eq!(paused["state"], "paused");

    let text = reqwest::get(format!("{}/metrics", server.running.base_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("botfleet_rollouts{state=\"paused\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("botfleet_rollouts{state=\"in_progress\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("botfleet_rollout_devices{outcome=\"pending\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE botfleet_events_total counter"),
        "{text}"
    );

    // Pausing twice is refused with the reason; an unknown rollout is a 404.
    let again = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/rollouts/{id}/pause",
            server.running.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 409);
    let (status, _) = server.get("/api/v1/rollouts/r-000000000000").await;
    assert_eq!(status, 404);

    let (status, doc) = server.get("/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/api/v1/rollouts/{id}/rollback"]["post"].is_object());
    server.stop().await;
}

#[tokio::test]
async fn the_engine_a_robot_chose_and_serves_shows_in_the_rollout_the_device_and_the_metrics() {
    let server = TestServer::start().await;
    let record = server.upload_pnet("faces", "1.0.0").await;
    let sha = record["sha256"].as_str().unwrap();
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-1"]});
    let (_, created) = server.rollout(&body, None).await;
    let id = created["rollout_id"].as_str().unwrap();

    let mut robot = MqttClient::connect(server.mqtt_addr(), "robot-1").await;
    let events = topic("robot-1", TopicKind::Events);
    let bench = json!({"stage": "benchmarked", "runs": 20, "p50_ms": 1.0, "p99_ms": 1.4,
        "mean_ms": 1.1, "passed": true, "incumbent_p99_ms": 9.0, "incumbent_engine": "tract",
        "engine": "onnxruntime-cuda", "engines": [
            {"engine": "onnxruntime-cuda", "load_ms": 900, "p50_ms": 1.0, "p99_ms": 1.4,
             "passed": true},
            {"engine": "tract", "load_ms": 120, "p50_ms": 8.0, "p99_ms": 9.1, "passed": true}]});
    for (at, stage) in [
        ("2025-01-01T00:00:01Z", bench),
        (
            "2025-01-01T00:00:02Z",
            json!({"stage": "active", "swap_micros": 40}),
        ),
    ] {
        robot
            .publish(&events, false, event("robot-1", id, sha, at, stage))
            .await;
    }
    let status = json!({"online": true, "agent_version": "0.2.0", "at": "2025-01-01T00:00:03Z",
        "active": {"faces": {"name": "mtcnn-pnet", "version": "1.0.0", "release": 1,
            "sha256": sha, "since": "2025-01-01T00:00:02Z", "engine": "onnxruntime-cuda"}}});
    robot
        .publish(
            &topic("robot-1", TopicKind::Status),
            true,
            status.to_string().into_bytes(),
        )
        .await;

    let path = format!("/api/v1/rollouts/{id}");
    let view = server
        .wait_for(&path, |v| {
            v["devices"]["robot-1"]["serving_engine"] == "onnxruntime-cuda"
        })
        .await;
    let one = &view["devices"]["robot-1"];
    assert_eq!(one["engine"], "onnxruntime-cuda");
    assert_eq!(one["bench"]["engines"][1]["engine"], "tract");
    assert_eq!(one["bench"]["engines"][1]["p99_ms"], 9.1);

    let device = server
        .wait_for("/api/v1/devices/robot-1", |d| d["online"] == true)
        .await;
    assert_eq!(device["serving_engines"]["faces"], "onnxruntime-cuda");
    let latest = &device["benchmarks"]["faces"];
    assert_eq!(latest["rollout_id"], id);
    assert_eq!(latest["report"]["engines"][0]["load_ms"], 900);

    let text = reqwest::get(format!("{}/metrics", server.running.base_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("botfleet_devices_engine{slot=\"faces\",engine=\"onnxruntime-cuda\"} 1"),
        "{text}"
    );
    server.stop().await;
}
