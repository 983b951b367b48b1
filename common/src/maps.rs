//! Layouts of the BPF maps that `agent-ebpf` writes and the agent reads.
//!
//! Every type here is shared byte-for-byte with the kernel: `#[repr(C)]`, `Copy`, all padding
//! spelled out as named fields, `u32` flags instead of `bool` (so a `Pod` type never carries
//! implicit padding whose contents the verifier or the reader could disagree about).

/// Which way a packet crossed the interface, as seen by a TC program.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Arriving at the interface (TC ingress).
    Ingress = 0,
    /// Leaving through the interface (TC egress).
    Egress = 1,
}

impl Direction {
    /// Both directions, in key order.
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    /// The raw value stored in map keys, or `None` for a value no program writes.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// Packet and byte counters of one interface and direction, kept per CPU by the kernel and summed
/// by the reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceCounters {
    /// Packets the program saw.
    pub packets: u64,
    /// Bytes of those packets, counting from the link-layer header (`skb->len`).
    pub bytes: u64,
}

impl IfaceCounters {
    /// Adds another CPU's (or another interval's) counts to this one.
    #[must_use]
    pub const fn merged(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// Name of the per-CPU array of [`IfaceCounters`], indexed by [`iface_slot`].
pub const IFACE_COUNTERS_MAP: &str = "IFACE_COUNTERS";
/// Interface slots in the counters array. An array, not a hash keyed by ifindex, because a
/// per-CPU array lookup is a few instructions while a hash lookup is the largest single cost of a
/// packet that is not ours; interfaces whose ifindex differ by a multiple of this share a slot.
pub const IFACE_SLOTS: u32 = 1024;

/// Index in [`IFACE_COUNTERS_MAP`] of an interface and direction.
#[inline(always)]
pub const fn iface_slot(ifindex: u32, direction: Direction) -> u32 {
    (ifindex % IFACE_SLOTS) * 2 + direction as u32
}
/// Name of the TC program attached to ingress.
pub const TC_INGRESS_PROGRAM: &str = "doppel_tc_ingress";
/// Name of the TC program attached to egress.
pub const TC_EGRESS_PROGRAM: &str = "doppel_tc_egress";
/// Read-only global (`u8`) the loader sets to 1 when the kernel has `__sk_buff.tstamp_type`
/// (Linux 5.18), so that egress may take TCP's own send stamp instead of reading the clock.
pub const TSTAMP_TYPE_READABLE_GLOBAL: &str = "TSTAMP_TYPE_READABLE";

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, two `u64` and no padding, so every bit pattern is valid.
    unsafe impl aya::Pod for super::IfaceCounters {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IfaceCounters>(), 16);
    }

    #[test]
    fn direction_round_trips_through_raw() {
        for d in Direction::ALL {
            assert_eq!(Direction::from_raw(d as u32), Some(d));
        }
        assert_eq!(Direction::from_raw(2), None);
    }

