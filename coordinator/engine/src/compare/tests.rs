//! Synthetic histograms with known latencies and loads.

use std::collections::HashMap;

use super::*;
use crate::candidates::{MAX_EXCESS_ERROR_RATE, fails_more_than_its_peers};

/// The SLO of `Policy::default()`, ms.
const SLO_MS: f64 = 200.0;

/// The advice's type and trigger.
fn advice(c: &Comparison, slo_ms: f64, budget: Option<f64>) -> Option<(&str, Trigger)> {
    advise(c, slo_ms, budget).map(|(r, t)| (r.vm_type.as_str(), t))
}

const NOW: i64 = 1_700_000_900_000;

/// One interval: `exchanges` in 1 s, all at `latency_ms` except 2 % at `tail_ms`.
fn m(role: Role, vm: &str, agent: &str, i: i64, exchanges: u64, latency_ms: f64) -> Measurement {
    let mut h = Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    let tail = exchanges / 50;
    h.record_n((latency_ms * 1e6) as u64, exchanges - tail)
        .expect("record");
    h.record_n((latency_ms * 3e6) as u64, tail).expect("record");
    Measurement {
        agent: agent.into(),
        vm_type: vm.into(),
        role,
        interval_start_ms: NOW - 600_000 + i * 1000,
        interval_ms: 1000,
        class: 0,
        histogram: h,
        report_errors: 1,
    }
}

/// The comparison of `ms` over the default 15 min window at p99.
fn compared(ms: &[Measurement]) -> Comparison {
    compare(
        "web",
        NOW,
        900_000,
        99.0,
        &CompareConfig::default(),
        &prices(),
        ms,
    )
}

