//! Fuzzes the wire-protocol frame decoder: [`FrameDecoder`] and [`decode_frame`].
//!
//! The input stands for the bytes a hostile or broken peer sends. Its first byte picks the size
//! (1..=64) of the chunks the rest is pushed to a [`FrameDecoder`] in, the way socket reads would
//! split it; after every push the decoder is drained until it wants more bytes or fails, and
//! after a failure the stream is abandoned, as the agent and the coordinator do. Whatever the
//! bytes, the target checks that:
//!
//! - nothing panics;
//! - chunking changes nothing: the decoder yields exactly the envelopes [`decode_frame`] finds
//!   when walked frame by frame over the whole stream, and fails where and as it fails;
//! - the decoder never holds more than an incomplete frame after draining, and its buffer's
//!   capacity (which the allocator confirms) stays below a frame at the limit plus one chunk;
//! - decoding allocates no more than the `frame` module promises: the peak of live heap bytes
//!   while one frame is decoded is at most its payload length plus [`MAX_DECODED_OVERHEAD`],
//!   hence at most the frame limit plus the input's size. A global allocator wrapper keeps the
//!   live byte count and its peak.
//!
//! The limit is [`DEFAULT_MAX_FRAME_LEN`], the one the agent and the coordinator use: the bound
//! only holds for limits above `MAX_DECODED_OVERHEAD`. Frames over the limit take just a length
//! prefix to reach; frames near it need inputs of 4 MiB, so run with a large `-max_len`
//! (`cargo +nightly fuzz run frame_decoder -- -max_len=65536` reaches every collection limit).

#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use doppel_common::wire::{
    DEFAULT_MAX_FRAME_LEN, Envelope, FrameDecoder, FrameError, MAX_DECODED_OVERHEAD, decode_frame,
    frame::{LENGTH_PREFIX_LEN, payload_len},
};
use libfuzzer_sys::fuzz_target;

/// Largest payload the decoder under test accepts.
const LIMIT: usize = DEFAULT_MAX_FRAME_LEN;
/// Largest chunk pushed at once.
const MAX_CHUNK: usize = 64;

const _: () = assert!(
    MAX_DECODED_OVERHEAD <= LIMIT,
    "the frame limit must cover the decoded overhead for `payload + overhead <= input + limit`"
);

/// Heap bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Highest value of `LIVE` since the last reset.
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrank(by: usize) {
    LIVE.fetch_sub(by, Ordering::Relaxed);
}

/// [`System`], counting the bytes it has handed out and not taken back.
struct TrackingAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it upholds
// `GlobalAlloc`'s contract exactly as `System` does; the bookkeeping neither allocates nor panics.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        // On failure the old block is still live: nothing changed.
        if !new.is_null() {
            match new_size.checked_sub(layout.size()) {
                Some(more) => grew(more),
                None => shrank(layout.size() - new_size),
            }
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAlloc = TrackingAlloc;

/// Runs `f`, returning its result and the most heap bytes live at once during the call beyond
/// those live before it. libFuzzer runs inputs one at a time on one thread, so that is `f`'s.
fn peak_growth<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = f();
    (result, PEAK.load(Ordering::Relaxed) - before)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let chunk_len = usize::from(selector) % MAX_CHUNK + 1;
    decode(stream, chunk_len);
});

/// Pushes `stream` to a decoder `chunk_len` bytes at a time, checking everything it yields
/// against [`decode_frame`] on the whole stream, and what it allocates against the bounds.
fn decode(stream: &[u8], chunk_len: usize) {
    let mut decoder = FrameDecoder::new(LIMIT);
    let mut reference = Reference { rest: stream };
    for chunk in stream.chunks(chunk_len) {
        let capacity = decoder.capacity();
        let ((), pushed) = peak_growth(|| decoder.push(chunk));
        assert_eq!(
            pushed,
            decoder.capacity() - capacity,
            "push allocated {pushed} bytes, but the buffer grew from {capacity} to {}",
            decoder.capacity()
        );
        assert!(
            decoder.capacity() < LENGTH_PREFIX_LEN + LIMIT + chunk_len,
            "buffer capacity {} exceeds a frame at the limit plus a {chunk_len}-byte chunk",
            decoder.capacity()
        );
        loop {
            // The payload of the frame the decoder is on, once its prefix is in.
            let payload = match payload_len(reference.rest, LIMIT) {
                Ok(Some(len)) => len,
                _ => 0,
            };
            let (next, decoded) = peak_growth(|| decoder.next_envelope());
            assert!(
                decoded <= payload + MAX_DECODED_OVERHEAD,
                "decoding a {payload}-byte payload took {decoded} bytes of heap at its peak, \
                 above the payload plus {MAX_DECODED_OVERHEAD} bytes (input {} bytes, limit \
                 {LIMIT})",
                stream.len()
            );
            match next {
                Ok(Some(envelope)) => reference.expect_envelope(&envelope),
                Ok(None) => break,
                Err(error) => {
                    reference.expect_error(&error);
                    return;
                }
            }
        }
        assert!(
            decoder.buffered() < LENGTH_PREFIX_LEN + LIMIT,
            "decoder holds {} bytes after draining, more than an incomplete frame",
            decoder.buffered()
        );
    }
    reference.expect_end();
}

/// [`decode_frame`] walked over the whole stream, one frame at a time.
struct Reference<'a> {
    /// The stream from the first frame the decoder has not yielded yet.
    rest: &'a [u8],
}

impl Reference<'_> {
    fn expect_envelope(&mut self, got: &Envelope) {
        match decode_frame(self.rest, LIMIT) {
            Ok(Some((envelope, used))) => {
                assert_eq!(&envelope, got, "decoder and decode_frame disagree");
                self.rest = &self.rest[used..];
            }
            other => panic!("decoder yielded {got:?}, decode_frame on the stream gives {other:?}"),
        }
    }

    fn expect_error(&self, got: &FrameError) {
        match decode_frame(self.rest, LIMIT) {
            Err(error) if same_error(&error, got) => {}
            other => {
                panic!("decoder failed with {got:?}, decode_frame on the stream gives {other:?}")
            }
        }
    }

    fn expect_end(&self) {
        match decode_frame(self.rest, LIMIT) {
            Ok(None) => {}
            other => panic!("decoder wants more bytes, decode_frame on the stream gives {other:?}"),
        }
    }
}

/// `FrameError` is not `PartialEq` (nor need it be outside this target).
fn same_error(a: &FrameError, b: &FrameError) -> bool {
    use FrameError::{Malformed, TooLarge, TrailingBytes, UnsupportedVersion};
    match (a, b) {
        (TooLarge { len: a, max: c }, TooLarge { len: b, max: d }) => a == b && c == d,
        (UnsupportedVersion { version: a, .. }, UnsupportedVersion { version: b, .. }) => a == b,
        (Malformed(a), Malformed(b)) => a == b,
        (TrailingBytes { count: a }, TrailingBytes { count: b }) => a == b,
        _ => false,
    }
}
