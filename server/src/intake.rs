//! Model intake: what an upload must say about itself, and the checks that make it a
//! manifest. The server loads every upload with the same engine the robots run, so a model
//! that cannot load is refused here, not on a hundred robots.

use std::fmt;

use botfleet_engine::{EngineError, Model, reference_inputs};
use botfleet_protocol::SlotName;
use botfleet_protocol::engine::{Candidates, EngineKind, EnginePolicy, Precision};
use botfleet_protocol::evaluation::{AgreementMetric, Evaluation, EvaluationError, EvaluationSet};
use botfleet_protocol::manifest::{
    Artifact, Compatibility, Gate, MANIFEST_SCHEMA, Manifest, Provenance, Quantization, Reference,
    Sha256Digest,
};
use botfleet_protocol::tensor::TensorSpec;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Outputs with at most this many values in total get a recorded reference.
pub const MAX_REFERENCE_VALUES: usize = 4096;
const MAX_VERSION_LEN: usize = 64;
const MAX_NAME_LEN: usize = 128;
const MAX_EXPIRY_DAYS: u32 = 3650;

/// Why an upload was refused. Every variant is the client's to fix (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("metadata is not valid: {0}")]
    Metadata(#[source] serde_json::Error),
    #[error("metadata field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
    #[error(
        "input {name:?} has shape {shape:?} with symbolic dimensions (-1); pass `inputs` in the \
         metadata with a concrete shape per input: \"inputs\":[{{\"name\":{name:?},\"datatype\":\"{datatype}\",\"shape\":[...]}}]"
    )]
    SymbolicInput {
        name: String,
        shape: Vec<i64>,
        datatype: &'static str,
    },
    #[error("input {name:?} declares no shape; pass `inputs` in the metadata with concrete shapes")]
    UnshapedInput { name: String },
    #[error("input {name:?} declares no supported element type; pass `inputs` in the metadata")]
    UntypedInput { name: String },
    /// The engine's own message ("not a loadable ONNX model: …").
    #[error("{0}")]
    NotLoadable(EngineError),
    #[error("the model loaded but a test inference failed: {0}")]
    TestRun(EngineError),
    /// The `evaluation` part is malformed or does not fit the model.
    #[error("`evaluation` part: {0}")]
    Evaluation(EvaluationError),
    #[error("`evaluation` part: running the model on it failed: {0}")]
    EvaluationRun(EngineError),
}

fn field(field: &'static str, reason: impl Into<String>) -> IntakeError {
    IntakeError::Field {
        field,
        reason: reason.into(),
    }
}

/// A model version label: 1 to 64 of `[A-Za-z0-9._+-]`, not starting with '.'. It names a
/// file, so it is checked when built.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModelVersion(String);