    #[test]
    fn merged_adds_fieldwise() {
        let a = IfaceCounters {
            packets: 2,
            bytes: 100,
        };
        let b = IfaceCounters {
            packets: 3,
            bytes: 60,
        };
        assert_eq!(
            a.merged(b),
            IfaceCounters {
                packets: 5,
                bytes: 160
            }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The live data path: services, flows, classification rules, mirror sessions, latency histograms.
// ---------------------------------------------------------------------------------------------

/// Most services (listening addresses) one agent measures.
pub const MAX_SERVICES: u32 = 8;
/// Traffic classes per agent (class 0 is "unclassified").
pub const MAX_CLASSES: u32 = 16;
/// Classification rules per agent.
pub const MAX_RULES: u32 = 64;
/// Mirror sessions (shadow host + VNI) per agent.
pub const MAX_SESSIONS: u32 = 8;
/// Leading payload bytes a rule can match.
pub const PAYLOAD_MATCH_LEN: usize = 32;
/// Leading payload bytes sent to user space for pattern discovery.
pub const PATTERN_SAMPLE_LEN: usize = 64;
/// Flows tracked at once (LRU: the least recently used is evicted when full).
pub const FLOW_MAP_ENTRIES: u32 = 65_536;

/// A service: a listening address, as kept in [`DatapathConfig::services`]. IPv4 is stored
/// IPv4-mapped (`::ffff:a.b.c.d`), so one key type serves both families; words hold the address
/// bytes in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Address bytes, network order, IPv4-mapped for IPv4.
    pub addr: [u32; 4],
    /// TCP port, network byte order.
    pub port_be: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}

/// Key of `FLOWS`: one TCP connection to a service, seen from the service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Client address, as in [`ServiceKey::addr`].
    pub client_addr: [u32; 4],
    /// Client port, network byte order.
    pub client_port_be: u16,
    /// Service port, network byte order.
    pub service_port_be: u16,
    /// Id of the service (its index in [`DatapathConfig::services`]).
    pub service_id: u32,
}

/// The flow began with a SYN the program saw, so its stream is complete from the start and it
/// may be mirrored.
pub const FLOW_SEEN_SYN: u32 = 1;
/// Class and sampling were decided (on the first client payload packet).
pub const FLOW_DECIDED: u32 = 1 << 1;
/// The flow is mirrored to every session.
pub const FLOW_SAMPLED: u32 = 1 << 2;
/// Client payload arrived since the last response payload: an exchange is open.
pub const FLOW_AWAITING_RESPONSE: u32 = 1 << 3;
/// The client closed its side (FIN) while an exchange was open: the entry stays until the
/// response closes the exchange (or the service ends the flow), so a client that half-closes
/// right after its request (`shutdown(SHUT_WR)`, HTTP/1.0-style tools) is measured too.
pub const FLOW_CLIENT_CLOSED: u32 = 1 << 4;

/// Value of `FLOWS`.
///
/// Ingress (the client's packets) and egress (the server's) of one flow usually run on two CPUs,
/// and both write this value: ingress the clocks, egress the `FLOW_AWAITING_RESPONSE` bit it
/// clears. Measured and not kept (`cargo xtask bench datapath --baseline-agent`, one run each):
/// an exchange open while `last_request_ns` differs from an `answered_request_ns` that egress
/// alone writes, 64 bytes past the ingress fields, so that egress never writes a line ingress
/// reads, with a pure ACK rewriting the idle clock only 1/16 of the timeout late: inspection
/// under load 160 ns a packet against 143; the same with the value padded to 120 bytes, so a
/// map element (the kernel's 48-byte header, key, value) is exactly three cache lines and no
/// line holds two flows: 189 against 168. The larger element costs more than the shared line.
/// Under load a closing response cost egress about 205 ns against 55 ns in `BPF_PROG_TEST_RUN`;
/// `perf record -a -g` (cpu-clock) put 27 % of it in `htab_map_hash`, nearly all at one
/// instruction, a load of the key that waited for the store buffer to drain: the hash reads the
/// key in 4-byte words, and the ports' word had been stored as two 2-byte halves, which a load
/// cannot take its bytes from. The programs now store the key in 8-byte words (`KeySlot` in the
/// eBPF crate): 4.5 % there, egress 226 -> 190 ns a packet. Most of what is left is
/// `lookup_nulls_elem_raw` (33 %), reading the flow's element. A third layout measured worse
/// too: a 16-byte IPv4 key and the value padded to 64 bytes, so the kernel's header and the key
/// fill one line that neither side writes and the value another (128-byte elements): inspection
/// 143 against 133 ns, egress 197 against 188. On this machine every larger element has cost
/// more than the lines it was to keep apart; what the layouts changed (one or two lines moving
/// between the CPUs an exchange) is not what sets the cost here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// `bpf_ktime_get_ns` of the latest client payload packet of the open exchange.
    pub last_request_ns: u64,
    /// `bpf_ktime_get_coarse_ns` (CLOCK_MONOTONIC at the last tick) of the flow's latest client
    /// packet (idle timeout).
    pub last_seen_ns: u64,
    /// `FLOW_*` bits.
    pub flags: u32,
    /// Class assigned by the rules (0 = unclassified).
    pub class: u32,
    /// `bpf_ktime_get_coarse_ns` of the flow's latest copy to the sessions (mirrored flows).
    pub last_copy_ns: u64,
}

