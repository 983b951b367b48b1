//! Act mode's records: which recommendation was acted on, by which action, how it went, and
//! whether live latency came back under the SLO afterwards.

use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use super::{RecommendationRow, Store, StoreError, sql};
use crate::policy::WorkloadSpec;

/// Where an action is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionState {
    /// The scale command runs.
    Running,
    /// The command failed, timed out or could not start (see `detail`).
    Failed,
    /// The command succeeded; verification is pending.
    Done,
    /// Live latency came back under the SLO after the move.
    Verified,
    /// Live latency was still above the SLO when verified.
    NotRecovered,
}

impl ActionState {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Failed => "failed",
            Self::Done => "done",
            Self::Verified => "verified",
            Self::NotRecovered => "not_recovered",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "running" => Self::Running,
            "done" => Self::Done,
            "verified" => Self::Verified,
            "not_recovered" => Self::NotRecovered,
            _ => Self::Failed,
        }
    }
}

/// One action.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ActionRow {
    /// Row id.
    pub id: i64,
    /// Workload.
    pub workload: String,
    /// The recommendation acted on.
    pub recommendation_id: i64,
    /// The serve config's action name.
    pub action: String,
    /// Live VM type before.
    pub from_vm_type: String,
    /// Live VM type asked for.
    pub to_vm_type: String,
    /// Where it is.
    pub state: ActionState,
    /// Started, ms since the epoch.
    pub started_ms: i64,
    /// Command finished.
    pub finished_ms: Option<i64>,
    /// Verification done.
    pub verified_ms: Option<i64>,
    /// Exit status and output tail, or why it failed.
    pub detail: String,
    /// Live's SLO percentile over the verification window, ms.
    pub live_latency_ms: Option<f64>,
}

const COLUMNS: &str = "id, workload, recommendation_id, action, from_vm_type, to_vm_type, state,
    started_ms, finished_ms, verified_ms, detail, live_latency_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ActionRow> {
    let state: String = r.get(6)?;
    Ok(ActionRow {
        id: r.get(0)?,
        workload: r.get(1)?,
        recommendation_id: r.get(2)?,
        action: r.get(3)?,
        from_vm_type: r.get(4)?,
        to_vm_type: r.get(5)?,
        state: ActionState::parse(&state),
        started_ms: r.get(7)?,
        finished_ms: r.get(8)?,
        verified_ms: r.get(9)?,
        detail: r.get(10)?,
        live_latency_ms: r.get(11)?,
    })
}

impl Store {
    /// Records that `rec` is being acted on by `action`. Returns `None` when it already was (one
    /// action per recommendation, also across restarts).
    pub fn start_action(
        &mut self,
        rec: &RecommendationRow,
        action: &str,
        now_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        let inserted = self
            .conn
            .execute(
                "INSERT INTO actions (workload, recommendation_id, action, from_vm_type,
                    to_vm_type, state, started_ms) VALUES (?1, ?2, ?3, ?4, ?5, 'running', ?6)
                 ON CONFLICT(recommendation_id) DO NOTHING",
                params![
                    rec.workload,
                    rec.id,
                    action,
                    rec.current_vm_type,
                    rec.recommended_vm_type,
                    now_ms
                ],
            )
            .map_err(sql("start action"))?;
        Ok((inserted == 1).then(|| self.conn.last_insert_rowid()))
    }

    /// Records how the command ended.
    pub fn finish_action(
        &mut self,
        id: i64,
        state: ActionState,
        detail: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        finish(&self.conn, id, state, detail, now_ms)
    }

    /// Marks action `id` done and stores `moved` (the workload with its live hosts on the new
    /// type) in one transaction, so nobody reads a done action whose move is not recorded, and a
    /// crash cannot record one without the other. Returns the new policy revision.
    pub fn finish_action_moving_live(
        &mut self,
        id: i64,
        detail: &str,
        now_ms: i64,
        moved: &WorkloadSpec,
    ) -> Result<u64, StoreError> {
        let tx = self.write_transaction("begin")?;
        finish(&tx, id, ActionState::Done, detail, now_ms)?;
        let revision = super::write_workload(&tx, moved, now_ms)?;
        tx.commit().map_err(sql("commit action"))?;
        Ok(revision)
    }

    /// Records the verification.
    pub fn verify_action(
        &mut self,
        id: i64,
        recovered: bool,
        live_latency_ms: f64,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let state = if recovered {
            ActionState::Verified
        } else {
            ActionState::NotRecovered
        };
        self.conn
            .execute(
                "UPDATE actions SET state = ?2, live_latency_ms = ?3, verified_ms = ?4
                 WHERE id = ?1",
                params![id, state.as_str(), live_latency_ms, now_ms],
            )
            .map_err(sql("verify action"))?;
        Ok(())
    }

    /// Actions left `running` by a coordinator that stopped mid-way: their outcome is unknown,
    /// so they are marked failed (the operator sees it) rather than run twice.
    pub fn abandon_running_actions(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        self.conn
            .execute(
                "UPDATE actions SET state = 'failed', finished_ms = ?1,
                    detail = 'the coordinator stopped while the action ran; its outcome is unknown'
                 WHERE state = 'running'",
                params![now_ms],
            )
            .map_err(sql("abandon actions"))
    }

    /// The newest action of a workload.
    pub fn last_action(&self, workload: &str) -> Result<Option<ActionRow>, StoreError> {
        self.conn
            .query_row(
                &format!(
                    "SELECT {COLUMNS} FROM actions WHERE workload = ?1 ORDER BY id DESC LIMIT 1"
                ),
                params![workload],
                row,
            )
            .optional()
            .map_err(sql("read last action"))
    }

    /// Actions, newest first.
    pub fn actions(
        &self,
        workload: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ActionRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM actions WHERE ?1 IS NULL OR workload = ?1
                 ORDER BY id DESC LIMIT ?2"
            ))
            .map_err(sql("prepare"))?;
        stmt.query_map(params![workload, limit], row)
            .map_err(sql("list actions"))?
            .collect::<Result<_, _>>()
            .map_err(sql("list actions"))
    }
}
/// Records how action `id` ended (on the store's connection or inside a transaction).
fn finish(
    conn: &rusqlite::Connection,
    id: i64,
    state: ActionState,
    detail: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE actions SET state = ?2, detail = ?3, finished_ms = ?4 WHERE id = ?1",
        params![id, state.as_str(), detail, now_ms],
    )
    .map_err(sql("finish action"))?;
    Ok(())
}
