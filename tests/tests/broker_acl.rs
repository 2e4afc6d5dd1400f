//! The shipped Mosquitto configuration (`deploy/mosquitto/`) keeps every robot in its own
//! topic subtree: proven against a real Mosquitto started with that configuration and the
//! ACL file, with certificates minted by the shipped script.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::path::Path;
use std::time::Duration;

use botfleet_e2e::process::AgentProcess;
use botfleet_e2e::secure_broker::{PREFIX, SecureBroker};
use botfleet_e2e::{fixture, gate_program};
use botfleet_protocol::messages::{Event, Stage};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, Event as MqttEvent, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use serde_json::json;
use tokio::sync::mpsc;

const A: &str = "robot-a";
const B: &str = "robot-b";
const SERVER: &str = "botfleet-server";
const KINDS: [&str; 6] = [
    "status",
    "info",
    "telemetry",
    "events",
    "desired",
    "commands",
];
/// Connecting and one round trip on a busy 2-core machine.
const LIMIT: Duration = Duration::from_secs(20);
const NO_ANSWER: &str = "no answer in time";

fn topic(device: &str, kind: &str) -> String {
    format!("{PREFIX}/devices/{device}/{kind}")
}

/// An MQTT 5 client (so PUBACK carries a reason code) with `identity`'s certificate from
/// `dir`, or none.
fn client(
    broker: &SecureBroker,
    client_id: &str,
    dir: &Path,
    identity: Option<&str>,
) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
    let tls = broker
        .security(dir, identity)
        .unwrap()
        .client_config()
        .unwrap();
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    options.set_keep_alive(Duration::from_secs(30));
    AsyncClient::new(options, 64)
}

