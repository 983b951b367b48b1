//! What the TC programs cost per packet kind, measured with `BPF_PROG_TEST_RUN` on the programs
//! a running agent loaded, with that agent's own maps and policy: no clock of ours, no
//! statistics, no load generator, so the figures are the programs' alone.
//!
//! The packets come from a made-up client (198.18.0.0/15 and 2001:db8::/32, the ranges set aside
//! for benchmarks and documentation) to the bench's service, so they never meet a real flow.
//! Runs happen in the live host's network namespace, where the program's clone finds the VXLAN
//! device: a sampled packet's copies really are encapsulated and sent to the shadows.

use std::{net::Ipv4Addr, net::Ipv6Addr, os::fd::OwnedFd};

use anyhow::{Context as _, bail};
use doppel_common::maps::FLOW_SAMPLED;

use crate::bpf_sys;

const CLIENT_V4: [u8; 4] = [198, 18, 0, 1];
const CLIENT_V6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
const RESPONSE_BYTES: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\n\r\ndoppel bench ok\n";
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
/// A port no service listens on.
const OTHER_PORT: u16 = 9090;

/// The packet kinds, in the order [`Costs::ns`] holds them.
pub(super) const KINDS: [&str; 9] = [
    "syn",
    "first_payload",
    "established",
    "established_sampled",
    "pure_ack",
    "response",
    "no_service",
    "ipv6",
    "response_closing",
];
/// Index of the established, unsampled client payload packet (the summary's `test_run_ns`).
pub(super) const ESTABLISHED: usize = 2;
/// Index of the same packet on a sampled flow.
pub(super) const ESTABLISHED_SAMPLED: usize = 3;
const SYN: usize = 0;
const FIRST_PAYLOAD: usize = 1;
const PURE_ACK: usize = 4;
const RESPONSE: usize = 5;
const NO_SERVICE: usize = 6;
const IPV6: usize = 7;
/// A server response that closes an open exchange: the precise clock, the latency histogram
/// and the error-reply check, which `response` (the rest of a response, or one nothing awaits)
/// skips.
const RESPONSE_CLOSING: usize = 8;

/// Where the agent under test expects its service.
#[derive(Clone, Copy, Debug)]
pub(super) struct Service {
    pub(super) v4: Ipv4Addr,
    pub(super) v6: Ipv6Addr,
    pub(super) port: u16,
}

/// One measurement of every kind.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Costs {
    /// Mean ns per program run, per kind.
    pub(super) ns: [f64; KINDS.len()],
    /// The per-call overhead a repeat-1 run carries (the kernel's clock read and call), ns:
    /// what was subtracted from the repeat-1 first-payload figure.
    pub(super) repeat1_overhead: f64,
    /// What run-time statistics add to a program run: the established packet with them on,
    /// less without. The cost rounds' per-packet figures carry it; production does not.
    pub(super) stats_overhead: f64,
    /// The part of [`Self::stats_overhead`] inside the statistics' own window: what they add to
    /// the `run_time_ns / run_cnt` they report (the statistics' figure for the established
    /// packet, less its figure without them). The cost rounds' per-packet figure carries exactly
    /// this; the rest of the overhead falls outside the window.
    pub(super) stats_in_window: f64,
}

impl Costs {
    /// Each figure's median over `rounds` (one round: itself).
    pub(super) fn median(rounds: &[Self]) -> Self {
        let of = |figure: &dyn Fn(&Self) -> f64| {
            let mut values: Vec<f64> = rounds.iter().map(figure).collect();
            median(&mut values)
        };
        Self {
            ns: std::array::from_fn(|kind| of(&|c: &Self| c.ns[kind])),
            repeat1_overhead: of(&|c: &Self| c.repeat1_overhead),
            stats_overhead: of(&|c: &Self| c.stats_overhead),
            stats_in_window: of(&|c: &Self| c.stats_in_window),
        }
    }
}

/// The agent's two TC programs and its flow table.
struct Programs {
    ingress: OwnedFd,
    /// The ingress program's id (its run-time statistics are read by id).
    ingress_id: u64,
    egress: OwnedFd,
    flows: OwnedFd,
}

