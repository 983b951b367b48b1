//! Round-trip and malformed-input properties of the wire protocol.

use core::mem::size_of;
use std::{net::IpAddr, string::String, vec, vec::Vec};

use hdrhistogram::Histogram;
use proptest::prelude::*;
use serde::Serialize;

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
        let largest_frame = sent.iter().map(|e| encode_frame(e, MAX).unwrap().len()).max().unwrap();
        let mut decoder = FrameDecoder::new(MAX);
        let mut got = Vec::new();
        for piece in stream.chunks(chunk) {
            decoder.push(piece);
            // The buffer grows no further than the frame it is filling or the bytes pushed.
            prop_assert!(decoder.capacity() < largest_frame + chunk);
            while let Some(e) = decoder.next_envelope().unwrap() {
                got.push(e);
            }
        }
        prop_assert_eq!(got, sent);
        prop_assert_eq!(decoder.buffered(), 0);
    }

    #[test]
    fn a_decoded_message_stays_within_its_heap_bound(message in any::<Message>()) {
        let frame = encode_frame(&envelope(message), MAX).unwrap();
        let (got, _) = decode_frame(&frame, MAX).unwrap().expect("complete frame");
        let heap = heap_of(&got.message);
        prop_assert!(heap.collections <= MAX_DECODED_OVERHEAD);
        prop_assert!(heap.contents <= frame.len() - LENGTH_PREFIX_LEN);
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
        agent_version: "x".repeat(MAX_NAME_LEN),
        hostname: "x".repeat(MAX_NAME_LEN),
        roles: vec![],
        next_report_seq: 0,
    });
    assert!(matches!(
        encode_frame(&envelope(big), 500),
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

/// Heap bytes of a message, from its capacities: its collections of structs, and the contents of
/// its strings and byte strings. The structs are destructured without `..`, so a new field does
/// not compile until it is counted here.
#[derive(Debug, Default)]
struct Heap {
    collections: usize,
    contents: usize,
}

impl Heap {
    fn items<T>(&mut self, items: &Vec<T>) {
        self.collections += items.capacity() * size_of::<T>();
    }

    fn string(&mut self, text: &String) {
        self.contents += text.capacity();
    }

    fn bytes(&mut self, bytes: &Vec<u8>) {
        self.contents += bytes.capacity();
    }
}

fn heap_of(message: &Message) -> Heap {
    let mut heap = Heap::default();
    match message {
        Message::Hello(Hello {
            min_version: _,
            max_version: _,
            agent_version,
            hostname,
            roles,
            next_report_seq: _,
        }) => {
            heap.string(agent_version);
            heap.string(hostname);
            heap.items(roles);
        }
        Message::Welcome(Welcome {
            version: _,
            coordinator_version,
            agent_name,
        }) => {
            heap.string(coordinator_version);
            heap.string(agent_name);
        }
        Message::Refused(Refused {
            reason,
            min_version: _,
            max_version: _,
        }) => heap.string(reason),
        Message::Report(IntervalReport {
            seq: _,
            interval_start_unix_ms: _,
            interval_ms: _,
            histograms,
            counters,
            host: _,
            workload: _,
            patterns,
        }) => {
            heap.items(histograms);
            for HistogramRecord {
                service,
                class: _,
                scope: _,
                metric: _,
                histogram: EncodedHistogram(bytes),
            } in histograms
            {
                heap.string(service);
                heap.bytes(bytes);
            }
            heap.items(counters);
            for Counter { name, value: _ } in counters {
                heap.string(name);
            }
            heap.items(patterns);
            for PatternCount { pattern, flows: _ } in patterns {
                heap.string(pattern);
            }
        }
        Message::Ack(Ack { seq: _ }) => {}
        Message::PolicyUpdate(PolicyUpdate {
            revision: _,
            policy:
                AgentPolicy {
                    workload,
                    report_interval_ms: _,
                    services,
                    classes,
                    rules,
                    mirror_sessions,
                    sampling_seed: _,
                    mirror_budget_flows_per_s: _,
                },
        }) => {
            heap.string(workload);
            heap.items(services);
            heap.items(classes);
            for ClassPolicy {
                id: _,
                name,
                sample_rate_ppm: _,
                priority: _,
                budget_priority: _,
            } in classes
            {
                heap.string(name);
            }
            heap.items(rules);
            for ClassRule {
                class: _,
                port: _,
                client_prefix: _,
                payload_prefix,
                payload_mask,
            } in rules
            {
                heap.bytes(payload_prefix);
                heap.bytes(payload_mask);
            }
            heap.items(mirror_sessions);
        }
    }
    heap
}

#[test]
fn the_decoded_overhead_stays_below_the_default_frame_limit() {
    const { assert!(MAX_DECODED_OVERHEAD < DEFAULT_MAX_FRAME_LEN) };
    // The figure the `frame` and `messages` docs quote: the report's 1024 histogram records of
    // 56 bytes, 4096 counters and 4096 pattern counts of 32.
    if size_of::<usize>() == 8 {
        assert_eq!(size_of::<HistogramRecord>(), 56);
        assert_eq!(size_of::<Counter>(), 32);
        assert_eq!(size_of::<PatternCount>(), 32);
        assert_eq!(MAX_DECODED_OVERHEAD, 312 << 10);
    }
}

/// An interval report with every collection and every string at its limit.
fn largest_report() -> Message {
    let histogram = EncodedHistogram::encode(&Histogram::<u64>::new(2).unwrap()).unwrap();
    Message::Report(IntervalReport {
        seq: 1,
        interval_start_unix_ms: 2,
        interval_ms: 3,
        histograms: (0..MAX_HISTOGRAMS)
            .map(|i| HistogramRecord {
                service: "s".repeat(MAX_NAME_LEN),
                class: i as u16,
                scope: FlowScope::All,
                metric: LatencyMetric::KernelFirstByte,
                histogram: histogram.clone(),
            })
            .collect(),
        counters: (0..MAX_COUNTERS)
            .map(|i| Counter {
                name: "c".repeat(MAX_NAME_LEN),
                value: i as u64,
            })
            .collect(),
        host: ResourceUsage::default(),
        workload: None,
        patterns: (0..MAX_PATTERNS)
            .map(|i| PatternCount {
                pattern: "p".repeat(MAX_PATTERN_LEN),
                flows: i as u64,
            })
            .collect(),
    })
}

/// A policy with every collection and every string at its limit.
fn largest_policy() -> Message {
    let addr = IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1]);
    Message::PolicyUpdate(PolicyUpdate {
        revision: 1,
        policy: AgentPolicy {
            workload: "w".repeat(MAX_NAME_LEN),
            report_interval_ms: 1000,
            services: vec![ServiceAddr { addr, port: 80 }; MAX_POLICY_SERVICES],
            classes: (0..MAX_POLICY_CLASSES)
                .map(|i| ClassPolicy {
                    id: i as u16,
                    name: "n".repeat(MAX_NAME_LEN),
                    sample_rate_ppm: 1000,
                    priority: 1,
                    budget_priority: false,
                })
                .collect(),
            rules: vec![
                ClassRule {
                    class: 1,
                    port: Some(80),
                    client_prefix: Some(IpPrefix { addr, len: 64 }),
                    payload_prefix: vec![b'G'; MAX_RULE_PAYLOAD_LEN],
                    payload_mask: vec![0xff; MAX_RULE_PAYLOAD_LEN],
                };
                MAX_POLICY_RULES
            ],
            mirror_sessions: vec![
                MirrorSession {
                    shadow_addr: addr,
                    vni: 7
                };
                MAX_POLICY_SESSIONS
            ],
            sampling_seed: 9,
            mirror_budget_flows_per_s: u32::MAX,
        },
    })
}

