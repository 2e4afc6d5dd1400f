//! What the CLI shows a person: per-wave progress bars for `rollout status --watch`, an
//! upload bar for `model push`, and short text views of the API's JSON (`--output json`
//! prints the JSON itself, for scripts).

use std::time::Duration;

use bytes::Bytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use crate::client::{ApiClient, ClientError};

/// How often `--watch` looks again.
const WATCH_EVERY: Duration = Duration::from_millis(500);
/// Upload chunk: the bar moves as each is sent.
const CHUNK: usize = 64 * 1024;

/// Outcomes that end a device's part in a rollout.
const TERMINAL: [&str; 9] = [
    "active",
    "rejected",
    "failed",
    "timed_out",
    "skipped",
    "aborted",
    "superseded",
    "rolled_back",
    "rolling_back",
];

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

/// The file's bytes as a stream that moves `bar` as reqwest sends them.
pub fn upload_body(bytes: Vec<u8>, show: bool) -> (reqwest::Body, ProgressBar) {
    let bar = if show {
        ProgressBar::with_draw_target(Some(bytes.len() as u64), ProgressDrawTarget::stderr())
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(style(
        "upload {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
    ));
    let chunks: Vec<Bytes> = Bytes::from(bytes)
        .chunks(CHUNK)
        .map(Bytes::copy_from_slice)
        .collect();
    let counted = bar.clone();
    let stream = futures_util::stream::iter(chunks.into_iter().map(move |chunk| {
        counted.inc(chunk.len() as u64);
        Ok::<Bytes, std::io::Error>(chunk)
    }));
    (reqwest::Body::wrap_stream(stream), bar)
}

/// Counts of a wave's devices by where they stand.
fn wave_counts(view: &Value, wave: u64) -> (u64, u64, String) {
    let mut by: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut total, mut done) = (0, 0);
    for device in view["devices"]
        .as_object()
        .into_iter()
        .flat_map(|d| d.values())
    {
        if device["wave"].as_u64() != Some(wave) {
            continue;
        }
        total += 1;
        let outcome = device["outcome"].as_str().unwrap_or("pending");
        if TERMINAL.contains(&outcome) {
            done += 1;
        }
        let stage = match (outcome, device["stage"].as_str()) {
            ("in_progress", Some("loaded" | "benchmarked")) => "benchmarking",
            ("in_progress", _) => "downloading",
            (other, _) => other,
        };
        *by.entry(stage.to_owned()).or_default() += 1;
    }
    let words: Vec<String> = by.iter().map(|(k, n)| format!("{k} {n}")).collect();
    (total, done, words.join(" · "))
}

/// Follows a rollout until it is no longer live: one bar per wave (or one JSON line per
/// change with `json`).
pub async fn watch(client: &ApiClient, id: &str, json: bool) -> Result<Value, ClientError> {
    let path = format!("/api/v1/rollouts/{id}");
    let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    let mut bars: Vec<ProgressBar> = Vec::new();
    let header = multi.add(ProgressBar::new_spinner());
    header.set_style(style("{msg}"));
    let mut last = Value::Null;
    loop {
        let view = client.get(&path).await?;
        if json {
            if view != last {
                println!("{view}");
            }
        } else {
            let waves = view["waves"].as_u64().unwrap_or(0);
            while (bars.len() as u64) < waves {
                let bar = multi.add(ProgressBar::new(0));
                bar.set_style(style("wave {prefix:>2} {bar:30} {pos}/{len} {msg}"));
                bar.set_prefix((bars.len() + 1).to_string());
                bars.push(bar);
            }
            header.set_message(format!(
                "rollout {id}: {} {} · {} · wave {} of {waves}",
                view["slot"].as_str().unwrap_or(""),
                view["version"].as_str().unwrap_or(""),
                view["state"].as_str().unwrap_or(""),
                view["wave"].as_u64().unwrap_or(0) + 1,
            ));
            for (wave, bar) in bars.iter().enumerate() {
                let (total, done, words) = wave_counts(&view, wave as u64);
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(words);
            }
        }
        let live = matches!(view["state"].as_str(), Some("in_progress" | "paused"));
        if !live {
            for bar in &bars {
                bar.finish();
            }
            header.finish();
            return Ok(view);
        }
        last = view;
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("-")
}

/// Each engine a benchmark measured, on one line: `onnxruntime-cuda p99 1.50 ms ok · …`.
fn engine_figures(bench: &Value) -> String {
    let figures: Vec<String> = bench["engines"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let p99 = e["p99_ms"]
                .as_f64()
                .map_or_else(|| "-".to_owned(), |v| format!("{v:.2} ms"));
            let verdict = if e["passed"] == true {
                "ok".to_owned()
            } else {
                format!("failed: {}", e["reason"].as_str().unwrap_or("-"))
            };
            format!("{} p99 {p99} {verdict}", s(e, "engine"))
        })
        .collect();
    figures.join(" · ")
}

