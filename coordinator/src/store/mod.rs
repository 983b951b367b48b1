//! The coordinator's store: one SQLite file in the state directory, WAL mode, schema in
//! [migrations](MIGRATIONS).
//!
//! [`Store`] wraps one connection and is synchronous; async callers use it from
//! `spawn_blocking` or through the [ingest writer](ingest), which owns a connection of its own and
//! group-commits reports. WAL lets readers (API, comparison) run beside that writer; writers wait
//! for each other up to the busy timeout, and a database that stays locked or full surfaces as a
//! [`StoreError`], never as a dropped report.

mod forecast;
pub mod ingest;
mod mirror;
pub mod shadows;

pub use forecast::{OfferedLoad, WarningRow};

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use doppel_common::wire::{FlowScope, Hello, IntervalReport, LatencyMetric, ResourceUsage};
use rusqlite::{Connection, OptionalExtension as _, params};
use serde::Serialize;

use crate::policy::{Policy, WorkloadSpec};

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
pub const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_actions.sql"),
    include_str!("migrations/0003_shadow_instances.sql"),
    include_str!("migrations/0004_forecast.sql"),
    include_str!("migrations/0005_mirror_plans.sql"),
];

/// The store's file name in the state directory.
pub const DB_FILE: &str = "doppel.db";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed (locked past the busy timeout, disk full, I/O error, constraint).
    #[error("database operation failed: {action}")]
    Sqlite {
        /// What was being done.
        action: &'static str,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored JSON document could not be read or written.
    #[error("stored document invalid: {what}")]
    Json {
        /// Which document.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The database was written by a newer coordinator.
    #[error("database schema version {found} is newer than this build's {supported}")]
    SchemaTooNew {
        /// Version found.
        found: usize,
        /// Newest this build knows.
        supported: usize,
    },
    /// The ingest writer has stopped.
    #[error("the ingest writer has stopped")]
    WriterGone,
    /// The named workload does not exist.
    #[error("no workload named {0:?}")]
    NoSuchWorkload(String),
}

impl StoreError {
    /// Whether the failure is the database being busy, locked or full: the caller should back
    /// off and retry (the API answers 503 with `Retry-After`), nothing was written.
    pub fn is_back_pressure(&self) -> bool {
        use rusqlite::ErrorCode::{DatabaseBusy, DatabaseLocked, DiskFull};
        match self {
            Self::Sqlite {
                source: rusqlite::Error::SqliteFailure(e, _),
                ..
            } => matches!(e.code, DatabaseBusy | DatabaseLocked | DiskFull),
            _ => false,
        }
    }
}

fn sql(action: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { action, source }
}

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

/// An agent as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentRow {
    /// Certificate common name.
    pub name: String,
    /// Host name it reported.
    pub hostname: String,
    /// Its software version.
    pub agent_version: String,
    /// Its roles.
    pub roles: String,
    /// Serial of the certificate it last connected with.
    pub cert_serial: String,
    /// Last connection or report, ms since the epoch.
    pub last_seen_ms: i64,
    /// Connected now.
    pub connected: bool,
    /// Highest report sequence stored.
    pub last_seq: Option<i64>,
    /// Reports stored.
    pub reports: i64,
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

/// One connection to the store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
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

fn i64_of(value: u64) -> i64 {
    // SQLite integers are signed 64-bit; counters beyond that saturate instead of wrapping.
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Store {
    /// Opens (creating if needed) the store in `state_dir` and brings its schema up to date.
    pub fn open_in(state_dir: &Path) -> Result<Self, StoreError> {
        Self::open(&state_dir.join(DB_FILE))
    }

    /// Opens (creating if needed) the store file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path).map_err(sql("open"))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sql("set busy timeout"))?;
        // WAL: readers never block the writer. synchronous=FULL: a committed transaction survives
        // power loss, which is what an Ack promises.
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(sql("enable WAL"))?;
        conn.pragma_update(None, "synchronous", "full")
            .map_err(sql("set synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "on")
            .map_err(sql("enable foreign keys"))?;
        migrate(&mut conn)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// Begins a transaction that writes. `BEGIN IMMEDIATE` takes the write lock at once, waiting
    /// up to the busy timeout for it. A deferred transaction would start as a reader, and its
    /// first write would fail at once with `SQLITE_BUSY` — without waiting — whenever another
    /// connection committed in between (a WAL snapshot cannot be upgraded); under load (agents
    /// connecting while reports are committed) that failed whole ingest batches.
    /// <https://www.sqlite.org/lang_transaction.html#deferred_immediate_and_exclusive_transactions>
    fn write_transaction(
        &mut self,
        action: &'static str,
    ) -> Result<rusqlite::Transaction<'_>, StoreError> {
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql(action))
    }

    /// The underlying connection, for the engine's read queries in tests.
    pub fn path(&self) -> &Path {
        &self.path
    }

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

    /// Records that an agent connected (handshake done). Returns the highest report sequence
    /// number stored for it, if any.
    pub fn agent_connected(
        &self,
        name: &str,
        hello: &Hello,
        serial: &str,
        now_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        let roles = hello
            .roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(",");
        let last_seq: Option<i64> = self
            .conn
            .query_row(
                "INSERT INTO agents (name, hostname, agent_version, roles, cert_serial,
                    first_seen_ms, last_seen_ms, connected)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1)
                 ON CONFLICT(name) DO UPDATE SET hostname = ?2, agent_version = ?3, roles = ?4,
                    cert_serial = ?5, last_seen_ms = ?6, connected = 1
                 RETURNING last_seq",
                params![
                    name,
                    hello.hostname,
                    hello.agent_version,
                    roles,
                    serial,
                    now_ms
                ],
                |r| r.get(0),
            )
            .map_err(sql("record agent connection"))?;
        Ok(last_seq.map(|s| u64::try_from(s).unwrap_or_default()))
    }

    /// Records that an agent disconnected.
    pub fn agent_disconnected(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE agents SET connected = 0, last_seen_ms = ?2 WHERE name = ?1",
                params![name, now_ms],
            )
            .map_err(sql("record agent disconnection"))?;
        Ok(())
    }

    /// Marks every agent disconnected (at start-up: connections do not survive a restart).
    pub fn all_agents_disconnected(&self) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE agents SET connected = 0", [])
            .map_err(sql("reset connections"))?;
        Ok(())
    }

    /// Every agent that ever connected or reported.
    pub fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT a.name, a.hostname, a.agent_version, a.roles, a.cert_serial,
                    a.last_seen_ms, a.connected, a.last_seq,
                    (SELECT count(*) FROM reports r WHERE r.agent_id = a.id)
                 FROM agents a ORDER BY a.name",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map([], |r| {
            Ok(AgentRow {
                name: r.get(0)?,
                hostname: r.get(1)?,
                agent_version: r.get(2)?,
                roles: r.get(3)?,
                cert_serial: r.get(4)?,
                last_seen_ms: r.get(5)?,
                connected: r.get::<_, i64>(6)? != 0,
                last_seq: r.get(7)?,
                reports: r.get(8)?,
            })
        })
        .map_err(sql("list agents"))?
        .collect::<Result<_, _>>()
        .map_err(sql("list agents"))
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

    /// The current policy revision (bumped by every workload or policy change).
    pub fn policy_revision(&self) -> Result<u64, StoreError> {
        let value: i64 = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'policy_revision'",
                [],
                |r| r.get(0),
            )
            .map_err(sql("read policy revision"))?;
        Ok(u64::try_from(value).unwrap_or_default())
    }

    /// Creates or replaces a workload; returns the new policy revision.
    pub fn put_workload(&mut self, spec: &WorkloadSpec, now_ms: i64) -> Result<u64, StoreError> {
        let tx = self.write_transaction("begin")?;
        let revision = write_workload(&tx, spec, now_ms)?;
        tx.commit().map_err(sql("commit workload"))?;
        Ok(revision)
    }

    /// Replaces a workload's policy; returns the new policy revision.
    pub fn set_policy(
        &mut self,
        workload: &str,
        policy: &Policy,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut spec = self
            .workload(workload)?
            .ok_or_else(|| StoreError::NoSuchWorkload(workload.to_owned()))?;
        spec.policy = policy.clone();
        self.put_workload(&spec, now_ms)
    }

    /// Removes a workload; returns the new policy revision.
    pub fn remove_workload(&mut self, name: &str) -> Result<u64, StoreError> {
        let tx = self.write_transaction("begin")?;
        let removed = tx
            .execute("DELETE FROM workloads WHERE name = ?1", [name])
            .map_err(sql("remove workload"))?;
        if removed == 0 {
            return Err(StoreError::NoSuchWorkload(name.to_owned()));
        }
        let revision = bump_revision(&tx)?;
        tx.commit().map_err(sql("commit"))?;
        Ok(revision)
    }

    /// One workload.
    pub fn workload(&self, name: &str) -> Result<Option<WorkloadSpec>, StoreError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT spec FROM workloads WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("read workload"))?;
        json.map(|j| parse_spec(&j)).transpose()
    }

    /// The policy revision of a workload's last change.
    pub fn workload_revision(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let revision: Option<i64> = self
            .conn
            .query_row(
                "SELECT revision FROM workloads WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read workload revision"))?;
        Ok(revision.map(|r| u64::try_from(r).unwrap_or_default()))
    }

    /// Every workload, by name.
    pub fn workloads(&self) -> Result<Vec<WorkloadSpec>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT spec FROM workloads ORDER BY name")
            .map_err(sql("prepare"))?;
        let specs: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(sql("list workloads"))?
            .collect::<Result<_, _>>()
            .map_err(sql("list workloads"))?;
        specs.iter().map(|j| parse_spec(j)).collect()
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

    /// Deletes measurements and comparisons older than `before_ms`, and finished outbox items
    /// with their log. Returns the reports deleted.
    pub fn apply_retention(&self, before_ms: i64) -> Result<usize, StoreError> {
        let reports = self
            .conn
            .execute("DELETE FROM reports WHERE received_ms < ?1", [before_ms])
            .map_err(sql("retention: reports"))?;
        self.conn
            .execute(
                "DELETE FROM comparisons WHERE computed_ms < ?1",
                [before_ms],
            )
            .map_err(sql("retention: comparisons"))?;
        self.conn
            .execute(
                "DELETE FROM webhook_outbox WHERE coalesce(delivered_ms, given_up_ms) < ?1",
                [before_ms],
            )
            .map_err(sql("retention: outbox"))?;
        Ok(reports)
    }

    /// Bytes the database uses on disk (main file and WAL).
    pub fn size_bytes(&self) -> u64 {
        let file = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let mut wal = self.path.as_os_str().to_owned();
        wal.push("-wal");
        file(&self.path) + file(Path::new(&wal))
    }
}

