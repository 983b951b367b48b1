//! Learned mirroring: which classes and rules the live agents classify flows with, and how much
//! of each class they mirror, steered every report interval from the pattern mix the agents see.
//!
//! # What it does
//! [`MirrorPlanner`] keeps, per workload, a smoothed rate of every pattern key the live agents
//! report (`GET /api/items/{n}`, `resp GET`, …) and turns it into an agent policy's classes,
//! rules and sample rates ([`MirrorPlan`]), within the data path's limits (16 classes, 64
//! rules):
//! - **head** classes, one per pattern that carries at least [`MirrorSettings::head_min_share`]
//!   of the flows, so each has its own latency series; a head whose latency is far above the
//!   other heads' is *costly* and mirrored at [`MirrorSettings::costly_factor`] times the
//!   typical rate;
//! - **boost** classes at fixed rates (1, 1/2, 1/4, 1/8): a pattern too rare for the typical
//!   rate to show it [`MirrorSettings::rare_target_per_hour`] times an hour joins the boost class
//!   whose rate does, and a pattern first seen less than [`MirrorSettings::new_pattern_secs`]
//!   ago is mirrored whole;
//! - an **excluded** class (rate 0) for patterns the operator never wants replayed;
//! - class 0, everything no rule matches, at the typical rate.
//!
//! Classes keep their meaning: a head class belongs to its pattern until the pattern falls below
//! half the entry share, and a freed class number rests for [`MirrorSettings::class_rest_secs`]
//! before it names another pattern, so no histogram mixes two meanings within that time. A boost
//! class always means "mirrored at this rate". Classes the operator wrote with patterns are
//! pinned: their rules, rates and numbers are never touched, and their rules win over learned
//! ones.
//!
//! # How much is mirrored
//! The typical rate is the one that fills the mirror budget at the *reference load*, a high
//! quantile ([`MirrorSettings::peak_quantile`]) of the last day's load: off-peak the shadows get
//! proportionally less, and at live's peaks they get the whole budget, which is what decides
//! whether a VM type copes. The budget is also a hard limit where the flows are sampled (a token
//! bucket in the data path, modelled by [`FlowBucket`]), so a burst between two plans, or a
//! coordinator that stops planning, never pushes the mirrored volume over it. Boost classes are
//! sent as `budget_priority`: common traffic that saturates the bucket leaves them a reserve,
//! which they take within a lane of 15 % of the budget.
//!
//! # Unbiased comparison
//! A class mirrored at a higher rate is over-represented among the shadow's exchanges. Every
//! comparison therefore weights a class by live's flows over the mirrored flows of that class
//! in the same interval ([`class_weight`]), which makes the reweighted mirrored mix an unbiased
//! estimate of live's, whatever each class's rate was and whatever the token bucket cut.
//!
//! # Rules from pattern keys
//! A rule compares a flow's first payload bytes with a masked prefix ([`rule_for_pattern`]): an
//! HTTP template up to its first placeholder (`GET /api/items/{n}` -> `GET /api/items/`), a
//! RESP command with its argument count masked and its letters case-insensitive, a text
//! protocol's leading token, a binary protocol's two leading bytes. Two patterns whose prefixes
//! agree cannot be told apart by the data path and share a rule. [`classify`] is the data path's
//! rule match, so the offline evaluation classifies flows exactly as the kernel does.

use std::collections::{BTreeMap, HashMap};

use doppel_common::{
    maps::PAYLOAD_MATCH_LEN,
    wire::{ClassPolicy, ClassRule},
};

/// Classes the data path holds.
pub const MAX_CLASSES: usize = doppel_common::maps::MAX_CLASSES as usize;
/// Rules the data path holds.
pub const MAX_RULES: usize = doppel_common::maps::MAX_RULES as usize;

/// The boost classes' sample rates, highest first.
pub const BOOST_LEVELS: [f64; 4] = [1.0, 0.5, 0.25, 0.125];

/// Priority of learned head classes: above every boost class, below pinned classes; a longer
/// prefix adds its length so the more specific of two nested rules wins.
const HEAD_PRIORITY: u16 = 200;
/// Priority of boost classes (plus the level's rank, rarest highest).
const BOOST_PRIORITY: u16 = 100;
/// Time constant of the load the rates are set for, seconds.
const LOAD_SMOOTHING_SECS: f64 = 10.0;
/// Most of the budget boost rules may spend on patterns their prefix matches besides their own.
const MAX_SPILL: f64 = 0.05;
/// Most of the budget the boost classes may take together: the data path's priority lane
/// ([`PRIORITY_SHARE`]), which turns away whatever boosted flows exceed it; a plan that counted
/// on more would cut the typical rate for boosts the kernel then refuses.
const MAX_BOOST_SHARE: f64 = PRIORITY_SHARE;
/// Pinned (operator-written) classes sit above everything learned.
pub const PINNED_PRIORITY: u16 = 1000;

/// A rule as the data path matches it: masked leading payload bytes.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct RuleSpec {
    /// Expected leading bytes, already masked.
    pub prefix: Vec<u8>,
    /// Mask applied to the payload before comparing; same length as `prefix`.
    pub mask: Vec<u8>,
}

impl RuleSpec {
    /// An exact prefix.
    pub fn exact(prefix: &[u8]) -> Self {
        Self {
            prefix: prefix.to_vec(),
            mask: vec![0xff; prefix.len()],
        }
    }

