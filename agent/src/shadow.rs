//! Shadow inference: a candidate that passed its gate runs beside the serving model on
//! copies of live requests before it may serve them.
//!
//! The serving path copies a sampled request's inputs and the serving model's outputs into
//! a bounded queue ([`Tap::offer`]): never waiting, a full queue drops the copy (counted).
//! The answer the client gets is the serving model's, computed before the copy is offered,
//! so the shadow can neither delay nor change it. A thread at the lowest CPU priority
//! ([`crate::loader::LOADER_NICE`]) runs the candidate on each copy and compares its
//! answer with the serving model's ([`ShadowSpec::metric`]) until it has compared
//! [`ShadowSpec::requests`] or [`ShadowSpec::seconds`] ran out, then judges
//! ([`judge`]): agreement, and optionally the candidate's p99 against the serving model's
//! on the same requests. Where the slot's capture policy keeps disagreements, a request the
//! candidate answered otherwise is offered to capture ([`run_capturing`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use botfleet_engine::{Model, Tensor};
use botfleet_protocol::evaluation::{AgreementMetric, Detections, answers_agree, boxes_agree};
use botfleet_protocol::messages::{ShadowReport, ShadowSpec};

/// Copies waiting for the shadow thread; more are dropped, not queued.
const QUEUE: usize = 8;

/// One live request, as the serving model answered it.
#[derive(Debug)]
pub struct Sample {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
    pub serving_ms: f64,
    /// The model that answered (named by a captured disagreement).
    pub served: Option<crate::capture::Served>,
}

/// The serving path's end of a shadow: which requests to copy, and where to.
#[derive(Debug)]
pub struct Tap {
    sample_every: u64,
    seen: AtomicU64,
    dropped: AtomicU64,
    tx: SyncSender<Sample>,
}

impl Tap {
    /// A tap copying one request in `spec.sample_every`, and the shadow thread's end.
    pub fn new(spec: &ShadowSpec) -> (Self, Receiver<Sample>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let tap = Self {
            sample_every: u64::from(spec.sample_every.max(1)),
            seen: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            tx,
        };
        (tap, rx)
    }

    /// Whether this request is one to copy (counts it).
    pub fn wants(&self) -> bool {
        (self.seen.fetch_add(1, Ordering::Relaxed)).is_multiple_of(self.sample_every)
    }

    /// Hands a copy over without waiting; a full queue drops it.
    pub fn offer(&self, sample: Sample) {
        match self.tx.try_send(sample) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The values of `name` (else the first output) as `f32`.
fn values(outputs: &[Tensor], name: Option<&str>) -> Option<Vec<f32>> {
    let tensor = match name {
        Some(name) => outputs.iter().find(|t| t.name == name)?,
        None => outputs.first()?,
    };
    Some(tensor.data.to_f32())
}

/// The output `name` (else the first).
fn output<'a>(outputs: &'a [Tensor], name: Option<&str>) -> Option<&'a Tensor> {
    match name {
        Some(name) => outputs.iter().find(|t| t.name == name),
        None => outputs.first(),
    }
}

/// An answer read as boxes: the values, the row width, the scores.
type Read = (Vec<f32>, usize, Option<Vec<f32>>);

fn detections((values, width, scores): &Read) -> Detections<'_> {
    Detections {
        values,
        width: *width,
        scores: scores.as_deref(),
    }
}

/// Whether two detectors' answers have the same boxes (`box_iou`).
fn boxes(spec: &ShadowSpec, serving: &[Tensor], candidate: &[Tensor]) -> bool {
    let rules = spec.boxes.clone().unwrap_or_default();
    let read = |outputs: &[Tensor]| -> Option<Read> {
        let boxes = output(outputs, spec.output.as_deref())?;
        let width = *boxes.shape.last()?;
        let scores = match &rules.scores {
            Some(name) => Some(output(outputs, Some(name))?.data.to_f32()),
            None => None,
        };
        Some((boxes.data.to_f32(), width, scores))
    };
    let (Some(want), Some(got)) = (read(serving), read(candidate)) else {
        return false;
    };
    boxes_agree(&rules, detections(&want), detections(&got))
}

/// Whether two answers agree by `spec`'s metric.
pub fn agree(spec: &ShadowSpec, serving: &[Tensor], candidate: &[Tensor]) -> bool {
    if spec.metric == AgreementMetric::BoxIou {
        return boxes(spec, serving, candidate);
    }
    let name = spec.output.as_deref();
    let (Some(want), Some(got)) = (values(serving, name), values(candidate, name)) else {
        return false;
    };
    answers_agree(spec.metric, spec.tolerance, &want, &got)
}

