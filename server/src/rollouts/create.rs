//! Making a rollout happen and moving it on: resolve the targets, plan the waves, and
//! carry out what the state machine asks (command, restore, roll back). Everything that
//! changes desired documents runs under one lock, so generations and idempotency checks
//! never race. Order of each step: the rollout is written to the database first (so a
//! restart never commands a device twice), then the desired documents, and the request is
//! answered; MQTT carries them after, in order (`fanout`).

use std::sync::Arc;
use std::time::Instant;

use botfleet_protocol::messages::{Command, CommandKind, DesiredModel, InstallWindow, ShadowSpec};
use botfleet_protocol::{CommandId, DeviceId, IdError, RolloutId, SlotName};
use jiff::Timestamp;

use crate::channels::ChannelName;
use crate::db::{Db, DbError};
use crate::desired::{DesiredError, DesiredStore};
use crate::devices::Devices;
use crate::fleet::Fleet;
use crate::intake::{IntakeError, ModelVersion};
use crate::keys;
use crate::link::{self, PublishError, Publisher};
use crate::registry::{ModelRecord, Registry};
use crate::rollouts::fanout::{self, FanOut, Outbound, Queue};
use crate::rollouts::{
    Action, CreatedRollout, IdempotencyKey, Presence, Replay, Rollout, RolloutModel,
    RolloutRequest, TargetError, Targets,
};

/// Waves of at least this many documents are logged with what recording and publishing
/// them took.
pub(super) const LOG_WAVES_FROM: usize = 256;

/// Why a rollout was not made.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error(transparent)]
    Targets(#[from] TargetError),
    #[error(transparent)]
    Version(#[from] IntakeError),
    #[error("model {slot}/{version} is not in the registry")]
    UnknownModel { slot: SlotName, version: String },
    #[error("the rollout names no device")]
    NoDevices,
    #[error("no known device has the labels {selector}")]
    NoMatch { selector: String },
    #[error("no channel {0}")]
    UnknownChannel(ChannelName),
    #[error(
        "no known device follows channel {channel} for slot {slot} (its selector matches none, or a channel of higher priority pins the slot for them)"
    )]
    NoFollower {
        channel: ChannelName,
        slot: SlotName,
    },
    #[error(
        "{devices} of these devices (e.g. {example}) follow channel {channel} for slot {slot}; roll out to the channel (\"channel\": \"{channel}\"), or pin a group channel of higher priority"
    )]
    FollowsChannel {
        channel: ChannelName,
        slot: SlotName,
        devices: usize,
        example: DeviceId,
    },
    #[error("Idempotency-Key was already used for a different request")]
    KeyReused,
    #[error(transparent)]
    Desired(#[from] DesiredError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot make a rollout id")]
    Id(#[from] IdError),
    #[error(
        "live rollout(s) {} of this slot already own some of these devices; pause, abort or roll them back, or pass \"supersede\": true",
        owners.join(", ")
    )]
    Conflict { owners: Vec<String> },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the database task failed: {0}")]
    DbTask(String),
    #[error(
        "the rollout names {devices} devices; the embedded MQTT broker carries rollouts of at most {limit} (mqtt.embedded_max_rollout_devices): point the server and the robots at an external broker such as Mosquitto (mqtt.url) for fleets this size"
    )]
    TooManyForEmbeddedBroker { devices: usize, limit: usize },
}

/// The result of a rollout request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub response: CreatedRollout,
    /// The request repeated an earlier one (same idempotency key): nothing was done again.
    pub replayed: bool,
}

/// Makes rollouts, moves them on, and republishes desired documents.
#[derive(Debug)]
pub struct RolloutService {
    pub(super) desired: tokio::sync::Mutex<DesiredStore>,
    pub(super) fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    pub(super) publisher: Publisher,
    /// What steps decided, published by [`RolloutService::run_fanout`].
    outbound: Queue,
    pub(super) db: Arc<Db>,
    /// With the embedded broker: the most devices one rollout may command.
    max_devices: Option<usize>,
}

/// What a desired document says of `model` in its slot.
pub(super) fn desired_model(
    model: &ModelRecord,
    rollout_id: Option<RolloutId>,
    window: Option<InstallWindow>,
    shadow: &Option<ShadowSpec>,
    on_command: bool,
) -> DesiredModel {
    DesiredModel {
        rollout_id,
        manifest: model.stored.signed_manifest.clone(),
        artifact_url: model.artifact_url.clone(),
        evaluation_url: model.evaluation_url.clone(),
        window,
        shadow: shadow.clone(),
        on_command,
    }
}

