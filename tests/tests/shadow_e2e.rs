//! Shadow inference end to end: a rollout asks each robot to run the candidate beside its
//! serving model on copies of live requests before promoting it. The pipeline's digits CNN
//! serves; a client keeps sending it the digits of the exported evaluation set. The INT8
//! model calibrated on constant images changes answers: it is refused with its agreement
//! figure and the float model keeps serving. The well-quantized INT8 model agrees and goes
//! active. No client request fails or gets another answer while the shadow runs. Real
//! server, Mosquitto, agent and models.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use botfleet_e2e::{Agent, BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::messages::{RejectReason, ShadowReport, Stage};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};

const SLOT: &str = "digits";

/// What the client saw: requests sent, failed, and answered by the float model with
/// another digit than the float model gives.
#[derive(Debug, Default)]
struct Seen {
    requests: u64,
    failed: Vec<String>,
    changed: u64,
}

/// Sends the digits to `agent` one after another until `stop`.
fn client_load(agent: &Agent, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Seen> {
    let url = format!("{}/v2/models/{SLOT}/infer", agent.base_url());
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let samples = common::digits_samples();
        let mut seen = Seen::default();
        for (request, expected) in samples.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            seen.requests += 1;
            let response = match client.post(&url).json(request).send().await {
                Ok(r) => r,
                Err(e) => {
                    seen.failed.push(e.to_string());
                    continue;
                }
            };
            let status = response.status();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            if status != 200 {
                seen.failed.push(format!("{status}: {answer}"));
            } else if answer["model_version"] == "1.0.0" && common::top1(&answer) != *expected {
                seen.changed += 1;
            }
        }
        seen
    })
}

async fn push(fleet: &Fleet, file: &str, version: &str, quantization: &str) {
    fleet
        .push_model(
            &fixture(file),
            json!({"slot": SLOT, "name": "digits-cnn", "version": version,
                   "quantization": quantization, "gate": {"warmup_runs": 1, "runs": 5}}),
        )
        .await
        .unwrap();
}

async fn roll_out_shadowed(fleet: &Fleet, version: &str, device: &str) -> String {
    let body = json!({"slot": SLOT, "version": version, "devices": [device], "supersede": true,
        "strategy": {"shadow": {"requests": 48, "seconds": 120, "min_agreement": 0.95}}});
    let (status, answer) = fleet.post_rollout(&body, None).await.unwrap();
    assert_eq!(status, 202, "{answer}");
    answer["rollout_id"].as_str().unwrap().to_owned()
}

fn shadow_of(events: &[botfleet_protocol::messages::Event]) -> ShadowReport {
    events
        .iter()
        .find_map(|e| match &e.stage {
            Stage::Shadowed(report) => Some(report.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no shadow report: {}", describe(events)))
}

#[tokio::test]
async fn a_candidate_that_changes_answers_on_live_requests_is_refused_and_one_that_agrees_serves() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let device = fleet.device_id("robot");
    let agent = fleet.start_agent(&device).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    push(&fleet, "digits_cnn.onnx", "1.0.0", "fp32").await;
    let first = fleet.roll_out(SLOT, "1.0.0", &[&device]).await.unwrap();
    watch.until_terminal(&first, ROLLOUT_LIMIT).await.unwrap();
    let completed = |v: &Value| v["state"] == "completed";
    fleet
        .wait_rollout(&first, ROLLOUT_LIMIT, completed)
        .await
        .unwrap();

    // A bad shadow is refused before anything is commanded.
    let body = json!({"slot": SLOT, "version": "1.0.0", "devices": [&device],
        "strategy": {"shadow": {"requests": 0, "seconds": 10, "min_agreement": 0.9}}});
    let (status, answer) = fleet.post_rollout(&body, None).await.unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("shadow"),
        "{answer}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let load = client_load(&agent, Arc::clone(&stop));

    // Calibrated on constant images: it passes the benchmark but changes answers.
    push(
        &fleet,
        "digits_cnn.int8_ptq_constant.onnx",
        "1.1.0-int8-constant",
        "int8_qdq",
    )
    .await;
    let bad = roll_out_shadowed(&fleet, "1.1.0-int8-constant", &device).await;
    let events = watch.until_terminal(&bad, ROLLOUT_LIMIT).await.unwrap();
    let report = shadow_of(&events);
    assert!(!report.passed, "{report:?}");
    assert!(
        report.samples > 0 && report.agreed < report.samples,
        "{report:?}"
    );
    match &events.last().unwrap().stage {
        Stage::Rejected { reason, message } => {
            assert_eq!(*reason, RejectReason::Inaccurate);
            let share = f64::from(report.agreed) / f64::from(report.samples);
            assert!(
                message.contains(&format!(
                    "top-1 agreement {share:.3} on {} live requests",
                    report.samples
                )),
                "{message}"
            );
        }
        other => panic!("not refused: {other:?} ({})", describe(&events)),
    }
    // The fleet gate sees the pooled agreement too: the rollout pauses, saying why.
    let view = fleet
        .wait_rollout(&bad, ROLLOUT_LIMIT, |v| v["state"] == "paused")
        .await
        .unwrap();
    assert_eq!(view["devices"][&device]["outcome"], "rejected", "{view}");
    assert_eq!(
        view["devices"][&device]["shadow"]["agreed"], report.agreed,
        "{view}"
    );
    assert_eq!(view["shadow"]["samples"], report.samples, "{view}");
    let reason = view["reason"].as_str().unwrap();
    assert!(reason.starts_with("shadow: agreement "), "{reason}");
    assert!(
        reason.contains("pooled over 48 live requests on 1 device is"),
        "{reason}"
    );

    // Well quantized: it agrees on the same live requests and goes on to serve.
    push(&fleet, "digits_cnn.int8_ptq.onnx", "1.2.0-int8", "int8_qdq").await;
    let good = roll_out_shadowed(&fleet, "1.2.0-int8", &device).await;
    let events = watch.until_terminal(&good, ROLLOUT_LIMIT).await.unwrap();
    let report = shadow_of(&events);
    assert!(report.passed, "{report:?} ({})", describe(&events));
    assert_eq!(report.samples, 48, "{report:?}");
    assert!(
        events
            .last()
            .is_some_and(|e| matches!(e.stage, Stage::Active { .. }))
    );
    let view = fleet
        .wait_rollout(&good, ROLLOUT_LIMIT, completed)
        .await
        .unwrap();
    assert!(
        view["shadow"]["agreement"].as_f64().unwrap() >= 0.95,
        "{view}"
    );

    stop.store(true, Ordering::Relaxed);
    let seen = load.await.unwrap();
    assert!(seen.requests > 96, "{seen:?}");
    assert!(
        seen.failed.is_empty(),
        "requests failed during the shadows: {seen:?}"
    );
    assert_eq!(seen.changed, 0, "the shadow changed answers: {seen:?}");
    fleet.shutdown(vec![agent]).await.unwrap();
}
