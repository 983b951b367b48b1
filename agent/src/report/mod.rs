//! Reporting to the coordinator without losing a report.
//!
//! Every interval's report goes first into the on-disk [`spool`], which numbers it; the
//! [`client`] sends what the spool holds over QUIC with mutual TLS and deletes a report only when
//! the coordinator acknowledges that it is durable in its store. After a disconnect the client
//! reconnects with backoff and jitter and sends everything unacknowledged again; the coordinator
//! counts each `(agent, seq)` once. The coordinator's policy updates arrive on the same
//! connection and are published through [`ReportHandle::policy`] for the data path to apply.
//!
//! Both roles start it the same way, from their file's `[coordinator]` section, with
//! [`ReportClient::from_config`]; only the role announced in `Hello` differs.
//!
//! When the spool is full, [`ReportHandle::submit`] waits for room (and [`ReportHandle::try_submit`]
//! hands the report back): the caller keeps measuring into its in-kernel histograms meanwhile, so
//! the next report covers more time, and no measurement is dropped.

pub mod client;
pub mod spool;

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

pub use client::{ClientConfig, ClientError};
use doppel_common::wire::{AgentRole, IntervalReport, PolicyUpdate};
pub use spool::{Spool, SpoolConfig, SpoolError};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tracing::warn;

/// Counters of the reporting client.
#[derive(Debug, Default)]
pub struct ReportStats {
    /// Connected to the coordinator now.
    pub connected: AtomicBool,
    /// Reports sent (resends included).
    pub sent: AtomicU64,
    /// Reports acknowledged and deleted from the spool.
    pub acked: AtomicU64,
    /// Connections that ended (each followed by a reconnect attempt).
    pub reconnects: AtomicU64,
    /// Times a report had to wait because the spool was full.
    pub spool_full: AtomicU64,
    /// Spooled reports that could not be read back and were moved aside.
    pub corrupt: AtomicU64,
}

/// The application side of the reporting client.
#[derive(Debug, Clone)]
pub struct ReportHandle {
    shared: Arc<client::Shared>,
    policy: watch::Receiver<Option<PolicyUpdate>>,
}

/// The running client: its handle, the task and the switch that stops it.
#[derive(Debug)]
pub struct ReportClient {
    /// Submit reports and watch the policy through it.
    pub handle: ReportHandle,
    /// The connection task.
    pub task: JoinHandle<Result<(), ClientError>>,
    /// Send `true` to stop.
    pub shutdown: watch::Sender<bool>,
}

impl ReportClient {
    /// Starts the client on `spool`. It connects in the background and keeps reconnecting.
    pub fn start(config: ClientConfig, spool: Spool) -> Self {
        let (policy_tx, policy) = watch::channel(None);
        let shared = Arc::new(client::Shared {
            spool: std::sync::Mutex::new(spool),
            new_report: Notify::new(),
            acked: Notify::new(),
            policy: policy_tx,
            stats: ReportStats::default(),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(client::run(config, Arc::clone(&shared), shutdown_rx));
        Self {
            handle: ReportHandle { shared, policy },
            task,
            shutdown,
        }
    }

    /// Opens the spool named in a `[coordinator]` section and starts the client for an agent
    /// running `role`. The host name goes into `Hello` for the operator's eyes.
    pub fn from_config(
        config: &crate::config::CoordinatorConfig,
        role: AgentRole,
    ) -> Result<Self, SpoolError> {
        let mut client = ClientConfig::new(
            config.address,
            config.server_name.clone(),
            config.ca_cert.clone(),
            config.cert.clone(),
            config.key.clone(),
        );
        client.roles = vec![role];
        client.hostname = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default();
        let spool = Spool::open(SpoolConfig::new(config.spool_dir.clone()))?;
        Ok(Self::start(client, spool))
    }

    /// Stops the client; unacknowledged reports stay in the spool for the next run.
    pub async fn stop(self) -> Result<(), ClientError> {
        let _ = self.shutdown.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

impl ReportHandle {
    /// Spools a report (its `seq` is assigned here) for delivery. When the spool is full, waits
    /// until acknowledgements make room. Returns the sequence number.
    pub async fn submit(&self, mut report: IntervalReport) -> Result<u64, SpoolError> {
        let mut warned = false;
        loop {
            let acked = self.shared.acked.notified();
            match self.try_submit(report) {
                Err(SpoolError::Full {
                    reports,
                    bytes,
                    report: back,
                }) => {
                    if !warned {
                        warn!(
                            reports,
                            bytes, "report spool full; waiting for the coordinator to acknowledge"
                        );
                        warned = true;
                    }
                    report = *back;
                    acked.await;
                }
                other => return other,
            }
        }
    }

    /// Spools a report, or hands it back inside [`SpoolError::Full`] (counted) when full.
    pub fn try_submit(&self, report: IntervalReport) -> Result<u64, SpoolError> {
        let result = self.shared.spool().push(report);
        match &result {
            Ok(_) => self.shared.new_report.notify_waiters(),
            Err(SpoolError::Full { .. }) => {
                self.shared.stats.spool_full.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {}
        }
        result
    }

    /// Waits until report `seq` has left the spool: the coordinator acknowledged that it is
    /// durable in its store (or, never silently, it was unreadable and moved aside, which
    /// [`ReportStats::corrupt`] counts). Returns at once for a report no longer spooled.
    ///
    /// What `cargo xtask bench ingest` times as report-to-durable latency.
    pub async fn acknowledged(&self, seq: u64) {
        loop {
            // Created before the check: `notify_waiters` reaches a `Notified` from its creation
            // on, so an ack landing between the check and the await is not missed.
            let acked = self.shared.acked.notified();
            if !self.shared.spool().contains(seq) {
                return;
            }
            acked.await;
        }
    }

    /// The latest policy from the coordinator (`None` until the first arrives).
    pub fn policy(&self) -> watch::Receiver<Option<PolicyUpdate>> {
        self.policy.clone()
    }

    /// Reports in the spool, waiting for acknowledgement.
    pub fn unacknowledged(&self) -> usize {
        self.shared.spool().len()
    }

    /// The client's counters.
    pub fn stats(&self) -> &ReportStats {
        &self.shared.stats
    }
}