    /// Whether a flow whose first payload bytes are `head` matches (the data path's test).
    pub fn matches(&self, head: &[u8]) -> bool {
        head.len() >= self.prefix.len()
            && self
                .prefix
                .iter()
                .zip(&self.mask)
                .zip(head)
                .all(|((p, m), h)| h & m == *p)
    }
}

fn case_insensitive(bytes: &[u8]) -> RuleSpec {
    let mask: Vec<u8> = bytes
        .iter()
        .map(|b| if b.is_ascii_alphabetic() { 0xdf } else { 0xff })
        .collect();
    let prefix = bytes.iter().zip(&mask).map(|(b, m)| b & m).collect();
    RuleSpec { prefix, mask }
}

/// The rule that matches the flows of a pattern key (as the live agent folds keys), or `None`
/// when the key has no byte prefix to match (`(other)`, `empty`, an HTTP request for a non-path
/// target). Prefixes are cut at the data path's match length.
pub fn rule_for_pattern(key: &str) -> Option<RuleSpec> {
    let mut rule = if let Some(command) = key.strip_prefix("resp ") {
        // `*<argc>\r\n$<len>\r\n<COMMAND>\r\n`: the argument count (one digit) is masked and the
        // command's letters compared without case.
        if command.is_empty() || !command.bytes().all(|b| b.is_ascii_alphabetic()) {
            return None;
        }
        let text = format!("*0\r\n${}\r\n{command}\r\n", command.len());
        let mut rule = case_insensitive(text.as_bytes());
        rule.mask[1] = 0;
        rule.prefix[1] = 0;
        rule
    } else if let Some(hex) = key.strip_prefix("bytes ") {
        let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
            .collect();
        RuleSpec::exact(&bytes.filter(|b| !b.is_empty())?)
    } else if let Some((method, template)) = key.split_once(' ') {
        if !template.starts_with('/') {
            return None;
        }
        let cut = template.find(['{', '…']).unwrap_or(template.len());
        let mut text = format!("{method} {}", &template[..cut]);
        if template == "/" {
            // The root alone: without the space it would match every path.
            text.push(' ');
        }
        RuleSpec::exact(text.as_bytes())
    } else if key != "empty" && key.len() >= 2 && key.bytes().all(|b| b.is_ascii_alphabetic()) {
        case_insensitive(key.as_bytes())
    } else {
        return None;
    };
    rule.prefix.truncate(PAYLOAD_MATCH_LEN);
    rule.mask.truncate(PAYLOAD_MATCH_LEN);
    Some(rule)
}

/// A class of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannedClass {
    /// Class number.
    pub id: u16,
    /// Human name: the pattern of a head class, `boost 1/4`, `excluded`, `default`.
    pub name: String,
    /// Share of the class's flows to mirror, 0..=1.
    pub rate: f64,
    /// Higher wins when rules of several classes match.
    pub priority: u16,
    /// What kind of class it is.
    pub role: ClassRole,
}

/// What a class is for.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ClassRole {
    /// Class 0: flows no rule matches, at the typical rate.
    Default,
    /// One pattern carrying a large share of the flows; `costly` when oversampled for its
    /// latency.
    Head {
        /// The pattern.
        pattern: String,
        /// Mirrored at a multiple of the typical rate for its latency.
        costly: bool,
    },
    /// Rare and new patterns, at a fixed rate.
    Boost,
    /// Patterns never mirrored.
    Excluded,
    /// Written by the operator; never changed.
    Pinned,
}

/// A rule of a plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlannedRule {
    /// Class assigned on match.
    pub class: u16,
    /// What is matched.
    pub spec: RuleSpec,
    /// The pattern keys this rule stands for (several when their prefixes agree).
    pub patterns: Vec<String>,
}

/// An operator-written class, kept as written.
#[derive(Debug, Clone, PartialEq)]
pub struct PinnedClass {
    /// Class number.
    pub id: u16,
    /// Name.
    pub name: String,
    /// Sample rate, 0..=1.
    pub rate: f64,
    /// Its rules.
    pub rules: Vec<RuleSpec>,
}

/// How the planner learns and steers.
#[derive(Debug, Clone, PartialEq)]
pub struct MirrorSettings {
    /// Most mirrored flows per second (each shadow receives every mirrored flow).
    pub budget_flows_per_s: f64,
    /// Time constant of the smoothed pattern rates, seconds.
    pub smoothing_secs: f64,
    /// Quantile of the last day's load the budget is filled at.
    pub peak_quantile: f64,
    /// Off-peak, at least this share of the budget is still used, so every hour has a sample
    /// large enough to show its mix.
    pub offpeak_budget_share: f64,
    /// How much load history the reference load looks at, seconds.
    pub peak_window_secs: f64,
    /// Share of flows that earns a pattern a head class.
    pub head_min_share: f64,
    /// A head whose latency is this many times the median head's is costly.
    pub costly_ratio: f64,
    /// Costly heads are mirrored at this multiple of the typical rate.
    pub costly_factor: f64,
    /// Mirrored flows an hour every pattern should get at least.
    pub rare_target_per_hour: f64,
    /// A pattern this young is mirrored whole.
    pub new_pattern_secs: f64,
    /// A freed class number names no other pattern for this long.
    pub class_rest_secs: f64,
    /// Operator-written classes.
    pub pinned: Vec<PinnedClass>,
    /// Patterns pinned to a head class of their own whatever their share.
    pub pinned_patterns: Vec<String>,
    /// Patterns never mirrored.
    pub excluded_patterns: Vec<String>,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        Self {
            budget_flows_per_s: 50.0,
            smoothing_secs: 1800.0,
            peak_quantile: 0.9,
            offpeak_budget_share: 0.5,
            peak_window_secs: 86_400.0,
            head_min_share: 0.02,
            costly_ratio: 2.0,
            costly_factor: 2.0,
            rare_target_per_hour: 8.0,
            new_pattern_secs: 900.0,
            class_rest_secs: 3600.0,
            pinned: Vec::new(),
            pinned_patterns: Vec::new(),
            excluded_patterns: Vec::new(),
        }
    }
}

