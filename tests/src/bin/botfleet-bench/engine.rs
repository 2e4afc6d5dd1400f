//! The engines on each fixture's reference input, one thread each, timed per run and
//! interleaved run by run (the order rotating every round): tract as the agent runs it,
//! botfleet's ONNX Runtime CPU backend (`Engines::load`), and python onnxruntime's own
//! session (`bench/ort_peer.py`, a child process fed the same input files).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use botfleet_engine::{Engines, LoadOptions, Model, Tensor, TensorData};
use botfleet_protocol::engine::EngineKind;
use serde_json::{Value, json};

use crate::fixtures::{Fixture, unavailable};
use crate::peer::Peer;
use crate::stats::Summary;

fn le_bytes(data: &TensorData) -> Result<Vec<u8>> {
    match data {
        TensorData::Fp32(v) => Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        other => bail!(
            "{} tensors are not written for the peer",
            other.datatype().as_str()
        ),
    }
}

/// Writes the FP32 tensors of `tensors` as `{prefix}-N.bin` in `dir`; returns (name, file).
fn write_outputs(dir: &Path, prefix: &str, tensors: &[Tensor]) -> Result<Vec<Value>> {
    let mut files = Vec::new();
    for t in tensors {
        if let Ok(bytes) = le_bytes(&t.data) {
            let file = dir.join(format!("{prefix}-{}.bin", files.len()));
            std::fs::write(&file, bytes)?;
            files.push(json!({"name": t.name, "file": file}));
        }
    }
    Ok(files)
}

/// Largest absolute difference between same-named outputs (infinite if one is missing or of
/// another length).
pub fn max_abs_diff(a: &[Tensor], b: &[Tensor]) -> f32 {
    let mut worst = 0f32;
    for x in a {
        let Some(y) = b.iter().find(|y| y.name == x.name) else {
            return f32::INFINITY;
        };
        let (x, y) = (x.data.to_f32(), y.data.to_f32());
        if x.len() != y.len() {
            return f32::INFINITY;
        }
        for (p, q) in x.iter().zip(&y) {
            let d = (p - q).abs();
            worst = if d.is_nan() {
                f32::INFINITY
            } else {
                worst.max(d)
            };
        }
    }
    worst
}

/// One engine in the rotation.
pub enum Runner<'a> {
    Model(&'a Model),
    Peer(&'a mut Peer),
}

impl Runner<'_> {
    /// One timed inference, in ms (the input copy is made before the clock starts).
    fn time(&mut self, input: &[Tensor]) -> Result<f64> {
        match self {
            Runner::Model(m) => {
                let input = input.to_vec();
                let t = Instant::now();
                m.run(input)?;
                Ok(t.elapsed().as_secs_f64() * 1e3)
            }
            Runner::Peer(p) => p.run(),
        }
    }
}

