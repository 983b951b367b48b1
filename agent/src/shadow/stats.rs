//! What the shadow counts and times, shared by the receiver and the replay tasks and drained by
//! the reporter every interval.

use std::{
    collections::BTreeMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use hdrhistogram::Histogram;

use doppel_common::maps::PATTERN_SAMPLE_LEN;

use crate::{datapath::new_latency_histogram, patterns::PatternCounts};

macro_rules! shadow_counters {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// Event counters of the shadow role; the names are the report's stable keys.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum ShadowCounter {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ShadowCounter {
            /// Every counter, in report order.
            pub const ALL: &[Self] = &[$(Self::$variant,)*];

            /// Stable report name.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }
    };
}

shadow_counters! {
    /// Datagrams received on the mirror socket.
    Datagrams => "datagrams",
    /// Datagrams from a (source, VNI) not admitted (XDP off or bypassed): dropped.
    NotAdmitted => "not_admitted",
    /// Not VXLAN.
    DecodeBadVxlan => "decode_bad_vxlan",
    /// Inner Ethernet frame truncated.
    DecodeShortFrame => "decode_short_frame",
    /// Inner frame not IPv4/IPv6.
    DecodeNotIp => "decode_not_ip",
    /// Inner IP header malformed or lengths absurd.
    DecodeBadIp => "decode_bad_ip",
    /// Inner IPv4 fragment.
    DecodeFragment => "decode_fragment",
    /// Inner packet not TCP.
    DecodeNotTcp => "decode_not_tcp",
    /// Inner TCP header malformed.
    DecodeBadTcp => "decode_bad_tcp",
    /// Segments to a port that is not replayed.
    UnknownService => "segments_unknown_service",
    /// Segments of flows already finished or given up, or with no payload before a flow began.
    LateSegments => "segments_ignored",
    /// Duplicate payload bytes (retransmits, mirror duplicates).
    DuplicateBytes => "duplicate_bytes",
    /// Flows begun.
    FlowsStarted => "flows_started",
    /// Flows whose stream arrived whole to its FIN.
    FlowsCompleted => "flows_completed",
    /// Flows the client reset.
    FlowsReset => "flows_reset",
    /// Flows that went idle without a FIN; replayed as far as they arrived.
    FlowsIdleEnded => "flows_idle_ended",
    /// Flows abandoned because a hole never filled (no longer happens: holes are skipped;
    /// kept so dashboards reading it see 0).
    AbandonedGap => "flows_abandoned_gap",
    /// Flows abandoned because their start was lost.
    AbandonedStartMissed => "flows_abandoned_start_missed",
    /// Flows abandoned because their own buffer limit was hit.
    AbandonedFlowBuffer => "flows_abandoned_flow_buffer",
    /// Oldest flows evicted to keep total memory within its limit.
    EvictedMemory => "flows_evicted_memory",
    /// Oldest flows evicted because the flow table was full.
    EvictedTableFull => "flows_evicted_table_full",
    /// Replay connections opened (one per flow copy).
    Connections => "replay_connections",
    /// Replay connections refused or failed.
    ConnectFailures => "connect_failures",
    /// Replay connections that timed out.
    ConnectTimeouts => "connect_timeouts",
    /// Replay connections reset or closed by the workload mid-exchange.
    ReplayResets => "replay_resets",
    /// Responses that did not arrive (or stalled) within the response timeout.
    ResponseTimeouts => "response_timeouts",
    /// Flow copies dropped because their replay could not keep up or failed (data discarded).
    CopiesFailed => "copies_failed",
    /// Flows still open when the agent stopped: ended there, neither completed nor reset.
    FlowsEndedAtStop => "flows_ended_at_stop",
    /// Client messages the agent stopped before writing: the backlog left when the drain
    /// deadline passed (`drain_timeout_ms`).
    ExchangesUnreplayed => "exchanges_unreplayed",
    /// Client bytes the agent stopped before writing (those messages, partial ones, and bytes
    /// held behind holes).
    BytesUnreplayed => "bytes_unreplayed",
    /// Exchanges replayed and answered.
    Exchanges => "exchanges",
    /// HTTP requests skipped by the allow/deny lists.
    RequestsDenied => "requests_denied",
    /// Flows whose replay stopped because a message could not be delimited (one larger than
    /// the flow buffer) or the workload's responses broke the protocol.
    AbandonedProtocol => "flows_abandoned_protocol",
    /// Holes (lost mirror datagrams) skipped; the replay resumed after each.
    StreamHoles => "stream_holes",
    /// Client bytes lost in those holes.
    BytesLost => "bytes_lost",
    /// Times a stream was resynchronised at a message boundary (after a hole, or bytes the
    /// protocol's framing refused).
    Resyncs => "resyncs",
    /// Client bytes skipped to resynchronise.
    BytesSkipped => "bytes_skipped",
    /// Logins the replayer performed itself (PostgreSQL, MySQL).
    Logins => "logins",
    /// Sessions not replayed because the server asks for a password the shadow config lacks
    /// (a per-connection challenge cannot be replayed); the log names service and method.
    AuthNotReplayable => "auth_not_replayable",
    /// The replayer's own login was refused or failed.
    LoginFailures => "login_failures",
    /// Protocol error replies: PostgreSQL ErrorResponse, MySQL ERR, RESP errors.
    ErrorReplies => "error_replies",
    /// MySQL messages naming a prepared statement the shadow cannot run: its shadow id is
    /// unknown (prepared in a hole, or closed), or the EXECUTE that carried its parameter
    /// types was lost. Skipped: never sent with another statement's id, nor to be refused.
    StatementsSkipped => "statements_skipped",
    /// Client bytes written to the workload.
    BytesReplayed => "bytes_replayed",
    /// Response bytes read and discarded.
    BytesDiscarded => "bytes_discarded",
    /// HTTP 1xx final responses (101).
    Status1xx => "http_1xx",
    /// HTTP 2xx.
    Status2xx => "http_2xx",
    /// HTTP 3xx.
    Status3xx => "http_3xx",
    /// HTTP 4xx.
    Status4xx => "http_4xx",
    /// HTTP 5xx.
    Status5xx => "http_5xx",
}

