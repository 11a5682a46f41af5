//! CREATE_CHILD_SA (RFC 7296 §1.3): new child SAs, child rekeys (§1.3.3),
//! IKE SA rekeys (§1.3.2, §2.18) and their collisions (§2.8.1, §2.8.2, §2.25).
//!
//! Collision rule: when both ends rekeyed the same SA, the exchange that
//! contains the lowest of the four nonces made the redundant SA, and the end
//! that initiated that exchange deletes it. The surviving exchange's initiator
//! deletes the old SA.

use crate::crypto::{ChildKeymat, DhGroup, DhPrivate, IkeKeys, Secret};
use crate::error::PeerError;
use crate::exchange::proposal;
use crate::outcome::Event;
use crate::policy::ChildContext;
use crate::sa::{GenRef, IkeSa, Request, Retransmit, keyed, keyed_ref};
use crate::snapshot::{
    ChildRequest, ChildSa, Collision, IkeGeneration, IkeRekeyRequest, PendingExchange,
    QueuedRequest, Role,
};
use crate::wire::ts::narrow;
use crate::wire::{
    ExchangeType, KePayload, NotifyPayload, NotifyType, Payload, PayloadType, PayloadsExt,
    ProtocolId, SaPayload, TrafficSelector,
};
use crate::{Random, random_bytes, random_nonzero_u64};

struct Parts<'a> {
    sa: &'a SaPayload,
    nonce: &'a [u8],
    ke: Option<&'a KePayload>,
    ts_i: Option<&'a Vec<TrafficSelector>>,
    ts_r: Option<&'a Vec<TrafficSelector>>,
}

fn parts(p: &[Payload]) -> Result<Parts<'_>, PeerError> {
    let sa = p.sa().ok_or(PeerError::MissingPayload(PayloadType::SA))?;
    let nonce = p
        .nonce()
        .ok_or(PeerError::MissingPayload(PayloadType::NONCE))?;
    if !(16..=256).contains(&nonce.len()) {
        return Err(PeerError::BadNonceLength(nonce.len()));
    }
    Ok(Parts {
        sa,
        nonce,
        ke: p.ke(),
        ts_i: p.ts_i(),
        ts_r: p.ts_r(),
    })
}

/// True if every selector of a response lies within one we proposed: the
/// responder may only narrow (RFC 7296 §2.9). Taking wider selectors would
/// let the peer claim traffic we never offered, e.g. in a rekey we started of
/// a child whose selectors the child policy once admitted.
pub(crate) fn within(answered: &[TrafficSelector], proposed: &[TrafficSelector]) -> bool {
    answered
        .iter()
        .all(|a| proposed.iter().any(|p| a.is_subset_of(p)))
}

/// True if the exchange with nonces `(a_i, a_r)` holds the lowest of the four
/// nonces of two colliding exchanges (§2.8.1). Nonces compare as octet strings.
pub(crate) fn holds_lowest_nonce(a_i: &[u8], a_r: &[u8], b_i: &[u8], b_r: &[u8]) -> bool {
    let a = a_i.min(a_r);
    let b = b_i.min(b_r);
    a < b
}

impl IkeSa {
    /// What the peer's side of a child SA may cover: its inner address if we
    /// gave it one, else its identity's own selectors, else the configured
    /// remote selectors; `None` if it must hold an inner address and does not
    /// (see [`crate::Config::remote_allowed`]).
    fn remote_allowed(&self) -> Option<Vec<TrafficSelector>> {
        let s = keyed_ref(&self.state)?;
        self.config
            .remote_allowed(&s.peer_id, s.peer_inner_address.as_ref())
    }

    /// What our side of a child SA may cover: the inner address the peer gave
    /// us, if any (we are a client), otherwise the configured local selectors.
    fn local_allowed(&self) -> Vec<TrafficSelector> {
        match keyed_ref(&self.state).and_then(|s| s.local_inner_address.as_ref()) {
            Some(a) => vec![TrafficSelector::v4_host(a.ipv4)],
            None => self.config.local_ts.clone(),
        }
    }