/// What the shadow thread measured.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Tally {
    pub samples: u32,
    pub agreed: u32,
    pub candidate_ms: Vec<f64>,
    pub serving_ms: Vec<f64>,
}

fn p99(values: &[f64]) -> Option<f64> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (!sorted.is_empty()).then(|| botfleet_engine::percentile(&sorted, 99.0))
}

/// The verdict on a tally.
pub fn judge(spec: &ShadowSpec, tally: &Tally, dropped: u64) -> ShadowReport {
    let agreement = botfleet_protocol::evaluation::Agreement {
        samples: tally.samples,
        agreed: tally.agreed,
    };
    let candidate_p99_ms = p99(&tally.candidate_ms);
    let serving_p99_ms = p99(&tally.serving_ms);
    let reason = if tally.samples == 0 {
        Some(format!(
            "shadow: no live request to compare within {} s",
            spec.seconds
        ))
    } else if agreement.share() < spec.min_agreement {
        Some(format!(
            "shadow: {} {:.3} on {} live requests is below {}",
            spec.metric.describe(),
            agreement.share(),
            tally.samples,
            spec.min_agreement
        ))
    } else {
        match (spec.max_p99_ratio, candidate_p99_ms, serving_p99_ms) {
            (Some(max), Some(candidate), Some(serving)) if candidate > serving * max => {
                Some(format!(
                    "shadow: p99 {candidate:.2} ms on live requests is {:.2}× the serving model's {serving:.2} ms; {max}× allowed",
                    candidate / serving.max(f64::MIN_POSITIVE)
                ))
            }
            _ => None,
        }
    };
    ShadowReport {
        samples: tally.samples,
        agreed: tally.agreed,
        metric: spec.metric,
        dropped,
        candidate_p99_ms,
        serving_p99_ms,
        passed: reason.is_none(),
        reason,
    }
}

/// Runs `candidate` on the copies from `rx` until `spec` is satisfied, the time is up or
/// the tap is gone. Blocking: run it on the loader thread.
pub fn run(candidate: &Model, spec: &ShadowSpec, rx: &Receiver<Sample>) -> Tally {
    run_capturing(candidate, spec, rx, None)
}

/// [`run`], offering each disagreement to `capture` (the serving model's outputs, the
/// candidate's, and the inputs when the slot's rate bound has room).
pub fn run_capturing(
    candidate: &Model,
    spec: &ShadowSpec,
    rx: &Receiver<Sample>,
    capture: Option<&crate::capture::Disagreements>,
) -> Tally {
    let deadline = Instant::now() + Duration::from_secs(spec.seconds);
    let mut tally = Tally::default();
    while tally.samples < spec.requests {
        let left = deadline.saturating_duration_since(Instant::now());
        let sample = match rx.recv_timeout(left) {
            Ok(sample) => sample,
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        };
        // Copied before the candidate takes them, only while a disagreement could be kept.
        let kept_inputs = capture
            .filter(|c| c.has_room())
            .map(|_| sample.inputs.clone());
        let started = Instant::now();
        let answer = candidate.run(sample.inputs);
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tally.samples += 1;
        tally.candidate_ms.push(ms);
        tally.serving_ms.push(sample.serving_ms);
        if answer
            .as_ref()
            .is_ok_and(|out| agree(spec, &sample.outputs, out))
        {
            tally.agreed += 1;
            continue;
        }
        let (Some(capture), Some(served)) = (capture, sample.served) else {
            continue;
        };
        let (candidate_outputs, detail) = match answer {
            Ok(out) => {
                let detail = disagreement(spec, &sample.outputs, &out);
                (out, detail)
            }
            Err(e) => (Vec::new(), format!("the candidate failed: {e}")),
        };
        capture.offer(
            served,
            kept_inputs,
            sample.outputs,
            candidate_outputs,
            detail,
            sample.serving_ms,
        );
    }
    tally
}

