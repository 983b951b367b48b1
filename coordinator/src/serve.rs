//! `doppel serve`: the coordinator's running parts wired together — QUIC ingest, the ingest
//! writer, CRL reloading, policy publication — with one shutdown switch.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use doppel_common::wire::DEFAULT_MAX_FRAME_LEN;
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    act::{ActionConfig, Actor},
    api::{self, ApiStartError},
    ca::{CaError, CertificateAuthority},
    compare::CompareConfig,
    net::{self, Hub, IngestServer, NetError, PolicySnapshot, ServerContext, tls},
    shadows::{
        SimConfig,
        catalog::{self, VmType, price_table},
        manager::{ManagerParts, ShadowManager},
    },
    store::{Store, StoreError, ingest},
    webhook::{DecisionStats, Recommender, WebhookConfig},
};

/// The shortest age limit for acting on a recommendation, ms (see `Actor::max_age_ms`).
const MIN_ACTION_AGE_LIMIT_MS: i64 = 60_000;

/// Everything `doppel serve` reads from its config file and flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// State directory: CA, database, API token.
    pub state_dir: PathBuf,
    /// QUIC listen address for agents.
    pub quic_listen: SocketAddr,
    /// HTTP API listen address (CLI, `/metrics`). Loopback by default: the token is the only
    /// authentication and travels in clear text.
    pub api_listen: SocketAddr,
    /// Days of measurements (reports, comparisons, finished webhook deliveries) kept.
    pub retention_days: u32,
    /// Serve the stored data only, to browse it (a kept demo, a copy of a production
    /// database): the API and the dashboard answer reads, and nothing ingests, evaluates,
    /// recommends, acts, delivers, learns, provisions shadows or deletes old data; the API
    /// refuses changes.
    pub browse_only: bool,
    /// Largest frame accepted from an agent, bytes.
    pub max_frame_len: usize,
    /// The VM catalog (`[[vm_types]]`): prices for cost deltas and budgets, sizes and priors for
    /// shadow-pool steering, `local` limits for the local provisioner ([`catalog`]).
    pub vm_types: Vec<VmType>,
    /// Comparison tunables (`[compare]`).
    pub compare: CompareConfig,
    /// Default comparison window, ms (`doppel compare` and recommendations). Files from before
    /// every duration was in milliseconds say `compare_window_secs`, which is still read.
    pub compare_window_ms: u64,
    /// Time between two evaluations (comparison and recommendation of every workload), ms.
    pub evaluate_interval_ms: u64,
    /// How often learned mirroring reads the live agents' pattern counts and replans (ms).
    pub mirror_interval_ms: u64,
    /// The predictor: warning horizon and thresholds, history, performance-model window.
    pub forecast: crate::forecast::ForecastSettings,
    /// Webhooks receiving recommendations (`[[webhooks]] url, secret`).
    pub webhooks: Vec<WebhookConfig>,
    /// First webhook retry delay, ms; doubled per attempt up to 15 min.
    pub webhook_backoff_ms: u64,
    /// Attempts per delivery before giving up.
    pub webhook_max_attempts: u32,
    /// Scale actions act-mode workloads may name (`[[actions]] name, command, timeout_ms,
    /// verify_after_ms`).
    pub actions: Vec<ActionConfig>,
    /// The Shadow Instance Manager (`[sim]`).
    pub sim: SimConfig,
}

/// A config value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid `{field}`: {reason}")]
pub struct InvalidConfig {
    /// The offending field, e.g. `vm_types[2].price_per_hour`.
    pub field: String,
    /// Why.
    pub reason: String,
}

