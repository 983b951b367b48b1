//! The whole product on one machine, in about five minutes: what `cargo xtask demo` shows and
//! what the end-to-end demo test asserts on.
//!
//! A lab namespace holds a bridge and the coordinator; a live host runs a CPU-bound nginx in a
//! cgroup sized like the smallest VM type, with a live agent; a client host sends it traffic
//! whose rate follows a time-compressed stretch of the WorldCup98 trace up to a peak the live
//! type cannot hold. The coordinator's Shadow Instance Manager creates shadows on the other types
//! (namespaces + cgroups on the same bridge), the live agent mirrors sampled flows to them, and
//! the demo prints what the coordinator sees every few seconds: per VM type p50, p99, load and
//! cost; the forecast; the warning; the recommendation; the webhook delivery; and in act mode
//! the resize of the live host and the recovery. It ends with a [`Summary`].
//!
//! Everything runs in namespaces made here and is removed at the end, on error, or when the
//! caller's stop flag is raised (Ctrl-C in `cargo xtask demo`).

pub mod dashboard;
pub mod lab;
pub mod loadgen;
pub mod receiver;
pub mod trace;
pub mod workload;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use serde_json::Value;

use self::{
    lab::Lab,
    loadgen::{LoadGenerator, LoadSpec, StepStats},
    receiver::WebhookReceiver,
    trace::Stretch,
    workload::WorkloadFiles,
};
use crate::testbed::{Cgroup, CgroupLimits, Host, Process};

/// Steps over which the client's p99 is judged against the SLO.
const BREACH_WINDOW: usize = 5;

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct Options {
    /// Act on the recommendation (resize the live host) or only recommend.
    pub act: bool,
    /// Demo time per trace minute.
    pub step: Duration,
    /// The WorldCup98 per-minute trace; `None`: a synthetic curve of the same shape.
    pub trace: Option<PathBuf>,
    /// First trace minute replayed.
    pub trace_start: String,
    /// Trace minutes replayed.
    pub minutes: usize,
    /// Peak request rate; `None`: [`PEAK_OVER_LIVE`] times what the live type holds, measured
    /// at start.
    pub peak_rps: Option<f64>,
    /// Where `doppel` and `doppel-agent` are.
    pub bin_dir: PathBuf,
    /// Scratch directory (configs, state, logs).
    pub work: PathBuf,
}

/// A VM type of the demo's catalog.
#[derive(Debug, Clone, Copy)]
pub struct VmType {
    /// Name.
    pub name: &'static str,
    /// CPU share, thousandths of a CPU.
    pub cpu_millis: u32,
    /// Price.
    pub price_per_hour: f64,
}

/// The demo's catalog: CPU shares of clearly different capacity, priced by size.
pub const VM_TYPES: &[VmType] = &[
    VmType {
        name: "small",
        cpu_millis: 100,
        price_per_hour: 0.05,
    },
    VmType {
        name: "medium",
        cpu_millis: 200,
        price_per_hour: 0.10,
    },
    VmType {
        name: "large",
        cpu_millis: 400,
        price_per_hour: 0.20,
    },
    VmType {
        name: "xlarge",
        cpu_millis: 800,
        price_per_hour: 0.40,
    },
];
/// The default peak over the live type's calibrated capacity: a peak the live type cannot
/// hold, with one type that clearly holds it. (At 1.5 the peak sat at 88 % of medium's
/// capacity at the SLO, inside the headroom the decision keeps on the current type, and a
/// forecast overshoot on the last minutes of the rise moved the demo to large in one run of
/// two: the oracle was a coin toss, not a test.)
pub const PEAK_OVER_LIVE: f64 = 1.3;
/// The type the live host starts on.
pub const LIVE_TYPE: &str = "small";
/// The workload's latency objective: p99 below this.
pub const SLO_P99_MS: f64 = 100.0;
const MEMORY_BYTES: u64 = 256 << 20;
const WORKLOAD: &str = "shop";
const WEBHOOK_SECRET: &str = "doppel-demo-webhook-secret";
/// Shadows the manager keeps (one per type other than the live one).
const SHADOWS: usize = 3;

/// What happened, for the closing summary and the end-to-end test.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// The peak request rate sent.
    pub peak_rps: f64,
    /// Each type's capacity, calibrated at start-up on the live nginx (cheapest type first).
    pub calibrated: Vec<(String, f64)>,
    /// Every move the coordinator made (act mode), oldest first: (from, to, state).
    pub moves: Vec<(String, String, String)>,
    /// Every recommendation stored, oldest first: (from, to, reason).
    pub recommendations: Vec<(String, String, String)>,
    /// Warning episodes raised.
    pub warnings: usize,
    /// Steps of the schedule, and the step of the trace's peak.
    pub steps: usize,
    /// The step of the trace's busiest minute.
    pub peak_step: usize,
    /// Shadow VM types the manager ran.
    pub shadow_types: Vec<String>,
    /// Requests the client sent, and complete responses it got.
    pub client_requests: u64,
    /// Complete responses.
    pub client_responses: u64,
    /// Response bytes the client received.
    pub client_bytes: u64,
    /// Responses the live nginx logged, and the bytes it sent.
    pub live_served: (u64, u64),
    /// First step at which the client's p99 (over the responses of the last five steps) broke the
    /// SLO.
    pub first_breach_step: Option<usize>,
    /// The schedule step when the first warning was seen.
    pub warning_step: Option<usize>,
    /// The first warning.
    pub warning: Option<Value>,
    /// The latest forecast the coordinator published.
    pub forecast: Option<Value>,
    /// The first recommendation.
    pub recommendation: Option<Value>,
    /// The schedule step when it was seen.
    pub recommendation_step: Option<usize>,
    /// Webhook deliveries the receiver accepted.
    pub webhook_deliveries: Vec<Value>,
    /// Deliveries refused for a bad signature.
    pub bad_signatures: usize,
    /// The act-mode action, as the coordinator recorded it.
    pub action: Option<Value>,
    /// The final comparison.
    pub comparison: Option<Value>,
    /// Client-side stats before the move (from the first breach to the action) and after it.
    pub client_p99_before_ms: Option<f64>,
    /// Client-side p99 from the action's end to the end of the peak.
    pub client_p99_after_ms: Option<f64>,
}