/// A disagreement in words: the two top-1 classes where the metric compares them.
fn disagreement(spec: &ShadowSpec, serving: &[Tensor], candidate: &[Tensor]) -> String {
    let top1 = |outputs: &[Tensor]| {
        let values = values(outputs, spec.output.as_deref())?;
        values
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i)
    };
    match (spec.metric, top1(serving), top1(candidate)) {
        (AgreementMetric::Top1Agreement, Some(want), Some(got)) => {
            format!("top-1 {want}, the candidate's {got}")
        }
        _ => format!("the candidate failed {}", spec.metric.describe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botfleet_engine::TensorData;

    fn spec() -> ShadowSpec {
        serde_json::from_value(serde_json::json!({
            "requests": 10, "seconds": 5, "min_agreement": 0.9
        }))
        .unwrap()
    }

    fn out(values: &[f32]) -> Vec<Tensor> {
        vec![Tensor {
            name: "probs".into(),
            shape: vec![values.len()],
            data: TensorData::Fp32(values.to_vec()),
        }]
    }

    #[test]
    fn top1_and_tolerance_compare_the_named_output() {
        let mut spec = spec();
        assert!(agree(&spec, &out(&[0.1, 0.9]), &out(&[0.4, 0.6])));
        assert!(!agree(&spec, &out(&[0.1, 0.9]), &out(&[0.6, 0.4])));
        assert!(!agree(
            &spec,
            &out(&[f32::NAN, 0.9]),
            &out(&[f32::NAN, 0.9])
        ));
        spec.metric = AgreementMetric::WithinTolerance;
        spec.tolerance = Some(0.05);
        assert!(agree(&spec, &out(&[0.1, 0.9]), &out(&[0.14, 0.86])));
        assert!(!agree(&spec, &out(&[0.1, 0.9]), &out(&[0.2, 0.8])));
        spec.output = Some("missing".into());
        assert!(!agree(&spec, &out(&[0.1, 0.9]), &out(&[0.1, 0.9])));
    }

    #[test]
    fn box_iou_reads_the_boxes_output_by_its_rows_and_a_scores_output() {
        let spec: ShadowSpec = serde_json::from_value(serde_json::json!({
            "requests": 10, "seconds": 5, "min_agreement": 0.9, "metric": "box_iou",
            "output": "boxes", "boxes": {"scores": "scores", "min_iou": 0.7}
        }))
        .unwrap();
        spec.validate().unwrap();
        let answer = |boxes: &[f32], scores: &[f32]| {
            vec![
                Tensor {
                    name: "scores".into(),
                    shape: vec![1, scores.len()],
                    data: TensorData::Fp32(scores.to_vec()),
                },
                Tensor {
                    name: "boxes".into(),
                    shape: vec![1, scores.len(), 4],
                    data: TensorData::Fp32(boxes.to_vec()),
                },
            ]
        };
        let serving = answer(&[0.0, 0.0, 10.0, 10.0, 20.0, 20.0, 40.0, 40.0], &[0.9, 0.8]);
        let close = answer(&[20.0, 21.0, 40.0, 41.0, 0.0, 0.0, 10.0, 9.5], &[0.85, 0.9]);
        assert!(agree(&spec, &serving, &close));
        // An IoU of about 0.4 on the second box, under the 0.7 asked for.
        let loose = answer(&[0.0, 0.0, 10.0, 10.0, 25.0, 25.0, 45.0, 45.0], &[0.9, 0.8]);
        assert!(!agree(&spec, &serving, &loose));
        let missing = vec![serving[1].clone()];
        assert!(!agree(&spec, &serving, &missing), "no scores output");
        let mut other = spec.clone();
        other.metric = AgreementMetric::Top1Agreement;
        assert!(other.validate().is_err(), "boxes without box_iou");
    }

    #[test]
    fn the_verdict_names_its_figures() {
        let mut spec = spec();
        let tally = Tally {
            samples: 10,
            agreed: 8,
            candidate_ms: vec![2.0; 10],
            serving_ms: vec![1.0; 10],
        };
        let report = judge(&spec, &tally, 3);
        assert!(!report.passed);
        assert_eq!(report.dropped, 3);
        assert_eq!(
            report.reason.as_deref(),
            Some("shadow: top-1 agreement 0.800 on 10 live requests is below 0.9")
        );
        spec.min_agreement = 0.8;
        assert!(judge(&spec, &tally, 0).passed);
        spec.max_p99_ratio = Some(1.5);
        let slow = judge(&spec, &tally, 0);
        assert!(!slow.passed);
        assert!(slow.reason.unwrap().contains("2.00×"));
        let none = judge(&spec, &Tally::default(), 0);
        assert_eq!(
            none.reason.as_deref(),
            Some("shadow: no live request to compare within 5 s")
        );
    }

    #[test]
    fn a_full_queue_drops_copies_and_never_waits() {
        let mut spec = spec();
        spec.sample_every = 2;
        let (tap, rx) = Tap::new(&spec);
        let wanted: Vec<bool> = (0..4).map(|_| tap.wants()).collect();
        assert_eq!(wanted, [true, false, true, false]);
        for _ in 0..QUEUE + 3 {
            tap.offer(Sample {
                inputs: vec![],
                outputs: vec![],
                serving_ms: 1.0,
                served: None,
            });
        }
        assert_eq!(tap.dropped(), 3);
        assert_eq!(rx.try_iter().count(), QUEUE);
    }
}
