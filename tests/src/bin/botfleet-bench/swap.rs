//! Hot swap under load: a client at a fixed rate on one slot (open loop: each request is
//! timed from when it was due, so a stall shows as latency) while the slot's model is
//! reloaded and swapped between the float and INT8 fixture, as the agent does after a
//! rollout (load on the agent's loader thread, then one pointer swap). The steady window
//! before it flips the slot between the two models already loaded, so both windows serve
//! the same mix and differ only by the loads. The same run once
//! with the load on an ordinary blocking thread shows what the loader's low priority buys.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use botfleet_agent::bench::local_serving;
use botfleet_agent::slots::Slots;
use botfleet_engine::Model;
use botfleet_protocol::SlotName;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use crate::fixtures::Fixture;
use crate::serving::{Bodies, bodies, post, serve};
use crate::stats::Summary;

/// One answered (or failed) request: when it was due, its latency, the version that answered.
pub struct Answer {
    pub due: Instant,
    pub done: Instant,
    pub version: Option<String>,
}

/// What a client saw in windows with a feature off and on: requests failed, requests
/// answered by another model than `serving`, and the latencies (due to done, ms) of the
/// requests due in the off and in the on windows.
pub struct Windowed {
    pub failed: usize,
    pub changed: usize,
    pub off_ms: Vec<f64>,
    pub on_ms: Vec<f64>,
}

impl Windowed {
    /// `windows`: (start, end, on) of each window.
    pub fn of(answers: &[Answer], windows: &[(Instant, Instant, bool)]) -> Self {
        let in_windows = |on: bool| -> Vec<f64> {
            answers
                .iter()
                .filter(|a| {
                    windows
                        .iter()
                        .any(|(s, e, w)| *w == on && a.due >= *s && a.due < *e)
                })
                .map(|a| (a.done - a.due).as_secs_f64() * 1e3)
                .collect()
        };
        Self {
            failed: answers.iter().filter(|a| a.version.is_none()).count(),
            changed: answers
                .iter()
                .filter(|a| a.version.as_deref().is_some_and(|v| v != "serving"))
                .count(),
            off_ms: in_windows(false),
            on_ms: in_windows(true),
        }
    }
}

/// Serves `slots` on loopback and warms the slot `bench` up with five binary requests of
/// `f`'s input: the infer URL, the request bodies and the client.
pub async fn serve_warm(
    slots: &Arc<Slots>,
    f: &Fixture,
) -> Result<(String, Arc<Bodies>, reqwest::Client)> {
    let url = format!("{}/v2/models/bench/infer", serve(Arc::clone(slots)).await?);
    let b = Arc::new(bodies(&f.input)?);
    let http = reqwest::Client::new();
    for _ in 0..5 {
        post(&http, &url, &b.binary, Some(b.header_len))
            .await?
            .bytes()
            .await?;
    }
    Ok((url, b, http))
}

/// Stops the open-loop client half a second from now and collects every answer, the last
/// requests given 2 s to finish.
pub async fn finish(
    stop: &tokio_util::sync::CancellationToken,
    client: tokio::task::JoinHandle<()>,
    rx: &mut mpsc::UnboundedReceiver<Answer>,
) -> Result<Vec<Answer>> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    client.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut answers = Vec::new();
    while let Ok(a) = rx.try_recv() {
        answers.push(a);
    }
    Ok(answers)
}

/// An open-loop client: one request every `1 / rate` s (each timed from when it was due,
/// so a stall shows as latency), each answer sent to `tx`, until `stop`.
pub fn open_loop(
    url: &str,
    b: &Arc<Bodies>,
    http: &reqwest::Client,
    rate: f64,
    stop: &tokio_util::sync::CancellationToken,
    tx: mpsc::UnboundedSender<Answer>,
) -> tokio::task::JoinHandle<()> {
    let (_, urls) = watch::channel(url.to_owned());
    open_loop_to(urls, b, http, rate, stop, tx)
}

/// [`open_loop`] to whichever URL `urls` holds when each request is due (a benchmark
/// switches the client between two servers without a gap in its ticks).
pub fn open_loop_to(
    urls: watch::Receiver<String>,
    b: &Arc<Bodies>,
    http: &reqwest::Client,
    rate: f64,
    stop: &tokio_util::sync::CancellationToken,
    tx: mpsc::UnboundedSender<Answer>,
) -> tokio::task::JoinHandle<()> {
    let (stop, b, http) = (stop.clone(), Arc::clone(b), http.clone());
    tokio::spawn(async move {
        let period = Duration::from_secs_f64(1.0 / rate);
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                due = ticks.tick() => {
                    let url = urls.borrow().clone();
                    let (tx, b, http) = (tx.clone(), Arc::clone(&b), http.clone());
                    tokio::spawn(async move {
                        let version = async {
                            let r = post(&http, &url, &b.binary, Some(b.header_len)).await?;
                            let len: usize = r.headers().get("inference-header-content-length")
                                .and_then(|v| v.to_str().ok()?.parse().ok()).context("no header length")?;
                            let body = r.bytes().await?;
                            let head: Value = serde_json::from_slice(&body[..len.min(body.len())])?;
                            Ok::<_, anyhow::Error>(head["model_version"].as_str().unwrap_or_default().to_owned())
                        }.await.ok();
                        let _ = tx.send(Answer { due: due.into_std(), done: Instant::now(), version });
                    });
                }
            }
        }
    })
}

