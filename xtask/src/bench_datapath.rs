//! `cargo xtask bench datapath`: nginx on a live host, a real load generator (wrk) on a client
//! host, the agent off and on (every packet inspected, 10 % of flows mirrored to two sessions),
//! alternated in one run so the machine's noise hits both sides alike.
//!
//! Figures:
//! - `throughput_ratio`: wrk's requests/s with the agent on / off (mean over rounds);
//! - `p99_added_us`: p99 at half the agent-off maximum, on minus off, from an open-loop paced
//!   client (latency counted from each request's scheduled time, so stalls are not hidden);
//! - `ns_per_packet`: the TC programs' `run_time_ns / run_cnt` from `bpf_stats_enabled`;
//! - `agent_cpu_pct`: the agent process's CPU at 10 k exchanges/s, percent of one core.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use doppel_tests::{
    testbed::{Host, Link, Process},
    traffic::UdpDrain,
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Seconds per measured round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Agent off/on round pairs for throughput and for latency.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Share of flows mirrored (to two sessions), percent.
    #[arg(long, default_value_t = 10.0)]
    mirror_percent: f64,
}

const PORT: u16 = 8080;

struct Bed {
    client: Host,
    live: Host,
    _shadows: Vec<Host>,
    sinks: Vec<UdpDrain>,
    client_link: Link,
    shadow_addrs: Vec<std::net::Ipv4Addr>,
    _nginx: Process,
    dir: std::path::PathBuf,
}

fn setup_bed() -> anyhow::Result<Bed> {
    let client = Host::new("bench-client")?;
    let live = Host::new("bench-live")?;
    let client_link = Link::new(&client, &live)?;
    let mut shadows = Vec::new();
    let mut sinks = Vec::new();
    let mut shadow_addrs = Vec::new();
    for i in 0..2 {
        let shadow = Host::new(&format!("bench-shadow{i}"))?;
        let link = Link::new(&live, &shadow)?;
        let socket = {
            let _inside = shadow.enter()?;
            UdpSocket::bind((link.b_v4, 4789))?
        };
        sinks.push(UdpDrain::start(socket));
        shadow_addrs.push(link.b_v4);
        shadows.push(shadow);
    }
    let dir = std::env::temp_dir().join(format!("doppel-bench-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n access_log off;\n client_body_temp_path {d};\n proxy_temp_path {d};\n\
         fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n keepalive_requests 1000000;\n\
         server {{ listen {addr}:{PORT}; location / {{ return 200 \"doppel bench ok\\n\"; }} }}\n}}\n",
        d = dir.display(),
        addr = client_link.b_v4,
    );
    std::fs::write(dir.join("nginx.conf"), conf)?;
    let mut nginx = live.command("nginx");
    nginx
        .args(["-p"])
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(Stdio::null());
    let nginx = live.spawn(nginx)?;
    let target = SocketAddr::new(client_link.b_v4.into(), PORT);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let up = {
            let _inside = client.enter()?;
            TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok()
        };
        if up {
            break;
        }
        if Instant::now() > deadline {
            bail!("nginx did not start; see {}/logs/error.log", dir.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
    Ok(Bed {
        client,
        live,
        _shadows: shadows,
        sinks,
        client_link,
        shadow_addrs,
        _nginx: nginx,
        dir,
    })
}

fn start_agent(bed: &Bed, agent: &std::path::Path, mirror_percent: f64) -> anyhow::Result<Process> {
    let config = format!(
        "interface = \"{iface}\"\nreport_interval_ms = 10000\ndefault_sample_percent = {mirror_percent}\n\
         [[services]]\naddr = \"{addr}\"\nport = {PORT}\n\
         [[mirror_sessions]]\nshadow = \"{s0}\"\nvni = 7\n[[mirror_sessions]]\nshadow = \"{s1}\"\nvni = 8\n",
        iface = bed.client_link.b_iface,
        addr = bed.client_link.b_v4,
        s0 = bed.shadow_addrs[0],
        s1 = bed.shadow_addrs[1],
    );
    let path = bed.dir.join("live.toml");
    std::fs::write(&path, config)?;
    let mut command = bed.live.command(agent.to_str().context("agent path")?);
    command
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("DOPPEL_LOG", "info");
    let mut process = bed.live.spawn(command)?;
    // Ready once it says so: loading (the verifier's work is charged to the agent) and attaching
    // must not fall inside a measured round.
    let stderr = process.child_mut().stderr.take().context("agent stderr")?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("live data path running") => break,
            Some(Ok(_)) => {}
            _ => bail!("the agent exited before attaching"),
        }
    }
    thread::spawn(move || lines.for_each(drop));
    Ok(process)
}

/// wrk's requests/s for `seconds` with 50 keep-alive connections.
fn wrk(bed: &Bed, seconds: u64) -> anyhow::Result<f64> {
    let url = format!("http://{}:{PORT}/", bed.client_link.b_v4);
    let out = bed
        .client
        .run("wrk", &["-t1", "-c50", &format!("-d{seconds}s"), &url])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))
}

