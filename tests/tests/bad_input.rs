//! Bad input end to end: every hostile or broken order is rejected with a clear event and
//! the last good model keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use botfleet_e2e::hostile::ArtifactHost;
use botfleet_e2e::watch::publish_once;
use botfleet_e2e::{Agent, BrokerKind, EventWatch, Fleet, benchmark_of, describe, fixture};
use botfleet_protocol::engine::{Candidates, EngineKind, EnginePolicy};
use botfleet_protocol::manifest::{Sha256Digest, reference_input};
use botfleet_protocol::messages::{BenchReport, Desired, DesiredModel, Event, RejectReason, Stage};
use botfleet_protocol::{
    DeviceId, Manifest, ManifestSigner, RolloutId, SlotName, TopicKind, Topics,
};
use common::ROLLOUT_LIMIT;
use serde_json::{Value, json};

const SLOT: &str = "textline";

struct Setup {
    fleet: Fleet,
    agent: Agent,
    device: String,
    watch: EventWatch,
    good: Value,
    generation: u64,
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

async fn setup_with(adjust: impl FnOnce(&mut botfleet_agent::Config)) -> Setup {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let mut config = fleet.agent_config(&device, &[]);
    adjust(&mut config);
    let agent = fleet.start_agent_with(config).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    let good = fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.0",
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
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
    Setup {
        fleet,
        agent,
        device,
        watch,
        good,
        generation: 1000,
    }
}

impl Setup {
    fn server_key(&self) -> ManifestSigner {
        let text =
            std::fs::read_to_string(self.fleet.dir.path().join("server/signing.key")).unwrap();
        ManifestSigner::parse(&text).unwrap()
    }

    fn good_manifest(&self) -> Manifest {
        serde_json::from_value(self.good["manifest"].clone()).unwrap()
    }

    /// Publishes a desired state for the slot as the broker would deliver it, and waits for
    /// the agent's verdict on it.
    async fn order(&mut self, manifest: &Manifest, signer: &ManifestSigner, url: String) -> Stage {
        let events = self.order_events(manifest, signer, url).await;
        events.last().unwrap().stage.clone()
    }

    /// [`Setup::order`], with every event of the attempt.
    async fn order_events(
        &mut self,
        manifest: &Manifest,
        signer: &ManifestSigner,
        url: String,
    ) -> Vec<Event> {
        self.generation += 1;
        let rollout = format!("r-crafted{}", self.generation);
        let desired = Desired {
            generation: self.generation,
            slots: [(
                SlotName::new(SLOT).unwrap(),
                DesiredModel {
                    rollout_id: Some(RolloutId::new(rollout.clone()).unwrap()),
                    manifest: signer.sign(manifest).unwrap(),
                    artifact_url: url,
                    evaluation_url: None,
                    window: None,
                    shadow: None,
                    on_command: false,
                },
            )]
            .into(),
        };
        self.send(serde_json::to_vec(&desired).unwrap()).await;
        self.watch
            .until_terminal(&rollout, ROLLOUT_LIMIT)
            .await
            .unwrap()
    }

    /// The good model's next release, allowed on every engine the robot has, as the
    /// server signs it: ordered, with the benchmark report and the final stage.
    async fn order_on_any_engine(&mut self, version: &str) -> (BenchReport, Stage) {
        let signer = self.server_key();
        let mut m = self.good_manifest();
        m.release += 1;
        m.version = version.into();
        m.engines = EnginePolicy::auto();
        let url = self.artifact_url(&m.artifact.sha256.to_hex());
        let events = self.order_events(&m, &signer, url).await;
        (benchmark_of(&events), events.last().unwrap().stage.clone())
    }

