//! The predictor's IO side: feeds each workload's stored reports into the sans-IO engine
//! ([`doppel_engine`]) and stores what it concludes.
//!
//! Per workload, on every evaluation:
//! 1. the live offered load (exchanges/s, summed over live instances) of report intervals that
//!    have settled since the last evaluation is read from the exchange counts stored at ingest
//!    (nothing is decoded) and fed to a [`WorkloadPredictor`], one observation per report
//!    interval. The series' seasonality is not known (a demo's time-compressed traffic has
//!    none), so the forecaster runs with a daily season it only uses once history covers a day;
//!    until then it is damped Holt with empirical intervals and says `cold_start`;
//! 2. each VM type's latency-versus-load model
//!    ([`doppel_engine::perf_model::PerformanceModel`]) is refitted from the live and shadow
//!    intervals of the last [`ForecastSettings::perf_window_ms`]: one point per agent
//!    and interval, its load and its SLO percentile. Shadows driven by amplified replays supply
//!    the points above live load, which is what lets a type's capacity be trusted;
//! 3. the predictor evaluates the warning (probability that live's SLO breaks within the
//!    horizon) and the placement decision; the latest forecast is stored for the API, warning
//!    episodes are opened and closed, and while a warning is raised and the decision is an
//!    urgent move, a [`Trigger::ForecastBreach`](crate::recommend::Trigger)
//!    recommendation names the cheapest type within budget that holds the SLO at the forecast
//!    peak. It goes out through the same signed webhook outbox as the comparison's.
//!
//! The state is kept in memory between evaluations and rebuilt from the store after a restart
//! or a policy change (the history is re-read, so nothing is lost but a few refits).

use std::collections::{BTreeMap, HashMap, VecDeque};

pub use doppel_engine::capacity::{CpuCeiling, Unmodelled};
use doppel_engine::{
    Decision, DecisionPolicy, DegradationWarning, ForecastConfig, LiveRule, LoadLatencyPoint,
    ModelKind, Placement, PointSource, WarningPolicy, WorkloadPredictor,
    assess::{Assessment, assess},
    candidates::within_budget,
    capacity::{CapacityGates, CpuSample, FitCache, Outcome, TypeMeasurements},
};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    compare::{Role, merge, scaled, shadow_weights},
    measurements::{load_live_mirrored, load_measurements},
    policy::WorkloadSpec,
    recommend::{
        ForecastEvidence, MEASURED_SHOWN, Recommendation, TypeCapacity, forecast_recommendation,
        model_curve,
    },
    store::{Store, StoreError},
};

/// How the predictor runs (`[forecast]` in the serve config; defaults suit one-second to
/// one-minute report intervals).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ForecastSettings {
    /// Look-ahead of warnings, in report intervals: 60 is an hour at one-minute reports, a
    /// minute of a time-compressed demo at one-second reports.
    pub horizon_steps: usize,
    /// Report intervals the load must stay over capacity for the SLO to count as broken: one
    /// interval over the line is a blip.
    pub min_breach_steps: usize,
    /// How breaches starting at different steps of the horizon are combined into one
    /// probability.
    pub combine: Combine,
    /// Raise a warning when the breach probability reaches this.
    pub raise_at: f64,
    /// Clear it when the probability falls below this (hysteresis).
    pub clear_below: f64,
    /// Raise a warning also when live evidence alone reaches this share of capacity: the load
    /// of the last `live_smooth_steps`, plus its rise carried `live_ahead_steps` ahead
    /// ([`doppel_engine::warning::live_pressure`]). 0 turns live evidence off.
    pub live_raise_at: f64,
    /// Clear a warning live evidence raised when it falls below this share.
    pub live_clear_below: f64,
    /// Report intervals live evidence smooths the load over.
    pub live_smooth_steps: usize,
    /// Report intervals ahead live evidence carries the load's recent rise.
    pub live_ahead_steps: usize,
    /// Most history a forecast fit uses, in report intervals.
    pub max_history_steps: usize,
    /// Live and shadow intervals of this window feed the performance models, ms.
    pub perf_window_ms: i64,
    /// Most points per VM type's model (the newest are kept).
    pub max_points_per_type: usize,
    /// A report interval is read once it ended this long ago, so late reports are not missed.
    pub settle_ms: i64,
    /// Intervals with fewer exchanges are too thin for a percentile and give no point.
    pub min_exchanges_per_interval: u64,
    /// A type's model is used only once its measured latency has risen this share of the way
    /// from its low-load value to the SLO
    /// ([`doppel_engine::perf_model::PerformanceModel::knee_evidence`]): before that the
    /// capacity is a guess, and warning on it would raise alarms at any load (measured: a live type seen between 60 and 68
    /// exchanges/s was given a capacity of 68/s).
    pub min_knee_evidence: f64,
    /// Intervals a type needs before its model is used, or lent to other types: a shadow's
    /// first seconds (a cold page cache, a new process) can look like a knee (measured: 9
    /// intervals of a fresh shadow gave it a "capacity" of 30/s, and every type scaled from it
    /// inherited the error).
    pub min_points: usize,
    /// The act policy's cooldown ([`doppel_engine::moves`]), in report intervals: no move for
    /// this long after a move, and advice does not change its mind for this long.
    pub cooldown_steps: usize,
    /// A type's performance model is refitted once this many report intervals were added to
    /// its window since its last fit (or at once when they reach a higher load); in between
    /// the fit is reused ([`doppel_engine::capacity::FitCache`]). 0 refits every evaluation.
    pub refit_after_steps: usize,
}

