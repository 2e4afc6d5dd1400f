//! The GPU engines (ONNX Runtime's CUDA and TensorRT providers) on every fixture, against the
//! CPU backend and tract: outputs against the onnxruntime references, latency interleaved run
//! by run with both CPU engines, and the TensorRT engine build cold (empty cache) and warm (the
//! same cache, loaded by a fresh process: reuse after a restart). `bench/gpu-check.sh` sets up
//! the libraries and runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use botfleet_engine::{Engines, LoadOptions, Model, reference_error};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Reference;
use serde_json::{Value, json};

use crate::engine::{Runner, interleaved, max_abs_diff};
use crate::fixtures::{Fixture, root, unavailable};
use crate::stats::Summary;

/// How long the fresh process that reloads from the TensorRT cache may take.
const RELOAD_LIMIT: Duration = Duration::from_secs(300);

pub struct Options<'a> {
    pub wanted: &'a [EngineKind],
    pub budget: Duration,
    pub cache: &'a Path,
    pub library: Option<&'a Path>,
    pub out: &'a Path,
}

/// The onnxruntime reference of `model_file` in `tests/fixtures/reference`, if one exists.
fn reference(model_file: &str) -> Option<Reference> {
    let dir = root().join("tests/fixtures/reference");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let v: Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
        (v["model"].as_str()? == model_file).then_some(())?;
        let outputs = v["outputs"]
            .as_object()?
            .iter()
            .map(|(k, o)| Some((k.clone(), serde_json::from_value(o["data"].clone()).ok()?)))
            .collect::<Option<_>>()?;
        Some(Reference {
            seed: v["seed"].as_u64()?,
            outputs,
            tolerance: 0.0,
        })
    })
}

/// Load, then the first inference (TensorRT builds its engine at one or the other, depending
/// on whether the graph's shapes are static); both in ms.
fn load_and_first_run(
    f: &Fixture,
    engines: &Engines,
    engine: EngineKind,
    cache: &Path,
) -> Result<(Model, f64, f64)> {
    let options = LoadOptions {
        tensorrt_cache: engine.is_tensorrt().then(|| cache.to_owned()),
    };
    let model = f.load_on(engines, engine, &options)?;
    let t = Instant::now();
    model.run(f.input.clone())?;
    let first = t.elapsed().as_secs_f64() * 1e3;
    let load = model.load_time().as_secs_f64() * 1e3;
    Ok((model, load, first))
}

/// Files and bytes in `dir` (what TensorRT left in its cache).
fn cache_contents(dir: &Path) -> (usize, u64) {
    std::fs::read_dir(dir).map_or((0, 0), |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok().filter(|m| m.is_file()))
            .fold((0, 0), |(n, b), m| (n + 1, b + m.len()))
    })
}

/// `gpu-load` in this process: the probe, then one load from `cache`, printed as JSON.
pub fn reload(
    fixtures: &[Fixture],
    engines: &Engines,
    probe_ms: f64,
    engine: EngineKind,
    fixture: &str,
    cache: &Path,
) -> Result<()> {
    let f = fixtures
        .iter()
        .find(|f| f.name == fixture)
        .with_context(|| format!("no fixture {fixture}"))?;
    let (_, load, first) = load_and_first_run(f, engines, engine, cache)?;
    println!(
        "{}",
        json!({"probe_ms": probe_ms, "load_ms": load, "first_run_ms": first})
    );
    Ok(())
}

/// The same load from the same cache in a fresh process of this binary.
fn reload_in_child(
    o: &Options<'_>,
    engine: EngineKind,
    fixture: &str,
    cache: &Path,
) -> Result<Value> {
    let mut cmd = Command::new(std::env::current_exe()?);
    if let Some(lib) = o.library {
        cmd.arg("--onnxruntime-library").arg(lib);
    }
    cmd.args([
        "gpu-load",
        "--engine",
        engine.as_str(),
        "--fixture",
        fixture,
    ])
    .arg("--tensorrt-cache")
    .arg(cache)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = cmd.spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > RELOAD_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the reload did not finish in {} s", RELOAD_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    if let Some(mut s) = child.stdout.take() {
        std::io::Read::read_to_string(&mut s, &mut stdout)?;
    }
    if !status.success() {
        bail!("the reload exited with {status}");
    }
    let line = stdout
        .lines()
        .last()
        .context("the reload printed nothing")?;
    let mut v: Value = serde_json::from_str(line)?;
    v["process_ms"] = json!(started.elapsed().as_secs_f64() * 1e3);
    Ok(v)
}

