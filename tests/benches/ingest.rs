//! `cargo xtask bench ingest`: how many reporting agents one coordinator holds, and how fast the
//! comparison engine merges histograms.
//!
//! The coordinator is the real `doppel serve` binary, in a child process so its CPU time can be
//! read from `/proc/PID/stat` apart from the simulated agents'. It uses a CA made by the
//! coordinator's own `ca` code, a real SQLite store in a temporary state directory on disk, and
//! listens on 127.0.0.1 only. Each simulated agent is the agent's own reporting client
//! (`ReportClient`: its own QUIC endpoint, mutual TLS with its own certificate, the on-disk spool,
//! acknowledgements) submitting one report a second with one kernel-latency histogram per class
//! (16 by default), drawn from log-normal latencies quantised to the kernel's buckets, as the
//! live agent reports them. The agents' spools are on tmpfs when `/dev/shm` exists: on real hosts
//! every agent fsyncs its own disk, and here a thousand of them would otherwise queue on the
//! coordinator's.
//!
//! Figures:
//! - `reports_per_s`: reports acknowledged per second over the measured window;
//! - `p99_durable_ms`: 99th percentile of report-to-durable latency, from `submit` (spooled) to
//!   the coordinator's `Ack`, which it sends only after the report's transaction committed;
//!   reports not acknowledged within the drain time count at the drain time;
//! - `coordinator_cpu_pct`: the coordinator process's CPU time over the window, 100 = one core;
//! - `merges_per_s`: histogram merges per CPU-second (one thread, so per core) of the
//!   comparison engine (`compare::compare`) on histograms read back from the store.
//!
//! The machine is shared: the agents, the coordinator and anything else running compete for the
//! same cores, so the latency is an upper bound for a coordinator on its own host.

use std::{
    io::Read as _,
    net::{SocketAddr, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use doppel_agent::report::{ClientConfig, ReportClient, ReportHandle, Spool, SpoolConfig};
use doppel_common::{
    maps::{latency_bucket, latency_bucket_value},
    wire::{
        Counter, EncodedHistogram, FlowScope, HistogramRecord, IntervalReport, LatencyMetric,
        ResourceUsage,
    },
};
use doppel_coordinator::{
    api::ADDR_FILE,
    ca::CertificateAuthority,
    compare::{CompareConfig, Measurement, Role, compare},
    store::Store,
};
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(about = "Agents reporting to one coordinator over QUIC; comparison merge rate")]
struct Options {
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds measured, once every agent is connected and a warm-up has passed.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Warm-up seconds before measuring (reports flowing, not counted).
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    /// Class histograms per report.
    #[arg(long, default_value_t = 16)]
    classes: u16,
    /// CPU seconds spent measuring the comparison's merges.
    #[arg(long, default_value_t = 3.0)]
    merge_seconds: f64,
    /// The `doppel` binary (default: `doppel` next to this bench's profile directory).
    #[arg(long)]
    doppel: Option<PathBuf>,
    /// Passed by `cargo bench` to every bench target; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// How long reports of the window may take to be acknowledged after it.
const DRAIN: Duration = Duration::from_secs(10);
/// Distinct histograms per class the agents draw from (generating 16 fresh histograms per agent
/// per second would make the load generator the bottleneck).
const VARIANTS: usize = 32;

fn main() -> anyhow::Result<()> {
    let options = Options::parse();
    ensure!(options.agents > 0, "--agents must be positive");
    ensure!(options.seconds > 0, "--seconds must be positive");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let ingest = runtime.block_on(run_ingest(&options))?;
    drop(runtime);
    let merges = merge_rate(&ingest.state_dir, options.classes, options.merge_seconds)?;
    println!(
        "merge: {} merges in {:.2} CPU s over {} measurements of {} intervals; \
         decode {:.0} histograms/s",
        merges.merges, merges.cpu_s, merges.measurements, merges.intervals, merges.decodes_per_s
    );
    println!(
        "ingest: agents={} reports_per_s={:.0} p99_durable_ms={:.1} coordinator_cpu_pct={:.1} \
         merges_per_s={:.0}",
        ingest.agents_held,
        ingest.reports_per_s,
        ingest.p99_ms,
        ingest.coordinator_cpu_pct,
        merges.merges as f64 / merges.cpu_s
    );
    Ok(())
}

/// A xorshift64* stream: deterministic per agent, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in (0, 1).
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (std::f64::consts::TAU * self.unit()).cos()
    }
}

