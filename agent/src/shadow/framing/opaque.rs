//! The fallback for protocols doppel does not parse: each mirrored segment's bytes are written
//! at the segment's original offset from the flow's start, so the shadow sees the client's own
//! timing, and an exchange is a run of client bytes the live client sent without seeing a
//! response in between (the mirrored segments' acknowledgement numbers show it: see
//! [`super::super::exchange`]). Its latency is the first response byte after the run's last
//! write. Response completeness is unknown, so nothing waits on an idle timer: the next run's
//! own offset already accounts for the time the live client waited.

use super::{ClientFraming, ClientMessage, Completed, FrameError, Protocol, ResponseFraming};

/// Client bytes as they came: the splitter hands one segment at a time.
#[derive(Debug, Clone, Copy)]
pub struct OpaqueClient;

impl ClientFraming for OpaqueClient {
    fn protocol(&self) -> Protocol {
        Protocol::Opaque
    }

    fn check(&mut self, buf: &[u8]) -> Result<ClientMessage, FrameError> {
        if buf.is_empty() {
            return Err(FrameError::Incomplete);
        }
        Ok(ClientMessage {
            gated: false,
            ..ClientMessage::replay(buf.len(), 0)
        })
    }

    fn boundary(&self, _buf: &[u8]) -> bool {
        // Nothing to align to: resume with the next segment.
        true
    }
}

/// Responses of unknown framing: none is ever reported complete.
#[derive(Debug, Clone, Copy)]
pub struct OpaqueResponses;

impl ResponseFraming for OpaqueResponses {
    fn expect(&mut self, _message: &ClientMessage) {}

    fn feed(&mut self, _data: &[u8], _done: &mut Vec<Completed>) -> Result<(), FrameError> {
        Ok(())
    }

    fn knows_completeness(&self) -> bool {
        false
    }
}
