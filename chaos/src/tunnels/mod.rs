//! `evpc-chaos tunnels`: real tunnels under fire, measured at the clients (issue 11; being
//! built).

pub mod traffic;

pub use evpc_testkit::lab::SERVER;