    /// Starts our CREATE_CHILD_SA for a rekey (`rekey_of`) or a new child (`ts`).
    pub(crate) fn start_child_request(
        &mut self,
        rekey_of: Option<u32>,
        ts: Option<(Vec<TrafficSelector>, Vec<TrafficSelector>)>,
        now: u64,
        rng: &mut dyn Random,
    ) {
        self.start_child_request_with(rekey_of, ts, self.config.esp.pfs.first().copied(), now, rng)
    }

    fn start_child_request_with(
        &mut self,
        rekey_of: Option<u32>,
        ts: Option<(Vec<TrafficSelector>, Vec<TrafficSelector>)>,
        pfs: Option<DhGroup>,
        now: u64,
        rng: &mut dyn Random,
    ) {
        let config = self.config.clone();
        let Some(s) = keyed_ref(&self.state) else {
            return;
        };
        let (ts_i, ts_r, old_outbound) = match (rekey_of, ts) {
            (Some(spi), _) => {
                let Some(old) = s
                    .children
                    .iter()
                    .find(|c| c.inbound_spi == spi && !c.replaced)
                else {
                    return;
                };
                // As initiator of this exchange our side is TSi (§2.9).
                (
                    old.local_ts.clone(),
                    old.remote_ts.clone(),
                    Some(old.inbound_spi),
                )
            }
            (None, Some((i, r))) => (i, r, None),
            (None, None) => return,
        };
        let inbound_spi = config.fresh_child_spi(rng);
        let nonce = random_bytes(rng, config.nonce_len);
        let dh = pfs.map(|g| DhPrivate::generate(g, rng));
        let mut payloads = Vec::new();
        if let Some(spi) = old_outbound {
            payloads.push(Payload::Notify(NotifyPayload {
                protocol: ProtocolId::ESP,
                spi: spi.to_be_bytes().to_vec(),
                ty: NotifyType::REKEY_SA,
                data: Vec::new(),
            }));
        }
        payloads.push(Payload::Sa(proposal::esp_offer(
            &config.esp,
            inbound_spi,
            pfs,
        )));
        payloads.push(Payload::Nonce(nonce.clone()));
        if let Some(d) = &dh {
            payloads.push(Payload::Ke(KePayload {
                group: d.group.id(),
                data: d.public(),
            }));
        }
        payloads.push(Payload::TsI(ts_i.clone()));
        payloads.push(Payload::TsR(ts_r.clone()));
        let req = ChildRequest {
            rekey_of,
            inbound_spi,
            nonce,
            dh,
            ts_i,
            ts_r,
            collision: None,
        };
        self.send_request(
            0,
            ExchangeType::CREATE_CHILD_SA,
            payloads,
            PendingExchange::CreateChild(Box::new(req)),
            now,
            rng,
        );
    }

    pub(crate) fn start_ike_rekey(&mut self, now: u64, rng: &mut dyn Random) {
        self.start_ike_rekey_with(None, now, rng)
    }

    fn start_ike_rekey_with(&mut self, group: Option<DhGroup>, now: u64, rng: &mut dyn Random) {
        let config = self.config.clone();
        let Some(s) = keyed_ref(&self.state) else {
            return;
        };
        let group = group.unwrap_or(s.current.suite.dh);
        let new_spi = random_nonzero_u64(rng);
        let nonce = random_bytes(rng, config.nonce_len);
        let dh = DhPrivate::generate(group, rng);
        let payloads = vec![
            Payload::Sa(proposal::ike_offer(
                &config.ike,
                new_spi.to_be_bytes().to_vec(),
                group,
            )),
            Payload::Nonce(nonce.clone()),
            Payload::Ke(KePayload {
                group: group.id(),
                data: dh.public(),
            }),
        ];
        let req = IkeRekeyRequest {
            new_spi,
            nonce,
            dh,
            collision: None,
        };
        self.send_request(
            0,
            ExchangeType::CREATE_CHILD_SA,
            payloads,
            PendingExchange::RekeyIke(Box::new(req)),
            now,
            rng,
        );
    }

