//! Capture from the serving path's and the shadow's side: what is copied, what is kept,
//! what is dropped and counted, and the signed capture order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use botfleet_engine::{Model, Tensor, TensorData};
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::RejectReason;
use botfleet_protocol::sample::{CaptureRule, Decoded, SampleModel, decode};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use botfleet_protocol::{CaptureOrder, DeviceId, ManifestSigner, SlotName, TrustedKeys};
use jiff::Timestamp;

use super::settings::{DeviceToken, SpoolBounds, UploadSettings};
use super::*;

fn slot() -> SlotName {
    SlotName::new("digits").unwrap()
}

fn me() -> DeviceId {
    DeviceId::new("robot-1").unwrap()
}

fn settings(policy: SlotPolicy) -> DataSettings {
    DataSettings {
        slots: BTreeMap::from([(slot(), policy)]),
        spool: SpoolBounds {
            max_bytes: 1 << 30,
            max_samples: 1_000,
            max_age: None,
        },
        upload: UploadSettings {
            base_url: "http://127.0.0.1:9".into(),
            token: DeviceToken::new("t"),
            max_bytes_per_s: 0,
            windows: vec![],
            interval: Duration::from_secs(60),
        },
    }
}

/// Capture started in a fresh data directory (the uploader is not run).
fn started(policy: SlotPolicy) -> (tempfile::TempDir, Arc<Capture>) {
    let dir = tempfile::tempdir().unwrap();
    let metered = Metered::open(dir.path());
    let started = start(
        &me(),
        dir.path(),
        &settings(policy),
        metered,
        crate::capture::test_http(),
    )
    .unwrap();
    (dir, started.capture)
}

fn served() -> Served {
    Served {
        slot: slot(),
        model: SampleModel {
            version: "1.0".into(),
            release: 3,
            sha256: Sha256Digest::of(b"serving"),
        },
        engine: EngineKind::Tract,
    }
}

fn inputs() -> Vec<Tensor> {
    vec![Tensor {
        name: "x".into(),
        shape: vec![1, 2],
        data: TensorData::Fp32(vec![0.5, -1.0]),
    }]
}

fn probs(values: &[f32]) -> Vec<Tensor> {
    vec![Tensor {
        name: "probs".into(),
        shape: vec![1, values.len()],
        data: TensorData::Fp32(values.to_vec()),
    }]
}

/// One request through the serving path's end of capture, as `serve` does it.
fn request(capture: &Arc<Capture>, outputs: &[Tensor]) -> Option<bool> {
    let plan = capture.plan("digits")?;
    let copied = plan.copies_inputs();
    let copy = copied.then(inputs);
    plan.finish(copy, outputs, served(), 1.5);
    Some(copied)
}

