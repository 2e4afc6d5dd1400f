//! Making a rollout happen: resolve the targets, write each device's next desired document
//! to disk, publish it retained, record the rollout. One rollout is made at a time, so
//! generations and idempotency checks never race.

use std::sync::Arc;

use botfleet_protocol::messages::{Desired, DesiredModel};
use botfleet_protocol::{DeviceId, IdError, RolloutId, SlotName};
use jiff::Timestamp;

use crate::desired::{DesiredError, DesiredStore};
use crate::fleet::Fleet;
use crate::intake::{IntakeError, ModelVersion};
use crate::link::{self, PublishError, Publisher};
use crate::registry::Registry;
use crate::rollouts::{
    CreatedRollout, IdempotencyKey, Replay, Rollout, RolloutModel, RolloutRequest, TargetError,
    Targets,
};

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
    #[error("Idempotency-Key was already used for a different request")]
    KeyReused,
    #[error(transparent)]
    Desired(#[from] DesiredError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("cannot make a rollout id")]
    Id(#[from] IdError),
}

/// The result of a rollout request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub response: CreatedRollout,
    /// The request repeated an earlier one (same idempotency key): nothing was done again.
    pub replayed: bool,
}

/// Makes rollouts and republishes desired documents.
#[derive(Debug)]
pub struct RolloutService {
    desired: tokio::sync::Mutex<DesiredStore>,
    fleet: Arc<Fleet>,
    registry: Arc<Registry>,
    publisher: Publisher,
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
    ) -> Self {
        Self {
            desired: tokio::sync::Mutex::new(desired),
            fleet,
            registry,
            publisher,
        }
    }

    /// The devices a rollout goes to.
    fn resolve(&self, targets: Targets) -> Result<Vec<DeviceId>, CreateError> {
        match targets {
            Targets::Devices(devices) if devices.is_empty() => Err(CreateError::NoDevices),
            Targets::Devices(devices) => Ok(devices.into_iter().collect()),
            Targets::Selector(selector) => {
                let matched: Vec<DeviceId> = self
                    .fleet
                    .devices()
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
        let devices = self.resolve(targets)?;
        let rollout_id = new_rollout_id()?;
        let entry = DesiredModel {
            rollout_id: Some(rollout_id.clone()),
            manifest: model.stored.signed_manifest.clone(),
            artifact_url: model.artifact_url.clone(),
        };
        // Every document is planned and size-checked before anything is written.
        let planned: Vec<(DeviceId, Desired)> = devices
            .iter()
            .map(|d| (d.clone(), desired.next(d, &request.slot, entry.clone())))
            .collect();
        for (device, doc) in &planned {
            link::encode_desired(device, doc)?;
        }
        // Recorded before publishing: a fast device's first event must find its rollout.
        let rollout = Rollout::new(
            rollout_id.clone(),
            RolloutModel {
                slot: model.stored.slot.clone(),
                version: model.stored.version.to_string(),
                release: model.stored.release,
                sha256: model.stored.sha256,
            },
            Timestamp::now(),
            devices.iter().cloned(),
        );
        let response = CreatedRollout {
            rollout_id: rollout_id.clone(),
            devices,
        };
        self.fleet.rollouts().insert(rollout);
        for (device, doc) in planned {
            desired.commit(&device, doc.clone()).await?;
            self.publisher.publish_desired(&device, &doc).await?;
            tracing::info!(rollout = %rollout_id, %device, generation = doc.generation, "desired state published");
        }
        if let Some(key) = key {
            self.fleet.rollouts().remember(key, request, &response);
        }
        tracing::info!(
            rollout = %rollout_id, slot = %model.stored.slot, version = %model.stored.version,
            release = model.stored.release, devices = response.devices.len(), "rollout created"
        );
        Ok(Created {
            response,
            replayed: false,
        })
    }

    /// Publishes every device's desired document again (after a reconnect: a broker without
    /// persistence lost them). Devices ignore a generation they have already processed.
    pub async fn republish_all(&self) -> Result<usize, PublishError> {
        let desired = self.desired.lock().await;
        let mut count = 0;
        for (device, doc) in desired.iter() {
            self.publisher.publish_desired(device, doc).await?;
            count += 1;
        }
        Ok(count)
    }
}
