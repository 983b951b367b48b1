//! The QUIC connection to the coordinator: mutual TLS, handshake, sending spooled reports,
//! receiving acknowledgements and policy updates, reconnecting with backoff and jitter.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use doppel_common::wire::{
    AgentRole, DEFAULT_MAX_FRAME_LEN, Envelope, FrameIoError, HANDSHAKE_VERSION, Hello,
    MIN_PROTOCOL_VERSION, Message, PROTOCOL_VERSION, PolicyUpdate, read_envelope, write_envelope,
};
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::{ReportStats, spool::Spool};

/// ALPN protocol identifier of doppel's agent protocol.
pub const ALPN: &[u8] = b"doppel/1";

/// Where and how to reach the coordinator.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The coordinator's QUIC address.
    pub coordinator: SocketAddr,
    /// Name in the coordinator's certificate (`localhost` for a CA made with the defaults).
    pub server_name: String,
    /// The coordinator CA's certificate (PEM).
    pub ca_cert: PathBuf,
    /// This agent's certificate (PEM), issued by `doppel ca issue`.
    pub cert: PathBuf,
    /// This agent's key (PEM).
    pub key: PathBuf,
    /// Host name, for the operator's eyes.
    pub hostname: String,
    /// Roles this agent runs.
    pub roles: Vec<AgentRole>,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Largest reconnect delay.
    pub backoff_max: Duration,
    /// Reports sent and not yet acknowledged on one connection.
    pub max_in_flight: usize,
    /// Newest protocol version to offer (tests lower or raise it; normally [`PROTOCOL_VERSION`]).
    pub max_version: u16,
}

impl ClientConfig {
    /// Defaults for everything but the addresses and files.
    pub fn new(
        coordinator: SocketAddr,
        server_name: String,
        ca_cert: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    ) -> Self {
        Self {
            coordinator,
            server_name,
            ca_cert,
            cert,
            key,
            hostname: String::new(),
            roles: vec![AgentRole::Live],
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            max_in_flight: 64,
            max_version: PROTOCOL_VERSION,
        }
    }
}

