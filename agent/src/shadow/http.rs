//! HTTP/1.1 message boundaries (RFC 9112), as far as replay needs them: where each request in a
//! client stream ends (so requests can be replayed, timed and skipped one by one), which method
//! and path it has (for the allow and deny lists), and when a response is complete.
//!
//! Requests are parsed mini-redis style: [`Request::check`] works on a `Cursor<&[u8]>` over the
//! buffered stream and either returns the request, leaving the cursor after its last body byte,
//! or [`HttpError::Incomplete`] when more bytes are needed. Responses are discarded, so they are
//! framed by a streaming state machine ([`ResponseFramer`]) that never holds more than a head.

use std::io::Cursor;

/// Longest request or response head accepted (nginx's default large buffers are 4 x 8 KiB).
pub const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4096;

/// Why bytes are not (yet) an HTTP message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// More bytes are needed.
    #[error("incomplete message")]
    Incomplete,
    /// The request or status line is not HTTP/1.x.
    #[error("malformed start line")]
    StartLine,
    /// A header line has no colon or the head is larger than [`MAX_HEAD`].
    #[error("malformed or oversized header")]
    Header,
    /// `Content-Length` is not a number, or two disagree.
    #[error("invalid Content-Length")]
    ContentLength,
    /// A chunk size line is malformed.
    #[error("malformed chunked body")]
    Chunk,
    /// A transfer coding other than chunked, a protocol upgrade or CONNECT: after this the
    /// stream's boundaries are unknown.
    #[error("unsupported framing (transfer coding, upgrade or CONNECT)")]
    Unsupported,
}

/// One request of a client stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method token, e.g. `GET`.
    pub method: String,
    /// Request target, e.g. `/index.html?x=1`.
    pub path: String,
    /// Bytes from the request line to the last body byte.
    pub len: usize,
}

impl Request {
    /// Whether a response to this request never has a body (RFC 9112 §6.3).
    pub fn response_has_no_body(&self) -> bool {
        self.method == "HEAD"
    }

    /// Checks that a whole request starts at the cursor; on success the cursor is after it.
    pub fn check(cursor: &mut Cursor<&[u8]>) -> Result<Self, HttpError> {
        let start = cursor.position() as usize;
        let buf = &cursor.get_ref()[start..];
        let head = Head::parse_request(buf)?;
        let method = head.method.as_str();
        if method == "CONNECT" || head.upgrade {
            return Err(HttpError::Unsupported);
        }
        let body = match head.framing {
            Framing::Chunked => chunked_len(&buf[head.len..])?,
            Framing::Length(n) => n,
            // A request without either has no body (RFC 9112 §6.3, rule 7).
            Framing::UntilClose => 0,
        };
        let len = head.len + body;
        if buf.len() < len {
            return Err(HttpError::Incomplete);
        }
        cursor.set_position((start + len) as u64);
        Ok(Self {
            method: head.method,
            path: head.path,
            len,
        })
    }
}

