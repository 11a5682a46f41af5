//! IKE_AUTH (RFC 7296 §1.2, §2.15) with pre-shared keys, the configuration
//! payload (§2.19) and the first child SA.
//!
//! Authentication is isolated in `verify_peer` / `our_auth`: a certificate
//! or EAP method would add an arm there, not touch the exchange logic.

use std::net::Ipv4Addr;

use crate::Random;
use crate::crypto::keys::psk_auth;
use crate::crypto::secret::ct_eq;
use crate::crypto::{ChildKeymat, Secret};
use crate::error::{ApiError, PeerError, Reaction};
use crate::exchange::create_child::within;
use crate::exchange::proposal;
use crate::outcome::{CloseReason, Event, Outcome};
use crate::policy::ChildContext;
use crate::sa::{IkeSa, Request, keyed, keyed_ref};
use crate::snapshot::{ChildSa, InnerAddress, Role};
use crate::wire::ts::narrow;
use crate::wire::{
    AuthMethod, AuthPayload, CfgAttributeType, CfgType, CpAttribute, CpPayload, ExchangeType,
    Identity, NotifyPayload, NotifyType, Payload, PayloadType, PayloadsExt, SaPayload,
    TrafficSelector,
};

/// An authenticated IKE_AUTH request whose answer waits for an inner address.
#[derive(Clone, Debug)]
pub(crate) struct AuthRequest {
    req: Request,
    child: Option<ChildAsk>,
    /// The CP request listed INTERNAL_IP4_DNS (§3.15.1: answer what was asked).
    dns_requested: bool,
}

#[derive(Debug, Clone)]
struct ChildAsk {
    sa: SaPayload,
    ts_i: Vec<TrafficSelector>,
    ts_r: Vec<TrafficSelector>,
}

fn child_ask(p: &[Payload]) -> Option<ChildAsk> {
    Some(ChildAsk {
        sa: p.sa()?.clone(),
        ts_i: p.ts_i()?.clone(),
        ts_r: p.ts_r()?.clone(),
    })
}

/// Verifies the peer's AUTH payload. Only shared-key MIC exists today.
#[allow(clippy::too_many_arguments)]
fn verify_peer(
    config: &crate::config::Config,
    prf: crate::crypto::PrfAlg,
    peer_id: &Identity,
    auth: &AuthPayload,
    signed_message: &[u8],
    our_nonce: &[u8],
    sk_p_peer: &Secret,
) -> Result<(), PeerError> {
    match auth.method {
        AuthMethod::SHARED_KEY_MIC => {
            let psk = config
                .psk_for(peer_id)
                .ok_or(PeerError::UnknownPeerIdentity)?;
            let expected = psk_auth(
                prf,
                psk,
                signed_message,
                our_nonce,
                sk_p_peer,
                &peer_id.to_body(),
            );
            if ct_eq(&expected, &auth.data) {
                Ok(())
            } else {
                Err(PeerError::AuthenticationFailed)
            }
        }
        other => Err(PeerError::UnsupportedAuthMethod(other.0)),
    }
}

/// Our AUTH payload, with the PSK bound to the peer identity.
fn our_auth(
    config: &crate::config::Config,
    prf: crate::crypto::PrfAlg,
    peer_id: &Identity,
    signed_message: &[u8],
    peer_nonce: &[u8],
    sk_p_ours: &Secret,
) -> AuthPayload {
    let empty = Secret::default();
    let psk = config.psk_for(peer_id).unwrap_or(&empty);
    let data = psk_auth(
        prf,
        psk,
        signed_message,
        peer_nonce,
        sk_p_ours,
        &config.local_identity.to_body(),
    );
    AuthPayload {
        method: AuthMethod::SHARED_KEY_MIC,
        data,
    }
}