/// A mirrored flow's pure ACKs (no payload, no FIN or RST) are not copied: the shadow replays
/// the client's bytes over its own connection, so they carry nothing it uses, and on
/// request/response traffic with think time they are about half of a client's packets. One is
/// still copied when the flow sent the sessions nothing for this long, so that a shadow's idle
/// timer (60 s by default) does not end a flow whose client is only receiving (a long download).
pub const MIRROR_KEEPALIVE_NS: u64 = 10_000_000_000;

/// Value of `CLASSES`, indexed by class id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassConfig {
    /// A flow is sampled when its 32-bit hash is below this (`1 << 32` = every flow).
    pub sample_threshold: u64,
    /// Higher wins when rules of several classes match.
    pub priority: u32,
    /// `CLASS_*` bits.
    pub flags: u32,
}

/// The class's sampled flows may spend the mirror budget's reserve (see
/// [`DatapathConfig::mirror_reserve_ns`]): the rare and new patterns' classes, which a bucket
/// saturated by common traffic would otherwise turn away as often as any other.
pub const CLASS_BUDGET_PRIORITY: u32 = 1;

/// How much of the mirror budget's one-second burst is held back for [`CLASS_BUDGET_PRIORITY`]
/// classes when a policy has any, at least: the reserve is never less than
/// [`MIRROR_RESERVE_MIN_FLOWS`] flows' spacing, nor more than the burst less one flow (so at a
/// budget of 2 flows/s it is one flow, and at 1 flow/s, a burst of one flow, there is none:
/// the priority classes then have only their hash rates). `cargo xtask eval mirror` measured 100 ms
/// against 300 ms (mix divergence 0.0065 against 0.0080, rare recall 0.995 against 0.994).
pub const MIRROR_BUDGET_RESERVE_NS: u64 = 100_000_000;
/// The reserve in flows, at least. A common flow admitted at the reserve's edge moves the
/// bucket one flow's spacing on; a reserve shorter than that leaves the priority classes only
/// the gaps between common flows (measured in `mirror_learning` at 6 flows/s, 100 ms against
/// 167 ms: three rare flows, none mirrored), so it must hold a whole flow, and a second for the
/// next priority flow before the bucket refills.
pub const MIRROR_RESERVE_MIN_FLOWS: u64 = 2;
/// The most of the budget [`CLASS_BUDGET_PRIORITY`] classes may take, in parts per million (their
/// lane). Every priority flow is held to the lane, the reserve included, so the common classes
/// keep at least 85 % of the budget however a still-boosted pattern bursts before the next plan.
/// At a budget of a few flows/s this leaves the priority classes less than the common ones (at
/// 1 flow/s, one priority flow in 6.7 s). `cargo xtask eval mirror` measured 30 % (the share the
/// planner then let boosts plan for), 15 % and 10 %: mix divergence 0.0065, 0.0063 and 0.0091
/// on its default traces, 0.0296, 0.0250 and 0.0237 on six more, rare recall 0.995 to 0.988
/// throughout. The planner now plans boosts for this share too (0.0064 -> 0.0058).
pub const MIRROR_PRIORITY_SHARE_PPM: u64 = 150_000;

/// The rule only matches this destination port.
pub const RULE_MATCH_PORT: u32 = 1;
/// The rule only matches clients in its prefix.
pub const RULE_MATCH_PREFIX: u32 = 1 << 1;

