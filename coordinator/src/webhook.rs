//! Recommendations: made periodically from the comparison, stored, and delivered to webhooks.
//!
//! The evaluator compares each workload every `evaluate_interval_ms`, stores the comparison,
//! and when [`recommend`] advises a move, stores the recommendation and queues one outbox item
//! per configured webhook in the same transaction. The deliverer POSTs due items with
//! `X-Doppel-Signature: sha256=<hex HMAC-SHA256 of the body under the webhook's secret>` and
//! `Idempotency-Key`, logs every attempt, and on failure schedules the next attempt with
//! exponential backoff. The outbox lives in SQLite, so deliveries survive a restart: delivery is
//! at least once, and receivers deduplicate on the idempotency key (which is also unique in the
//! store, so the same advice is never queued twice).
//!
//! Each evaluation also runs the workload's predictor ([`crate::forecast`]): its forecast and
//! warning are stored, and a forecast-breach recommendation, when advised, is stored and queued
//! exactly like the comparison's.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use doppel_engine::moves::{ActPolicy, LastMove, MoveOutcome, may_move};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::{
    clock::Clock,
    compare::CompareConfig,
    forecast::Forecasts,
    measurements::compare_workload,
    recommend::{Recommendation, Trigger, recommend},
    store::{
        ActionState, DeliveryAttempt, DeliveryOutcome, OutboxItem, RecommendationRow, Store,
        StoreError,
    },
};

/// Header carrying the body's signature.
pub const SIGNATURE_HEADER: &str = "X-Doppel-Signature";
/// Header carrying the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";
/// Longest wait between two attempts.
const MAX_BACKOFF_MS: i64 = 15 * 60 * 1000;
/// Items delivered per pass.
const BATCH: u32 = 32;

/// A webhook receiving recommendations (`[[webhooks]]` in the serve config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL.
    pub url: String,
    /// HMAC-SHA256 key for `X-Doppel-Signature`.
    pub secret: String,
}

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

/// Why an evaluation or a delivery pass failed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The store failed (busy, locked, full): retried on the next pass.
    #[error("store")]
    Store(#[from] StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("blocking task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct WebhookStats {
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
    pub stats: Arc<WebhookStats>,
    /// Woken when something was queued.
    pub queued: Notify,
    /// Each workload's predictor, kept between evaluations.
    pub forecasts: Mutex<Forecasts>,
    /// The coordinator's clock.
    pub clock: Clock,
}

/// The workload's last move as the act policy sees it: its newest action, or its newest
/// recommendation when that came after the action's (advice not acted on, or not yet).
fn last_move(store: &Store, workload: &str) -> Result<Option<LastMove>, StoreError> {
    let secs = |ms: i64| u64::try_from(ms / 1000).unwrap_or_default();
    let action = store.last_action(workload)?;
    let advice = store.recommendations(Some(workload), 1)?.pop();
    Ok(match (action, advice) {
        (action, Some(rec)) if action.as_ref().is_none_or(|a| a.recommendation_id < rec.id) => {
            let urgent = Trigger::from_reason(&rec.reason).is_some_and(Trigger::is_urgent);
            Some(LastMove {
                from: rec.current_vm_type,
                to: rec.recommended_vm_type,
                at: secs(rec.created_ms),
                outcome: MoveOutcome::Advised { urgent },
            })
        }
        (Some(a), _) => Some(LastMove {
            at: secs(a.verified_ms.or(a.finished_ms).unwrap_or(a.started_ms)),
            outcome: match a.state {
                ActionState::Running => MoveOutcome::Running,
                ActionState::Done => MoveOutcome::AwaitingVerification,
                ActionState::Verified => MoveOutcome::Recovered,
                ActionState::NotRecovered => MoveOutcome::NotRecovered,
                ActionState::Failed => MoveOutcome::Failed,
            },
            from: a.from_vm_type,
            to: a.to_vm_type,
        }),
        (None, _) => None,
    })
}

/// Whether the act policy ([`doppel_engine::moves`]) lets `rec` be advised now.
fn admitted(
    store: &Store,
    rec: &Recommendation,
    cooldown_secs: u64,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let last = last_move(store, &rec.workload)?;
    let verdict = may_move(
        &ActPolicy { cooldown_secs },
        u64::try_from(now_ms / 1000).unwrap_or_default(),
        last.as_ref(),
        &rec.current_vm_type,
        &rec.recommended_vm_type,
        rec.trigger.is_urgent(),
    );
    if let Err(hold) = &verdict {
        debug!(
            workload = %rec.workload,
            from = %rec.current_vm_type,
            to = %rec.recommended_vm_type,
            reason = rec.trigger.as_str(),
            held = %hold.describe(),
            "recommendation held by the act policy"
        );
    }
    Ok(verdict.is_ok())
}

