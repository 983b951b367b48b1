//! Decoding of one VXLAN mirror datagram (the UDP payload) down to the mirrored TCP segment.
//!
//! VXLAN (RFC 7348) carries an Ethernet frame; cloud traffic-mirroring sessions and doppel's
//! live data path both put the client's packet, from its Ethernet header on, inside. The inner
//! frame is sliced by `etherparse` (VLAN tags and IPv6 extension headers included), borrowing
//! from the datagram: malformed input is an error naming what was wrong (the receiver counts
//! it), never a panic, and no length field is trusted beyond the bytes actually present. The
//! `vxlan_decode` fuzz target (`agent/fuzz`) holds it to that.

use std::net::{IpAddr, SocketAddr};

use etherparse::{
    LinkExtSlice, LinkSlice, NetSlice, SlicedPacket, TransportSlice,
    err::{Layer, packet::SliceError},
    ether_type,
};

/// VXLAN header length.
pub const VXLAN_HLEN: usize = 8;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
/// The "I" flag: the VNI field is valid (RFC 7348 §5).
const VXLAN_FLAG_VNI: u8 = 0x08;

/// TCP flags the replayer acts on.
pub mod tcp_flags {
    /// No more data from the sender.
    pub const FIN: u8 = 0x01;
    /// Synchronise (connection open).
    pub const SYN: u8 = 0x02;
    /// Reset.
    pub const RST: u8 = 0x04;
}

/// What was wrong with a datagram. Each variant is a counter in the shadow's report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a VXLAN header, or the VNI flag is not set.
    #[error("not a VXLAN header")]
    BadVxlan,
    /// The inner frame is shorter than an Ethernet header.
    #[error("inner Ethernet frame truncated")]
    ShortFrame,
    /// The inner frame is neither IPv4 nor IPv6 (ARP, MACsec, …), VLAN tags aside.
    #[error("inner frame is not IPv4 or IPv6 (ethertype {0:#06x})")]
    NotIp(u16),
    /// The IP header is malformed: wrong version, header or total length impossible for the
    /// bytes present.
    #[error("malformed inner IP header")]
    BadIp,
    /// IPv4 fragment: the segment cannot be rebuilt from one packet.
    #[error("inner IPv4 fragment")]
    Fragment,
    /// Not TCP (or an IPv6 extension header in front of TCP, which mirrors do not carry).
    #[error("inner packet is not TCP (protocol {0})")]
    NotTcp(u8),
    /// The TCP header is truncated or its data offset is impossible.
    #[error("malformed inner TCP header")]
    BadTcp,
}

/// One mirrored TCP segment, borrowing its payload from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirroredSegment<'a> {
    /// The mirror session (24 bits).
    pub vni: u32,
    /// The original client.
    pub client: SocketAddr,
    /// The original service.
    pub service: SocketAddr,
    /// Sequence number of the first payload byte.
    pub seq: u32,
    /// Acknowledgement number: it advances when the client has seen response bytes, which is
    /// how opaque exchanges are told apart.
    pub ack: u32,
    /// TCP flags byte.
    pub flags: u8,
    /// The TCP payload.
    pub payload: &'a [u8],
}

/// Decodes a VXLAN datagram (the UDP payload). Below the VXLAN header, `etherparse` slices the
/// inner frame: Ethernet, any VLAN tags (a mirror source may keep them), IPv4 or IPv6 with
/// their extension headers, and TCP, each length checked against the bytes present.
pub fn decode(datagram: &[u8]) -> Result<MirroredSegment<'_>, DecodeError> {
    if datagram.len() < VXLAN_HLEN || datagram[0] & VXLAN_FLAG_VNI == 0 {
        return Err(DecodeError::BadVxlan);
    }
    let vni = u32::from_be_bytes([0, datagram[4], datagram[5], datagram[6]]);
    let packet = SlicedPacket::from_ethernet(&datagram[VXLAN_HLEN..]).map_err(slice_error)?;
    let (src, dst, payload) = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
            ip.payload(),
        ),
        Some(NetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
            ip.payload(),
        ),
        Some(NetSlice::Arp(_)) | None => return Err(DecodeError::NotIp(inner_ether_type(&packet))),
    };
    if payload.fragmented {
        return Err(DecodeError::Fragment);
    }
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        return Err(DecodeError::NotTcp(payload.ip_number.0));
    };
    Ok(MirroredSegment {
        vni,
        client: SocketAddr::new(src, tcp.source_port()),
        service: SocketAddr::new(dst, tcp.destination_port()),
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        // The flags byte as the header carries it (CWR..FIN), which the counters key on.
        flags: tcp.header_slice()[13],
        payload: tcp.payload(),
    })
}