/// A settings field out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("mirror setting `{field}`: {reason}")]
pub struct BadMirrorSetting {
    /// The field.
    pub field: &'static str,
    /// What is wrong.
    pub reason: &'static str,
}

impl MirrorSettings {
    /// Checks every field, naming the first bad one.
    pub fn validate(&self) -> Result<(), BadMirrorSetting> {
        let positive = |field, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(BadMirrorSetting {
                    field,
                    reason: "must be a positive number",
                })
            }
        };
        positive("budget_flows_per_s", self.budget_flows_per_s)?;
        positive("smoothing_secs", self.smoothing_secs)?;
        positive("peak_window_secs", self.peak_window_secs)?;
        positive("rare_target_per_hour", self.rare_target_per_hour)?;
        if !(self.peak_quantile > 0.0 && self.peak_quantile <= 1.0) {
            return Err(BadMirrorSetting {
                field: "peak_quantile",
                reason: "must be in (0, 1]",
            });
        }
        if !(0.0..=1.0).contains(&self.offpeak_budget_share) {
            return Err(BadMirrorSetting {
                field: "offpeak_budget_share",
                reason: "must be in 0..=1",
            });
        }
        if !(self.head_min_share > 0.0 && self.head_min_share < 1.0) {
            return Err(BadMirrorSetting {
                field: "head_min_share",
                reason: "must be in (0, 1)",
            });
        }
        for (field, v) in [
            ("costly_ratio", self.costly_ratio),
            ("costly_factor", self.costly_factor),
        ] {
            if !(v.is_finite() && v >= 1.0) {
                return Err(BadMirrorSetting {
                    field,
                    reason: "must be at least 1",
                });
            }
        }
        for (field, v) in [
            ("new_pattern_secs", self.new_pattern_secs),
            ("class_rest_secs", self.class_rest_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(BadMirrorSetting {
                    field,
                    reason: "must be a non-negative number",
                });
            }
        }
        if self.pinned.len() >= MAX_CLASSES {
            return Err(BadMirrorSetting {
                field: "pinned",
                reason: "the data path holds 16 classes, and class 0 is the default",
            });
        }
        if self.pinned.iter().any(|p| p.id == 0) {
            return Err(BadMirrorSetting {
                field: "pinned",
                reason: "class 0 is the learned default class",
            });
        }
        if self.pinned.iter().map(|p| p.rules.len()).sum::<usize>() > MAX_RULES {
            return Err(BadMirrorSetting {
                field: "pinned",
                reason: "more rules than the data path's 64",
            });
        }
        Ok(())
    }
}

/// One interval's flows of one pattern, as the live agents reported them.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternObservation {
    /// Pattern key.
    pub pattern: String,
    /// Estimated flows in the interval (the agents' sampled counts scaled up).
    pub flows: f64,
}

/// One interval's latency of one class on live.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassLatency {
    /// Class number.
    pub class: u16,
    /// The class's latency (its median on live), ms.
    pub latency_ms: f64,
}

#[derive(Debug, Clone)]
struct PatternState {
    rule: Option<RuleSpec>,
    /// Smoothed flows per second.
    rate: f64,
    first_seen: f64,
    last_seen: f64,
}

#[derive(Debug, Clone)]
struct HeadClass {
    pattern: String,
    latency_ms: Option<f64>,
}

/// Why a plan mirrors what it does, for the operator.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PatternPlan {
    /// Pattern key.
    pub pattern: String,
    /// Smoothed flows per second on live.
    pub flows_per_s: f64,
    /// Share of live's flows.
    pub share: f64,
    /// The class its flows fall in (by the plan's own rules).
    pub class: u16,
    /// The class's sample rate.
    pub rate: f64,
    /// Seconds since the pattern was first seen.
    pub age_secs: f64,
}

/// Classes, rules and rates for the live agents, and what they are expected to mirror.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MirrorPlan {
    /// Every class, class 0 first.
    pub classes: Vec<PlannedClass>,
    /// Rules, pinned first.
    pub rules: Vec<PlannedRule>,
    /// The typical rate (class 0 and heads).
    pub typical_rate: f64,
    /// Load the budget is filled at, flows/s.
    pub reference_flows_per_s: f64,
    /// Live's smoothed load now, flows/s.
    pub live_flows_per_s: f64,
    /// Mirrored flows/s expected at the current load (before the data path's hard limit).
    pub expected_mirrored_per_s: f64,
    /// The hard limit, flows/s.
    pub budget_flows_per_s: f64,
    /// Patterns, most frequent first.
    pub patterns: Vec<PatternPlan>,
    /// Patterns that wanted a rule of their own but found the data path's rules used up.
    pub patterns_without_rule: usize,
}

impl MirrorPlan {
    /// The class a flow whose first payload bytes are `head` falls in, as the data path decides.
    pub fn classify(&self, head: &[u8]) -> u16 {
        classify(&self.classes, &self.rules, head)
    }

