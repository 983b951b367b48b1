//! The shadow role's TOML configuration, validated at start with errors that name the field.
//!
//! ```toml
//! role = "shadow"
//! listen = "0.0.0.0:4789"            # UDP receiver for VXLAN mirror traffic
//! xdp_interface = "eth0"             # optional: drop non-admitted mirror traffic in XDP here
//! replay_addr = "127.0.0.1"          # the shadow workload; each flow keeps its original port
//! replay_interface = "lo"            # optional: in-kernel exchange latency, as on the live host
//! report_interval_ms = 10000
//! amplification = 1.0                # 1.5 replays every second flow twice
//! time_compression = 1.0             # > 1: gaps between exchanges shrink by this factor
//! [[sessions]]                       # admitted mirror sources
//! source = "10.1.0.1"
//! vni = 101
//! [[services]]                       # original service ports replayed (others are ignored)
//! port = 8080
//! [[classes]]                        # optional: class of a flow by its first bytes
//! id = 1
//! name = "api"
//! payload_prefix = "GET /api"
//! [http]                             # requests replayed; default GET, HEAD, OPTIONS
//! allow_methods = ["GET", "HEAD", "OPTIONS", "POST"]
//! deny_paths = ["/admin"]
//! [workload]                         # optional: pid = 1234, or cgroup = "/sys/fs/cgroup/web"
//! pid = 1234
//! [coordinator]                      # optional: as in the live role's file
//! address = "10.213.0.1:7443"
//! ca_cert = "ca.crt"
//! cert = "agent.crt"
//! key = "agent.key"
//! spool_dir = "spool"
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use doppel_common::wire::{AgentPolicy, ClassPolicy, ClassRule, ServiceAddr};
use serde::Deserialize;

use super::http::HttpPolicy;
use crate::{
    config::{ConfigError, WorkloadConfig},
    datapath::AttachMode,
    metrics::WorkloadSource,
};

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// An admitted mirror session.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmittedSession {
    /// Outer source address of the mirror traffic (the live host's VXLAN endpoint).
    pub source: IpAddr,
    /// The session's VNI (24 bits).
    pub vni: u32,
}

/// A replayed service port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowService {
    /// Original service port; the replay goes to `replay_addr` on the same port.
    pub port: u16,
}

/// A class of flows, by the first bytes of the flow.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowClass {
    /// Class id, 1..16 (0 is every flow no class matches).
    pub id: u16,
    /// Name for reports.
    pub name: String,
    /// Leading payload bytes that put a flow in this class.
    pub payload_prefix: String,
}

