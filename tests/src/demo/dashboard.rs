//! The dashboard during the demo. The coordinator runs inside the lab's network namespace, so
//! its API (and the dashboard at `/ui`) answers only there; this forwards a port on the host's
//! loopback to it, so a browser on the machine can watch the demo as it runs.
//!
//! Each connection accepted on the host is joined to a new connection made inside the lab
//! namespace (a socket keeps the namespace it was made in, so only the connecting thread enters
//! it), and bytes are copied both ways until either side closes. A failed connection is logged
//! and closes that connection only; the forwarder never fails the demo.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

/// The port tried first on the host: the API's default, so the URL is the usual one.
const PREFERRED_PORT: u16 = 7480;

/// A running forwarder; it stops accepting when dropped.
#[derive(Debug)]
pub struct Forwarder {
    /// Where it listens on the host.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    /// Listens on the host's 127.0.0.1 (port 7480, else any) and forwards to `target` inside
    /// the network namespace `netns`.
    pub fn start(netns: &str, target: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", PREFERRED_PORT))
            .or_else(|_| TcpListener::bind(("127.0.0.1", 0)))?;
        let addr = listener.local_addr()?;
        // Polled, so the accept loop sees `stop` without a connection arriving.
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let netns = netns.to_owned();
        thread::Builder::new()
            .name("dashboard-forward".into())
            .spawn(move || {
                // This thread lives in the lab namespace: the connections it makes are there.
                if let Err(e) = super::loadgen::enter_netns(&netns) {
                    eprintln!("dashboard forwarder: cannot enter {netns}: {e}");
                    return;
                }
                accept_loop(&listener, target, &stopped);
            })?;
        Ok(Self { addr, stop })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                if let Err(e) = forward(client, target) {
                    eprintln!("dashboard forwarder: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => eprintln!("dashboard forwarder: accept: {e}"),
        }
    }
}

/// Joins `client` to a new connection to `target` (made here, in the lab namespace).
fn forward(client: TcpStream, target: SocketAddr) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let upstream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    let pairs = [
        (client.try_clone()?, upstream.try_clone()?),
        (upstream, client),
    ];
    for (mut from, mut to) in pairs {
        thread::Builder::new()
            .name("dashboard-copy".into())
            .spawn(move || {
                let _ = io::copy(&mut from, &mut to);
                let _ = to.shutdown(Shutdown::Write);
            })?;
    }
    Ok(())
}