    /// Responder side of CREATE_CHILD_SA.
    pub(crate) fn on_create_child_request(
        &mut self,
        r: GenRef,
        req: &Request,
        now: u64,
        rng: &mut dyn Random,
    ) -> Result<(), PeerError> {
        let p = parts(&req.payloads)?;
        if p.sa
            .proposals
            .first()
            .is_some_and(|x| x.protocol == ProtocolId::IKE)
        {
            return self.on_ike_rekey_request(r, req, now, rng);
        }
        let config = self.config.clone();
        let remote_allowed = self.remote_allowed();
        let local_allowed = self.local_allowed();
        let child_rekey_at = Self::jittered(now, config.lifetimes.child_rekey_ms, rng);
        let Some(s) = keyed_ref(&self.state) else {
            return Ok(());
        };
        if r != 0 {
            // Children belong on the newest IKE SA generation (§2.25.2).
            return Err(PeerError::TemporaryFailure);
        }
        if matches!(
            s.current.pending.as_ref().map(|x| &x.exchange),
            Some(PendingExchange::RekeyIke(_))
        ) {
            return Err(PeerError::TemporaryFailure);
        }
        let rekey_notify = req
            .payloads
            .notifies()
            .find(|n| n.ty == NotifyType::REKEY_SA);
        let rekey_of = match rekey_notify {
            Some(n) if n.protocol == ProtocolId::ESP && n.spi.len() == 4 => {
                let spi = u32::from_be_bytes([n.spi[0], n.spi[1], n.spi[2], n.spi[3]]);
                // The notify carries the SPI the initiator receives on: our outbound SPI.
                let old = s
                    .children
                    .iter()
                    .find(|c| c.outbound_spi == spi)
                    .ok_or(PeerError::ChildSaNotFound { spi })?;
                let deleting = s.queued.iter().any(|q| matches!(q, QueuedRequest::DeleteChildren(v) if v.contains(&old.inbound_spi)))
                    || matches!(s.current.pending.as_ref().map(|x| &x.exchange),
                        Some(PendingExchange::Informational { delete_children, .. }) if delete_children.contains(&old.inbound_spi));
                let we_rekey_it = matches!(s.current.pending.as_ref().map(|x| &x.exchange),
                        Some(PendingExchange::CreateChild(c)) if c.rekey_of == Some(old.inbound_spi));
                if deleting || (old.replaced && !we_rekey_it) {
                    // §2.25.1: a rekey of a child we are closing.
                    return Err(PeerError::TemporaryFailure);
                }
                Some(old.inbound_spi)
            }
            Some(n) => {
                return Err(PeerError::Malformed(crate::wire::WireError::Malformed {
                    payload: PayloadType::NOTIFY,
                    reason: if n.spi.len() != 4 {
                        "REKEY_SA SPI size"
                    } else {
                        "REKEY_SA protocol"
                    },
                }));
            }
            None => None,
        };
        let (Some(ts_i_req), Some(ts_r_req)) = (p.ts_i, p.ts_r) else {
            return Err(PeerError::MissingPayload(PayloadType::TSI));
        };
        let sel = proposal::select_esp(&config.esp, p.sa, p.ke.map(|k| k.group), false)?;
        // An IKE SA without an inner address whose peer has no selectors of
        // its own (require_inner_address) may cover nothing: §2.9 refusal.
        let remote_allowed = remote_allowed.ok_or(PeerError::TsUnacceptable)?;
        let ts_i = narrow(ts_i_req, &remote_allowed);
        let ts_r = narrow(ts_r_req, &local_allowed);
        if ts_i.is_empty() || ts_r.is_empty() {
            return Err(PeerError::TsUnacceptable);
        }
        // A rekey is asked too: the policy sees `rekey_of` and must let the
        // new child overlap its predecessor (see `ChildPolicy`).
        config.admit_child(ChildContext {
            exchange: ExchangeType::CREATE_CHILD_SA,
            local_ike_spi: s.current.local_spi(),
            ike_spi_i: s.current.spi_i,
            ike_spi_r: s.current.spi_r,
            peer_identity: &s.peer_id,
            inner_address: s.peer_inner_address.as_ref().map(|a| a.ipv4),
            remote_ts: &ts_i,
            local_ts: &ts_r,
            rekey_of,
        })?;
        let (shared, our_ke) = match (sel.suite.dh, p.ke) {
            (Some(g), Some(ke)) => {
                let dh = DhPrivate::generate(g, rng);
                let shared = dh
                    .agree(&ke.data)
                    .map_err(|_| PeerError::InvalidKePublicValue)?;
                (
                    Some(shared),
                    Some(KePayload {
                        group: g.id(),
                        data: dh.public(),
                    }),
                )
            }
            _ => (None, None),
        };
        let nr = random_bytes(rng, config.nonce_len);
        let inbound_spi = config.fresh_child_spi(rng);
        let Some(s) = keyed(&mut self.state) else {
            return Ok(());
        };
        let km = ChildKeymat::derive(
            s.current.suite.prf,
            &s.current.keys.sk_d,
            sel.suite.encr,
            shared.as_ref(),
            p.nonce,
            &nr,
        );
        let generation = rekey_of
            .and_then(|spi| s.children.iter().find(|c| c.inbound_spi == spi))
            .map_or(0, |c| c.rekey_generation + 1);
        let child = ChildSa {
            inbound_spi,
            outbound_spi: sel.peer_spi,
            suite: sel.suite,
            inbound_key: km.initiator_to_responder,
            outbound_key: km.responder_to_initiator,
            local_ts: ts_r.clone(),
            remote_ts: ts_i.clone(),
            rekey_generation: generation,
            created_as_initiator: false,
            created_at_ms: now,
            rekey_at_ms: child_rekey_at,
            expire_at_ms: config.lifetimes.child_expire_ms.map(|e| now + e),
            replaced: false,
        };
        if let Some(old_spi) = rekey_of {
            if let Some(old) = s.children.iter_mut().find(|c| c.inbound_spi == old_spi) {
                old.replaced = true;
                old.rekey_at_ms = None;
            }
            s.queued
                .retain(|q| *q != QueuedRequest::RekeyChild(old_spi));
            if let Some(PendingExchange::CreateChild(ours)) =
                s.current.pending.as_mut().map(|x| &mut x.exchange)
                && ours.rekey_of == Some(old_spi)
            {
                ours.collision = Some(Collision {
                    peer_ni: p.nonce.to_vec(),
                    our_nr: nr.clone(),
                    created: inbound_spi as u64,
                });
            }
        }
        s.children.push(child);
        let info = Self::child_info(
            s,
            s.children.last().unwrap_or_else(|| unreachable!()),
            rekey_of,
        );
        let mut response = vec![
            Payload::Sa(proposal::esp_chosen(sel.number, inbound_spi, &sel.suite)),
            Payload::Nonce(nr),
        ];
        if let Some(ke) = our_ke {
            response.push(Payload::Ke(ke));
        }
        response.push(Payload::TsI(ts_i));
        response.push(Payload::TsR(ts_r));
        self.respond(r, req, response, rng);
        self.out
            .events
            .push(Event::ChildSaInstalled(Box::new(info)));
        Ok(())
    }

