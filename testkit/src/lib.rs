//! # evpc's test kit
//!
//! Test beds and fixtures that tests of several crates and the chaos runner share. Nothing here
//! is part of the daemon.
//!
//! - [`local`]: a whole cluster of `evpc-node` processes on loopback ([`local::ProcessCluster`],
//!   and `evpc-chaos local`), with its PKI, bootstrap and fault controls (SIGKILL, pause,
//!   restart).
//! - [`lab`]: the ClusterIP test bed in network namespaces (needs root): node processes and a
//!   client on one bridge, the cluster address flooded to every node through a multicast MAC.
//! - [`vm`]: a throwaway QEMU VM booting the distribution's kernel, which has ESP (the
//!   development kernel does not), with the host's file system read-only inside, so a test
//!   binary re-executes itself there: the kernel data plane's tests run on real kernel ESP.
//! - [`wire`]: ESP packets captured with tcpdump, and the check that no (SPI, sequence
//!   number) went out twice (from a file, or streamed for long campaigns).
//! - [`swan`]: an unmodified strongSwan road warrior (charon with kernel-libipsec) in a
//!   namespace, and readers of its log and SA list.
//!
//! `lab` builds on `local` (the operator certificate, the bootstrap); both drive the daemon from
//! outside, through its configuration, its executable and its APIs.

pub mod lab;
pub mod local;
pub mod swan;
pub mod vm;
pub mod wire;
