//! Coverage: how well what a shadow received stands for live's pattern mix. The same two figures
//! `cargo xtask eval mirror` scores (its `mix_divergence` and `rare_recall`), computed from what
//! was measured: live's pattern counts against the pattern keys of the flows a shadow replayed,
//! each reweighted by its class's live-to-mirrored ratio.
//!
//! Two approximations against the eval, both because the store keeps a report's counts, not its
//! flows: the ratio is the window's (the eval and the comparison take it per interval, which
//! counts a pattern bunched in the intervals the bucket cut hardest fully), and live's pattern
//! counts are estimated from the inspected flows (one in `pattern_sample_one_in`), so a pattern
//! near [`RARE_MIN_LIVE_FLOWS`] may count in one window and not the next.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
};

use super::{MirrorPlan, class_weight, rule_for_pattern};

/// A pattern counts for rare recall once live served at least this many of its flows.
pub const RARE_MIN_LIVE_FLOWS: f64 = 10.0;
/// A counted pattern is recalled once at least this many of its flows were mirrored.
pub const RARE_MIN_MIRRORED: u64 = 3;

/// Jensen-Shannon divergence in bits (0 = the same mix, 1 = disjoint) between two weightings of
/// the same keys; 1 when either is empty.
pub fn js_divergence_bits<K: Hash + Eq>(a: &HashMap<K, f64>, b: &HashMap<K, f64>) -> f64 {
    let (sa, sb): (f64, f64) = (a.values().sum(), b.values().sum());
    if sa <= 0.0 || sb <= 0.0 {
        return 1.0;
    }
    let kl_part = |p: f64, m: f64| if p > 0.0 { p * (p / m).log2() } else { 0.0 };
    let term = |p: f64, q: f64| {
        let m = 0.5 * (p + q);
        0.5 * kl_part(p, m) + 0.5 * kl_part(q, m)
    };
    let in_a: f64 = a
        .iter()
        .map(|(k, &n)| term(n / sa, b.get(k).copied().unwrap_or(0.0) / sb))
        .sum();
    let only_b: f64 = b
        .iter()
        .filter(|(k, _)| !a.contains_key(*k))
        .map(|(_, &n)| term(0.0, n / sb))
        .sum();
    in_a + only_b
}

/// Rare recall's counts over one window: (patterns live served at least
/// [`RARE_MIN_LIVE_FLOWS`] flows of, those of them mirrored at least [`RARE_MIN_MIRRORED`]
/// times).
pub fn rare_recall_counts<K: Hash + Eq>(
    live: &HashMap<K, f64>,
    mirrored: &HashMap<K, u64>,
) -> (usize, usize) {
    let counted: Vec<&K> = live
        .iter()
        .filter(|(_, n)| **n >= RARE_MIN_LIVE_FLOWS)
        .map(|(k, _)| k)
        .collect();
    let recalled = counted
        .iter()
        .filter(|k| mirrored.get(**k).copied().unwrap_or(0) >= RARE_MIN_MIRRORED)
        .count();
    (counted.len(), recalled)
}

/// One pattern's place in live's mix and in a shadow's sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PatternCoverage {
    /// Pattern key.
    pub pattern: String,
    /// The class the plan puts it in.
    pub class: u16,
    /// Live's flows of it in the window (estimated from the inspected ones).
    pub live_flows: f64,
    /// Its share of live's flows.
    pub live_share: f64,
    /// Flows of it the shadow received and began to replay (a flow whose requests the
    /// replayer's method filter then skips still counts).
    pub mirrored_flows: u64,
    /// Its share of the shadow's flows.
    pub mirrored_share: f64,
    /// Its share of the shadow's flows weighted by class as the comparison weighs them: what
    /// should match `live_share`.
    pub reweighted_share: f64,
}

