use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::messages::{BenchReport, Event, RejectReason, Stage, Status};
use jiff::Timestamp;

use super::fold::Outcome;
use super::strategy::{Gate, OnError, WaveSize};
use super::view::Summary;
use super::*;

fn dev(s: &str) -> DeviceId {
    DeviceId::new(s).unwrap()
}

fn rid(s: &str) -> RolloutId {
    RolloutId::new(s).unwrap()
}

fn model() -> RolloutModel {
    RolloutModel {
        slot: SlotName::new("orientation").unwrap(),
        version: "1.0.0".into(),
        release: 3,
        sha256: Sha256Digest::of(b"model"),
    }
}

fn t(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

fn event(device: &str, rollout: Option<&str>, at: i64, stage: Stage) -> Event {
    Event {
        id: None,
        device: dev(device),
        rollout_id: rollout.map(rid),
        slot: model().slot,
        sha256: model().sha256,
        release: Some(3),
        at: t(at),
        stage,
    }
}

fn active() -> Stage {
    Stage::Active {
        previous: None,
        swap_micros: 12,
    }
}

fn rejected() -> Stage {
    Stage::Rejected {
        reason: RejectReason::GateMissed,
        message: "p99 over budget".into(),
    }
}

fn online(_: &DeviceId) -> Presence {
    Presence::Online
}

fn names(n: usize) -> Vec<DeviceId> {
    (0..n).map(|i| dev(&format!("robot-{i}"))).collect()
}

fn book_with(id: &str, devices: &[&str], strategy: Strategy) -> Rollouts {
    let mut book = Rollouts::default();
    let devices: Vec<_> = devices.iter().map(|d| dev(d)).collect();
    let mut rollout = Rollout::new(rid(id), model(), t(0), strategy, &devices);
    rollout.step(t(0), online);
    book.insert(rollout);
    book
}

fn request(version: &str) -> RolloutRequest {
    RolloutRequest {
        slot: SlotName::new("orientation").unwrap(),
        version: version.into(),
        devices: Some(vec![dev("robot-1")]),
        selector: None,
        channel: None,
        strategy: None,
        supersede: false,
    }
}

fn commanded(actions: &[Action]) -> Vec<DeviceId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Command(d) => Some(d.clone()),
            _ => None,
        })
        .collect()
}

/// Reports `stage` for every device in the current wave.
fn report_wave(rollout: &mut Rollout, at: i64, stage: &Stage) {
    let wave = rollout.wave;
    for run in rollout.devices.values_mut().filter(|r| r.wave == wave) {
        run.progress.apply(t(at), stage);
    }
}

fn canary_strategy() -> Strategy {
    Strategy {
        waves: vec![
            WaveSize::Count(1),
            WaveSize::Percent(50.0),
            WaveSize::Percent(100.0),
        ],
        bake_s: 10,
        ..Strategy::default()
    }
}

#[test]
fn a_canary_then_waves_then_done_with_bake_time_between() {
    let mut r = Rollout::new(rid("r-1"), model(), t(0), canary_strategy(), &names(10));
    let first = commanded(&r.step(t(0), online));
    assert_eq!(first.len(), 1, "one canary");
    report_wave(&mut r, 1, &active());
    assert!(r.step(t(2), online).is_empty(), "baking");
    assert!(r.step(t(11), online).is_empty(), "bake runs from success");
    let second = commanded(&r.step(t(12), online));
    assert_eq!(second.len(), 4, "up to 50 %");
    assert!(!second.contains(&first[0]));
    report_wave(&mut r, 13, &active());
    assert!(r.step(t(14), online).is_empty(), "baking");
    let third = commanded(&r.step(t(24), online));
    assert_eq!(third.len(), 5);
    assert!(r.step(t(25), online).is_empty(), "nobody commanded twice");
    report_wave(&mut r, 26, &active());
    r.step(t(27), online);
    assert_eq!(r.state, RolloutState::Completed);
    assert_eq!(r.view(false).summary.active, 10);
}

