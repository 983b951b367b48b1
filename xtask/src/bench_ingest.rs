//! `cargo xtask bench ingest`: simulated agents reporting to one coordinator over real QUIC on
//! loopback; report-to-durable latency, reports/s, coordinator CPU, and the comparison's
//! histogram merges per second per core.
//!
//! The measurement is the `ingest` bench target of `doppel-tests`
//! (`tests/benches/ingest.rs`, whose docs describe it): it drives the agent's own reporting
//! client, and xtask does not link the agent, whose build compiles the eBPF object. This module
//! builds the `doppel` binary and that bench in release mode and runs it; its last line is
//! `ingest: agents=A reports_per_s=R p99_durable_ms=D coordinator_cpu_pct=C merges_per_s=M`.

use std::process::Command;

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
    let root = crate::workspace_root();
    let mut build = Command::new("cargo");
    build
        .args([
            "build",
            "--release",
            "--package",
            "doppel-coordinator",
            "--bin",
            "doppel",
        ])
        .current_dir(&root);
    crate::run_command(&mut build)?;
    let mut bench = Command::new("cargo");
    bench
        .args([
            "bench",
            "--package",
            "doppel-tests",
            "--bench",
            "ingest",
            "--",
        ])
        .arg(format!("--agents={}", options.agents))
        .arg(format!("--seconds={}", options.seconds))
        .arg(format!("--classes={}", options.classes))
        .current_dir(&root);
    toolchain.apply(&mut bench);
    crate::run_command(&mut bench)
}
