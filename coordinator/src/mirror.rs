//! Learned mirroring in the coordinator: every few seconds, the pattern counts the live agents
//! reported since the last round go to each learning workload's
//! [`MirrorPlanner`], and a plan that changed what the
//! agents do is stored and published as a new policy revision.
//!
//! Every decision is the engine's ([`doppel_engine::mirror`], what `cargo xtask eval mirror`
//! scores); this module only reads the store, keeps the planners, and publishes. The agents
//! report sampled pattern counts (one new flow in `pattern_sample_one_in`) and the exact
//! classified flows per class (`class_flows_*` counters); the counts are scaled to the flows, so
//! the planner sees flows per second whatever the agents' sampling. A planner lives in memory:
//! after a restart it learns again from the next reports, while the agents keep the last
//! published plan (it is in the store and in every policy update).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use doppel_common::wire::{FlowScope, LatencyMetric};
use doppel_engine::mirror::{
    ClassLatency, ClassRole, MirrorPlan, MirrorPlanner, MirrorSettings, PatternObservation,
    coverage::{Coverage, coverage},
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    clock::Clock,
    net::PolicySnapshot,
    policy::{WorkloadSpec, mirror_settings},
    store::{Store, StoreError},
};

/// A rate change smaller than this share of the old rate is not worth a policy update.
const RATE_CHANGE: f64 = 0.1;
/// Nor is one smaller than this many parts per million.
const RATE_CHANGE_PPM: f64 = 1_000.0;

struct Learner {
    planner: MirrorPlanner,
    last_report_id: i64,
    /// The plan the agents were last sent.
    published: Option<MirrorPlan>,
}

/// The learned mirroring of every workload that asks for it.
pub struct MirrorSteering {
    store: Arc<Mutex<Store>>,
    policy: Arc<watch::Sender<Arc<PolicySnapshot>>>,
    clock: Clock,
    learners: HashMap<String, Learner>,
}

