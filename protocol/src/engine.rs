//! Inference engines: which ones a model may run on (in the manifest), which ones a robot
//! has (in its info), and what the gate measured on each (in the `benchmarked` event).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// An engine a robot can run an ONNX model on. TensorRT builds at reduced precision are
/// engines of their own: they give other outputs, so they are checked and chosen apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// tract, pure Rust on the CPU: always there.
    Tract,
    /// ONNX Runtime's CPU execution provider.
    OnnxruntimeCpu,
    /// ONNX Runtime's CUDA execution provider.
    OnnxruntimeCuda,
    /// ONNX Runtime's TensorRT execution provider at the model's own precision.
    OnnxruntimeTensorrt,
    /// TensorRT with FP16 kernels allowed.
    OnnxruntimeTensorrtFp16,
    /// TensorRT with INT8 kernels allowed (for QDQ models: their own scales).
    OnnxruntimeTensorrtInt8,
}

impl EngineKind {
    pub const ALL: [EngineKind; 6] = [
        EngineKind::OnnxruntimeTensorrtInt8,
        EngineKind::OnnxruntimeTensorrtFp16,
        EngineKind::OnnxruntimeTensorrt,
        EngineKind::OnnxruntimeCuda,
        EngineKind::OnnxruntimeCpu,
        EngineKind::Tract,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Tract => "tract",
            EngineKind::OnnxruntimeCpu => "onnxruntime-cpu",
            EngineKind::OnnxruntimeCuda => "onnxruntime-cuda",
            EngineKind::OnnxruntimeTensorrt => "onnxruntime-tensorrt",
            EngineKind::OnnxruntimeTensorrtFp16 => "onnxruntime-tensorrt-fp16",
            EngineKind::OnnxruntimeTensorrtInt8 => "onnxruntime-tensorrt-int8",
        }
    }

    /// The precision the engine computes at, against which its tolerance is looked up.
    pub fn precision(self) -> Precision {
        match self {
            EngineKind::OnnxruntimeTensorrtFp16 => Precision::Fp16,
            EngineKind::OnnxruntimeTensorrtInt8 => Precision::Int8,
            _ => Precision::Native,
        }
    }

    pub fn is_onnxruntime(self) -> bool {
        self != EngineKind::Tract
    }

    pub fn is_tensorrt(self) -> bool {
        matches!(
            self,
            EngineKind::OnnxruntimeTensorrt
                | EngineKind::OnnxruntimeTensorrtFp16
                | EngineKind::OnnxruntimeTensorrtInt8
        )
    }

    /// Runs on the GPU (CUDA or TensorRT).
    pub fn is_gpu(self) -> bool {
        matches!(self, EngineKind::OnnxruntimeCuda) || self.is_tensorrt()
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineKind::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = EngineKind::ALL.iter().map(|e| e.as_str()).collect();
                format!("unknown engine {s:?} (known: {})", known.join(", "))
            })
    }
}

/// The numeric precision of an engine, relative to the model file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// What the file says (FP32 weights stay FP32, QDQ stays INT8 where it is).
    Native,
    Fp16,
    Int8,
}

/// Which engines the gate may pick from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidates {
    /// Every engine the robot has; reduced-precision TensorRT only with a tolerance for it.
    Auto,
    /// These, in order of preference.
    List(Vec<EngineKind>),
}

impl Serialize for Candidates {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Candidates::Auto => s.serialize_str("auto"),
            Candidates::List(list) => list.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Candidates {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<EngineKind>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "auto" => Ok(Candidates::Auto),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "engines.candidates must be \"auto\" or a list of engines, not {w:?}"
            ))),
            Raw::List(list) if list.is_empty() => Err(serde::de::Error::custom(
                "engines.candidates must name at least one engine",
            )),
            Raw::List(list) => Ok(Candidates::List(list)),
        }
    }
}

/// The manifest's word on engines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnginePolicy {
    pub candidates: Candidates,
    /// Largest absolute output difference against the reference allowed at a reduced
    /// precision; the reference's own tolerance covers [`Precision::Native`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tolerance: BTreeMap<Precision, f32>,
}

impl Default for EnginePolicy {
    /// What a manifest without an `engines` field meant before there were engines: tract.
    fn default() -> Self {
        Self {
            candidates: Candidates::List(vec![EngineKind::Tract]),
            tolerance: BTreeMap::new(),
        }
    }
}

