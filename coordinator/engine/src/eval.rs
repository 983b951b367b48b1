//! Offline evaluation of the predictor on in-memory series: walk-forward forecast backtests
//! against naive baselines (persistence, daily and weekly seasonal naive, zero, the training
//! mean), degradation-warning replays against a
//! capacity threshold, and the simulated VM catalog for the choice of type.
//!
//! Reading trace files is the caller's job (`cargo xtask eval predictor`); this module only
//! computes, so it stays sans-IO like the rest of the engine.

use crate::Timestamp;
use crate::forecast::{ForecastConfig, ForecastError, LoadForecaster};
use crate::warning::{
    BreachCombine, LiveRule, WarningPolicy, breach_scores, hysteresis, live_pressure,
};

/// Errors of one horizon for one method, accumulated over the test period.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ErrorSum {
    /// Σ |forecast − actual|.
    pub abs_error: f64,
    /// Σ actual.
    pub actual: f64,
    /// Number of forecasts scored.
    pub count: usize,
}

impl ErrorSum {
    fn add(&mut self, forecast: f64, actual: f64) {
        self.abs_error += (forecast - actual).abs();
        self.actual += actual.abs();
        self.count += 1;
    }

    /// Weighted absolute percentage error: Σ|e| / Σ|y|.
    pub fn wape(&self) -> f64 {
        if self.actual > 0.0 {
            self.abs_error / self.actual
        } else {
            f64::NAN
        }
    }

    /// Mean absolute error.
    pub fn mae(&self) -> f64 {
        if self.count > 0 {
            self.abs_error / self.count as f64
        } else {
            f64::NAN
        }
    }
}

/// One horizon's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct HorizonScore {
    /// Horizon in steps.
    pub steps: usize,
    /// The forecaster.
    pub model: ErrorSum,
    /// Last value carried forward.
    pub persistence: ErrorSum,
    /// Value one season earlier.
    pub seasonal_naive: ErrorSum,
    /// Value one week earlier, where the test part has a week of history before it at every
    /// origin (else `None`).
    pub weekly_naive: Option<ErrorSum>,
    /// Zero: a forecast that says nothing (its WAPE is 1 by definition). On sparse or spiky
    /// series the other baselines can do worse, and a gain over them is then no gain.
    pub zero: ErrorSum,
    /// The training part's mean, every time.
    pub mean: ErrorSum,
    /// In-sample MAE of one-step persistence on the training part: the MASE scale (Hyndman).
    pub mase_scale: f64,
}

impl HorizonScore {
    /// MASE of a method: its MAE over the in-sample one-step naive MAE.
    pub fn mase(&self, e: &ErrorSum) -> f64 {
        e.mae() / self.mase_scale
    }

    /// Every naive baseline scored at this horizon, by name.
    pub fn baselines(&self) -> Vec<(&'static str, &ErrorSum)> {
        let mut all = vec![
            ("persistence", &self.persistence),
            ("seasonal naive", &self.seasonal_naive),
            ("zero", &self.zero),
            ("mean", &self.mean),
        ];
        if let Some(weekly) = &self.weekly_naive {
            all.push(("weekly naive", weekly));
        }
        all
    }

    /// The baseline with the lowest error by `error`, and that error.
    fn best_baseline(&self, error: impl Fn(&ErrorSum) -> f64) -> (&'static str, f64) {
        self.baselines()
            .into_iter()
            .map(|(name, e)| (name, error(e)))
            .filter(|(_, e)| !e.is_nan())
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or(("none", f64::NAN))
    }

    /// The baseline with the lowest MAE at this horizon.
    pub fn best_baseline_name(&self) -> &'static str {
        self.best_baseline(ErrorSum::mae).0
    }

    /// The forecaster's MAE relative to the best naive baseline at this horizon: below 1 means
    /// it beats them all (the MASE of the forecaster scaled by that baseline's error).
    pub fn relative_mase(&self) -> f64 {
        self.model.mae() / self.best_baseline(ErrorSum::mae).1
    }

    /// 1 − WAPE(model) / WAPE(best baseline).
    pub fn wape_gain(&self) -> f64 {
        1.0 - self.model.wape() / self.best_baseline(ErrorSum::wape).1
    }
}

/// A backtest: train on the first part, forecast every origin of the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct BacktestSetup {
    /// Model configuration (step, season, refit schedule).
    pub config: ForecastConfig,
    /// Horizons to score, in steps.
    pub horizons: Vec<usize>,
    /// Share of the series used only for training (the rest is held out).
    pub train_fraction: f64,
    /// When set, replay degradation warnings against this capacity threshold.
    pub warning: Option<WarningSetup>,
}

/// A degradation-warning replay: the SLO breaks while load exceeds a capacity.
///
/// The raise and clear thresholds are not given: they are chosen on a walk-forward replay of the
/// end of the *training* part (see [`calibrate_thresholds`]) and only then applied to the test
/// part, so the test figures are out of sample. Choosing them while looking at the test period
/// would flatter recall and false alarms alike.
#[derive(Debug, Clone, PartialEq)]
pub struct WarningSetup {
    /// Load above which the SLO is broken in the test part.
    pub capacity: f64,
    /// Look-ahead and SLO window; `raise_at` and `clear_below` are ignored here (they are
    /// calibrated).
    pub policy: WarningPolicy,
    /// Breaches closer than this many steps are one incident.
    pub merge_gap_steps: usize,
    /// Breaches shorter than this many steps are blips, not incidents: an SLO is judged over a
    /// window, and one sample over the line does not break it.
    pub min_breach_steps: usize,
    /// Steps at the end of the training part replayed to calibrate the thresholds.
    pub calibration_steps: usize,
    /// The calibration window's capacity is this quantile of its own load: the same rule that
    /// defines the test capacity, applied to training data only.
    pub calibration_capacity_quantile: f64,
}

/// The load above which a period's SLO breaks: its `quantile` (the load it exceeds that share
/// of the time), or why the period has none. A sparse count series (orders per minute: mostly
/// zeros) has a quantile of 0, and a flat one a quantile equal to its minimum: "above" that is
/// every non-zero or every non-minimal step, a breach that never ends and a warning that never
/// clears. Such a period is not scored for warnings.
pub fn breach_capacity(values: &[f64], quantile: f64) -> Result<f64, &'static str> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return Err("no values");
    }
    sorted.sort_by(f64::total_cmp);
    let capacity = sorted[((sorted.len() as f64 * quantile) as usize).min(sorted.len() - 1)];
    if capacity <= 0.0 {
        Err("the quantile is zero (a sparse series)")
    } else if capacity <= sorted[0] {
        Err("the quantile is the minimum (a flat series)")
    } else {
        Ok(capacity)
    }
}

/// What a warning replay found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WarningOutcome {
    /// Breach incidents in the scored period (excluding one already under way when it starts).
    pub incidents: usize,
    /// Incidents with a warning raised at some origin within the horizon before they began.
    pub warned: usize,
    /// Of those, incidents whose warning was still raised at the origin just before they began
    /// (the stricter count, reported alongside).
    pub warned_at_onset: usize,
    /// Lead time of each warned incident, in seconds.
    pub lead_secs: Vec<u64>,
    /// Warnings after which no breach came within the horizon.
    pub false_alarms: usize,
    /// Length of the scored period in days.
    pub test_days: f64,
    /// Time of the scored period with a warning raised, in days (its origins with a warning
    /// raised, times the step).
    pub warned_days: f64,
}

