//! Redis RESP2 and RESP3 (<https://redis.io/docs/latest/develop/reference/protocol-spec/>).
//!
//! A client command is an array of bulk strings (or an inline command line) and the server owes
//! one reply per command; a reply is complete when its frame is. `-` and `!` replies are errors.
//! RESP3 push frames (`>`) are out of band and answer no command; an attribute (`|`) decorates
//! the reply after it.
//!
//! Frame boundaries are found by [`frame_len`], a scanner that builds no values. The
//! `redis-protocol` crate decodes frames into values, one decoder per protocol version, while a
//! connection switches from RESP2 to RESP3 mid-stream (`HELLO 3`) and the replayer needs only
//! boundaries and the first byte; a 60-line scanner that allocates nothing does that and is
//! property-tested below.

use super::{
    ClientFraming, ClientMessage, Completed, ErrorReply, FrameError, Protocol, ResponseFraming,
};

const PROTOCOL: &str = "redis";
/// Deepest nesting accepted (redis itself nests replies a few levels deep).
const MAX_DEPTH: usize = 32;
/// Largest single reply buffered while incomplete.
const MAX_FRAME: usize = 512 << 20;

fn line_end(buf: &[u8], from: usize) -> Result<usize, FrameError> {
    match buf[from..].iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && buf[from + i - 1] == b'\r' => Ok(from + i + 1),
        Some(_) => Err(FrameError::malformed(PROTOCOL, "line without CR")),
        None if buf.len() - from > 64 * 1024 => {
            Err(FrameError::malformed(PROTOCOL, "line longer than 64 KiB"))
        }
        None => Err(FrameError::Incomplete),
    }
}

fn number(line: &[u8]) -> Result<i64, FrameError> {
    std::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(FrameError::malformed(PROTOCOL, "length is not a number"))
}

/// Length of the frame starting at `buf[at]`, RESP2 or RESP3.
fn frame_end(buf: &[u8], at: usize, depth: usize) -> Result<usize, FrameError> {
    if depth > MAX_DEPTH {
        return Err(FrameError::malformed(PROTOCOL, "nesting too deep"));
    }
    let Some(&kind) = buf.get(at) else {
        return Err(FrameError::Incomplete);
    };
    let head_end = line_end(buf, at + 1)?;
    let head = &buf[at + 1..head_end - 2];
    match kind {
        b'+' | b'-' | b':' | b'_' | b'#' | b',' | b'(' => Ok(head_end),
        b'$' | b'!' | b'=' => {
            let n = number(head)?;
            if n < 0 {
                return Ok(head_end); // RESP2 null bulk string
            }
            let end = head_end + n as usize + 2;
            if buf.len() < end {
                return Err(FrameError::Incomplete);
            }
            if &buf[end - 2..end] != b"\r\n" {
                return Err(FrameError::malformed(
                    PROTOCOL,
                    "bulk string not ended by CRLF",
                ));
            }
            Ok(end)
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = number(head)?;
            let items = match (n, kind) {
                (n, _) if n < 0 => 0, // RESP2 null array
                (n, b'%' | b'|') => 2 * n as usize,
                (n, _) => n as usize,
            };
            let mut end = head_end;
            for _ in 0..items {
                end = frame_end(buf, end, depth + 1)?;
            }
            Ok(end)
        }
        _ => Err(FrameError::malformed(PROTOCOL, "unknown frame type")),
    }
}

/// Length of the frame at the start of `buf`.
pub fn frame_len(buf: &[u8]) -> Result<usize, FrameError> {
    frame_end(buf, 0, 0)
}

