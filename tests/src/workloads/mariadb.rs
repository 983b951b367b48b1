//! A real MariaDB server inside a testbed host, `sysbench` as its client, and the server's own
//! count of the commands it executed (`SHOW GLOBAL STATUS`: `Com_select`, `Com_update`, …).
//!
//! ```no_run
//! # use doppel_tests::{testbed::Host, workloads::mariadb::{Mariadb, Sysbench}};
//! # let (client, live) = (Host::new("client").unwrap(), Host::new("live").unwrap());
//! let mut server = Mariadb::start(&live, "10.0.0.2".parse().unwrap(), 3306);
//! server.sysbench_prepare(1000);
//! let report = server.sysbench(&client, &Sysbench::default());
//! assert_eq!(server.executed().get("commit"), report.transactions);
//! ```
//!
//! The server runs from the Debian package's binaries but not as Debian's service: a fresh data
//! directory (`mariadb-install-db`), its Unix socket and error log in one directory under
//! `$TMPDIR` that [`Drop`] removes, `mariadbd` started as root with `--user=mysql` (it drops to
//! that user itself). The binary log is off and commits are not flushed: a test server is thrown
//! away, and two servers on a 2-core CI machine then run at the rate the test sets.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use super::ExecutedStatements;
use crate::testbed::{Host, Process};

/// The schema sysbench's tables live in.
pub const DATABASE: &str = "sbtest";
/// The user clients log in as over TCP (`mysql_native_password`), with all privileges.
pub const USER: &str = "sb";
/// Its password.
pub const PASSWORD: &str = "secret";

/// The `Com_*` status counters [`Mariadb::executed`] reports, without the prefix.
pub const COMMANDS: [&str; 9] = [
    "select",
    "insert",
    "update",
    "delete",
    "begin",
    "commit",
    "stmt_prepare",
    "stmt_execute",
    "stmt_close",
];

/// A MariaDB server running inside a testbed host, shut down and its directory removed on
/// drop.
#[derive(Debug)]
pub struct Mariadb {
    process: Option<Process>,
    dir: PathBuf,
    /// The counters at the last [`Mariadb::reset_executed`].
    baseline: ExecutedStatements,
    /// Where it listens for TCP clients.
    pub addr: SocketAddr,
}

