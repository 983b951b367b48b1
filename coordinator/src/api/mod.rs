//! The HTTP API the `doppel` CLI talks to, on 127.0.0.1 by default.
//!
//! Every route but `/metrics` needs `Authorization: Bearer <token>`; the token is generated once
//! and kept in the state directory ([`TOKEN_FILE`], mode 0600), where the CLI finds it, next to
//! the address the API listens on ([`ADDR_FILE`]). Answers are JSON. A refused workload or
//! policy is a 400 naming the field (`{"error": …, "field": "policy.classes[0].sample_rate"}`);
//! a busy, locked or full database is a 503 with `Retry-After`: the change was not made and the
//! caller is told so, never silently dropped.
//!
//! Store work runs on the blocking pool, on the API's own connection. A change to workloads or
//! policy is written and then published to the agents ([`PolicySnapshot`]) while that
//! connection is held, so concurrent changes reach agents in the order they were committed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path as UrlPath, Query, Request, State},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::watch;

use crate::{
    compare::{CompareConfig, Comparison},
    measurements::{Timeline, compare_workload, timeline},
    net::{Hub, PolicySnapshot},
    policy::{InvalidPolicy, Policy, WorkloadSpec, validate, validate_policy},
    shadows::manager::{CreateShadow, PinRequest, ShadowManager, ShadowView, SimError},
    store::{
        ActionRow, AgentRow, DeliveryRow, RecommendationRow, Store, StoreError, WarningRow,
        ingest::IngestStats,
        shadows::{ShadowEvent, ShadowRow},
    },
    webhook::DecisionStats,
};

/// The API token's file name in the state directory.
pub const TOKEN_FILE: &str = "api.token";
/// The file in the state directory holding the address the API listens on.
pub const ADDR_FILE: &str = "api.addr";

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    /// The token or address file could not be read or written.
    #[error("cannot use {path}")]
    StateFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The listening socket could not be bound.
    #[error("cannot bind the HTTP API on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Reads the API token from `state_dir`, creating it (0600) when missing.
