//! Operators' operations on a rollout: pause, resume, abort, roll back.

use botfleet_protocol::{DeviceId, RolloutId};
use jiff::Timestamp;

use super::RolloutState;
use super::create::{CreateError, RolloutService};

/// Why an operation on a rollout was refused.
#[derive(Debug, thiserror::Error)]
pub enum OperateError {
    #[error("no rollout {0}")]
    Unknown(RolloutId),
    #[error("rollout {id} is {state:?}; it cannot be {verb}")]
    WrongState {
        id: RolloutId,
        state: RolloutState,
        verb: &'static str,
    },
    #[error("rollout {id} installs as soon as each gate passes; there is no install to order")]
    NotOnCommand { id: RolloutId },
    #[error("rollout {id} does not target device {device}")]
    NotTargeted { id: RolloutId, device: DeviceId },
    #[error(transparent)]
    Step(#[from] CreateError),
}

/// An operator's operation on a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Pause,
    Resume,
    Abort,
    Rollback,
}

impl Operation {
    fn verb(self) -> &'static str {
        match self {
            Operation::Pause => "paused",
            Operation::Resume => "resumed",
            Operation::Abort => "aborted",
            Operation::Rollback => "rolled back",
        }
    }
}

impl RolloutService {
    /// Pauses, resumes, aborts or rolls back a rollout.
    pub async fn operate(&self, id: &RolloutId, op: Operation) -> Result<(), OperateError> {
        let mut desired = self.desired.lock().await;
        let actions = {
            let mut book = self.fleet.rollouts();
            let rollout = book
                .get_mut(id)
                .ok_or_else(|| OperateError::Unknown(id.clone()))?;
            let state = rollout.state;
            let (done, actions) = match op {
                Operation::Pause => (rollout.pause(), Vec::new()),
                Operation::Resume => (rollout.resume(), Vec::new()),
                Operation::Abort => {
                    let live = state.is_live();
                    (live, rollout.abort())
                }
                Operation::Rollback => {
                    let ok = state.is_live() || state == RolloutState::Completed;
                    (ok, rollout.roll_back(Timestamp::now()))
                }
            };
            if !done {
                return Err(OperateError::WrongState {
                    id: id.clone(),
                    state,
                    verb: op.verb(),
                });
            }
            vec![(id.clone(), actions)]
        };
        tracing::info!(rollout = %id, operation = op.verb(), "rollout operation");
        self.execute(&mut desired, actions).await?;
        self.drive_locked(&mut desired, Timestamp::now()).await?;
        Ok(())
    }

    /// Orders the install of a rollout whose strategy installs on command, on `devices` or
    /// every device: those waiting get their desired document again, without the flag, and
    /// swap; those commanded later swap as soon as their gate passes.
    pub async fn order_install(
        &self,
        id: &RolloutId,
        devices: Option<Vec<DeviceId>>,
    ) -> Result<usize, OperateError> {
        let mut desired = self.desired.lock().await;
        let actions = {
            let mut book = self.fleet.rollouts();
            let rollout = book
                .get_mut(id)
                .ok_or_else(|| OperateError::Unknown(id.clone()))?;
            if !rollout.state.is_live() {
                return Err(OperateError::WrongState {
                    id: id.clone(),
                    state: rollout.state,
                    verb: "installed",
                });
            }
            if !rollout.strategy.install_on_command {
                return Err(OperateError::NotOnCommand { id: id.clone() });
            }
            if let Some(device) =
                (devices.iter().flatten()).find(|d| !rollout.devices.contains_key(*d))
            {
                return Err(OperateError::NotTargeted {
                    id: id.clone(),
                    device: device.clone(),
                });
            }
            rollout.order_install(devices.as_deref())
        };
        let count = actions.len();
        tracing::info!(rollout = %id, devices = count, "install ordered");
        self.execute(&mut desired, vec![(id.clone(), actions)])
            .await?;
        self.drive_locked(&mut desired, Timestamp::now()).await?;
        Ok(count)
    }
}
