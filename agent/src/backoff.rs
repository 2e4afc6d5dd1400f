//! Full-jitter exponential backoff, so a fleet does not reconnect in lockstep after a
//! broker restart.

use std::time::Duration;

use rand::Rng;

/// Reconnect delays: attempt `n` waits a uniform random time in `[0, min(max, initial·2ⁿ)]`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, drawn with `rng`.
    pub fn next_with(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// After a connection that stayed up: start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Reconnect pacing for one link: the backoff, reset once a connection stayed up for
/// `stable_after` (a link that flaps every few seconds keeps backing off).
#[derive(Debug, Clone)]
pub struct Reconnect {
    backoff: Backoff,
    stable_after: Duration,
    connected_at: Option<tokio::time::Instant>,
}

impl Reconnect {
    pub fn new(backoff: Backoff, stable_after: Duration) -> Self {
        Self {
            backoff,
            stable_after,
            connected_at: None,
        }
    }

    /// The broker accepted the connection.
    pub fn connected(&mut self) {
        self.connected_at = Some(tokio::time::Instant::now());
    }

    /// The connection (or an attempt) failed: how long to wait before the next attempt.
    pub fn lost(&mut self) -> Duration {
        if self
            .connected_at
            .take()
            .is_some_and(|at| at.elapsed() >= self.stable_after)
        {
            self.backoff.reset();
        }
        self.backoff.next_delay()
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.backoff.ceiling()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reconnect() -> Reconnect {
        Reconnect::new(
            Backoff::new(Duration::from_secs(1), Duration::from_secs(128)),
            Duration::from_secs(30),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stays_up_resets_the_backoff() {
        let mut r = reconnect();
        for _ in 0..5 {
            r.lost();
        }
        assert_eq!(r.ceiling(), Duration::from_secs(32));
        r.connected();
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(r.lost() <= Duration::from_secs(1));
        assert_eq!(r.ceiling(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_connection_keeps_backing_off() {
        let mut r = reconnect();
        for _ in 0..5 {
            r.lost();
        }
        r.connected();
        tokio::time::advance(Duration::from_secs(5)).await;
        r.lost();
        assert_eq!(r.ceiling(), Duration::from_secs(64));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_during_a_long_outage_stay_within_the_budget() {
        // Every failed attempt sleeps its delay: in 10 minutes of outage a client makes
        // only a handful of attempts once the ceiling reached the cap, never a tight loop.
        let mut r = reconnect();
        let start = tokio::time::Instant::now();
        let mut attempts = 0u32;
        while start.elapsed() < Duration::from_secs(600) {
            attempts += 1;
            let delay = r.lost();
            tokio::time::advance(delay).await;
        }
        assert!(r.ceiling() == Duration::from_secs(128));
        assert!(attempts >= 8, "{attempts}");
        assert!(attempts < 60, "{attempts} attempts in 10 minutes");
    }
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(128));
        let mut rng = StdRng::seed_from_u64(1);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            ceilings.push(b.ceiling().as_secs());
            let d = b.next_with(&mut rng);
            assert!(d <= Duration::from_secs(128));
        }
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 64, 128, 128, 128]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn delays_are_spread_not_synchronised() {
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..50)
            .map(|_| {
                let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(128));
                for _ in 0..6 {
                    b.next_with(&mut rng);
                }
                b.next_with(&mut rng)
            })
            .collect();
        let min = delays.iter().min().unwrap();
        let max = delays.iter().max().unwrap();
        assert!(*max - *min > Duration::from_secs(20), "{min:?}..{max:?}");
    }

    #[test]
    fn huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(10));
        }
    }
}
