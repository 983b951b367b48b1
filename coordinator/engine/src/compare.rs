//! Live vs shadow comparison: sans-IO and deterministic. No clock, no sockets, no store: the
//! caller passes the measurements and `now`, and gets a [`Comparison`] back.
//!
//! Histograms are merged per VM type × class over the window for the summary (p50/p90/p99/p99.9,
//! exchanges/s, error rate). A shadow that receives a sample of the traffic is less loaded than
//! the live instance and would look faster for that reason alone, so the verdict is drawn only
//! from *matched-load pairs*: each interval of a shadow is paired with a distinct live interval
//! whose offered load (exchanges/s) is within [`CompareConfig::load_tolerance`] of it, and the
//! per-pair difference of the SLO percentile gives a mean and a Student-t confidence interval.
//! Shadows are then ranked: conclusive evidence first, then by that difference, then by price.
//!
//! A shadow receives each class at its own rate (learned mirroring oversamples rare and costly
//! classes), so its merged histograms over-represent those classes. [`compare_weighted`] gives
//! each class of a shadow interval live's weight: live's exchanges of the class over live's
//! mirrored exchanges of it, in the live intervals that overlap the shadow's (see
//! [`crate::mirror::class_weight`]). Loads and exchange counts stay what the shadow served;
//! only the percentiles drawn from several classes at once are weighted.
//!
//! [`advise`] turns a comparison, the SLO and the budget into at most one piece of advice: the
//! rule the coordinator turns into a recommendation document.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};

use statrs::distribution::{ContinuousCDF as _, StudentsT};

use crate::candidates::{fails_more_than_its_peers, within_budget};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Whether a measurement comes from the live instance or a shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The instance serving real clients.
    Live,
    /// A shadow replaying sampled traffic.
    Shadow,
}

impl Role {
    /// The role as it is serialized: `live` or `shadow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Shadow => "shadow",
        }
    }
}

/// One histogram of one report interval of one agent.
#[derive(Clone, Debug)]
pub struct Measurement {
    /// Reporting agent.
    pub agent: String,
    /// The VM type it runs on.
    pub vm_type: String,
    /// Live or shadow.
    pub role: Role,
    /// Interval start, ms since the epoch.
    pub interval_start_ms: i64,
    /// Interval length, ms.
    pub interval_ms: i64,
    /// Traffic class.
    pub class: u16,
    /// Exchange latencies, nanoseconds.
    pub histogram: Histogram<u64>,
    /// Exchange errors of the whole report (shared by its histograms: counted once per report).
    pub report_errors: u64,
}

/// Live's exchanges on mirrored flows of one class in one report interval (its `Mirrored`
/// scope histogram's count): with live's own count of the class, the class's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveMirrored {
    /// Interval start, ms since the epoch.
    pub interval_start_ms: i64,
    /// Interval length, ms.
    pub interval_ms: i64,
    /// Traffic class.
    pub class: u16,
    /// Exchanges of mirrored flows.
    pub exchanges: u64,
}

/// Tunables of the comparison.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CompareConfig {
    /// Largest relative load difference of a matched pair (0.15: within 15 %).
    pub load_tolerance: f64,
    /// Pairs needed before a verdict is drawn.
    pub min_pairs: usize,
    /// Intervals with fewer exchanges are too thin for a percentile and are not paired.
    pub min_exchanges_per_interval: u64,
}

impl Default for CompareConfig {
    fn default() -> Self {
        Self {
            load_tolerance: 0.15,
            min_pairs: 5,
            min_exchanges_per_interval: 10,
        }
    }
}

/// Latency and rate figures of a merged histogram.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyStats {
    /// Exchanges measured.
    pub exchanges: u64,
    /// Exchanges per second over the measured intervals.
    pub exchanges_per_s: f64,
    /// Errors per exchange; `None` per class, since agents count errors per report, not per
    /// class.
    pub error_rate: Option<f64>,
    /// Median, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 99.9th percentile, ms.
    pub p999_ms: f64,
}

