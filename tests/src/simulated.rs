//! Simulated agents for fleet tests: each is one MQTT session that speaks the real
//! protocol (retained info and status with a last will, the desired topic, one event per
//! stage) without downloading or running anything. Manifests are verified with the
//! server's key like a real agent does; behaviour is configurable per device.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use botfleet_protocol::messages::{Command, CommandKind, Desired};
use botfleet_protocol::{DeviceId, ExpiryCheck, TopicKind, Topics, TrustedKeys};
use rumqttc::{AsyncClient, Event as MqttEvent, LastWill, Packet, QoS};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// How a simulated device answers a new desired model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Behaviour {
    /// Every stage, then active; the benchmark reports `p99_ms`.
    Succeed { p99_ms: f64 },
    /// Benchmarks, misses the gate, rejects.
    FailGate,
    /// Waits this long before answering at all.
    Slow(Duration),
}

/// One simulated device; dropping it cuts its connection (the broker sends its last will).
#[derive(Debug)]
pub struct SimAgent {
    pub id: String,
    task: JoinHandle<()>,
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a simulated device serves per slot: (sha256 hex, release, p99), and before that.
#[derive(Debug, Default, Clone)]
struct Serving {
    now: BTreeMap<String, (String, u64, f64)>,
    before: BTreeMap<String, (String, u64, f64)>,
}

impl SimAgent {
    /// Connects `device` to the broker at `mqtt_url` and serves until dropped.
    pub async fn start(
        mqtt_url: &str,
        prefix: &str,
        device: &str,
        trusted_key: &str,
        labels: &[(&str, &str)],
        behaviour: Behaviour,
    ) -> Result<Self> {
        let topics = Topics::new(prefix)?;
        let id = DeviceId::new(device)?;
        let status_topic = topics.device(&id, TopicKind::Status);
        let mut options = crate::watch::mqtt_options(mqtt_url, device)?;
        // Long enough that a simulator process starved of CPU by its neighbours (fleets of
        // 100,000 on 2 cores) does not miss its pings and lose the session.
        options.set_keep_alive(Duration::from_secs(30));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let will = json!({"online": false, "agent_version": "sim", "at": jiff::Timestamp::now()});
        options.set_last_will(LastWill::new(
            &status_topic,
            will.to_string(),
            QoS::AtLeastOnce,
            true,
        ));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let trusted = TrustedKeys::parse([trusted_key])?;
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        // Wait for the session before returning, so the caller may roll out at once.
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let MqttEvent::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                    return Ok::<(), anyhow::Error>(());
                }
            }
        })
        .await
        .context("no CONNACK within 20 s")??;
        let info = json!({"agent_version": "sim", "hostname": device, "arch": "aarch64",
            "cpu_cores": 4, "memory_total_bytes": 8u64 << 30, "labels": labels});
        client
            .publish(
                topics.device(&id, TopicKind::Info),
                QoS::AtLeastOnce,
                true,
                info.to_string(),
            )
            .await?;
        let mut serving = Serving::default();
        publish_status(&client, &status_topic, &serving, None).await?;
        client
            .subscribe(topics.device(&id, TopicKind::Desired), QoS::AtLeastOnce)
            .await?;
        client
            .subscribe(topics.device(&id, TopicKind::Commands), QoS::AtLeastOnce)
            .await?;
        let events_topic = topics.device(&id, TopicKind::Events);
        let device_id = device.to_owned();
        let task = tokio::spawn(async move {
            let mut generation = 0u64;
            let _keep = &client;
            loop {
                let event = match eventloop.poll().await {
                    Ok(event) => event,
                    Err(e) => {
                        // The device stays silent from here on: say so, where a fleet of
                        // them would otherwise just leave it pending.
                        eprintln!("simulated device {device_id}: session lost: {e}");
                        return;
                    }
                };
                let MqttEvent::Incoming(Packet::Publish(p)) = event else {
                    continue;
                };
                if let Ok(command) = serde_json::from_slice::<Command>(&p.payload) {
                    // A simulated robot checks no signature: it only plays the swap back.
                    let slot = match command.kind {
                        CommandKind::Rollback { slot, .. } => Some(slot),
                        CommandKind::SignedRollback { order } => order.claims().map(|o| o.slot),
                        // A simulated robot captures nothing: capture orders are ignored.
                        CommandKind::SignedCapture { .. } => None,
                        _ => None,
                    };
                    if let Some(slot) = slot
                        && let Some(old) = serving.before.remove(slot.as_str())
                    {
                        if let Some(taken_out) = serving.now.insert(slot.to_string(), old) {
                            serving.before.insert(slot.to_string(), taken_out);
                        }
                        if publish_status(&client, &status_topic, &serving, None)
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    continue;
                }
                let Ok(desired) = serde_json::from_slice::<Desired>(&p.payload) else {
                    continue;
                };
                if desired.generation <= generation {
                    continue;
                }
                generation = desired.generation;
                let ctx = Ctx {
                    client: &client,
                    events: &events_topic,
                    status: &status_topic,
                    device: &device_id,
                };
                if react(&ctx, &trusted, &desired, &mut serving, behaviour)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Self {
            id: device.to_owned(),
            task,
        })
    }
}

struct Ctx<'a> {
    client: &'a AsyncClient,
    events: &'a str,
    status: &'a str,
    device: &'a str,
}

