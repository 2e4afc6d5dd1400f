//! What the server records of each sample it stores, how samples are picked (by device,
//! slot, rule, model and time) and counted.

use std::collections::{BTreeMap, BTreeSet};

use botfleet_protocol::engine::EngineKind;
use botfleet_protocol::manifest::Sha256Digest;
use botfleet_protocol::sample::{CaptureRule, SampleHeader, SampleModel, SampleTensor};
use botfleet_protocol::{DeviceId, SlotName};
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// One stored sample: its header's facts, its digest and size, and when it arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    /// The SHA-256 of the sample file: its id.
    pub sha256: Sha256Digest,
    pub device: DeviceId,
    pub slot: SlotName,
    /// The model that served the request.
    pub model: SampleModel,
    pub engine: EngineKind,
    pub rule: CaptureRule,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For a disagreement: the shadowed candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<SampleModel>,
    pub captured_at: Timestamp,
    pub received_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// The sample file's length.
    pub bytes: u64,
    pub inputs: Vec<SampleTensor>,
    pub outputs: Vec<SampleTensor>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidate_outputs: Vec<SampleTensor>,
}

impl SampleRecord {
    pub fn new(sha256: Sha256Digest, header: SampleHeader, bytes: u64, now: Timestamp) -> Self {
        Self {
            sha256,
            device: header.device,
            slot: header.slot,
            model: header.model,
            engine: header.engine,
            rule: header.rule,
            detail: header.detail,
            candidate: header.candidate,
            captured_at: header.captured_at,
            received_at: now,
            latency_ms: header.latency_ms,
            bytes,
            inputs: header.inputs,
            outputs: header.outputs,
            candidate_outputs: header.candidate_outputs,
        }
    }
}

/// Which samples: each set given must contain the sample's value; `since` is inclusive,
/// `until` exclusive (both on `captured_at`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SampleFilter {
    pub devices: Option<BTreeSet<DeviceId>>,
    pub slots: Option<BTreeSet<SlotName>>,
    pub rules: Option<BTreeSet<CaptureRule>>,
    /// Model versions or model SHA-256 digests (hex).
    pub models: Option<BTreeSet<String>>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
}

/// Whether `value` is in `set`, when there is a set.
fn within<T: Ord>(set: &Option<BTreeSet<T>>, value: &T) -> bool {
    set.as_ref().is_none_or(|s| s.contains(value))
}

impl SampleFilter {
    pub fn matches(&self, record: &SampleRecord) -> bool {
        within(&self.devices, &record.device)
            && within(&self.slots, &record.slot)
            && within(&self.rules, &record.rule)
            && self.models.as_ref().is_none_or(|models| {
                models.contains(&record.model.version)
                    || models.contains(&record.model.sha256.to_hex())
            })
            && self.since.is_none_or(|since| record.captured_at >= since)
            && self.until.is_none_or(|until| record.captured_at < until)
    }
}

/// Samples of one device, slot and rule captured in one time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SummaryRow {
    /// The bucket's first instant.
    pub start: Timestamp,
    pub device: DeviceId,
    pub slot: SlotName,
    pub rule: CaptureRule,
    pub count: u64,
    pub bytes: u64,
}

/// `GET /api/v1/samples/summary`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub bucket_s: u64,
    pub samples: u64,
    pub bytes: u64,
    /// Ordered by bucket, then device, slot and rule.
    pub buckets: Vec<SummaryRow>,
}

/// Counts per device, slot, rule and `bucket_s`-second bucket (buckets start at multiples
/// of `bucket_s` since the Unix epoch).
#[derive(Debug)]
pub struct Summarizer {
    bucket_s: u64,
    rows: BTreeMap<(i64, DeviceId, SlotName, CaptureRule), (u64, u64)>,
}

