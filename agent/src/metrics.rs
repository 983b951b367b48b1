//! Resource use of the host and of the workload over each report interval, from /proc (read
//! with `procfs`) and the workload's cgroup (v2, or the v1 `cpuacct`/`memory` controllers) or its
//! process tree.
//!
//! Everything is read as cumulative counters and reported as the difference since the previous
//! sample, so a missed interval never loses usage; gauges (memory) are read as they are.

use std::{fs, path::PathBuf};

use doppel_common::wire::ResourceUsage;
use procfs::{Current as _, CurrentSI as _, DiskStats, KernelStats, Meminfo, net::DeviceStatus};
use serde::Deserialize;

/// Where the workload's resource use comes from.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkloadSource {
    /// A cgroup directory (under /sys/fs/cgroup; for v1, the path below each controller).
    Cgroup(PathBuf),
    /// A process and all its descendants.
    Pid(u32),
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    cpu_us: u64,
    net_rx: u64,
    net_tx: u64,
    disk_read: u64,
    disk_write: u64,
}

/// Samples host and workload resource use; each call reports the change since the last one.
#[derive(Debug)]
pub struct ResourceSampler {
    workload: Option<WorkloadSource>,
    host_before: Totals,
    workload_before: Totals,
}

fn read(path: impl AsRef<std::path::Path>) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

fn field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

impl ResourceSampler {
    /// Starts sampling; the first [`sample`](Self::sample) covers the time since this call.
    pub fn new(workload: Option<WorkloadSource>) -> Self {
        let mut sampler = Self {
            workload,
            host_before: Totals::default(),
            workload_before: Totals::default(),
        };
        sampler.host_before = host_totals();
        sampler.workload_before = sampler.workload_totals();
        sampler
    }

    /// Host and workload use since the previous call.
    pub fn sample(&mut self) -> (ResourceUsage, Option<ResourceUsage>) {
        let host_now = host_totals();
        // Bytes (procfs scales meminfo's kB); a kernel without MemAvailable (before 3.14)
        // counts everything as used rather than nothing.
        let (total, available) =
            Meminfo::current().map_or((0, 0), |m| (m.mem_total, m.mem_available.unwrap_or(0)));
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let host = usage(
            self.host_before,
            host_now,
            cpus * 1000,
            total.saturating_sub(available),
            total,
        );
        self.host_before = host_now;
        let workload = self.workload.clone().map(|source| {
            let now = self.workload_totals();
            let (used, limit, capacity) = workload_gauges(&source, host.memory_limit_bytes, cpus);
            let usage = usage(self.workload_before, now, capacity, used, limit);
            self.workload_before = now;
            usage
        });
        (host, workload)
    }

    fn workload_totals(&self) -> Totals {
        match &self.workload {
            None => Totals::default(),
            Some(WorkloadSource::Pid(pid)) => process_tree_totals(*pid),
            Some(WorkloadSource::Cgroup(path)) => cgroup_totals(path),
        }
    }
}

fn usage(
    before: Totals,
    now: Totals,
    capacity_millis: u32,
    used: u64,
    limit: u64,
) -> ResourceUsage {
    ResourceUsage {
        cpu_time_us: now.cpu_us.saturating_sub(before.cpu_us),
        cpu_capacity_millis: capacity_millis,
        memory_used_bytes: used,
        memory_limit_bytes: limit,
        net_rx_bytes: now.net_rx.saturating_sub(before.net_rx),
        net_tx_bytes: now.net_tx.saturating_sub(before.net_tx),
        disk_read_bytes: now.disk_read.saturating_sub(before.disk_read),
        disk_write_bytes: now.disk_write.saturating_sub(before.disk_write),
    }
}

fn host_totals() -> Totals {
    // Busy = every state but idle and iowait.
    let cpu_ms = KernelStats::current().map_or(0, |k| {
        let t = k.total;
        t.user_ms()
            + t.nice_ms()
            + t.system_ms()
            + t.irq_ms().unwrap_or(0)
            + t.softirq_ms().unwrap_or(0)
            + t.steal_ms().unwrap_or(0)
    });
    let (net_rx, net_tx) = procfs::net::dev_status().map_or((0, 0), |d| net_dev(d.values()));
    let (disk_read, disk_write) = DiskStats::current().map_or((0, 0), |d| whole_disks(&d));
    Totals {
        cpu_us: cpu_ms * 1000,
        net_rx,
        net_tx,
        disk_read,
        disk_write,
    }
}

/// Received and sent bytes of every interface but loopback (in the reader's namespace).
fn net_dev<'a>(devices: impl Iterator<Item = &'a DeviceStatus>) -> (u64, u64) {
    devices
        .filter(|d| d.name != "lo")
        .fold((0, 0), |(r, t), d| (r + d.recv_bytes, t + d.sent_bytes))
}

/// Bytes read and written by whole disks (partitions would count twice).
fn whole_disks(stats: &DiskStats) -> (u64, u64) {
    stats
        .0
        .iter()
        .filter(|d| {
            !d.name.starts_with("loop")
                && !d.name.starts_with("ram")
                && std::path::Path::new("/sys/block").join(&d.name).exists()
        })
        .fold((0, 0), |(r, w), d| {
            (r + d.sectors_read * 512, w + d.sectors_written * 512)
        })
}