/// The shadow role's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Always `"shadow"` here.
    pub role: String,
    /// Workload name in reports.
    #[serde(default = "default_workload_name")]
    pub workload_name: String,
    /// UDP address the mirror traffic arrives at.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Interface the XDP admission program is attached to.
    pub xdp_interface: Option<String>,
    /// Address of the shadow workload.
    pub replay_addr: IpAddr,
    /// Interface on which replayed connections reach the workload, for in-kernel latency.
    pub replay_interface: Option<String>,
    /// How the TC programs are attached there.
    #[serde(default)]
    pub attach_mode: AttachMode,
    /// Milliseconds between reports.
    #[serde(default = "default_interval_ms")]
    pub report_interval_ms: u32,
    /// Copies per flow on average (each on its own connection), 1..=16.
    #[serde(default = "one")]
    pub amplification: f64,
    /// Gaps between exchanges are divided by this, 1..=1000; above 1 a flow is replayed once it
    /// has arrived whole.
    #[serde(default = "one")]
    pub time_compression: f64,
    /// Connect timeout, ms.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed for a response's first byte, and between its bytes, ms.
    #[serde(default = "default_response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// An opaque response is complete once the workload was silent this long, ms; an opaque
    /// run of client bytes with nothing after it is complete after the same idle time.
    #[serde(default = "default_opaque_idle_ms")]
    pub opaque_idle_ms: u64,
    /// A hole in a stream not filled within this many ms abandons the flow.
    #[serde(default = "default_gap_timeout_ms")]
    pub gap_timeout_ms: u64,
    /// A flow without packets this long ends (its FIN may have been lost), ms.
    #[serde(default = "default_flow_idle_ms")]
    pub flow_idle_timeout_ms: u64,
    /// Most bytes buffered for one flow (out of order, or waiting to be replayed).
    #[serde(default = "default_flow_buffer")]
    pub max_flow_buffer_bytes: usize,
    /// Most bytes buffered over all flows; beyond it the oldest flows are evicted.
    #[serde(default = "default_total_buffer")]
    pub max_total_buffer_bytes: usize,
    /// Most flows followed at once; beyond it the oldest is evicted.
    #[serde(default = "default_max_flows")]
    pub max_flows: usize,
    /// Admitted sessions.
    pub sessions: Vec<AdmittedSession>,
    /// Replayed service ports.
    pub services: Vec<ShadowService>,
    /// Flow classes.
    #[serde(default)]
    pub classes: Vec<ShadowClass>,
    /// Which HTTP requests are replayed.
    #[serde(default)]
    pub http: HttpPolicy,
    /// Where workload resource use is read.
    pub workload: Option<WorkloadConfig>,
    /// The coordinator to report to, as in the live role's file. Accepted here so a
    /// coordinator-provisioned shadow's file (which always carries it) loads; reporting from the
    /// shadow role over QUIC is being added on the `agent` branch, which replaces this stub.
    pub coordinator: Option<crate::config::CoordinatorConfig>,
}

fn default_workload_name() -> String {
    "workload".to_owned()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4789))
}
const fn default_interval_ms() -> u32 {
    10_000
}
const fn one() -> f64 {
    1.0
}
const fn default_connect_timeout_ms() -> u64 {
    1000
}
const fn default_response_timeout_ms() -> u64 {
    5000
}
const fn default_opaque_idle_ms() -> u64 {
    5
}
const fn default_gap_timeout_ms() -> u64 {
    2000
}
const fn default_flow_idle_ms() -> u64 {
    60_000
}
const fn default_flow_buffer() -> usize {
    1 << 20
}
const fn default_total_buffer() -> usize {
    256 << 20
}
const fn default_max_flows() -> usize {
    65_536
}

