//! PostgreSQL frontend/backend protocol v3
//! (<https://www.postgresql.org/docs/current/protocol-message-formats.html>).
//!
//! **Client side.** The first message has no type byte (StartupMessage, SSLRequest,
//! GSSENCRequest, CancelRequest); every later one is a type byte and a length. A response is
//! complete at ReadyForQuery, which the server sends once per simple Query, per Sync of the
//! extended protocol and per FunctionCall; Parse/Bind/Describe/Execute/Close/Flush are answered
//! together with the next Sync. Terminate is the normal end of a session. COPY data, done and
//! fail messages are awaited by the server without an answer, so they are never held back.
//!
//! **The replayer logs in itself.** A password challenge (MD5's salt, SCRAM-SHA-256's nonces)
//! is per connection, so the client's own answers can never succeed when replayed. Instead, the
//! client's StartupMessage becomes [`Action::Login`]: [`login`] sends the same parameters
//! (with the user from the shadow config's credentials if given), answers the server's
//! challenge with the configured password (cleartext, MD5 or SCRAM-SHA-256, using
//! `postgres-protocol`, the protocol crate of `tokio-postgres`), and waits for ReadyForQuery;
//! the client's own SSLRequest and password/SASL messages are skipped, and the session's
//! messages after the handshake are replayed as they came. Without a password, a server that
//! asks for one is reported by [`LoginError::NeedsPassword`] with the method.
//!
//! Message headers are five bytes (type, length) and are read by hand: the replayer only needs
//! boundaries and types, and `postgres-protocol`'s backend parser would copy every message into
//! a `BytesMut` on the response path.

use bytes::BytesMut;
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{self, ChannelBinding, ScramSha256},
    },
    message::frontend,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    Action, ClientFraming, ClientMessage, Completed, ErrorReply, FrameError, Login, Protocol,
    ResponseFraming,
};

const PROTOCOL: &str = "postgres";
/// Protocol 3.0 in a StartupMessage.
const PROTOCOL_3: u32 = 196_608;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Largest message accepted (the server's own limit for most messages is 1 GiB).
const MAX_MESSAGE: usize = 1 << 30;
/// Largest startup packet (the server refuses more than 10,000 bytes).
const MAX_STARTUP: usize = 10_000;

/// Whether `first` (at least 8 bytes) is a startup-phase packet: a length and a known code.
pub fn is_startup_packet(first: &[u8]) -> bool {
    if first.len() < 8 {
        return false;
    }
    let len = u32::from_be_bytes([first[0], first[1], first[2], first[3]]) as usize;
    let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
    (8..=MAX_STARTUP).contains(&len)
        && matches!(
            code,
            PROTOCOL_3 | SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST
        )
}

/// The parameters of a client's StartupMessage, in its order (`user`, `database`,
/// `application_name`, …), and whether the client asked for TLS first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupParams {
    /// The parameters.
    pub fields: Vec<(String, String)>,
    /// The client sent an SSLRequest before (and, the session being in clear, was told no):
    /// the replayer asks the same, so the shadow server sees the same exchanges.
    pub ssl_requested: bool,
}

impl StartupParams {
    fn parse(body: &[u8]) -> Result<Self, FrameError> {
        let malformed = || FrameError::malformed(PROTOCOL, "malformed startup parameters");
        let mut fields = body.split(|&b| b == 0);
        let mut params = Vec::new();
        loop {
            let name = fields.next().ok_or_else(malformed)?;
            if name.is_empty() {
                return Ok(Self {
                    fields: params,
                    ssl_requested: false,
                });
            }
            let value = fields.next().ok_or_else(malformed)?;
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| malformed());
            params.push((text(name)?, text(value)?));
        }
    }

    /// A parameter's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn typed_len(buf: &[u8]) -> Result<usize, FrameError> {
    if buf.len() < 5 {
        return Err(FrameError::Incomplete);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if !(4..=MAX_MESSAGE).contains(&len) {
        return Err(FrameError::malformed(
            PROTOCOL,
            "message length out of range",
        ));
    }
    Ok(len + 1)
}

/// Frontend message types after the startup phase.
const FRONTEND_TYPES: &[u8] = b"QPBDESXCHFpdcf";

/// The client's messages.
#[derive(Debug, Default)]
pub struct PgClient {
    /// Whether the StartupMessage was seen.
    started: bool,
    /// Whether an SSLRequest came before it.
    ssl_requested: bool,
}

impl ClientFraming for PgClient {
    fn protocol(&self) -> Protocol {
        Protocol::Postgres
    }