impl std::fmt::Debug for MirrorSteering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorSteering")
            .field("workloads", &self.learners.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl MirrorSteering {
    /// Steering that reads and writes `store` and publishes through `policy`.
    pub fn new(
        store: Arc<Mutex<Store>>,
        policy: Arc<watch::Sender<Arc<PolicySnapshot>>>,
        clock: Clock,
    ) -> Self {
        Self {
            store,
            policy,
            clock,
            learners: HashMap::new(),
        }
    }

    /// Runs a round every `interval` until shutdown.
    pub async fn run(mut self, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.changed() => return,
            }
            if let Err(e) = self.round() {
                warn!(error = %e, "learned mirroring round failed; trying again next round");
            }
        }
    }

    /// One round over every workload; returns the workloads whose agents got a new plan.
    pub fn round(&mut self) -> Result<Vec<String>, StoreError> {
        let now_ms = self.clock.now_ms();
        let workloads: Vec<WorkloadSpec> = self.policy.borrow().workloads.clone();
        let store = Arc::clone(&self.store);
        let mut store = store.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        for spec in &workloads {
            match mirror_settings(&spec.policy) {
                Some(settings) => {
                    if self.learn(&mut store, spec, settings, now_ms)? {
                        changed.push(spec.name.clone());
                    }
                }
                None => {
                    self.learners.remove(&spec.name);
                    if store.remove_mirror_plan(&spec.name)?.is_some() {
                        info!(workload = %spec.name, "learned mirroring off: operator classes back");
                        changed.push(spec.name.clone());
                    }
                }
            }
        }
        self.learners
            .retain(|name, _| workloads.iter().any(|w| &w.name == name));
        if !changed.is_empty() {
            PolicySnapshot::publish(&self.policy, &store)?;
        }
        Ok(changed)
    }

    fn learn(
        &mut self,
        store: &mut Store,
        spec: &WorkloadSpec,
        settings: MirrorSettings,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let learner = match self.learners.entry(spec.name.clone()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let Ok(planner) = MirrorPlanner::new(settings.clone()) else {
                    // Validated with the policy; a stored policy from an older release may not be.
                    warn!(workload = %spec.name, "learned mirroring settings invalid; not learning");
                    return Ok(false);
                };
                let published = store
                    .mirror_plan(&spec.name)?
                    .and_then(|(_, body)| serde_json::from_value(body).ok());
                e.insert(Learner {
                    planner,
                    // Reports of the last hour that landed before the first round (the agent's
                    // spool delivers a burst at once; a busy coordinator's first round can come
                    // after all of it) are read, not skipped: starting at the newest id left such
                    // a workload without a plan until new reports came.
                    last_report_id: store
                        .report_id_before_intervals_since(now_ms - NEW_LEARNER_LOOKBACK_MS)?,
                    published,
                })
            }
        };
        if learner.planner.settings() != &settings
            && let Err(e) = learner.planner.set_settings(settings)
        {
            warn!(workload = %spec.name, error = %e, "learned mirroring settings refused");
            return Ok(false);
        }
        let live: Vec<&str> = spec.live.iter().map(|l| l.agent.as_str()).collect();
        let reports = store.pattern_reports(&live, learner.last_report_id)?;
        // Reports come agent by agent, each oldest first: the newest is the highest id, not
        // the last row (taking the last re-read another agent's newer reports next round).
        let Some(newest) = reports.iter().map(|r| r.id).max() else {
            return Ok(false);
        };
        learner.last_report_id = newest;
        let since_ms = reports
            .iter()
            .map(|r| r.interval_start_ms)
            .min()
            .unwrap_or(now_ms);
        // The time the counts cover is the span of their intervals, not the time since the last
        // round: after an outage an agent's spool delivers minutes of reports at once, which
        // over one round's seconds would read as a rate hundreds of times too high.
        let until_ms = reports
            .iter()
            .map(|r| r.interval_start_ms + r.interval_ms)
            .max()
            .unwrap_or(now_ms);
        let interval_secs = ((until_ms - since_ms) as f64 / 1000.0).max(0.001);

        // Sampled counts, scaled to the classified flows.
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        let mut classified = 0u64;
        for r in &reports {
            classified += r.classified_flows;
            for (pattern, flows) in &r.patterns {
                *counts.entry(pattern.as_str()).or_default() += flows;
            }
        }
        let sampled: u64 = counts.values().sum();
        let scale = if sampled > 0 && classified > 0 {
            classified as f64 / sampled as f64
        } else {
            1.0
        };
        let observations: Vec<PatternObservation> = counts
            .iter()
            .map(|(pattern, n)| PatternObservation {
                pattern: (*pattern).to_owned(),
                flows: *n as f64 * scale,
            })
            .collect();
        let latencies = class_latencies(
            store,
            &live,
            since_ms,
            now_ms + 1,
            COST_PERCENTILE,
            learner.published.as_ref(),
        )?;
        learner.planner.observe(
            now_ms as f64 / 1000.0,
            interval_secs,
            &observations,
            &latencies,
        );
        let plan = learner.planner.plan();
        let body = serde_json::to_value(&plan).unwrap_or_default();
        let material = learner
            .published
            .as_ref()
            .is_none_or(|old| changes_what_agents_do(old, &plan));
        store.put_mirror_plan(&spec.name, &body, now_ms, material)?;
        if material {
            debug!(
                workload = %spec.name,
                classes = plan.classes.len(),
                rules = plan.rules.len(),
                typical_rate = plan.typical_rate,
                "new mirror plan"
            );
            learner.published = Some(plan);
        }
        Ok(material)
    }
}

/// How far back a workload's new learner reads the reports already stored.
const NEW_LEARNER_LOOKBACK_MS: i64 = 3_600_000;

/// One shadow's coverage of live's mix, as `doppel patterns` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShadowCoverage {
    /// The shadow's agent.
    pub agent: String,
    /// The VM type it runs on.
    pub vm_type: String,
    /// What it replayed against live's mix.
    pub coverage: Coverage,
}

