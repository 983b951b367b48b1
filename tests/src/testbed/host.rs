//! Hosts: network namespaces with addresses, links between them, processes inside them.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsFd as _,
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex, Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::{
    sched::{CloneFlags, setns},
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use super::TestbedError;

/// Prefix of every namespace the testbed creates: `dpl-<pid>-<n>-<label>`.
const NETNS_PREFIX: &str = "dpl-";
static NEXT_ID: AtomicU32 = AtomicU32::new(1);
static SWEEP_STALE: Once = Once::new();

fn next_id() -> u32 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Runs a command to completion; a non-zero exit is an error carrying its stderr.
pub(crate) fn run(command: &mut Command) -> Result<Output, TestbedError> {
    let line = format!("{command:?}");
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| TestbedError::Spawn {
            command: line.clone(),
            source,
        })?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(TestbedError::Command {
            command: line,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn ip(args: &[&str]) -> Result<Output, TestbedError> {
    run(Command::new("ip").args(args))
}

/// Deletes namespaces left by testbed processes that died without running their guards
/// (SIGKILL, a crashed CI run). Names carry the creating pid, so live runs are never touched.
fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|r| r.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            kill_all_in(&name);
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

fn kill_all_in(netns: &str) {
    if let Ok(out) = ip(&["netns", "pids", netns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// A host of the testbed: one network namespace with loopback up. Dropping it kills every
/// process still inside and deletes the namespace, which deletes its interfaces.
#[derive(Debug)]
pub struct Host {
    label: String,
    netns: String,
    next_iface: AtomicU32,
    process_groups: Mutex<Vec<Pid>>,
}

impl Host {
    /// Creates a host; `label` only makes names readable (`client`, `live`, …).
    pub fn new(label: &str) -> Result<Self, TestbedError> {
        SWEEP_STALE.call_once(sweep_stale_namespaces);
        let netns = format!("{NETNS_PREFIX}{}-{}-{label}", std::process::id(), next_id());
        ip(&["netns", "add", &netns])?;
        let host = Self {
            label: label.to_owned(),
            netns,
            next_iface: AtomicU32::new(0),
            process_groups: Mutex::new(Vec::new()),
        };
        host.ip(&["link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// The label given at creation.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The network namespace's name (for `ip netns exec`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Runs `ip -n <netns> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let mut full = vec!["-n", self.netns.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs a program inside the host to completion and returns its output.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output, TestbedError> {
        run(self.command(program).args(args))
    }

    /// A command that runs `program` inside the host; add arguments, environment and stdio,
    /// then start it with [`Host::spawn`].
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns, program]);
        command
    }

    /// Like [`Host::command`], but entering only the network namespace (`nsenter --net`):
    /// `ip netns exec` also remounts `/sys`, which hides the cgroup hierarchy from programs that
    /// manage cgroups themselves (the coordinator's local shadow provisioner).
    pub fn command_net_only(&self, program: &str) -> Command {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program);
        command
    }

    /// Starts a command made by [`Host::command`] in its own process group, so it and its
    /// children can be stopped together.
    pub fn spawn(&self, mut command: Command) -> Result<Process, TestbedError> {
        use std::os::unix::process::CommandExt as _;
        let line = format!("{command:?}");
        let child = command
            .process_group(0)
            .spawn()
            .map_err(|source| TestbedError::Spawn {
                command: line.clone(),
                source,
            })?;
        let pgid = Pid::from_raw(child.id().cast_signed());
        self.process_groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pgid);
        Ok(Process {
            child,
            pgid,
            command: line,
        })
    }

    /// Moves the calling thread into this host's network namespace until the guard drops.
    /// Sockets and eBPF attachments made meanwhile belong to the host.
    pub fn enter(&self) -> Result<NetnsGuard, TestbedError> {
        let io = |what: String| move |source| TestbedError::Io { what, source };
        let original = File::open("/proc/thread-self/ns/net")
            .map_err(io("opening this thread's network namespace".into()))?;
        let target = File::open(format!("/run/netns/{}", self.netns))
            .map_err(io(format!("opening namespace {}", self.netns)))?;
        setns(target.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| TestbedError::Setns {
            netns: self.netns.clone(),
            source,
        })?;
        Ok(NetnsGuard { original })
    }

    /// Adds a route to `destination` (a prefix such as `10.1.0.0/24`) through `via`.
    pub fn route(&self, destination: &str, via: IpAddr) -> Result<(), TestbedError> {
        self.ip(&["route", "add", destination, "via", &via.to_string()])
            .map(drop)
    }

    /// Sets a sysctl inside the host (`net.*` keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TestbedError> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    fn next_iface_name(&self) -> String {
        format!("veth{}", self.next_iface.fetch_add(1, Ordering::Relaxed))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for pgid in self
            .process_groups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
        // Daemons that left our process group (nginx, redis --daemonize) are still in the
        // namespace; `ip netns pids` finds them.
        kill_all_in(&self.netns);
        let _ = ip(&["netns", "del", &self.netns]);
    }
}

/// A veth pair between two hosts, with an IPv4 /24 and an IPv6 /64 on it.
#[derive(Clone, Debug)]
pub struct Link {
    /// Interface name on the first host.
    pub a_iface: String,
    /// Interface name on the second host.
    pub b_iface: String,
    /// IPv4 address of the first host on this link.
    pub a_v4: Ipv4Addr,
    /// IPv4 address of the second host on this link.
    pub b_v4: Ipv4Addr,
    /// IPv6 address of the first host on this link.
    pub a_v6: Ipv6Addr,
    /// IPv6 address of the second host on this link.
    pub b_v6: Ipv6Addr,
}

impl Link {
    /// Joins `a` and `b` with a veth pair and addresses both ends. The pair is created directly
    /// inside the two namespaces, so no name ever appears in the root namespace.
    pub fn new(a: &Host, b: &Host) -> Result<Self, TestbedError> {
        let id = next_id();
        let (hi, lo) = ((id >> 8) & 0x3f, id & 0xff);
        let a_v4 = Ipv4Addr::new(10, 64 + hi as u8, lo as u8, 1);
        let b_v4 = Ipv4Addr::new(10, 64 + hi as u8, lo as u8, 2);
        let a_v6 = Ipv6Addr::new(0xfd00, 0xd0, id as u16, 0, 0, 0, 0, 1);
        let b_v6 = Ipv6Addr::new(0xfd00, 0xd0, id as u16, 0, 0, 0, 0, 2);
        let (a_iface, b_iface) = (a.next_iface_name(), b.next_iface_name());
        ip(&[
            "link", "add", &a_iface, "netns", &a.netns, "type", "veth", "peer", "name", &b_iface,
            "netns", &b.netns,
        ])?;
        for (host, iface, v4, v6) in [(a, &a_iface, a_v4, a_v6), (b, &b_iface, b_v4, b_v6)] {
            host.ip(&["addr", "add", &format!("{v4}/24"), "dev", iface])?;
            // `nodad`: the address is usable at once instead of after duplicate detection.
            host.ip(&["addr", "add", &format!("{v6}/64"), "dev", iface, "nodad"])?;
            host.ip(&["link", "set", iface, "up"])?;
        }
        Ok(Self {
            a_iface,
            b_iface,
            a_v4,
            b_v4,
            a_v6,
            b_v6,
        })
    }
}

/// While alive, the thread that made it is inside a host's network namespace.
#[derive(Debug)]
pub struct NetnsGuard {
    original: File,
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // Failing to return would leave this test thread in a namespace that is about to be
        // deleted; nothing sensible can continue.
        setns(self.original.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("returning to the original network namespace");
    }
}

/// A process started inside a host. Dropping it sends SIGTERM to its process group, waits a
/// moment, then SIGKILLs what is left.
#[derive(Debug)]
pub struct Process {
    child: Child,
    pgid: Pid,
    command: String,
}

impl Process {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child, for its stdio pipes.
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: Signal) {
        let _ = killpg(self.pgid, signal);
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns the exit status.
    pub fn stop(&mut self, grace: Duration) -> std::process::ExitStatus {
        self.signal(Signal::SIGTERM);
        if let Some(status) = self.wait_timeout(grace) {
            return status;
        }
        self.signal(Signal::SIGKILL);
        self.child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.command))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop(Duration::from_secs(2));
        }
    }
}

