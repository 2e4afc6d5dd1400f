//! What a manifest signature check must refuse.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use botfleet_protocol::manifest::{
    Artifact, Gate, ManifestSignature, ModelFormat, Quantization, Sha256Digest,
};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use botfleet_protocol::{
    ExpiryCheck, Manifest, ManifestError, ManifestSigner, SlotName, TrustedKeys,
};

fn manifest(expires_at: &str) -> Manifest {
    Manifest {
        schema: 1,
        slot: SlotName::new("vision").unwrap(),
        name: "m".into(),
        version: "1".into(),
        release: 1,
        artifact: Artifact {
            size: 3,
            sha256: Sha256Digest::of(b"abc"),
            format: ModelFormat::Onnx,
            quantization: Quantization::Fp32,
        },
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape: vec![1, 2],
        }],
        outputs: vec![],
        compatibility: Default::default(),
        gate: Gate::default(),
        provenance: Default::default(),
        issued_at: "2026-01-01T00:00:00Z".parse().unwrap(),
        expires_at: expires_at.parse().unwrap(),
        allow_downgrade: false,
        engines: Default::default(),
    }
}

fn now() -> ExpiryCheck {
    ExpiryCheck::At("2026-06-01T00:00:00Z".parse().unwrap())
}

#[test]
fn a_manifest_signed_by_a_trusted_key_verifies() {
    let signer = ManifestSigner::from_secret([1; 32]);
    let signed = signer.sign(&manifest("2027-01-01T00:00:00Z")).unwrap();
    let verified = signed
        .verify(&TrustedKeys::new([signer.public_key()]), now())
        .unwrap();
    assert_eq!(verified.signed_by(), [signer.key_id().clone()]);
}

#[test]
fn a_manifest_signed_by_an_unknown_key_is_untrusted() {
    let signer = ManifestSigner::from_secret([1; 32]);
    let other = ManifestSigner::from_secret([2; 32]);
    let signed = other.sign(&manifest("2027-01-01T00:00:00Z")).unwrap();
    let err = signed
        .verify(&TrustedKeys::new([signer.public_key()]), now())
        .unwrap_err();
    assert!(matches!(err, ManifestError::Untrusted { .. }), "{err}");
}

#[test]
fn a_tampered_payload_is_untrusted() {
    let signer = ManifestSigner::from_secret([1; 32]);
    let mut signed = signer.sign(&manifest("2027-01-01T00:00:00Z")).unwrap();
    let evil = signer.sign(&manifest("2099-01-01T00:00:00Z")).unwrap();
    signed.payload = evil.payload.replace("2099", "2098");
    let err = signed
        .verify(&TrustedKeys::new([signer.public_key()]), now())
        .unwrap_err();
    assert!(matches!(err, ManifestError::Untrusted { .. }), "{err}");
}

#[test]
fn a_signature_relabelled_with_a_trusted_key_id_is_untrusted() {
    let trusted = ManifestSigner::from_secret([1; 32]);
    let attacker = ManifestSigner::from_secret([2; 32]);
    let mut signed = attacker.sign(&manifest("2027-01-01T00:00:00Z")).unwrap();
    signed.signatures[0].key_id = trusted.key_id().clone();
    let err = signed
        .verify(&TrustedKeys::new([trusted.public_key()]), now())
        .unwrap_err();
    assert!(matches!(err, ManifestError::Untrusted { .. }), "{err}");
}

#[test]
fn garbage_signatures_and_payloads_are_errors_not_panics() {
    let signer = ManifestSigner::from_secret([1; 32]);
    let keys = TrustedKeys::new([signer.public_key()]);
    let mut signed = signer.sign(&manifest("2027-01-01T00:00:00Z")).unwrap();
    signed.signatures.push(ManifestSignature {
        key_id: signer.key_id().clone(),
        sig: "!!!".into(),
    });
    signed.signatures.swap(0, 1);
    assert!(
        signed.verify(&keys, now()).is_ok(),
        "one good signature is enough"
    );

    signed.payload = "not base64 at all ###".into();
    assert!(matches!(
        signed.verify(&keys, now()),
        Err(ManifestError::PayloadEncoding)
    ));
    signed.payload = "A".repeat(1 << 20);
    assert!(matches!(
        signed.verify(&keys, now()),
        Err(ManifestError::PayloadTooLarge(_))
    ));
}

#[test]
fn an_expired_manifest_is_refused_for_install_but_reloads_when_installed() {
    let signer = ManifestSigner::from_secret([1; 32]);
    let keys = TrustedKeys::new([signer.public_key()]);
    let signed = signer.sign(&manifest("2026-03-01T00:00:00Z")).unwrap();
    assert!(matches!(
        signed.verify(&keys, now()),
        Err(ManifestError::Expired { .. })
    ));
    assert!(signed.verify(&keys, ExpiryCheck::Skip).is_ok());
}

#[test]
fn keys_round_trip_through_their_text_form() {
    let signer = ManifestSigner::from_secret([9; 32]);
    let text = botfleet_protocol::manifest::format_public_key(&signer.public_key());
    assert!(text.starts_with("ed25519:"));
    let keys = TrustedKeys::parse([text.as_str()]).unwrap();
    assert_eq!(keys.key_ids().next(), Some(signer.key_id()));
    let again = ManifestSigner::parse(&signer.to_secret_text()).unwrap();
    assert_eq!(again.key_id(), signer.key_id());
    assert!(TrustedKeys::parse(["ed25519:short"]).is_err());
    assert!(TrustedKeys::parse(["rsa:AAAA"]).is_err());
}

#[test]
fn a_threshold_counts_each_key_once_so_duplicate_signatures_do_not_add_up() {
    let a = ManifestSigner::from_secret([1; 32]);
    let b = ManifestSigner::from_secret([2; 32]);
    let keys = TrustedKeys::new([a.public_key(), b.public_key()]).with_threshold(2);
    let m = manifest("2027-01-01T00:00:00Z");
    let mut twice_by_a = a.sign(&m).unwrap();
    let again = twice_by_a.signatures[0].clone();
    twice_by_a.signatures.push(again);
    assert!(matches!(
        twice_by_a.verify(&keys, now()),
        Err(ManifestError::Untrusted { .. })
    ));
    let mut by_both = a.sign(&m).unwrap();
    by_both.signatures.extend(b.sign(&m).unwrap().signatures);
    let verified = by_both.verify(&keys, now()).unwrap();
    assert_eq!(verified.signed_by().len(), 2);
}

#[test]
fn a_key_removed_from_the_trusted_set_no_longer_verifies() {
    let old = ManifestSigner::from_secret([1; 32]);
    let new = ManifestSigner::from_secret([2; 32]);
    let m = manifest("2027-01-01T00:00:00Z");
    let signed = old.sign(&m).unwrap();
    // Rotation: both trusted while agents move over...
    assert!(
        signed
            .verify(
                &TrustedKeys::new([old.public_key(), new.public_key()]),
                now()
            )
            .is_ok()
    );
    // ...then the old one is revoked by taking it out of the configuration.
    assert!(matches!(
        signed.verify(&TrustedKeys::new([new.public_key()]), now()),
        Err(ManifestError::Untrusted { .. })
    ));
}
