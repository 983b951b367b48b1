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
    let mut all = Vec::new();
    for_each_measurement(store, spec, since_ms, until_ms, |m| all.push(m))?;
    Ok(all)
}

/// [`load_measurements`] one at a time: each histogram is decoded, handed to `f` and dropped,
/// so a long window never holds every decoded histogram at once.
pub fn for_each_measurement(
    store: &Store,
    spec: &WorkloadSpec,
    since_ms: i64,
    until_ms: i64,
    mut f: impl FnMut(Measurement),
) -> Result<(), StoreError> {
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
    for r in rows
        .into_iter()
        .filter(|r| r.scope == FlowScope::All && r.metric == LatencyMetric::KernelFirstByte)
    {
        let Some(&(vm_type, role)) = by_agent.get(r.agent.as_str()) else {
            continue;
        };
        // Checked at ingest; a row that no longer decodes is skipped, not fatal.
        let Ok(histogram) = EncodedHistogram(r.hist).decode() else {
            continue;
        };
        let vm_type = match role {
            Role::Live => {
                live_type_at(&moves, r.interval_start_ms).unwrap_or_else(|| vm_type.to_owned())
            }
            Role::Shadow => vm_type.to_owned(),
        };
        f(Measurement {
            vm_type,
            role,
            interval_start_ms: r.interval_start_ms,
            interval_ms: r.interval_ms,
            class: r.class,
            histogram,
            report_errors: r.errors,
            agent: r.agent,
        });
    }
    Ok(())
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
    /// Width of a point: report intervals starting within one step are merged, ms.
    pub step_ms: i64,
    /// The SLO: percentile and bound, ms.
    pub slo_percentile: f64,
    /// The SLO's bound, ms.
    pub slo_max_latency_ms: f64,
    /// One series per (role, VM type), live first.
    pub series: Vec<TimelineSeries>,
    /// Live's offered load per step, exchanges/s over all its agents whatever their type (a
    /// step straddling a move is one point, not one per type).
    pub offered_load: Vec<OfferedLoadPoint>,
    /// Live's completed moves in the window, oldest first.
    pub moves: Vec<TimelineMove>,
}

/// Live's offered load over one step.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OfferedLoadPoint {
    /// Start of the step, ms since the epoch.
    pub at_ms: i64,
    /// Exchanges per second, all live agents together.
    pub per_s: f64,
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

/// One step of one role and VM type: its report intervals, agents and classes merged.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TimelinePoint {
    /// Start of the step, ms since the epoch.
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

/// One report interval of one agent, its classes together.
#[derive(Clone, Copy, Debug, Default)]
struct AgentInterval {
    length_ms: i64,
    /// Per report, shared by its histograms: counted once.
    errors: u64,
    exchanges: u64,
}

/// What agents measured over some intervals, kept per agent and interval: how a rate and an
/// error count are taken over several reports and agents. A rate is each agent's exchanges
/// over the time its own reports cover, summed over the agents, so agents whose intervals do
/// not line up still add up to the total.
#[derive(Clone, Debug, Default)]
pub struct AgentIntervals(
    std::collections::BTreeMap<String, std::collections::BTreeMap<i64, AgentInterval>>,
);

impl AgentIntervals {
    /// Counts `m`'s exchanges, and its report's interval and errors once.
    pub fn add(&mut self, m: &Measurement) {
        let interval = self
            .0
            .entry(m.agent.clone())
            .or_default()
            .entry(m.interval_start_ms)
            .or_insert(AgentInterval {
                length_ms: m.interval_ms,
                errors: m.report_errors,
                exchanges: 0,
            });
        interval.exchanges += m.histogram.len();
    }

    /// Exchanges per second, all agents together.
    pub fn per_s(&self) -> f64 {
        self.0
            .values()
            .map(|intervals| {
                let covered_ms: i64 = intervals.values().map(|i| i.length_ms).sum();
                let exchanges: u64 = intervals.values().map(|i| i.exchanges).sum();
                exchanges as f64 * 1000.0 / covered_ms.max(1) as f64
            })
            .sum()
    }

    /// Failed exchanges the agents counted.
    pub fn errors(&self) -> u64 {
        self.0
            .values()
            .flat_map(|i| i.values())
            .map(|i| i.errors)
            .sum()
    }
}

