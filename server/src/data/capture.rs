//! Capture on demand: a signed order that one robot keep copies of the next requests one of
//! its slots answers, sent on its commands topic (the robot's own capture policy must allow
//! it: `capture.slots.<slot>.on_demand`).

use botfleet_protocol::capture::{CAPTURE_SCHEMA, CaptureOrder, MAX_CAPTURE_REQUESTS};
use botfleet_protocol::messages::{Command, CommandKind};
use botfleet_protocol::{CommandId, DeviceId, SlotName};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use super::DataService;
use crate::link::PublishError;

/// How long an order stays valid: "the next requests" means now, not whenever a robot
/// that was away for days comes back.
pub const CAPTURE_ORDER_TTL: SignedDuration = SignedDuration::from_secs(3600);
const MAX_REASON_CHARS: usize = 200;

/// `POST /api/v1/devices/{id}/capture`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureRequest {
    pub slot: SlotName,
    /// How many of the next requests to keep (1 to 10,000).
    pub requests: u32,
    /// Why, for the robot's log.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The order sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Captured {
    pub command_id: CommandId,
    pub device: DeviceId,
    pub slot: SlotName,
    pub requests: u32,
    pub expires_at: Timestamp,
}

/// Why no order was sent.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("requests must be 1 to {MAX_CAPTURE_REQUESTS}, not {0}")]
    Requests(u32),
    #[error("the reason must be at most {MAX_REASON_CHARS} characters without control characters")]
    Reason,
    #[error("no device {0} is known to the server")]
    UnknownDevice(DeviceId),
    #[error("cannot sign the capture order")]
    Sign(#[source] serde_json::Error),
    #[error("no command id")]
    Id(#[source] botfleet_protocol::IdError),
    #[error("capture order expiry out of range")]
    Time(#[source] jiff::Error),
    #[error("the capture order was not sent")]
    Publish(#[source] PublishError),
}

impl DataService {
    /// Signs and sends an order to `device`.
    pub async fn capture(
        &self,
        device: DeviceId,
        request: CaptureRequest,
    ) -> Result<Captured, CaptureError> {
        if request.requests == 0 || request.requests > MAX_CAPTURE_REQUESTS {
            return Err(CaptureError::Requests(request.requests));
        }
        let reason = request.reason.filter(|r| !r.trim().is_empty());
        if reason.as_ref().is_some_and(|r| {
            r.chars().count() > MAX_REASON_CHARS || r.chars().any(char::is_control)
        }) {
            return Err(CaptureError::Reason);
        }
        if self.fleet.devices().get(&device).is_none() {
            return Err(CaptureError::UnknownDevice(device));
        }
        let now = Timestamp::now();
        let order = CaptureOrder {
            schema: CAPTURE_SCHEMA,
            device: device.clone(),
            slot: request.slot.clone(),
            capture_requests: request.requests,
            reason,
            issued_at: now,
            expires_at: now
                .checked_add(CAPTURE_ORDER_TTL)
                .map_err(CaptureError::Time)?,
        };
        let signed = self
            .signer
            .sign_capture(&order)
            .map_err(CaptureError::Sign)?;
        let command_id = CommandId::new(format!(
            "capture-{}",
            hex::encode(rand::random::<[u8; 6]>())
        ))
        .map_err(CaptureError::Id)?;
        let command = Command {
            command_id: command_id.clone(),
            kind: CommandKind::SignedCapture { order: signed },
        };
        self.publisher
            .publish_command(&device, &command)
            .await
            .map_err(CaptureError::Publish)?;
        tracing::info!(%device, slot = %order.slot, requests = order.capture_requests, command = %command_id, "capture order sent");
        Ok(Captured {
            command_id,
            device,
            slot: order.slot,
            requests: order.capture_requests,
            expires_at: order.expires_at,
        })
    }
}
