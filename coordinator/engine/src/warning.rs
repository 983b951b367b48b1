//! Degradation warnings: the probability that the SLO breaks within the horizon, from the load
//! forecast's distribution through the current VM type's capacity at the SLO, raised before the
//! breach with its lead time.
//!
//! "The SLO breaks" is "offered load per instance exceeds the load at which the performance model
//! puts the latency quantile at the SLO". The capacity is uncertain, so it comes in as samples
//! (the performance model's bootstrap) and the probability averages over them.
//!
//! The probability of a breach (load over capacity for the SLO's window of `k` consecutive
//! steps) starting at a given step is taken as that of the window's least likely step: adjacent
//! steps' errors move together. Breaches starting at different steps are combined
//! ([`BreachCombine`]) either as if independent, `1 − Π(1 − q_h)`, which overstates the risk of
//! level-driven breaches (one forecast error moves the whole path), or by the largest window,
//! which understates burst-driven ones. The thresholds are chosen per combination on a
//! walk-forward replay of the traces' *training* parts only (`cargo xtask eval predictor`), and
//! the test parts are scored with the rule chosen there. False alarms count warning episodes,
//! so a warning that never clears would "warn" of every breach; the calibration also caps the
//! time a warning may stay raised (a quarter of it). An incident counts as warned when a warning
//! was raised within the horizon before it (the rule that also clears an episode of being a
//! false alarm). Measured that way (see the issue note), calibrating on the last two thirds of
//! each training part (158 incidents): within one false alarm a day and a quarter of the time
//! raised, the largest window reached recall 0.60 there (raise 0.225) and 0.76 at 0.45 false
//! alarms/day on the test parts (0.75 counting only warnings still raised when the breach
//! began), the union 0.58; recall 0.8–1.0 needed warnings raised half the time or more. That
//! trade-off, not the thresholds, is what limits recall. Measured on the same windows and not
//! kept: thresholds per workload from its own window shrunk towards the pooled table (3
//! pseudo-incidents, 2 pseudo-days) scored test recall 0.747 at 1.81 false alarms/day (a
//! workload's past window does not predict its next one); errors scaled by the last hour's
//! volatility reached calibration recall 0.58 (union) / 0.56 (largest window) at a quarter of
//! the time raised; the largest window or the union over the first quarter of the horizon,
//! whichever is likelier, 0.54.
//! With the window a third of the training part instead, a block union (the likeliest window
//! per SLO window, blocks independent) was chosen and scored test recall 0.64 against the
//! largest window's 0.67, and a grid refined near 0 and 1 chose the union at 0.995 and scored
//! 0.48: probabilities that far out are not calibrated.
//! Raising and clearing thresholds differ (hysteresis) so a probability hovering at the
//! threshold does not page repeatedly.

use crate::Timestamp;
use crate::forecast::LoadForecaster;

/// When to raise and clear a warning.
#[derive(Debug, Clone, PartialEq)]
pub struct WarningPolicy {
    /// Look-ahead in forecast steps.
    pub horizon_steps: usize,
    /// Raise when the breach probability reaches this.
    pub raise_at: f64,
    /// Clear when it falls below this (lower than `raise_at`).
    pub clear_below: f64,
    /// Steps the load must stay over capacity for the SLO to break: the SLO's evaluation window.
    /// One sample over the line is a blip, not a breach.
    pub min_breach_steps: usize,
    /// How breaches starting at different steps of the horizon are combined.
    pub combine: BreachCombine,
}

/// How the probabilities of breaches starting at different steps are combined into one.
///
/// Neither is right: errors at nearby steps are strongly but not fully dependent. Which ranks
/// origins better (what a threshold needs) is measured, not assumed: `cargo xtask eval
/// predictor` calibrates the threshold for each on the traces' training parts and keeps the one
/// that does better there.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BreachCombine {
    /// `1 − Π(1 − q_h)`: as if independent; overstates level-driven risk.
    #[default]
    Union,
    /// `max q_h`: as if fully dependent; understates burst-driven risk.
    LargestWindow,
}