impl WarningOutcome {
    /// Adds another period's outcome (pooling traces).
    pub fn merge(&mut self, other: &Self) {
        self.incidents += other.incidents;
        self.warned += other.warned;
        self.warned_at_onset += other.warned_at_onset;
        self.lead_secs.extend(&other.lead_secs);
        self.false_alarms += other.false_alarms;
        self.test_days += other.test_days;
        self.warned_days += other.warned_days;
    }

    /// Share of the time a warning was raised. False alarms count warning *episodes*, so a rule
    /// that raises early and never clears would look perfect on recall and false alarms alike;
    /// this is what exposes it. Pooled, it is a share of time, not of steps: counted in steps, a
    /// per-minute trace would weigh five times a five-minute one of the same length.
    pub fn warned_fraction(&self) -> f64 {
        if self.test_days > 0.0 {
            self.warned_days / self.test_days
        } else {
            0.0
        }
    }

    /// Incidents warned of with the warning still raised when they began, over incidents (1 when
    /// there were none).
    pub fn recall_at_onset(&self) -> f64 {
        if self.incidents == 0 {
            1.0
        } else {
            self.warned_at_onset as f64 / self.incidents as f64
        }
    }

    /// Warned incidents over incidents (1 when there were none).
    pub fn recall(&self) -> f64 {
        if self.incidents == 0 {
            1.0
        } else {
            self.warned as f64 / self.incidents as f64
        }
    }

    /// False alarms per day of the scored period.
    pub fn false_alarms_per_day(&self) -> f64 {
        if self.test_days > 0.0 {
            self.false_alarms as f64 / self.test_days
        } else {
            0.0
        }
    }
}

/// Breach probabilities at every walked origin of one trace, so warnings can be replayed with
/// any thresholds without refitting: first on the calibration window (training data only), then,
/// with the thresholds chosen there, on the test part.
#[derive(Debug, Clone, PartialEq)]
pub struct WarningProbe {
    /// First origin of the calibration window.
    pub calibration_from: usize,
    /// First test origin (the train/test split).
    pub split: usize,
    /// The calibration window's capacity (from training data only); NaN when it has none
    /// ([`breach_capacity`]), and then the calibration replays are empty.
    pub calibration_capacity: f64,
    /// Breach probability at origins `calibration_from..split` against `calibration_capacity`,
    /// combined each way ([`BreachCombine::Union`], [`BreachCombine::LargestWindow`]).
    pub calibration: [Vec<f64>; 2],
    /// Breach probability at origins `split..n` against the test capacity, both ways.
    pub test: [Vec<f64>; 2],
    /// [`live_pressure`] at origins `calibration_from..split` against `calibration_capacity`.
    pub calibration_live: Vec<f64>,
    /// [`live_pressure`] at origins `split..n` against the test capacity.
    pub test_live: Vec<f64>,
    setup: WarningSetup,
    step_secs: u64,
}

impl WarningProbe {
    /// The replay of the calibration window with thresholds `(raise, clear)`. Only values before
    /// the split are looked at, outcomes included.
    pub fn calibration_outcome(&self, series: &[f64], thresholds: Thresholds) -> WarningOutcome {
        if self.calibration_capacity.is_nan() {
            return WarningOutcome::default();
        }
        let training = &series[..self.split];
        let active = replay_rule(
            training.len(),
            self.calibration_from,
            &self.calibration[combine_index(thresholds.combine)],
            &self.calibration_live,
            thresholds,
        );
        score_warnings(
            training,
            self.calibration_from,
            self.step_secs,
            self.calibration_capacity,
            &self.setup,
            &active,
        )
    }

    /// The same replay points scored by a naive warner, for a frontier to read the forecast's
    /// against: at each origin, the load just observed over the capacity (clamped to 1), both
    /// ways of combining (it has one). A warning rule on it raises when load reaches a share
    /// of capacity, as a threshold alert on a dashboard would; it knows nothing of the future.
    pub fn naive(&self, series: &[f64]) -> Self {
        let ratio = |from: usize, len: usize, capacity: f64| -> Vec<f64> {
            (0..len)
                .map(|i| (series[from + i] / capacity).clamp(0.0, 1.0))
                .collect()
        };
        let calibration = if self.calibration_capacity.is_nan() {
            Vec::new()
        } else {
            ratio(
                self.calibration_from,
                self.calibration[0].len(),
                self.calibration_capacity,
            )
        };
        let test = ratio(self.split, self.test[0].len(), self.setup.capacity);
        Self {
            calibration: [calibration.clone(), calibration],
            test: [test.clone(), test],
            ..self.clone()
        }
    }

    /// The replay of the test part with thresholds `(raise, clear)`.
    pub fn test_outcome(&self, series: &[f64], thresholds: Thresholds) -> WarningOutcome {
        let active = replay_rule(
            series.len(),
            self.split,
            &self.test[combine_index(thresholds.combine)],
            &self.test_live,
            thresholds,
        );
        score_warnings(
            series,
            self.split,
            self.step_secs,
            self.setup.capacity,
            &self.setup,
            &active,
        )
    }
}

/// The window live evidence ([`live_pressure`]) smooths the load over in the warning replays:
/// [`LiveRule::CHOSEN_PER_MINUTE`]'s, in seconds. Chosen on the training parts of the shared
/// traces (`cargo xtask eval predictor`'s frontier by evidence): 15 minutes bought nothing
/// beside the forecast, 30 the most, 60 and 120 less.
pub const LIVE_SMOOTH_SECS: u64 = LiveRule::CHOSEN_PER_MINUTE.smooth_steps as u64 * 60;
/// How far ahead live evidence carries the load's recent rise in the warning replays, in
/// seconds (10 minutes; none scored within 0.01 of it; with 10 minutes' smoothing, an hour
/// ahead kept no rule within a false alarm a day: a trend carried that far is noise).
pub const LIVE_AHEAD_SECS: u64 = LiveRule::CHOSEN_PER_MINUTE.ahead_steps as u64 * 60;

/// A warning rule: how breach probabilities are combined, and when to raise and clear; and,
/// beside the forecast, when live evidence alone raises it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// How the per-step probabilities are combined.
    pub combine: BreachCombine,
    /// Raise at this probability (infinite: the forecast never raises).
    pub raise: f64,
    /// Clear below this one.
    pub clear: f64,
    /// Raise also when [`live_pressure`] reaches this, until it falls below the second (in
    /// units of capacity); `None`: the forecast alone.
    pub live: Option<(f64, f64)>,
}

/// Origins of `[from, len)` with a warning raised under `rule`: each source of evidence runs
/// its own raise/clear hysteresis, and the warning is raised while either is.
fn replay_rule(
    len: usize,
    from: usize,
    probabilities: &[f64],
    live: &[f64],
    rule: Thresholds,
) -> Vec<bool> {
    let mut active = replay_hysteresis(len, from, probabilities, rule.raise, rule.clear);
    if let Some((raise, clear)) = rule.live {
        let by_live = replay_hysteresis(len, from, live, raise, clear);
        for (a, l) in active.iter_mut().zip(by_live) {
            *a |= l;
        }
    }
    active
}

fn combine_index(combine: BreachCombine) -> usize {
    match combine {
        BreachCombine::Union => 0,
        BreachCombine::LargestWindow => 1,
    }
}

