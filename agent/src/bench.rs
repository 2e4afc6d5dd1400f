//! `botfleet-agent bench`: load an ONNX file and time it, as the rollout gate would.

use std::path::Path;

use botfleet_engine::{Engines, LoadOptions, Model, benchmark, reference_inputs};
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::{Artifact, Gate, ModelFormat, Quantization, Sha256Digest};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use botfleet_protocol::{ExpiryCheck, Manifest, ManifestSigner, SlotName, TrustedKeys};
use serde::Serialize;

use crate::slots::ServingModel;

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("--input {0:?}: expected NAME:DATATYPE:DIMxDIMx… (e.g. x:FP32:1x3x224x224)")]
    InputSpec(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Engine(#[from] botfleet_engine::EngineError),
    #[error("signing the local manifest: {0}")]
    Sign(#[source] serde_json::Error),
    #[error("checking the local manifest: {0}")]
    Verify(#[source] botfleet_protocol::ManifestError),
}

/// What `bench --json` prints.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    pub model: String,
    pub engine: EngineKind,
    pub load_ms: f64,
    pub warmup: u32,
    pub runs: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

/// Parses `NAME:DATATYPE:1x3x224x224`.
pub fn parse_input(spec: &str) -> Result<TensorSpec, BenchError> {
    let err = || BenchError::InputSpec(spec.to_owned());
    let mut parts = spec.rsplitn(3, ':');
    let dims = parts.next().ok_or_else(err)?;
    let datatype = parts.next().ok_or_else(err)?;
    let name = parts.next().filter(|n| !n.is_empty()).ok_or_else(err)?;
    let datatype: DataType = serde_json::from_value(serde_json::Value::String(datatype.to_owned()))
        .map_err(|_| err())?;
    let shape = dims
        .split('x')
        .map(|d| d.parse::<i64>().ok().filter(|d| *d > 0))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(err)?;
    Ok(TensorSpec {
        name: name.to_owned(),
        datatype,
        shape,
    })
}

/// Loads `model` with `inputs` and benchmarks it on the deterministic reference input.
pub fn run(
    engines: &Engines,
    engine: EngineKind,
    model: &Path,
    inputs: &[TensorSpec],
    warmup: u32,
    runs: u32,
) -> Result<BenchResult, BenchError> {
    let bytes = std::fs::read(model).map_err(|source| BenchError::Read {
        path: model.to_owned(),
        source,
    })?;
    let loaded = engines.load(engine, &bytes, inputs, &LoadOptions::default())?;
    let input = reference_inputs(&loaded, 42)?;
    let stats = benchmark(&loaded, &input, warmup, runs)?;
    Ok(BenchResult {
        model: model.display().to_string(),
        engine: loaded.engine(),
        load_ms: loaded.load_time().as_secs_f64() * 1e3,
        warmup,
        runs: stats.runs,
        p50_ms: stats.p50_ms,
        p99_ms: stats.p99_ms,
        mean_ms: stats.mean_ms,
    })
}

/// `model` ready to serve in `slot` without a rollout, under a manifest signed with a
/// throwaway key: for measuring the serving path (benchmarks), never for a robot's slots,
/// which only take manifests verified with the fleet's keys.
pub fn local_serving(
    slot: SlotName,
    model: Model,
    bytes: &[u8],
    version: &str,
) -> Result<ServingModel, BenchError> {
    let signer = ManifestSigner::from_secret(rand::random());
    let manifest = Manifest {
        schema: 1,
        name: slot.to_string(),
        slot,
        version: version.to_owned(),
        release: 1,
        artifact: Artifact {
            size: bytes.len() as u64,
            sha256: Sha256Digest::of(bytes),
            format: ModelFormat::Onnx,
            quantization: Quantization::Fp32,
        },
        inputs: model.inputs().cloned().collect(),
        outputs: vec![],
        compatibility: Default::default(),
        gate: Gate::default(),
        provenance: Default::default(),
        issued_at: jiff::Timestamp::now(),
        expires_at: jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24),
        allow_downgrade: false,
        engines: Default::default(),
    };
    let verified = signer
        .sign(&manifest)
        .map_err(BenchError::Sign)?
        .verify(&TrustedKeys::new([signer.public_key()]), ExpiryCheck::Skip)
        .map_err(BenchError::Verify)?;
    Ok(ServingModel::new(model, verified, jiff::Timestamp::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_specs_parse_and_bad_ones_are_refused() {
        let spec = parse_input("x:FP32:1x3x224x224").unwrap();
        assert_eq!(spec.name, "x");
        assert_eq!(spec.datatype, DataType::Fp32);
        assert_eq!(spec.shape, vec![1, 3, 224, 224]);
        for bad in [
            "x:FP32",
            "x:FP99:1x3",
            ":FP32:1",
            "x:FP32:1x0",
            "x:FP32:ax3",
        ] {
            assert!(
                matches!(parse_input(bad), Err(BenchError::InputSpec(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_real_fixture_model_benchmarks() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/models/ch_ppocr_mobile_v2.0_cls_infer.onnx");
        let spec = parse_input("x:FP32:1x3x48x192").unwrap();
        let result = run(
            &Engines::tract_only(),
            EngineKind::Tract,
            &model,
            &[spec],
            1,
            3,
        )
        .unwrap();
        assert_eq!(result.runs, 3);
        assert!(result.p50_ms <= result.p99_ms);
    }
}
