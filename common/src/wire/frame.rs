//! Length-delimited frames carrying [`Envelope`]s.
//!
//! A frame is a 4-byte big-endian payload length, then the payload: the envelope version as a
//! postcard varint `u16`, then the postcard-encoded [`Message`]. Following mini-redis, parsing is
//! a pure function over a byte slice ([`decode_frame`]) that says "incomplete" rather than
//! blocking, and [`FrameDecoder`] only buffers.
//!
//! # Memory
//! A peer decides what we receive; the limit `max_len` decides what that may cost us. Two things
//! allocate, and both are bounded:
//!
//! - **The buffer.** A length above the limit is refused as soon as its 4 prefix bytes are seen,
//!   before anything is buffered for it. [`FrameDecoder::push`] grows the buffer by doubling, so
//!   a frame arriving in many small reads is copied a bounded number of times, but never past the
//!   end of the current frame (or the bytes actually pushed, if more): provided the caller drains
//!   [`FrameDecoder::next_envelope`] after every push, as it must anyway, the buffer's capacity
//!   stays below `LENGTH_PREFIX_LEN + max_len + the largest chunk pushed`, and a peer must send
//!   at least half of what we reserve for it. The capacity is kept for the next frame.
//! - **The decoded message.** Its strings and byte strings are exact copies of payload bytes, and
//!   every collection of structs has a limit that is checked before allocating for it and bounds
//!   its preallocation (see the `messages` limits). So decoding a payload of `n` bytes allocates
//!   at most `n + MAX_DECODED_OVERHEAD` bytes ([`MAX_DECODED_OVERHEAD`]: 312 KiB on 64-bit
//!   targets), also when it fails half-way. Under [`DEFAULT_MAX_FRAME_LEN`], which is more than
//!   `MAX_DECODED_OVERHEAD`, decoding a frame never allocates more than the frame limit beyond
//!   the frame's own bytes, and a decoder with the message it yields holds at most three times
//!   the limit plus a length prefix and one chunk.
//!
//! Without the collection limits, serde would preallocate `min(claimed, 1 MiB / size_of::<T>())`
//! elements for any length the payload has room for, and even an honest frame would grow up to
//! 16-fold (a 2-byte `Counter` takes 32 bytes in memory). `fuzz/fuzz_targets/frame_decoder.rs`
//! checks these bounds against the allocator.

use std::vec::Vec;

use super::{Envelope, HANDSHAKE_VERSION, MAX_DECODED_OVERHEAD, Message, SUPPORTED_VERSIONS};

/// Bytes of the length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;
/// Default largest payload accepted: room for an interval report with hundreds of histograms.
pub const DEFAULT_MAX_FRAME_LEN: usize = 4 << 20;

const _: () = assert!(
    MAX_DECODED_OVERHEAD < DEFAULT_MAX_FRAME_LEN,
    "decoding a default-sized frame could allocate more than the limit beyond the frame"
);

/// Why bytes could not be turned into an envelope, or an envelope into bytes. Every variant means
/// the connection's byte stream can no longer be trusted: close it and log this.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix announces more than the limit.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Announced (or, when encoding, actual) payload length.
        len: u64,
        /// The limit in force.
        max: usize,
    },
    /// The envelope's version is one this build does not speak.
    #[error("protocol version {version} not supported (this build speaks {min}..={max})")]
    UnsupportedVersion {
        /// Version found in the envelope.
        version: u16,
        /// Oldest version this build speaks.
        min: u16,
        /// Newest version this build speaks.
        max: u16,
    },
    /// The payload is not a valid envelope.
    #[error("malformed frame payload")]
    Malformed(#[source] postcard::Error),
    /// The payload has bytes left over after the message.
    #[error("{count} unexpected bytes after the message")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}

/// Encodes one envelope as a frame, refusing payloads above `max_len`.
pub fn encode_frame(envelope: &Envelope, max_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&[0; LENGTH_PREFIX_LEN]);
    let frame = postcard::to_extend(&envelope.version, frame).map_err(FrameError::Malformed)?;
    let mut frame = postcard::to_extend(&envelope.message, frame).map_err(FrameError::Malformed)?;
    let payload_len = frame.len() - LENGTH_PREFIX_LEN;
    let too_large = || FrameError::TooLarge {
        len: payload_len as u64,
        max: max_len,
    };
    if payload_len > max_len {
        return Err(too_large());
    }
    let prefix = u32::try_from(payload_len).map_err(|_| too_large())?;
    frame[..LENGTH_PREFIX_LEN].copy_from_slice(&prefix.to_be_bytes());
    Ok(frame)
}