/// Whether a stream's first bytes look like an HTTP/1.x request: a known method and a space.
/// `None` until enough bytes arrived to tell.
pub fn looks_like_http(first: &[u8]) -> Option<bool> {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"TRACE ",
        b"CONNECT ",
    ];
    let mut undecided = false;
    for m in METHODS {
        let n = first.len().min(m.len());
        if first[..n] == m[..n] {
            if n == m.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided { None } else { Some(false) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// How many header fields a head may carry (nginx's default limit is far above what clients send).
const MAX_HEADERS: usize = 128;

/// A parsed message head: its start line's parts, length and body framing. Heads are parsed
/// with `httparse` (the parser hyper uses), which checks header names are tokens and lines are
/// well formed; only the body framing rules (RFC 9112 §6) are ours.
#[derive(Debug)]
struct Head {
    /// Request method, or empty for a response.
    method: String,
    /// Request target, or empty for a response.
    path: String,
    /// Response status, or 0 for a request.
    status: u16,
    len: usize,
    framing: Framing,
    upgrade: bool,
}

fn httparse_error(e: httparse::Error) -> HttpError {
    match e {
        httparse::Error::Version | httparse::Error::Token | httparse::Error::Status => {
            HttpError::StartLine
        }
        _ => HttpError::Header,
    }
}

impl Head {
    fn parse_request(buf: &[u8]) -> Result<Self, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        let len = match request.parse(buf).map_err(httparse_error)? {
            httparse::Status::Complete(len) if len <= MAX_HEAD => len,
            httparse::Status::Partial if buf.len() <= MAX_HEAD => {
                return Err(HttpError::Incomplete);
            }
            _ => return Err(HttpError::Header),
        };
        let (framing, upgrade) = framing(request.headers)?;
        Ok(Self {
            method: request.method.unwrap_or_default().to_owned(),
            path: request.path.unwrap_or_default().to_owned(),
            status: 0,
            len,
            framing,
            upgrade,
        })
    }

    fn parse_response(buf: &[u8]) -> Result<Self, HttpError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        let len = match response.parse(buf).map_err(httparse_error)? {
            httparse::Status::Complete(len) if len <= MAX_HEAD => len,
            httparse::Status::Partial if buf.len() <= MAX_HEAD => {
                return Err(HttpError::Incomplete);
            }
            _ => return Err(HttpError::Header),
        };
        let (framing, upgrade) = framing(response.headers)?;
        Ok(Self {
            method: String::new(),
            path: String::new(),
            status: response.code.unwrap_or_default(),
            len,
            framing,
            upgrade,
        })
    }
}

/// The body framing the header fields give, and whether they ask for a protocol upgrade.
fn framing(headers: &[httparse::Header<'_>]) -> Result<(Framing, bool), HttpError> {
    let mut length = None;
    let mut chunked = false;
    let mut upgrade = false;
    for header in headers {
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HttpError::Header)?
            .trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            // Digits only (RFC 9110 §8.6): `parse` would also take `+5`, which a server may
            // read differently, the request-smuggling class.
            if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HttpError::ContentLength);
            }
            let n: usize = value.parse().map_err(|_| HttpError::ContentLength)?;
            // Duplicates must agree (RFC 9110 §8.6); anything else is request smuggling.
            if length.is_some_and(|l| l != n) {
                return Err(HttpError::ContentLength);
            }
            length = Some(n);
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            if !value.eq_ignore_ascii_case("chunked") {
                return Err(HttpError::Unsupported);
            }
            chunked = true;
        } else if header.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        }
    }
    // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3, rule 3).
    let framing = match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::UntilClose,
    };
    Ok((framing, upgrade))
}

/// Length of a complete chunked body at the start of `buf`, trailers included.
fn chunked_len(buf: &[u8]) -> Result<usize, HttpError> {
    let mut framer = ChunkedFramer::default();
    match framer.feed(buf)? {
        Some(n) => Ok(n),
        None => Err(HttpError::Incomplete),
    }
}

/// Streaming parser of a chunked body.
#[derive(Debug, Default, Clone)]
struct ChunkedFramer {
    state: ChunkState,
    line: Vec<u8>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line.
    #[default]
    Size,
    /// Reading chunk data and its CRLF (`remaining` includes the 2).
    Data { remaining: usize },
    /// Reading trailer lines until an empty one.
    Trailer,
}

impl ChunkedFramer {
    /// Consumes from `data`; returns how many bytes completed the body, or `None` if all of
    /// `data` was consumed and more is needed.
    fn feed(&mut self, data: &[u8]) -> Result<Option<usize>, HttpError> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                ChunkState::Data { remaining } => {
                    let n = remaining.min(data.len() - i);
                    i += n;
                    self.state = if remaining == n {
                        ChunkState::Size
                    } else {
                        ChunkState::Data {
                            remaining: remaining - n,
                        }
                    };
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let Some(nl) = data[i..].iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(&data[i..]);
                        if self.line.len() > MAX_LINE {
                            return Err(HttpError::Chunk);
                        }
                        return Ok(None);
                    };
                    self.line.extend_from_slice(&data[i..i + nl]);
                    i += nl + 1;
                    let line = std::mem::take(&mut self.line);
                    let line = line.strip_suffix(b"\r").ok_or(HttpError::Chunk)?;
                    if self.state == ChunkState::Trailer {
                        if line.is_empty() {
                            self.state = ChunkState::Size;
                            return Ok(Some(i));
                        }
                        continue;
                    }
                    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
                    let digits = std::str::from_utf8(digits).map_err(|_| HttpError::Chunk)?;
                    let size =
                        usize::from_str_radix(digits.trim(), 16).map_err(|_| HttpError::Chunk)?;
                    self.state = if size == 0 {
                        ChunkState::Trailer
                    } else {
                        ChunkState::Data {
                            remaining: size.checked_add(2).ok_or(HttpError::Chunk)?,
                        }
                    };
                }
            }
        }
        Ok(None)
    }
}

/// Where a response is in its framing.
#[derive(Debug, Clone)]
enum ResponseState {
    Head(Vec<u8>),
    Length(usize),
    Chunked(ChunkedFramer),
    UntilClose,
}

/// Tells when a response to one request is complete, from the bytes read, without keeping them.
#[derive(Debug, Clone)]
pub struct ResponseFramer {
    no_body: bool,
    state: ResponseState,
    status: Option<u16>,
}

