//! Rollback orders are signed: the operator's rollback reaches the robot as an order signed
//! with the server's manifest key, and a rollback command that is unsigned, signed by a
//! stranger, meant for another robot, expired or naming another model is refused with an
//! event while the current model keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::time::Duration;

use botfleet_e2e::watch::publish_once;
use botfleet_e2e::{Agent, BrokerKind, EventWatch, Fleet, describe, fixture};
use botfleet_protocol::manifest::{Sha256Digest, reference_input};
use botfleet_protocol::messages::{Command, CommandKind, RejectReason, Stage};
use botfleet_protocol::rollback::ROLLBACK_SCHEMA;
use botfleet_protocol::{
    CommandId, DeviceId, ManifestSigner, RollbackOrder, SlotName, TopicKind, Topics,
};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};

const SLOT: &str = "textline";
const REFUSAL_LIMIT: Duration = Duration::from_secs(60);

/// An agent serving "1.1" (the small stateful model) with "1.0" (the text-line classifier)
/// kept as the slot's previous model.
struct Setup {
    fleet: Fleet,
    agent: Agent,
    device: String,
    watch: EventWatch,
    v1: Value,
    second_rollout: String,
}

async fn setup() -> Setup {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let agent = fleet.start_agent(&device).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    let gate = json!({"warmup_runs": 1, "runs": 3});
    let v1 = fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.0",
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
                   "gate": gate}),
        )
        .await
        .unwrap();
    let r1 = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
    watch.until_terminal(&r1, ROLLOUT_LIMIT).await.unwrap();
    fleet
        .push_model(
            &fixture("stateful_ema.onnx"),
            json!({"slot": SLOT, "name": "stand-in", "version": "1.1", "gate": gate}),
        )
        .await
        .unwrap();
    let second_rollout = fleet.roll_out(SLOT, "1.1", &[&device]).await.unwrap();
    let events = watch
        .until_terminal(&second_rollout, ROLLOUT_LIMIT)
        .await
        .unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );
    // An operator's rollback sends a signed order to devices the server knows are active;
    // wait until it has folded this one's event.
    fleet
        .wait_rollout(&second_rollout, ROLLOUT_LIMIT, |v| {
            v["devices"][&device]["outcome"] == "active"
        })
        .await
        .unwrap();
    Setup {
        fleet,
        agent,
        device,
        watch,
        v1,
        second_rollout,
    }
}

impl Setup {
    fn server_key(&self) -> ManifestSigner {
        let text =
            std::fs::read_to_string(self.fleet.dir.path().join("server/signing.key")).unwrap();
        ManifestSigner::parse(&text).unwrap()
    }

    /// An order, valid for an hour, to put 1.0 back on `device`.
    fn order_for(&self, device: &str) -> RollbackOrder {
        let now = jiff::Timestamp::now();
        RollbackOrder {
            schema: ROLLBACK_SCHEMA,
            device: DeviceId::new(device).unwrap(),
            slot: SlotName::new(SLOT).unwrap(),
            to_sha256: self.v1["sha256"].as_str().unwrap().parse().unwrap(),
            to_release: self.v1["manifest"]["release"].as_u64().unwrap_or(1),
            reason: Some("operator says so".into()),
            issued_at: now,
            expires_at: now + jiff::SignedDuration::from_secs(3600),
        }
    }

    async fn send(&self, id: &str, kind: CommandKind) {
        let topics = Topics::new(self.fleet.prefix.clone()).unwrap();
        let command = Command {
            command_id: CommandId::new(id).unwrap(),
            kind,
        };
        publish_once(
            &self.fleet.mqtt_url,
            topics.device(
                &DeviceId::new(self.device.clone()).unwrap(),
                TopicKind::Commands,
            ),
            serde_json::to_vec(&command).unwrap(),
            false,
        )
        .await
        .unwrap();
    }

    /// Sends `kind` as command `id` and returns the refusal the agent reports for it.
    async fn refused(&mut self, id: &str, kind: CommandKind) -> (RejectReason, String) {
        self.send(id, kind).await;
        let event = self
            .watch
            .until_event(REFUSAL_LIMIT, |e| {
                matches!(&e.stage, Stage::Rejected { message, .. } if message.contains(id))
                    || matches!(e.stage, Stage::RolledBack { .. })
            })
            .await
            .unwrap();
        assert!(event.rollout_id.is_none(), "{event:?}");
        match event.stage {
            Stage::Rejected { reason, message } => (reason, message),
            other => panic!("command {id} was carried out: {other:?}"),
        }
    }

