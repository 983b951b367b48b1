//! doppel's live data path: TC programs on a workload's interface.
//!
//! Ingress sees client packets, egress sees the workload's responses. For each TCP packet of a
//! configured service the programs
//! - track the flow from its SYN in an LRU map (flows first seen mid-stream are measured, never
//!   mirrored: a shadow needs the stream from its start);
//! - on the flow's first client payload packet, classify it once (rules on port, client prefix
//!   and the first payload bytes) and decide once whether to mirror it, by hashing the flow under
//!   the epoch seed against the class's rate;
//! - clone every later client packet of a mirrored flow that carries payload, FIN or RST to each
//!   mirror session through the session's own VXLAN device (fixed remote and VNI), or through
//!   the external-mode device with a tunnel key naming the shadow host and the session's VNI
//!   (pure ACKs carry nothing a replay uses; see `MIRROR_KEEPALIVE_NS`);
//! - time each exchange (last client payload packet -> first response payload packet) into
//!   per-CPU log-linear histograms per service x class, for all flows and for mirrored ones.
//!
//! Every path returns `TC_ACT_PIPE`: anything the programs cannot parse, or any map or helper
//! failure, leaves the packet exactly as it was. No per-packet event reaches user space.
//!
//! The same object carries the shadow host's XDP admission program ([`doppel_xdp_admit`]): it
//! drops VXLAN mirror datagrams whose (outer source, VNI) is not admitted before the stack
//! spends anything on them, and passes everything else.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
// The BPF target has no `compare_exchange` (rustc's target says it lacks CAS, though the kernel
// has BPF_CMPXCHG since 5.12); the mirror budget's bucket uses the intrinsic underneath it.
#![cfg_attr(
    target_arch = "bpf",
    feature(core_intrinsics),
    allow(internal_features)
)]
#![expect(
    unreachable_pub,
    reason = "program entry points are exported symbols the loader finds by name"
)]

use aya_ebpf::{
    Global,
    bindings::{BPF_F_ZERO_CSUM_TX, TC_ACT_PIPE, bpf_tunnel_key, xdp_action},
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_set_hash, bpf_set_hash_invalid,
        bpf_skb_set_tunnel_key,
    },
    macros::{classifier, map, xdp},
    maps::{Array, LruHashMap, PerCpuArray, RingBuf},
    programs::{TcContext, XdpContext},
};
use doppel_common::maps::{
    AdmitConfig, AdmitCounter, AdmitKey, CLASS_BUDGET_PRIORITY, COUNTER_SLOTS, ClassConfig,
    DatapathConfig, DatapathCounter, Direction, FLOW_AWAITING_RESPONSE, FLOW_CLIENT_CLOSED,
    FLOW_DECIDED, FLOW_MAP_ENTRIES, FLOW_SAMPLED, FLOW_SEEN_SYN, FlowKey, FlowState, IFACE_SLOTS,
    IfaceCounters, LATENCY_BUCKETS, LATENCY_HISTOGRAMS, MAX_ADMITTED, MAX_CLASSES, MAX_RULES,
    MAX_SERVICES, MAX_SESSIONS, MIRROR_KEEPALIVE_NS, MirrorBucket, MirrorSessionConfig,
    PATTERN_SAMPLE_LEN, PatternSample, RULE_MATCH_PORT, RULE_MATCH_PREFIX, Rule, iface_slot,
    latency_bucket, latency_histogram_base,
};

#[map(name = "IFACE_COUNTERS")]
static IFACE_COUNTERS: PerCpuArray<IfaceCounters> =
    PerCpuArray::with_max_entries(2 * IFACE_SLOTS, 0);
#[map(name = "FLOWS")]
static FLOWS: LruHashMap<FlowKey, FlowState> = LruHashMap::with_max_entries(FLOW_MAP_ENTRIES, 0);
#[map(name = "CLASSES")]
static CLASSES: Array<ClassConfig> = Array::with_max_entries(MAX_CLASSES, 0);
#[map(name = "RULES")]
static RULES: Array<Rule> = Array::with_max_entries(MAX_RULES, 0);
#[map(name = "SESSIONS")]
static SESSIONS: Array<MirrorSessionConfig> = Array::with_max_entries(MAX_SESSIONS, 0);
#[map(name = "CONFIG")]
static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "CLASS_FLOWS")]
static CLASS_FLOWS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2 * MAX_CLASSES, 0);
#[map(name = "LATENCY")]
static LATENCY: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(LATENCY_HISTOGRAMS * LATENCY_BUCKETS, 0);
#[map(name = "MIRROR_BUCKET")]
static MIRROR_BUCKET: Array<MirrorBucket> = Array::with_max_entries(2, 0);
#[map(name = "PATTERNS")]
static PATTERNS: RingBuf = RingBuf::with_byte_size(64 * 1024, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "#[classifier] hands the context over by value"
)]
pub fn doppel_tc_ingress(ctx: TcContext) -> i32 {
    count_iface(&ctx, Direction::Ingress);
    if let Some(config) = CONFIG.get(0)
        && let Some(packet) = parse(&ctx, config, Direction::Ingress)
    {
        on_client_packet(&ctx, config, &packet);
    }
    TC_ACT_PIPE
}

#[classifier]
#[expect(
    clippy::needless_pass_by_value,
    reason = "#[classifier] hands the context over by value"
)]
pub fn doppel_tc_egress(ctx: TcContext) -> i32 {
    // The agent's own copies (and their IP fragments) leave through the workload's interface
    // when the shadows are routed there: they are neither the workload's traffic nor skipped.
    // SAFETY: `skb` points at the kernel's `__sk_buff` for the whole program run.
    if unsafe { (*ctx.skb.skb).tc_index } == COPY_TAG {
        return TC_ACT_PIPE;
    }
    count_iface(&ctx, Direction::Egress);
    if let Some(config) = CONFIG.get(0)
        && let Some(packet) = parse(&ctx, config, Direction::Egress)
    {
        on_service_packet(&ctx, &packet);
    }
    TC_ACT_PIPE
}