/// A running replay task, counted in [`ShadowStats::active_replays`] until dropped.
#[derive(Debug)]
pub struct ReplayRunning(std::sync::Arc<ShadowStats>);

impl Drop for ReplayRunning {
    fn drop(&mut self) {
        self.0.active_replays.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Report name of [`ShadowStats::exchange_errors`], the counter the coordinator reads.
pub const EXCHANGE_ERRORS: &str = "exchange_errors";

/// Replayer latency of one class.
#[derive(Debug, Clone)]
pub struct ClassLatency {
    /// Last request byte written -> first response byte read, ns.
    pub first_byte: Histogram<u64>,
    /// Last request byte written -> last response byte read, ns.
    pub last_byte: Histogram<u64>,
}

/// Report name of the replay lag gauge: the most a message was written after its due time in
/// the interval, ms.
pub const REPLAY_LAG_MS: &str = "replay_lag_ms";

/// Counters and histograms of the shadow role.
#[derive(Debug)]
pub struct ShadowStats {
    counters: Vec<AtomicU64>,
    latency: Mutex<BTreeMap<u16, ClassLatency>>,
    /// Largest lag behind the original timing since the last [`ShadowStats::take_max_lag`], µs.
    max_lag_us: AtomicU64,
    /// Replay tasks running.
    active_replays: AtomicU64,
    /// (outer source, VNI) of the last datagram the receiver did not admit.
    last_rejected: Mutex<Option<(std::net::IpAddr, u32)>>,
    /// Pattern keys of the flows whose replay started, per report interval: the mirrored sample
    /// as the shadow received it, which the coordinator sets against live's mix.
    patterns: Mutex<PatternCounts>,
}

impl Default for ShadowStats {
    fn default() -> Self {
        Self {
            counters: ShadowCounter::ALL
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            latency: Mutex::new(BTreeMap::new()),
            max_lag_us: AtomicU64::new(0),
            active_replays: AtomicU64::new(0),
            last_rejected: Mutex::new(None),
            patterns: Mutex::new(PatternCounts::default()),
        }
    }
}

impl ShadowStats {
    /// Counts the pattern of a flow whose replay starts, from its first client bytes.
    pub fn note_flow_pattern(&self, head: &[u8]) {
        let head = &head[..head.len().min(PATTERN_SAMPLE_LEN)];
        self.patterns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(head);
    }

    /// The flows' pattern counts since the last call, most frequent first.
    pub fn take_patterns(&self) -> Vec<(String, u64)> {
        self.patterns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Notes the (outer source, VNI) of a datagram not admitted.
    pub fn note_rejected(&self, source: std::net::IpAddr, vni: u32) {
        *self.last_rejected.lock().unwrap_or_else(|e| e.into_inner()) = Some((source, vni));
    }

    /// The (outer source, VNI) of the last datagram not admitted.
    pub fn last_rejected(&self) -> Option<(std::net::IpAddr, u32)> {
        *self.last_rejected.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replay tasks running now.
    pub fn active_replays(&self) -> u64 {
        self.active_replays.load(Ordering::Relaxed)
    }

    /// Counts a replay task for as long as the returned guard lives.
    pub fn replay_running(self: &std::sync::Arc<Self>) -> ReplayRunning {
        self.active_replays.fetch_add(1, Ordering::Relaxed);
        ReplayRunning(std::sync::Arc::clone(self))
    }

    /// Adds `n` to a counter.
    pub fn add(&self, counter: ShadowCounter, n: u64) {
        self.counters[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one to a counter.
    pub fn inc(&self, counter: ShadowCounter) {
        self.add(counter, 1);
    }

    /// A counter's cumulative value.
    pub fn get(&self, counter: ShadowCounter) -> u64 {
        self.counters[counter as usize].load(Ordering::Relaxed)
    }

    /// A message was written `lag` after the time its original offset gave it.
    pub fn observe_lag(&self, lag: std::time::Duration) {
        self.max_lag_us
            .fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
    }

    /// The largest lag observed since the last call.
    pub fn take_max_lag(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.max_lag_us.swap(0, Ordering::Relaxed))
    }

    /// Records one exchange of `class`.
    pub fn record(&self, class: u16, first_byte_ns: u64, last_byte_ns: u64) {
        let mut latency = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let entry = latency.entry(class).or_insert_with(|| ClassLatency {
            first_byte: new_latency_histogram(),
            last_byte: new_latency_histogram(),
        });
        entry.first_byte.saturating_record(first_byte_ns.max(1));
        entry.last_byte.saturating_record(last_byte_ns.max(1));
    }

    /// Takes the histograms recorded since the last call.
    pub fn take_latency(&self) -> BTreeMap<u16, ClassLatency> {
        std::mem::take(&mut *self.latency.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Cumulative counters by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let mut counters: Vec<(&'static str, u64)> = ShadowCounter::ALL
            .iter()
            .map(|c| (c.name(), self.get(*c)))
            .collect();
        counters.push((EXCHANGE_ERRORS, self.exchange_errors()));
        counters
    }

    /// Replayed exchanges that failed on the server's side: the workload answered 5xx or a
    /// protocol error reply, reset or closed the connection with a response outstanding, did
    /// not answer in time, or could not be connected to. A client's own close is never one. The coordinator reads this sum (by its
    /// name, [`EXCHANGE_ERRORS`]) as the type's error count: a type that fails fast must not
    /// look fast.
    pub fn exchange_errors(&self) -> u64 {
        [
            ShadowCounter::Status5xx,
            ShadowCounter::ErrorReplies,
            ShadowCounter::ReplayResets,
            ShadowCounter::ResponseTimeouts,
            ShadowCounter::ConnectFailures,
            ShadowCounter::ConnectTimeouts,
        ]
        .iter()
        .map(|c| self.get(*c))
        .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_errors_sum_the_failures_and_nothing_else() {
        let stats = ShadowStats::default();
        stats.add(ShadowCounter::Status5xx, 3);
        stats.inc(ShadowCounter::ReplayResets);
        stats.inc(ShadowCounter::ResponseTimeouts);
        stats.inc(ShadowCounter::ConnectFailures);
        stats.inc(ShadowCounter::ConnectTimeouts);
        // Answers, client-side choices and 4xx are not the type failing.
        stats.add(ShadowCounter::Status2xx, 100);
        stats.add(ShadowCounter::Status4xx, 7);
        stats.add(ShadowCounter::RequestsDenied, 5);
        stats.add(ShadowCounter::Exchanges, 110);
        assert_eq!(stats.exchange_errors(), 7);
        let reported: BTreeMap<_, _> = stats.counters().into_iter().collect();
        assert_eq!(reported[EXCHANGE_ERRORS], 7);
    }
}