/// What the matched-load pairs say about one shadow type against live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Faster than live: the whole confidence interval of the difference is below zero.
    Faster,
    /// Slower than live: the whole interval is above zero.
    Slower,
    /// The interval contains zero.
    Inconclusive,
    /// Fewer matched pairs than [`CompareConfig::min_pairs`].
    InsufficientEvidence,
}

impl Verdict {
    /// The verdict as it is serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Faster => "faster",
            Self::Slower => "slower",
            Self::Inconclusive => "inconclusive",
            Self::InsufficientEvidence => "insufficient_evidence",
        }
    }
}

/// The SLO percentile of shadow minus live over matched-load pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairedDifference {
    /// Pairs.
    pub pairs: usize,
    /// Mean difference, ms (negative: the shadow is faster).
    pub mean_ms: f64,
    /// Lower end of the 95 % confidence interval, ms; `-inf` (JSON `null`) with one pair.
    #[serde(with = "unbounded::low")]
    pub ci_low_ms: f64,
    /// Upper end of the 95 % confidence interval, ms; `+inf` (JSON `null`) with one pair.
    #[serde(with = "unbounded::high")]
    pub ci_high_ms: f64,
    /// One-sided confidence that the shadow is faster (normal approximation), 0..=1.
    pub confidence_faster: f64,
    /// Mean offered load of the pairs' live side, exchanges/s.
    pub live_load_per_s: f64,
    /// Mean offered load of the pairs' shadow side, exchanges/s.
    pub shadow_load_per_s: f64,
}

/// JSON has no infinities, and a confidence interval from a single pair is unbounded. serde_json
/// writes a non-finite `f64` as `null` but cannot read `null` back into an `f64`, so every
/// `doppel compare` of a workload with a shadow at exactly one matched pair failed to decode.
/// These write an unbounded end as `null` and read `null` back as the infinity it stands for.
mod unbounded {
    use serde::{Deserialize as _, Deserializer, Serializer};

    fn write<S: Serializer>(value: f64, s: S) -> Result<S::Ok, S::Error> {
        if value.is_finite() {
            s.serialize_some(&value)
        } else {
            s.serialize_none()
        }
    }

    pub(super) mod low {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
            write(*value, s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
            Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
        }
    }

    pub(super) mod high {
        use super::*;

        pub(crate) fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
            write(*value, s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
            Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
        }
    }
}

/// One VM type's summary over the window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TypeSummary {
    /// VM type.
    pub vm_type: String,
    /// Live or shadow.
    pub role: Role,
    /// Price per hour from the catalog, if listed.
    pub price_per_hour: Option<f64>,
    /// All classes merged.
    pub all: LatencyStats,
    /// The comparison's percentile (the SLO's) over the window, all classes, ms.
    pub at_percentile_ms: f64,
    /// Per class.
    pub classes: BTreeMap<u16, LatencyStats>,
}

/// A shadow type's place in the ranking.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Ranked {
    /// VM type.
    pub vm_type: String,
    /// The verdict.
    pub verdict: Verdict,
    /// The paired difference of the SLO percentile.
    pub difference: PairedDifference,
    /// The shadow's SLO percentile over its matched intervals, ms.
    pub shadow_at_load_ms: f64,
    /// Live's SLO percentile over the same pairs, ms.
    pub live_at_load_ms: f64,
    /// Price difference to the live type per hour (negative: cheaper), if both are listed.
    pub cost_delta_per_hour: Option<f64>,
    /// Failed over measured exchanges in the shadow's matched intervals: errors at the load
    /// live offers, not in amplified replays driven past the type's knee on purpose, where
    /// failing is expected. `None` without pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_rate_at_load: Option<f64>,
    /// The shadow's SLO percentile over its pairs at live's highest load in the window (live's
    /// interval within the load tolerance of that peak), ms; `None` when it has no pair there.
    /// An SLO breach is judged here, at the load that breaks live: over all pairs, a type
    /// smaller than live that held the quiet part of the window looked like a way out of a
    /// step up in load it could not carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_at_peak_ms: Option<f64>,
}

