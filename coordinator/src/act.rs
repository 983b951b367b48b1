//! Act mode: when a workload's policy says `act`, its newest recommendation is carried out by a
//! scale action (an operator-configured command), the outcome is recorded, the workload's live
//! VM type is updated, and after a settling time the coordinator checks that live latency came
//! back under the SLO.
//!
//! Actions are named in the serve config (`[[actions]]`) and only *referenced* by a workload's
//! policy (`policy.action = "resize"`): whoever holds the API token can change policies, but
//! only whoever writes the coordinator's config file chooses what commands it may run.
//!
//! The command gets the recommendation as JSON on stdin and `DOPPEL_WORKLOAD`,
//! `DOPPEL_FROM_VM_TYPE`, `DOPPEL_TO_VM_TYPE` and `DOPPEL_RECOMMENDATION_ID` in its
//! environment; exit status 0 means the move is done. It runs in its own process group, which is
//! killed when it overruns its timeout.

use std::{
    collections::HashMap,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{io::AsyncWriteExt as _, sync::watch};
use tracing::{info, warn};

use crate::{
    compare::{CompareConfig, Role},
    measurements::compare_workload,
    net::PolicySnapshot,
    policy::Mode,
    store::{ActionState, RecommendationRow, Store, StoreError},
};

/// A scale action the coordinator may run (`[[actions]]` in the serve config).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionConfig {
    /// Name a workload policy refers to.
    pub name: String,
    /// Program and arguments.
    pub command: Vec<String>,
    /// The command is killed after this long, ms.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Time after the move before live latency is checked, ms.
    #[serde(default = "default_verify_after_ms")]
    pub verify_after_ms: u64,
}

fn default_timeout_ms() -> u64 {
    60_000
}

fn default_verify_after_ms() -> u64 {
    60_000
}

/// Output kept in an action's record, bytes (the end of it: that is where errors are).
const OUTPUT_TAIL: usize = 2000;

/// What the actor needs.
#[derive(Debug)]
pub struct Actor {
    /// Its store connection.
    pub store: Arc<Mutex<Store>>,
    /// Configured actions by name.
    pub actions: HashMap<String, ActionConfig>,
    /// Where a changed live VM type is published.
    pub policy: Arc<watch::Sender<Arc<PolicySnapshot>>>,
    /// VM type prices (for the verification's comparison).
    pub prices: HashMap<String, f64>,
    /// Comparison tunables.
    pub compare: CompareConfig,
    /// The coordinator's clock.
    pub clock: crate::clock::Clock,
    /// Recommendations older than this are not acted on (a restarted coordinator must not
    /// replay yesterday's advice), ms.
    pub max_age_ms: i64,
    /// Counts the rounds (`doppel_act_rounds_total`).
    pub stats: Arc<crate::webhook::DecisionStats>,
}

/// Why a recommendation is not acted on now.
fn skip_reason(
    rec: &RecommendationRow,
    live_type: Option<&str>,
    now_ms: i64,
    max_age_ms: i64,
) -> Option<&'static str> {
    if now_ms - rec.created_ms > max_age_ms {
        return Some("too old");
    }
    if live_type != Some(rec.current_vm_type.as_str()) {
        return Some("live already moved");
    }
    None
}

impl Actor {
    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One round: verifies moves whose settling time is over, then acts on fresh
    /// recommendations of act-mode workloads.
    pub async fn step(&self, now_ms: i64) -> Result<(), StoreError> {
        let mut todo = Vec::new();
        {
            let mut store = self.store();
            for spec in store.workloads()? {
                if spec.policy.mode != Mode::Act {
                    continue;
                }
                let last = store.last_action(&spec.name)?;
                if let Some(last) = &last {
                    match last.state {
                        ActionState::Running => continue,
                        ActionState::Done => {
                            self.verify(&mut store, &spec, last, now_ms)?;
                            continue;
                        }
                        _ => {}
                    }
                }
                let Some(rec) = store.recommendations(Some(&spec.name), 1)?.pop() else {
                    continue;
                };
                if last.as_ref().is_some_and(|a| a.recommendation_id >= rec.id) {
                    continue;
                }
                let live_type = spec.live.first().map(|l| l.vm_type.as_str());
                if let Some(why) = skip_reason(&rec, live_type, now_ms, self.max_age_ms) {
                    tracing::debug!(workload = %spec.name, id = rec.id, why, "recommendation not acted on");
                    continue;
                }
                let Some(name) = spec.policy.action.clone() else {
                    continue;
                };
                let Some(id) = store.start_action(&rec, &name, now_ms)? else {
                    continue;
                };
                match self.actions.get(&name) {
                    Some(action) => todo.push((id, rec, action.clone())),
                    None => store.finish_action(
                        id,
                        ActionState::Failed,
                        &format!("no action named {name:?} in the coordinator's config"),
                        now_ms,
                    )?,
                }
            }
        }
        for (id, rec, action) in todo {
            info!(workload = %rec.workload, from = %rec.current_vm_type, to = %rec.recommended_vm_type, action = %action.name, "acting on recommendation");
            let outcome = run_action(&action, &rec).await;
            let now = self.clock.now_ms();
            let mut store = self.store();
            match outcome {
                Ok(detail) => {
                    self.finish_moving_live(&mut store, id, &detail, now, &rec)?;
                    info!(workload = %rec.workload, to = %rec.recommended_vm_type, "scale action done; verification pending");
                }
                Err(detail) => {
                    warn!(workload = %rec.workload, %detail, "scale action failed");
                    store.finish_action(id, ActionState::Failed, &detail, now)?;
                }
            }
        }
        Ok(())
    }

