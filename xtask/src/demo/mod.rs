//! `cargo xtask demo`: the whole product on one machine, in about five minutes.
//!
//! A lab namespace holds a bridge and the coordinator; a live host runs a CPU-bound nginx in a
//! cgroup sized like the smallest VM type, with a live agent; a client host sends it traffic
//! whose rate follows a time-compressed stretch of the WorldCup98 trace up to a peak the live
//! type cannot hold. The coordinator's shadow manager creates shadows on the other types
//! (namespaces + cgroups), the live agent mirrors sampled flows to them, and the demo prints what
//! the coordinator sees each few seconds until it has forecast the peak, warned, recommended,
//! delivered the webhook and (act mode) resized the live host and seen latency recover.
//!
//! Everything runs in namespaces made here and is removed at the end or on Ctrl-C.

mod lab;
mod loadgen;
mod receiver;
mod trace;
mod workload;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use doppel_tests::testbed::{Cgroup, CgroupLimits, Host, Process};

use self::{
    lab::Lab,
    loadgen::{LoadGenerator, LoadSpec},
    receiver::WebhookReceiver,
    trace::Stretch,
    workload::WorkloadFiles,
};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// `act` resizes the live host to the recommended type; `recommend` only recommends.
    #[arg(long, default_value = "act", value_parser = ["act", "recommend"])]
    mode: String,
    /// Milliseconds of demo per trace minute.
    #[arg(long, default_value_t = 1000)]
    step_ms: u64,
    /// First trace minute of the stretch replayed.
    #[arg(long, default_value = "1998-06-15 11:40")]
    trace_start: String,
    /// Trace minutes replayed.
    #[arg(long, default_value_t = 240)]
    minutes: usize,
    /// Peak request rate; default: 1.5 times what the live type holds, measured at start.
    #[arg(long)]
    peak_rps: Option<f64>,
    /// Keep the work directory (configs, database, logs) after the end.
    #[arg(long)]
    keep: bool,
}

/// Set by SIGINT/SIGTERM; every loop of the demo checks it and unwinds, so Drop cleans up.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_stop_handler() -> anyhow::Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(())
}

fn stopped() -> anyhow::Result<()> {
    anyhow::ensure!(!STOP.load(Ordering::Relaxed), "stopped by a signal");
    Ok(())
}

/// A VM type of the demo's catalog.
struct VmType {
    name: &'static str,
    cpu_millis: u32,
    price_per_hour: f64,
}