/// A TCP packet of a configured service, as far as the programs need it.
struct Packet {
    flow: FlowKey,
    tcp_flags: u8,
    payload_offset: usize,
    payload_len: usize,
}

/// A `FLOWS` key on the stack, written as three 8-byte stores. The kernel hashes the key in
/// 4-byte loads right after the program writes it, and a load that spans two stores still in
/// the store buffer cannot take its bytes from them: it waits for every older store to reach
/// the cache. `FlowKey`'s two 2-byte ports, stored as the compiler pleased, made one such load
/// a lookup, under load most of the egress program's hashing time (see `FlowState`).
#[repr(C, align(8))]
struct KeySlot([u64; 3]);

// `KeySlot::store` packs the fields into words low byte first.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "KeySlot assumes a little-endian target"
);
const _: () = assert!(size_of::<KeySlot>() == size_of::<FlowKey>());

impl KeySlot {
    #[inline(always)]
    fn store(&mut self, flow: &FlowKey) {
        let [a0, a1, a2, a3] = flow.client_addr.map(u64::from);
        let ports = u64::from(flow.client_port_be) | u64::from(flow.service_port_be) << 16;
        let words = self.0.as_mut_ptr();
        // SAFETY: three in-bounds, aligned slots of `self`. Volatile so that each is one 8-byte
        // store, whatever the optimiser would merge or split.
        unsafe {
            core::ptr::write_volatile(words, a0 | a1 << 32);
            core::ptr::write_volatile(words.add(1), a2 | a3 << 32);
            core::ptr::write_volatile(words.add(2), ports | u64::from(flow.service_id) << 32);
        }
    }

    #[inline(always)]
    fn flow(&self) -> &FlowKey {
        // SAFETY: `FlowKey` is 24 bytes of plain integers in `repr(C)` order (layout test in
        // `doppel_common::maps`), at an alignment of 4 that 8 satisfies; little-endian words
        // (asserted above) lay its fields out in that order.
        unsafe { &*self.0.as_ptr().cast::<FlowKey>() }
    }
}

#[inline(always)]
fn add(counter: DatapathCounter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: this CPU's slot of a per-CPU array; only this CPU writes it, and TC programs
        // do not preempt each other on one CPU.
        unsafe { *slot += n };
    }
}

#[inline(always)]
fn count_iface(ctx: &TcContext, direction: Direction) {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for the whole program run.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    // The per-interface counters are the only per-packet totals: user space derives the
    // `packets` and `bytes` counters from them rather than the program counting twice.
    if let Some(counters) = IFACE_COUNTERS.get_ptr_mut(iface_slot(ifindex, direction)) {
        // SAFETY: as in `add`.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += u64::from(len);
        }
    }
}

/// IPv4 header as bytes (alignment 1: the packet gives no alignment guarantee).
#[repr(C)]
struct Ipv4Head {
    ver_ihl: u8,
    _tos: u8,
    total_len: [u8; 2],
    _id: [u8; 2],
    frag: [u8; 2],
    _ttl: u8,
    protocol: u8,
    _checksum: [u8; 2],
    src: [u8; 4],
    dst: [u8; 4],
}

/// IPv6 fixed header as bytes.
#[repr(C)]
struct Ipv6Head {
    _ver_class_flow: [u8; 4],
    payload_len: [u8; 2],
    next_header: u8,
    _hop_limit: u8,
    src: [u8; 16],
    dst: [u8; 16],
}

/// The first 14 bytes of a TCP header: all the programs read.
#[repr(C)]
struct TcpHead {
    src_port: [u8; 2],
    dst_port: [u8; 2],
    _seq: [u8; 4],
    _ack: [u8; 4],
    data_offset: u8,
    flags: u8,
}

/// A pointer to a `T` at `offset` in the packet's linear data, if all of it is there. Direct
/// packet access: no helper call per field, which is most of the per-packet cost otherwise.
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Like [`ptr_at`], but pulls non-linear data into the linear area once when needed (headers
/// split across fragments are rare; pulling does not change the packet's content).
#[inline(always)]
fn header_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    ptr_at(ctx, offset).or_else(|| {
        ctx.pull_data((offset + size_of::<T>()) as u32).ok()?;
        ptr_at(ctx, offset)
    })
}

#[inline(always)]
fn words(bytes: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]),
        u32::from_ne_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        u32::from_ne_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
    ]
}