/// One GPU engine on one fixture: loads (cold, then warm in a fresh process for TensorRT),
/// accuracy; the model is kept for the timing.
fn prepare(
    o: &Options<'_>,
    engines: &Engines,
    f: &Fixture,
    engine: EngineKind,
    baselines: &[(EngineKind, Vec<botfleet_engine::Tensor>)],
    reference: Option<&Reference>,
) -> Result<(Model, Value)> {
    let cache = o.cache.join(&f.name).join(engine.as_str());
    if cache.exists() {
        std::fs::remove_dir_all(&cache)?;
    }
    let (model, load, first) = load_and_first_run(f, engines, engine, &cache)
        .with_context(|| format!("{} on {engine}", f.name))?;
    let mut v = json!({"cold": {"load_ms": load, "first_run_ms": first}});
    if engine.is_tensorrt() {
        let (files, bytes) = cache_contents(&cache);
        v["cache"] = json!({"files": files, "bytes": bytes});
        v["warm_after_restart"] = reload_in_child(o, engine, &f.name, &cache)
            .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
    }
    if let Some(r) = reference {
        v["reference_error"] = match reference_error(&model, r) {
            Ok(e) => json!(e),
            Err(e) => json!({"error": e.to_string()}),
        };
    }
    let out = model.run(f.input.clone())?;
    for (base, base_out) in baselines {
        v[format!("max_abs_diff_vs_{}", base.as_str().replace('-', "_"))] =
            json!(max_abs_diff(base_out, &out));
    }
    Ok((model, v))
}

pub fn run(fixtures: &[Fixture], engines: &Engines, o: &Options<'_>) -> Result<Value> {
    let gpu_wanted: Vec<EngineKind> = o.wanted.iter().copied().filter(|e| e.is_gpu()).collect();
    let usable: Vec<EngineKind> = o
        .wanted
        .iter()
        .copied()
        .filter(|&e| e != EngineKind::Tract && unavailable(engines, e).is_none())
        .collect();
    let mut result = json!({
        "engines_info": engines.info(),
        "wanted": o.wanted,
        "measured": usable,
        "unavailable": o.wanted.iter().filter_map(|&e| unavailable(engines, e).map(|why| (e.as_str().to_owned(), why))).collect::<std::collections::BTreeMap<_, _>>(),
        "fixtures": [],
    });
    if !gpu_wanted.is_empty() && !usable.iter().any(|e| e.is_gpu()) {
        crate::save(o.out, "gpu", &result)?;
        bail!(
            "no GPU engine is available here: {}",
            gpu_wanted
                .iter()
                .map(|&e| format!("{e}: {}", unavailable(engines, e).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("; ")
        );
    }
    let cpu = unavailable(engines, EngineKind::OnnxruntimeCpu).is_none();
    for f in fixtures {
        let file = f.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let reference = reference(file);
        let mut baselines = vec![(EngineKind::Tract, f.model.run(f.input.clone())?)];
        let cpu_model = if cpu {
            let m = f.load_on(engines, EngineKind::OnnxruntimeCpu, &LoadOptions::default())?;
            baselines.push((EngineKind::OnnxruntimeCpu, m.run(f.input.clone())?));
            Some(m)
        } else {
            None
        };
        let mut per_engine = serde_json::Map::new();
        let mut timed: Vec<(EngineKind, Model)> = vec![(EngineKind::Tract, f.model.clone())];
        if let Some(m) = &cpu_model {
            timed.push((EngineKind::OnnxruntimeCpu, m.clone()));
        }
        for &engine in usable.iter().filter(|e| e.is_gpu()) {
            match prepare(o, engines, f, engine, &baselines, reference.as_ref()) {
                Ok((model, v)) => {
                    per_engine.insert(engine.as_str().to_owned(), v);
                    timed.push((engine, model));
                }
                Err(e) => {
                    per_engine.insert(
                        engine.as_str().to_owned(),
                        json!({"error": format!("{e:#}")}),
                    );
                }
            }
        }
        if let Some(r) = &reference {
            for (engine, model) in timed.iter().filter(|(e, _)| !e.is_gpu()) {
                let v = per_engine
                    .entry(engine.as_str().to_owned())
                    .or_insert_with(|| json!({}));
                v["reference_error"] = reference_error(model, r).map_or(Value::Null, |e| json!(e));
            }
        }
        let mut runners: Vec<Runner<'_>> = timed.iter().map(|(_, m)| Runner::Model(m)).collect();
        let times = interleaved(&mut runners, &f.input, o.budget)?;
        for ((engine, _), t) in timed.iter().zip(times) {
            let v = per_engine
                .entry(engine.as_str().to_owned())
                .or_insert_with(|| json!({}));
            v["ms"] = json!(Summary::of(&t));
        }
        if let Some(list) = result["fixtures"].as_array_mut() {
            list.push(json!({
                "fixture": f.name,
                "reference": reference.is_some(),
                "engines": per_engine,
            }));
        }
        println!("gpu {}: {} engines timed", f.name, timed.len());
        // Saved after every fixture: a run cut short still leaves what it measured.
        crate::save(o.out, "gpu", &result)?;
    }
    Ok(result)
}

/// The default for `--tensorrt-cache`.
pub fn default_cache() -> PathBuf {
    root().join("target/tensorrt-cache")
}
