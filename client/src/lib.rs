//! # evpc-client — an end-user VPN client made of the cluster's own parts
//!
//! One process is one road warrior: it brings up the **userspace ESP data plane** of
//! `evpc-dataplane` (the same [`UserspaceDriver`](evpc_dataplane::userspace::UserspaceDriver)
//! a gateway runs) on its own outer address, runs the **IKEv2 initiator** of `evpc-ike`
//! ([`IkeSa::connect`](evpc_ike::IkeSa::connect), PSK, an inner address asked for by CP, NAT-T
//! forced so ESP goes in UDP) against the gateway, puts the inner address and the routes on its
//! TUN device once the SA is up, starts every child SA the engine installs, and **reports what
//! it sees as one JSON object per line on stdout** ([`report`]). `evpc-chaos tunnels` starts
//! hundreds of them, each in its own network namespace, to check the cluster's guarantees at
//! the client over real traffic; so it is small (one thread of its own, a few data-plane
//! workers) and it never hides anything: it never re-authenticates, and when its IKE SA ends
//! it says why and exits with status 3.
//!
//! ```text
//!  one network namespace, one process
//!
//!  app ─► route CIDR dev TUN src inner ─► UserspaceDriver: seal ──► UDP 4500 ──────────► gateway
//!  app ◄─ inner/32 on TUN ◄────────────── UserspaceDriver: open ◄── UDP 4500 ◄────────── gateway
//!                                          │ IKE: UDP 500, then 4500 behind the non-ESP marker
//!                                          ▼                                  ▲
//!          IkeReceiver ─► Session::on_ike ─┐                                  │ send_ike
//!          engine deadline ─► on_timeout ──┼─► IkeSa (sans-IO) ─► Outcome ───┤ send, and the
//!          --dpd-s tick ─► send_dpd ───────┘                        │         │ commit's datagrams
//!                                                                   │         │ at once (state
//!                                                                   ▼ events    kept in memory)
//!          IkeSaEstablished ─► ip addr inner/32 dev TUN; ip route CIDR dev TUN src inner
//!          ChildSaInstalled ─► child_start() ─► SaDriver::start
//!          ChildSaDeleted ──► SaDriver::stop (final counters)
//!          Closed ──────────► "closed", exit 3 — never a second IKE_AUTH
//!          every --counters-ms: SaDriver::counters + the driver's metrics ─► "counters"
//!
//!          every line ─► Reporter ─► stdout, one write and one flush per line ─► the runner
//! ```
//!
//! The parts:
//! - [`settings`]: the command line (clap) and its validation into [`Settings`], the PSK
//!   (owner-only file or environment variable; never shown by `Debug`, never logged);
//! - [`session`]: the sans-IO heart: drives the engine, maps its events to data-plane calls and
//!   report lines, against the [`DataPlane`] trait (so it runs in tests without root);
//! - [`child`]: an engine child ([`evpc_ike::ChildSaInfo`]) as the data plane's
//!   [`ChildStart`](evpc_dataplane::ChildStart): no lease at a client, the whole counter space;
//! - [`report`]: the JSON lines, exactly;
//! - [`metrics`]: a tiny `metrics` recorder that keeps the data plane's `evpc_dataplane_*`
//!   counters (bytes, drops of every kind) for the `counters` line;
//! - [`run`](mod@run): the async shell: the real data plane, sockets, timers, signals.
//!
//! Exit status: 0 after SIGTERM/SIGINT, 3 when the IKE SA closed (or never came up),
//! 2 for bad arguments or an unusable PSK, 1 for anything else (see [`Exit`]).

#![forbid(unsafe_code)]

pub mod child;
pub mod clock;
pub mod error;
pub mod metrics;
pub mod report;
pub mod run;
pub mod session;
pub mod settings;

pub use clock::{Clock, Now};
pub use error::ClientError;
pub use run::{Exit, run};
pub use session::{DataPlane, Session};
pub use settings::{Args, Prefix, Psk, Settings};