/// Parses Ethernet / IPv4-or-IPv6 / TCP and looks the service up. `None` for anything else;
/// shapes the programs do not handle (fragments, IP options, IPv6 extension headers,
/// truncation) are counted as `ParseSkipped`. VLAN tags never reach TC: the kernel moves them
/// into the skb's metadata first.
#[inline(always)]
fn parse(ctx: &TcContext, config: &DatapathConfig, direction: Direction) -> Option<Packet> {
    let skipped = || {
        add(DatapathCounter::ParseSkipped, 1);
        None
    };
    let Some(ethertype) = header_at::<[u8; 2]>(ctx, 12) else {
        return skipped();
    };
    // SAFETY: `header_at` checked that the bytes are inside the packet.
    let ethertype = u16::from_be_bytes(unsafe { *ethertype });
    let (client_addr, service_addr, l4, ip_end) = match ethertype {
        ETH_P_IP => {
            let Some(ip) = header_at::<Ipv4Head>(ctx, ETH_HLEN) else {
                return skipped();
            };
            // SAFETY: as above; every field is a byte array, so alignment is 1.
            let ip = unsafe { &*ip };
            // Options and fragments are rare and are not followed: pass them as they are.
            if ip.ver_ihl != 0x45 || u16::from_be_bytes(ip.frag) & 0x3fff != 0 {
                return skipped();
            }
            if ip.protocol != IPPROTO_TCP {
                add(DatapathCounter::OtherTraffic, 1);
                return None;
            }
            let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
            let src = [0, 0, mapped, u32::from_ne_bytes(ip.src)];
            let dst = [0, 0, mapped, u32::from_ne_bytes(ip.dst)];
            let ip_end = ETH_HLEN + usize::from(u16::from_be_bytes(ip.total_len));
            let (client, service) = if direction == Direction::Ingress {
                (src, dst)
            } else {
                (dst, src)
            };
            (client, service, ETH_HLEN + 20, ip_end)
        }
        ETH_P_IPV6 => {
            let Some(ip) = header_at::<Ipv6Head>(ctx, ETH_HLEN) else {
                return skipped();
            };
            // SAFETY: as above.
            let ip = unsafe { &*ip };
            if ip.next_header != IPPROTO_TCP {
                // Extension headers are not followed; other protocols are not ours.
                add(DatapathCounter::OtherTraffic, 1);
                return None;
            }
            let (src, dst) = (words(&ip.src), words(&ip.dst));
            let ip_end = ETH_HLEN + 40 + usize::from(u16::from_be_bytes(ip.payload_len));
            let (client, service) = if direction == Direction::Ingress {
                (src, dst)
            } else {
                (dst, src)
            };
            (client, service, ETH_HLEN + 40, ip_end)
        }
        _ => return skipped(),
    };
    let Some(tcp) = header_at::<TcpHead>(ctx, l4) else {
        return skipped();
    };
    // SAFETY: as above.
    let tcp = unsafe { &*tcp };
    let (client_port, service_port) = if direction == Direction::Ingress {
        (tcp.src_port, tcp.dst_port)
    } else {
        (tcp.dst_port, tcp.src_port)
    };
    let (client_port_be, service_port_be) = (
        u16::from_ne_bytes(client_port),
        u16::from_ne_bytes(service_port),
    );
    let Some(service_id) = find_service(config, service_addr, service_port_be) else {
        add(DatapathCounter::OtherTraffic, 1);
        return None;
    };
    let payload_offset = l4 + usize::from(tcp.data_offset >> 4) * 4;
    if payload_offset > ip_end || ip_end > ctx.len() as usize {
        return skipped();
    }
    Some(Packet {
        flow: FlowKey {
            client_addr,
            client_port_be,
            service_port_be,
            service_id,
        },
        tcp_flags: tcp.flags,
        payload_offset,
        payload_len: ip_end - payload_offset,
    })
}

/// The id of the service listening on `addr`:`port_be`: its index in the config's table.
#[inline(always)]
fn find_service(config: &DatapathConfig, addr: [u32; 4], port_be: u16) -> Option<u32> {
    let mut i = 0;
    while i < MAX_SERVICES as usize && (i as u32) < config.service_count {
        let service = &config.services[i];
        // Port first: it tells services apart on most hosts, and the address words are only
        // compared for a port that matched.
        let a = service.addr;
        if service.port_be == port_be
            && (a[0] ^ addr[0]) | (a[1] ^ addr[1]) | (a[2] ^ addr[2]) | (a[3] ^ addr[3]) == 0
        {
            return Some(i as u32);
        }
        i += 1;
    }
    None
}

/// Client -> service: track, decide, clone, open an exchange.
#[inline(always)]
fn on_client_packet(ctx: &TcContext, config: &DatapathConfig, packet: &Packet) {
    // The idle timeout is seconds long, so the clock it runs on can be the coarse one (the last
    // tick: a few loads). The precise clock reads the TSC, which costs about 35 ns a read in a
    // KVM guest (perf, BPF_PROG_TEST_RUN): it is read only for payload, which times an exchange,
    // and then that one read serves the idle clock too (both clocks are CLOCK_MONOTONIC; the
    // coarse one trails by at most a tick, which `saturating_sub` absorbs).
    let payload = packet.payload_len > 0;
    let mut key = KeySlot([0; 3]);
    key.store(&packet.flow);
    // SAFETY: plain helper calls.
    let now = unsafe {
        if payload {
            bpf_ktime_get_ns()
        } else {
            bpf_ktime_get_coarse_ns()
        }
    };
    if packet.tcp_flags & TCP_SYN != 0 && packet.tcp_flags & TCP_ACK == 0 {
        let state = FlowState {
            last_request_ns: 0,
            last_seen_ns: now,
            flags: FLOW_SEEN_SYN,
            class: 0,
            last_copy_ns: 0,
        };
        if FLOWS.insert(key.flow(), &state, 0).is_err() {
            add(DatapathCounter::MapFull, 1);
        }
        add(DatapathCounter::FlowsSeen, 1);
        return;
    }
    let state = match FLOWS.get_ptr_mut(key.flow()) {
        // SAFETY: a live map entry; see the module docs on concurrent updates.
        Some(state)
            if now.saturating_sub(unsafe { (*state).last_seen_ns })
                <= config.flow_idle_timeout_ns =>
        {
            state
        }
        _ => {
            // Open before we started, evicted, or idle past the timeout: measure, never mirror.
            // Only payload opens an exchange, so the entry waits for payload: a closed flow's
            // last ACK (its entry went with the FIN) must not come back as a stale mid-stream
            // flow, an insert per connection that holds a map entry until evicted.
            if packet.payload_len == 0 {
                return;
            }
            let fresh = FlowState {
                last_request_ns: 0,
                last_seen_ns: now,
                flags: 0,
                class: 0,
                last_copy_ns: 0,
            };
            if FLOWS.insert(key.flow(), &fresh, 0).is_err() {
                add(DatapathCounter::MapFull, 1);
                return;
            }
            add(DatapathCounter::FlowsMidstream, 1);
            match FLOWS.get_ptr_mut(key.flow()) {
                Some(state) => state,
                None => return,
            }
        }
    };
    // SAFETY: `state` points into a live map entry for the rest of this run. Ingress and egress
    // of one flow may run on two CPUs at once; the fields each side writes are disjoint except
    // `flags`, where a lost update at worst mis-times one exchange.
    unsafe {
        (*state).last_seen_ns = now;
        let deciding = payload && (*state).flags & FLOW_DECIDED == 0;
        if deciding {
            decide(ctx, packet, config, &mut *state, now);
        }
        if payload {
            (*state).flags |= FLOW_AWAITING_RESPONSE;
        }
        // Copies carry what the replay uses: payload, FIN and RST, and a pure ACK only as a
        // keepalive (see `MIRROR_KEEPALIVE_NS`).
        let copied = (*state).flags & FLOW_SAMPLED != 0
            && (payload
                || packet.tcp_flags & (TCP_FIN | TCP_RST) != 0
                || now.saturating_sub((*state).last_copy_ns) > MIRROR_KEEPALIVE_NS);
        if copied {
            (*state).last_copy_ns = now;
            mirror(ctx, config, &packet.flow);
        }
        if payload {
            // The exchange starts when the packet goes on to the server, after any copy: the
            // copy (a synchronous clone through the VXLAN device) is the agent's own cost, not
            // the server's, and a shadow, which makes no copy, must measure what live measures.
            // Likewise the flow's one decision (classification, pattern sample). Without either,
            // nothing the agent did since `now` was read is worth a second read.
            (*state).last_request_ns = if copied || deciding {
                bpf_ktime_get_ns()
            } else {
                now
            };
        }
    }
    if packet.tcp_flags & TCP_RST != 0 {
        let _ = FLOWS.remove(key.flow());
    } else if packet.tcp_flags & TCP_FIN != 0 {
        // SAFETY: as above; the entry is still in the map.
        unsafe {
            if (*state).flags & FLOW_AWAITING_RESPONSE != 0 {
                // The response is still to come: keep the entry for it (the service side removes
                // it once the exchange is closed).
                (*state).flags |= FLOW_CLIENT_CLOSED;
            } else {
                let _ = FLOWS.remove(key.flow());
            }
        }
    }
}

