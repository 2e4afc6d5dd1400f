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
    /// The same boxes above a score, each matched one to one with an intersection over
    /// union of at least `min_iou` ([`BoxSpec`]): for detectors, and only between two
    /// models' answers (a shadow), since it needs the outputs' shapes.
    BoxIou,
}

impl AgreementMetric {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Top1Agreement => "top1_agreement",
            Self::WithinTolerance => "within_tolerance",
            Self::BoxIou => "box_iou",
        }
    }

    /// The figure in words, for reasons people read.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Top1Agreement => "top-1 agreement",
            Self::WithinTolerance => "agreement within tolerance",
            Self::BoxIou => "box agreement (IoU)",
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
                AgreementMetric::BoxIou => {
                    return Err(invalid(
                        "box_iou compares two models' answers on live requests (a shadow); an evaluation set compares by top1_agreement or within_tolerance".to_owned(),
                    ));
                }
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
        // Refused for sets when they are read (`check`).
        AgreementMetric::BoxIou => false,
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
        // Boxes need the outputs' shapes: compared by `boxes_agree`.
        AgreementMetric::BoxIou => false,
    }
}

/// How a detector's boxes are written in its output rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxFormat {
    /// Corners: x1, y1, x2, y2.
    #[default]
    Xyxy,
    /// Top-left corner, width, height.
    Xywh,
    /// Centre, width, height.
    Cxcywh,
}

fn half() -> f32 {
    0.5
}

/// How boxes are read from a detector's answer and matched, for [`AgreementMetric::BoxIou`].
/// The compared output holds one box per row (its last dimension, at least 4 wide: the
/// box, then, when 5 or wider and no `scores` output is named, the score).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoxSpec {
    #[serde(default)]
    pub format: BoxFormat,
    /// An output with one score per box (absent: the 5th value of each row, or every box).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores: Option<String>,
    /// Boxes scored below this are not compared.
    #[serde(default = "half", deserialize_with = "crate::finite::f32")]
    pub min_score: f32,
    /// A box matches another when their intersection over union is at least this.
    #[serde(default = "half", deserialize_with = "crate::finite::f32")]
    pub min_iou: f32,
}

impl Default for BoxSpec {
    fn default() -> Self {
        Self {
            format: BoxFormat::Xyxy,
            scores: None,
            min_score: half(),
            min_iou: half(),
        }
    }
}

/// One model's boxes: the compared output's values, its row width, and the scores output
/// when one is named.
#[derive(Debug, Clone, Copy)]
pub struct Detections<'a> {
    pub values: &'a [f32],
    pub width: usize,
    pub scores: Option<&'a [f32]>,
}

impl Detections<'_> {
    /// The boxes scored at least `spec.min_score`, as corners, highest score first; `None`
    /// when the output cannot be read as boxes (a row narrower than 4, a scores output of
    /// another length, a kept box with a NaN).
    fn kept(&self, spec: &BoxSpec) -> Option<Vec<[f32; 4]>> {
        if self.width < 4 || !self.values.len().is_multiple_of(self.width) {
            return None;
        }
        let rows = self.values.len() / self.width;
        if self.scores.is_some_and(|s| s.len() != rows) {
            return None;
        }
        let mut kept = Vec::new();
        for (i, row) in self.values.chunks_exact(self.width).enumerate() {
            let score = match (self.scores, row.get(4)) {
                (Some(scores), _) => scores[i],
                (None, Some(&score)) => score,
                (None, None) => 1.0,
            };
            // A NaN score is not above anything.
            if score.is_nan() || score < spec.min_score {
                continue;
            }
            let (a, b, c, d) = (row[0], row[1], row[2], row[3]);
            let corners = match spec.format {
                BoxFormat::Xyxy => [a, b, c, d],
                BoxFormat::Xywh => [a, b, a + c, b + d],
                BoxFormat::Cxcywh => [a - c / 2.0, b - d / 2.0, a + c / 2.0, b + d / 2.0],
            };
            if corners.iter().any(|v| !v.is_finite()) {
                return None;
            }
            kept.push((score, corners));
        }
        kept.sort_by(|x, y| y.0.total_cmp(&x.0));
        Some(kept.into_iter().map(|(_, b)| b).collect())
    }
}

