//! The predictor end to end through a real SQLite store: reports go in through
//! `Store::ingest_batch` exactly as the ingest writer stores them, evaluations run through the
//! [`Recommender`] the coordinator runs, and what comes out is read back from the store.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use doppel_common::wire::{
    Counter, EncodedHistogram, FlowScope, HistogramRecord, IntervalReport, LatencyMetric,
    ResourceUsage,
};
use hdrhistogram::Histogram;

use super::*;
use crate::{
    compare::CompareConfig,
    store::CheckedReport,
    webhook::{DecisionStats, Recommender},
};

const SLO_MS: f64 = 100.0;
/// Start of the simulated day, ms since the epoch.
const T0_MS: i64 = 1_700_000_000_000;
/// Seconds between evaluations in the simulation.
const EVALUATE_EVERY_S: i64 = 15;

/// A VM type of the simulation: its catalog price and the load at which it saturates.
struct SimType {
    agent: &'static str,
    vm_type: &'static str,
    price: f64,
    saturation: f64,
}

const LIVE: SimType = SimType {
    agent: "live-1",
    vm_type: "m.large",
    price: 0.10,
    saturation: 250.0,
};
/// Cheaper than live and than `c.large`, but its capacity is below the coming peak.
const SMALL: SimType = SimType {
    agent: "shadow-s",
    vm_type: "s.small",
    price: 0.05,
    saturation: 150.0,
};
/// The cheapest type that holds the peak.
const COMPUTE: SimType = SimType {
    agent: "shadow-c",
    vm_type: "c.large",
    price: 0.085,
    saturation: 500.0,
};
/// Holds it too, at more than three times the price.
const LARGE: SimType = SimType {
    agent: "shadow-x",
    vm_type: "x.large",
    price: 0.30,
    saturation: 1000.0,
};

/// The true p99 at `load`: a 20 ms floor plus a queueing term, so the SLO (100 ms) breaks at
/// 90 % of saturation. A deterministic ±5 % wobble per interval stands in for measurement noise.
fn p99_ms(t: &SimType, load: f64, interval: i64) -> f64 {
    let queue = 8.0 * t.saturation / (t.saturation - load).max(t.saturation * 0.01);
    let wobble = ((interval as u64).wrapping_mul(2_654_435_761) % 1000) as f64 / 10_000.0 - 0.05;
    (20.0 + queue) * (1.0 + wobble)
}

thread_local! {
    /// A VM type whose instance fails 5 % of its exchanges in this test's run (a test runs on
    /// one thread, so this is the test's own setting).
    static FAILING: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
}

/// CPU time per exchange of the simulated workload, ms: every type spends the same, so a type's
/// saturation load is its CPUs over this.
const CPU_MS_PER_EXCHANGE: f64 = 4.0;

/// One second's report of `t` serving `load` exchanges/s: 98 % of exchanges near the median,
/// 2 % at the p99, so the stored histogram's 99th percentile is the p99; with the workload's CPU
/// use when `usage` (its CPUs are `saturation` times [`CPU_MS_PER_EXCHANGE`]).
fn report(t: &SimType, seq: u64, interval: i64, load: f64, usage: bool) -> CheckedReport {
    let exchanges = load.round().max(1.0) as u64;
    let tail = (exchanges * 2).div_ceil(100);
    let p99 = p99_ms(t, load, interval);
    // Two significant digits (1 % resolution, plenty for a p99 against a 100 ms SLO) keep the
    // count arrays small: allocating and merging them is most of this test's time unoptimised.
    let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 2).expect("histogram");
    h.record_n((0.4 * p99 * 1e6) as u64, exchanges - tail)
        .expect("record");
    h.record_n((p99 * 1e6) as u64, tail).expect("record");
    CheckedReport::check(IntervalReport {
        seq,
        interval_start_unix_ms: u64::try_from(T0_MS + interval * 1000).expect("positive"),
        interval_ms: 1000,
        histograms: vec![HistogramRecord {
            service: "10.0.0.2:80".into(),
            class: 0,
            scope: FlowScope::All,
            metric: LatencyMetric::KernelFirstByte,
            histogram: EncodedHistogram::encode(&h).expect("encode"),
        }],
        counters: vec![Counter {
            name: "exchange_errors".into(),
            value: if FAILING.get() == Some(t.vm_type) {
                exchanges / 20
            } else {
                0
            },
        }],
        host: ResourceUsage::default(),
        workload: usage.then(|| ResourceUsage {
            cpu_time_us: (exchanges as f64 * CPU_MS_PER_EXCHANGE * 1000.0) as u64,
            cpu_capacity_millis: (t.saturation * CPU_MS_PER_EXCHANGE) as u32,
            ..ResourceUsage::default()
        }),
        patterns: vec![],
    })
}

