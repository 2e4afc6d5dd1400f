//! The benchmark models: `bench/fixtures.json`, loaded once with their reference inputs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use botfleet_engine::{Model, Tensor, reference_inputs};
use botfleet_protocol::tensor::TensorSpec;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Entry {
    name: String,
    file: PathBuf,
    inputs: Vec<TensorSpec>,
    #[serde(default)]
    optional: bool,
}

/// One fixture, loaded.
pub struct Fixture {
    pub name: String,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub specs: Vec<TensorSpec>,
    pub model: Model,
    pub input: Vec<Tensor>,
}

/// The workspace root (this crate lives in `tests/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every fixture whose file is present; names the optional ones that are missing.
pub fn load() -> Result<(Vec<Fixture>, Vec<String>)> {
    let list = root().join("bench/fixtures.json");
    let entries: Vec<Entry> = serde_json::from_str(
        &std::fs::read_to_string(&list).with_context(|| list.display().to_string())?,
    )?;
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for e in entries {
        let path = root().join(&e.file);
        if e.optional && !path.is_file() {
            missing.push(format!("{} ({})", e.name, e.file.display()));
            continue;
        }
        let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
        let model = Model::load(&bytes, &e.inputs).with_context(|| e.name.clone())?;
        let input = reference_inputs(&model, 42)?;
        out.push(Fixture {
            name: e.name,
            path,
            bytes,
            specs: e.inputs,
            model,
            input,
        });
    }
    Ok((out, missing))
}