#[test]
fn an_error_share_over_the_threshold_pauses_and_resume_waives_it() {
    let strategy = Strategy {
        waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        error_threshold: 0.4,
        ..Strategy::default()
    };
    let mut r = Rollout::new(rid("r-1"), model(), t(0), strategy, &names(6));
    r.step(t(0), online);
    report_wave(&mut r, 1, &rejected());
    r.step(t(2), online);
    assert_eq!(r.state, RolloutState::Paused);
    assert!(
        r.reason.as_deref().unwrap().contains("2 of 2"),
        "{:?}",
        r.reason
    );
    assert!(r.step(t(3), online).is_empty(), "paused starts nobody");
    assert!(r.resume());
    assert_eq!(commanded(&r.step(t(4), online)).len(), 4);
}

#[test]
fn an_error_share_with_on_error_rollback_restores_every_started_device() {
    let strategy = Strategy {
        waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        error_threshold: 0.4,
        on_error: OnError::Rollback,
        ..Strategy::default()
    };
    let mut r = Rollout::new(rid("r-1"), model(), t(0), strategy, &names(6));
    let started = commanded(&r.step(t(0), online));
    r.devices
        .get_mut(&started[0])
        .unwrap()
        .progress
        .apply(t(1), &active());
    r.devices
        .get_mut(&started[1])
        .unwrap()
        .progress
        .apply(t(1), &rejected());
    let actions = r.step(t(2), online);
    assert_eq!(r.state, RolloutState::RolledBack);
    assert!(actions.contains(&Action::Rollback(started[0].clone())));
    assert!(actions.contains(&Action::Restore(started[1].clone())));
    let view = r.view(false);
    assert_eq!(view.summary.rolling_back, 1);
    assert_eq!(
        view.summary.aborted, 4,
        "never-started devices keep their model"
    );
    // The status of the device proves the previous model serves again.
    assert!(r.observe_active(&started[0], Some((Sha256Digest::of(b"old"), 2))));
    assert_eq!(r.view(false).summary.rolled_back, 1);
}

#[test]
fn a_wave_below_the_success_threshold_pauses_once_settled() {
    let strategy = Strategy {
        waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        success_threshold: 1.0,
        ..Strategy::default()
    };
    let mut r = Rollout::new(rid("r-1"), model(), t(0), strategy, &names(4));
    let started = commanded(&r.step(t(0), online));
    r.devices
        .get_mut(&started[0])
        .unwrap()
        .progress
        .apply(t(1), &active());
    r.step(t(2), online);
    assert_eq!(r.state, RolloutState::InProgress, "not settled yet");
    r.devices
        .get_mut(&started[1])
        .unwrap()
        .progress
        .apply(t(1), &rejected());
    r.step(t(3), online);
    assert_eq!(r.state, RolloutState::Paused);
}

#[test]
fn a_deferred_device_waits_past_the_deadline_while_online_and_is_skipped_offline() {
    let strategy = Strategy {
        deadline_s: 60,
        ..Strategy::default()
    };
    let mut book = book_with("r-1", &["robot-1", "robot-2"], strategy);
    let window = botfleet_protocol::messages::Deferral::Window {
        window: "22:00-05:00".parse().unwrap(),
        opens_at: t(3600),
    };
    for device in ["robot-1", "robot-2"] {
        let stage = Stage::Deferred {
            deferral: window.clone(),
        };
        book.apply(&event(device, Some("r-1"), 10, stage));
    }
    let id = rid("r-1");
    let gone = dev("robot-2");
    let presence = |d: &DeviceId| {
        if *d == gone {
            Presence::Offline
        } else {
            Presence::Online
        }
    };
    book.get_mut(&id).unwrap().step(t(600), presence);
    let view = book.get(&id).unwrap();
    let devices = view.devices.unwrap();
    assert_eq!(devices[&dev("robot-1")].outcome, Outcome::Deferred);
    assert_eq!(
        devices[&gone].outcome,
        Outcome::Skipped,
        "an offline device is not waited for"
    );
    assert_eq!(view.state, RolloutState::InProgress);
    assert_eq!(view.summary.deferred, 1);
    book.apply(&event("robot-1", Some("r-1"), 3601, active()));
    book.get_mut(&id).unwrap().step(t(3602), presence);
    assert_eq!(book.get(&id).unwrap().state, RolloutState::Completed);
}