impl Default for ForecastSettings {
    fn default() -> Self {
        Self {
            horizon_steps: 60,
            min_breach_steps: 3,
            // The rule `cargo xtask eval predictor` chose on the traces' training parts
            // (`WarningPolicy::CHOSEN_PER_MINUTE`, whose combination is the largest window).
            combine: Combine::LargestWindow,
            raise_at: WarningPolicy::CHOSEN_PER_MINUTE.raise_at,
            clear_below: WarningPolicy::CHOSEN_PER_MINUTE.clear_below,
            live_raise_at: LiveRule::CHOSEN_PER_MINUTE.raise_at,
            live_clear_below: LiveRule::CHOSEN_PER_MINUTE.clear_below,
            live_smooth_steps: LiveRule::CHOSEN_PER_MINUTE.smooth_steps,
            live_ahead_steps: LiveRule::CHOSEN_PER_MINUTE.ahead_steps,
            max_history_steps: 4 * 1440,
            // Six hours: a type's capacity for a workload does not change by the hour, and a
            // shorter window forgets the day's peak by night (`cargo xtask eval decisions`
            // found a 30-minute window moving workloads off types that held every peak).
            perf_window_ms: 6 * 3600 * 1000,
            max_points_per_type: 512,
            settle_ms: 2000,
            min_exchanges_per_interval: 10,
            min_knee_evidence: 0.2,
            min_points: 20,
            cooldown_steps: 30,
            refit_after_steps: 10,
        }
    }
}

impl ForecastSettings {
    /// The gates a type's measurements must pass before its capacity is used.
    pub fn gates(&self) -> CapacityGates {
        CapacityGates {
            min_points: self.min_points,
            min_knee_evidence: self.min_knee_evidence,
        }
    }

    /// The first field out of range and why.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if self.horizon_steps == 0 {
            return Err(("horizon_steps", "must be positive"));
        }
        if !(self.raise_at > 0.0 && self.raise_at <= 1.0) {
            return Err(("raise_at", "must be in (0, 1]"));
        }
        if !(self.clear_below >= 0.0 && self.clear_below <= self.raise_at) {
            return Err(("clear_below", "must be in [0, raise_at]"));
        }
        if self.live_raise_at.is_nan() || self.live_raise_at < 0.0 {
            return Err((
                "live_raise_at",
                "must not be negative (0 turns live evidence off)",
            ));
        }
        // Off (0), the clear threshold is not read: turning live evidence off is one field.
        if self.live_raise_at > 0.0
            && !(self.live_clear_below >= 0.0 && self.live_clear_below <= self.live_raise_at)
        {
            return Err(("live_clear_below", "must be in [0, live_raise_at]"));
        }
        if self.live_smooth_steps == 0 {
            return Err(("live_smooth_steps", "must be positive"));
        }
        if self.max_history_steps < 16 {
            return Err(("max_history_steps", "must be at least 16"));
        }
        if self.perf_window_ms <= 0 {
            return Err(("perf_window_ms", "must be positive"));
        }
        if self.max_points_per_type < 3 {
            return Err(("max_points_per_type", "a model needs at least 3 points"));
        }
        if self.min_knee_evidence.is_nan() || self.min_knee_evidence < 0.0 {
            return Err(("min_knee_evidence", "must not be negative"));
        }
        if self.min_points < 3 {
            return Err(("min_points", "a model needs at least 3 points"));
        }
        if self.settle_ms < 0 {
            return Err(("settle_ms", "must not be negative"));
        }
        Ok(())
    }
}

