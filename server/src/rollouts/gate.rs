//! The fleet latency gate: the benchmark p99 the devices report for a rollout's model
//! against the p99 of the model it replaces, like with like.

use std::collections::BTreeMap;

use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::messages::BenchReport;

use super::strategy::Gate;

/// The engine a figure was measured on; an agent that names none had only tract.
fn engine_or_tract(engine: Option<EngineKind>) -> EngineKind {
    engine.unwrap_or(EngineKind::Tract)
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Why `gate` fails for these benchmark reports (one per device), if it does.
///
/// A device's candidate p99 is compared with its incumbent p99 only when both were measured
/// on the same engine (`engine == incumbent_engine`, absent meaning tract). Devices are
/// grouped by that engine, and the gate fails when any group's median candidate p99
/// regresses beyond the limit against the same group's median incumbent p99: a device that
/// stayed on tract is never weighed against one that moved to CUDA.
///
/// Counted in no group: a device whose candidate runs on another engine than its incumbent
/// (its own gate already compared the two on the robot, each on its best engine), and a
/// device with no incumbent figure (nothing served the slot before).
pub fn regression<'a>(
    gate: Gate,
    reports: impl IntoIterator<Item = &'a BenchReport>,
) -> Option<String> {
    let mut groups: BTreeMap<EngineKind, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for report in reports {
        let Some(incumbent) = report.incumbent_p99_ms else {
            continue;
        };
        let engine = engine_or_tract(report.engine);
        if engine != engine_or_tract(report.incumbent_engine) {
            continue;
        }
        let (candidates, incumbents) = groups.entry(engine).or_default();
        candidates.push(report.p99_ms);
        incumbents.push(incumbent);
    }
    let percent = gate.max_p99_regression_percent;
    let failures: Vec<String> = groups
        .into_iter()
        .filter_map(|(engine, (candidates, incumbents))| {
            let devices = candidates.len();
            let candidate = median(candidates)?;
            let incumbent = median(incumbents)?;
            let limit = incumbent * (1.0 + percent / 100.0);
            (candidate > limit).then(|| {
                format!(
                    "median p99 on {engine} {candidate:.3} ms exceeds {limit:.3} ms (incumbent {incumbent:.3} ms + {percent}%, {devices} devices)"
                )
            })
        })
        .collect();
    (!failures.is_empty()).then(|| format!("gate: {}", failures.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }
}
