//! systemd readiness and watchdog (`Type=notify`, `WatchdogSec=`).
//!
//! `READY=1` goes out once [`crate::start`] has returned: the model store is loaded and
//! the inference API listens. The watchdog pings at half of `WATCHDOG_USEC`, but only while
//! the agent's main loop keeps moving its heartbeat ([`crate::Running::heartbeat`]): a
//! stalled runtime or a wedged loop stops the pings, and systemd kills and restarts the
//! agent. Without `NOTIFY_SOCKET` (not started by systemd) all of this does nothing.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

/// Tells systemd the agent is ready to serve.
pub fn ready() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready]) {
        warn!(error = %e, "cannot notify systemd of readiness");
    }
}

/// Tells systemd the agent is stopping.
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// The ping period systemd asks for (half of `WATCHDOG_USEC`), if it asks.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}

/// Sends `WATCHDOG=1` to systemd.
pub fn ping_systemd() {
    if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
        debug!(error = %e, "watchdog ping failed");
    }
}

/// Every `period`, calls `ping` if the heartbeat moved within `period` (at least two
/// heartbeats' worth, so a ping is never skipped by bad phase alone). Returns when the
/// heartbeat's sender is gone.
pub async fn watchdog(
    mut heartbeat: watch::Receiver<Instant>,
    period: Duration,
    beat: Duration,
    mut ping: impl FnMut(),
) {
    let max_age = period.max(beat * 2);
    let mut ticker = tokio::time::interval(period);
    let mut stalled = false;
    loop {
        ticker.tick().await;
        if heartbeat.has_changed().is_err() {
            return;
        }
        let age = heartbeat.borrow_and_update().elapsed();
        if age <= max_age {
            stalled = false;
            ping();
        } else if !stalled {
            stalled = true;
            warn!(?age, "main loop stalled; withholding watchdog pings");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_follow_the_heartbeat_and_stop_when_it_stalls() {
        let (tx, rx) = watch::channel(Instant::now());
        let pings = std::sync::Arc::new(AtomicU32::new(0));
        let counter = std::sync::Arc::clone(&pings);
        let period = Duration::from_secs(10);
        let dog = tokio::spawn(watchdog(rx, period, Duration::from_secs(1), move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        // A healthy loop: a beat every second for 35 s.
        for _ in 0..35 {
            tx.send_replace(Instant::now());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let healthy = pings.load(Ordering::SeqCst);
        assert!(healthy >= 3, "{healthy} pings in 35 s at a 10 s period");
        // The loop stalls: after at most one more ping, no more.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let after_stall = pings.load(Ordering::SeqCst);
        assert!(after_stall <= healthy + 1, "{healthy} then {after_stall}");
        // It recovers: pings resume.
        for _ in 0..25 {
            tx.send_replace(Instant::now());
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert!(pings.load(Ordering::SeqCst) > after_stall);
        drop(tx);
        tokio::time::timeout(Duration::from_secs(30), dog)
            .await
            .unwrap()
            .unwrap();
    }
}