/// Service -> client: close the open exchange on the first response payload packet.
#[inline(always)]
fn on_service_packet(ctx: &TcContext, packet: &Packet) {
    // A service's FIN leaves the flow's entry in place: the client's FIN, which follows, must
    // still find it, to be mirrored (the shadow ends its replay of the flow on it) and to remove
    // it. A reset ends the flow from either side.
    let reset = packet.tcp_flags & TCP_RST != 0;
    let fin = packet.tcp_flags & TCP_FIN != 0;
    // The service's pure ACKs close no exchange: skip the flow lookup for them. (Idle time is
    // kept by the client side, whose ACKs flow during any long response.) A bare FIN is looked
    // up: it ends a flow whose client already closed.
    if packet.payload_len == 0 && !reset && !fin {
        return;
    }
    let mut key = KeySlot([0; 3]);
    key.store(&packet.flow);
    let Some(state) = FLOWS.get_ptr_mut(key.flow()) else {
        return;
    };
    // SAFETY: plain helper call; `state` as in `on_client_packet`.
    unsafe {
        let flags = (*state).flags;
        if packet.payload_len > 0 && flags & FLOW_AWAITING_RESPONSE != 0 {
            // Only the packet that closes an exchange needs a precise time.
            let request_ns = (*state).last_request_ns;
            let now = sent_ns(ctx, request_ns);
            (*state).flags = flags & !FLOW_AWAITING_RESPONSE;
            let latency = now.saturating_sub(request_ns);
            record_latency(
                packet.flow.service_id,
                (*state).class,
                flags & FLOW_SAMPLED != 0,
                latency,
            );
            add(DatapathCounter::Exchanges, 1);
            count_error_reply(ctx, packet);
        }
        // A client that closed its side waited only for this: the flow is over.
        if reset || (*state).flags & FLOW_CLIENT_CLOSED != 0 {
            let _ = FLOWS.remove(key.flow());
        }
    }
}

/// 1 when the kernel has `__sk_buff.tstamp_type` (Linux 5.18), set by the loader before the
/// programs load. This is read-only data the verifier treats as a constant, so at 0 it never
/// walks the branch that reads the field, and older kernels, which would refuse it, load the
/// programs and read the clock.
#[unsafe(no_mangle)]
static TSTAMP_TYPE_READABLE: Global<u8> = Global::new(0);

/// When the service sent this packet, which answers a request that arrived at `request_ns`.
///
/// A TCP segment this host's own stack sends (it still has its socket, `skb->sk`) reaches the
/// hook stamped with the time its transmit began: `skb->tstamp`, a delivery time TCP takes from
/// the clock it reads as `tcp_write_xmit` starts (CLOCK_MONOTONIC, `bpf_ktime_get_ns`'s), a
/// few microseconds before the hook. Reading it saves the TSC read, about 35 ns in a KVM guest.
/// With TCP's pacing (fq, BBR) the stamp is the planned departure, which the client waits for
/// too. The clock is read instead for:
/// - a packet without its socket: forwarded, say from a container behind a veth, whose stamp
///   (kept across the forwarding since 5.18) is its sender's and would leave the forwarding out;
/// - a stamp of another clock (a real-time receive stamp), or none;
/// - a stamp before the request: a segment TCP began to send before the request reached the
///   hook (pipelined requests), which would measure nothing;
/// - a kernel without `tstamp_type` ([`TSTAMP_TYPE_READABLE`]).
///
/// A shadow's replies pass the same hook, so live and shadow measure alike.
#[inline(always)]
fn sent_ns(ctx: &TcContext, request_ns: u64) -> u64 {
    // `BPF_SKB_CLOCK_MONOTONIC` in the UAPI (`BPF_SKB_TSTAMP_DELIVERY_MONO` before 6.11, which
    // the bindings carry only in an unnamed enum).
    const SKB_CLOCK_MONOTONIC: u8 = 1;
    if TSTAMP_TYPE_READABLE.load() != 0 {
        // SAFETY: `skb` points at the kernel's `__sk_buff` for the whole program run; `sk` is
        // only compared with null.
        let (stamp, kind, own) = unsafe {
            let skb = &*ctx.skb.skb;
            (
                skb.tstamp,
                skb.tstamp_type,
                !skb.__bindgen_anon_2.sk.is_null(),
            )
        };
        if own && kind == SKB_CLOCK_MONOTONIC && stamp >= request_ns {
            return stamp;
        }
    }
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_ns() }
}

