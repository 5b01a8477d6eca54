//! HTTPS on the listener: the certificate in force, its reload, and the
//! client's name under mutual TLS.
//!
//! The server's pair sits behind a resolver that every handshake asks, so
//! a reload swaps one `Arc` and open connections, which already hold their
//! session keys, carry on untouched. A pair that fails to load leaves the
//! old one in force. ALPN offers HTTP/2 and HTTP/1.1; the connection is
//! served by the protocol the client picked.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI8, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// Why a certificate, key or client CA could not be used. Each names the
/// file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read or holds no PEM item of the kind needed.
    #[error("{what} {path}: {reason}")]
    File {
        /// "certificate", "key" or "client CA".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The key is not the certificate's, or rustls refused the pair.
    #[error("certificate {cert} and key {key}: {reason}")]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

/// Where the listener's TLS material lives.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificates that client certificates must chain to; `None`
    /// means no client certificate is asked for.
    pub client_ca: Option<PathBuf>,
}

/// The listener's TLS: the acceptor handshakes use, and the pair behind it.
pub struct Tls {
    acceptor: TlsAcceptor,
    pair: Arc<CurrentPair>,
    files: TlsFiles,
    /// -1 before any reload, then 1 or 0: whether the last one succeeded.
    last_reload: AtomicI8,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish()
    }
}

impl Tls {
    /// Loads the pair (and the client CA, when given) from `files`.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that could not be used.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let provider = Arc::new(provider());
        let pair = Arc::new(CurrentPair(RwLock::new(load_pair(&files, &provider)?)));
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair {
                cert: files.cert.clone(),
                key: files.key.clone(),
                reason: e.to_string(),
            })?;
        let builder = match &files.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let roots = load_roots(path, "client CA")?;
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| TlsError::File {
                            what: "client CA",
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder.with_cert_resolver(pair.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            pair,
            files,
            last_reload: AtomicI8::new(-1),
        })
    }

    /// Reads the certificate and key again; new handshakes use the new
    /// pair, open connections keep theirs. On failure the old pair stays.
    ///
    /// # Errors
    /// [`TlsError`] naming the file that could not be used.
    pub fn reload(&self) -> Result<(), TlsError> {
        match load_pair(&self.files, &provider()) {
            Ok(fresh) => {
                *self.pair.0.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                self.last_reload.store(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.last_reload.store(0, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Whether the last reload succeeded; `None` before the first.
    pub fn last_reload(&self) -> Option<bool> {
        match self.last_reload.load(Ordering::Relaxed) {
            -1 => None,
            n => Some(n == 1),
        }
    }

    /// Whether clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.files.client_ca.is_some()
    }

    /// The acceptor for new connections.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// The crypto every TLS session of larder uses: rustls on ring, which
/// reqwest builds too. rustls 0.23.48 deprecates ring's provider because it
/// lacks post-quantum key exchange; the alternative (aws-lc-rs) needs a C
/// and CMake toolchain to build, which the two commands do not assume.
#[allow(deprecated)]
pub fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The pair every handshake is answered with.
#[derive(Debug)]
struct CurrentPair(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentPair {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

fn read_err(what: &'static str, path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError {
    let path = path.to_owned();
    move |e| TlsError::File {
        what,
        path: path.clone(),
        reason: match e {
            rustls::pki_types::pem::Error::Io(io) => io.to_string(),
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of this kind".into(),
            other => format!("not valid PEM ({other:?})"),
        },
    }
}

fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    // Read first, so that a missing file is named as such rather than as
    // a PEM problem.
    std::fs::metadata(path).map_err(|e| TlsError::File {
        what,
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err(what, path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err(what, path))?;
    if certs.is_empty() {
        return Err(TlsError::File {
            what,
            path: path.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    Ok(certs)
}

fn load_roots(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        roots.add(cert).map_err(|e| TlsError::File {
            what,
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

fn load_pair(files: &TlsFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, TlsError> {
    let certs = load_certs(&files.cert, "certificate")?;
    std::fs::metadata(&files.key).map_err(|e| TlsError::File {
        what: "key",
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(read_err("key", &files.key))?;
    let pair = CertifiedKey::from_der(certs, key, provider).map_err(|e| TlsError::Pair {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(Arc::new(pair))
}

/// The subject common name of a client's certificate, as presented under
/// mutual TLS. `None` inside means the certificate has no readable CN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientName(pub Option<Arc<str>>);

impl ClientName {
    /// The name in `cert` (a DER certificate the handshake verified).
    pub fn of(cert: &[u8]) -> Self {
        ClientName(subject_common_name(cert).map(Arc::from))
    }
}

/// Reads one DER element at the front of `input`: its tag, its contents and
/// what follows it. Only the definite lengths DER allows.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, mut rest) = rest.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (bytes, after) = rest.split_at(n);
        rest = after;
        bytes
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b))
    };
    if rest.len() < len {
        return None;
    }
    let (contents, after) = rest.split_at(len);
    Some((tag, contents, after))
}

/// The subject's common name (OID 2.5.4.3) of a DER X.509 certificate, when
/// it is a string type and valid UTF-8. The last CN wins, as in most TLS
/// servers that take a principal from it.
fn subject_common_name(cert: &[u8]) -> Option<String> {
    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, cert, _) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_element(cert)?;
    if tag != SEQUENCE {
        return None;
    }
    // version [0] (optional), serial, signature, issuer, validity, subject
    let mut rest = tbs;
    let (tag, _, after) = der_element(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..4 {
        let (_, _, after) = der_element(rest)?;
        rest = after;
    }
    let (tag, mut subject, _) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let mut found = None;
    while !subject.is_empty() {
        let (tag, mut set, after) = der_element(subject)?;
        subject = after;
        if tag != SET {
            return None;
        }
        while !set.is_empty() {
            let (_, attribute, after) = der_element(set)?;
            set = after;
            let (oid_tag, oid, value) = der_element(attribute)?;
            if oid_tag == 0x06 && oid == OID_CN {
                let (_, text, _) = der_element(value)?;
                found = std::str::from_utf8(text).ok().map(str::to_owned);
            }
        }
    }
    found
}

/// Whether `e` is a handshake that failed for the client's reasons (not
/// TLS, no certificate, a bad one), as opposed to the socket's.
pub fn is_handshake_refusal(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::InvalidData
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(cn: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "larder tests");
        if let Some(cn) = cn {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_common_name_is_read_from_the_subject() {
        assert_eq!(
            ClientName::of(&cert_with(Some("alice"))).0.as_deref(),
            Some("alice")
        );
        assert_eq!(ClientName::of(&cert_with(None)).0, None);
        assert_eq!(ClientName::of(b"not a certificate").0, None);
        assert_eq!(ClientName::of(&[]).0, None);
        // Truncated anywhere: no name, no panic.
        let der = cert_with(Some("bob"));
        for cut in 0..der.len() {
            let _ = ClientName::of(&der[..cut]);
        }
    }
}
