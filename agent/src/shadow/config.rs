//! The shadow role's TOML configuration, validated at start with errors that name the field.
//! A commented example is `examples/shadow.toml` (checked by `tests/tests/examples.rs`).
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
//! gap_timeout_ms = 100               # a hole not filled this long is skipped, the replay resumes
//! [[sessions]]                       # admitted mirror sources
//! source = "10.1.0.1"
//! vni = 101
//! [[services]]                       # original service ports replayed (others are ignored)
//! port = 8080
//! protocol = "http1"                 # optional: http1 | http2 | redis | postgres | mysql | opaque (else detected)
//! [[services]]
//! port = 5432
//! user = "app"                       # optional: the replayer logs in to PostgreSQL/MySQL itself,
//! password = "secret"                #   answering the server's challenge with these
//! [[classes]]                        # optional: class of a flow by its first bytes
//! id = 1
//! name = "api"
//! payload_prefix = "GET /api"
//! [http]                             # requests replayed; default GET, HEAD, OPTIONS
//! allow_methods = ["GET", "HEAD", "OPTIONS", "POST"]
//! deny_paths = ["/admin"]
//! [workload]                         # optional: pid = 1234, or cgroup = "/sys/fs/cgroup/web"
//! pid = 1234
//! [coordinator]                      # optional: the live role's section, same fields and checks
//! address = "10.0.0.1:4433"
//! ca_cert = "/etc/doppel/ca.crt"
//! cert = "/etc/doppel/shadow-1.crt"  # from `doppel ca issue --agent shadow-1`
//! key = "/etc/doppel/shadow-1.key"
//! spool_dir = "/var/lib/doppel/spool"
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use doppel_common::wire::{AgentPolicy, ClassPolicy, ClassRule, ServiceAddr};
use serde::Deserialize;