/// How well each of `spec`'s shadows covered live's mix over the `window_ms` before `now_ms`:
/// live's pattern counts (sampled, scaled to the classified flows) against the pattern keys of
/// the flows each shadow replayed, reweighted by live's classified and mirrored flows per class
/// (see [`doppel_engine::mirror::coverage`]).
pub fn shadow_coverage(
    store: &Store,
    spec: &WorkloadSpec,
    plan: &MirrorPlan,
    now_ms: i64,
    window_ms: i64,
) -> Result<Vec<ShadowCoverage>, StoreError> {
    let since_ms = now_ms - window_ms;
    let live: Vec<&str> = spec.live.iter().map(|l| l.agent.as_str()).collect();
    let classes = store.class_flow_totals(&live, since_ms, now_ms + 1)?;
    let sampled = store.pattern_totals(&live, since_ms, now_ms + 1)?;
    let classified: u64 = classes.values().map(|(flows, _)| flows).sum();
    let inspected: u64 = sampled.iter().map(|(_, n)| n).sum();
    let scale = if inspected > 0 && classified > 0 {
        classified as f64 / inspected as f64
    } else {
        1.0
    };
    let live_flows: Vec<(String, f64)> = sampled
        .into_iter()
        .map(|(pattern, n)| (pattern, n as f64 * scale))
        .collect();
    spec.shadows
        .iter()
        .map(|shadow| {
            let mirrored = store.pattern_totals(&[shadow.agent.as_str()], since_ms, now_ms + 1)?;
            Ok(ShadowCoverage {
                agent: shadow.agent.clone(),
                vm_type: shadow.vm_type.clone(),
                coverage: coverage(plan, &live_flows, &mirrored, &classes),
            })
        })
        .collect()
}

/// The percentile a head's cost is read at: its median, the pattern's typical service time. The
/// SLO percentile of the few hundred flows of one round is their slowest few, which one stall of
/// the host sets for every pattern alike, and the planner keeps its first reading for long (it
/// smooths over half an hour).
const COST_PERCENTILE: f64 = 50.0;

/// Live latency per head class (the [`COST_PERCENTILE`] of the kernel first-byte histograms of the
/// intervals since `since_ms`), for the planner's costly-head test.
fn class_latencies(
    store: &Store,
    live: &[&str],
    since_ms: i64,
    until_ms: i64,
    percentile: f64,
    plan: Option<&MirrorPlan>,
) -> Result<Vec<ClassLatency>, StoreError> {
    let Some(plan) = plan else {
        return Ok(Vec::new());
    };
    let heads: Vec<u16> = plan
        .classes
        .iter()
        .filter(|c| matches!(c.role, ClassRole::Head { .. }))
        .map(|c| c.id)
        .collect();
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let mut merged: BTreeMap<u16, hdrhistogram::Histogram<u64>> = BTreeMap::new();
    for row in store.interval_histograms(live, since_ms, until_ms)? {
        if row.scope != FlowScope::All
            || row.metric != LatencyMetric::KernelFirstByte
            || !heads.contains(&row.class)
        {
            continue;
        }
        let Ok(mut h) = doppel_common::wire::EncodedHistogram(row.hist).decode() else {
            continue;
        };
        match merged.get_mut(&row.class) {
            Some(into) => doppel_engine::compare::merge(into, &h),
            None => {
                // Auto-resizing, so later intervals with longer latencies merge without loss.
                h.auto(true);
                merged.insert(row.class, h);
            }
        }
    }
    Ok(merged
        .into_iter()
        .filter(|(_, h)| !h.is_empty())
        .map(|(class, h)| ClassLatency {
            class,
            latency_ms: h.value_at_quantile(percentile / 100.0) as f64 / 1e6,
        })
        .collect())
}