/// Median of a few in-process runs of `f`.
pub fn one_run(f: &Fixture) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..7 {
        let input = f.input.clone();
        let t = Instant::now();
        f.model.run(input)?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[3])
}

/// How often the steady window flips between the two loaded models (about one load).
const FLIP_EVERY: Duration = Duration::from_millis(100);

/// Where the next model is loaded.
#[derive(Debug, Clone, Copy)]
pub enum Loader {
    /// `botfleet_agent::loader`: its own thread at nice 19, as the agent does.
    Agent,
    /// A tokio blocking thread at the process's priority (the agent before the loader).
    NormalPriority,
}

pub async fn run(
    float: &Fixture,
    int8: &Fixture,
    swaps: usize,
    rate: f64,
    steady: Duration,
    loader: Loader,
) -> Result<Value> {
    let slot = SlotName::new("bench")?;
    // Both fixtures, loaded once: the slot starts on the float one, and the steady window
    // flips between the two.
    let preloaded = [
        Arc::new(local_serving(
            slot.clone(),
            float.model.clone(),
            &float.bytes,
            "float-0",
        )?),
        Arc::new(local_serving(
            slot.clone(),
            int8.model.clone(),
            &int8.bytes,
            "int8-0",
        )?),
    ];
    let slots = Arc::new(Slots::default());
    slots.swap(&slot, Arc::clone(&preloaded[0]));
    let (url, b, http) = serve_warm(&slots, float).await?;

    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let stop = tokio_util::sync::CancellationToken::new();
    let client = open_loop(&url, &b, &http, rate, &stop, tx);

    // The steady window serves the same mix of models as the swapping one: the slot flips
    // between the two already loaded fixtures (pointer swaps, no load), so what the
    // comparison shows is the cost of loading, not that the INT8 model is slower.
    let steady_ends = Instant::now() + steady;
    let mut flips = 0usize;
    while Instant::now() < steady_ends {
        flips += 1;
        slots.swap(&slot, Arc::clone(&preloaded[flips % 2]));
        tokio::time::sleep(FLIP_EVERY).await;
    }
    slots.swap(&slot, Arc::clone(&preloaded[0]));
    drop(preloaded);
    let swaps_started = Instant::now();
    let mut swap_at = Vec::with_capacity(swaps);
    let mut load_ms = Vec::with_capacity(swaps);
    let mut swap_us = Vec::with_capacity(swaps);
    for i in 1..=swaps {
        let (f, kind) = if i % 2 == 1 {
            (int8, "int8")
        } else {
            (float, "float")
        };
        let (bytes, specs) = (f.bytes.clone(), f.specs.clone());
        let t = Instant::now();
        // Load and warm up (one inference), as the agent does before a model takes traffic.
        let load = move || {
            let model = Model::load(&bytes, &specs)?;
            botfleet_agent::rollout::warm_up(&model, 0)?;
            Ok::<_, botfleet_engine::EngineError>(model)
        };
        let model = match loader {
            Loader::Agent => botfleet_agent::loader::in_background(load).await??,
            Loader::NormalPriority => tokio::task::spawn_blocking(load).await??,
        };
        load_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let version = format!("{kind}-{i}");
        let serving = local_serving(slot.clone(), model, &f.bytes, &version)?;
        let serving = Arc::new(serving);
        let t = Instant::now();
        slots.swap(&slot, serving);
        swap_us.push(t.elapsed().as_secs_f64() * 1e6);
        swap_at.push((Instant::now(), version));
    }
    let swaps_ended = Instant::now();
    let answers = finish(&stop, client, &mut rx).await?;
    let failed = answers.iter().filter(|a| a.version.is_none()).count();
    let latency = |a: &Answer| (a.done - a.due).as_secs_f64() * 1e3;
    let steady_ms: Vec<f64> = answers
        .iter()
        .filter(|a| a.due < swaps_started)
        .map(latency)
        .collect();
    let during_ms: Vec<f64> = answers
        .iter()
        .filter(|a| a.due >= swaps_started && a.due <= swaps_ended)
        .map(latency)
        .collect();
    // From each swap to the first answer by the new version (bounded below by the
    // request period: it is when the next request happens to come).
    let first_answer: Vec<f64> = swap_at
        .iter()
        .filter_map(|(at, version)| {
            answers
                .iter()
                .filter(|a| a.version.as_deref() == Some(version.as_str()))
                .map(|a| a.done)
                .min()
                .map(|first| first.saturating_duration_since(*at).as_secs_f64() * 1e3)
        })
        .collect();
    println!("swap: {} requests, {failed} failed", answers.len());
    Ok(json!({
        "loader": format!("{loader:?}"),
        "float": float.name,
        "int8": int8.name,
        "rate_per_s": rate,
        "swaps": swaps,
        "requests": answers.len(),
        "failed": failed,
        "steady_ms": Summary::of(&steady_ms),
        "during_swaps_ms": Summary::of(&during_ms),
        "swap_gap_us": Summary::of(&swap_us),
        "new_version_first_answer_ms": Summary::of(&first_answer),
        "load_ms": Summary::of(&load_ms),
        "swapping_s": (swaps_ended - swaps_started).as_secs_f64(),
    }))
}
