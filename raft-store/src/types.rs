//! The openraft type configuration: what a log entry carries and how members are addressed.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::command::{Command, Response};
use crate::ids::NodeId;

/// A Raft member's addresses, stored in the replicated membership so every node can reach every
/// other one (and tell clients where the leader is) without extra configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Where the member serves `cluster.v1` (Raft and proposal forwarding), `host:port`.
    pub raft_addr: String,
    /// Where the member serves `admin.v1`, `host:port`.
    pub admin_addr: String,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} admin={}", self.raft_addr, self.admin_addr)
    }
}

openraft::declare_raft_types!(
    /// evpc's Raft types: entries carry a [`Command`], applying one answers a [`Response`].
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Member,
);

/// openraft's types instantiated for evpc.
pub mod raft {
    use super::TypeConfig;

    /// A log entry.
    pub type Entry = openraft::alias::EntryOf<TypeConfig>;
    /// A log id (term + leader + index).
    pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
    /// A vote.
    pub type Vote = openraft::alias::VoteOf<TypeConfig>;
    /// Membership as stored with the state machine.
    pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
    /// Snapshot metadata.
    pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;
    /// A snapshot with its bytes.
    pub type Snapshot = openraft::alias::SnapshotOf<TypeConfig, std::io::Cursor<Vec<u8>>>;
    /// The Raft handle.
    pub type Raft = openraft::Raft<TypeConfig, crate::StateMachineStore>;
}