/// A short text view of an API answer; `what` names the command's kind of answer.
pub fn text(what: Shown, v: &Value) -> String {
    let rows = v.as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    match what {
        Shown::Models => {
            for m in rows {
                out += &format!(
                    "{:<16} {:<24} {:<10} release {:<4} {:>10} B  {:<12} key {}\n",
                    s(&m, "slot"),
                    s(&m, "name"),
                    s(&m, "version"),
                    m["release"],
                    m["size"],
                    s(&m, "quantization"),
                    s(&m, "key_id")
                );
            }
        }
        Shown::Rollouts => {
            for r in rows {
                out += &format!(
                    "{:<16} {:<12} {:<10} {:<12} wave {}/{}  active {}\n",
                    s(&r, "rollout_id"),
                    s(&r, "slot"),
                    s(&r, "version"),
                    s(&r, "state"),
                    r["wave"].as_u64().unwrap_or(0) + 1,
                    r["waves"],
                    r["summary"]["active"]
                );
            }
        }
        Shown::Devices => {
            for d in rows {
                let presence = if d["online"] == true {
                    "online"
                } else {
                    "offline"
                };
                let labels: Vec<String> = d["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect();
                let engines: Vec<String> = d["serving_engines"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(slot, e)| format!("{slot}={}", e.as_str().unwrap_or("-")))
                    .collect();
                let engines = if engines.is_empty() {
                    "-".to_owned()
                } else {
                    engines.join(",")
                };
                out += &format!(
                    "{:<24} {:<8} last seen {:<28} engines {:<28} {}\n",
                    s(&d, "device_id"),
                    presence,
                    s(&d, "last_seen"),
                    engines,
                    labels.join(",")
                );
            }
        }
        Shown::Rollout => {
            out += &format!(
                "rollout {}: {} {} is {} (wave {} of {})\n",
                s(v, "rollout_id"),
                s(v, "slot"),
                s(v, "version"),
                s(v, "state"),
                v["wave"].as_u64().unwrap_or(0) + 1,
                v["waves"]
            );
            for (device, p) in v["devices"].as_object().into_iter().flatten() {
                // What serves, else what the gate chose.
                let engine = p["serving_engine"]
                    .as_str()
                    .or_else(|| p["engine"].as_str())
                    .unwrap_or("-");
                let line = format!(
                    "  {device:<24} wave {} {:<12} {engine:<26} {}",
                    p["wave"].as_u64().unwrap_or(0) + 1,
                    s(p, "outcome"),
                    p["message"].as_str().unwrap_or("")
                );
                out += line.trim_end();
                out += "\n";
                let figures = engine_figures(&p["bench"]);
                if !figures.is_empty() {
                    out += &format!("    {figures}\n");
                }
            }
        }
        Shown::Channels => {
            // One channel (an object) or the list.
            let rows = if v.is_object() { vec![v.clone()] } else { rows };
            for c in rows {
                let pins: Vec<String> = c["pins"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(slot, p)| {
                        let f = &c["followers"][slot];
                        format!(
                            "{slot}={} ({}/{} active)",
                            s(p, "version"),
                            f["active"].as_u64().unwrap_or(0),
                            f["devices"].as_u64().unwrap_or(0)
                        )
                    })
                    .collect();
                out += &format!(
                    "{:<16} priority {:<4} {:<28} {}\n",
                    s(&c, "name"),
                    c["priority"],
                    s(&c, "selector"),
                    if pins.is_empty() {
                        "-".to_owned()
                    } else {
                        pins.join(", ")
                    }
                );
                for d in c["devices"].as_array().into_iter().flatten() {
                    let slots: Vec<String> = d["slots"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(slot, f)| {
                            let state = if f["active"] == true {
                                "active"
                            } else if f["desired"] == true {
                                "told"
                            } else {
                                "behind"
                            };
                            format!("{slot}={} {state}", f["serving"].as_str().unwrap_or("-"))
                        })
                        .collect();
                    out += &format!("  {:<24} {}\n", s(d, "device_id"), slots.join(", "));
                }
            }
        }
        Shown::Other => out = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()),
    }
    out.trim_end().to_owned()
}

