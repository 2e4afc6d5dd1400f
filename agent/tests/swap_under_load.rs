//! Hot swap under load: clients keep calling the real OIP v2 API over loopback while the
//! slot's model is swapped 100 times; no request may fail.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use botfleet_agent::serve::router;
use botfleet_agent::slots::{ServingModel, Slots};
use botfleet_engine::Model;
use botfleet_protocol::manifest::{Artifact, Gate, ModelFormat, Quantization, Sha256Digest};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use botfleet_protocol::{ExpiryCheck, Manifest, ManifestSigner, SlotName, TrustedKeys};
use serde_json::{Value, json};

const SWAPS: usize = 100;
const CLIENTS: usize = 4;

fn serving(model: &Model, bytes: &[u8], version: &str) -> ServingModel {
    let signer = ManifestSigner::from_secret([4; 32]);
    let manifest = Manifest {
        schema: 1,
        slot: SlotName::new("faces").unwrap(),
        name: "pnet".into(),
        version: version.into(),
        release: 1,
        artifact: Artifact {
            size: bytes.len() as u64,
            sha256: Sha256Digest::of(bytes),
            format: ModelFormat::Onnx,
            quantization: Quantization::Fp32,
        },
        inputs: model.inputs().cloned().collect(),
        outputs: vec![],
        compatibility: Default::default(),
        gate: Gate::default(),
        provenance: Default::default(),
        issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
        expires_at: "2036-01-01T00:00:00Z".parse().unwrap(),
        allow_downgrade: false,
        engines: Default::default(),
    };
    let verified = signer
        .sign(&manifest)
        .unwrap()
        .verify(&TrustedKeys::new([signer.public_key()]), ExpiryCheck::Skip)
        .unwrap();
    ServingModel::new(model.clone(), verified, jiff::Timestamp::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_concurrent_load_drop_no_request() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/models/mtcnn_pnet.onnx"
    ))
    .unwrap();
    let spec = TensorSpec {
        name: "input_1".into(),
        datatype: DataType::Fp32,
        shape: vec![1, 24, 24, 3],
    };
    let model = Model::load(&bytes, &[spec]).unwrap();
    let versions = [
        Arc::new(serving(&model, &bytes, "a")),
        Arc::new(serving(&model, &bytes, "b")),
    ];
    let slot = SlotName::new("faces").unwrap();
    let slots = Arc::new(Slots::default());
    slots.swap(&slot, Arc::clone(&versions[0]));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/v2/models/faces/infer",
        listener.local_addr().unwrap()
    );
    let app = router(Arc::clone(&slots), 1 << 20);
    tokio::spawn(async move { axum::serve(listener, app).await });

    let done = Arc::new(AtomicBool::new(false));
    let (answered_tx, mut answered) = tokio::sync::watch::channel(0u64);
    let answered_tx = Arc::new(answered_tx);
    let request = json!({"inputs": [{"name": "input_1", "shape": [1, 24, 24, 3], "datatype": "FP32", "data": vec![0.5f32; 24 * 24 * 3]}]});
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (url, request, done) = (url.clone(), request.clone(), Arc::clone(&done));
        let answered_tx = Arc::clone(&answered_tx);
        clients.push(tokio::spawn(async move {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let http = reqwest::Client::new();
            let (mut ok, mut failed, mut seen) =
                (0u64, Vec::new(), std::collections::BTreeSet::new());
            // Keep going until the swaps are over, and at least a little while before.
            while !done.load(Ordering::Acquire) || ok < 10 {
                let response = http.post(&url).json(&request).send().await.unwrap();
                let status = response.status();
                let body: Value = response.json().await.unwrap();
                answered_tx.send_modify(|n| *n += 1);
                if status.is_success() {
                    ok += 1;
                    seen.insert(body["model_version"].as_str().unwrap().to_owned());
                } else {
                    failed.push(body);
                }
            }
            (ok, failed, seen)
        }));
    }
    for i in 0..SWAPS {
        let next = Arc::clone(&versions[(i + 1) % 2]);
        // Each swap happens under traffic: wait until a request was answered since the last.
        let since = *answered.borrow_and_update();
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            answered.wait_for(|n| *n > since),
        )
        .await
        .expect("requests stopped being answered")
        .unwrap();
        slots.swap(&slot, next);
    }
    done.store(true, Ordering::Release);
    let mut total = 0;
    let mut versions_seen = std::collections::BTreeSet::new();
    for client in clients {
        let (ok, failed, seen) = client.await.unwrap();
        assert!(
            failed.is_empty(),
            "failed requests during swaps: {failed:?}"
        );
        total += ok;
        versions_seen.extend(seen);
    }
    assert!(total >= (CLIENTS * 10) as u64);
    assert_eq!(
        versions_seen.len(),
        2,
        "both versions answered: {versions_seen:?}"
    );
}
