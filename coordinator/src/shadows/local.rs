//! The `local` provisioner: a shadow instance on this host, standing for a VM type.
//!
//! An instance `ID` is
//! - a persistent network namespace `doppel-sh-ID` whose `eth0` is one end of a veth pair; the
//!   other end, `dshID`, is a port of a Linux bridge in the coordinator's own network namespace
//!   that holds the gateway address of a private subnet. Nothing is routed or NATed anywhere
//!   else: the shadow reaches the coordinator (and the coordinator's namespace reaches it), and
//!   mirror traffic reaches it only where the operator routes the subnet;
//! - a cgroup `doppel/sh-ID` (v2, or the v1 `cpu` and `memory` controllers where that is what
//!   the host has) whose CPU quota and memory limit are the VM type's `local` limits;
//! - inside both, the workload's shadow command and a shadow-role `doppel-agent` whose config is
//!   written here: VXLAN on UDP 4789, admitting the live hosts' sources with the session's VNI,
//!   replay to 127.0.0.1 on the service ports, reporting to the coordinator with a certificate of
//!   its CA;
//! - a directory `STATE/shadows/ID` with that config, the certificate, the logs and the spool.
//!
//! Every name derives from the id, so `destroy` finds everything even after a create that failed
//! half-way or a coordinator restart, and removes all of it: processes, cgroup, namespace (which
//! takes the veth pair with it) and directory. The namespace and processes do not depend on the
//! coordinator process, so shadows survive its restart.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde::{Deserialize, Serialize};

use super::{
    CreateRequest, Created, InstanceHealth, InstanceRef, InvalidSimConfig, ProvisionError,
    Provisioner, VmType, invalid_sim, tail,
};

/// Prefix of a shadow's network namespace.
pub const NETNS_PREFIX: &str = "doppel-sh-";
/// Prefix of a shadow's bridge port (`dsh` + 8 hex digits fits the 15-byte interface name).
pub const VETH_PREFIX: &str = "dsh";
/// Parent cgroup of every shadow, per hierarchy.
pub const CGROUP_PARENT: &str = "doppel";
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// CFS period used for the quota.
const CPU_PERIOD_US: u64 = 100_000;
/// How long a new shadow's processes must stay up before create reports success.
const STARTUP_GRACE: Duration = Duration::from_millis(500);

/// The `[sim.local]` section.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// The bridge in the coordinator's network namespace (created when first needed).
    pub bridge: String,
    /// The private IPv4 subnet of the shadows, `ADDR/LEN`.
    pub subnet: String,
    /// The bridge's address in it: the shadows' gateway and their way to the coordinator.
    pub gateway: Ipv4Addr,
    /// First and last address given to shadows.
    pub pool: [Ipv4Addr; 2],
    /// The `doppel-agent` binary (default: next to `doppel`, else on `PATH`).
    pub agent_binary: Option<PathBuf>,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            bridge: "doppel-br0".to_owned(),
            subnet: "10.213.0.0/24".to_owned(),
            gateway: Ipv4Addr::new(10, 213, 0, 1),
            pool: [
                Ipv4Addr::new(10, 213, 0, 10),
                Ipv4Addr::new(10, 213, 0, 250),
            ],
            agent_binary: None,
        }
    }
}

fn parse_subnet(text: &str) -> Option<(Ipv4Addr, u8)> {
    let (addr, len) = text.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    (len <= 32).then_some((addr, len))
}

fn in_subnet(addr: Ipv4Addr, (net, len): (Ipv4Addr, u8)) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(addr) & mask == u32::from(net) & mask
}

