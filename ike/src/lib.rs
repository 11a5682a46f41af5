//! evpc-ike