/// One second of one class as the live agent reports it: log-normal latencies around a
/// class-specific median, recorded at the kernel buckets' values into the agent's histogram
/// shape (1 ns .. 120 s, 2 significant digits).
fn class_histogram(rng: &mut Rng, class: u16) -> anyhow::Result<EncodedHistogram> {
    let mut h = Histogram::<u64>::new_with_bounds(1, 120_000_000_000, 2)?;
    let median_ns = 300_000.0 * f64::from(1 + class % 8);
    let sigma = 0.4 + 0.1 * f64::from(class % 5);
    let exchanges = 200 + rng.next_u64() % 1800;
    for _ in 0..exchanges {
        let ns = (median_ns * (sigma * rng.normal()).exp()) as u64;
        h.saturating_record(latency_bucket_value(latency_bucket(ns)));
    }
    Ok(EncodedHistogram::encode(&h)?)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn report(pool: &[Vec<EncodedHistogram>], rng: &mut Rng) -> IntervalReport {
    let histograms = pool
        .iter()
        .enumerate()
        .map(|(class, variants)| HistogramRecord {
            service: "10.0.0.2:8080".into(),
            class: u16::try_from(class).unwrap_or(u16::MAX),
            scope: FlowScope::All,
            metric: LatencyMetric::KernelFirstByte,
            histogram: variants[rng.next_u64() as usize % variants.len()].clone(),
        })
        .collect();
    let counters = ["packets", "bytes", "exchanges", "exchange_errors"]
        .iter()
        .map(|name| Counter {
            name: (*name).into(),
            value: rng.next_u64() % 100_000,
        })
        .collect();
    IntervalReport {
        seq: 0, // the spool numbers it
        interval_start_unix_ms: unix_ms().saturating_sub(1000),
        interval_ms: 1000,
        histograms,
        counters,
        host: ResourceUsage {
            cpu_time_us: rng.next_u64() % 2_000_000,
            cpu_capacity_millis: 2000,
            memory_used_bytes: 3 << 30,
            memory_limit_bytes: 8 << 30,
            net_rx_bytes: rng.next_u64() % 10_000_000,
            net_tx_bytes: rng.next_u64() % 10_000_000,
            disk_read_bytes: 0,
            disk_write_bytes: rng.next_u64() % 1_000_000,
        },
        workload: None,
        patterns: vec![],
    }
}

/// utime + stime of a process or thread, from its `stat` file, in seconds.
fn cpu_seconds(stat_path: &Path) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(stat_path)
        .with_context(|| format!("read {}", stat_path.display()))?;
    // The command name (field 2) may contain spaces; fields after its closing parenthesis are
    // positional: state is field 3, utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("stat format")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .context("stat too short")?
            .parse::<u64>()
            .context("stat field")
    };
    // In clock ticks of USER_HZ, which the kernel fixes at 100 for user space on Linux.
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// CPU time of the calling thread, from the scheduler's own accounting (ns resolution).
fn thread_cpu_seconds() -> anyhow::Result<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").context("schedstat")?;
    let ns: u64 = s
        .split_whitespace()
        .next()
        .context("schedstat format")?
        .parse()
        .context("schedstat field")?;
    Ok(ns as f64 / 1e9)
}

/// The coordinator child: stopped with SIGTERM (its graceful shutdown) when dropped.
struct CoordinatorProcess {
    child: Child,
    log: PathBuf,
}