#[test]
fn devices_past_the_deadline_time_out_or_are_skipped_and_converge_later() {
    let strategy = Strategy {
        deadline_s: 60,
        ..Strategy::default()
    };
    let mut book = book_with("r-1", &["robot-1", "robot-2", "robot-3"], strategy);
    book.apply(&event("robot-1", Some("r-1"), 1, active()));
    let id = rid("r-1");
    let offline = dev("robot-3");
    let presence = |d: &DeviceId| {
        if *d == offline {
            Presence::Offline
        } else {
            Presence::Online
        }
    };
    book.get_mut(&id).unwrap().step(t(59), presence);
    assert_eq!(book.get(&id).unwrap().state, RolloutState::InProgress);
    book.get_mut(&id).unwrap().step(t(60), presence);
    let view = book.get(&id).unwrap();
    assert_eq!(view.state, RolloutState::Completed, "never stuck");
    let devices = view.devices.unwrap();
    assert_eq!(devices[&dev("robot-2")].outcome, Outcome::TimedOut);
    assert_eq!(devices[&dev("robot-3")].outcome, Outcome::Skipped);
    // robot-3 comes back and reports: it converges.
    book.apply(&event("robot-3", Some("r-1"), 100, active()));
    let devices = book.get(&id).unwrap().devices.unwrap();
    assert_eq!(devices[&dev("robot-3")].outcome, Outcome::Active);
}

#[test]
fn the_gate_pauses_when_the_fleet_median_p99_regresses_too_much() {
    let strategy = Strategy {
        waves: vec![WaveSize::Count(3), WaveSize::Percent(100.0)],
        gate: Some(Gate {
            max_p99_regression_percent: 10.0,
        }),
        ..Strategy::default()
    };
    let bench = |p99: f64| {
        Stage::Benchmarked(BenchReport {
            runs: 20,
            p50_ms: 1.0,
            p99_ms: p99,
            mean_ms: 1.0,
            incumbent_p99_ms: Some(2.0),
            reference_max_abs_err: None,
            peak_rss_bytes: None,
            passed: true,
            engine: None,
            incumbent_engine: None,
            engines: vec![],
            agreement: None,
        })
    };
    let mut r = Rollout::new(rid("r-1"), model(), t(0), strategy, &names(6));
    r.step(t(0), online);
    report_wave(&mut r, 1, &bench(2.5));
    report_wave(&mut r, 2, &active());
    assert!(r.step(t(3), online).is_empty());
    assert_eq!(r.state, RolloutState::Paused);
    assert!(r.reason.as_deref().unwrap().starts_with("gate:"));
}

#[test]
fn a_retained_status_counts_as_evidence_when_events_were_lost() {
    let mut book = book_with("r-1", &["robot-1"], Strategy::default());
    let mut status: Status = serde_json::from_value(serde_json::json!({
        "online": true, "agent_version": "0.1.0", "at": "2026-01-01T00:00:00Z",
        "active": {"orientation": {"name": "m", "version": "1.0.0", "release": 3,
            "sha256": model().sha256, "since": "2026-01-01T00:00:00Z"}}
    }))
    .unwrap();
    book.observe_status(&dev("robot-1"), &status);
    let id = rid("r-1");
    book.get_mut(&id).unwrap().step(t(1), online);
    assert_eq!(book.get(&id).unwrap().state, RolloutState::Completed);
    status.active.clear();
    book.observe_status(&dev("robot-1"), &status);
    assert_eq!(book.get(&id).unwrap().summary.pending, 1);
}

#[test]
fn abort_leaves_active_devices_and_restores_the_others() {
    let strategy = Strategy {
        waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        ..Strategy::default()
    };
    let mut r = Rollout::new(rid("r-1"), model(), t(0), strategy, &names(5));
    let started = commanded(&r.step(t(0), online));
    r.devices
        .get_mut(&started[0])
        .unwrap()
        .progress
        .apply(t(1), &active());
    let actions = r.abort();
    assert_eq!(actions, vec![Action::Restore(started[1].clone())]);
    assert_eq!(r.state, RolloutState::Aborted);
    let summary = r.view(false).summary;
    assert_eq!((summary.active, summary.aborted), (1, 4));
    assert!(r.abort().is_empty(), "twice is nothing");
    assert!(!r.resume());
}

#[test]
fn a_live_rollout_owns_its_devices_until_superseded() {
    let mut book = book_with("r-1", &["robot-1", "robot-2"], Strategy::default());
    let slot = model().slot;
    assert_eq!(book.live_owners(&slot, &[dev("robot-2")]), vec![rid("r-1")]);
    assert!(book.live_owners(&slot, &[dev("robot-9")]).is_empty());
    book.get_mut(&rid("r-1")).unwrap().supersede();
    assert!(book.live_owners(&slot, &[dev("robot-2")]).is_empty());
    let view = book.get(&rid("r-1")).unwrap();
    assert_eq!(view.state, RolloutState::Superseded);
}

