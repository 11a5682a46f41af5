//! IKE_SA_INIT (RFC 7296 §1.2): the stateless front door of the responder
//! ([`Endpoint`]: cookies §2.6, INVALID_KE_PAYLOAD §1.2, NAT detection §2.23)
//! and the initiator's first exchange.
//!
//! The responder side is two steps so that a gateway can keep the expensive
//! one off its single dispatcher: [`Endpoint::screen`] parses and answers
//! statelessly (no Diffie-Hellman), and only what it admits reaches
//! [`PendingInit::complete`] (two Diffie-Hellman operations and the key
//! derivation, by far the most expensive part, above all for MODP-2048),
//! which a gateway runs in the new SA's own task. [`Endpoint::accept`] does
//! both at once.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::crypto::keys::{cookie, nat_detection_hash};
use crate::crypto::{DhGroup, DhPrivate, IkeKeys, Secret, secret::ct_eq};
use crate::error::{PeerError, Reaction};
use crate::exchange::proposal;
use crate::outcome::{CloseReason, Datagram, Event, Outcome};
use crate::sa::{
    ConnectOptions, Handshake, IkeSa, InitiatorAuth, OutBuf, Retransmit, State, keyed_ref,
};
use crate::snapshot::{
    IkeGeneration, IkeSaSnapshot, NatState, PendingExchange, Role, SNAPSHOT_FORMAT, StoredMessage,
};
use crate::wire::{
    self, ExchangeType, Header, IKE_MAJOR_VERSION, IdType, Identity, KePayload, NotifyPayload,
    NotifyType, Payload, PayloadType, PayloadsExt,
};
use crate::{Random, random_bytes, random_nonzero_u64};

/// The port IKE floats to when a NAT is detected (RFC 7296 §2.23).
pub const NAT_T_PORT: u16 = 4500;

/// Nonce length bounds, RFC 7296 §3.9.
const NONCE_MIN: usize = 16;
const NONCE_MAX: usize = 256;

fn check_nonce(n: &[u8]) -> Result<(), PeerError> {
    if (NONCE_MIN..=NONCE_MAX).contains(&n.len()) {
        Ok(())
    } else {
        Err(PeerError::BadNonceLength(n.len()))
    }
}

/// The responder's entry point for new IKE SAs.
///
/// It keeps no per-peer state: [`Endpoint::screen`] answers or drops what it
/// can from the request alone, and what it admits carries everything the
/// expensive second step ([`PendingInit::complete`]) needs.
#[derive(Debug)]
pub struct Endpoint {
    config: Arc<Config>,
    /// (version, secret): current and previous, so cookies survive one rotation.
    cookie_secrets: Vec<(u8, Secret)>,
}

/// What [`Endpoint::accept`] (or [`PendingInit::complete`]) decided.
#[derive(Debug)]
pub enum Accepted {
    /// A new half-open SA; keep it under (peer address, initiator SPI) and
    /// under its local SPI. `outcome.send` holds the IKE_SA_INIT response.
    NewSa(Box<IkeSa>, Outcome),
    /// A stateless answer (COOKIE, INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN, ...).
    Reply(Datagram, PeerError),
    /// Nothing to send.
    Dropped(PeerError),
}

/// What [`Endpoint::screen`] decided about an IKE_SA_INIT request, before any
/// Diffie-Hellman work.
#[derive(Debug)]
pub enum Screened {
    /// Worth a half-open SA: register it (e.g. [`crate::Router::insert_half_open`]
    /// under [`PendingInit::key`] and [`PendingInit::local_spi`]), then call
    /// [`PendingInit::complete`], ideally in the SA's own task so the
    /// Diffie-Hellman computation does not hold up the dispatcher.
    Admit(Box<PendingInit>),
    /// A stateless answer (COOKIE, INVALID_KE_PAYLOAD, NO_PROPOSAL_CHOSEN, ...).
    Reply(Datagram, PeerError),
    /// Nothing to send.
    Dropped(PeerError),
}

/// Where a half-open SA is found again when the peer retransmits its
/// IKE_SA_INIT: the request carries no SPI of ours yet (its responder SPI is
/// zero, RFC 7296 §3.1), so the initiator's SPI and the address it came from
/// identify it (a retransmission is the same message from the same place, §2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HalfOpenKey {
    pub peer: SocketAddr,
    pub initiator_spi: u64,
}