/// The counted error for a frame `etherparse` could not slice.
fn slice_error(e: SliceError) -> DecodeError {
    match e {
        SliceError::Len(len) => match len.layer {
            Layer::Ethernet2Header | Layer::VlanHeader | Layer::MacsecHeader => {
                DecodeError::ShortFrame
            }
            Layer::TcpHeader => DecodeError::BadTcp,
            _ => DecodeError::BadIp,
        },
        SliceError::Tcp(_) => DecodeError::BadTcp,
        SliceError::LinuxSll(_) | SliceError::Macsec(_) => DecodeError::ShortFrame,
        SliceError::Ip(_)
        | SliceError::Ipv4(_)
        | SliceError::Ipv6(_)
        | SliceError::Ipv4Exts(_)
        | SliceError::Ipv6Exts(_) => DecodeError::BadIp,
    }
}

/// The ethertype of what follows the inner frame's last link header (Ethernet or VLAN tag).
fn inner_ether_type(packet: &SlicedPacket<'_>) -> u16 {
    match (packet.link_exts.last(), &packet.link) {
        (Some(LinkExtSlice::Vlan(vlan)), _) => vlan.ether_type().0,
        (Some(LinkExtSlice::Macsec(_)), _) => ether_type::MACSEC.0,
        (None, Some(LinkSlice::Ethernet2(eth))) => eth.ether_type().0,
        (None, _) => 0,
    }
}

/// Builds a VXLAN datagram around an Ethernet/IPv4 or IPv6/TCP packet: for tests and the
/// replay benchmark, which need mirror traffic without a live host.
#[derive(Debug, Clone)]
pub struct SegmentBuilder {
    /// Session.
    pub vni: u32,
    /// Original client.
    pub client: SocketAddr,
    /// Original service.
    pub service: SocketAddr,
}