impl ShadowConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = crate::config::read_toml(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what TOML cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.role != "shadow" {
            return Err(invalid("role", "this is the shadow role's file"));
        }
        for (field, iface) in [
            ("xdp_interface", &self.xdp_interface),
            ("replay_interface", &self.replay_interface),
        ] {
            if let Some(iface) = iface
                && nix::net::if_::if_nametoindex(iface.as_str()).is_err()
            {
                return Err(invalid(
                    field,
                    format!("no interface {iface:?} on this host"),
                ));
            }
        }
        if self.report_interval_ms < 100 {
            return Err(invalid("report_interval_ms", "must be at least 100"));
        }
        if !(1.0..=16.0).contains(&self.amplification) {
            return Err(invalid("amplification", "must be between 1 and 16"));
        }
        if !(1.0..=1000.0).contains(&self.time_compression) {
            return Err(invalid("time_compression", "must be between 1 and 1000"));
        }
        if self.sessions.is_empty() {
            return Err(invalid(
                "sessions",
                "admit at least one (source, vni); nothing else is accepted",
            ));
        }
        for (i, s) in self.sessions.iter().enumerate() {
            if s.vni >= 1 << 24 {
                return Err(invalid(format!("sessions[{i}].vni"), "a VNI has 24 bits"));
            }
        }
        if self.services.is_empty() {
            return Err(invalid("services", "at least one service port is needed"));
        }
        if let Some(i) = self.services.iter().position(|s| s.port == 0) {
            return Err(invalid(format!("services[{i}].port"), "must not be 0"));
        }
        if self.max_flow_buffer_bytes < 4096
            || self.max_total_buffer_bytes < self.max_flow_buffer_bytes
        {
            return Err(invalid(
                "max_total_buffer_bytes",
                "needs max_flow_buffer_bytes >= 4096 and max_total_buffer_bytes >= max_flow_buffer_bytes",
            ));
        }
        if self.max_flows == 0 {
            return Err(invalid("max_flows", "must be at least 1"));
        }
        if let Some(workload) = &self.workload
            && workload.pid.is_some() == workload.cgroup.is_some()
        {
            return Err(invalid("workload", "give exactly one of pid or cgroup"));
        }
        crate::policy::compile(&self.kernel_policy()).map_err(|e| invalid(e.field, e.reason))?;
        Ok(())
    }

    /// The policy of the in-kernel measurement on the replay interface: the replayed services,
    /// the classes as payload-prefix rules, and nothing sampled or mirrored.
    pub fn kernel_policy(&self) -> AgentPolicy {
        let mut classes = vec![ClassPolicy {
            id: 0,
            name: "default".to_owned(),
            sample_rate_ppm: 0,
            priority: 0,
        }];
        classes.extend(self.classes.iter().map(|c| ClassPolicy {
            id: c.id,
            name: c.name.clone(),
            sample_rate_ppm: 0,
            priority: 0,
        }));
        AgentPolicy {
            workload: self.workload_name.clone(),
            report_interval_ms: self.report_interval_ms,
            services: self
                .services
                .iter()
                .map(|s| ServiceAddr {
                    addr: self.replay_addr,
                    port: s.port,
                })
                .collect(),
            classes,
            rules: self
                .classes
                .iter()
                .map(|c| ClassRule {
                    class: c.id,
                    port: None,
                    client_prefix: None,
                    payload_prefix: c.payload_prefix.clone().into_bytes(),
                    payload_mask: Vec::new(),
                })
                .collect(),
            mirror_sessions: Vec::new(),
            sampling_seed: 0,
        }
    }

    /// The class of a flow whose stream starts with `head` (0 when none matches). The kernel's
    /// rules give the same answer: both match the flow's first payload bytes.
    pub fn class_of(&self, head: &[u8]) -> u16 {
        self.classes
            .iter()
            .find(|c| head.starts_with(c.payload_prefix.as_bytes()))
            .map_or(0, |c| c.id)
    }

    /// Where the workload's resource use is read, if configured.
    pub fn workload_source(&self) -> Option<WorkloadSource> {
        let w = self.workload.as_ref()?;
        w.pid
            .map(WorkloadSource::Pid)
            .or_else(|| w.cgroup.clone().map(WorkloadSource::Cgroup))
    }

    /// Report interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.report_interval_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        role = "shadow"
        replay_addr = "127.0.0.1"
        replay_interface = "lo"
        [[sessions]]
        source = "10.0.0.1"
        vni = 7
        [[services]]
        port = 8080
        [[classes]]
        id = 1
        name = "api"
        payload_prefix = "GET /api"
    "#;

    fn parse(text: &str) -> Result<ShadowConfig, ConfigError> {
        let config: ShadowConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "t".into(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn a_good_file_has_safe_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.listen.port(), 4789);
        assert_eq!(c.http, HttpPolicy::default());
        assert_eq!(c.class_of(b"GET /api/x"), 1);
        assert_eq!(c.class_of(b"GET /"), 0);
        assert_eq!(c.kernel_policy().rules.len(), 1);
    }

    #[test]
    fn errors_name_the_field() {
        let message = |text: &str| parse(text).unwrap_err().to_string();
        assert!(
            message(&GOOD.replace("vni = 7", "vni = 16777216")).starts_with("sessions[0].vni:")
        );
        assert!(message(&GOOD.replace("\"lo\"", "\"nosuch0\"")).starts_with("replay_interface:"));
        assert!(
            message(&GOOD.replace(
                "role = \"shadow\"",
                "role = \"shadow\"\namplification = 0.5"
            ))
            .starts_with("amplification:")
        );
        assert!(message(&GOOD.replace("port = 8080", "port = 0")).starts_with("services[0].port:"));
        assert!(message(&GOOD.replace("id = 1", "id = 99")).starts_with("classes[1].id:"));
    }
}
