//! The ingest writer: one thread owning one store connection, group-committing reports.
//!
//! Connections hand reports over through a bounded channel and wait for the outcome; a report is
//! acknowledged to its agent only after the transaction holding it committed. When the channel
//! is full, senders wait, their connections stop reading, and QUIC flow control pushes back on
//! the agents, whose spools hold the reports: back-pressure, not loss. When a commit fails (disk
//! full, database locked past the busy timeout) every report of the batch gets the error and
//! stays unacknowledged.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use tokio::sync::{mpsc, oneshot};

use super::{CheckedReport, IngestOutcome, Store, StoreError};
use crate::clock::Clock;

/// Largest number of reports committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Reports waiting for the writer before senders are made to wait.
const QUEUE_DEPTH: usize = 4096;

/// Counters the writer keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Reports stored.
    pub stored: AtomicU64,
    /// Duplicate reports recognised (acknowledged, not stored again).
    pub duplicates: AtomicU64,
    /// Reports whose transaction failed.
    pub failed: AtomicU64,
    /// Histograms dropped because they did not decode.
    pub rejected_histograms: AtomicU64,
    /// Transactions committed.
    pub commits: AtomicU64,
    /// Ingest lag of the last stored report: commit time minus interval end, ms.
    pub last_lag_ms: AtomicU64,
}

struct Job {
    agent: Arc<str>,
    report: CheckedReport,
    reply: oneshot::Sender<Result<IngestOutcome, Arc<StoreError>>>,
}

/// Hands reports to the writer.
#[derive(Clone, Debug)]
pub struct IngestHandle {
    tx: mpsc::Sender<Job>,
    stats: Arc<IngestStats>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("agent", &self.agent)
            .field("seq", &self.report.report.seq)
            .finish_non_exhaustive()
    }
}

/// A report on its way to the store; await it for the outcome.
pub type PendingIngest = oneshot::Receiver<Result<IngestOutcome, Arc<StoreError>>>;

impl IngestHandle {
    /// Queues a report, waiting while the queue is full. The returned receiver yields the
    /// outcome once the report's transaction has committed or failed.
    pub async fn submit(
        &self,
        agent: Arc<str>,
        report: CheckedReport,
    ) -> Result<PendingIngest, StoreError> {
        let (reply, pending) = oneshot::channel();
        self.tx
            .send(Job {
                agent,
                report,
                reply,
            })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        Ok(pending)
    }

    /// The writer's counters.
    pub fn stats(&self) -> &Arc<IngestStats> {
        &self.stats
    }
}

/// Starts the writer thread on `store`; each batch is recorded as received at `clock`'s time. It
/// stops when every handle is dropped.
pub fn spawn(
    mut store: Store,
    clock: Clock,
) -> Result<(IngestHandle, thread::JoinHandle<()>), std::io::Error> {
    let (tx, mut rx) = mpsc::channel::<Job>(QUEUE_DEPTH);
    let stats = Arc::new(IngestStats::default());
    let writer_stats = Arc::clone(&stats);
    let thread = thread::Builder::new()
        .name("doppel-ingest".into())
        .spawn(move || {
            let mut jobs = Vec::with_capacity(MAX_BATCH);
            while let Some(first) = rx.blocking_recv() {
                jobs.push(first);
                while jobs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(job) => jobs.push(job),
                        Err(_) => break,
                    }
                }
                commit(&mut store, &mut jobs, clock.now_ms(), &writer_stats);
            }
        })?;
    Ok((IngestHandle { tx, stats }, thread))
}

fn commit(store: &mut Store, jobs: &mut Vec<Job>, received_ms: i64, stats: &IngestStats) {
    let batch: Vec<_> = jobs.iter().map(|j| (&*j.agent, &j.report)).collect();
    match store.ingest_batch(&batch, received_ms) {
        Ok(outcomes) => {
            stats.commits.fetch_add(1, Ordering::Relaxed);
            for (job, outcome) in jobs.drain(..).zip(outcomes) {
                match outcome {
                    IngestOutcome::Stored => {
                        stats.stored.fetch_add(1, Ordering::Relaxed);
                        let end = job
                            .report
                            .report
                            .interval_start_unix_ms
                            .saturating_add(u64::from(job.report.report.interval_ms));
                        let lag = u64::try_from(received_ms)
                            .unwrap_or_default()
                            .saturating_sub(end);
                        stats.last_lag_ms.store(lag, Ordering::Relaxed);
                    }
                    IngestOutcome::Duplicate => {
                        stats.duplicates.fetch_add(1, Ordering::Relaxed);
                    }
                }
                stats
                    .rejected_histograms
                    .fetch_add(u64::from(job.report.rejected_histograms), Ordering::Relaxed);
                // The connection may have closed meanwhile; the agent resends and gets a
                // duplicate acknowledged.
                let _ = job.reply.send(Ok(outcome));
            }
        }
        Err(e) => {
            // The whole cause chain ("…: database is locked"), so the operator sees why.
            tracing::error!(
                error = %doppel_common::error_chain(&e),
                reports = jobs.len(),
                back_pressure = e.is_back_pressure(),
                "ingest transaction failed; reports stay unacknowledged in the agents' spools"
            );
            let e = Arc::new(e);
            stats.failed.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            for job in jobs.drain(..) {
                let _ = job.reply.send(Err(Arc::clone(&e)));
            }
        }
    }
}