impl Summarizer {
    pub fn new(bucket_s: u64) -> Self {
        Self {
            bucket_s: bucket_s.max(1),
            rows: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, record: &SampleRecord) {
        let width = i64::try_from(self.bucket_s).unwrap_or(i64::MAX);
        let start = record.captured_at.as_second().div_euclid(width) * width;
        let row = self
            .rows
            .entry((
                start,
                record.device.clone(),
                record.slot.clone(),
                record.rule,
            ))
            .or_default();
        row.0 += 1;
        row.1 += record.bytes;
    }

    pub fn finish(self) -> Summary {
        let mut summary = Summary {
            bucket_s: self.bucket_s,
            samples: 0,
            bytes: 0,
            buckets: Vec::with_capacity(self.rows.len()),
        };
        for ((start, device, slot, rule), (count, bytes)) in self.rows {
            summary.samples += count;
            summary.bytes += bytes;
            summary.buckets.push(SummaryRow {
                start: Timestamp::from_second(start).unwrap_or(Timestamp::UNIX_EPOCH),
                device,
                slot,
                rule,
                count,
                bytes,
            });
        }
        summary
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use botfleet_protocol::sample::SAMPLE_SCHEMA;
    use botfleet_protocol::tensor::DataType;

    use super::*;

    pub(crate) fn header(device: &str, rule: CaptureRule, at: &str) -> SampleHeader {
        SampleHeader {
            schema: SAMPLE_SCHEMA,
            device: device.parse().unwrap(),
            slot: "digits".parse().unwrap(),
            model: SampleModel {
                version: "1.0.0".into(),
                release: 1,
                sha256: Sha256Digest::of(b"model"),
            },
            engine: EngineKind::Tract,
            captured_at: at.parse().unwrap(),
            rule,
            detail: None,
            candidate: None,
            latency_ms: None,
            inputs: vec![SampleTensor {
                name: "x".into(),
                datatype: DataType::Fp32,
                shape: vec![1, 2],
            }],
            outputs: vec![],
            candidate_outputs: vec![],
        }
    }

    pub(crate) fn record(device: &str, rule: CaptureRule, at: &str) -> SampleRecord {
        let sha = Sha256Digest::of(format!("{device}{rule}{at}").as_bytes());
        SampleRecord::new(sha, header(device, rule, at), 100, Timestamp::UNIX_EPOCH)
    }

    #[test]
    fn a_filter_needs_every_given_set_and_the_time_range() {
        let r = record(
            "robot-1",
            CaptureRule::LowConfidence,
            "2026-01-01T10:00:00Z",
        );
        assert!(SampleFilter::default().matches(&r));
        let only = |f: SampleFilter| f.matches(&r);
        assert!(only(SampleFilter {
            devices: Some(["robot-1".parse().unwrap()].into()),
            rules: Some([CaptureRule::LowConfidence, CaptureRule::Sampled].into()),
            models: Some(["1.0.0".to_owned()].into()),
            since: Some("2026-01-01T10:00:00Z".parse().unwrap()),
            until: Some("2026-01-01T10:00:01Z".parse().unwrap()),
            ..SampleFilter::default()
        }));
        assert!(only(SampleFilter {
            models: Some([Sha256Digest::of(b"model").to_hex()].into()),
            ..SampleFilter::default()
        }));
        assert!(!only(SampleFilter {
            devices: Some(["robot-2".parse().unwrap()].into()),
            ..SampleFilter::default()
        }));
        assert!(!only(SampleFilter {
            rules: Some(BTreeSet::new()),
            ..SampleFilter::default()
        }));
        assert!(!only(SampleFilter {
            until: Some("2026-01-01T10:00:00Z".parse().unwrap()),
            ..SampleFilter::default()
        }));
        assert!(!only(SampleFilter {
            models: Some(["2.0.0".to_owned()].into()),
            ..SampleFilter::default()
        }));
    }

    #[test]
    fn a_summary_counts_per_device_slot_rule_and_bucket() {
        let mut s = Summarizer::new(3600);
        for (device, rule, at) in [
            ("robot-1", CaptureRule::Sampled, "2026-01-01T10:05:00Z"),
            ("robot-1", CaptureRule::Sampled, "2026-01-01T10:55:00Z"),
            ("robot-1", CaptureRule::Sampled, "2026-01-01T11:00:00Z"),
            ("robot-2", CaptureRule::OnDemand, "2026-01-01T10:10:00Z"),
        ] {
            s.add(&record(device, rule, at));
        }
        let summary = s.finish();
        assert_eq!((summary.samples, summary.bytes), (4, 400));
        let rows: Vec<(String, &str, u64)> = summary
            .buckets
            .iter()
            .map(|r| (r.start.to_string(), r.device.as_str(), r.count))
            .collect();
        assert_eq!(
            rows,
            [
                ("2026-01-01T10:00:00Z".to_owned(), "robot-1", 2),
                ("2026-01-01T10:00:00Z".to_owned(), "robot-2", 1),
                ("2026-01-01T11:00:00Z".to_owned(), "robot-1", 1),
            ]
        );
    }
}
