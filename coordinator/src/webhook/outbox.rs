//! The delivery outbox: POSTs due items signed with the webhook's secret, logs every attempt,
//! and schedules the next with exponential backoff until it gives up.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use tokio::sync::watch;
use tracing::warn;

use super::{Recommender, WebhookError};
use crate::store::{DeliveryAttempt, DeliveryOutcome, OutboxItem};

/// Header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Doppel-Signature";
/// Header carrying the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Longest wait between two attempts.
const MAX_BACKOFF_MS: i64 = 15 * 60 * 1000;
/// Items delivered per pass.
const BATCH: u32 = 32;

/// `sha256=<hex>` of `body` under `secret`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256>>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// When attempt `attempts + 1` failed at `now_ms`: the time of the next one, or give up.
pub fn next_attempt(
    now_ms: i64,
    attempts_made: u32,
    base_ms: u64,
    max_attempts: u32,
) -> DeliveryOutcome {
    if attempts_made >= max_attempts {
        return DeliveryOutcome::GiveUp;
    }
    let exp = attempts_made.saturating_sub(1).min(30);
    let delay = i64::try_from(base_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1 << exp)
        .min(MAX_BACKOFF_MS);
    DeliveryOutcome::RetryAt(now_ms.saturating_add(delay))
}

impl Recommender {
    /// Delivers what is due; returns when the next attempt is due (ms since the epoch).
    async fn deliver_due(&self, http: &reqwest::Client) -> Result<Option<i64>, WebhookError> {
        let store = Arc::clone(&self.store);
        let clock = self.clock.clone();
        let due = tokio::task::spawn_blocking(move || {
            store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .due_deliveries(clock.now_ms(), BATCH)
        })
        .await
        .map_err(WebhookError::Task)??;
        for item in due {
            self.deliver(http, item).await?;
        }
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .next_delivery_ms()
        })
        .await
        .map_err(WebhookError::Task)?
        .map_err(WebhookError::Store)
    }

    async fn deliver(&self, http: &reqwest::Client, item: OutboxItem) -> Result<(), WebhookError> {
        let secret = self
            .webhooks
            .iter()
            .find(|w| w.url == item.url)
            .map(|w| w.secret.clone());
        let started = Instant::now();
        let at_ms = self.clock.now_ms();
        let (status, error) = match secret {
            // Queued for a webhook since removed from the config: nothing to sign with.
            None => (None, Some("webhook no longer configured".to_owned())),
            Some(secret) => {
                let sent = http
                    .post(&item.url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header(SIGNATURE_HEADER, sign(&secret, item.body.as_bytes()))
                    .header(IDEMPOTENCY_HEADER, &item.idempotency_key)
                    .header("X-Doppel-Attempt", (item.attempts + 1).to_string())
                    .body(item.body.clone())
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
                    Ok(r) => (
                        Some(r.status().as_u16()),
                        Some(format!("HTTP {}", r.status())),
                    ),
                    Err(e) => (None, Some(doppel_common::error_chain(&e))),
                }
            }
        };
        let outcome = if error.is_none() {
            self.stats.delivered.fetch_add(1, Ordering::Relaxed);
            DeliveryOutcome::Delivered
        } else {
            self.stats.failed_attempts.fetch_add(1, Ordering::Relaxed);
            let next = next_attempt(
                self.clock.now_ms(),
                item.attempts + 1,
                self.backoff_base_ms,
                self.max_attempts,
            );
            if next == DeliveryOutcome::GiveUp {
                self.stats.given_up.fetch_add(1, Ordering::Relaxed);
                warn!(url = %item.url, key = %item.idempotency_key, "webhook delivery given up");
            }
            next
        };
        let duration_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || {
            store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record_delivery(
                    &item,
                    &DeliveryAttempt {
                        at_ms,
                        status,
                        error: error.as_deref(),
                        duration_ms,
                        outcome,
                    },
                )
        })
        .await
        .map_err(WebhookError::Task)?
        .map_err(WebhookError::Store)
    }
}

/// Delivers the outbox until shutdown, waking when an item is due or newly queued.
pub async fn run_deliverer(recommender: Arc<Recommender>, mut shutdown: watch::Receiver<bool>) {
    let http = reqwest::Client::new();
    loop {
        let wait = match recommender.deliver_due(&http).await {
            Ok(Some(next)) => Duration::from_millis(
                u64::try_from(next - recommender.clock.now_ms())
                    .unwrap_or(0)
                    .min(1000),
            ),
            Ok(None) => Duration::from_secs(1),
            Err(e) => {
                // A busy or full store: back off and retry; nothing is marked delivered.
                warn!(error = %doppel_common::error_chain(&e), "webhook outbox unavailable");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = recommender.queued.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_the_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn retries_back_off_exponentially_then_give_up() {
        assert_eq!(next_attempt(0, 1, 100, 5), DeliveryOutcome::RetryAt(100));
        assert_eq!(next_attempt(0, 2, 100, 5), DeliveryOutcome::RetryAt(200));
        assert_eq!(next_attempt(0, 4, 100, 5), DeliveryOutcome::RetryAt(800));
        assert_eq!(next_attempt(0, 5, 100, 5), DeliveryOutcome::GiveUp);
        assert_eq!(
            next_attempt(0, 40, 1000, 100),
            DeliveryOutcome::RetryAt(MAX_BACKOFF_MS)
        );
    }
}
