//! The accuracy gate: a small evaluation set that travels with a model.
//!
//! The training pipeline exports samples of its held-out data with the answers of the float
//! parent model. The server stores the set next to the artifact and names it, by size and
//! SHA-256, in the signed manifest ([`Evaluation`] in the gate). The robot downloads it,
//! runs every sample through each candidate engine and refuses an engine whose answers
//! agree with the parent's on fewer than `min_agreement` of the samples: a quantized model
//! that changes answers is stopped on the hardware it would serve on.

use serde::{Deserialize, Serialize};

use crate::manifest::Sha256Digest;

/// The evaluation set format this crate reads and writes.
pub const EVALUATION_SCHEMA: u32 = 1;
/// Largest evaluation set file accepted, in bytes.
pub const MAX_EVALUATION_BYTES: u64 = 16 * 1024 * 1024;
/// Most samples in one set.
pub const MAX_EVALUATION_SAMPLES: usize = 4096;

/// How a sample's answer is compared with the parent's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgreementMetric {
    /// The index of the largest output value equals the parent's `top1`.
    #[default]
    Top1Agreement,
    /// Every output value is within `tolerance` of the parent's `output`.
    WithinTolerance,
}

impl AgreementMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Top1Agreement => "top1_agreement",
            Self::WithinTolerance => "within_tolerance",
        }
    }

    /// The figure in words, for reasons people read.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Top1Agreement => "top-1 agreement",
            Self::WithinTolerance => "agreement within tolerance",
        }
    }
}

/// The accuracy gate in a manifest: which set, and what the robot must measure on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Evaluation {
    /// The set file: exact size and SHA-256 (downloaded like the artifact).
    pub size: u64,
    pub sha256: Sha256Digest,
    /// Samples in the set.
    pub samples: u32,
    /// The model input each sample feeds.
    pub input: String,
    /// The model output compared.
    pub output: String,
    #[serde(default)]
    pub metric: AgreementMetric,
    /// Share of samples (0..=1) that must agree.
    pub min_agreement: f64,
    /// Largest absolute difference per value, for [`AgreementMetric::WithinTolerance`].
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::finite::option"
    )]
    pub tolerance: Option<f32>,
    /// The float model whose answers the set holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_sha256: Option<Sha256Digest>,
}

impl Evaluation {
    /// Whether `agreement` passes, with the sentence a refusal carries when it does not.
    pub fn judge(&self, agreement: &Agreement) -> Result<(), String> {
        let share = agreement.share();
        if share >= self.min_agreement {
            return Ok(());
        }
        Err(format!(
            "accuracy gate: {} {share:.3} on {} samples is below {}",
            self.metric.describe(),
            agreement.samples,
            self.min_agreement
        ))
    }
}

/// One sample: its input values and the parent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSample {
    /// Input values, flattened row-major to the set's `shape`.
    pub data: Vec<f32>,
    /// The parent's top-1 class (index into the flattened output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top1: Option<u32>,
    /// The parent's output values, flattened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Vec<f32>>,
}

/// The evaluation set file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSet {
    pub schema: u32,
    pub input: String,
    pub output: String,
    /// Shape of one sample's input, batch included (FP32).
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_sha256: Option<Sha256Digest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset_digest: Option<String>,
    pub samples: Vec<EvaluationSample>,
}

/// Why an evaluation set was refused.
#[derive(Debug, thiserror::Error)]
pub enum EvaluationError {
    #[error("evaluation set is {0} bytes, more than the {MAX_EVALUATION_BYTES} allowed")]
    TooLarge(u64),
    #[error("evaluation set is not valid: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("evaluation set schema {0} is not supported (this build knows {EVALUATION_SCHEMA})")]
    Schema(u32),
    #[error("evaluation set: {0}")]
    Invalid(String),
}

fn invalid(reason: impl Into<String>) -> EvaluationError {
    EvaluationError::Invalid(reason.into())
}

impl EvaluationSet {
    /// Parses a set file and checks it is consistent in itself: sample count, every
    /// sample's size against `shape`, finite values, and what `metric` needs.
    pub fn parse(bytes: &[u8], metric: AgreementMetric) -> Result<Self, EvaluationError> {
        if bytes.len() as u64 > MAX_EVALUATION_BYTES {
            return Err(EvaluationError::TooLarge(bytes.len() as u64));
        }
        let set: Self = serde_json::from_slice(bytes).map_err(EvaluationError::Malformed)?;
        if set.schema != EVALUATION_SCHEMA {
            return Err(EvaluationError::Schema(set.schema));
        }
        set.check(metric)?;
        Ok(set)
    }

