//! `doppel`: the coordinator (`doppel serve`), its certificate authority (`doppel ca …`) and the
//! operator's commands against a running coordinator (`doppel workload|policy|agents …`).
//! This file only wires command line, config, runtime and shutdown; the work is in the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use doppel_coordinator::{
    ca::CertificateAuthority,
    cli::{self, ClientCommand},
    client::{ApiClient, resolve_base, resolve_token},
    serve::{Coordinator, ServeConfig},
};
use time::OffsetDateTime;
use tracing_subscriber::EnvFilter;

/// Environment variable holding the log filter; `RUST_LOG` is the fallback.
const LOG_ENV: &str = "DOPPEL_LOG";
/// Environment variable naming the state directory.
const STATE_DIR_ENV: &str = "DOPPEL_STATE_DIR";
/// Environment variable with the coordinator's API URL.
const API_ENV: &str = "DOPPEL_API";
/// Environment variable with the API token.
const TOKEN_ENV: &str = "DOPPEL_API_TOKEN";
/// Exit code for a configuration that cannot be used (EX_CONFIG from sysexits.h), as the agent's.
const EXIT_CONFIG: u8 = 78;

/// doppel: compare a workload's live VM type with shadows on other types, under its real traffic.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// State directory: CA, database, API token.
    #[arg(long, global = true, env = STATE_DIR_ENV, default_value = "/var/lib/doppel")]
    state_dir: PathBuf,
    /// The coordinator's API URL (default: the address in the state directory, else
    /// http://127.0.0.1:7480).
    #[arg(long, global = true, env = API_ENV)]
    api: Option<String>,
    /// API token (default: read from the state directory).
    #[arg(long, global = true, env = TOKEN_ENV, hide_env_values = true)]
    token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the coordinator: QUIC ingest for agents.
    Serve(ServeArgs),
    /// Manage the coordinator's certificate authority and agent certificates.
    #[command(subcommand)]
    Ca(CaCommand),
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML config file (every field optional; flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// QUIC listen address for agents.
    #[arg(long)]
    quic_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the CA and the coordinator's server certificate.
    Init {
        /// DNS names or IP addresses agents use to reach the coordinator.
        #[arg(long = "san", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])]
        server_names: Vec<String>,
    },
    /// Issue a client certificate and key for an agent.
    Issue {
        /// Agent name (the certificate's common name).
        #[arg(long)]
        agent: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Directory to write NAME.crt, NAME.key and ca.crt into.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Revoke every certificate of an agent; a running coordinator drops it within a second.
    Revoke {
        /// Agent name.
        #[arg(long)]
        agent: String,
    },
}

fn init_tracing() {
    let filter = std::env::var(LOG_ENV)
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
}

fn load_config(args: &ServeArgs, state_dir: PathBuf) -> anyhow::Result<ServeConfig> {
    let mut config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let invalid = || format!("invalid config {}", path.display());
            let mut table: toml::Table = toml::from_str(&text).with_context(invalid)?;
            let (old, new) = ("compare_window_secs", "compare_window_ms");
            if doppel_common::config::seconds_key_to_ms(&mut table, old, new)
                .map_err(|e| doppel_coordinator::serve::InvalidConfig {
                    field: e.field().to_owned(),
                    reason: e.to_string(),
                })
                .with_context(invalid)?
            {
                tracing::warn!(
                    "{}: `{old}` is deprecated: read as `{new}`, the same duration in ms",
                    path.display()
                );
            }
            table.try_into().with_context(invalid)?
        }
        None => ServeConfig::default(),
    };
    config.state_dir = state_dir;
    if let Some(addr) = args.quic_listen {
        config.quic_listen = addr;
    }
    config.validate()?;
    Ok(config)
}

async fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let coordinator = Coordinator::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("cannot wait for Ctrl-C")?,
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    coordinator.shutdown().await;
    Ok(())
}

/// Where the API is, how to authenticate, and how to print.
struct ClientOptions<'a> {
    state_dir: &'a std::path::Path,
    api: Option<&'a str>,
    token: Option<&'a str>,
    json: bool,
}

fn run_client(cli: &ClientOptions<'_>, command: ClientCommand) -> anyhow::Result<ExitCode> {
    // Only the reply is awaited: one thread is plenty.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let result = match resolve_token(cli.token, cli.state_dir) {
        Ok(token) => {
            let client = ApiClient::new(resolve_base(cli.api, cli.state_dir), token);
            runtime.block_on(cli::run(&client, command, cli.json))
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(out) => {
            print!("{out}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let code = e.exit_code();
            eprintln!("doppel: {:#}", anyhow::Error::from(e));
            Ok(ExitCode::from(code))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let ca = CertificateAuthority::in_state_dir(&cli.state_dir);
    let now = OffsetDateTime::now_utc();
    match cli.command {
        Command::Client(command) => {
            let options = ClientOptions {
                state_dir: &cli.state_dir,
                api: cli.api.as_deref(),
                token: cli.token.as_deref(),
                json: cli.json,
            };
            return run_client(&options, command);
        }
        Command::Serve(args) => {
            let config = match load_config(&args, cli.state_dir) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("doppel: {e:#}");
                    return Ok(ExitCode::from(EXIT_CONFIG));
                }
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?
                .block_on(serve(config))?;
        }
        Command::Ca(CaCommand::Init { server_names }) => {
            ca.init(&server_names, now)?;
            println!("CA created in {}", ca.dir().display());
        }
        Command::Ca(CaCommand::Issue { agent, days, out }) => {
            let files = ca.issue(&agent, days, &out, now)?;
            println!(
                "issued {} (serial {}): {} {} {}",
                agent,
                files.serial,
                files.cert.display(),
                files.key.display(),
                files.ca_cert.display()
            );
        }
        Command::Ca(CaCommand::Revoke { agent }) => {
            for cert in ca.revoke(&agent, now)? {
                println!("revoked {} serial {}", cert.agent, cert.serial);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    init_tracing();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("doppel: {e:#}");
            ExitCode::FAILURE
        }
    }
}