impl ModelVersion {
    pub fn new(value: &str) -> Result<Self, IntakeError> {
        if value.is_empty() || value.len() > MAX_VERSION_LEN {
            return Err(field(
                "version",
                format!("must be 1 to {MAX_VERSION_LEN} characters"),
            ));
        }
        if let Some(c) = value
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-')))
        {
            return Err(field(
                "version",
                format!("{value:?} contains {c:?}; allowed are A-Z a-z 0-9 . _ + -"),
            ));
        }
        if value.starts_with('.') {
            return Err(field(
                "version",
                format!("{value:?} must not start with '.'"),
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ModelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ModelVersion {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModelVersion {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        Self::new(&raw).map_err(serde::de::Error::custom)
    }
}

fn default_quantization() -> Quantization {
    Quantization::Fp32
}
fn default_expiry() -> u32 {
    365
}
fn default_tolerance() -> f32 {
    1e-3
}

/// The `metadata` part of an upload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMetadata {
    pub slot: SlotName,
    pub name: String,
    pub version: ModelVersion,
    /// Default: the slot's highest release + 1.
    #[serde(default)]
    pub release: Option<u64>,
    #[serde(default = "default_quantization")]
    pub quantization: Quantization,
    /// Default: the graph's declared inputs, when every dimension is concrete.
    #[serde(default)]
    pub inputs: Option<Vec<TensorSpec>>,
    #[serde(default)]
    pub compatibility: Compatibility,
    #[serde(default)]
    pub gate: Gate,
    #[serde(default)]
    pub provenance: Provenance,
    #[serde(default = "default_expiry")]
    pub expires_in_days: u32,
    /// Largest absolute difference allowed on the reference output.
    #[serde(default = "default_tolerance")]
    pub tolerance: f32,
    /// Which engines the robots' gate may pick from; absent: the server's `intake.engines`.
    #[serde(default)]
    pub engines: Option<EnginePolicy>,
    /// The accuracy gate for the `evaluation` part: required exactly when that part is sent.
    #[serde(default)]
    pub evaluation: Option<AccuracyGate>,
}

fn default_min_agreement() -> f64 {
    1.0
}

/// What the robots must measure on the evaluation set (the metadata's `evaluation`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccuracyGate {
    #[serde(default)]
    pub metric: AgreementMetric,
    /// Share of the samples (0..=1) whose answers must agree with the parent's.
    #[serde(default = "default_min_agreement")]
    pub min_agreement: f64,
    /// Largest difference per value, for `within_tolerance`.
    #[serde(default)]
    pub tolerance: Option<f32>,
}

/// The `gate` member alone, to refuse a `gate.evaluation` with the reason.
#[derive(Deserialize)]
struct GateMember {
    #[serde(default)]
    gate: Option<serde_json::Value>,
}

/// The `engines` member alone, to name it when it is what made the metadata invalid.
#[derive(Deserialize)]
struct EnginesMember {
    #[serde(default)]
    engines: Option<serde_json::Value>,
}

impl ModelMetadata {
    /// Parses and checks the metadata JSON.
    pub fn parse(json: &[u8]) -> Result<Self, IntakeError> {
        let gate = serde_json::from_slice::<GateMember>(json)
            .ok()
            .and_then(|m| m.gate);
        if gate.is_some_and(|g| g.get("evaluation").is_some()) {
            return Err(field(
                "gate",
                "`gate.evaluation` is written by the server from the `evaluation` part; put \
                 `metric` and `min_agreement` in the top-level `evaluation` member",
            ));
        }
        let meta: Self = serde_json::from_slice(json).map_err(|err| engines_error(json, err))?;
        let name = meta.name.trim();
        if name.is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(field(
                "name",
                format!("must be 1 to {MAX_NAME_LEN} printable characters"),
            ));
        }
        if meta.release == Some(0) {
            return Err(field("release", "releases start at 1"));
        }
        if !(1..=MAX_EXPIRY_DAYS).contains(&meta.expires_in_days) {
            return Err(field(
                "expires_in_days",
                format!("must be 1 to {MAX_EXPIRY_DAYS}"),
            ));
        }
        if !(meta.tolerance.is_finite() && meta.tolerance >= 0.0) {
            return Err(field("tolerance", "must be a finite number ≥ 0"));
        }
        if meta.gate.runs == 0 {
            return Err(field("gate", "`runs` must be at least 1"));
        }
        if meta.inputs.as_ref().is_some_and(Vec::is_empty) {
            return Err(field("inputs", "must name at least one input when given"));
        }
        if let Some(policy) = &meta.engines {
            check_engine_policy(policy).map_err(|reason| field("engines", reason))?;
        }
        if meta.gate.evaluation.is_some() {
            return Err(field("gate", "`gate.evaluation` is written by the server"));
        }
        if let Some(gate) = &meta.evaluation {
            if !(gate.min_agreement.is_finite() && (0.0..=1.0).contains(&gate.min_agreement)) {
                return Err(field(
                    "evaluation",
                    "`min_agreement` must be between 0 and 1",
                ));
            }
            match (gate.metric, gate.tolerance) {
                (AgreementMetric::WithinTolerance, None) => {
                    return Err(field("evaluation", "`within_tolerance` needs `tolerance`"));
                }
                (AgreementMetric::WithinTolerance, Some(t)) if !(t.is_finite() && t >= 0.0) => {
                    return Err(field(
                        "evaluation",
                        "`tolerance` must be a finite number ≥ 0",
                    ));
                }
                (AgreementMetric::BoxIou, _) => {
                    return Err(field(
                        "evaluation",
                        "`box_iou` compares two models' answers on live requests (`strategy.shadow`); an evaluation set compares by `top1_agreement` or `within_tolerance`",
                    ));
                }
                (AgreementMetric::Top1Agreement, Some(_)) => {
                    return Err(field(
                        "evaluation",
                        "`tolerance` applies to `within_tolerance` only",
                    ));
                }
                _ => {}
            }
        }
        Ok(meta)
    }
}

/// The metadata's error, or the `engines` field's own when that member is malformed (serde
/// names neither the field nor, for a list with an unknown engine, the engine).
fn engines_error(json: &[u8], err: serde_json::Error) -> IntakeError {
    let member = serde_json::from_slice::<EnginesMember>(json)
        .ok()
        .and_then(|m| m.engines);
    match member.map(engine_policy) {
        Some(Err(reason)) => field("engines", reason),
        _ => IntakeError::Metadata(err),
    }
}

/// An engine policy from JSON, with the reason in the metadata's words when it is none.
pub fn engine_policy(value: serde_json::Value) -> Result<EnginePolicy, String> {
    let policy = serde_json::from_value::<EnginePolicy>(value.clone())
        .map_err(|err| explain_policy(&value, &err))?;
    check_engine_policy(&policy)?;
    Ok(policy)
}

const POLICY_FORM: &str = r#"{"candidates": "auto"} or {"candidates": ["onnxruntime-cuda", "tract"], "tolerance": {"fp16": 0.05}}"#;

/// Why `value` is not an engine policy, in terms of its own members.
fn explain_policy(value: &serde_json::Value, err: &serde_json::Error) -> String {
    let unknown_engine = value["candidates"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|e| match e.as_str() {
            None => Some(format!(
                "`candidates` lists {e}, which is not an engine name"
            )),
            Some(name) => name.parse::<EngineKind>().err(),
        });
    let why = unknown_engine.unwrap_or_else(|| err.to_string());
    format!("{why}; expected {POLICY_FORM}")
}

/// What serde cannot see in an engine policy: tolerances that are numbers the gate can use,
/// no engine named twice, and no reduced-precision engine that could never be checked.
pub fn check_engine_policy(policy: &EnginePolicy) -> Result<(), String> {
    for (precision, tolerance) in &policy.tolerance {
        if *precision == Precision::Native {
            return Err(
                "`tolerance.native` is not a policy tolerance: the top-level `tolerance` covers \
                 native precision"
                    .into(),
            );
        }
        if !(tolerance.is_finite() && *tolerance >= 0.0) {
            return Err(format!(
                "`tolerance.{}` must be a finite number ≥ 0",
                precision_name(*precision)
            ));
        }
    }
    if let Candidates::List(list) = &policy.candidates {
        for (i, engine) in list.iter().enumerate() {
            if list[..i].contains(engine) {
                return Err(format!("`candidates` names {engine} twice"));
            }
            let precision = engine.precision();
            if precision != Precision::Native && !policy.tolerance.contains_key(&precision) {
                return Err(format!(
                    "`candidates` names {engine}, which needs `tolerance.{}` to be checked",
                    precision_name(precision)
                ));
            }
        }
    }
    Ok(())
}

fn precision_name(precision: Precision) -> &'static str {
    match precision {
        Precision::Native => "native",
        Precision::Fp16 => "fp16",
        Precision::Int8 => "int8",
    }
}

/// What loading and test-running the model taught.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// The reference output, when small enough to ship in the manifest.
    pub reference: Option<Reference>,
}

