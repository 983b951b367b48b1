//! Fuzzes the shadow's VXLAN/Ethernet/IP/TCP decoder ([`vxlan::decode`]), which every mirrored
//! datagram goes through before anything else looks at it.
//!
//! The input is one datagram (the UDP payload) as a broken or hostile sender could send it.
//! Whatever the bytes, the target checks that:
//!
//! - nothing panics: a malformed datagram is a counted error, never a crash;
//! - a decoded segment's payload lies inside the datagram (it is borrowed, never invented);
//! - what decodes survives a round trip: the segment rebuilt by [`SegmentBuilder`] from the
//!   decoded fields decodes to the same session, addresses, numbers, flags and payload.

#![no_main]

use doppel_agent::shadow::vxlan::{self, SegmentBuilder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|datagram: &[u8]| {
    let Ok(segment) = vxlan::decode(datagram) else {
        return;
    };
    let inside = datagram.as_ptr_range();
    let payload = segment.payload.as_ptr_range();
    assert!(
        inside.start <= payload.start && payload.end <= inside.end,
        "the payload is borrowed from the datagram"
    );
    let rebuilt = SegmentBuilder {
        vni: segment.vni,
        client: segment.client,
        service: segment.service,
    }
    .datagram(segment.seq, segment.ack, segment.flags, segment.payload);
    let again = vxlan::decode(&rebuilt).expect("a built segment decodes");
    assert_eq!(again.vni, segment.vni);
    assert_eq!(again.client, segment.client);
    assert_eq!(again.service, segment.service);
    assert_eq!((again.seq, again.ack), (segment.seq, segment.ack));
    // The builder always sets ACK, as every mirrored payload segment carries it.
    assert_eq!(again.flags, segment.flags | 0x10);
    assert_eq!(again.payload, segment.payload);
});
