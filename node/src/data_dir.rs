//! A node's data directory: whose it is, and whether it is as new as what the node promised.
//!
//! Raft's safety rests on each member remembering what it acknowledged: entries it made durable
//! and votes it cast. A data directory restored from a backup, wiped and restarted under the
//! same id, or copied from another node or cluster breaks that silently — a committed lease can
//! be lost, and a new owner then sends sequence numbers again (with AES-GCM a nonce reuse). So
//! before a node takes part in Raft:
//!
//! 1. **identity** — `data_dir/identity.toml` names the node id (and, once known, the cluster
//!    id). A directory of another node id, or whose state belongs to another cluster than its
//!    identity says, is refused at once;
//! 2. **check-in** — the node asks its peers (cluster.v1 `CheckIn`) what they know about it: the
//!    cluster id and the log index up to which the leader recorded it as having acknowledged
//!    entries (`Command::RecordAcks`). If its log ends below that, it lost acknowledged entries;
//!    if the peers' cluster is another one, the directory is foreign. Either way it refuses to
//!    start, and says how to rejoin as a new member.
//!
//! ```text
//!  start ─► identity.toml ok? ─► open log/state ─► CheckIn every peer ─► judge(answers) ─► join Raft
//!             │ no: ForeignNode                       (no answer in time: a whole-cluster
//!             └──────────────────────────────────────  restart; join with a warning)
//! ```
//!
//! The recorded mark lags the real one by up to the leader's recording interval, so only a
//! backup older than that is caught; a restore from seconds before is not.

use std::io::Write;
use std::path::{Path, PathBuf};

use evpc_raft_store::{ClusterId, NodeId};
use serde::{Deserialize, Serialize};

/// The identity file in a data directory.
pub const IDENTITY_FILE: &str = "identity.toml";

/// What a data directory says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    /// The node id that owns this directory.
    pub node: NodeId,
    /// The cluster this node belongs to, once it learned it (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
}

/// What a peer answered to a check-in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckInAnswer {
    /// The peer.
    pub from: NodeId,
    /// Its cluster, if it has one.
    pub cluster: Option<ClusterId>,
    /// Up to where it has this node recorded as having acknowledged the log.
    pub acknowledged: u64,
}

/// Why a node refuses to start on this data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory is another node's.
    #[error(
        "data_dir {dir} belongs to node {found}, but this configuration is node {configured}; \
         point data_dir at node {configured}'s directory, or start node {configured} on an \
         empty one and add it as a new member (evpcctl member add)"
    )]
    ForeignNode {
        /// The directory.
        dir: PathBuf,
        /// The node id in its identity file.
        found: NodeId,
        /// The node id in the configuration.
        configured: NodeId,
    },
    /// The directory (or the cluster the peers form) is another cluster's.
    #[error(
        "data_dir {dir} belongs to cluster {ours}, but {whose} is cluster {theirs}; this \
         directory is not this cluster's: move it aside and join as a new member with a new \
         node id and an empty data_dir (evpcctl member remove {node}; evpcctl member add ...)"
    )]
    ForeignCluster {
        /// The directory.
        dir: PathBuf,
        /// This node.
        node: NodeId,
        /// The cluster the directory says.
        ours: ClusterId,
        /// The other cluster.
        theirs: ClusterId,
        /// Who says so ("peer 2", "the state in it").
        whose: String,
    },
    /// The directory is older than what this node acknowledged: a restored backup, or a wiped
    /// directory under a used node id.
    #[error(
        "data_dir {dir} ends at log index {last_log_index}, but peer {peer} has node {node} \
         recorded as having acknowledged entries up to {acknowledged}: this directory was \
         restored from an older copy (or wiped), and Raft's safety needs every acknowledged \
         entry and vote. Do not start node {node} on it. Move it aside, remove the member \
         (evpcctl member remove {node}) and add this machine as a new member with a new node id \
         and an empty data_dir (evpcctl member add --id NEW ...)"
    )]
    RolledBack {
        /// The directory.
        dir: PathBuf,
        /// This node.
        node: NodeId,
        /// Where its log ends.
        last_log_index: u64,
        /// What the peer has recorded.
        acknowledged: u64,
        /// The peer.
        peer: NodeId,
    },
    /// The identity file cannot be read or written.
    #[error("data_dir {dir}: {reason}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

fn io(dir: &Path, what: &str, e: impl std::fmt::Display) -> DataDirError {
    DataDirError::Io {
        dir: dir.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

/// Writes `identity` atomically (temporary file, fsync, rename, fsync of the directory), owner
/// read/write only.
fn write_identity(dir: &Path, identity: &Identity) -> Result<(), DataDirError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(IDENTITY_FILE);
    let temporary = path.with_extension("tmp");
    let text = toml::to_string(identity).map_err(|e| io(dir, "encoding the identity", e))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(|e| io(dir, "writing identity.toml", e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io(dir, "writing identity.toml", e))?;
    std::fs::rename(&temporary, &path).map_err(|e| io(dir, "writing identity.toml", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, "syncing the directory", e))
}

/// Reads the directory's identity, creating it for node `configured` if the directory has
/// none (a new directory, or one from before identities existed); refuses another node's.
pub fn load_or_create(dir: &Path, configured: NodeId) -> Result<Identity, DataDirError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let identity: Identity =
                toml::from_str(&text).map_err(|e| io(dir, "identity.toml is not valid", e))?;
            if identity.node != configured {
                return Err(DataDirError::ForeignNode {
                    dir: dir.to_owned(),
                    found: identity.node,
                    configured,
                });
            }
            if let Some(cluster) = &identity.cluster {
                cluster
                    .parse::<ClusterId>()
                    .map_err(|e| io(dir, "identity.toml", e))?;
            }
            Ok(identity)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let identity = Identity {
                node: configured,
                cluster: None,
            };
            write_identity(dir, &identity)?;
            Ok(identity)
        }
        Err(e) => Err(io(dir, "reading identity.toml", e)),
    }
}

