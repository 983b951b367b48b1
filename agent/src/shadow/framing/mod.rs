//! Protocol-aware framing of replayed flows: where each client message ends, how many complete
//! responses the server owes for it, when each response is complete, and which responses are
//! server-side errors.
//!
//! Every protocol has the same two halves, shaped like mini-redis's `Frame::check`:
//! - [`ClientFraming::check`] looks at the buffered client stream and either returns the
//!   [`ClientMessage`] at its start (its length and what the server owes for it) or
//!   [`FrameError::Incomplete`]; it never allocates for an incomplete message.
//!   [`ClientFraming::boundary`] says whether bytes plausibly start a message, which is how a
//!   stream resynchronises after a hole (a lost mirror datagram): at the next segment that
//!   starts a message.
//! - [`ResponseFraming`] is told each message as it is written ([`ResponseFraming::expect`]) and
//!   fed the server's bytes; it reports every response completed, in order, and whether it was
//!   an error reply. It keeps no response bytes beyond a message header.
//!
//! Protocols: HTTP/1.1 ([`http1`], heads parsed with `httparse`), HTTP/2 with prior knowledge
//! and gRPC over it ([`h2`]: streams are exchanges, completed out of order, the server's HPACK
//! table followed with `loona-hpack`), Redis RESP2/RESP3 ([`resp`]),
//! PostgreSQL v3 ([`postgres`]) and MySQL/MariaDB ([`mysql`]), where the replayer logs in
//! itself (see there), and an opaque fallback
//! ([`opaque`]) that replays each mirrored segment at its original offset and times the first
//! response byte after each run of client bytes, never waiting on an idle timer.
//! A service's protocol is set in the shadow config or detected from a flow's first bytes
//! ([`detect`]).

pub mod h2;
pub mod http1;
pub mod mysql;
pub mod opaque;
pub mod postgres;
pub mod resp;

use serde::Deserialize;

use super::http::{HttpPolicy, Request};

/// A replayed flow's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.x requests and responses.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), gRPC included.
    Http2,
    /// Redis RESP2/RESP3 commands and replies.
    Redis,
    /// PostgreSQL frontend/backend protocol v3.
    Postgres,
    /// MySQL/MariaDB client/server protocol.
    Mysql,
    /// Anything else: segments paced by the live side's timing.
    Opaque,
}

impl Protocol {
    /// Stable name for logs and reports.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "http2",
            Self::Redis => "redis",
            Self::Postgres => "postgres",
            Self::Mysql => "mysql",
            Self::Opaque => "opaque",
        }
    }

    /// The client-side framing of this protocol.
    pub fn client_framing(self, policy: &std::sync::Arc<HttpPolicy>) -> Box<dyn ClientFraming> {
        match self {
            Self::Http1 => Box::new(http1::Http1Client::new(std::sync::Arc::clone(policy))),
            Self::Http2 => Box::new(h2::H2Client::default()),
            Self::Redis => Box::new(resp::RespClient::default()),
            Self::Postgres => Box::new(postgres::PgClient::default()),
            Self::Mysql => Box::new(mysql::MysqlClient::default()),
            Self::Opaque => Box::new(opaque::OpaqueClient),
        }
    }

    /// The response-side framing of this protocol.
    pub fn response_framing(self) -> Box<dyn ResponseFraming> {
        match self {
            Self::Http1 => Box::new(http1::Http1Responses::default()),
            Self::Http2 => Box::new(h2::H2Responses::default()),
            Self::Redis => Box::new(resp::RespResponses::default()),
            Self::Postgres => Box::new(postgres::PgResponses::default()),
            Self::Mysql => Box::new(mysql::MysqlResponses::default()),
            Self::Opaque => Box::new(opaque::OpaqueResponses),
        }
    }
}

