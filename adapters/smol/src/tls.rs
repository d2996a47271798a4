//! TLS to `https://` backends: rustls with the ring provider, the system's roots plus an
//! optional `--backend-ca` bundle (the same trust as the tokio build).

use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use futures_rustls::TlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::stream::Stream;
use lb_proxy::StartError;

/// Builds the client configuration. System roots are loaded only when a backend needs
/// them (they cost memory); `--backend-ca` is always checked, so a bad path fails at
/// start whatever the backends.
pub(crate) fn connector(
    backend_ca: Option<&Path>,
    need_roots: bool,
) -> Result<Option<TlsConnector>, StartError> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = backend_ca {
        let bad = |e: &dyn std::fmt::Display| StartError::Tls(format!("{}: {e}", path.display()));
        let mut added = 0;
        for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
            roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(bad(&"no PEM certificate found"));
        }
    }
    if !need_roots {
        return Ok(None);
    }
    // Unreadable system certificates only matter for https:// backends; those then fail
    // their probes with a TLS error that names the problem.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Some(TlsConnector::from(Arc::new(config))))
}

/// The TLS handshake on a fresh TCP connection to `host`.
pub(crate) async fn handshake(
    connector: &TlsConnector,
    host: &str,
    tcp: crate::reactor::Io<TcpStream>,
) -> Result<Stream, String> {
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("TLS: {e}"))?;
    match connector.connect(name, tcp).await {
        Ok(s) => Ok(Stream::Tls(Box::new(std::sync::Mutex::new(s)))),
        Err(e) => Err(format!("TLS handshake failed: {e}")),
    }
}
