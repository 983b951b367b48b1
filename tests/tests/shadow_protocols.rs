//! Replay fidelity per protocol, judged by the servers: a real client (pgbench, redis-benchmark)
//! on a client host talks to a real server on the live host, whose agent mirrors every flow to a
//! shadow host; the shadow agent replays them against the same server on the shadow's loopback.
//! A replay is right when the shadow *server's* own count of what it executed
//! (`pg_stat_statements`, `INFO commandstats`) equals the live server's, not when the agent says
//! it sent everything.
//!
//! The loss tests drop single mirror datagrams on their way into the shadow ([`MirrorLoss`]) and
//! check that the replayer skips the hole and carries on with the flow.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::Stdio,
    thread,
    time::Duration,
};

use doppel_agent::shadow::vxlan::SegmentBuilder;
use doppel_tests::{
    agent::{AgentProcess as Agent, counter},
    testbed::{Host, Process, privileged_or_skip},
    topology::{Topology, VNI, wait_for},
    workloads::{
        ExecutedStatements, GrpcServer, Memcached, Nginx, Pgbench, PgbenchLength, PgbenchReport,
        Postgres, PostgresAuth, QueryMode, Redis, RedisBenchmark,
        mariadb::{self, Mariadb, Sysbench},
    },
};
use serde_json::Value;

const PG_PORT: u16 = 5432;
const REDIS_PORT: u16 = 6379;
const H2C_PORT: u16 = 8080;
const GRPC_PORT: u16 = 50051;
/// pgbench's scale for every test: 100 000 accounts, initialised in a fraction of a second.
const SCALE: u32 = 1;
/// The SCRAM role on both servers of the SCRAM tests.
const SCRAM_USER: &str = "bench";
const SCRAM_PASSWORD: &str = "secret";

/// A PostgreSQL server on the live host and one on the shadow's loopback, both with `auth` and
/// initialised alike by `pgbench -i` (before any agent runs, so nothing of it is mirrored),
/// their statement counts at zero.
fn postgres_pair(t: &Topology, auth: &PostgresAuth) -> (Postgres, Postgres) {
    let live = Postgres::start(&t.live, t.live_addr(), PG_PORT, auth.clone());
    let shadow = Postgres::start(&t.shadow, Ipv4Addr::LOCALHOST.into(), PG_PORT, auth.clone());
    live.pgbench_init(SCALE);
    shadow.pgbench_init(SCALE);
    (live, shadow)
}

/// Both agents up, and the client's workload run against live.
struct Mirrored<'t> {
    shadow: Agent,
    live: Agent,
    /// What the live server executed, per kind, once the workload ended.
    live_executed: ExecutedStatements,
    /// Present in the loss tests.
    loss: Option<MirrorLoss<'t>>,
}

/// Starts the shadow agent replaying `service` (one `[[services]]` table's body), with
/// [`MirrorLoss`] dropping about one in `loss.0` data-carrying mirror datagrams (sparing
/// `loss.1`) on their
/// way in when given, and the live agent mirroring `port`; then runs `workload`, which runs the
/// client against live, checks it went through and returns what the live server executed.
/// Start the servers first, so nothing of their setup is mirrored.
fn mirror<'t>(
    t: &'t Topology,
    service: &str,
    port: u16,
    loss: Option<(u32, Spare)>,
    workload: impl FnOnce() -> ExecutedStatements,
) -> Mirrored<'t> {
    let shadow = t.shadow_agent(&[service], "");
    let loss = loss.map(|(one_in, spare)| {
        MirrorLoss::install(&t.shadow, &t.shadow_link.b_iface, one_in, spare)
    });
    let live = t.live_agent(&[port]);
    let live_executed = workload();
    Mirrored {
        shadow,
        live,
        live_executed,
        loss,
    }
}

impl Mirrored<'_> {
    /// Gives the shadow 2 s from the client's end to execute what live did (`shadow_executed`
    /// asks the shadow server), and checks it did: per kind, exactly, no replayed exchange
    /// failing. Returns the shadow agent's lines.
    fn assert_executed_exactly(
        self,
        shadow_executed: impl Fn() -> ExecutedStatements,
    ) -> Vec<Value> {
        self.assert_executed_exactly_with_errors(shadow_executed, 0)
    }

    /// [`Mirrored::assert_executed_exactly`] for a workload with `errors` server-side failures:
    /// the shadow's `exchange_errors` must be exactly those.
    fn assert_executed_exactly_with_errors(
        self,
        shadow_executed: impl Fn() -> ExecutedStatements,
        errors: u64,
    ) -> Vec<Value> {
        self.assert_executed_exactly_both(shadow_executed, errors).0
    }

    /// [`Mirrored::assert_executed_exactly_with_errors`], returning the shadow agent's lines
    /// and the live agent's.
    fn assert_executed_exactly_both(
        self,
        shadow_executed: impl Fn() -> ExecutedStatements,
        errors: u64,
    ) -> (Vec<Value>, Vec<Value>) {
        self.assert_executed_exactly_with_server_errors(shadow_executed, || errors)
    }

    /// [`Mirrored::assert_executed_exactly_both`] where the failures to expect are what the
    /// shadow server itself counted (`errors`, read once the shadow agent has exited).
    fn assert_executed_exactly_with_server_errors(
        self,
        shadow_executed: impl Fn() -> ExecutedStatements,
        errors: impl Fn() -> u64,
    ) -> (Vec<Value>, Vec<Value>) {
        let live_executed = self.live_executed;
        let caught_up = wait_for(Duration::from_secs(2), || {
            shadow_executed() == live_executed
        });
        let shadow_lines = self.shadow.stop();
        let live_lines = self.live.stop();
        // Read once the shadow agent has exited, so nothing it replays late goes unseen.
        let shadow_executed = shadow_executed();
        assert!(
            caught_up,
            "2 s after the client stopped, the shadow executed {shadow_executed}, live {live_executed}; \
             shadow agent: {}",
            replay_summary(&shadow_lines)
        );
        assert_eq!(shadow_executed, live_executed, "shadow per kind");
        eprintln!(
            "executed {shadow_executed} on both; shadow agent: {}",
            replay_summary(&shadow_lines)
        );
        assert_eq!(
            counter(&shadow_lines, "exchange_errors"),
            errors(),
            "replayed exchanges failing: {}",
            replay_summary(&shadow_lines)
        );
        (shadow_lines, live_lines)
    }

    /// For the loss tests: checks the injector dropped something, gives the shadow `limit` to
    /// execute all live did but at most one statement or command per dropped datagram, and
    /// checks it never executed more of a kind than live, counted the holes and abandoned no
    /// flow.
    fn assert_holes_skipped(
        self,
        limit: Duration,
        shadow_executed: impl Fn() -> ExecutedStatements,
    ) {
        let live_executed = self.live_executed;
        let dropped = self.loss.as_ref().expect("a loss test").dropped();
        assert!(dropped > 0, "the loss injector dropped nothing");
        let enough = wait_for(limit, || {
            shadow_executed().total() + dropped >= live_executed.total()
        });
        let shadow_lines = self.shadow.stop();
        self.live.stop();
        let shadow_executed = shadow_executed();
        let summary = replay_summary(&shadow_lines);
        assert!(
            enough,
            "{dropped} datagrams dropped: shadow executed {shadow_executed}, live {live_executed}; \
             {summary}"
        );
        for (kind, calls) in &shadow_executed.0 {
            assert!(
                *calls <= live_executed.get(kind),
                "the shadow executed more {kind} than live: {shadow_executed} vs {live_executed}"
            );
        }
        eprintln!("{dropped} datagrams dropped; {summary}");
        assert!(
            counter(&shadow_lines, "stream_holes") > 0,
            "holes counted: {summary}"
        );
        assert_eq!(
            counter(&shadow_lines, "flows_abandoned_gap"),
            0,
            "no flow abandoned: {summary}"
        );
    }
}

