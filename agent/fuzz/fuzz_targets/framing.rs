//! Fuzzes the shadow's protocol framers (HTTP/1, HTTP/2, RESP, PostgreSQL, MySQL, opaque): the
//! client side that cuts the mirrored stream into messages, and the response side that tells
//! when the shadow server's answer to each is complete.
//!
//! The input's first byte picks the protocol, its second the size (1..=64) of the pieces the
//! bytes arrive in, its third where the client's bytes end and the server's begin. Whatever the
//! bytes, the target checks that:
//!
//! - nothing panics and nothing loops: every message cut has at least one byte and no more than
//!   the bytes buffered;
//! - how the bytes arrive changes nothing: cutting the client stream as it grows piece by piece
//!   yields the same messages as cutting it whole (except for the opaque fallback, whose
//!   messages are the segments as they came) (a framer that changed its state on an
//!   incomplete message would replay a split segment differently), and feeding the server's
//!   bytes piece by piece completes the same responses, at the same offsets, as feeding them
//!   at once;
//! - every completed response ends inside the bytes fed.

#![no_main]

use std::sync::Arc;

use doppel_agent::shadow::{
    framing::{ClientMessage, Completed, FrameError, Protocol},
    http::HttpPolicy,
};
use libfuzzer_sys::fuzz_target;

const PROTOCOLS: [Protocol; 6] = [
    Protocol::Http1,
    Protocol::Http2,
    Protocol::Redis,
    Protocol::Postgres,
    Protocol::Mysql,
    Protocol::Opaque,
];

/// The messages cut from `stream` when it arrives in pieces of `piece` bytes (the whole stream
/// at once for `usize::MAX`), and whether cutting ended on malformed bytes.
fn cut(protocol: Protocol, stream: &[u8], piece: usize) -> (Vec<ClientMessage>, bool) {
    let mut framing = protocol.client_framing(&Arc::new(HttpPolicy::default()));
    let mut messages = Vec::new();
    let mut start = 0;
    let mut arrived = 0;
    while arrived < stream.len() {
        arrived = arrived.saturating_add(piece).min(stream.len());
        loop {
            let buffered = &stream[start..arrived];
            if buffered.is_empty() {
                break;
            }
            match framing.check(buffered) {
                Ok(message) => {
                    assert!(
                        (1..=buffered.len()).contains(&message.len),
                        "a message of {} bytes cut from {}",
                        message.len,
                        buffered.len()
                    );
                    start += message.len;
                    messages.push(message);
                }
                Err(FrameError::Incomplete) => break,
                Err(FrameError::Malformed { .. }) => return (messages, true),
            }
        }
    }
    (messages, false)
}

/// The responses completed, with offsets from the start of `stream`, when the server's bytes
/// arrive in pieces of `piece` bytes after the client's `messages` were written.
fn answer(
    protocol: Protocol,
    messages: &[ClientMessage],
    client: &[u8],
    stream: &[u8],
    piece: usize,
) -> (Vec<Completed>, bool) {
    let mut framing = protocol.response_framing();
    let mut at = 0;
    for message in messages {
        let mut bytes = client[at..at + message.len].to_vec();
        at += message.len;
        if framing.rewrite(message, &mut bytes) {
            framing.expect(message);
        }
    }
    let mut completed = Vec::new();
    let mut fed = 0;
    for data in stream.chunks(piece.max(1)) {
        let mut done = Vec::new();
        let result = framing.feed(data, &mut done);
        for mut c in done {
            assert!(c.end <= data.len(), "a response ends past the bytes fed");
            c.end += fed;
            completed.push(c);
        }
        if result.is_err() {
            return (completed, true);
        }
        fed += data.len();
    }
    (completed, false)
}

fuzz_target!(|input: &[u8]| {
    let [which, piece, split, bytes @ ..] = input else {
        return;
    };
    let protocol = PROTOCOLS[usize::from(*which) % PROTOCOLS.len()];
    let piece = usize::from(piece % 64) + 1;
    let split = bytes.len() * usize::from(*split) / 255;
    let (client, server) = bytes.split_at(split);
    let (whole, whole_malformed) = cut(protocol, client, usize::MAX);
    let (pieces, pieces_malformed) = cut(protocol, client, piece);
    // The opaque fallback knows no messages: each mirrored segment is one, as it came.
    if protocol != Protocol::Opaque {
        assert_eq!(
            (&pieces, pieces_malformed),
            (&whole, whole_malformed),
            "{protocol:?}: the client's bytes in pieces of {piece} cut otherwise than whole"
        );
    }
    let (at_once, at_once_failed) = answer(protocol, &whole, client, server, usize::MAX);
    let (in_pieces, in_pieces_failed) = answer(protocol, &whole, client, server, piece);
    assert_eq!(
        (&in_pieces, in_pieces_failed),
        (&at_once, at_once_failed),
        "{protocol:?}: the server's bytes in pieces of {piece} completed otherwise than at once"
    );
});