    fn check(&mut self, buf: &[u8]) -> Result<ClientMessage, FrameError> {
        let skip = |len| ClientMessage {
            action: Action::Handshake,
            gated: false,
            ..ClientMessage::replay(len, 0)
        };
        if !self.started {
            if buf.len() < 8 {
                return Err(FrameError::Incomplete);
            }
            if !is_startup_packet(buf) {
                return Err(FrameError::malformed(
                    PROTOCOL,
                    "the session's startup packet is missing",
                ));
            }
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < len {
                return Err(FrameError::Incomplete);
            }
            let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
            if code != PROTOCOL_3 {
                // SSLRequest / GSSENCRequest (the replayer's own login asks the first again)
                // and CancelRequest (its key belongs to a live session).
                self.ssl_requested |= code == SSL_REQUEST;
                return Ok(skip(len));
            }
            self.started = true;
            let mut params = StartupParams::parse(&buf[8..len])?;
            params.ssl_requested = self.ssl_requested;
            return Ok(ClientMessage {
                action: Action::Login(Login::Postgres(params)),
                ..skip(len)
            });
        }
        let kind = buf.first().copied().ok_or(FrameError::Incomplete)?;
        if !FRONTEND_TYPES.contains(&kind) {
            return Err(FrameError::malformed(PROTOCOL, "unknown frontend message"));
        }
        let len = typed_len(buf)?;
        if buf.len() < len {
            return Err(FrameError::Incomplete);
        }
        Ok(match kind {
            b'Q' | b'S' | b'F' => ClientMessage::replay(len, 1),
            b'X' => ClientMessage {
                action: Action::Terminate,
                ..ClientMessage::replay(len, 0)
            },
            b'p' => skip(len),
            b'd' | b'c' | b'f' => ClientMessage {
                gated: false,
                ..ClientMessage::replay(len, 0)
            },
            _ => ClientMessage::replay(len, 0),
        })
    }

    fn boundary(&self, buf: &[u8]) -> bool {
        let Some(&kind) = buf.first() else {
            return false;
        };
        if !FRONTEND_TYPES.contains(&kind) || kind == b'p' {
            return false;
        }
        match typed_len(buf) {
            // A plausible length, and where the next message starts within these bytes, a
            // plausible type there too.
            Ok(len) => buf
                .get(len)
                .is_none_or(|next| FRONTEND_TYPES.contains(next)),
            Err(FrameError::Incomplete) => true,
            Err(_) => false,
        }
    }
}

/// Backend messages: one completion per ReadyForQuery, an error if an ErrorResponse came
/// before it.
#[derive(Debug, Default)]
pub struct PgResponses {
    /// Header bytes of the message in progress (type + length), up to 5.
    header: [u8; 5],
    header_len: usize,
    /// Body bytes of the message in progress still to skip.
    body_left: usize,
    /// Whether the message in progress is ReadyForQuery.
    ready: bool,
    /// Whether an ErrorResponse came since the last ReadyForQuery.
    error: bool,
}

impl ResponseFraming for PgResponses {
    fn expect(&mut self, _message: &ClientMessage) {}

    fn feed(&mut self, data: &[u8], done: &mut Vec<Completed>) -> Result<(), FrameError> {
        let mut at = 0;
        while at < data.len() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len() - at);
                self.body_left -= n;
                at += n;
            } else {
                let n = (5 - self.header_len).min(data.len() - at);
                self.header[self.header_len..self.header_len + n]
                    .copy_from_slice(&data[at..at + n]);
                self.header_len += n;
                at += n;
                if self.header_len < 5 {
                    break;
                }
                self.header_len = 0;
                let len = typed_len(&self.header)? - 5;
                self.body_left = len;
                self.ready = self.header[0] == b'Z';
                if self.header[0] == b'E' {
                    self.error = true;
                }
            }
            if self.body_left == 0 && self.header_len == 0 && self.ready {
                self.ready = false;
                done.push(Completed {
                    error: std::mem::take(&mut self.error).then_some(ErrorReply::Protocol),
                    ..Completed::at(at)
                });
            }
        }
        Ok(())
    }
}

/// The password (and, optionally, another user) the replayer logs in with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Replaces the client's `user` when set.
    pub user: Option<String>,
    /// The password.
    pub password: Option<String>,
}

