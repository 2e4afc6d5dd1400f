//! How a rollout advances: waves, bake time, thresholds, deadline and the optional latency
//! gate; and which devices fall in which wave.
//!
//! Waves are chosen by a stable hash of the slot and the device id, so planning the same
//! rollout again (or another rollout of the same slot) picks the same canaries.

use botfleet_protocol::{DeviceId, SlotName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How large a wave is: cumulative, so `[{"count":1},{"percent":10},{"percent":100}]` is
/// one canary, then up to 10 % of the targets, then all of them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum WaveSize {
    Count(u32),
    Percent(f64),
}

/// What to do when a wave's error share passes the error threshold or the gate fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Stop starting devices; an operator resumes, aborts or rolls back.
    #[default]
    Pause,
    /// Abort, and give the devices that took the new model their previous one back.
    Rollback,
}

/// A gate on the numbers devices report: the median benchmark p99 of the waves so far must
/// not regress more than `max_p99_regression_percent` against the median incumbent p99,
/// engine by engine (`super::gate`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub max_p99_regression_percent: f64,
}

fn default_waves() -> Vec<WaveSize> {
    vec![WaveSize::Percent(100.0)]
}
fn one() -> f64 {
    1.0
}
fn default_deadline() -> u64 {
    3600
}

/// The strategy of a rollout; every field has a default (one wave, everything at once).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Strategy {
    #[serde(default = "default_waves")]
    pub waves: Vec<WaveSize>,
    /// Seconds a wave must stay successful before the next one starts.
    #[serde(default)]
    pub bake_s: u64,
    /// Share (0..=1) of a wave that must be active to go on.
    #[serde(default = "one")]
    pub success_threshold: f64,
    /// Share (0..=1) of a wave failed, rejected or timed out above which `on_error` acts.
    #[serde(default = "one")]
    pub error_threshold: f64,
    #[serde(default)]
    pub on_error: OnError,
    /// Seconds after a wave starts by which each of its devices has a terminal state
    /// (`timed_out`, or `skipped` when it is offline).
    #[serde(default = "default_deadline")]
    pub deadline_s: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Gate>,
    /// Swap only within this daily window of each robot's local time (`"22:00-05:00"`):
    /// devices download and gate at once, then wait, reported as `deferred`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install_window: Option<botfleet_protocol::messages::InstallWindow>,
    /// After its gate, each device runs the candidate beside its serving model on copies of
    /// live requests and promotes it only if they agree; the rollout's waves also need the
    /// pooled agreement of their devices to meet `min_agreement`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<botfleet_protocol::messages::ShadowSpec>,
    /// Devices download and gate at once, then wait (reported as `deferred`) until an
    /// operator orders the install (`POST /api/v1/rollouts/{id}/install`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub install_on_command: bool,
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            waves: default_waves(),
            bake_s: 0,
            success_threshold: 1.0,
            error_threshold: 1.0,
            on_error: OnError::Pause,
            deadline_s: default_deadline(),
            gate: None,
            install_window: None,
            shadow: None,
            install_on_command: false,
        }
    }
}

