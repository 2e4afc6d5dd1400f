//! Channels through the embedded broker, with devices played by MQTT clients: who a
//! channel rollout reaches, the pin it leaves, robots that join or change labels later,
//! a group held to a version, a rollback, and all of it across a restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use botfleet_protocol::TopicKind;
use botfleet_protocol::messages::Desired;
use common::{MqttClient, TestServer, info, topic};
use serde_json::{Value, json};

const SLOT: &str = "faces";

/// A fleet of played devices: one MQTT session that publishes for any of them, and one
/// that watches their desired documents.
struct Played {
    robot: MqttClient,
    observer: MqttClient,
    public_key: String,
}

impl Played {
    async fn connect(server: &TestServer) -> Self {
        let robot = MqttClient::connect(server.mqtt_addr(), "robots").await;
        let mut observer = MqttClient::connect(server.mqtt_addr(), "observer").await;
        observer.subscribe("botfleet/v1/devices/+/desired").await;
        Self {
            robot,
            observer,
            public_key: server.running.public_key(),
        }
    }

    /// `device` reports its labels (a robot joining, or relabelled on the robot).
    async fn join(&mut self, device: &str, labels: Value) {
        self.robot
            .publish(&topic(device, TopicKind::Info), true, info(labels))
            .await;
    }

    /// `device` reports the model of `rollout` active.
    async fn activate(&mut self, device: &str, rollout: &str, sha: &str) {
        let event = json!({
            "device": device, "rollout_id": rollout, "slot": SLOT, "sha256": sha,
            "at": jiff::Timestamp::now(), "stage": "active", "swap_micros": 40
        });
        self.robot
            .publish(
                &topic(device, TopicKind::Events),
                false,
                event.to_string().into_bytes(),
            )
            .await;
    }

    /// The next desired document published for `device` (others are skipped).
    async fn desired(&mut self, device: &str) -> Desired {
        let wanted = topic(device, TopicKind::Desired);
        loop {
            let publish = self
                .observer
                .next_publish_matching("botfleet/v1/devices/+/desired")
                .await;
            if publish.topic == wanted {
                return serde_json::from_slice(&publish.payload).unwrap();
            }
        }
    }

    /// The version the next desired document for `device` names in the slot, from its
    /// signed manifest checked as a robot checks it.
    async fn told(&mut self, device: &str) -> String {
        let doc = self.desired(device).await;
        self.version(&doc)
    }

    fn version(&self, doc: &Desired) -> String {
        let model = &doc.slots[&SLOT.parse().unwrap()];
        let record = json!({"signed_manifest": model.manifest});
        common::verify(&record, &self.public_key).version
    }
}

async fn wait_devices(server: &TestServer, count: usize) {
    server
        .wait_for("/api/v1/devices", |v| {
            v.as_array().is_some_and(|a| a.len() == count)
        })
        .await;
}

/// Rolls `version` out to channel `stable` and plays every targeted device taking it.
async fn roll_out_to_stable(
    server: &TestServer,
    fleet: &mut Played,
    version: &str,
    sha: &str,
) -> String {
    let body = json!({"slot": SLOT, "version": version, "channel": "stable"});
    let (status, created) = server.rollout(&body, None).await;
    assert_eq!(status, 202, "{created}");
    let id = created["rollout_id"].as_str().unwrap().to_owned();
    for device in created["devices"].as_array().unwrap() {
        fleet.activate(device.as_str().unwrap(), &id, sha).await;
    }
    server
        .wait_for("/api/v1/channels/stable", |c| {
            c["pins"][SLOT]["rollout_id"] == id.as_str()
        })
        .await;
    id
}

