//! Load forecasts per workload: how many exchanges/s to expect over the next hours, with honest
//! prediction intervals.
//!
//! The model is a seasonal decomposition followed by damped-trend exponential smoothing (Holt),
//! fitted by a small grid search that minimises the mean absolute error of multi-step forecasts
//! on the history itself; the loss we are judged by (WAPE, MASE) is an absolute error, so that is
//! what the fit minimises. We measured `augurs` (MSTL + AutoETS) against this on the real traces;
//! see `eval` and the issue note for the figures. The decomposition:
//!
//! 1. optionally take logs (load seasonality is usually multiplicative: the evening peak of a busy
//!    day is higher in absolute terms than that of a quiet one);
//! 2. remove a centred moving-average trend and average what is left per phase of the day,
//!    weighting recent days more (traffic patterns drift), smoothing neighbouring phases;
//! 3. run Holt on the deseasonalised series;
//! 4. blend with seasonal naive (the value one day earlier) where that helps;
//! 5. online, combine the result with persistence and seasonal naive by weights chosen from an
//!    out-of-sample track record of the forecasts already made (see `TrackRecord`): on series
//!    close to a random walk, or after a level shift the held-out days did not contain,
//!    persistence is hard to beat and the record finds out sooner than the next fit does.
//!
//! Every variant (logs or not, seasonal or not, smoothing constants, blend weight) is scored on
//! the last two days of history with a profile estimated from the days before them, and the best
//! is kept separately for each fit horizon.
//!
//! Prediction intervals come from the empirical distribution of the model's own multi-step errors
//! per horizon, not from a Gaussian assumption: load errors are skewed and heavy-tailed.
//!
//! Cold start: with less than one season of history there is no seasonal profile to estimate;
//! the model is plain Holt and says so in [`ModelKind::ColdStart`].

use crate::Timestamp;

/// Why a forecaster could not be fitted or updated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ForecastError {
    /// Fewer observations than the simplest model needs.
    #[error("{have} observations of history; at least {need} are needed")]
    TooLittleHistory {
        /// Observations supplied.
        have: usize,
        /// Observations needed.
        need: usize,
    },
    /// An observation is NaN, infinite or negative; load is a non-negative rate.
    #[error("observation {index} is {value}, not a non-negative finite rate")]
    BadObservation {
        /// Position in the supplied history.
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// A configuration field is out of range.
    #[error("forecast config field `{field}`: {reason}")]
    BadConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// How a workload's load series is modelled.
#[derive(Debug, Clone, PartialEq)]
pub struct ForecastConfig {
    /// Seconds between observations (60 for exchanges/s per minute).
    pub step_secs: u64,
    /// Observations per season (a day: 1,440 at one-minute steps).
    pub season_steps: usize,
    /// Most recent observations used for a fit (14 days by default).
    pub max_history: usize,
    /// Observations between refits; between refits the fitted model is updated online.
    pub refit_every: usize,
    /// Longest horizon, in steps, for which prediction intervals are calibrated.
    pub max_horizon: usize,
    /// Horizons (steps) whose in-sample absolute error the fit minimises.
    pub fit_horizons: Vec<usize>,
    /// Weight of each older day in the seasonal profile (1.0 = all days alike).
    pub season_day_decay: f64,
}

impl ForecastConfig {
    /// One observation per minute, daily season, 14 days of history, refit hourly.
    pub fn per_minute() -> Self {
        Self {
            step_secs: 60,
            season_steps: 1440,
            max_history: 14 * 1440,
            refit_every: 60,
            max_horizon: 1440,
            fit_horizons: vec![1, 5, 60, 1440],
            season_day_decay: 0.8,
        }
    }

    /// One observation every five minutes (CloudWatch's basic resolution), daily season.
    pub fn every_five_minutes() -> Self {
        Self {
            step_secs: 300,
            season_steps: 288,
            max_history: 14 * 288,
            refit_every: 12,
            max_horizon: 288,
            fit_horizons: vec![1, 12],
            season_day_decay: 0.8,
        }
    }

    /// One observation per `step_secs` (a coordinator's report interval), for series whose
    /// seasonality is unknown. The season is still a day, so a workload that has reported for
    /// more than a day gets a daily profile; until then (always, at one-second steps with
    /// `max_history_steps` below a day) the forecaster is the honest cold start, damped Holt with
    /// empirical intervals, and says so. History is capped at `max_history_steps` so a fit stays
    /// cheap at short steps.
    pub fn for_step(step_secs: u64, max_history_steps: usize, max_horizon: usize) -> Self {
        let step_secs = step_secs.max(1);
        let season_steps = usize::try_from(86_400 / step_secs)
            .unwrap_or(usize::MAX)
            .max(2);
        let max_horizon = max_horizon.max(1);
        let mut fit_horizons = vec![1];
        for h in [max_horizon / 4, max_horizon] {
            if h > *fit_horizons.last().unwrap_or(&1) {
                fit_horizons.push(h);
            }
        }
        Self {
            step_secs,
            season_steps,
            max_history: max_history_steps.max(MIN_FIT_HISTORY),
            refit_every: (max_horizon / 4).clamp(1, 60),
            max_horizon,
            fit_horizons,
            season_day_decay: 0.8,
        }
    }

    fn validate(&self) -> Result<(), ForecastError> {
        let bad = |field, reason| Err(ForecastError::BadConfig { field, reason });
        if self.step_secs == 0 {
            return bad("step_secs", "must be positive");
        }
        if self.season_steps < 2 {
            return bad("season_steps", "a season needs at least two steps");
        }
        if self.max_history < 2 {
            return bad("max_history", "must keep at least two observations");
        }
        if self.max_horizon == 0 {
            return bad("max_horizon", "must be positive");
        }
        if self.fit_horizons.is_empty() || self.fit_horizons.contains(&0) {
            return bad("fit_horizons", "must be non-empty positive step counts");
        }
        if !(self.season_day_decay > 0.0 && self.season_day_decay <= 1.0) {
            return bad("season_day_decay", "must be in (0, 1]");
        }
        Ok(())
    }
}

impl Default for ForecastConfig {
    fn default() -> Self {
        Self::per_minute()
    }
}

/// Which model produced a forecast; shown to users so a cold start is never mistaken for a
/// seasonal forecast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelKind {
    /// A daily seasonal profile plus damped Holt, for at least one horizon.
    SeasonalHolt {
        /// Days of history the seasonal profile rests on.
        season_days: f64,
    },
    /// History covers a season, but on the held-out days the seasonal profile did not beat
    /// leaving it out, at any horizon: plain Holt.
    Holt {
        /// Days of history.
        history_days: f64,
    },
    /// Less than one season of history: plain Holt, no seasonal profile can be estimated yet.
    ColdStart {
        /// Observations available.
        history_steps: usize,
        /// Observations a seasonal model needs.
        season_steps: usize,
    },
}

