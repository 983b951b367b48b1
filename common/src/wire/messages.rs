//! The messages of protocol version 1. See the parent module for the versioning rules.
//!
//! # Limits
//! Every variable-length field has a limit, enforced when encoding and when decoding (a frame
//! over a limit is [`FrameError::Malformed`](super::FrameError::Malformed)). The limits are part
//! of the format: a sender must stay within what its peer's version accepts. They serve two
//! purposes. Collections of structs are what lets a decoded message take more memory than its
//! payload (a 2-byte [`Counter`] on the wire is 32 bytes in memory), so their limits bound that
//! overhead to [`MAX_DECODED_OVERHEAD`]. Strings and byte strings cost no more in memory than on
//! the wire; theirs refuse values too large to be a name or a pattern, and leave the frame limit
//! as the only bound on the histograms, whose size depends on their data.

use core::mem::size_of;
use std::{net::IpAddr, string::String, vec::Vec};

#[cfg(test)]
use proptest_derive::Arbitrary;
use serde::{Deserialize, Serialize};

use super::{
    bounded::{MaxBytes, MaxItems, MaxStr},
    histogram::EncodedHistogram,
};
use crate::maps;

/// Most bytes in a name: software versions, host, agent, service, workload, class and counter
/// names. A Linux host name has at most 64, a DNS name 253.
pub const MAX_NAME_LEN: usize = 256;
/// Most bytes in [`Refused::reason`].
pub const MAX_REASON_LEN: usize = 1024;
/// Most roles in [`Hello::roles`]: there are two, and adding one would change the frozen
/// `Hello`'s layout anyway.
pub const MAX_ROLES: usize = 2;
/// Most histograms in one report. The agent measures service x class x scope x metric:
/// `LATENCY_HISTOGRAMS` (8 services x 16 classes x 2 scopes) x 3 metrics = 768.
pub const MAX_HISTOGRAMS: usize = 1024;
/// Most counters in one report.
pub const MAX_COUNTERS: usize = 4096;
/// Most pattern counts in one report.
pub const MAX_PATTERNS: usize = 4096;
/// Most bytes in a pattern key.
pub const MAX_PATTERN_LEN: usize = 512;
/// Most services in a policy. The policy limits are four times what the data path holds today
/// (`maps::MAX_*`), so the data path can grow without a protocol version, and a policy the agent
/// cannot apply is refused by the agent, with a reason, rather than by its decoder.
pub const MAX_POLICY_SERVICES: usize = 32;
/// Most classes in a policy (see [`MAX_POLICY_SERVICES`]).
pub const MAX_POLICY_CLASSES: usize = 64;
/// Most rules in a policy (see [`MAX_POLICY_SERVICES`]).
pub const MAX_POLICY_RULES: usize = 256;
/// Most mirror sessions in a policy (see [`MAX_POLICY_SERVICES`]).
pub const MAX_POLICY_SESSIONS: usize = 32;
/// Most bytes in a rule's payload prefix and mask (see [`MAX_POLICY_SERVICES`]).
pub const MAX_RULE_PAYLOAD_LEN: usize = 128;

const _: () = {
    assert!(MAX_HISTOGRAMS >= maps::LATENCY_HISTOGRAMS as usize * 3);
    assert!(MAX_POLICY_SERVICES >= maps::MAX_SERVICES as usize);
    assert!(MAX_POLICY_CLASSES >= maps::MAX_CLASSES as usize);
    assert!(MAX_POLICY_RULES >= maps::MAX_RULES as usize);
    assert!(MAX_POLICY_SESSIONS >= maps::MAX_SESSIONS as usize);
    assert!(MAX_RULE_PAYLOAD_LEN >= maps::PAYLOAD_MATCH_LEN);
};

