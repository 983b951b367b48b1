//! Recommendation documents: what is stored, POSTed to webhooks and acted on. The rules that
//! choose the type live in the engine ([`doppel_engine::compare::advise`] for the comparison's
//! two triggers, [`doppel_engine::decision`] for the forecast's); this module only writes down
//! what they chose, with its evidence. Sans-IO.
//!
//! A third trigger, [`Trigger::ForecastBreach`], comes from the predictor
//! ([`crate::forecast`]): the SLO is expected to break within the forecast horizon, and the
//! cheapest type within budget whose measured capacity holds the SLO at the forecast peak is
//! recommended before it does; [`forecast_recommendation`] builds it, with the forecast and each
//! type's capacity as evidence.
//!
//! The idempotency key is derived from workload, types, trigger and the policy revision, so the
//! same advice is stored and delivered once until the policy changes, however often the
//! comparison runs.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

pub use doppel_engine::compare::Trigger;
use doppel_engine::compare::{Comparison, LatencyStats, Ranked, Role, advise};

use crate::policy::Policy;

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
    /// The load the recommended placement is sized for: the forecast's 90th percentile peak,
    /// or on a cold start its median peak (see `WorkloadPredictor::provisioned_peak`).
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
    /// [`doppel_engine::candidates::MAX_EXCESS_ERROR_RATE`] more than the best shadow type is
    /// not chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
    /// The most recent (load per instance exchanges/s, latency ms at the SLO percentile)
    /// intervals measured on the type, which its model is fitted from, oldest first, at most
    /// [`MEASURED_SHOWN`]: what the dashboard plots against the curve.
    #[serde(default)]
    pub measured: Vec<[f64; 2]>,
    /// The fitted curve, (load per instance, latency ms) at [`CURVE_SAMPLES`] loads from 0 to
    /// a tenth past the capacity at the SLO (the knee the dashboard marks) or the highest
    /// measured load, whichever is higher; loads at or past saturation are left out.
    #[serde(default)]
    pub model_curve: Vec<[f64; 2]>,
}

/// Measured points a [`TypeCapacity`] carries at most.
pub const MEASURED_SHOWN: usize = 200;
/// Samples of a [`TypeCapacity::model_curve`].
pub const CURVE_SAMPLES: usize = 40;

/// [`TypeCapacity::model_curve`] of `model` for an SLO bound of `slo_ms`.
pub fn model_curve(model: &doppel_engine::PerformanceModel, slo_ms: f64) -> Vec<[f64; 2]> {
    let capacity = model.capacity_at(slo_ms);
    let end = 1.1 * capacity.max(model.max_observed_load());
    if !(end.is_finite() && end > 0.0) {
        return Vec::new();
    }
    (0..CURVE_SAMPLES)
        .map(|i| end * i as f64 / (CURVE_SAMPLES - 1) as f64)
        .map(|load| [load, model.latency_at(load)])
        .filter(|[_, latency]| latency.is_finite())
        .collect()
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
    let slo_max = policy.slo.max_latency_ms;
    let chosen = advise(comparison, slo_max, policy.budget.max_cost_per_hour)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_curve_crosses_the_slo_at_the_capacity_it_reports() {
        use doppel_engine::{LoadLatencyPoint, PerformanceModel, PointSource};
        // An M/M/1-like type: 4 ms at no load, saturating at 250/s, measured up to 230/s.
        let points: Vec<LoadLatencyPoint> = (0..24)
            .map(|i| {
                let load = 10.0 + f64::from(i) * 9.5;
                LoadLatencyPoint {
                    load,
                    latency_ms: 4.0 / (1.0 - load / 250.0),
                    source: PointSource::Shadow,
                }
            })
            .collect();
        let model = PerformanceModel::fit(&points, 7).expect("fit");
        let slo_ms = 20.0;
        let capacity = model.capacity_at(slo_ms);
        let curve = model_curve(&model, slo_ms);
        // The range runs a tenth past the highest load measured (228.5/s), so the last sample
        // is past saturation (about 250/s) and left out.
        assert_eq!(curve.len(), CURVE_SAMPLES - 1);
        assert!(curve.iter().all(|[_, l]| l.is_finite()));
        assert_eq!(curve[0][0], 0.0);
        assert!(
            curve
                .windows(2)
                .all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1])
        );
        // The first sample over the SLO is the first past the capacity, and the last below it
        // is below the capacity: the curve crosses the SLO where the capacity says.
        let over = curve
            .iter()
            .position(|[_, l]| *l > slo_ms)
            .expect("crosses the SLO");
        assert!(curve[over][0] >= capacity && curve[over - 1][0] <= capacity);
    }

    #[test]
    fn the_same_advice_has_the_same_key_until_the_policy_changes() {
        let key =
            |to: &str, trigger, revision| idempotency_key("web", "m5.large", to, trigger, revision);
        let k = key("c6g.large", Trigger::SloBreach, 3);
        assert_eq!(k, key("c6g.large", Trigger::SloBreach, 3));
        assert_ne!(k, key("c6g.large", Trigger::SloBreach, 4));
        assert_ne!(k, key("c6g.large", Trigger::ForecastBreach, 3));
        assert_ne!(k, key("m5.xlarge", Trigger::SloBreach, 3));
    }

    #[test]
    fn a_stored_reason_reads_back_as_its_trigger() {
        for t in [
            Trigger::SloBreach,
            Trigger::FasterAtLowerOrEqualCost,
            Trigger::ForecastBreach,
        ] {
            assert_eq!(Trigger::from_reason(t.as_str()), Some(t));
        }
        assert_eq!(Trigger::from_reason("slo"), None);
    }
}
