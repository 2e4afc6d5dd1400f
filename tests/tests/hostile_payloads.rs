//! Hostile payloads on every topic of a device, through a real Mosquitto, against the real
//! server and a real agent process: oversized (beyond the broker's max packet size),
//! malformed JSON, wrong types, huge strings, deep nesting, binary garbage, a message that
//! claims another device. Nothing crashes, the agent logs what it dropped and keeps
//! serving, and no other device's state changes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::time::Duration;

use botfleet_e2e::process::AgentProcess;
use botfleet_e2e::watch::{mqtt_options, publish_once};
use botfleet_e2e::{BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::messages::Stage;
use botfleet_protocol::{DeviceId, MAX_PACKET_BYTES, TopicKind, Topics};
use common::ROLLOUT_LIMIT;
use rumqttc::{AsyncClient, Event as MqttEvent, Packet, QoS};
use serde_json::{Value, json};

const SLOT: &str = "textline";
const LIMIT: Duration = Duration::from_secs(30);

/// What a compromised robot or a buggy tool could send, each within the packet limit.
fn hostile_payloads(other_device: &str) -> Vec<(&'static str, Vec<u8>)> {
    let garbage: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let huge = "A".repeat(MAX_PACKET_BYTES / 2 - 4096);
    vec![
        ("truncated JSON", br#"{"generation": 1, "slots": {"#.to_vec()),
        ("binary garbage", garbage),
        ("invalid UTF-8", vec![0xff, 0xfe, b'{', 0xc3, 0x28, b'}']),
        ("wrong types", br#"{"generation":"seven","slots":[1],"online":"yes","at":5,"command_id":7,"command":null}"#.to_vec()),
        ("a JSON array", b"[1,2,3]".to_vec()),
        ("JSON null", b"null".to_vec()),
        ("a huge string", format!("{{\"generation\":1,\"slots\":{{}},\"agent_version\":\"{huge}\",\"command_id\":\"{huge}\"}}").into_bytes()),
        ("deep nesting", "[".repeat(MAX_PACKET_BYTES - 4096).into_bytes()),
        ("deep object nesting", format!("{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000)).into_bytes()),
        // Well-formed, but it speaks for another device.
        ("an event claiming another device", json!({
            "device": other_device, "slot": SLOT,
            "sha256": "00".repeat(32), "at": "2026-01-01T00:00:00Z",
            "stage": "failed", "message": "forged"
        }).to_string().into_bytes()),
        ("an unknown command", br#"{"command_id":"c-1","command":"format_disk"}"#.to_vec()),
    ]
}

/// Publishes a payload larger than the broker accepts, from a client that lifted its own
/// limit: the broker must drop it (and the connection), never forward it.
async fn publish_oversized(mqtt_url: &str, topic: String) -> bool {
    let mut options = mqtt_options(mqtt_url, "oversized-publisher").unwrap();
    options.set_max_packet_size(4 * MAX_PACKET_BYTES, 4 * MAX_PACKET_BYTES);
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            false,
            vec![b'{'; 2 * MAX_PACKET_BYTES],
        )
        .await
        .unwrap();
    let acked = tokio::time::timeout(LIMIT, async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    acked.unwrap_or(false)
}

/// Waits until the server's view of `device` satisfies `ready` (it folds messages in order,
/// so a view that shows a message sent after others has been through those too).
async fn until_view(fleet: &Fleet, device: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/api/v1/devices/{device}");
    tokio::time::timeout(LIMIT, async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            if let Ok(view) = fleet.get(&path).await
                && ready(&view)
            {
                return view;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server's view of {device} never got there"))
}

fn serving(view: &Value) -> bool {
    view["status"]["active"][SLOT].is_object()
}

#[tokio::test]
async fn hostile_payloads_on_every_topic_are_dropped_with_a_log_line_and_touch_no_other_device() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let target = fleet.device_id("target");
    let bystander = fleet.device_id("bystander");
    fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.0",
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
                   "gate": {"warmup_runs": 1, "runs": 3}}),
        )
        .await
        .unwrap();

    // The target is the real agent binary (its log is read); the bystander runs in-process.
    let mut config = fleet.agent_config(&target, &[]);
    let inference = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    config.inference.listen = inference;
    let mut target_agent = AgentProcess::spawn(&config, None).await.unwrap();
    let bystander_agent = fleet.start_agent(&bystander).await.unwrap();
    for device in [&target, &bystander] {
        let mut watch = fleet.watch_events(device).await.unwrap();
        let rollout = fleet.roll_out(SLOT, "1.0", &[device]).await.unwrap();
        let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
        assert!(
            matches!(events.last().unwrap().stage, Stage::Active { .. }),
            "{device}: {}",
            describe(&events)
        );
    }
    let bystander_before = until_view(&fleet, &bystander, serving).await;
    let target_before = until_view(&fleet, &target, serving).await;
    target_agent.drain_lines();

    let topics = Topics::new(fleet.prefix.clone()).unwrap();
    let target_id = DeviceId::new(target.clone()).unwrap();
    for kind in TopicKind::ALL {
        let topic = topics.device(&target_id, kind);
        for (what, payload) in hostile_payloads(&bystander) {
            publish_once(&fleet.mqtt_url, topic.clone(), payload, false)
                .await
                .unwrap_or_else(|e| panic!("{what} on {topic}: {e}"));
        }
        assert!(
            !publish_oversized(&fleet.mqtt_url, topic.clone()).await,
            "the broker accepted an oversized packet on {topic}"
        );
    }

    // The agent said what it dropped, and serves on.
    for line in [
        "malformed desired state ignored",
        "malformed command ignored",
    ] {
        target_agent.wait_for_line(line, LIMIT).await.unwrap();
    }
    let ready = reqwest::get(format!("http://{inference}/v2/models/{SLOT}/ready"))
        .await
        .unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let (status, answer) = fleet
        .infer(
            &bystander_agent,
            SLOT,
            &json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                                "data": vec![0.5f32; 3 * 48 * 192]}]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");

    // A well-formed message after all of them: once the server shows it, it has been
    // through every hostile one, and it is still folding.
    let marker = fleet.device_id("marker");
    let marker_topic = topics.device(&DeviceId::new(marker.clone()).unwrap(), TopicKind::Status);
    let marker_status = json!({"online": true, "agent_version": "0", "at": "2026-01-01T00:00:00Z"});
    publish_once(
        &fleet.mqtt_url,
        marker_topic,
        marker_status.to_string().into_bytes(),
        false,
    )
    .await
    .unwrap();
    until_view(&fleet, &marker, |_| true).await;

    let bystander_after = fleet
        .get(&format!("/api/v1/devices/{bystander}"))
        .await
        .unwrap();
    assert_eq!(
        bystander_after["status"]["active"], bystander_before["status"]["active"],
        "the bystander's state changed"
    );
    let target_after = fleet
        .get(&format!("/api/v1/devices/{target}"))
        .await
        .unwrap();
    assert_eq!(
        target_after["status"]["active"], target_before["status"]["active"],
        "a malformed status replaced the target's state"
    );
    assert!(target_after["status"]["active"][SLOT].is_object());

    target_agent.kill().await.unwrap();
    fleet.shutdown(vec![bystander_agent]).await.unwrap();
}
