//! The Shadow Instance Manager: makes, watches and removes the shadow instances of workloads.
//!
//! A [`Provisioner`] creates, destroys and checks one instance; [`local`] makes a shadow out of a
//! network namespace and a cgroup on this host (the default), [`exec`] runs the operator's
//! scripts (Terraform, cloud CLIs, kubectl) under a JSON contract. The [`manager`] owns the
//! lifecycle: it reconciles what each workload's [`ShadowTemplate`]
//! and the pool steering ask for against what runs, within the workload's shadow budget, records
//! every state change in the store, and registers each running shadow's mirror session in the
//! workload so live agents start cloning to it. The [`catalog`] says what each VM type is;
//! [`capacity`] turns stored measurements into the capacities the pool steering weighs.

pub mod capacity;
pub mod catalog;
pub mod exec;
pub mod local;
pub mod manager;
#[cfg(test)]
mod reconcile_tests;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::policy::ShadowTemplate;
pub use catalog::VmType;

/// Everything the manager tells a provisioner about the instance to create.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateRequest {
    /// The instance's id (8 hex digits), unique on this coordinator.
    pub instance_id: String,
    /// The workload it shadows.
    pub workload: String,
    /// The VM type, as the catalog describes it.
    pub vm_type: VmType,
    /// The workload's service addresses (`IP:PORT`); the shadow replays to the same ports.
    pub services: Vec<String>,
    /// How to run the workload.
    pub shadow: ShadowTemplate,
    /// Mirror traffic the shadow admits: the live hosts' VXLAN source addresses, with `vni`.
    pub live_sources: Vec<IpAddr>,
    /// The mirror session's VXLAN network identifier.
    pub vni: u32,
    /// How often the shadow agent reports, ms (the workload's policy, so live and shadow
    /// intervals line up for the comparison).
    pub report_interval_ms: u32,
    /// The shadow agent's identity and where it reports.
    pub agent: AgentIdentity,
}

/// The shadow agent's certificate (issued by the coordinator's CA) and the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// The agent's name (the certificate's common name).
    pub name: String,
    /// Its certificate (PEM file).
    pub cert: PathBuf,
    /// Its key (PEM file).
    pub key: PathBuf,
    /// The CA certificate that verifies the coordinator (PEM file).
    pub ca_cert: PathBuf,
    /// The coordinator's QUIC address as the shadow reaches it.
    pub coordinator: SocketAddr,
    /// The name in the coordinator's certificate.
    pub server_name: String,
}

/// What a provisioner made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Created {
    /// The shadow's VXLAN endpoint: where live agents send its mirror traffic.
    pub addr: IpAddr,
    /// The shadow agent's name, when it differs from the one in the request.
    #[serde(default)]
    pub agent: Option<String>,
    /// Whatever the provisioner needs to find the instance again (kept in the store).
    #[serde(default)]
    pub handle: serde_json::Value,
}

/// An existing (or half-made) instance, for `destroy` and `status`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRef {
    /// The instance's id.
    pub instance_id: String,
    /// Its workload.
    pub workload: String,
    /// Its VM type name.
    pub vm_type: String,
    /// The provisioner's handle (`null` when create did not finish).
    pub handle: serde_json::Value,
}

/// What a provisioner sees of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceHealth {
    /// Everything it should run is running.
    Running,
    /// It exists but a part has stopped: it needs replacing.
    Dead,
    /// Nothing of it exists.
    Missing,
}

/// Why a provisioner call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A command (`ip`, a script) exited unsuccessfully.
    #[error("`{command}` exited with {status}: {stderr_tail}")]
    Command {
        /// The command.
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of its standard error.
        stderr_tail: String,
    },
    /// A command ran past its timeout; its process group was killed.
    #[error("`{command}` timed out after {} ms and was killed: {stderr_tail}", timeout.as_millis())]
    Timeout {
        /// The command.
        command: String,
        /// The limit.
        timeout: Duration,
        /// The last lines of its standard error.
        stderr_tail: String,
    },
    /// A command could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A script's reply did not follow the contract.
    #[error("`{command}` replied {reply:?}, which is not the expected JSON: {reason}")]
    BadReply {
        /// The command.
        command: String,
        /// What it printed (truncated).
        reply: String,
        /// What is wrong.
        reason: String,
    },
    /// A file or directory could not be used.
    #[error("{action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The catalog entry lacks what this provisioner needs.
    #[error("VM type {vm_type:?} cannot be provisioned here: {reason}")]
    Unsupported {
        /// The type.
        vm_type: String,
        /// Why.
        reason: String,
    },
    /// No address is left in the local pool.
    #[error("the local address pool is exhausted")]
    PoolExhausted,
    /// A request or handle could not be encoded as JSON.
    #[error("cannot encode JSON for the provisioner")]
    Json(#[source] serde_json::Error),
}

/// Creates, destroys and checks shadow instances. Calls block (they run commands); the manager
/// runs them on the blocking pool. `destroy` must be idempotent and must clean up after a create
/// that failed half-way (its `handle` is then `null`): the manager calls it after every failed
/// create, so nothing half-made is left.
pub trait Provisioner: Send + Sync + fmt::Debug {
    /// A short name for logs and the API (`local`, `exec`).
    fn kind(&self) -> &'static str;
    /// Whether this provisioner can make a shadow of `vm_type` (e.g. `local` needs its limits).
    fn supports(&self, vm_type: &VmType) -> bool;
    /// Makes an instance and starts the workload and the shadow agent in it.
    fn create(&self, request: &CreateRequest) -> Result<Created, ProvisionError>;
    /// Removes everything of an instance; succeeds when nothing of it exists.
    fn destroy(&self, instance: &InstanceRef) -> Result<(), ProvisionError>;
    /// Whether an instance is running, dead or gone.
    fn status(&self, instance: &InstanceRef) -> Result<InstanceHealth, ProvisionError>;
}