/// Measurements of one role and type merged over a span (a timeline step, a metrics window):
/// latencies from the merged histogram, rate and errors from [`AgentIntervals`].
#[derive(Clone, Debug)]
pub struct Merged {
    histogram: hdrhistogram::Histogram<u64>,
    agents: AgentIntervals,
}

impl Merged {
    /// Empty, with `first`'s histogram bounds (every agent sends the same).
    pub fn like(first: &Measurement) -> Self {
        Self {
            histogram: hdrhistogram::Histogram::new_from(&first.histogram),
            agents: AgentIntervals::default(),
        }
    }

    /// Merges `m`. A histogram that does not fit the bounds is skipped like an undecodable
    /// one, and so are its exchanges.
    pub fn add(&mut self, m: &Measurement) {
        if self.histogram.add(&m.histogram).is_ok() {
            self.agents.add(m);
        }
    }

    /// Exchanges measured.
    pub fn exchanges(&self) -> u64 {
        self.histogram.len()
    }

    /// The `q` quantile of latency, ms.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.histogram.value_at_quantile(q) as f64 / 1e6
    }

    /// Exchanges per second, all agents together.
    pub fn per_s(&self) -> f64 {
        self.agents.per_s()
    }

    /// Failed exchanges.
    pub fn errors(&self) -> u64 {
        self.agents.errors()
    }

    /// Failed over measured exchanges, 0 without exchanges.
    pub fn error_rate(&self) -> f64 {
        match self.exchanges() {
            0 => 0.0,
            n => self.errors() as f64 / n as f64,
        }
    }
}