impl Mariadb {
    /// Initialises a fresh data directory and starts the server inside `host` on `addr:port`
    /// (and a Unix socket in its own directory), with the [`USER`] and the [`DATABASE`]
    /// created. Returns once it answers. Panics with the server's log when it does not start.
    pub fn start(host: &Host, addr: IpAddr, port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "doppel-mariadb-{}-{}-{port}",
            std::process::id(),
            host.netns()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mariadb directory");
        let user = nix::unistd::User::from_name("mysql")
            .ok()
            .flatten()
            .expect("no `mysql` user: install mariadb-server (`cargo xtask setup` does)");
        // Its own temporary directory: servers bootstrapping in parallel under one `/tmp`
        // collide on their temporary tables' names ("Unknown table 'mysql.tmp_user_sys'").
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).expect("mariadb tmpdir");
        for d in [&dir, &tmp] {
            std::os::unix::fs::chown(d, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
                .expect("chown mariadb directory");
        }
        let install = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--user=mysql", "--auth-root-authentication-method=normal"])
            .args(["--skip-test-db", "--skip-name-resolve"])
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb-install-db (is mariadb-server installed?)");
        assert!(
            install.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&install.stdout),
            String::from_utf8_lossy(&install.stderr)
        );
        let mut command = host.command("mariadbd");
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--bind-address={addr}"))
            .args(["--user=mysql", "--skip-log-bin", "--skip-name-resolve"])
            .args([
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=32M",
            ])
            .args(["--max-connections=200", "--performance-schema=off"])
            // Every failed statement in a log of the server's own, so a test can tell what
            // failed and why rather than only how many.
            .args([
                "--plugin-load-add=sql_errlog",
                "--sql-error-log-with-db-and-thread-info",
            ])
            .arg(format!(
                "--sql-error-log-filename={}",
                dir.join("sql_errors.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let process = host.spawn(command).expect("spawn mariadbd");
        let mut server = Self {
            process: Some(process),
            dir,
            baseline: ExecutedStatements::default(),
            addr: SocketAddr::new(addr, port),
        };
        server.wait_started();
        server.sql(&format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED BY '{PASSWORD}'; \
             GRANT ALL ON *.* TO '{USER}'@'%'; CREATE DATABASE {DATABASE}"
        ));
        server.reset_executed();
        server
    }

    fn wait_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.try_sql("SELECT 1").status.success() {
            assert!(
                Instant::now() < deadline,
                "mariadbd did not start on {}; its log:\n{}",
                self.addr,
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn try_sql(&self, sql: &str) -> Output {
        Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .args(["-uroot", "--batch", "--skip-column-names", "-e", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb")
    }

    /// Runs `sql` as root over the Unix socket (never mirrored, being no TCP) and returns
    /// its tab-separated rows. Panics on any SQL error.
    pub fn sql(&self, sql: &str) -> String {
        let out = self.try_sql(sql);
        assert!(
            out.status.success(),
            "mariadb `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sysbench oltp_common prepare` over the Unix socket: one table of `rows` rows, then
    /// [`Mariadb::reset_executed`]. Two servers prepared alike hold the same rows.
    pub fn sysbench_prepare(&mut self, rows: u32) {
        let out = Command::new("sysbench")
            .arg("oltp_read_write")
            .args(["--db-driver=mysql", "--mysql-user=root"])
            .arg(format!(
                "--mysql-socket={}",
                self.dir.join("sock").display()
            ))
            .arg(format!("--mysql-db={DATABASE}"))
            .args(["--tables=1", &format!("--table-size={rows}"), "prepare"])
            .stdin(Stdio::null())
            .output()
            .expect("run sysbench prepare");
        assert!(
            out.status.success(),
            "sysbench prepare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.reset_executed();
    }

    fn counters(&self) -> ExecutedStatements {
        let names: Vec<String> = COMMANDS.iter().map(|c| format!("'Com_{c}'")).collect();
        let rows = self.sql(&format!(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ({})",
            names.join(",")
        ));
        ExecutedStatements(
            rows.lines()
                .filter_map(|row| {
                    let (name, value) = row.split_once('\t')?;
                    Some((
                        name.strip_prefix("Com_")?.to_lowercase(),
                        value.trim().parse().ok()?,
                    ))
                })
                .collect(),
        )
    }

    /// Counts from zero again (`FLUSH STATUS` does not reset the global `Com_*`, so the
    /// harness keeps a baseline).
    pub fn reset_executed(&mut self) {
        self.baseline = self.counters();
    }

    /// The [`COMMANDS`] the server executed since the last reset, by every client but the
    /// harness (whose `SHOW GLOBAL STATUS` counts only as `Com_show_status`).
    pub fn executed(&self) -> ExecutedStatements {
        let now = self.counters();
        ExecutedStatements(
            now.0
                .iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(self.baseline.get(k))))
                .collect(),
        )
    }

    /// The statements of [`USER`]'s clients the server failed, one line each from its own
    /// SQL error log (`sql_errlog`): `… 12 sb[sb] @ … ERROR 1213: Deadlock found … : UPDATE …`.
    pub fn failed_statements(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.join("sql_errors.log")).unwrap_or_default();
        distinct_failures(&log, USER)
    }

    /// Runs `run` from inside `from` against this server with [`USER`]'s password.
    pub fn sysbench(&self, from: &Host, run: &Sysbench) -> SysbenchReport {
        run.run(from, self.addr, Some(PASSWORD))
    }

    /// Its Unix socket (the harness's own way in; never mirrored, being no TCP).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("sock")
    }

    /// The server's error log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// `user`'s failed statements in an `sql_errlog` log written with thread ids. The plugin
/// logs a deadlock twice, back to back for the victim's thread (seen with MariaDB 10.11:
/// two lines for one `ERROR 1213` its client received), so a deadlock line that repeats its
/// thread's previous line is taken for that double and dropped (once: a third identical line
/// is the statement failing again).
fn distinct_failures(log: &str, user: &str) -> Vec<String> {
    let mut last_by_thread: std::collections::HashMap<String, String> = Default::default();
    let mut failures = Vec::new();
    for line in log.lines() {
        // `DATE TIME THREAD user[user] @ host [ip] `db` ERROR n: text : statement`
        let mut tokens = line.split_whitespace();
        let (Some(_date), Some(_time), Some(thread)) =
            (tokens.next(), tokens.next(), tokens.next())
        else {
            continue;
        };
        let entry = tokens.collect::<Vec<_>>().join(" ");
        if !entry.starts_with(&format!("{user}[{user}] @ ")) {
            continue;
        }
        let deadlock = entry.contains(" ERROR 1213: ");
        if deadlock && last_by_thread.get(thread) == Some(&entry) {
            // The double: forget it, so the same statement failing again counts again.
            last_by_thread.remove(thread);
            continue;
        }
        last_by_thread.insert(thread.to_owned(), entry);
        failures.push(line.to_owned());
    }
    failures
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SIGTERM is mariadbd's normal shutdown.
            process.signal(Signal::SIGTERM);
            if process.wait_timeout(Duration::from_secs(10)).is_none() {
                process.stop(Duration::from_secs(1));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One `sysbench` OLTP run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sysbench {
    /// `oltp_read_only`, `oltp_read_write`, `oltp_point_select`, …
    pub test: &'static str,
    /// Concurrent connections.
    pub threads: u32,
    /// Seconds.
    pub seconds: u32,
    /// Transactions per second over all threads (0: as fast as it can).
    pub rate: u32,
    /// Prepared statements (`--db-ps-mode=auto`) or text queries (`disable`).
    pub prepared: bool,
    /// Rows in the table (as prepared).
    pub table_size: u32,
    /// `--events`: stop after this many transactions (over all threads) rather than after
    /// `seconds` (then 0: no time limit).
    pub events: Option<u64>,
    /// `--rand-seed`: the same keys and arrival schedule in every run.
    pub seed: Option<u32>,
}

impl Default for Sysbench {
    /// `oltp_read_write`, 4 connections, 3 s at 100 transactions/s, prepared statements, a
    /// table of 10 000 rows (at 1 000, concurrent transactions deadlocked now and then).
    fn default() -> Self {
        Self {
            test: "oltp_read_write",
            threads: 4,
            seconds: 3,
            rate: 100,
            prepared: true,
            table_size: 10_000,
            events: None,
            seed: None,
        }
    }
}

/// What a sysbench run reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysbenchReport {
    /// Transactions completed.
    pub transactions: u64,
    /// Queries sent.
    pub queries: u64,
    /// Errors it ignored: by default a deadlock or lock wait (1213, 1205, 1020), after which
    /// it rolled back and retried the transaction. Any other error ends the run unsuccessful.
    pub errors: u64,
    /// Whether it exited 0.
    pub success: bool,
    /// Everything it printed, for failure messages.
    pub output: String,
}

impl Sysbench {
    /// The command line after `sysbench` against `server` as [`USER`] with `password`.
    pub fn args(&self, server: SocketAddr, password: Option<&str>) -> Vec<String> {
        let mut args = vec![
            self.test.to_owned(),
            "--db-driver=mysql".to_owned(),
            "--mysql-ssl=off".to_owned(),
            format!("--mysql-host={}", server.ip()),
            format!("--mysql-port={}", server.port()),
            format!("--mysql-user={USER}"),
            format!("--mysql-password={}", password.unwrap_or_default()),
            format!("--mysql-db={DATABASE}"),
            "--tables=1".to_owned(),
            format!("--table-size={}", self.table_size),
            format!("--threads={}", self.threads),
            format!("--rate={}", self.rate),
            format!(
                "--db-ps-mode={}",
                if self.prepared { "auto" } else { "disable" }
            ),
        ];
        match self.events {
            Some(events) => args.extend([format!("--events={events}"), "--time=0".to_owned()]),
            None => args.push(format!("--time={}", self.seconds)),
        }
        if let Some(seed) = self.seed {
            args.push(format!("--rand-seed={seed}"));
        }
        args.push("run".to_owned());
        args
    }

    /// Runs sysbench inside `from` against `server` as [`USER`] (with `password`), waits for
    /// it and parses its summary.
    pub fn run(&self, from: &Host, server: SocketAddr, password: Option<&str>) -> SysbenchReport {
        let mut command = from.command("sysbench");
        command
            .args(self.args(server, password))
            .stdin(Stdio::null());
        let out = command.output().expect("run sysbench");
        SysbenchReport::parse(&out)
            .unwrap_or_else(|output| panic!("sysbench printed no summary:\n{output}"))
    }
}

impl SysbenchReport {
    /// What a finished sysbench printed; `Err` with its output when it printed no summary.
    pub fn parse(out: &Output) -> Result<Self, String> {
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // "    transactions:                        300    (99.87 per sec.)"
        let figure = |label: &str| {
            output.lines().find_map(|l| {
                l.trim_start()
                    .strip_prefix(label)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
        };
        let Some(transactions) = figure("transactions:") else {
            return Err(output);
        };
        Ok(Self {
            transactions,
            queries: figure("queries:").unwrap_or(0),
            errors: figure("ignored errors:").unwrap_or(0),
            success: out.status.success(),
            output,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::distinct_failures;

    #[test]
    fn a_deadlock_logged_twice_for_its_thread_counts_once_and_other_failures_all_count() {
        let log = "\
2026-12-04  9:39:46 3 sb[sb] @  [10.0.0.1] `sbtest` ERROR 1213: Deadlock found : DELETE FROM t WHERE id=1
2026-12-04  9:39:46 4 sb[sb] @  [10.0.0.1] `sbtest` ERROR 1062: Duplicate entry '2' : INSERT INTO t VALUES (2)
2026-12-04  9:39:46 3 sb[sb] @  [10.0.0.1] `sbtest` ERROR 1213: Deadlock found : DELETE FROM t WHERE id=1
2026-12-04  9:39:47 3 sb[sb] @  [10.0.0.1] `sbtest` ERROR 1213: Deadlock found : DELETE FROM t WHERE id=1
2026-12-04  9:39:47 4 sb[sb] @  [10.0.0.1] `sbtest` ERROR 1062: Duplicate entry '2' : INSERT INTO t VALUES (2)
2026-12-04  9:39:47 5 root[root] @ localhost [] `sbtest` ERROR 1146: Table 'x' doesn't exist : SELECT 1 FROM x
2026-12-04  9:39:47 3 sb[sb] @  [10.0.0.1] `sbtest` ERROR 1213: Deadlock found : DELETE FROM t WHERE id=1
";
        let failures = distinct_failures(log, "sb");
        // Thread 3 met two deadlocks on one statement, each logged twice; thread 4's two
        // duplicate-key failures are two statements; root is the harness, not a client.
        let by_thread = |t: &str| {
            failures
                .iter()
                .filter(|l| l.contains(&format!(" {t} sb[sb]")))
                .count()
        };
        assert_eq!((by_thread("3"), by_thread("4")), (2, 2), "{failures:#?}");
        assert_eq!(failures.len(), 4, "{failures:#?}");
    }
}
