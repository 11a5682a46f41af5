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

    /// Whether inbound ESP SPI `spi` is taken where this policy can see (in a cluster: by any
    /// child SA in the replicated state, or by a deleted one's tombstone). The engine draws
    /// another one then. By default nothing is known to be taken.
    fn child_spi_in_use(&self, _spi: u32) -> bool {
        false
    }
}

/// Draws of an inbound SPI before the engine takes one the policy calls taken anyway (the
/// commit then refuses it, and the peer retries): with 100,000 children in a cluster a draw is
/// taken once in ~43,000, so eight in a row is never.
const FRESH_SPI_DRAWS: usize = 8;

impl crate::Config {
    /// A random inbound ESP SPI (RFC 4303 §2.1: above 255) that
    /// [`ChildPolicy::child_spi_in_use`] does not call taken. Without this, one setup in
    /// ~43,000 failed in a cluster holding 100,000 children: a random 32-bit SPI collided with
    /// one of theirs (the birthday bound), and the commit was refused.
    pub(crate) fn fresh_child_spi(&self, rng: &mut dyn crate::Random) -> u32 {
        let mut spi = crate::random_nonzero_u32(rng);
        if let Some(policy) = &self.child_policy {
            for _ in 1..FRESH_SPI_DRAWS {
                if !policy.child_spi_in_use(spi) {
                    break;
                }
                spi = crate::random_nonzero_u32(rng);
            }
        }
        spi
    }

    /// Asks [`crate::Config::child_policy`], if there is one, about `child`.
    pub(crate) fn admit_child(&self, child: ChildContext<'_>) -> Result<(), crate::PeerError> {
        match &self.child_policy {
            Some(policy) if !policy.admit(child) => Err(crate::PeerError::TsOverlap),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{Config, Identity};

    /// Calls every SPI below `taken_below` taken.
    #[derive(Debug)]
    struct Taken {
        taken_below: u32,
    }

    impl ChildPolicy for Taken {
        fn admit(&self, _: ChildContext<'_>) -> bool {
            true
        }
        fn child_spi_in_use(&self, spi: u32) -> bool {
            spi < self.taken_below
        }
    }

    /// Draws 0x100, 0x101, … (big-endian u32s), so the first draws are "taken".
    fn counting() -> impl crate::Random {
        let mut next = 0x100u32;
        move |buf: &mut [u8]| {
            buf.copy_from_slice(&next.to_be_bytes());
            next += 1;
        }
    }

    #[test]
    fn a_child_spi_the_policy_calls_taken_is_drawn_again() {
        let mut config = Config::new(Identity::fqdn("gw.example"));
        let mut rng = counting();
        assert_eq!(
            config.fresh_child_spi(&mut rng),
            0x100,
            "no policy: the first draw"
        );
        config.child_policy = Some(Arc::new(Taken { taken_below: 0x103 }));
        let mut rng = counting();
        assert_eq!(config.fresh_child_spi(&mut rng), 0x103);
        // Everything taken: bounded draws, then the last one (the commit refuses it).
        config.child_policy = Some(Arc::new(Taken {
            taken_below: u32::MAX,
        }));
        let mut rng = counting();
        assert_eq!(
            config.fresh_child_spi(&mut rng),
            0x100 + FRESH_SPI_DRAWS as u32 - 1
        );
    }
}
