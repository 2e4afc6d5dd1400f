//! The signed capture order: the server's signed request that one device keep copies of the
//! next requests one of its slots answers ("capture on demand").
//!
//! Signed with the manifest key, as the rollback order is: whoever can write the
//! `commands` topic still cannot make a robot keep (and so upload) what it sees. The robot
//! still captures only what its own capture policy opts it into (`capture.slots.*.on_demand`).

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, SlotName};
use crate::manifest::{ManifestError, ManifestSignature, ManifestSigner, TrustedKeys, Verified};
use crate::order::{self, DeviceOrder, OrderCheck};

/// The capture order schema this build writes and reads.
pub const CAPTURE_SCHEMA: u32 = 1;
/// The most requests one order may ask for.
pub const MAX_CAPTURE_REQUESTS: u32 = 10_000;

/// What the server orders. Unknown fields are refused, so neither a manifest nor a rollback
/// order can pass for one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureOrder {
    pub schema: u32,
    /// The one device this order is for.
    pub device: DeviceId,
    pub slot: SlotName,
    /// How many of the next requests to keep (1 to [`MAX_CAPTURE_REQUESTS`]).
    pub capture_requests: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// A capture order as it travels: exact bytes plus signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedCapture {
    /// The order's JSON bytes, base64.
    pub payload: String,
    pub signatures: Vec<ManifestSignature>,
}

/// Why a capture order was refused.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("capture order signature: {0}")]
    Signature(#[source] ManifestError),
    #[error("capture order payload is not a valid capture order: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("capture order schema {0} is not supported (this build knows {CAPTURE_SCHEMA})")]
    Schema(u32),
    #[error("capture order is for device {ordered}, not this one ({me})")]
    OtherDevice { ordered: DeviceId, me: DeviceId },
    #[error("capture order expired at {expires_at} (now {now})")]
    Expired {
        expires_at: Timestamp,
        now: Timestamp,
    },
    #[error("capture order asks for {0} requests; 1 to {MAX_CAPTURE_REQUESTS} may be asked for")]
    Requests(u32),
}

impl DeviceOrder for CaptureOrder {
    const SCHEMA: u32 = CAPTURE_SCHEMA;
    fn schema(&self) -> u32 {
        self.schema
    }
    fn device(&self) -> &DeviceId {
        &self.device
    }
    fn expires_at(&self) -> Timestamp {
        self.expires_at
    }
}

impl From<OrderCheck> for CaptureError {
    fn from(check: OrderCheck) -> Self {
        match check {
            OrderCheck::Signature(e) => CaptureError::Signature(e),
            OrderCheck::Malformed(e) => CaptureError::Malformed(e),
            OrderCheck::Schema(n) => CaptureError::Schema(n),
            OrderCheck::OtherDevice { ordered, me } => CaptureError::OtherDevice { ordered, me },
            OrderCheck::Expired { expires_at, now } => CaptureError::Expired { expires_at, now },
        }
    }
}

impl SignedCapture {
    /// Checks the signatures against `trusted`, then that the order is for `me`, has not
    /// expired at `now` and asks for a sane number of requests.
    pub fn verify(
        &self,
        trusted: &TrustedKeys,
        me: &DeviceId,
        now: Timestamp,
    ) -> Result<Verified<CaptureOrder>, CaptureError> {
        let order: Verified<CaptureOrder> =
            order::verify(&self.payload, &self.signatures, trusted, me, now)?;
        if order.capture_requests == 0 || order.capture_requests > MAX_CAPTURE_REQUESTS {
            return Err(CaptureError::Requests(order.capture_requests));
        }
        Ok(order)
    }

    /// What the order claims, read without any check: for log lines and event names only.
    pub fn claims(&self) -> Option<CaptureOrder> {
        order::claims(&self.payload)
    }
}

impl ManifestSigner {
    /// Serialises `order` once and signs exactly those bytes.
    pub fn sign_capture(&self, order: &CaptureOrder) -> Result<SignedCapture, serde_json::Error> {
        let (payload, signatures) = self.sign_json(order)?;
        Ok(SignedCapture {
            payload,
            signatures,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic
mod tests {
    use super::*;
    use crate::manifest::Sha256Digest;
    use crate::rollback::{ROLLBACK_SCHEMA, RollbackOrder};

    fn order(device: &str, requests: u32) -> CaptureOrder {
        CaptureOrder {
            schema: CAPTURE_SCHEMA,
            device: DeviceId::new(device).unwrap(),
            slot: SlotName::new("digits").unwrap(),
            capture_requests: requests,
            reason: Some("night shift".into()),
            issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            expires_at: "2027-01-01T00:00:00Z".parse().unwrap(),
        }
    }

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_signed_order_verifies_and_others_are_refused() {
        let signer = ManifestSigner::from_secret([1; 32]);
        let trusted = TrustedKeys::new([signer.public_key()]);
        let me = DeviceId::new("robot-1").unwrap();
        let ok = signer.sign_capture(&order("robot-1", 5)).unwrap();
        assert_eq!(ok.verify(&trusted, &me, now()).unwrap().capture_requests, 5);
        let other = signer.sign_capture(&order("robot-2", 5)).unwrap();
        assert!(matches!(
            other.verify(&trusted, &me, now()),
            Err(CaptureError::OtherDevice { .. })
        ));
        let greedy = signer.sign_capture(&order("robot-1", 0)).unwrap();
        assert!(matches!(
            greedy.verify(&trusted, &me, now()),
            Err(CaptureError::Requests(0))
        ));
        let late = signer.sign_capture(&order("robot-1", 5)).unwrap();
        assert!(matches!(
            late.verify(&trusted, &me, "2028-01-01T00:00:00Z".parse().unwrap()),
            Err(CaptureError::Expired { .. })
        ));
        let stranger = ManifestSigner::from_secret([2; 32])
            .sign_capture(&order("robot-1", 5))
            .unwrap();
        assert!(matches!(
            stranger.verify(&trusted, &me, now()),
            Err(CaptureError::Signature(_))
        ));
    }

    #[test]
    fn a_signed_rollback_order_never_passes_for_a_capture_order() {
        let signer = ManifestSigner::from_secret([1; 32]);
        let trusted = TrustedKeys::new([signer.public_key()]);
        let rollback = signer
            .sign_rollback(&RollbackOrder {
                schema: ROLLBACK_SCHEMA,
                device: DeviceId::new("robot-1").unwrap(),
                slot: SlotName::new("digits").unwrap(),
                to_sha256: Sha256Digest::of(b"previous"),
                to_release: 3,
                reason: None,
                issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
                expires_at: "2027-01-01T00:00:00Z".parse().unwrap(),
            })
            .unwrap();
        let forged = SignedCapture {
            payload: rollback.payload,
            signatures: rollback.signatures,
        };
        let me = DeviceId::new("robot-1").unwrap();
        assert!(matches!(
            forged.verify(&trusted, &me, now()),
            Err(CaptureError::Malformed(_))
        ));
    }
}
