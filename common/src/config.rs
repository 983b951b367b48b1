//! What the agent's and the coordinator's configuration files share: every duration in them is
//! in milliseconds (`*_ms`), and the few keys that were once given in seconds are still read.

use std::{borrow::ToOwned as _, string::String};

/// A duration key in seconds that cannot become its millisecond key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LegacyDurationError {
    /// Both the old key and the new one are given.
    #[error("give only `{new}` (`{old}` is the same duration in seconds)")]
    Both {
        /// The key in seconds.
        old: String,
        /// The key in milliseconds.
        new: String,
    },
    /// The old key is not a whole, non-negative number of seconds that fits in milliseconds.
    #[error("must be a whole number of seconds")]
    NotSeconds {
        /// The key in seconds.
        old: String,
    },
}

impl LegacyDurationError {
    /// The offending key.
    pub fn field(&self) -> &str {
        match self {
            Self::Both { old, .. } | Self::NotSeconds { old } => old,
        }
    }
}

/// Replaces the key `old`, a duration in seconds, by `new`, the same duration in milliseconds.
/// Returns whether `old` was there, so the caller can say it is deprecated.
pub fn seconds_key_to_ms(
    table: &mut toml::Table,
    old: &str,
    new: &str,
) -> Result<bool, LegacyDurationError> {
    let Some(value) = table.remove(old) else {
        return Ok(false);
    };
    if table.contains_key(new) {
        return Err(LegacyDurationError::Both {
            old: old.to_owned(),
            new: new.to_owned(),
        });
    }
    let ms = value
        .as_integer()
        .filter(|s| *s >= 0)
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| LegacyDurationError::NotSeconds {
            old: old.to_owned(),
        })?;
    table.insert(new.to_owned(), toml::Value::Integer(ms));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        toml::from_str(text).expect("toml")
    }

    #[test]
    fn seconds_become_milliseconds_and_only_once() {
        let mut t = table("idle_s = 300\nother = 1");
        assert_eq!(seconds_key_to_ms(&mut t, "idle_s", "idle_ms"), Ok(true));
        assert_eq!(t, table("idle_ms = 300000\nother = 1"));
        assert_eq!(seconds_key_to_ms(&mut t, "idle_s", "idle_ms"), Ok(false));
        assert_eq!(t, table("idle_ms = 300000\nother = 1"));
    }

    #[test]
    fn both_keys_or_a_bad_value_name_the_old_key() {
        let both = seconds_key_to_ms(&mut table("a_s = 1\na_ms = 5"), "a_s", "a_ms");
        assert_eq!(
            both.as_ref().map_err(LegacyDurationError::field),
            Err("a_s")
        );
        for bad in [
            "a_s = -1",
            "a_s = 1.5",
            "a_s = \"1\"",
            "a_s = 9223372036854775807",
        ] {
            let e = seconds_key_to_ms(&mut table(bad), "a_s", "a_ms").expect_err(bad);
            assert_eq!(e.field(), "a_s", "{bad}");
        }
    }
}
