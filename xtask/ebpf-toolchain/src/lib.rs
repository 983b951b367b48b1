//! What building `doppel-agent-ebpf` needs, found or installed, idempotently:
//! 1. `rust-src` for the toolchain that builds it (nightly; stable with `RUSTC_BOOTSTRAP=1` when
//!    no nightly is installed, see ../shared/EBPF_TOOLCHAIN.md);
//! 2. `bpf-linker` linked against that toolchain's own LLVM, unless a working one with the same
//!    LLVM major is already on PATH. It is installed into a scratch root first and moved into
//!    place only once it runs, so PATH never holds a half-installed linker.
//!
//! Two callers: `cargo xtask setup`, and the agent's build script. The build script is why this
//! is a crate of its own: `cargo xtask` itself builds the agent (the test harness links it), so on
//! a fresh machine the agent's build must install these before xtask's setup could ever run.
//! Concurrent callers (two builds at once) take turns on a lock file.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// `bpf-linker` release known to work with aya 0.14 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Environment the outer cargo sets for a build script that must not reach a nested `cargo
/// install` (it would build bpf-linker with the outer build's compiler wrapper or flags).
const OUTER_BUILD_ENV: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTUP_TOOLCHAIN",
];

/// The rustup toolchain that builds the eBPF crate.
#[derive(Debug, Clone, Copy)]
pub struct EbpfToolchain {
    /// rustup toolchain name (`nightly`, or `stable` with `RUSTC_BOOTSTRAP=1`).
    pub name: &'static str,
}

impl EbpfToolchain {
    /// Sets the environment the nested eBPF build (agent/build.rs) reads.
    pub fn apply(&self, command: &mut Command) {
        command.env("DOPPEL_EBPF_TOOLCHAIN", self.name);
        if self.name != "nightly" {
            command.env("RUSTC_BOOTSTRAP", "1");
        }
    }
}

/// Finds or installs rust-src and bpf-linker; `say` receives one line per step (what it did, or
/// that nothing was needed).
pub fn ensure(say: &mut dyn FnMut(&str)) -> anyhow::Result<EbpfToolchain> {
    let home = env::var_os("HOME").context("HOME is not set")?;
    let cache = Path::new(&home).join(".cache/doppel");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let lock = fs::File::create(cache.join("toolchain.lock"))?;
    lock.lock().context("locking the toolchain setup")?;
    let toolchain = rust_src(say).context("rust-src")?;
    bpf_linker(toolchain.name, &cache, say).context(
        "bpf-linker; fix: check that crates.io is reachable and that `rustc +nightly -vV` works",
    )?;
    Ok(toolchain)
}

/// Runs `program` with `args` (without the outer build's compiler environment) and returns its
/// standard output; an error when it cannot run or fails.
pub fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = without_outer_build_env(Command::new(program).args(args))
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

fn without_outer_build_env(command: &mut Command) -> &mut Command {
    for name in OUTER_BUILD_ENV {
        command.env_remove(name);
    }
    command
}

/// Runs `command` with its output on our stderr (stdout belongs to cargo in a build script).
fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = without_outer_build_env(command)
        .stdout(Stdio::inherit())
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    anyhow::ensure!(status.success(), "{command:?} failed ({status})");
    Ok(())
}

fn rust_src(say: &mut dyn FnMut(&str)) -> anyhow::Result<EbpfToolchain> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    let name = if toolchains.lines().any(|l| l.starts_with("nightly")) {
        "nightly"
    } else {
        say("no nightly toolchain; the eBPF crate builds with stable and RUSTC_BOOTSTRAP=1");
        "stable"
    };
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", name],
    )?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        say(&format!("rust-src for {name}: already installed"));
    } else {
        say(&format!("rust-src for {name}: installing"));
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", name]))?;
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

fn bpf_linker(toolchain: &str, cache: &Path, say: &mut dyn FnMut(&str)) -> anyhow::Result<()> {
    let (major, libllvm) = toolchain_llvm(toolchain)?;
    if let Ok(found) = which_bpf_linker() {
        let runs = Command::new(&found)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        match linker_llvm_major(&found) {
            Some(m) if runs && m == major => {
                say(&format!(
                    "bpf-linker at {} (LLVM {m}): already installed",
                    found.display()
                ));
                return Ok(());
            }
            other => say(&format!(
                "bpf-linker at {} is unusable (runs: {runs}, LLVM {other:?}, need {major}); reinstalling",
                found.display()
            )),
        }
    }

    // bpf-linker's build script only checks that `llvm-config` exists; the library it links is
    // the toolchain's own libLLVM, found through this prefix. The binary keeps an rpath to the
    // prefix, so it lives in a cache directory that lasts.
    let prefix = cache.join(format!("llvm-{major}"));
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

    let scratch = cache.join("bpf-linker-build");
    let _ = fs::remove_dir_all(&scratch);
    say(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} (about a minute)"
    ));
    // The cargo running us (a build script's `CARGO`), else the one on PATH.
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run(Command::new(cargo)
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(&scratch)
        .env("LLVM_PREFIX", &prefix))?;
    let built = scratch.join("bin/bpf-linker");
    let check = Command::new(&built).arg("--version").output()?;
    if !check.status.success() {
        bail!("the freshly built bpf-linker does not run; it was not installed");
    }
    let home = env::var_os("HOME").context("HOME is not set")?;
    let cargo_bin = Path::new(&home).join(".cargo/bin");
    fs::create_dir_all(&cargo_bin)?;
    // Copy next to the target, then rename: the switch on PATH is atomic.
    let staged = cargo_bin.join(".bpf-linker.partial");
    fs::copy(&built, &staged)?;
    fs::rename(&staged, cargo_bin.join("bpf-linker"))?;
    let _ = fs::remove_dir_all(&scratch);
    say(&format!(
        "bpf-linker {BPF_LINKER_VERSION} (LLVM {major}) installed in {}",
        cargo_bin.display()
    ));
    Ok(())
}

fn which_bpf_linker() -> anyhow::Result<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
        .context("bpf-linker is not on PATH")
}
