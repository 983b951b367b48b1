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
    Ebpf, EbpfError,
    maps::{MapError, PerCpuHashMap},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
};
use doppel_common::maps::{
    Direction, IFACE_COUNTERS_MAP, IfaceCounters, IfaceKey, TC_EGRESS_PROGRAM, TC_INGRESS_PROGRAM,
};
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::netlink;

/// The eBPF object built from `agent-ebpf` by `build.rs`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/doppel-agent-ebpf"));

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
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
#[derive(Debug)]
pub struct Datapath {
    ebpf: Ebpf,
    attached: BTreeMap<String, Attachment>,
}

impl Datapath {
    /// Loads the embedded object and its TC programs into the kernel (nothing is attached yet).
    pub fn load() -> Result<Self, DatapathError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [TC_INGRESS_PROGRAM, TC_EGRESS_PROGRAM] {
            classifier(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    action: "loading",
                    program: name,
                    iface: String::new(),
                    source: Box::new(source),
                })?;
        }
        Ok(Self {
            ebpf,
            attached: BTreeMap::new(),
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

    /// Packet and byte counts per (interface, direction) since load, summed over CPUs, in
    /// (ifindex, direction) order.
    pub fn iface_counters(&self) -> Result<Vec<IfaceCount>, DatapathError> {
        let map_error = |source| DatapathError::Map {
            map: IFACE_COUNTERS_MAP,
            source,
        };
        let map = self
            .ebpf
            .map(IFACE_COUNTERS_MAP)
            .ok_or(DatapathError::MissingMap(IFACE_COUNTERS_MAP))?;
        let map = PerCpuHashMap::<_, IfaceKey, IfaceCounters>::try_from(map).map_err(map_error)?;
        let mut counts = Vec::new();
        for entry in map.iter() {
            let (key, per_cpu) = entry.map_err(map_error)?;
            let Some(direction) = Direction::from_raw(key.direction) else {
                continue;
            };
            let total = per_cpu
                .iter()
                .fold(IfaceCounters::default(), |a, b| a.merged(*b));
            counts.push(IfaceCount {
                ifindex: key.ifindex,
                direction: match direction {
                    Direction::Ingress => "ingress",
                    Direction::Egress => "egress",
                },
                packets: total.packets,
                bytes: total.bytes,
            });
        }
        counts.sort_by_key(|c| (c.ifindex, c.direction));
        Ok(counts)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        // aya would drop the links too, but not the clsact qdisc we may own.
        let _ = self.detach_all();
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

/// `error: cause: cause…` on one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