/// The reference seed of an artifact: its digest's first 8 bytes, little-endian.
pub fn seed_of(digest: &Sha256Digest) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// The input signature from the graph itself. A symbolic leading dimension is the batch and
/// becomes 1 (robots infer one sample at a time); any other symbolic dimension is refused.
fn declared_inputs(bytes: &[u8]) -> Result<Vec<TensorSpec>, IntakeError> {
    let (ports, _) = botfleet_engine::inspect(bytes).map_err(IntakeError::NotLoadable)?;
    ports
        .into_iter()
        .map(|port| {
            let Some(mut shape) = port.shape else {
                return Err(IntakeError::UnshapedInput { name: port.name });
            };
            if shape.iter().skip(1).any(|&d| d <= 0) {
                return Err(IntakeError::SymbolicInput {
                    datatype: port.datatype.map_or("FP32", |d| d.as_str()),
                    name: port.name,
                    shape: shape.iter().map(|&d| if d <= 0 { -1 } else { d }).collect(),
                });
            }
            if let Some(batch) = shape.first_mut().filter(|d| **d <= 0) {
                *batch = 1;
                tracing::info!(input = %port.name, ?shape, "symbolic batch dimension fixed to 1");
            }
            let datatype = port.datatype.ok_or_else(|| IntakeError::UntypedInput {
                name: port.name.clone(),
            })?;
            Ok(TensorSpec {
                name: port.name,
                datatype,
                shape,
            })
        })
        .collect()
}

