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
    let moves: Vec<(i64, String)> = live_moves(store, &spec.name)?
        .into_iter()
        .map(|m| (m.at_ms, m.from_vm_type))
        .collect();
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

/// The workload's completed moves of its live hosts, oldest first.
fn live_moves(store: &Store, workload: &str) -> Result<Vec<TimelineMove>, StoreError> {
    use crate::store::ActionState;
    let mut moves: Vec<TimelineMove> = store
        .actions(Some(workload), 100)?
        .into_iter()
        .filter(|a| {
            matches!(
                a.state,
                ActionState::Done | ActionState::Verified | ActionState::NotRecovered
            )
        })
        .filter_map(|a| {
            Some(TimelineMove {
                at_ms: a.finished_ms?,
                from_vm_type: a.from_vm_type,
                to_vm_type: a.to_vm_type,
            })
        })
        .collect();
    moves.sort_by_key(|m| m.at_ms);
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

/// A workload's measurements over time, as the dashboard charts them: per role and VM type,
/// one point per report interval.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Timeline {
    /// Workload.
    pub workload: String,
    /// Start of the window, ms since the epoch.
    pub since_ms: i64,
    /// End of the window, ms since the epoch.
    pub until_ms: i64,
    /// The SLO: percentile and bound, ms.
    pub slo_percentile: f64,
    /// The SLO's bound, ms.
    pub slo_max_latency_ms: f64,
    /// One series per (role, VM type), live first.
    pub series: Vec<TimelineSeries>,
    /// Live's completed moves in the window, oldest first.
    pub moves: Vec<TimelineMove>,
}

/// One role and VM type over time.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimelineSeries {
    /// `live` or `shadow`.
    pub role: Role,
    /// VM type.
    pub vm_type: String,
    /// Oldest first.
    pub points: Vec<TimelinePoint>,
}

/// One report interval of one role and VM type, all its agents and classes merged.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimelinePoint {
    /// Interval start, ms since the epoch.
    pub at_ms: i64,
    /// Exchanges measured (kernel first byte, all flows).
    pub exchanges: u64,
    /// Exchanges per second, all agents of this role and type together.
    pub per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th-percentile latency, ms.
    pub p99_ms: f64,
    /// Latency at the SLO's percentile, ms: what the SLO bound is held against.
    pub slo_ms: f64,
    /// Failed exchanges the agents counted (shadows count 5xx, resets, timeouts and refusals;
    /// live agents count none).
    pub errors: u64,
    /// `errors / exchanges`, 0 without exchanges.
    pub error_rate: f64,
}

/// A completed move of live.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimelineMove {
    /// When the move finished, ms since the epoch.
    pub at_ms: i64,
    /// The type live left.
    pub from_vm_type: String,
    /// The type live moved to.
    pub to_vm_type: String,
}

/// The workload's [`Timeline`] over `[since_ms, until_ms)`, from the same measurements the
/// comparison reads ([`load_measurements`]), so a chart shows what the decisions weigh.
pub fn timeline(
    store: &Store,
    spec: &WorkloadSpec,
    since_ms: i64,
    until_ms: i64,
) -> Result<Timeline, StoreError> {
    use std::collections::BTreeMap;

    struct Acc {
        histogram: hdrhistogram::Histogram<u64>,
        interval_ms: i64,
        /// Errors are per report, shared by its histograms: counted once per agent.
        errors_by_agent: BTreeMap<String, u64>,
    }
    let mut by_series: BTreeMap<(u8, String), BTreeMap<i64, Acc>> = BTreeMap::new();
    for m in load_measurements(store, spec, since_ms, until_ms)? {
        let role_order = match m.role {
            Role::Live => 0,
            Role::Shadow => 1,
        };
        let acc = by_series
            .entry((role_order, m.vm_type))
            .or_default()
            .entry(m.interval_start_ms)
            .or_insert_with(|| Acc {
                histogram: hdrhistogram::Histogram::new_from(&m.histogram),
                interval_ms: m.interval_ms,
                errors_by_agent: BTreeMap::new(),
            });
        // Same bounds on every histogram the agents send; one that does not fit is skipped
        // like an undecodable one.
        let _ = acc.histogram.add(&m.histogram);
        acc.errors_by_agent.insert(m.agent, m.report_errors);
    }
    let series = by_series
        .into_iter()
        .map(|((role_order, vm_type), intervals)| TimelineSeries {
            role: if role_order == 0 {
                Role::Live
            } else {
                Role::Shadow
            },
            vm_type,
            points: intervals
                .into_iter()
                .map(|(at_ms, acc)| {
                    let exchanges = acc.histogram.len();
                    let errors: u64 = acc.errors_by_agent.values().sum();
                    let ms = |q: f64| acc.histogram.value_at_quantile(q) as f64 / 1e6;
                    TimelinePoint {
                        at_ms,
                        exchanges,
                        per_s: exchanges as f64 * 1000.0 / acc.interval_ms.max(1) as f64,
                        p50_ms: ms(0.50),
                        p99_ms: ms(0.99),
                        slo_ms: ms(spec.policy.slo.percentile / 100.0),
                        errors,
                        error_rate: if exchanges == 0 {
                            0.0
                        } else {
                            errors as f64 / exchanges as f64
                        },
                    }
                })
                .collect(),
        })
        .collect();
    let mut moves = live_moves(store, &spec.name)?;
    moves.retain(|m| (since_ms..until_ms).contains(&m.at_ms));
    Ok(Timeline {
        workload: spec.name.clone(),
        since_ms,
        until_ms,
        slo_percentile: spec.policy.slo.percentile,
        slo_max_latency_ms: spec.policy.slo.max_latency_ms,
        series,
        moves,
    })
}
