//! A real PostgreSQL server inside a testbed host, `pgbench` as its client, and the server's own
//! count of the statements it executed.
//!
//! ```no_run
//! # use doppel_tests::{testbed::Host, workloads::postgres::{Pgbench, Postgres, PostgresAuth}};
//! # let (client, live) = (Host::new("client").unwrap(), Host::new("live").unwrap());
//! let server = Postgres::start(&live, "10.0.0.2".parse().unwrap(), 5432, PostgresAuth::Trust);
//! server.pgbench_init(1);
//! let run = Pgbench { clients: 4, rate: Some(500), select_only: true, ..Pgbench::default() };
//! let report = server.pgbench(&client, &run);
//! // One SELECT per transaction, and pgbench's own two before the clients start.
//! assert_eq!(server.executed().get("select"), report.transactions + 2);
//! ```
//!
//! The server is started the way Debian's own cluster scripts would not: straight from the
//! version's `bin/` directory, as the unprivileged `postgres` system user (the server refuses to
//! run as root), with its data directory, Unix socket and log in one fresh directory under
//! `$TMPDIR` that [`Drop`] removes. Durability is off (`fsync`, `synchronous_commit`,
//! `full_page_writes`): a test server is thrown away, and a commit then costs no disk flush, so
//! two servers on a 2-core CI machine run at the rate the test sets rather than the disk's.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;

use crate::testbed::{Host, Process};

/// Environment variable naming the directory holding `postgres`, `initdb` and `pgbench`
/// (default: the newest `/usr/lib/postgresql/<version>/bin`, where Debian installs them).
pub const POSTGRES_BINDIR_ENV: &str = "DOPPEL_POSTGRES_BINDIR";

/// The database every client of a [`Postgres`] uses (the one `initdb` creates).
pub const DATABASE: &str = "postgres";

/// The superuser `initdb` creates; the harness uses it over the Unix socket only.
const SUPERUSER: &str = "postgres";

/// How clients connecting over TCP authenticate. The Unix socket always trusts (it is how the
/// harness itself initialises and counts; it is never mirrored, being no TCP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostgresAuth {
    /// `trust`: any user name is accepted without a password; clients log in as `postgres`.
    Trust,
    /// SCRAM-SHA-256 (RFC 7677, PostgreSQL's `scram-sha-256` method) for a superuser role
    /// `user` whose password is `password`; no other role may log in over TCP.
    Scram {
        /// Role name.
        user: String,
        /// Its password.
        password: String,
    },
}

/// What a client needs to log in to a [`Postgres`] over TCP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostgresLogin {
    /// Role name.
    pub user: String,
    /// Password, when the server asks for one (SCRAM).
    pub password: Option<String>,
    /// Database name.
    pub database: String,
}

/// Statements the server executed, per kind: the first keyword of the statement text,
/// lower-cased (`select`, `update`, `insert`, `begin`, `end`, `vacuum`, …).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecutedStatements(pub BTreeMap<String, u64>);

impl ExecutedStatements {
    /// Executions of statements of `kind` (`0` when none).
    pub fn get(&self, kind: &str) -> u64 {
        self.0.get(kind).copied().unwrap_or(0)
    }

    /// Executions of every kind.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

impl fmt::Display for ExecutedStatements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (", self.total())?;
        for (i, (kind, calls)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{kind} {calls}")?;
        }
        write!(f, ")")
    }
}

/// A PostgreSQL server running inside a testbed host, stopped (fast shutdown) and its
/// directory removed on drop.
#[derive(Debug)]
pub struct Postgres {
    process: Option<Process>,
    dir: PathBuf,
    bindir: PathBuf,
    auth: PostgresAuth,
    /// Where it listens for TCP clients.
    pub addr: SocketAddr,
}

