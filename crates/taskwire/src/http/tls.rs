//! `wss://`: the rustls (ring) acceptor. The server's accept loop runs each
//! handshake in the connection's own task, under the request-head timeout and
//! counted against the bounds on connections not yet upgraded
//! (`max_http_connections`, `max_http_connections_per_ip`), so a client that
//! opens TCP connections and sends nothing cannot hold them.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::config::{ConfigError, TlsConfig};

/// Reads the PEM files and builds the acceptor; errors name the setting.
pub(crate) fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, ConfigError> {
    let bad = |setting: &'static str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        ConfigError::Invalid {
            setting,
            reason: format!("{}: {e}", path.display()),
        }
    };
    let certs = CertificateDer::pem_file_iter(&cfg.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("tls_cert", &cfg.cert, &e))?;
    if certs.is_empty() {
        return Err(bad("tls_cert", &cfg.cert, &"no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| bad("tls_key", &cfg.key, &e))?;
    // The provider is named here rather than taken from the process default,
    // so that a second rustls provider linked in by the embedding application
    // cannot make this ambiguous.
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("tls_cert", &cfg.cert, &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad("tls_key", &cfg.key, &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
