//! One workload's predictor as a sans-IO state machine, in quinn-proto's shape: the coordinator
//! feeds it load samples with their time ([`WorkloadPredictor::handle_load`]), wakes it on its
//! decision interval with the performance models it has ([`WorkloadPredictor::handle_timeout`]),
//! and pulls what it has to say ([`WorkloadPredictor::poll_event`]). It keeps the load history,
//! refits the forecaster on schedule and carries the warning's and the decision's hysteresis.

use std::collections::VecDeque;

use crate::Timestamp;
use crate::decision::{Candidate, Decision, DecisionPolicy, DecisionState, Placement};
use crate::forecast::{ForecastConfig, ForecastError, LoadForecast, LoadForecaster, ModelKind};
use crate::warning::{DegradationWarning, WarningPolicy, WarningState};

/// Something the predictor wants the coordinator to know or do.
#[derive(Debug, Clone, PartialEq)]
pub enum PredictorEvent {
    /// The forecaster was refitted.
    Refitted {
        /// When.
        at: Timestamp,
        /// The model now in use (says so on a cold start).
        model: ModelKind,
    },
    /// The SLO is expected to break within the horizon (repeated while it stays raised).
    Warning(DegradationWarning),
    /// A raised warning was cleared.
    WarningCleared {
        /// When.
        at: Timestamp,
    },
    /// The placement decision of this interval.
    Decision(Decision),
}

/// The predictor of one workload.
#[derive(Debug, Clone)]
pub struct WorkloadPredictor {
    config: ForecastConfig,
    warning_policy: WarningPolicy,
    decision_policy: DecisionPolicy,
    history: VecDeque<f64>,
    last_step: Option<u64>,
    forecaster: Option<LoadForecaster>,
    steps_since_fit: usize,
    warning: WarningState,
    decision: DecisionState,
    events: VecDeque<PredictorEvent>,
}

/// Steps of a cold-start forecast a placement is sized for: about as long as a move takes to
/// be acted on and verified.
pub const COLD_START_LOOKAHEAD_STEPS: usize = 10;

/// Observations needed before the first fit.
const MIN_HISTORY: usize = 4;

impl WorkloadPredictor {
    /// A predictor for a workload running on `current`.
    pub fn new(
        config: ForecastConfig,
        warning_policy: WarningPolicy,
        decision_policy: DecisionPolicy,
        current: Placement,
    ) -> Self {
        Self {
            config,
            warning_policy,
            decision_policy,
            history: VecDeque::new(),
            last_step: None,
            forecaster: None,
            steps_since_fit: 0,
            warning: WarningState::default(),
            decision: DecisionState::new(current),
            events: VecDeque::new(),
        }
    }

    /// Records the workload's offered load (exchanges/s) observed at `now`. Steps without a
    /// sample repeat the previous value in the history (and coast in the fitted state); samples
    /// older than the last one are ignored. Refits when the schedule says so.
    pub fn handle_load(
        &mut self,
        now: Timestamp,
        exchanges_per_s: f64,
    ) -> Result<(), ForecastError> {
        if !(exchanges_per_s.is_finite() && exchanges_per_s >= 0.0) {
            return Err(ForecastError::BadObservation {
                index: self.history.len(),
                value: exchanges_per_s,
            });
        }
        let step = now / self.config.step_secs;
        if let Some(last) = self.last_step {
            if step <= last {
                return Ok(());
            }
            let previous = self.history.back().copied().unwrap_or(exchanges_per_s);
            for _ in last + 1..step {
                self.history.push_back(previous);
            }
            self.steps_since_fit += usize::try_from(step - last).unwrap_or(usize::MAX);
        }
        self.history.push_back(exchanges_per_s);
        while self.history.len() > self.config.max_history {
            self.history.pop_front();
        }
        self.last_step = Some(step);
        if let Some(f) = &mut self.forecaster {
            f.observe(now, exchanges_per_s);
        }
        let due = self.forecaster.is_none() || self.steps_since_fit >= self.config.refit_every;
        if due && self.history.len() >= MIN_HISTORY {
            let history: Vec<f64> = self.history.iter().copied().collect();
            // A refit keeps the out-of-sample record that weighs the model against the naive
            // forecasts.
            let fitted = match &self.forecaster {
                Some(f) => f.refit(&history, now)?,
                None => LoadForecaster::fit(&self.config, &history, now)?,
            };
            self.events.push_back(PredictorEvent::Refitted {
                at: now,
                model: fitted.kind(),
            });
            self.forecaster = Some(fitted);
            self.steps_since_fit = 0;
        }
        Ok(())
    }

