//! The operator's commands that talk to a running coordinator (`doppel workload …`,
//! `doppel policy …`, `doppel agents`): each calls the [HTTP API](crate::api) through an
//! [`ApiClient`] and renders a human table, or the API's JSON with `--json`.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use reqwest::Method;
use serde::Serialize;

use crate::{
    api::{AgentView, ForecastView, PatternsView, Revision, UiTicket},
    client::{ApiClient, ClientError},
    compare::{Comparison, Verdict},
    policy::{Policy, WorkloadSpec},
    shadows::manager::{CreateShadow, Pin, PinRequest, ShadowView},
    store::{
        ActionRow, DeliveryRow, RecommendationRow, WarningRow,
        shadows::{ShadowEvent, ShadowRow},
    },
    table::{render, timestamp},
};

/// Commands run against the coordinator's API.
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Define, list, show and remove workloads.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Show or replace a workload's policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Agents that ever connected, their workload and whether they are connected now.
    Agents,
    /// Compare live with each shadow VM type at matched load, best first.
    Compare {
        /// Workload name.
        workload: String,
        /// Window: `90s`, `15m`, `2h`, `1d` (default: the coordinator's, 15m).
        #[arg(long, value_parser = parse_window)]
        window: Option<u64>,
    },
    /// Stored recommendations, newest first.
    Recommendations {
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Most rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Scale actions taken in act mode and whether latency recovered, newest first.
    Actions {
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Most rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Webhook deliveries.
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// A workload's load forecast: model, forecast peak, each VM type's capacity at the SLO,
    /// and whether a warning is raised (with its lead time).
    Forecast {
        /// Workload name.
        workload: String,
    },
    /// A workload's learned mirroring: each pattern's share of live's flows, of the planned
    /// sample and of what a shadow replayed, its class and rate, the plan's budget and rates,
    /// and each shadow's coverage of live's mix over the last hour.
    Patterns {
        /// Workload name.
        workload: String,
    },
    /// Degradation warnings (the SLO expected to break within the horizon), newest first.
    Warnings {
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Most rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// A one-time link that signs a browser in to the dashboard (`/ui`), good for one use
    /// within five minutes.
    Ui {
        /// Open this workload's page instead of the fleet page.
        workload: Option<String>,
    },
    /// Shadow instances: list them (the default), create, pause, resume or destroy one, pin a
    /// VM type in or out of a workload's pool.
    Shadows {
        /// What to do (default: list).
        #[command(subcommand)]
        command: Option<ShadowsCommand>,
    },
}

/// `doppel shadows …`
#[derive(Debug, Subcommand)]
pub enum ShadowsCommand {
    /// Shadows with state, type, age, cost per hour and address.
    List {
        /// Only this workload.
        #[arg(long)]
        workload: Option<String>,
        /// Destroyed and failed ones too.
        #[arg(long)]
        all: bool,
    },
    /// Create a shadow of a workload on a VM type by hand (within the workload's budget).
    Create {
        /// The workload.
        #[arg(long)]
        workload: String,
        /// The VM type, from the catalog.
        #[arg(long = "type")]
        vm_type: String,
    },
    /// A shadow's state changes, oldest first, with their reasons.
    Events {
        /// The shadow's id.
        id: String,
    },
    /// Withdraw a shadow's mirror session; the manager leaves it alone until resumed.
    Pause {
        /// The shadow's id.
        id: String,
    },
    /// Register a paused shadow's mirror session again.
    Resume {
        /// The shadow's id.
        id: String,
    },
    /// Destroy a shadow.
    Destroy {
        /// The shadow's id.
        id: String,
    },
    /// Pin a VM type in (always shadowed) or out (never) of a workload's pool.
    #[command(group(clap::ArgGroup::new("where").required(true).args(["pin_in", "pin_out", "unpin"])))]
    Pin {
        /// The workload.
        #[arg(long)]
        workload: String,
        /// The VM type.
        #[arg(long = "type")]
        vm_type: String,
        /// Always shadow it.
        #[arg(long = "in", conflicts_with_all = ["pin_out", "unpin"])]
        pin_in: bool,
        /// Never shadow it.
        #[arg(long = "out", conflicts_with = "unpin")]
        pin_out: bool,
        /// Leave it to the steering again.
        #[arg(long = "none")]
        unpin: bool,
    },
}

/// `doppel webhooks …`
#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Delivery attempts, newest first.
    Log {
        /// Most rows.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

/// Parses `90s`, `15m`, `2h`, `1d` (or bare seconds) into milliseconds.
pub fn parse_window(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit_ms) = match text.char_indices().last() {
        Some((i, 's')) => (&text[..i], 1_000),
        Some((i, 'm')) => (&text[..i], 60_000),
        Some((i, 'h')) => (&text[..i], 3_600_000),
        Some((i, 'd')) => (&text[..i], 86_400_000),
        _ => (text, 1_000),
    };
    match digits.parse::<u64>() {
        Ok(n) if n > 0 => n
            .checked_mul(unit_ms)
            .ok_or_else(|| format!("{text} is too long")),
        _ => Err(format!(
            "{text:?} is not a duration like 90s, 15m, 2h or 1d"
        )),
    }
}

/// `doppel workload …`
#[derive(Debug, Subcommand)]
pub enum WorkloadCommand {
    /// Create or replace a workload from a TOML or JSON file (`-`: standard input).
    Add {
        /// The workload file.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// List workloads.
    List,
    /// Show one workload.
    Show {
        /// Workload name.
        name: String,
    },
    /// Remove a workload; its agents get an empty policy.
    Rm {
        /// Workload name.
        name: String,
    },
}

/// `doppel policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Replace a workload's policy from a TOML or JSON file (`-`: standard input).
    Set {
        /// Workload name.
        workload: String,
        /// The policy file.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Show a workload's policy.
    Show {
        /// Workload name.
        workload: String,
    },
    /// Keep a pattern (a key as `doppel patterns` shows it) in a class of its own.
    Pin {
        /// Workload name.
        workload: String,
        /// Pattern key, e.g. `POST /api/checkout`.
        pattern: String,
    },
    /// Never mirror a pattern.
    Exclude {
        /// Workload name.
        workload: String,
        /// Pattern key.
        pattern: String,
    },
    /// Undo `pin` or `exclude` for a pattern.
    Release {
        /// Workload name.
        workload: String,
        /// Pattern key.
        pattern: String,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The input file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The input file is neither valid TOML nor valid JSON.
    #[error("{path} is not valid {format}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// `TOML` or `JSON`.
        format: &'static str,
        /// Parser message (it names the line and the key).
        reason: String,
    },
    /// The API call failed.
    #[error(transparent)]
    Api(#[from] ClientError),
    /// The answer could not be rendered as JSON.
    #[error("cannot render JSON")]
    Json(#[source] serde_json::Error),
}

/// Exit code for refused input (EX_DATAERR).
pub const EXIT_DATA: u8 = 65;
/// Exit code for an unreadable input file (EX_NOINPUT).
pub const EXIT_NO_INPUT: u8 = 66;
/// Exit code when the coordinator cannot be reached (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

impl CliError {
    /// The process exit code this failure maps to.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Read { .. } => EXIT_NO_INPUT,
            Self::Parse { .. } => EXIT_DATA,
            Self::Api(ClientError::Api { status, .. }) if status.is_client_error() => EXIT_DATA,
            Self::Api(ClientError::Http { .. } | ClientError::NoToken { .. }) => EXIT_UNAVAILABLE,
            Self::Api(_) | Self::Json(_) => 1,
        }
    }
}

/// Reads a TOML or JSON document (JSON when the file ends in `.json` or starts with `{`).
fn read_document(path: &Path) -> Result<serde_json::Value, CliError> {
    let read = |source| CliError::Read {
        path: path.to_owned(),
        source,
    };
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(read)?
    } else {
        std::fs::read_to_string(path).map_err(read)?
    };
    let json = path.extension().is_some_and(|e| e == "json") || text.trim_start().starts_with('{');
    if json {
        serde_json::from_str(&text).map_err(|e| CliError::Parse {
            path: path.to_owned(),
            format: "JSON",
            reason: e.to_string(),
        })
    } else {
        toml::from_str(&text).map_err(|e| CliError::Parse {
            path: path.to_owned(),
            format: "TOML",
            reason: e.to_string(),
        })
    }
}

fn as_json(value: &impl Serialize) -> Result<String, CliError> {
    serde_json::to_string_pretty(value)
        .map(|mut s| {
            s.push('\n');
            s
        })
        .map_err(CliError::Json)
}

fn workloads_table(workloads: &[WorkloadSpec]) -> String {
    let rows: Vec<Vec<String>> = workloads
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                w.live
                    .iter()
                    .map(|l| format!("{}@{}", l.agent, l.vm_type))
                    .collect::<Vec<_>>()
                    .join(","),
                w.shadows
                    .iter()
                    .map(|s| format!("{}@{}", s.agent, s.vm_type))
                    .collect::<Vec<_>>()
                    .join(","),
                w.policy.classes.len().to_string(),
                format!(
                    "p{} < {} ms",
                    w.policy.slo.percentile, w.policy.slo.max_latency_ms
                ),
                format!("{:?}", w.policy.mode).to_lowercase(),
            ]
        })
        .collect();
    render(
        &["NAME", "LIVE", "SHADOWS", "CLASSES", "SLO", "MODE"],
        &rows,
    )
}

