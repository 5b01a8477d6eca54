//! PostgreSQL over TLS: libpq's `sslmode` and `sslrootcert`, with rustls.
//!
//! tokio-postgres knows `sslmode=disable|prefer|require` and refuses the
//! URL for `verify-ca`, `verify-full` or `sslrootcert`, so larder takes both
//! parameters out of the cluster URL before handing it on, and expresses
//! the verification in the rustls configuration of the connector:
//!
//! | `sslmode` | TLS | server certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | when the server offers it | no |
//! | `require` | always | no (but as `verify-ca` when `sslrootcert` is given, as libpq does) |
//! | `verify-ca` | always | chain to a trusted root |
//! | `verify-full` | always | chain, and the host name or address |
//!
//! The roots are `sslrootcert` when given (`system` names the system's
//! roots), else the system's roots.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::ClusterError;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Plain connections only.
    Disable,
    /// TLS when the server offers it, unverified; else plain.
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, the chain verified.
    VerifyCa,
    /// TLS, the chain and the host verified.
    VerifyFull,
}

impl Mode {
    fn parse(text: &str) -> Result<Mode, ClusterError> {
        Ok(match text {
            "disable" => Mode::Disable,
            "prefer" => Mode::Prefer,
            "require" => Mode::Require,
            "verify-ca" => Mode::VerifyCa,
            "verify-full" => Mode::VerifyFull,
            // libpq's `allow` tries plain first; larder has no use for a
            // mode that prefers the weaker connection.
            other => {
                return Err(ClusterError::Url(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }
}

/// The TLS settings read from a cluster URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTls {
    /// `sslmode` (default `prefer`).
    pub mode: Mode,
    /// `sslrootcert`: a PEM file, or `system`.
    pub root: Option<PathBuf>,
}

impl PgTls {
    /// What tokio-postgres is told: whether to ask for TLS and whether to
    /// insist on it (verification is the connector's part).
    pub fn ssl_mode(&self) -> SslMode {
        match self.mode {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        }
    }

    /// The connector for every connection to the cluster database.
    ///
    /// # Errors
    /// [`ClusterError::Url`] when `sslrootcert` cannot be read or holds
    /// no certificate.
    pub fn connector(&self) -> Result<Connector, ClusterError> {
        let provider = Arc::new(crate::net::tls::provider());
        let verify = match (self.mode, &self.root) {
            (Mode::Disable | Mode::Prefer, _) | (Mode::Require, None) => Verify::Nothing,
            (Mode::Require | Mode::VerifyCa, _) => Verify::Chain,
            (Mode::VerifyFull, _) => Verify::Full,
        };
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| ClusterError::Url(e.to_string()))?;
        let chain = match verify {
            Verify::Nothing => None,
            Verify::Chain | Verify::Full => {
                let roots = Arc::new(self.roots()?);
                let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| ClusterError::Url(format!("sslrootcert: {e}")))?;
                Some(webpki)
            }
        };
        let config = match chain {
            Some(webpki) if verify == Verify::Full => {
                builder.with_webpki_verifier(webpki).with_no_client_auth()
            }
            chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Lenient { chain, provider }))
                .with_no_client_auth(),
        };
        Ok(Connector(MakeRustlsConnect::new(config)))
    }

    fn roots(&self) -> Result<RootCertStore, ClusterError> {
        let mut roots = RootCertStore::empty();
        match &self.root {
            Some(path) if path.as_os_str() != "system" => {
                let bad = |reason: String| {
                    ClusterError::Url(format!("sslrootcert {}: {reason}", path.display()))
                };
                std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| bad(format!("{e:?}")))?
                {
                    let cert = cert.map_err(|e| bad(format!("{e:?}")))?;
                    roots.add(cert).map_err(|e| bad(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(bad("no certificate in the file".into()));
                }
            }
            _ => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(ClusterError::Url(
                        "sslmode=verify-*: no sslrootcert given and no system root certificates found"
                            .into(),
                    ));
                }
            }
        }
        Ok(roots)
    }
}