/// Counts the response as an error if its first bytes say so: `HTTP/1.x 5..`, a RESP error
/// (`-`), a PostgreSQL ErrorResponse (`E`, a length below 64 KiB, then the severity field
/// `S`), or a MySQL ERR packet answering a command (a length below 64 KiB, sequence id 1,
/// `0xFF`, a 2-byte code, then the SQL state marker `#`; an ERR is at least 13 bytes). Only the
/// packet that closes an exchange pays for the 12-byte load.
#[inline(always)]
fn count_error_reply(ctx: &TcContext, packet: &Packet) {
    let mut head = [0u8; 12];
    let in_skb = (ctx.len() as usize).saturating_sub(packet.payload_offset);
    if packet.payload_len.min(in_skb) < head.len() {
        // Short replies: only RESP's one-byte marker can be read from fewer bytes.
        if packet.payload_len.min(in_skb) >= 1
            && let Ok(first) = ctx.load::<u8>(packet.payload_offset)
            && first == b'-'
        {
            add(DatapathCounter::ErrorReplies, 1);
        }
        return;
    }
    // A constant length: the verifier refuses aya's `load_bytes`, whose length it cannot
    // prove non-zero.
    // SAFETY: `head` is 12 writable bytes.
    let loaded = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            packet.payload_offset as u32,
            head.as_mut_ptr().cast(),
            head.len() as u32,
        )
    };
    if loaded != 0 {
        return;
    }
    // Not `starts_with`: a slice comparison compiles to a call of a byte-loop `memcmp`
    // subprogram (about 4 % of the egress program's time under load, `perf`); one masked
    // 8-byte compare does the same.
    let first8 = u64::from_le_bytes([
        head[0], head[1], head[2], head[3], head[4], head[5], head[6], head[7],
    ]);
    if first8 & 0x00ff_ffff_ffff_ffff == u64::from_le_bytes(*b"HTTP/1.\0") && head[9] == b'5' {
        add(DatapathCounter::Responses5xx, 1);
    } else if head[0] == b'-'
        || (head[0] == b'E' && head[1] == 0 && head[2] == 0 && head[5] == b'S')
        || (head[2] == 0 && head[3] == 1 && head[4] == 0xFF && head[7] == b'#')
    {
        add(DatapathCounter::ErrorReplies, 1);
    }
}

#[inline(always)]
fn record_latency(service_id: u32, class: u32, mirrored: bool, ns: u64) {
    if service_id >= MAX_SERVICES || class >= MAX_CLASSES {
        return;
    }
    let bucket = latency_bucket(ns);
    let all = latency_histogram_base(service_id, class, false) + bucket;
    bump(&LATENCY, all);
    if mirrored {
        bump(
            &LATENCY,
            latency_histogram_base(service_id, class, true) + bucket,
        );
    }
}

#[inline(always)]
fn bump(array: &PerCpuArray<u64>, index: u32) {
    if let Some(slot) = array.get_ptr_mut(index) {
        // SAFETY: as in `add`.
        unsafe { *slot += 1 };
    }
}

/// Classifies the flow from its first payload and decides once whether it is mirrored.
#[inline(never)]
fn decide(
    ctx: &TcContext,
    packet: &Packet,
    config: &DatapathConfig,
    state: &mut FlowState,
    now: u64,
) {
    let mut head = [0u64; PATTERN_SAMPLE_LEN / 8];
    let have = load_head(ctx, packet, &mut head);
    let class = classify(packet, config.rule_count, &head, have);
    state.class = class;
    state.flags |= FLOW_DECIDED;
    bump(&CLASS_FLOWS, class);
    let hash = flow_hash(&packet.flow, config.sampling_seed);
    // Only flows seen from their SYN can be replayed whole.
    if state.flags & FLOW_SEEN_SYN != 0 {
        if let Some(class_config) = CLASSES.get(class) {
            if u64::from(hash) < class_config.sample_threshold {
                if within_budget(config, class_config.flags, now) {
                    state.flags |= FLOW_SAMPLED;
                    add(DatapathCounter::FlowsSampled, 1);
                    bump(&CLASS_FLOWS, MAX_CLASSES + class);
                } else {
                    add(DatapathCounter::BudgetLimited, 1);
                }
            }
        }
    }
    // Pattern discovery: one flow in N, picked by a different slice of the same hash, so the
    // choice is independent of sampling.
    if config.pattern_sample_one_in != 0 && (hash >> 7) % config.pattern_sample_one_in == 0 {
        match PATTERNS.reserve::<PatternSample>(0) {
            Some(mut entry) => {
                // SAFETY: `[u64; 8]` and `[u8; 64]` have the same size and any bits are valid.
                let bytes = unsafe { core::mem::transmute::<[u64; 8], [u8; 64]>(head) };
                entry.write(PatternSample {
                    service_id: packet.flow.service_id,
                    len: have as u32,
                    bytes,
                });
                entry.submit(0);
                add(DatapathCounter::PatternSamples, 1);
            }
            None => add(DatapathCounter::PatternDrops, 1),
        }
    }
}

