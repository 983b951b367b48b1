//! `cargo xtask bench replay`: how many mirrored exchanges one core of the shadow agent replays.
//!
//! A generator host sends VXLAN mirror traffic (HTTP/1.1 flows of 10 keep-alive GETs each,
//! 64 flows open at a time) at a fixed offered rate to a shadow host, where `doppel-agent
//! --config shadow.toml` (XDP admission, TC latency on `lo`, one tokio thread) replays it to
//! nginx on loopback. Each step runs the rate for a few seconds, then waits for the replay to
//! drain; the rate doubles until more than 0.1 % of the offered exchanges were not replayed,
//! then bisects between the last passing and the first failing rate.
//!
//! Figures:
//! - `exchanges_per_s_per_core`: the highest offered rate replayed with at most 0.1 % loss (the
//!   replayer is single-threaded, so this is one core's worth);
//! - `cpu_us_per_exchange`: the agent's CPU time (user + system) per replayed exchange at that
//!   rate;
//! - `loss_pct`: exchanges lost at half that rate.
//!
//! `--receive-rate N` measures the receive path alone (socket, decode, flow table), with
//! datagrams of a port the shadow does not replay: on this machine, 198,000 datagrams/s were
//! received without a drop at 1.5 µs of agent CPU each (the generator was the limit), so the
//! socket is read one datagram per call, drained without returning to the poller, and
//! `recvmmsg` batching was not needed.
//!
//! The generator and nginx run on the same machine and take CPU too (this machine has 2 cores),
//! so the figures are a floor for a dedicated shadow host.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use doppel_tests::{
    testbed::{Host, Link, Process},
    workloads::Nginx,
};
use serde_json::Value;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Seconds per rate step.
    #[arg(long, default_value_t = 4)]
    seconds: u64,
    /// First offered rate, exchanges/s.
    #[arg(long, default_value_t = 2000)]
    start_rate: u64,
    /// Highest offered rate tried.
    #[arg(long, default_value_t = 128_000)]
    max_rate: u64,
    /// Measure only the receive path instead, at this many datagrams/s: admitted mirror
    /// datagrams of a port the shadow does not replay, so each is received, decoded and
    /// counted (`segments_unknown_service`), and none replayed. Prints the datagrams received
    /// and the kernel's drops on the mirror socket.
    #[arg(long)]
    receive_rate: Option<u64>,
}

const VNI: u32 = 7;
const EXCHANGES_PER_FLOW: u32 = 10;
const OPEN_FLOWS: usize = 64;
const PORT: u16 = 8080;

/// Builds one VXLAN datagram around Ethernet/IPv4/TCP. (The agent has a builder too; xtask does
/// not depend on the agent crate, whose build compiles the eBPF object.)
fn datagram(
    client_port: u16,
    service_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let client = Ipv4Addr::new(10, 200, 0, 1);
    let service = Ipv4Addr::new(10, 200, 0, 2);
    let mut out = vec![0x08, 0, 0, 0];
    out.extend_from_slice(&(VNI << 8).to_be_bytes());
    out.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
    let total = (40 + payload.len()) as u16;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    out.extend_from_slice(&client.octets());
    out.extend_from_slice(&service.octets());
    out.extend_from_slice(&client_port.to_be_bytes());
    out.extend_from_slice(&service_port.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&ack.to_be_bytes());
    out.extend_from_slice(&[0x50, flags | 0x10, 0xff, 0xff, 0, 0, 0, 0]);
    out.extend_from_slice(payload);
    out
}

/// One mirrored flow being generated.
struct GenFlow {
    port: u16,
    seq: u32,
    ack: u32,
    sent: u32,
}

