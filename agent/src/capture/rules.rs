//! The capture rules and the per-slot rate bound, as pure functions of what they read
//! (outputs, a counter, the time), so each is tested without a model or a clock.

use std::time::Instant;

use botfleet_engine::Tensor;
use botfleet_protocol::sample::CaptureRule;

use super::settings::SlotPolicy;

/// A rule that fired, and what made it fire, in words.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    pub rule: CaptureRule,
    pub detail: Option<String>,
}

impl Fired {
    pub fn new(rule: CaptureRule, detail: impl Into<Option<String>>) -> Self {
        Self {
            rule,
            detail: detail.into(),
        }
    }
}

/// A number as people write it: at most three decimals, no trailing zeros.
pub fn short(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

/// The watched output: the one named, else the first.
fn watched<'a>(outputs: &'a [Tensor], name: Option<&str>) -> Option<&'a Tensor> {
    match name {
        Some(name) => outputs.iter().find(|t| t.name == name),
        None => outputs.first(),
    }
}

/// `low_confidence`: the watched output's largest value is under `min`.
pub fn low_confidence(outputs: &[Tensor], name: Option<&str>, min: f64) -> Option<Fired> {
    let values = watched(outputs, name)?.data.to_f32();
    if values.is_empty() {
        return None;
    }
    let top = values.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let top = f64::from(top);
    (top < min).then(|| {
        Fired::new(
            CaptureRule::LowConfidence,
            format!("top-1 {} < {}", short(top), short(min)),
        )
    })
}

/// `out_of_range`: a value of the watched output is outside `[low, high]` (NaN is).
pub fn out_of_range(
    outputs: &[Tensor],
    name: Option<&str>,
    (low, high): (f64, f64),
) -> Option<Fired> {
    let tensor = watched(outputs, name)?;
    let values = tensor.data.to_f32();
    let (index, value) = values
        .iter()
        .map(|&v| f64::from(v))
        .enumerate()
        .find(|&(_, v)| !(low <= v && v <= high))?;
    Some(Fired::new(
        CaptureRule::OutOfRange,
        format!(
            "{}[{index}] = {} outside [{}, {}]",
            tensor.name,
            short(value),
            short(low),
            short(high)
        ),
    ))
}

/// The rules that read outputs, in the order that names a sample.
pub fn on_outputs(policy: &SlotPolicy, outputs: &[Tensor]) -> Option<Fired> {
    let name = policy.output.as_deref();
    policy
        .min_top1
        .and_then(|min| low_confidence(outputs, name, min))
        .or_else(|| policy.range.and_then(|r| out_of_range(outputs, name, r)))
}

/// Whether request number `seen` (from 0) of a slot is one in every `every` (0: never).
pub fn sampled(every: u64, seen: u64) -> Option<Fired> {
    (every > 0 && seen.is_multiple_of(every)).then(|| {
        Fired::new(
            CaptureRule::Sampled,
            format!("one in every {every} requests"),
        )
    })
}

/// The first rule that fires names a sample: `on_demand` while an order stands (so an
/// order's requests all carry its name), `sampled` (both decided before the run), then the
/// output rules.
pub fn first(
    policy: &SlotPolicy,
    sampled: Option<Fired>,
    on_demand: Option<Fired>,
    outputs: &[Tensor],
) -> Option<Fired> {
    on_demand
        .or(sampled)
        .or_else(|| on_outputs(policy, outputs))
}

