//! evpc-proto
