//! Latency histograms on the wire, in HdrHistogram's V2 format.
//!
//! V2 is the format every HdrHistogram implementation reads, so a report can be inspected with
//! standard tools. Decoding is where a hostile or corrupt report could make us allocate: the
//! header's bounds decide the size of the counts array, so they are checked before the
//! `hdrhistogram` deserializer sees them, and only the uncompressed V2 cookie is accepted (the
//! deflate variant would allow a small frame to inflate without limit).

use std::vec::Vec;

use hdrhistogram::{
    Histogram,
    serialization::{Deserializer, Serializer as _, V2Serializer},
};
#[cfg(test)]
use proptest_derive::Arbitrary;
use serde::{Deserialize, Serialize};

/// Cookie of an uncompressed V2 histogram (base cookie `0x1c849303` with the word-size bits `0x10`).
const V2_COOKIE: u32 = 0x1c84_9313;
/// Length of the V2 header: cookie, payload length, normalizing offset, significant digits
/// (4 bytes each), lowest and highest trackable value, conversion ratio (8 bytes each).
const V2_HEADER_LEN: usize = 40;
/// Most significant digits accepted (3 gives 0.1 % resolution, more than any consumer needs).
pub const MAX_SIGNIFICANT_DIGITS: u32 = 3;

/// A histogram serialized in HdrHistogram's uncompressed V2 format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(Arbitrary))]
pub struct EncodedHistogram(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// Why a histogram could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum HistogramError {
    /// Shorter than the V2 header.
    #[error("histogram is {len} bytes, shorter than the {V2_HEADER_LEN}-byte V2 header")]
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// Not an uncompressed V2 histogram.
    #[error("histogram cookie {cookie:#010x} is not uncompressed V2 ({V2_COOKIE:#010x})")]
    BadCookie {
        /// Cookie found.
        cookie: u32,
    },
    /// Header bounds that would need an unreasonable counts array.
    #[error(
        "histogram bounds out of range: lowest {lowest}, highest {highest}, {digits} significant digits"
    )]
    BadBounds {
        /// Lowest discernible value.
        lowest: u64,
        /// Highest trackable value.
        highest: u64,
        /// Significant digits.
        digits: u32,
    },
    /// The `hdrhistogram` deserializer refused the bytes.
    #[error("malformed V2 histogram")]
    Decode(#[source] hdrhistogram::serialization::DeserializeError),
    /// The `hdrhistogram` serializer failed.
    #[error("could not serialize histogram")]
    Encode(#[source] hdrhistogram::serialization::V2SerializeError),
}

impl EncodedHistogram {
    /// Serializes `histogram` in V2 format.
    pub fn encode(histogram: &Histogram<u64>) -> Result<Self, HistogramError> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(histogram, &mut bytes)
            .map_err(HistogramError::Encode)?;
        Ok(Self(bytes))
    }

    /// Checks the header, then deserializes.
    pub fn decode(&self) -> Result<Histogram<u64>, HistogramError> {
        self.check_header()?;
        Deserializer::new()
            .deserialize(&mut self.0.as_slice())
            .map_err(HistogramError::Decode)
    }

    fn check_header(&self) -> Result<(), HistogramError> {
        let bytes = &self.0;
        let header = bytes
            .get(..V2_HEADER_LEN)
            .ok_or(HistogramError::Truncated { len: bytes.len() })?;
        let be_u32 = |at: usize| {
            let mut raw = [0; 4];
            raw.copy_from_slice(&header[at..at + 4]);
            u32::from_be_bytes(raw)
        };
        let be_u64 = |at: usize| {
            let mut raw = [0; 8];
            raw.copy_from_slice(&header[at..at + 8]);
            u64::from_be_bytes(raw)
        };
        let cookie = be_u32(0);
        if cookie != V2_COOKIE {
            return Err(HistogramError::BadCookie { cookie });
        }
        let digits = be_u32(12);
        let lowest = be_u64(16);
        let highest = be_u64(24);
        // The counts array grows with log2(highest / lowest) * 10^digits; these bounds keep it
        // under about 1 MiB whatever the header says.
        let sane = (1..=MAX_SIGNIFICANT_DIGITS).contains(&digits)
            && lowest >= 1
            && highest >= lowest.saturating_mul(2)
            && highest <= u64::MAX / 4;
        if sane {
            Ok(())
        } else {
            Err(HistogramError::BadBounds {
                lowest,
                highest,
                digits,
            })
        }
    }
}
