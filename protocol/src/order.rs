//! What every signed order for one device checks, whatever it orders (a rollback, a
//! capture): its signatures, that it parses as that order, its schema, its device and its
//! expiry. Each order's error type takes these from [`OrderCheck`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use serde::de::DeserializeOwned;

use crate::ids::DeviceId;
use crate::manifest::{ManifestError, ManifestSignature, TrustedKeys, Verified, verify_signatures};

/// A signed order's payload, as [`verify`] reads it.
pub(crate) trait DeviceOrder: DeserializeOwned {
    /// The schema this build writes and reads.
    const SCHEMA: u32;
    fn schema(&self) -> u32;
    fn device(&self) -> &DeviceId;
    fn expires_at(&self) -> Timestamp;
}

/// Why a signed order was refused, before anything the order itself says is looked at.
pub(crate) enum OrderCheck {
    Signature(ManifestError),
    Malformed(serde_json::Error),
    Schema(u32),
    OtherDevice {
        ordered: DeviceId,
        me: DeviceId,
    },
    Expired {
        expires_at: Timestamp,
        now: Timestamp,
    },
}

/// Checks the signatures against `trusted`, then that the payload is a `T` of this build's
/// schema, for `me`, not expired at `now`.
pub(crate) fn verify<T: DeviceOrder>(
    payload: &str,
    signatures: &[ManifestSignature],
    trusted: &TrustedKeys,
    me: &DeviceId,
    now: Timestamp,
) -> Result<Verified<T>, OrderCheck> {
    let (bytes, signed_by) =
        verify_signatures(payload, signatures, trusted).map_err(OrderCheck::Signature)?;
    let order: T = serde_json::from_slice(&bytes).map_err(OrderCheck::Malformed)?;
    if order.schema() != T::SCHEMA {
        return Err(OrderCheck::Schema(order.schema()));
    }
    if order.device() != me {
        return Err(OrderCheck::OtherDevice {
            ordered: order.device().clone(),
            me: me.clone(),
        });
    }
    if order.expires_at() <= now {
        return Err(OrderCheck::Expired {
            expires_at: order.expires_at(),
            now,
        });
    }
    Ok(Verified::checked(order, signed_by))
}

/// What a payload claims, read without any check: for log lines and event names only.
pub(crate) fn claims<T: DeserializeOwned>(payload: &str) -> Option<T> {
    let bytes = B64.decode(payload).ok()?;
    serde_json::from_slice(&bytes).ok()
}
