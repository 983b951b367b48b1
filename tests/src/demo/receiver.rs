//! The demo's webhook receiver: a small HTTP server on the coordinator's loopback that checks
//! each delivery's `X-Doppel-Signature` and keeps the recommendations it accepted, as a
//! customer's endpoint would.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

/// One accepted delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The `Idempotency-Key` header.
    pub idempotency_key: String,
    /// The recommendation.
    pub body: serde_json::Value,
}

/// What the receiver has seen.
#[derive(Debug, Default)]
struct Seen {
    accepted: Vec<Delivery>,
    bad_signatures: usize,
}

/// A running receiver (the listener thread ends with the process).
#[derive(Debug, Clone)]
pub struct WebhookReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
}

impl WebhookReceiver {
    /// Serves on `listener`, verifying signatures with `secret`.
    pub fn start(listener: TcpListener, secret: String) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let shared = Arc::clone(&seen);
        thread::Builder::new()
            .name("webhook-receiver".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    if let Err(e) = handle(stream, &secret, &shared) {
                        eprintln!("webhook receiver: {e}");
                    }
                }
            })?;
        Ok(Self { addr, seen })
    }

    /// Deliveries accepted so far.
    pub fn accepted(&self) -> Vec<Delivery> {
        self.seen.lock().expect("lock").accepted.clone()
    }

    /// Deliveries refused for a wrong signature.
    pub fn bad_signatures(&self) -> usize {
        self.seen.lock().expect("lock").bad_signatures
    }
}

fn handle(stream: TcpStream, secret: &str, seen: &Mutex<Seen>) -> anyhow::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut length = 0usize;
    let (mut signature, mut key) = (String::new(), String::new());
    let mut line = String::new();
    reader.read_line(&mut line)?; // request line
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.parse()?,
            "x-doppel-signature" => value.clone_into(&mut signature),
            "idempotency-key" => value.clone_into(&mut key),
            _ => {}
        }
    }
    anyhow::ensure!(length <= 1 << 20, "body of {length} bytes refused");
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let status = if signature == doppel_coordinator::webhook::sign(secret, &body) {
        let body = serde_json::from_slice(&body)?;
        seen.lock().expect("lock").accepted.push(Delivery {
            idempotency_key: key,
            body,
        });
        "200 OK"
    } else {
        seen.lock().expect("lock").bad_signatures += 1;
        "401 Unauthorized"
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    Ok(())
}