impl CoordinatorProcess {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn stat_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/stat", self.child.id()))
    }

    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn doppel_binary(options: &Options) -> anyhow::Result<PathBuf> {
    let path = match &options.doppel {
        Some(p) => p.clone(),
        None => {
            // target/<profile>/deps/ingest-<hash> -> target/<profile>/doppel
            let exe = std::env::current_exe()?;
            exe.parent()
                .and_then(Path::parent)
                .context("target/<profile>")?
                .join("doppel")
        }
    };
    ensure!(
        path.exists(),
        "{} not built; `cargo xtask bench ingest` builds it (or `cargo build --release -p \
         doppel-coordinator`)",
        path.display()
    );
    Ok(path)
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    // Loopback only; the port is released just before the coordinator binds it.
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn start_coordinator(
    options: &Options,
    state_dir: &Path,
) -> anyhow::Result<(CoordinatorProcess, SocketAddr)> {
    let quic = free_udp_port()?;
    let config = state_dir.join("serve.toml");
    std::fs::write(
        &config,
        format!("quic_listen = \"{quic}\"\napi_listen = \"127.0.0.1:0\"\n"),
    )?;
    let log = state_dir.join("coordinator.log");
    let child = Command::new(doppel_binary(options)?)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env("DOPPEL_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start doppel serve")?;
    let mut process = CoordinatorProcess { child, log };
    let deadline = Instant::now() + Duration::from_secs(30);
    // The API address file is written after the QUIC endpoint is bound.
    while !state_dir.join(ADDR_FILE).exists() {
        if let Some(status) = process.child.try_wait()? {
            bail!("doppel serve exited ({status}):\n{}", process.log_tail());
        }
        ensure!(
            Instant::now() < deadline,
            "doppel serve did not start in 30 s:\n{}",
            process.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((process, quic))
}

/// Shared between the agents' tasks and the measurement.
#[derive(Default)]
struct Tally {
    /// Submitting reports.
    running: AtomicBool,
    /// Reports submitted in the measured window get their latency recorded.
    measuring: AtomicBool,
    /// Reports acknowledged while `measuring`.
    acked_in_window: AtomicU64,
    /// Reports submitted while `measuring`.
    submitted_in_window: AtomicU64,
    /// Those of them acknowledged.
    window_reports_acked: AtomicU64,
    /// Submit failures (spool errors).
    submit_errors: AtomicU64,
    /// Report-to-durable latencies of the window's reports, µs.
    latency_us: Mutex<Option<Histogram<u64>>>,
}

impl Tally {
    fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(h) = self
            .latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            h.saturating_record(us.max(1));
        }
    }
}

/// One simulated agent: a report a second, each timed until its acknowledgement.
async fn agent_loop(
    handle: ReportHandle,
    pool: Arc<Vec<Vec<EncodedHistogram>>>,
    mut rng: Rng,
    tally: Arc<Tally>,
) {
    // A random phase, as real agents started at different times: not a thousand reports on
    // the same millisecond.
    let phase = Duration::from_micros(rng.next_u64() % 1_000_000);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !tally.running.load(Ordering::Relaxed) {
            break;
        }
        let report = report(&pool, &mut rng);
        let measured = tally.measuring.load(Ordering::Relaxed);
        let started = Instant::now();
        let seq = match handle.submit(report).await {
            Ok(seq) => seq,
            Err(e) => {
                tally.submit_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("submit failed: {e}");
                continue;
            }
        };
        if measured {
            tally.submitted_in_window.fetch_add(1, Ordering::Relaxed);
        }
        let (handle, tally) = (handle.clone(), Arc::clone(&tally));
        tokio::spawn(async move {
            handle.acknowledged(seq).await;
            if tally.measuring.load(Ordering::Relaxed) {
                tally.acked_in_window.fetch_add(1, Ordering::Relaxed);
            }
            if measured {
                tally.window_reports_acked.fetch_add(1, Ordering::Relaxed);
                tally.record(started.elapsed());
            }
        });
    }
}

struct IngestResult {
    state_dir: PathBuf,
    _state: tempfile::TempDir,
    agents_held: usize,
    reports_per_s: f64,
    p99_ms: f64,
    coordinator_cpu_pct: f64,
}

fn connected(clients: &[ReportClient]) -> usize {
    clients
        .iter()
        .filter(|c| c.handle.stats().connected.load(Ordering::Relaxed))
        .count()
}

