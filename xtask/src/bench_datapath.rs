//! `cargo xtask bench datapath`: nginx on a live host, a real load generator (wrk) on a client
//! host, the agent off and on (every packet inspected, 10 % of flows mirrored to two sessions),
//! alternated in one run so the machine's noise hits both sides alike.
//!
//! The two shadows drop the copies as they arrive, with a TCX program, and count them (see
//! [`KernelSink`]): a shadow is another machine in production, and its receive work is not the
//! live host's cost.
//!
//! The client (wrk, the paced client's threads) runs on CPU 0 and nginx on CPU 1, so the
//! scheduler does not move them between rounds: the client's packets, and the ingress program,
//! are processed on CPU 0, nginx's responses and the egress program on CPU 1.
//!
//! Every round also runs the agent off twice, and the second run's figures (throughput ratio
//! and p99 added against the first) are printed as an A/A control: the band the machine's noise
//! alone spans, against which the agent's figures can be read.
//!
//! Figures:
//! - `throughput_ratio`: wrk's requests/s with the agent on over agent off in the same round,
//!   the mean of the rounds' ratios. Its 95 % t interval is printed before, with the A/A
//!   control's: one round's ratio wanders by a few percent on this machine (0.92 to 1.03 in the
//!   A/A control of one 8-round run), so a figure from three rounds could neither meet 0.97 nor
//!   miss it. What limits it is printed too: each CPU's cost of a request with the agent off
//!   (its busy share over wrk's rate) against the programs' run time per request on that CPU
//!   (ingress and the copies on the client's, egress on the server's), and the throughput ratio
//!   that time alone allows (see `Figures::print_cpu_budget`);
//! - `p99_added_us`: p99 at half the agent-off maximum, on minus off, from an open-loop paced
//!   client (latency counted from each request's scheduled time, so stalls are not hidden): the
//!   median of the per-round differences. A round's p99 is set by the worst few milliseconds of
//!   its window, and a stall of the whole virtual machine (the host running another guest,
//!   counted as steal time, printed per round) moves one round's p99 by milliseconds, so the
//!   mean of the differences resolves nothing; the median, with its distribution-free 95 %
//!   interval (order statistics of the binomial), is not moved by a few stalled rounds. The
//!   same figures at 10 % of capacity, the mean with its t interval and the A/A control's
//!   difference, computed exactly as the agent's, are printed before;
//! - `ns_per_packet`: the TC programs' `run_time_ns / run_cnt` under wrk's load with nothing
//!   mirrored (inspection alone), from dedicated cost rounds. Run-time statistics add two clock
//!   reads to every program run, which production does not pay, so they are on only in those
//!   rounds (`BPF_ENABLE_STATS`, held for the round); the throughput and latency rounds run
//!   without them. Part of those reads falls inside the window the statistics time, and that
//!   part, measured on the same programs by test_run (the statistics' own figure for the
//!   established packet less test_run's without them), is taken off: the meter is not the
//!   data path. The raw figure is printed before, as are the cost rounds with 10 % of flows
//!   mirrored, the cost of one copy derived from them and the share of client packets actually
//!   mirrored (sampling is per flow, of wrk's 50);
//! - `test_run_ns`: an established, unsampled client payload packet through the ingress program,
//!   by `BPF_PROG_TEST_RUN` (1,000,000 runs) on the running agent's own programs and maps, the
//!   median of 5 rounds that alternate the agents; every packet kind is printed on a line before
//!   ([`kinds`]);
//! - `copy_ns`: what a sampled established packet costs over an unsampled one in those runs, per
//!   copy (two sessions): the clone, its encapsulation and its send;
//! - `agent_cpu_pct`: the agent process's CPU at 10 k exchanges/s, percent of one core, with a
//!   1 s report interval so the window holds ten drains and reports (the default is 10 s).
//!
//! `--baseline-agent PATH` measures a second build in the same rounds, alternated with the
//! first, for before/after comparisons on a noisy machine.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use doppel_tests::testbed::{Host, Link, Process};

mod kinds;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Seconds per measured round.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Throughput rounds (no run-time statistics); each runs agent off, agent off again (the A/A
    /// control), on, and on with nothing mirrored, in an order that rotates from round to round.
    #[arg(long, default_value_t = 8)]
    rounds: u32,
    /// Cost rounds: each runs every agent under wrk's load with run-time statistics on, with
    /// 10 % of flows mirrored and with nothing mirrored.
    #[arg(long, default_value_t = 2)]
    cost_rounds: u32,
    /// `BPF_PROG_TEST_RUN` repeats per packet kind.
    #[arg(long, default_value_t = 1_000_000)]
    test_run_repeat: u32,
    /// Rounds of the per-kind `BPF_PROG_TEST_RUN` figures, alternating the agents; each kind's
    /// median is reported.
    #[arg(long, default_value_t = 5)]
    test_run_rounds: u32,
    /// Latency rounds per load; each runs agent off, agent off again (the A/A control) and on
    /// back to back (the order rotates), and the p99 added is the median of the per-round
    /// differences.
    #[arg(long, default_value_t = 12)]
    latency_rounds: u32,
    /// Seconds per latency round.
    #[arg(long, default_value_t = 3)]
    latency_seconds: u64,
    /// Loads of the latency rounds, percent of the agent-off capacity (wrk's mean); the last
    /// gives `p99_added_us`.
    #[arg(long, value_delimiter = ',', default_values_t = vec![10.0, 50.0])]
    latency_loads: Vec<f64>,
    /// Measure this agent binary instead of building the workspace's (to compare two builds
    /// under the same conditions).
    #[arg(long)]
    agent: Option<std::path::PathBuf>,
    /// Share of flows mirrored (to two sessions), percent.
    #[arg(long, default_value_t = 10.0)]
    mirror_percent: f64,
    /// Also measure this agent binary, alternated with the measured one inside every round, so
    /// a before/after comparison sees the same machine noise; its figures come on a
    /// `datapath(baseline):` line before the last.
    #[arg(long)]
    baseline_agent: Option<std::path::PathBuf>,
}

