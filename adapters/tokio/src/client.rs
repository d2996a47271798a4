//! Connections to backends: the connector (TCP, connect timeout, TLS).

use std::sync::Arc;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use lb_proxy::Settings;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use lb_proxy::StartError;

pub(crate) type Connector = HttpsConnector<HttpConnector>;

/// What connectors are made of: TCP settings and the TLS configuration.
#[derive(Clone)]
pub(crate) struct Parts {
    http: HttpConnector,
    tls: Arc<rustls::ClientConfig>,
}

impl Parts {
    /// The connector every backend uses: TLS checks the URL's host.
    pub(crate) fn connector(&self) -> Connector {
        HttpsConnectorBuilder::new()
            .with_tls_config((*self.tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(self.http.clone())
    }

    /// A connector for a backend whose certificate is checked for (and SNI names)
    /// `name`, whatever address it is reached at.
    pub(crate) fn named(&self, name: &str) -> Result<Connector, String> {
        let name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
        let resolver = Arc::new(FixedServerNameResolver::new(name));
        Ok(HttpsConnector::new(
            self.http.clone(),
            self.tls.clone(),
            false,
            resolver,
        ))
    }
}

/// TCP with `TCP_NODELAY`, keep-alive probes (see
/// [`BACKEND_KEEPALIVE_IDLE`](lb_proxy::settings::BACKEND_KEEPALIVE_IDLE)) and the connect timeout, wrapped in TLS for `https://` backends
/// (system roots plus `--backend-ca`).
pub(crate) fn parts(settings: &Settings) -> Result<Parts, StartError> {
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
    Ok(Parts {
        http,
        tls: Arc::new(tls),
    })
}