impl Summary {
    /// The type live ended on (act mode): the last move's target, else the type it started on.
    pub fn settled(&self) -> &str {
        self.moves
            .iter()
            .rev()
            .find(|(_, _, state)| state != "failed")
            .map_or(LIVE_TYPE, |(_, to, _)| to.as_str())
    }

    /// The oracle: the cheapest type whose calibrated capacity holds the peak sent.
    pub fn oracle(&self) -> Option<&(String, f64)> {
        self.calibrated
            .iter()
            .find(|(_, rps)| *rps >= self.peak_rps)
    }

    /// The settled type's price over the oracle's, minus one.
    pub fn regret(&self) -> Option<f64> {
        let price = |name: &str| vm_type(name).ok().map(|t| t.price_per_hour);
        Some(price(self.settled())? / price(&self.oracle()?.0)? - 1.0)
    }
}

fn stopped(stop: &AtomicBool) -> anyhow::Result<()> {
    anyhow::ensure!(!stop.load(Ordering::Relaxed), "stopped");
    Ok(())
}

/// Runs the demo; `stop` makes it unwind (cleaning up) at the next check.
pub fn run(options: &Options, stop: &AtomicBool) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let say = |what: &str| println!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
    let stretch = match &options.trace {
        Some(csv) => Stretch::read(csv, &options.trace_start, options.minutes)?,
        None => Stretch::synthetic(options.minutes),
    };
    let work = &options.work;
    std::fs::create_dir_all(work)?;
    let files = WorkloadFiles::create(&work.join("www"), 48 << 10)?;
    let lab = Lab::new()?;
    say("lab network up: a bridge, a live host and a client host, each in its own namespace");

    // The coordinator, in the lab namespace.
    let state = work.join("state");
    let doppel = Doppel {
        lab: &lab.lab,
        state: state.clone(),
        bin: options.bin_dir.join("doppel"),
        stop,
    };
    doppel.run(&["ca", "init", "--san", &lab::COORDINATOR.to_string()])?;
    let certs = work.join("certs");
    doppel.run(&[
        "ca",
        "issue",
        "--agent",
        "live-1",
        "--out",
        &certs.display().to_string(),
    ])?;
    let receiver = {
        let _inside = lab.lab.enter()?;
        WebhookReceiver::start(TcpListener::bind("127.0.0.1:0")?, WEBHOOK_SECRET.to_owned())?
    };

    // The live workload in a cgroup the size of the live type.
    let live_cgroup = Cgroup::new("demo-live", limits(vm_type(LIVE_TYPE)?))?;
    let nginx_conf = work.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        files.nginx_conf(SocketAddr::from(([0, 0, 0, 0], workload::PORT))),
    )?;
    let resize = work.join("resize-live.sh");
    std::fs::write(&resize, resize_script(&live_cgroup))?;

    let serve_config = work.join("serve.toml");
    std::fs::write(
        &serve_config,
        serve_toml(&state, receiver.addr, &options.bin_dir, &resize),
    )?;
    // Entering only the network namespace: the local provisioner manages cgroups.
    let mut serve = lab.lab.command_net_only(&path_str(&doppel.bin));
    serve
        .arg("--state-dir")
        .arg(&state)
        .args(["serve", "--config"])
        .arg(&serve_config)
        .stdout(log_file(work, "coordinator.log")?)
        .stderr(log_file(work, "coordinator.log")?);
    let mut coordinator = lab.lab.spawn(serve)?;
    // Dropped before the coordinator: on every way out (end, error, Ctrl-C) the shadows, which
    // outlive a coordinator by design, are destroyed through it.
    let shadows_guard = ShadowCleanup(&doppel);
    doppel.wait_ready()?;
    say("coordinator up: QUIC + mTLS on 10.77.0.1:4433, API on the lab's loopback");
    // Dropped before the lab: the forwarder's thread leaves the lab namespace first.
    let _dashboard = show_dashboard(&doppel, &lab, &state, &say);

    let live_dir = work.join("live");
    std::fs::create_dir_all(live_dir.join("tmp"))?;
    let nginx = spawn_in_cgroup(
        &lab.live,
        &live_cgroup,
        "nginx",
        &[
            "-c",
            &path_str(&nginx_conf),
            "-p",
            &format!("{}/", live_dir.display()),
        ],
    )?;
    // Measured before the agent starts, so the probes' overload is not in the coordinator's
    // data: the live nginx is given each type's CPU in turn and probed, which calibrates every
    // type's capacity on this machine (the oracle of the summary), then put back on its own.
    let listen = SocketAddr::from((lab::LIVE, workload::PORT));
    let mut calibrated = Vec::new();
    let mut probe = Probe::default();
    for t in VM_TYPES {
        // The limit holds from the next CPU period (100 ms): within the probe's first request
        // and well before the end of its 3 s burst.
        live_cgroup.set_limits(limits(*t))?;
        let p = measure_capacity(&lab.client, listen, stop)?;
        say(&format!(
            "calibration: {} ({} CPU) holds about {:.0} req/s",
            t.name,
            f64::from(t.cpu_millis) / 1000.0,
            p.rps
        ));
        calibrated.push((*t, p.rps));
        probe.responses += p.responses;
        probe.bytes += p.bytes;
    }
    live_cgroup.set_limits(limits(vm_type(LIVE_TYPE)?))?;
    let capacity = calibrated
        .iter()
        .find(|(t, _)| t.name == LIVE_TYPE)
        .map_or(0.0, |(_, rps)| *rps);
    let live_config = live_dir.join("agent.toml");
    std::fs::write(
        &live_config,
        live_agent_toml(&certs, &live_dir, &live_cgroup.agent_path()),
    )?;
    // Only the network namespace: the agent reads its workload's cgroup, which `ip netns exec`
    // would hide by remounting /sys.
    let mut agent = lab
        .live
        .command_net_only(&path_str(&options.bin_dir.join("doppel-agent")));
    agent
        .arg("--config")
        .arg(&live_config)
        .stdout(Stdio::null())
        .stderr(log_file(work, "live-agent.log")?);
    let _live_agent = lab.live.spawn(agent)?;
    say(&format!(
        "live host up: nginx compressing every response (gzip -9) within {} CPU ({LIVE_TYPE}), \
         holding about {capacity:.0} req/s; live agent attached with TC eBPF",
        f64::from(vm_type(LIVE_TYPE)?.cpu_millis) / 1000.0
    ));

    let workload_file = work.join("workload.toml");
    std::fs::write(&workload_file, workload_toml(options.act, &nginx_conf))?;
    doppel.run(&["workload", "add", "--file", &path_str(&workload_file)])?;
    say(&format!(
        "workload `{WORKLOAD}` registered: SLO p99 < {SLO_P99_MS} ms, every flow mirrored, {} mode",
        if options.act { "act" } else { "recommend" }
    ));
    let shadows = doppel.wait_for_shadows(SHADOWS, Duration::from_secs(60))?;
    for s in &shadows {
        say(&format!(
            "shadow {} running on {} at {} (created by the coordinator's local provisioner)",
            s["id"]
                .as_str()
                .or(s["instance_id"].as_str())
                .unwrap_or("?"),
            s["vm_type"].as_str().unwrap_or("?"),
            s["addr"].as_str().unwrap_or("?"),
        ));
    }

    let peak_rps = options.peak_rps.unwrap_or(PEAK_OVER_LIVE * capacity);
    let rates = stretch.rates(peak_rps);
    say(&format!(
        "traffic: WorldCup98 from {} ({} minutes, one every {:.1} s), peak {peak_rps:.0} req/s at minute {}",
        stretch.start,
        rates.len(),
        options.step.as_secs_f64(),
        stretch.peak_step()
    ));
    let mut summary = Summary {
        peak_rps,
        calibrated: calibrated
            .iter()
            .map(|(t, rps)| (t.name.to_owned(), *rps))
            .collect(),
        steps: rates.len(),
        peak_step: stretch.peak_step(),
        shadow_types: shadows
            .iter()
            .filter_map(|s| s["vm_type"].as_str().map(str::to_owned))
            .collect(),
        ..Summary::default()
    };
    let mut load = LoadGenerator::start(
        &lab.client,
        LoadSpec {
            target: listen,
            path: workload::PATH.to_owned(),
            step: options.step,
            rates,
            workers: 256,
            timeout: Duration::from_secs(10),
        },
        7,
    )?;
    watch(&doppel, &load, options, &mut summary, &say, stop)?;
    load.finish();
    let total = load.merged(0..summary.steps);
    summary.client_requests = total.offered + probe.responses;
    summary.client_responses = total.ok + probe.responses;
    summary.client_bytes = total.bytes + probe.bytes;
    summary.live_served = served_after(&live_dir, summary.client_responses)?;
    summary.forecast = doppel.json(&["forecast", WORKLOAD]).ok();
    summary.comparison = doppel.json(&["compare", WORKLOAD, "--window", "5m"]).ok();
    summary.webhook_deliveries = receiver.accepted().into_iter().map(|d| d.body).collect();
    summary.bad_signatures = receiver.bad_signatures();
    println!(
        "{}",
        doppel.output(&["compare", WORKLOAD, "--window", "5m"])?
    );
    print_summary(&summary);

    // What `--keep` re-stores for browsing: the cleanup below removes the workload.
    if let Ok(spec) = doppel.output(&["--json", "workload", "show", WORKLOAD]) {
        std::fs::write(work.join(KEPT_WORKLOAD), spec)?;
    }
    drop(shadows_guard);
    coordinator.stop(Duration::from_secs(10));
    drop(nginx);
    Ok(summary)
}

