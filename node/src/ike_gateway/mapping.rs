//! From the engine's committed state ([`IkeSaSnapshot`]) to the replicated record
//! ([`evpc_raft_store::IkeSa`]) and the [`SaUpdate`]s that move one to the next.
//!
//! The record carries everything an operator or another node reads without keys — SPIs,
//! addresses, identities, suite, message IDs with the exact last response and pending request
//! datagrams, times, children with their sealed ESP keys, the inner address — and, sealed with
//! the cluster's active key in `IkeSa.keys` (bound to the SA, its rekey generation and epoch,
//! see [`crate::sealing`]), the *whole* engine snapshot, from which any node restores
//! the engine ([`evpc_ike::IkeSa::restore`]).
//!
//! The record follows the current IKE SA generation: after an IKE rekey the same record (same
//! id, children untouched) takes the new SPIs and restarts its message IDs
//! ([`SaUpdate::IkeRekeyedInPlace`]); the generation being replaced lives on only inside the
//! sealed snapshot until its delete exchange.
//!
//! [`Mapper::updates`] builds the update list by replaying it on a scratch copy of the SA with
//! the replicated state's own `apply`, so a mapping that the cluster would refuse is caught
//! before it is proposed, and the caller gets the record exactly as the cluster will hold it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use evpc_dataplane::ChildKeymat;
use evpc_ike::snapshot::{ChildSa as EngineChild, IkeGeneration};
use evpc_ike::{Event, IkeSaSnapshot, Lifetimes};
use evpc_raft_store::{
    ChildSa, ChildSuite, Epoch, Identity, IkeSa, IkeSuite, MessageIds, NodeId, Rejection, Role,
    SaId, SaTimes, SaUpdate, SealedKeys, StoredMessage, TrafficSelector, slot_for_initiator_spi,
};
use rand::RngCore;
use zeroize::Zeroizing;

use crate::sealing::{Binding, ClusterKey, Keyring, SealError};

fn nonce() -> [u8; 12] {
    let mut n = [0u8; 12];
    rand::rng().fill_bytes(&mut n);
    n
}

/// Why a snapshot could not be mapped, sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The sealed snapshot does not open (other cluster key, other SA, corrupt).
    #[error(transparent)]
    Seal(#[from] SealError),
    /// The snapshot bytes do not decode.
    #[error("the engine snapshot does not decode: {0}")]
    Decode(String),
    /// The replicated state would refuse the change (a bug in the mapping, or the record moved
    /// on under this node).
    #[error("the change does not fit the committed record: {0}")]
    Refused(Rejection),
}

/// Seals the engine snapshot for `IkeSa.keys` of SA `id` at rekey generation `generation`, in
/// `epoch`. The plaintext (which holds keys) is wiped.
pub fn seal_snapshot(
    key: &ClusterKey,
    id: SaId,
    generation: u32,
    epoch: Epoch,
    snapshot: &IkeSaSnapshot,
) -> SealedKeys {
    let plain = Zeroizing::new(
        postcard::to_extend(snapshot, Vec::with_capacity(16 * 1024))
            .expect("encoding a snapshot into a Vec cannot fail"),
    );
    key.seal(&Binding::ike(id, generation), epoch, &plain, nonce())
}

/// Opens the sealed engine snapshot of `record` (with whichever key its blob names).
pub fn open_snapshot(keyring: &Keyring, record: &IkeSa) -> Result<IkeSaSnapshot, MappingError> {
    let plain = keyring.open(
        &Binding::ike(record.id, record.rekey_generation),
        record.epoch,
        &record.keys,
    )?;
    postcard::from_bytes(&plain).map_err(|e| MappingError::Decode(e.to_string()))
}

/// IANA transform IDs of the engine's suite.
pub fn ike_suite(suite: &evpc_ike::IkeSuite) -> IkeSuite {
    let evpc_ike::EncrAlg::AesGcm16 { key_bits } = suite.encr;
    IkeSuite {
        encryption: 20,
        key_bits,
        prf: match suite.prf {
            evpc_ike::PrfAlg::HmacSha256 => 5,
            evpc_ike::PrfAlg::HmacSha384 => 6,
            evpc_ike::PrfAlg::HmacSha512 => 7,
        },
        integrity: None,
        dh_group: suite.dh.id(),
    }
}

