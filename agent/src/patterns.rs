//! Pattern discovery: turns the first payload bytes of sampled new flows into pattern keys and
//! counts them, so the coordinator can see the live mix and steer what is mirrored.
//!
//! Keys never carry ids or bodies: HTTP/1.x becomes `METHOD /path/template` with numbers, hex
//! and uuid-like segments folded to `{n}`/`{id}` and the query dropped; RESP (Redis) becomes
//! `resp COMMAND`; other text protocols their leading token; binary protocols a 2-byte prefix.

use std::collections::BTreeMap;

const HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];
/// Longest leading token kept for text protocols.
const MAX_TOKEN: usize = 24;
/// Path segments kept; deeper paths end in `/…`.
const MAX_SEGMENTS: usize = 6;
/// Patterns reported per interval; the rarer rest is summed under [`OTHER_PATTERNS`] so a report
/// stays within the wire protocol's limits whatever the traffic looks like.
pub const MAX_REPORTED_PATTERNS: usize = 256;
/// Key of the flows whose patterns were too rare to report one by one.
pub const OTHER_PATTERNS: &str = "(other)";

/// The pattern key of a flow's first payload bytes.
pub fn pattern_key(head: &[u8]) -> String {
    if let Some(key) = http_key(head) {
        return key;
    }
    if let Some(key) = resp_key(head) {
        return key;
    }
    let token: Vec<u8> = head
        .iter()
        .copied()
        .take_while(|b| b.is_ascii_graphic())
        .take(MAX_TOKEN)
        .collect();
    if token.len() >= 2 && token.iter().all(u8::is_ascii_alphabetic) {
        return String::from_utf8_lossy(&token).to_ascii_uppercase();
    }
    match head {
        [] => "empty".to_owned(),
        [a] => format!("bytes {a:02x}"),
        [a, b, ..] => format!("bytes {a:02x}{b:02x}"),
    }
}

fn http_key(head: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(head).ok().or_else(|| {
        // The sample may end inside a multi-byte character: keep the valid prefix.
        let valid = std::str::from_utf8(head).err()?.valid_up_to();
        std::str::from_utf8(&head[..valid]).ok()
    })?;
    let (method, rest) = text.split_once(' ')?;
    if !HTTP_METHODS.contains(&method) {
        return None;
    }
    let target = rest.split([' ', '\r', '\n']).next()?;
    let path = target.split(['?', '#']).next()?;
    if !path.starts_with('/') {
        return Some(format!("{method} {{target}}"));
    }
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let mut template = String::new();
    for segment in segments.iter().take(MAX_SEGMENTS) {
        template.push('/');
        template.push_str(&fold_segment(segment));
    }
    if segments.len() > MAX_SEGMENTS {
        template.push_str("/…");
    }
    if template.is_empty() {
        template.push('/');
    }
    Some(format!("{method} {template}"))
}

fn fold_segment(segment: &str) -> String {
    let is_hex = |s: &str| s.len() >= 8 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    let digits = segment.chars().filter(char::is_ascii_digit).count();
    if digits > 0 && (is_hex(segment) || segment.len() >= 16) {
        return "{id}".to_owned();
    }
    // Every run of digits becomes `{n}`: `item42.json` -> `item{n}.json`.
    let mut folded = String::new();
    let mut in_number = false;
    for c in segment.chars().take(MAX_TOKEN) {
        if c.is_ascii_digit() {
            if !in_number {
                folded.push_str("{n}");
            }
            in_number = true;
        } else {
            folded.push(c);
            in_number = false;
        }
    }
    folded
}

/// `*<n>\r\n$<len>\r\n<COMMAND>\r\n…` -> `resp COMMAND`.
fn resp_key(head: &[u8]) -> Option<String> {
    let text =
        std::str::from_utf8(head.get(..head.iter().rposition(|&b| b == b'\n')? + 1)?).ok()?;
    let mut lines = text.strip_prefix('*')?.split("\r\n");
    lines.next()?.parse::<u32>().ok()?;
    lines.next()?.strip_prefix('$')?;
    let command = lines.next()?;
    if command.is_empty() || !command.chars().all(|c| c.is_ascii_alphabetic()) {
        return None;
    }
    Some(format!("resp {}", command.to_ascii_uppercase()))
}