impl Postgres {
    /// Initialises a fresh cluster and starts the server inside `host`, listening on
    /// `addr:port` (and on a Unix socket in its own directory), with `pg_stat_statements`
    /// loaded and its view created in [`DATABASE`]. Returns once it accepts TCP connections.
    ///
    /// Panics with the server's log when it does not start; needs root (to hand the directory
    /// to the `postgres` system user).
    pub fn start(host: &Host, addr: IpAddr, port: u16, auth: PostgresAuth) -> Self {
        let bindir = bindir();
        let (uid, gid) = server_user();
        let dir = std::env::temp_dir().join(format!(
            "doppel-postgres-{}-{}-{port}",
            std::process::id(),
            host.netns()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("postgres directory");
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown postgres directory");
        let data = dir.join("data");

        let as_server_user = |program: &Path| {
            let mut command = Command::new("setpriv");
            command
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            command
        };
        let initdb = as_server_user(&bindir.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", SUPERUSER, "-E", "UTF8", "--no-locale", "--no-sync"])
            .args(["--auth=trust"])
            .stdin(Stdio::null())
            .output()
            .expect("run initdb (is PostgreSQL installed? `cargo xtask setup` installs it)");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&initdb.stderr)
        );
        let tcp_method = match auth {
            PostgresAuth::Trust => "trust",
            PostgresAuth::Scram { .. } => "scram-sha-256",
        };
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nhost all all 0.0.0.0/0 {tcp_method}\n\
                 host all all ::/0 {tcp_method}\n"
            ),
        )
        .expect("write pg_hba.conf");

