//! `cargo xtask build-ebpf`: build the eBPF object through the agent's build script and say
//! where it is.

use std::process::Command;

use anyhow::Context as _;

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Build the agent in release mode.
    #[arg(long)]
    release: bool,
}

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let toolchain = crate::setup::run(&crate::setup::Options {})?;
    let mut cargo = Command::new("cargo");
    cargo
        .args(["build", "--package", "doppel-agent"])
        .current_dir(crate::workspace_root());
    if options.release {
        cargo.arg("--release");
    }
    toolchain.apply(&mut cargo);
    crate::run_command(&mut cargo)?;
    let profile = if options.release { "release" } else { "debug" };
    let build_dir = crate::workspace_root()
        .join("target")
        .join(profile)
        .join("build");
    let object = std::fs::read_dir(&build_dir)
        .with_context(|| format!("reading {}", build_dir.display()))?
        .flatten()
        .map(|e| e.path().join("out/doppel-agent-ebpf"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .context("the agent build produced no eBPF object")?;
    let size = object.metadata()?.len();
    println!(
        "build-ebpf: {} ({size} bytes), embedded in doppel-agent",
        object.display()
    );
    Ok(())
}
