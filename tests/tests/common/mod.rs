//! Helpers shared by the end-to-end tests.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic
#![allow(dead_code)] // each test binary uses a part

use std::time::Duration;

use botfleet_e2e::{Agent, Fleet};
use botfleet_protocol::manifest::reference_input;
use serde_json::{Value, json};

/// Rollouts load, benchmark and swap real models in debug builds on 2 cores: be generous.
pub const ROLLOUT_LIMIT: Duration = Duration::from_secs(240);

/// A reference file made with onnxruntime by `tests/fixtures/reference/make_reference.py`.
pub fn ort_reference(name: &str) -> Value {
    let path = botfleet_e2e::reference(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The digits of the pipeline's exported evaluation set as OIP v2 requests, each with the
/// float parent model's answer.
pub fn digits_samples() -> Vec<(Value, usize)> {
    let path = botfleet_e2e::reference("digits_cnn.evaluation.json");
    let set: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    set["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let request = json!({"inputs": [{"name": "x", "shape": [1, 1, 8, 8],
                                              "datatype": "FP32", "data": s["data"]}]});
            (request, s["top1"].as_u64().unwrap() as usize)
        })
        .collect()
}

/// The index of the largest value of an answer's first output.
pub fn top1(answer: &Value) -> usize {
    let values: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    (0..values.len())
        .max_by(|&a, &b| values[a].total_cmp(&values[b]).then(b.cmp(&a)))
        .unwrap()
}

/// The OIP v2 request (id `check`) carrying a reference file's input.
pub fn reference_request(reference: &Value) -> Value {
    let seed = reference["seed"].as_u64().unwrap();
    let shape: Vec<usize> = serde_json::from_value(reference["input"]["shape"].clone()).unwrap();
    let input = reference_input(seed, shape.iter().product());
    json!({
        "id": "check",
        "inputs": [{
            "name": reference["input"]["name"],
            "shape": shape,
            "datatype": "FP32",
            "data": input,
        }],
    })
}

/// Runs the reference's input through `agent` and checks every output against onnxruntime.
pub async fn assert_matches_onnxruntime(
    fleet: &Fleet,
    agent: &Agent,
    slot: &str,
    reference: &Value,
    tolerance: f64,
) -> Value {
    let request = reference_request(reference);
    let (status, answer) = fleet.infer(agent, slot, &request).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], "check");
    let outputs = answer["outputs"].as_array().unwrap();
    for (name, expected) in reference["outputs"].as_object().unwrap() {
        let got = outputs
            .iter()
            .find(|o| o["name"] == *name)
            .unwrap_or_else(|| panic!("output {name} missing in {answer}"));
        assert_eq!(got["shape"], expected["shape"], "{name}");
        let got: Vec<f64> = serde_json::from_value(got["data"].clone()).unwrap();
        let want: Vec<f64> = serde_json::from_value(expected["data"].clone()).unwrap();
        assert_eq!(got.len(), want.len());
        let worst = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst <= tolerance,
            "{name}: max |tract - onnxruntime| = {worst:e} > {tolerance:e}"
        );
    }
    answer
}

/// One request to `agent`'s local API (holds); the status and the body as text.
pub async fn local_api(
    method: reqwest::Method,
    agent: &Agent,
    path: &str,
    body: Option<Value>,
) -> (reqwest::StatusCode, String) {
    let client = reqwest::Client::new();
    let mut request = client.request(method, format!("{}{path}", agent.base_url()));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// Places (or renews) a hold by `holder` on `agent` for `ttl_s` seconds.
pub async fn hold(agent: &Agent, holder: &str, ttl_s: u64) {
    let body = json!({"holder": holder, "reason": "driving to dock 3", "ttl_s": ttl_s});
    let (status, text) = local_api(reqwest::Method::POST, agent, "/v1/holds", Some(body)).await;
    assert_eq!(status, 200, "{text}");
}
