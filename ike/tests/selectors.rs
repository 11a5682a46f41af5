//! Whose addresses a child SA may cover (RFC 7296 §2.9 narrowing), on the
//! virtual clock of `common`: the inner address a pool peer must take
//! (`require_inner_address`, FAILED_CP_REQUIRED), per-identity selectors of
//! site-to-site peers, and the caller's `ChildPolicy` hook (TS_UNACCEPTABLE).

mod common;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use evpc_ike::wire::{ExchangeType, NotifyType};
use evpc_ike::{
    ChildContext, ChildPolicy, Config, ConnectOptions, Event, Identity, PeerError, TrafficSelector,
};

const SEEDS: [u64; 3] = [1, 2, 0xdead_beef];

fn net(a: u8, b: u8, c: u8, len: u8) -> TrafficSelector {
    TrafficSelector::v4_prefix(Ipv4Addr::new(10, a, b, c), len)
}

/// The gateway's side: what `gateway_config` offers (10.10.0.0/24).
fn gw_side() -> Vec<TrafficSelector> {
    vec![net(10, 0, 0, 24)]
}

/// A client that asks for no inner address and proposes all of IPv4 as its side.
fn no_cp() -> ConnectOptions {
    ConnectOptions {
        request_inner_address: false,
        ..connect_options()
    }
}

fn pool_gateway() -> Config {
    let mut c = gateway_config(2);
    c.require_inner_address = true;
    c
}

/// The gateway slot of the IKE SA with `client`, once established.
fn gw_slot_of(sim: &Sim, client: u8) -> Option<usize> {
    let id = client_identity(client);
    sim.gw.sas.iter().position(|s| {
        s.as_ref()
            .is_some_and(|s| s.is_established() && s.peer_identity() == Some(&id))
    })
}

fn both_up(sim: &Sim, client: usize) -> bool {
    sim.clients[client].sa.is_established() && gw_slot_of(sim, client as u8).is_some()
}

/// The child failure a client saw, as the notify type in the gateway's answer.
fn refused_with(events: &[Event], ty: NotifyType) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(e, Event::ChildSaFailed {
                error: PeerError::PeerNotified(t),
                ..
            } if *t == ty)
        })
        .count()
}

fn gw_failed_with(events: &[Event], err: &PeerError) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::ChildSaFailed { error, .. } if error == err))
        .count()
}

/// One admission decision, as the policy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    exchange: ExchangeType,
    local_ike_spi: u64,
    ike_spis: (u64, u64),
    peer: Identity,
    inner: Option<Ipv4Addr>,
    remote_ts: Vec<TrafficSelector>,
    local_ts: Vec<TrafficSelector>,
    rekey_of: Option<u32>,
}

/// Records every child it is asked about; refuses while `refuse` is set.
#[derive(Debug, Default)]
struct Recorder {
    refuse: AtomicBool,
    seen: Mutex<Vec<Seen>>,
}

impl Recorder {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn refuse(&self, refuse: bool) {
        self.refuse.store(refuse, Ordering::SeqCst);
    }
}

impl ChildPolicy for Recorder {
    fn admit(&self, c: ChildContext<'_>) -> bool {
        self.seen.lock().unwrap().push(Seen {
            exchange: c.exchange,
            local_ike_spi: c.local_ike_spi,
            ike_spis: (c.ike_spi_i, c.ike_spi_r),
            peer: c.peer_identity.clone(),
            inner: c.inner_address,
            remote_ts: c.remote_ts.to_vec(),
            local_ts: c.local_ts.to_vec(),
            rekey_of: c.rekey_of,
        });
        !self.refuse.load(Ordering::SeqCst)
    }
}

fn with_policy(mut c: Config, policy: &Arc<Recorder>) -> Config {
    c.child_policy = Some(policy.clone());
    c
}