/// Whether one more flow of a class with `class_flags` fits the mirror budget: two GCRAs on the
/// host-wide `MIRROR_BUCKET`.
/// - Entry 0 is the budget: its theoretical arrival time may run at most `mirror_tolerance_ns`
///   (a second's burst) ahead of now, and each admitted flow moves it one `mirror_interval_ns`
///   on. A common class's flow must leave `mirror_reserve_ns` of it, so common traffic that
///   saturates the budget cannot turn the rare patterns away.
/// - A `CLASS_BUDGET_PRIORITY` class's flow may take the reserve, but only within entry 1, the
///   priority lane at `mirror_priority_interval_ns` (15 % of the budget): a pattern that bursts
///   while still boosted cannot starve the common classes.
///
/// An interval of 0 is no limit. `now` is the packet's coarse clock, already read by the
/// caller.
#[inline(always)]
fn within_budget(config: &DatapathConfig, class_flags: u32, now: u64) -> bool {
    if config.mirror_interval_ns == 0 {
        return true;
    }
    let (Some(budget), Some(lane)) = (MIRROR_BUCKET.get_ptr_mut(0), MIRROR_BUCKET.get_ptr_mut(1))
    else {
        return true;
    };
    let interval = u64::from(config.mirror_interval_ns);
    let tolerance = config.mirror_tolerance_ns;
    // SAFETY (every call below): an array map's values live as long as the map and are 8-byte
    // aligned.
    if class_flags & CLASS_BUDGET_PRIORITY == 0 {
        return unsafe { take(budget, now, tolerance, config.mirror_reserve_ns, interval) };
    }
    if !unsafe { conforms(lane, now, tolerance) }
        || !unsafe { take(budget, now, tolerance, 0, interval) }
    {
        return false;
    }
    // The lane is a soft limit under the hard one: it always moves on (tolerance unbounded), and
    // a race lost four times leaves it a flow short.
    unsafe {
        take(
            lane,
            now,
            u64::MAX / 4,
            0,
            config.mirror_priority_interval_ns,
        )
    };
    true
}

/// Whether the GCRA at `slot` would admit a flow now: its theoretical arrival time at most
/// `tolerance` ahead of now.
///
/// # Safety
/// `slot` is valid for reads and 8-byte aligned.
#[inline(always)]
unsafe fn conforms(slot: *mut u64, now: u64, tolerance: u64) -> bool {
    // SAFETY: the caller's; an aligned 8-byte load is single-copy atomic (BPF's "generic" CPU
    // cannot select an atomic load).
    unsafe { core::ptr::read_volatile(slot) <= now + tolerance }
}

/// Admits a flow on the GCRA at `slot` when its theoretical arrival time is at most `tolerance`
/// ahead of now, less `held` (not `max(seen, now) + held`: an idle bucket, its time in the past,
/// has room for the held-back reserve too, so a budget below one flow per reserve still admits
/// common flows). An admitted flow moves it one `interval` on from now or from where it was,
/// whichever is later, with a compare-and-swap, so CPUs deciding flows at once cannot both take
/// the last slot; a CPU that loses the race four times in a row (which needs four other flows
/// admitted meanwhile) turns its flow away rather than loop.
///
/// # Safety
/// `slot` is valid for reads and writes and 8-byte aligned.
#[inline(always)]
unsafe fn take(slot: *mut u64, now: u64, tolerance: u64, held: u64, interval: u64) -> bool {
    // SAFETY: the caller's; a stale value only fails the compare-and-swap.
    let mut seen = unsafe { core::ptr::read_volatile(slot) };
    for _ in 0..4 {
        if seen + held > now + tolerance {
            return false;
        }
        // SAFETY: the caller's.
        match unsafe { compare_exchange(slot, seen, seen.max(now) + interval) } {
            Ok(_) => return true,
            Err(actual) => seen = actual,
        }
    }
    false
}

/// `AtomicU64::compare_exchange` on `*slot`, relaxed: `Ok(old)` when it held `old` and now holds
/// `new`, else `Err(what it held)`.
///
/// # Safety
/// `slot` is valid for reads and writes and 8-byte aligned.
#[inline(always)]
unsafe fn compare_exchange(slot: *mut u64, old: u64, new: u64) -> Result<u64, u64> {
    #[cfg(target_arch = "bpf")]
    {
        use core::intrinsics::{AtomicOrdering, atomic_cxchg};
        // SAFETY: the caller's.
        let (held, swapped) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(
                slot, old, new,
            )
        };
        if swapped { Ok(held) } else { Err(held) }
    }
    #[cfg(not(target_arch = "bpf"))]
    {
        use core::sync::atomic::{AtomicU64, Ordering};
        // SAFETY: the caller's.
        unsafe { AtomicU64::from_ptr(slot) }.compare_exchange(
            old,
            new,
            Ordering::Relaxed,
            Ordering::Relaxed,
        )
    }
}

/// Copies up to 64 leading payload bytes into `head`; returns how many.
#[inline(always)]
fn load_head(ctx: &TcContext, packet: &Packet, head: &mut [u64; PATTERN_SAMPLE_LEN / 8]) -> usize {
    let in_skb = (ctx.len() as usize).saturating_sub(packet.payload_offset);
    let n = packet.payload_len.min(in_skb).min(PATTERN_SAMPLE_LEN);
    // The verifier needs the length proven to be in 1..=64 at the call.
    if n == 0 || n > PATTERN_SAMPLE_LEN {
        return 0;
    }
    // SAFETY: `head` is 64 writable bytes and `n` is at most 64.
    let loaded = unsafe {
        aya_ebpf::helpers::bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            packet.payload_offset as u32,
            head.as_mut_ptr().cast(),
            n as u32,
        )
    };
    if loaded == 0 { n } else { 0 }
}

