//! Pure decisions of the reconciler: what to install, whether a manifest fits this robot,
//! whether a benchmark passes its gate. No I/O here.

use std::collections::{BTreeMap, HashSet};

use botfleet_engine::BenchStats;
use botfleet_protocol::manifest::{Gate, Sha256Digest};
use botfleet_protocol::messages::{Desired, DesiredModel, RejectReason};
use botfleet_protocol::{Manifest, SlotName};

/// Slots whose desired signed manifest is neither installed nor already refused.
pub fn changes<'a>(
    desired: &'a Desired,
    installed: &BTreeMap<SlotName, Sha256Digest>,
    refused: &HashSet<Sha256Digest>,
) -> Vec<(&'a SlotName, &'a DesiredModel)> {
    desired
        .slots
        .iter()
        .filter(|(slot, model)| {
            let id = model.manifest.payload_digest();
            installed.get(*slot) != Some(&id) && !refused.contains(&id)
        })
        .collect()
}

/// A refusal: the reason code and a sentence for people.
pub type Refusal = (RejectReason, String);

/// Checks that a verified manifest is meant for this slot and this robot.
pub fn admit(
    manifest: &Manifest,
    slot: &SlotName,
    arch: &str,
    board: Option<&str>,
    installed_release: Option<u64>,
) -> Result<(), Refusal> {
    if manifest.slot != *slot {
        return Err((
            RejectReason::BadManifest,
            format!(
                "manifest is for slot {:?}, desired state puts it in {:?}",
                manifest.slot.as_str(),
                slot.as_str()
            ),
        ));
    }
    let compat = &manifest.compatibility;
    if !compat.arch.is_empty() && !compat.arch.iter().any(|a| a == arch) {
        return Err((
            RejectReason::Incompatible,
            format!("built for {:?}, this robot is {arch}", compat.arch),
        ));
    }
    if !compat.boards.is_empty()
        && !board.is_some_and(|b| {
            compat
                .boards
                .iter()
                .any(|want| b.starts_with(want.as_str()))
        })
    {
        return Err((
            RejectReason::Incompatible,
            format!(
                "built for boards {:?}, this robot is {}",
                compat.boards,
                board.unwrap_or("not a known board")
            ),
        ));
    }
    if let Some(installed) = installed_release
        && manifest.release < installed
    {
        return Err((
            RejectReason::Downgrade,
            format!(
                "release {} is older than the installed release {installed}",
                manifest.release
            ),
        ));
    }
    Ok(())
}

/// Whether the candidate's benchmark passes the gate.
pub fn judge(
    gate: &Gate,
    candidate: &BenchStats,
    incumbent: Option<&BenchStats>,
    reference_error: Option<f32>,
) -> Result<(), Refusal> {
    if let (Some(reference), Some(err)) = (&gate.reference, reference_error)
        && (err.is_nan() || err > reference.tolerance)
    {
        return Err((
            RejectReason::WrongOutput,
            format!(
                "reference output differs by {err:.3e}, tolerance is {:.3e}",
                reference.tolerance
            ),
        ));
    }
    if let Some(budget) = gate.max_p99_ms
        && candidate.p99_ms > budget
    {
        return Err((
            RejectReason::GateMissed,
            format!(
                "p99 {:.2} ms is over the budget of {budget:.2} ms",
                candidate.p99_ms
            ),
        ));
    }
    if let (Some(allowed), Some(incumbent)) = (gate.max_regression, incumbent) {
        let limit = incumbent.p99_ms * (1.0 + allowed);
        if candidate.p99_ms > limit {
            return Err((
                RejectReason::GateMissed,
                format!(
                    "p99 {:.2} ms is {:.0}% over the serving model's {:.2} ms; {:.0}% allowed",
                    candidate.p99_ms,
                    (candidate.p99_ms / incumbent.p99_ms - 1.0) * 100.0,
                    incumbent.p99_ms,
                    allowed * 100.0
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use botfleet_protocol::manifest::Reference;

    fn stats(p99: f64) -> BenchStats {
        BenchStats {
            runs: 10,
            p50_ms: p99 / 2.0,
            p99_ms: p99,
            mean_ms: p99 / 2.0,
        }
    }

    #[test]
    fn a_gate_without_limits_passes() {
        assert!(judge(&Gate::default(), &stats(1000.0), Some(&stats(1.0)), None).is_ok());
    }

    #[test]
    fn the_latency_budget_is_enforced() {
        let gate = Gate {
            max_p99_ms: Some(10.0),
            ..Gate::default()
        };
        assert!(judge(&gate, &stats(9.9), None, None).is_ok());
        let (reason, msg) = judge(&gate, &stats(10.1), None, None).unwrap_err();
        assert_eq!(reason, RejectReason::GateMissed);
        assert!(msg.contains("budget"), "{msg}");
    }

    #[test]
    fn regression_is_measured_against_the_incumbent_only_when_there_is_one() {
        let gate = Gate {
            max_regression: Some(0.2),
            ..Gate::default()
        };
        assert!(judge(&gate, &stats(11.9), Some(&stats(10.0)), None).is_ok());
        assert!(judge(&gate, &stats(12.1), Some(&stats(10.0)), None).is_err());
        assert!(judge(&gate, &stats(500.0), None, None).is_ok());
    }

    #[test]
    fn a_wrong_or_nan_reference_output_is_refused() {
        let gate = Gate {
            reference: Some(Reference {
                seed: 1,
                outputs: Default::default(),
                tolerance: 1e-3,
            }),
            ..Gate::default()
        };
        assert!(judge(&gate, &stats(1.0), None, Some(5e-4)).is_ok());
        assert_eq!(
            judge(&gate, &stats(1.0), None, Some(0.5)).unwrap_err().0,
            RejectReason::WrongOutput
        );
        assert!(judge(&gate, &stats(1.0), None, Some(f32::NAN)).is_err());
    }
}