/// [`BreachCombine`](doppel_engine::BreachCombine) as the config spells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// As if breaches starting at different steps were independent.
    Union,
    /// The likeliest breach window.
    #[default]
    LargestWindow,
}

impl From<Combine> for doppel_engine::BreachCombine {
    fn from(c: Combine) -> Self {
        match c {
            Combine::Union => Self::Union,
            Combine::LargestWindow => Self::LargestWindow,
        }
    }
}

/// A warning as stored and shown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WarningView {
    /// The live VM type expected to break its SLO.
    pub vm_type: String,
    /// Probability that the SLO breaks within the horizon.
    pub probability: f64,
    /// Seconds until the breach is expected to begin.
    pub lead_secs: u64,
    /// When the breach is expected to begin, ms since the epoch.
    pub expected_breach_ms: i64,
    /// Median forecast load then, exchanges/s (all live instances).
    pub forecast_load_per_s: f64,
    /// Live's capacity at the SLO, exchanges/s (all live instances, median estimate).
    pub capacity_per_s: f64,
    /// The type recommended, when a move was advised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recommended_vm_type: Option<String>,
}

/// One step of a stored forecast.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForecastPointView {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// Median, exchanges/s.
    pub median: f64,
    /// 80 % interval.
    pub lo80: f64,
    /// 80 % interval.
    pub hi80: f64,
}

/// The latest forecast of a workload, stored for `doppel forecast`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForecastSnapshot {
    /// Workload.
    pub workload: String,
    /// When, ms since the epoch.
    pub computed_ms: i64,
    /// Seconds per observation (the report interval).
    pub step_secs: u64,
    /// Observations of history the predictor holds.
    pub history_steps: usize,
    /// `seasonal_holt`, `holt` or `cold_start` (less history than a season); `none` before the
    /// first fit.
    pub model: String,
    /// The last observed offered load, exchanges/s.
    pub last_load_per_s: Option<f64>,
    /// Look-ahead, seconds.
    pub horizon_secs: u64,
    /// Highest median forecast over the horizon, exchanges/s.
    pub forecast_peak_per_s: Option<f64>,
    /// What a placement is sized for: the 90th-percentile forecast peak, or on a cold start the
    /// median peak ([`doppel_engine::WorkloadPredictor::provisioned_peak`]).
    pub provisioned_peak_per_s: Option<f64>,
    /// The forecast, one point per step.
    pub points: Vec<ForecastPointView>,
    /// The live VM type and instance count.
    pub current_vm_type: String,
    /// Live instances.
    pub current_count: u32,
    /// Live's capacity at the SLO, all instances, if its type has a model.
    pub current_capacity_per_s: Option<f64>,
    /// The warning, while raised.
    pub warning: Option<WarningView>,
    /// What the placement decision said, in a word and a type: `hold`, `confirming`,
    /// `move`, `no_viable_placement`, `no_model_for_current`.
    pub decision: String,
    /// Every type with a performance model.
    pub types: Vec<TypeCapacity>,
    /// Types seen without a model.
    pub unmodelled: Vec<Unmodelled>,
    /// Every type whose CPU use was reported, with its ceiling.
    #[serde(default)]
    pub cpu_ceilings: Vec<CpuCeiling>,
}