/// The comparison of a workload's live type with each of its shadow types.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Workload.
    pub workload: String,
    /// When it was computed, ms since the epoch.
    pub computed_ms: i64,
    /// Window length, ms.
    pub window_ms: i64,
    /// The percentile compared (the workload's SLO percentile).
    pub percentile: f64,
    /// The live VM type (the first live agent's).
    pub live_vm_type: Option<String>,
    /// Every type measured in the window, live first.
    pub types: Vec<TypeSummary>,
    /// Shadow types, best first.
    pub ranking: Vec<Ranked>,
    /// Live's highest interval load in the window, exchanges/s (0 without live intervals).
    #[serde(default)]
    pub live_peak_load_per_s: f64,
    /// The relative load difference within which intervals were paired
    /// ([`CompareConfig::load_tolerance`]).
    #[serde(default)]
    pub load_tolerance: f64,
}

/// One agent interval, all classes merged.
#[derive(Debug)]
struct Point<'a> {
    load_per_s: f64,
    histogram: &'a Histogram<u64>,
    /// Exchanges served (the histogram of a weighted shadow interval counts more).
    exchanges: u64,
    /// Exchanges the agent counted as failed in the interval.
    errors: u64,
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn quantile_ms(h: &Histogram<u64>, percentile: f64) -> f64 {
    if h.is_empty() {
        0.0
    } else {
        ms(h.value_at_percentile(percentile))
    }
}

fn new_histogram() -> Histogram<u64> {
    // Auto-resizing, so histograms of any range merge without loss. Latencies are resolved to
    // the microsecond: a lowest discernible value of 1 ns would size every merged count array
    // for nanoseconds, five times the memory to allocate and zero on every comparison.
    let mut h = Histogram::new_with_bounds(1000, 2000, 3)
        .unwrap_or_else(|_| unreachable!("1 µs to 2 µs at 3 significant digits is valid"));
    h.auto(true);
    h
}

/// Adds `from` into `into`. With auto-resize on, `add` only fails on counter overflow, which
/// u64 counts of real exchanges do not reach.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    let _ = into.add(from);
}

/// Mean, 95 % confidence interval and one-sided confidence that the mean is below zero, of
/// paired differences. The interval and the confidence come from the same Student-t
/// distribution, with `n - 1` degrees of freedom: a verdict of "faster" (the interval's upper
/// end below zero) always comes with a confidence of at least 97.5 %.
pub fn paired_difference(differences: &[f64]) -> (f64, f64, f64, f64) {
    let n = differences.len();
    if n == 0 {
        return (0.0, 0.0, 0.0, 0.5);
    }
    let mean = differences.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, f64::NEG_INFINITY, f64::INFINITY, 0.5);
    }
    let var = differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let se = (var / n as f64).sqrt();
    if se <= 0.0 || !se.is_finite() {
        let confidence = match mean.partial_cmp(&0.0) {
            Some(std::cmp::Ordering::Less) => 1.0,
            Some(std::cmp::Ordering::Greater) => 0.0,
            _ => 0.5,
        };
        return (mean, mean, mean, confidence);
    }
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .unwrap_or_else(|_| unreachable!("n - 1 >= 1 degrees of freedom, unit scale"));
    let half = t.inverse_cdf(0.975) * se;
    (mean, mean - half, mean + half, t.cdf(-mean / se))
}

