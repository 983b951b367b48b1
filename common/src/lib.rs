//! Types shared by doppel's eBPF programs, its agent and its coordinator.
//!
//! The crate is `#![no_std]` so that `agent-ebpf` can use the map types; those types are
//! `#[repr(C)]`, `Copy`, with explicit padding and no `bool`, so the kernel and user space agree
//! on every byte. The `user` feature adds `aya::Pod` impls for them; the `std` feature adds the
//! agent <-> coordinator wire protocol ([`wire`]), which is never compiled for BPF.
#![no_std]
#![cfg_attr(not(feature = "user"), forbid(unsafe_code))]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "std")]
pub mod config;
pub mod maps;
#[cfg(feature = "std")]
pub mod wire;

/// An error and its causes on one line, `error: cause: cause…`, for logs: the agent and the
/// coordinator log every error through it.
#[cfg(feature = "std")]
pub fn error_chain(error: &dyn std::error::Error) -> std::string::String {
    use std::string::ToString as _;
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
