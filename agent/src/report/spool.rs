//! The on-disk spool of reports the coordinator has not yet acknowledged.
//!
//! One file per report (`<seq>.report`, postcard-encoded, written to a temporary name, fsynced
//! and renamed, so a crash leaves either the whole report or none), plus `next_seq`, written the
//! same way *before* a report takes its number: sequence numbers are never reused, even after
//! every report was acknowledged and deleted, because the coordinator counts `(agent, seq)` once.
//!
//! A spool that has lost its numbering — a new install under an existing agent name, a wiped or
//! corrupted spool directory — must not start again at 0: the coordinator would take its first
//! reports for ones it already stored and acknowledge them as duplicates, silently dropping them.
//! So a fresh spool starts at the current Unix time in microseconds ([`fresh_start`]). Numbers
//! advance by one per report (one a second or less), the clock by a million a second, so a new
//! spool starts above every number its predecessor used unless the clock went back by about as
//! long as that predecessor lived. Starting above is enough: the coordinator only needs each
//! `(agent, seq)` unique, not the numbers dense. (An instance id in `Hello` would do without the
//! clock, but `Hello` is frozen by the wire protocol's versioning rules.)
//!
//! Bounded by count and bytes. When full, [`Spool::push`] refuses the new report and hands it
//! back ([`SpoolError::Full`]) — never dropping one already spooled — and counts the refusal.
//! The caller applies back-pressure: [`ReportHandle::submit`](super::ReportHandle::submit) waits
//! for room, so the live agent leaves its in-kernel histograms undrained meanwhile and the next
//! report covers a longer interval. Nothing is lost; reporting only gets coarser.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
};

use doppel_common::wire::IntervalReport;

const NEXT_SEQ: &str = "next_seq";
const SUFFIX: &str = "report";

/// Bounds and place of a spool.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// Directory holding the spool (created if missing).
    pub dir: PathBuf,
    /// Most reports kept.
    pub max_reports: usize,
    /// Most bytes kept.
    pub max_bytes: u64,
}

impl SpoolConfig {
    /// A spool in `dir` holding a day of one-second reports or 256 MiB, whichever is less.
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            max_reports: 86_400,
            max_bytes: 256 << 20,
        }
    }
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A spool file could not be read or written.
    #[error("{path}: {action} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The spool is at its bound; the report is handed back.
    #[error("spool full ({reports} reports, {bytes} bytes); report not spooled")]
    Full {
        /// Reports held.
        reports: usize,
        /// Bytes held.
        bytes: u64,
        /// The refused report, returned to the caller.
        report: Box<IntervalReport>,
    },
    /// A spooled report could not be encoded or decoded.
    #[error("{path}: invalid spooled report")]
    Codec {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: postcard::Error,
    },
}

/// The spool.
#[derive(Debug)]
pub struct Spool {
    config: SpoolConfig,
    /// seq -> file size.
    entries: BTreeMap<u64, u64>,
    bytes: u64,
    next_seq: u64,
    refused: u64,
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SpoolError + 'a {
    move |source| SpoolError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp).map_err(io("create", &tmp))?;
    file.write_all(bytes).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    fs::rename(&tmp, path).map_err(io("rename", path))
}

/// First sequence number of a spool without numbering: the Unix time in microseconds (see the
/// module docs for why that is above every number an earlier spool of the agent used).
pub fn fresh_start() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
}

impl Spool {
    /// Opens the spool, finding the reports a previous run left.
    pub fn open(config: SpoolConfig) -> Result<Self, SpoolError> {
        fs::create_dir_all(&config.dir).map_err(io("create directory", &config.dir))?;
        let mut entries = BTreeMap::new();
        let mut bytes = 0;
        for entry in fs::read_dir(&config.dir).map_err(io("list", &config.dir))? {
            let entry = entry.map_err(io("list", &config.dir))?;
            let path = entry.path();
            let seq = path
                .extension()
                .filter(|e| *e == SUFFIX)
                .and_then(|_| path.file_stem()?.to_str()?.parse::<u64>().ok());
            if let Some(seq) = seq {
                let len = entry.metadata().map_err(io("stat", &path))?.len();
                entries.insert(seq, len);
                bytes += len;
            }
        }
        let next_path = config.dir.join(NEXT_SEQ);
        let stored_next = match fs::read_to_string(&next_path) {
            Ok(s) => s.trim().parse::<u64>().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("read", &next_path)(e)),
        };
        // Missing or unreadable: the numbering is lost, start above anything used before.
        let stored_next = stored_next.unwrap_or_else(fresh_start);
        let after_last = entries.keys().next_back().map_or(0, |s| s + 1);
        Ok(Self {
            config,
            entries,
            bytes,
            next_seq: stored_next.max(after_last),
            refused: 0,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.config.dir.join(format!("{seq:020}.{SUFFIX}"))
    }

    /// The sequence number the next report will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Reports held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no report is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Reports refused because the spool was full, since it was opened.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Whether a report of `len` bytes would fit.
    fn has_room(&self, len: u64) -> bool {
        self.entries.len() < self.config.max_reports
            && (self.entries.is_empty() || self.bytes + len <= self.config.max_bytes)
    }

    /// Gives `report` the next sequence number and stores it durably. Returns the number.
    pub fn push(&mut self, mut report: IntervalReport) -> Result<u64, SpoolError> {
        let seq = self.next_seq;
        report.seq = seq;
        let encoded = postcard::to_stdvec(&report).map_err(|source| SpoolError::Codec {
            path: self.path(seq),
            source,
        })?;
        let len = encoded.len() as u64;
        if !self.has_room(len) {
            self.refused += 1;
            return Err(SpoolError::Full {
                reports: self.entries.len(),
                bytes: self.bytes,
                report: Box::new(report),
            });
        }
        write_atomically(
            &self.config.dir.join(NEXT_SEQ),
            (seq + 1).to_string().as_bytes(),
        )?;
        self.next_seq = seq + 1;
        write_atomically(&self.path(seq), &encoded)?;
        self.entries.insert(seq, len);
        self.bytes += len;
        Ok(seq)
    }

    /// Whether `seq` is held.
    pub fn contains(&self, seq: u64) -> bool {
        self.entries.contains_key(&seq)
    }

    /// Held sequence numbers after `after` (all when `None`), ascending.
    pub fn pending_after(&self, after: Option<u64>) -> impl Iterator<Item = u64> + '_ {
        let start = after.map_or(0, |a| a.saturating_add(1));
        self.entries.range(start..).map(|(seq, _)| *seq)
    }

