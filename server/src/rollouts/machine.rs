//! One rollout as a state machine: [`Rollout::step`] looks at the devices' progress and the
//! clock and says which devices to command next; operations (pause, resume, abort, roll
//! back, supersede) change the state and say which devices to restore. Pure: no I/O, the
//! caller passes the time and each device's presence, and carries out the [`Action`]s.

use std::collections::BTreeMap;

use botfleet_protocol::DeviceId;
use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::DesiredModel;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::fold::{DeviceProgress, Outcome};
use super::strategy::{OnError, Strategy};
use super::{RolloutId, RolloutModel};
use crate::channels::ChannelName;

/// Whole-rollout state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    InProgress,
    /// Waiting for an operator: a threshold or the gate said stop.
    Paused,
    /// Every device reached a terminal outcome.
    Completed,
    Aborted,
    RolledBack,
    /// A newer rollout of the slot took its devices over.
    Superseded,
}

impl RolloutState {
    /// In progress or paused: it still owns its devices' slot.
    pub fn is_live(self) -> bool {
        matches!(self, RolloutState::InProgress | RolloutState::Paused)
    }
}

/// Whether a device is reachable, from its retained status and last will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Online,
    Offline,
}

/// What the caller must do for one device.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Publish the rollout's model as the device's desired model for the slot.
    Command(DeviceId),
    /// Put the slot's previous desired model back (the device never took the new one).
    Restore(DeviceId),
    /// The device serves the new model: tell it to go back, and restore the previous one.
    Rollback(DeviceId),
    /// Publish the rollout's model again, its install now ordered (it was on command).
    Install(DeviceId),
}

/// A server-side verdict on a device, newer than its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    TimedOut,
    Skipped,
    Aborted,
    Superseded,
    RollingBack,
    RolledBack,
}

/// One device in one rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRun {
    pub wave: usize,
    /// When its desired document was published for this rollout; never twice.
    pub commanded_at: Option<Timestamp>,
    /// What the slot wanted before this rollout (restored on abort and roll-back).
    pub previous: Option<DesiredModel>,
    pub progress: DeviceProgress,
    pub mark: Option<Mark>,
    /// Its retained status names this rollout's artifact as serving the slot.
    pub reported_active: bool,
    /// The engine that status names for it (while `reported_active`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_engine: Option<EngineKind>,
    /// An operator ordered this device's install (a rollout whose strategy installs on
    /// command).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub install_ordered: bool,
}

impl DeviceRun {
    pub fn outcome(&self) -> Outcome {
        match self.mark {
            Some(Mark::TimedOut) => Outcome::TimedOut,
            Some(Mark::Skipped) => Outcome::Skipped,
            Some(Mark::Aborted) => Outcome::Aborted,
            Some(Mark::Superseded) => Outcome::Superseded,
            Some(Mark::RollingBack) if self.progress.outcome() == Outcome::RolledBack => {
                Outcome::RolledBack
            }
            Some(Mark::RollingBack) => Outcome::RollingBack,
            Some(Mark::RolledBack) => Outcome::RolledBack,
            // The status is evidence where events went missing, not against them.
            None if self.reported_active && !self.progress.outcome().is_terminal() => {
                Outcome::Active
            }
            None => self.progress.outcome(),
        }
    }
}

/// One rollout and the progress of each of its devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    pub id: RolloutId,
    pub model: RolloutModel,
    pub created_at: Timestamp,
    pub strategy: Strategy,
    pub state: RolloutState,
    /// Why it paused (or stopped), in words.
    pub reason: Option<String>,
    /// The current wave (0-based) and when it started.
    pub wave: usize,
    pub wave_started_at: Option<Timestamp>,
    /// Since when the current wave has met the success threshold (bake time runs from here).
    pub success_since: Option<Timestamp>,
    /// Waves up to this one were let through by an operator: their errors no longer count.
    pub waived: Option<usize>,
    pub waves: usize,
    /// An operator ordered the install on every device (its strategy installs on command):
    /// devices commanded from now on swap as soon as their gate passes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub install_ordered: bool,
    /// The channel it targets: once complete, the channel pins its model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<ChannelName>,
    /// Stored as rows of their own (`crate::db`), so a device's event rewrites one small
    /// row, not the rollout; read here too from rows written before that.
    #[serde(default, skip_serializing)]
    pub devices: BTreeMap<DeviceId, DeviceRun>,
}

