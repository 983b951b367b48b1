//! doppel's coordinator.
//!
//! Agents connect over QUIC with mutual TLS ([`net`]) using certificates from the coordinator's
//! own CA ([`ca`]); their reports are stored exactly once in SQLite ([`store`]) and acknowledged
//! only when durable; workloads and their policy ([`policy`]) are pushed to connected agents.
//! Every rule that turns measurements into a move lives in the sans-IO engine
//! (`doppel-engine`): the comparison of live and shadow VM types at matched load ([`compare`],
//! re-exported from it), capacities, the forecast decision and the act policy. [`measurements`]
//! feeds the comparison from the store; [`recommend`] writes down what the rules chose;
//! [`webhook`] stores recommendations and delivers them signed from a persistent outbox.
//! [`forecast`] runs the predictor engine (`doppel-engine`) on the stored reports: load
//! forecasts, degradation warnings and forecast-breach recommendations; [`act`] carries recommendations out in act
//! mode. The [`api`] serves the CLI ([`cli`], [`client`], [`table`]) and `/metrics` over HTTP,
//! and the dashboard ([`ui`]) on the same address; both check the secrets of [`secret`].
//! The Shadow Instance Manager ([`shadows`]) creates, replaces and destroys the workloads' shadow
//! instances within their budget and registers their mirror sessions. [`serve`] wires it
//! together.
//! [`answer_hello`] is the handshake decision.
#![forbid(unsafe_code)]

pub mod act;
pub mod api;
pub mod ca;
pub mod cli;
pub mod client;
pub mod clock;
/// The comparison of live and shadow at matched load: [`doppel_engine::compare`], re-exported
/// where the coordinator's callers have always found it.
pub mod compare {
    pub use doppel_engine::compare::*;
}
pub mod forecast;
pub mod measurements;
pub mod mirror;
pub mod net;
pub mod policy;
pub mod recommend;
pub mod secret;
pub mod serve;
pub mod shadows;
pub mod store;
pub mod table;
pub mod ui;
pub mod webhook;

use doppel_common::wire::{Hello, Message, Refused, SUPPORTED_VERSIONS, Welcome, negotiate};

/// Answers an agent's `Hello`: `Welcome` with the newest common protocol version, or `Refused`
/// naming the versions this coordinator speaks.
pub fn answer_hello(hello: &Hello, agent_name: &str) -> Message {
    match negotiate(SUPPORTED_VERSIONS, hello.min_version..=hello.max_version) {
        Ok(version) => Message::Welcome(Welcome {
            version,
            coordinator_version: env!("CARGO_PKG_VERSION").to_owned(),
            agent_name: agent_name.to_owned(),
        }),
        Err(e) => Message::Refused(Refused {
            reason: e.to_string(),
            min_version: *SUPPORTED_VERSIONS.start(),
            max_version: *SUPPORTED_VERSIONS.end(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use doppel_common::wire::{AgentRole, PROTOCOL_VERSION};

    use super::*;

    fn hello(min_version: u16, max_version: u16) -> Hello {
        Hello {
            min_version,
            max_version,
            agent_version: "0.0.0".into(),
            hostname: "h".into(),
            roles: vec![AgentRole::Live],
            next_report_seq: 0,
        }
    }

    #[test]
    fn a_compatible_agent_is_welcomed_with_the_newest_common_version() {
        match answer_hello(&hello(1, PROTOCOL_VERSION + 5), "a1") {
            Message::Welcome(w) => {
                assert_eq!(w.version, PROTOCOL_VERSION);
                assert_eq!(w.agent_name, "a1");
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
    }

    #[test]
    fn an_agent_speaking_only_newer_versions_is_told_why() {
        match answer_hello(&hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2), "a1") {
            Message::Refused(r) => {
                assert_eq!(r.max_version, PROTOCOL_VERSION);
                assert!(
                    r.reason.contains("no common protocol version"),
                    "{}",
                    r.reason
                );
            }
            other => panic!("expected Refused, got {other:?}"),
        }
    }
}
