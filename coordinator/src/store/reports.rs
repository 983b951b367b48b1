//! The measurement tables: `reports` with their `histograms`, `counters` and `patterns`, written
//! in group-committed batches by the ingest writer and read back by the comparison engine and
//! the usage views. Kept apart because it is the hot path: the writer's one transaction per
//! batch and the range queries over it change for other reasons than the control-plane tables.

use doppel_common::wire::{FlowScope, IntervalReport, LatencyMetric, ResourceUsage};
use rusqlite::{OptionalExtension as _, params};

use super::{Store, StoreError, i64_of, sql};

/// A report checked by the connection that received it: histograms that did not decode are
/// removed (and counted in `rejected_histograms`, and logged), the others' exchange counts
/// computed, so the writer never decodes.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckedReport {
    /// The report, valid histograms only.
    pub report: IntervalReport,
    /// Exchanges in each of `report.histograms`.
    pub counts: Vec<u64>,
    /// Histograms removed because they did not decode.
    pub rejected_histograms: u32,
}

impl CheckedReport {
    /// Decodes every histogram once, keeping the valid ones.
    pub fn check(mut report: IntervalReport) -> Self {
        let mut counts = Vec::with_capacity(report.histograms.len());
        let before = report.histograms.len();
        report.histograms.retain(|h| match h.histogram.decode() {
            Ok(decoded) => {
                counts.push(decoded.len());
                true
            }
            Err(e) => {
                tracing::warn!(
                    seq = report.seq,
                    service = %h.service,
                    class = h.class,
                    error = %e,
                    "dropping a histogram that does not decode"
                );
                false
            }
        });
        let rejected_histograms =
            u32::try_from(before - report.histograms.len()).unwrap_or(u32::MAX);
        Self {
            report,
            counts,
            rejected_histograms,
        }
    }
}

/// Whether a report was new or a duplicate of one already stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored now.
    Stored,
    /// Already stored earlier (same agent, same sequence number): counted once.
    Duplicate,
}

/// One stored histogram of one interval, for the comparison engine.
#[derive(Clone, Debug, PartialEq)]
pub struct IntervalHistogram {
    /// The reporting agent.
    pub agent: String,
    /// Interval start, ms since the epoch.
    pub interval_start_ms: i64,
    /// Interval length, ms.
    pub interval_ms: i64,
    /// Traffic class.
    pub class: u16,
    /// Which flows.
    pub scope: FlowScope,
    /// What was measured.
    pub metric: LatencyMetric,
    /// HdrHistogram V2 bytes.
    pub hist: Vec<u8>,
    /// `exchange_errors` counter of the report, shared by its histograms.
    pub errors: u64,
}

fn scope_code(scope: FlowScope) -> i64 {
    match scope {
        FlowScope::All => 0,
        FlowScope::Mirrored => 1,
    }
}

fn metric_code(metric: LatencyMetric) -> i64 {
    match metric {
        LatencyMetric::KernelFirstByte => 0,
        LatencyMetric::ReplayFirstByte => 1,
        LatencyMetric::ReplayLastByte => 2,
    }
}

impl Store {
    /// Stores a batch of reports in one transaction. Either every report of the batch is
    /// durable when this returns `Ok`, or none is.
    pub fn ingest_batch(
        &mut self,
        batch: &[(&str, &CheckedReport)],
        received_ms: i64,
    ) -> Result<Vec<IngestOutcome>, StoreError> {
        let tx = self.write_transaction("begin ingest")?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut agent_id = tx
                .prepare_cached("SELECT id FROM agents WHERE name = ?1")
                .map_err(sql("prepare"))?;
            let mut insert_agent = tx
                .prepare_cached(
                    "INSERT INTO agents (name, first_seen_ms, last_seen_ms) VALUES (?1, ?2, ?2)
                     ON CONFLICT(name) DO UPDATE SET last_seen_ms = ?2 RETURNING id",
                )
                .map_err(sql("prepare"))?;
            let mut insert_report = tx
                .prepare_cached(
                    "INSERT INTO reports (agent_id, seq, interval_start_ms, interval_ms, received_ms,
                        host_cpu_time_us, host_cpu_capacity_millis, host_memory_used,
                        host_memory_limit, host_net_rx, host_net_tx, host_disk_read,
                        host_disk_write, workload_usage, rejected_histograms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
                     ON CONFLICT(agent_id, seq) DO NOTHING",
                )
                .map_err(sql("prepare"))?;
            let mut insert_hist = tx
                .prepare_cached(
                    "INSERT INTO histograms (report_id, service, class, scope, metric, count, hist)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(sql("prepare"))?;
            let mut insert_counter = tx
                .prepare_cached("INSERT INTO counters (report_id, name, value) VALUES (?1, ?2, ?3)")
                .map_err(sql("prepare"))?;
            let mut insert_pattern = tx
                .prepare_cached(
                    "INSERT INTO patterns (report_id, pattern, flows) VALUES (?1, ?2, ?3)",
                )
                .map_err(sql("prepare"))?;
            let mut update_seq = tx
                .prepare_cached(
                    "UPDATE agents SET last_seen_ms = ?2,
                        last_seq = max(coalesce(last_seq, -1), ?3) WHERE id = ?1",
                )
                .map_err(sql("prepare"))?;
            for &(agent, checked) in batch {
                let report = &checked.report;
                let id: i64 = match agent_id
                    .query_row([agent], |r| r.get(0))
                    .optional()
                    .map_err(sql("find agent"))?
                {
                    Some(id) => id,
                    None => insert_agent
                        .query_row(params![agent, received_ms], |r| r.get(0))
                        .map_err(sql("insert agent"))?,
                };
                let host = &report.host;
                let workload = report.workload.as_ref().map(usage_json).transpose()?;
                let inserted = insert_report
                    .execute(params![
                        id,
                        i64_of(report.seq),
                        i64_of(report.interval_start_unix_ms),
                        report.interval_ms,
                        received_ms,
                        i64_of(host.cpu_time_us),
                        host.cpu_capacity_millis,
                        i64_of(host.memory_used_bytes),
                        i64_of(host.memory_limit_bytes),
                        i64_of(host.net_rx_bytes),
                        i64_of(host.net_tx_bytes),
                        i64_of(host.disk_read_bytes),
                        i64_of(host.disk_write_bytes),
                        workload,
                        checked.rejected_histograms,
                    ])
                    .map_err(sql("insert report"))?;
                if inserted == 0 {
                    outcomes.push(IngestOutcome::Duplicate);
                    continue;
                }
                let report_id = tx.last_insert_rowid();
                for (h, &count) in report.histograms.iter().zip(&checked.counts) {
                    insert_hist
                        .execute(params![
                            report_id,
                            h.service,
                            h.class,
                            scope_code(h.scope),
                            metric_code(h.metric),
                            i64_of(count),
                            h.histogram.0,
                        ])
                        .map_err(sql("insert histogram"))?;
                }
                for c in &report.counters {
                    insert_counter
                        .execute(params![report_id, c.name, i64_of(c.value)])
                        .map_err(sql("insert counter"))?;
                }
                for p in &report.patterns {
                    insert_pattern
                        .execute(params![report_id, p.pattern, i64_of(p.flows)])
                        .map_err(sql("insert pattern"))?;
                }
                update_seq
                    .execute(params![id, received_ms, i64_of(report.seq)])
                    .map_err(sql("update agent"))?;
                outcomes.push(IngestOutcome::Stored);
            }
        }
        tx.commit().map_err(sql("commit ingest"))?;
        Ok(outcomes)
    }

