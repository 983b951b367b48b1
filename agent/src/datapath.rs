//! The agent's eBPF data path: load the embedded object, attach its TC programs to interfaces,
//! read their maps, detach.
//!
//! Attachment uses TCX links where the kernel has them (6.6+): a link belongs to the agent's
//! file descriptor, so a crashed agent leaves nothing attached. Elsewhere it falls back to the
//! classic `clsact` qdisc with `cls_bpf` filters, which outlive the process; there the agent
//! removes filters left by an earlier instance before attaching, and deletes the qdisc on detach
//! when it was the one that added it.

use std::collections::BTreeMap;

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapError,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
};
use doppel_common::maps::{
    CLASS_BUDGET_PRIORITY, Direction, IFACE_COUNTERS_MAP, IfaceCounters, MIRROR_BUDGET_RESERVE_NS,
    MIRROR_PRIORITY_SHARE_PPM, MIRROR_RESERVE_MIN_FLOWS, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM,
    TSTAMP_TYPE_READABLE_GLOBAL, iface_slot,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::netlink;

/// The eBPF object built from `agent-ebpf` by `build.rs`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/doppel-agent-ebpf"));

/// How TC programs are attached.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX where the kernel has it, `clsact` otherwise.
    #[default]
    Auto,
    /// TCX links only (kernel 6.6+).
    Tcx,
    /// Classic `clsact` qdisc and `cls_bpf` filters.
    Clsact,
}

