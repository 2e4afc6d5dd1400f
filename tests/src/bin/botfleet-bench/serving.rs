//! Serving overhead: OIP v2 over loopback HTTP (JSON tensors, binary tensors) against the
//! same model run in-process, per fixture. The three are interleaved request by request, so
//! the machine's drift hits them alike. Request bodies are encoded once up front: what is
//! measured is the agent's side (parse, run, answer) and the transport.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use axum::body::Bytes;
use botfleet_agent::bench::local_serving;
use botfleet_agent::serve::router;
use botfleet_agent::slots::Slots;
use botfleet_engine::{Engines, LoadOptions, Model, Tensor, TensorData};
use botfleet_protocol::SlotName;
use botfleet_protocol::engine::EngineKind;
use serde_json::{Value, json};

use crate::fixtures::{Fixture, unavailable};
use crate::stats::Summary;

/// The same tensors as a JSON body and as a binary body (with its JSON header length).
/// Shared buffers: a request hands the client its body without a copy, as a client that
/// has its frame in memory would.
pub struct Bodies {
    pub json: Bytes,
    pub binary: Bytes,
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
        json: serde_json::to_vec(&json!({ "inputs": json_inputs }))?.into(),
        binary: binary.into(),
        header_len,
    })
}

/// A loopback server with `slots`; returns its base URL.
pub async fn serve(slots: Arc<Slots>) -> Result<String> {
    serve_app(router(slots, 256 << 20)).await
}

/// `app` served on loopback; returns its base URL.
pub async fn serve_app(app: axum::Router) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(url)
}

/// The same router on a Unix socket in `dir` (as the agent's `inference.unix_socket`); a
/// client for it (which sends every request there, whatever the URL's host).
pub fn serve_unix(slots: Arc<Slots>, dir: &std::path::Path) -> Result<reqwest::Client> {
    let path = dir.join("inference.sock");
    let listener = botfleet_agent::serve::bind_unix(&path)?;
    let app = router(slots, 256 << 20);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(reqwest::Client::builder().unix_socket(path).build()?)
}