    fn check(&self, metric: AgreementMetric) -> Result<(), EvaluationError> {
        if self.samples.is_empty() || self.samples.len() > MAX_EVALUATION_SAMPLES {
            return Err(invalid(format!(
                "has {} samples; 1 to {MAX_EVALUATION_SAMPLES} allowed",
                self.samples.len()
            )));
        }
        let len = self
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|&n| n > 0)
            .ok_or_else(|| invalid(format!("shape {:?} has no elements", self.shape)))?;
        let mut output_len = None;
        for (i, sample) in self.samples.iter().enumerate() {
            if sample.data.len() != len {
                return Err(invalid(format!(
                    "sample {i} has {} input values, shape {:?} needs {len}",
                    sample.data.len(),
                    self.shape
                )));
            }
            if sample.data.iter().any(|v| !v.is_finite()) {
                return Err(invalid(format!("sample {i} has a non-finite input value")));
            }
            match metric {
                AgreementMetric::Top1Agreement if sample.top1.is_none() => {
                    return Err(invalid(format!(
                        "sample {i} has no `top1`, which top1_agreement compares"
                    )));
                }
                AgreementMetric::WithinTolerance => {
                    let Some(output) = &sample.output else {
                        return Err(invalid(format!(
                            "sample {i} has no `output`, which within_tolerance compares"
                        )));
                    };
                    if output.iter().any(|v| !v.is_finite()) {
                        return Err(invalid(format!("sample {i} has a non-finite output value")));
                    }
                    if *output_len.get_or_insert(output.len()) != output.len() {
                        return Err(invalid(format!(
                            "sample {i} has {} output values, the first sample {}",
                            output.len(),
                            output_len.unwrap_or_default()
                        )));
                    }
                }
                AgreementMetric::Top1Agreement => {}
            }
        }
        Ok(())
    }

    /// Checks the set against the model it is for: the input's name and shape, the output's
    /// name and size, and that every `top1` is an index of that output.
    pub fn fits(
        &self,
        inputs: &[crate::tensor::TensorSpec],
        outputs: &[crate::tensor::TensorSpec],
    ) -> Result<(), EvaluationError> {
        let input = inputs
            .iter()
            .find(|i| i.name == self.input)
            .ok_or_else(|| {
                invalid(format!(
                    "input {:?} is not an input of the model ({})",
                    self.input,
                    names(inputs)
                ))
            })?;
        if inputs.len() != 1 {
            return Err(invalid(format!(
                "the model has {} inputs; a set feeds exactly one",
                inputs.len()
            )));
        }
        if input.datatype != crate::tensor::DataType::Fp32 {
            return Err(invalid(format!(
                "input {:?} is {}, a set feeds FP32 only",
                input.name,
                input.datatype.as_str()
            )));
        }
        let want: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        if input.shape != want {
            return Err(invalid(format!(
                "shape {:?} differs from the model input's {:?}",
                self.shape, input.shape
            )));
        }
        let output = outputs
            .iter()
            .find(|o| o.name == self.output)
            .ok_or_else(|| {
                invalid(format!(
                    "output {:?} is not an output of the model ({})",
                    self.output,
                    names(outputs)
                ))
            })?;
        let output_len = output.element_count();
        for (i, sample) in self.samples.iter().enumerate() {
            if let (Some(top1), Some(len)) = (sample.top1, output_len)
                && top1 as usize >= len
            {
                return Err(invalid(format!(
                    "sample {i} has top1 {top1}, output {:?} has {len} values",
                    self.output
                )));
            }
            if let (Some(values), Some(len)) = (&sample.output, output_len)
                && values.len() != len
            {
                return Err(invalid(format!(
                    "sample {i} has {} output values, output {:?} has {len}",
                    values.len(),
                    self.output
                )));
            }
        }
        Ok(())
    }
}

