//! One owner per kernel object an agent changes: the live role's VXLAN device and the
//! interfaces either role attaches programs to.
//!
//! Two agents sharing one would clobber each other: a second live agent on a host would share
//! `doppel-vx0`, and stopping it would delete the device under the first, whose clones then
//! all fail. So an agent claims each object before touching it, with an advisory lock
//! (`flock`) on a file under [`RUN_DIR`] named after the object and its network namespace. The
//! lock lives as long as the agent's process, so a crashed agent's claim goes with it and the
//! next agent reclaims what it left behind (the device is replaced, programs re-attached),
//! while a running holder makes the next agent refuse to start, naming the holder's PID and
//! configuration file, which the lock file records.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use nix::fcntl::{Flock, FlockArg};

/// Where the claims live (systemd's `RuntimeDirectory=doppel-agent`), unless the environment
/// variable [`RUN_DIR_ENV`] names another directory.
pub const RUN_DIR: &str = "/run/doppel-agent";
/// Environment variable overriding [`RUN_DIR`].
pub const RUN_DIR_ENV: &str = "DOPPEL_RUN_DIR";

/// Why an object could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another running agent holds it.
    #[error(
        "{what} is held by another doppel-agent ({holder}); stop that agent, or give this one \
         its own (a different interface, or `[vxlan] device`)"
    )]
    Held {
        /// The object, e.g. `VXLAN device doppel-vx0`.
        what: String,
        /// The holder's PID and configuration, as it recorded them.
        holder: String,
    },
    /// The lock file could not be used.
    #[error("claiming {what} with {path}")]
    Io {
        /// The object.
        what: String,
        /// The lock file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A held claim; dropping it (or the process ending) releases it.
#[derive(Debug)]
pub struct Claim {
    _lock: Flock<File>,
}

/// The kinds of objects claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Object<'a> {
    /// The live role's VXLAN device.
    VxlanDevice(&'a str),
    /// An interface a role attaches its TC or XDP programs to.
    Interface(&'a str),
}

impl Object<'_> {
    fn describe(self) -> String {
        match self {
            Self::VxlanDevice(name) => format!("VXLAN device {name}"),
            Self::Interface(name) => format!("interface {name}"),
        }
    }

    fn file_name(self, netns: u64) -> String {
        match self {
            Self::VxlanDevice(name) => format!("vxlan-{netns}-{name}.lock"),
            Self::Interface(name) => format!("iface-{netns}-{name}.lock"),
        }
    }
}

/// Claims `object` in this process's network namespace for an agent started with `config`.
pub fn claim(object: Object<'_>, config: &Path) -> Result<Claim, ClaimError> {
    let dir = std::env::var_os(RUN_DIR_ENV).map_or_else(|| PathBuf::from(RUN_DIR), PathBuf::from);
    claim_in(&dir, object, config)
}

/// [`claim`] with the lock files in `dir`.
pub fn claim_in(dir: &Path, object: Object<'_>, config: &Path) -> Result<Claim, ClaimError> {
    let what = object.describe();
    let netns = std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino());
    let path = dir.join(object.file_name(netns));
    let io = |source| ClaimError::Io {
        what: what.clone(),
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            return Err(ClaimError::Held {
                what,
                holder: if holder.is_empty() {
                    "holder unknown".to_owned()
                } else {
                    holder.to_owned()
                },
            });
        }
        Err((_, errno)) => return Err(io(errno.into())),
    };
    // Record who holds it, for the next agent's refusal.
    let record = format!("pid {}, config {}", std::process::id(), config.display());
    lock.set_len(0)
        .and_then(|()| lock.rewind())
        .and_then(|()| lock.write_all(record.as_bytes()))
        .map_err(io)?;
    Ok(Claim { _lock: lock })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_is_refused_naming_the_holder_and_a_released_one_is_reclaimed() {
        let dir = tempfile::tempdir().unwrap();
        let first = claim_in(
            dir.path(),
            Object::VxlanDevice("doppel-vx0"),
            Path::new("/etc/doppel/a.toml"),
        )
        .unwrap();
        let refused = claim_in(
            dir.path(),
            Object::VxlanDevice("doppel-vx0"),
            Path::new("/etc/doppel/b.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            refused.contains("VXLAN device doppel-vx0 is held")
                && refused.contains(&format!("pid {}", std::process::id()))
                && refused.contains("/etc/doppel/a.toml"),
            "{refused}"
        );
        // Another object is independent.
        let _iface = claim_in(dir.path(), Object::Interface("eth0"), Path::new("b")).unwrap();
        drop(first);
        claim_in(
            dir.path(),
            Object::VxlanDevice("doppel-vx0"),
            Path::new("/etc/doppel/b.toml"),
        )
        .expect("released with its holder");
    }
}