/// An IKE_SA_INIT request that passed [`Endpoint::screen`]: parsed, cookie
/// checked, proposal and KE group chosen, responder SPI drawn.
///
/// It holds only the peer's (untrusted, public) data and our choices, no
/// secret of its own (the shared `Arc<Config>` aside, whose PSKs are
/// [`Secret`]s): our Diffie-Hellman value and nonce are only drawn by
/// [`PendingInit::complete`]. So it can be queued or moved to another task
/// freely, and dropping it needs no zeroizing.
pub struct PendingInit {
    config: Arc<Config>,
    local: SocketAddr,
    remote: SocketAddr,
    spi_i: u64,
    spi_r: u64,
    proposal_number: u8,
    suite: crate::crypto::IkeSuite,
    ni: Vec<u8>,
    peer_public: Vec<u8>,
    nat: NatState,
    /// The initiator sent NAT_DETECTION_SOURCE_IP: answer NAT detection (§2.23).
    nat_asked: bool,
    /// The request as received; IKE_AUTH signs it (§2.15).
    init_request: Vec<u8>,
}

impl core::fmt::Debug for PendingInit {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // The config (PSKs, albeit redacted) and the raw request are noise here.
        f.debug_struct("PendingInit")
            .field("local", &self.local)
            .field("remote", &self.remote)
            .field("spi_i", &format_args!("{:016x}", self.spi_i))
            .field("spi_r", &format_args!("{:016x}", self.spi_r))
            .field("suite", &self.suite)
            .field("nat", &self.nat)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// `cookie_secret` may be shared by the cluster so any node can verify a cookie.
    pub fn new(config: Arc<Config>, cookie_secret: Secret) -> Self {
        Self {
            config,
            cookie_secrets: vec![(0, cookie_secret)],
        }
    }

    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Replaces the cookie secret; the previous one stays valid until the next rotation.
    pub fn rotate_cookie_secret(&mut self, secret: Secret) {
        let version = self.cookie_secrets[0].0.wrapping_add(1);
        self.cookie_secrets.truncate(1);
        self.cookie_secrets.insert(0, (version, secret));
    }

    /// Handles an IKE_SA_INIT request that [`wire::route`] classified as
    /// `NewSa` and that is not a retransmission for a known half-open SA:
    /// [`Endpoint::screen`], then [`PendingInit::complete`] at once.
    /// `half_open_sas` is how many half-open SAs this node holds now.
    pub fn accept(
        &self,
        now: u64,
        rng: &mut dyn Random,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        half_open_sas: usize,
    ) -> Accepted {
        match self.screen(rng, local, remote, datagram, half_open_sas) {
            Screened::Admit(pending) => pending.complete(now, rng),
            Screened::Reply(d, err) => Accepted::Reply(d, err),
            Screened::Dropped(err) => Accepted::Dropped(err),
        }
    }