/// Most heap bytes the collections of one decoded message take: for the worst variant, the sum
/// over its `Vec`s of limit x element size (on 64-bit targets 312 KiB, from an
/// [`IntervalReport`]). Everything else on a decoded message's heap is the contents of its
/// strings and byte strings, each an exact copy of payload bytes. So decoding a payload of `n`
/// bytes allocates at most `n + MAX_DECODED_OVERHEAD` bytes; see the [`frame`](super::frame)
/// module for what that means per connection.
///
/// A new `Vec` field needs a limit and a term here.
pub const MAX_DECODED_OVERHEAD: usize = {
    const fn items<T>(max: usize) -> usize {
        max * size_of::<T>()
    }
    const fn larger(a: usize, b: usize) -> usize {
        if a > b { a } else { b }
    }
    let hello = items::<AgentRole>(MAX_ROLES);
    let report = items::<HistogramRecord>(MAX_HISTOGRAMS)
        + items::<Counter>(MAX_COUNTERS)
        + items::<PatternCount>(MAX_PATTERNS);
    let policy = items::<ServiceAddr>(MAX_POLICY_SERVICES)
        + items::<ClassPolicy>(MAX_POLICY_CLASSES)
        + items::<ClassRule>(MAX_POLICY_RULES)
        + items::<MirrorSession>(MAX_POLICY_SESSIONS);
    larger(hello, larger(report, policy))
};

/// Vectors of up to `max` arbitrary elements, for fields whose limit is below the size of the
/// vectors `Arbitrary` generates by default (up to 100 elements).
#[cfg(test)]
fn up_to<T: proptest::arbitrary::Arbitrary>(
    max: usize,
) -> impl proptest::strategy::Strategy<Value = Vec<T>> {
    proptest::collection::vec(proptest::prelude::any::<T>(), 0..=max)
}

/// Everything that travels between an agent and the coordinator.
///
/// Variant order is part of the wire format: append new variants, never reorder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub enum Message {
    /// Agent -> coordinator, first message on a connection. Frozen (see module docs).
    Hello(Hello),
    /// Coordinator -> agent: the handshake succeeded. Frozen.
    Welcome(Welcome),
    /// Coordinator -> agent: the handshake failed; the connection closes after it. Frozen.
    Refused(Refused),
    /// Agent -> coordinator: one report interval's measurements.
    Report(IntervalReport),
    /// Coordinator -> agent: the report with this sequence number is durable in the store.
    Ack(Ack),
    /// Coordinator -> agent: the policy the agent must apply from now on.
    PolicyUpdate(PolicyUpdate),
}

impl Message {
    /// Whether this is one of the frozen handshake messages.
    pub const fn is_handshake(&self) -> bool {
        matches!(self, Self::Hello(_) | Self::Welcome(_) | Self::Refused(_))
    }
}

/// What an agent does on its host. A host may combine both roles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub enum AgentRole {
    /// Measures the live workload and mirrors sampled flows to shadows.
    Live,
    /// Receives mirrored flows and replays them against a shadow workload.
    Shadow,
}

/// First message of an agent. Frozen: never change its layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Hello {
    /// Oldest protocol version the agent speaks.
    pub min_version: u16,
    /// Newest protocol version the agent speaks.
    pub max_version: u16,
    /// The agent's software version (`CARGO_PKG_VERSION`), for the operator's eyes.
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub agent_version: String,
    /// Host name, for the operator's eyes; agents are identified by their certificate.
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub hostname: String,
    /// Roles the agent runs, at most [`MAX_ROLES`].
    #[serde(with = "MaxItems::<MAX_ROLES>")]
    #[cfg_attr(test, proptest(strategy = "up_to(MAX_ROLES)"))]
    pub roles: Vec<AgentRole>,
    /// Sequence number of the next report the agent will send, so the coordinator can tell a
    /// restarted agent's spool replay from new reports.
    pub next_report_seq: u64,
}

/// Successful handshake. Frozen: never change its layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Welcome {
    /// The version both sides use from now on.
    pub version: u16,
    /// The coordinator's software version.
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub coordinator_version: String,
    /// The name the coordinator knows this agent by (from its certificate).
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub agent_name: String,
}

/// Failed handshake. Frozen: never change its layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Refused {
    /// Why, in words for the agent's log; at most [`MAX_REASON_LEN`] bytes.
    #[serde(with = "MaxStr::<MAX_REASON_LEN>")]
    pub reason: String,
    /// Oldest protocol version the coordinator speaks.
    pub min_version: u16,
    /// Newest protocol version the coordinator speaks.
    pub max_version: u16,
}

