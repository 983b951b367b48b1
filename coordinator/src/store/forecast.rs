//! The predictor's tables: offered load read cheaply from stored exchange counts, the latest
//! forecast per workload, and degradation-warning episodes. Kept apart from the ingest path so
//! the predictor's queries do not crowd the module the writer lives in.

use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use super::{Store, StoreError, sql};

/// Exchanges one agent served in one report interval (all flows, kernel first-byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OfferedLoad {
    /// Interval start, ms since the epoch.
    pub interval_start_ms: i64,
    /// Interval length, ms.
    pub interval_ms: i64,
    /// Exchanges in the interval.
    pub exchanges: u64,
}

/// One degradation-warning episode.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct WarningRow {
    /// Row id.
    pub id: i64,
    /// Workload.
    pub workload: String,
    /// The live VM type expected to break its SLO.
    pub vm_type: String,
    /// When it was raised, ms since the epoch.
    pub raised_ms: i64,
    /// Last evaluation while raised, ms since the epoch.
    pub updated_ms: i64,
    /// When it was cleared; `None` while raised.
    pub cleared_ms: Option<i64>,
    /// The latest evaluation (forecast peak, lead time, probability, capacity).
    pub body: serde_json::Value,
}

impl Store {
    /// Exchanges per report of `agents` for intervals starting in `[since_ms, until_ms)`,
    /// oldest first. Reads the per-histogram counts stored at ingest, so nothing is decoded.
    pub fn offered_load(
        &self,
        agents: &[&str],
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<OfferedLoad>, StoreError> {
        // scope 0 = all flows, metric 0 = kernel first byte: one count per class, each exchange
        // once.
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT r.interval_start_ms, r.interval_ms, coalesce(sum(h.count), 0)
                 FROM reports r
                 JOIN agents a ON a.id = r.agent_id
                 LEFT JOIN histograms h ON h.report_id = r.id AND h.scope = 0 AND h.metric = 0
                 WHERE a.name = ?1 AND r.interval_start_ms >= ?2 AND r.interval_start_ms < ?3
                 GROUP BY r.id",
            )
            .map_err(sql("prepare"))?;
        let mut out = Vec::new();
        for agent in agents {
            let rows = stmt
                .query_map(params![agent, since_ms, until_ms], |r| {
                    Ok(OfferedLoad {
                        interval_start_ms: r.get(0)?,
                        interval_ms: r.get(1)?,
                        exchanges: u64::try_from(r.get::<_, i64>(2)?).unwrap_or_default(),
                    })
                })
                .map_err(sql("read offered load"))?;
            for row in rows {
                out.push(row.map_err(sql("read offered load"))?);
            }
        }
        out.sort_by_key(|l| l.interval_start_ms);
        Ok(out)
    }

    /// Replaces the workload's latest forecast.
    pub fn put_forecast(
        &self,
        workload: &str,
        computed_ms: i64,
        body: &serde_json::Value,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO forecasts (workload, computed_ms, body) VALUES (?1, ?2, ?3)
                 ON CONFLICT(workload) DO UPDATE SET computed_ms = ?2, body = ?3",
                params![workload, computed_ms, body.to_string()],
            )
            .map_err(sql("store forecast"))?;
        Ok(())
    }

    /// The workload's latest forecast: when it was computed and the document.
    pub fn forecast(&self, workload: &str) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT computed_ms, body FROM forecasts WHERE workload = ?1",
                params![workload],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read forecast"))?;
        row.map(|(at, body)| {
            serde_json::from_str(&body)
                .map(|b| (at, b))
                .map_err(|source| StoreError::Json {
                    what: "forecast",
                    source,
                })
        })
        .transpose()
    }

    /// Records that the workload's warning is raised at `now_ms`: updates the open episode, or
    /// opens one. Returns whether it was newly raised.
    pub fn raise_warning(
        &mut self,
        workload: &str,
        vm_type: &str,
        now_ms: i64,
        body: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let tx = self.conn.transaction().map_err(sql("begin"))?;
        let updated = tx
            .execute(
                "UPDATE forecast_warnings SET updated_ms = ?2, body = ?3
                 WHERE workload = ?1 AND cleared_ms IS NULL",
                params![workload, now_ms, body.to_string()],
            )
            .map_err(sql("update warning"))?;
        if updated == 0 {
            tx.execute(
                "INSERT INTO forecast_warnings (workload, vm_type, raised_ms, updated_ms, body)
                 VALUES (?1, ?2, ?3, ?3, ?4)",
                params![workload, vm_type, now_ms, body.to_string()],
            )
            .map_err(sql("raise warning"))?;
        }
        tx.commit().map_err(sql("commit warning"))?;
        Ok(updated == 0)
    }

    /// Closes the workload's open warning episode, if any.
    pub fn clear_warning(&self, workload: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE forecast_warnings SET cleared_ms = ?2
                 WHERE workload = ?1 AND cleared_ms IS NULL",
                params![workload, now_ms],
            )
            .map_err(sql("clear warning"))?;
        Ok(())
    }

    /// Warning episodes, newest first.
    pub fn warnings(
        &self,
        workload: Option<&str>,
        limit: u32,
    ) -> Result<Vec<WarningRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, workload, vm_type, raised_ms, updated_ms, cleared_ms, body
                 FROM forecast_warnings WHERE ?1 IS NULL OR workload = ?1
                 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map(params![workload, limit], |r| {
            let body: String = r.get(6)?;
            Ok(WarningRow {
                id: r.get(0)?,
                workload: r.get(1)?,
                vm_type: r.get(2)?,
                raised_ms: r.get(3)?,
                updated_ms: r.get(4)?,
                cleared_ms: r.get(5)?,
                body: serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
            })
        })
        .map_err(sql("list warnings"))?
        .collect::<Result<_, _>>()
        .map_err(sql("list warnings"))
    }
}
