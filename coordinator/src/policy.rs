//! Workloads and their policy, as the operator writes them, and what each agent gets from them.
//!
//! A [`WorkloadSpec`] says where the workload runs (live agents, services, shadow endpoints) and
//! its [`Policy`] (classes and patterns with sample rates, SLO, budget, mode). [`validate`]
//! refuses an invalid one naming the field; [`agent_policy`] derives the wire
//! [`AgentPolicy`] an agent applies to its maps.

use std::{collections::HashSet, net::SocketAddr};

use doppel_common::wire::{
    AgentPolicy, ClassPolicy, ClassRule, IpPrefix, MirrorSession, ServiceAddr,
};
use serde::{Deserialize, Serialize};

/// A workload: where it runs live, where its shadows run, and its policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Unique name, `[A-Za-z0-9._-]`.
    pub name: String,
    /// Hosts running the workload for real.
    pub live: Vec<LiveEndpoint>,
    /// The workload's listening addresses, `IP:PORT`.
    pub services: Vec<String>,
    /// Shadow instances receiving mirrored traffic.
    #[serde(default)]
    pub shadows: Vec<ShadowEndpoint>,
    /// What to sample, the SLO, the budget and the mode.
    #[serde(default)]
    pub policy: Policy,
    /// How the coordinator makes shadows of this workload itself (absent: it makes none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowTemplate>,
}

/// How the Shadow Instance Manager runs a workload in a shadow, how many and on which types.
///
/// ```toml
/// [shadow]
/// command = "/usr/sbin/nginx"
/// args = ["-p", "{dir}", "-c", "{dir}/nginx.conf", "-g", "daemon off;"]
/// count = 2                        # shadows running at once, 1..=16
/// pin_in = ["c7.large"]            # always shadowed (within the budget)
/// pin_out = ["m5.large"]           # never shadowed
/// recreate_every_ms = 86400000     # fresh instances daily (absent: never)
/// ```
///
/// In `args`, `{dir}` is the shadow's private directory and `{addr}` its address.
/// `recreate_every_secs`, the seconds key of earlier versions (and of workloads stored by
/// them), is still read and becomes `recreate_every_ms`; giving both is an error.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "ShadowTemplateInput")]
pub struct ShadowTemplate {
    /// The workload's program, started inside the shadow.
    pub command: String,
    /// Its arguments, with `{dir}` and `{addr}` substituted.
    #[serde(default)]
    pub args: Vec<String>,
    /// Shadows kept running at once.
    #[serde(default = "one_shadow")]
    pub count: u32,
    /// VM types always shadowed (as long as the budget allows).
    #[serde(default)]
    pub pin_in: Vec<String>,
    /// VM types never shadowed.
    #[serde(default)]
    pub pin_out: Vec<String>,
    /// Replace every shadow by a fresh one after this many milliseconds (absent: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recreate_every_ms: Option<u64>,
}

/// [`ShadowTemplate`] as written: the same fields, and the old seconds key.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShadowTemplateInput {
    command: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default = "one_shadow")]
    count: u32,
    #[serde(default)]
    pin_in: Vec<String>,
    #[serde(default)]
    pin_out: Vec<String>,
    #[serde(default)]
    recreate_every_ms: Option<u64>,
    #[serde(default)]
    recreate_every_secs: Option<u64>,
}

impl TryFrom<ShadowTemplateInput> for ShadowTemplate {
    type Error = String;

    fn try_from(input: ShadowTemplateInput) -> Result<Self, Self::Error> {
        let recreate_every_ms = match (input.recreate_every_ms, input.recreate_every_secs) {
            (Some(_), Some(_)) => {
                return Err(
                    "give only `recreate_every_ms` (`recreate_every_secs` is the same \
                            duration in seconds)"
                        .into(),
                );
            }
            (None, Some(secs)) => Some(secs.checked_mul(1000).ok_or(
                "`recreate_every_secs` is too large; give `recreate_every_ms`".to_owned(),
            )?),
            (ms, None) => ms,
        };
        Ok(Self {
            command: input.command,
            args: input.args,
            count: input.count,
            pin_in: input.pin_in,
            pin_out: input.pin_out,
            recreate_every_ms,
        })
    }
}

const fn one_shadow() -> u32 {
    1
}

/// Most shadows a template may ask for.
pub const MAX_SHADOWS: u32 = 16;