/// How one horizon group is forecast (the fit picks the best variant per fit horizon).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ComponentSummary {
    /// The fit horizon (steps) this component was selected for.
    pub fit_horizon: usize,
    /// Whether it models logs (multiplicative seasonality).
    pub log: bool,
    /// Whether it has a seasonal profile.
    pub seasonal: bool,
    /// Level smoothing.
    pub alpha: f64,
    /// Trend smoothing.
    pub beta: f64,
    /// Trend damping.
    pub phi: f64,
    /// Weight of the smoothing model in its blend with seasonal naive.
    pub blend: f64,
}

/// One step of a forecast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ForecastPoint {
    /// When the forecast load applies.
    pub at: Timestamp,
    /// Median forecast (exchanges/s).
    pub median: f64,
    /// 80 % prediction interval.
    pub lo80: f64,
    /// 80 % prediction interval.
    pub hi80: f64,
    /// 95 % prediction interval.
    pub lo95: f64,
    /// 95 % prediction interval.
    pub hi95: f64,
}

/// A workload's load forecast over a horizon.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadForecast {
    /// When it was made (the time of the last observation).
    pub issued_at: Timestamp,
    /// Which model made it.
    pub model: ModelKind,
    /// One point per step, the first one step after `issued_at`.
    pub points: Vec<ForecastPoint>,
}

