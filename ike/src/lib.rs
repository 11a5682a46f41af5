//! `evpc-ike`: a sans-IO IKEv2 engine (RFC 7296) for the evpc gateway cluster.
//!
//! The engine never touches sockets, clocks or an entropy source: the caller
//! passes received datagrams, the current wall-clock time (`now`, milliseconds
//! since the UNIX epoch) and a [`Random`] source, and gets back an
//! [`Outcome`]: datagrams, a state change to commit, events and the next timer.
//! Every state change that matters after IKE_AUTH comes out as a [`Commit`]
//! whose datagrams are released only after the caller made it durable
//! ("commit before respond"), so another node can [`IkeSa::restore`] the SA from
//! the last committed [`IkeSaSnapshot`] and carry on.
//!
//! # Data flow
//!
//! ```text
//!            UDP 500/4500 (non-ESP marker stripped/added by the node)
//!                 │                                    ▲
//!                 ▼                                    │
//!   Router::route(remote, bytes)     SPI and half-open tables, cap, per-source budget
//!        │ NewSa ──► Router::screen   cookie §2.6, proposal, INVALID_KE; no DH
//!        │            │ Admit ──► Router::insert_half_open ──► PendingInit::complete
//!        │            │           (DH and keys, in the SA's own task) ──► IkeSa (half-open)
//!        │ Sa(h)
//!        ▼
//!   IkeSa::handle_datagram / handle_timeout / rekey_* / delete_* / close
//!        │
//!        ▼
//!   Outcome { send, commit: Commit { change, gated datagrams }, events, next_timeout }
//!        │           │                                   │
//!        │           ▼                                   ▼
//!        │     Raft log: StateChange::Upsert(snapshot)   data plane: ChildSaInstalled /
//!        │           │  / Remove                          ChildSaDeleted (ESP keys, SPIs, TS)
//!        │           ▼ durable                            router: Router::on_event
//!        └──► send; then commit.into_datagrams_after_durable() ──► send
//! ```
//!
//! # Call order
//!
//! 1. For each received datagram call [`Router::route`] (see [`Router`] for
//!    the full order): `Sa(h)` goes to [`IkeSa::handle_datagram`] of that SA;
//!    `NewSa` to [`Router::screen`], whose `Admit` is registered with
//!    [`Router::insert_half_open`] and finished with
//!    [`PendingInit::complete`] (the Diffie-Hellman work, best done in the
//!    SA's own task); `Unknown` is an SA the caller may restore. A caller
//!    without a router can use [`wire::route`] and [`Endpoint::accept`]
//!    (screen and complete in one call) directly.
//! 2. Handle the returned [`Outcome`] completely before the next call into the
//!    same SA: send `send`; commit `commit.change` and, once durable, send
//!    `commit.into_datagrams_after_durable()`; then apply `events` (they
//!    describe the state just committed, e.g. ESP SAs to install); arm a
//!    timer for `next_timeout`. If a commit fails, drop the SA object and
//!    restore from the last durable snapshot. Pass each event to
//!    [`Router::on_event`].
//! 3. When [`Event::InnerAddressNeeded`] comes (IKE_AUTH with a CP request),
//!    allocate an address (through the cluster) and call
//!    [`IkeSa::assign_inner_address`]; the IKE_AUTH answer is built only then.
//! 4. At `next_timeout` call [`IkeSa::handle_timeout`]: retransmissions with
//!    exponential back-off (§2.1), DPD, rekeys, expiry, half-open expiry. At
//!    [`Router::poll_timeout`] call [`Router::handle_timeout`] (cookie secret
//!    rotation, half-open SAs to drop).
//! 5. Gateway-initiated work: [`IkeSa::send_dpd`], [`IkeSa::rekey_child`],
//!    [`IkeSa::rekey_ike`], [`IkeSa::create_child`], [`IkeSa::delete_child`],
//!    [`IkeSa::close`]. Requests wait in a committed queue while another one
//!    is outstanding (window size 1).
//! 6. On [`Event::Closed`] drop the SA ([`Router::on_event`] already
//!    followed [`Event::IkeSaRekeyed`] and [`Event::LocalSpiReleased`]).
//! 7. On fail-over: [`IkeSa::restore`] each committed snapshot,
//!    [`Router::insert`] its [`IkeSa::local_spis`], then call
//!    `handle_timeout` at `next_timeout` (due at once when a request of ours was
//!    outstanding: it is resent byte-for-byte).
//!
//! Half-open SAs (between IKE_SA_INIT and IKE_AUTH) are deliberately not
//! committed: they are cheap to recreate, a flood of them must not reach the
//! replicated log, and a client whose half-open SA died with its node simply
//! times out and starts again. Everything from IKE_AUTH on is committed.
//!
//! A client-side initiator uses the same type: [`IkeSa::connect`].
//!
//! # Whose addresses a child SA may cover
//!
//! As the responder the engine narrows (RFC 7296 §2.9) the peer's side of
//! every child SA (TSi) to the inner address it handed out (a /32), else to
//! the peer's own [`PskEntry::remote_ts`] (a site-to-site peer), else to
//! [`Config::remote_ts`]. With [`Config::require_inner_address`] that last
//! fallback is gone: such a peer gets no child SA (FAILED_CP_REQUIRED in
//! IKE_AUTH, TS_UNACCEPTABLE in CREATE_CHILD_SA; the IKE SA stays up). A
//! gateway with an address pool sets it, or one road warrior could claim
//! 0.0.0.0/0 and with it the return traffic of every other peer. Last,
//! [`Config::child_policy`] sees the narrowed selectors and may refuse them
//! (TS_UNACCEPTABLE), e.g. because another SA of the cluster holds them.
//! As the initiator the engine accepts no selectors wider than it proposed.
//!
//! # Modules
//!
//! [`wire`] parses and emits messages (one file per payload group), [`crypto`]
//! holds the suite (AES-GCM-16 SK payload, HMAC-SHA2 prf/prf+, groups 31, 19
//! and 14, key derivation, PSK AUTH), [`sa`] the per-SA machinery (routing to
//! a generation, message-ID window, retransmission, timers, outcome), and
//! [`exchange`] the four exchanges, [`router`] the demultiplexer and flood
//! protection in front of them. [`snapshot`] is the committed state,
//! [`outcome`] what comes back from a call, [`error`] what peers do wrong,
//! [`policy`] the caller's admission hook for child SAs.
//!
//! # Notes for the node
//!
//! - Every authenticated request the peer sends (DPD included) moves the
//!   message-ID window, so its answer is a commit: a restored SA must expect
//!   the right next message ID. Retransmissions are answered without one.
//! - SK payload IVs are random, not counters: a counter restored from an
//!   older snapshot could repeat an IV under the same key.
//! - Snapshots contain key material in the clear (as [`Secret`]s, which
//!   redact `Debug` and zeroize on drop). Seal them before they leave memory.
//! - ESP SPIs are random (> 255); uniqueness across the cluster is the data
//!   plane's to check when it installs a [`ChildSaInfo`].

