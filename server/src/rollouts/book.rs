//! Every rollout and the idempotency keys that made them, in memory. Whatever changes a
//! record marks it dirty; the driver writes dirty records to the database.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::messages::{Event, Status};
use botfleet_protocol::{DeviceId, RolloutId, SlotName};
use serde::{Deserialize, Serialize};

use super::machine::{Mark, Rollout};
use super::view::RolloutView;
use super::{CreatedRollout, IdempotencyKey, Replay, RolloutRequest};
use crate::db::{DbError, RolloutRow};

/// Changed rollouts as database rows, and changed idempotency keys.
pub type DirtyRows = (Vec<RolloutRow>, Vec<(String, Remembered)>);

/// What of one rollout changed since the last save.
#[derive(Debug)]
enum Changed {
    /// Many devices at once (a wave commanded, marks given, an operation): every row.
    Whole,
    /// The rollout's own row (its state, wave, timers) and these devices' runs.
    Head(BTreeSet<DeviceId>),
    /// Only these devices' runs (their events and statuses).
    Devices(BTreeSet<DeviceId>),
}

/// What became of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Recorded,
    Duplicate,
    /// The event names no rollout, or one this server does not know.
    UnknownRollout,
    /// The device is not a target of the rollout it names.
    NotTargeted,
    /// The event is about another artifact than the rollout's.
    OtherArtifact,
}

/// A request made with an idempotency key, and its answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Remembered {
    pub request: RolloutRequest,
    pub response: CreatedRollout,
}

/// Events folded since the start, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCounts {
    pub recorded: u64,
    pub duplicate: u64,
    pub ignored: u64,
}

/// Every rollout, and the idempotency keys that made them.
#[derive(Debug, Default)]
pub struct Rollouts {
    by_id: BTreeMap<RolloutId, Rollout>,
    by_key: HashMap<IdempotencyKey, Remembered>,
    dirty: BTreeMap<RolloutId, Changed>,
    dirty_keys: BTreeSet<String>,
    events: EventCounts,
}

impl Rollouts {
    /// The book as the database left it.
    pub fn restore(rollouts: Vec<Rollout>, keys: Vec<(IdempotencyKey, Remembered)>) -> Self {
        Self {
            by_id: rollouts.into_iter().map(|r| (r.id.clone(), r)).collect(),
            by_key: keys.into_iter().collect(),
            ..Self::default()
        }
    }

    /// What a request with `key` should get.
    pub fn replay(&self, key: &IdempotencyKey, request: &RolloutRequest) -> Replay {
        match self.by_key.get(key) {
            None => Replay::Fresh,
            Some(seen) if &seen.request == request => Replay::Same(seen.response.clone()),
            Some(_) => Replay::Conflict,
        }
    }

    /// Records a new rollout.
    pub fn insert(&mut self, rollout: Rollout) {
        self.dirty.insert(rollout.id.clone(), Changed::Whole);
        self.by_id.insert(rollout.id.clone(), rollout);
    }

    /// Remembers that `key` and `request` made the rollout answered by `response`.
    pub fn remember(
        &mut self,
        key: IdempotencyKey,
        request: RolloutRequest,
        response: &CreatedRollout,
    ) {
        self.dirty_keys.insert(key.as_str().to_owned());
        let response = response.clone();
        self.by_key.insert(key, Remembered { request, response });
    }

    /// Live rollouts of `slot` that own one of `devices`.
    pub fn live_owners(&self, slot: &SlotName, devices: &[DeviceId]) -> Vec<RolloutId> {
        self.by_id
            .values()
            .filter(|r| r.state.is_live() && &r.model.slot == slot)
            .filter(|r| devices.iter().any(|d| r.devices.contains_key(d)))
            .map(|r| r.id.clone())
            .collect()
    }

    /// Every rollout, by id.
    pub fn all(&self) -> impl Iterator<Item = &Rollout> {
        self.by_id.values()
    }

    pub fn rollout(&self, id: &RolloutId) -> Option<&Rollout> {
        self.by_id.get(id)
    }

    /// A rollout to change; it is marked dirty.
    pub fn get_mut(&mut self, id: &RolloutId) -> Option<&mut Rollout> {
        let rollout = self.by_id.get_mut(id)?;
        self.dirty.insert(id.clone(), Changed::Whole);
        Some(rollout)
    }

    /// Steps every live rollout; only those that changed are marked dirty.
    pub fn step_live(
        &mut self,
        now: jiff::Timestamp,
        presence: impl Fn(&DeviceId) -> super::Presence + Copy,
    ) -> Vec<(RolloutId, Vec<super::Action>)> {
        let mut out = Vec::new();
        for id in self.live() {
            let Some(rollout) = self.by_id.get_mut(&id) else {
                continue;
            };
            let before = rollout.fingerprint();
            let marks = rollout.marks();
            let actions = rollout.step(now, presence);
            if !actions.is_empty() || rollout.fingerprint() != before {
                tracing::info!(rollout = %id, state = ?rollout.state, wave = rollout.wave,
                    reason = rollout.reason.as_deref().unwrap_or(""), "rollout moved");
                // Without actions or new marks, no device's run changed.
                if actions.is_empty() && rollout.marks() == marks {
                    Self::head_changed(&mut self.dirty, &id);
                } else {
                    self.dirty.insert(id.clone(), Changed::Whole);
                }
            }
            out.push((id, actions));
        }
        out
    }

