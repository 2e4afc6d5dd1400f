//! tract as the agent runs it (one thread), timed per run on the reference inputs, which
//! are also written out for the onnxruntime peer (`bench/ort_peer.py`) to run the same.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use botfleet_engine::TensorData;
use serde_json::{Value, json};

use crate::fixtures::Fixture;
use crate::serving::rounds;
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

pub fn run(fixtures: &[Fixture], budget: Duration, dir: &Path) -> Result<Value> {
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
        let outputs = f.model.run(f.input.clone())?;
        let mut output_files = Vec::new();
        for t in &outputs {
            if let Ok(bytes) = le_bytes(&t.data) {
                let file = inputs_dir.join(format!("out-{}.bin", output_files.len()));
                std::fs::write(&file, bytes)?;
                output_files.push(json!({"name": t.name, "file": file}));
            }
        }
        let started = Instant::now();
        for _ in 0..5 {
            f.model.run(f.input.clone())?;
        }
        let n = rounds(started.elapsed() / 5, budget, 20, 2000);
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            let input = f.input.clone();
            let t = Instant::now();
            f.model.run(input)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        out.push(json!({
            "fixture": f.name,
            "model": f.path,
            "inputs": files,
            "outputs": output_files,
            "runs": n,
            "load_ms": f.model.load_time().as_secs_f64() * 1e3,
            "tract_1_thread_ms": Summary::of(&times),
        }));
        println!("engine {}: {} runs", f.name, n);
    }
    Ok(json!({ "fixtures": out }))
}