/// The shadow agent's counters the failure messages show, to tell a replayer fault from a lost
/// datagram.
fn replay_summary(lines: &[Value]) -> String {
    let names = [
        "flows_started",
        "flows_completed",
        "exchanges",
        "exchange_errors",
        "http_5xx",
        "error_replies",
        "flows_abandoned_protocol",
        "auth_not_replayable",
        "logins",
        "login_failures",
        "statements_skipped",
        "stream_holes",
        "bytes_lost",
        "resyncs",
        "bytes_skipped",
        "segments_ignored",
        "response_timeouts",
        "copies_failed",
        "flows_reset",
        "flows_idle_ended",
        "duplicate_bytes",
        "flows_abandoned_gap",
        "mirror_drops",
        "datagrams",
    ];
    let lag = lines
        .iter()
        .filter_map(|l| l["counters"]["replay_lag_ms"].as_u64())
        .max()
        .unwrap_or(0);
    let mut out: Vec<String> = names
        .iter()
        .map(|n| format!("{n}={}", counter(lines, n)))
        .collect();
    out.push(format!("max replay_lag_ms={lag}"));
    out.join(" ")
}

/// Checks a pgbench run went through on live: no failures, and the live server executed one
/// `SELECT` per transaction plus pgbench's own two (`live` counted by the server itself).
fn assert_live_run(report: &PgbenchReport, live: &ExecutedStatements, select_only: bool) {
    assert!(
        report.success && report.failed == 0 && report.transactions > 0,
        "pgbench against live failed:\n{}",
        report.output
    );
    assert_eq!(
        live.get("select"),
        report.transactions + 2,
        "live executed {live} for {} transactions",
        report.transactions
    );
    if !select_only {
        // TPC-B: three UPDATEs and one INSERT per transaction.
        assert_eq!(live.get("update"), 3 * report.transactions, "live {live}");
        assert_eq!(live.get("insert"), report.transactions, "live {live}");
    }
}

/// Runs `run` from the client against `live_pg` and checks it went through; returns what the
/// live server executed.
fn pgbench_on_live(t: &Topology, live_pg: &Postgres, run: &Pgbench) -> ExecutedStatements {
    let report = live_pg.pgbench(&t.client, run);
    let live_executed = live_pg.executed();
    assert_live_run(&report, &live_executed, run.select_only);
    live_executed
}

/// Runs `run` from the client against live with both agents up, then gives the shadow 2 s from
/// the client's end to execute what live did, and checks it did: per statement kind, exactly.
/// Returns the shadow agent's lines.
fn postgres_replays_exactly(
    t: &Topology,
    auth: &PostgresAuth,
    service: &str,
    run: &Pgbench,
) -> Vec<Value> {
    let (live_pg, shadow_pg) = postgres_pair(t, auth);
    mirror(t, service, PG_PORT, None, || {
        pgbench_on_live(t, &live_pg, run)
    })
    .assert_executed_exactly(|| shadow_pg.executed())
}

fn postgres_service() -> String {
    format!("port = {PG_PORT}\nprotocol = \"postgres\"")
}

fn scram() -> PostgresAuth {
    PostgresAuth::Scram {
        user: SCRAM_USER.to_owned(),
        password: SCRAM_PASSWORD.to_owned(),
    }
}

fn seconds(s: u64) -> PgbenchLength {
    PgbenchLength::Duration(Duration::from_secs(s))
}

#[test]
fn postgres_read_only_on_long_lived_connections_is_executed_exactly() {
    if !privileged_or_skip("postgres_read_only_on_long_lived_connections_is_executed_exactly") {
        return;
    }
    let t = Topology::new();
    let run = Pgbench {
        clients: 4,
        length: seconds(5),
        rate: Some(500),
        select_only: true,
        ..Pgbench::default()
    };
    postgres_replays_exactly(&t, &PostgresAuth::Trust, &postgres_service(), &run);
}

#[test]
fn postgres_tpcb_writes_over_the_extended_protocol_are_executed_exactly() {
    if !privileged_or_skip("postgres_tpcb_writes_over_the_extended_protocol_are_executed_exactly") {
        return;
    }
    let t = Topology::new();
    let run = Pgbench {
        clients: 4,
        length: seconds(5),
        rate: Some(100),
        mode: QueryMode::Extended,
        ..Pgbench::default()
    };
    postgres_replays_exactly(&t, &PostgresAuth::Trust, &postgres_service(), &run);
}

#[test]
fn postgres_connection_per_transaction_is_executed_exactly_and_closes_are_not_errors() {
    if !privileged_or_skip(
        "postgres_connection_per_transaction_is_executed_exactly_and_closes_are_not_errors",
    ) {
        return;
    }
    let t = Topology::new();
    let run = Pgbench {
        clients: 4,
        length: seconds(4),
        rate: Some(50),
        connect_per_transaction: true,
        ..Pgbench::default()
    };
    let (live_pg, shadow_pg) = postgres_pair(&t, &PostgresAuth::Trust);
    // The protocol is left to detection from the first bytes (an SSLRequest) here.
    let (lines, live_lines) = mirror(&t, &format!("port = {PG_PORT}"), PG_PORT, None, || {
        pgbench_on_live(&t, &live_pg, &run)
    })
    .assert_executed_exactly_both(|| shadow_pg.executed(), 0);
    // Checked above: exchange_errors == 0, so each of the ~200 client closes (Terminate, then
    // FIN) ended a flow without counting as an error.
    assert!(
        counter(&lines, "flows_completed") >= 150,
        "one flow per transaction: {}",
        replay_summary(&lines)
    );
    // The shadow server saw the same exchanges as live's, timed in the kernel alike: the
    // replayer asks for TLS where libpq did (and is told no), then logs in.
    assert_eq!(
        counter(&lines, "kernel_exchanges"),
        counter(&live_lines, "exchanges"),
        "in-kernel exchanges, shadow against live: {}",
        replay_summary(&lines)
    );
}

#[test]
fn connections_reusing_a_closed_flows_ports_are_replayed_as_new_flows() {
    if !privileged_or_skip("connections_reusing_a_closed_flows_ports_are_replayed_as_new_flows") {
        return;
    }
    let t = Topology::new();
    // Sixteen client ports, reused from TIME_WAIT (Linux allows it a second after the last
    // segment): about 40 connections, so most ports carry two or three flows seconds apart,
    // well within the shadow's memory of closed flows.
    t.client
        .sysctl("net.ipv4.ip_local_port_range", "40000 40015")
        .expect("port range");
    t.client
        .sysctl("net.ipv4.tcp_tw_reuse", "1")
        .expect("tw_reuse");
    let run = Pgbench {
        clients: 2,
        length: seconds(8),
        rate: Some(5),
        connect_per_transaction: true,
        ..Pgbench::default()
    };
    let lines = postgres_replays_exactly(&t, &PostgresAuth::Trust, &postgres_service(), &run);
    assert!(
        counter(&lines, "flows_started") > 24,
        "more flows than ports: {}",
        replay_summary(&lines)
    );
}

#[test]
fn postgres_scram_without_shadow_credentials_is_not_replayed_and_is_counted() {
    if !privileged_or_skip(
        "postgres_scram_without_shadow_credentials_is_not_replayed_and_is_counted",
    ) {
        return;
    }
    let t = Topology::new();
    let (live_pg, shadow_pg) = postgres_pair(&t, &scram());
    let run = Pgbench {
        clients: 4,
        length: seconds(3),
        rate: Some(200),
        select_only: true,
        ..Pgbench::default()
    };
    let Mirrored { shadow, live, .. } = mirror(&t, &postgres_service(), PG_PORT, None, || {
        pgbench_on_live(&t, &live_pg, &run)
    });
    // Every flow (the 4 clients' and pgbench's own) starts with a SCRAM exchange the shadow
    // cannot answer without the password: each is counted once the agent saw its login.
    let counted = wait_for(Duration::from_secs(5), || {
        shadow.counter("auth_not_replayable") >= 5
    });
    let shadow_lines = shadow.stop();
    live.stop();
    let shadow_executed = shadow_pg.executed();
    assert!(
        counted && counter(&shadow_lines, "auth_not_replayable") > 0,
        "SCRAM logins without credentials counted: {}",
        replay_summary(&shadow_lines)
    );
    eprintln!("shadow agent: {}", replay_summary(&shadow_lines));
    assert_eq!(
        shadow_executed.total(),
        0,
        "the shadow server executed {shadow_executed} of the client's statements without a login"
    );
}