/// The class of the highest-priority matching rule (0 when none matches).
#[inline(always)]
fn classify(
    packet: &Packet,
    rule_count: u32,
    head: &[u64; PATTERN_SAMPLE_LEN / 8],
    have: usize,
) -> u32 {
    let mut best_class = 0;
    let mut best_priority = 0;
    let mut i = 0;
    while i < MAX_RULES && i < rule_count {
        if let Some(rule) = RULES.get(i) {
            if rule_matches(rule, packet, head, have) {
                let priority = CLASSES.get(rule.class).map_or(0, |c| c.priority) + 1;
                if priority > best_priority {
                    best_priority = priority;
                    best_class = rule.class;
                }
            }
        }
        i += 1;
    }
    best_class
}

#[inline(always)]
fn rule_matches(
    rule: &Rule,
    packet: &Packet,
    head: &[u64; PATTERN_SAMPLE_LEN / 8],
    have: usize,
) -> bool {
    if rule.flags & RULE_MATCH_PORT != 0 && rule.port_be != packet.flow.service_port_be {
        return false;
    }
    let a = packet.flow.client_addr;
    let m = rule.prefix_mask;
    let p = rule.prefix_addr;
    if rule.flags & RULE_MATCH_PREFIX != 0
        && ((a[0] & m[0]) ^ p[0])
            | ((a[1] & m[1]) ^ p[1])
            | ((a[2] & m[2]) ^ p[2])
            | ((a[3] & m[3]) ^ p[3])
            != 0
    {
        return false;
    }
    if usize::from(rule.payload_len) > have {
        return false;
    }
    let (w, k) = (rule.payload, rule.payload_mask);
    ((head[0] & k[0]) ^ w[0])
        | ((head[1] & k[1]) ^ w[1])
        | ((head[2] & k[2]) ^ w[2])
        | ((head[3] & k[3]) ^ w[3])
        == 0
}

/// A 32-bit hash of the flow under the epoch seed (a murmur3 64-bit finalizer over the key's
/// words): deterministic, and uniform enough that "hash < rate x 2^32" samples the rate.
#[inline(always)]
fn flow_hash(flow: &FlowKey, seed: u64) -> u32 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    let words = [
        u64::from(flow.client_addr[0]) << 32 | u64::from(flow.client_addr[1]),
        u64::from(flow.client_addr[2]) << 32 | u64::from(flow.client_addr[3]),
        u64::from(flow.client_port_be) << 32
            | u64::from(flow.service_port_be) << 16
            | u64::from(flow.service_id),
    ];
    for w in words {
        h ^= w;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
    }
    (h >> 32) as u32
}

/// `skb->tc_index` of the agent's copies: set on the packet for the clone and restored after, so
/// only the copy carries it (through the VXLAN encapsulation, which keeps it, and any IP
/// fragmentation, which copies it to every fragment). Not `skb->mark`: a marked packet may not
/// use a tunnel's cached route (`ip_tunnel_dst_cache_usable`), so every copy would pay a route
/// lookup. Nothing else reads `tc_index` since the kernel dropped dsmark and tcindex (6.3).
const COPY_TAG: u32 = 0xd099;

/// Clones the current packet to every mirror session.
///
/// VXLAN picks each copy's UDP source port from the packet's flow hash, and computes that hash
/// (a flow dissection and a SipHash, about a fifth of a copy's cost under `perf`) for every
/// clone when the packet has none, as on veth and virtio-net without hash reporting. So a
/// packet without a hash gets the flow's own hash for the clones, and loses it again after:
/// the stack computes its own later, as it would have (one per flow, like the inner hash RFC
/// 7348 asks the source port to follow). A packet with a hash (a NIC's RSS) keeps its own.
#[inline(always)]
fn mirror(ctx: &TcContext, config: &DatapathConfig, flow: &FlowKey) {
    let skb = ctx.skb.skb;
    // SAFETY: `skb` points at the kernel's `__sk_buff`; `tc_index` is writable from TC
    // programs, and `hash` is the stored hash (reading it computes nothing).
    let (tag, had_hash) = unsafe { ((*skb).tc_index, (*skb).hash != 0) };
    unsafe { (*skb).tc_index = COPY_TAG };
    if !had_hash {
        // Never 0, which reads as "no hash". (Computed again per copied packet rather than
        // stored in the flow: a few multiplies against the copy's microsecond.)
        // SAFETY: plain helper call on this program's packet.
        unsafe { bpf_set_hash(skb, flow_hash(flow, config.sampling_seed) | 1) };
    }
    clone_to_sessions(ctx, config);
    // SAFETY: as above.
    unsafe {
        if !had_hash {
            bpf_set_hash_invalid(skb);
        }
        (*skb).tc_index = tag;
    }
}

#[inline(always)]
fn clone_to_sessions(ctx: &TcContext, config: &DatapathConfig) {
    let mut i = 0;
    while i < MAX_SESSIONS && i < config.session_count {
        if let Some(session) = SESSIONS.get(i) {
            if session.ifindex != 0 {
                // The session's own device knows its remote and VNI, and caches its route.
                count_clone(ctx.clone_redirect(session.ifindex, 0).map_err(i64::from));
                i += 1;
                continue;
            }
            // SAFETY: all-zero is a valid `bpf_tunnel_key`.
            let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
            key.tunnel_id = session.vni;
            key.tunnel_ttl = 64;
            // IPv4 VXLAN may skip the outer UDP checksum (RFC 7348); IPv6 receivers drop
            // zero-checksum UDP by default (RFC 6935), so IPv6 keeps it.
            let flags = if session.ipv6 != 0 {
                key.__bindgen_anon_1.remote_ipv6 = session.remote_ipv6;
                u64::from(aya_ebpf::bindings::BPF_F_TUNINFO_IPV6)
            } else {
                key.__bindgen_anon_1.remote_ipv4 = session.remote_ipv4;
                u64::from(BPF_F_ZERO_CSUM_TX)
            };
            // SAFETY: `key` lives across the call and its size is passed.
            let set = unsafe {
                bpf_skb_set_tunnel_key(
                    ctx.skb.skb,
                    &mut key,
                    size_of::<bpf_tunnel_key>() as u32,
                    flags,
                )
            };
            count_clone(if set == 0 {
                ctx.clone_redirect(config.vxlan_ifindex, 0)
                    .map_err(i64::from)
            } else {
                Err(set)
            });
        }
        i += 1;
    }
}