    /// Ids of rollouts that the clock can still move.
    pub fn live(&self) -> Vec<RolloutId> {
        self.by_id
            .values()
            .filter(|r| {
                r.state.is_live()
                    || r.devices
                        .values()
                        .any(|d| d.mark == Some(Mark::RollingBack))
            })
            .map(|r| r.id.clone())
            .collect()
    }

    /// Marks a rollout's own row changed.
    fn head_changed(dirty: &mut BTreeMap<RolloutId, Changed>, id: &RolloutId) {
        let changed = dirty
            .entry(id.clone())
            .or_insert(Changed::Head(BTreeSet::new()));
        if let Changed::Devices(devices) = changed {
            *changed = Changed::Head(std::mem::take(devices));
        }
    }

    /// Marks one device's run in a rollout changed.
    fn device_changed(dirty: &mut BTreeMap<RolloutId, Changed>, id: &RolloutId, device: &DeviceId) {
        match dirty.entry(id.clone()) {
            Entry::Vacant(vacant) => {
                vacant.insert(Changed::Devices(BTreeSet::from([device.clone()])));
            }
            Entry::Occupied(mut occupied) => match occupied.get_mut() {
                Changed::Whole => {}
                Changed::Head(devices) | Changed::Devices(devices) => {
                    devices.insert(device.clone());
                }
            },
        }
    }

    /// Folds one event into the rollout it names.
    pub fn apply(&mut self, event: &Event) -> Applied {
        let applied = match event
            .rollout_id
            .as_ref()
            .and_then(|id| self.by_id.get_mut(id))
        {
            None => Applied::UnknownRollout,
            Some(rollout) => {
                if event.sha256 != rollout.model.sha256 || event.slot != rollout.model.slot {
                    Applied::OtherArtifact
                } else if let Some(run) = rollout.devices.get_mut(&event.device) {
                    if run
                        .progress
                        .record(event.id.as_ref(), event.at, &event.stage)
                    {
                        // A device heard from after its deadline converges after all.
                        if matches!(run.mark, Some(Mark::TimedOut | Mark::Skipped)) {
                            run.mark = None;
                        }
                        Self::device_changed(&mut self.dirty, &rollout.id, &event.device);
                        Applied::Recorded
                    } else {
                        Applied::Duplicate
                    }
                } else {
                    Applied::NotTargeted
                }
            }
        };
        match applied {
            Applied::Recorded => self.events.recorded += 1,
            Applied::Duplicate => self.events.duplicate += 1,
            _ => self.events.ignored += 1,
        }
        applied
    }

    /// Folds a device's retained status: what serves each slot is evidence too (events
    /// sent while the server was down are not lost when the status says how they ended).
    pub fn observe_status(&mut self, device: &DeviceId, status: &Status) {
        for rollout in self.by_id.values_mut() {
            if !rollout.devices.contains_key(device) {
                continue;
            }
            let active = status.active.get(&rollout.model.slot);
            let serving = active.map(|m| (m.sha256, m.release));
            // An agent that names no engine has only tract.
            let engine = active.map(|m| m.engine.unwrap_or(EngineKind::Tract));
            let changed = rollout.observe_active(device, serving);
            if rollout.observe_engine(device, engine) || changed {
                Self::device_changed(&mut self.dirty, &rollout.id, device);
            }
        }
    }

    /// Changed rollouts (as their database rows: all of a rollout, or only the devices that
    /// changed) and keys since the last call, to be written. When a rollout cannot be
    /// encoded, every one stays dirty.
    pub fn take_dirty(&mut self) -> Result<DirtyRows, DbError> {
        let rollouts = self
            .dirty
            .iter()
            .filter_map(|(id, changed)| Some((self.by_id.get(id)?, changed)))
            .map(|(rollout, changed)| match changed {
                Changed::Whole => RolloutRow::whole(rollout),
                Changed::Head(devices) => RolloutRow::head(rollout, devices),
                Changed::Devices(devices) => RolloutRow::devices(rollout, devices),
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.dirty.clear();
        let keys = std::mem::take(&mut self.dirty_keys)
            .into_iter()
            .filter_map(|k| {
                let key = IdempotencyKey::new(&k).ok()?;
                self.by_key.get(&key).map(|r| (k, r.clone()))
            })
            .collect();
        Ok((rollouts, keys))
    }

    pub fn events(&self) -> EventCounts {
        self.events
    }

    pub fn get(&self, id: &RolloutId) -> Option<RolloutView> {
        self.by_id.get(id).map(|r| r.view(true))
    }

    /// All rollouts, oldest first, without per-device detail.
    pub fn list(&self) -> Vec<RolloutView> {
        let mut all: Vec<_> = self.by_id.values().map(|r| r.view(false)).collect();
        all.sort_by_key(|v| v.created_at);
        all
    }
}
