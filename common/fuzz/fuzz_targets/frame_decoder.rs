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
//! - the decoder never holds more than an incomplete frame at the limit plus one chunk;
//! - no single allocation made while decoding is larger than the frame limit allows (see
//!   [`ALLOC_BOUND`]). The limit exists so that a peer cannot make us allocate more than we
//!   agreed to receive; a global allocator wrapper records the largest request to check it.
//!
//! The limit is deliberately small (1 KiB): libFuzzer's inputs are 4 KiB at most by default, so
//! it must sit well below that for frames over the limit, and buffers near it, to be reached.

#![no_main]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering},
};

use doppel_common::wire::{
    Envelope, FrameDecoder, FrameError, decode_frame, frame::LENGTH_PREFIX_LEN,
};
use libfuzzer_sys::fuzz_target;

/// Largest payload the decoder under test accepts.
const LIMIT: usize = 1024;
/// Largest chunk pushed at once.
const MAX_CHUNK: usize = 64;
/// Most bytes the decoder may hold: after a drain at most an incomplete frame (prefix plus
/// `LIMIT - 1` payload bytes), then the next chunk is appended before the next drain.
const MAX_BUFFERED: usize = LENGTH_PREFIX_LEN + LIMIT - 1 + MAX_CHUNK;
/// Largest single allocation decoding may request. The decoder's buffer is a `Vec` that grows
/// amortized: when a push overflows its capacity the capacity becomes `max(2 * capacity,
/// needed)`, and it only grows while `capacity < needed <= MAX_BUFFERED`, so its allocations
/// stay below `2 * MAX_BUFFERED` even though it never holds more than `MAX_BUFFERED` bytes.
/// Strings and byte strings decoded out of a payload are copies of at most `LIMIT` bytes, so
/// they fit too. Vectors of structs do not, whatever the bound's constant factor: serde's
/// `Vec` visitor preallocates `claimed length * size_of::<T>()` (postcard only checks the
/// claimed length against the bytes left, serde caps it at 1 MiB), and even an honest vector
/// takes up to 16 times its wire size (a 2-byte `Counter` is 32 bytes in memory). Those
/// failures are real findings about the `frame` module's memory claim, so the bound stays.
const ALLOC_BOUND: usize = 2 * MAX_BUFFERED;

/// Largest size requested from the allocator since the last reset.
static LARGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

/// [`System`], recording the size of every allocation and reallocation request.
struct TrackingAlloc;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so it upholds
// `GlobalAlloc`'s contract exactly as `System` does; the bookkeeping neither allocates nor panics.
unsafe impl GlobalAlloc for TrackingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded as is; `ptr` came from `System` through this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAlloc = TrackingAlloc;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, stream)) = data.split_first() else {
        return;
    };
    let chunk_len = usize::from(selector) % MAX_CHUNK + 1;

    // libFuzzer runs inputs one at a time on one thread, so everything recorded between the
    // reset and the load is this input's decoding.
    LARGEST_ALLOC.store(0, Ordering::Relaxed);
    decode(stream, chunk_len);
    let largest = LARGEST_ALLOC.load(Ordering::Relaxed);
    assert!(
        largest <= ALLOC_BOUND,
        "decoding made a {largest}-byte allocation, above the {ALLOC_BOUND}-byte bound for a \
         {LIMIT}-byte frame limit"
    );
});

/// Pushes `stream` to a decoder `chunk_len` bytes at a time, checking everything it yields
/// against [`decode_frame`] on the whole stream.
fn decode(stream: &[u8], chunk_len: usize) {
    let mut decoder = FrameDecoder::new(LIMIT);
    let mut reference = Reference { rest: stream };
    for chunk in stream.chunks(chunk_len) {
        decoder.push(chunk);
        loop {
            match decoder.next_envelope() {
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
