//! The agent's TOML configuration, validated at start with errors that name the field. A
//! commented example is `examples/live.toml` (checked by `tests/tests/examples.rs`).
//!
//! ```toml
//! interface = "eth0"                 # the workload's interface
//! workload_name = "web"
//! report_interval_ms = 10000
//! default_sample_percent = 0.0       # class 0: flows no rule matches
//! [vxlan]                            # where clones leave (created and removed by the agent)
//! device = "doppel-vx0"              # session N's own device is doppel-vx0sN (see mirror_devices)
//! port = 4789
//! [workload]                         # optional: pid = 1234, or cgroup = "/sys/fs/cgroup/web"
//! pid = 1234
//! [[services]]
//! addr = "10.0.0.2"
//! port = 8080
//! [[classes]]
//! id = 1
//! name = "search"
//! sample_percent = 10.0
//! priority = 5
//! [[rules]]
//! class = 1
//! port = 8080
//! client_prefix = "10.0.0.0/8"
//! payload_prefix = "GET /api/search"
//! [[mirror_sessions]]
//! shadow = "10.1.0.2"
//! vni = 42
//! [coordinator]                      # optional: report over QUIC + mTLS (both roles, same section)
//! address = "10.0.0.1:4433"
//! ca_cert = "/etc/doppel/ca.crt"
//! cert = "/etc/doppel/web-1.crt"     # from `doppel ca issue --agent web-1`
//! key = "/etc/doppel/web-1.key"
//! spool_dir = "/var/lib/doppel/spool"
//! ```

use std::{net::IpAddr, path::Path, time::Duration};

use doppel_common::wire::{
    AgentPolicy, ClassPolicy, ClassRule, IpPrefix, MirrorSession, ServiceAddr,
};
use serde::Deserialize;

use crate::{datapath::AttachMode, metrics::WorkloadSource, policy::PPM};

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The path given.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML for this schema (the message names the field and line).
    // The source (printed after the path by an error chain) names the field and line.
    #[error("{path}")]
    Parse {
        /// The path given.
        path: String,
        /// Cause, naming the field.
        #[source]
        source: toml::de::Error,
    },
    /// A field has a value the agent cannot use.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, e.g. `services[0].addr`.
        field: String,
        /// Why.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What a configuration file runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The live role ([`LiveConfig`]); files without a `role` key are live files.
    Live,
    /// The shadow role ([`crate::shadow::config::ShadowConfig`]).
    Shadow,
}

/// Reads a TOML file into `T`; errors name the file, and for parse errors the field and line.
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: shown.clone(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: shown,
        source,
    })
}

/// Reads only the `role` key of a configuration file.
pub fn role_of(path: &Path) -> Result<Role, ConfigError> {
    let table: toml::Table = read_toml(path)?;
    match table.get("role") {
        None => Ok(Role::Live),
        Some(toml::Value::String(r)) if r == "live" => Ok(Role::Live),
        Some(toml::Value::String(r)) if r == "shadow" => Ok(Role::Shadow),
        Some(other) => Err(invalid(
            "role",
            format!("{other} is not a role; use \"live\" or \"shadow\""),
        )),
    }
}

/// The VXLAN device clones leave through.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VxlanConfig {
    /// Device name (at most 15 bytes).
    pub device: String,
    /// UDP destination port of the encapsulation.
    pub port: u16,
}

impl Default for VxlanConfig {
    fn default() -> Self {
        Self {
            device: "doppel-vx0".to_owned(),
            port: 4789,
        }
    }
}

/// A service as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Listening address.
    pub addr: IpAddr,
    /// TCP port.
    pub port: u16,
}

/// A class as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassConfigFile {
    /// Class id, 1..16 (0 is the default class).
    pub id: u16,
    /// Name for reports.
    pub name: String,
    /// Share of the class's flows mirrored, 0..=100.
    pub sample_percent: f64,
    /// Higher wins when rules of several classes match.
    #[serde(default)]
    pub priority: u16,
    /// The class's flows may spend the mirror budget's reserve, within a lane of 15 % of the
    /// budget, so common traffic that saturates the budget cannot turn them away.
    #[serde(default)]
    pub budget_priority: bool,
}

/// A rule as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Class assigned on match.
    pub class: u16,
    /// Destination port to match.
    pub port: Option<u16>,
    /// Client prefix, `addr/len`.
    pub client_prefix: Option<String>,
    /// Leading payload text to match.
    pub payload_prefix: Option<String>,
    /// Mask over `payload_prefix`, hex, same length (default: all bits).
    pub payload_mask_hex: Option<String>,
}