fn secs(s: u64) -> SignedDuration {
    SignedDuration::from_secs(i64::try_from(s).unwrap_or(i64::MAX))
}

impl Rollout {
    /// A rollout planned in waves; nothing is commanded until the first [`Self::step`].
    pub fn new(
        id: RolloutId,
        model: RolloutModel,
        created_at: Timestamp,
        strategy: Strategy,
        devices: &[DeviceId],
    ) -> Self {
        let planned = strategy.plan(&model.slot, devices);
        let mut runs = BTreeMap::new();
        for (wave, members) in planned.iter().enumerate() {
            for device in members {
                let run = DeviceRun {
                    wave,
                    ..DeviceRun::default()
                };
                runs.insert(device.clone(), run);
            }
        }
        Self {
            id,
            model,
            created_at,
            strategy,
            state: RolloutState::InProgress,
            reason: None,
            wave: 0,
            wave_started_at: None,
            success_since: None,
            waived: None,
            waves: planned.len(),
            install_ordered: false,
            channel: None,
            devices: runs,
        }
    }

    /// Records the artifact and release `device` reports serving the slot (from its retained
    /// status). The release matters: two releases may ship the same bytes.
    pub fn observe_active(
        &mut self,
        device: &DeviceId,
        serving: Option<(Sha256Digest, u64)>,
    ) -> bool {
        let ours = (self.model.sha256, self.model.release);
        let Some(run) = self.devices.get_mut(device) else {
            return false;
        };
        if run.commanded_at.is_none() {
            return false;
        }
        let before = (run.reported_active, run.mark);
        run.reported_active = serving == Some(ours);
        if run.mark == Some(Mark::RollingBack) && serving != Some(ours) {
            run.mark = Some(Mark::RolledBack);
        }
        if run.reported_active && matches!(run.mark, Some(Mark::TimedOut | Mark::Skipped)) {
            run.mark = None;
        }
        before != (run.reported_active, run.mark)
    }

    /// Records the engine `device` reports serving the slot with; kept only while that is
    /// this rollout's model. `true` when it changed.
    pub fn observe_engine(&mut self, device: &DeviceId, engine: Option<EngineKind>) -> bool {
        let Some(run) = self.devices.get_mut(device) else {
            return false;
        };
        let engine = engine.filter(|_| run.reported_active);
        let changed = run.serving_engine != engine;
        run.serving_engine = engine;
        changed
    }

    /// How many devices carry a mark.
    pub fn marks(&self) -> usize {
        self.devices.values().filter(|r| r.mark.is_some()).count()
    }

    /// What [`Self::step`] can change, to tell whether it did.
    pub fn fingerprint(&self) -> impl PartialEq + use<> {
        let marks = self.marks();
        (
            self.state,
            self.wave,
            self.wave_started_at,
            self.success_since,
            self.reason.clone(),
            marks,
        )
    }

    /// Advances the rollout as far as `now` and the devices allow.
    pub fn step(
        &mut self,
        now: Timestamp,
        presence: impl Fn(&DeviceId) -> Presence,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        self.apply_deadlines(now, &presence);
        while self.state == RolloutState::InProgress {
            if self.wave_started_at.is_none() {
                self.wave_started_at = Some(now);
                for (id, run) in &mut self.devices {
                    if run.wave == self.wave && run.commanded_at.is_none() && run.mark.is_none() {
                        run.commanded_at = Some(now);
                        actions.push(Action::Command(id.clone()));
                    }
                }
            }
            if !self.evaluate(now, &mut actions) {
                break;
            }
        }
        actions
    }

