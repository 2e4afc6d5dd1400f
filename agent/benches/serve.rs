//! OIP v2 over loopback HTTP (JSON tensors, binary tensors) against in-process tract, on
//! the same model and input, per fixture of `bench/fixtures.json`.

use std::path::Path;
use std::sync::Arc;

use botfleet_agent::bench::local_serving;
use botfleet_agent::serve::router;
use botfleet_agent::slots::Slots;
use botfleet_engine::{Model, TensorData, reference_inputs};
use botfleet_protocol::SlotName;
use botfleet_protocol::tensor::TensorSpec;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use serde_json::{Value, json};

struct Fixture {
    name: String,
    model: Model,
    bytes: Vec<u8>,
}

fn fixtures() -> Vec<Fixture> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Ok(text) = std::fs::read_to_string(root.join("bench/fixtures.json")) else {
        return Vec::new();
    };
    let list: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
    list.iter()
        .filter_map(|f| {
            let bytes = std::fs::read(root.join(f["file"].as_str()?)).ok()?;
            let inputs: Vec<TensorSpec> = serde_json::from_value(f["inputs"].clone()).ok()?;
            let model = Model::load(&bytes, &inputs).ok()?;
            let name = f["name"].as_str()?.to_owned();
            Some(Fixture { name, model, bytes })
        })
        .collect()
}

/// The same input as a JSON request and as a binary request (JSON header length, body).
fn requests(model: &Model) -> Option<(Value, usize, Vec<u8>)> {
    let inputs = reference_inputs(model, 42).ok()?;
    let mut json_inputs = Vec::new();
    let mut header_inputs = Vec::new();
    let mut binary = Vec::new();
    for t in &inputs {
        let TensorData::Fp32(values) = &t.data else {
            return None;
        };
        json_inputs
            .push(json!({"name": t.name, "shape": t.shape, "datatype": "FP32", "data": values}));
        header_inputs.push(json!({"name": t.name, "shape": t.shape, "datatype": "FP32",
            "parameters": {"binary_data_size": values.len() * 4}}));
        binary.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    let header =
        json!({"inputs": header_inputs, "parameters": {"binary_data_output": true}}).to_string();
    let mut body = header.clone().into_bytes();
    body.extend(binary);
    Some((json!({ "inputs": json_inputs }), header.len(), body))
}

fn serving(c: &mut Criterion) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Ok(runtime) = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    else {
        return;
    };
    let mut group = c.benchmark_group("serve");
    // One run per sample: models of 100 ms would otherwise need minutes for criterion's
    // linearly growing iteration counts.
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    for fixture in fixtures() {
        let Some((as_json, header_len, binary_body)) = requests(&fixture.model) else {
            continue;
        };
        let Ok(slot) = SlotName::new("bench") else {
            continue;
        };
        let Ok(serving) = local_serving(slot.clone(), fixture.model.clone(), &fixture.bytes, "1")
        else {
            continue;
        };
        let slots = Arc::new(Slots::default());
        slots.swap(&slot, Arc::new(serving));
        let Some((url, _server)) = runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.ok()?;
            let url = format!(
                "http://{}/v2/models/bench/infer",
                listener.local_addr().ok()?
            );
            let app = router(slots, 256 << 20);
            Some((
                url,
                tokio::spawn(async move { axum::serve(listener, app).await }),
            ))
        }) else {
            continue;
        };
        let http = reqwest::Client::new();
        let name = &fixture.name;
        let input = reference_inputs(&fixture.model, 42).unwrap_or_default();
        group.bench_function(format!("{name}/in_process"), |b| {
            b.iter(|| fixture.model.run(input.clone()))
        });
        group.bench_function(format!("{name}/http_json"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let r = http.post(&url).json(&as_json).send().await?;
                    r.bytes().await
                })
            })
        });
        group.bench_function(format!("{name}/http_binary"), |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let r = http
                        .post(&url)
                        .header("Inference-Header-Content-Length", header_len)
                        .body(binary_body.clone())
                        .send()
                        .await?;
                    r.bytes().await
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, serving);
criterion_main!(benches);
