//! The live role: attach the data path to the workload's interface, mirror sampled flows to the
//! shadows, and report every interval.
//!
//! Without a coordinator the report is one JSON line per interval on stdout (a supported mode:
//! pipe it into `jq`). The same interval also becomes a wire [`IntervalReport`] so the QUIC
//! reporter can send exactly what was printed.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use doppel_common::maps::{CLASS_FLOWS_COUNTER, CLASS_MIRRORED_COUNTER};
use doppel_common::wire::{
    AgentPolicy, Counter, EncodedHistogram, FlowScope, HistogramRecord, IntervalReport,
    LatencyMetric, PatternCount,
};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    config::LiveConfig,
    datapath::{Datapath, DatapathError, DatapathSettings, LatencyDrain, error_chain},
    metrics::ResourceSampler,
    mirror_devices::MirrorDevices,
    patterns::PatternCounts,
    policy::{self, CompiledPolicy},
};

/// Errors of the live role.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The data path failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The policy cannot be applied.
    #[error("invalid policy")]
    Policy(#[from] policy::PolicyError),
    /// A VXLAN device could not be created or removed.
    #[error(transparent)]
    Vxlan(#[from] crate::mirror_devices::DeviceError),
    /// The configuration could not be turned into a policy.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

/// Latency summary of one histogram for the JSON line, in microseconds.
#[derive(Debug, Serialize)]
pub struct LatencySummary {
    /// `addr:port`.
    pub service: String,
    /// Class id.
    pub class: u16,
    /// `all` or `mirrored`.
    pub scope: &'static str,
    /// Exchanges.
    pub count: u64,
    /// Percentiles and maximum, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

/// Flows of one class in the interval.
#[derive(Debug, Serialize)]
pub struct ClassFlows {
    /// Class id.
    pub class: u16,
    /// Class name.
    pub name: String,
    /// Flows classified (first payload seen).
    pub flows: u64,
    /// Of those, mirrored.
    pub sampled: u64,
    /// The class's sample rate in force in the data path, parts per million.
    pub rate_ppm: u32,
}

/// One interval, as printed.
#[derive(Debug, Serialize)]
pub struct IntervalLine {
    /// Report sequence number.
    pub seq: u64,
    /// Interval start, ms since the epoch.
    pub interval_start_unix_ms: u64,
    /// Interval length, ms.
    pub interval_ms: u32,
    /// Counter deltas.
    pub counters: BTreeMap<&'static str, u64>,
    /// Flows per class.
    pub classes: Vec<ClassFlows>,
    /// Exchange latency per service x class x scope.
    pub latency: Vec<LatencySummary>,
    /// Pattern keys of sampled new flows, with their share.
    pub patterns: Vec<(String, u64)>,
    /// Host resource use.
    pub host: doppel_common::wire::ResourceUsage,
    /// Workload resource use.
    pub workload: Option<doppel_common::wire::ResourceUsage>,
}

/// Report name of the host's IP fragments created (`/proc/net/snmp`, `Ip: FragCreates`, this
/// network namespace): while mirroring, the sign of copies too large for the path to a shadow.
pub const IP_FRAGMENTS_CREATED: &str = "ip_fragments_created";

/// `FragCreates` of `/proc/net/snmp` (0 when unreadable).
fn ip_fragments_created() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (Some(names), Some(values)) = (ip_lines.next(), ip_lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "FragCreates")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// The running live role: data path, VXLAN device, and what each report needs to remember.
#[derive(Debug)]
pub struct LiveAgent {
    config: LiveConfig,
    policy: AgentPolicy,
    datapath: Datapath,
    devices: MirrorDevices,
    drain: LatencyDrain,
    counters_before: BTreeMap<&'static str, u64>,
    class_before: BTreeMap<u16, (u64, u64)>,
    patterns: PatternCounts,
    sampler: ResourceSampler,
    seq: u64,
    interval_start: SystemTime,
}

/// Gives every session of `compiled` its device, then writes the policy, each session with the
/// device it leaves through, into the data path's maps.
fn apply(
    datapath: &mut Datapath,
    devices: &mut MirrorDevices,
    config: &LiveConfig,
    compiled: CompiledPolicy,
) -> Result<(), LiveError> {
    let (sessions, vxlan_ifindex) = devices.reconcile(&compiled.sessions)?;
    let settings = DatapathSettings {
        vxlan_ifindex,
        flow_idle_timeout: config.flow_idle_timeout(),
        pattern_sample_one_in: config.pattern_sample_one_in,
    };
    datapath.apply_policy(
        &CompiledPolicy {
            sessions,
            ..compiled
        },
        settings,
    )?;
    Ok(())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl LiveAgent {
    /// Loads the programs, creates the VXLAN device, applies the policy and attaches.
    pub fn start(config: LiveConfig) -> Result<Self, LiveError> {
        let policy = config.policy()?;
        let compiled = policy::compile(&policy)?;
        let mut datapath = Datapath::load()?;
        let mut devices = MirrorDevices::new(&config.vxlan.device, config.vxlan.port);
        let (services, sessions) = (compiled.services.len(), compiled.sessions.len());
        apply(&mut datapath, &mut devices, &config, compiled)?;
        datapath.attach(&config.interface, config.attach_mode)?;
        info!(
            interface = config.interface,
            services, sessions, "live data path running"
        );
        let sampler = ResourceSampler::new(config.workload_source());
        let mut agent = Self {
            config,
            policy,
            datapath,
            devices,
            drain: LatencyDrain::default(),
            counters_before: BTreeMap::new(),
            class_before: BTreeMap::new(),
            patterns: PatternCounts::default(),
            sampler,
            seq: 0,
            interval_start: SystemTime::now(),
        };
        // Baselines, so the first report covers only its own interval.
        agent.counter_deltas()?;
        agent.class_deltas()?;
        let pairs = agent.histogram_pairs();
        agent.datapath.drain_latency(&mut agent.drain, &pairs)?;
        Ok(agent)
    }

    /// Replaces the policy at run time: maps change in place, nothing is detached, and flows
    /// already decided keep their decision.
    ///
    /// Sessions' VXLAN devices follow the policy ([`MirrorDevices::reconcile`]): an agent whose
    /// file mirrors nothing learns its shadows from the coordinator.
    pub fn set_policy(&mut self, policy: AgentPolicy) -> Result<(), LiveError> {
        let compiled: CompiledPolicy = policy::compile(&policy)?;
        let had_devices = self.devices.any();
        apply(
            &mut self.datapath,
            &mut self.devices,
            &self.config,
            compiled,
        )?;
        if !had_devices && self.devices.any() {
            info!("VXLAN devices created for the coordinator's mirror sessions");
        }
        self.policy = policy;
        Ok(())
    }

    /// The report interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.policy.report_interval_ms))
    }

    fn histogram_pairs(&self) -> Vec<(u32, u32)> {
        let services = self.policy.services.len() as u32;
        (0..services)
            .flat_map(|s| {
                self.policy
                    .classes
                    .iter()
                    .map(move |c| (s, u32::from(c.id)))
            })
            .collect()
    }

    fn counter_deltas(&mut self) -> Result<BTreeMap<&'static str, u64>, LiveError> {
        let mut now: BTreeMap<_, _> = self.datapath.counters()?.into_iter().collect();
        // The live side's errors under the name the coordinator reads for every agent, so a
        // comparison has live's error rate beside each shadow's (the shadow counts the same
        // reply classes, plus the failures only a replayer sees: resets, timeouts, refusals).
        let errors = ["http_5xx", "error_replies"]
            .iter()
            .filter_map(|name| now.get(name))
            .sum();
        now.insert("exchange_errors", errors);
        now.insert(IP_FRAGMENTS_CREATED, ip_fragments_created());
        let deltas = now
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    v.saturating_sub(*self.counters_before.get(k).unwrap_or(&0)),
                )
            })
            .collect();
        self.counters_before = now;
        Ok(deltas)
    }

    /// Logs, once an interval, IP fragments the host created while it mirrors: a copy of a
    /// full-size packet is 50 bytes larger than the packet, and fragments when the path to a
    /// shadow has no room for it.
    fn warn_fragmented_copies(&self, counters: &BTreeMap<&'static str, u64>) {
        let fragments = counters.get(IP_FRAGMENTS_CREATED).copied().unwrap_or(0);
        if fragments == 0 || !self.devices.any() {
            return;
        }
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{}/mtu", self.config.interface))
            .ok()
            .and_then(|m| m.trim().parse::<u32>().ok());
        warn!(
            fragments,
            interface_mtu = ?mtu,
            "copies are being IP-fragmented: each copy adds 50 bytes (VXLAN, UDP, IP, Ethernet) \
             to the packet, so the path to the shadows needs an MTU 50 bytes above the \
             workload interface's (raise the underlay's MTU, e.g. jumbo frames)"
        );
    }

    fn class_deltas(&mut self) -> Result<Vec<ClassFlows>, LiveError> {
        let mut out = Vec::new();
        for class in &self.policy.classes {
            let now = self.datapath.class_flows(u32::from(class.id))?;
            let before = self.class_before.insert(class.id, now).unwrap_or((0, 0));
            out.push(ClassFlows {
                class: class.id,
                name: class.name.clone(),
                flows: now.0.saturating_sub(before.0),
                sampled: now.1.saturating_sub(before.1),
                rate_ppm: class.sample_rate_ppm,
            });
        }
        Ok(out)
    }

    /// Collects the interval that just ended.
    /// Logs, once an interval, copies that failed, with the kernel's error and its likely
    /// cause: the copies would otherwise only show in a counter.
    fn warn_clone_failures(&self, counters: &BTreeMap<&'static str, u64>) {
        let failed = counters
            .get(doppel_common::maps::DatapathCounter::CloneFailures.name())
            .copied()
            .unwrap_or(0);
        if failed == 0 {
            return;
        }
        let error = match self.datapath.last_clone_error() {
            Ok(Some(e)) => e.to_string(),
            _ => "unknown error".to_owned(),
        };
        warn!(
            failed,
            %error,
            device = %self.config.vxlan.device,
            "copies to the shadows failed: is the VXLAN device up and is there a route to each \
             shadow address?"
        );
    }

    pub fn report(&mut self) -> Result<(IntervalLine, IntervalReport), LiveError> {
        let end = SystemTime::now();
        let interval_ms = end
            .duration_since(self.interval_start)
            .map_or(0, |d| d.as_millis() as u32);
        let counters = self.counter_deltas()?;
        self.warn_clone_failures(&counters);
        self.warn_fragmented_copies(&counters);
        let classes = self.class_deltas()?;
        let pairs = self.histogram_pairs();
        let deltas = self.datapath.drain_latency(&mut self.drain, &pairs)?;
        for (_, head) in self.datapath.drain_pattern_samples()? {
            self.patterns.add(&head);
        }
        let patterns = self.patterns.take();
        let (host, workload) = self.sampler.sample();

        let mut latency = Vec::new();
        let mut histograms = Vec::new();
        for delta in deltas {
            let service = self
                .policy
                .services
                .get(delta.service_id as usize)
                .map(|s| std::net::SocketAddr::new(s.addr, s.port).to_string())
                .unwrap_or_default();
            let h = &delta.histogram;
            let us = |ns: u64| ns as f64 / 1000.0;
            latency.push(LatencySummary {
                service: service.clone(),
                class: delta.class as u16,
                scope: if delta.mirrored { "mirrored" } else { "all" },
                count: h.len(),
                p50_us: us(h.value_at_quantile(0.5)),
                p90_us: us(h.value_at_quantile(0.9)),
                p99_us: us(h.value_at_quantile(0.99)),
                max_us: us(h.max()),
            });
            match EncodedHistogram::encode(h) {
                Ok(encoded) => histograms.push(HistogramRecord {
                    service,
                    class: delta.class as u16,
                    scope: if delta.mirrored {
                        FlowScope::Mirrored
                    } else {
                        FlowScope::All
                    },
                    metric: LatencyMetric::KernelFirstByte,
                    histogram: encoded,
                }),
                Err(e) => warn!(error = %error_chain(&e), "histogram left out of the report"),
            }
        }
        let line_classes: Vec<(u16, u64, u64)> = classes
            .iter()
            .map(|c| (c.class, c.flows, c.sampled))
            .collect();
        let line = IntervalLine {
            seq: self.seq,
            interval_start_unix_ms: unix_ms(self.interval_start),
            interval_ms,
            counters: counters.clone(),
            classes,
            latency,
            patterns: patterns.clone(),
            host,
            workload,
        };
        let report = IntervalReport {
            seq: self.seq,
            interval_start_unix_ms: unix_ms(self.interval_start),
            interval_ms,
            histograms,
            counters: counters
                .into_iter()
                .map(|(name, value)| Counter {
                    name: name.to_owned(),
                    value,
                })
                .chain(line_classes.iter().flat_map(|&(class, flows, sampled)| {
                    // Per class, so the coordinator can scale the sampled pattern counts to
                    // flows and weigh each class by live's share.
                    [
                        Counter {
                            name: format!("{CLASS_FLOWS_COUNTER}{class}"),
                            value: flows,
                        },
                        Counter {
                            name: format!("{CLASS_MIRRORED_COUNTER}{class}"),
                            value: sampled,
                        },
                    ]
                }))
                .collect(),
            host,
            workload,
            patterns: patterns
                .into_iter()
                .map(|(pattern, flows)| PatternCount { pattern, flows })
                .collect(),
        };
        self.seq += 1;
        self.interval_start = end;
        Ok((line, report))
    }

    /// Detaches the programs and removes the VXLAN device.
    pub fn stop(mut self) -> Result<(), LiveError> {
        let detached = self.datapath.detach_all();
        let removed = self.devices.remove_all().map_err(LiveError::from);
        detached?;
        removed
    }
}