async fn publish_status(
    client: &AsyncClient,
    topic: &str,
    serving: &Serving,
    generation: Option<u64>,
) -> Result<()> {
    let now = jiff::Timestamp::now();
    let active: BTreeMap<&String, Value> = serving
        .now
        .iter()
        .map(|(slot, (sha, release, _))| {
            (slot, json!({"name": slot, "version": release.to_string(), "release": release, "sha256": sha, "since": now}))
        })
        .collect();
    let mut status = json!({"online": true, "agent_version": "sim", "active": active, "at": now});
    if let Some(g) = generation {
        status["desired_generation"] = json!(g);
    }
    client
        .publish(topic, QoS::AtLeastOnce, true, status.to_string())
        .await?;
    Ok(())
}

/// Answers one desired document: one event per stage for each slot that changed.
async fn react(
    ctx: &Ctx<'_>,
    trusted: &TrustedKeys,
    desired: &Desired,
    serving: &mut Serving,
    behaviour: Behaviour,
) -> Result<()> {
    if let Behaviour::Slow(delay) = behaviour {
        tokio::time::sleep(delay).await;
    }
    let mut changed = false;
    // A slot the server took out: go back to what served before (a roll-back to nothing).
    let gone: Vec<String> = serving
        .now
        .keys()
        .filter(|s| !desired.slots.keys().any(|d| d.as_str() == s.as_str()))
        .cloned()
        .collect();
    for slot in gone {
        serving.now.remove(&slot);
        changed = true;
    }
    for (slot, model) in &desired.slots {
        let manifest = model
            .manifest
            .verify(trusted, ExpiryCheck::At(jiff::Timestamp::now()))?
            .into_inner();
        let sha = manifest.artifact.sha256.to_hex();
        let current = serving.now.get(slot.as_str()).cloned();
        if current.as_ref().is_some_and(|(s, _, _)| *s == sha) {
            continue;
        }
        let event = |stage: Value| {
            let mut e = json!({"device": ctx.device, "slot": slot, "sha256": sha,
                "release": manifest.release, "at": jiff::Timestamp::now()});
            if let Some(r) = &model.rollout_id {
                e["rollout_id"] = json!(r);
            }
            if let (Value::Object(e), Value::Object(s)) = (&mut e, stage) {
                e.extend(s);
            }
            e.to_string()
        };
        // A roll-back to the model served before: swap back, no download.
        let back = serving
            .before
            .get(slot.as_str())
            .filter(|(s, _, _)| *s == sha)
            .cloned();
        let incumbent = current.as_ref().map(|(_, _, p99)| *p99);
        let mut stages = vec![json!({"stage": "received"})];
        let p99 = match (back, behaviour) {
            (Some((_, _, p99)), _) => Some(p99),
            (None, Behaviour::FailGate) => {
                stages.push(bench(50.0, incumbent, false));
                stages.push(json!({"stage": "rejected", "reason": "gate_missed",
                    "message": "p99 50 ms over the budget"}));
                None
            }
            (None, Behaviour::Succeed { p99_ms }) => {
                stages.push(json!({"stage": "verified", "key_ids": []}));
                stages.push(
                    json!({"stage": "downloaded", "bytes": manifest.artifact.size, "millis": 1}),
                );
                stages.push(json!({"stage": "loaded", "millis": 1}));
                stages.push(bench(p99_ms, incumbent, true));
                Some(p99_ms)
            }
            (None, Behaviour::Slow(_)) => {
                stages.push(bench(1.0, incumbent, true));
                Some(1.0)
            }
        };
        if let Some(p99) = p99 {
            stages.push(json!({"stage": "active", "swap_micros": 5,
                "previous": current.as_ref().map(|(s, _, _)| s)}));
            if let Some(old) = current {
                serving.before.insert(slot.to_string(), old);
            }
            serving
                .now
                .insert(slot.to_string(), (sha.clone(), manifest.release, p99));
            changed = true;
        }
        for stage in stages {
            ctx.client
                .publish(ctx.events, QoS::AtLeastOnce, false, event(stage))
                .await?;
        }
    }
    if changed {
        publish_status(ctx.client, ctx.status, serving, Some(desired.generation)).await?;
    }
    Ok(())
}

