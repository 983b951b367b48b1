//! Real servers from Debian packages as workloads inside testbed hosts, each with the server's
//! own record of what it executed: nginx with an access log that records exactly what it served,
//! redis-server whose `INFO commandstats` counts calls per command, and PostgreSQL ([`postgres`])
//! whose `pg_stat_statements` counts statements; with their stock load generators
//! (`redis-benchmark`, `pgbench`) run from a client host; memcached, whose `stats` count what it
//! executed; and a gRPC server and client ([`grpc`])
//! whose server logs every call it executed.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use crate::testbed::{Host, Process};

pub mod grpc;
pub mod mariadb;
pub mod postgres;

pub use grpc::GrpcServer;

pub use postgres::{
    ExecutedStatements, Pgbench, PgbenchLength, PgbenchReport, Postgres, PostgresAuth,
    PostgresLogin, QueryMode,
};

/// Waits until `addr` accepts connections from inside `host`.
pub fn wait_listening(host: &Host, addr: SocketAddr, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = {
            let _inside = host.enter().expect("enter host");
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        };
        if up {
            return;
        }
        assert!(Instant::now() < deadline, "{what} did not start on {addr}");
        thread::sleep(Duration::from_millis(30));
    }
}

/// Starts `command` (a server, its output discarded) inside `host` and waits until `addr`
/// accepts connections; `what` names it in failures.
pub fn start_listening(
    host: &Host,
    mut command: std::process::Command,
    addr: SocketAddr,
    what: &str,
) -> Process {
    command.stdout(Stdio::null()).stderr(Stdio::null());
    let process = host
        .spawn(command)
        .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
    wait_listening(host, addr, what);
    process
}

/// Debian's nginx echo module (`libnginx-mod-http-echo`, which `cargo xtask setup` installs).
const ECHO_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_echo_module.so";