/// A mirror session as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// The shadow host's VXLAN endpoint.
    pub shadow: IpAddr,
    /// Session VNI (24 bits).
    pub vni: u32,
}

/// Where the workload's resources are read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    /// Root process of the workload.
    pub pid: Option<u32>,
    /// The workload's cgroup.
    pub cgroup: Option<std::path::PathBuf>,
}

/// Where reports go: the `[coordinator]` section of both roles' files (one type, one check, so
/// a live and a shadow agent are set up the same way). Without it the agent prints JSON lines
/// only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// The coordinator's QUIC address.
    pub address: std::net::SocketAddr,
    /// Name in the coordinator's certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// The coordinator CA's certificate (PEM).
    pub ca_cert: std::path::PathBuf,
    /// This agent's certificate (PEM), from `doppel ca issue`.
    pub cert: std::path::PathBuf,
    /// This agent's key (PEM).
    pub key: std::path::PathBuf,
    /// Directory of the on-disk spool of unacknowledged reports.
    pub spool_dir: std::path::PathBuf,
}

fn default_server_name() -> String {
    "localhost".to_owned()
}

impl CoordinatorConfig {
    /// Checks what TOML cannot: the certificate and key files exist. Errors name the field as
    /// `coordinator.<field>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, path) in [
            ("coordinator.ca_cert", &self.ca_cert),
            ("coordinator.cert", &self.cert),
            ("coordinator.key", &self.key),
        ] {
            if !path.is_file() {
                return Err(invalid(
                    field,
                    format!("{} is not a readable file", path.display()),
                ));
            }
        }
        if self.spool_dir.as_os_str().is_empty() {
            return Err(invalid("coordinator.spool_dir", "must not be empty"));
        }
        if self.server_name.is_empty() {
            return Err(invalid("coordinator.server_name", "must not be empty"));
        }
        Ok(())
    }
}

/// The live role's configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveConfig {
    /// `"live"` or absent (see [`role_of`]).
    #[serde(default)]
    pub role: Option<String>,
    /// Report to a coordinator (QUIC + mTLS) besides printing JSON lines.
    pub coordinator: Option<CoordinatorConfig>,
    /// The workload's interface.
    pub interface: String,
    /// Workload name in reports.
    #[serde(default = "default_workload_name")]
    pub workload_name: String,
    /// How programs are attached.
    #[serde(default)]
    pub attach_mode: AttachMode,
    /// Milliseconds between reports.
    #[serde(default = "default_interval_ms")]
    pub report_interval_ms: u32,
    /// Milliseconds after which an idle flow is forgotten. Files from before every duration was
    /// in milliseconds say `flow_idle_timeout_s`, which [`LiveConfig::load`] still reads.
    #[serde(default = "default_idle_timeout_ms")]
    pub flow_idle_timeout_ms: u64,
    /// One new flow in N is inspected for pattern discovery (0 = off).
    #[serde(default = "default_pattern_one_in")]
    pub pattern_sample_one_in: u32,
    /// Sampling epoch seed.
    #[serde(default)]
    pub sampling_seed: u64,
    /// Most new flows mirrored per second, held in the data path (0: no limit; a coordinator's
    /// policy sets its own).
    #[serde(default)]
    pub mirror_budget_flows_per_s: u32,
    /// Sample rate of class 0 (flows no rule matches), percent.
    #[serde(default)]
    pub default_sample_percent: f64,
    /// VXLAN device settings.
    #[serde(default)]
    pub vxlan: VxlanConfig,
    /// Where workload resource use is read.
    pub workload: Option<WorkloadConfig>,
    /// The workload's listening addresses.
    pub services: Vec<ServiceConfig>,
    /// Traffic classes.
    #[serde(default)]
    pub classes: Vec<ClassConfigFile>,
    /// Classification rules.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Shadows the sampled flows are mirrored to.
    #[serde(default)]
    pub mirror_sessions: Vec<SessionConfig>,
}

fn default_workload_name() -> String {
    "workload".to_owned()
}
const fn default_interval_ms() -> u32 {
    10_000
}
const fn default_idle_timeout_ms() -> u64 {
    300_000
}
const fn default_pattern_one_in() -> u32 {
    16
}