#[test]
fn postgres_scram_with_shadow_credentials_is_executed_exactly() {
    if !privileged_or_skip("postgres_scram_with_shadow_credentials_is_executed_exactly") {
        return;
    }
    let t = Topology::new();
    let run = Pgbench {
        clients: 4,
        length: seconds(3),
        rate: Some(200),
        select_only: true,
        ..Pgbench::default()
    };
    let service = format!(
        "{}\nuser = \"{SCRAM_USER}\"\npassword = \"{SCRAM_PASSWORD}\"",
        postgres_service()
    );
    let lines = postgres_replays_exactly(&t, &scram(), &service, &run);
    assert_eq!(
        counter(&lines, "auth_not_replayable"),
        0,
        "the replayer logged in itself: {}",
        replay_summary(&lines)
    );
}

const MARIADB_PORT: u16 = 3306;

/// A MariaDB server on the live host and one on the shadow's loopback, both prepared alike by
/// `sysbench prepare` (over their Unix sockets, before any agent runs), counts at zero.
fn mariadb_pair(t: &Topology) -> (Mariadb, Mariadb) {
    let mut live = Mariadb::start(&t.live, t.live_addr(), MARIADB_PORT);
    let mut shadow = Mariadb::start(&t.shadow, Ipv4Addr::LOCALHOST.into(), MARIADB_PORT);
    let rows = Sysbench::default().table_size;
    live.sysbench_prepare(rows);
    shadow.sysbench_prepare(rows);
    (live, shadow)
}

fn mariadb_service(credentials: bool) -> String {
    let mut service = format!("port = {MARIADB_PORT}\nprotocol = \"mysql\"");
    if credentials {
        service.push_str(&format!(
            "\nuser = \"{}\"\npassword = \"{}\"",
            mariadb::USER,
            mariadb::PASSWORD
        ));
    }
    service
}

/// Runs `run` `runs` times, one after the other, from the client against live's MariaDB and
/// checks it went through: every transaction committed, no errors. Returns what the live
/// server executed. A second run's connections are served by the threads the first run's left
/// in MariaDB's thread cache, whose statement ids go on from the first run's.
fn sysbench_on_live(t: &Topology, live: &Mariadb, run: &Sysbench, runs: u32) -> ExecutedStatements {
    let (mut transactions, mut deadlocks) = (0, 0);
    for _ in 0..runs {
        let report = live.sysbench(&t.client, run);
        assert!(
            report.success && report.transactions > 0,
            "sysbench against live failed:\n{}",
            report.output
        );
        transactions += report.transactions;
        deadlocks += report.errors;
    }
    // sysbench retries a transaction that deadlocked and counts it as an ignored error.
    let failed = live.failed_statements();
    assert_eq!(
        failed.len() as u64,
        deadlocks,
        "live's failures against sysbench's ignored errors: {failed:#?}"
    );
    assert_failures_are_rare_deadlocks("live", live);
    let executed = live.executed();
    assert_eq!(
        executed.get("commit"),
        transactions,
        "live executed {executed} for {transactions} transactions"
    );
    if run.prepared {
        assert!(executed.get("stmt_execute") > 0, "prepared: {executed}");
    } else {
        assert_eq!(executed.get("stmt_execute"), 0, "text queries: {executed}");
    }
    executed
}

/// Checks that every statement `db` failed (its own log) was a deadlock's victim or, after
/// one, a duplicate key, and that at most one transaction in 100 met a deadlock: four
/// sysbench threads on 10 000 rows meet one now and then, on live and, with its own timing,
/// on the shadow. On live sysbench retries the transaction; on the shadow the replay goes on
/// with live's, whose `DELETE` the deadlock undid, so its `INSERT` of that row may then
/// find it still there.
fn assert_failures_are_rare_deadlocks(which: &str, db: &Mariadb) {
    let failed = db.failed_statements();
    let commits = db.executed().get("commit");
    let deadlocks = failed
        .iter()
        .filter(|l| l.contains(" ERROR 1213: "))
        .count();
    let duplicates = failed
        .iter()
        .filter(|l| l.contains(" ERROR 1062: "))
        .count();
    assert!(
        deadlocks + duplicates == failed.len() && duplicates <= deadlocks,
        "{which} failed statements other than deadlock victims and their aftermath: {failed:#?}"
    );
    assert!(
        deadlocks as u64 * 100 <= commits,
        "{which} deadlocked {deadlocks} times in {commits} transactions: {failed:#?}"
    );
}

/// Two sysbench runs against live (the second on cached server threads), executed exactly by
/// the shadow, each connection logged in by the replayer.
fn mariadb_replays_exactly(run: &Sysbench) -> Vec<Value> {
    let t = Topology::new();
    let (live_db, shadow_db) = mariadb_pair(&t);
    let (lines, _) = mirror(&t, &mariadb_service(true), MARIADB_PORT, None, || {
        sysbench_on_live(&t, &live_db, run, 2)
    })
    .assert_executed_exactly_with_server_errors(
        || shadow_db.executed(),
        // The replay keeps each connection's order but not the exact spacing between
        // connections, so two transactions on the same rows may deadlock on the shadow where
        // they did not on live. The shadow server logs each failure itself; the replay must
        // count exactly those.
        || {
            let failed = shadow_db.failed_statements();
            eprintln!(
                "the shadow server failed {} statements: {failed:#?}",
                failed.len()
            );
            failed.len() as u64
        },
    );
    assert_failures_are_rare_deadlocks("the shadow", &shadow_db);
    assert_eq!(
        counter(&lines, "logins"),
        2 * u64::from(run.threads),
        "the replayer logged in once per connection: {}",
        replay_summary(&lines)
    );
    assert_eq!(counter(&lines, "statements_skipped"), 0);
    lines
}

#[test]
fn mariadb_sysbench_with_prepared_statements_is_executed_exactly() {
    if !privileged_or_skip("mariadb_sysbench_with_prepared_statements_is_executed_exactly") {
        return;
    }
    mariadb_replays_exactly(&Sysbench::default());
}

#[test]
fn mariadb_sysbench_text_queries_are_executed_exactly() {
    if !privileged_or_skip("mariadb_sysbench_text_queries_are_executed_exactly") {
        return;
    }
    mariadb_replays_exactly(&Sysbench {
        prepared: false,
        ..Sysbench::default()
    });
}

#[test]
fn mariadb_without_shadow_credentials_is_not_replayed_and_is_counted() {
    if !privileged_or_skip("mariadb_without_shadow_credentials_is_not_replayed_and_is_counted") {
        return;
    }
    let t = Topology::new();
    let (live_db, shadow_db) = mariadb_pair(&t);
    let run = Sysbench::default();
    let Mirrored { shadow, live, .. } =
        mirror(&t, &mariadb_service(false), MARIADB_PORT, None, || {
            sysbench_on_live(&t, &live_db, &run, 1)
        });
    let counted = wait_for(Duration::from_secs(5), || {
        shadow.counter("auth_not_replayable") >= u64::from(run.threads)
    });
    let shadow_lines = shadow.stop();
    live.stop();
    let summary = replay_summary(&shadow_lines);
    assert!(
        counted,
        "password logins without credentials counted: {summary}"
    );
    assert_eq!(counter(&shadow_lines, "logins"), 0, "{summary}");
    let executed = shadow_db.executed();
    assert_eq!(
        executed.total(),
        0,
        "the shadow server executed {executed} without a login"
    );
    assert!(
        shadow_db.log().is_empty() || !shadow_db.log().contains("Access denied"),
        "the replayer never tried a login it could not answer: {}",
        shadow_db.log()
    );
}

/// The kinds sysbench's statements count under once each (an EXECUTE counts under its
/// statement's kind and under `stmt_execute`), so one lost command costs one of these.
const MARIADB_ONE_PER_COMMAND: [&str; 6] =
    ["select", "insert", "update", "delete", "begin", "commit"];

fn mariadb_executed_of(db: &Mariadb, kinds: &[&str]) -> ExecutedStatements {
    let all = db.executed();
    ExecutedStatements(
        kinds
            .iter()
            .map(|k| ((*k).to_owned(), all.get(k)))
            .collect(),
    )
}