/// Value of `RULES`, indexed by rule number (`< MAX_RULES`); `RULE_*` bits in `flags`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `RULE_MATCH_*` bits.
    pub flags: u32,
    /// Class assigned on match.
    pub class: u32,
    /// Client prefix address, as in [`ServiceKey::addr`].
    pub prefix_addr: [u32; 4],
    /// Client prefix as a mask over the 128-bit (IPv4-mapped) address, per word.
    pub prefix_mask: [u32; 4],
    /// Destination port, network byte order.
    pub port_be: u16,
    /// How many leading payload bytes are compared (0..=32); the payload must be this long.
    pub payload_len: u8,
    /// Explicit padding, always zero.
    pub _pad: u8,
    /// Explicit padding (aligns the words below), always zero.
    pub _pad2: u32,
    /// Expected leading payload bytes, already masked, as native-endian words (the program
    /// compares 8 bytes at a time: 4 operations per rule instead of 32).
    pub payload: [u64; PAYLOAD_MATCH_LEN / 8],
    /// Mask applied to the payload before comparing; zero past `payload_len`.
    pub payload_mask: [u64; PAYLOAD_MATCH_LEN / 8],
}

/// Value of `SESSIONS`, indexed by session number (`< MAX_SESSIONS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MirrorSessionConfig {
    /// Remote IPv4 address in host byte order (what `bpf_skb_set_tunnel_key` wants), when
    /// `ipv6` is 0.
    pub remote_ipv4: u32,
    /// Remote IPv6 address, network order bytes as words, when `ipv6` is 1.
    pub remote_ipv6: [u32; 4],
    /// VXLAN network identifier naming the session.
    pub vni: u32,
    /// 1 when the remote is IPv6.
    pub ipv6: u32,
    /// `ifindex` of this session's own VXLAN device (fixed remote and VNI), 0 to send through
    /// the external-mode device with a tunnel key instead. The agent fills it in.
    pub ifindex: u32,
}

/// Value of `CONFIG` (a one-entry array): what the programs need beyond the tables, and the
/// services themselves. Every packet reads this value anyway, so finding its service in it costs a
/// few compares on memory already loaded, where a hash map lookup cost a hash and one or two more
/// cache lines per packet (issue 3's per-packet budget).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Seed of the sampling epoch.
    pub sampling_seed: u64,
    /// A flow idle this long is treated as new (and so never mirrored).
    pub flow_idle_timeout_ns: u64,
    /// `ifindex` of the VXLAN device (external mode) clones are redirected to.
    pub vxlan_ifindex: u32,
    /// Sessions in use (`SESSIONS[0..session_count]`).
    pub session_count: u32,
    /// Rules in use (`RULES[0..rule_count]`).
    pub rule_count: u32,
    /// One new flow in this many sends its first payload bytes for pattern discovery (0 = off).
    pub pattern_sample_one_in: u32,
    /// Services in use (`services[0..service_count]`).
    pub service_count: u32,
    /// Mirror budget as the spacing of mirrored flows, in ns (`1e9 / flows_per_s`; 0: no limit).
    /// Every flow the hash samples must conform to one host-wide GCRA bucket, `MIRROR_BUCKET`.
    pub mirror_interval_ns: u32,
    /// How far ahead of now the bucket's theoretical arrival time may run: a second's burst of
    /// the budget, `(flows_per_s - 1) * mirror_interval_ns`.
    pub mirror_tolerance_ns: u64,
    /// How much nearer now the theoretical arrival time must be for a flow of a class without
    /// [`CLASS_BUDGET_PRIORITY`] ([`MIRROR_BUDGET_RESERVE_NS`] or [`MIRROR_RESERVE_MIN_FLOWS`]
    /// flows' spacing, whichever is longer, within the burst; 0 when no class has it): common
    /// traffic cannot fill the last of the bucket, so a saturated bucket still admits the
    /// priority classes' flows.
    pub mirror_reserve_ns: u64,
    /// Spacing of the priority lane (`MIRROR_BUCKET[1]`), which every priority flow must also
    /// conform to: `mirror_interval_ns` over [`MIRROR_PRIORITY_SHARE_PPM`], with the same
    /// tolerance.
    pub mirror_priority_interval_ns: u64,
    /// The workload's listening addresses; a service's id is its index here.
    pub services: [ServiceKey; MAX_SERVICES as usize],
}