fn bench(p99: f64, incumbent: Option<f64>, passed: bool) -> Value {
    json!({"stage": "benchmarked", "runs": 20, "p50_ms": p99 / 2.0, "p99_ms": p99,
        "mean_ms": p99 / 2.0, "incumbent_p99_ms": incumbent, "passed": passed})
}

/// What a [`Reconnector`] saw, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The connection (or an attempt to make one) failed at this instant.
    Failed(tokio::time::Instant),
    /// The broker accepted the connection (CONNACK) at this instant.
    Connected(tokio::time::Instant),
}

/// A bare MQTT session that reconnects the way the agent's link does: the agent's
/// default backoff (full jitter, doubling to the cap) and its reset rule
/// ([`botfleet_agent::backoff::Reconnect`]). It records every attempt, for reconnect storms.
#[derive(Debug)]
pub struct Reconnector {
    pub id: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<Attempt>>>,
    task: JoinHandle<()>,
}

impl Drop for Reconnector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Reconnector {
    pub fn start(mqtt_url: &str, id: &str) -> Result<Self> {
        use botfleet_agent::backoff::{Backoff, Reconnect};
        let defaults = botfleet_agent::Config::default().mqtt;
        let mut options = crate::watch::mqtt_options(mqtt_url, id)?;
        options
            .set_keep_alive(Duration::from_secs(defaults.keep_alive_s))
            .set_clean_session(false);
        let (_client, mut eventloop) = AsyncClient::new(options, 10);
        let mut reconnect = Reconnect::new(
            Backoff::new(
                Duration::from_millis(defaults.backoff_initial_ms),
                Duration::from_millis(defaults.backoff_max_ms),
            ),
            botfleet_agent::link::STABLE_AFTER,
        );
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = std::sync::Arc::clone(&log);
        let push = move |a| {
            if let Ok(mut log) = record.lock() {
                log.push(a);
            }
        };
        let task = tokio::spawn(async move {
            // The client handle lives as long as the loop, or rumqttc stops polling.
            let _client = _client;
            loop {
                match eventloop.poll().await {
                    Ok(MqttEvent::Incoming(Packet::ConnAck(_))) => {
                        push(Attempt::Connected(tokio::time::Instant::now()));
                        reconnect.connected();
                    }
                    Ok(_) => {}
                    Err(_) => {
                        push(Attempt::Failed(tokio::time::Instant::now()));
                        tokio::time::sleep(reconnect.lost()).await;
                    }
                }
            }
        });
        Ok(Self {
            id: id.to_owned(),
            log,
            task,
        })
    }

    /// Everything seen so far.
    pub fn log(&self) -> Vec<Attempt> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}