#[test]
fn mariadb_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows() {
    if !privileged_or_skip("mariadb_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows")
    {
        return;
    }
    let t = Topology::new();
    let (live_db, shadow_db) = mariadb_pair(&t);
    let run = Sysbench::default();
    let loss = Some((LOSS_ONE_IN, Spare::MysqlLoginsAndPrepares));
    let mirrored = mirror(&t, &mariadb_service(true), MARIADB_PORT, loss, || {
        sysbench_on_live(&t, &live_db, &run, 1);
        mariadb_executed_of(&live_db, &MARIADB_ONE_PER_COMMAND)
    });
    // One command per segment (sysbench waits for each reply), so each lost datagram costs
    // at most one; the statements prepared before the holes stay mapped.
    mirrored.assert_holes_skipped(Duration::from_secs(3), || {
        mariadb_executed_of(&shadow_db, &MARIADB_ONE_PER_COMMAND)
    });
}

#[test]
fn mariadb_err_replies_are_errors_on_live_and_shadow_alike() {
    if !privileged_or_skip("mariadb_err_replies_are_errors_on_live_and_shadow_alike") {
        return;
    }
    let t = Topology::new();
    let (live_db, shadow_db) = mariadb_pair(&t);
    // The `mariadb` client over TCP, going on after errors: 3 SELECTs that work, 2 on a table
    // that does not exist (ERR 1146), a change of schema between, one session per run.
    const RUNS: u64 = 3;
    // One statement per line: `--force` goes on at the next line after an error.
    // `use` is the client's own command: a COM_INIT_DB.
    let sql = "SELECT 1;\nSELECT * FROM nosuch;\nuse mysql\nSELECT id FROM sbtest.sbtest1 WHERE id = 5;\n\
               SELECT * FROM nosuch_either;\nSELECT 2;\n";
    let mirrored = mirror(&t, &mariadb_service(true), MARIADB_PORT, None, || {
        for _ in 0..RUNS {
            let mut client = t
                .client
                .command("mariadb")
                .arg("--no-defaults")
                .arg(format!("--host={}", live_db.addr.ip()))
                .arg(format!("--port={}", live_db.addr.port()))
                .arg(format!("--user={}", mariadb::USER))
                .arg(format!("--password={}", mariadb::PASSWORD))
                .args(["--skip-ssl", "--batch", "--force", mariadb::DATABASE])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run mariadb");
            client
                .stdin
                .take()
                .expect("stdin")
                .write_all(sql.as_bytes())
                .expect("write the statements");
            let out = client.wait_with_output().expect("mariadb ends");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                stderr.matches("ERROR 1146").count(),
                2,
                "two missing tables: {stderr}"
            );
        }
        live_db.executed()
    });
    let (shadow_lines, live_lines) =
        mirrored.assert_executed_exactly_both(|| shadow_db.executed(), 2 * RUNS);
    assert_eq!(
        counter(&shadow_lines, "error_replies"),
        2 * RUNS,
        "the shadow's ERR replies: {}",
        replay_summary(&shadow_lines)
    );
    assert_eq!(
        counter(&live_lines, "error_replies"),
        2 * RUNS,
        "live's ERR replies, from the first response bytes"
    );
}

/// The commands a redis-benchmark run sends, as `INFO commandstats` names them (`config|get`:
/// its two `CONFIG GET`s at start).
const REDIS_COMMANDS: [&str; 3] = ["set", "get", "config|get"];

/// The calls of each of [`REDIS_COMMANDS`] `redis` executed, zeros included.
fn redis_calls(redis: &Redis, host: &Host) -> ExecutedStatements {
    redis_calls_of(redis, host, &REDIS_COMMANDS)
}

/// The calls of each of `commands` `redis` executed, zeros included.
fn redis_calls_of(redis: &Redis, host: &Host, commands: &[&str]) -> ExecutedStatements {
    let calls = redis.command_calls(host);
    ExecutedStatements(
        commands
            .iter()
            .map(|c| ((*c).to_owned(), calls.get(*c).copied().unwrap_or(0)))
            .collect::<BTreeMap<_, _>>(),
    )
}

fn redis_benchmark() -> RedisBenchmark {
    RedisBenchmark {
        clients: 4,
        requests: 5000,
        tests: vec!["set".to_owned(), "get".to_owned()],
        pipeline: 1,
    }
}

fn redis_service() -> String {
    format!("port = {REDIS_PORT}\nprotocol = \"redis\"")
}

/// A redis server on the live host and one on the shadow's loopback.
fn redis_pair(t: &Topology) -> (Redis, Redis) {
    (
        Redis::start(&t.live, t.live_addr(), REDIS_PORT),
        Redis::start(&t.shadow, Ipv4Addr::LOCALHOST.into(), REDIS_PORT),
    )
}

#[test]
fn redis_long_lived_connections_are_executed_exactly() {
    if !privileged_or_skip("redis_long_lived_connections_are_executed_exactly") {
        return;
    }
    let t = Topology::new();
    let (live_redis, shadow_redis) = redis_pair(&t);
    let bench = redis_benchmark();
    mirror(&t, &redis_service(), REDIS_PORT, None, || {
        bench.run(&t.client, live_redis.addr);
        let live_calls = redis_calls(&live_redis, &t.live);
        assert_eq!(
            (
                live_calls.get("set"),
                live_calls.get("get"),
                live_calls.get("config|get")
            ),
            (u64::from(bench.requests), u64::from(bench.requests), 2),
            "live executed {live_calls}"
        );
        live_calls
    })
    .assert_executed_exactly(|| redis_calls(&shadow_redis, &t.shadow));
}

/// The paths the h2c test requests, in h2load's round-robin order.
const H2C_PATHS: [&str; 4] = ["/a", "/fail", "/big", "/b"];

/// What an nginx served, per `METHOD URI`.
fn nginx_served(nginx: &Nginx) -> ExecutedStatements {
    let mut served = BTreeMap::new();
    for line in nginx.access_log() {
        *served.entry(line).or_insert(0) += 1;
    }
    ExecutedStatements(served)
}

#[test]
fn http2_streams_multiplexed_on_long_lived_connections_are_executed_exactly() {
    if !privileged_or_skip(
        "http2_streams_multiplexed_on_long_lived_connections_are_executed_exactly",
    ) {
        return;
    }
    let t = Topology::new();
    let live_nginx = Nginx::start_h2c(&t.live, t.live_addr(), H2C_PORT);
    let shadow_nginx = Nginx::start_h2c(&t.shadow, Ipv4Addr::LOCALHOST.into(), H2C_PORT);
    // 4 connections, up to 8 streams in flight on each, 100 requests a second per connection;
    // a quarter of the responses are 64 KiB, a quarter 503.
    const REQUESTS: u64 = 2000;
    let service = format!("port = {H2C_PORT}\nprotocol = \"http2\"");
    let lines = mirror(&t, &service, H2C_PORT, None, || {
        let urls: Vec<String> = H2C_PATHS
            .iter()
            .map(|p| format!("http://{}{p}", live_nginx.addr))
            .collect();
        let out = t
            .client
            .command("h2load")
            .args([
                "-n",
                &REQUESTS.to_string(),
                "-c",
                "4",
                "-m",
                "8",
                "--rps",
                "100",
            ])
            .args(&urls)
            .output()
            .expect("run h2load");
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success()
                && report.contains(&format!("{REQUESTS} done"))
                && report.contains("0 errored, 0 timeout"),
            "h2load against live:\n{report}"
        );
        let served = nginx_served(&live_nginx);
        assert_eq!(served.total(), REQUESTS, "live served {served}");
        served
    })
    .assert_executed_exactly_with_errors(|| nginx_served(&shadow_nginx), REQUESTS / 4);
    assert_eq!(
        counter(&lines, "http_5xx"),
        REQUESTS / 4,
        "503s seen through HPACK"
    );
    assert_eq!(counter(&lines, "exchanges"), REQUESTS, "every stream timed");
}

#[test]
fn grpc_calls_on_one_connection_are_executed_exactly_and_only_server_failures_are_errors() {
    if !privileged_or_skip(
        "grpc_calls_on_one_connection_are_executed_exactly_and_only_server_failures_are_errors",
    ) {
        return;
    }
    let t = Topology::new();
    let live_grpc = GrpcServer::start(&t.live, t.live_addr(), GRPC_PORT);
    let shadow_grpc = GrpcServer::start(&t.shadow, Ipv4Addr::LOCALHOST.into(), GRPC_PORT);
    const CALLS: u32 = 600;
    // No protocol configured: the replayer detects HTTP/2 from the connection preface.
    let service = format!("port = {GRPC_PORT}");
    let lines = mirror(&t, &service, GRPC_PORT, None, || {
        let codes = live_grpc.run_client(&t.client, CALLS, 50, 4);
        let executed = live_grpc.executed();
        assert_eq!(
            executed.total(),
            u64::from(CALLS),
            "live executed {executed}"
        );
        assert_eq!(
            codes.get("INTERNAL").copied(),
            Some(executed.get("fail")),
            "client saw {codes:?}"
        );
        executed
    })
    // INTERNAL is the server's failure; NOT_FOUND is the request's, and no error.
    .assert_executed_exactly_with_errors(|| shadow_grpc.executed(), u64::from(CALLS) / 10);
    assert_eq!(counter(&lines, "error_replies"), u64::from(CALLS) / 10);
    assert_eq!(
        counter(&lines, "exchanges"),
        u64::from(CALLS),
        "every call timed"
    );
}