    /// Devices without a terminal state past their deadline get one. A device that is online
    /// and says its swap is deferred (a hold from its own software, an install window) is
    /// waiting by design, not late: its deadline waits too.
    fn apply_deadlines(&mut self, now: Timestamp, presence: &impl Fn(&DeviceId) -> Presence) {
        let deadline = secs(self.strategy.deadline_s);
        for (id, run) in &mut self.devices {
            let Some(at) = run.commanded_at else { continue };
            if run.outcome().is_terminal() || run.mark.is_some() || now < at + deadline {
                continue;
            }
            if run.outcome() == Outcome::Deferred && presence(id) == Presence::Online {
                continue;
            }
            run.mark = Some(match presence(id) {
                Presence::Online => Mark::TimedOut,
                Presence::Offline => Mark::Skipped,
            });
        }
    }

    /// Judges the current wave; `true` when the next wave should start now.
    fn evaluate(&mut self, now: Timestamp, actions: &mut Vec<Action>) -> bool {
        let wave = self.wave;
        let outcomes: Vec<Outcome> = self
            .devices
            .values()
            .filter(|r| r.wave == wave)
            .map(DeviceRun::outcome)
            .collect();
        let n = outcomes.len().max(1) as f64;
        let errors = outcomes.iter().filter(|o| o.is_error()).count();
        let active = outcomes.iter().filter(|o| **o == Outcome::Active).count();
        let waived = self.waived.is_some_and(|w| w >= wave);
        if !waived && errors as f64 / n > self.strategy.error_threshold {
            let why = format!(
                "wave {wave}: {errors} of {} devices failed, were rejected or timed out",
                outcomes.len()
            );
            self.on_error(why, now, actions);
            return false;
        }
        let settled = outcomes.iter().all(|o| o.is_terminal());
        let last = wave + 1 >= self.waves;
        if last {
            if self.devices.values().all(|r| r.outcome().is_terminal()) {
                if let Some(why) = self.gate_failure().filter(|_| !waived) {
                    self.on_error(why, now, actions);
                } else {
                    self.state = RolloutState::Completed;
                }
            }
            return false;
        }
        if waived || active as f64 / n >= self.strategy.success_threshold {
            let since = *self.success_since.get_or_insert(now);
            if now < since + secs(self.strategy.bake_s) {
                return false;
            }
            if let Some(why) = self.gate_failure().filter(|_| !waived) {
                self.on_error(why, now, actions);
                return false;
            }
            self.wave += 1;
            self.wave_started_at = None;
            self.success_since = None;
            return true;
        }
        self.success_since = None;
        if settled {
            self.state = RolloutState::Paused;
            self.reason = Some(format!(
                "wave {wave}: {active} of {} devices active, below the success threshold {}",
                outcomes.len(),
                self.strategy.success_threshold
            ));
        }
        false
    }

    /// Why the fleet gates (latency, pooled shadow agreement) fail for the devices started
    /// so far, if they do.
    fn gate_failure(&self) -> Option<String> {
        self.latency_failure().or_else(|| self.shadow_failure())
    }

    /// The shadow's agreement pooled over the devices of the waves so far: each device
    /// already met `min_agreement` on its own requests to go active, but a fleet where many
    /// pass narrowly is one where the model changes many answers.
    fn shadow_failure(&self) -> Option<String> {
        let spec = self.strategy.shadow.as_ref()?;
        let pooled = self.shadow_pooled()?;
        (pooled.agreement < spec.min_agreement).then(|| {
            format!(
                "shadow: agreement {:.3} pooled over {} live requests on {} device{} is below {}",
                pooled.agreement,
                pooled.samples,
                pooled.devices,
                if pooled.devices == 1 { "" } else { "s" },
                spec.min_agreement
            )
        })
    }

