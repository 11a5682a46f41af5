//! evpc-node