/// A RESP command as an array of bulk strings.
fn resp_command(words: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", words.len()).into_bytes();
    for w in words {
        out.extend(format!("${}\r\n{w}\r\n", w.len()).bytes());
    }
    out
}

/// Reads one `\r\n`-terminated line (a simple reply, or a bulk string's header).
fn read_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    reader.read_line(&mut line).expect("a reply line");
    line
}

#[test]
fn redis_fire_and_forget_commands_are_replayed_and_nothing_waits_for_them() {
    if !privileged_or_skip("redis_fire_and_forget_commands_are_replayed_and_nothing_waits_for_them")
    {
        return;
    }
    let t = Topology::new();
    let (live_redis, shadow_redis) = redis_pair(&t);
    const QUIET: u64 = 100;
    let calls = |redis: &Redis, host: &Host| {
        let all = redis.command_calls(host);
        ExecutedStatements(
            ["set", "incr", "get", "client|reply"]
                .iter()
                .map(|c| ((*c).to_owned(), all.get(*c).copied().unwrap_or(0)))
                .collect(),
        )
    };
    let lines = mirror(&t, &redis_service(), REDIS_PORT, None, || {
        let _inside = t.client.enter().expect("enter the client");
        let conn = TcpStream::connect(live_redis.addr).expect("connect to live redis");
        let mut writer = conn.try_clone().expect("clone");
        let mut reader = BufReader::new(conn);
        writer.write_all(&resp_command(&["SET", "n", "0"])).unwrap();
        assert_eq!(read_line(&mut reader), "+OK\r\n");
        // No reply to SKIP, nor to the command after it.
        writer
            .write_all(&resp_command(&["CLIENT", "REPLY", "SKIP"]))
            .unwrap();
        writer.write_all(&resp_command(&["INCR", "n"])).unwrap();
        // No reply to anything from OFF to ON; the client paces its commands.
        writer
            .write_all(&resp_command(&["CLIENT", "REPLY", "OFF"]))
            .unwrap();
        for _ in 0..QUIET {
            writer.write_all(&resp_command(&["INCR", "n"])).unwrap();
            // Paces the commands (traffic, not a wait).
            thread::sleep(Duration::from_millis(5));
        }
        writer
            .write_all(&resp_command(&["CLIENT", "REPLY", "ON"]))
            .unwrap();
        assert_eq!(read_line(&mut reader), "+OK\r\n");
        writer.write_all(&resp_command(&["GET", "n"])).unwrap();
        let total = (QUIET + 1).to_string();
        assert_eq!(read_line(&mut reader), format!("${}\r\n", total.len()));
        assert_eq!(read_line(&mut reader), format!("{total}\r\n"));
        drop(writer);
        let live = calls(&live_redis, &t.live);
        assert_eq!(live.get("incr"), QUIET + 1, "live executed {live}");
        live
    })
    .assert_executed_exactly(|| calls(&shadow_redis, &t.shadow));
    assert_eq!(
        counter(&lines, "response_timeouts"),
        0,
        "nothing waited for a reply that never comes: {}",
        replay_summary(&lines)
    );
    // SET, CLIENT REPLY ON and GET are the answered ones.
    assert_eq!(
        counter(&lines, "exchanges"),
        3,
        "{}",
        replay_summary(&lines)
    );
}

/// What a stopped shadow did with its backlog: the SETs live and the shadow server executed,
/// and the shadow agent's lines.
struct Drained {
    live_sets: u64,
    shadow_sets: u64,
    lines: Vec<Value>,
}

/// 100 SETs, each after the previous reply, against live while the shadow server is paused for
/// `pause_ms` (its replay stalls behind the first command and the backlog grows); then the
/// shadow agent, with `drain_timeout_ms`, is stopped with the client's connection still open.
/// The shadow server's count is read once the pause is over.
fn stop_with_backlog(pause_ms: u64, drain_timeout_ms: u64) -> Drained {
    let t = Topology::new();
    let (live_redis, shadow_redis) = redis_pair(&t);
    let shadow = t.shadow_agent(
        &[&redis_service()],
        &format!("drain_timeout_ms = {drain_timeout_ms}"),
    );
    let live = t.live_agent(&[REDIS_PORT]);
    let pause = t
        .shadow
        .run(
            "redis-cli",
            &[
                "-p",
                "6379",
                "CLIENT",
                "PAUSE",
                &pause_ms.to_string(),
                "ALL",
            ],
        )
        .expect("pause the shadow server");
    assert!(String::from_utf8_lossy(&pause.stdout).contains("OK"));
    let conn = {
        let _inside = t.client.enter().expect("enter the client");
        TcpStream::connect(live_redis.addr).expect("connect to live redis")
    };
    let mut writer = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    for i in 0..BACKLOG_COMMANDS {
        writer
            .write_all(&resp_command(&["SET", &format!("k{i}"), "v"]))
            .expect("send to live redis");
        assert_eq!(read_line(&mut reader), "+OK\r\n");
        // Paces the SETs (traffic, not a wait).
        thread::sleep(Duration::from_millis(5));
    }
    // Every SET's copy reached the shadow agent before it stops: the live agent's next line
    // counts every copy it sent, and the shadow's lines count the datagrams that arrived.
    live.wait_for_next_line(Duration::from_secs(5));
    let copies = live.counter("clones_sent");
    shadow.wait_for_lines(Duration::from_secs(5), |lines| {
        counter(lines, "datagrams") >= copies
    });
    let lines = shadow.stop();
    live.stop();
    drop(writer);
    let sets =
        |redis: &Redis, host: &Host| redis.command_calls(host).get("set").copied().unwrap_or(0);
    let live_sets = sets(&live_redis, &t.live);
    assert_eq!(live_sets, BACKLOG_COMMANDS);
    // The pause's end: a paused server holds every command, this PING too, and runs those
    // held before it first (the replayer's SET, if its connection was still open).
    let ping = t
        .shadow
        .run("redis-cli", &["-p", "6379", "PING"])
        .expect("ping the shadow server");
    assert!(String::from_utf8_lossy(&ping.stdout).contains("PONG"));
    Drained {
        live_sets,
        shadow_sets: sets(&shadow_redis, &t.shadow),
        lines,
    }
}

const BACKLOG_COMMANDS: u64 = 100;

impl Drained {
    fn summary(&self) -> String {
        format!(
            "live {}, shadow {}, exchanges_unreplayed {}, bytes_unreplayed {}, \
             flows_ended_at_stop {}",
            self.live_sets,
            self.shadow_sets,
            counter(&self.lines, "exchanges_unreplayed"),
            counter(&self.lines, "bytes_unreplayed"),
            counter(&self.lines, "flows_ended_at_stop")
        )
    }
}

#[test]
fn a_stopped_shadow_counts_the_backlog_it_could_not_replay_by_its_deadline() {
    if !privileged_or_skip(
        "a_stopped_shadow_counts_the_backlog_it_could_not_replay_by_its_deadline",
    ) {
        return;
    }
    // Stopped 300 ms into a drain while the shadow server is paused for 3 s.
    let d = stop_with_backlog(3000, 300);
    let summary = d.summary();
    let unreplayed = counter(&d.lines, "exchanges_unreplayed");
    assert!(
        unreplayed > BACKLOG_COMMANDS / 2,
        "the backlog was counted: {summary}"
    );
    // Every command was either executed by the shadow server or counted as unreplayed, but
    // the one written and awaiting its reply when the agent stopped, which the server may or
    // may not execute after its client went away.
    let accounted = d.shadow_sets + unreplayed;
    assert!(
        accounted <= d.live_sets && d.live_sets - accounted <= 1,
        "{summary}"
    );
    // The unreplayed ones are the last commands, whole.
    let last_bytes: usize = (BACKLOG_COMMANDS - unreplayed..BACKLOG_COMMANDS)
        .map(|i| resp_command(&["SET", &format!("k{i}"), "v"]).len())
        .sum();
    assert_eq!(
        counter(&d.lines, "bytes_unreplayed"),
        last_bytes as u64,
        "{summary}"
    );
    assert_eq!(counter(&d.lines, "flows_ended_at_stop"), 1, "{summary}");
    assert_eq!(counter(&d.lines, "flows_completed"), 0, "{summary}");
}

