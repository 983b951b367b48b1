//! MySQL/MariaDB client/server protocol
//! (<https://dev.mysql.com/doc/dev/mysql-server/latest/PAGE_PROTOCOL.html>,
//! <https://mariadb.com/kb/en/clientserver-protocol/>).
//!
//! **Packets.** Every message is one or more packets: a 3-byte little-endian payload length and
//! a sequence id. A payload of `0xFFFFFF` bytes continues in the next packet. A client command
//! starts at sequence id 0, which is also where a stream resynchronises after a hole.
//!
//! **The server speaks first, and the replayer logs in itself.** The greeting carries a
//! per-connection scramble that the client's password answer is computed from, so a replayed
//! answer can never succeed. The client's HandshakeResponse becomes
//! [`Action::Login`]: [`login`] reads the shadow server's own greeting,
//! answers it as the client did (same user unless the config names another, same default
//! schema, character set and connection attributes) with the configured password, and follows
//! the server's auth switches and extra rounds (`mysql_native_password`,
//! `caching_sha2_password` including full authentication by RSA, `sha256_password`, through
//! `mysql_common`, the protocol crate of `mysql_async`). The client's own answers to the live
//! server (auth switch responses, more data) are skipped. Without a password, a client that
//! logged in with an empty one is followed with an empty one; any other is reported with
//! [`LoginError::NeedsPassword`].
//!
//! **Prepared statements.** Only the client's bytes are mirrored, so live's statement ids are
//! never seen. Servers number a connection's statements consecutively in the order it prepares
//! them (`++thd->statement_id_counter` in both MySQL and MariaDB, failed prepares included),
//! from 1 on a fresh server thread and from where the last session left off on one MariaDB
//! reused from its thread cache; the base is found at the first message naming a statement, by
//! which prepared statement's parameter count fits it (`StatementIds`). The shadow's id comes
//! from its own PREPARE_OK, and [`MysqlResponses`] rewrites the id of every later EXECUTE, FETCH, RESET,
//! SEND_LONG_DATA, CLOSE and BULK_EXECUTE just before it is written. A hole may have swallowed
//! a PREPARE, after which live's numbering is unknown: statements prepared after a hole are not
//! mapped, and a message naming an unmapped id is skipped and counted, never sent with the
//! wrong statement. Likewise, only a statement's first EXECUTE carries its parameter types
//! (`new_params_bound_flag`); if that one was lost, the server would refuse every later one, so
//! they are skipped and counted until an EXECUTE carries types again.
//!
//! **Responses.** One per command except COM_QUIT (the normal end of a session),
//! COM_STMT_CLOSE and COM_STMT_SEND_LONG_DATA. A response is complete at OK, ERR or EOF; a
//! result set at the EOF (or, with `CLIENT_DEPRECATE_EOF`, the 0xFE OK) after its rows; a
//! PREPARE_OK after its parameter and column definitions. `SERVER_MORE_RESULTS_EXISTS` keeps the
//! response open for the next result. An ERR packet makes the response an error reply.
//!
//! Only payload heads are read on the response path (at most `HEAD` bytes a packet).

use std::collections::{HashMap, VecDeque};

use mysql_common::{
    constants::{CapabilityFlags, MariadbCapabilities},
    io::ParseBuf,
    packets::{AuthPlugin, AuthSwitchRequest, HandshakePacket, HandshakeResponse},
    proto::{MyDeserialize as _, MySerialize as _},
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    Action, ClientFraming, ClientMessage, Completed, ErrorReply, FrameError, Login, Protocol,
    ResponseFraming,
};
use crate::shadow::framing::postgres::Credentials;

const PROTOCOL: &str = "mysql";
/// A packet of this payload length continues in the next packet.
const MAX_PAYLOAD: usize = 0xFF_FFFF;
/// Payload bytes of each response packet the framing reads: enough for an OK packet's two
/// length-encoded integers and its status flags, and a PREPARE_OK's counts.
const HEAD: usize = 32;

/// Client commands (first payload byte of a packet with sequence id 0).
pub mod command {
    /// Ends the session; no response.
    pub const QUIT: u8 = 0x01;
    /// Changes the default schema.
    pub const INIT_DB: u8 = 0x02;
    /// A text query.
    pub const QUERY: u8 = 0x03;
    /// Column definitions of a table (deprecated).
    pub const FIELD_LIST: u8 = 0x04;
    /// Server statistics: answered by one bare string packet.
    pub const STATISTICS: u8 = 0x09;
    /// A ping.
    pub const PING: u8 = 0x0e;
    /// Re-authenticates as another user: the replayer cannot answer its challenge.
    pub const CHANGE_USER: u8 = 0x11;
    /// Prepares a statement.
    pub const STMT_PREPARE: u8 = 0x16;
    /// Executes a prepared statement.
    pub const STMT_EXECUTE: u8 = 0x17;
    /// Sends a long parameter; no response.
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    /// Deallocates a prepared statement; no response.
    pub const STMT_CLOSE: u8 = 0x19;
    /// Resets a prepared statement's long data and cursor.
    pub const STMT_RESET: u8 = 0x1a;
    /// Sets a connection option.
    pub const SET_OPTION: u8 = 0x1b;
    /// Fetches rows from a cursor.
    pub const STMT_FETCH: u8 = 0x1c;
    /// Resets the session's state.
    pub const RESET_CONNECTION: u8 = 0x1f;
    /// MariaDB's array binding execute.
    pub const STMT_BULK_EXECUTE: u8 = 0xfa;
}

/// Commands a server answers (everything in the protocol's command range except those it
/// never answers).
fn known_command(byte: u8) -> bool {
    byte <= 0x1f || byte == command::STMT_BULK_EXECUTE
}

/// Commands whose payload starts with a statement id.
const fn names_statement(command: u8) -> bool {
    matches!(
        command,
        command::STMT_EXECUTE
            | command::STMT_SEND_LONG_DATA
            | command::STMT_CLOSE
            | command::STMT_RESET
            | command::STMT_FETCH
            | command::STMT_BULK_EXECUTE
    )
}

/// MariaDB's "the statement prepared last" id in an EXECUTE: left as it is.
const LAST_PREPARED: u32 = 0xFFFF_FFFF;

/// `SERVER_MORE_RESULTS_EXISTS` in an OK/EOF packet's status flags.
const MORE_RESULTS: u16 = 0x0008;
/// `SERVER_STATUS_CURSOR_EXISTS`: an EXECUTE opened a cursor, rows come with FETCH.
const CURSOR_EXISTS: u16 = 0x0040;

fn packet_header(buf: &[u8]) -> Option<(usize, u8)> {
    let header = buf.get(..4)?;
    Some((
        usize::from(header[0]) | usize::from(header[1]) << 8 | usize::from(header[2]) << 16,
        header[3],
    ))
}

/// The length of the logical packet (with its continuations) at the start of `buf`, or
/// [`FrameError::Incomplete`].
fn logical_len(buf: &[u8]) -> Result<usize, FrameError> {
    let mut at = 0;
    loop {
        let (len, _) = packet_header(&buf[at..]).ok_or(FrameError::Incomplete)?;
        at += 4 + len;
        if buf.len() < at {
            return Err(FrameError::Incomplete);
        }
        if len < MAX_PAYLOAD {
            return Ok(at);
        }
    }
}