impl EnginePolicy {
    /// Every engine the robot has, with a tolerance for reduced precisions where given.
    pub fn auto() -> Self {
        Self {
            candidates: Candidates::Auto,
            tolerance: BTreeMap::new(),
        }
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The tolerance for `engine`: the reference's for native precision, the policy's for a
    /// reduced one (`None`: that precision cannot be checked, so it is not a candidate).
    pub fn tolerance_for(&self, engine: EngineKind, reference_tolerance: f32) -> Option<f32> {
        match engine.precision() {
            Precision::Native => Some(reference_tolerance),
            other => self.tolerance.get(&other).copied(),
        }
    }

    /// The engines to measure, in order of preference, out of those `available` on the
    /// robot. `has_reference`: whether outputs can be checked at all (reduced precisions
    /// are candidates only when they can).
    pub fn select(&self, available: &[EngineKind], has_reference: bool) -> Vec<EngineKind> {
        let checkable = |e: &EngineKind| {
            e.precision() == Precision::Native
                || (has_reference && self.tolerance.contains_key(&e.precision()))
        };
        let order: Vec<EngineKind> = match &self.candidates {
            Candidates::Auto => EngineKind::ALL.to_vec(),
            Candidates::List(list) => list.clone(),
        };
        let mut out: Vec<EngineKind> = Vec::new();
        for e in order {
            if available.contains(&e) && checkable(&e) && !out.contains(&e) {
                out.push(e);
            }
        }
        out
    }
}

/// What the gate measured on one engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineBench {
    pub engine: EngineKind,
    /// Load time, including a TensorRT engine build (or its reuse from the cache).
    pub load_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p99_ms: Option<f64>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub reference_max_abs_err: Option<f32>,
    /// Peak resident memory while this engine loaded and ran, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// The TensorRT engine came from the robot's cache rather than a new build.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
    /// The accuracy gate's figure: share of the evaluation set that agreed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    pub passed: bool,
    /// Why it did not pass (or could not run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What a robot can run models on, in its retained info.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnginesInfo {
    /// Engines usable now, tract always among them.
    pub available: Vec<EngineKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnxruntime: Option<OnnxRuntimeInfo>,
    /// Engines configured or expected but not usable, with the reason.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unavailable: BTreeMap<String, String>,
    /// CUDA runtime version, where a CUDA library was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<String>,
    /// TensorRT version, where the TensorRT library was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorrt: Option<String>,
    /// The GPU's compute capability as `major.minor` (8.7 on Orin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_compute_capability: Option<String>,
}

/// The ONNX Runtime library the agent loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OnnxRuntimeInfo {
    pub version: String,
    pub library: String,
    /// Execution providers the library was built with (`CPUExecutionProvider`, …).
    pub providers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_read_auto_or_a_list_and_refuse_anything_else() {
        let auto: EnginePolicy = serde_json::from_str(r#"{"candidates":"auto"}"#).unwrap();
        assert_eq!(auto.candidates, Candidates::Auto);
        let list: EnginePolicy = serde_json::from_str(
            r#"{"candidates":["onnxruntime-cuda","tract"],"tolerance":{"fp16":0.05}}"#,
        )
        .unwrap();
        assert_eq!(
            list.candidates,
            Candidates::List(vec![EngineKind::OnnxruntimeCuda, EngineKind::Tract])
        );
        assert_eq!(list.tolerance[&Precision::Fp16], 0.05);
        for bad in [
            r#"{"candidates":"fastest"}"#,
            r#"{"candidates":[]}"#,
            r#"{"candidates":["tensorflow"]}"#,
            r#"{"candidates":"auto","extra":1}"#,
        ] {
            assert!(serde_json::from_str::<EnginePolicy>(bad).is_err(), "{bad}");
        }
        let back = serde_json::to_string(&auto).unwrap();
        assert_eq!(back, r#"{"candidates":"auto"}"#);
    }

    #[test]
    fn selection_keeps_preference_order_and_drops_what_cannot_be_checked() {
        let available = [
            EngineKind::Tract,
            EngineKind::OnnxruntimeCpu,
            EngineKind::OnnxruntimeTensorrtFp16,
        ];
        let auto = EnginePolicy::auto();
        assert_eq!(
            auto.select(&available, true),
            vec![EngineKind::OnnxruntimeCpu, EngineKind::Tract],
            "fp16 has no tolerance"
        );
        let mut with_fp16 = EnginePolicy::auto();
        with_fp16.tolerance.insert(Precision::Fp16, 0.05);
        assert_eq!(
            with_fp16.select(&available, true)[0],
            EngineKind::OnnxruntimeTensorrtFp16
        );
        assert!(
            !with_fp16
                .select(&available, false)
                .contains(&EngineKind::OnnxruntimeTensorrtFp16),
            "no reference, no reduced precision"
        );
        let list = EnginePolicy {
            candidates: Candidates::List(vec![EngineKind::Tract, EngineKind::OnnxruntimeCuda]),
            tolerance: BTreeMap::new(),
        };
        assert_eq!(list.select(&available, true), vec![EngineKind::Tract]);
        assert_eq!(
            EnginePolicy::default().select(&available, true),
            vec![EngineKind::Tract]
        );
    }

    #[test]
    fn engine_names_round_trip() {
        for e in EngineKind::ALL {
            assert_eq!(e.as_str().parse::<EngineKind>().unwrap(), e);
            assert_eq!(
                serde_json::to_string(&e).unwrap(),
                format!("\"{}\"", e.as_str())
            );
        }
        assert!("onnx".parse::<EngineKind>().is_err());
    }
}
