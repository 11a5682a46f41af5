//! # evpc's test kit
//!
//! Test beds and fixtures that tests of several crates share. Nothing here is part of the
//! daemon.
//!
//! - [`vm`]: a throwaway QEMU VM booting the distribution's kernel, which has ESP (the
//!   development kernel does not), with the host's file system read-only inside, so a test
//!   binary re-executes itself there: the kernel data plane's tests run on real kernel ESP.
//! - [`wire`]: ESP packets captured with tcpdump, and the check that no (SPI, sequence
//!   number) went out twice.

pub mod vm;
pub mod wire;