    fn on_ike_rekey_request(
        &mut self,
        r: GenRef,
        req: &Request,
        now: u64,
        rng: &mut dyn Random,
    ) -> Result<(), PeerError> {
        let config = self.config.clone();
        let p = parts(&req.payloads)?;
        let Some(s) = keyed_ref(&self.state) else {
            return Ok(());
        };
        if r != 0 {
            return Err(PeerError::TemporaryFailure);
        }
        let closing = s.queued.contains(&QueuedRequest::DeleteIke)
            || matches!(
                s.current.pending.as_ref().map(|x| &x.exchange),
                Some(PendingExchange::Informational {
                    delete_ike: true,
                    ..
                })
            );
        if closing {
            // §2.25.2: a rekey of an IKE SA we are closing.
            return Err(PeerError::TemporaryFailure);
        }
        let ke = p.ke.ok_or(PeerError::MissingPayload(PayloadType::KE))?;
        let sel = proposal::select_ike(&config.ike, p.sa, Some(ke.group))?;
        if ke.group != sel.suite.dh.id() {
            return Err(PeerError::WrongKeGroup {
                wanted: sel.suite.dh,
            });
        }
        let peer_spi = <[u8; 8]>::try_from(sel.peer_spi.as_slice())
            .map(u64::from_be_bytes)
            .ok()
            .filter(|s| *s != 0)
            .ok_or(PeerError::Malformed(crate::wire::WireError::Malformed {
                payload: PayloadType::SA,
                reason: "IKE rekey SPI",
            }))?;
        let dh = DhPrivate::generate(sel.suite.dh, rng);
        let shared = dh
            .agree(&ke.data)
            .map_err(|_| PeerError::InvalidKePublicValue)?;
        let nr = random_bytes(rng, config.nonce_len);
        let our_spi = random_nonzero_u64(rng);
        let keys = IkeKeys::derive_rekeyed(
            s.current.suite.prf,
            &s.current.keys.sk_d,
            &sel.suite,
            &shared,
            p.nonce,
            &nr,
            peer_spi,
            our_spi,
        );
        let new_gen = IkeGeneration {
            role: Role::Responder,
            spi_i: peer_spi,
            spi_r: our_spi,
            suite: sel.suite,
            keys,
            next_peer_request_id: 0,
            next_request_id: 0,
            last_request_sha256: None,
            last_response: None,
            pending: None,
            created_at_ms: now,
            retire_at_ms: None,
            retransmit: Retransmit::default(),
        };
        let response = vec![
            Payload::Sa(proposal::ike_chosen(
                sel.number,
                our_spi.to_be_bytes().to_vec(),
                &sel.suite,
            )),
            Payload::Nonce(nr.clone()),
            Payload::Ke(KePayload {
                group: sel.suite.dh.id(),
                data: dh.public(),
            }),
        ];
        self.respond(r, req, response, rng);
        let ike_rekey_at = Self::jittered(now, config.lifetimes.ike_rekey_ms, rng);
        let retire_at = now + config.lifetimes.retired_ike_sa_timeout_ms;
        let Some(s) = keyed(&mut self.state) else {
            return Ok(());
        };
        if let Some(PendingExchange::RekeyIke(ours)) =
            s.current.pending.as_mut().map(|x| &mut x.exchange)
        {
            // §2.8.2 / §2.25.2: answer as usual, decide once our answer arrives.
            ours.collision = Some(Collision {
                peer_ni: p.nonce.to_vec(),
                our_nr: nr,
                created: our_spi,
            });
            let mut candidate = new_gen;
            candidate.retire_at_ms = Some(retire_at);
            s.retiring.push(candidate);
            self.out.events.push(Event::IkeSaRekeyed {
                old_local_spi: s.current.local_spi(),
                new_local_spi: our_spi,
            });
            return Ok(());
        }
        let old_spi = s.current.local_spi();
        let mut old = std::mem::replace(&mut s.current, new_gen);
        old.retire_at_ms = Some(retire_at);
        s.retiring.push(old);
        s.ike_rekey_at_ms = ike_rekey_at;
        self.out.events.push(Event::IkeSaRekeyed {
            old_local_spi: old_spi,
            new_local_spi: our_spi,
        });
        Ok(())
    }