/// Report interval of the agent-CPU phase: a tenth of the default 10 s, so that a 10 s window
/// holds ten drains and reports rather than one or none (an upper bound on the default's cost).
const CPU_PHASE_INTERVAL_MS: u32 = 1000;

const PORT: u16 = 8080;

/// The CPUs the client and nginx are pinned to (see the module docs).
const CLIENT_CPU: usize = 0;
const SERVER_CPU: usize = 1;

struct Bed {
    client: Host,
    live: Host,
    sinks: Vec<KernelSink>,
    client_link: Link,
    shadow_addrs: Vec<std::net::Ipv4Addr>,
    _nginx: Process,
    dir: std::path::PathBuf,
}

fn setup_bed() -> anyhow::Result<Bed> {
    let client = Host::new("bench-client")?;
    let live = Host::new("bench-live")?;
    let client_link = Link::new(&client, &live)?;
    let mut sinks = Vec::new();
    let mut shadow_addrs = Vec::new();
    for i in 0..2 {
        let shadow = Host::new(&format!("bench-shadow{i}"))?;
        let link = Link::new(&live, &shadow)?;
        sinks.push(KernelSink::new(shadow, &link.b_iface)?);
        shadow_addrs.push(link.b_v4);
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
    let mut nginx = live.command("taskset");
    nginx
        .args(["-c", &SERVER_CPU.to_string(), "nginx", "-p"])
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
        sinks,
        client_link,
        shadow_addrs,
        _nginx: nginx,
        dir,
    })
}

/// A shadow host that drops the mirror copies as they arrive: a TCX program on its end of the
/// link drops every IPv4 packet (ARP and IPv6 neighbour discovery pass), and its receive count
/// is the copies that reached it. In production a shadow is another machine; here it shares the
/// live host's cores, and its receive work runs inside the live host's send (the copy's veth
/// transmit processes the receive in the same softirq), so a full IP and UDP receive was
/// charged to every copy. The drop keeps the send whole (clone, encapsulation, route, IP output,
/// the veth transmit) and leaves the shadow's side a few instructions.
struct KernelSink {
    host: Host,
    iface: String,
    _drop: std::os::fd::OwnedFd,
}

impl KernelSink {
    fn new(host: Host, iface: &str) -> anyhow::Result<Self> {
        let drop = {
            let _inside = host.enter()?;
            let ifindex = nix::net::if_::if_nametoindex(iface)
                .with_context(|| format!("no interface {iface} on the shadow host"))?;
            crate::bpf_sys::drop_ipv4_at_ingress(ifindex)
                .context("attaching the shadow sink's drop program")?
        };
        Ok(Self {
            host,
            iface: iface.to_owned(),
            _drop: drop,
        })
    }

