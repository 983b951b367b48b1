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
//! 2. each VM type's latency-versus-load model ([`PerformanceModel`]) is refitted from the live
//!    and shadow intervals of the last [`ForecastSettings::perf_window_ms`]: one point per agent
//!    and interval, its load and its SLO percentile. Shadows driven by amplified replays supply
//!    the points above live load, which is what lets a type's capacity be trusted;
//! 3. the predictor evaluates the warning (probability that live's SLO breaks within the
//!    horizon) and the placement decision; the latest forecast is stored for the API, warning
//!    episodes are opened and closed, and while a warning is raised and the decision is an
//!    urgent move, a [`Trigger::ForecastBreach`](crate::compare::recommend::Trigger)
//!    recommendation names the cheapest type within budget that holds the SLO at the forecast
//!    peak. It goes out through the same signed webhook outbox as the comparison's.
//!
//! The state is kept in memory between evaluations and rebuilt from the store after a restart
//! or a policy change (the history is re-read, so nothing is lost but a few refits).

use std::collections::{BTreeMap, HashMap, VecDeque};

use doppel_engine::{
    Candidate, Decision, DecisionPolicy, DegradationWarning, ForecastConfig, LoadLatencyPoint,
    ModelKind, PerformanceModel, Placement, PointSource, PredictorEvent, VmType, WarningPolicy,
    WorkloadPredictor,
};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::{
    compare::{
        Role, merge,
        recommend::{
            ForecastEvidence, Recommendation, TypeCapacity, fails_more_than_its_peers,
            forecast_recommendation,
        },
    },
    evaluate::load_measurements,
    policy::WorkloadSpec,
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
    /// ([`PerformanceModel::knee_evidence`]): before that the capacity is a guess, and warning
    /// on it would raise alarms at any load (measured: a live type seen between 60 and 68
    /// exchanges/s was given a capacity of 68/s).
    pub min_knee_evidence: f64,
    /// Intervals a type needs before its model is used, or lent to other types: a shadow's
    /// first seconds (a cold page cache, a new process) can look like a knee (measured: 9
    /// intervals of a fresh shadow gave it a "capacity" of 30/s, and every type scaled from it
    /// inherited the error).
    pub min_points: usize,
}

impl Default for ForecastSettings {
    fn default() -> Self {
        Self {
            horizon_steps: 60,
            min_breach_steps: 3,
            // The rule `cargo xtask eval predictor` chose on the traces' training parts (at
            // most one false alarm a day and a warning raised at most a quarter of the time
            // there): the likeliest breach window, raised at 0.225, cleared below 0.034.
            combine: Combine::LargestWindow,
            raise_at: 0.225,
            clear_below: 0.034,
            max_history_steps: 4 * 1440,
            perf_window_ms: 30 * 60 * 1000,
            max_points_per_type: 512,
            settle_ms: 2000,
            min_exchanges_per_interval: 10,
            min_knee_evidence: 0.2,
            min_points: 20,
        }
    }
}

impl ForecastSettings {
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

/// A VM type without a performance model, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Unmodelled {
    /// VM type.
    pub vm_type: String,
    /// Why no model could be fitted (too few points, no load spread, …).
    pub reason: String,
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
    /// Highest 90th-percentile forecast over the horizon: what a placement is sized for.
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
}

/// One VM type's recent measurements.
#[derive(Debug, Default)]
struct TypePoints {
    role: Option<Role>,
    /// (interval start ms, point), oldest first.
    points: VecDeque<(i64, LoadLatencyPoint)>,
    /// (interval start ms, CPU use of the workload in it), oldest first.
    cpu: VecDeque<(i64, CpuSample)>,
    /// (interval start ms, how its exchanges went), oldest first.
    outcomes: VecDeque<(i64, Outcome)>,
}

/// One interval's exchanges on one instance: how many failed, at what load.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Outcome {
    /// Exchanges the agent counted as failed (`exchange_errors`).
    failed: u64,
    /// Exchanges measured.
    measured: u64,
    /// Offered load, exchanges/s.
    load: f64,
}

impl TypePoints {
    /// Failed over measured exchanges in the window's intervals with load up to `max_load`
    /// (the type's capacity: past it an amplified replay is expected to fail); `None` before
    /// any was measured.
    fn error_rate_up_to(&self, max_load: f64) -> Option<f64> {
        let (failed, measured) = self
            .outcomes
            .iter()
            .filter(|(_, o)| o.load <= max_load)
            .fold((0, 0), |(f, m), (_, o)| (f + o.failed, m + o.measured));
        (measured > 0).then(|| failed as f64 / measured as f64)
    }
}

