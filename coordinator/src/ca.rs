//! The coordinator's own certificate authority: `doppel ca init | issue | revoke`.
//!
//! Everything lives under `STATE_DIR/ca/`: the CA certificate and key, the coordinator's server
//! certificate (issued by the CA at `init`, for the names the agents dial), an index of issued
//! agent certificates, and a CRL signed by the CA listing the revoked ones. The QUIC server trusts
//! only this CA for client certificates and checks the CRL on every handshake
//! ([`crate::net::tls`]); an agent is known by its certificate's common name.
//!
//! Keys are ECDSA P-256 (rcgen's default through `ring`, the one rustls crypto provider of the
//! workspace), written with mode 0600.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

/// File names under the CA directory.
pub const CA_CERT: &str = "ca.crt";
/// The CA's private key.
pub const CA_KEY: &str = "ca.key";
/// The coordinator's server certificate.
pub const SERVER_CERT: &str = "server.crt";
/// The coordinator's server key.
pub const SERVER_KEY: &str = "server.key";
/// The CRL listing revoked agent certificates.
pub const CRL: &str = "crl.pem";
/// The index of issued agent certificates.
pub const INDEX: &str = "index.json";

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {action} failed")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `init` found a CA already there.
    #[error("a CA already exists in {0}; refusing to overwrite it")]
    AlreadyInitialised(PathBuf),
    /// No CA has been created yet.
    #[error("no CA in {0}: run `doppel ca init` first")]
    NotInitialised(PathBuf),
    /// Certificate generation or signing failed.
    #[error("certificate operation failed")]
    Certificate(#[source] rcgen::Error),
    /// The index file is not valid.
    #[error("{path}: invalid CA index")]
    Index {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// An agent name that cannot be a certificate common name and a file name.
    #[error(
        "invalid agent name {0:?}: use 1-64 characters of [A-Za-z0-9._-], not starting with '.'"
    )]
    InvalidAgentName(String),
    /// `revoke` named an agent that has no unrevoked certificate.
    #[error("no unrevoked certificate issued to agent {0:?}")]
    UnknownAgent(String),
}

/// One issued agent certificate, as kept in the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    /// The agent's name (the certificate's common name).
    pub agent: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after_unix: i64,
    /// When it was revoked, Unix seconds.
    pub revoked_at_unix: Option<i64>,
}

/// Where an issued agent certificate was written.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    /// The agent's certificate (PEM).
    pub cert: PathBuf,
    /// The agent's private key (PEM, mode 0600).
    pub key: PathBuf,
    /// A copy of the CA certificate, which the agent uses to verify the coordinator.
    pub ca_cert: PathBuf,
    /// The serial number, lowercase hex.
    pub serial: String,
}

/// The CA directory of a state directory.
#[derive(Debug, Clone)]
pub struct CertificateAuthority {
    dir: PathBuf,
}