#[test]
fn events_fold_into_outcomes_and_a_completed_state() {
    let mut book = book_with(
        "r-1",
        &["robot-1", "robot-2", "robot-3"],
        Strategy::default(),
    );
    let id = rid("r-1");
    assert_eq!(book.get(&id).unwrap().summary.pending, 3);
    book.apply(&event("robot-1", Some("r-1"), 1, Stage::Received));
    book.apply(&event("robot-1", Some("r-1"), 2, active()));
    book.apply(&event("robot-2", Some("r-1"), 1, Stage::Received));
    assert_eq!(
        book.get(&id).unwrap().summary,
        Summary {
            pending: 1,
            in_progress: 1,
            active: 1,
            ..Summary::default()
        }
    );
    book.apply(&event("robot-2", Some("r-1"), 3, rejected()));
    let failed = Stage::Failed {
        message: "disk full".into(),
    };
    book.apply(&event("robot-3", Some("r-1"), 3, failed));
    book.get_mut(&id).unwrap().step(t(4), online);
    let view = book.get(&id).unwrap();
    assert_eq!(view.state, RolloutState::Completed);
    let devices = view.devices.unwrap();
    assert_eq!(devices[&dev("robot-2")].outcome, Outcome::Rejected);
    assert_eq!(devices[&dev("robot-3")].outcome, Outcome::Failed);
}

#[test]
fn duplicate_events_are_idempotent() {
    let mut book = book_with("r-1", &["robot-1"], Strategy::default());
    let ev = event("robot-1", Some("r-1"), 1, Stage::Received);
    assert_eq!(book.apply(&ev), Applied::Recorded);
    let before = book.get(&rid("r-1"));
    assert_eq!(book.apply(&ev), Applied::Duplicate);
    assert_eq!(book.get(&rid("r-1")), before);
    assert_eq!(book.events().duplicate, 1);
}

#[test]
fn events_of_other_rollouts_devices_or_artifacts_are_ignored() {
    let mut book = book_with("r-1", &["robot-1"], Strategy::default());
    assert_eq!(
        book.apply(&event("robot-1", Some("r-other"), 1, active())),
        Applied::UnknownRollout
    );
    assert_eq!(
        book.apply(&event("robot-9", Some("r-1"), 1, active())),
        Applied::NotTargeted
    );
    let mut other = event("robot-1", Some("r-1"), 1, active());
    other.sha256 = Sha256Digest::of(b"another model");
    assert_eq!(book.apply(&other), Applied::OtherArtifact);
    assert_eq!(book.get(&rid("r-1")).unwrap().summary.pending, 1);
}

#[test]
fn same_key_same_body_replays_and_another_body_conflicts() {
    let mut book = Rollouts::default();
    let key = IdempotencyKey::new("airflow-run-42").unwrap();
    assert_eq!(book.replay(&key, &request("1.0.0")), Replay::Fresh);
    let response = CreatedRollout {
        rollout_id: rid("r-abc"),
        devices: vec![dev("robot-1")],
    };
    book.remember(key.clone(), request("1.0.0"), &response);
    assert_eq!(book.replay(&key, &request("1.0.0")), Replay::Same(response));
    assert_eq!(book.replay(&key, &request("2.0.0")), Replay::Conflict);
    let (_, keys) = book.take_dirty().unwrap();
    assert_eq!(keys.len(), 1, "the key is saved with the rollout");
}

#[test]
fn idempotency_keys_are_bounded_visible_ascii() {
    assert!(IdempotencyKey::new("a-b_c.1").is_ok());
    assert!(IdempotencyKey::new("").is_err());
    assert!(IdempotencyKey::new("a b").is_err());
    assert!(IdempotencyKey::new(&"k".repeat(256)).is_err());
}