impl LoadForecast {
    /// The highest upper 95 % bound over the forecast: the load to provision for.
    pub fn peak_hi95(&self) -> f64 {
        self.points.iter().map(|p| p.hi95).fold(0.0, f64::max)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Transform {
    Identity,
    Log { offset: f64 },
}

impl Transform {
    fn forward(self, y: f64) -> f64 {
        match self {
            Self::Identity => y,
            Self::Log { offset } => (y + offset).ln(),
        }
    }

    fn inverse(self, z: f64) -> f64 {
        match self {
            Self::Identity => z.max(0.0),
            Self::Log { offset } => (z.exp() - offset).max(0.0),
        }
    }
}

/// Smallest history a configuration may keep.
const MIN_FIT_HISTORY: usize = 16;

/// Quantile levels stored per horizon bucket: 1 %, 2 %, …, 99 %.
const QUANTILES: usize = 99;
/// Horizons (steps) at which residual distributions are kept; others use the next larger one.
const BUCKETS: &[usize] = &[
    1, 2, 3, 5, 8, 12, 18, 24, 36, 48, 60, 90, 120, 180, 240, 360, 480, 720, 1080, 1440, 2880,
];
/// Weights of the smoothing model in its blend with seasonal naive (the rest goes to the value
/// one season earlier). Series whose days repeat to the minute (batch jobs, cron) are forecast
/// best by last season's value; smooth ones by the model; many by a mix.
const BLENDS: &[f64] = &[1.0, 0.5, 0.0];
/// Level smoothing candidates.
const ALPHAS: &[f64] = &[0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.7, 0.85, 1.0];
/// Variants averaged per fit horizon: the best few on the held-out days, not the single best,
/// because picking one of dozens on two days of data picks noise as often as skill.
const COMBINED: usize = 3;
/// Origins per horizon used for residual distributions; more adds time, not accuracy.
const MAX_SCORED_ORIGINS: usize = 3000;
/// Days held out at the end of history to choose among model variants.
const VALIDATION_DAYS: f64 = 2.0;

/// Half-life of the out-of-sample track record that weighs the model against the naive
/// forecasts, in seasons (scored forecasts, not wall time).
const TRACK_HALF_LIFE_SEASONS: f64 = 3.0;
/// Scored forecasts (in seasons) a horizon's track record needs before it may move weight away
/// from the model: a few hours of luck must not hand the forecast to persistence.
const TRACK_MIN_SEASONS: f64 = 0.25;
/// Steps of the combination weights (model, persistence, seasonal naive) on the simplex.
const COMBINATION_STEPS: usize = 4;

/// A variant's validation score and what it is: (MAE, transform, seasonal, params, blend).
type Choice = (f64, Transform, bool, Params, f64);

#[derive(Debug, Clone, Copy, PartialEq)]
struct Params {
    alpha: f64,
    beta: f64,
    phi: f64,
}

/// One model variant with its online state.
#[derive(Debug, Clone, PartialEq)]
struct Component {
    fit_horizon: usize,
    transform: Transform,
    params: Params,
    /// Weight of the smoothing model against seasonal naive.
    blend: f64,
    /// Seasonal profile in transformed units, indexed by phase; empty when non-seasonal.
    season: Vec<f64>,
    level: f64,
    trend: f64,
}

impl Component {
    fn update(&mut self, step: u64, value: f64) {
        let x = self.transform.forward(value) - season_at(&self.season, step);
        let previous = self.level;
        let p = self.params;
        self.level = p.alpha * x + (1.0 - p.alpha) * (self.level + p.phi * self.trend);
        self.trend = p.beta * (self.level - previous) + (1.0 - p.beta) * p.phi * self.trend;
    }

    fn coast(&mut self) {
        self.level += self.params.phi * self.trend;
        self.trend *= self.params.phi;
    }

    fn point(&self, last_step: u64, h: usize) -> f64 {
        self.level
            + damped_sum(self.params.phi, h) * self.trend
            + season_at(&self.season, last_step + h as u64)
    }
}

/// A fitted load model with its online state. Update it with [`LoadForecaster::observe`] between
/// refits; refit on the schedule [`ForecastConfig::refit_every`].
///
/// The fit keeps one variant per fit horizon: the smoothing that forecasts the next minute best
/// is rarely the one that forecasts the next hour best, and the variants share everything but a
/// few numbers of state.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadForecaster {
    config: ForecastConfig,
    kind: ModelKind,
    components: Vec<Component>,
    /// Step index (time / step) of the last observation.
    last_step: u64,
    /// The last season of observations (oldest first), for the seasonal-naive part of blends.
    recent: std::collections::VecDeque<f64>,
    /// Sorted residual quantiles (transformed units of the bucket's component) per horizon.
    residuals: Vec<(usize, Vec<f64>)>,
    /// How the model did against persistence and seasonal naive on forecasts it made online,
    /// scored as their actuals came in: the weights of the combined forecast.
    track: TrackRecord,
}

/// The out-of-sample record of the model against the two naive forecasts, per fit horizon.
///
/// The fit chooses variants on two held-out days, a small sample: on series close to a random
/// walk (several CloudWatch metrics, WorldCup at an hour) that choice loses to persistence on
/// the next days about as often as it wins. So the forecast actually served is a convex
/// combination of the model, persistence and seasonal naive, with the weights (a grid in
/// quarters) that had the smallest exponentially weighted absolute error on the forecasts made
/// online since the record began, every one of them scored only once its actual arrived. The
/// record survives refits ([`LoadForecaster::refit`]): it scores forecasts, not fits.
#[derive(Debug, Clone, PartialEq)]
struct TrackRecord {
    /// The horizons tracked (the fit horizons).
    horizons: Vec<usize>,
    /// Candidate weights (model, persistence, seasonal naive); the first is the model alone.
    candidates: Vec<[f64; 3]>,
    /// Per horizon: forecasts awaiting their actual, as (target step, [model, persistence,
    /// seasonal naive]), oldest first.
    pending: Vec<std::collections::VecDeque<(u64, [f64; 3])>>,
    /// Per horizon and candidate: exponentially weighted sum of absolute errors.
    errors: Vec<Vec<f64>>,
    /// Per horizon: exponentially weighted count of scored forecasts.
    scored: Vec<f64>,
    /// Per horizon: the candidate in use.
    chosen: Vec<usize>,
    /// Decay of the sums per scored forecast.
    decay: f64,
    /// Scored forecasts (weighted count) needed before leaving the model alone.
    min_scored: f64,
}

impl TrackRecord {
    fn new(config: &ForecastConfig) -> Self {
        let mut candidates = vec![[1.0, 0.0, 0.0]];
        for a in 0..=COMBINATION_STEPS {
            for b in 0..=COMBINATION_STEPS - a {
                let c = COMBINATION_STEPS - a - b;
                let w = [a, b, c].map(|k| k as f64 / COMBINATION_STEPS as f64);
                if a != COMBINATION_STEPS {
                    candidates.push(w);
                }
            }
        }
        let horizons = config.fit_horizons.clone();
        let k = horizons.len();
        let season = config.season_steps as f64;
        Self {
            horizons,
            pending: vec![std::collections::VecDeque::new(); k],
            errors: vec![vec![0.0; candidates.len()]; k],
            scored: vec![0.0; k],
            chosen: vec![0; k],
            candidates,
            decay: 0.5f64.powf(1.0 / (TRACK_HALF_LIFE_SEASONS * season).max(1.0)),
            min_scored: (TRACK_MIN_SEASONS * season).max(1.0),
        }
    }