/// Value of `MIRROR_BUCKET` (a two-entry array shared by every CPU): theoretical arrival times
/// (GCRA), `bpf_ktime_get_coarse_ns`; entry 0 is the budget, entry 1 the priority lane. A sampled
/// flow conforms when entry 0 is at most `mirror_tolerance_ns` ahead of now (less the reserve for
/// a common class), and moves it one `mirror_interval_ns` on with a compare-and-swap, so the
/// budget holds host-wide however flows spread over CPUs.
pub type MirrorBucket = u64;

/// What the pattern ring buffer carries: the first payload bytes of a sampled new flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatternSample {
    /// Service the flow belongs to.
    pub service_id: u32,
    /// Valid bytes in `bytes`.
    pub len: u32,
    /// Leading payload bytes.
    pub bytes: [u8; PATTERN_SAMPLE_LEN],
}

/// Indexes of the `COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathCounter {
    /// Packets inspected (both directions). Its slot stays zero: user space reports the sum of
    /// the per-interface counters under this name.
    Packets = 0,
    /// Bytes of those packets (derived the same way).
    Bytes,
    /// Packets not parsed further (not IPv4/IPv6 TCP, VLAN-tagged, fragmented, IP options,
    /// IPv6 extension headers, truncated): passed untouched.
    ParseSkipped,
    /// TCP packets of no configured service.
    OtherTraffic,
    /// New flows (SYN seen).
    FlowsSeen,
    /// Flows first seen mid-stream (open before the agent, or idle-expired): measured only.
    FlowsMidstream,
    /// Flows decided as mirrored.
    FlowsSampled,
    /// Clones handed to the VXLAN device.
    ClonesSent,
    /// `bpf_skb_set_tunnel_key` or `bpf_clone_redirect` failures.
    CloneFailures,
    /// Flow map insertions that failed (degrades to "not sampled", never a drop).
    MapFull,
    /// Request/response exchanges measured.
    Exchanges,
    /// Pattern samples sent to user space.
    PatternSamples,
    /// Pattern samples dropped because the ring buffer was full.
    PatternDrops,
    /// Exchanges whose first response bytes are an HTTP/1.x 5xx status line.
    Responses5xx,
    /// Exchanges whose first response bytes are a protocol error reply: RESP `-`, PostgreSQL
    /// ErrorResponse. The same classes the shadow counts, so live has an error rate too.
    ErrorReplies,
    /// Flows the hash sampled that the mirror budget's bucket turned away (measured, not
    /// mirrored).
    BudgetLimited,
}

impl DatapathCounter {
    /// Every counter, in index order.
    pub const ALL: [Self; 16] = [
        Self::Packets,
        Self::Bytes,
        Self::ParseSkipped,
        Self::OtherTraffic,
        Self::FlowsSeen,
        Self::FlowsMidstream,
        Self::FlowsSampled,
        Self::ClonesSent,
        Self::CloneFailures,
        Self::MapFull,
        Self::Exchanges,
        Self::PatternSamples,
        Self::PatternDrops,
        Self::Responses5xx,
        Self::ErrorReplies,
        Self::BudgetLimited,
    ];

    /// Stable `snake_case` name used in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Packets => "packets",
            Self::Bytes => "bytes",
            Self::ParseSkipped => "parse_skipped",
            Self::OtherTraffic => "other_traffic",
            Self::FlowsSeen => "flows_seen",
            Self::FlowsMidstream => "flows_midstream",
            Self::FlowsSampled => "flows_sampled",
            Self::ClonesSent => "clones_sent",
            Self::CloneFailures => "clone_failures",
            Self::MapFull => "map_full",
            Self::Exchanges => "exchanges",
            Self::PatternSamples => "pattern_samples",
            Self::PatternDrops => "pattern_drops",
            Self::Responses5xx => "http_5xx",
            Self::ErrorReplies => "error_replies",
            Self::BudgetLimited => "budget_limited",
        }
    }
}

