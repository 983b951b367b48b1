//! Cutting a reassembled client stream into the messages the replayer writes, each with the
//! arrival time and acknowledgement number of the segment that carried its first byte.
//!
//! The protocol's [`ClientFraming`] says where a message ends and what the server owes for it;
//! for the opaque fallback a message is one mirrored segment, so it is written at that
//! segment's own offset. The acknowledgement number says whether the live client had seen a
//! response before sending a message: it advances exactly when response bytes reached the
//! client. The replayer waits for outstanding responses only then, so a pipelined burst stays a
//! burst and a request that followed a response never overtakes it.
//!
//! After a hole (a lost mirror datagram the reassembler gave up on, [`ExchangeSplitter::hole`])
//! or bytes that break the protocol, the splitter drops the partial message and resumes at the
//! next segment whose first bytes the framing accepts as a message start
//! ([`ClientFraming::boundary`]): the hole costs only the messages it touched.

use std::{collections::VecDeque, sync::Arc};

use super::{
    framing::{self, Action, ClientFraming, ClientMessage, FrameError, Protocol},
    http::HttpPolicy,
};

/// Metadata of one mirrored segment, kept with its bytes through reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentMeta {
    /// When the mirror copy arrived, ns on the agent's monotonic clock.
    pub arrival_ns: u64,
    /// The segment's acknowledgement number.
    pub ack: u32,
}

/// One client message and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// What the framing said about it.
    pub frame: ClientMessage,
    /// Arrival of its first byte's mirror copy (for pacing).
    pub arrival_ns: u64,
    /// Acknowledgement number of the segment carrying its first byte.
    pub ack: u32,
}

/// Why the rest of a stream cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// One message is larger than the splitter holds.
    #[error("message larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// Bytes were lost (or broke the framing) in a protocol that cannot resume after a loss.
    #[error("{protocol} cannot resume after lost or malformed bytes")]
    Unsynchronisable {
        /// The protocol.
        protocol: &'static str,
    },
}

/// What the splitter discarded to get back in step, for the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    /// Times it resynchronised (after a hole or bytes the framing refused).
    pub resyncs: u64,
    /// Bytes dropped doing so.
    pub bytes: u64,
}

/// Cuts one flow's stream into messages.
#[derive(Debug)]
pub struct ExchangeSplitter {
    policy: Arc<HttpPolicy>,
    /// Set by the config, or detected from the first bytes.
    forced: Option<Protocol>,
    framing: Option<Box<dyn ClientFraming>>,
    /// Bytes not yet cut; `buf[..start]` is already consumed.
    buf: Vec<u8>,
    start: usize,
    /// (offset in `buf` where a segment's bytes begin, its metadata), oldest first.
    marks: VecDeque<(usize, SegmentMeta)>,
    max_message: usize,
    /// Dropping bytes until a segment starts a message.
    resync: bool,
    /// Lost bytes in a protocol that cannot resume ([`ClientFraming::resynchronises`]).
    broken: bool,
    skipped: Skipped,
}

impl ExchangeSplitter {
    /// A splitter for `protocol` (detected from the first bytes when `None`), applying
    /// `policy` to HTTP requests; no single message may exceed `max_message` bytes.
    pub fn new(policy: Arc<HttpPolicy>, protocol: Option<Protocol>, max_message: usize) -> Self {
        Self {
            policy,
            forced: protocol,
            framing: None,
            buf: Vec::new(),
            start: 0,
            marks: VecDeque::new(),
            max_message,
            resync: false,
            broken: false,
            skipped: Skipped::default(),
        }
    }

    /// The protocol, once known.
    pub fn protocol(&self) -> Option<Protocol> {
        self.framing.as_ref().map(|f| f.protocol())
    }

    /// Bytes buffered and not yet cut.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// What was skipped so far.
    pub fn skipped(&self) -> Skipped {
        self.skipped
    }

