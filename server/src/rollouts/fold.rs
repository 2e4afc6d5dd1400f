//! One device's progress through one rollout, folded from its events.
//!
//! The fold does not depend on delivery order: events are kept sorted by their time (ties by
//! stage order), the latest one decides the outcome, and an event seen twice (QoS 1
//! redelivery) changes nothing.

use botfleet_protocol::EventId;
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::messages::{BenchReport, RejectReason, ShadowReport, Stage};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Events kept per device; resumed downloads can report many.
const MAX_HISTORY: usize = 64;

/// Where a device stands in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing heard yet.
    Pending,
    /// Working through the stages.
    InProgress,
    /// Ready (gated) on the device, its swap put off by a hold or an install window.
    Deferred,
    /// The model serves the slot.
    Active,
    /// The device refused the model.
    Rejected,
    /// Something went wrong that may pass; the device may retry.
    Failed,
    /// No terminal stage reported by the deadline while the device was online.
    TimedOut,
    /// Offline past the deadline; it still converges if it returns while the rollout lives.
    Skipped,
    /// The rollout was aborted before this device took the model; it keeps its old one.
    Aborted,
    /// A newer rollout for the slot took this device over.
    Superseded,
    /// Told to go back to its previous model; not yet confirmed by its status.
    RollingBack,
    /// Its status shows the previous model serving again.
    RolledBack,
}

impl Outcome {
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            Outcome::Pending | Outcome::InProgress | Outcome::Deferred | Outcome::RollingBack
        )
    }

    /// Failed, rejected, timed out or taken back out of service by the device's own
    /// health watch: what the error threshold counts.
    pub fn is_error(self) -> bool {
        matches!(
            self,
            Outcome::Rejected | Outcome::Failed | Outcome::TimedOut | Outcome::RolledBack
        )
    }
}

/// One reported stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryEntry {
    pub stage: &'static str,
    pub at: Timestamp,
}

/// A device's progress as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgressView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<&'static str>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<RejectReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The latest benchmark, with every engine's figures in `bench.engines`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bench: Option<BenchReport>,
    /// The engine the device's gate chose (the latest benchmark's; tract for an agent that
    /// names none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineKind>,
    /// The engine serving this rollout's model, from the device's status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving_engine: Option<EngineKind>,
    /// The candidate's shadow on the device's live requests, when the rollout asked for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<Timestamp>,
    pub history: Vec<HistoryEntry>,
    /// The wave this device belongs to (0 is the first).
    pub wave: usize,
}

/// A device's progress: the events seen, in time order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceProgress {
    events: Vec<(Timestamp, Stage)>,
    /// Ids of the events recorded (newest last, as many as events are kept): a replay from
    /// the agent's outbox carries the id it had the first time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    ids: Vec<EventId>,
}

/// Order of stages within one instant: a later stage wins a tie.
fn rank(stage: &Stage) -> u8 {
    match stage {
        Stage::Received => 0,
        Stage::Verified { .. } => 1,
        Stage::Downloading { .. } => 2,
        Stage::Downloaded { .. } => 3,
        Stage::Loaded { .. } => 4,
        Stage::Benchmarked(_) => 5,
        Stage::Shadowed(_) => 6,
        Stage::Deferred { .. } => 7,
        Stage::Failed { .. } => 8,
        Stage::Rejected { .. } => 9,
        Stage::Active { .. } => 10,
        Stage::RolledBack { .. } => 11,
    }
}

impl DeviceProgress {
    /// Records one event without an id; `false` when it was already recorded.
    #[cfg(test)]
    pub fn apply(&mut self, at: Timestamp, stage: &Stage) -> bool {
        self.record(None, at, stage)
    }