#[test]
fn a_stopped_shadow_replays_its_backlog_within_the_drain_deadline() {
    if !privileged_or_skip("a_stopped_shadow_replays_its_backlog_within_the_drain_deadline") {
        return;
    }
    // The pause ends 1 s in; the drain allows 5 s.
    let d = stop_with_backlog(1500, 5000);
    let summary = d.summary();
    assert_eq!(d.shadow_sets, d.live_sets, "{summary}");
    assert_eq!(counter(&d.lines, "exchanges_unreplayed"), 0, "{summary}");
    assert_eq!(counter(&d.lines, "bytes_unreplayed"), 0, "{summary}");
}

/// A line server for the test below: answers `+OK` to every line except `HUSH`, which it never
/// answers, and logs every line it executed.
const HUSH_SERVER: &str = r#"
import socketserver, sys
log = open(sys.argv[2], "a", buffering=1)
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            word = line.strip().decode()
            log.write(word + "\n")
            if word != "HUSH":
                self.wfile.write(b"+OK\r\n")
                self.wfile.flush()
host, port = sys.argv[1].rsplit(":", 1)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer((host, int(port)), Handler).serve_forever()
"#;

/// The hush server on `addr` in `host`, logging to a file in `dir`.
fn hush_server(
    host: &Host,
    addr: SocketAddr,
    dir: &std::path::Path,
) -> (Process, std::path::PathBuf) {
    let script = dir.join(format!("hush-{}.py", host.netns()));
    let log = dir.join(format!("hush-{}.log", host.netns()));
    std::fs::write(&script, HUSH_SERVER).expect("hush server script");
    let mut command = host.command("python3");
    command
        .arg(&script)
        .arg(addr.to_string())
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let process = host.spawn(command).expect("spawn the hush server");
    doppel_tests::workloads::wait_listening(host, addr, "the hush server");
    (process, log)
}

fn lines_executed(log: &std::path::Path) -> ExecutedStatements {
    let mut executed = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        *executed.entry(line.to_owned()).or_insert(0) += 1;
    }
    ExecutedStatements(executed)
}

#[test]
fn a_request_the_server_never_answers_costs_a_timeout_not_the_rest_of_the_flow() {
    if !privileged_or_skip(
        "a_request_the_server_never_answers_costs_a_timeout_not_the_rest_of_the_flow",
    ) {
        return;
    }
    let t = Topology::new();
    let dir = tempfile::tempdir().expect("temp dir");
    const PORT: u16 = 7000;
    let live_addr = SocketAddr::new(t.live_addr(), PORT);
    let (_live_server, live_log) = hush_server(&t.live, live_addr, dir.path());
    let (_shadow_server, shadow_log) = hush_server(
        &t.shadow,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PORT),
        dir.path(),
    );
    // Framed as RESP inline commands: the replayer expects a reply to HUSH that never comes.
    let service = format!("port = {PORT}\nprotocol = \"redis\"");
    let mirrored = mirror(&t, &service, PORT, None, || {
        let _inside = t.client.enter().expect("enter the client");
        let mut conn = TcpStream::connect(live_addr).expect("connect to live");
        let mut reply = [0u8; 5];
        let mut ping = |conn: &mut TcpStream| {
            conn.write_all(b"PING\r\n").unwrap();
            conn.read_exact(&mut reply).unwrap();
            assert_eq!(&reply, b"+OK\r\n");
        };
        ping(&mut conn);
        conn.write_all(b"HUSH\r\n").unwrap();
        // The client's pace, 100 ms between requests (traffic, not a wait).
        thread::sleep(Duration::from_millis(100));
        for _ in 0..5 {
            ping(&mut conn);
            thread::sleep(Duration::from_millis(100));
        }
        drop(conn);
        let live = lines_executed(&live_log);
        assert_eq!((live.get("PING"), live.get("HUSH")), (6, 1), "live {live}");
        live
    });
    // The shadow waits out its 2 s response timeout once, then replays the rest.
    let live_executed = mirrored.live_executed.clone();
    let caught_up = wait_for(Duration::from_secs(6), || {
        lines_executed(&shadow_log) == live_executed
    });
    let lines = mirrored.shadow.stop();
    mirrored.live.stop();
    assert!(
        caught_up,
        "shadow executed {}, live {live_executed}: {}",
        lines_executed(&shadow_log),
        replay_summary(&lines)
    );
    assert_eq!(
        counter(&lines, "response_timeouts"),
        1,
        "{}",
        replay_summary(&lines)
    );
    assert_eq!(
        counter(&lines, "flows_completed"),
        1,
        "{}",
        replay_summary(&lines)
    );
}

#[test]
fn redis_pipelined_commands_are_executed_exactly() {
    if !privileged_or_skip("redis_pipelined_commands_are_executed_exactly") {
        return;
    }
    let t = Topology::new();
    let (live_redis, shadow_redis) = redis_pair(&t);
    // 16 commands a segment: each batch's replies come back together, and the next batch
    // waits for them, on live and on the shadow.
    let bench = RedisBenchmark {
        pipeline: 16,
        requests: 8000,
        ..redis_benchmark()
    };
    let lines = mirror(&t, &redis_service(), REDIS_PORT, None, || {
        bench.run(&t.client, live_redis.addr);
        redis_calls(&live_redis, &t.live)
    })
    .assert_executed_exactly(|| redis_calls(&shadow_redis, &t.shadow));
    assert_eq!(
        counter(&lines, "exchanges"),
        2 * 8000 + 2,
        "every reply timed: {}",
        replay_summary(&lines)
    );
}

/// One in this many mirror datagrams carrying client bytes is dropped in the loss tests.
const LOSS_ONE_IN: u32 = 200;

#[test]
fn redis_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows() {
    if !privileged_or_skip("redis_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows") {
        return;
    }
    let t = Topology::new();
    let (live_redis, shadow_redis) = redis_pair(&t);
    let bench = RedisBenchmark {
        requests: 8000,
        ..redis_benchmark()
    };
    // SET and GET only: each is one segment (no pipelining), so each lost datagram costs at
    // most one; redis-benchmark's two CONFIG GETs share a segment, whose loss costs both.
    let one_per_segment = ["set", "get"];
    let mirrored = mirror(
        &t,
        &redis_service(),
        REDIS_PORT,
        Some((LOSS_ONE_IN, Spare::Logins)),
        || {
            bench.run(&t.client, live_redis.addr);
            redis_calls_of(&live_redis, &t.live, &one_per_segment)
        },
    );
    // redis-benchmark sends as fast as it can; the shadow may trail live by a second or so.
    mirrored.assert_holes_skipped(Duration::from_secs(5), || {
        redis_calls_of(&shadow_redis, &t.shadow, &one_per_segment)
    });
}

const MEMCACHED_PORT: u16 = 11211;

/// Every `stats` figure the memcached tests compare: commands, and their outcomes.
const MEMCACHED_ALL: [&str; 5] = ["cmd_get", "cmd_set", "get_hits", "get_misses", "incr_hits"];
/// Commands alone: a lost SET turns a later GET's hit into a miss, so with loss only the
/// commands are one per datagram.
const MEMCACHED_COMMANDS: [&str; 2] = ["cmd_get", "cmd_set"];

/// What a memcached executed, from its own `stats`: the figures named in `kinds`.
fn memcached_executed(memcached: &Memcached, host: &Host, kinds: &[&str]) -> ExecutedStatements {
    let stats = memcached.stats(host);
    ExecutedStatements(
        kinds
            .iter()
            .map(|k| ((*k).to_owned(), stats.get(*k).copied().unwrap_or(0)))
            .collect(),
    )
}