    pub(crate) fn on_create_child_response(
        &mut self,
        r: GenRef,
        payloads: &[Payload],
        req: ChildRequest,
        now: u64,
        rng: &mut dyn Random,
    ) {
        let config = self.config.clone();
        if let Some(n) = payloads.first_error_notify() {
            let err = PeerError::PeerNotified(n.ty);
            let retry_at = now + config.lifetimes.temporary_failure_retry_ms;
            match n.ty {
                NotifyType::INVALID_KE_PAYLOAD => {
                    let wanted = (n.data.len() == 2)
                        .then(|| u16::from_be_bytes([n.data[0], n.data[1]]))
                        .and_then(DhGroup::from_id)
                        .filter(|g| config.esp.pfs.contains(g));
                    if let (Some(g), true) = (wanted, req.dh.as_ref().map(|d| d.group) != wanted) {
                        let ts = req
                            .rekey_of
                            .is_none()
                            .then(|| (req.ts_i.clone(), req.ts_r.clone()));
                        self.start_child_request_with(req.rekey_of, ts, Some(g), now, rng);
                        return;
                    }
                }
                NotifyType::CHILD_SA_NOT_FOUND => {
                    // §2.25: the peer has no such child; drop ours silently.
                    if let Some(old) = req.rekey_of {
                        self.remove_child(old);
                    }
                }
                _ => {
                    if let (Some(old), Some(s)) = (req.rekey_of, keyed(&mut self.state))
                        && let Some(c) = s
                            .children
                            .iter_mut()
                            .find(|c| c.inbound_spi == old && !c.replaced)
                    {
                        c.rekey_at_ms = Some(retry_at);
                    }
                }
            }
            self.out.events.push(Event::ChildSaFailed {
                rekey_of: req.rekey_of,
                error: err,
            });
            return;
        }
        let result = (|| {
            let p = parts(payloads)?;
            let sel = proposal::accept_esp(&config.esp, p.sa, p.ke.map(|k| k.group), false)?;
            let shared = match (&req.dh, sel.suite.dh, p.ke) {
                (Some(d), Some(g), Some(ke)) if g == d.group => Some(
                    d.agree(&ke.data)
                        .map_err(|_| PeerError::InvalidKePublicValue)?,
                ),
                (_, None, _) => None,
                _ => return Err(PeerError::ProposalNotOffered),
            };
            let ts_i = p
                .ts_i
                .cloned()
                .ok_or(PeerError::MissingPayload(PayloadType::TSI))?;
            let ts_r = p
                .ts_r
                .cloned()
                .ok_or(PeerError::MissingPayload(PayloadType::TSR))?;
            if !within(&ts_i, &req.ts_i) || !within(&ts_r, &req.ts_r) {
                return Err(PeerError::TsNotProposed);
            }
            Ok((sel, shared, p.nonce.to_vec(), ts_i, ts_r))
        })();
        let (sel, shared, nr, ts_i, ts_r) = match result {
            Ok(x) => x,
            Err(err) => {
                self.out.events.push(Event::ChildSaFailed {
                    rekey_of: req.rekey_of,
                    error: err,
                });
                return;
            }
        };
        let child_rekey_at = Self::jittered(now, config.lifetimes.child_rekey_ms, rng);
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        // The exchange ran on generation `r`, which an IKE rekey may have
        // retired meanwhile: its SK_d is the one both ends used.
        let Some(g) = crate::sa::gen_ref(s, r) else {
            return;
        };
        let km = ChildKeymat::derive(
            g.suite.prf,
            &g.keys.sk_d,
            sel.suite.encr,
            shared.as_ref(),
            &req.nonce,
            &nr,
        );
        let generation = req
            .rekey_of
            .and_then(|spi| s.children.iter().find(|c| c.inbound_spi == spi))
            .map_or(0, |c| c.rekey_generation + 1);
        let child = ChildSa {
            inbound_spi: req.inbound_spi,
            outbound_spi: sel.peer_spi,
            suite: sel.suite,
            inbound_key: km.responder_to_initiator,
            outbound_key: km.initiator_to_responder,
            local_ts: ts_i,
            remote_ts: ts_r,
            rekey_generation: generation,
            created_as_initiator: true,
            created_at_ms: now,
            rekey_at_ms: child_rekey_at,
            expire_at_ms: config.lifetimes.child_expire_ms.map(|e| now + e),
            replaced: false,
        };
        s.children.push(child);
        let info = Self::child_info(
            s,
            s.children.last().unwrap_or_else(|| unreachable!()),
            req.rekey_of,
        );
        self.out
            .events
            .push(Event::ChildSaInstalled(Box::new(info)));
        let Some(old) = req.rekey_of else { return };
        let to_delete = match &req.collision {
            Some(c) if holds_lowest_nonce(&req.nonce, &nr, &c.peer_ni, &c.our_nr) => {
                // Our new child is the redundant one; the peer deletes the old one.
                req.inbound_spi
            }
            _ => old,
        };
        if let Some(s) = keyed(&mut self.state) {
            for c in s
                .children
                .iter_mut()
                .filter(|c| c.inbound_spi == old || c.inbound_spi == to_delete)
            {
                c.replaced = true;
                c.rekey_at_ms = None;
            }
        }
        self.enqueue(QueuedRequest::DeleteChildren(vec![to_delete]));
    }