/// Warms every runner up (5 runs each), then runs them in turn, the first of each round
/// rotating, as many rounds as fit `budget`; per runner, the times in ms.
pub fn interleaved(
    runners: &mut [Runner<'_>],
    input: &[Tensor],
    budget: Duration,
) -> Result<Vec<Vec<f64>>> {
    let mut one_round = 0.0;
    for r in runners.iter_mut() {
        let mut warm = Vec::new();
        for _ in 0..5 {
            warm.push(r.time(input)?);
        }
        warm.sort_by(f64::total_cmp);
        one_round += warm[2];
    }
    let n = ((budget.as_secs_f64() * 1e3 / one_round.max(1e-3)) as usize).clamp(20, 2000);
    let k = runners.len();
    let mut times = vec![Vec::with_capacity(n); k];
    for round in 0..n {
        for i in 0..k {
            let ix = (round + i) % k;
            times[ix].push(runners[ix].time(input)?);
        }
    }
    Ok(times)
}

pub fn run(
    fixtures: &[Fixture],
    engines: &Engines,
    python: Option<&Path>,
    budget: Duration,
    dir: &Path,
) -> Result<Value> {
    let ort_missing = unavailable(engines, EngineKind::OnnxruntimeCpu);
    let mut peer = match python {
        Some(p) => Peer::start(p).map_err(|e| format!("{e:#}")),
        None => Err("no python given (--peer-python)".to_owned()),
    };
    let mut peer_version = None;
    let mut out = Vec::new();
    for f in fixtures {
        let inputs_dir = dir.join("inputs").join(&f.name);
        std::fs::create_dir_all(&inputs_dir)?;
        let mut files = Vec::new();
        for t in &f.input {
            let file = inputs_dir.join(format!("{}.bin", t.name));
            std::fs::write(&file, le_bytes(&t.data)?)?;
            files.push(json!({"name": t.name, "shape": t.shape, "file": file}));
        }
        let tract_out = f.model.run(f.input.clone())?;
        let output_files = write_outputs(&inputs_dir, "out", &tract_out)?;

        let ort = match &ort_missing {
            Some(why) => Err(why.clone()),
            None => f
                .load_on(engines, EngineKind::OnnxruntimeCpu, &LoadOptions::default())
                .map_err(|e| e.to_string()),
        };
        let mut ort_files = Vec::new();
        let mut ort_result = json!({});
        match &ort {
            Ok(m) => {
                let ort_out = m.run(f.input.clone())?;
                ort_files = write_outputs(&inputs_dir, "ort-out", &ort_out)?;
                ort_result["load_ms"] = json!(m.load_time().as_secs_f64() * 1e3);
                ort_result["max_abs_diff_vs_tract"] = json!(max_abs_diff(&tract_out, &ort_out));
            }
            Err(e) => ort_result["error"] = json!(e),
        }

        let mut peer_result = json!({});
        let peer_here = match &mut peer {
            Ok(p) => {
                let load = json!({"op": "load", "model": f.path, "inputs": files,
                    "compare": {"tract": output_files, "botfleet_ort": ort_files}});
                match p.ask(&load) {
                    Ok(answer) => {
                        peer_version = answer["onnxruntime"].as_str().map(str::to_owned);
                        let diff = &answer["max_abs_diff"];
                        peer_result["max_abs_diff_vs_tract"] = diff["tract"].clone();
                        if ort.is_ok() {
                            peer_result["max_abs_diff_vs_botfleet_ort"] =
                                diff["botfleet_ort"].clone();
                        }
                        Some(p)
                    }
                    Err(e) => {
                        peer_result["error"] = json!(format!("{e:#}"));
                        None
                    }
                }
            }
            Err(e) => {
                peer_result["error"] = json!(e);
                None
            }
        };

        // The rotation: tract, then whichever of the other two are here.
        let mut runners = vec![Runner::Model(&f.model)];
        if let Ok(m) = &ort {
            runners.push(Runner::Model(m));
        }
        let has_peer = peer_here.is_some();
        if let Some(p) = peer_here {
            runners.push(Runner::Peer(p));
        }
        let mut times = interleaved(&mut runners, &f.input, budget)?.into_iter();
        let tract_times = times.next().unwrap_or_default();
        if ort.is_ok() {
            ort_result["ms"] = json!(Summary::of(&times.next().unwrap_or_default()));
        }
        if has_peer {
            peer_result["ms"] = json!(Summary::of(&times.next().unwrap_or_default()));
        }
        out.push(json!({
            "fixture": f.name,
            "model": f.path,
            "inputs": files,
            "outputs": output_files,
            "runs": tract_times.len(),
            "load_ms": f.model.load_time().as_secs_f64() * 1e3,
            "tract_1_thread_ms": Summary::of(&tract_times),
            "onnxruntime_cpu": ort_result,
            "peer": peer_result,
        }));
        println!("engine {}: {} rounds", f.name, tract_times.len());
    }
    let settings = engines.settings();
    Ok(json!({
        "onnxruntime": engines.info().onnxruntime,
        "onnxruntime_settings": {"intra_threads": settings.intra_threads, "sessions": settings.sessions},
        "peer_onnxruntime": peer_version,
        "fixtures": out,
    }))
}