impl LocalConfig {
    /// Checks the network settings: a private subnet holding the gateway and the pool.
    pub fn validate(&self) -> Result<(), InvalidSimConfig> {
        if self.bridge.is_empty() || self.bridge.len() > 15 {
            return Err(invalid_sim(
                "local.bridge",
                "an interface name has 1 to 15 bytes",
            ));
        }
        let Some(subnet) = parse_subnet(&self.subnet) else {
            return Err(invalid_sim("local.subnet", "not an IPv4 ADDR/LEN"));
        };
        if !(8..=30).contains(&subnet.1) {
            return Err(invalid_sim("local.subnet", "prefix length must be 8..=30"));
        }
        let private = [
            ((Ipv4Addr::new(10, 0, 0, 0)), 8),
            ((Ipv4Addr::new(172, 16, 0, 0)), 12),
            ((Ipv4Addr::new(192, 168, 0, 0)), 16),
        ];
        // A shadow subnet must never overlap anything routable: only RFC 1918 space.
        if !private
            .iter()
            .any(|&p| in_subnet(subnet.0, p) && subnet.1 >= p.1)
        {
            return Err(invalid_sim(
                "local.subnet",
                "use a private (RFC 1918) subnet: shadows must not be reachable from outside",
            ));
        }
        if !in_subnet(self.gateway, subnet) {
            return Err(invalid_sim("local.gateway", "not inside local.subnet"));
        }
        let [first, last] = self.pool;
        if !in_subnet(first, subnet) || !in_subnet(last, subnet) || first > last {
            return Err(invalid_sim(
                "local.pool",
                "give [first, last] inside local.subnet, first <= last",
            ));
        }
        if (first..=last).contains(&self.gateway) {
            return Err(invalid_sim("local.pool", "must not contain local.gateway"));
        }
        if let Some(agent) = &self.agent_binary
            && !agent.is_file()
        {
            return Err(invalid_sim(
                "local.agent_binary",
                format!("{} is not a file", agent.display()),
            ));
        }
        Ok(())
    }

    fn prefix_len(&self) -> u8 {
        parse_subnet(&self.subnet).map_or(24, |s| s.1)
    }
}

/// What `create` made, kept by the manager and given back to `status` and `destroy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalHandle {
    /// The network namespace.
    pub netns: String,
    /// The bridge port.
    pub veth: String,
    /// The shadow's address.
    pub addr: Ipv4Addr,
    /// The cgroup's directories (one per hierarchy).
    pub cgroups: Vec<PathBuf>,
    /// The instance directory.
    pub dir: PathBuf,
    /// The workload's process.
    pub workload_pid: u32,
    /// The shadow agent's process.
    pub agent_pid: u32,
}

/// Shadows as namespaces and cgroups on this host.
#[derive(Debug)]
pub struct LocalProvisioner {
    config: LocalConfig,
    /// `STATE/shadows`: one directory per instance.
    root: PathBuf,
    /// Address allocation reads the instance directories; one create at a time.
    allocating: Mutex<()>,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError {
    let path = path.to_owned();
    move |source| ProvisionError::Io {
        action,
        path,
        source,
    }
}

/// Runs a command to completion; a failure carries its exit status and stderr.
fn run(program: &str, args: &[&str]) -> Result<String, ProvisionError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProvisionError::Spawn {
            command: command.clone(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ProvisionError::Command {
            command,
            status: out.status.to_string(),
            stderr_tail: tail(&String::from_utf8_lossy(&out.stderr), 3),
        })
    }
}

fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn write(path: &Path, value: &str) -> Result<(), ProvisionError> {
    fs::write(path, value).map_err(io_err("cannot write", path))
}