#[test]
fn messages_at_every_limit_round_trip_within_the_heap_bound() {
    let hello = Message::Hello(Hello {
        min_version: 1,
        max_version: 1,
        agent_version: "v".repeat(MAX_NAME_LEN),
        hostname: "h".repeat(MAX_NAME_LEN),
        roles: vec![AgentRole::Live, AgentRole::Shadow],
        next_report_seq: 0,
    });
    let refused = Message::Refused(Refused {
        reason: "r".repeat(MAX_REASON_LEN),
        min_version: 1,
        max_version: 1,
    });
    for message in [hello, refused, largest_report(), largest_policy()] {
        let sent = envelope(message);
        let frame = encode_frame(&sent, MAX).unwrap();
        let (got, used) = decode_frame(&frame, MAX).unwrap().expect("complete frame");
        assert_eq!(used, frame.len());
        let heap = heap_of(&got.message);
        assert!(heap.collections <= MAX_DECODED_OVERHEAD, "{heap:?}");
        assert!(heap.contents <= frame.len() - LENGTH_PREFIX_LEN, "{heap:?}");
        assert_eq!(got, sent);
    }
}

#[test]
fn the_largest_report_fits_a_default_frame_and_sets_the_overhead() {
    let frame = encode_frame(&envelope(largest_report()), MAX).unwrap();
    let (got, _) = decode_frame(&frame, MAX).unwrap().expect("complete frame");
    assert_eq!(heap_of(&got.message).collections, MAX_DECODED_OVERHEAD);
}

