//! Shadow inference under load: the same open-loop client as the swap section on one slot
//! serving the float fixture, in alternating windows with the shadow off and on (the INT8
//! fixture as the candidate, every request copied, run on the agent's loader thread at
//! nice 19 and compared, as the agent does). Both windows serve the same model, so what
//! differs is the copy on the serving path and the candidate competing for the CPU.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use botfleet_agent::bench::local_serving;
use botfleet_agent::shadow::{self, Tap};
use botfleet_agent::slots::Slots;
use botfleet_protocol::SlotName;
use botfleet_protocol::messages::ShadowSpec;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::fixtures::Fixture;
use crate::stats::Summary;
use crate::swap::{Answer, Windowed, finish, open_loop, serve_warm};

pub async fn run(
    serving: &Fixture,
    candidate: &Fixture,
    rate: f64,
    window: Duration,
    rounds: usize,
) -> Result<Value> {
    let slot = SlotName::new("bench")?;
    let model = local_serving(
        slot.clone(),
        serving.model.clone(),
        &serving.bytes,
        "serving",
    )?;
    let slots = Arc::new(Slots::default());
    slots.swap(&slot, Arc::new(model));
    let (url, b, http) = serve_warm(&slots, serving).await?;
    let spec: ShadowSpec = serde_json::from_value(json!({
        "requests": u32::MAX, "seconds": window.as_secs() + 60, "min_agreement": 0.0
    }))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Answer>();
    let stop = tokio_util::sync::CancellationToken::new();
    let client = open_loop(&url, &b, &http, rate, &stop, tx);

    // (start, end, shadow on) of each window, off and on alternating.
    let mut windows = Vec::new();
    let (mut compared, mut dropped, mut agreed) = (0u64, 0u64, 0u64);
    for round in 0..rounds * 2 {
        let on = round % 2 == 1;
        let start = Instant::now();
        if on {
            let (tap, samples) = Tap::new(&spec);
            let tap = Arc::new(tap);
            slots.set_shadow(&slot, Some(Arc::clone(&tap)));
            let (model, spec) = (candidate.model.clone(), spec.clone());
            let worker = tokio::spawn(botfleet_agent::loader::in_background(move || {
                shadow::run(&model, &spec, &samples)
            }));
            tokio::time::sleep(window).await;
            // The tap gone, the shadow ends after the copy it is running.
            slots.set_shadow(&slot, None);
            windows.push((start, Instant::now(), on));
            dropped += tap.dropped();
            drop(tap);
            let tally = worker.await??;
            compared += u64::from(tally.samples);
            agreed += u64::from(tally.agreed);
        } else {
            tokio::time::sleep(window).await;
            windows.push((start, Instant::now(), on));
        }
    }
    let answers = finish(&stop, client, &mut rx).await?;
    let Windowed {
        failed,
        changed,
        off_ms,
        on_ms,
    } = Windowed::of(&answers, &windows);
    println!(
        "shadow: {} requests, {failed} failed, {compared} compared",
        answers.len()
    );
    Ok(json!({
        "serving": serving.name,
        "candidate": candidate.name,
        "rate_per_s": rate,
        "window_s": window.as_secs_f64(),
        "rounds": rounds,
        "requests": answers.len(),
        "failed": failed,
        "changed": changed,
        "off_ms": Summary::of(&off_ms),
        "on_ms": Summary::of(&on_ms),
        "compared": compared,
        "agreed": agreed,
        "dropped": dropped,
    }))
}
