//! Degradation warnings: the probability that the SLO breaks within the horizon, from the load
//! forecast's distribution through the current VM type's capacity at the SLO, raised before the
//! breach with its lead time.
//!
//! "The SLO breaks" is "offered load per instance exceeds the load at which the performance model
//! puts the latency quantile at the SLO". The capacity is uncertain, so it comes in as samples
//! (the performance model's bootstrap) and the probability averages over them.
//!
//! Per-step exceedance events over the horizon are strongly positively correlated (one forecast
//! error moves the whole path), so the probability of any breach is taken as the largest per-step
//! probability: exact for perfectly correlated errors, a lower bound otherwise. Raising and clearing
//! thresholds differ (hysteresis) so a probability hovering at the threshold does not page
//! repeatedly.

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
}

impl Default for WarningPolicy {
    fn default() -> Self {
        Self {
            horizon_steps: 60,
            raise_at: 0.5,
            clear_below: 0.2,
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

/// The breach probability within the horizon and the first step at which it reaches `raise_at`
/// (or the most likely step).
pub fn breach_probability(
    forecaster: &LoadForecaster,
    capacity_samples: &[f64],
    horizon_steps: usize,
    raise_at: f64,
) -> (f64, usize) {
    let mut best = (0.0, horizon_steps.max(1));
    let mut first_over: Option<usize> = None;
    for h in 1..=horizon_steps {
        let p = if capacity_samples.is_empty() {
            0.0
        } else {
            capacity_samples
                .iter()
                .map(|&c| forecaster.exceedance_probability(h, c))
                .sum::<f64>()
                / capacity_samples.len() as f64
        };
        if p > best.0 {
            best = (p, h);
        }
        if first_over.is_none() && p >= raise_at {
            first_over = Some(h);
        }
    }
    (best.0, first_over.unwrap_or(best.1))
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
        let (probability, step) = breach_probability(
            forecaster,
            capacity_samples,
            policy.horizon_steps,
            policy.raise_at,
        );
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