    /// The plan as an agent policy's classes and rules (rates in parts per million, rules with
    /// their masks; rules match any port and client).
    pub fn wire(&self) -> (Vec<ClassPolicy>, Vec<ClassRule>) {
        let classes = self
            .classes
            .iter()
            .map(|c| ClassPolicy {
                id: c.id,
                name: c.name.clone(),
                sample_rate_ppm: (c.rate.clamp(0.0, 1.0) * 1e6).round() as u32,
                priority: c.priority,
                // Boosts carry the rare and new patterns: a budget saturated by common traffic
                // must still admit them.
                budget_priority: matches!(c.role, ClassRole::Boost),
            })
            .collect();
        let rules = self
            .rules
            .iter()
            .map(|r| ClassRule {
                class: r.class,
                port: None,
                client_prefix: None,
                payload_prefix: r.spec.prefix.clone(),
                payload_mask: r.spec.mask.clone(),
            })
            .collect();
        (classes, rules)
    }

    /// A class's sample rate (0 for an unknown class).
    pub fn rate(&self, class: u16) -> f64 {
        self.classes
            .iter()
            .find(|c| c.id == class)
            .map_or(0.0, |c| c.rate)
    }
}

/// The class of the highest-priority rule that matches `head` (0 when none does): the data
/// path's classification, rule by rule in order, a later rule winning only with a strictly
/// higher priority.
pub fn classify(classes: &[PlannedClass], rules: &[PlannedRule], head: &[u8]) -> u16 {
    let mut best = (0u16, 0u32);
    for rule in rules.iter().take(MAX_RULES) {
        if rule.spec.matches(head) {
            let priority = classes
                .iter()
                .find(|c| c.id == rule.class)
                .map_or(0, |c| u32::from(c.priority))
                + 1;
            if priority > best.1 {
                best = (rule.class, priority);
            }
        }
    }
    best.0
}

/// How much one mirrored flow of a class stands for in a comparison: live's flows of the class
/// over its mirrored flows in the same report interval. Per interval, not over a longer
/// window: rates and the bucket's cut change between intervals, and a pattern whose flows bunch
/// in some intervals (a flash crowd, cut hardest by the bucket) would be under-counted by a
/// window's ratio of sums. `None` when nothing of the class was mirrored in the interval (its
/// live flows then have no mirrored stand-in).
pub fn class_weight(live_flows: u64, mirrored_flows: u64) -> Option<f64> {
    (mirrored_flows > 0).then(|| live_flows as f64 / mirrored_flows as f64)
}

/// The data path's hard limit on mirrored flows: a token bucket refilled at the budget, holding
/// at most one second of it, that a flow the hash sampled must take a token from.
/// - Flows of common classes stop short of the last [`BUDGET_RESERVE_SECS`] of it, so common
///   traffic that saturates the budget cannot turn the rare patterns away.
/// - Flows of priority classes (the plan's boosts, [`ClassPolicy::budget_priority`]) may take
///   every token, but only within a lane of their own at [`PRIORITY_SHARE`] of the budget: a
///   rare pattern that bursts before the next plan cannot starve the common ones.
///
/// The kernel holds the same rules as two GCRAs (`MIRROR_BUCKET`, `mirror_reserve_ns`,
/// `mirror_priority_interval_ns`).
#[derive(Debug, Clone, PartialEq)]
pub struct FlowBucket {
    rate: f64,
    depth: f64,
    /// Tokens only priority flows may take.
    reserve: f64,
    tokens: f64,
    /// The priority lane's tokens, refilled at `PRIORITY_SHARE` of the rate, one second deep.
    lane: f64,
    at: f64,
}

/// Seconds of the budget held back for priority classes: the kernel's reserve.
pub const BUDGET_RESERVE_SECS: f64 =
    doppel_common::maps::MIRROR_BUDGET_RESERVE_NS as f64 / 1_000_000_000.0;
/// The most of the budget priority flows take (within the share the plan lets boosts take).
pub const PRIORITY_SHARE: f64 = doppel_common::maps::MIRROR_PRIORITY_SHARE_PPM as f64 / 1e6;

impl FlowBucket {
    /// A full bucket at `rate` flows/s, at time `now` (seconds), with a reserve and lane for
    /// priority classes (a plan with boosts: the kernel holds the reserve back only then).
    pub fn new(rate: f64, now: f64) -> Self {
        Self {
            // At least two flows' spacing (the kernel's `MIRROR_RESERVE_MIN_FLOWS`), within
            // the burst.
            reserve: (rate * BUDGET_RESERVE_SECS)
                .max(doppel_common::maps::MIRROR_RESERVE_MIN_FLOWS as f64)
                .min((rate - 1.0).max(0.0)),
            ..Self::without_priority(rate, now)
        }
    }

    /// A full bucket at `rate` flows/s, at time `now`, for a policy without priority classes:
    /// common flows may take every token.
    pub fn without_priority(rate: f64, now: f64) -> Self {
        Self {
            rate,
            depth: rate.max(1.0),
            reserve: 0.0,
            tokens: rate.max(1.0),
            lane: (rate * PRIORITY_SHARE).max(1.0),
            at: now,
        }
    }

    /// Admits up to `wanted` flows of common classes that arrived, evenly spread, since the last
    /// call and up to `now`; returns how many were admitted. See [`FlowBucket::admit_classes`].
    pub fn admit(&mut self, now: f64, wanted: u64) -> u64 {
        self.admit_classes(now, 0, wanted).1
    }

