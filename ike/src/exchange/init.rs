//! IKE_SA_INIT (RFC 7296 §1.2): the stateless front door of the responder
//! ([`Endpoint`]: cookies §2.6, INVALID_KE_PAYLOAD §1.2, NAT detection §2.23)
//! and the initiator's first exchange.

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
#[derive(Debug)]
pub struct Endpoint {
    config: Arc<Config>,
    /// (version, secret): current and previous, so cookies survive one rotation.
    cookie_secrets: Vec<(u8, Secret)>,
}

/// What [`Endpoint::accept`] decided.
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
    /// `NewSa` and that is not a retransmission for a known half-open SA.
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
        let (header, chain) = match wire::parse_message(datagram) {
            Ok(x) => x,
            Err(e) => {
                let err = PeerError::from(e);
                let Some(h) = Header::peek(datagram).filter(|h| !h.response) else {
                    return Accepted::Dropped(err);
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
                    _ => return Accepted::Dropped(err),
                };
                return Accepted::Reply(plain_reply(&h, notify, local, remote), err);
            }
        };
        if header.exchange != ExchangeType::IKE_SA_INIT
            || header.response
            || !header.initiator
            || header.spi_r != 0
            || header.message_id != 0
            || chain.encrypted.is_some()
        {
            return Accepted::Dropped(PeerError::UnexpectedExchange(header.exchange));
        }
        let payloads = &chain.payloads;
        let reply = |n: NotifyPayload, err: PeerError| {
            Accepted::Reply(plain_reply(&header, n, local, remote), err)
        };
        let (Some(sa), Some(ke), Some(ni)) = (payloads.sa(), payloads.ke(), payloads.nonce())
        else {
            let err = PeerError::MissingPayload(PayloadType::SA);
            return reply(NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]), err);
        };
        if let Err(err) = check_nonce(ni) {
            return reply(NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]), err);
        }
        if half_open_sas >= self.config.cookie_threshold {
            let presented = payloads
                .notify(NotifyType::COOKIE)
                .map(|n| n.data.as_slice());
            let valid = presented.is_some_and(|c| {
                self.cookie_secrets
                    .iter()
                    .any(|(v, s)| ct_eq(c, &cookie(*v, s, ni, remote.ip(), header.spi_i)))
            });
            if !valid {
                let (v, s) = &self.cookie_secrets[0];
                let data = cookie(*v, s, ni, remote.ip(), header.spi_i);
                return Accepted::Reply(
                    plain_reply(
                        &header,
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
        let dh = DhPrivate::generate(selected.suite.dh, rng);
        let shared = match dh.agree(&ke.data) {
            Ok(s) => s,
            Err(_) => {
                let err = PeerError::InvalidKePublicValue;
                return reply(NotifyPayload::new(NotifyType::INVALID_SYNTAX, vec![]), err);
            }
        };
        let spi_r = random_nonzero_u64(rng);
        let nr = random_bytes(rng, self.config.nonce_len);
        let suite = selected.suite;
        let keys = IkeKeys::derive_initial(&suite, &shared, ni, &nr, header.spi_i, spi_r);
        let nat = detect_nat(payloads, header.spi_i, 0, local, remote);

        let mut out_payloads = vec![
            Payload::Sa(proposal::ike_chosen(selected.number, Vec::new(), &suite)),
            Payload::Ke(KePayload {
                group: suite.dh.id(),
                data: dh.public(),
            }),
            Payload::Nonce(nr.clone()),
        ];
        if payloads
            .notify(NotifyType::NAT_DETECTION_SOURCE_IP)
            .is_some()
        {
            // §2.23: only answer NAT detection if the initiator asked.
            out_payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::NAT_DETECTION_SOURCE_IP,
                nat_detection_hash(header.spi_i, spi_r, local),
            )));
            out_payloads.push(Payload::Notify(NotifyPayload::new(
                NotifyType::NAT_DETECTION_DESTINATION_IP,
                nat_detection_hash(header.spi_i, spi_r, remote),
            )));
        }
        let response = wire::emit_plain_message(
            Header {
                spi_i: header.spi_i,
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
            nat,
            local_id: self.config.local_identity.clone(),
            peer_id: Identity {
                kind: IdType(0),
                data: Vec::new(),
            },
            current: IkeGeneration {
                role: Role::Responder,
                spi_i: header.spi_i,
                spi_r,
                suite,
                keys,
                next_peer_request_id: 1,
                next_request_id: 0,
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
            ni: ni.to_vec(),
            nr,
            init_request: datagram.to_vec(),
            init_response: response.clone(),
            deadline_ms: Some(now + self.config.lifetimes.half_open_timeout_ms),
            initiator: None,
            awaiting_address: None,
        };
        let mut sa = IkeSa {
            config: self.config.clone(),
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
fn plain_reply(req: &Header, n: NotifyPayload, local: SocketAddr, remote: SocketAddr) -> Datagram {
    let payload = wire::emit_plain_message(
        Header {
            spi_i: req.spi_i,
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
