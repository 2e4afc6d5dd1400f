//! The clock of rollouts: every tick, each live rollout is stepped (next wave, deadlines,
//! thresholds) and changed records are saved, events included. At start, rollouts that the
//! database says were commanded but whose desired document never got written (a kill
//! between the two) are finished.

use std::sync::Arc;
use std::time::Duration;

use botfleet_protocol::{DeviceId, RolloutId};
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::Action;
use super::create::{CreateError, RolloutService};

/// How often live rollouts are looked at (and folded events saved).
pub const TICK: Duration = Duration::from_millis(200);

impl RolloutService {
    /// Re-commands devices whose command was recorded but whose document was not written.
    pub async fn recover(&self) -> Result<usize, CreateError> {
        let mut desired = self.desired.lock().await;
        let mut missing: Vec<(RolloutId, Vec<Action>)> = Vec::new();
        {
            let book = self.fleet.rollouts();
            for id in book.live() {
                let Some(view) = book.rollout(&id) else {
                    continue;
                };
                let devices: Vec<DeviceId> = view
                    .devices
                    .iter()
                    .filter(|(_, run)| run.commanded_at.is_some() && run.mark.is_none())
                    .filter(|(device, _)| {
                        desired
                            .current(device, &view.model.slot)
                            .and_then(|m| m.rollout_id.as_ref())
                            != Some(&id)
                    })
                    .map(|(device, _)| device.clone())
                    .collect();
                if !devices.is_empty() {
                    missing.push((id, devices.into_iter().map(Action::Command).collect()));
                }
            }
        }
        let count = missing.iter().map(|(_, a)| a.len()).sum();
        if count > 0 {
            tracing::warn!(
                count,
                "desired documents recorded as commanded but not written; writing them"
            );
            self.execute(&mut desired, missing).await?;
        }
        Ok(count)
    }

    /// Steps rollouts every [`TICK`] until cancelled.
    pub async fn run_driver(self: Arc<Self>, cancel: CancellationToken) -> Result<(), CreateError> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return self.save().await,
                _ = tick.tick() => match self.drive(Timestamp::now()).await {
                    Ok(()) => {}
                    // The database is the one thing a rollout cannot go on without.
                    Err(err @ (CreateError::Db(_) | CreateError::DbTask(_))) => return Err(err),
                    Err(err) => tracing::error!(error = %err, "stepping rollouts failed; retrying"),
                },
            }
        }
    }
}