/// Whether `first` (at least 36 bytes of a flow's first client bytes) is a HandshakeResponse41
/// or SSLRequest: sequence id 1, `CLIENT_PROTOCOL_41` set, and the 19 reserved bytes zero.
/// `None` while too few bytes arrived to tell.
pub fn is_handshake_response(first: &[u8]) -> Option<bool> {
    let (len, seq) = packet_header(first)?;
    if seq != 1 || !(32..=MAX_PAYLOAD).contains(&len) {
        return Some(false);
    }
    let payload = first.get(4..36)?;
    let capabilities = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
    Some(
        capabilities & CapabilityFlags::CLIENT_PROTOCOL_41.bits() != 0
            && payload[9..28].iter().all(|&b| b == 0),
    )
}

/// What the live client sent to log in, as the replayer repeats it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHandshake {
    /// The client's capability flags.
    pub capabilities: u32,
    /// MariaDB's extended capabilities (0 from MySQL clients).
    pub mariadb_capabilities: u32,
    /// Largest packet the client accepts.
    pub max_packet_size: u32,
    /// The connection's character set and collation.
    pub collation: u8,
    /// The user.
    pub user: Vec<u8>,
    /// The default schema (`CLIENT_CONNECT_WITH_DB`).
    pub database: Option<Vec<u8>>,
    /// Whether the client answered the live server's challenge with an empty password.
    pub empty_password: bool,
    /// Connection attributes (`CLIENT_CONNECT_ATTRS`).
    pub attributes: Option<HashMap<String, String>>,
    /// The session is encrypted (the client sent an SSLRequest) or compressed: its later
    /// bytes are not the protocol in the clear and cannot be replayed.
    pub unreadable: Option<&'static str>,
}

impl ClientHandshake {
    fn parse(payload: &[u8]) -> Result<Self, FrameError> {
        let capabilities = u32::from_le_bytes(
            payload
                .get(..4)
                .and_then(|c| c.try_into().ok())
                .ok_or(FrameError::malformed(PROTOCOL, "short handshake response"))?,
        );
        if capabilities & CapabilityFlags::CLIENT_SSL.bits() != 0 {
            // An SSLRequest: TLS follows.
            return Ok(Self::unreadable(capabilities, "encrypted (TLS)"));
        }
        if capabilities
            & (CapabilityFlags::CLIENT_COMPRESS
                | CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM)
                .bits()
            != 0
        {
            return Ok(Self::unreadable(capabilities, "compressed"));
        }
        let response = HandshakeResponse::deserialize((), &mut ParseBuf(payload))
            .map_err(|_| FrameError::malformed(PROTOCOL, "malformed handshake response"))?;
        Ok(Self {
            capabilities,
            mariadb_capabilities: response.mariadb_ext_capabilities().bits(),
            max_packet_size: u32::from_le_bytes([payload[4], payload[5], payload[6], payload[7]]),
            collation: response.collation(),
            user: response.user().to_vec(),
            database: response.db_name().map(<[u8]>::to_vec),
            empty_password: response.scramble_buf().is_empty(),
            attributes: response.connect_attributes(),
            unreadable: None,
        })
    }

    fn unreadable(capabilities: u32, why: &'static str) -> Self {
        Self {
            capabilities,
            unreadable: Some(why),
            ..Self::default()
        }
    }
}

/// The client's packets.
#[derive(Debug, Default)]
pub struct MysqlClient {
    /// Whether the HandshakeResponse was seen.
    started: bool,
    /// Whether the first command was seen (before it, packets with a sequence id other than 0
    /// are the client's side of the live authentication).
    commands: bool,
}

impl ClientFraming for MysqlClient {
    fn protocol(&self) -> Protocol {
        Protocol::Mysql
    }

    fn check(&mut self, buf: &[u8]) -> Result<ClientMessage, FrameError> {
        let len = logical_len(buf)?;
        let (_, seq) = packet_header(buf).ok_or(FrameError::Incomplete)?;
        let skip = ClientMessage {
            action: Action::Handshake,
            gated: false,
            ..ClientMessage::replay(len, 0)
        };
        if !self.started {
            if is_handshake_response(buf) != Some(true) {
                return Err(FrameError::malformed(
                    PROTOCOL,
                    "the session's handshake response is missing",
                ));
            }
            self.started = true;
            let handshake = ClientHandshake::parse(&buf[4..len])?;
            return Ok(ClientMessage {
                action: Action::Login(Login::Mysql(Box::new(handshake))),
                ..skip
            });
        }
        if seq != 0 {
            return Ok(if self.commands {
                // LOCAL INFILE contents after the server asked for them: the server answers
                // the query once the empty packet ending them arrives.
                ClientMessage {
                    gated: false,
                    ..ClientMessage::replay(len, 0)
                }
            } else {
                // The client's side of live's authentication (auth switch, more data).
                skip
            });
        }
        self.commands = true;
        // The command byte is the packet's own first payload byte: an empty packet has none,
        // whatever bytes follow it in the buffer (found by fuzzing: the next packet's first
        // byte was read as this one's command when both had arrived, an error when not).
        let kind = *buf
            .get(4..len)
            .and_then(<[u8]>::first)
            .ok_or(FrameError::malformed(PROTOCOL, "empty command packet"))?;
        let responses = match kind {
            command::QUIT => {
                return Ok(ClientMessage {
                    action: Action::Terminate,
                    kind: Some(kind),
                    ..ClientMessage::replay(len, 0)
                });
            }
            // Its re-authentication answers live's challenge: not replayable.
            command::CHANGE_USER => return Ok(skip),
            command::STMT_CLOSE | command::STMT_SEND_LONG_DATA => 0,
            k if known_command(k) => 1,
            _ => return Err(FrameError::malformed(PROTOCOL, "unknown command")),
        };
        Ok(ClientMessage {
            kind: Some(kind),
            ..ClientMessage::replay(len, responses)
        })
    }

    fn boundary(&self, buf: &[u8]) -> bool {
        let Some((len, seq)) = packet_header(buf) else {
            return false;
        };
        if seq != 0 || len == 0 || !buf.get(4).is_some_and(|&k| known_command(k)) {
            return false;
        }
        // Where the next packet starts within these bytes, it starts a command too (or
        // continues this one).
        len == MAX_PAYLOAD
            || buf
                .get(4 + len..)
                .and_then(packet_header)
                .is_none_or(|(_, next_seq)| next_seq == 0)
    }
}

/// Where a response stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its first packet (or, after a result with more to come, the next result's).
    Start,
    /// `left` definitions (columns or parameters) to skip, then an EOF unless
    /// `CLIENT_DEPRECATE_EOF`, then `then`.
    Definitions { left: u64, then: AfterDefinitions },
    /// The EOF after definitions.
    DefinitionsEof { then: AfterDefinitions },
    /// Rows until the terminating EOF/OK or an ERR.
    Rows,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterDefinitions {
    /// A result set's rows.
    Rows,
    /// A PREPARE_OK's column definitions (this many).
    PreparedColumns(u64),
    /// The response is complete.
    Done,
}