fn process_tree_totals(root: u32) -> Totals {
    let tps = procfs::ticks_per_second();
    // (pid, parent, CPU ticks) of every process readable now. Each `Process` holds its /proc
    // directory open, so only the tree's members are opened again below: a host with more
    // processes than the agent's file limit must not run it out of descriptors.
    let processes: Vec<(i32, i32, u64)> = procfs::process::all_processes()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let stat = p.ok()?.stat().ok()?;
            Some((stat.pid, stat.ppid, stat.utime + stat.stime))
        })
        .collect();
    let root = i32::try_from(root).unwrap_or(i32::MAX);
    let mut members = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, ppid, _) in &processes {
            if members.contains(ppid) && !members.contains(pid) {
                members.push(*pid);
                grew = true;
            }
        }
    }
    let mut totals = Totals::default();
    for (pid, _, ticks) in processes.iter().filter(|(p, _, _)| members.contains(p)) {
        totals.cpu_us += ticks * 1_000_000 / tps;
        let Ok(process) = procfs::process::Process::new(*pid) else {
            continue;
        };
        if let Ok(io) = process.io() {
            totals.disk_read += io.read_bytes;
            totals.disk_write += io.write_bytes;
        }
        if *pid == root {
            (totals.net_rx, totals.net_tx) =
                process.dev_status().map_or((0, 0), |d| net_dev(d.values()));
        }
    }
    totals
}

fn cgroup_dir(path: &std::path::Path, controller: &str) -> PathBuf {
    let root = std::path::Path::new("/sys/fs/cgroup");
    let relative = path.strip_prefix(root).unwrap_or(path);
    let v1 = root
        .join(controller)
        .join(relative.strip_prefix(controller).unwrap_or(relative));
    if v1.exists() { v1 } else { root.join(relative) }
}

fn cgroup_totals(path: &std::path::Path) -> Totals {
    let v2 = read(cgroup_dir(path, "unified").join("cpu.stat"));
    let cpu_us = field(&v2, "usage_usec").unwrap_or_else(|| {
        let ns: u64 = read(cgroup_dir(path, "cpuacct").join("cpuacct.usage"))
            .trim()
            .parse()
            .unwrap_or(0);
        ns / 1000
    });
    Totals {
        cpu_us,
        ..Totals::default()
    }
}

fn workload_gauges(source: &WorkloadSource, host_memory: u64, cpus: u32) -> (u64, u64, u32) {
    match source {
        WorkloadSource::Pid(pid) => {
            let rss_kib = i32::try_from(*pid)
                .ok()
                .and_then(|pid| {
                    procfs::process::Process::new(pid)
                        .ok()?
                        .status()
                        .ok()?
                        .vmrss
                })
                .unwrap_or(0);
            (rss_kib * 1024, host_memory, cpus * 1000)
        }
        WorkloadSource::Cgroup(path) => {
            let number = |file: PathBuf| read(file).trim().parse::<u64>().ok();
            let mem = cgroup_dir(path, "memory");
            let used = number(mem.join("memory.current"))
                .or_else(|| number(mem.join("memory.usage_in_bytes")))
                .unwrap_or(0);
            let limit = number(mem.join("memory.max"))
                .or_else(|| number(mem.join("memory.limit_in_bytes")))
                .unwrap_or(host_memory)
                .min(host_memory);
            let cpu = cgroup_dir(path, "cpu");
            let quota: Option<(i64, i64)> = read(cpu.join("cpu.max"))
                .split_once(' ')
                .and_then(|(q, p)| Some((q.parse().ok()?, p.trim().parse().ok()?)))
                .or_else(|| {
                    let q = read(cpu.join("cpu.cfs_quota_us")).trim().parse().ok()?;
                    let p = read(cpu.join("cpu.cfs_period_us")).trim().parse().ok()?;
                    Some((q, p))
                });
            let capacity = match quota {
                Some((q, p)) if q > 0 && p > 0 => (q * 1000 / p) as u32,
                _ => cpus * 1000,
            };
            (used, limit, capacity.min(cpus * 1000))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_dev_sums_every_interface_but_loopback() {
        let text = "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes\n    lo: 100 1 0 0 0 0 0 0 100 1 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n  eth1: 5 1 0 0 0 0 0 0 7 1 0 0 0 0 0 0\n";
        let devices = <procfs::net::InterfaceDeviceStatus as procfs::FromBufRead>::from_buf_read(
            text.as_bytes(),
        )
        .expect("a /proc/net/dev table");
        assert_eq!(net_dev(devices.0.values()), (1005, 2007));
    }

    #[test]
    fn a_busy_process_tree_shows_cpu_time() {
        use std::os::unix::process::CommandExt as _;
        // The child spins until killed: a bounded loop finished before the sample on a quiet
        // machine, and the tree then had nothing left to measure. Its own process group, so
        // the kill reaches the grandchild too.
        let mut busy = std::process::Command::new("sh")
            .args(["-c", "sh -c 'while :; do :; done' & wait"])
            .process_group(0)
            .spawn()
            .expect("spawn");
        let mut sampler = ResourceSampler::new(Some(WorkloadSource::Pid(busy.id())));
        std::thread::sleep(std::time::Duration::from_millis(400));
        let (host, workload) = sampler.sample();
        let group = nix::unistd::Pid::from_raw(i32::try_from(busy.id()).expect("pid"));
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = busy.wait();
        let workload = workload.expect("workload usage");
        assert!(
            workload.cpu_time_us >= 100_000,
            "child's busy loop not seen: {workload:?}"
        );
        assert!(
            host.cpu_time_us >= workload.cpu_time_us / 2,
            "host {host:?}"
        );
        assert!(host.memory_limit_bytes > 0 && host.memory_used_bytes > 0);
    }
}
