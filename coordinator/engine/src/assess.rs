//! One evaluation of one workload's forecast path, as the coordinator runs it and as `cargo
//! xtask eval decisions` replays it: capacities from the measurements ([`crate::capacity`]),
//! the candidate filter, the warning and the placement decision ([`WorkloadPredictor`]), and
//! the forecast's advice (an urgent move while a warning is raised). The act policy
//! ([`crate::moves`]) then decides whether the advice may go out.

use std::collections::{BTreeMap, HashMap};

use crate::Timestamp;
use crate::capacity::{
    CapacityGates, CapacityModels, FitCache, TypeMeasurements, type_models_cached,
};
use crate::decision::{Decision, Evidence, Placement};
use crate::forecast::ModelKind;
use crate::predictor::{PredictorEvent, WorkloadPredictor};
use crate::shadow_pool::VmType;
use crate::warning::DegradationWarning;

/// What one evaluation concluded.
#[derive(Debug, Clone)]
pub struct Assessment {
    /// Every type's capacity model, the types without one, the CPU ceilings.
    pub capacity: CapacityModels,
    /// Each modelled type's error rate at the loads it holds the SLO at.
    pub error_rates: BTreeMap<String, f64>,
    /// The warning, while raised.
    pub warning: Option<DegradationWarning>,
    /// A raised warning was cleared.
    pub cleared: bool,
    /// The placement decision, once there is a forecast.
    pub decision: Option<Decision>,
    /// Forecast refits since the last evaluation: when, and the model.
    pub refits: Vec<(Timestamp, ModelKind)>,
}

/// The forecast's advice: move before the SLO breaks.
#[derive(Debug, Clone, Copy)]
pub struct ForecastMove<'a> {
    /// The warning behind it.
    pub warning: &'a DegradationWarning,
    /// Where to.
    pub to: &'a Placement,
    /// Predicted SLO percentile of the current placement at the provisioned peak, ms.
    pub current_latency_ms: f64,
    /// The evidence for the new placement.
    pub evidence: &'a Evidence,
}

impl Assessment {
    /// The forecast's advice: an urgent move (the current placement will not hold the
    /// provisioned peak) while a warning is raised.
    pub fn forecast_move(&self) -> Option<ForecastMove<'_>> {
        match (&self.warning, &self.decision) {
            (
                Some(warning),
                Some(Decision::Move {
                    to,
                    urgent: true,
                    current_latency_ms,
                    evidence,
                    ..
                }),
            ) => Some(ForecastMove {
                warning,
                to,
                current_latency_ms: *current_latency_ms,
                evidence,
            }),
            _ => None,
        }
    }
}

/// Evaluates `predictor` at `now` with the measurements of `by_type`, live on `placement`,
/// reusing the fits in `fits` where they are fresh.
/// `prices` are per instance-hour (a type without a price never wins on cost); a type over
/// `max_cost_per_hour` is no candidate.
#[expect(
    clippy::too_many_arguments,
    reason = "the inputs of one evaluation; a struct would only rename them"
)]
pub fn assess(
    predictor: &mut WorkloadPredictor,
    by_type: &BTreeMap<String, TypeMeasurements>,
    fits: &mut FitCache,
    gates: &CapacityGates,
    slo_ms: f64,
    placement: Placement,
    prices: &HashMap<String, f64>,
    max_cost_per_hour: Option<f64>,
    now: Timestamp,
) -> Assessment {
    let capacity = type_models_cached(by_type, gates, slo_ms, fits);
    let vm_types: Vec<VmType> = capacity
        .models
        .iter()
        .map(|t| VmType {
            name: t.vm_type.clone(),
            vcpus: 0,
            memory_gib: 0.0,
            price_per_hour: prices.get(&t.vm_type).copied().unwrap_or(f64::INFINITY),
            benchmark_score: None,
        })
        .collect();
    let error_rates = capacity.error_rates(by_type, slo_ms);
    let current = placement.vm_type.clone();
    predictor.set_placement(placement);
    {
        let candidates = capacity.candidates(&vm_types, &current, max_cost_per_hour, &error_rates);
        predictor.handle_timeout(now, &candidates);
    }
    let (mut warning, mut cleared, mut decision, mut refits) = (None, false, None, Vec::new());
    while let Some(event) = predictor.poll_event() {
        match event {
            PredictorEvent::Refitted { at, model } => refits.push((at, model)),
            PredictorEvent::Warning(w) => warning = Some(w),
            PredictorEvent::WarningCleared { .. } => cleared = true,
            PredictorEvent::Decision(d) => decision = Some(d),
        }
    }
    Assessment {
        capacity,
        error_rates,
        warning,
        cleared,
        decision,
        refits,
    }
}
