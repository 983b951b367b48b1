//! The shadow role: receive mirrored flows, rebuild each client stream, replay it against the
//! local shadow workload, time every exchange, and throw the responses away.
//!
//! The pure pieces live in their own modules so they can be tested without sockets: [`vxlan`]
//! decodes mirror datagrams, [`reassembly`] rebuilds streams, [`http`] and [`exchange`] cut them
//! into exchanges. [`receiver`] owns the mirror socket and the flow table, [`replay`] runs one
//! task per flow copy. This module wires them to the data path (XDP admission on the receiving
//! interface, the live role's TC latency programs where replayed connections reach the
//! workload) and reports every interval.
//!
//! A coordinator's policy ([`ShadowAgent::set_policy`]) sets the classes, rules and report
//! interval of both measurements, so a shadow's histograms carry the live host's class ids and
//! line up with its intervals. What the shadow admits and replays (sessions, ports, replay
//! address, HTTP lists) stays the file's: the coordinator's policy describes the live side.

pub mod config;
pub mod exchange;
pub mod framing;
pub mod http;
pub mod reassembly;
pub mod receiver;
pub mod replay;
pub mod stats;
pub mod timer;
pub mod vxlan;

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock, atomic::AtomicBool},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use doppel_common::wire::{
    AgentPolicy, Counter, EncodedHistogram, FlowScope, HistogramRecord, IntervalReport,
    LatencyMetric, PatternCount, ResourceUsage,
};
use serde::Serialize;
use tracing::{info, warn};

use self::{
    config::{FlowClassifier, ShadowConfig},
    framing::postgres::Credentials,
    receiver::Receiver,
    replay::{ReplaySettings, ServiceReplay},
    stats::{REPLAY_LAG_MS, ShadowCounter, ShadowStats},
};

/// Report name of the kernel's drops on the mirror socket.
pub const MIRROR_DROPS: &str = "mirror_drops";
/// A replay this far behind the original timing is logged.
const LAG_WARNING: Duration = Duration::from_millis(100);
/// Receive buffer asked for on the mirror socket: about 0.3 s of mirror traffic at 50,000
/// datagrams/s, so a scheduling hiccup of the receiver does not drop copies.
const MIRROR_RCVBUF: usize = 32 << 20;

/// Sizes the mirror socket's receive buffer, past `net.core.rmem_max` where the agent may
/// (root's `SO_RCVBUFFORCE`), else as far as the limit allows.
fn size_receive_buffer(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &MIRROR_RCVBUF).is_err()
        && let Err(e) = setsockopt(socket, sockopt::RcvBuf, &MIRROR_RCVBUF)
    {
        warn!(error = %e, "cannot size the mirror socket's receive buffer");
    }
}

/// The kernel's drop count of one UDP socket, from `/proc/net/udp{,6}` (the `drops` column of
/// the line whose inode is the socket's). `SO_RXQ_OVFL` would carry the same count in every
/// datagram's control message; reading it once per report costs nothing on the receive path.
#[derive(Debug)]
struct SocketDrops {
    inode: Option<u64>,
}

impl SocketDrops {
    fn of(socket: &tokio::net::UdpSocket) -> Self {
        let inode = nix::sys::stat::fstat(socket).ok().map(|st| st.st_ino);
        Self { inode }
    }