impl Host {
    /// The MAC address of `iface`.
    pub fn mac(&self, iface: &str) -> Result<String, TestbedError> {
        let out = self.ip(&["-br", "link", "show", "dev", iface])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(2)
            .map(str::to_owned)
            .ok_or_else(|| TestbedError::Command {
                command: format!("ip -n {} -br link show dev {iface}", self.netns),
                stderr: format!("no MAC in {text:?}"),
            })
    }
}

impl Link {
    /// Makes the link carry only what a test sends: IPv6 off (no neighbour discovery, router
    /// solicitations or MLD reports) and permanent ARP entries both ways (no ARP). Tests that
    /// count packets exactly need this.
    pub fn make_quiet(&self, a: &Host, b: &Host) -> Result<(), TestbedError> {
        let (a_mac, b_mac) = (a.mac(&self.a_iface)?, b.mac(&self.b_iface)?);
        for (host, iface, peer, peer_mac) in [
            (a, &self.a_iface, self.b_v4, &b_mac),
            (b, &self.b_iface, self.a_v4, &a_mac),
        ] {
            host.sysctl(&format!("net.ipv6.conf.{iface}.disable_ipv6"), "1")?;
            host.ip(&[
                "neigh",
                "replace",
                &peer.to_string(),
                "lladdr",
                peer_mac,
                "dev",
                iface,
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }
}
