//! One sans-IO demultiplexer for IKE over UDP, with flood protection.
//!
//! Every responder needs the same tables in front of its SAs: which task
//! answers to which local IKE SPI, which half-open SA a retransmitted
//! IKE_SA_INIT belongs to (it carries no SPI of ours yet, RFC 7296 §2.1), and
//! how many half-open SAs exist, since each costs a Diffie-Hellman
//! computation and memory before the peer proved anything. [`Router`] owns
//! these tables, keeps them in step with the engine's [`Event`]s and decides
//! admission, so the node gateway, the test harnesses and the benchmark do
//! not each keep a hand-written copy.
//!
//! # Flood protection
//!
//! Three limits, cheapest first:
//!
//! - **Cookies** (§2.6): from [`Config::cookie_threshold`] half-open SAs on,
//!   an IKE_SA_INIT without a valid cookie gets a stateless COOKIE reply. A
//!   spoofed source never sees it, so beyond the threshold only peers that
//!   receive at their address get an SA. The secret rotates every
//!   [`RouterLimits::cookie_rotation_ms`]; a cookie stays valid for one
//!   rotation after the one that issued it.
//! - **Per-source budget**: a source (an IPv4 address, or an IPv6 /64, the
//!   smallest block a host is normally given) holding
//!   [`RouterLimits::max_half_open_per_source`] half-open SAs gets its next
//!   IKE_SA_INIT dropped. Cookies do not stop a flood from real addresses;
//!   this keeps one of them from taking the whole table.
//! - **Hard cap**: at [`RouterLimits::max_half_open`] every new IKE_SA_INIT is
//!   dropped, whatever it carries, so memory and Diffie-Hellman work have a
//!   bound even under a distributed flood that answers cookies.
//!
//! Dropping is silent (the peer retransmits, §2.1) and costs two hash
//! lookups: [`Router::route`] never allocates.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use crate::config::Config;
use crate::exchange::init::{Endpoint, HalfOpenKey, Screened};
use crate::outcome::Event;
use crate::wire::{self, Route};
use crate::{Random, Secret};

/// How many half-open SAs the router admits, and how often cookies change.
///
/// The cookie threshold itself is [`Config::cookie_threshold`] (the
/// [`Endpoint`] applies it); how long an SA may stay half-open is
/// [`crate::Lifetimes::half_open_timeout_ms`], the same deadline the SA
/// itself keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterLimits {
    /// Hard cap on half-open SAs. Default 10,000: a legitimate handshake is
    /// half-open for one round trip (IKE_SA_INIT answered, IKE_AUTH not yet
    /// received), so 10,000 at once is ~100,000 handshakes a second at a
    /// 100 ms round trip, well beyond the Diffie-Hellman throughput of a
    /// gateway node; the cap only binds under attack. A half-open SA holds
    /// both IKE_SA_INIT messages and its keys, a few kilobytes, so the cap
    /// bounds that memory to tens of megabytes.
    pub max_half_open: usize,
    /// Half-open SAs one source may hold. Default 16: a host opens one SA
    /// at a time, and a NAT in front of many clients rarely has 16 of them
    /// between IKE_SA_INIT and IKE_AUTH in the same round trip. The ones
    /// beyond are dropped and get in on their retransmission (§2.1: after
    /// one second, then two, ...), so a reconnect storm behind one NAT is
    /// slowed down, not refused.
    pub max_half_open_per_source: usize,
    /// Interval of cookie secret rotation (§2.6 recommends changing it
    /// regularly). Default 60 s: a cookie is checked against the current and
    /// the previous secret, so it stays valid for 60 to 120 s, much longer
    /// than the one round trip a peer needs to resend its IKE_SA_INIT with it,
    /// and a harvested cookie is useless two minutes later.
    pub cookie_rotation_ms: u64,
    /// Most half-open expiries one [`Router::handle_timeout`] call handles,
    /// so that a burst of expiries never blocks the dispatcher; the rest are
    /// due at once in [`Router::poll_timeout`]. Default 256.
    pub max_expired_per_call: usize,
}

impl Default for RouterLimits {
    fn default() -> Self {
        Self {
            max_half_open: 10_000,
            max_half_open_per_source: 16,
            cookie_rotation_ms: 60_000,
            max_expired_per_call: 256,
        }
    }
}

