//! Recommendations v1, from a [`Comparison`] and the workload's policy. Sans-IO like the rest
//! of the engine.
//!
//! Two triggers from the comparison, checked in this order:
//! - **SLO broken**: live's SLO percentile over the window is above the bound. The cheapest
//!   shadow type within budget whose percentile at matched load holds the SLO is recommended
//!   (the fastest on a price tie); with none holding it, nothing is recommended.
//! - **Faster for no more money**: a shadow type is [`Verdict::Faster`] with confidence and
//!   costs no more than live (both prices known) and is within budget; the fastest is chosen.
//!
//! Neither names a shadow type failing [`MAX_EXCESS_ERROR_RATE`] more of its exchanges than the
//! best shadow type.
//!
//! A third, [`Trigger::ForecastBreach`], comes from the predictor ([`crate::forecast`]): the
//! SLO is expected to break within the forecast horizon, and the cheapest type within budget
//! whose measured capacity holds the SLO at the forecast peak is recommended before it does;
//! [`forecast_recommendation`] builds it, with the forecast and each type's capacity as evidence.
//!
//! The idempotency key is derived from workload, types, trigger and the policy revision, so the
//! same advice is stored and delivered once until the policy changes, however often the
//! comparison runs.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Comparison, LatencyStats, Ranked, Role, Verdict};
use crate::policy::Policy;

/// Why a recommendation was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Live breaks its SLO.
    SloBreach,
    /// A shadow type is faster at lower or equal cost.
    FasterAtLowerOrEqualCost,
    /// The load forecast says live will break its SLO within the horizon.
    ForecastBreach,
}

impl Trigger {
    /// The stored reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SloBreach => "slo_breach",
            Self::FasterAtLowerOrEqualCost => "faster_at_lower_or_equal_cost",
            Self::ForecastBreach => "forecast_breach",
        }
    }
}

/// The evidence for one VM type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// VM type.
    pub vm_type: String,
    /// Live or shadow.
    pub role: Role,
    /// Price per hour, if listed.
    pub price_per_hour: Option<f64>,
    /// Figures over the window, all classes.
    pub window: LatencyStats,
    /// For shadows: the matched-load comparison against live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versus_live: Option<Ranked>,
}

/// The JSON document stored and POSTed to webhooks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    /// Workload.
    pub workload: String,
    /// Why.
    pub trigger: Trigger,
    /// The live VM type now.
    pub current_vm_type: String,
    /// The VM type recommended.
    pub recommended_vm_type: String,
    /// Live's offered load over the window, exchanges/s.
    pub load_per_s: f64,
    /// Confidence that the recommended type is faster than live at matched load, 0..=1; for
    /// [`Trigger::ForecastBreach`], the probability that live breaks its SLO within the horizon.
    pub confidence: f64,
    /// Price per hour of the recommended type minus the current one, if both are listed.
    pub cost_delta_per_hour: Option<f64>,
    /// The SLO in force: percentile and bound (ms).
    pub slo_percentile: f64,
    /// The SLO bound, ms.
    pub slo_max_latency_ms: f64,
    /// Evidence per VM type.
    pub evidence: Vec<Evidence>,
    /// When, ms since the epoch.
    pub created_ms: i64,
    /// Delivered as the `Idempotency-Key` header too.
    pub idempotency_key: String,
    /// Policy revision it was computed under.
    pub policy_revision: u64,
    /// For [`Trigger::ForecastBreach`]: the forecast and the capacity evidence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forecast: Option<ForecastEvidence>,
}

/// Why the predictor expects a breach, and why the recommended type holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForecastEvidence {
    /// The forecasting model in use (e.g. `cold_start` while history is short).
    pub model: String,
    /// Seconds between the series' observations (the report interval).
    pub step_secs: u64,
    /// Look-ahead of the warning, seconds.
    pub horizon_secs: u64,
    /// Probability that live breaks its SLO within the horizon.
    pub breach_probability: f64,
    /// Seconds from now until the breach is expected to begin.
    pub lead_secs: u64,
    /// When the breach is expected to begin, ms since the epoch.
    pub expected_breach_ms: i64,
    /// Highest median forecast load over the horizon, exchanges/s (all live instances).
    pub forecast_peak_per_s: f64,
    /// The load the recommended placement is sized for: the forecast's 90th percentile peak.
    pub provisioned_peak_per_s: f64,
    /// Live's capacity at the SLO (median estimate, all live instances), exchanges/s.
    pub current_capacity_per_s: f64,
    /// Instances of the recommended type.
    pub recommended_count: u32,
    /// The recommended type's capacity at the SLO per instance that the choice relied on.
    pub recommended_capacity_per_instance: f64,
    /// Predicted SLO percentile of the recommended type at the provisioned peak, ms.
    pub recommended_latency_at_peak_ms: f64,
    /// Predicted SLO percentile of live at the provisioned peak, ms (infinite: saturated).
    pub current_latency_at_peak_ms: Option<f64>,
    /// Every type with a performance model: what was measured and what it can hold.
    pub types: Vec<TypeCapacity>,
}