/// Why a connection attempt or a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A certificate or key file is missing or invalid.
    #[error("{path}: cannot load PEM")]
    Pem {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the TLS configuration.
    #[error("invalid TLS configuration")]
    Tls(#[source] rustls::Error),
    /// The TLS configuration does not suit QUIC.
    #[error("TLS configuration unusable for QUIC")]
    Quic(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The local UDP socket could not be opened.
    #[error("cannot open the local QUIC endpoint")]
    Endpoint(#[source] std::io::Error),
    /// The connection could not be started.
    #[error("cannot connect")]
    Connect(#[source] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection lost")]
    Connection(#[source] quinn::ConnectionError),
    /// A frame could not be read or written.
    #[error("stream failed")]
    Frame(#[source] FrameIoError),
    /// The coordinator refused us.
    #[error("coordinator refused the agent: {reason} (it speaks {min_version}..={max_version})")]
    Refused {
        /// Its reason.
        reason: String,
        /// Oldest version it speaks.
        min_version: u16,
        /// Newest version it speaks.
        max_version: u16,
    },
    /// The coordinator broke the protocol.
    #[error("protocol violation by the coordinator: {0}")]
    Protocol(&'static str),
    /// The spool failed.
    #[error("spool failed")]
    Spool(#[source] super::SpoolError),
}

fn pem(path: &std::path::Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> ClientError + '_ {
    move |source| ClientError::Pem {
        path: path.to_owned(),
        source,
    }
}

/// Builds the QUIC client configuration: TLS 1.3 with `ring`, the coordinator verified against
/// its CA, our certificate presented.
pub fn quic_client_config(config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&config.ca_cert).map_err(pem(&config.ca_cert))? {
        roots
            .add(ca.map_err(pem(&config.ca_cert))?)
            .map_err(ClientError::Tls)?;
    }
    let certs = CertificateDer::pem_file_iter(&config.cert)
        .map_err(pem(&config.cert))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem(&config.cert))?;
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(pem(&config.key))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(ClientError::Tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(ClientError::Tls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(ClientError::Quic)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(5)));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// State shared between the connection loop and the handle.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) spool: Mutex<Spool>,
    /// A report was spooled.
    pub(super) new_report: Notify,
    /// A report was acknowledged (room in the spool and in the window).
    pub(super) acked: Notify,
    pub(super) policy: watch::Sender<Option<PolicyUpdate>>,
    pub(super) stats: ReportStats,
}

impl Shared {
    pub(super) fn spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.spool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reconnect delay: exponential, with "equal jitter" (half fixed, half random) so a fleet that
/// lost the coordinator together does not come back in lockstep.
#[derive(Debug)]
pub(super) struct Backoff {
    current: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Self {
            current: min,
            min,
            max,
        }
    }

    pub(super) fn reset(&mut self) {
        self.current = self.min;
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let half = self.current / 2;
        let jitter = half.mul_f64(rand::random::<f64>());
        self.current = (self.current * 2).min(self.max);
        half + jitter
    }
}

/// Connects, reconnecting forever, until `shutdown` turns true.
pub(super) async fn run(
    config: ClientConfig,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ClientError> {
    let client_config = quic_client_config(&config)?;
    let bind: SocketAddr = if config.coordinator.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(ClientError::Endpoint)?;
    endpoint.set_default_client_config(client_config);
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    loop {
        if *shutdown.borrow() {
            break;
        }
        let mut welcomed = false;
        let result = tokio::select! {
            r = connection(&endpoint, &config, &shared, &mut welcomed) => r,
            _ = shutdown.changed() => break,
        };
        shared.stats.connected.store(false, Ordering::Relaxed);
        if welcomed {
            backoff.reset();
        }
        let delay = match &result {
            Err(e @ ClientError::Refused { .. }) => {
                warn!(error = %e, "refused by the coordinator; retrying at the longest interval");
                config.backoff_max
            }
            Err(e) => {
                warn!(error = %error_chain(e), "coordinator connection failed");
                backoff.next_delay()
            }
            Ok(()) => backoff.next_delay(),
        };
        shared.stats.reconnects.fetch_add(1, Ordering::Relaxed);
        debug!(?delay, "reconnecting after");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => break,
        }
    }
    endpoint.close(0u32.into(), b"agent shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

async fn connection(
    endpoint: &quinn::Endpoint,
    config: &ClientConfig,
    shared: &Shared,
    welcomed: &mut bool,
) -> Result<(), ClientError> {
    let conn = endpoint
        .connect(config.coordinator, &config.server_name)
        .map_err(ClientError::Connect)?
        .await
        .map_err(ClientError::Connection)?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(ClientError::Connection)?;
    let hello = Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: config.max_version,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: config.hostname.clone(),
        roles: config.roles.clone(),
        next_report_seq: shared.spool().next_seq(),
    };
    write_envelope(
        &mut send,
        &Envelope::new(HANDSHAKE_VERSION, Message::Hello(hello)),
        DEFAULT_MAX_FRAME_LEN,
    )
    .await
    .map_err(ClientError::Frame)?;
    let version = match read_envelope(&mut recv, DEFAULT_MAX_FRAME_LEN)
        .await
        .map_err(ClientError::Frame)?
    {
        Some(Envelope {
            message: Message::Welcome(w),
            ..
        }) => {
            info!(version = w.version, name = %w.agent_name, coordinator = %w.coordinator_version, "connected to the coordinator");
            w.version
        }
        Some(Envelope {
            message: Message::Refused(r),
            ..
        }) => {
            return Err(ClientError::Refused {
                reason: r.reason,
                min_version: r.min_version,
                max_version: r.max_version,
            });
        }
        Some(_) => return Err(ClientError::Protocol("expected Welcome or Refused")),
        None => return Err(ClientError::Protocol("stream closed during the handshake")),
    };
    *welcomed = true;
    shared.stats.connected.store(true, Ordering::Relaxed);

    // Reports sent on this connection and not yet acknowledged. Everything unacknowledged is
    // sent again on every new connection; the coordinator recognises the duplicates.
    let in_flight = Mutex::new(BTreeSet::<u64>::new());
    let sender = async {
        let mut last_sent: Option<u64> = None;
        loop {
            let notified = shared.new_report.notified();
            let acked = shared.acked.notified();
            let room = config
                .max_in_flight
                .saturating_sub(in_flight.lock().unwrap_or_else(|e| e.into_inner()).len());
            let batch: Vec<u64> = shared.spool().pending_after(last_sent).take(room).collect();
            if batch.is_empty() {
                tokio::select! {
                    () = notified => {}
                    () = acked => {}
                }
                continue;
            }
            for seq in batch {
                let report = shared.spool().read(seq);
                let report = match report {
                    Ok(r) => r,
                    Err(e) => {
                        // Never silent: the file is kept aside and the count exported.
                        let aside = shared.spool().quarantine(seq);
                        shared.stats.corrupt.fetch_add(1, Ordering::Relaxed);
                        warn!(seq, error = %error_chain(&e), ?aside, "unreadable spooled report moved aside");
                        // It left the spool: room for another, and `acknowledged(seq)` returns.
                        shared.acked.notify_waiters();
                        last_sent = Some(seq);
                        continue;
                    }
                };
                in_flight
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(seq);
                write_envelope(
                    &mut send,
                    &Envelope::new(version, Message::Report(report)),
                    DEFAULT_MAX_FRAME_LEN,
                )
                .await
                .map_err(ClientError::Frame)?;
                shared.stats.sent.fetch_add(1, Ordering::Relaxed);
                last_sent = Some(seq);
            }
        }
    };
    let receiver = async {
        loop {
            match read_envelope(&mut recv, DEFAULT_MAX_FRAME_LEN)
                .await
                .map_err(ClientError::Frame)?
            {
                Some(Envelope {
                    message: Message::Ack(ack),
                    ..
                }) => {
                    in_flight
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&ack.seq);
                    if shared.spool().ack(ack.seq).map_err(ClientError::Spool)? {
                        shared.stats.acked.fetch_add(1, Ordering::Relaxed);
                    }
                    shared.acked.notify_waiters();
                }
                Some(Envelope {
                    message: Message::PolicyUpdate(update),
                    ..
                }) => {
                    let newer = shared
                        .policy
                        .borrow()
                        .as_ref()
                        .is_none_or(|current| update.revision > current.revision);
                    if newer {
                        info!(revision = update.revision, workload = %update.policy.workload, "policy update");
                        shared.policy.send_replace(Some(update));
                    }
                }
                Some(_) => return Err(ClientError::Protocol("unexpected message")),
                None => return Err(ClientError::Protocol("coordinator closed the stream")),
            }
        }
    };
    let result: Result<(), ClientError> = tokio::select! {
        r = sender => r,
        r = receiver => r,
        e = conn.closed() => Err(ClientError::Connection(e)),
    };
    conn.close(0u32.into(), b"");
    result
}