/// Pairs points of similar load, each point used at most once: both sides sorted by load, a
/// pair is taken when within `tolerance` (relative to the larger load), else the lower side
/// advances. Returns index pairs `(live, shadow)`.
pub fn match_by_load(live: &[f64], shadow: &[f64], tolerance: f64) -> Vec<(usize, usize)> {
    let sorted = |loads: &[f64]| {
        let mut idx: Vec<usize> = (0..loads.len()).collect();
        idx.sort_by(|&a, &b| loads[a].total_cmp(&loads[b]));
        idx
    };
    let (li, si) = (sorted(live), sorted(shadow));
    let (mut i, mut j) = (0, 0);
    let mut pairs = Vec::new();
    while i < li.len() && j < si.len() {
        let (l, s) = (live[li[i]], shadow[si[j]]);
        if (l - s).abs() <= tolerance * l.max(s) {
            pairs.push((li[i], si[j]));
            i += 1;
            j += 1;
        } else if l < s {
            i += 1;
        } else {
            j += 1;
        }
    }
    pairs
}

/// One interval of one agent: its length (ms), its errors, its classes merged (weighted by
/// class), and the exchanges it served.
type IntervalAcc<'a> = (i64, u64, Cow<'a, Histogram<u64>>, u64);

#[derive(Debug, Default)]
struct TypeAcc<'a> {
    all: Option<Histogram<u64>>,
    /// Exchanges served (the weighted `all` counts more).
    all_exchanges: u64,
    classes: BTreeMap<u16, Histogram<u64>>,
    /// (agent, interval start) → (interval ms, errors, its classes merged). An interval of one
    /// class borrows that class's histogram: merging copies a whole count array, and most
    /// intervals have one class.
    intervals: BTreeMap<(&'a str, i64), IntervalAcc<'a>>,
}

fn stats(h: &Histogram<u64>, seconds: f64, errors: Option<u64>) -> LatencyStats {
    let exchanges = h.len();
    LatencyStats {
        exchanges,
        exchanges_per_s: if seconds > 0.0 {
            exchanges as f64 / seconds
        } else {
            0.0
        },
        error_rate: errors.map(|e| {
            if exchanges > 0 {
                e as f64 / exchanges as f64
            } else {
                0.0
            }
        }),
        p50_ms: quantile_ms(h, 50.0),
        p90_ms: quantile_ms(h, 90.0),
        p99_ms: quantile_ms(h, 99.0),
        p999_ms: quantile_ms(h, 99.9),
    }
}

/// Compares live with each shadow type over `[now_ms - window_ms, now_ms)`, every class of a
/// shadow counted as the shadow served it (the comparison of a workload mirrored at one rate).
pub fn compare(
    workload: &str,
    now_ms: i64,
    window_ms: i64,
    percentile: f64,
    config: &CompareConfig,
    prices: &HashMap<String, f64>,
    measurements: &[Measurement],
) -> Comparison {
    compare_weighted(
        workload,
        now_ms,
        window_ms,
        percentile,
        config,
        prices,
        measurements,
        &[],
    )
}

