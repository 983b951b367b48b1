//! Recommendations: made periodically from the comparison, stored, and delivered to webhooks.
//!
//! The evaluator compares each workload every `evaluate_interval_ms`, stores the comparison,
//! and when [`crate::recommend`] advises a move, stores the recommendation and queues one
//! outbox item per configured webhook in the same transaction. The deliverer POSTs due items with
//! `X-Doppel-Signature: sha256=<hex HMAC-SHA256 of the body under the webhook's secret>` and
//! `Idempotency-Key`, logs every attempt, and on failure schedules the next attempt with
//! exponential backoff. The outbox lives in SQLite, so deliveries survive a restart: delivery is
//! at least once, and receivers deduplicate on the idempotency key (which is also unique in the
//! store, so the same advice is never queued twice).
//!
//! Each evaluation also runs the workload's predictor ([`crate::forecast`]): its forecast and
//! warning are stored, and a forecast-breach recommendation, when advised, is stored and queued
//! exactly like the comparison's.
//!
//! [`evaluator`] holds the evaluation loop (what is advised, and the act policy's gate on it);
//! [`outbox`] the signed, retried delivery. Both run on one [`Recommender`].

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::{
    clock::Clock,
    compare::CompareConfig,
    forecast::Forecasts,
    store::{Store, StoreError},
};

pub mod evaluator;
pub mod outbox;

pub use evaluator::run_evaluator;
pub use outbox::{IDEMPOTENCY_HEADER, SIGNATURE_HEADER, next_attempt, run_deliverer, sign};

/// A webhook receiving recommendations (`[[webhooks]]` in the serve config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// HMAC-SHA256 key for `X-Doppel-Signature`.
    pub secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The store failed (busy, locked, full): retried on the next pass.
    #[error("store")]
    Store(#[from] StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("blocking task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The decision loops' counters for `/metrics`: the evaluator's, the deliverer's and act mode's.
/// The round counters say a loop is alive, and are what a test waits on to know that "nothing
/// more happened" after rounds that did run, instead of sleeping for a guess.
#[derive(Debug, Default)]
pub struct DecisionStats {
    /// Evaluation rounds finished (every workload compared and forecast), failed ones included.
    pub evaluations: AtomicU64,
    /// Act-mode rounds finished, failed ones included.
    pub act_rounds: AtomicU64,
    /// Deliveries acknowledged with 2xx.
    pub delivered: AtomicU64,
    /// Attempts that failed (error or non-2xx).
    pub failed_attempts: AtomicU64,
    /// Deliveries given up after the last attempt.
    pub given_up: AtomicU64,
    /// Recommendations stored.
    pub recommendations: AtomicU64,
}

/// What the evaluator and the deliverer need.
#[derive(Debug)]
pub struct Recommender {
    /// Their store connection.
    pub store: Arc<Mutex<Store>>,
    /// Configured webhooks.
    pub webhooks: Vec<WebhookConfig>,
    /// VM type prices.
    pub prices: HashMap<String, f64>,
    /// Comparison tunables.
    pub compare: CompareConfig,
    /// Comparison window, ms.
    pub window_ms: i64,
    /// Time between evaluations.
    pub evaluate_interval: Duration,
    /// First retry delay, ms; doubled per attempt.
    pub backoff_base_ms: u64,
    /// Attempts before giving up.
    pub max_attempts: u32,
    /// Counters.
    pub stats: Arc<DecisionStats>,
    /// Woken when something was queued.
    pub queued: Notify,
    /// Each workload's predictor, kept between evaluations.
    pub forecasts: Mutex<Forecasts>,
    /// The coordinator's clock.
    pub clock: Clock,
}

impl Recommender {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}