    /// The stand-in 1.1 still answers.
    async fn assert_still_serving_1_1(&self) {
        let request = json!({"inputs": [
            {"name": "input", "shape": [1, 8], "datatype": "FP32", "data": reference_input(1, 8)},
            {"name": "state", "shape": [1, 16], "datatype": "FP32", "data": vec![0.0f32; 16]},
        ]});
        let (status, answer) = self.fleet.infer(&self.agent, SLOT, &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model_version"], "1.1");
    }

    async fn assert_serving_1_0(&self) {
        let request = json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                                          "data": reference_input(7, 3 * 48 * 192)}]});
        let (status, answer) = self.fleet.infer(&self.agent, SLOT, &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model_version"], "1.0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_untrusted_misaddressed_expired_or_mismatched_rollbacks_are_refused_and_the_model_keeps_serving()
 {
    let mut s = setup().await;
    let key = s.server_key();

    // The old unsigned form: anyone who can write the commands topic could send it.
    let (reason, message) = s
        .refused(
            "c-unsigned",
            CommandKind::Rollback {
                slot: SlotName::new(SLOT).unwrap(),
                reason: Some("trust me".into()),
            },
        )
        .await;
    assert_eq!(reason, RejectReason::Untrusted, "{message}");
    assert!(message.contains("no signed rollback order"), "{message}");
    s.assert_still_serving_1_1().await;

    // Signed by a key the robot does not trust.
    let stranger = ManifestSigner::from_secret([0x5a; 32]);
    let order = stranger.sign_rollback(&s.order_for(&s.device)).unwrap();
    let (reason, message) = s
        .refused("c-stranger", CommandKind::SignedRollback { order })
        .await;
    assert_eq!(reason, RejectReason::Untrusted, "{message}");
    assert!(
        message.contains("no signature by a trusted key"),
        "{message}"
    );
    s.assert_still_serving_1_1().await;

    // A real signature whose payload was altered afterwards.
    let mut order = key.sign_rollback(&s.order_for(&s.device)).unwrap();
    let mut tampered = s.order_for(&s.device);
    tampered.reason = Some("altered".into());
    order.payload = key.sign_rollback(&tampered).unwrap().payload;
    let (reason, message) = s
        .refused("c-tampered", CommandKind::SignedRollback { order })
        .await;
    assert_eq!(reason, RejectReason::Untrusted, "{message}");
    s.assert_still_serving_1_1().await;

    // Signed by the server, for another robot.
    let order = key.sign_rollback(&s.order_for("robot-elsewhere")).unwrap();
    let (reason, message) = s
        .refused("c-other-device", CommandKind::SignedRollback { order })
        .await;
    assert_eq!(reason, RejectReason::Incompatible, "{message}");
    assert!(message.contains("robot-elsewhere"), "{message}");
    s.assert_still_serving_1_1().await;

    // Signed by the server for this robot, but expired: a replay of an old order.
    let mut old = s.order_for(&s.device);
    old.issued_at = "2026-01-01T00:00:00Z".parse().unwrap();
    old.expires_at = "2026-01-02T00:00:00Z".parse().unwrap();
    let order = key.sign_rollback(&old).unwrap();
    let (reason, message) = s
        .refused("c-expired", CommandKind::SignedRollback { order })
        .await;
    assert_eq!(reason, RejectReason::Expired, "{message}");
    assert!(message.contains("expired"), "{message}");
    s.assert_still_serving_1_1().await;

    // Signed and valid, but naming a model the robot did not keep.
    let mut elsewhere = s.order_for(&s.device);
    elsewhere.to_sha256 = Sha256Digest::of(b"a model this robot never had");
    let order = key.sign_rollback(&elsewhere).unwrap();
    let (reason, message) = s
        .refused("c-wrong-model", CommandKind::SignedRollback { order })
        .await;
    assert_eq!(reason, RejectReason::Incompatible, "{message}");
    s.assert_still_serving_1_1().await;

    // The right order still works after all that.
    let order = key.sign_rollback(&s.order_for(&s.device)).unwrap();
    s.send("c-good", CommandKind::SignedRollback { order })
        .await;
    let rollout = s.second_rollout.clone();
    let events = s
        .watch
        .until_terminal(&rollout, ROLLOUT_LIMIT)
        .await
        .unwrap();
    match &events.last().unwrap().stage {
        Stage::RolledBack { to, reason } => {
            assert_eq!(Some(to.to_hex().as_str()), s.v1["sha256"].as_str());
            assert_eq!(reason, "operator says so");
        }
        other => panic!("expected rolled_back, got {other:?}"),
    }
    s.assert_serving_1_0().await;
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_rollback_reaches_the_robot_as_a_signed_order_and_restores_the_previous_model()
{
    let mut s = setup().await;
    let url = format!(
        "{}/api/v1/rollouts/{}/rollback",
        s.fleet.server.base_url(),
        s.second_rollout
    );
    let response = reqwest::Client::new().post(url).send().await.unwrap();
    assert!(
        response.status().is_success(),
        "{}",
        response.text().await.unwrap()
    );
    let rollout = s.second_rollout.clone();
    let events = s
        .watch
        .until_terminal(&rollout, ROLLOUT_LIMIT)
        .await
        .unwrap();
    match &events.last().unwrap().stage {
        Stage::RolledBack { to, reason } => {
            assert_eq!(Some(to.to_hex().as_str()), s.v1["sha256"].as_str());
            assert!(reason.contains("rolled back"), "{reason}");
        }
        other => panic!(
            "expected rolled_back, got {other:?} ({})",
            describe(&events)
        ),
    }
    s.assert_serving_1_0().await;
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}
