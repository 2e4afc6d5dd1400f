//! Channels: a label selector with a pinned model per slot, which the devices it selects
//! follow without a rollout of their own.
//!
//! - A device **follows** a channel for a slot when the channel selects it and pins the
//!   slot, and no other such channel outranks it: the higher `priority` wins, then the name
//!   that sorts first. A narrow channel with a higher priority (`site=lab`, priority 10,
//!   pinned to release 3) therefore holds a group of devices to a version while a wide one
//!   moves on.
//! - A rollout may target a channel: it goes to the devices that would follow the channel
//!   for its slot, in waves as any rollout; once it completes, the channel's pin is the
//!   rollout's model, and a robot that joins later (or whose labels change to match) gets
//!   that model with no new rollout. A completed rollout rolled back gives the pin back.
//! - An operator may also pin a slot directly (`PUT` with `pins`): that is how a group is
//!   held to a version.
//!
//! Pure: the records, who follows what, and the views. `crate::rollouts::follow` writes
//! the desired documents, `crate::db` the rows.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{InstallWindow, ShadowSpec};
use botfleet_protocol::{DeviceId, RolloutId, SlotName};
use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize};

use crate::rollouts::{Rollout, RolloutModel, Selector, SelectorError};

/// The longest channel name.
pub const MAX_NAME: usize = 63;

/// A channel's name: 1 to 63 characters of `[a-z0-9._-]`, starting with a letter or digit
/// (it appears in URLs, label-like).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ChannelName(String);

/// Why a channel name or request was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "channel name {0:?} must be 1 to 63 characters of a-z, 0-9, '.', '_', '-' starting with a letter or digit"
    )]
    Name(String),
    #[error("channel selector: {0}")]
    Selector(#[from] SelectorError),
}

impl ChannelName {
    pub fn new(name: &str) -> Result<Self, ChannelError> {
        let ok = (1..=MAX_NAME).contains(&name.len())
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && name.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
            });
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(ChannelError::Name(name.chars().take(100).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ChannelName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(&text).map_err(serde::de::Error::custom)
    }
}

/// The body of `PUT /api/v1/channels/{name}`. Putting the same body again changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRequest {
    /// Which devices the channel is for (`key=value,...`, as a rollout's selector).
    pub selector: String,
    /// Where channels overlap, the higher priority is followed.
    #[serde(default)]
    pub priority: i32,
    /// Versions to pin, by slot: the operator's pins, replacing those of the slots named.
    /// Slots not named keep their pin (a rollout's, or an earlier one).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pins: BTreeMap<SlotName, String>,
}

impl ChannelRequest {
    pub fn selector(&self) -> Result<Selector, ChannelError> {
        Ok(self.selector.parse()?)
    }
}

/// The model a channel pins in a slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pin {
    pub version: String,
    pub release: u64,
    pub sha256: Sha256Digest,
    pub set_at: Timestamp,
    /// The rollout that completed with this model; absent for an operator's pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<RolloutId>,
    /// The install window and shadow of that rollout, kept for the devices that follow
    /// later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<InstallWindow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowSpec>,
    /// The pin this one replaced: what a rollback of that rollout gives back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Box<Pin>>,
}

impl Pin {
    /// A pin of `model` with nothing before it.
    pub fn of(model: &RolloutModel, set_at: Timestamp) -> Self {
        Self {
            version: model.version.clone(),
            release: model.release,
            sha256: model.sha256,
            set_at,
            rollout_id: None,
            window: None,
            shadow: None,
            previous: None,
        }
    }

    /// This pin with the one it replaces kept one level deep.
    fn replacing(mut self, old: Option<Pin>) -> Self {
        self.previous = old.map(|mut old| {
            old.previous = None;
            Box::new(old)
        });
        self
    }
}

/// One channel as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Channel {
    pub name: ChannelName,
    pub selector: String,
    pub priority: i32,
    #[serde(default)]
    pub pins: BTreeMap<SlotName, Pin>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// A channel with its parsed selector.
#[derive(Debug, Clone)]
struct Entry {
    channel: Channel,
    selector: Selector,
}

/// Devices whose desired documents may need to follow a channel now.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Pending {
    #[default]
    Nothing,
    Devices(BTreeSet<DeviceId>),
    /// A channel or pin changed: every device.
    All,
}

/// Every channel, in memory; changed ones are saved by the caller before it answers.
#[derive(Debug, Default)]
pub struct Channels {
    by_name: BTreeMap<ChannelName, Entry>,
    pending: Pending,
    /// The rollouts that were live at the last look.
    live_seen: BTreeSet<RolloutId>,
}