fn prices() -> HashMap<String, f64> {
    [("m5.large", 0.10), ("c6g.large", 0.08), ("m5.xlarge", 0.20)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

#[test]
fn intervals_pair_only_with_a_distinct_interval_of_similar_load() {
    let live = [100.0, 200.0, 300.0, 1000.0];
    let shadow = [95.0, 310.0, 500.0, 105.0];
    let pairs = match_by_load(&live, &shadow, 0.1);
    assert_eq!(
        pairs,
        [(0, 0), (2, 1)],
        "105 has no partner left, 500 none near"
    );
    assert!(match_by_load(&live, &[10.0], 0.1).is_empty());
}

#[test]
fn the_confidence_interval_follows_student_t() {
    let (mean, low, high, faster) = paired_difference(&[-1.0, -2.0, -3.0, -4.0, -5.0]);
    assert!((mean + 3.0).abs() < 1e-9);
    // sd = 1.5811, se = 0.7071, t(4) = 2.776 → half-width 1.963
    assert!((high - (-3.0 + 1.963)).abs() < 1e-3, "{high}");
    assert!((low - (-3.0 - 1.963)).abs() < 1e-3, "{low}");
    assert!(faster > 0.99);
    let (_, low, high, faster) = paired_difference(&[-1.0, 1.0, -1.0, 1.0]);
    assert!(low < 0.0 && high > 0.0);
    assert!((faster - 0.5).abs() < 1e-9);
}

#[test]
fn the_confidence_uses_the_intervals_degrees_of_freedom() {
    // Three pairs whose interval's upper end sits just below zero: with the interval's t(2)
    // the confidence is just above 97.5 %; a normal approximation would have said 99.9 %.
    let (_, _, high, faster) = paired_difference(&[-2.0, -3.0, -4.0]);
    assert!(high < 0.0, "{high}");
    assert!((0.975..0.99).contains(&faster), "{faster}");
    // Whatever the pairs, "faster" by the interval means at least 97.5 % by the confidence.
    for d in [[-0.1, -5.0, -2.0, -0.3], [-1.0, -1.1, -0.9, -1.05]] {
        let (_, _, high, faster) = paired_difference(&d);
        assert_eq!(
            high < 0.0,
            faster > 0.975,
            "{d:?}: high {high}, confidence {faster}"
        );
    }
}

#[test]
fn a_faster_shadow_at_matched_load_ranks_first_and_a_lightly_loaded_one_is_not_judged() {
    let mut ms = Vec::new();
    for i in 0..60 {
        // Live load swings between 100 and 159/s; latency 10 ms (+ a little noise).
        let load = 100 + (i as u64 % 60);
        ms.push(m(
            Role::Live,
            "m5.large",
            "live-1",
            i,
            load,
            10.0 + (i % 3) as f64 * 0.1,
        ));
        // c6g gets amplified replay at the same loads and is faster.
        ms.push(m(
            Role::Shadow,
            "c6g.large",
            "sh-1",
            i,
            load,
            6.0 + (i % 2) as f64 * 0.1,
        ));
        // m5.xlarge is even faster but only ever sees 10 % of the load: no matched pairs.
        ms.push(m(Role::Shadow, "m5.xlarge", "sh-2", i, load / 10, 2.0));
    }
    // Measurements outside the window are ignored.
    let mut old = m(Role::Live, "m5.large", "live-1", 0, 100, 900.0);
    old.interval_start_ms = NOW - 3_600_000;
    ms.push(old);

    let c = compared(&ms);
    assert_eq!(c.live_vm_type.as_deref(), Some("m5.large"));
    let live = c.types.iter().find(|t| t.role == Role::Live).expect("live");
    assert_eq!(live.all.exchanges, (100..160).sum::<u64>());
    assert!((live.all.exchanges_per_s - 129.5).abs() < 1e-9);
    assert!((live.all.p50_ms - 10.0).abs() < 0.3, "{}", live.all.p50_ms);
    assert!((live.all.p99_ms - 30.0).abs() < 1.0, "{}", live.all.p99_ms);
    assert_eq!(live.all.error_rate, Some(60.0 / 7770.0));

    assert_eq!(c.ranking.len(), 2);
    let best = &c.ranking[0];
    assert_eq!(best.vm_type, "c6g.large");
    assert_eq!(best.verdict, Verdict::Faster);
    assert_eq!(best.difference.pairs, 60);
    assert!(
        best.difference.ci_high_ms < 0.0 && (best.difference.mean_ms + 12.0).abs() < 1.0,
        "{:?}",
        best.difference
    );
    assert!((best.cost_delta_per_hour.expect("priced") + 0.02).abs() < 1e-9);
    let light = &c.ranking[1];
    assert_eq!(light.vm_type, "m5.xlarge");
    assert_eq!(light.verdict, Verdict::InsufficientEvidence);
    assert_eq!(light.difference.pairs, 0);

    let (chosen, trigger) = advise(&c, SLO_MS, None).expect("c6g is faster and cheaper");
    assert_eq!(trigger, Trigger::FasterAtLowerOrEqualCost);
    assert_eq!(chosen.vm_type, "c6g.large");
    assert_eq!(c.live_vm_type.as_deref(), Some("m5.large"));
    assert!(chosen.difference.confidence_faster > 0.99);
}

#[test]
fn a_broken_slo_recommends_the_cheapest_type_that_holds_it_within_budget() {
    let mut ms = Vec::new();
    for i in 0..30 {
        let load = 200 + i as u64;
        ms.push(m(Role::Live, "m5.large", "live-1", i, load, 100.0));
        ms.push(m(Role::Shadow, "m5.xlarge", "sh-1", i, load, 20.0));
        ms.push(m(Role::Shadow, "c6g.large", "sh-2", i, load, 90.0));
    }
    let c = compared(&ms);
    let (chosen, trigger) = advise(&c, 100.0, None).expect("SLO broken: live p99 is ~300 ms");
    assert_eq!(trigger, Trigger::SloBreach);
    assert_eq!(
        chosen.vm_type, "m5.xlarge",
        "c6g (p99 ~270 ms) does not hold it"
    );
    assert!((chosen.cost_delta_per_hour.expect("priced") - 0.10).abs() < 1e-9);
    assert_eq!(
        advice(&c, 100.0, Some(0.15)),
        None,
        "m5.xlarge is over budget"
    );
}

/// A step up in load breaks live: a cheaper type that held the quiet part of the window, and
/// saturates at the new load (completing only what its CPUs allow, so its intervals there pair
/// with none of live's), is no way out; the type measured holding the step is.
#[test]
fn a_breach_is_judged_at_the_load_that_breaks_live_not_over_the_quiet_part_of_the_window() {
    let mut ms = Vec::new();
    for i in 0..30 {
        // Twenty quiet intervals at ~200/s, then ten at ~450/s.
        let (load, stepped) = if i < 20 {
            (200 + i as u64, false)
        } else {
            (450 + i as u64, true)
        };
        let (live_ms, cheap_ms, big_ms) = if stepped {
            (2000.0, 2500.0, 25.0)
        } else {
            (20.0, 25.0, 15.0)
        };
        ms.push(m(Role::Live, "m5.large", "live-1", i, load, live_ms));
        let cheap_load = if stepped { 260 + i as u64 } else { load };
        ms.push(m(
            Role::Shadow,
            "c6g.large",
            "sh-1",
            i,
            cheap_load,
            cheap_ms,
        ));
        ms.push(m(Role::Shadow, "m5.xlarge", "sh-2", i, load, big_ms));
    }
    let c = compared(&ms);
    let cheap = c
        .ranking
        .iter()
        .find(|r| r.vm_type == "c6g.large")
        .expect("ranked");
    // Its pairs are all quiet ones, and hold the SLO; it has none at the peak.
    assert!(
        cheap.shadow_at_load_ms < 300.0,
        "{}",
        cheap.shadow_at_load_ms
    );
    assert_eq!(cheap.shadow_at_peak_ms, None);
    assert_eq!(
        advice(&c, 300.0, None),
        Some(("m5.xlarge", Trigger::SloBreach))
    );
    // Without the big type measured at the step, there is no advice at all.
    let without: Vec<Measurement> = ms
        .iter()
        .filter(|m| m.vm_type != "m5.xlarge" || m.interval_start_ms < NOW - 600_000 + 20_000)
        .cloned()
        .collect();
    assert_eq!(advice(&compared(&without), 300.0, None), None);
}

/// Live at `live_ms` (its p99 three times that), m5.xlarge at 20 ms, and c6g.large at 5 ms
/// failing 5 % of its exchanges, over 30 intervals of matched load.
fn with_a_failing_cheap_type(live_ms: f64) -> Comparison {
    let mut ms = Vec::new();
    for i in 0..30 {
        let load = 200 + i as u64;
        ms.push(m(Role::Live, "m5.large", "live-1", i, load, live_ms));
        ms.push(m(Role::Shadow, "m5.xlarge", "sh-1", i, load, 20.0));
        let mut failing = m(Role::Shadow, "c6g.large", "sh-2", i, load, 5.0);
        failing.report_errors = load / 20;
        ms.push(failing);
    }
    compared(&ms)
}

#[test]
fn a_shadow_type_that_fails_its_exchanges_is_never_recommended_however_fast() {
    // Live breaks the SLO; m5.xlarge holds it, c6g.large is faster still but fails 5 % of its
    // exchanges (its 5xx answers are quick).
    let c = with_a_failing_cheap_type(100.0);
    let c6g = c
        .types
        .iter()
        .find(|t| t.vm_type == "c6g.large")
        .expect("c6g");
    assert!(c6g.all.error_rate.expect("counted") > MAX_EXCESS_ERROR_RATE);
    let ranked = c
        .ranking
        .iter()
        .find(|r| r.vm_type == "c6g.large")
        .expect("ranked");
    assert!((ranked.error_rate_at_load.expect("paired") - 0.05).abs() < 0.005);
    assert_eq!(
        advice(&c, 100.0, None),
        Some(("m5.xlarge", Trigger::SloBreach)),
        "the cheaper, faster c6g fails its requests"
    );
    // With live healthy, a faster and cheaper type that fails is no reason to move either.
    let c = with_a_failing_cheap_type(30.0);
    assert_eq!(c.ranking[0].verdict, Verdict::Faster);
    assert_eq!(advice(&c, 100.0, None), None);
}

#[test]
fn errors_of_an_amplified_replay_past_the_knee_do_not_hold_a_type_back() {
    // c6g answers live's load cleanly; the amplifier also drove it to 3x that load, where it
    // failed a third of its exchanges. Only errors at the load live offers count.
    let mut ms = Vec::new();
    for i in 0..30 {
        let load = 200 + i as u64;
        ms.push(m(Role::Live, "m5.large", "live-1", i, load, 100.0));
        ms.push(m(Role::Shadow, "m5.xlarge", "sh-1", i, load, 20.0));
        ms.push(m(Role::Shadow, "c6g.large", "sh-2", i, load, 30.0));
        let mut amplified = m(Role::Shadow, "c6g.large", "sh-2", 30 + i, 3 * load, 400.0);
        amplified.report_errors = load;
        ms.push(amplified);
    }
    let c = compared(&ms);
    let c6g = c
        .types
        .iter()
        .find(|t| t.vm_type == "c6g.large")
        .expect("c6g");
    assert!(
        c6g.all.error_rate.expect("counted") > 0.2,
        "over the whole window"
    );
    let ranked = c
        .ranking
        .iter()
        .find(|r| r.vm_type == "c6g.large")
        .expect("ranked");
    assert!(
        ranked.error_rate_at_load.expect("paired") < 0.01,
        "at matched load"
    );
    assert_eq!(
        advice(&c, 100.0, None),
        Some(("c6g.large", Trigger::SloBreach)),
        "cheapest that holds it"
    );
}

#[test]
fn errors_every_shadow_shares_are_the_workloads_not_a_types() {
    // The workload fails 3 % of requests wherever it runs: a type is held back only by what it
    // fails beyond the best type, by more than the allowed excess.
    let rates = [0.03, 0.032, 0.05];
    assert!(!fails_more_than_its_peers(Some(0.03), rates));
    assert!(!fails_more_than_its_peers(Some(0.032), rates));
    assert!(fails_more_than_its_peers(Some(0.05), rates));
    // Nothing counted, nothing held back.
    assert!(!fails_more_than_its_peers(None, rates));
    assert!(!fails_more_than_its_peers(Some(0.5), []));
}

#[test]
fn nothing_is_recommended_without_a_conclusive_advantage() {
    let mut ms = Vec::new();
    for i in 0..30 {
        let load = 200 + i as u64;
        let wobble = if i % 2 == 0 { 0.5 } else { -0.5 };
        ms.push(m(Role::Live, "m5.large", "live-1", i, load, 10.0));
        ms.push(m(Role::Shadow, "c6g.large", "sh-1", i, load, 10.0 + wobble));
    }
    let c = compared(&ms);
    assert_eq!(c.ranking[0].verdict, Verdict::Inconclusive);
    assert_eq!(advice(&c, SLO_MS, None), None);
}

#[test]
fn merging_is_fast_enough_for_the_ingest_target() {
    // Not a benchmark (that is `cargo xtask bench ingest`); a guard against an accidental
    // quadratic merge. Debug builds are ~10x slower than release.
    let h = m(Role::Live, "t", "a", 0, 1000, 5.0).histogram;
    let mut into = new_histogram();
    let start = std::time::Instant::now();
    for _ in 0..1000 {
        merge(&mut into, &h);
    }
    assert_eq!(into.len(), 1_000_000);
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn an_unbounded_interval_survives_json() {
    // One matched pair: the interval is unbounded on both sides.
    let (mean_ms, ci_low_ms, ci_high_ms, confidence_faster) = paired_difference(&[-2.0]);
    let difference = PairedDifference {
        pairs: 1,
        mean_ms,
        ci_low_ms,
        ci_high_ms,
        confidence_faster,
        live_load_per_s: 10.0,
        shadow_load_per_s: 10.0,
    };
    let json = serde_json::to_string(&difference).expect("serialize");
    assert!(json.contains("\"ci_low_ms\":null"), "{json}");
    let back: PairedDifference = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, difference);
    let bounded = PairedDifference {
        ci_low_ms: -1.5,
        ci_high_ms: 2.5,
        ..difference
    };
    let back: PairedDifference =
        serde_json::from_str(&serde_json::to_string(&bounded).expect("serialize")).expect("de");
    assert_eq!(back, bounded);
}

#[test]
fn an_oversampled_class_is_weighted_back_to_lives_share() {
    // Live: 950 fast exchanges (1 ms) of class 0 and 50 slow ones (100 ms) of class 1 per
    // interval; the shadow, as fast, got class 0 at 10 % and class 1 whole. Unweighted, a third
    // of its exchanges are slow and its p90 reads 100 ms; weighted by live's share, 1 ms.
    let class = |mut m: Measurement, class: u16| {
        m.class = class;
        m
    };
    let mut ms = Vec::new();
    let mut live_mirrored = Vec::new();
    for i in 0..20 {
        ms.push(m(Role::Live, "a.large", "live", i, 950, 1.0));
        ms.push(class(m(Role::Live, "a.large", "live", i, 50, 100.0), 1));
        ms.push(m(Role::Shadow, "b.large", "shadow", i, 95, 1.0));
        ms.push(class(m(Role::Shadow, "b.large", "shadow", i, 50, 100.0), 1));
        for (class, exchanges) in [(0, 95), (1, 50)] {
            live_mirrored.push(LiveMirrored {
                interval_start_ms: NOW - 600_000 + i * 1000,
                interval_ms: 1000,
                class,
                exchanges,
            });
        }
    }
    let shadow_p90 = |c: &Comparison| {
        c.types
            .iter()
            .find(|t| t.role == Role::Shadow)
            .map(|t| (t.at_percentile_ms, t.all.exchanges))
            .expect("shadow row")
    };
    let run = |mirrored: &[LiveMirrored]| {
        compare_weighted(
            "web",
            NOW,
            900_000,
            90.0,
            &CompareConfig::default(),
            &prices(),
            &ms,
            mirrored,
        )
    };
    let (unweighted, n) = shadow_p90(&run(&[]));
    assert!(unweighted > 90.0, "{unweighted}");
    assert_eq!(n, 20 * 145);
    let (weighted, n) = shadow_p90(&run(&live_mirrored));
    assert!(weighted < 1.1, "{weighted}");
    assert_eq!(n, 20 * 145, "counts stay what the shadow served");
    let live_p90 = run(&live_mirrored).types[0].at_percentile_ms;
    assert!(
        (weighted - live_p90).abs() < 0.05,
        "{weighted} vs live {live_p90}"
    );
}
