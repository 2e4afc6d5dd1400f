//! Property tests of every decoder of data that crosses the network: topic parsing, each
//! message type, the signed manifest envelope, and the name validation topics and paths
//! rely on. The fuzz target bodies (`protocol/fuzz/src/lib.rs`) run here too, on stable.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

#[allow(dead_code)] // `signer` seeds fuzz corpora; the rest is used below
#[path = "../fuzz/src/lib.rs"]
mod fuzz;

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use botfleet_protocol::manifest::{
    Artifact, Gate, ManifestSignature, ModelFormat, Quantization, Sha256Digest,
};
use botfleet_protocol::messages::{
    ActiveModel, Command, CommandKind, Desired, DesiredModel, Event, RejectReason, Stage, Status,
};
use botfleet_protocol::tensor::{DataType, TensorSpec};
use botfleet_protocol::{
    CommandId, DeviceId, EventId, ExpiryCheck, Manifest, ManifestSigner, RolloutId, SignedManifest,
    SlotName, TopicKind, Topics, TrustedKeys,
};
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

// ---------------------------------------------------------------- strategies

/// A name the validators accept (letters, digits, `-_.`, not starting with `.` or `-`).
fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9._-]{0,63}"
}

fn device() -> impl Strategy<Value = DeviceId> {
    name().prop_map(|n| DeviceId::new(n).unwrap())
}

fn slot() -> impl Strategy<Value = SlotName> {
    name().prop_map(|n| SlotName::new(n).unwrap())
}

fn kind() -> impl Strategy<Value = TopicKind> {
    proptest::sample::select(TopicKind::ALL.to_vec())
}

fn timestamp() -> impl Strategy<Value = jiff::Timestamp> {
    (0i64..4_102_444_800, 0i32..1_000_000_000)
        .prop_map(|(s, n)| jiff::Timestamp::new(s, n).unwrap())
}

fn digest() -> impl Strategy<Value = Sha256Digest> {
    any::<[u8; 32]>().prop_map(Sha256Digest::from_bytes)
}

/// Any text, including quotes, escapes, control characters and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    ".{0,40}"
}

fn signed_manifest() -> impl Strategy<Value = SignedManifest> {
    (text(), proptest::collection::vec((name(), text()), 0..3)).prop_map(|(payload, sigs)| {
        SignedManifest {
            payload,
            signatures: sigs
                .into_iter()
                .map(|(key_id, sig)| {
                    serde_json::from_value::<ManifestSignature>(
                        serde_json::json!({"key_id": key_id, "sig": sig}),
                    )
                    .unwrap()
                })
                .collect(),
        }
    })
}

fn desired() -> impl Strategy<Value = Desired> {
    (
        any::<u64>(),
        proptest::collection::btree_map(
            slot(),
            (proptest::option::of(name()), signed_manifest(), text()),
            0..3,
        ),
    )
        .prop_map(|(generation, slots)| Desired {
            generation,
            slots: slots
                .into_iter()
                .map(|(slot, (rollout, manifest, url))| {
                    let model = DesiredModel {
                        rollout_id: rollout.map(|r| RolloutId::new(r).unwrap()),
                        manifest,
                        evaluation_url: Some(format!("{url}.evaluation")),
                        artifact_url: url,
                        window: None,
                        shadow: None,
                        on_command: false,
                    };
                    (slot, model)
                })
                .collect(),
        })
}