/// Why the replayer's own login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The server asks for a password and the shadow config has none for this service.
    #[error("the server asks for {method} authentication and no password is configured")]
    NeedsPassword {
        /// `password`, `md5` or `SCRAM-SHA-256`.
        method: &'static str,
    },
    /// The server offers no method the replayer speaks.
    #[error("unsupported authentication request {code}")]
    Unsupported {
        /// The AuthenticationRequest code.
        code: u32,
    },
    /// The server refused the login.
    #[error("the server refused the login: {message}")]
    Refused {
        /// The ErrorResponse's message field.
        message: String,
    },
    /// The SCRAM exchange failed.
    #[error("SCRAM-SHA-256 exchange failed")]
    Scram(#[source] std::io::Error),
    /// The connection failed.
    #[error("connection failed during login")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not the protocol.
    #[error("malformed backend message during login")]
    Malformed,
    /// The shadow server accepted TLS where live's session went on in clear (its servers are
    /// configured differently); the replayer does not speak TLS.
    #[error("the shadow server accepts TLS, which live's session did without")]
    TlsOffered,
}

impl LoginError {
    /// Whether the login cannot be replayed without configuration (a password is needed).
    pub fn needs_credentials(&self) -> bool {
        matches!(self, Self::NeedsPassword { .. })
    }
}

async fn read_message(conn: &mut TcpStream) -> Result<(u8, Vec<u8>), LoginError> {
    let mut header = [0u8; 5];
    conn.read_exact(&mut header).await?;
    let len = typed_len(&header).map_err(|_| LoginError::Malformed)? - 5;
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await?;
    Ok((header[0], body))
}

fn error_message(body: &[u8]) -> String {
    // Fields: a type byte, a NUL-terminated string, …; 'M' is the human-readable message.
    body.split(|&b| b == 0)
        .find_map(|f| f.strip_prefix(b"M"))
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default()
}

