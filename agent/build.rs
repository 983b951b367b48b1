//! Builds `doppel-agent-ebpf` for the BPF target so `main.rs` can embed the object.
//!
//! aya-build runs a nested `cargo +nightly build -Z build-std=core --target bpfel-unknown-none`
//! and copies the object into `OUT_DIR`. What that needs (rust-src, bpf-linker) is found or
//! installed first, by the same code as `cargo xtask setup`: xtask links the agent, so on a fresh
//! machine this build runs before any xtask command could.

use anyhow::{Context as _, anyhow};
use aya_build::Toolchain;

/// Names the rustup toolchain that builds the eBPF crate (default `nightly`).
const TOOLCHAIN_ENV: &str = "DOPPEL_EBPF_TOOLCHAIN";

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("MetadataCommand::exec")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "doppel-agent-ebpf")
        .ok_or_else(|| anyhow!("doppel-agent-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    let package = aya_build::Package {
        name: ebpf.name.as_str(),
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    // Nightly, or stable with RUSTC_BOOTSTRAP=1 on a machine without nightly; `cargo xtask`
    // passes its choice down, and a plain `cargo build` makes the same one here.
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");
    let found = doppel_ebpf_toolchain::ensure(&mut |line| {
        // Only what was installed is worth a warning; "already installed" is every build.
        if !line.ends_with("already installed") {
            println!("cargo:warning=eBPF toolchain: {line}");
        }
    })
    .context("installing what the eBPF build needs")?;
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() && found.name != "nightly" {
        // SAFETY: a build script is single-threaded; aya-build's nested cargo reads this.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    }
    let toolchain = std::env::var(TOOLCHAIN_ENV).unwrap_or_else(|_| found.name.to_owned());
    let toolchain = match toolchain.as_str() {
        "nightly" => Toolchain::Nightly,
        other => Toolchain::Custom(other),
    };
    aya_build::build_ebpf([package], toolchain)
}