fn usage_json(usage: &ResourceUsage) -> Result<String, StoreError> {
    serde_json::to_string(usage).map_err(|source| StoreError::Json {
        what: "workload resource usage",
        source,
    })
}

fn parse_spec(json: &str) -> Result<WorkloadSpec, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::Json {
        what: "workload",
        source,
    })
}

fn bump_revision(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    let value: i64 = tx
        .query_row(
            "UPDATE meta SET value = value + 1 WHERE key = 'policy_revision' RETURNING value",
            [],
            |r| r.get(0),
        )
        .map_err(sql("bump policy revision"))?;
    Ok(u64::try_from(value).unwrap_or_default())
}

fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(sql("read schema version"))?;
    let version = usize::try_from(version).unwrap_or_default();
    if version > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found: version,
            supported: MIGRATIONS.len(),
        });
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("begin migration"))?;
        tx.execute_batch(migration)
            .map_err(sql("apply migration"))?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )
        .map_err(sql("record schema version"))?;
        tx.commit().map_err(sql("commit migration"))?;
    }
    Ok(())
}

mod actions;
#[cfg(test)]
mod tests;

pub use actions::{ActionRow, ActionState};

/// Writes `spec` (its row, a policy history row, its shadow sessions) in `tx` under a new
/// policy revision, which it returns.
pub(crate) fn write_workload(
    tx: &rusqlite::Transaction<'_>,
    spec: &WorkloadSpec,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let json = serde_json::to_string(spec).map_err(|source| StoreError::Json {
        what: "workload",
        source,
    })?;
    let policy = serde_json::to_string(&spec.policy).map_err(|source| StoreError::Json {
        what: "policy",
        source,
    })?;
    let revision = bump_revision(tx)?;
    tx.execute(
        "INSERT INTO workloads (name, spec, revision, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT(name) DO UPDATE SET spec = ?2, revision = ?3, updated_ms = ?4",
        params![spec.name, json, i64_of(revision), now_ms],
    )
    .map_err(sql("store workload"))?;
    tx.execute(
        "INSERT INTO policies (workload, revision, policy, changed_ms) VALUES (?1, ?2, ?3, ?4)",
        params![spec.name, i64_of(revision), policy, now_ms],
    )
    .map_err(sql("store policy"))?;
    tx.execute(
        "DELETE FROM shadow_sessions WHERE workload = ?1",
        [&spec.name],
    )
    .map_err(sql("replace shadow sessions"))?;
    for s in &spec.shadows {
        tx.execute(
            "INSERT INTO shadow_sessions (workload, vni, agent, vm_type, shadow_addr, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                spec.name,
                s.vni,
                s.agent,
                s.vm_type,
                s.addr.to_string(),
                now_ms
            ],
        )
        .map_err(sql("store shadow session"))?;
    }
    Ok(revision)
}