/// §3.10.1 FAILED_CP_REQUIRED / §1.2: a pool peer that asks for no inner
/// address gets its IKE SA, but no child SA, and none later either.
#[test]
fn pool_peer_without_cp_gets_the_ike_sa_but_no_child() {
    for seed in SEEDS {
        for faults in [Faults::NONE, Faults::LOSSY] {
            let mut sim = Sim::new(seed, faults, pool_gateway());
            sim.add_client(client_config(0), no_cp());
            assert!(sim.run_until(120_000, |s| both_up(s, 0)), "seed {seed}");
            let slot = gw_slot_of(&sim, 0).unwrap();
            assert!(sim.clients[0].sa.children().is_empty());
            assert!(sim.gw_sa(slot).unwrap().children().is_empty());
            assert!(sim.gw_sa(slot).unwrap().peer_inner_address().is_none());
            // The answer to IKE_AUTH carried FAILED_CP_REQUIRED.
            assert_eq!(
                refused_with(&sim.clients[0].events, NotifyType::FAILED_CP_REQUIRED),
                1
            );
            assert_eq!(
                gw_failed_with(&sim.gw.events, &PeerError::InnerAddressRequired),
                1
            );
            assert!(sim.gw.commits >= 1, "the IKE SA is committed");
            assert!(
                !sim.gw
                    .events
                    .iter()
                    .any(|e| matches!(e, Event::InnerAddressNeeded { .. }))
            );
            // Nor can it get a child through CREATE_CHILD_SA (§2.9).
            sim.client_call(0, |sa, now, rng| {
                sa.create_child(vec![TrafficSelector::any_v4()], gw_side(), now, rng)
                    .unwrap()
            });
            assert!(
                sim.run_until(120_000, |s| refused_with(
                    &s.clients[0].events,
                    NotifyType::TS_UNACCEPTABLE
                ) == 1),
                "seed {seed}"
            );
            assert!(sim.gw_sa(slot).unwrap().children().is_empty());
            assert!(sim.clients[0].sa.is_established(), "the IKE SA stays up");
        }
    }
}

/// Without `require_inner_address` the old fallback applies: a peer without
/// CP gets the shared `remote_ts` (0.0.0.0/0), the very hole the flag closes.
#[test]
fn without_the_requirement_the_shared_remote_ts_applies() {
    let mut sim = Sim::new(5, Faults::NONE, gateway_config(1));
    sim.add_client(client_config(0), no_cp());
    assert!(sim.run_until(60_000, |s| both_up(s, 0)
        && !s.clients[0].sa.children().is_empty()));
    let slot = gw_slot_of(&sim, 0).unwrap();
    assert_eq!(
        sim.gw_sa(slot).unwrap().children()[0].remote_ts,
        vec![TrafficSelector::any_v4()]
    );
}

/// A pool peer that takes an inner address is narrowed to it, in IKE_AUTH
/// and in CREATE_CHILD_SA, however much it proposes.
#[test]
fn pool_peer_with_cp_is_narrowed_to_its_address() {
    let mut sim = Sim::new(6, Faults::NONE, pool_gateway());
    sim.add_client(client_config(0), connect_options());
    assert!(sim.run_until(60_000, |s| both_up(s, 0)
        && s.clients[0].sa.children().len() == 1));
    let slot = gw_slot_of(&sim, 0).unwrap();
    let vip = sim.gw_sa(slot).unwrap().peer_inner_address().unwrap().ipv4;
    let host = vec![TrafficSelector::v4_host(vip)];
    assert_eq!(sim.gw_sa(slot).unwrap().children()[0].remote_ts, host);
    sim.client_call(0, |sa, now, rng| {
        sa.create_child(vec![TrafficSelector::any_v4()], gw_side(), now, rng)
            .unwrap()
    });
    assert!(
        sim.run_until(60_000, |s| s.gw_sa(slot).unwrap().children().len() == 2
            && s.children_agree(0, slot))
    );
    assert_eq!(sim.gw_sa(slot).unwrap().children()[1].remote_ts, host);
    assert_eq!(sim.clients[0].sa.children()[1].local_ts, host);
}

/// The pool ran dry (INTERNAL_ADDRESS_FAILURE, §3.15.4): the IKE SA without
/// an inner address must not get a child through CREATE_CHILD_SA either.
#[test]
fn ike_sa_left_without_an_address_gets_no_child_later() {
    for require in [true, false] {
        let mut cfg = gateway_config(1);
        cfg.require_inner_address = require;
        let mut sim = Sim::new(7, Faults::NONE, cfg);
        sim.gw.assign_addresses = false;
        sim.add_client(client_config(0), connect_options());
        sim.run_for(1_000);
        let slot = sim.gw.sas.iter().position(|s| s.is_some()).unwrap();
        sim.gw_call(slot, |sa, now, rng| {
            sa.assign_inner_address(None, now, rng).unwrap()
        });
        assert!(sim.run_until(10_000, |s| s.clients[0].sa.is_established()));
        assert_eq!(
            refused_with(&sim.clients[0].events, NotifyType::INTERNAL_ADDRESS_FAILURE),
            1
        );
        sim.client_call(0, |sa, now, rng| {
            sa.create_child(vec![TrafficSelector::any_v4()], gw_side(), now, rng)
                .unwrap()
        });
        sim.run_for(10_000);
        let children = sim.gw_sa(slot).unwrap().children().to_vec();
        if require {
            assert_eq!(
                refused_with(&sim.clients[0].events, NotifyType::TS_UNACCEPTABLE),
                1
            );
            assert!(children.is_empty());
        } else {
            // The hole without the flag: all of IPv4 for this peer.
            assert_eq!(children.len(), 1);
            assert_eq!(children[0].remote_ts, vec![TrafficSelector::any_v4()]);
        }
    }
}

