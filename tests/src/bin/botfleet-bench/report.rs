//! BENCHMARKS.md from one run's results: each figure with its median and spread, its ratio
//! against the reference measured in the same run, and its goal.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::stats::Summary;
use crate::{engine_sections, sections};

/// One section's JSON, or `Null` when that section did not run.
pub fn load(out: &Path, name: &str) -> Value {
    std::fs::read(out.join(format!("{name}.json")))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// JSON lines (the fleet benchmark appends one per run).
pub fn load_lines(out: &Path, name: &str) -> Vec<Value> {
    std::fs::read_to_string(out.join(name))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn summary(v: &Value) -> Option<Summary> {
    serde_json::from_value(v.clone()).ok()
}

/// `p50 (p25–p75)` with `digits` decimals.
pub fn spread(s: &Summary, digits: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.p50, s.p25, s.p75, d = digits)
}

pub fn ratio(x: f64, reference: f64) -> String {
    if reference > 0.0 {
        format!("{:.2}×", x / reference)
    } else {
        "–".into()
    }
}

/// Per-iteration times (ns) of every criterion benchmark, by full id.
fn criterion(dir: &Path) -> BTreeMap<String, Summary> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "base" && n != "report") {
                stack.push(p);
                continue;
            }
            if !(p.ends_with("new/benchmark.json")) {
                continue;
            }
            let read = |f: &str| -> Option<Value> {
                serde_json::from_slice(&std::fs::read(p.with_file_name(f)).ok()?).ok()
            };
            let (Some(meta), Some(sample)) = (read("benchmark.json"), read("sample.json")) else {
                continue;
            };
            let (Some(iters), Some(times)) =
                (sample["iters"].as_array(), sample["times"].as_array())
            else {
                continue;
            };
            let per_iter: Vec<f64> = iters
                .iter()
                .zip(times)
                .filter_map(|(i, t)| Some(t.as_f64()? / i.as_f64()?.max(1.0)))
                .collect();
            if let Some(id) = meta["full_id"].as_str() {
                out.insert(id.to_owned(), Summary::of(&per_iter));
            }
        }
    }
    out
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("`nproc` {cores}, {cpu}, {mem_gib:.0} GiB")
}

/// One section of the report as this run wrote it, or as the existing file has it.
struct Part {
    /// How its heading starts (`## 3.`), to find it in the existing file.
    heading: &'static str,
    /// How its closing-note lines start, to find them in the existing file.
    headlines: &'static [&'static str],
    text: String,
    heads: Vec<String>,
    /// Whether this run has its results (else the existing file's figures are kept).
    measured: bool,
}

impl Part {
    fn new(
        heading: &'static str,
        headlines: &'static [&'static str],
        measured: bool,
        write: impl FnOnce(&mut String, &mut Vec<String>),
    ) -> Self {
        let mut text = String::new();
        let mut heads = Vec::new();
        write(&mut text, &mut heads);
        Self {
            heading,
            headlines,
            text,
            heads,
            measured,
        }
    }
}