/// A live host of a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveEndpoint {
    /// The agent's name (its certificate's common name).
    pub agent: String,
    /// The VM type the live instance runs on.
    pub vm_type: String,
    /// Interfaces the agent attaches to (empty: the agent's default).
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Outer source address of this host's mirror traffic (its VXLAN endpoint); shadows the
    /// coordinator makes admit mirror traffic from these addresses only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_source: Option<std::net::IpAddr>,
}

/// A shadow instance of a workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowEndpoint {
    /// The shadow host's agent.
    pub agent: String,
    /// The VM type the shadow runs on.
    pub vm_type: String,
    /// The shadow host's VXLAN endpoint address.
    pub addr: std::net::IpAddr,
    /// VXLAN network identifier of the mirror session (24 bits, unique per workload).
    pub vni: u32,
}

/// What a workload's agents do and what the coordinator holds it to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Report interval, milliseconds.
    pub report_interval_ms: u32,
    /// Traffic classes and their sample rates.
    pub classes: Vec<ClassSpec>,
    /// The latency objective.
    pub slo: Slo,
    /// Spending limit for recommended VM types.
    pub budget: Budget,
    /// Whether the coordinator only recommends or also acts.
    pub mode: Mode,
    /// In act mode, the serve config's `[[actions]]` entry that carries out a recommendation.
    pub action: Option<String>,
    /// Learned mirroring: classes and rates steered from live's pattern mix.
    #[serde(skip_serializing_if = "MirrorPolicy::is_off")]
    pub mirror: MirrorPolicy,
}

/// Learned mirroring (see [`crate::mirror`]).
///
/// ```toml
/// [policy.mirror]
/// learn = true
/// budget_flows_per_s = 50        # most mirrored flows a second, per shadow
/// pin = ["POST /api/checkout"]   # kept in a class of their own
/// exclude = ["GET /health"]      # never mirrored
/// ```
///
/// While learning, class 0 and the classes the coordinator adds are steered; the operator's
/// classes with patterns are kept exactly as written (pinned) and their rules win.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MirrorPolicy {
    /// Learn classes and steer rates from live's pattern mix.
    pub learn: bool,
    /// Most mirrored flows per second (every shadow receives each mirrored flow).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_flows_per_s: Option<f64>,
    /// Pattern keys (as `doppel patterns` shows them) kept in a class of their own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pin: Vec<String>,
    /// Pattern keys never mirrored.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub exclude: Vec<String>,
}

impl MirrorPolicy {
    /// Whether nothing is set (the policy then leaves it out when written).
    pub fn is_off(&self) -> bool {
        *self == Self::default()
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            report_interval_ms: 1000,
            classes: vec![ClassSpec {
                id: 0,
                name: "default".into(),
                sample_rate: 0.1,
                priority: 0,
                patterns: Vec::new(),
            }],
            slo: Slo::default(),
            budget: Budget::default(),
            mode: Mode::Recommend,
            action: None,
            mirror: MirrorPolicy::default(),
        }
    }
}

/// A traffic class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassSpec {
    /// Class number (0 = unclassified).
    pub id: u16,
    /// Human name.
    pub name: String,
    /// Share of the class's flows mirrored to shadows, 0.0..=1.0.
    pub sample_rate: f64,
    /// Higher wins when several classes match.
    #[serde(default)]
    pub priority: u16,
    /// Patterns assigning flows to this class.
    #[serde(default)]
    pub patterns: Vec<PatternSpec>,
}

/// A pattern assigning flows to a class. Empty fields match everything.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternSpec {
    /// Service port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Client prefix, `ADDR/LEN`.
    #[serde(default)]
    pub client_prefix: Option<String>,
    /// Leading bytes of the flow's first payload, e.g. `GET /api/`.
    #[serde(default)]
    pub payload_prefix: Option<String>,
}

/// The latency objective: the `percentile` of latency must stay below `max_latency_ms`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Slo {
    /// Percentile, e.g. 99.0.
    pub percentile: f64,
    /// Bound, milliseconds.
    pub max_latency_ms: f64,
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            percentile: 99.0,
            max_latency_ms: 200.0,
        }
    }
}

/// What a recommended VM type may cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budget {
    /// Most a recommended VM type may cost per hour (per instance); none: no limit.
    pub max_cost_per_hour: Option<f64>,
    /// Most the workload's shadows may cost per hour together (catalog prices); none: no limit.
    /// The Shadow Instance Manager never creates a shadow that would exceed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_cost_per_hour: Option<f64>,
}

