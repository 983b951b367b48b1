//! The `exec` provisioner: the operator's own scripts create, destroy and check shadows, so
//! Terraform, a cloud CLI or kubectl can do the provisioning.
//!
//! # The contract
//!
//! Each script gets one JSON document on standard input and answers on standard output; exit
//! status 0 means success, anything else failure (its standard error's last lines are shown to
//! the operator). Each call has a timeout; past it the script's whole process group is killed.
//!
//! `create` gets
//! ```json
//! {"action": "create", "instance_id": "3fa9c2d1", "workload": "web",
//!  "vm_type": {"name": "c7.large", "price_per_hour": 0.085, "vcpus": 2, "memory_mib": 4096},
//!  "services": ["10.0.0.2:8080"],
//!  "shadow": {"command": "/usr/sbin/nginx", "args": ["..."], "count": 1, "pin_in": [], "pin_out": []},
//!  "live_sources": ["10.1.0.1"], "vni": 1000, "report_interval_ms": 1000,
//!  "agent": {"name": "doppel-sh-3fa9c2d1", "cert": "/var/lib/doppel/shadows/3fa9c2d1/doppel-sh-3fa9c2d1.crt",
//!            "key": "…", "ca_cert": "…", "coordinator": "10.0.0.1:7443", "server_name": "localhost"}}
//! ```
//! and must print `{"addr": "10.2.0.7", "agent": "doppel-sh-3fa9c2d1", "handle": {…}}`: `addr`
//! is where live agents send the mirror traffic (the shadow agent listens for VXLAN on UDP 4789
//! there, admitting `live_sources` with `vni`), `agent` the shadow agent's certificate name
//! (optional, default the one given), `handle` anything the script wants back later.
//!
//! `destroy` gets `{"action": "destroy", "instance_id", "workload", "vm_type", "handle"}` and
//! must remove everything of the instance, succeed when nothing is left, and cope with `handle`
//! being `null`: after a failed or timed-out create the manager calls destroy with the instance
//! id only, so the script must find what it half-made by that id.
//!
//! `status` gets the same document as destroy (`"action": "status"`) and prints
//! `{"state": "running" | "dead" | "missing"}`.

use std::{
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    CreateRequest, Created, InstanceHealth, InstanceRef, InvalidSimConfig, ProvisionError,
    Provisioner, VmType, invalid_sim, tail,
};

/// The `[sim.exec]` section.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExecConfig {
    /// Creates an instance.
    pub create: PathBuf,
    /// Destroys an instance.
    pub destroy: PathBuf,
    /// Reports an instance's state.
    pub status: PathBuf,
    /// Limit of one create, ms (default 10 minutes).
    pub create_timeout_ms: Option<u64>,
    /// Limit of one destroy, ms (default 5 minutes).
    pub destroy_timeout_ms: Option<u64>,
    /// Limit of one status check, ms (default 30 s).
    pub status_timeout_ms: Option<u64>,
}

impl ExecConfig {
    /// Checks that every script exists and is executable.
    pub fn validate(&self) -> Result<(), InvalidSimConfig> {
        use std::os::unix::fs::PermissionsExt as _;
        for (field, path) in [
            ("exec.create", &self.create),
            ("exec.destroy", &self.destroy),
            ("exec.status", &self.status),
        ] {
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                Ok(_) => {
                    return Err(invalid_sim(
                        field,
                        format!("{} is not an executable file", path.display()),
                    ));
                }
                Err(e) => {
                    return Err(invalid_sim(
                        field,
                        format!("cannot use {}: {e}", path.display()),
                    ));
                }
            }
        }
        for (field, value) in [
            ("exec.create_timeout_ms", self.create_timeout_ms),
            ("exec.destroy_timeout_ms", self.destroy_timeout_ms),
            ("exec.status_timeout_ms", self.status_timeout_ms),
        ] {
            if value == Some(0) {
                return Err(invalid_sim(field, "must be positive"));
            }
        }
        Ok(())
    }
}

/// The scripts and their timeouts.
#[derive(Debug)]
pub struct ExecProvisioner {
    config: ExecConfig,
}

#[derive(Serialize)]
struct ActionRequest<'a, T: Serialize> {
    action: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Deserialize)]
struct StatusReply {
    state: InstanceHealth,
}

impl ExecProvisioner {
    /// A provisioner running `config`'s scripts.
    pub fn new(config: ExecConfig) -> Self {
        Self { config }
    }

    fn call<T: Serialize>(
        &self,
        script: &Path,
        action: &'static str,
        body: &T,
        timeout: Duration,
    ) -> Result<String, ProvisionError> {
        let input =
            serde_json::to_vec(&ActionRequest { action, body }).map_err(ProvisionError::Json)?;
        run_script(script, &input, timeout)
    }
}