    pub(crate) fn on_ike_rekey_response(
        &mut self,
        r: GenRef,
        payloads: &[Payload],
        req: IkeRekeyRequest,
        now: u64,
        rng: &mut dyn Random,
    ) {
        let config = self.config.clone();
        if let Some(n) = payloads.first_error_notify() {
            if n.ty == NotifyType::INVALID_KE_PAYLOAD {
                let wanted = (n.data.len() == 2)
                    .then(|| u16::from_be_bytes([n.data[0], n.data[1]]))
                    .and_then(DhGroup::from_id)
                    .filter(|g| config.ike.dh.contains(g) && *g != req.dh.group);
                if let Some(g) = wanted {
                    self.start_ike_rekey_with(Some(g), now, rng);
                    return;
                }
            }
            self.out
                .events
                .push(Event::PeerMisbehaved(PeerError::PeerNotified(n.ty)));
            self.ike_rekey_failed(r, &req, now);
            return;
        }
        let Some(s) = keyed_ref(&self.state) else {
            return;
        };
        let Some(old) = crate::sa::gen_ref(s, r) else {
            return;
        };
        let result = (|| {
            let p = parts(payloads)?;
            let sel = proposal::accept_ike(&config.ike, p.sa)?;
            let ke = p.ke.ok_or(PeerError::MissingPayload(PayloadType::KE))?;
            if sel.suite.dh != req.dh.group || ke.group != req.dh.group.id() {
                return Err(PeerError::ProposalNotOffered);
            }
            let peer_spi = <[u8; 8]>::try_from(sel.peer_spi.as_slice())
                .map(u64::from_be_bytes)
                .ok()
                .filter(|s| *s != 0)
                .ok_or(PeerError::ProposalNotOffered)?;
            let shared: Secret = req
                .dh
                .agree(&ke.data)
                .map_err(|_| PeerError::InvalidKePublicValue)?;
            let keys = IkeKeys::derive_rekeyed(
                old.suite.prf,
                &old.keys.sk_d,
                &sel.suite,
                &shared,
                &req.nonce,
                p.nonce,
                req.new_spi,
                peer_spi,
            );
            Ok((
                IkeGeneration {
                    role: Role::Initiator,
                    spi_i: req.new_spi,
                    spi_r: peer_spi,
                    suite: sel.suite,
                    keys,
                    next_peer_request_id: 0,
                    next_request_id: 0,
                    last_request_sha256: None,
                    last_response: None,
                    pending: None,
                    created_at_ms: now,
                    retire_at_ms: None,
                    retransmit: Retransmit::default(),
                },
                p.nonce.to_vec(),
            ))
        })();
        let (new_gen, nr) = match result {
            Ok(x) => x,
            Err(err) => {
                self.out.events.push(Event::PeerMisbehaved(err));
                self.ike_rekey_failed(r, &req, now);
                return;
            }
        };
        let ike_rekey_at = Self::jittered(now, config.lifetimes.ike_rekey_ms, rng);
        let retire_at = now + config.lifetimes.retired_ike_sa_timeout_ms;
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let new_local = new_gen.local_spi();
        let old_local = crate::sa::gen_ref(s, r).map_or(0, IkeGeneration::local_spi);
        let candidate = req.collision.as_ref().and_then(|c| {
            s.retiring
                .iter()
                .position(|g| g.local_spi() == c.created)
                .map(|i| (i, c))
        });
        s.ike_rekey_at_ms = ike_rekey_at;
        // The generation whose IKE SA we now delete.
        let doomed: GenRef = match candidate {
            Some((i, c)) if holds_lowest_nonce(&req.nonce, &nr, &c.peer_ni, &c.our_nr) => {
                // Ours is redundant: the peer's new SA survives and inherits
                // the children; we delete ours, the peer deletes the old one.
                let mut survivor = s.retiring.remove(i);
                survivor.retire_at_ms = None;
                let mut redundant = new_gen;
                redundant.retire_at_ms = Some(retire_at);
                if r == 0 {
                    let mut old = std::mem::replace(&mut s.current, survivor);
                    old.retire_at_ms = Some(retire_at);
                    s.retiring.push(old);
                }
                s.retiring.push(redundant);
                s.retiring.len()
            }
            _ => {
                // Ours survives; a colliding peer SA (if any) waits for the
                // peer's DELETE. We delete the old generation.
                if r == 0 {
                    let mut old = std::mem::replace(&mut s.current, new_gen);
                    old.retire_at_ms = Some(retire_at);
                    s.retiring.push(old);
                } else {
                    s.retiring.push(new_gen);
                }
                if r == 0 { s.retiring.len() } else { r }
            }
        };
        self.out.events.push(Event::IkeSaRekeyed {
            old_local_spi: old_local,
            new_local_spi: new_local,
        });
        let delete = vec![Payload::Delete(crate::wire::DeletePayload {
            protocol: ProtocolId::IKE,
            spis: vec![],
        })];
        self.send_request(
            doomed,
            ExchangeType::INFORMATIONAL,
            delete,
            PendingExchange::Informational {
                delete_children: vec![],
                delete_ike: true,
            },
            now,
            rng,
        );
    }