/// Whether the coordinator acts on its recommendations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Store and deliver recommendations only.
    #[default]
    Recommend,
    /// Also carry recommendations out through the policy's `action` (see [`crate::act`]).
    Act,
}

/// A workload or policy that cannot be accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidPolicy {
    /// Path of the offending field, e.g. `policy.classes[1].sample_rate`.
    pub field: String,
    /// Why it is refused.
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> InvalidPolicy {
    InvalidPolicy {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Whether `name` may name a workload or an agent.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a workload on its own and against the `others` already defined (an agent belongs to
/// at most one workload).
pub fn validate(spec: &WorkloadSpec, others: &[WorkloadSpec]) -> Result<(), InvalidPolicy> {
    if !valid_name(&spec.name) {
        return Err(invalid("name", "use 1-64 characters of [A-Za-z0-9._-]"));
    }
    if spec.live.is_empty() {
        return Err(invalid("live", "a workload needs at least one live agent"));
    }
    let mut agents = HashSet::new();
    let agent_fields = spec
        .live
        .iter()
        .enumerate()
        .map(|(i, l)| (format!("live[{i}]"), &l.agent, &l.vm_type))
        .chain(
            spec.shadows
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("shadows[{i}]"), &s.agent, &s.vm_type)),
        );
    for (field, agent, vm_type) in agent_fields {
        if !valid_name(agent) {
            return Err(invalid(format!("{field}.agent"), "not a valid agent name"));
        }
        if vm_type.is_empty() {
            return Err(invalid(format!("{field}.vm_type"), "must not be empty"));
        }
        if !agents.insert(agent.as_str()) {
            return Err(invalid(
                format!("{field}.agent"),
                format!("agent {agent:?} is listed twice"),
            ));
        }
        if let Some(other) = others
            .iter()
            .filter(|o| o.name != spec.name)
            .find(|o| workload_agents(o).any(|a| a == agent))
        {
            return Err(invalid(
                format!("{field}.agent"),
                format!(
                    "agent {agent:?} already belongs to workload {:?}",
                    other.name
                ),
            ));
        }
    }
    if spec.services.is_empty() {
        return Err(invalid("services", "at least one IP:PORT is needed"));
    }
    for (i, service) in spec.services.iter().enumerate() {
        service
            .parse::<SocketAddr>()
            .map_err(|e| invalid(format!("services[{i}]"), format!("not IP:PORT ({e})")))?;
    }
    let mut vnis = HashSet::new();
    for (i, shadow) in spec.shadows.iter().enumerate() {
        if shadow.vni == 0 || shadow.vni > 0x00ff_ffff {
            return Err(invalid(
                format!("shadows[{i}].vni"),
                "must be in 1..=16777215",
            ));
        }
        if !vnis.insert(shadow.vni) {
            return Err(invalid(format!("shadows[{i}].vni"), "used twice"));
        }
    }
    validate_shadow(spec)?;
    validate_policy(&spec.policy)
}

/// Checks a policy on its own.
pub fn validate_policy(policy: &Policy) -> Result<(), InvalidPolicy> {
    if !(100..=60_000).contains(&policy.report_interval_ms) {
        return Err(invalid(
            "policy.report_interval_ms",
            "must be in 100..=60000",
        ));
    }
    if policy.classes.is_empty() {
        return Err(invalid("policy.classes", "at least one class is needed"));
    }
    let mut ids = HashSet::new();
    for (i, class) in policy.classes.iter().enumerate() {
        let field = |f: &str| format!("policy.classes[{i}].{f}");
        if !ids.insert(class.id) {
            return Err(invalid(
                field("id"),
                format!("class {} defined twice", class.id),
            ));
        }
        if !(0.0..=1.0).contains(&class.sample_rate) {
            return Err(invalid(field("sample_rate"), "must be in 0.0..=1.0"));
        }
        for (j, pattern) in class.patterns.iter().enumerate() {
            if let Some(prefix) = &pattern.client_prefix {
                parse_prefix(prefix).ok_or_else(|| {
                    invalid(
                        format!("policy.classes[{i}].patterns[{j}].client_prefix"),
                        "not ADDR/LEN",
                    )
                })?;
            }
            if pattern
                .payload_prefix
                .as_ref()
                .is_some_and(|p| p.len() > 64)
            {
                return Err(invalid(
                    format!("policy.classes[{i}].patterns[{j}].payload_prefix"),
                    "longer than 64 bytes",
                ));
            }
        }
    }
    validate_mirror(policy)?;
    let slo = policy.slo;
    if !(slo.percentile > 0.0 && slo.percentile < 100.0) {
        return Err(invalid("policy.slo.percentile", "must be in (0, 100)"));
    }
    if !(slo.max_latency_ms.is_finite() && slo.max_latency_ms > 0.0) {
        return Err(invalid("policy.slo.max_latency_ms", "must be positive"));
    }
    for (field, value) in [
        ("max_cost_per_hour", policy.budget.max_cost_per_hour),
        ("shadow_cost_per_hour", policy.budget.shadow_cost_per_hour),
    ] {
        if value.is_some_and(|c| !(c.is_finite() && c >= 0.0)) {
            return Err(invalid(
                format!("policy.budget.{field}"),
                "must be a non-negative number",
            ));
        }
    }
    match (&policy.mode, &policy.action) {
        (Mode::Act, None) => {
            return Err(invalid(
                "policy.action",
                "act mode needs the name of an action from the coordinator's config",
            ));
        }
        (_, Some(name)) if name.trim().is_empty() => {
            return Err(invalid("policy.action", "must not be empty"));
        }
        _ => {}
    }
    Ok(())
}

fn validate_mirror(policy: &Policy) -> Result<(), InvalidPolicy> {
    let m = &policy.mirror;
    if let Some(b) = m.budget_flows_per_s
        && !(b.is_finite() && b > 0.0)
    {
        return Err(invalid(
            "policy.mirror.budget_flows_per_s",
            "must be a positive number",
        ));
    }
    if m.learn && m.budget_flows_per_s.is_none() {
        return Err(invalid(
            "policy.mirror.budget_flows_per_s",
            "learning steers the rates within a budget: give the most mirrored flows a second",
        ));
    }
    for (list, keys) in [("pin", &m.pin), ("exclude", &m.exclude)] {
        for (i, key) in keys.iter().enumerate() {
            if doppel_engine::mirror::rule_for_pattern(key).is_none() {
                return Err(invalid(
                    format!("policy.mirror.{list}[{i}]"),
                    format!(
                        "{key:?}: no leading bytes identify this pattern's flows (use a key \
                         as `doppel patterns` shows it, e.g. `GET /api/items/{{n}}`)"
                    ),
                ));
            }
        }
    }
    if m.learn {
        let settings = mirror_settings(policy).expect("learning has a budget");
        settings.validate().map_err(|e| {
            invalid(
                "policy.classes",
                format!("learned mirroring cannot keep these classes: {}", e.reason),
            )
        })?;
    }
    Ok(())
}

/// The learned-mirroring settings of a policy that learns (`None` otherwise): the budget, the
/// pinned and excluded patterns, and the operator's classes with patterns as pinned classes.
pub fn mirror_settings(policy: &Policy) -> Option<doppel_engine::mirror::MirrorSettings> {
    use doppel_engine::mirror::{MirrorSettings, PinnedClass, RuleSpec};
    let m = &policy.mirror;
    let budget = m.budget_flows_per_s.filter(|_| m.learn)?;
    let pinned = policy
        .classes
        .iter()
        .filter(|c| !c.patterns.is_empty())
        .map(|c| PinnedClass {
            id: c.id,
            name: c.name.clone(),
            rate: c.sample_rate,
            rules: c
                .patterns
                .iter()
                .map(|p| {
                    RuleSpec::exact(p.payload_prefix.as_deref().unwrap_or_default().as_bytes())
                })
                .collect(),
        })
        .collect();
    Some(MirrorSettings {
        budget_flows_per_s: budget,
        pinned,
        pinned_patterns: m.pin.clone(),
        excluded_patterns: m.exclude.clone(),
        ..MirrorSettings::default()
    })
}

/// Checks a workload's shadow template and what it needs from the rest of the spec.
pub fn validate_shadow(spec: &WorkloadSpec) -> Result<(), InvalidPolicy> {
    let Some(t) = &spec.shadow else {
        return Ok(());
    };
    if t.command.trim().is_empty() {
        return Err(invalid("shadow.command", "must not be empty"));
    }
    if !(1..=MAX_SHADOWS).contains(&t.count) {
        return Err(invalid(
            "shadow.count",
            format!("must be in 1..={MAX_SHADOWS}"),
        ));
    }
    for (list, types) in [("pin_in", &t.pin_in), ("pin_out", &t.pin_out)] {
        for (i, name) in types.iter().enumerate() {
            if !valid_name(name) {
                return Err(invalid(
                    format!("shadow.{list}[{i}]"),
                    "not a valid VM type name",
                ));
            }
        }
    }
    if let Some((i, name)) = t
        .pin_in
        .iter()
        .enumerate()
        .find(|(_, n)| t.pin_out.contains(n))
    {
        return Err(invalid(
            format!("shadow.pin_in[{i}]"),
            format!("{name:?} is pinned both in and out"),
        ));
    }
    if t.recreate_every_ms.is_some_and(|ms| ms < 10_000) {
        return Err(invalid(
            "shadow.recreate_every_ms",
            "must be at least 10000 (10 seconds)",
        ));
    }
    if !spec.live.iter().any(|l| l.vxlan_source.is_some()) {
        return Err(invalid(
            "live[0].vxlan_source",
            "shadows admit mirror traffic only from known sources: give each live host's VXLAN \
             source address",
        ));
    }
    Ok(())
}

fn parse_prefix(prefix: &str) -> Option<IpPrefix> {
    let (addr, len) = prefix.split_once('/')?;
    let addr: std::net::IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some(IpPrefix { addr, len })
}

/// Every agent of a workload, live and shadow.
pub fn workload_agents(spec: &WorkloadSpec) -> impl Iterator<Item = &str> {
    spec.live
        .iter()
        .map(|l| l.agent.as_str())
        .chain(spec.shadows.iter().map(|s| s.agent.as_str()))
}

/// The VM type `agent` runs in `spec`, and whether it is live.
pub fn agent_placement<'a>(spec: &'a WorkloadSpec, agent: &str) -> Option<(&'a str, bool)> {
    spec.live
        .iter()
        .find(|l| l.agent == agent)
        .map(|l| (l.vm_type.as_str(), true))
        .or_else(|| {
            spec.shadows
                .iter()
                .find(|s| s.agent == agent)
                .map(|s| (s.vm_type.as_str(), false))
        })
}