    /// Sequence numbers an agent's stored reports carry, ascending (tests and diagnostics).
    pub fn report_seqs(&self, agent: &str) -> Result<Vec<u64>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT r.seq FROM reports r JOIN agents a ON a.id = r.agent_id
                 WHERE a.name = ?1 ORDER BY r.seq",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map([agent], |r| r.get::<_, i64>(0))
            .map_err(sql("list reports"))?
            .map(|s| s.map(|s| u64::try_from(s).unwrap_or_default()))
            .collect::<Result<_, _>>()
            .map_err(sql("list reports"))
    }

    /// Histograms of `agents` for intervals starting in `[since_ms, until_ms)`, with the
    /// `exchange_errors` counter of their report.
    pub fn interval_histograms(
        &self,
        agents: &[&str],
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<IntervalHistogram>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT a.name, r.interval_start_ms, r.interval_ms, h.class, h.scope, h.metric,
                    h.hist,
                    coalesce((SELECT sum(c.value) FROM counters c
                              WHERE c.report_id = r.id AND c.name = 'exchange_errors'), 0)
                 FROM reports r
                 JOIN agents a ON a.id = r.agent_id
                 JOIN histograms h ON h.report_id = r.id
                 WHERE a.name = ?1 AND r.interval_start_ms >= ?2 AND r.interval_start_ms < ?3",
            )
            .map_err(sql("prepare"))?;
        let mut out = Vec::new();
        for agent in agents {
            let rows = stmt
                .query_map(params![agent, since_ms, until_ms], |r| {
                    let scope = match r.get::<_, i64>(4)? {
                        1 => FlowScope::Mirrored,
                        _ => FlowScope::All,
                    };
                    let metric = match r.get::<_, i64>(5)? {
                        1 => LatencyMetric::ReplayFirstByte,
                        2 => LatencyMetric::ReplayLastByte,
                        _ => LatencyMetric::KernelFirstByte,
                    };
                    Ok(IntervalHistogram {
                        agent: r.get(0)?,
                        interval_start_ms: r.get(1)?,
                        interval_ms: r.get(2)?,
                        class: r.get(3)?,
                        scope,
                        metric,
                        hist: r.get(6)?,
                        errors: u64::try_from(r.get::<_, i64>(7)?).unwrap_or_default(),
                    })
                })
                .map_err(sql("read histograms"))?;
            for row in rows {
                out.push(row.map_err(sql("read histograms"))?);
            }
        }
        Ok(out)
    }

    /// The workload resource use (CPU, memory, … of the workload's cgroup or process tree) the
    /// `agents` reported for intervals starting in `[since_ms, until_ms)`: (agent, interval
    /// start ms, usage). Reports without it are skipped, as is a row that no longer parses.
    pub fn workload_usage(
        &self,
        agents: &[&str],
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, i64, ResourceUsage)>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT a.name, r.interval_start_ms, r.workload_usage
                 FROM reports r
                 JOIN agents a ON a.id = r.agent_id
                 WHERE a.name = ?1 AND r.interval_start_ms >= ?2 AND r.interval_start_ms < ?3
                   AND r.workload_usage IS NOT NULL",
            )
            .map_err(sql("prepare"))?;
        let mut out = Vec::new();
        for agent in agents {
            let rows = stmt
                .query_map(params![agent, since_ms, until_ms], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(sql("read workload usage"))?;
            for row in rows {
                let (agent, start, json) = row.map_err(sql("read workload usage"))?;
                if let Ok(usage) = serde_json::from_str::<ResourceUsage>(&json) {
                    out.push((agent, start, usage));
                }
            }
        }
        Ok(out)
    }
}

fn usage_json(usage: &ResourceUsage) -> Result<String, StoreError> {
    serde_json::to_string(usage).map_err(|source| StoreError::Json {
        what: "workload resource usage",
        source,
    })
}
