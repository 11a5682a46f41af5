//! Initiator ↔ responder on a virtual clock through a network that loses,
//! duplicates and reorders datagrams; the responder commits every state
//! change and is crashed and restored from its log in some scenarios.

mod common;

use std::net::Ipv4Addr;

use common::*;
use evpc_ike::{CloseReason, DhGroup, Event, IkeSa, StateChange};

const SEEDS: [u64; 6] = [1, 2, 3, 0xdead_beef, 42, 7_777_777];

/// Runs `f` for every seed; a failure names its seed. `IKE_SIM_SEEDS=N`
/// runs seeds 0..N instead (for soak runs).
fn for_seeds(f: impl Fn(u64) + std::panic::RefUnwindSafe) {
    let env = |k| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match (env("IKE_SIM_SEED"), env("IKE_SIM_SEEDS")) {
        (Some(one), _) => vec![one],
        (None, Some(n)) => (0..n).collect(),
        (None, None) => SEEDS.to_vec(),
    };
    for seed in seeds {
        if let Err(e) = std::panic::catch_unwind(|| f(seed)) {
            eprintln!("FAILING SEED: {seed}");
            std::panic::resume_unwind(e);
        }
    }
}

/// State of both ends, for failure messages.
fn diag(sim: &Sim, slot: usize) -> String {
    let f = |v: &[Event]| {
        v.iter()
            .rev()
            .take(25)
            .rev()
            .map(|e| format!("{e:?}").chars().take(110).collect::<String>())
            .collect::<Vec<_>>()
    };
    let ch = |sa: Option<&IkeSa>| {
        sa.map(|g| {
            g.children()
                .iter()
                .map(|c| {
                    (
                        c.inbound_spi,
                        c.outbound_spi,
                        c.replaced,
                        c.rekey_generation,
                    )
                })
                .collect::<Vec<_>>()
        })
    };
    let brief = |sa: Option<&IkeSa>| {
        sa.and_then(IkeSa::snapshot).map(|s| {
            let gens: Vec<_> = std::iter::once(&s.current)
                .chain(&s.retiring)
                .map(|g| {
                    format!(
                        "{:x}/{:x} {:?} pend={:?} next={} peer_next={}",
                        g.spi_i,
                        g.spi_r,
                        g.role,
                        g.pending.as_ref().map(|p| (
                            p.message.message_id,
                            format!("{:?}", p.exchange)
                                .chars()
                                .take(40)
                                .collect::<String>()
                        )),
                        g.next_request_id,
                        g.next_peer_request_id
                    )
                })
                .collect();
            (gens, s.queued.clone())
        })
    };
    format!(
        "now={} crashes={}\nclient children {:?} {:?}\ngw children {:?} {:?}\nclient events {:#?}\ngw events {:#?}",
        sim.now - START_MS,
        sim.gw.crashes,
        ch(Some(&sim.clients[0].sa)),
        brief(Some(&sim.clients[0].sa)),
        ch(sim.gw_sa(slot)),
        brief(sim.gw_sa(slot)),
        f(&sim.clients[0].events),
        f(&sim.gw.events)
    )
}

fn established(sim: &Sim) -> bool {
    sim.clients[0].sa.is_established()
        && sim
            .gw_slot_established()
            .is_some_and(|s| sim.children_agree(0, s))
}

fn setup(seed: u64, faults: Faults) -> (Sim, usize) {
    let mut sim = Sim::new(seed, faults, gateway_config(1));
    sim.add_client(client_config(0), connect_options());
    assert!(
        sim.run_until(120_000, established),
        "not established (seed {seed})"
    );
    let slot = sim.gw_slot_established().expect("gateway SA");
    (sim, slot)
}