/// A site-to-site identity is narrowed to its own selectors (not the shared
/// `remote_ts`) and needs no CP even with `require_inner_address`; another
/// identity on the same gateway still does.
#[test]
fn site_peer_is_narrowed_to_its_own_selectors() {
    for seed in SEEDS {
        let site = vec![net(20, 0, 0, 16)];
        let mut cfg = pool_gateway();
        cfg.psks[0].remote_ts = Some(site.clone());
        let mut sim = Sim::new(seed, Faults::LOSSY, cfg);
        sim.add_client(client_config(0), no_cp());
        sim.add_client(client_config(1), no_cp());
        assert!(sim.run_until(120_000, |s| both_up(s, 0)
            && both_up(s, 1)
            && gw_slot_of(s, 0).is_some_and(|g| s.children_agree(0, g))));
        let slot = gw_slot_of(&sim, 0).unwrap();
        assert_eq!(sim.gw_sa(slot).unwrap().children()[0].remote_ts, site);
        assert_eq!(sim.clients[0].sa.children()[0].local_ts, site);
        // The road warrior without CP is refused as before.
        assert!(sim.clients[1].sa.children().is_empty());
        assert_eq!(
            refused_with(&sim.clients[1].events, NotifyType::FAILED_CP_REQUIRED),
            1
        );
        // CREATE_CHILD_SA: a part of the site is granted, another net is not.
        sim.client_call(0, |sa, now, rng| {
            sa.create_child(vec![net(20, 5, 0, 24)], gw_side(), now, rng)
                .unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| s.gw_sa(slot).unwrap().children().len() == 2
                && s.children_agree(0, slot)),
            "seed {seed}"
        );
        assert_eq!(
            sim.gw_sa(slot).unwrap().children()[1].remote_ts,
            vec![net(20, 5, 0, 24)]
        );
        sim.client_call(0, |sa, now, rng| {
            sa.create_child(vec![net(30, 0, 0, 16)], gw_side(), now, rng)
                .unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| refused_with(
                &s.clients[0].events,
                NotifyType::TS_UNACCEPTABLE
            ) == 1),
            "seed {seed}"
        );
        // A rekey keeps the site's selectors.
        let old = sim.clients[0].sa.children()[0].inbound_spi;
        sim.client_call(0, |sa, now, rng| sa.rekey_child(old, now, rng).unwrap());
        assert!(
            sim.run_until(120_000, |s| s.clients[0].sa.children().len() == 2
                && s.clients[0]
                    .sa
                    .children()
                    .iter()
                    .all(|c| c.inbound_spi != old)
                && s.children_agree(0, slot)),
            "seed {seed}"
        );
        let gw_children = sim.gw_sa(slot).unwrap().children();
        assert!(gw_children.iter().any(|c| c.remote_ts == site));
    }
}

/// The hook allows: the child is installed, and the hook saw the narrowed
/// selectors, the inner address, the identity and the IKE SA's SPIs.
#[test]
fn child_policy_admits_and_sees_the_narrowed_child() {
    let policy = Arc::new(Recorder::default());
    let mut sim = Sim::new(8, Faults::NONE, with_policy(pool_gateway(), &policy));
    sim.add_client(client_config(0), connect_options());
    assert!(sim.run_until(60_000, |s| both_up(s, 0)
        && gw_slot_of(s, 0).is_some_and(|g| s.children_agree(0, g))));
    let slot = gw_slot_of(&sim, 0).unwrap();
    let gw = sim.gw_sa(slot).unwrap();
    let snap = gw.snapshot().unwrap();
    let vip = gw.peer_inner_address().unwrap().ipv4;
    assert_eq!(
        policy.seen(),
        vec![Seen {
            exchange: ExchangeType::IKE_AUTH,
            local_ike_spi: gw.local_spi().unwrap(),
            ike_spis: (snap.current.spi_i, snap.current.spi_r),
            peer: client_identity(0),
            inner: Some(vip),
            remote_ts: vec![TrafficSelector::v4_host(vip)],
            local_ts: gw_side(),
            rekey_of: None,
        }]
    );
    assert!(
        sim.gw
            .events
            .iter()
            .any(|e| matches!(e, Event::ChildSaInstalled(_)))
    );
}

