//! The coordinator's one clock. Every component that needs the time (ingest's connection
//! records, the API's policy changes, the Shadow Instance Manager, the evaluator, the deliverer
//! and act mode) reads it from the [`Clock`] [`crate::serve`] hands it, so a test can run the
//! coordinator on a clock it sets, and the engine, which never reads a clock, gets the time
//! passed in from here.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// Where the time comes from: the system's wall clock, or one a test moves by hand.
#[derive(Clone)]
pub struct Clock(Source);

#[derive(Clone)]
enum Source {
    System,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// The system's wall clock.
    pub fn system() -> Self {
        Self(Source::System)
    }

    /// A clock standing at `start_ms` until the returned handle moves it.
    pub fn manual(start_ms: i64) -> (Self, Arc<AtomicI64>) {
        let now = Arc::new(AtomicI64::new(start_ms));
        (Self(Source::Manual(Arc::clone(&now))), now)
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> i64 {
        match &self.0 {
            Source::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
                .unwrap_or_default(),
            Source::Manual(now) => now.load(Ordering::Relaxed),
        }
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Source::System => f.write_str("Clock::system"),
            Source::Manual(now) => write!(f, "Clock::manual({})", now.load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_stands_still_until_moved() {
        let (clock, hand) = Clock::manual(1_000);
        assert_eq!(clock.now_ms(), 1_000);
        let shared = clock.clone();
        hand.store(61_000, Ordering::Relaxed);
        assert_eq!(shared.now_ms(), 61_000);
        assert_eq!(clock.now_ms(), 61_000);
        assert!(Clock::system().now_ms() > 1_700_000_000_000);
    }
}
