//! TLS for the HTTP listener (`[http] cert_file` / `key_file`, PEM) and for ldaps://.
//!
//! The listener does each TLS handshake in its own task (bounded in time and in
//! number), so a slow or hostile client cannot stall the accept loop; finished
//! connections are handed to axum through [`TlsListener`]. The server configuration sits
//! behind a lock so SIGHUP can swap in a renewed certificate without a restart: new
//! connections get it, established ones keep theirs.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 256;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain; errors name the file.
pub fn read_certs(file: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(file)
        .with_context(|| format!("reading certificates from {}", file.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate chain", file.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no PEM certificate", file.display()));
    }
    Ok(certs)
}

/// The server side: TLS 1.2 and 1.3 with rustls' safe defaults, HTTP/1.1 by ALPN.
pub fn server_config(cert_file: &Path, key_file: &Path) -> anyhow::Result<Arc<ServerConfig>> {
    let certs = read_certs(cert_file)?;
    // The error of a key parse could quote key material: name the file only.
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|_| {
        anyhow!(
            "{} does not hold a PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key_file.display()
        )
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| {
            format!(
                "{} and {} do not make a usable certificate and key pair",
                cert_file.display(),
                key_file.display()
            )
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client side for ldaps://: the system's roots, or only the given CA file.
pub fn client_config(ca_file: Option<&Path>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            for c in read_certs(f)? {
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a usable CA certificate", f.display()))?;
            }
        }
        None => {
            let found = rustls_native_roots();
            if found.is_empty() {
                return Err(anyhow!(
                    "no system CA certificates found; set [ldap] ca_file"
                ));
            }
            for c in found {
                let _ = roots.add(c);
            }
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("tls protocol versions")?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// The system's CA certificates (honours `SSL_CERT_FILE` / `SSL_CERT_DIR`).
fn rustls_native_roots() -> Vec<CertificateDer<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!("system ca certificates: {e}");
    }
    found.certs
}

/// Accepts TCP connections through the connection gate, does each TLS handshake in its
/// own task with the configuration current at accept time, and serves the connection.
pub async fn serve_tls(
    tcp: TcpListener,
    config: Arc<RwLock<Arc<ServerConfig>>>,
    app: axum::Router,
    limits: crate::serve::Limits,
) {
    let gate = crate::serve::Gate::new(&limits);
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer, ticket) = crate::serve::accept_admitted(&tcp, &gate).await;
        let acceptor = match config.read() {
            Ok(c) => TlsAcceptor::from(c.clone()),
            Err(_) => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    drop(permit);
                    crate::serve::serve_connection(tls, peer, app, limits, ticket).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "tls handshake failed: {e}"),
                Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
            }
        });
    }
}

pub use crate::serve::Peer;
