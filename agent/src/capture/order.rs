//! The signed capture order on the robot: verified with the trusted keys (as a rollback
//! order is), then put into effect only where the slot's own policy allows capture on
//! demand; a refusal is reported as a rejected command.

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::messages::{Event, RejectReason, Stage};
use botfleet_protocol::{
    CaptureError, CaptureOrder, CommandId, DeviceId, ManifestError, SignedCapture, SlotName,
    TrustedKeys,
};
use jiff::Timestamp;
use tracing::info;

use super::Capture;

/// Why a signed capture order was refused, for the refusal event.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderRefusal {
    /// The slot the order names, as far as it can be read.
    pub slot: Option<SlotName>,
    pub reason: RejectReason,
    pub message: String,
}

impl OrderRefusal {
    /// The refusal as a rejected command's event (no rollout named, as a refused rollback
    /// order's names none), about the slot's serving model (`serving`); `None` when the
    /// order names no readable slot.
    pub fn event(
        &self,
        device: &DeviceId,
        command_id: &CommandId,
        serving: impl FnOnce(&SlotName) -> Option<Sha256Digest>,
    ) -> Option<Event> {
        let slot = self.slot.clone()?;
        let sha256 = serving(&slot).unwrap_or_else(|| Sha256Digest::of(b""));
        Some(Event {
            id: Some(crate::outbox::event_id()),
            device: device.clone(),
            rollout_id: None,
            slot,
            sha256,
            release: None,
            at: Timestamp::now(),
            stage: Stage::Rejected {
                reason: self.reason,
                message: format!("capture command {command_id} refused: {}", self.message),
            },
        })
    }
}

/// Verifies a signed capture order for `me` at `now` and puts it into effect, or says why
/// not: a bad signature, another device, an expired order, or a slot whose policy does not
/// allow capture on demand (capture off entirely included).
pub fn accept_order(
    capture: Option<&Capture>,
    signed: &SignedCapture,
    trusted: &TrustedKeys,
    me: &DeviceId,
    now: Timestamp,
) -> Result<CaptureOrder, OrderRefusal> {
    let claimed = signed.claims().map(|o| o.slot);
    let order = signed.verify(trusted, me, now).map_err(|err| {
        let reason = match &err {
            CaptureError::Signature(ManifestError::Untrusted { .. }) => RejectReason::Untrusted,
            CaptureError::Expired { .. } => RejectReason::Expired,
            CaptureError::OtherDevice { .. } => RejectReason::Incompatible,
            CaptureError::Signature(_)
            | CaptureError::Malformed(_)
            | CaptureError::Schema(_)
            | CaptureError::Requests(_) => RejectReason::BadManifest,
        };
        OrderRefusal {
            slot: claimed.clone(),
            reason,
            message: err.to_string(),
        }
    })?;
    let order = order.into_inner();
    let refuse = |message: String| OrderRefusal {
        slot: Some(order.slot.clone()),
        reason: RejectReason::Incompatible,
        message,
    };
    let Some(capture) = capture else {
        return Err(refuse(
            "capture is off on this robot (no [capture.slots])".into(),
        ));
    };
    capture.stand(&order).map_err(refuse)?;
    info!(slot = %order.slot, requests = order.capture_requests, reason = ?order.reason, "capture order accepted");
    Ok(order)
}