/// 4 long-lived connections from the client to live's memcached, each 100 rounds paced 2 ms
/// apart of a SET and a GET of its key (each waiting for its reply), every tenth round also a
/// `noreply` SET (no response at all) and an INCR. Checks live executed them; returns what it
/// executed.
fn memcached_clients(t: &Topology, live: &Memcached, kinds: &[&str]) -> ExecutedStatements {
    const ROUNDS: usize = 100;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let conn = {
                let _inside = t.client.enter().expect("enter the client");
                TcpStream::connect(live.addr).expect("connect to live memcached")
            };
            thread::spawn(move || {
                let mut writer = conn.try_clone().expect("clone");
                let mut reader = BufReader::new(conn);
                let mut send = |bytes: String| writer.write_all(bytes.as_bytes()).expect("send");
                send(format!("set n{c} 0 0 1\r\n0\r\n"));
                assert_eq!(read_line(&mut reader), "STORED\r\n");
                for i in 0..ROUNDS {
                    send(format!("set k{c}_{i} 0 0 5\r\nhello\r\n"));
                    assert_eq!(read_line(&mut reader), "STORED\r\n");
                    send(format!("get k{c}_{i}\r\n"));
                    assert!(read_line(&mut reader).starts_with("VALUE"));
                    assert_eq!(read_line(&mut reader), "hello\r\n");
                    assert_eq!(read_line(&mut reader), "END\r\n");
                    if i % 10 == 0 {
                        send(format!("set q{c}_{i} 0 0 2 noreply\r\nhi\r\n"));
                        send(format!("incr n{c} 1\r\n"));
                        read_line(&mut reader);
                    }
                    thread::sleep(Duration::from_millis(2));
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a memcached client failed");
    }
    let executed = memcached_executed(live, &t.live, &MEMCACHED_ALL);
    assert_eq!(
        (
            executed.get("cmd_set"),
            executed.get("get_hits"),
            executed.get("incr_hits")
        ),
        (4 * 111, 4 * 100, 4 * 10),
        "live executed {executed}"
    );
    memcached_executed(live, &t.live, kinds)
}

fn memcached_pair(t: &Topology) -> (Memcached, Memcached) {
    (
        Memcached::start(&t.live, t.live_addr(), MEMCACHED_PORT),
        Memcached::start(&t.shadow, Ipv4Addr::LOCALHOST.into(), MEMCACHED_PORT),
    )
}

#[test]
fn memcached_through_the_opaque_fallback_is_executed_exactly_noreply_included() {
    if !privileged_or_skip(
        "memcached_through_the_opaque_fallback_is_executed_exactly_noreply_included",
    ) {
        return;
    }
    let t = Topology::new();
    let (live, shadow) = memcached_pair(&t);
    // No protocol configured: memcached's text protocol is nothing doppel frames, so the flows
    // are detected as opaque and replayed segment by segment at their original offsets.
    let service = format!("port = {MEMCACHED_PORT}");
    let lines = mirror(&t, &service, MEMCACHED_PORT, None, || {
        memcached_clients(&t, &live, &MEMCACHED_ALL)
    })
    .assert_executed_exactly(|| memcached_executed(&shadow, &t.shadow, &MEMCACHED_ALL));
    assert_eq!(
        counter(&lines, "response_timeouts"),
        0,
        "{}",
        replay_summary(&lines)
    );
    assert_eq!(
        counter(&lines, "flows_started"),
        4,
        "{}",
        replay_summary(&lines)
    );
}

#[test]
fn memcached_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows() {
    if !privileged_or_skip(
        "memcached_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows",
    ) {
        return;
    }
    let t = Topology::new();
    let (live, shadow) = memcached_pair(&t);
    let service = format!("port = {MEMCACHED_PORT}");
    // One in 50: about 18 of the ~900 data-carrying datagrams.
    let mirrored = mirror(
        &t,
        &service,
        MEMCACHED_PORT,
        Some((50, Spare::Logins)),
        || memcached_clients(&t, &live, &MEMCACHED_COMMANDS),
    );
    mirrored.assert_holes_skipped(Duration::from_secs(5), || {
        memcached_executed(&shadow, &t.shadow, &MEMCACHED_COMMANDS)
    });
}

#[test]
fn postgres_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows() {
    if !privileged_or_skip(
        "postgres_with_lost_mirror_datagrams_skips_the_holes_and_keeps_the_flows",
    ) {
        return;
    }
    let t = Topology::new();
    let (live_pg, shadow_pg) = postgres_pair(&t, &PostgresAuth::Trust);
    let run = Pgbench {
        clients: 4,
        length: seconds(5),
        rate: Some(500),
        select_only: true,
        ..Pgbench::default()
    };
    let mirrored = mirror(
        &t,
        &postgres_service(),
        PG_PORT,
        Some((LOSS_ONE_IN, Spare::Logins)),
        || pgbench_on_live(&t, &live_pg, &run),
    );
    // A simple-protocol Query per segment: each lost datagram costs at most one statement.
    mirrored.assert_holes_skipped(Duration::from_secs(3), || shadow_pg.executed());
}

#[test]
fn the_loss_injector_drops_only_mirrored_client_bytes() {
    if !privileged_or_skip("the_loss_injector_drops_only_mirrored_client_bytes") {
        return;
    }
    let t = Topology::new();
    let loss = MirrorLoss::install(&t.shadow, &t.shadow_link.b_iface, 1, Spare::Logins);
    let receiver = {
        let _inside = t.shadow.enter().expect("enter shadow");
        UdpSocket::bind((t.shadow_link.b_v4, 4789)).expect("bind 4789")
    };
    receiver
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let segment = SegmentBuilder {
        vni: VNI,
        client: SocketAddr::new(t.live_addr(), 40_000),
        service: SocketAddr::new(t.live_addr(), PG_PORT),
    };
    let (data, empty, startup) = (30u32, 20u32, 10u32);
    {
        let _inside = t.live.enter().expect("enter live");
        let sender = UdpSocket::bind((t.shadow_link.a_v4, 0)).expect("bind");
        let target = SocketAddr::new(t.shadow_link.b_v4.into(), 4789);
        for i in 0..data {
            sender
                .send_to(&segment.datagram(i * 8, 1, 0, b"Q\0\0\0\x08X;\0"), target)
                .expect("send");
        }
        for i in 0..empty {
            sender
                .send_to(&segment.datagram(i, 1, 0, b""), target)
                .expect("send");
        }
        // A StartupMessage begins with its length's high byte, 0: kept, so a flow's login is
        // never what the loss tests drop.
        for i in 0..startup {
            sender
                .send_to(
                    &segment.datagram(i, 1, 0, b"\0\0\0\x08\x04\xd2\x16\x2f"),
                    target,
                )
                .expect("send");
        }
        // Not VXLAN at all: passes, and marks the end.
        sender.send_to(b"end", target).expect("send");
    }
    let mut received = 0;
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = receiver
            .recv_from(&mut buf)
            .expect("the end marker arrives within 5 s");
        if &buf[..n] == b"end" {
            break;
        }
        received += 1;
    }
    assert_eq!(
        received,
        empty + startup,
        "only the data segments were dropped"
    );
    assert_eq!(loss.dropped(), u64::from(data), "each drop counted");
}

/// Drops about one in `one_in` of the mirror datagrams arriving on `iface` that carry client
/// bytes, and counts what it dropped, exactly.
///
/// This kernel has neither `act_gact` (so no `action drop` and no `random determ`) nor
/// `sch_netem`, nor nftables/iptables; it has `cls_bpf`, `act_mirred` and the `clsact` qdisc.
/// So the filter is a classic-BPF program on the ingress hook of `iface` (`tc` runs it after the
/// shadow's XDP admission program has passed the datagram, before the UDP socket gets it), and
/// "drop" is `mirred` redirecting the match to the egress of a veth whose peer is up but has no
/// address: the frame arrives there addressed to another MAC and IP throws it away
/// (`PACKET_OTHERHOST`). Classic BPF has no state, so "every Nth" is not expressible; it draws
/// a random number per datagram instead (`SKF_AD_RANDOM`), and the mirred action's packet count
/// says how many it took. eBPF would allow a counter, but loading one needs an object file or
/// raw `bpf(2)` calls, for the same result.
///
/// It matches only a VXLAN datagram (UDP 4789) whose inner IPv4 TCP segment has a payload not
/// starting with a zero byte: pure ACKs, SYNs and FINs pass (losing them makes no hole), and so
/// do PostgreSQL StartupMessages (their first byte is the high byte of a small length), so a
/// loss never costs a flow its login, only single requests.
struct MirrorLoss<'a> {
    host: &'a Host,
    iface: String,
}

