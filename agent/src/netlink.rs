//! rtnetlink operations the agent needs beyond what aya does itself.
//!
//! Synchronous on purpose: these run from `Drop` during detach, where there is no runtime to
//! await on.

use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
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

/// Sends one request and waits for the kernel's acknowledgement.
fn request(message: RouteNetlinkMessage) -> Result<(), NetlinkError> {
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
    socket.bind_auto().map_err(NetlinkError::Socket)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(NetlinkError::Socket)?;

    let mut packet = NetlinkMessage::from(message);
    packet.header.flags = NLM_F_REQUEST | NLM_F_ACK;
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