#[test]
fn a_request_names_devices_or_a_selector_not_both() {
    let mut req = request("1.0.0");
    assert!(matches!(req.targets(), Ok(Targets::Devices(d)) if d.len() == 1));
    req.selector = Some("site=lab".into());
    assert_eq!(req.targets(), Err(TargetError::Both));
    req.devices = None;
    assert!(matches!(req.targets(), Ok(Targets::Selector(_))));
    req.selector = None;
    assert_eq!(req.targets(), Err(TargetError::Neither));
    req.channel = Some(crate::channels::ChannelName::new("stable").unwrap());
    assert!(matches!(req.targets(), Ok(Targets::Channel(c)) if c.as_str() == "stable"));
    req.devices = Some(vec![dev("robot-1")]);
    assert_eq!(req.targets(), Err(TargetError::Both));
}

#[test]
fn an_install_ordered_once_per_device_republishes_only_those_waiting() {
    let strategy = Strategy {
        waves: vec![WaveSize::Count(2), WaveSize::Percent(100.0)],
        install_on_command: true,
        ..Strategy::default()
    };
    let devices = names(3);
    let mut rollout = Rollout::new(rid("r-1"), model(), t(0), strategy, &devices);
    let first = commanded(&rollout.step(t(0), online));
    assert_eq!(first.len(), 2);
    // Nothing to order on a device not commanded yet, nor twice on the same one.
    let later = devices.iter().find(|d| !first.contains(d)).unwrap().clone();
    assert!(
        rollout
            .order_install(Some(std::slice::from_ref(&later)))
            .is_empty()
    );
    let one = std::slice::from_ref(&first[0]);
    assert!(
        matches!(&rollout.order_install(Some(one))[..], [Action::Install(d)] if *d == first[0])
    );
    assert!(rollout.order_install(Some(one)).is_empty());
    // For all: only the other waiting device hears again; the rollout remembers it.
    let all = rollout.order_install(None);
    assert!(
        matches!(&all[..], [Action::Install(d)] if *d == first[1]),
        "{all:?}"
    );
    assert!(rollout.install_ordered);
    assert!(rollout.order_install(None).is_empty());
    let mut plain = Rollout::new(rid("r-2"), model(), t(0), Strategy::default(), &devices);
    plain.step(t(0), online);
    assert!(
        plain.order_install(None).is_empty(),
        "not on command: nothing to order"
    );
}

#[test]
fn unknown_fields_in_a_request_are_refused_and_a_strategy_is_read() {
    assert!(
        serde_json::from_str::<RolloutRequest>(
            r#"{"slot":"s","version":"1","devices":["r1"],"wave":10}"#
        )
        .is_err()
    );
    let req: RolloutRequest = serde_json::from_str(
        r#"{"slot":"s","version":"1","devices":["r1"],"strategy":{"waves":[{"count":1}],"deadline_s":0}}"#,
    )
    .unwrap();
    assert!(matches!(req.strategy(), Err(TargetError::Strategy(_))));
}

#[test]
fn a_status_is_no_evidence_for_another_release_of_the_same_bytes_nor_against_a_rejection() {
    let mut r = Rollout::new(rid("r-1"), model(), t(0), Strategy::default(), &names(2));
    let started = commanded(&r.step(t(0), online));
    let same_bytes_older = Some((model().sha256, 2));
    r.observe_active(&started[0], same_bytes_older);
    assert_eq!(r.devices[&started[0]].outcome(), Outcome::Pending);
    r.devices
        .get_mut(&started[1])
        .unwrap()
        .progress
        .apply(t(1), &rejected());
    r.observe_active(&started[1], Some((model().sha256, 3)));
    assert_eq!(r.devices[&started[1]].outcome(), Outcome::Rejected);
}

/// A benchmark report: the candidate's p99 on `engine`, the incumbent's on its own.
fn report_on(
    p99: f64,
    engine: Option<EngineKind>,
    incumbent_p99: f64,
    incumbent_engine: Option<EngineKind>,
) -> BenchReport {
    BenchReport {
        runs: 20,
        p50_ms: p99 * 0.8,
        p99_ms: p99,
        mean_ms: p99 * 0.8,
        incumbent_p99_ms: Some(incumbent_p99),
        reference_max_abs_err: None,
        peak_rss_bytes: None,
        passed: true,
        engine,
        incumbent_engine,
        engines: vec![],
        agreement: None,
    }
}

fn bench_on(
    p99: f64,
    engine: Option<EngineKind>,
    incumbent_p99: f64,
    incumbent_engine: Option<EngineKind>,
) -> Stage {
    Stage::Benchmarked(report_on(p99, engine, incumbent_p99, incumbent_engine))
}