/// Waits until the spool holds `n` samples; returns them, oldest first.
async fn spooled(capture: &Capture, n: u64) -> Vec<(Vec<u8>, Decoded)> {
    let mut stats = capture.spool().subscribe();
    tokio::time::timeout(Duration::from_secs(10), stats.wait_for(|s| s.samples >= n))
        .await
        .expect("samples spooled in time")
        .unwrap();
    let mut files = Vec::new();
    while let Some(entry) = capture.spool().oldest() {
        let bytes = std::fs::read(capture.spool().path(&entry)).unwrap();
        capture.spool().remove(&entry);
        let decoded = decode(&bytes).unwrap();
        files.push((bytes, decoded));
    }
    files
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn sampled_requests_are_spooled_with_their_rule_model_and_tensors() {
    let (_dir, capture) = started(SlotPolicy {
        sample_every: 2,
        ..SlotPolicy::off()
    });
    let outputs = probs(&[0.9, 0.1]);
    let copied: Vec<Option<bool>> = (0..4).map(|_| request(&capture, &outputs)).collect();
    // Only the sampled ones are copied at all: no rule reads outputs.
    assert_eq!(copied, [Some(true), None, Some(true), None]);
    let files = spooled(&capture, 2).await;
    assert_eq!(files.len(), 2);
    let (bytes, sample) = &files[0];
    let h = &sample.header;
    assert_eq!(h.rule, CaptureRule::Sampled);
    assert_eq!(h.detail.as_deref(), Some("one in every 2 requests"));
    assert_eq!(h.device, me());
    assert_eq!(h.slot, slot());
    assert_eq!(h.model, served().model);
    assert_eq!(h.latency_ms, Some(1.5));
    assert_eq!(h.inputs[0].name, "x");
    assert_eq!(h.inputs[0].datatype, DataType::Fp32);
    assert_eq!(h.outputs[0].shape, [1, 2]);
    assert!(h.candidate.is_none() && h.candidate_outputs.is_empty());
    assert_eq!(f32s(&bytes[sample.ranges[0].clone()]), [0.5, -1.0]);
    assert_eq!(f32s(&bytes[sample.ranges[1].clone()]), [0.9, 0.1]);
    let data = capture.telemetry();
    assert_eq!(data.captured, BTreeMap::from([("sampled".to_owned(), 2)]));
    assert_eq!((data.dropped_rate, data.dropped_write), (0, 0));
}

#[tokio::test]
async fn output_rules_copy_inputs_before_the_run_and_keep_only_what_fires() {
    let (_dir, capture) = started(SlotPolicy {
        min_top1: Some(0.6),
        ..SlotPolicy::off()
    });
    assert_eq!(request(&capture, &probs(&[0.9, 0.1])), Some(true));
    assert_eq!(request(&capture, &probs(&[0.41, 0.3, 0.29])), Some(true));
    assert!(
        capture.plan("other-slot").is_none(),
        "a slot without policy"
    );
    let files = spooled(&capture, 1).await;
    assert_eq!(files.len(), 1, "the confident answer was not kept");
    let h = &files[0].1.header;
    assert_eq!(h.rule, CaptureRule::LowConfidence);
    assert_eq!(h.detail.as_deref(), Some("top-1 0.41 < 0.6"));
}

#[tokio::test]
async fn the_rate_bound_drops_copies_before_they_are_made_and_counts_them() {
    let (_dir, capture) = started(SlotPolicy {
        sample_every: 1,
        max_per_minute: 2,
        ..SlotPolicy::off()
    });
    let outputs = probs(&[0.9, 0.1]);
    let copied: Vec<Option<bool>> = (0..5).map(|_| request(&capture, &outputs)).collect();
    assert_eq!(
        copied,
        [
            Some(true),
            Some(true),
            Some(false),
            Some(false),
            Some(false)
        ]
    );
    assert_eq!(spooled(&capture, 2).await.len(), 2);
    let data = capture.telemetry();
    assert_eq!(data.dropped_rate, 3);
    assert_eq!(data.captured["sampled"], 2);
}

fn pending() -> Pending {
    Pending {
        served: served(),
        captured_at: Timestamp::now(),
        fired: Fired::new(CaptureRule::Sampled, None),
        latency_ms: None,
        inputs: inputs(),
        outputs: vec![],
        candidate: None,
        candidate_outputs: vec![],
    }
}

fn idle_capture(dir: &std::path::Path, queue: Queue) -> Capture {
    let (_state, uploads) = watch::channel(UploadState::default());
    Capture {
        slots: BTreeMap::new(),
        queue,
        counters: Arc::default(),
        spool: Arc::new(Spool::open(
            dir,
            settings(SlotPolicy::off()).spool,
            Timestamp::now(),
        )),
        uploads,
        metered: Metered::open(dir),
    }
}

#[test]
fn a_full_writer_queue_drops_copies_and_never_waits() {
    let dir = tempfile::tempdir().unwrap();
    // A writer that never reads: the queue fills.
    let (tx, _rx) = std::sync::mpsc::sync_channel(1);
    let queue = Queue {
        tx,
        bytes: Arc::default(),
        max_bytes: 1 << 20,
    };
    let capture = idle_capture(dir.path(), queue);
    for _ in 0..3 {
        capture.offer(pending());
    }
    assert_eq!(capture.telemetry().dropped_rate, 2);
    assert_eq!(
        capture.queue.bytes.load(Ordering::Relaxed),
        8,
        "one copy's bytes"
    );
}

#[test]
fn the_writer_queue_is_bounded_by_bytes_too() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(100);
    // Room for two copies of 8 bytes of inputs.
    let bytes = Arc::new(AtomicUsize::new(0));
    let queue = Queue {
        tx,
        bytes: Arc::clone(&bytes),
        max_bytes: 20,
    };
    let capture = idle_capture(dir.path(), queue);
    for _ in 0..4 {
        capture.offer(pending());
    }
    assert_eq!(capture.telemetry().dropped_rate, 2);
    // The writer gives back what it took: room again.
    let mut writer = writer::Writer {
        device: me(),
        spool: Arc::new(Spool::open(
            dir.path(),
            settings(SlotPolicy::off()).spool,
            Timestamp::now(),
        )),
        counters: Arc::default(),
        log: writer::LogLimit::default(),
        queued: Arc::clone(&bytes),
    };
    drop(capture);
    writer.drain(&rx);
    assert_eq!(bytes.load(Ordering::Relaxed), 0);
    assert_eq!(writer.spool.stats().samples, 2);
}