/// A statement the shadow prepared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Statement {
    /// Its id on the shadow.
    shadow_id: u32,
    /// Its parameters.
    params: u16,
    /// Whether an EXECUTE carrying its parameter types reached the shadow: only the first
    /// EXECUTE (or one whose types changed) carries them, and the server refuses one without
    /// types before it has any.
    typed: bool,
    /// A parameter was sent with COM_STMT_SEND_LONG_DATA (its value is not in the EXECUTE).
    long_data: bool,
}

/// A response the server owes.
#[derive(Debug, Clone, Copy)]
struct Pending {
    command: u8,
    /// For a PREPARE: its place in the session's order of prepares, when known.
    slot: Option<usize>,
}

/// A session's prepared statements in the order the client prepared them, and how live
/// numbered them: consecutively from a base that is 1 on a fresh server thread and higher on
/// one the server reused from its thread cache (MariaDB keeps the counter across the sessions a
/// cached thread serves; measured: 3 of 4 sysbench connections of a second run started past
/// 1). The base is found at the first message naming a statement: the k-th prepare whose
/// parameter count fits that message's layout (base 1 first, then the earliest prepare).
#[derive(Debug, Default)]
struct StatementIds {
    /// The k-th PREPARE's statement on the shadow (`None`: failed, closed, or not yet
    /// answered).
    prepared: Vec<Option<Statement>>,
    /// Live's id of the first PREPARE, once found.
    base: Option<u32>,
    /// A hole may have swallowed a PREPARE: later ones are not recorded.
    uncertain: bool,
    /// EXECUTE layouts are checked against parameter counts (not with MySQL 8's query
    /// attributes, which add fields).
    checkable: bool,
}

impl StatementIds {
    /// A PREPARE is written: its slot, unless a hole made the order unknown.
    fn on_prepare(&mut self) -> Option<usize> {
        if self.uncertain {
            return None;
        }
        self.prepared.push(None);
        Some(self.prepared.len() - 1)
    }

    /// Whether `message` (a whole command packet) fits `statement`.
    fn fits(&self, command: u8, message: &[u8], statement: &Statement) -> bool {
        command != command::STMT_EXECUTE
            || !self.checkable
            || execute_fits(message.get(4..).unwrap_or_default(), statement)
    }

    /// The slot of the statement live numbered `live`, finding live's base first if need be;
    /// `None` when no prepared statement fits.
    fn slot(&mut self, live: u32, command: u8, message: &[u8]) -> Option<usize> {
        let base = match self.base {
            Some(base) => base,
            None => {
                let fits = |k: usize| {
                    self.prepared[k]
                        .as_ref()
                        .is_some_and(|s| self.fits(command, message, s))
                };
                let fresh = usize::try_from(live)
                    .ok()
                    .and_then(|l| l.checked_sub(1))
                    .filter(|&k| k < self.prepared.len() && fits(k))
                    .map(|_| 1);
                let base = fresh.or_else(|| {
                    (0..self.prepared.len())
                        .filter(|&k| u32::try_from(k).is_ok_and(|k| k < live))
                        .find(|&k| fits(k))
                        .map(|k| live - k as u32)
                })?;
                self.base = Some(base);
                base
            }
        };
        let k = usize::try_from(live.checked_sub(base)?).ok()?;
        let statement = self.prepared.get(k)?.as_ref()?;
        self.fits(command, message, statement).then_some(k)
    }
}

/// Whether an EXECUTE's payload (`[0x17][id][flags][iterations]…`) has the layout of a
/// statement with `statement.params` parameters: exactly 10 bytes without parameters; with
/// them, a NULL bitmap and `new_params_bound_flag`, and when that flag is set, the types and
/// values consumed exactly (unless long data was sent apart).
fn execute_fits(payload: &[u8], statement: &Statement) -> bool {
    let params = usize::from(statement.params);
    if params == 0 {
        return payload.len() == 10;
    }
    let bitmap = params.div_ceil(8);
    let Some(nulls) = payload.get(10..10 + bitmap) else {
        return false;
    };
    match payload.get(10 + bitmap) {
        Some(0) => true,
        Some(1) => {
            let types_at = 11 + bitmap;
            let Some(types) = payload.get(types_at..types_at + 2 * params) else {
                return false;
            };
            let mut at = types_at + 2 * params;
            for (i, kind) in types.chunks(2).map(|t| t[0]).enumerate() {
                if nulls[i / 8] & (1 << (i % 8)) != 0 {
                    continue;
                }
                let size = match kind {
                    // TINY; SHORT, YEAR; LONG, INT24, FLOAT; LONGLONG, DOUBLE; NULL.
                    1 => Some(1),
                    2 | 13 => Some(2),
                    3 | 9 | 4 => Some(4),
                    8 | 5 => Some(8),
                    6 => Some(0),
                    // DATE, DATETIME, TIMESTAMP, TIME: a length byte.
                    10 | 12 | 7 | 11 => payload.get(at).map(|&n| 1 + usize::from(n)),
                    // Strings, blobs, decimals, JSON, …: a length-encoded length.
                    _ => payload
                        .get(at..)
                        .and_then(lenenc)
                        .and_then(|(n, size)| usize::try_from(n).ok()?.checked_add(size)),
                };
                let Some(size) = size else {
                    return false;
                };
                at += size;
            }
            at == payload.len() || (statement.long_data && at <= payload.len())
        }
        _ => false,
    }
}

/// The server's packets, and the session's prepared-statement ids (see the module docs).
#[derive(Debug)]
pub struct MysqlResponses {
    deprecate_eof: bool,
    pending: VecDeque<Pending>,
    phase: Phase,
    /// The response in progress had an ERR.
    error: bool,
    header: [u8; 4],
    header_len: usize,
    /// The packet in progress: its payload length, the head read so far, and what is left.
    len: usize,
    head: [u8; HEAD],
    head_len: usize,
    body_left: usize,
    /// The packet in progress continues a packet of [`MAX_PAYLOAD`] bytes: not interpreted.
    continuation: bool,
    /// The packet in progress was interpreted (its head read, or it is a continuation).
    decided: bool,
    /// The packet in progress completes the response (decided from its head).
    completes: bool,
    /// The session's prepared statements.
    statements: StatementIds,
}

impl Default for MysqlResponses {
    /// Before the login said otherwise: EOF packets in use.
    fn default() -> Self {
        Self::new(Negotiated::default())
    }
}

impl MysqlResponses {
    /// Framing for a session whose login negotiated `negotiated`.
    pub fn new(negotiated: Negotiated) -> Self {
        Self {
            deprecate_eof: negotiated.deprecate_eof,
            pending: VecDeque::new(),
            phase: Phase::Start,
            error: false,
            header: [0; 4],
            header_len: 0,
            len: 0,
            head: [0; HEAD],
            head_len: 0,
            body_left: 0,
            continuation: false,
            decided: false,
            completes: false,
            statements: StatementIds {
                checkable: !negotiated.query_attributes,
                ..StatementIds::default()
            },
        }
    }

