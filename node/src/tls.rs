//! Mutual TLS for cluster.v1 and admin.v1 (rustls), and who is calling.
//!
//! ```text
//!  TcpListener ──accept──► handshake (own task, deadline) ──► tonic server ──► handler
//!                 refused: no certificate, other CA,             │
//!                 expired → warning with the peer address        ▼
//!                                                     Caller::of(&request)
//!                                                     Node(id) | Operator{name, role}
//! ```
//!
//! The handshake trusts only the cluster CA (see [`crate::pki`]); what a certificate may do is
//! decided after it, by the services: cluster.v1 wants a node that is a member and checks that
//! it is who the message says sent it, admin.v1 wants an operator whose role allows the call.
//! With `insecure_plaintext = true` there is no TLS and every caller is
//! [`Caller::Plaintext`], trusted as the opt-in says.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use evpc_raft_store::NodeId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tonic::Status;
use x509_parser::extensions::GeneralName;
use zeroize::Zeroizing;

use crate::pki::{self, PkiError, Role, TlsFiles};

/// How long a client has to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many handshakes run at once per listener; more connections wait in the
/// kernel's backlog, so a flood of half-done handshakes cannot take unbounded memory.
const MAX_PENDING_HANDSHAKES: usize = 256;

/// A node's or operator's TLS material, read and checked once.
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA certificate, PEM.
    pub ca_pem: Vec<u8>,
    /// The certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// The private key, PEM.
    key_pem: Arc<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsMaterial(<key redacted>)")
    }
}

/// A TLS file set that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing, unreadable or exposed.
    #[error(transparent)]
    File(#[from] PkiError),
    /// A file does not hold what it should.
    #[error("{path}: {reason}")]
    Content {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

impl TlsMaterial {
    /// Reads `files`; the key file must be owner-only.
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial, TlsError> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|error| PkiError::Io {
                path: path.to_owned(),
                error,
            })
        };
        let material = TlsMaterial {
            ca_pem: read(&files.ca_file)?,
            cert_pem: read(&files.cert_file)?,
            key_pem: Arc::new(pki::read_private_file(&files.key_file)?),
        };
        // Parse now, so a bad file is reported at start and not at the first connection.
        let content = |path: &std::path::Path, reason: String| TlsError::Content {
            path: path.display().to_string(),
            reason,
        };
        material
            .ca()
            .map_err(|e| content(&files.ca_file, e.to_string()))?;
        material
            .chain()
            .map_err(|e| content(&files.cert_file, e.to_string()))?;
        material
            .key()
            .map_err(|e| content(&files.key_file, e.to_string()))?;
        Ok(material)
    }

    fn ca(&self) -> Result<CertificateDer<'static>, rustls::pki_types::pem::Error> {
        CertificateDer::from_pem_slice(&self.ca_pem)
    }

    fn chain(&self) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
        let chain: Vec<_> =
            CertificateDer::pem_slice_iter(&self.cert_pem).collect::<Result<_, _>>()?;
        if chain.is_empty() {
            return Err(rustls::pki_types::pem::Error::NoItemsFound);
        }
        Ok(chain)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, rustls::pki_types::pem::Error> {
        PrivateKeyDer::from_pem_slice(&self.key_pem)
    }

    /// The rustls server side: this certificate, and clients must show one from the CA.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca().map_err(|e| content_error("CA", e))?)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                self.chain().map_err(|e| content_error("certificate", e))?,
                self.key().map_err(|e| content_error("key", e))?,
            )?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// tonic's client side: trust the CA only, show this certificate, and accept only a
    /// server whose certificate carries `server_name`.
    pub fn client_config(&self, server_name: &str) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem[..],
            ))
            .domain_name(server_name)
            .timeout(HANDSHAKE_TIMEOUT)
    }
}

fn content_error(what: &str, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Content {
        path: what.to_owned(),
        reason: e.to_string(),
    }
}

/// A connection a server hands to tonic: TLS, or plain TCP when TLS is off.
pub type Accepted = tokio_rustls::server::TlsStream<TcpStream>;