fn cp_reply(a: &InnerAddress, dns_requested: bool) -> CpPayload {
    let mut attributes = vec![CpAttribute {
        ty: CfgAttributeType::INTERNAL_IP4_ADDRESS,
        value: a.ipv4.octets().to_vec(),
    }];
    if let Some(m) = a.netmask {
        attributes.push(CpAttribute {
            ty: CfgAttributeType::INTERNAL_IP4_NETMASK,
            value: m.octets().to_vec(),
        });
    }
    for d in a.dns.iter().filter(|_| dns_requested) {
        attributes.push(CpAttribute {
            ty: CfgAttributeType::INTERNAL_IP4_DNS,
            value: d.octets().to_vec(),
        });
    }
    CpPayload {
        cfg_type: CfgType::REPLY,
        attributes,
    }
}

fn parse_cp_reply(cp: &CpPayload) -> Option<InnerAddress> {
    let v4 = |v: &[u8]| <[u8; 4]>::try_from(v).ok().map(Ipv4Addr::from);
    let mut addr: Option<InnerAddress> = None;
    for a in &cp.attributes {
        match a.ty {
            CfgAttributeType::INTERNAL_IP4_ADDRESS => {
                if let Some(ip) = v4(&a.value) {
                    addr.get_or_insert_with(|| InnerAddress::new(ip)).ipv4 = ip;
                }
            }
            CfgAttributeType::INTERNAL_IP4_NETMASK => {
                if let (Some(x), Some(m)) = (addr.as_mut(), v4(&a.value)) {
                    x.netmask = Some(m);
                }
            }
            CfgAttributeType::INTERNAL_IP4_DNS => {
                if let (Some(x), Some(d)) = (addr.as_mut(), v4(&a.value)) {
                    x.dns.push(d);
                }
            }
            _ => {}
        }
    }
    addr
}

impl IkeSa {
    /// Responder: IKE_AUTH request (message ID 1).
    pub(crate) fn on_auth_request(
        &mut self,
        req: &Request,
        now: u64,
        rng: &mut dyn Random,
    ) -> Result<(), PeerError> {
        let config = self.config.clone();
        let Some(hs) = &self.handshake else {
            return Err(PeerError::UnexpectedExchange(req.header.exchange));
        };
        let Some(s) = keyed_ref(&self.state) else {
            return Ok(());
        };
        if s.current.role != Role::Responder || req.header.message_id != 1 {
            return Err(PeerError::UnexpectedExchange(req.header.exchange));
        }
        let p = &req.payloads;
        let id_i = p
            .id_i()
            .ok_or(PeerError::MissingPayload(PayloadType::IDI))?;
        // No AUTH payload means the peer wants EAP, which we do not offer.
        let auth = p.auth().ok_or(PeerError::UnsupportedAuthMethod(0))?;
        if let Some(id_r) = p.id_r()
            && *id_r != config.local_identity
        {
            return Err(PeerError::WrongResponderIdentity);
        }
        let prf = s.current.suite.prf;
        verify_peer(
            &config,
            prf,
            id_i,
            auth,
            &hs.init_request,
            &hs.nr,
            &s.current.keys.sk_pi,
        )?;

        let id_i = id_i.clone();
        let initial_contact = p.notify(NotifyType::INITIAL_CONTACT).is_some();
        let child = child_ask(p);
        let cp_request = p.cp().filter(|c| {
            c.cfg_type == CfgType::REQUEST && c.has(CfgAttributeType::INTERNAL_IP4_ADDRESS)
        });
        let requested = cp_request.and_then(|c| {
            c.attributes
                .iter()
                .find(|a| a.ty == CfgAttributeType::INTERNAL_IP4_ADDRESS)
                .and_then(|a| <[u8; 4]>::try_from(a.value.as_slice()).ok())
                .map(Ipv4Addr::from)
                .filter(|ip| !ip.is_unspecified())
        });
        let wants_address = cp_request.is_some() && child.is_some();
        if let Some(s) = keyed(&mut self.state) {
            s.peer_id = id_i.clone();
            s.local = req.local;
            s.peer = req.remote;
        }
        if initial_contact {
            self.out.events.push(Event::InitialContact {
                peer_identity: id_i.clone(),
            });
        }
        let pending = AuthRequest {
            req: Request {
                header: req.header,
                payloads: Vec::new(),
                local: req.local,
                remote: req.remote,
                sha256: req.sha256,
            },
            child,
            dns_requested: cp_request.is_some_and(|c| c.has(CfgAttributeType::INTERNAL_IP4_DNS)),
        };
        if wants_address {
            self.out.events.push(Event::InnerAddressNeeded {
                peer_identity: id_i,
                requested,
            });
            if let Some(hs) = &mut self.handshake {
                hs.awaiting_address = Some(Box::new(pending));
            }
            return Ok(());
        }
        self.finish_auth(pending, None, now, rng);
        Ok(())
    }