/// Sends `rate` exchanges/s to flows of `service_port` for `seconds`; returns the exchanges
/// and the datagrams (exchanges and FINs) sent.
fn generate(
    socket: &UdpSocket,
    target: SocketAddr,
    service_port: u16,
    rate: u64,
    seconds: u64,
    next_port: &mut u16,
) -> (u64, u64) {
    let request = b"GET /bench HTTP/1.1\r\nHost: shadow\r\n\r\n";
    let mut flows: Vec<GenFlow> = Vec::new();
    let new_flow = |next_port: &mut u16| {
        *next_port = next_port.wrapping_add(1).max(1024);
        GenFlow {
            port: *next_port,
            seq: 1000,
            ack: 5000,
            sent: 0,
        }
    };
    for _ in 0..OPEN_FLOWS {
        flows.push(new_flow(next_port));
    }
    let total = rate * seconds;
    let started = Instant::now();
    let mut sent = 0u64;
    let mut fins = 0u64;
    let mut turn = 0usize;
    while sent < total {
        // Open loop: each exchange has its time; the generator catches up in bursts when late.
        let due = started + Duration::from_nanos(sent * 1_000_000_000 / rate);
        let now = Instant::now();
        if due > now {
            thread::sleep((due - now).min(Duration::from_millis(1)));
            continue;
        }
        let flow = &mut flows[turn % OPEN_FLOWS];
        turn += 1;
        let _ = socket.send_to(
            &datagram(flow.port, service_port, flow.seq, flow.ack, 0x08, request),
            target,
        );
        flow.seq = flow.seq.wrapping_add(request.len() as u32);
        flow.ack = flow.ack.wrapping_add(100);
        flow.sent += 1;
        sent += 1;
        if flow.sent == EXCHANGES_PER_FLOW {
            fins += 1;
            let _ = socket.send_to(
                &datagram(flow.port, service_port, flow.seq, flow.ack, 0x01, b""),
                target,
            );
            *flow = new_flow(next_port);
        }
    }
    // Close what is open, so every sent exchange belongs to a finished flow.
    for flow in &flows {
        if flow.sent > 0 {
            fins += 1;
            let _ = socket.send_to(
                &datagram(flow.port, service_port, flow.seq, flow.ack, 0x01, b""),
                target,
            );
        }
    }
    (sent, sent + fins)
}

fn process_cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |r| r.1)
        .split_whitespace()
        .collect();
    [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum()
}

struct Step {
    rate: u64,
    sent: u64,
    replayed: u64,
    cpu_s: f64,
}

