//! Reassembly of one mirrored flow's client byte stream from TCP segments.
//!
//! Sans-IO: segments go in with their sequence number and whatever the caller wants to keep
//! about them (arrival time, acknowledgement number), contiguous bytes come out in stream order.
//! Nothing here knows about sockets or clocks.
//!
//! The live data path mirrors a flow from its first payload packet on (the SYN is never mirrored,
//! see `agent-ebpf`), so the stream's start is the lowest sequence number seen before any byte was
//! handed out. A segment that starts before that point once bytes have been handed out means the
//! stream's beginning was lost: the flow cannot be replayed without a hole, so that is an error,
//! not something to paper over.
//!
//! Overlapping data (retransmits, repacketised retransmits) is resolved first-come-first-kept:
//! bytes already buffered or delivered are never replaced, so a retransmit can only fill holes.
//! TCP requires a retransmit to carry the same bytes (RFC 9293 §3.10.7.4), so the choice only
//! matters for a broken or hostile sender, and keeping the first copy makes the result
//! independent of how many duplicates follow.

use std::collections::BTreeMap;

/// Limits of one flow's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Most bytes held at once (out-of-order segments plus contiguous bytes not yet taken).
    pub max_buffered: usize,
    /// Segments further than this beyond the next expected byte are refused: no sender with a
    /// sane window sends them, and accepting them would let one packet pin the buffer.
    pub max_ahead: u64,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        Self {
            max_buffered: 1 << 20,
            max_ahead: 4 << 20,
        }
    }
}

/// Why a segment could not be taken. Every one of these ends the flow's replay: the stream can
/// no longer be rebuilt without a hole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReassemblyError {
    /// Data before the stream's start arrived after bytes were handed out.
    #[error("data before the stream's first byte arrived after replay began")]
    StartMissed,
    /// Holding the segment would exceed the flow's buffer limit.
    #[error("the flow's reassembly buffer is full ({limit} bytes)")]
    BufferFull {
        /// The limit that was hit.
        limit: usize,
    },
    /// The segment lies implausibly far beyond the next expected byte.
    #[error("segment {ahead} bytes beyond the next expected byte")]
    TooFarAhead {
        /// Distance from the next expected byte.
        ahead: u64,
    },
}

/// Contiguous stream bytes ready for the replayer, with the metadata of the segment that carried
/// them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk<M> {
    /// Offset of the first byte in the stream (0 = first client payload byte).
    pub offset: u64,
    /// The bytes.
    pub data: Vec<u8>,
    /// What the caller attached to the segment.
    pub meta: M,
}

/// What a segment did to the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Inserted {
    /// New bytes buffered (0 for a pure duplicate).
    pub new_bytes: usize,
    /// Bytes of the segment that were already held or delivered.
    pub duplicate_bytes: usize,
}

/// One direction of one TCP flow, being put back together.
#[derive(Debug)]
pub struct Reassembler<M> {
    limits: ReassemblyLimits,
    /// Sequence number of stream offset 0.
    isn: u32,
    /// Offset of the next byte not yet contiguous (everything below is in `ready` or taken).
    next: u64,
    /// Offset up to which bytes were handed out by [`Reassembler::take`].
    taken: u64,
    /// Contiguous, not yet taken.
    ready: Vec<Chunk<M>>,
    /// Out of order, by offset, never overlapping each other or `[0, next)`.
    pending: BTreeMap<u64, (Vec<u8>, M)>,
    buffered: usize,
    /// Offset of the FIN, once seen.
    fin: Option<u64>,
    reset: bool,
}

impl<M: Copy> Reassembler<M> {
    /// A stream whose first segment seen carries sequence number `first_seq`.
    pub fn new(first_seq: u32, limits: ReassemblyLimits) -> Self {
        Self {
            limits,
            isn: first_seq,
            next: 0,
            taken: 0,
            ready: Vec::new(),
            pending: BTreeMap::new(),
            buffered: 0,
            fin: None,
            reset: false,
        }
    }

    /// Stream offset of `seq`, unwrapped around the next expected byte: sequence numbers are
    /// 32-bit and wrap, offsets are 64-bit and do not. A result below zero is before the start.
    fn offset_of(&self, seq: u32) -> i64 {
        let next_seq = self.isn.wrapping_add(self.next as u32);
        let delta = seq.wrapping_sub(next_seq).cast_signed();
        self.next as i64 + i64::from(delta)
    }

