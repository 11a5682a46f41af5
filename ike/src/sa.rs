//! [`IkeSa`]: one IKE SA with its child SAs, in either role.
//!
//! This file holds the machinery every exchange shares: routing a datagram to
//! the right generation, the message-ID window, sealing and storing
//! responses, the request window with its queue and retransmission, timers,
//! and the translation of all that into an [`Outcome`]. The exchanges
//! themselves live in [`crate::exchange`].

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Random;
use crate::config::Config;
use crate::crypto::sk;
use crate::error::{ApiError, PeerError, Reaction};
use crate::outcome::{ChildSaInfo, CloseReason, Commit, Datagram, Event, Outcome, StateChange};
use crate::snapshot::{
    ChildSa, IkeGeneration, IkeSaSnapshot, InnerAddress, PendingExchange, PendingRequest,
    QueuedRequest, Role, SNAPSHOT_FORMAT, StoredMessage,
};
use crate::wire::{
    self, Chain, ExchangeType, Header, IKE_MAJOR_VERSION, Identity, NotifyPayload, Payload,
    PayloadType, ProtocolId, TrafficSelector,
};

/// Retransmission bookkeeping of an outstanding request. Soft state: not
/// serialized, so a restored SA starts at "due now" and resends at once.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retransmit {
    pub count: u32,
    pub next_at_ms: u64,
}

/// Index of a generation: 0 is `current`, `i + 1` is `retiring[i]`.
pub(crate) type GenRef = usize;

/// What an initiator asks for when it opens an IKE SA.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Sent as IDr; the responder's AUTH is checked with the PSK of this identity.
    pub remote_identity: Identity,
    /// Ask for an inner IPv4 address (and DNS) with a CP request (§2.19).
    pub request_inner_address: bool,
    pub ts_i: Vec<TrafficSelector>,
    pub ts_r: Vec<TrafficSelector>,
    /// Pretend to be behind a NAT (a NAT_DETECTION_SOURCE_IP that cannot
    /// match) so that IKE moves to port 4500 and ESP is UDP-encapsulated.
    pub force_udp_encap: bool,
}

impl ConnectOptions {
    /// Road-warrior defaults: ask for an inner address, all of IPv4 on our
    /// side (narrowed by the responder), `remote_ts` on the other.
    pub fn road_warrior(remote_identity: Identity, remote_ts: Vec<TrafficSelector>) -> Self {
        Self {
            remote_identity,
            request_inner_address: true,
            ts_i: vec![TrafficSelector::any_v4()],
            ts_r: remote_ts,
            force_udp_encap: false,
        }
    }
}

/// Data of IKE_SA_INIT that IKE_AUTH signs (§2.15). Node-local: never committed.
#[derive(Clone, Debug)]
pub(crate) struct Handshake {
    pub ni: Vec<u8>,
    pub nr: Vec<u8>,
    pub init_request: Vec<u8>,
    pub init_response: Vec<u8>,
    /// Responder only: drop the half-open SA at this time. The initiator gives
    /// up through its retransmission limit instead.
    pub deadline_ms: Option<u64>,
    /// Initiator only: what IKE_AUTH asked for.
    pub initiator: Option<InitiatorAuth>,
    /// Responder only: authenticated IKE_AUTH waiting for an inner address.
    pub awaiting_address: Option<Box<crate::exchange::auth::AuthRequest>>,
}

#[derive(Clone, Debug)]
pub(crate) struct InitiatorAuth {
    pub options: ConnectOptions,
    pub child_inbound_spi: u32,
}

#[derive(Clone, Debug)]
pub(crate) enum State {
    /// Initiator: IKE_SA_INIT sent, no keys yet.
    Connecting(Box<crate::exchange::init::Connecting>),
    /// Keys exist. Established (and committed) once `handshake` is gone.
    Keyed(Box<IkeSaSnapshot>),
    Closed,
}

/// Output accumulated during one call.
#[derive(Clone, Debug, Default)]
pub(crate) struct OutBuf {
    pub send: Vec<Datagram>,
    pub gated: Vec<Datagram>,
    pub events: Vec<Event>,
    /// Committed state changed.
    pub dirty: bool,
    /// The SA ended; `Some` holds the SPIs to forget when it had been committed.
    pub removed: Option<Vec<u64>>,
}

/// A request from the peer, decrypted.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub header: Header,
    pub payloads: Vec<Payload>,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// SHA-256 of the datagram, kept with the response to recognise a retransmission.
    pub sha256: [u8; 32],
}