    /// Adds contiguous stream bytes.
    pub fn push(&mut self, data: &[u8], meta: SegmentMeta) {
        if data.is_empty() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Compact, so the buffer holds one message's worth, not the whole stream.
            self.buf.drain(..self.start);
            for mark in &mut self.marks {
                mark.0 = mark.0.saturating_sub(self.start);
            }
            self.start = 0;
        }
        self.marks.push_back((self.buf.len(), meta));
        self.buf.extend_from_slice(data);
        if self.framing.is_none() {
            let protocol = self
                .forced
                .or_else(|| framing::detect(&self.buf[self.start..]));
            self.framing = protocol.map(|p| p.client_framing(&self.policy));
        }
    }

    /// Bytes are missing before whatever is pushed next: drop the partial message and resume at
    /// the next message start.
    pub fn hole(&mut self) {
        self.drop_to(self.buf.len());
        if let Some(framing) = &self.framing {
            self.resync = true;
            self.skipped.resyncs += 1;
            self.broken |= !framing.resynchronises();
        }
    }

    /// Drops buffered bytes up to `buf[to]`, counting them.
    fn drop_to(&mut self, to: usize) {
        self.skipped.bytes += (to - self.start) as u64;
        self.start = to;
        while self.marks.len() > 1 && self.marks[1].0 <= self.start {
            self.marks.pop_front();
        }
        if self.start == self.buf.len() {
            self.buf.clear();
            self.marks.clear();
            self.start = 0;
        }
    }

    /// Metadata of the segment holding `buf[at]`.
    fn meta_at(&self, at: usize) -> SegmentMeta {
        let i = self.marks.partition_point(|(o, _)| *o <= at);
        self.marks[i.saturating_sub(1)].1
    }

    /// Offset in `buf` where the segment after the one holding `buf[at]` starts.
    fn next_mark_after(&self, at: usize) -> Option<usize> {
        self.marks.iter().map(|(o, _)| *o).find(|o| *o > at)
    }

    /// The next message, if one is whole. `flush` says the stream ended: bytes no protocol was
    /// recognised for are then replayed opaquely.
    pub fn next(&mut self, flush: bool) -> Result<Option<Message>, SplitError> {
        loop {
            if self.buffered() == 0 {
                return Ok(None);
            }
            if self.framing.is_none() {
                if !flush {
                    return Ok(None);
                }
                self.framing = Some(Protocol::Opaque.client_framing(&self.policy));
            }
            let Some(framing) = self.framing.as_ref() else {
                return Ok(None);
            };
            if self.broken {
                return Err(SplitError::Unsynchronisable {
                    protocol: framing.protocol().name(),
                });
            }
            if self.resync {
                // Resume at the first segment start that begins a message.
                let start = self.start;
                let found = self
                    .marks
                    .iter()
                    .map(|(o, _)| *o)
                    .filter(|o| *o >= start)
                    .find(|o| framing.boundary(&self.buf[*o..]));
                match found {
                    Some(at) => {
                        self.drop_to(at);
                        self.resync = false;
                    }
                    None => {
                        self.drop_to(self.buf.len());
                        return Ok(None);
                    }
                }
                continue;
            }
            let opaque = framing.protocol() == Protocol::Opaque;
            // The opaque fallback writes one segment at a time, at its own offset.
            let end = if opaque {
                self.next_mark_after(self.start).unwrap_or(self.buf.len())
            } else {
                self.buf.len()
            };
            let Some(framing) = self.framing.as_mut() else {
                return Ok(None);
            };
            let resumes = framing.resynchronises();
            match framing.check(&self.buf[self.start..end]) {
                Ok(frame) => {
                    let meta = self.meta_at(self.start);
                    let bytes = self.buf[self.start..self.start + frame.len].to_vec();
                    self.start += frame.len;
                    while self.marks.len() > 1 && self.marks[1].0 <= self.start {
                        self.marks.pop_front();
                    }
                    return Ok(Some(Message {
                        bytes,
                        frame,
                        arrival_ns: meta.arrival_ns,
                        ack: meta.ack,
                    }));
                }
                Err(FrameError::Incomplete) if self.buffered() > self.max_message => {
                    return Err(SplitError::TooLarge {
                        limit: self.max_message,
                    });
                }
                Err(FrameError::Incomplete) => return Ok(None),
                Err(FrameError::Malformed { .. }) => {
                    self.broken |= !resumes;
                    // Skip to the next segment that starts a message.
                    let next = self.next_mark_after(self.start).unwrap_or(self.buf.len());
                    self.drop_to(next);
                    self.resync = true;
                    self.skipped.resyncs += 1;
                }
            }
        }
    }
}