    /// Decides, from a packet's head, what it does to the response in front.
    fn on_packet(&mut self) -> Result<(), FrameError> {
        let head = &self.head[..self.head_len];
        let Some(&pending) = self.pending.front() else {
            // Nothing asked for (a server's goodbye ERR before it closes): skipped.
            return Ok(());
        };
        let first = head.first().copied();
        let is_err = first == Some(0xFF);
        let is_eof = first == Some(0xFE) && self.len < 9;
        // With CLIENT_DEPRECATE_EOF, a result set ends at an OK packet with a 0xFE header.
        let ends_rows = first == Some(0xFE)
            && if self.deprecate_eof {
                self.len < MAX_PAYLOAD
            } else {
                self.len < 9
            };
        match self.phase {
            Phase::Start => {
                if pending.command == command::STATISTICS {
                    self.completes = true;
                } else if is_err {
                    self.error = true;
                    self.completes = true;
                } else if pending.command == command::STMT_PREPARE && first == Some(0x00) {
                    self.on_prepare_ok(pending.slot)?;
                } else if pending.command == command::STMT_FETCH
                    || pending.command == command::FIELD_LIST
                {
                    self.phase = Phase::Rows;
                    self.on_rows_packet(ends_rows || is_eof, is_err);
                } else if first == Some(0x00) || is_eof {
                    self.completes = !self.more_results(first == Some(0x00));
                } else if first == Some(0xFB) {
                    // LOCAL INFILE: the client sends the file, then the server's OK or ERR.
                } else {
                    let columns = lenenc(head)
                        .ok_or(FrameError::malformed(PROTOCOL, "bad column count"))?
                        .0;
                    self.phase = Phase::Definitions {
                        left: columns,
                        then: AfterDefinitions::Rows,
                    };
                }
            }
            Phase::Definitions { left, then } => {
                let left = left.saturating_sub(1);
                self.phase = Phase::Definitions { left, then };
                if left == 0 {
                    self.after_definitions(then);
                }
            }
            Phase::DefinitionsEof { then } => {
                if then == AfterDefinitions::Rows && self.status(false) & CURSOR_EXISTS != 0 {
                    // A cursor: rows come with FETCH.
                    self.completes = !self.more_results(false);
                } else {
                    self.enter(then);
                }
            }
            Phase::Rows => self.on_rows_packet(ends_rows, is_err),
        }
        Ok(())
    }

    fn on_prepare_ok(&mut self, slot: Option<usize>) -> Result<(), FrameError> {
        let head = &self.head[..self.head_len];
        let short = || FrameError::malformed(PROTOCOL, "short PREPARE_OK");
        let field = |at: usize, n: usize| head.get(at..at + n).ok_or_else(short);
        let id = field(1, 4)?;
        let shadow_id = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
        let columns = field(5, 2)?;
        let columns = u64::from(u16::from_le_bytes([columns[0], columns[1]]));
        let params = field(7, 2)?;
        let params = u64::from(u16::from_le_bytes([params[0], params[1]]));
        if let Some(slot) = slot.and_then(|k| self.statements.prepared.get_mut(k)) {
            *slot = Some(Statement {
                shadow_id,
                params: params as u16,
                typed: params == 0,
                long_data: false,
            });
        }
        self.phase = Phase::Definitions {
            left: params,
            then: AfterDefinitions::PreparedColumns(columns),
        };
        if params == 0 {
            self.enter(AfterDefinitions::PreparedColumns(columns));
        }
        Ok(())
    }

    /// The definitions ran out: an EOF follows, unless deprecated.
    fn after_definitions(&mut self, then: AfterDefinitions) {
        if self.deprecate_eof {
            self.enter(then);
        } else {
            self.phase = Phase::DefinitionsEof { then };
        }
    }

    fn enter(&mut self, then: AfterDefinitions) {
        match then {
            AfterDefinitions::Rows => self.phase = Phase::Rows,
            AfterDefinitions::PreparedColumns(0) | AfterDefinitions::Done => {
                self.completes = true;
            }
            AfterDefinitions::PreparedColumns(columns) => {
                self.phase = Phase::Definitions {
                    left: columns,
                    then: AfterDefinitions::Done,
                };
            }
        }
    }

    fn on_rows_packet(&mut self, ends: bool, is_err: bool) {
        if is_err {
            // An ERR in the middle of a result ends the whole response.
            self.error = true;
            self.completes = true;
        } else if ends {
            self.completes = !self.more_results(self.deprecate_eof);
        }
    }

    /// Whether the OK/EOF packet in progress says another result follows; when it does, the
    /// next packet starts that result.
    fn more_results(&mut self, ok_packet: bool) -> bool {
        let more = self.status(ok_packet) & MORE_RESULTS != 0;
        if more {
            self.phase = Phase::Start;
        }
        more
    }

    /// The status flags of the OK (`ok_packet`) or EOF packet in progress.
    fn status(&self, ok_packet: bool) -> u16 {
        let head = &self.head[..self.head_len];
        let at = if ok_packet {
            // Header, affected rows, last insert id.
            let Some((_, a)) = head.get(1..).and_then(lenenc) else {
                return 0;
            };
            let Some((_, b)) = head.get(1 + a..).and_then(lenenc) else {
                return 0;
            };
            1 + a + b
        } else {
            // Header, warnings.
            3
        };
        head.get(at..at + 2)
            .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
    }
}

/// A length-encoded integer at the start of `buf`: its value and its size.
fn lenenc(buf: &[u8]) -> Option<(u64, usize)> {
    let first = *buf.first()?;
    let size = match first {
        0xFC => 3,
        0xFD => 4,
        0xFE => 9,
        0xFB | 0xFF => return None,
        _ => return Some((u64::from(first), 1)),
    };
    let bytes = buf.get(1..size)?;
    let mut value = [0u8; 8];
    value[..bytes.len()].copy_from_slice(bytes);
    Some((u64::from_le_bytes(value), size))
}

impl ResponseFraming for MysqlResponses {
    fn expect(&mut self, message: &ClientMessage) {
        let Some(command) = message.kind else {
            return;
        };
        let slot = (command == command::STMT_PREPARE)
            .then(|| self.statements.on_prepare())
            .flatten();
        if message.responses > 0 {
            self.pending.push_back(Pending { command, slot });
        }
    }

    fn hole(&mut self) {
        // A lost PREPARE would shift live's numbering by one: later ones are not mapped.
        self.statements.uncertain = true;
    }

