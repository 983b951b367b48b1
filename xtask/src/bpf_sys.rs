//! The `bpf(2)` commands the data path bench issues itself: run-time statistics for a bounded
//! window, opening a running agent's programs and maps by id, a map lookup, and
//! `BPF_PROG_TEST_RUN`. aya loads and attaches programs; it has no test-run call and cannot adopt
//! another process's programs, and these four commands are all the bench needs.
//!
//! The attribute layouts are the kernel's `union bpf_attr` members (include/uapi/linux/bpf.h);
//! the kernel zero-extends a shorter attribute, so each command passes only its own member.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
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