/// At most `per_minute` samples a minute: a token bucket that holds a minute's worth and
/// fills at `per_minute / 60` a second. Time is passed in.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(per_minute.max(1));
        Self {
            capacity,
            per_second: capacity / 60.0,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed.as_secs_f64() * self.per_second).min(self.capacity);
    }

    /// Whether a sample may be kept at `now` (takes nothing): checked before copying.
    pub fn has_room(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0
    }

    /// Takes one sample's room; `false` when the bound is reached.
    pub fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botfleet_engine::TensorData;
    use std::time::Duration;

    fn probs(values: &[f32]) -> Vec<Tensor> {
        vec![
            Tensor {
                name: "probs".into(),
                shape: vec![1, values.len()],
                data: TensorData::Fp32(values.to_vec()),
            },
            Tensor {
                name: "label".into(),
                shape: vec![1],
                data: TensorData::Int64(vec![7]),
            },
        ]
    }

    #[test]
    fn low_confidence_fires_under_the_threshold_and_says_so() {
        let fired = low_confidence(&probs(&[0.41, 0.3, 0.29]), None, 0.6).unwrap();
        assert_eq!(fired.rule, CaptureRule::LowConfidence);
        assert_eq!(fired.detail.as_deref(), Some("top-1 0.41 < 0.6"));
        assert!(low_confidence(&probs(&[0.9, 0.1]), None, 0.6).is_none());
        assert!(
            low_confidence(&probs(&[0.6, 0.4]), None, 0.6).is_none(),
            "not under"
        );
        assert!(
            low_confidence(&probs(&[]), None, 0.6).is_none(),
            "no values"
        );
        // The named output: the label 7 is no probability under 0.6.
        assert!(low_confidence(&probs(&[0.1]), Some("label"), 0.6).is_none());
        assert!(low_confidence(&probs(&[0.1]), Some("missing"), 0.6).is_none());
    }

    #[test]
    fn out_of_range_names_the_first_value_outside() {
        let fired = out_of_range(&probs(&[0.5, 1.7, -2.0]), None, (0.0, 1.0)).unwrap();
        assert_eq!(fired.rule, CaptureRule::OutOfRange);
        assert_eq!(
            fired.detail.as_deref(),
            Some("probs[1] = 1.7 outside [0, 1]")
        );
        assert!(
            out_of_range(&probs(&[0.0, 1.0]), None, (0.0, 1.0)).is_none(),
            "bounds inside"
        );
        let nan = out_of_range(&probs(&[f32::NAN]), None, (0.0, 1.0)).unwrap();
        assert_eq!(nan.detail.as_deref(), Some("probs[0] = NaN outside [0, 1]"));
        let label = out_of_range(&probs(&[0.5]), Some("label"), (0.0, 5.0)).unwrap();
        assert_eq!(label.detail.as_deref(), Some("label[0] = 7 outside [0, 5]"));
    }

    #[test]
    fn sampled_keeps_one_in_every_n_and_zero_is_off() {
        let kept: Vec<u64> = (0..10).filter(|&n| sampled(4, n).is_some()).collect();
        assert_eq!(kept, [0, 4, 8]);
        assert!((0..10).all(|n| sampled(0, n).is_none()));
        assert_eq!(
            sampled(4, 0).unwrap().detail.as_deref(),
            Some("one in every 4 requests")
        );
    }

    #[test]
    fn the_first_rule_that_fires_names_the_sample() {
        let mut p = SlotPolicy::off();
        p.min_top1 = Some(0.6);
        p.range = Some((0.0, 0.3));
        let low = probs(&[0.41, 0.2]);
        let on_demand = Some(Fired::new(CaptureRule::OnDemand, None));
        let sampled = sampled(1, 0);
        let rule = |s: Option<Fired>, o: Option<Fired>, out: &[Tensor]| {
            first(&p, s, o, out).map(|f| f.rule)
        };
        assert_eq!(
            rule(sampled.clone(), on_demand.clone(), &low),
            Some(CaptureRule::OnDemand)
        );
        assert_eq!(
            rule(sampled.clone(), None, &low),
            Some(CaptureRule::Sampled)
        );
        assert_eq!(rule(None, None, &low), Some(CaptureRule::LowConfidence));
        let confident_but_far = probs(&[0.9, 0.1]);
        assert_eq!(
            rule(None, None, &confident_but_far),
            Some(CaptureRule::OutOfRange)
        );
        p.range = None;
        let rule = |s: Option<Fired>, o: Option<Fired>, out: &[Tensor]| {
            first(&p, s, o, out).map(|f| f.rule)
        };
        assert_eq!(
            rule(None, on_demand, &confident_but_far),
            Some(CaptureRule::OnDemand)
        );
        assert_eq!(rule(None, None, &confident_but_far), None);
    }

    #[test]
    fn the_rate_bound_allows_a_minutes_worth_then_refills_over_time() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(60, t0);
        assert!((0..60).all(|_| bucket.take(t0)));
        assert!(!bucket.has_room(t0));
        assert!(!bucket.take(t0));
        let t1 = t0 + Duration::from_millis(999);
        assert!(!bucket.take(t1), "not a whole sample's room yet");
        let t2 = t0 + Duration::from_secs(1);
        assert!(bucket.has_room(t2));
        assert!(bucket.take(t2));
        assert!(!bucket.take(t2));
        // Over ten minutes at most a full bucket plus ten minutes' refill.
        let mut kept = 0;
        for ms in (1_000..=601_050).step_by(50) {
            if bucket.take(t0 + Duration::from_millis(ms)) {
                kept += 1;
            }
        }
        assert_eq!(kept, 600);
        // An idle hour refills the bucket only to its capacity.
        let later = t0 + Duration::from_secs(4_000);
        assert_eq!((0..100).filter(|_| bucket.take(later)).count(), 60);
    }

    #[test]
    fn numbers_are_written_short() {
        assert_eq!(short(0.6), "0.6");
        assert_eq!(short(0.41), "0.41");
        assert_eq!(short(0.59949), "0.599");
        assert_eq!(short(2.0), "2");
        assert_eq!(short(-0.0001), "0");
        assert_eq!(short(f64::NAN), "NaN");
    }
}