    /// The cheap, stateless half of [`Endpoint::accept`]: everything that can
    /// be decided, and answered without state, from the request alone.
    ///
    /// Checks, in order: the header and payload syntax (§2.5: unsupported
    /// major version and unknown critical payloads are answered), that it is
    /// an IKE_SA_INIT request, SA/KE/Nonce present and the nonce length
    /// (§3.9), the cookie when `half_open_sas >= Config::cookie_threshold`
    /// (§2.6), the proposal (§2.7), the KE group (§1.2, INVALID_KE_PAYLOAD)
    /// and the KE length. `rng` only draws the responder SPI of an admitted
    /// request (8 bytes); no Diffie-Hellman work happens here.
    pub fn screen(
        &self,
        rng: &mut dyn Random,
        local: SocketAddr,
        remote: SocketAddr,
        datagram: &[u8],
        half_open_sas: usize,
    ) -> Screened {
        let (header, chain) = match wire::parse_message(datagram) {
            Ok(x) => x,
            Err(e) => {
                let err = PeerError::from(e);
                let Some(h) = Header::peek(datagram).filter(|h| !h.response) else {
                    return Screened::Dropped(err);
                };
                // §2.5: a major version we do not speak, or an unknown payload
                // marked critical, is refused with a notification (unprotected
                // here, as everything in IKE_SA_INIT). INVALID_MAJOR_VERSION
                // carries our highest version in the header so the peer can fall back.
                let notify = match &err {
                    PeerError::UnsupportedVersion(_) => {
                        NotifyPayload::new(NotifyType::INVALID_MAJOR_VERSION, vec![])
                    }
                    PeerError::UnsupportedCriticalPayload(_) => NotifyPayload::new(
                        NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD,
                        err.notify_data(),
                    ),
                    _ => return Screened::Dropped(err),
                };
                return Screened::Reply(plain_reply(h.spi_i, notify, local, remote), err);
            }
        };
        if header.exchange != ExchangeType::IKE_SA_INIT
            || header.response
            || !header.initiator
            || header.spi_r != 0
            || header.message_id != 0
            || chain.encrypted.is_some()
        {
            return Screened::Dropped(PeerError::UnexpectedExchange(header.exchange));
        }
        let payloads = &chain.payloads;
        let reply = |n: NotifyPayload, err: PeerError| {
            Screened::Reply(plain_reply(header.spi_i, n, local, remote), err)
        };
        let syntax = |missing: PayloadType| {
            reply(
                NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]),
                PeerError::MissingPayload(missing),
            )
        };
        let Some(sa) = payloads.sa() else {
            return syntax(PayloadType::SA);
        };
        let Some(ke) = payloads.ke() else {
            return syntax(PayloadType::KE);
        };
        let Some(ni) = payloads.nonce() else {
            return syntax(PayloadType::NONCE);
        };
        if let Err(err) = check_nonce(ni) {
            return reply(NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]), err);
        }
        if half_open_sas >= self.config.cookie_threshold {
            let presented = payloads
                .notify(NotifyType::COOKIE)
                .map(|n| n.data.as_slice());
            // The first octet names the secret (see `cookie`), so a forged
            // cookie costs one PRF, not one per secret kept.
            let valid = presented.is_some_and(|c| {
                c.first()
                    .and_then(|v| self.cookie_secrets.iter().find(|(sv, _)| sv == v))
                    .is_some_and(|(v, s)| ct_eq(c, &cookie(*v, s, ni, remote.ip(), header.spi_i)))
            });
            if !valid {
                let (v, s) = &self.cookie_secrets[0];
                let data = cookie(*v, s, ni, remote.ip(), header.spi_i);
                return Screened::Reply(
                    plain_reply(
                        header.spi_i,
                        NotifyPayload::new(NotifyType::COOKIE, data),
                        local,
                        remote,
                    ),
                    PeerError::TemporaryFailure,
                );
            }
        }
        let selected = match proposal::select_ike(&self.config.ike, sa, Some(ke.group)) {
            Ok(s) => s,
            Err(err) => {
                return reply(
                    NotifyPayload::new(NotifyType::NO_PROPOSAL_CHOSEN, vec![]),
                    err,
                );
            }
        };
        if ke.group != selected.suite.dh.id() {
            let err = PeerError::WrongKeGroup {
                wanted: selected.suite.dh,
            };
            return reply(
                NotifyPayload::new(NotifyType::INVALID_KE_PAYLOAD, err.notify_data()),
                err,
            );
        }
        // The length is free to check here; whether the value is a valid
        // point (or in range) is only known while agreeing, in `complete`.
        if ke.data.len() != selected.suite.dh.public_len() {
            let err = PeerError::InvalidKePublicValue;
            return reply(NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]), err);
        }
        Screened::Admit(Box::new(PendingInit {
            config: self.config.clone(),
            local,
            remote,
            spi_i: header.spi_i,
            spi_r: random_nonzero_u64(rng),
            proposal_number: selected.number,
            suite: selected.suite,
            ni: ni.to_vec(),
            peer_public: ke.data.clone(),
            nat: detect_nat(payloads, header.spi_i, 0, local, remote),
            nat_asked: payloads
                .notify(NotifyType::NAT_DETECTION_SOURCE_IP)
                .is_some(),
            init_request: datagram.to_vec(),
        }))
    }
}

impl PendingInit {
    /// Where a retransmission of this request will be looked up.
    pub fn key(&self) -> HalfOpenKey {
        HalfOpenKey {
            peer: self.remote,
            initiator_spi: self.spi_i,
        }
    }