/// Intersection over union of two boxes given as corners (0 when either has no area).
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Whether two detectors' answers agree: as many boxes above the score each, and each of
/// `want`'s (highest score first) matched to its own box of `got` with an IoU of at least
/// `min_iou`.
pub fn boxes_agree(spec: &BoxSpec, want: Detections<'_>, got: Detections<'_>) -> bool {
    let (Some(want), Some(got)) = (want.kept(spec), got.kept(spec)) else {
        return false;
    };
    if want.len() != got.len() {
        return false;
    }
    let mut taken = vec![false; got.len()];
    for w in &want {
        let best = (got.iter().enumerate())
            .filter(|(i, _)| !taken[*i])
            .map(|(i, g)| (i, iou(w, g)))
            .max_by(|x, y| x.1.total_cmp(&y.1));
        match best {
            Some((i, overlap)) if overlap >= spec.min_iou => taken[i] = true,
            _ => return false,
        }
    }
    true
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

    fn dets(values: &[f32], width: usize) -> Detections<'_> {
        Detections {
            values,
            width,
            scores: None,
        }
    }

    #[test]
    fn boxes_match_one_to_one_above_the_score_in_any_order_and_format() {
        let spec = BoxSpec::default();
        // Two boxes and a weak one (score 0.1, not compared), listed in another order.
        let want = [
            0.0, 0.0, 10.0, 10.0, 0.9, 20.0, 20.0, 30.0, 30.0, 0.8, 50.0, 50.0, 60.0, 60.0, 0.1,
        ];
        let got = [21.0, 21.0, 31.0, 31.0, 0.7, 1.0, 0.0, 11.0, 10.0, 0.95];
        assert!(boxes_agree(&spec, dets(&want, 5), dets(&got, 5)));
        // One box moved away: 0 overlap.
        let moved = [21.0, 21.0, 31.0, 31.0, 0.7, 40.0, 40.0, 50.0, 50.0, 0.95];
        assert!(!boxes_agree(&spec, dets(&want, 5), dets(&moved, 5)));
        // A box the other lacks (its score fell under the threshold).
        let missing = [21.0, 21.0, 31.0, 31.0, 0.7, 1.0, 0.0, 11.0, 10.0, 0.3];
        assert!(!boxes_agree(&spec, dets(&want, 5), dets(&missing, 5)));
        // Two boxes on one: a box is matched once.
        let twice = [0.0, 0.0, 10.0, 10.0, 0.9, 0.0, 0.0, 10.0, 10.0, 0.9];
        assert!(!boxes_agree(&spec, dets(&want, 5), dets(&twice, 5)));
        // Centre and size; a separate scores output.
        let centred = BoxSpec {
            format: BoxFormat::Cxcywh,
            ..BoxSpec::default()
        };
        let a = [5.0, 5.0, 10.0, 10.0];
        let b = [5.5, 5.0, 10.0, 10.0];
        let scores = [0.9];
        let with = |values| Detections {
            values,
            width: 4,
            scores: Some(&scores),
        };
        assert!(boxes_agree(&centred, with(&a), with(&b)));
        assert!((iou(&[0.0, 0.0, 10.0, 10.0], &[5.0, 0.0, 15.0, 10.0]) - 1.0 / 3.0).abs() < 1e-6);
        // Unreadable answers never agree: rows under 4 wide, scores of another length, NaN.
        assert!(!boxes_agree(&spec, dets(&a[..3], 3), dets(&a[..3], 3)));
        let short = Detections {
            values: &a,
            width: 4,
            scores: Some(&[]),
        };
        assert!(!boxes_agree(&spec, short, short));
        let nan = [f32::NAN, 0.0, 1.0, 1.0, 0.9];
        assert!(!boxes_agree(&spec, dets(&nan, 5), dets(&nan, 5)));
        // No box above the score on either side: nothing disagrees.
        let weak = [0.0, 0.0, 1.0, 1.0, 0.2];
        assert!(boxes_agree(&spec, dets(&weak, 5), dets(&[], 5)));
    }

    #[test]
    fn an_evaluation_set_is_not_compared_by_boxes() {
        let set = set_json(r#"{"data":[0,0,0,0],"top1":0}"#);
        let err = EvaluationSet::parse(set.as_bytes(), AgreementMetric::BoxIou).unwrap_err();
        assert!(err.to_string().contains("box_iou"), "{err}");
    }

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
