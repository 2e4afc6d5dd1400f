//! In-process latency per fixture (`bench/fixtures.json`), as the agent runs it: tract on one
//! thread, with `--features multithread` also tract's 2-thread matmul executor, and where
//! `ORT_DYLIB_PATH` names an ONNX Runtime library its CPU backend with one intra-op thread.

use std::path::Path;

use botfleet_engine::{Engines, LoadOptions, Model, OnnxRuntimeSettings, reference_inputs};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::tensor::TensorSpec;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use serde_json::Value;

/// (name, tract model, ONNX Runtime CPU model) of every fixture present in this checkout.
fn fixtures() -> Vec<(String, Model, Option<Model>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Ok(text) = std::fs::read_to_string(root.join("bench/fixtures.json")) else {
        return Vec::new();
    };
    let list: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
    // ONNX Runtime only where the library is named: the benchmark stays tract-only elsewhere.
    let engines = std::env::var_os("ORT_DYLIB_PATH")
        .filter(|p| !p.is_empty())
        .map(|_| {
            Engines::probe(&OnnxRuntimeSettings {
                intra_threads: 1,
                ..OnnxRuntimeSettings::default()
            })
        });
    list.iter()
        .filter_map(|f| {
            let name = f["name"].as_str()?.to_owned();
            let bytes = std::fs::read(root.join(f["file"].as_str()?)).ok()?;
            let inputs: Vec<TensorSpec> = serde_json::from_value(f["inputs"].clone()).ok()?;
            let model = Model::load(&bytes, &inputs).ok()?;
            let ort = engines.as_ref().and_then(|e| {
                e.load(
                    EngineKind::OnnxruntimeCpu,
                    &bytes,
                    &inputs,
                    &LoadOptions::default(),
                )
                .map_err(|err| eprintln!("{name}: onnxruntime-cpu not benchmarked: {err}"))
                .ok()
            });
            Some((name, model, ort))
        })
        .collect()
}

fn inference(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    // One run per sample: models of 100 ms would otherwise need minutes for criterion's
    // linearly growing iteration counts.
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (name, model, ort) in fixtures() {
        let Ok(input) = reference_inputs(&model, 42) else {
            continue;
        };
        group.bench_function(format!("{name}/tract_1_thread"), |b| {
            b.iter(|| model.run(input.clone()))
        });
        if let Some(ort) = &ort {
            group.bench_function(format!("{name}/onnxruntime_cpu_1_thread"), |b| {
                b.iter(|| ort.run(input.clone()))
            });
        }
        #[cfg(feature = "multithread")]
        {
            use tract_linalg::multithread::{Executor, multithread_tract_scope};
            let pool = Executor::multithread(2);
            group.bench_function(format!("{name}/tract_2_threads"), |b| {
                b.iter(|| multithread_tract_scope(pool.clone(), || model.run(input.clone())))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, inference);
criterion_main!(benches);