/// Rules tried by [`calibrate_thresholds`]: both combinations, raise from 0.025 to 0.975, clear
/// at a fraction of it (hysteresis widths from none to wide). The trade-off on the traces is
/// steep (recall jumps from about 0.5 to above 0.9 between one and 1.1 false alarms a day), so
/// the grid is fine.
pub fn threshold_candidates() -> Vec<Thresholds> {
    let mut out = Vec::new();
    for combine in [BreachCombine::Union, BreachCombine::LargestWindow] {
        for r in 1..=39 {
            let raise = f64::from(r) * 0.025;
            for ratio in [1.0, 0.85, 0.7, 0.5, 0.3, 0.15] {
                out.push(Thresholds {
                    combine,
                    raise,
                    clear: raise * ratio,
                    live: None,
                });
            }
        }
    }
    // Live evidence alone (a dashboard's threshold alert on the smoothed load and its trend),
    // and beside a coarser grid of forecast rules.
    let live: Vec<(f64, f64)> = (14..=24)
        .flat_map(|r| {
            let raise = f64::from(r) * 0.05;
            [1.0, 0.9, 0.8].map(|ratio| (raise, raise * ratio))
        })
        .collect();
    for &l in &live {
        out.push(Thresholds {
            combine: BreachCombine::LargestWindow,
            raise: f64::INFINITY,
            clear: f64::INFINITY,
            live: Some(l),
        });
        for combine in [BreachCombine::Union, BreachCombine::LargestWindow] {
            for r in 1..=19 {
                let raise = f64::from(r) * 0.05;
                for ratio in [1.0, 0.5, 0.15] {
                    out.push(Thresholds {
                        combine,
                        raise,
                        clear: raise * ratio,
                        live: Some(l),
                    });
                }
            }
        }
    }
    out
}

/// What a calibrated warning rule may cost on the training parts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibrationLimits {
    /// Most false alarms (warning episodes with no breach) per day.
    pub max_false_alarms_per_day: f64,
    /// Most of the time a warning may be raised: a warning that is always on warns of every
    /// breach with a single "episode", and says nothing.
    pub max_warned_fraction: f64,
}

/// Why no warning rule could be calibrated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CalibrationFailure {
    /// Every rule keeps a warning raised longer than the limit on the training parts.
    #[error("no rule keeps warnings raised at most {:.0} % of the time on the training parts", 100.0 * .0)]
    WarnedTooLong(f64),
    /// Within the warned-time limit, every rule raises more false alarms than allowed; the
    /// one with the fewest is given (to report with, never to use silently).
    #[error("no rule within the warned-time limit raises at most {max:.2} false alarms a day on the training parts (fewest: {:.2} a day)", .fewest.1.false_alarms_per_day())]
    TooManyFalseAlarms {
        /// The limit.
        max: f64,
        /// The rule with the fewest false alarms, and its outcome.
        fewest: Box<(Thresholds, WarningOutcome)>,
    },
}

/// Chooses warning thresholds from calibration replays pooled over traces (training data only):
/// the highest pooled recall within `limits`, ties to fewer false alarms, then to longer median
/// lead. Returns the rule and its pooled calibration outcome, or why no rule meets the limits:
/// a caller that reports figures must not fall back to a default rule without saying so.
pub fn calibrate_thresholds(
    probes: &[(&WarningProbe, &[f64])],
    candidates: &[Thresholds],
    limits: CalibrationLimits,
) -> Result<(Thresholds, WarningOutcome), CalibrationFailure> {
    let scored: Vec<(Thresholds, WarningOutcome)> = calibration_table(probes, candidates)
        .into_iter()
        .filter(|(_, o)| o.warned_fraction() <= limits.max_warned_fraction)
        .collect();
    let max_false_alarms_per_day = limits.max_false_alarms_per_day;
    let median_lead = |o: &WarningOutcome| {
        let mut l = o.lead_secs.clone();
        l.sort_unstable();
        l.get(l.len() / 2).copied().unwrap_or(0)
    };
    let within = scored
        .iter()
        .filter(|(_, o)| o.false_alarms_per_day() <= max_false_alarms_per_day)
        .max_by(|(_, a), (_, b)| {
            a.recall()
                .total_cmp(&b.recall())
                .then(b.false_alarms.cmp(&a.false_alarms))
                .then(median_lead(a).cmp(&median_lead(b)))
        });
    if let Some(within) = within {
        return Ok(within.clone());
    }
    scored
        .iter()
        .min_by(|(_, a), (_, b)| {
            a.false_alarms
                .cmp(&b.false_alarms)
                .then(b.recall().total_cmp(&a.recall()))
        })
        .map_or(
            Err(CalibrationFailure::WarnedTooLong(
                limits.max_warned_fraction,
            )),
            |fewest| {
                Err(CalibrationFailure::TooManyFalseAlarms {
                    max: max_false_alarms_per_day,
                    fewest: Box::new(fewest.clone()),
                })
            },
        )
}

/// What the evidence behind the rules holds on the scored periods, whatever rule is chosen: the
/// most incidents any choice of one candidate rule per trace warns of, each chosen with
/// hindsight on that trace's own scored period, while every trace keeps within
/// `limits.max_false_alarms_per_day` and the traces together within
/// `limits.max_warned_fraction` of their time (the goals' limits: false alarms per trace,
/// warned time pooled). No rule chosen without hindsight, one for all traces or one per trace,
/// warns of more of these incidents within the same limits, so where this is under a goal the
/// evidence, not the thresholds, is what falls short.
///
/// `per_trace` holds each trace's outcomes of the candidate rules (on one scored period).
/// Returns the chosen outcomes pooled and each trace's choice. A trace may also be left never
/// warned (`None`: no rule keeps it within the false alarms, or the budget buys more
/// elsewhere); its incidents count as missed, its days count, and it adds no warned time.
/// That choice is not among the rules, so it can only raise the bound. The warned-time
/// budget is shared by a knapsack over the traces, in units of 1/5,000 of the time, each rule's
/// cost rounded down: the bound can only be loose upwards.
pub fn hindsight_bound(
    per_trace: &[Vec<(Thresholds, WarningOutcome)>],
    limits: CalibrationLimits,
) -> (WarningOutcome, Vec<Option<(Thresholds, WarningOutcome)>>) {
    let total_days: f64 = per_trace
        .iter()
        .filter_map(|o| o.first().map(|(_, o)| o.test_days))
        .sum();
    let unit = total_days / 5000.0;
    let units = |days: f64| {
        if unit > 0.0 {
            (days / unit) as usize
        } else {
            0
        }
    };
    let budget = units(limits.max_warned_fraction * total_days);
    // best[u]: the most incidents warned of with at most u units warned, over the traces so far;
    // choice[trace][u]: the rule that trace took there.
    let mut best = vec![0usize; budget + 1];
    let mut choice: Vec<Vec<Option<usize>>> = Vec::with_capacity(per_trace.len());
    for outcomes in per_trace {
        let within: Vec<(usize, usize, usize, usize)> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, (_, o))| o.false_alarms_per_day() <= limits.max_false_alarms_per_day)
            .map(|(k, (_, o))| (k, units(o.warned_days), o.warned, o.false_alarms))
            .collect();
        let mut next = vec![0usize; budget + 1];
        let mut took = vec![None; budget + 1];
        for u in 0..=budget {
            // Ties to fewer false alarms, as the calibration breaks them.
            let mut top: Option<(usize, usize, usize)> = None;
            for &(k, cost, warned, false_alarms) in &within {
                if cost > u {
                    continue;
                }
                let value = best[u - cost] + warned;
                if top.is_none_or(|(v, f, _)| value > v || (value == v && false_alarms < f)) {
                    top = Some((value, false_alarms, k));
                }
            }
            if let Some((value, _, k)) = top {
                next[u] = value;
                took[u] = Some(k);
            } else {
                next[u] = best[u];
            }
        }
        best = next;
        choice.push(took);
    }
    // Walk the choices back from the whole budget.
    let mut chosen = vec![None; per_trace.len()];
    let mut u = budget;
    for (t, outcomes) in per_trace.iter().enumerate().rev() {
        if let Some(k) = choice[t][u] {
            let (rule, outcome) = &outcomes[k];
            u -= units(outcome.warned_days);
            chosen[t] = Some((*rule, outcome.clone()));
        }
    }
    let mut pooled = WarningOutcome::default();
    for (outcomes, chosen) in per_trace.iter().zip(&chosen) {
        match chosen {
            Some((_, o)) => pooled.merge(o),
            None => {
                if let Some((_, any)) = outcomes.first() {
                    pooled.merge(&WarningOutcome {
                        incidents: any.incidents,
                        test_days: any.test_days,
                        ..WarningOutcome::default()
                    });
                }
            }
        }
    }
    (pooled, chosen)
}