/// Which provisioner `doppel serve` uses (`[sim]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProvisionerKind {
    /// Network namespace + cgroup on this host.
    #[default]
    Local,
    /// The operator's scripts.
    Exec,
}

/// The `[sim]` section of the serve config.
///
/// ```toml
/// [sim]
/// provisioner = "local"                 # or "exec"
/// reconcile_interval_ms = 2000
/// retry_after_failure_ms = 30000        # a type whose create failed is not retried sooner
/// coordinator_address = "10.213.0.1:7443"  # default: the local gateway, QUIC port
/// server_name = "localhost"             # name in the coordinator's certificate
/// [sim.local]
/// bridge = "doppel-br0"
/// subnet = "10.213.0.0/24"
/// gateway = "10.213.0.1"
/// pool = ["10.213.0.10", "10.213.0.250"]
/// agent_binary = "/usr/bin/doppel-agent"
/// [sim.exec]
/// create = "/etc/doppel/create-shadow"
/// destroy = "/etc/doppel/destroy-shadow"
/// status = "/etc/doppel/shadow-status"
/// create_timeout_ms = 600000
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// The provisioner.
    pub provisioner: ProvisionerKind,
    /// Time between two reconciliations, ms.
    pub reconcile_interval_ms: u64,
    /// After a failed create, the same workload and type wait this long, ms.
    pub retry_after_failure_ms: u64,
    /// The coordinator's QUIC address as shadows reach it (default: the local gateway with the
    /// QUIC port; required for `exec`).
    pub coordinator_address: Option<SocketAddr>,
    /// The name shadow agents expect in the coordinator's certificate.
    pub server_name: String,
    /// The `local` provisioner.
    pub local: local::LocalConfig,
    /// The `exec` provisioner.
    pub exec: Option<exec::ExecConfig>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            provisioner: ProvisionerKind::Local,
            reconcile_interval_ms: 2000,
            retry_after_failure_ms: 30_000,
            coordinator_address: None,
            server_name: "localhost".to_owned(),
            local: local::LocalConfig::default(),
            exec: None,
        }
    }
}

/// A `[sim]` value that cannot be used; `field` is its path in the serve config.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidSimConfig {
    /// E.g. `sim.local.gateway`.
    pub field: String,
    /// Why.
    pub reason: String,
}

pub(crate) fn invalid_sim(field: &str, reason: impl Into<String>) -> InvalidSimConfig {
    InvalidSimConfig {
        field: format!("sim.{field}"),
        reason: reason.into(),
    }
}

impl SimConfig {
    /// Checks what TOML types alone cannot.
    pub fn validate(&self) -> Result<(), InvalidSimConfig> {
        if self.reconcile_interval_ms < 100 {
            return Err(invalid_sim("reconcile_interval_ms", "must be at least 100"));
        }
        if self.server_name.is_empty() {
            return Err(invalid_sim("server_name", "must not be empty"));
        }
        match self.provisioner {
            ProvisionerKind::Local => self.local.validate(),
            ProvisionerKind::Exec => {
                let Some(exec) = &self.exec else {
                    return Err(invalid_sim(
                        "exec",
                        "provisioner = \"exec\" needs a [sim.exec] section with create, destroy \
                         and status",
                    ));
                };
                if self.coordinator_address.is_none() {
                    return Err(invalid_sim(
                        "coordinator_address",
                        "the exec provisioner's shadows need the coordinator's address as they \
                         reach it",
                    ));
                }
                exec.validate()
            }
        }
    }

    /// The provisioner this config describes. `quic_port` is the coordinator's QUIC port.
    pub fn provisioner(&self, state_dir: &std::path::Path) -> Box<dyn Provisioner> {
        match self.provisioner {
            ProvisionerKind::Local => Box::new(local::LocalProvisioner::new(
                self.local.clone(),
                state_dir.join("shadows"),
            )),
            ProvisionerKind::Exec => Box::new(exec::ExecProvisioner::new(
                self.exec.clone().unwrap_or_default(),
            )),
        }
    }

    /// Where shadow agents reach the coordinator.
    pub fn coordinator_address(&self, quic_port: u16) -> SocketAddr {
        self.coordinator_address
            .unwrap_or_else(|| SocketAddr::new(IpAddr::V4(self.local.gateway), quic_port))
    }
}

/// The last `lines` lines of `text`, at most 2 KiB, for error messages.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let trimmed = text.trim_end();
    let start = trimmed
        .rmatch_indices('\n')
        .nth(lines.saturating_sub(1))
        .map_or(0, |(i, _)| i + 1);
    let tail = &trimmed[start..];
    let mut cut = tail.len().saturating_sub(2048);
    while !tail.is_char_boundary(cut) {
        cut += 1;
    }
    let tail = &tail[cut..];
    if tail.is_empty() {
        "(no stderr)".to_owned()
    } else {
        tail.replace('\n', " | ")
    }
}
