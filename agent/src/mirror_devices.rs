//! The VXLAN devices the live data path sends its copies through.
//!
//! Each mirror session gets a device of its own with a fixed remote and VNI
//! (`<vxlan.device>s<N>`). The programs then send a copy with one `bpf_clone_redirect`, and the
//! device reuses its cached route to the shadow; through an external-mode (collect_md) device each
//! copy needs a tunnel key and a route lookup of its own (`bench datapath`, one run alternating
//! the two: a copy in the cost rounds 879 -> 760 ns, with the single clock read of that change).
//!
//! The external-mode device (`<vxlan.device>`) remains the fallback. The kernel cannot open a
//! fixed-remote device beside an external one on the same UDP port (their sockets differ), nor two
//! devices with one VNI on the same port, so when any session's device cannot be brought up
//! (two sessions sharing a VNI, a port some other device holds) every session goes through the
//! external device instead, for the rest of the agent's life, and the reason is logged.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use doppel_common::maps::MirrorSessionConfig;
use tracing::{info, warn};

use crate::netlink::{self, NetlinkError};

/// One session's own device.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SessionDevice {
    /// The session it was made for (`ifindex` 0).
    session: MirrorSessionConfig,
    name: String,
    ifindex: u32,
}

/// How copies leave.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// One fixed-remote device per session, in session order.
    PerSession(Vec<SessionDevice>),
    /// Every session through the external-mode device (its ifindex; 0 until a session needs it).
    External(u32),
}

/// The devices of one live agent, created as sessions appear and removed on [`Self::remove_all`].
#[derive(Debug)]
pub struct MirrorDevices {
    /// `vxlan.device`: the external device's name and the per-session devices' prefix.
    device: String,
    port: u16,
    mode: Mode,
}

/// A device could not be created or removed.
#[derive(Debug, thiserror::Error)]
#[error("VXLAN device {device}")]
pub struct DeviceError {
    pub device: String,
    #[source]
    pub source: NetlinkError,
}

impl MirrorDevices {
    /// No devices yet; `device` is at most 15 bytes (config validation).
    pub fn new(device: &str, port: u16) -> Self {
        Self {
            device: device.to_owned(),
            port,
            mode: Mode::PerSession(Vec::new()),
        }
    }

    /// The name of session `index`'s own device: the configured name cut to leave room for the
    /// suffix within the kernel's 15 bytes.
    fn session_device(&self, index: usize) -> String {
        let suffix = format!("s{index}");
        let keep = self.device.len().min(15 - suffix.len());
        format!("{}{suffix}", &self.device[..keep])
    }

    /// Makes a device ready for every session in `sessions` (policy order) and returns them with
    /// `ifindex` filled in (0: through the external device), with the external device's ifindex
    /// (0 when it is not in use). Devices of sessions that are gone are removed here, before
    /// the caller writes the maps: a copy sent meanwhile meets at worst a removed device, and is
    /// counted as a failed clone.
    pub fn reconcile(
        &mut self,
        sessions: &[MirrorSessionConfig],
    ) -> Result<(Vec<MirrorSessionConfig>, u32), DeviceError> {
        if let Mode::PerSession(current) = &self.mode {
            match self.per_session(current.clone(), sessions) {
                Ok((made, stale)) => {
                    let filled = made.iter().map(|d| with_ifindex(d.session, d.ifindex));
                    let filled = filled.collect();
                    self.mode = Mode::PerSession(made);
                    self.remove(&stale);
                    return Ok((filled, 0));
                }
                Err(e) => {
                    warn!(
                        device = %e.device,
                        error = %doppel_common::error_chain(&e),
                        "a mirror session's own VXLAN device could not be brought up (two \
                         sessions sharing a VNI, or the port taken); every session now goes \
                         through the external-mode device, with a route lookup per copy"
                    );
                    let Mode::PerSession(all) =
                        std::mem::replace(&mut self.mode, Mode::External(0))
                    else {
                        unreachable!("checked above")
                    };
                    let names: Vec<String> = all.into_iter().map(|d| d.name).collect();
                    self.remove(&names);
                }
            }
        }
        let Mode::External(ifindex) = &mut self.mode else {
            unreachable!("per-session mode returned above")
        };
        if *ifindex == 0 && !sessions.is_empty() {
            *ifindex =
                netlink::create_vxlan_external(&self.device, self.port).map_err(|source| {
                    DeviceError {
                        device: self.device.clone(),
                        source,
                    }
                })?;
            info!(device = %self.device, "external-mode VXLAN device created for the mirror sessions");
        }
        Ok((
            sessions.iter().map(|s| with_ifindex(*s, 0)).collect(),
            *ifindex,
        ))
    }

