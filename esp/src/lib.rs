//! evpc-esp
