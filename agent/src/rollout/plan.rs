//! Pure decisions of the reconciler: what to install, whether a manifest fits this robot,
//! whether a benchmark passes its gate. No I/O here.

use std::collections::{BTreeMap, HashSet};

use botfleet_engine::BenchStats;
use botfleet_protocol::engine::{EngineBench, EngineKind, EnginePolicy};
use botfleet_protocol::evaluation::Agreement;
use botfleet_protocol::manifest::{Gate, Sha256Digest};
use botfleet_protocol::messages::{Deferral, Desired, DesiredModel, HoldInfo, RejectReason};
use botfleet_protocol::{Manifest, SlotName};

use crate::gate::{EngineResult, EngineRun};
use crate::slots::Health;

/// Slots whose desired signed manifest is neither installed nor already refused.
pub fn changes<'a>(
    desired: &'a Desired,
    installed: &BTreeMap<SlotName, Sha256Digest>,
    refused: &HashSet<Sha256Digest>,
    blocked: &BTreeMap<SlotName, Sha256Digest>,
) -> Vec<(&'a SlotName, &'a DesiredModel)> {
    desired
        .slots
        .iter()
        .filter(|(slot, model)| {
            let id = model.manifest.payload_digest();
            installed.get(*slot) != Some(&id)
                && !refused.contains(&id)
                && blocked.get(*slot) != Some(&id)
        })
        .collect()
}