/// Open-loop paced load: `rate` requests/s over `connections` keep-alive connections for
/// `seconds`; latency from each request's scheduled send time.
fn paced(
    bed: &Bed,
    rate: f64,
    connections: u32,
    seconds: u64,
) -> anyhow::Result<hdrhistogram::Histogram<u64>> {
    let target = SocketAddr::new(bed.client_link.b_v4.into(), PORT);
    let period = Duration::from_secs_f64(f64::from(connections) / rate);
    let histograms = thread::scope(|s| {
        let workers: Vec<_> = (0..connections)
            .map(|i| {
                s.spawn(move || -> anyhow::Result<hdrhistogram::Histogram<u64>> {
                    let mut h = hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 3)?;
                    let mut conn = {
                        let _inside = bed.client.enter()?;
                        TcpStream::connect(target)?
                    };
                    conn.set_nodelay(true)?;
                    let request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
                    let start =
                        Instant::now() + period.mul_f64(f64::from(i) / f64::from(connections));
                    let end = start + Duration::from_secs(seconds);
                    let mut next = start;
                    let mut buf = [0u8; 1024];
                    while next < end {
                        let now = Instant::now();
                        if now < next {
                            thread::sleep(next - now);
                        }
                        conn.write_all(request)?;
                        let mut got = 0;
                        // nginx's answer to this request is one small segment ending in "ok\n".
                        while !buf[..got].ends_with(b"ok\n") {
                            let n = conn.read(&mut buf[got..])?;
                            anyhow::ensure!(n > 0, "nginx closed the connection");
                            got += n;
                        }
                        h.saturating_record(next.elapsed().as_nanos() as u64);
                        next += period;
                    }
                    Ok(h)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker"))
            .collect::<Vec<_>>()
    });
    let mut total = hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 3)?;
    for h in histograms {
        total.add(h?)?;
    }
    Ok(total)
}

/// Sum of `run_time_ns` and `run_cnt` over doppel's TC programs (bpftool, global).
fn prog_stats() -> anyhow::Result<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut totals = (0, 0);
    for p in progs.as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        if name.starts_with("doppel_tc_") {
            totals.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            totals.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
    }
    Ok(totals)
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

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    crate::setup::ensure_debian_packages(&["nginx", "wrk"])?;
    let mut build = Command::new("cargo");
    build
        .args(["build", "--release", "--package", "doppel-agent"])
        .current_dir(crate::workspace_root());
    toolchain.apply(&mut build);
    crate::run_command(&mut build)?;
    let agent = crate::workspace_root().join("target/release/doppel-agent");

    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling bpf_stats")?;
    let bed = setup_bed()?;
    let seconds = options.seconds;
    println!(
        "bench datapath: nginx (1 worker) <- wrk -t1 -c50, {seconds}s rounds, agent off/on alternated"
    );

    let _ = wrk(&bed, 1)?; // warm-up
    let (mut off, mut on) = (Vec::new(), Vec::new());
    let mut stats = (0u64, 0u64);
    for round in 0..options.rounds {
        off.push(wrk(&bed, seconds)?);
        let mut process = start_agent(&bed, &agent, options.mirror_percent)?;
        let before = prog_stats()?;
        on.push(wrk(&bed, seconds)?);
        let after = prog_stats()?;
        stats.0 += after.0 - before.0;
        stats.1 += after.1 - before.1;
        process.stop(Duration::from_secs(5));
        println!(
            "  round {round}: off {:.0} req/s, on {:.0} req/s",
            off[off.len() - 1],
            on[on.len() - 1]
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let throughput_ratio = mean(&on) / mean(&off);
    let ns_per_packet = stats.0 as f64 / stats.1.max(1) as f64;

    let half = mean(&off) / 2.0;
    let mut latency_off = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    let mut latency_on = latency_off.clone();
    for round in 0..options.rounds {
        latency_off.add(paced(&bed, half, 8, seconds)?)?;
        let mut process = start_agent(&bed, &agent, options.mirror_percent)?;
        latency_on.add(paced(&bed, half, 8, seconds)?)?;
        process.stop(Duration::from_secs(5));
        println!(
            "  half load {half:.0} req/s, round {round}: p99 off {:.1} us, on {:.1} us",
            latency_off.value_at_quantile(0.99) as f64 / 1e3,
            latency_on.value_at_quantile(0.99) as f64 / 1e3
        );
    }
    let p99_added_us = (latency_on.value_at_quantile(0.99) as f64
        - latency_off.value_at_quantile(0.99) as f64)
        / 1e3;

    let rate = 10_000.0_f64.min(mean(&off) * 0.8);
    let process = start_agent(&bed, &agent, options.mirror_percent)?;
    let ticks_before = process_cpu_ticks(process.pid());
    let started = Instant::now();
    let load = paced(&bed, rate, 8, seconds * 2)?;
    let cpu_seconds = (process_cpu_ticks(process.pid()) - ticks_before) as f64 / 100.0;
    let agent_cpu_pct = 100.0 * cpu_seconds / started.elapsed().as_secs_f64();
    drop(process);
    println!(
        "  agent CPU at {rate:.0} exchanges/s: {cpu_seconds:.2} CPU-s over {:.1} s ({} exchanges)",
        started.elapsed().as_secs_f64(),
        load.len()
    );
    println!(
        "  off p99 {:.1} us, on p99 {:.1} us; TC programs {} runs",
        latency_off.value_at_quantile(0.99) as f64 / 1e3,
        latency_on.value_at_quantile(0.99) as f64 / 1e3,
        stats.1
    );
    let mirrored: Vec<u64> = bed.sinks.iter().map(UdpDrain::received).collect();
    println!("  mirror copies received by the two shadows: {mirrored:?}");
    let _ = std::fs::remove_dir_all(&bed.dir);
    println!(
        "datapath: throughput_ratio={throughput_ratio:.3} p99_added_us={p99_added_us:.1} ns_per_packet={ns_per_packet:.0} agent_cpu_pct={agent_cpu_pct:.2}"
    );
    Ok(())
}