    /// Admits up to `priority` flows of priority classes and `common` flows of other classes
    /// that arrived since the last call and up to `now`; returns how many of each. Called once
    /// per flow it is the data path's bucket; called once per interval it is the same bucket
    /// seen from the interval's totals: tokens arriving during the interval are spent by the
    /// flows arriving with them, priority flows take what their lane holds, and common flows
    /// stop where the reserve begins, which is where a saturated bucket ends the interval.
    pub fn admit_classes(&mut self, now: f64, priority: u64, common: u64) -> (u64, u64) {
        let elapsed = (now - self.at).max(0.0);
        self.at = now;
        let available = self.tokens + elapsed * self.rate;
        let lane = self.lane + elapsed * self.rate * PRIORITY_SHARE;
        let first = (lane.min(available).floor().max(0.0) as u64).min(priority);
        let second =
            ((available - first as f64 - self.reserve).floor().max(0.0) as u64).min(common);
        self.lane = (lane - first as f64).min((self.rate * PRIORITY_SHARE).max(1.0));
        self.tokens = (available - (first + second) as f64).min(self.depth);
        (first, second)
    }

    /// Tokens held now (before refilling).
    pub fn tokens(&self) -> f64 {
        self.tokens
    }
}

/// The learned mirroring of one workload (see the module docs).
#[derive(Debug, Clone)]
pub struct MirrorPlanner {
    settings: MirrorSettings,
    patterns: HashMap<String, PatternState>,
    /// Learned head classes by number.
    heads: BTreeMap<u16, HeadClass>,
    /// Class numbers resting until this time.
    resting: BTreeMap<u16, f64>,
    /// (time, live flows/s) of past intervals within the peak window.
    load: std::collections::VecDeque<(f64, f64)>,
    now: f64,
    /// Live's load now, flows/s (smoothed over seconds).
    load_now: f64,
    /// End of the first interval that showed any flows.
    started: Option<f64>,
}