    /// Packets received so far: the copies that reached this shadow (and the link's few own
    /// ARP and neighbour discovery packets).
    fn received(&self) -> anyhow::Result<u64> {
        let out = self
            .host
            .ip(&["-s", "-j", "link", "show", "dev", &self.iface])?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        links[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .context("no rx packet count in `ip -s -j link show`")
    }
}

fn start_agent(
    bed: &Bed,
    agent: &std::path::Path,
    mirror_percent: f64,
    interval_ms: u32,
) -> anyhow::Result<Process> {
    let config = format!(
        "interface = \"{iface}\"\nreport_interval_ms = {interval_ms}\ndefault_sample_percent = {mirror_percent}\n\
         [[services]]\naddr = \"{addr}\"\nport = {PORT}\n[[services]]\naddr = \"{addr6}\"\nport = {PORT}\n\
         [[mirror_sessions]]\nshadow = \"{s0}\"\nvni = 7\n[[mirror_sessions]]\nshadow = \"{s1}\"\nvni = 8\n",
        iface = bed.client_link.b_iface,
        addr = bed.client_link.b_v4,
        addr6 = bed.client_link.b_v6,
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

/// Stops an agent and waits for the kernel's cleanup after it. Its exit deletes the mirror
/// devices and frees its maps (65,536 preallocated flow entries and the per-CPU arrays), and the
/// kernel does that work in the background: measured without the wait, the paced client's p99
/// in the agent-off slot that followed an agent was 5-10 ms at half load (at most 0.2 ms in
/// every other slot), which made the A/A control span 16 ms.
fn stop_agent(mut process: Process) {
    process.stop(Duration::from_secs(5));
    thread::sleep(AGENT_CLEANUP);
}

/// How long [`stop_agent`] waits.
const AGENT_CLEANUP: Duration = Duration::from_secs(2);

/// wrk's requests/s for `seconds` with 50 keep-alive connections.
fn wrk(bed: &Bed, seconds: u64) -> anyhow::Result<f64> {
    let url = format!("http://{}:{PORT}/", bed.client_link.b_v4);
    let out = bed.client.run(
        "taskset",
        &[
            "-c",
            &CLIENT_CPU.to_string(),
            "wrk",
            "-t1",
            "-c50",
            &format!("-d{seconds}s"),
            &url,
        ],
    )?;
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
                    // The default 50 us timer slack would make every wake-up late by a random
                    // amount that has nothing to do with the agent and lands in the figure.
                    nix::sys::prctl::set_timerslack(1)?;
                    crate::bench::pin_thread(CLIENT_CPU)?;
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

/// `run_time_ns` and `run_cnt` of one program.
#[derive(Clone, Copy, Debug, Default)]
struct ProgStats {
    run_time_ns: u64,
    run_cnt: u64,
}

impl ProgStats {
    fn since(self, before: Self) -> Self {
        Self {
            run_time_ns: self.run_time_ns - before.run_time_ns,
            run_cnt: self.run_cnt - before.run_cnt,
        }
    }

    fn add(&mut self, other: Self) {
        self.run_time_ns += other.run_time_ns;
        self.run_cnt += other.run_cnt;
    }

    fn ns_per_run(self) -> f64 {
        self.run_time_ns as f64 / self.run_cnt.max(1) as f64
    }
}

/// The ids of the BPF programs `pid` holds descriptors of.
fn agent_prog_ids(pid: u32) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let info = std::fs::read_to_string(entry?.path()).unwrap_or_default();
        if let Some(id) = info.lines().find_map(|l| l.strip_prefix("prog_id:")) {
            ids.push(id.trim().parse::<u64>()?);
        }
    }
    Ok(ids)
}

/// The run-time statistics of program `id`.
fn prog_stats_by_id(id: u64) -> anyhow::Result<ProgStats> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "--json"])
        .output()?;
    let prog: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(ProgStats {
        run_time_ns: prog["run_time_ns"].as_u64().unwrap_or(0),
        run_cnt: prog["run_cnt"].as_u64().unwrap_or(0),
    })
}

/// Ingress and egress stats of the TC programs `pid` holds. Only that agent's programs count:
/// other doppel agents on this machine (tests, other benches) run programs of the same name.
fn prog_stats(pid: u32) -> anyhow::Result<[ProgStats; 2]> {
    let ids = agent_prog_ids(pid)?;
    let out = Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()?;
    let progs: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let mut stats = [ProgStats::default(); 2];
    for p in progs.as_array().into_iter().flatten() {
        if !p["id"].as_u64().is_some_and(|id| ids.contains(&id)) {
            continue;
        }
        let slot = match p["name"].as_str().unwrap_or_default() {
            "doppel_tc_ingress" => 0,
            "doppel_tc_egress" => 1,
            _ => continue,
        };
        stats[slot].run_time_ns += p["run_time_ns"].as_u64().unwrap_or(0);
        stats[slot].run_cnt += p["run_cnt"].as_u64().unwrap_or(0);
    }
    anyhow::ensure!(
        ids.len() >= 2,
        "agent {pid} holds no TC programs (is bpftool installed and the agent attached?)"
    );
    Ok(stats)
}

/// The per-round p99 differences as the summary prints them: the median with its
/// distribution-free 95 % interval, then the mean with its t interval.
fn describe_added(values: &[f64]) -> String {
    let (median, low, high) = median_ci95(values);
    let (mean, ci) = mean_ci95(values);
    format!(
        "median {median:.1} us [{low:.1}, {high:.1}] (95 %, {} rounds); mean {mean:.1} +/- {ci:.1}",
        values.len()
    )
}

/// The median and a distribution-free 95 % confidence interval for it: the order statistics
/// `k` and `n + 1 - k` (1-based) for the largest `k` with P(Bin(n, 1/2) < k) <= 2.5 %. With
/// fewer than 6 values no such `k` exists and the interval is the whole range (its coverage is
/// then below 95 %).
fn median_ci95(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    // P(X <= j) for X ~ Bin(n, 1/2), accumulated term by term.
    let mut k = 1;
    let mut term = 0.5_f64.powi(n as i32);
    let mut below = term; // P(X <= 0)
    for j in 1..n {
        if below > 0.025 {
            break;
        }
        // P(X <= j - 1) <= 2.5 %: the j-th order statistic is still a lower bound.
        k = j;
        term *= (n - j + 1) as f64 / j as f64;
        below += term;
    }
    (median, sorted[k - 1], sorted[n - k])
}

/// Steal time of the whole machine so far, in ticks (1/100 s): what the hypervisor gave other
/// guests while this one had work.
fn steal_ticks() -> u64 {
    use procfs::CurrentSI as _;
    procfs::KernelStats::current()
        .ok()
        .and_then(|stats| stats.total.steal)
        .unwrap_or(0)
}

/// Mean and the half-width of its 95 % confidence interval (Student's t); infinite with fewer
/// than two values.
fn mean_ci95(values: &[f64]) -> (f64, f64) {
    use statrs::distribution::{ContinuousCDF as _, StudentsT};
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, f64::INFINITY);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .expect("n >= 2: positive degrees of freedom")
        .inverse_cdf(0.975);
    (mean, t * (var / n as f64).sqrt())
}

