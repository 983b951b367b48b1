//! The messages of protocol version 1. See the parent module for the versioning rules.

use std::{net::IpAddr, string::String, vec::Vec};

#[cfg(test)]
use proptest_derive::Arbitrary;
use serde::{Deserialize, Serialize};

use super::histogram::EncodedHistogram;

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
    pub agent_version: String,
    /// Host name, for the operator's eyes; agents are identified by their certificate.
    pub hostname: String,
    /// Roles the agent runs.
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
    pub coordinator_version: String,
    /// The name the coordinator knows this agent by (from its certificate).
    pub agent_name: String,
}

/// Failed handshake. Frozen: never change its layout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct Refused {
    /// Why, in words for the agent's log.
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
    /// Latency histograms measured in the interval.
    pub histograms: Vec<HistogramRecord>,
    /// Event counters for the interval (deltas, not running totals).
    pub counters: Vec<Counter>,
    /// Resource use of the whole host over the interval.
    pub host: ResourceUsage,
    /// Resource use of the workload (its cgroup or process tree), when the agent knows it.
    pub workload: Option<ResourceUsage>,
    /// How many new flows of each traffic pattern the agent saw in the interval.
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
    /// Folded pattern key, e.g. `GET /api/items/{id}`; never contains ids or bodies.
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
    pub workload: String,
    /// Report interval in milliseconds.
    pub report_interval_ms: u32,
    /// The workload's listening addresses.
    pub services: Vec<ServiceAddr>,
    /// Traffic classes and how much of each to mirror.
    pub classes: Vec<ClassPolicy>,
    /// Rules that assign a flow to a class; the first match in priority order wins.
    pub rules: Vec<ClassRule>,
    /// Where sampled flows are mirrored to.
    pub mirror_sessions: Vec<MirrorSession>,
    /// Seed of the current sampling epoch (a new seed re-draws which new flows are sampled).
    pub sampling_seed: u64,
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
    pub name: String,
    /// Share of the class's flows to mirror, in parts per million (0..=1_000_000).
    pub sample_rate_ppm: u32,
    /// Higher wins when rules of several classes match.
    pub priority: u16,
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
    /// Leading bytes of the flow's first payload to compare (after masking).
    #[serde(with = "serde_bytes")]
    pub payload_prefix: Vec<u8>,
    /// Mask applied to the payload before comparison; same length as `payload_prefix`.
    #[serde(with = "serde_bytes")]
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
