//! Data sets: the samples a selection names, frozen into an immutable manifest whose
//! digest is the SHA-256 of its exact bytes.
//!
//! The manifest lists the selected sample records sorted by (`captured_at`, `sha256`), so
//! the same samples always make the same list; the export (`export`) is the manifest, then
//! each sample file in that order.

use std::collections::BTreeSet;

use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::sample::CaptureRule;
use botfleet_protocol::{DeviceId, SlotName};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::record::{SampleFilter, SampleRecord};

/// The manifest schema this build writes.
pub const DATASET_SCHEMA: u32 = 1;
/// The most samples one data set may hold (its manifest is held in memory to export it).
pub const MAX_DATASET_SAMPLES: usize = 200_000;
const MAX_NAME_CHARS: usize = 128;

/// `POST /api/v1/datasets`: a name and which samples (the members of [`Selection`]).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRequest {
    pub name: String,
    #[serde(default)]
    pub devices: Option<Vec<DeviceId>>,
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub slots: Option<Vec<SlotName>>,
    #[serde(default)]
    pub rules: Option<Vec<CaptureRule>>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub since: Option<Timestamp>,
    #[serde(default)]
    pub until: Option<Timestamp>,
}

/// Which samples a data set holds: each part given must match (all of them together).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// These devices only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<DeviceId>>,
    /// Devices whose labels match, as a rollout's selector (`site=lab,ring in (a,b)`), at
    /// the time the data set is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slots: Option<Vec<SlotName>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<CaptureRule>>,
    /// Model versions or model SHA-256 digests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    /// Captured at or after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Captured before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<Timestamp>,
}

/// Why a data set was not made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatasetError {
    #[error("a data set name must be 1 to {MAX_NAME_CHARS} characters without control characters")]
    Name,
    #[error("selector: {0}")]
    Selector(String),
    #[error("since ({since}) must be before until ({until})")]
    Range { since: Timestamp, until: Timestamp },
    #[error("the selection matches no sample")]
    Empty,
    #[error("the selection matches more than {MAX_DATASET_SAMPLES} samples; narrow it")]
    TooLarge,
}

impl DatasetRequest {
    /// Checks the name and the time range; the name and the selection.
    pub fn check(self) -> Result<(String, Selection), DatasetError> {
        let chars = self.name.chars().count();
        if chars == 0 || chars > MAX_NAME_CHARS || self.name.chars().any(char::is_control) {
            return Err(DatasetError::Name);
        }
        if let (Some(since), Some(until)) = (self.since, self.until)
            && since >= until
        {
            return Err(DatasetError::Range { since, until });
        }
        let selector = self
            .selector
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        Ok((
            self.name,
            Selection {
                devices: self.devices,
                selector,
                slots: self.slots,
                rules: self.rules,
                models: self.models,
                since: self.since,
                until: self.until,
            },
        ))
    }
}

impl Selection {
    /// The filter this selection means; `selected` are the devices its label selector
    /// matched (`None`: no selector).
    pub fn filter(&self, selected: Option<BTreeSet<DeviceId>>) -> SampleFilter {
        let devices = match (&self.devices, selected) {
            (Some(listed), Some(selected)) => Some(
                listed
                    .iter()
                    .filter(|d| selected.contains(*d))
                    .cloned()
                    .collect(),
            ),
            (Some(listed), None) => Some(listed.iter().cloned().collect()),
            (None, selected) => selected,
        };
        SampleFilter {
            devices,
            slots: self.slots.as_ref().map(|s| s.iter().cloned().collect()),
            rules: self.rules.as_ref().map(|r| r.iter().copied().collect()),
            models: self.models.as_ref().map(|m| m.iter().cloned().collect()),
            since: self.since,
            until: self.until,
        }
    }
}

/// A data set as listed: what its manifest holds, and the manifest's digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dataset {
    pub id: String,
    pub name: String,
    /// The SHA-256 of the manifest's exact bytes.
    pub digest: Sha256Digest,
    pub created_at: Timestamp,
    pub selection: Selection,
    /// How many samples, and their files' bytes.
    pub samples: u64,
    pub bytes: u64,
    /// The manifest's length.
    pub manifest_bytes: u64,
}

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub id: String,
    pub name: String,
    pub created_at: Timestamp,
    pub selection: Selection,
    /// Sorted by (`captured_at`, `sha256`); the export's files follow in this order.
    pub samples: Vec<SampleRecord>,
}