/// What tokio-postgres connects with (the rustls configuration is not
/// printable, so neither is this).
#[derive(Clone)]
pub struct Connector(pub MakeRustlsConnect);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connector")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    Nothing,
    Chain,
    Full,
}

/// Takes `sslmode` and `sslrootcert` out of a connection string (a
/// `postgres://` URL or `key=value` pairs); returns the rest, for
/// tokio-postgres, and the TLS settings.
///
/// # Errors
/// [`ClusterError::Url`] for an `sslmode` libpq does not know.
pub fn split(url: &str) -> Result<(String, PgTls), ClusterError> {
    let mut tls = PgTls {
        mode: Mode::Prefer,
        root: None,
    };
    let mut take = |key: &str, value: &str| -> Result<bool, ClusterError> {
        match key {
            "sslmode" => tls.mode = Mode::parse(value)?,
            "sslrootcert" => tls.root = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let k = percent_encoding::percent_decode_str(k).decode_utf8_lossy();
                    let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                    if !take(&k, &v)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for (k, v, raw) in key_values(url) {
            if !take(&k, &v)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    Ok((rest, tls))
}

/// The `key = value` pairs of a libpq key/value string, each with its
/// key, its unquoted value and its text as written.
fn key_values(text: &str) -> Vec<(String, String, &str)> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= bytes.len() {
            break;
        }
        let start = i;
        while i < bytes.len() && bytes[i] != b'=' && !bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let key = text[start..i].to_owned();
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'=' {
            i += 1;
        }
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        let mut value = Vec::new();
        if i < bytes.len() && bytes[i] == b'\'' {
            i += 1;
            while i < bytes.len() && bytes[i] != b'\'' {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
            i += 1;
        } else {
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                if bytes[i] == b'\\' && i + 1 < bytes.len() {
                    i += 1;
                }
                value.push(bytes[i]);
                i += 1;
            }
        }
        let end = i.min(bytes.len());
        out.push((
            key,
            String::from_utf8_lossy(&value).into_owned(),
            &text[start..end],
        ));
    }
    out
}

/// The verifier of `require`, `prefer` and `verify-ca`. Without `chain`
/// the server's certificate is not checked (libpq's `require`); with it
/// the chain must lead to a trusted root but the name need not be the
/// host's (`verify-ca`: webpki checks the chain before the name, so a name
/// mismatch means the chain was good). Handshake signatures are verified
/// either way, so the session is with whoever holds the presented
/// certificate's key.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_taken_out_of_urls() {
        let (rest, tls) = split(
            "postgres://u@h:5432/db?application_name=x&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u@h:5432/db?application_name=x");
        assert_eq!(tls.mode, Mode::VerifyFull);
        assert_eq!(tls.root, Some(PathBuf::from("/tmp/ca.pem")));

        let (rest, tls) = split("postgresql://u@h/db?sslmode=require").unwrap();
        assert_eq!(rest, "postgresql://u@h/db");
        assert_eq!(tls.mode, Mode::Require);
        assert_eq!(tls.ssl_mode(), SslMode::Require);

        let (rest, tls) = split("postgres://u@h/db").unwrap();
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(tls.mode, Mode::Prefer);

        let (rest, tls) =
            split("host=h user=u sslmode = verify-ca sslrootcert='/a b/c.pem' dbname=d").unwrap();
        assert_eq!(rest, "host=h user=u dbname=d");
        assert_eq!(tls.mode, Mode::VerifyCa);
        assert_eq!(tls.root, Some(PathBuf::from("/a b/c.pem")));

        assert!(split("postgres://u@h/db?sslmode=allow").is_err());
        assert!(split("host=h sslmode=bogus").is_err());
    }

    #[test]
    fn a_missing_root_file_is_named() {
        let (_, tls) =
            split("postgres://u@h/db?sslmode=verify-full&sslrootcert=/no/such.pem").unwrap();
        let err = tls.connector().expect_err("refused").to_string();
        assert!(err.contains("/no/such.pem"), "{err}");
        let (_, tls) = split("postgres://u@h/db?sslmode=require").unwrap();
        assert!(tls.connector().is_ok());
    }
}