/// Throughput with some setting over agent off, paired within each round (the settings of one
/// round run back to back, so a slow stretch of the host moves both): the per-round ratios,
/// then their mean with its 95 % t interval, which says whether a goal is met or only not
/// excluded.
fn paired_ratios(on: &[f64], off: &[f64]) -> (Vec<f64>, f64, f64) {
    let ratios: Vec<f64> = on.iter().zip(off).map(|(on, off)| on / off).collect();
    let (mean, ci) = mean_ci95(&ratios);
    (ratios, mean, ci)
}

/// The throughput ratio a closed loop can keep when the agent adds `agent_ns` a request to CPUs
/// busy `busy` of the time at `rate` requests/s without it (see `Figures::print_cpu_budget`).
fn predicted_ratio(busy: [f64; 2], agent_ns: [f64; 2], rate: f64) -> f64 {
    [0, 1]
        .map(|cpu| 1.0 / (busy[cpu] + agent_ns[cpu] * 1e-9 * rate))
        .into_iter()
        .fold(1.0, f64::min)
}

/// A [`paired_ratios`] result as the summary prints it.
fn describe_ratios((ratios, mean, ci): &(Vec<f64>, f64, f64)) -> String {
    let per_round: Vec<String> = ratios.iter().map(|r| format!("{r:.3}")).collect();
    format!(
        "{mean:.3} [{:.3}, {:.3}] (95 %, {} rounds: {})",
        mean - ci,
        mean + ci,
        ratios.len(),
        per_round.join(" ")
    )
}

/// `/proc/stat`'s ticks of the bench's two CPUs: (busy, total) each. Busy is user, nice,
/// system, irq and softirq; the total adds idle, iowait and steal, so time the hypervisor gave
/// other guests does not count as this bench's work. `None` when a CPU's line is missing.
fn cpu_ticks() -> Option<[(u64, u64); 2]> {
    use procfs::CurrentSI as _;
    let stats = procfs::KernelStats::current().ok()?;
    let ticks = |cpu: usize| {
        let t = stats.cpu_time.get(cpu)?;
        let busy = t.user + t.nice + t.system + t.irq? + t.softirq?;
        Some((busy, busy + t.idle + t.iowait? + t.steal?))
    };
    Some([ticks(CLIENT_CPU)?, ticks(SERVER_CPU)?])
}

