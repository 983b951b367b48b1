//! The QUIC ingest server: agents connect with mutual TLS ([`tls`]), shake hands, stream their
//! reports, and receive acknowledgements and policy updates.
//!
//! One connection carries one bidirectional stream, opened by the agent, on which frames from
//! `doppel_common::wire` travel both ways. The agent sends `Hello` and then `Report`s; the
//! coordinator answers `Welcome` (or `Refused`, then closes), sends the agent's current policy at
//! once and again whenever it changes, and an `Ack` for each report once its transaction has
//! committed. Anything else — a malformed or oversized frame, an unexpected message — closes the
//! connection with an application error code and a logged reason; the agent's spool keeps
//! whatever was not acknowledged.

pub mod tls;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use doppel_common::wire::{
    Envelope, FrameIoError, HANDSHAKE_VERSION, Message, PolicyUpdate, read_envelope, write_envelope,
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::{
    answer_hello,
    policy::{WorkloadSpec, agent_policy},
    store::{CheckedReport, Store, ingest::IngestHandle},
};
use tls::AgentIdentity;

/// Application close codes, so an agent's log says why it was disconnected.
pub mod close_code {
    /// Orderly shutdown of the coordinator.
    pub const SHUTDOWN: u32 = 0;
    /// The agent broke the protocol (malformed, oversized or unexpected frame).
    pub const PROTOCOL: u32 = 1;
    /// No common protocol version.
    pub const REFUSED: u32 = 2;
    /// The store failed; reports stay in the agent's spool until it reconnects.
    pub const STORE_UNAVAILABLE: u32 = 3;
    /// The agent's certificate was revoked.
    pub const REVOKED: u32 = 4;
    /// A newer connection of the same agent replaced this one.
    pub const REPLACED: u32 = 5;
}

/// How long an agent has to open its stream and say `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Reports of one connection waiting for their commit before the connection stops reading.
const MAX_IN_FLIGHT: usize = 256;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The UDP socket could not be bound.
    #[error("cannot bind the QUIC endpoint on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What every agent must apply: the workloads at one policy revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySnapshot {
    /// Policy revision.
    pub revision: u64,
    /// Every workload.
    pub workloads: Vec<WorkloadSpec>,
    /// The learned mirror plans, by workload (see [`crate::mirror`]).
    pub mirror_plans: BTreeMap<String, doppel_engine::mirror::MirrorPlan>,
}

impl PolicySnapshot {
    /// The store's policy as it stands: revision, workloads and mirror plans.
    pub fn load(store: &Store) -> Result<Self, crate::store::StoreError> {
        Ok(Self {
            revision: store.policy_revision()?,
            workloads: store.workloads()?,
            mirror_plans: store
                .mirror_plans()?
                .into_iter()
                .filter_map(|(w, body)| Some((w, serde_json::from_value(body).ok()?)))
                .collect(),
        })
    }

    /// Publishes the store's policy unless a newer revision is already out, and returns the
    /// store's revision. The one way policy reaches agents: the API, the Shadow Instance
    /// Manager, learned mirroring and act mode publish from their own store connections, and a
    /// slower publisher must not replace a newer snapshot with its older one.
    pub fn publish(
        policy: &watch::Sender<Arc<Self>>,
        store: &Store,
    ) -> Result<u64, crate::store::StoreError> {
        let snapshot = Self::load(store)?;
        let revision = snapshot.revision;
        policy.send_if_modified(|current| {
            if current.revision < snapshot.revision {
                *current = Arc::new(snapshot);
                true
            } else {
                false
            }
        });
        Ok(revision)
    }

    /// The update for one agent.
    pub fn update_for(&self, agent: &str) -> PolicyUpdate {
        PolicyUpdate {
            revision: self.revision,
            // A new seed per revision re-draws the sampling; the same seed for every agent of a
            // revision keeps live and shadows agreeing on which flows are sampled.
            policy: agent_policy(&self.workloads, agent, self.revision, &self.mirror_plans),
        }
    }
}

/// Counters the server keeps for `/metrics`.
#[derive(Debug, Default)]
pub struct NetStats {
    /// TLS/QUIC handshakes that failed (unknown, expired or revoked certificates among them).
    pub handshake_failures: AtomicU64,
    /// Connections closed for a protocol violation.
    pub protocol_errors: AtomicU64,
    /// Agents refused for protocol version.
    pub refused: AtomicU64,
    /// Policy updates sent.
    pub policy_updates: AtomicU64,
}

