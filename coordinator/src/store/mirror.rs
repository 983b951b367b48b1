//! Learned mirroring's tables: what the live agents saw (pattern counts and classified flows per
//! report, read incrementally by report id) and the plan each learning workload's agents were
//! last sent.

use rusqlite::{OptionalExtension as _, params};

use super::{Store, StoreError, sql, workloads::bump_revision};

/// One live report's pattern evidence.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PatternReport {
    /// Report row id (increasing with arrival).
    pub id: i64,
    /// Interval start, ms since the epoch.
    pub interval_start_ms: i64,
    /// Interval length, ms.
    pub interval_ms: i64,
    /// Sampled pattern counts.
    pub patterns: Vec<(String, u64)>,
    /// Flows classified in the interval, all classes (`class_flows_*` summed); 0 from an agent
    /// that does not report them.
    pub classified_flows: u64,
}

impl Store {
    /// Reports of `agents` with a row id above `after_id`, oldest first, with their pattern
    /// counts and classified flows (the `maps::CLASS_FLOWS_COUNTER` counters summed).
    pub fn pattern_reports(
        &self,
        agents: &[&str],
        after_id: i64,
    ) -> Result<Vec<PatternReport>, StoreError> {
        let mut reports = self
            .conn
            .prepare_cached(
                "SELECT r.id, r.interval_start_ms, r.interval_ms,
                    coalesce((SELECT sum(c.value) FROM counters c
                              WHERE c.report_id = r.id AND c.name LIKE 'class\\_flows\\_%'
                              ESCAPE '\\'), 0)
                 FROM reports r JOIN agents a ON a.id = r.agent_id
                 WHERE a.name = ?1 AND r.id > ?2 ORDER BY r.id",
            )
            .map_err(sql("prepare"))?;
        let mut out = Vec::new();
        for agent in agents {
            let rows = reports
                .query_map(params![agent, after_id], |r| {
                    Ok(PatternReport {
                        id: r.get(0)?,
                        interval_start_ms: r.get(1)?,
                        interval_ms: r.get(2)?,
                        patterns: Vec::new(),
                        classified_flows: count(r, 3)?,
                    })
                })
                .map_err(sql("read pattern reports"))?;
            for row in rows {
                out.push(row.map_err(sql("read pattern reports"))?);
            }
        }
        let mut patterns = self
            .conn
            .prepare_cached("SELECT pattern, flows FROM patterns WHERE report_id = ?1")
            .map_err(sql("prepare"))?;
        for report in &mut out {
            report.patterns = patterns
                .query_map([report.id], |r| Ok((r.get::<_, String>(0)?, count(r, 1)?)))
                .map_err(sql("read patterns"))?
                .collect::<Result<_, _>>()
                .map_err(sql("read patterns"))?;
        }
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    /// Runs `query` (parameters: agent name, `since_ms`, `until_ms`) once per agent of `agents`
    /// and maps every row with `row`: the shape of each window read over a workload's agents.
    /// `what` names the read in errors.
    fn rows_per_agent<T>(
        &self,
        query: &str,
        what: &'static str,
        agents: &[&str],
        (since_ms, until_ms): (i64, i64),
        mut row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut stmt = self.conn.prepare_cached(query).map_err(sql("prepare"))?;
        let mut out = Vec::new();
        for agent in agents {
            let rows = stmt
                .query_map(params![agent, since_ms, until_ms], &mut row)
                .map_err(sql(what))?;
            for r in rows {
                out.push(r.map_err(sql(what))?);
            }
        }
        Ok(out)
    }

    /// Live's exchanges on mirrored flows per class, for intervals of `agents` starting in
    /// `[since_ms, until_ms)`: (interval start ms, interval ms, class, exchanges), from the counts
    /// stored at ingest (nothing is decoded).
    pub fn mirrored_exchanges(
        &self,
        agents: &[&str],
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(i64, i64, u16, u64)>, StoreError> {
        // scope 1 = mirrored flows, metric 0 = kernel first byte.
        self.rows_per_agent(
            "SELECT r.interval_start_ms, r.interval_ms, h.class, h.count
             FROM reports r
             JOIN agents a ON a.id = r.agent_id
             JOIN histograms h ON h.report_id = r.id AND h.scope = 1 AND h.metric = 0
             WHERE a.name = ?1 AND r.interval_start_ms >= ?2 AND r.interval_start_ms < ?3",
            "read mirrored exchanges",
            agents,
            (since_ms, until_ms),
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, count(r, 3)?)),
        )
    }

    /// Pattern counts of `agents`' reports with intervals starting in `[since_ms, until_ms)`,
    /// summed per pattern key.
    pub fn pattern_totals(
        &self,
        agents: &[&str],
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self.rows_per_agent(
            "SELECT p.pattern, sum(p.flows)
             FROM reports r
             JOIN agents a ON a.id = r.agent_id
             JOIN patterns p ON p.report_id = r.id
             WHERE a.name = ?1 AND r.interval_start_ms >= ?2 AND r.interval_start_ms < ?3
             GROUP BY p.pattern",
            "read pattern totals",
            agents,
            (since_ms, until_ms),
            |r| Ok((r.get::<_, String>(0)?, count(r, 1)?)),
        )?;
        let mut totals: std::collections::BTreeMap<String, u64> = Default::default();
        for (pattern, flows) in rows {
            *totals.entry(pattern).or_default() += flows;
        }
        Ok(totals.into_iter().collect())
    }