/// Each shadow measurement's weight relative to the lightest of its type: live's exchanges of
/// its class over live's mirrored exchanges of it, in the live intervals overlapping the
/// shadow's (over the whole window when none overlaps). 1 where live mirrored nothing of the
/// class, or without `live_mirrored`.
pub fn shadow_weights(measurements: &[&Measurement], live_mirrored: &[LiveMirrored]) -> Vec<f64> {
    if live_mirrored.is_empty() {
        return vec![1.0; measurements.len()];
    }
    // Live's (interval start, length, served, mirrored) per class, sorted by start, and each
    // class's window totals: every shadow measurement then looks up only the live intervals
    // that can overlap it, instead of scanning all of live's (a 15 min window of one-second
    // intervals over 16 classes is tens of thousands of each).
    let mut by_class: HashMap<u16, Vec<(i64, i64, u64, u64)>> = HashMap::new();
    for m in measurements.iter().filter(|m| m.role == Role::Live) {
        by_class.entry(m.class).or_default().push((
            m.interval_start_ms,
            m.interval_ms,
            m.histogram.len(),
            0,
        ));
    }
    for m in live_mirrored {
        by_class.entry(m.class).or_default().push((
            m.interval_start_ms,
            m.interval_ms,
            0,
            m.exchanges,
        ));
    }
    let mut longest = 0;
    let mut totals: HashMap<u16, (u64, u64)> = HashMap::new();
    for (class, rows) in &mut by_class {
        rows.sort_unstable_by_key(|r| r.0);
        let total = totals.entry(*class).or_default();
        for r in rows.iter() {
            longest = longest.max(r.1);
            total.0 += r.2;
            total.1 += r.3;
        }
    }
    let overlapping = |class: u16, start: i64, len: i64| {
        let rows = by_class.get(&class).map_or(&[][..], Vec::as_slice);
        // Rows starting in (start - longest, start + len) are the only ones that can overlap.
        let first = rows.partition_point(|r| r.0 <= start - longest);
        let (served, mirrored) = rows[first..]
            .iter()
            .take_while(|r| r.0 < start + len)
            .filter(|r| r.0 + r.1 > start)
            .fold((0, 0), |(s, m), r| (s + r.2, m + r.3));
        crate::mirror::class_weight(served, mirrored)
    };
    let mut weights: Vec<f64> = measurements
        .iter()
        .map(|m| match m.role {
            Role::Live => 1.0,
            Role::Shadow => overlapping(m.class, m.interval_start_ms, m.interval_ms)
                .or_else(|| {
                    let (served, mirrored) = totals.get(&m.class).copied().unwrap_or_default();
                    crate::mirror::class_weight(served, mirrored)
                })
                .unwrap_or(1.0),
        })
        .collect();
    // Relative to the lightest class of each shadow type, so scaled counts only grow.
    let mut lightest: HashMap<&str, f64> = HashMap::new();
    for (m, w) in measurements.iter().zip(&weights) {
        if m.role == Role::Shadow {
            let entry = lightest.entry(m.vm_type.as_str()).or_insert(*w);
            *entry = entry.min(*w);
        }
    }
    for (m, w) in measurements.iter().zip(weights.iter_mut()) {
        if m.role == Role::Shadow {
            *w /= lightest[m.vm_type.as_str()].max(f64::MIN_POSITIVE);
        }
    }
    weights
}

/// `h` with every count multiplied by `factor` (at least 1 where there was one).
pub fn scaled(h: &Histogram<u64>, factor: f64) -> Histogram<u64> {
    let mut out = new_histogram();
    for v in h.iter_recorded() {
        let n = (v.count_at_value() as f64 * factor).round().max(1.0) as u64;
        let _ = out.record_n(v.value_iterated_to(), n);
    }
    out
}