fn names(specs: &[crate::tensor::TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| format!("{:?}", s.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Index of the largest value; `None` when any value is NaN (no answer to agree with).
pub fn top1(values: &[f32]) -> Option<usize> {
    if values.iter().any(|v| v.is_nan()) {
        return None;
    }
    values
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
        .map(|(i, _)| i)
}

/// Whether the model's `got` output agrees with the sample's expected answer.
pub fn agrees(
    metric: AgreementMetric,
    tolerance: Option<f32>,
    sample: &EvaluationSample,
    got: &[f32],
) -> bool {
    match metric {
        AgreementMetric::Top1Agreement => sample
            .top1
            .is_some_and(|want| top1(got) == Some(want as usize)),
        AgreementMetric::WithinTolerance => sample
            .output
            .as_ref()
            .is_some_and(|want| within(tolerance, want, got)),
    }
}

/// Whether two models' answers agree: the same top-1 index (neither NaN), or every value
/// within `tolerance`.
pub fn answers_agree(
    metric: AgreementMetric,
    tolerance: Option<f32>,
    want: &[f32],
    got: &[f32],
) -> bool {
    match metric {
        AgreementMetric::Top1Agreement => top1(want).is_some_and(|w| top1(got) == Some(w)),
        AgreementMetric::WithinTolerance => within(tolerance, want, got),
    }
}

fn within(tolerance: Option<f32>, want: &[f32], got: &[f32]) -> bool {
    let tolerance = tolerance.unwrap_or(0.0);
    want.len() == got.len()
        && want
            .iter()
            .zip(got)
            .all(|(w, g)| (w - g).abs() <= tolerance)
}

/// What a model's answers on a set came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    pub samples: u32,
    pub agreed: u32,
}

impl Agreement {
    /// Share of samples that agreed (0 for an empty set).
    pub fn share(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            f64::from(self.agreed) / f64::from(self.samples)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DataType, TensorSpec};

    fn set_json(samples: &str) -> String {
        format!(
            r#"{{"schema":1,"input":"x","output":"logits","shape":[1,1,2,2],"samples":[{samples}]}}"#
        )
    }

    fn spec(name: &str, shape: &[i64]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: DataType::Fp32,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn a_well_formed_set_parses_and_fits_its_model() {
        let json = set_json(r#"{"data":[0,0.5,1,0.25],"top1":2,"output":[0,1,3]}"#);
        let set = EvaluationSet::parse(json.as_bytes(), AgreementMetric::Top1Agreement).unwrap();
        assert_eq!(set.samples.len(), 1);
        set.fits(&[spec("x", &[1, 1, 2, 2])], &[spec("logits", &[1, 3])])
            .unwrap();
        EvaluationSet::parse(json.as_bytes(), AgreementMetric::WithinTolerance).unwrap();
    }

    #[test]
    fn inconsistent_sets_are_refused_with_the_reason() {
        for (samples, metric, says) in [
            ("", AgreementMetric::Top1Agreement, "0 samples"),
            (
                r#"{"data":[0,0,0],"top1":1}"#,
                AgreementMetric::Top1Agreement,
                "3 input values",
            ),
            (
                r#"{"data":[0,0,0,0]}"#,
                AgreementMetric::Top1Agreement,
                "no `top1`",
            ),
            (
                r#"{"data":[0,0,0,0],"top1":1}"#,
                AgreementMetric::WithinTolerance,
                "no `output`",
            ),
            (
                r#"{"data":[0,0,0,0],"top1":1,"colour":"red"}"#,
                AgreementMetric::Top1Agreement,
                "unknown field",
            ),
        ] {
            let err = EvaluationSet::parse(set_json(samples).as_bytes(), metric).unwrap_err();
            assert!(err.to_string().contains(says), "{samples}: {err}");
        }
        let other_schema = r#"{"schema":2,"input":"x","output":"y","shape":[1],"samples":[]}"#;
        assert!(matches!(
            EvaluationSet::parse(other_schema.as_bytes(), AgreementMetric::Top1Agreement),
            Err(EvaluationError::Schema(2))
        ));
    }

    #[test]
    fn a_set_for_another_model_does_not_fit() {
        let json = set_json(r#"{"data":[0,0,0,0],"top1":9}"#);
        let set = EvaluationSet::parse(json.as_bytes(), AgreementMetric::Top1Agreement).unwrap();
        for (inputs, outputs, says) in [
            (
                vec![spec("image", &[1, 1, 2, 2])],
                vec![spec("logits", &[1, 10])],
                "\"image\"",
            ),
            (
                vec![spec("x", &[1, 1, 4, 1])],
                vec![spec("logits", &[1, 10])],
                "differs",
            ),
            (
                vec![spec("x", &[1, 1, 2, 2])],
                vec![spec("probs", &[1, 10])],
                "\"probs\"",
            ),
            (
                vec![spec("x", &[1, 1, 2, 2])],
                vec![spec("logits", &[1, 3])],
                "top1 9",
            ),
        ] {
            let err = set.fits(&inputs, &outputs).unwrap_err();
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn agreement_compares_answers_and_nan_never_agrees() {
        let sample = EvaluationSample {
            data: vec![],
            top1: Some(1),
            output: Some(vec![0.0, 2.0]),
        };
        assert!(agrees(
            AgreementMetric::Top1Agreement,
            None,
            &sample,
            &[0.1, 0.9]
        ));
        assert!(!agrees(
            AgreementMetric::Top1Agreement,
            None,
            &sample,
            &[0.9, 0.1]
        ));
        assert!(!agrees(
            AgreementMetric::Top1Agreement,
            None,
            &sample,
            &[f32::NAN, 1.0]
        ));
        assert!(agrees(
            AgreementMetric::WithinTolerance,
            Some(0.1),
            &sample,
            &[0.05, 1.95]
        ));
        assert!(!agrees(
            AgreementMetric::WithinTolerance,
            Some(0.01),
            &sample,
            &[0.05, 1.95]
        ));
        assert_eq!(top1(&[1.0, 3.0, 3.0]), Some(1), "ties go to the first");
    }

    #[test]
    fn the_refusal_names_the_figure_and_the_threshold() {
        let evaluation = Evaluation {
            size: 1,
            sha256: Sha256Digest::of(b"set"),
            samples: 64,
            input: "x".into(),
            output: "logits".into(),
            metric: AgreementMetric::Top1Agreement,
            min_agreement: 0.95,
            tolerance: None,
            parent_sha256: None,
        };
        assert!(
            evaluation
                .judge(&Agreement {
                    samples: 64,
                    agreed: 62
                })
                .is_ok()
        );
        let why = evaluation
            .judge(&Agreement {
                samples: 64,
                agreed: 40,
            })
            .unwrap_err();
        assert_eq!(
            why,
            "accuracy gate: top-1 agreement 0.625 on 64 samples is below 0.95"
        );
    }
}
