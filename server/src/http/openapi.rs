//! `GET /api/v1/openapi.json`: the API described as an OpenAPI 3.1 document, kept next to
//! the routes it describes (a test checks that every route is in it).

use axum::http::header;
use axum::response::{IntoResponse, Response};

pub const DOCUMENT: &str = include_str!("openapi.json");

pub async fn document() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT).into_response()
}

#[cfg(test)]
mod tests {
    use botfleet_protocol::engine::EngineKind;
    use botfleet_protocol::messages::{Event, Info, Status};
    use serde_json::Value;

    use super::*;
    use crate::devices::Devices;
    use crate::rollouts::{Presence, Rollout, RolloutModel, Rollouts, Strategy};

    const EVENTS: &str = include_str!("../../../protocol/fixtures/events.json");
    const STATUS: &str = include_str!("../../../protocol/fixtures/status.json");
    const INFO: &str = include_str!("../../../protocol/fixtures/info.json");

    fn doc() -> Value {
        serde_json::from_str(DOCUMENT).unwrap()
    }

    /// Every member of `value` is a documented property of schema `name`.
    fn documented(doc: &Value, name: &str, value: &Value) {
        let properties = &doc["components"]["schemas"][name]["properties"];
        assert!(properties.is_object(), "no schema {name}");
        for key in value.as_object().unwrap().keys() {
            assert!(
                properties.get(key).is_some(),
                "{name}.{key} is returned but not documented"
            );
        }
    }

    fn benchmarked() -> Event {
        let events: Vec<Event> = serde_json::from_str(EVENTS).unwrap();
        events
            .into_iter()
            .find(|e| e.stage.name() == "benchmarked")
            .unwrap()
    }

