//! The IO side of the comparison: reads a workload's stored histograms for a window, decodes
//! them, and hands them to the sans-IO [engine](crate::compare). Synchronous; async callers run
//! it on the blocking pool.

use std::collections::HashMap;

use doppel_common::wire::{EncodedHistogram, FlowScope, LatencyMetric};

use crate::{
    compare::{CompareConfig, Comparison, LiveMirrored, Measurement, Role, compare_weighted},
    policy::WorkloadSpec,
    store::{Store, StoreError},
};

pub use crate::shadows::catalog::{VmType, price_table};

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
    // Live's intervals from before a move belong to the type it left (the spec names only the
    // type it is on now); the act-mode actions record each move.
    let moves = live_moves(store, &spec.name)?;
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
            let vm_type = match role {
                Role::Live => {
                    live_type_at(&moves, r.interval_start_ms).unwrap_or_else(|| vm_type.to_owned())
                }
                Role::Shadow => vm_type.to_owned(),
            };
            Some(Measurement {
                vm_type,
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

/// The workload's completed moves of its live hosts, oldest first: (when the move finished,
/// the type it left).
fn live_moves(store: &Store, workload: &str) -> Result<Vec<(i64, String)>, StoreError> {
    use crate::store::ActionState;
    let mut moves: Vec<(i64, String)> = store
        .actions(Some(workload), 100)?
        .into_iter()
        .filter(|a| {
            matches!(
                a.state,
                ActionState::Done | ActionState::Verified | ActionState::NotRecovered
            )
        })
        .filter_map(|a| Some((a.finished_ms?, a.from_vm_type)))
        .collect();
    moves.sort_by_key(|(at, _)| *at);
    Ok(moves)
}

/// The type live ran on during an interval starting at `start_ms`, when a move came after it:
/// the type the first later move left. `None`: no move since, so the spec's type.
pub(crate) fn live_type_at(moves: &[(i64, String)], start_ms: i64) -> Option<String> {
    moves
        .iter()
        .find(|(finished_ms, _)| *finished_ms > start_ms)
        .map(|(_, from)| from.clone())
}

/// Live's exchanges on mirrored flows per class and interval, for intervals starting in
/// `[since_ms, until_ms)`: what each shadow class's weight rests on.
pub fn load_live_mirrored(
    store: &Store,
    spec: &WorkloadSpec,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<LiveMirrored>, StoreError> {
    let live: Vec<&str> = spec.live.iter().map(|l| l.agent.as_str()).collect();
    Ok(store
        .mirrored_exchanges(&live, since_ms, until_ms)?
        .into_iter()
        .map(
            |(interval_start_ms, interval_ms, class, exchanges)| LiveMirrored {
                interval_start_ms,
                interval_ms,
                class,
                exchanges,
            },
        )
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
    let since_ms = now_ms.saturating_sub(window_ms);
    let measurements = load_measurements(store, spec, since_ms, now_ms)?;
    let live_mirrored = load_live_mirrored(store, spec, since_ms, now_ms)?;
    Ok(compare_weighted(
        &spec.name,
        now_ms,
        window_ms,
        spec.policy.slo.percentile,
        config,
        prices,
        &measurements,
        &live_mirrored,
    ))
}