/// A frame around `payload` (version first), encoded without the limits `Message` enforces.
fn raw_frame(payload: &impl Serialize) -> Vec<u8> {
    let payload = postcard::to_allocvec(payload).unwrap();
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend(payload);
    frame
}

/// A version 1 `IntervalReport` with `counters` as its counters, field by field: a variant is
/// its index, a struct its fields in order, a `Vec` its length then its elements.
fn raw_report(counters: &[(&str, u64)]) -> Vec<u8> {
    const REPORT: u32 = 3;
    let no_histograms: &[()] = &[];
    let no_patterns: &[()] = &[];
    raw_frame(&(
        PROTOCOL_VERSION,
        REPORT,
        (0u64, 0u64, 0u32),
        no_histograms,
        counters,
        ResourceUsage::default(),
        None::<ResourceUsage>,
        no_patterns,
    ))
}

/// A version 1 `Hello` with `roles` as its roles.
fn raw_hello(roles: &[AgentRole]) -> Vec<u8> {
    const HELLO: u32 = 0;
    raw_frame(&(
        HANDSHAKE_VERSION,
        HELLO,
        1u16,
        1u16,
        "0.1.0",
        "h",
        roles,
        0u64,
    ))
}

fn assert_malformed(frame: &[u8]) {
    match decode_frame(frame, MAX) {
        Err(FrameError::Malformed(postcard::Error::SerdeDeCustom)) => {}
        other => panic!("expected Malformed(SerdeDeCustom), got {other:?}"),
    }
}

#[test]
fn a_frame_claiming_more_elements_than_the_limit_is_malformed() {
    let counters = vec![("", 0); MAX_COUNTERS + 1];
    // The same bytes with one counter fewer are a valid report: only the limit refuses these.
    let (at_limit, _) = decode_frame(&raw_report(&counters[1..]), MAX)
        .unwrap()
        .expect("complete frame");
    let Message::Report(report) = at_limit.message else {
        panic!("not a report: {at_limit:?}")
    };
    assert_eq!(report.counters.len(), MAX_COUNTERS);
    assert_malformed(&raw_report(&counters));

    let roles = [AgentRole::Live, AgentRole::Shadow, AgentRole::Live];
    assert!(decode_frame(&raw_hello(&roles[1..]), MAX).is_ok());
    assert_malformed(&raw_hello(&roles));
}

#[test]
fn a_frame_claiming_more_elements_than_it_holds_is_malformed() {
    let mut frame = raw_report(&[("", 0); 3]);
    // Counters start after the prefix, version, variant, seq, start, interval and histograms.
    let counters_at = LENGTH_PREFIX_LEN + 6;
    assert_eq!(frame[counters_at], 3);
    frame[counters_at] = 100;
    assert!(matches!(
        decode_frame(&frame, MAX),
        Err(FrameError::Malformed(_))
    ));
}

#[test]
fn a_string_over_its_limit_is_malformed() {
    let name = "c".repeat(MAX_NAME_LEN + 1);
    assert!(decode_frame(&raw_report(&[(&name[1..], 0)]), MAX).is_ok());
    assert_malformed(&raw_report(&[(&name, 0)]));
}

#[test]
fn encoding_refuses_a_message_over_a_field_limit() {
    let hello = |roles: Vec<AgentRole>, hostname: String| {
        envelope(Message::Hello(Hello {
            min_version: 1,
            max_version: 1,
            agent_version: String::new(),
            hostname,
            roles,
            next_report_seq: 0,
        }))
    };
    for too_much in [
        hello(vec![AgentRole::Live; MAX_ROLES + 1], String::new()),
        hello(vec![], "h".repeat(MAX_NAME_LEN + 1)),
    ] {
        match encode_frame(&too_much, MAX) {
            Err(FrameError::Malformed(postcard::Error::SerdeSerCustom)) => {}
            other => panic!("expected Malformed(SerdeSerCustom), got {other:?}"),
        }
    }
}

#[test]
fn the_buffer_grows_to_the_frame_and_no_further() {
    let frame = encode_frame(&envelope(largest_policy()), MAX).unwrap();
    let mut decoder = FrameDecoder::new(MAX);
    for piece in frame.chunks(7) {
        decoder.push(piece);
        assert!(decoder.capacity() <= frame.len(), "{}", decoder.capacity());
        // Doubling: what is reserved is at most twice what the peer has sent.
        assert!(decoder.capacity() < 2 * decoder.buffered());
    }
    assert!(decoder.next_envelope().unwrap().is_some());
}