/// A shadow's coverage of live's mix over one window.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Coverage {
    /// Jensen-Shannon divergence (bits) between live's mix and the reweighted sample; `None`
    /// before either side has flows.
    pub mix_divergence: Option<f64>,
    /// Share of the patterns live served at least 10 flows of that the shadow replayed at
    /// least 3 times; `None` when no pattern reached 10 flows.
    pub rare_recall: Option<f64>,
    /// Live's flows in the window (estimated).
    pub live_flows: f64,
    /// Flows the shadow received and began to replay in the window.
    pub mirrored_flows: u64,
    /// Every pattern either side saw, live's most frequent first.
    pub patterns: Vec<PatternCoverage>,
}

/// The coverage of live's mix (`live`: flows per pattern key) by what a shadow replayed
/// (`mirrored`: flows per pattern key), with live's flows and mirrored flows per class
/// (`classes`: class -> (flows, mirrored)) over the same window. A pattern's class is the one
/// `plan` puts its key's rule in (class 0 without a rule), so a window the plan changed in is
/// reweighted by its newest classes.
pub fn coverage(
    plan: &MirrorPlan,
    live: &[(String, f64)],
    mirrored: &[(String, u64)],
    classes: &BTreeMap<u16, (u64, u64)>,
) -> Coverage {
    let class_of = |key: &str| {
        rule_for_pattern(key)
            .map(|spec| plan.classify(&spec.prefix))
            .unwrap_or(0)
    };
    // A class the shadow replayed but live reported nothing mirrored of in the window (its
    // reports not in yet, or a plan that moved the pattern) weighs as much as it was sampled,
    // the comparison's fallback, rather than vanishing from the mix.
    let weight = |class: u16| {
        classes
            .get(&class)
            .and_then(|&(flows, mirrored)| class_weight(flows, mirrored))
            .unwrap_or(1.0)
    };
    let live_map: HashMap<&str, f64> = live.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let mirrored_map: HashMap<&str, u64> = mirrored.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let mut keys: Vec<&str> = live_map
        .keys()
        .chain(mirrored_map.keys())
        .copied()
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let class: HashMap<&str, u16> = keys.iter().map(|k| (*k, class_of(k))).collect();
    let reweighted: HashMap<&str, f64> = mirrored_map
        .iter()
        .map(|(k, &n)| (*k, n as f64 * weight(class[k])))
        .collect();
    let live_total: f64 = live_map.values().sum();
    let mirrored_total: u64 = mirrored_map.values().sum();
    let reweighted_total: f64 = reweighted.values().sum();
    let share = |n: f64, total: f64| if total > 0.0 { n / total } else { 0.0 };
    let mut patterns: Vec<PatternCoverage> = keys
        .iter()
        .map(|k| {
            let live_flows = live_map.get(k).copied().unwrap_or(0.0);
            let mirrored_flows = mirrored_map.get(k).copied().unwrap_or(0);
            PatternCoverage {
                pattern: (*k).to_owned(),
                class: class[k],
                live_flows,
                live_share: share(live_flows, live_total),
                mirrored_flows,
                mirrored_share: share(mirrored_flows as f64, mirrored_total as f64),
                reweighted_share: share(
                    reweighted.get(k).copied().unwrap_or(0.0),
                    reweighted_total,
                ),
            }
        })
        .collect();
    patterns.sort_by(|a, b| {
        b.live_flows
            .total_cmp(&a.live_flows)
            .then(b.mirrored_flows.cmp(&a.mirrored_flows))
            .then_with(|| a.pattern.cmp(&b.pattern))
    });
    let (counted, recalled) = rare_recall_counts(&live_map, &mirrored_map);
    Coverage {
        mix_divergence: (live_total > 0.0 && reweighted_total > 0.0)
            .then(|| js_divergence_bits(&live_map, &reweighted)),
        rare_recall: (counted > 0).then(|| recalled as f64 / counted as f64),
        live_flows: live_total,
        mirrored_flows: mirrored_total,
        patterns,
    }
}