    /// Takes one segment: `payload` starting at `seq`, with `fin` if the segment carries FIN.
    pub fn insert(
        &mut self,
        seq: u32,
        payload: &[u8],
        fin: bool,
        meta: M,
    ) -> Result<Inserted, ReassemblyError> {
        let mut seg_start = self.offset_of(seq);
        if seg_start < 0 && !payload.is_empty() {
            if self.taken > 0 {
                return Err(ReassemblyError::StartMissed);
            }
            let by = seg_start.unsigned_abs();
            if by > self.limits.max_ahead {
                return Err(ReassemblyError::TooFarAhead { ahead: by });
            }
            // Reordered ahead of the true first segment: nothing was handed out yet, so the
            // start can still move back.
            self.rebase(by);
            self.isn = seq;
            seg_start = 0;
        }
        let seg_end = seg_start + payload.len() as i64;
        if fin {
            self.fin.get_or_insert(seg_end.max(0) as u64);
        }
        let mut outcome = Inserted::default();
        if payload.is_empty() {
            return Ok(outcome);
        }
        let (start, end) = (seg_start as u64, seg_end as u64);
        if end <= self.next {
            outcome.duplicate_bytes = payload.len();
            return Ok(outcome);
        }
        let ahead = start.saturating_sub(self.next);
        if ahead > self.limits.max_ahead {
            return Err(ReassemblyError::TooFarAhead { ahead });
        }
        // The parts of [start, end) not held yet: below `next` everything is held, above it the
        // pending segments the new one overlaps.
        let mut pieces: Vec<(u64, u64)> = Vec::new();
        let mut cursor = start.max(self.next);
        let before = self
            .pending
            .range(..cursor)
            .next_back()
            .map(|(s, (d, _))| (*s, *s + d.len() as u64));
        let within = self
            .pending
            .range(cursor..end)
            .map(|(s, (d, _))| (*s, *s + d.len() as u64));
        for (s, e) in before.into_iter().chain(within) {
            if s > cursor {
                pieces.push((cursor, s.min(end)));
            }
            cursor = cursor.max(e);
            if cursor >= end {
                break;
            }
        }
        if cursor < end {
            pieces.push((cursor, end));
        }
        let new_bytes = pieces.iter().map(|(s, e)| e - s).sum::<u64>() as usize;
        if self.buffered + new_bytes > self.limits.max_buffered {
            return Err(ReassemblyError::BufferFull {
                limit: self.limits.max_buffered,
            });
        }
        for (s, e) in pieces {
            let data = payload[(s - start) as usize..(e - start) as usize].to_vec();
            self.pending.insert(s, (data, meta));
        }
        self.buffered += new_bytes;
        outcome.new_bytes = new_bytes;
        outcome.duplicate_bytes = payload.len() - new_bytes;
        self.advance();
        Ok(outcome)
    }

    /// Shifts every held offset up by `by` (the start moved back by that much).
    fn rebase(&mut self, by: u64) {
        self.pending = std::mem::take(&mut self.pending)
            .into_iter()
            .map(|(s, v)| (s + by, v))
            .collect();
        for chunk in &mut self.ready {
            chunk.offset += by;
        }
        // Bytes that were contiguous from the old start are no longer contiguous from the new
        // one: put them back among the pending segments.
        for chunk in self.ready.drain(..) {
            self.pending.insert(chunk.offset, (chunk.data, chunk.meta));
        }
        self.next = 0;
        if let Some(fin) = &mut self.fin {
            *fin += by;
        }
    }

