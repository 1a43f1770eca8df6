//! `--tls-cert`, `--tls-key`, `--tls-client-ca`: the files read at start
//! into the rustls server configuration every TLS client is served with.
//!
//! Read here, with the rest of the configuration, so that a missing file, a
//! file without a certificate, or a key that is not the certificate's stops
//! the start with one line naming the flag (or key), before any port is
//! bound. The connections themselves are `net::tls`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use super::{ConfigError, Origin};

/// TLS to clients, as configured.
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must show a certificate signed by one of these.
    pub client_ca: Option<PathBuf>,
    /// What each accepted connection's TLS session is made from.
    pub server: Arc<ServerConfig>,
}

/// Where each file was named, for the error that names it.
pub(super) struct Files<'a> {
    pub cert: (&'a Origin, &'a Path),
    pub key: (&'a Origin, &'a Path),
    pub client_ca: Option<(&'a Origin, &'a Path)>,
}

/// Reads the files and builds the server configuration.
pub(super) fn load(f: Files<'_>) -> Result<Tls, ConfigError> {
    let (cert_origin, cert_path) = f.cert;
    let (key_origin, key_path) = f.key;
    let chain = certificates(cert_origin, cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        let why = match e {
            pem::Error::NoItemsFound => "no PEM private key in it".to_string(),
            e => e.to_string(),
        };
        ConfigError::new(key_origin, format!("{}: {why}", key_path.display()))
    })?;
    // ring: no C toolchain beyond what ring builds itself, and the same
    // provider whatever else the process links.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(cert_origin, e.to_string()))?;
    let builder = match f.client_ca {
        None => builder.with_no_client_auth(),
        Some((origin, path)) => {
            let mut roots = RootCertStore::empty();
            for c in certificates(origin, path)? {
                roots
                    .add(c)
                    .map_err(|e| ConfigError::new(origin, format!("{}: {e}", path.display())))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| ConfigError::new(origin, format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder.with_single_cert(chain, key).map_err(|e| {
        ConfigError::new(
            key_origin,
            format!(
                "{} is not the private key of {}: {e}",
                key_path.display(),
                cert_path.display()
            ),
        )
    })?;
    Ok(Tls {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        client_ca: f.client_ca.map(|(_, p)| p.to_path_buf()),
        server: Arc::new(server),
    })
}

/// Every certificate of a PEM file; at least one.
fn certificates(origin: &Origin, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let fail = |m: String| ConfigError::new(origin, format!("{}: {m}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e.to_string()))?;
    if certs.is_empty() {
        return Err(fail("no PEM certificate in it".into()));
    }
    Ok(certs)
}
