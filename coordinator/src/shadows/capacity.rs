//! What the store's measurements say about each VM type's capacity for a workload, for the pool
//! steering. The points are read exactly as the forecast reads them
//! ([`crate::forecast::read_type_measurements`]) and the models come from the same engine
//! function with the same gates ([`doppel_engine::capacity::type_models`]), so the pool is
//! steered by the capacities the decision uses, never by a looser second estimate. While the
//! workload's warning is raised, the peak steering shops for is the forecast's
//! ([`warned_peak`]), as in the fleet the decisions eval runs.

use std::collections::BTreeMap;

use doppel_engine::{
    CapacityMeasurement,
    capacity::{CapacityGates, TypeMeasurements, type_models},
};

use doppel_common::error_chain;
use tracing::warn;

use crate::{compare::Role, forecast::ForecastSnapshot, store::Store};

/// Capacity at the SLO per VM type that passes the gates, with the spread of its bootstrap in
/// log space, and the highest live load seen (exchanges/s per live instance).
pub fn capacities(
    by_type: &BTreeMap<String, TypeMeasurements>,
    gates: &CapacityGates,
    slo_ms: f64,
) -> (Vec<CapacityMeasurement>, Option<f64>) {
    let live_peak = by_type
        .values()
        .filter(|t| t.role == Some(Role::Live))
        .flat_map(|t| t.points.iter().map(|(_, p)| p.load))
        .fold(None, |peak: Option<f64>, load| {
            Some(peak.map_or(load, |p| p.max(load)))
        });
    let measured = type_models(by_type, gates, slo_ms).pool_measurements(slo_ms);
    (measured, live_peak)
}

/// The provisioned peak per live instance of the workload's stored forecast, if that forecast
/// was computed at `since` or later with its warning raised (pool steering then shops for it).
/// A forecast that cannot be read is logged and ignored: steering falls back to the seen peak.
pub fn warned_peak(store: &Store, workload: &str, since: i64) -> Option<f64> {
    let snapshot = match store.forecast(workload) {
        Ok(Some((at, body))) if at >= since => body,
        Ok(_) => return None,
        Err(e) => {
            warn!(workload, error = %error_chain(&e), "cannot read the forecast for steering");
            return None;
        }
    };
    let snapshot: ForecastSnapshot = match serde_json::from_value(snapshot) {
        Ok(s) => s,
        Err(e) => {
            warn!(workload, error = %e, "stored forecast unreadable for steering");
            return None;
        }
    };
    snapshot.warning.as_ref()?;
    let total = snapshot.provisioned_peak_per_s?;
    Some(total / f64::from(snapshot.current_count.max(1)))
}

#[cfg(test)]
mod tests {
    use doppel_engine::{LoadLatencyPoint, PointSource, capacity::Outcome};

    use super::*;

    /// `n` one-second intervals of `role` at loads spread over `loads`, latencies of a queue
    /// with capacity `capacity` (`20 + 800 / (capacity - load)` ms).
    fn measured(role: Role, loads: (f64, f64), n: usize, capacity: f64) -> TypeMeasurements {
        let mut t = TypeMeasurements {
            role: Some(role),
            ..TypeMeasurements::default()
        };
        for i in 0..n {
            let load = loads.0 + (loads.1 - loads.0) * i as f64 / (n - 1) as f64;
            let latency_ms = 20.0 + 800.0 / (capacity - load).max(1.0);
            let source = match role {
                Role::Live => PointSource::Live,
                Role::Shadow => PointSource::Shadow,
            };
            t.points.push_back((
                i as i64 * 1000,
                LoadLatencyPoint {
                    load,
                    latency_ms,
                    source,
                },
            ));
            t.outcomes.push_back((
                i as i64 * 1000,
                Outcome {
                    failed: 0,
                    measured: load as u64,
                    load,
                },
            ));
        }
        t
    }

    #[test]
    fn steering_sees_only_capacities_that_pass_the_decisions_gates() {
        let slo = 100.0;
        let mut by_type = BTreeMap::new();
        by_type.insert(
            "slow".to_owned(),
            measured(Role::Live, (20.0, 140.0), 30, 150.0),
        );
        by_type.insert(
            "fast".to_owned(),
            measured(Role::Shadow, (60.0, 560.0), 30, 600.0),
        );
        // Measured only where its latency is flat, and no CPU ceiling to scale by: the
        // decision has no capacity for it, so neither has steering.
        by_type.insert(
            "flat".to_owned(),
            measured(Role::Shadow, (10.0, 20.0), 30, 600.0),
        );
        // Too few intervals.
        by_type.insert(
            "new".to_owned(),
            measured(Role::Shadow, (60.0, 560.0), 5, 600.0),
        );
        let (measured, peak) = capacities(&by_type, &CapacityGates::default(), slo);
        assert_eq!(peak, Some(140.0));
        let capacity = |t: &str| measured.iter().find(|m| m.vm_type == t).map(|m| m.capacity);
        assert!(capacity("fast").expect("fast") > 3.0 * capacity("slow").expect("slow"));
        assert_eq!(capacity("flat"), None, "{measured:?}");
        assert_eq!(capacity("new"), None, "{measured:?}");
    }

    #[test]
    fn steering_shops_for_the_warned_forecast_per_instance_and_only_while_warned() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open_in(dir.path()).expect("store");
        let warning = crate::forecast::WarningView {
            vm_type: "m.1".into(),
            probability: 0.9,
            lead_secs: 600,
            expected_breach_ms: 1_600_000,
            forecast_load_per_s: 480.0,
            capacity_per_s: 400.0,
            recommended_vm_type: None,
        };
        let snapshot = |warning: Option<crate::forecast::WarningView>| ForecastSnapshot {
            workload: "web".into(),
            computed_ms: 1_000_000,
            step_secs: 60,
            history_steps: 100,
            model: "holt".into(),
            last_load_per_s: Some(380.0),
            horizon_secs: 3600,
            forecast_peak_per_s: Some(450.0),
            provisioned_peak_per_s: Some(500.0),
            points: Vec::new(),
            current_vm_type: "m.1".into(),
            current_count: 2,
            current_capacity_per_s: Some(400.0),
            warning,
            decision: "no_viable_placement".into(),
            types: Vec::new(),
            unmodelled: Vec::new(),
            cpu_ceilings: Vec::new(),
        };
        let put = |store: &Store, s: &ForecastSnapshot| {
            let body = serde_json::to_value(s).expect("json");
            store
                .put_forecast("web", s.computed_ms, &body)
                .expect("put");
        };
        assert_eq!(warned_peak(&store, "web", 0), None, "no forecast yet");
        put(&store, &snapshot(Some(warning)));
        // Two live instances: 250/s each.
        assert_eq!(warned_peak(&store, "web", 999_000), Some(250.0));
        assert_eq!(
            warned_peak(&store, "web", 1_000_001),
            None,
            "older than the window"
        );
        put(&store, &snapshot(None));
        assert_eq!(
            warned_peak(&store, "web", 0),
            None,
            "no warning, no forecast peak"
        );
    }
}
