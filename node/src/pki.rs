//! The cluster's PKI: one certificate authority per cluster, a certificate per node that names
//! its id, and one per operator that names their role. `evpc-node pki` writes the files; the
//! servers and clients of [`crate::tls`] read them.
//!
//! ```text
//!  pki init --dir D                     D/ca.pem  D/ca.key  D/cluster.key
//!  pki issue-node 3 --dir D             D/node-3.pem  D/node-3.key
//!  pki issue-client alice --role operator --dir D
//!                                       D/client-alice.pem  D/client-alice.key
//! ```
//!
//! What a certificate says, and who checks it:
//!
//! - a node's: DNS names `node-<id>.evpc` (a node dialing node 3 accepts only a server that
//!   is node 3) and `nodes.evpc` (`evpcctl` accepts any node); usable as server and client.
//! - an operator's: common name = the operator's name (the audit log's "who"), and the URI
//!   `urn:evpc:role:<role>`; usable as a client only, so it cannot pose as a node.
//!
//! Every private key (and the cluster key) is written owner-only (0600), and
//! [`check_private_file`] refuses one that the group or others can read.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use evpc_raft_store::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use zeroize::Zeroizing;

/// The DNS name every node certificate carries, which `evpcctl` checks.
pub const ANY_NODE_NAME: &str = "nodes.evpc";

/// The DNS name of node `id`'s certificate, which its peers check when they dial it.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.evpc")
}

/// The node id a DNS name of a node certificate stands for.
pub fn node_of_name(name: &str) -> Option<NodeId> {
    let digits = name.strip_prefix("node-")?.strip_suffix(".evpc")?;
    // "node-03.evpc" or "node-+3.evpc" would name node 3 twice over; only the canonical form.
    let id: NodeId = digits.parse().ok()?;
    (id != 0 && id.to_string() == digits).then_some(id)
}

/// The URI prefix of an operator certificate's role.
pub const ROLE_URI_PREFIX: &str = "urn:evpc:role:";

/// What an operator's certificate lets them do on admin.v1; each role can do what the roles
/// below it can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Status, lists, gets and slots.
    Reader,
    /// And moving SAs: transfer, drain, activate, rebalance, delete, export, import.
    Operator,
    /// And the cluster itself: init, members, leadership, key rotation.
    Admin,
}

impl Role {
    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Reader => "reader",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

impl FromStr for Role {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<Role, PkiError> {
        match s {
            "reader" => Ok(Role::Reader),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(PkiError::BadRole(other.to_owned())),
        }
    }
}

/// Something the PKI tooling cannot do.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A private key file that is missing or others can read.
    #[error(transparent)]
    Private(#[from] evpc_api::tls::TlsFileError),
    /// A file that `init` or `issue-*` would overwrite.
    #[error("{0} exists already; remove it first to replace it")]
    Exists(PathBuf),
    /// Not a role.
    #[error("unknown role {0:?}: reader, operator or admin")]
    BadRole(String),
    /// Not a usable name for an operator.
    #[error(
        "bad client name {0:?}: 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
    )]
    BadName(String),
    /// Node 0 is no node.
    #[error("node ids start at 1")]
    NodeZero,
    /// rcgen refused.
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |error| PkiError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Fails if `path` is readable or writable by anyone but its owner.
pub fn check_private_file(path: &Path) -> Result<(), PkiError> {
    Ok(evpc_api::tls::check_private_file(path)?)
}

/// Reads a private file (a key) after checking that only its owner can read it.
pub fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, PkiError> {
    check_private_file(path)?;
    Ok(Zeroizing::new(std::fs::read(path).map_err(io(path))?))
}

/// Writes a new file with `mode`, durably; refuses to replace one.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => PkiError::Exists(path.to_owned()),
            _ => PkiError::Io {
                path: path.to_owned(),
                error: e,
            },
        })?;
    file.write_all(contents).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// The files of one PKI directory.
#[derive(Clone, Debug)]
pub struct PkiDir {
    /// The directory.
    pub dir: PathBuf,
}

/// The three files a node or an operator needs to talk TLS.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA's certificate (PEM): the only issuer trusted.
    pub ca_file: PathBuf,
    /// This party's certificate (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM, owner-only).
    pub key_file: PathBuf,
}

/// How long what `pki` issues stays valid unless told otherwise.
pub const DEFAULT_CA_DAYS: i64 = 3650;
/// How long a node or operator certificate stays valid unless told otherwise.
pub const DEFAULT_LEAF_DAYS: i64 = 825;

