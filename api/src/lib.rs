//! evpc-api
