//! A stateful model through the real agent: the client carries the state, feeding each
//! answer's `stateN` back as the next request's `state` over OIP v2, and every step matches
//! onnxruntime.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use botfleet_e2e::{BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::manifest::reference_input;
use botfleet_protocol::messages::Stage;
use common::{ROLLOUT_LIMIT, ort_reference};
use serde_json::{Value, json};

const SLOT: &str = "vad";
/// tract and onnxruntime differ in float rounding only.
const TOLERANCE: f64 = 1e-5;

fn floats(value: &Value) -> Vec<f64> {
    serde_json::from_value(value.clone()).unwrap()
}

fn output<'a>(answer: &'a Value, name: &str) -> &'a Value {
    answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == name)
        .unwrap_or_else(|| panic!("output {name} missing in {answer}"))
}

fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        worst <= TOLERANCE,
        "{what}: max |tract - onnxruntime| = {worst:e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_fed_back_through_oip_v2_gives_onnxruntime_s_outputs_at_every_step() {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let agent = fleet.start_agent(&device).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    fleet
        .push_model(
            &fixture("stateful_ema.onnx"),
            json!({"slot": SLOT, "name": "ema-cell", "version": "1.0",
                   "gate": {"warmup_runs": 1, "runs": 3}}),
        )
        .await
        .unwrap();
    let rollout = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        matches!(events.last().unwrap().stage, Stage::Active { .. }),
        "{}",
        describe(&events)
    );

    let reference = ort_reference("stateful_ema.json");
    let mut state = vec![0.0f32; 16];
    for (i, step) in reference["steps"].as_array().unwrap().iter().enumerate() {
        let seed = step["seed"].as_u64().unwrap();
        let request = json!({
            "id": format!("step-{i}"),
            "inputs": [
                {"name": "input", "shape": [1, 8], "datatype": "FP32",
                 "data": reference_input(seed, 8)},
                {"name": "state", "shape": [1, 16], "datatype": "FP32", "data": state},
            ],
        });
        let (status, answer) = fleet.infer(&agent, SLOT, &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        let score = output(&answer, "output");
        assert_eq!(score["shape"], json!([1, 1]), "{answer}");
        assert_close(
            &format!("step {i} output"),
            &floats(&score["data"]),
            &floats(&step["output"]),
        );
        let next = output(&answer, "stateN");
        assert_eq!(next["shape"], json!([1, 16]), "{answer}");
        assert_close(
            &format!("step {i} stateN"),
            &floats(&next["data"]),
            &floats(&step["stateN"]),
        );
        // The client owns the state: what came back goes into the next request.
        state = serde_json::from_value(next["data"].clone()).unwrap();
    }

    // The agent keeps no state between requests: the first step again gives the first answer.
    let first = &reference["steps"][0];
    let request = json!({"inputs": [
        {"name": "input", "shape": [1, 8], "datatype": "FP32",
         "data": reference_input(first["seed"].as_u64().unwrap(), 8)},
        {"name": "state", "shape": [1, 16], "datatype": "FP32", "data": vec![0.0f32; 16]},
    ]});
    let (status, answer) = fleet.infer(&agent, SLOT, &request).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_close(
        "first step again",
        &floats(&output(&answer, "output")["data"]),
        &floats(&first["output"]),
    );
    fleet.shutdown(vec![agent]).await.unwrap();
}