impl Message {
    /// Whether the replayer writes it (rather than skipping it or acting on it itself).
    pub fn is_written(&self) -> bool {
        matches!(self.frame.action, Action::Replay | Action::Terminate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(arrival_ns: u64, ack: u32) -> SegmentMeta {
        SegmentMeta { arrival_ns, ack }
    }

    fn drain(s: &mut ExchangeSplitter, flush: bool) -> Vec<Message> {
        std::iter::from_fn(|| s.next(flush).unwrap()).collect()
    }

    fn http() -> ExchangeSplitter {
        ExchangeSplitter::new(Arc::new(HttpPolicy::default()), None, 1 << 20)
    }

    #[test]
    fn a_denied_request_is_skipped_and_the_next_one_still_cut() {
        let mut s = http();
        s.push(
            b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            meta(1, 0),
        );
        s.push(b"GET /c HTTP/1.1\r\n\r\n", meta(5, 0));
        let got: Vec<_> = drain(&mut s, false)
            .into_iter()
            .map(|m| (m.is_written(), m.arrival_ns))
            .collect();
        assert_eq!(got, [(true, 1), (false, 1), (true, 5)]);
        assert_eq!(s.protocol(), Some(Protocol::Http1));
    }

    #[test]
    fn an_http2_stream_is_given_up_after_a_hole() {
        let mut s = ExchangeSplitter::new(Arc::new(HttpPolicy::default()), None, 1 << 20);
        let mut bytes = framing::h2::PREFACE.to_vec();
        bytes.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]); // SETTINGS
        s.push(&bytes, meta(1, 0));
        assert_eq!(drain(&mut s, false).len(), 2);
        assert_eq!(s.protocol(), Some(Protocol::Http2));
        s.hole();
        s.push(&[0, 0, 0, 4, 0, 0, 0, 0, 0], meta(2, 0));
        assert_eq!(
            s.next(false),
            Err(SplitError::Unsynchronisable { protocol: "http2" })
        );
    }

    #[test]
    fn a_hole_costs_only_the_message_it_touched() {
        let mut s = http();
        s.push(b"GET /a HTTP/1.1\r\n\r\nGET /b HT", meta(1, 0));
        assert_eq!(drain(&mut s, false).len(), 1);
        // The rest of /b was lost; the next segment starts /c.
        s.hole();
        s.push(b"GET /c HTTP/1.1\r\n\r\n", meta(3, 0));
        let got = drain(&mut s, false);
        assert_eq!(got.len(), 1);
        assert!(got[0].bytes.starts_with(b"GET /c"));
        assert_eq!(
            s.skipped(),
            Skipped {
                resyncs: 1,
                bytes: 9
            }
        );
    }

    #[test]
    fn after_a_hole_mid_segment_bytes_are_skipped_to_the_next_message_start() {
        let mut s = ExchangeSplitter::new(Arc::new(HttpPolicy::default()), None, 1 << 20);
        s.push(b"*1\r\n$4\r\nPING\r\n", meta(1, 0));
        assert_eq!(drain(&mut s, false).len(), 1);
        s.hole();
        s.push(b"ING\r\n", meta(2, 0)); // the tail of a command whose head was lost
        s.push(b"*1\r\n$4\r\nPING\r\n", meta(3, 5));
        let got = drain(&mut s, false);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].arrival_ns, 3);
        assert_eq!(s.skipped().bytes, 5);
    }

    #[test]
    fn opaque_bytes_are_cut_per_segment_with_their_own_arrival() {
        let mut s = http();
        s.push(b"\x01\x02hello", meta(1, 100));
        s.push(b"world", meta(2, 100));
        let got: Vec<_> = drain(&mut s, false)
            .into_iter()
            .map(|m| (m.bytes, m.arrival_ns, m.ack))
            .collect();
        assert_eq!(
            got,
            [
                (b"\x01\x02hello".to_vec(), 1, 100),
                (b"world".to_vec(), 2, 100)
            ]
        );
    }

    #[test]
    fn an_oversized_message_is_refused() {
        let mut s = ExchangeSplitter::new(Arc::new(HttpPolicy::default()), None, 64);
        s.push(
            b"GET /a HTTP/1.1\r\nContent-Length: 1000\r\n\r\n",
            meta(1, 0),
        );
        s.push(&[b'x'; 100], meta(2, 0));
        assert_eq!(s.next(false), Err(SplitError::TooLarge { limit: 64 }));
    }

    #[test]
    fn a_configured_protocol_wins_over_detection() {
        let mut s = ExchangeSplitter::new(
            Arc::new(HttpPolicy::default()),
            Some(Protocol::Opaque),
            1 << 20,
        );
        s.push(b"GET /a HTTP/1.1\r\n\r\n", meta(1, 0));
        assert_eq!(s.protocol(), Some(Protocol::Opaque));
    }
}
