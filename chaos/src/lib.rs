//! evpc-chaos