/// An amplified replay on a shadow: its load sweeps 10–85 % of its saturation every two
/// minutes, which is what finds a type's knee.
fn shadow_load(t: &SimType, second: i64) -> f64 {
    let phase = (second % 120) as f64 / 120.0;
    t.saturation * (0.10 + 0.75 * phase)
}

fn recommender(dir: &std::path::Path) -> Recommender {
    let mut store = Store::open_in(dir).expect("open store");
    let shadows: Vec<serde_json::Value> = [&SMALL, &COMPUTE, &LARGE]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "agent": t.agent, "vm_type": t.vm_type,
                "addr": format!("10.0.1.{}", i + 1), "vni": 100 + i,
            })
        })
        .collect();
    let spec: WorkloadSpec = serde_json::from_value(serde_json::json!({
        "name": "web",
        "live": [{"agent": LIVE.agent, "vm_type": LIVE.vm_type}],
        "services": ["10.0.0.2:80"],
        "shadows": shadows,
        "policy": {
            "report_interval_ms": 1000,
            "slo": {"percentile": 99.0, "max_latency_ms": SLO_MS},
            "budget": {"max_cost_per_hour": 1.0},
        },
    }))
    .expect("spec");
    store.put_workload(&spec, T0_MS).expect("put workload");
    let prices: HashMap<String, f64> = [&LIVE, &SMALL, &COMPUTE, &LARGE]
        .iter()
        .map(|t| (t.vm_type.to_owned(), t.price))
        .collect();
    Recommender {
        store: Arc::new(Mutex::new(store)),
        webhooks: Vec::new(),
        prices,
        compare: CompareConfig::default(),
        // A short comparison window keeps the v1 comparison cheap; it is not under test here.
        window_ms: 60_000,
        evaluate_interval: Duration::from_secs(10),
        backoff_base_ms: 100,
        max_attempts: 3,
        stats: Arc::new(DecisionStats::default()),
        queued: tokio::sync::Notify::new(),
        forecasts: Mutex::new(Forecasts::new(ForecastSettings::default())),
        clock: crate::clock::Clock::system(),
    }
}

/// What a run produced.
struct Run {
    /// Start of the first interval whose live p99 broke the SLO, ms.
    breach_ms: Option<i64>,
    /// Evaluations whose stored snapshot said `cold_start`.
    cold_start_snapshots: usize,
}

/// Feeds `seconds` of reports (live at `live_load(second)`, shadows sweeping), evaluating every
/// [`EVALUATE_EVERY_S`] seconds, each time after the evaluated intervals have settled.
fn run(r: &Recommender, seconds: i64, live_load: impl Fn(i64) -> f64) -> Run {
    run_with(r, seconds, live_load, false)
}