#[tokio::test]
async fn channels_pin_what_rollouts_complete_and_robots_that_join_later_follow() {
    let server = TestServer::start().await;
    server.upload_pnet(SLOT, "1").await;
    let v2 = server.upload_pnet(SLOT, "2").await["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut fleet = Played::connect(&server).await;
    fleet.join("robot-a", json!({"ring": "stable"})).await;
    fleet
        .join("robot-lab", json!({"ring": "stable", "site": "lab"}))
        .await;
    wait_devices(&server, 2).await;

    // Bad requests are refused with the reason, and make nothing.
    let (status, body) = server
        .put(
            "/api/v1/channels/Stable",
            &json!({"selector": "ring=stable"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server
        .put("/api/v1/channels/stable", &json!({"selector": "ring in ("}))
        .await;
    assert_eq!(
        (status, body["error"].as_str().unwrap().contains("selector")),
        (400, true),
        "{body}"
    );
    let (status, body) = server
        .put(
            "/api/v1/channels/stable",
            &json!({"selector": "ring=stable", "pins": {SLOT: "9"}}),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server
        .rollout(
            &json!({"slot": SLOT, "version": "1", "channel": "nowhere"}),
            None,
        )
        .await;
    assert_eq!(status, 404, "{body}");

    // Created once; the same body again changes nothing.
    let stable = json!({"selector": "ring=stable"});
    assert_eq!(server.put("/api/v1/channels/stable", &stable).await.0, 201);
    let (status, again) = server.put("/api/v1/channels/stable", &stable).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["updated_at"], again["created_at"], "{again}");

    // A group held at release 1: the lab robot follows it, and not the wide channel.
    let lab = json!({"selector": "site=lab", "priority": 10, "pins": {SLOT: "1"}});
    let (status, held) = server.put("/api/v1/channels/lab", &lab).await;
    assert_eq!(status, 201, "{held}");
    assert_eq!(fleet.told("robot-lab").await, "1");

    let first = roll_out_to_stable(&server, &mut fleet, "2", &v2).await;
    let (_, rollout) = server.get(&format!("/api/v1/rollouts/{first}")).await;
    assert_eq!(
        rollout["devices"].as_object().unwrap().len(),
        1,
        "{rollout}"
    );
    assert!(rollout["devices"].get("robot-a").is_some(), "{rollout}");
    assert_eq!(fleet.told("robot-a").await, "2");

    // Devices that follow a channel are the channel's: a rollout by selector is refused.
    let (status, body) = server
        .rollout(
            &json!({"slot": SLOT, "version": "1", "selector": "ring=stable"}),
            None,
        )
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("channel"),
        "{body}"
    );

    // A robot that joins after the rollout gets the channel's model with no rollout.
    fleet.join("robot-new", json!({"ring": "stable"})).await;
    let doc = fleet.desired("robot-new").await;
    assert_eq!(fleet.version(&doc), "2");
    assert!(doc.slots[&SLOT.parse().unwrap()].rollout_id.is_none());

    // The lab robot leaves the lab (its labels change on the robot): it follows stable.
    fleet.join("robot-lab", json!({"ring": "stable"})).await;
    assert_eq!(fleet.told("robot-lab").await, "2");

    // An operator label puts robot-a in the lab group: back to release 1.
    let (status, _) = server
        .put(
            "/api/v1/devices/robot-a/labels",
            &json!({"labels": {"site": "lab"}}),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(fleet.told("robot-a").await, "1");

    let view = server
        .wait_for("/api/v1/channels/stable", |c| {
            c["followers"][SLOT]["desired"] == 2
        })
        .await;
    assert_eq!(view["followers"][SLOT]["devices"], 2, "{view}");
    let listed: Vec<&str> = view["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["robot-lab", "robot-new"]);

    // While a rollout to the channel is live, the channel stays.
    let body = json!({"slot": SLOT, "version": "1", "channel": "stable"});
    let (status, created) = server.rollout(&body, None).await;
    assert_eq!(status, 202, "{created}");
    let live = created["rollout_id"].as_str().unwrap();
    let (status, busy) = server.delete("/api/v1/channels/stable").await;
    assert_eq!(status, 409, "{busy}");
    assert!(busy["error"].as_str().unwrap().contains(live), "{busy}");
    server.post(&format!("/api/v1/rollouts/{live}/abort")).await;
    // Removed, its followers keep what they were told.
    assert_eq!(server.delete("/api/v1/channels/stable").await.0, 204);
    assert_eq!(server.get("/api/v1/channels/stable").await.0, 404);

    // Everything survives a restart: a robot that joins afterwards follows the group.
    let dir = server.stop().await;
    let server = TestServer::start_in(dir).await;
    let mut fleet = Played::connect(&server).await;
    let (_, channels) = server.get("/api/v1/channels").await;
    let names: Vec<&str> = channels
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["lab"]);
    fleet.join("robot-late", json!({"site": "lab"})).await;
    assert_eq!(fleet.told("robot-late").await, "1");
    server.stop().await;
}

#[tokio::test]
async fn rolling_back_a_completed_channel_rollout_moves_the_pin_back_for_later_robots() {
    let server = TestServer::start().await;
    let v1 = server.upload_pnet(SLOT, "1").await["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let v2 = server.upload_pnet(SLOT, "2").await["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut fleet = Played::connect(&server).await;
    fleet.join("robot-a", json!({"ring": "stable"})).await;
    wait_devices(&server, 1).await;
    assert_eq!(
        server
            .put(
                "/api/v1/channels/stable",
                &json!({"selector": "ring=stable"})
            )
            .await
            .0,
        201
    );
    roll_out_to_stable(&server, &mut fleet, "1", &v1).await;
    let second = roll_out_to_stable(&server, &mut fleet, "2", &v2).await;

    // robot-b joins after the second rollout completed.
    fleet.join("robot-b", json!({"ring": "stable"})).await;
    assert_eq!(fleet.told("robot-b").await, "2");
    server
        .post(&format!("/api/v1/rollouts/{second}/rollback"))
        .await;
    let channel = server
        .wait_for("/api/v1/channels/stable", |c| {
            c["pins"][SLOT]["version"] == "1"
        })
        .await;
    assert!(channel["pins"][SLOT].get("previous").is_none(), "{channel}");
    // robot-b joined after the rollout: the channel, not the rollback, takes it back.
    assert_eq!(fleet.told("robot-b").await, "1");
    server.stop().await;
}