fn stage() -> impl Strategy<Value = Stage> {
    prop_oneof![
        Just(Stage::Received),
        proptest::collection::vec(text(), 0..3).prop_map(|key_ids| Stage::Verified { key_ids }),
        (any::<u64>(), any::<u64>()).prop_map(|(total_bytes, offset)| Stage::Downloading {
            total_bytes,
            offset
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(bytes, millis)| Stage::Downloaded { bytes, millis }),
        any::<u64>().prop_map(|millis| Stage::Loaded { millis }),
        (proptest::option::of(digest()), any::<u64>()).prop_map(|(previous, swap_micros)| {
            Stage::Active {
                previous,
                swap_micros,
            }
        }),
        (
            proptest::sample::select(vec![
                RejectReason::Untrusted,
                RejectReason::Downgrade,
                RejectReason::DigestMismatch,
                RejectReason::GateMissed,
            ]),
            text()
        )
            .prop_map(|(reason, message)| Stage::Rejected { reason, message }),
        text().prop_map(|message| Stage::Failed { message }),
        (digest(), text()).prop_map(|(to, reason)| Stage::RolledBack { to, reason }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    (
        proptest::option::of(name()),
        device(),
        proptest::option::of(name()),
        slot(),
        digest(),
        proptest::option::of(any::<u64>()),
        timestamp(),
        stage(),
    )
        .prop_map(
            |(id, device, rollout, slot, sha256, release, at, stage)| Event {
                id: id.map(|i| EventId::new(i).unwrap()),
                device,
                rollout_id: rollout.map(|r| RolloutId::new(r).unwrap()),
                slot,
                sha256,
                release,
                at,
                stage,
            },
        )
}

fn command() -> impl Strategy<Value = Command> {
    let kind = prop_oneof![
        Just(CommandKind::ReportNow),
        Just(CommandKind::K3sLeave),
        (slot(), proptest::option::of(text()))
            .prop_map(|(slot, reason)| CommandKind::Rollback { slot, reason }),
    ];
    (name(), kind).prop_map(|(id, kind)| Command {
        command_id: CommandId::new(id).unwrap(),
        kind,
    })
}

fn status() -> impl Strategy<Value = Status> {
    (
        any::<bool>(),
        text(),
        proptest::collection::btree_map(
            slot(),
            (text(), text(), any::<u64>(), digest(), timestamp()),
            0..3,
        ),
        proptest::option::of(any::<u64>()),
        timestamp(),
    )
        .prop_map(
            |(online, agent_version, active, desired_generation, at)| Status {
                online,
                agent_version,
                active: active
                    .into_iter()
                    .map(|(slot, (name, version, release, sha256, since))| {
                        let model = ActiveModel {
                            name,
                            version,
                            release,
                            sha256,
                            since,
                            engine: None,
                        };
                        (slot, model)
                    })
                    .collect::<BTreeMap<_, _>>(),
                desired_generation,
                at,
                k3s: None,
                deferred: Default::default(),
            },
        )
}

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let bytes = serde_json::to_vec(value).unwrap();
    let back: T = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(&back, value, "{}", String::from_utf8_lossy(&bytes));
}

/// Every golden fixture: well-formed seeds for mutation.
fn fixtures() -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    // events.json is a list; each element is a message on its own.
    for seed in out.clone() {
        if let Ok(serde_json::Value::Array(items)) = serde_json::from_slice(&seed) {
            out.extend(items.iter().map(|v| serde_json::to_vec(v).unwrap()));
        }
    }
    out
}

/// Every decoder of network data, on the same bytes.
fn all_decoders(data: &[u8]) {
    fuzz::topic(data);
    fuzz::status(data);
    fuzz::info(data);
    fuzz::telemetry(data);
    fuzz::event(data);
    fuzz::desired(data);
    fuzz::command(data);
    fuzz::manifest(data);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(mut data: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = data.len().max(1);
        match *m {
            Mutation::Flip(i, x) if !data.is_empty() => data[i % len] ^= x,
            Mutation::Insert(i, b) => data.insert(i % (data.len() + 1), b),
            Mutation::Delete(i) if !data.is_empty() => {
                data.remove(i % len);
            }
            Mutation::Truncate(i) => data.truncate(i % (data.len() + 1)),
            _ => {}
        }
    }
    data
}

fn test_manifest() -> Manifest {
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
        expires_at: "2036-01-01T00:00:00Z".parse().unwrap(),
        allow_downgrade: false,
        engines: Default::default(),
    }
}

// ---------------------------------------------------------------- properties

