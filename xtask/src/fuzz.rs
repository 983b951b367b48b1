//! `cargo xtask fuzz`: the fuzz targets of the code production runs on untrusted bytes, each for
//! a bounded time, from the corpus committed beside it. `cargo xtask test` runs them all.
//!
//! | crate | target | what it reads |
//! |---|---|---|
//! | `common/fuzz` | `read_envelope` | agent ↔ coordinator streams, as production reads them |
//! | `common/fuzz` | `frame_decoder` | the same frames through the incremental decoder |
//! | `agent/fuzz` | `vxlan_decode` | mirrored datagrams |
//! | `agent/fuzz` | `reassembly` | mirrored TCP segments in any order |
//! | `agent/fuzz` | `framing` | client and server bytes of every replayed protocol |
//!
//! The targets are built the way `cargo fuzz` builds them (SanitizerCoverage with inline 8-bit
//! counters, PC table and comparison tracing, `--cfg fuzzing`, debug assertions and overflow
//! checks on), without AddressSanitizer: the code fuzzed is safe Rust, and the build stays one
//! of the workspace's toolchains without `cargo-fuzz`. Each run writes what it finds to a
//! scratch copy of the corpus, never to the committed one; a crash fails the run and names the
//! input it saved. To add what a long run found: `-merge=1 <crate>/corpus/<target> <scratch>`.

use std::{path::Path, process::Command, time::Instant};

use anyhow::Context as _;

/// Fuzz crates, relative to the workspace root, and their targets.
const TARGETS: &[(&str, &[&str])] = &[
    ("common/fuzz", &["read_envelope", "frame_decoder"]),
    ("agent/fuzz", &["vxlan_decode", "reassembly", "framing"]),
];

/// Largest input a target is given: past every header and a few messages, and the frame
/// decoder's collection limits (its module says `-max_len=65536` reaches all of them).
const MAX_LEN: u32 = 65_536;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Seconds each target runs.
    #[arg(long, default_value_t = 30)]
    pub(crate) seconds: u32,
    /// Only targets whose name contains this.
    pub(crate) target: Option<String>,
}

/// `cargo xtask fuzz`.
pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    run_with(&toolchain, options)
}

/// Builds and runs the targets with the toolchain `setup` chose.
pub(crate) fn run_with(
    toolchain: &crate::setup::EbpfToolchain,
    options: &Options,
) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let target_dir = root.join("target/fuzz");
    let triple = "x86_64-unknown-linux-gnu";
    let scratch = tempfile::tempdir().context("scratch directory")?;
    let mut ran = 0;
    for (krate, targets) in TARGETS {
        let chosen: Vec<&str> = targets
            .iter()
            .copied()
            .filter(|t| {
                options
                    .target
                    .as_deref()
                    .is_none_or(|want| t.contains(want))
            })
            .collect();
        if chosen.is_empty() {
            continue;
        }
        // The explicit target keeps the coverage flags off build scripts and proc macros.
        let mut build = Command::new("cargo");
        build
            .arg(format!("+{}", toolchain.name))
            .args(["build", "--release", "--locked", "--target", triple])
            .arg("--target-dir")
            .arg(&target_dir)
            .current_dir(root.join(krate))
            .env("RUSTFLAGS", RUSTFLAGS.join(" "));
        for t in &chosen {
            build.args(["--bin", t]);
        }
        toolchain.apply(&mut build);
        crate::run_command(&mut build)?;
        for target in chosen {
            let committed = root.join(krate).join("corpus").join(target);
            let work = scratch.path().join(target);
            copy_dir(&committed, &work)?;
            let artifacts = root.join("target/fuzz/artifacts").join(target);
            std::fs::create_dir_all(&artifacts)?;
            let started = Instant::now();
            let output = Command::new(target_dir.join(triple).join("release").join(target))
                .arg(format!("-max_total_time={}", options.seconds))
                .arg(format!("-max_len={MAX_LEN}"))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .arg("-print_final_stats=1")
                .arg(&work)
                .output()
                .with_context(|| format!("run fuzz target {target}"))?;
            let log = String::from_utf8_lossy(&output.stderr);
            let runs = log
                .lines()
                .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
                .map_or_else(|| "?".to_owned(), |n| n.trim().to_owned());
            if !output.status.success() {
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                anyhow::bail!(
                    "fuzz target {target} failed after {runs} runs ({}); its input is under {}:\n{}",
                    output.status,
                    artifacts.display(),
                    tail.join("\n")
                );
            }
            let corpus = std::fs::read_dir(&work).map_or(0, Iterator::count);
            println!(
                "fuzz {target}: {runs} runs in {:.0} s, no failure; corpus {} committed, {corpus} after",
                started.elapsed().as_secs_f64(),
                std::fs::read_dir(&committed).map_or(0, Iterator::count),
            );
            ran += 1;
        }
    }
    anyhow::ensure!(ran > 0, "no fuzz target matches {:?}", options.target);
    Ok(())
}

/// What `cargo fuzz build` passes, less AddressSanitizer (see the module doc).
const RUSTFLAGS: &[&str] = &[
    "-Cpasses=sancov-module",
    "-Cllvm-args=-sanitizer-coverage-level=4",
    "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
    "-Cllvm-args=-sanitizer-coverage-pc-table",
    "-Cllvm-args=-sanitizer-coverage-trace-compares",
    "--cfg",
    "fuzzing",
    "-Cdebug-assertions",
    "-Coverflow-checks",
];

/// Copies the files of `from` (none if it does not exist) into a new directory `to`.
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        std::fs::copy(entry.path(), to.join(entry.file_name()))?;
    }
    Ok(())
}