impl Programs {
    /// Opens the programs `pid` holds, by id, and their `FLOWS` map.
    fn of_agent(pid: u32) -> anyhow::Result<Self> {
        let ids = super::agent_prog_ids(pid)?;
        let show = |what: &str, id: u64| -> anyhow::Result<serde_json::Value> {
            let out = std::process::Command::new("bpftool")
                .args([what, "show", "id", &id.to_string(), "--json"])
                .output()?;
            Ok(serde_json::from_slice(&out.stdout)?)
        };
        let (mut ingress, mut egress, mut map_ids) = (None, None, Vec::new());
        for id in ids {
            let prog = show("prog", id)?;
            match prog["name"].as_str().unwrap_or_default() {
                "doppel_tc_ingress" => ingress = Some(id),
                "doppel_tc_egress" => egress = Some(id),
                _ => continue,
            }
            map_ids.extend(prog["map_ids"].as_array().into_iter().flatten().cloned());
        }
        let (Some(ingress), Some(egress)) = (ingress, egress) else {
            bail!("agent {pid} holds no doppel TC programs");
        };
        let mut flows = None;
        for id in map_ids.iter().filter_map(serde_json::Value::as_u64) {
            if show("map", id)?["name"].as_str() == Some("FLOWS") {
                flows = Some(id);
                break;
            }
        }
        let flows = flows.context("the TC programs use no FLOWS map")?;
        let open = |f: fn(u32) -> std::io::Result<OwnedFd>, id: u64| {
            f(id as u32).with_context(|| format!("opening bpf object {id}"))
        };
        Ok(Self {
            ingress: open(bpf_sys::prog_by_id, ingress)?,
            ingress_id: ingress,
            egress: open(bpf_sys::prog_by_id, egress)?,
            flows: open(bpf_sys::map_by_id, flows)?,
        })
    }

    fn run(&self, prog: &OwnedFd, packet: &[u8], repeat: u32) -> anyhow::Result<f64> {
        let (ns, _verdict) =
            bpf_sys::test_run(prog, packet, repeat).context("BPF_PROG_TEST_RUN")?;
        Ok(f64::from(ns))
    }

    /// The flow's `FLOW_*` bits, if the table holds it.
    fn flow_flags(&self, service: &Service, v6: bool, client_port: u16) -> anyhow::Result<u32> {
        // `FlowKey`: client address words (IPv4-mapped for IPv4), client and service ports in
        // network order, service id (0 for IPv4, 1 for IPv6: the bench's config order).
        let mut key = Vec::with_capacity(24);
        if v6 {
            key.extend_from_slice(&CLIENT_V6);
        } else {
            key.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
            key.extend_from_slice(&CLIENT_V4);
        }
        key.extend_from_slice(&client_port.to_be_bytes());
        key.extend_from_slice(&service.port.to_be_bytes());
        key.extend_from_slice(&u32::from(v6).to_ne_bytes());
        // `FlowState`: two u64 clocks, then the flags.
        let mut value = [0u8; size_of::<doppel_common::maps::FlowState>()];
        if !bpf_sys::map_lookup(&self.flows, &key, &mut value).context("reading FLOWS")? {
            bail!("test flow {client_port} is not in FLOWS (v6: {v6})");
        }
        Ok(u32::from_ne_bytes([
            value[16], value[17], value[18], value[19],
        ]))
    }
}

/// Builds Ethernet frames of one test flow.
struct Flow {
    service: Service,
    v6: bool,
    client_port: u16,
}

impl Flow {
    fn client(&self, flags: u8, payload: &[u8]) -> Vec<u8> {
        frame(
            self.v6,
            &self.service,
            true,
            self.client_port,
            self.service.port,
            flags,
            payload,
        )
    }

    fn response(&self, payload: &[u8]) -> Vec<u8> {
        frame(
            self.v6,
            &self.service,
            false,
            self.service.port,
            self.client_port,
            TCP_ACK | TCP_PSH,
            payload,
        )
    }
}