/// A first wave of one device per report, each reporting its benchmark and then active;
/// the rollout as the gate left it.
fn gated(reports: &[Stage]) -> Rollout {
    let strategy = Strategy {
        waves: vec![
            WaveSize::Count(reports.len() as u32),
            WaveSize::Percent(100.0),
        ],
        gate: Some(Gate {
            max_p99_regression_percent: 10.0,
        }),
        ..Strategy::default()
    };
    let mut r = Rollout::new(
        rid("r-1"),
        model(),
        t(0),
        strategy,
        &names(2 * reports.len()),
    );
    r.step(t(0), online);
    let first: Vec<DeviceId> = r
        .devices
        .iter()
        .filter(|(_, run)| run.wave == 0)
        .map(|(id, _)| id.clone())
        .collect();
    for (id, report) in first.iter().zip(reports) {
        let run = r.devices.get_mut(id).unwrap();
        run.progress.apply(t(1), report);
        run.progress.apply(t(2), &active());
    }
    r.step(t(3), online);
    r
}

const CUDA: Option<EngineKind> = Some(EngineKind::OnnxruntimeCuda);
const TRACT: Option<EngineKind> = Some(EngineKind::Tract);

#[test]
fn the_gate_fails_when_devices_on_one_engine_regress_and_names_that_engine() {
    let r = gated(&[
        bench_on(2.5, CUDA, 2.0, CUDA),
        bench_on(2.4, CUDA, 2.0, CUDA),
        bench_on(2.6, CUDA, 2.1, CUDA),
    ]);
    assert_eq!(r.state, RolloutState::Paused);
    let reason = r.reason.unwrap();
    assert!(
        reason.starts_with("gate: median p99 on onnxruntime-cuda 2.500 ms"),
        "{reason}"
    );
    assert!(reason.contains("3 devices"), "{reason}");
}

#[test]
fn devices_on_different_engines_are_not_mixed_in_the_gate() {
    // Mixed together the medians would be 9.0 ms new against 1.0 ms before: a regression
    // that no device has on its own engine.
    let fine = [
        bench_on(1.0, CUDA, 0.95, CUDA),
        bench_on(10.0, TRACT, 9.5, TRACT),
        // Moved from CUDA to tract (CUDA missed the reference): compared on the robot.
        bench_on(9.0, TRACT, 1.0, CUDA),
    ];
    let r = gated(&fine);
    assert_eq!(
        (r.state, r.wave, r.reason.as_deref()),
        (RolloutState::InProgress, 1, None)
    );

    let mut regressed = fine.clone();
    regressed[1] = bench_on(12.0, TRACT, 9.5, TRACT);
    let r = gated(&regressed);
    assert_eq!(r.state, RolloutState::Paused);
    let reason = r.reason.unwrap();
    assert!(reason.contains("on tract 12.000 ms"), "{reason}");
    assert!(!reason.contains("onnxruntime-cuda"), "{reason}");
}

#[test]
fn old_agents_that_name_no_engine_are_gated_as_tract_as_before() {
    let old = |p99: f64| bench_on(p99, None, 2.0, None);
    let r = gated(&[old(2.1), old(2.2), old(2.0)]);
    assert_eq!((r.state, r.wave), (RolloutState::InProgress, 1));

    // An old agent and a new one that stayed on tract are the same group.
    let r = gated(&[old(2.5), old(2.6), bench_on(2.5, TRACT, 2.0, TRACT)]);
    assert_eq!(r.state, RolloutState::Paused);
    let reason = r.reason.unwrap();
    assert!(reason.contains("on tract 2.500 ms"), "{reason}");
    assert!(reason.contains("3 devices"), "{reason}");
}