impl RouterLimits {
    /// Checks the limits against the endpoint's `config`.
    pub fn validate(&self, config: &Config) -> Result<(), RouterError> {
        if self.max_half_open == 0 {
            return Err(RouterError::InvalidLimits("max_half_open must be positive"));
        }
        if self.max_half_open_per_source == 0 {
            return Err(RouterError::InvalidLimits(
                "max_half_open_per_source must be positive",
            ));
        }
        if self.cookie_rotation_ms == 0 {
            return Err(RouterError::InvalidLimits(
                "cookie_rotation_ms must be positive",
            ));
        }
        if self.max_expired_per_call == 0 {
            return Err(RouterError::InvalidLimits(
                "max_expired_per_call must be positive",
            ));
        }
        if config.cookie_threshold > self.max_half_open {
            // The cap would drop everything before a cookie is ever asked
            // for: a spoofed flood would fill the table unchallenged.
            return Err(RouterError::InvalidLimits(
                "cookie_threshold above max_half_open: cookies would never be demanded",
            ));
        }
        Ok(())
    }
}

/// Where [`Router::route`] sends a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch<H> {
    /// To the SA task `H`: a known local SPI, or a retransmitted IKE_SA_INIT
    /// of a half-open SA.
    Sa(H),
    /// An IKE_SA_INIT nobody holds, within the admission limits: call
    /// [`Router::screen`].
    NewSa { initiator_spi: u64 },
    /// Any other message for a local SPI no task holds. The caller decides:
    /// a cluster node may own the SA in its committed state and restore it
    /// (then [`Router::insert`]), or stay silent (§2.21.4: INVALID_IKE_SPI
    /// is optional).
    Unknown { local_spi: u64 },
    /// Not to be answered.
    Drop(DropReason),
}

/// Why [`Router::route`] dropped a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DropReason {
    /// Too short for an IKE header, or SPIs and flags no IKE SA could have
    /// (e.g. a zero initiator SPI, or a zero responder SPI outside IKE_SA_INIT).
    #[error("not an IKE message that could be routed")]
    Unroutable,
    /// [`RouterLimits::max_half_open`] half-open SAs exist.
    #[error("the cap on half-open SAs is reached")]
    HalfOpenCap,
    /// The source holds [`RouterLimits::max_half_open_per_source`] half-open SAs.
    #[error("the source has used its budget of half-open SAs")]
    SourceBudget,
}

/// Caller mistakes (and the astronomically rare SPI collision) the router
/// refuses rather than corrupt its tables. A refused call changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouterError {
    #[error("invalid router limits: {0}")]
    InvalidLimits(&'static str),
    #[error("half-open SA not admitted: {0}")]
    Admission(DropReason),
    #[error("the handle is already known to the router")]
    HandleInUse,
    #[error("the handle is not known to the router (removed or expired)")]
    UnknownHandle,
    #[error("a half-open SA already answers to this peer address and initiator SPI")]
    HalfOpenKeyInUse,
    #[error("local SPI {0:016x} is routed to another SA")]
    SpiInUse(u64),
}

/// The half-open part of an SA's routes.
#[derive(Clone, Copy, Debug)]
struct HalfOpen {
    key: HalfOpenKey,
    source: IpAddr,
    /// Key in `Router::expiry`: (deadline, insertion sequence number).
    expiry: (u64, u64),
}

/// Everything routed to one handle: the reverse index, so that removing a
/// handle costs its own entries, not a table scan.
#[derive(Clone, Debug, Default)]
struct Entry {
    spis: Vec<u64>,
    half_open: Option<HalfOpen>,
}

