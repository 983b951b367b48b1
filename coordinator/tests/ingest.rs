//! The QUIC ingest server over real QUIC on 127.0.0.1, with real certificates and real SQLite.

use std::{path::Path, sync::Arc, time::Duration};

use doppel_common::wire::{
    AgentRole, DEFAULT_MAX_FRAME_LEN, Envelope, HANDSHAKE_VERSION, Hello, IntervalReport, Message,
    PROTOCOL_VERSION, ResourceUsage, read_envelope, write_envelope,
};
use doppel_coordinator::{
    ca::{CA_CERT, CertificateAuthority},
    net::{close_code, tls},
    serve::{Coordinator, ServeConfig},
    store::Store,
};
use time::OffsetDateTime;

struct Setup {
    dir: tempfile::TempDir,
    ca: CertificateAuthority,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::in_state_dir(dir.path());
    ca.init(&["localhost".into()], OffsetDateTime::now_utc())
        .expect("ca init");
    Setup { dir, ca }
}

impl Setup {
    fn issue(&self, name: &str) -> quinn::ClientConfig {
        let out = self.dir.path().join("agents");
        let files = self
            .ca
            .issue(name, 30, &out, OffsetDateTime::now_utc())
            .expect("issue");
        tls::client_config(&files.ca_cert, &files.cert, &files.key).expect("client config")
    }

    fn config(&self) -> ServeConfig {
        ServeConfig {
            state_dir: self.dir.path().to_owned(),
            quic_listen: "127.0.0.1:0".parse().expect("addr"),
            api_listen: "127.0.0.1:0".parse().expect("addr"),
            ..ServeConfig::default()
        }
    }
}

fn hello(min_version: u16, max_version: u16) -> Message {
    Message::Hello(Hello {
        min_version,
        max_version,
        agent_version: "test".into(),
        hostname: "h".into(),
        roles: vec![AgentRole::Live],
        next_report_seq: 0,
    })
}

fn report(seq: u64) -> Message {
    Message::Report(IntervalReport {
        seq,
        interval_start_unix_ms: 1_700_000_000_000 + seq * 1000,
        interval_ms: 1000,
        histograms: vec![],
        counters: vec![],
        host: ResourceUsage::default(),
        workload: None,
        patterns: vec![],
    })
}

struct Session {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _endpoint: quinn::Endpoint,
}

impl Session {
    async fn write(&mut self, message: Message) {
        write_envelope(
            &mut self.send,
            &Envelope::new(PROTOCOL_VERSION, message),
            DEFAULT_MAX_FRAME_LEN,
        )
        .await
        .expect("write");
    }

    async fn read(&mut self) -> Result<Option<Message>, String> {
        match tokio::time::timeout(
            Duration::from_secs(5),
            read_envelope(&mut self.recv, DEFAULT_MAX_FRAME_LEN),
        )
        .await
        {
            Ok(Ok(e)) => Ok(e.map(|e| e.message)),
            Ok(Err(e)) => Err(format!("{e:?}")),
            Err(_) => Err("timed out".into()),
        }
    }
}

/// Connects and sends `first`; errors when the handshake or the first exchange fails.
async fn open(
    addr: std::net::SocketAddr,
    client: quinn::ClientConfig,
    first: Message,
) -> Result<(Session, Option<Message>), String> {
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut session = Session {
        conn,
        send,
        recv,
        _endpoint: endpoint,
    };
    write_envelope(
        &mut session.send,
        &Envelope::new(HANDSHAKE_VERSION, first),
        DEFAULT_MAX_FRAME_LEN,
    )
    .await
    .map_err(|e| format!("{e:?}"))?;
    let answer = session.read().await?;
    Ok((session, answer))
}

fn without_client_cert(ca_cert: &Path) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in tls::load_certs(ca_cert).expect("ca") {
        roots.add(cert).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![tls::ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(config).expect("quic"),
    ))
}