/// [`compare`], with each shadow class weighted by live's share of it (see the module docs):
/// `live_mirrored` are live's mirrored-flow exchange counts per class and interval.
#[expect(
    clippy::too_many_arguments,
    reason = "compare's arguments and the one it adds; the plain form stays the common call"
)]
pub fn compare_weighted(
    workload: &str,
    now_ms: i64,
    window_ms: i64,
    percentile: f64,
    config: &CompareConfig,
    prices: &HashMap<String, f64>,
    measurements: &[Measurement],
    live_mirrored: &[LiveMirrored],
) -> Comparison {
    let since = now_ms.saturating_sub(window_ms);
    let in_window: Vec<&Measurement> = measurements
        .iter()
        .filter(|m| (since..now_ms).contains(&m.interval_start_ms))
        .collect();
    let weights = shadow_weights(&in_window, live_mirrored);
    let mut types: BTreeMap<(Role, String), TypeAcc<'_>> = BTreeMap::new();
    for (m, &weight) in in_window.iter().copied().zip(&weights) {
        let acc = types.entry((m.role, m.vm_type.clone())).or_default();
        let weighted: Cow<'_, Histogram<u64>> = if (weight - 1.0).abs() > 1e-9 {
            Cow::Owned(scaled(&m.histogram, weight))
        } else {
            Cow::Borrowed(&m.histogram)
        };
        merge(acc.all.get_or_insert_with(new_histogram), &weighted);
        acc.all_exchanges += m.histogram.len();
        merge(
            acc.classes.entry(m.class).or_insert_with(new_histogram),
            &m.histogram,
        );
        match acc.intervals.entry((m.agent.as_str(), m.interval_start_ms)) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert((m.interval_ms, m.report_errors, weighted, m.histogram.len()));
            }
            std::collections::btree_map::Entry::Occupied(mut e) => {
                let entry = e.get_mut();
                entry.3 += m.histogram.len();
                let merged = &mut entry.2;
                if let Cow::Borrowed(first) = merged {
                    let mut h = new_histogram();
                    merge(&mut h, first);
                    *merged = Cow::Owned(h);
                }
                merge(merged.to_mut(), &weighted);
            }
        }
    }

    let mut summaries = Vec::new();
    let mut points: HashMap<(Role, String), Vec<Point<'_>>> = HashMap::new();
    for ((role, vm_type), acc) in &types {
        let seconds: f64 = acc
            .intervals
            .values()
            .map(|(ms, _, _, _)| *ms as f64 / 1e3)
            .sum();
        let errors: u64 = acc.intervals.values().map(|(_, e, _, _)| e).sum();
        let all = acc.all.as_ref().map(|h| {
            // Counts are what was served; only the percentiles are weighted.
            let mut st = stats(h, seconds, Some(errors));
            st.exchanges = acc.all_exchanges;
            st.exchanges_per_s = if seconds > 0.0 {
                acc.all_exchanges as f64 / seconds
            } else {
                0.0
            };
            st.error_rate = Some(if acc.all_exchanges > 0 {
                errors as f64 / acc.all_exchanges as f64
            } else {
                0.0
            });
            st
        });
        let classes = acc
            .classes
            .iter()
            .map(|(class, h)| (*class, stats(h, seconds, None)))
            .collect();
        summaries.push(TypeSummary {
            vm_type: vm_type.clone(),
            role: *role,
            price_per_hour: prices.get(vm_type).copied(),
            all: all.unwrap_or_default(),
            at_percentile_ms: acc.all.as_ref().map_or(0.0, |h| quantile_ms(h, percentile)),
            classes,
        });
        points.insert(
            (*role, vm_type.clone()),
            acc.intervals
                .values()
                .filter(|(ms, _, _, n)| *ms > 0 && *n >= config.min_exchanges_per_interval)
                .map(|(ms, errors, h, n)| Point {
                    load_per_s: *n as f64 * 1e3 / *ms as f64,
                    histogram: h.as_ref(),
                    exchanges: *n,
                    errors: *errors,
                })
                .collect(),
        );
    }
    let live_vm_type = summaries
        .iter()
        .find(|s| s.role == Role::Live)
        .map(|s| s.vm_type.clone());
    let live_points: Vec<&Point<'_>> = points
        .iter()
        .filter(|((role, _), _)| *role == Role::Live)
        .flat_map(|(_, p)| p)
        .collect();
    let live_loads: Vec<f64> = live_points.iter().map(|p| p.load_per_s).collect();
    let live_peak = live_loads.iter().copied().fold(0.0, f64::max);
    let at_peak = |l: usize| live_loads[l] >= live_peak * (1.0 - config.load_tolerance);
    let live_price = live_vm_type.as_ref().and_then(|t| prices.get(t)).copied();

    let mut ranking: Vec<Ranked> = summaries
        .iter()
        .filter(|s| s.role == Role::Shadow)
        .map(|s| {
            let shadow_points = &points[&(Role::Shadow, s.vm_type.clone())];
            let shadow_loads: Vec<f64> = shadow_points.iter().map(|p| p.load_per_s).collect();
            let pairs = match_by_load(&live_loads, &shadow_loads, config.load_tolerance);
            let mut live_merged = new_histogram();
            let mut shadow_merged = new_histogram();
            let differences: Vec<f64> = pairs
                .iter()
                .map(|&(l, sh)| {
                    let (l, sh) = (live_points[l], &shadow_points[sh]);
                    merge(&mut live_merged, l.histogram);
                    merge(&mut shadow_merged, sh.histogram);
                    quantile_ms(sh.histogram, percentile) - quantile_ms(l.histogram, percentile)
                })
                .collect();
            let (mean_ms, ci_low_ms, ci_high_ms, confidence_faster) =
                paired_difference(&differences);
            let n = pairs.len().max(1) as f64;
            let difference = PairedDifference {
                pairs: pairs.len(),
                mean_ms,
                ci_low_ms,
                ci_high_ms,
                confidence_faster,
                live_load_per_s: pairs.iter().map(|&(l, _)| live_loads[l]).sum::<f64>() / n,
                shadow_load_per_s: pairs.iter().map(|&(_, s)| shadow_loads[s]).sum::<f64>() / n,
            };
            let verdict = if pairs.len() < config.min_pairs {
                Verdict::InsufficientEvidence
            } else if ci_high_ms < 0.0 {
                Verdict::Faster
            } else if ci_low_ms > 0.0 {
                Verdict::Slower
            } else {
                Verdict::Inconclusive
            };
            let mut peak_merged = new_histogram();
            let mut peak_pairs = 0;
            for &(_, sh) in pairs.iter().filter(|(l, _)| at_peak(*l)) {
                merge(&mut peak_merged, shadow_points[sh].histogram);
                peak_pairs += 1;
            }
            // Each matched shadow interval once, however many live intervals it paired with.
            let matched: std::collections::BTreeSet<usize> =
                pairs.iter().map(|&(_, sh)| sh).collect();
            let (failed, measured) = matched.iter().fold((0, 0), |(f, n), &i| {
                let p = &shadow_points[i];
                (f + p.errors, n + p.exchanges)
            });
            Ranked {
                vm_type: s.vm_type.clone(),
                error_rate_at_load: (measured > 0).then(|| failed as f64 / measured as f64),
                verdict,
                difference,
                shadow_at_load_ms: quantile_ms(&shadow_merged, percentile),
                live_at_load_ms: quantile_ms(&live_merged, percentile),
                cost_delta_per_hour: s.price_per_hour.zip(live_price).map(|(s, l)| s - l),
                shadow_at_peak_ms: (peak_pairs > 0).then(|| quantile_ms(&peak_merged, percentile)),
            }
        })
        .collect();
    ranking.sort_by(|a, b| {
        let evidence = |r: &Ranked| u8::from(r.verdict == Verdict::InsufficientEvidence);
        evidence(a)
            .cmp(&evidence(b))
            .then(a.difference.mean_ms.total_cmp(&b.difference.mean_ms))
            .then(
                a.cost_delta_per_hour
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.cost_delta_per_hour.unwrap_or(f64::INFINITY)),
            )
            .then(a.vm_type.cmp(&b.vm_type))
    });
    Comparison {
        workload: workload.to_owned(),
        computed_ms: now_ms,
        window_ms,
        percentile,
        live_vm_type,
        types: summaries,
        ranking,
        live_peak_load_per_s: live_peak,
        load_tolerance: config.load_tolerance,
    }
}