    #[test]
    fn the_documented_engines_are_the_protocols() {
        let doc = doc();
        let documented: Vec<&str> = doc["components"]["schemas"]["EngineKind"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        let mut known: Vec<&str> = EngineKind::ALL.iter().map(|e| e.as_str()).collect();
        known.reverse();
        assert_eq!(documented, known);
        let metadata = &doc["components"]["schemas"]["ModelMetadata"]["properties"];
        assert_eq!(
            metadata["engines"]["$ref"],
            "#/components/schemas/EnginePolicy"
        );
    }

    #[test]
    fn every_field_of_a_rollout_device_and_benchmark_is_documented() {
        let doc = doc();
        let event = benchmarked();
        let json = serde_json::to_value(&event).unwrap();
        documented(&doc, "BenchReport", &{
            let mut report = json.clone();
            for envelope in [
                "id",
                "device",
                "rollout_id",
                "slot",
                "sha256",
                "release",
                "at",
            ] {
                report.as_object_mut().unwrap().remove(envelope);
            }
            report.as_object_mut().unwrap().remove("stage");
            report
        });
        for engine in json["engines"].as_array().unwrap() {
            documented(&doc, "EngineBench", engine);
        }

        let device = event.device.clone();
        let model = RolloutModel {
            slot: event.slot.clone(),
            version: "1.1.0".into(),
            release: event.release.unwrap(),
            sha256: event.sha256,
        };
        let id = event.rollout_id.clone().unwrap();
        let mut rollout = Rollout::new(
            id.clone(),
            model,
            event.at,
            Strategy::default(),
            std::slice::from_ref(&device),
        );
        rollout.step(event.at, |_| Presence::Online);
        let mut book = Rollouts::default();
        book.insert(rollout);
        book.apply(&event);
        let mut status: Status = serde_json::from_str(STATUS).unwrap();
        for active in status.active.values_mut() {
            active.release = event.release.unwrap();
        }
        book.observe_status(&device, &status);
        let view = serde_json::to_value(book.get(&id).unwrap()).unwrap();
        documented(&doc, "Rollout", &view);
        let progress = &view["devices"][device.as_str()];
        assert!(progress["serving_engine"].is_string(), "{progress}");
        documented(&doc, "RolloutDevice", progress);

        let mut devices = Devices::default();
        let now = event.at;
        devices.apply_status(&device, status, now);
        let info: Info = serde_json::from_str(INFO).unwrap();
        devices.apply_info(&device, info, now);
        devices.apply_event(&device, &event, now);
        let view = serde_json::to_value(devices.get(&device)).unwrap();
        documented(&doc, "Device", &view);
        documented(&doc, "Status", &view["status"]);
        for active in view["status"]["active"].as_object().unwrap().values() {
            documented(&doc, "ActiveModel", active);
        }
        documented(&doc, "EnginesInfo", &view["info"]["engines"]);
        for bench in view["benchmarks"].as_object().unwrap().values() {
            documented(&doc, "DeviceBench", bench);
        }
    }

    #[test]
    fn every_field_of_a_sample_and_a_data_set_is_documented() {
        use crate::data::dataset::{Selection, freeze};
        use crate::data::{SampleRecord, Summarizer};
        use botfleet_protocol::manifest::Sha256Digest;
        use botfleet_protocol::sample::{CaptureRule, SampleHeader};

        let doc = doc();
        let header: SampleHeader = serde_json::from_value(serde_json::json!({
            "schema": 1, "device": "robot-1", "slot": "digits",
            "model": {"version": "1", "release": 1, "sha256": "ab".repeat(32)},
            "engine": "tract", "captured_at": "2026-01-01T00:00:00Z", "rule": "disagreement",
            "detail": "top-1 3 vs 5", "latency_ms": 1.5,
            "candidate": {"version": "2", "release": 2, "sha256": "cd".repeat(32)},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2]}],
            "candidate_outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2]}]
        }))
        .unwrap();
        let record = SampleRecord::new(Sha256Digest::of(b"s"), header, 100, jiff::Timestamp::now());
        let json = serde_json::to_value(&record).unwrap();
        documented(&doc, "Sample", &json);
        documented(&doc, "SampleModel", &json["model"]);
        documented(&doc, "SampleTensor", &json["inputs"][0]);
        let selection = Selection {
            devices: Some(vec!["robot-1".parse().unwrap()]),
            selector: Some("site=lab".into()),
            slots: Some(vec!["digits".parse().unwrap()]),
            rules: Some(vec![CaptureRule::Sampled]),
            models: Some(vec!["1".into()]),
            since: Some(jiff::Timestamp::UNIX_EPOCH),
            until: Some(jiff::Timestamp::now()),
        };
        let (dataset, bytes) = freeze(
            "ds-1".into(),
            "n".into(),
            selection,
            vec![record.clone()],
            jiff::Timestamp::now(),
        )
        .unwrap();
        let json = serde_json::to_value(&dataset).unwrap();
        documented(&doc, "Dataset", &json);
        documented(&doc, "Selection", &json["selection"]);
        let manifest: Value = serde_json::from_slice(&bytes).unwrap();
        documented(&doc, "DatasetManifest", &manifest);
        let mut summary = Summarizer::new(60);
        summary.add(&record);
        let json = serde_json::to_value(summary.finish()).unwrap();
        documented(&doc, "SampleSummary", &json);
        let row = &json["buckets"][0];
        let properties = &doc["components"]["schemas"]["SampleSummary"]["properties"]["buckets"]["items"]
            ["properties"];
        for key in row.as_object().unwrap().keys() {
            assert!(
                properties.get(key).is_some(),
                "summary bucket {key} is not documented"
            );
        }
    }

    #[test]
    fn the_document_is_json_and_names_every_route() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let routes = include_str!("mod.rs");
        for line in routes
            .lines()
            .filter_map(|l| l.trim().strip_prefix(".route(\""))
        {
            let path = line.split('"').next().unwrap();
            assert!(doc["paths"].get(path).is_some(), "{path} is not documented");
        }
    }
}

/// The request schemas against the server's own parsers: every documented member of a
/// full instance parses, an unknown one is refused where the document says so, and a
/// member is required by the parser exactly when the document says it is.
#[cfg(test)]
mod requests {
    use serde::de::DeserializeOwned;
    use serde_json::{Value, json};

    use super::DOCUMENT;
    use crate::intake::{AccuracyGate, ModelMetadata};
    use crate::rollouts::{RolloutBody, Strategy};

    type Parse = fn(&Value) -> Result<(), String>;