/// The protocol a flow's first bytes show; `None` until enough bytes arrived to tell.
pub fn detect(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() {
        return None;
    }
    // HTTP/2 prior knowledge starts with the "PRI * HTTP/2.0" preface.
    if first.starts_with(h2::PREFACE) {
        return Some(Protocol::Http2);
    }
    if h2::PREFACE.starts_with(first) {
        return None;
    }
    match super::http::looks_like_http(first) {
        Some(true) if !first.starts_with(b"PRI ") => return Some(Protocol::Http1),
        None => return None,
        _ => {}
    }
    if first[0] == b'*' {
        return match first.get(1) {
            Some(b) if b.is_ascii_digit() => Some(Protocol::Redis),
            Some(_) => Some(Protocol::Opaque),
            None => None,
        };
    }
    if first.len() >= 8 && postgres::is_startup_packet(first) {
        return Some(Protocol::Postgres);
    }
    // A MySQL client's first packet is its HandshakeResponse (sequence id 1).
    match mysql::is_handshake_response(first) {
        Some(true) => return Some(Protocol::Mysql),
        None => return None,
        Some(false) => {}
    }
    if first.len() < 8 && first[0] == 0 {
        // A PostgreSQL startup packet begins with a big-endian length, so a first byte of 0.
        return None;
    }
    Some(Protocol::Opaque)
}

/// Why bytes are not (yet) a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// More bytes are needed.
    #[error("incomplete message")]
    Incomplete,
    /// The bytes break the protocol: nothing from here on can be delimited until the stream
    /// resynchronises.
    #[error("{protocol} framing: {reason}")]
    Malformed {
        /// The protocol.
        protocol: &'static str,
        /// What was wrong.
        reason: &'static str,
    },
}

impl FrameError {
    pub(crate) const fn malformed(protocol: &'static str, reason: &'static str) -> Self {
        Self::Malformed { protocol, reason }
    }
}

/// What the replayer does with a client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write it to the shadow workload.
    Replay,
    /// The HTTP policy denies it: skip its bytes.
    Denied(Request),
    /// Part of a handshake the replayer performs itself (PostgreSQL SSLRequest, password and
    /// SASL messages): skip its bytes.
    Handshake,
    /// The client's login (PostgreSQL StartupMessage, MySQL HandshakeResponse): the replayer
    /// logs in itself with what it says.
    Login(Login),
    /// The client ends the session (PostgreSQL Terminate, HTTP/2 GOAWAY): write it; the server
    /// closing after it is the normal end, never an error.
    Terminate,
    /// The client cancels an HTTP/2 stream (RST_STREAM): write it; the stream's response is no
    /// longer awaited.
    Cancel(u32),
}

/// A login the replayer performs itself, as the client's first message asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Login {
    /// A PostgreSQL StartupMessage's parameters.
    Postgres(postgres::StartupParams),
    /// A MySQL HandshakeResponse.
    Mysql(Box<mysql::ClientHandshake>),
}

/// One client message at the start of the buffered stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMessage {
    /// Its length in bytes.
    pub len: usize,
    /// Complete responses the server sends for it (0 when it is answered together with a later
    /// message, e.g. PostgreSQL Parse before Sync, or never).
    pub responses: u32,
    /// What to do with it.
    pub action: Action,
    /// Whether, when the live client had seen a response before sending it, the replay waits for
    /// every outstanding response first (false for PostgreSQL COPY data, which the server awaits
    /// without answering).
    pub gated: bool,
    /// The HTTP request, for HEAD's bodiless response and the policy.
    pub request: Option<Request>,
    /// The HTTP/2 stream the message belongs to; its responses are completed by stream, in
    /// any order.
    pub stream: Option<u32>,
    /// The protocol's command code, for response framings that frame each command's response
    /// differently (MySQL).
    pub kind: Option<u8>,
}

impl ClientMessage {
    /// A message to replay that the server answers `responses` times.
    pub const fn replay(len: usize, responses: u32) -> Self {
        Self {
            len,
            responses,
            action: Action::Replay,
            gated: true,
            request: None,
            stream: None,
            kind: None,
        }
    }
}

/// The client side of a protocol.
pub trait ClientFraming: Send + std::fmt::Debug {
    /// The protocol.
    fn protocol(&self) -> Protocol;

    /// The whole message at the start of `buf`, or [`FrameError::Incomplete`].
    fn check(&mut self, buf: &[u8]) -> Result<ClientMessage, FrameError>;

