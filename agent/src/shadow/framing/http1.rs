//! HTTP/1.1 ([`super::super::http`] holds the message rules): one response per request, in
//! order, pipelined requests included; 5xx responses are server-side errors.

use std::{collections::VecDeque, io::Cursor, sync::Arc};

use super::{
    Action, ClientFraming, ClientMessage, Completed, ErrorReply, FrameError, Protocol,
    ResponseFraming,
};
use crate::shadow::http::{HttpError, HttpPolicy, Request, ResponseFramer, looks_like_http};

const PROTOCOL: &str = "http1";

fn frame_error(e: HttpError) -> FrameError {
    match e {
        HttpError::Incomplete => FrameError::Incomplete,
        HttpError::StartLine => FrameError::malformed(PROTOCOL, "malformed start line"),
        HttpError::Header => FrameError::malformed(PROTOCOL, "malformed or oversized header"),
        HttpError::ContentLength => FrameError::malformed(PROTOCOL, "invalid Content-Length"),
        HttpError::Chunk => FrameError::malformed(PROTOCOL, "malformed chunked body"),
        HttpError::Unsupported => FrameError::malformed(
            PROTOCOL,
            "unsupported framing (transfer coding, upgrade or CONNECT)",
        ),
    }
}

/// Requests, each replayed or skipped by the [`HttpPolicy`].
#[derive(Debug)]
pub struct Http1Client {
    policy: Arc<HttpPolicy>,
}

impl Http1Client {
    /// Requests under `policy`.
    pub fn new(policy: Arc<HttpPolicy>) -> Self {
        Self { policy }
    }
}

impl ClientFraming for Http1Client {
    fn protocol(&self) -> Protocol {
        Protocol::Http1
    }

    fn check(&mut self, buf: &[u8]) -> Result<ClientMessage, FrameError> {
        let request = Request::check(&mut Cursor::new(buf)).map_err(frame_error)?;
        let len = request.len;
        Ok(if self.policy.allows(&request) {
            ClientMessage {
                request: Some(request),
                ..ClientMessage::replay(len, 1)
            }
        } else {
            ClientMessage {
                action: Action::Denied(request),
                gated: false,
                ..ClientMessage::replay(len, 0)
            }
        })
    }

    fn boundary(&self, buf: &[u8]) -> bool {
        looks_like_http(buf) == Some(true)
    }
}

/// One [`ResponseFramer`] per request written, oldest first.
#[derive(Debug, Default)]
pub struct Http1Responses {
    awaited: VecDeque<ResponseFramer>,
}

impl ResponseFraming for Http1Responses {
    fn expect(&mut self, message: &ClientMessage) {
        let no_body = message
            .request
            .as_ref()
            .is_some_and(Request::response_has_no_body);
        for _ in 0..message.responses {
            self.awaited.push_back(ResponseFramer::new(no_body));
        }
    }

    fn feed(&mut self, data: &[u8], done: &mut Vec<Completed>) -> Result<(), FrameError> {
        let mut at = 0;
        while at < data.len() {
            let Some(framer) = self.awaited.front_mut() else {
                // Bytes no request asked for: a misbehaving server; nothing to time.
                return Ok(());
            };
            let Some(used) = framer.feed(&data[at..]).map_err(frame_error)? else {
                return Ok(());
            };
            at += used;
            let status = framer.status();
            self.awaited.pop_front();
            done.push(Completed {
                status,
                error: status.filter(|s| *s >= 500).map(|_| ErrorReply::Http5xx),
                ..Completed::at(at)
            });
        }
        Ok(())
    }

    fn close_completes(&mut self) -> Option<Completed> {
        if !self.awaited.front()?.until_close() {
            return None;
        }
        let status = self.awaited.pop_front()?.status();
        Some(Completed {
            status,
            error: status.filter(|s| *s >= 500).map(|_| ErrorReply::Http5xx),
            ..Completed::at(0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelined_responses_complete_in_order_and_5xx_is_an_error() {
        let mut client = Http1Client::new(Arc::new(HttpPolicy::default()));
        let mut responses = Http1Responses::default();
        let stream = b"GET /a HTTP/1.1\r\n\r\nHEAD /b HTTP/1.1\r\n\r\nPOST /c HTTP/1.1\r\nContent-Length: 1\r\n\r\nx";
        let a = client.check(stream).unwrap();
        let b = client.check(&stream[a.len..]).unwrap();
        let c = client.check(&stream[a.len + b.len..]).unwrap();
        assert!(matches!(c.action, Action::Denied(_)) && c.responses == 0);
        responses.expect(&a);
        responses.expect(&b);
        let mut done = Vec::new();
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 503 No\r\nContent-Length: 9\r\n\r\n";
        responses.feed(&bytes[..10], &mut done).unwrap();
        assert!(done.is_empty());
        responses.feed(&bytes[10..], &mut done).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[0].error, None);
        // HEAD's response has no body despite its Content-Length.
        assert_eq!(done[1].status, Some(503));
        assert_eq!(done[1].error, Some(ErrorReply::Http5xx));
        assert_eq!(done[1].end, bytes.len() - 10);
    }
}