/// Errors of the data path. Each names what failed and keeps the cause.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The kernel refused to load the object; usually missing privileges.
    #[error(
        "loading the eBPF object failed (the agent needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)"
    )]
    Load(#[source] Box<EbpfError>),
    /// A program the agent expects is not in the embedded object (a build mismatch).
    #[error("program {0} is missing from the embedded eBPF object")]
    MissingProgram(&'static str),
    /// A map the agent expects is not in the embedded object.
    #[error("map {0} is missing from the embedded eBPF object")]
    MissingMap(&'static str),
    /// The interface does not exist in the agent's network namespace.
    #[error("interface {iface:?} does not exist")]
    NoSuchInterface {
        /// Interface name as configured.
        iface: String,
    },
    /// A program could not be loaded into the kernel or attached.
    #[error("{action} program {program} on {iface:?} failed")]
    Program {
        /// What was being done.
        action: &'static str,
        /// Which program.
        program: &'static str,
        /// Which interface.
        iface: String,
        /// Cause (includes the verifier log for load failures).
        #[source]
        source: Box<ProgramError>,
    },
    /// A map could not be read.
    #[error("reading map {map} failed")]
    Map {
        /// Which map.
        map: &'static str,
        /// Cause.
        #[source]
        source: MapError,
    },
    /// The `clsact` qdisc could not be removed.
    #[error("removing the clsact qdisc from interface {ifindex} failed")]
    Qdisc {
        /// Interface index.
        ifindex: u32,
        /// Cause.
        #[source]
        source: netlink::NetlinkError,
    },
}

/// How one interface ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Attached {
    /// TCX links.
    Tcx,
    /// `clsact` filters; `owns_qdisc` when the agent added the qdisc and so removes it.
    Clsact {
        /// Whether the agent added the qdisc.
        owns_qdisc: bool,
    },
}

#[derive(Debug)]
struct Attachment {
    ifindex: u32,
    how: Attached,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

/// Counters of one interface and direction, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct IfaceCount {
    /// Interface index (in the agent's namespace).
    pub ifindex: u32,
    /// Direction.
    pub direction: &'static str,
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen.
    pub bytes: u64,
}

/// The loaded eBPF object and the interfaces its TC programs are attached to. Dropping it
/// detaches everything.
pub struct Datapath {
    ebpf: Ebpf,
    attached: BTreeMap<String, Attachment>,
    /// Every ifindex ever attached by this instance, so counts stay readable after a detach.
    counted_ifindexes: std::collections::BTreeSet<u32>,
    patterns: Option<aya::maps::RingBuf<aya::maps::MapData>>,
}

/// Whether this kernel lets TC programs read `__sk_buff.tstamp_type` (Linux 5.18 and later),
/// which egress needs to take TCP's send stamp for the clock. A version that cannot be read
/// counts as older: the programs then read the clock, which every kernel allows.
fn tstamp_type_readable() -> bool {
    aya::util::KernelVersion::current()
        .is_ok_and(|version| version >= aya::util::KernelVersion::new(5, 18, 0))
}

impl Datapath {
    /// Loads the embedded object and its TC programs into the kernel (nothing is attached yet).
    pub fn load() -> Result<Self, DatapathError> {
        let tstamp_type_readable = u8::from(tstamp_type_readable());
        let mut ebpf = EbpfLoader::new()
            .override_global(TSTAMP_TYPE_READABLE_GLOBAL, &tstamp_type_readable, true)
            .load(EBPF_OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [TC_INGRESS_PROGRAM, TC_EGRESS_PROGRAM] {
            load_program(classifier(&mut ebpf, name)?).map_err(|source| {
                DatapathError::Program {
                    action: "loading",
                    program: name,
                    iface: String::new(),
                    source: Box::new(source),
                }
            })?;
        }
        Ok(Self {
            ebpf,
            attached: BTreeMap::new(),
            counted_ifindexes: std::collections::BTreeSet::new(),
            patterns: None,
        })
    }

    /// Attaches the ingress and egress programs to `iface`.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<Attached, DatapathError> {
        let ifindex = ifindex(iface)?;
        if self.attached.contains_key(iface) {
            self.detach(iface)?;
        }
        let how = match mode {
            AttachMode::Tcx => self.attach_tcx(iface)?,
            AttachMode::Clsact => self.attach_clsact(iface)?,
            AttachMode::Auto => match self.attach_tcx(iface) {
                Ok(done) => done,
                Err(e) => {
                    warn!(iface, error = %error_chain(&e), "TCX attach failed; falling back to clsact");
                    self.attach_clsact(iface)?
                }
            },
        };
        let (ingress, egress) = how.1;
        self.counted_ifindexes.insert(ifindex);
        self.attached.insert(
            iface.to_owned(),
            Attachment {
                ifindex,
                how: how.0,
                ingress,
                egress,
            },
        );
        info!(iface, ifindex, how = ?how.0, "attached TC programs");
        Ok(how.0)
    }

    fn attach_tcx(
        &mut self,
        iface: &str,
    ) -> Result<(Attached, (SchedClassifierLinkId, SchedClassifierLinkId)), DatapathError> {
        let opts = || TcAttachOptions::TcxOrder(LinkOrder::default());
        let links = self.attach_both(iface, opts)?;
        Ok((Attached::Tcx, links))
    }

    fn attach_clsact(
        &mut self,
        iface: &str,
    ) -> Result<(Attached, (SchedClassifierLinkId, SchedClassifierLinkId)), DatapathError> {
        // Adding fails when the qdisc exists already: someone else's (not ours to delete), or
        // one a crashed agent added, recognisable by the filters it left. Those filters would
        // count every packet twice, so they go, and the qdisc is adopted.
        let mut owns_qdisc = tc::qdisc_add_clsact(iface).is_ok();
        for (attach_type, name) in programs() {
            if tc::qdisc_detach_program(iface, attach_type, name).is_ok() {
                info!(
                    iface,
                    program = name,
                    "removed a filter left by an earlier agent"
                );
                owns_qdisc = true;
            }
        }
        let opts = || TcAttachOptions::Netlink(NlOptions::default());
        let links = self.attach_both(iface, opts)?;
        Ok((Attached::Clsact { owns_qdisc }, links))
    }

    fn attach_both(
        &mut self,
        iface: &str,
        options: impl Fn() -> TcAttachOptions,
    ) -> Result<(SchedClassifierLinkId, SchedClassifierLinkId), DatapathError> {
        let [(ingress_type, ingress_name), (egress_type, egress_name)] = programs();
        let ingress = self.attach_one(iface, ingress_name, ingress_type, options())?;
        match self.attach_one(iface, egress_name, egress_type, options()) {
            Ok(egress) => Ok((ingress, egress)),
            Err(e) => {
                // Never leave half an attachment behind.
                if let Ok(program) = classifier(&mut self.ebpf, ingress_name) {
                    let _ = program.detach(ingress);
                }
                Err(e)
            }
        }
    }

    fn attach_one(
        &mut self,
        iface: &str,
        name: &'static str,
        attach_type: TcAttachType,
        options: TcAttachOptions,
    ) -> Result<SchedClassifierLinkId, DatapathError> {
        classifier(&mut self.ebpf, name)?
            .attach_with_options(iface, attach_type, options)
            .map_err(|source| DatapathError::Program {
                action: "attaching",
                program: name,
                iface: iface.to_owned(),
                source: Box::new(source),
            })
    }

    /// Detaches the programs from `iface` (and removes the `clsact` qdisc if the agent added it).
    pub fn detach(&mut self, iface: &str) -> Result<(), DatapathError> {
        let Some(attachment) = self.attached.remove(iface) else {
            return Ok(());
        };
        let [(_, ingress_name), (_, egress_name)] = programs();
        for (name, link) in [
            (ingress_name, attachment.ingress),
            (egress_name, attachment.egress),
        ] {
            classifier(&mut self.ebpf, name)?
                .detach(link)
                .map_err(|source| DatapathError::Program {
                    action: "detaching",
                    program: name,
                    iface: iface.to_owned(),
                    source: Box::new(source),
                })?;
        }
        if attachment.how == (Attached::Clsact { owns_qdisc: true }) {
            netlink::delete_clsact_qdisc(attachment.ifindex).map_err(|source| {
                DatapathError::Qdisc {
                    ifindex: attachment.ifindex,
                    source,
                }
            })?;
        }
        debug!(iface, "detached TC programs");
        Ok(())
    }

    /// Detaches from every interface; reports the first failure after trying them all.
    pub fn detach_all(&mut self) -> Result<(), DatapathError> {
        let ifaces: Vec<String> = self.attached.keys().cloned().collect();
        let mut first_error = None;
        for iface in ifaces {
            if let Err(e) = self.detach(&iface) {
                warn!(iface, error = %error_chain(&e), "detach failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Interfaces the programs are attached to, and how.
    pub fn attachments(&self) -> impl Iterator<Item = (&str, Attached)> {
        self.attached
            .iter()
            .map(|(iface, a)| (iface.as_str(), a.how))
    }

    /// Packet and byte counts per (interface attached at some point, direction) since load,
    /// summed over CPUs, in (ifindex, direction) order.
    pub fn iface_counters(&self) -> Result<Vec<IfaceCount>, DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: IFACE_COUNTERS_MAP,
            source,
        };
        let map = self
            .ebpf
            .map(IFACE_COUNTERS_MAP)
            .ok_or(DatapathError::MissingMap(IFACE_COUNTERS_MAP))?;
        let map = aya::maps::PerCpuArray::<_, IfaceCounters>::try_from(map).map_err(map_error)?;
        let mut counts = Vec::new();
        for &ifindex in &self.counted_ifindexes {
            for direction in Direction::ALL {
                let per_cpu = map
                    .get(&iface_slot(ifindex, direction), 0)
                    .map_err(map_error)?;
                let total = per_cpu
                    .iter()
                    .fold(IfaceCounters::default(), |a, b| a.merged(*b));
                if total.packets == 0 {
                    continue;
                }
                counts.push(IfaceCount {
                    ifindex,
                    direction: match direction {
                        Direction::Ingress => "ingress",
                        Direction::Egress => "egress",
                    },
                    packets: total.packets,
                    bytes: total.bytes,
                });
            }
        }
        Ok(counts)
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // aya would drop the links too, but not the clsact qdisc we may own.
        let _ = self.detach_all();
    }
}

/// Loads `program`, retrying while the kernel answers `EAGAIN`.
///
/// The verifier gives up with `EAGAIN` when a signal is pending for the loading thread
/// (`do_check` tests `signal_pending(current)` as it walks the program), which becomes likely
/// when a busy machine stretches verification; aya retries only once, to fetch the verifier
/// log. libbpf retries `BPF_PROG_LOAD` on `EAGAIN` for the same reason (`PROG_LOAD_ATTEMPTS`,
/// 5 attempts); so do we.
fn load_program(program: &mut SchedClassifier) -> Result<(), ProgramError> {
    const ATTEMPTS: u32 = 5;
    let mut attempt = 1;
    loop {
        match program.load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < ATTEMPTS =>
            {
                warn!(
                    attempt,
                    "the verifier was interrupted (EAGAIN); loading again"
                );
                attempt += 1;
            }
            other => return other,
        }
    }
}

const fn programs() -> [(TcAttachType, &'static str); 2] {
    [
        (TcAttachType::Ingress, TC_INGRESS_PROGRAM),
        (TcAttachType::Egress, TC_EGRESS_PROGRAM),
    ]
}

fn classifier<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(DatapathError::MissingProgram(name))
}

/// The index of `iface` in the current network namespace.
pub fn ifindex(iface: &str) -> Result<u32, DatapathError> {
    nix::net::if_::if_nametoindex(iface).map_err(|_| DatapathError::NoSuchInterface {
        iface: iface.to_owned(),
    })
}

pub use doppel_common::error_chain;

/// Settings of the live data path that are the agent's, not the workload policy's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathSettings {
    /// `ifindex` of the external-mode VXLAN device, for sessions without a device of their own
    /// (0 when none is in use).
    pub vxlan_ifindex: u32,
    /// A flow idle this long is forgotten (and so never mirrored again).
    pub flow_idle_timeout: std::time::Duration,
    /// One new flow in this many is sampled for pattern discovery (0 = off).
    pub pattern_sample_one_in: u32,
}

/// Cumulative counts of one latency histogram (summed over CPUs), as last read.
#[derive(Debug, Clone)]
struct HistogramSnapshot {
    buckets: Vec<u64>,
}

/// Reads the kernel's cumulative latency buckets and hands out what was added since the last
/// drain as `hdrhistogram`s. The kernel never resets its counts, so a drain can never lose one.
#[derive(Debug, Default)]
pub struct LatencyDrain {
    last: std::collections::HashMap<(u32, u32, bool), HistogramSnapshot>,
}

/// New exchanges of one service x class x scope since the previous drain.
#[derive(Debug)]
pub struct LatencyDelta {
    /// Service id (position in the policy's services).
    pub service_id: u32,
    /// Class id.
    pub class: u32,
    /// Only mirrored flows (`true`) or all flows.
    pub mirrored: bool,
    /// Latencies in nanoseconds.
    pub histogram: hdrhistogram::Histogram<u64>,
}

/// The data path's form of a budget of `flows_per_s` new mirrored flows a second (0: no limit):
/// the spacing of flows, how far ahead of now the bucket may run (a second's burst), and the
/// priority lane's spacing (`mirror_interval_ns`, `mirror_tolerance_ns`,
/// `mirror_priority_interval_ns` of `DatapathConfig`).
fn mirror_budget_spacing(flows_per_s: u32) -> (u32, u64, u64) {
    if flows_per_s == 0 {
        return (0, 0, 0);
    }
    let interval = (1_000_000_000 / u64::from(flows_per_s)).max(1);
    (
        interval as u32,
        (u64::from(flows_per_s) - 1) * interval,
        interval * 1_000_000 / MIRROR_PRIORITY_SHARE_PPM,
    )
}

impl Datapath {
    /// Writes a compiled policy into the maps. Tables first, then the configuration that says
    /// how many entries are in use, so the programs never see a count beyond written entries.
    /// Flows already decided keep their decision: it is stored in the flow, not recomputed.
    pub fn apply_policy(
        &mut self,
        policy: &crate::policy::CompiledPolicy,
        settings: DatapathSettings,
    ) -> Result<(), DatapathError> {
        use aya::maps::Array;
        use doppel_common::maps::{
            ClassConfig, DatapathConfig, MAX_SERVICES, MirrorSessionConfig, Rule, ServiceKey, names,
        };
        let map_error = |map: &'static str| move |source| DatapathError::Map { map, source };

        let mut classes: Array<_, ClassConfig> = self.map_mut(names::CLASSES)?;
        for (i, class) in policy.classes.iter().enumerate() {
            classes
                .set(i as u32, class, 0)
                .map_err(map_error(names::CLASSES))?;
        }
        let mut rules: Array<_, Rule> = self.map_mut(names::RULES)?;
        for (i, rule) in policy.rules.iter().enumerate() {
            rules
                .set(i as u32, rule, 0)
                .map_err(map_error(names::RULES))?;
        }
        let mut sessions: Array<_, MirrorSessionConfig> = self.map_mut(names::SESSIONS)?;
        for (i, session) in policy.sessions.iter().enumerate() {
            sessions
                .set(i as u32, session, 0)
                .map_err(map_error(names::SESSIONS))?;
        }
        let mut services = [ServiceKey::default(); MAX_SERVICES as usize];
        for (slot, key) in services.iter_mut().zip(&policy.services) {
            *slot = *key;
        }
        let (mirror_interval_ns, mirror_tolerance_ns, mirror_priority_interval_ns) =
            mirror_budget_spacing(policy.mirror_budget_flows_per_s);
        let config = DatapathConfig {
            sampling_seed: policy.sampling_seed,
            flow_idle_timeout_ns: settings
                .flow_idle_timeout
                .as_nanos()
                .try_into()
                .unwrap_or(u64::MAX),
            vxlan_ifindex: settings.vxlan_ifindex,
            // A session without a device of its own needs the external one.
            session_count: if settings.vxlan_ifindex == 0
                && policy.sessions.iter().any(|s| s.ifindex == 0)
            {
                0
            } else {
                policy.sessions.len() as u32
            },
            rule_count: policy.rules.len() as u32,
            pattern_sample_one_in: settings.pattern_sample_one_in,
            // `compile` refuses more than MAX_SERVICES.
            service_count: policy.services.len().min(MAX_SERVICES as usize) as u32,
            mirror_interval_ns,
            mirror_tolerance_ns,
            mirror_reserve_ns: if mirror_interval_ns != 0
                && policy
                    .classes
                    .iter()
                    .any(|c| c.flags & CLASS_BUDGET_PRIORITY != 0)
            {
                MIRROR_BUDGET_RESERVE_NS
                    .max(MIRROR_RESERVE_MIN_FLOWS * u64::from(mirror_interval_ns))
                    .min(mirror_tolerance_ns)
            } else {
                0
            },
            mirror_priority_interval_ns,
            services,
        };
        let mut config_map: Array<_, DatapathConfig> = self.map_mut(names::CONFIG)?;
        config_map
            .set(0, config, 0)
            .map_err(map_error(names::CONFIG))?;
        Ok(())
    }

    fn map_mut<'a, T>(&'a mut self, name: &'static str) -> Result<T, DatapathError>
    where
        T: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))?;
        T::try_from(map).map_err(|source| DatapathError::Map { map: name, source })
    }

    fn per_cpu_array(
        &self,
        name: &'static str,
    ) -> Result<aya::maps::PerCpuArray<&aya::maps::MapData, u64>, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        aya::maps::PerCpuArray::try_from(map)
            .map_err(|source| DatapathError::Map { map: name, source })
    }

    fn sum_slot(
        array: &aya::maps::PerCpuArray<&aya::maps::MapData, u64>,
        name: &'static str,
        index: u32,
    ) -> Result<u64, DatapathError> {
        let values = array
            .get(&index, 0)
            .map_err(|source| DatapathError::Map { map: name, source })?;
        Ok(values.iter().sum())
    }

    /// Cumulative data-path counters since load, by stable name.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        use doppel_common::maps::{DatapathCounter, names};
        let array = self.per_cpu_array(names::COUNTERS)?;
        // `packets` and `bytes` are not counted twice per packet in the kernel: they are the sum
        // of the per-interface counters.
        let ifaces = self.iface_counters()?;
        DatapathCounter::ALL
            .iter()
            .map(|c| {
                let value = match c {
                    DatapathCounter::Packets => ifaces.iter().map(|i| i.packets).sum(),
                    DatapathCounter::Bytes => ifaces.iter().map(|i| i.bytes).sum(),
                    _ => Self::sum_slot(&array, names::COUNTERS, *c as u32)?,
                };
                Ok((c.name(), value))
            })
            .collect()
    }

    /// Cumulative flows decided and flows sampled of one class since load.
    pub fn class_flows(&self, class: u32) -> Result<(u64, u64), DatapathError> {
        use doppel_common::maps::{MAX_CLASSES, names};
        let array = self.per_cpu_array(names::CLASS_FLOWS)?;
        Ok((
            Self::sum_slot(&array, names::CLASS_FLOWS, class)?,
            Self::sum_slot(&array, names::CLASS_FLOWS, MAX_CLASSES + class)?,
        ))
    }

    /// New latency counts of the given (service, class) pairs since the previous drain, for
    /// all flows and for mirrored flows; empty histograms are left out.
    pub fn drain_latency(
        &self,
        drain: &mut LatencyDrain,
        pairs: &[(u32, u32)],
    ) -> Result<Vec<LatencyDelta>, DatapathError> {
        use doppel_common::maps::{
            LATENCY_BUCKETS, latency_bucket_value, latency_histogram_base, names,
        };
        let array = self.per_cpu_array(names::LATENCY)?;
        let mut deltas = Vec::new();
        for &(service_id, class) in pairs {
            for mirrored in [false, true] {
                let base = latency_histogram_base(service_id, class, mirrored);
                let now = (0..LATENCY_BUCKETS)
                    .map(|b| Self::sum_slot(&array, names::LATENCY, base + b))
                    .collect::<Result<Vec<u64>, _>>()?;
                let previous = drain.last.insert(
                    (service_id, class, mirrored),
                    HistogramSnapshot {
                        buckets: now.clone(),
                    },
                );
                let mut histogram = new_latency_histogram();
                for (bucket, count) in now.iter().enumerate() {
                    let before = previous.as_ref().map_or(0, |p| p.buckets[bucket]);
                    let added = count.saturating_sub(before);
                    if added > 0 {
                        histogram.saturating_record_n(latency_bucket_value(bucket as u32), added);
                    }
                }
                if !histogram.is_empty() {
                    deltas.push(LatencyDelta {
                        service_id,
                        class,
                        mirrored,
                        histogram,
                    });
                }
            }
        }
        Ok(deltas)
    }

    /// Pattern samples waiting in the ring buffer: (service id, leading payload bytes).
    pub fn drain_pattern_samples(&mut self) -> Result<Vec<(u32, Vec<u8>)>, DatapathError> {
        use doppel_common::maps::{PatternSample, names};
        if self.patterns.is_none() {
            let map = self
                .ebpf
                .take_map(names::PATTERNS)
                .ok_or(DatapathError::MissingMap(names::PATTERNS))?;
            let ring = aya::maps::RingBuf::try_from(map).map_err(|source| DatapathError::Map {
                map: names::PATTERNS,
                source,
            })?;
            self.patterns = Some(ring);
        }
        let mut samples = Vec::new();
        if let Some(ring) = self.patterns.as_mut() {
            while let Some(item) = ring.next() {
                if item.len() < size_of::<PatternSample>() {
                    continue;
                }
                let len = u32::from_ne_bytes([item[4], item[5], item[6], item[7]]) as usize;
                let service = u32::from_ne_bytes([item[0], item[1], item[2], item[3]]);
                let bytes = &item[8..8 + len.min(doppel_common::maps::PATTERN_SAMPLE_LEN)];
                samples.push((service, bytes.to_vec()));
            }
        }
        Ok(samples)
    }
}