    /// Our IKE rekey produced nothing. If the peer's colliding rekey made a
    /// new generation meanwhile, that one is the successor; otherwise we retry later.
    fn ike_rekey_failed(&mut self, r: GenRef, req: &IkeRekeyRequest, now: u64) {
        let retry = self.config.lifetimes.temporary_failure_retry_ms;
        let retire_at = now + self.config.lifetimes.retired_ike_sa_timeout_ms;
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        let candidate = req
            .collision
            .as_ref()
            .and_then(|c| s.retiring.iter().position(|g| g.local_spi() == c.created));
        match candidate {
            Some(i) if r == 0 => {
                let mut next = s.retiring.remove(i);
                next.retire_at_ms = None;
                let mut old = std::mem::replace(&mut s.current, next);
                // The peer, whose rekey survived, deletes the old generation.
                old.retire_at_ms = Some(retire_at);
                s.retiring.push(old);
                s.ike_rekey_at_ms = self.config.lifetimes.ike_rekey_ms.map(|m| now + m);
            }
            _ => s.ike_rekey_at_ms = Some(now + retry),
        }
        self.out.dirty = true;
    }

    pub(crate) fn remove_child(&mut self, inbound_spi: u32) {
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        if let Some(i) = s.children.iter().position(|c| c.inbound_spi == inbound_spi) {
            let c = s.children.remove(i);
            self.out.dirty = true;
            self.out.events.push(Event::ChildSaDeleted {
                inbound_spi: c.inbound_spi,
                outbound_spi: c.outbound_spi,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::{holds_lowest_nonce, within};
    use crate::wire::TrafficSelector;

    /// §2.9: a response may narrow what we proposed, never widen it.
    #[test]
    fn response_selectors_must_lie_within_the_proposal() {
        let net = |a, b, len| TrafficSelector::v4_prefix(Ipv4Addr::new(10, a, b, 0), len);
        let proposed = [net(10, 0, 24), net(20, 0, 16)];
        assert!(within(&[net(10, 0, 24)], &proposed));
        assert!(within(&[net(10, 0, 25), net(20, 7, 24)], &proposed));
        assert!(within(
            &[TrafficSelector::v4_host(Ipv4Addr::new(10, 20, 1, 2))],
            &proposed
        ));
        assert!(!within(&[TrafficSelector::any_v4()], &proposed));
        assert!(!within(&[net(10, 0, 24), net(30, 0, 24)], &proposed));
        assert!(!within(&[net(10, 0, 23)], &proposed));
        // A narrower port or protocol is still within; a wider one is not.
        let mut tcp = net(10, 0, 24);
        tcp.ip_protocol = 6;
        assert!(within(&[tcp], &proposed));
        assert!(!within(&proposed[..1], &[tcp]));
    }

    /// §2.8.1: the exchange holding the lowest of the four nonces made the
    /// redundant SA (the lowest nonce loses), whichever side of it the nonce is on.
    #[test]
    fn lowest_nonce_marks_the_redundant_exchange() {
        let (lo, mid, hi, top) = ([1u8; 16], [5u8; 16], [9u8; 16], [200u8; 16]);
        assert!(holds_lowest_nonce(&lo, &top, &mid, &hi));
        assert!(holds_lowest_nonce(&top, &lo, &mid, &hi));
        assert!(!holds_lowest_nonce(&mid, &hi, &lo, &top));
        assert!(!holds_lowest_nonce(&mid, &hi, &top, &lo));
        // Octet-string order: the first differing octet decides, not the length.
        assert!(holds_lowest_nonce(
            &[0x01, 0xff],
            &[0xff; 2],
            &[0x02],
            &[0xff; 2]
        ));
    }
}