/// Every candidate rule with its pooled outcome on the calibration windows (training data
/// only), in the order given.
pub fn calibration_table(
    probes: &[(&WarningProbe, &[f64])],
    candidates: &[Thresholds],
) -> Vec<(Thresholds, WarningOutcome)> {
    candidates
        .iter()
        .map(|&t| {
            let mut pooled = WarningOutcome::default();
            for (probe, series) in probes {
                pooled.merge(&probe.calibration_outcome(series, t));
            }
            (t, pooled)
        })
        .collect()
}

/// Results of one trace's backtest.
#[derive(Debug, Clone, PartialEq)]
pub struct BacktestReport {
    /// Scores per horizon, in the order asked.
    pub horizons: Vec<HorizonScore>,
    /// Breach probabilities for warning replays, when asked.
    pub warning: Option<WarningProbe>,
    /// Fits performed (the initial one and scheduled refits).
    pub fits: usize,
    /// Which model the last fit chose, for the report.
    pub last_model: Option<crate::ModelKind>,
}

/// Walks forward through `series` (one value per `config.step_secs`, the first at `start`): fits
/// on the history before the first origin, then at every origin computes what is asked (breach
/// probabilities in the calibration window and the test part; forecast scores in the test part),
/// observes the next value and refits on schedule. Every figure at an origin uses only values up
/// to that origin.
pub fn backtest(
    series: &[f64],
    start: Timestamp,
    setup: &BacktestSetup,
) -> Result<BacktestReport, ForecastError> {
    let config = &setup.config;
    let step = config.step_secs;
    let n = series.len();
    let split = ((n as f64 * setup.train_fraction) as usize).clamp(4, n);
    let at = |i: usize| start + i as u64 * step;
    let m = config.season_steps;
    let training = &series[..split];
    let mase_scale = training
        .windows(2)
        .map(|w| (w[1] - w[0]).abs())
        .sum::<f64>()
        / (training.len() - 1) as f64;
    let training_mean = training.iter().sum::<f64>() / training.len() as f64;
    let week = (7 * 86_400 / step.max(1)) as usize;
    let mut scores: Vec<HorizonScore> = setup
        .horizons
        .iter()
        .map(|&steps| HorizonScore {
            steps,
            model: ErrorSum::default(),
            persistence: ErrorSum::default(),
            seasonal_naive: ErrorSum::default(),
            // Defined at every scored origin only when a week of history precedes the test.
            weekly_naive: (split >= week).then(ErrorSum::default),
            zero: ErrorSum::default(),
            mean: ErrorSum::default(),
            mase_scale,
        })
        .collect();
    // The calibration window ends where the test starts; it keeps at least a few steps of
    // history before it for the first fit.
    let calibration_from = setup
        .warning
        .as_ref()
        .map_or(split, |w| split.saturating_sub(w.calibration_steps).max(4));
    // A calibration window without a usable capacity (sparse, flat) is not replayed: its
    // trace adds nothing to the calibration, rather than a warning that never clears.
    let calibration_capacity = setup.warning.as_ref().and_then(|w| {
        breach_capacity(
            &series[calibration_from..split],
            w.calibration_capacity_quantile,
        )
        .ok()
    });
    let first_origin = calibration_from.min(split) - 1;
    let history_from = |end: usize| end.saturating_sub(config.max_history);
    let mut model = LoadForecaster::fit(
        config,
        &series[history_from(first_origin + 1)..=first_origin],
        at(first_origin),
    )?;
    let mut fits = 1;
    let mut since_fit = 0;
    let mut calibration = [Vec::new(), Vec::new()];
    let mut test = [Vec::new(), Vec::new()];
    let (mut calibration_live, mut test_live) = (Vec::new(), Vec::new());
    let steps_of = |secs: u64| usize::try_from(secs / step.max(1)).unwrap_or(1).max(1);
    let (live_smooth, live_ahead) = (steps_of(LIVE_SMOOTH_SECS), steps_of(LIVE_AHEAD_SECS));
    // Origin `o`: the last observed index; forecasts target o + h.
    for o in first_origin..n - 1 {
        if o + 1 >= split {
            for score in &mut scores {
                let h = score.steps;
                if o + h >= n || o + h < m * h.div_ceil(m) {
                    continue;
                }
                let actual = series[o + h];
                score.model.add(model.median(h), actual);
                score.persistence.add(series[o], actual);
                score
                    .seasonal_naive
                    .add(series[o + h - m * h.div_ceil(m)], actual);
                if let Some(weekly) = &mut score.weekly_naive
                    && let Some(i) = (o + h).checked_sub(week * h.div_ceil(week))
                {
                    weekly.add(series[i], actual);
                }
                score.zero.add(0.0, actual);
                score.mean.add(training_mean, actual);
            }
        }
        if let Some(w) = &setup.warning {
            let into = if o >= split {
                Some((&mut test, &mut test_live, w.capacity))
            } else if o >= calibration_from
                && let Some(capacity) = calibration_capacity
            {
                Some((&mut calibration, &mut calibration_live, capacity))
            } else {
                None
            };
            if let Some((into, live, capacity)) = into {
                let scores = breach_scores(&model, &[capacity], &w.policy);
                into[0].push(scores.union);
                into[1].push(scores.largest_window);
                live.push(live_pressure(
                    &series[o.saturating_sub(2 * live_smooth)..=o],
                    live_smooth,
                    live_ahead,
                    capacity,
                ));
            }
        }
        model.observe(at(o + 1), series[o + 1]);
        since_fit += 1;
        if since_fit >= config.refit_every {
            model = model.refit(&series[history_from(o + 2)..o + 2], at(o + 1))?;
            fits += 1;
            since_fit = 0;
        }
    }
    let warning = setup.warning.as_ref().map(|w| WarningProbe {
        calibration_from,
        split,
        calibration_capacity: calibration_capacity.unwrap_or(f64::NAN),
        calibration,
        test,
        calibration_live,
        test_live,
        setup: w.clone(),
        step_secs: step,
    });
    Ok(BacktestReport {
        horizons: scores,
        warning,
        fits,
        last_model: Some(model.kind()),
    })
}

/// Which origins of `[from, len)` have a warning raised, replaying the raise/clear hysteresis
/// over `probabilities` (one per origin from `from`).
fn replay_hysteresis(
    len: usize,
    from: usize,
    probabilities: &[f64],
    raise: f64,
    clear: f64,
) -> Vec<bool> {
    let mut active = vec![false; len];
    let mut on = false;
    for (i, &p) in probabilities.iter().enumerate() {
        on = hysteresis(on, p, raise, clear);
        if let Some(a) = active.get_mut(from + i) {
            *a = on;
        }
    }
    active
}

