//! Child SA admission: the caller's last word on a child SA's traffic
//! selectors, after the engine narrowed them (RFC 7296 §2.9) and before it
//! answers.
//!
//! Narrowing alone only keeps a peer inside what *its own* policy allows (its
//! inner address, its [`crate::PskEntry::remote_ts`], or
//! [`crate::Config::remote_ts`]). Whether those addresses are already claimed
//! by another IKE SA is cluster state the engine does not have; a
//! [`ChildPolicy`] answers that question for it, in the style of a rustls
//! verifier: an object in the [`crate::Config`], called synchronously.

use std::net::Ipv4Addr;

use crate::wire::{ExchangeType, Identity, TrafficSelector};

/// A child SA the engine is about to create or rekey as the responder of the
/// exchange, with its selectors already narrowed.
///
/// Our SPIs and the peer's are those of the IKE SA generation the request
/// arrived on (always the current one: children are refused on a retiring
/// generation, §2.25.2). After an IKE rekey (§1.3.2) the same IKE SA goes by
/// new SPIs; the node follows them through [`crate::Event::IkeSaRekeyed`].
#[derive(Clone, Copy, Debug)]
pub struct ChildContext<'a> {
    /// IKE_AUTH (the first child, §1.2) or CREATE_CHILD_SA (§1.3).
    pub exchange: ExchangeType,
    /// Our SPI of the IKE SA: what the node routes the SA by.
    pub local_ike_spi: u64,
    /// The IKE SA's initiator SPI (§3.1).
    pub ike_spi_i: u64,
    /// The IKE SA's responder SPI (§3.1).
    pub ike_spi_r: u64,
    /// The authenticated peer identity (IDi, §3.5).
    pub peer_identity: &'a Identity,
    /// The inner address the peer holds (CP, §2.19), if it has one.
    pub inner_address: Option<Ipv4Addr>,
    /// The peer's side after narrowing: TSi, as we answer the peer's request.
    pub remote_ts: &'a [TrafficSelector],
    /// Our side after narrowing: TSr.
    pub local_ts: &'a [TrafficSelector],
    /// For a child rekey (§1.3.3): our inbound SPI of the child SA it
    /// replaces. `None` for a new child SA.
    pub rekey_of: Option<u32>,
}

/// Decides whether a narrowed child SA may be created (see the module docs).
///
/// Called by the engine after narrowing and before it builds any response, in
/// IKE_AUTH and in CREATE_CHILD_SA (new children and rekeys alike), only when
/// the peer proposed the selectors. `false` refuses the child with
/// TS_UNACCEPTABLE ([`crate::PeerError::TsOverlap`]); in IKE_AUTH the IKE SA
/// is still established (§1.2), like a child refused for any other reason.
///
/// # Contract
///
/// - No I/O and no blocking: the engine is sans-IO and calls this inline,
///   while it holds the SA. Read a snapshot of shared state (e.g. an
///   `ArcSwap` or a briefly held lock over the committed children's
///   selectors) and return quickly; the call is on the path of every
///   IKE_AUTH and CREATE_CHILD_SA.
/// - A rekey's new child covers the same selectors as its predecessor by
///   design (both live until the old one is deleted, §2.8), and children of
///   one IKE SA may overlap each other. Overlaps with the same IKE SA (the
///   SPIs in the context) or with `rekey_of` must therefore be allowed;
///   refuse only overlaps with *other* IKE SAs or other peers.
/// - `true` is neither a reservation nor a promise: the child may still fail
///   afterwards (e.g. an invalid KE value), and between this call and the
///   commit of the new child another node may admit an overlapping one. The
///   child exists once its [`crate::Event::ChildSaInstalled`] is committed;
///   where a race matters, the replicated state machine must check again
///   when it applies that commit.
///
/// When we initiate the exchange the hook is not consulted: for a rekey we
/// propose the old child's selectors and accept nothing wider back, and the
/// selectors of [`crate::IkeSa::create_child`] are the caller's own choice.
pub trait ChildPolicy: Send + Sync + std::fmt::Debug {
    /// `true` admits the child SA, `false` refuses it with TS_UNACCEPTABLE.
    fn admit(&self, child: ChildContext<'_>) -> bool;
}

impl crate::Config {
    /// Asks [`crate::Config::child_policy`], if there is one, about `child`.
    pub(crate) fn admit_child(&self, child: ChildContext<'_>) -> Result<(), crate::PeerError> {
        match &self.child_policy {
            Some(policy) if !policy.admit(child) => Err(crate::PeerError::TsOverlap),
            _ => Ok(()),
        }
    }
}
