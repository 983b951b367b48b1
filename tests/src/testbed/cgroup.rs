//! Cgroups that confine testbed processes to a CPU and memory size, the way a VM type would.
//!
//! Works on a unified (v2) hierarchy and on the v1 `cpu` + `memory` controllers, whichever the
//! host gives (this project's CI machines have v1 controllers beside an empty v2 mount).

use std::{
    fs,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use super::TestbedError;

const ROOT: &str = "/sys/fs/cgroup";
/// Parent of every testbed cgroup, per hierarchy.
const PARENT: &str = "doppel-testbed";

/// CPU and memory limits; `None` leaves a resource unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// CPU bandwidth in thousandths of a CPU (1500 = 1.5 CPUs).
    pub cpu_millis: Option<u32>,
    /// Memory limit in bytes.
    pub memory_bytes: Option<u64>,
}

/// A cgroup (one directory per hierarchy in use). Dropping it kills what is inside and removes
/// the directories.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
    v2: bool,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestbedError {
    let what = what.into();
    move |source| TestbedError::Io { what, source }
}

fn write(path: &Path, value: &str) -> Result<(), TestbedError> {
    fs::write(path, value).map_err(io(format!("writing {value:?} to {}", path.display())))
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

impl Cgroup {
    /// Creates a cgroup named after `label`, unique in this process, with `limits` applied.
    pub fn new(label: &str, limits: CgroupLimits) -> Result<Self, TestbedError> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{}-{n}-{label}", std::process::id());
        let root = Path::new(ROOT);
        let cgroup = if is_cgroup2(root) {
            let parent = root.join(PARENT);
            fs::create_dir_all(&parent).map_err(io(format!("creating {}", parent.display())))?;
            write(&root.join("cgroup.subtree_control"), "+cpu +memory")?;
            write(&parent.join("cgroup.subtree_control"), "+cpu +memory")?;
            Self {
                dirs: vec![parent.join(name)],
                v2: true,
            }
        } else {
            // `cpuacct` too where it is a hierarchy of its own, so an agent can read the CPU
            // time of what runs in the cgroup (co-mounted `cpu,cpuacct` has it in `cpu`).
            let mut dirs: Vec<PathBuf> = ["cpu", "memory"]
                .map(|c| root.join(c).join(PARENT).join(&name))
                .to_vec();
            let cpuacct = root.join("cpuacct");
            let same = |a: &Path, b: &Path| {
                fs::canonicalize(a)
                    .ok()
                    .is_some_and(|a| fs::canonicalize(b).ok() == Some(a))
            };
            if cpuacct.exists() && !same(&cpuacct, &root.join("cpu")) {
                dirs.push(cpuacct.join(PARENT).join(&name));
            }
            Self { dirs, v2: false }
        };
        for dir in &cgroup.dirs {
            fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        cgroup.set_limits(limits)?;
        Ok(cgroup)
    }

    /// Changes the limits of a running cgroup (what a "resize" of the VM does).
    pub fn set_limits(&self, limits: CgroupLimits) -> Result<(), TestbedError> {
        const PERIOD_US: u64 = 100_000;
        let quota = limits.cpu_millis.map(|m| u64::from(m) * PERIOD_US / 1000);
        if self.v2 {
            let dir = &self.dirs[0];
            let cpu = quota.map_or_else(
                || format!("max {PERIOD_US}"),
                |q| format!("{q} {PERIOD_US}"),
            );
            write(&dir.join("cpu.max"), &cpu)?;
            let mem = limits
                .memory_bytes
                .map_or_else(|| "max".to_owned(), |b| b.to_string());
            write(&dir.join("memory.max"), &mem)?;
        } else {
            let (cpu, mem) = (&self.dirs[0], &self.dirs[1]);
            write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            let quota = quota.map_or_else(|| "-1".to_owned(), |q| q.to_string());
            write(&cpu.join("cpu.cfs_quota_us"), &quota)?;
            let bytes = limits
                .memory_bytes
                .map_or_else(|| "-1".to_owned(), |b| b.to_string());
            write(&mem.join("memory.limit_in_bytes"), &bytes)?;
        }
        Ok(())
    }

    /// Moves a process (and the children it starts afterwards) into the cgroup.
    pub fn add(&self, pid: u32) -> Result<(), TestbedError> {
        self.dirs
            .iter()
            .try_for_each(|dir| write(&dir.join("cgroup.procs"), &pid.to_string()))
    }

    /// Processes in the cgroup.
    pub fn pids(&self) -> Vec<u32> {
        let procs = self.dirs[0].join("cgroup.procs");
        fs::read_to_string(procs)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The cgroup's directories (one per hierarchy).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// The path an agent's `[workload] cgroup` takes: the v2 directory, or for v1 the path
    /// below the controllers, given under `/sys/fs/cgroup` (the agent maps it onto each).
    pub fn agent_path(&self) -> PathBuf {
        if self.v2 {
            return self.dirs[0].clone();
        }
        let below = self.dirs[0]
            .strip_prefix(Path::new(ROOT).join("cpu"))
            .unwrap_or(&self.dirs[0]);
        Path::new(ROOT).join(below)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid.cast_signed()), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(20));
        }
        for dir in &self.dirs {
            let _ = fs::remove_dir(dir);
        }
    }
}
