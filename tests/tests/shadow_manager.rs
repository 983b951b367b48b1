//! The Shadow Instance Manager end to end: `doppel serve` runs inside a testbed host (whose
//! network namespace holds the shadows' bridge) and makes real shadows — persistent network
//! namespaces, v1/v2 cgroups with the VM type's limits, a real redis-server and a real shadow
//! `doppel-agent` in each — or runs real `exec` scripts that fail or hang.
//!
//! Every test has its own coordinator, state directory and host; shadow ids are random, so the
//! tests run in parallel. A guard destroys whatever a failing test left behind.

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use doppel_coordinator::{
    ca::CertificateAuthority,
    policy::WorkloadSpec,
    shadows::{
        InstanceRef, Provisioner as _,
        local::{LocalConfig, LocalProvisioner},
    },
    store::{
        Store,
        shadows::{ShadowRow, ShadowState},
    },
};
use doppel_tests::testbed::{Host, Process, privileged_or_skip, workspace_binary};
use nix::{sys::signal::Signal, unistd::Pid};
use time::OffsetDateTime;

/// The catalog: three local types of growing size and price, and the live type (no local
/// limits, so never shadowed here).
const CATALOG: &str = r#"
[[vm_types]]
name = "small"
price_per_hour = 0.10
vcpus = 1
memory_mib = 1024
local = { cpu = 0.25, memory_bytes = 268435456 }

[[vm_types]]
name = "medium"
price_per_hour = 0.20
vcpus = 2
memory_mib = 2048
benchmark_score = 2000.0
local = { cpu = 0.5, memory_bytes = 402653184 }

[[vm_types]]
name = "large"
price_per_hour = 0.40
vcpus = 4
memory_mib = 4096
local = { cpu = 1.0, memory_bytes = 536870912 }

[[vm_types]]
name = "live.type"
price_per_hour = 0.20
vcpus = 2
memory_mib = 2048
"#;

fn workload(count: u32, budget: Option<f64>) -> String {
    let budget = budget.map_or_else(String::new, |b| {
        format!("[policy.budget]\nshadow_cost_per_hour = {b}\n")
    });
    format!(
        r#"
name = "web"
services = ["10.0.0.2:6390"]

[[live]]
agent = "live-1"
vm_type = "live.type"
vxlan_source = "10.0.0.2"

[shadow]
command = "redis-server"
args = ["--port", "6390", "--bind", "127.0.0.1", "--save", "", "--dir", "{{dir}}"]
count = {count}

{budget}"#
    )
}

/// A `doppel serve` in its own state directory, inside `host` when given.
struct Coordinator {
    dir: tempfile::TempDir,
    host: Option<Host>,
    config: PathBuf,
    process: Option<Process>,
    child: Option<std::process::Child>,
    cleanup_local: bool,
}

impl Coordinator {
    fn new(label: &str, extra_config: &str, in_host: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        CertificateAuthority::in_state_dir(dir.path())
            .init(&["localhost".into()], OffsetDateTime::now_utc())
            .expect("ca init");
        let host = in_host.then(|| Host::new(label).expect("host"));
        // Inside its own host the fixed QUIC port cannot collide, and survives a restart (the
        // shadow agents' configs name it).
        let listen = if in_host {
            "quic_listen = \"0.0.0.0:7443\"\napi_listen = \"127.0.0.1:0\"\n"
        } else {
            "quic_listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\n"
        };
        let config = dir.path().join("serve.toml");
        std::fs::write(
            &config,
            format!("{listen}evaluate_interval_ms = 60000\n{extra_config}\n{CATALOG}"),
        )
        .expect("write config");
        let mut c = Self {
            dir,
            host,
            config,
            process: None,
            child: None,
            cleanup_local: in_host,
        };
        c.start();
        c
    }

    fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// `program` run in the host's network namespace only (`nsenter --net`): unlike `ip netns
    /// exec` it keeps the mount namespace, so the namespaces the coordinator adds under
    /// /run/netns are visible to everyone and outlive its restart.
    fn command(&self, program: &Path) -> Command {
        match &self.host {
            Some(host) => host.command_net_only(&program.display().to_string()),
            None => Command::new(program),
        }
    }

