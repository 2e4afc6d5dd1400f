//! Getting back to the last good model: the post-swap health window, rollback (automatic or
//! commanded) and store garbage collection.

use std::sync::Arc;
use std::time::Duration;

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{RejectReason, Stage};
use botfleet_protocol::{CommandId, ManifestError, RollbackError, SignedRollback, SlotName};
use jiff::Timestamp;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Reconciler, plan, restore_one, warm_up};
use crate::slots::ServingModel;

/// Asks the reconciler to act outside a desired-state change.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Put the slot's previous model back.
    Rollback {
        slot: SlotName,
        reason: String,
        /// Only if this artifact still serves (a health verdict about a model that has
        /// since been replaced is moot).
        only_if: Option<Sha256Digest>,
    },
    /// The server's signed rollback order: verified here, then carried out.
    Ordered {
        command_id: CommandId,
        order: SignedRollback,
    },
    /// A rollback command without a signed order: refused with an event.
    Unsigned {
        command_id: CommandId,
        slot: SlotName,
    },
    /// A shadowed candidate's verdict.
    Shadowed {
        slot: SlotName,
        sha256: Sha256Digest,
        report: botfleet_protocol::messages::ShadowReport,
    },
}

/// Requests below this count say too little about a model's health.
const MIN_REQUESTS: u64 = 20;
/// How many times the health window looks at the model.
const CHECKS: u32 = 6;

impl Reconciler {
    /// Watches `model` for the health window; asks for a rollback if it misbehaves.
    pub(super) fn watch_health(&mut self, slot: SlotName, model: Arc<ServingModel>) {
        let window = self.health_window;
        if window.is_zero() {
            return;
        }
        let requests = self.requests_tx.clone();
        self.watchers.spawn(watch(slot, model, window, requests));
    }

    /// Removes artifacts no slot needs; `downloading` and parked models are spared.
    pub(super) fn collect_garbage(&self, downloading: Option<&Sha256Digest>) {
        let mut keep = self.state.referenced();
        keep.extend(self.parked.values().map(|p| p.manifest.artifact.sha256));
        let removed = self.store.collect_garbage(&keep, downloading);
        if removed > 0 {
            info!(removed, "old model files removed");
        }
    }

    /// Handles one request.
    pub(super) async fn handle(&mut self, request: Request) {
        match request {
            Request::Rollback {
                slot,
                reason,
                only_if,
            } => {
                if let Err(message) = self.rollback(&slot, &reason, only_if).await {
                    warn!(slot = %slot, %message, "rollback not done");
                }
            }
            Request::Ordered { command_id, order } => {
                self.ordered_rollback(&command_id, &order).await;
            }
            Request::Unsigned { command_id, slot } => {
                self.refuse_rollback(
                    &slot,
                    &command_id,
                    RejectReason::Untrusted,
                    "the command carries no signed rollback order",
                );
            }
            Request::Shadowed {
                slot,
                sha256,
                report,
            } => self.shadow_done(&slot, sha256, report),
        }
    }

    /// Carries out a signed rollback order once it verified for this device, now.
    async fn ordered_rollback(&mut self, command_id: &CommandId, signed: &SignedRollback) {
        let claimed_slot = signed.claims().map(|o| o.slot);
        let order = match signed.verify(&self.trusted, &self.device, Timestamp::now()) {
            Ok(order) => order.into_inner(),
            Err(err) => {
                let reason = match &err {
                    RollbackError::Signature(ManifestError::Untrusted { .. }) => {
                        RejectReason::Untrusted
                    }
                    RollbackError::Expired { .. } => RejectReason::Expired,
                    RollbackError::OtherDevice { .. } => RejectReason::Incompatible,
                    RollbackError::Signature(_)
                    | RollbackError::Malformed(_)
                    | RollbackError::Schema(_) => RejectReason::BadManifest,
                };
                match claimed_slot {
                    Some(slot) => {
                        self.refuse_rollback(&slot, command_id, reason, &err.to_string());
                    }
                    None => warn!(%command_id, error = %err, "unreadable rollback order ignored"),
                }
                return;
            }
        };
        let slot = order.slot.clone();
        let Some(current) = self.state.slots.get(&slot) else {
            self.refuse_rollback(
                &slot,
                command_id,
                RejectReason::Incompatible,
                "the slot serves no model",
            );
            return;
        };
        if current.sha256 == order.to_sha256 {
            info!(slot = %slot, %command_id, "rollback order already carried out");
            return;
        }
        let kept = current.previous.as_ref().map(|p| p.sha256);
        if kept != Some(order.to_sha256) {
            let message = format!(
                "the order goes back to {} but the slot keeps {}",
                order.to_sha256.short(),
                kept.map_or_else(|| "no previous model".to_owned(), |k| k.short())
            );
            self.refuse_rollback(&slot, command_id, RejectReason::Incompatible, &message);
            return;
        }
        let reason = order
            .reason
            .clone()
            .unwrap_or_else(|| format!("rollback order {command_id}"));
        if let Err(message) = self.rollback(&slot, &reason, None).await {
            warn!(slot = %slot, %message, "rollback not done");
            let reason = RejectReason::NotLoadable;
            self.refuse_rollback(&slot, command_id, reason, &message);
        }
    }