/// What `agent` must apply, given every workload; an agent in no workload gets an empty policy
/// (measure nothing, mirror nothing).
///
/// A workload that learns its mirroring and has a plan (`mirror_plans`, by workload) gets the
/// plan's classes and rules instead of the operator's: live agents sample by it, shadow agents
/// classify the replayed flows the same way so their histograms line up class by class.
pub fn agent_policy(
    workloads: &[WorkloadSpec],
    agent: &str,
    sampling_seed: u64,
    mirror_plans: &std::collections::BTreeMap<String, doppel_engine::mirror::MirrorPlan>,
) -> AgentPolicy {
    let Some(spec) = workloads
        .iter()
        .find(|w| workload_agents(w).any(|a| a == agent))
    else {
        return AgentPolicy {
            report_interval_ms: Policy::default().report_interval_ms,
            ..AgentPolicy::default()
        };
    };
    let is_live = spec.live.iter().any(|l| l.agent == agent);
    let services = spec
        .services
        .iter()
        .filter_map(|s| s.parse::<SocketAddr>().ok())
        .map(|s| ServiceAddr {
            addr: s.ip(),
            port: s.port(),
        })
        .collect();
    let classes = spec
        .policy
        .classes
        .iter()
        .map(|c| ClassPolicy {
            id: c.id,
            name: c.name.clone(),
            // Validated to 0.0..=1.0, so the product fits; exact at the ends.
            sample_rate_ppm: (c.sample_rate * 1e6).round() as u32,
            priority: c.priority,
            budget_priority: false,
        })
        .collect();
    let rules = spec
        .policy
        .classes
        .iter()
        .flat_map(|c| {
            c.patterns.iter().map(|p| {
                let payload_prefix = p
                    .payload_prefix
                    .as_deref()
                    .unwrap_or_default()
                    .as_bytes()
                    .to_vec();
                ClassRule {
                    class: c.id,
                    port: p.port,
                    client_prefix: p.client_prefix.as_deref().and_then(parse_prefix),
                    payload_mask: vec![0xff; payload_prefix.len()],
                    payload_prefix,
                }
            })
        })
        .collect();
    let (classes, rules) = match mirror_plans.get(&spec.name) {
        Some(plan) if spec.policy.mirror.learn => plan.wire(),
        _ => (classes, rules),
    };
    let mirror_sessions = if is_live {
        spec.shadows
            .iter()
            .map(|s| MirrorSession {
                shadow_addr: s.addr,
                vni: s.vni,
            })
            .collect()
    } else {
        Vec::new()
    };
    AgentPolicy {
        workload: spec.name.clone(),
        report_interval_ms: spec.policy.report_interval_ms,
        services,
        classes,
        rules,
        mirror_sessions,
        sampling_seed,
        // The budget is held where flows are sampled: on the live hosts (rounded up, so a
        // budget under one flow a second still mirrors something).
        mirror_budget_flows_per_s: match spec.policy.mirror.budget_flows_per_s {
            Some(b) if is_live => b.ceil().clamp(1.0, f64::from(u32::MAX)) as u32,
            _ => 0,
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn web() -> WorkloadSpec {
        WorkloadSpec {
            name: "web".into(),
            live: vec![LiveEndpoint {
                agent: "live-1".into(),
                vm_type: "m5.large".into(),
                interfaces: vec![],
                vxlan_source: None,
            }],
            services: vec!["10.0.0.2:8080".into()],
            shadows: vec![ShadowEndpoint {
                agent: "shadow-1".into(),
                vm_type: "c6g.large".into(),
                addr: "10.0.1.2".parse().expect("addr"),
                vni: 42,
            }],
            policy: Policy::default(),
            shadow: None,
        }
    }

    #[test]
    fn invalid_policies_name_the_field() {
        let mut spec = web();
        spec.policy.classes[0].sample_rate = 1.5;
        assert_eq!(
            validate(&spec, &[]).expect_err("rate").field,
            "policy.classes[0].sample_rate"
        );
        let mut spec = web();
        spec.services[0] = "nope".into();
        assert_eq!(validate(&spec, &[]).expect_err("svc").field, "services[0]");
        let mut spec = web();
        spec.policy.slo.max_latency_ms = -1.0;
        assert_eq!(
            validate(&spec, &[]).expect_err("slo").field,
            "policy.slo.max_latency_ms"
        );
        let mut other = web();
        other.name = "other".into();
        assert_eq!(
            validate(&web(), &[other]).expect_err("dup").field,
            "live[0].agent"
        );
        validate(&web(), &[web()]).expect("a workload may be replaced by itself");
    }

    #[test]
    fn the_seconds_key_of_a_stored_or_written_template_becomes_milliseconds() {
        let parse = |extra: &str| {
            serde_json::from_str::<ShadowTemplate>(&format!(r#"{{"command": "srv"{extra}}}"#))
        };
        let old = parse(r#", "recreate_every_secs": 3600"#).expect("seconds key");
        assert_eq!(old.recreate_every_ms, Some(3_600_000));
        // Written back with the new key only: a stored workload converts once.
        let json = serde_json::to_value(&old).expect("json");
        assert_eq!(json["recreate_every_ms"], 3_600_000);
        assert!(json.get("recreate_every_secs").is_none());
        assert_eq!(
            parse(r#", "recreate_every_ms": 5000"#)
                .expect("ms")
                .recreate_every_ms,
            Some(5000)
        );
        let both = parse(r#", "recreate_every_ms": 5000, "recreate_every_secs": 5"#)
            .expect_err("both keys");
        assert!(
            both.to_string().contains("give only `recreate_every_ms`"),
            "{both}"
        );
        assert!(
            parse(r#", "recreate_every": 5"#).is_err(),
            "unknown keys are refused"
        );
        let toml: ShadowTemplate =
            toml::from_str("command = \"srv\"\nrecreate_every_secs = 60\n").expect("toml");
        assert_eq!(toml.recreate_every_ms, Some(60_000));
    }

    #[test]
    fn invalid_shadow_templates_name_the_field() {
        let good = || {
            let mut spec = web();
            spec.live[0].vxlan_source = Some("10.0.0.2".parse().expect("addr"));
            spec.shadow = Some(ShadowTemplate {
                command: "/bin/server".into(),
                args: vec!["{dir}".into()],
                count: 2,
                pin_in: vec!["a".into()],
                pin_out: vec!["b".into()],
                recreate_every_ms: Some(3_600_000),
            });
            spec
        };
        validate(&good(), &[]).expect("valid");
        let field = |f: &dyn Fn(&mut WorkloadSpec)| {
            let mut spec = good();
            f(&mut spec);
            validate(&spec, &[]).expect_err("invalid").field
        };
        assert_eq!(
            field(&|s| s.shadow.as_mut().expect("t").count = 0),
            "shadow.count"
        );
        assert_eq!(
            field(&|s| s.shadow.as_mut().expect("t").command = " ".into()),
            "shadow.command"
        );
        assert_eq!(
            field(&|s| s.shadow.as_mut().expect("t").pin_out = vec!["a".into()]),
            "shadow.pin_in[0]"
        );
        assert_eq!(
            field(&|s| s.shadow.as_mut().expect("t").recreate_every_ms = Some(1000)),
            "shadow.recreate_every_ms"
        );
        assert_eq!(
            field(&|s| s.live[0].vxlan_source = None),
            "live[0].vxlan_source"
        );
        assert_eq!(
            field(&|s| s.policy.budget.shadow_cost_per_hour = Some(-1.0)),
            "policy.budget.shadow_cost_per_hour"
        );
    }

    #[test]
    fn learned_mirroring_needs_a_budget_and_patterns_with_a_prefix() {
        let field = |f: &dyn Fn(&mut Policy)| {
            let mut spec = web();
            f(&mut spec.policy);
            validate(&spec, &[]).err().map(|e| e.field)
        };
        assert_eq!(
            field(&|p| p.mirror.learn = true).as_deref(),
            Some("policy.mirror.budget_flows_per_s")
        );
        assert_eq!(
            field(&|p| {
                p.mirror.learn = true;
                p.mirror.budget_flows_per_s = Some(20.0);
                p.mirror.exclude = vec!["GET /ok".into(), "(other)".into()];
            })
            .as_deref(),
            Some("policy.mirror.exclude[1]")
        );
        assert_eq!(
            field(&|p| {
                p.mirror.learn = true;
                p.mirror.budget_flows_per_s = Some(20.0);
            }),
            None
        );
    }

    #[test]
    fn a_learned_plan_replaces_the_classes_of_a_learning_workload_only() {
        use doppel_engine::mirror::{MirrorPlanner, MirrorSettings, PatternObservation};
        let mut planner = MirrorPlanner::new(MirrorSettings {
            budget_flows_per_s: 5.0,
            ..MirrorSettings::default()
        })
        .expect("settings");
        planner.observe(
            60.0,
            60.0,
            &[PatternObservation {
                pattern: "GET /items/{n}".into(),
                flows: 6000.0,
            }],
            &[],
        );
        let plans = [("web".to_owned(), planner.plan())].into_iter().collect();
        let mut spec = web();
        let operator = agent_policy(&[spec.clone()], "live-1", 7, &plans);
        assert_eq!(
            operator.classes.len(),
            1,
            "not learning: the operator's classes"
        );
        spec.policy.mirror.learn = true;
        spec.policy.mirror.budget_flows_per_s = Some(5.0);
        let learned = agent_policy(&[spec.clone()], "live-1", 7, &plans);
        assert!(
            learned
                .rules
                .iter()
                .any(|r| r.payload_prefix == b"GET /items/"),
            "{learned:?}"
        );
        let shadow = agent_policy(&[spec], "shadow-1", 7, &plans);
        assert_eq!(shadow.rules, learned.rules, "shadows classify as live does");
        assert!(shadow.mirror_sessions.is_empty());
    }

    #[test]
    fn live_agents_mirror_to_the_shadows_and_shadow_agents_do_not() {
        let workloads = [web()];
        let live = agent_policy(&workloads, "live-1", 7, &Default::default());
        assert_eq!(live.workload, "web");
        assert_eq!(live.classes[0].sample_rate_ppm, 100_000);
        assert_eq!(live.mirror_sessions.len(), 1);
        assert_eq!(live.mirror_sessions[0].vni, 42);
        let shadow = agent_policy(&workloads, "shadow-1", 7, &Default::default());
        assert!(shadow.mirror_sessions.is_empty());
        let stranger = agent_policy(&workloads, "nobody", 7, &Default::default());
        assert!(stranger.workload.is_empty() && stranger.classes.is_empty());
    }
}
