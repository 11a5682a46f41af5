//! evpc-raft-store