impl Recommender {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Compares every workload once and stores (and queues) what it recommends. Returns the
    /// recommendations that were new.
    pub fn evaluate(&self, now_ms: i64) -> Result<usize, StoreError> {
        let mut store = self.store();
        let urls: Vec<String> = self.webhooks.iter().map(|w| w.url.clone()).collect();
        let mut new = 0;
        let mut names = Vec::new();
        for spec in store.workloads()? {
            let comparison = compare_workload(
                &store,
                &spec,
                now_ms,
                self.window_ms,
                &self.compare,
                &self.prices,
            )?;
            let json = serde_json::to_value(&comparison).map_err(|source| StoreError::Json {
                what: "comparison",
                source,
            })?;
            store.put_comparison(&spec.name, now_ms, self.window_ms, &json)?;
            let revision = store.workload_revision(&spec.name)?.unwrap_or_default();
            let cooldown_secs = self.cooldown_secs(&spec);
            // The predictor runs whatever the comparison said: it warns before the SLO breaks,
            // the comparison only once it has. It runs first because it also checks the
            // comparison's advice: a move to a cheaper type must hold the day's peak
            // ([`doppel_engine::assess::PeakCheck::vetoes`]). Each trigger has its own
            // idempotency key; the comparison's advice is stored first.
            let forecast = self
                .forecasts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .evaluate(&mut store, &spec, revision, &self.prices, now_ms)?;
            if let Some(rec) = recommend(&comparison, &spec.policy, revision) {
                let veto =
                    forecast
                        .peak_check
                        .vetoes(&comparison, rec.trigger, &rec.recommended_vm_type);
                if let Some(why) = veto {
                    debug!(
                        workload = %rec.workload,
                        to = %rec.recommended_vm_type,
                        reason = rec.trigger.as_str(),
                        held = %why,
                        "comparison's advice held by the forecast"
                    );
                } else if admitted(&store, &rec, cooldown_secs, now_ms)? {
                    new += usize::from(self.store_recommendation(&mut store, &rec, now_ms, &urls)?);
                }
            }
            if let Some(rec) = forecast.recommendation
                && admitted(&store, &rec, cooldown_secs, now_ms)?
            {
                new += usize::from(self.store_recommendation(&mut store, &rec, now_ms, &urls)?);
            }
            names.push(spec.name);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.forecasts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(&names);
        if new > 0 {
            self.queued.notify_one();
        }
        Ok(new)
    }

    /// The act policy's cooldown for `spec`: the predictor's `cooldown_steps` report intervals.
    fn cooldown_secs(&self, spec: &crate::policy::WorkloadSpec) -> u64 {
        let step_secs = u64::from(spec.policy.report_interval_ms.max(1).div_ceil(1000));
        let steps = self
            .forecasts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settings()
            .cooldown_steps;
        u64::try_from(steps)
            .unwrap_or(u64::MAX)
            .saturating_mul(step_secs)
    }

    /// Stores `rec` and queues it for every webhook, unless the same advice (idempotency key) is
    /// stored already. Returns whether it was new.
    fn store_recommendation(
        &self,
        store: &mut Store,
        rec: &Recommendation,
        now_ms: i64,
        urls: &[String],
    ) -> Result<bool, StoreError> {
        let body = serde_json::to_value(rec).map_err(|source| StoreError::Json {
            what: "recommendation",
            source,
        })?;
        let row = RecommendationRow {
            id: 0,
            workload: rec.workload.clone(),
            created_ms: now_ms,
            idempotency_key: rec.idempotency_key.clone(),
            reason: rec.trigger.as_str().to_owned(),
            current_vm_type: rec.current_vm_type.clone(),
            recommended_vm_type: rec.recommended_vm_type.clone(),
            body,
        };
        let new = store.put_recommendation(&row, urls)?;
        if new {
            info!(
                workload = %rec.workload,
                from = %rec.current_vm_type,
                to = %rec.recommended_vm_type,
                reason = rec.trigger.as_str(),
                "recommendation stored"
            );
            self.stats.recommendations.fetch_add(1, Ordering::Relaxed);
        }
        Ok(new)
    }

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

/// Evaluates every `evaluate_interval` until shutdown.
pub async fn run_evaluator(recommender: Arc<Recommender>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(recommender.evaluate_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let r = Arc::clone(&recommender);
        match tokio::task::spawn_blocking(move || r.evaluate(r.clock.now_ms())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %doppel_common::error_chain(&e), "evaluation failed; will retry")
            }
            Err(e) => warn!(error = %e, "evaluation task failed"),
        }
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
