//! A server killed mid-rollout (its tasks dropped, nothing saved on the way out) comes back
//! from its database where it was: same wave, nobody commanded twice, events kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botfleet_protocol::TopicKind;
use botfleet_protocol::messages::Desired;
use common::{MqttClient, TestServer, topic};
use serde_json::{Value, json};

fn event(device: &str, rollout: &str, sha: &str, at: &str, stage: Value) -> Vec<u8> {
    let mut event = json!({
        "device": device, "rollout_id": rollout, "slot": "faces", "sha256": sha, "at": at
    });
    for (k, v) in stage.as_object().into_iter().flatten() {
        event[k] = v.clone();
    }
    event.to_string().into_bytes()
}

/// Drops the server without a shutdown: tasks are aborted where they stand, nothing is
/// saved on the way out. Returns once the aborted tasks let go of the database file (the
/// operating system does that at once for a killed process).
async fn kill(server: TestServer) -> tempfile::TempDir {
    let TestServer { running, dir, http } = server;
    // Open HTTP connections hold the API (and its database handle) until they close.
    drop(http);
    drop(running);
    let db = dir.path().join("botfleet.redb");
    tokio::time::timeout(common::WAIT, async {
        while redb::Database::create(&db).is_err() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the killed server's tasks never let go of the database");
    dir
}

fn generation(server: &TestServer, device: &str) -> Option<u64> {
    let path = server.dir.path().join(format!("desired/{device}.json"));
    let bytes = std::fs::read(path).ok()?;
    Some(
        serde_json::from_slice::<Desired>(&bytes)
            .unwrap()
            .generation,
    )
}

#[tokio::test]
async fn a_killed_server_resumes_its_rollout_without_commanding_anyone_twice() {
    let server = TestServer::start().await;
    let record = server.upload_pnet("faces", "1.0.0").await;
    let sha = record["sha256"].as_str().unwrap().to_owned();
    let devices = ["robot-1", "robot-2", "robot-3", "robot-4"];
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": devices,
        "strategy": {"waves": [{"count": 1}, {"percent": 100}]}});
    let (status, created) = server.rollout(&body, Some("run-1")).await;
    assert_eq!(status, 202, "{created}");
    let id = created["rollout_id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/rollouts/{id}");
    let (_, view) = server.get(&path).await;
    let canary = view["devices"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, d)| d["wave"] == 0)
        .map(|(name, _)| name.clone())
        .unwrap();
    assert_eq!(generation(&server, &canary), Some(1));
    let waiting: Vec<&str> = devices.into_iter().filter(|d| *d != canary).collect();
    assert!(waiting.iter().all(|d| generation(&server, d).is_none()));

    // The canary reports a first stage; then the server dies.
    let mut robot = MqttClient::connect(server.mqtt_addr(), &canary).await;
    let events = topic(&canary, TopicKind::Events);
    let received = event(
        &canary,
        &id,
        &sha,
        "2026-01-01T00:00:01Z",
        json!({"stage": "received"}),
    );
    robot.publish(&events, false, received).await;
    server
        .wait_for(&path, |v| v["devices"][&canary]["outcome"] == "in_progress")
        .await;
    // An operator pauses it; the answer comes once the database has it (events included).
    let paused = server.post(&format!("{path}/pause")).await;
    assert_eq!(paused["state"], "paused", "{paused}");
    let dir = kill(server).await;

    let server = TestServer::start_in(dir).await;
    let (_, view) = server.get(&path).await;
    assert_eq!(view["state"], "paused", "{view}");
    assert_eq!(view["wave"], 0, "{view}");
    assert_eq!(
        view["devices"][&canary]["history"][0]["stage"], "received",
        "the event folded before the kill is still there: {view}"
    );
    assert_eq!(generation(&server, &canary), Some(1), "not commanded again");
    assert!(waiting.iter().all(|d| generation(&server, d).is_none()));

    // The same pipeline retry after the restart answers the same rollout.
    let (status, again) = server.rollout(&body, Some("run-1")).await;
    assert_eq!((status, &again), (202, &created));

    // Resumed on the new server: the next wave starts, once; the canary still converges.
    let resumed = server.post(&format!("{path}/resume")).await;
    assert_eq!(resumed["state"], "in_progress", "{resumed}");
    let view = server.wait_for(&path, |v| v["wave"] == 1).await;
    assert_eq!(view["summary"]["pending"], 3, "{view}");
    let mut robot = MqttClient::connect(server.mqtt_addr(), &canary).await;
    let active = event(
        &canary,
        &id,
        &sha,
        "2026-01-01T00:00:02Z",
        json!({"stage": "active", "swap_micros": 10}),
    );
    robot.publish(&events, false, active).await;
    server
        .wait_for(&path, |v| v["devices"][&canary]["outcome"] == "active")
        .await;
    assert_eq!(generation(&server, &canary), Some(1));
    for device in &waiting {
        assert_eq!(generation(&server, device), Some(1), "{device}");
    }
    server.stop().await;
}