/// [`run`]; with `replay_at_live_load`, shadows replay live's load (never amplified) and every
/// report carries the workload's CPU use.
fn run_with(
    r: &Recommender,
    seconds: i64,
    live_load: impl Fn(i64) -> f64,
    replay_at_live_load: bool,
) -> Run {
    let mut breach_ms = None;
    let mut cold_start_snapshots = 0;
    for second in 0..seconds {
        let seq = u64::try_from(second).expect("positive");
        let load = live_load(second);
        if breach_ms.is_none() && p99_ms(&LIVE, load, second) > SLO_MS {
            breach_ms = Some(T0_MS + second * 1000);
        }
        let shadow = |t: &SimType| {
            let shadow_load = if replay_at_live_load {
                load
            } else {
                shadow_load(t, second)
            };
            (
                t.agent,
                report(t, seq, second, shadow_load, replay_at_live_load),
            )
        };
        let reports = [
            (
                LIVE.agent,
                report(&LIVE, seq, second, load, replay_at_live_load),
            ),
            shadow(&SMALL),
            shadow(&COMPUTE),
            shadow(&LARGE),
        ];
        let batch: Vec<(&str, &CheckedReport)> = reports.iter().map(|(a, c)| (*a, c)).collect();
        let received_ms = T0_MS + (second + 1) * 1000;
        r.store
            .lock()
            .expect("store")
            .ingest_batch(&batch, received_ms)
            .expect("ingest");
        if (second + 1) % EVALUATE_EVERY_S == 0 {
            // The settle time has passed for every interval reported so far.
            let now_ms = received_ms + ForecastSettings::default().settle_ms;
            r.evaluate(now_ms).expect("evaluate");
            let store = r.store.lock().expect("store");
            let (_, snapshot) = store.forecast("web").expect("read").expect("stored");
            if snapshot["model"] == "cold_start" {
                cold_start_snapshots += 1;
            }
        }
    }
    Run {
        breach_ms,
        cold_start_snapshots,
    }
}

#[test]
fn a_ramp_is_warned_of_before_the_slo_breaks_and_the_cheapest_type_that_holds_is_recommended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recommender(dir.path());
    // 60/s rising by 0.2/s each second: live (capacity ≈ 225/s at the SLO) breaks near 825 s.
    let outcome = run(&r, 900, |s| 60.0 + 0.2 * s as f64);
    let breach_ms = outcome.breach_ms.expect("the ramp breaks live's SLO");
    assert!(
        outcome.cold_start_snapshots > 0,
        "with less than a day of history the forecast must say it is a cold start"
    );
    let store = r.store.lock().expect("store");

    let warnings = store.warnings(Some("web"), 10).expect("warnings");
    let first = warnings.last().expect("a warning was raised");
    assert_eq!(first.vm_type, "m.large");
    assert!(
        first.raised_ms < breach_ms,
        "warned at {} ms, the SLO broke at {} ms",
        first.raised_ms - T0_MS,
        breach_ms - T0_MS
    );

    let recs = store
        .recommendations(Some("web"), 100)
        .expect("recommendations");
    let forecast: Vec<_> = recs
        .iter()
        .filter(|r| r.reason == "forecast_breach")
        .collect();
    // Stored once however many evaluations repeat it (same idempotency key), and nothing else
    // was advised on the forecast's account.
    assert_eq!(forecast.len(), 1, "{forecast:?}");
    let rec = forecast[0];
    assert_eq!(rec.current_vm_type, "m.large");
    assert_eq!(
        rec.recommended_vm_type, "c.large",
        "s.small is cheaper but cannot hold the peak; x.large holds it at more cost"
    );
    assert!(
        rec.created_ms < breach_ms,
        "recommended at {} ms, the SLO broke at {} ms",
        rec.created_ms - T0_MS,
        breach_ms - T0_MS
    );
    let f = &rec.body["forecast"];
    let lead = f["lead_secs"].as_u64().expect("lead_secs");
    assert!(
        lead > 0 && lead <= 60,
        "lead {lead} s within the 60 s horizon"
    );
    let peak = f["forecast_peak_per_s"].as_f64().expect("peak");
    let capacity = f["current_capacity_per_s"].as_f64().expect("capacity");
    // Warned while the median forecast is still below capacity: the warning rests on the
    // forecast's upper tail, which is the point of warning early.
    assert!(
        peak > 0.8 * capacity && peak < 1.5 * capacity,
        "the forecast peak {peak}/s must approach live's capacity {capacity}/s"
    );
    let held = f["recommended_capacity_per_instance"]
        .as_f64()
        .expect("capacity of the recommended type");
    assert!(
        held > f["provisioned_peak_per_s"].as_f64().expect("provisioned"),
        "the recommended type's capacity {held}/s must exceed the provisioned peak"
    );
    let types = f["types"].as_array().expect("types");
    assert!(
        types.iter().any(|t| t["vm_type"] == "s.small")
            && types.iter().any(|t| t["vm_type"] == "m.large"),
        "live's and the too-small type's models are evidence too: {types:?}"
    );
    assert_eq!(rec.body["trigger"], "forecast_breach");
}