    fn rewrite(&mut self, message: &ClientMessage, bytes: &mut [u8]) -> bool {
        let Some(command) = message.kind.filter(|&k| names_statement(k)) else {
            return true;
        };
        let Some(id) = bytes.get(5..9) else {
            return true;
        };
        let live = u32::from_le_bytes([id[0], id[1], id[2], id[3]]);
        if live == LAST_PREPARED && command != command::STMT_CLOSE {
            return true;
        }
        let Some(k) = self.statements.slot(live, command, bytes) else {
            return false;
        };
        let prepared = &mut self.statements.prepared[k];
        let Some(statement) = prepared.as_mut() else {
            return false;
        };
        let shadow_id = statement.shadow_id;
        match command {
            command::STMT_CLOSE => *prepared = None,
            command::STMT_SEND_LONG_DATA => statement.long_data = true,
            command::STMT_EXECUTE if !statement.typed => {
                // After the header, the command, the id, the flags and the iteration count:
                // the NULL bitmap, then `new_params_bound_flag`.
                let flag_at = 14 + usize::from(statement.params).div_ceil(8);
                statement.typed = bytes.get(flag_at) == Some(&1);
                if !statement.typed {
                    return false;
                }
            }
            _ => {}
        }
        bytes[5..9].copy_from_slice(&shadow_id.to_le_bytes());
        true
    }

    fn feed(&mut self, data: &[u8], done: &mut Vec<Completed>) -> Result<(), FrameError> {
        let mut at = 0;
        while at < data.len() {
            if self.header_len < 4 {
                let n = (4 - self.header_len).min(data.len() - at);
                self.header[self.header_len..self.header_len + n]
                    .copy_from_slice(&data[at..at + n]);
                self.header_len += n;
                at += n;
                if self.header_len < 4 {
                    break;
                }
                let (len, _) = packet_header(&self.header).unwrap_or_default();
                self.len = len;
                self.body_left = len;
                self.head_len = 0;
                self.decided = self.continuation;
            }
            if !self.decided {
                let want = HEAD.min(self.len);
                let n = (want - self.head_len).min(data.len() - at);
                self.head[self.head_len..self.head_len + n].copy_from_slice(&data[at..at + n]);
                self.head_len += n;
                self.body_left -= n;
                at += n;
                if self.head_len < want {
                    break;
                }
                self.decided = true;
                self.on_packet()?;
            }
            let n = self.body_left.min(data.len() - at);
            self.body_left -= n;
            at += n;
            if self.body_left > 0 {
                break;
            }
            // The packet ended; one of the largest size continues in the next.
            self.header_len = 0;
            self.continuation = self.len == MAX_PAYLOAD;
            if self.completes && !self.continuation {
                self.completes = false;
                self.phase = Phase::Start;
                self.pending.pop_front();
                done.push(Completed {
                    error: std::mem::take(&mut self.error).then_some(ErrorReply::Protocol),
                    ..Completed::at(at)
                });
            }
        }
        Ok(())
    }
}

/// Why the replayer's own login failed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The server asks for a password and the shadow config has none for this service.
    #[error("the server asks for {method} authentication and no password is configured")]
    NeedsPassword {
        /// The authentication plugin.
        method: String,
    },
    /// Live's session cannot be read: encrypted or compressed.
    #[error("live's session is {0}: its commands cannot be read to replay")]
    Unreadable(&'static str),
    /// The server asks for a plugin the replayer does not speak.
    #[error("unsupported authentication plugin {0}")]
    Unsupported(String),
    /// The server refused the login.
    #[error("the server refused the login: {0}")]
    Refused(String),
    /// The authentication plugin's exchange failed.
    #[error("{plugin} authentication failed: {reason}")]
    Plugin {
        /// The plugin.
        plugin: String,
        /// What went wrong.
        reason: String,
    },
    /// The connection failed.
    #[error("connection failed during login")]
    Io(#[from] std::io::Error),
    /// The server sent something that is not the protocol.
    #[error("malformed server packet during login: {0}")]
    Malformed(&'static str),
}

impl LoginError {
    /// Whether the session cannot be replayed without configuration (or at all): a password
    /// is needed, or live's session is unreadable.
    pub fn needs_credentials(&self) -> bool {
        matches!(self, Self::NeedsPassword { .. } | Self::Unreadable(_))
    }
}

/// What the replayer's login negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `CLIENT_DEPRECATE_EOF`: result sets end at an OK packet, not EOF.
    pub deprecate_eof: bool,
    /// `CLIENT_QUERY_ATTRIBUTES` (MySQL 8): commands carry attributes.
    pub query_attributes: bool,
}

/// Capabilities the replayer never asks for, though the client did: each changes only the
/// server's responses (progress reports that look like ERR packets, omitted or cached
/// metadata), never the client's commands, and the framing does not follow them.
const MASKED: CapabilityFlags = CapabilityFlags::CLIENT_PROGRESS_OBSOLETE
    .union(CapabilityFlags::CLIENT_OPTIONAL_RESULTSET_METADATA)
    .union(CapabilityFlags::CLIENT_SSL)
    .union(CapabilityFlags::CLIENT_COMPRESS)
    .union(CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM);
const MASKED_MARIADB: MariadbCapabilities = MariadbCapabilities::MARIADB_CLIENT_PROGRESS
    .union(MariadbCapabilities::MARIADB_CLIENT_CACHE_METADATA);

struct AuthContext<'a> {
    password: &'a [u8],
    scramble: &'a [u8],
}

impl mysql_common::auth::plugins::Context for AuthContext<'_> {
    fn pass(&self) -> &[u8] {
        self.password
    }
    fn is_ipc_transport(&self) -> bool {
        false
    }
    fn is_tls_transport(&self) -> bool {
        false
    }
    fn scramble(&self) -> &[u8] {
        self.scramble
    }
    fn server_key_pem(&self) -> Option<&[u8]> {
        None
    }
}

/// One plugin's exchange.
struct Auth {
    name: String,
    process: mysql_common::auth::plugins::AuthProc,
    scramble: Vec<u8>,
}

impl Auth {
    fn start(plugin: &AuthPlugin<'_>, scramble: &[u8]) -> Result<Self, LoginError> {
        let name = String::from_utf8_lossy(plugin.as_bytes()).into_owned();
        let process = mysql_common::auth::plugins::AuthProc::init(plugin)
            .map_err(|_| LoginError::Unsupported(name.clone()))?;
        Ok(Self {
            name,
            process,
            scramble: scramble.to_vec(),
        })
    }

    fn answer(&mut self, password: &[u8], challenge: &[u8]) -> Result<Option<Vec<u8>>, LoginError> {
        use mysql_common::auth::plugins::ChallengeResponsePlugin as _;
        let context = AuthContext {
            password,
            scramble: &self.scramble,
        };
        self.process
            .run(context, challenge)
            .map(|r| r.data().map(<[u8]>::to_vec))
            .map_err(|e| LoginError::Plugin {
                plugin: self.name.clone(),
                reason: e.to_string(),
            })
    }
}

async fn read_packet(conn: &mut TcpStream) -> Result<(u8, Vec<u8>), LoginError> {
    let mut header = [0u8; 4];
    conn.read_exact(&mut header).await?;
    let (len, seq) = packet_header(&header).unwrap_or_default();
    let mut payload = vec![0u8; len];
    conn.read_exact(&mut payload).await?;
    Ok((seq, payload))
}