    /// Responder: supplies the inner address asked for in IKE_AUTH (after
    /// [`Event::InnerAddressNeeded`]); `None` answers INTERNAL_ADDRESS_FAILURE
    /// (the IKE SA is still established, without a child SA, §3.15.4).
    pub fn assign_inner_address(
        &mut self,
        address: Option<InnerAddress>,
        now: u64,
        rng: &mut dyn Random,
    ) -> Result<Outcome, ApiError> {
        let Some(pending) = self
            .handshake
            .as_mut()
            .and_then(|h| h.awaiting_address.take())
        else {
            return Err(ApiError::NoAddressRequested);
        };
        self.finish_auth(*pending, Some(address), now, rng);
        Ok(self.finish())
    }

    fn finish_auth(
        &mut self,
        pending: AuthRequest,
        address: Option<Option<InnerAddress>>,
        now: u64,
        rng: &mut dyn Random,
    ) {
        let config = self.config.clone();
        let Some(hs) = self.handshake.take() else {
            return;
        };
        let ike_rekey_at = Self::jittered(now, config.lifetimes.ike_rekey_ms, rng);
        let child_rekey_at = Self::jittered(now, config.lifetimes.child_rekey_ms, rng);
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let prf = s.current.suite.prf;
        let mut response = vec![
            Payload::IdR(config.local_identity.clone()),
            Payload::Auth(our_auth(
                &config,
                prf,
                &s.peer_id,
                &hs.init_response,
                &hs.ni,
                &s.current.keys.sk_pr,
            )),
        ];
        let mut installed = None;
        if let Some(ask) = &pending.child {
            let outcome = (|| {
                let inner = match &address {
                    None => None,
                    Some(Some(a)) => Some(a.clone()),
                    Some(None) => return Err(PeerError::InternalAddressFailure),
                };
                // Without an inner address and without selectors of its own
                // the peer could only get the shared remote_ts; with
                // require_inner_address that is refused (FAILED_CP_REQUIRED).
                let remote_allowed = config
                    .remote_allowed(&s.peer_id, inner.as_ref())
                    .ok_or(PeerError::InnerAddressRequired)?;
                let sel = proposal::select_esp(&config.esp, &ask.sa, None, true)?;
                let ts_i = narrow(&ask.ts_i, &remote_allowed);
                let ts_r = narrow(&ask.ts_r, &config.local_ts);
                if ts_i.is_empty() || ts_r.is_empty() {
                    return Err(PeerError::TsUnacceptable);
                }
                config.admit_child(ChildContext {
                    exchange: ExchangeType::IKE_AUTH,
                    local_ike_spi: s.current.local_spi(),
                    ike_spi_i: s.current.spi_i,
                    ike_spi_r: s.current.spi_r,
                    peer_identity: &s.peer_id,
                    inner_address: inner.as_ref().map(|a| a.ipv4),
                    remote_ts: &ts_i,
                    local_ts: &ts_r,
                    rekey_of: None,
                })?;
                Ok((sel, inner, ts_i, ts_r))
            })();
            match outcome {
                Ok((sel, inner, ts_i, ts_r)) => {
                    let inbound_spi = config.fresh_child_spi(rng);
                    let km = ChildKeymat::derive(
                        prf,
                        &s.current.keys.sk_d,
                        sel.suite.encr,
                        None,
                        &hs.ni,
                        &hs.nr,
                    );
                    if let Some(a) = &inner {
                        response.push(Payload::Cp(cp_reply(a, pending.dns_requested)));
                        s.peer_inner_address = Some(a.clone());
                    }
                    response.push(Payload::Sa(proposal::esp_chosen(
                        sel.number,
                        inbound_spi,
                        &sel.suite,
                    )));
                    response.push(Payload::TsI(ts_i.clone()));
                    response.push(Payload::TsR(ts_r.clone()));
                    let child = ChildSa {
                        inbound_spi,
                        outbound_spi: sel.peer_spi,
                        suite: sel.suite,
                        inbound_key: km.initiator_to_responder,
                        outbound_key: km.responder_to_initiator,
                        local_ts: ts_r,
                        remote_ts: ts_i,
                        rekey_generation: 0,
                        created_as_initiator: false,
                        created_at_ms: now,
                        rekey_at_ms: child_rekey_at,
                        expire_at_ms: config.lifetimes.child_expire_ms.map(|e| now + e),
                        replaced: false,
                    };
                    s.children.push(child);
                    installed = Some(s.children.len() - 1);
                }
                Err(err) => {
                    if let Reaction::Notify(ty) = err.reaction() {
                        response.push(Payload::Notify(NotifyPayload::new(ty, err.notify_data())));
                    }
                    self.out.events.push(Event::ChildSaFailed {
                        rekey_of: None,
                        error: err,
                    });
                }
            }
        }
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        s.established_at_ms = now;
        s.last_peer_activity_ms = now;
        s.ike_rekey_at_ms = ike_rekey_at;
        let peer_identity = s.peer_id.clone();
        let local_spi = s.current.local_spi();
        self.respond(0, &pending.req, response, rng);
        self.out.events.push(Event::IkeSaEstablished {
            local_spi,
            peer_identity,
        });
        if let (Some(i), Some(s)) = (installed, keyed_ref(&self.state)) {
            let info = Self::child_info(s, &s.children[i], None);
            self.out
                .events
                .push(Event::ChildSaInstalled(Box::new(info)));
        }
    }

