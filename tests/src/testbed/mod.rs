//! Hosts as network namespaces, links as veth pairs, processes inside hosts, cgroups.

mod cgroup;
mod host;

pub use cgroup::{Cgroup, CgroupLimits};
pub use host::{Host, Link, NetnsGuard, Process};

use std::{
    thread,
    time::{Duration, Instant},
};

/// Polls `f` every 50 ms until it returns true or `limit` passes; returns its last answer.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Errors of the testbed. Tests usually `expect()` these; the messages say what to fix.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// An `ip`/`tc`/`sysctl` command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A command could not be started at all (missing binary?).
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A namespace or cgroup file could not be used.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Entering a network namespace failed.
    #[error("entering network namespace {netns}")]
    Setns {
        /// The namespace.
        netns: String,
        /// Cause.
        #[source]
        source: nix::Error,
    },
}

/// Whether this process may create namespaces, load eBPF and change cgroups.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Environment variable that turns "not root, skipping" into a failure (set by `cargo xtask test`,
/// so CI can never pass by skipping).
pub const REQUIRE_ROOT_ENV: &str = "DOPPEL_REQUIRE_ROOT";

/// Returns `true` when a privileged test should run; prints a clear skip message and returns
/// `false` when it cannot, unless [`REQUIRE_ROOT_ENV`] is set, in which case it panics.
pub fn privileged_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os(REQUIRE_ROOT_ENV).is_none(),
        "{test} needs root (network namespaces, eBPF); run `cargo xtask test` as root"
    );
    eprintln!("SKIPPED {test}: needs root (network namespaces, eBPF); run as root to include it");
    false
}

/// Path of a binary of this workspace, next to the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`). `cargo test --workspace`
/// builds every binary before running tests.
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo xtask test` (or `cargo build --workspace --bins` first)",
        path.display()
    );
    path
}