/// One VM type's performance model, as evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypeCapacity {
    /// VM type.
    pub vm_type: String,
    /// Live or shadow.
    pub role: Role,
    /// Price per hour, if listed.
    pub price_per_hour: Option<f64>,
    /// Load per instance at which the SLO percentile reaches the bound (median estimate).
    pub capacity_at_slo_per_s: f64,
    /// Highest load per instance it was measured at.
    pub max_observed_load_per_s: f64,
    /// Intervals behind the model.
    pub points: usize,
    /// Whether the budget allows it.
    pub within_budget: bool,
    /// Where the capacity comes from: `measured knee`, or `scaled from TYPE by CPU ceiling ×R`
    /// for a type only measured where its latency is flat.
    #[serde(default)]
    pub basis: String,
    /// Its CPU ceiling (utilization law), exchanges/s per instance, when its CPU use is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_ceiling_per_s: Option<f64>,
    /// Failed over measured exchanges in the window (shadows count 5xx, resets, timeouts and
    /// refused connections; live agents count none); a shadow type failing
    /// [`MAX_EXCESS_ERROR_RATE`] more than the best shadow type is not chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
}

/// The recommendation for a forecast breach: live on `current` is expected to break its SLO,
/// and `recommended` holds it at the forecast peak (chosen by the predictor's decision).
#[expect(
    clippy::too_many_arguments,
    reason = "the fields of the document it builds; a struct would only rename them"
)]
pub fn forecast_recommendation(
    workload: &str,
    current: &str,
    recommended: &str,
    load_per_s: f64,
    prices: &std::collections::HashMap<String, f64>,
    policy: &Policy,
    revision: u64,
    created_ms: i64,
    forecast: ForecastEvidence,
) -> Recommendation {
    let cost_delta_per_hour = match (prices.get(recommended), prices.get(current)) {
        (Some(to), Some(from)) => Some(to * f64::from(forecast.recommended_count) - from),
        _ => None,
    };
    Recommendation {
        workload: workload.to_owned(),
        trigger: Trigger::ForecastBreach,
        current_vm_type: current.to_owned(),
        recommended_vm_type: recommended.to_owned(),
        load_per_s,
        confidence: forecast.breach_probability,
        cost_delta_per_hour,
        slo_percentile: policy.slo.percentile,
        slo_max_latency_ms: policy.slo.max_latency_ms,
        evidence: Vec::new(),
        created_ms,
        idempotency_key: idempotency_key(
            workload,
            current,
            recommended,
            Trigger::ForecastBreach,
            revision,
        ),
        policy_revision: revision,
        forecast: Some(forecast),
    }
}

/// How many more of its replayed exchanges a shadow type may fail than the shadow type failing
/// least (5xx, resets, timeouts, refused connections: the shadow agent's `exchange_errors`) and
/// still be recommended. A type that fails requests answers them fast, so without this its
/// latency would argue for it. The bar is relative because every shadow replays the same
/// requests: those the workload fails anywhere (a 5xx it also returns live) fail on every type
/// alike, and only the excess is the type's own. (Live agents do not count errors.)
pub const MAX_EXCESS_ERROR_RATE: f64 = 0.01;

/// Whether a type with `error_rate` fails clearly more than the best of `shadow_rates` (the
/// error rates of every measured shadow type, its own included).
pub fn fails_more_than_its_peers(
    error_rate: Option<f64>,
    shadow_rates: impl IntoIterator<Item = f64>,
) -> bool {
    let best = shadow_rates.into_iter().fold(f64::INFINITY, f64::min);
    error_rate.is_some_and(|e| e > best + MAX_EXCESS_ERROR_RATE)
}

