//! TLS for the TCP and WebSocket listeners (rustls, ring provider).
//!
//! A [`TlsConfig`] is an option of a listener
//! ([`TcpOptions::with_tls`](crate::tcp::TcpOptions::with_tls),
//! [`WsOptions::with_tls`](crate::ws::WsOptions::with_tls)), not a serving
//! function of its own: the TLS handshake then runs first, inside the one
//! handshake deadline that also covers the WebSocket upgrade and op 7.

use std::fmt;
use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;

/// A listener's TLS settings: a certificate chain and its key, cheap to
/// clone (one shared rustls configuration).
///
/// ```no_run
/// # fn run() -> std::io::Result<()> {
/// use comet_transports::tls::TlsConfig;
/// let tls = TlsConfig::from_pem_files("cert.pem".as_ref(), "key.pem".as_ref())?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// From a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1
    /// or SEC1). Errors name the file that could not be used.
    pub fn from_pem_files(cert: &Path, key: &Path) -> io::Result<Self> {
        let bad = |path: &Path, e: &dyn fmt::Display| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        };
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| bad(cert, &e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(cert, &e))?;
        if certs.is_empty() {
            return Err(bad(cert, &"no certificate in file"));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, &e))?;
        Self::from_der(certs, key_der).map_err(|e| bad(cert, &e))
    }

    /// From DER certificates and key (e.g. generated in memory). Fails
    /// (`InvalidData`) when rustls refuses them (a key that does not match
    /// the certificate, say).
    pub fn from_der(
        certs: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> io::Result<Self> {
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        Ok(Self::from_rustls(Arc::new(config)))
    }

    /// From a rustls server configuration built by the application (client
    /// certificates, ALPN protocols, another crypto provider, ...).
    pub fn from_rustls(config: Arc<ServerConfig>) -> Self {
        TlsConfig {
            acceptor: tokio_rustls::TlsAcceptor::from(config),
        }
    }
}
