//! The systemd units in `agent/systemd/` and `coordinator/systemd/`: `systemd-analyze verify`
//! accepts them without a warning, they carry the hardening they promise, and the agent unit's
//! capability set is enough to run both roles: each is started with exactly that set, as an
//! unprivileged user, through `setpriv` (systemd is not PID 1 on the test machines, so
//! `systemd-run` cannot start the unit itself), and must load and attach its eBPF programs and
//! create its VXLAN device. Without CAP_PERFMON the load must fail, so the check can fail.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
    sync::mpsc,
    time::Duration,
};

use doppel_tests::testbed::{Host, Link, privileged_or_skip, workspace_binary};

fn repo_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

const AGENT_UNIT: &str = "agent/systemd/doppel-agent.service";
const COORDINATOR_UNIT: &str = "coordinator/systemd/doppel-coordinator.service";

/// The `[Service]` settings of a unit, in order (keys may repeat).
fn service_settings(unit: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_file(unit)).expect("read unit");
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('[') {
            section = line.to_owned();
        } else if section == "[Service]" {
            let (key, value) = line.split_once('=').expect("KEY=VALUE");
            settings.push((key.to_owned(), value.to_owned()));
        }
    }
    settings
}

fn setting(settings: &[(String, String)], key: &str) -> String {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("{key}= is not set"))
}

fn capability_set(settings: &[(String, String)], key: &str) -> BTreeSet<String> {
    setting(settings, key)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The agent unit's capabilities.
fn agent_capabilities() -> BTreeSet<String> {
    capability_set(&service_settings(AGENT_UNIT), "AmbientCapabilities")
}

#[test]
fn systemd_analyze_verify_accepts_both_units_without_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The units start /usr/local/bin/…; verify checks that ExecStart is executable, so a copy
    // points at the binaries this workspace built.
    for (unit, binary) in [(AGENT_UNIT, "doppel-agent"), (COORDINATOR_UNIT, "doppel")] {
        let text = std::fs::read_to_string(repo_file(unit)).expect("read unit");
        let installed = format!("/usr/local/bin/{binary} ");
        assert!(text.contains(&installed), "{unit} starts {installed}");
        let built = format!("{} ", workspace_binary(binary).display());
        let name = Path::new(unit).file_name().expect("name");
        std::fs::write(dir.path().join(name), text.replace(&installed, &built)).expect("copy");
    }
    let units: Vec<PathBuf> = ["doppel-agent.service", "doppel-coordinator.service"]
        .iter()
        .map(|n| dir.path().join(n))
        .collect();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .env("SYSTEMD_LOG_LEVEL", "info")
        .output()
        .expect("systemd-analyze (Debian package systemd) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_units: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("doppel-agent") || l.contains("doppel-coordinator"))
        .collect();
    assert!(
        out.status.success() && about_units.is_empty(),
        "systemd-analyze verify: {:?}\n{stderr}",
        out.status
    );
}

#[test]
fn the_agent_unit_is_least_privilege_and_hardened() {
    let s = service_settings(AGENT_UNIT);
    let wanted: BTreeSet<String> = ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]
        .map(str::to_owned)
        .into();
    assert_eq!(capability_set(&s, "AmbientCapabilities"), wanted);
    assert_eq!(capability_set(&s, "CapabilityBoundingSet"), wanted);
    assert_ne!(setting(&s, "User"), "root");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("ProtectKernelModules", "yes"),
        ("ProtectKernelTunables", "yes"),
        ("ProtectControlGroups", "yes"),
        (
            "RestrictAddressFamilies",
            "AF_INET AF_INET6 AF_NETLINK AF_UNIX",
        ),
        ("RestrictNamespaces", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallArchitectures", "native"),
        ("Restart", "on-failure"),
        ("ExecReload", "kill -HUP $MAINPID"),
        ("StateDirectory", "doppel-agent"),
        ("RuntimeDirectory", "doppel-agent"),
        ("ReadWritePaths", "/var/lib/doppel-agent"),
        (
            "ExecStart",
            "/usr/local/bin/doppel-agent --config /etc/doppel/agent.toml",
        ),
    ] {
        assert_eq!(setting(&s, key), value, "{key}=");
    }
}

#[test]
fn the_coordinator_unit_has_no_capabilities_and_is_hardened() {
    let s = service_settings(COORDINATOR_UNIT);
    assert!(capability_set(&s, "CapabilityBoundingSet").is_empty());
    assert!(capability_set(&s, "AmbientCapabilities").is_empty());
    assert_eq!(setting(&s, "User"), "doppel");
    for (key, value) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("PrivateUsers", "yes"),
        ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
        ("SystemCallArchitectures", "native"),
        ("Restart", "on-failure"),
        ("StateDirectory", "doppel"),
        ("ReadWritePaths", "/var/lib/doppel"),
    ] {
        assert_eq!(setting(&s, key), value, "{key}=");
    }
    assert!(
        setting(&s, "ExecStart")
            .starts_with("/usr/local/bin/doppel --state-dir /var/lib/doppel serve")
    );
}

/// What an agent started with a capability set did.
#[derive(Debug)]
enum Outcome {
    /// Printed its first report line and stopped cleanly on SIGTERM.
    Ran { first_line: serde_json::Value },
    /// Exited by itself; its stderr.
    Failed { stderr: String },
}

