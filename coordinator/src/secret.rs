//! The coordinator's secrets: the API token, and the dashboard's session ids and one-time
//! tickets. They are made and compared here, so the API and the dashboard ([`crate::ui`]) share
//! one way of doing both without importing each other.

use subtle::ConstantTimeEq as _;

/// 256 random bits in hex.
pub fn random_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Whether `given` is `expected`, in time that does not depend on where they differ, so a
/// response's timing does not leak a prefix. (Lengths are compared first: every secret here
/// has the same, public, length.)
pub fn token_matches(expected: &str, given: &str) -> bool {
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fresh_and_match_only_themselves() {
        let (a, b) = (random_token(), random_token());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
        assert!(token_matches(&a, &a.clone()));
        assert!(!token_matches(&a, &b));
        assert!(!token_matches(&a, &a[..63]));
        assert!(!token_matches(&a, ""));
    }
}
