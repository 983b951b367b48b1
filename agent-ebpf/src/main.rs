//! doppel's TC programs, attached by the agent to a workload's interface.
//!
//! For now: per-interface, per-direction packet and byte counters. They are the first thing the
//! data path grows from, and the proof that the toolchain, loader and attach path all work.
//! Every path returns `TC_ACT_PIPE`: counting must never change what happens to a packet.
//!
//! Built for the host (as `cargo build --workspace` or clippy do) it is an empty binary: the
//! programs only mean something for `bpfel-unknown-none`.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]
#![expect(
    unreachable_pub,
    reason = "program entry points are exported symbols the loader finds by name"
)]

use aya_ebpf::{
    bindings::TC_ACT_PIPE,
    macros::{classifier, map},
    maps::PerCpuHashMap,
    programs::TcContext,
};
use doppel_common::maps::{Direction, IFACE_COUNTERS_MAX_ENTRIES, IfaceCounters, IfaceKey};

/// Packets and bytes per (interface, direction), per CPU so the hot path never contends.
#[map(name = "IFACE_COUNTERS")]
static IFACE_COUNTERS: PerCpuHashMap<IfaceKey, IfaceCounters> =
    PerCpuHashMap::with_max_entries(IFACE_COUNTERS_MAX_ENTRIES, 0);

#[classifier]
pub fn doppel_tc_ingress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Ingress);
    TC_ACT_PIPE
}

#[classifier]
pub fn doppel_tc_egress(ctx: TcContext) -> i32 {
    count(&ctx, Direction::Egress);
    TC_ACT_PIPE
}

#[inline(always)]
fn count(ctx: &TcContext, direction: Direction) {
    // SAFETY: `skb` points at the kernel's `__sk_buff` for the whole program run.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    let key = IfaceKey {
        ifindex,
        direction: direction as u32,
    };
    match IFACE_COUNTERS.get_ptr_mut(&key) {
        Some(counters) => {
            // SAFETY: the pointer is this CPU's slot of a live map entry; per-CPU values are
            // only written by this CPU, and TC programs do not preempt each other on one CPU.
            unsafe {
                (*counters).packets += 1;
                (*counters).bytes += u64::from(len);
            }
        }
        None => {
            let first = IfaceCounters {
                packets: 1,
                bytes: u64::from(len),
            };
            // A full map loses this count; it must not affect the packet, so the error is
            // ignored on purpose.
            let _ = IFACE_COUNTERS.insert(&key, &first, 0);
        }
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