/// Starts `doppel-agent --config` inside `host` as user/group 65534 (nobody) with exactly
/// `caps` (ambient, inheritable and bounding sets) and no new privileges, as systemd would
/// with the unit's `User=`, `AmbientCapabilities=`, `CapabilityBoundingSet=` and
/// `NoNewPrivileges=`.
fn run_with_capabilities(
    host: &Host,
    label: &str,
    config: &str,
    caps: &BTreeSet<String>,
) -> Outcome {
    // World-readable: the agent runs as nobody.
    let path = std::env::temp_dir().join(format!(
        "doppel-caps-{label}-{}-{}.toml",
        std::process::id(),
        host.netns()
    ));
    std::fs::write(&path, config).expect("config");
    let set: String = std::iter::once("-all".to_owned())
        .chain(
            caps.iter()
                .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_ascii_lowercase())),
        )
        .collect::<Vec<_>>()
        .join(",");
    // The claims' directory, as systemd's RuntimeDirectory= would hand it to the unit's user.
    let run_dir = tempfile::tempdir().expect("run dir");
    nix::unistd::chown(
        run_dir.path(),
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .expect("chown run dir");
    let mut command = host.command("setpriv");
    command
        .env(doppel_agent::ownership::RUN_DIR_ENV, run_dir.path())
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg("--no-new-privs")
        .arg(workspace_binary("doppel-agent"))
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut process = host.spawn(command).expect("spawn setpriv doppel-agent");
    let stdout = process.child_mut().stdout.take().expect("stdout");
    let mut stderr = process.child_mut().stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel();
    // Reads every line, not just the first: a closed pipe would make the agent's last report
    // fail to print.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let outcome = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => {
            let status = process.stop(Duration::from_secs(10));
            assert!(
                status.success(),
                "{label}: exit status after SIGTERM {status:?}"
            );
            Outcome::Ran {
                first_line: serde_json::from_str(&line).expect("a JSON report line"),
            }
        }
        Err(_) => {
            let status = process.stop(Duration::from_secs(5));
            assert!(
                !status.success(),
                "{label} printed nothing yet exited cleanly"
            );
            Outcome::Failed {
                stderr: errors.join().expect("stderr"),
            }
        }
    };
    let _ = std::fs::remove_file(&path);
    outcome
}

fn live_config(link: &Link) -> String {
    format!(
        "interface = \"{iface}\"\nreport_interval_ms = 200\ndefault_sample_percent = 100.0\n\
         vxlan = {{ device = \"dvx{pid}\" }}\n[[services]]\naddr = \"{addr}\"\nport = 8080\n\
         [[mirror_sessions]]\nshadow = \"{peer}\"\nvni = 7\n",
        iface = link.b_iface,
        addr = link.b_v4,
        peer = link.a_v4,
        pid = std::process::id() % 100_000,
    )
}

#[test]
fn the_agent_units_capabilities_are_enough_to_load_and_attach_both_roles() {
    if !privileged_or_skip("the_agent_units_capabilities_are_enough_to_load_and_attach_both_roles")
    {
        return;
    }
    let caps = agent_capabilities();
    let other = Host::new("capsa").expect("host");
    let host = Host::new("caps").expect("host");
    let link = Link::new(&other, &host).expect("link");

    // Live: TC programs on the interface, the VXLAN device for the mirror session.
    match run_with_capabilities(&host, "live", &live_config(&link), &caps) {
        Outcome::Ran { first_line } => {
            assert_eq!(first_line["seq"], 0, "live report line: {first_line}");
        }
        Outcome::Failed { stderr } => panic!("live role with {caps:?}: {stderr}"),
    }
    // Shadow: XDP admission on the interface, TC latency on lo, the mirror socket.
    let shadow = format!(
        "role = \"shadow\"\nxdp_interface = \"{iface}\"\nreplay_addr = \"127.0.0.1\"\n\
         replay_interface = \"lo\"\nreport_interval_ms = 200\n[[sessions]]\nsource = \"{peer}\"\n\
         vni = 7\n[[services]]\nport = 8080\n",
        iface = link.b_iface,
        peer = link.a_v4,
    );
    match run_with_capabilities(&host, "shadow", &shadow, &caps) {
        Outcome::Ran { first_line } => {
            assert_eq!(
                first_line["role"], "shadow",
                "shadow report line: {first_line}"
            );
        }
        Outcome::Failed { stderr } => panic!("shadow role with {caps:?}: {stderr}"),
    }
    // Nothing left behind by either (they detached and deleted on SIGTERM).
    let links = host.run("ip", &["-o", "link"]).expect("ip link");
    assert!(
        !String::from_utf8_lossy(&links.stdout).contains("dvx"),
        "VXLAN device left behind"
    );
}

#[test]
fn without_cap_perfmon_the_programs_do_not_load() {
    if !privileged_or_skip("without_cap_perfmon_the_programs_do_not_load") {
        return;
    }
    let mut caps = agent_capabilities();
    assert!(caps.remove("CAP_PERFMON"));
    let other = Host::new("nopfa").expect("host");
    let host = Host::new("nopf").expect("host");
    let link = Link::new(&other, &host).expect("link");
    match run_with_capabilities(&host, "live-noperfmon", &live_config(&link), &caps) {
        Outcome::Ran { first_line } => {
            panic!("loaded without CAP_PERFMON ({first_line}); the unit could drop it")
        }
        Outcome::Failed { stderr } => assert!(
            stderr.contains("Permission denied"),
            "expected the verifier's EACCES: {stderr}"
        ),
    }
}
