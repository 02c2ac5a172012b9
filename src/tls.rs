//! rustls configurations, built from files: outbound (the relay client) and
//! inbound (STARTTLS and smtps, from `[tls]` cert and key, re-read on SIGHUP
//! without dropping sessions: new handshakes get the new certificate).
//!
//! Owns the trust anchors of the relay client — Mozilla's roots compiled in
//! (`webpki-roots`, so a router with no CA bundle can still verify its
//! smarthost), the system bundle when there is one, and an optional private
//! CA file from `relay.ca_file` — and the "encrypt but don't verify" config
//! used for opportunistic STARTTLS to MX hosts (Postfix's `may` level, RFC
//! 7435). Every config uses the ring provider explicitly; nothing relies on
//! a process-wide default provider. It does not open connections: that is
//! `relay/transfer.rs`.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, ProtocolVersion, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject;

/// Where Debian, Ubuntu, Alpine and OpenWrt (ca-bundle) keep the system's
/// trust anchors. Optional: webpki-roots covers a box without it.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug)]
pub enum TlsError {
    /// A CA file could not be read or parsed.
    CaFile {
        path: PathBuf,
        reason: String,
    },
    /// A CA file holds no certificate.
    EmptyCaFile(PathBuf),
    /// The server certificate chain or key file.
    ServerFile {
        path: PathBuf,
        reason: String,
    },
    Rustls(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::CaFile { path, reason } => {
                write!(f, "CA file {}: {reason}", path.display())
            }
            TlsError::EmptyCaFile(path) => {
                write!(f, "CA file {}: no PEM certificate in it", path.display())
            }
            TlsError::ServerFile { path, reason } => write!(f, "{}: {reason}", path.display()),
            TlsError::Rustls(e) => write!(f, "TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

impl From<rustls::Error> for TlsError {
    fn from(e: rustls::Error) -> TlsError {
        TlsError::Rustls(e)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The verifying client config: webpki-roots, plus the system bundle if
/// present (certificates in it that do not parse are skipped), plus
/// `extra_ca_file` (an error naming the file if unreadable or empty).
pub fn client_config(extra_ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Ok(certs) = read_pem_certs(Path::new(SYSTEM_CA_BUNDLE)) {
        let (added, skipped) = roots.add_parsable_certificates(certs);
        log::debug!("tls system_bundle={SYSTEM_CA_BUNDLE} added={added} skipped={skipped}");
    }
    if let Some(path) = extra_ca_file {
        add_ca_file(&mut roots, path)?;
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Checks that a CA file holds at least one certificate that parses (at
/// start, so a broken file is reported then, not at the first delivery).
pub fn check_ca_file(path: &Path) -> Result<(), TlsError> {
    add_ca_file(&mut RootCertStore::empty(), path)
}

/// Adds every certificate of a PEM CA file; an error names the file, and a
/// file with none is an error too.
fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), TlsError> {
    let certs = read_pem_certs(path).map_err(|reason| TlsError::CaFile {
        path: path.to_owned(),
        reason,
    })?;
    if certs.is_empty() {
        return Err(TlsError::EmptyCaFile(path.to_owned()));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| TlsError::CaFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Every certificate in a PEM file.
fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not valid PEM: {e}"))
}

/// The opportunistic client config: encrypts, accepts any certificate, but
/// still checks the handshake signatures, so the session is at least bound
/// to the key the server presented. Never used when credentials are sent
/// or when the policy requires verification.
pub fn insecure_client_config() -> Arc<ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(AcceptAnyCert(provider.clone()));
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        // The ring provider supports both safe default versions.
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug)]
struct AcceptAnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384", for logs and `Received:` lines.
pub fn describe(conn: &rustls::CommonState) -> String {
    let version = match conn.protocol_version() {
        Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".to_owned(),
        Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".to_owned(),
        Some(other) => format!("{other:?}"),
        None => "TLS".to_owned(),
    };
    match conn.negotiated_cipher_suite() {
        Some(suite) => format!("{version} {:?}", suite.suite()),
        None => version,
    }
}

/// An io::Error from a TLS stream, as a one-line reason ("invalid peer
/// certificate: NotValidForName").
pub fn io_reason(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ca_file_is_named() {
        let err = client_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(
            err.to_string().starts_with("CA file /nonexistent/ca.pem: "),
            "{err}"
        );
    }

    #[test]
    fn empty_ca_file_is_an_error() {
        let path =
            std::env::temp_dir().join(format!("postling-empty-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = client_config(Some(&path)).unwrap_err();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(err, TlsError::EmptyCaFile(_)), "{err}");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn configs_build_without_a_default_provider() {
        assert!(client_config(None).is_ok());
        let _ = insecure_client_config();
    }
}

/// The inbound certificate and key, swappable at run time.
#[derive(Debug)]
pub struct ServerCerts {
    cert: PathBuf,
    key: PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl ServerCerts {
    /// Loads `cert` (PEM chain, leaf first) and `key` (PEM private key).
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<ServerCerts>, TlsError> {
        let current = load_certified_key(cert, key)?;
        Ok(Arc::new(ServerCerts {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: std::sync::RwLock::new(current),
        }))
    }

    /// Re-reads both files; on error the old certificate stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load_certified_key(&self.cert, &self.key)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for ServerCerts {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        // A writer only swaps an Arc: a poisoned lock still holds a valid one.
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

fn load_certified_key(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let file_error = |path: &Path, reason: String| TlsError::ServerFile {
        path: path.to_path_buf(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_error(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_error(cert, "no PEM certificate in it".into()));
    }
    let der = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| file_error(key, format!("no usable PEM private key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| file_error(key, e.to_string()))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| file_error(key, format!("does not match the certificate: {e}")))?;
    Ok(Arc::new(certified))
}

/// The inbound config: TLS 1.2 and 1.3 with the ring provider's safe
/// defaults, no client certificates, the certificate from `certs`.
pub fn server_config(certs: Arc<ServerCerts>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    Ok(Arc::new(config))
}

/// The subject's common name and the expiry ("2027-02-20 12:00:00 UTC") of
/// a DER certificate, for `postling check`. A small DER walk over the fixed
/// start of an X.509 TBSCertificate (RFC 5280 4.1); None if it is not one.
pub fn cert_summary(der: &[u8]) -> Option<(String, String)> {
    let (_, cert, _) = der_tlv(der)?;
    let (_, tbs, _) = der_tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, after) = der_tlv(rest)?;
    if tag == 0xa0 {
        rest = after; // [0] version
    }
    let (_, _, rest) = der_tlv(rest)?; // serialNumber
    let (_, _, rest) = der_tlv(rest)?; // signature algorithm
    let (_, _, rest) = der_tlv(rest)?; // issuer
    let (_, validity, rest) = der_tlv(rest)?;
    let (_, _, validity) = der_tlv(validity)?; // notBefore
    let (time_tag, not_after, _) = der_tlv(validity)?;
    let (_, subject, _) = der_tlv(rest)?;
    Some((
        common_name(subject).unwrap_or_else(|| "(none)".into()),
        der_time(time_tag, not_after)?,
    ))
}

/// One DER tag-length-value: (tag, contents, the bytes after it).
fn der_tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)? as usize;
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = input.get(2..2 + n)?;
        (
            bytes.iter().fold(0usize, |a, &b| a << 8 | b as usize),
            2 + n,
        )
    };
    let end = header.checked_add(len)?;
    Some((tag, input.get(header..end)?, input.get(end..)?))
}

/// The CN (OID 2.5.4.3) of a Name.
fn common_name(mut name: &[u8]) -> Option<String> {
    const CN: &[u8] = &[0x55, 0x04, 0x03];
    while !name.is_empty() {
        let (_, set, rest) = der_tlv(name)?;
        name = rest;
        let (_, attr, _) = der_tlv(set)?;
        let (_, oid, value) = der_tlv(attr)?;
        if oid == CN {
            let (_, text, _) = der_tlv(value)?;
            return Some(String::from_utf8_lossy(text).into_owned());
        }
    }
    None
}

/// UTCTime (YYMMDDHHMMSSZ) or GeneralizedTime (YYYYMMDDHHMMSSZ).
fn der_time(tag: u8, t: &[u8]) -> Option<String> {
    let t = std::str::from_utf8(t).ok()?;
    let full = match tag {
        0x17 if t.len() >= 12 => {
            let yy: u32 = t[..2].parse().ok()?;
            format!("{}{}", if yy < 50 { 2000 + yy } else { 1900 + yy }, &t[2..])
        }
        0x18 if t.len() >= 14 => t.to_string(),
        _ => return None,
    };
    let d = |a: usize, b: usize| full.get(a..b);
    Some(format!(
        "{}-{}-{} {}:{}:{} UTC",
        d(0, 4)?,
        d(4, 6)?,
        d(6, 8)?,
        d(8, 10)?,
        d(10, 12)?,
        d(12, 14)?
    ))
}