    /// The engine the agent names in its answer for the slot.
    async fn serving_engine(&self) -> String {
        let request = json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                                          "data": reference_input(7, 3 * 48 * 192)}]});
        let (status, answer) = self.fleet.infer(&self.agent, SLOT, &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        answer["parameters"]["engine"].as_str().unwrap().to_owned()
    }

    /// Orders `bytes` as the good model's next release on both engines, served by a host of
    /// its own: a correctly signed manifest for an intact but hostile file. Every event of
    /// the attempt.
    async fn order_artifact(
        &mut self,
        version: &str,
        bytes: Vec<u8>,
        signer: &ManifestSigner,
    ) -> Vec<Event> {
        self.order_artifact_on(version, bytes, signer, both_engines())
            .await
    }

    /// [`Setup::order_artifact`] on the engines of `engines`.
    async fn order_artifact_on(
        &mut self,
        version: &str,
        bytes: Vec<u8>,
        signer: &ManifestSigner,
        engines: EnginePolicy,
    ) -> Vec<Event> {
        let host = ArtifactHost::start(bytes.clone()).await.unwrap();
        let mut m = self.good_manifest();
        m.release += 1;
        m.version = version.into();
        m.artifact.sha256 = Sha256Digest::of(&bytes);
        m.artifact.size = bytes.len() as u64;
        m.engines = engines;
        self.order_events(&m, signer, host.url()).await
    }

    async fn send(&self, payload: Vec<u8>) {
        let topic = Topics::new(self.fleet.prefix.clone()).unwrap().device(
            &DeviceId::new(self.device.clone()).unwrap(),
            TopicKind::Desired,
        );
        publish_once(&self.fleet.mqtt_url, topic, payload, true)
            .await
            .unwrap();
    }

    fn artifact_url(&self, sha: &str) -> String {
        format!("{}/artifacts/{sha}", self.fleet.server.base_url())
    }

    /// The good model still answers.
    async fn assert_still_serving_the_good_model(&self) {
        let request = json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32",
                                          "data": reference_input(7, 3 * 48 * 192)}]});
        let (status, answer) = self.fleet.infer(&self.agent, SLOT, &request).await.unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["model_version"], "1.0");
    }
}