#[test]
fn the_rollout_view_shows_the_engine_chosen_serving_and_every_engine_measured() {
    let mut book = book_with("r-1", &["robot-1"], Strategy::default());
    let bench = Stage::Benchmarked(BenchReport {
        engines: vec![
            botfleet_protocol::engine::EngineBench {
                engine: EngineKind::OnnxruntimeCuda,
                load_ms: 900,
                p50_ms: Some(1.0),
                p99_ms: Some(1.5),
                reference_max_abs_err: Some(1e-4),
                peak_rss_bytes: None,
                cached: false,
                agreement: None,
                passed: true,
                reason: None,
            },
            botfleet_protocol::engine::EngineBench {
                engine: EngineKind::Tract,
                load_ms: 100,
                p50_ms: Some(8.0),
                p99_ms: Some(9.0),
                reference_max_abs_err: Some(1e-5),
                peak_rss_bytes: None,
                cached: false,
                agreement: None,
                passed: true,
                reason: None,
            },
        ],
        ..report_on(1.5, CUDA, 9.5, TRACT)
    });
    book.apply(&event("robot-1", Some("r-1"), 1, bench));
    let id = rid("r-1");
    let device = |book: &Rollouts| book.get(&id).unwrap().devices.unwrap()[&dev("robot-1")].clone();
    let view = device(&book);
    assert_eq!(view.engine, CUDA);
    assert_eq!(view.serving_engine, None, "no status says so yet");
    let figures: Vec<_> = view
        .bench
        .unwrap()
        .engines
        .iter()
        .map(|e| (e.engine, e.p99_ms))
        .collect();
    assert_eq!(
        figures,
        [
            (EngineKind::OnnxruntimeCuda, Some(1.5)),
            (EngineKind::Tract, Some(9.0))
        ]
    );
    let json = serde_json::to_value(book.get(&id).unwrap()).unwrap();
    assert_eq!(json["devices"]["robot-1"]["engine"], "onnxruntime-cuda");

    let status = |engine: serde_json::Value| -> Status {
        serde_json::from_value(serde_json::json!({
            "online": true, "agent_version": "0.2.0", "at": "2026-01-01T00:00:00Z",
            "active": {"orientation": {"name": "m", "version": "1.0.0", "release": 3,
                "sha256": model().sha256, "since": "2026-01-01T00:00:00Z", "engine": engine}}
        }))
        .unwrap()
    };
    book.observe_status(
        &dev("robot-1"),
        &status(serde_json::json!("onnxruntime-cuda")),
    );
    assert_eq!(device(&book).serving_engine, CUDA);
    assert_eq!(device(&book).outcome, Outcome::Active);
    // An old agent's status names no engine: it had only tract.
    book.observe_status(&dev("robot-1"), &status(serde_json::Value::Null));
    assert_eq!(device(&book).serving_engine, TRACT);
}

#[test]
fn an_old_agents_benchmark_is_shown_as_tract() {
    let mut book = book_with("r-1", &["robot-1"], Strategy::default());
    book.apply(&event(
        "robot-1",
        Some("r-1"),
        1,
        bench_on(2.0, None, 2.0, None),
    ));
    let view = book.get(&rid("r-1")).unwrap().devices.unwrap()[&dev("robot-1")].clone();
    assert_eq!(view.engine, TRACT);
}

#[test]
fn an_event_or_a_status_saves_its_device_row_only() {
    let mut book = book_with(
        "r-1",
        &["robot-1", "robot-2", "robot-3"],
        Strategy::default(),
    );
    let (rows, _) = book.take_dirty().unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].head.is_some(), "a new rollout writes its own row");
    assert_eq!(rows[0].devices.len(), 3, "and every device's");

    book.apply(&event("robot-2", Some("r-1"), 1, active()));
    let (rows, _) = book.take_dirty().unwrap();
    assert_eq!(rows.len(), 1);
    assert!(
        rows[0].head.is_none(),
        "an event leaves the rollout's row alone"
    );
    let written: Vec<_> = rows[0].devices.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(written, ["robot-2"]);
    let run: DeviceRun = serde_json::from_slice(&rows[0].devices[0].1).unwrap();
    assert_eq!(run.outcome(), Outcome::Active);

    assert!(
        book.take_dirty().unwrap().0.is_empty(),
        "nothing changed since"
    );
    let status: Status = serde_json::from_value(serde_json::json!({
        "online": true, "agent_version": "0.2.0", "at": "2026-01-01T00:00:00Z",
        "active": {"orientation": {"name": "m", "version": "1.0.0", "release": 3,
            "sha256": model().sha256, "since": "2026-01-01T00:00:00Z"}}
    }))
    .unwrap();
    book.observe_status(&dev("robot-3"), &status);
    let (rows, _) = book.take_dirty().unwrap();
    let written: Vec<_> = rows[0].devices.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(written, ["robot-3"], "a status too writes only its device");
}