#[test]
fn a_write_the_disk_refuses_is_counted_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the spool folder should be: every write fails, whoever runs the test.
    let blocked = dir.path().join(spool::DIR);
    std::fs::write(&blocked, b"in the way").unwrap();
    let counters = Arc::new(Counters::default());
    let mut writer = writer::Writer {
        device: me(),
        spool: Arc::new(Spool::open(
            &blocked,
            settings(SlotPolicy::off()).spool,
            Timestamp::now(),
        )),
        counters: Arc::clone(&counters),
        log: writer::LogLimit::default(),
        queued: Arc::default(),
    };
    writer.write(&pending());
    writer.write(&pending());
    assert_eq!(counters.dropped_write.load(Ordering::Relaxed), 2);
    assert!(counters.captured_by_rule().is_empty());
    // A tensor whose shape does not match its values cannot be encoded: counted the same.
    let mut bad = pending();
    bad.inputs[0].shape = vec![3];
    let ok_dir = tempfile::tempdir().unwrap();
    writer.spool = Arc::new(Spool::open(
        ok_dir.path(),
        settings(SlotPolicy::off()).spool,
        Timestamp::now(),
    ));
    writer.write(&bad);
    assert_eq!(counters.dropped_write.load(Ordering::Relaxed), 3);
    writer.write(&pending());
    assert_eq!(counters.captured_by_rule()["sampled"], 1);
    assert_eq!(writer.spool.stats().samples, 1);
}

#[tokio::test]
async fn disagreements_carry_both_answers_and_the_candidate() {
    let candidate = SampleModel {
        version: "2.0".into(),
        release: 4,
        sha256: Sha256Digest::of(b"candidate"),
    };
    let (_dir, off) = started(SlotPolicy {
        sample_every: 1,
        ..SlotPolicy::off()
    });
    assert!(off.disagreements(&slot(), candidate.clone()).is_none());
    let (_dir, capture) = started(SlotPolicy {
        disagreement: true,
        ..SlotPolicy::off()
    });
    assert!(
        capture.plan("digits").is_none(),
        "serving keeps nothing itself"
    );
    let d = capture.disagreements(&slot(), candidate.clone()).unwrap();
    assert!(d.has_room());
    d.offer(
        served(),
        Some(inputs()),
        probs(&[0.9, 0.1]),
        probs(&[0.2, 0.8]),
        "top-1 0, the candidate's 1".into(),
        2.0,
    );
    let files = spooled(&capture, 1).await;
    let (bytes, sample) = &files[0];
    let h = &sample.header;
    assert_eq!(h.rule, CaptureRule::Disagreement);
    assert_eq!(h.candidate.as_ref(), Some(&candidate));
    assert_eq!(h.model, served().model);
    assert_eq!(h.detail.as_deref(), Some("top-1 0, the candidate's 1"));
    assert_eq!(h.candidate_outputs.len(), 1);
    assert_eq!(f32s(&bytes[sample.ranges[2].clone()]), [0.2, 0.8]);
}

