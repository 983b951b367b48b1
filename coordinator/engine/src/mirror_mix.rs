//! Mirror-mix steering: per-class sample rates so the mirrored traffic looks like the live traffic
//! (the shadows must be judged on what production really does), except that stress patterns —
//! named by the user, or learned as the slowest or heaviest classes — are oversampled by a policy
//! factor, all within the mirror budget. The result is the classes of an agent policy update and
//! the distances achieved.
//!
//! Sampling is per flow, by a hash against the class's rate, so the expected mirrored share of a
//! class is proportional to `live share × rate`. Giving every typical class the same rate keeps
//! their mix exactly; the one degree of freedom left is the common rate, the largest the budget
//! allows once stress classes take their multiple. What can still distort the mix is chance: a
//! few hundred mirrored flows per interval cannot show a 0.1 % class faithfully. The expected
//! total variation distance from that sampling noise is reported, so a budget too small to judge
//! typical behaviour is visible rather than silent.

use doppel_common::wire::{AgentPolicy, ClassPolicy, PolicyUpdate};

/// Live statistics of one traffic class.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternStats {
    /// Class number in the agent policy.
    pub class: u16,
    /// Folded pattern name, e.g. `GET /api/items/{id}`.
    pub name: String,
    /// New flows per second in live traffic.
    pub flows_per_s: f64,
    /// Mean bytes a mirrored flow of this class costs (client bytes, both directions of VXLAN).
    pub bytes_per_flow: f64,
    /// The class's latency quantile (e.g. p99) on the live instance, in ms.
    pub latency_ms: f64,
}

/// How the mirrored mix is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorMixPolicy {
    /// Mirror budget in bytes per second.
    pub budget_bytes_per_s: f64,
    /// Classes the user names as stress patterns.
    pub stress_patterns: Vec<String>,
    /// Also learn this many stress classes: the slowest, then the heaviest.
    pub learned_stress: usize,
    /// A learned stress class must be at least this many times slower (or heavier) than the
    /// traffic's median class.
    pub stress_ratio: f64,
    /// Stress classes are mirrored at this multiple of the typical rate.
    pub stress_factor: f64,
    /// Interval (s) over which the mirrored mix is judged, for the sampling-noise estimate.
    pub interval_secs: f64,
}

impl Default for MirrorMixPolicy {
    fn default() -> Self {
        Self {
            budget_bytes_per_s: 10.0e6,
            stress_patterns: Vec::new(),
            learned_stress: 2,
            stress_ratio: 2.0,
            stress_factor: 4.0,
            interval_secs: 600.0,
        }
    }
}

/// Why a mix cannot be computed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MirrorMixError {
    /// No class has live traffic.
    #[error("no traffic class has live flows")]
    NoTraffic,
    /// A class's statistics are unusable.
    #[error("class {class}: {reason}")]
    BadClass {
        /// Class number.
        class: u16,
        /// What is wrong.
        reason: &'static str,
    },
    /// A policy field is out of range.
    #[error("mirror-mix policy field `{field}`: {reason}")]
    BadPolicy {
        /// The field.
        field: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Why a class is oversampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StressReason {
    /// The user named it.
    Named,
    /// Its latency is far above the median class's.
    Slowest,
    /// Its flows are far heavier than the median class's.
    Heaviest,
}

/// The chosen mix.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorMix {
    /// Per-class rates, as the agent policy carries them.
    pub classes: Vec<ClassPolicy>,
    /// Oversampled classes, why, and the factor over the typical rate actually achieved (less
    /// than the policy's when a class is mirrored whole).
    pub stress: Vec<(u16, StressReason, f64)>,
    /// Expected total variation distance between the live mix of typical classes and their
    /// mirrored mix, from the rates alone (0 unless rates had to be rounded or capped).
    pub typical_tvd: f64,
    /// Expected total variation distance over one interval once sampling noise is counted.
    pub typical_tvd_sampled: f64,
    /// Mirrored flows per second.
    pub mirrored_flows_per_s: f64,
    /// Mirrored bytes per second (at most the budget).
    pub mirrored_bytes_per_s: f64,
}

