//! Fuzzes [`read_envelope`], the path every agent and coordinator stream is read through
//! (the QUIC report streams, the control stream).
//!
//! The input stands for the bytes a hostile or broken peer sends. Its first byte picks the size
//! (1..=64) of the reads the stream hands out, the way a socket splits them; the rest is the
//! stream. Envelopes are read until the stream ends or a read fails, as the agent and the
//! coordinator do (a failed frame closes that one connection). Whatever the bytes, the target
//! checks that:
//!
//! - nothing panics and every read returns (a truncated stream is an error, never a hang);
//! - how the stream is split changes nothing: the envelopes read, and where and how reading
//!   fails, are exactly what [`decode_frame`] finds walking the whole stream frame by frame;
//! - a clean end is reported only between frames.

#![no_main]

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use doppel_common::wire::{DEFAULT_MAX_FRAME_LEN, FrameError, decode_frame, read_envelope};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// A stream that hands out at most `chunk` bytes a read.
struct Chunked<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(self.data.len()).min(buf.remaining());
        let (head, rest) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = rest;
        Poll::Ready(Ok(()))
    }
}

/// What walking the whole stream with [`decode_frame`] expects of each read.
#[derive(Debug, PartialEq)]
enum Expected {
    Envelope(String),
    End,
    Truncated,
    Frame(String),
}

fn expected(mut stream: &[u8]) -> Vec<Expected> {
    let mut out = Vec::new();
    loop {
        if stream.is_empty() {
            out.push(Expected::End);
            return out;
        }
        match decode_frame(stream, DEFAULT_MAX_FRAME_LEN) {
            Ok(Some((envelope, used))) => {
                out.push(Expected::Envelope(format!("{envelope:?}")));
                stream = &stream[used..];
            }
            Ok(None) => {
                out.push(Expected::Truncated);
                return out;
            }
            Err(e) => {
                out.push(Expected::Frame(frame_error(&e)));
                return out;
            }
        }
    }
}

fn frame_error(e: &FrameError) -> String {
    format!("{e:?}")
}

fuzz_target!(|input: &[u8]| {
    let Some((&first, stream)) = input.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let want = expected(stream);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let got = runtime.block_on(async {
        let mut reader = Chunked {
            data: stream,
            chunk,
        };
        let mut got = Vec::new();
        loop {
            match read_envelope(&mut reader, DEFAULT_MAX_FRAME_LEN).await {
                Ok(Some(envelope)) => got.push(Expected::Envelope(format!("{envelope:?}"))),
                Ok(None) => {
                    got.push(Expected::End);
                    return got;
                }
                Err(doppel_common::wire::FrameIoError::Truncated) => {
                    got.push(Expected::Truncated);
                    return got;
                }
                Err(doppel_common::wire::FrameIoError::Frame(e)) => {
                    got.push(Expected::Frame(frame_error(&e)));
                    return got;
                }
                Err(doppel_common::wire::FrameIoError::Io(e)) => {
                    panic!("an in-memory stream cannot fail: {e}")
                }
            }
        }
    });
    assert_eq!(got, want, "chunks of {chunk}");
});