/// The demultiplexer in front of a responder's IKE SAs; `H` is the caller's
/// handle for one SA (a slot index, a task id).
///
/// # Call order
///
/// 1. For each received datagram (non-ESP marker stripped) call
///    [`Router::route`]:
///    - [`Dispatch::Sa`]: hand it to that SA ([`crate::IkeSa::handle_datagram`]).
///    - [`Dispatch::NewSa`]: call [`Router::screen`] (stateless: cookie,
///      proposal, KE group). On [`Screened::Reply`] send the reply; on
///      [`Screened::Admit`] pick a handle, [`Router::insert_half_open`] it
///      under the pending request's [`key`](crate::PendingInit::key) and
///      [`local_spi`](crate::PendingInit::local_spi) (from now on
///      retransmissions and the IKE_AUTH reach it), then call
///      [`PendingInit::complete`](crate::PendingInit::complete), preferably
///      in the SA's own task: that is the Diffie-Hellman work. If it does
///      not return `NewSa`, [`Router::remove`] the handle.
///    - [`Dispatch::Unknown`]: the caller's choice; an SA restored from a
///      snapshot (or one we initiate) is made known with [`Router::insert`].
///    - [`Dispatch::Drop`]: send nothing.
/// 2. Pass every [`Event`] an SA's [`crate::Outcome`] carries to
///    [`Router::on_event`], after the outcome's commit is durable (the
///    events describe the committed state): it follows IKE rekeys
///    ([`Event::IkeSaRekeyed`], [`Event::LocalSpiReleased`]), frees the
///    half-open budget on [`Event::IkeSaEstablished`] and forgets the SA on
///    [`Event::Closed`]. [`Router::established`] and [`Router::remove`] do the
///    last two directly (e.g. when the caller drops an SA for its own reasons).
/// 3. Call [`Router::handle_timeout`] when [`Router::poll_timeout`] is due:
///    it rotates the cookie secret and returns the half-open SAs whose
///    deadline passed, already forgotten; drop them.
///
/// The router holds no SA objects, so a multi-task gateway can keep it behind
/// one lock (or in its dispatcher) while the SAs run elsewhere. Its tables
/// are std `HashMap`s with randomly keyed SipHash, as the keys (SPIs,
/// addresses) are chosen by peers; nothing iterates them, so results do not
/// depend on their order.
pub struct Router<H> {
    endpoint: Endpoint,
    limits: RouterLimits,
    by_spi: HashMap<u64, H>,
    half_open: HashMap<HalfOpenKey, H>,
    per_source: HashMap<IpAddr, usize>,
    /// Half-open deadlines in order, so expiry never scans a table.
    expiry: BTreeMap<(u64, u64), H>,
    entries: HashMap<H, Entry>,
    next_seq: u64,
    next_rotation_ms: u64,
}

impl<H> core::fmt::Debug for Router<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Counts only: the tables can hold tens of thousands of entries.
        f.debug_struct("Router")
            .field("limits", &self.limits)
            .field("sas", &self.entries.len())
            .field("spis", &self.by_spi.len())
            .field("half_open", &self.half_open.len())
            .field("next_rotation_ms", &self.next_rotation_ms)
            .finish_non_exhaustive()
    }
}