/// One report interval of one agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct IntervalReport {
    /// Per-agent sequence number, increasing by one per report; with the agent's identity it
    /// makes each report count exactly once.
    pub seq: u64,
    /// Start of the interval, milliseconds since the Unix epoch (agent clock).
    pub interval_start_unix_ms: u64,
    /// Length of the interval in milliseconds.
    pub interval_ms: u32,
    /// Latency histograms measured in the interval, at most [`MAX_HISTOGRAMS`].
    #[serde(with = "MaxItems::<MAX_HISTOGRAMS>")]
    pub histograms: Vec<HistogramRecord>,
    /// Event counters for the interval (deltas, not running totals), at most [`MAX_COUNTERS`].
    #[serde(with = "MaxItems::<MAX_COUNTERS>")]
    pub counters: Vec<Counter>,
    /// Resource use of the whole host over the interval.
    pub host: ResourceUsage,
    /// Resource use of the workload (its cgroup or process tree), when the agent knows it.
    pub workload: Option<ResourceUsage>,
    /// How many new flows of each traffic pattern the agent saw in the interval, at most
    /// [`MAX_PATTERNS`].
    #[serde(with = "MaxItems::<MAX_PATTERNS>")]
    pub patterns: Vec<PatternCount>,
}

/// Which flows a histogram covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub enum FlowScope {
    /// Every flow of the service and class.
    All,
    /// Only the flows that were mirrored to shadows.
    Mirrored,
}

/// What a histogram measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub enum LatencyMetric {
    /// In-kernel: last request payload byte seen -> first response payload byte seen (TC).
    KernelFirstByte,
    /// Replayer: last request byte written -> first response byte read.
    ReplayFirstByte,
    /// Replayer: last request byte written -> last response byte read.
    ReplayLastByte,
}

/// One latency histogram of an interval, in nanoseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct HistogramRecord {
    /// The service (listening address) the exchanges belong to, e.g. `10.0.0.2:8080`.
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub service: String,
    /// Traffic class assigned by the policy's rules (0 = unclassified).
    pub class: u16,
    /// Which flows are covered.
    pub scope: FlowScope,
    /// What was measured.
    pub metric: LatencyMetric,
    /// The histogram, in HdrHistogram's V2 format.
    pub histogram: EncodedHistogram,
}

/// A named event counter. Names are stable identifiers documented where they are produced
/// (for example `packets`, `clones_sent`); a name the reader does not know is kept, not refused,
/// so agents can add counters without a protocol change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Counter {
    /// Stable identifier, `snake_case`.
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub name: String,
    /// Count over the interval.
    pub value: u64,
}

/// Resource use over one interval.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ResourceUsage {
    /// CPU time used in the interval, in microseconds (all CPUs together).
    pub cpu_time_us: u64,
    /// CPUs available (host CPUs, or the cgroup's quota), in thousandths of a CPU.
    pub cpu_capacity_millis: u32,
    /// Memory in use at the end of the interval, bytes.
    pub memory_used_bytes: u64,
    /// Memory available (host total, or the cgroup's limit), bytes.
    pub memory_limit_bytes: u64,
    /// Network bytes received in the interval.
    pub net_rx_bytes: u64,
    /// Network bytes sent in the interval.
    pub net_tx_bytes: u64,
    /// Disk bytes read in the interval.
    pub disk_read_bytes: u64,
    /// Disk bytes written in the interval.
    pub disk_write_bytes: u64,
}

/// How many new flows matched one traffic pattern in an interval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct PatternCount {
    /// Folded pattern key, e.g. `GET /api/items/{id}`; never contains ids or bodies. At most
    /// [`MAX_PATTERN_LEN`] bytes.
    #[serde(with = "MaxStr::<MAX_PATTERN_LEN>")]
    pub pattern: String,
    /// Flows seen with this pattern (among the flows that were inspected for patterns).
    pub flows: u64,
}

/// Acknowledgement that one report is durable in the coordinator's store; the agent may delete
/// it from its spool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Ack {
    /// The acknowledged report's sequence number.
    pub seq: u64,
}

