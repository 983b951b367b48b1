//! `cargo xtask bench ingest`: simulated agents reporting to one coordinator over real QUIC on
//! loopback; report-to-durable latency, reports/s, coordinator CPU, and the comparison's
//! histogram merges per second per core.
//!
//! The measurement is the `ingest` bench target of `doppel-tests` (`tests/benches/ingest.rs`,
//! whose docs describe it): it drives the agent's own reporting client, and xtask does not link
//! the agent, whose build compiles the eBPF object. This module builds the `doppel` binary and
//! that bench in release mode in one cargo invocation (so the shared crates are compiled once,
//! with one feature set) and runs it; its last line is
//! `ingest: agents=A reports_per_s=R p99_durable_ms=D coordinator_cpu_pct=C merges_per_s=M`.

use std::process::{Command, Stdio};

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Simulated agents, each reporting every second.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Seconds measured once every agent is connected (after a 5 s warm-up).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Class histograms per report.
    #[arg(long, default_value_t = 16)]
    classes: u16,
}

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    // The bench links the agent crate, whose build script builds the eBPF object.
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    let mut build = Command::new("cargo");
    build
        .args([
            "build",
            "--release",
            "--package",
            "doppel-coordinator",
            "--bin",
            "doppel",
            "--package",
            "doppel-tests",
            "--bench",
            "ingest",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(crate::workspace_root())
        .stdout(Stdio::piped());
    toolchain.apply(&mut build);
    let output = build.output().context("cannot run cargo build")?;
    anyhow::ensure!(
        output.status.success(),
        "{build:?} failed ({})",
        output.status
    );
    // The bench's executable, from cargo's artifact messages.
    let bench = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "ingest")
        .find_map(|m| m["executable"].as_str().map(std::path::PathBuf::from))
        .context("cargo did not report the ingest bench's executable")?;
    let mut run = Command::new(bench);
    run.arg(format!("--agents={}", options.agents))
        .arg(format!("--seconds={}", options.seconds))
        .arg(format!("--classes={}", options.classes));
    crate::run_command(&mut run)
}
