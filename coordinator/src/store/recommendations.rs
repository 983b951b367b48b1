//! The decision tables: `comparisons`, the `recommendations` made from them, and the webhook
//! `webhook_outbox` with its `webhook_deliveries` log. Kept apart because a recommendation and
//! its outbox rows are written in one transaction and drained by the webhook sender, a
//! lifecycle of its own.

use rusqlite::params;
use serde::Serialize;

use super::{Store, StoreError, sql};

/// A stored recommendation.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RecommendationRow {
    /// Row id.
    pub id: i64,
    /// Workload.
    pub workload: String,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// Idempotency key sent with every delivery.
    pub idempotency_key: String,
    /// Why it was made.
    pub reason: String,
    /// Current VM type.
    pub current_vm_type: String,
    /// Recommended VM type.
    pub recommended_vm_type: String,
    /// The JSON body.
    pub body: serde_json::Value,
}

/// A webhook delivery waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxItem {
    /// Row id.
    pub id: i64,
    /// Target URL.
    pub url: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// The JSON body to POST.
    pub body: String,
}

/// What became of a delivery attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Failed; try again at this time (ms since the epoch).
    RetryAt(i64),
    /// Failed for the last time.
    GiveUp,
}

/// One delivery attempt, to be logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeliveryAttempt<'a> {
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// HTTP status, if a response came.
    pub status: Option<u16>,
    /// The error, if it failed.
    pub error: Option<&'a str>,
    /// Time taken, ms.
    pub duration_ms: i64,
    /// What follows.
    pub outcome: DeliveryOutcome,
}

/// One delivery attempt, as logged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeliveryRow {
    /// Outbox item.
    pub outbox_id: i64,
    /// Target URL.
    pub url: String,
    /// Idempotency key.
    pub idempotency_key: String,
    /// Attempt number, from 1.
    pub attempt: i64,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// HTTP status, if a response came.
    pub status: Option<i64>,
    /// Error, if the attempt failed.
    pub error: Option<String>,
    /// Time taken, ms.
    pub duration_ms: i64,
}