/// An empty histogram with the range the kernel measures: 1 µs to 60 s at 2 significant
/// digits (1 % resolution, finer than the kernel's 1.6 % buckets).
pub fn new_latency_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 120_000_000_000, 2)
        .expect("constant bounds are valid")
}

/// The shadow's admission program on one interface.
#[derive(Debug)]
pub struct XdpAdmission {
    iface: String,
    link: aya::programs::xdp::XdpLinkId,
}

impl Datapath {
    /// Loads the XDP admission program, admits exactly `admitted` (outer source, VNI) pairs for
    /// VXLAN on `udp_port`, and attaches it to `iface` (native mode where the driver has it,
    /// generic otherwise).
    pub fn attach_admission(
        &mut self,
        iface: &str,
        udp_port: u16,
        admitted: &[(std::net::IpAddr, u32)],
    ) -> Result<XdpAdmission, DatapathError> {
        use aya::maps::{Array, HashMap};
        use doppel_common::maps::{AdmitConfig, AdmitKey, XDP_ADMIT_PROGRAM, admit_names};
        ifindex(iface)?;
        let map_error = |map: &'static str| move |source| DatapathError::Map { map, source };
        let mut table: HashMap<_, AdmitKey, u32> = self.map_mut(admit_names::ADMITTED)?;
        for &(addr, vni) in admitted {
            let key = AdmitKey {
                addr: crate::policy::addr_words(addr),
                vni,
            };
            table
                .insert(key, 1, 0)
                .map_err(map_error(admit_names::ADMITTED))?;
        }
        let mut config: Array<_, AdmitConfig> = self.map_mut(admit_names::ADMIT_CONFIG)?;
        config
            .set(
                0,
                AdmitConfig {
                    udp_port_be: udp_port.to_be(),
                    _pad: 0,
                },
                0,
            )
            .map_err(map_error(admit_names::ADMIT_CONFIG))?;
        let program_error = |action: &'static str| {
            move |source| DatapathError::Program {
                action,
                program: XDP_ADMIT_PROGRAM,
                iface: iface.to_owned(),
                source: Box::new(source),
            }
        };
        let program: &mut aya::programs::Xdp = self
            .ebpf
            .program_mut(XDP_ADMIT_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(XDP_ADMIT_PROGRAM))?;
        if program.fd().is_err() {
            program.load().map_err(program_error("loading"))?;
        }
        let link = match program.attach(iface, aya::programs::XdpMode::default()) {
            Ok(link) => link,
            Err(e) => {
                warn!(iface, error = %error_chain(&e), "native XDP attach failed; using generic (SKB) mode");
                program
                    .attach(iface, aya::programs::XdpMode::Skb)
                    .map_err(program_error("attaching"))?
            }
        };
        info!(
            iface,
            udp_port,
            admitted = admitted.len(),
            "attached XDP admission"
        );
        Ok(XdpAdmission {
            iface: iface.to_owned(),
            link,
        })
    }

    /// Detaches the admission program.
    pub fn detach_admission(&mut self, admission: XdpAdmission) -> Result<(), DatapathError> {
        use doppel_common::maps::XDP_ADMIT_PROGRAM;
        let program: &mut aya::programs::Xdp = self
            .ebpf
            .program_mut(XDP_ADMIT_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or(DatapathError::MissingProgram(XDP_ADMIT_PROGRAM))?;
        program
            .detach(admission.link)
            .map_err(|source| DatapathError::Program {
                action: "detaching",
                program: XDP_ADMIT_PROGRAM,
                iface: admission.iface.clone(),
                source: Box::new(source),
            })
    }

    /// Slot 0 of the `Array` map `name`.
    fn first_slot<T: aya::Pod>(&self, name: &'static str) -> Result<T, DatapathError> {
        let map = self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        aya::maps::Array::<_, T>::try_from(map)
            .and_then(|array| array.get(&0, 0))
            .map_err(|source| DatapathError::Map { map: name, source })
    }

    /// The error of the last copy that failed (a negative errno), if any failed.
    pub fn last_clone_error(&self) -> Result<Option<std::io::Error>, DatapathError> {
        let error: i64 = self.first_slot(doppel_common::maps::names::LAST_CLONE_ERROR)?;
        Ok((error < 0).then(|| std::io::Error::from_raw_os_error((-error) as i32)))
    }

    /// The outer source and VNI of the last mirror datagram the admission program refused.
    pub fn last_rejected(&self) -> Result<Option<(std::net::IpAddr, u32)>, DatapathError> {
        use doppel_common::maps::{AdmitKey, admit_names};
        let key: AdmitKey = self.first_slot(admit_names::REJECTED)?;
        if key == AdmitKey::default() {
            return Ok(None);
        }
        let mut octets = [0u8; 16];
        for (chunk, word) in octets.chunks_exact_mut(4).zip(key.addr) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        Ok(Some((
            std::net::Ipv6Addr::from(octets).to_canonical(),
            key.vni,
        )))
    }

    /// Cumulative admission counters since load, by stable name.
    pub fn admission_counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        use doppel_common::maps::{AdmitCounter, admit_names};
        let array = self.per_cpu_array(admit_names::ADMIT_COUNTERS)?;
        AdmitCounter::ALL
            .iter()
            .map(|c| {
                Ok((
                    c.name(),
                    Self::sum_slot(&array, admit_names::ADMIT_COUNTERS, *c as u32)?,
                ))
            })
            .collect()
    }
}