#[test]
fn a_type_that_fails_its_exchanges_is_never_the_forecasts_choice() {
    FAILING.set(Some(COMPUTE.vm_type));
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recommender(dir.path());
    run(&r, 900, |s| 60.0 + 0.2 * s as f64);
    let store = r.store.lock().expect("store");
    let recs = store
        .recommendations(Some("web"), 100)
        .expect("recommendations");
    let rec = recs
        .iter()
        .find(|r| r.reason == "forecast_breach")
        .expect("the ramp is still advised on");
    assert_eq!(
        rec.recommended_vm_type, "x.large",
        "c.large is cheaper and holds the peak, but fails 5 % of its exchanges"
    );
    let types = rec.body["forecast"]["types"].as_array().expect("types");
    let compute = types
        .iter()
        .find(|t| t["vm_type"] == "c.large")
        .expect("c.large is still evidence");
    let rate = compute["error_rate"]
        .as_f64()
        .expect("its error rate is shown");
    assert!((rate - 0.05).abs() < 0.01, "error rate {rate}");
    assert!(
        recs.iter().all(|r| r.recommended_vm_type != "c.large"),
        "no trigger names it: {recs:?}"
    );
}

#[test]
fn a_steady_load_well_within_capacity_raises_no_warning_and_no_forecast_advice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recommender(dir.path());
    // Half of live's capacity at the SLO, with a small daily-looking wobble.
    let outcome = run(&r, 400, |s| 110.0 + 5.0 * (s as f64 / 40.0).sin());
    assert_eq!(outcome.breach_ms, None);
    let store = r.store.lock().expect("store");
    assert_eq!(store.warnings(Some("web"), 10).expect("warnings"), []);
    let recs = store
        .recommendations(Some("web"), 100)
        .expect("recommendations");
    assert!(
        recs.iter().all(|r| r.reason != "forecast_breach"),
        "{recs:?}"
    );
    let (_, snapshot) = store.forecast("web").expect("read").expect("stored");
    assert_eq!(snapshot["warning"], serde_json::Value::Null);
    let peak = snapshot["forecast_peak_per_s"].as_f64().expect("peak");
    assert!((90.0..130.0).contains(&peak), "peak {peak}");
}