/// What one evaluation of one workload produced.
#[derive(Clone, Debug, PartialEq)]
pub struct ForecastOutcome {
    /// The stored snapshot.
    pub snapshot: ForecastSnapshot,
    /// A forecast-breach recommendation, when one was advised.
    pub recommendation: Option<Recommendation>,
    /// The forecast's check of the comparison's advice to move to a cheaper type.
    pub peak_check: doppel_engine::assess::PeakCheck,
}

/// A workload's predictor and what has been read for it.
#[derive(Debug)]
struct WorkloadForecast {
    predictor: WorkloadPredictor,
    revision: u64,
    step_ms: i64,
    /// Load buckets starting before this have been fed.
    fed_until_ms: Option<i64>,
    /// Intervals starting before this have been turned into points.
    perf_until_ms: i64,
    /// The SLO percentile the points' latencies are read at.
    percentile: f64,
    by_type: BTreeMap<String, TypeMeasurements>,
    /// Fits reused between evaluations.
    fits: FitCache,
    last_load: Option<f64>,
}

/// The predictors of all workloads.
#[derive(Debug, Default)]
pub struct Forecasts {
    settings: ForecastSettings,
    workloads: HashMap<String, WorkloadForecast>,
}

/// The live VM type (the most common among live instances) and the instance count.
fn live_placement(spec: &WorkloadSpec, prices: &HashMap<String, f64>) -> Placement {
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    for l in &spec.live {
        *counts.entry(l.vm_type.as_str()).or_default() += 1;
    }
    let vm_type = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(t, _)| (*t).to_owned())
        .unwrap_or_default();
    let count = u32::try_from(spec.live.len()).unwrap_or(u32::MAX).max(1);
    Placement {
        hourly_cost: prices.get(&vm_type).copied().unwrap_or(f64::INFINITY) * f64::from(count),
        vm_type,
        count,
    }
}

fn model_name(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::SeasonalHolt { .. } => "seasonal_holt",
        ModelKind::Holt { .. } => "holt",
        ModelKind::ColdStart { .. } => "cold_start",
    }
}

impl Forecasts {
    /// Predictors run with `settings`.
    pub fn new(settings: ForecastSettings) -> Self {
        Self {
            settings,
            workloads: HashMap::new(),
        }
    }

    /// The settings they run with.
    pub fn settings(&self) -> &ForecastSettings {
        &self.settings
    }

    /// Forgets workloads that no longer exist.
    pub fn retain(&mut self, names: &[&str]) {
        self.workloads.retain(|w, _| names.contains(&w.as_str()));
    }

    fn state(
        &mut self,
        spec: &WorkloadSpec,
        revision: u64,
        prices: &HashMap<String, f64>,
    ) -> &mut WorkloadForecast {
        let s = &self.settings;
        // Timestamps in the engine are whole seconds, so the step is too.
        let step_ms = i64::from(spec.policy.report_interval_ms.max(1).div_ceil(1000)) * 1000;
        let fresh = match self.workloads.get(&spec.name) {
            Some(w) => w.revision != revision || w.step_ms != step_ms,
            None => true,
        };
        if fresh {
            let step_secs = u64::try_from(step_ms / 1000).unwrap_or(1);
            let config = ForecastConfig::for_step(
                step_secs,
                s.max_history_steps,
                s.horizon_steps + s.min_breach_steps,
            );
            let placement = live_placement(spec, prices);
            let predictor = WorkloadPredictor::new(
                config,
                WarningPolicy {
                    horizon_steps: s.horizon_steps,
                    raise_at: s.raise_at,
                    clear_below: s.clear_below,
                    min_breach_steps: s.min_breach_steps,
                    combine: s.combine.into(),
                    live: (s.live_raise_at > 0.0).then_some(LiveRule {
                        raise_at: s.live_raise_at,
                        clear_below: s.live_clear_below,
                        smooth_steps: s.live_smooth_steps,
                        ahead_steps: s.live_ahead_steps,
                    }),
                },
                DecisionPolicy {
                    slo_ms: spec.policy.slo.max_latency_ms,
                    // The recommendation names a type for the instances live runs on now.
                    max_instances: placement.count,
                    ..DecisionPolicy::default()
                },
                placement,
            );
            // Points already collected keep the type they were measured on: after a move the
            // live agent's earlier intervals belong to the type it left, which re-reading the
            // window under the new spec would get wrong. (A new step or SLO percentile makes
            // them incomparable: then they are read again.)
            let percentile = spec.policy.slo.percentile;
            let (perf_until_ms, by_type) = self
                .workloads
                .remove(&spec.name)
                .filter(|old| old.step_ms == step_ms && old.percentile == percentile)
                .map(|old| (old.perf_until_ms, old.by_type))
                .unwrap_or_default();
            self.workloads.insert(
                spec.name.clone(),
                WorkloadForecast {
                    predictor,
                    revision,
                    step_ms,
                    fed_until_ms: None,
                    perf_until_ms,
                    percentile,
                    by_type,
                    fits: FitCache::new(s.refit_after_steps),
                    last_load: None,
                },
            );
        }
        self.workloads
            .get_mut(&spec.name)
            .unwrap_or_else(|| unreachable!("inserted above"))
    }