impl Channels {
    /// The channels the database held; every device is looked at once.
    pub fn restore(stored: Vec<Channel>) -> Self {
        let mut by_name = BTreeMap::new();
        for channel in stored {
            match channel.selector.parse::<Selector>() {
                Ok(selector) => {
                    by_name.insert(channel.name.clone(), Entry { channel, selector });
                }
                Err(err) => tracing::error!(
                    channel = %channel.name, error = %err,
                    "stored channel has a selector this server refuses; skipped"
                ),
            }
        }
        Self {
            by_name,
            pending: Pending::All,
            live_seen: BTreeSet::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn get(&self, name: &ChannelName) -> Option<&Channel> {
        self.by_name.get(name).map(|e| &e.channel)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Channel> {
        self.by_name.values().map(|e| &e.channel)
    }

    /// Creates or changes a channel from `request`; `pins` are the operator's pins,
    /// resolved to models. The stored channel, or `None` when nothing changed.
    pub fn put(
        &mut self,
        name: ChannelName,
        request: &ChannelRequest,
        pins: BTreeMap<SlotName, RolloutModel>,
        now: Timestamp,
    ) -> Result<Option<Channel>, ChannelError> {
        let selector = request.selector()?;
        let existing = self.by_name.get(&name).map(|e| e.channel.clone());
        let mut channel = existing.clone().unwrap_or_else(|| Channel {
            name: name.clone(),
            selector: String::new(),
            priority: 0,
            pins: BTreeMap::new(),
            created_at: now,
            updated_at: now,
        });
        channel.selector = selector.to_string();
        channel.priority = request.priority;
        for (slot, model) in pins {
            let same = channel.pins.get(&slot).is_some_and(|p| {
                p.rollout_id.is_none() && p.sha256 == model.sha256 && p.release == model.release
            });
            if !same {
                let old = channel.pins.remove(&slot);
                channel
                    .pins
                    .insert(slot, Pin::of(&model, now).replacing(old));
            }
        }
        if let Some(existing) = &existing
            && existing.selector == channel.selector
            && existing.priority == channel.priority
            && existing.pins == channel.pins
        {
            return Ok(None);
        }
        channel.updated_at = now;
        self.by_name.insert(
            name,
            Entry {
                channel: channel.clone(),
                selector,
            },
        );
        self.pending = Pending::All;
        Ok(Some(channel))
    }

    /// Removes a channel; its devices keep what they were told last.
    pub fn remove(&mut self, name: &ChannelName) -> Option<Channel> {
        self.by_name.remove(name).map(|e| e.channel)
    }

    /// Sets the pin of the slot of `rollout` (completed, to channel `name`) to its model,
    /// unless it is already that rollout's. The channel to save when it changed.
    pub fn pin_completed(
        &mut self,
        name: &ChannelName,
        rollout: &Rollout,
        now: Timestamp,
    ) -> Option<Channel> {
        let entry = self.by_name.get_mut(name)?;
        let pins = &mut entry.channel.pins;
        let model = &rollout.model;
        match pins.get(&model.slot) {
            Some(pin) if pin.rollout_id.as_ref() == Some(&rollout.id) => return None,
            // A pin set after this rollout was made is the newer word.
            Some(pin) if pin.set_at > rollout.created_at => return None,
            _ => {}
        }
        let old = pins.remove(&model.slot);
        let pin = Pin {
            rollout_id: Some(rollout.id.clone()),
            window: rollout.strategy.install_window,
            shadow: rollout.strategy.shadow.clone(),
            ..Pin::of(model, now)
        }
        .replacing(old);
        pins.insert(model.slot.clone(), pin);
        entry.channel.updated_at = now;
        self.pending = Pending::All;
        Some(entry.channel.clone())
    }

    /// Gives `slot` of `name` its previous pin back when its pin is `rollout`'s (that
    /// rollout was rolled back). The channel to save when it changed.
    pub fn unpin_rolled_back(
        &mut self,
        name: &ChannelName,
        slot: &SlotName,
        rollout: &RolloutId,
        now: Timestamp,
    ) -> Option<Channel> {
        let entry = self.by_name.get_mut(name)?;
        let pins = &mut entry.channel.pins;
        if pins.get(slot)?.rollout_id.as_ref() != Some(rollout) {
            return None;
        }
        if let Some(previous) = pins.remove(slot).and_then(|pin| pin.previous) {
            pins.insert(slot.clone(), *previous);
        }
        entry.channel.updated_at = now;
        self.pending = Pending::All;
        Some(entry.channel.clone())
    }

    /// The channel that `labels` follow for `slot`, if any, and its pin there.
    pub fn followed(
        &self,
        labels: &BTreeMap<String, String>,
        slot: &SlotName,
    ) -> Option<(&Channel, &Pin)> {
        self.ranked(labels)
            .find_map(|e| e.channel.pins.get(slot).map(|pin| (&e.channel, pin)))
    }

    /// Whether a rollout of `slot` to channel `name` goes to a device with `labels`: the
    /// channel selects it and no channel that outranks it pins the slot.
    pub fn would_follow(
        &self,
        name: &ChannelName,
        labels: &BTreeMap<String, String>,
        slot: &SlotName,
    ) -> bool {
        for entry in self.ranked(labels) {
            if &entry.channel.name == name {
                return true;
            }
            if entry.channel.pins.contains_key(slot) {
                return false;
            }
        }
        false
    }

    /// Channels that select `labels`, the one followed first.
    fn ranked<'a>(&'a self, labels: &BTreeMap<String, String>) -> impl Iterator<Item = &'a Entry> {
        let mut matching: Vec<&Entry> = self
            .by_name
            .values()
            .filter(|e| e.selector.matches(labels))
            .collect();
        // By priority, high first; the map's order (by name) breaks ties.
        matching.sort_by_key(|e| std::cmp::Reverse(e.channel.priority));
        matching.into_iter()
    }

    /// Marks `device` to be looked at (it reported its labels, or an operator set some).
    pub fn touch(&mut self, device: &DeviceId) {
        if self.by_name.is_empty() {
            return;
        }
        match &mut self.pending {
            Pending::All => {}
            Pending::Nothing => {
                self.pending = Pending::Devices(BTreeSet::from([device.clone()]));
            }
            Pending::Devices(set) => {
                set.insert(device.clone());
            }
        }
    }

    /// Marks every device to be looked at.
    pub fn touch_all(&mut self) {
        self.pending = Pending::All;
    }

    /// Remembers which rollouts are live; `true` when one that was is no longer (its
    /// devices may follow a channel again).
    pub fn note_live(&mut self, live: &BTreeSet<RolloutId>) -> bool {
        let ended = self.live_seen.iter().any(|id| !live.contains(id));
        if ended || self.live_seen.len() != live.len() {
            self.live_seen = live.clone();
        }
        ended
    }

    pub fn take_pending(&mut self) -> Pending {
        std::mem::take(&mut self.pending)
    }
}

/// A channel as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChannelView {
    #[serde(flatten)]
    pub channel: Channel,
    /// Devices that follow the channel, per slot it pins.
    pub followers: BTreeMap<SlotName, SlotFollowers>,
    /// Live rollouts that target it.
    pub rollouts: Vec<RolloutId>,
    /// Each follower (in `GET /api/v1/channels/{name}` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<Follower>>,
}

