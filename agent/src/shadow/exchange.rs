//! Cutting a reassembled client stream into exchanges, the unit that is paced, replayed and
//! timed.
//!
//! HTTP/1.1 streams are cut at request boundaries ([`super::http`]), and each request is replayed
//! or skipped by the [`HttpPolicy`]. Any other protocol is opaque: an exchange is a run of client
//! bytes sent without the client having seen a response in between, which the mirrored segments
//! themselves show: a client's acknowledgement number advances exactly when response bytes
//! reached it. So `SET a 1` / reply / `GET a` arrives as two runs with two different `ack`s, while
//! a pipelined burst stays one exchange, as it was one on the live host. A run is complete when a
//! byte with another `ack` follows it, at the end of the stream, or when the replayer flushes it
//! after an idle gap (a protocol whose server never answers).

use std::{collections::VecDeque, io::Cursor, sync::Arc};

use super::http::{HttpError, HttpPolicy, Request, looks_like_http};

/// Metadata of one mirrored segment, kept with its bytes through reassembly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentMeta {
    /// When the mirror copy arrived, ns on the agent's monotonic clock.
    pub arrival_ns: u64,
    /// The segment's acknowledgement number.
    pub ack: u32,
}

/// The protocol a flow was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.x requests.
    Http,
    /// Anything else.
    Opaque,
}

/// One exchange's client bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange {
    /// The bytes to write.
    pub bytes: Vec<u8>,
    /// Arrival of its first byte's mirror copy (for pacing).
    pub arrival_ns: u64,
    /// The request, for HTTP.
    pub request: Option<Request>,
}

/// What the splitter produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Replay this exchange.
    Replay(Exchange),
    /// The policy denies this request; its bytes were skipped.
    Denied(Request),
}

