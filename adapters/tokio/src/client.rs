//! Connections to backends: the connector (TCP, connect timeout, TLS).

use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use lb_proxy::Settings;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use lb_proxy::StartError;

pub(crate) type Connector = HttpsConnector<HttpConnector>;

/// TCP with `TCP_NODELAY`, keep-alive probes (see
/// [`BACKEND_KEEPALIVE_IDLE`](lb_proxy::settings::BACKEND_KEEPALIVE_IDLE)) and the connect timeout, wrapped in TLS for `https://` backends
/// (system roots plus `--backend-ca`).
pub(crate) fn connector(settings: &Settings) -> Result<Connector, StartError> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    http.set_keepalive(Some(lb_proxy::settings::BACKEND_KEEPALIVE_IDLE));
    http.set_keepalive_interval(Some(lb_proxy::settings::BACKEND_KEEPALIVE_INTERVAL));
    http.set_keepalive_retries(Some(lb_proxy::settings::BACKEND_KEEPALIVE_PROBES));
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates only matter for https:// backends; those then fail
    // their probes with a TLS error that names the problem.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &settings.backend_ca {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| StartError::Tls(format!("{}: {e}", path.display())))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| StartError::Tls(format!("{}: {e}", path.display())))?;
            roots
                .add(cert)
                .map_err(|e| StartError::Tls(format!("{}: {e}", path.display())))?;
            added += 1;
        }
        if added == 0 {
            return Err(StartError::Tls(format!(
                "{}: no PEM certificate found",
                path.display()
            )));
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http))
}