/// The shadow type fails clearly more of its exchanges at matched load than the best shadow
/// type. A type without matched intervals yet still sets the bar with its rate over the window
/// (amplified replays included, so it can only set the bar too high, never too low).
fn failing(comparison: &Comparison, r: &Ranked) -> bool {
    let window_rate = |vm_type: &str| {
        comparison
            .types
            .iter()
            .find(|t| t.vm_type == vm_type && t.role == Role::Shadow)
            .and_then(|t| t.all.error_rate)
    };
    fails_more_than_its_peers(
        r.error_rate_at_load,
        comparison
            .ranking
            .iter()
            .filter_map(|p| p.error_rate_at_load.or_else(|| window_rate(&p.vm_type))),
    )
}

fn within_budget(policy: &Policy, r: &Ranked, comparison: &Comparison) -> bool {
    let price = comparison
        .types
        .iter()
        .find(|t| t.vm_type == r.vm_type && t.role == Role::Shadow)
        .and_then(|t| t.price_per_hour);
    match (policy.budget.max_cost_per_hour, price) {
        (None, _) => true,
        (Some(max), Some(price)) => price <= max,
        // A budget is set and the price is unknown: it cannot be shown to fit.
        (Some(_), None) => false,
    }
}

/// The idempotency key of a piece of advice.
pub fn idempotency_key(
    workload: &str,
    current: &str,
    recommended: &str,
    trigger: Trigger,
    revision: u64,
) -> String {
    let mut h = Sha256::new();
    for part in [workload, current, recommended, trigger.as_str()] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    h.update(revision.to_be_bytes());
    hex::encode(&h.finalize()[..16])
}

/// At most one recommendation for the workload compared in `comparison`.
pub fn recommend(
    comparison: &Comparison,
    policy: &Policy,
    revision: u64,
) -> Option<Recommendation> {
    let current = comparison.live_vm_type.clone()?;
    let live = comparison.types.iter().find(|t| t.role == Role::Live)?;
    let live_at_slo = live.at_percentile_ms;
    let slo_max = policy.slo.max_latency_ms;
    let eligible = comparison
        .ranking
        .iter()
        .filter(|r| r.verdict != Verdict::InsufficientEvidence)
        // A shadow of the type live already runs on is evidence, never a move.
        .filter(|r| r.vm_type != current)
        .filter(|r| within_budget(policy, r, comparison))
        .filter(|r| !failing(comparison, r));

    let chosen = if live.all.exchanges > 0 && live_at_slo > slo_max {
        eligible
            .filter(|r| r.shadow_at_load_ms <= slo_max)
            .min_by(|a, b| {
                a.cost_delta_per_hour
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.cost_delta_per_hour.unwrap_or(f64::INFINITY))
                    .then(a.shadow_at_load_ms.total_cmp(&b.shadow_at_load_ms))
            })
            .map(|r| (r, Trigger::SloBreach))
    } else {
        // The ranking is best first.
        eligible
            .filter(|r| r.verdict == Verdict::Faster)
            .find(|r| r.cost_delta_per_hour.is_some_and(|d| d <= 0.0))
            .map(|r| (r, Trigger::FasterAtLowerOrEqualCost))
    }?;
    let (best, trigger) = chosen;
    let evidence = comparison
        .types
        .iter()
        .map(|t| Evidence {
            vm_type: t.vm_type.clone(),
            role: t.role,
            price_per_hour: t.price_per_hour,
            window: t.all,
            versus_live: (t.role == Role::Shadow)
                .then(|| {
                    comparison
                        .ranking
                        .iter()
                        .find(|r| r.vm_type == t.vm_type)
                        .cloned()
                })
                .flatten(),
        })
        .collect();
    Some(Recommendation {
        workload: comparison.workload.clone(),
        trigger,
        idempotency_key: idempotency_key(
            &comparison.workload,
            &current,
            &best.vm_type,
            trigger,
            revision,
        ),
        current_vm_type: current,
        recommended_vm_type: best.vm_type.clone(),
        load_per_s: live.all.exchanges_per_s,
        confidence: best.difference.confidence_faster,
        cost_delta_per_hour: best.cost_delta_per_hour,
        slo_percentile: policy.slo.percentile,
        slo_max_latency_ms: slo_max,
        evidence,
        created_ms: comparison.computed_ms,
        policy_revision: revision,
        forecast: None,
    })
}