/// The child suite as the data plane and the record know it.
pub fn child_suite(suite: &evpc_ike::EspSuite) -> ChildSuite {
    let evpc_ike::EncrAlg::AesGcm16 { key_bits } = suite.encr;
    ChildSuite {
        encryption: 20,
        key_bits,
        esn: suite.esn,
    }
}

/// A traffic selector in the record's terms.
pub fn selector(ts: &evpc_ike::TrafficSelector) -> TrafficSelector {
    TrafficSelector {
        protocol: ts.ip_protocol,
        start_port: ts.start_port,
        end_port: ts.end_port,
        start_addr: ts.start,
        end_addr: ts.end,
    }
}

/// An identity in the record's terms.
pub fn identity(id: &evpc_ike::Identity) -> Identity {
    Identity {
        kind: id.kind.0,
        data: id.data.clone(),
    }
}

fn stored(message: &evpc_ike::snapshot::StoredMessage) -> StoredMessage {
    StoredMessage {
        msg_id: message.message_id,
        datagrams: message.datagrams.clone(),
    }
}

fn role(role: evpc_ike::Role) -> Role {
    match role {
        evpc_ike::Role::Initiator => Role::Initiator,
        evpc_ike::Role::Responder => Role::Responder,
    }
}

/// The message-ID state of one engine generation as the record holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Window {
    msg: MessageIds,
    last_response: Option<StoredMessage>,
    pending: Option<StoredMessage>,
}

impl Window {
    fn of_record(sa: &IkeSa) -> Window {
        Window {
            msg: sa.msg,
            last_response: sa.last_response.clone(),
            pending: sa.pending_request.clone(),
        }
    }

    fn of_generation(g: &IkeGeneration) -> Window {
        Window {
            msg: MessageIds {
                next_peer_request: g.next_peer_request_id,
                next_local_request: g.next_request_id,
            },
            last_response: g.last_response.as_ref().map(stored),
            pending: g.pending.as_ref().map(|p| stored(&p.message)),
        }
    }

    /// The updates that take `self` (committed) to `to` (the engine now): a request of ours
    /// answered, a request of the peer answered, a new request of ours.
    fn diff(&self, to: &Window, out: &mut Vec<SaUpdate>) {
        let mut pending = self.pending.clone();
        if let Some(p) = &pending
            && to.pending.as_ref().map(|t| t.msg_id) != Some(p.msg_id)
        {
            out.push(SaUpdate::LocalRequestCompleted { msg_id: p.msg_id });
            pending = None;
        }
        if to.msg.next_peer_request != self.msg.next_peer_request
            && let Some(last) = &to.last_response
        {
            out.push(SaUpdate::PeerRequestAnswered {
                msg_id: last.msg_id,
                response: last.datagrams.clone(),
            });
        }
        if pending.is_none()
            && let Some(p) = &to.pending
        {
            out.push(SaUpdate::LocalRequestStarted(p.clone()));
        }
    }
}

/// Maps engine snapshots to records and updates, sealing keys on the way.
#[derive(Debug)]
pub struct Mapper<'a> {
    /// Seals the snapshot and child keys: the cluster's active key.
    pub key: &'a ClusterKey,
    /// The engine's lifetimes (the hard IKE lifetime is not in the snapshot).
    pub lifetimes: &'a Lifetimes,
    /// `out_hwm` of a new child: the first lease, usable at once by the owner.
    pub initial_lease: u64,
}

