//! 200 sessions that reconnect like the agent are on a Mosquitto that dies and comes back:
//! they come back spread over seconds (full jitter), and none of them loops tightly while
//! the broker is away.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test may panic

use std::time::Duration;

use botfleet_e2e::Mosquitto;
use botfleet_e2e::simulated::{Attempt, Reconnector};
use tokio::time::Instant;

const CLIENTS: usize = 200;
/// How long the broker stays down.
const OUTAGE: Duration = Duration::from_secs(20);
/// Attempts one client may make in OUTAGE: with delays drawn from [0, 1 s·2ⁿ] the expected
/// count is about six; twelve has a vanishing chance, a tight loop makes thousands.
const MAX_ATTEMPTS: usize = 12;

/// Waits until `done` holds for every client's log.
async fn wait_all(clients: &[Reconnector], limit: Duration, done: impl Fn(&[Attempt]) -> bool) {
    let reached = tokio::time::timeout(limit, async {
        while !clients.iter().all(|c| done(&c.log())) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let missing = clients.iter().filter(|c| !done(&c.log())).count();
    assert!(
        reached.is_ok(),
        "{missing} of {CLIENTS} clients never got there"
    );
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_reconnects_spread_over_time_after_a_broker_restart_without_tight_loops() {
    let mut broker = Mosquitto::start().await.unwrap();
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let clients: Vec<Reconnector> = (0..CLIENTS)
        .map(|n| Reconnector::start(&broker.url(), &format!("storm-{tag}-{n}")).unwrap())
        .collect();
    let connected = |log: &[Attempt]| log.iter().any(|a| matches!(a, Attempt::Connected(_)));
    wait_all(&clients, Duration::from_secs(60), connected).await;

    broker.kill().await.unwrap();
    let killed = Instant::now();
    // The outage itself is the fault under test.
    tokio::time::sleep(OUTAGE).await;
    broker.restart().await.unwrap();
    let back = Instant::now();
    let back_again = |log: &[Attempt]| {
        log.iter()
            .any(|a| matches!(a, Attempt::Connected(t) if *t >= back))
    };
    // The longest a client can still be sleeping is its ceiling after ~6 failures (64 s).
    wait_all(&clients, Duration::from_secs(150), back_again).await;

    let mut delays = Vec::new();
    let mut attempts = Vec::new();
    for client in &clients {
        let log = client.log();
        let first = log
            .iter()
            .find_map(|a| match a {
                Attempt::Connected(t) if *t >= back => Some(*t - back),
                _ => None,
            })
            .unwrap();
        delays.push(first);
        attempts.push(
            log.iter()
                .filter(|a| matches!(a, Attempt::Failed(t) if *t >= killed && *t < back))
                .count(),
        );
    }
    delays.sort();
    let (min, p25, median, p75, max) = (
        delays[0],
        percentile(&delays, 0.25),
        percentile(&delays, 0.5),
        percentile(&delays, 0.75),
        delays[CLIENTS - 1],
    );
    let most = attempts.iter().copied().max().unwrap();
    let mean = attempts.iter().sum::<usize>() as f64 / CLIENTS as f64;
    eprintln!(
        "{CLIENTS} clients, broker down {OUTAGE:?}: reconnected after min {min:?}, p25 {p25:?}, \
         median {median:?}, p75 {p75:?}, max {max:?}; attempts while down: mean {mean:.1}, max {most}"
    );
    assert!(
        p75 - p25 > Duration::from_millis(500),
        "reconnects bunched together: p25 {p25:?}, p75 {p75:?}"
    );
    assert!(
        most <= MAX_ATTEMPTS,
        "a client tried {most} times in {OUTAGE:?}"
    );
    drop(clients);
    broker.kill().await.unwrap();
}
