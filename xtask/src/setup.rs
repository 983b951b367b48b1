//! `cargo xtask setup`: make this machine able to build and test doppel, idempotently.
//!
//! Steps (each says what it did, or that nothing was needed):
//! 1. `rust-src` for the toolchain that builds the eBPF crate (nightly; stable with
//!    `RUSTC_BOOTSTRAP=1` when no nightly is installed, see ../shared/EBPF_TOOLCHAIN.md).
//! 2. `bpf-linker` linked against that toolchain's own LLVM, unless a working one with the same
//!    LLVM major is already on PATH. It is installed into a scratch root first and moved into
//!    place only once it runs, so PATH never holds a half-installed linker.
//! 3. The Debian packages the tests use, only those missing.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

/// `bpf-linker` release known to work with aya 0.14 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
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

/// What the eBPF build must use, as found or installed by setup.
#[derive(Debug)]
pub(crate) struct EbpfToolchain {
    /// rustup toolchain name (`nightly`, or `stable` with `RUSTC_BOOTSTRAP=1`).
    pub(crate) name: &'static str,
}

impl EbpfToolchain {
    /// Sets the environment the nested eBPF build (agent/build.rs) reads.
    pub(crate) fn apply(&self, command: &mut Command) {
        command.env("DOPPEL_EBPF_TOOLCHAIN", self.name);
        if self.name != "nightly" {
            command.env("RUSTC_BOOTSTRAP", "1");
        }
    }
}

pub(crate) fn run(_options: &Options) -> anyhow::Result<EbpfToolchain> {
    let started = Instant::now();
    let toolchain = rust_src().context("setup step 1 (rust-src) failed")?;
    bpf_linker(toolchain.name).context(
        "setup step 2 (bpf-linker) failed; fix: check that crates.io is reachable and that \
         `rustc +nightly -vV` works, then run `cargo xtask setup` again",
    )?;
    debian_packages().context(
        "setup step 3 (Debian packages) failed; fix: run as root with apt reachable, or install \
         them by hand",
    )?;
    println!("setup: done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(toolchain)
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    anyhow::ensure!(
        out.status.success(),
        "`{program} {}` failed",
        args.join(" ")
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<EbpfToolchain> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    let name = if toolchains.lines().any(|l| l.starts_with("nightly")) {
        "nightly"
    } else {
        println!(
            "setup: no nightly toolchain; the eBPF crate builds with stable and RUSTC_BOOTSTRAP=1"
        );
        "stable"
    };
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", name],
    )?;
    if installed
        .lines()
        .any(|l| l.trim() == "rust-src" || l.starts_with("rust-src"))
    {
        println!("setup: rust-src for {name}: already installed");
    } else {
        println!("setup: rust-src for {name}: installing");
        crate::run_command(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            name,
        ]))?;
    }
    Ok(EbpfToolchain { name })
}

/// The LLVM major version of `toolchain`'s rustc and the path of its shared LLVM library.
fn toolchain_llvm(toolchain: &str) -> anyhow::Result<(u32, PathBuf)> {
    let version = output("rustc", &[&format!("+{toolchain}"), "-vV"])?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .context("rustc -vV did not report an LLVM version")?;
    let sysroot = output("rustc", &[&format!("+{toolchain}"), "--print", "sysroot"])?;
    let lib = Path::new(sysroot.trim()).join("lib");
    let so = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .with_context(|| format!("no libLLVM.so.{major}* in {}", lib.display()))?;
    Ok((major, so))
}

/// The LLVM major a `bpf-linker` binary links against, from its dynamic dependencies.
fn linker_llvm_major(binary: &Path) -> Option<u32> {
    let deps = output("ldd", &[binary.to_str()?]).ok()?;
    deps.lines().find_map(|l| {
        let l = l.trim();
        let rest = l
            .strip_prefix("libLLVM.so.")
            .or_else(|| l.strip_prefix("libLLVM-"))?;
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    })
}

fn bpf_linker(toolchain: &str) -> anyhow::Result<()> {
    let (major, libllvm) = toolchain_llvm(toolchain)?;
    if let Ok(found) = which_bpf_linker() {
        let runs = Command::new(&found)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        match linker_llvm_major(&found) {
            Some(m) if runs && m == major => {
                println!(
                    "setup: bpf-linker at {} (LLVM {m}): already installed",
                    found.display()
                );
                return Ok(());
            }
            other => println!(
                "setup: bpf-linker at {} is unusable (runs: {runs}, LLVM {other:?}, need {major}); reinstalling",
                found.display()
            ),
        }
    }

    // bpf-linker's build script only checks that `llvm-config` exists; the library it links is
    // the toolchain's own libLLVM, found through this prefix. The binary keeps an rpath to the
    // prefix, so it lives in a cache directory that lasts.
    let home = env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home)
        .join(".cache/doppel")
        .join(format!("llvm-{major}"));
    fs::create_dir_all(prefix.join("bin"))?;
    fs::create_dir_all(prefix.join("lib"))?;
    let llvm_config = prefix.join("bin/llvm-config");
    if !llvm_config.exists() {
        fs::write(&llvm_config, "#!/bin/sh\nexit 1\n")?;
    }
    let soname = libllvm.file_name().context("libLLVM has no file name")?;
    for link in [
        prefix.join("lib/libLLVM.so"),
        prefix.join("lib").join(soname),
    ] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }

    let scratch = Path::new(&home).join(".cache/doppel/bpf-linker-build");
    let _ = fs::remove_dir_all(&scratch);
    println!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    );
    crate::run_command(
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .arg("--root")
            .arg(&scratch)
            .env("LLVM_PREFIX", &prefix),
    )?;
    let built = scratch.join("bin/bpf-linker");
    let check = Command::new(&built).arg("--version").output()?;
    if !check.status.success() {
        bail!("the freshly built bpf-linker does not run; it was not installed");
    }
    let cargo_bin = Path::new(&home).join(".cargo/bin");
    fs::create_dir_all(&cargo_bin)?;
    // Copy next to the target, then rename: the switch on PATH is atomic.
    let staged = cargo_bin.join(".bpf-linker.partial");
    fs::copy(&built, &staged)?;
    fs::rename(&staged, cargo_bin.join("bpf-linker"))?;
    let _ = fs::remove_dir_all(&scratch);
    println!(
        "setup: bpf-linker {BPF_LINKER_VERSION} (LLVM {major}) installed in {}",
        cargo_bin.display()
    );
    Ok(())
}

fn which_bpf_linker() -> anyhow::Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
        .context("bpf-linker is not on PATH")
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
            output("dpkg-query", &["-W", "-f=${Status}", p])
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