/// Loads the model as a robot would and runs it once on the reference input of `seed`.
/// Blocking and CPU-heavy: call it off the async executor.
pub fn check_model(
    bytes: &[u8],
    declared: Option<&[TensorSpec]>,
    seed: u64,
    tolerance: f32,
    want_reference: bool,
) -> Result<Checked, IntakeError> {
    let inputs = match declared {
        Some(inputs) => inputs.to_vec(),
        None => declared_inputs(bytes)?,
    };
    let model = Model::load(bytes, &inputs).map_err(IntakeError::NotLoadable)?;
    let outputs = reference_inputs(&model, seed)
        .and_then(|input| model.run(input))
        .map_err(IntakeError::TestRun)?;
    let specs = outputs
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            datatype: t.data.datatype(),
            shape: t
                .shape
                .iter()
                .map(|&d| i64::try_from(d).unwrap_or(i64::MAX))
                .collect(),
        })
        .collect();
    let total: usize = outputs.iter().map(|t| t.data.len()).sum();
    let values: Vec<(String, Vec<f32>)> = outputs
        .iter()
        .map(|t| (t.name.clone(), t.data.to_f32()))
        .collect();
    let finite = values.iter().all(|(_, v)| v.iter().all(|x| x.is_finite()));
    let reference = if !want_reference {
        None
    } else if total > MAX_REFERENCE_VALUES {
        tracing::info!(
            total,
            "outputs too large to ship a reference; none recorded"
        );
        None
    } else if !finite {
        tracing::warn!("the reference run gave NaN or infinite values; no reference recorded");
        None
    } else {
        Some(Reference {
            seed,
            outputs: values.into_iter().collect(),
            tolerance,
        })
    };
    Ok(Checked {
        inputs: model.inputs().cloned().collect(),
        outputs: specs,
        reference,
    })
}

/// Checks an evaluation set against the checked model and runs the model on it once, so a
/// set that does not fit is refused here rather than on every robot. The agreement the
/// server measures (on tract) is logged for the record; the robots' own figure on their own
/// engine is what gates.
pub fn check_evaluation(
    bytes: &[u8],
    gate: &AccuracyGate,
    model_bytes: &[u8],
    checked: &Checked,
) -> Result<Evaluation, IntakeError> {
    let set = EvaluationSet::parse(bytes, gate.metric).map_err(IntakeError::Evaluation)?;
    set.fits(&checked.inputs, &checked.outputs)
        .map_err(IntakeError::Evaluation)?;
    let evaluation = Evaluation {
        size: bytes.len() as u64,
        sha256: Sha256Digest::of(bytes),
        samples: u32::try_from(set.samples.len()).unwrap_or(u32::MAX),
        input: set.input.clone(),
        output: set.output.clone(),
        metric: gate.metric,
        min_agreement: gate.min_agreement,
        tolerance: gate.tolerance,
        parent_sha256: set.parent_sha256,
    };
    let model = Model::load(model_bytes, &checked.inputs).map_err(IntakeError::NotLoadable)?;
    let agreement =
        botfleet_engine::evaluate(&model, &evaluation, &set).map_err(IntakeError::EvaluationRun)?;
    tracing::info!(
        samples = agreement.samples,
        agreement = agreement.share(),
        min_agreement = gate.min_agreement,
        "evaluation set checked on tract"
    );
    Ok(evaluation)
}

