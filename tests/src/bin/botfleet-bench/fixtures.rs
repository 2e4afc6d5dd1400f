//! The benchmark models: `bench/fixtures.json`, loaded once with their reference inputs.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use botfleet_engine::{
    EngineError, Engines, LoadOptions, Model, OnnxRuntimeSettings, Tensor, reference_inputs,
};
use botfleet_protocol::engine::EngineKind;
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

impl Fixture {
    /// The same model on another engine, with the same input signature.
    pub fn load_on(
        &self,
        engines: &Engines,
        engine: EngineKind,
        options: &LoadOptions,
    ) -> Result<Model, EngineError> {
        engines.load(engine, &self.bytes, &self.specs, options)
    }
}

/// The engines measured beside tract: ONNX Runtime from `library` (else `ORT_DYLIB_PATH`),
/// one intra-op thread per inference as tract runs, the agent's default session pool.
pub fn engines(library: Option<PathBuf>) -> Engines {
    Engines::probe(&OnnxRuntimeSettings {
        library,
        intra_threads: 1,
        ..OnnxRuntimeSettings::default()
    })
}

/// Why `engine` is not measured here (`None`: it is available).
pub fn unavailable(engines: &Engines, engine: EngineKind) -> Option<String> {
    if engines.available().contains(&engine) {
        return None;
    }
    let info = engines.info();
    // Reduced-precision TensorRT is only worth a reason of its own where TensorRT is there.
    let base = if engine.is_tensorrt() {
        EngineKind::OnnxruntimeTensorrt
    } else {
        engine
    };
    Some(
        info.unavailable
            .get(engine.as_str())
            .or_else(|| info.unavailable.get(base.as_str()))
            .or_else(|| info.unavailable.get("onnxruntime"))
            .cloned()
            .unwrap_or_else(|| "not available on this machine".to_owned()),
    )
}

/// The workspace root: the current directory where it holds `bench/fixtures.json` (a binary
/// built elsewhere and run in a copy of the checkout, as `bench/gpu-check.sh` may), else the
/// checkout this binary was built from (this crate lives in `tests/`).
pub fn root() -> PathBuf {
    if Path::new("bench/fixtures.json").is_file()
        && let Ok(cwd) = std::env::current_dir()
    {
        return cwd;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn entries() -> Result<Vec<Entry>> {
    let list = root().join("bench/fixtures.json");
    Ok(serde_json::from_str(
        &std::fs::read_to_string(&list).with_context(|| list.display().to_string())?,
    )?)
}

/// Where one fixture is and its input signature, without loading it.
pub struct Listed {
    pub path: PathBuf,
    pub inputs: Vec<TensorSpec>,
}

pub fn entry(name: &str) -> Result<Listed> {
    let e = entries()?
        .into_iter()
        .find(|e| e.name == name)
        .with_context(|| format!("no fixture {name} in bench/fixtures.json"))?;
    Ok(Listed {
        path: root().join(&e.file),
        inputs: e.inputs,
    })
}

/// Every fixture whose file is present; names the optional ones that are missing.
pub fn load() -> Result<(Vec<Fixture>, Vec<String>)> {
    let entries = entries()?;
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for e in entries {
        let path = root().join(&e.file);
        if e.optional && !path.is_file() {
            missing.push(format!("{} ({})", e.name, e.file.display()));
            continue;
        }
        out.push(load_file(e.name, path, e.inputs)?);
    }
    Ok((out, missing))
}

/// One model file loaded as a fixture, with its reference input (seed 42).
pub fn load_file(name: String, path: PathBuf, specs: Vec<TensorSpec>) -> Result<Fixture> {
    let bytes = std::fs::read(&path).with_context(|| path.display().to_string())?;
    let model = Model::load(&bytes, &specs).with_context(|| name.clone())?;
    let input = reference_inputs(&model, 42)?;
    Ok(Fixture {
        name,
        path,
        bytes,
        specs,
        model,
        input,
    })
}
