//! The agent's run loop, one for both roles: report every interval (a JSON line on stdout and,
//! with a coordinator, a report to its spool), apply the coordinator's policies as they come,
//! handle SIGHUP, and on SIGINT/SIGTERM report the last partial interval, finish what the role
//! holds and detach. What differs between the live and the shadow role is behind [`Role`].

use std::{
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use doppel_common::wire::{IntervalReport, PolicyUpdate};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
use tracing::{error, info, warn};

use crate::{datapath::error_chain, report::ReportClient};

/// What the run loop needs of a role.
pub trait Role {
    /// The role's JSON line per interval.
    type Line: serde::Serialize;

    /// Time between reports.
    fn interval(&self) -> Duration;

    /// The interval that just ended.
    fn report(&mut self) -> anyhow::Result<(Self::Line, IntervalReport)>;

    /// Applies a policy the coordinator sent.
    fn set_policy(&mut self, update: &PolicyUpdate) -> anyhow::Result<()>;

    /// SIGHUP: re-read the configuration at `path` where the role can.
    fn reload(&mut self, path: &Path);

    /// Before the last report at a stop: finish what the role holds (the shadow's backlog).
    fn finish(&mut self) -> impl Future<Output = ()> {
        async {}
    }

    /// Detaches and removes everything the role set up.
    fn stop(self) -> anyhow::Result<()>;
}

/// Runs `role` until SIGINT or SIGTERM (or a failed report), then reports the partial last
/// interval, stops the role and the reporter (whose unacknowledged reports stay in its spool).
pub async fn run<R: Role>(
    mut role: R,
    path: &Path,
    reporter: Option<ReportClient>,
) -> anyhow::Result<()> {
    let mut policy_updates = reporter.as_ref().map(|r| r.handle.policy());
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = interval_timer(role.interval()).await;
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = tick.tick() => match role.report() {
                Ok((line, report)) => emit(&line, report, reporter.as_ref()).await?,
                Err(e) => break Err(e),
            },
            // The coordinator's policy replaces the file's once it arrives.
            Some(update) = next_policy(&mut policy_updates) => {
                match role.set_policy(&update) {
                    Ok(()) => {
                        info!(revision = update.revision, "coordinator policy applied");
                        if tick.period() != role.interval() {
                            tick = interval_timer(role.interval()).await;
                        }
                    }
                    Err(e) => error!(
                        error = %error_chain(e.as_ref()),
                        "coordinator policy refused; the previous one stays"
                    ),
                }
            }
            _ = sighup.recv() => role.reload(path),
            _ = tokio::signal::ctrl_c() => break Ok(()),
            _ = sigterm.recv() => break Ok(()),
        }
    };
    // The partial last interval is reported too: stopping must not lose what was measured.
    if outcome.is_ok() {
        role.finish().await;
        let (line, report) = role.report()?;
        emit(&line, report, reporter.as_ref()).await?;
    }
    let stopped = role.stop();
    if let Some(reporter) = reporter {
        reporter.stop().await?;
    }
    outcome?;
    stopped
}

/// A report interval timer whose first tick is one interval from now.
async fn interval_timer(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    tick
}

/// The next policy update from the coordinator; pending forever without one.
async fn next_policy(
    updates: &mut Option<watch::Receiver<Option<PolicyUpdate>>>,
) -> Option<PolicyUpdate> {
    let Some(updates) = updates else {
        return std::future::pending().await;
    };
    updates.changed().await.ok()?;
    updates.borrow_and_update().clone()
}

/// Prints an interval's JSON line and, with a coordinator, hands its report to the spool.
/// Waits while the spool is full: the kernel and the replayer keep counting meanwhile, so the
/// next report covers the gap and nothing is lost.
async fn emit(
    line: &impl serde::Serialize,
    report: IntervalReport,
    reporter: Option<&ReportClient>,
) -> anyhow::Result<()> {
    print_line(&serde_json::to_string(line)?);
    if let Some(reporter) = reporter {
        reporter.handle.submit(report).await?;
    }
    Ok(())
}

/// Whether stdout was found closed (`doppel-agent … | head -n 1`).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Prints one JSON line. A closed stdout is no reason to stop measuring or to leave the data
/// path attached (as `println!`'s panic would): the agent logs it once and keeps running, its
/// reports still going to the coordinator.
pub fn print_line(line: &str) {
    use std::io::Write as _;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        STDOUT_CLOSED.store(true, Ordering::Relaxed);
        warn!(error = %e, "stdout is closed: interval lines are no longer printed; the agent keeps running");
    }
}

impl Role for crate::live::LiveAgent {
    type Line = crate::live::IntervalLine;

    fn interval(&self) -> Duration {
        Self::interval(self)
    }

    fn report(&mut self) -> anyhow::Result<(Self::Line, IntervalReport)> {
        Ok(Self::report(self)?)
    }

    fn set_policy(&mut self, update: &PolicyUpdate) -> anyhow::Result<()> {
        Ok(Self::set_policy(self, update.policy.clone())?)
    }

    /// Re-reads the file and applies its policy in place: nothing is detached and flows
    /// already decided keep their decision. A bad file keeps the old policy.
    fn reload(&mut self, path: &Path) {
        match crate::config::LiveConfig::load(path)
            .map_err(anyhow::Error::from)
            .and_then(|c| Ok(Self::set_policy(self, c.policy()?)?))
        {
            Ok(()) => info!(path = %path.display(), "policy reloaded"),
            Err(e) => error!(
                error = %error_chain(e.as_ref()),
                "reload refused; the previous policy stays"
            ),
        }
    }

    fn stop(self) -> anyhow::Result<()> {
        Ok(Self::stop(self)?)
    }
}

impl Role for crate::shadow::ShadowAgent {
    type Line = crate::shadow::ShadowLine;

    fn interval(&self) -> Duration {
        Self::interval(self)
    }

    fn report(&mut self) -> anyhow::Result<(Self::Line, IntervalReport)> {
        Ok(Self::report(self)?)
    }

    fn set_policy(&mut self, update: &PolicyUpdate) -> anyhow::Result<()> {
        Ok(Self::set_policy(self, &update.policy)?)
    }

    /// The shadow's admission and replay are set up once from its file; a reload would have
    /// to re-bind and re-admit, so SIGHUP (systemd's `reload`, shared with the live role's
    /// unit) only says so instead of killing the agent, which is SIGHUP's default action.
    fn reload(&mut self, path: &Path) {
        warn!(
            path = %path.display(),
            "SIGHUP: the shadow role does not reload its file; restart it to apply changes"
        );
    }

    fn finish(&mut self) -> impl Future<Output = ()> {
        self.drain()
    }

    fn stop(self) -> anyhow::Result<()> {
        Ok(Self::stop(self)?)
    }
}
