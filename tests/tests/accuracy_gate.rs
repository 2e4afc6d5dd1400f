//! The accuracy gate end to end: the pipeline's digits CNN, its INT8 variants and the
//! evaluation set it exported travel through the real server (upload, signed manifest,
//! `/artifacts`) and a real Mosquitto to a real agent, whose gate runs the set on every
//! engine it has. The well-quantized model serves; the one calibrated on constant images
//! changes answers and is refused with its figure, and the robot keeps the last good model.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use botfleet_e2e::{
    BrokerKind, Fleet, benchmark_of, describe, fixture, onnxruntime_library, reference,
};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::messages::{RejectReason, Stage};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};

const SLOT: &str = "digits";
const MIN_AGREEMENT: f64 = 0.95;

fn metadata(version: &str, quantization: &str) -> Value {
    json!({
        "slot": SLOT, "name": "digits-cnn", "version": version, "quantization": quantization,
        "gate": {"warmup_runs": 1, "runs": 5},
        "engines": {"candidates": ["onnxruntime-cpu", "tract"]},
        "evaluation": {"metric": "top1_agreement", "min_agreement": MIN_AGREEMENT},
        "provenance": {"pipeline_run": "tests", "metrics": {"top1_agreement": 1.0}},
    })
}

fn evaluation_set() -> std::path::PathBuf {
    reference("digits_cnn.evaluation.json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quantized_model_that_changes_answers_is_refused_on_the_robot_with_its_figure() {
    let fleet = Fleet::start(BrokerKind::Mosquitto).await.unwrap();
    let device = fleet.device_id("robot");
    let mut config = fleet.agent_config(&device, &[]);
    config.engine.onnxruntime.library = Some(onnxruntime_library());
    let agent = fleet.start_agent_with(config).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();

    // The well-quantized variant: every engine agrees with the float parent, it serves.
    let good = fleet
        .push_model_with_evaluation(
            &fixture("digits_cnn.int8_ptq.onnx"),
            metadata("1.0.0-ptq", "int8_qdq"),
            &evaluation_set(),
        )
        .await
        .unwrap();
    let gate = &good["manifest"]["gate"]["evaluation"];
    assert_eq!(gate["samples"], 64, "{good}");
    assert_eq!(gate["min_agreement"], MIN_AGREEMENT, "{good}");
    let set_url = good["evaluation_url"].as_str().unwrap();
    assert!(
        set_url.ends_with(gate["sha256"].as_str().unwrap()),
        "{good}"
    );
    let rollout = fleet.roll_out(SLOT, "1.0.0-ptq", &[&device]).await.unwrap();
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    assert_eq!(
        events.last().map(|e| e.stage.name()),
        Some("active"),
        "{}",
        describe(&events)
    );
    let report = benchmark_of(&events);
    assert_eq!(report.agreement, Some(1.0), "{report:?}");
    for engine in [EngineKind::OnnxruntimeCpu, EngineKind::Tract] {
        let bench = report.engines.iter().find(|b| b.engine == engine);
        assert_eq!(
            bench.and_then(|b| b.agreement),
            Some(1.0),
            "{engine}: {report:?}"
        );
    }
    // What it serves answers as the float parent did on every sample of the set.
    for (request, want) in common::digits_samples() {
        let (status, answer) = fleet.infer(&agent, SLOT, &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(common::top1(&answer), want, "{answer}");
    }

    // Calibrated on constant images: it loads, runs fast and passes the reference check's
    // tolerance of a quantized model, but its answers differ: refused by the accuracy gate.
    let broken = fleet
        .push_model_with_evaluation(
            &fixture("digits_cnn.int8_ptq_constant.onnx"),
            metadata("1.1.0-ptq-constant", "int8_qdq"),
            &evaluation_set(),
        )
        .await
        .unwrap();
    assert_eq!(broken["release"], 2, "{broken}");
    let rollout = fleet
        .roll_out(SLOT, "1.1.0-ptq-constant", &[&device])
        .await
        .unwrap();
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    let Some(Stage::Rejected { reason, message }) = events.last().map(|e| &e.stage) else {
        panic!("not rejected: {}", describe(&events));
    };
    assert_eq!(*reason, RejectReason::Inaccurate, "{message}");
    assert!(
        message.contains("accuracy gate: top-1 agreement 0.") && message.contains("below 0.95"),
        "{message}"
    );
    let report = benchmark_of(&events);
    assert!(!report.passed, "{report:?}");
    for bench in &report.engines {
        let agreement = bench.agreement.unwrap_or_else(|| panic!("{bench:?}"));
        assert!(agreement < MIN_AGREEMENT, "{bench:?}");
        assert!(
            bench
                .reason
                .as_deref()
                .is_some_and(|r| r.contains("accuracy gate")),
            "{bench:?}"
        );
    }
    // The server's rollout view has the device's refusal and figure (once folded).
    let view = fleet
        .wait_rollout(&rollout, ROLLOUT_LIMIT, |v| {
            v["devices"][&device]["outcome"] != "in_progress"
        })
        .await
        .unwrap();
    assert_eq!(view["devices"][&device]["outcome"], "rejected", "{view}");
    // The robot still serves the good model.
    let (request, want) = common::digits_samples().remove(0);
    let (status, answer) = fleet.infer(&agent, SLOT, &request).await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["model_version"], "1.0.0-ptq", "{answer}");
    assert_eq!(common::top1(&answer), want, "{answer}");
    fleet.shutdown(vec![agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_set_that_does_not_fit_is_refused_at_upload_naming_it() {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("digits_cnn.onnx");
    let set: Value = serde_json::from_slice(&std::fs::read(evaluation_set()).unwrap()).unwrap();
    let write = |name: &str, value: &Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, value.to_string()).unwrap();
        path
    };
    let mut other_input = set.clone();
    other_input["input"] = json!("image");
    let mut short_sample = set.clone();
    short_sample["samples"][3]["data"] = json!([0.0, 1.0]);
    let mut bad_class = set.clone();
    bad_class["samples"][0]["top1"] = json!(10);
    let mut unknown = set.clone();
    unknown["colour"] = json!("red");
    let cases = [
        (write("input.json", &other_input), "\"image\""),
        (
            write("short.json", &short_sample),
            "sample 3 has 2 input values",
        ),
        (write("class.json", &bad_class), "top1 10"),
        (write("unknown.json", &unknown), "unknown field `colour`"),
        (
            write("empty.json", &json!({})),
            "evaluation set is not valid",
        ),
    ];
    for (path, says) in cases {
        let (status, answer) = fleet
            .upload(&model, metadata("1.0.0", "fp32"), Some(&path))
            .await
            .unwrap();
        assert_eq!(status, 400, "{says}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(
            error.contains("`evaluation` part") && error.contains(says),
            "{says}: {error}"
        );
    }
    // The part and the metadata member come together.
    let (status, answer) = fleet
        .upload(&model, metadata("1.0.0", "fp32"), None)
        .await
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("no `evaluation` part"),
        "{answer}"
    );
    let mut plain = metadata("1.0.0", "fp32");
    plain.as_object_mut().unwrap().remove("evaluation");
    let (status, answer) = fleet
        .upload(&model, plain.clone(), Some(&evaluation_set()))
        .await
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("min_agreement"),
        "{answer}"
    );
    // The manifest's gate.evaluation is the server's to write.
    plain["gate"]["evaluation"] = json!({"min_agreement": 0.5});
    let (status, answer) = fleet.upload(&model, plain, None).await.unwrap();
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("gate.evaluation"),
        "{answer}"
    );
    // Nothing of it was kept: the same version uploads fine with a set that fits.
    let ok = fleet
        .push_model_with_evaluation(&model, metadata("1.0.0", "fp32"), &evaluation_set())
        .await
        .unwrap();
    assert_eq!(ok["release"], 1, "{ok}");
    let models = fleet.get("/api/v1/models").await.unwrap();
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
    // The set is served by its digest, byte for byte.
    let url = ok["evaluation_url"].as_str().unwrap();
    let served = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(served.as_ref(), std::fs::read(evaluation_set()).unwrap());
    fleet.shutdown(vec![]).await.unwrap();
}
