//! The `bpf(2)` commands the data path bench issues itself: run-time statistics for a bounded
//! window, opening a running agent's programs and maps by id, a map lookup,
//! `BPF_PROG_TEST_RUN`, and a six-instruction drop program for its shadow sinks. aya loads and
//! attaches the agent's programs; it has no test-run call and cannot adopt another process's
//! programs, and a program this small needs no object file.
//!
//! The attribute layouts are the kernel's `union bpf_attr` members (include/uapi/linux/bpf.h);
//! the kernel zero-extends a shorter attribute, so each command passes only its own member.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_MAP_GET_FD_BY_ID: libc::c_long = 14;
const BPF_ENABLE_STATS: libc::c_long = 32;
/// `enum bpf_stats_type`: `run_time_ns` and `run_cnt` per program.
const BPF_STATS_RUN_TIME: u32 = 0;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, writable `bpf_attr` member of the size passed; every pointer
    // inside it was set by the caller to a buffer that outlives the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<libc::c_void>(),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: the kernel just returned this descriptor to us and nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Turns `run_time_ns`/`run_cnt` accounting on for every program until the returned descriptor
/// is closed (the kernel counts holders, so this never turns off what someone else turned on).
pub(crate) fn enable_stats() -> io::Result<OwnedFd> {
    let mut attr = BPF_STATS_RUN_TIME;
    bpf(BPF_ENABLE_STATS, &mut attr).map(owned)
}

/// `bpf_attr`'s `*_GET_FD_BY_ID` member.
#[repr(C)]
struct GetById {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

/// A descriptor of the loaded program with this id.
pub(crate) fn prog_by_id(id: u32) -> io::Result<OwnedFd> {
    fd_by_id(BPF_PROG_GET_FD_BY_ID, id)
}

/// A descriptor of the map with this id.
pub(crate) fn map_by_id(id: u32) -> io::Result<OwnedFd> {
    fd_by_id(BPF_MAP_GET_FD_BY_ID, id)
}

/// A descriptor by id through `cmd` (`BPF_PROG_GET_FD_BY_ID` or `BPF_MAP_GET_FD_BY_ID`).
fn fd_by_id(cmd: libc::c_long, id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    bpf(cmd, &mut attr).map(owned)
}

/// `bpf_attr`'s map element member.
#[repr(C)]
struct MapElem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Looks `key` up in `map` into `value` (the map's value size); false when absent.
pub(crate) fn map_lookup(map: &OwnedFd, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `bpf_attr`'s `test` member.
#[repr(C)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    /// Explicit, zeroed: the kernel refuses an attribute whose bytes past the command's last
    /// field are not zero, and implicit padding is not initialised.
    _pad: u32,
}

/// Runs `prog` on `packet` (an Ethernet frame) `repeat` times in the kernel; returns the mean
/// ns per run the kernel measured around the runs (its own clock reads excluded from nothing:
/// one pair per call, spread over `repeat`) and the program's verdict. The calling thread's
/// network namespace is the packet's.
pub(crate) fn test_run(prog: &OwnedFd, packet: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut attr = TestRun {
        prog_fd: prog.as_raw_fd() as u32,
        retval: 0,
        data_size_in: packet.len() as u32,
        data_size_out: out.len() as u32,
        data_in: packet.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        duration: 0,
        ctx_size_in: 0,
        ctx_size_out: 0,
        ctx_in: 0,
        ctx_out: 0,
        flags: 0,
        cpu: 0,
        batch_size: 0,
        _pad: 0,
    };
    bpf(BPF_PROG_TEST_RUN, &mut attr)?;
    Ok((attr.duration, attr.retval))
}

/// `bpf_attr`'s `BPF_PROG_LOAD` member, up to the fields used.
#[repr(C)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `bpf_attr`'s `BPF_LINK_CREATE` member for TCX (no relative program, any revision).
#[repr(C)]
struct TcxLinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
    relative_fd: u32,
    _pad: u32,
    expected_revision: u64,
}

/// Attaches to the TCX ingress of `ifindex` (in the calling thread's network namespace) a
/// program that drops every IPv4 packet and passes the rest (ARP and IPv6 neighbour discovery
/// keep working); returns the link, which detaches when dropped.
pub(crate) fn drop_ipv4_at_ingress(ifindex: u32) -> io::Result<OwnedFd> {
    // r2 = skb->protocol (network order); if r2 != ETH_P_IP goto pass; return TC_ACT_SHOT;
    // pass: return TC_ACT_OK. Each instruction: opcode, dst | src << 4, offset, immediate.
    let insn = |code: u8, regs: u8, off: i16, imm: i32| -> u64 {
        u64::from(code)
            | u64::from(regs) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    };
    let program = [
        insn(0x61, 0x12, 16, 0),                                // ldxw r2, [r1 + 16]
        insn(0x55, 0x02, 2, i32::from(0x0800u16.swap_bytes())), // jne r2, htons(ETH_P_IP), +2
        insn(0xb7, 0x00, 0, 2),                                 // mov r0, TC_ACT_SHOT
        insn(0x95, 0x00, 0, 0),                                 // exit
        insn(0xb7, 0x00, 0, 0),                                 // mov r0, TC_ACT_OK
        insn(0x95, 0x00, 0, 0),                                 // exit
    ];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..9].copy_from_slice(b"sink_drop");
    let mut load = ProgLoad {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: name,
        prog_ifindex: 0,
        expected_attach_type: 0,
    };
    let prog = bpf(BPF_PROG_LOAD, &mut load).map(owned)?;
    let mut link = TcxLinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        flags: 0,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    bpf(BPF_LINK_CREATE, &mut link).map(owned)
}
