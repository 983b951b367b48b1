//! The Shadow Instance Manager's rows: one per instance, and one event per state change.

use rusqlite::{OptionalExtension as _, params};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, sql};

/// Where an instance is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowState {
    /// The provisioner is making it.
    Creating,
    /// Running and registered as a mirror session.
    Running,
    /// Running, but its mirror session is withdrawn (no traffic) and the manager leaves it be.
    Paused,
    /// Being removed (retried until the provisioner says nothing is left).
    Destroying,
    /// Gone.
    Destroyed,
    /// Its create failed; whatever it made was removed.
    Failed,
}

impl ShadowState {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Destroying => "destroying",
            Self::Destroyed => "destroyed",
            Self::Failed => "failed",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "creating" => Self::Creating,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "destroying" => Self::Destroying,
            "failed" => Self::Failed,
            _ => Self::Destroyed,
        }
    }

    /// Whether the instance (still) exists and costs money.
    pub fn is_active(self) -> bool {
        !matches!(self, Self::Destroyed | Self::Failed)
    }
}

/// Who asked for an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShadowOrigin {
    /// The manager, for the workload's shadow template.
    Auto,
    /// An operator (`doppel shadows create`); steering and schedules leave it alone.
    Manual,
}

/// One shadow instance as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShadowRow {
    /// 8 hex digits.
    pub id: String,
    /// The workload it shadows.
    pub workload: String,
    /// Its VM type.
    pub vm_type: String,
    /// `local` or `exec`.
    pub provisioner: String,
    /// Who asked for it.
    pub origin: ShadowOrigin,
    /// Where it is in its life.
    pub state: ShadowState,
    /// Its mirror session's VNI.
    pub vni: u32,
    /// Its agent's name.
    pub agent: String,
    /// Its VXLAN endpoint, once created.
    pub addr: Option<String>,
    /// Its catalog price when created.
    pub price_per_hour: f64,
    /// The provisioner's handle.
    pub handle: serde_json::Value,
    /// Why it failed or was replaced.
    pub error: Option<String>,
    /// Created, ms since the epoch.
    pub created_ms: i64,
    /// Started running, ms since the epoch.
    pub running_ms: Option<i64>,
    /// Last state change, ms since the epoch.
    pub updated_ms: i64,
}

/// One state change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShadowEvent {
    /// The instance.
    pub instance_id: String,
    /// When, ms since the epoch.
    pub at_ms: i64,
    /// The state entered.
    pub state: ShadowState,
    /// Why.
    pub detail: Option<String>,
}

const COLUMNS: &str = "id, workload, vm_type, provisioner, origin, state, vni, agent, addr, \
                       price_per_hour, handle, error, created_ms, running_ms, updated_ms";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ShadowRow> {
    let origin: String = r.get(4)?;
    let state: String = r.get(5)?;
    let handle: String = r.get(10)?;
    Ok(ShadowRow {
        id: r.get(0)?,
        workload: r.get(1)?,
        vm_type: r.get(2)?,
        provisioner: r.get(3)?,
        origin: if origin == "manual" {
            ShadowOrigin::Manual
        } else {
            ShadowOrigin::Auto
        },
        state: ShadowState::parse(&state),
        vni: r.get(6)?,
        agent: r.get(7)?,
        addr: r.get(8)?,
        price_per_hour: r.get(9)?,
        handle: serde_json::from_str(&handle).unwrap_or(serde_json::Value::Null),
        error: r.get(11)?,
        created_ms: r.get(12)?,
        running_ms: r.get(13)?,
        updated_ms: r.get(14)?,
    })
}

impl Store {
    /// Records a new instance (state `creating`) and its first event.
    pub fn insert_shadow(&mut self, s: &ShadowRow) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(sql("begin"))?;
        tx.execute(
            &format!(
                "INSERT INTO shadow_instances ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, \
                 ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
            ),
            params![
                s.id,
                s.workload,
                s.vm_type,
                s.provisioner,
                if s.origin == ShadowOrigin::Manual {
                    "manual"
                } else {
                    "auto"
                },
                s.state.as_str(),
                s.vni,
                s.agent,
                s.addr,
                s.price_per_hour,
                s.handle.to_string(),
                s.error,
                s.created_ms,
                s.running_ms,
                s.updated_ms
            ],
        )
        .map_err(sql("insert shadow"))?;
        tx.execute(
            "INSERT INTO shadow_events (instance_id, at_ms, state, detail) VALUES (?1, ?2, ?3, ?4)",
            params![s.id, s.created_ms, s.state.as_str(), s.error],
        )
        .map_err(sql("log shadow event"))?;
        tx.commit().map_err(sql("commit shadow"))
    }

    /// Stores an instance's new state (and the fields that came with it) with an event.
    pub fn update_shadow(&mut self, s: &ShadowRow, detail: Option<&str>) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(sql("begin"))?;
        tx.execute(
            "UPDATE shadow_instances SET state = ?2, agent = ?3, addr = ?4, handle = ?5, error = ?6,
                running_ms = ?7, updated_ms = ?8 WHERE id = ?1",
            params![
                s.id,
                s.state.as_str(),
                s.agent,
                s.addr,
                s.handle.to_string(),
                s.error,
                s.running_ms,
                s.updated_ms
            ],
        )
        .map_err(sql("update shadow"))?;
        tx.execute(
            "INSERT INTO shadow_events (instance_id, at_ms, state, detail) VALUES (?1, ?2, ?3, ?4)",
            params![s.id, s.updated_ms, s.state.as_str(), detail],
        )
        .map_err(sql("log shadow event"))?;
        tx.commit().map_err(sql("commit shadow"))
    }

    /// Instances, oldest first: only those that exist, or all ever made.
    pub fn shadows(&self, include_finished: bool) -> Result<Vec<ShadowRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!(
                "SELECT {COLUMNS} FROM shadow_instances
                 WHERE ?1 OR state NOT IN ('destroyed', 'failed') ORDER BY created_ms, id"
            ))
            .map_err(sql("prepare"))?;
        stmt.query_map([include_finished], row)
            .map_err(sql("list shadows"))?
            .collect::<Result<_, _>>()
            .map_err(sql("list shadows"))
    }

    /// One instance.
    pub fn shadow(&self, id: &str) -> Result<Option<ShadowRow>, StoreError> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM shadow_instances WHERE id = ?1"),
                [id],
                row,
            )
            .optional()
            .map_err(sql("read shadow"))
    }

    /// An instance's state changes, oldest first.
    pub fn shadow_events(&self, id: &str) -> Result<Vec<ShadowEvent>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT instance_id, at_ms, state, detail FROM shadow_events
                 WHERE instance_id = ?1 ORDER BY id",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map([id], |r| {
            let state: String = r.get(2)?;
            Ok(ShadowEvent {
                instance_id: r.get(0)?,
                at_ms: r.get(1)?,
                state: ShadowState::parse(&state),
                detail: r.get(3)?,
            })
        })
        .map_err(sql("list shadow events"))?
        .collect::<Result<_, _>>()
        .map_err(sql("list shadow events"))
    }

    /// When a create of `vm_type` for `workload` last failed.
    pub fn last_shadow_failure_ms(
        &self,
        workload: &str,
        vm_type: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row(
                "SELECT max(updated_ms) FROM shadow_instances
                 WHERE workload = ?1 AND vm_type = ?2 AND state = 'failed'",
                params![workload, vm_type],
                |r| r.get(0),
            )
            .map_err(sql("read shadow failures"))
    }
}
