//! `cargo xtask test`: set up, then check formatting, lint, run every test once, and run each
//! fuzz target for a bounded time ([`crate::fuzz`]).
//!
//! The tests that need root (network namespaces, eBPF) run when this runs as root; then
//! `DOPPEL_REQUIRE_ROOT` is set so none of them can pass by skipping. Independent network tests
//! run in parallel, each in its own namespaces.

use std::process::Command;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Seconds each fuzz target runs after the tests (0: none).
    #[arg(long, default_value_t = 30)]
    fuzz_seconds: u32,
    /// Extra arguments for `cargo test` (e.g. a test name filter), after `--`.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// Every member but the eBPF crate, which only builds for the BPF target.
pub(crate) const HOST_PACKAGES: &[&str] = &["--workspace", "--exclude", "doppel-agent-ebpf"];

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    let root = crate::workspace_root();
    let cargo = |args: &[&str]| {
        let mut command = Command::new("cargo");
        command.args(args).current_dir(&root);
        toolchain.apply(&mut command);
        command
    };
    if !options.no_lint {
        crate::run_command(&mut cargo(&["fmt", "--all", "--check"]))?;
        let mut clippy = cargo(&["clippy", "--all-targets"]);
        clippy.args(HOST_PACKAGES).args(["--", "-D", "warnings"]);
        crate::run_command(&mut clippy)?;
    }
    // The end-to-end tests run the real binaries (`target/debug/doppel-agent`, …), which
    // `cargo test` alone does not build.
    let mut bins = cargo(&["build", "--bins"]);
    bins.args(HOST_PACKAGES);
    crate::run_command(&mut bins)?;
    let mut test = cargo(&["test"]);
    test.args(HOST_PACKAGES);
    if is_root() {
        test.env("DOPPEL_REQUIRE_ROOT", "1");
    } else {
        println!("test: not root; tests needing network namespaces and eBPF will be skipped");
    }
    if !options.cargo_test_args.is_empty() {
        test.arg("--").args(&options.cargo_test_args);
    }
    crate::run_command(&mut test)?;
    if options.fuzz_seconds > 0 {
        crate::fuzz::run_with(
            &toolchain,
            &crate::fuzz::Options {
                seconds: options.fuzz_seconds,
                target: None,
            },
        )?;
    }
    Ok(())
}

pub(crate) fn is_root() -> bool {
    // The effective uid is the second field of "Uid:" in /proc/self/status.
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}