fn percent_to_ppm(field: &str, percent: f64) -> Result<u32, ConfigError> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(invalid(
            field,
            format!("{percent} is not a percentage between 0 and 100"),
        ));
    }
    Ok((percent / 100.0 * f64::from(PPM)).round() as u32)
}

fn parse_prefix(field: &str, text: &str) -> Result<IpPrefix, ConfigError> {
    let (addr, len) = text.split_once('/').unwrap_or((text, ""));
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| invalid(field, format!("{addr:?} is not an IP address")))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = if len.is_empty() {
        max
    } else {
        len.parse()
            .map_err(|_| invalid(field, format!("{len:?} is not a prefix length")))?
    };
    Ok(IpPrefix { addr, len })
}

fn parse_hex(field: &str, text: &str) -> Result<Vec<u8>, ConfigError> {
    if !text.len().is_multiple_of(2) {
        return Err(invalid(field, "hex needs an even number of digits"));
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| invalid(field, "not hex")))
        .collect()
}

impl LiveConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut table: toml::Table = read_toml(path)?;
        let (old, new) = ("flow_idle_timeout_s", "flow_idle_timeout_ms");
        if doppel_common::config::seconds_key_to_ms(&mut table, old, new)
            .map_err(|e| invalid(e.field(), e.to_string()))?
        {
            tracing::warn!(
                path = %path.display(),
                "`{old}` is deprecated: read as `{new}`, the same duration in milliseconds"
            );
        }
        let config: Self = table.try_into().map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what TOML cannot: the interface and service addresses exist on this host, sizes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.role.as_deref().is_some_and(|r| r != "live") {
            return Err(invalid("role", "this is the live role's file"));
        }
        if nix::net::if_::if_nametoindex(self.interface.as_str()).is_err() {
            return Err(invalid(
                "interface",
                format!("no interface {:?} on this host", self.interface),
            ));
        }
        if self.vxlan.device.is_empty() || self.vxlan.device.len() > 15 {
            return Err(invalid(
                "vxlan.device",
                "an interface name has 1 to 15 bytes",
            ));
        }
        if self.report_interval_ms < 100 {
            return Err(invalid("report_interval_ms", "must be at least 100"));
        }
        if self.flow_idle_timeout_ms < 1000 {
            return Err(invalid("flow_idle_timeout_ms", "must be at least 1000"));
        }
        let local: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
            .map(|addrs| {
                addrs
                    .filter_map(|a| a.address)
                    .filter_map(|s| {
                        s.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (i, service) in self.services.iter().enumerate() {
            if !local.contains(&service.addr) {
                return Err(invalid(
                    format!("services[{i}].addr"),
                    format!("{} is not an address of this host", service.addr),
                ));
            }
        }
        if let Some(coordinator) = &self.coordinator {
            coordinator.validate()?;
        }
        if let Some(workload) = &self.workload
            && workload.pid.is_some() == workload.cgroup.is_some()
        {
            return Err(invalid("workload", "give exactly one of pid or cgroup"));
        }
        crate::policy::compile(&self.policy()?).map_err(|e| invalid(e.field, e.reason))?;
        Ok(())
    }

    /// The workload policy this file describes (what a coordinator would otherwise send).
    pub fn policy(&self) -> Result<AgentPolicy, ConfigError> {
        let mut classes = vec![ClassPolicy {
            id: 0,
            name: "default".to_owned(),
            sample_rate_ppm: percent_to_ppm("default_sample_percent", self.default_sample_percent)?,
            priority: 0,
            budget_priority: false,
        }];
        for (i, class) in self.classes.iter().enumerate() {
            if class.id == 0 {
                return Err(invalid(
                    format!("classes[{i}].id"),
                    "class 0 is the default class; use default_sample_percent",
                ));
            }
            classes.push(ClassPolicy {
                id: class.id,
                name: class.name.clone(),
                sample_rate_ppm: percent_to_ppm(
                    &format!("classes[{i}].sample_percent"),
                    class.sample_percent,
                )?,
                priority: class.priority,
                budget_priority: class.budget_priority,
            });
        }
        let rules = self
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                let prefix = rule
                    .client_prefix
                    .as_deref()
                    .map(|p| parse_prefix(&format!("rules[{i}].client_prefix"), p))
                    .transpose()?;
                let mask = rule
                    .payload_mask_hex
                    .as_deref()
                    .map(|m| parse_hex(&format!("rules[{i}].payload_mask_hex"), m))
                    .transpose()?
                    .unwrap_or_default();
                Ok(ClassRule {
                    class: rule.class,
                    port: rule.port,
                    client_prefix: prefix,
                    payload_prefix: rule.payload_prefix.clone().unwrap_or_default().into_bytes(),
                    payload_mask: mask,
                })
            })
            .collect::<Result<_, ConfigError>>()?;
        Ok(AgentPolicy {
            workload: self.workload_name.clone(),
            report_interval_ms: self.report_interval_ms,
            services: self
                .services
                .iter()
                .map(|s| ServiceAddr {
                    addr: s.addr,
                    port: s.port,
                })
                .collect(),
            classes,
            rules,
            mirror_sessions: self
                .mirror_sessions
                .iter()
                .map(|s| MirrorSession {
                    shadow_addr: s.shadow,
                    vni: s.vni,
                })
                .collect(),
            sampling_seed: self.sampling_seed,
            mirror_budget_flows_per_s: self.mirror_budget_flows_per_s,
        })
    }

    /// Where the workload's resource use is read, if configured.
    pub fn workload_source(&self) -> Option<WorkloadSource> {
        let w = self.workload.as_ref()?;
        w.pid
            .map(WorkloadSource::Pid)
            .or_else(|| w.cgroup.clone().map(WorkloadSource::Cgroup))
    }

    /// Idle timeout as a duration.
    pub fn flow_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.flow_idle_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<LiveConfig, ConfigError> {
        let config: LiveConfig = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: "t".into(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    const GOOD: &str = r#"
        interface = "lo"
        [[services]]
        addr = "127.0.0.1"
        port = 8080
        [[classes]]
        id = 1
        name = "api"
        sample_percent = 12.5
        [[rules]]
        class = 1
        payload_prefix = "GET /api"
        client_prefix = "127.0.0.0/8"
        [[mirror_sessions]]
        shadow = "10.9.0.2"
        vni = 42
    "#;

    #[test]
    fn the_idle_timeout_in_seconds_is_still_read_and_never_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, extra: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("{extra}\n{GOOD}")).expect("write");
            path
        };
        let old = LiveConfig::load(&file("old.toml", "flow_idle_timeout_s = 42")).expect("old key");
        assert_eq!(old.flow_idle_timeout(), Duration::from_secs(42));
        let new = LiveConfig::load(&file("new.toml", "flow_idle_timeout_ms = 42500")).expect("new");
        assert_eq!(new.flow_idle_timeout(), Duration::from_millis(42_500));
        let both = file(
            "both.toml",
            "flow_idle_timeout_s = 1\nflow_idle_timeout_ms = 1000",
        );
        match LiveConfig::load(&both) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "flow_idle_timeout_s"),
            other => panic!("expected the old key named, got {other:?}"),
        }
        match LiveConfig::load(&file("short.toml", "flow_idle_timeout_ms = 999")) {
            Err(ConfigError::Invalid { field, .. }) => assert_eq!(field, "flow_idle_timeout_ms"),
            other => panic!("expected a too-short timeout refused, got {other:?}"),
        }
    }

    #[test]
    fn a_good_file_becomes_a_policy() {
        let policy = parse(GOOD).unwrap().policy().unwrap();
        assert_eq!(policy.classes[1].sample_rate_ppm, 125_000);
        assert_eq!(policy.rules[0].payload_prefix, b"GET /api");
        assert_eq!(policy.rules[0].client_prefix.unwrap().len, 8);
        assert_eq!(policy.mirror_sessions[0].vni, 42);
    }

    #[test]
    fn errors_name_the_field() {
        let message = |text: &str| crate::datapath::error_chain(&parse(text).unwrap_err());
        assert!(message(&GOOD.replace("\"lo\"", "\"nosuch0\"")).starts_with("interface:"));
        assert!(message(&GOOD.replace("127.0.0.1", "192.0.2.77")).starts_with("services[0].addr:"));
        assert!(message(&GOOD.replace("12.5", "150")).starts_with("classes[0].sample_percent:"));
        assert!(
            message(&GOOD.replace("vni = 42", "vni = 99999999"))
                .starts_with("mirror_sessions[0].vni:")
        );
        assert!(
            message(&GOOD.replace("127.0.0.0/8", "127.0.0.0/40"))
                .starts_with("rules[0].client_prefix:")
        );
        let unknown = message(&GOOD.replace("interface = ", "interfaces = "));
        assert!(unknown.contains("interfaces"), "{unknown}");
    }
}