/// Matches warnings with breach incidents in `[from, series.len())`.
fn score_warnings(
    series: &[f64],
    from: usize,
    step_secs: u64,
    capacity: f64,
    setup: &WarningSetup,
    active: &[bool],
) -> WarningOutcome {
    let n = series.len();
    let horizon = setup.policy.horizon_steps;
    // Breach runs long enough to count, then merged across gaps shorter than `merge_gap_steps`.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, _) in series
        .iter()
        .enumerate()
        .skip(from)
        .filter(|(_, y)| **y > capacity)
    {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == i => *end = i,
            _ => runs.push((i, i)),
        }
    }
    runs.retain(|&(s, e)| e + 1 - s >= setup.min_breach_steps);
    let mut breach = vec![false; n];
    for &(s, e) in &runs {
        breach[s..=e].iter_mut().for_each(|b| *b = true);
    }
    let mut incidents: Vec<(usize, usize)> = Vec::new();
    for (s, e) in runs {
        match incidents.last_mut() {
            Some((_, end)) if s - *end <= setup.merge_gap_steps => *end = e,
            _ => incidents.push((s, e)),
        }
    }
    // An incident already under way when the period starts could not be warned of.
    incidents.retain(|&(s, _)| s > from);
    let mut outcome = WarningOutcome {
        incidents: incidents.len(),
        test_days: (n - from) as f64 * step_secs as f64 / 86_400.0,
        warned_days: active[from..].iter().filter(|a| **a).count() as f64 * step_secs as f64
            / 86_400.0,
        ..WarningOutcome::default()
    };
    for &(s, _) in &incidents {
        // Warned if a warning was raised at some origin of the horizon before the breach began:
        // a warning says "the SLO breaks within the horizon", and that claim came true. This is
        // the same rule that clears a warning episode of being a false alarm (a breach within
        // the horizon after it), so an episode is never both a true alarm and a miss. (Counting
        // only a warning still raised at the origin just before the breach, as this did before,
        // scored an episode that cleared 20 minutes before a breach as a hit for false alarms
        // and a miss for recall.) The lead runs from the first warned origin in that window, so
        // it is at most the horizon: a warning claims no more than that.
        let window = s.saturating_sub(horizon).max(from);
        if let Some(first) = (window..s).find(|&o| active[o]) {
            outcome.warned += 1;
            outcome.lead_secs.push((s - first) as u64 * step_secs);
            if active[s - 1] {
                outcome.warned_at_onset += 1;
            }
        }
    }
    // False alarms: warning episodes with no breach from onset to end + horizon.
    let mut i = from;
    while i < n {
        if !active[i] {
            i += 1;
            continue;
        }
        let onset = i;
        while i < n && active[i] {
            i += 1;
        }
        let until = (i + horizon).min(n);
        if !breach[onset..until].iter().any(|&b| b) {
            outcome.false_alarms += 1;
        }
    }
    outcome
}

/// Variance ratio of `h`-step changes: `Var(y[t+h] − y[t]) / (h · Var(y[t+1] − y[t]))`
/// (Lo and MacKinlay). About 1 for a random walk, where persistence is the best forecast and no
/// model can beat it by much; well below 1 for a series that reverts to a level or repeats a
/// daily pattern, well above 1 for one that trends smoothly: either way a model has something to
/// find. A diagnostic for the evaluation report: it
/// says why a trace's forecast gain is small, not how to forecast it.
pub fn variance_ratio(series: &[f64], h: usize) -> f64 {
    let var_of_changes = |lag: usize| {
        let d: Vec<f64> = series.windows(lag + 1).map(|w| w[lag] - w[0]).collect();
        if d.len() < 2 {
            return f64::NAN;
        }
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (d.len() - 1) as f64
    };
    var_of_changes(h) / (h as f64 * var_of_changes(1))
}

/// A synthetic per-minute load series: a daily cycle, a weekday/weekend difference, slow growth
/// and multiplicative noise, seeded. For benchmarks and tests, not for judging accuracy.
pub fn synthetic_load(days: usize, seed: u64) -> Vec<f64> {
    use rand::{RngExt as _, SeedableRng as _};
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let scale = 50.0 + rng.random_range(0.0..950.0);
    (0..days * 1440)
        .map(|i| {
            let day = i / 1440;
            let phase = (i % 1440) as f64 / 1440.0 * std::f64::consts::TAU;
            let weekend = if day % 7 >= 5 { 0.7 } else { 1.0 };
            let growth = 1.0 + 0.01 * day as f64;
            let noise = 1.0 + 0.1 * (rng.random::<f64>() - 0.5);
            scale * weekend * growth * (1.0 + 0.6 * (phase - 2.0).sin()) * noise
        })
        .collect()
}

/// The simulated catalog experiment: workloads with hidden latency-versus-load curves on every
/// type, measured with noise only where the shadow pool chooses to spend shadow-hours.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogSimSetup {
    /// Workloads simulated, one after the other (each learns from the ones before).
    pub workloads: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Shadow-hours one trial of one type costs (a ramp of amplified replays).
    pub hours_per_trial: f64,
    /// Multiplicative noise (log-sd) on each measured latency.
    pub latency_noise: f64,
    /// The latency objective, in ms.
    pub slo_ms: f64,
    /// The shadow-pool policy under test.
    pub policy: crate::shadow_pool::PoolPolicy,
}

impl Default for CatalogSimSetup {
    fn default() -> Self {
        Self {
            workloads: 200,
            seed: 42,
            hours_per_trial: 2.0,
            latency_noise: 0.08,
            slo_ms: 200.0,
            policy: crate::shadow_pool::PoolPolicy::default(),
        }
    }
}

/// What the simulated catalog experiment found.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogSimReport {
    /// Types in the catalog.
    pub types: usize,
    /// Relative regret per workload: cost of the chosen type (at the count its true capacity
    /// needs) over the oracle's cost, minus one.
    pub regrets: Vec<f64>,
    /// The same when every type is tried once (same noise model), for reference.
    pub exhaustive_regrets: Vec<f64>,
    /// Shadow-hours spent by the steered pool.
    pub shadow_hours: f64,
    /// Shadow-hours that trying every type once would have cost.
    pub exhaustive_hours: f64,
}

/// A catalog of 24 types: three families (compute, general, memory), two generations, four sizes.
/// The memory family's catalog entries carry no benchmark score, as real catalogs often don't.
pub fn simulated_catalog() -> Vec<crate::shadow_pool::VmType> {
    let mut catalog = Vec::new();
    // (family, GiB per vCPU, price per vCPU-hour, score per vCPU by generation, scored)
    let families = [
        ("c", 2.0, 0.0425, [100.0, 118.0], true),
        ("m", 4.0, 0.048, [100.0, 118.0], true),
        ("r", 8.0, 0.063, [100.0, 118.0], false),
    ];
    for (family, gib, price, scores, scored) in families {
        for (generation, score) in scores.iter().enumerate() {
            // The newer generation costs a little more per vCPU.
            let price = price * if generation == 1 { 1.06 } else { 1.0 };
            for (size, vcpus) in [
                ("large", 2u32),
                ("xlarge", 4),
                ("2xlarge", 8),
                ("4xlarge", 16),
            ] {
                catalog.push(crate::shadow_pool::VmType {
                    name: format!("{family}{}.{size}", generation + 5),
                    vcpus,
                    memory_gib: gib * f64::from(vcpus),
                    price_per_hour: price * f64::from(vcpus),
                    benchmark_score: scored.then_some(score * f64::from(vcpus)),
                });
            }
        }
    }
    catalog
}