/// Builds the manifest of a checked upload; `default_engines` applies when the metadata
/// names no engine policy.
pub fn build_manifest(
    meta: &ModelMetadata,
    release: u64,
    artifact: Artifact,
    checked: Checked,
    evaluation: Option<Evaluation>,
    now: Timestamp,
    default_engines: &EnginePolicy,
) -> Result<Manifest, IntakeError> {
    let mut gate = meta.gate.clone();
    if gate.reference.is_none() {
        gate.reference = checked.reference;
    }
    gate.evaluation = evaluation;
    let engines = meta
        .engines
        .clone()
        .unwrap_or_else(|| default_engines.clone());
    if !engines.tolerance.is_empty() && gate.reference.is_none() {
        tracing::info!(
            slot = %meta.slot,
            version = %meta.version,
            "no reference output recorded: robots will not try reduced-precision engines"
        );
    }
    let lifetime = SignedDuration::from_hours(24 * i64::from(meta.expires_in_days));
    let expires_at = now
        .checked_add(lifetime)
        .map_err(|e| field("expires_in_days", e.to_string()))?;
    Ok(Manifest {
        schema: MANIFEST_SCHEMA,
        slot: meta.slot.clone(),
        name: meta.name.trim().to_owned(),
        version: meta.version.to_string(),
        release,
        artifact,
        inputs: checked.inputs,
        outputs: checked.outputs,
        compatibility: meta.compatibility.clone(),
        gate,
        provenance: meta.provenance.clone(),
        issued_at: now,
        expires_at,
        allow_downgrade: false,
        engines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_safe_file_names() {
        for ok in ["1.0.0", "2024.06.01+build-7", "v1_rc2"] {
            assert!(ModelVersion::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "..", ".hidden", "1/2", "a b", "é", &"9".repeat(65)] {
            assert!(ModelVersion::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn metadata_defaults_are_applied() {
        let meta =
            ModelMetadata::parse(br#"{"slot":"orientation","name":"rapid","version":"1.0.0"}"#)
                .unwrap();
        assert_eq!(meta.release, None);
        assert_eq!(meta.quantization, Quantization::Fp32);
        assert_eq!(meta.expires_in_days, 365);
        assert_eq!(meta.tolerance, 1e-3);
        assert_eq!(meta.gate, Gate::default());
    }

    #[test]
    fn bad_metadata_is_refused_with_the_field() {
        let bad = [
            r#"{"slot":"s","name":"n","version":"1","colour":"red"}"#,
            r#"{"slot":"a/b","name":"n","version":"1"}"#,
            r#"{"slot":"s","name":"","version":"1"}"#,
            r#"{"slot":"s","name":"n","version":"../1"}"#,
            r#"{"slot":"s","name":"n","version":"1","release":0}"#,
            r#"{"slot":"s","name":"n","version":"1","expires_in_days":0}"#,
            r#"{"slot":"s","name":"n","version":"1","inputs":[]}"#,
            r#"{"slot":"s","name":"n","version":"1","quantization":"int4"}"#,
        ];
        for json in bad {
            assert!(ModelMetadata::parse(json.as_bytes()).is_err(), "{json}");
        }
    }

    const BASE: &str = r#""slot":"orientation","name":"rapid","version":"1.0.0""#;

    fn with_engines(engines: &str) -> Result<ModelMetadata, IntakeError> {
        ModelMetadata::parse(format!(r#"{{{BASE},"engines":{engines}}}"#).as_bytes())
    }

    #[test]
    fn an_engine_policy_in_the_metadata_is_read_as_the_manifest_has_it() {
        let meta = with_engines(
            r#"{"candidates":["onnxruntime-tensorrt-fp16","onnxruntime-cuda","tract"],"tolerance":{"fp16":0.05}}"#,
        )
        .unwrap();
        let policy = meta.engines.unwrap();
        assert_eq!(
            policy.candidates,
            Candidates::List(vec![
                EngineKind::OnnxruntimeTensorrtFp16,
                EngineKind::OnnxruntimeCuda,
                EngineKind::Tract
            ])
        );
        assert_eq!(policy.tolerance[&Precision::Fp16], 0.05);
        let auto = with_engines(r#"{"candidates":"auto"}"#).unwrap();
        assert_eq!(auto.engines, Some(EnginePolicy::auto()));
        let absent = ModelMetadata::parse(format!("{{{BASE}}}").as_bytes()).unwrap();
        assert_eq!(absent.engines, None);
    }

    #[test]
    fn a_malformed_engine_policy_is_refused_naming_the_engines_field() {
        for (engines, says) in [
            (r#""auto""#, "invalid type"),
            (r#"{"candidates":"fastest"}"#, "\"fastest\""),
            (r#"{"candidates":[]}"#, "at least one engine"),
            (
                r#"{"candidates":["tract","tensorflow"]}"#,
                "unknown engine \"tensorflow\"",
            ),
            (r#"{"candidates":[7]}"#, "not an engine name"),
            (
                r#"{"candidates":"auto","prefer":"gpu"}"#,
                "unknown field `prefer`",
            ),
            (r#"{"candidates":"auto","tolerance":{"fp8":0.1}}"#, "fp8"),
            (
                r#"{"candidates":"auto","tolerance":{"fp16":-1}}"#,
                "tolerance.fp16",
            ),
            (
                r#"{"candidates":"auto","tolerance":{"native":0.1}}"#,
                "top-level `tolerance`",
            ),
            (r#"{"candidates":["tract","tract"]}"#, "tract twice"),
            (
                r#"{"candidates":["onnxruntime-tensorrt-int8"]}"#,
                "needs `tolerance.int8`",
            ),
        ] {
            match with_engines(engines) {
                Err(IntakeError::Field { field, reason }) => {
                    assert_eq!(field, "engines", "{engines}");
                    assert!(reason.contains(says), "{engines}: {reason}");
                }
                other => panic!("{engines}: {other:?}"),
            }
        }
        // Another field's error is still that field's.
        let other = ModelMetadata::parse(
            format!(r#"{{{BASE},"colour":"red","engines":{{"candidates":"auto"}}}}"#).as_bytes(),
        );
        assert!(matches!(other, Err(IntakeError::Metadata(_))), "{other:?}");
    }

    fn checked() -> Checked {
        Checked {
            inputs: vec![],
            outputs: vec![],
            reference: None,
        }
    }

    fn artifact() -> Artifact {
        Artifact {
            size: 1,
            sha256: Sha256Digest::of(b"m"),
            format: botfleet_protocol::manifest::ModelFormat::Onnx,
            quantization: Quantization::Fp32,
        }
    }

    #[test]
    fn the_server_default_applies_only_when_the_metadata_names_no_policy() {
        let now = Timestamp::UNIX_EPOCH;
        let open = ModelMetadata::parse(format!("{{{BASE}}}").as_bytes()).unwrap();
        let manifest = build_manifest(
            &open,
            1,
            artifact(),
            checked(),
            None,
            now,
            &EnginePolicy::auto(),
        )
        .unwrap();
        assert_eq!(manifest.engines, EnginePolicy::auto());
        let tract_only = with_engines(r#"{"candidates":["tract"]}"#).unwrap();
        let manifest = build_manifest(
            &tract_only,
            1,
            artifact(),
            checked(),
            None,
            now,
            &EnginePolicy::auto(),
        )
        .unwrap();
        assert_eq!(manifest.engines, EnginePolicy::default());
        let json = serde_json::to_value(&manifest).unwrap();
        assert!(
            json.get("engines").is_none(),
            "tract only is what a manifest without `engines` means"
        );
    }

    #[test]
    fn the_seed_is_the_digest_prefix_little_endian() {
        let digest = Sha256Digest::from_bytes([
            1, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
            9, 9, 9,
        ]);
        assert_eq!(seed_of(&digest), 1);
    }
}