    /// Initiator: the IKE_AUTH request payloads.
    pub(crate) fn auth_request_payloads(&self, _rng: &mut dyn Random) -> Vec<Payload> {
        let (Some(hs), Some(s)) = (&self.handshake, keyed_ref(&self.state)) else {
            return Vec::new();
        };
        let Some(ia) = &hs.initiator else {
            return Vec::new();
        };
        let o = &ia.options;
        let prf = s.current.suite.prf;
        let auth = our_auth(
            &self.config,
            prf,
            &o.remote_identity,
            &hs.init_request,
            &hs.nr,
            &s.current.keys.sk_pi,
        );
        let mut p = vec![
            Payload::IdI(self.config.local_identity.clone()),
            Payload::IdR(o.remote_identity.clone()),
            Payload::Auth(auth),
        ];
        if o.request_inner_address {
            p.push(Payload::Cp(CpPayload {
                cfg_type: CfgType::REQUEST,
                attributes: vec![
                    CpAttribute {
                        ty: CfgAttributeType::INTERNAL_IP4_ADDRESS,
                        value: Vec::new(),
                    },
                    CpAttribute {
                        ty: CfgAttributeType::INTERNAL_IP4_DNS,
                        value: Vec::new(),
                    },
                ],
            }));
        }
        p.push(Payload::Sa(proposal::esp_offer(
            &self.config.esp,
            ia.child_inbound_spi,
            None,
        )));
        p.push(Payload::TsI(o.ts_i.clone()));
        p.push(Payload::TsR(o.ts_r.clone()));
        p
    }

