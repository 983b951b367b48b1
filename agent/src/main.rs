//! `doppel-agent`: wires command line, logging, runtime and shutdown; the work is in the library.

use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use doppel_agent::{
    datapath::{AttachMode, Datapath, error_chain},
    ownership::{self, Object},
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
/// Prints an interval's JSON line and, with a coordinator, hands its report to the spool.
/// Waits while the spool is full: the kernel and the replayer keep counting meanwhile, so the
/// next report covers the gap and nothing is lost.
async fn emit(
    line: &impl serde::Serialize,
    report: doppel_common::wire::IntervalReport,
    reporter: Option<&doppel_agent::report::ReportClient>,
) -> anyhow::Result<()> {
    print_line(&serde_json::to_string(line)?);
    if let Some(reporter) = reporter {
        reporter.handle.submit(report).await?;
    }
    Ok(())
}

/// Whether stdout was found closed (`doppel-agent … | head -n 1`).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Prints one JSON line. A closed stdout is no reason to stop measuring or to leave the data
/// path attached (as `println!`'s panic would): the agent logs it once and keeps running, its
/// reports still going to the coordinator.
fn print_line(line: &str) {
    use std::{io::Write as _, sync::atomic::Ordering};
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        tracing::warn!(error = %e, "stdout is closed: interval lines are no longer printed; the agent keeps running");
    }
}

fn reporter(
    section: Option<&doppel_agent::config::CoordinatorConfig>,
    role: doppel_common::wire::AgentRole,
) -> anyhow::Result<Option<doppel_agent::report::ReportClient>> {
    Ok(match section {
        Some(c) => Some(doppel_agent::report::ReportClient::from_config(c, role)?),
        None => None,
    })
}

/// A report interval timer whose first tick is one interval from now.
async fn interval_timer(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    tick
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
    let mut policy_updates = reporter.as_ref().map(|r| r.handle.policy());
    let mut agent = doppel_agent::live::LiveAgent::start(config)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = interval_timer(agent.interval()).await;
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = tick.tick() => match agent.report() {
                Ok((line, report)) => emit(&line, report, reporter.as_ref()).await?,
                Err(e) => break Err(e.into()),
            },
            // The coordinator's policy replaces the file's once it arrives.
            Some(update) = next_policy(&mut policy_updates) => {
                match agent.set_policy(update.policy) {
                    Ok(()) => {
                        tracing::info!(revision = update.revision, "coordinator policy applied");
                        if tick.period() != agent.interval() {
                            tick = interval_timer(agent.interval()).await;
                        }
                    }
                    Err(e) => tracing::error!(error = %error_chain(&e), "coordinator policy refused"),
                }
            }
            // SIGHUP re-reads the file and applies its policy in place: nothing is detached
            // and flows already decided keep their decision. A bad file keeps the old policy.
            _ = sighup.recv() => {
                match doppel_agent::config::LiveConfig::load(path)
                    .map_err(anyhow::Error::from)
                    .and_then(|c| Ok(agent.set_policy(c.policy()?)?))
                {
                    Ok(()) => tracing::info!(path = %path.display(), "policy reloaded"),
                    Err(e) => tracing::error!(error = %error_chain(e.as_ref()), "reload refused; the previous policy stays"),
                }
            }
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    // The partial last interval is reported too: stopping must not lose what was measured.
    if outcome.is_ok() {
        let (line, report) = agent.report()?;
        emit(&line, report, reporter.as_ref()).await?;
    }
    let stopped = agent.stop();
    if let Some(reporter) = reporter {
        // Unacknowledged reports stay in the spool for the next start.
        reporter.stop().await?;
    }
    outcome?;
    stopped?;
    Ok(())
}

/// The next policy update from the coordinator; pending forever without one.
async fn next_policy(
    updates: &mut Option<tokio::sync::watch::Receiver<Option<doppel_common::wire::PolicyUpdate>>>,
) -> Option<doppel_common::wire::PolicyUpdate> {
    let Some(updates) = updates else {
        return std::future::pending().await;
    };
    updates.changed().await.ok()?;
    updates.borrow_and_update().clone()
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
    let mut policy_updates = reporter.as_ref().map(|r| r.handle.policy());
    let mut agent = doppel_agent::shadow::ShadowAgent::start(config)?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // The shadow's admission and replay are set up once from its file; a reload would have to
    // re-bind and re-admit, so SIGHUP (systemd's `reload`, shared with the live role's unit)
    // only says so instead of killing the agent, which is SIGHUP's default action.
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = interval_timer(agent.interval()).await;
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = tick.tick() => match agent.report() {
                Ok((line, report)) => emit(&line, report, reporter.as_ref()).await?,
                Err(e) => break Err(e.into()),
            },
            Some(update) = next_policy(&mut policy_updates) => {
                match agent.set_policy(&update.policy) {
                    Ok(()) => {
                        tracing::info!(revision = update.revision, "coordinator policy applied");
                        if tick.period() != agent.interval() {
                            tick = interval_timer(agent.interval()).await;
                        }
                    }
                    Err(e) => tracing::error!(error = %error_chain(&e), "coordinator policy refused; the previous one stays"),
                }
            }
            _ = sighup.recv() => tracing::warn!(
                path = %path.display(),
                "SIGHUP: the shadow role does not reload its file; restart it to apply changes"
            ),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    if outcome.is_ok() {
        agent.drain().await;
        let (line, report) = agent.report()?;
        emit(&line, report, reporter.as_ref()).await?;
    }
    let stopped = agent.stop();
    if let Some(reporter) = reporter {
        // Unacknowledged reports stay in the spool for the next start.
        reporter.stop().await?;
    }
    outcome?;
    stopped?;
    Ok(())
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