    /// Evaluates one workload at `now_ms`: feeds what settled since the last call, refits the
    /// performance models, runs the warning and the decision, stores the snapshot and the
    /// warning episode. Returns the snapshot and any forecast-breach recommendation (the caller
    /// stores and queues it, as it does the comparison's).
    pub fn evaluate(
        &mut self,
        store: &mut Store,
        spec: &WorkloadSpec,
        revision: u64,
        prices: &HashMap<String, f64>,
        now_ms: i64,
    ) -> Result<ForecastOutcome, StoreError> {
        let settings = self.settings.clone();
        let state = self.state(spec, revision, prices);
        let step_ms = state.step_ms;
        let settled_ms = now_ms - settings.settle_ms;
        feed_load(store, spec, state, &settings, settled_ms)?;
        collect_points(store, spec, state, &settings, now_ms, settled_ms)?;

        let placement = live_placement(spec, prices);
        let slo_ms = spec.policy.slo.max_latency_ms;
        let max_cost = spec.policy.budget.max_cost_per_hour;
        let now_secs = u64::try_from(now_ms / 1000).unwrap_or_default();
        let assessment = assess(
            &mut state.predictor,
            &state.by_type,
            &mut state.fits,
            &settings.gates(),
            slo_ms,
            placement.clone(),
            prices,
            max_cost,
            now_secs,
        );
        for (at, model) in &assessment.refits {
            debug!(workload = %spec.name, at, model = model_name(*model), "forecast refitted");
        }
        let Assessment {
            capacity,
            error_rates,
            warning,
            cleared,
            decision,
            ..
        } = &assessment;
        let current_model = capacity.model(&placement.vm_type).map(|t| &t.model);
        let types: Vec<TypeCapacity> = capacity
            .models
            .iter()
            .map(|t| TypeCapacity {
                vm_type: t.vm_type.clone(),
                role: t.role,
                price_per_hour: prices.get(&t.vm_type).copied(),
                capacity_at_slo_per_s: t.model.capacity_at(slo_ms),
                max_observed_load_per_s: t.model.max_observed_load(),
                points: t.model.points(),
                within_budget: within_budget(max_cost, prices.get(&t.vm_type).copied()),
                basis: t.basis.clone(),
                cpu_ceiling_per_s: capacity
                    .ceilings
                    .get(&t.vm_type)
                    .map(|c| c.saturation_per_s),
                error_rate: error_rates.get(&t.vm_type).copied(),
                measured: state
                    .by_type
                    .get(&t.vm_type)
                    .map(|m| {
                        let skip = m.points.len().saturating_sub(MEASURED_SHOWN);
                        m.points
                            .iter()
                            .skip(skip)
                            .map(|(_, p)| [p.load, p.latency_ms])
                            .collect()
                    })
                    .unwrap_or_default(),
                model_curve: model_curve(&t.model, slo_ms),
            })
            .collect();
        let step_secs = u64::try_from(step_ms / 1000).unwrap_or(1);
        let horizon = settings.horizon_steps.max(1);
        let forecaster = state.predictor.forecaster();
        let points: Vec<ForecastPointView> = state
            .predictor
            .forecast(horizon)
            .map(|f| {
                f.points
                    .iter()
                    .map(|p| ForecastPointView {
                        at_ms: i64::try_from(p.at).unwrap_or_default() * 1000,
                        median: p.median,
                        lo80: p.lo80,
                        hi80: p.hi80,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let forecast_peak =
            forecaster.map(|f| (1..=horizon).map(|h| f.median(h)).fold(0.0, f64::max));
        let provisioned_peak = state.predictor.provisioned_peak();
        let current_capacity =
            current_model.map(|m| m.capacity_at(slo_ms) * f64::from(placement.count));

        let urgent_move = assessment
            .forecast_move()
            .map(|m| (m.to.clone(), m.current_latency_ms, m.evidence.clone()));
        let warning_view = warning.as_ref().map(|w: &DegradationWarning| WarningView {
            vm_type: placement.vm_type.clone(),
            probability: w.probability,
            lead_secs: w.lead_secs,
            expected_breach_ms: i64::try_from(w.expected_breach_at).unwrap_or_default() * 1000,
            forecast_load_per_s: w.forecast_load,
            capacity_per_s: w.capacity,
            recommended_vm_type: urgent_move.as_ref().map(|(to, _, _)| to.vm_type.clone()),
        });
        let recommendation = match (&warning_view, urgent_move) {
            (Some(w), Some((to, current_latency_ms, evidence))) => Some(forecast_recommendation(
                &spec.name,
                &placement.vm_type,
                &to.vm_type,
                state.last_load.unwrap_or_default(),
                prices,
                &spec.policy,
                revision,
                now_ms,
                ForecastEvidence {
                    model: forecaster
                        .map_or("none", |f| model_name(f.kind()))
                        .to_owned(),
                    step_secs,
                    horizon_secs: horizon as u64 * step_secs,
                    breach_probability: w.probability,
                    lead_secs: w.lead_secs,
                    expected_breach_ms: w.expected_breach_ms,
                    forecast_peak_per_s: forecast_peak.unwrap_or_default(),
                    provisioned_peak_per_s: provisioned_peak.unwrap_or_default(),
                    current_capacity_per_s: current_capacity.unwrap_or_default(),
                    recommended_count: to.count,
                    recommended_capacity_per_instance: evidence.capacity_per_instance,
                    recommended_latency_at_peak_ms: evidence.latency_at_peak_ms,
                    current_latency_at_peak_ms: current_latency_ms
                        .is_finite()
                        .then_some(current_latency_ms),
                    types: types.clone(),
                },
            )),
            _ => None,
        };
        let snapshot = ForecastSnapshot {
            workload: spec.name.clone(),
            computed_ms: now_ms,
            step_secs,
            history_steps: state.predictor.history_len(),
            model: forecaster
                .map_or("none", |f| model_name(f.kind()))
                .to_owned(),
            last_load_per_s: state.last_load,
            horizon_secs: horizon as u64 * step_secs,
            forecast_peak_per_s: forecast_peak,
            provisioned_peak_per_s: provisioned_peak,
            points,
            current_vm_type: placement.vm_type.clone(),
            current_count: placement.count,
            current_capacity_per_s: current_capacity,
            warning: warning_view.clone(),
            decision: decision.as_ref().map_or("none", decision_name).to_owned(),
            types,
            unmodelled: capacity.unmodelled.clone(),
            cpu_ceilings: capacity.ceilings.values().cloned().collect(),
        };
        store.put_forecast(&spec.name, now_ms, &to_json("forecast", &snapshot)?)?;
        if let Some(w) = &warning_view {
            let raised =
                store.raise_warning(&spec.name, &w.vm_type, now_ms, &to_json("warning", w)?)?;
            if raised {
                info!(
                    workload = %spec.name,
                    vm_type = %w.vm_type,
                    probability = w.probability,
                    lead_secs = w.lead_secs,
                    "SLO breach forecast: warning raised"
                );
            }
        } else if *cleared {
            store.clear_warning(&spec.name, now_ms)?;
        }
        Ok(ForecastOutcome {
            snapshot,
            recommendation,
            peak_check: assessment.peak_check,
        })
    }
}

fn to_json<T: Serialize>(what: &'static str, value: &T) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(value).map_err(|source| StoreError::Json { what, source })
}

fn decision_name(d: &Decision) -> &'static str {
    use doppel_engine::HoldReason;
    match d {
        Decision::Hold {
            reason: HoldReason::Holds,
            ..
        } => "hold",
        Decision::Hold {
            reason: HoldReason::Confirming { .. },
            ..
        } => "confirming",
        Decision::Hold {
            reason: HoldReason::NoModelForCurrent,
            ..
        } => "no_model_for_current",
        Decision::Move { .. } => "move",
        Decision::NoViablePlacement { .. } => "no_viable_placement",
    }
}

/// Feeds the live load of every settled report interval not yet fed, one observation per step.
fn feed_load(
    store: &Store,
    spec: &WorkloadSpec,
    state: &mut WorkloadForecast,
    settings: &ForecastSettings,
    settled_ms: i64,
) -> Result<(), StoreError> {
    let step_ms = state.step_ms;
    // Steps that ended before `settled_ms` are complete.
    let end_bucket = settled_ms.div_euclid(step_ms);
    let history_ms = i64::try_from(settings.max_history_steps)
        .unwrap_or(i64::MAX)
        .saturating_mul(step_ms);
    let since = state
        .fed_until_ms
        .unwrap_or_else(|| (end_bucket * step_ms).saturating_sub(history_ms));
    let until = end_bucket * step_ms;
    if until <= since {
        return Ok(());
    }
    let agents: Vec<&str> = spec.live.iter().map(|l| l.agent.as_str()).collect();
    let mut buckets: BTreeMap<i64, u64> = BTreeMap::new();
    for row in store.offered_load(&agents, since, until)? {
        *buckets
            .entry(row.interval_start_ms.div_euclid(step_ms))
            .or_default() += row.exchanges;
    }
    let step_secs = step_ms as f64 / 1000.0;
    for (bucket, exchanges) in buckets {
        let load = exchanges as f64 / step_secs;
        let at = u64::try_from(bucket * step_ms / 1000).unwrap_or_default();
        if let Err(e) = state.predictor.handle_load(at, load) {
            warn!(workload = %spec.name, error = %e, "forecast not updated");
        }
        state.last_load = Some(load);
    }
    state.fed_until_ms = Some(until);
    Ok(())
}

/// One agent's interval, classes merged: its VM type, role, length (ms) and latencies.
/// (VM type, role, interval length ms, classes merged, exchanges failed).
type AgentInterval = (String, Role, i64, Histogram<u64>, u64);

/// Turns settled live and shadow intervals into load/latency points per VM type, and forgets
/// points older than the window.
fn collect_points(
    store: &Store,
    spec: &WorkloadSpec,
    state: &mut WorkloadForecast,
    settings: &ForecastSettings,
    now_ms: i64,
    settled_ms: i64,
) -> Result<(), StoreError> {
    let window_start = now_ms - settings.perf_window_ms;
    let since = state.perf_until_ms.max(window_start);
    if settled_ms > since {
        read_type_measurements(
            store,
            spec,
            since,
            settled_ms,
            settings.min_exchanges_per_interval,
            &mut state.by_type,
        )?;
        state.perf_until_ms = settled_ms;
    }
    let max = settings.max_points_per_type;
    for tp in state.by_type.values_mut() {
        keep_window(&mut tp.points, window_start, max);
        keep_window(&mut tp.cpu, window_start, max);
        keep_window(&mut tp.outcomes, window_start, max);
    }
    state.by_type.retain(|_, tp| !tp.points.is_empty());
    Ok(())
}

/// Adds the workload's live and shadow intervals starting in `[since_ms, until_ms)` to
/// `by_type`: one load/latency point per agent and interval (its classes merged, latency at the
/// SLO percentile), how its exchanges went, and its CPU use when reported. Intervals with fewer
/// than `min_exchanges` exchanges are too thin for a percentile and are skipped. The forecast
/// and the shadow pool's steering both read capacities from what this returns.
pub fn read_type_measurements(
    store: &Store,
    spec: &WorkloadSpec,
    since_ms: i64,
    until_ms: i64,
    min_exchanges: u64,
    by_type: &mut BTreeMap<String, TypeMeasurements>,
) -> Result<(), StoreError> {
    let measurements = load_measurements(store, spec, since_ms, until_ms)?;
    // A shadow's classes weighted by live's share of them, as the comparison weighs them, so a
    // class the learned mirroring oversamples does not skew the shadow's percentiles; the load
    // stays the exchanges the shadow served.
    let weights = shadow_weights(
        &measurements.iter().collect::<Vec<_>>(),
        &load_live_mirrored(store, spec, since_ms, until_ms)?,
    );
    // One point per agent and interval: its classes merged, and the exchanges served.
    let mut intervals: BTreeMap<(i64, String), (AgentInterval, u64)> = BTreeMap::new();
    for (m, weight) in measurements.into_iter().zip(weights) {
        let served = m.histogram.len();
        let weighted = if (weight - 1.0).abs() > 1e-9 {
            scaled(&m.histogram, weight)
        } else {
            m.histogram
        };
        match intervals.entry((m.interval_start_ms, m.agent.clone())) {
            std::collections::btree_map::Entry::Occupied(mut e) => {
                let (interval, exchanges) = e.get_mut();
                merge(&mut interval.3, &weighted);
                *exchanges += served;
                // The error count is the report's, repeated on each of its classes.
            }
            std::collections::btree_map::Entry::Vacant(e) => {
                // The first class's histogram becomes the interval's; others merge into it.
                let mut h = weighted;
                h.auto(true);
                e.insert((
                    (m.vm_type, m.role, m.interval_ms, h, m.report_errors),
                    served,
                ));
            }
        }
    }
    let agents: Vec<&str> = spec
        .live
        .iter()
        .map(|l| l.agent.as_str())
        .chain(spec.shadows.iter().map(|s| s.agent.as_str()))
        .collect();
    let usage: HashMap<(i64, String), doppel_common::wire::ResourceUsage> = store
        .workload_usage(&agents, since_ms, until_ms)?
        .into_iter()
        .map(|(agent, start, usage)| ((start, agent), usage))
        .collect();
    let quantile = spec.policy.slo.percentile / 100.0;
    for ((start, agent), ((vm_type, role, interval_ms, h, errors), served)) in intervals {
        if served < min_exchanges || interval_ms <= 0 {
            continue;
        }
        let cpu = usage
            .get(&(start, agent))
            .filter(|u| u.cpu_capacity_millis > 0 && u.cpu_time_us > 0)
            .map(|u| CpuSample {
                cpu_us: u.cpu_time_us,
                exchanges: served,
                capacity_millis: u.cpu_capacity_millis,
            });
        let point = LoadLatencyPoint {
            load: served as f64 / (interval_ms as f64 / 1000.0),
            latency_ms: h.value_at_quantile(quantile) as f64 / 1e6,
            source: match role {
                Role::Live => PointSource::Live,
                Role::Shadow => PointSource::Shadow,
            },
        };
        let tp = by_type.entry(vm_type).or_default();
        // A type both live and shadowed is reported as live.
        tp.role = Some(match (tp.role, role) {
            (Some(Role::Live), _) | (_, Role::Live) => Role::Live,
            _ => Role::Shadow,
        });
        let outcome = Outcome {
            failed: errors,
            measured: served,
            load: point.load,
        };
        tp.outcomes.push_back((start, outcome));
        tp.points.push_back((start, point));
        if let Some(cpu) = cpu {
            tp.cpu.push_back((start, cpu));
        }
    }
    Ok(())
}

/// Orders `(interval start, item)` pairs by start and keeps the newest `max` starting at or
/// after `window_start`.
fn keep_window<T>(items: &mut VecDeque<(i64, T)>, window_start: i64, max: usize) {
    items.make_contiguous().sort_by_key(|(start, _)| *start);
    while items
        .front()
        .is_some_and(|(start, _)| *start < window_start)
        || items.len() > max
    {
        items.pop_front();
    }
}

#[cfg(test)]
mod tests;
