//! The IO side of the comparison: reads a workload's stored histograms for a window, decodes
//! them, and hands them to the sans-IO [engine](crate::compare). Synchronous; async callers run
//! it on the blocking pool.

use std::collections::HashMap;

use doppel_common::wire::{EncodedHistogram, FlowScope, LatencyMetric};

use crate::{
    compare::{CompareConfig, Comparison, Measurement, Role, compare},
    policy::WorkloadSpec,
    store::{Store, StoreError},
};

pub use crate::sim::catalog::{VmType, price_table};

/// Every agent of `spec` with its VM type and role.
fn placements(spec: &WorkloadSpec) -> Vec<(&str, &str, Role)> {
    spec.live
        .iter()
        .map(|l| (l.agent.as_str(), l.vm_type.as_str(), Role::Live))
        .chain(
            spec.shadows
                .iter()
                .map(|s| (s.agent.as_str(), s.vm_type.as_str(), Role::Shadow)),
        )
        .collect()
}

/// The workload's measurements of intervals starting in `[since_ms, until_ms)`.
///
/// Live and shadow are both measured by the same in-kernel program (kernel first-byte latency),
/// over all flows they serve: a shadow serves only replayed flows, a live host serves all, and
/// the load is what matched-load pairing equalises. Replay-side timings are not compared.
pub fn load_measurements(
    store: &Store,
    spec: &WorkloadSpec,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<Measurement>, StoreError> {
    let placements = placements(spec);
    let agents: Vec<&str> = placements.iter().map(|(a, _, _)| *a).collect();
    let rows = store.interval_histograms(&agents, since_ms, until_ms)?;
    let by_agent: HashMap<&str, (&str, Role)> = placements
        .iter()
        .map(|&(a, vm, role)| (a, (vm, role)))
        .collect();
    Ok(rows
        .into_iter()
        .filter(|r| r.scope == FlowScope::All && r.metric == LatencyMetric::KernelFirstByte)
        .filter_map(|r| {
            let &(vm_type, role) = by_agent.get(r.agent.as_str())?;
            // Checked at ingest; a row that no longer decodes is skipped, not fatal.
            let histogram = EncodedHistogram(r.hist).decode().ok()?;
            Some(Measurement {
                vm_type: vm_type.to_owned(),
                role,
                interval_start_ms: r.interval_start_ms,
                interval_ms: r.interval_ms,
                class: r.class,
                histogram,
                report_errors: r.errors,
                agent: r.agent,
            })
        })
        .collect())
}

/// Loads and compares one workload over `[now_ms - window_ms, now_ms)`.
pub fn compare_workload(
    store: &Store,
    spec: &WorkloadSpec,
    now_ms: i64,
    window_ms: i64,
    config: &CompareConfig,
    prices: &HashMap<String, f64>,
) -> Result<Comparison, StoreError> {
    let measurements = load_measurements(store, spec, now_ms.saturating_sub(window_ms), now_ms)?;
    Ok(compare(
        &spec.name,
        now_ms,
        window_ms,
        spec.policy.slo.percentile,
        config,
        prices,
        &measurements,
    ))
}