/// Logs in on `conn` as the client did (`params`), with `credentials` where the server asks for
/// a password, and returns once the server is ready for queries.
pub async fn login(
    conn: &mut TcpStream,
    params: &StartupParams,
    credentials: Option<&Credentials>,
) -> Result<(), LoginError> {
    let user = credentials
        .and_then(|c| c.user.clone())
        .or_else(|| params.get("user").map(str::to_owned))
        .unwrap_or_default();
    let password = credentials.and_then(|c| c.password.as_deref());
    let mut buf = BytesMut::new();
    if params.ssl_requested {
        // As the client did; a server of the same configuration as live's says no, and the
        // session goes on in clear as live's did.
        let mut request = 8u32.to_be_bytes().to_vec();
        request.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        conn.write_all(&request).await?;
        let mut answer = [0u8; 1];
        conn.read_exact(&mut answer).await?;
        if answer[0] != b'N' {
            return Err(LoginError::TlsOffered);
        }
    }
    let startup = params.fields.iter().map(|(n, v)| {
        (
            n.as_str(),
            if n == "user" {
                user.as_str()
            } else {
                v.as_str()
            },
        )
    });
    frontend::startup_message(startup, &mut buf)?;
    conn.write_all(&buf).await?;
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (kind, body) = read_message(conn).await?;
        buf.clear();
        match kind {
            b'R' => {
                let code = body
                    .get(..4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .ok_or(LoginError::Malformed)?;
                match code {
                    0 => {}
                    3 => {
                        let password =
                            password.ok_or(LoginError::NeedsPassword { method: "password" })?;
                        frontend::password_message(password.as_bytes(), &mut buf)?;
                    }
                    5 => {
                        let password =
                            password.ok_or(LoginError::NeedsPassword { method: "md5" })?;
                        let salt: [u8; 4] = body
                            .get(4..8)
                            .and_then(|s| s.try_into().ok())
                            .ok_or(LoginError::Malformed)?;
                        let hash = md5_hash(user.as_bytes(), password.as_bytes(), salt);
                        frontend::password_message(hash.as_bytes(), &mut buf)?;
                    }
                    10 => {
                        let offers_scram = body[4..]
                            .split(|&b| b == 0)
                            .any(|m| m == sasl::SCRAM_SHA_256.as_bytes());
                        if !offers_scram {
                            return Err(LoginError::Unsupported { code });
                        }
                        let password = password.ok_or(LoginError::NeedsPassword {
                            method: "SCRAM-SHA-256",
                        })?;
                        let state =
                            ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                        frontend::sasl_initial_response(
                            sasl::SCRAM_SHA_256,
                            state.message(),
                            &mut buf,
                        )?;
                        scram = Some(state);
                    }
                    11 => {
                        let state = scram.as_mut().ok_or(LoginError::Malformed)?;
                        state.update(&body[4..]).map_err(LoginError::Scram)?;
                        frontend::sasl_response(state.message(), &mut buf)?;
                    }
                    12 => {
                        let state = scram.as_mut().ok_or(LoginError::Malformed)?;
                        state.finish(&body[4..]).map_err(LoginError::Scram)?;
                    }
                    code => return Err(LoginError::Unsupported { code }),
                }
                if !buf.is_empty() {
                    conn.write_all(&buf).await?;
                }
            }
            b'E' => {
                return Err(LoginError::Refused {
                    message: error_message(&body),
                });
            }
            b'Z' => return Ok(()),
            // ParameterStatus, BackendKeyData, NoticeResponse, NegotiateProtocolVersion.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup() -> Vec<u8> {
        let body = b"user\0bench\0database\0db\0\0";
        let mut m = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        m.extend_from_slice(&PROTOCOL_3.to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn a_session_is_cut_into_startup_handshake_queries_and_terminate() {
        let mut ssl = 8u32.to_be_bytes().to_vec();
        ssl.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        let mut stream = ssl.clone();
        stream.extend(startup());
        stream.extend(typed(b'p', b"SCRAM-SHA-256\0xyz"));
        stream.extend(typed(b'Q', b"select 1\0"));
        for k in [b'P', b'B', b'E'] {
            stream.extend(typed(k, b"\0\0"));
        }
        stream.extend(typed(b'S', b""));
        stream.extend(typed(b'X', b""));
        let mut c = PgClient::default();
        let mut at = 0;
        let mut got = Vec::new();
        while at < stream.len() {
            let len = c.check(&stream[at..]).unwrap().len;
            // Checking is stateful (the startup phase ends): ask again from a fresh state.
            let mut fresh = PgClient {
                started: at > 8,
                ssl_requested: true,
            };
            assert_eq!(
                fresh.check(&stream[at..at + len - 1]),
                Err(FrameError::Incomplete)
            );
            let m = fresh.check(&stream[at..]).unwrap();
            at += len;
            got.push((m.action, m.responses));
        }
        assert_eq!(got[0], (Action::Handshake, 0));
        let Action::Login(Login::Postgres(params)) = &got[1].0 else {
            panic!("startup expected: {got:?}");
        };
        assert_eq!(params.get("user"), Some("bench"));
        assert!(
            params.ssl_requested,
            "the SSLRequest before it is remembered"
        );
        assert_eq!(params.get("database"), Some("db"));
        assert_eq!(got[2], (Action::Handshake, 0));
        assert_eq!(got[3], (Action::Replay, 1));
        for replayed in &got[4..7] {
            assert_eq!(*replayed, (Action::Replay, 0));
        }
        assert_eq!(got[7], (Action::Replay, 1));
        assert_eq!(got[8], (Action::Terminate, 0));
    }

    #[test]
    fn a_missing_startup_is_malformed_and_boundaries_are_checked() {
        let mut c = PgClient::default();
        assert!(matches!(
            c.check(&typed(b'Q', b"select 1\0")),
            Err(FrameError::Malformed { .. })
        ));
        let mut two = typed(b'Q', b"select 1\0");
        two.extend(typed(b'S', b""));
        assert!(c.boundary(&two));
        assert!(!c.boundary(b"select 1"));
        let mut bad_next = typed(b'Q', b"x\0");
        bad_next.push(b'z');
        assert!(!c.boundary(&bad_next));
    }

    #[test]
    fn ready_for_query_completes_and_an_error_before_it_is_told() {
        let mut stream = typed(b'1', b"");
        stream.extend(typed(b'2', b""));
        stream.extend(typed(b'D', b"\0\x01\0\0\0\x011"));
        stream.extend(typed(b'C', b"SELECT 1\0"));
        stream.extend(typed(b'Z', b"I"));
        stream.extend(typed(b'E', b"SERROR\0Mno\0\0"));
        stream.extend(typed(b'Z', b"E"));
        for cut in 0..stream.len() {
            let mut r = PgResponses::default();
            let mut done = Vec::new();
            r.feed(&stream[..cut], &mut done).unwrap();
            r.feed(&stream[cut..], &mut done).unwrap();
            assert_eq!(done.len(), 2, "cut {cut}");
            assert_eq!(done[0].error, None);
            assert_eq!(done[1].error, Some(ErrorReply::Protocol));
            // The last ReadyForQuery ends the second feed.
            assert_eq!(done[1].end, stream.len() - cut, "cut {cut}");
        }
    }
}