/// The hook refuses in IKE_AUTH: TS_UNACCEPTABLE in the answer, the IKE SA
/// is up without a child SA (§1.2).
#[test]
fn child_policy_refusal_in_ike_auth() {
    for faults in [Faults::NONE, Faults::LOSSY] {
        let policy = Arc::new(Recorder::default());
        policy.refuse(true);
        let mut sim = Sim::new(9, faults, with_policy(pool_gateway(), &policy));
        sim.add_client(client_config(0), connect_options());
        assert!(sim.run_until(120_000, |s| both_up(s, 0)));
        let slot = gw_slot_of(&sim, 0).unwrap();
        assert!(sim.clients[0].sa.children().is_empty());
        assert!(sim.gw_sa(slot).unwrap().children().is_empty());
        assert_eq!(
            refused_with(&sim.clients[0].events, NotifyType::TS_UNACCEPTABLE),
            1
        );
        assert_eq!(gw_failed_with(&sim.gw.events, &PeerError::TsOverlap), 1);
        let seen = policy.seen();
        assert_eq!(seen.len(), 1, "asked once; retransmissions are replayed");
        assert_eq!(seen[0].exchange, ExchangeType::IKE_AUTH);
        assert!(
            !sim.gw
                .events
                .iter()
                .any(|e| matches!(e, Event::ChildSaInstalled(_)))
        );
    }
}

/// The hook refuses in CREATE_CHILD_SA, a new child and a rekey alike
/// (TS_UNACCEPTABLE, the old child stays); allowed again, the rekey goes
/// through. After an IKE rekey the hook sees the new SPIs.
#[test]
fn child_policy_refusal_in_create_child_sa() {
    for seed in SEEDS {
        let policy = Arc::new(Recorder::default());
        let mut sim = Sim::new(seed, Faults::LOSSY, with_policy(pool_gateway(), &policy));
        sim.add_client(client_config(0), connect_options());
        assert!(sim.run_until(120_000, |s| both_up(s, 0)
            && gw_slot_of(s, 0).is_some_and(|g| s.children_agree(0, g))));
        let slot = gw_slot_of(&sim, 0).unwrap();
        let vip = sim.clients[0].sa.local_inner_address().unwrap().ipv4;
        policy.refuse(true);

        sim.client_call(0, |sa, now, rng| {
            sa.create_child(vec![TrafficSelector::v4_host(vip)], gw_side(), now, rng)
                .unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| refused_with(
                &s.clients[0].events,
                NotifyType::TS_UNACCEPTABLE
            ) == 1),
            "seed {seed}"
        );
        let last = policy.seen().pop().unwrap();
        assert_eq!(last.exchange, ExchangeType::CREATE_CHILD_SA);
        assert_eq!(last.rekey_of, None);
        assert_eq!(last.remote_ts, vec![TrafficSelector::v4_host(vip)]);

        let old_client = sim.clients[0].sa.children()[0].inbound_spi;
        let old_gw = sim.gw_sa(slot).unwrap().children()[0].inbound_spi;
        sim.client_call(0, |sa, now, rng| {
            sa.rekey_child(old_client, now, rng).unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| s.clients[0].events.iter().any(|e| matches!(
                e,
                Event::ChildSaFailed {
                    rekey_of: Some(spi),
                    error: PeerError::PeerNotified(NotifyType::TS_UNACCEPTABLE),
                } if *spi == old_client
            ))),
            "seed {seed}"
        );
        let last = policy.seen().pop().unwrap();
        assert_eq!(
            last.rekey_of,
            Some(old_gw),
            "the policy knows the predecessor"
        );
        assert_eq!(sim.gw_sa(slot).unwrap().children().len(), 1);
        assert!(sim.children_agree(0, slot), "the old child stays");

        policy.refuse(false);
        sim.client_call(0, |sa, now, rng| {
            sa.rekey_child(old_client, now, rng).unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| {
                let c = s.clients[0].sa.children();
                c.len() == 1 && c[0].inbound_spi != old_client && s.children_agree(0, slot)
            }),
            "seed {seed}"
        );

        sim.client_call(0, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
        assert!(
            sim.run_until(120_000, |s| s.gw_sa(slot).is_some_and(|g| g
                .local_spis()
                .len()
                == 1
                && g.local_spi() != Some(last.local_ike_spi))),
            "seed {seed}"
        );
        sim.client_call(0, |sa, now, rng| {
            sa.create_child(vec![TrafficSelector::v4_host(vip)], gw_side(), now, rng)
                .unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| s.gw_sa(slot).unwrap().children().len() == 2
                && s.children_agree(0, slot)),
            "seed {seed}"
        );
        let snap = sim.gw_sa(slot).unwrap().snapshot().unwrap();
        let last = policy.seen().pop().unwrap();
        assert_eq!(last.ike_spis, (snap.current.spi_i, snap.current.spi_r));
        assert_eq!(last.local_ike_spi, snap.current.local_spi());
    }
}
