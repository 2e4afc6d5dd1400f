//! Operators' operations on a rollout: pause, resume, abort, roll back.

use botfleet_protocol::RolloutId;
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
}
