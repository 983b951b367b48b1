//! Developer tasks for doppel: `cargo xtask setup | build-ebpf | test | eval | bench`.
//!
//! Tasks that build or load eBPF run `setup` first, so a fresh machine needs one command; `eval`
//! and `bench` only exercise the sans-IO engine and need no toolchain beyond cargo.

mod bench;
mod bench_datapath;
mod bench_fidelity;
mod bench_ingest;
mod bench_predictor;
mod bench_replay;
mod bpf_sys;
mod build_ebpf;
mod demo;
mod eval;
mod eval_decisions;
mod eval_mirror;
mod fuzz;
mod setup;
mod test;
mod traces;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "doppel's developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): rust-src, bpf-linker, Debian packages.
    Setup(setup::Options),
    /// Build the eBPF object (and the agent that embeds it).
    BuildEbpf(build_ebpf::Options),
    /// Set up, then run formatting and lint checks and every test.
    Test(test::Options),
    /// Measure a component on real traces and simulations (`eval predictor`, `eval decisions`).
    Eval(eval::Options),
    /// The whole system on this machine: live workload, real traffic, shadows on several VM
    /// types, forecast, warning, recommendation, webhook and (act mode) the move.
    Demo(demo::Options),
    /// Fuzz the code that reads untrusted bytes, each target for a bounded time.
    Fuzz(fuzz::Options),
    /// Benchmarks that print figures (`bench datapath|replay|fidelity|predictor|ingest`).
    Bench(bench::Options),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup(options) => setup::run(&options).map(drop),
        Task::BuildEbpf(options) => build_ebpf::run(&options),
        Task::Test(options) => test::run(&options),
        Task::Eval(options) => eval::run(&options),
        Task::Bench(options) => bench::run(&options),
        Task::Fuzz(options) => fuzz::run(&options),
        Task::Demo(options) => demo::run(&options),
    }
}

/// Runs a command, inheriting stdio; fails with the command line when it fails.
fn run_command(command: &mut std::process::Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {command:?}: {e}"))?;
    anyhow::ensure!(status.success(), "{command:?} failed ({status})");
    Ok(())
}

/// The workspace root (xtask lives one level below it).
fn workspace_root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or_else(|| manifest.to_path_buf(), std::path::Path::to_path_buf)
}