pub fn load_or_create_token(state_dir: &Path) -> Result<String, ApiStartError> {
    let path = state_dir.join(TOKEN_FILE);
    let state_file = |source| ApiStartError::StateFile {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(token) if !token.trim().is_empty() => return Ok(token.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(state_file(e)),
    }
    let token = crate::secret::random_token();
    write_private(&path, &token).map_err(state_file)?;
    Ok(token)
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Records the address the API listens on, for the CLI.
pub fn write_addr_file(state_dir: &Path, addr: SocketAddr) -> Result<(), ApiStartError> {
    let path = state_dir.join(ADDR_FILE);
    write_private(&path, &format!("{addr}\n"))
        .map_err(|source| ApiStartError::StateFile { path, source })
}

/// A request the API refuses or could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or a wrong bearer token.
    #[error("missing or wrong API token")]
    Unauthorized,
    /// A change asked of a coordinator that only browses its data.
    #[error("this coordinator only browses its stored data (browse_only): nothing can be changed")]
    BrowseOnly,
    /// The body is not a valid document of the expected shape.
    #[error("invalid `{field}`: {reason}")]
    BadBody {
        /// Path of the offending field (`body` when the JSON itself is malformed).
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// The workload or policy is refused.
    #[error(transparent)]
    Invalid(#[from] InvalidPolicy),
    /// The named workload does not exist.
    #[error("no workload named {0:?}")]
    NoSuchWorkload(String),
    /// The store failed.
    #[error("store")]
    Store(#[source] StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed")]
    Task(#[source] tokio::task::JoinError),
    /// A shadow lifecycle operation was refused or failed.
    #[error(transparent)]
    Sim(SimError),
}

impl From<SimError> for ApiError {
    fn from(e: SimError) -> Self {
        match e {
            SimError::NoSuchWorkload(name) => Self::NoSuchWorkload(name),
            SimError::Store(e) => Self::Store(e),
            e => Self::Sim(e),
        }
    }
}

/// The JSON body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable message, causes included.
    pub error: String,
    /// The offending field, for refused input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NoSuchWorkload(name) => Self::NoSuchWorkload(name),
            e => Self::Store(e),
        }
    }
}

use doppel_common::error_chain;

pub mod metrics;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, field) = match &self {
            Self::Unauthorized => (StatusCode::UNAUTHORIZED, None),
            Self::BrowseOnly => (StatusCode::CONFLICT, None),
            Self::BadBody { field, .. } => (StatusCode::BAD_REQUEST, Some(field.clone())),
            Self::Invalid(e) => (StatusCode::BAD_REQUEST, Some(e.field.clone())),
            Self::NoSuchWorkload(_) => (StatusCode::NOT_FOUND, None),
            Self::Store(e) if e.is_back_pressure() => (StatusCode::SERVICE_UNAVAILABLE, None),
            Self::Store(_) | Self::Task(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
            Self::Sim(e) => match e {
                SimError::NoSuchInstance(_) => (StatusCode::NOT_FOUND, None),
                SimError::NoTemplate(_) => (StatusCode::CONFLICT, Some("shadow".to_owned())),
                SimError::BadType { .. } => (StatusCode::BAD_REQUEST, Some("vm_type".to_owned())),
                SimError::OverBudget { .. } => (
                    StatusCode::CONFLICT,
                    Some("policy.budget.shadow_cost_per_hour".to_owned()),
                ),
                SimError::WrongState { .. } => (StatusCode::CONFLICT, None),
                // The provisioner (a script, iproute2) failed: a bad gateway, said in full.
                SimError::CreateFailed { .. } | SimError::DestroyFailed { .. } => {
                    (StatusCode::BAD_GATEWAY, None)
                }
                SimError::NoSuchWorkload(_) => (StatusCode::NOT_FOUND, None),
                SimError::Ca(_) | SimError::Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, None),
            },
        };
        if status.is_server_error() {
            tracing::warn!(error = %error_chain(&self), "API request failed");
        }
        let body = ErrorBody {
            error: error_chain(&self),
            field,
        };
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct ApiState {
    /// The API's own store connection.
    pub store: Arc<Mutex<Store>>,
    /// Where policy changes are published to agent connections.
    pub policy: Arc<watch::Sender<Arc<PolicySnapshot>>>,
    /// Connected agents.
    pub hub: Arc<Hub>,
    /// The bearer token.
    pub token: String,
    /// VM type prices.
    pub prices: HashMap<String, f64>,
    /// Comparison tunables.
    pub compare: CompareConfig,
    /// Default comparison window, ms.
    pub compare_window_ms: i64,
    /// The ingest writer's counters.
    pub ingest_stats: Arc<IngestStats>,
    /// The webhook deliverer's counters.
    pub decision_stats: Arc<DecisionStats>,
    /// The Shadow Instance Manager.
    pub sim: Arc<ShadowManager>,
    /// The coordinator's clock.
    pub clock: crate::clock::Clock,
    /// The dashboard's browser sessions, whose cookie reads the API in place of the token.
    pub sessions: Arc<crate::ui::Sessions>,
    /// Serving stored data only ([`crate::serve::ServeConfig::browse_only`]): changes refused.
    pub browse_only: bool,
}

impl ApiState {
    async fn with_store<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || f(&mut store.lock().unwrap_or_else(|e| e.into_inner())))
            .await
            .map_err(ApiError::Task)?
    }

    /// Applies a change and publishes the resulting policy while the store is held.
    async fn change(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Store) -> Result<u64, ApiError> + Send + 'static,
    ) -> Result<Json<Revision>, ApiError> {
        let policy = Arc::clone(&self.policy);
        let revision = self
            .with_store(move |store| {
                f(store)?;
                Ok(PolicySnapshot::publish(&policy, store)?)
            })
            .await?;
        // A new or changed workload may want shadows (or fewer): reconcile now.
        self.sim.poke();
        Ok(Json(Revision { revision }))
    }
}

