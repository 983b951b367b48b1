//! `cargo xtask setup`: make this machine able to build and test doppel, idempotently.
//!
//! Steps (each says what it did, or that nothing was needed):
//! 1. `rust-src` for the toolchain that builds the eBPF crate, and
//! 2. `bpf-linker`, both by `doppel_ebpf_toolchain::ensure` (see that crate for how);
//! 3. The Debian packages the tests use, only those missing.

use std::{process::Command, time::Instant};

use anyhow::Context as _;

/// Debian packages the tests and tools need: `ip`/`tc` (iproute2), `sysctl` (procps),
/// `bpftool` for inspecting programs and their run-time statistics, and the real servers the
/// end-to-end tests run as workloads (nginx, with the echo module for its slow paths;
/// redis-server, redis-cli and redis-benchmark from redis-tools; and PostgreSQL: `postgresql`
/// brings the distribution's server version with `initdb`, `pgbench`, `psql` and the
/// `pg_stat_statements` module, and the `postgres` system user the test servers run as), and the
/// HTTP/2 clients: `h2load` (nghttp2-client) and Debian's gRPC for Python (python3-grpcio),
/// whose server and client run the gRPC tests; and
/// memcached, a protocol replayed by the opaque fallback; and MariaDB: `mariadb-server` brings
/// `mariadbd`, `mariadb-install-db` and the `mysql` system user, `mariadb-client` the `mariadb`
/// client, and `sysbench` the OLTP load generator for the MySQL protocol; `g++`, which
/// `libfuzzer-sys` builds libFuzzer with for the fuzz targets `cargo xtask test` runs; and
/// `chromium`, the headless browser the dashboard test drives; and `prometheus` for `promtool`,
/// which checks the coordinator's `/metrics`.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "procps",
    "bpftool",
    "nginx",
    "libnginx-mod-http-echo",
    "redis-server",
    "redis-tools",
    "postgresql",
    "nghttp2-client",
    "python3-grpcio",
    "memcached",
    "mariadb-server",
    "mariadb-client",
    "sysbench",
    "g++",
    "chromium",
    "prometheus",
];

#[derive(Debug, clap::Args)]
pub(crate) struct Options {}

pub(crate) use doppel_ebpf_toolchain::EbpfToolchain;

pub(crate) fn run(_options: &Options) -> anyhow::Result<EbpfToolchain> {
    let started = Instant::now();
    // Steps 1 and 2 (the agent's build script runs the same code, and has on any machine where
    // xtask itself was built).
    let toolchain = doppel_ebpf_toolchain::ensure(&mut |line| println!("setup: {line}"))
        .context("setup steps 1-2 (rust-src, bpf-linker) failed")?;
    debian_packages().context(
        "setup step 3 (Debian packages) failed; fix: run as root with apt reachable, or install \
         them by hand",
    )?;
    println!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(toolchain)
}

fn debian_packages() -> anyhow::Result<()> {
    ensure_debian_packages(DEBIAN_PACKAGES)
}

/// Installs the Debian packages of `packages` that are missing (benchmarks call this for the
/// servers and load generators they need).
pub(crate) fn ensure_debian_packages(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            doppel_ebpf_toolchain::output("dpkg-query", &["-W", "-f=${Status}", p])
                .map_or(true, |s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!(
            "setup: Debian packages ({}): already installed",
            DEBIAN_PACKAGES.join(", ")
        );
        return Ok(());
    }
    println!("setup: installing Debian packages: {}", missing.join(", "));
    crate::run_command(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
