//! Operator labels: set on the server next to the labels a device reports, the operator's
//! winning on a conflict, validated like the agent's, and used by rollout selectors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botfleet_protocol::TopicKind;
use common::{MqttClient, TestServer, topic};
use serde_json::{Value, json};

fn info(labels: Value) -> Vec<u8> {
    json!({"agent_version": "0.1.0", "hostname": "h", "arch": "x86_64", "cpu_cores": 2,
           "memory_total_bytes": 1, "labels": labels})
    .to_string()
    .into_bytes()
}

fn status(online: bool) -> Vec<u8> {
    json!({"online": online, "agent_version": "0.1.0", "at": "2026-01-01T00:00:00Z"})
        .to_string()
        .into_bytes()
}

/// A robot that says hello: retained status and info, as the agent publishes them.
async fn hello(server: &TestServer, id: &str, labels: Value) -> MqttClient {
    let mut robot = MqttClient::connect(server.mqtt_addr(), id).await;
    robot
        .publish(&topic(id, TopicKind::Info), true, info(labels))
        .await;
    robot
        .publish(&topic(id, TopicKind::Status), true, status(true))
        .await;
    robot
}

async fn labels(server: &TestServer, method: &str, id: &str, body: &Value) -> (u16, Value) {
    let url = server.url(&format!("/api/v1/devices/{id}/labels"));
    let request = match method {
        "PUT" => server.http.put(url),
        _ => server.http.patch(url),
    };
    let response = request.json(body).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn operator_labels_win_over_reported_ones_and_pick_the_targets_of_a_rollout() {
    let server = TestServer::start().await;
    let mut robots = Vec::new();
    for id in ["robot-1", "robot-2", "robot-3"] {
        robots.push(hello(&server, id, json!({"ring": "stable", "site": "lab"})).await);
    }
    server
        .wait_for("/api/v1/devices", |v| {
            v.as_array().is_some_and(|all| {
                all.len() == 3
                    && all
                        .iter()
                        .all(|d| d["online"] == true && d["reported_labels"]["ring"] == "stable")
            })
        })
        .await;

    let (status, view) = labels(
        &server,
        "PUT",
        "robot-1",
        &json!({"labels": {"ring": "canary"}}),
    )
    .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["operator_labels"], json!({"ring": "canary"}));
    assert_eq!(
        view["reported_labels"],
        json!({"ring": "stable", "site": "lab"})
    );
    assert_eq!(view["labels"], json!({"ring": "canary", "site": "lab"}));

    let set = json!({"set": {"ring": "canary", "zone": "a"}});
    let (status, view) = labels(&server, "PATCH", "robot-2", &set).await;
    assert_eq!(status, 200, "{view}");
    let (status, view) = labels(&server, "PATCH", "robot-2", &json!({"remove": ["zone"]})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["operator_labels"], json!({"ring": "canary"}));
    let (_, shown) = server.get("/api/v1/devices/robot-2").await;
    assert_eq!(shown["labels"], json!({"ring": "canary", "site": "lab"}));

    server.upload_pnet("faces", "1.0.0").await;
    let body = json!({"slot": "faces", "version": "1.0.0", "selector": "ring=canary"});
    let (status, created) = server.rollout(&body, None).await;
    assert_eq!(status, 202, "{created}");
    assert_eq!(created["devices"], json!(["robot-1", "robot-2"]));

    // The robot reports other labels: the operator's still wins, the rest follow the robot.
    robots[0]
        .publish(
            &topic("robot-1", TopicKind::Info),
            true,
            info(json!({"ring": "beta"})),
        )
        .await;
    let view = server
        .wait_for("/api/v1/devices/robot-1", |v| {
            v["reported_labels"] == json!({"ring": "beta"})
        })
        .await;
    assert_eq!(view["labels"], json!({"ring": "canary"}));

    // Replacing with an empty set hands the key back to the robot.
    let (status, view) = labels(&server, "PUT", "robot-1", &json!({"labels": {}})).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["labels"], json!({"ring": "beta"}));
    server.stop().await;
}

#[tokio::test]
async fn bad_labels_and_unknown_devices_get_a_clear_error_and_change_nothing() {
    let server = TestServer::start().await;
    let _robot = hello(&server, "robot-1", json!({"site": "lab"})).await;
    server
        .wait_for("/api/v1/devices/robot-1", |v| v["online"] == true)
        .await;

    let cases = [
        (
            "PUT",
            "robot-9",
            json!({"labels": {"ring": "canary"}}),
            404,
            "no device robot-9",
        ),
        (
            "PUT",
            "robot-1",
            json!({"labels": {"Ring": "canary"}}),
            400,
            "label key \"Ring\"",
        ),
        (
            "PUT",
            "robot-1",
            json!({"labels": {"ring": "can ary"}}),
            400,
            "label ring: value",
        ),
        (
            "PATCH",
            "robot-1",
            json!({"set": {"a": "1"}, "remove": ["a"]}),
            400,
            "both set and removed",
        ),
        (
            "PATCH",
            "robot-1",
            json!({"remove": ["a=b"]}),
            400,
            "label key \"a=b\"",
        ),
        (
            "PATCH",
            "robot-1",
            json!({"add": {"a": "1"}}),
            400,
            "unknown field",
        ),
        (
            "PUT",
            "robot-1",
            json!({"ring": "canary"}),
            400,
            "unknown field",
        ),
    ];
    for (method, id, body, want, message) in cases {
        let (status, answer) = labels(&server, method, id, &body).await;
        assert_eq!(status, want, "{method} {body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(message), "{method} {body}: {error}");
    }
    let (_, view) = server.get("/api/v1/devices/robot-1").await;
    assert_eq!(view["operator_labels"], json!({}));
    assert_eq!(view["labels"], json!({"site": "lab"}));
    server.stop().await;
}
