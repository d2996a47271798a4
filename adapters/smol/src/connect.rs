//! New backend connections: name resolution, TCP with `TCP_NODELAY`, TLS for `https://`,
//! each attempt bounded by `--connect-timeout`.

use std::io;
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use async_io::Timer;
use futures_lite::future;
use lb_proxy::{Settings, StartError, Target};

use crate::reactor::{Io, Reactor};
use crate::stream::Stream;

/// Opens backend connections; holds the TLS configuration.
#[derive(Clone)]
pub(crate) struct Connector {
    /// `--connect-timeout`: for resolving, connecting and the TLS handshake together.
    timeout: Duration,
    #[cfg(feature = "tls")]
    tls: Option<futures_rustls::TlsConnector>,
}

impl Connector {
    pub(crate) fn new(settings: &Settings) -> Result<Self, StartError> {
        let timeout = settings.connect_timeout;
        #[cfg(feature = "tls")]
        {
            let tls = crate::tls::connector(settings.backend_ca.as_deref(), true)?;
            Ok(Connector { timeout, tls })
        }
        #[cfg(not(feature = "tls"))]
        {
            if let Some(path) = &settings.backend_ca {
                std::fs::metadata(path)
                    .map_err(|e| StartError::Tls(format!("{}: {e}", path.display())))?;
            }
            Ok(Connector { timeout })
        }
    }

    /// Whether this build can reach `target`: an `https://` backend needs the `tls`
    /// feature.
    pub(crate) fn check(&self, target: &Target) -> Result<(), StartError> {
        if target.tls && cfg!(not(feature = "tls")) {
            return Err(StartError::NoTls(target.url.to_string()));
        }
        Ok(())
    }

    /// A new connection to `target`, on `reactor` (the shard's that will use it), within
    /// `--connect-timeout`; the error is a short description for the log.
    pub(crate) async fn connect(
        &self,
        target: &Target,
        reactor: &Arc<Reactor>,
    ) -> Result<Stream, String> {
        future::or(self.attempt(target, reactor), async {
            Timer::after(self.timeout).await;
            Err(lb_proxy::words::CONNECT_TIMEOUT.into())
        })
        .await
    }

    async fn attempt(&self, t: &Target, reactor: &Arc<Reactor>) -> Result<Stream, String> {
        let addrs: Vec<SocketAddr> = match t.host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, t.port)],
            Err(_) => async_net::resolve((t.host.as_str(), t.port))
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", t.host))?,
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match Io::connect(reactor, addr).await {
                Ok(tcp) => {
                    let _ = tcp.get_ref().set_nodelay(true);
                    return self.secure(t, tcp).await;
                }
                Err(e) => last = e,
            }
        }
        Err(lb_proxy::words::connect_error(&last))
    }

    #[cfg(feature = "tls")]
    async fn secure(&self, t: &Target, tcp: Io<TcpStream>) -> Result<Stream, String> {
        match (&self.tls, t.tls) {
            (Some(tls), true) => crate::tls::handshake(tls, &t.tls_name, tcp).await,
            _ => Ok(Stream::Tcp(tcp)),
        }
    }

    #[cfg(not(feature = "tls"))]
    async fn secure(&self, _t: &Target, tcp: Io<TcpStream>) -> Result<Stream, String> {
        Ok(Stream::Tcp(tcp))
    }
}

pub(crate) use lb_proxy::words::io_error as describe;