#[test]
fn types_never_driven_to_their_knee_are_sized_by_their_cpu_ceilings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let r = recommender(dir.path());
    // Shadows replay live's own load, so c.large and x.large stay where their latency is flat;
    // only their CPU time per exchange and their CPUs tell their capacity.
    let outcome = run_with(&r, 900, |s| 60.0 + 0.2 * s as f64, true);
    let breach_ms = outcome.breach_ms.expect("the ramp breaks live's SLO");
    let store = r.store.lock().expect("store");
    let recs = store
        .recommendations(Some("web"), 100)
        .expect("recommendations");
    let rec = recs
        .iter()
        .find(|r| r.reason == "forecast_breach")
        .unwrap_or_else(|| {
            let (_, snapshot) = store.forecast("web").expect("read").expect("stored");
            panic!("no forecast-breach recommendation: {recs:?}\nlast forecast: {snapshot:#}")
        });
    assert_eq!(
        rec.recommended_vm_type, "c.large",
        "the cheapest type that holds the peak, known only by its CPU ceiling"
    );
    assert!(rec.created_ms < breach_ms);
    let types = rec.body["forecast"]["types"].as_array().expect("types");
    let capacity = |name: &str| {
        types
            .iter()
            .find(|t| t["vm_type"] == name)
            .and_then(|t| t["capacity_at_slo_per_s"].as_f64())
            .unwrap_or_else(|| panic!("{name} has a capacity: {types:?}"))
    };
    let basis = |name: &str| {
        types
            .iter()
            .find(|t| t["vm_type"] == name)
            .and_then(|t| t["basis"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(basis("m.large"), "measured knee");
    for (name, ratio) in [("c.large", 2.0), ("x.large", 4.0)] {
        assert!(
            // From whichever type's knee is best measured (s.small's, once the ramp passes it).
            basis(name).starts_with("scaled from ") && basis(name).contains(" by CPU ceiling ×"),
            "{name}: {}",
            basis(name)
        );
        let measured = capacity(name) / capacity("m.large");
        assert!(
            (measured / ratio - 1.0).abs() < 0.15,
            "{name}: capacity {measured:.2} times live's, its CPU ceiling says {ratio}"
        );
    }
    // The capacity ranking is the order of the types' true capacities.
    let mut ranked: Vec<(&str, f64)> = ["s.small", "m.large", "c.large", "x.large"]
        .iter()
        .map(|n| (*n, capacity(n)))
        .collect();
    ranked.sort_by(|a, b| a.1.total_cmp(&b.1));
    assert_eq!(
        ranked.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
        ["s.small", "m.large", "c.large", "x.large"],
        "{ranked:?}"
    );
}

/// `TypeMeasurements` of `n` one-second intervals at loads spread over `loads`, latency from
/// `p99_ms(t, …)`, and [`CPU_MS_PER_EXCHANGE`] of CPU per exchange on `cpus` CPUs.
fn type_points(t: &SimType, loads: (f64, f64), n: usize, cpus: f64) -> TypeMeasurements {
    let mut tp = TypeMeasurements::default();
    for i in 0..n {
        let load = loads.0 + (loads.1 - loads.0) * i as f64 / (n - 1).max(1) as f64;
        let start = i as i64 * 1000;
        tp.points.push_back((
            start,
            LoadLatencyPoint {
                load,
                latency_ms: p99_ms(t, load, i as i64),
                source: PointSource::Shadow,
            },
        ));
        tp.cpu.push_back((
            start,
            CpuSample {
                cpu_us: (load.round() * CPU_MS_PER_EXCHANGE * 1000.0) as u64,
                exchanges: load.round() as u64,
                capacity_millis: (cpus * 1000.0) as u32,
            },
        ));
    }
    tp
}

#[test]
fn type_models_lend_only_well_measured_knees_and_never_against_a_types_own_measurements() {
    let settings = ForecastSettings::default();
    let cpus = |t: &SimType| t.saturation * CPU_MS_PER_EXCHANGE / 1000.0;
    let mut by_type = BTreeMap::new();
    // Live measured into its knee: the reference.
    by_type.insert(
        LIVE.vm_type.to_owned(),
        type_points(&LIVE, (50.0, 240.0), 40, cpus(&LIVE)),
    );
    // Measured only where flat: scaled by its ceiling (500/s against live's 250/s).
    by_type.insert(
        COMPUTE.vm_type.to_owned(),
        type_points(&COMPUTE, (50.0, 100.0), 40, cpus(&COMPUTE)),
    );
    // Too few intervals: no model, however its points look.
    by_type.insert(
        LARGE.vm_type.to_owned(),
        type_points(&LARGE, (50.0, 100.0), 5, cpus(&LARGE)),
    );
    // Flat up to 200/s while its reported CPUs (a ceiling of 100/s) say it cannot be: the
    // scaled capacity would be below what it held, so it is not used.
    by_type.insert(
        SMALL.vm_type.to_owned(),
        type_points(&COMPUTE, (100.0, 200.0), 40, 0.4),
    );
    let doppel_engine::capacity::CapacityModels {
        models,
        unmodelled,
        ceilings,
    } = doppel_engine::capacity::type_models(&by_type, &settings.gates(), SLO_MS);
    let model = |name: &str| models.iter().find(|t| t.vm_type == name);
    assert_eq!(model(LIVE.vm_type).expect("live").basis, "measured knee");
    let compute = model(COMPUTE.vm_type).expect("c.large is scaled");
    assert!(
        compute.basis.starts_with("scaled from m.large"),
        "{}",
        compute.basis
    );
    let ratio = compute.model.capacity_at(SLO_MS)
        / model(LIVE.vm_type).expect("live").model.capacity_at(SLO_MS);
    assert!((ratio - 2.0).abs() < 0.2, "capacity ratio {ratio}");
    let reason = |name: &str| {
        unmodelled
            .iter()
            .find(|u| u.vm_type == name)
            .map(|u| u.reason.clone())
            .unwrap_or_else(|| panic!("{name} has no model: {unmodelled:?}"))
    };
    assert!(
        reason(LARGE.vm_type).contains("a model needs 20"),
        "{}",
        reason(LARGE.vm_type)
    );
    assert!(
        reason(SMALL.vm_type).contains("below the"),
        "{}",
        reason(SMALL.vm_type)
    );
    assert!((ceilings[COMPUTE.vm_type].saturation_per_s - 500.0).abs() < 1.0);
}

#[test]
fn live_intervals_before_a_move_belong_to_the_type_it_left() {
    use crate::measurements::live_type_at;
    // small -> medium finished at 10 s, medium -> large at 20 s.
    let moves = vec![(10_000, "small".to_owned()), (20_000, "medium".to_owned())];
    assert_eq!(live_type_at(&moves, 0).as_deref(), Some("small"));
    assert_eq!(live_type_at(&moves, 9_999).as_deref(), Some("small"));
    assert_eq!(live_type_at(&moves, 10_000).as_deref(), Some("medium"));
    assert_eq!(live_type_at(&moves, 19_000).as_deref(), Some("medium"));
    // After the last move: the spec's type.
    assert_eq!(live_type_at(&moves, 20_000), None);
    assert_eq!(live_type_at(&[], 0), None);
}

#[test]
fn keep_window_orders_by_start_and_keeps_the_newest_inside_the_window() {
    let mut items: VecDeque<(i64, char)> =
        [(30, 'c'), (10, 'a'), (50, 'e'), (20, 'b'), (40, 'd')].into();
    keep_window(&mut items, 20, 3);
    assert_eq!(Vec::from(items), vec![(30, 'c'), (40, 'd'), (50, 'e')]);
    let mut items: VecDeque<(i64, char)> = [(30, 'c'), (10, 'a')].into();
    keep_window(&mut items, 20, 5);
    assert_eq!(Vec::from(items), vec![(30, 'c')]);
}

/// A one-second report of `agent`: per class (class, scope, exchanges at 1 ms, exchanges at
/// 50 ms).
fn class_report(seq: u64, second: i64, classes: &[(u16, FlowScope, u64, u64)]) -> CheckedReport {
    let histograms = classes
        .iter()
        .map(|&(class, scope, fast, slow)| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 2).expect("hist");
            h.record_n(1_000_000, fast).expect("record");
            h.record_n(50_000_000, slow).expect("record");
            HistogramRecord {
                service: "10.0.0.2:80".into(),
                class,
                scope,
                metric: LatencyMetric::KernelFirstByte,
                histogram: EncodedHistogram::encode(&h).expect("encode"),
            }
        })
        .collect();
    CheckedReport::check(IntervalReport {
        seq,
        interval_start_unix_ms: u64::try_from(T0_MS + second * 1000).expect("positive"),
        interval_ms: 1000,
        histograms,
        counters: vec![],
        host: ResourceUsage::default(),
        workload: None,
        patterns: vec![],
    })
}