/// How far the followers of one slot are.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SlotFollowers {
    pub devices: usize,
    /// Told to run the pinned model.
    pub desired: usize,
    /// Serving it.
    pub active: usize,
}

/// One device that follows a channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Follower {
    pub device_id: DeviceId,
    pub online: bool,
    /// Per slot the channel pins: the release it serves there, if any, and whether that is
    /// the pinned one.
    pub slots: BTreeMap<SlotName, FollowerSlot>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FollowerSlot {
    pub serving: Option<String>,
    pub desired: bool,
    pub active: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn model(version: &str) -> RolloutModel {
        RolloutModel {
            slot: SlotName::new("detector").unwrap(),
            version: version.into(),
            release: version.parse().unwrap(),
            sha256: Sha256Digest::from_bytes([version.as_bytes()[0]; 32]),
        }
    }

    fn request(selector: &str, priority: i32) -> ChannelRequest {
        ChannelRequest {
            selector: selector.into(),
            priority,
            pins: BTreeMap::new(),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn rollout(id: &str, version: &str, created: i64) -> Rollout {
        Rollout::new(
            RolloutId::new(id).unwrap(),
            model(version),
            at(created),
            crate::rollouts::Strategy::default(),
            &[],
        )
    }

    #[test]
    fn names_are_label_like() {
        assert!(ChannelName::new("stable").is_ok());
        assert!(ChannelName::new("lab-2.x_y").is_ok());
        for bad in ["", "Stable", "-a", "a/b", "a b", &"c".repeat(64)] {
            assert!(ChannelName::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_higher_priority_pin_holds_a_group_and_ties_go_by_name() {
        let slot = SlotName::new("detector").unwrap();
        let mut channels = Channels::default();
        let stable = ChannelName::new("stable").unwrap();
        let lab = ChannelName::new("lab").unwrap();
        channels
            .put(
                stable.clone(),
                &request("ring=stable", 0),
                BTreeMap::new(),
                at(1),
            )
            .unwrap();
        let mut pinned = request("site=lab", 10);
        pinned.pins.insert(slot.clone(), "1".into());
        channels
            .put(
                lab.clone(),
                &pinned,
                BTreeMap::from([(slot.clone(), model("1"))]),
                at(2),
            )
            .unwrap();
        let plain = labels(&[("ring", "stable")]);
        let in_lab = labels(&[("ring", "stable"), ("site", "lab")]);

        // Nothing pinned in stable yet: a rollout to it reaches plain robots only.
        assert!(channels.followed(&plain, &slot).is_none());
        assert!(channels.would_follow(&stable, &plain, &slot));
        assert!(!channels.would_follow(&stable, &in_lab, &slot));
        assert_eq!(channels.followed(&in_lab, &slot).unwrap().0.name, lab);

        let done = rollout("r-1", "2", 3);
        assert!(channels.pin_completed(&stable, &done, at(4)).is_some());
        // Again: nothing to save.
        assert!(channels.pin_completed(&stable, &done, at(5)).is_none());
        assert_eq!(channels.followed(&plain, &slot).unwrap().1.version, "2");
        assert_eq!(channels.followed(&in_lab, &slot).unwrap().1.version, "1");

        // Equal priorities: the name that sorts first.
        channels
            .put(
                ChannelName::new("alpha").unwrap(),
                &ChannelRequest {
                    pins: BTreeMap::from([(slot.clone(), "3".into())]),
                    ..request("ring=stable", 0)
                },
                BTreeMap::from([(slot.clone(), model("3"))]),
                at(6),
            )
            .unwrap();
        assert_eq!(
            channels.followed(&plain, &slot).unwrap().0.name.as_str(),
            "alpha"
        );
    }

    #[test]
    fn a_rolled_back_rollout_gives_the_pin_back_and_a_put_is_idempotent() {
        let slot = SlotName::new("detector").unwrap();
        let stable = ChannelName::new("stable").unwrap();
        let mut channels = Channels::default();
        let first = rollout("r-1", "1", 2);
        let second = rollout("r-2", "2", 4);
        assert!(
            channels
                .put(
                    stable.clone(),
                    &request("ring=stable", 0),
                    BTreeMap::new(),
                    at(1)
                )
                .unwrap()
                .is_some()
        );
        assert_eq!(channels.take_pending(), Pending::All);
        assert!(
            channels
                .put(
                    stable.clone(),
                    &request("ring = stable", 0),
                    BTreeMap::new(),
                    at(2)
                )
                .unwrap()
                .is_none(),
            "the same channel again changes nothing"
        );
        assert_eq!(channels.take_pending(), Pending::Nothing);
        channels.pin_completed(&stable, &first, at(3));
        channels.pin_completed(&stable, &second, at(5));
        // Another rollout's rollback leaves the pin alone.
        assert!(
            channels
                .unpin_rolled_back(&stable, &slot, &first.id, at(6))
                .is_none()
        );
        let back = channels
            .unpin_rolled_back(&stable, &slot, &second.id, at(6))
            .unwrap();
        assert_eq!(back.pins[&slot].version, "1");
        assert_eq!(back.pins[&slot].rollout_id.as_ref(), Some(&first.id));
        // An operator's pin set after a rollout was made wins over its completion.
        let mut pinned = request("ring=stable", 0);
        pinned.pins.insert(slot.clone(), "3".into());
        channels
            .put(
                stable.clone(),
                &pinned,
                BTreeMap::from([(slot.clone(), model("3"))]),
                at(7),
            )
            .unwrap();
        let late = rollout("r-3", "4", 6);
        assert!(channels.pin_completed(&stable, &late, at(8)).is_none());
    }

    #[test]
    fn touches_gather_until_taken_and_a_bad_selector_is_refused() {
        let mut channels = Channels::default();
        let robot = DeviceId::new("robot-1").unwrap();
        channels.touch(&robot);
        assert_eq!(
            channels.take_pending(),
            Pending::Nothing,
            "no channel: no work"
        );
        channels
            .put(
                ChannelName::new("stable").unwrap(),
                &request("ring=stable", 0),
                BTreeMap::new(),
                at(1),
            )
            .unwrap();
        channels.take_pending();
        channels.touch(&robot);
        assert_eq!(
            channels.take_pending(),
            Pending::Devices(BTreeSet::from([robot]))
        );
        assert!(matches!(
            channels.put(
                ChannelName::new("bad").unwrap(),
                &request("ring in (", 0),
                BTreeMap::new(),
                at(2)
            ),
            Err(ChannelError::Selector(_))
        ));
    }
}