    /// Records one event, known by its id when it has one (agents since the outbox send
    /// one) and otherwise by its time and stage; `false` when it was already recorded.
    pub fn record(&mut self, id: Option<&EventId>, at: Timestamp, stage: &Stage) -> bool {
        if id.is_some_and(|id| self.ids.contains(id))
            || self.events.iter().any(|(t, s)| *t == at && s == stage)
        {
            return false;
        }
        if let Some(id) = id {
            self.ids.push(id.clone());
            if self.ids.len() > MAX_HISTORY {
                self.ids.remove(0);
            }
        }
        let key = (at, rank(stage));
        let pos = self.events.partition_point(|(t, s)| (*t, rank(s)) <= key);
        self.events.insert(pos, (at, stage.clone()));
        if self.events.len() > MAX_HISTORY {
            // Keep the newest; the oldest (received, early downloads) matter least.
            self.events.remove(0);
        }
        true
    }

    fn latest(&self) -> Option<&(Timestamp, Stage)> {
        self.events.last()
    }

    /// The latest shadow report, if any.
    pub fn shadow(&self) -> Option<&ShadowReport> {
        self.events.iter().rev().find_map(|(_, s)| match s {
            Stage::Shadowed(report) => Some(report),
            _ => None,
        })
    }

    /// The latest benchmark report, if any.
    pub fn bench(&self) -> Option<&BenchReport> {
        self.events.iter().rev().find_map(|(_, s)| match s {
            Stage::Benchmarked(report) => Some(report),
            _ => None,
        })
    }

    pub fn outcome(&self) -> Outcome {
        match self.latest().map(|(_, s)| s) {
            None => Outcome::Pending,
            Some(Stage::Active { .. }) => Outcome::Active,
            Some(Stage::Rejected { .. }) => Outcome::Rejected,
            Some(Stage::Failed { .. }) => Outcome::Failed,
            Some(Stage::RolledBack { .. }) => Outcome::RolledBack,
            Some(Stage::Deferred { .. }) => Outcome::Deferred,
            Some(_) => Outcome::InProgress,
        }
    }