/// Runs the simulated catalog experiment.
pub fn simulate_catalog(
    setup: &CatalogSimSetup,
) -> Result<CatalogSimReport, crate::shadow_pool::ShadowPoolError> {
    use crate::perf_model::{LoadLatencyPoint, PerformanceModel, PointSource};
    use crate::shadow_pool::{CapacityMeasurement, PoolAction, PopulationPrior, plan};
    use rand::{RngExt as _, SeedableRng as _};

    let catalog = simulated_catalog();
    let n = catalog.len();
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(setup.seed);
    let normal = move |rng: &mut rand::rngs::ChaCha8Rng| {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    // What a type does for every workload beyond its specification (hidden).
    let type_effect: Vec<f64> = (0..n).map(|_| 0.08 * normal(&mut rng)).collect();
    let policy = &setup.policy;
    let mut history: Vec<Vec<CapacityMeasurement>> = Vec::new();
    let mut report = CatalogSimReport {
        types: n,
        regrets: Vec::new(),
        exhaustive_regrets: Vec::new(),
        shadow_hours: 0.0,
        exhaustive_hours: 0.0,
    };
    for w in 0..setup.workloads {
        // Hidden truth for this workload.
        let scale = 0.2 * (0.8 * normal(&mut rng)).exp();
        let compute_scaling = rng.random_range(0.75..1.0);
        let memory_bound = rng.random_range(-0.05..0.35);
        let base_ms = rng.random_range(5.0..40.0);
        let capacity: Vec<f64> = catalog
            .iter()
            .enumerate()
            .map(|(t, vm)| {
                let score = 109.0 * f64::from(vm.vcpus) * if t % 8 >= 4 { 1.08 } else { 0.92 };
                let gib_per_vcpu = vm.memory_gib / f64::from(vm.vcpus);
                (scale.ln()
                    + compute_scaling * score.ln()
                    + memory_bound * gib_per_vcpu.ln()
                    + type_effect[t]
                    + 0.05 * normal(&mut rng))
                .exp()
            })
            .collect();
        let reference = capacity[4 + 1]; // c6.xlarge
        let peak = reference * rng.random_range(0.5..6.0);
        let true_cost = |t: usize| {
            let usable = capacity[t] * (1.0 - policy.margin);
            (peak / usable).ceil().max(1.0) * catalog[t].price_per_hour
        };
        let oracle = (0..n).map(true_cost).fold(f64::INFINITY, f64::min);
        // One measurement of type t: a ramp of (amplified) replays up to `reach` × capacity,
        // one point per five-minute interval of the trial.
        let intervals = (setup.hours_per_trial * 12.0).round().max(3.0) as u32;
        let measure = |t: usize, reach: f64, rng: &mut rand::rngs::ChaCha8Rng| {
            let saturation = capacity[t] * 1.25;
            let k = (setup.slo_ms - base_ms) * (saturation - capacity[t]);
            let points: Vec<LoadLatencyPoint> = (1..=intervals)
                .map(|i| {
                    let load = capacity[t] * reach * f64::from(i) / f64::from(intervals);
                    let latency = base_ms + k / (saturation - load);
                    LoadLatencyPoint {
                        load,
                        latency_ms: latency * (setup.latency_noise * normal(rng)).exp(),
                        source: PointSource::AmplifiedShadow { factor: 1.0 },
                    }
                })
                .collect();
            let model = PerformanceModel::fit(&points, rng.random()).ok()?;
            let samples: Vec<f64> = model
                .capacity_samples(setup.slo_ms)
                .into_iter()
                .filter(|c| *c > 0.0)
                .map(f64::ln)
                .collect();
            let capacity = model.capacity_at(setup.slo_ms);
            if samples.len() < 5 || capacity <= 0.0 {
                return None;
            }
            let mean = samples.iter().sum::<f64>() / samples.len() as f64;
            let sd = (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>()
                / (samples.len() - 1) as f64)
                .sqrt();
            Some(CapacityMeasurement {
                vm_type: catalog[t].name.clone(),
                capacity,
                log_sd: sd,
            })
        };
        let chosen_cost = |measured: &[CapacityMeasurement]| {
            measured
                .iter()
                .filter_map(|m| {
                    let t = catalog.iter().position(|v| v.name == m.vm_type)?;
                    let usable = m.capacity * (1.0 - policy.margin);
                    let estimated = (peak / usable).ceil().max(1.0) * catalog[t].price_per_hour;
                    Some((estimated, t))
                })
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map_or(f64::INFINITY, |(_, t)| true_cost(t))
        };
        // Live type: its own traffic only reaches part of the way up the curve, for free.
        let live = rng.random_range(0..n);
        let mut measured: Vec<CapacityMeasurement> =
            measure(live, 0.7, &mut rng).into_iter().collect();
        let prior = if history.is_empty() {
            PopulationPrior::uninformed(&catalog)
        } else {
            PopulationPrior::learn(&catalog, &history)?
        };
        let budget = 0.25 * n as f64 * setup.hours_per_trial;
        let mut hours = 0.0;
        let mut running: Vec<String> = Vec::new();
        let mut choice: Option<String> = None;
        for round in 0..n {
            let p = plan(
                &catalog,
                &prior,
                &measured,
                &running,
                peak,
                policy,
                setup.seed ^ ((w as u64) << 20) ^ round as u64,
            )?;
            choice = p.best_measured.map(|(name, _)| name);
            running = p
                .actions
                .iter()
                .filter_map(|a| match a {
                    PoolAction::Keep { vm_type, .. } | PoolAction::Try { vm_type, .. } => {
                        Some(vm_type.clone())
                    }
                    PoolAction::Drop { .. } => None,
                })
                .collect();
            if p.converged || running.is_empty() {
                break;
            }
            // Every running shadow spends a trial and reports a measurement.
            let mut spent = false;
            for name in &running {
                if hours + setup.hours_per_trial > budget {
                    break;
                }
                let Some(t) = catalog.iter().position(|v| v.name == *name) else {
                    continue;
                };
                hours += setup.hours_per_trial;
                spent = true;
                measured.extend(measure(t, 1.15, &mut rng));
            }
            if !spent {
                break;
            }
        }
        let chosen = choice
            .and_then(|name| catalog.iter().position(|v| v.name == name))
            .map_or(f64::INFINITY, true_cost);
        report.regrets.push(chosen / oracle - 1.0);
        report.shadow_hours += hours;
        report.exhaustive_hours += n as f64 * setup.hours_per_trial;
        let everything: Vec<CapacityMeasurement> =
            (0..n).filter_map(|t| measure(t, 1.15, &mut rng)).collect();
        report
            .exhaustive_regrets
            .push(chosen_cost(&everything) / oracle - 1.0);
        history.push(measured);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hindsight_bound_shares_the_warned_budget_where_it_buys_incidents() {
        let rule = |raise: f64| Thresholds {
            combine: BreachCombine::LargestWindow,
            raise,
            clear: raise / 2.0,
            live: None,
        };
        // 10 days, 1,000 scored steps a trace.
        let outcome = |incidents, warned, false_alarms, warned_steps: u32| WarningOutcome {
            incidents,
            warned,
            warned_at_onset: warned,
            lead_secs: vec![600; warned],
            false_alarms,
            test_days: 10.0,
            warned_days: f64::from(warned_steps) / 100.0,
        };
        let per_trace = vec![
            // All 4 incidents at 250 warned steps, 2 at 50, all 4 at 20 steps but 2 false alarms
            // a day.
            vec![
                (rule(0.1), outcome(4, 4, 0, 250)),
                (rule(0.5), outcome(4, 2, 3, 50)),
                (rule(0.9), outcome(4, 4, 20, 20)),
            ],
            // No rule keeps within one false alarm a day: its incidents count as missed.
            vec![(rule(0.5), outcome(2, 2, 11, 10))],
            // No incidents: the quiet rule costs nothing; the other would cost 200 steps.
            vec![
                (rule(0.1), outcome(0, 0, 9, 200)),
                (rule(0.9), outcome(0, 0, 2, 0)),
            ],
            // 3 incidents for 40 steps, or 1 for 10.
            vec![
                (rule(0.3), outcome(3, 3, 1, 40)),
                (rule(0.7), outcome(3, 1, 0, 10)),
            ],
        ];
        let limits = |warned| CalibrationLimits {
            max_false_alarms_per_day: 1.0,
            max_warned_fraction: warned,
        };
        // 10 % of 4,000 steps is 400: every trace's best rule fits (250 + 0 + 40).
        let (pooled, chosen) = hindsight_bound(&per_trace, limits(0.1));
        let raises: Vec<Option<f64>> = chosen
            .iter()
            .map(|c| c.as_ref().map(|(t, _)| t.raise))
            .collect();
        assert_eq!(raises, vec![Some(0.1), None, Some(0.9), Some(0.3)]);
        assert_eq!((pooled.warned, pooled.incidents), (7, 9));
        assert!((pooled.warned_days - 2.9).abs() < 1e-9);
        assert!((pooled.test_days - 40.0).abs() < 1e-12);
        // 2 % is 80 steps: the 250-step rule no longer fits. 2 + 3 incidents would take 90
        // steps; 2 + 1 (60 steps) or 3 alone (40) fit, and warn of 3.
        let (pooled, chosen) = hindsight_bound(&per_trace, limits(0.02));
        assert_eq!(pooled.warned, 3);
        assert!(pooled.warned_days <= 0.8);
        assert_ne!(chosen[0].as_ref().map(|(t, _)| t.raise), Some(0.1));
    }

    fn setup() -> WarningSetup {
        WarningSetup {
            capacity: 10.0,
            policy: WarningPolicy {
                horizon_steps: 5,
                min_breach_steps: 1,
                ..WarningPolicy::default()
            },
            merge_gap_steps: 5,
            min_breach_steps: 1,
            calibration_steps: 50,
            calibration_capacity_quantile: 0.95,
        }
    }

    /// 100 steps: calibration window 50..70, test 70..100. Breaches (load 20 over capacity 10)
    /// at 60..62 (calibration) and 85..87 (test).
    fn probe(calibration_scores: Vec<f64>, test_scores: Vec<f64>) -> (WarningProbe, Vec<f64>) {
        let mut series = vec![5.0; 100];
        for i in (60..63).chain(85..88) {
            series[i] = 20.0;
        }
        let probe = WarningProbe {
            calibration_from: 50,
            split: 70,
            calibration_capacity: 10.0,
            calibration: [calibration_scores.clone(), calibration_scores],
            test: [test_scores.clone(), test_scores],
            calibration_live: vec![0.0; 20],
            test_live: vec![0.0; 30],
            setup: setup(),
            step_secs: 60,
        };
        (probe, series)
    }

    fn scores(len: usize, offset: usize, rising_at: usize) -> Vec<f64> {
        // 0.6 for the three origins before `rising_at`, 0 elsewhere but a 0.3 blip at 52.
        (0..len)
            .map(|i| {
                let o = offset + i;
                if o + 3 >= rising_at && o < rising_at {
                    0.6
                } else if o == 52 {
                    0.3
                } else {
                    0.0
                }
            })
            .collect()
    }

    #[test]
    fn thresholds_are_chosen_on_training_data_and_the_test_part_cannot_move_them() {
        let (a, series_a) = probe(scores(20, 50, 60), scores(30, 70, 85));
        // The same training part; the test part's scores turned upside down.
        let (b, series_b) = probe(scores(20, 50, 60), vec![0.9; 30]);
        let candidates = threshold_candidates();
        let limits = CalibrationLimits {
            max_false_alarms_per_day: 100.0,
            max_warned_fraction: 0.5,
        };
        let chosen_a = calibrate_thresholds(&[(&a, series_a.as_slice())], &candidates, limits)
            .expect("a choice");
        let chosen_b = calibrate_thresholds(&[(&b, series_b.as_slice())], &candidates, limits)
            .expect("a choice");
        assert_eq!(chosen_a, chosen_b);
        let (t, calibration) = chosen_a;
        assert_eq!(calibration.incidents, 1);
        assert_eq!(calibration.warned, 1);
        // Above the 0.3 blip (a false alarm) and at most the 0.6 before the breach.
        assert!(t.raise > 0.3 && t.raise <= 0.6, "{t:?}");
        let test = a.test_outcome(&series_a, t);
        assert_eq!((test.incidents, test.warned, test.false_alarms), (1, 1, 0));
        assert_eq!(test.lead_secs, [3 * 60]);
        // Three one-minute steps of thirty warned.
        assert!((test.warned_days - 3.0 / 1440.0).abs() < 1e-12);
        assert!((test.test_days - 30.0 / 1440.0).abs() < 1e-12);
    }

    #[test]
    fn a_warning_that_never_clears_is_refused_by_the_warned_time_limit() {
        // Raised at the blip and never cleared: one episode covers the breach, so recall is 1
        // and there is no false alarm; only the warned time gives it away.
        let (a, series) = probe(scores(20, 50, 60), scores(30, 70, 85));
        let always = Thresholds {
            combine: BreachCombine::Union,
            raise: 0.25,
            clear: 0.0,
            live: None,
        };
        let o = a.calibration_outcome(&series, always);
        assert_eq!((o.warned, o.false_alarms), (1, 0));
        assert!(o.warned_fraction() > 0.8, "{}", o.warned_fraction());
        let limits = CalibrationLimits {
            max_false_alarms_per_day: 100.0,
            max_warned_fraction: 0.5,
        };
        assert_eq!(
            calibrate_thresholds(&[(&a, series.as_slice())], &[always], limits),
            Err(CalibrationFailure::WarnedTooLong(0.5)),
            "refused, never a fallback rule"
        );
        // Within the warned time but over the false-alarm limit: refused, with the rule that
        // came closest to report.
        let strict = CalibrationLimits {
            max_false_alarms_per_day: 0.0,
            max_warned_fraction: 1.0,
        };
        let blip = Thresholds {
            combine: BreachCombine::Union,
            raise: 0.25,
            clear: 0.25,
            live: None,
        };
        assert_eq!(a.calibration_outcome(&series, blip).false_alarms, 1);
        assert!(matches!(
            calibrate_thresholds(&[(&a, series.as_slice())], &[blip], strict),
            Err(CalibrationFailure::TooManyFalseAlarms { fewest, .. }) if fewest.0 == blip
        ));
    }

    #[test]
    fn a_sparse_or_flat_period_has_no_breach_capacity_and_no_warning_that_never_clears() {
        // Orders per minute: zero 97 % of the time.
        let sparse: Vec<f64> = (0..1000)
            .map(|i| if i % 33 == 0 { 2.0 } else { 0.0 })
            .collect();
        assert!(breach_capacity(&sparse, 0.95).is_err());
        assert!(breach_capacity(&[3.0; 100], 0.95).is_err());
        let ramp: Vec<f64> = (0..100).map(f64::from).collect();
        assert_eq!(breach_capacity(&ramp, 0.95), Ok(95.0));
        // A backtest of the sparse series: its calibration window has no capacity, so it
        // replays nothing and scores no warned time, whatever the rule.
        let mut series = sparse;
        series.extend((0..2000).map(|i| if i % 33 == 0 { 2.0 } else { 0.0 }));
        let setup = BacktestSetup {
            config: ForecastConfig::every_five_minutes(),
            horizons: vec![1],
            train_fraction: 0.75,
            warning: Some(WarningSetup {
                calibration_steps: 600,
                ..setup()
            }),
        };
        let report = backtest(&series, 0, &setup).expect("backtest");
        let probe = report.warning.expect("a probe");
        assert!(probe.calibration_capacity.is_nan());
        assert!(probe.calibration.iter().all(Vec::is_empty));
        let always = Thresholds {
            combine: BreachCombine::Union,
            raise: 0.0,
            clear: 0.0,
            live: None,
        };
        let o = probe.calibration_outcome(&series, always);
        assert_eq!((o.warned_days, o.incidents), (0.0, 0));
    }

    #[test]
    fn the_naive_warner_raises_on_load_against_capacity_alone() {
        let (a, series) = probe(scores(20, 50, 60), scores(30, 70, 85));
        let naive = a.naive(&series);
        // Load 5 against capacity 10, and 20 (clamped to 1) in the breaches.
        assert_eq!(naive.calibration[0][0], 0.5);
        assert_eq!(naive.calibration[0][10], 1.0);
        assert_eq!(naive.test[0].len(), 30);
        // Raised at 0.9: only once the breach has begun, so it warns of nothing.
        let t = Thresholds {
            combine: BreachCombine::Union,
            raise: 0.9,
            clear: 0.9,
            live: None,
        };
        let o = naive.test_outcome(&series, t);
        assert_eq!((o.incidents, o.warned), (1, 0));
    }

    #[test]
    fn live_evidence_raises_a_warning_the_forecast_did_not() {
        // The forecast stays quiet; live pressure reaches 1.2 at origins 81..84, within the
        // horizon before the breach at 85.
        let (a, series) = probe(scores(20, 50, 60), vec![0.0; 30]);
        let mut live = vec![0.5; 30];
        for o in 81..84 {
            live[o - 70] = 1.2;
        }
        let a = WarningProbe {
            test_live: live,
            ..a
        };
        let forecast_only = Thresholds {
            combine: BreachCombine::Union,
            raise: 0.5,
            clear: 0.4,
            live: None,
        };
        assert_eq!(a.test_outcome(&series, forecast_only).warned, 0);
        let with_live = Thresholds {
            live: Some((1.0, 0.9)),
            ..forecast_only
        };
        let o = a.test_outcome(&series, with_live);
        assert_eq!((o.incidents, o.warned, o.false_alarms), (1, 1, 0));
        assert!(
            (o.warned_days - 3.0 / 1440.0).abs() < 1e-12,
            "cleared once the pressure fell below 0.9"
        );
        // Live evidence alone (the forecast off) raises the same.
        let live_only = Thresholds {
            raise: f64::INFINITY,
            clear: f64::INFINITY,
            ..with_live
        };
        assert_eq!(a.test_outcome(&series, live_only), o);
    }

    #[test]
    fn pooled_outcomes_are_the_sums_of_the_per_trace_ones() {
        let (a, series_a) = probe(scores(20, 50, 60), scores(30, 70, 85));
        let (b, series_b) = probe(scores(20, 50, 60), vec![0.9; 30]);
        let t = Thresholds {
            combine: BreachCombine::Union,
            raise: 0.5,
            clear: 0.4,
            live: None,
        };
        let (oa, ob) = (a.test_outcome(&series_a, t), b.test_outcome(&series_b, t));
        let mut pooled = WarningOutcome::default();
        pooled.merge(&oa);
        pooled.merge(&ob);
        assert_eq!(pooled.incidents, oa.incidents + ob.incidents);
        assert_eq!(pooled.warned, oa.warned + ob.warned);
        assert_eq!(pooled.false_alarms, oa.false_alarms + ob.false_alarms);
        assert!((pooled.warned_days - (oa.warned_days + ob.warned_days)).abs() < 1e-12);
        // Warned time pools as time: a per-minute trace weighs no more than a five-minute one
        // of the same length.
        // A day of one-minute steps warned half the time, and a day of five-minute ones never.
        let mut by_time = WarningOutcome {
            test_days: 1.0,
            warned_days: 0.5,
            ..WarningOutcome::default()
        };
        by_time.merge(&WarningOutcome {
            test_days: 1.0,
            ..WarningOutcome::default()
        });
        assert!((by_time.warned_fraction() - 0.25).abs() < 1e-12);
        let recall = (oa.warned + ob.warned) as f64 / (oa.incidents + ob.incidents) as f64;
        assert!((pooled.recall() - recall).abs() < 1e-12);
        assert_eq!(
            pooled.lead_secs.len(),
            oa.lead_secs.len() + ob.lead_secs.len()
        );
    }

    #[test]
    fn variance_ratio_is_one_for_a_random_walk_and_small_for_a_cycle() {
        use rand::{RngExt as _, SeedableRng as _};
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(7);
        let mut walk = vec![0.0];
        for _ in 0..20_000 {
            let step = if rng.random::<bool>() { 1.0 } else { -1.0 };
            walk.push(walk[walk.len() - 1] + step);
        }
        let vr = variance_ratio(&walk, 12);
        assert!((vr - 1.0).abs() < 0.15, "{vr}");
        let cycle: Vec<f64> = (0..20_000)
            .map(|i| (f64::from(i) / 288.0 * std::f64::consts::TAU).sin() + 0.01 * f64::from(i % 2))
            .collect();
        assert!(variance_ratio(&cycle, 288) < 0.01);
        assert!(variance_ratio(&cycle, 12) > 5.0, "a smooth swing trends");
    }

    #[test]
    fn a_warning_that_cleared_within_the_horizon_before_a_breach_warned_of_it() {
        // Raised at 81..83, cleared at 83; the breach begins at 85, within the horizon (5 steps)
        // of every warned origin: not a false alarm, and the incident was warned of, with the
        // lead from the first warned origin.
        let (a, series) = probe(scores(20, 50, 60), scores(30, 70, 85));
        let mut test = vec![0.0; 30];
        for o in 81..83 {
            test[o - 70] = 0.9;
        }
        let a = WarningProbe {
            test: [test.clone(), test],
            ..a
        };
        let t = Thresholds {
            combine: BreachCombine::Union,
            raise: 0.5,
            clear: 0.5,
            live: None,
        };
        let o = a.test_outcome(&series, t);
        assert_eq!((o.incidents, o.warned, o.false_alarms), (1, 1, 0));
        assert_eq!(o.warned_at_onset, 0, "not raised at 84");
        assert_eq!(o.lead_secs, [4 * 60]);
        // Raised only at 70..72: more than the horizon before the breach, a false alarm and a miss.
        let mut early = vec![0.0; 30];
        early[0] = 0.9;
        early[1] = 0.9;
        let a = WarningProbe {
            test: [early.clone(), early],
            ..a
        };
        let o = a.test_outcome(&series, t);
        assert_eq!((o.incidents, o.warned, o.false_alarms), (1, 0, 1));
    }

    #[test]
    fn hysteresis_keeps_a_warning_raised_until_the_score_falls_below_the_clear_threshold() {
        let active = replay_hysteresis(6, 1, &[0.2, 0.6, 0.4, 0.2, 0.6], 0.5, 0.3);
        assert_eq!(active, [false, false, true, true, false, true]);
    }
}