#[inline(always)]
fn count_clone(sent: Result<(), i64>) {
    match sent {
        Ok(()) => add(DatapathCounter::ClonesSent, 1),
        Err(error) => {
            add(DatapathCounter::CloneFailures, 1);
            if let Some(slot) = LAST_CLONE_ERROR.get_ptr_mut(0) {
                // SAFETY: a live array slot; a racing write leaves one of two errors.
                unsafe { *slot = error };
            }
        }
    }
}

#[map(name = "ADMITTED")]
static ADMITTED: aya_ebpf::maps::HashMap<AdmitKey, u32> =
    aya_ebpf::maps::HashMap::with_max_entries(MAX_ADMITTED, 0);
#[map(name = "ADMIT_CONFIG")]
static ADMIT_CONFIG: Array<AdmitConfig> = Array::with_max_entries(1, 0);
#[map(name = "REJECTED")]
static REJECTED: Array<AdmitKey> = Array::with_max_entries(1, 0);
#[map(name = "LAST_CLONE_ERROR")]
static LAST_CLONE_ERROR: Array<i64> = Array::with_max_entries(1, 0);
#[map(name = "ADMIT_COUNTERS")]
static ADMIT_COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(AdmitCounter::ALL.len() as u32, 0);

const IPPROTO_UDP: u8 = 17;
const VXLAN_FLAG_VNI: u8 = 0x08;

/// A bounds-checked pointer to a `T` at `offset` in the packet (the verifier needs the check
/// against `data_end` before every access).
#[inline(always)]
fn xdp_ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    // SAFETY: `xdp_ptr_at` checked that the bytes are inside the packet; unaligned because
    // packet headers are not aligned for `T`.
    xdp_ptr_at::<T>(ctx, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn admit_count(counter: AdmitCounter) {
    bump(&ADMIT_COUNTERS, counter as u32);
}

/// Shadow host, receiving interface: admit VXLAN mirror datagrams only from registered
/// (source, VNI) pairs. Anything not addressed to the mirror port passes untouched.
#[xdp]
pub fn doppel_xdp_admit(ctx: XdpContext) -> u32 {
    match admit(&ctx) {
        Some(verdict) => verdict,
        None => {
            admit_count(AdmitCounter::Other);
            xdp_action::XDP_PASS
        }
    }
}

/// `None`: not mirror traffic (passed); `Some(verdict)` for datagrams to the mirror port.
#[inline(always)]
fn admit(ctx: &XdpContext) -> Option<u32> {
    let port_be = ADMIT_CONFIG.get(0)?.udp_port_be;
    if port_be == 0 {
        return None;
    }
    let ethertype = u16::from_be(read::<u16>(ctx, 12)?);
    let mapped = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    let (src, udp) = match ethertype {
        ETH_P_IP => {
            let ver_ihl: u8 = read(ctx, ETH_HLEN)?;
            let frag = u16::from_be(read::<u16>(ctx, ETH_HLEN + 6)?);
            let protocol: u8 = read(ctx, ETH_HLEN + 9)?;
            // Fragments carry no (or no complete) UDP header; the receiver checks the source
            // and VNI of reassembled datagrams itself, and VXLAN senders must not fragment
            // (RFC 7348 §4.3).
            if protocol != IPPROTO_UDP || frag & 0x3fff != 0 || ver_ihl >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(ver_ihl & 0x0f) * 4;
            if !(20..=60).contains(&ihl) {
                return None;
            }
            let src: u32 = read(ctx, ETH_HLEN + 12)?;
            ([0, 0, mapped, src], ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            let next: u8 = read(ctx, ETH_HLEN + 6)?;
            if next != IPPROTO_UDP {
                return None;
            }
            (read::<[u32; 4]>(ctx, ETH_HLEN + 8)?, ETH_HLEN + 40)
        }
        _ => return None,
    };
    let dport: u16 = read(ctx, udp + 2)?;
    if dport != port_be {
        return None;
    }
    let (Some(flags), Some(vni)) = (read::<u8>(ctx, udp + 8), read::<[u8; 4]>(ctx, udp + 12))
    else {
        admit_count(AdmitCounter::Malformed);
        return Some(xdp_action::XDP_DROP);
    };
    if flags & VXLAN_FLAG_VNI == 0 {
        admit_count(AdmitCounter::Malformed);
        return Some(xdp_action::XDP_DROP);
    }
    let key = AdmitKey {
        addr: src,
        vni: u32::from_be_bytes([0, vni[0], vni[1], vni[2]]),
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { ADMITTED.get(&key) }.is_some() {
        admit_count(AdmitCounter::Admitted);
        Some(xdp_action::XDP_PASS)
    } else {
        admit_count(AdmitCounter::NotAdmitted);
        if let Some(slot) = REJECTED.get_ptr_mut(0) {
            // SAFETY: a live array slot; a racing write leaves one of two keys.
            unsafe { *slot = key };
        }
        Some(xdp_action::XDP_DROP)
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