/// One IKE SA. See the crate docs for the call order.
///
/// `Clone` copies the whole SA, half-open handshake included: a node keeps a copy taken before
/// [`IkeSa::assign_inner_address`] so that, if the cluster refuses the address it picked (taken
/// meanwhile by another node), it can answer the same IKE_AUTH again with another one.
#[derive(Clone, Debug)]
pub struct IkeSa {
    pub(crate) config: Arc<Config>,
    pub(crate) state: State,
    pub(crate) handshake: Option<Box<Handshake>>,
    pub(crate) out: OutBuf,
}

impl IkeSa {
    /// Restores an established SA from a committed snapshot on any node.
    ///
    /// Afterwards the SA answers a retransmitted request with the stored
    /// response, and its `next_timeout` is due at once if a request of ours
    /// was outstanding, so that `handle_timeout` resends it byte-for-byte.
    pub fn restore(config: Arc<Config>, snapshot: IkeSaSnapshot) -> Result<Self, ApiError> {
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(ApiError::UnsupportedSnapshot(snapshot.format));
        }
        validate(&snapshot)?;
        let mut snapshot = snapshot;
        for g in std::iter::once(&mut snapshot.current).chain(snapshot.retiring.iter_mut()) {
            g.retransmit = Retransmit::default();
        }
        Ok(Self {
            config,
            state: State::Keyed(Box::new(snapshot)),
            handshake: None,
            out: OutBuf::default(),
        })
    }

    /// The committed state, if the SA is established (half-open SAs are node-local).
    pub fn snapshot(&self) -> Option<IkeSaSnapshot> {
        match &self.state {
            State::Keyed(s) if self.handshake.is_none() => Some((**s).clone()),
            _ => None,
        }
    }

    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Keyed(_)) && self.handshake.is_none()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// Our role in the current IKE SA generation.
    pub fn role(&self) -> Option<Role> {
        match &self.state {
            State::Connecting(_) => Some(Role::Initiator),
            State::Keyed(s) => Some(s.current.role),
            State::Closed => None,
        }
    }

    /// The SPI that identifies this SA in messages the peer sends us.
    pub fn local_spi(&self) -> Option<u64> {
        match &self.state {
            State::Connecting(c) => Some(c.spi_i),
            State::Keyed(s) => Some(s.current.local_spi()),
            State::Closed => None,
        }
    }

    /// Every local SPI this SA answers to (current and retiring generations).
    pub fn local_spis(&self) -> Vec<u64> {
        match &self.state {
            State::Connecting(c) => vec![c.spi_i],
            State::Keyed(s) => std::iter::once(&s.current)
                .chain(&s.retiring)
                .map(IkeGeneration::local_spi)
                .collect(),
            State::Closed => Vec::new(),
        }
    }

    pub fn children(&self) -> &[ChildSa] {
        match &self.state {
            State::Keyed(s) => &s.children,
            _ => &[],
        }
    }

    pub fn peer_identity(&self) -> Option<&Identity> {
        match &self.state {
            State::Keyed(s) if self.handshake.is_none() => Some(&s.peer_id),
            _ => None,
        }
    }

    /// The inner address we assigned to the peer (gateway side).
    pub fn peer_inner_address(&self) -> Option<&InnerAddress> {
        keyed_ref(&self.state).and_then(|s| s.peer_inner_address.as_ref())
    }

    /// The inner address the peer assigned to us (client side).
    pub fn local_inner_address(&self) -> Option<&InnerAddress> {
        keyed_ref(&self.state).and_then(|s| s.local_inner_address.as_ref())
    }

    /// Where the peer is (address and port), as last authenticated.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        match &self.state {
            State::Connecting(c) => Some(c.peer),
            State::Keyed(s) => Some(s.peer),
            State::Closed => None,
        }
    }

    /// Feeds one received IKE message (non-ESP marker already stripped).
    /// `local` is the address it arrived on, `remote` where it came from.
    pub fn handle_datagram(
        &mut self,
        now: u64,
        rng: &mut dyn Random,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
    ) -> Outcome {
        match &self.state {
            State::Closed => {}
            State::Connecting(_) => self.on_init_response(now, rng, datagram),
            State::Keyed(_) => self.on_keyed_datagram(now, rng, local, remote, datagram),
        }
        self.finish()
    }

    /// Runs every timer that is due. Call at `next_timeout` (or any time).
    pub fn handle_timeout(&mut self, now: u64, rng: &mut dyn Random) -> Outcome {
        match &self.state {
            State::Closed => {}
            State::Connecting(_) => self.connecting_timeout(now),
            State::Keyed(_) => self.keyed_timeout(now, rng),
        }
        self.finish()
    }

    /// Sends an empty INFORMATIONAL (liveness check, RFC 7296 §1.4).
    pub fn send_dpd(&mut self, now: u64, rng: &mut dyn Random) -> Result<Outcome, ApiError> {
        self.request(now, rng, QueuedRequest::Dpd)
    }

    /// Rekeys the child SA with this inbound SPI (§1.3.3).
    pub fn rekey_child(
        &mut self,
        inbound_spi: u32,
        now: u64,
        rng: &mut dyn Random,
    ) -> Result<Outcome, ApiError> {
        self.child_ref(inbound_spi)?;
        if let State::Keyed(s) = &mut self.state
            && let Some(c) = s.children.iter_mut().find(|c| c.inbound_spi == inbound_spi)
        {
            c.rekey_at_ms = None;
        }
        self.request(now, rng, QueuedRequest::RekeyChild(inbound_spi))
    }

    /// Rekeys the IKE SA (§1.3.2).
    pub fn rekey_ike(&mut self, now: u64, rng: &mut dyn Random) -> Result<Outcome, ApiError> {
        self.request(now, rng, QueuedRequest::RekeyIke)
    }

    /// Creates an additional child SA (§1.3.1).
    pub fn create_child(
        &mut self,
        ts_i: Vec<TrafficSelector>,
        ts_r: Vec<TrafficSelector>,
        now: u64,
        rng: &mut dyn Random,
    ) -> Result<Outcome, ApiError> {
        self.request(now, rng, QueuedRequest::CreateChild { ts_i, ts_r })
    }

    /// Deletes the child SA with this inbound SPI (§1.4.1).
    pub fn delete_child(
        &mut self,
        inbound_spi: u32,
        now: u64,
        rng: &mut dyn Random,
    ) -> Result<Outcome, ApiError> {
        self.child_ref(inbound_spi)?;
        if let State::Keyed(s) = &mut self.state
            && let Some(c) = s.children.iter_mut().find(|c| c.inbound_spi == inbound_spi)
        {
            c.replaced = true;
            c.rekey_at_ms = None;
        }
        self.request(now, rng, QueuedRequest::DeleteChildren(vec![inbound_spi]))
    }

    /// Deletes the IKE SA and with it all child SAs.
    pub fn close(&mut self, now: u64, rng: &mut dyn Random) -> Result<Outcome, ApiError> {
        self.request(now, rng, QueuedRequest::DeleteIke)
    }

    /// Returns the earliest time at which `handle_timeout` has work.
    pub fn next_timeout(&self) -> Option<u64> {
        match &self.state {
            State::Closed => None,
            State::Connecting(c) => Some(c.retransmit.next_at_ms),
            State::Keyed(s) => {
                let mut t: Option<u64> = None;
                let mut at = |v: Option<u64>| {
                    if let Some(v) = v {
                        t = Some(t.map_or(v, |t| t.min(v)));
                    }
                };
                for g in std::iter::once(&s.current).chain(&s.retiring) {
                    if g.pending.is_some() {
                        at(Some(g.retransmit.next_at_ms));
                    }
                }
                for g in &s.retiring {
                    at(g.retire_at_ms);
                }
                if let Some(h) = &self.handshake {
                    at(h.deadline_ms);
                    return t;
                }
                at(s.ike_rekey_at_ms);
                at(ike_expiry(s, self.config.lifetimes.ike_expire_ms));
                for c in &s.children {
                    if !c.replaced {
                        at(c.rekey_at_ms);
                    }
                    at(c.expire_at_ms);
                }
                if let Some(dpd) = self.config.lifetimes.dpd_interval_ms
                    && s.current.pending.is_none()
                    && s.queued.is_empty()
                {
                    at(Some(s.last_peer_activity_ms.saturating_add(dpd)));
                }
                t
            }
        }
    }

    // ---- internals shared by the exchanges ----

    fn child_ref(&self, inbound_spi: u32) -> Result<(), ApiError> {
        if !self.is_established() {
            return Err(ApiError::NotEstablished);
        }
        let s = keyed_ref(&self.state).ok_or(ApiError::Closed)?;
        match s.children.iter().find(|c| c.inbound_spi == inbound_spi) {
            Some(_) => Ok(()),
            None => Err(ApiError::NoSuchChild(inbound_spi)),
        }
    }

    fn request(
        &mut self,
        now: u64,
        rng: &mut dyn Random,
        req: QueuedRequest,
    ) -> Result<Outcome, ApiError> {
        if self.is_closed() {
            return Err(ApiError::Closed);
        }
        if !self.is_established() {
            return Err(ApiError::NotEstablished);
        }
        self.enqueue(req);
        self.pump(now, rng);
        Ok(self.finish())
    }

    pub(crate) fn enqueue(&mut self, req: QueuedRequest) {
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        if !s.queued.contains(&req) {
            s.queued.push(req);
        }
        self.out.dirty = true;
    }

    /// Starts queued requests while the window of the current generation is free.
    pub(crate) fn pump(&mut self, now: u64, rng: &mut dyn Random) {
        loop {
            let Some(s) = keyed(&mut self.state) else {
                return;
            };
            if s.current.pending.is_some() || s.queued.is_empty() || self.handshake.is_some() {
                return;
            }
            let next = s.queued.remove(0);
            self.out.dirty = true;
            self.start_request(next, now, rng);
        }
    }

    fn start_request(&mut self, req: QueuedRequest, now: u64, rng: &mut dyn Random) {
        match req {
            QueuedRequest::Dpd => self.send_request(
                0,
                ExchangeType::INFORMATIONAL,
                Vec::new(),
                PendingExchange::Informational {
                    delete_children: Vec::new(),
                    delete_ike: false,
                },
                now,
                rng,
            ),
            QueuedRequest::DeleteIke => {
                let payloads = vec![Payload::Delete(wire::DeletePayload {
                    protocol: ProtocolId::IKE,
                    spis: vec![],
                })];
                self.send_request(
                    0,
                    ExchangeType::INFORMATIONAL,
                    payloads,
                    PendingExchange::Informational {
                        delete_children: Vec::new(),
                        delete_ike: true,
                    },
                    now,
                    rng,
                )
            }
            QueuedRequest::DeleteChildren(spis) => {
                let Some(s) = keyed(&mut self.state) else {
                    return;
                };
                let spis: Vec<u32> = spis
                    .into_iter()
                    .filter(|spi| s.children.iter().any(|c| c.inbound_spi == *spi))
                    .collect();
                if spis.is_empty() {
                    return;
                }
                let payloads = vec![Payload::Delete(wire::DeletePayload {
                    protocol: ProtocolId::ESP,
                    spis: spis.clone(),
                })];
                self.send_request(
                    0,
                    ExchangeType::INFORMATIONAL,
                    payloads,
                    PendingExchange::Informational {
                        delete_children: spis,
                        delete_ike: false,
                    },
                    now,
                    rng,
                )
            }
            QueuedRequest::RekeyChild(spi) => self.start_child_request(Some(spi), None, now, rng),
            QueuedRequest::CreateChild { ts_i, ts_r } => {
                self.start_child_request(None, Some((ts_i, ts_r)), now, rng)
            }
            QueuedRequest::RekeyIke => self.start_ike_rekey(now, rng),
        }
    }

    pub(crate) fn seal(
        g: &IkeGeneration,
        exchange: ExchangeType,
        response: bool,
        message_id: u32,
        payloads: &[Payload],
        rng: &mut dyn Random,
    ) -> Vec<u8> {
        let header = Header {
            spi_i: g.spi_i,
            spi_r: g.spi_r,
            next_payload: PayloadType::NONE,
            major_version: IKE_MAJOR_VERSION,
            minor_version: 0,
            exchange,
            initiator: g.role == Role::Initiator,
            response,
            message_id,
            length: 0,
        };
        let mut iv = [0u8; 8];
        rng.fill(&mut iv);
        sk::seal_message(header, payloads, g.suite.encr, g.send_key().expose(), iv)
    }

    /// Sends a request on generation `r`, which must have a free window.
    pub(crate) fn send_request(
        &mut self,
        r: GenRef,
        exchange: ExchangeType,
        payloads: Vec<Payload>,
        pending: PendingExchange,
        now: u64,
        rng: &mut dyn Random,
    ) {
        let initial = self.config.retransmit.timeout(0);
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let (local, peer) = (s.local, s.peer);
        let Some(g) = gen_mut(s, r) else { return };
        let message_id = g.next_request_id;
        g.next_request_id = g.next_request_id.wrapping_add(1);
        let bytes = Self::seal(g, exchange, false, message_id, &payloads, rng);
        g.pending = Some(PendingRequest {
            message: StoredMessage {
                message_id,
                datagrams: vec![bytes.clone()],
            },
            first_sent_at_ms: now,
            exchange: pending,
        });
        g.retransmit = Retransmit {
            count: 0,
            next_at_ms: now + initial,
        };
        self.out.dirty = true;
        self.out.gated.push(Datagram {
            local,
            remote: peer,
            payload: bytes,
        });
    }

    /// Answers the request `req` on generation `r` and stores the answer for
    /// retransmissions (§2.1).
    pub(crate) fn respond(
        &mut self,
        r: GenRef,
        req: &Request,
        payloads: Vec<Payload>,
        rng: &mut dyn Random,
    ) {
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let Some(g) = gen_mut(s, r) else { return };
        let id = req.header.message_id;
        let bytes = Self::seal(g, req.header.exchange, true, id, &payloads, rng);
        g.last_response = Some(StoredMessage {
            message_id: id,
            datagrams: vec![bytes.clone()],
        });
        g.last_request_sha256 = Some(req.sha256);
        g.next_peer_request_id = id.wrapping_add(1);
        self.out.dirty = true;
        self.out.gated.push(Datagram {
            local: req.local,
            remote: req.remote,
            payload: bytes,
        });
    }

    pub(crate) fn respond_error(
        &mut self,
        r: GenRef,
        req: &Request,
        err: &PeerError,
        rng: &mut dyn Random,
    ) {
        match err.reaction() {
            Reaction::Drop => {}
            Reaction::Notify(ty) => {
                let mut n = NotifyPayload::new(ty, err.notify_data());
                if let Some(spi) = err.notify_spi() {
                    n.protocol = ProtocolId::ESP;
                    n.spi = spi.to_be_bytes().to_vec();
                }
                self.respond(r, req, vec![Payload::Notify(n)], rng);
            }
        }
        self.out.events.push(Event::PeerMisbehaved(err.clone()));
    }

    /// Ends the SA. A committed SA turns into a `Remove` commit.
    pub(crate) fn close_sa(&mut self, reason: CloseReason) {
        if self.is_established() {
            self.out.removed = Some(self.local_spis());
        }
        if let Some(s) = keyed_ref(&self.state) {
            for c in &s.children {
                self.out.events.push(Event::ChildSaDeleted {
                    inbound_spi: c.inbound_spi,
                    outbound_spi: c.outbound_spi,
                });
            }
        }
        self.state = State::Closed;
        self.handshake = None;
        self.out.events.push(Event::Closed { reason });
    }

    /// Drops a retiring generation (after its DELETE, or when it timed out).
    pub(crate) fn drop_retiring(&mut self, r: GenRef) {
        if r == 0 {
            return;
        }
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        if r - 1 < s.retiring.len() {
            let g = s.retiring.remove(r - 1);
            self.out.dirty = true;
            self.out.events.push(Event::LocalSpiReleased {
                local_spi: g.local_spi(),
            });
            // Work that was in flight on the old IKE SA moves to its successor
            // (§1.4: child SA control goes to the rekeyed IKE SA).
            match g.pending.map(|p| p.exchange) {
                Some(PendingExchange::CreateChild(req)) => match req.rekey_of {
                    Some(spi) => self.enqueue(QueuedRequest::RekeyChild(spi)),
                    None => self.enqueue(QueuedRequest::CreateChild {
                        ts_i: req.ts_i,
                        ts_r: req.ts_r,
                    }),
                },
                Some(PendingExchange::Informational {
                    delete_children, ..
                }) if !delete_children.is_empty() => {
                    self.enqueue(QueuedRequest::DeleteChildren(delete_children))
                }
                Some(
                    PendingExchange::Informational { .. }
                    | PendingExchange::RekeyIke(_)
                    | PendingExchange::Auth,
                )
                | None => {}
            }
        }
    }

    pub(crate) fn child_info(s: &IkeSaSnapshot, c: &ChildSa, rekey_of: Option<u32>) -> ChildSaInfo {
        ChildSaInfo {
            inbound_spi: c.inbound_spi,
            outbound_spi: c.outbound_spi,
            suite: c.suite,
            inbound_key: c.inbound_key.clone(),
            outbound_key: c.outbound_key.clone(),
            local_ts: c.local_ts.clone(),
            remote_ts: c.remote_ts.clone(),
            local: s.local,
            peer: s.peer,
            udp_encap: s.nat.any(),
            rekey_of,
            rekey_generation: c.rekey_generation,
            rekey_at_ms: c.rekey_at_ms,
            expire_at_ms: c.expire_at_ms,
        }
    }

    /// `base` minus up to 10% random jitter, from `now`.
    pub(crate) fn jittered(now: u64, base: Option<u64>, rng: &mut dyn Random) -> Option<u64> {
        base.map(|b| {
            let span = b / 10;
            let j = if span == 0 {
                0
            } else {
                crate::random_u64(rng) % span
            };
            now + b - j
        })
    }

    pub(crate) fn finish(&mut self) -> Outcome {
        let mut out = std::mem::take(&mut self.out);
        let commit = if let Some(local_spis) = out.removed.take() {
            Some(Commit::new(
                StateChange::Remove { local_spis },
                std::mem::take(&mut out.gated),
            ))
        } else if out.dirty && self.is_established() {
            let snapshot = self.snapshot().map(Box::new);
            snapshot.map(|s| Commit::new(StateChange::Upsert(s), std::mem::take(&mut out.gated)))
        } else {
            None
        };
        // Half-open SAs are node-local: their messages need no commit.
        out.send.append(&mut out.gated);
        Outcome {
            send: out.send,
            commit,
            events: out.events,
            next_timeout: self.next_timeout(),
        }
    }

    fn on_keyed_datagram(
        &mut self,
        now: u64,
        rng: &mut dyn Random,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
    ) {
        let (header, chain) = match wire::parse_message(datagram) {
            Ok(x) => x,
            Err(e) => {
                self.out.events.push(Event::PeerMisbehaved(e.into()));
                return;
            }
        };
        // A retransmitted IKE_SA_INIT still carries a zero responder SPI.
        if header.exchange == ExchangeType::IKE_SA_INIT {
            self.on_init_retransmit(&header, local, remote);
            return;
        }
        let Some(s) = keyed_ref(&self.state) else {
            return;
        };
        let Some(r) = find_gen(s, &header) else {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::UnknownIkeSpi));
            return;
        };
        let Some(g) = gen_ref(s, r) else { return };
        if header.initiator != (g.role == Role::Responder) {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::WrongInitiatorFlag));
            return;
        }
        if header.response {
            self.on_response(r, header, chain, datagram, now, rng);
        } else {
            self.on_request(r, header, chain, datagram, local, remote, now, rng);
        }
        self.pump(now, rng);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_request(
        &mut self,
        r: GenRef,
        header: Header,
        chain: Chain,
        datagram: &[u8],
        local: SocketAddr,
        remote: SocketAddr,
        now: u64,
        rng: &mut dyn Random,
    ) {
        let Some(s) = keyed_ref(&self.state) else {
            return;
        };
        let Some(g) = gen_ref(s, r) else { return };
        if let Some(last) = &g.last_response
            && last.message_id == header.message_id
            && g.next_peer_request_id == header.message_id.wrapping_add(1)
        {
            // §2.1: a retransmitted request gets the stored response, byte for byte — if it
            // is the request we answered, byte for byte, from the peer's address. Anything
            // else with that message ID (forged, or from an address the SA is not at) is
            // dropped at the cost of one hash: no answer is sent where a forger chooses.
            let same_request = g
                .last_request_sha256
                .is_none_or(|digest| digest == datagram_sha256(datagram));
            if !same_request || remote != s.peer {
                return;
            }
            for d in &last.datagrams {
                self.out.send.push(Datagram {
                    local,
                    remote,
                    payload: d.clone(),
                });
            }
            return;
        }
        if header.message_id != g.next_peer_request_id {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::MessageIdOutOfWindow {
                    got: header.message_id,
                    expected: g.next_peer_request_id,
                }));
            return;
        }
        if self
            .handshake
            .as_ref()
            .is_some_and(|h| h.awaiting_address.is_some())
        {
            // IKE_AUTH retransmitted while the inner address is being allocated.
            return;
        }
        let Some(part) = chain.encrypted else {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::MissingPayload(
                    PayloadType::SK,
                )));
            return;
        };
        let req_header = header;
        let inner = sk::open_message(datagram, part, g.suite.encr, g.recv_key().expose());
        let sha256 = datagram_sha256(datagram);
        let req = |payloads| Request {
            header: req_header,
            payloads,
            local,
            remote,
            sha256,
        };
        let payloads = match inner {
            Ok(c) => c.payloads,
            Err(e) => {
                let err = PeerError::from(e);
                if err == PeerError::IntegrityCheckFailed {
                    self.out.events.push(Event::PeerMisbehaved(err));
                } else {
                    self.respond_error(r, &req(Vec::new()), &err, rng);
                    if self.handshake.is_some() {
                        self.close_sa(CloseReason::NegotiationFailed(err));
                    }
                }
                return;
            }
        };
        let request = req(payloads);
        let established = self.handshake.is_none();
        if let Some(s) = keyed(&mut self.state) {
            s.last_peer_activity_ms = now;
            // §2.23: behind a NAT the peer's address may change; follow authenticated requests.
            if r == 0 && s.nat.peer_behind_nat && s.peer != remote {
                s.peer = remote;
                s.local = local;
            }
        }
        self.out.dirty = true;
        let result = match (header.exchange, established) {
            (ExchangeType::IKE_AUTH, false) => self.on_auth_request(&request, now, rng),
            (ExchangeType::CREATE_CHILD_SA, true) => {
                self.on_create_child_request(r, &request, now, rng)
            }
            (ExchangeType::INFORMATIONAL, true) => self.on_informational_request(r, &request, rng),
            (other, _) => Err(PeerError::UnexpectedExchange(other)),
        };
        if let Err(err) = result {
            self.respond_error(r, &request, &err, rng);
            if !established && !self.is_established() && !self.is_closed() {
                let reason = match err {
                    PeerError::AuthenticationFailed
                    | PeerError::UnknownPeerIdentity
                    | PeerError::WrongResponderIdentity
                    | PeerError::UnsupportedAuthMethod(_) => CloseReason::AuthenticationFailed,
                    e => CloseReason::NegotiationFailed(e),
                };
                self.close_sa(reason);
            }
        }
    }

    fn on_response(
        &mut self,
        r: GenRef,
        header: Header,
        chain: Chain,
        datagram: &[u8],
        now: u64,
        rng: &mut dyn Random,
    ) {
        let Some(s) = keyed_ref(&self.state) else {
            return;
        };
        let Some(g) = gen_ref(s, r) else { return };
        let Some(pending) = &g.pending else {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::UnexpectedResponse {
                    got: header.message_id,
                }));
            return;
        };
        if pending.message.message_id != header.message_id {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::UnexpectedResponse {
                    got: header.message_id,
                }));
            return;
        }
        let Some(part) = chain.encrypted else {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::MissingPayload(
                    PayloadType::SK,
                )));
            return;
        };
        let payloads = match sk::open_message(datagram, part, g.suite.encr, g.recv_key().expose()) {
            Ok(c) => c.payloads,
            Err(e) => {
                let err = PeerError::from(e);
                self.out.events.push(Event::PeerMisbehaved(err.clone()));
                if err != PeerError::IntegrityCheckFailed {
                    // An authentic but unreadable answer: treat the exchange as failed.
                    self.fail_pending(r, err);
                }
                return;
            }
        };
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let Some(g) = gen_mut(s, r) else { return };
        let Some(pending) = g.pending.take() else {
            return;
        };
        g.retransmit = Retransmit::default();
        s.last_peer_activity_ms = now;
        self.out.dirty = true;
        match pending.exchange {
            PendingExchange::Informational {
                delete_children,
                delete_ike,
            } => self.on_informational_response(r, delete_children, delete_ike),
            PendingExchange::CreateChild(req) => {
                self.on_create_child_response(r, &payloads, *req, now, rng)
            }
            PendingExchange::RekeyIke(req) => {
                self.on_ike_rekey_response(r, &payloads, *req, now, rng)
            }
            PendingExchange::Auth => self.on_auth_response(&payloads, now, rng),
        }
    }

    /// The exchange on generation `r` failed without a usable answer.
    fn fail_pending(&mut self, r: GenRef, err: PeerError) {
        if r == 0 {
            let reason = if err == PeerError::IntegrityCheckFailed {
                CloseReason::PeerUnreachable
            } else {
                CloseReason::NegotiationFailed(err)
            };
            self.close_sa(reason);
        } else {
            self.drop_retiring(r);
        }
    }

    fn keyed_timeout(&mut self, now: u64, rng: &mut dyn Random) {
        if let Some(h) = &self.handshake
            && h.deadline_ms.is_some_and(|d| now >= d)
        {
            self.close_sa(CloseReason::HalfOpenTimeout);
            return;
        }
        self.retransmit_due(now);
        if self.is_closed() {
            return;
        }
        // Forget retiring generations that the peer never deleted.
        loop {
            let Some(s) = keyed_ref(&self.state) else {
                return;
            };
            let Some(i) = s
                .retiring
                .iter()
                .position(|g| g.retire_at_ms.is_some_and(|t| t <= now))
            else {
                break;
            };
            self.drop_retiring(i + 1);
        }
        if self.handshake.is_some() {
            return;
        }
        let dpd = self.config.lifetimes.dpd_interval_ms;
        let retry = self.config.lifetimes.temporary_failure_retry_ms;
        let expire = self.config.lifetimes.ike_expire_ms;
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let mut queue = Vec::new();
        let mut expired = Vec::new();
        for c in &mut s.children {
            if c.expire_at_ms.is_some_and(|t| t <= now) {
                c.expire_at_ms = None;
                c.rekey_at_ms = None;
                c.replaced = true;
                expired.push(c.inbound_spi);
            } else if !c.replaced && c.rekey_at_ms.is_some_and(|t| t <= now) {
                c.rekey_at_ms = None;
                queue.push(QueuedRequest::RekeyChild(c.inbound_spi));
            }
        }
        if !expired.is_empty() {
            queue.push(QueuedRequest::DeleteChildren(expired));
        }
        if ike_expiry(s, expire).is_some_and(|t| t <= now) {
            // Hard lifetime: the IKE SA was not rekeyed in time. Deleting
            // it goes before anything else in the queue.
            s.queued.insert(0, QueuedRequest::DeleteIke);
            self.out.dirty = true;
        }
        if s.ike_rekey_at_ms.is_some_and(|t| t <= now) {
            // Rescheduled if the attempt fails; cleared so the timer does not spin.
            s.ike_rekey_at_ms = Some(now + retry.max(1) * 6);
            queue.push(QueuedRequest::RekeyIke);
        }
        if let Some(dpd) = dpd
            && s.current.pending.is_none()
            && s.queued.is_empty()
            && queue.is_empty()
            && s.last_peer_activity_ms.saturating_add(dpd) <= now
        {
            queue.push(QueuedRequest::Dpd);
        }
        for q in queue {
            self.enqueue(q);
        }
        self.pump(now, rng);
    }

    fn retransmit_due(&mut self, now: u64) {
        let policy = self.config.retransmit.clone();
        let mut give_up = Vec::new();
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let (local, peer) = (s.local, s.peer);
        for (i, g) in std::iter::once(&mut s.current)
            .chain(s.retiring.iter_mut())
            .enumerate()
        {
            let Some(p) = &g.pending else { continue };
            if g.retransmit.next_at_ms > now {
                continue;
            }
            if g.retransmit.count >= policy.max_retransmits {
                give_up.push(i);
                continue;
            }
            for d in &p.message.datagrams {
                self.out.send.push(Datagram {
                    local,
                    remote: peer,
                    payload: d.clone(),
                });
            }
            g.retransmit.count += 1;
            g.retransmit.next_at_ms = now + policy.timeout(g.retransmit.count);
        }
        for i in give_up.into_iter().rev() {
            if i == 0 {
                self.close_sa(CloseReason::PeerUnreachable);
                return;
            }
            self.drop_retiring(i);
        }
    }
}

