//! TLS for the QUIC endpoint: the coordinator's server identity, and client-certificate
//! verification against its own CA and CRL.
//!
//! rustls's webpki verifier does the work (chain to the CA, validity period, client-auth usage,
//! revocation against the CRL). [`AgentVerifier`] only adds reloading: `doppel ca revoke`
//! rewrites the CRL file, and the server swaps in a verifier built from it without a restart.

use std::{
    collections::HashSet,
    path::Path,
    sync::{Arc, RwLock},
};

use rustls::{
    DistinguishedName, RootCertStore, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    crypto::CryptoProvider,
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime, pem::PemObject as _,
};

use crate::ca::{CA_CERT, CRL, CertificateAuthority, SERVER_CERT, SERVER_KEY};

/// ALPN protocol identifier of doppel's agent protocol.
pub const ALPN: &[u8] = b"doppel/1";

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or invalid.
    #[error("{path}: cannot load PEM")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the configuration.
    #[error("invalid TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// The client verifier could not be built (bad CA or CRL).
    #[error("cannot build the client-certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The CRL could not be parsed to find its serial numbers.
    #[error("{0}: invalid CRL")]
    Crl(std::path::PathBuf),
    /// The TLS configuration does not suit QUIC.
    #[error("TLS configuration unusable for QUIC")]
    Quic(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The one crypto provider of the workspace.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn pem_error(path: &Path) -> impl FnOnce(rustls_pki_types::pem::Error) -> TlsError + '_ {
    move |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    }
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_file_iter(path)
        .map_err(pem_error(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error(path))
}

/// Reads the private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(pem_error(path))
}

/// Who an agent is, from its verified certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentIdentity {
    /// The certificate's common name.
    pub name: String,
    /// The certificate's serial number, lowercase hex without leading zero bytes.
    pub serial: String,
}

impl AgentIdentity {
    /// Reads the identity from the end-entity certificate of a verified connection.
    pub fn from_certificate(cert: &CertificateDer<'_>) -> Option<Self> {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
        let name = parsed
            .subject()
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_owned();
        Some(Self {
            name,
            serial: serial_hex(parsed.raw_serial()),
        })
    }
}

fn serial_hex(raw: &[u8]) -> String {
    let first = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    hex::encode(&raw[first..])
}

/// Verifies agent certificates against the CA and the current CRL, which can be swapped at run
/// time.
#[derive(Debug)]
pub struct AgentVerifier {
    roots: Arc<RootCertStore>,
    hints: Vec<DistinguishedName>,
    provider: Arc<CryptoProvider>,
    inner: RwLock<Arc<dyn ClientCertVerifier>>,
}

impl AgentVerifier {
    /// A verifier trusting `ca_certs` and refusing what `crl` revokes.
    pub fn new(
        ca_certs: Vec<CertificateDer<'static>>,
        crl: Option<CertificateRevocationListDer<'static>>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in ca_certs {
            roots.add(cert).map_err(TlsError::Rustls)?;
        }
        let hints = roots.subjects();
        let roots = Arc::new(roots);
        let provider = provider();
        let inner = build_webpki(&roots, &provider, crl)?;
        Ok(Self {
            roots,
            hints,
            provider,
            inner: RwLock::new(inner),
        })
    }

    /// Replaces the CRL in force. Handshakes from now on are checked against it.
    pub fn set_crl(&self, crl: CertificateRevocationListDer<'static>) -> Result<(), TlsError> {
        let verifier = build_webpki(&self.roots, &self.provider, Some(crl))?;
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = verifier;
        Ok(())
    }

    fn current(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::clone(&self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }
}

fn build_webpki(
    roots: &Arc<RootCertStore>,
    provider: &Arc<CryptoProvider>,
    crl: Option<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::clone(roots), Arc::clone(provider));
    if let Some(crl) = crl {
        // Our CA issues end-entity certificates directly, so the CRL covers exactly them.
        builder = builder.with_crls([crl]).only_check_end_entity_revocation();
    }
    builder.build().map_err(TlsError::Verifier)
}

impl ClientCertVerifier for AgentVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current().supported_verify_schemes()
    }
}

/// Reads the CRL file of the CA and the serials it revokes.
pub fn load_crl(
    ca: &CertificateAuthority,
) -> Result<(CertificateRevocationListDer<'static>, HashSet<String>), TlsError> {
    let path = ca.path(CRL);
    let crl = CertificateRevocationListDer::from_pem_file(&path).map_err(pem_error(&path))?;
    let (_, parsed) = x509_parser::parse_x509_crl(&crl).map_err(|_| TlsError::Crl(path.clone()))?;
    let serials = parsed
        .iter_revoked_certificates()
        .map(|r| serial_hex(r.raw_serial()))
        .collect();
    Ok((crl, serials))
}

/// The QUIC server configuration: the coordinator's certificate, TLS 1.3, agents' client
/// certificates mandatory and checked by `verifier`.
pub fn server_config(
    ca: &CertificateAuthority,
    verifier: Arc<AgentVerifier>,
) -> Result<quinn::ServerConfig, TlsError> {
    let certs = load_certs(&ca.path(SERVER_CERT))?;
    let key = load_key(&ca.path(SERVER_KEY))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(TlsError::Rustls)?;
    // No session resumption: a resumed session skips client-certificate verification, so an
    // agent revoked after its first handshake could otherwise come back on its ticket.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(TlsError::Quic)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        // Milliseconds; agents send keep-alives well inside it.
        .max_idle_timeout(Some(quinn::VarInt::from_u32(30_000).into()))
        .max_concurrent_bidi_streams(4u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// A QUIC client configuration for an agent (used by tests and the ingest benchmark; the agent
/// has its own in `doppel-agent`).
pub fn client_config(
    ca_cert: &Path,
    cert: &Path,
    key: &Path,
) -> Result<quinn::ClientConfig, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in load_certs(ca_cert)? {
        roots.add(ca).map_err(TlsError::Rustls)?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(TlsError::Rustls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(TlsError::Quic)?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// The CA certificates of a CA directory.
pub fn ca_certs(ca: &CertificateAuthority) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    load_certs(&ca.path(CA_CERT))
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;

    #[test]
    fn a_crl_swapped_in_at_run_time_revokes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::in_state_dir(dir.path());
        let now = OffsetDateTime::now_utc();
        ca.init(&["localhost".into()], now).expect("init");
        let files = ca.issue("a", 1, dir.path(), now).expect("issue");
        let cert = load_certs(&files.cert).expect("cert").remove(0);
        let (crl, _) = load_crl(&ca).expect("crl");
        let verifier = AgentVerifier::new(ca_certs(&ca).expect("ca"), Some(crl)).expect("verifier");
        let unix_now = UnixTime::now();
        verifier
            .verify_client_cert(&cert, &[], unix_now)
            .expect("valid before revocation");
        ca.revoke("a", now).expect("revoke");
        let (crl, serials) = load_crl(&ca).expect("crl");
        assert!(
            serials.contains(&files.serial),
            "{serials:?} {}",
            files.serial
        );
        verifier.set_crl(crl).expect("set");
        let err = verifier
            .verify_client_cert(&cert, &[], unix_now)
            .expect_err("revoked");
        assert!(format!("{err:?}").contains("Revoked"), "{err:?}");
    }
}