impl Mapper<'_> {
    fn times(&self, snapshot: &IkeSaSnapshot) -> SaTimes {
        SaTimes {
            established_ms: snapshot.established_at_ms,
            rekey_at_ms: snapshot.ike_rekey_at_ms.unwrap_or(0),
            expire_at_ms: self
                .lifetimes
                .ike_expire_ms
                .map_or(0, |e| snapshot.current.created_at_ms.saturating_add(e)),
        }
    }

    /// A new child for the record of SA `id` in `epoch`: keys sealed, the first lease granted,
    /// ESP in UDP when the IKE SA found a NAT (`udp_encap`).
    pub fn child(&self, id: SaId, epoch: Epoch, c: &EngineChild, udp_encap: bool) -> ChildSa {
        let keys = ChildKeymat::new(
            c.inbound_key.expose().to_vec(),
            c.outbound_key.expose().to_vec(),
        );
        let mut child = ChildSa {
            in_spi: c.inbound_spi,
            out_spi: c.outbound_spi,
            suite: child_suite(&c.suite),
            keys: SealedKeys::default(),
            ts_local: c.local_ts.iter().map(selector).collect(),
            ts_remote: c.remote_ts.iter().map(selector).collect(),
            out_start: 1,
            out_hwm: self.initial_lease,
            in_checkpoint: 0,
            udp_encap,
            rekey_generation: c.rekey_generation,
            times: SaTimes {
                established_ms: c.created_at_ms,
                rekey_at_ms: c.rekey_at_ms.unwrap_or(0),
                expire_at_ms: c.expire_at_ms.unwrap_or(0),
            },
        };
        // The binding takes the SPI and generation from the record itself.
        child.keys = self.key.seal_child(id, epoch, &child, &keys, nonce());
        child
    }

    /// The record of an SA the engine has just established, owned by `owner` in epoch 1, its
    /// slot the one its initiator SPI hashes to.
    pub fn new_record(&self, snapshot: &IkeSaSnapshot, owner: NodeId) -> IkeSa {
        let g = &snapshot.current;
        let id = SaId(g.local_spi());
        let window = Window::of_generation(g);
        IkeSa {
            id,
            spi_i: g.spi_i,
            spi_r: g.spi_r,
            role: role(g.role),
            local: snapshot.local,
            peer: snapshot.peer,
            local_id: identity(&snapshot.local_id),
            peer_id: identity(&snapshot.peer_id),
            suite: ike_suite(&g.suite),
            keys: seal_snapshot(self.key, id, 0, Epoch::FIRST, snapshot),
            msg: window.msg,
            last_response: window.last_response,
            pending_request: window.pending,
            times: self.times(snapshot),
            last_peer_activity_ms: snapshot.last_peer_activity_ms,
            rekey_generation: 0,
            virtual_ip: snapshot
                .peer_inner_address
                .as_ref()
                .map(|a| IpAddr::V4(a.ipv4)),
            slot: slot_for_initiator_spi(g.spi_i),
            owner,
            epoch: Epoch::FIRST,
            children: snapshot
                .children
                .iter()
                .map(|c| {
                    (
                        c.inbound_spi,
                        self.child(id, Epoch::FIRST, c, snapshot.nat.any()),
                    )
                })
                .collect(),
        }
    }

    /// The updates that take the committed record `prev` to the engine's `snapshot`, and the
    /// record as the cluster will hold it once they are applied. `events` are the engine's
    /// events of the same call (they say which new child replaces which).
    pub fn updates(
        &self,
        prev: &IkeSa,
        snapshot: &IkeSaSnapshot,
        events: &[Event],
    ) -> Result<(Vec<SaUpdate>, IkeSa), MappingError> {
        let mut updates = Vec::new();
        let current = &snapshot.current;
        // The generation the record is at once these updates apply: the sealed engine state
        // is bound to it.
        let mut generation = prev.rekey_generation;
        if (prev.spi_i, prev.spi_r) == (current.spi_i, current.spi_r) {
            Window::of_record(prev).diff(&Window::of_generation(current), &mut updates);
        } else {
            // An IKE rekey: first what happened on the generation the record still follows
            // (the CREATE_CHILD_SA that rekeyed it, maybe its DELETE), then the new one.
            if let Some(old) = snapshot
                .retiring
                .iter()
                .find(|g| (g.spi_i, g.spi_r) == (prev.spi_i, prev.spi_r))
            {
                Window::of_record(prev).diff(&Window::of_generation(old), &mut updates);
            }
            generation = prev.rekey_generation + 1;
            updates.push(SaUpdate::IkeRekeyedInPlace {
                spi_i: current.spi_i,
                spi_r: current.spi_r,
                rekey_generation: generation,
            });
            let fresh = Window {
                msg: MessageIds::default(),
                last_response: None,
                pending: None,
            };
            fresh.diff(&Window::of_generation(current), &mut updates);
        }
        // Children: new ones (rekeys first name the child they replace), then deleted ones.
        let replaces: BTreeMap<u32, u32> = events
            .iter()
            .filter_map(|e| match e {
                Event::ChildSaInstalled(info) => info.rekey_of.map(|old| (info.inbound_spi, old)),
                _ => None,
            })
            .collect();
        for c in &snapshot.children {
            if prev.children.contains_key(&c.inbound_spi) {
                continue;
            }
            let new = Box::new(self.child(prev.id, prev.epoch, c, snapshot.nat.any()));
            match replaces.get(&c.inbound_spi) {
                Some(old)
                    if prev
                        .children
                        .get(old)
                        .is_some_and(|o| o.rekey_generation < c.rekey_generation) =>
                {
                    updates.push(SaUpdate::ChildRekeyed {
                        old_in_spi: *old,
                        new,
                    })
                }
                _ => updates.push(SaUpdate::ChildCreated(new)),
            }
        }
        for in_spi in prev.children.keys() {
            if !snapshot.children.iter().any(|c| c.inbound_spi == *in_spi) {
                updates.push(SaUpdate::ChildDeleted { in_spi: *in_spi });
            }
        }
        let times = self.times(snapshot);
        if times != prev.times {
            updates.push(SaUpdate::Times(times));
        }
        if snapshot.peer != prev.peer {
            updates.push(SaUpdate::Peer(snapshot.peer));
        }
        if snapshot.last_peer_activity_ms > prev.last_peer_activity_ms {
            updates.push(SaUpdate::PeerSeen {
                at_ms: snapshot.last_peer_activity_ms,
            });
        }
        updates.push(SaUpdate::Keys(seal_snapshot(
            self.key, prev.id, generation, prev.epoch, snapshot,
        )));
        let expected = replay(prev, &updates).map_err(MappingError::Refused)?;
        Ok((updates, expected))
    }
}

