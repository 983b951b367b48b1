//! A real gRPC server and client (Debian's `python3-grpcio`, the reference C-core
//! implementation) as an HTTP/2 workload: one unary method over one long-lived connection,
//! several calls in flight at once as concurrent streams, some of them answered with a
//! server-side failure (INTERNAL) and some with a client-side one (NOT_FOUND). The server
//! appends the first word of every request it executed to its own log, which is what the
//! tests compare between live and shadow.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use super::{ExecutedStatements, start_listening};
use crate::testbed::{Host, Process};

const SERVER: &str = include_str!("grpc/server.py");
const CLIENT: &str = include_str!("grpc/client.py");
/// Debian's interpreter, which sees `python3-grpcio` (a `python3` earlier on PATH may not).
const PYTHON: &str = "/usr/bin/python3";

/// The gRPC test server.
#[derive(Debug)]
pub struct GrpcServer {
    _process: Process,
    dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl GrpcServer {
    /// Starts the server inside `host` on `addr:port`.
    pub fn start(host: &Host, addr: IpAddr, port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "doppel-grpc-{}-{}-{port}",
            std::process::id(),
            host.netns()
        ));
        std::fs::create_dir_all(&dir).expect("grpc dir");
        std::fs::write(dir.join("server.py"), SERVER).expect("server.py");
        std::fs::write(dir.join("client.py"), CLIENT).expect("client.py");
        let _ = std::fs::remove_file(dir.join("calls.log"));
        let listen = SocketAddr::new(addr, port);
        let mut command = host.command(PYTHON);
        command
            .arg(dir.join("server.py"))
            .arg(listen.to_string())
            .arg(dir.join("calls.log"));
        Self {
            _process: start_listening(host, command, listen, "the gRPC server"),
            dir,
            addr: listen,
        }
    }

    /// Calls executed so far, per kind (`get`, `put`, `fail`, `missing`).
    pub fn executed(&self) -> ExecutedStatements {
        let mut calls = BTreeMap::new();
        for kind in std::fs::read_to_string(self.dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
        {
            *calls.entry(kind.to_owned()).or_insert(0) += 1;
        }
        ExecutedStatements(calls)
    }

    /// Runs the test client from `host` against this server: `calls` calls, `concurrency` at a
    /// time, `rate` batches a second. Returns the status codes the client got, per name.
    pub fn run_client(
        &self,
        host: &Host,
        calls: u32,
        rate: u32,
        concurrency: u32,
    ) -> BTreeMap<String, u64> {
        let output = host
            .command(PYTHON)
            .arg(self.dir.join("client.py"))
            .arg(self.addr.to_string())
            .arg(calls.to_string())
            .arg(rate.to_string())
            .arg(concurrency.to_string())
            .output()
            .expect("run the gRPC client");
        assert!(
            output.status.success(),
            "the gRPC client failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("the client prints its status codes")
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