impl Step {
    fn loss_pct(&self) -> f64 {
        100.0 * self.sent.saturating_sub(self.replayed) as f64 / self.sent.max(1) as f64
    }
}

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    crate::setup::ensure_debian_packages(&["nginx"])?;
    let mut build = Command::new("cargo");
    build
        .args(["build", "--release", "--package", "doppel-agent"])
        .current_dir(crate::workspace_root());
    toolchain.apply(&mut build);
    crate::run_command(&mut build)?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::workspace_root().join("target"), Into::into);
    let agent = target_dir.join("release/doppel-agent");

    let generator = Host::new("bench-gen")?;
    let shadow = Host::new("bench-shadow")?;
    let link = Link::new(&generator, &shadow)?;
    let _nginx = Nginx::start(&shadow, "127.0.0.1".parse()?, PORT);
    let dir = std::env::temp_dir().join(format!("doppel-bench-replay-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = format!(
        "role = \"shadow\"\nxdp_interface = \"{iface}\"\nreplay_addr = \"127.0.0.1\"\n\
         replay_interface = \"lo\"\nreport_interval_ms = 500\n\
         [[sessions]]\nsource = \"{source}\"\nvni = {VNI}\n[[services]]\nport = {PORT}\n",
        iface = link.b_iface,
        source = link.a_v4,
    );
    std::fs::write(dir.join("shadow.toml"), config)?;
    let mut command = shadow.command(agent.to_str().context("agent path")?);
    command
        .arg("--config")
        .arg(dir.join("shadow.toml"))
        .stdout(Stdio::piped())
        .env("DOPPEL_LOG", "warn");
    let mut process: Process = shadow.spawn(command)?;
    let stdout = process.child_mut().stdout.take().context("agent stdout")?;
    let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = Arc::clone(&lines);
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(value) = serde_json::from_str(&line) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(value);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines.lock().unwrap_or_else(|e| e.into_inner()).is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the shadow agent printed no report"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let socket = {
        let _inside = generator.enter()?;
        UdpSocket::bind((link.a_v4, 0))?
    };
    let target = SocketAddr::new(link.b_v4.into(), 4789);
    let mut next_port = 1024u16;
    let counter = |from: usize, name: &str| -> u64 {
        lines.lock().unwrap_or_else(|e| e.into_inner())[from..]
            .iter()
            .map(|l| l["counters"][name].as_u64().unwrap_or(0))
            .sum()
    };
    let mut measure = |rate: u64| -> Step {
        let mark = lines.lock().unwrap_or_else(|e| e.into_inner()).len();
        let ticks = process_cpu_ticks(process.pid());
        let (sent, _) = generate(&socket, target, PORT, rate, options.seconds, &mut next_port);
        // Let the replay drain: flows still being paced finish within a second.
        thread::sleep(Duration::from_millis(2500));
        let cpu_s = (process_cpu_ticks(process.pid()) - ticks) as f64 / 100.0;
        let step = Step {
            rate,
            sent,
            replayed: counter(mark, "exchanges"),
            cpu_s,
        };
        println!(
            "  {rate:>7} exchanges/s offered: {sent} sent, {} replayed, loss {:.3} %, agent CPU {:.2} s ({:.1} µs/exchange), evicted {}, failed copies {}",
            step.replayed,
            step.loss_pct(),
            step.cpu_s,
            1e6 * step.cpu_s / step.replayed.max(1) as f64,
            counter(mark, "flows_evicted_memory"),
            counter(mark, "copies_failed"),
        );
        step
    };
    if let Some(rate) = options.receive_rate {
        let mark = lines.lock().unwrap_or_else(|e| e.into_inner()).len();
        let ticks = process_cpu_ticks(process.pid());
        let (_, datagrams) = generate(
            &socket,
            target,
            PORT + 1,
            rate,
            options.seconds,
            &mut next_port,
        );
        thread::sleep(Duration::from_millis(1500));
        let cpu_s = (process_cpu_ticks(process.pid()) - ticks) as f64 / 100.0;
        let received = counter(mark, "datagrams");
        let dropped = counter(mark, "mirror_drops");
        process.stop(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&dir);
        println!(
            "receive: offered {rate}/s for {} s, {datagrams} datagrams sent; received {received}, \
             socket drops {dropped}; agent CPU {cpu_s:.2} s",
            options.seconds,
        );
        println!(
            "receive: datagrams_per_s={} dropped_pct={:.4} cpu_us_per_datagram={:.2}",
            datagrams / options.seconds.max(1),
            100.0 * datagrams.saturating_sub(received) as f64 / datagrams.max(1) as f64,
            1e6 * cpu_s / received.max(1) as f64
        );
        return Ok(());
    }
    println!(
        "bench replay: {} s steps, {OPEN_FLOWS} flows open, {EXCHANGES_PER_FLOW} GETs per flow, nginx on the shadow's loopback",
        options.seconds
    );
    let mut best: Option<Step> = None;
    let mut failed_at = None;
    let mut rate = options.start_rate;
    while rate <= options.max_rate {
        let step = measure(rate);
        if step.loss_pct() <= 0.1 {
            best = Some(step);
            rate *= 2;
        } else {
            failed_at = Some(rate);
            break;
        }
    }
    if let (Some(good), Some(bad)) = (best.as_ref().map(|b| b.rate), failed_at) {
        let mid = (good + bad) / 2;
        if mid > good {
            let step = measure(mid);
            if step.loss_pct() <= 0.1 {
                best = Some(step);
            }
        }
    }
    let best = best.context("even the starting rate lost more than 0.1 % of exchanges")?;
    let half = measure(best.rate / 2);
    process.stop(Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(&dir);
    let cpu_us = 1e6 * best.cpu_s / best.replayed.max(1) as f64;
    println!(
        "replay: exchanges_per_s_per_core={} cpu_us_per_exchange={cpu_us:.1} loss_pct={:.3}",
        best.rate,
        half.loss_pct()
    );
    Ok(())
}
