//! `doppel-agent`: wires command line, logging, runtime and shutdown; the work is in the library.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use doppel_agent::{
    datapath::{AttachMode, Datapath, error_chain},
    ownership::{self, Object},
    role::{self, print_line},
};
use tokio::signal::unix::{SignalKind, signal};

/// Environment variable holding the log filter; `RUST_LOG` is the fallback.
const LOG_ENV: &str = "DOPPEL_LOG";

/// doppel's per-host agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Run the role a configuration file describes (`role = "live"`, the default, or
    /// `role = "shadow"`: see the README).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach the packet counters to interfaces and print their totals as one JSON line per
    /// interval, until SIGINT/SIGTERM (or `--intervals` have passed); then detach.
    Counters {
        /// Interface to attach to (repeatable).
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// How to attach.
        #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
        attach_mode: AttachMode,
        /// Milliseconds between lines.
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        /// Stop after this many lines.
        #[arg(long)]
        intervals: Option<u64>,
    },
}

fn main() -> std::process::ExitCode {
    init_logging();
    if std::env::args_os().len() <= 1 {
        // Nothing to run: say how, as `--help` would, and exit as for a usage error.
        let _ = <Cli as clap::CommandFactory>::command().print_help();
        return std::process::ExitCode::from(2);
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("doppel-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("doppel-agent: {}", error_chain(e.as_ref()));
            if e.downcast_ref::<doppel_agent::config::ConfigError>()
                .is_some()
            {
                std::process::ExitCode::from(EXIT_CONFIG)
            } else {
                std::process::ExitCode::FAILURE
            }
        }
    }
}

fn init_logging() {
    let filter = std::env::var(LOG_ENV)
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Exit code for a configuration that cannot be used (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 78;

/// Starts the reporting client of a `[coordinator]` section, if the file has one.
fn reporter(
    section: Option<&doppel_agent::config::CoordinatorConfig>,
    role: doppel_common::wire::AgentRole,
) -> anyhow::Result<Option<doppel_agent::report::ReportClient>> {
    Ok(match section {
        Some(c) => Some(doppel_agent::report::ReportClient::from_config(c, role)?),
        None => None,
    })
}

async fn run_live(path: &std::path::Path) -> anyhow::Result<()> {
    let config = doppel_agent::config::LiveConfig::load(path)?;
    // Held until the agent has detached and removed everything.
    let _claims = [
        ownership::claim(Object::Interface(&config.interface), path)?,
        ownership::claim(Object::VxlanDevice(&config.vxlan.device), path)?,
    ];
    let reporter = reporter(
        config.coordinator.as_ref(),
        doppel_common::wire::AgentRole::Live,
    )?;
    let agent = doppel_agent::live::LiveAgent::start(config)?;
    role::run(agent, path, reporter).await
}

async fn run_shadow(path: &std::path::Path) -> anyhow::Result<()> {
    let config = doppel_agent::shadow::config::ShadowConfig::load(path)?;
    let _claims = [&config.xdp_interface, &config.replay_interface]
        .into_iter()
        .flatten()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .map(|iface| ownership::claim(Object::Interface(iface), path))
        .collect::<Result<Vec<_>, _>>()?;
    let reporter = reporter(
        config.coordinator.as_ref(),
        doppel_common::wire::AgentRole::Shadow,
    )?;
    let agent = doppel_agent::shadow::ShadowAgent::start(config)?;
    role::run(agent, path, reporter).await
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match (cli.config, cli.command) {
        (Some(_), Some(_)) => anyhow::bail!("--config and a subcommand exclude each other"),
        (Some(path), None) => {
            return match doppel_agent::config::role_of(&path)? {
                doppel_agent::config::Role::Live => run_live(&path).await,
                doppel_agent::config::Role::Shadow => run_shadow(&path).await,
            };
        }
        (None, Some(command)) => command,
        (None, None) => anyhow::bail!("give --config FILE, or a subcommand (see --help)"),
    };
    match command {
        Command::Counters {
            ifaces,
            attach_mode,
            interval_ms,
            intervals,
        } => {
            let mut datapath = Datapath::load()?;
            for iface in &ifaces {
                datapath
                    .attach(iface, attach_mode)
                    .with_context(|| format!("attaching to {iface}"))?;
            }
            let attached: Vec<_> = datapath
                .attachments()
                .map(|(i, how)| (i.to_owned(), how))
                .collect();
            print_line(&serde_json::json!({ "attached": attached }).to_string());
            let mut sigterm = signal(SignalKind::terminate())?;
            let mut tick = tokio::time::interval(Duration::from_millis(interval_ms));
            tick.tick().await;
            let mut printed = 0;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        print_line(&serde_json::json!({ "counters": datapath.iface_counters()? }).to_string());
                        printed += 1;
                        if intervals.is_some_and(|n| printed >= n) { break; }
                    }
                    _ = tokio::signal::ctrl_c() => break,
                    _ = sigterm.recv() => break,
                }
            }
            print_line(&serde_json::json!({ "counters": datapath.iface_counters()? }).to_string());
            datapath.detach_all()?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