impl PkiDir {
    /// The PKI in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> PkiDir {
        PkiDir { dir: dir.into() }
    }

    /// The CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The CA's signing key: needed only to issue, keep it off the nodes where you can.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// The cluster key (sealing), created beside the CA.
    pub fn cluster_key(&self) -> PathBuf {
        self.dir.join("cluster.key")
    }

    /// Node `id`'s files.
    pub fn node(&self, id: NodeId) -> TlsFiles {
        self.files(&format!("node-{id}"))
    }

    /// Operator `name`'s files.
    pub fn client(&self, name: &str) -> TlsFiles {
        self.files(&format!("client-{name}"))
    }

    fn files(&self, stem: &str) -> TlsFiles {
        TlsFiles {
            ca_file: self.ca_cert(),
            cert_file: self.dir.join(format!("{stem}.pem")),
            key_file: self.dir.join(format!("{stem}.key")),
        }
    }

    /// Whether `init` ran here.
    pub fn exists(&self) -> bool {
        self.ca_cert().exists() && self.ca_key().exists()
    }

    /// Creates the directory (0700), a CA and a cluster key. `name` goes into the CA's
    /// subject, to tell clusters apart.
    pub fn init(&self, name: &str) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(&self.dir))?;
        for path in [self.ca_cert(), self.ca_key()] {
            if path.exists() {
                return Err(PkiError::Exists(path));
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("evpc cluster CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(DEFAULT_CA_DAYS);
        let cert = params.self_signed(&key)?;
        write_new(&self.ca_key(), key.serialize_pem().as_bytes(), 0o600)?;
        write_new(&self.ca_cert(), cert.pem().as_bytes(), 0o644)?;
        if !self.cluster_key().exists() {
            let mut secret = Zeroizing::new([0u8; 32]);
            rand::Rng::fill(&mut rand::rng(), &mut secret[..]);
            let text = Zeroizing::new(format!("{}\n", hex::encode(&secret[..])));
            write_new(&self.cluster_key(), text.as_bytes(), 0o600)?;
        }
        Ok(())
    }

    /// Issues node `id`'s certificate, valid for `days`.
    pub fn issue_node(&self, id: NodeId, days: i64) -> Result<TlsFiles, PkiError> {
        if id == 0 {
            return Err(PkiError::NodeZero);
        }
        let mut params = CertificateParams::new(vec![node_name(id), ANY_NODE_NAME.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("evpc node {id}"));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        self.issue(&self.node(id), params, now - Duration::minutes(5), days)
    }

    /// Issues operator `name`'s certificate with `role`, valid for `days`.
    pub fn issue_client(&self, name: &str, role: Role, days: i64) -> Result<TlsFiles, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.issue_client_at(name, role, now - Duration::minutes(5), days)
    }

    /// [`issue_client`](Self::issue_client) valid from `not_before` (tests issue expired ones).
    pub fn issue_client_at(
        &self,
        name: &str,
        role: Role,
        not_before: OffsetDateTime,
        days: i64,
    ) -> Result<TlsFiles, PkiError> {
        let good = (1..=64).contains(&name.len())
            && !name.starts_with('.')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !good {
            return Err(PkiError::BadName(name.to_owned()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.subject_alt_names = vec![SanType::URI(
            format!("{ROLE_URI_PREFIX}{role}")
                .try_into()
                .map_err(PkiError::Certificate)?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(&self.client(name), params, not_before, days)
    }

    fn issue(
        &self,
        files: &TlsFiles,
        mut params: CertificateParams,
        not_before: OffsetDateTime,
        days: i64,
    ) -> Result<TlsFiles, PkiError> {
        for path in [&files.cert_file, &files.key_file] {
            if path.exists() {
                return Err(PkiError::Exists(path.clone()));
            }
        }
        let ca_key_pem = read_private_file(&self.ca_key())?;
        let ca_key_pem = std::str::from_utf8(&ca_key_pem)
            .map_err(|_| PkiError::Certificate(rcgen::Error::CouldNotParseKeyPair))?;
        let ca_key = KeyPair::from_pem(ca_key_pem)?;
        let ca_cert = std::fs::read_to_string(self.ca_cert()).map_err(io(&self.ca_cert()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = not_before;
        params.not_after = not_before + Duration::days(days);
        let mut serial = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut serial[..]);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        let key_pem = Zeroizing::new(key.serialize_pem());
        write_new(&files.key_file, key_pem.as_bytes(), 0o600)?;
        write_new(&files.cert_file, cert.pem().as_bytes(), 0o644)?;
        Ok(files.clone())
    }

    /// Creates whatever is missing for a local cluster of `nodes` plus the operator
    /// `client` with role admin: what `evpc-chaos local` (`evpc_testkit::local`) uses.
    pub fn ensure_local(&self, nodes: &[NodeId], client: &str) -> Result<(), PkiError> {
        if !self.exists() {
            self.init("local")?;
        }
        for &id in nodes {
            if !self.node(id).cert_file.exists() {
                self.issue_node(id, DEFAULT_LEAF_DAYS)?;
            }
        }
        if !self.client(client).cert_file.exists() {
            self.issue_client(client, Role::Admin, DEFAULT_LEAF_DAYS)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip_and_only_canonically() {
        assert_eq!(node_of_name(&node_name(3)), Some(3));
        assert_eq!(node_of_name("node-03.evpc"), None);
        assert_eq!(node_of_name("node-+3.evpc"), None);
        assert_eq!(node_of_name("node-0.evpc"), None);
        assert_eq!(node_of_name("node-3.evpc.example"), None);
        assert_eq!(node_of_name(ANY_NODE_NAME), None);
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Reader));
        assert!(!Role::Reader.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
        assert_eq!("operator".parse::<Role>().unwrap(), Role::Operator);
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn init_and_issue_write_owner_only_keys_and_refuse_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init("test").unwrap();
        let node = pki.issue_node(1, 30).unwrap();
        let client = pki.issue_client("alice", Role::Reader, 30).unwrap();
        for key in [
            &pki.ca_key(),
            &node.key_file,
            &client.key_file,
            &pki.cluster_key(),
        ] {
            check_private_file(key).unwrap();
        }
        assert!(matches!(pki.init("again"), Err(PkiError::Exists(_))));
        assert!(matches!(pki.issue_node(1, 30), Err(PkiError::Exists(_))));
        assert!(matches!(
            pki.issue_client("../x", Role::Admin, 30),
            Err(PkiError::BadName(_))
        ));
        std::fs::set_permissions(&node.key_file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let refused = check_private_file(&node.key_file).unwrap_err();
        assert!(refused.to_string().contains("chmod 600"), "{refused}");
    }
}