/// Why a move is advised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// Live breaks its SLO.
    SloBreach,
    /// A shadow type is faster at lower or equal cost.
    FasterAtLowerOrEqualCost,
    /// The load forecast says live will break its SLO within the horizon.
    ForecastBreach,
}

impl Trigger {
    /// The stored reason.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SloBreach => "slo_breach",
            Self::FasterAtLowerOrEqualCost => "faster_at_lower_or_equal_cost",
            Self::ForecastBreach => "forecast_breach",
        }
    }

    /// The trigger a stored reason names ([`Trigger::as_str`] read back).
    pub fn from_reason(reason: &str) -> Option<Self> {
        [
            Self::SloBreach,
            Self::FasterAtLowerOrEqualCost,
            Self::ForecastBreach,
        ]
        .into_iter()
        .find(|t| t.as_str() == reason)
    }

    /// Whether the advice is to escape a broken (or breaking) SLO rather than to save or gain:
    /// the act policy lets such a move follow a move that did not recover the SLO.
    pub fn is_urgent(self) -> bool {
        matches!(self, Self::SloBreach | Self::ForecastBreach)
    }
}

/// The shadow type fails clearly more of its exchanges at matched load than the best shadow
/// type. A type without matched intervals yet still sets the bar with its rate over the window
/// (amplified replays included, so it can only set the bar too high, never too low).
fn failing(comparison: &Comparison, r: &Ranked) -> bool {
    let window_rate = |vm_type: &str| {
        comparison
            .types
            .iter()
            .find(|t| t.vm_type == vm_type && t.role == Role::Shadow)
            .and_then(|t| t.all.error_rate)
    };
    fails_more_than_its_peers(
        r.error_rate_at_load,
        comparison
            .ranking
            .iter()
            .filter_map(|p| p.error_rate_at_load.or_else(|| window_rate(&p.vm_type))),
    )
}

