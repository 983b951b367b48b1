//! rtnetlink operations the agent needs beyond what aya does itself.
//!
//! Synchronous on purpose: these run from `Drop` during detach, where there is no runtime to
//! await on.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    tc::{TcAttribute, TcHandle, TcMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Errors of a netlink request.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be opened, or the request not sent or answered.
    #[error("netlink socket")]
    Socket(#[source] io::Error),
    /// The kernel refused the request.
    #[error("the kernel refused the request")]
    Refused(#[source] io::Error),
    /// The kernel's answer could not be parsed.
    #[error("unparsable netlink answer")]
    Decode(#[source] netlink_packet_core::DecodeError),
    /// The kernel answered something other than an acknowledgement.
    #[error("expected a netlink acknowledgement, got another message")]
    UnexpectedReply,
}

/// Deletes the `clsact` qdisc of `ifindex` (and with it every classic TC filter on it).
/// A qdisc that is already gone is not an error.
pub fn delete_clsact_qdisc(ifindex: u32) -> Result<(), NetlinkError> {
    let mut tc = TcMessage::default();
    tc.header.index = i32::try_from(ifindex)
        .map_err(|_| NetlinkError::Socket(io::Error::other("ifindex out of range")))?;
    tc.header.parent = TcHandle::CLSACT;
    tc.header.handle = TcHandle {
        major: 0xffff,
        minor: 0,
    };
    tc.attributes.push(TcAttribute::Kind("clsact".to_owned()));
    match request(RouteNetlinkMessage::DelQueueDiscipline(tc)) {
        Err(NetlinkError::Refused(e))
            if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Creates a VXLAN device in external (collect_md) mode, where each packet's tunnel key (set by
/// the TC program) says where it goes, and sets it up. Returns its ifindex. A device of the same
/// name left by a crashed agent is replaced.
pub fn create_vxlan_external(name: &str, dstport: u16) -> Result<u32, NetlinkError> {
    create_vxlan(
        name,
        vec![InfoVxlan::CollectMetadata(true), InfoVxlan::Port(dstport)],
    )?;
    set_up(name)
}

/// Creates a VXLAN device with one fixed remote and VNI, and sets it up. Returns its ifindex. A
/// device of the same name left by a crashed agent is replaced.
///
/// Copies sent through it skip the per-packet tunnel key and, unlike external mode, reuse the
/// device's cached route to the remote (see `mirror_devices`). The outer UDP checksum is left
/// zero over IPv4 (RFC 7348 allows it) and kept over IPv6 (RFC 6935).
pub fn create_vxlan_to(
    name: &str,
    dstport: u16,
    vni: u32,
    remote: std::net::IpAddr,
) -> Result<u32, NetlinkError> {
    let group = match remote {
        std::net::IpAddr::V4(a) => InfoVxlan::Group(a),
        std::net::IpAddr::V6(a) => InfoVxlan::Group6(a),
    };
    create_vxlan(
        name,
        vec![
            InfoVxlan::Id(vni),
            group,
            InfoVxlan::Port(dstport),
            InfoVxlan::Ttl(64),
            InfoVxlan::Learning(false),
            InfoVxlan::UDPCsum(false),
        ],
    )?;
    // Unlike an external-mode device, this one has somewhere to send: once up, the kernel's own
    // IPv6 (duplicate address detection, MLD, router solicitations) would leave through it to
    // the shadow. Copies only ever enter it by redirect, so it needs no IPv6 of its own. (A host
    // without IPv6 has no such file, and nothing to silence.)
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    set_up(name)
}

/// Creates the VXLAN device `name` (down) with `data`, replacing one of that name.
fn create_vxlan(name: &str, data: Vec<InfoVxlan>) -> Result<(), NetlinkError> {
    delete_link(name)?;
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.to_owned()));
    link.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(data)),
    ]));
    request_with(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Sets the link called `name` up; returns its ifindex.
fn set_up(name: &str) -> Result<u32, NetlinkError> {
    let index = nix::net::if_::if_nametoindex(name)
        .map_err(|e| NetlinkError::Socket(io::Error::from(e)))?;
    let mut up = LinkMessage::default();
    up.header.index = index;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    request(RouteNetlinkMessage::SetLink(up))?;
    Ok(index)
}

/// Deletes the link called `name`; a link that does not exist is not an error.
pub fn delete_link(name: &str) -> Result<(), NetlinkError> {
    let Ok(index) = nix::net::if_::if_nametoindex(name) else {
        return Ok(());
    };
    let mut link = LinkMessage::default();
    link.header.index = index;
    match request(RouteNetlinkMessage::DelLink(link)) {
        Err(NetlinkError::Refused(e)) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}

/// Sends one request and waits for the kernel's acknowledgement.
fn request(message: RouteNetlinkMessage) -> Result<(), NetlinkError> {
    request_with(message, 0)
}

/// Like [`request`], with extra `NLM_F_*` flags.
fn request_with(message: RouteNetlinkMessage, flags: u16) -> Result<(), NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;

    let mut packet = NetlinkMessage::from(message);
    packet.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0).map_err(NetlinkError::Socket)?;

    let mut answer = vec![0; 8192];
    let n = socket
        .recv(&mut &mut answer[..], 0)
        .map_err(NetlinkError::Socket)?;
    let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&answer[..n])
        .map_err(NetlinkError::Decode)?;
    match reply.payload {
        NetlinkPayload::Error(e) => match e.code {
            None => Ok(()),
            Some(code) => Err(NetlinkError::Refused(io::Error::from_raw_os_error(
                -code.get(),
            ))),
        },
        _ => Err(NetlinkError::UnexpectedReply),
    }
}
