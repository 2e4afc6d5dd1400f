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