/// Accepts connections on `listener` and yields those that finish a TLS handshake with
/// `acceptor`; each handshake runs in its own task under [`HANDSHAKE_TIMEOUT`], and one that
/// fails is logged as a warning with the peer's address and why (`service` says which API).
pub fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Accepted>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // EMFILE and the like: back off instead of spinning.
                        tracing::warn!(service, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            set_nodelay(&tcp);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => log_refused(service, peer, &e.to_string()),
                    Err(_) => log_refused(service, peer, "the TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

fn log_refused(service: &str, peer: SocketAddr, why: &str) {
    tracing::warn!(service, %peer, reason = why, "TLS connection refused");
}

/// Without TCP_NODELAY, small responses meet Nagle and delayed ACKs: ~40 ms stalls.
pub fn set_nodelay(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(error = %e, "cannot set TCP_NODELAY");
    }
}

/// Who sent a request, from the certificate of its connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node of the cluster CA: `node-<id>.evpc`.
    Node(NodeId),
    /// An operator: their certificate's common name and role.
    Operator {
        /// The common name.
        name: String,
        /// The role.
        role: Role,
    },
    /// TLS is off (`insecure_plaintext = true`): nobody is authenticated.
    Plaintext,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Node(id) => write!(f, "node {id}"),
            Caller::Operator { name, role } => write!(f, "{name} ({role})"),
            Caller::Plaintext => f.write_str("an unauthenticated caller (insecure_plaintext)"),
        }
    }
}

impl Caller {
    /// The caller of `request`, on a server where TLS is `tls_on`. A TLS connection always has
    /// a verified client certificate (the handshake demands one); a certificate that names
    /// no node and no role, or both, gets `PERMISSION_DENIED`.
    pub fn of<T>(request: &tonic::Request<T>, tls_on: bool) -> Result<Caller, Status> {
        if !tls_on {
            return Ok(Caller::Plaintext);
        }
        let certs = request
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate on this connection"))?;
        Caller::from_certificate(leaf).map_err(Status::permission_denied)
    }

    /// What a (verified) certificate names.
    pub fn from_certificate(der: &[u8]) -> Result<Caller, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable client certificate: {e}"))?;
        let mut nodes = Vec::new();
        let mut roles = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => nodes.extend(pki::node_of_name(dns)),
                    GeneralName::URI(uri) => {
                        if let Some(role) = uri.strip_prefix(pki::ROLE_URI_PREFIX) {
                            roles.push(role.parse::<Role>().map_err(|e| e.to_string())?);
                        }
                    }
                    _ => {}
                }
            }
        }
        let name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or("")
            .to_owned();
        match (nodes.as_slice(), roles.as_slice()) {
            ([id], []) => Ok(Caller::Node(*id)),
            ([], [role]) if !name.is_empty() => Ok(Caller::Operator { name, role: *role }),
            ([], []) => Err(format!(
                "certificate {name:?} names neither a node nor an operator role"
            )),
            _ => Err(format!(
                "certificate {name:?} names several nodes or roles; issue it again with `evpc-node pki`"
            )),
        }
    }

    /// The node this caller is, or `PERMISSION_DENIED` for anything that is not a node. A
    /// plaintext caller is taken to be `claimed`.
    pub fn node(&self, claimed: NodeId) -> Result<NodeId, Status> {
        match self {
            Caller::Node(id) => Ok(*id),
            Caller::Plaintext => Ok(claimed),
            Caller::Operator { name, .. } => Err(Status::permission_denied(format!(
                "{name} has an operator certificate; cluster.v1 is for nodes"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::PkiDir;

    fn leaf(files: &TlsFiles) -> Vec<u8> {
        let pem = std::fs::read(&files.cert_file).unwrap();
        CertificateDer::from_pem_slice(&pem).unwrap().to_vec()
    }

    #[test]
    fn certificates_name_their_callers() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path());
        pki.init("t").unwrap();
        let node = pki.issue_node(7, 30).unwrap();
        let alice = pki.issue_client("alice", Role::Operator, 30).unwrap();
        assert_eq!(Caller::from_certificate(&leaf(&node)), Ok(Caller::Node(7)));
        assert_eq!(
            Caller::from_certificate(&leaf(&alice)),
            Ok(Caller::Operator {
                name: "alice".into(),
                role: Role::Operator
            })
        );
        assert!(Caller::from_certificate(b"not a certificate").is_err());
        assert!(Caller::Node(7).node(3).is_ok_and(|id| id == 7));
        assert!(
            Caller::Operator {
                name: "alice".into(),
                role: Role::Admin
            }
            .node(3)
            .is_err()
        );
        // Material loads, and builds both sides.
        let material = TlsMaterial::load(&node).unwrap();
        material.acceptor().unwrap();
        let _ = material.client_config(&pki::node_name(7));
        assert!(format!("{material:?}").contains("redacted"));
    }
}
