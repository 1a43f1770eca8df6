//! `--tls-cert`, `--tls-key`, `--tls-client-ca`: the files read at start
//! into the rustls server configuration every TLS client is served with;
//! `--server-tls-*`: those read into the client configuration memrelay's
//! own connections to the servers are made with.
//!
//! Read here, with the rest of the configuration, so that a missing file, a
//! file without a certificate, or a key that is not the certificate's stops
//! the start with one line naming the flag (or key), before any port is
//! bound. The connections themselves are `net::tls`'s.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

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
    let key = private_key(key_origin, key_path)?;
    // ring: no C toolchain beyond what ring builds itself, and the same
    // provider whatever else the process links.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(cert_origin, e.to_string()))?;
    let builder = match f.client_ca {
        None => builder.with_no_client_auth(),
        Some((origin, path)) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(origin, path)?),
                provider,
            )
            .build()
            .map_err(|e| ConfigError::new(origin, format!("{}: {e}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let server = builder
        .with_single_cert(chain, key)
        .map_err(|e| not_its_key(key_origin, key_path, cert_path, e))?;
    Ok(Tls {
        cert: cert_path.to_path_buf(),
        key: key_path.to_path_buf(),
        client_ca: f.client_ca.map(|(_, p)| p.to_path_buf()),
        server: Arc::new(server),
    })
}

/// TLS to the servers, as configured.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub ca: PathBuf,
    /// The certificate memrelay shows the servers, and its key.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// `--server-tls-name`: the name every server's certificate is checked
    /// against; without it, each server's host as configured.
    pub name: Option<ServerName<'static>>,
    /// What each connection's TLS session is made from.
    pub client: Arc<ClientConfig>,
}

impl ServerTls {
    /// The name a server's certificate must carry: `--server-tls-name`, or
    /// the host it was configured by (a DNS name, or an IP address checked
    /// against the certificate's IP addresses). `None` for a host rustls
    /// cannot check a certificate against (not a valid DNS name), which
    /// the configuration refuses first.
    pub fn name_for(&self, host: &str) -> Option<ServerName<'static>> {
        match &self.name {
            Some(n) => Some(n.clone()),
            None => ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
                .ok()
                .map(|n| n.to_owned()),
        }
    }
}

/// Where each `--server-tls-*` was given, if it was.
pub(super) struct ServerFiles<'a> {
    pub ca: Option<(&'a Origin, &'a Path)>,
    pub cert: Option<(&'a Origin, &'a Path)>,
    pub key: Option<(&'a Origin, &'a Path)>,
    pub name: Option<(&'a Origin, &'a str)>,
}

/// Reads the files and builds the client configuration; `None` without
/// `--server-tls-ca`. Every other `--server-tls-*` needs it: TLS to the
/// servers without a CA to check them against would be refused by rustls
/// anyway, and silently sending plaintext when a certificate was named
/// would be worse.
pub(super) fn load_server(f: ServerFiles<'_>) -> Result<Option<ServerTls>, ConfigError> {
    let Some((ca_origin, ca_path)) = f.ca else {
        let given = [
            f.cert.map(|(o, _)| o),
            f.key.map(|(o, _)| o),
            f.name.map(|(o, _)| o),
        ];
        return match given.into_iter().flatten().next() {
            Some(o) => Err(ConfigError::new(
                o,
                "needs --server-tls-ca (server_tls.ca): the CA the servers' certificates are checked against",
            )),
            None => Ok(None),
        };
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = roots(ca_origin, ca_path)?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ConfigError::new(ca_origin, e.to_string()))?
        .with_root_certificates(roots);
    let (client, cert) = match (f.cert, f.key) {
        (None, None) => (builder.with_no_client_auth(), None),
        (Some((o, _)), None) => {
            return Err(ConfigError::new(
                o,
                "needs --server-tls-key (server_tls.key) too",
            ))
        }
        (None, Some((o, _))) => {
            return Err(ConfigError::new(
                o,
                "needs --server-tls-cert (server_tls.cert) too",
            ))
        }
        (Some((cert_origin, cert_path)), Some((key_origin, key_path))) => {
            let chain = certificates(cert_origin, cert_path)?;
            let key = private_key(key_origin, key_path)?;
            let client = builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| not_its_key(key_origin, key_path, cert_path, e))?;
            (
                client,
                Some((cert_path.to_path_buf(), key_path.to_path_buf())),
            )
        }
    };
    let name = match f.name {
        None => None,
        Some((o, n)) => Some(
            ServerName::try_from(n)
                .map_err(|_| {
                    ConfigError::new(o, format!("'{n}' is neither a DNS name nor an IP address"))
                })?
                .to_owned(),
        ),
    };
    Ok(Some(ServerTls {
        ca: ca_path.to_path_buf(),
        cert,
        name,
        client: Arc::new(client),
    }))
}

/// rustls refused a certificate and key pair.
fn not_its_key(origin: &Origin, key: &Path, cert: &Path, e: rustls::Error) -> ConfigError {
    ConfigError::new(
        origin,
        format!(
            "{} is not the private key of {}: {e}",
            key.display(),
            cert.display()
        ),
    )
}

/// The CAs of a PEM file, to check the other side's certificate against.
fn roots(origin: &Origin, path: &Path) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for c in certificates(origin, path)? {
        roots
            .add(c)
            .map_err(|e| ConfigError::new(origin, format!("{}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// A PEM private key.
fn private_key(origin: &Origin, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        let why = match e {
            pem::Error::NoItemsFound => "no PEM private key in it".to_string(),
            e => e.to_string(),
        };
        ConfigError::new(origin, format!("{}: {why}", path.display()))
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