    pub fn view(&self) -> ProgressView {
        let latest = self.latest();
        let (reason, message) = match latest.map(|(_, s)| s) {
            Some(Stage::Rejected { reason, message }) => (Some(*reason), Some(message.clone())),
            Some(Stage::Failed { message }) => (None, Some(message.clone())),
            Some(Stage::RolledBack { reason, .. }) => (None, Some(reason.clone())),
            Some(Stage::Deferred { deferral }) => (None, Some(format!("deferred: {deferral}"))),
            _ => (None, None),
        };
        let bench = self.bench().cloned();
        ProgressView {
            stage: latest.map(|(_, s)| s.name()),
            outcome: self.outcome(),
            reason,
            message,
            engine: bench
                .as_ref()
                .map(|b| b.engine.unwrap_or(EngineKind::Tract)),
            serving_engine: None,
            shadow: self.shadow().cloned(),
            bench,
            updated_at: latest.map(|(t, _)| *t),
            history: self
                .events
                .iter()
                .map(|(at, s)| HistoryEntry {
                    stage: s.name(),
                    at: *at,
                })
                .collect(),
            wave: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn bench(p99: f64) -> Stage {
        Stage::Benchmarked(BenchReport {
            runs: 20,
            p50_ms: 1.0,
            p99_ms: p99,
            mean_ms: 1.1,
            incumbent_p99_ms: None,
            reference_max_abs_err: Some(1e-5),
            peak_rss_bytes: None,
            passed: true,
            engine: None,
            incumbent_engine: None,
            engines: vec![],
            agreement: None,
        })
    }

    #[test]
    fn an_event_replayed_with_its_id_is_a_duplicate_even_with_another_time() {
        let mut p = DeviceProgress::default();
        let id = EventId::new("e-1").unwrap();
        assert!(p.record(Some(&id), t(1), &bench(2.0)));
        assert!(!p.record(Some(&id), t(2), &bench(2.0)));
        assert!(p.record(Some(&EventId::new("e-2").unwrap()), t(2), &bench(2.0)));
        assert_eq!(p.view().history.len(), 2);
    }

    #[test]
    fn a_deferred_device_waits_then_goes_active() {
        let mut p = DeviceProgress::default();
        p.apply(t(1), &bench(2.0));
        let until = t(100);
        let deferral = botfleet_protocol::messages::Deferral::Held {
            holds: vec![botfleet_protocol::messages::HoldInfo {
                holder: "nav".into(),
                reason: "driving".into(),
                until,
            }],
            until,
        };
        p.apply(t(2), &Stage::Deferred { deferral });
        assert_eq!(p.outcome(), Outcome::Deferred);
        assert!(!p.outcome().is_terminal());
        let message = p.view().message.unwrap();
        assert!(
            message.starts_with("deferred: held by nav (until "),
            "{message}"
        );
        let active = Stage::Active {
            previous: None,
            swap_micros: 40,
        };
        p.apply(t(2), &active);
        assert_eq!(p.outcome(), Outcome::Active, "the swap wins a tie");
    }

    #[test]
    fn stages_lead_to_active() {
        let mut p = DeviceProgress::default();
        assert_eq!(p.outcome(), Outcome::Pending);
        p.apply(t(1), &Stage::Received);
        assert_eq!(p.outcome(), Outcome::InProgress);
        p.apply(t(2), &bench(2.0));
        p.apply(
            t(3),
            &Stage::Active {
                previous: None,
                swap_micros: 40,
            },
        );
        let view = p.view();
        assert_eq!(view.outcome, Outcome::Active);
        assert_eq!(view.stage, Some("active"));
        assert_eq!(view.bench.unwrap().p99_ms, 2.0);
        assert_eq!(view.updated_at, Some(t(3)));
        let stages: Vec<_> = view.history.iter().map(|h| h.stage).collect();
        assert_eq!(stages, ["received", "benchmarked", "active"]);
    }

    #[test]
    fn a_duplicate_event_changes_nothing() {
        let mut p = DeviceProgress::default();
        assert!(p.apply(t(1), &Stage::Received));
        let before = p.clone();
        assert!(!p.apply(t(1), &Stage::Received));
        assert_eq!(p, before);
    }

    #[test]
    fn a_late_redelivered_stage_does_not_undo_a_terminal_one() {
        let mut p = DeviceProgress::default();
        let rejected = Stage::Rejected {
            reason: RejectReason::GateMissed,
            message: "p99 9 ms over the 5 ms budget".into(),
        };
        p.apply(t(5), &rejected);
        p.apply(t(2), &bench(9.0));
        let view = p.view();
        assert_eq!(view.outcome, Outcome::Rejected);
        assert_eq!(view.reason, Some(RejectReason::GateMissed));
        assert_eq!(
            view.message.as_deref(),
            Some("p99 9 ms over the 5 ms budget")
        );
        assert_eq!(view.history[0].stage, "benchmarked");
    }

    #[test]
    fn a_retry_after_a_failure_is_in_progress_again() {
        let mut p = DeviceProgress::default();
        p.apply(
            t(1),
            &Stage::Failed {
                message: "connection reset".into(),
            },
        );
        assert_eq!(p.outcome(), Outcome::Failed);
        p.apply(
            t(2),
            &Stage::Downloading {
                total_bytes: 10,
                offset: 4,
            },
        );
        assert_eq!(p.outcome(), Outcome::InProgress);
        assert_eq!(p.view().message, None);
    }

    #[test]
    fn ties_in_time_are_ordered_by_stage() {
        let mut a = DeviceProgress::default();
        let active = Stage::Active {
            previous: None,
            swap_micros: 1,
        };
        a.apply(t(1), &active);
        a.apply(t(1), &Stage::Received);
        let mut b = DeviceProgress::default();
        b.apply(t(1), &Stage::Received);
        b.apply(t(1), &active);
        assert_eq!(a, b);
        assert_eq!(a.outcome(), Outcome::Active);
    }

    #[test]
    fn history_is_bounded() {
        let mut p = DeviceProgress::default();
        for i in 0..200 {
            p.apply(
                t(i),
                &Stage::Downloading {
                    total_bytes: 100,
                    offset: i as u64,
                },
            );
        }
        assert_eq!(p.view().history.len(), MAX_HISTORY);
        assert_eq!(p.view().updated_at, Some(t(199)));
    }
}