    /// Cumulative drops (0 when the socket cannot be found).
    fn read(&self) -> u64 {
        let Some(inode) = self.inode else {
            return 0;
        };
        ["/proc/net/udp", "/proc/net/udp6"]
            .iter()
            .filter_map(|path| std::fs::read_to_string(path).ok())
            .flat_map(|table| {
                table
                    .lines()
                    .skip(1)
                    .filter_map(|line| {
                        let fields: Vec<&str> = line.split_whitespace().collect();
                        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref ptr drops
                        (fields.get(9)?.parse::<u64>().ok()? == inode)
                            .then(|| fields.get(12)?.parse::<u64>().ok())
                            .flatten()
                    })
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}
use crate::{
    datapath::{
        Datapath, DatapathError, DatapathSettings, LatencyDrain, XdpAdmission, error_chain,
    },
    metrics::ResourceSampler,
    policy,
};

/// Errors of the shadow role.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    /// The data path (XDP admission, TC latency) failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The kernel measurement's policy cannot be applied.
    #[error("invalid measurement policy")]
    Policy(#[from] policy::PolicyError),
    /// The mirror socket could not be bound.
    #[error("binding the mirror socket {addr}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Latency summary of one histogram for the JSON line, in microseconds.
#[derive(Debug, Serialize)]
pub struct ShadowLatency {
    /// `kernel` (TC, as on the live host), `replay_first_byte` or `replay_last_byte`.
    pub source: &'static str,
    /// `addr:port` for kernel figures; empty for the replayer's.
    pub service: String,
    /// Class id.
    pub class: u16,
    /// Exchanges.
    pub count: u64,
    /// Median, µs.
    pub p50_us: f64,
    /// 90th percentile, µs.
    pub p90_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Largest, µs.
    pub max_us: f64,
}

/// One interval, as printed.
#[derive(Debug, Serialize)]
pub struct ShadowLine {
    /// Always `shadow`.
    pub role: &'static str,
    /// Report sequence number.
    pub seq: u64,
    /// Interval start, ms since the epoch.
    pub interval_start_unix_ms: u64,
    /// Interval length, ms.
    pub interval_ms: u32,
    /// Offered load replayed: exchanges per second in the interval.
    pub exchanges_per_s: f64,
    /// Counter deltas (shadow counters, XDP admission counters, data-path counters).
    pub counters: BTreeMap<String, u64>,
    /// Latency per source x service x class.
    pub latency: Vec<ShadowLatency>,
    /// Pattern keys of the flows whose replay started in the interval, most frequent first.
    pub patterns: Vec<(String, u64)>,
    /// Host resource use.
    pub host: ResourceUsage,
    /// Shadow workload resource use.
    pub workload: Option<ResourceUsage>,
}

/// The running shadow role.
#[derive(Debug)]
pub struct ShadowAgent {
    config: Arc<ShadowConfig>,
    /// The in-kernel measurement's policy (the file's, or derived from the coordinator's).
    policy: AgentPolicy,
    /// The replayer's classes, built from `policy`.
    classifier: Arc<RwLock<FlowClassifier>>,
    datapath: Option<Datapath>,
    admission: Option<XdpAdmission>,
    stats: Arc<ShadowStats>,
    /// Kernel drops on the mirror socket (its receive queue overflowed).
    mirror_drops: SocketDrops,
    receiver: tokio::task::JoinHandle<()>,
    /// Tells the receiver to end every flow and take no more (the agent is stopping).
    end_flows: tokio::sync::watch::Sender<bool>,
    /// Tells every replay to count its backlog and end (the drain deadline passed).
    stop_replays: tokio::sync::watch::Sender<bool>,
    drain: LatencyDrain,
    sampler: ResourceSampler,
    counters_before: BTreeMap<String, u64>,
    seq: u64,
    interval_start: SystemTime,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn summary(
    source: &'static str,
    service: String,
    class: u16,
    h: &hdrhistogram::Histogram<u64>,
) -> ShadowLatency {
    let us = |ns: u64| ns as f64 / 1000.0;
    ShadowLatency {
        source,
        service,
        class,
        count: h.len(),
        p50_us: us(h.value_at_quantile(0.5)),
        p90_us: us(h.value_at_quantile(0.9)),
        p99_us: us(h.value_at_quantile(0.99)),
        max_us: us(h.max()),
    }
}

impl ShadowAgent {
    /// Loads and attaches what the configuration asks for, binds the mirror socket and starts
    /// receiving. Must run inside a tokio runtime.
    pub fn start(config: ShadowConfig) -> Result<Self, ShadowError> {
        let config = Arc::new(config);
        let policy = config.kernel_policy();
        let needs_datapath = config.replay_interface.is_some() || config.xdp_interface.is_some();
        let mut datapath = if needs_datapath {
            Some(Datapath::load()?)
        } else {
            None
        };
        let mut admission = None;
        if let Some(datapath) = datapath.as_mut() {
            if let Some(iface) = &config.replay_interface {
                let compiled = policy::compile(&policy)?;
                let settings = DatapathSettings {
                    vxlan_ifindex: 0,
                    flow_idle_timeout: Duration::from_millis(config.flow_idle_timeout_ms),
                    pattern_sample_one_in: 0,
                };
                datapath.apply_policy(&compiled, settings)?;
                datapath.attach(iface, config.attach_mode)?;
            }
            if let Some(iface) = &config.xdp_interface {
                let admitted: Vec<_> = config.sessions.iter().map(|s| (s.source, s.vni)).collect();
                admission =
                    Some(datapath.attach_admission(iface, config.listen.port(), &admitted)?);
            }
        }
        let socket = std::net::UdpSocket::bind(config.listen)
            .and_then(|s| {
                s.set_nonblocking(true)?;
                size_receive_buffer(&s);
                tokio::net::UdpSocket::from_std(s)
            })
            .map_err(|source| ShadowError::Bind {
                addr: config.listen,
                source,
            })?;
        let mirror_drops = SocketDrops::of(&socket);
        let stats = Arc::new(ShadowStats::default());
        let (stop_replays, stop) = tokio::sync::watch::channel(false);
        let (end_flows, end_flows_rx) = tokio::sync::watch::channel(false);
        let settings = Arc::new(ReplaySettings {
            stop,
            policy: Arc::new(config.http.clone()),
            time_compression: config.time_compression,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            response_timeout: Duration::from_millis(config.response_timeout_ms),
            max_exchange: config.max_flow_buffer_bytes,
            epoch: Instant::now(),
            services: config
                .services
                .iter()
                .map(|s| {
                    let credentials =
                        (s.user.is_some() || s.password.is_some()).then(|| Credentials {
                            user: s.user.clone(),
                            password: s.password.clone(),
                        });
                    let replay = ServiceReplay {
                        protocol: s.protocol,
                        credentials,
                        warned_login: AtomicBool::new(false),
                    };
                    (s.port, replay)
                })
                .collect(),
        });
        let classifier = Arc::new(RwLock::new(FlowClassifier::from_policy(&policy)));
        let receiver = Receiver::new(
            Arc::clone(&config),
            Arc::clone(&classifier),
            Arc::clone(&stats),
            settings,
        );
        let receiver = tokio::spawn(receiver.run(socket, end_flows_rx));
        info!(
            listen = %config.listen,
            sessions = config.sessions.len(),
            replay_addr = %config.replay_addr,
            "shadow role running"
        );
        let sampler = ResourceSampler::new(config.workload_source());
        let mut agent = Self {
            config,
            policy,
            classifier,
            datapath,
            admission,
            stats,
            mirror_drops,
            receiver,
            end_flows,
            stop_replays,
            drain: LatencyDrain::default(),
            sampler,
            counters_before: BTreeMap::new(),
            seq: 0,
            interval_start: SystemTime::now(),
        };
        // Baselines, so the first report covers only its own interval.
        agent.counter_deltas()?;
        let pairs = agent.histogram_pairs();
        if let Some(datapath) = &agent.datapath {
            datapath.drain_latency(&mut agent.drain, &pairs)?;
        }
        Ok(agent)
    }

    /// The report interval (the file's until a coordinator's policy sets it).
    pub fn interval(&self) -> Duration {
        Duration::from_millis(u64::from(self.policy.report_interval_ms))
    }

    /// Applies a coordinator's policy: its classes and rules to the in-kernel measurement on
    /// the replay interface and to the replayer, its report interval to the reports (see
    /// [`ShadowConfig::kernel_policy_under`]). Nothing is detached; flows already being replayed
    /// keep their class. A policy that cannot be applied leaves everything as it was.
    ///
    /// An agent the coordinator has in no workload gets an empty policy: the classes in force
    /// (the file's, or an earlier coordinator policy's) stay until it is placed in one.
    pub fn set_policy(&mut self, coordinator: &AgentPolicy) -> Result<(), ShadowError> {
        if coordinator.workload.is_empty() {
            info!("the coordinator has this shadow in no workload; the classes in force stay");
            return Ok(());
        }
        let policy = self.config.kernel_policy_under(coordinator);
        let compiled = policy::compile(&policy)?;
        if let Some(datapath) = self.datapath.as_mut()
            && self.config.replay_interface.is_some()
        {
            let settings = DatapathSettings {
                vxlan_ifindex: 0,
                flow_idle_timeout: Duration::from_millis(self.config.flow_idle_timeout_ms),
                pattern_sample_one_in: 0,
            };
            datapath.apply_policy(&compiled, settings)?;
        }
        *self.classifier.write().unwrap_or_else(|e| e.into_inner()) =
            FlowClassifier::from_policy(&policy);
        self.policy = policy;
        Ok(())
    }

    fn histogram_pairs(&self) -> Vec<(u32, u32)> {
        if self.config.replay_interface.is_none() {
            return Vec::new();
        }
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

    fn counter_deltas(&mut self) -> Result<BTreeMap<String, u64>, ShadowError> {
        let mut now: BTreeMap<String, u64> = self
            .stats
            .counters()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        now.insert(MIRROR_DROPS.to_owned(), self.mirror_drops.read());
        if let Some(datapath) = &self.datapath {
            if self.admission.is_some() {
                now.extend(
                    datapath
                        .admission_counters()?
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v)),
                );
            }
            if self.config.replay_interface.is_some() {
                for (name, value) in datapath.counters()? {
                    // Prefixed: these are the measurement's own counters, not the replayer's.
                    now.insert(format!("kernel_{name}"), value);
                }
            }
        }
        let deltas = now
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.saturating_sub(*self.counters_before.get(k).unwrap_or(&0)),
                )
            })
            .collect();
        self.counters_before = now;
        Ok(deltas)
    }

    /// Logs, at most once an interval each, the failures a counter alone would leave silent,
    /// with their likely cause.
    fn warn_failures(&self, counters: &BTreeMap<String, u64>) {
        let replay_addr = self.config.replay_addr;
        for (counter, cause) in [
            (
                ShadowCounter::ConnectFailures,
                "the shadow workload refused replay connections: is it running and listening on \
                 replay_addr and the service port?",
            ),
            (
                ShadowCounter::ConnectTimeouts,
                "replay connections to the shadow workload timed out",
            ),
            (
                ShadowCounter::ResponseTimeouts,
                "the shadow workload left responses unanswered within response_timeout_ms (it is \
                 overloaded or stuck, or the requests are ones it never answers); flows carried on",
            ),
            (
                ShadowCounter::AbandonedProtocol,
                "replayed flows were given up: their bytes or the workload's responses broke the \
                 protocol framing (set the service's protocol, or `opaque`, if detection is wrong)",
            ),
        ] {
            let count = counters.get(counter.name()).copied().unwrap_or(0);
            if count > 0 {
                warn!(count, %replay_addr, counter = counter.name(), "{cause}");
            }
        }
        let refused = [
            ShadowCounter::NotAdmitted.name(),
            doppel_common::maps::AdmitCounter::NotAdmitted.name(),
        ]
        .iter()
        .map(|name| counters.get(*name).copied().unwrap_or(0))
        .sum::<u64>();
        if refused > 0 {
            let seen = match &self.datapath {
                Some(datapath) if self.admission.is_some() => {
                    datapath.last_rejected().ok().flatten()
                }
                _ => self.stats.last_rejected(),
            };
            match seen {
                Some((source, vni)) => warn!(
                    count = refused,
                    %source,
                    vni,
                    "mirror datagrams not admitted: no [[sessions]] entry has this source and \
                     VNI; if it is a live agent of this shadow's workload, add \
                     `[[sessions]] source = \"{source}\", vni = {vni}`"
                ),
                None => warn!(
                    count = refused,
                    "mirror datagrams not admitted: check [[sessions]] source and vni"
                ),
            }
        }
    }

    /// Collects the interval that just ended.
    pub fn report(&mut self) -> Result<(ShadowLine, IntervalReport), ShadowError> {
        let end = SystemTime::now();
        let interval_ms = end
            .duration_since(self.interval_start)
            .map_or(0, |d| d.as_millis() as u32);
        let mut counters = self.counter_deltas()?;
        // A gauge, not a delta: how far behind the original timing the replay fell.
        let lag = self.stats.take_max_lag();
        counters.insert(REPLAY_LAG_MS.to_owned(), lag.as_millis() as u64);
        if lag >= LAG_WARNING {
            warn!(
                lag_ms = lag.as_millis() as u64,
                "the shadow cannot keep up with the live timing: messages were replayed late"
            );
        }
        let drops = counters.get(MIRROR_DROPS).copied().unwrap_or(0);
        if drops > 0 {
            warn!(
                drops,
                "mirror datagrams dropped by the kernel: the receive queue overflowed"
            );
        }
        self.warn_failures(&counters);
        let pairs = self.histogram_pairs();
        let kernel = match &self.datapath {
            Some(datapath) => datapath.drain_latency(&mut self.drain, &pairs)?,
            None => Vec::new(),
        };
        let replayed = self.stats.take_latency();
        let patterns = self.stats.take_patterns();
        let (host, workload) = self.sampler.sample();
        let mut latency = Vec::new();
        let mut histograms = Vec::new();
        let mut push = |metric, service: String, class: u16, h: &hdrhistogram::Histogram<u64>| {
            let source = match metric {
                LatencyMetric::KernelFirstByte => "kernel",
                LatencyMetric::ReplayFirstByte => "replay_first_byte",
                LatencyMetric::ReplayLastByte => "replay_last_byte",
            };
            latency.push(summary(source, service.clone(), class, h));
            match EncodedHistogram::encode(h) {
                Ok(histogram) => histograms.push(HistogramRecord {
                    service,
                    class,
                    scope: FlowScope::All,
                    metric,
                    histogram,
                }),
                Err(e) => warn!(error = %error_chain(&e), "histogram left out of the report"),
            }
        };
        for delta in kernel.iter().filter(|d| !d.mirrored) {
            let service = self
                .policy
                .services
                .get(delta.service_id as usize)
                .map(|s| std::net::SocketAddr::new(s.addr, s.port).to_string())
                .unwrap_or_default();
            push(
                LatencyMetric::KernelFirstByte,
                service,
                delta.class as u16,
                &delta.histogram,
            );
        }
        for (class, h) in &replayed {
            push(
                LatencyMetric::ReplayFirstByte,
                String::new(),
                *class,
                &h.first_byte,
            );
            push(
                LatencyMetric::ReplayLastByte,
                String::new(),
                *class,
                &h.last_byte,
            );
        }
        let exchanges = counters
            .get(ShadowCounter::Exchanges.name())
            .copied()
            .unwrap_or(0);
        let line = ShadowLine {
            role: "shadow",
            seq: self.seq,
            interval_start_unix_ms: unix_ms(self.interval_start),
            interval_ms,
            exchanges_per_s: if interval_ms == 0 {
                0.0
            } else {
                exchanges as f64 * 1000.0 / f64::from(interval_ms)
            },
            counters: counters.clone(),
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
                .map(|(name, value)| Counter { name, value })
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

    /// Stops receiving and detaches everything.
    /// Stops taking flows and gives the replays up to `drain_timeout_ms` to finish the backlog
    /// they hold; then makes the rest count what they did not write (`exchanges_unreplayed`,
    /// `bytes_unreplayed`) and end. Report after it, so the last interval carries the counts.
    pub async fn drain(&mut self) {
        let _ = self.end_flows.send(true);
        let _ = (&mut self.receiver).await;
        let deadline = Instant::now() + Duration::from_millis(self.config.drain_timeout_ms);
        while self.stats.active_replays() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let unfinished = self.stats.active_replays();
        if unfinished == 0 {
            return;
        }
        let _ = self.stop_replays.send(true);
        let counted = Instant::now() + Duration::from_secs(1);
        while self.stats.active_replays() > 0 && Instant::now() < counted {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        warn!(
            replays = unfinished,
            drain_timeout_ms = self.config.drain_timeout_ms,
            "stopped with replays unfinished: their backlog is counted in exchanges_unreplayed \
             and bytes_unreplayed"
        );
    }

    pub fn stop(mut self) -> Result<(), ShadowError> {
        self.receiver.abort();
        let mut result = Ok(());
        if let Some(datapath) = self.datapath.as_mut() {
            if let Some(admission) = self.admission.take()
                && let Err(e) = datapath.detach_admission(admission)
            {
                result = Err(e.into());
            }
            if let Err(e) = datapath.detach_all() {
                result = result.and(Err(e.into()));
            }
        }
        result
    }
}