/// Why the swap of a model that passed its gate must wait at `now` (the robot's local time),
/// if it must: a standing hold first, then the install command, then the install window.
pub fn deferral(
    now: &jiff::ZonedDateTime,
    holds: &[HoldInfo],
    model: &DesiredModel,
) -> Option<Deferral> {
    let holds: Vec<HoldInfo> = holds
        .iter()
        .filter(|h| h.until > now.timestamp())
        .cloned()
        .collect();
    if let Some(until) = holds.iter().map(|h| h.until).max() {
        return Some(Deferral::Held { holds, until });
    }
    if model.on_command {
        return Some(Deferral::Command);
    }
    let window = model.window?;
    let opens_at = window.opens_after(now)?;
    Some(Deferral::Window { window, opens_at })
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
    if let Some(min) = &compat.min_agent_version
        && !version_at_least(env!("CARGO_PKG_VERSION"), min)
    {
        return Err((
            RejectReason::Incompatible,
            format!(
                "needs agent {min} or newer, this is {}",
                env!("CARGO_PKG_VERSION")
            ),
        ));
    }
    if let Some(installed) = installed_release
        && manifest.release < installed
        && !manifest.allow_downgrade
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

/// `have >= want` for dotted numeric versions (`1.2.3`); anything unparsable is too old.
fn version_at_least(have: &str, want: &str) -> bool {
    let parse = |v: &str| -> Option<Vec<u64>> {
        v.split(['-', '+'])
            .next()?
            .split('.')
            .map(|p| p.parse().ok())
            .collect()
    };
    match (parse(have), parse(want)) {
        (Some(mut h), Some(mut w)) => {
            let len = h.len().max(w.len());
            h.resize(len, 0);
            w.resize(len, 0);
            h >= w
        }
        _ => false,
    }
}

/// What the gate child measured of one engine, beyond its latency.
#[derive(Debug, Clone, Copy, Default)]
pub struct Measured {
    pub reference_error: Option<f32>,
    pub peak_rss_bytes: Option<u64>,
    pub agreement: Option<Agreement>,
}

/// Whether the candidate's benchmark passes the gate.
pub fn judge(
    gate: &Gate,
    candidate: &BenchStats,
    incumbent: Option<&BenchStats>,
    measured: Measured,
) -> Result<(), Refusal> {
    let Measured {
        reference_error,
        peak_rss_bytes,
        agreement,
    } = measured;
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
    if let Some(evaluation) = &gate.evaluation {
        let agreement = agreement.ok_or((
            RejectReason::Inaccurate,
            "accuracy gate: the evaluation set was not measured".to_owned(),
        ))?;
        evaluation
            .judge(&agreement)
            .map_err(|why| (RejectReason::Inaccurate, why))?;
    }
    if let Some(budget) = gate.max_p50_ms
        && candidate.p50_ms > budget
    {
        return Err((
            RejectReason::GateMissed,
            format!(
                "p50 {:.2} ms is over the budget of {budget:.2} ms",
                candidate.p50_ms
            ),
        ));
    }
    if let (Some(budget), Some(peak)) = (gate.max_memory_mb, peak_rss_bytes)
        && peak > budget.saturating_mul(1024 * 1024)
    {
        return Err((
            RejectReason::GateMissed,
            format!(
                "peak memory {} MiB is over the budget of {budget} MiB",
                peak / (1024 * 1024)
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

/// The engine to serve on, from those that passed, in order of preference with their p99:
/// the one with the lowest p99; on a tie, the more preferred.
pub fn choose(passed: &[(EngineKind, f64)]) -> Option<EngineKind> {
    // `min_by` keeps the first of equal elements: preference order breaks ties.
    passed
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(engine, _)| *engine)
}

/// The gate's verdict over every engine measured.
#[derive(Debug, Clone)]
pub struct Judged {
    /// Per engine, in the order measured, with why it did not pass.
    pub benches: Vec<EngineBench>,
    /// The engine to serve on, if any passed.
    pub choice: Option<EngineKind>,
    /// The fastest engine that produced figures, passed or not (for the event's headline).
    pub best_measured: Option<EngineKind>,
    /// Why the model is refused when none passed.
    pub refusal: Refusal,
}

/// Judges each engine's run against the gate (the reference tolerance of its precision)
/// and chooses among those that pass.
pub fn judge_engines(
    gate: &Gate,
    policy: &EnginePolicy,
    runs: &[EngineRun],
    incumbent: Option<&BenchStats>,
) -> Judged {
    let mut benches = Vec::with_capacity(runs.len());
    let mut passed = Vec::new();
    let mut refusals: Vec<(EngineKind, Refusal)> = Vec::new();
    for run in runs {
        let mut bench = EngineBench {
            engine: run.engine,
            load_ms: run.load_ms,
            p50_ms: None,
            p99_ms: None,
            reference_max_abs_err: None,
            peak_rss_bytes: None,
            cached: false,
            agreement: None,
            passed: false,
            reason: None,
        };
        let verdict = match &run.result {
            EngineResult::NotLoadable { message } => {
                Err((RejectReason::NotLoadable, message.clone()))
            }
            EngineResult::WrongOutput { message } => {
                Err((RejectReason::WrongOutput, message.clone()))
            }
            EngineResult::Measured {
                stats,
                reference_max_abs_err,
                peak_rss_bytes,
                cached,
                agreement,
            } => {
                bench.p50_ms = Some(stats.p50_ms);
                bench.p99_ms = Some(stats.p99_ms);
                bench.reference_max_abs_err = *reference_max_abs_err;
                bench.peak_rss_bytes = *peak_rss_bytes;
                bench.cached = *cached;
                bench.agreement = agreement.map(|a| a.share());
                // Each precision is checked against its own tolerance.
                let mut engine_gate = gate.clone();
                if let Some(reference) = engine_gate.reference.as_mut() {
                    match policy.tolerance_for(run.engine, reference.tolerance) {
                        Some(t) => reference.tolerance = t,
                        None => reference.tolerance = 0.0,
                    }
                }
                let stats: BenchStats = (*stats).into();
                judge(
                    &engine_gate,
                    &stats,
                    incumbent,
                    Measured {
                        reference_error: *reference_max_abs_err,
                        peak_rss_bytes: *peak_rss_bytes,
                        agreement: *agreement,
                    },
                )
            }
        };
        match verdict {
            Ok(()) => {
                bench.passed = true;
                if let Some(p99) = bench.p99_ms {
                    passed.push((run.engine, p99));
                }
            }
            Err(refusal) => {
                bench.reason = Some(refusal.1.clone());
                refusals.push((run.engine, refusal));
            }
        }
        benches.push(bench);
    }
    let best_measured = benches
        .iter()
        .filter_map(|b| b.p99_ms.map(|p| (b.engine, p)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(e, _)| e);
    let refusal = refusal_of(&refusals, best_measured);
    Judged {
        benches,
        choice: choose(&passed),
        best_measured,
        refusal,
    }
}

/// One reason for a model no engine passed: the engines' own when they agree on the kind
/// (all wrong outputs, all unloadable), else a missed gate, naming each engine's reason.
fn refusal_of(refusals: &[(EngineKind, Refusal)], best: Option<EngineKind>) -> Refusal {
    let Some((_, first)) = refusals.first() else {
        return (
            RejectReason::GateMissed,
            "no engine was measured".to_owned(),
        );
    };
    if refusals.len() == 1 {
        return first.clone();
    }
    let kind = if refusals.iter().all(|(_, r)| r.0 == first.0) {
        first.0
    } else if let Some((_, r)) = refusals.iter().find(|(e, _)| Some(*e) == best) {
        r.0
    } else {
        RejectReason::GateMissed
    };
    let message = refusals
        .iter()
        .map(|(e, r)| format!("{e}: {}", r.1))
        .collect::<Vec<_>>()
        .join("; ");
    (kind, message)
}

/// Why a serving model is unhealthy, if it is, judged on at least `min_requests`.
pub fn unhealthy(gate: &Gate, health: &Health, min_requests: u64) -> Option<String> {
    if health.requests < min_requests {
        return None;
    }
    let rate = health.errors as f64 / health.requests as f64;
    if let Some(limit) = gate.max_error_rate
        && rate > limit
    {
        return Some(format!(
            "{} of {} requests failed ({:.1}%, {:.1}% allowed)",
            health.errors,
            health.requests,
            rate * 100.0,
            limit * 100.0
        ));
    }
    if let (Some(limit), Some(p99)) = (gate.max_serving_p99_ms, health.p99_ms)
        && p99 > limit
    {
        return Some(format!("serving p99 {p99:.2} ms is over {limit:.2} ms"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(reference_error: Option<f32>, peak_rss_bytes: Option<u64>) -> Measured {
        Measured {
            reference_error,
            peak_rss_bytes,
            agreement: None,
        }
    }
    use botfleet_protocol::engine::{Candidates, Precision};
    use botfleet_protocol::manifest::Reference;
    use botfleet_protocol::messages::InstallWindow;

    #[test]
    fn the_fastest_engine_wins_and_preference_only_breaks_ties() {
        use EngineKind::*;
        assert_eq!(choose(&[]), None);
        assert_eq!(
            choose(&[(OnnxruntimeCpu, 5.0), (Tract, 20.0)]),
            Some(OnnxruntimeCpu)
        );
        assert_eq!(
            choose(&[(OnnxruntimeCpu, 20.0), (Tract, 5.0)]),
            Some(Tract),
            "preference does not buy a 4x slowdown"
        );
        assert_eq!(
            choose(&[(OnnxruntimeCuda, 5.4), (OnnxruntimeCpu, 5.0)]),
            Some(OnnxruntimeCpu),
            "8 % slower is slower"
        );
        assert_eq!(
            choose(&[(OnnxruntimeCuda, 5.0), (OnnxruntimeCpu, 5.0), (Tract, 9.0)]),
            Some(OnnxruntimeCuda),
            "a tie: the preferred one"
        );
        assert_eq!(
            choose(&[(Tract, 5.0), (OnnxruntimeCpu, 5.0)]),
            Some(Tract),
            "a tie follows the order given, not the engine"
        );
    }

    fn stats(p99: f64) -> BenchStats {
        BenchStats {
            runs: 10,
            p50_ms: p99 / 2.0,
            p99_ms: p99,
            mean_ms: p99 / 2.0,
        }
    }

    /// 2026-12-07 at `hh:mm` in a zone two hours east of UTC.
    fn local(hh: i8, mm: i8) -> jiff::ZonedDateTime {
        let zone = jiff::tz::TimeZone::fixed(jiff::tz::offset(2));
        jiff::civil::date(2026, 12, 7)
            .at(hh, mm, 0, 0)
            .to_zoned_datetime(zone)
            .unwrap()
    }

    fn hold(holder: &str, until: &jiff::ZonedDateTime) -> HoldInfo {
        HoldInfo {
            holder: holder.into(),
            reason: "driving".into(),
            until: until.timestamp(),
        }
    }

    /// A desired model with `window`, or none.
    fn wanted(window: Option<InstallWindow>) -> DesiredModel {
        DesiredModel {
            rollout_id: None,
            manifest: botfleet_protocol::manifest::SignedManifest {
                payload: String::new(),
                signatures: vec![],
            },
            artifact_url: String::new(),
            evaluation_url: None,
            window,
            shadow: None,
            on_command: false,
        }
    }

    #[test]
    fn on_command_waits_after_the_holds_and_before_the_window() {
        let night: InstallWindow = "22:00-05:00".parse().unwrap();
        let ordered = DesiredModel {
            on_command: true,
            ..wanted(Some(night))
        };
        assert_eq!(
            deferral(&local(23, 0), &[], &ordered),
            Some(Deferral::Command)
        );
        let held = deferral(&local(23, 0), &[hold("nav", &local(23, 5))], &ordered);
        assert!(matches!(held, Some(Deferral::Held { .. })), "{held:?}");
        // The command given (the flag gone), the window decides.
        assert!(matches!(
            deferral(&local(12, 0), &[], &wanted(Some(night))),
            Some(Deferral::Window { .. })
        ));
        assert_eq!(Deferral::Command.until(), jiff::Timestamp::MAX);
    }

    #[test]
    fn a_window_defers_outside_and_lets_through_inside_local_time() {
        let night: InstallWindow = "22:00-05:00".parse().unwrap();
        let noon: InstallWindow = "12:00-13:30".parse().unwrap();
        assert_eq!(deferral(&local(23, 0), &[], &wanted(Some(night))), None);
        assert_eq!(deferral(&local(4, 59), &[], &wanted(Some(night))), None);
        assert_eq!(deferral(&local(12, 0), &[], &wanted(Some(noon))), None);
        assert_eq!(
            deferral(&local(5, 0), &[], &wanted(Some(night))),
            Some(Deferral::Window {
                window: night,
                opens_at: local(22, 0).timestamp()
            }),
            "the end is excluded; it opens again tonight"
        );
        let tomorrow = local(12, 0).tomorrow().unwrap().timestamp();
        assert_eq!(
            deferral(&local(13, 30), &[], &wanted(Some(noon))).map(|d| d.until()),
            Some(tomorrow)
        );
        assert_eq!(deferral(&local(9, 0), &[], &wanted(None)), None);
    }

    #[test]
    fn a_standing_hold_defers_before_the_window_and_an_expired_one_does_not() {
        let now = local(23, 0);
        let night: InstallWindow = "22:00-05:00".parse().unwrap();
        let holds = [hold("nav", &local(23, 5)), hold("arm", &local(23, 1))];
        let Some(Deferral::Held {
            holds: standing,
            until,
        }) = deferral(&now, &holds, &wanted(Some(night)))
        else {
            panic!("held");
        };
        assert_eq!(standing.len(), 2);
        assert_eq!(until, local(23, 5).timestamp(), "until the last one ends");
        assert_eq!(deferral(&local(23, 5), &holds, &wanted(Some(night))), None);
        assert_eq!(
            deferral(
                &local(21, 0),
                &[hold("nav", &local(20, 0))],
                &wanted(Some(night))
            )
            .map(|d| d.until()),
            Some(local(22, 0).timestamp()),
            "an expired hold leaves the window to decide"
        );
    }

    #[test]
    fn windows_parse_strictly() {
        assert_eq!(
            "06:30-07:00".parse::<InstallWindow>().unwrap().to_string(),
            "06:30-07:00"
        );
        for bad in [
            "6:30-07:00",
            "06:30",
            "06:30-25:00",
            "x",
            "06:30-06:30",
            "06:30 07:00",
        ] {
            assert!(bad.parse::<InstallWindow>().is_err(), "{bad}");
        }
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_at_least("0.10.0", "0.9.1"));
        assert!(version_at_least("1.2", "1.2.0"));
        assert!(!version_at_least("1.2.0", "1.10"));
        assert!(!version_at_least("1.0.0", "garbage"));
        assert!(version_at_least("2.0.0-rc1", "2.0.0"));
    }

    #[test]
    fn a_gate_without_limits_passes() {
        assert!(
            judge(
                &Gate::default(),
                &stats(1000.0),
                Some(&stats(1.0)),
                Measured::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn the_latency_budget_is_enforced() {
        let gate = Gate {
            max_p99_ms: Some(10.0),
            ..Gate::default()
        };
        assert!(judge(&gate, &stats(9.9), None, measured(None, None)).is_ok());
        let (reason, msg) = judge(&gate, &stats(10.1), None, measured(None, None)).unwrap_err();
        assert_eq!(reason, RejectReason::GateMissed);
        assert!(msg.contains("budget"), "{msg}");
    }

    #[test]
    fn regression_is_measured_against_the_incumbent_only_when_there_is_one() {
        let gate = Gate {
            max_regression: Some(0.2),
            ..Gate::default()
        };
        assert!(
            judge(
                &gate,
                &stats(11.9),
                Some(&stats(10.0)),
                measured(None, None)
            )
            .is_ok()
        );
        assert!(
            judge(
                &gate,
                &stats(12.1),
                Some(&stats(10.0)),
                measured(None, None)
            )
            .is_err()
        );
        assert!(judge(&gate, &stats(500.0), None, measured(None, None)).is_ok());
    }

    #[test]
    fn a_serving_model_is_judged_on_errors_and_live_latency_once_it_has_enough_requests() {
        let gate = Gate {
            max_error_rate: Some(0.1),
            max_serving_p99_ms: Some(50.0),
            ..Gate::default()
        };
        let h = |requests, errors, p99| Health {
            requests,
            errors,
            p99_ms: Some(p99),
        };
        assert_eq!(
            unhealthy(&gate, &h(5, 5, 1.0), 20),
            None,
            "too few requests to judge"
        );
        assert_eq!(unhealthy(&gate, &h(100, 5, 10.0), 20), None);
        assert!(
            unhealthy(&gate, &h(100, 11, 10.0), 20)
                .unwrap()
                .contains("failed")
        );
        assert!(
            unhealthy(&gate, &h(100, 0, 80.0), 20)
                .unwrap()
                .contains("p99")
        );
        assert_eq!(
            unhealthy(&Gate::default(), &h(100, 100, 999.0), 20),
            None,
            "no thresholds, no verdict"
        );
    }

    #[test]
    fn the_median_and_memory_budgets_are_enforced() {
        let gate = Gate {
            max_p50_ms: Some(4.0),
            max_memory_mb: Some(100),
            ..Gate::default()
        };
        assert!(judge(&gate, &stats(8.0), None, measured(None, Some(99 << 20))).is_ok());
        assert!(judge(&gate, &stats(8.2), None, measured(None, None)).is_err());
        let (_, msg) =
            judge(&gate, &stats(8.0), None, measured(None, Some(101 << 20))).unwrap_err();
        assert!(msg.contains("memory"), "{msg}");
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
        assert!(judge(&gate, &stats(1.0), None, measured(Some(5e-4), None)).is_ok());
        assert_eq!(
            judge(&gate, &stats(1.0), None, measured(Some(0.5), None))
                .unwrap_err()
                .0,
            RejectReason::WrongOutput
        );
        assert!(judge(&gate, &stats(1.0), None, measured(Some(f32::NAN), None)).is_err());
    }

    fn gate_with_reference(tolerance: f32) -> Gate {
        Gate {
            reference: Some(Reference {
                seed: 1,
                outputs: Default::default(),
                tolerance,
            }),
            ..Gate::default()
        }
    }

    fn policy(engines: &[EngineKind], tolerance: &[(Precision, f32)]) -> EnginePolicy {
        EnginePolicy {
            candidates: Candidates::List(engines.to_vec()),
            tolerance: tolerance.iter().copied().collect(),
        }
    }

    fn ran(engine: EngineKind, p99: f64, reference_max_abs_err: f32) -> EngineRun {
        EngineRun {
            engine,
            load_ms: 5,
            result: EngineResult::Measured {
                stats: stats(p99).into(),
                reference_max_abs_err: Some(reference_max_abs_err),
                peak_rss_bytes: None,
                cached: false,
                agreement: None,
            },
        }
    }

    fn bench_of(judged: &Judged, engine: EngineKind) -> &EngineBench {
        judged
            .benches
            .iter()
            .find(|b| b.engine == engine)
            .unwrap_or_else(|| panic!("{engine} not judged: {judged:?}"))
    }

    #[test]
    fn each_precision_is_held_to_its_own_tolerance() {
        use EngineKind::*;
        let gate = gate_with_reference(1e-3);
        let policy = policy(
            &[OnnxruntimeTensorrtFp16, OnnxruntimeCpu, Tract],
            &[(Precision::Fp16, 0.05)],
        );
        // The same error: within FP16's tolerance, far outside the native one.
        let runs = [
            ran(OnnxruntimeTensorrtFp16, 2.0, 0.01),
            ran(OnnxruntimeCpu, 1.0, 0.01),
            ran(Tract, 3.0, 0.01),
        ];
        let judged = judge_engines(&gate, &policy, &runs, None);
        assert!(
            bench_of(&judged, OnnxruntimeTensorrtFp16).passed,
            "{judged:?}"
        );
        for native in [OnnxruntimeCpu, Tract] {
            let bench = bench_of(&judged, native);
            assert!(!bench.passed, "{bench:?}");
            let reason = bench.reason.as_deref().unwrap_or_default();
            assert!(reason.contains("tolerance is 1.000e-3"), "{reason}");
        }
        assert_eq!(
            judged.choice,
            Some(OnnxruntimeTensorrtFp16),
            "the fastest engine failed its tolerance; the one that passed serves"
        );
        assert_eq!(judged.best_measured, Some(OnnxruntimeCpu));
    }

    #[test]
    fn a_reduced_precision_without_a_tolerance_of_its_own_is_held_to_zero() {
        use EngineKind::*;
        let gate = gate_with_reference(1e-3);
        let policy = policy(&[OnnxruntimeTensorrtInt8, Tract], &[]);
        let runs = [
            ran(OnnxruntimeTensorrtInt8, 1.0, 1e-4),
            ran(Tract, 3.0, 1e-4),
        ];
        let judged = judge_engines(&gate, &policy, &runs, None);
        assert!(!bench_of(&judged, OnnxruntimeTensorrtInt8).passed);
        assert_eq!(judged.choice, Some(Tract));
    }

    #[test]
    fn an_engine_with_wrong_outputs_is_refused_and_another_that_passes_serves() {
        use EngineKind::*;
        let gate = gate_with_reference(1e-3);
        let policy = policy(&[OnnxruntimeCpu, Tract], &[]);
        for wrong in [
            ran(OnnxruntimeCpu, 1.0, 0.5),
            EngineRun {
                engine: OnnxruntimeCpu,
                load_ms: 5,
                result: EngineResult::WrongOutput {
                    message: "output \"y\" has 3 values, the reference 4".into(),
                },
            },
        ] {
            let runs = [wrong, ran(Tract, 4.0, 1e-5)];
            let judged = judge_engines(&gate, &policy, &runs, None);
            let ort = bench_of(&judged, OnnxruntimeCpu);
            assert!(!ort.passed && ort.reason.is_some(), "{ort:?}");
            let tract = bench_of(&judged, Tract);
            assert!(tract.passed && tract.reason.is_none(), "{tract:?}");
            assert_eq!(judged.choice, Some(Tract), "{judged:?}");
        }
    }

    #[test]
    fn when_every_engine_fails_the_refusal_names_each_engine_and_its_reason() {
        use EngineKind::*;
        let gate = Gate {
            max_p99_ms: Some(2.0),
            ..gate_with_reference(1e-3)
        };
        let policy = policy(&[OnnxruntimeCpu, Tract], &[]);

        // Both wrong: the kind they agree on, each engine's reason.
        let runs = [ran(OnnxruntimeCpu, 1.0, 0.5), ran(Tract, 1.5, 0.25)];
        let judged = judge_engines(&gate, &policy, &runs, None);
        assert_eq!(judged.choice, None);
        let (reason, message) = &judged.refusal;
        assert_eq!(*reason, RejectReason::WrongOutput);
        assert!(
            message.starts_with("onnxruntime-cpu: reference output differs by 5.000e-1")
                && message.contains("; tract: reference output differs by 2.500e-1"),
            "{message}"
        );

        // Different kinds: the reason of the fastest engine measured, both named.
        let runs = [
            ran(OnnxruntimeCpu, 3.0, 1e-5),
            EngineRun {
                engine: Tract,
                load_ms: 1,
                result: EngineResult::NotLoadable {
                    message: "unsupported operator: NoSuchOp".into(),
                },
            },
        ];
        let judged = judge_engines(&gate, &policy, &runs, None);
        assert_eq!(judged.choice, None);
        assert_eq!(judged.best_measured, Some(OnnxruntimeCpu));
        let (reason, message) = &judged.refusal;
        assert_eq!(*reason, RejectReason::GateMissed);
        assert_eq!(
            message,
            "onnxruntime-cpu: p99 3.00 ms is over the budget of 2.00 ms; \
             tract: unsupported operator: NoSuchOp"
        );

        // One engine: its own refusal, as it is.
        let judged = judge_engines(&gate, &policy, &[ran(Tract, 1.0, 0.5)], None);
        assert_eq!(judged.refusal.0, RejectReason::WrongOutput);
        assert!(
            judged.refusal.1.starts_with("reference output differs"),
            "{:?}",
            judged.refusal
        );
    }
}