#![forbid(unsafe_code)]

pub(crate) mod bytes_serde;
pub mod config;
pub mod crypto;
pub mod error;
pub mod exchange;
pub mod outcome;
pub mod policy;
pub mod router;
pub mod sa;
pub mod snapshot;
pub mod wire;

pub use config::{Config, EspPolicy, IkePolicy, Lifetimes, PskEntry, RetransmitPolicy};
pub use crypto::{DhGroup, EncrAlg, EspSuite, IkeSuite, PrfAlg, Secret};
pub use error::{ApiError, PeerError, Reaction};
pub use exchange::init::{Accepted, Endpoint, HalfOpenKey, PendingInit, Screened};
pub use outcome::{ChildSaInfo, CloseReason, Commit, Datagram, Event, Outcome, StateChange};
pub use policy::{ChildContext, ChildPolicy};
pub use router::{Dispatch, DropReason, Router, RouterError, RouterLimits};
pub use sa::{ConnectOptions, IkeSa};
pub use snapshot::{IkeSaSnapshot, InnerAddress, Role};
pub use wire::{Identity, Route, TrafficSelector};

/// Source of randomness (nonces, SPIs, DH private values, IVs). Must be a
/// CSPRNG in production; tests pass a seeded generator.
pub trait Random {
    fn fill(&mut self, dest: &mut [u8]);
}

impl<F: FnMut(&mut [u8])> Random for F {
    fn fill(&mut self, dest: &mut [u8]) {
        self(dest)
    }
}

pub(crate) fn random_bytes(rng: &mut dyn Random, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v);
    v
}

pub(crate) fn random_u64(rng: &mut dyn Random) -> u64 {
    let mut b = [0u8; 8];
    rng.fill(&mut b);
    u64::from_be_bytes(b)
}

pub(crate) fn random_nonzero_u64(rng: &mut dyn Random) -> u64 {
    loop {
        let v = random_u64(rng);
        if v != 0 {
            return v;
        }
    }
}

/// ESP SPIs 1..=255 are reserved (RFC 4303 §2.1), so we draw from 256 up.
pub(crate) fn random_nonzero_u32(rng: &mut dyn Random) -> u32 {
    loop {
        let mut b = [0u8; 4];
        rng.fill(&mut b);
        let v = u32::from_be_bytes(b);
        if v > 255 {
            return v;
        }
    }
}