fn policy_text(policy: &Policy) -> String {
    let mut out = format!(
        "report interval: {} ms\nslo: p{} < {} ms\nbudget: {}\nmode: {}\n\n",
        policy.report_interval_ms,
        policy.slo.percentile,
        policy.slo.max_latency_ms,
        policy
            .budget
            .max_cost_per_hour
            .map_or_else(|| "no limit".to_owned(), |c| format!("{c}/hour")),
        format!("{:?}", policy.mode).to_lowercase(),
    );
    let m = &policy.mirror;
    if !m.is_off() {
        out.insert_str(
            out.len() - 1,
            &format!(
                "mirror: {}, budget {} flows/s, pinned {:?}, excluded {:?}\n",
                if m.learn { "learned" } else { "as written" },
                m.budget_flows_per_s
                    .map_or_else(|| "none".to_owned(), |b| num(b, 1)),
                m.pin,
                m.exclude,
            ),
        );
    }
    let rows: Vec<Vec<String>> = policy
        .classes
        .iter()
        .map(|c| {
            let patterns = c
                .patterns
                .iter()
                .map(|p| {
                    [
                        p.port.map(|p| format!("port {p}")),
                        p.client_prefix.as_ref().map(|c| format!("from {c}")),
                        p.payload_prefix.as_ref().map(|b| format!("{b:?}")),
                    ]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ")
                })
                .collect::<Vec<_>>()
                .join("; ");
            vec![
                c.id.to_string(),
                c.name.clone(),
                format!("{}", c.sample_rate),
                c.priority.to_string(),
                if patterns.is_empty() {
                    "-".into()
                } else {
                    patterns
                },
            ]
        })
        .collect();
    out.push_str(&render(
        &["CLASS", "NAME", "SAMPLE", "PRIORITY", "PATTERNS"],
        &rows,
    ));
    out
}

