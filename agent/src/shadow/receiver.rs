//! The mirror receiver: one UDP socket, the table of mirrored flows being reassembled, and the
//! hand-off of contiguous bytes to one replay task per flow copy.
//!
//! Memory is bounded three ways: per flow (the reassembler's limit; a flow over it is
//! abandoned), in total (reassembly buffers plus bytes queued for replay tasks; over it the
//! oldest flows are evicted), and in flows (a full table evicts the oldest). Every eviction and
//! abandonment is counted.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, RwLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::{net::UdpSocket, sync::mpsc};
use tracing::warn;

use super::{
    config::{FlowClassifier, ShadowConfig},
    exchange::SegmentMeta,
    reassembly::{Reassembler, ReassemblyError, ReassemblyLimits},
    replay::{Charged, FlowEvent, ReplaySettings, replay_flow},
    stats::{ShadowCounter, ShadowStats},
    vxlan::{self, DecodeError, MirroredSegment, tcp_flags},
};

/// How many copies of each flow are replayed: flow `n` gets `floor((n+1)f) - floor(nf)`, so a
/// factor of 1.5 replays every second flow twice and the long-run ratio is exactly `f`.
#[derive(Debug, Clone)]
pub struct Amplifier {
    factor: f64,
    flows: u64,
}

impl Amplifier {
    /// An amplifier of `factor` (at least 1).
    pub fn new(factor: f64) -> Self {
        Self { factor, flows: 0 }
    }

    /// Copies of the next flow.
    pub fn copies(&mut self) -> usize {
        let n = self.flows as f64;
        self.flows += 1;
        ((n + 1.0) * self.factor).floor() as usize - (n * self.factor).floor() as usize
    }
}

/// One mirrored flow: session, source and the original 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FlowId {
    source: IpAddr,
    vni: u32,
    client: SocketAddr,
    service: SocketAddr,
}

#[derive(Debug)]
struct Flow {
    reassembler: Reassembler<SegmentMeta>,
    /// One sender per copy; empty until the first bytes are contiguous.
    copies: Vec<mpsc::UnboundedSender<FlowEvent>>,
    spawned: bool,
    order: u64,
    last_packet_ns: u64,
    gap_since_ns: Option<u64>,
}

/// The receiver's state; [`Receiver::run`] drives it.
#[derive(Debug)]
pub struct Receiver {
    admitted: HashSet<(IpAddr, u32)>,
    ports: HashSet<u16>,
    replay_addr: IpAddr,
    config: Arc<ShadowConfig>,
    /// Shared with the agent, which replaces it when the coordinator's policy changes the
    /// classes; read once per flow.
    classifier: Arc<RwLock<FlowClassifier>>,
    limits: ReassemblyLimits,
    flows: HashMap<FlowId, Flow>,
    by_age: BTreeMap<u64, FlowId>,
    next_order: u64,
    /// Flows finished or given up recently: their late segments must not start a new flow.
    /// Recently finished flows, so late copies of their segments start nothing.
    closed: HashMap<FlowId, ClosedFlow>,
    closed_order: VecDeque<(u64, FlowId)>,
    reassembly_bytes: usize,
    queued: Arc<AtomicUsize>,
    amplifier: Amplifier,
    stats: Arc<ShadowStats>,
    settings: Arc<ReplaySettings>,
}

/// A finished flow, remembered for [`CLOSED_LINGER`].
#[derive(Debug, Clone, Copy)]
struct ClosedFlow {
    at_ns: u64,
    first_seq: u32,
    /// Bytes from `first_seq` to the last byte or FIN seen.
    span: u64,
}

impl ClosedFlow {
    /// Whether `seq` lies within the flow's sequence span.
    fn covers(&self, seq: u32) -> bool {
        u64::from(seq.wrapping_sub(self.first_seq)) <= self.span
    }
}

/// How long a finished flow's 5-tuple is remembered.
const CLOSED_LINGER: Duration = Duration::from_secs(10);

