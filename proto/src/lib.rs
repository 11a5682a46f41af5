//! # evpc-proto — evpc's gRPC schemas
//!
//! Two services, generated at build time by protox + tonic-prost-build (no system `protoc`):
//!
//! - [`cluster::v1`]: node to node. Raft (append, vote, pre-vote, transfer leader, snapshot
//!   stream) with openraft's messages postcard-encoded in an envelope, and `Propose`, through
//!   which a follower forwards a command to the leader.
//! - [`admin::v1`]: operators (`evpcctl`) and tools (`evpc-chaos`): status, membership, SA
//!   inspection, delete, export/import.
//!
//! ```text
//!  evpcctl / evpc-chaos ──admin.v1──► any node ──cluster.v1 Propose──► leader
//!                                       leader ──cluster.v1 Raft──────► followers
//! ```

/// Node-to-node protocol.
pub mod cluster {
    /// Version 1.
    #[allow(
        missing_docs,
        clippy::all,
        missing_debug_implementations,
        unreachable_pub
    )]
    pub mod v1 {
        tonic::include_proto!("evpc.cluster.v1");

        impl std::fmt::Debug for InstallKeyRequest {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("InstallKeyRequest")
                    .field("from", &self.from)
                    .field("key_id", &self.key_id)
                    .field("key", &format_args!("<{} bytes, redacted>", self.key.len()))
                    .finish()
            }
        }
    }
}

/// Operators' protocol.
pub mod admin {
    /// Version 1.
    #[allow(
        missing_docs,
        clippy::all,
        missing_debug_implementations,
        unreachable_pub
    )]
    pub mod v1 {
        tonic::include_proto!("evpc.admin.v1");
    }
}