/// The demo's catalog: CPU shares of clearly different capacity, priced by size.
const VM_TYPES: &[VmType] = &[
    VmType {
        name: "small",
        cpu_millis: 200,
        price_per_hour: 0.05,
    },
    VmType {
        name: "medium",
        cpu_millis: 400,
        price_per_hour: 0.10,
    },
    VmType {
        name: "large",
        cpu_millis: 800,
        price_per_hour: 0.20,
    },
    VmType {
        name: "xlarge",
        cpu_millis: 1600,
        price_per_hour: 0.40,
    },
];
const LIVE_TYPE: &str = "small";
const MEMORY_BYTES: u64 = 256 << 20;
const WORKLOAD: &str = "shop";
const WEBHOOK_SECRET: &str = "doppel-demo-webhook-secret";

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        crate::test::is_root(),
        "the demo makes network namespaces, cgroups and eBPF programs: run it as root"
    );
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    let mut build = Command::new("cargo");
    build
        .args(["build", "--bins"])
        .args(crate::test::HOST_PACKAGES)
        .current_dir(crate::workspace_root());
    toolchain.apply(&mut build);
    crate::run_command(&mut build)?;
    install_stop_handler()?;

    let work = std::env::temp_dir().join(format!("doppel-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let outcome = demo(options, &work);
    if options.keep {
        println!("demo: work directory kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    outcome
}

fn demo(options: &Options, work: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let say = |what: &str| println!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    let stretch = Stretch::read(
        &crate::workspace_root().join("../shared/traces/worldcup98_per_minute.csv"),
        &options.trace_start,
        options.minutes,
    )?;
    let files = WorkloadFiles::create(&work.join("www"), 48 << 10)?;
    let lab = Lab::new()?;
    say("lab network up: bridge, live host, client host");

    // The coordinator, in the lab namespace.
    let state = work.join("state");
    let doppel = Doppel::new(&lab.lab, &state);
    doppel.run(&["ca", "init", "--san", &lab::COORDINATOR.to_string()])?;
    let certs = work.join("certs");
    doppel.run(&[
        "ca",
        "issue",
        "--agent",
        "live-1",
        "--out",
        certs.to_str().unwrap_or_default(),
    ])?;
    let receiver = {
        let _inside = lab.lab.enter()?;
        WebhookReceiver::start(TcpListener::bind("127.0.0.1:0")?, WEBHOOK_SECRET.to_owned())?
    };
    let serve_config = work.join("serve.toml");
    std::fs::write(&serve_config, serve_toml(&state, receiver.addr))?;
    let mut serve = lab
        .lab
        .command(binary("doppel")?.to_str().unwrap_or_default());
    serve
        .arg("--state-dir")
        .arg(&state)
        .args(["serve", "--config"])
        .arg(&serve_config)
        .stdout(log_file(work, "coordinator.log")?)
        .stderr(log_file(work, "coordinator.log")?);
    let _coordinator = lab.lab.spawn(serve)?;
    doppel.wait_ready()?;
    say("coordinator up (QUIC + mTLS on 10.77.0.1:4433, API on the lab's loopback)");
    stopped()?;

    // The live workload in a cgroup the size of the live type, and its agent.
    let live_type = vm_type(LIVE_TYPE)?;
    let live_cgroup = Cgroup::new("demo-live", limits(live_type))?;
    let live_dir = work.join("live");
    std::fs::create_dir_all(&live_dir)?;
    let listen = SocketAddr::from((lab::LIVE, workload::PORT));
    std::fs::write(
        live_dir.join("nginx.conf"),
        files.nginx_conf(listen, &live_dir),
    )?;
    let _nginx = spawn_in_cgroup(
        &lab.live,
        &live_cgroup,
        "nginx",
        &[
            "-c",
            live_dir.join("nginx.conf").to_str().unwrap_or_default(),
            "-p",
            live_dir.to_str().unwrap_or_default(),
        ],
    )?;
    let live_config = live_dir.join("agent.toml");
    std::fs::write(&live_config, live_agent_toml(&certs, &live_dir))?;
    let mut agent = lab
        .live
        .command(binary("doppel-agent")?.to_str().unwrap_or_default());
    agent
        .arg("--config")
        .arg(&live_config)
        .stdout(Stdio::null())
        .stderr(log_file(work, "live-agent.log")?);
    let _live_agent = lab.live.spawn(agent)?;
    say(&format!(
        "live host up: nginx (gzip -9 per request) limited to {} CPU ({}), live agent attached",
        f64::from(live_type.cpu_millis) / 1000.0,
        LIVE_TYPE
    ));

    let workload_file = work.join("workload.toml");
    std::fs::write(&workload_file, workload_toml(&options.mode))?;
    doppel.run(&[
        "workload",
        "add",
        "--file",
        workload_file.to_str().unwrap_or_default(),
    ])?;
    say(&format!(
        "workload `{WORKLOAD}` registered ({} mode)",
        options.mode
    ));

    // Capacity of the live type, measured, so the peak overloads it on any machine.
    let peak_rps = match options.peak_rps {
        Some(rps) => rps,
        None => 1.5 * measure_capacity(&lab.client, listen)?,
    };
    let rates = stretch.rates(peak_rps);
    let step = Duration::from_millis(options.step_ms);
    say(&format!(
        "traffic: WorldCup98 from {} ({} minutes, one per {:.1}s), peak {peak_rps:.0} req/s at step {}",
        stretch.start,
        rates.len(),
        step.as_secs_f64(),
        stretch.peak_step()
    ));
    let mut load = LoadGenerator::start(
        &lab.client,
        LoadSpec {
            target: listen,
            path: workload::PATH.to_owned(),
            step,
            rates,
            workers: 256,
            timeout: Duration::from_secs(10),
        },
        7,
    )?;
    let mut printed = 0;
    while !load.is_done() {
        stopped()?;
        std::thread::sleep(Duration::from_millis(200));
        let now = load.current_step();
        while printed + 5 <= now {
            let s = load.merged(printed..printed + 5);
            say(&format!(
                "client: steps {printed:>3}-{:>3} offered {:>4} ok {:>4} failed {:>3} p50 {:>7.1} ms p99 {:>7.1} ms",
                printed + 4,
                s.offered,
                s.ok,
                s.failed,
                s.quantile_ms(0.5),
                s.quantile_ms(0.99)
            ));
            printed += 5;
        }
    }
    load.stop();
    println!(
        "{}",
        doppel.output(&["compare", WORKLOAD, "--window", "5m"])?
    );
    println!("{}", doppel.output(&["recommendations"])?);
    for d in receiver.accepted() {
        println!("webhook delivery {}: {}", d.idempotency_key, d.body);
    }
    println!(
        "webhook deliveries refused for a bad signature: {}",
        receiver.bad_signatures()
    );
    Ok(())
}

/// Runs the CLI inside the lab namespace (the API listens on the lab's loopback).
struct Doppel<'a> {
    lab: &'a Host,
    state: PathBuf,
}

impl<'a> Doppel<'a> {
    fn new(lab: &'a Host, state: &Path) -> Self {
        Self {
            lab,
            state: state.to_owned(),
        }
    }

    fn command(&self, args: &[&str]) -> anyhow::Result<Command> {
        let mut command = self
            .lab
            .command(binary("doppel")?.to_str().unwrap_or_default());
        command.arg("--state-dir").arg(&self.state).args(args);
        Ok(command)
    }

    /// Runs a command; its output, or an error with its stderr.
    fn output(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.command(args)?.output()?;
        anyhow::ensure!(
            out.status.success(),
            "doppel {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        self.output(args).map(drop)
    }

    /// `--json` output, parsed.
    fn json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.output(&all)?)?)
    }

    /// Waits until the API answers.
    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            stopped()?;
            match self.json(&["agents"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("the coordinator did not start (see coordinator.log)"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// A workspace binary built beside this xtask binary (`target/debug/NAME`).
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?
        .join(name);
    anyhow::ensure!(path.exists(), "{} is missing", path.display());
    Ok(path)
}

fn log_file(work: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join(name))?)
}

fn vm_type(name: &str) -> anyhow::Result<&'static VmType> {
    VM_TYPES
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| anyhow::anyhow!("no VM type {name}"))
}