impl<'a> MirrorLoss<'a> {
    const SINK: &'static str = "losssink0";
    const SINK_PEER: &'static str = "losssink1";

    fn install(host: &'a Host, iface: &str, one_in: u32, spare: Spare) -> Self {
        let run = |program: &str, args: &[&str]| {
            host.run(program, args)
                .unwrap_or_else(|e| panic!("loss injector: {e}"));
        };
        run(
            "ip",
            &[
                "link",
                "add",
                Self::SINK,
                "type",
                "veth",
                "peer",
                "name",
                Self::SINK_PEER,
            ],
        );
        for dev in [Self::SINK, Self::SINK_PEER] {
            host.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1")
                .expect("no IPv6 on the sink");
            run("ip", &["link", "set", dev, "up"]);
        }
        // The shadow agent may have added clsact already (for TC programs); either is fine.
        let _ = host.run("tc", &["qdisc", "add", "dev", iface, "clsact"]);
        let bytecode = loss_filter(one_in, spare);
        run(
            "tc",
            &[
                "filter",
                "add",
                "dev",
                iface,
                "ingress",
                "protocol",
                "ip",
                "pref",
                "1",
                "bpf",
                "bytecode",
                &bytecode,
                "action",
                "mirred",
                "egress",
                "redirect",
                "dev",
                Self::SINK,
            ],
        );
        Self {
            host,
            iface: iface.to_owned(),
        }
    }

    /// Datagrams dropped so far: the mirred action's packet count.
    fn dropped(&self) -> u64 {
        let out = self
            .host
            .run(
                "tc",
                &["-s", "-j", "filter", "show", "dev", &self.iface, "ingress"],
            )
            .expect("tc filter show");
        let filters: Value = serde_json::from_slice(&out.stdout).expect("tc prints JSON");
        filters
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|f| {
                f["options"]["actions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter(|a| a["kind"] == "mirred")
            .map(|a| a["stats"]["packets"].as_u64().expect("mirred packet count"))
            .sum()
    }
}

/// Client bytes a loss test never drops, besides those with a first payload byte of 0 (which
/// spares PostgreSQL StartupMessages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Spare {
    /// Nothing else.
    Logins,
    /// MySQL's login and prepares: segments whose first packet has a sequence id other than 0
    /// (the HandshakeResponse and the client's auth answers), COM_STMT_PREPAREs, whose loss
    /// would leave the session's later statement ids unknown, and the EXECUTEs that carry a
    /// statement's parameter types (a statement's first), without which the server refuses
    /// the later ones (in both cases the replayer skips those executes, by design).
    MysqlLoginsAndPrepares,
}

/// The classic BPF program of [`MirrorLoss`], in `tc`'s `bytecode` syntax
/// (`count,code jt jf k,…`). Offsets count from the outer Ethernet header (`cls_bpf` pushes it
/// back at ingress): outer IPv4 at 14, UDP after its `ihl`, VXLAN 8 bytes on, inner Ethernet 8
/// more, so the inner IPv4 header starts at `X + 44` with `X` the outer header length.
fn loss_filter(one_in: u32, spare: Spare) -> String {
    // Opcodes from linux/filter.h (classic BPF).
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const LD_W_ABS: u16 = 0x20;
    const LD_H_IND: u16 = 0x48;
    const LD_B_IND: u16 = 0x50;
    const LDX_B_MSH: u16 = 0xb1;
    const LD_MEM: u16 = 0x60;
    const LDX_MEM: u16 = 0x61;
    const ST: u16 = 0x02;
    const STX: u16 = 0x03;
    const ALU_AND_K: u16 = 0x54;
    const ALU_LSH_K: u16 = 0x64;
    const ALU_RSH_K: u16 = 0x74;
    const ALU_ADD_X: u16 = 0x0c;
    const ALU_SUB_X: u16 = 0x1c;
    const TAX: u16 = 0x07;
    const JEQ_K: u16 = 0x15;
    const JGT_K: u16 = 0x25;
    const RET_K: u16 = 0x06;
    /// `SKF_AD_OFF + SKF_AD_RANDOM`: loading it yields a fresh random `u32`.
    const AD_RANDOM: u32 = 0xffff_f000 + 56;

    /// What a conditional jump does: go on when the test holds, else let the datagram pass;
    /// or the reverse.
    enum Step {
        Op(u16, u32),
        ContinueIfEq(u32),
        PassIfEq(u32),
        PassIfGt(u32),
        /// Skips this many instructions unless the test holds.
        SkipUnlessEq(u32, u8),
    }
    use Step::{ContinueIfEq, Op, PassIfEq, PassIfGt, SkipUnlessEq};
    // One in `one_in` random numbers is at most this (all of them when `one_in` is 1).
    let threshold = u32::MAX / one_in.max(1);
    let mut steps = vec![
        Op(LD_H_ABS, 12),
        ContinueIfEq(0x0800), // outer IPv4
        Op(LD_B_ABS, 23),
        ContinueIfEq(17),  // UDP
        Op(LDX_B_MSH, 14), // X = outer IP header length
        Op(LD_H_IND, 16),
        ContinueIfEq(4789), // VXLAN
        Op(LD_H_IND, 42),
        ContinueIfEq(0x0800), // inner IPv4
        Op(LD_B_IND, 53),
        ContinueIfEq(6), // inner TCP
        Op(LD_H_IND, 46),
        Op(ST, 0), // M0 = inner total length
        Op(LD_B_IND, 44),
        Op(ALU_AND_K, 0x0f),
        Op(ALU_LSH_K, 2),
        Op(ST, 1), // M1 = inner IP header length
        Op(ALU_ADD_X, 0),
        Op(TAX, 0), // X = both IP header lengths
        Op(LD_B_IND, 56),
        Op(ALU_RSH_K, 4),
        Op(ALU_LSH_K, 2),
        Op(ST, 2), // M2 = TCP header length
        Op(ALU_ADD_X, 0),
        Op(TAX, 0),
        Op(STX, 3), // M3 = offset of the payload, less 44
        Op(LD_MEM, 0),
        Op(LDX_MEM, 1),
        Op(ALU_SUB_X, 0),
        Op(LDX_MEM, 2),
        Op(ALU_SUB_X, 0), // A = payload length
        PassIfEq(0),
        PassIfGt(0xffff), // lengths that underflowed: malformed, not ours to drop
        Op(LDX_MEM, 3),
        Op(LD_B_IND, 44),
        PassIfEq(0), // first payload byte 0: a PostgreSQL StartupMessage
    ];
    if spare == Spare::MysqlLoginsAndPrepares {
        steps.extend([
            Op(LD_B_IND, 47),
            ContinueIfEq(0), // a sequence id other than 0: login
            Op(LD_B_IND, 48),
            PassIfEq(0x16), // COM_STMT_PREPARE
            SkipUnlessEq(0x17, 2),
            Op(LD_B_IND, 59),
            PassIfEq(1), // COM_STMT_EXECUTE carrying types (a 1-byte NULL bitmap: <= 8 params)
        ]);
    }
    steps.extend([
        Op(LD_W_ABS, AD_RANDOM),
        PassIfGt(threshold),
        Op(RET_K, u32::MAX), // match: the default class, so the mirred action runs
        Op(RET_K, 0),        // no match: the datagram goes on
    ]);
    let pass = steps.len() - 1;
    let code: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            // Jumps are relative to the next instruction; only forward jumps exist.
            let to_pass = || u8::try_from(pass - i - 1).expect("short program");
            let (code, jt, jf, k) = match *step {
                Op(code, k) => (code, 0, 0, k),
                ContinueIfEq(k) => (JEQ_K, 0, to_pass(), k),
                PassIfEq(k) => (JEQ_K, to_pass(), 0, k),
                PassIfGt(k) => (JGT_K, to_pass(), 0, k),
                SkipUnlessEq(k, n) => (JEQ_K, 0, n, k),
            };
            format!("{code} {jt} {jf} {k}")
        })
        .collect();
    format!("{},{}", code.len(), code.join(","))
}