/// The budget a source address counts against: IPv4 addresses one by one,
/// IPv6 by /64 (one host can pick any address of its /64, RFC 4291 §2.5.1
/// interface identifiers). IPv4-mapped IPv6 addresses count as IPv4.
fn source_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(a) => {
            let prefix = u128::from(a) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

impl<H: Copy + Eq + Hash + core::fmt::Debug> Router<H> {
    /// A router in front of `endpoint`. `now` (ms since the UNIX epoch)
    /// starts the cookie rotation schedule.
    pub fn new(endpoint: Endpoint, limits: RouterLimits, now: u64) -> Result<Self, RouterError> {
        limits.validate(endpoint.config())?;
        let next_rotation_ms = now.saturating_add(limits.cookie_rotation_ms);
        Ok(Self {
            endpoint,
            limits,
            by_spi: HashMap::new(),
            half_open: HashMap::new(),
            per_source: HashMap::new(),
            expiry: BTreeMap::new(),
            entries: HashMap::new(),
            next_seq: 0,
            next_rotation_ms,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn limits(&self) -> &RouterLimits {
        &self.limits
    }

    /// Half-open SAs now (what the cookie threshold and the cap count).
    pub fn half_open_len(&self) -> usize {
        self.half_open.len()
    }

    /// Half-open SAs counted against the budget of `ip`'s source.
    pub fn half_open_from(&self, ip: IpAddr) -> usize {
        self.per_source.get(&source_of(ip)).copied().unwrap_or(0)
    }

    /// Handles the router knows.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `h` is known (not removed, not expired).
    pub fn contains(&self, h: H) -> bool {
        self.entries.contains_key(&h)
    }

    /// Where a datagram from `remote` goes. Reads the header once
    /// ([`wire::route`]), then at most two lookups; never allocates.
    pub fn route(&self, remote: SocketAddr, datagram: &[u8]) -> Dispatch<H> {
        match wire::route(datagram) {
            Route::Drop => Dispatch::Drop(DropReason::Unroutable),
            Route::Existing { local_spi } => match self.by_spi.get(&local_spi) {
                Some(h) => Dispatch::Sa(*h),
                None => Dispatch::Unknown { local_spi },
            },
            Route::NewSa { initiator_spi } => {
                let key = HalfOpenKey {
                    peer: remote,
                    initiator_spi,
                };
                if let Some(h) = self.half_open.get(&key) {
                    return Dispatch::Sa(*h);
                }
                match self.admission(remote.ip()) {
                    Ok(()) => Dispatch::NewSa { initiator_spi },
                    Err(reason) => Dispatch::Drop(reason),
                }
            }
        }
    }

    fn admission(&self, ip: IpAddr) -> Result<(), DropReason> {
        if self.half_open.len() >= self.limits.max_half_open {
            return Err(DropReason::HalfOpenCap);
        }
        if self.half_open_from(ip) >= self.limits.max_half_open_per_source {
            return Err(DropReason::SourceBudget);
        }
        Ok(())
    }

    /// The stateless screening of an IKE_SA_INIT that [`Router::route`]
    /// classified as [`Dispatch::NewSa`]: [`Endpoint::screen`] with this
    /// router's half-open count, so cookies are demanded from
    /// [`Config::cookie_threshold`] half-open SAs on.
    pub fn screen(
        &self,
        rng: &mut dyn Random,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
    ) -> Screened {
        self.endpoint
            .screen(rng, local, remote, datagram, self.half_open.len())
    }

    /// Routes a new half-open SA `h`: retransmissions of its IKE_SA_INIT by
    /// `key`, messages to `spis` (its responder SPI). It counts against the
    /// cap and its source's budget until [`Router::established`] (or
    /// removal, or expiry [`Lifetimes::half_open_timeout_ms`] after `now`).
    ///
    /// Refused, changing nothing, when the admission limits are reached
    /// (when the caller skipped [`Router::route`]), `h` or `key` is in use,
    /// or an SPI is routed to another SA (drop the request; the peer's
    /// retransmission gets a fresh SPI).
    ///
    /// [`Lifetimes::half_open_timeout_ms`]: crate::Lifetimes::half_open_timeout_ms
    pub fn insert_half_open(
        &mut self,
        h: H,
        key: HalfOpenKey,
        spis: impl IntoIterator<Item = u64>,
        now: u64,
    ) -> Result<(), RouterError> {
        self.admission(key.peer.ip())
            .map_err(RouterError::Admission)?;
        if self.entries.contains_key(&h) {
            return Err(RouterError::HandleInUse);
        }
        if self.half_open.contains_key(&key) {
            return Err(RouterError::HalfOpenKeyInUse);
        }
        let spis = self.free_spis(h, spis)?;
        let deadline = now.saturating_add(self.endpoint.config().lifetimes.half_open_timeout_ms);
        let expiry = (deadline, self.next_seq);
        // Unique among live entries; 2^64 insertions never happen, and
        // wrapping keeps even that from panicking.
        self.next_seq = self.next_seq.wrapping_add(1);
        let source = source_of(key.peer.ip());
        for spi in &spis {
            self.by_spi.insert(*spi, h);
        }
        self.half_open.insert(key, h);
        *self.per_source.entry(source).or_insert(0) += 1;
        self.expiry.insert(expiry, h);
        self.entries.insert(
            h,
            Entry {
                spis,
                half_open: Some(HalfOpen {
                    key,
                    source,
                    expiry,
                }),
            },
        );
        Ok(())
    }

    /// Routes `spis` to `h`, which need not be known yet: an SA restored
    /// from a snapshot, one we initiate (its SPI is the initiator SPI), or
    /// more SPIs of a known SA. Not half-open: no budget, no expiry.
    /// Refused, changing nothing, if an SPI is routed to another SA.
    pub fn insert(&mut self, h: H, spis: impl IntoIterator<Item = u64>) -> Result<(), RouterError> {
        let spis = self.free_spis(h, spis)?;
        let entry = self.entries.entry(h).or_default();
        for spi in spis {
            if !entry.spis.contains(&spi) {
                entry.spis.push(spi);
            }
            self.by_spi.insert(spi, h);
        }
        Ok(())
    }

    /// `spis` without duplicates, or the first one routed to another handle.
    fn free_spis(
        &self,
        h: H,
        spis: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<u64>, RouterError> {
        let mut out: Vec<u64> = Vec::new();
        for spi in spis {
            if self.by_spi.get(&spi).is_some_and(|other| *other != h) {
                return Err(RouterError::SpiInUse(spi));
            }
            if !out.contains(&spi) {
                out.push(spi);
            }
        }
        Ok(out)
    }

    /// `spi` no longer reaches `h` (the generation it named was deleted); other
    /// SPIs of `h` stay. `UnknownHandle` if `h` was removed or expired.
    pub fn release(&mut self, h: H, spi: u64) -> Result<(), RouterError> {
        let entry = self.entries.get_mut(&h).ok_or(RouterError::UnknownHandle)?;
        entry.spis.retain(|s| *s != spi);
        if self.by_spi.get(&spi) == Some(&h) {
            self.by_spi.remove(&spi);
        }
        Ok(())
    }

    /// `h` is no longer half-open (IKE_AUTH succeeded): its IKE_SA_INIT key,
    /// deadline and budget are freed; its SPIs stay. Returns whether it was
    /// half-open.
    pub fn established(&mut self, h: H) -> bool {
        let Some(half_open) = self.entries.get_mut(&h).and_then(|e| e.half_open.take()) else {
            return false;
        };
        self.forget_half_open(h, half_open);
        true
    }

    fn forget_half_open(&mut self, h: H, half_open: HalfOpen) {
        if self.half_open.get(&half_open.key) == Some(&h) {
            self.half_open.remove(&half_open.key);
        }
        self.expiry.remove(&half_open.expiry);
        if let Some(n) = self.per_source.get_mut(&half_open.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&half_open.source);
            }
        }
    }

    /// Forgets `h` entirely: its SPIs, its half-open key and budget. Costs
    /// the number of `h`'s own entries. Returns whether `h` was known.
    pub fn remove(&mut self, h: H) -> bool {
        let Some(entry) = self.entries.remove(&h) else {
            return false;
        };
        for spi in &entry.spis {
            if self.by_spi.get(spi) == Some(&h) {
                self.by_spi.remove(spi);
            }
        }
        if let Some(half_open) = entry.half_open {
            self.forget_half_open(h, half_open);
        }
        true
    }

    /// Follows one event of `h`'s outcome (see the call order): a rekeyed
    /// SA's new SPI is routed to it, a released SPI no longer, an
    /// established SA stops being half-open, a closed one is forgotten.
    /// Other events change nothing.
    ///
    /// `UnknownHandle` when the event needs `h`'s routes but `h` was removed
    /// or expired meanwhile (its task may be stopped); `SpiInUse` when a
    /// rekey drew an SPI another SA holds (the other SA keeps it).
    pub fn on_event(&mut self, h: H, event: &Event) -> Result<(), RouterError> {
        match event {
            Event::IkeSaRekeyed { new_local_spi, .. } => {
                if !self.entries.contains_key(&h) {
                    return Err(RouterError::UnknownHandle);
                }
                self.insert(h, [*new_local_spi])
            }
            Event::LocalSpiReleased { local_spi } => self.release(h, *local_spi),
            Event::IkeSaEstablished { .. } => {
                if !self.entries.contains_key(&h) {
                    return Err(RouterError::UnknownHandle);
                }
                self.established(h);
                Ok(())
            }
            Event::Closed { .. } => {
                self.remove(h);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// When to call [`Router::handle_timeout`] next (absolute ms): the
    /// earliest half-open deadline or the next cookie rotation, whichever
    /// comes first; there is always a next rotation.
    pub fn poll_timeout(&self) -> u64 {
        match self.expiry.first_key_value() {
            Some((&(deadline, _), _)) => deadline.min(self.next_rotation_ms),
            None => self.next_rotation_ms,
        }
    }

    /// Rotates the cookie secret when due (a new 32-byte secret from `rng`;
    /// cookies of the previous one stay valid until the next rotation), and
    /// forgets up to [`RouterLimits::max_expired_per_call`] half-open SAs
    /// whose deadline is at or before `now`, earliest first. Returns their
    /// handles: drop those SAs. If more are due, [`Router::poll_timeout`]
    /// is already due again.
    pub fn handle_timeout(&mut self, now: u64, rng: &mut dyn Random) -> Vec<H> {
        if now >= self.next_rotation_ms {
            let mut secret = zeroize::Zeroizing::new([0u8; 32]);
            rng.fill(secret.as_mut());
            self.endpoint
                .rotate_cookie_secret(Secret::from_slice(secret.as_ref()));
            // From now, not from the missed slot: rotating twice to catch up
            // would invalidate cookies just issued.
            self.next_rotation_ms = now.saturating_add(self.limits.cookie_rotation_ms);
        }
        let mut expired = Vec::new();
        while expired.len() < self.limits.max_expired_per_call {
            let Some((&at, &h)) = self.expiry.first_key_value() else {
                break;
            };
            if at.0 > now {
                break;
            }
            // Taken out first, so the loop ends even if the tables disagreed.
            self.expiry.remove(&at);
            if self.remove(h) {
                expired.push(h);
            }
        }
        expired
    }
}
