//! Channels put to work: operators create, change and remove them; completed rollouts pin
//! them; and devices that follow a channel are given its models (see `crate::channels`).
//!
//! Following runs on the rollout clock, under the desired-documents lock, after the live
//! rollouts moved: a device is looked at when it reports its labels (a robot that joins,
//! or whose labels change), when an operator labels it, and every device when a channel or
//! a pin changes or a rollout stops owning devices. A device a live rollout owns for the
//! slot is left to that rollout; when the rollout stops, every device is looked at again.

use std::collections::{BTreeMap, BTreeSet};

use botfleet_protocol::{DeviceId, RolloutId, SlotName};
use jiff::Timestamp;

use super::RolloutState;
use super::create::{CreateError, RolloutService, desired_model};
use super::fanout::Outbound;
use crate::channels::{
    Channel, ChannelError, ChannelName, ChannelRequest, ChannelView, Follower, FollowerSlot,
    Pending, SlotFollowers,
};
use crate::desired::DesiredStore;

/// Why a channel operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ChannelOpError {
    #[error(transparent)]
    Invalid(#[from] ChannelError),
    #[error("no channel {0}")]
    Unknown(ChannelName),
    #[error(
        "live rollout(s) {} target channel {channel}; wait for them, or abort them, first",
        rollouts.join(", ")
    )]
    Busy {
        channel: ChannelName,
        rollouts: Vec<String>,
    },
    #[error(transparent)]
    Step(#[from] CreateError),
}

/// Live rollouts of `rollouts` that target `channel` (of `slots`, when given).
fn live_targeting(
    book: &super::Rollouts,
    channel: &ChannelName,
    slots: Option<&BTreeSet<SlotName>>,
) -> Vec<RolloutId> {
    book.live()
        .into_iter()
        .filter(|id| {
            book.rollout(id).is_some_and(|r| {
                r.channel.as_ref() == Some(channel)
                    && slots.is_none_or(|slots| slots.contains(&r.model.slot))
            })
        })
        .collect()
}

impl RolloutService {
    /// Creates or changes a channel; `true` when it was created. The devices it selects
    /// follow its pins from the next tick on.
    pub async fn put_channel(
        &self,
        name: ChannelName,
        request: ChannelRequest,
    ) -> Result<bool, ChannelOpError> {
        request.selector()?;
        let mut pins = BTreeMap::new();
        for (slot, version) in &request.pins {
            let model = self.registered(slot, version)?;
            pins.insert(
                slot.clone(),
                super::RolloutModel {
                    slot: slot.clone(),
                    version: model.stored.version.to_string(),
                    release: model.stored.release,
                    sha256: model.stored.sha256,
                },
            );
        }
        let _desired = self.desired.lock().await;
        let pinned: BTreeSet<SlotName> = request.pins.keys().cloned().collect();
        let busy = live_targeting(&self.fleet.rollouts(), &name, Some(&pinned));
        if !busy.is_empty() {
            return Err(ChannelOpError::Busy {
                channel: name,
                rollouts: busy.iter().map(ToString::to_string).collect(),
            });
        }
        let (created, changed) = {
            let mut channels = self.fleet.channels();
            let created = channels.get(&name).is_none();
            let changed = channels.put(name.clone(), &request, pins, Timestamp::now())?;
            (created, changed)
        };
        if let Some(channel) = changed {
            self.save_channels(vec![channel]).await?;
            tracing::info!(channel = %name, selector = %request.selector, priority = request.priority,
                pins = ?request.pins, "channel set");
        }
        Ok(created)
    }

    /// Removes a channel; the devices that followed it keep what they were told last.
    pub async fn delete_channel(&self, name: &ChannelName) -> Result<(), ChannelOpError> {
        let _desired = self.desired.lock().await;
        let busy = live_targeting(&self.fleet.rollouts(), name, None);
        if !busy.is_empty() {
            return Err(ChannelOpError::Busy {
                channel: name.clone(),
                rollouts: busy.iter().map(ToString::to_string).collect(),
            });
        }
        if self.fleet.channels().get(name).is_none() {
            return Err(ChannelOpError::Unknown(name.clone()));
        }
        let db = self.db.clone();
        let key = name.as_str().to_owned();
        tokio::task::spawn_blocking(move || db.delete_channel(&key))
            .await
            .map_err(|join| CreateError::DbTask(join.to_string()))?
            .map_err(CreateError::Db)?;
        self.fleet.channels().remove(name);
        tracing::info!(channel = %name, "channel removed");
        Ok(())
    }

