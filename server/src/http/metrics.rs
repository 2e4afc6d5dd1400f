//! `GET /metrics`: Prometheus text exposition. Each family group is one function that
//! appends to the body, so more groups can be added side by side.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{App, AppState};

mod devices;

/// `GET /metrics`
pub async fn metrics(State(app): AppState) -> Response {
    let mut body = String::new();
    rollout_families(&app, &mut body);
    device_families(&app, &mut body);
    sample_families(&app, &mut body);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

fn family(body: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(body, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Rollouts by state, devices in rollouts by outcome, events folded.
fn rollout_families(app: &App, body: &mut String) {
    let (list, events) = {
        let book = app.fleet.rollouts();
        (book.list(), book.events())
    };
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for state in [
        "in_progress",
        "paused",
        "completed",
        "aborted",
        "rolled_back",
        "superseded",
    ] {
        by_state.insert(state.to_owned(), 0);
    }
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for view in &list {
        let state = serde_json::to_value(view.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        *by_state.entry(state).or_default() += 1;
        if let Ok(serde_json::Value::Object(summary)) = serde_json::to_value(&view.summary) {
            for (outcome, n) in summary {
                *outcomes.entry(outcome).or_default() += n.as_u64().unwrap_or(0) as usize;
            }
        }
    }
    family(body, "botfleet_rollouts", "gauge", "Rollouts by state.");
    for (state, n) in by_state {
        let _ = writeln!(body, "botfleet_rollouts{{state=\"{state}\"}} {n}");
    }
    family(
        body,
        "botfleet_rollout_devices",
        "gauge",
        "Devices in rollouts by outcome, summed over all rollouts.",
    );
    for (outcome, n) in outcomes {
        let _ = writeln!(
            body,
            "botfleet_rollout_devices{{outcome=\"{outcome}\"}} {n}"
        );
    }
    family(
        body,
        "botfleet_events_total",
        "counter",
        "Device rollout events received, by what became of them.",
    );
    for (result, n) in [
        ("recorded", events.recorded),
        ("duplicate", events.duplicate),
        ("ignored", events.ignored),
    ] {
        let _ = writeln!(body, "botfleet_events_total{{result=\"{result}\"}} {n}");
    }
}

/// Sample uploads: stored, refused by reason, bytes stored.
fn sample_families(app: &App, body: &mut String) {
    use std::sync::atomic::Ordering::Relaxed;
    let counters = &app.data.counters;
    family(
        body,
        "botfleet_samples_received_total",
        "counter",
        "Sample uploads taken: stored now, or stored already (the same digest).",
    );
    for (result, n) in [
        ("stored", counters.stored.load(Relaxed)),
        ("duplicate", counters.duplicate.load(Relaxed)),
    ] {
        let _ = writeln!(
            body,
            "botfleet_samples_received_total{{result=\"{result}\"}} {n}"
        );
    }
    family(
        body,
        "botfleet_samples_refused_total",
        "counter",
        "Sample uploads refused, by reason.",
    );
    for (reason, n) in counters.refused() {
        let _ = writeln!(
            body,
            "botfleet_samples_refused_total{{reason=\"{}\"}} {n}",
            reason.as_str()
        );
    }
    family(
        body,
        "botfleet_sample_bytes_total",
        "counter",
        "Bytes of the sample files stored.",
    );
    let _ = writeln!(
        body,
        "botfleet_sample_bytes_total {}",
        counters.stored_bytes.load(Relaxed)
    );
}

/// Devices by presence, and per-device CPU, memory, GPU and temperature gauges.
fn device_families(app: &App, body: &mut String) {
    let list = app.fleet.devices().list();
    devices::render(&list, &app.metrics, body);
}