impl CertificateAuthority {
    /// The CA kept in `STATE_DIR/ca`.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("ca"),
        }
    }

    /// The CA directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of one of the CA's files.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the CA, the coordinator's server certificate for `server_names` (DNS names or IP
    /// addresses the agents dial) and an empty CRL.
    pub fn init(&self, server_names: &[String], now: OffsetDateTime) -> Result<(), CaError> {
        if self.path(CA_KEY).exists() {
            return Err(CaError::AlreadyInitialised(self.dir.clone()));
        }
        fs::create_dir_all(&self.dir).map_err(|source| CaError::Io {
            action: "create directory",
            path: self.dir.clone(),
            source,
        })?;
        let ca_key = KeyPair::generate().map_err(CaError::Certificate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "doppel coordinator CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(random_serial());
        params.key_identifier_method = KeyIdMethod::Sha256;
        let ca_cert = params.self_signed(&ca_key).map_err(CaError::Certificate)?;
        write_file(&self.path(CA_CERT), ca_cert.pem().as_bytes(), 0o644)?;
        write_file(&self.path(CA_KEY), ca_key.serialize_pem().as_bytes(), 0o600)?;
        let issuer = Issuer::new(params, ca_key);

        let server_key = KeyPair::generate().map_err(CaError::Certificate)?;
        let mut server =
            CertificateParams::new(server_names.to_vec()).map_err(CaError::Certificate)?;
        server.distinguished_name = rcgen::DistinguishedName::new();
        server
            .distinguished_name
            .push(DnType::CommonName, "doppel coordinator");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.not_before = now - Duration::hours(1);
        server.not_after = now + Duration::days(825);
        server.serial_number = Some(random_serial());
        server.use_authority_key_identifier_extension = true;
        let server_cert = server
            .signed_by(&server_key, &issuer)
            .map_err(CaError::Certificate)?;
        write_file(&self.path(SERVER_CERT), server_cert.pem().as_bytes(), 0o644)?;
        write_file(
            &self.path(SERVER_KEY),
            server_key.serialize_pem().as_bytes(),
            0o600,
        )?;
        self.write_index(&[])?;
        self.write_crl(&[], now)
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, CaError> {
        let key_path = self.path(CA_KEY);
        if !key_path.exists() {
            return Err(CaError::NotInitialised(self.dir.clone()));
        }
        let key = KeyPair::from_pem(&read_to_string(&key_path)?).map_err(CaError::Certificate)?;
        Issuer::from_ca_cert_pem(&read_to_string(&self.path(CA_CERT))?, key)
            .map_err(CaError::Certificate)
    }

    /// Issues a client certificate for agent `name`, valid for `days`, into `out_dir` as
    /// `NAME.crt`, `NAME.key` and `ca.crt`.
    pub fn issue(
        &self,
        name: &str,
        days: u32,
        out_dir: &Path,
        now: OffsetDateTime,
    ) -> Result<IssuedFiles, CaError> {
        validate_agent_name(name)?;
        let issuer = self.issuer()?;
        let key = KeyPair::generate().map_err(CaError::Certificate)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = now - Duration::hours(1);
        let not_after = now + Duration::days(i64::from(days));
        params.not_after = not_after;
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(CaError::Certificate)?;
        fs::create_dir_all(out_dir).map_err(|source| CaError::Io {
            action: "create directory",
            path: out_dir.to_owned(),
            source,
        })?;
        let files = IssuedFiles {
            cert: out_dir.join(format!("{name}.crt")),
            key: out_dir.join(format!("{name}.key")),
            ca_cert: out_dir.join(CA_CERT),
            serial: hex::encode(serial.to_bytes()),
        };
        write_file(&files.cert, cert.pem().as_bytes(), 0o644)?;
        write_file(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        if files.ca_cert != self.path(CA_CERT) {
            write_file(
                &files.ca_cert,
                read_to_string(&self.path(CA_CERT))?.as_bytes(),
                0o644,
            )?;
        }
        let mut index = self.index()?;
        index.push(IssuedCert {
            agent: name.to_owned(),
            serial: files.serial.clone(),
            not_after_unix: not_after.unix_timestamp(),
            revoked_at_unix: None,
        });
        self.write_index(&index)?;
        Ok(files)
    }

    /// Revokes every unrevoked certificate of agent `name` and rewrites the CRL. A running
    /// coordinator picks the new CRL up within a second and closes the agent's connections.
    pub fn revoke(&self, name: &str, now: OffsetDateTime) -> Result<Vec<IssuedCert>, CaError> {
        let mut index = self.index()?;
        let mut revoked = Vec::new();
        for cert in index
            .iter_mut()
            .filter(|c| c.agent == name && c.revoked_at_unix.is_none())
        {
            cert.revoked_at_unix = Some(now.unix_timestamp());
            revoked.push(cert.clone());
        }
        if revoked.is_empty() {
            return Err(CaError::UnknownAgent(name.to_owned()));
        }
        self.write_index(&index)?;
        self.write_crl(&index, now)?;
        Ok(revoked)
    }

    /// The issued certificates.
    pub fn index(&self) -> Result<Vec<IssuedCert>, CaError> {
        let path = self.path(INDEX);
        if !path.exists() {
            return Err(CaError::NotInitialised(self.dir.clone()));
        }
        serde_json::from_str(&read_to_string(&path)?)
            .map_err(|source| CaError::Index { path, source })
    }

    fn write_index(&self, index: &[IssuedCert]) -> Result<(), CaError> {
        let path = self.path(INDEX);
        let json = serde_json::to_vec_pretty(index).map_err(|source| CaError::Index {
            path: path.clone(),
            source,
        })?;
        write_file(&path, &json, 0o644)
    }

    fn write_crl(&self, index: &[IssuedCert], now: OffsetDateTime) -> Result<(), CaError> {
        let issuer = self.issuer()?;
        let revoked_certs = index
            .iter()
            .filter_map(|c| {
                let at = c.revoked_at_unix?;
                let serial = hex::decode(&c.serial).ok()?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&serial),
                    revocation_time: OffsetDateTime::from_unix_timestamp(at).unwrap_or(now),
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            // The coordinator does not enforce CRL expiry (it reads its own CRL), so this is
            // only what other verifiers would see.
            next_update: now + Duration::days(3650),
            crl_number: SerialNumber::from_slice(&now.unix_timestamp().to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&issuer).map_err(CaError::Certificate)?;
        let pem = crl.pem().map_err(CaError::Certificate)?;
        write_file(&self.path(CRL), pem.as_bytes(), 0o644)
    }
}

fn validate_agent_name(name: &str) -> Result<(), CaError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(CaError::InvalidAgentName(name.to_owned()))
    }
}

/// A random positive 127-bit serial (RFC 5280 4.1.2.2: positive, at most 20 octets).
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn read_to_string(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })
}

/// Writes a file atomically (temporary file, fsync, rename) with the given mode.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let io = |action, source| CaError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    file.write_all(bytes).map_err(|e| io("write", e))?;
    file.sync_all().map_err(|e| io("sync", e))?;
    fs::rename(&tmp, path).map_err(|e| io("rename", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_issue_and_revoke_keep_the_index_and_refuse_bad_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = CertificateAuthority::in_state_dir(dir.path());
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            ca.issue("a", 1, dir.path(), now),
            Err(CaError::NotInitialised(_))
        ));
        ca.init(&["localhost".into(), "127.0.0.1".into()], now)
            .expect("init");
        assert!(matches!(
            ca.init(&[], now),
            Err(CaError::AlreadyInitialised(_))
        ));
        let files = ca
            .issue("web-1", 30, &dir.path().join("out"), now)
            .expect("issue");
        assert!(files.key.exists() && files.cert.exists() && files.ca_cert.exists());
        assert!(matches!(
            ca.issue("../x", 30, dir.path(), now),
            Err(CaError::InvalidAgentName(_))
        ));
        let revoked = ca.revoke("web-1", now).expect("revoke");
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].serial, files.serial);
        assert!(matches!(
            ca.revoke("web-1", now),
            Err(CaError::UnknownAgent(_))
        ));
        let crl = fs::read_to_string(ca.path(CRL)).expect("crl");
        assert!(crl.contains("BEGIN X509 CRL"), "{crl}");
    }
}
