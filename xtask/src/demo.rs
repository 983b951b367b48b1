//! `cargo xtask demo`: sets up and builds what the demo needs, then runs
//! [`doppel_tests::demo`] (the same code the end-to-end demo test runs) until it ends or Ctrl-C.

use std::{
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
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
    /// Peak request rate; default: 1.3 times what the live type holds, measured at start.
    #[arg(long)]
    peak_rps: Option<f64>,
    /// Keep the work directory (configs, database, logs) after the end, with a browse-only
    /// coordinator config to look at the run in the dashboard afterwards.
    #[arg(long)]
    keep: bool,
}

/// Raised by SIGINT/SIGTERM; the demo checks it and unwinds, so Drop cleans up.
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

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(
        crate::test::is_root(),
        "the demo makes network namespaces, cgroups and eBPF programs: run it as root"
    );
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    let root = crate::workspace_root();
    let mut build = Command::new("cargo");
    build
        .args(["build", "--bins"])
        .args(crate::test::HOST_PACKAGES)
        .current_dir(&root);
    toolchain.apply(&mut build);
    crate::run_command(&mut build)?;
    install_stop_handler()?;

    let exe = std::env::current_exe()?;
    let bin_dir = exe
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no directory", exe.display()))?
        .to_owned();
    let trace = root.join("../shared/traces/worldcup98_per_minute.csv");
    anyhow::ensure!(
        trace.exists(),
        "the demo replays {}: not found (the traces live beside the project, in ../shared/traces)",
        trace.display()
    );
    let work = std::env::temp_dir().join(format!("doppel-demo-{}", std::process::id()));
    let outcome = doppel_tests::demo::run(
        &doppel_tests::demo::Options {
            act: options.mode == "act",
            step: Duration::from_millis(options.step_ms),
            trace: Some(trace),
            trace_start: options.trace_start.clone(),
            minutes: options.minutes,
            peak_rps: options.peak_rps,
            bin_dir: bin_dir.clone(),
            work: work.clone(),
        },
        &STOP,
    );
    if options.keep || outcome.is_err() {
        println!(
            "demo: configs, database and logs kept in {}",
            work.display()
        );
        if options.keep {
            match doppel_tests::demo::prepare_browsing(&work, &bin_dir) {
                Ok(command) => println!(
                    "demo: browse its dashboard with\n  {command}\nthen open \
                     http://127.0.0.1:7480/ui (`doppel --state-dir {} ui` prints a sign-in link)",
                    work.join("state").display()
                ),
                Err(e) => println!("demo: the data cannot be browsed: {e:#}"),
            }
        }
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    outcome.map(drop)
}