/// The record the cluster will hold after `updates`, or the reason it would refuse them.
fn replay(sa: &IkeSa, updates: &[SaUpdate]) -> Result<IkeSa, Rejection> {
    sa.with_updates(updates)
}

#[cfg(test)]
mod tests {
    use super::*;
    use evpc_raft_store::{Command, State, apply};
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use evpc_ike::{
        Accepted, Config, ConnectOptions, Endpoint, IkeSa as Engine, InnerAddress, Outcome, Secret,
        StateChange, TrafficSelector as Ts,
    };

    /// A deterministic "random" source for the engines.
    fn rng(seed: u8) -> impl FnMut(&mut [u8]) {
        let mut counter = u64::from(seed) << 56;
        move |buf: &mut [u8]| {
            for chunk in buf.chunks_mut(8) {
                counter = counter
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let bytes = counter.to_be_bytes();
                chunk.copy_from_slice(&bytes[..chunk.len()]);
            }
        }
    }

    type TestRng = Box<dyn FnMut(&mut [u8])>;

    const GW: &str = "192.0.2.1:500";
    const RW: &str = "192.0.2.2:500";

    fn configs() -> (Arc<Config>, Arc<Config>) {
        let gw_id = evpc_ike::Identity::fqdn("gw.example");
        let rw_id = evpc_ike::Identity::fqdn("client.example");
        let mut gw = Config::new(gw_id.clone()).with_psk(rw_id.clone(), b"psk");
        gw.local_ts = vec![Ts::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)];
        let rw = Config::new(rw_id).with_psk(gw_id, b"psk");
        (Arc::new(gw), Arc::new(rw))
    }

    /// Delivers every datagram of `o` (gated ones too: these tests commit in memory).
    fn datagrams(o: Outcome) -> (Vec<Vec<u8>>, Option<IkeSaSnapshot>, Vec<Event>) {
        let mut out: Vec<Vec<u8>> = o.send.into_iter().map(|d| d.payload).collect();
        let mut snap = None;
        if let Some(c) = o.commit {
            if let StateChange::Upsert(s) = &c.change {
                snap = Some((**s).clone());
            }
            out.extend(
                c.into_datagrams_after_durable()
                    .into_iter()
                    .map(|d| d.payload),
            );
        }
        (out, snap, o.events)
    }

    struct Pair {
        gw: Engine,
        rw: Engine,
        gw_rng: TestRng,
        rw_rng: TestRng,
        now: u64,
    }

    impl Pair {
        /// Delivers datagrams back and forth until quiet; returns every snapshot the gateway
        /// produced with its events, in order.
        fn run(
            &mut self,
            mut to_gw: Vec<Vec<u8>>,
            mut to_rw: Vec<Vec<u8>>,
        ) -> Vec<(IkeSaSnapshot, Vec<Event>)> {
            let (gw, rw) = (GW.parse().unwrap(), RW.parse().unwrap());
            let mut commits = Vec::new();
            while !to_gw.is_empty() || !to_rw.is_empty() {
                for d in std::mem::take(&mut to_gw) {
                    let o = self
                        .gw
                        .handle_datagram(self.now, &mut self.gw_rng, gw, rw, &d);
                    let (out, snap, events) = datagrams(o);
                    if let Some(s) = snap {
                        commits.push((s, events));
                    }
                    to_rw.extend(out);
                }
                for d in std::mem::take(&mut to_rw) {
                    let o = self
                        .rw
                        .handle_datagram(self.now, &mut self.rw_rng, rw, gw, &d);
                    to_gw.extend(datagrams(o).0);
                }
            }
            commits
        }
    }

    /// An established gateway SA (with an inner address) and its client.
    fn established() -> (Pair, IkeSaSnapshot) {
        let (gw_config, rw_config) = configs();
        let mut gw_rng: TestRng = Box::new(rng(1));
        let mut rw_rng: TestRng = Box::new(rng(2));
        let (gw_addr, rw_addr) = (GW.parse().unwrap(), RW.parse().unwrap());
        let (rw, o) = Engine::connect(
            rw_config,
            rw_addr,
            gw_addr,
            ConnectOptions::road_warrior(
                evpc_ike::Identity::fqdn("gw.example"),
                vec![Ts::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)],
            ),
            1_000,
            &mut rw_rng,
        );
        let init = datagrams(o).0;
        let endpoint = Endpoint::new(gw_config, Secret::from_slice(&[9; 32]));
        let Accepted::NewSa(gw, o) =
            endpoint.accept(1_000, &mut gw_rng, gw_addr, rw_addr, &init[0], 0)
        else {
            panic!("IKE_SA_INIT refused");
        };
        let mut pair = Pair {
            gw: *gw,
            rw,
            gw_rng,
            rw_rng,
            now: 1_000,
        };
        let init_response = datagrams(o).0;
        let mut auth = Vec::new();
        for d in init_response {
            let o = pair
                .rw
                .handle_datagram(1_000, &mut pair.rw_rng, rw_addr, gw_addr, &d);
            auth.extend(datagrams(o).0);
        }
        let o = pair
            .gw
            .handle_datagram(1_000, &mut pair.gw_rng, gw_addr, rw_addr, &auth[0]);
        let (_, snap, events) = datagrams(o);
        assert!(snap.is_none(), "waits for an address first");
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::InnerAddressNeeded { .. }))
        );
        let o = pair
            .gw
            .assign_inner_address(
                Some(InnerAddress::new(Ipv4Addr::new(10, 10, 0, 7))),
                1_000,
                &mut pair.gw_rng,
            )
            .unwrap();
        let (out, snap, _) = datagrams(o);
        let commits = pair.run(Vec::new(), out);
        assert!(commits.is_empty());
        assert!(pair.rw.is_established());
        (pair, snap.expect("the established SA is committed"))
    }

    /// What a [`Mapper`] borrows, owned by the test.
    struct MapperParts {
        key: Keyring,
        sealer: Arc<ClusterKey>,
        lifetimes: Lifetimes,
    }

    impl MapperParts {
        fn new() -> MapperParts {
            let key =
                Keyring::in_memory([ClusterKey::from_bytes(evpc_raft_store::KeyId(1), &[5; 32])]);
            MapperParts {
                sealer: key.get(evpc_raft_store::KeyId(1)).unwrap(),
                key,
                lifetimes: Lifetimes::default(),
            }
        }

        fn mapper(&self) -> Mapper<'_> {
            Mapper {
                key: &self.sealer,
                lifetimes: &self.lifetimes,
                initial_lease: 4096,
            }
        }
    }

    /// Commits `updates` to `record` as the gateway would, checks the cluster's result is what
    /// the mapper expected, and moves `record` on to it.
    fn commit(state: &mut State, record: &mut IkeSa, updates: Vec<SaUpdate>, expected: IkeSa) {
        let applied = apply(
            state,
            &Command::Update {
                sa: record.id,
                epoch: record.epoch,
                updates: updates.clone(),
            },
        );
        assert!(applied.is_ok(), "{updates:?}: {applied:?}");
        assert_eq!(state.sa(record.id), Some(&expected));
        *record = expected;
    }

    /// Commits `record` into a state where node 1 owns its slot, as the gateway would.
    fn state_with(record: &IkeSa) -> State {
        assert_eq!(record.owner, 1);
        crate::ownership::test_support::state_with_sa(record)
    }

    #[test]
    fn a_new_record_holds_the_exchange_and_the_sealed_engine() {
        let parts = MapperParts::new();
        let (key, mapper) = (&parts.key, parts.mapper());
        let (pair, snap) = established();
        let record = mapper.new_record(&snap, 1);
        assert_eq!(record.id, SaId(snap.current.spi_r));
        assert_eq!(record.msg.next_peer_request, 2, "IKE_AUTH (1) answered");
        assert_eq!(record.last_response.as_ref().unwrap().msg_id, 1);
        assert_eq!(
            record.virtual_ip,
            Some(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 7)))
        );
        assert_eq!(record.children.len(), 1);
        let child = record.children.values().next().unwrap();
        assert_eq!(
            (child.out_start, child.out_hwm, child.in_checkpoint),
            (1, 4096, 0)
        );
        let opened = key.open_child(&record, child).unwrap();
        assert_eq!(
            *opened.inbound,
            snap.children[0].inbound_key.expose().to_vec()
        );
        // The engine comes back from the record alone, and answers a retransmitted IKE_AUTH
        // with the committed bytes.
        let restored = open_snapshot(key, &record).unwrap();
        assert_eq!(restored.current.spi_i, snap.current.spi_i);
        let mut other = record.clone();
        other.id = SaId(record.id.0 ^ 1);
        assert!(open_snapshot(key, &other).is_err());
        let state = state_with(&record);
        let stored = state.sa(record.id).unwrap().last_response.as_ref().unwrap();
        assert_eq!(
            (stored.msg_id, &stored.datagrams),
            (1, &snap.current.last_response.unwrap().datagrams)
        );
        drop(pair);
    }

    #[test]
    fn every_later_exchange_maps_to_updates_the_cluster_accepts() {
        let parts = MapperParts::new();
        let (key, mapper) = (&parts.key, parts.mapper());
        let (mut pair, snap) = established();
        let mut record = mapper.new_record(&snap, 1);
        let mut state = state_with(&record);
        let first_child = snap.children[0].inbound_spi;
        let commit_all = |pair: &mut Pair,
                          to_gw: Vec<Vec<u8>>,
                          to_rw: Vec<Vec<u8>>,
                          record: &mut IkeSa,
                          state: &mut State| {
            for (snap, events) in pair.run(to_gw, to_rw) {
                let (updates, expected) = mapper.updates(record, &snap, &events).unwrap();
                commit(state, record, updates, expected);
                // The sealed engine in the record is the engine now.
                let opened = open_snapshot(key, record).unwrap();
                assert_eq!(opened.current.spi_r, snap.current.spi_r);
                assert_eq!(
                    opened.current.next_peer_request_id,
                    snap.current.next_peer_request_id
                );
            }
        };

        // The client's DPD: the peer's request answered.
        pair.now += 10;
        let o = pair.rw.send_dpd(pair.now, &mut pair.rw_rng).unwrap();
        commit_all(
            &mut pair,
            datagrams(o).0,
            Vec::new(),
            &mut record,
            &mut state,
        );
        assert_eq!(record.msg.next_peer_request, 3);
        // The gateway's DPD: our request started, then completed.
        let o = pair.gw.send_dpd(pair.now, &mut pair.gw_rng).unwrap();
        let (out, snap, events) = datagrams(o);
        let (updates, expected) = mapper.updates(&record, &snap.unwrap(), &events).unwrap();
        assert!(matches!(
            updates[0],
            SaUpdate::LocalRequestStarted(StoredMessage { msg_id: 0, .. })
        ));
        commit(&mut state, &mut record, updates, expected);
        assert!(record.pending_request.is_some());
        // A node taking over restores the engine from the record alone and resends exactly
        // the committed request at once.
        let restored = Engine::restore(configs().0, open_snapshot(key, &record).unwrap());
        let mut restored = restored.unwrap();
        assert!(restored.next_timeout().is_some_and(|t| t <= pair.now));
        let resent = restored.handle_timeout(pair.now, &mut rng(9));
        assert!(
            resent.commit.is_none(),
            "a retransmission changes nothing committed"
        );
        assert_eq!(
            resent
                .send
                .iter()
                .map(|d| d.payload.clone())
                .collect::<Vec<_>>(),
            record.pending_request.as_ref().unwrap().datagrams
        );
        commit_all(&mut pair, Vec::new(), out, &mut record, &mut state);
        assert!(record.pending_request.is_none());
        assert_eq!(record.msg.next_local_request, 1);

        // The client rekeys the child: ChildRekeyed, then the DELETE of the old one.
        let o = pair
            .rw
            .rekey_child(
                pair.rw.children()[0].inbound_spi,
                pair.now,
                &mut pair.rw_rng,
            )
            .unwrap();
        commit_all(
            &mut pair,
            datagrams(o).0,
            Vec::new(),
            &mut record,
            &mut state,
        );
        assert_eq!(record.children.len(), 1);
        assert!(!record.children.contains_key(&first_child));
        assert_eq!(record.children.values().next().unwrap().rekey_generation, 1);

        // The client rekeys the IKE SA: the same record follows the new SPIs, children kept.
        let child_now = *record.children.keys().next().unwrap();
        let (old_i, old_r) = (record.spi_i, record.spi_r);
        let o = pair.rw.rekey_ike(pair.now, &mut pair.rw_rng).unwrap();
        commit_all(
            &mut pair,
            datagrams(o).0,
            Vec::new(),
            &mut record,
            &mut state,
        );
        assert_ne!((record.spi_i, record.spi_r), (old_i, old_r));
        assert_eq!(
            (record.spi_i, record.spi_r),
            (
                pair.rw.snapshot().unwrap().current.spi_i,
                pair.rw.snapshot().unwrap().current.spi_r
            )
        );
        assert_eq!(record.rekey_generation, 1);
        assert!(record.children.contains_key(&child_now));
        assert_eq!(record.id, SaId(old_r), "the record keeps its id");
        state.check_invariants().unwrap();

        // The gateway rekeys the IKE SA, and the client's DPD on the new one is answered.
        let o = pair.gw.rekey_ike(pair.now, &mut pair.gw_rng).unwrap();
        let (out, snap, events) = datagrams(o);
        let (updates, expected) = mapper.updates(&record, &snap.unwrap(), &events).unwrap();
        commit(&mut state, &mut record, updates, expected);
        commit_all(&mut pair, Vec::new(), out, &mut record, &mut state);
        assert_eq!(record.rekey_generation, 2);
        let o = pair.rw.send_dpd(pair.now, &mut pair.rw_rng).unwrap();
        commit_all(
            &mut pair,
            datagrams(o).0,
            Vec::new(),
            &mut record,
            &mut state,
        );
        assert_eq!(record.msg.next_peer_request, 1);
        state.check_invariants().unwrap();
    }

    #[test]
    fn a_change_the_cluster_would_refuse_is_caught_before_it_is_proposed() {
        let parts = MapperParts::new();
        let mapper = parts.mapper();
        let (mut pair, snap) = established();
        let record = mapper.new_record(&snap, 1);
        let o = pair.rw.send_dpd(1_010, &mut pair.rw_rng).unwrap();
        let commits = pair.run(datagrams(o).0, Vec::new());
        let (snap, events) = &commits[0];
        // A record that already moved past this answer (as if another commit had landed).
        let mut ahead = record.clone();
        ahead.msg.next_peer_request = 5;
        ahead.last_response = Some(StoredMessage {
            msg_id: 4,
            datagrams: vec![vec![1]],
        });
        assert!(matches!(
            mapper.updates(&ahead, snap, events),
            Err(MappingError::Refused(Rejection::MessageIdRegression { .. }))
        ));
    }
}
