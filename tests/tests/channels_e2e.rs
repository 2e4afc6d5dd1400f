//! Channels with real agents through Mosquitto: a rollout to a channel, held on a robot
//! across a server and an agent restart, pins the channel once it completes; a robot that
//! joins afterwards serves the channel's model with no rollout of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use botfleet_e2e::{Agent, BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::messages::Stage;
use common::{ROLLOUT_LIMIT, hold, local_api};
use serde_json::json;

const SLOT: &str = "digits";

async fn push(fleet: &Fleet, version: &str, file: &str) {
    fleet
        .push_model(
            &fixture(file),
            json!({"slot": SLOT, "name": "digits-cnn", "version": version,
                   "gate": {"warmup_runs": 1, "runs": 3}}),
        )
        .await
        .unwrap();
}

/// The version answering on `agent`.
async fn serving(fleet: &Fleet, agent: &Agent) -> String {
    let (request, _) = common::digits_samples().swap_remove(0);
    let (status, answer) = fleet.infer(agent, SLOT, &request).await.unwrap();
    assert!(status.is_success(), "{status}: {answer}");
    answer["model_version"].as_str().unwrap().to_owned()
}

async fn roll_out_to(fleet: &Fleet, channel: &str, version: &str) -> String {
    let body = json!({"slot": SLOT, "version": version, "channel": channel});
    let (status, answer) = fleet.post_rollout(&body, None).await.unwrap();
    assert_eq!(status, 202, "{answer}");
    answer["rollout_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_robot_that_joins_a_channel_later_converges_and_it_all_survives_restarts() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    push(&fleet, "1.0.0", "digits_cnn.onnx").await;
    push(&fleet, "1.1.0-int8", "digits_cnn.int8_ptq.onnx").await;
    let (status, channel) = fleet
        .send(
            reqwest::Method::PUT,
            "/api/v1/channels/stable",
            &json!({"selector": "ring=stable"}),
        )
        .await
        .unwrap();
    assert_eq!(status, 201, "{channel}");

    let first = fleet.device_id("first");
    let config = fleet.agent_config(&first, &[("ring", "stable")]);
    let agent = fleet.start_agent_with(config.clone()).await.unwrap();
    let mut watch = fleet.watch_events(&first).await.unwrap();
    fleet
        .wait_for("/api/v1/devices", ROLLOUT_LIMIT, |list| {
            list.as_array()
                .unwrap()
                .iter()
                .any(|d| d["device_id"] == first.as_str() && d["labels"]["ring"] == "stable")
        })
        .await
        .unwrap();
    let one = roll_out_to(&fleet, "stable", "1.0.0").await;
    fleet
        .wait_rollout(&one, ROLLOUT_LIMIT, |v| v["state"] == "completed")
        .await
        .unwrap();
    assert_eq!(serving(&fleet, &agent).await, "1.0.0");

    // The robot holds the next swap: the rollout waits, deferred, across both restarts.
    hold(&agent, "nav", 300).await;
    let two = roll_out_to(&fleet, "stable", "1.1.0-int8").await;
    fleet
        .wait_rollout(&two, ROLLOUT_LIMIT, |v| {
            v["devices"][&first]["outcome"] == "deferred"
        })
        .await
        .unwrap();
    let fleet = fleet.restart_server().await.unwrap();
    let view = fleet.get(&format!("/api/v1/rollouts/{two}")).await.unwrap();
    assert_eq!(
        (&view["state"], &view["devices"][&first]["outcome"]),
        (&json!("in_progress"), &json!("deferred")),
        "{view}"
    );
    let stable = fleet.get("/api/v1/channels/stable").await.unwrap();
    assert_eq!(stable["pins"][SLOT]["version"], "1.0.0", "{stable}");
    assert_eq!(stable["rollouts"], json!([two]), "{stable}");

    agent.running.shutdown().await;
    let agent = fleet.start_agent_with(config).await.unwrap();
    watch
        .until_event(ROLLOUT_LIMIT, |e| matches!(e.stage, Stage::Deferred { .. }))
        .await
        .unwrap();
    assert_eq!(serving(&fleet, &agent).await, "1.0.0");
    let (status, _) = local_api(reqwest::Method::DELETE, &agent, "/v1/holds/nav", None).await;
    assert_eq!(status, 204);
    let events = watch.until_terminal(&two, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        events
            .last()
            .is_some_and(|e| matches!(e.stage, Stage::Active { .. })),
        "{}",
        describe(&events)
    );
    fleet
        .wait_for("/api/v1/channels/stable", ROLLOUT_LIMIT, |c| {
            c["pins"][SLOT]["version"] == "1.1.0-int8"
        })
        .await
        .unwrap();

    // A robot that joins now gets the channel's model, with no rollout of its own.
    let late = fleet.device_id("late");
    let joined = fleet
        .start_agent_with(fleet.agent_config(&late, &[("ring", "stable")]))
        .await
        .unwrap();
    let stable = fleet
        .wait_for("/api/v1/channels/stable", ROLLOUT_LIMIT, |c| {
            c["followers"][SLOT]["active"] == 2
        })
        .await
        .unwrap();
    assert_eq!(stable["followers"][SLOT]["devices"], 2, "{stable}");
    assert_eq!(serving(&fleet, &joined).await, "1.1.0-int8");
    assert_eq!(serving(&fleet, &agent).await, "1.1.0-int8");
    let rollouts = fleet.get("/api/v1/rollouts").await.unwrap();
    assert_eq!(rollouts.as_array().unwrap().len(), 2, "{rollouts}");
    fleet.shutdown(vec![agent, joined]).await.unwrap();
}