pub async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &Bytes,
    header_len: Option<usize>,
) -> Result<reqwest::Response> {
    let mut request = http.post(url).body(body.clone());
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

/// One request and its whole answer read, as a client does.
async fn exchange(
    http: &reqwest::Client,
    url: &str,
    body: &Bytes,
    header_len: Option<usize>,
) -> Result<()> {
    post(http, url, body, header_len).await?.bytes().await?;
    Ok(())
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The binary request handed to the agent's router in this process (no socket, no client):
/// what the agent itself adds (read the body, parse, decode, the blocking-thread hop, run,
/// encode, answer), without the transport.
async fn through_router(app: &axum::Router, url: &str, b: &Bodies) -> Result<()> {
    use tower::ServiceExt;
    let request = axum::http::Request::post(url)
        .header("Inference-Header-Content-Length", b.header_len)
        .header("Content-Length", b.binary.len())
        .body(axum::body::Body::from(b.binary.clone()))?;
    let response = app.clone().oneshot(request).await?;
    if !response.status().is_success() {
        bail!("router: HTTP {}", response.status());
    }
    axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    Ok(())
}

/// How many interleaved rounds fit `budget` for a model that takes `one` per run.
pub fn rounds(one: Duration, budget: Duration, min: usize, max: usize) -> usize {
    let per_round = one.as_secs_f64().max(1e-5) * 5.5;
    ((budget.as_secs_f64() / per_round) as usize).clamp(min, max)
}

/// One engine's model of a fixture behind its own slot.
struct Path {
    engine: EngineKind,
    model: Model,
    url: String,
    /// The infer path alone, for the in-process router.
    path: String,
    local: Vec<f64>,
    json: Vec<f64>,
    binary: Vec<f64>,
    unix: Vec<f64>,
    router: Vec<f64>,
}

pub async fn run(fixtures: &[Fixture], engines: &Engines, budget: Duration) -> Result<Value> {
    let http = reqwest::Client::new();
    let sockets = tempfile::tempdir()?;
    let ort_missing = unavailable(engines, EngineKind::OnnxruntimeCpu);
    let mut out = Vec::new();
    for f in fixtures {
        let slots = Arc::new(Slots::default());
        let mut models = vec![(EngineKind::Tract, f.model.clone())];
        match &ort_missing {
            None => models.push((
                EngineKind::OnnxruntimeCpu,
                f.load_on(engines, EngineKind::OnnxruntimeCpu, &LoadOptions::default())
                    .with_context(|| format!("{} on onnxruntime-cpu", f.name))?,
            )),
            Some(why) => println!("serving {}: onnxruntime-cpu not measured: {why}", f.name),
        }
        let base = serve(Arc::clone(&slots)).await?;
        let dir = sockets.path().join(&f.name);
        std::fs::create_dir_all(&dir)?;
        let unix = serve_unix(Arc::clone(&slots), &dir)?;
        let app = router(Arc::clone(&slots), 256 << 20);
        let mut paths = Vec::new();
        for (engine, model) in models {
            let slot = SlotName::new(format!("bench-{engine}"))?;
            let serving = local_serving(slot.clone(), model.clone(), &f.bytes, "1")?;
            slots.swap(&slot, Arc::new(serving));
            paths.push(Path {
                engine,
                model,
                url: format!("{base}/v2/models/{slot}/infer"),
                path: format!("/v2/models/{slot}/infer"),
                local: vec![],
                json: vec![],
                binary: vec![],
                unix: vec![],
                router: vec![],
            });
        }
        let b = bodies(&f.input)?;
        // Warm-up: each path a few times; a round costs about 5.5 in-process runs per engine.
        let mut one = Duration::ZERO;
        for p in &paths {
            let started = Instant::now();
            for _ in 0..5 {
                p.model.run(f.input.clone())?;
            }
            one += started.elapsed() / 5;
            for _ in 0..3 {
                exchange(&http, &p.url, &b.json, None).await?;
                exchange(&http, &p.url, &b.binary, Some(b.header_len)).await?;
                exchange(&unix, &p.url, &b.binary, Some(b.header_len)).await?;
                through_router(&app, &p.path, &b).await?;
            }
        }
        let n = rounds(one, budget, 30, 2000);
        for _ in 0..n {
            for p in &mut paths {
                let input = f.input.clone();
                let t = Instant::now();
                p.model.run(input)?;
                p.local.push(ms_since(t));
                let t = Instant::now();
                exchange(&http, &p.url, &b.json, None).await?;
                p.json.push(ms_since(t));
                let t = Instant::now();
                exchange(&http, &p.url, &b.binary, Some(b.header_len))
                    .await
                    .context("binary answer")?;
                p.binary.push(ms_since(t));
                let t = Instant::now();
                exchange(&unix, &p.url, &b.binary, Some(b.header_len))
                    .await
                    .context("binary answer over the Unix socket")?;
                p.unix.push(ms_since(t));
                let t = Instant::now();
                through_router(&app, &p.path, &b).await?;
                p.router.push(ms_since(t));
            }
        }
        for p in &paths {
            out.push(json!({
                "fixture": f.name,
                "engine": p.engine,
                "rounds": n,
                "json_request_bytes": b.json.len(),
                "binary_request_bytes": b.binary.len(),
                "in_process_ms": Summary::of(&p.local),
                "http_json_ms": Summary::of(&p.json),
                "http_binary_ms": Summary::of(&p.binary),
                "unix_binary_ms": Summary::of(&p.unix),
                "router_binary_ms": Summary::of(&p.router),
            }));
        }
        println!(
            "serving {}: {} rounds on {} engines",
            f.name,
            n,
            paths.len()
        );
    }
    Ok(json!({ "fixtures": out, "onnxruntime_unavailable": ort_missing }))
}