/// Every top-level field of every fixture replaced by a value of each other JSON type.
#[test]
fn no_decoder_panics_when_any_field_has_the_wrong_type() {
    let replacements = [
        serde_json::Value::Null,
        serde_json::json!(-1),
        serde_json::json!(1e300),
        serde_json::json!(u64::MAX),
        serde_json::json!(true),
        serde_json::json!("x"),
        serde_json::json!("a".repeat(100_000)),
        serde_json::json!([]),
        serde_json::json!({}),
        serde_json::json!([{"a": [1, "b"]}]),
    ];
    for seed in fixtures() {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&seed) else {
            continue;
        };
        for key in map.keys() {
            for replacement in &replacements {
                let mut changed = map.clone();
                changed.insert(key.clone(), replacement.clone());
                all_decoders(&serde_json::to_vec(&changed).unwrap());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn every_built_topic_parses_back_to_its_device_and_kind(device in device(), kind in kind()) {
        for topics in [Topics::default(), Topics::new("fleet/site-1").unwrap()] {
            let topic = topics.device(&device, kind);
            prop_assert_eq!(topics.parse(&topic), Some((device.clone(), kind)));
            fuzz::topic(topic.as_bytes());
        }
    }

    #[test]
    fn topic_parsing_never_panics_on_arbitrary_strings(s in any::<String>()) {
        fuzz::topic(s.as_bytes());
    }

    #[test]
    fn topic_parsing_never_panics_on_near_topics(id in ".{0,70}", kind in "[a-z/+#]{0,12}") {
        let topic = format!("botfleet/v1/devices/{id}/{kind}");
        fuzz::topic(topic.as_bytes());
        if let Some((device, kind)) = Topics::default().parse(&topic) {
            prop_assert_eq!(device.as_str(), id.as_str());
            prop_assert!(TopicKind::ALL.contains(&kind));
        }
    }

    #[test]
    fn names_with_separators_wildcards_dots_or_control_characters_are_refused(
        before in "[A-Za-z0-9_]{0,10}",
        bad in prop_oneof![
            Just("/".to_owned()), Just("+".to_owned()), Just("#".to_owned()),
            Just("\\".to_owned()), Just(" ".to_owned()),
            "[\\x00-\\x1f\\x7f]".prop_map(|s: String| s),
            "[^\\x00-\\x7f]".prop_map(|s: String| s),
        ],
        after in "[A-Za-z0-9_]{0,10}",
    ) {
        let candidate = format!("{before}{bad}{after}");
        prop_assert!(DeviceId::new(candidate.clone()).is_err(), "{:?}", candidate);
        prop_assert!(SlotName::new(candidate.clone()).is_err(), "{:?}", candidate);
        for dotted in [format!(".{after}"), format!("..{after}"), "..".to_owned(), ".".to_owned()] {
            prop_assert!(DeviceId::new(dotted.clone()).is_err(), "{:?}", dotted);
            prop_assert!(SlotName::new(dotted.clone()).is_err(), "{:?}", dotted);
        }
    }

    #[test]
    fn every_accepted_name_is_safe_as_a_topic_level_and_a_file_name(s in any::<String>()) {
        if let Ok(id) = DeviceId::new(s.clone()) {
            prop_assert!(fuzz::valid_name(id.as_str()), "{:?}", s);
        }
        if let Ok(slot) = SlotName::new(s.clone()) {
            prop_assert!(fuzz::valid_name(slot.as_str()), "{:?}", s);
        }
    }

    #[test]
    fn no_decoder_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        all_decoders(&data);
    }

    #[test]
    fn no_decoder_panics_on_mutated_fixtures(
        seed in proptest::sample::select(fixtures()),
        mutations in proptest::collection::vec(mutation(), 1..6),
    ) {
        all_decoders(&apply(seed, &mutations));
    }

    #[test]
    fn deep_nesting_is_refused_without_a_stack_overflow(depth in 100usize..5_000) {
        let deep = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        all_decoders(deep.as_bytes());
        let nested = format!("{{\"generation\":1,\"slots\":{}{}}}", "{\"a\":".repeat(depth), "}".repeat(depth));
        all_decoders(nested.as_bytes());
    }

    #[test]
    fn status_round_trips(value in status()) {
        round_trips(&value);
        fuzz::status(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn events_round_trip(value in event()) {
        round_trips(&value);
        fuzz::event(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn commands_round_trip(value in command()) {
        round_trips(&value);
        fuzz::command(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn desired_documents_round_trip_and_their_arbitrary_manifests_never_verify(value in desired()) {
        round_trips(&value);
        fuzz::desired(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn signed_manifest_envelopes_round_trip(value in signed_manifest()) {
        round_trips(&value);
        fuzz::manifest(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn any_single_byte_change_of_a_signed_payload_fails_verification(
        at in any::<usize>(),
        xor in 1u8..=255,
    ) {
        let signer = ManifestSigner::from_secret([9; 32]);
        let keys = TrustedKeys::new([signer.public_key()]);
        let signed = signer.sign(&test_manifest()).unwrap();
        prop_assert!(signed.verify(&keys, ExpiryCheck::Skip).is_ok());
        let mut payload = B64.decode(&signed.payload).unwrap();
        let i = at % payload.len();
        payload[i] ^= xor;
        let tampered = SignedManifest { payload: B64.encode(&payload), ..signed.clone() };
        prop_assert!(tampered.verify(&keys, ExpiryCheck::Skip).is_err());
        // The same for a byte of the signature itself.
        let mut sig = B64.decode(&signed.signatures[0].sig).unwrap();
        let j = at % sig.len();
        sig[j] ^= xor;
        let mut forged = signed.clone();
        forged.signatures[0].sig = B64.encode(&sig);
        prop_assert!(forged.verify(&keys, ExpiryCheck::Skip).is_err());
        // And any change to the envelope's text.
        let mut text = serde_json::to_vec(&signed).unwrap();
        let k = at % text.len();
        text[k] ^= xor;
        if let Ok(changed) = serde_json::from_slice::<SignedManifest>(&text)
            && changed != signed
        {
            prop_assert!(changed.verify(&keys, ExpiryCheck::Skip).is_err());
        }
    }
}
