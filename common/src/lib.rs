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

pub mod maps;
#[cfg(feature = "std")]
pub mod wire;