/// The first `N` words of a command (an array of bulk strings, or an inline line), as far as
/// they are bulk strings; the command is whole in `buf`.
fn command_words<const N: usize>(buf: &[u8]) -> [&[u8]; N] {
    let mut words = [&[][..]; N];
    if buf.first() == Some(&b'*') {
        let Ok(mut at) = line_end(buf, 0) else {
            return words;
        };
        for word in &mut words {
            if buf.get(at) != Some(&b'$') {
                break;
            }
            let Ok(head_end) = line_end(buf, at + 1) else {
                break;
            };
            let Ok(n) = number(&buf[at + 1..head_end - 2]) else {
                break;
            };
            let Some(bytes) = buf.get(head_end..head_end + n.max(0) as usize) else {
                break;
            };
            *word = bytes;
            at = head_end + bytes.len() + 2;
        }
    } else {
        let line = buf.strip_suffix(b"\r\n").unwrap_or(buf);
        for (word, w) in words.iter_mut().zip(
            line.split(u8::is_ascii_whitespace)
                .filter(|w| !w.is_empty()),
        ) {
            *word = w;
        }
    }
    words
}

/// Client commands: one reply each, except where the client turned replies off
/// (`CLIENT REPLY OFF` until `CLIENT REPLY ON`, and `CLIENT REPLY SKIP` for itself and the next
/// command): those are fire-and-forget, and nothing waits for an answer that never comes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RespClient {
    replies_off: bool,
    skip_next: bool,
}

impl ClientFraming for RespClient {
    fn protocol(&self) -> Protocol {
        Protocol::Redis
    }

    fn check(&mut self, buf: &[u8]) -> Result<ClientMessage, FrameError> {
        let len = match buf.first() {
            None => return Err(FrameError::Incomplete),
            Some(b'*') => frame_len(buf)?,
            // An inline command: one line.
            Some(_) => line_end(buf, 0)?,
        };
        let [command, sub, mode] = command_words::<3>(&buf[..len]);
        let answered =
            if command.eq_ignore_ascii_case(b"client") && sub.eq_ignore_ascii_case(b"reply") {
                if mode.eq_ignore_ascii_case(b"on") {
                    self.replies_off = false;
                    self.skip_next = false;
                    true
                } else {
                    if mode.eq_ignore_ascii_case(b"off") {
                        self.replies_off = true;
                    } else if mode.eq_ignore_ascii_case(b"skip") {
                        self.skip_next = true;
                    }
                    false
                }
            } else {
                !std::mem::take(&mut self.skip_next) && !self.replies_off
            };
        Ok(ClientMessage::replay(len, u32::from(answered)))
    }

    fn boundary(&self, buf: &[u8]) -> bool {
        buf.first() == Some(&b'*') && buf.get(1).is_some_and(u8::is_ascii_digit)
    }
}

/// Replies, one per command written.
#[derive(Debug, Default)]
pub struct RespResponses {
    /// Bytes of a reply not yet complete.
    partial: Vec<u8>,
}

impl ResponseFraming for RespResponses {
    fn expect(&mut self, _message: &ClientMessage) {}