impl MirrorMix {
    /// The agent policy with this mix's class rates, as the next policy update.
    pub fn policy_update(&self, revision: u64, base: &AgentPolicy) -> PolicyUpdate {
        let mut policy = base.clone();
        for class in &self.classes {
            match policy.classes.iter_mut().find(|c| c.id == class.id) {
                Some(existing) => existing.sample_rate_ppm = class.sample_rate_ppm,
                None => policy.classes.push(class.clone()),
            }
        }
        PolicyUpdate { revision, policy }
    }
}

const PPM: f64 = 1_000_000.0;

/// Chooses per-class sample rates.
pub fn steer(
    patterns: &[PatternStats],
    policy: &MirrorMixPolicy,
) -> Result<MirrorMix, MirrorMixError> {
    if !(policy.budget_bytes_per_s >= 0.0 && policy.budget_bytes_per_s.is_finite()) {
        return Err(MirrorMixError::BadPolicy {
            field: "budget_bytes_per_s",
            reason: "must be a non-negative number",
        });
    }
    if !(policy.stress_factor >= 1.0 && policy.stress_factor.is_finite()) {
        return Err(MirrorMixError::BadPolicy {
            field: "stress_factor",
            reason: "must be at least 1",
        });
    }
    for p in patterns {
        let bad = |reason| {
            Err(MirrorMixError::BadClass {
                class: p.class,
                reason,
            })
        };
        if !(p.flows_per_s >= 0.0 && p.flows_per_s.is_finite()) {
            return bad("flows_per_s must be a non-negative number");
        }
        if !(p.bytes_per_flow > 0.0 && p.bytes_per_flow.is_finite()) {
            return bad("bytes_per_flow must be positive");
        }
        if !(p.latency_ms >= 0.0 && p.latency_ms.is_finite()) {
            return bad("latency_ms must be a non-negative number");
        }
    }
    let total_flows: f64 = patterns.iter().map(|p| p.flows_per_s).sum();
    if total_flows <= 0.0 {
        return Err(MirrorMixError::NoTraffic);
    }
    let stress = stress_classes(patterns, policy, total_flows);
    let weight = |p: &PatternStats| {
        if stress.iter().any(|(c, _)| *c == p.class) {
            policy.stress_factor
        } else {
            1.0
        }
    };
    let cost = |s: f64| -> f64 {
        patterns
            .iter()
            .map(|p| p.flows_per_s * p.bytes_per_flow * (s * weight(p)).min(1.0))
            .sum()
    };
    // The largest common rate the budget allows; cost is monotone in it, so bisect.
    let (mut lo, mut hi) = (0.0, 1.0);
    if cost(hi) <= policy.budget_bytes_per_s {
        lo = hi;
    } else {
        for _ in 0..64 {
            let mid = f64::midpoint(lo, hi);
            if cost(mid) <= policy.budget_bytes_per_s {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
    let common = lo;
    // Rates in ppm, rounded down so the budget holds; a class with traffic keeps at least 1 ppm
    // when the budget allows any mirroring, so it is never silently absent from the shadows.
    let rates: Vec<u32> = patterns
        .iter()
        .map(|p| {
            let ppm = ((common * weight(p)).min(1.0) * PPM).floor() as u32;
            if common > 0.0 && p.flows_per_s > 0.0 {
                ppm.max(1)
            } else {
                ppm
            }
        })
        .collect();
    let classes: Vec<ClassPolicy> = patterns
        .iter()
        .zip(&rates)
        .map(|(p, &rate)| ClassPolicy {
            id: p.class,
            name: p.name.clone(),
            sample_rate_ppm: rate,
            // Stress classes first when rules of several classes match a flow.
            priority: if weight(p) > 1.0 { 1 } else { 0 },
        })
        .collect();
    let mirrored = |p: &PatternStats, rate: u32| p.flows_per_s * f64::from(rate) / PPM;
    let mirrored_flows_per_s: f64 = patterns
        .iter()
        .zip(&rates)
        .map(|(p, &r)| mirrored(p, r))
        .sum();
    let mirrored_bytes_per_s: f64 = patterns
        .iter()
        .zip(&rates)
        .map(|(p, &r)| mirrored(p, r) * p.bytes_per_flow)
        .sum();
    // Typical classes: live shares and mirrored shares, each renormalised among themselves.
    let typical: Vec<(f64, f64)> = patterns
        .iter()
        .zip(&rates)
        .filter(|(p, _)| weight(p) == 1.0)
        .map(|(p, &r)| (p.flows_per_s, mirrored(p, r)))
        .collect();
    let live_sum: f64 = typical.iter().map(|t| t.0).sum();
    let mirror_sum: f64 = typical.iter().map(|t| t.1).sum();
    let (typical_tvd, typical_tvd_sampled) = if live_sum > 0.0 && mirror_sum > 0.0 {
        let n = mirror_sum * policy.interval_secs;
        let tvd = 0.5
            * typical
                .iter()
                .map(|(l, m)| (l / live_sum - m / mirror_sum).abs())
                .sum::<f64>();
        // E|p̂ − p| for a binomial share over n draws is about √(2p(1−p)/(πn)); it cannot
        // exceed the share itself (a class is absent at worst).
        let noise = 0.5
            * typical
                .iter()
                .map(|(_, m)| {
                    let q = m / mirror_sum;
                    (2.0 * q * (1.0 - q) / (std::f64::consts::PI * n.max(1.0)))
                        .sqrt()
                        .min(2.0 * q)
                })
                .sum::<f64>();
        (tvd, (tvd + noise).min(1.0))
    } else {
        // Nothing typical mirrored (or nothing typical at all).
        (
            if live_sum > 0.0 { 1.0 } else { 0.0 },
            if live_sum > 0.0 { 1.0 } else { 0.0 },
        )
    };
    let typical_rate = patterns
        .iter()
        .zip(&rates)
        .find(|(p, _)| weight(p) == 1.0)
        .map(|(_, &r)| f64::from(r));
    let stress = stress
        .into_iter()
        .map(|(class, reason)| {
            let rate = patterns
                .iter()
                .zip(&rates)
                .find(|(p, _)| p.class == class)
                .map_or(0.0, |(_, &r)| f64::from(r));
            let achieved = typical_rate.map_or(policy.stress_factor, |t| {
                if t > 0.0 {
                    rate / t
                } else {
                    policy.stress_factor
                }
            });
            (class, reason, achieved)
        })
        .collect();
    Ok(MirrorMix {
        classes,
        stress,
        typical_tvd,
        typical_tvd_sampled,
        mirrored_flows_per_s,
        mirrored_bytes_per_s,
    })
}

/// A per-class quantity stress is judged on.
type Measure<'a> = dyn Fn(&PatternStats) -> f64 + 'a;

/// Named stress classes, then up to `learned_stress` learned ones: the slowest first, then the
/// heaviest, each well above the flow-weighted median class.
fn stress_classes(
    patterns: &[PatternStats],
    policy: &MirrorMixPolicy,
    total_flows: f64,
) -> Vec<(u16, StressReason)> {
    let mut stress: Vec<(u16, StressReason)> = patterns
        .iter()
        .filter(|p| policy.stress_patterns.contains(&p.name))
        .map(|p| (p.class, StressReason::Named))
        .collect();
    let median = |key: &dyn Fn(&PatternStats) -> f64| {
        let mut v: Vec<(f64, f64)> = patterns.iter().map(|p| (key(p), p.flows_per_s)).collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut seen = 0.0;
        for (value, flows) in &v {
            seen += flows;
            if seen >= total_flows / 2.0 {
                return *value;
            }
        }
        v.last().map_or(0.0, |x| x.0)
    };
    let latency_median = median(&|p| p.latency_ms);
    let bytes_median = median(&|p| p.bytes_per_flow);
    let mut learned = 0;
    let reasons: [(StressReason, &Measure<'_>, f64); 2] = [
        (StressReason::Slowest, &|p| p.latency_ms, latency_median),
        (StressReason::Heaviest, &|p| p.bytes_per_flow, bytes_median),
    ];
    for (reason, key, median) in reasons {
        let mut candidates: Vec<&PatternStats> = patterns
            .iter()
            .filter(|p| p.flows_per_s > 0.0 && key(p) >= policy.stress_ratio * median)
            .filter(|p| !stress.iter().any(|(c, _)| *c == p.class))
            .collect();
        candidates.sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.class.cmp(&b.class)));
        for p in candidates {
            if learned >= policy.learned_stress {
                break;
            }
            stress.push((p.class, reason));
            learned += 1;
        }
    }
    stress
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn class(class: u16, flows: f64, bytes: f64, latency: f64) -> PatternStats {
        PatternStats {
            class,
            name: format!("pattern-{class}"),
            flows_per_s: flows,
            bytes_per_flow: bytes,
            latency_ms: latency,
        }
    }

    #[test]
    fn typical_mix_is_kept_and_stress_is_oversampled_within_budget() {
        let patterns = vec![
            class(1, 500.0, 2_000.0, 20.0),
            class(2, 300.0, 2_000.0, 25.0),
            class(3, 150.0, 4_000.0, 30.0),
            class(4, 40.0, 3_000.0, 400.0), // slow: learned
            class(5, 10.0, 90_000.0, 35.0), // heavy: learned
        ];
        let policy = MirrorMixPolicy {
            budget_bytes_per_s: 200_000.0,
            ..MirrorMixPolicy::default()
        };
        let mix = steer(&patterns, &policy).unwrap();
        assert!(mix.mirrored_bytes_per_s <= policy.budget_bytes_per_s);
        assert!(mix.mirrored_bytes_per_s > 0.95 * policy.budget_bytes_per_s);
        assert!(mix.typical_tvd < 1e-3, "{}", mix.typical_tvd);
        assert!(
            mix.typical_tvd_sampled <= 0.05,
            "{}",
            mix.typical_tvd_sampled
        );
        let reasons: Vec<(u16, StressReason)> = mix.stress.iter().map(|s| (s.0, s.1)).collect();
        assert_eq!(
            reasons,
            vec![(4, StressReason::Slowest), (5, StressReason::Heaviest)]
        );
        for (_, _, factor) in &mix.stress {
            assert!((factor - 4.0).abs() < 0.01, "{factor}");
        }
        let update = mix.policy_update(7, &AgentPolicy::default());
        assert_eq!(update.revision, 7);
        assert_eq!(update.policy.classes.len(), 5);
    }

    #[test]
    fn named_stress_comes_first_and_tiny_budgets_are_visible() {
        let patterns = vec![class(1, 500.0, 2_000.0, 20.0), class(2, 2.0, 2_000.0, 20.0)];
        let policy = MirrorMixPolicy {
            budget_bytes_per_s: 2_000.0,
            stress_patterns: vec!["pattern-2".into()],
            ..MirrorMixPolicy::default()
        };
        let mix = steer(&patterns, &policy).unwrap();
        assert_eq!(mix.stress[0].1, StressReason::Named);
        // One flow a second mirrored: the typical mix is exact in expectation only.
        assert!(mix.mirrored_flows_per_s < 1.1);
        assert_eq!(
            steer(&[class(1, 0.0, 1.0, 1.0)], &policy),
            Err(MirrorMixError::NoTraffic)
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Within budget; stress never below typical; typical mix within 0.05 when the budget
        /// mirrors a reasonable number of flows; identical inputs, identical output.
        #[test]
        fn mixes_hold_their_invariants(
            raw in prop::collection::vec((0.1f64..1000.0, 100.0f64..100_000.0, 1.0f64..1000.0), 1..12),
            budget in 1.0e5f64..1.0e8,
            factor in 1.0f64..10.0,
        ) {
            let patterns: Vec<PatternStats> = raw
                .iter()
                .enumerate()
                .map(|(i, &(f, b, l))| class(i as u16, f, b, l))
                .collect();
            let policy = MirrorMixPolicy {
                budget_bytes_per_s: budget,
                stress_factor: factor,
                ..MirrorMixPolicy::default()
            };
            let mix = steer(&patterns, &policy).unwrap();
            // The 1 ppm floor may add a hair over budget only when the budget is below it.
            prop_assert!(mix.mirrored_bytes_per_s <= budget * (1.0 + 1e-9) + 1e-3);
            prop_assert!(mix.typical_tvd < 0.01, "rates alone distort {}", mix.typical_tvd);
            if mix.mirrored_flows_per_s * policy.interval_secs >= 10_000.0 {
                prop_assert!(mix.typical_tvd_sampled <= 0.05, "{}", mix.typical_tvd_sampled);
            }
            for (_, _, achieved) in &mix.stress {
                prop_assert!(*achieved >= 0.99);
            }
            prop_assert_eq!(steer(&patterns, &policy).unwrap(), mix);
        }
    }
}
