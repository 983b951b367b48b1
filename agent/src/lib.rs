//! doppel's per-host agent.
//!
//! The agent loads doppel's eBPF programs (embedded in this crate at build time, see `build.rs`),
//! attaches them to a workload's interface, and reads what they measured. [`datapath`] owns the
//! programs and their attachments; [`netlink`] holds the few rtnetlink operations aya does not;
//! [`live`] is the live role; [`report`] delivers reports to the coordinator over QUIC + mTLS
//! through an on-disk spool.
#![forbid(unsafe_code)]

pub mod config;
pub mod datapath;
pub mod live;
pub mod metrics;
pub mod mirror_devices;
pub mod netlink;
pub mod ownership;
pub mod patterns;
pub mod policy;
pub mod report;
pub mod role;
pub mod shadow;
