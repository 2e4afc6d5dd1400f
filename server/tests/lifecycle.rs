//! Starting, stopping, and the two broker set-ups.

mod common;

use botfleet_server::Error;
use common::{MqttClient, TestServer, test_config};
use serde_json::json;

#[tokio::test]
async fn run_returns_cleanly_when_its_shutdown_future_resolves() {
    let dir = tempfile::tempdir().unwrap();
    botfleet_server::run(test_config(&dir), async {})
        .await
        .unwrap();
    assert!(dir.path().join("signing.key").exists());
}

#[tokio::test]
async fn start_fails_with_the_cause_when_the_external_broker_is_unreachable() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir);
    config.mqtt.url = format!("mqtt://{closed}");
    config.mqtt.connect_timeout_s = 1;
    let err = botfleet_server::start(config).await.unwrap_err();
    match &err {
        Error::MqttConnect { last_error, .. } => assert!(last_error.is_some(), "{err}"),
        other => panic!("unexpected error: {other}"),
    }
}

#[tokio::test]
async fn start_fails_when_the_embedded_broker_port_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir);
    config.mqtt.embedded_listen = taken.local_addr().unwrap();
    let err = botfleet_server::start(config).await.unwrap_err();
    assert!(matches!(err, Error::Broker(_)), "{err}");
}

#[tokio::test]
async fn a_server_works_with_an_external_broker_by_url() {
    // The first server's embedded broker stands in for Mosquitto.
    let broker_host = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&dir);
    config.mqtt.url = broker_host.running.mqtt_url();
    config.mqtt.client_id = "botfleet-server-2".into();
    config.topic_prefix = "fleet2/v1".into();
    let running = botfleet_server::start(config).await.unwrap();
    assert_eq!(running.mqtt_url(), broker_host.running.mqtt_url());
    let server = common::TestServer {
        running,
        dir,
        http: common::http_client(),
    };
    server.upload_pnet("faces", "1.0.0").await;
    let mut observer = MqttClient::connect(server.mqtt_addr(), "observer-ext").await;
    let topic = "fleet2/v1/devices/robot-9/desired";
    observer.subscribe(topic).await;
    let body = json!({"slot": "faces", "version": "1.0.0", "devices": ["robot-9"]});
    assert_eq!(server.rollout(&body, None).await.0, 202);
    let publish = observer.next_publish(topic).await;
    assert!(!publish.payload.is_empty());
    server.stop().await;
    broker_host.stop().await;
}