fn workload_text(w: &WorkloadSpec) -> String {
    let mut out = format!(
        "workload {}\nservices: {}\n\n",
        w.name,
        w.services.join(", ")
    );
    let rows: Vec<Vec<String>> = w
        .live
        .iter()
        .map(|l| {
            vec![
                "live".into(),
                l.agent.clone(),
                l.vm_type.clone(),
                if l.interfaces.is_empty() {
                    "-".into()
                } else {
                    l.interfaces.join(",")
                },
                "-".into(),
            ]
        })
        .chain(w.shadows.iter().map(|s| {
            vec![
                "shadow".into(),
                s.agent.clone(),
                s.vm_type.clone(),
                s.addr.to_string(),
                s.vni.to_string(),
            ]
        }))
        .collect();
    out.push_str(&render(
        &["ROLE", "AGENT", "VM TYPE", "INTERFACES/ADDR", "VNI"],
        &rows,
    ));
    out.push('\n');
    out.push_str(&policy_text(&w.policy));
    out
}

fn agents_table(agents: &[AgentView]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            vec![
                a.name.clone(),
                if a.connected { "yes" } else { "no" }.into(),
                a.workload.clone().unwrap_or_else(|| "-".into()),
                a.role_in_workload.clone().unwrap_or_else(|| "-".into()),
                a.vm_type.clone().unwrap_or_else(|| "-".into()),
                a.hostname.clone(),
                a.reports.to_string(),
                timestamp(a.last_seen_ms),
            ]
        })
        .collect();
    render(
        &[
            "AGENT",
            "CONNECTED",
            "WORKLOAD",
            "ROLE",
            "VM TYPE",
            "HOST",
            "REPORTS",
            "LAST SEEN (UTC)",
        ],
        &rows,
    )
}

fn num(value: f64, decimals: usize) -> String {
    format!("{value:.decimals$}")
}

