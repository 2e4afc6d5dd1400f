//! The on-device benchmark: warm-up, then timed runs on a fixed input.

use std::time::Instant;

use botfleet_protocol::evaluation::{Agreement, Evaluation, EvaluationSet, agrees};
use botfleet_protocol::manifest::{Reference, reference_input};
use botfleet_protocol::tensor::DataType;

use crate::model::{EngineError, Model};
use crate::tensor::{Tensor, TensorData};

/// Latency figures of one benchmark, in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchStats {
    pub runs: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub mean_ms: f64,
}

/// The inputs generated from `seed` (FP32 inputs; other types get zeros).
pub fn reference_inputs(model: &Model, seed: u64) -> Result<Vec<Tensor>, EngineError> {
    model
        .inputs()
        .enumerate()
        .map(|(ix, spec)| {
            let len = spec
                .element_count()
                .ok_or_else(|| EngineError::BadSignature {
                    name: spec.name.clone(),
                    message: "shape is not concrete".into(),
                })?;
            let data = match spec.datatype {
                // Each input gets its own stream so two inputs never carry the same values.
                DataType::Fp32 => {
                    TensorData::Fp32(reference_input(seed.wrapping_add(ix as u64), len))
                }
                other => {
                    TensorData::zeros(other, len).ok_or_else(|| EngineError::BadSignature {
                        name: spec.name.clone(),
                        message: format!("cannot generate {} input", other.as_str()),
                    })?
                }
            };
            Ok(Tensor {
                name: spec.name.clone(),
                shape: spec.shape.iter().map(|&d| d.max(0) as usize).collect(),
                data,
            })
        })
        .collect()
}

/// Nearest-rank percentile of sorted values (0 for none).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs `warmup` untimed and `runs` timed inferences on `inputs`.
pub fn benchmark(
    model: &Model,
    inputs: &[Tensor],
    warmup: u32,
    runs: u32,
) -> Result<BenchStats, EngineError> {
    for _ in 0..warmup {
        model.run(inputs.to_vec())?;
    }
    let runs = runs.max(1);
    let mut times = Vec::with_capacity(runs as usize);
    for _ in 0..runs {
        let input = inputs.to_vec();
        let started = Instant::now();
        model.run(input)?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchStats {
        runs,
        p50_ms: percentile(&times, 50.0),
        p99_ms: percentile(&times, 99.0),
        mean_ms: times.iter().sum::<f64>() / times.len() as f64,
    })
}

/// Largest absolute difference between the model's outputs on the reference input and the
/// recorded ones. `Err` names an output that is missing or of another length.
pub fn reference_error(model: &Model, reference: &Reference) -> Result<f32, EngineError> {
    let outputs = model.run(reference_inputs(model, reference.seed)?)?;
    let mut worst = 0f32;
    for (name, expected) in &reference.outputs {
        let got = outputs
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| EngineError::Run(format!("reference output {name:?} not produced")))?
            .data
            .to_f32();
        if got.len() != expected.len() {
            return Err(EngineError::Run(format!(
                "reference output {name:?} has {} values, expected {}",
                got.len(),
                expected.len()
            )));
        }
        for (a, b) in got.iter().zip(expected) {
            let diff = (a - b).abs();
            // NaN anywhere is as wrong as it gets.
            worst = if diff.is_nan() {
                f32::INFINITY
            } else {
                worst.max(diff)
            };
        }
    }
    Ok(worst)
}

/// Runs every sample of `set` through the model and counts the answers that agree with
/// the parent's, by the gate's metric. `Err` when the model cannot take a sample or does not
/// produce the compared output (a set that does not fit, not a disagreement).
pub fn evaluate(
    model: &Model,
    evaluation: &Evaluation,
    set: &EvaluationSet,
) -> Result<Agreement, EngineError> {
    let mut agreed = 0u32;
    for sample in &set.samples {
        let input = Tensor {
            name: set.input.clone(),
            shape: set.shape.clone(),
            data: TensorData::Fp32(sample.data.clone()),
        };
        let outputs = model.run(vec![input])?;
        let got = outputs
            .iter()
            .find(|t| t.name == set.output)
            .ok_or_else(|| {
                EngineError::Run(format!("evaluation output {:?} not produced", set.output))
            })?
            .data
            .to_f32();
        if agrees(evaluation.metric, evaluation.tolerance, sample, &got) {
            agreed += 1;
        }
    }
    Ok(Agreement {
        samples: u32::try_from(set.samples.len()).unwrap_or(u32::MAX),
        agreed,
    })
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