    /// Our SPI for the new SA (the responder SPI): the peer's IKE_AUTH will
    /// carry it, so route it to the SA before its response leaves.
    pub fn local_spi(&self) -> u64 {
        self.spi_r
    }

    pub fn local(&self) -> SocketAddr {
        self.local
    }

    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// The expensive half of [`Endpoint::accept`]: our Diffie-Hellman value,
    /// the shared secret, key derivation (§2.14), the IKE_SA_INIT response
    /// and the half-open SA, whose half-open deadline starts at `now`.
    ///
    /// `Reply` when the peer's KE value is not a valid public value
    /// (INVALID_SYNTAX); the caller then forgets whatever it registered for
    /// this request.
    pub fn complete(self, now: u64, rng: &mut dyn Random) -> Accepted {
        let suite = self.suite;
        let dh = DhPrivate::generate(suite.dh, rng);
        let shared = match dh.agree(&self.peer_public) {
            Ok(s) => s,
            Err(_) => {
                let err = PeerError::InvalidKePublicValue;
                let n = NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]);
                return Accepted::Reply(plain_reply(self.spi_i, n, self.local, self.remote), err);
            }
        };
        let (local, remote) = (self.local, self.remote);
        let (spi_i, spi_r) = (self.spi_i, self.spi_r);
        let nr = random_bytes(rng, self.config.nonce_len);
        let keys = IkeKeys::derive_initial(&suite, &shared, &self.ni, &nr, spi_i, spi_r);

        let mut out_payloads = vec![
            Payload::Sa(proposal::ike_chosen(
                self.proposal_number,
                Vec::new(),
                &suite,
            )),
            Payload::Ke(KePayload {
                group: suite.dh.id(),
                data: dh.public(),
            }),
            Payload::Nonce(nr.clone()),
        ];
        if self.nat_asked {
            // §2.23: only answer NAT detection if the initiator asked.
            out_payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::NAT_DETECTION_SOURCE_IP,
                nat_detection_hash(spi_i, spi_r, local),
            )));
            out_payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::NAT_DETECTION_DESTINATION_IP,
                nat_detection_hash(spi_i, spi_r, remote),
            )));
        }
        let response = wire::emit_plain_message(
            Header {
                spi_i,
                spi_r,
                next_payload: PayloadType::NONE,
                major_version: IKE_MAJOR_VERSION,
                minor_version: 0,
                exchange: ExchangeType::IKE_SA_INIT,
                initiator: false,
                response: true,
                message_id: 0,
                length: 0,
            },
            &out_payloads,
        );
        let snapshot = IkeSaSnapshot {
            format: SNAPSHOT_FORMAT,
            local,
            peer: remote,
            nat: self.nat,
            local_id: self.config.local_identity.clone(),
            peer_id: Identity {
                kind: IdType(0),
                data: Vec::new(),
            },
            current: IkeGeneration {
                role: Role::Responder,
                spi_i,
                spi_r,
                suite,
                keys,
                next_peer_request_id: 1,
                next_request_id: 0,
                last_request_sha256: None,
                last_response: Some(StoredMessage {
                    message_id: 0,
                    datagrams: vec![response.clone()],
                }),
                pending: None,
                created_at_ms: now,
                retire_at_ms: None,
                retransmit: Retransmit::default(),
            },
            retiring: Vec::new(),
            children: Vec::new(),
            peer_inner_address: None,
            local_inner_address: None,
            queued: Vec::new(),
            established_at_ms: 0,
            last_peer_activity_ms: now,
            ike_rekey_at_ms: None,
        };
        let handshake = Handshake {
            ni: self.ni,
            nr,
            init_request: self.init_request,
            init_response: response.clone(),
            deadline_ms: Some(now.saturating_add(self.config.lifetimes.half_open_timeout_ms)),
            initiator: None,
            awaiting_address: None,
        };
        let mut sa = IkeSa {
            config: self.config,
            state: State::Keyed(Box::new(snapshot)),
            handshake: Some(Box::new(handshake)),
            out: OutBuf::default(),
        };
        sa.out.send.push(Datagram {
            local,
            remote,
            payload: response,
        });
        let outcome = sa.finish();
        Accepted::NewSa(Box::new(sa), outcome)
    }
}