/// Which view `text` draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shown {
    Models,
    Rollouts,
    Rollout,
    Devices,
    Channels,
    Other,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_wave_counts_its_devices_by_stage() {
        let view = json!({"devices": {
            "a": {"wave": 0, "outcome": "active"},
            "b": {"wave": 1, "outcome": "in_progress", "stage": "benchmarked"},
            "c": {"wave": 1, "outcome": "in_progress", "stage": "downloading"},
            "d": {"wave": 1, "outcome": "failed"},
        }});
        assert_eq!(wave_counts(&view, 0), (1, 1, "active 1".to_owned()));
        assert_eq!(
            wave_counts(&view, 1),
            (3, 1, "benchmarking 1 · downloading 1 · failed 1".to_owned())
        );
    }

    #[test]
    fn a_rollout_reads_as_one_line_per_device() {
        let view = json!({"rollout_id": "r-1", "slot": "faces", "version": "1.0.0",
            "state": "paused", "wave": 0, "waves": 2,
            "devices": {"robot-1": {"wave": 0, "outcome": "active"}}});
        let shown = text(Shown::Rollout, &view);
        assert!(shown.starts_with("rollout r-1: faces 1.0.0 is paused (wave 1 of 2)"));
        assert!(shown.contains("robot-1"));
    }

    #[test]
    fn a_rollout_shows_each_devices_engine_and_the_figures_of_every_engine_measured() {
        let view = json!({"rollout_id": "r-1", "slot": "faces", "version": "1.0.0",
            "state": "in_progress", "wave": 0, "waves": 1, "devices": {
                "robot-1": {"wave": 0, "outcome": "active", "engine": "onnxruntime-cuda",
                    "serving_engine": "onnxruntime-cuda", "bench": {"engines": [
                        {"engine": "onnxruntime-cuda", "p99_ms": 1.5, "passed": true},
                        {"engine": "tract", "p99_ms": 9.25, "passed": false,
                         "reason": "p99 over budget"}]}},
                "robot-2": {"wave": 0, "outcome": "in_progress", "engine": "tract"}}});
        let shown = text(Shown::Rollout, &view);
        let lines: Vec<&str> = shown.lines().collect();
        assert!(lines[1].contains("robot-1") && lines[1].contains("onnxruntime-cuda"));
        assert_eq!(
            lines[2].trim(),
            "onnxruntime-cuda p99 1.50 ms ok · tract p99 9.25 ms failed: p99 over budget"
        );
        assert!(lines[3].contains("robot-2") && lines[3].contains("tract"));
    }

    #[test]
    fn a_device_list_shows_the_engine_serving_each_slot() {
        let devices = json!([
            {"device_id": "robot-1", "online": true, "last_seen": "2026-01-01T00:00:00Z",
             "serving_engines": {"faces": "onnxruntime-tensorrt-fp16", "orientation": "tract"}},
            {"device_id": "robot-2", "online": false}]);
        let shown = text(Shown::Devices, &devices);
        assert!(
            shown.contains("engines faces=onnxruntime-tensorrt-fp16,orientation=tract"),
            "{shown}"
        );
        assert!(
            shown.lines().nth(1).unwrap().contains("engines -"),
            "{shown}"
        );
    }
}
