//! Kernel-side programs of doppel. The programs live in `main.rs` (the `bpfel-unknown-none`
//! binary); this library target exists so host tooling (clippy, docs) can open the crate.
#![no_std]