impl ServeConfig {
    /// Checks what TOML types alone cannot.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let invalid = |field: String, reason: &str| {
            Err(InvalidConfig {
                field,
                reason: reason.to_owned(),
            })
        };
        catalog::validate(&self.vm_types).map_err(|e| InvalidConfig {
            field: e.field,
            reason: e.reason,
        })?;
        let c = &self.compare;
        if !(c.load_tolerance > 0.0 && c.load_tolerance < 1.0) {
            return invalid("compare.load_tolerance".into(), "must be in (0, 1)");
        }
        if c.min_pairs < 2 {
            return invalid(
                "compare.min_pairs".into(),
                "at least 2 pairs are needed for a confidence interval",
            );
        }
        if self.compare_window_ms < 1000 {
            return invalid("compare_window_ms".into(), "must be at least 1000");
        }
        if self.evaluate_interval_ms < 100 {
            return invalid("evaluate_interval_ms".into(), "must be at least 100");
        }
        if self.mirror_interval_ms < 100 {
            return invalid("mirror_interval_ms".into(), "must be at least 100");
        }
        if let Err((field, reason)) = self.forecast.validate() {
            return invalid(format!("forecast.{field}"), reason);
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if reqwest::Url::parse(&w.url)
                .map(|u| !matches!(u.scheme(), "http" | "https"))
                .unwrap_or(true)
            {
                return invalid(format!("webhooks[{i}].url"), "not an http(s) URL");
            }
            if w.secret.len() < 16 {
                return invalid(
                    format!("webhooks[{i}].secret"),
                    "use at least 16 characters",
                );
            }
        }
        if self.webhook_backoff_ms == 0 {
            return invalid("webhook_backoff_ms".into(), "must be positive");
        }
        if self.webhook_max_attempts == 0 {
            return invalid("webhook_max_attempts".into(), "must be positive");
        }
        let mut action_names = std::collections::HashSet::new();
        for (i, a) in self.actions.iter().enumerate() {
            if a.name.trim().is_empty() {
                return invalid(format!("actions[{i}].name"), "must not be empty");
            }
            if !action_names.insert(a.name.as_str()) {
                return invalid(format!("actions[{i}].name"), "listed twice");
            }
            if a.command.first().is_none_or(|p| p.is_empty()) {
                return invalid(format!("actions[{i}].command"), "needs a program");
            }
            if a.timeout_ms == 0 {
                return invalid(format!("actions[{i}].timeout_ms"), "must be positive");
            }
        }
        self.sim.validate().map_err(|e| InvalidConfig {
            field: e.field,
            reason: e.reason,
        })
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/doppel"),
            quic_listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            api_listen: SocketAddr::from(([127, 0, 0, 1], 7480)),
            retention_days: 14,
            browse_only: false,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            vm_types: Vec::new(),
            compare: CompareConfig::default(),
            compare_window_ms: 900_000,
            evaluate_interval_ms: 60_000,
            mirror_interval_ms: 10_000,
            forecast: crate::forecast::ForecastSettings::default(),
            webhooks: Vec::new(),
            webhook_backoff_ms: 1_000,
            webhook_max_attempts: 12,
            actions: Vec::new(),
            sim: SimConfig::default(),
        }
    }
}