/// Compares the peer's NAT_DETECTION hashes with what we see (§2.23).
/// `spi_r` is the responder SPI in the header of the message that carried them.
fn detect_nat(
    payloads: &[Payload],
    spi_i: u64,
    spi_r: u64,
    local: SocketAddr,
    remote: SocketAddr,
) -> NatState {
    let matches = |ty, addr| {
        let expected = nat_detection_hash(spi_i, spi_r, addr);
        let mut seen = false;
        let mut hit = false;
        for n in payloads.notifies().filter(|n| n.ty == ty) {
            seen = true;
            hit |= ct_eq(&n.data, &expected);
        }
        !seen || hit
    };
    NatState {
        peer_behind_nat: !matches(NotifyType::NAT_DETECTION_SOURCE_IP, remote),
        local_behind_nat: !matches(NotifyType::NAT_DETECTION_DESTINATION_IP, local),
    }
}

/// An unprotected reply to an IKE_SA_INIT request: HDR(SPIi, 0), N(...).
fn plain_reply(spi_i: u64, n: NotifyPayload, local: SocketAddr, remote: SocketAddr) -> Datagram {
    let payload = wire::emit_plain_message(
        Header {
            spi_i,
            spi_r: 0,
            next_payload: PayloadType::NONE,
            major_version: IKE_MAJOR_VERSION,
            minor_version: 0,
            exchange: ExchangeType::IKE_SA_INIT,
            initiator: false,
            response: true,
            message_id: 0,
            length: 0,
        },
        &[Payload::Notify(n)],
    );
    Datagram {
        local,
        remote,
        payload,
    }
}

/// Initiator state between sending IKE_SA_INIT and receiving its answer.
#[derive(Clone, Debug)]
pub(crate) struct Connecting {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub spi_i: u64,
    pub nonce: Vec<u8>,
    pub dh: DhPrivate,
    pub cookie: Option<Vec<u8>>,
    pub request: Vec<u8>,
    pub options: ConnectOptions,
    pub retransmit: Retransmit,
    pub attempts: u32,
}

impl Connecting {
    fn build_request(&mut self, config: &Config) {
        let mut payloads = Vec::new();
        if let Some(c) = &self.cookie {
            // §2.6: the cookie goes first, everything else unchanged.
            payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::COOKIE,
                c.clone(),
            )));
        }
        payloads.push(Payload::Sa(proposal::ike_offer(
            &config.ike,
            Vec::new(),
            self.dh.group,
        )));
        payloads.push(Payload::Ke(KePayload {
            group: self.dh.group.id(),
            data: self.dh.public(),
        }));
        payloads.push(Payload::Nonce(self.nonce.clone()));
        let mut source_hash = nat_detection_hash(self.spi_i, 0, self.local);
        if self.options.force_udp_encap {
            // A hash of no address: the responder sees us "behind a NAT".
            source_hash.iter_mut().for_each(|b| *b = !*b);
        }
        payloads.push(Payload::Notify(NotifyPayload::new(
            NotifyType::NAT_DETECTION_SOURCE_IP,
            source_hash,
        )));
        payloads.push(Payload::Notify(NotifyPayload::new(
            NotifyType::NAT_DETECTION_DESTINATION_IP,
            nat_detection_hash(self.spi_i, 0, self.peer),
        )));
        self.request = wire::emit_plain_message(
            Header {
                spi_i: self.spi_i,
                spi_r: 0,
                next_payload: PayloadType::NONE,
                major_version: IKE_MAJOR_VERSION,
                minor_version: 0,
                exchange: ExchangeType::IKE_SA_INIT,
                initiator: true,
                response: false,
                message_id: 0,
                length: 0,
            },
            &payloads,
        );
    }
}

/// How many times IKE_SA_INIT is restarted for COOKIE / INVALID_KE_PAYLOAD.
const MAX_INIT_RESTARTS: u32 = 4;