/// Pattern counts of one report interval.
#[derive(Debug, Default)]
pub struct PatternCounts {
    counts: BTreeMap<String, u64>,
}

impl PatternCounts {
    /// Counts one sampled flow's first bytes.
    pub fn add(&mut self, head: &[u8]) {
        *self.counts.entry(pattern_key(head)).or_default() += 1;
    }

    /// The counts so far, most frequent first (at most [`MAX_REPORTED_PATTERNS`], the rest
    /// summed as [`OTHER_PATTERNS`]), leaving the set empty for the next interval.
    pub fn take(&mut self) -> Vec<(String, u64)> {
        let mut counts: Vec<_> = std::mem::take(&mut self.counts).into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        if counts.len() > MAX_REPORTED_PATTERNS {
            let rest: u64 = counts
                .drain(MAX_REPORTED_PATTERNS - 1..)
                .map(|(_, n)| n)
                .sum();
            counts.push((OTHER_PATTERNS.to_owned(), rest));
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_paths_fold_ids_and_numbers_and_drop_queries() {
        assert_eq!(
            pattern_key(b"GET /api/items/12345?x=1 HTTP/1.1\r\nHost: a\r\n"),
            "GET /api/items/{n}"
        );
        assert_eq!(
            pattern_key(b"POST /u/3f2a9c1e-77aa-4b1c-9d2e-0a1b2c3d4e5f/orders HTTP/1.1\r\n"),
            "POST /u/{id}/orders"
        );
        assert_eq!(pattern_key(b"GET / HTTP/1.1\r\n"), "GET /");
        assert_eq!(
            pattern_key(b"GET /static/f701.css HTTP/1.1"),
            "GET /static/f{n}.css"
        );
        assert_eq!(
            pattern_key(b"GET /static/deadbeef HTTP/1.1"),
            "GET /static/deadbeef"
        );
        assert_eq!(
            pattern_key(b"GET /search?q=secret-user-input HTTP/1.1"),
            "GET /search"
        );
    }

    #[test]
    fn a_truncated_sample_still_gives_a_key() {
        assert_eq!(pattern_key(b"GET /api/items/12"), "GET /api/items/{n}");
    }

    #[test]
    fn redis_commands_are_recognised_in_resp_and_inline_form() {
        assert_eq!(
            pattern_key(b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n"),
            "resp SET"
        );
        assert_eq!(pattern_key(b"*1\r\n$4\r\nping\r\n"), "resp PING");
        assert_eq!(pattern_key(b"PING\r\n"), "PING");
    }

    #[test]
    fn binary_payloads_keep_only_a_short_prefix() {
        assert_eq!(pattern_key(&[0x16, 0x03, 0x01, 0x02, 0x00]), "bytes 1603");
        assert_eq!(pattern_key(&[]), "empty");
    }

    #[test]
    fn counts_are_taken_per_interval_most_frequent_first() {
        let mut counts = PatternCounts::default();
        for head in [&b"GET /a/1 "[..], b"GET /a/2 ", b"PING\r\n"] {
            counts.add(head);
        }
        assert_eq!(
            counts.take(),
            vec![("GET /a/{n}".to_owned(), 2), ("PING".to_owned(), 1)]
        );
        assert!(counts.take().is_empty());
    }

    #[test]
    fn a_long_tail_of_patterns_is_summed_so_reports_stay_bounded() {
        let mut counts = PatternCounts::default();
        for i in 0..1000u32 {
            // A distinct alphabetic token per flow: `i` written in base 26.
            let token: String = (0..3)
                .map(|d| char::from(b'a' + (i / 26u32.pow(d) % 26) as u8))
                .collect();
            counts.add(format!("CMD{token} x").as_bytes());
        }
        let taken = counts.take();
        assert_eq!(taken.len(), MAX_REPORTED_PATTERNS);
        assert_eq!(
            taken.iter().map(|(_, n)| n).sum::<u64>(),
            1000,
            "no flow is lost"
        );
        assert_eq!(taken.last().map(|(k, _)| k.as_str()), Some(OTHER_PATTERNS));
    }
}