#[test]
fn a_shadows_perf_points_weigh_an_oversampled_class_by_lives_share() {
    // Live serves 995 fast exchanges of class 1 and 5 slow ones of class 2 a second, and
    // mirrors 10 % of class 1 and all of class 2 (a rare pattern boosted): the shadow serves 99
    // fast and 5 slow. Unweighted, 5 of 104 are slow and the shadow's p99 reads 50 ms; weighted
    // by live's share, 5 of 1000 are, and its p99 is live's 1 ms. Its load stays the 104 it
    // served.
    let dir = tempfile::tempdir().expect("dir");
    let mut store = Store::open_in(dir.path()).expect("store");
    let spec: WorkloadSpec = serde_json::from_value(serde_json::json!({
        "name": "web",
        "live": [{"agent": "live-1", "vm_type": "m.large"}],
        "services": ["10.0.0.2:80"],
        "shadows": [{"agent": "shadow-1", "vm_type": "c.large", "addr": "10.0.1.1", "vni": 100}],
        "policy": {"slo": {"percentile": 99.0, "max_latency_ms": 100.0}},
    }))
    .expect("spec");
    store.put_workload(&spec, T0_MS).expect("put workload");
    for second in 0..10 {
        let live = class_report(
            second as u64,
            second,
            &[
                (1, FlowScope::All, 995, 0),
                (2, FlowScope::All, 0, 5),
                (1, FlowScope::Mirrored, 99, 0),
                (2, FlowScope::Mirrored, 0, 5),
            ],
        );
        let shadow = class_report(
            second as u64,
            second,
            &[(1, FlowScope::All, 99, 0), (2, FlowScope::All, 0, 5)],
        );
        store
            .ingest_batch(&[("live-1", &live), ("shadow-1", &shadow)], T0_MS)
            .expect("ingest");
    }
    let mut by_type = BTreeMap::new();
    read_type_measurements(&store, &spec, T0_MS, T0_MS + 10_000, 10, &mut by_type).expect("read");
    let shadow = &by_type["c.large"];
    assert_eq!(shadow.points.len(), 10);
    for (_, point) in &shadow.points {
        assert!((point.load - 104.0).abs() < 1e-9, "load {}", point.load);
        assert!(
            point.latency_ms < 2.0,
            "weighted by live's share, the shadow's p99 is the fast class's: {} ms",
            point.latency_ms
        );
    }
    let live = &by_type["m.large"];
    for (_, point) in &live.points {
        assert!((point.load - 1000.0).abs() < 1e-9);
        assert!(point.latency_ms < 2.0, "live p99 {}", point.latency_ms);
    }
}