/// Report counter name prefix of one class's classified flows in an interval (`class_flows_3`:
/// new flows whose first payload the live data path classified into class 3).
pub const CLASS_FLOWS_COUNTER: &str = "class_flows_";
/// Report counter name prefix of one class's mirrored flows in an interval (`class_mirrored_3`).
pub const CLASS_MIRRORED_COUNTER: &str = "class_mirrored_";

/// Entries of the `COUNTERS` array.
pub const COUNTER_SLOTS: u32 = DatapathCounter::ALL.len() as u32;

// --- Latency histograms -----------------------------------------------------------------------
//
// Log-linear buckets over nanoseconds: values below 1.024 µs share bucket 0; above, each power of
// two is split into 64 equal sub-buckets, so a bucket is at most 1/64 (1.6 %) of its value wide
// and its midpoint is within 0.8 % of anything in it. The top octave ends at 2^36 ns (68.7 s).

/// Sub-buckets per power of two (2^6).
pub const LATENCY_SUB_BITS: u32 = 6;
/// Lowest power of two with its own sub-buckets: 2^10 ns.
pub const LATENCY_MIN_SHIFT: u32 = 10;
/// Values at or above 2^36 ns land in the last bucket.
pub const LATENCY_MAX_SHIFT: u32 = 36;
/// Buckets per histogram.
pub const LATENCY_BUCKETS: u32 =
    1 + (LATENCY_MAX_SHIFT - LATENCY_MIN_SHIFT) * (1 << LATENCY_SUB_BITS);
/// Histograms: service x class x {all flows, mirrored flows}.
pub const LATENCY_HISTOGRAMS: u32 = MAX_SERVICES * MAX_CLASSES * 2;

/// Index of the most significant set bit of a non-zero value, by binary search (BPF has no
/// count-leading-zeros instruction, and this keeps the verifier's work constant).
#[inline(always)]
pub const fn msb(mut v: u64) -> u32 {
    let mut n = 0;
    if v >= 1 << 32 {
        v >>= 32;
        n += 32;
    }
    if v >= 1 << 16 {
        v >>= 16;
        n += 16;
    }
    if v >= 1 << 8 {
        v >>= 8;
        n += 8;
    }
    if v >= 1 << 4 {
        v >>= 4;
        n += 4;
    }
    if v >= 1 << 2 {
        v >>= 2;
        n += 2;
    }
    if v >= 1 << 1 {
        n += 1;
    }
    n
}

/// Bucket of a latency in nanoseconds.
#[inline(always)]
pub const fn latency_bucket(ns: u64) -> u32 {
    if ns < 1 << LATENCY_MIN_SHIFT {
        return 0;
    }
    if ns >= 1 << LATENCY_MAX_SHIFT {
        return LATENCY_BUCKETS - 1;
    }
    let top = msb(ns);
    let sub = ((ns >> (top - LATENCY_SUB_BITS)) & ((1 << LATENCY_SUB_BITS) - 1)) as u32;
    1 + (top - LATENCY_MIN_SHIFT) * (1 << LATENCY_SUB_BITS) + sub
}

/// The value a bucket stands for: its midpoint (bucket 0: 512 ns; the last: 2^36 ns).
pub const fn latency_bucket_value(bucket: u32) -> u64 {
    if bucket == 0 {
        return 1 << (LATENCY_MIN_SHIFT - 1);
    }
    if bucket >= LATENCY_BUCKETS - 1 {
        return 1 << LATENCY_MAX_SHIFT;
    }
    let b = bucket - 1;
    let top = LATENCY_MIN_SHIFT + b / (1 << LATENCY_SUB_BITS);
    let sub = (b % (1 << LATENCY_SUB_BITS)) as u64;
    let width = 1u64 << (top - LATENCY_SUB_BITS);
    (1u64 << top) + sub * width + width / 2
}

