//! A rollout as the API shows it.

use std::collections::BTreeMap;

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::{DeviceId, RolloutId, SlotName};
use jiff::Timestamp;
use serde::Serialize;

use super::fold::{Outcome, ProgressView};
use super::machine::{Rollout, RolloutState};
use super::strategy::Strategy;

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Devices per outcome; the server-side verdicts appear only when some device has one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pending: usize,
    pub in_progress: usize,
    /// Ready on the device, waiting for a hold to end or an install window to open.
    #[serde(skip_serializing_if = "is_zero")]
    pub deferred: usize,
    pub active: usize,
    pub rejected: usize,
    pub failed: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub timed_out: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub aborted: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub superseded: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub rolling_back: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub rolled_back: usize,
}

impl Summary {
    fn count(&mut self, outcome: Outcome) {
        let n = match outcome {
            Outcome::Pending => &mut self.pending,
            Outcome::InProgress => &mut self.in_progress,
            Outcome::Deferred => &mut self.deferred,
            Outcome::Active => &mut self.active,
            Outcome::Rejected => &mut self.rejected,
            Outcome::Failed => &mut self.failed,
            Outcome::TimedOut => &mut self.timed_out,
            Outcome::Skipped => &mut self.skipped,
            Outcome::Aborted => &mut self.aborted,
            Outcome::Superseded => &mut self.superseded,
            Outcome::RollingBack => &mut self.rolling_back,
            Outcome::RolledBack => &mut self.rolled_back,
        };
        *n += 1;
    }
}

/// The shadows of a rollout's devices so far, pooled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShadowSummary {
    pub devices: usize,
    pub samples: u64,
    pub agreed: u64,
    pub agreement: f64,
}

/// A rollout as the API shows it; the list leaves `devices` out.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutView {
    pub rollout_id: RolloutId,
    pub slot: SlotName,
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
    pub created_at: Timestamp,
    pub state: RolloutState,
    /// Why it paused or stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The current wave (0-based) of `waves`.
    pub wave: usize,
    pub waves: usize,
    pub strategy: Strategy,
    pub summary: Summary,
    /// Shadow agreement pooled over the devices of the waves so far (one more fleet gate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSummary>,
    /// The channel it targets (and pins once complete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<crate::channels::ChannelName>,
    /// The install was ordered for every device (a strategy that installs on command).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub install_ordered: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<BTreeMap<DeviceId, ProgressView>>,
}

impl Rollout {
    pub fn view(&self, with_devices: bool) -> RolloutView {
        let mut summary = Summary::default();
        for run in self.devices.values() {
            summary.count(run.outcome());
        }
        RolloutView {
            rollout_id: self.id.clone(),
            slot: self.model.slot.clone(),
            version: self.model.version.clone(),
            release: self.model.release,
            sha256: self.model.sha256,
            created_at: self.created_at,
            state: self.state,
            reason: self.reason.clone(),
            wave: self.wave,
            waves: self.waves,
            strategy: self.strategy.clone(),
            summary,
            shadow: self.shadow_pooled(),
            channel: self.channel.clone(),
            install_ordered: self.install_ordered,
            devices: with_devices.then(|| {
                self.devices
                    .iter()
                    .map(|(id, run)| {
                        let mut view = run.progress.view();
                        view.outcome = run.outcome();
                        view.wave = run.wave;
                        view.serving_engine = run.serving_engine;
                        (id.clone(), view)
                    })
                    .collect()
            }),
        }
    }
}