fn count(events: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

#[test]
fn establishes_with_virtual_ip_and_agreeing_keys() {
    for_seeds(|seed| {
        for faults in [Faults::NONE, Faults::LOSSY] {
            let (sim, slot) = setup(seed, faults);
            let gw = sim.gw_sa(slot).unwrap();
            let client = &sim.clients[0].sa;
            let vip = client
                .local_inner_address()
                .expect("client got an address")
                .clone();
            assert_eq!(gw.peer_inner_address(), Some(&vip));
            assert_eq!(vip.dns, vec![Ipv4Addr::new(10, 10, 0, 1)]);
            let c = &client.children()[0];
            // §2.9 narrowing: the client's side is exactly its inner address.
            assert_eq!(
                c.local_ts,
                vec![evpc_ike::TrafficSelector::v4_host(vip.ipv4)]
            );
            assert_eq!(c.suite.encr, evpc_ike::EncrAlg::AES128_GCM16);
            assert_eq!(c.inbound_key.len(), 20, "AES-128 key + 4-octet salt");
            assert_eq!(gw.peer_identity(), Some(&client_identity(0)));
            assert_eq!(
                count(&sim.clients[0].events, |e| matches!(
                    e,
                    Event::IkeSaEstablished { .. }
                )),
                1
            );
            assert!(sim.gw.commits >= 1, "IKE_AUTH must be committed");
        }
    });
}

#[test]
fn dpd_in_both_directions() {
    for_seeds(|seed| {
        let (mut sim, slot) = setup(seed, Faults::LOSSY);
        sim.client_call(0, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
        assert!(
            sim.run_until(60_000, |s| count(&s.clients[0].events, |e| matches!(
                e,
                Event::PeerAlive
            )) == 1)
        );
        sim.gw_call(slot, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
        assert!(sim.run_until(60_000, |s| count(&s.gw.events, |e| matches!(
            e,
            Event::PeerAlive
        )) == 1));
    });
}

#[test]
fn automatic_dpd_from_timer() {
    let mut cfg = gateway_config(1);
    cfg.lifetimes.dpd_interval_ms = Some(30_000);
    let mut sim = Sim::new(9, Faults::NONE, cfg);
    sim.add_client(client_config(0), connect_options());
    assert!(sim.run_until(60_000, established));
    sim.run_for(95_000);
    assert!(count(&sim.gw.events, |e| matches!(e, Event::PeerAlive)) >= 2);
}

fn rekey_child_from(seed: u64, from_gateway: bool) {
    let (mut sim, slot) = setup(seed, Faults::LOSSY);
    let old_client_spi = sim.clients[0].sa.children()[0].inbound_spi;
    let old_gw_spi = sim.gw_sa(slot).unwrap().children()[0].inbound_spi;
    if from_gateway {
        sim.gw_call(slot, |sa, now, rng| {
            sa.rekey_child(old_gw_spi, now, rng).unwrap()
        });
    } else {
        sim.client_call(0, |sa, now, rng| {
            sa.rekey_child(old_client_spi, now, rng).unwrap()
        });
    }
    let done = |s: &Sim| {
        let c = s.clients[0].sa.children();
        c.len() == 1 && c[0].inbound_spi != old_client_spi && s.children_agree(0, slot)
    };
    assert!(sim.run_until(120_000, done), "child rekey did not settle");
    assert_eq!(sim.clients[0].sa.children()[0].rekey_generation, 1);
    // PFS was proposed and used (the default policy proposes Curve25519).
    assert_eq!(
        sim.clients[0].sa.children()[0].suite.dh,
        Some(DhGroup::Curve25519)
    );
}

#[test]
fn child_rekey_initiated_by_client() {
    for_seeds(|seed| rekey_child_from(seed, false));
}

#[test]
fn child_rekey_initiated_by_gateway() {
    for_seeds(|seed| rekey_child_from(seed, true));
}

fn rekey_ike_from(seed: u64, from_gateway: bool) {
    let (mut sim, slot) = setup(seed, Faults::LOSSY);
    let old_spi = sim.clients[0].sa.local_spi().unwrap();
    if from_gateway {
        sim.gw_call(slot, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
    } else {
        sim.client_call(0, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
    }
    let done = |s: &Sim| {
        let c = &s.clients[0].sa;
        let Some(g) = s.gw_sa(slot) else { return false };
        c.local_spi() != Some(old_spi)
            && c.local_spis().len() == 1
            && g.local_spis().len() == 1
            && s.children_agree(0, slot)
    };
    assert!(sim.run_until(120_000, done), "IKE rekey did not settle");
    let snap_c = sim.clients[0].sa.snapshot().unwrap();
    let snap_g = sim.gw_sa(slot).unwrap().snapshot().unwrap();
    assert_eq!(
        (snap_c.current.spi_i, snap_c.current.spi_r),
        (snap_g.current.spi_i, snap_g.current.spi_r)
    );
    assert_eq!(snap_c.current.keys, snap_g.current.keys);
    // The new IKE SA works: a child rekey and a DPD on it.
    let spi = sim.clients[0].sa.children()[0].inbound_spi;
    sim.client_call(0, |sa, now, rng| sa.rekey_child(spi, now, rng).unwrap());
    sim.client_call(0, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
    assert!(
        sim.run_until(120_000, |s| count(&s.clients[0].events, |e| matches!(
            e,
            Event::PeerAlive
        )) == 1
            && s.clients[0].sa.children().len() == 1
            && s.children_agree(0, slot))
    );
}

#[test]
fn ike_rekey_initiated_by_client() {
    for_seeds(|seed| rekey_ike_from(seed, false));
}

#[test]
fn ike_rekey_initiated_by_gateway() {
    for_seeds(|seed| rekey_ike_from(seed, true));
}

#[test]
fn simultaneous_child_rekey_leaves_one_child() {
    for_seeds(|seed| {
        for faults in [Faults::NONE, Faults::LOSSY] {
            let (mut sim, slot) = setup(seed, faults);
            let c_spi = sim.clients[0].sa.children()[0].inbound_spi;
            let g_spi = sim.gw_sa(slot).unwrap().children()[0].inbound_spi;
            sim.client_call(0, |sa, now, rng| sa.rekey_child(c_spi, now, rng).unwrap());
            sim.gw_call(slot, |sa, now, rng| {
                sa.rekey_child(g_spi, now, rng).unwrap()
            });
            let done = |s: &Sim| {
                let c = s.clients[0].sa.children();
                c.len() == 1 && c[0].inbound_spi != c_spi && s.children_agree(0, slot)
            };
            assert!(
                sim.run_until(180_000, done),
                "collision did not settle to one child"
            );
        }
    });
}

#[test]
fn simultaneous_ike_rekey_converges() {
    for_seeds(|seed| {
        for faults in [Faults::NONE, Faults::LOSSY] {
            let (mut sim, slot) = setup(seed, faults);
            let old = sim.clients[0].sa.local_spi().unwrap();
            sim.client_call(0, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
            sim.gw_call(slot, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
            let done = |s: &Sim| {
                let (Some(c), Some(g)) = (
                    s.clients[0].sa.snapshot(),
                    s.gw_sa(slot).and_then(IkeSa::snapshot),
                ) else {
                    return false;
                };
                c.current.spi_i != old
                    && c.current.spi_r != old
                    && (c.current.spi_i, c.current.spi_r) == (g.current.spi_i, g.current.spi_r)
                    && c.retiring.is_empty()
                    && g.retiring.is_empty()
                    && s.children_agree(0, slot)
            };
            if !sim.run_until(300_000, done) {
                let c = sim.clients[0].sa.snapshot();
                let g = sim.gw_sa(slot).and_then(IkeSa::snapshot);
                let brief = |s: Option<evpc_ike::IkeSaSnapshot>| {
                    s.map(|s| {
                        let gens: Vec<_> = std::iter::once(&s.current)
                            .chain(&s.retiring)
                            .map(|g| {
                                format!(
                                    "{:x}/{:x} {:?} pend={:?} next={} peer_next={}",
                                    g.spi_i,
                                    g.spi_r,
                                    g.role,
                                    g.pending.as_ref().map(|p| p.message.message_id),
                                    g.next_request_id,
                                    g.next_peer_request_id
                                )
                            })
                            .collect();
                        (gens, s.children.len(), s.queued.clone())
                    })
                };
                panic!(
                    "IKE rekey collision did not converge ({faults:?}): old {old:x}\nclient {:#?}\ngw {:#?}\nclient events {:#?}\ngw events {:#?}",
                    brief(c),
                    brief(g),
                    sim.clients[0].events,
                    sim.gw.events
                );
            }
            sim.client_call(0, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
            assert!(
                sim.run_until(60_000, |s| count(&s.clients[0].events, |e| matches!(
                    e,
                    Event::PeerAlive
                )) == 1)
            );
        }
    });
}

#[test]
fn create_and_delete_children_then_close() {
    for_seeds(|seed| {
        let (mut sim, slot) = setup(seed, Faults::LOSSY);
        let vip = sim.clients[0].sa.local_inner_address().unwrap().ipv4;
        let ts_i = vec![evpc_ike::TrafficSelector::v4_host(vip)];
        let ts_r = vec![evpc_ike::TrafficSelector::v4_prefix(
            Ipv4Addr::new(10, 10, 0, 0),
            25,
        )];
        sim.client_call(0, |sa, now, rng| {
            sa.create_child(ts_i, ts_r, now, rng).unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| s.clients[0].sa.children().len() == 2
                && s.children_agree(0, slot))
        );
        let first = sim.clients[0].sa.children()[0].inbound_spi;
        sim.client_call(0, |sa, now, rng| sa.delete_child(first, now, rng).unwrap());
        assert!(
            sim.run_until(120_000, |s| s.clients[0].sa.children().len() == 1
                && s.children_agree(0, slot))
        );
        let g_spi = sim.gw_sa(slot).unwrap().children()[0].inbound_spi;
        sim.gw_call(slot, |sa, now, rng| {
            sa.delete_child(g_spi, now, rng).unwrap()
        });
        assert!(
            sim.run_until(120_000, |s| s.clients[0].sa.children().is_empty()
                && s.gw_sa(slot).is_some_and(|g| g.children().is_empty()))
        );
        sim.client_call(0, |sa, now, rng| sa.close(now, rng).unwrap());
        // If the answer to our DELETE is lost, the client retries until its
        // retransmission limit: the gateway forgot the SA once it answered.
        assert!(sim.run_until(200_000, |s| s.gw_sa(slot).is_none()
            && s.clients[0].sa.is_closed()));
        assert!(
            sim.gw.log.is_empty(),
            "a deleted SA is removed from the log"
        );
    });
}

#[test]
fn gateway_survives_crashes_after_every_commit() {
    for_seeds(|seed| {
        let mut sim = Sim::new(seed, Faults::LOSSY, gateway_config(1));
        sim.gw.crash_after_commit = 0.35;
        sim.add_client(client_config(0), connect_options());
        assert!(sim.run_until(300_000, established), "not established");
        let slot = sim.gw_slot_established().unwrap();
        for round in 0..3 {
            let spi = sim.clients[0].sa.children()[0].inbound_spi;
            sim.client_call(0, |sa, now, rng| sa.rekey_child(spi, now, rng).unwrap());
            assert!(
                sim.run_until(300_000, |s| s.clients[0].sa.children().len() == 1
                    && s.clients[0].sa.children()[0].inbound_spi != spi
                    && s.children_agree(0, slot)),
                "child rekey {round}"
            );
            let old = sim.clients[0].sa.local_spi();
            sim.client_call(0, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
            assert!(
                sim.run_until(300_000, |s| s.clients[0].sa.local_spi() != old
                    && s.clients[0].sa.local_spis().len() == 1
                    && s.gw_sa(slot).is_some_and(|g| g.local_spis().len() == 1)
                    && s.children_agree(0, slot)),
                "IKE rekey {round}"
            );
            let alive = count(&sim.clients[0].events, |e| matches!(e, Event::PeerAlive));
            sim.client_call(0, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
            assert!(
                sim.run_until(300_000, |s| count(&s.clients[0].events, |e| matches!(
                    e,
                    Event::PeerAlive
                )) > alive)
            );
            // Gateway-initiated work, resumed by a restored gateway if it crashed.
            let g_spi = sim.gw_sa(slot).unwrap().children()[0].inbound_spi;
            sim.gw_call(slot, |sa, now, rng| {
                sa.rekey_child(g_spi, now, rng).unwrap()
            });
            assert!(
                sim.run_until(300_000, |s| s.gw_sa(slot).is_some_and(|g| g
                    .children()
                    .len()
                    == 1
                    && g.children()[0].inbound_spi != g_spi)
                    && s.children_agree(0, slot)),
                "gateway child rekey {round}: {}",
                diag(&sim, slot)
            );
        }
        assert!(
            sim.gw.crashes > 0,
            "the scenario crashed the gateway at least once"
        );
        // The client never had to authenticate again.
        assert_eq!(
            count(&sim.clients[0].events, |e| matches!(
                e,
                Event::IkeSaEstablished { .. }
            )),
            1
        );
        assert!(
            !sim.clients[0]
                .events
                .iter()
                .any(|e| matches!(e, Event::Closed { .. }))
        );
    });
}

#[test]
fn restored_gateway_answers_retransmission_with_identical_bytes() {
    let (mut sim, slot) = setup(5, Faults::NONE);
    let config = sim.gw.router.endpoint().config().clone();
    // A client DPD request, answered and committed by the gateway.
    let mut rng = Rng(99);
    let o = sim.clients[0].sa.send_dpd(sim.now, &mut rng).unwrap();
    let request = o.commit.unwrap().into_datagrams_after_durable().remove(0);
    let gw = sim.gw.sas[slot].as_mut().unwrap();
    let o = gw.handle_datagram(
        sim.now,
        &mut rng,
        request.remote,
        request.local,
        &request.payload,
    );
    assert!(o.send.is_empty(), "the answer waits for the commit");
    let commit = o
        .commit
        .expect("answering a request is a committed state change");
    let snapshot = commit.snapshot().unwrap().clone();
    let bytes = postcard::to_allocvec(&snapshot).unwrap();
    let first_answer = commit.into_datagrams_after_durable().remove(0);
    // Another node restores from the committed bytes and sees the retransmission.
    let mut restored = IkeSa::restore(config, postcard::from_bytes(&bytes).unwrap()).unwrap();
    let o = restored.handle_datagram(
        sim.now + 1000,
        &mut rng,
        request.remote,
        request.local,
        &request.payload,
    );
    assert!(o.commit.is_none(), "a retransmission changes nothing");
    assert_eq!(o.send.len(), 1);
    assert_eq!(o.send[0].payload, first_answer.payload);
    // The same bytes from another address, or other bytes with the same SPIs and message ID
    // (a forger's), get nothing: the stored response never goes where a forger chooses.
    let elsewhere: std::net::SocketAddr = "203.0.113.99:4500".parse().unwrap();
    let o = restored.handle_datagram(
        sim.now + 1001,
        &mut rng,
        request.remote,
        elsewhere,
        &request.payload,
    );
    assert!(o.send.is_empty() && o.commit.is_none(), "{:?}", o.send);
    let mut forged = request.payload.clone();
    let last = forged.len() - 1;
    forged[last] ^= 1;
    let o = restored.handle_datagram(
        sim.now + 1002,
        &mut rng,
        request.remote,
        request.local,
        &forged,
    );
    assert!(o.send.is_empty() && o.commit.is_none(), "{:?}", o.send);
    // And the next request is processed normally with the right message ID.
    let o = sim.clients[0].sa.handle_datagram(
        sim.now,
        &mut rng,
        request.local,
        request.remote,
        &first_answer.payload,
    );
    assert!(o.events.iter().any(|e| matches!(e, Event::PeerAlive)));
    let o = sim.clients[0].sa.send_dpd(sim.now, &mut rng).unwrap();
    let request2 = o.commit.unwrap().into_datagrams_after_durable().remove(0);
    let o = restored.handle_datagram(
        sim.now + 2000,
        &mut rng,
        request2.remote,
        request2.local,
        &request2.payload,
    );
    let answer2 = o.commit.unwrap().into_datagrams_after_durable().remove(0);
    let o = sim.clients[0].sa.handle_datagram(
        sim.now,
        &mut rng,
        answer2.remote,
        answer2.local,
        &answer2.payload,
    );
    assert!(o.events.iter().any(|e| matches!(e, Event::PeerAlive)));
}

#[test]
fn restored_gateway_resends_pending_request_byte_for_byte() {
    let (mut sim, slot) = setup(6, Faults::NONE);
    let config = sim.gw.router.endpoint().config().clone();
    let mut rng = Rng(5);
    let spi = sim.gw_sa(slot).unwrap().children()[0].inbound_spi;
    let gw = sim.gw.sas[slot].as_mut().unwrap();
    let o = gw.rekey_child(spi, sim.now, &mut rng).unwrap();
    let commit = o
        .commit
        .expect("a gateway request is committed before it is sent");
    assert!(o.send.is_empty(), "nothing may leave before the commit");
    let snap = commit.snapshot().unwrap().clone();
    let sent = commit.into_datagrams_after_durable().remove(0);
    assert_eq!(
        snap.current.pending.as_ref().unwrap().message.datagrams[0],
        sent.payload
    );
    // The node dies before the peer answers; another node restores.
    let bytes = postcard::to_allocvec(&snap).unwrap();
    let mut restored = IkeSa::restore(config, postcard::from_bytes(&bytes).unwrap()).unwrap();
    let later = sim.now + 3000;
    assert!(restored.next_timeout().unwrap() <= later);
    let o = restored.handle_timeout(later, &mut rng);
    assert_eq!(o.send.len(), 1);
    assert_eq!(o.send[0].payload, sent.payload, "identical bytes");
    // The client answers the resent request and the restored SA completes the rekey.
    let resent = o.send[0].clone();
    let o = sim.clients[0].sa.handle_datagram(
        later,
        &mut rng,
        resent.remote,
        resent.local,
        &resent.payload,
    );
    let answer = o.commit.unwrap().into_datagrams_after_durable().remove(0);
    let o = restored.handle_datagram(
        later,
        &mut rng,
        answer.remote,
        answer.local,
        &answer.payload,
    );
    assert!(
        o.events
            .iter()
            .any(|e| matches!(e, Event::ChildSaInstalled(i) if i.rekey_of == Some(spi)))
    );
    let delete = o.commit.unwrap().into_datagrams_after_durable();
    assert_eq!(delete.len(), 1, "then it deletes the old child");
}

#[test]
fn cookie_required_above_threshold() {
    let mut cfg = gateway_config(1);
    cfg.cookie_threshold = 0;
    let mut sim = Sim::new(11, Faults::NONE, cfg);
    sim.add_client(client_config(0), connect_options());
    assert!(sim.run_until(60_000, established));
}

#[test]
fn invalid_ke_payload_makes_the_initiator_switch_group() {
    let mut gcfg = gateway_config(1);
    gcfg.ike.dh = vec![DhGroup::Curve25519];
    let mut ccfg = client_config(0);
    ccfg.ike.dh = vec![DhGroup::Ecp256, DhGroup::Curve25519];
    let mut sim = Sim::new(12, Faults::NONE, gcfg);
    sim.add_client(ccfg, connect_options());
    assert!(sim.run_until(60_000, established));
    assert_eq!(
        sim.clients[0].sa.snapshot().unwrap().current.suite.dh,
        DhGroup::Curve25519
    );
}

#[test]
fn ecp256_and_aes256_suite() {
    for cfg_fn in [gateway_config, |n| gateway_config(n)] {
        let mut gcfg = cfg_fn(1);
        gcfg.ike.dh = vec![DhGroup::Ecp256];
        let mut ccfg = client_config(0);
        ccfg.ike.dh = vec![DhGroup::Ecp256];
        ccfg.ike.encr = vec![evpc_ike::EncrAlg::AES256_GCM16];
        ccfg.ike.prf = vec![evpc_ike::PrfAlg::HmacSha512];
        ccfg.esp.encr = vec![evpc_ike::EncrAlg::AES256_GCM16];
        ccfg.esp.esn = vec![true];
        ccfg.esp.pfs = vec![DhGroup::Ecp256];
        let mut sim = Sim::new(13, Faults::NONE, gcfg);
        sim.add_client(ccfg, connect_options());
        assert!(sim.run_until(60_000, established));
        let s = sim.clients[0].sa.snapshot().unwrap();
        assert_eq!(s.current.suite.encr, evpc_ike::EncrAlg::AES256_GCM16);
        assert_eq!(s.current.suite.prf, evpc_ike::PrfAlg::HmacSha512);
        assert_eq!(s.current.keys.sk_d.len(), 64);
        let c = &sim.clients[0].sa.children()[0];
        assert!(c.suite.esn);
        assert_eq!(c.inbound_key.len(), 36);
        let slot = sim.gw_slot_established().unwrap();
        let spi = c.inbound_spi;
        sim.client_call(0, |sa, now, rng| sa.rekey_child(spi, now, rng).unwrap());
        assert!(
            sim.run_until(60_000, |s| s.clients[0].sa.children().len() == 1
                && s.clients[0].sa.children()[0].suite.dh == Some(DhGroup::Ecp256)
                && s.children_agree(0, slot))
        );
    }
}

#[test]
fn wrong_psk_fails_authentication_without_commit() {
    let mut ccfg = client_config(0);
    ccfg.psks[0].psk = evpc_ike::Secret::from_slice(b"not the psk");
    let mut sim = Sim::new(14, Faults::NONE, gateway_config(1));
    sim.add_client(ccfg, connect_options());
    assert!(sim.run_until(60_000, |s| s.clients[0].sa.is_closed()));
    assert!(sim.clients[0].events.iter().any(|e| matches!(
        e,
        Event::Closed {
            reason: CloseReason::AuthenticationFailed
        }
    )));
    assert!(sim.gw.events.iter().any(|e| matches!(
        e,
        Event::Closed {
            reason: CloseReason::AuthenticationFailed
        }
    )));
    assert_eq!(
        sim.gw.commits, 0,
        "nothing of a failed handshake reaches the log"
    );
}

#[test]
fn unreachable_peer_closes_the_sa_after_backoff() {
    let (mut sim, slot) = setup(15, Faults::NONE);
    sim.faults = Faults {
        loss: 1.0,
        duplicate: 0.0,
        max_jitter_ms: 0,
    };
    let start = sim.now;
    sim.gw_call(slot, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
    assert!(sim.run_until(600_000, |s| s.gw_sa(slot).is_none()));
    let elapsed = sim.now - start;
    // 1 + 2 + 4 + 8 s, then 16 s per try (capped) up to 10 retransmissions,
    // and the last one's 16 s wait: 127 s.
    assert!(
        (126_000..128_000).contains(&elapsed),
        "gave up after {elapsed} ms"
    );
    assert!(sim.gw.events.iter().any(|e| matches!(
        e,
        Event::Closed {
            reason: CloseReason::PeerUnreachable
        }
    )));
    assert!(sim.gw.log.is_empty());
}

#[test]
fn half_open_sa_times_out() {
    let mut sim = Sim::new(16, Faults::NONE, gateway_config(1));
    sim.gw.assign_addresses = false;
    sim.add_client(client_config(0), connect_options());
    sim.run_for(5_000);
    assert_eq!(sim.gw.sas.iter().flatten().count(), 1);
    sim.run_for(60_000);
    assert!(sim.gw.events.iter().any(|e| matches!(
        e,
        Event::Closed {
            reason: CloseReason::HalfOpenTimeout
        }
    )));
    assert_eq!(sim.gw.commits, 0);
}

#[test]
fn address_pool_exhaustion_keeps_ike_sa_without_child() {
    let mut sim = Sim::new(17, Faults::NONE, gateway_config(1));
    sim.gw.assign_addresses = false;
    sim.add_client(client_config(0), connect_options());
    sim.run_for(1_000);
    let slot = sim.gw.sas.iter().position(|s| s.is_some()).unwrap();
    assert!(
        sim.gw
            .events
            .iter()
            .any(|e| matches!(e, Event::InnerAddressNeeded { .. }))
    );
    sim.gw_call(slot, |sa, now, rng| {
        sa.assign_inner_address(None, now, rng).unwrap()
    });
    assert!(sim.run_until(10_000, |s| s.clients[0].sa.is_established()));
    assert!(sim.clients[0].sa.children().is_empty());
    assert!(sim.clients[0].events.iter().any(|e| matches!(
        e,
        Event::ChildSaFailed {
            error: evpc_ike::PeerError::PeerNotified(
                evpc_ike::wire::NotifyType::INTERNAL_ADDRESS_FAILURE
            ),
            ..
        }
    )));
}

#[test]
fn every_commit_carries_a_complete_snapshot() {
    let (mut sim, slot) = setup(18, Faults::NONE);
    let mut rng = Rng(1);
    let o = sim.gw.sas[slot]
        .as_mut()
        .unwrap()
        .send_dpd(sim.now, &mut rng)
        .unwrap();
    let c = o.commit.unwrap();
    let StateChange::Upsert(s) = &c.change else {
        panic!("upsert expected")
    };
    assert_eq!(s.children.len(), 1);
    assert!(s.current.pending.is_some());
    assert!(
        s.current.last_response.is_some(),
        "IKE_AUTH answer kept for retransmissions"
    );
    assert!(
        format!("{s:?}").contains("redacted"),
        "keys are redacted in Debug"
    );
    assert_ne!(s.current.keys.sk_d.expose(), &[0u8; 32]);
}

/// §2.25.2: a child rekey that meets an IKE rekey is refused with
/// TEMPORARY_FAILURE and retried later on the new IKE SA.
#[test]
fn child_rekey_colliding_with_ike_rekey_is_retried() {
    for_seeds(|seed| {
        for faults in [Faults::NONE, Faults::LOSSY] {
            let (mut sim, slot) = setup(seed, faults);
            let old_ike = sim.clients[0].sa.local_spi().unwrap();
            let g_spi = sim.gw_sa(slot).unwrap().children()[0].inbound_spi;
            sim.client_call(0, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
            sim.gw_call(slot, |sa, now, rng| {
                sa.rekey_child(g_spi, now, rng).unwrap()
            });
            let done = |s: &Sim| {
                s.clients[0].sa.local_spi() != Some(old_ike)
                    && s.clients[0].sa.local_spis().len() == 1
                    && s.gw_sa(slot).is_some_and(|g| {
                        g.local_spis().len() == 1
                            && g.children().len() == 1
                            && g.children()[0].inbound_spi != g_spi
                    })
                    && s.children_agree(0, slot)
            };
            assert!(
                sim.run_until(300_000, done),
                "did not settle: {}",
                diag(&sim, slot)
            );
        }
    });
}

/// NAT traversal (§2.23): detection on both sides, the float to port 4500,
/// UDP encapsulation for ESP, and the gateway following a NAT rebinding.
#[test]
fn nat_detection_float_and_rebinding() {
    for_seeds(|seed| {
        let mut sim = Sim::new(seed, Faults::LOSSY, gateway_config(1));
        sim.nat = Some(Nat {
            public: Ipv4Addr::new(203, 0, 113, 5),
            port_base: 40000,
        });
        sim.add_client(client_config(0), connect_options());
        assert!(
            sim.run_until(120_000, established),
            "not established behind NAT"
        );
        let slot = sim.gw_slot_established().unwrap();
        let g = sim.gw_sa(slot).unwrap().snapshot().unwrap();
        assert!(g.nat.peer_behind_nat && !g.nat.local_behind_nat);
        assert_eq!(
            g.peer,
            "203.0.113.5:40001".parse().unwrap(),
            "IKE floated to 4500 through the NAT"
        );
        assert_eq!(g.local.port(), 4500);
        let c = sim.clients[0].sa.snapshot().unwrap();
        assert!(c.nat.local_behind_nat && c.local.port() == 4500 && c.peer.port() == 4500);
        assert!(
            sim.gw
                .events
                .iter()
                .any(|e| matches!(e, Event::ChildSaInstalled(i) if i.udp_encap))
        );
        // The NAT forgets the mapping; the client's next request comes from a new port.
        sim.nat = Some(Nat {
            public: Ipv4Addr::new(203, 0, 113, 5),
            port_base: 41000,
        });
        sim.client_call(0, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
        assert!(
            sim.run_until(60_000, |s| count(&s.clients[0].events, |e| matches!(
                e,
                Event::PeerAlive
            )) == 1)
        );
        assert_eq!(
            sim.gw_sa(slot).unwrap().peer_addr(),
            Some("203.0.113.5:41001".parse().unwrap())
        );
        // Gateway-initiated traffic now reaches the client through the new mapping.
        sim.gw_call(slot, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
        assert!(sim.run_until(60_000, |s| count(&s.gw.events, |e| matches!(
            e,
            Event::PeerAlive
        )) == 1));
    });
}

#[test]
fn forced_udp_encapsulation_without_nat() {
    let mut sim = Sim::new(21, Faults::NONE, gateway_config(1));
    let mut opts = connect_options();
    opts.force_udp_encap = true;
    sim.add_client(client_config(0), opts);
    assert!(sim.run_until(60_000, established));
    let slot = sim.gw_slot_established().unwrap();
    let g = sim.gw_sa(slot).unwrap().snapshot().unwrap();
    assert!(g.nat.peer_behind_nat, "the gateway believes the faked NAT");
    assert_eq!(g.peer.port(), 4500);
    assert!(
        sim.clients[0]
            .events
            .iter()
            .any(|e| matches!(e, Event::ChildSaInstalled(i) if i.udp_encap))
    );
}

#[test]
fn restore_refuses_inconsistent_snapshots() {
    let (sim, slot) = setup(22, Faults::NONE);
    let config = sim.gw.router.endpoint().config().clone();
    let good = sim.gw_sa(slot).unwrap().snapshot().unwrap();
    let mut short_key = good.clone();
    short_key.current.keys.sk_er = evpc_ike::Secret::from_slice(&[1, 2, 3]);
    assert!(matches!(
        IkeSa::restore(config.clone(), short_key),
        Err(evpc_ike::ApiError::InvalidSnapshot(_))
    ));
    let mut short_child = good.clone();
    short_child.children[0].outbound_key = evpc_ike::Secret::default();
    assert!(matches!(
        IkeSa::restore(config.clone(), short_child),
        Err(evpc_ike::ApiError::InvalidSnapshot(_))
    ));
    let mut future = good.clone();
    future.format = 99;
    assert!(matches!(
        IkeSa::restore(config.clone(), future),
        Err(evpc_ike::ApiError::UnsupportedSnapshot(99))
    ));
    // Truncated bytes either fail to deserialize or restore without panicking.
    let bytes = postcard::to_allocvec(&good).unwrap();
    for cut in 0..bytes.len() {
        if let Ok(s) = postcard::from_bytes::<evpc_ike::IkeSaSnapshot>(&bytes[..cut]) {
            let _ = IkeSa::restore(config.clone(), s);
        }
    }
    assert!(IkeSa::restore(config, good).is_ok());
}

#[test]
fn modp2048_ike_sa_and_pfs() {
    let mut gcfg = gateway_config(1);
    gcfg.ike.dh = vec![DhGroup::Modp2048];
    gcfg.esp.pfs = vec![DhGroup::Modp2048];
    let mut ccfg = client_config(0);
    ccfg.ike.dh = vec![DhGroup::Modp2048];
    ccfg.esp.pfs = vec![DhGroup::Modp2048];
    let mut sim = Sim::new(23, Faults::NONE, gcfg);
    sim.add_client(ccfg, connect_options());
    assert!(sim.run_until(60_000, established));
    assert_eq!(
        sim.clients[0].sa.snapshot().unwrap().current.suite.dh,
        DhGroup::Modp2048
    );
    let slot = sim.gw_slot_established().unwrap();
    let spi = sim.clients[0].sa.children()[0].inbound_spi;
    sim.client_call(0, |sa, now, rng| sa.rekey_child(spi, now, rng).unwrap());
    assert!(
        sim.run_until(60_000, |s| s.clients[0].sa.children().len() == 1
            && s.clients[0].sa.children()[0].suite.dh == Some(DhGroup::Modp2048)
            && s.children_agree(0, slot))
    );
}

/// Soft lifetimes rekey automatically; a hard IKE lifetime deletes an IKE SA
/// that was not rekeyed in time.
#[test]
fn lifetimes_drive_rekeys_and_expiry() {
    for_seeds(|seed| {
        let mut gcfg = gateway_config(1);
        gcfg.lifetimes.ike_expire_ms = Some(150_000);
        let mut ccfg = client_config(0);
        ccfg.lifetimes.ike_rekey_ms = Some(100_000);
        ccfg.lifetimes.child_rekey_ms = Some(40_000);
        let mut sim = Sim::new(seed, Faults::LOSSY, gcfg);
        sim.add_client(ccfg, connect_options());
        assert!(sim.run_until(120_000, established));
        let slot = sim.gw_slot_established().unwrap();
        sim.run_for(420_000);
        // About every 36-40 s a child rekey, every 90-100 s an IKE rekey; the
        // 150 s hard lifetime of the gateway never hits.
        let installed = count(&sim.gw.events, |e| matches!(e, Event::ChildSaInstalled(_)));
        let rekeyed = count(&sim.gw.events, |e| matches!(e, Event::IkeSaRekeyed { .. }));
        assert!(installed >= 10, "{installed} child SAs installed");
        assert!(rekeyed >= 4, "{rekeyed} IKE rekeys");
        // The check may land in the middle of an exchange: let it finish.
        let settled = |s: &Sim| {
            s.gw_sa(slot).is_some_and(|g| g.local_spis().len() == 1)
                && s.clients[0].sa.local_spis().len() == 1
                && s.children_agree(0, slot)
                && s.clients[0].sa.children().len() == 1
        };
        assert!(sim.run_until(60_000, settled), "{}", diag(&sim, slot));
        // Without the client's rekeys the gateway deletes the IKE SA at 150 s.
        let mut sim = Sim::new(seed, Faults::NONE, {
            let mut c = gateway_config(1);
            c.lifetimes.ike_expire_ms = Some(150_000);
            c
        });
        sim.add_client(client_config(0), connect_options());
        assert!(sim.run_until(60_000, established));
        let slot = sim.gw_slot_established().unwrap();
        let start = sim.now;
        assert!(sim.run_until(200_000, |s| s.gw_sa(slot).is_none()
            && s.clients[0].sa.is_closed()));
        assert!(
            (148_000..160_000).contains(&(sim.now - start)),
            "expired after {} ms",
            sim.now - start
        );
        assert!(sim.clients[0].events.iter().any(|e| matches!(
            e,
            Event::Closed {
                reason: CloseReason::DeletedByPeer
            }
        )));
    });
}