/// Reads the length prefix at the start of `buf`: `Ok(None)` when fewer than 4 bytes are there.
pub fn payload_len(buf: &[u8], max_len: usize) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_LEN>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix);
    match usize::try_from(len) {
        Ok(len) if len <= max_len => Ok(Some(len)),
        _ => Err(FrameError::TooLarge {
            len: u64::from(len),
            max: max_len,
        }),
    }
}

/// Decodes the frame at the start of `buf`. Returns the envelope and the bytes it took, or
/// `Ok(None)` when `buf` holds only part of a frame.
pub fn decode_frame(buf: &[u8], max_len: usize) -> Result<Option<(Envelope, usize)>, FrameError> {
    let Some(len) = payload_len(buf, max_len)? else {
        return Ok(None);
    };
    let Some(payload) = buf.get(LENGTH_PREFIX_LEN..LENGTH_PREFIX_LEN + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, LENGTH_PREFIX_LEN + len)))
}

/// Decodes a frame's payload (without its length prefix).
pub fn decode_payload(payload: &[u8]) -> Result<Envelope, FrameError> {
    let (version, rest) =
        postcard::take_from_bytes::<u16>(payload).map_err(FrameError::Malformed)?;
    let unsupported = || FrameError::UnsupportedVersion {
        version,
        min: *SUPPORTED_VERSIONS.start(),
        max: *SUPPORTED_VERSIONS.end(),
    };
    // The frozen handshake is always readable, even in a version this build no longer speaks
    // for anything else, so the peer can be told why it is refused.
    if version != HANDSHAKE_VERSION && !SUPPORTED_VERSIONS.contains(&version) {
        return Err(unsupported());
    }
    let (message, rest) =
        postcard::take_from_bytes::<Message>(rest).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::TrailingBytes { count: rest.len() });
    }
    if !SUPPORTED_VERSIONS.contains(&version) && !message.is_handshake() {
        return Err(unsupported());
    }
    Ok(Envelope { version, message })
}

/// Buffers bytes from a stream and yields the envelopes in it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_len: usize,
}

impl FrameDecoder {
    /// A decoder refusing payloads above `max_len`.
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_len,
        }
    }

    /// Appends bytes read from the stream. Drain [`Self::next_envelope`] before the next push, or
    /// the buffer's bound (see the module docs) does not hold.
    pub fn push(&mut self, bytes: &[u8]) {
        let needed = self.buf.len() + bytes.len();
        if needed > self.buf.capacity() {
            // `Vec`'s own growth would double past the frame's end, up to twice the limit.
            let frame_end = self.frame_end(bytes).unwrap_or(needed);
            let target = needed.max(frame_end.min(2 * self.buf.capacity()));
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Where the first frame ends once `incoming` is appended, if its length prefix is complete
    /// and within the limit.
    fn frame_end(&self, incoming: &[u8]) -> Option<usize> {
        let mut prefix = [0; LENGTH_PREFIX_LEN];
        let mut bytes = self.buf.iter().chain(incoming);
        for byte in &mut prefix {
            *byte = *bytes.next()?;
        }
        let len = payload_len(&prefix, self.max_len).ok()??;
        Some(LENGTH_PREFIX_LEN + len)
    }

    /// The next complete envelope, `Ok(None)` until one is complete. After an error the stream
    /// is unusable.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, FrameError> {
        match decode_frame(&self.buf, self.max_len)? {
            Some((envelope, used)) => {
                self.buf.drain(..used);
                Ok(Some(envelope))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Bytes the buffer has room for: the memory it holds.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}
