//! Cryptographic suite: algorithm identifiers ([`suite`]), prf/prf+ ([`prf`]),
//! key exchange ([`dh`]), the SK payload ([`sk`]), key derivation and AUTH
//! ([`keys`]), and the [`Secret`] holder for key material.

pub mod dh;
pub mod keys;
pub mod prf;
pub mod secret;
pub mod sk;
pub mod suite;

pub use dh::{DhError, DhPrivate};
pub use keys::{ChildKeymat, IkeKeys};
pub use secret::Secret;
pub use suite::{DhGroup, EncrAlg, EspSuite, IkeSuite, PrfAlg};