    /// Reads a held report.
    pub fn read(&self, seq: u64) -> Result<IntervalReport, SpoolError> {
        let path = self.path(seq);
        let bytes = fs::read(&path).map_err(io("read", &path))?;
        postcard::from_bytes(&bytes).map_err(|source| SpoolError::Codec { path, source })
    }

    /// Deletes a report the coordinator acknowledged. Returns whether it was held.
    pub fn ack(&mut self, seq: u64) -> Result<bool, SpoolError> {
        let Some(len) = self.entries.remove(&seq) else {
            return Ok(false);
        };
        self.bytes -= len;
        let path = self.path(seq);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) => Err(io("delete", &path)(e)),
        }
    }

    /// Moves an unreadable report aside (`<seq>.corrupt`) so it stops blocking the spool; the
    /// caller logs it. Returns the new path.
    pub fn quarantine(&mut self, seq: u64) -> Result<PathBuf, SpoolError> {
        let path = self.path(seq);
        let aside = path.with_extension("corrupt");
        fs::rename(&path, &aside).map_err(io("rename", &path))?;
        if let Some(len) = self.entries.remove(&seq) {
            self.bytes -= len;
        }
        Ok(aside)
    }
}

#[cfg(test)]
mod tests {
    use doppel_common::wire::ResourceUsage;

    use super::*;

    fn report() -> IntervalReport {
        IntervalReport {
            seq: 999,
            interval_start_unix_ms: 1,
            interval_ms: 1000,
            histograms: vec![],
            counters: vec![],
            host: ResourceUsage::default(),
            workload: None,
            patterns: vec![],
        }
    }

    #[test]
    fn sequence_numbers_survive_reopening_even_when_everything_was_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SpoolConfig::new(dir.path().to_owned());
        let mut spool = Spool::open(config.clone()).expect("open");
        let first = spool.push(report()).expect("push");
        assert_eq!(spool.push(report()).expect("push"), first + 1);
        assert_eq!(spool.read(first + 1).expect("read").seq, first + 1);
        drop(spool);
        let mut spool = Spool::open(config.clone()).expect("reopen");
        assert_eq!(
            spool.pending_after(None).collect::<Vec<_>>(),
            [first, first + 1]
        );
        assert!(spool.ack(first).expect("ack") && spool.ack(first + 1).expect("ack"));
        assert!(!spool.ack(first + 1).expect("second ack is a no-op"));
        drop(spool);
        let mut spool = Spool::open(config).expect("reopen");
        assert!(spool.is_empty());
        assert_eq!(spool.push(report()).expect("push"), first + 2);
    }

    #[test]
    fn a_wiped_spool_numbers_above_everything_its_predecessor_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = SpoolConfig::new(dir.path().join("spool"));
        let mut spool = Spool::open(config.clone()).expect("open");
        let mut used = Vec::new();
        for _ in 0..100 {
            used.push(spool.push(report()).expect("push"));
        }
        drop(spool);
        // A wipe (the operator, a reinstall) loses `next_seq` with the reports.
        fs::remove_dir_all(&config.dir).expect("wipe");
        let mut spool = Spool::open(config.clone()).expect("open the wiped spool");
        let next = spool.push(report()).expect("push");
        assert!(
            used.iter().all(|&old| next > old),
            "{next} reuses a number of the wiped spool (up to {:?})",
            used.last()
        );
        drop(spool);
        // An unreadable `next_seq` is lost numbering too, not a restart at 0.
        fs::write(config.dir.join(NEXT_SEQ), "garbage").expect("corrupt next_seq");
        for entry in fs::read_dir(&config.dir).expect("list") {
            let path = entry.expect("entry").path();
            if path.extension().is_some_and(|e| e == SUFFIX) {
                fs::remove_file(path).expect("remove");
            }
        }
        let mut spool = Spool::open(config).expect("open");
        assert!(spool.push(report()).expect("push") > next);
    }

    #[test]
    fn a_full_spool_hands_the_report_back_and_keeps_the_old_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = SpoolConfig::new(dir.path().to_owned());
        config.max_reports = 2;
        let mut spool = Spool::open(config).expect("open");
        let first = spool.push(report()).expect("push");
        spool.push(report()).expect("push");
        match spool.push(report()) {
            Err(SpoolError::Full {
                reports: 2, report, ..
            }) => assert_eq!(report.seq, first + 2),
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(spool.refused(), 1);
        assert_eq!(
            spool.pending_after(None).collect::<Vec<_>>(),
            [first, first + 1]
        );
        spool.ack(first).expect("ack");
        assert_eq!(spool.push(report()).expect("room again"), first + 2);
    }
}