/// The sections of an existing report by their heading line, and its closing-note lines.
fn existing_sections(md: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut sections: Vec<(String, String)> = Vec::new();
    for line in md.split_inclusive('\n') {
        if line.starts_with("## ") {
            sections.push((line.trim_end().to_owned(), String::new()));
        }
        if let Some((_, text)) = sections.last_mut() {
            text.push_str(line);
        }
    }
    let heads = sections
        .iter()
        .find(|(h, _)| h.starts_with("## Closing note"))
        .map(|(_, t)| {
            t.lines()
                .filter_map(|l| l.strip_prefix("- ").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (sections, heads)
}

/// The date, command and machine of an existing report's header, for the note on kept
/// sections.
fn existing_run(md: &str) -> (String, String, Option<String>) {
    let date = md
        .split("; date ")
        .nth(1)
        .and_then(|r| r.split([';', ',', '\n']).next())
        .unwrap_or("an earlier date");
    let command = md
        .split("This run: `")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .unwrap_or("bench/run.sh");
    let machine = md
        .split("- Machine: ")
        .nth(1)
        .and_then(|r| r.split("; date ").next())
        .filter(|m| !m.contains('\n'));
    (
        date.to_owned(),
        command.to_owned(),
        machine.map(str::to_owned),
    )
}

const KEPT: &str = "_Kept from the run of ";

/// Sections this run did not measure keep the existing file's text and closing-note lines,
/// marked with the run they come from.
fn keep_unmeasured(parts: &mut [Part], existing: &str) {
    let (sections, old_heads) = existing_sections(existing);
    let (date, command, machine) = existing_run(existing);
    // The machine too: a later run may be on another one.
    let on = machine.map_or(String::new(), |m| format!(", on {m}"));
    for part in parts.iter_mut().filter(|p| !p.measured) {
        // `## 1.` is not `## 10.`: the heading is followed by a space.
        let Some((_, text)) = sections.iter().find(|(h, _)| {
            h.strip_prefix(part.heading)
                .is_some_and(|rest| rest.starts_with(' '))
        }) else {
            continue;
        };
        let mut text = text.trim_end().to_owned();
        text.push_str("\n\n");
        if !text.contains(KEPT)
            && !text.contains("_Not measured in this run")
            && let Some((heading, rest)) = text.split_once("\n\n")
        {
            text = format!(
                "{heading}\n\n{KEPT}{date} (`{command}`{on}): this run did not measure this section._\n\n{rest}"
            );
        }
        part.text = text;
        part.heads = old_heads
            .iter()
            .filter(|h| part.headlines.iter().any(|p| h.starts_with(p)))
            .map(|h| {
                if h.ends_with(')') && h.contains("(run of ") {
                    h.clone()
                } else {
                    format!("{h} (run of {date})")
                }
            })
            .collect();
    }
}

pub fn write(out: &Path, criterion_dir: &Path, file: &Path) -> Result<()> {
    let crit = criterion(criterion_dir);
    let run = load(out, "run");
    let mut md = String::new();
    let date = run["date"]
        .as_str()
        .map_or_else(|| jiff::Timestamp::now().to_string(), str::to_owned);
    let engine = load(out, "engine");
    let ort = load(out, "ort");
    let peer_version = engine["peer_onnxruntime"]
        .as_str()
        .or_else(|| ort["onnxruntime"].as_str())
        .or_else(|| run["onnxruntime"].as_str())
        .unwrap_or("(not run)");
    let _ = writeln!(
        md,
        "# Benchmarks\n\n\
         Generated by one command, `bench/run.sh` (release build; onnxruntime {peer_version} in `bench/.venv`), \
         which runs every section below and writes this file with `botfleet-bench report`. \
         Every model is a real fixture (`bench/fixtures.json`). This run: `{}`.\n\n\
         - Machine: {}; date {date}; commit {}; whole run {}.\n\
         - These machines are shared and noisy (absolute times drift up to 1.6× between runs), \
         so each figure is compared with a reference measured **in the same run**, interleaved \
         where possible; the ratio is the number to read. Median with the interquartile range \
         (p25–p75) in parentheses unless said otherwise.\n\
         - A section this run did not measure keeps the figures of the run that did, and says \
         which.\n",
        run["command"].as_str().unwrap_or("bench/run.sh"),
        machine(),
        run["commit"].as_str().unwrap_or("not recorded"),
        run["duration"].as_str().unwrap_or("?"),
    );
    let serving = load(out, "serving");
    let swap = load(out, "swap");
    let shadow = load(out, "shadow");
    let capture = load(out, "capture");
    let upload = load(out, "upload");
    let footprint = load(out, "footprint");
    let download = load(out, "download");
    let gpu = load(out, "gpu");
    let fleet = load_lines(out, "fleet.jsonl");
    let mut parts = vec![
        Part::new("## 1.", &["Serving "], !serving.is_null(), |md, h| {
            engine_sections::serving(md, &serving, &crit, h)
        }),
        Part::new(
            "## 2.",
            &["tract ", "botfleet onnxruntime-cpu "],
            !engine.is_null(),
            |md, h| engine_sections::engine(md, &engine, &ort, &crit, h),
        ),
        Part::new("## 3.", &["Hot swap"], !swap.is_null(), |md, h| {
            sections::swap(md, &swap, h)
        }),
        Part::new("## 4.", &["Agent idle"], !footprint.is_null(), |md, h| {
            sections::footprint(
                md,
                &footprint,
                &load(out, "sizes"),
                &load_lines(out, "profiles.jsonl"),
                h,
            )
        }),
        Part::new("## 5.", &["Download "], !download.is_null(), |md, h| {
            sections::download(md, &download, &crit, h)
        }),
        Part::new(
            "## 6.",
            &["10,000 devices", "100,000 devices"],
            !fleet.is_empty(),
            |md, h| sections::fleet(md, &fleet, h),
        ),
        Part::new("## 7.", &["Cold start"], !footprint.is_null(), |md, h| {
            sections::cold_start(md, &footprint, h)
        }),
        Part::new(
            "## 8.",
            &["onnxruntime-cuda ", "onnxruntime-tensorrt"],
            !gpu.is_null(),
            |md, h| engine_sections::gpu(md, &gpu, h),
        ),
        Part::new("## 9.", &["Shadow"], !shadow.is_null(), |md, h| {
            sections::shadow(md, &shadow, h)
        }),
        Part::new("## 10.", &["Data capture"], !capture.is_null(), |md, h| {
            sections::capture(md, &capture, h)
        }),
        Part::new("## 11.", &["Sample upload"], !upload.is_null(), |md, h| {
            sections::upload(md, &upload, h)
        }),
        Part::new("## Criterion", &[], !crit.is_empty(), |md, _| {
            sections::micro(md, &crit)
        }),
    ];
    if let Ok(existing) = std::fs::read_to_string(file) {
        keep_unmeasured(&mut parts, &existing);
    }
    let mut headlines = Vec::new();
    for part in &parts {
        md.push_str(&part.text);
        headlines.extend(part.heads.iter().cloned());
    }
    let _ = writeln!(md, "## Closing note: headline ratios\n");
    for h in &headlines {
        let _ = writeln!(md, "- {h}");
    }
    let kept =
        std::fs::read_to_string(crate::fixtures::root().join("bench/kept.md")).unwrap_or_default();
    let kept = kept
        .split_once("-->")
        .map_or(kept.as_str(), |(_, rest)| rest);
    let _ = writeln!(
        md,
        "\n## Earlier measurements (not repeated by bench/run.sh)\n{kept}"
    );
    std::fs::write(file, md).with_context(|| file.display().to_string())
}