/// The policy revision a change produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    /// Policy revision now in force.
    pub revision: u64,
}

/// An agent as `GET /v1/agents` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// Certificate common name.
    pub name: String,
    /// Host name it reported.
    pub hostname: String,
    /// Its software version.
    pub agent_version: String,
    /// Its roles.
    pub roles: String,
    /// Connected now.
    pub connected: bool,
    /// Last connection or report, ms since the epoch.
    pub last_seen_ms: i64,
    /// Reports stored.
    pub reports: i64,
    /// The workload it belongs to, if any.
    pub workload: Option<String>,
    /// Its VM type in that workload.
    pub vm_type: Option<String>,
    /// `live` or `shadow` in that workload.
    pub role_in_workload: Option<String>,
}

/// Parses a JSON body, naming the field that does not fit.
fn parse_body<T: DeserializeOwned>(body: &[u8], prefix: &str) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let malformed = e.inner().is_syntax() || e.inner().is_eof();
        let field = match (prefix, path.as_str()) {
            _ if malformed => "body".to_owned(),
            ("", ".") => "body".to_owned(),
            (prefix, ".") => prefix.to_owned(),
            ("", path) => path.to_owned(),
            (prefix, path) => format!("{prefix}.{path}"),
        };
        ApiError::BadBody {
            field,
            reason: e.into_inner().to_string(),
        }
    })
}

async fn list_workloads(
    State(state): State<Arc<ApiState>>,
) -> Result<Json<Vec<WorkloadSpec>>, ApiError> {
    state.with_store(|s| Ok(s.workloads()?)).await.map(Json)
}

async fn add_workload(
    State(state): State<Arc<ApiState>>,
    body: Bytes,
) -> Result<Json<Revision>, ApiError> {
    let spec: WorkloadSpec = parse_body(&body, "")?;
    // Pins name catalog types; a typo would silently pin nothing.
    if let Some(template) = &spec.shadow {
        for (list, types) in [("pin_in", &template.pin_in), ("pin_out", &template.pin_out)] {
            if let Some((i, name)) = types
                .iter()
                .enumerate()
                .find(|(_, t)| !state.prices.contains_key(*t))
            {
                return Err(ApiError::Invalid(InvalidPolicy {
                    field: format!("shadow.{list}[{i}]"),
                    reason: format!("{name:?} is not in the coordinator's [[vm_types]] catalog"),
                }));
            }
        }
    }
    let now = state.clock.now_ms();
    state
        .change(move |store| {
            validate(&spec, &store.workloads()?)?;
            Ok(store.put_workload(&spec, now)?)
        })
        .await
}

