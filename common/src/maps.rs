//! Layouts of the BPF maps that `agent-ebpf` writes and the agent reads.
//!
//! Every type here is shared byte-for-byte with the kernel: `#[repr(C)]`, `Copy`, all padding
//! spelled out as named fields, `u32` flags instead of `bool` (so a `Pod` type never carries
//! implicit padding whose contents the verifier or the reader could disagree about).

/// Which way a packet crossed the interface, as seen by a TC program.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Arriving at the interface (TC ingress).
    Ingress = 0,
    /// Leaving through the interface (TC egress).
    Egress = 1,
}

impl Direction {
    /// Both directions, in key order.
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];

    /// The raw value stored in map keys, or `None` for a value no program writes.
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Ingress),
            1 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// Key of [`IFACE_COUNTERS_MAP`]: one entry per interface and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IfaceKey {
    /// `ifindex` of the interface the program is attached to, in the program's namespace.
    pub ifindex: u32,
    /// A [`Direction`] as `u32`.
    pub direction: u32,
}

/// Packet and byte counters of one interface and direction, kept per CPU by the kernel and summed
/// by the reader.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceCounters {
    /// Packets the program saw.
    pub packets: u64,
    /// Bytes of those packets, counting from the link-layer header (`skb->len`).
    pub bytes: u64,
}

impl IfaceCounters {
    /// Adds another CPU's (or another interval's) counts to this one.
    #[must_use]
    pub const fn merged(self, other: Self) -> Self {
        Self {
            packets: self.packets.wrapping_add(other.packets),
            bytes: self.bytes.wrapping_add(other.bytes),
        }
    }
}

/// Name of the per-CPU hash map `IfaceKey -> IfaceCounters`.
pub const IFACE_COUNTERS_MAP: &str = "IFACE_COUNTERS";
/// How many (interface, direction) entries the counters map holds.
pub const IFACE_COUNTERS_MAX_ENTRIES: u32 = 1024;
/// Name of the TC program attached to ingress.
pub const TC_INGRESS_PROGRAM: &str = "doppel_tc_ingress";
/// Name of the TC program attached to egress.
pub const TC_EGRESS_PROGRAM: &str = "doppel_tc_egress";

#[cfg(feature = "user")]
mod pod {
    // SAFETY (both impls): `#[repr(C)]`, every field is an integer, and there is no padding
    // (`IfaceKey` is two `u32`, `IfaceCounters` two `u64`), so every bit pattern is valid.
    unsafe impl aya::Pod for super::IfaceKey {}
    unsafe impl aya::Pod for super::IfaceCounters {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<IfaceKey>(), 8);
        assert_eq!(size_of::<IfaceCounters>(), 16);
    }

    #[test]
    fn direction_round_trips_through_raw() {
        for d in Direction::ALL {
            assert_eq!(Direction::from_raw(d as u32), Some(d));
        }
        assert_eq!(Direction::from_raw(2), None);
    }

    #[test]
    fn merged_adds_fieldwise() {
        let a = IfaceCounters {
            packets: 2,
            bytes: 100,
        };
        let b = IfaceCounters {
            packets: 3,
            bytes: 60,
        };
        assert_eq!(
            a.merged(b),
            IfaceCounters {
                packets: 5,
                bytes: 160
            }
        );
    }
}