#[derive(Debug)]
struct Session {
    id: u64,
    serial: String,
    conn: quinn::Connection,
}

/// The agents connected now.
#[derive(Debug, Default)]
pub struct Hub {
    sessions: Mutex<HashMap<String, Session>>,
    next_id: AtomicU64,
    /// Counters.
    pub stats: NetStats,
}

impl Hub {
    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Names of the connected agents.
    pub fn connected(&self) -> Vec<String> {
        let mut names: Vec<_> = self.sessions().keys().cloned().collect();
        names.sort();
        names
    }

    fn register(&self, name: &str, serial: &str, conn: quinn::Connection) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let old = self.sessions().insert(
            name.to_owned(),
            Session {
                id,
                serial: serial.to_owned(),
                conn,
            },
        );
        if let Some(old) = old {
            info!(agent = name, "a new connection replaces the previous one");
            old.conn
                .close(close_code::REPLACED.into(), b"replaced by a new connection");
        }
        id
    }

    fn unregister(&self, name: &str, id: u64) {
        let mut sessions = self.sessions();
        if sessions.get(name).is_some_and(|s| s.id == id) {
            sessions.remove(name);
        }
    }

    /// Closes the connections whose certificate serial is in `revoked`.
    pub fn close_revoked(&self, revoked: &HashSet<String>) {
        for (name, session) in self.sessions().iter() {
            if revoked.contains(&session.serial) {
                warn!(agent = %name, serial = %session.serial, "certificate revoked; closing");
                session
                    .conn
                    .close(close_code::REVOKED.into(), b"certificate revoked");
            }
        }
    }

    /// Closes every connection (shutdown).
    pub fn close_all(&self) {
        for session in self.sessions().values() {
            session
                .conn
                .close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
        }
    }
}

/// What connections share.
#[derive(Debug)]
pub struct ServerContext {
    /// Where reports go.
    pub ingest: IngestHandle,
    /// A store connection for connection bookkeeping.
    pub store: Arc<Mutex<Store>>,
    /// The policy in force.
    pub policy: watch::Receiver<Arc<PolicySnapshot>>,
    /// Connected agents.
    pub hub: Arc<Hub>,
    /// Largest frame accepted.
    pub max_frame_len: usize,
    /// The coordinator's clock.
    pub clock: crate::clock::Clock,
}

/// The bound QUIC endpoint.
#[derive(Debug)]
pub struct IngestServer {
    endpoint: quinn::Endpoint,
}

impl IngestServer {
    /// Binds the endpoint.
    pub fn bind(addr: SocketAddr, config: quinn::ServerConfig) -> Result<Self, NetError> {
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|source| NetError::Bind { addr, source })?;
        Ok(Self { endpoint })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, std::io::Error> {
        self.endpoint.local_addr()
    }