fn new_rollout_id() -> Result<RolloutId, IdError> {
    RolloutId::new(format!("r-{}", hex::encode(rand::random::<[u8; 6]>())))
}

impl RolloutService {
    pub fn new(
        desired: DesiredStore,
        fleet: Arc<Fleet>,
        registry: Arc<Registry>,
        publisher: Publisher,
        db: Arc<Db>,
        max_devices: Option<usize>,
    ) -> (Self, FanOut) {
        let (outbound, fanout) = fanout::channel();
        let service = Self {
            desired: tokio::sync::Mutex::new(desired),
            fleet,
            registry,
            publisher,
            outbound,
            db,
            max_devices,
        };
        (service, fanout)
    }

    /// Queues `messages` for the fan-out task, in order.
    pub(super) fn send(&self, messages: Vec<Outbound>) -> Result<(), PublishError> {
        if messages.is_empty() {
            return Ok(());
        }
        self.outbound
            .send(messages)
            .map_err(|_| PublishError::FanOutStopped)
    }

    /// The devices a rollout of `slot` goes to.
    fn resolve(&self, targets: Targets, slot: &SlotName) -> Result<Vec<DeviceId>, CreateError> {
        let channels = self.fleet.channels();
        let devices = self.fleet.devices();
        let resolved = match targets {
            Targets::Channel(name) => {
                if channels.get(&name).is_none() {
                    return Err(CreateError::UnknownChannel(name));
                }
                let matched: Vec<DeviceId> = devices
                    .labels()
                    .filter(|(_, labels)| {
                        labels.is_some_and(|l| channels.would_follow(&name, l, slot))
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                if matched.is_empty() {
                    return Err(CreateError::NoFollower {
                        channel: name,
                        slot: slot.clone(),
                    });
                }
                return Ok(matched);
            }
            other => Self::resolve_plain(other, &devices)?,
        };
        // A device that follows a channel for the slot gets its models from the channel.
        if !channels.is_empty() {
            let mut following = resolved.iter().filter_map(|id| {
                let labels = devices.labels_of(id)?;
                channels
                    .followed(labels, slot)
                    .map(|(c, _)| (id, c.name.clone()))
            });
            if let Some((example, channel)) = following.next() {
                return Err(CreateError::FollowsChannel {
                    channel,
                    slot: slot.clone(),
                    devices: 1 + following.count(),
                    example: example.clone(),
                });
            }
        }
        Ok(resolved)
    }

    /// The devices named, or those a selector matches.
    fn resolve_plain(targets: Targets, devices: &Devices) -> Result<Vec<DeviceId>, CreateError> {
        match targets {
            Targets::Devices(devices) if devices.is_empty() => Err(CreateError::NoDevices),
            Targets::Devices(devices) => Ok(devices.into_iter().collect()),
            Targets::Channel(name) => Err(CreateError::UnknownChannel(name)),
            Targets::Selector(selector) => {
                let matched: Vec<DeviceId> = devices
                    .labels()
                    .filter(|(_, labels)| labels.is_some_and(|l| selector.matches(l)))
                    .map(|(id, _)| id.clone())
                    .collect();
                if matched.is_empty() {
                    return Err(CreateError::NoMatch {
                        selector: selector.to_string(),
                    });
                }
                Ok(matched)
            }
        }
    }

    /// Makes the rollout `request` asks for, or answers as before for a repeated key.
    pub async fn create(
        &self,
        request: RolloutRequest,
        key: Option<IdempotencyKey>,
    ) -> Result<Created, CreateError> {
        let targets = request.targets()?;
        let strategy = request.strategy()?;
        let version = ModelVersion::new(&request.version)?;
        let mut desired = self.desired.lock().await;
        if let Some(key) = &key {
            match self.fleet.rollouts().replay(key, &request) {
                Replay::Fresh => {}
                Replay::Same(response) => {
                    return Ok(Created {
                        response,
                        replayed: true,
                    });
                }
                Replay::Conflict => return Err(CreateError::KeyReused),
            }
        }
        let model = self.registry.get(&request.slot, &version).ok_or_else(|| {
            CreateError::UnknownModel {
                slot: request.slot.clone(),
                version: request.version.clone(),
            }
        })?;
        let channel = request.channel.clone();
        let devices = self.resolve(targets, &request.slot)?;
        if let Some(limit) = self.max_devices
            && devices.len() > limit
        {
            return Err(CreateError::TooManyForEmbeddedBroker {
                devices: devices.len(),
                limit,
            });
        }
        let entry = desired_model(
            &model,
            None,
            strategy.install_window,
            &strategy.shadow,
            strategy.install_on_command,
        );
        // Size-checked before anything is recorded.
        for device in &devices {
            link::encode_desired(device, &desired.next(device, &request.slot, entry.clone()))?;
        }
        // Bring live rollouts up to date first: one whose last device just turned active
        // is complete, and no longer owns the slot.
        self.drive_locked(&mut desired, Timestamp::now()).await?;
        let rollout_id = new_rollout_id()?;
        let mut rollout = Rollout::new(
            rollout_id.clone(),
            RolloutModel {
                slot: model.stored.slot.clone(),
                version: model.stored.version.to_string(),
                release: model.stored.release,
                sha256: model.stored.sha256,
            },
            Timestamp::now(),
            strategy,
            &devices,
        );
        rollout.channel = channel;
        let response = CreatedRollout {
            rollout_id: rollout_id.clone(),
            devices,
        };
        {
            let mut book = self.fleet.rollouts();
            let owners = book.live_owners(&request.slot, &response.devices);
            if !owners.is_empty() && !request.supersede {
                return Err(CreateError::Conflict {
                    owners: owners.iter().map(ToString::to_string).collect(),
                });
            }
            for owner in &owners {
                if let Some(old) = book.get_mut(owner) {
                    old.supersede();
                    tracing::info!(rollout = %owner, by = %rollout_id, "rollout superseded");
                }
            }
            book.insert(rollout);
            if let Some(key) = key {
                book.remember(key, request, &response);
            }
        }
        self.drive_locked(&mut desired, Timestamp::now()).await?;
        tracing::info!(
            rollout = %rollout_id, slot = %model.stored.slot, version = %model.stored.version,
            release = model.stored.release, devices = response.devices.len(), "rollout created"
        );
        Ok(Created {
            response,
            replayed: false,
        })
    }

    /// Moves every live rollout on as far as `now` allows, and saves what changed.
    pub async fn drive(&self, now: Timestamp) -> Result<(), CreateError> {
        let mut desired = self.desired.lock().await;
        self.drive_locked(&mut desired, now).await
    }

    pub(super) async fn drive_locked(
        &self,
        desired: &mut DesiredStore,
        now: Timestamp,
    ) -> Result<(), CreateError> {
        let presence = |id: &DeviceId| {
            if self.fleet.devices().get(id).is_some_and(|d| d.online) {
                Presence::Online
            } else {
                Presence::Offline
            }
        };
        let actions = self.fleet.rollouts().step_live(now, presence);
        self.execute(desired, actions).await?;
        self.follow_locked(desired, now).await
    }

    /// Saves the book, then writes and publishes each action's desired document.
    pub(super) async fn execute(
        &self,
        desired: &mut DesiredStore,
        actions: Vec<(RolloutId, Vec<Action>)>,
    ) -> Result<(), CreateError> {
        // Devices whose staged document is to be written and published; the documents
        // themselves stay in the store, one copy each.
        let mut docs: Vec<DeviceId> = Vec::new();
        let mut commands: Vec<(DeviceId, Command)> = Vec::new();
        {
            let mut book = self.fleet.rollouts();
            for (id, actions) in actions {
                if actions.is_empty() {
                    continue;
                }
                let Some(rollout) = book.get_mut(&id) else {
                    continue;
                };
                let slot = rollout.model.slot.clone();
                for action in actions {
                    let (device, model) = match action {
                        Action::Command(device) => {
                            let previous = desired.current(&device, &slot).cloned();
                            let model = self.model_for(rollout, &device)?;
                            if let Some(run) = rollout.devices.get_mut(&device) {
                                run.previous = previous;
                            }
                            (device, Some(model))
                        }
                        // The same model, its install now ordered; the previous one stays.
                        Action::Install(device) => {
                            let model = self.model_for(rollout, &device)?;
                            (device, Some(model))
                        }
                        Action::Rollback(device) => {
                            let previous = rollout
                                .devices
                                .get(&device)
                                .and_then(|r| r.previous.clone());
                            // The robot keeps its previous model: it swaps back, no download,
                            // on a signed order naming that model.
                            match &previous {
                                Some(to) => match keys::rollback_order(
                                    self.registry.signer(),
                                    &device,
                                    &to.manifest,
                                    format!("rollout {id} rolled back"),
                                    Timestamp::now(),
                                ) {
                                    Ok(order) => commands.push((
                                        device.clone(),
                                        Command {
                                            command_id: CommandId::new(format!("rollback-{id}"))?,
                                            kind: CommandKind::SignedRollback { order },
                                        },
                                    )),
                                    Err(err) => {
                                        tracing::error!(%device, error = %err, "no rollback order signed");
                                    }
                                },
                                None => {
                                    tracing::info!(%device, %slot, "no previous model to roll back to");
                                }
                            }
                            (device, previous)
                        }
                        Action::Restore(device) => {
                            let previous = rollout
                                .devices
                                .get(&device)
                                .and_then(|r| r.previous.clone());
                            (device, previous)
                        }
                    };
                    let doc = desired.next_with(&device, &slot, model);
                    desired.stage(&device, doc);
                    docs.push(device);
                }
            }
        }
        let started = Instant::now();
        self.save().await?;
        let saved = started.elapsed();
        // Durable first, all at once (a wave may be thousands), then queued for MQTT.
        desired.write_staged(&docs).await?;
        if docs.len() >= LOG_WAVES_FROM {
            tracing::info!(
                documents = docs.len(),
                saved_ms = saved.as_millis(),
                written_ms = (started.elapsed() - saved).as_millis(),
                "wave recorded; publishing it"
            );
        }
        // Commands first: a robot swaps back to the model it kept, and then finds the
        // restored desired document naming what it already serves.
        let messages = commands
            .into_iter()
            .map(|(device, command)| Outbound::Command(device, command))
            .chain(docs.into_iter().map(Outbound::Desired))
            .collect();
        self.send(messages)?;
        Ok(())
    }

    /// The desired model this rollout puts in `device`'s slot: on command until the
    /// install was ordered (for the rollout or the device), when its strategy says so.
    fn model_for(&self, rollout: &Rollout, device: &DeviceId) -> Result<DesiredModel, CreateError> {
        let model = self.registered(&rollout.model.slot, &rollout.model.version)?;
        let ordered = rollout.install_ordered
            || rollout
                .devices
                .get(device)
                .is_some_and(|r| r.install_ordered);
        Ok(desired_model(
            &model,
            Some(rollout.id.clone()),
            rollout.strategy.install_window,
            &rollout.strategy.shadow,
            rollout.strategy.install_on_command && !ordered,
        ))
    }

    /// A registered model version.
    pub(super) fn registered(
        &self,
        slot: &SlotName,
        version: &str,
    ) -> Result<ModelRecord, CreateError> {
        let parsed = ModelVersion::new(version)?;
        self.registry
            .get(slot, &parsed)
            .ok_or_else(|| CreateError::UnknownModel {
                slot: slot.clone(),
                version: version.to_owned(),
            })
    }

    /// Writes every changed rollout and key to the database.
    pub async fn save(&self) -> Result<(), CreateError> {
        let (rollouts, keys) = self.fleet.rollouts().take_dirty()?;
        self.fleet.changes.rollouts(rollouts.iter().map(|r| &r.id));
        if rollouts.is_empty() && keys.is_empty() {
            return Ok(());
        }
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.save(&rollouts, &keys))
            .await
            .map_err(|join| CreateError::DbTask(join.to_string()))??;
        Ok(())
    }

    /// Queues `device`'s desired document again when the device came back having
    /// processed an older generation (or none): its retained copy may be gone (a broker
    /// that lost it while this server stayed connected, a cleared retained message).
    /// `true` when it was queued.
    pub async fn republish_if_behind(
        &self,
        device: &DeviceId,
        processed: Option<u64>,
    ) -> Result<bool, PublishError> {
        let desired = self.desired.lock().await;
        let Some(doc) = desired.get(device) else {
            return Ok(false);
        };
        if processed.is_some_and(|generation| generation >= doc.generation) {
            return Ok(false);
        }
        self.send(vec![Outbound::Desired(device.clone())])?;
        Ok(true)
    }

    /// Queues every device's desired document again (after a reconnect: a broker without
    /// persistence lost them). Devices ignore a generation they have already processed.
    pub async fn republish_all(&self) -> Result<usize, PublishError> {
        let desired = self.desired.lock().await;
        let devices: Vec<Outbound> = desired
            .iter()
            .map(|(device, _)| Outbound::Desired(device.clone()))
            .collect();
        let count = devices.len();
        self.send(devices)?;
        Ok(count)
    }
}