impl Default for WarningPolicy {
    fn default() -> Self {
        Self {
            horizon_steps: 60,
            raise_at: 0.5,
            clear_below: 0.25,
            min_breach_steps: 10,
            combine: BreachCombine::Union,
        }
    }
}

/// A warning that the SLO is expected to break.
#[derive(Debug, Clone, PartialEq)]
pub struct DegradationWarning {
    /// When the warning was computed.
    pub issued_at: Timestamp,
    /// Probability that the SLO breaks within the horizon.
    pub probability: f64,
    /// When the breach is most likely to begin: the first step whose breach probability reaches
    /// the raise threshold (or the most likely step when none does).
    pub expected_breach_at: Timestamp,
    /// `expected_breach_at - issued_at`, in seconds.
    pub lead_secs: u64,
    /// Median forecast load at `expected_breach_at` (exchanges/s per instance).
    pub forecast_load: f64,
    /// Median capacity at the SLO of the current placement (exchanges/s per instance).
    pub capacity: f64,
}

/// The probability that the load stays over capacity for `min_breach_steps` consecutive steps
/// somewhere within the horizon (combined as `policy.combine` says), and the first step at which
/// a breach likely begins (or the step most likely to be over capacity).
pub fn breach_probability(
    forecaster: &LoadForecaster,
    capacity_samples: &[f64],
    policy: &WarningPolicy,
) -> (f64, usize) {
    let scores = breach_scores(forecaster, capacity_samples, policy);
    match policy.combine {
        BreachCombine::Union => (
            scores.union,
            scores.first_over.unwrap_or(scores.most_likely),
        ),
        BreachCombine::LargestWindow => (
            scores.largest_window,
            scores.first_window_over.unwrap_or(scores.most_likely),
        ),
    }
}

/// Both combinations of the per-step breach probabilities, for calibration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreachScores {
    /// [`BreachCombine::Union`].
    pub union: f64,
    /// [`BreachCombine::LargestWindow`].
    pub largest_window: f64,
    /// Step (from 1) of the likeliest breach start.
    pub most_likely: usize,
    /// First step at which the union reaches `raise_at`.
    pub first_over: Option<usize>,
    /// First step whose window probability reaches `raise_at`.
    pub first_window_over: Option<usize>,
}

/// The per-step breach probabilities combined both ways.
pub fn breach_scores(
    forecaster: &LoadForecaster,
    capacity_samples: &[f64],
    policy: &WarningPolicy,
) -> BreachScores {
    let k = policy.min_breach_steps.max(1);
    let per_step: Vec<f64> = (1..=policy.horizon_steps + k - 1)
        .map(|h| {
            if capacity_samples.is_empty() {
                0.0
            } else {
                capacity_samples
                    .iter()
                    .map(|&c| forecaster.exceedance_probability(h, c))
                    .sum::<f64>()
                    / capacity_samples.len() as f64
            }
        })
        .collect();
    let mut survive = 1.0;
    let mut most_likely = (0.0, policy.horizon_steps.max(1));
    let mut first_over: Option<usize> = None;
    let mut first_window_over: Option<usize> = None;
    for h in 1..=policy.horizon_steps {
        // A breach starting at h: every step of the window over capacity. Adjacent steps' errors
        // move together, so the window is taken to be as likely as its least likely step.
        let window = per_step[h - 1..h - 1 + k]
            .iter()
            .copied()
            .fold(1.0, f64::min);
        survive *= 1.0 - window;
        if window > most_likely.0 {
            most_likely = (window, h);
        }
        if first_over.is_none() && 1.0 - survive >= policy.raise_at {
            first_over = Some(h);
        }
        if first_window_over.is_none() && window >= policy.raise_at {
            first_window_over = Some(h);
        }
    }
    BreachScores {
        union: 1.0 - survive,
        largest_window: most_likely.0,
        most_likely: most_likely.1,
        first_over,
        first_window_over,
    }
}

/// Whether a warning is active, so raising and clearing use different thresholds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WarningState {
    active: bool,
}