    /// Whether `buf` (a segment's first bytes after a hole) plausibly starts a message.
    fn boundary(&self, buf: &[u8]) -> bool;

    /// Whether the stream can continue after a hole at all (false where lost bytes leave
    /// state behind that later messages depend on, as HTTP/2's header compression does).
    fn resynchronises(&self) -> bool {
        true
    }
}

/// What makes a response an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorReply {
    /// HTTP 5xx.
    Http5xx,
    /// A protocol error reply: PostgreSQL ErrorResponse, RESP `-` or `!`.
    Protocol,
}

/// One response completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Offset in the fed bytes just past the response's last byte.
    pub end: usize,
    /// HTTP status, where there is one.
    pub status: Option<u16>,
    /// Whether the response is an error reply.
    pub error: Option<ErrorReply>,
    /// The HTTP/2 stream it answers; `None` for protocols that answer in order.
    pub stream: Option<u32>,
    /// The server will never answer (streams an HTTP/2 GOAWAY left unprocessed): release the
    /// wait without recording an exchange.
    pub unanswered: bool,
}

impl Completed {
    /// A response that ends at `end`, with no status and no error.
    pub const fn at(end: usize) -> Self {
        Self {
            end,
            status: None,
            error: None,
            stream: None,
            unanswered: false,
        }
    }
}

/// The response side of a protocol.
pub trait ResponseFraming: Send + std::fmt::Debug {
    /// A message was written; expect its [`ClientMessage::responses`] responses.
    fn expect(&mut self, message: &ClientMessage);

    /// Bytes before the next message were lost (a hole): state learnt from the messages is
    /// no longer certain.
    fn hole(&mut self) {}

    /// Adjusts a message's bytes just before they are written, with what this connection's
    /// responses taught (MySQL statement ids); `false` skips the message.
    fn rewrite(&mut self, _message: &ClientMessage, _bytes: &mut [u8]) -> bool {
        true
    }

    /// Consumes server bytes, appending every response completed in them, in order.
    fn feed(&mut self, data: &[u8], done: &mut Vec<Completed>) -> Result<(), FrameError>;

    /// The server closed the connection: whether that completes the response in progress
    /// (an HTTP body delimited by close).
    fn close_completes(&mut self) -> Option<Completed> {
        None
    }

    /// Whether response completeness is known (false for the opaque fallback).
    fn knows_completeness(&self) -> bool {
        true
    }

    /// Whether responses complete by stream, out of order ([`Completed::stream`]).
    fn multiplexed(&self) -> bool {
        false
    }

    /// Moves out the streams whose first response bytes arrived since the last call (for
    /// multiplexed protocols; the first byte of an in-order response is the next one read).
    fn take_started(&mut self, _into: &mut Vec<u32>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detection_tells_the_protocols_apart() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(detect(b"GE"), None);
        assert_eq!(detect(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Redis));
        let mut startup = vec![0, 0, 0, 9, 0, 3, 0, 0, 0];
        assert_eq!(detect(&startup[..4]), None);
        assert_eq!(detect(&startup), Some(Protocol::Postgres));
        startup[5] = 9;
        assert_eq!(detect(&startup), Some(Protocol::Opaque));
        assert_eq!(detect(h2::PREFACE), Some(Protocol::Http2));
        // A MySQL HandshakeResponse: sequence id 1, CLIENT_PROTOCOL_41, 19 reserved zeros.
        let mut mysql = vec![60, 0, 0, 1, 0x00, 0x02, 0, 0, 0, 0, 0, 1, 45];
        mysql.extend_from_slice(&[0; 23]);
        mysql.extend_from_slice(b"bench\0");
        assert_eq!(detect(&mysql[..3]), None);
        assert_eq!(detect(&mysql[..20]), None, "too few bytes to tell");
        assert_eq!(detect(&mysql), Some(Protocol::Mysql));
        mysql[20] = 1;
        assert_eq!(detect(&mysql), Some(Protocol::Opaque), "reserved bytes set");
        assert_eq!(detect(b"PRI * HTTP/2"), None);
        assert_eq!(
            detect(b"\x16\x03\x01\x02\x00\x01\x00\x01"),
            Some(Protocol::Opaque)
        );
    }
}