#[tokio::test]
async fn a_shadow_offers_the_requests_its_candidate_answered_otherwise() {
    let (bytes, model) = digits_model();
    let x = || {
        vec![Tensor {
            name: "x".into(),
            shape: vec![1, 1, 8, 8],
            data: TensorData::Fp32((0..64).map(|i| (i % 17) as f32).collect()),
        }]
    };
    let own = model.run(x()).unwrap();
    let own_top = {
        let v = own[0].data.to_f32();
        (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
    };
    // The "serving model" said another class: a disagreement.
    let other = (own_top + 1) % 10;
    let mut otherwise = vec![0.0f32; 10];
    otherwise[other] = 100.0;
    let otherwise = vec![Tensor {
        name: own[0].name.clone(),
        shape: own[0].shape.clone(),
        data: TensorData::Fp32(otherwise),
    }];
    let (_dir, capture) = started(SlotPolicy {
        disagreement: true,
        ..SlotPolicy::off()
    });
    let candidate = SampleModel {
        version: "2.0".into(),
        release: 4,
        sha256: Sha256Digest::of(&bytes),
    };
    let d = capture.disagreements(&slot(), candidate).unwrap();
    let (tx, rx) = std::sync::mpsc::sync_channel(4);
    for outputs in [own.clone(), otherwise] {
        tx.send(crate::shadow::Sample {
            inputs: x(),
            outputs,
            serving_ms: 1.0,
            served: Some(served()),
        })
        .unwrap();
    }
    drop(tx);
    let spec: botfleet_protocol::messages::ShadowSpec = serde_json::from_value(
        serde_json::json!({ "requests": 10, "seconds": 30, "min_agreement": 0.9 }),
    )
    .unwrap();
    let tally = crate::shadow::run_capturing(&model, &spec, &rx, Some(&d));
    assert_eq!((tally.samples, tally.agreed), (2, 1));
    let files = spooled(&capture, 1).await;
    assert_eq!(files.len(), 1, "only the disagreement is kept");
    let h = &files[0].1.header;
    assert_eq!(h.rule, CaptureRule::Disagreement);
    assert_eq!(
        h.detail.as_deref(),
        Some(format!("top-1 {other}, the candidate's {own_top}").as_str())
    );
    assert_eq!(h.inputs[0].shape, [1, 1, 8, 8]);
    assert_eq!(h.candidate_outputs[0].shape, own[0].shape);
}

fn order(device: &str, requests: u32) -> CaptureOrder {
    CaptureOrder {
        schema: botfleet_protocol::capture::CAPTURE_SCHEMA,
        device: DeviceId::new(device).unwrap(),
        slot: slot(),
        capture_requests: requests,
        reason: Some("night shift".into()),
        issued_at: Timestamp::now(),
        expires_at: Timestamp::now() + jiff::SignedDuration::from_hours(1),
    }
}

#[tokio::test]
async fn a_signed_capture_order_keeps_the_next_requests_of_the_slot() {
    let signer = ManifestSigner::from_secret([1; 32]);
    let trusted = TrustedKeys::new([signer.public_key()]);
    let (_dir, capture) = started(SlotPolicy {
        on_demand: true,
        sample_every: 4,
        ..SlotPolicy::off()
    });
    let signed = signer.sign_capture(&order("robot-1", 3)).unwrap();
    let accepted = accept_order(Some(&capture), &signed, &trusted, &me(), Timestamp::now());
    assert_eq!(accepted.unwrap().capture_requests, 3);
    let outputs = probs(&[0.9]);
    let copied: Vec<Option<bool>> = (0..5).map(|_| request(&capture, &outputs)).collect();
    // Requests 0 to 2 for the order (0 was one to sample too), 4 sampled.
    assert_eq!(
        copied,
        [Some(true), Some(true), Some(true), None, Some(true)]
    );
    let files = spooled(&capture, 4).await;
    let mut named: Vec<CaptureRule> = files.iter().map(|(_, s)| s.header.rule).collect();
    named.sort();
    assert_eq!(
        named,
        [
            CaptureRule::Sampled,
            CaptureRule::OnDemand,
            CaptureRule::OnDemand,
            CaptureRule::OnDemand
        ]
    );
    let ordered = files
        .iter()
        .find(|(_, s)| s.header.rule == CaptureRule::OnDemand)
        .unwrap();
    assert_eq!(
        ordered.1.header.detail.as_deref(),
        Some("capture order for 3 requests: night shift")
    );
    assert_eq!(capture.telemetry().captured["on_demand"], 3);
}

#[tokio::test]
async fn capture_orders_are_refused_without_the_policy_or_a_good_signature() {
    let signer = ManifestSigner::from_secret([1; 32]);
    let trusted = TrustedKeys::new([signer.public_key()]);
    let now = Timestamp::now();
    let good = signer.sign_capture(&order("robot-1", 3)).unwrap();
    let (_dir, not_allowed) = started(SlotPolicy {
        sample_every: 1,
        ..SlotPolicy::off()
    });
    let refused = accept_order(Some(&not_allowed), &good, &trusted, &me(), now).unwrap_err();
    assert_eq!(refused.slot, Some(slot()));
    assert_eq!(refused.reason, RejectReason::Incompatible);
    assert!(refused.message.contains("on_demand"), "{}", refused.message);
    let (_dir, allowed) = started(SlotPolicy {
        on_demand: true,
        ..SlotPolicy::off()
    });
    let off = accept_order(None, &good, &trusted, &me(), now).unwrap_err();
    assert!(off.message.contains("capture is off"), "{}", off.message);
    let stranger = ManifestSigner::from_secret([2; 32])
        .sign_capture(&order("robot-1", 3))
        .unwrap();
    let refused = accept_order(Some(&allowed), &stranger, &trusted, &me(), now).unwrap_err();
    assert_eq!(refused.reason, RejectReason::Untrusted);
    assert_eq!(refused.slot, Some(slot()), "named from the claims");
    let elsewhere = signer.sign_capture(&order("robot-2", 3)).unwrap();
    let refused = accept_order(Some(&allowed), &elsewhere, &trusted, &me(), now).unwrap_err();
    assert_eq!(refused.reason, RejectReason::Incompatible);
    let later = now + jiff::SignedDuration::from_hours(2);
    let refused = accept_order(Some(&allowed), &good, &trusted, &me(), later).unwrap_err();
    assert_eq!(refused.reason, RejectReason::Expired);
    // None of them took effect.
    assert!(allowed.plan("digits").is_none());
    assert!(not_allowed.telemetry().captured.is_empty());
    // Each is reported as a rejected command about the slot's serving model.
    let id: botfleet_protocol::CommandId = "c-1".parse().unwrap();
    let serving = Sha256Digest::of(b"serving");
    let event = refused.event(&me(), &id, |_| Some(serving)).unwrap();
    assert_eq!(
        (event.slot, event.sha256, event.rollout_id),
        (slot(), serving, None)
    );
    match event.stage {
        botfleet_protocol::messages::Stage::Rejected { reason, message } => {
            assert_eq!(reason, RejectReason::Expired);
            assert!(
                message.starts_with("capture command c-1 refused: "),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// The digits fixture's bytes, and the model loaded for 1x1x8x8 inputs.
fn digits_model() -> (Vec<u8>, Model) {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/models/digits_cnn.onnx"
    ))
    .unwrap();
    let spec = TensorSpec {
        name: "x".into(),
        datatype: DataType::Fp32,
        shape: vec![1, 1, 8, 8],
    };
    let model = Model::load(&bytes, &[spec]).unwrap();
    (bytes, model)
}

/// The digits model serving slot `digits` on a loopback port, capturing with `capture`.
async fn serve_digits(capture: Option<Arc<Capture>>) -> String {
    let (bytes, model) = digits_model();
    let serving = crate::bench::local_serving(slot(), model, &bytes, "1.0").unwrap();
    let slots = Arc::new(crate::slots::Slots::default());
    slots.swap(&slot(), Arc::new(serving));
    let app = crate::serve::router_capturing(slots, 1 << 20, capture);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v2/models/digits/infer",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test]
async fn a_captured_request_gets_the_same_answer_as_one_not_captured() {
    let (_dir, capture) = started(SlotPolicy {
        sample_every: 1,
        min_top1: Some(1e9),
        ..SlotPolicy::off()
    });
    let capturing = serve_digits(Some(Arc::clone(&capture))).await;
    let plain = serve_digits(None).await;
    let pixels: Vec<f32> = (0..64).map(|i| (i % 7) as f32).collect();
    let request = serde_json::json!({
        "inputs": [{ "name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8], "data": pixels }]
    });
    let http = crate::capture::test_http();
    let answer = |url: String| {
        let (http, request) = (http.clone(), request.clone());
        async move {
            let response = http.post(url).json(&request).send().await.unwrap();
            assert!(response.status().is_success());
            response.json::<serde_json::Value>().await.unwrap()
        }
    };
    let captured = answer(capturing).await;
    assert_eq!(captured, answer(plain).await);
    let files = spooled(&capture, 1).await;
    let (bytes, sample) = &files[0];
    // Sampled comes first; the sample holds what the client got.
    assert_eq!(sample.header.rule, CaptureRule::Sampled);
    assert_eq!(f32s(&bytes[sample.ranges[0].clone()]), pixels);
    let logits: Vec<f32> = captured["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(f32s(&bytes[sample.ranges[1].clone()]), logits);
}