    /// The per-session devices `sessions` need, reusing `current`'s where the session is the
    /// same; returns them and the names of the devices no longer needed. On error, every device
    /// this call created is removed again (the ones of `current` stay).
    fn per_session(
        &self,
        current: Vec<SessionDevice>,
        sessions: &[MirrorSessionConfig],
    ) -> Result<(Vec<SessionDevice>, Vec<String>), DeviceError> {
        let mut made = Vec::new();
        let mut created = Vec::new();
        for (index, session) in sessions.iter().enumerate() {
            let session = with_ifindex(*session, 0);
            if let Some(kept) = current.get(index).filter(|d| d.session == session) {
                made.push(kept.clone());
                continue;
            }
            let name = self.session_device(index);
            // A different session at this index: its old device goes first (a name and
            // possibly a VNI it would otherwise collide with).
            if current.get(index).is_some() {
                self.remove(std::slice::from_ref(&name));
            }
            match netlink::create_vxlan_to(&name, self.port, session.vni, remote(&session)) {
                Ok(ifindex) => {
                    created.push(name.clone());
                    made.push(SessionDevice {
                        session,
                        name,
                        ifindex,
                    });
                }
                Err(source) => {
                    let _ = netlink::delete_link(&name);
                    self.remove(&created);
                    return Err(DeviceError {
                        device: name,
                        source,
                    });
                }
            }
        }
        let stale = current
            .into_iter()
            .skip(sessions.len())
            .map(|d| d.name)
            .collect();
        Ok((made, stale))
    }

    fn remove(&self, names: &[String]) {
        for name in names {
            if let Err(e) = netlink::delete_link(name) {
                warn!(device = %name, error = %doppel_common::error_chain(&e), "removing a mirror device");
            }
        }
    }

    /// Removes every device this agent created.
    pub fn remove_all(&mut self) -> Result<(), DeviceError> {
        match std::mem::replace(&mut self.mode, Mode::PerSession(Vec::new())) {
            Mode::PerSession(made) => {
                for SessionDevice { name, .. } in made {
                    netlink::delete_link(&name).map_err(|source| DeviceError {
                        device: name.clone(),
                        source,
                    })?;
                }
                Ok(())
            }
            Mode::External(0) => Ok(()),
            Mode::External(_) => netlink::delete_link(&self.device).map_err(|source| DeviceError {
                device: self.device.clone(),
                source,
            }),
        }
    }

    /// Whether any device exists (copies can leave).
    pub fn any(&self) -> bool {
        match &self.mode {
            Mode::PerSession(made) => !made.is_empty(),
            Mode::External(ifindex) => *ifindex != 0,
        }
    }
}

fn with_ifindex(session: MirrorSessionConfig, ifindex: u32) -> MirrorSessionConfig {
    MirrorSessionConfig { ifindex, ..session }
}

/// The shadow's address, from the forms the programs' tunnel key wants.
fn remote(session: &MirrorSessionConfig) -> IpAddr {
    if session.ipv6 != 0 {
        let mut bytes = [0u8; 16];
        for (chunk, word) in bytes.chunks_exact_mut(4).zip(session.remote_ipv6) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        IpAddr::V4(Ipv4Addr::from(session.remote_ipv4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_device_names_fit_the_kernels_fifteen_bytes() {
        let devices = MirrorDevices::new("doppel-mirror01", 4789);
        assert_eq!(devices.session_device(0), "doppel-mirrors0");
        assert_eq!(devices.session_device(7), "doppel-mirrors7");
        let short = MirrorDevices::new("dpvx", 4789);
        assert_eq!(short.session_device(3), "dpvxs3");
    }

    #[test]
    fn the_remote_is_read_back_from_the_programs_forms() {
        let v4: Ipv4Addr = "10.1.2.3".parse().unwrap();
        let session = MirrorSessionConfig {
            remote_ipv4: u32::from(v4),
            vni: 7,
            ..Default::default()
        };
        assert_eq!(remote(&session), IpAddr::V4(v4));
        let v6: Ipv6Addr = "2001:db8::42".parse().unwrap();
        let o = v6.octets();
        let words = [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]));
        let session = MirrorSessionConfig {
            remote_ipv6: words,
            ipv6: 1,
            ..Default::default()
        };
        assert_eq!(remote(&session), IpAddr::V6(v6));
    }
}