    fn parse<T: DeserializeOwned>(value: &Value) -> Result<(), String> {
        serde_json::from_value::<T>(value.clone())
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn strategy() -> Value {
        json!({
            "waves": [{"count": 1}, {"percent": 10.0}], "bake_s": 600,
            "success_threshold": 0.95, "error_threshold": 0.05, "on_error": "rollback",
            "deadline_s": 3600, "gate": {"max_p99_regression_percent": 10.0},
            "install_window": "22:00-05:00", "install_on_command": true,
            "shadow": {"requests": 200, "seconds": 600, "min_agreement": 0.95,
                       "metric": "within_tolerance", "tolerance": 0.01, "output": "probs",
                       "sample_every": 4, "max_p99_ratio": 1.2,
                       "boxes": {"format": "cxcywh", "scores": "scores", "min_score": 0.3,
                                 "min_iou": 0.6}}
        })
    }

    fn accuracy_gate() -> Value {
        json!({"metric": "within_tolerance", "min_agreement": 0.9, "tolerance": 0.01})
    }

    /// Each request schema, the type the server parses it with, and an instance that gives
    /// every documented member.
    fn requests() -> Vec<(&'static str, Parse, Value)> {
        let sha = "ab".repeat(32);
        vec![
            (
                "ModelMetadata",
                parse::<ModelMetadata>,
                json!({
                    "slot": "digits", "name": "digits-cnn", "version": "1.0.0", "release": 2,
                    "quantization": "int8_qdq",
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1, 8, 8]}],
                    "compatibility": {
                        "arch": ["aarch64"], "boards": ["NVIDIA Jetson Orin Nano"],
                        "min_agent_version": "0.1.0"
                    },
                    "gate": {
                        "warmup_runs": 3, "runs": 20, "max_p50_ms": 10.0, "max_p99_ms": 25.0,
                        "max_memory_mb": 512, "max_regression": 0.2,
                        "reference": {"seed": 7, "outputs": {"y": [0.5, 0.5]}, "tolerance": 0.001},
                        "max_error_rate": 0.05, "max_serving_p99_ms": 40.0
                    },
                    "provenance": {
                        "pipeline_run": "manual__1", "dataset": "digest", "commit": "0123abc",
                        "source": "airflow:botfleet_train_and_ship", "parent_sha256": sha,
                        "metrics": {"accuracy": 0.97}
                    },
                    "expires_in_days": 30, "tolerance": 0.001,
                    "engines": {
                        "candidates": ["tract", "onnxruntime-cpu"],
                        "tolerance": {"fp16": 0.01, "int8": 0.1}
                    },
                    "evaluation": accuracy_gate()
                }),
            ),
            (
                "RolloutRequest",
                parse::<RolloutBody>,
                json!({
                    "slot": "digits", "version": "1.0.0", "devices": ["robot-1"],
                    "selector": "site=lab", "channel": "stable", "strategy": strategy(),
                    "supersede": true, "sha256": sha
                }),
            ),
            ("Strategy", parse::<Strategy>, strategy()),
            (
                "InstallOrder",
                parse::<crate::http::rollouts::InstallOrder>,
                json!({"devices": ["robot-1"]}),
            ),
            (
                "ChannelRequest",
                parse::<crate::channels::ChannelRequest>,
                json!({"selector": "site=lab", "priority": 10, "pins": {"digits": "1.0.0"}}),
            ),
            ("AccuracyGate", parse::<AccuracyGate>, accuracy_gate()),
            (
                "DatasetRequest",
                parse::<crate::data::DatasetRequest>,
                json!({
                    "name": "night shift", "devices": ["robot-1"], "selector": "site=lab",
                    "slots": ["digits"], "rules": ["low_confidence"], "models": ["1.0.0"],
                    "since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00Z"
                }),
            ),
            (
                "CaptureRequest",
                parse::<crate::data::CaptureRequest>,
                json!({"slot": "digits", "requests": 20, "reason": "night shift"}),
            ),
            (
                "EvaluationSet",
                parse::<botfleet_protocol::evaluation::EvaluationSet>,
                json!({
                    "schema": 1, "input": "x", "output": "y", "shape": [1, 2],
                    "parent_sha256": sha, "dataset_digest": "digest",
                    "samples": [{"data": [0.0, 1.0], "top1": 1, "output": [0.1, 0.9]}]
                }),
            ),
        ]
    }

    fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
        match schema["$ref"].as_str() {
            Some(r) => doc
                .pointer(r.trim_start_matches('#'))
                .unwrap_or_else(|| panic!("no {r}")),
            None => schema,
        }
    }

    /// Whether `instance` is the one of `branch` (a `oneOf` member).
    fn fits(branch: &Value, instance: &Value) -> bool {
        if let Some(properties) = branch["properties"].as_object() {
            let Some(members) = instance.as_object() else {
                return false;
            };
            let required = branch["required"].as_array().into_iter().flatten();
            members.keys().all(|k| properties.contains_key(k))
                && required
                    .filter_map(Value::as_str)
                    .all(|k| members.contains_key(k))
        } else if branch["type"] == "array" {
            instance.is_array()
        } else {
            branch.get("const") == Some(instance)
        }
    }

    /// The objects with documented members in `instance` (JSON pointer, schema), and for each
    /// `oneOf` met, the branches the instance used.
    struct Walk<'a> {
        doc: &'a Value,
        objects: Vec<(String, &'a Value)>,
        branches: Vec<(&'a Vec<Value>, usize)>,
    }

    impl<'a> Walk<'a> {
        fn walk(&mut self, schema: &'a Value, instance: &Value, at: &str) {
            let schema = resolve(self.doc, schema);
            if let Some(branches) = schema["oneOf"].as_array() {
                let doc = self.doc;
                let (index, branch) = branches
                    .iter()
                    .map(|b| resolve(doc, b))
                    .enumerate()
                    .find(|(_, b)| fits(b, instance))
                    .unwrap_or_else(|| panic!("{at}: {instance} fits no branch"));
                self.branches.push((branches, index));
                return self.walk(branch, instance, at);
            }
            match instance {
                Value::Object(members) => {
                    let Some(properties) = schema["properties"].as_object() else {
                        return;
                    };
                    self.objects.push((at.to_owned(), schema));
                    for (key, value) in members {
                        let property = properties
                            .get(key)
                            .unwrap_or_else(|| panic!("{at}/{key} is not documented"));
                        self.walk(property, value, &format!("{at}/{key}"));
                    }
                }
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        self.walk(&schema["items"], item, &format!("{at}/{i}"));
                    }
                }
                _ => {}
            }
        }
    }

    fn edited(
        full: &Value,
        at: &str,
        edit: impl FnOnce(&mut serde_json::Map<String, Value>),
    ) -> Value {
        let mut value = full.clone();
        let object = value.pointer_mut(at).and_then(Value::as_object_mut);
        edit(object.unwrap_or_else(|| panic!("no object at {at}")));
        value
    }

    #[test]
    fn each_request_schema_and_the_servers_parser_agree_member_by_member() {
        let doc: Value = serde_json::from_str(DOCUMENT).unwrap();
        for (name, parse, full) in requests() {
            let schema = &doc["components"]["schemas"][name];
            assert!(schema.is_object(), "no schema {name}");
            if let Err(err) = parse(&full) {
                panic!("{name}: the parser refuses every documented member: {err}");
            }
            let mut walk = Walk {
                doc: &doc,
                objects: Vec::new(),
                branches: Vec::new(),
            };
            walk.walk(schema, &full, "");
            for (branches, _) in &walk.branches {
                for index in 0..branches.len() {
                    let used = walk
                        .branches
                        .iter()
                        .any(|(b, i)| std::ptr::eq(*b, *branches) && *i == index);
                    let object = resolve(&doc, &branches[index])["properties"].is_object();
                    assert!(
                        !object || used,
                        "{name}: no instance of oneOf branch {index}"
                    );
                }
            }
            for (at, object) in walk.objects {
                let properties = object["properties"].as_object().unwrap();
                let members = full.pointer(&at).and_then(Value::as_object).unwrap();
                for key in properties.keys() {
                    assert!(
                        members.contains_key(key),
                        "{name}{at}: the test instance lacks the documented member {key}"
                    );
                }
                let unknown = edited(&full, &at, |o| {
                    o.insert("no_such_member".into(), json!(0));
                });
                assert!(
                    parse(&unknown).is_err(),
                    "{name}{at}: the parser takes an unknown member"
                );
                assert_eq!(
                    object["additionalProperties"],
                    json!(false),
                    "{name}{at}: the parser refuses unknown members; the document must say so"
                );
                let required: Vec<&str> = object["required"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                for key in members.keys() {
                    let without = edited(&full, &at, |o| {
                        o.remove(key);
                    });
                    let refused = parse(&without).err();
                    assert_eq!(
                        refused.is_some(),
                        required.contains(&key.as_str()),
                        "{name}{at}/{key}: documented as {}, parser says {refused:?}",
                        if required.contains(&key.as_str()) {
                            "required"
                        } else {
                            "optional"
                        },
                    );
                }
            }
        }
    }
}
