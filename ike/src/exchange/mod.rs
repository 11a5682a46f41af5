//! The four exchanges of RFC 7296, as `impl IkeSa` blocks over the shared
//! machinery in [`crate::sa`]: [`init`] (IKE_SA_INIT and the responder's front
//! door), [`auth`] (IKE_AUTH), [`create_child`] (CREATE_CHILD_SA) and
//! [`informational`] (INFORMATIONAL). `proposal` builds and picks SA offers.

pub mod auth;
pub mod create_child;
pub mod informational;
pub mod init;
pub(crate) mod proposal;
