//! Reading and writing frames on tokio byte streams (a QUIC stream, a TCP socket).
//!
//! The parsing stays in [`frame`](super::frame); this module only moves bytes. Reading takes the
//! 4-byte prefix first and refuses an oversized length before allocating for it.

use std::{io, vec, vec::Vec};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

use super::{
    Envelope,
    frame::{FrameError, LENGTH_PREFIX_LEN, decode_payload, encode_frame, payload_len},
};

/// Why a frame could not be read from or written to a stream.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The stream failed.
    #[error("stream I/O failed")]
    Io(#[source] io::Error),
    /// The bytes were not a valid frame; the stream can no longer be trusted.
    #[error("invalid frame")]
    Frame(#[source] FrameError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

/// Reads one envelope. `Ok(None)` when the stream ends cleanly between frames.
pub async fn read_envelope<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_len: usize,
) -> Result<Option<Envelope>, FrameIoError> {
    let mut prefix = [0; LENGTH_PREFIX_LEN];
    let mut filled = 0;
    while filled < LENGTH_PREFIX_LEN {
        let n = reader
            .read(&mut prefix[filled..])
            .await
            .map_err(FrameIoError::Io)?;
        if n == 0 {
            return if filled == 0 {
                Ok(None)
            } else {
                Err(FrameIoError::Truncated)
            };
        }
        filled += n;
    }
    let len = payload_len(&prefix, max_len)
        .map_err(FrameIoError::Frame)?
        .ok_or(FrameIoError::Truncated)?;
    let mut payload = vec![0; len];
    reader.read_exact(&mut payload).await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            FrameIoError::Truncated
        } else {
            FrameIoError::Io(e)
        }
    })?;
    decode_payload(&payload)
        .map(Some)
        .map_err(FrameIoError::Frame)
}

/// Encodes `envelope` and writes it as one frame.
pub async fn write_envelope<W: AsyncWrite + Unpin>(
    writer: &mut W,
    envelope: &Envelope,
    max_len: usize,
) -> Result<(), FrameIoError> {
    let frame: Vec<u8> = encode_frame(envelope, max_len).map_err(FrameIoError::Frame)?;
    writer.write_all(&frame).await.map_err(FrameIoError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Ack, DEFAULT_MAX_FRAME_LEN, Message};

    fn block_on<F: Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(future)
    }

    #[test]
    fn frames_round_trip_through_a_stream_and_end_cleanly() {
        block_on(async {
            let (mut a, mut b) = tokio::io::duplex(64);
            let sent = Envelope::new(super::super::PROTOCOL_VERSION, Message::Ack(Ack { seq: 7 }));
            let writer = async {
                write_envelope(&mut a, &sent, DEFAULT_MAX_FRAME_LEN)
                    .await
                    .expect("write");
                drop(a);
            };
            let reader = async {
                let first = read_envelope(&mut b, DEFAULT_MAX_FRAME_LEN).await;
                let second = read_envelope(&mut b, DEFAULT_MAX_FRAME_LEN).await;
                (first, second)
            };
            let ((), (first, second)) = tokio::join!(writer, reader);
            assert_eq!(first.expect("first").expect("a frame"), sent);
            assert!(matches!(second, Ok(None)), "{second:?}");
        });
    }

    #[test]
    fn an_oversized_length_is_refused_before_reading_the_payload() {
        block_on(async {
            let bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
            let mut reader = bytes;
            let err = read_envelope(&mut reader, 1024)
                .await
                .expect_err("too large");
            assert!(
                matches!(
                    err,
                    FrameIoError::Frame(FrameError::TooLarge { max: 1024, .. })
                ),
                "{err:?}"
            );
        });
    }

    #[test]
    fn a_stream_ending_inside_a_frame_is_truncated() {
        block_on(async {
            let bytes: &[u8] = &[0, 0, 0, 9, 1];
            let mut reader = bytes;
            let err = read_envelope(&mut reader, 1024)
                .await
                .expect_err("truncated");
            assert!(matches!(err, FrameIoError::Truncated), "{err:?}");
        });
    }
}