    async fn save_channels(&self, channels: Vec<Channel>) -> Result<(), CreateError> {
        if channels.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.save_channels(&channels))
            .await
            .map_err(|join| CreateError::DbTask(join.to_string()))??;
        Ok(())
    }

    /// Pins what channel rollouts completed with (and unpins what was rolled back after),
    /// then gives the devices that follow a channel its models.
    pub(super) async fn follow_locked(
        &self,
        desired: &mut DesiredStore,
        now: Timestamp,
    ) -> Result<(), CreateError> {
        let changed = self.sync_pins(now);
        self.save_channels(changed).await?;
        let pending = {
            let mut channels = self.fleet.channels();
            if channels.is_empty() {
                // Nothing to follow (a fleet without channels pays nothing per tick).
                channels.take_pending();
                return Ok(());
            }
            channels.take_pending()
        };
        let devices: Vec<DeviceId> = match pending {
            Pending::Nothing => return Ok(()),
            Pending::Devices(set) => set.into_iter().collect(),
            Pending::All => self
                .fleet
                .devices()
                .labels()
                .map(|(id, _)| id.clone())
                .collect(),
        };
        let mut staged = Vec::new();
        {
            let channels = self.fleet.channels();
            let known = self.fleet.devices();
            let book = self.fleet.rollouts();
            let slots: BTreeSet<&SlotName> = channels.iter().flat_map(|c| c.pins.keys()).collect();
            for device in &devices {
                let Some(labels) = known.labels_of(device) else {
                    continue;
                };
                for slot in &slots {
                    let Some((channel, pin)) = channels.followed(labels, slot) else {
                        continue;
                    };
                    if !book
                        .live_owners(slot, std::slice::from_ref(device))
                        .is_empty()
                    {
                        continue;
                    }
                    let model = match self.registered(slot, &pin.version) {
                        Ok(model) => model,
                        Err(err) => {
                            tracing::error!(channel = %channel.name, %slot, error = %err,
                                "a channel pins a model the registry lacks");
                            continue;
                        }
                    };
                    let told = desired.current(device, slot);
                    if told
                        .is_some_and(|m| m.manifest.payload == model.stored.signed_manifest.payload)
                    {
                        continue;
                    }
                    let entry = desired_model(&model, None, pin.window, &pin.shadow, false);
                    let doc = desired.next(device, slot, entry);
                    if let Err(err) = crate::link::encode_desired(device, &doc) {
                        tracing::error!(%device, error = %err, "channel model not sent");
                        continue;
                    }
                    tracing::info!(%device, %slot, channel = %channel.name, version = %pin.version,
                        "device follows its channel");
                    desired.stage(device, doc);
                    staged.push(device.clone());
                }
            }
        }
        staged.dedup();
        desired.write_staged(&staged).await?;
        self.send(staged.into_iter().map(Outbound::Desired).collect())?;
        Ok(())
    }

    /// Brings pins in line with channel rollouts; the channels that changed. A rollout that
    /// stopped owning its devices since the last look has every device looked at again.
    fn sync_pins(&self, now: Timestamp) -> Vec<Channel> {
        let book = self.fleet.rollouts();
        let mut channels = self.fleet.channels();
        if channels.is_empty() {
            return Vec::new();
        }
        let live: BTreeSet<RolloutId> = book.live().into_iter().collect();
        if channels.note_live(&live) {
            channels.touch_all();
        }
        let mut changed = Vec::new();
        for rollout in book.all() {
            let Some(name) = &rollout.channel else {
                continue;
            };
            let saved = match rollout.state {
                RolloutState::Completed => channels.pin_completed(name, rollout, now),
                RolloutState::RolledBack => {
                    channels.unpin_rolled_back(name, &rollout.model.slot, &rollout.id, now)
                }
                _ => None,
            };
            if let Some(channel) = saved {
                tracing::info!(channel = %name, slot = %rollout.model.slot, rollout = %rollout.id,
                    version = channel.pins.get(&rollout.model.slot).map_or("-", |p| p.version.as_str()),
                    "channel pin moved");
                changed.push(channel);
            }
        }
        changed
    }

    /// Every channel with its followers; each follower too when `with_devices`.
    pub async fn channel_views(
        &self,
        only: Option<&ChannelName>,
        with_devices: bool,
    ) -> Vec<ChannelView> {
        let desired = self.desired.lock().await;
        let channels = self.fleet.channels();
        let devices = self.fleet.devices();
        let book = self.fleet.rollouts();
        let mut views = Vec::new();
        for channel in channels
            .iter()
            .filter(|c| only.is_none_or(|o| &c.name == o))
        {
            // The signed manifest of each pinned model, as a desired document carries it.
            let payloads: BTreeMap<&SlotName, String> = (channel.pins.iter())
                .filter_map(|(slot, pin)| {
                    let model = self.registered(slot, &pin.version).ok()?;
                    Some((slot, model.stored.signed_manifest.payload))
                })
                .collect();
            let mut followers: BTreeMap<SlotName, SlotFollowers> = BTreeMap::new();
            let mut listed: BTreeMap<DeviceId, Follower> = BTreeMap::new();
            for (id, labels) in devices.labels() {
                let Some(labels) = labels else {
                    continue;
                };
                for (slot, pin) in &channel.pins {
                    let follows = channels
                        .followed(labels, slot)
                        .is_some_and(|(c, _)| c.name == channel.name);
                    if !follows {
                        continue;
                    }
                    let active_model = devices.active(id, slot);
                    let active = active_model
                        .is_some_and(|a| a.sha256 == pin.sha256 && a.release == pin.release);
                    let told = desired
                        .current(id, slot)
                        .is_some_and(|m| payloads.get(slot) == Some(&m.manifest.payload));
                    let counts = followers.entry(slot.clone()).or_default();
                    counts.devices += 1;
                    counts.desired += usize::from(told);
                    counts.active += usize::from(active);
                    if with_devices {
                        listed
                            .entry(id.clone())
                            .or_insert_with(|| Follower {
                                device_id: id.clone(),
                                online: devices.is_online(id),
                                slots: BTreeMap::new(),
                            })
                            .slots
                            .insert(
                                slot.clone(),
                                FollowerSlot {
                                    serving: active_model.map(|a| a.version.clone()),
                                    desired: told,
                                    active,
                                },
                            );
                    }
                }
            }
            views.push(ChannelView {
                channel: channel.clone(),
                followers,
                rollouts: live_targeting(&book, &channel.name, None),
                devices: with_devices.then(|| listed.into_values().collect()),
            });
        }
        views
    }
}