/// One interval's workload CPU use on one instance.
#[derive(Clone, Copy, Debug, PartialEq)]
struct CpuSample {
    /// CPU time the workload used, µs.
    cpu_us: u64,
    /// Exchanges it served.
    exchanges: u64,
    /// CPUs it may use (its cgroup's quota, or the host's), thousandths.
    capacity_millis: u32,
}

/// A VM type's CPU ceiling by the utilization law: an instance that spends `cpu_ms_per_exchange`
/// of CPU on each exchange and may use `cpus` CPUs cannot serve more than
/// `cpus / cpu_ms_per_exchange` exchanges per second, whatever its latency. Measured at any
/// load, so it is known for types never driven near their knee; it bounds CPU-bound work only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CpuCeiling {
    /// VM type.
    pub vm_type: String,
    /// CPUs available to the workload (median over the intervals).
    pub cpus: f64,
    /// CPU time per exchange, ms (median over the intervals).
    pub cpu_ms_per_exchange: f64,
    /// `cpus / cpu_ms_per_exchange`, exchanges/s per instance.
    pub saturation_per_s: f64,
    /// Intervals behind it.
    pub intervals: usize,
}

/// Fewest intervals a CPU ceiling is drawn from.
const MIN_CPU_INTERVALS: usize = 5;

fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some(f64::midpoint(values[n / 2 - 1], values[n / 2])),
    }
}

/// The ceiling of one type from its intervals' CPU samples, when there are enough.
fn cpu_ceiling(vm_type: &str, samples: &VecDeque<(i64, CpuSample)>) -> Option<CpuCeiling> {
    if samples.len() < MIN_CPU_INTERVALS {
        return None;
    }
    let mut per_exchange: Vec<f64> = samples
        .iter()
        .map(|(_, s)| s.cpu_us as f64 / 1000.0 / s.exchanges as f64)
        .collect();
    let mut cpus: Vec<f64> = samples
        .iter()
        .map(|(_, s)| f64::from(s.capacity_millis) / 1000.0)
        .collect();
    let cpu_ms_per_exchange = median(&mut per_exchange)?;
    let cpus = median(&mut cpus)?;
    (cpu_ms_per_exchange > 0.0 && cpus > 0.0).then(|| CpuCeiling {
        vm_type: vm_type.to_owned(),
        cpus,
        cpu_ms_per_exchange,
        saturation_per_s: cpus * 1000.0 / cpu_ms_per_exchange,
        intervals: samples.len(),
    })
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
    by_type: BTreeMap<String, TypePoints>,
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

/// A deterministic seed per type, so the bootstrap of identical points gives identical models.
fn seed_of(name: &str) -> u64 {
    // FNV-1a.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn model_name(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::SeasonalHolt { .. } => "seasonal_holt",
        ModelKind::Holt { .. } => "holt",
        ModelKind::ColdStart { .. } => "cold_start",
    }
}