    /// The forecast for the next `steps` steps, once there is one.
    pub fn forecast(&self, steps: usize) -> Option<LoadForecast> {
        self.forecaster.as_ref().map(|f| f.forecast(steps))
    }

    /// The placement the decision currently stands on.
    pub fn placement(&self) -> &Placement {
        self.decision.current()
    }

    /// Tells the predictor what the workload actually runs on. A recommended move is only
    /// advice until the operator makes it, so the coordinator restates the live placement
    /// before every evaluation; a change resets the decision's hysteresis, because the
    /// confirmations it counted were against the old placement.
    pub fn set_placement(&mut self, placement: Placement) {
        if *self.decision.current() != placement {
            self.decision = DecisionState::new(placement);
        }
    }

    /// How placements are chosen.
    pub fn decision_policy(&self) -> &DecisionPolicy {
        &self.decision_policy
    }

    /// The fitted forecaster, once there is one.
    pub fn forecaster(&self) -> Option<&LoadForecaster> {
        self.forecaster.as_ref()
    }

    /// Observations of history held.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// Whether a degradation warning is raised.
    pub fn warning_active(&self) -> bool {
        self.warning.is_active()
    }

    /// The warning policy in force.
    pub fn warning_policy(&self) -> &WarningPolicy {
        &self.warning_policy
    }

