use botfleet_protocol::messages::{RejectReason, Stage};

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

fn event(device: &str, rollout: Option<&str>, at: i64, stage: Stage) -> Event {
    Event {
        device: dev(device),
        rollout_id: rollout.map(rid),
        slot: model().slot,
        sha256: model().sha256,
        release: Some(3),
        at: Timestamp::from_second(at).unwrap(),
        stage,
    }
}

fn active() -> Stage {
    Stage::Active {
        previous: None,
        swap_micros: 12,
    }
}

fn book_with(id: &str, devices: &[&str]) -> Rollouts {
    let mut book = Rollouts::default();
    let rollout = Rollout::new(
        rid(id),
        model(),
        Timestamp::from_second(0).unwrap(),
        devices.iter().map(|d| dev(d)),
    );
    book.insert(rollout);
    book
}

fn request(version: &str) -> RolloutRequest {
    RolloutRequest {
        slot: SlotName::new("orientation").unwrap(),
        version: version.into(),
        devices: Some(vec![dev("robot-1")]),
        selector: None,
    }
}

#[test]
fn events_fold_into_outcomes_and_a_completed_state() {
    let mut book = book_with("r-1", &["robot-1", "robot-2", "robot-3"]);
    let id = rid("r-1");
    assert_eq!(book.get(&id).unwrap().summary.pending, 3);

    book.apply(&event("robot-1", Some("r-1"), 1, Stage::Received));
    book.apply(&event("robot-1", Some("r-1"), 2, active()));
    book.apply(&event("robot-2", Some("r-1"), 1, Stage::Received));
    let view = book.get(&id).unwrap();
    assert_eq!(view.state, RolloutState::InProgress);
    assert_eq!(
        view.summary,
        Summary {
            pending: 1,
            in_progress: 1,
            active: 1,
            ..Summary::default()
        }
    );

    let rejected = Stage::Rejected {
        reason: RejectReason::Untrusted,
        message: "no trusted key".into(),
    };
    book.apply(&event("robot-2", Some("r-1"), 3, rejected));
    book.apply(&event(
        "robot-3",
        Some("r-1"),
        3,
        Stage::Failed {
            message: "disk full".into(),
        },
    ));
    let view = book.get(&id).unwrap();
    assert_eq!(view.state, RolloutState::Completed);
    let devices = view.devices.unwrap();
    assert_eq!(devices[&dev("robot-1")].outcome, Outcome::Active);
    assert_eq!(devices[&dev("robot-2")].outcome, Outcome::Rejected);
    assert_eq!(
        devices[&dev("robot-2")].reason,
        Some(RejectReason::Untrusted)
    );
    assert_eq!(devices[&dev("robot-3")].outcome, Outcome::Failed);
}

#[test]
fn duplicate_events_are_idempotent() {
    let mut book = book_with("r-1", &["robot-1"]);
    let ev = event("robot-1", Some("r-1"), 1, Stage::Received);
    assert_eq!(book.apply(&ev), Applied::Recorded);
    let before = book.get(&rid("r-1"));
    assert_eq!(book.apply(&ev), Applied::Duplicate);
    assert_eq!(book.get(&rid("r-1")), before);
}

#[test]
fn events_of_other_rollouts_devices_or_artifacts_are_ignored() {
    let mut book = book_with("r-1", &["robot-1"]);
    assert_eq!(
        book.apply(&event("robot-1", Some("r-other"), 1, active())),
        Applied::UnknownRollout
    );
    assert_eq!(
        book.apply(&event("robot-1", None, 1, active())),
        Applied::UnknownRollout
    );
    assert_eq!(
        book.apply(&event("robot-9", Some("r-1"), 1, active())),
        Applied::NotTargeted
    );
    let mut other = event("robot-1", Some("r-1"), 1, active());
    other.sha256 = Sha256Digest::of(b"another model");
    assert_eq!(book.apply(&other), Applied::OtherArtifact);
    let view = book.get(&rid("r-1")).unwrap();
    assert_eq!(view.summary.pending, 1);
    assert_eq!(view.state, RolloutState::InProgress);
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
    let rollout = Rollout::new(
        rid("r-abc"),
        model(),
        Timestamp::UNIX_EPOCH,
        [dev("robot-1")],
    );
    book.insert(rollout);
    book.remember(key.clone(), request("1.0.0"), &response);
    assert_eq!(book.replay(&key, &request("1.0.0")), Replay::Same(response));
    assert_eq!(book.replay(&key, &request("2.0.0")), Replay::Conflict);
    let other_key = IdempotencyKey::new("airflow-run-43").unwrap();
    assert_eq!(book.replay(&other_key, &request("1.0.0")), Replay::Fresh);
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
    req.selector = Some("site".into());
    assert!(matches!(req.targets(), Err(TargetError::Selector(_))));
}

#[test]
fn unknown_fields_in_a_request_are_refused() {
    let err = serde_json::from_str::<RolloutRequest>(
        r#"{"slot":"s","version":"1","devices":["r1"],"wave":10}"#,
    );
    assert!(err.is_err());
}