fn comparison_text(c: &Comparison) -> String {
    let mut out = format!(
        "{}: live {} vs shadows over the last {} s, compared at p{}\n\n",
        c.workload,
        c.live_vm_type.as_deref().unwrap_or("(no live data)"),
        c.window_ms / 1000,
        c.percentile
    );
    let rows: Vec<Vec<String>> = c
        .types
        .iter()
        .map(|t| {
            vec![
                t.vm_type.clone(),
                format!("{:?}", t.role).to_lowercase(),
                t.price_per_hour.map_or_else(|| "-".into(), |p| num(p, 3)),
                num(t.all.exchanges_per_s, 1),
                t.all
                    .error_rate
                    .map_or_else(|| "-".into(), |e| num(e * 100.0, 2)),
                num(t.all.p50_ms, 2),
                num(t.all.p90_ms, 2),
                num(t.all.p99_ms, 2),
                num(t.all.p999_ms, 2),
            ]
        })
        .collect();
    out.push_str(&render(
        &[
            "VM TYPE", "ROLE", "PRICE/H", "EXCH/S", "ERR %", "P50 MS", "P90 MS", "P99 MS",
            "P99.9 MS",
        ],
        &rows,
    ));
    out.push('\n');
    let rows: Vec<Vec<String>> = c
        .ranking
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let d = &r.difference;
            let judged = r.verdict != Verdict::InsufficientEvidence;
            vec![
                (i + 1).to_string(),
                r.vm_type.clone(),
                r.verdict.as_str().replace('_', " "),
                d.pairs.to_string(),
                if judged {
                    format!(
                        "{} / {}",
                        num(d.live_load_per_s, 1),
                        num(d.shadow_load_per_s, 1)
                    )
                } else {
                    "-".into()
                },
                if judged {
                    format!(
                        "{} / {}",
                        num(r.live_at_load_ms, 2),
                        num(r.shadow_at_load_ms, 2)
                    )
                } else {
                    "-".into()
                },
                if judged {
                    format!(
                        "{} [{}, {}]",
                        num(d.mean_ms, 2),
                        num(d.ci_low_ms, 2),
                        num(d.ci_high_ms, 2)
                    )
                } else {
                    "-".into()
                },
                r.cost_delta_per_hour
                    .map_or_else(|| "-".into(), |c| format!("{c:+.3}")),
            ]
        })
        .collect();
    out.push_str(&render(
        &[
            "RANK",
            "SHADOW",
            "VERDICT",
            "PAIRS",
            "LOAD/S LIVE / SHADOW",
            "LIVE / SHADOW MS",
            "DELTA MS [95% CI]",
            "COST DELTA/H",
        ],
        &rows,
    ));
    out
}