impl IkeSa {
    /// Opens an IKE SA as initiator: IKE_SA_INIT, then IKE_AUTH with PSK.
    pub fn connect(
        config: Arc<Config>,
        local: SocketAddr,
        peer: SocketAddr,
        options: ConnectOptions,
        now: u64,
        rng: &mut dyn Random,
    ) -> (IkeSa, Outcome) {
        let group = config
            .ike
            .dh
            .first()
            .copied()
            .unwrap_or(DhGroup::Curve25519);
        let mut c = Connecting {
            local,
            peer,
            spi_i: random_nonzero_u64(rng),
            nonce: random_bytes(rng, config.nonce_len),
            dh: DhPrivate::generate(group, rng),
            cookie: None,
            request: Vec::new(),
            options,
            retransmit: Retransmit {
                count: 0,
                next_at_ms: now + config.retransmit.timeout(0),
            },
            attempts: 0,
        };
        c.build_request(&config);
        let first = Datagram {
            local,
            remote: peer,
            payload: c.request.clone(),
        };
        let mut sa = IkeSa {
            config,
            state: State::Connecting(Box::new(c)),
            handshake: None,
            out: OutBuf::default(),
        };
        sa.out.send.push(first);
        let outcome = sa.finish();
        (sa, outcome)
    }

    pub(crate) fn connecting_timeout(&mut self, now: u64) {
        let policy = self.config.retransmit.clone();
        let State::Connecting(c) = &mut self.state else {
            return;
        };
        if c.retransmit.next_at_ms > now {
            return;
        }
        if c.retransmit.count >= policy.max_retransmits {
            self.close_sa(CloseReason::PeerUnreachable);
            return;
        }
        c.retransmit.count += 1;
        c.retransmit.next_at_ms = now + policy.timeout(c.retransmit.count);
        self.out.send.push(Datagram {
            local: c.local,
            remote: c.peer,
            payload: c.request.clone(),
        });
    }

    /// A retransmitted IKE_SA_INIT request reaching a half-open responder.
    pub(crate) fn on_init_retransmit(&mut self, h: &Header, local: SocketAddr, remote: SocketAddr) {
        let Some(hs) = &self.handshake else { return };
        let Some(s) = keyed_ref(&self.state) else {
            return;
        };
        if h.response || h.spi_i != s.current.spi_i || s.current.role != Role::Responder {
            return;
        }
        self.out.send.push(Datagram {
            local,
            remote,
            payload: hs.init_response.clone(),
        });
    }