        let log = File::create(dir.join("server.log")).expect("server log");
        // `ip netns exec` then `setpriv` both exec, so the process we hold is the postmaster.
        let mut command = host.command("setpriv");
        command
            .arg(format!("--reuid={uid}"))
            .arg(format!("--regid={gid}"))
            .arg("--clear-groups")
            .arg("--")
            .arg(bindir.join("postgres"))
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&dir)
            .args(["-p", &port.to_string()])
            .args(["-c", &format!("listen_addresses={addr}")])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=100", "-c", "logging_collector=off"])
            .args(["-c", "password_encryption=scram-sha-256"])
            .args(["-c", "shared_preload_libraries=pg_stat_statements"])
            .args(["-c", "pg_stat_statements.track_utility=on"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let process = host.spawn(command).expect("spawn postgres");
        let server = Self {
            process: Some(process),
            dir,
            bindir,
            auth,
            addr: SocketAddr::new(addr, port),
        };
        server.wait_started(host);
        server.psql("CREATE EXTENSION pg_stat_statements");
        if let PostgresAuth::Scram { user, password } = &server.auth {
            server.psql(&format!(
                "CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}",
                quote_ident(user),
                quote_literal(password)
            ));
        }
        server.reset_statements();
        server
    }

    /// Waits until the server, asked over TCP from inside `host`, accepts connections: it
    /// listens before its startup has finished and meanwhile refuses logins with "the database
    /// system is starting up", which `pg_isready` tells apart from ready. Panics with the
    /// server's log when it is not ready within 10 s.
    fn wait_started(&self, host: &Host) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = host
                .command(self.bindir.join("pg_isready").to_str().expect("utf-8"))
                .args(["-q", "-h", &self.addr.ip().to_string()])
                .args(["-p", &self.addr.port().to_string()])
                .stdin(Stdio::null())
                .status()
                .expect("run pg_isready")
                .success();
            if ready {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start on {}; its log:\n{}",
                self.addr,
                self.log()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// How clients log in over TCP: `postgres` without a password under
    /// [`PostgresAuth::Trust`], the SCRAM user and password otherwise.
    pub fn login(&self) -> PostgresLogin {
        let (user, password) = match &self.auth {
            PostgresAuth::Trust => (SUPERUSER.to_owned(), None),
            PostgresAuth::Scram { user, password } => (user.clone(), Some(password.clone())),
        };
        PostgresLogin {
            user,
            password,
            database: DATABASE.to_owned(),
        }
    }

    /// `pgbench -i -s scale` over the Unix socket (so nothing of it is mirrored), as the login
    /// user so the tables are theirs; then [`Postgres::reset_statements`], so
    /// [`Postgres::executed`] counts from zero. Two servers initialised with the same `scale`
    /// hold the same rows (pgbench's initial data is not random).
    pub fn pgbench_init(&self, scale: u32) {
        let out = Command::new(self.bindir.join("pgbench"))
            .args(["-i", "-q", "-s", &scale.to_string()])
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.addr.port().to_string()])
            .args(["-U", &self.login().user, DATABASE])
            .stdin(Stdio::null())
            .output()
            .expect("run pgbench -i");
        assert!(
            out.status.success(),
            "pgbench -i -s {scale} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.reset_statements();
    }

    /// Forgets every statement executed so far (`pg_stat_statements_reset()`).
    pub fn reset_statements(&self) {
        self.psql("SELECT pg_stat_statements_reset()");
    }

    /// Statements executed since the last reset, per kind, by every client except the
    /// harness's own `pg_stat_statements` queries.
    ///
    /// Exact and current: `pg_stat_statements` adds a statement to its shared-memory hash
    /// table in the executor's end hook (utility statements such as `BEGIN`/`END`/`VACUUM` in
    /// the `ProcessUtility` hook), under a lock, in the backend that ran it, before the reply
    /// goes out; a reader sees it as soon as the client has its answer. The other candidate,
    /// `pg_stat_database.xact_commit`, is not: since PostgreSQL 15 each backend keeps its
    /// counts in local memory and flushes them at most once a second, and an idle backend
    /// only after `PGSTAT_IDLE_INTERVAL` (10 s); `pg_stat_force_next_flush()` flushes only the
    /// caller's own backend. Measured here: 100 `SELECT 1` on a connection left open showed in
    /// `pg_stat_statements` at once, and in `xact_commit` not after 2 s. A replayer holds its
    /// connections open, so `xact_commit` would lag exactly where a test looks.
    ///
    /// Failed statements are not counted (the end hook does not run for them); a statement
    /// inside a transaction that is rolled back later is.
    pub fn executed(&self) -> ExecutedStatements {
        let rows = self.psql(
            "SELECT lower(split_part(ltrim(query), ' ', 1)), sum(calls) FROM pg_stat_statements \
             WHERE query NOT LIKE '%pg_stat_statements%' GROUP BY 1",
        );
        ExecutedStatements(
            rows.lines()
                .filter_map(|row| {
                    let (kind, calls) = row.split_once('|')?;
                    Some((
                        kind.to_owned(),
                        calls.parse().expect("sum(calls) is a number"),
                    ))
                })
                .collect(),
        )
    }

    /// Runs `pgbench` from inside `from` against this server's address with its login.
    pub fn pgbench(&self, from: &Host, run: &Pgbench) -> PgbenchReport {
        run.run(from, self.addr, &self.login())
    }

    /// Runs `sql` as the superuser over the Unix socket and returns psql's unaligned,
    /// tuples-only output (`a|b` per row). Panics on any SQL error.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.addr.port().to_string()])
            .args(["-U", SUPERUSER, "-d", DATABASE, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql `{sql}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SIGINT is PostgreSQL's fast shutdown: backends are told to exit and the server
            // stops without waiting for clients (SIGTERM would wait for them to disconnect).
            process.signal(Signal::SIGINT);
            if process.wait_timeout(Duration::from_secs(10)).is_none() {
                process.stop(Duration::from_secs(1));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How `pgbench` sends its statements (`-M`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum QueryMode {
    /// One `Query` message per statement, parameters inlined.
    #[default]
    Simple,
    /// `Parse`/`Bind`/`Execute`/`Sync` per statement, unnamed statements.
    Extended,
    /// Extended protocol with named statements prepared once per connection.
    Prepared,
}

impl QueryMode {
    fn flag(self) -> &'static str {
        match self {
            Self::Simple => "simple",
            Self::Extended => "extended",
            Self::Prepared => "prepared",
        }
    }
}

/// How long a `pgbench` run lasts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PgbenchLength {
    /// `-T`: this long (whole seconds).
    Duration(Duration),
    /// `-t`: this many transactions per client.
    TransactionsPerClient(u32),
}

/// One `pgbench` run (the built-in TPC-B-like script, or its select-only variant).
///
/// Before its clients start, pgbench runs two `SELECT`s of its own on a separate connection
/// (the scale from `pgbench_branches`, and whether `pgbench_accounts` is partitioned), and,
/// unless `vacuum` is false, `VACUUM` twice and `TRUNCATE pgbench_history`: a server that
/// served a run executed these besides the clients' transactions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pgbench {
    /// `-c`: concurrent clients, each on its own connection (`-j` is the same number, one
    /// thread per client).
    pub clients: u32,
    /// `-T` or `-t`.
    pub length: PgbenchLength,
    /// `-R`: transactions per second over all clients, on a Poisson schedule; `None` is as
    /// fast as possible.
    pub rate: Option<u32>,
    /// `-S`: the select-only script (one `SELECT` per transaction) instead of TPC-B (`BEGIN`,
    /// three `UPDATE`s, a `SELECT`, an `INSERT`, `END`).
    pub select_only: bool,
    /// `-M`.
    pub mode: QueryMode,
    /// `-C`: a new connection (and login) per transaction.
    pub connect_per_transaction: bool,
    /// `-n` when false: skip the `VACUUM`s and `TRUNCATE pgbench_history` pgbench runs on a
    /// connection of its own before the clients start.
    pub vacuum: bool,
}

impl Default for Pgbench {
    /// 4 clients for 5 s, unthrottled, TPC-B over the simple protocol, long-lived connections.
    fn default() -> Self {
        Self {
            clients: 4,
            length: PgbenchLength::Duration(Duration::from_secs(5)),
            rate: None,
            select_only: false,
            mode: QueryMode::Simple,
            connect_per_transaction: false,
            vacuum: true,
        }
    }
}

/// What a `pgbench` run reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgbenchReport {
    /// Transactions that completed ("number of transactions actually processed").
    pub transactions: u64,
    /// Transactions that failed ("number of failed transactions").
    pub failed: u64,
    /// Whether pgbench exited 0 (it exits 2 when a client aborted, e.g. on a lost connection).
    pub success: bool,
    /// Everything it printed (stdout then stderr), for failure messages.
    pub output: String,
}

impl Pgbench {
    /// The command line arguments after `pgbench` (without the connection options).
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "-c".to_owned(),
            self.clients.to_string(),
            "-j".to_owned(),
            self.clients.to_string(),
            "-M".to_owned(),
            self.mode.flag().to_owned(),
        ];
        match self.length {
            PgbenchLength::Duration(d) => {
                args.extend(["-T".to_owned(), d.as_secs().max(1).to_string()]);
            }
            PgbenchLength::TransactionsPerClient(n) => {
                args.extend(["-t".to_owned(), n.to_string()]);
            }
        }
        if let Some(rate) = self.rate {
            args.extend(["-R".to_owned(), rate.to_string()]);
        }
        if self.select_only {
            args.push("-S".to_owned());
        }
        if self.connect_per_transaction {
            args.push("-C".to_owned());
        }
        if !self.vacuum {
            args.push("-n".to_owned());
        }
        args
    }

    /// Runs pgbench inside `from` against `server` with `login` (the password, if any, through
    /// `PGPASSWORD`), waits for it to finish and parses its summary. Panics when pgbench
    /// printed no summary (it could not connect at all); a run whose clients aborted midway
    /// returns with `success == false`.
    pub fn run(&self, from: &Host, server: SocketAddr, login: &PostgresLogin) -> PgbenchReport {
        let mut command = from.command(bindir().join("pgbench").to_str().expect("utf-8"));
        command
            .args(self.args())
            .args(["-h", &server.ip().to_string()])
            .args(["-p", &server.port().to_string()])
            .args(["-U", &login.user, &login.database])
            .stdin(Stdio::null());
        match &login.password {
            Some(password) => command.env("PGPASSWORD", password),
            None => command.env_remove("PGPASSWORD"),
        };
        let out: Output = command.output().expect("run pgbench");
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let figure = |label: &str| {
            output.lines().find_map(|l| {
                let rest = l.strip_prefix(label)?.trim_start();
                rest.split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
        };
        let transactions = figure("number of transactions actually processed:")
            .unwrap_or_else(|| panic!("pgbench printed no summary:\n{output}"));
        PgbenchReport {
            transactions,
            failed: figure("number of failed transactions:").unwrap_or(0),
            success: out.status.success(),
            output,
        }
    }
}

/// The directory of the PostgreSQL programs: [`POSTGRES_BINDIR_ENV`], else the newest
/// `/usr/lib/postgresql/<major>/bin` holding `postgres`.
pub fn bindir() -> PathBuf {
    if let Some(dir) = std::env::var_os(POSTGRES_BINDIR_ENV) {
        return PathBuf::from(dir);
    }
    let versions = std::fs::read_dir("/usr/lib/postgresql")
        .expect("no /usr/lib/postgresql: install PostgreSQL (`cargo xtask setup` does)");
    versions
        .filter_map(Result::ok)
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((major, bin))
        })
        .max()
        .map(|(_, bin)| bin)
        .expect("no /usr/lib/postgresql/<version>/bin/postgres: install PostgreSQL")
}

/// The unprivileged user the server runs as: `postgres` (Debian's package creates it), else
/// `nobody`.
fn server_user() -> (u32, u32) {
    let user = ["postgres", "nobody"]
        .iter()
        .find_map(|name| nix::unistd::User::from_name(name).ok().flatten())
        .expect("neither a `postgres` nor a `nobody` user exists to run the server as");
    (user.uid.as_raw(), user.gid.as_raw())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
