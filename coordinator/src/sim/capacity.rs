//! What the store's measurements say about each VM type's capacity for a workload, for the pool
//! steering: per type, the load-versus-latency points of its intervals are fitted with the
//! engine's [`PerformanceModel`] and read at the SLO.

use std::collections::BTreeMap;

use doppel_engine::{CapacityMeasurement, LoadLatencyPoint, PerformanceModel, PointSource};

use crate::compare::{Measurement, Role};

/// One report interval of one agent: (VM type, agent, interval start ms).
type IntervalKey<'a> = (&'a str, &'a str, i64);
/// Its role, length in ms, and its classes' histograms merged.
type MergedInterval = (Role, i64, hdrhistogram::Histogram<u64>);

/// Capacity at the SLO (`percentile` below `slo_ms`) per VM type whose intervals allow a fit,
/// and the highest live load seen (exchanges/s per live instance). Classes of one report are
/// merged: capacity is about the instance, not a class.
pub fn capacities(
    measurements: &[Measurement],
    percentile: f64,
    slo_ms: f64,
    seed: u64,
) -> (Vec<CapacityMeasurement>, Option<f64>) {
    let mut intervals: BTreeMap<IntervalKey<'_>, MergedInterval> = BTreeMap::new();
    for m in measurements {
        let key = (m.vm_type.as_str(), m.agent.as_str(), m.interval_start_ms);
        match intervals.get_mut(&key) {
            Some((_, _, h)) => {
                // Same bounds (all come from the agents' encoding); a failed add only loses
                // one class of one interval.
                let _ = h.add(&m.histogram);
            }
            None => {
                intervals.insert(key, (m.role, m.interval_ms, m.histogram.clone()));
            }
        }
    }
    let mut points: BTreeMap<&str, Vec<LoadLatencyPoint>> = BTreeMap::new();
    let mut live_peak: Option<f64> = None;
    for ((vm_type, _, _), (role, interval_ms, h)) in &intervals {
        if *interval_ms <= 0 || h.is_empty() {
            continue;
        }
        let load = h.len() as f64 / (*interval_ms as f64 / 1000.0);
        let latency_ms = h.value_at_quantile(percentile / 100.0) as f64 / 1e6;
        if *role == Role::Live {
            live_peak = Some(live_peak.map_or(load, |p: f64| p.max(load)));
        }
        points.entry(vm_type).or_default().push(LoadLatencyPoint {
            load,
            latency_ms,
            source: if *role == Role::Live {
                PointSource::Live
            } else {
                PointSource::Shadow
            },
        });
    }
    let measured = points
        .into_iter()
        .filter_map(|(vm_type, points)| {
            // Too few points or no spread of load: nothing is known yet, and that is normal.
            let model = PerformanceModel::fit(&points, seed).ok()?;
            let capacity = model.capacity_at(slo_ms);
            let logs: Vec<f64> = model
                .capacity_samples(slo_ms)
                .into_iter()
                .filter(|c| *c > 0.0 && c.is_finite())
                .map(f64::ln)
                .collect();
            let mean = logs.iter().sum::<f64>() / logs.len().max(1) as f64;
            let log_sd = (logs.iter().map(|l| (l - mean).powi(2)).sum::<f64>()
                / (logs.len().max(2) - 1) as f64)
                .sqrt();
            (capacity > 0.0 && capacity.is_finite()).then(|| CapacityMeasurement {
                vm_type: vm_type.to_owned(),
                capacity,
                log_sd: log_sd.max(0.01),
            })
        })
        .collect();
    (measured, live_peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An interval of `load` exchanges/s over 1 s whose latencies follow a queue with capacity
    /// `capacity` (`base + k / (capacity - load)` ms).
    fn interval(vm_type: &str, role: Role, start_s: i64, load: f64, capacity: f64) -> Measurement {
        let mut histogram = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)
            .expect("histogram");
        let mean_ms = 2.0 + 100.0 / (capacity - load);
        for i in 0..load as u64 {
            // Spread around the mean so the p99 sits a little above it.
            let ms = mean_ms * (0.5 + (i % 10) as f64 / 9.0);
            histogram.record((ms * 1e6) as u64).expect("record");
        }
        Measurement {
            agent: format!("{vm_type}-agent"),
            vm_type: vm_type.into(),
            role,
            interval_start_ms: start_s * 1000,
            interval_ms: 1000,
            class: 0,
            histogram,
            report_errors: 0,
        }
    }

    #[test]
    fn a_faster_type_measures_a_higher_capacity_and_the_live_peak_is_found() {
        let mut measurements = Vec::new();
        for (i, load) in [20.0, 40.0, 60.0, 80.0, 100.0, 120.0]
            .into_iter()
            .enumerate()
        {
            measurements.push(interval("slow", Role::Live, i as i64, load, 150.0));
            measurements.push(interval("fast", Role::Shadow, i as i64, load / 2.0, 600.0));
        }
        let (measured, peak) = capacities(&measurements, 99.0, 20.0, 7);
        assert_eq!(peak, Some(120.0));
        let capacity = |t: &str| {
            measured
                .iter()
                .find(|m| m.vm_type == t)
                .unwrap_or_else(|| panic!("{t} not measured: {measured:?}"))
                .capacity
        };
        assert!(capacity("fast") > 2.0 * capacity("slow"), "{measured:?}");
        assert!(capacity("slow") < 150.0, "{measured:?}");
        // One interval is not enough to know anything.
        let (measured, _) = capacities(&measurements[..1], 99.0, 20.0, 7);
        assert!(measured.is_empty());
    }
}