use super::{framing::Protocol, http::HttpPolicy};
use crate::{
    config::{ConfigError, CoordinatorConfig, WorkloadConfig},
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
    /// `http1`, `http2`, `redis`, `postgres`, `mysql` or `opaque`; detected from each flow's
    /// first bytes when absent.
    pub protocol: Option<Protocol>,
    /// For PostgreSQL and MySQL: the user the replayer logs in as (the client's own by
    /// default).
    pub user: Option<String>,
    /// For PostgreSQL and MySQL: the password the replayer answers the server's challenge
    /// with (without one, a MySQL client that logged in with an empty password is followed).
    pub password: Option<String>,
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
    /// A hole in a stream not filled within this many ms is skipped: the replay resumes at the
    /// next message boundary. A lost mirror copy is never retransmitted (the live client's TCP
    /// retransmits only what the live server missed), so waiting long only delays the replay.
    #[serde(default = "default_gap_timeout_ms")]
    pub gap_timeout_ms: u64,
    /// A flow without packets this long ends (its FIN may have been lost), ms.
    #[serde(default = "default_flow_idle_ms")]
    pub flow_idle_timeout_ms: u64,
    /// On SIGTERM, time the replays get to finish the backlog they hold (new flows are no
    /// longer taken), ms; what is left then is counted in `exchanges_unreplayed` and
    /// `bytes_unreplayed`. 0 stops at once.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
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
    /// Report to a coordinator (QUIC + mTLS) besides printing JSON lines; the same section, type
    /// and checks as the live role's.
    pub coordinator: Option<CoordinatorConfig>,
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
const fn default_gap_timeout_ms() -> u64 {
    100
}
const fn default_flow_idle_ms() -> u64 {
    60_000
}
const fn default_drain_timeout_ms() -> u64 {
    5_000
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
        for (field, value, least) in [
            ("connect_timeout_ms", self.connect_timeout_ms, 10),
            ("response_timeout_ms", self.response_timeout_ms, 10),
            ("flow_idle_timeout_ms", self.flow_idle_timeout_ms, 100),
        ] {
            if value < least {
                return Err(invalid(field, format!("must be at least {least}")));
            }
        }
        if self.gap_timeout_ms == 0 {
            return Err(invalid("gap_timeout_ms", "must be at least 1"));
        }
        for (i, service) in self.services.iter().enumerate() {
            let wants_login = service.user.is_some() || service.password.is_some();
            if wants_login
                && !matches!(
                    service.protocol,
                    None | Some(Protocol::Postgres | Protocol::Mysql)
                )
            {
                return Err(invalid(
                    format!("services[{i}].user"),
                    "credentials are only used by the postgres and mysql protocols",
                ));
            }
        }
        if self.max_flows == 0 {
            return Err(invalid("max_flows", "must be at least 1"));
        }
        if let Some(workload) = &self.workload
            && workload.pid.is_some() == workload.cgroup.is_some()
        {
            return Err(invalid("workload", "give exactly one of pid or cgroup"));
        }
        if let Some(coordinator) = &self.coordinator {
            coordinator.validate()?;
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
            budget_priority: false,
        }];
        classes.extend(self.classes.iter().map(|c| ClassPolicy {
            id: c.id,
            name: c.name.clone(),
            sample_rate_ppm: 0,
            priority: 0,
            budget_priority: false,
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
            // A shadow mirrors nothing.
            mirror_budget_flows_per_s: 0,
        }
    }

    /// The in-kernel measurement's policy under a coordinator's policy: its classes and rules
    /// (so the shadow's histograms carry the same class ids as the live host's), measured on the
    /// replayed services (`replay_addr` x this file's ports; the coordinator's addresses are the
    /// live host's), sampling and mirroring nothing.
    ///
    /// Rules on the client's address are left out: replayed connections come from the shadow
    /// host itself, so the kernel on the replay interface cannot evaluate them, and the replayer
    /// leaves them out too ([`FlowClassifier::from_policy`]) so both measurements agree.
    pub fn kernel_policy_under(&self, coordinator: &AgentPolicy) -> AgentPolicy {
        let mut policy = self.kernel_policy();
        policy.workload = coordinator.workload.clone();
        policy.report_interval_ms = coordinator.report_interval_ms;
        policy.classes = coordinator
            .classes
            .iter()
            .map(|c| ClassPolicy {
                sample_rate_ppm: 0,
                ..c.clone()
            })
            .collect();
        if !policy.classes.iter().any(|c| c.id == 0) {
            policy.classes.insert(
                0,
                ClassPolicy {
                    id: 0,
                    name: "default".to_owned(),
                    sample_rate_ppm: 0,
                    priority: 0,
                    budget_priority: false,
                },
            );
        }
        policy.rules = coordinator
            .rules
            .iter()
            .filter(|r| r.client_prefix.is_none())
            .cloned()
            .collect();
        policy
    }

    /// The class of a flow whose stream starts with `head` (0 when none matches), under this
    /// file's classes.
    pub fn class_of(&self, head: &[u8]) -> u16 {
        FlowClassifier::from_policy(&self.kernel_policy()).class_of(0, head)
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

/// The replayer's classification of a flow by its service port and first payload bytes, with
/// the kernel's semantics (`agent-ebpf` `classify`): among matching rules the class with the
/// highest priority wins, the first such rule on ties; 0 when none matches. It is built from the
/// same policy as the in-kernel measurement on the replay interface, so the replayer's and the
/// kernel's histograms of a flow carry the same class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowClassifier {
    /// In policy order.
    rules: Vec<ClassifierRule>,
}

/// One rule of a [`FlowClassifier`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClassifierRule {
    class: u16,
    /// The class's priority.
    priority: u16,
    port: Option<u16>,
    prefix: Vec<u8>,
    /// Same length as `prefix`.
    mask: Vec<u8>,
}

impl FlowClassifier {
    /// The classifier of a policy's rules (rules on the client's address left out, see
    /// [`ShadowConfig::kernel_policy_under`]).
    pub fn from_policy(policy: &AgentPolicy) -> Self {
        let priority = |class: u16| {
            policy
                .classes
                .iter()
                .find(|c| c.id == class)
                .map_or(0, |c| c.priority)
        };
        Self {
            rules: policy
                .rules
                .iter()
                .filter(|r| r.client_prefix.is_none())
                .map(|r| {
                    // The kernel compares at most PAYLOAD_MATCH_LEN bytes; so does this.
                    let len = r
                        .payload_prefix
                        .len()
                        .min(doppel_common::maps::PAYLOAD_MATCH_LEN);
                    let mask = if r.payload_mask.is_empty() {
                        vec![0xff; len]
                    } else {
                        r.payload_mask[..len.min(r.payload_mask.len())].to_vec()
                    };
                    ClassifierRule {
                        class: r.class,
                        priority: priority(r.class),
                        port: r.port,
                        prefix: r.payload_prefix[..len].to_vec(),
                        mask,
                    }
                })
                .collect(),
        }
    }

    /// The class of a flow to `port` whose stream starts with `head` (`port` 0: any port).
    pub fn class_of(&self, port: u16, head: &[u8]) -> u16 {
        let mut best: Option<(u16, u16)> = None;
        for rule in &self.rules {
            let port_ok = rule.port.is_none_or(|p| port == 0 || p == port);
            let payload_ok = head.len() >= rule.prefix.len()
                && rule
                    .prefix
                    .iter()
                    .zip(&rule.mask)
                    .zip(head)
                    .all(|((p, m), h)| (p & m) == (h & m));
            if port_ok && payload_ok && best.is_none_or(|(_, b)| rule.priority > b) {
                best = Some((rule.class, rule.priority));
            }
        }
        best.map_or(0, |(class, _)| class)
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
    fn a_coordinator_policy_sets_the_classes_of_both_measurements() {
        let c = parse(GOOD).unwrap();
        let coordinator = AgentPolicy {
            workload: "web".into(),
            report_interval_ms: 500,
            services: vec![ServiceAddr {
                addr: "10.0.0.2".parse().unwrap(),
                port: 8080,
            }],
            classes: vec![
                ClassPolicy {
                    id: 0,
                    name: "default".into(),
                    sample_rate_ppm: 100_000,
                    priority: 0,
                    budget_priority: false,
                },
                ClassPolicy {
                    id: 3,
                    name: "search".into(),
                    sample_rate_ppm: 500_000,
                    priority: 1,
                    budget_priority: false,
                },
                ClassPolicy {
                    id: 4,
                    name: "from-office".into(),
                    sample_rate_ppm: 500_000,
                    priority: 9,
                    budget_priority: false,
                },
            ],
            rules: vec![
                ClassRule {
                    class: 3,
                    port: Some(8080),
                    client_prefix: None,
                    payload_prefix: b"GET /search".to_vec(),
                    payload_mask: Vec::new(),
                },
                ClassRule {
                    class: 4,
                    port: None,
                    client_prefix: Some(doppel_common::wire::IpPrefix {
                        addr: "10.0.0.0".parse().unwrap(),
                        len: 8,
                    }),
                    payload_prefix: Vec::new(),
                    payload_mask: Vec::new(),
                },
            ],
            mirror_sessions: Vec::new(),
            sampling_seed: 9,
            mirror_budget_flows_per_s: 0,
        };
        let kernel = c.kernel_policy_under(&coordinator);
        // Measured where the replay arrives, sampling nothing; the client-address rule is out.
        assert_eq!(kernel.services[0].addr, c.replay_addr);
        assert_eq!(kernel.workload, "web");
        assert!(kernel.classes.iter().all(|c| c.sample_rate_ppm == 0));
        assert_eq!(kernel.rules.len(), 1);
        crate::policy::compile(&kernel).unwrap();
        let classifier = FlowClassifier::from_policy(&kernel);
        assert_eq!(classifier.class_of(8080, b"GET /search?q=1"), 3);
        assert_eq!(classifier.class_of(9090, b"GET /search?q=1"), 0);
        assert_eq!(classifier.class_of(8080, b"GET /api/x"), 0);
    }

    #[test]
    fn the_coordinator_section_is_the_live_roles() {
        let message = parse(&format!(
            "{GOOD}\n[coordinator]\naddress = \"127.0.0.1:4433\"\nca_cert = \"/nonexistent/ca.crt\"\n\
             cert = \"/nonexistent/a.crt\"\nkey = \"/nonexistent/a.key\"\nspool_dir = \"/tmp/s\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(message.starts_with("coordinator.ca_cert:"), "{message}");
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
        assert!(
            message(&GOOD.replace(
                "role = \"shadow\"",
                "role = \"shadow\"\nresponse_timeout_ms = 0"
            ))
            .starts_with("response_timeout_ms: must be at least 10")
        );
    }
}