fn hello_info(labels: Value) -> Vec<u8> {
    json!({"agent_version": "0.1.0", "hostname": "h", "arch": "x86_64", "cpu_cores": 2,
           "memory_total_bytes": 1, "labels": labels})
    .to_string()
    .into_bytes()
}

fn presence(online: bool) -> Vec<u8> {
    json!({"online": online, "agent_version": "0.1.0", "at": "2026-01-01T00:00:00Z"})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn models_devices_with_their_labels_and_presence_and_rollouts_survive_a_kill() {
    let server = TestServer::start().await;
    let record = server.upload_pnet("faces", "1.0.0").await;
    for (id, online) in [("robot-1", true), ("robot-2", false)] {
        let mut robot = MqttClient::connect(server.mqtt_addr(), id).await;
        let info = hello_info(json!({"site": "lab"}));
        robot.publish(&topic(id, TopicKind::Info), true, info).await;
        let status = presence(online);
        robot
            .publish(&topic(id, TopicKind::Status), true, status)
            .await;
    }
    server
        .wait_for("/api/v1/devices", |v| {
            v.as_array().is_some_and(|all| {
                all.len() == 2 && all.iter().all(|d| d["reported_labels"]["site"] == "lab")
            })
        })
        .await;
    // The label change is stored before its answer, with every device change pending.
    let response = server
        .http
        .put(server.url("/api/v1/devices/robot-1/labels"))
        .json(&json!({"labels": {"ring": "canary"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body = json!({"slot": "faces", "version": "1.0.0", "selector": "ring=canary"});
    let (status, created) = server.rollout(&body, None).await;
    assert_eq!(status, 202, "{created}");
    assert_eq!(created["devices"], json!(["robot-1"]));
    let (_, devices_before) = server.get("/api/v1/devices").await;
    let dir = kill(server).await;

    // The embedded broker died with the server: nothing retained can refill the registry,
    // what shows now comes from the database.
    let server = TestServer::start_in(dir).await;
    let (_, models) = server.get("/api/v1/models").await;
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    assert_eq!(models[0]["signed_manifest"], record["signed_manifest"]);
    let (_, again) = server.get("/api/v1/models/faces/1.0.0").await;
    assert_eq!(again["sha256"], record["sha256"]);
    let (_, devices) = server.get("/api/v1/devices").await;
    assert_eq!(devices, devices_before);
    let (_, one) = server.get("/api/v1/devices/robot-1").await;
    assert_eq!(one["online"], true, "{one}");
    assert_eq!(one["operator_labels"], json!({"ring": "canary"}));
    assert_eq!(one["labels"], json!({"ring": "canary", "site": "lab"}));
    let (_, two) = server.get("/api/v1/devices/robot-2").await;
    assert_eq!(two["online"], false, "{two}");
    let id = created["rollout_id"].as_str().unwrap();
    let (status, rollout) = server.get(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(status, 200, "{rollout}");
    assert!(rollout["devices"]["robot-1"].is_object(), "{rollout}");
    // The restored labels still pick targets.
    let (status, conflict) = server.rollout(&body, None).await;
    assert_eq!(
        status, 409,
        "robot-1 is still owned by the live rollout: {conflict}"
    );
    // The artifact is still served.
    let url = record["artifact_url"].as_str().unwrap();
    let path = &url[url.find("/artifacts/").unwrap()..];
    let bytes = server.http.get(server.url(path)).send().await.unwrap();
    assert_eq!(bytes.status().as_u16(), 200);
    server.stop().await;
}
