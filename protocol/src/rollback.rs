//! The signed rollback order: the server's signed permission for one device to put one
//! slot's previous model back.
//!
//! Signed with the manifest key (same key ids, same [`TrustedKeys`] and threshold), so
//! whoever can write the `commands` topic still cannot make a robot roll back: the order
//! names the device, the slot and the exact model to go back to, and it expires.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::ids::{DeviceId, SlotName};
use crate::manifest::{
    ManifestError, ManifestSignature, ManifestSigner, Sha256Digest, TrustedKeys, Verified,
};
use crate::order::{self, DeviceOrder, OrderCheck};

/// The rollback order schema this build writes and reads.
pub const ROLLBACK_SCHEMA: u32 = 1;

/// What the server orders. Its fields differ from a manifest's and unknown fields are
/// refused, so a signed manifest can never pass for a rollback order or the reverse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackOrder {
    pub schema: u32,
    /// The one device this order is for.
    pub device: DeviceId,
    pub slot: SlotName,
    /// The model to go back to: the one the device kept as the slot's previous model.
    pub to_sha256: Sha256Digest,
    pub to_release: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

/// A rollback order as it travels: exact bytes plus signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedRollback {
    /// The order's JSON bytes, base64.
    pub payload: String,
    pub signatures: Vec<ManifestSignature>,
}

/// Why a rollback order was refused.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    #[error("rollback order signature: {0}")]
    Signature(#[source] ManifestError),
    #[error("rollback order payload is not a valid rollback order: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("rollback order schema {0} is not supported (this build knows {ROLLBACK_SCHEMA})")]
    Schema(u32),
    #[error("rollback order is for device {ordered}, not this one ({me})")]
    OtherDevice { ordered: DeviceId, me: DeviceId },
    #[error("rollback order expired at {expires_at} (now {now})")]
    Expired {
        expires_at: Timestamp,
        now: Timestamp,
    },
}

impl DeviceOrder for RollbackOrder {
    const SCHEMA: u32 = ROLLBACK_SCHEMA;
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

impl From<OrderCheck> for RollbackError {
    fn from(check: OrderCheck) -> Self {
        match check {
            OrderCheck::Signature(e) => RollbackError::Signature(e),
            OrderCheck::Malformed(e) => RollbackError::Malformed(e),
            OrderCheck::Schema(n) => RollbackError::Schema(n),
            OrderCheck::OtherDevice { ordered, me } => RollbackError::OtherDevice { ordered, me },
            OrderCheck::Expired { expires_at, now } => RollbackError::Expired { expires_at, now },
        }
    }
}

impl SignedRollback {
    /// Checks the signatures against `trusted`, then that the order is for `me` and has not
    /// expired at `now`.
    pub fn verify(
        &self,
        trusted: &TrustedKeys,
        me: &DeviceId,
        now: Timestamp,
    ) -> Result<Verified<RollbackOrder>, RollbackError> {
        Ok(order::verify(
            &self.payload,
            &self.signatures,
            trusted,
            me,
            now,
        )?)
    }

    /// What the order claims, read without any check: for log lines and event names only.
    pub fn claims(&self) -> Option<RollbackOrder> {
        order::claims(&self.payload)
    }
}

impl ManifestSigner {
    /// Serialises `order` once and signs exactly those bytes.
    pub fn sign_rollback(
        &self,
        order: &RollbackOrder,
    ) -> Result<SignedRollback, serde_json::Error> {
        let (payload, signatures) = self.sign_json(order)?;
        Ok(SignedRollback {
            payload,
            signatures,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic
mod tests {
    use super::*;

    fn order(device: &str, expires_at: &str) -> RollbackOrder {
        RollbackOrder {
            schema: ROLLBACK_SCHEMA,
            device: DeviceId::new(device).unwrap(),
            slot: SlotName::new("detector").unwrap(),
            to_sha256: Sha256Digest::of(b"previous"),
            to_release: 3,
            reason: Some("operator".into()),
            issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
            expires_at: expires_at.parse().unwrap(),
        }
    }

    fn now() -> Timestamp {
        "2026-06-01T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_signed_order_for_this_device_verifies() {
        let signer = ManifestSigner::from_secret([1; 32]);
        let trusted = TrustedKeys::new([signer.public_key()]);
        let signed = signer
            .sign_rollback(&order("robot-1", "2027-01-01T00:00:00Z"))
            .unwrap();
        let me = DeviceId::new("robot-1").unwrap();
        let verified = signed.verify(&trusted, &me, now()).unwrap();
        assert_eq!(verified.to_release, 3);
        assert_eq!(verified.signed_by(), &[signer.key_id().clone()]);
    }

    #[test]
    fn an_order_for_another_device_an_expired_one_and_a_stranger_s_are_refused() {
        let signer = ManifestSigner::from_secret([1; 32]);
        let trusted = TrustedKeys::new([signer.public_key()]);
        let me = DeviceId::new("robot-1").unwrap();
        let other = signer
            .sign_rollback(&order("robot-2", "2027-01-01T00:00:00Z"))
            .unwrap();
        assert!(matches!(
            other.verify(&trusted, &me, now()),
            Err(RollbackError::OtherDevice { .. })
        ));
        let expired = signer
            .sign_rollback(&order("robot-1", "2026-02-01T00:00:00Z"))
            .unwrap();
        assert!(matches!(
            expired.verify(&trusted, &me, now()),
            Err(RollbackError::Expired { .. })
        ));
        let stranger = ManifestSigner::from_secret([2; 32])
            .sign_rollback(&order("robot-1", "2027-01-01T00:00:00Z"))
            .unwrap();
        assert!(matches!(
            stranger.verify(&trusted, &me, now()),
            Err(RollbackError::Signature(ManifestError::Untrusted { .. }))
        ));
    }

    #[test]
    fn a_signed_manifest_never_passes_for_a_rollback_order() {
        let signer = ManifestSigner::from_secret([1; 32]);
        let trusted = TrustedKeys::new([signer.public_key()]);
        let (payload, signatures) = signer.sign_json(&serde_json::json!({"schema": 1})).unwrap();
        let forged = SignedRollback {
            payload,
            signatures,
        };
        let me = DeviceId::new("robot-1").unwrap();
        assert!(matches!(
            forged.verify(&trusted, &me, now()),
            Err(RollbackError::Malformed(_))
        ));
    }
}