#[test]
fn live_evidence_turns_off_with_one_field_and_a_bad_clear_names_its_field() {
    assert_eq!(ForecastSettings::default().validate(), Ok(()));
    let off = ForecastSettings {
        live_raise_at: 0.0,
        ..ForecastSettings::default()
    };
    assert_eq!(
        off.validate(),
        Ok(()),
        "the default clear threshold is not read"
    );
    let inverted = ForecastSettings {
        live_clear_below: 1.5,
        ..ForecastSettings::default()
    };
    assert_eq!(
        inverted.validate().map_err(|e| e.0),
        Err("live_clear_below")
    );
    let negative = ForecastSettings {
        live_raise_at: -1.0,
        ..ForecastSettings::default()
    };
    assert_eq!(negative.validate().map_err(|e| e.0), Err("live_raise_at"));
}

#[test]
fn the_default_warning_rule_is_the_one_the_predictor_eval_chose() {
    let settings = ForecastSettings::default();
    let chosen = WarningPolicy::CHOSEN_PER_MINUTE;
    assert_eq!(
        doppel_engine::BreachCombine::from(settings.combine),
        chosen.combine
    );
    assert_eq!(
        (settings.raise_at, settings.clear_below),
        (chosen.raise_at, chosen.clear_below)
    );
    let live = chosen
        .live
        .expect("live evidence is part of the chosen rule");
    assert_eq!(
        (settings.live_raise_at, settings.live_clear_below),
        (live.raise_at, live.clear_below)
    );
}