    /// Marks the action done, records the live hosts' new VM type with it, and publishes the
    /// policy.
    fn finish_moving_live(
        &self,
        store: &mut Store,
        id: i64,
        detail: &str,
        now_ms: i64,
        rec: &RecommendationRow,
    ) -> Result<(), StoreError> {
        let Some(mut spec) = store.workload(&rec.workload)? else {
            // Deleted while the action ran: nothing to move.
            return store.finish_action(id, ActionState::Done, detail, now_ms);
        };
        for live in &mut spec.live {
            if live.vm_type == rec.current_vm_type {
                live.vm_type.clone_from(&rec.recommended_vm_type);
            }
        }
        store.finish_action_moving_live(id, detail, now_ms, &spec)?;
        PolicySnapshot::publish(&self.policy, store)?;
        Ok(())
    }

    /// Checks live latency since the move once the settling time is over.
    fn verify(
        &self,
        store: &mut Store,
        spec: &crate::policy::WorkloadSpec,
        action: &crate::store::ActionRow,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let Some(finished) = action.finished_ms else {
            return Ok(());
        };
        let verify_after = self
            .actions
            .get(&action.action)
            .map_or(default_verify_after_ms(), |a| a.verify_after_ms);
        let verify_after = i64::try_from(verify_after).unwrap_or(i64::MAX);
        if now_ms < finished.saturating_add(verify_after) {
            return Ok(());
        }
        // The window starts half-way through the settling time: the first seconds after a
        // move still carry the queue built up before it.
        let window = now_ms - finished - verify_after / 2;
        let comparison =
            compare_workload(store, spec, now_ms, window, &self.compare, &self.prices)?;
        let Some(live) = comparison.types.iter().find(|t| t.role == Role::Live) else {
            // No live measurement yet: wait for one.
            return Ok(());
        };
        let recovered = live.at_percentile_ms <= spec.policy.slo.max_latency_ms;
        info!(workload = %spec.name, live_ms = live.at_percentile_ms, slo_ms = spec.policy.slo.max_latency_ms, recovered, "scale action verified");
        store.verify_action(action.id, recovered, live.at_percentile_ms, now_ms)
    }
}

/// Runs the command; `Ok(output tail)` on exit status 0, `Err(why)` otherwise.
async fn run_action(action: &ActionConfig, rec: &RecommendationRow) -> Result<String, String> {
    let Some((program, args)) = action.command.split_first() else {
        return Err("the action's command is empty".into());
    };
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("DOPPEL_WORKLOAD", &rec.workload)
        .env("DOPPEL_FROM_VM_TYPE", &rec.current_vm_type)
        .env("DOPPEL_TO_VM_TYPE", &rec.recommended_vm_type)
        .env("DOPPEL_RECOMMENDATION_ID", rec.id.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot start {program:?}: {e}"))?;
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        let body = rec.body.to_string();
        // A command that does not read its input is fine: a broken pipe is not an error.
        let _ = stdin.write_all(body.as_bytes()).await;
    }
    let timeout = Duration::from_millis(action.timeout_ms);
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            let tail = tail(&text);
            if out.status.success() {
                Ok(tail)
            } else {
                Err(format!("{program:?} failed ({}): {tail}", out.status))
            }
        }
        Ok(Err(e)) => Err(format!("waiting for {program:?}: {e}")),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // The whole group: a shell script's children must not outlive it.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            Err(format!(
                "{program:?} did not finish within {timeout:?} and was killed"
            ))
        }
    }
}

fn tail(text: &str) -> String {
    let text = text.trim();
    let start = text.len().saturating_sub(OUTPUT_TAIL);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_owned()
}

/// Runs [`Actor::step`] every `interval` until shutdown.
pub async fn run_actor(actor: Arc<Actor>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
    {
        let mut store = actor.store();
        match store.abandon_running_actions(actor.clock.now_ms()) {
            Ok(0) => {}
            Ok(n) => warn!(
                actions = n,
                "actions left running by the previous coordinator marked failed"
            ),
            Err(e) => {
                warn!(error = %doppel_common::error_chain(&e), "cannot check for abandoned actions")
            }
        }
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = actor.step(actor.clock.now_ms()).await {
                    warn!(error = %doppel_common::error_chain(&e), "act mode round failed");
                }
                actor.stats.act_rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(created_ms: i64, current: &str) -> RecommendationRow {
        RecommendationRow {
            id: 1,
            workload: "w".into(),
            created_ms,
            idempotency_key: "k".into(),
            reason: "slo_breach".into(),
            current_vm_type: current.into(),
            recommended_vm_type: "large".into(),
            body: serde_json::json!({}),
        }
    }

    #[test]
    fn stale_or_already_applied_recommendations_are_skipped() {
        assert_eq!(
            skip_reason(&rec(1000, "small"), Some("small"), 2000, 5000),
            None
        );
        assert_eq!(
            skip_reason(&rec(1000, "small"), Some("small"), 10_000, 5000),
            Some("too old")
        );
        assert_eq!(
            skip_reason(&rec(1000, "small"), Some("large"), 2000, 5000),
            Some("live already moved")
        );
    }

    #[test]
    fn output_tails_keep_the_end_on_a_character_boundary() {
        let long = format!("{}é{}", "a".repeat(10), "b".repeat(OUTPUT_TAIL - 1));
        let t = tail(&long);
        assert!(t.ends_with('b') && t.len() <= OUTPUT_TAIL);
    }
}
