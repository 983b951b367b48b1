//! Builds `doppel-agent-ebpf` for the BPF target so `main.rs` can embed the object.
//!
//! aya-build runs a nested `cargo +nightly build -Z build-std=core --target bpfel-unknown-none`
//! and copies the object into `OUT_DIR`. `cargo xtask setup` installs what that needs (rust-src,
//! bpf-linker); without them this fails with aya-build's message, which names the missing piece.

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
    // `cargo xtask setup` picks the toolchain: nightly, or stable with RUSTC_BOOTSTRAP=1 on a
    // machine without nightly.
    println!("cargo:rerun-if-env-changed={TOOLCHAIN_ENV}");
    let toolchain = std::env::var(TOOLCHAIN_ENV).unwrap_or_else(|_| "nightly".to_owned());
    let toolchain = match toolchain.as_str() {
        "nightly" => Toolchain::Nightly,
        other => Toolchain::Custom(other),
    };
    aya_build::build_ebpf([package], toolchain)
}