fn within_budget(spec: &WorkloadSpec, price: Option<f64>) -> bool {
    match (spec.policy.budget.max_cost_per_hour, price) {
        (None, _) => true,
        (Some(max), Some(price)) => price <= max,
        (Some(_), None) => false,
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
        let (models, unmodelled, ceilings) = type_models(&state.by_type, &settings, slo_ms);
        let vm_types: Vec<VmType> = models
            .iter()
            .map(|t| VmType {
                name: t.vm_type.clone(),
                vcpus: 0,
                memory_gib: 0.0,
                // Unknown prices never win on cost.
                price_per_hour: prices.get(&t.vm_type).copied().unwrap_or(f64::INFINITY),
                benchmark_score: None,
            })
            .collect();
        // Each type's error rate at the loads it holds the SLO at; live agents count no errors,
        // so only shadows' rates set the bar.
        let error_rates: HashMap<&str, f64> = models
            .iter()
            .filter_map(|t| {
                let rate = state
                    .by_type
                    .get(&t.vm_type)?
                    .error_rate_up_to(t.model.capacity_at(slo_ms))?;
                Some((t.vm_type.as_str(), rate))
            })
            .collect();
        let shadow_error_rates: Vec<f64> = models
            .iter()
            .filter(|t| t.role == Role::Shadow)
            .filter_map(|t| error_rates.get(t.vm_type.as_str()).copied())
            .collect();
        let candidates: Vec<Candidate<'_>> = models
            .iter()
            .zip(&vm_types)
            .filter(|(t, _)| {
                // The current type stays a candidate whatever its price and errors: the warning
                // needs its model. Others must fit the budget and not fail their exchanges.
                t.vm_type == placement.vm_type
                    || (within_budget(spec, prices.get(&t.vm_type).copied())
                        && !fails_more_than_its_peers(
                            error_rates.get(t.vm_type.as_str()).copied(),
                            shadow_error_rates.iter().copied(),
                        ))
            })
            .map(|(t, vm_type)| Candidate {
                vm_type,
                model: &t.model,
            })
            .collect();
        let now_secs = u64::try_from(now_ms / 1000).unwrap_or_default();
        state.predictor.set_placement(placement.clone());
        state.predictor.handle_timeout(now_secs, &candidates);
        let (mut warning, mut cleared, mut decision) = (None, false, None);
        while let Some(event) = state.predictor.poll_event() {
            match event {
                PredictorEvent::Refitted { at, model } => {
                    debug!(workload = %spec.name, at, model = model_name(model), "forecast refitted");
                }
                PredictorEvent::Warning(w) => warning = Some(w),
                PredictorEvent::WarningCleared { .. } => cleared = true,
                PredictorEvent::Decision(d) => decision = Some(d),
            }
        }
        let current_model = models
            .iter()
            .find(|t| t.vm_type == placement.vm_type)
            .map(|t| &t.model);
        let types: Vec<TypeCapacity> = models
            .iter()
            .map(|t| TypeCapacity {
                vm_type: t.vm_type.clone(),
                role: t.role,
                price_per_hour: prices.get(&t.vm_type).copied(),
                capacity_at_slo_per_s: t.model.capacity_at(slo_ms),
                max_observed_load_per_s: t.model.max_observed_load(),
                points: t.model.points(),
                within_budget: within_budget(spec, prices.get(&t.vm_type).copied()),
                basis: t.basis.clone(),
                cpu_ceiling_per_s: ceilings.get(&t.vm_type).map(|c| c.saturation_per_s),
                error_rate: error_rates.get(t.vm_type.as_str()).copied(),
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
        let provisioned_peak = forecaster.map(|f| {
            (1..=horizon)
                .map(|h| f.quantile(h, 0.9))
                .fold(0.0, f64::max)
        });
        let current_capacity =
            current_model.map(|m| m.capacity_at(slo_ms) * f64::from(placement.count));

        let urgent_move = match &decision {
            Some(Decision::Move {
                to,
                urgent: true,
                current_latency_ms,
                evidence,
                ..
            }) if warning.is_some() => Some((to.clone(), *current_latency_ms, evidence.clone())),
            _ => None,
        };
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
            unmodelled,
            cpu_ceilings: ceilings.into_values().collect(),
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
        } else if cleared {
            store.clear_warning(&spec.name, now_ms)?;
        }
        Ok(ForecastOutcome {
            snapshot,
            recommendation,
        })
    }
}

/// A VM type's performance model and where its capacity comes from.
#[derive(Debug)]
struct TypeModel {
    vm_type: String,
    role: Role,
    model: PerformanceModel,
    /// `measured knee`, or `scaled from TYPE by CPU ceiling ×R`.
    basis: String,
}

/// Every type's model from its points: fitted where its knee was measured, scaled from the
/// best-measured type by CPU ceilings where it was only measured flat; the types left without
/// one, and why; every type's CPU ceiling.
fn type_models(
    by_type: &BTreeMap<String, TypePoints>,
    settings: &ForecastSettings,
    slo_ms: f64,
) -> (
    Vec<TypeModel>,
    Vec<Unmodelled>,
    BTreeMap<String, CpuCeiling>,
) {
    let ceilings: BTreeMap<String, CpuCeiling> = by_type
        .iter()
        .filter_map(|(t, tp)| cpu_ceiling(t, &tp.cpu).map(|c| (t.clone(), c)))
        .collect();
    let mut models: Vec<TypeModel> = Vec::new();
    // Types measured only below their knee: (type, role, points, why the fit is not used).
    let mut flat: Vec<(String, Role, Vec<LoadLatencyPoint>, String)> = Vec::new();
    let mut unmodelled = Vec::new();
    for (vm_type, tp) in by_type {
        let points: Vec<LoadLatencyPoint> = tp.points.iter().map(|(_, p)| *p).collect();
        let role = tp.role.unwrap_or(Role::Shadow);
        if points.len() < settings.min_points {
            unmodelled.push(Unmodelled {
                vm_type: vm_type.clone(),
                reason: format!(
                    "{} intervals so far; a model needs {}",
                    points.len(),
                    settings.min_points
                ),
            });
            continue;
        }
        match PerformanceModel::fit(&points, seed_of(vm_type)) {
            Ok(m) if m.knee_evidence(slo_ms) < settings.min_knee_evidence => {
                let why = format!(
                    "capacity not identified: over the measured {:.0}/s its latency rose only {:.0} % of the way to the SLO",
                    m.max_observed_load(),
                    100.0 * m.knee_evidence(slo_ms)
                );
                flat.push((vm_type.clone(), role, points, why));
            }
            Ok(m) => models.push(TypeModel {
                vm_type: vm_type.clone(),
                role,
                model: m,
                basis: "measured knee".to_owned(),
            }),
            Err(e) => unmodelled.push(Unmodelled {
                vm_type: vm_type.clone(),
                reason: e.to_string(),
            }),
        }
    }
    // A type whose knee was measured and whose CPU ceiling is known lends its curve to the
    // types that were only measured where latency is flat, scaled by their CPU ceilings:
    // the utilization law gives each type's saturation load from its own CPU time per
    // exchange at any load, so shadows need not be driven to their knees.
    let reference = models
        .iter()
        .filter_map(|t| Some((&t.vm_type, &t.model, ceilings.get(&t.vm_type)?)))
        .max_by(|a, b| {
            let evidence = |m: &PerformanceModel| m.knee_evidence(slo_ms);
            evidence(a.1)
                .total_cmp(&evidence(b.1))
                .then_with(|| b.0.cmp(a.0))
        })
        .map(|(name, m, c)| (name.clone(), m.clone(), c.saturation_per_s));
    for (vm_type, role, points, why) in flat {
        match (&reference, ceilings.get(&vm_type)) {
            (Some((ref_name, ref_model, ref_ceiling)), Some(ceiling)) => {
                let scale = ceiling.saturation_per_s / ref_ceiling;
                let scaled = ref_model.scaled(scale, &points);
                // The type's own measurements outrank the assumption: if it held the SLO
                // at a load past the scaled capacity, the transfer does not fit this type.
                let held = points
                    .iter()
                    .filter(|p| p.latency_ms <= slo_ms)
                    .map(|p| p.load)
                    .fold(0.0, f64::max);
                if held > scaled.capacity_at(slo_ms) {
                    unmodelled.push(Unmodelled {
                        vm_type,
                        reason: format!(
                            "{why}; scaled from {ref_name} its capacity would be {:.0}/s, below the {held:.0}/s it held",
                            scaled.capacity_at(slo_ms)
                        ),
                    });
                    continue;
                }
                let basis = format!("scaled from {ref_name} by CPU ceiling ×{scale:.2}");
                models.push(TypeModel {
                    vm_type,
                    role,
                    model: scaled,
                    basis,
                });
            }
            _ => unmodelled.push(Unmodelled {
                vm_type,
                reason: why,
            }),
        }
    }
    (models, unmodelled, ceilings)
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
        let measurements = load_measurements(store, spec, since, settled_ms)?;
        // One point per agent and interval: its classes merged.
        let mut intervals: BTreeMap<(i64, String), AgentInterval> = BTreeMap::new();
        for m in measurements {
            match intervals.entry((m.interval_start_ms, m.agent.clone())) {
                std::collections::btree_map::Entry::Occupied(mut e) => {
                    merge(&mut e.get_mut().3, &m.histogram);
                    // The error count is the report's, repeated on each of its classes.
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    // The first class's histogram becomes the interval's; others merge into it.
                    let mut h = m.histogram;
                    h.auto(true);
                    e.insert((m.vm_type, m.role, m.interval_ms, h, m.report_errors));
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
            .workload_usage(&agents, since, settled_ms)?
            .into_iter()
            .map(|(agent, start, usage)| ((start, agent), usage))
            .collect();
        let quantile = spec.policy.slo.percentile / 100.0;
        for ((start, agent), (vm_type, role, interval_ms, h, errors)) in intervals {
            if h.len() < settings.min_exchanges_per_interval || interval_ms <= 0 {
                continue;
            }
            let cpu = usage
                .get(&(start, agent))
                .filter(|u| u.cpu_capacity_millis > 0 && u.cpu_time_us > 0)
                .map(|u| CpuSample {
                    cpu_us: u.cpu_time_us,
                    exchanges: h.len(),
                    capacity_millis: u.cpu_capacity_millis,
                });
            let point = LoadLatencyPoint {
                load: h.len() as f64 / (interval_ms as f64 / 1000.0),
                latency_ms: h.value_at_quantile(quantile) as f64 / 1e6,
                source: match role {
                    Role::Live => PointSource::Live,
                    Role::Shadow => PointSource::Shadow,
                },
            };
            let tp = state.by_type.entry(vm_type).or_default();
            // A type both live and shadowed is reported as live.
            tp.role = Some(match (tp.role, role) {
                (Some(Role::Live), _) | (_, Role::Live) => Role::Live,
                _ => Role::Shadow,
            });
            let outcome = Outcome {
                failed: errors,
                measured: h.len(),
                load: point.load,
            };
            tp.outcomes.push_back((start, outcome));
            tp.points.push_back((start, point));
            if let Some(cpu) = cpu {
                tp.cpu.push_back((start, cpu));
            }
        }
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