/// Why the rest of a stream cannot be replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// An HTTP request could not be delimited, so neither it nor anything after it can be
    /// replayed or skipped safely.
    #[error("HTTP request cannot be delimited")]
    Http(#[source] HttpError),
    /// One request is larger than the splitter holds.
    #[error("request larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

/// Cuts one flow's stream into exchanges.
#[derive(Debug)]
pub struct ExchangeSplitter {
    policy: Arc<HttpPolicy>,
    protocol: Option<Protocol>,
    /// Bytes not yet cut; `buf[..start]` is already consumed.
    buf: Vec<u8>,
    start: usize,
    /// (offset in `buf` where a segment's bytes begin, its metadata), oldest first.
    marks: VecDeque<(usize, SegmentMeta)>,
    max_exchange: usize,
}

impl ExchangeSplitter {
    /// A splitter applying `policy` to HTTP requests; no single request may exceed
    /// `max_exchange` bytes.
    pub fn new(policy: Arc<HttpPolicy>, max_exchange: usize) -> Self {
        Self {
            policy,
            protocol: None,
            buf: Vec::new(),
            start: 0,
            marks: VecDeque::new(),
            max_exchange,
        }
    }

    /// The protocol, once recognised.
    pub fn protocol(&self) -> Option<Protocol> {
        self.protocol
    }

    /// Bytes buffered and not yet cut.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Adds contiguous stream bytes.
    pub fn push(&mut self, data: &[u8], meta: SegmentMeta) {
        if data.is_empty() {
            return;
        }
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            // Compact, so the buffer holds one exchange's worth, not the whole stream.
            self.buf.drain(..self.start);
            for mark in &mut self.marks {
                mark.0 = mark.0.saturating_sub(self.start);
            }
            self.start = 0;
        }
        self.marks.push_back((self.buf.len(), meta));
        self.buf.extend_from_slice(data);
        if self.protocol.is_none() {
            self.protocol = looks_like_http(&self.buf[self.start..]).map(|http| {
                if http {
                    Protocol::Http
                } else {
                    Protocol::Opaque
                }
            });
        }
    }

    /// Metadata of the segment holding `buf[at]`.
    fn meta_at(&self, at: usize) -> SegmentMeta {
        let i = self.marks.partition_point(|(o, _)| *o <= at);
        self.marks[i.saturating_sub(1)].1
    }

    /// Consumes `len` bytes from the front and returns them with their first byte's metadata.
    fn cut(&mut self, len: usize) -> (Vec<u8>, SegmentMeta) {
        let meta = self.meta_at(self.start);
        let bytes = self.buf[self.start..self.start + len].to_vec();
        self.start += len;
        while self.marks.len() > 1 && self.marks[1].0 <= self.start {
            self.marks.pop_front();
        }
        (bytes, meta)
    }

    /// The next exchange, if one is complete. `flush` says no more bytes will come soon (idle
    /// gap or end of stream): an opaque run ends there.
    pub fn next(&mut self, flush: bool) -> Result<Option<Step>, SplitError> {
        if self.buffered() == 0 {
            return Ok(None);
        }
        let protocol = match self.protocol {
            Some(p) => p,
            None if flush => {
                self.protocol = Some(Protocol::Opaque);
                Protocol::Opaque
            }
            None => return Ok(None),
        };
        match protocol {
            Protocol::Http => {
                let mut cursor = Cursor::new(&self.buf[self.start..]);
                match Request::check(&mut cursor) {
                    Ok(request) => {
                        let (bytes, meta) = self.cut(request.len);
                        Ok(Some(if self.policy.allows(&request) {
                            Step::Replay(Exchange {
                                bytes,
                                arrival_ns: meta.arrival_ns,
                                request: Some(request),
                            })
                        } else {
                            Step::Denied(request)
                        }))
                    }
                    Err(HttpError::Incomplete) if self.buffered() > self.max_exchange => {
                        Err(SplitError::TooLarge {
                            limit: self.max_exchange,
                        })
                    }
                    Err(HttpError::Incomplete) => Ok(None),
                    Err(e) => Err(SplitError::Http(e)),
                }
            }
            Protocol::Opaque => {
                let first = self.meta_at(self.start);
                let run = self
                    .marks
                    .iter()
                    .find(|(o, m)| *o > self.start && m.ack != first.ack)
                    .map(|(o, _)| *o - self.start);
                let len = match run {
                    Some(len) => len,
                    None if flush => self.buffered(),
                    None => return Ok(None),
                };
                let (bytes, meta) = self.cut(len);
                Ok(Some(Step::Replay(Exchange {
                    bytes,
                    arrival_ns: meta.arrival_ns,
                    request: None,
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(arrival_ns: u64, ack: u32) -> SegmentMeta {
        SegmentMeta { arrival_ns, ack }
    }

    fn drain(s: &mut ExchangeSplitter, flush: bool) -> Vec<Step> {
        std::iter::from_fn(|| s.next(flush).unwrap()).collect()
    }

    #[test]
    fn a_denied_request_is_skipped_and_the_next_one_still_replayed() {
        let mut s = ExchangeSplitter::new(Arc::new(HttpPolicy::default()), 1 << 20);
        s.push(
            b"GET /a HTTP/1.1\r\n\r\nPOST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
            meta(1, 0),
        );
        s.push(b"GET /c HTTP/1.1\r\n\r\n", meta(5, 0));
        let steps = drain(&mut s, false);
        let kinds: Vec<_> = steps
            .iter()
            .map(|s| match s {
                Step::Replay(e) => (true, e.request.as_ref().unwrap().path.clone(), e.arrival_ns),
                Step::Denied(r) => (false, r.path.clone(), 0),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (true, "/a".to_owned(), 1),
                (false, "/b".to_owned(), 0),
                (true, "/c".to_owned(), 5)
            ]
        );
        assert_eq!(s.protocol(), Some(Protocol::Http));
    }

    #[test]
    fn a_broken_request_stops_the_flow() {
        let mut s = ExchangeSplitter::new(Arc::new(HttpPolicy::default()), 1 << 20);
        s.push(b"GET /a HTTP/1.1\r\nbad header\r\n\r\n", meta(1, 0));
        assert!(matches!(
            s.next(false),
            Err(SplitError::Http(HttpError::Header))
        ));
    }

    #[test]
    fn opaque_exchanges_are_cut_where_the_client_acknowledged_a_response() {
        let mut s = ExchangeSplitter::new(Arc::new(HttpPolicy::default()), 1 << 20);
        s.push(b"*1\r\n", meta(1, 100));
        s.push(b"$4\r\nPING\r\n", meta(2, 100));
        s.push(b"*1\r\n$4\r\nPING\r\n", meta(9, 107));
        let steps = drain(&mut s, false);
        assert_eq!(
            steps,
            [Step::Replay(Exchange {
                bytes: b"*1\r\n$4\r\nPING\r\n".to_vec(),
                arrival_ns: 1,
                request: None
            })]
        );
        // The last run has nothing after it: it ends when the replayer flushes.
        let steps = drain(&mut s, true);
        assert!(matches!(&steps[..], [Step::Replay(e)] if e.arrival_ns == 9));
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn an_oversized_request_is_refused() {
        let mut s = ExchangeSplitter::new(Arc::new(HttpPolicy::default()), 64);
        s.push(
            b"GET /a HTTP/1.1\r\nContent-Length: 1000\r\n\r\n",
            meta(1, 0),
        );
        s.push(&[b'x'; 100], meta(2, 0));
        assert_eq!(s.next(false), Err(SplitError::TooLarge { limit: 64 }));
    }
}
