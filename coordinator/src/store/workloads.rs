//! The control-plane tables: `workloads`, their `policies` history, their `shadow_sessions`, and
//! the policy revision in `meta` that every change bumps. Kept apart because these are written
//! rarely (API, act mode), each write under a new policy revision.

use rusqlite::{OptionalExtension as _, params};

use super::{Store, StoreError, i64_of, sql};
use crate::policy::{Policy, WorkloadSpec};

impl Store {
    /// The current policy revision (bumped by every workload or policy change).
    pub fn policy_revision(&self) -> Result<u64, StoreError> {
        let value: i64 = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'policy_revision'",
                [],
                |r| r.get(0),
            )
            .map_err(sql("read policy revision"))?;
        Ok(u64::try_from(value).unwrap_or_default())
    }

    /// Creates or replaces a workload; returns the new policy revision.
    pub fn put_workload(&mut self, spec: &WorkloadSpec, now_ms: i64) -> Result<u64, StoreError> {
        let tx = self.write_transaction("begin")?;
        let revision = write_workload(&tx, spec, now_ms)?;
        tx.commit().map_err(sql("commit workload"))?;
        Ok(revision)
    }

    /// Replaces a workload's policy; returns the new policy revision.
    pub fn set_policy(
        &mut self,
        workload: &str,
        policy: &Policy,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut spec = self
            .workload(workload)?
            .ok_or_else(|| StoreError::NoSuchWorkload(workload.to_owned()))?;
        spec.policy = policy.clone();
        self.put_workload(&spec, now_ms)
    }

    /// Removes a workload; returns the new policy revision.
    pub fn remove_workload(&mut self, name: &str) -> Result<u64, StoreError> {
        let tx = self.write_transaction("begin")?;
        let removed = tx
            .execute("DELETE FROM workloads WHERE name = ?1", [name])
            .map_err(sql("remove workload"))?;
        if removed == 0 {
            return Err(StoreError::NoSuchWorkload(name.to_owned()));
        }
        let revision = bump_revision(&tx)?;
        tx.commit().map_err(sql("commit"))?;
        Ok(revision)
    }

    /// One workload.
    pub fn workload(&self, name: &str) -> Result<Option<WorkloadSpec>, StoreError> {
        let json: Option<String> = self
            .conn
            .query_row("SELECT spec FROM workloads WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(sql("read workload"))?;
        json.map(|j| parse_spec(&j)).transpose()
    }

    /// The policy revision of a workload's last change.
    pub fn workload_revision(&self, name: &str) -> Result<Option<u64>, StoreError> {
        let revision: Option<i64> = self
            .conn
            .query_row(
                "SELECT revision FROM workloads WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql("read workload revision"))?;
        Ok(revision.map(|r| u64::try_from(r).unwrap_or_default()))
    }

    /// Every workload, by name.
    pub fn workloads(&self) -> Result<Vec<WorkloadSpec>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT spec FROM workloads ORDER BY name")
            .map_err(sql("prepare"))?;
        let specs: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(sql("list workloads"))?
            .collect::<Result<_, _>>()
            .map_err(sql("list workloads"))?;
        specs.iter().map(|j| parse_spec(j)).collect()
    }
}

fn parse_spec(json: &str) -> Result<WorkloadSpec, StoreError> {
    serde_json::from_str(json).map_err(|source| StoreError::Json {
        what: "workload",
        source,
    })
}

pub(super) fn bump_revision(tx: &rusqlite::Transaction<'_>) -> Result<u64, StoreError> {
    let value: i64 = tx
        .query_row(
            "UPDATE meta SET value = value + 1 WHERE key = 'policy_revision' RETURNING value",
            [],
            |r| r.get(0),
        )
        .map_err(sql("bump policy revision"))?;
    Ok(u64::try_from(value).unwrap_or_default())
}

/// Writes `spec` (its row, a policy history row, its shadow sessions) in `tx` under a new
/// policy revision, which it returns.
pub(crate) fn write_workload(
    tx: &rusqlite::Transaction<'_>,
    spec: &WorkloadSpec,
    now_ms: i64,
) -> Result<u64, StoreError> {
    let json = serde_json::to_string(spec).map_err(|source| StoreError::Json {
        what: "workload",
        source,
    })?;
    let policy = serde_json::to_string(&spec.policy).map_err(|source| StoreError::Json {
        what: "policy",
        source,
    })?;
    let revision = bump_revision(tx)?;
    tx.execute(
        "INSERT INTO workloads (name, spec, revision, created_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?4)
             ON CONFLICT(name) DO UPDATE SET spec = ?2, revision = ?3, updated_ms = ?4",
        params![spec.name, json, i64_of(revision), now_ms],
    )
    .map_err(sql("store workload"))?;
    tx.execute(
        "INSERT INTO policies (workload, revision, policy, changed_ms) VALUES (?1, ?2, ?3, ?4)",
        params![spec.name, i64_of(revision), policy, now_ms],
    )
    .map_err(sql("store policy"))?;
    tx.execute(
        "DELETE FROM shadow_sessions WHERE workload = ?1",
        [&spec.name],
    )
    .map_err(sql("replace shadow sessions"))?;
    for s in &spec.shadows {
        tx.execute(
            "INSERT INTO shadow_sessions (workload, vni, agent, vm_type, shadow_addr, created_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                spec.name,
                s.vni,
                s.agent,
                s.vm_type,
                s.addr.to_string(),
                now_ms
            ],
        )
        .map_err(sql("store shadow session"))?;
    }
    Ok(revision)
}