    /// Live's classified and mirrored flows per class (the `class_flows_N` and
    /// `class_mirrored_N` counters) of `agents`' reports with intervals starting in
    /// `[since_ms, until_ms)`: class -> (flows, mirrored).
    pub fn class_flow_totals(
        &self,
        agents: &[&str],
        since_ms: i64,
        until_ms: i64,
    ) -> Result<std::collections::BTreeMap<u16, (u64, u64)>, StoreError> {
        use doppel_common::maps::{CLASS_FLOWS_COUNTER, CLASS_MIRRORED_COUNTER};
        let rows = self.rows_per_agent(
            "SELECT c.name, sum(c.value)
             FROM reports r
             JOIN agents a ON a.id = r.agent_id
             JOIN counters c ON c.report_id = r.id
             WHERE a.name = ?1 AND r.interval_start_ms >= ?2 AND r.interval_start_ms < ?3
               AND c.name LIKE 'class\\_%' ESCAPE '\\'
             GROUP BY c.name",
            "read class totals",
            agents,
            (since_ms, until_ms),
            |r| Ok((r.get::<_, String>(0)?, count(r, 1)?)),
        )?;
        let mut totals: std::collections::BTreeMap<u16, (u64, u64)> = Default::default();
        for (name, value) in rows {
            let parsed = |prefix: &str| name.strip_prefix(prefix)?.parse::<u16>().ok();
            if let Some(class) = parsed(CLASS_FLOWS_COUNTER) {
                totals.entry(class).or_default().0 += value;
            } else if let Some(class) = parsed(CLASS_MIRRORED_COUNTER) {
                totals.entry(class).or_default().1 += value;
            }
        }
        Ok(totals)
    }

    /// The id a new pattern learner reads after: just before the first report whose interval
    /// started at or after `since_ms`, or the newest report when none did.
    pub fn report_id_before_intervals_since(&self, since_ms: i64) -> Result<i64, StoreError> {
        self.conn
            .query_row(
                "SELECT coalesce((SELECT min(id) - 1 FROM reports WHERE interval_start_ms >= ?1),
                                 (SELECT coalesce(max(id), 0) FROM reports))",
                [since_ms],
                |r| r.get(0),
            )
            .map_err(sql("read the first recent report id"))
    }

    /// Stores a workload's newest mirror plan. With `publish`, it also bumps the policy revision
    /// that carries it to the agents; without, it only refreshes what `doppel patterns` shows
    /// (the learned mix moved, what the agents do did not). Returns the policy revision.
    pub fn put_mirror_plan(
        &mut self,
        workload: &str,
        body: &serde_json::Value,
        now_ms: i64,
        publish: bool,
    ) -> Result<u64, StoreError> {
        if !publish {
            let refreshed = self
                .conn
                .execute(
                    "UPDATE mirror_plans SET body = ?2 WHERE workload = ?1",
                    params![workload, body.to_string()],
                )
                .map_err(sql("refresh mirror plan"))?;
            if refreshed == 1 {
                return self.policy_revision();
            }
        }
        let tx = self.write_transaction("begin")?;
        let revision = bump_revision(&tx)?;
        tx.execute(
            "INSERT INTO mirror_plans (workload, revision, changed_ms, body)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (workload) DO UPDATE SET
                revision = excluded.revision, changed_ms = excluded.changed_ms,
                body = excluded.body",
            params![
                workload,
                i64::try_from(revision).unwrap_or(i64::MAX),
                now_ms,
                body.to_string()
            ],
        )
        .map_err(sql("write mirror plan"))?;
        tx.commit().map_err(sql("commit mirror plan"))?;
        Ok(revision)
    }

    /// Forgets a workload's mirror plan (learning turned off); its agents get the operator's
    /// classes back with the next revision. Returns that revision, or `None` when there was none.
    pub fn remove_mirror_plan(&mut self, workload: &str) -> Result<Option<u64>, StoreError> {
        let tx = self.write_transaction("begin")?;
        let removed = tx
            .execute("DELETE FROM mirror_plans WHERE workload = ?1", [workload])
            .map_err(sql("remove mirror plan"))?;
        if removed == 0 {
            return Ok(None);
        }
        let revision = bump_revision(&tx)?;
        tx.commit().map_err(sql("commit"))?;
        Ok(Some(revision))
    }

    /// One workload's mirror plan: (changed ms, body).
    pub fn mirror_plan(
        &self,
        workload: &str,
    ) -> Result<Option<(i64, serde_json::Value)>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn
            .query_row(
                "SELECT changed_ms, body FROM mirror_plans WHERE workload = ?1",
                [workload],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("read mirror plan"))?;
        Ok(row.and_then(|(ms, body)| Some((ms, serde_json::from_str(&body).ok()?))))
    }

    /// Every stored mirror plan: (workload, body), by workload.
    pub fn mirror_plans(&self) -> Result<Vec<(String, serde_json::Value)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT workload, body FROM mirror_plans ORDER BY workload")
            .map_err(sql("prepare"))?;
        let rows: Vec<(String, String)> = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(sql("list mirror plans"))?
            .collect::<Result<_, _>>()
            .map_err(sql("list mirror plans"))?;
        Ok(rows
            .into_iter()
            .filter_map(|(w, body)| Some((w, serde_json::from_str(&body).ok()?)))
            .collect())
    }
}

/// Column `i` of `row` as a count: stored as a signed integer, never negative when written, read
/// as 0 if it somehow is.
fn count(row: &rusqlite::Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(u64::try_from(row.get::<_, i64>(i)?).unwrap_or_default())
}
