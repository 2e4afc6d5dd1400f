//! Serving overhead: OIP v2 over loopback HTTP (JSON tensors, binary tensors) against the
//! same model run in-process, per fixture. The three are interleaved request by request, so
//! the machine's drift hits them alike. Request bodies are encoded once up front: what is
//! measured is the agent's side (parse, run, answer) and the transport.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use botfleet_agent::bench::local_serving;
use botfleet_agent::serve::router;
use botfleet_agent::slots::Slots;
use botfleet_engine::{Tensor, TensorData};
use botfleet_protocol::SlotName;
use serde_json::{Value, json};

use crate::fixtures::Fixture;
use crate::stats::Summary;

/// The same tensors as a JSON body and as a binary body (with its JSON header length).
pub struct Bodies {
    pub json: Vec<u8>,
    pub binary: Vec<u8>,
    pub header_len: usize,
}

pub fn bodies(input: &[Tensor]) -> Result<Bodies> {
    let mut json_inputs = Vec::new();
    let mut header_inputs = Vec::new();
    let mut raw = Vec::new();
    for t in input {
        let TensorData::Fp32(values) = &t.data else {
            bail!("input {:?}: only FP32 inputs are benchmarked", t.name);
        };
        json_inputs
            .push(json!({"name": t.name, "shape": t.shape, "datatype": "FP32", "data": values}));
        header_inputs.push(json!({"name": t.name, "shape": t.shape, "datatype": "FP32",
            "parameters": {"binary_data_size": values.len() * 4}}));
        raw.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    }
    let header = json!({"inputs": header_inputs, "parameters": {"binary_data_output": true}})
        .to_string()
        .into_bytes();
    let header_len = header.len();
    let mut binary = header;
    binary.extend(raw);
    Ok(Bodies {
        json: serde_json::to_vec(&json!({ "inputs": json_inputs }))?,
        binary,
        header_len,
    })
}

/// A loopback server with `slots`; returns its base URL.
pub async fn serve(slots: Arc<Slots>) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let app = router(slots, 256 << 20);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

pub async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &[u8],
    header_len: Option<usize>,
) -> Result<reqwest::Response> {
    let mut request = http.post(url).body(body.to_vec());
    request = match header_len {
        Some(n) => request.header("Inference-Header-Content-Length", n),
        None => request.header("Content-Type", "application/json"),
    };
    let response = request.send().await?;
    if !response.status().is_success() {
        bail!("HTTP {}: {}", response.status(), response.text().await?);
    }
    Ok(response)
}

/// How many interleaved rounds fit `budget` for a model that takes `one` per run.
pub fn rounds(one: Duration, budget: Duration, min: usize, max: usize) -> usize {
    let per_round = one.as_secs_f64().max(1e-5) * 3.5;
    ((budget.as_secs_f64() / per_round) as usize).clamp(min, max)
}

pub async fn run(fixtures: &[Fixture], budget: Duration) -> Result<Value> {
    let http = reqwest::Client::new();
    let mut out = Vec::new();
    for f in fixtures {
        let slot = SlotName::new("bench")?;
        let slots = Arc::new(Slots::default());
        let serving = local_serving(slot.clone(), f.model.clone(), &f.bytes, "1")?;
        slots.swap(&slot, Arc::new(serving));
        let url = format!("{}/v2/models/bench/infer", serve(slots).await?);
        let b = bodies(&f.input)?;
        // Warm-up: each path a few times.
        let started = Instant::now();
        for _ in 0..5 {
            f.model.run(f.input.clone())?;
        }
        let one = started.elapsed() / 5;
        for _ in 0..3 {
            post(&http, &url, &b.json, None).await?.bytes().await?;
            post(&http, &url, &b.binary, Some(b.header_len))
                .await?
                .bytes()
                .await?;
        }
        let n = rounds(one, budget, 30, 2000);
        let (mut local, mut as_json, mut as_binary) = (vec![], vec![], vec![]);
        for _ in 0..n {
            let input = f.input.clone();
            let t = Instant::now();
            f.model.run(input)?;
            local.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            post(&http, &url, &b.json, None).await?.bytes().await?;
            as_json.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            post(&http, &url, &b.binary, Some(b.header_len))
                .await?
                .bytes()
                .await
                .context("binary answer")?;
            as_binary.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.push(json!({
            "fixture": f.name,
            "rounds": n,
            "json_request_bytes": b.json.len(),
            "binary_request_bytes": b.binary.len(),
            "in_process_ms": Summary::of(&local),
            "http_json_ms": Summary::of(&as_json),
            "http_binary_ms": Summary::of(&as_binary),
        }));
        println!("serving {}: {} rounds", f.name, n);
    }
    Ok(json!({ "fixtures": out }))
}
