//! doppel's testbed and end-to-end tests.
//!
//! The [`testbed`] builds "hosts" out of network namespaces joined by veth pairs, runs processes
//! inside them, and confines processes to cgroups standing in for VM sizes. The end-to-end tests
//! in `tests/` and the demo use it. Every resource it creates is removed by a `Drop` guard, even
//! when a test panics, and names are unique per process so independent tests run in parallel.
//! It never touches the root namespace's addresses or routes, and its hosts have no route out of
//! the testbed.

pub mod agent;
pub mod demo;
pub mod lab;
pub mod metrics;
pub mod reports;
pub mod testbed;
pub mod topology;
pub mod traffic;
pub mod workloads;