/// Each CPU's busy share between two [`cpu_ticks`] readings (`None` if either failed).
fn busy_share(before: Option<[(u64, u64); 2]>, after: Option<[(u64, u64); 2]>) -> Option<[f64; 2]> {
    let (before, after) = (before?, after?);
    // iowait may go backwards (proc(5)), so the deltas saturate.
    let delta = |i: usize| {
        let busy = after[i].0.saturating_sub(before[i].0);
        let total = after[i].1.saturating_sub(before[i].1);
        (total > 0).then(|| busy as f64 / total as f64)
    };
    Some([delta(0)?, delta(1)?])
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
    let agent = match &options.agent {
        Some(agent) => agent.clone(),
        None => {
            let mut build = Command::new("cargo");
            build
                .args(["build", "--release", "--package", "doppel-agent"])
                .current_dir(crate::workspace_root());
            toolchain.apply(&mut build);
            crate::run_command(&mut build)?;
            // Where that build put it: CARGO_TARGET_DIR when set (a stale `target/` would be measured
            // otherwise, or none found).
            let target_dir: std::path::PathBuf = std::env::var_os("CARGO_TARGET_DIR")
                .map_or_else(|| crate::workspace_root().join("target"), Into::into);
            target_dir.join("release/doppel-agent")
        }
    };
    let bed = setup_bed()?;
    let seconds = options.seconds;
    // The measured agent last: its figures make the last line.
    let mut agents: Vec<Figures> = Vec::new();
    if let Some(baseline) = &options.baseline_agent {
        agents.push(Figures::new("baseline", baseline.clone()));
    }
    agents.push(Figures::new("measured", agent));
    println!(
        "bench datapath: nginx (1 worker) <- wrk -t1 -c50, {seconds}s rounds, agent off/on alternated{}",
        if agents.len() > 1 {
            ", baseline and measured agents alternated"
        } else {
            ""
        }
    );

    let _ = wrk(&bed, 1)?; // warm-up
    let copies =
        |bed: &Bed| -> anyhow::Result<u64> { bed.sinks.iter().map(KernelSink::received).sum() };
    let mut off = Vec::new();
    // The agent-off control: a second agent-off run in every round, whose difference from the
    // first is what the machine's noise alone does to the figures (an A/A test).
    let mut off_control = Vec::new();
    // Per agent-off round, each CPU's busy share (`None` when /proc/stat could not say): what a
    // request costs each CPU, which the agent's own cost is set against (`print_cpu_budget`).
    let mut off_busy: Vec<Option<[f64; 2]>> = Vec::new();
    // Settings: 0 = agent off, 1 = agent off again (control), then (agent, mirrored?) pairs.
    let settings = 2 + 2 * agents.len();
    for round in 0..options.rounds {
        // The order rotates so that no setting always runs first (or after the warmest cache).
        for setting in (0..settings).map(|i| (i + round as usize) % settings) {
            if setting < 2 {
                let before = cpu_ticks();
                let rps = wrk(&bed, seconds)?;
                if setting == 0 {
                    off_busy.push(busy_share(before, cpu_ticks()));
                    off.push(rps)
                } else {
                    off_control.push(rps)
                }
                continue;
            }
            let figures = &mut agents[(setting - 2) / 2];
            let mirrored = setting % 2 == 0;
            let percent = if mirrored {
                options.mirror_percent
            } else {
                0.0
            };
            let process = start_agent(&bed, &figures.path, percent, 10_000)?;
            let rps = wrk(&bed, seconds)?;
            stop_agent(process);
            if mirrored {
                figures.on.push(rps);
            } else {
                figures.on_unmirrored.push(rps);
            }
        }
        let mut line = format!(
            "  round {round}: off {:.0} req/s, off again {:.0} req/s",
            off[off.len() - 1],
            off_control[off_control.len() - 1]
        );
        for f in &agents {
            line += &format!(
                "; {}: on {:.0} req/s, on with nothing mirrored {:.0} req/s",
                f.label,
                f.on[f.on.len() - 1],
                f.on_unmirrored[f.on_unmirrored.len() - 1]
            );
        }
        println!("{line}");
    }

    warn_if_stats_on("throughput");
    // Cost rounds: the only ones with run-time statistics on (see the module docs).
    for round in 0..options.cost_rounds {
        let settings = 2 * agents.len();
        for setting in (0..settings).map(|i| (i + round as usize) % settings) {
            let figures = &mut agents[setting / 2];
            let mirrored = setting % 2 == 0;
            let percent = if mirrored {
                options.mirror_percent
            } else {
                0.0
            };
            let process = start_agent(&bed, &figures.path, percent, 10_000)?;
            let stats_on = crate::bpf_sys::enable_stats().context("BPF_ENABLE_STATS")?;
            let (before, copies_before) = (prog_stats(process.pid())?, copies(&bed)?);
            let rps = wrk(&bed, seconds)?;
            let after = prog_stats(process.pid())?;
            drop(stats_on);
            stop_agent(process);
            let requests = rps * seconds as f64;
            let totals = if mirrored {
                figures.mirrored_requests += requests;
                figures.mirrored_copies += copies(&bed)? - copies_before;
                &mut figures.mirrored_stats
            } else {
                figures.inspect_requests += requests;
                &mut figures.inspect_stats
            };
            for (total, (a, b)) in totals.iter_mut().zip(after.iter().zip(&before)) {
                total.add(a.since(*b));
            }
        }
    }

    // Per packet kind, by BPF_PROG_TEST_RUN on each agent's own loaded programs and maps, in
    // rounds that alternate the agents, each kind's median over the rounds: one pass per agent
    // compared a quiet minute with a busy one (a path both builds share once measured 95 ns in
    // one and 156 in the other).
    let service = kinds::Service {
        v4: bed.client_link.b_v4,
        v6: bed.client_link.b_v6,
        port: PORT,
    };
    let mut rounds: Vec<Vec<kinds::Costs>> = vec![Vec::new(); agents.len()];
    for round in 0..options.test_run_rounds.max(1) {
        for i in (0..agents.len()).map(|i| (i + round as usize) % agents.len()) {
            let process = start_agent(&bed, &agents[i].path, options.mirror_percent, 10_000)?;
            let costs = {
                let _inside = bed.live.enter()?;
                kinds::measure(process.pid(), service, options.test_run_repeat, 200)?
            };
            stop_agent(process);
            rounds[i].push(costs);
        }
    }
    for (f, rounds) in agents.iter_mut().zip(&rounds) {
        let costs = kinds::Costs::median(rounds);
        let listed: Vec<String> = kinds::KINDS
            .iter()
            .zip(costs.ns)
            .map(|(kind, ns)| format!("{kind} {ns:.0}"))
            .collect();
        println!(
            "  {} test_run ns per packet (median of {} rounds of {} runs each; first_payload and response_closing from 200 single runs less {:.0} ns of per-call overhead): {}; run-time statistics add {:.0} ns a run, {:.0} of it inside their own window (the cost rounds' figures carry that part; ns_per_packet is given without it)",
            f.label,
            rounds.len(),
            options.test_run_repeat,
            costs.repeat1_overhead,
            listed.join(", "),
            costs.stats_overhead,
            costs.stats_in_window
        );
        f.kinds = Some(costs);
    }

    let capacity = mean(&off);
    let mut latency_off = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 10_000_000_000, 3)?;
    // Per load, per round: p99 of the agent-off control minus p99 off (the A/A difference), us.
    let mut control_added = Vec::new();
    let loads = &options.latency_loads;
    anyhow::ensure!(!loads.is_empty(), "--latency-loads names no load");
    for (load_index, &load) in loads.iter().enumerate() {
        let rate = capacity * load / 100.0;
        let last_load = load_index + 1 == loads.len();
        control_added.push(Vec::new());
        for f in &mut agents {
            f.added.push(Vec::new());
        }
        for round in 0..options.latency_rounds {
            // Slot 0 is agent off, slot 1 agent off again (control); the order rotates.
            let slots = 2 + agents.len();
            let mut p99 = vec![0.0; slots];
            let mut steal = vec![0.0; slots];
            for slot in (0..slots).map(|i| (i + round as usize) % slots) {
                let process = match slot {
                    0 | 1 => None,
                    _ => Some(start_agent(
                        &bed,
                        &agents[slot - 2].path,
                        options.mirror_percent,
                        10_000,
                    )?),
                };
                let steal_before = steal_ticks();
                let started = Instant::now();
                let h = paced(&bed, rate, 8, options.latency_seconds)?;
                steal[slot] =
                    (steal_ticks() - steal_before) as f64 / 100.0 / started.elapsed().as_secs_f64()
                        * 100.0;
                p99[slot] = h.value_at_quantile(0.99) as f64 / 1e3;
                if last_load {
                    match slot {
                        0 => latency_off.add(h)?,
                        1 => {}
                        _ => agents[slot - 2].latency_on.add(h)?,
                    }
                }
                if let Some(process) = process {
                    stop_agent(process);
                }
            }
            control_added[load_index].push(p99[1] - p99[0]);
            let mut line = format!(
                "  {load} % load ({rate:.0} req/s), round {round}: p99 off {:.1} us, off again {:.1} us",
                p99[0], p99[1]
            );
            for (f, on) in agents.iter_mut().zip(&p99[2..]) {
                f.added[load_index].push(on - p99[0]);
                line += &format!(", {} on {on:.1} us", f.label);
            }
            let steal: Vec<String> = steal.iter().map(|s| format!("{s:.1}")).collect();
            line += &format!("; steal % of one CPU per slot {}", steal.join("/"));
            println!("{line}");
        }
    }

    warn_if_stats_on("latency");

    let rate = 10_000.0_f64.min(mean(&off) * 0.8);
    for f in &mut agents {
        let process = start_agent(&bed, &f.path, options.mirror_percent, CPU_PHASE_INTERVAL_MS)?;
        let ticks_before = process_cpu_ticks(process.pid());
        let started = Instant::now();
        let load = paced(&bed, rate, 8, seconds * 2)?;
        let cpu_seconds = (process_cpu_ticks(process.pid()) - ticks_before) as f64 / 100.0;
        let elapsed = started.elapsed().as_secs_f64();
        f.agent_cpu_pct = 100.0 * cpu_seconds / elapsed;
        drop(process);
        println!(
            "  {} agent CPU at {rate:.0} exchanges/s ({} ms report interval): {cpu_seconds:.2} CPU-s over {elapsed:.1} s ({} exchanges)",
            f.label,
            CPU_PHASE_INTERVAL_MS,
            load.len()
        );
    }
    println!(
        "  pooled p99 off {:.1} us",
        latency_off.value_at_quantile(0.99) as f64 / 1e3
    );
    // The control's figures, computed exactly as the agent's: how far the machine's noise alone
    // moves them. An agent figure inside this band is not distinguishable from no agent here.
    println!(
        "  agent-off control (A/A): throughput ratio {}",
        describe_ratios(&paired_ratios(&off_control, &off))
    );
    for (load, control) in loads.iter().zip(&control_added) {
        println!(
            "  agent-off control (A/A) at {load} % load: p99 added {}",
            describe_added(control)
        );
    }
    let lines = agents
        .iter()
        .map(|f| f.report(&off, &off_busy, options.mirror_percent, loads))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mirrored = bed
        .sinks
        .iter()
        .map(KernelSink::received)
        .collect::<anyhow::Result<Vec<u64>>>()?;
    println!("  mirror copies received by the two shadows: {mirrored:?}");
    let _ = std::fs::remove_dir_all(&bed.dir);
    for (f, line) in agents.iter().zip(lines) {
        let tag = if f.label == "baseline" {
            "datapath(baseline)"
        } else {
            "datapath"
        };
        println!("{tag}: {line}");
    }
    Ok(())
}