impl Identity {
    /// The cluster id it names.
    pub fn cluster_id(&self) -> Option<ClusterId> {
        self.cluster.as_deref().and_then(|c| c.parse().ok())
    }

    /// Records the cluster this node belongs to (once): later starts compare against it.
    pub fn record_cluster(&mut self, dir: &Path, cluster: ClusterId) -> Result<(), DataDirError> {
        if self.cluster_id() == Some(cluster) {
            return Ok(());
        }
        let mut updated = self.clone();
        updated.cluster = Some(cluster.to_string());
        write_identity(dir, &updated)?;
        *self = updated;
        Ok(())
    }
}

/// Whether the state recovered from the directory belongs to the cluster its identity names.
pub fn check_state(
    dir: &Path,
    node: NodeId,
    identity: &Identity,
    recovered: Option<ClusterId>,
) -> Result<(), DataDirError> {
    match (identity.cluster_id(), recovered) {
        (Some(ours), Some(theirs)) if ours != theirs => Err(DataDirError::ForeignCluster {
            dir: dir.to_owned(),
            node,
            ours,
            theirs,
            whose: "the Raft state in it".into(),
        }),
        _ => Ok(()),
    }
}

/// Judges the peers' answers to a check-in: a node whose log ends at `last_log_index`, whose
/// directory belongs to `ours` (if it knows), may join unless a peer is of another cluster or
/// has it recorded beyond its log.
pub fn judge(
    dir: &Path,
    node: NodeId,
    ours: Option<ClusterId>,
    last_log_index: u64,
    answers: &[CheckInAnswer],
) -> Result<(), DataDirError> {
    for answer in answers {
        if let (Some(ours), Some(theirs)) = (ours, answer.cluster)
            && ours != theirs
        {
            return Err(DataDirError::ForeignCluster {
                dir: dir.to_owned(),
                node,
                ours,
                theirs,
                whose: format!("peer {}", answer.from),
            });
        }
    }
    if let Some(worst) = answers.iter().max_by_key(|a| a.acknowledged)
        && worst.acknowledged > last_log_index
    {
        return Err(DataDirError::RolledBack {
            dir: dir.to_owned(),
            node,
            last_log_index,
            acknowledged: worst.acknowledged,
            peer: worst.from,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(from: NodeId, cluster: Option<u8>, acknowledged: u64) -> CheckInAnswer {
        CheckInAnswer {
            from,
            cluster: cluster.map(|b| ClusterId([b; 16])),
            acknowledged,
        }
    }

    #[test]
    fn a_directory_belongs_to_one_node_and_remembers_its_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let mut identity = load_or_create(dir.path(), 3).unwrap();
        assert_eq!(identity.cluster_id(), None);
        identity
            .record_cluster(dir.path(), ClusterId([7; 16]))
            .unwrap();
        let again = load_or_create(dir.path(), 3).unwrap();
        assert_eq!(again.cluster_id(), Some(ClusterId([7; 16])));
        let err = load_or_create(dir.path(), 4).unwrap_err();
        assert!(matches!(
            err,
            DataDirError::ForeignNode {
                found: 3,
                configured: 4,
                ..
            }
        ));
        assert!(err.to_string().contains("new member"), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "identity.toml is owner-only");
        // State of another cluster in a directory that names this one.
        assert!(matches!(
            check_state(dir.path(), 3, &again, Some(ClusterId([8; 16]))),
            Err(DataDirError::ForeignCluster { .. })
        ));
        check_state(dir.path(), 3, &again, Some(ClusterId([7; 16]))).unwrap();
    }

    #[test]
    fn a_rolled_back_or_foreign_directory_is_refused() {
        let dir = Path::new("/var/lib/evpc");
        let ours = Some(ClusterId([1; 16]));
        judge(
            dir,
            2,
            ours,
            500,
            &[answer(1, Some(1), 480), answer(3, None, 0)],
        )
        .unwrap();
        judge(dir, 2, ours, 500, &[]).unwrap();
        let err = judge(
            dir,
            2,
            ours,
            500,
            &[answer(1, Some(1), 10), answer(3, Some(1), 900)],
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                DataDirError::RolledBack {
                    acknowledged: 900,
                    peer: 3,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("member add"), "{err}");
        assert!(matches!(
            judge(dir, 2, ours, 500, &[answer(1, Some(9), 0)]),
            Err(DataDirError::ForeignCluster { .. })
        ));
        // A directory that never learned its cluster cannot be judged foreign, only old.
        judge(dir, 2, None, 500, &[answer(1, Some(9), 0)]).unwrap();
    }
}