    fn start(&mut self) {
        let addr_file = self.state_dir().join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut command = self.command(&workspace_binary("doppel"));
        command
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("DOPPEL_LOG", "info,doppel_coordinator::shadows=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.state_dir().join("serve.log")).expect("log file"));
        match &self.host {
            Some(host) => self.process = Some(host.spawn(command).expect("spawn doppel serve")),
            None => self.child = Some(command.spawn().expect("spawn doppel serve")),
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !addr_file.exists() {
            assert!(
                Instant::now() < deadline,
                "doppel serve did not start: {}",
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait: what a restart does. Shadows stay.
    fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            let status = p.stop(Duration::from_secs(10));
            assert!(status.success(), "doppel serve exited {status:?}");
        }
        if let Some(mut child) = self.child.take() {
            let _ =
                nix::sys::signal::kill(Pid::from_raw(child.id().cast_signed()), Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("serve.log")).unwrap_or_default()
    }

    /// Runs `doppel --state-dir DIR ARGS…` next to the coordinator.
    fn doppel(&self, args: &[&str]) -> Output {
        let mut command = self.command(&workspace_binary("doppel"));
        command
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .env_remove("DOPPEL_API")
            .env_remove("DOPPEL_API_TOKEN");
        command.output().expect("run doppel")
    }

    fn doppel_ok(&self, args: &[&str]) -> String {
        let out = self.doppel(args);
        assert!(
            out.status.success(),
            "doppel {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn add_workload(&self, toml: &str) {
        let path = self.state_dir().join("web.toml");
        std::fs::write(&path, toml).expect("write workload");
        self.doppel_ok(&["workload", "add", "--file", path.to_str().expect("path")]);
    }

    /// Every instance ever made, straight from the store.
    fn rows(&self) -> Vec<ShadowRow> {
        Store::open_in(self.state_dir())
            .expect("store")
            .shadows(true)
            .expect("rows")
    }

    fn running(&self) -> Vec<ShadowRow> {
        self.rows()
            .into_iter()
            .filter(|r| r.state == ShadowState::Running)
            .collect()
    }

    fn wait_for<T>(&self, what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; rows {:#?}\nlog:\n{}",
                self.rows(),
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn spec(&self) -> WorkloadSpec {
        Store::open_in(self.state_dir())
            .expect("store")
            .workload("web")
            .expect("read")
            .expect("workload exists")
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.stop();
        if self.cleanup_local {
            // Whatever a failed test left: the provisioner's own destroy finds it by id.
            let provisioner =
                LocalProvisioner::new(LocalConfig::default(), self.state_dir().join("shadows"));
            for row in self.rows().into_iter().filter(|r| r.state.is_active()) {
                let _ = provisioner.destroy(&InstanceRef {
                    instance_id: row.id.clone(),
                    workload: row.workload.clone(),
                    vm_type: row.vm_type.clone(),
                    handle: row.handle.clone(),
                });
            }
        }
    }
}

fn netns_exists(id: &str) -> bool {
    Path::new(&format!("/run/netns/doppel-sh-{id}")).exists()
}

fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    LocalProvisioner::cgroup_dirs(id)
}

fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

fn cgroup_pids(id: &str) -> Vec<u32> {
    std::fs::read_to_string(cgroup_dirs(id)[0].join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Nothing of shadow `id` remains: namespace, bridge port, cgroup, processes, directory.
fn assert_gone(c: &Coordinator, id: &str, pids: &[u32]) {
    assert!(!netns_exists(id), "netns of {id} left");
    for dir in cgroup_dirs(id) {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || comm(*pid).is_empty(),
            "process {pid} ({}) of {id} left",
            comm(*pid)
        );
    }
    assert!(
        !c.state_dir().join("shadows").join(id).exists(),
        "directory of {id} left"
    );
    let index = CertificateAuthority::in_state_dir(c.state_dir())
        .index()
        .expect("CA index");
    let agent = format!("doppel-sh-{id}");
    assert!(
        index
            .iter()
            .filter(|cert| cert.agent == agent)
            .all(|cert| cert.revoked_at_unix.is_some()),
        "certificate of {agent} not revoked"
    );
    let host = c.host.as_ref().expect("host");
    let links = host.ip(&["-br", "link"]).expect("ip link");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains(&format!("dsh{id}")),
        "bridge port of {id} left"
    );
}

#[test]
fn a_local_shadow_is_a_netns_and_cgroup_with_the_types_limits_and_destroy_leaves_nothing() {
    if !privileged_or_skip("local shadow lifecycle") {
        return;
    }
    let c = Coordinator::new("sim-local", "", true);
    // A template pinning a type the catalog lacks is refused naming the field.
    let path = c.state_dir().join("typo.toml");
    std::fs::write(
        &path,
        workload(1, None).replace("count = 1", "count = 1\npin_in = [\"smal\"]"),
    )
    .expect("write");
    let out = c.doppel(&["workload", "add", "--file", path.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shadow.pin_in[0]"),
        "{out:?}"
    );
    c.add_workload(&workload(1, None));
    let row = c.wait_for("a running shadow", 30, || c.running().into_iter().next());
    let id = row.id.clone();

    // The namespace, its address, the bridge port in the coordinator's namespace.
    assert!(netns_exists(&id));
    let addr = row.addr.clone().expect("addr");
    let inside = Command::new("ip")
        .args([
            "-n",
            &format!("doppel-sh-{id}"),
            "-br",
            "addr",
            "show",
            "eth0",
        ])
        .output()
        .expect("ip");
    assert!(
        String::from_utf8_lossy(&inside.stdout).contains(&addr),
        "{inside:?}"
    );
    let host = c.host.as_ref().expect("host");
    let port = host
        .ip(&["-d", "link", "show", &format!("dsh{id}")])
        .expect("bridge port exists");
    assert!(
        String::from_utf8_lossy(&port.stdout).contains("master doppel-br0"),
        "{port:?}"
    );

    // The cgroup carries exactly the type's limits.
    let (cpu, memory) = match row.vm_type.as_str() {
        "small" => (25_000, 268_435_456),
        "medium" => (50_000, 402_653_184),
        "large" => (100_000, 536_870_912),
        other => panic!("unexpected type {other}"),
    };
    let dirs = cgroup_dirs(&id);
    if dirs.len() == 1 {
        assert_eq!(
            read_trimmed(&dirs[0].join("cpu.max")),
            format!("{cpu} 100000")
        );
        assert_eq!(
            read_trimmed(&dirs[0].join("memory.max")),
            memory.to_string()
        );
    } else {
        assert_eq!(
            read_trimmed(&dirs[0].join("cpu.cfs_quota_us")),
            cpu.to_string()
        );
        assert_eq!(
            read_trimmed(&dirs[1].join("memory.limit_in_bytes")),
            memory.to_string()
        );
    }

    // The workload runs in it; the shadow agent outside it (its replay work must not use the
    // type's CPU); both in the namespace.
    let mut pids = cgroup_pids(&id);
    let names: HashSet<String> = pids.iter().map(|p| comm(*p)).collect();
    assert!(names.contains("redis-server"), "{names:?}");
    assert!(!names.contains("doppel-agent"), "{names:?}");
    let agent_pid =
        u32::try_from(row.handle["agent_pid"].as_u64().expect("agent pid")).expect("pid");
    assert_eq!(comm(agent_pid), "doppel-agent");
    pids.push(agent_pid);
    let in_netns = Command::new("ip")
        .args(["netns", "pids", &format!("doppel-sh-{id}")])
        .output()
        .expect("ip netns pids");
    for pid in &pids {
        assert!(
            String::from_utf8_lossy(&in_netns.stdout)
                .split_whitespace()
                .any(|p| p == pid.to_string()),
            "{pid} not in the shadow's namespace"
        );
    }

    // The agent's config: VXLAN from the live host with the session's VNI, replay to the
    // service port, and the coordinator section with a certificate of the coordinator's CA.
    let agent_toml: toml::Table = toml::from_str(&read_trimmed(
        &c.state_dir().join("shadows").join(&id).join("agent.toml"),
    ))
    .expect("agent config");
    assert_eq!(agent_toml["role"].as_str(), Some("shadow"));
    assert_eq!(
        agent_toml["sessions"][0]["source"].as_str(),
        Some("10.0.0.2")
    );
    assert_eq!(
        agent_toml["sessions"][0]["vni"].as_integer(),
        Some(i64::from(row.vni))
    );
    assert_eq!(agent_toml["services"][0]["port"].as_integer(), Some(6390));
    assert_eq!(agent_toml["report_interval_ms"].as_integer(), Some(1000));
    assert_eq!(
        agent_toml["workload"]["cgroup"].as_str(),
        Some(format!("/sys/fs/cgroup/doppel/sh-{id}").as_str())
    );
    assert_eq!(
        agent_toml["coordinator"]["address"].as_str(),
        Some("10.213.0.1:7443")
    );
    assert!(
        Path::new(agent_toml["coordinator"]["cert"].as_str().expect("cert")).is_file(),
        "agent certificate missing"
    );

    // Registered as the workload's mirror session.
    let spec = c.wait_for("the mirror session", 10, || {
        let spec = c.spec();
        (!spec.shadows.is_empty()).then_some(spec)
    });
    assert_eq!(spec.shadows.len(), 1, "{:?}", spec.shadows);
    assert_eq!(spec.shadows[0].agent, format!("doppel-sh-{id}"));
    assert_eq!(spec.shadows[0].addr.to_string(), addr);
    assert_eq!(spec.shadows[0].vni, row.vni);

    // The CLI lists it (table and JSON).
    let table = c.doppel_ok(&["shadows"]);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("running"), "{table}");
    let listed: serde_json::Value =
        serde_json::from_str(&c.doppel_ok(&["shadows", "list", "--json"])).expect("json");
    assert_eq!(listed[0]["id"], id.as_str());

    // Pause withdraws the session; resume restores it.
    c.doppel_ok(&["shadows", "pause", &id]);
    assert!(c.spec().shadows.is_empty());
    c.doppel_ok(&["shadows", "resume", &id]);
    assert_eq!(c.spec().shadows.len(), 1);

    // Pin its type out: the manager destroys it (and makes a shadow of another type).
    c.doppel_ok(&[
        "shadows",
        "pin",
        "--workload",
        "web",
        "--type",
        &row.vm_type,
        "--out",
    ]);
    c.wait_for("the pinned-out shadow destroyed", 30, || {
        c.rows()
            .iter()
            .any(|r| r.id == id && r.state == ShadowState::Destroyed)
            .then_some(())
    });
    assert_gone(&c, &id, &pids);
    let replacement = c.wait_for("a shadow of another type", 30, || {
        c.running().into_iter().find(|r| r.vm_type != row.vm_type)
    });

    // Destroy by hand leaves nothing either.
    let pids = cgroup_pids(&replacement.id);
    c.doppel_ok(&["shadows", "destroy", &replacement.id]);
    assert_gone(&c, &replacement.id, &pids);

    // Removing the workload removes every shadow.
    c.doppel_ok(&["workload", "rm", "web"]);
    c.wait_for("no shadow left", 30, || {
        c.rows().iter().all(|r| !r.state.is_active()).then_some(())
    });
    for r in c.rows() {
        assert!(!netns_exists(&r.id), "netns of {} left", r.id);
    }
}

#[test]
fn a_killed_shadow_is_replaced_and_the_budget_is_never_exceeded() {
    if !privileged_or_skip("shadow replacement within budget") {
        return;
    }
    let c = Coordinator::new("sim-budget", "[sim]\nreconcile_interval_ms = 300\n", true);
    // Three wanted, but 0.30/h affords only small (0.10) + medium (0.20).
    c.add_workload(&workload(3, Some(0.30)));
    let first = c.wait_for("two running shadows", 40, || {
        let running = c.running();
        (running.len() == 2).then_some(running)
    });
    let mut types: Vec<&str> = first.iter().map(|r| r.vm_type.as_str()).collect();
    types.sort_unstable();
    assert_eq!(types, ["medium", "small"]);

    let victim = first[0].clone();
    let victim_pids = cgroup_pids(&victim.id);
    let workload_pid = victim.handle["workload_pid"].as_u64().expect("pid") as i32;
    nix::sys::signal::kill(Pid::from_raw(workload_pid), Signal::SIGKILL).expect("kill");

    // Until the replacement runs, never more than two shadows exist (rows and namespaces) and
    // never more than the budget is spent.
    let deadline = Instant::now() + Duration::from_secs(40);
    let replacement = loop {
        let rows = c.rows();
        let active: Vec<&ShadowRow> = rows.iter().filter(|r| r.state.is_active()).collect();
        assert!(active.len() <= 2, "more than two shadows: {active:#?}");
        let cost: f64 = active.iter().map(|r| r.price_per_hour).sum();
        assert!(cost <= 0.30 + 1e-9, "budget exceeded: {cost} {active:#?}");
        let netns = rows.iter().filter(|r| netns_exists(&r.id)).count();
        assert!(netns <= 2, "{netns} shadow namespaces exist");
        if let Some(r) = rows
            .iter()
            .find(|r| r.state == ShadowState::Running && !first.iter().any(|f| f.id == r.id))
        {
            break r.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no replacement; rows {rows:#?}\n{}",
            c.log()
        );
        thread::sleep(Duration::from_millis(30));
    };
    assert_eq!(replacement.vm_type, victim.vm_type);
    let old = c
        .rows()
        .into_iter()
        .find(|r| r.id == victim.id)
        .expect("victim row");
    assert_eq!(old.state, ShadowState::Destroyed);
    assert!(
        old.error.as_deref().unwrap_or_default().contains("dead"),
        "{old:?}"
    );
    assert_gone(&c, &victim.id, &victim_pids);
    // The history has every state change with its time.
    let events = Store::open_in(c.state_dir())
        .expect("store")
        .shadow_events(&victim.id)
        .expect("events");
    let states: Vec<ShadowState> = events.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        [
            ShadowState::Creating,
            ShadowState::Running,
            ShadowState::Destroying,
            ShadowState::Destroyed
        ]
    );
    assert!(events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    let shown = c.doppel_ok(&["shadows", "events", &victim.id]);
    assert!(shown.contains("found dead"), "{shown}");
    // The mirror sessions follow: the replacement in, the victim out.
    c.wait_for("the replacement's mirror session", 10, || {
        let agents: HashSet<String> = c.spec().shadows.into_iter().map(|s| s.agent).collect();
        (agents.contains(&replacement.agent)
            && !agents.contains(&victim.agent)
            && agents.len() == 2)
            .then_some(())
    });

    // A hand-made shadow past the budget is refused, naming the budget.
    let out = c.doppel(&["shadows", "create", "--workload", "web", "--type", "large"]);
    assert_eq!(out.status.code(), Some(65), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("budget"), "{stderr}");
    c.doppel_ok(&["workload", "rm", "web"]);
    c.wait_for("no shadow left", 30, || {
        c.rows().iter().all(|r| !r.state.is_active()).then_some(())
    });
}

#[test]
fn a_restarted_coordinator_keeps_live_shadows_and_replaces_dead_ones() {
    if !privileged_or_skip("shadow reconciliation after restart") {
        return;
    }
    let mut c = Coordinator::new("sim-restart", "[sim]\nreconcile_interval_ms = 300\n", true);
    c.add_workload(&workload(2, None));
    let before = c.wait_for("two running shadows", 40, || {
        let running = c.running();
        (running.len() == 2).then_some(running)
    });
    c.stop();
    // While the coordinator is down, one shadow dies and the other keeps running.
    let (dead, alive) = (&before[0], &before[1]);
    let alive_pids = cgroup_pids(&alive.id);
    for pid in cgroup_pids(&dead.id) {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid.cast_signed()), Signal::SIGKILL);
    }
    assert!(
        netns_exists(&alive.id),
        "a shadow must survive its coordinator"
    );
    c.start();
    let after = c.wait_for("the dead shadow replaced", 40, || {
        let running = c.running();
        (running.len() == 2 && !running.iter().any(|r| r.id == dead.id)).then_some(running)
    });
    // The live one was kept as it was: same id, same processes.
    assert!(after.iter().any(|r| r.id == alive.id), "{after:#?}");
    assert_eq!(cgroup_pids(&alive.id), alive_pids);
    assert!(!netns_exists(&dead.id));
    let expected: HashSet<String> = after.iter().map(|r| r.agent.clone()).collect();
    // The row turns `running` just before its session is registered: wait for the spec.
    c.wait_for("the mirror sessions of the running shadows", 10, || {
        let agents: HashSet<String> = c.spec().shadows.into_iter().map(|s| s.agent).collect();
        (agents == expected).then_some(())
    });
    c.doppel_ok(&["workload", "rm", "web"]);
    c.wait_for("no shadow left", 30, || {
        c.rows().iter().all(|r| !r.state.is_active()).then_some(())
    });
}

#[test]
fn shadows_are_recreated_on_schedule() {
    if !privileged_or_skip("shadow re-creation on schedule") {
        return;
    }
    let c = Coordinator::new("sim-recreate", "[sim]\nreconcile_interval_ms = 300\n", true);
    c.add_workload(&workload(1, None).replace("count = 1", "count = 1\nrecreate_every_ms = 10000"));
    let first = c.wait_for("a running shadow", 30, || c.running().into_iter().next());
    let pids = cgroup_pids(&first.id);
    let fresh = c.wait_for("a fresh shadow", 40, || {
        c.running().into_iter().find(|r| r.id != first.id)
    });
    let old = c
        .rows()
        .into_iter()
        .find(|r| r.id == first.id)
        .expect("first row");
    let events = Store::open_in(c.state_dir())
        .expect("store")
        .shadow_events(&first.id)
        .expect("events");
    assert_eq!(old.state, ShadowState::Destroyed);
    assert_eq!(
        old.error.as_deref(),
        Some("re-created on schedule"),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("destroy failed")),
        "{events:#?}"
    );
    let lived = old.updated_ms - old.running_ms.expect("ran");
    assert!((10_000..20_000).contains(&lived), "lived {lived} ms");
    assert!(
        fresh.created_ms >= old.updated_ms,
        "replacement made before the old one went"
    );
    assert_gone(&c, &first.id, &pids);
    c.doppel_ok(&["workload", "rm", "web"]);
    c.wait_for("no shadow left", 30, || {
        c.rows().iter().all(|r| !r.state.is_active()).then_some(())
    });
}

/// `exec` scripts that record what they create in `marks`; `create_tail` decides how create
/// ends after it made its mark.
fn exec_scripts(dir: &Path, create_tail: &str) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt as _;
    let marks = dir.join("marks");
    std::fs::create_dir_all(&marks).expect("marks");
    let id = r#"id=$(sed -n 's/.*"instance_id":"\([0-9a-f]*\)".*/\1/p')"#;
    let scripts = [
        (
            "create",
            format!(
                "{id}\ntouch {m}/$id\necho $$ > {m}/$id.pid\necho \"made vm for $id\" >&2\n{create_tail}",
                m = marks.display()
            ),
        ),
        (
            "destroy",
            format!(
                "{id}\n[ -n \"$id\" ] || exit 2\nrm -f {m}/$id\necho '{{}}'",
                m = marks.display()
            ),
        ),
        (
            "status",
            format!(
                "{id}\nif [ -e {m}/$id ]; then echo '{{\"state\":\"running\"}}'; else echo '{{\"state\":\"missing\"}}'; fi",
                m = marks.display()
            ),
        ),
    ];
    for (name, body) in &scripts {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let config = format!(
        "[sim]\nprovisioner = \"exec\"\nreconcile_interval_ms = 200\nretry_after_failure_ms = 600000\n\
         coordinator_address = \"127.0.0.1:7443\"\n[sim.exec]\ncreate = \"{d}/create\"\n\
         destroy = \"{d}/destroy\"\nstatus = \"{d}/status\"\ncreate_timeout_ms = 700\n",
        d = dir.display()
    );
    (marks, config)
}

fn marks_left(marks: &Path) -> Vec<String> {
    std::fs::read_dir(marks)
        .expect("marks")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".pid"))
        .collect()
}

fn exec_failure(create_tail: &str, expected: &[&str]) {
    let scripts = tempfile::tempdir().expect("tempdir");
    let (marks, config) = exec_scripts(scripts.path(), create_tail);
    let c = Coordinator::new("sim-exec", &config, false);
    // One type only, so the manager makes exactly one attempt (the next waits 10 minutes).
    c.add_workload(
        &workload(1, None).replace("count = 1", "count = 1\npin_out = [\"medium\", \"large\"]"),
    );
    // The manager's own attempt fails, is cleaned up and recorded.
    let failed = c.wait_for("a failed create", 20, || {
        c.rows()
            .into_iter()
            .find(|r| r.state == ShadowState::Failed)
    });
    let error = failed.error.clone().unwrap_or_default();
    for text in expected {
        assert!(error.contains(text), "{text:?} not in {error:?}");
    }
    assert!(
        marks_left(&marks).is_empty(),
        "half-made: {:?}",
        marks_left(&marks)
    );
    let pid: i32 = read_trimmed(&marks.join(format!("{}.pid", failed.id)))
        .parse()
        .expect("pid");
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || comm(pid.cast_unsigned()).is_empty(),
        "the create script is still running"
    );
    assert!(c.spec().shadows.is_empty());
    // The shadow routes are behind the API token like every other.
    let addr = read_trimmed(&c.state_dir().join("api.addr"));
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect to the API");
    std::io::Write::write_all(
        &mut stream,
        b"GET /v1/shadows HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .expect("send");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    // By hand: a clear error on the command line, and nothing left either.
    let out = c.doppel(&["shadows", "create", "--workload", "web", "--type", "small"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for text in expected {
        assert!(stderr.contains(text), "{text:?} not in {stderr}");
    }
    assert!(
        marks_left(&marks).is_empty(),
        "half-made: {:?}",
        marks_left(&marks)
    );
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&c.doppel_ok(&["shadows", "list", "--all", "--json"])).expect("json");
    assert_eq!(list.len(), 2, "{list:#?}");
    assert!(list.iter().all(|r| r["state"] == "failed"), "{list:#?}");
}

#[test]
fn an_exec_create_that_fails_gives_its_exit_status_and_stderr_and_leaves_nothing() {
    exec_failure(
        "echo 'cloud says: quota exceeded' >&2\nexit 3",
        &["exit status: 3", "quota exceeded"],
    );
}

#[test]
fn an_exec_create_that_hangs_is_killed_at_its_timeout_and_leaves_nothing() {
    exec_failure("sleep 60", &["timed out after 700 ms", "made vm for"]);
}

#[test]
fn a_bad_catalog_or_sim_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (config, field) in [
        (
            "[[vm_types]]\nname = \"x\"\nprice_per_hour = 1.0\nvcpus = 1\nmemory_mib = 512\nlocal = { cpu = 0.0, memory_bytes = 268435456 }\n",
            "vm_types[0].local.cpu",
        ),
        ("[sim.local]\nsubnet = \"8.8.8.0/24\"\n", "sim.local.subnet"),
        ("[sim]\nprovisioner = \"exec\"\n", "sim.exec"),
    ] {
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, config).expect("write");
        let out = Command::new(workspace_binary("doppel"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .expect("run");
        assert_eq!(
            out.status.code(),
            Some(78),
            "EX_CONFIG, as the agent: {out:?}"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("`{field}`")), "{field}: {stderr}");
    }
}
