//! TLS for admin.v1 clients: the cluster CA to trust, and the operator's certificate and key.
//!
//! A node's certificate names `nodes.evpc` (see `evpc-node pki`); the client accepts only a
//! server that shows it, signed by the CA given, so a leader hint cannot lead `evpcctl` to a
//! machine outside the cluster.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// The name every node's certificate carries for operators' clients.
pub const NODE_SERVER_NAME: &str = "nodes.evpc";

/// How an admin client talks to the nodes.
#[derive(Clone)]
pub enum Security {
    /// Mutual TLS with an operator certificate.
    Tls(ClientTls),
    /// Plaintext HTTP/2, for clusters running `insecure_plaintext = true`.
    Plaintext,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Security::Tls(tls) => write!(f, "Tls({tls:?})"),
            Security::Plaintext => f.write_str("Plaintext"),
        }
    }
}

/// An operator's TLS files, read.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(<key redacted>)")
    }
}

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    /// Unreadable.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// A private key others can read.
    #[error(
        "{path} is readable by group or others (mode {mode:04o}); a private key must be \
         owner-only: chmod 600 {path}"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
}

/// Fails if `path` is readable or writable by anyone but its owner: the one check of every
/// private file (TLS keys, the CA key, the cluster keyring), here because every crate that
/// reads one depends on this one.
pub fn check_private_file(path: &Path) -> Result<(), TlsFileError> {
    let meta = std::fs::metadata(path).map_err(|error| TlsFileError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(TlsFileError::Exposed {
            path: path.display().to_string(),
            mode,
        });
    }
    Ok(())
}

impl ClientTls {
    /// Reads the CA certificate, the operator's certificate and their key (owner-only).
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<ClientTls, TlsFileError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|error| TlsFileError::Read {
                path: path.display().to_string(),
                error,
            })
        };
        check_private_file(key)?;
        Ok(ClientTls {
            ca_pem: read(ca)?,
            cert_pem: read(cert)?,
            key_pem: zeroize::Zeroizing::new(read(key)?),
        })
    }

    /// tonic's configuration: trust the CA, show the certificate, expect a node.
    pub fn config(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem[..]))
            .domain_name(NODE_SERVER_NAME)
    }
}
