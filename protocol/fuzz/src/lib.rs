//! The bodies of botfleet's fuzz targets: every decoder of data that crosses the network.
//!
//! Each function takes arbitrary bytes and panics only when a decoder breaks a promise
//! (a panic inside it, or a value that does not survive its own round trip). The cargo-fuzz
//! targets in `fuzz_targets/` call them; `protocol/tests/properties.rs` includes this file
//! too, so the same bodies run on stable Rust in every `cargo test`.

use botfleet_protocol::messages::{Command, Desired, Event, Info, Status, Telemetry};
use botfleet_protocol::{
    DeviceId, ExpiryCheck, ManifestSigner, SignedManifest, SignedRollback, SlotName, TopicKind,
    Topics, TrustedKeys,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A fixed key: arbitrary bytes never carry its signature.
fn trusted() -> (ManifestSigner, TrustedKeys) {
    let signer = ManifestSigner::from_secret([0xf3; 32]);
    let keys = TrustedKeys::new([signer.public_key()]);
    (signer, keys)
}

/// Topic parsing: never panics; whatever parses is rebuilt to the very same string.
pub fn topic(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for topics in [
        Topics::default(),
        Topics::new("fleet/a").ok().unwrap_or_default(),
    ] {
        if let Some((device, kind)) = topics.parse(&text) {
            assert_eq!(
                topics.device(&device, kind),
                text,
                "parse is not the inverse of build"
            );
            assert!(TopicKind::ALL.contains(&kind));
        }
    }
    // Names built from the same bytes can never become a wildcard, another topic level or
    // a path outside their directory.
    let ids = [
        DeviceId::new(text.as_ref()).ok().map(|d| d.to_string()),
        SlotName::new(text.as_ref()).ok().map(|s| s.to_string()),
    ];
    for id in ids.into_iter().flatten() {
        assert!(valid_name(&id), "accepted name {id:?}");
    }
}

/// What a validated name must satisfy: no topic separator or wildcard, no control
/// character, no `.`/`..` path component, bounded length.
pub fn valid_name(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= botfleet_protocol::ids::MAX_ID_LEN
        && !id.contains(['/', '+', '#', '\\'])
        && !id.chars().any(char::is_control)
        && !id.starts_with('.')
}

/// A JSON decoder: never panics; a decoded value encodes and decodes again.
///
/// Equality is not asserted after the second decode: serde_json's float parsing may move
/// a decimal by one ulp on the way back. The property tests check equality on values they
/// construct. (A number too large for an `f32` field is a decode error, see
/// `botfleet_protocol::finite`, so nothing decodes to infinity and fails on the way back.)
pub fn decode<T: DeserializeOwned + Serialize>(data: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(data).ok()?;
    let bytes = serde_json::to_vec(&value).ok()?;
    assert!(
        serde_json::from_slice::<T>(&bytes).is_ok(),
        "a decoded message does not decode after encoding: {}",
        String::from_utf8_lossy(&bytes)
    );
    Some(value)
}

pub fn status(data: &[u8]) {
    let _ = decode::<Status>(data);
}

pub fn info(data: &[u8]) {
    let _ = decode::<Info>(data);
}

pub fn telemetry(data: &[u8]) {
    let _ = decode::<Telemetry>(data);
}

pub fn event(data: &[u8]) {
    let _ = decode::<Event>(data);
}

pub fn command(data: &[u8]) {
    if let Some(command) = decode::<Command>(data)
        && let botfleet_protocol::messages::CommandKind::SignedRollback { order } = command.kind
    {
        rollback_order(&order);
    }
}

/// A desired document and every manifest in it, verified against a fixed key.
pub fn desired(data: &[u8]) {
    if let Some(desired) = decode::<Desired>(data) {
        for model in desired.slots.values() {
            signed_manifest(&model.manifest);
        }
    }
}

/// The signed manifest envelope: decoding and verifying arbitrary input never panics and
/// never succeeds (nobody holds the key).
pub fn manifest(data: &[u8]) {
    if let Some(signed) = decode::<SignedManifest>(data) {
        signed_manifest(&signed);
    }
}

fn signed_manifest(signed: &SignedManifest) {
    let (_, keys) = trusted();
    let _ = signed.claims();
    let _ = signed.payload_digest();
    assert!(
        signed.verify(&keys, ExpiryCheck::Skip).is_err(),
        "an arbitrary manifest verified"
    );
}

fn rollback_order(order: &SignedRollback) {
    let (_, keys) = trusted();
    let _ = order.claims();
    let me = DeviceId::new("robot-1").ok();
    if let Some(me) = me {
        assert!(
            order
                .verify(&keys, &me, jiff::Timestamp::UNIX_EPOCH)
                .is_err(),
            "an arbitrary rollback order verified"
        );
    }
}

/// The signing key the fuzz targets trust, for seeding corpora with valid envelopes.
pub fn signer() -> ManifestSigner {
    trusted().0
}