    /// The tracked horizon nearest `h` on a log scale.
    fn slot_for(&self, h: usize) -> usize {
        let target = (h as f64).ln();
        (0..self.horizons.len())
            .min_by(|&a, &b| {
                let da = ((self.horizons[a] as f64).ln() - target).abs();
                let db = ((self.horizons[b] as f64).ln() - target).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(0)
    }

    fn weights(&self, h: usize) -> [f64; 3] {
        let slot = self.slot_for(h);
        self.chosen
            .get(slot)
            .map_or([1.0, 0.0, 0.0], |&c| self.candidates[c])
    }

    /// Scores the forecasts that targeted `step` with the value observed there, drops those
    /// whose target passed unobserved, and updates the choice of weights.
    fn score(&mut self, step: u64, value: f64) {
        for slot in 0..self.horizons.len() {
            while let Some(&(target, forecasts)) = self.pending[slot].front() {
                if target > step {
                    break;
                }
                self.pending[slot].pop_front();
                if target < step {
                    continue;
                }
                for (error, w) in self.errors[slot].iter_mut().zip(&self.candidates) {
                    let combined = w[0] * forecasts[0] + w[1] * forecasts[1] + w[2] * forecasts[2];
                    *error = self.decay * *error + (combined - value).abs();
                }
                self.scored[slot] = self.decay * self.scored[slot] + 1.0;
            }
            self.chosen[slot] = if self.scored[slot] < self.min_scored {
                0
            } else {
                // Ties go to the first, so to the model alone.
                let errors = &self.errors[slot];
                (0..errors.len()).fold(0, |best, c| if errors[c] < errors[best] { c } else { best })
            };
        }
    }
}

impl LoadForecaster {
    /// Fits a model to `history`, whose last value was observed at `now`, one value per step.
    pub fn fit(
        config: &ForecastConfig,
        history: &[f64],
        now: Timestamp,
    ) -> Result<Self, ForecastError> {
        config.validate()?;
        if let Some((index, &value)) = history
            .iter()
            .enumerate()
            .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
        {
            return Err(ForecastError::BadObservation { index, value });
        }
        let history = &history[history.len().saturating_sub(config.max_history)..];
        let n = history.len();
        if n < 4 {
            return Err(ForecastError::TooLittleHistory { have: n, need: 4 });
        }
        let m = config.season_steps;
        let last_step = now / config.step_secs;
        let first_step = last_step + 1 - n as u64;
        let mean = history.iter().sum::<f64>() / n as f64;
        let transforms = [
            Transform::Identity,
            // The offset keeps zeros finite and makes small values behave additively.
            Transform::Log {
                offset: (0.1 * mean).max(1e-9),
            },
        ];
        // Variants are chosen on the last days of history with a profile estimated only from
        // the days before them: scored in-sample, a profile fitted to the very days it is judged
        // on always looks good and pushes the smoothing towards ignoring new data.
        let validation = ((VALIDATION_DAYS * m as f64) as usize).min(n / 4).max(1);
        let fit_horizons = &config.fit_horizons;
        // The best COMBINED variants per fit horizon, best first.
        let mut best: Vec<Vec<Choice>> = vec![Vec::new(); fit_horizons.len()];
        for transform in transforms {
            let z: Vec<f64> = history.iter().map(|&y| transform.forward(y)).collect();
            let held_out_profile = seasonal_profile(config, &z[..n - validation], first_step);
            let variants: &[bool] = if held_out_profile.is_empty() {
                &[false]
            } else {
                &[true, false]
            };
            for &seasonal in variants {
                let season: &[f64] = if seasonal { &held_out_profile } else { &[] };
                let x = deseasonalise(&z, season, first_step);
                for &alpha in ALPHAS {
                    for (beta, phi) in [(0.0, 1.0), (0.05 * alpha, 0.9)] {
                        let params = Params { alpha, beta, phi };
                        let scores = validation_mae(
                            config, history, &x, season, first_step, transform, params, validation,
                        );
                        for (slot, per_blend) in best.iter_mut().zip(scores) {
                            for (&blend, score) in BLENDS.iter().zip(per_blend) {
                                let at = slot.partition_point(|(s, ..)| *s <= score);
                                if at < COMBINED {
                                    slot.insert(at, (score, transform, seasonal, params, blend));
                                    slot.truncate(COMBINED);
                                }
                            }
                        }
                    }
                }
            }
        }
        let mut components = Vec::new();
        for (&fit_horizon, choices) in fit_horizons.iter().zip(best) {
            if choices.is_empty() {
                return Err(ForecastError::TooLittleHistory { have: n, need: 4 });
            }
            for (_, transform, seasonal, params, blend) in choices {
                let z: Vec<f64> = history.iter().map(|&y| transform.forward(y)).collect();
                let season = if seasonal {
                    seasonal_profile(config, &z, first_step)
                } else {
                    Vec::new()
                };
                let x = deseasonalise(&z, &season, first_step);
                let (level, trend) = run_holt(&x, params, |_, _, _| {});
                components.push(Component {
                    fit_horizon,
                    transform,
                    params,
                    blend,
                    season,
                    level,
                    trend,
                });
            }
        }
        let days = n as f64 / m as f64;
        let kind = if n < m {
            ModelKind::ColdStart {
                history_steps: n,
                season_steps: m,
            }
        } else if components.iter().any(|c| !c.season.is_empty()) {
            ModelKind::SeasonalHolt { season_days: days }
        } else {
            ModelKind::Holt { history_days: days }
        };
        let mut model = Self {
            config: config.clone(),
            kind,
            components,
            last_step,
            recent: history[n.saturating_sub(m)..].iter().copied().collect(),
            residuals: Vec::new(),
            track: TrackRecord::new(config),
        };
        model.residuals = residual_quantiles(&model, history, first_step);
        Ok(model)
    }

    /// Fits a new model to `history` (as [`LoadForecaster::fit`] with this one's configuration)
    /// and carries over the out-of-sample track record that weighs the model against the naive
    /// forecasts: the record scores forecasts as their actuals arrive, and a refit must not
    /// throw it away.
    pub fn refit(&self, history: &[f64], now: Timestamp) -> Result<Self, ForecastError> {
        let mut model = Self::fit(&self.config, history, now)?;
        model.track = self.track.clone();
        Ok(model)
    }

    /// The weights (model, persistence, seasonal naive) of the forecast `h` steps ahead, from
    /// the out-of-sample track record; `[1, 0, 0]` until it has scored enough forecasts.
    pub fn combination_weights(&self, h: usize) -> [f64; 3] {
        self.track.weights(h)
    }

    /// The model in use.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    /// What each horizon group uses.
    pub fn components(&self) -> Vec<ComponentSummary> {
        self.components
            .iter()
            .map(|c| ComponentSummary {
                fit_horizon: c.fit_horizon,
                log: matches!(c.transform, Transform::Log { .. }),
                seasonal: !c.season.is_empty(),
                alpha: c.params.alpha,
                beta: c.params.beta,
                phi: c.params.phi,
                blend: c.blend,
            })
            .collect()
    }

    /// The configuration it was fitted with.
    pub fn config(&self) -> &ForecastConfig {
        &self.config
    }

    /// The last `n` observations (at most a season; unobserved steps repeat the last value),
    /// oldest first: what live evidence ([`crate::warning::live_pressure`]) reads.
    pub fn recent_tail(&self, n: usize) -> Vec<f64> {
        let skip = self.recent.len().saturating_sub(n);
        self.recent.iter().skip(skip).copied().collect()
    }

    /// Time of the last observation the state includes.
    pub fn last_observed_at(&self) -> Timestamp {
        self.last_step * self.config.step_secs
    }

    /// Updates the state with the value observed at `at`. Missing steps in between are treated as
    /// unobserved (the state coasts on its forecast). Returns `false` and ignores the value if it
    /// is not newer than the last one, or not a finite non-negative rate.
    pub fn observe(&mut self, at: Timestamp, value: f64) -> bool {
        let step = at / self.config.step_secs;
        if step <= self.last_step || !(value.is_finite() && value >= 0.0) {
            return false;
        }
        for component in &mut self.components {
            for _ in self.last_step + 1..step {
                component.coast();
            }
            component.update(step, value);
        }
        let m = self.config.season_steps;
        for _ in self.last_step + 1..step {
            // An unobserved step repeats the last value, as persistence would.
            let last = self.recent.back().copied().unwrap_or(value);
            self.recent.push_back(last);
        }
        self.recent.push_back(value);
        while self.recent.len() > m {
            self.recent.pop_front();
        }
        self.last_step = step;
        self.track.score(step, value);
        for slot in 0..self.track.horizons.len() {
            let h = self.track.horizons[slot];
            let model = self.model_mean(h);
            let forecasts = [model, value, self.seasonal_naive(h).unwrap_or(model)];
            self.track.pending[slot].push_back((step + h as u64, forecasts));
        }
        true
    }

    /// The components that forecast horizon `h`: those fitted for the nearest fit horizon on a
    /// log scale (they are stored together, best first).
    fn group_for(&self, h: usize) -> &[Component] {
        let target = (h as f64).ln();
        let distance = |c: &Component| ((c.fit_horizon as f64).ln() - target).abs();
        let nearest = self
            .components
            .iter()
            .map(|c| c.fit_horizon)
            .min_by(|a, b| {
                let da = ((*a as f64).ln() - target).abs();
                let db = ((*b as f64).ln() - target).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(1);
        let start = self
            .components
            .iter()
            .position(|c| c.fit_horizon == nearest)
            .unwrap_or(0);
        let len = self.components[start..]
            .iter()
            .take_while(|c| c.fit_horizon == nearest && distance(c).is_finite())
            .count()
            .max(1);
        &self.components[start..start + len]
    }

    /// The value observed one (or more) seasons before the step `h` ahead, if remembered.
    fn seasonal_naive(&self, h: usize) -> Option<f64> {
        let m = self.config.season_steps;
        let back = m * h.div_ceil(m) - h;
        let len = self.recent.len();
        (back < len && len == m).then(|| self.recent[len - 1 - back])
    }

    /// The model's own forecast `h` steps ahead (its variants averaged), in original units.
    fn model_mean(&self, h: usize) -> f64 {
        let group = self.group_for(h);
        let naive = self.seasonal_naive(h);
        group
            .iter()
            .map(|c| {
                let model = c.transform.inverse(c.point(self.last_step, h));
                match naive {
                    Some(naive) => c.blend * model + (1.0 - c.blend) * naive,
                    None => model,
                }
            })
            .sum::<f64>()
            / group.len() as f64
    }

    /// The model's own forecast `h` steps ahead in the best component's transformed units: the
    /// centre of the prediction distribution. The residual quantiles are the model's own errors
    /// around exactly this, so quantiles and exceedance probabilities use it, not the combined
    /// median: the track record weighs the naive forecasts for absolute error only and says
    /// nothing about the spread around them. (Measured: centring the distribution on the combined
    /// median instead lowered warning recall on the traces from 0.626 to 0.60–0.62 at more false
    /// alarms a day.)
    fn model_point_transformed(&self, h: usize) -> (&Component, f64) {
        let c = &self.group_for(h)[0];
        (c, c.transform.forward(self.model_mean(h)))
    }

    /// The median forecast `h` steps ahead, the model combined with the naive forecasts by the
    /// track record's weights, in the best component's transformed units.
    fn point_transformed(&self, h: usize) -> (&Component, f64) {
        let model = self.model_mean(h);
        let [w_model, w_persistence, w_seasonal] = self.track.weights(h);
        let mean = if w_model >= 1.0 {
            model
        } else {
            let last = self.recent.back().copied().unwrap_or(model);
            let seasonal = self.seasonal_naive(h).unwrap_or(model);
            w_model * model + w_persistence * last + w_seasonal * seasonal
        };
        let c = &self.group_for(h)[0];
        (c, c.transform.forward(mean))
    }

    /// Median forecast `h` steps after the last observation.
    pub fn median(&self, h: usize) -> f64 {
        let (c, z) = self.point_transformed(h);
        c.transform.inverse(z)
    }

    /// Forecast quantile `q` in (0, 1) `h` steps ahead.
    pub fn quantile(&self, h: usize, q: f64) -> f64 {
        let (c, z) = self.model_point_transformed(h);
        let r = interpolate_quantile(&self.residuals_for(h), q);
        c.transform.inverse(z + r)
    }

    /// Probability that the load `h` steps ahead exceeds `threshold`.
    pub fn exceedance_probability(&self, h: usize, threshold: f64) -> f64 {
        if threshold <= 0.0 {
            return 1.0;
        }
        let (c, z) = self.model_point_transformed(h);
        let gap = c.transform.forward(threshold) - z;
        1.0 - cdf_from_quantiles(&self.residuals_for(h), gap)
    }

    /// The forecast for the next `steps` steps.
    pub fn forecast(&self, steps: usize) -> LoadForecast {
        let issued_at = self.last_observed_at();
        let points = (1..=steps)
            .map(|h| ForecastPoint {
                at: issued_at + h as u64 * self.config.step_secs,
                median: self.median(h),
                lo80: self.quantile(h, 0.10),
                hi80: self.quantile(h, 0.90),
                lo95: self.quantile(h, 0.025),
                hi95: self.quantile(h, 0.975),
            })
            .collect();
        LoadForecast {
            issued_at,
            model: self.kind,
            points,
        }
    }

    /// Residual quantiles for horizon `h`, widened by √(h / bucket) beyond the longest bucket
    /// that history could calibrate (random-walk growth of uncertainty).
    fn residuals_for(&self, h: usize) -> std::borrow::Cow<'_, [f64]> {
        use std::borrow::Cow;
        match self.residuals.iter().find(|(b, _)| *b >= h) {
            Some((_, q)) => Cow::Borrowed(q.as_slice()),
            None => match self.residuals.last() {
                Some((b, q)) => {
                    let widen = (h as f64 / *b as f64).sqrt();
                    Cow::Owned(q.iter().map(|r| r * widen).collect())
                }
                None => Cow::Owned(vec![0.0; QUANTILES]),
            },
        }
    }
}

fn season_at(season: &[f64], step: u64) -> f64 {
    if season.is_empty() {
        0.0
    } else {
        season[(step % season.len() as u64) as usize]
    }
}

fn deseasonalise(z: &[f64], season: &[f64], first_step: u64) -> Vec<f64> {
    z.iter()
        .enumerate()
        .map(|(i, &v)| v - season_at(season, first_step + i as u64))
        .collect()
}

fn damped_sum(phi: f64, h: usize) -> f64 {
    if phi >= 1.0 {
        h as f64
    } else {
        phi * (1.0 - phi.powi(h as i32)) / (1.0 - phi)
    }
}

/// Runs Holt over `x`, calling `visit(i, level, trend)` after each observation `i`; returns the
/// final state.
fn run_holt(x: &[f64], p: Params, mut visit: impl FnMut(usize, f64, f64)) -> (f64, f64) {
    let mut level = x[0];
    let mut trend = 0.0;
    visit(0, level, trend);
    for (i, &v) in x.iter().enumerate().skip(1) {
        let previous = level;
        level = p.alpha * v + (1.0 - p.alpha) * (level + p.phi * trend);
        trend = p.beta * (level - previous) + (1.0 - p.beta) * p.phi * trend;
        visit(i, level, trend);
    }
    (level, trend)
}

/// Daily profile (transformed units, zero mean) or empty when history is shorter than a season.
fn seasonal_profile(config: &ForecastConfig, z: &[f64], first_step: u64) -> Vec<f64> {
    let m = config.season_steps;
    let n = z.len();
    if n < m {
        return Vec::new();
    }
    // Centred moving average over one season, by prefix sums; clamped at the edges.
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0.0);
    for &v in z {
        prefix.push(prefix[prefix.len() - 1] + v);
    }
    let half = m / 2;
    let mut sums = vec![0.0; m];
    let mut weights = vec![0.0; m];
    let days = n as f64 / m as f64;
    for (i, &v) in z.iter().enumerate() {
        let start = i.saturating_sub(half).min(n - m);
        let trend = (prefix[start + m] - prefix[start]) / m as f64;
        let age_days = ((n - 1 - i) / m) as i32;
        let w = config.season_day_decay.powi(age_days);
        let phase = ((first_step + i as u64) % m as u64) as usize;
        sums[phase] += w * (v - trend);
        weights[phase] += w;
    }
    let raw: Vec<f64> = sums
        .iter()
        .zip(&weights)
        .map(|(s, w)| if *w > 0.0 { s / w } else { 0.0 })
        .collect();
    // Smooth over neighbouring phases (about five minutes either side at one-minute steps), so
    // one noisy day does not carve its noise into every future day.
    let radius = (m / 288).max(usize::from(m >= 96));
    let mut smooth = vec![0.0; m];
    for (phase, out) in smooth.iter_mut().enumerate() {
        let mut acc = 0.0;
        for k in 0..=2 * radius {
            acc += raw[(phase + m + k - radius) % m];
        }
        *out = acc / (2 * radius + 1) as f64;
    }
    let mean = smooth.iter().sum::<f64>() / m as f64;
    // One day of history gives a noisy profile; shrink it towards flat until a second day agrees.
    let shrink = (days / (days + 0.5)).min(1.0);
    smooth.iter().map(|s| (s - mean) * shrink).collect()
}

/// The value one or more seasons before target index `j`, if history has it.
fn naive_at(y: &[f64], m: usize, j: usize, h: usize) -> Option<f64> {
    let back = m * h.div_ceil(m);
    (j >= back).then(|| y[j - back])
}

/// Mean absolute error (original units) per fit horizon and blend weight over targets in the
/// last `validation` observations.
#[expect(
    clippy::too_many_arguments,
    reason = "an inner loop of the fit; a struct would only rename the arguments"
)]
fn validation_mae(
    config: &ForecastConfig,
    y: &[f64],
    x: &[f64],
    season: &[f64],
    first_step: u64,
    transform: Transform,
    p: Params,
    validation: usize,
) -> Vec<Vec<f64>> {
    let n = x.len();
    let m = config.season_steps;
    let fit_horizons = &config.fit_horizons;
    let damped: Vec<f64> = fit_horizons.iter().map(|&h| damped_sum(p.phi, h)).collect();
    let mut totals = vec![vec![0.0; BLENDS.len()]; fit_horizons.len()];
    let mut counts = vec![0.0; fit_horizons.len()];
    let first_target = n - validation;
    // Recent errors count more (half-weight half a season back): after a regime change the
    // variant that tracks the new regime should win, not the one that fitted the old one best.
    let half_life = (m as f64 / 2.0).max(1.0);
    let weights: Vec<f64> = (0..validation)
        .map(|age| 0.5f64.powf((validation - 1 - age) as f64 / half_life))
        .collect();
    run_holt(x, p, |i, level, trend| {
        for (k, (&h, &d)) in fit_horizons.iter().zip(&damped).enumerate() {
            let j = i + h;
            if j >= first_target && j < n {
                let step = first_step + j as u64;
                let model = transform.inverse(level + d * trend + season_at(season, step));
                let naive = naive_at(y, m, j, h).unwrap_or(model);
                let weight = weights[j - first_target];
                for (total, &w) in totals[k].iter_mut().zip(BLENDS) {
                    *total += weight * (w * model + (1.0 - w) * naive - y[j]).abs();
                }
                counts[k] += weight;
            }
        }
    });
    totals
        .into_iter()
        .zip(&counts)
        .map(|(t, &c)| {
            t.into_iter()
                .zip(BLENDS)
                // Nothing to score (history shorter than the horizon): prefer the smoothest pure
                // model, deterministically.
                .map(|(t, &w)| if c > 0.0 { t / c } else { -p.alpha - w })
                .collect()
        })
        .collect()
}

/// Sorted percentiles of the model's own errors (transformed units) per bucket horizon.
fn residual_quantiles(
    model: &LoadForecaster,
    history: &[f64],
    first_step: u64,
) -> Vec<(usize, Vec<f64>)> {
    let n = history.len();
    let m = model.config.season_steps;
    let max_horizon = model.config.max_horizon;
    let buckets: Vec<usize> = BUCKETS
        .iter()
        .copied()
        .filter(|&b| b < max_horizon)
        .chain(std::iter::once(max_horizon))
        .collect();
    let warmup = (n / 10).max(1);
    let stride = n.div_ceil(MAX_SCORED_ORIGINS).max(1);
    let origins: Vec<usize> = (warmup..n).step_by(stride).collect();
    let mut errors: Vec<Vec<f64>> = vec![Vec::new(); buckets.len()];
    let mut start = 0;
    while start < model.components.len() {
        let fit_horizon = model.components[start].fit_horizon;
        let len = model.components[start..]
            .iter()
            .take_while(|c| c.fit_horizon == fit_horizon)
            .count();
        let group = &model.components[start..start + len];
        start += len;
        let mine: Vec<(usize, usize)> = buckets
            .iter()
            .enumerate()
            .filter(|(_, h)| model.group_for(**h)[0].fit_horizon == fit_horizon)
            .map(|(k, h)| (k, *h))
            .collect();
        if mine.is_empty() {
            continue;
        }
        // Sum of the members' (blended) forecasts per bucket and origin, original units.
        let mut sums = vec![vec![0.0; origins.len()]; mine.len()];
        for c in group {
            let z: Vec<f64> = history.iter().map(|&y| c.transform.forward(y)).collect();
            let x = deseasonalise(&z, &c.season, first_step);
            let mut slot = 0;
            run_holt(&x, c.params, |i, level, trend| {
                if slot >= origins.len() || origins[slot] != i {
                    return;
                }
                for (b, &(_, h)) in mine.iter().enumerate() {
                    let j = i + h;
                    if j < n {
                        let step = first_step + j as u64;
                        let model = c.transform.inverse(
                            level
                                + damped_sum(c.params.phi, h) * trend
                                + season_at(&c.season, step),
                        );
                        sums[b][slot] += match naive_at(history, m, j, h) {
                            Some(naive) => c.blend * model + (1.0 - c.blend) * naive,
                            None => model,
                        };
                    }
                }
                slot += 1;
            });
        }
        let t = group[0].transform;
        for (b, &(k, h)) in mine.iter().enumerate() {
            for (slot, &i) in origins.iter().enumerate() {
                if i + h < n {
                    let mean = sums[b][slot] / group.len() as f64;
                    errors[k].push(t.forward(history[i + h]) - t.forward(mean));
                }
            }
        }
    }
    let mut out = Vec::new();
    for (h, mut e) in buckets.into_iter().zip(errors) {
        // Fewer than 20 errors say little about a tail; a shorter horizon stands in (widened).
        if e.len() < 20 {
            break;
        }
        e.sort_by(f64::total_cmp);
        let q = (1..=QUANTILES)
            .map(|k| {
                let pos = k as f64 / (QUANTILES + 1) as f64 * (e.len() - 1) as f64;
                let lo = pos.floor() as usize;
                let frac = pos - lo as f64;
                e[lo] + frac * (e[(lo + 1).min(e.len() - 1)] - e[lo])
            })
            .collect();
        out.push((h, q));
    }
    if out.is_empty() {
        // Very short history: one-step differences stand in for errors.
        let c = &model.components[0];
        let mut d: Vec<f64> = history
            .windows(2)
            .map(|w| c.transform.forward(w[1]) - c.transform.forward(w[0]))
            .collect();
        d.sort_by(f64::total_cmp);
        let q = (1..=QUANTILES)
            .map(|k| d[(k * (d.len() - 1)) / (QUANTILES + 1)])
            .collect();
        out.push((1, q));
    }
    out
}

/// Value at quantile `q` from percentiles 1..=99 (clamped outside them).
fn interpolate_quantile(percentiles: &[f64], q: f64) -> f64 {
    let pos = (q * (QUANTILES + 1) as f64 - 1.0).clamp(0.0, (QUANTILES - 1) as f64);
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(QUANTILES - 1);
    let frac = pos - lo as f64;
    percentiles[lo] + frac * (percentiles[hi] - percentiles[lo])
}

/// P(residual ≤ r) from percentiles 1..=99, linear between them, 0/1 beyond.
fn cdf_from_quantiles(percentiles: &[f64], r: f64) -> f64 {
    let below = percentiles.partition_point(|&p| p <= r);
    if below == 0 {
        return if r < percentiles[0] { 0.0 } else { 0.01 };
    }
    if below >= percentiles.len() {
        return 1.0;
    }
    let (a, b) = (percentiles[below - 1], percentiles[below]);
    let frac = if b > a { (r - a) / (b - a) } else { 0.0 };
    (below as f64 + frac) / (QUANTILES + 1) as f64
}

#[cfg(test)]
mod tests;