/// First index in `LATENCY` of the histogram of (service, class, mirrored-only or all).
#[inline(always)]
pub const fn latency_histogram_base(service_id: u32, class: u32, mirrored: bool) -> u32 {
    ((service_id * MAX_CLASSES + class) * 2 + mirrored as u32) * LATENCY_BUCKETS
}

/// Map names, shared by the programs and the loader.
pub mod names {
    /// `LruHashMap<FlowKey, FlowState>`.
    pub const FLOWS: &str = "FLOWS";
    /// `Array<ClassConfig>` of `MAX_CLASSES`.
    pub const CLASSES: &str = "CLASSES";
    /// `Array<Rule>` of `MAX_RULES`.
    pub const RULES: &str = "RULES";
    /// `Array<MirrorSessionConfig>` of `MAX_SESSIONS`.
    pub const SESSIONS: &str = "SESSIONS";
    /// `Array<DatapathConfig>` of 1.
    pub const CONFIG: &str = "CONFIG";
    /// `PerCpuArray<u64>` of `COUNTER_SLOTS`.
    pub const COUNTERS: &str = "COUNTERS";
    /// `PerCpuArray<u64>` per class: flows decided, then flows sampled (`2 * MAX_CLASSES`).
    pub const CLASS_FLOWS: &str = "CLASS_FLOWS";
    /// `PerCpuArray<u64>` of `LATENCY_HISTOGRAMS * LATENCY_BUCKETS` cumulative bucket counts.
    pub const LATENCY: &str = "LATENCY";
    /// `RingBuf` of [`super::PatternSample`].
    pub const PATTERNS: &str = "PATTERNS";
    /// Per-CPU mirror-budget buckets.
    pub const MIRROR_BUCKET: &str = "MIRROR_BUCKET";
    /// `Array<i64>` of 1: the last failed copy's error (a negative errno from
    /// `bpf_skb_set_tunnel_key` or `bpf_clone_redirect`), 0 before any, for the agent's log.
    pub const LAST_CLONE_ERROR: &str = "LAST_CLONE_ERROR";
}

#[cfg(feature = "user")]
mod datapath_pod {
    use super::*;
    // SAFETY (all impls): `#[repr(C)]`, integer and integer-array fields only, every padding
    // byte spelled out as a field (see the size assertions in the tests), so any bit pattern is
    // a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for ClassConfig {}
    unsafe impl aya::Pod for Rule {}
    unsafe impl aya::Pod for MirrorSessionConfig {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for PatternSample {}
}

#[cfg(test)]
mod datapath_tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn datapath_layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 20);
        assert_eq!(size_of::<FlowKey>(), 24);
        // The eBPF programs write the key as three 8-byte words in this order (`KeySlot`).
        assert_eq!(core::mem::offset_of!(FlowKey, client_port_be), 16);
        assert_eq!(core::mem::offset_of!(FlowKey, service_port_be), 18);
        assert_eq!(core::mem::offset_of!(FlowKey, service_id), 20);
        assert_eq!(size_of::<FlowState>(), 32);
        assert_eq!(size_of::<ClassConfig>(), 16);
        assert_eq!(size_of::<Rule>(), 4 + 4 + 16 + 16 + 2 + 1 + 1 + 4 + 32 + 32);
        assert_eq!(size_of::<MirrorSessionConfig>(), 4 + 16 + 4 + 4 + 4);
        assert_eq!(
            size_of::<DatapathConfig>(),
            8 + 8 + 4 * 6 + 8 * 3 + 20 * MAX_SERVICES as usize
        );
        assert_eq!(size_of::<PatternSample>(), 8 + PATTERN_SAMPLE_LEN);
    }

    #[test]
    fn msb_matches_leading_zeros() {
        for shift in 0..64 {
            for v in [
                1u64 << shift,
                (1u64 << shift) | 1,
                (1u64 << shift).wrapping_mul(3) >> 1,
            ] {
                if v != 0 {
                    assert_eq!(msb(v), 63 - v.leading_zeros(), "v={v}");
                }
            }
        }
    }

    #[test]
    fn buckets_are_monotone_and_within_one_percent_from_a_microsecond_to_a_minute() {
        let mut previous = 0;
        let mut ns = 1_000u64;
        while ns <= 60_000_000_000 {
            let bucket = latency_bucket(ns);
            assert!(bucket >= previous, "bucket of {ns} went down");
            assert!(bucket < LATENCY_BUCKETS);
            previous = bucket;
            if ns >= 1 << LATENCY_MIN_SHIFT {
                let value = latency_bucket_value(bucket) as f64;
                let error = (value - ns as f64).abs() / ns as f64;
                assert!(
                    error <= 0.01,
                    "{ns} ns -> bucket {bucket} = {value} ns ({error:.4})"
                );
            }
            ns += ns / 97 + 1;
        }
        assert_eq!(latency_bucket(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(latency_bucket(0), 0);
    }
}

// ---------------------------------------------------------------------------------------------
// Shadow admission: the XDP program on the shadow's receiving interface.
// ---------------------------------------------------------------------------------------------

/// Name of the XDP program that admits mirror traffic only from registered sessions.
pub const XDP_ADMIT_PROGRAM: &str = "doppel_xdp_admit";
/// Most (source, VNI) pairs one shadow admits.
pub const MAX_ADMITTED: u32 = 1024;

/// Key of `ADMITTED`: a mirror source (the outer IP source, as in [`ServiceKey::addr`]) and the
/// session's VNI.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AdmitKey {
    /// Outer source address bytes, network order, IPv4-mapped for IPv4.
    pub addr: [u32; 4],
    /// VNI (24 bits).
    pub vni: u32,
}

