//! HTTP/2 with prior knowledge (h2c, RFC 9113) and gRPC over it.
//!
//! **Client side.** After the 24-byte connection preface every message is one frame. The client's
//! frames are replayed verbatim and in order, so the shadow server's HPACK decoder sees exactly
//! the header blocks live's did and its dynamic table stays in step: nothing is decoded, dropped
//! or re-encoded on the way. Streams are exchanges: a response is owed for a stream once the
//! client's half of it ends (END_STREAM on its HEADERS or last DATA frame). HTTP/2 multiplexes,
//! so no frame waits for another stream's response: frames go out at their original offsets
//! (`gated` is false), and concurrency on the shadow is the concurrency live saw. A client
//! RST_STREAM cancels its stream's response; a client GOAWAY ends the session normally.
//!
//! **Server side.** Frames are delimited by their 9-byte headers (hand-read: a length, a type,
//! flags and a stream id at fixed offsets need no parser crate), DATA payloads are counted and
//! dropped, and header blocks (HEADERS, PUSH_PROMISE and their CONTINUATIONs) are decoded in
//! order with `loona-hpack`, the maintained fork of the `hpack` crate, because the server's
//! dynamic table must be followed to read `:status` and `grpc-status`. A stream's response is
//! complete at the server's END_STREAM or RST_STREAM. It is an error reply when `:status` is
//! 5xx, when `grpc-status` names a server-side failure (UNKNOWN, DEADLINE_EXCEEDED,
//! UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS: the codes gRPC maps to HTTP 5xx), or when
//! the server resets the stream with an error code. Streams a server GOAWAY says it never
//! processed are released unanswered: the live client retried them on a new connection, and
//! that flow is replayed on its own.
//!
//! **Holes.** A lost segment may carry part of a header block, after which neither frame
//! boundaries nor the server's HPACK state can be trusted, so an HTTP/2 copy does not
//! resynchronise: the splitter gives the flow up ([`ClientFraming::resynchronises`]).
//!
//! Not covered: the HTTP/1.1 `Upgrade: h2c` path (such a flow is replayed as HTTP/1.1 up to the
//! upgrade) and the HTTP policy's per-request rules (skipping a request would desynchronise the
//! server's HPACK table).

use std::collections::{HashMap, HashSet};

use super::{
    Action, ClientFraming, ClientMessage, Completed, ErrorReply, FrameError, Protocol,
    ResponseFraming,
};

