//! The evaluation loop: compares every workload each `evaluate_interval_ms`, runs its predictor,
//! and stores and queues what they advise, once the act policy ([`doppel_engine::moves`])
//! admits it.

use std::sync::{Arc, atomic::Ordering};

use doppel_engine::moves::{ActPolicy, LastMove, MoveOutcome, may_move};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::Recommender;
use crate::{
    measurements::compare_workload,
    recommend::{Recommendation, Trigger, recommend},
    store::{ActionState, RecommendationRow, Store, StoreError},
};

/// The workload's last move as the act policy sees it: its newest action, or its newest
/// recommendation when that came after the action's (advice not acted on, or not yet).
fn last_move(store: &Store, workload: &str) -> Result<Option<LastMove>, StoreError> {
    let secs = |ms: i64| u64::try_from(ms / 1000).unwrap_or_default();
    let action = store.last_action(workload)?;
    let advice = store.recommendations(Some(workload), 1)?.pop();
    Ok(match (action, advice) {
        (action, Some(rec)) if action.as_ref().is_none_or(|a| a.recommendation_id < rec.id) => {
            let urgent = Trigger::from_reason(&rec.reason).is_some_and(Trigger::is_urgent);
            Some(LastMove {
                from: rec.current_vm_type,
                to: rec.recommended_vm_type,
                at: secs(rec.created_ms),
                outcome: MoveOutcome::Advised { urgent },
            })
        }
        (Some(a), _) => Some(LastMove {
            at: secs(a.verified_ms.or(a.finished_ms).unwrap_or(a.started_ms)),
            outcome: match a.state {
                ActionState::Running => MoveOutcome::Running,
                ActionState::Done => MoveOutcome::AwaitingVerification,
                ActionState::Verified => MoveOutcome::Recovered,
                ActionState::NotRecovered => MoveOutcome::NotRecovered,
                ActionState::Failed => MoveOutcome::Failed,
            },
            from: a.from_vm_type,
            to: a.to_vm_type,
        }),
        (None, _) => None,
    })
}

/// Whether the act policy ([`doppel_engine::moves`]) lets `rec` be advised now.
fn admitted(
    store: &Store,
    rec: &Recommendation,
    cooldown_secs: u64,
    now_ms: i64,
) -> Result<bool, StoreError> {
    let last = last_move(store, &rec.workload)?;
    let verdict = may_move(
        &ActPolicy { cooldown_secs },
        u64::try_from(now_ms / 1000).unwrap_or_default(),
        last.as_ref(),
        &rec.current_vm_type,
        &rec.recommended_vm_type,
        rec.trigger.is_urgent(),
    );
    if let Err(hold) = &verdict {
        debug!(
            workload = %rec.workload,
            from = %rec.current_vm_type,
            to = %rec.recommended_vm_type,
            reason = rec.trigger.as_str(),
            held = %hold.describe(),
            "recommendation held by the act policy"
        );
    }
    Ok(verdict.is_ok())
}

impl Recommender {
    /// Compares every workload once and stores (and queues) what it recommends. Returns the
    /// recommendations that were new.
    pub fn evaluate(&self, now_ms: i64) -> Result<usize, StoreError> {
        let mut store = self.store();
        let urls: Vec<String> = self.webhooks.iter().map(|w| w.url.clone()).collect();
        let mut new = 0;
        let mut names = Vec::new();
        for spec in store.workloads()? {
            let comparison = compare_workload(
                &store,
                &spec,
                now_ms,
                self.window_ms,
                &self.compare,
                &self.prices,
            )?;
            let json = serde_json::to_value(&comparison).map_err(|source| StoreError::Json {
                what: "comparison",
                source,
            })?;
            store.put_comparison(&spec.name, now_ms, self.window_ms, &json)?;
            let revision = store.workload_revision(&spec.name)?.unwrap_or_default();
            let cooldown_secs = self.cooldown_secs(&spec);
            // The predictor runs whatever the comparison said: it warns before the SLO breaks,
            // the comparison only once it has. It runs first because it also checks the
            // comparison's advice: a move to a cheaper type must hold the day's peak
            // ([`doppel_engine::assess::PeakCheck::vetoes`]). Each trigger has its own
            // idempotency key; the comparison's advice is stored first.
            let forecast = self
                .forecasts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .evaluate(&mut store, &spec, revision, &self.prices, now_ms)?;
            if let Some(rec) = recommend(&comparison, &spec.policy, revision) {
                let veto =
                    forecast
                        .peak_check
                        .vetoes(&comparison, rec.trigger, &rec.recommended_vm_type);
                if let Some(why) = veto {
                    debug!(
                        workload = %rec.workload,
                        to = %rec.recommended_vm_type,
                        reason = rec.trigger.as_str(),
                        held = %why,
                        "comparison's advice held by the forecast"
                    );
                } else if admitted(&store, &rec, cooldown_secs, now_ms)? {
                    new += usize::from(self.store_recommendation(&mut store, &rec, now_ms, &urls)?);
                }
            }
            if let Some(rec) = forecast.recommendation
                && admitted(&store, &rec, cooldown_secs, now_ms)?
            {
                new += usize::from(self.store_recommendation(&mut store, &rec, now_ms, &urls)?);
            }
            names.push(spec.name);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.forecasts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(&names);
        if new > 0 {
            self.queued.notify_one();
        }
        Ok(new)
    }

    /// The act policy's cooldown for `spec`: the predictor's `cooldown_steps` report intervals.
    fn cooldown_secs(&self, spec: &crate::policy::WorkloadSpec) -> u64 {
        let step_secs = u64::from(spec.policy.report_interval_ms.max(1).div_ceil(1000));
        let steps = self
            .forecasts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .settings()
            .cooldown_steps;
        u64::try_from(steps)
            .unwrap_or(u64::MAX)
            .saturating_mul(step_secs)
    }

    /// Stores `rec` and queues it for every webhook, unless the same advice (idempotency key) is
    /// stored already. Returns whether it was new.
    fn store_recommendation(
        &self,
        store: &mut Store,
        rec: &Recommendation,
        now_ms: i64,
        urls: &[String],
    ) -> Result<bool, StoreError> {
        let body = serde_json::to_value(rec).map_err(|source| StoreError::Json {
            what: "recommendation",
            source,
        })?;
        let row = RecommendationRow {
            id: 0,
            workload: rec.workload.clone(),
            created_ms: now_ms,
            idempotency_key: rec.idempotency_key.clone(),
            reason: rec.trigger.as_str().to_owned(),
            current_vm_type: rec.current_vm_type.clone(),
            recommended_vm_type: rec.recommended_vm_type.clone(),
            body,
        };
        let new = store.put_recommendation(&row, urls)?;
        if new {
            info!(
                workload = %rec.workload,
                from = %rec.current_vm_type,
                to = %rec.recommended_vm_type,
                reason = rec.trigger.as_str(),
                "recommendation stored"
            );
            self.stats.recommendations.fetch_add(1, Ordering::Relaxed);
        }
        Ok(new)
    }
}

/// Evaluates every `evaluate_interval` until shutdown.
pub async fn run_evaluator(recommender: Arc<Recommender>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(recommender.evaluate_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let r = Arc::clone(&recommender);
        match tokio::task::spawn_blocking(move || r.evaluate(r.clock.now_ms())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(error = %doppel_common::error_chain(&e), "evaluation failed; will retry")
            }
            Err(e) => warn!(error = %e, "evaluation task failed"),
        }
        recommender
            .stats
            .evaluations
            .fetch_add(1, Ordering::Relaxed);
    }
}