    /// Initiator: the answer to IKE_SA_INIT. Its source address does not
    /// matter: NAT detection uses the hashes, and IKE_AUTH goes to the
    /// configured peer (port 4500 after a NAT was seen).
    pub(crate) fn on_init_response(&mut self, now: u64, rng: &mut dyn Random, datagram: &[u8]) {
        let config = self.config.clone();
        let State::Connecting(c) = &mut self.state else {
            return;
        };
        let (header, chain) = match wire::parse_message(datagram) {
            Ok(x) => x,
            Err(e) => {
                self.out.events.push(Event::PeerMisbehaved(e.into()));
                return;
            }
        };
        if header.exchange != ExchangeType::IKE_SA_INIT
            || !header.response
            || header.initiator
            || header.spi_i != c.spi_i
            || header.message_id != 0
        {
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::UnexpectedResponse {
                    got: header.message_id,
                }));
            return;
        }
        let payloads = chain.payloads;
        if let Some(cookie) = payloads.notify(NotifyType::COOKIE) {
            if c.attempts < MAX_INIT_RESTARTS {
                c.attempts += 1;
                c.cookie = Some(cookie.data.clone());
                self.restart_init(now);
            }
            return;
        }
        if let Some(n) = payloads.notify(NotifyType::INVALID_KE_PAYLOAD) {
            let wanted = (n.data.len() == 2)
                .then(|| u16::from_be_bytes([n.data[0], n.data[1]]))
                .and_then(DhGroup::from_id)
                .filter(|g| config.ike.dh.contains(g));
            match wanted {
                Some(g) if c.attempts < MAX_INIT_RESTARTS && g != c.dh.group => {
                    c.attempts += 1;
                    c.dh = DhPrivate::generate(g, rng);
                    self.restart_init(now);
                }
                _ => self.close_sa(CloseReason::NegotiationFailed(PeerError::PeerNotified(
                    n.ty,
                ))),
            }
            return;
        }
        if let Some(n) = payloads.first_error_notify() {
            self.close_sa(CloseReason::NegotiationFailed(PeerError::PeerNotified(
                n.ty,
            )));
            return;
        }
        match self.finish_init(now, rng, &header, &payloads, datagram) {
            Ok(()) => {}
            Err(err) => {
                self.out.events.push(Event::PeerMisbehaved(err.clone()));
                if err.reaction() != Reaction::Drop || matches!(err, PeerError::ProposalNotOffered)
                {
                    self.close_sa(CloseReason::NegotiationFailed(err));
                }
            }
        }
    }

    fn restart_init(&mut self, now: u64) {
        let config = self.config.clone();
        let State::Connecting(c) = &mut self.state else {
            return;
        };
        c.build_request(&config);
        c.retransmit = Retransmit {
            count: 0,
            next_at_ms: now + config.retransmit.timeout(0),
        };
        self.out.send.push(Datagram {
            local: c.local,
            remote: c.peer,
            payload: c.request.clone(),
        });
    }

    fn finish_init(
        &mut self,
        now: u64,
        rng: &mut dyn Random,
        header: &Header,
        payloads: &[Payload],
        datagram: &[u8],
    ) -> Result<(), PeerError> {
        let config = self.config.clone();
        let State::Connecting(c) = &self.state else {
            return Ok(());
        };
        let sa = payloads
            .sa()
            .ok_or(PeerError::MissingPayload(PayloadType::SA))?;
        let ke = payloads
            .ke()
            .ok_or(PeerError::MissingPayload(PayloadType::KE))?;
        let nr = payloads
            .nonce()
            .ok_or(PeerError::MissingPayload(PayloadType::NONCE))?;
        check_nonce(nr)?;
        if header.spi_r == 0 {
            return Err(PeerError::Malformed(wire::WireError::BadLength));
        }
        let selected = proposal::accept_ike(&config.ike, sa)?;
        if selected.suite.dh != c.dh.group || ke.group != c.dh.group.id() {
            return Err(PeerError::ProposalNotOffered);
        }
        let shared =
            c.dh.agree(&ke.data)
                .map_err(|_| PeerError::InvalidKePublicValue)?;
        let suite = selected.suite;
        let keys = IkeKeys::derive_initial(&suite, &shared, &c.nonce, nr, c.spi_i, header.spi_r);
        let mut nat = detect_nat(payloads, c.spi_i, header.spi_r, c.local, c.peer);
        // Having faked the NAT, behave as if we were behind one.
        nat.local_behind_nat |= c.options.force_udp_encap;
        let (mut local, mut peer) = (c.local, c.peer);
        if nat.any() {
            // §2.23: after NAT detection IKE continues on port 4500.
            local.set_port(NAT_T_PORT);
            peer.set_port(NAT_T_PORT);
        }
        let child_inbound_spi = crate::random_nonzero_u32(rng);
        let handshake = Handshake {
            ni: c.nonce.clone(),
            nr: nr.to_vec(),
            init_request: c.request.clone(),
            init_response: datagram.to_vec(),
            deadline_ms: None,
            initiator: Some(InitiatorAuth {
                options: c.options.clone(),
                child_inbound_spi,
            }),
            awaiting_address: None,
        };
        let snapshot = IkeSaSnapshot {
            format: SNAPSHOT_FORMAT,
            local,
            peer,
            nat,
            local_id: config.local_identity.clone(),
            peer_id: c.options.remote_identity.clone(),
            current: IkeGeneration {
                role: Role::Initiator,
                spi_i: c.spi_i,
                spi_r: header.spi_r,
                suite,
                keys,
                next_peer_request_id: 0,
                next_request_id: 1,
                last_request_sha256: None,
                last_response: None,
                pending: None,
                created_at_ms: now,
                retire_at_ms: None,
                retransmit: Retransmit::default(),
            },
            retiring: Vec::new(),
            children: Vec::new(),
            peer_inner_address: None,
            local_inner_address: None,
            queued: Vec::new(),
            established_at_ms: 0,
            last_peer_activity_ms: now,
            ike_rekey_at_ms: None,
        };
        self.state = State::Keyed(Box::new(snapshot));
        self.handshake = Some(Box::new(handshake));
        let payloads = self.auth_request_payloads(rng);
        self.send_request(
            0,
            ExchangeType::IKE_AUTH,
            payloads,
            PendingExchange::Auth,
            now,
            rng,
        );
        Ok(())
    }
}