#[tokio::test]
async fn clients_without_a_valid_certificate_are_refused() {
    let s = setup();
    let good = s.issue("agent-1");
    let revoked = s.issue("agent-2");
    s.ca.revoke("agent-2", OffsetDateTime::now_utc())
        .expect("revoke");
    let foreign = {
        let other = setup();
        other.issue("agent-1")
    };
    let coordinator = Coordinator::start(s.config()).await.expect("start");
    let addr = coordinator.quic_addr;

    let (_, answer) = open(addr, good, hello(1, PROTOCOL_VERSION))
        .await
        .expect("a certificate from our CA is accepted");
    assert!(
        matches!(&answer, Some(Message::Welcome(w)) if w.agent_name == "agent-1"),
        "{answer:?}"
    );
    for (what, client) in [
        ("revoked", revoked),
        ("from another CA", foreign),
        ("absent", without_client_cert(&s.ca.path(CA_CERT))),
    ] {
        let result = open(addr, client, hello(1, PROTOCOL_VERSION)).await;
        assert!(
            result.is_err(),
            "a certificate {what} must fail the handshake"
        );
    }
    coordinator.shutdown().await;
}

#[tokio::test]
async fn revoking_a_connected_agent_closes_its_connection() {
    let s = setup();
    let client = s.issue("agent-1");
    let coordinator = Coordinator::start(s.config()).await.expect("start");
    let (session, _) = open(
        coordinator.quic_addr,
        client.clone(),
        hello(1, PROTOCOL_VERSION),
    )
    .await
    .expect("connect");
    s.ca.revoke("agent-1", OffsetDateTime::now_utc())
        .expect("revoke");
    let closed = tokio::time::timeout(Duration::from_secs(5), session.conn.closed())
        .await
        .expect("closed within the CRL poll interval");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close_code::REVOKED.into()),
        "{closed:?}"
    );
    // The same client config: its TLS session cache must not let it resume past revocation.
    let again = open(coordinator.quic_addr, client, hello(1, PROTOCOL_VERSION)).await;
    assert!(
        again.is_err(),
        "and it cannot reconnect: {:?}",
        again.map(|(_, a)| a)
    );
    coordinator.shutdown().await;
}

#[tokio::test]
async fn an_agent_speaking_only_newer_versions_is_refused_cleanly() {
    let s = setup();
    let client = s.issue("agent-1");
    let coordinator = Coordinator::start(s.config()).await.expect("start");
    let (session, answer) = open(
        coordinator.quic_addr,
        client,
        hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 3),
    )
    .await
    .expect("the handshake itself succeeds");
    match answer {
        Some(Message::Refused(r)) => {
            assert_eq!(r.max_version, PROTOCOL_VERSION);
            assert!(
                r.reason.contains("no common protocol version"),
                "{}",
                r.reason
            );
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    let closed = tokio::time::timeout(Duration::from_secs(5), session.conn.closed())
        .await
        .expect("closed");
    assert!(
        matches!(&closed, quinn::ConnectionError::ApplicationClosed(c) if c.error_code == close_code::REFUSED.into()),
        "{closed:?}"
    );
    coordinator.shutdown().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection_with_a_reason() {
    let s = setup();
    let client = s.issue("agent-1");
    let coordinator = Coordinator::start(s.config()).await.expect("start");
    let (mut session, _) = open(coordinator.quic_addr, client, hello(1, PROTOCOL_VERSION))
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut session.send, &[0xff, 0xff, 0xff, 0xff, 0])
        .await
        .expect("write");
    let closed = tokio::time::timeout(Duration::from_secs(5), session.conn.closed())
        .await
        .expect("closed");
    match &closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close_code::PROTOCOL.into());
            let reason = String::from_utf8_lossy(&c.reason);
            assert!(reason.contains("exceeds"), "{reason}");
        }
        other => panic!("expected an application close, got {other:?}"),
    }
    coordinator.shutdown().await;
}

#[tokio::test]
async fn duplicates_are_acknowledged_but_stored_once() {
    let s = setup();
    let client = s.issue("agent-1");
    let coordinator = Coordinator::start(s.config()).await.expect("start");
    let (mut session, answer) = open(coordinator.quic_addr, client, hello(1, PROTOCOL_VERSION))
        .await
        .expect("connect");
    assert!(matches!(answer, Some(Message::Welcome(_))), "{answer:?}");
    for seq in [0, 1, 1, 0, 2] {
        session.write(report(seq)).await;
    }
    let mut acks = Vec::new();
    while acks.len() < 5 {
        match session.read().await.expect("read") {
            Some(Message::Ack(a)) => acks.push(a.seq),
            Some(Message::PolicyUpdate(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        acks,
        [0, 1, 1, 0, 2],
        "every report is acknowledged, in order"
    );
    let store = Store::open_in(s.dir.path()).expect("store");
    assert_eq!(store.report_seqs("agent-1").expect("seqs"), [0, 1, 2]);
    coordinator.shutdown().await;
}