    fn feed(&mut self, data: &[u8], done: &mut Vec<Completed>) -> Result<(), FrameError> {
        // Offsets in `data` are reported relative to it; `carried` bytes precede it.
        let carried = self.partial.len();
        let owned;
        let buf: &[u8] = if carried == 0 {
            data
        } else {
            self.partial.extend_from_slice(data);
            owned = std::mem::take(&mut self.partial);
            &owned
        };
        let mut at = 0;
        while at < buf.len() {
            let end = match frame_end(buf, at, 0) {
                Ok(end) => end,
                Err(FrameError::Incomplete) => {
                    if buf.len() - at > MAX_FRAME {
                        return Err(FrameError::malformed(PROTOCOL, "reply larger than 512 MiB"));
                    }
                    break;
                }
                Err(e) => return Err(e),
            };
            let kind = buf[at];
            at = end;
            // Push frames answer no command; attributes decorate the next reply.
            if kind == b'>' || kind == b'|' {
                continue;
            }
            done.push(Completed {
                error: matches!(kind, b'-' | b'!').then_some(ErrorReply::Protocol),
                ..Completed::at(end.saturating_sub(carried))
            });
        }
        self.partial = buf[at..].to_vec();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn replies(chunks: &[&[u8]]) -> Vec<Option<ErrorReply>> {
        let mut r = RespResponses::default();
        let mut done = Vec::new();
        for c in chunks {
            r.feed(c, &mut done).unwrap();
        }
        done.into_iter().map(|c| c.error).collect()
    }

    #[test]
    fn commands_after_client_reply_off_or_skip_are_owed_no_reply() {
        fn cmd(words: &[&str]) -> Vec<u8> {
            let mut out = format!("*{}\r\n", words.len()).into_bytes();
            for w in words {
                out.extend(format!("${}\r\n{w}\r\n", w.len()).bytes());
            }
            out
        }
        let mut c = RespClient::default();
        let mut owed = |bytes: &[u8]| c.check(bytes).unwrap().responses;
        assert_eq!(owed(&cmd(&["SET", "k", "v"])), 1);
        assert_eq!(owed(&cmd(&["client", "reply", "skip"])), 0);
        assert_eq!(owed(&cmd(&["SET", "k", "v"])), 0, "the skipped one");
        assert_eq!(owed(&cmd(&["GET", "k"])), 1);
        assert_eq!(owed(&cmd(&["CLIENT", "REPLY", "OFF"])), 0);
        assert_eq!(owed(&cmd(&["INCR", "n"])), 0);
        assert_eq!(owed(b"PING\r\n"), 0);
        assert_eq!(owed(b"CLIENT REPLY ON\r\n"), 1, "inline");
        assert_eq!(owed(&cmd(&["INCR", "n"])), 1);
        assert_eq!(owed(&cmd(&["CLIENT", "LIST"])), 1);
    }

    #[test]
    fn commands_are_cut_one_by_one_inline_ones_too() {
        let mut c = RespClient::default();
        let buf = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n";
        assert_eq!(c.check(buf).unwrap().len, 20);
        assert_eq!(c.check(&buf[20..]).unwrap().len, 6);
        assert_eq!(c.check(&buf[..19]), Err(FrameError::Incomplete));
        assert!(c.boundary(b"*3\r\n") && !c.boundary(b"$3\r\n"));
    }

    #[test]
    fn every_reply_kind_completes_once_and_errors_are_told() {
        let stream: &[u8] =
            b"+OK\r\n-ERR no\r\n:5\r\n$-1\r\n$3\r\nabc\r\n*-1\r\n*2\r\n$1\r\na\r\n:1\r\n\
              %1\r\n+k\r\n+v\r\n>2\r\n+message\r\n+x\r\n|1\r\n+a\r\n+b\r\n_\r\n!3\r\nbad\r\n";
        let all = replies(&[stream]);
        assert_eq!(all.len(), 10, "{all:?}");
        assert_eq!(all.iter().filter(|e| e.is_some()).count(), 2);
        // Split at every byte: the same replies.
        for cut in 1..stream.len() {
            assert_eq!(
                replies(&[&stream[..cut], &stream[cut..]]),
                all,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn ends_are_offsets_in_the_bytes_fed() {
        let mut r = RespResponses::default();
        let mut done = Vec::new();
        r.feed(b"$5\r\nhel", &mut done).unwrap();
        assert!(done.is_empty());
        r.feed(b"lo\r\n+OK\r\n", &mut done).unwrap();
        assert_eq!(done.iter().map(|c| c.end).collect::<Vec<_>>(), [4, 9]);
    }

    proptest! {
        /// Arbitrary bytes never panic the scanner, and a frame length never exceeds the input.
        #[test]
        fn the_scanner_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(n) = frame_len(&bytes) {
                prop_assert!(n <= bytes.len());
            }
            let mut r = RespResponses::default();
            let _ = r.feed(&bytes, &mut Vec::new());
        }
    }
}
