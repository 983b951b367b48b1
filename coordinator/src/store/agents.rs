//! The `agents` table: one row per agent certificate name, with its last handshake and
//! connection state. Kept apart from the reports because the connection handler writes it on
//! connect and disconnect; the ingest writer only adds a missing row and bumps `last_seq`.

use doppel_common::wire::Hello;
use rusqlite::params;
use serde::Serialize;

use super::{Store, StoreError, sql};

/// An agent as the store knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentRow {
    /// Certificate common name.
    pub name: String,
    /// Host name it reported.
    pub hostname: String,
    /// Its software version.
    pub agent_version: String,
    /// Its roles.
    pub roles: String,
    /// Serial of the certificate it last connected with.
    pub cert_serial: String,
    /// Last connection or report, ms since the epoch.
    pub last_seen_ms: i64,
    /// Connected now.
    pub connected: bool,
    /// Highest report sequence stored.
    pub last_seq: Option<i64>,
    /// Reports stored.
    pub reports: i64,
}

impl Store {
    /// Records that an agent connected (handshake done). Returns the highest report sequence
    /// number stored for it, if any.
    pub fn agent_connected(
        &self,
        name: &str,
        hello: &Hello,
        serial: &str,
        now_ms: i64,
    ) -> Result<Option<u64>, StoreError> {
        let roles = hello
            .roles
            .iter()
            .map(|r| format!("{r:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(",");
        let last_seq: Option<i64> = self
            .conn
            .query_row(
                "INSERT INTO agents (name, hostname, agent_version, roles, cert_serial,
                    first_seen_ms, last_seen_ms, connected)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1)
                 ON CONFLICT(name) DO UPDATE SET hostname = ?2, agent_version = ?3, roles = ?4,
                    cert_serial = ?5, last_seen_ms = ?6, connected = 1
                 RETURNING last_seq",
                params![
                    name,
                    hello.hostname,
                    hello.agent_version,
                    roles,
                    serial,
                    now_ms
                ],
                |r| r.get(0),
            )
            .map_err(sql("record agent connection"))?;
        Ok(last_seq.map(|s| u64::try_from(s).unwrap_or_default()))
    }

    /// Records that an agent disconnected.
    pub fn agent_disconnected(&self, name: &str, now_ms: i64) -> Result<(), StoreError> {
        self.conn
            .execute(
                "UPDATE agents SET connected = 0, last_seen_ms = ?2 WHERE name = ?1",
                params![name, now_ms],
            )
            .map_err(sql("record agent disconnection"))?;
        Ok(())
    }

    /// Marks every agent disconnected (at start-up: connections do not survive a restart).
    pub fn all_agents_disconnected(&self) -> Result<(), StoreError> {
        self.conn
            .execute("UPDATE agents SET connected = 0", [])
            .map_err(sql("reset connections"))?;
        Ok(())
    }

    /// Every agent that ever connected or reported.
    pub fn agents(&self) -> Result<Vec<AgentRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT a.name, a.hostname, a.agent_version, a.roles, a.cert_serial,
                    a.last_seen_ms, a.connected, a.last_seq,
                    (SELECT count(*) FROM reports r WHERE r.agent_id = a.id)
                 FROM agents a ORDER BY a.name",
            )
            .map_err(sql("prepare"))?;
        stmt.query_map([], |r| {
            Ok(AgentRow {
                name: r.get(0)?,
                hostname: r.get(1)?,
                agent_version: r.get(2)?,
                roles: r.get(3)?,
                cert_serial: r.get(4)?,
                last_seen_ms: r.get(5)?,
                connected: r.get::<_, i64>(6)? != 0,
                last_seq: r.get(7)?,
                reports: r.get(8)?,
            })
        })
        .map_err(sql("list agents"))?
        .collect::<Result<_, _>>()
        .map_err(sql("list agents"))
    }
}