impl WarningState {
    /// Whether a warning is currently raised.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Evaluates the forecast at `now`; returns the warning while one is raised.
    pub fn evaluate(
        &mut self,
        now: Timestamp,
        policy: &WarningPolicy,
        forecaster: &LoadForecaster,
        capacity_samples: &[f64],
    ) -> Option<DegradationWarning> {
        let (probability, step) = breach_probability(forecaster, capacity_samples, policy);
        self.active = if self.active {
            probability >= policy.clear_below
        } else {
            probability >= policy.raise_at
        };
        if !self.active {
            return None;
        }
        let step_secs = forecaster.config().step_secs;
        let expected_breach_at = forecaster.last_observed_at() + step as u64 * step_secs;
        let mut sorted = capacity_samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(DegradationWarning {
            issued_at: now,
            probability,
            expected_breach_at,
            lead_secs: expected_breach_at.saturating_sub(now),
            forecast_load: forecaster.median(step),
            capacity: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forecast::{ForecastConfig, LoadForecaster};

    /// A daily cycle peaking at 180 exchanges/s with ±5/s of hashed noise, fitted at the trough.
    fn forecaster() -> LoadForecaster {
        let config = ForecastConfig::every_five_minutes();
        let y: Vec<f64> = (0..7 * 288u64)
            .map(|i| {
                let phase = (i % 288) as f64 / 288.0 * std::f64::consts::TAU;
                let noise = ((i.wrapping_mul(2_654_435_761) >> 7) % 1000) as f64 / 100.0 - 5.0;
                100.0 - 80.0 * phase.cos() + noise
            })
            .collect();
        // End at phase 0 (the trough at 20/s); the peak is half a day away.
        LoadForecaster::fit(&config, &y, (y.len() as u64 - 1) * 300).unwrap()
    }

    #[test]
    fn warns_with_lead_time_before_the_peak_crosses_capacity() {
        let model = forecaster();
        let policy = WarningPolicy {
            horizon_steps: 144,
            min_breach_steps: 2,
            ..WarningPolicy::default()
        };
        let now = model.last_observed_at();
        let mut state = WarningState::default();
        let warning = state
            .evaluate(now, &policy, &model, &[150.0])
            .expect("the forecast peak (180/s) passes capacity (150/s)");
        assert!(warning.probability > 0.9);
        // 20 − 80 cos(φ) ≥ 150 first at φ ≈ 0.36 of a day ≈ step 104 (8.7 h).
        let lead_steps = warning.lead_secs / 300;
        assert!((95..=112).contains(&lead_steps), "lead {lead_steps} steps");
        assert!(state.is_active());
        // A capacity above any forecast load clears it.
        assert_eq!(state.evaluate(now, &policy, &model, &[400.0]), None);
        assert!(!state.is_active());
    }

    #[test]
    fn hysteresis_keeps_a_raised_warning_until_the_probability_falls_well_below() {
        let model = forecaster();
        let policy = WarningPolicy {
            horizon_steps: 144,
            min_breach_steps: 1,
            raise_at: 0.7,
            clear_below: 0.3,
            combine: BreachCombine::Union,
        };
        // The capacity at which the breach probability is one half, by bisection (the
        // probability falls as capacity rises).
        let (mut lo, mut hi) = (100.0, 400.0);
        for _ in 0..60 {
            let mid = f64::midpoint(lo, hi);
            if breach_probability(&model, &[mid], &policy).0 > 0.5 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (p, _) = breach_probability(&model, &[lo], &policy);
        assert!(p > 0.3 && p < 0.7, "p = {p}");
        let now = model.last_observed_at();
        let mut state = WarningState::default();
        assert_eq!(state.evaluate(now, &policy, &model, &[lo]), None);
        assert!(state.evaluate(now, &policy, &model, &[100.0]).is_some());
        assert!(state.evaluate(now, &policy, &model, &[lo]).is_some());
        assert_eq!(state.evaluate(now, &policy, &model, &[400.0]), None);
    }
}