    /// Evaluates the warning and the placement at `now`, given the performance models measured
    /// for this workload (live and shadow types).
    pub fn handle_timeout(&mut self, now: Timestamp, candidates: &[Candidate<'_>]) {
        let Some(forecaster) = &self.forecaster else {
            return;
        };
        let current = self.decision.current().clone();
        if let Some(model) = candidates
            .iter()
            .find(|c| c.vm_type.name == current.vm_type)
            .map(|c| c.model)
        {
            // The forecast is the workload's total; capacity scales with the instance count.
            let capacity: Vec<f64> = model
                .capacity_samples(self.decision_policy.slo_ms)
                .into_iter()
                .map(|c| c * f64::from(current.count.max(1)))
                .collect();
            let was_active = self.warning.is_active();
            match self
                .warning
                .evaluate(now, &self.warning_policy, forecaster, &capacity)
            {
                Some(warning) => self.events.push_back(PredictorEvent::Warning(warning)),
                None if was_active => {
                    self.events
                        .push_back(PredictorEvent::WarningCleared { at: now });
                }
                None => {}
            }
        }
        let peak = self.provisioned_peak().unwrap_or_default();
        let decision = self.decision.decide_with_recent_peak(
            now,
            &self.decision_policy,
            peak,
            self.recent_peak(),
            candidates,
        );
        self.events.push_back(PredictorEvent::Decision(decision));
    }

    /// The load a placement is sized for, over the warning horizon (the decision adds its
    /// margin on top).
    ///
    /// A fitted model (a season of history or more): the forecast's 90th percentile peak.
    ///
    /// A cold start: the median forecast's peak over the next [`COLD_START_LOOKAHEAD_STEPS`],
    /// and never less than the highest load of the last horizon. The cold-start model has no season and a short history; its interval grows
    /// with the horizon like a random walk's, and its 90 % bound measured 3.1 times its own
    /// median in the demo (291 against 94 exchanges/s), which bought a type four times the
    /// price of the cheapest that held the real peak. The two errors are not alike: a placement
    /// sized too big stays until cheaper types win the move-down confirmations, while one sized
    /// too small is caught by the warning (which still weighs the whole forecast distribution)
    /// and escaped by an urgent move within the horizon. So a cold start sizes for what it
    /// expects, with the margin, and lets the warning cover the tail. Nor does it extrapolate a
    /// rise over the whole horizon: without a season it cannot tell a trend from the morning of
    /// a daily cycle, and the demo, four minutes past its peak, sized for a trend line 10 %
    /// above it and moved to a type twice the price; it trusts the trend only as far as a move
    /// takes to act and be verified.
    pub fn provisioned_peak(&self) -> Option<f64> {
        let forecaster = self.forecaster.as_ref()?;
        let horizon = self.warning_policy.horizon_steps.max(1);
        Some(match forecaster.kind() {
            ModelKind::ColdStart { .. } => {
                let lookahead = COLD_START_LOOKAHEAD_STEPS.min(horizon);
                let median = (1..=lookahead)
                    .map(|h| forecaster.median(h))
                    .fold(0.0, f64::max);
                let seen = self
                    .history
                    .iter()
                    .rev()
                    .take(horizon)
                    .copied()
                    .fold(0.0, f64::max);
                median.max(seen)
            }
            _ => (1..=horizon)
                .map(|h| forecaster.quantile(h, 0.9))
                .fold(0.0, f64::max),
        })
    }

    /// The highest load observed over the last day (of what the history holds): what a move
    /// to a cheaper placement must hold besides the forecast's peak.
    pub fn recent_peak(&self) -> f64 {
        let day = usize::try_from(86_400 / self.config.step_secs.max(1)).unwrap_or(usize::MAX);
        self.history
            .iter()
            .rev()
            .take(day)
            .copied()
            .fold(0.0, f64::max)
    }

    /// The next event, oldest first.
    pub fn poll_event(&mut self) -> Option<PredictorEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf_model::{LoadLatencyPoint, PerformanceModel, PointSource};
    use crate::shadow_pool::VmType;

    fn model(saturation: f64) -> PerformanceModel {
        let points: Vec<LoadLatencyPoint> = (1..=18)
            .map(|i| {
                let load = saturation * f64::from(i) / 20.0;
                LoadLatencyPoint {
                    load,
                    latency_ms: 20.0 + 2.0 * saturation / (saturation - load),
                    source: PointSource::AmplifiedShadow { factor: 2.0 },
                }
            })
            .collect();
        PerformanceModel::fit(&points, 1).unwrap()
    }

    fn vm(name: &str, price: f64) -> VmType {
        VmType {
            name: name.into(),
            vcpus: 2,
            memory_gib: 8.0,
            price_per_hour: price,
            benchmark_score: None,
        }
    }

    /// Replays a load ramp from 20/s by 0.5/s every five minutes for 20 hours; returns when
    /// the first warning and the first move came, and whether the first fit said cold start.
    fn ramp(
        candidates: &[Candidate<'_>],
        max_instances: u32,
    ) -> (Option<Timestamp>, Option<(Timestamp, Placement)>, bool) {
        let mut predictor = WorkloadPredictor::new(
            ForecastConfig::every_five_minutes(),
            WarningPolicy {
                horizon_steps: 12,
                min_breach_steps: 2,
                ..WarningPolicy::default()
            },
            DecisionPolicy {
                max_instances,
                ..DecisionPolicy::default()
            },
            Placement {
                vm_type: "m.large".into(),
                count: 1,
                hourly_cost: 0.10,
            },
        );
        let (mut warned, mut moved, mut cold) = (None, None, false);
        for i in 0..240u64 {
            let now = i * 300;
            predictor.handle_load(now, 20.0 + 0.5 * i as f64).unwrap();
            predictor.handle_timeout(now, candidates);
            while let Some(event) = predictor.poll_event() {
                match event {
                    PredictorEvent::Refitted { at, model } if at == 3 * 300 => {
                        cold = matches!(model, ModelKind::ColdStart { .. });
                    }
                    PredictorEvent::Warning(w) if warned.is_none() => {
                        assert!(w.lead_secs > 0 && w.lead_secs <= 3600, "{w:?}");
                        warned = Some(now);
                    }
                    PredictorEvent::Decision(Decision::Move { to, .. }) if moved.is_none() => {
                        moved = Some((now, to));
                    }
                    _ => {}
                }
            }
        }
        (warned, moved, cold)
    }

    /// m.large's capacity at 200 ms is about 98/s, which the ramp reaches at step 156.
    const BREACH_AT: Timestamp = 156 * 300;

    #[test]
    fn warns_before_the_current_type_breaks_when_nothing_can_replace_it() {
        let m = vm("m.large", 0.10);
        let mm = model(100.0);
        let (warned, moved, cold) = ramp(
            &[Candidate {
                vm_type: &m,
                model: &mm,
                held_load: 0.0,
            }],
            1,
        );
        assert!(cold, "four samples are less than a season");
        let warned = warned.expect("warned");
        assert!(warned < BREACH_AT, "warned at {warned}");
        // Not more than the horizon (and a little) ahead: the ramp is steady.
        assert!(warned + 2 * 3600 > BREACH_AT, "warned at {warned}");
        assert_eq!(moved, None);
    }

    #[test]
    fn moves_to_the_proven_cheaper_type_before_the_breach() {
        let (m, c) = (vm("m.large", 0.10), vm("c.large", 0.085));
        let (mm, cm) = (model(100.0), model(250.0));
        let candidates = [
            Candidate {
                vm_type: &m,
                model: &mm,
                held_load: 0.0,
            },
            Candidate {
                vm_type: &c,
                model: &cm,
                held_load: 0.0,
            },
        ];
        let (_, moved, _) = ramp(&candidates, 64);
        let (at, to) = moved.expect("moved");
        assert!(at < BREACH_AT, "moved at {at}");
        assert_eq!(to.vm_type, "c.large");
    }

    #[test]
    fn a_cold_start_sizes_for_its_median_peak_not_its_wide_bound() {
        let mut predictor = WorkloadPredictor::new(
            ForecastConfig::for_step(60, 4 * 1440, 63),
            WarningPolicy {
                horizon_steps: 60,
                ..WarningPolicy::default()
            },
            DecisionPolicy::default(),
            Placement {
                vm_type: "m.large".into(),
                count: 1,
                hourly_cost: 0.10,
            },
        );
        // Half an hour of a noisy, rising load: far less than a season.
        let mut seen: f64 = 0.0;
        for i in 0..30u64 {
            let wobble = if i % 3 == 0 { 15.0 } else { -5.0 };
            let load = 80.0 + i as f64 + wobble;
            seen = seen.max(load);
            predictor.handle_load(i * 60, load).unwrap();
        }
        let f = predictor.forecaster().expect("fitted");
        assert!(matches!(f.kind(), ModelKind::ColdStart { .. }));
        let median = (1..=COLD_START_LOOKAHEAD_STEPS)
            .map(|h| f.median(h))
            .fold(0.0, f64::max);
        let bound = (1..=60).map(|h| f.quantile(h, 0.9)).fold(0.0, f64::max);
        let provisioned = predictor.provisioned_peak().expect("a forecast");
        assert!(
            bound > 1.2 * median,
            "the bound {bound} is wide against {median}"
        );
        assert!(
            (provisioned - median.max(seen)).abs() < 1e-9,
            "provisioned {provisioned}, median {median}, seen {seen}"
        );
    }
}