impl Store {
    /// Stores a comparison result.
    pub fn put_comparison(
        &self,
        workload: &str,
        now_ms: i64,
        window_ms: i64,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO comparisons (workload, computed_ms, window_ms, result)
                 VALUES (?1, ?2, ?3, ?4)",
                params![workload, now_ms, window_ms, result.to_string()],
            )
            .map_err(sql("store comparison"))?;
        Ok(())
    }

    /// Stores a recommendation and queues it for each webhook URL, unless one with the same
    /// idempotency key exists. Returns whether it was new.
    pub fn put_recommendation(
        &mut self,
        rec: &RecommendationRow,
        webhook_urls: &[String],
    ) -> Result<bool, StoreError> {
        let tx = self.write_transaction("begin")?;
        let inserted = tx
            .execute(
                "INSERT INTO recommendations (workload, created_ms, idempotency_key, reason,
                    current_vm_type, recommended_vm_type, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(idempotency_key) DO NOTHING",
                params![
                    rec.workload,
                    rec.created_ms,
                    rec.idempotency_key,
                    rec.reason,
                    rec.current_vm_type,
                    rec.recommended_vm_type,
                    rec.body.to_string()
                ],
            )
            .map_err(sql("store recommendation"))?;
        if inserted == 1 {
            let id = tx.last_insert_rowid();
            for url in webhook_urls {
                tx.execute(
                    "INSERT INTO webhook_outbox (recommendation_id, url, idempotency_key,
                        next_attempt_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![id, url, rec.idempotency_key, rec.created_ms],
                )
                .map_err(sql("queue webhook"))?;
            }
        }
        tx.commit().map_err(sql("commit recommendation"))?;
        Ok(inserted == 1)
    }

    /// Stored recommendations, newest first.
    pub fn recommendations(
        &self,
        workload: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RecommendationRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, workload, created_ms, idempotency_key, reason, current_vm_type,
                    recommended_vm_type, body FROM recommendations
                 WHERE ?1 IS NULL OR workload = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map(params![workload, limit], |r| {
            let body: String = r.get(7)?;
            Ok(RecommendationRow {
                id: r.get(0)?,
                workload: r.get(1)?,
                created_ms: r.get(2)?,
                idempotency_key: r.get(3)?,
                reason: r.get(4)?,
                current_vm_type: r.get(5)?,
                recommended_vm_type: r.get(6)?,
                body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            })
        })
        .map_err(sql("list recommendations"))?
        .collect::<Result<_, _>>()
        .map_err(sql("list recommendations"))
    }

    /// Outbox items due at `now_ms`.
    pub fn due_deliveries(&self, now_ms: i64, limit: u32) -> Result<Vec<OutboxItem>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT o.id, o.url, o.idempotency_key, o.attempts, r.body
                 FROM webhook_outbox o JOIN recommendations r ON r.id = o.recommendation_id
                 WHERE o.delivered_ms IS NULL AND o.given_up_ms IS NULL
                    AND o.next_attempt_ms <= ?1
                 ORDER BY o.next_attempt_ms LIMIT ?2",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map(params![now_ms, limit], |r| {
            Ok(OutboxItem {
                id: r.get(0)?,
                url: r.get(1)?,
                idempotency_key: r.get(2)?,
                attempts: r.get(3)?,
                body: r.get(4)?,
            })
        })
        .map_err(sql("read outbox"))?
        .collect::<Result<_, _>>()
        .map_err(sql("read outbox"))
    }

    /// Earliest pending attempt time, if any delivery is pending.
    pub fn next_delivery_ms(&self) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row(
                "SELECT min(next_attempt_ms) FROM webhook_outbox
                 WHERE delivered_ms IS NULL AND given_up_ms IS NULL",
                [],
                |r| r.get(0),
            )
            .map_err(sql("read outbox"))
    }

    /// Logs one attempt and marks the item delivered, schedules its next attempt, or gives up.
    pub fn record_delivery(
        &self,
        item: &OutboxItem,
        attempt_log: &DeliveryAttempt<'_>,
    ) -> Result<(), StoreError> {
        let DeliveryAttempt {
            at_ms,
            status,
            error,
            duration_ms,
            outcome,
        } = *attempt_log;
        let attempt = item.attempts + 1;
        self.conn
            .execute(
                "INSERT INTO webhook_deliveries (outbox_id, attempt, at_ms, status, error,
                    duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![item.id, attempt, at_ms, status, error, duration_ms],
            )
            .map_err(sql("log delivery"))?;
        let (delivered_ms, given_up_ms, next_attempt_ms) = match outcome {
            DeliveryOutcome::Delivered => (Some(at_ms), None, None),
            DeliveryOutcome::RetryAt(next) => (None, None, Some(next)),
            DeliveryOutcome::GiveUp => (None, Some(at_ms), None),
        };
        self.conn
            .execute(
                "UPDATE webhook_outbox SET attempts = ?2, delivered_ms = ?3, given_up_ms = ?4,
                    next_attempt_ms = coalesce(?5, next_attempt_ms), last_error = ?6
                 WHERE id = ?1",
                params![
                    item.id,
                    attempt,
                    delivered_ms,
                    given_up_ms,
                    next_attempt_ms,
                    error
                ],
            )
            .map_err(sql("update outbox"))?;
        Ok(())
    }

    /// The delivery log, newest first.
    pub fn deliveries(&self, limit: u32) -> Result<Vec<DeliveryRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT d.outbox_id, o.url, o.idempotency_key, d.attempt, d.at_ms, d.status,
                    d.error, d.duration_ms
                 FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id
                 ORDER BY d.id DESC LIMIT ?1",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map([limit], |r| {
            Ok(DeliveryRow {
                outbox_id: r.get(0)?,
                url: r.get(1)?,
                idempotency_key: r.get(2)?,
                attempt: r.get(3)?,
                at_ms: r.get(4)?,
                status: r.get(5)?,
                error: r.get(6)?,
                duration_ms: r.get(7)?,
            })
        })
        .map_err(sql("read delivery log"))?
        .collect::<Result<_, _>>()
        .map_err(sql("read delivery log"))
    }
}