/// When the current IKE SA generation reaches its hard lifetime, unless its
/// deletion is already under way. Derived from the generation's creation
/// time, so every path that installs a new generation resets it.
fn ike_expiry(s: &IkeSaSnapshot, expire_ms: Option<u64>) -> Option<u64> {
    let deleting = s.queued.contains(&QueuedRequest::DeleteIke)
        || matches!(
            s.current.pending.as_ref().map(|p| &p.exchange),
            Some(PendingExchange::Informational {
                delete_ike: true,
                ..
            })
        );
    if deleting {
        return None;
    }
    expire_ms.map(|e| s.current.created_at_ms.saturating_add(e))
}

/// Checks what the engine relies on without re-checking: a snapshot comes
/// from the node's store, but a truncated or mixed-up one must not panic.
fn validate(s: &IkeSaSnapshot) -> Result<(), ApiError> {
    for g in std::iter::once(&s.current).chain(&s.retiring) {
        if g.spi_i == 0 || g.spi_r == 0 {
            return Err(ApiError::InvalidSnapshot("zero IKE SPI"));
        }
        let prf = g.suite.prf.output_len();
        let encr = g.suite.encr.keymat_len();
        let k = &g.keys;
        if [&k.sk_d, &k.sk_pi, &k.sk_pr].iter().any(|x| x.len() != prf)
            || [&k.sk_ei, &k.sk_er].iter().any(|x| x.len() != encr)
        {
            return Err(ApiError::InvalidSnapshot(
                "IKE key length does not fit the suite",
            ));
        }
        let dh_ok = match g.pending.as_ref().map(|p| &p.exchange) {
            Some(PendingExchange::CreateChild(c)) => {
                c.dh.as_ref().is_none_or(crate::crypto::DhPrivate::is_valid)
            }
            Some(PendingExchange::RekeyIke(r)) => r.dh.is_valid(),
            _ => true,
        };
        if !dh_ok {
            return Err(ApiError::InvalidSnapshot("pending key exchange value"));
        }
    }
    for c in &s.children {
        let n = c.suite.encr.keymat_len();
        if c.inbound_key.len() != n || c.outbound_key.len() != n {
            return Err(ApiError::InvalidSnapshot(
                "child key length does not fit the suite",
            ));
        }
    }
    Ok(())
}

pub(crate) fn keyed(state: &mut State) -> Option<&mut IkeSaSnapshot> {
    match state {
        State::Keyed(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn keyed_ref(state: &State) -> Option<&IkeSaSnapshot> {
    match state {
        State::Keyed(s) => Some(s),
        _ => None,
    }
}

pub(crate) fn gen_ref(s: &IkeSaSnapshot, r: GenRef) -> Option<&IkeGeneration> {
    if r == 0 {
        Some(&s.current)
    } else {
        s.retiring.get(r - 1)
    }
}

pub(crate) fn gen_mut(s: &mut IkeSaSnapshot, r: GenRef) -> Option<&mut IkeGeneration> {
    if r == 0 {
        Some(&mut s.current)
    } else {
        s.retiring.get_mut(r - 1)
    }
}

fn find_gen(s: &IkeSaSnapshot, h: &Header) -> Option<GenRef> {
    std::iter::once(&s.current)
        .chain(&s.retiring)
        .position(|g| g.spi_i == h.spi_i && g.spi_r == h.spi_r)
}

/// SHA-256 of a received datagram (what a retransmission is recognised by).
fn datagram_sha256(datagram: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(datagram).into()
}