/// The comparison's advice: at most one shadow type to move to, and why. Two rules, checked in
/// this order:
/// - **SLO broken**: live's SLO percentile over the window is above `slo_max_ms`. The cheapest
///   shadow type within budget whose percentile at live's peak load in the window
///   ([`Ranked::shadow_at_peak_ms`]) holds the SLO (the fastest on a price tie); with none
///   measured holding it there, no advice.
/// - **Faster for no more money**: a shadow type is [`Verdict::Faster`] and costs no more than
///   live (both prices known) and is within budget; the fastest is chosen.
///
/// Neither names a type with too little evidence, live's own type, a type over
/// `max_cost_per_hour`, or one failing more of its exchanges than its peers
/// ([`crate::candidates`]).
pub fn advise(
    comparison: &Comparison,
    slo_max_ms: f64,
    max_cost_per_hour: Option<f64>,
) -> Option<(&Ranked, Trigger)> {
    let current = comparison.live_vm_type.as_deref()?;
    let live = comparison.types.iter().find(|t| t.role == Role::Live)?;
    let price = |vm_type: &str| {
        comparison
            .types
            .iter()
            .find(|t| t.vm_type == vm_type && t.role == Role::Shadow)
            .and_then(|t| t.price_per_hour)
    };
    let eligible = comparison
        .ranking
        .iter()
        .filter(|r| r.verdict != Verdict::InsufficientEvidence)
        // A shadow of the type live already runs on is evidence, never a move.
        .filter(|r| r.vm_type != current)
        .filter(|r| within_budget(max_cost_per_hour, price(&r.vm_type)))
        .filter(|r| !failing(comparison, r));
    if live.all.exchanges > 0 && live.at_percentile_ms > slo_max_ms {
        let at_peak = |r: &Ranked| r.shadow_at_peak_ms.unwrap_or(f64::INFINITY);
        eligible
            .filter(|r| at_peak(r) <= slo_max_ms)
            .min_by(|a, b| {
                a.cost_delta_per_hour
                    .unwrap_or(f64::INFINITY)
                    .total_cmp(&b.cost_delta_per_hour.unwrap_or(f64::INFINITY))
                    .then(at_peak(a).total_cmp(&at_peak(b)))
            })
            .map(|r| (r, Trigger::SloBreach))
    } else {
        // The ranking is best first.
        eligible
            .filter(|r| r.verdict == Verdict::Faster)
            .find(|r| r.cost_delta_per_hour.is_some_and(|d| d <= 0.0))
            .map(|r| (r, Trigger::FasterAtLowerOrEqualCost))
    }
}

#[cfg(test)]
mod tests;