/// The workload's [`Timeline`] over `[since_ms, until_ms)`, from the same measurements the
/// comparison reads ([`load_measurements`]), so a chart shows what the decisions weigh.
///
/// Intervals are merged into buckets of `step_ms` (a report interval or more), so a long
/// window stays a few hundred points a series ([`Merged`]).
pub fn timeline(
    store: &Store,
    spec: &WorkloadSpec,
    since_ms: i64,
    until_ms: i64,
    step_ms: i64,
) -> Result<Timeline, StoreError> {
    use std::collections::BTreeMap;

    let step_ms = step_ms.max(1);
    // Live per step whatever its type, for the offered load.
    let mut live_steps: BTreeMap<i64, AgentIntervals> = BTreeMap::new();
    let mut by_series: BTreeMap<(Role, String), BTreeMap<i64, Merged>> = BTreeMap::new();
    for_each_measurement(store, spec, since_ms, until_ms, |m| {
        // Steps are aligned to the epoch, so a point stays put as the window moves.
        let at_ms = m.interval_start_ms.div_euclid(step_ms) * step_ms;
        let step = by_series
            .entry((m.role, m.vm_type.clone()))
            .or_default()
            .entry(at_ms)
            .or_insert_with(|| Merged::like(&m));
        step.add(&m);
        if m.role == Role::Live {
            live_steps.entry(at_ms).or_default().add(&m);
        }
    })?;
    let offered_load = live_steps
        .iter()
        .map(|(&at_ms, agents)| OfferedLoadPoint {
            at_ms,
            per_s: agents.per_s(),
        })
        .collect();
    // `Role` orders live first.
    let series = by_series
        .into_iter()
        .map(|((role, vm_type), steps)| TimelineSeries {
            role,
            vm_type,
            points: steps
                .into_iter()
                .map(|(at_ms, step)| TimelinePoint {
                    at_ms,
                    exchanges: step.exchanges(),
                    per_s: step.per_s(),
                    p50_ms: step.quantile_ms(0.50),
                    p99_ms: step.quantile_ms(0.99),
                    slo_ms: step.quantile_ms(spec.policy.slo.percentile / 100.0),
                    errors: step.errors(),
                    error_rate: step.error_rate(),
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
        step_ms,
        slo_percentile: spec.policy.slo.percentile,
        slo_max_latency_ms: spec.policy.slo.max_latency_ms,
        series,
        offered_load,
        moves,
    })
}

#[cfg(test)]
pub(crate) mod timeline_tests {
    use doppel_common::wire::{
        Counter, EncodedHistogram, FlowScope, HistogramRecord, IntervalReport, ResourceUsage,
    };

    use super::*;
    use crate::store::CheckedReport;

    pub(crate) const SPEC: &str = r#"
name = "web"
services = ["10.0.0.2:8080"]
[[live]]
agent = "live-1"
vm_type = "small"
[[live]]
agent = "live-2"
vm_type = "small"
[[shadows]]
agent = "shadow-1"
vm_type = "large"
addr = "10.0.1.2"
vni = 42
[policy]
report_interval_ms = 1000
[[policy.classes]]
id = 0
name = "default"
sample_rate = 0.1
"#;

    /// A one-second report: `n` exchanges at `latency_ms`, `errors` failed.
    pub(crate) fn report(
        seq: u64,
        start_ms: u64,
        n: u64,
        latency_ms: u64,
        errors: u64,
    ) -> CheckedReport {
        let mut h =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 2).expect("bounds");
        h.record_n(latency_ms * 1_000_000, n).expect("record");
        CheckedReport::check(IntervalReport {
            seq,
            interval_start_unix_ms: start_ms,
            interval_ms: 1000,
            histograms: vec![HistogramRecord {
                service: "10.0.0.2:8080".into(),
                class: 0,
                scope: FlowScope::All,
                metric: LatencyMetric::KernelFirstByte,
                histogram: EncodedHistogram::encode(&h).expect("encode"),
            }],
            counters: vec![Counter {
                name: "exchange_errors".into(),
                value: errors,
            }],
            host: ResourceUsage::default(),
            workload: None,
            patterns: vec![],
        })
    }

    #[test]
    fn steps_merge_intervals_and_sum_the_agents_rates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open_in(dir.path()).expect("store");
        let spec: WorkloadSpec = toml::from_str(SPEC).expect("spec");
        store.put_workload(&spec, 0).expect("workload");
        let base = 1_000_000_u64;
        let mut reports = Vec::new();
        for i in 0..10 {
            let start = base + i * 1000;
            // Two live agents, 100/s at 10 ms and 50/s at 30 ms; the shadow 100/s at 5 ms,
            // two failures a second.
            reports.push(("live-1", report(i, start, 100, 10, 0)));
            reports.push(("live-2", report(i, start, 50, 30, 0)));
            reports.push(("shadow-1", report(i, start, 100, 5, 2)));
        }
        let batch: Vec<_> = reports.iter().map(|(a, r)| (*a, r)).collect();
        store.ingest_batch(&batch, 0).expect("ingest");

        let since = i64::try_from(base).expect("ms");
        let t = timeline(&store, &spec, since, since + 10_000, 5_000).expect("timeline");
        assert_eq!(t.step_ms, 5_000);
        let labels: Vec<_> = t
            .series
            .iter()
            .map(|s| (s.role, s.vm_type.as_str()))
            .collect();
        assert_eq!(labels, [(Role::Live, "small"), (Role::Shadow, "large")]);
        let live = &t.series[0].points;
        assert_eq!(
            live.len(),
            2,
            "ten one-second intervals in two five-second steps"
        );
        for p in live {
            assert_eq!(p.exchanges, 750);
            assert!(
                (p.per_s - 150.0).abs() < 1e-9,
                "both agents' rates: {}",
                p.per_s
            );
            assert!((p.p50_ms - 10.0).abs() < 0.1, "p50 {}", p.p50_ms);
            assert!((p.p99_ms - 30.0).abs() < 0.3, "p99 {}", p.p99_ms);
        }
        let shadow = &t.series[1].points;
        assert_eq!(shadow[0].errors, 10, "errors once per report");
        assert!((shadow[0].error_rate - 0.02).abs() < 1e-12);

        // At the report interval, one point per interval at its start.
        let fine = timeline(&store, &spec, since, since + 10_000, 1_000).expect("timeline");
        let starts: Vec<i64> = fine.series[0].points.iter().map(|p| p.at_ms).collect();
        assert_eq!(
            starts,
            (0..10).map(|i| since + i * 1000).collect::<Vec<_>>()
        );
        assert!((fine.series[0].points[3].per_s - 150.0).abs() < 1e-9);
        assert_eq!(t.offered_load.len(), 2);
        assert!(
            t.offered_load
                .iter()
                .all(|p| (p.per_s - 150.0).abs() < 1e-9)
        );
    }
}
