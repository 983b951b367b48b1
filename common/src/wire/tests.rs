//! Round-trip and malformed-input properties of the wire protocol.

use std::{string::String, vec, vec::Vec};

use hdrhistogram::Histogram;
use proptest::prelude::*;

use super::{frame::LENGTH_PREFIX_LEN, *};

const MAX: usize = DEFAULT_MAX_FRAME_LEN;

fn envelope(message: Message) -> Envelope {
    Envelope::new(PROTOCOL_VERSION, message)
}

proptest! {
    #[test]
    fn every_message_round_trips(message in any::<Message>()) {
        let sent = envelope(message);
        let frame = encode_frame(&sent, MAX).unwrap();
        let (got, used) = decode_frame(&frame, MAX).unwrap().expect("complete frame");
        prop_assert_eq!(used, frame.len());
        prop_assert_eq!(got, sent);
    }

    #[test]
    fn a_stream_split_anywhere_decodes_to_the_same_messages(
        messages in proptest::collection::vec(any::<Message>(), 1..6),
        chunk in 1usize..64,
    ) {
        let sent: Vec<_> = messages.into_iter().map(envelope).collect();
        let stream: Vec<u8> = sent.iter().flat_map(|e| encode_frame(e, MAX).unwrap()).collect();
        let mut decoder = FrameDecoder::new(MAX);
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            decoder.push(piece);
            while let Some(e) = decoder.next_envelope().unwrap() {
                got.push(e);
            }
        }
        prop_assert_eq!(got, sent);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn every_proper_prefix_of_a_frame_is_incomplete(message in any::<Message>()) {
        let frame = encode_frame(&envelope(message), MAX).unwrap();
        for end in 0..frame.len() {
            prop_assert!(decode_frame(&frame[..end], MAX).unwrap().is_none());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&bytes);
        while let Ok(Some(_)) = decoder.next_envelope() {}
    }

    #[test]
    fn a_flipped_byte_is_an_error_or_a_message_never_a_panic(
        message in any::<Message>(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..,
    ) {
        let mut frame = encode_frame(&envelope(message), MAX).unwrap();
        let i = at.index(frame.len());
        frame[i] ^= xor;
        let _ = decode_frame(&frame, MAX);
    }

    #[test]
    fn negotiation_picks_the_newest_common_version(
        a in 0u16..10, b in 0u16..10, c in 0u16..10, d in 0u16..10,
    ) {
        let (ours, theirs) = (a.min(b)..=a.max(b), c.min(d)..=c.max(d));
        match negotiate(ours.clone(), theirs.clone()) {
            Ok(v) => {
                prop_assert!(ours.contains(&v) && theirs.contains(&v));
                prop_assert!(!ours.contains(&(v + 1)) || !theirs.contains(&(v + 1)));
            }
            Err(_) => prop_assert!(ours.into_iter().all(|v| !theirs.contains(&v))),
        }
    }

    #[test]
    fn histograms_keep_every_count(values in proptest::collection::vec(1u64..60_000_000_000, 0..200)) {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 2).unwrap();
        for v in &values {
            h.record(*v).unwrap();
        }
        let back = EncodedHistogram::encode(&h).unwrap().decode().unwrap();
        prop_assert_eq!(back.len(), values.len() as u64);
        prop_assert_eq!(back.max(), h.max());
        for q in [0.5, 0.99] {
            prop_assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q));
        }
    }
}

#[test]
fn an_oversized_length_is_refused_from_the_header_alone() {
    let mut decoder = FrameDecoder::new(1000);
    decoder.push(&1001u32.to_be_bytes());
    match decoder.next_envelope() {
        Err(FrameError::TooLarge {
            len: 1001,
            max: 1000,
        }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

#[test]
fn encoding_refuses_a_message_over_the_limit() {
    let big = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "x".repeat(2000),
        hostname: String::new(),
        roles: vec![],
        next_report_seq: 0,
    });
    assert!(matches!(
        encode_frame(&envelope(big), 1000),
        Err(FrameError::TooLarge { .. })
    ));
}

fn frame_with_version(version: u16, message: &Message) -> Vec<u8> {
    let payload = postcard::to_allocvec(&version).unwrap();
    let payload = postcard::to_extend(message, payload).unwrap();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend(payload);
    frame
}

#[test]
fn a_newer_version_is_refused_but_its_hello_is_still_read() {
    let ack = Message::Ack(Ack { seq: 7 });
    match decode_frame(&frame_with_version(PROTOCOL_VERSION + 1, &ack), MAX) {
        Err(FrameError::UnsupportedVersion { version, .. }) => {
            assert_eq!(version, PROTOCOL_VERSION + 1);
        }
        other => panic!("expected UnsupportedVersion, got {other:?}"),
    }
    // A newer agent sends its Hello in the frozen handshake version, so it is always readable
    // and the coordinator can answer with `Refused` naming the versions it speaks.
    let hello = Message::Hello(Hello {
        min_version: PROTOCOL_VERSION + 1,
        max_version: PROTOCOL_VERSION + 3,
        agent_version: "9.0.0".into(),
        hostname: "h".into(),
        roles: vec![AgentRole::Live],
        next_report_seq: 0,
    });
    let sent = envelope(hello);
    assert_eq!(sent.version, HANDSHAKE_VERSION);
    let (got, _) = decode_frame(&encode_frame(&sent, MAX).unwrap(), MAX)
        .unwrap()
        .unwrap();
    let Message::Hello(h) = got.message else {
        panic!("not a hello")
    };
    assert!(negotiate(SUPPORTED_VERSIONS, h.min_version..=h.max_version).is_err());
}

#[test]
fn trailing_bytes_are_an_error() {
    let mut frame = encode_frame(&envelope(Message::Ack(Ack { seq: 1 })), MAX).unwrap();
    frame.push(0);
    let len = (frame.len() - LENGTH_PREFIX_LEN) as u32;
    frame[..LENGTH_PREFIX_LEN].copy_from_slice(&len.to_be_bytes());
    assert!(matches!(
        decode_frame(&frame, MAX),
        Err(FrameError::TrailingBytes { count: 1 })
    ));
}

#[test]
fn histograms_with_absurd_headers_are_refused_before_allocating() {
    let h = Histogram::<u64>::new_with_bounds(1, 1_000_000, 3).unwrap();
    let good = EncodedHistogram::encode(&h).unwrap();
    assert!(good.decode().is_ok());

    let mut digits = good.clone();
    digits.0[12..16].copy_from_slice(&5u32.to_be_bytes());
    assert!(matches!(
        digits.decode(),
        Err(HistogramError::BadBounds { digits: 5, .. })
    ));

    let mut deflated = good.clone();
    deflated.0[0..4].copy_from_slice(&0x1c84_9314u32.to_be_bytes());
    assert!(matches!(
        deflated.decode(),
        Err(HistogramError::BadCookie { .. })
    ));

    let short = EncodedHistogram(good.0[..10].to_vec());
    assert!(matches!(
        short.decode(),
        Err(HistogramError::Truncated { len: 10 })
    ));
}