impl Receiver {
    /// A receiver for `config`.
    pub fn new(
        config: Arc<ShadowConfig>,
        classifier: Arc<RwLock<FlowClassifier>>,
        stats: Arc<ShadowStats>,
        settings: Arc<ReplaySettings>,
    ) -> Self {
        Self {
            admitted: config
                .sessions
                .iter()
                .map(|s| (s.source.to_canonical(), s.vni))
                .collect(),
            ports: config.services.iter().map(|s| s.port).collect(),
            replay_addr: config.replay_addr,
            limits: ReassemblyLimits {
                max_buffered: config.max_flow_buffer_bytes,
                max_ahead: (config.max_flow_buffer_bytes as u64).max(1 << 20) * 4,
            },
            amplifier: Amplifier::new(config.amplification),
            config,
            classifier,
            flows: HashMap::new(),
            by_age: BTreeMap::new(),
            next_order: 0,
            closed: HashMap::new(),
            closed_order: VecDeque::new(),
            reassembly_bytes: 0,
            queued: Arc::new(AtomicUsize::new(0)),
            stats,
            settings,
        }
    }

    fn now_ns(&self) -> u64 {
        self.settings.epoch.elapsed().as_nanos() as u64
    }

    /// Receives until the task is aborted, or until `drain` becomes true: then every open flow
    /// is ended where it stands, so its replays finish what they hold, and nothing new is taken.
    pub async fn run(mut self, socket: UdpSocket, mut drain: tokio::sync::watch::Receiver<bool>) {
        let mut buf = vec![0u8; 65_536];
        let mut sweep = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                changed = drain.changed() => {
                    // A dropped sender (the agent gone) ends the flows as well.
                    if changed.is_err() || *drain.borrow() {
                        self.end_all();
                        return;
                    }
                }
                received = socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => {
                        let now = self.now_ns();
                        self.on_datagram(&buf[..n], from.ip(), now);
                        // Drain what else is queued without another trip through the poller.
                        while let Ok((n, from)) = socket.try_recv_from(&mut buf) {
                            self.on_datagram(&buf[..n], from.ip(), now);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "mirror socket receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                _ = sweep.tick() => {
                    let now = self.now_ns();
                    self.sweep(now);
                }
            }
        }
    }

    /// Handles one datagram from `from`, received at `now_ns`.
    pub fn on_datagram(&mut self, datagram: &[u8], from: IpAddr, now_ns: u64) {
        self.stats.inc(ShadowCounter::Datagrams);
        let segment = match vxlan::decode(datagram) {
            Ok(segment) => segment,
            Err(e) => {
                self.stats.inc(decode_counter(e));
                return;
            }
        };
        let source = from.to_canonical();
        if !self.admitted.contains(&(source, segment.vni)) {
            self.stats.inc(ShadowCounter::NotAdmitted);
            self.stats.note_rejected(source, segment.vni);
            return;
        }
        if !self.ports.contains(&segment.service.port()) {
            self.stats.inc(ShadowCounter::UnknownService);
            return;
        }
        let id = FlowId {
            source,
            vni: segment.vni,
            client: segment.client,
            service: segment.service,
        };
        self.on_segment(id, &segment, now_ns);
    }

    fn on_segment(&mut self, id: FlowId, segment: &MirroredSegment<'_>, now_ns: u64) {
        if let Some(closed) = self.closed.get(&id) {
            if segment.payload.is_empty() || closed.covers(segment.seq) {
                self.stats.inc(ShadowCounter::LateSegments);
                return;
            }
            // Payload outside the finished flow's sequence span: the client opened a new
            // connection on the same 4-tuple (Linux reusing a TIME-WAIT port starts it 64 KiB
            // past the old one's end), which is a flow of its own.
            self.closed.remove(&id);
        }
        if !self.flows.contains_key(&id) {
            // A flow begins with its first payload; a bare ACK or FIN before it says nothing.
            if segment.payload.is_empty() || segment.flags & tcp_flags::SYN != 0 {
                self.stats.inc(ShadowCounter::LateSegments);
                return;
            }
            while self.flows.len() >= self.config.max_flows {
                self.evict_oldest(ShadowCounter::EvictedTableFull);
            }
            let order = self.next_order;
            self.next_order += 1;
            self.by_age.insert(order, id);
            self.flows.insert(
                id,
                Flow {
                    reassembler: Reassembler::new(segment.seq, self.limits),
                    copies: Vec::new(),
                    spawned: false,
                    order,
                    last_packet_ns: now_ns,
                    gap_since_ns: None,
                },
            );
            self.stats.inc(ShadowCounter::FlowsStarted);
        }
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        flow.last_packet_ns = now_ns;
        let meta = SegmentMeta {
            arrival_ns: now_ns,
            ack: segment.ack,
        };
        let fin = segment.flags & tcp_flags::FIN != 0;
        match flow
            .reassembler
            .insert(segment.seq, segment.payload, fin, meta)
        {
            Ok(inserted) => {
                self.reassembly_bytes += inserted.new_bytes;
                self.stats.add(
                    ShadowCounter::DuplicateBytes,
                    inserted.duplicate_bytes as u64,
                );
            }
            Err(ReassemblyError::StartMissed) => {
                return self.abandon(id, ShadowCounter::AbandonedStartMissed);
            }
            Err(ReassemblyError::BufferFull { .. } | ReassemblyError::TooFarAhead { .. }) => {
                return self.abandon(id, ShadowCounter::AbandonedFlowBuffer);
            }
        }
        if segment.flags & tcp_flags::RST != 0 {
            flow.reassembler.reset();
        }
        self.deliver(id, now_ns);
        self.enforce_total_budget();
    }

    /// Hands contiguous bytes to the flow's replay tasks and ends the flow if it is complete.
    fn deliver(&mut self, id: FlowId, now_ns: u64) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let chunks = flow.reassembler.take();
        let taken: usize = chunks.iter().map(|c| c.data.len()).sum();
        self.reassembly_bytes -= taken;
        if !flow.spawned
            && let Some(first) = chunks.first()
        {
            flow.spawned = true;
            self.stats.note_flow_pattern(&first.data);
            let class = self
                .classifier
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .class_of(id.service.port(), &first.data);
            let target = SocketAddr::new(self.replay_addr, id.service.port());
            for _ in 0..self.amplifier.copies() {
                let (tx, rx) = mpsc::unbounded_channel();
                flow.copies.push(tx);
                tokio::spawn(replay_flow(
                    Arc::clone(&self.settings),
                    Arc::clone(&self.stats),
                    target,
                    class,
                    rx,
                ));
            }
        }
        for chunk in chunks {
            let data: Arc<[u8]> = chunk.data.into();
            let stats = &self.stats;
            let queued = &self.queued;
            flow.copies.retain(|copy| {
                let sent = copy
                    .send(FlowEvent::Data(
                        Charged::new(Arc::clone(&data), queued),
                        chunk.meta,
                    ))
                    .is_ok();
                if !sent {
                    stats.inc(ShadowCounter::CopiesFailed);
                }
                sent
            });
        }
        let flow_ended = flow.reassembler.finished() || flow.reassembler.was_reset();
        if flow.spawned && flow.copies.is_empty() {
            // Every copy failed (workload down, …): forget the flow and ignore its segments.
            return self.close(id);
        }
        if flow_ended {
            if flow.reassembler.was_reset() && flow.reassembler.has_gap() {
                // Reset with holes: nothing will fill them; replay what is held past them.
                return self.skip_hole(id, now_ns);
            }
            let counter = if flow.reassembler.finished() {
                ShadowCounter::FlowsCompleted
            } else {
                ShadowCounter::FlowsReset
            };
            self.stats.inc(counter);
            return self.end(id);
        }
        flow.gap_since_ns = if flow.reassembler.has_gap() {
            Some(flow.gap_since_ns.unwrap_or(now_ns))
        } else {
            None
        };
    }

    /// Gives up the flow's first hole: its copies resynchronise after it.
    fn skip_hole(&mut self, id: FlowId, now_ns: u64) {
        let Some(flow) = self.flows.get_mut(&id) else {
            return;
        };
        let skipped = flow.reassembler.skip_hole();
        flow.gap_since_ns = None;
        if skipped == 0 {
            return;
        }
        self.stats.inc(ShadowCounter::StreamHoles);
        self.stats.add(ShadowCounter::BytesLost, skipped);
        for copy in &flow.copies {
            let _ = copy.send(FlowEvent::Hole);
        }
        self.deliver(id, now_ns);
    }

    /// Ends every open flow (the agent is stopping): bytes held behind a hole are counted as
    /// unreplayed, the rest is handed over, and each copy is told the stream ended.
    fn end_all(&mut self) {
        let ids: Vec<FlowId> = self.flows.keys().copied().collect();
        for id in ids {
            if let Some(flow) = self.flows.get(&id) {
                let held = flow.reassembler.buffered() as u64;
                self.stats.add(ShadowCounter::BytesUnreplayed, held);
            }
            self.stats.inc(ShadowCounter::FlowsEndedAtStop);
            self.end(id);
        }
    }

    fn end(&mut self, id: FlowId) {
        if let Some(flow) = self.flows.get(&id) {
            for copy in &flow.copies {
                let _ = copy.send(FlowEvent::End);
            }
        }
        self.close(id);
    }

    fn abandon(&mut self, id: FlowId, counter: ShadowCounter) {
        self.stats.inc(counter);
        if let Some(flow) = self.flows.get(&id) {
            for copy in &flow.copies {
                let _ = copy.send(FlowEvent::Abandon);
            }
        }
        self.close(id);
    }

    /// Forgets the flow and remembers its 5-tuple for a while.
    fn close(&mut self, id: FlowId) {
        let Some(flow) = self.flows.remove(&id) else {
            return;
        };
        self.by_age.remove(&flow.order);
        self.reassembly_bytes -= flow.reassembler.buffered();
        let now = self.now_ns();
        let (first_seq, span) = flow.reassembler.seq_span();
        self.closed.insert(
            id,
            ClosedFlow {
                at_ns: now,
                first_seq,
                span,
            },
        );
        self.closed_order.push_back((now, id));
        while self.closed_order.len() > self.config.max_flows {
            if let Some((at, old)) = self.closed_order.pop_front() {
                self.forget_closed(old, at);
            }
        }
    }

    /// Forgets a closed flow's entry if it is still the one closed at `at_ns` (the 4-tuple may
    /// have been closed again since).
    fn forget_closed(&mut self, id: FlowId, at_ns: u64) {
        if self.closed.get(&id).is_some_and(|c| c.at_ns == at_ns) {
            self.closed.remove(&id);
        }
    }

    fn evict_oldest(&mut self, counter: ShadowCounter) {
        if let Some((_, id)) = self.by_age.first_key_value().map(|(o, id)| (*o, *id)) {
            self.abandon(id, counter);
        }
    }

    fn enforce_total_budget(&mut self) {
        let limit = self.config.max_total_buffer_bytes;
        while self.reassembly_bytes + self.queued.load(Ordering::Relaxed) > limit
            && !self.flows.is_empty()
        {
            self.evict_oldest(ShadowCounter::EvictedMemory);
        }
    }

    /// Skips holes that did not fill in time, ends idle flows, forgets old closed flows.
    pub fn sweep(&mut self, now_ns: u64) {
        let gap = self.config.gap_timeout_ms * 1_000_000;
        let idle = self.config.flow_idle_timeout_ms * 1_000_000;
        let mut gaps = Vec::new();
        let mut idles = Vec::new();
        for (id, flow) in &self.flows {
            if flow
                .gap_since_ns
                .is_some_and(|since| now_ns.saturating_sub(since) > gap)
            {
                gaps.push(*id);
            } else if now_ns.saturating_sub(flow.last_packet_ns) > idle {
                idles.push(*id);
            }
        }
        for id in gaps {
            self.skip_hole(id, now_ns);
        }
        for id in idles {
            self.stats.inc(ShadowCounter::FlowsIdleEnded);
            self.end(id);
        }
        let linger = CLOSED_LINGER.as_nanos() as u64;
        while let Some(&(at, id)) = self.closed_order.front() {
            if now_ns.saturating_sub(at) <= linger {
                break;
            }
            self.closed_order.pop_front();
            self.forget_closed(id, at);
        }
        self.enforce_total_budget();
    }

    /// Flows being followed.
    pub fn flows(&self) -> usize {
        self.flows.len()
    }
}

fn decode_counter(e: DecodeError) -> ShadowCounter {
    match e {
        DecodeError::BadVxlan => ShadowCounter::DecodeBadVxlan,
        DecodeError::ShortFrame => ShadowCounter::DecodeShortFrame,
        DecodeError::NotIp(_) => ShadowCounter::DecodeNotIp,
        DecodeError::BadIp => ShadowCounter::DecodeBadIp,
        DecodeError::Fragment => ShadowCounter::DecodeFragment,
        DecodeError::NotTcp(_) => ShadowCounter::DecodeNotTcp,
        DecodeError::BadTcp => ShadowCounter::DecodeBadTcp,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amplification_by_one_and_a_half_doubles_every_second_flow() {
        let mut a = Amplifier::new(1.5);
        let copies: Vec<usize> = (0..6).map(|_| a.copies()).collect();
        assert_eq!(copies, [1, 2, 1, 2, 1, 2]);
        let mut two = Amplifier::new(2.0);
        assert!((0..10).all(|_| two.copies() == 2));
        let mut odd = Amplifier::new(1.3);
        let total: usize = (0..1000).map(|_| odd.copies()).sum();
        assert_eq!(total, 1300);
    }
}