async fn metrics(state_dir: &Path) -> String {
    let Ok(addr) = std::fs::read_to_string(state_dir.join(ADDR_FILE)) else {
        return String::new();
    };
    let url = format!("http://{}/metrics", addr.trim());
    match reqwest::get(&url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

async fn run_ingest(options: &Options) -> anyhow::Result<IngestResult> {
    // The store on disk (its fsyncs are part of what is measured); the agents' spools on tmpfs.
    let state = tempfile::Builder::new()
        .prefix("doppel-bench-ingest-")
        .tempdir()?;
    let spool_root = if Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("doppel-bench-spools-")
            .tempdir_in("/dev/shm")?
    } else {
        tempfile::Builder::new()
            .prefix("doppel-bench-spools-")
            .tempdir()?
    };
    let ca = CertificateAuthority::in_state_dir(state.path());
    let now = time::OffsetDateTime::now_utc();
    ca.init(&["localhost".into()], now)?;
    let issuing = Instant::now();
    let names: Vec<String> = (0..options.agents)
        .map(|i| format!("bench-agent-{i:05}"))
        .collect();
    let mut files = Vec::with_capacity(names.len());
    for name in &names {
        files.push(ca.issue(name, 1, &spool_root.path().join("certs"), now)?);
    }
    println!(
        "setup: {} agent certificates issued by the coordinator's CA in {:.1} s",
        names.len(),
        issuing.elapsed().as_secs_f64()
    );

    let (mut coordinator, quic) = start_coordinator(options, state.path())?;

    let mut rng = Rng::new(42);
    let pool: Arc<Vec<Vec<EncodedHistogram>>> = Arc::new(
        (0..options.classes)
            .map(|class| {
                (0..VARIANTS)
                    .map(|_| class_histogram(&mut rng, class))
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let bytes: usize = pool.iter().map(|v| v[0].0.len()).sum();
    println!(
        "setup: {} class histograms per report, ~{bytes} histogram bytes per report",
        options.classes
    );

    let connecting = Instant::now();
    let mut clients = Vec::with_capacity(names.len());
    for (name, f) in names.iter().zip(&files) {
        let mut config = ClientConfig::new(
            quic,
            "localhost".into(),
            f.ca_cert.clone(),
            f.cert.clone(),
            f.key.clone(),
        );
        config.hostname = name.clone();
        let spool = Spool::open(SpoolConfig::new(spool_root.path().join(name)))?;
        clients.push(ReportClient::start(config, spool));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while connected(&clients) < clients.len() {
        if let Some(status) = coordinator.child.try_wait()? {
            bail!(
                "doppel serve exited ({status}):\n{}",
                coordinator.log_tail()
            );
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {} agents connected in 120 s:\n{}",
            connected(&clients),
            clients.len(),
            coordinator.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "setup: {} agents connected over QUIC + mTLS in {:.1} s",
        clients.len(),
        connecting.elapsed().as_secs_f64()
    );

    let tally = Arc::new(Tally {
        running: AtomicBool::new(true),
        // Bounded, not auto-resizing: `saturating_record` clamps to the current top of an
        // auto-resizing histogram instead of growing it.
        latency_us: Mutex::new(Some(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)),
        ..Tally::default()
    });
    let agents: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            tokio::spawn(agent_loop(
                c.handle.clone(),
                Arc::clone(&pool),
                Rng::new(1000 + i as u64),
                Arc::clone(&tally),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(options.warmup)).await;

    let reconnects = |clients: &[ReportClient]| -> u64 {
        clients
            .iter()
            .map(|c| c.handle.stats().reconnects.load(Ordering::Relaxed))
            .sum()
    };
    let reconnects_before = reconnects(&clients);
    let before = metrics(state.path()).await;
    let cpu_before = cpu_seconds(&coordinator.stat_path())?;
    let self_before = cpu_seconds(Path::new("/proc/self/stat"))?;
    let window_start = Instant::now();
    tally.measuring.store(true, Ordering::Relaxed);
    let mut min_connected = clients.len();
    while window_start.elapsed() < Duration::from_secs(options.seconds) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        min_connected = min_connected.min(connected(&clients));
        if let Some(status) = coordinator.child.try_wait()? {
            bail!(
                "doppel serve exited ({status}):\n{}",
                coordinator.log_tail()
            );
        }
    }
    tally.measuring.store(false, Ordering::Relaxed);
    let window = window_start.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&coordinator.stat_path())? - cpu_before;
    let self_cpu = cpu_seconds(Path::new("/proc/self/stat"))? - self_before;
    let after = metrics(state.path()).await;
    let acked = tally.acked_in_window.load(Ordering::Relaxed);
    let reconnects_in_window = reconnects(&clients) - reconnects_before;

    // Let the window's last reports be acknowledged; what is still missing after the drain time
    // counts at the drain time (a lower bound on its latency, never left out).
    tally.running.store(false, Ordering::Relaxed);
    let submitted = tally.submitted_in_window.load(Ordering::Relaxed);
    let drain_start = Instant::now();
    while tally.window_reports_acked.load(Ordering::Relaxed) < submitted
        && drain_start.elapsed() < DRAIN
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let window_acked = tally.window_reports_acked.load(Ordering::Relaxed);
    let mut latency = tally
        .latency_us
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .context("latency histogram")?;
    let missing = submitted.saturating_sub(window_acked);
    let drain_us = u64::try_from(DRAIN.as_micros()).unwrap_or(u64::MAX);
    if missing > 0 {
        // (`record_n` with a count of 0 would still move the maximum.)
        latency.saturating_record_n(drain_us, missing);
    }
    for agent in agents {
        agent.abort();
    }
    let mut stopping = tokio::task::JoinSet::new();
    let mut acked_total = 0;
    for client in clients {
        acked_total += client.handle.stats().acked.load(Ordering::Relaxed);
        stopping.spawn(client.stop());
    }
    while stopping.join_next().await.is_some() {}

    let commits = metric(&after, "doppel_ingest_commits_total")
        - metric(&before, "doppel_ingest_commits_total");
    let stored_window = metric(&after, "doppel_reports_ingested_total")
        - metric(&before, "doppel_reports_ingested_total");
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "window: {window:.1} s, {acked} reports acknowledged, {submitted} submitted \
         ({window_acked} of them acknowledged, {missing} not within {} s after), \
         {} submit errors, agents connected min {min_connected} of {}, {reconnects_in_window} \
         reconnects",
        DRAIN.as_secs(),
        tally.submit_errors.load(Ordering::Relaxed),
        names.len()
    );
    println!(
        "latency report-to-durable: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.9)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.max())
    );
    println!(
        "coordinator: {:.2} CPU s in {window:.1} s ({:.1} % of a core), {stored_window:.0} \
         reports stored in {commits:.0} transactions ({:.1} reports each); agents' process \
         {:.1} % of a core",
        cpu,
        100.0 * cpu / window,
        stored_window / commits,
        100.0 * self_cpu / window
    );

    println!(
        "coordinator: {:.0} µs CPU per report stored, so {} agents need {:.1} % of a core",
        1e6 * cpu / stored_window,
        names.len(),
        100.0 * cpu / stored_window * names.len() as f64
    );
    if let Some(pressure) = cpu_pressure() {
        // Shared machine: how often runnable tasks waited for a CPU (PSI), over the last minute.
        println!(
            "machine: CPU pressure {pressure:.0} % (share of time some task waited for a CPU)"
        );
    }

    coordinator.stop();
    // Nothing acknowledged is missing from the store.
    let store = Store::open_in(state.path())?;
    let stored: i64 = store.agents()?.iter().map(|a| a.reports).sum();
    let stored = u64::try_from(stored).unwrap_or_default();
    println!(
        "store: {stored} reports stored, {acked_total} acknowledged to agents ({} MB)",
        store.size_bytes() / 1_000_000
    );
    ensure!(
        stored >= acked_total,
        "{} acknowledged reports are missing from the store",
        acked_total - stored
    );
    summarise_log(&coordinator.log)?;
    Ok(IngestResult {
        state_dir: state.path().to_owned(),
        _state: state,
        agents_held: min_connected,
        reports_per_s: acked as f64 / window,
        p99_ms: ms(latency.value_at_quantile(0.99)),
        coordinator_cpu_pct: 100.0 * cpu / window,
    })
}

/// `some avg60` of `/proc/pressure/cpu`, when the kernel has PSI.
fn cpu_pressure() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    text.lines()
        .find(|l| l.starts_with("some "))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg60="))?
        .parse()
        .ok()
}

/// Prints how often each distinct warning or error occurred, and keeps the log.
fn summarise_log(path: &Path) -> anyhow::Result<()> {
    let mut log = String::new();
    std::fs::File::open(path)?.read_to_string(&mut log)?;
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for line in log.lines() {
        let plain = strip_ansi(line);
        let mut tokens = plain.split_whitespace().skip(1); // the timestamp
        let Some(level) = tokens.next().filter(|l| *l == "WARN" || *l == "ERROR") else {
            continue;
        };
        // The message: after the target, up to the first `field=value`.
        let message: Vec<&str> = tokens.skip(1).take_while(|t| !t.contains('=')).collect();
        *counts
            .entry(format!("{level} {}", message.join(" ")))
            .or_default() += 1;
    }
    let kept = std::env::temp_dir().join("doppel-bench-ingest-coordinator.log");
    std::fs::copy(path, &kept)?;
    if counts.is_empty() {
        println!("coordinator log: no warning, no error");
    } else {
        println!("coordinator log ({}):", kept.display());
        for (message, count) in &counts {
            println!("  {count:>6} x {message}");
        }
    }
    Ok(())
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

struct MergeResult {
    merges: u64,
    cpu_s: f64,
    measurements: usize,
    intervals: usize,
    decodes_per_s: f64,
}

/// Runs the comparison on histograms read back from the store: a workload whose first half of
/// agents are live on one VM type and second half shadows on two others. Counts every merge
/// `compare` makes: three per measurement (type total, type × class, agent interval) and two
/// per matched-load pair.
fn merge_rate(state_dir: &Path, classes: u16, cpu_budget_s: f64) -> anyhow::Result<MergeResult> {
    let store = Store::open_in(state_dir)?;
    let agents: Vec<String> = store
        .agents()?
        .into_iter()
        .map(|a| a.name)
        .take(24)
        .collect();
    ensure!(!agents.is_empty(), "no agent reported");
    let names: Vec<&str> = agents.iter().map(String::as_str).collect();
    let rows = store.interval_histograms(&names, 0, i64::MAX)?;
    let decode_start = thread_cpu_seconds()?;
    let mut measurements = Vec::with_capacity(rows.len());
    for row in rows {
        let histogram = EncodedHistogram(row.hist).decode()?;
        let index = names.iter().position(|n| *n == row.agent).unwrap_or(0);
        let (vm_type, role) = match index % 4 {
            0 | 1 => ("m5.large", Role::Live),
            2 => ("c6i.large", Role::Shadow),
            _ => ("m7g.large", Role::Shadow),
        };
        measurements.push(Measurement {
            agent: row.agent,
            vm_type: vm_type.into(),
            role,
            interval_start_ms: row.interval_start_ms,
            interval_ms: row.interval_ms,
            class: row.class,
            histogram,
            report_errors: row.errors,
        });
    }
    let decode_s = thread_cpu_seconds()? - decode_start;
    let decodes_per_s = measurements.len() as f64 / decode_s.max(1e-9);
    let intervals = measurements.len() / usize::from(classes.max(1));
    let now = measurements
        .iter()
        .map(|m| m.interval_start_ms)
        .max()
        .unwrap_or_default()
        + 1;
    let prices: std::collections::HashMap<String, f64> = [
        ("m5.large", 0.096),
        ("c6i.large", 0.085),
        ("m7g.large", 0.082),
    ]
    .into_iter()
    .map(|(t, p)| (t.to_owned(), p))
    .collect();
    let config = CompareConfig::default();
    let (mut merges, mut runs) = (0u64, 0u32);
    let start = thread_cpu_seconds()?;
    loop {
        let comparison = compare(
            "bench",
            now,
            i64::MAX / 2,
            99.0,
            &config,
            &prices,
            &measurements,
        );
        let pairs: usize = comparison.ranking.iter().map(|r| r.difference.pairs).sum();
        merges += 3 * measurements.len() as u64 + 2 * pairs as u64;
        runs += 1;
        std::hint::black_box(&comparison);
        if thread_cpu_seconds()? - start >= cpu_budget_s && runs >= 3 {
            break;
        }
    }
    Ok(MergeResult {
        merges,
        cpu_s: thread_cpu_seconds()? - start,
        measurements: measurements.len(),
        intervals,
        decodes_per_s,
    })
}