fn limits(t: &VmType) -> CgroupLimits {
    CgroupLimits {
        cpu_millis: Some(t.cpu_millis),
        memory_bytes: Some(MEMORY_BYTES),
    }
}

/// Spawns `program args` in `host` inside `cgroup`: a shell joins the cgroup and then execs
/// `ip netns exec … program`, so every process it forks (nginx's workers) is limited from its
/// first instruction. (Joining from inside would not work: `ip netns exec` remounts `/sys`, and
/// the cgroup mounts are not in the new mount namespace.)
fn spawn_in_cgroup(
    host: &Host,
    cgroup: &Cgroup,
    program: &str,
    args: &[&str],
) -> anyhow::Result<Process> {
    let mut script = String::new();
    for dir in cgroup.dirs() {
        script.push_str(&format!("echo $$ > '{}/cgroup.procs' && ", dir.display()));
    }
    script.push_str("exec \"$0\" \"$@\"");
    let mut inside = Command::new("sh");
    inside
        .arg("-c")
        .arg(script)
        .args(["ip", "netns", "exec", host.netns(), program])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(host.spawn(inside)?)
}

/// Requests per second the live instance holds, measured with a short closed-loop burst (four
/// concurrent clients for three seconds) once it answers at all.
fn measure_capacity(client: &Host, target: SocketAddr) -> anyhow::Result<f64> {
    let timeout = Duration::from_secs(5);
    let deadline = Instant::now() + Duration::from_secs(10);
    {
        let _inside = client.enter()?;
        while let Err(e) = loadgen::request(target, workload::PATH, timeout) {
            stopped()?;
            anyhow::ensure!(
                Instant::now() < deadline,
                "the live workload does not answer: {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let burst = Duration::from_secs(3);
    let deadline = Instant::now() + burst;
    let done = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| -> anyhow::Result<()> {
                let _inside = client.enter()?;
                while Instant::now() < deadline {
                    if loadgen::request(target, workload::PATH, timeout).is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            });
        }
    });
    let rps = done.load(Ordering::Relaxed) as f64 / burst.as_secs_f64();
    anyhow::ensure!(rps > 0.0, "the live workload answered nothing");
    Ok(rps)
}

fn serve_toml(state: &Path, webhook: SocketAddr) -> String {
    let mut toml = format!(
        "state_dir = \"{state}\"\nquic_listen = \"{coordinator}:4433\"\n\
         evaluate_interval_ms = 2000\ncompare_window_secs = 30\nwebhook_backoff_ms = 500\n\
         [[webhooks]]\nurl = \"http://{webhook}/doppel\"\nsecret = \"{WEBHOOK_SECRET}\"\n",
        state = state.display(),
        coordinator = lab::COORDINATOR,
    );
    for t in VM_TYPES {
        toml.push_str(&format!(
            "[[vm_types]]\nname = \"{}\"\nprice_per_hour = {}\n",
            t.name, t.price_per_hour
        ));
    }
    toml
}

fn live_agent_toml(certs: &Path, dir: &Path) -> String {
    format!(
        "interface = \"{iface}\"\nreport_interval_ms = 1000\n\
         [coordinator]\naddress = \"{coordinator}:4433\"\nserver_name = \"{coordinator}\"\nca_cert = \"{c}/ca.crt\"\n\
         cert = \"{c}/live-1.crt\"\nkey = \"{c}/live-1.key\"\nspool_dir = \"{spool}\"\n\
         [[services]]\naddr = \"{live}\"\nport = {port}\n",
        iface = lab::HOST_IFACE,
        coordinator = lab::COORDINATOR,
        c = certs.display(),
        spool = dir.join("spool").display(),
        live = lab::LIVE,
        port = workload::PORT,
    )
}

fn workload_toml(mode: &str) -> String {
    format!(
        "name = \"{WORKLOAD}\"\nservices = [\"{live}:{port}\"]\n\
         [[live]]\nagent = \"live-1\"\nvm_type = \"{LIVE_TYPE}\"\n\
         [policy]\nreport_interval_ms = 1000\nmode = \"{mode}\"\n\
         [policy.slo]\npercentile = 99.0\nmax_latency_ms = 100.0\n\
         [[policy.classes]]\nid = 0\nname = \"default\"\nsample_rate = 1.0\n",
        live = lab::LIVE,
        port = workload::PORT,
    )
}