const PROTOCOL: &str = "http2";
/// The client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
const HEAD: usize = 9;
/// Largest header block buffered while its CONTINUATIONs arrive.
const MAX_BLOCK: usize = 1 << 20;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const PUSH_PROMISE: u8 = 0x5;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// gRPC status codes that gRPC maps to HTTP 5xx: failures of the server, not of the request.
const GRPC_SERVER_FAILURES: [u32; 6] = [2, 4, 12, 13, 14, 15];

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FrameHead {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> Self {
        Self {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    const fn has(self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

/// A HEADERS or PUSH_PROMISE payload without its padding and priority fields: the header block
/// fragment.
fn fragment(head: FrameHead, payload: &[u8]) -> Result<&[u8], FrameError> {
    let mut body = payload;
    if head.has(PADDED) {
        let (&pad, rest) = body.split_first().ok_or(FrameError::malformed(
            PROTOCOL,
            "padded frame without pad length",
        ))?;
        let keep = rest
            .len()
            .checked_sub(usize::from(pad))
            .ok_or(FrameError::malformed(
                PROTOCOL,
                "padding longer than the frame",
            ))?;
        body = &rest[..keep];
    }
    let skip = match head.kind {
        HEADERS if head.has(PRIORITY) => 5,
        PUSH_PROMISE => 4,
        _ => 0,
    };
    body.get(skip..).ok_or(FrameError::malformed(
        PROTOCOL,
        "frame shorter than its fields",
    ))
}

/// The client's frames, one message each.
#[derive(Debug, Default)]
pub struct H2Client {
    preface_seen: bool,
    /// Highest stream the client opened.
    last_stream: u32,
    /// Streams whose request half is still open.
    open: HashSet<u32>,
}

impl ClientFraming for H2Client {
    fn protocol(&self) -> Protocol {
        Protocol::Http2
    }

    fn check(&mut self, buf: &[u8]) -> Result<ClientMessage, FrameError> {
        let unpaced = |len, responses, stream| ClientMessage {
            gated: false,
            stream,
            ..ClientMessage::replay(len, responses)
        };
        if !self.preface_seen {
            if buf.len() < PREFACE.len() {
                return if PREFACE.starts_with(buf) {
                    Err(FrameError::Incomplete)
                } else {
                    Err(FrameError::malformed(PROTOCOL, "no connection preface"))
                };
            }
            if !buf.starts_with(PREFACE) {
                return Err(FrameError::malformed(PROTOCOL, "no connection preface"));
            }
            self.preface_seen = true;
            return Ok(unpaced(PREFACE.len(), 0, None));
        }
        if buf.len() < HEAD {
            return Err(FrameError::Incomplete);
        }
        let head = FrameHead::parse(buf);
        let len = HEAD + head.len;
        if buf.len() < len {
            return Err(FrameError::Incomplete);
        }
        let stream = head.stream;
        Ok(match head.kind {
            HEADERS if stream % 2 == 1 && stream > self.last_stream => {
                self.last_stream = stream;
                if head.has(END_STREAM) {
                    unpaced(len, 1, Some(stream))
                } else {
                    self.open.insert(stream);
                    unpaced(len, 0, Some(stream))
                }
            }
            DATA | HEADERS if head.has(END_STREAM) && self.open.remove(&stream) => {
                unpaced(len, 1, Some(stream))
            }
            RST_STREAM => {
                self.open.remove(&stream);
                ClientMessage {
                    action: Action::Cancel(stream),
                    ..unpaced(len, 0, Some(stream))
                }
            }
            GOAWAY => ClientMessage {
                action: Action::Terminate,
                ..unpaced(len, 0, None)
            },
            _ => unpaced(len, 0, (stream != 0).then_some(stream)),
        })
    }

    fn boundary(&self, _buf: &[u8]) -> bool {
        false
    }

    fn resynchronises(&self) -> bool {
        false
    }
}

/// What the server has said so far on one stream.
#[derive(Debug, Clone, Copy, Default)]
struct StreamState {
    status: Option<u16>,
    grpc_status: Option<u32>,
}

/// The header block being gathered from HEADERS or PUSH_PROMISE and its CONTINUATIONs.
#[derive(Debug)]
struct Block {
    stream: u32,
    /// Whether the frame that began it ended the stream (HEADERS with END_STREAM).
    end_stream: bool,
    /// A PUSH_PROMISE's block: decoded only to keep the table in step.
    promise: bool,
}

/// The server's frames, decoded enough to know when each stream's response ends and how.
pub struct H2Responses {
    decoder: loona_hpack::Decoder<'static>,
    /// A partial frame header.
    head_buf: [u8; HEAD],
    head_len: usize,
    /// The frame being read and the payload bytes it still has.
    frame: Option<(FrameHead, usize)>,
    /// Payload of the frame being read, for the kinds that are decoded.
    payload: Vec<u8>,
    block: Option<Block>,
    block_buf: Vec<u8>,
    streams: HashMap<u32, StreamState>,
    /// Streams the client is owed a response on, from [`ResponseFraming::expect`].
    expected: HashSet<u32>,
    started: Vec<u32>,
}

impl std::fmt::Debug for H2Responses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Responses")
            .field("frame", &self.frame)
            .field("streams", &self.streams.len())
            .field("expected", &self.expected.len())
            .finish_non_exhaustive()
    }
}

impl Default for H2Responses {
    fn default() -> Self {
        Self {
            decoder: loona_hpack::Decoder::new(),
            head_buf: [0; HEAD],
            head_len: 0,
            frame: None,
            payload: Vec::new(),
            block: None,
            block_buf: Vec::new(),
            streams: HashMap::new(),
            expected: HashSet::new(),
            started: Vec::new(),
        }
    }
}

impl H2Responses {
    /// Whether a frame's payload is kept until the frame ends (everything but DATA, whose
    /// payload is only counted).
    const fn keeps(kind: u8) -> bool {
        matches!(
            kind,
            HEADERS | PUSH_PROMISE | CONTINUATION | RST_STREAM | GOAWAY
        )
    }

    fn complete(&mut self, stream: u32, end: usize, reset: Option<u32>, done: &mut Vec<Completed>) {
        let state = self.streams.remove(&stream).unwrap_or_default();
        if !self.expected.remove(&stream) {
            return;
        }
        let error = if state.status.is_some_and(|s| s >= 500) {
            Some(ErrorReply::Http5xx)
        } else if state
            .grpc_status
            .is_some_and(|g| GRPC_SERVER_FAILURES.contains(&g))
            || reset.is_some_and(|code| code != 0)
        {
            Some(ErrorReply::Protocol)
        } else {
            None
        };
        done.push(Completed {
            status: state.status,
            error,
            stream: Some(stream),
            ..Completed::at(end)
        });
    }

    /// A whole header block arrived: decode it, in order, and note what it says.
    fn decode_block(&mut self, end: usize, done: &mut Vec<Completed>) -> Result<(), FrameError> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let mut status = None;
        let mut grpc_status = None;
        self.decoder
            .decode_with_cb(&self.block_buf, |name, value| match &*name {
                b":status" => {
                    status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|v| v.parse().ok());
                }
                b"grpc-status" => {
                    grpc_status = std::str::from_utf8(&value)
                        .ok()
                        .and_then(|v| v.parse().ok());
                }
                _ => {}
            })
            .map_err(|_| FrameError::malformed(PROTOCOL, "header block does not decode"))?;
        self.block_buf.clear();
        if block.promise {
            return Ok(());
        }
        let state = self.streams.entry(block.stream).or_default();
        // An informational (1xx) head is followed by the final one.
        if let Some(s) = status.filter(|s| *s >= 200) {
            state.status = Some(s);
        }
        if grpc_status.is_some() {
            state.grpc_status = grpc_status;
        }
        if block.end_stream {
            self.complete(block.stream, end, None, done);
        }
        Ok(())
    }

    /// The frame `head` ended at `end` in the fed bytes; its payload (if kept) is in `payload`.
    fn frame_done(
        &mut self,
        head: FrameHead,
        end: usize,
        done: &mut Vec<Completed>,
    ) -> Result<(), FrameError> {
        let payload = std::mem::take(&mut self.payload);
        match head.kind {
            DATA if head.has(END_STREAM) => self.complete(head.stream, end, None, done),
            HEADERS | PUSH_PROMISE => {
                if self.block.is_some() {
                    return Err(FrameError::malformed(PROTOCOL, "header block interrupted"));
                }
                self.block_buf.extend_from_slice(fragment(head, &payload)?);
                self.block = Some(Block {
                    stream: head.stream,
                    end_stream: head.kind == HEADERS && head.has(END_STREAM),
                    promise: head.kind == PUSH_PROMISE,
                });
                if head.has(END_HEADERS) {
                    self.decode_block(end, done)?;
                }
            }
            CONTINUATION => {
                if self.block.as_ref().is_none_or(|b| b.stream != head.stream) {
                    return Err(FrameError::malformed(PROTOCOL, "stray CONTINUATION"));
                }
                if self.block_buf.len() + payload.len() > MAX_BLOCK {
                    return Err(FrameError::malformed(PROTOCOL, "header block over 1 MiB"));
                }
                self.block_buf.extend_from_slice(&payload);
                if head.has(END_HEADERS) {
                    self.decode_block(end, done)?;
                }
            }
            RST_STREAM => {
                let code = payload
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                self.complete(head.stream, end, Some(code), done);
            }
            GOAWAY => {
                // Streams above the last one it processed are never answered: release them.
                let last = payload.get(..4).map_or(0, |b| {
                    u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff
                });
                let mut refused: Vec<u32> = self
                    .expected
                    .iter()
                    .copied()
                    .filter(|s| *s > last)
                    .collect();
                refused.sort_unstable();
                for stream in refused {
                    self.expected.remove(&stream);
                    self.streams.remove(&stream);
                    done.push(Completed {
                        stream: Some(stream),
                        unanswered: true,
                        ..Completed::at(end)
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl ResponseFraming for H2Responses {
    fn expect(&mut self, message: &ClientMessage) {
        match (&message.action, message.stream) {
            (Action::Cancel(stream), _) => {
                self.expected.remove(stream);
                self.streams.remove(stream);
            }
            (_, Some(stream)) if message.responses > 0 => {
                self.expected.insert(stream);
            }
            _ => {}
        }
    }

    fn feed(&mut self, data: &[u8], done: &mut Vec<Completed>) -> Result<(), FrameError> {
        let mut at = 0;
        while at < data.len() {
            let (head, remaining) = match self.frame {
                Some(frame) => frame,
                None => {
                    let take = (HEAD - self.head_len).min(data.len() - at);
                    self.head_buf[self.head_len..self.head_len + take]
                        .copy_from_slice(&data[at..at + take]);
                    self.head_len += take;
                    at += take;
                    if self.head_len < HEAD {
                        break;
                    }
                    self.head_len = 0;
                    let head = FrameHead::parse(&self.head_buf);
                    if self.block.is_some() && head.kind != CONTINUATION {
                        return Err(FrameError::malformed(PROTOCOL, "header block interrupted"));
                    }
                    if matches!(head.kind, DATA | HEADERS) && head.stream != 0 {
                        self.started.push(head.stream);
                    }
                    (head, head.len)
                }
            };
            let take = remaining.min(data.len() - at);
            if Self::keeps(head.kind) {
                if self.payload.len() + take > MAX_BLOCK {
                    return Err(FrameError::malformed(PROTOCOL, "frame over 1 MiB"));
                }
                self.payload.extend_from_slice(&data[at..at + take]);
            }
            at += take;
            if remaining == take {
                self.frame = None;
                self.frame_done(head, at, done)?;
            } else {
                self.frame = Some((head, remaining - take));
            }
        }
        Ok(())
    }

    fn take_started(&mut self, into: &mut Vec<u32>) {
        into.append(&mut self.started);
    }

    fn multiplexed(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn block(headers: &[(&[u8], &[u8])], encoder: &mut loona_hpack::Encoder<'_>) -> Vec<u8> {
        encoder.encode(headers.iter().copied())
    }

    fn cut(client: &mut H2Client, mut buf: &[u8]) -> Vec<ClientMessage> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let m = client.check(buf).expect("whole frames");
            buf = &buf[m.len..];
            out.push(m);
        }
        out
    }

    #[test]
    fn a_response_is_owed_when_the_clients_half_of_a_stream_ends() {
        let mut enc = loona_hpack::Encoder::new();
        let get = block(&[(b":method", b"GET"), (b":path", b"/")], &mut enc);
        let post = block(&[(b":method", b"POST"), (b":path", b"/p")], &mut enc);
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &get));
        bytes.extend(frame(HEADERS, END_HEADERS, 3, &post));
        bytes.extend(frame(DATA, 0, 3, b"abc"));
        bytes.extend(frame(DATA, END_STREAM, 3, b"d"));
        bytes.extend(frame(RST_STREAM, 0, 3, &8u32.to_be_bytes()));
        bytes.extend(frame(GOAWAY, 0, 0, &[0; 8]));
        let got: Vec<_> = cut(&mut H2Client::default(), &bytes)
            .into_iter()
            .map(|m| (m.responses, m.stream, m.gated, m.action))
            .collect();
        assert_eq!(
            got,
            [
                (0, None, false, Action::Replay),
                (0, None, false, Action::Replay),
                (1, Some(1), false, Action::Replay),
                (0, Some(3), false, Action::Replay),
                (0, Some(3), false, Action::Replay),
                (1, Some(3), false, Action::Replay),
                (0, Some(3), false, Action::Cancel(3)),
                (0, None, false, Action::Terminate),
            ]
        );
        let mut c = H2Client::default();
        assert_eq!(c.check(&PREFACE[..10]), Err(FrameError::Incomplete));
        assert!(c.check(b"GET / HTTP/1.1\r\n\r\n12345678").is_err());
    }

    /// Feeds `bytes` one byte at a time, as the worst split of reads.
    fn feed_bytewise(r: &mut H2Responses, bytes: &[u8]) -> Vec<Completed> {
        let mut done = Vec::new();
        for b in bytes {
            r.feed(std::slice::from_ref(b), &mut done).unwrap();
        }
        done
    }

    fn expecting(streams: &[u32]) -> H2Responses {
        let mut r = H2Responses::default();
        for &s in streams {
            r.expect(&ClientMessage {
                stream: Some(s),
                ..ClientMessage::replay(1, 1)
            });
        }
        r
    }

    #[test]
    fn streams_complete_out_of_order_with_status_and_grpc_errors() {
        let mut enc = loona_hpack::Encoder::new();
        let ok = block(&[(b":status", b"200")], &mut enc);
        let failed = block(&[(b":status", b"503")], &mut enc);
        let grpc_head = block(
            &[(b":status", b"200"), (b"content-type", b"application/grpc")],
            &mut enc,
        );
        let grpc_trailer = block(&[(b"grpc-status", b"13")], &mut enc);
        let grpc_not_found = block(&[(b"grpc-status", b"5")], &mut enc);
        let mut r = expecting(&[1, 3, 5, 7, 9]);
        let mut bytes = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]); // SETTINGS
        bytes.extend(frame(HEADERS, END_HEADERS, 3, &ok));
        bytes.extend(frame(HEADERS, END_HEADERS, 1, &failed));
        bytes.extend(frame(DATA, 0, 3, &[7; 300]));
        bytes.extend(frame(DATA, END_STREAM, 1, b"oops"));
        bytes.extend(frame(DATA, END_STREAM | PADDED, 3, &[2, 1, 0, 0]));
        bytes.extend(frame(HEADERS, END_HEADERS, 5, &grpc_head));
        // Trailers split over a CONTINUATION.
        bytes.extend(frame(HEADERS, END_STREAM, 5, &grpc_trailer[..1]));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 5, &grpc_trailer[1..]));
        // A trailers-only gRPC response with a client-side status is no error.
        let mut only = grpc_head;
        only.extend(&grpc_not_found);
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 7, &only));
        bytes.extend(frame(RST_STREAM, 0, 9, &7u32.to_be_bytes()));
        let done = feed_bytewise(&mut r, &bytes);
        let got: Vec<_> = done
            .iter()
            .map(|c| (c.stream, c.status, c.error, c.unanswered))
            .collect();
        assert_eq!(
            got,
            [
                (Some(1), Some(503), Some(ErrorReply::Http5xx), false),
                (Some(3), Some(200), None, false),
                (Some(5), Some(200), Some(ErrorReply::Protocol), false),
                (Some(7), Some(200), None, false),
                (Some(9), None, Some(ErrorReply::Protocol), false),
            ]
        );
        assert_eq!(
            done.last().unwrap().end,
            1,
            "end is within the last fed slice"
        );
        let mut started = Vec::new();
        r.take_started(&mut started);
        assert_eq!(started[..3], [3, 1, 3]);
    }

    #[test]
    fn goaway_releases_the_streams_it_never_processed_and_cancel_forgets_one() {
        let mut r = expecting(&[1, 3, 5]);
        r.expect(&ClientMessage {
            action: Action::Cancel(1),
            stream: Some(1),
            ..ClientMessage::replay(1, 0)
        });
        let mut goaway = 3u32.to_be_bytes().to_vec();
        goaway.extend(0u32.to_be_bytes());
        let done = feed_bytewise(&mut r, &frame(GOAWAY, 0, 0, &goaway));
        let got: Vec<_> = done.iter().map(|c| (c.stream, c.unanswered)).collect();
        assert_eq!(got, [(Some(5), true)]);
        // Stream 1 was cancelled: its late reset completes nothing.
        let done = feed_bytewise(&mut r, &frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()));
        assert!(done.is_empty());
    }

    #[test]
    fn the_servers_dynamic_table_is_followed_across_responses() {
        // The encoder indexes ":status 503" on first use; the second response refers to it.
        let mut enc = loona_hpack::Encoder::new();
        let first = block(&[(b":status", b"503"), (b"x-a", b"1")], &mut enc);
        let second = block(&[(b":status", b"503"), (b"x-a", b"1")], &mut enc);
        assert!(
            second.len() < first.len(),
            "the second block uses the table"
        );
        let mut r = expecting(&[1, 3]);
        let mut bytes = frame(HEADERS, END_HEADERS | END_STREAM, 1, &first);
        bytes.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let done = feed_bytewise(&mut r, &bytes);
        assert!(done.iter().all(|c| c.status == Some(503)));
        assert_eq!(done.len(), 2);
    }

    #[test]
    fn broken_frames_are_errors_not_panics() {
        let mut r = expecting(&[1]);
        let mut done = Vec::new();
        // CONTINUATION without a block.
        assert!(
            r.feed(&frame(CONTINUATION, END_HEADERS, 1, b"x"), &mut done)
                .is_err()
        );
        let mut r = expecting(&[1]);
        // Padding longer than the frame.
        assert!(
            r.feed(&frame(HEADERS, END_HEADERS | PADDED, 1, &[9, 1]), &mut done)
                .is_err()
        );
        let mut r = expecting(&[1]);
        // A block that is not HPACK.
        assert!(
            r.feed(&frame(HEADERS, END_HEADERS, 1, &[0xff; 8]), &mut done)
                .is_err()
        );
    }
}