async fn show_workload(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<WorkloadSpec>, ApiError> {
    state
        .with_store(move |s| s.workload(&name)?.ok_or(ApiError::NoSuchWorkload(name)))
        .await
        .map(Json)
}

async fn remove_workload(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Revision>, ApiError> {
    state
        .change(move |store| Ok(store.remove_workload(&name)?))
        .await
}

async fn show_policy(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<Policy>, ApiError> {
    state
        .with_store(move |s| {
            s.workload(&name)?
                .map(|w| w.policy)
                .ok_or(ApiError::NoSuchWorkload(name))
        })
        .await
        .map(Json)
}

async fn set_policy(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<Json<Revision>, ApiError> {
    let policy: Policy = parse_body(&body, "policy")?;
    validate_policy(&policy)?;
    let now = state.clock.now_ms();
    state
        .change(move |store| Ok(store.set_policy(&name, &policy, now)?))
        .await
}

async fn list_agents(State(state): State<Arc<ApiState>>) -> Result<Json<Vec<AgentView>>, ApiError> {
    let connected = state.hub.connected();
    let (agents, workloads) = state
        .with_store(|s| Ok((s.agents()?, s.workloads()?)))
        .await?;
    let views = agents
        .into_iter()
        .map(|a: AgentRow| {
            let placement = workloads.iter().find_map(|w| {
                crate::policy::agent_placement(w, &a.name).map(|(vm, live)| (w, vm, live))
            });
            AgentView {
                // The hub is the truth for "connected now"; the row can lag by one write.
                connected: connected.contains(&a.name),
                workload: placement.map(|(w, _, _)| w.name.clone()),
                vm_type: placement.map(|(_, vm, _)| vm.to_owned()),
                role_in_workload: placement
                    .map(|(_, _, live)| if live { "live" } else { "shadow" }.to_owned()),
                name: a.name,
                hostname: a.hostname,
                agent_version: a.agent_version,
                roles: a.roles,
                last_seen_ms: a.last_seen_ms,
                reports: a.reports,
            }
        })
        .collect();
    Ok(Json(views))
}

/// Query of the list routes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListQuery {
    /// Only this workload.
    pub workload: Option<String>,
    /// Most rows (default 50).
    pub limit: Option<u32>,
}

async fn list_recommendations(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<RecommendationRow>>, ApiError> {
    state
        .with_store(move |s| {
            Ok(s.recommendations(query.workload.as_deref(), query.limit.unwrap_or(50))?)
        })
        .await
        .map(Json)
}

async fn list_actions(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<ActionRow>>, ApiError> {
    state
        .with_store(move |s| Ok(s.actions(query.workload.as_deref(), query.limit.unwrap_or(50))?))
        .await
        .map(Json)
}

/// `GET /v1/workloads/{name}/forecast`: the predictor's latest forecast of the workload and its
/// recent warning episodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForecastView {
    /// Workload.
    pub workload: String,
    /// The latest snapshot, once the evaluator has run (and `None` for one stored by a release
    /// whose snapshot no longer reads).
    pub forecast: Option<crate::forecast::ForecastSnapshot>,
    /// Warning episodes, newest first.
    pub warnings: Vec<WarningRow>,
}

async fn show_forecast(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ForecastView>, ApiError> {
    state
        .with_store(move |s| {
            if s.workload(&name)?.is_none() {
                return Err(ApiError::NoSuchWorkload(name));
            }
            let forecast = s.forecast(&name)?.and_then(|(_, body)| {
                serde_json::from_value(body)
                    .inspect_err(|e| {
                        tracing::warn!(workload = %name, error = %e, "stored forecast unreadable");
                    })
                    .ok()
            });
            let warnings = s.warnings(Some(&name), 10)?;
            Ok(ForecastView {
                workload: name,
                forecast,
                warnings,
            })
        })
        .await
        .map(Json)
}

/// `GET /v1/workloads/{name}/patterns`: the workload's learned mirroring: the pattern mix, and
/// the classes, rules and rates its live agents were last sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatternsView {
    /// Workload.
    pub workload: String,
    /// Whether the policy learns its mirroring.
    pub learning: bool,
    /// When the agents were last sent a new plan, ms since the epoch.
    pub changed_ms: Option<i64>,
    /// The newest plan (its pattern mix refreshed every round), once one was made.
    pub plan: Option<doppel_engine::mirror::MirrorPlan>,
    /// The window the coverage figures are over, ms.
    pub window_ms: i64,
    /// Per shadow, what it replayed against live's mix over the window (empty before a plan).
    pub coverage: Vec<crate::mirror::ShadowCoverage>,
}

/// Query of the endpoints that read a window back from now (`compare`, `patterns`).
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct WindowQuery {
    /// Window, ms (default: the endpoint's).
    pub window_ms: Option<i64>,
}

impl WindowQuery {
    /// The window asked for, or `default` when none was; a window that is not positive is the
    /// caller's error.
    fn window_ms_or(self, default: i64) -> Result<i64, ApiError> {
        match self.window_ms {
            Some(w) if w > 0 => Ok(w),
            Some(_) => Err(ApiError::BadBody {
                field: "window_ms".into(),
                reason: "must be positive".into(),
            }),
            None => Ok(default),
        }
    }
}

/// Default window of `GET /v1/workloads/{name}/patterns`' coverage figures: an hour, the eval's.
const PATTERNS_WINDOW_MS: i64 = 3_600_000;

async fn show_patterns(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<WindowQuery>,
) -> Result<Json<PatternsView>, ApiError> {
    let window_ms = query.window_ms_or(PATTERNS_WINDOW_MS)?;
    let now_ms = state.clock.now_ms();
    state
        .with_store(move |s| {
            let Some(spec) = s.workload(&name)? else {
                return Err(ApiError::NoSuchWorkload(name));
            };
            let stored = s.mirror_plan(&name)?;
            let plan: Option<doppel_engine::mirror::MirrorPlan> = stored
                .as_ref()
                .and_then(|(_, body)| serde_json::from_value(body.clone()).ok());
            let coverage = match &plan {
                Some(plan) => crate::mirror::shadow_coverage(s, &spec, plan, now_ms, window_ms)?,
                None => Vec::new(),
            };
            Ok(PatternsView {
                workload: name,
                learning: spec.policy.mirror.learn,
                changed_ms: stored.as_ref().map(|(ms, _)| *ms),
                plan,
                window_ms,
                coverage,
            })
        })
        .await
        .map(Json)
}

async fn list_warnings(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<WarningRow>>, ApiError> {
    state
        .with_store(move |s| Ok(s.warnings(query.workload.as_deref(), query.limit.unwrap_or(50))?))
        .await
        .map(Json)
}

async fn delivery_log(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<DeliveryRow>>, ApiError> {
    state
        .with_store(move |s| Ok(s.deliveries(query.limit.unwrap_or(50))?))
        .await
        .map(Json)
}

async fn compare_live_and_shadows(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<WindowQuery>,
) -> Result<Json<Comparison>, ApiError> {
    // Default: the serve config's comparison window.
    let window_ms = query.window_ms_or(state.compare_window_ms)?;
    let shared = Arc::clone(&state);
    state
        .with_store(move |s| {
            let spec = s.workload(&name)?.ok_or(ApiError::NoSuchWorkload(name))?;
            Ok(compare_workload(
                s,
                &spec,
                shared.clock.now_ms(),
                window_ms,
                &shared.compare,
                &shared.prices,
            )?)
        })
        .await
        .map(Json)
}

/// Query of `GET /v1/workloads/{name}/timeline`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct TimelineQuery {
    /// Window up to now, ms (default 15 minutes, at most [`MAX_TIMELINE_WINDOW_MS`]).
    pub window_ms: Option<i64>,
    /// Most points a series (default 600): intervals are merged into steps of at least
    /// `window_ms / points`.
    pub points: Option<i64>,
}

/// The longest window a timeline covers: a week.
pub const MAX_TIMELINE_WINDOW_MS: i64 = 7 * 24 * 3600 * 1000;

/// `GET /v1/workloads/{name}/timeline`: p50/p99, load and errors over time for live and each
/// shadow type, with live's moves, over `window_ms` up to now.
async fn show_timeline(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    Query(query): Query<TimelineQuery>,
) -> Result<Json<Timeline>, ApiError> {
    let window_ms = WindowQuery {
        window_ms: query.window_ms,
    }
    .window_ms_or(15 * 60 * 1000)?;
    if window_ms > MAX_TIMELINE_WINDOW_MS {
        return Err(ApiError::BadBody {
            field: "window_ms".into(),
            reason: format!("at most {MAX_TIMELINE_WINDOW_MS} (a week)"),
        });
    }
    let points = match query.points {
        None => 600,
        Some(p @ 1..=10_000) => p,
        Some(_) => {
            return Err(ApiError::BadBody {
                field: "points".into(),
                reason: "must be between 1 and 10000".into(),
            });
        }
    };
    let now_ms = state.clock.now_ms();
    state
        .with_store(move |s| {
            let spec = s.workload(&name)?.ok_or(ApiError::NoSuchWorkload(name))?;
            // A step never splits a report interval.
            let interval_ms = i64::from(spec.policy.report_interval_ms);
            let step_ms = (window_ms + points - 1) / points;
            Ok(timeline(
                s,
                &spec,
                now_ms.saturating_sub(window_ms),
                now_ms,
                step_ms.max(interval_ms),
            )?)
        })
        .await
        .map(Json)
}

/// What `POST /v1/ui/tickets` answers: a one-time login for the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UiTicket {
    /// The ticket.
    pub ticket: String,
    /// Until when it can be used, ms since the epoch.
    pub expires_ms: i64,
    /// The path that logs a browser in with it, relative to the API's address.
    pub path: String,
}

/// `POST /v1/ui/tickets`: a one-time dashboard login for `doppel ui`.
async fn mint_ui_ticket(State(state): State<Arc<ApiState>>) -> Json<UiTicket> {
    let (ticket, expires_ms) = state.sessions.mint_ticket(state.clock.now_ms());
    Json(UiTicket {
        path: format!("/ui/login?ticket={ticket}"),
        ticket,
        expires_ms,
    })
}

/// Query of `GET /v1/shadows`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ShadowQuery {
    /// Only this workload.
    pub workload: Option<String>,
    /// Destroyed and failed instances too.
    #[serde(default)]
    pub all: bool,
}

impl ApiState {
    async fn with_sim<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&ShadowManager) -> Result<T, SimError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let sim = Arc::clone(&self.sim);
        tokio::task::spawn_blocking(move || f(&sim))
            .await
            .map_err(ApiError::Task)?
            .map_err(ApiError::from)
    }
}

async fn list_shadows(
    State(state): State<Arc<ApiState>>,
    Query(query): Query<ShadowQuery>,
) -> Result<Json<Vec<ShadowView>>, ApiError> {
    let mut views = state.with_sim(move |sim| sim.list(query.all)).await?;
    if let Some(w) = &query.workload {
        views.retain(|v| v.row.workload == *w);
    }
    Ok(Json(views))
}

async fn create_shadow(
    State(state): State<Arc<ApiState>>,
    body: Bytes,
) -> Result<Json<ShadowRow>, ApiError> {
    let request: CreateShadow = parse_body(&body, "")?;
    state
        .with_sim(move |sim| sim.create_manual(&request.workload, &request.vm_type))
        .await
        .map(Json)
}

async fn shadow_events(
    State(state): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Vec<ShadowEvent>>, ApiError> {
    state.with_sim(move |sim| sim.events(&id)).await.map(Json)
}

async fn pause_shadow(
    State(state): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<ShadowRow>, ApiError> {
    state.with_sim(move |sim| sim.pause(&id)).await.map(Json)
}

async fn resume_shadow(
    State(state): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<ShadowRow>, ApiError> {
    state.with_sim(move |sim| sim.resume(&id)).await.map(Json)
}

async fn destroy_shadow(
    State(state): State<Arc<ApiState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<ShadowRow>, ApiError> {
    state.with_sim(move |sim| sim.destroy(&id)).await.map(Json)
}

async fn pin_shadow_type(
    State(state): State<Arc<ApiState>>,
    UrlPath(name): UrlPath<String>,
    body: Bytes,
) -> Result<Json<Revision>, ApiError> {
    let request: PinRequest = parse_body(&body, "")?;
    let revision = state.with_sim(move |sim| sim.pin(&name, &request)).await?;
    Ok(Json(Revision { revision }))
}

async fn require_token(
    State(state): State<Arc<ApiState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let is_get = request.method() == axum::http::Method::GET;
    // A dashboard session reads (and only reads): the pages show, the CLI changes. Looked up
    // only when the bearer token does not match.
    let authorized = crate::secret::token_matches(&state.token, given)
        || is_get
            && state
                .sessions
                .request_has_session(request.headers(), state.clock.now_ms());
    if !authorized {
        return Err(ApiError::Unauthorized);
    }
    // A ticket for the dashboard is a read too.
    let reads = is_get || request.uri().path() == "/v1/ui/tickets";
    if state.browse_only && !reads {
        return Err(ApiError::BrowseOnly);
    }
    Ok(next.run(request).await)
}

/// `GET /metrics`: Prometheus text exposition. Not behind the token, like every Prometheus
/// target: it carries counters and, per workload, VM type and role, latency, rate and error
/// gauges ([`metrics`]), no payloads, patterns or addresses.
async fn metrics(State(state): State<Arc<ApiState>>) -> Result<Response, ApiError> {
    use std::{fmt::Write as _, sync::atomic::Ordering::Relaxed};
    let now_ms = state.clock.now_ms();
    let (store_bytes, latency) = state
        .with_store(move |s| Ok((s.size_bytes(), metrics::workload_latency(s, now_ms)?)))
        .await?;
    let ingest = &state.ingest_stats;
    let decisions = &state.decision_stats;
    let net = &state.hub.stats;
    let lag_s = ingest.last_lag_ms.load(Relaxed) as f64 / 1e3;
    let metrics: [(&str, &str, &str, String); 16] = [
        (
            "doppel_agents_connected",
            "gauge",
            "Agents connected now.",
            state.hub.connected().len().to_string(),
        ),
        (
            "doppel_reports_ingested_total",
            "counter",
            "Reports stored durably.",
            ingest.stored.load(Relaxed).to_string(),
        ),
        (
            "doppel_ingest_commits_total",
            "counter",
            "Ingest transactions committed (reports per commit = ingested / commits).",
            ingest.commits.load(Relaxed).to_string(),
        ),
        (
            "doppel_reports_duplicate_total",
            "counter",
            "Duplicate reports acknowledged without storing.",
            ingest.duplicates.load(Relaxed).to_string(),
        ),
        (
            "doppel_reports_failed_total",
            "counter",
            "Reports whose transaction failed (left unacknowledged).",
            ingest.failed.load(Relaxed).to_string(),
        ),
        (
            "doppel_histograms_rejected_total",
            "counter",
            "Histograms dropped because they did not decode.",
            ingest.rejected_histograms.load(Relaxed).to_string(),
        ),
        (
            "doppel_ingest_lag_seconds",
            "gauge",
            "Commit time minus interval end of the last stored report.",
            lag_s.to_string(),
        ),
        (
            "doppel_store_size_bytes",
            "gauge",
            "Database file and WAL size.",
            store_bytes.to_string(),
        ),
        (
            "doppel_evaluations_total",
            "counter",
            "Evaluation rounds finished (every workload compared and forecast).",
            decisions.evaluations.load(Relaxed).to_string(),
        ),
        (
            "doppel_act_rounds_total",
            "counter",
            "Act-mode rounds finished (moves verified, fresh advice acted on).",
            decisions.act_rounds.load(Relaxed).to_string(),
        ),
        (
            "doppel_webhook_deliveries_total",
            "counter",
            "Webhook deliveries answered 2xx.",
            decisions.delivered.load(Relaxed).to_string(),
        ),
        (
            "doppel_webhook_delivery_failures_total",
            "counter",
            "Webhook attempts that failed.",
            decisions.failed_attempts.load(Relaxed).to_string(),
        ),
        (
            "doppel_webhook_given_up_total",
            "counter",
            "Webhook deliveries abandoned after the last attempt.",
            decisions.given_up.load(Relaxed).to_string(),
        ),
        (
            "doppel_recommendations_total",
            "counter",
            "Recommendations stored.",
            decisions.recommendations.load(Relaxed).to_string(),
        ),
        (
            "doppel_handshake_failures_total",
            "counter",
            "Agent TLS/QUIC handshakes that failed.",
            net.handshake_failures.load(Relaxed).to_string(),
        ),
        (
            "doppel_policy_updates_total",
            "counter",
            "Policy updates sent to agents.",
            net.policy_updates.load(Relaxed).to_string(),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in metrics {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    }
    out.push_str(&latency);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

/// The API's routes, token-protected, and the dashboard's ([`crate::ui`]).
pub fn router(state: Arc<ApiState>) -> Router {
    let ui = Arc::new(crate::ui::UiState {
        token: state.token.clone(),
        sessions: Arc::clone(&state.sessions),
        clock: state.clock.clone(),
    });
    Router::new()
        .route("/v1/workloads", get(list_workloads).post(add_workload))
        .route(
            "/v1/workloads/{name}",
            get(show_workload).delete(remove_workload),
        )
        .route(
            "/v1/workloads/{name}/policy",
            get(show_policy).put(set_policy),
        )
        .route(
            "/v1/workloads/{name}/compare",
            get(compare_live_and_shadows),
        )
        .route("/v1/agents", get(list_agents))
        .route("/v1/shadows", get(list_shadows).post(create_shadow))
        .route("/v1/shadows/{id}", axum::routing::delete(destroy_shadow))
        .route("/v1/shadows/{id}/events", get(shadow_events))
        .route("/v1/shadows/{id}/pause", post(pause_shadow))
        .route("/v1/shadows/{id}/resume", post(resume_shadow))
        .route(
            "/v1/workloads/{name}/pins",
            axum::routing::put(pin_shadow_type),
        )
        .route("/v1/recommendations", get(list_recommendations))
        .route("/v1/actions", get(list_actions))
        .route("/v1/workloads/{name}/forecast", get(show_forecast))
        .route("/v1/workloads/{name}/patterns", get(show_patterns))
        .route("/v1/warnings", get(list_warnings))
        .route("/v1/webhooks/log", get(delivery_log))
        .route("/v1/workloads/{name}/timeline", get(show_timeline))
        .route("/v1/ui/tickets", post(mint_ui_ticket))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_token,
        ))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(crate::ui::router(ui))
}

/// Binds the API's listener.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, ApiStartError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApiStartError::Bind { addr, source })
}

/// Serves `router` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP API stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misfitting_field_is_named_with_its_path() {
        let body = br#"{"report_interval_ms": 1000, "classes": [{"id": 0, "name": "d", "sample_rate": "lots"}]}"#;
        match parse_body::<Policy>(body, "policy") {
            Err(ApiError::BadBody { field, .. }) => {
                assert_eq!(field, "policy.classes[0].sample_rate");
            }
            other => panic!("expected BadBody, got {other:?}"),
        }
        match parse_body::<Policy>(b"{not json", "policy") {
            Err(ApiError::BadBody { field, .. }) => assert_eq!(field, "body"),
            other => panic!("expected BadBody, got {other:?}"),
        }
    }

    #[test]
    fn a_window_defaults_per_endpoint_and_must_be_positive() {
        let asked = |w| WindowQuery { window_ms: w };
        assert_eq!(asked(None).window_ms_or(7).ok(), Some(7));
        assert_eq!(asked(Some(5)).window_ms_or(7).ok(), Some(5));
        for bad in [0, -1] {
            match asked(Some(bad)).window_ms_or(7) {
                Err(ApiError::BadBody { field, .. }) => assert_eq!(field, "window_ms"),
                other => panic!("window {bad}: expected BadBody, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_token_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let first = load_or_create_token(dir.path()).expect("create");
        assert_eq!(first.len(), 64);
        assert_eq!(load_or_create_token(dir.path()).expect("read"), first);
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