/// A new data set id: `ds-` and 12 random hex digits.
pub fn new_id() -> String {
    format!("ds-{}", hex::encode(rand::random::<[u8; 6]>()))
}

/// Whether `id` can be a data set id (what a path may name).
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Freezes `samples` into a manifest: its exact bytes and the record that names them.
pub fn freeze(
    id: String,
    name: String,
    selection: Selection,
    mut samples: Vec<SampleRecord>,
    now: Timestamp,
) -> Result<(Dataset, Vec<u8>), serde_json::Error> {
    samples.sort_by(|a, b| {
        (a.captured_at, a.sha256.as_bytes()).cmp(&(b.captured_at, b.sha256.as_bytes()))
    });
    samples.dedup_by(|a, b| a.sha256 == b.sha256);
    let manifest = Manifest {
        schema: DATASET_SCHEMA,
        id: id.clone(),
        name: name.clone(),
        created_at: now,
        selection: selection.clone(),
        samples,
    };
    let mut bytes = serde_json::to_vec_pretty(&manifest)?;
    bytes.push(b'\n');
    let dataset = Dataset {
        id,
        name,
        digest: Sha256Digest::of(&bytes),
        created_at: now,
        selection,
        samples: manifest.samples.len() as u64,
        bytes: manifest.samples.iter().map(|s| s.bytes).sum(),
        manifest_bytes: bytes.len() as u64,
    };
    Ok((dataset, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::record::tests::record;

    fn request(json: serde_json::Value) -> Result<DatasetRequest, serde_json::Error> {
        serde_json::from_value(json)
    }

    #[test]
    fn a_request_takes_the_documented_members_and_refuses_others() {
        let full = request(serde_json::json!({
            "name": "night shift", "devices": ["robot-1"], "selector": "site=lab",
            "slots": ["digits"], "rules": ["low_confidence"], "models": ["1.0.0"],
            "since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z"
        }))
        .unwrap();
        let (name, selection) = full.check().unwrap();
        assert_eq!(name, "night shift");
        assert_eq!(selection.selector.as_deref(), Some("site=lab"));
        assert!(request(serde_json::json!({"name": "x", "labels": {}})).is_err());
        assert!(request(serde_json::json!({"devices": []})).is_err());
        assert_eq!(
            request(serde_json::json!({"name": ""})).unwrap().check(),
            Err(DatasetError::Name)
        );
        let backwards = request(serde_json::json!({
            "name": "x", "since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"
        }))
        .unwrap();
        assert!(matches!(backwards.check(), Err(DatasetError::Range { .. })));
    }

    #[test]
    fn listed_devices_and_the_selector_must_both_match() {
        let selection = Selection {
            devices: Some(vec!["robot-1".parse().unwrap(), "robot-2".parse().unwrap()]),
            ..Selection::default()
        };
        let selected: BTreeSet<DeviceId> = ["robot-2".parse().unwrap()].into();
        let filter = selection.filter(Some(selected));
        assert_eq!(filter.devices, Some(["robot-2".parse().unwrap()].into()));
        assert_eq!(Selection::default().filter(None), SampleFilter::default());
    }

    #[test]
    fn a_manifest_is_sorted_by_time_then_digest_and_its_digest_is_of_its_bytes() {
        use botfleet_protocol::sample::CaptureRule::*;
        let late = record("robot-1", Sampled, "2026-01-01T12:00:00Z");
        let early_a = record("robot-1", OnDemand, "2026-01-01T10:00:00Z");
        let early_b = record("robot-2", OnDemand, "2026-01-01T10:00:00Z");
        let (dataset, bytes) = freeze(
            "ds-1".into(),
            "n".into(),
            Selection::default(),
            vec![late.clone(), early_b.clone(), early_a.clone(), late.clone()],
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        assert_eq!(dataset.digest, Sha256Digest::of(&bytes));
        assert_eq!(dataset.samples, 3);
        assert_eq!(dataset.bytes, 300);
        let manifest: Manifest = serde_json::from_slice(&bytes).unwrap();
        let mut early = [early_a.sha256, early_b.sha256];
        early.sort_by_key(|d| *d.as_bytes());
        let order: Vec<Sha256Digest> = manifest.samples.iter().map(|s| s.sha256).collect();
        assert_eq!(order, [early[0], early[1], late.sha256]);
    }

    #[test]
    fn ids_are_plain() {
        assert!(valid_id(&new_id()));
        for bad in ["", "../x", "DS-1", "a/b"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