impl ResponseFramer {
    /// A framer for the response to a request; `no_body` for HEAD.
    pub fn new(no_body: bool) -> Self {
        Self {
            no_body,
            state: ResponseState::Head(Vec::new()),
            status: None,
        }
    }

    /// The final status code, once its head was read.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// Whether the response ends only when the server closes the connection.
    pub fn until_close(&self) -> bool {
        matches!(self.state, ResponseState::UntilClose)
    }

    /// Consumes `data`; returns `Some(n)` when the response ended after its first `n` bytes
    /// (the rest belongs to no request: a misbehaving server), `None` when more is needed.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Option<usize>, HttpError> {
        let total = data.len();
        loop {
            match &mut self.state {
                ResponseState::Head(head) => {
                    let before = head.len();
                    head.extend_from_slice(data);
                    let parsed = match Head::parse_response(head) {
                        Err(HttpError::Incomplete) => return Ok(None),
                        other => other?,
                    };
                    let status = parsed.status;
                    let used = parsed.len - before;
                    let framing = parsed.framing;
                    data = &data[used..];
                    if (100..200).contains(&status) && status != 101 {
                        // Interim response (100 Continue, 103 Early Hints): the real one follows.
                        self.state = ResponseState::Head(Vec::new());
                        continue;
                    }
                    self.status = Some(status);
                    let empty = self.no_body || status == 204 || status == 304 || status == 101;
                    self.state = match framing {
                        _ if empty => return Ok(Some(total - data.len())),
                        Framing::Length(0) => return Ok(Some(total - data.len())),
                        Framing::Length(n) => ResponseState::Length(n),
                        Framing::Chunked => ResponseState::Chunked(ChunkedFramer::default()),
                        Framing::UntilClose => ResponseState::UntilClose,
                    };
                }
                ResponseState::Length(remaining) => {
                    let n = (*remaining).min(data.len());
                    *remaining -= n;
                    data = &data[n..];
                    return Ok((*remaining == 0).then_some(total - data.len()));
                }
                ResponseState::Chunked(framer) => {
                    return Ok(framer.feed(data)?.map(|n| total - data.len() + n));
                }
                ResponseState::UntilClose => return Ok(None),
            }
        }
    }
}

/// Which requests are replayed. By default only GET, HEAD and OPTIONS: replaying a write twice
/// (once live, once on the shadow) is only safe when the operator says the shadow's
/// dependencies are its own.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpPolicy {
    /// Methods replayed.
    pub allow_methods: Vec<String>,
    /// Methods never replayed (wins over `allow_methods`).
    pub deny_methods: Vec<String>,
    /// Path prefixes replayed; empty means every path.
    pub allow_paths: Vec<String>,
    /// Path prefixes never replayed (wins over `allow_paths`).
    pub deny_paths: Vec<String>,
}

impl Default for HttpPolicy {
    fn default() -> Self {
        Self {
            allow_methods: ["GET", "HEAD", "OPTIONS"].map(str::to_owned).to_vec(),
            deny_methods: Vec::new(),
            allow_paths: Vec::new(),
            deny_paths: Vec::new(),
        }
    }
}