/// Whether `new` changes what the agents do: other classes or rules, or a rate moved by more
/// than `RATE_CHANGE` of itself and `RATE_CHANGE_PPM`.
pub fn changes_what_agents_do(old: &MirrorPlan, new: &MirrorPlan) -> bool {
    let (old_classes, old_rules) = old.wire();
    let (new_classes, new_rules) = new.wire();
    if old_rules != new_rules || old_classes.len() != new_classes.len() {
        return true;
    }
    old_classes.iter().zip(&new_classes).any(|(a, b)| {
        let (ra, rb) = (f64::from(a.sample_rate_ppm), f64::from(b.sample_rate_ppm));
        a.id != b.id
            || a.name != b.name
            || a.priority != b.priority
            || ((ra - rb).abs() > RATE_CHANGE * ra.max(rb) && (ra - rb).abs() > RATE_CHANGE_PPM)
    })
}

#[cfg(test)]
mod tests {
    use doppel_common::{
        maps::CLASS_FLOWS_COUNTER,
        wire::{Counter, IntervalReport, PatternCount, ResourceUsage},
    };

    use super::*;
    use crate::store::CheckedReport;

    const NOW_MS: i64 = 1_800_000_000_000;

    /// A live agent's report of one second, `secs_ago` before `NOW_MS`.
    fn live_report(seq: u64, secs_ago: i64) -> CheckedReport {
        CheckedReport::check(IntervalReport {
            seq,
            interval_start_unix_ms: (NOW_MS - secs_ago * 1000) as u64,
            interval_ms: 1_000,
            histograms: vec![],
            counters: vec![Counter {
                name: format!("{CLASS_FLOWS_COUNTER}0"),
                value: 40,
            }],
            host: ResourceUsage::default(),
            workload: None,
            patterns: vec![PatternCount {
                pattern: "GET /items/{n}".into(),
                flows: 4,
            }],
        })
    }

    /// A learning workload's store after its live agent's spool delivered `reports`, and the
    /// steering's first round.
    /// The store lives in the returned directory.
    fn first_round(
        reports: &[CheckedReport],
    ) -> (Vec<String>, Arc<Mutex<Store>>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open_in(dir.path()).expect("open");
        let mut spec = crate::policy::tests::web();
        spec.policy.mirror.learn = true;
        spec.policy.mirror.budget_flows_per_s = Some(20.0);
        store
            .put_workload(&spec, NOW_MS - 200_000)
            .expect("workload");
        let batch: Vec<(&str, &CheckedReport)> = reports.iter().map(|r| ("live-1", r)).collect();
        store.ingest_batch(&batch, NOW_MS).expect("ingest");
        let snapshot = PolicySnapshot::load(&store).expect("snapshot");
        let policy = Arc::new(watch::channel(Arc::new(snapshot)).0);
        let store = Arc::new(Mutex::new(store));
        let (clock, _) = Clock::manual(NOW_MS);
        let mut steering = MirrorSteering::new(Arc::clone(&store), policy, clock);
        let changed = steering.round().expect("round");
        (changed, store, dir)
    }

    #[test]
    fn a_burst_stored_before_the_first_round_gives_the_workload_a_plan() {
        // The spool's whole burst lands before the coordinator's first round: the learner
        // must read it, not start after it and wait for reports that may never come.
        let burst: Vec<CheckedReport> = (0..90).map(|i| live_report(i, 90 - i as i64)).collect();
        let (changed, store, _dir) = first_round(&burst);
        assert_eq!(changed, ["web"]);
        let store = store.lock().expect("store");
        let (_, plan) = store.mirror_plan("web").expect("read").expect("a plan");
        let plan: MirrorPlan = serde_json::from_value(plan).expect("plan");
        assert!(
            plan.patterns.iter().any(|p| p.pattern == "GET /items/{n}"),
            "the burst's pattern is learned: {plan:?}"
        );
    }

    #[test]
    fn reports_older_than_the_lookback_do_not_make_a_plan() {
        let stale: Vec<CheckedReport> = (0..30)
            .map(|i| live_report(i, NEW_LEARNER_LOOKBACK_MS / 1000 + 600 - i as i64))
            .collect();
        let (changed, store, _dir) = first_round(&stale);
        assert!(changed.is_empty(), "{changed:?}");
        assert!(
            store
                .lock()
                .expect("store")
                .mirror_plan("web")
                .expect("read")
                .is_none()
        );
    }
}
