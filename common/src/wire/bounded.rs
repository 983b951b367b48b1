//! Serde adapters that put a length limit on a field, on both sides of the wire.
//!
//! serde's own `Vec<T>` impl trusts the length a peer claims: it preallocates
//! `min(claimed, 1 MiB / size_of::<T>())` elements, and postcard only checks that the claim is
//! not larger than the bytes left in the payload. So a 4 MiB frame could make the decoder grow
//! vectors several times its size. These adapters refuse anything over the field's limit before
//! allocating for it, and preallocate at most the limit, so the heap of a decoded message is
//! bounded by the limits in [`messages`](super::messages) (see [`super::MAX_DECODED_OVERHEAD`]).
//!
//! Use them with `#[serde(with = "MaxItems::<LIMIT>")]` on a `Vec<T>`, `MaxStr` on a `String`
//! and `MaxBytes` on a `Vec<u8>` sent as one byte string (what `serde_bytes` does). The encoding
//! is the one serde would produce without the adapter; encoding a value over its limit fails
//! too, so a sender learns of the problem rather than its peer. postcard drops the text of
//! custom errors (it allocates nothing for them), so either side sees only
//! `SerdeSerCustom`/`SerdeDeCustom`; the limits are public so a sender can check before sending.

use core::{fmt, marker::PhantomData};
use std::{string::String, vec::Vec};

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, Expected, SeqAccess, Visitor},
    ser,
};

/// A `Vec<T>` of at most `MAX` elements.
#[derive(Debug)]
pub(super) struct MaxItems<const MAX: usize>;

/// A `String` of at most `MAX` bytes of UTF-8.
#[derive(Debug)]
pub(super) struct MaxStr<const MAX: usize>;

/// A `Vec<u8>` of at most `MAX` bytes, encoded as a byte string.
#[derive(Debug)]
pub(super) struct MaxBytes<const MAX: usize>;

impl<const MAX: usize> MaxItems<MAX> {
    pub(super) fn serialize<S, T>(items: &[T], serializer: S) -> Result<S::Ok, S::Error>
    where
        S: Serializer,
        T: Serialize,
    {
        if items.len() > MAX {
            return Err(ser::Error::custom(format_args!(
                "{} elements, more than the limit of {MAX}",
                items.len()
            )));
        }
        items.serialize(serializer)
    }

    pub(super) fn deserialize<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        deserializer.deserialize_seq(ItemsVisitor::<T, MAX>(PhantomData))
    }
}

impl<const MAX: usize> MaxStr<MAX> {
    pub(super) fn serialize<S: Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
        if text.len() > MAX {
            return Err(ser::Error::custom(format_args!(
                "string of {} bytes, more than the limit of {MAX}",
                text.len()
            )));
        }
        serializer.serialize_str(text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<String, D::Error> {
        deserializer.deserialize_string(StrVisitor::<MAX>)
    }
}

impl<const MAX: usize> MaxBytes<MAX> {
    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        if bytes.len() > MAX {
            return Err(ser::Error::custom(format_args!(
                "byte string of {} bytes, more than the limit of {MAX}",
                bytes.len()
            )));
        }
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor::<MAX>)
    }
}

/// Collects at most `max` elements. Preallocates `min(claimed, max)` elements and, when the
/// format claims no length, grows by doubling up to `max`: capacity never exceeds `max`.
fn collect_at_most<'de, A, T>(
    mut seq: A,
    max: usize,
    expected: &dyn Expected,
) -> Result<Vec<T>, A::Error>
where
    A: SeqAccess<'de>,
    T: Deserialize<'de>,
{
    let claimed = seq.size_hint().unwrap_or(0);
    if claimed > max {
        return Err(de::Error::invalid_length(claimed, expected));
    }
    let mut items = Vec::with_capacity(claimed);
    while let Some(item) = seq.next_element()? {
        if items.len() == max {
            return Err(de::Error::invalid_length(max + 1, expected));
        }
        if items.len() == items.capacity() {
            let target = (2 * items.capacity()).max(4).min(max);
            items.reserve_exact(target - items.len());
        }
        items.push(item);
    }
    Ok(items)
}

struct ItemsVisitor<T, const MAX: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for ItemsVisitor<T, MAX> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {MAX} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<T>, A::Error> {
        collect_at_most(seq, MAX, &self)
    }
}

struct StrVisitor<const MAX: usize>;

impl<const MAX: usize> StrVisitor<MAX> {
    fn check<E: de::Error>(&self, len: usize) -> Result<(), E> {
        if len > MAX {
            Err(E::invalid_length(len, self))
        } else {
            Ok(())
        }
    }
}

impl<const MAX: usize> Visitor<'_> for StrVisitor<MAX> {
    type Value = String;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a string of at most {MAX} bytes")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<String, E> {
        self.check(text.len())?;
        Ok(text.into())
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<String, E> {
        self.check(text.len())?;
        Ok(text)
    }
}

struct BytesVisitor<const MAX: usize>;

impl<const MAX: usize> BytesVisitor<MAX> {
    fn check<E: de::Error>(&self, len: usize) -> Result<(), E> {
        if len > MAX {
            Err(E::invalid_length(len, self))
        } else {
            Ok(())
        }
    }
}

impl<'de, const MAX: usize> Visitor<'de> for BytesVisitor<MAX> {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a byte string of at most {MAX} bytes")
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        self.check(bytes.len())?;
        Ok(bytes.into())
    }

    fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
        self.check(bytes.len())?;
        Ok(bytes)
    }

    /// Formats without byte strings (JSON, for one) send a sequence of numbers.
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<u8>, A::Error> {
        collect_at_most(seq, MAX, &self)
    }
}