    /// Reports a refused rollback command. The event names no rollout: the rollout the
    /// slot's model came from is not refused, only this command.
    fn refuse_rollback(
        &self,
        slot: &SlotName,
        command_id: &CommandId,
        reason: RejectReason,
        why: &str,
    ) {
        warn!(slot = %slot, %command_id, why, "rollback command refused");
        let claims = self.state.slots.get(slot).map_or_else(
            || (Sha256Digest::of(b""), None),
            |current| (current.sha256, None),
        );
        self.emit(
            slot,
            None,
            claims,
            Stage::Rejected {
                reason,
                message: format!("rollback command {command_id} refused: {why}"),
            },
        );
    }

    async fn rollback(
        &mut self,
        slot: &SlotName,
        reason: &str,
        only_if: Option<Sha256Digest>,
    ) -> Result<(), String> {
        let current = self
            .state
            .slots
            .get(slot)
            .cloned()
            .ok_or_else(|| format!("slot {slot} has no model"))?;
        if only_if.is_some_and(|sha| sha != current.sha256) {
            return Ok(()); // already replaced
        }
        let previous = current
            .previous
            .clone()
            .ok_or_else(|| format!("slot {slot} keeps no previous model"))?;
        let restored = restore_one(
            &self.store,
            &self.trusted,
            &self.engines,
            &self.engine_key,
            &previous,
        )
        .await?;
        let warm_model = restored.model.clone();
        let seed = restored.manifest.gate.input_seed();
        tokio::task::spawn_blocking(move || warm_up(&warm_model, seed))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;

        let mut next = self.state.clone();
        next.slots.insert(slot.clone(), *previous.clone());
        next.blocked
            .insert(slot.clone(), current.manifest.payload_digest());
        self.store.save_state(&next).map_err(|e| e.to_string())?;
        self.state = next;
        self.slots.swap(slot, Arc::new(restored));
        warn!(slot = %slot, to = %previous.sha256.short(), reason, "rolled back");
        let release = current
            .manifest
            .verify(&self.trusted, botfleet_protocol::ExpiryCheck::Skip)
            .ok()
            .map(|m| m.release);
        self.emit(
            slot,
            current.rollout_id.as_ref(),
            (current.sha256, release),
            Stage::RolledBack {
                to: previous.sha256,
                reason: reason.to_owned(),
            },
        );
        self.processed.send_modify(|_| {});
        self.collect_garbage(None);
        Ok(())
    }
}

async fn watch(
    slot: SlotName,
    model: Arc<ServingModel>,
    window: Duration,
    requests: mpsc::Sender<Request>,
) {
    let step = window / CHECKS;
    for check in 1..=CHECKS {
        tokio::time::sleep(step).await;
        let health = model.health();
        let last = check == CHECKS;
        if health.requests < MIN_REQUESTS && !last {
            continue;
        }
        if let Some(reason) = plan::unhealthy(&model.manifest.gate, &health, MIN_REQUESTS) {
            let _ = requests
                .send(Request::Rollback {
                    slot,
                    reason: format!("health window: {reason}"),
                    only_if: Some(model.sha256()),
                })
                .await;
            return;
        }
    }
}
