//! The coordinator's store: one SQLite file in the state directory, WAL mode, schema in
//! [migrations](MIGRATIONS).
//!
//! [`Store`] wraps one connection and is synchronous; async callers use it from
//! `spawn_blocking` or through the [ingest writer](ingest), which owns a connection of its own and
//! group-commits reports. WAL lets readers (API, comparison) run beside that writer; writers wait
//! for each other up to the busy timeout, and a database that stays locked or full surfaces as a
//! [`StoreError`], never as a dropped report.
//!
//! This file holds the connection, its errors, the migrations and retention; the tables are
//! read and written by one file per group, each adding an `impl Store` block:
//! - `reports.rs`: reports and their histograms, counters and patterns (ingest, usage queries);
//! - `agents.rs`: agents and their connection state;
//! - `workloads.rs`: workloads, their policy history and shadow sessions, the policy revision;
//! - `recommendations.rs`: comparisons, recommendations and the webhook outbox;
//! - `actions.rs`: act mode's actions; `shadows.rs`: shadow instances and their events;
//! - `forecast.rs`: offered load, forecasts and warnings; `mirror.rs`: learned mirroring;
//! - `ingest.rs`: the writer thread that group-commits reports.

mod agents;
mod forecast;
pub mod ingest;
mod mirror;
mod recommendations;
mod reports;
pub mod shadows;
mod workloads;

pub use agents::AgentRow;
pub use forecast::{OfferedLoad, WarningRow};
pub use recommendations::{
    DeliveryAttempt, DeliveryOutcome, DeliveryRow, OutboxItem, RecommendationRow,
};
pub use reports::{CheckedReport, IngestOutcome, IntervalHistogram};
pub(crate) use workloads::write_workload;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::Connection;

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

/// One connection to the store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
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