    /// The shadows reported by devices of the waves so far, pooled; `None` without any.
    pub fn shadow_pooled(&self) -> Option<super::view::ShadowSummary> {
        let reports: Vec<_> = self
            .devices
            .values()
            .filter(|r| r.wave <= self.wave)
            .filter_map(|r| r.progress.shadow())
            .collect();
        let samples: u64 = reports.iter().map(|r| u64::from(r.samples)).sum();
        let agreed: u64 = reports.iter().map(|r| u64::from(r.agreed)).sum();
        (samples > 0).then(|| super::view::ShadowSummary {
            devices: reports.len(),
            samples,
            agreed,
            agreement: agreed as f64 / samples as f64,
        })
    }

    /// Why the latency gate fails for the devices started so far, if it does.
    fn latency_failure(&self) -> Option<String> {
        let gate = self.strategy.gate?;
        let reports = self
            .devices
            .values()
            .filter(|r| r.wave <= self.wave)
            .filter_map(|r| r.progress.bench());
        super::gate::regression(gate, reports)
    }

    fn on_error(&mut self, why: String, now: Timestamp, actions: &mut Vec<Action>) {
        match self.strategy.on_error {
            OnError::Pause => {
                self.state = RolloutState::Paused;
                self.reason = Some(why);
            }
            OnError::Rollback => {
                actions.extend(self.roll_back(now));
                self.reason = Some(why);
            }
        }
    }

    /// Goes on after a pause; the paused wave's thresholds are waived.
    pub fn resume(&mut self) -> bool {
        if self.state != RolloutState::Paused {
            return false;
        }
        self.state = RolloutState::InProgress;
        self.waived = Some(self.wave);
        self.reason = None;
        true
    }

    pub fn pause(&mut self) -> bool {
        if self.state != RolloutState::InProgress {
            return false;
        }
        self.state = RolloutState::Paused;
        self.reason = Some("paused by an operator".into());
        true
    }

    /// Stops: devices that have not taken the model keep their old one.
    pub fn abort(&mut self) -> Vec<Action> {
        self.stop(RolloutState::Aborted, Mark::Aborted, false)
    }

    /// Stops, and devices that took the model go back to their previous one.
    pub fn roll_back(&mut self, _now: Timestamp) -> Vec<Action> {
        self.stop(RolloutState::RolledBack, Mark::Aborted, true)
    }

    /// Orders the install of a rollout that installs on command, on `devices` or (`None`)
    /// every device: those already commanded get their document again.
    pub fn order_install(&mut self, devices: Option<&[DeviceId]>) -> Vec<Action> {
        if !self.state.is_live() || !self.strategy.install_on_command {
            return Vec::new();
        }
        let mut actions = Vec::new();
        let before = self.install_ordered;
        if devices.is_none() {
            self.install_ordered = true;
        }
        for (id, run) in &mut self.devices {
            if !devices.is_none_or(|d| d.contains(id)) {
                continue;
            }
            let already = before || run.install_ordered;
            if devices.is_some() {
                run.install_ordered = true;
            }
            let waiting = run.commanded_at.is_some() && !run.outcome().is_terminal();
            if waiting && !already {
                actions.push(Action::Install(id.clone()));
            }
        }
        actions
    }

    /// A newer rollout takes the devices over; it writes their desired documents itself.
    pub fn supersede(&mut self) {
        self.stop(RolloutState::Superseded, Mark::Superseded, false);
    }

    fn stop(&mut self, state: RolloutState, mark: Mark, back: bool) -> Vec<Action> {
        let mut actions = Vec::new();
        let was_live = self.state.is_live() || (back && self.state == RolloutState::Completed);
        if !was_live {
            return actions;
        }
        let restore = state != RolloutState::Superseded;
        for (id, run) in &mut self.devices {
            let outcome = run.outcome();
            if outcome == Outcome::Active {
                if back {
                    run.mark = Some(Mark::RollingBack);
                    actions.push(Action::Rollback(id.clone()));
                }
                continue;
            }
            if matches!(outcome, Outcome::RollingBack | Outcome::RolledBack) {
                continue;
            }
            if restore && run.commanded_at.is_some() {
                actions.push(Action::Restore(id.clone()));
            }
            if !outcome.is_terminal() || run.commanded_at.is_none() {
                run.mark = Some(mark);
            }
        }
        self.state = state;
        actions
    }
}