    /// Initiator: the IKE_AUTH response.
    pub(crate) fn on_auth_response(
        &mut self,
        payloads: &[Payload],
        now: u64,
        rng: &mut dyn Random,
    ) {
        match self.verify_auth_response(payloads) {
            Ok(()) => {}
            Err(err) => {
                self.out.events.push(Event::PeerMisbehaved(err.clone()));
                let reason = match err {
                    PeerError::AuthenticationFailed
                    | PeerError::PeerNotified(NotifyType::AUTHENTICATION_FAILED)
                    | PeerError::WrongResponderIdentity => CloseReason::AuthenticationFailed,
                    e => CloseReason::NegotiationFailed(e),
                };
                self.close_sa(reason);
                return;
            }
        }
        let config = self.config.clone();
        let ike_rekey_at = Self::jittered(now, config.lifetimes.ike_rekey_ms, rng);
        let child_rekey_at = Self::jittered(now, config.lifetimes.child_rekey_ms, rng);
        let Some(hs) = self.handshake.take() else {
            return;
        };
        let Some(ia) = hs.initiator else { return };
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        s.established_at_ms = now;
        s.ike_rekey_at_ms = ike_rekey_at;
        let mut events = vec![Event::IkeSaEstablished {
            local_spi: s.current.local_spi(),
            peer_identity: s.peer_id.clone(),
        }];
        if let Some(cp) = payloads.cp()
            && let Some(a) = parse_cp_reply(cp)
        {
            s.local_inner_address = Some(a.clone());
            events.push(Event::InnerAddressAssigned(a));
        }
        let child = child_ask(payloads)
            .ok_or(PeerError::MissingPayload(PayloadType::SA))
            .and_then(|ask| {
                let sel = proposal::accept_esp(&config.esp, &ask.sa, None, true)?;
                let o = &ia.options;
                if !within(&ask.ts_i, &o.ts_i) || !within(&ask.ts_r, &o.ts_r) {
                    return Err(PeerError::TsNotProposed);
                }
                Ok((sel, ask))
            });
        match child {
            Ok((sel, ask)) => {
                let prf = s.current.suite.prf;
                let km = ChildKeymat::derive(
                    prf,
                    &s.current.keys.sk_d,
                    sel.suite.encr,
                    None,
                    &hs.ni,
                    &hs.nr,
                );
                let c = ChildSa {
                    inbound_spi: ia.child_inbound_spi,
                    outbound_spi: sel.peer_spi,
                    suite: sel.suite,
                    inbound_key: km.responder_to_initiator,
                    outbound_key: km.initiator_to_responder,
                    local_ts: ask.ts_i,
                    remote_ts: ask.ts_r,
                    rekey_generation: 0,
                    created_as_initiator: true,
                    created_at_ms: now,
                    rekey_at_ms: child_rekey_at,
                    expire_at_ms: config.lifetimes.child_expire_ms.map(|e| now + e),
                    replaced: false,
                };
                s.children.push(c);
                let info =
                    Self::child_info(s, s.children.last().unwrap_or_else(|| unreachable!()), None);
                events.push(Event::ChildSaInstalled(Box::new(info)));
            }
            Err(err) => {
                let error = payloads
                    .first_error_notify()
                    .map(|n| PeerError::PeerNotified(n.ty))
                    .unwrap_or(err);
                events.push(Event::ChildSaFailed {
                    rekey_of: None,
                    error,
                });
            }
        }
        self.out.events.extend(events);
        self.out.dirty = true;
    }

    fn verify_auth_response(&self, payloads: &[Payload]) -> Result<(), PeerError> {
        let (Some(hs), Some(s)) = (&self.handshake, keyed_ref(&self.state)) else {
            return Err(PeerError::SaNotUsable);
        };
        let auth = payloads.auth();
        let Some(auth) = auth else {
            return Err(match payloads.first_error_notify() {
                Some(n) => PeerError::PeerNotified(n.ty),
                None => PeerError::MissingPayload(PayloadType::AUTH),
            });
        };
        let id_r = payloads
            .id_r()
            .ok_or(PeerError::MissingPayload(PayloadType::IDR))?;
        if *id_r != s.peer_id {
            return Err(PeerError::WrongResponderIdentity);
        }
        verify_peer(
            &self.config,
            s.current.suite.prf,
            id_r,
            auth,
            &hs.init_response,
            &hs.ni,
            &s.current.keys.sk_pr,
        )
    }
}