    /// Moves pending segments that became contiguous to `ready`.
    fn advance(&mut self) {
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let (offset, (data, meta)) = entry.remove_entry();
            self.next += data.len() as u64;
            self.ready.push(Chunk { offset, data, meta });
        }
    }

    /// Gives up the first hole for good: the stream continues at the next byte held (or at the
    /// FIN). Returns the bytes skipped, 0 when there is no hole. A lost mirror copy is never
    /// sent again, so after a while waiting only delays what follows it.
    pub fn skip_hole(&mut self) -> u64 {
        let resume = match (self.pending.first_key_value(), self.fin) {
            (Some((&start, _)), _) => start,
            (None, Some(fin)) if fin > self.next => fin,
            _ => return 0,
        };
        let skipped = resume - self.next;
        self.next = resume;
        self.advance();
        skipped
    }

    /// Marks the flow reset by the client (RST): what is contiguous is still worth replaying.
    pub fn reset(&mut self) {
        self.reset = true;
    }

    /// Hands out the contiguous bytes gathered since the last call, in stream order.
    pub fn take(&mut self) -> Vec<Chunk<M>> {
        let chunks = std::mem::take(&mut self.ready);
        let bytes: usize = chunks.iter().map(|c| c.data.len()).sum();
        self.buffered -= bytes;
        self.taken = self.next;
        chunks
    }

    /// Bytes held (pending plus ready).
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Whether a hole separates the contiguous bytes from later ones.
    pub fn has_gap(&self) -> bool {
        !self.pending.is_empty() || self.fin.is_some_and(|fin| fin > self.next)
    }

    /// Whether the whole stream up to the FIN has become contiguous.
    pub fn finished(&self) -> bool {
        self.fin.is_some_and(|fin| fin <= self.next)
    }

    /// Whether the client reset the flow.
    pub fn was_reset(&self) -> bool {
        self.reset
    }

    /// Stream length up to the next missing byte.
    pub fn contiguous_len(&self) -> u64 {
        self.next
    }

    /// The sequence numbers the stream covered: its first byte's and the length up to the last
    /// byte (or FIN) seen, holes included. A segment inside this span after the flow ended is a
    /// late copy of it; one outside starts a new connection on the same 4-tuple.
    pub fn seq_span(&self) -> (u32, u64) {
        let pending_end = self
            .pending
            .last_key_value()
            .map_or(0, |(at, (bytes, _))| at + bytes.len() as u64);
        let end = self
            .next
            .max(pending_end)
            .max(self.fin.map_or(0, |fin| fin + 1));
        (self.isn, end)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn collect(r: &mut Reassembler<u32>) -> Vec<u8> {
        r.take().into_iter().flat_map(|c| c.data).collect()
    }

    #[test]
    fn in_order_segments_come_out_as_they_went_in() {
        let mut r = Reassembler::new(1000, ReassemblyLimits::default());
        r.insert(1000, b"GET / ", false, 1).unwrap();
        r.insert(1006, b"HTTP/1.1\r\n", true, 2).unwrap();
        let chunks = r.take();
        assert_eq!(chunks[0].meta, 1);
        assert_eq!(chunks[1].offset, 6);
        assert!(r.finished());
    }

    #[test]
    fn a_hole_holds_back_what_follows_it_until_filled() {
        let mut r = Reassembler::new(0, ReassemblyLimits::default());
        r.insert(0, b"ab", false, 0).unwrap();
        r.insert(4, b"ef", true, 0).unwrap();
        assert_eq!(collect(&mut r), b"ab");
        assert!(r.has_gap());
        assert!(!r.finished());
        r.insert(2, b"cd", false, 0).unwrap();
        assert_eq!(collect(&mut r), b"cdef");
        assert!(r.finished() && !r.has_gap());
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn the_sequence_span_covers_holes_and_the_fin() {
        let mut r = Reassembler::new(1000, ReassemblyLimits::default());
        r.insert(1000, b"ab", false, 0).unwrap();
        assert_eq!(r.seq_span(), (1000, 2));
        // Bytes after a hole and a FIN after them: the span reaches the FIN.
        r.insert(1010, b"xyz", true, 0).unwrap();
        assert_eq!(r.seq_span(), (1000, 14));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut r = Reassembler::new(u32::MAX - 1, ReassemblyLimits::default());
        r.insert(0, b"cd", false, 0).unwrap();
        r.insert(u32::MAX - 1, b"ab", false, 0).unwrap();
        assert_eq!(collect(&mut r), b"abcd");
    }

    #[test]
    fn data_before_the_start_after_replay_began_is_refused() {
        let mut r = Reassembler::new(100, ReassemblyLimits::default());
        r.insert(100, b"xy", false, 0).unwrap();
        collect(&mut r);
        assert_eq!(
            r.insert(90, b"0123456789", false, 0),
            Err(ReassemblyError::StartMissed)
        );
        // A retransmit of delivered bytes is only a duplicate.
        assert_eq!(r.insert(100, b"xy", false, 0).unwrap().duplicate_bytes, 2);
    }

    #[test]
    fn a_skipped_hole_resumes_at_the_next_byte_held() {
        let mut r = Reassembler::new(0, ReassemblyLimits::default());
        r.insert(0, b"ab", false, 0).unwrap();
        r.insert(5, b"fg", false, 0).unwrap();
        r.insert(9, b"j", true, 0).unwrap();
        assert_eq!(collect(&mut r), b"ab");
        assert_eq!(r.skip_hole(), 3);
        assert_eq!(collect(&mut r), b"fg");
        assert_eq!(r.skip_hole(), 2);
        assert_eq!(collect(&mut r), b"j");
        assert!(r.finished() && !r.has_gap());
        assert_eq!(r.skip_hole(), 0);
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn the_buffer_limit_holds() {
        let limits = ReassemblyLimits {
            max_buffered: 8,
            max_ahead: 100,
        };
        let mut r = Reassembler::new(0, limits);
        r.insert(10, b"12345678", false, 0).unwrap();
        assert_eq!(
            r.insert(30, b"x", false, 0),
            Err(ReassemblyError::BufferFull { limit: 8 })
        );
        assert!(matches!(
            r.insert(500, b"x", false, 0),
            Err(ReassemblyError::TooFarAhead { .. })
        ));
    }

    /// A stream, its ISN, its segments (offset, len), and an arrival order of their indices.
    type Delivery = (Vec<u8>, u32, Vec<(usize, usize)>, Vec<usize>);

    /// A stream, and how the network delivered it: segments (offset, len) in arrival order.
    fn delivery() -> impl Strategy<Value = Delivery> {
        (1usize..3000, any::<u32>()).prop_flat_map(|(len, isn)| {
            let data = proptest::collection::vec(any::<u8>(), len);
            // Segment boundaries, then retransmits that cover arbitrary (overlapping) ranges.
            let cuts = proptest::collection::vec(1usize..len.max(2), 0..20);
            let extra = proptest::collection::vec((0..len, 1usize..400), 0..10);
            (data, Just(isn), cuts, extra).prop_flat_map(|(data, isn, mut cuts, extra)| {
                let len = data.len();
                cuts.push(0);
                cuts.push(len);
                cuts.sort_unstable();
                cuts.dedup();
                let mut segments: Vec<(usize, usize)> =
                    cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
                for (start, l) in extra {
                    segments.push((start, l.min(len - start)));
                }
                let n = segments.len();
                (
                    Just(data),
                    Just(isn),
                    Just(segments),
                    Just((0..n).collect::<Vec<_>>()).prop_shuffle(),
                )
            })
        })
    }

    proptest! {
        /// Shuffled, duplicated and overlapping segments rebuild exactly the original stream,
        /// whether the reader takes bytes as they come or at the end.
        #[test]
        fn any_delivery_of_every_byte_rebuilds_the_stream(
            (data, isn, segments, order) in delivery(),
            take_early in any::<bool>(),
        ) {
            // The first payload segment is the one the live side mirrors first.
            let first = order.iter().position(|&i| segments[i].0 == 0).unwrap();
            let mut arrival = vec![order[first]];
            arrival.extend(order.iter().enumerate().filter(|(k, _)| *k != first).map(|(_, i)| *i));
            let mut r = Reassembler::new(isn, ReassemblyLimits::default());
            let mut out = Vec::new();
            for (k, &i) in arrival.iter().enumerate() {
                let (start, len) = segments[i];
                let fin = start + len == data.len();
                r.insert(isn.wrapping_add(start as u32), &data[start..start + len], fin, k as u32)
                    .unwrap();
                if take_early {
                    for chunk in r.take() {
                        prop_assert_eq!(chunk.offset, out.len() as u64);
                        out.extend(chunk.data);
                    }
                }
            }
            out.extend(r.take().into_iter().flat_map(|c| c.data));
            prop_assert_eq!(&out, &data);
            prop_assert!(r.finished());
            prop_assert_eq!(r.buffered(), 0);
        }

        /// Before anything is taken, even the first segment may arrive late: the start moves back.
        #[test]
        fn a_late_first_segment_is_accepted_until_bytes_are_taken(
            (data, isn, segments, order) in delivery(),
        ) {
            let mut r = Reassembler::new(isn.wrapping_add(segments[order[0]].0 as u32), ReassemblyLimits::default());
            for &i in &order {
                let (start, len) = segments[i];
                r.insert(isn.wrapping_add(start as u32), &data[start..start + len], false, 0).unwrap();
            }
            let out: Vec<u8> = r.take().into_iter().flat_map(|c| c.data).collect();
            prop_assert_eq!(out, data);
        }

        /// A segment that never arrives leaves a hole: nothing after it is ever handed out, and
        /// everything before it is, exactly.
        #[test]
        fn a_dropped_segment_is_never_replayed_across(
            (data, isn, segments, order) in delivery(),
            drop_pick in any::<prop::sample::Index>(),
        ) {
            // Drop every copy of one byte position (all segments covering it).
            let hole = drop_pick.index(data.len());
            prop_assume!(hole > 0);
            let first = order.iter().copied().find(|&i| segments[i].0 == 0).unwrap();
            prop_assume!(segments[first].1 <= hole);
            let mut r = Reassembler::new(isn, ReassemblyLimits::default());
            let covers = |i: usize| segments[i].0 <= hole && hole < segments[i].0 + segments[i].1;
            let mut out = Vec::new();
            for &i in std::iter::once(&first).chain(order.iter().filter(|&&i| i != first)) {
                if covers(i) { continue; }
                let (start, len) = segments[i];
                r.insert(isn.wrapping_add(start as u32), &data[start..start + len], start + len == data.len(), 0).unwrap();
                out.extend(r.take().into_iter().flat_map(|c| c.data));
            }
            // Everything up to the first byte no delivered segment covers comes out, nothing more.
            let mut covered = vec![false; data.len()];
            for (i, &(start, len)) in segments.iter().enumerate() {
                if !covers(i) {
                    covered[start..start + len].iter_mut().for_each(|c| *c = true);
                }
            }
            let first_missing = covered.iter().position(|c| !c).unwrap();
            prop_assert!(first_missing <= hole);
            prop_assert_eq!(&out[..], &data[..first_missing]);
            prop_assert!(!r.finished());
        }
    }
}