impl SegmentBuilder {
    /// The datagram for one segment. IP and TCP checksums are left zero: the receiver never
    /// checks them (the outer UDP checksum, or its absence, is the transport's business).
    pub fn datagram(&self, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![VXLAN_FLAG_VNI, 0, 0, 0];
        out.extend_from_slice(&(self.vni << 8).to_be_bytes());
        out.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
        let mut tcp = Vec::with_capacity(20 + payload.len());
        tcp.extend_from_slice(&self.client.port().to_be_bytes());
        tcp.extend_from_slice(&self.service.port().to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.extend_from_slice(&[0x50, flags | 0x10, 0xff, 0xff, 0, 0, 0, 0]);
        tcp.extend_from_slice(payload);
        match (self.client.ip(), self.service.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                out.extend_from_slice(&ETH_P_IP.to_be_bytes());
                let total = (20 + tcp.len()) as u16;
                out.extend_from_slice(&[0x45, 0]);
                out.extend_from_slice(&total.to_be_bytes());
                out.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_TCP, 0, 0]);
                out.extend_from_slice(&s.octets());
                out.extend_from_slice(&d.octets());
            }
            (s, d) => {
                let v6 = |a: IpAddr| match a {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                out.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
                out.extend_from_slice(&[0x60, 0, 0, 0]);
                out.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
                out.extend_from_slice(&[IPPROTO_TCP, 64]);
                out.extend_from_slice(&v6(s).octets());
                out.extend_from_slice(&v6(d).octets());
            }
        }
        out.extend_from_slice(&tcp);
        out
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn builder(v6: bool) -> SegmentBuilder {
        let (c, s): (IpAddr, IpAddr) = if v6 {
            ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap())
        } else {
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap())
        };
        SegmentBuilder {
            vni: 0x00ab_cdef,
            client: SocketAddr::new(c, 40000),
            service: SocketAddr::new(s, 8080),
        }
    }

    #[test]
    fn built_segments_decode_to_what_was_built() {
        for v6 in [false, true] {
            let b = builder(v6);
            let d = b.datagram(7, 9, tcp_flags::FIN, b"GET / HTTP/1.1\r\n\r\n");
            let seg = decode(&d).unwrap();
            assert_eq!(seg.vni, 0x00ab_cdef);
            assert_eq!((seg.client, seg.service), (b.client, b.service));
            assert_eq!((seg.seq, seg.ack), (7, 9));
            assert_ne!(seg.flags & tcp_flags::FIN, 0);
            assert_eq!(seg.payload, b"GET / HTTP/1.1\r\n\r\n");
        }
    }

    #[test]
    fn vlan_tags_and_ipv6_extension_headers_are_looked_through() {
        let plain = builder(false).datagram(7, 9, tcp_flags::FIN, b"GET / HTTP/1.1\r\n\r\n");
        let want = decode(&plain).expect("plain");
        // 802.1Q, then 802.1ad outside 802.1Q (QinQ): the tags sit between the MACs and the
        // ethertype (offset 20 in the datagram).
        for tags in [
            &[0x81, 0x00, 0x00, 0x64][..],
            &[0x88, 0xa8, 0x00, 0x0a, 0x81, 0x00, 0x00, 0x64],
        ] {
            let mut tagged = plain[..20].to_vec();
            tagged.extend_from_slice(tags);
            tagged.extend_from_slice(&plain[20..]);
            assert_eq!(decode(&tagged), Ok(want), "tags {tags:02x?}");
        }
        // IPv6 with a hop-by-hop header (PadN to 8 bytes) before TCP.
        let plain6 = builder(true).datagram(7, 9, 0, b"ping");
        let want6 = decode(&plain6).expect("plain v6");
        let ip = 22;
        let mut ext = plain6[..ip + 40].to_vec();
        ext[ip + 6] = 0; // next header: hop-by-hop
        let payload_len = u16::from_be_bytes([ext[ip + 4], ext[ip + 5]]) + 8;
        ext[ip + 4..ip + 6].copy_from_slice(&payload_len.to_be_bytes());
        ext.extend_from_slice(&[IPPROTO_TCP, 0, 1, 4, 0, 0, 0, 0]);
        ext.extend_from_slice(&plain6[ip + 40..]);
        assert_eq!(decode(&ext), Ok(want6));
    }

    #[test]
    fn malformed_datagrams_are_named() {
        let good = builder(false).datagram(1, 1, 0, b"x");
        assert_eq!(decode(&good[..5]), Err(DecodeError::BadVxlan));
        let mut no_flag = good.clone();
        no_flag[0] = 0;
        assert_eq!(decode(&no_flag), Err(DecodeError::BadVxlan));
        assert_eq!(decode(&good[..20]), Err(DecodeError::ShortFrame));
        let mut arp = good.clone();
        arp[20..22].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(decode(&arp), Err(DecodeError::NotIp(0x0806)));
        let mut udp = good.clone();
        udp[22 + 9] = 17;
        assert_eq!(decode(&udp), Err(DecodeError::NotTcp(17)));
        let mut huge = good.clone();
        huge[24..26].copy_from_slice(&9000u16.to_be_bytes());
        assert_eq!(decode(&huge), Err(DecodeError::BadIp));
        let mut frag = good.clone();
        frag[28] = 0x20;
        assert_eq!(decode(&frag), Err(DecodeError::Fragment));
        let mut doff = good;
        doff[22 + 20 + 12] = 0xf0;
        assert_eq!(decode(&doff), Err(DecodeError::BadTcp));
    }

    proptest! {
        /// Arbitrary bytes, and arbitrary corruptions of a good datagram, never panic and never
        /// yield a payload reaching beyond the datagram.
        #[test]
        fn decoding_never_panics(
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            v6 in any::<bool>(),
        ) {
            let _ = decode(&bytes);
            let mut d = builder(v6).datagram(1, 2, 0, &bytes);
            for (at, value) in flips {
                let i = at.index(d.len());
                d[i] = value;
            }
            if let Ok(seg) = decode(&d) {
                prop_assert!(seg.payload.len() <= d.len());
            }
        }
    }
}