/// Another process on this machine (a second bench, or the sysctl left at 1) may hold run-time
/// statistics on outside our cost rounds, and then the rounds just run paid their clock reads:
/// said, not hidden. (Checked when the rounds end; a holder that came and went is not seen.)
fn warn_if_stats_on(rounds: &str) {
    if std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").is_ok_and(|v| v.trim() != "0")
    {
        println!(
            "  warning: bpf_stats_enabled is on outside the cost rounds (another holder): the {rounds} rounds paid its two clock reads a program run"
        );
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// What one agent binary measured over the run.
struct Figures {
    label: &'static str,
    path: std::path::PathBuf,
    /// wrk requests/s with `mirror_percent` mirrored, and with nothing mirrored.
    on: Vec<f64>,
    on_unmirrored: Vec<f64>,
    /// [ingress, egress] program stats in those two settings.
    mirrored_stats: [ProgStats; 2],
    inspect_stats: [ProgStats; 2],
    /// wrk's requests in those two settings' rounds.
    mirrored_requests: f64,
    inspect_requests: f64,
    /// Copies the shadows received in the mirrored rounds.
    mirrored_copies: u64,
    /// Per latency load, per round: p99 on minus p99 off, us.
    added: Vec<Vec<f64>>,
    latency_on: hdrhistogram::Histogram<u64>,
    agent_cpu_pct: f64,
    /// Per packet kind, by `BPF_PROG_TEST_RUN`.
    kinds: Option<kinds::Costs>,
}

impl Figures {
    fn new(label: &'static str, path: std::path::PathBuf) -> Self {
        Self {
            label,
            path,
            on: Vec::new(),
            on_unmirrored: Vec::new(),
            mirrored_stats: [ProgStats::default(); 2],
            inspect_stats: [ProgStats::default(); 2],
            mirrored_requests: 0.0,
            inspect_requests: 0.0,
            mirrored_copies: 0,
            added: Vec::new(),
            latency_on: hdrhistogram::Histogram::new_with_bounds(1, 10_000_000_000, 3)
                .expect("valid bounds"),
            agent_cpu_pct: 0.0,
            kinds: None,
        }
    }

    /// What the agent costs each CPU per request, against what a request costs that CPU with the
    /// agent off. Nearly all of the client's packets (ingress, and the copies made there) are
    /// processed on the client's CPU and of the server's (egress) on the server's: run-time
    /// statistics are per program, not per CPU, so the few the other CPU sends (pure ACKs from
    /// a softirq) are counted on the side of their program. CPU `i`, busy `b_i` of the time at
    /// wrk's agent-off rate `R`, spends `b_i / R` a request; with the agent's `a_i` more it
    /// could serve at most `1 / (b_i / R + a_i)`, so the programs' time alone predicts a
    /// throughput ratio of `min(1, min_i 1 / (b_i + a_i R))`: `1 / (1 + a_i / w_i)` for a
    /// saturated CPU, and the slack of one that is not absorbs part of its share. What it leaves
    /// out (the hook itself, the copies' later frees, misses the programs cause the server)
    /// makes it an upper bound.
    fn print_cpu_budget(&self, off: &[f64], off_busy: &[Option<[f64; 2]>], costs: &kinds::Costs) {
        let Some(busy) = off_busy.iter().copied().collect::<Option<Vec<[f64; 2]>>>() else {
            println!(
                "  {}: no CPU budget: /proc/stat gave no per-CPU ticks",
                self.label
            );
            return;
        };
        let mean_busy = [0, 1].map(|cpu| mean(&busy.iter().map(|b| b[cpu]).collect::<Vec<_>>()));
        // CPU ns per request with the agent off, per CPU: busy share x 1 s / requests per s,
        // from the same means the prediction uses.
        let per_request = mean_busy.map(|b| b * 1e9 / mean(off));
        let setting = |stats: &[ProgStats; 2], requests: f64| {
            // The statistics' own clock reads inside their window are not the data path's.
            stats.map(|s| {
                (s.run_time_ns as f64 - costs.stats_in_window * s.run_cnt as f64)
                    / requests.max(1.0)
            })
        };
        let inspect = setting(&self.inspect_stats, self.inspect_requests);
        let mirrored = setting(&self.mirrored_stats, self.mirrored_requests);
        let predicted = |agent_ns: [f64; 2]| predicted_ratio(mean_busy, agent_ns, mean(off));
        println!(
            "  {}: agent ns per request, client CPU (ingress, copies) / server CPU (egress), against {:.0} / {:.0} ns a request costs them with the agent off (busy {:.0} % / {:.0} %): \
             nothing mirrored {:.0} / {:.0}, {:.0} / {:.0} with flows mirrored; the programs' time alone predicts throughput ratios of at most {:.3} and {:.3}",
            self.label,
            per_request[0],
            per_request[1],
            mean_busy[0] * 100.0,
            mean_busy[1] * 100.0,
            inspect[0],
            inspect[1],
            mirrored[0],
            mirrored[1],
            predicted(inspect),
            predicted(mirrored),
        );
    }

    /// Prints the detail lines and returns the summary figures.
    fn report(
        &self,
        off: &[f64],
        off_busy: &[Option<[f64; 2]>],
        mirror_percent: f64,
        loads: &[f64],
    ) -> anyhow::Result<String> {
        let mirrored = paired_ratios(&self.on, off);
        let throughput_ratio = mirrored.1;
        let mut mirrored_total = self.mirrored_stats[0];
        mirrored_total.add(self.mirrored_stats[1]);
        let mut inspect_total = self.inspect_stats[0];
        inspect_total.add(self.inspect_stats[1]);
        anyhow::ensure!(
            mirrored_total.run_cnt > 0 && inspect_total.run_cnt > 0,
            "the TC programs never ran: is /proc/sys/kernel/bpf_stats_enabled honoured?"
        );
        let costs = self.kinds.context("no test_run figures")?;
        let mirrored_ns = mirrored_total.ns_per_run();
        // The meter off: what the statistics add inside their own window, measured on this
        // agent's programs by test_run, is not the data path's.
        let ns_per_packet = inspect_total.ns_per_run() - costs.stats_in_window;
        // What mirroring added over inspection alone, per copy the shadows received.
        let copies = self.mirrored_copies;
        let copy_ns = (mirrored_total.run_time_ns as f64
            - inspect_total.ns_per_run() * mirrored_total.run_cnt as f64)
            / copies.max(1) as f64;
        // Sampling is per flow and wrk opens 50, so the share of client packets actually
        // mirrored wanders around the nominal rate from round to round; it is printed so the
        // copy cost in ns_per_packet can be read against it.
        let mirrored_share =
            copies as f64 / 2.0 / self.mirrored_stats[0].run_cnt.max(1) as f64 * 100.0;
        let label = self.label;
        for (load, added) in loads.iter().zip(&self.added) {
            println!(
                "  {label} at {load} % load: p99 added {}",
                describe_added(added)
            );
        }
        let last = self.added.last().map_or(&[][..], Vec::as_slice);
        let (p99_added_us, _, _) = median_ci95(last);
        println!(
            "  {label}: pooled p99 on {:.1} us at {} % load",
            self.latency_on.value_at_quantile(0.99) as f64 / 1e3,
            loads.last().copied().unwrap_or_default()
        );
        println!(
            "  {label}: throughput over agent off, {mirror_percent} % of flows mirrored: {}",
            describe_ratios(&mirrored)
        );
        println!(
            "  {label}: throughput over agent off, nothing mirrored: {}",
            describe_ratios(&paired_ratios(&self.on_unmirrored, off))
        );
        println!(
            "  {label}: TC ns per packet: inspection alone (nothing mirrored) {:.0} (ingress {:.0}, egress {:.0}; {} runs); \
             {mirror_percent}% of flows mirrored ({mirrored_share:.1} % of client packets) {mirrored_ns:.0} (ingress {:.0}, egress {:.0}; {} runs), \
             of which copies {copy_ns:.0} ns each x {copies} copies (cost rounds, run-time statistics on)",
            inspect_total.ns_per_run(),
            self.inspect_stats[0].ns_per_run(),
            self.inspect_stats[1].ns_per_run(),
            inspect_total.run_cnt,
            self.mirrored_stats[0].ns_per_run(),
            self.mirrored_stats[1].ns_per_run(),
            mirrored_total.run_cnt,
        );
        println!(
            "  {label}: TC ns per packet under load, inspection alone, less the run-time statistics' own {:.0} ns: {ns_per_packet:.0}",
            costs.stats_in_window
        );
        self.print_cpu_budget(off, off_busy, &costs);
        let test_run_ns = costs.ns[kinds::ESTABLISHED];
        // Two sessions: each sampled packet is copied twice.
        let copy_test_run_ns =
            (costs.ns[kinds::ESTABLISHED_SAMPLED] - costs.ns[kinds::ESTABLISHED]) / 2.0;
        Ok(format!(
            "throughput_ratio={throughput_ratio:.3} p99_added_us={p99_added_us:.1} ns_per_packet={ns_per_packet:.0} agent_cpu_pct={:.2} test_run_ns={test_run_ns:.0} copy_ns={copy_test_run_ns:.0}",
            self.agent_cpu_pct
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{mean_ci95, median_ci95, paired_ratios, predicted_ratio};

    #[test]
    fn the_budget_charges_the_agent_to_the_cpu_with_the_least_slack() {
        // 250k requests/s, 4 us of each saturated CPU a request: 160 ns more on one of them
        // leaves 4 / 4.16 of the rate.
        let saturated = predicted_ratio([1.0, 1.0], [100.0, 160.0], 250_000.0);
        assert!((saturated - 4.0 / 4.16).abs() < 1e-9, "{saturated}");
        // The same 160 ns on a CPU 80 % busy fits in its idle time.
        assert_eq!(predicted_ratio([1.0, 0.8], [0.0, 160.0], 250_000.0), 1.0);
        // Past its slack it binds: 0.8 of its time plus 0.25 for the agent, 1 / 1.05.
        let past = predicted_ratio([1.0, 0.8], [0.0, 1_000.0], 250_000.0);
        assert!((past - 1.0 / 1.05).abs() < 1e-9, "{past}");
    }

    #[test]
    fn the_throughput_interval_is_students_t_over_the_paired_rounds() {
        // Sample sd of 1..=8 is sqrt(6); t(7) at 0.975 is 2.3646.
        let (mean, half) = mean_ci95(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        assert_eq!(mean, 4.5);
        assert!(
            (half - 2.3646 * (6.0_f64 / 8.0).sqrt()).abs() < 1e-3,
            "{half}"
        );
        // Paired within the round: a host that slows both settings of a round by the same
        // factor leaves the ratio, and so the interval, untouched.
        let (ratios, mean, half) = paired_ratios(&[95.0, 190.0, 47.5], &[100.0, 200.0, 50.0]);
        assert_eq!(ratios, vec![0.95, 0.95, 0.95]);
        assert!((mean - 0.95).abs() < 1e-12 && half < 1e-12, "{mean} {half}");
        assert!(mean_ci95(&[0.97]).1.is_infinite());
    }

    #[test]
    fn the_median_interval_takes_the_binomial_order_statistics() {
        let values: Vec<f64> = (1..=12).map(f64::from).collect();
        // Bin(12, 1/2): P(X <= 2) = 1.9 %, P(X <= 3) = 7.3 %: the 3rd and 10th values.
        assert_eq!(median_ci95(&values), (6.5, 3.0, 10.0));
        // Bin(10, 1/2): P(X <= 1) = 1.1 %, P(X <= 2) = 5.5 %: the 2nd and 9th.
        assert_eq!(median_ci95(&values[..10]), (5.5, 2.0, 9.0));
        // Five values: no order statistic reaches 95 %, so the whole range.
        assert_eq!(median_ci95(&[5.0, 1.0, 3.0, 2.0, 4.0]), (3.0, 1.0, 5.0));
        // One stalled round moves the mean by milliseconds and the median not at all.
        let mut stalled = values;
        stalled[11] = 30_000.0;
        assert_eq!(median_ci95(&stalled), (6.5, 3.0, 10.0));
    }
}