/// Runs `script` with `input` on stdin; its stdout on exit 0, else an error with its exit
/// status and stderr tail. Past `timeout` the script's process group is killed.
pub fn run_script(
    script: &Path,
    input: &[u8],
    timeout: Duration,
) -> Result<String, ProvisionError> {
    use std::os::unix::process::CommandExt as _;
    let shown = script.display().to_string();
    let mut child = Command::new(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills what the script started too (terraform,
        // ssh, sleep), not only the shell.
        .process_group(0)
        .spawn()
        .map_err(|source| ProvisionError::Spawn {
            command: shown.clone(),
            source,
        })?;
    let pgid = nix::unistd::Pid::from_raw(child.id().cast_signed());
    // Readers on their own threads: a script that fills a pipe while we wait would deadlock.
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out = thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stdout.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    let err = thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    });
    if let Some(mut stdin) = child.stdin.take() {
        // A script that ignores its input closes the pipe early; that is its business.
        let _ = stdin.write_all(input);
    }
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(source) => {
                return Err(ProvisionError::Spawn {
                    command: shown,
                    source,
                });
            }
        }
    };
    let Some(status) = status else {
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        // Grandchildren holding the pipes died with the group, so the readers finish.
        let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
        return Err(ProvisionError::Timeout {
            command: shown,
            timeout,
            stderr_tail: tail(&stderr, 5),
        });
    };
    // A script that exits while a background child keeps the pipes open: do not wait for it.
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let stdout = String::from_utf8_lossy(&out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    if status.success() {
        Ok(stdout)
    } else {
        Err(ProvisionError::Command {
            command: shown,
            status: status.to_string(),
            stderr_tail: tail(&stderr, 5),
        })
    }
}

fn parse_reply<T: serde::de::DeserializeOwned>(
    script: &Path,
    stdout: &str,
) -> Result<T, ProvisionError> {
    serde_json::from_str(stdout.trim()).map_err(|e| ProvisionError::BadReply {
        command: script.display().to_string(),
        reply: stdout.chars().take(200).collect(),
        reason: e.to_string(),
    })
}

const fn ms(value: Option<u64>, default: u64) -> Duration {
    Duration::from_millis(match value {
        Some(v) => v,
        None => default,
    })
}

impl Provisioner for ExecProvisioner {
    fn kind(&self) -> &'static str {
        "exec"
    }

    fn supports(&self, _vm_type: &VmType) -> bool {
        true
    }

    fn create(&self, request: &CreateRequest) -> Result<Created, ProvisionError> {
        let timeout = ms(self.config.create_timeout_ms, 600_000);
        let stdout = self.call(&self.config.create, "create", request, timeout)?;
        parse_reply(&self.config.create, &stdout)
    }

    fn destroy(&self, instance: &InstanceRef) -> Result<(), ProvisionError> {
        let timeout = ms(self.config.destroy_timeout_ms, 300_000);
        self.call(&self.config.destroy, "destroy", instance, timeout)
            .map(drop)
    }

    fn status(&self, instance: &InstanceRef) -> Result<InstanceHealth, ProvisionError> {
        let timeout = ms(self.config.status_timeout_ms, 30_000);
        let stdout = self.call(&self.config.status, "status", instance, timeout)?;
        parse_reply::<StatusReply>(&self.config.status, &stdout).map(|r| r.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn a_failing_script_reports_its_status_and_stderr_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = script(
            dir.path(),
            "fail",
            "cat >/dev/null; echo one >&2; echo 'quota exceeded' >&2; exit 3",
        );
        let e = run_script(&s, b"{}", Duration::from_secs(5)).expect_err("fails");
        let text = e.to_string();
        assert!(text.contains("exit status: 3"), "{text}");
        assert!(text.contains("one | quota exceeded"), "{text}");
    }

    #[test]
    fn a_hanging_script_is_killed_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = dir.path().join("child.pid");
        let s = script(
            dir.path(),
            "hang",
            &format!(
                "sleep 60 & echo $! > {}; echo started >&2; wait",
                pid_file.display()
            ),
        );
        let started = Instant::now();
        let e = run_script(&s, b"{}", Duration::from_millis(300)).expect_err("times out");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("timed out after 300 ms"), "{e}");
        assert!(e.to_string().contains("started"), "{e}");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid");
        // The background sleep was in the group: it is gone (or a zombie of init, not ours).
        thread::sleep(Duration::from_millis(100));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.split_whitespace().nth(2) == Some("Z"),
            "{state}"
        );
    }

    #[test]
    fn the_reply_and_the_request_follow_the_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let seen = dir.path().join("seen.json");
        let s = script(
            dir.path(),
            "status",
            &format!("cat > {}; echo '{{\"state\": \"dead\"}}'", seen.display()),
        );
        let p = ExecProvisioner::new(ExecConfig {
            status: s,
            ..ExecConfig::default()
        });
        let instance = InstanceRef {
            instance_id: "0000abcd".into(),
            workload: "web".into(),
            vm_type: "small".into(),
            handle: serde_json::json!({"vm": "i-123"}),
        };
        assert_eq!(p.status(&instance).expect("status"), InstanceHealth::Dead);
        let request: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&seen).expect("read")).expect("json");
        assert_eq!(request["action"], "status");
        assert_eq!(request["instance_id"], "0000abcd");
        assert_eq!(request["handle"]["vm"], "i-123");
    }
}