fn age(seconds: i64) -> String {
    match seconds {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn shadows_table(shadows: &[ShadowView]) -> String {
    let rows: Vec<Vec<String>> = shadows
        .iter()
        .map(|v| {
            let r = &v.row;
            vec![
                r.id.clone(),
                r.workload.clone(),
                r.state.as_str().to_owned(),
                r.vm_type.clone(),
                age(v.age_s),
                format!("{:.3}", r.price_per_hour),
                r.addr.clone().unwrap_or_else(|| "-".into()),
                r.vni.to_string(),
                format!("{:?}", r.origin).to_lowercase(),
                r.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    render(
        &[
            "ID", "WORKLOAD", "STATE", "TYPE", "AGE", "COST/H", "ADDR", "VNI", "ORIGIN", "NOTE",
        ],
        &rows,
    )
}

async fn run_shadows(
    client: &ApiClient,
    command: ShadowsCommand,
    json: bool,
) -> Result<String, CliError> {
    let one = |row: ShadowRow, what: &str| {
        if json {
            as_json(&row)
        } else {
            Ok(format!(
                "shadow {} ({} on {}) {what}; now {}\n",
                row.id,
                row.workload,
                row.vm_type,
                row.state.as_str()
            ))
        }
    };
    match command {
        ShadowsCommand::List { workload, all } => {
            let mut path = format!("/v1/shadows?all={all}");
            if let Some(w) = workload {
                path.push_str(&format!("&workload={}", path_segment(&w)));
            }
            let shadows: Vec<ShadowView> = client.get(&path).await?;
            if json {
                as_json(&shadows)
            } else {
                Ok(shadows_table(&shadows))
            }
        }
        ShadowsCommand::Create { workload, vm_type } => {
            let row: ShadowRow = client
                .call(
                    Method::POST,
                    "/v1/shadows",
                    Some(&CreateShadow { workload, vm_type }),
                )
                .await?;
            one(row, "created")
        }
        ShadowsCommand::Events { id } => {
            let events: Vec<ShadowEvent> = client
                .get(&format!("/v1/shadows/{}/events", path_segment(&id)))
                .await?;
            if json {
                return as_json(&events);
            }
            let rows: Vec<Vec<String>> = events
                .iter()
                .map(|e| {
                    vec![
                        timestamp(e.at_ms),
                        e.state.as_str().to_owned(),
                        e.detail.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            Ok(render(&["AT (UTC)", "STATE", "WHY"], &rows))
        }
        ShadowsCommand::Pause { id } => {
            let path = format!("/v1/shadows/{}/pause", path_segment(&id));
            one(
                client.call(Method::POST, &path, None::<&()>).await?,
                "paused",
            )
        }
        ShadowsCommand::Resume { id } => {
            let path = format!("/v1/shadows/{}/resume", path_segment(&id));
            one(
                client.call(Method::POST, &path, None::<&()>).await?,
                "resumed",
            )
        }
        ShadowsCommand::Destroy { id } => {
            let path = format!("/v1/shadows/{}", path_segment(&id));
            one(
                client.call(Method::DELETE, &path, None::<&()>).await?,
                "destroyed",
            )
        }
        ShadowsCommand::Pin {
            workload,
            vm_type,
            pin_in,
            pin_out,
            unpin: _,
        } => {
            let pin = match (pin_in, pin_out) {
                (true, _) => Pin::In,
                (_, true) => Pin::Out,
                _ => Pin::None,
            };
            let r: Revision = client
                .call(
                    Method::PUT,
                    &format!("/v1/workloads/{}/pins", path_segment(&workload)),
                    Some(&PinRequest {
                        vm_type: vm_type.clone(),
                        pin,
                    }),
                )
                .await?;
            if json {
                as_json(&r)
            } else {
                Ok(format!(
                    "{vm_type} pinned {} for {workload}; policy revision {}\n",
                    format!("{pin:?}").to_lowercase(),
                    r.revision
                ))
            }
        }
    }
}

fn path_segment(name: &str) -> String {
    // Workload names are [A-Za-z0-9._-] (validated); anything else is escaped so a bad name
    // reaches the API as a 404 instead of a different route.
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Runs `command` and returns what to print.
pub async fn run(
    client: &ApiClient,
    command: ClientCommand,
    json: bool,
) -> Result<String, CliError> {
    match command {
        ClientCommand::Workload(WorkloadCommand::Add { file }) => {
            let doc = read_document(&file)?;
            let r: Revision = client
                .call(Method::POST, "/v1/workloads", Some(&doc))
                .await?;
            if json {
                as_json(&r)
            } else {
                Ok(format!("workload stored; policy revision {}\n", r.revision))
            }
        }
        ClientCommand::Workload(WorkloadCommand::List) => {
            let workloads: Vec<WorkloadSpec> = client.get("/v1/workloads").await?;
            if json {
                as_json(&workloads)
            } else {
                Ok(workloads_table(&workloads))
            }
        }
        ClientCommand::Workload(WorkloadCommand::Show { name }) => {
            let w: WorkloadSpec = client
                .get(&format!("/v1/workloads/{}", path_segment(&name)))
                .await?;
            if json {
                as_json(&w)
            } else {
                Ok(workload_text(&w))
            }
        }
        ClientCommand::Workload(WorkloadCommand::Rm { name }) => {
            let r: Revision = client
                .call(
                    Method::DELETE,
                    &format!("/v1/workloads/{}", path_segment(&name)),
                    None::<&()>,
                )
                .await?;
            if json {
                as_json(&r)
            } else {
                Ok(format!(
                    "workload {name} removed; policy revision {}\n",
                    r.revision
                ))
            }
        }
        ClientCommand::Policy(PolicyCommand::Set { workload, file }) => {
            let doc = read_document(&file)?;
            let r: Revision = client
                .call(
                    Method::PUT,
                    &format!("/v1/workloads/{}/policy", path_segment(&workload)),
                    Some(&doc),
                )
                .await?;
            if json {
                as_json(&r)
            } else {
                Ok(format!(
                    "policy of {workload} replaced; policy revision {}\n",
                    r.revision
                ))
            }
        }
        ClientCommand::Policy(
            command @ (PolicyCommand::Pin { .. }
            | PolicyCommand::Exclude { .. }
            | PolicyCommand::Release { .. }),
        ) => {
            let (workload, pattern) = match &command {
                PolicyCommand::Pin { workload, pattern }
                | PolicyCommand::Exclude { workload, pattern }
                | PolicyCommand::Release { workload, pattern } => (workload, pattern),
                _ => unreachable!("matched above"),
            };
            let path = format!("/v1/workloads/{}/policy", path_segment(workload));
            let mut policy: Policy = client.get(&path).await?;
            let m = &mut policy.mirror;
            m.pin.retain(|p| p != pattern);
            m.exclude.retain(|p| p != pattern);
            let done = match command {
                PolicyCommand::Pin { .. } => {
                    m.pin.push(pattern.clone());
                    "pinned"
                }
                PolicyCommand::Exclude { .. } => {
                    m.exclude.push(pattern.clone());
                    "excluded"
                }
                _ => "released",
            };
            let r: Revision = client.call(Method::PUT, &path, Some(&policy)).await?;
            if json {
                as_json(&r)
            } else {
                Ok(format!(
                    "{pattern:?} {done} in {workload}; policy revision {}\n",
                    r.revision
                ))
            }
        }
        ClientCommand::Patterns { workload } => {
            let view: PatternsView = client
                .get(&format!(
                    "/v1/workloads/{}/patterns",
                    path_segment(&workload)
                ))
                .await?;
            if json {
                as_json(&view)
            } else {
                Ok(patterns_text(&view))
            }
        }
        ClientCommand::Policy(PolicyCommand::Show { workload }) => {
            let p: Policy = client
                .get(&format!("/v1/workloads/{}/policy", path_segment(&workload)))
                .await?;
            if json {
                as_json(&p)
            } else {
                Ok(policy_text(&p))
            }
        }
        ClientCommand::Compare { workload, window } => {
            let mut path = format!("/v1/workloads/{}/compare", path_segment(&workload));
            if let Some(window) = window {
                path.push_str(&format!("?window_ms={window}"));
            }
            let c: Comparison = client.get(&path).await?;
            if json {
                as_json(&c)
            } else {
                Ok(comparison_text(&c))
            }
        }
        ClientCommand::Actions { workload, limit } => {
            let mut path = format!("/v1/actions?limit={limit}");
            if let Some(w) = workload {
                path.push_str(&format!("&workload={}", path_segment(&w)));
            }
            let rows: Vec<ActionRow> = client.get(&path).await?;
            if json {
                return as_json(&rows);
            }
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|a| {
                    vec![
                        timestamp(a.started_ms),
                        a.workload.clone(),
                        format!("{} -> {}", a.from_vm_type, a.to_vm_type),
                        a.action.clone(),
                        a.state.as_str().replace('_', " "),
                        a.live_latency_ms.map_or_else(|| "-".into(), |l| num(l, 2)),
                        a.detail.lines().last().unwrap_or_default().to_owned(),
                    ]
                })
                .collect();
            Ok(render(
                &[
                    "STARTED (UTC)",
                    "WORKLOAD",
                    "MOVE",
                    "ACTION",
                    "STATE",
                    "LIVE MS AFTER",
                    "DETAIL",
                ],
                &rows,
            ))
        }
        ClientCommand::Recommendations { workload, limit } => {
            let mut path = format!("/v1/recommendations?limit={limit}");
            if let Some(w) = workload {
                path.push_str(&format!("&workload={}", path_segment(&w)));
            }
            let rows: Vec<RecommendationRow> = client.get(&path).await?;
            if json {
                return as_json(&rows);
            }
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let field = |k: &str| r.body.get(k).and_then(serde_json::Value::as_f64);
                    vec![
                        timestamp(r.created_ms),
                        r.workload.clone(),
                        r.reason.replace('_', " "),
                        format!("{} -> {}", r.current_vm_type, r.recommended_vm_type),
                        field("confidence").map_or_else(|| "-".into(), |c| num(c, 3)),
                        field("cost_delta_per_hour")
                            .map_or_else(|| "-".into(), |c| format!("{c:+.3}")),
                        r.idempotency_key.clone(),
                    ]
                })
                .collect();
            Ok(render(
                &[
                    "CREATED (UTC)",
                    "WORKLOAD",
                    "REASON",
                    "MOVE",
                    "CONFIDENCE",
                    "COST DELTA/H",
                    "IDEMPOTENCY KEY",
                ],
                &rows,
            ))
        }
        ClientCommand::Webhooks(WebhooksCommand::Log { limit }) => {
            let rows: Vec<DeliveryRow> = client
                .get(&format!("/v1/webhooks/log?limit={limit}"))
                .await?;
            if json {
                return as_json(&rows);
            }
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|d| {
                    vec![
                        timestamp(d.at_ms),
                        d.url.clone(),
                        d.idempotency_key.clone(),
                        d.attempt.to_string(),
                        d.status.map_or_else(|| "-".into(), |s| s.to_string()),
                        format!("{} ms", d.duration_ms),
                        d.error.clone().unwrap_or_else(|| "ok".into()),
                    ]
                })
                .collect();
            Ok(render(
                &[
                    "AT (UTC)",
                    "URL",
                    "IDEMPOTENCY KEY",
                    "ATTEMPT",
                    "STATUS",
                    "TOOK",
                    "RESULT",
                ],
                &rows,
            ))
        }
        ClientCommand::Shadows { command } => {
            let command = command.unwrap_or(ShadowsCommand::List {
                workload: None,
                all: false,
            });
            run_shadows(client, command, json).await
        }
        ClientCommand::Forecast { workload } => {
            let view: ForecastView = client
                .get(&format!(
                    "/v1/workloads/{}/forecast",
                    path_segment(&workload)
                ))
                .await?;
            if json {
                as_json(&view)
            } else {
                Ok(forecast_text(&view))
            }
        }
        ClientCommand::Warnings { workload, limit } => {
            let mut path = format!("/v1/warnings?limit={limit}");
            if let Some(w) = workload {
                path.push_str(&format!("&workload={}", path_segment(&w)));
            }
            let rows: Vec<WarningRow> = client.get(&path).await?;
            if json {
                as_json(&rows)
            } else {
                Ok(warnings_table(&rows))
            }
        }
        ClientCommand::Ui { workload } => {
            let ticket: UiTicket = client
                .call(Method::POST, "/v1/ui/tickets", None::<&()>)
                .await?;
            let mut url = format!("{}{}", client.base(), ticket.path);
            if let Some(workload) = workload {
                url.push_str(&format!("&workload={}", path_segment(&workload)));
            }
            if json {
                as_json(&serde_json::json!({ "url": url, "expires_ms": ticket.expires_ms }))
            } else {
                Ok(format!("{url}\n"))
            }
        }
        ClientCommand::Agents => {
            let agents: Vec<AgentView> = client.get("/v1/agents").await?;
            if json {
                as_json(&agents)
            } else {
                Ok(agents_table(&agents))
            }
        }
    }
}

fn patterns_text(view: &PatternsView) -> String {
    let Some(plan) = &view.plan else {
        return if view.learning {
            format!(
                "{}: learning, no plan yet (the live agents' first reports are awaited)\n",
                view.workload
            )
        } else {
            format!(
                "{}: mirroring is not learned (set policy.mirror.learn and a budget)\n",
                view.workload
            )
        };
    };
    let mut out = format!(
        "{}: {}live {} flows/s, reference (peak) load {} flows/s, budget {} flows/s, \
         expected mirrored {} flows/s, typical rate {}\n",
        view.workload,
        if view.learning {
            ""
        } else {
            "not learning (last plan kept for reading); "
        },
        num(plan.live_flows_per_s, 1),
        num(plan.reference_flows_per_s, 1),
        num(plan.budget_flows_per_s, 1),
        num(plan.expected_mirrored_per_s, 2),
        num(plan.typical_rate, 4),
    );
    if let Some(ms) = view.changed_ms {
        out.push_str(&format!("agents last sent a new plan {}\n", timestamp(ms)));
    }
    if plan.patterns_without_rule > 0 {
        out.push_str(&format!(
            "{} rare pattern(s) could not be boosted (rules used up or prefix shared)\n",
            plan.patterns_without_rule
        ));
    }
    out.push('\n');
    let mirrored_total: f64 = plan.patterns.iter().map(|p| p.share * p.rate).sum();
    let class_name = |id: u16| {
        plan.classes
            .iter()
            .find(|c| c.id == id)
            .map_or_else(|| "-".to_owned(), |c| c.name.clone())
    };
    // The measured sample: the shadow that replayed the most flows in the window (every shadow
    // gets the same mirrored flows; one that started late or failed has fewer).
    let measured = view
        .coverage
        .iter()
        .max_by_key(|c| c.coverage.mirrored_flows)
        .filter(|c| c.coverage.mirrored_flows > 0);
    let measured_share = |pattern: &str| {
        measured
            .and_then(|c| c.coverage.patterns.iter().find(|p| p.pattern == pattern))
            .map_or_else(
                || "-".to_owned(),
                |p| format!("{:.2} %", 100.0 * p.mirrored_share),
            )
    };
    let rows: Vec<Vec<String>> = plan
        .patterns
        .iter()
        .map(|p| {
            vec![
                p.pattern.clone(),
                format!("{:.2} %", 100.0 * p.share),
                if mirrored_total > 0.0 {
                    format!("{:.2} %", 100.0 * p.share * p.rate / mirrored_total)
                } else {
                    "-".into()
                },
                measured_share(&p.pattern),
                num(p.flows_per_s, 2),
                format!("{} {}", p.class, class_name(p.class)),
                num(p.rate, 4),
                format!("{:.0} min", p.age_secs / 60.0),
            ]
        })
        .collect();
    out.push_str(&render(
        &[
            "PATTERN", "LIVE", "PLANNED", "RECEIVED", "FLOWS/S", "CLASS", "RATE", "AGE",
        ],
        &rows,
    ));
    if !view.coverage.is_empty() {
        out.push_str(&format!(
            "\ncoverage over the last {} (what each shadow received, weighted by class, \
             against live's mix; the eval's goals: divergence <= 0.01, rare recall >= 0.99)\n",
            if view.window_ms % 60_000 == 0 {
                format!("{} min", view.window_ms / 60_000)
            } else {
                format!("{:.1} s", view.window_ms as f64 / 1000.0)
            }
        ));
        let rows: Vec<Vec<String>> = view
            .coverage
            .iter()
            .map(|c| {
                vec![
                    c.agent.clone(),
                    c.vm_type.clone(),
                    c.coverage.mirrored_flows.to_string(),
                    num(c.coverage.live_flows, 0),
                    opt_num(c.coverage.mix_divergence, 4),
                    opt_num(c.coverage.rare_recall, 3),
                ]
            })
            .collect();
        out.push_str(&render(
            &[
                "SHADOW",
                "TYPE",
                "RECEIVED",
                "LIVE FLOWS",
                "MIX DIVERGENCE",
                "RARE RECALL",
            ],
            &rows,
        ));
    }
    out
}

fn opt_num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| num(v, digits))
}

fn warnings_table(rows: &[WarningRow]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|w| {
            let field = |k: &str| w.body.get(k).and_then(serde_json::Value::as_f64);
            vec![
                timestamp(w.raised_ms),
                w.workload.clone(),
                w.vm_type.clone(),
                w.cleared_ms
                    .map_or_else(|| "raised".into(), |c| format!("cleared {}", timestamp(c))),
                opt_num(field("probability"), 2),
                field("lead_secs").map_or_else(|| "-".into(), |s| format!("{s:.0} s")),
                opt_num(field("forecast_load_per_s"), 1),
                opt_num(field("capacity_per_s"), 1),
                w.body
                    .get("recommended_vm_type")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("-")
                    .to_owned(),
            ]
        })
        .collect();
    render(
        &[
            "RAISED (UTC)",
            "WORKLOAD",
            "VM TYPE",
            "STATE",
            "P(BREACH)",
            "LEAD",
            "FORECAST/S",
            "CAPACITY/S",
            "RECOMMENDED",
        ],
        &rows,
    )
}

fn forecast_text(view: &ForecastView) -> String {
    let Some(f) = &view.forecast else {
        return format!(
            "{}: no forecast yet (the evaluator has not run since it was defined)\n",
            view.workload
        );
    };
    let mut out = format!(
        "{}: model {} on {} steps of {} s; load now {}/s, forecast peak {}/s (90 % peak {}/s) within {} s\n",
        view.workload,
        f.model,
        f.history_steps,
        f.step_secs,
        opt_num(f.last_load_per_s, 1),
        opt_num(f.forecast_peak_per_s, 1),
        opt_num(f.provisioned_peak_per_s, 1),
        f.horizon_secs,
    );
    out.push_str(&format!(
        "live: {} x{}, capacity at the SLO {}/s; decision: {}\n",
        f.current_vm_type,
        f.current_count,
        opt_num(f.current_capacity_per_s, 1),
        f.decision.replace('_', " "),
    ));
    match &f.warning {
        Some(w) => {
            out.push_str(&format!(
                "WARNING: SLO expected to break in {} s (probability {:.2}), forecast {:.1}/s against capacity {:.1}/s{}\n",
                w.lead_secs,
                w.probability,
                w.forecast_load_per_s,
                w.capacity_per_s,
                w.recommended_vm_type
                    .as_deref()
                    .map_or_else(String::new, |t| format!("; recommended: {t}")),
            ));
        }
        None => out.push_str("no warning\n"),
    }
    let types: Vec<Vec<String>> = f
        .types
        .iter()
        .map(|t| {
            vec![
                t.vm_type.clone(),
                t.role.as_str().to_owned(),
                opt_num(t.price_per_hour, 3),
                format!("{:.1}", t.capacity_at_slo_per_s),
                format!("{:.1}", t.max_observed_load_per_s),
                t.points.to_string(),
                opt_num(t.cpu_ceiling_per_s, 1),
                t.error_rate
                    .map_or_else(|| "-".into(), |e| format!("{:.2}%", 100.0 * e)),
                if t.basis.is_empty() {
                    "-".to_owned()
                } else {
                    t.basis.clone()
                },
            ]
        })
        .collect();
    out.push_str(&render(
        &[
            "VM TYPE",
            "ROLE",
            "PRICE/H",
            "CAPACITY/S AT SLO",
            "MAX MEASURED/S",
            "POINTS",
            "CPU CEILING/S",
            "ERRORS",
            "BASIS",
        ],
        &types,
    ));
    out
}