/// Why a strategy was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyError {
    #[error("strategy.waves is empty; give at least one wave")]
    NoWaves,
    #[error("wave {index}: a count must be at least 1")]
    ZeroCount { index: usize },
    #[error("wave {index}: a percent must be above 0 and at most 100, not {percent}")]
    BadPercent { index: usize, percent: f64 },
    #[error("strategy.{field} must be between 0 and 1, not {value}")]
    BadShare { field: &'static str, value: f64 },
    #[error("strategy.deadline_s must be at least 1")]
    ZeroDeadline,
    #[error("strategy.gate.max_p99_regression_percent must be 0 or more")]
    BadGate,
    #[error("strategy.{0}")]
    Shadow(#[from] botfleet_protocol::messages::ShadowSpecError),
}

impl Strategy {
    pub fn validate(&self) -> Result<(), StrategyError> {
        if self.waves.is_empty() {
            return Err(StrategyError::NoWaves);
        }
        for (index, wave) in self.waves.iter().enumerate() {
            match *wave {
                WaveSize::Count(0) => return Err(StrategyError::ZeroCount { index }),
                WaveSize::Percent(percent) if !(percent > 0.0 && percent <= 100.0) => {
                    return Err(StrategyError::BadPercent { index, percent });
                }
                _ => {}
            }
        }
        for (field, value) in [
            ("success_threshold", self.success_threshold),
            ("error_threshold", self.error_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(StrategyError::BadShare { field, value });
            }
        }
        if self.deadline_s == 0 {
            return Err(StrategyError::ZeroDeadline);
        }
        if self.gate.is_some_and(|g| {
            g.max_p99_regression_percent.is_nan() || g.max_p99_regression_percent < 0.0
        }) {
            return Err(StrategyError::BadGate);
        }
        if let Some(shadow) = &self.shadow {
            shadow.validate()?;
        }
        Ok(())
    }

    /// The wave of each device (0-based), in stable-hash order. The last wave always takes
    /// every device left; empty waves are dropped.
    pub fn plan(&self, slot: &SlotName, devices: &[DeviceId]) -> Vec<Vec<DeviceId>> {
        let mut ordered: Vec<(String, &DeviceId)> =
            devices.iter().map(|d| (wave_hash(slot, d), d)).collect();
        ordered.sort();
        let total = ordered.len();
        let mut waves = Vec::new();
        let mut taken = 0usize;
        for size in &self.waves {
            let upto = match *size {
                WaveSize::Count(n) => taken.saturating_add(n as usize),
                // Cumulative share of all targets, rounded up: 10 % of 5 devices is 1.
                WaveSize::Percent(p) => ((p / 100.0) * total as f64).ceil() as usize,
            }
            .clamp(taken, total);
            if upto > taken {
                waves.push(
                    ordered[taken..upto]
                        .iter()
                        .map(|(_, d)| (*d).clone())
                        .collect(),
                );
                taken = upto;
            }
        }
        if taken < total {
            waves.push(ordered[taken..].iter().map(|(_, d)| (*d).clone()).collect());
        }
        waves
    }
}

/// SHA-256 of `slot/device`, hex: the order in which devices join waves.
fn wave_hash(slot: &SlotName, device: &DeviceId) -> String {
    let mut hasher = Sha256::new();
    hasher.update(slot.as_str().as_bytes());
    hasher.update(b"/");
    hasher.update(device.as_str().as_bytes());
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices(n: usize) -> Vec<DeviceId> {
        (0..n)
            .map(|i| DeviceId::new(format!("robot-{i}")).unwrap())
            .collect()
    }

    fn slot() -> SlotName {
        SlotName::new("orientation").unwrap()
    }

    #[test]
    fn a_canary_then_ten_percent_then_the_rest() {
        let strategy = Strategy {
            waves: vec![
                WaveSize::Count(1),
                WaveSize::Percent(10.0),
                WaveSize::Percent(100.0),
            ],
            ..Strategy::default()
        };
        let waves = strategy.plan(&slot(), &devices(50));
        let sizes: Vec<_> = waves.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1, 4, 45]);
    }

    #[test]
    fn the_same_canaries_are_picked_whatever_the_order_of_the_targets() {
        let strategy = Strategy {
            waves: vec![WaveSize::Count(2)],
            ..Strategy::default()
        };
        let mut targets = devices(20);
        let first = strategy.plan(&slot(), &targets);
        targets.reverse();
        let again = strategy.plan(&slot(), &targets);
        assert_eq!(first, again);
        assert_eq!(first.len(), 2, "the rest goes in a last wave");
        assert_eq!(first[1].len(), 18);
    }

    #[test]
    fn waves_that_add_nobody_are_dropped() {
        let strategy = Strategy {
            waves: vec![WaveSize::Count(3), WaveSize::Percent(10.0)],
            ..Strategy::default()
        };
        let sizes: Vec<_> = strategy
            .plan(&slot(), &devices(5))
            .iter()
            .map(Vec::len)
            .collect();
        assert_eq!(sizes, [3, 2]);
    }

    #[test]
    fn nonsense_strategies_are_refused() {
        let bad = [
            (
                Strategy {
                    waves: vec![],
                    ..Strategy::default()
                },
                StrategyError::NoWaves,
            ),
            (
                Strategy {
                    waves: vec![WaveSize::Percent(0.0)],
                    ..Strategy::default()
                },
                StrategyError::BadPercent {
                    index: 0,
                    percent: 0.0,
                },
            ),
            (
                Strategy {
                    success_threshold: 1.5,
                    ..Strategy::default()
                },
                StrategyError::BadShare {
                    field: "success_threshold",
                    value: 1.5,
                },
            ),
            (
                Strategy {
                    deadline_s: 0,
                    ..Strategy::default()
                },
                StrategyError::ZeroDeadline,
            ),
        ];
        for (strategy, err) in bad {
            assert_eq!(strategy.validate(), Err(err));
        }
        let json = r#"{"waves":[{"count":1},{"percent":50}],"bake_s":60,"on_error":"rollback"}"#;
        let parsed: Strategy = serde_json::from_str(json).unwrap();
        assert_eq!(parsed.validate(), Ok(()));
        assert_eq!(parsed.on_error, OnError::Rollback);
        assert_eq!(parsed.deadline_s, 3600);
    }
}
