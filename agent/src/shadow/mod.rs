//! The shadow role: receive mirrored flows, rebuild each client stream, replay it against the
//! local shadow workload, time every exchange, and throw the responses away.
//!
//! The pure pieces live in their own modules so they can be tested without sockets: [`vxlan`]
//! decodes mirror datagrams, [`reassembly`] rebuilds streams, [`http`] and [`exchange`] cut them
//! into exchanges.

pub mod exchange;
pub mod http;
pub mod reassembly;
pub mod vxlan;