fn rejected(stage: &Stage) -> (RejectReason, String) {
    match stage {
        Stage::Rejected { reason, message } => (*reason, message.clone()),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Both engines, ONNX Runtime first: a hostile file meets each of them in the gate child.
fn both_engines() -> EnginePolicy {
    EnginePolicy {
        candidates: Candidates::List(vec![EngineKind::OnnxruntimeCpu, EngineKind::Tract]),
        tolerance: Default::default(),
    }
}

/// The rejection that ends `events`, after checking that the gate child tried ONNX Runtime
/// on the file: the rejection names it, and the benchmark report refuses it with a reason
/// of its own that mentions `needle`.
fn rejected_on_onnxruntime_too(events: &[Event], needle: &str) -> (RejectReason, String) {
    let (reason, message) = rejected(&events.last().unwrap().stage);
    assert!(message.contains("onnxruntime-cpu: "), "{message}");
    let bench = benchmark_of(events);
    let ort = measured(&bench, EngineKind::OnnxruntimeCpu);
    assert!(!ort.passed, "{ort:?}");
    let own = ort
        .reason
        .as_deref()
        .unwrap_or_else(|| panic!("no reason of its own: {ort:?}"));
    assert!(own.contains(needle), "{own:?} should mention {needle:?}");
    assert!(!measured(&bench, EngineKind::Tract).passed, "{bench:?}");
    (reason, message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_orders_are_rejected_and_the_last_good_model_keeps_serving() {
    let mut s = setup_with(with_onnxruntime).await;
    let good_sha = s.good["sha256"].as_str().unwrap().to_owned();
    let server_key = s.server_key();

    // Signed by a key the robot does not trust.
    let mut m = s.good_manifest();
    m.release += 1;
    let stranger = ManifestSigner::from_secret([0x5a; 32]);
    let (reason, message) = rejected(&s.order(&m, &stranger, s.artifact_url(&good_sha)).await);
    assert_eq!(reason, RejectReason::Untrusted, "{message}");
    s.assert_still_serving_the_good_model().await;

    // Correctly signed, but the bytes at the URL have another digest.
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-digest".into();
    m.artifact.sha256 = Sha256Digest::of(b"something else");
    let (reason, message) = rejected(&s.order(&m, &server_key, s.artifact_url(&good_sha)).await);
    assert_eq!(reason, RejectReason::DigestMismatch, "{message}");
    s.assert_still_serving_the_good_model().await;

    // Correctly signed, but the server sends more bytes than declared: the download stops
    // at the declared size.
    let blob = vec![0x42u8; 64 * 1024];
    let blob_sha = Sha256Digest::of(&blob);
    let host = ArtifactHost::start(blob.clone()).await.unwrap();
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-size".into();
    m.artifact.sha256 = blob_sha;
    m.artifact.size = blob.len() as u64 - 1;
    let (reason, message) = rejected(&s.order(&m, &server_key, host.url()).await);
    assert_eq!(reason, RejectReason::SizeMismatch, "{message}");
    s.assert_still_serving_the_good_model().await;

    // The artifact is already in the robot's store, but the manifest declares another size.
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-stored-size".into();
    m.artifact.size += 1;
    let (reason, message) = rejected(&s.order(&m, &server_key, s.artifact_url(&good_sha)).await);
    assert_eq!(reason, RejectReason::SizeMismatch, "{message}");
    s.assert_still_serving_the_good_model().await;

    // Correctly signed and intact, but not an ONNX model.
    let garbage = b"this is not a protobuf, let alone a model".repeat(10);
    let garbage_sha = Sha256Digest::of(&garbage);
    let host = ArtifactHost::start(garbage.clone()).await.unwrap();
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-garbage".into();
    m.artifact.sha256 = garbage_sha;
    m.artifact.size = garbage.len() as u64;
    m.engines = both_engines();
    let events = s.order_events(&m, &server_key, host.url()).await;
    let (reason, message) = rejected_on_onnxruntime_too(&events, "cannot load the model");
    assert_eq!(reason, RejectReason::NotLoadable, "{message}");
    assert!(message.contains("not a loadable ONNX model"), "{message}");
    s.assert_still_serving_the_good_model().await;

    // Correctly signed and intact, but a truncated real model: the benchmark child fails to
    // load it, the daemon does not notice beyond the event.
    let whole = std::fs::read(fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx")).unwrap();
    let truncated = whole[..whole.len() / 2].to_vec();
    let truncated_sha = Sha256Digest::of(&truncated);
    let host = ArtifactHost::start(truncated.clone()).await.unwrap();
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-truncated".into();
    m.artifact.sha256 = truncated_sha;
    m.artifact.size = truncated.len() as u64;
    m.engines = both_engines();
    let events = s.order_events(&m, &server_key, host.url()).await;
    let (reason, message) = rejected_on_onnxruntime_too(&events, "cannot load the model");
    assert_eq!(reason, RejectReason::NotLoadable, "{message}");
    assert!(message.contains("not a loadable ONNX model"), "{message}");
    s.assert_still_serving_the_good_model().await;

    // Random bytes (not even text): the parser refuses them.
    let noise: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
    let events = s.order_artifact("1.1-noise", noise, &server_key).await;
    let (reason, message) = rejected_on_onnxruntime_too(&events, "cannot load the model");
    assert_eq!(reason, RejectReason::NotLoadable, "{message}");
    assert!(message.contains("not a loadable ONNX model"), "{message}");
    s.assert_still_serving_the_good_model().await;

    // A graph that materialises a 4 TiB constant: the gate child's allocation fails (the
    // address-space limit), the daemon never tries.
    let absurd = std::fs::read(fixture("absurd_dims.onnx")).unwrap();
    let events = s
        .order_artifact("1.1-absurd", absurd.clone(), &server_key)
        .await;
    let (reason, message) = rejected(&events.last().unwrap().stage);
    assert_eq!(reason, RejectReason::NotLoadable, "{message}");
    assert!(message.contains("out of memory"), "{message}");
    s.assert_still_serving_the_good_model().await;
    // tract's failed allocation ends the child's whole run, so ONNX Runtime gets the same
    // file on its own: refused with its own reason, the daemon untouched.
    let only_ort = EnginePolicy {
        candidates: Candidates::List(vec![EngineKind::OnnxruntimeCpu]),
        tolerance: Default::default(),
    };
    let events = s
        .order_artifact_on("1.1-absurd-ort", absurd, &server_key, only_ort)
        .await;
    let (reason, message) = rejected(&events.last().unwrap().stage);
    assert_eq!(reason, RejectReason::NotLoadable, "{message}");
    let bench = benchmark_of(&events);
    let ort = measured(&bench, EngineKind::OnnxruntimeCpu);
    assert!(!ort.passed && ort.p99_ms.is_none(), "{ort:?}");
    assert_eq!(ort.reason.as_deref(), Some(message.as_str()), "{bench:?}");
    assert!(
        message.contains("ONNX Runtime (onnxruntime-cpu)"),
        "{message}"
    );
    s.assert_still_serving_the_good_model().await;

    // An operator no runtime implements: named in the event.
    let unknown = std::fs::read(fixture("unsupported_op.onnx")).unwrap();
    let events = s
        .order_artifact("1.1-no-such-op", unknown, &server_key)
        .await;
    let (reason, message) = rejected_on_onnxruntime_too(&events, "NoSuchOp");
    assert_eq!(reason, RejectReason::NotLoadable, "{message}");
    assert!(
        message.contains("unsupported operator") && message.contains("NoSuchOp"),
        "{message}"
    );
    s.assert_still_serving_the_good_model().await;

    // A model whose output on the reference input is not the recorded one (what a broken
    // quantization looks like).
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-wrong-output".into();
    let reference = m
        .gate
        .reference
        .as_mut()
        .expect("the server records a reference");
    for values in reference.outputs.values_mut() {
        values.iter_mut().for_each(|v| *v = 1.0 - *v + 0.25);
    }
    m.engines = both_engines();
    let events = s
        .order_events(&m, &server_key, s.artifact_url(&good_sha))
        .await;
    let (reason, message) = rejected_on_onnxruntime_too(&events, "reference output differs");
    assert_eq!(reason, RejectReason::WrongOutput, "{message}");
    s.assert_still_serving_the_good_model().await;

    // Needs a newer agent than this one.
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-future".into();
    m.compatibility.min_agent_version = Some("99.0.0".into());
    let (reason, message) = rejected(&s.order(&m, &server_key, s.artifact_url(&good_sha)).await);
    assert_eq!(reason, RejectReason::Incompatible, "{message}");

    // An expired manifest.
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-expired".into();
    m.expires_at = "2020-01-01T00:00:00Z".parse().unwrap();
    let (reason, message) = rejected(&s.order(&m, &server_key, s.artifact_url(&good_sha)).await);
    assert_eq!(reason, RejectReason::Expired, "{message}");

    // An older release than the one serving.
    let mut m = s.good_manifest();
    m.release = 0;
    m.version = "0.9".into();
    let (reason, message) = rejected(&s.order(&m, &server_key, s.artifact_url(&good_sha)).await);
    assert_eq!(reason, RejectReason::Downgrade, "{message}");
    s.assert_still_serving_the_good_model().await;

    // The same older release with a signed permission to go back is taken.
    let mut m = s.good_manifest();
    m.release = 0;
    m.version = "0.9-allowed".into();
    m.allow_downgrade = true;
    assert!(matches!(
        s.order(&m, &server_key, s.artifact_url(&good_sha)).await,
        Stage::Active { .. }
    ));

    // Malformed JSON on the desired topic is ignored; the agent still takes the next order.
    s.send(b"{ this is not json".to_vec()).await;
    s.send(br#"{"generation": "nope"}"#.to_vec()).await;
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.2".into();
    assert!(matches!(
        s.order(&m, &server_key, s.artifact_url(&good_sha)).await,
        Stage::Active { .. }
    ));

    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_misses_its_gate_is_rejected_with_its_numbers() {
    let mut s = setup().await;
    s.fleet
        .push_model(
            &fixture("ch_ppocr_mobile_v2.0_cls_infer.onnx"),
            json!({"slot": SLOT, "name": "ppocr-cls", "version": "1.1-slow",
                   "release": 2,
                   "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3, 48, 192]}],
                   // No CPU runs this model in a microsecond.
                   "gate": {"warmup_runs": 1, "runs": 3, "max_p99_ms": 0.001}}),
        )
        .await
        .unwrap();
    let rollout = s
        .fleet
        .roll_out(SLOT, "1.1-slow", &[&s.device])
        .await
        .unwrap();
    let events = s
        .watch
        .until_terminal(&rollout, ROLLOUT_LIMIT)
        .await
        .unwrap();
    let bench = benchmark_of(&events);
    assert!(!bench.passed && bench.p99_ms > 0.001, "{bench:?}");
    let (reason, message) = rejected(&events.last().unwrap().stage);
    assert_eq!(reason, RejectReason::GateMissed);
    assert!(message.contains("budget"), "{message}");
    s.assert_still_serving_the_good_model().await;

    let status = s
        .fleet
        .wait_rollout(&rollout, ROLLOUT_LIMIT, |v| {
            v["devices"][&s.device]["outcome"] != "in_progress"
        })
        .await
        .unwrap();
    assert_eq!(
        status["devices"][&s.device]["outcome"], "rejected",
        "{status}"
    );
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_outlives_the_gate_deadline_is_killed_and_the_daemon_keeps_serving() {
    // Long enough for the real model's gate on a loaded CI machine, far too short for the
    // ten million runs asked below.
    let mut s = setup_with(|config| config.gate.timeout_s = 20).await;
    let good_sha = s.good["sha256"].as_str().unwrap().to_owned();
    let server_key = s.server_key();
    let mut m = s.good_manifest();
    m.release += 1;
    m.version = "1.1-endless-gate".into();
    m.gate.runs = 10_000_000;
    let (reason, message) = rejected(&s.order(&m, &server_key, s.artifact_url(&good_sha)).await);
    assert_eq!(reason, RejectReason::GateMissed, "{message}");
    assert!(message.contains("deadline"), "{message}");
    s.assert_still_serving_the_good_model().await;
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inference_requests_get_a_4xx_with_a_clear_message() {
    let s = setup().await;
    let data = reference_input(7, 3 * 48 * 192);
    let cases = [
        (
            json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 96], "datatype": "FP32", "data": data[..3 * 48 * 96]}]}),
            400,
            "shape",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "INT64", "data": vec![1; 3 * 48 * 192]}]}),
            400,
            "datatype",
        ),
        (
            json!({"inputs": [{"name": "y", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": data}]}),
            400,
            "not an input",
        ),
        (
            json!({"inputs": [{"name": "x", "shape": [1, 3, 48, 192], "datatype": "FP32", "data": data[..10]}]}),
            400,
            "values",
        ),
        (json!({"inputs": []}), 400, "missing"),
        // The OIP v2 server answers every malformed body with 400.
        (json!({"nonsense": true}), 400, "inputs"),
    ];
    for (request, status, needle) in cases {
        let (got, answer) = s.fleet.infer(&s.agent, SLOT, &request).await.unwrap();
        assert_eq!(got.as_u16(), status, "{answer}");
        let message = answer["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message: {answer}"));
        assert!(
            message.contains(needle),
            "{message:?} should mention {needle:?}"
        );
    }
    let (got, answer) = s
        .fleet
        .infer(&s.agent, "no-such-model", &json!({"inputs": []}))
        .await
        .unwrap();
    assert_eq!(got, 404, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("no-such-model"));
    s.assert_still_serving_the_good_model().await;
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}

fn with_onnxruntime(config: &mut botfleet_agent::Config) {
    config.engine.onnxruntime.library = Some(botfleet_e2e::onnxruntime_library());
}

fn measured(bench: &BenchReport, engine: EngineKind) -> &botfleet_protocol::engine::EngineBench {
    bench
        .engines
        .iter()
        .find(|b| b.engine == engine)
        .unwrap_or_else(|| panic!("{engine} not measured: {bench:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_measures_tract_and_onnxruntime_and_serves_on_the_one_it_chose() {
    let mut s = setup_with(with_onnxruntime).await;
    let (bench, last) = s.order_on_any_engine("1.1-any").await;
    assert!(matches!(last, Stage::Active { .. }), "{last:?}");
    let ort = measured(&bench, EngineKind::OnnxruntimeCpu);
    let tract = measured(&bench, EngineKind::Tract);
    assert!(ort.passed && tract.passed, "{bench:?}");
    // The choice follows from the figures in the event, whichever engine is faster here:
    // the lowest p99 of those that passed, the first of them (in order of preference) on a
    // tie.
    let fastest = bench
        .engines
        .iter()
        .filter(|b| b.passed)
        .map(|b| b.p99_ms.unwrap())
        .reduce(f64::min)
        .unwrap();
    let chosen = bench
        .engines
        .iter()
        .find(|b| b.passed && b.p99_ms == Some(fastest))
        .unwrap()
        .engine;
    assert_eq!(bench.engine, Some(chosen), "{bench:?}");
    assert_eq!(bench.p99_ms, fastest, "{bench:?}");
    assert!(bench.passed);
    assert!(ort.reference_max_abs_err.unwrap() < 1e-4, "{ort:?}");
    assert_eq!(s.serving_engine().await, chosen.as_str());
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_with_wrong_outputs_is_refused_for_itself_only() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("gate");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nBOTFLEET_WRONG_ENGINE=onnxruntime-cpu exec {} \"$@\"\n",
            botfleet_e2e::gate_program().display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut s = setup_with(|c| {
        with_onnxruntime(c);
        c.gate.program = wrapper.clone();
    })
    .await;
    let (bench, last) = s.order_on_any_engine("1.1-wrong-ort").await;
    assert!(matches!(last, Stage::Active { .. }), "{last:?}");
    let ort = measured(&bench, EngineKind::OnnxruntimeCpu);
    assert!(!ort.passed, "{ort:?}");
    assert!(
        ort.reason
            .as_deref()
            .unwrap_or("")
            .contains("reference output differs"),
        "{ort:?}"
    );
    assert!(measured(&bench, EngineKind::Tract).passed);
    assert_eq!(bench.engine, Some(EngineKind::Tract));
    assert_eq!(s.serving_engine().await, "tract");
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_onnxruntime_library_leaves_tract_with_the_reason_in_info() {
    let mut s = setup_with(|c| {
        c.engine.onnxruntime.library = Some("/nonexistent/libonnxruntime.so.1".into());
    })
    .await;
    let (bench, last) = s.order_on_any_engine("1.1-no-ort").await;
    assert!(matches!(last, Stage::Active { .. }), "{last:?}");
    assert_eq!(bench.engine, Some(EngineKind::Tract));
    assert_eq!(bench.engines.len(), 1, "{bench:?}");
    let device = s
        .fleet
        .get(&format!("/api/v1/devices/{}", s.device))
        .await
        .unwrap();
    let reason = device["info"]["engines"]["unavailable"]["onnxruntime"]
        .as_str()
        .unwrap_or_else(|| panic!("no reason in {device}"))
        .to_owned();
    assert!(reason.contains("/nonexistent"), "{reason}");
    assert_eq!(
        device["info"]["engines"]["available"],
        json!(["tract"]),
        "{device}"
    );
    s.fleet.shutdown(vec![s.agent]).await.unwrap();
}
