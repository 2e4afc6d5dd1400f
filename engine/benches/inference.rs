//! In-process tract latency per fixture (`bench/fixtures.json`), as the agent runs it: one
//! thread, and with `--features multithread` also tract's 2-thread matmul executor.

use std::path::Path;

use botfleet_engine::{Model, reference_inputs};
use botfleet_protocol::tensor::TensorSpec;
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use serde_json::Value;

/// (name, loaded model) of every fixture present in this checkout.
fn fixtures() -> Vec<(String, Model)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Ok(text) = std::fs::read_to_string(root.join("bench/fixtures.json")) else {
        return Vec::new();
    };
    let list: Vec<Value> = serde_json::from_str(&text).unwrap_or_default();
    list.iter()
        .filter_map(|f| {
            let name = f["name"].as_str()?.to_owned();
            let bytes = std::fs::read(root.join(f["file"].as_str()?)).ok()?;
            let inputs: Vec<TensorSpec> = serde_json::from_value(f["inputs"].clone()).ok()?;
            let model = Model::load(&bytes, &inputs).ok()?;
            Some((name, model))
        })
        .collect()
}

fn inference(c: &mut Criterion) {
    let mut group = c.benchmark_group("engine");
    // One run per sample: models of 100 ms would otherwise need minutes for criterion's
    // linearly growing iteration counts.
    group.sampling_mode(SamplingMode::Flat).sample_size(20);
    for (name, model) in fixtures() {
        let Ok(input) = reference_inputs(&model, 42) else {
            continue;
        };
        group.bench_function(format!("{name}/tract_1_thread"), |b| {
            b.iter(|| model.run(input.clone()))
        });
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