impl MirrorPlanner {
    /// A planner that has seen nothing yet.
    pub fn new(settings: MirrorSettings) -> Result<Self, BadMirrorSetting> {
        settings.validate()?;
        Ok(Self {
            settings,
            patterns: HashMap::new(),
            heads: BTreeMap::new(),
            resting: BTreeMap::new(),
            load: std::collections::VecDeque::new(),
            now: 0.0,
            load_now: 0.0,
            started: None,
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> &MirrorSettings {
        &self.settings
    }

    /// Replaces the settings (a policy change), keeping what was learned.
    pub fn set_settings(&mut self, settings: MirrorSettings) -> Result<(), BadMirrorSetting> {
        settings.validate()?;
        let pinned: Vec<u16> = settings.pinned.iter().map(|p| p.id).collect();
        self.heads.retain(|id, _| !pinned.contains(id));
        self.settings = settings;
        Ok(())
    }

    /// Takes one report interval ending at `now` (seconds) and `interval_secs` long: every
    /// pattern's flows, and live's latency per class where known.
    pub fn observe(
        &mut self,
        now: f64,
        interval_secs: f64,
        patterns: &[PatternObservation],
        latencies: &[ClassLatency],
    ) {
        if !(interval_secs > 0.0 && interval_secs.is_finite()) {
            return;
        }
        self.now = now;
        let alpha = 1.0 - (-interval_secs / self.settings.smoothing_secs).exp();
        let mut seen: HashMap<&str, f64> = HashMap::new();
        for p in patterns {
            if p.flows.is_finite() && p.flows > 0.0 {
                *seen.entry(p.pattern.as_str()).or_default() += p.flows;
            }
        }
        if !seen.is_empty() {
            self.started.get_or_insert(now);
        }
        for state in self.patterns.values_mut() {
            state.rate *= 1.0 - alpha;
        }
        let mut total = 0.0;
        for (key, flows) in seen {
            total += flows;
            let rate = flows / interval_secs;
            match self.patterns.get_mut(key) {
                Some(state) => {
                    state.rate += alpha * rate;
                    state.last_seen = now;
                }
                None => {
                    // A new pattern starts at its first interval's rate rather than a fraction
                    // of it, so it is not taken for rarer than it is.
                    self.patterns.insert(
                        key.to_owned(),
                        PatternState {
                            rule: rule_for_pattern(key),
                            rate,
                            first_seen: now,
                            last_seen: now,
                        },
                    );
                }
            }
        }
        // Forget patterns unseen for a day and too rare to matter.
        let window = self.settings.peak_window_secs;
        self.patterns
            .retain(|_, s| now - s.last_seen < window || s.rate * 3600.0 >= 1.0);
        let load = total / interval_secs;
        // The load follows within seconds (rates must drop as a burst starts and rise as it
        // ends); the mix is what is smoothed.
        let fast = if self.load.is_empty() {
            1.0 // the first interval is all there is to go by
        } else {
            1.0 - (-interval_secs / LOAD_SMOOTHING_SECS).exp()
        };
        self.load_now = self.load_now * (1.0 - fast) + fast * load;
        self.load.push_back((now, load));
        while self.load.front().is_some_and(|(t, _)| now - t > window) {
            self.load.pop_front();
        }
        for l in latencies {
            if let Some(head) = self.heads.get_mut(&l.class)
                && l.latency_ms.is_finite()
                && l.latency_ms > 0.0
            {
                head.latency_ms = Some(match head.latency_ms {
                    Some(old) => old + alpha * (l.latency_ms - old),
                    None => l.latency_ms,
                });
            }
        }
        self.update_heads();
    }

    /// Whether a pattern is new: first seen after the planner's first interval (what that
    /// interval showed is the mix as it was, not news) and less than `new_pattern_secs` ago. A
    /// new pattern is mirrored whole and takes no head class yet: its share, from a few flows,
    /// says little.
    fn is_young(&self, state: &PatternState) -> bool {
        self.started.is_some_and(|start| state.first_seen > start)
            && self.now - state.first_seen < self.settings.new_pattern_secs
    }

    fn total_rate(&self) -> f64 {
        self.patterns.values().map(|s| s.rate).sum()
    }

    fn pinned_ids(&self) -> impl Iterator<Item = u16> + '_ {
        self.settings.pinned.iter().map(|p| p.id)
    }

    /// Head classes: keep those above half the entry share (and pinned patterns), free the
    /// rest to rest, and give free numbers to the largest patterns above the entry share.
    fn update_heads(&mut self) {
        let total = self.total_rate();
        if total <= 0.0 {
            return;
        }
        let now = self.now;
        let min_share = self.settings.head_min_share;
        let pinned_patterns = &self.settings.pinned_patterns;
        let excluded = &self.settings.excluded_patterns;
        let mut freed = Vec::new();
        for (&id, head) in &self.heads {
            let share = self
                .patterns
                .get(&head.pattern)
                .map_or(0.0, |s| s.rate / total);
            let pinned = pinned_patterns.contains(&head.pattern);
            if excluded.contains(&head.pattern) || (!pinned && share < min_share / 2.0) {
                freed.push(id);
            }
        }
        for id in freed {
            self.heads.remove(&id);
            self.resting.insert(id, now + self.settings.class_rest_secs);
        }
        self.resting.retain(|_, until| *until > now);
        let mut wanted: Vec<(&String, f64)> = self
            .patterns
            .iter()
            .filter(|(k, s)| {
                s.rule.is_some()
                    && !excluded.contains(k)
                    && ((s.rate / total >= min_share && !self.is_young(s))
                        || pinned_patterns.contains(k))
                    && !self.heads.values().any(|h| &h.pattern == *k)
            })
            .map(|(k, s)| {
                let pinned = pinned_patterns.contains(k);
                (k, if pinned { f64::INFINITY } else { s.rate })
            })
            .collect();
        wanted.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let taken: Vec<u16> = self.pinned_ids().collect();
        let reserved = BOOST_LEVELS.len() + 1; // boost classes and the excluded class
        let mut new_heads = Vec::new();
        for (key, _) in wanted {
            if self.heads.len() + new_heads.len() + taken.len() + reserved + 1 >= MAX_CLASSES {
                break;
            }
            // A head's rule must not be the same as an existing head's (they would be one class).
            let rule = self.patterns[key].rule.clone();
            if self
                .heads
                .values()
                .any(|h| self.patterns.get(&h.pattern).and_then(|s| s.rule.clone()) == rule)
            {
                continue;
            }
            new_heads.push(key.clone());
        }
        for pattern in new_heads {
            let free = (1..MAX_CLASSES as u16).find(|id| {
                !taken.contains(id)
                    && !self.heads.contains_key(id)
                    && !self.resting.contains_key(id)
                    && !self.boost_ids().contains(id)
            });
            let Some(id) = free else { break };
            self.heads.insert(
                id,
                HeadClass {
                    pattern,
                    latency_ms: None,
                },
            );
        }
    }

    /// Class numbers of the boost classes and the excluded class: the highest numbers not
    /// pinned, so they never move while heads come and go below them.
    fn boost_ids(&self) -> Vec<u16> {
        let pinned: Vec<u16> = self.pinned_ids().collect();
        (1..MAX_CLASSES as u16)
            .rev()
            .filter(|id| !pinned.contains(id))
            .take(BOOST_LEVELS.len() + 1)
            .collect()
    }

    /// The reference load: the peak quantile of the window's loads. Above it the rates mirror
    /// more than the budget and the data path's bucket holds the volume at the budget, so every
    /// interval above the quantile gets the whole budget, including one whose rates were set
    /// while the load was higher still.
    fn reference_load(&self) -> f64 {
        let mut loads: Vec<f64> = self.load.iter().map(|(_, l)| *l).collect();
        if loads.is_empty() {
            return self.load_now;
        }
        let rank = ((loads.len() as f64 - 1.0) * self.settings.peak_quantile).round() as usize;
        let (_, q, _) = loads.select_nth_unstable_by(rank, f64::total_cmp);
        *q
    }

    /// The plan for the next interval.
    pub fn plan(&self) -> MirrorPlan {
        let s = &self.settings;
        // Patterns' smoothed rates give the mix; `load_now` the level. A pattern's flows/s at
        // the reference load is its smoothed rate times `at_reference`.
        let total = self.total_rate();
        let load_now = if self.load_now > 0.0 {
            self.load_now
        } else {
            total
        };
        let reference = self.reference_load();
        // Rates are set for the reference load; off-peak they would mirror `load / reference`
        // of the budget, which is held to at least the off-peak share.
        let scale = if load_now > 0.0 {
            (reference / load_now).min(1.0 / s.offpeak_budget_share.max(1e-9))
        } else {
            1.0
        };
        let at_reference = if total > 0.0 {
            scale * load_now / total
        } else {
            scale
        };
        let boost_ids = self.boost_ids();
        let excluded_id = boost_ids[0];
        let boost_class = |level: usize| boost_ids[level + 1];

        // Costly heads: latency at least `costly_ratio` times the median head's.
        let mut head_latencies: Vec<f64> =
            self.heads.values().filter_map(|h| h.latency_ms).collect();
        head_latencies.sort_by(f64::total_cmp);
        let median = head_latencies
            .get(head_latencies.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(f64::INFINITY);
        let costly = |h: &HeadClass| {
            h.latency_ms
                .is_some_and(|l| head_latencies.len() >= 2 && l >= s.costly_ratio * median)
        };

        // Rules: pinned first, then heads, then excluded, then boosted patterns, rarest first,
        // while the data path has room.
        let mut rules: Vec<PlannedRule> = Vec::new();
        for p in &s.pinned {
            for spec in &p.rules {
                rules.push(PlannedRule {
                    class: p.id,
                    spec: spec.clone(),
                    patterns: Vec::new(),
                });
            }
        }
        let add_rule = |rules: &mut Vec<PlannedRule>, class, spec: &RuleSpec, key: &str| {
            if let Some(rule) = rules.iter_mut().find(|r| &r.spec == spec) {
                rule.patterns.push(key.to_owned());
                return true;
            }
            if rules.len() >= MAX_RULES {
                return false;
            }
            rules.push(PlannedRule {
                class,
                spec: spec.clone(),
                patterns: vec![key.to_owned()],
            });
            true
        };
        for (&id, head) in &self.heads {
            if let Some(spec) = self
                .patterns
                .get(&head.pattern)
                .and_then(|p| p.rule.as_ref())
            {
                add_rule(&mut rules, id, spec, &head.pattern);
            }
        }
        let mut without_rule = 0;
        for key in &s.excluded_patterns {
            if let Some(spec) = self
                .patterns
                .get(key)
                .and_then(|p| p.rule.clone())
                .or_else(|| rule_for_pattern(key))
                && !add_rule(&mut rules, excluded_id, &spec, key)
            {
                without_rule += 1;
            }
        }

        // The typical rate before boosting, to know which patterns it would leave too rare.
        let head_patterns: Vec<&str> = self.heads.values().map(|h| h.pattern.as_str()).collect();
        let fixed_pinned: f64 = s
            .pinned
            .iter()
            .map(|p| p.rate * self.pinned_rate(p) * at_reference)
            .sum();
        let rough_typical = (s.budget_flows_per_s - fixed_pinned).max(0.0) / reference.max(1e-9);
        let mut candidates: Vec<(&String, f64, usize)> = Vec::new();
        for (key, state) in &self.patterns {
            if state.rule.is_none()
                || head_patterns.contains(&key.as_str())
                || s.excluded_patterns.contains(key)
            {
                continue;
            }
            let per_hour = state.rate * 3600.0;
            let young = self.is_young(state);
            let needed = if young {
                1.0
            } else {
                s.rare_target_per_hour / per_hour.max(1e-9)
            };
            if needed <= rough_typical.min(1.0) {
                continue;
            }
            // The lowest boost rate that still reaches the target.
            let level = BOOST_LEVELS
                .iter()
                .rposition(|&l| l >= needed.min(1.0))
                .unwrap_or(0);
            candidates.push((key, per_hour, level));
        }
        candidates.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(b.0)));
        // A boost rule's prefix may match more than its pattern (`GET /a/items1` also matches
        // `GET /a/items12`): what it would boost besides is paid from the budget, so a rule
        // whose spill-over would take more than its share of `MAX_SPILL` is left out.
        let budget = s.budget_flows_per_s;
        let mut spill_left = MAX_SPILL * budget;
        for (key, _, level) in candidates {
            let spec = self.patterns[key].rule.as_ref().expect("filtered on rule");
            if rules.iter().any(|r| &r.spec == spec) {
                // Already boosted (or a head's): same rule, same class.
                add_rule(&mut rules, boost_class(level), spec, key);
                continue;
            }
            let spill: f64 = self
                .patterns
                .iter()
                .filter(|(k, p)| {
                    p.rule
                        .as_ref()
                        .is_some_and(|r| r != spec && spec.matches(&r.prefix))
                        && !head_patterns.contains(&k.as_str())
                })
                .map(|(_, p)| p.rate)
                .sum::<f64>()
                * BOOST_LEVELS[level]
                * at_reference;
            if spill > spill_left || !add_rule(&mut rules, boost_class(level), spec, key) {
                without_rule += 1;
                continue;
            }
            spill_left -= spill;
        }

        // Classes, and the typical rate that fills the budget at the reference load.
        let mut classes = vec![PlannedClass {
            id: 0,
            name: "default".into(),
            rate: 0.0,
            priority: 0,
            role: ClassRole::Default,
        }];
        for p in &s.pinned {
            classes.push(PlannedClass {
                id: p.id,
                name: p.name.clone(),
                rate: p.rate,
                priority: PINNED_PRIORITY,
                role: ClassRole::Pinned,
            });
        }
        for (&id, head) in &self.heads {
            let len = self
                .patterns
                .get(&head.pattern)
                .and_then(|p| p.rule.as_ref())
                .map_or(0, |r| r.prefix.len() as u16);
            classes.push(PlannedClass {
                id,
                name: head.pattern.clone(),
                rate: 0.0,
                priority: HEAD_PRIORITY + len,
                role: ClassRole::Head {
                    pattern: head.pattern.clone(),
                    costly: costly(head),
                },
            });
        }
        classes.push(PlannedClass {
            id: excluded_id,
            name: "excluded".into(),
            rate: 0.0,
            priority: HEAD_PRIORITY + PAYLOAD_MATCH_LEN as u16 + 1,
            role: ClassRole::Excluded,
        });
        for (level, rate) in BOOST_LEVELS.iter().enumerate() {
            classes.push(PlannedClass {
                id: boost_class(level),
                name: format!("boost 1/{}", (1.0 / rate).round()),
                rate: *rate,
                // Rarer patterns' rules win over commoner ones' when nested.
                priority: BOOST_PRIORITY + level as u16,
                role: ClassRole::Boost,
            });
        }

        // Flows per second per class, from each pattern's class under these very rules.
        let mut class_flows: HashMap<u16, f64> = HashMap::new();
        let mut pattern_class: HashMap<&str, u16> = HashMap::new();
        for (key, state) in &self.patterns {
            let class = match &state.rule {
                Some(spec) => classify(&classes, &rules, &spec.prefix),
                None => 0,
            };
            pattern_class.insert(key, class);
            // A young pattern's rate is read from its first round or two and runs high (one
            // flow in a half-second round reads as 2 flows/s): it is left out of the volume the
            // rates are solved for, so it cannot scale the boosts down or starve the typical
            // rate. In a boost class the data path's priority lane bounds what it takes; in
            // class 0 nothing does until it is 15 minutes old. Counting it there instead cost
            // the held-out traces (`eval mirror --mirror-workloads 40`) divergence 0.0230 ->
            // 0.0256 and changed nothing on the default ones.
            if !self.is_young(state) {
                *class_flows.entry(class).or_default() += state.rate;
            }
        }
        let rate_at = |class: &PlannedClass, typical: f64| match &class.role {
            ClassRole::Default => typical,
            ClassRole::Head { costly: true, .. } => (typical * s.costly_factor).min(1.0),
            ClassRole::Head { costly: false, .. } => typical,
            ClassRole::Boost | ClassRole::Excluded | ClassRole::Pinned => class.rate,
        };
        let volume = |typical: f64, boost_scale: f64| -> f64 {
            classes
                .iter()
                .map(|c| {
                    let rate = match c.role {
                        // A boost never mirrors less than the typical rate (off-peak the
                        // typical rate can exceed the lower boost levels).
                        ClassRole::Boost => (c.rate * boost_scale).max(typical),
                        _ => rate_at(c, typical),
                    };
                    class_flows.get(&c.id).copied().unwrap_or(0.0) * rate * at_reference
                })
                .sum()
        };
        // Boosts take at most `MAX_BOOST_SHARE` of the budget (scaled down together beyond
        // it), so the typical traffic, the bulk of what the comparison weighs, is never
        // starved; the typical rate then fills what is left.
        let fixed = volume(0.0, 0.0);
        let boosted = volume(0.0, 1.0) - fixed;
        let boost_scale = if boosted > MAX_BOOST_SHARE * budget {
            MAX_BOOST_SHARE * budget / boosted
        } else {
            1.0
        };
        let typical = if volume(1.0, boost_scale) <= budget {
            1.0
        } else {
            let (mut lo, mut hi) = (0.0, 1.0);
            for _ in 0..50 {
                let mid = 0.5 * (lo + hi);
                if volume(mid, boost_scale) > budget {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            lo
        };
        let expected = volume(typical, boost_scale) / scale;
        let rates: Vec<f64> = classes
            .iter()
            .map(|c| match c.role {
                ClassRole::Boost => (c.rate * boost_scale).max(typical),
                _ => rate_at(c, typical),
            })
            .collect();
        for (class, rate) in classes.iter_mut().zip(rates) {
            class.rate = rate;
        }

        let mut patterns: Vec<PatternPlan> = self
            .patterns
            .iter()
            .map(|(key, state)| {
                let class = pattern_class[key.as_str()];
                PatternPlan {
                    pattern: key.clone(),
                    flows_per_s: state.rate,
                    share: if total > 0.0 { state.rate / total } else { 0.0 },
                    class,
                    rate: classes
                        .iter()
                        .find(|c| c.id == class)
                        .map_or(0.0, |c| c.rate),
                    age_secs: self.now - state.first_seen,
                }
            })
            .collect();
        patterns.sort_by(|a, b| {
            b.flows_per_s
                .total_cmp(&a.flows_per_s)
                .then_with(|| a.pattern.cmp(&b.pattern))
        });
        MirrorPlan {
            classes,
            rules,
            typical_rate: typical,
            reference_flows_per_s: reference,
            live_flows_per_s: load_now,
            expected_mirrored_per_s: expected,
            budget_flows_per_s: budget,
            patterns,
            patterns_without_rule: without_rule,
        }
    }

    /// Flows per second a pinned class's rules take, from the patterns they match.
    fn pinned_rate(&self, pinned: &PinnedClass) -> f64 {
        self.patterns
            .values()
            .filter(|s| {
                s.rule
                    .as_ref()
                    .is_some_and(|r| pinned.rules.iter().any(|p| p.matches(&r.prefix)))
            })
            .map(|s| s.rate)
            .sum()
    }
}

pub mod coverage;
#[cfg(test)]
mod tests;