impl HttpPolicy {
    /// Whether `request` is replayed.
    pub fn allows(&self, request: &Request) -> bool {
        let method_ok = self.allow_methods.contains(&request.method)
            && !self.deny_methods.contains(&request.method);
        let path_ok = (self.allow_paths.is_empty()
            || self
                .allow_paths
                .iter()
                .any(|p| request.path.starts_with(p.as_str())))
            && !self
                .deny_paths
                .iter()
                .any(|p| request.path.starts_with(p.as_str()));
        method_ok && path_ok
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn requests(stream: &[u8]) -> Result<Vec<Request>, HttpError> {
        let mut cursor = Cursor::new(stream);
        let mut out = Vec::new();
        while (cursor.position() as usize) < stream.len() {
            out.push(Request::check(&mut cursor)?);
        }
        Ok(out)
    }

    #[test]
    fn requests_are_split_by_content_length_and_chunked_bodies() {
        let stream = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello\
            PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n\
            HEAD /d HTTP/1.0\r\n\r\n";
        let got = requests(stream).unwrap();
        let summary: Vec<_> = got
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str()))
            .collect();
        assert_eq!(
            summary,
            [("GET", "/a"), ("POST", "/b"), ("PUT", "/c"), ("HEAD", "/d")]
        );
        assert_eq!(got.iter().map(|r| r.len).sum::<usize>(), stream.len());
    }

    #[test]
    fn a_partial_request_is_incomplete_at_every_cut() {
        let stream = b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..stream.len() {
            let mut cursor = Cursor::new(&stream[..cut]);
            assert_eq!(
                Request::check(&mut cursor),
                Err(HttpError::Incomplete),
                "cut {cut}"
            );
            assert_eq!(cursor.position(), 0);
        }
    }

    #[test]
    fn framing_that_cannot_be_followed_is_refused() {
        let check = |s: &[u8]| Request::check(&mut Cursor::new(s));
        assert_eq!(
            check(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(HttpError::ContentLength)
        );
        // Smuggling shapes: a signed length, an empty one, and a name with a space before the
        // colon (not a token: a server may ignore it, or not).
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\nhello"[..],
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length : 5\r\n\r\nhello",
        ] {
            assert!(check(head).is_err(), "{}", String::from_utf8_lossy(head));
        }
        assert_eq!(
            check(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Err(HttpError::Unsupported)
        );
        assert_eq!(
            check(b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n"),
            Err(HttpError::Unsupported)
        );
        assert_eq!(check(b"GARBAGE\r\n\r\n"), Err(HttpError::StartLine));
        assert_eq!(
            check(b"GET / HTTP/1.1\r\nnocolon\r\n\r\n"),
            Err(HttpError::Header)
        );
    }

    #[test]
    fn http_is_recognised_from_the_first_bytes() {
        assert_eq!(looks_like_http(b"GET /"), Some(true));
        assert_eq!(looks_like_http(b"GE"), None);
        assert_eq!(looks_like_http(b"*2\r\n$3\r\nGET"), Some(false));
    }

    #[test]
    fn the_default_policy_replays_only_safe_methods() {
        let req = |m: &str, p: &str| Request {
            method: m.into(),
            path: p.into(),
            len: 0,
        };
        let policy = HttpPolicy::default();
        assert!(policy.allows(&req("GET", "/")));
        assert!(!policy.allows(&req("POST", "/")));
        let custom = HttpPolicy {
            allow_methods: vec!["GET".into(), "POST".into()],
            deny_paths: vec!["/admin".into()],
            ..HttpPolicy::default()
        };
        assert!(custom.allows(&req("POST", "/api")));
        assert!(!custom.allows(&req("GET", "/admin/x")));
    }

    fn frame(response: &[u8], no_body: bool, split: usize) -> Option<usize> {
        let mut framer = ResponseFramer::new(no_body);
        let split = split.min(response.len());
        match framer.feed(&response[..split]).unwrap() {
            Some(n) => Some(n),
            None => framer.feed(&response[split..]).unwrap().map(|n| n + split),
        }
    }

    #[test]
    fn responses_end_where_their_framing_says() {
        let chunked = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let sized = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabc";
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n";
        for split in 0..chunked.len() {
            assert_eq!(
                frame(chunked, false, split),
                Some(chunked.len()),
                "split {split}"
            );
        }
        for split in 0..sized.len() {
            assert_eq!(frame(sized, false, split), Some(sized.len()));
        }
        assert_eq!(frame(head, true, 5), Some(head.len()));
        let mut framer = ResponseFramer::new(false);
        assert_eq!(framer.feed(b"HTTP/1.0 200 OK\r\n\r\nbody").unwrap(), None);
        assert!(framer.until_close());
        assert_eq!(framer.status(), Some(200));
    }

    proptest! {
        /// Any sequence of well-formed requests, cut anywhere, splits back into the same requests.
        #[test]
        fn generated_streams_split_into_their_requests(
            reqs in proptest::collection::vec(
                (prop::sample::select(vec!["GET", "POST", "HEAD", "DELETE"]), "[a-z]{1,8}",
                 proptest::collection::vec(any::<u8>(), 0..50), any::<bool>()),
                1..6),
        ) {
            let mut stream = Vec::new();
            for (method, path, body, chunked) in &reqs {
                stream.extend_from_slice(format!("{method} /{path} HTTP/1.1\r\nHost: h\r\n").as_bytes());
                if *chunked {
                    stream.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    for part in body.chunks(7) {
                        stream.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                        stream.extend_from_slice(part);
                        stream.extend_from_slice(b"\r\n");
                    }
                    stream.extend_from_slice(b"0\r\n\r\n");
                } else {
                    stream.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                    stream.extend_from_slice(body);
                }
            }
            let got = requests(&stream).unwrap();
            prop_assert_eq!(got.len(), reqs.len());
            for (r, (m, p, _, _)) in got.iter().zip(&reqs) {
                prop_assert_eq!(&r.method, m);
                prop_assert_eq!(&r.path, &format!("/{p}"));
            }
        }

        /// Garbage never panics the request or response parsers.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Request::check(&mut Cursor::new(&bytes[..]));
            let _ = ResponseFramer::new(false).feed(&bytes);
        }
    }
}