async fn write_packet(conn: &mut TcpStream, seq: u8, payload: &[u8]) -> Result<(), LoginError> {
    if payload.len() >= MAX_PAYLOAD {
        return Err(LoginError::Malformed("login packet too large"));
    }
    let len = payload.len().to_le_bytes();
    let mut packet = vec![len[0], len[1], len[2], seq];
    packet.extend_from_slice(payload);
    conn.write_all(&packet).await?;
    Ok(())
}

/// An ERR packet's message (after the code and the SQL state).
fn error_message(payload: &[u8]) -> String {
    let text = payload.get(3..).unwrap_or_default();
    let text = text
        .strip_prefix(b"#")
        .map_or(text, |t| t.get(5..).unwrap_or_default());
    String::from_utf8_lossy(text).into_owned()
}

/// Logs in on `conn` as the client did (`client`), with `credentials` where the server asks for
/// a password, and returns once the server accepted the login.
pub async fn login(
    conn: &mut TcpStream,
    client: &ClientHandshake,
    credentials: Option<&Credentials>,
) -> Result<Negotiated, LoginError> {
    if let Some(why) = client.unreadable {
        return Err(LoginError::Unreadable(why));
    }
    let (seq, greeting) = read_packet(conn).await?;
    if greeting.first() == Some(&0xFF) {
        return Err(LoginError::Refused(error_message(&greeting)));
    }
    let server = HandshakePacket::deserialize((), &mut ParseBuf(&greeting))
        .map_err(|_| LoginError::Malformed("bad server greeting"))?;
    let capabilities =
        CapabilityFlags::from_bits_truncate(client.capabilities) & server.capabilities() & !MASKED;
    let mariadb = MariadbCapabilities::from_bits_truncate(client.mariadb_capabilities)
        & server.mariadb_ext_capabilities()
        & !MASKED_MARIADB;
    let user = credentials
        .and_then(|c| c.user.as_deref())
        .map_or_else(|| client.user.clone(), |u| u.as_bytes().to_vec());
    let plugin = server
        .auth_plugin()
        .map_or(AuthPlugin::MysqlNativePassword, AuthPlugin::into_owned);
    let password: Vec<u8> = match credentials.and_then(|c| c.password.as_deref()) {
        Some(p) => p.as_bytes().to_vec(),
        None if client.empty_password => Vec::new(),
        None => {
            return Err(LoginError::NeedsPassword {
                method: String::from_utf8_lossy(plugin.as_bytes()).into_owned(),
            });
        }
    };
    let nonce = server.nonce();
    let mut auth = Auth::start(&plugin, &nonce)?;
    let first = auth.answer(&password, &nonce)?.unwrap_or_default();
    let response = HandshakeResponse::new(
        Some(first),
        server.server_version_parsed().unwrap_or((0, 0, 0)),
        Some(user),
        client.database.clone(),
        Some(plugin),
        capabilities,
        client.attributes.clone(),
        client.max_packet_size,
    )
    .with_mariadb_ext_capabilities(mariadb);
    let mut payload = Vec::new();
    response.serialize(&mut payload);
    // The crate picks its own collation; the session keeps the client's.
    payload[8] = client.collation;
    let negotiated = Negotiated {
        deprecate_eof: response
            .capabilities()
            .contains(CapabilityFlags::CLIENT_DEPRECATE_EOF),
        query_attributes: response
            .capabilities()
            .contains(CapabilityFlags::CLIENT_QUERY_ATTRIBUTES),
    };
    let mut seq = seq.wrapping_add(1);
    write_packet(conn, seq, &payload).await?;
    loop {
        let (got, packet) = read_packet(conn).await?;
        seq = got.wrapping_add(1);
        let answer = match packet.first() {
            Some(0x00) => return Ok(negotiated),
            Some(0xFF) => return Err(LoginError::Refused(error_message(&packet))),
            Some(0xFE) => {
                let switch = AuthSwitchRequest::deserialize((), &mut ParseBuf(&packet))
                    .map_err(|_| LoginError::Malformed("bad auth switch request"))?;
                let data = switch.plugin_data().to_vec();
                auth = Auth::start(&switch.auth_plugin(), &data)?;
                auth.answer(&password, &data)?
            }
            Some(0x01) => auth.answer(&password, &packet[1..])?,
            _ => return Err(LoginError::Malformed("unexpected packet during login")),
        };
        if let Some(answer) = answer {
            write_packet(conn, seq, &answer).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len().to_le_bytes();
        let mut p = vec![len[0], len[1], len[2], seq];
        p.extend_from_slice(payload);
        p
    }

    fn command(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut payload = vec![kind];
        payload.extend_from_slice(body);
        packet(0, &payload)
    }

    /// A HandshakeResponse41 as the `mariadb` client sends it: user `bench`, a 20-byte
    /// answer, schema `db`, `mysql_native_password`.
    fn handshake_response(extra_capabilities: u32) -> Vec<u8> {
        let capabilities = (CapabilityFlags::CLIENT_PROTOCOL_41
            | CapabilityFlags::CLIENT_SECURE_CONNECTION
            | CapabilityFlags::CLIENT_PLUGIN_AUTH
            | CapabilityFlags::CLIENT_CONNECT_WITH_DB
            | CapabilityFlags::CLIENT_DEPRECATE_EOF)
            .bits()
            | extra_capabilities;
        let mut p = capabilities.to_le_bytes().to_vec();
        p.extend_from_slice(&(16u32 << 20).to_le_bytes());
        p.push(45);
        p.extend_from_slice(&[0; 23]);
        p.extend_from_slice(b"bench\0");
        p.push(20);
        p.extend_from_slice(&[7; 20]);
        p.extend_from_slice(b"db\0mysql_native_password\0");
        packet(1, &p)
    }

    #[test]
    fn an_empty_command_packet_is_malformed_whatever_follows_it() {
        // The command byte is the packet's own: reading past an empty packet took the next
        // packet's first byte (here COM_QUERY's) when it had arrived too.
        let mut after_login = MysqlClient {
            started: true,
            commands: true,
        };
        let mut stream = packet(0, b"");
        assert!(matches!(
            after_login.check(&stream),
            Err(FrameError::Malformed { .. })
        ));
        stream.extend(command(command::QUERY, b"select 1"));
        assert!(matches!(
            after_login.check(&stream),
            Err(FrameError::Malformed { .. })
        ));
    }

    #[test]
    fn a_session_is_cut_into_login_skipped_auth_commands_and_quit() {
        let mut stream = handshake_response(0);
        stream.extend(packet(3, &[9; 20])); // an auth switch answer to live
        stream.extend(command(command::QUERY, b"select 1"));
        stream.extend(command(command::STMT_PREPARE, b"select ?"));
        stream.extend(command(command::STMT_EXECUTE, &[1, 0, 0, 0, 0, 1, 0, 0, 0]));
        stream.extend(command(command::STMT_CLOSE, &[1, 0, 0, 0]));
        stream.extend(command(command::QUIT, b""));
        let mut c = MysqlClient::default();
        let mut at = 0;
        let mut got = Vec::new();
        while at < stream.len() {
            let m = c.check(&stream[at..]).unwrap();
            let mut fresh = MysqlClient {
                started: at > 0,
                commands: got.len() > 2,
            };
            assert_eq!(
                fresh.check(&stream[at..at + m.len - 1]),
                Err(FrameError::Incomplete),
                "message {}",
                got.len()
            );
            at += m.len;
            got.push(m);
        }
        let Action::Login(Login::Mysql(handshake)) = &got[0].action else {
            panic!("login expected: {:?}", got[0]);
        };
        assert_eq!(handshake.user, b"bench");
        assert_eq!(handshake.database.as_deref(), Some(&b"db"[..]));
        assert_eq!(handshake.collation, 45);
        assert!(!handshake.empty_password);
        assert_eq!(got[1].action, Action::Handshake);
        let summary: Vec<_> = got[2..].iter().map(|m| (m.kind, m.responses)).collect();
        assert_eq!(
            summary,
            [
                (Some(command::QUERY), 1),
                (Some(command::STMT_PREPARE), 1),
                (Some(command::STMT_EXECUTE), 1),
                (Some(command::STMT_CLOSE), 0),
                (Some(command::QUIT), 0),
            ]
        );
        assert_eq!(got[6].action, Action::Terminate);
    }

    #[test]
    fn tls_and_compressed_sessions_are_unreadable_and_detection_waits_for_enough_bytes() {
        let ssl = handshake_response(CapabilityFlags::CLIENT_SSL.bits());
        let mut c = MysqlClient::default();
        let Action::Login(Login::Mysql(h)) = c.check(&ssl).unwrap().action else {
            panic!("login expected");
        };
        assert_eq!(h.unreadable, Some("encrypted (TLS)"));
        let zipped = handshake_response(CapabilityFlags::CLIENT_COMPRESS.bits());
        let Action::Login(Login::Mysql(h)) = MysqlClient::default().check(&zipped).unwrap().action
        else {
            panic!("login expected");
        };
        assert_eq!(h.unreadable, Some("compressed"));
        let plain = handshake_response(0);
        assert_eq!(is_handshake_response(&plain[..20]), None);
        assert_eq!(is_handshake_response(&plain), Some(true));
        assert_eq!(
            is_handshake_response(&command(command::QUERY, &[0; 40])),
            Some(false)
        );
        assert!(
            MysqlClient::default()
                .check(&command(command::QUERY, b"x"))
                .is_err()
        );
    }

    #[test]
    fn boundaries_are_commands_at_sequence_id_zero() {
        let c = MysqlClient::default();
        let mut two = command(command::QUERY, b"select 1");
        two.extend(command(command::PING, b""));
        assert!(c.boundary(&two));
        assert!(!c.boundary(&packet(2, b"\x03select")));
        assert!(!c.boundary(&command(0x60, b"x")));
        let mut bad_next = command(command::QUERY, b"x");
        bad_next.extend(packet(5, b"y"));
        assert!(!c.boundary(&bad_next));
    }

    fn ok(status: u16) -> Vec<u8> {
        let mut p = vec![0x00, 0, 0];
        p.extend_from_slice(&status.to_le_bytes());
        p.extend_from_slice(&[0, 0]);
        p
    }

    fn eof(status: u16) -> Vec<u8> {
        let mut p = vec![0xFE, 0, 0];
        p.extend_from_slice(&status.to_le_bytes());
        p
    }

    fn err() -> Vec<u8> {
        let mut p = vec![0xFF, 0x28, 0x04, b'#'];
        p.extend_from_slice(b"42000no such table");
        p
    }

    fn eof_deprecated() -> Negotiated {
        Negotiated {
            deprecate_eof: true,
            query_attributes: false,
        }
    }

    fn expect(r: &mut MysqlResponses, kind: u8) {
        r.expect(&ClientMessage {
            kind: Some(kind),
            ..ClientMessage::replay(1, 1)
        });
    }

    /// Feeds `stream` cut at every offset; returns the completions (with errors).
    fn complete_at_every_cut(
        deprecate_eof: bool,
        commands: &[u8],
        stream: &[u8],
    ) -> Vec<(usize, Option<ErrorReply>)> {
        let mut first: Option<Vec<_>> = None;
        for cut in 0..stream.len() {
            let mut r = MysqlResponses::new(Negotiated {
                deprecate_eof,
                query_attributes: false,
            });
            for &k in commands {
                expect(&mut r, k);
            }
            let mut done = Vec::new();
            r.feed(&stream[..cut], &mut done).unwrap();
            let before = done.len();
            r.feed(&stream[cut..], &mut done).unwrap();
            let got: Vec<_> = done
                .iter()
                .enumerate()
                .map(|(i, d)| (if i < before { d.end } else { d.end + cut }, d.error))
                .collect();
            assert!(r.pending.is_empty(), "cut {cut}: all answered");
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(&got, f, "cut {cut}"),
            }
        }
        first.unwrap_or_default()
    }

    #[test]
    fn result_sets_ok_err_and_multi_results_complete_where_they_end() {
        // A SELECT of one column and two rows, with EOF packets.
        let mut stream = packet(1, &[1]);
        stream.extend(packet(2, b"\x03def\0\0\0\x011\0\x0c"));
        stream.extend(packet(3, &eof(0x0002)));
        stream.extend(packet(4, b"\x011"));
        stream.extend(packet(5, b"\x012"));
        stream.extend(packet(6, &eof(0x0002)));
        let select_end = stream.len();
        // A multi-statement: OK with more results, then an ERR.
        stream.extend(packet(1, &ok(MORE_RESULTS | 0x0002)));
        stream.extend(packet(2, &err()));
        let multi_end = stream.len();
        stream.extend(packet(1, &ok(0x0002)));
        let got = complete_at_every_cut(
            false,
            &[command::QUERY, command::QUERY, command::PING],
            &stream,
        );
        assert_eq!(
            got,
            [
                (select_end, None),
                (multi_end, Some(ErrorReply::Protocol)),
                (stream.len(), None)
            ]
        );
    }

    #[test]
    fn deprecate_eof_ends_rows_at_a_fe_ok_and_prepare_ok_skips_its_definitions() {
        // PREPARE_OK: statement 7, 2 columns, 1 parameter; definitions without EOFs.
        let mut stream = packet(1, &[0, 7, 0, 0, 0, 2, 0, 1, 0, 0, 0, 0]);
        for seq in 2..5 {
            stream.extend(packet(seq, b"\x03def\0\0\0\x01a\0\x0c"));
        }
        let prepare_end = stream.len();
        // EXECUTE: one column, a binary row, then the 0xFE OK.
        stream.extend(packet(1, &[1]));
        stream.extend(packet(2, b"\x03def\0\0\0\x01a\0\x0c"));
        stream.extend(packet(3, &[0, 0, 1]));
        let mut fe_ok = ok(0x0002);
        fe_ok[0] = 0xFE;
        stream.extend(packet(4, &fe_ok));
        let got = complete_at_every_cut(
            true,
            &[command::STMT_PREPARE, command::STMT_EXECUTE],
            &stream,
        );
        assert_eq!(got, [(prepare_end, None), (stream.len(), None)]);
    }

    /// PREPAREs answered by the shadow with ids `shadow_ids` and parameter counts `params`.
    fn prepared(shadow_ids: &[u8], params: &[u8]) -> MysqlResponses {
        let mut r = MysqlResponses::new(eof_deprecated());
        let mut done = Vec::new();
        for (&id, &n) in shadow_ids.iter().zip(params) {
            r.expect(&ClientMessage {
                kind: Some(command::STMT_PREPARE),
                ..ClientMessage::replay(1, 1)
            });
            let mut stream = packet(1, &[0, id, 0, 0, 0, 0, 0, n, 0, 0, 0, 0]);
            for seq in 0..n {
                stream.extend(packet(2 + seq, b"\x03def\0\0\0\x01?\0\x0c"));
            }
            r.feed(&stream, &mut done).unwrap();
        }
        assert_eq!(done.len(), shadow_ids.len());
        r
    }

    fn execute_message() -> ClientMessage {
        ClientMessage {
            kind: Some(command::STMT_EXECUTE),
            ..ClientMessage::replay(1, 1)
        }
    }

    /// An EXECUTE of live statement `id` with no parameters, or one typed LONG parameter.
    fn execute(id: u8, with_param: bool) -> Vec<u8> {
        let mut body = vec![id, 0, 0, 0, 0, 1, 0, 0, 0];
        if with_param {
            // NULL bitmap, new_params_bound_flag, LONG, the value.
            body.extend_from_slice(&[0, 1, 3, 0, 7, 0, 0, 0]);
        }
        command(command::STMT_EXECUTE, &body)
    }

    #[test]
    fn live_numbering_on_a_reused_server_thread_is_found_by_the_statements_layout() {
        // Live prepared BEGIN, COMMIT (no parameters) and a SELECT with one, as sysbench does,
        // on a thread whose counter stood at 11: live ids 12, 13, 14.
        let mut r = prepared(&[1, 2, 3], &[0, 0, 1]);
        let mut begin = execute(12, false);
        assert!(r.rewrite(&execute_message(), &mut begin));
        assert_eq!(begin[5], 1, "the earliest prepare that fits: BEGIN");
        let mut select = execute(14, true);
        assert!(r.rewrite(&execute_message(), &mut select));
        assert_eq!(select[5], 3);
        let mut commit = execute(13, false);
        assert!(r.rewrite(&execute_message(), &mut commit));
        assert_eq!(commit[5], 2);
        assert!(
            !r.rewrite(&execute_message(), &mut execute(14, false)),
            "a layout that does not fit is never sent"
        );

        // A fresh thread: live ids 1, 2, 3; the first execute names the SELECT.
        let mut r = prepared(&[5, 6, 7], &[0, 0, 1]);
        let mut select = execute(3, true);
        assert!(r.rewrite(&execute_message(), &mut select));
        assert_eq!(select[5], 7);
        // On a reused thread, an id within the count whose statement does not fit.
        let mut r = prepared(&[5, 6, 7], &[0, 0, 1]);
        let mut begin = execute(3, false);
        assert!(r.rewrite(&execute_message(), &mut begin));
        assert_eq!(begin[5], 5, "base 3, not 1: statement 3 takes a parameter");
    }

    #[test]
    fn an_execute_without_types_waits_for_one_that_carried_them() {
        let mut r = MysqlResponses::new(eof_deprecated());
        r.expect(&ClientMessage {
            kind: Some(command::STMT_PREPARE),
            ..ClientMessage::replay(1, 1)
        });
        // Statement 9 on the shadow, 2 parameters (their definitions follow).
        let mut stream = packet(1, &[0, 9, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0]);
        stream.extend(packet(2, b"\x03def\0\0\0\x01?\0\x0c"));
        stream.extend(packet(3, b"\x03def\0\0\0\x01?\0\x0c"));
        let mut done = Vec::new();
        r.feed(&stream, &mut done).unwrap();
        assert_eq!(done.len(), 1);
        let execute = ClientMessage {
            kind: Some(command::STMT_EXECUTE),
            ..ClientMessage::replay(1, 1)
        };
        // id 1, no cursor, one iteration, NULL bitmap, new_params_bound_flag, types (two
        // LONGs) and values when the flag is set, else the values alone.
        let untyped = |flag: u8| {
            let mut body = vec![1, 0, 0, 0, 0, 1, 0, 0, 0, 0, flag];
            if flag == 1 {
                body.extend_from_slice(&[3, 0, 3, 0]);
            }
            body.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
            command(command::STMT_EXECUTE, &body)
        };
        assert!(
            !r.rewrite(&execute, &mut untyped(0)),
            "the shadow has no types yet: skipped"
        );
        let mut typed = untyped(1);
        assert!(r.rewrite(&execute, &mut typed));
        assert_eq!(&typed[5..9], &[9, 0, 0, 0]);
        assert!(r.rewrite(&execute, &mut untyped(0)), "types sent before");
    }

    #[test]
    fn statement_ids_are_mapped_to_the_shadows_and_unknown_after_a_hole() {
        let mut r = MysqlResponses::new(eof_deprecated());
        let prepare = ClientMessage {
            kind: Some(command::STMT_PREPARE),
            ..ClientMessage::replay(1, 1)
        };
        let execute = ClientMessage {
            kind: Some(command::STMT_EXECUTE),
            ..ClientMessage::replay(1, 1)
        };
        let close = ClientMessage {
            kind: Some(command::STMT_CLOSE),
            ..ClientMessage::replay(1, 0)
        };
        // Live's statements 1 and 2 are the shadow's 40 and 41.
        let mut done = Vec::new();
        for shadow in [40u8, 41] {
            r.expect(&prepare);
            r.feed(
                &packet(1, &[0, shadow, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                &mut done,
            )
            .unwrap();
        }
        assert_eq!(done.len(), 2);
        let mut exec = command(command::STMT_EXECUTE, &[2, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(r.rewrite(&execute, &mut exec));
        assert_eq!(&exec[5..9], &[41, 0, 0, 0]);
        let mut again = command(command::STMT_EXECUTE, &[2, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(
            r.rewrite(&execute, &mut again),
            "no parameters: no types needed"
        );
        let mut unknown = command(command::STMT_EXECUTE, &[3, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(!r.rewrite(&execute, &mut unknown), "no statement 3");
        let mut close_1 = command(command::STMT_CLOSE, &[1, 0, 0, 0]);
        assert!(r.rewrite(&close, &mut close_1));
        assert_eq!(&close_1[5..9], &[40, 0, 0, 0]);
        let mut closed = command(command::STMT_EXECUTE, &[1, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(!r.rewrite(&execute, &mut closed), "closed");
        // After a hole, a new PREPARE's live id is unknown: never mapped.
        r.hole();
        r.expect(&prepare);
        r.feed(
            &packet(1, &[0, 42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            &mut done,
        )
        .unwrap();
        let mut after = command(command::STMT_EXECUTE, &[3, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(!r.rewrite(&execute, &mut after));
        let mut before = command(command::STMT_EXECUTE, &[2, 0, 0, 0, 0, 1, 0, 0, 0]);
        assert!(
            r.rewrite(&execute, &mut before),
            "ids mapped before the hole hold"
        );
    }
}