/// The policy an agent applies, replacing whatever it applied before.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct PolicyUpdate {
    /// Increases with every change; an agent ignores an update older than the one it has.
    pub revision: u64,
    /// The policy itself.
    pub policy: AgentPolicy,
}

/// What one agent must do for one workload.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct AgentPolicy {
    /// Workload name.
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub workload: String,
    /// Report interval in milliseconds.
    pub report_interval_ms: u32,
    /// The workload's listening addresses, at most [`MAX_POLICY_SERVICES`].
    #[serde(with = "MaxItems::<MAX_POLICY_SERVICES>")]
    #[cfg_attr(test, proptest(strategy = "up_to(MAX_POLICY_SERVICES)"))]
    pub services: Vec<ServiceAddr>,
    /// Traffic classes and how much of each to mirror, at most [`MAX_POLICY_CLASSES`].
    #[serde(with = "MaxItems::<MAX_POLICY_CLASSES>")]
    #[cfg_attr(test, proptest(strategy = "up_to(MAX_POLICY_CLASSES)"))]
    pub classes: Vec<ClassPolicy>,
    /// Rules that assign a flow to a class; the first match in priority order wins. At most
    /// [`MAX_POLICY_RULES`].
    #[serde(with = "MaxItems::<MAX_POLICY_RULES>")]
    pub rules: Vec<ClassRule>,
    /// Where sampled flows are mirrored to, at most [`MAX_POLICY_SESSIONS`].
    #[serde(with = "MaxItems::<MAX_POLICY_SESSIONS>")]
    #[cfg_attr(test, proptest(strategy = "up_to(MAX_POLICY_SESSIONS)"))]
    pub mirror_sessions: Vec<MirrorSession>,
    /// Seed of the current sampling epoch (a new seed re-draws which new flows are sampled).
    pub sampling_seed: u64,
    /// Most new flows mirrored per second (0: no limit), a hard limit the data path holds
    /// whatever the class rates, so a burst, or a coordinator that stops steering the rates,
    /// never pushes the mirrored volume over the budget. Since protocol version 2.
    pub mirror_budget_flows_per_s: u32,
}

/// A listening address of the workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ServiceAddr {
    /// Address the workload listens on.
    pub addr: IpAddr,
    /// TCP port.
    pub port: u16,
}

/// A traffic class and its mirror sample rate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ClassPolicy {
    /// Class number used in rules and histograms (0 = unclassified).
    pub id: u16,
    /// Human name.
    #[serde(with = "MaxStr::<MAX_NAME_LEN>")]
    pub name: String,
    /// Share of the class's flows to mirror, in parts per million (0..=1_000_000).
    pub sample_rate_ppm: u32,
    /// Higher wins when rules of several classes match.
    pub priority: u16,
    /// The class's flows may spend the mirror budget's reserve, so a budget saturated by other
    /// classes still mirrors them (the learned plan's rare and new patterns).
    #[serde(default)]
    pub budget_priority: bool,
}

/// A rule assigning flows to a class. Empty fields match everything.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct ClassRule {
    /// Class assigned on match.
    pub class: u16,
    /// Destination (service) port, if the rule is limited to one.
    pub port: Option<u16>,
    /// Client address prefix, if the rule is limited to one.
    pub client_prefix: Option<IpPrefix>,
    /// Leading bytes of the flow's first payload to compare (after masking), at most
    /// [`MAX_RULE_PAYLOAD_LEN`].
    #[serde(with = "MaxBytes::<MAX_RULE_PAYLOAD_LEN>")]
    pub payload_prefix: Vec<u8>,
    /// Mask applied to the payload before comparison; same length as `payload_prefix`.
    #[serde(with = "MaxBytes::<MAX_RULE_PAYLOAD_LEN>")]
    pub payload_mask: Vec<u8>,
}

/// An address prefix such as `10.1.0.0/16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct IpPrefix {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length in bits.
    pub len: u8,
}

/// One destination for mirrored flows: a shadow host and the VXLAN network identifier that names
/// the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct MirrorSession {
    /// The shadow host's VXLAN endpoint address.
    pub shadow_addr: IpAddr,
    /// VXLAN network identifier (24 bits) naming the session.
    pub vni: u32,
}