/// An Ethernet / IPv4-or-IPv6 / TCP frame between the test client and the service
/// (`to_service` says which way). Checksums are left zero: the programs do not read them.
fn frame(
    v6: bool,
    service: &Service,
    to_service: bool,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let tcp_len = 20 + payload.len();
    if v6 {
        let (src, dst) = if to_service {
            (CLIENT_V6, service.v6.octets())
        } else {
            (service.v6.octets(), CLIENT_V6)
        };
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        f.extend_from_slice(&[6, 64]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
    } else {
        let (src, dst) = if to_service {
            (CLIENT_V4, service.v4.octets())
        } else {
            (service.v4.octets(), CLIENT_V4)
        };
        f.extend_from_slice(&0x0800u16.to_be_bytes());
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        // id, DF, TTL 64, TCP, checksum.
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
    }
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    // seq, ack, data offset 5 words, flags, window, checksum, urgent.
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f.extend_from_slice(payload);
    f
}

/// Opens test flows (SYN, then the first payload, which decides) until one is sampled as
/// `sampled` says; returns it.
fn open_flow(
    programs: &Programs,
    service: Service,
    v6: bool,
    sampled: bool,
    next_port: &mut u16,
) -> anyhow::Result<Flow> {
    for _ in 0..5000 {
        let flow = Flow {
            service,
            v6,
            client_port: *next_port,
        };
        *next_port = next_port.wrapping_add(1).max(1024);
        programs.run(&programs.ingress, &flow.client(TCP_SYN, &[]), 1)?;
        programs.run(
            &programs.ingress,
            &flow.client(TCP_ACK | TCP_PSH, REQUEST),
            1,
        )?;
        let flags = programs.flow_flags(&service, v6, flow.client_port)?;
        if (flags & FLOW_SAMPLED != 0) == sampled {
            return Ok(flow);
        }
    }
    bail!(
        "no {} test flow in 5000 tries: is the sample rate 0 or 100 %?",
        if sampled { "sampled" } else { "unsampled" }
    )
}

/// Measures every kind on the programs of the agent `pid` (running with a sample rate strictly
/// between 0 and 100 %); the calling thread must be in the live host's network namespace.
/// `repeat` runs per kind, and `first_payload_runs` repeat-1 runs for the first payload, whose
/// flow must be reset (by a SYN) before each.
pub(super) fn measure(
    pid: u32,
    service: Service,
    repeat: u32,
    first_payload_runs: u32,
) -> anyhow::Result<Costs> {
    let programs = Programs::of_agent(pid)?;
    let mut port = 20_000;
    let plain = open_flow(&programs, service, false, false, &mut port)?;
    let sampled = open_flow(&programs, service, false, true, &mut port)?;
    let fresh = open_flow(&programs, service, false, false, &mut port)?;
    let v6 = open_flow(&programs, service, true, false, &mut port)?;
    let other = Flow {
        service: Service {
            port: OTHER_PORT,
            ..service
        },
        v6: false,
        client_port: 20_000,
    };
    let request = |flow: &Flow| flow.client(TCP_ACK | TCP_PSH, REQUEST);
    let mut costs = Costs::default();
    let ingress = &programs.ingress;
    let kinds: [(usize, &OwnedFd, Vec<u8>); 7] = [
        (SYN, ingress, fresh.client(TCP_SYN, &[])),
        (ESTABLISHED, ingress, request(&plain)),
        (ESTABLISHED_SAMPLED, ingress, request(&sampled)),
        (PURE_ACK, ingress, plain.client(TCP_ACK, &[])),
        (RESPONSE, &programs.egress, plain.response(RESPONSE_BYTES)),
        (NO_SERVICE, ingress, request(&other)),
        (IPV6, ingress, request(&v6)),
    ];
    for (kind, prog, packet) in &kinds {
        costs.ns[*kind] = programs.run(prog, packet, repeat)?;
    }
    {
        let _stats_on = bpf_sys::enable_stats().context("BPF_ENABLE_STATS")?;
        let before = super::prog_stats_by_id(programs.ingress_id)?;
        costs.stats_overhead = programs.run(ingress, &kinds[1].2, repeat)? - costs.ns[ESTABLISHED];
        let counted = super::prog_stats_by_id(programs.ingress_id)?.since(before);
        costs.stats_in_window = counted.ns_per_run() - costs.ns[ESTABLISHED];
    }
    // The first payload decides once per flow, so each run needs the flow reset by a SYN, and
    // runs one at a time; the repeat-1 overhead is measured alongside on the established packet
    // and subtracted.
    let (syn, first) = (fresh.client(TCP_SYN, &[]), request(&fresh));
    let (mut firsts, mut singles) = (Vec::new(), Vec::new());
    for _ in 0..first_payload_runs {
        programs.run(ingress, &syn, 1)?;
        firsts.push(programs.run(ingress, &first, 1)?);
        singles.push(programs.run(ingress, &kinds[1].2, 1)?);
    }
    let overhead = median(&mut singles) - costs.ns[ESTABLISHED];
    costs.ns[FIRST_PAYLOAD] = median(&mut firsts) - overhead;
    costs.repeat1_overhead = overhead;
    // A response closes an exchange only when a request opened one: a request before each
    // single run.
    let (request_plain, response) = (request(&plain), plain.response(RESPONSE_BYTES));
    let mut closing = Vec::new();
    for _ in 0..first_payload_runs {
        programs.run(ingress, &request_plain, 1)?;
        closing.push(programs.run(&programs.egress, &response, 1)?);
    }
    costs.ns[RESPONSE_CLOSING] = median(&mut closing) - overhead;
    // End the test flows, so they do not wait in the table for the idle timeout.
    for flow in [&plain, &sampled, &fresh, &v6] {
        programs.run(ingress, &flow.client(TCP_ACK | TCP_FIN, &[]), 1)?;
    }
    Ok(costs)
}

/// The median of `values` (which it sorts).
pub(super) fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}
