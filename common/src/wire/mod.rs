//! The agent <-> coordinator wire protocol.
//!
//! A connection carries [frames](frame): a 4-byte big-endian payload length, then the payload,
//! which is an [`Envelope`]: the protocol version the body is encoded in (a postcard varint `u16`)
//! followed by the postcard-encoded [`Message`]. postcard is not self-describing, so the version
//! is what lets an agent and a coordinator of different releases talk, or refuse each other
//! clearly.
//!
//! # Versioning rules
//! - The handshake ([`Message::Hello`], [`Message::Welcome`], [`Message::Refused`]) is frozen:
//!   those variants keep their index and their layout in every protocol version, and are always
//!   sent in an envelope of [`HANDSHAKE_VERSION`]. So any two releases can at least negotiate.
//! - Every other message is encoded in the version the handshake chose ([`negotiate`]). Changing
//!   the layout of any message, or adding a variant, means a new [`PROTOCOL_VERSION`].
//! - The length limits of the fields ([`MAX_NAME_LEN`], [`MAX_COUNTERS`], …) are part of the
//!   format: raising one means a new version, so that a sender never exceeds what its peer
//!   accepts. The handshake's limits never change.

mod bounded;
pub mod frame;
pub mod histogram;
#[cfg(feature = "tokio")]
pub mod io;
mod messages;

use core::ops::RangeInclusive;

pub use frame::{DEFAULT_MAX_FRAME_LEN, FrameDecoder, FrameError, decode_frame, encode_frame};
pub use histogram::{EncodedHistogram, HistogramError};
#[cfg(feature = "tokio")]
pub use io::{FrameIoError, read_envelope, write_envelope};
pub use messages::*;

/// The newest protocol version this build speaks. Version 2 added
/// [`AgentPolicy::mirror_budget_flows_per_s`], version 3 [`ClassPolicy::budget_priority`].
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest protocol version this build still speaks. Versions 1 and 2 cannot carry the
/// mirror budget or its priority classes, which an agent must hold on its own, so such a peer is
/// refused (with both sides' versions in the reason) rather than sent a policy it would apply
/// without them.
pub const MIN_PROTOCOL_VERSION: u16 = 3;
/// The envelope version the frozen handshake messages are always sent in.
pub const HANDSHAKE_VERSION: u16 = 1;

/// The versions this build speaks.
pub const SUPPORTED_VERSIONS: RangeInclusive<u16> = MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION;

/// A message and the protocol version its body is encoded in.
#[derive(Clone, Debug, PartialEq)]
pub struct Envelope {
    /// Protocol version of `message`'s encoding.
    pub version: u16,
    /// The message itself.
    pub message: Message,
}

impl Envelope {
    /// Wraps a message in the version it must be sent in: [`HANDSHAKE_VERSION`] for handshake
    /// messages, `negotiated` for everything else.
    pub fn new(negotiated: u16, message: Message) -> Self {
        let version = if message.is_handshake() {
            HANDSHAKE_VERSION
        } else {
            negotiated
        };
        Self { version, message }
    }
}

/// The two sides share no protocol version.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no common protocol version: we speak {ours:?}, the peer speaks {theirs:?}")]
pub struct NoCommonVersion {
    /// Versions this side speaks.
    pub ours: RangeInclusive<u16>,
    /// Versions the peer said it speaks.
    pub theirs: RangeInclusive<u16>,
}

/// Picks the newest version both sides speak.
pub fn negotiate(
    ours: RangeInclusive<u16>,
    theirs: RangeInclusive<u16>,
) -> Result<u16, NoCommonVersion> {
    let low = (*ours.start()).max(*theirs.start());
    let high = (*ours.end()).min(*theirs.end());
    if low <= high {
        Ok(high)
    } else {
        Err(NoCommonVersion { ours, theirs })
    }
}

#[cfg(test)]
mod tests;