/// Why the coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The CA is missing or unreadable.
    #[error("certificate authority")]
    Ca(#[source] CaError),
    /// TLS material could not be loaded.
    #[error("TLS setup")]
    Tls(#[source] tls::TlsError),
    /// The store could not be opened.
    #[error("store")]
    Store(#[source] StoreError),
    /// The QUIC endpoint could not be bound.
    #[error("QUIC endpoint")]
    Net(#[source] NetError),
    /// The HTTP API could not start.
    #[error("HTTP API")]
    Api(#[source] ApiStartError),
    /// A thread could not be started.
    #[error("cannot start the ingest writer thread")]
    Thread(#[source] std::io::Error),
}

/// Deletes measurements older than the retention period, at start and then hourly.
async fn run_retention(
    store: Store,
    days: u32,
    clock: crate::clock::Clock,
    mut shutdown: watch::Receiver<bool>,
) {
    let store = Arc::new(Mutex::new(store));
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let cutoff = clock.now_ms() - i64::from(days) * 86_400_000;
        let store = Arc::clone(&store);
        let result = tokio::task::spawn_blocking(move || {
            store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .apply_retention(cutoff)
        })
        .await;
        match result {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(deleted)) => info!(deleted, "retention: old reports deleted"),
            Ok(Err(e)) => warn!(error = %e, "retention failed; will retry"),
        }
    }
}

/// A running coordinator.
#[derive(Debug)]
pub struct Coordinator {
    /// Where agents connect.
    pub quic_addr: SocketAddr,
    /// Where the HTTP API listens.
    pub api_addr: SocketAddr,
    policy: Arc<watch::Sender<Arc<PolicySnapshot>>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    writer: std::thread::JoinHandle<()>,
}

impl Coordinator {
    /// Starts every part. The CA must exist (`doppel ca init`).
    pub async fn start(config: ServeConfig) -> Result<Self, ServeError> {
        let ca = CertificateAuthority::in_state_dir(&config.state_dir);
        if !ca.path(crate::ca::CA_KEY).exists() {
            return Err(ServeError::Ca(CaError::NotInitialised(ca.dir().to_owned())));
        }
        let (crl, _) = tls::load_crl(&ca).map_err(ServeError::Tls)?;
        let verifier = Arc::new(
            tls::AgentVerifier::new(tls::ca_certs(&ca).map_err(ServeError::Tls)?, Some(crl))
                .map_err(ServeError::Tls)?,
        );
        let server_config =
            tls::server_config(&ca, Arc::clone(&verifier)).map_err(ServeError::Tls)?;

        let open = || Store::open_in(&config.state_dir).map_err(ServeError::Store);
        let bookkeeping = open()?;
        bookkeeping
            .all_agents_disconnected()
            .map_err(ServeError::Store)?;
        let snapshot = PolicySnapshot::load(&bookkeeping).map_err(ServeError::Store)?;
        let (policy_tx, policy_rx) = watch::channel(Arc::new(snapshot));
        let clock = crate::clock::Clock::system();
        let (ingest, writer) = ingest::spawn(open()?, clock.clone()).map_err(ServeError::Thread)?;
        let hub = Arc::new(Hub::default());
        let (shutdown, shutdown_rx) = watch::channel(false);

        let server =
            IngestServer::bind(config.quic_listen, server_config).map_err(ServeError::Net)?;
        let quic_addr = server.local_addr().map_err(|source| {
            ServeError::Net(NetError::Bind {
                addr: config.quic_listen,
                source,
            })
        })?;
        let ctx = Arc::new(ServerContext {
            clock: clock.clone(),
            ingest,
            store: Arc::new(Mutex::new(bookkeeping)),
            policy: policy_rx,
            hub: Arc::clone(&hub),
            max_frame_len: config.max_frame_len,
        });
        let policy = Arc::new(policy_tx);
        let token = api::load_or_create_token(&config.state_dir).map_err(ServeError::Api)?;
        let listener = api::bind(config.api_listen)
            .await
            .map_err(ServeError::Api)?;
        let api_addr = listener.local_addr().map_err(|source| {
            ServeError::Api(ApiStartError::Bind {
                addr: config.api_listen,
                source,
            })
        })?;
        api::write_addr_file(&config.state_dir, api_addr).map_err(ServeError::Api)?;
        let decision_stats = Arc::new(DecisionStats::default());
        let sim = Arc::new(ShadowManager::new(
            ManagerParts {
                provisioner: config.sim.provisioner(&config.state_dir),
                policy: Arc::clone(&policy),
                catalog: config.vm_types.clone(),
                ca: ca.clone(),
                shadows_dir: config.state_dir.join("shadows"),
                coordinator: config.sim.coordinator_address(quic_addr.port()),
                server_name: config.sim.server_name.clone(),
                retry_after_failure_ms: i64::try_from(config.sim.retry_after_failure_ms)
                    .unwrap_or(i64::MAX),
                window_ms: i64::try_from(config.compare_window_ms).unwrap_or(i64::MAX),
                gates: config.forecast.clone(),
                clock: clock.clone(),
            },
            open()?,
        ));
        let api_state = Arc::new(api::ApiState {
            ingest_stats: Arc::clone(ctx.ingest.stats()),
            decision_stats: Arc::clone(&decision_stats),
            sim: Arc::clone(&sim),
            store: Arc::new(Mutex::new(open()?)),
            policy: Arc::clone(&policy),
            hub: Arc::clone(&hub),
            token,
            prices: price_table(&config.vm_types),
            compare: config.compare,
            compare_window_ms: i64::try_from(config.compare_window_ms).unwrap_or(i64::MAX),
            clock: clock.clone(),
            sessions: Arc::default(),
            browse_only: config.browse_only,
        });
        let api_task = tokio::spawn(api::serve(
            listener,
            api::router(api_state),
            shutdown_rx.clone(),
        ));
        if config.browse_only {
            // Nothing else runs, and no agent's reports are taken: the data stays what it was.
            drop(server);
            info!(
                %api_addr,
                state_dir = %config.state_dir.display(),
                "coordinator browsing its data only"
            );
            return Ok(Self {
                quic_addr,
                api_addr,
                policy,
                shutdown,
                tasks: vec![api_task],
                writer,
            });
        }
        let recommender = Arc::new(Recommender {
            store: Arc::new(Mutex::new(open()?)),
            webhooks: config.webhooks.clone(),
            prices: price_table(&config.vm_types),
            compare: config.compare,
            window_ms: i64::try_from(config.compare_window_ms).unwrap_or(i64::MAX),
            evaluate_interval: Duration::from_millis(config.evaluate_interval_ms),
            backoff_base_ms: config.webhook_backoff_ms,
            max_attempts: config.webhook_max_attempts,
            stats: Arc::clone(&decision_stats),
            queued: tokio::sync::Notify::new(),
            forecasts: Mutex::new(crate::forecast::Forecasts::new(config.forecast.clone())),
            clock: clock.clone(),
        });
        let actor = Arc::new(Actor {
            store: Arc::new(Mutex::new(open()?)),
            actions: config
                .actions
                .iter()
                .map(|a| (a.name.clone(), a.clone()))
                .collect(),
            policy: Arc::clone(&policy),
            prices: price_table(&config.vm_types),
            compare: config.compare,
            // Five evaluation rounds, but never under a minute: `created_ms` is when the
            // evaluation that produced it started, and one evaluation of many workloads on a
            // loaded host can take longer than several short intervals (seen: 900 ms against a
            // 1 s limit, so the advice was never acted on).
            max_age_ms: i64::try_from(config.evaluate_interval_ms.saturating_mul(5))
                .unwrap_or(i64::MAX)
                .max(MIN_ACTION_AGE_LIMIT_MS),
            clock: clock.clone(),
            stats: decision_stats,
        });
        let mirror = crate::mirror::MirrorSteering::new(
            Arc::new(Mutex::new(open()?)),
            Arc::clone(&policy),
            clock.clone(),
        );
        let retention_store = open()?;
        let tasks = vec![
            api_task,
            tokio::spawn(server.run(Arc::clone(&ctx), shutdown_rx.clone())),
            tokio::spawn(crate::webhook::run_evaluator(
                Arc::clone(&recommender),
                shutdown_rx.clone(),
            )),
            tokio::spawn(crate::webhook::run_deliverer(
                Arc::clone(&recommender),
                shutdown_rx.clone(),
            )),
            tokio::spawn(crate::act::run_actor(
                actor,
                Duration::from_millis(config.evaluate_interval_ms),
                shutdown_rx.clone(),
            )),
            tokio::spawn(run_retention(
                retention_store,
                config.retention_days,
                clock.clone(),
                shutdown_rx.clone(),
            )),
            tokio::spawn(Arc::clone(&sim).run(
                Duration::from_millis(config.sim.reconcile_interval_ms),
                shutdown_rx.clone(),
            )),
            tokio::spawn(mirror.run(
                Duration::from_millis(config.mirror_interval_ms),
                shutdown_rx.clone(),
            )),
            tokio::spawn(net::watch_crl(ca, verifier, Arc::clone(&hub), shutdown_rx)),
        ];
        info!(%quic_addr, %api_addr, state_dir = %config.state_dir.display(), "coordinator running");
        Ok(Self {
            quic_addr,
            api_addr,
            policy,
            shutdown,
            tasks,
            writer,
        })
    }

    /// Reads the workloads from the store and publishes them to every connected agent (and to
    /// those connecting later). Called after every workload or policy change.
    pub fn publish_policy(&self, store: &Store) -> Result<u64, StoreError> {
        PolicySnapshot::publish(&self.policy, store)
    }

    /// Stops accepting, closes agent connections, lets the writer commit what it holds.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "a coordinator task ended abnormally");
            }
        }
        drop(self.policy);
        // The writer stops when the last ingest handle is gone (the tasks above held them).
        let joined = tokio::task::spawn_blocking(move || self.writer.join());
        if tokio::time::timeout(Duration::from_secs(5), joined)
            .await
            .is_err()
        {
            warn!("the ingest writer did not stop within 5 s");
        }
    }
}