/// Value of `ADMIT_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AdmitConfig {
    /// UDP destination port of mirror traffic, network byte order (0: the program passes all).
    pub udp_port_be: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}

/// Indexes of the `ADMIT_COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdmitCounter {
    /// Mirror datagrams from an admitted (source, VNI): passed to the stack.
    Admitted = 0,
    /// Mirror datagrams from a source or VNI not admitted: dropped.
    NotAdmitted,
    /// Datagrams to the mirror port too short for a VXLAN header, or IP fragments of them:
    /// dropped.
    Malformed,
    /// Everything else (not UDP to the mirror port): passed untouched.
    Other,
}

impl AdmitCounter {
    /// Every counter, in index order.
    pub const ALL: [Self; 4] = [
        Self::Admitted,
        Self::NotAdmitted,
        Self::Malformed,
        Self::Other,
    ];

    /// Stable report name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Admitted => "xdp_admitted",
            Self::NotAdmitted => "xdp_dropped_not_admitted",
            Self::Malformed => "xdp_dropped_malformed",
            Self::Other => "xdp_passed_other",
        }
    }
}

/// Map names of the admission program.
pub mod admit_names {
    /// `HashMap<AdmitKey, u32>` (the value is unused, 1).
    pub const ADMITTED: &str = "ADMITTED";
    /// `Array<AdmitConfig>` of 1.
    pub const ADMIT_CONFIG: &str = "ADMIT_CONFIG";
    /// `PerCpuArray<u64>` indexed by [`super::AdmitCounter`].
    pub const ADMIT_COUNTERS: &str = "ADMIT_COUNTERS";
    /// `Array<AdmitKey>` of 1: the (source, VNI) of the last datagram not admitted, all zero
    /// before any, so the agent's log can name a misconfigured session.
    pub const REJECTED: &str = "REJECTED";
}

#[cfg(feature = "user")]
mod admit_pod {
    // SAFETY: `#[repr(C)]`, integer fields only, no implicit padding (tested below).
    unsafe impl aya::Pod for super::AdmitKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::AdmitConfig {}
}

#[cfg(test)]
mod admit_tests {
    #[test]
    fn admit_layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<super::AdmitKey>(), 20);
        assert_eq!(size_of::<super::AdmitConfig>(), 4);
    }
}