/// Whether `pid` is a live (not zombie) process.
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name, which may itself hold spaces.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn cgroup_pids(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl LocalProvisioner {
    /// A provisioner keeping instance directories under `root`.
    pub fn new(config: LocalConfig, root: PathBuf) -> Self {
        Self {
            config,
            root,
            allocating: Mutex::new(()),
        }
    }

    /// Names of instance `id`'s namespace and bridge port.
    pub fn names(id: &str) -> (String, String) {
        (format!("{NETNS_PREFIX}{id}"), format!("{VETH_PREFIX}{id}"))
    }

    /// The cgroup directories of instance `id` on this host's hierarchy.
    pub fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
        let root = Path::new(CGROUP_ROOT);
        let name = format!("sh-{id}");
        if is_cgroup2(root) {
            vec![root.join(CGROUP_PARENT).join(name)]
        } else {
            // `cpuacct` too (where it is mounted), so the shadow agent can read the workload's
            // CPU time from the cgroup as on a v2 host; on hosts that co-mount `cpu,cpuacct`
            // both paths are the same directory.
            ["cpu", "memory", "cpuacct"]
                .iter()
                .filter(|c| **c != "cpuacct" || root.join(c).exists())
                .map(|c| root.join(c).join(CGROUP_PARENT).join(&name))
                .collect()
        }
    }

    fn agent_binary(&self) -> PathBuf {
        self.config.agent_binary.clone().unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("doppel-agent")))
                .filter(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from("doppel-agent"))
        })
    }

    fn allocate(&self, dir: &Path) -> Result<Ipv4Addr, ProvisionError> {
        let _one = self.allocating.lock().unwrap_or_else(|e| e.into_inner());
        let used: Vec<Ipv4Addr> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| fs::read_to_string(e.path().join("addr")).ok())
            .filter_map(|a| a.trim().parse().ok())
            .collect();
        let [first, last] = self.config.pool;
        let addr = (u32::from(first)..=u32::from(last))
            .map(Ipv4Addr::from)
            .find(|a| !used.contains(a))
            .ok_or(ProvisionError::PoolExhausted)?;
        let path = dir.join("addr");
        write(&path, &addr.to_string())?;
        Ok(addr)
    }

    fn ensure_bridge(&self) -> Result<(), ProvisionError> {
        let bridge = self.config.bridge.as_str();
        if run("ip", &["link", "show", "dev", bridge]).is_ok() {
            return Ok(());
        }
        run("ip", &["link", "add", "name", bridge, "type", "bridge"])?;
        let gateway = format!("{}/{}", self.config.gateway, self.config.prefix_len());
        run("ip", &["addr", "add", &gateway, "dev", bridge])?;
        run("ip", &["link", "set", "dev", bridge, "up"])?;
        Ok(())
    }

    fn make_network(&self, netns: &str, veth: &str, addr: Ipv4Addr) -> Result<(), ProvisionError> {
        self.ensure_bridge()?;
        run("ip", &["netns", "add", netns])?;
        // Created with its inner end already in the namespace: no name appears outside but the
        // bridge port.
        run(
            "ip",
            &[
                "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns,
            ],
        )?;
        run(
            "ip",
            &[
                "link",
                "set",
                "dev",
                veth,
                "master",
                &self.config.bridge,
                "up",
            ],
        )?;
        let cidr = format!("{addr}/{}", self.config.prefix_len());
        run("ip", &["-n", netns, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", netns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", netns, "link", "set", "eth0", "up"])?;
        let gateway = self.config.gateway.to_string();
        run(
            "ip",
            &["-n", netns, "route", "add", "default", "via", &gateway],
        )?;
        Ok(())
    }

    fn make_cgroup(id: &str, vm_type: &VmType) -> Result<Vec<PathBuf>, ProvisionError> {
        let limits = vm_type.local.ok_or_else(|| ProvisionError::Unsupported {
            vm_type: vm_type.name.clone(),
            reason: "the catalog gives it no `local` limits".into(),
        })?;
        let dirs = Self::cgroup_dirs(id);
        let root = Path::new(CGROUP_ROOT);
        let quota = limits.cpu_quota_us(CPU_PERIOD_US);
        if is_cgroup2(root) {
            let parent = root.join(CGROUP_PARENT);
            fs::create_dir_all(&parent).map_err(io_err("cannot create", &parent))?;
            write(&root.join("cgroup.subtree_control"), "+cpu +memory")?;
            write(&parent.join("cgroup.subtree_control"), "+cpu +memory")?;
            let dir = &dirs[0];
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
            write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
            write(&dir.join("memory.max"), &limits.memory_bytes.to_string())?;
        } else {
            for dir in &dirs {
                fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
            }
            let (cpu, memory) = (&dirs[0], &dirs[1]);
            write(&cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
            write(
                &memory.join("memory.limit_in_bytes"),
                &limits.memory_bytes.to_string(),
            )?;
        }
        Ok(dirs)
    }

    /// Starts `program args` inside `netns` and the cgroup, logging to `log`.
    fn start(
        netns: &str,
        cgroups: &[PathBuf],
        dir: &Path,
        log: &str,
        program: &str,
        args: &[String],
    ) -> Result<u32, ProvisionError> {
        use std::os::unix::process::CommandExt as _;
        let log_path = dir.join(log);
        let log_file = fs::File::create(&log_path).map_err(io_err("cannot create", &log_path))?;
        let stderr = log_file
            .try_clone()
            .map_err(io_err("cannot reuse", &log_path))?;
        let procs: Vec<String> = cgroups
            .iter()
            .map(|d| d.join("cgroup.procs").display().to_string())
            .collect();
        // The shell joins the cgroup before it becomes the program (`exec` keeps the pid, and
        // `nsenter` enters the namespace and execs too), so not one instruction of the
        // workload runs outside its limits, and no unsafe pre_exec hook is needed. `nsenter
        // --net`, not `ip netns exec`: the latter also remounts /sys, which hides the cgroup
        // hierarchy from the shadow agent that reads its VM's CPU and memory there.
        let script = "IFS=:; for f in $DOPPEL_CGROUP_PROCS; do echo $$ > \"$f\" || exit 125; \
                      done; unset IFS; exec \"$@\"";
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("doppel-shadow")
            .arg("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["--", program])
            .args(args)
            .env("DOPPEL_CGROUP_PROCS", procs.join(":"))
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(stderr)
            // Its own process group: signals to the coordinator's group (Ctrl-C, a test's
            // process guard) must not reach shadows, which outlive the coordinator.
            .process_group(0)
            .spawn()
            .map_err(|source| ProvisionError::Spawn {
                command: format!("{program} {}", args.join(" ")),
                source,
            })?;
        let pid = child.id();
        let mut child = child;
        // Reap it whenever it exits, so a dead shadow is not a zombie the status check mistakes
        // for a live one.
        thread::spawn(move || child.wait());
        Ok(pid)
    }

    fn agent_config(request: &CreateRequest, dir: &Path) -> Result<String, ProvisionError> {
        use toml::{Table, Value};
        let mut ports: Vec<u16> = request
            .services
            .iter()
            .filter_map(|s| s.parse::<std::net::SocketAddr>().ok())
            .map(|s| s.port())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let table_of = |pairs: Vec<(&str, Value)>| -> Value {
            Value::Table(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect::<Table>(),
            )
        };
        let path = |p: &Path| Value::String(p.display().to_string());
        let mut doc = Table::new();
        doc.insert("role".into(), "shadow".into());
        doc.insert("workload_name".into(), request.workload.clone().into());
        doc.insert("listen".into(), "0.0.0.0:4789".into());
        doc.insert("replay_addr".into(), "127.0.0.1".into());
        doc.insert("replay_interface".into(), "lo".into());
        doc.insert(
            "report_interval_ms".into(),
            i64::from(request.report_interval_ms).into(),
        );
        doc.insert(
            "sessions".into(),
            Value::Array(
                request
                    .live_sources
                    .iter()
                    .map(|s| {
                        table_of(vec![
                            ("source", s.to_string().into()),
                            ("vni", i64::from(request.vni).into()),
                        ])
                    })
                    .collect(),
            ),
        );
        doc.insert(
            "services".into(),
            Value::Array(
                ports
                    .iter()
                    .map(|p| table_of(vec![("port", i64::from(*p).into())]))
                    .collect(),
            ),
        );
        // The whole cgroup is the "VM": the agent reads its CPU and memory (and their limits)
        // there; given as `/sys/fs/cgroup/doppel/sh-ID`, which the agent maps onto each v1
        // controller or the v2 hierarchy.
        doc.insert(
            "workload".into(),
            table_of(vec![(
                "cgroup",
                Path::new(CGROUP_ROOT)
                    .join(CGROUP_PARENT)
                    .join(format!("sh-{}", request.instance_id))
                    .display()
                    .to_string()
                    .into(),
            )]),
        );
        let agent = &request.agent;
        doc.insert(
            "coordinator".into(),
            table_of(vec![
                ("address", agent.coordinator.to_string().into()),
                ("server_name", agent.server_name.clone().into()),
                ("ca_cert", path(&agent.ca_cert)),
                ("cert", path(&agent.cert)),
                ("key", path(&agent.key)),
                ("spool_dir", path(&dir.join("spool"))),
            ]),
        );
        toml::to_string(&doc).map_err(|e| ProvisionError::Io {
            action: "cannot render the agent config for",
            path: dir.to_owned(),
            source: std::io::Error::other(e),
        })
    }

    fn log_tail(dir: &Path, log: &str) -> String {
        tail(&fs::read_to_string(dir.join(log)).unwrap_or_default(), 5)
    }

    fn create_inner(&self, request: &CreateRequest) -> Result<Created, ProvisionError> {
        let id = &request.instance_id;
        if request.vm_type.local.is_none() {
            return Err(ProvisionError::Unsupported {
                vm_type: request.vm_type.name.clone(),
                reason: "the catalog gives it no `local` limits".into(),
            });
        }
        let dir = self.root.join(id);
        fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        let addr = self.allocate(&dir)?;
        let (netns, veth) = Self::names(id);
        self.make_network(&netns, &veth, addr)?;
        let cgroups = Self::make_cgroup(id, &request.vm_type)?;
        let substitute = |s: &str| {
            s.replace("{dir}", &dir.display().to_string())
                .replace("{addr}", &addr.to_string())
        };
        let args: Vec<String> = request.shadow.args.iter().map(|a| substitute(a)).collect();
        let command = substitute(&request.shadow.command);
        let workload_pid = Self::start(&netns, &cgroups, &dir, "workload.log", &command, &args)?;
        let config_path = dir.join("agent.toml");
        write(&config_path, &Self::agent_config(request, &dir)?)?;
        let agent = self.agent_binary();
        // The agent stays out of the type's cgroup: its replay work must not eat the CPU the VM
        // type gives the workload (the live host's agent is outside the workload's limits too),
        // or every shadow would look slower than the type really is.
        let agent_pid = Self::start(
            &netns,
            &[],
            &dir,
            "agent.log",
            &agent.display().to_string(),
            &["--config".to_owned(), config_path.display().to_string()],
        )?;
        // A command that cannot start (typo, missing library, bad config) dies at once; say so
        // now, with its log, instead of letting the first status check find a corpse.
        let deadline = Instant::now() + STARTUP_GRACE;
        while Instant::now() < deadline {
            for (pid, what, log) in [
                (workload_pid, &command, "workload.log"),
                (agent_pid, &agent.display().to_string(), "agent.log"),
            ] {
                if !alive(pid) {
                    return Err(ProvisionError::Command {
                        command: what.clone(),
                        status: "an early exit".into(),
                        stderr_tail: Self::log_tail(&dir, log),
                    });
                }
            }
            thread::sleep(Duration::from_millis(50));
        }
        let handle = LocalHandle {
            netns,
            veth,
            addr,
            cgroups,
            dir,
            workload_pid,
            agent_pid,
        };
        Ok(Created {
            addr: IpAddr::V4(addr),
            agent: None,
            handle: serde_json::to_value(&handle).map_err(ProvisionError::Json)?,
        })
    }
}

fn kill_all(pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid.cast_signed()), Signal::SIGKILL);
    }
}