/// What the live nginx's log says it served, read once it holds at least `responses` (nginx
/// logs a request after sending its response, so the client can be a moment ahead), or after
/// 10 s, when what it holds then is the answer.
fn served_after(live_dir: &Path, responses: u64) -> anyhow::Result<(u64, u64)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let served = workload::served(live_dir)?;
        if served.0 >= responses || Instant::now() > deadline {
            return Ok(served);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The workload's spec as the demo ended, kept in the work directory for browsing.
const KEPT_WORKLOAD: &str = "workload.json";

/// Forwards the host's loopback to the coordinator's API in the lab and prints a dashboard
/// link; `None` (said, never fatal) when it cannot.
fn show_dashboard(
    doppel: &Doppel<'_>,
    lab: &Lab,
    state: &Path,
    say: &dyn Fn(&str),
) -> Option<dashboard::Forwarder> {
    let api: SocketAddr = std::fs::read_to_string(state.join(doppel_coordinator::api::ADDR_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let forwarder = match dashboard::Forwarder::start(lab.lab.netns(), api) {
        Ok(f) => f,
        Err(e) => {
            say(&format!(
                "dashboard: no host port forwarded ({e}); it is at http://{api}/ui in the lab"
            ));
            return None;
        }
    };
    let host = format!("http://{}", forwarder.addr);
    let token = state.join(doppel_coordinator::api::TOKEN_FILE);
    match doppel.output(&["ui"]) {
        Ok(link) => say(&format!(
            "dashboard: {} (one use, within 5 minutes), or {host}/ui with the token in {}",
            link.trim().replacen(&format!("http://{api}"), &host, 1),
            token.display()
        )),
        Err(e) => say(&format!(
            "dashboard: {host}/ui with the token in {} (no one-time link: {e})",
            token.display()
        )),
    }
    Some(forwarder)
}

/// After a demo run with `work` kept: puts the workload back into the coordinator's store (the
/// demo removes it to destroy its shadows), writes `browse.toml` (a browse-only coordinator on
/// 127.0.0.1), and returns the command that serves the dashboard over the kept data.
pub fn prepare_browsing(work: &Path, bin_dir: &Path) -> anyhow::Result<String> {
    use doppel_coordinator::{policy::WorkloadSpec, store::Store};
    let state = work.join("state");
    let spec: WorkloadSpec =
        serde_json::from_str(&std::fs::read_to_string(work.join(KEPT_WORKLOAD))?)?;
    let mut store = Store::open_in(&state)?;
    if store.workload(&spec.name)?.is_none() {
        let now_ms = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis(),
        )?;
        store.put_workload(&spec, now_ms)?;
    }
    let config = work.join("browse.toml");
    std::fs::write(
        &config,
        format!(
            "# Serves the kept demo's data to the API and the dashboard, and nothing else.\n\
             state_dir = \"{}\"\nbrowse_only = true\nquic_listen = \"127.0.0.1:0\"\n\
             api_listen = \"127.0.0.1:7480\"\n",
            state.display()
        ),
    )?;
    Ok(format!(
        "{} --state-dir {} serve --config {}",
        bin_dir.join("doppel").display(),
        state.display(),
        config.display()
    ))
}

/// Destroys the workload's shadows when dropped (the coordinator must still run).
struct ShadowCleanup<'a>(&'a Doppel<'a>);

impl Drop for ShadowCleanup<'_> {
    fn drop(&mut self) {
        let doppel = self.0;
        // Removing the workload makes the manager destroy every shadow it made; the CLI
        // destroys those made by hand.
        let _ = doppel.output(&["workload", "rm", WORKLOAD]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let active: Vec<String> = doppel
                .output(&["--json", "shadows", "list"])
                .ok()
                .and_then(|out| serde_json::from_str::<Value>(&out).ok())
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|s| s["id"].as_str().map(str::to_owned))
                .collect();
            if active.is_empty() {
                return;
            }
            for id in &active {
                let _ = doppel.output(&["shadows", "destroy", id]);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        eprintln!("demo: shadows still listed after 30 s; see `doppel shadows`");
    }
}

/// Follows the run step by step: prints the live table every few steps and notes the first
/// warning, recommendation and action.
fn watch(
    doppel: &Doppel<'_>,
    load: &LoadGenerator,
    options: &Options,
    summary: &mut Summary,
    say: &dyn Fn(&str),
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let table_every =
        (Duration::from_secs(5).as_millis() / options.step.as_millis().max(1)).max(1) as usize;
    let mut printed = 0;
    let mut checked = 0;
    let mut action_done_step = None;
    let mut seen_warnings = std::collections::BTreeMap::new();
    let mut seen_recommendations = std::collections::BTreeMap::new();
    let mut action_states = std::collections::BTreeMap::new();
    while !load.is_done() {
        stopped(stop)?;
        std::thread::sleep(Duration::from_millis(250));
        let now = load.current_step().min(summary.steps);
        // Client-side breach: the p99 of the responses of the last BREACH_WINDOW completed
        // steps. (One step holds some 50 responses, whose "p99" is their slowest one: a single
        // throttled request would count as a breach of a p99 objective.)
        while checked + 1 < now {
            let window = checked.saturating_sub(BREACH_WINDOW - 1)..checked + 1;
            let s = load.merged(window);
            if summary.first_breach_step.is_none()
                && s.ok >= 100
                && s.quantile_ms(0.99) > SLO_P99_MS
            {
                summary.first_breach_step = Some(checked);
                say(&format!(
                    "client: p99 {:.0} ms over minutes {}-{checked} breaks the SLO",
                    s.quantile_ms(0.99),
                    checked.saturating_sub(BREACH_WINDOW - 1)
                ));
            }
            checked += 1;
        }
        let minutes = |secs: f64| secs / options.step.as_secs_f64();
        for w in doppel.changed(
            &["warnings", "--workload", WORKLOAD],
            "id",
            &mut seen_warnings,
        ) {
            if summary.warning.is_none() {
                summary.warning_step = Some(now);
                summary.warning = Some(w.clone());
            }
            summary.warnings += 1;
            let body = &w["body"];
            say(&format!(
                "WARNING at minute {now}: {} expected to break the SLO in {} trace minutes (p = {}, forecast {} req/s against a capacity of {} req/s)",
                w["vm_type"].as_str().unwrap_or("?"),
                body["lead_secs"]
                    .as_f64()
                    .map_or_else(|| "?".into(), |l| format!("{:.0}", minutes(l))),
                num(&body["probability"]),
                num(&body["forecast_load_per_s"]),
                num(&body["capacity_per_s"]),
            ));
        }
        for r in doppel.changed(
            &["recommendations", "--workload", WORKLOAD],
            "id",
            &mut seen_recommendations,
        ) {
            if summary.recommendation.is_none() {
                summary.recommendation_step = Some(now);
                summary.recommendation = Some(r.clone());
            }
            let (from, to, reason) = (
                r["current_vm_type"].as_str().unwrap_or("?"),
                r["recommended_vm_type"].as_str().unwrap_or("?"),
                r["reason"].as_str().unwrap_or("?"),
            );
            summary
                .recommendations
                .push((from.to_owned(), to.to_owned(), reason.to_owned()));
            say(&format!(
                "RECOMMENDATION at minute {now}: {from} -> {to} ({reason}){}",
                evidence(&r["body"])
            ));
        }
        if options.act {
            // An action is reported once its command finished (done, failed), and again when
            // it is verified.
            for a in doppel.changed(
                &["actions", "--workload", WORKLOAD],
                "state",
                &mut action_states,
            ) {
                let state = a["state"].as_str().unwrap_or("?");
                let (from, to) = (
                    a["from_vm_type"].as_str().unwrap_or("?"),
                    a["to_vm_type"].as_str().unwrap_or("?"),
                );
                match state {
                    "running" => continue,
                    "done" | "failed" => {
                        action_done_step = Some(now);
                        summary
                            .moves
                            .push((from.to_owned(), to.to_owned(), state.to_owned()));
                        say(&format!(
                            "MOVE at minute {now}: {from} -> {to}: {state} ({})",
                            a["detail"].as_str().unwrap_or_default().trim(),
                        ));
                    }
                    _ => {
                        match summary
                            .moves
                            .iter_mut()
                            .rev()
                            .find(|(f, t, _)| f == from && t == to)
                        {
                            Some(m) => m.2 = state.to_owned(),
                            // Done and verified between two looks.
                            None => {
                                action_done_step = Some(now);
                                summary.moves.push((
                                    from.to_owned(),
                                    to.to_owned(),
                                    state.to_owned(),
                                ));
                                say(&format!("MOVE at minute {now}: {from} -> {to}"));
                            }
                        }
                        say(&format!(
                            "VERIFIED at minute {now}: {from} -> {to}: {state} (live p99 {} ms after the move)",
                            num(&a["live_latency_ms"]),
                        ));
                    }
                }
            }
        }
        if now >= printed + table_every {
            let s = load.merged(printed..now);
            say(&format!(
                "minutes {printed:>3}-{:>3}: client sent {:.0} req/s, p50 {:.1} ms, p99 {:.1} ms",
                now - 1,
                s.offered as f64 / ((now - printed) as f64 * options.step.as_secs_f64()),
                s.quantile_ms(0.5),
                s.quantile_ms(0.99)
            ));
            if let Ok(c) = doppel.json(&["compare", WORKLOAD, "--window", "10s"]) {
                print_types(&c);
            }
            printed = now;
        }
    }
    if options.act {
        // The last action's verification comes after its settling time.
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            stopped(stop)?;
            let a = doppel
                .json(&["actions", "--workload", WORKLOAD])
                .ok()
                .and_then(|v| v.as_array().and_then(|a| a.first().cloned()));
            let settled = a.as_ref().is_some_and(|a| {
                a["state"] == "verified" || a["state"] == "not_recovered" || a["state"] == "failed"
            });
            if settled || a.is_none() || Instant::now() > deadline {
                if let Some(a) = &a
                    && let Some(m) = summary.moves.last_mut()
                    && let Some(state) = a["state"].as_str()
                {
                    m.2 = state.to_owned();
                }
                summary.action = a;
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        if let (Some(breach), Some(done)) = (summary.first_breach_step, action_done_step) {
            let before = load.merged(breach..done.max(breach + 1));
            let after = load.merged(done + 5..summary.peak_step + 10);
            summary.client_p99_before_ms = p99(&before);
            summary.client_p99_after_ms = p99(&after);
        }
    }
    Ok(())
}

/// What a recommendation rests on, in a line: for a forecast breach the load it provisions for
/// and every type's capacity (with its error rate, and whether the budget allows it); for the
/// comparison's triggers each shadow type's p99 at matched load.
fn evidence(body: &Value) -> String {
    if let Some(f) = body.get("forecast").filter(|f| !f.is_null()) {
        let types: Vec<String> = f["types"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let mut line = format!(
                    "{} {} req/s",
                    t["vm_type"].as_str().unwrap_or("?"),
                    num(&t["capacity_at_slo_per_s"])
                );
                if let Some(e) = t["error_rate"].as_f64() {
                    line.push_str(&format!(", errors {:.1} %", 100.0 * e));
                }
                if t["within_budget"] == false {
                    line.push_str(", over budget");
                }
                line
            })
            .collect();
        return format!(
            ": provisioned for {} req/s (forecast peak {}); capacities at the SLO: {}",
            num(&f["provisioned_peak_per_s"]),
            num(&f["forecast_peak_per_s"]),
            types.join("; ")
        );
    }
    let shadows: Vec<String> = body["evidence"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["role"] == "shadow")
        .map(|e| {
            format!(
                "{} p99 {} ms at matched load",
                e["vm_type"].as_str().unwrap_or("?"),
                num(&e["versus_live"]["shadow_at_load_ms"])
            )
        })
        .collect();
    if shadows.is_empty() {
        String::new()
    } else {
        format!(": {}", shadows.join("; "))
    }
}

fn p99(s: &StepStats) -> Option<f64> {
    (s.ok > 0).then(|| s.quantile_ms(0.99))
}

fn num(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

/// The per-type live table: p50, p99, load, cost.
fn print_types(c: &Value) {
    let Some(types) = c["types"].as_array() else {
        return;
    };
    println!(
        "    {:<8} {:<6} {:>9} {:>9} {:>9} {:>8}",
        "TYPE", "ROLE", "P50 MS", "P99 MS", "REQ/S", "$/H"
    );
    for t in types {
        println!(
            "    {:<8} {:<6} {:>9} {:>9} {:>9} {:>8}",
            t["vm_type"].as_str().unwrap_or("?"),
            t["role"].as_str().unwrap_or("?"),
            num(&t["all"]["p50_ms"]),
            num(&t["all"]["p99_ms"]),
            num(&t["all"]["exchanges_per_s"]),
            t["price_per_hour"]
                .as_f64()
                .map_or_else(|| "-".into(), |p| format!("{p:.2}")),
        );
    }
}

fn print_summary(s: &Summary) {
    println!("\n==== doppel demo summary ====");
    println!(
        "traffic: {} requests, {} complete responses, {} bytes to the client; peak {:.0} req/s at minute {}",
        s.client_requests, s.client_responses, s.client_bytes, s.peak_rps, s.peak_step
    );
    println!(
        "live nginx sent {} responses, {} bytes: the client's own count (the shadows' answers to the mirrored copies never left their hosts)",
        s.live_served.0, s.live_served.1
    );
    println!("shadows on: {}", s.shadow_types.join(", "));
    if let Some(f) = s.forecast.as_ref().map(|f| &f["forecast"]) {
        // Ranked by capacity, each with its CPU ceiling and where its capacity comes from.
        let mut types: Vec<&Value> = f["types"].as_array().into_iter().flatten().collect();
        types.sort_by(|a, b| {
            let c = |t: &Value| t["capacity_at_slo_per_s"].as_f64().unwrap_or_default();
            c(a).total_cmp(&c(b))
        });
        let capacities: Vec<String> = types
            .iter()
            .map(|t| {
                format!(
                    "{} {} req/s (CPU ceiling {}; {})",
                    t["vm_type"].as_str().unwrap_or("?"),
                    num(&t["capacity_at_slo_per_s"]),
                    num(&t["cpu_ceiling_per_s"]),
                    t["basis"].as_str().unwrap_or("?"),
                )
            })
            .collect();
        println!(
            "forecast ({} model): peak {} req/s (provisioned for {}); capacities at the SLO, lowest first: {}",
            f["model"].as_str().unwrap_or("?"),
            num(&f["forecast_peak_per_s"]),
            num(&f["provisioned_peak_per_s"]),
            if capacities.is_empty() {
                "-".to_owned()
            } else {
                capacities.join(", ")
            }
        );
    }
    match (&s.warning, s.warning_step, s.first_breach_step) {
        (Some(_), Some(w), Some(b)) if w <= b => println!(
            "warnings: {} raised; the first at minute {w}, {} minutes before the client saw the SLO break (minute {b})",
            s.warnings,
            b - w
        ),
        (Some(_), Some(w), Some(b)) => println!(
            "warnings: {} raised; the first at minute {w}, after the client saw the SLO break at minute {b}",
            s.warnings
        ),
        (Some(_), Some(w), None) => println!(
            "warnings: {} raised; the first at minute {w}; the SLO never broke at the client",
            s.warnings
        ),
        _ => println!("warnings: none"),
    }
    if s.recommendations.is_empty() {
        println!("recommendations: none");
    }
    for (i, (from, to, reason)) in s.recommendations.iter().enumerate() {
        println!("recommendation {}: {from} -> {to} ({reason})", i + 1);
    }
    println!(
        "webhook: {} signed deliveries accepted by the local receiver, {} refused",
        s.webhook_deliveries.len(),
        s.bad_signatures
    );
    for (i, (from, to, state)) in s.moves.iter().enumerate() {
        println!("move {}: {from} -> {to}: {state}", i + 1);
    }
    if let Some(a) = &s.action
        && let Some(latency) = a["live_latency_ms"].as_f64()
    {
        println!("live p99 after the last move, as the coordinator verified it: {latency:.1} ms");
    }
    if let (Some(before), Some(after)) = (s.client_p99_before_ms, s.client_p99_after_ms) {
        println!(
            "client p99 from the first breach to the first move: {before:.1} ms; after it, through the peak: {after:.1} ms"
        );
    }
    let calibrated: Vec<String> = s
        .calibrated
        .iter()
        .map(|(t, rps)| format!("{t} {rps:.0}"))
        .collect();
    println!("calibrated capacities (req/s): {}", calibrated.join(", "));
    match (s.oracle(), s.regret()) {
        (Some((oracle, capacity)), Some(regret)) => println!(
            "settled on {}; the oracle (the cheapest type whose calibrated capacity, {capacity:.0} req/s, holds the {:.0} req/s peak) is {oracle}: regret {:+.0} %",
            s.settled(),
            s.peak_rps,
            100.0 * regret
        ),
        _ => println!(
            "settled on {}; no calibrated type holds the {:.0} req/s peak",
            s.settled(),
            s.peak_rps
        ),
    }
}

/// Runs the CLI inside the lab namespace (the API listens on the lab's loopback).
struct Doppel<'a> {
    lab: &'a Host,
    state: PathBuf,
    bin: PathBuf,
    stop: &'a AtomicBool,
}

impl Doppel<'_> {
    /// Runs a command; its output, or an error with its stderr.
    fn output(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self
            .lab
            .command(&path_str(&self.bin))
            .arg("--state-dir")
            .arg(&self.state)
            .args(args)
            .output()?;
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
    fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        Ok(serde_json::from_str(&self.output(&all)?)?)
    }

    /// The rows of a `--json` list whose `field` is new or changed since the last call (by
    /// `id`; with `field = "id"`, the rows not seen before), oldest first.
    fn changed(
        &self,
        args: &[&str],
        field: &str,
        seen: &mut std::collections::BTreeMap<i64, Value>,
    ) -> Vec<Value> {
        let mut rows: Vec<Value> = self
            .json(args)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        // Lists are newest first.
        rows.reverse();
        rows.into_iter()
            .filter(|r| {
                r["id"]
                    .as_i64()
                    .is_some_and(|id| seen.insert(id, r[field].clone()).as_ref() != Some(&r[field]))
            })
            .collect()
    }

    /// Waits until the API answers.
    fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            stopped(self.stop)?;
            match self.json(&["agents"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context("the coordinator did not start (see coordinator.log)"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Waits until exactly `n` of the workload's shadows are running; returns them.
    fn wait_for_shadows(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            stopped(self.stop)?;
            let all = self.json(&["shadows", "list", "--workload", WORKLOAD])?;
            let running: Vec<Value> = all
                .as_array()
                .into_iter()
                .flatten()
                .filter(|s| s["state"] == "running")
                .cloned()
                .collect();
            if running.len() == n {
                return Ok(running);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} shadows running after {timeout:?}, {n} wanted: {all}",
                running.len()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}

fn log_file(work: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join(name))?)
}

/// The catalog entry called `name`.
pub fn vm_type(name: &str) -> anyhow::Result<VmType> {
    VM_TYPES
        .iter()
        .find(|t| t.name == name)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no VM type {name}"))
}

fn limits(t: VmType) -> CgroupLimits {
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

/// What the capacity probe sent.
#[derive(Debug, Default)]
struct Probe {
    rps: f64,
    responses: u64,
    bytes: u64,
}

/// Requests per second the live instance holds, measured with a short closed-loop burst (four
/// concurrent clients for three seconds) once it answers at all. Its responses are counted so
/// the client's totals still match what the live server sent.
fn measure_capacity(client: &Host, target: SocketAddr, stop: &AtomicBool) -> anyhow::Result<Probe> {
    let timeout = Duration::from_secs(5);
    let deadline = Instant::now() + Duration::from_secs(10);
    let responses = std::sync::atomic::AtomicU64::new(0);
    let bytes = std::sync::atomic::AtomicU64::new(0);
    {
        let _inside = client.enter()?;
        loop {
            match loadgen::request(target, workload::PATH, timeout) {
                Ok(n) => {
                    responses.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(n, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    stopped(stop)?;
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "the live workload does not answer: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    let burst = Duration::from_secs(3);
    let deadline = Instant::now() + burst;
    let in_burst = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| -> anyhow::Result<()> {
                let _inside = client.enter()?;
                while Instant::now() < deadline {
                    if let Ok(n) = loadgen::request(target, workload::PATH, timeout) {
                        in_burst.fetch_add(1, Ordering::Relaxed);
                        responses.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(n, Ordering::Relaxed);
                    }
                }
                Ok(())
            });
        }
    });
    let rps = in_burst.load(Ordering::Relaxed) as f64 / burst.as_secs_f64();
    anyhow::ensure!(rps > 0.0, "the live workload answered nothing");
    Ok(Probe {
        rps,
        responses: responses.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
    })
}

/// The demo's scale action: gives the live workload's cgroup the CPU of the recommended type,
/// as resizing its VM would.
fn resize_script(cgroup: &Cgroup) -> String {
    let mut cases = String::new();
    for t in VM_TYPES {
        cases.push_str(&format!(
            "  {}) quota={} ;;\n",
            t.name,
            u64::from(t.cpu_millis) * 100
        ));
    }
    let mut writes = String::new();
    for dir in cgroup.dirs() {
        let dir = dir.display();
        writes.push_str(&format!(
            "if [ -e '{dir}/cpu.max' ]; then echo \"$quota 100000\" > '{dir}/cpu.max'; fi\n\
             if [ -e '{dir}/cpu.cfs_quota_us' ]; then echo \"$quota\" > '{dir}/cpu.cfs_quota_us'; fi\n"
        ));
    }
    format!(
        "#!/bin/sh\n# doppel demo scale action: resize the live host to $DOPPEL_TO_VM_TYPE.\nset -eu\n\
         case \"$DOPPEL_TO_VM_TYPE\" in\n{cases}  *) echo \"unknown VM type $DOPPEL_TO_VM_TYPE\" >&2; exit 2 ;;\nesac\n\
         {writes}echo \"live resized from $DOPPEL_FROM_VM_TYPE to $DOPPEL_TO_VM_TYPE ($quota us of CPU per 100 ms)\"\n"
    )
}

fn serve_toml(state: &Path, webhook: SocketAddr, bin_dir: &Path, resize: &Path) -> String {
    let mut toml = format!(
        "state_dir = \"{state}\"\nquic_listen = \"{coordinator}:4433\"\n\
         evaluate_interval_ms = 1000\ncompare_window_secs = 20\nwebhook_backoff_ms = 500\n\
         [[webhooks]]\nurl = \"http://{webhook}/doppel\"\nsecret = \"{WEBHOOK_SECRET}\"\n\
         [[actions]]\nname = \"resize-live\"\ncommand = [\"sh\", \"{resize}\"]\n\
         timeout_ms = 10000\nverify_after_ms = 15000\n\
         [sim]\ncoordinator_address = \"{coordinator}:4433\"\nserver_name = \"{coordinator}\"\n\
         reconcile_interval_ms = 1000\n\
         [sim.local]\nbridge = \"{bridge}\"\nsubnet = \"{subnet}\"\ngateway = \"{coordinator}\"\n\
         pool = [\"10.77.0.100\", \"10.77.0.199\"]\nagent_binary = \"{agent}\"\n",
        state = state.display(),
        coordinator = lab::COORDINATOR,
        resize = resize.display(),
        bridge = lab::BRIDGE,
        subnet = lab::SUBNET,
        agent = bin_dir.join("doppel-agent").display(),
    );
    for t in VM_TYPES {
        toml.push_str(&format!(
            "[[vm_types]]\nname = \"{}\"\nprice_per_hour = {}\nvcpus = {}\nmemory_mib = {}\n\
             local = {{ cpu = {}, memory_bytes = {MEMORY_BYTES} }}\n",
            t.name,
            t.price_per_hour,
            (t.cpu_millis / 100).max(1),
            MEMORY_BYTES >> 20,
            f64::from(t.cpu_millis) / 1000.0,
        ));
    }
    toml
}

fn live_agent_toml(certs: &Path, dir: &Path, cgroup: &Path) -> String {
    format!(
        "interface = \"{iface}\"\nreport_interval_ms = 1000\n\
         [workload]\ncgroup = \"{cgroup}\"\n\
         [coordinator]\naddress = \"{coordinator}:4433\"\nserver_name = \"{coordinator}\"\n\
         ca_cert = \"{c}/ca.crt\"\ncert = \"{c}/live-1.crt\"\nkey = \"{c}/live-1.key\"\n\
         spool_dir = \"{spool}\"\n\
         [[services]]\naddr = \"{live}\"\nport = {port}\n",
        iface = lab::HOST_IFACE,
        coordinator = lab::COORDINATOR,
        c = certs.display(),
        spool = dir.join("spool").display(),
        live = lab::LIVE,
        port = workload::PORT,
        cgroup = cgroup.display(),
    )
}

fn workload_toml(act: bool, nginx_conf: &Path) -> String {
    let shadow_budget: f64 = VM_TYPES
        .iter()
        .filter(|t| t.name != LIVE_TYPE)
        .map(|t| t.price_per_hour)
        .sum();
    let mode = if act {
        "mode = \"act\"\naction = \"resize-live\"\n"
    } else {
        "mode = \"recommend\"\n"
    };
    format!(
        "name = \"{WORKLOAD}\"\nservices = [\"{live}:{port}\"]\n\
         [[live]]\nagent = \"live-1\"\nvm_type = \"{LIVE_TYPE}\"\nvxlan_source = \"{live}\"\n\
         [shadow]\ncommand = \"nginx\"\nargs = [\"-c\", \"{conf}\", \"-p\", \"{{dir}}/\"]\n\
         count = {SHADOWS}\npin_out = [\"{LIVE_TYPE}\"]\n\
         [policy]\nreport_interval_ms = 1000\n{mode}\
         [policy.slo]\npercentile = 99.0\nmax_latency_ms = {SLO_P99_MS}\n\
         [policy.budget]\nshadow_cost_per_hour = {budget}\n\
         [[policy.classes]]\nid = 0\nname = \"default\"\nsample_rate = 1.0\n",
        live = lab::LIVE,
        port = workload::PORT,
        conf = nginx_conf.display(),
        budget = shadow_budget + 0.001,
    )
}
