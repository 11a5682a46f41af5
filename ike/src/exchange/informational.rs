//! INFORMATIONAL (RFC 7296 §1.4): liveness checks and deletes.

use crate::Random;
use crate::error::PeerError;
use crate::outcome::{CloseReason, Event};
use crate::sa::{GenRef, IkeSa, Request, keyed};
use crate::snapshot::{PendingExchange, QueuedRequest};
use crate::wire::{DeletePayload, Payload, ProtocolId};

impl IkeSa {
    /// Responder side: DELETE payloads, notifications, or nothing (DPD).
    pub(crate) fn on_informational_request(
        &mut self,
        r: GenRef,
        req: &Request,
        rng: &mut dyn Random,
    ) -> Result<(), PeerError> {
        let mut delete_ike = false;
        let mut peer_spis = Vec::new();
        for p in &req.payloads {
            if let Payload::Delete(d) = p {
                match d.protocol {
                    ProtocolId::IKE => delete_ike = true,
                    ProtocolId::ESP | ProtocolId::AH => peer_spis.extend_from_slice(&d.spis),
                    _ => {}
                }
            }
        }
        if delete_ike {
            self.respond(r, req, Vec::new(), rng);
            self.on_ike_deleted_by_peer(r);
            return Ok(());
        }
        let Some(s) = keyed(&mut self.state) else {
            return Ok(());
        };
        let ours_pending: Vec<u32> = match s.current.pending.as_ref().map(|p| &p.exchange) {
            Some(PendingExchange::Informational {
                delete_children, ..
            }) => delete_children.clone(),
            _ => Vec::new(),
        };
        let mut answer = Vec::new();
        let mut removed = Vec::new();
        for spi in peer_spis {
            // The peer names the SPIs it receives on: our outbound SPIs (§1.4.1).
            if let Some(i) = s.children.iter().position(|c| c.outbound_spi == spi) {
                let c = s.children.remove(i);
                // §1.4.1: SAs we are deleting ourselves are not echoed.
                if !ours_pending.contains(&c.inbound_spi) {
                    answer.push(c.inbound_spi);
                }
                s.queued.iter_mut().for_each(|q| {
                    if let QueuedRequest::DeleteChildren(v) = q {
                        v.retain(|x| *x != c.inbound_spi);
                    }
                });
                s.queued
                    .retain(|q| !matches!(q, QueuedRequest::DeleteChildren(v) if v.is_empty()));
                s.queued
                    .retain(|q| *q != QueuedRequest::RekeyChild(c.inbound_spi));
                removed.push((c.inbound_spi, c.outbound_spi));
            }
        }
        let payloads = if answer.is_empty() {
            Vec::new()
        } else {
            vec![Payload::Delete(DeletePayload {
                protocol: ProtocolId::ESP,
                spis: answer,
            })]
        };
        self.respond(r, req, payloads, rng);
        for (inbound_spi, outbound_spi) in removed {
            self.out.events.push(Event::ChildSaDeleted {
                inbound_spi,
                outbound_spi,
            });
        }
        Ok(())
    }

    /// The peer deleted IKE SA generation `r` (our answer is already queued).
    fn on_ike_deleted_by_peer(&mut self, r: GenRef) {
        if r != 0 {
            self.drop_retiring(r);
            return;
        }
        let Some(s) = keyed(&mut self.state) else {
            return;
        };
        // §2.25.2: deleting an IKE SA we are rekeying ends our rekey; if the
        // peer's colliding rekey made a new generation, that one carries on.
        let candidate = match s.current.pending.as_ref().map(|p| &p.exchange) {
            Some(PendingExchange::RekeyIke(req)) => req
                .collision
                .as_ref()
                .and_then(|c| s.retiring.iter().position(|g| g.local_spi() == c.created)),
            _ => None,
        };
        match candidate {
            Some(i) => {
                let mut next = s.retiring.remove(i);
                next.retire_at_ms = None;
                let old = std::mem::replace(&mut s.current, next);
                self.out.dirty = true;
                self.out.events.push(Event::LocalSpiReleased {
                    local_spi: old.local_spi(),
                });
            }
            None => self.close_sa(CloseReason::DeletedByPeer),
        }
    }

    /// Initiator side: the answer to our INFORMATIONAL. The children we named
    /// are gone whatever the answer lists (§1.4.1: it names the peer's halves).
    pub(crate) fn on_informational_response(
        &mut self,
        r: GenRef,
        delete_children: Vec<u32>,
        delete_ike: bool,
    ) {
        if delete_ike {
            if r == 0 {
                self.close_sa(CloseReason::DeletedLocally);
            } else {
                self.drop_retiring(r);
            }
            return;
        }
        if delete_children.is_empty() {
            self.out.events.push(Event::PeerAlive);
            return;
        }
        for spi in delete_children {
            self.remove_child(spi);
        }
    }
}