impl Provisioner for LocalProvisioner {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn supports(&self, vm_type: &VmType) -> bool {
        vm_type.local.is_some()
    }

    fn create(&self, request: &CreateRequest) -> Result<Created, ProvisionError> {
        // The manager destroys after a failed create too; cleaning here as well keeps the
        // provisioner correct on its own.
        self.create_inner(request).inspect_err(|_| {
            let _ = self.destroy(&InstanceRef {
                instance_id: request.instance_id.clone(),
                workload: request.workload.clone(),
                vm_type: request.vm_type.name.clone(),
                handle: serde_json::Value::Null,
            });
        })
    }

    fn destroy(&self, instance: &InstanceRef) -> Result<(), ProvisionError> {
        let id = &instance.instance_id;
        let (netns, veth) = Self::names(id);
        let cgroups = Self::cgroup_dirs(id);
        let netns_exists = Path::new("/run/netns").join(&netns).exists();
        // Kill until the cgroup is empty: a process may fork while we kill.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut pids: Vec<u32> = cgroups.iter().flat_map(|d| cgroup_pids(d)).collect();
            if netns_exists && let Ok(out) = run("ip", &["netns", "pids", &netns]) {
                pids.extend(out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(ProvisionError::Command {
                    command: format!("kill shadow {id}"),
                    status: "processes left".into(),
                    stderr_tail: format!("{pids:?} survived SIGKILL for 5 s"),
                });
            }
            kill_all(pids);
            thread::sleep(Duration::from_millis(20));
        }
        for dir in &cgroups {
            if dir.exists() {
                // Right after the last process exits the kernel may still hold the group briefly.
                let mut result = fs::remove_dir(dir);
                for _ in 0..50 {
                    if result.is_ok() || !dir.exists() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(20));
                    result = fs::remove_dir(dir);
                }
                if dir.exists() {
                    result.map_err(io_err("cannot remove", dir))?;
                }
            }
        }
        if netns_exists {
            run("ip", &["netns", "del", &netns])?;
        }
        // Deleting the namespace deletes `eth0` and so its peer, but asynchronously (the kernel
        // tears namespaces down from a workqueue): wait for the port to go, and delete it only
        // if it stays (a failed create may have left it alone).
        let port_exists = || run("ip", &["link", "show", "dev", &veth]).is_ok();
        let deadline = Instant::now() + Duration::from_secs(2);
        while port_exists() && netns_exists && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if port_exists()
            && let Err(e) = run("ip", &["link", "del", "dev", &veth])
            && port_exists()
        {
            return Err(e);
        }
        let dir = self.root.join(id);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io_err("cannot remove", &dir))?;
        }
        Ok(())
    }

    fn status(&self, instance: &InstanceRef) -> Result<InstanceHealth, ProvisionError> {
        let id = &instance.instance_id;
        let (netns, _) = Self::names(id);
        let netns_exists = Path::new("/run/netns").join(&netns).exists();
        let cgroups = Self::cgroup_dirs(id);
        let cgroup_exists = cgroups.iter().any(|d| d.exists());
        if !netns_exists && !cgroup_exists {
            return Ok(InstanceHealth::Missing);
        }
        let handle: LocalHandle = match serde_json::from_value(instance.handle.clone()) {
            Ok(h) => h,
            // Without a handle nothing says which processes should run: not a working shadow.
            Err(_) => return Ok(InstanceHealth::Dead),
        };
        let members = cgroups.first().map(|d| cgroup_pids(d)).unwrap_or_default();
        let running = netns_exists
            && members.contains(&handle.workload_pid)
            && alive(handle.workload_pid)
            && alive(handle.agent_pid);
        Ok(if running {
            InstanceHealth::Running
        } else {
            InstanceHealth::Dead
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_network_settings_are_checked_naming_the_field() {
        LocalConfig::default().validate().expect("default is valid");
        let field = |f: &dyn Fn(&mut LocalConfig)| {
            let mut c = LocalConfig::default();
            f(&mut c);
            c.validate().expect_err("invalid").field
        };
        assert_eq!(
            field(&|c| c.subnet = "8.8.8.0/24".into()),
            "sim.local.subnet"
        );
        assert_eq!(field(&|c| c.subnet = "nonsense".into()), "sim.local.subnet");
        assert_eq!(
            field(&|c| c.gateway = Ipv4Addr::new(10, 9, 9, 1)),
            "sim.local.gateway"
        );
        assert_eq!(
            field(&|c| c.pool = [Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 9)]),
            "sim.local.pool"
        );
        assert_eq!(
            field(&|c| c.bridge = "a-very-long-bridge-name".into()),
            "sim.local.bridge"
        );
    }

    #[test]
    fn names_fit_interface_limits() {
        let (netns, veth) = LocalProvisioner::names("3fa9c2d1");
        assert_eq!(netns, "doppel-sh-3fa9c2d1");
        assert!(veth.len() <= 15, "{veth}");
    }
}
