//! Fuzzes the shadow's TCP stream reassembly ([`Reassembler`]) with segments in any order,
//! overlapping, duplicated, far ahead, before the start, across the 32-bit wrap, with FINs,
//! resets, skipped holes and takes in between.
//!
//! The input is a start sequence number, then operations of 5 bytes each. Every segment carries
//! the bytes a consistent sender would send at its sequence numbers (byte = a function of its
//! sequence number), so whatever the order, the target checks that:
//!
//! - nothing panics; a refused segment is one of the documented errors;
//! - the bytes handed out are the sender's bytes at their offsets, in stream order, without gaps
//!   except the ones [`Reassembler::skip_hole`] reported, by exactly the bytes it reported;
//! - the buffer never holds more than its limit.

#![no_main]

use doppel_agent::shadow::reassembly::{Reassembler, ReassemblyLimits};
use libfuzzer_sys::fuzz_target;

/// The byte a consistent sender sends at sequence number `seq`.
fn byte_at(seq: u32) -> u8 {
    (seq.wrapping_mul(2_654_435_761) >> 24) as u8
}

const LIMITS: ReassemblyLimits = ReassemblyLimits {
    max_buffered: 4096,
    max_ahead: 8192,
};

fuzz_target!(|input: &[u8]| {
    let Some((start, ops)) = input.split_first_chunk::<4>() else {
        return;
    };
    let first_seq = u32::from_le_bytes(*start);
    let mut flow: Reassembler<()> = Reassembler::new(first_seq, LIMITS);
    // The stream offset the next handed-out byte must have.
    let mut expect_offset = 0u64;
    for op in ops.chunks_exact(5) {
        let delta = i16::from_le_bytes([op[0], op[1]]);
        let len = usize::from(op[2]) * usize::from(op[3] % 8 + 1);
        match op[4] % 8 {
            // Mostly segments; now and then a take, a skipped hole or a reset.
            0..=4 => {
                let seq = first_seq.wrapping_add_signed(i32::from(delta) * 8);
                let payload: Vec<u8> = (0..len as u32)
                    .map(|i| byte_at(seq.wrapping_add(i)))
                    .collect();
                let _ = flow.insert(seq, &payload, op[4] & 0x80 != 0, ());
            }
            5 => {
                let skipped = flow.skip_hole();
                let chunks = flow.take();
                check(&flow, &chunks, &mut expect_offset, skipped);
            }
            6 => {
                let chunks = flow.take();
                check(&flow, &chunks, &mut expect_offset, 0);
            }
            _ => flow.reset(),
        }
        assert!(
            flow.buffered() <= LIMITS.max_buffered,
            "{} bytes held over the limit",
            flow.buffered()
        );
    }
});

/// The chunks taken are the sender's bytes, contiguous from `expect_offset` except for one gap
/// of `skipped` bytes.
fn check(
    flow: &Reassembler<()>,
    chunks: &[doppel_agent::shadow::reassembly::Chunk<()>],
    expect_offset: &mut u64,
    skipped: u64,
) {
    let (isn, _) = flow.seq_span();
    let mut gap = skipped;
    for chunk in chunks {
        if chunk.offset != *expect_offset {
            assert_eq!(chunk.offset, *expect_offset + gap, "an unreported gap");
            gap = 0;
        }
        for (i, &b) in chunk.data.iter().enumerate() {
            let seq = isn.wrapping_add((chunk.offset + i as u64) as u32);
            assert_eq!(
                b,
                byte_at(seq),
                "byte {} of the stream",
                chunk.offset + i as u64
            );
        }
        *expect_offset = chunk.offset + chunk.data.len() as u64;
    }
    if gap > 0 && gap == skipped {
        // The hole was skipped but nothing followed it yet: the next bytes start past it.
        *expect_offset += gap;
    }
    assert_eq!(
        flow.contiguous_len(),
        *expect_offset,
        "handed out up to the next missing byte"
    );
}
