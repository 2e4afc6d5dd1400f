//! The report's engine sections: serving overhead per engine, the engines against python
//! onnxruntime, and the GPU engines.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::report::{ratio, spread, summary};
use crate::sections::{fixtures, missing, not_run};
use crate::stats::Summary;

type Crit = BTreeMap<String, Summary>;

/// Goal for botfleet's ONNX Runtime backend against python onnxruntime's own session.
const ORT_GOAL: f64 = 1.05;

fn diff(v: &Value) -> String {
    v.as_f64().map_or("–".into(), |d| format!("{d:.1e}"))
}

pub fn serving(md: &mut String, v: &Value, crit: &Crit, heads: &mut Vec<String>) {
    let _ = writeln!(
        md,
        "## 1. Serving overhead: OIP v2 over loopback HTTP vs in-process\n\n\
         `botfleet-bench serving`: the agent's real router (`botfleet_agent::serve`) on \
         127.0.0.1 and on a Unix socket (`inference.unix_socket`), keep-alive HTTP/1.1 clients, \
         the fixture's reference input; in-process is `Model::run` on the same input. Each \
         fixture is served by both engines, each in its own slot of the same server: tract, and \
         botfleet's ONNX Runtime CPU backend (`Engines::load(OnnxruntimeCpu, …)`, one intra-op \
         thread). The four paths of both engines alternate request by request. Bodies are \
         encoded once and shared with the client (no copy per request), so the figures are the \
         agent's side (read, parse, run, answer) plus the transport. Binary = the binary tensor \
         data extension (input and outputs as raw little-endian bytes, \
         `Inference-Header-Content-Length`). *Agent alone*: the same binary request handed to \
         the router in the same process (`tower::ServiceExt::oneshot`: no socket, no HTTP \
         client), which splits what the agent adds from what the transport adds. Goal: p50 ≤ 1.05× in-process for models of ≥ 1 ms, \
         ≤ +100 µs for sub-millisecond models; the verdict is for the faster of the two \
         transports a robot's client can pick. Times in ms.\n"
    );
    if v.is_null() {
        return not_run(md, "serving");
    }
    missing(md, v);
    if let Some(why) = v["onnxruntime_unavailable"].as_str() {
        let _ = writeln!(md, "ONNX Runtime not measured: {why}.\n");
    }
    let _ = writeln!(
        md,
        "| fixture | engine | request JSON / binary | in-process p50 (IQR) / p99 | TCP binary p50 (IQR) / p99 | TCP ÷ in-process p50 / p99 | TCP − in-process p50 | Unix socket binary p50 (IQR) / p99 | Unix ÷ in-process p50 | Unix − in-process p50 | agent alone (router, no transport) − in-process p50 | TCP JSON p50 (IQR) | JSON ÷ in-process p50 | goal |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut verdicts = Vec::new();
    // Per row, µs over in-process at p50: the agent alone, TCP, the Unix socket; and the
    // agent alone as a ratio.
    let mut parts: Vec<(f64, f64, f64, f64)> = Vec::new();
    for f in fixtures(v) {
        let (Some(local), Some(bin), Some(js)) = (
            summary(&f["in_process_ms"]),
            summary(&f["http_binary_ms"]),
            summary(&f["http_json_ms"]),
        ) else {
            continue;
        };
        let unix = summary(&f["unix_binary_ms"]);
        let name = f["fixture"].as_str().unwrap_or("?");
        let engine = f["engine"].as_str().unwrap_or("tract");
        let (best, via) = match &unix {
            Some(u) if u.p50 < bin.p50 => (u.p50, "Unix socket"),
            _ => (bin.p50, "TCP"),
        };
        let (goal, met, by) = if local.p50 >= 1.0 {
            let r = best / local.p50;
            ("≤ 1.05×", r <= 1.05, format!("{r:.2}× vs 1.05×, {via}"))
        } else {
            let d = (best - local.p50) * 1e3;
            (
                "≤ +100 µs",
                d <= 100.0,
                format!("+{d:.0} µs vs +100 µs, {via}"),
            )
        };
        verdicts.push((
            format!("{name} on {engine}"),
            met,
            by.clone(),
            js.p50 / local.p50,
        ));
        let (unix_cell, unix_ratio, unix_diff) = match &unix {
            Some(u) => (
                format!("{} / {:.2}", spread(u, 2), u.p99),
                ratio(u.p50, local.p50),
                format!("{:+.0} µs", (u.p50 - local.p50) * 1e3),
            ),
            None => ("not measured".to_owned(), String::new(), String::new()),
        };
        let router = summary(&f["router_binary_ms"]);
        let router_diff = router.as_ref().map_or_else(String::new, |r| {
            format!("{:+.0} µs", (r.p50 - local.p50) * 1e3)
        });
        if let (Some(r), Some(u)) = (&router, &unix) {
            parts.push((
                (r.p50 - local.p50) * 1e3,
                (bin.p50 - local.p50) * 1e3,
                (u.p50 - local.p50) * 1e3,
                r.p50 / local.p50,
            ));
        }
        let _ = writeln!(
            md,
            "| {name} | {engine} | {:.0} KiB / {:.0} KiB | {} / {:.2} | {} / {:.2} | {} / {} | {:+.0} µs | {unix_cell} | {unix_ratio} | {unix_diff} | {router_diff} | {} | {} | {goal}: {} ({by}) |",
            f["json_request_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            f["binary_request_bytes"].as_f64().unwrap_or(0.0) / 1024.0,
            spread(&local, 2),
            local.p99,
            spread(&bin, 2),
            bin.p99,
            ratio(bin.p50, local.p50),
            ratio(bin.p99, local.p99),
            (bin.p50 - local.p50) * 1e3,
            spread(&js, 2),
            ratio(js.p50, local.p50),
            if met { "**met**" } else { "**missed**" },
        );
    }
    let serve_crit: Vec<String> = crit
        .iter()
        .filter(|(k, _)| k.starts_with("serve/"))
        .map(|(k, s)| format!("`{k}` {:.3} ms", s.p50 / 1e6))
        .collect();
    if !serve_crit.is_empty() {
        let _ = writeln!(
            md,
            "\nThe same comparison as criterion micro-benchmarks (`cargo bench -p botfleet-agent --bench serve`, median per iteration): {}.",
            serve_crit.join("; ")
        );
    }
    let missed: Vec<&(String, bool, String, f64)> = verdicts.iter().filter(|v| !v.1).collect();
    let _ = writeln!(
        md,
        "\n{}",
        if missed.is_empty() {
            "Every model meets its goal over the binary extension on every engine.".to_owned()
        } else {
            format!(
                "Missed: {}.",
                missed
                    .iter()
                    .map(|m| format!("{} ({})", m.0, m.2))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
    );
    if !parts.is_empty() {
        let range = |f: fn(&(f64, f64, f64, f64)) -> f64| {
            let lo = parts.iter().map(f).fold(f64::INFINITY, f64::min);
            let hi = parts.iter().map(f).fold(f64::NEG_INFINITY, f64::max);
            (lo, hi)
        };
        let (r_lo, r_hi) = range(|p| p.0);
        let (x_lo, x_hi) = range(|p| p.3);
        let (t_lo, t_hi) = range(|p| p.1 - p.0);
        let (u_lo, u_hi) = range(|p| p.2 - p.0);
        let (s_lo, s_hi) = range(|p| p.1 - p.2);
        let _ = writeln!(
            md,
            "Where the time goes (medians, per row): the agent's own work (body read as its \
             chunks, header parsed, tensors decoded straight from the chunks, the hop to a \
             blocking thread, outputs encoded and answered as two chunks) adds {r_lo:+.0} to \
             {r_hi:+.0} µs, {x_lo:.2}–{x_hi:.2}× in-process; the transport adds {t_lo:+.0} to \
             {t_hi:+.0} µs more over loopback TCP and {u_lo:+.0} to {u_hi:+.0} µs over the Unix \
             socket, which saves {s_lo:+.0} to {s_hi:+.0} µs against TCP. The transport's share \
             is the kernel copying the request into and out of the socket and the HTTP client \
             (reqwest) building the request and reading the answer, on the same 2 cores as the \
             model; the figures move by ±150 µs between runs on this shared machine, so rows \
             within that of the goal are within noise. What is left is mostly not the agent's: \
             the next lever is a transport that does not carry the tensor at all, the OIP v2 \
             system shared-memory extension (the client registers a region once and names it \
             per request), for clients that can use it.\n"
        );
    }
    let _ = writeln!(
        md,
        "JSON tensors cost {}× in-process at p50 across the rows: numbers as text are 2–3× the bytes and need parsing; clients that send images should use the binary extension.\n",
        verdicts
            .iter()
            .map(|v| format!("{:.2}", v.3))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    for (name, met, by, _) in &verdicts {
        heads.push(format!(
            "Serving {name} over binary tensors: {by} ({})",
            if *met { "met" } else { "missed" }
        ));
    }
}

/// The python peer's figures of one fixture: this run's format, else the older `ort.json`.
fn peer_of(f: &Value, ort: &Value) -> Option<Summary> {
    summary(&f["peer"]["ms"]).or_else(|| {
        let old = fixtures(ort)
            .iter()
            .find(|o| o["fixture"] == f["fixture"])?;
        summary(&old["ort_1_thread_ms"])
    })
}

pub fn engine(md: &mut String, v: &Value, ort: &Value, crit: &Crit, heads: &mut Vec<String>) {
    let peer_version = v["peer_onnxruntime"]
        .as_str()
        .or_else(|| ort["onnxruntime"].as_str())
        .unwrap_or("(not run)");
    let ours = v["onnxruntime"]["version"].as_str().unwrap_or("(not run)");
    let _ = writeln!(
        md,
        "## 2. Engine vs peer: tract, botfleet's ONNX Runtime backend, python onnxruntime; tract 2 threads vs 1\n\n\
         `botfleet-bench engine` runs three engines on each fixture's reference input, one thread \
         each, timed per run and interleaved run by run (the first of each round rotating): \
         tract as the agent runs it (single-threaded executor, optimised plan); botfleet's ONNX \
         Runtime CPU backend (`Engines::load(OnnxruntimeCpu, …)`, the `ort` crate on the \
         library `libonnxruntime.so` {ours} of `bench/.venv`, one intra-op thread, {} sessions \
         per model as the agent's default); and python onnxruntime {peer_version}'s own \
         session (`bench/ort_peer.py`, a child process given the same input files: \
         `intra_op_num_threads=1`, sequential, CPU provider, default graph optimisations, its \
         runs timed inside python around `session.run`). 5 warm-up runs each, then the same \
         number of rounds. Max abs diff: botfleet's ONNX Runtime outputs against tract's and \
         against python's. Goal: botfleet-ort ÷ python-ort ≤ {ORT_GOAL:.2}× at one thread (the \
         same library: what is left is the binding). 2 threads vs 1: criterion \
         (`cargo bench -p botfleet-engine --features multithread`), tract's multithreaded matmul \
         executor with a 2-thread pool. Times in ms.\n",
        v["onnxruntime_settings"]["sessions"].as_u64().unwrap_or(2),
    );
    if v.is_null() {
        return not_run(md, "engine");
    }
    missing(md, v);
    let _ = writeln!(
        md,
        "| fixture | rounds | tract 1 thread | botfleet onnxruntime-cpu | python onnxruntime | botfleet-ort ÷ python-ort (goal ≤ {ORT_GOAL:.2}×) | tract ÷ botfleet-ort | tract ÷ python-ort | max abs diff botfleet-ort vs tract / vs python | tract 2 threads ÷ 1 (criterion medians) |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let mut misses = Vec::new();
    for f in fixtures(v) {
        let name = f["fixture"].as_str().unwrap_or("?");
        let Some(tract) = summary(&f["tract_1_thread_ms"]) else {
            continue;
        };
        let ours = summary(&f["onnxruntime_cpu"]["ms"]);
        let peer = peer_of(f, ort);
        let one = crit.get(&format!("engine/{name}/tract_1_thread"));
        let two = crit.get(&format!("engine/{name}/tract_2_threads"));
        let threads = match (one, two) {
            (Some(a), Some(b)) => format!(
                "{:.2} / {:.2} ms = {}",
                b.p50 / 1e6,
                a.p50 / 1e6,
                ratio(b.p50, a.p50)
            ),
            _ => "not run".into(),
        };
        let shown = |s: Option<Summary>, why: &Value| {
            s.map_or_else(
                || {
                    why.as_str()
                        .map_or("not run".into(), |w| format!("not run ({w})"))
                },
                |s| spread(&s, 2),
            )
        };
        let goal = match (ours, peer) {
            (Some(o), Some(p)) => {
                let r = o.p50 / p.p50;
                let met = r <= ORT_GOAL;
                heads.push(format!(
                    "botfleet onnxruntime-cpu ÷ python onnxruntime on {name}: {r:.2}× (goal ≤ {ORT_GOAL:.2}×: {})",
                    if met { "met" } else { "missed" }
                ));
                if !met {
                    misses.push(format!("{name} ({r:.2}×)"));
                }
                format!("**{r:.2}×** {}", if met { "met" } else { "missed" })
            }
            _ => "–".into(),
        };
        if let Some(o) = ours {
            heads.push(format!(
                "tract ÷ botfleet onnxruntime-cpu on {name}: {}",
                ratio(tract.p50, o.p50)
            ));
        }
        let diffs = format!(
            "{} / {}",
            diff(&f["onnxruntime_cpu"]["max_abs_diff_vs_tract"]),
            diff(&f["peer"]["max_abs_diff_vs_botfleet_ort"]),
        );
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {goal} | {} | {} | {diffs} | {threads} |",
            f["runs"].as_u64().unwrap_or(0),
            spread(&tract, 2),
            shown(ours, &f["onnxruntime_cpu"]["error"]),
            shown(peer, &f["peer"]["error"]),
            ours.map_or("–".into(), |o| ratio(tract.p50, o.p50)),
            peer.map_or("–".into(), |p| ratio(tract.p50, p.p50)),
        );
        if let (Some(a), Some(b)) = (one, two) {
            heads.push(format!(
                "tract 2 threads ÷ 1 on {name}: {}",
                ratio(b.p50, a.p50)
            ));
        }
    }
    let _ = writeln!(
        md,
        "\n{}\n",
        if misses.is_empty() {
            format!(
                "botfleet's ONNX Runtime backend runs within {ORT_GOAL:.2}× of python \
                 onnxruntime's own session on every fixture: the binding (input checks, one copy \
                 into ONNX Runtime's tensors, one copy of the outputs out, the session pool's \
                 lock) costs little against the library's kernels."
            )
        } else {
            format!(
                "Goal missed on {}. The library and its kernels are the same; what differs is \
                 the binding around them (input checks and one copy into ONNX Runtime's tensors, \
                 the outputs copied out, the session pool's lock: sequential runs all use its \
                 first session, as python's one session); the session options are \
                 python's defaults (`ORT_ENABLE_ALL`, one intra-op thread, sequential). On a \
                 shared 2-core machine a few per cent is also within the noise of one run.",
                misses.join(", ")
            )
        }
    );
    let _ = writeln!(
        md,
        "Where tract is behind, ONNX Runtime's advantage is its hand-tuned convolution and \
         quantized kernels (the INT8 QDQ model especially: tract runs it slower than the float \
         one on x86). Both are engines of the same `Model` API now: the rollout gate benchmarks \
         the engines a robot has on the robot and picks per model.\n"
    );
    let slower: Vec<f64> = fixtures(v)
        .iter()
        .filter_map(|f| {
            let name = f["fixture"].as_str()?;
            let one = crit.get(&format!("engine/{name}/tract_1_thread"))?;
            let two = crit.get(&format!("engine/{name}/tract_2_threads"))?;
            Some(two.p50 / one.p50)
        })
        .collect();
    if !slower.is_empty() {
        let _ = writeln!(
            md,
            "tract's 2-thread matmul executor took {} one thread's time here ({}): on 2 shared \
             cores the second thread competes with everything else, and splitting these \
             models' small matmuls likely costs more than it saves. It stays \
             an opt-in feature (`botfleet-engine/multithread`), to be measured on the robot's \
             own cores before use.\n",
            if slower.iter().all(|r| *r > 1.0) {
                "longer than, on every model,"
            } else {
                "mixed figures against"
            },
            slower
                .iter()
                .map(|r| format!("{r:.2}×"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// `load + first run` of one load record, in ms.
fn load_total(v: &Value) -> Option<f64> {
    Some(v["load_ms"].as_f64()? + v["first_run_ms"].as_f64()?)
}

pub fn gpu(md: &mut String, v: &Value, heads: &mut Vec<String>) {
    let _ = writeln!(
        md,
        "## 8. GPU engines: ONNX Runtime's CUDA and TensorRT providers\n\n\
         `bench/gpu-check.sh` (`botfleet-bench gpu`), on a machine with an NVIDIA GPU: each \
         fixture on each GPU engine, against botfleet's ONNX Runtime CPU backend and tract, all \
         interleaved run by run. Accuracy: largest absolute difference to the onnxruntime \
         references (`tests/fixtures/reference`, where the fixture has one) and to the CPU \
         backend's outputs on the fixture's input. TensorRT engine build: \"cold\" is the first \
         load with an empty cache plus the first inference (TensorRT builds at one or the other); \
         \"warm after restart\" is the same load from the same cache in a fresh process. Times \
         in ms.\n"
    );
    if v.is_null() {
        return not_run(
            md,
            "gpu: run bench/gpu-check.sh on a machine with an NVIDIA GPU",
        );
    }
    let info = &v["engines_info"];
    let _ = writeln!(
        md,
        "ONNX Runtime {} ({}); CUDA {}; TensorRT {}; engines available: {}.\n",
        info["onnxruntime"]["version"]
            .as_str()
            .unwrap_or("not loaded"),
        info["onnxruntime"]["providers"]
            .as_array()
            .map(|p| p
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
        info["cuda"].as_str().unwrap_or("not found"),
        info["tensorrt"].as_str().unwrap_or("not found"),
        info["available"]
            .as_array()
            .map(|p| p
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default(),
    );
    if let Some(why) = v["unavailable"].as_object().filter(|m| !m.is_empty()) {
        for (engine, reason) in why {
            let _ = writeln!(
                md,
                "- **{engine} not measured**: {}",
                reason.as_str().unwrap_or("?")
            );
        }
        let _ = writeln!(md);
    }
    if fixtures(v).is_empty() {
        return not_run(md, "no fixture measured");
    }
    let _ = writeln!(
        md,
        "| fixture | engine | p50 (IQR) / p99 | ÷ onnxruntime-cpu p50 | ÷ tract p50 | reference error | max abs diff vs onnxruntime-cpu | cold: load + first run | warm after restart: load + first run | TensorRT cache |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for f in fixtures(v) {
        let name = f["fixture"].as_str().unwrap_or("?");
        let Some(engines) = f["engines"].as_object() else {
            continue;
        };
        let p50 = |e: &str| summary(&engines.get(e)?["ms"]).map(|s| s.p50);
        let (cpu, tract) = (p50("onnxruntime-cpu"), p50("tract"));
        for (engine, e) in engines {
            if let Some(err) = e["error"].as_str() {
                let _ = writeln!(md, "| {name} | {engine} | failed: {err} | | | | | | | |");
                continue;
            }
            let Some(s) = summary(&e["ms"]) else {
                continue;
            };
            let vs = |base: Option<f64>| base.map_or("–".into(), |b| ratio(s.p50, b));
            let cold = load_total(&e["cold"]);
            let warm = &e["warm_after_restart"];
            let warm_text = match (load_total(warm), warm["error"].as_str()) {
                (Some(w), _) => format!(
                    "{w:.0} ({}; process {:.0}, probe {:.0})",
                    cold.map_or("–".into(), |c| format!("{:.2}× cold", w / c)),
                    warm["process_ms"].as_f64().unwrap_or(0.0),
                    warm["probe_ms"].as_f64().unwrap_or(0.0)
                ),
                (None, Some(err)) => format!("failed: {err}"),
                _ => "–".into(),
            };
            let cache = match e["cache"]["files"].as_u64() {
                Some(n) => format!(
                    "{n} files, {:.1} MiB",
                    e["cache"]["bytes"].as_f64().unwrap_or(0.0) / 1048576.0
                ),
                None => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {name} | {engine} | {} / {:.3} | {} | {} | {} | {} | {} | {warm_text} | {cache} |",
                spread(&s, 3),
                s.p99,
                vs(cpu),
                vs(tract),
                diff(&e["reference_error"]),
                diff(&e["max_abs_diff_vs_onnxruntime_cpu"]),
                cold.map_or("–".into(), |c| format!("{c:.0}")),
            );
            if engine.contains("cuda") || engine.contains("tensorrt") {
                heads.push(format!(
                    "{engine} on {name}: p50 {:.3} ms, {} the CPU backend, {} tract",
                    s.p50,
                    vs(cpu),
                    vs(tract)
                ));
            }
        }
    }
    let _ = writeln!(md);
}