/// Connects; the broker's answer or the connection error.
async fn connect(eventloop: &mut EventLoop) -> Result<(), String> {
    tokio::time::timeout(LIMIT, async {
        loop {
            match eventloop.poll().await {
                Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err(NO_ANSWER.to_owned()))
}

async fn connected(broker: &SecureBroker, id: &str, identity: &str) -> (AsyncClient, EventLoop) {
    let (client, mut eventloop) = client(broker, id, &broker.certs(), Some(identity));
    connect(&mut eventloop)
        .await
        .unwrap_or_else(|e| panic!("{id} as {identity}: {e}"));
    (client, eventloop)
}

/// Publishes at QoS 1 and returns the PUBACK's reason.
async fn publish(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    retain: bool,
) -> PubAckReason {
    client
        .publish(
            topic,
            QoS::AtLeastOnce,
            retain,
            format!("{{\"from\":\"{topic}\"}}"),
        )
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, async {
        loop {
            if let MqttEvent::Incoming(Packet::PubAck(ack)) = eventloop.poll().await.unwrap() {
                return ack.reason;
            }
        }
    })
    .await
    .expect("no PUBACK")
}

/// Accepted by the broker (with or without anybody subscribed yet).
fn delivered(reason: &PubAckReason) -> bool {
    matches!(
        reason,
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
    )
}

/// Subscribes to `filters`, waits for the SUBACK, then forwards every delivered topic.
async fn receiver(
    client: &AsyncClient,
    mut eventloop: EventLoop,
    filters: &[String],
) -> mpsc::UnboundedReceiver<String> {
    for filter in filters {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    let mut acked = 0;
    let mut early = Vec::new();
    tokio::time::timeout(LIMIT, async {
        while acked < filters.len() {
            match eventloop.poll().await.unwrap() {
                MqttEvent::Incoming(Packet::SubAck(_)) => acked += 1,
                MqttEvent::Incoming(Packet::Publish(p)) => {
                    early.push(String::from_utf8_lossy(&p.topic).into_owned());
                }
                _ => {}
            }
        }
    })
    .await
    .expect("no SUBACK");
    let (tx, rx) = mpsc::unbounded_channel();
    for t in early {
        let _ = tx.send(t);
    }
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let MqttEvent::Incoming(Packet::Publish(p)) = event
                && tx
                    .send(String::from_utf8_lossy(&p.topic).into_owned())
                    .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// Everything delivered before `marker` arrives (which proves delivery works).
async fn until_marker(rx: &mut mpsc::UnboundedReceiver<String>, marker: &str) -> Vec<String> {
    let mut before = Vec::new();
    tokio::time::timeout(LIMIT, async {
        while let Some(t) = rx.recv().await {
            if t == marker {
                return;
            }
            before.push(t);
        }
        panic!("receiver ended before the marker");
    })
    .await
    .unwrap_or_else(|_| panic!("marker {marker} not delivered; before it: {before:?}"));
    before
}

#[tokio::test]
async fn a_robot_cannot_publish_on_another_robots_topics_nor_write_any_desired_or_commands() {
    let broker = SecureBroker::start(&[A, B]).await.unwrap();
    // The control plane listens to every device, as botfleet-server does.
    let (server, server_loop) = connected(&broker, "acl-server", SERVER).await;
    let mut seen = receiver(
        &server,
        server_loop,
        &[
            topic("+", "status"),
            topic("+", "info"),
            topic("+", "telemetry"),
            topic("+", "events"),
        ],
    )
    .await;

    let (robot, mut robot_loop) = connected(&broker, A, A).await;
    for kind in KINDS {
        let reason = publish(&robot, &mut robot_loop, &topic(B, kind), false).await;
        assert_eq!(
            reason,
            PubAckReason::NotAuthorized,
            "{A} publishing {B}'s {kind}"
        );
    }
    for kind in ["desired", "commands"] {
        let reason = publish(&robot, &mut robot_loop, &topic(A, kind), true).await;
        assert_eq!(
            reason,
            PubAckReason::NotAuthorized,
            "{A} writing its own {kind}"
        );
    }
    for kind in ["status", "info", "telemetry", "events"] {
        let reason = publish(&robot, &mut robot_loop, &topic(A, kind), false).await;
        assert_eq!(
            reason,
            PubAckReason::Success,
            "{A} publishing its own {kind}"
        );
    }
    // A's own reports arrive, in order, and nothing of what it tried on B's topics did.
    let before = until_marker(&mut seen, &topic(A, "status")).await;
    assert!(before.is_empty(), "the server received {before:?}");
    for kind in ["info", "telemetry", "events"] {
        assert_eq!(seen.recv().await.unwrap(), topic(A, kind));
    }
}

#[tokio::test]
async fn a_robot_receives_nothing_of_another_robots_desired_state_or_commands() {
    let broker = SecureBroker::start(&[A, B]).await.unwrap();
    let (server, mut server_loop) = connected(&broker, "acl-server", SERVER).await;
    // B's retained desired state is there before A subscribes.
    for (kind, retain) in [("desired", true), ("commands", false)] {
        let reason = publish(&server, &mut server_loop, &topic(B, kind), retain).await;
        assert!(
            delivered(&reason),
            "the server writing {B}'s {kind}: {reason:?}"
        );
    }

    let (robot, robot_loop) = connected(&broker, A, A).await;
    let mut got = receiver(
        &robot,
        robot_loop,
        &[
            topic(B, "desired"),
            topic(B, "commands"),
            topic("+", "desired"),
            topic("+", "commands"),
            format!("{PREFIX}/#"),
            "#".to_owned(),
            topic(A, "desired"),
            topic(A, "commands"),
        ],
    )
    .await;
    for (kind, retain) in [("desired", true), ("commands", false)] {
        publish(&server, &mut server_loop, &topic(B, kind), retain).await;
    }
    // A's own desired state is delivered: the marker that delivery works.
    publish(&server, &mut server_loop, &topic(A, "desired"), true).await;
    let before = until_marker(&mut got, &topic(A, "desired")).await;
    assert!(before.is_empty(), "{A} received {before:?}");
}

#[tokio::test]
async fn a_client_with_robot_as_certificate_but_robot_bs_client_id_gets_nothing_of_bs() {
    let broker = SecureBroker::start(&[A, B]).await.unwrap();
    let (server, mut server_loop) = connected(&broker, "acl-server", SERVER).await;
    publish(&server, &mut server_loop, &topic(B, "desired"), true).await;

    // The certificate says robot-a; the client id claims robot-b.
    let (impostor, impostor_loop) = connected(&broker, B, A).await;
    let mut got = receiver(
        &impostor,
        impostor_loop,
        &[
            topic(B, "desired"),
            topic(B, "commands"),
            topic(A, "desired"),
        ],
    )
    .await;
    publish(&server, &mut server_loop, &topic(B, "commands"), false).await;
    publish(&server, &mut server_loop, &topic(B, "desired"), true).await;
    publish(&server, &mut server_loop, &topic(A, "desired"), true).await;
    let before = until_marker(&mut got, &topic(A, "desired")).await;
    assert!(before.is_empty(), "the impostor received {before:?}");
}

/// The broker (or the TLS handshake) closed the connection: no CONNACK, and not merely
/// silence.
fn refused_at_connect(result: &Result<(), String>) -> bool {
    matches!(result, Err(e) if e != NO_ANSWER)
}

#[tokio::test]
async fn anonymous_and_foreign_certificate_clients_are_refused_at_connect() {
    let broker = SecureBroker::start(&[A]).await.unwrap();
    // TLS, but no client certificate.
    let (_c, mut anonymous) = client(&broker, "anon", &broker.certs(), None);
    let refused = connect(&mut anonymous).await;
    assert!(
        refused_at_connect(&refused),
        "a client without a certificate was let in: {refused:?}"
    );
    // A certificate with the right name from a CA the broker does not trust.
    let (_c, mut rogue) = client(&broker, A, &broker.rogue(), Some(A));
    let refused = connect(&mut rogue).await;
    assert!(
        refused_at_connect(&refused),
        "a foreign CA's certificate was let in: {refused:?}"
    );
    // No TLS at all.
    let (_c, mut plain) =
        AsyncClient::new(MqttOptions::new("plain", "127.0.0.1", broker.port()), 8);
    let refused = connect(&mut plain).await;
    assert!(
        refused_at_connect(&refused),
        "a plain-text client was let in: {refused:?}"
    );
    // And the fleet's own certificate works on the same broker.
    connected(&broker, A, A).await;
}

#[tokio::test]
async fn the_server_and_a_real_agent_roll_out_a_model_over_tls_with_client_certificates() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let broker = SecureBroker::start(&[A]).await.unwrap();
    let certs = broker.certs();
    let dir = tempfile::tempdir().unwrap();

    let mut config = botfleet_server::Config {
        data_dir: dir.path().join("server"),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        topic_prefix: PREFIX.to_owned(),
        ..Default::default()
    };
    config.mqtt.url = broker.url();
    config.mqtt.ca_file = certs.join("ca.crt");
    config.mqtt.cert_file = certs.join("botfleet-server.crt");
    config.mqtt.key_file = certs.join("botfleet-server.key");
    let server = botfleet_server::start(config).await.unwrap();

    // The rollout is watched the way an operator's tool with the server's identity would.
    let (watcher, mut watch_loop) = connected(&broker, "acl-events", SERVER).await;
    watcher
        .subscribe(topic(A, "events"), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::timeout(LIMIT, async {
        while !matches!(
            watch_loop.poll().await.unwrap(),
            MqttEvent::Incoming(Packet::SubAck(_))
        ) {}
    })
    .await
    .expect("no SUBACK");
    let (tx, mut events) = mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        while let Ok(event) = watch_loop.poll().await {
            if let MqttEvent::Incoming(Packet::Publish(p)) = event
                && let Ok(e) = serde_json::from_slice::<Event>(&p.payload)
                && tx.send(e).is_err()
            {
                return;
            }
        }
    });

    let inference = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut agent_config = botfleet_agent::Config {
        device_id: A.to_owned(),
        data_dir: dir.path().join("agent"),
        topic_prefix: PREFIX.to_owned(),
        trusted_keys: vec![server.public_key()],
        ..Default::default()
    };
    agent_config.mqtt.url = broker.url();
    agent_config.mqtt.ca_file = certs.join("ca.crt");
    agent_config.mqtt.cert_file = certs.join(format!("{A}.crt"));
    agent_config.mqtt.key_file = certs.join(format!("{A}.key"));
    agent_config.mqtt.backoff_initial_ms = 100;
    agent_config.mqtt.backoff_max_ms = 2_000;
    agent_config.gate.program = gate_program();
    agent_config.inference.listen = inference;
    let mut agent = AgentProcess::spawn(&agent_config, None).await.unwrap();
    if let Err(e) = agent.wait_for_line("connected to broker", LIMIT).await {
        panic!("{e}\nbroker log:\n{}", broker.log());
    }

    let http = reqwest::Client::new();
    let model = std::fs::read(fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx")).unwrap();
    let metadata = json!({"slot": "textline", "name": "ppocr-cls", "version": "1.0",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
        "gate": {"warmup_runs": 1, "runs": 3}});
    let form = reqwest::multipart::Form::new()
        .text("metadata", metadata.to_string())
        .part(
            "model",
            reqwest::multipart::Part::bytes(model).file_name("model.onnx"),
        );
    let pushed = http
        .post(format!("{}/api/v1/models", server.base_url()))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert!(pushed.status().is_success(), "{:?}", pushed.text().await);
    let rollout = http
        .post(format!("{}/api/v1/rollouts", server.base_url()))
        .json(&json!({"slot": "textline", "version": "1.0", "devices": [A]}))
        .send()
        .await
        .unwrap();
    assert_eq!(rollout.status(), reqwest::StatusCode::ACCEPTED);

    let terminal = tokio::time::timeout(common::ROLLOUT_LIMIT, async {
        while let Some(event) = events.recv().await {
            if event.stage.is_terminal() {
                return event;
            }
        }
        panic!("event stream ended");
    })
    .await
    .expect("no terminal event over the TLS broker");
    assert!(
        matches!(terminal.stage, Stage::Active { .. }),
        "{:?}",
        terminal.stage
    );
    let ready = http
        .get(format!("http://{inference}/v2/models/textline/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    agent.kill().await.unwrap();
    server.shutdown().await.unwrap();
}