    /// Accepts connections until `shutdown` turns true, then closes them all and waits briefly
    /// for the close to reach the agents.
    pub async fn run(self, ctx: Arc<ServerContext>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let ctx = Arc::clone(&ctx);
                    tokio::spawn(handle_incoming(incoming, ctx));
                }
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        ctx.hub.close_all();
        self.endpoint
            .close(close_code::SHUTDOWN.into(), b"coordinator shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

async fn handle_incoming(incoming: quinn::Incoming, ctx: Arc<ServerContext>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            ctx.hub
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            warn!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let identity = conn
        .peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().and_then(AgentIdentity::from_certificate));
    let Some(identity) = identity else {
        // The verifier made a client certificate mandatory, so this is a certificate without a
        // usable common name.
        warn!(%remote, "client certificate has no common name; closing");
        conn.close(
            close_code::PROTOCOL.into(),
            b"certificate has no common name",
        );
        return;
    };
    let span = info_span!("agent", name = %identity.name, %remote);
    session(conn, identity, ctx).instrument(span).await;
}

async fn with_store<T: Send + 'static>(
    ctx: &ServerContext,
    f: impl FnOnce(&mut Store) -> T + Send + 'static,
) -> Option<T> {
    let store = Arc::clone(&ctx.store);
    tokio::task::spawn_blocking(move || f(&mut store.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .ok()
}

fn protocol_error(conn: &quinn::Connection, ctx: &ServerContext, reason: &str) {
    ctx.hub
        .stats
        .protocol_errors
        .fetch_add(1, Ordering::Relaxed);
    warn!(reason, "closing connection: protocol error");
    conn.close(close_code::PROTOCOL.into(), reason.as_bytes());
}

fn frame_error_reason(e: &FrameIoError) -> String {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    reason
}

async fn session(conn: quinn::Connection, identity: AgentIdentity, ctx: Arc<ServerContext>) {
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before its stream opened");
            return;
        }
        Err(_) => {
            protocol_error(&conn, &ctx, "no stream opened in time");
            return;
        }
    };
    let hello = match tokio::time::timeout(
        HELLO_TIMEOUT,
        read_envelope(&mut recv, ctx.max_frame_len),
    )
    .await
    {
        Ok(Ok(Some(Envelope {
            message: Message::Hello(hello),
            ..
        }))) => hello,
        Ok(Ok(Some(other))) => {
            protocol_error(
                &conn,
                &ctx,
                &format!("expected Hello, got {:?}", kind(&other.message)),
            );
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            protocol_error(&conn, &ctx, &frame_error_reason(&e));
            return;
        }
        Err(_) => {
            protocol_error(&conn, &ctx, "no Hello in time");
            return;
        }
    };
    let answer = answer_hello(&hello, &identity.name);
    let version = match &answer {
        Message::Welcome(w) => w.version,
        Message::Refused(r) => {
            ctx.hub.stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(
                agent_min = hello.min_version,
                agent_max = hello.max_version,
                reason = %r.reason,
                "refusing agent"
            );
            let envelope = Envelope::new(HANDSHAKE_VERSION, answer.clone());
            if write_envelope(&mut send, &envelope, ctx.max_frame_len)
                .await
                .is_ok()
            {
                let _ = send.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            }
            conn.close(close_code::REFUSED.into(), b"no common protocol version");
            return;
        }
        _ => return,
    };
    if let Err(e) = write_envelope(
        &mut send,
        &Envelope::new(version, answer),
        ctx.max_frame_len,
    )
    .await
    {
        debug!(error = %e, "could not send Welcome");
        return;
    }
    let name: Arc<str> = Arc::from(identity.name.as_str());
    let next_report_seq = hello.next_report_seq;
    {
        let (name, serial, hello) = (name.clone(), identity.serial.clone(), hello.clone());
        let now = ctx.clock.now_ms();
        let recorded = with_store(&ctx, move |s| {
            s.agent_connected(&name, &hello, &serial, now)
        })
        .await;
        match recorded {
            Some(Err(e)) => {
                warn!(error = %doppel_common::error_chain(&e), "could not record the connection");
            }
            // An agent's spool numbers its reports upwards for ever, even across a wiped spool
            // (it restarts from the clock), so its next number is above everything stored. If
            // not, reports numbered up to `last_seq` would be acknowledged as duplicates of
            // older ones without being stored: say so rather than lose them silently.
            Some(Ok(Some(last_seq))) if next_report_seq <= last_seq => {
                warn!(
                    next_report_seq,
                    last_seq,
                    "the agent's report numbering went backwards (spool reset by an agent \
                     numbering from 0, or while its clock was behind); its reports numbered up \
                     to last_seq will be taken for duplicates"
                );
            }
            _ => {}
        }
    }
    let session_id = ctx.hub.register(&name, &identity.serial, conn.clone());
    info!(
        version,
        agent_version = %hello.agent_version,
        hostname = %hello.hostname,
        next_report_seq = hello.next_report_seq,
        "agent connected"
    );

    // Writer: the only task writing to the send stream.
    let (out_tx, mut out_rx) = mpsc::channel::<Message>(MAX_IN_FLIGHT + 8);
    let max_frame_len = ctx.max_frame_len;
    let writer = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            let envelope = Envelope::new(version, message);
            if let Err(e) = write_envelope(&mut send, &envelope, max_frame_len).await {
                debug!(error = %e, "send stream closed");
                break;
            }
        }
    });

    // Policy: the current one at once, then every change.
    let mut policy_rx = ctx.policy.clone();
    let policy_tx = out_tx.clone();
    let policy_name = name.clone();
    let hub = Arc::clone(&ctx.hub);
    let policy = tokio::spawn(
        async move {
            loop {
                let update = policy_rx.borrow_and_update().update_for(&policy_name);
                debug!(revision = update.revision, "sending policy");
                if policy_tx.send(Message::PolicyUpdate(update)).await.is_err() {
                    break;
                }
                hub.stats.policy_updates.fetch_add(1, Ordering::Relaxed);
                if policy_rx.changed().await.is_err() {
                    break;
                }
            }
        }
        .in_current_span(),
    );

    // Acker: acknowledges reports in order once durable.
    let (ack_tx, mut ack_rx) =
        mpsc::channel::<(u64, crate::store::ingest::PendingIngest)>(MAX_IN_FLIGHT);
    let ack_conn = conn.clone();
    let acker = tokio::spawn(
        async move {
            while let Some((seq, pending)) = ack_rx.recv().await {
                match pending.await {
                    Ok(Ok(_)) => {
                        if out_tx
                            .send(Message::Ack(doppel_common::wire::Ack { seq }))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(seq, error = %doppel_common::error_chain(&*e), "report not stored; closing so the agent retries later");
                        ack_conn.close(
                            close_code::STORE_UNAVAILABLE.into(),
                            b"store unavailable; retry later",
                        );
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        .in_current_span(),
    );

    loop {
        match read_envelope(&mut recv, ctx.max_frame_len).await {
            Ok(Some(Envelope {
                message: Message::Report(report),
                ..
            })) => {
                let seq = report.seq;
                let checked = CheckedReport::check(report);
                let pending = match ctx.ingest.submit(name.clone(), checked).await {
                    Ok(p) => p,
                    Err(e) => {
                        warn!(error = %e, "ingest unavailable; closing");
                        conn.close(close_code::STORE_UNAVAILABLE.into(), b"store unavailable");
                        break;
                    }
                };
                if ack_tx.send((seq, pending)).await.is_err() {
                    break;
                }
            }
            Ok(Some(other)) => {
                protocol_error(
                    &conn,
                    &ctx,
                    &format!("unexpected {} from an agent", kind(&other.message)),
                );
                break;
            }
            Ok(None) => {
                debug!("agent finished its stream");
                break;
            }
            Err(FrameIoError::Io(e)) => {
                debug!(error = %e, "stream ended");
                break;
            }
            Err(e) => {
                protocol_error(&conn, &ctx, &frame_error_reason(&e));
                break;
            }
        }
    }
    drop(ack_tx);
    // Let the reports already read be acknowledged before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), acker).await;
    policy.abort();
    writer.abort();
    ctx.hub.unregister(&name, session_id);
    let disconnected = name.clone();
    let now = ctx.clock.now_ms();
    let _ = with_store(&ctx, move |s| s.agent_disconnected(&disconnected, now)).await;
    info!("agent disconnected");
}

fn kind(message: &Message) -> &'static str {
    match message {
        Message::Hello(_) => "Hello",
        Message::Welcome(_) => "Welcome",
        Message::Refused(_) => "Refused",
        Message::Report(_) => "Report",
        Message::Ack(_) => "Ack",
        Message::PolicyUpdate(_) => "PolicyUpdate",
    }
}

/// Polls the CA's CRL file and, when it changes, swaps it into `verifier` and closes the
/// connections of the certificates it revokes. Runs until `shutdown`.
pub async fn watch_crl(
    ca: crate::ca::CertificateAuthority,
    verifier: Arc<tls::AgentVerifier>,
    hub: Arc<Hub>,
    mut shutdown: watch::Receiver<bool>,
) {
    let path = ca.path(crate::ca::CRL);
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match tls::load_crl(&ca) {
            Ok((crl, serials)) => match verifier.set_crl(crl) {
                Ok(()) => {
                    info!(revoked = serials.len(), "CRL reloaded");
                    hub.close_revoked(&serials);
                }
                Err(e) => warn!(error = %e, "new CRL refused; keeping the previous one"),
            },
            Err(e) => warn!(error = %e, "cannot read the CRL; keeping the previous one"),
        }
    }
}