/// nginx answering `200 ok` to every method and path, logging `METHOD URI` per request, and
/// the bytes it sent for each request (headers and body) in a second log. Paths under `/slow/`
/// answer after [`Nginx::SLOW_MS`] (the echo module's non-blocking `echo_sleep`): a costly
/// pattern, by the server's own clock.
#[derive(Debug)]
pub struct Nginx {
    _process: Process,
    dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Nginx {
    /// How long nginx takes to answer a path under `/slow/`, milliseconds.
    pub const SLOW_MS: u64 = 20;

    /// Starts nginx inside `host` on `addr:port`, speaking HTTP/1.x.
    pub fn start(host: &Host, addr: IpAddr, port: u16) -> Self {
        Self::start_with(host, addr, port, "")
    }

    /// Starts nginx inside `host` on `addr:port`, speaking HTTP/2 with prior knowledge (h2c).
    /// Besides `200 ok` everywhere, `/fail` answers 503 and `/big` a 64 KiB body, so responses
    /// span many DATA frames.
    pub fn start_h2c(host: &Host, addr: IpAddr, port: u16) -> Self {
        Self::start_with(host, addr, port, " http2")
    }

    fn start_with(host: &Host, addr: IpAddr, port: u16, listen_options: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "doppel-nginx-{}-{}-{port}",
            std::process::id(),
            host.netns()
        ));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        let listen = SocketAddr::new(addr, port);
        let conf = format!(
            "load_module {ECHO_MODULE};\n\
             worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/logs/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n log_format doppel '$request_method $request_uri';\n\
             access_log {d}/access.log doppel;\n log_format doppel_bytes '$bytes_sent';\n\
             access_log {d}/bytes.log doppel_bytes;\n client_body_temp_path {d};\n proxy_temp_path {d};\n\
             fastcgi_temp_path {d};\n uwsgi_temp_path {d};\n scgi_temp_path {d};\n\
             keepalive_requests 100000;\n\
             server {{ listen {listen}{listen_options};\n location / {{ return 200 \"doppel nginx ok\\n\"; }}\n\
             location = /fail {{ return 503; }}\n location = /big {{ alias {d}/big.txt; }}\n\
             location /slow/ {{ echo_sleep {slow}; echo \"doppel nginx slow\"; }} }}\n}}\n",
            d = dir.display(),
            slow = Self::SLOW_MS as f64 / 1000.0,
        );
        let _ = std::fs::remove_file(dir.join("access.log"));
        let _ = std::fs::remove_file(dir.join("bytes.log"));
        std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
        std::fs::write(dir.join("big.txt"), vec![b'x'; 64 << 10]).expect("big.txt");
        let mut command = host.command("nginx");
        command
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"));
        Self {
            _process: start_listening(host, command, listen, "nginx"),
            dir,
            addr: listen,
        }
    }

    /// Every `METHOD URI` served so far, in order.
    pub fn access_log(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The access log once it holds at least `requests` lines (up to 5 s). nginx writes a
    /// request's line after sending its response, so a client that has its last response may
    /// read the log a moment before the line is there.
    pub fn access_log_of(&self, requests: usize) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.access_log();
            if log.len() >= requests || Instant::now() >= deadline {
                return log;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Bytes nginx sent to its clients so far (`$bytes_sent` summed over every request it
    /// logged): what a client on its connections received, to the byte.
    pub fn bytes_sent(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("bytes.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse::<u64>().expect("$bytes_sent is a number"))
            .sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// memcached (text protocol), whose own `stats` count what it executed: a protocol doppel has
/// no framing for, replayed by the opaque fallback.
#[derive(Debug)]
pub struct Memcached {
    _process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Memcached {
    /// Starts memcached inside `host` on `addr:port` (TCP only, 64 MiB).
    pub fn start(host: &Host, addr: IpAddr, port: u16) -> Self {
        let mut command = host.command("memcached");
        command.args(["-u", "nobody", "-m", "64", "-U", "0"]).args([
            "-l",
            &addr.to_string(),
            "-p",
            &port.to_string(),
        ]);
        let addr = SocketAddr::new(addr, port);
        Self {
            _process: start_listening(host, command, addr, "memcached"),
            addr,
        }
    }

    /// The server's own counts of what it executed (`cmd_get`, `cmd_set`, `get_hits`,
    /// `incr_hits`, …), asked with `stats` from inside `host`.
    pub fn stats(&self, host: &Host) -> BTreeMap<String, u64> {
        let _inside = host.enter().expect("enter host");
        let mut conn = TcpStream::connect(self.addr).expect("connect to memcached");
        conn.write_all(b"stats\r\n").expect("stats");
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.ends_with("END\r\n") {
            let n = conn.read(&mut buf).expect("stats reply");
            assert!(n > 0, "memcached closed during stats");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        text.lines()
            .filter_map(|l| {
                let mut words = l.strip_prefix("STAT ")?.split(' ');
                let name = words.next()?;
                let value = words.next()?.parse().ok()?;
                Some((name.to_owned(), value))
            })
            .collect()
    }
}

/// redis-server without persistence.
#[derive(Debug)]
pub struct Redis {
    _process: Process,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Redis {
    /// Starts redis-server inside `host` on `addr:port`.
    pub fn start(host: &Host, addr: IpAddr, port: u16) -> Self {
        let mut command = host.command("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", &addr.to_string()])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(["--dir", std::env::temp_dir().to_str().expect("utf-8")]);
        let addr = SocketAddr::new(addr, port);
        Self {
            _process: start_listening(host, command, addr, "redis-server"),
            addr,
        }
    }

    /// Calls per command (`set`, `get`, …) from `INFO commandstats`, asked from inside `host`.
    pub fn command_calls(&self, host: &Host) -> BTreeMap<String, u64> {
        let out = host
            .run(
                "redis-cli",
                &[
                    "-h",
                    &self.addr.ip().to_string(),
                    "-p",
                    &self.addr.port().to_string(),
                    "INFO",
                    "commandstats",
                ],
            )
            .expect("redis-cli INFO");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
                let calls = rest
                    .strip_prefix("calls=")?
                    .split(',')
                    .next()?
                    .parse()
                    .ok()?;
                Some((name.to_owned(), calls))
            })
            .collect()
    }
}

/// A `redis-benchmark` run: `clients` long-lived connections (keep-alive, no pipelining) per
/// test, `requests` requests per test, for each of `tests` (`set`, `get`, …) in turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisBenchmark {
    /// `-c`: connections, each opened once per test and kept for all its requests.
    pub clients: u32,
    /// `-n`: requests per test, over all connections.
    pub requests: u32,
    /// `-t`: the tests, run one after the other (`redis-benchmark` names them in lower case).
    pub tests: Vec<String>,
    /// `-P`: commands pipelined per connection (1: each waits for the previous reply).
    pub pipeline: u32,
}

impl RedisBenchmark {
    /// Runs `redis-benchmark` inside `from` against `server` and waits for it. Panics when it
    /// fails. Besides the tests' commands it sends `CONFIG GET save` and `CONFIG GET
    /// appendonly` on a connection of its own first (`config|get` in `INFO commandstats`);
    /// compare per command, not in total.
    pub fn run(&self, from: &Host, server: SocketAddr) {
        let out = from
            .run(
                "redis-benchmark",
                &[
                    "-h",
                    &server.ip().to_string(),
                    "-p",
                    &server.port().to_string(),
                    "-c",
                    &self.clients.to_string(),
                    "-n",
                    &self.requests.to_string(),
                    "-t",
                    &self.tests.join(","),
                    "-k",
                    "1",
                    "-P",
                    &self.pipeline.to_string(),
                    "-q",
                ],
            )
            .unwrap_or_else(|e| panic!("redis-benchmark against {server}: {e}"));
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("rror"),
            "redis-benchmark reported errors: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}

/// Sends RESP commands on one connection, each after the previous reply, and returns the client
/// port. Replies are read until they end in CRLF (every command used here has a one-line or
/// small bulk reply).
pub fn redis_flow(server: SocketAddr, commands: &[&[&str]]) -> u16 {
    let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let port = conn.local_addr().expect("local").port();
    for command in commands {
        let mut wire = format!("*{}\r\n", command.len());
        for arg in *command {
            wire.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        conn.write_all(wire.as_bytes()).expect("send command");
        let mut reply = Vec::new();
        let mut chunk = [0u8; 512];
        loop {
            let n = conn.read(&mut chunk).expect("reply");
            assert!(n > 0, "redis closed the connection");
            reply.extend_from_slice(&chunk[..n]);
            let lines = reply.windows(2).filter(|w| w == b"\r\n").count();
            let bulk = reply.first() == Some(&b'$') && !reply.starts_with(b"$-1");
            if reply.ends_with(b"\r\n") && (!bulk || lines >= 2) {
                break;
            }
        }
        // Think time, as a real client has: the exchanges are separate on the wire.
        thread::sleep(Duration::from_millis(2));
    }
    port
}
