//! `apply` enforces each invariant and answers a refused command with a typed rejection,
//! leaving the state untouched.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{child, cluster, sa};
use evpc_raft_store::{
    Applied, Command, Epoch, NodeState, OwnerMove, Rejection, SaId, SaUpdate, SlotAssignment,
    State, StoredMessage, apply, limits,
};

fn update(id: u64, epoch: u64, updates: Vec<SaUpdate>) -> Command {
    Command::Update {
        sa: SaId(id),
        epoch: Epoch(epoch),
        updates,
    }
}

/// Applies a command that must be refused and checks the state did not change.
fn refused(state: &mut State, command: Command) -> Rejection {
    let before = state.clone();
    let rejection = apply(state, &command).expect_err("command should be refused");
    assert_eq!(*state, before, "a refused command changed the state");
    rejection
}

fn create_command(state: &State, id: u64, slot: u16, children: &[u32]) -> Command {
    Command::CreateSa(Box::new(sa(state, id, slot, children)))
}

fn create(state: &mut State, id: u64, slot: u16, children: &[u32]) {
    let command = create_command(state, id, slot, children);
    accepted(state, command);
}

fn accepted(state: &mut State, command: Command) -> Applied {
    let r = apply(state, &command);
    state.check_invariants().expect("invariants hold");
    r.expect("command should be accepted")
}

/// Commits a lease: child `spi` of SA `id` (in `epoch`) may use up to `out_hwm`.
fn lease(state: &mut State, id: u64, epoch: u64, spi: u32, out_hwm: u64) {
    accepted(
        state,
        update(
            id,
            epoch,
            vec![SaUpdate::SeqLease {
                in_spi: spi,
                out_hwm,
                in_checkpoint: None,
            }],
        ),
    );
}

/// An operator's delete (an export with --remove): the SA as it was removed.
fn remove(state: &mut State, id: u64) -> evpc_raft_store::IkeSa {
    match accepted(
        state,
        Command::DeleteSa {
            sa: SaId(id),
            epoch: None,
        },
    ) {
        Applied::Removed(sa) => *sa,
        other => panic!("a delete answers the removed SA, not {other:?}"),
    }
}

#[test]
fn create_requires_the_slot_owner_and_epoch_one() {
    let mut state = cluster(3);
    let mut wrong_owner = sa(&state, 1, 5, &[100]);
    wrong_owner.owner = state.slots().owner(6).unwrap();
    assert!(matches!(
        refused(&mut state, Command::CreateSa(Box::new(wrong_owner))),
        Rejection::NotSlotOwner { slot: 5, .. }
    ));
    let mut epoch_two = sa(&state, 1, 5, &[100]);
    epoch_two.epoch = Epoch(2);
    assert_eq!(
        refused(&mut state, Command::CreateSa(Box::new(epoch_two))),
        Rejection::BadInitialEpoch(Epoch(2))
    );
    create(&mut state, 1, 5, &[100]);
    assert_eq!(
        {
            let c = create_command(&state, 1, 5, &[101]);
            refused(&mut state, c)
        },
        Rejection::SaExists(SaId(1))
    );
    assert!(matches!(
        {
            let c = create_command(&state, 2, 5, &[100]);
            refused(&mut state, c)
        },
        Rejection::ChildSpiInUse {
            in_spi: 100,
            by: SaId(1)
        }
    ));
    let mut bad_slot = sa(&state, 3, 5, &[]);
    bad_slot.slot = 1024;
    assert_eq!(
        refused(&mut state, Command::CreateSa(Box::new(bad_slot))),
        Rejection::SlotOutOfRange(1024)
    );
}

#[test]
fn message_ids_only_move_forward_one_at_a_time() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[]);
    let answered = |msg_id| SaUpdate::PeerRequestAnswered {
        msg_id,
        response: vec![vec![msg_id as u8; 200]],
    };
    accepted(&mut state, update(1, 1, vec![answered(2)]));
    assert_eq!(state.sa(SaId(1)).unwrap().msg.next_peer_request, 3);
    assert_eq!(
        refused(&mut state, update(1, 1, vec![answered(2)])),
        Rejection::MessageIdRegression {
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        refused(&mut state, update(1, 1, vec![answered(5)])),
        Rejection::MessageIdGap {
            expected: 3,
            got: 5
        }
    );
    // The stored response is exactly what was committed, for retransmissions.
    let last = state.sa(SaId(1)).unwrap().last_response.clone().unwrap();
    assert_eq!(last.msg_id, 2);
    assert_eq!(last.datagrams, vec![vec![2u8; 200]]);
}

#[test]
fn local_requests_are_committed_then_completed_in_order() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[]);
    let request = |msg_id| {
        SaUpdate::LocalRequestStarted(StoredMessage {
            msg_id,
            datagrams: vec![vec![0xdd; 80]],
        })
    };
    assert_eq!(
        refused(
            &mut state,
            update(1, 1, vec![SaUpdate::LocalRequestCompleted { msg_id: 0 }])
        ),
        Rejection::NoRequestInFlight { msg_id: 0 }
    );
    accepted(&mut state, update(1, 1, vec![request(0)]));
    assert_eq!(
        refused(&mut state, update(1, 1, vec![request(1)])),
        Rejection::RequestInFlight { in_flight: 0 }
    );
    accepted(
        &mut state,
        update(1, 1, vec![SaUpdate::LocalRequestCompleted { msg_id: 0 }]),
    );
    assert_eq!(state.sa(SaId(1)).unwrap().msg.next_local_request, 1);
    assert_eq!(
        refused(&mut state, update(1, 1, vec![request(0)])),
        Rejection::MessageIdRegression {
            expected: 1,
            got: 0
        }
    );
}

#[test]
fn leases_only_grow_and_stay_in_the_counter_space() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    let lease = |out_hwm, in_checkpoint| SaUpdate::SeqLease {
        in_spi: 100,
        out_hwm,
        in_checkpoint,
    };
    accepted(&mut state, update(1, 1, vec![lease(1_000, Some(10))]));
    assert_eq!(
        refused(&mut state, update(1, 1, vec![lease(1_000, None)])),
        Rejection::HwmRegression {
            current: 1_000,
            proposed: 1_000
        }
    );
    assert_eq!(
        refused(&mut state, update(1, 1, vec![lease(2_000, Some(9))])),
        Rejection::CheckpointRegression {
            current: 10,
            proposed: 9
        }
    );
    // Without ESN the 32-bit counter must never cycle (RFC 4303 §3.3.3).
    assert!(matches!(
        refused(&mut state, update(1, 1, vec![lease(1 << 32, None)])),
        Rejection::HwmBeyondCounterSpace { .. }
    ));
    accepted(
        &mut state,
        update(1, 1, vec![lease(u64::from(u32::MAX), None)]),
    );
    let c = state.child(100).unwrap().1;
    assert_eq!((c.out_hwm, c.in_checkpoint), (u64::from(u32::MAX), 10));
    assert_eq!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::ReplayCheckpoint {
                    in_spi: 100,
                    in_seq: 3
                }]
            )
        ),
        Rejection::CheckpointRegression {
            current: 10,
            proposed: 3
        }
    );
    assert_eq!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::ReplayCheckpoint {
                    in_spi: 7,
                    in_seq: 3
                }]
            )
        ),
        Rejection::UnknownChild {
            sa: SaId(1),
            in_spi: 7
        }
    );
}

#[test]
fn a_stale_epoch_is_fenced_off_after_a_move() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    let owner = state.sa(SaId(1)).unwrap().owner;
    let to = if owner == 1 { 2 } else { 1 };
    let moved = accepted(
        &mut state,
        Command::AssignOwners(vec![
            OwnerMove {
                sa: SaId(1),
                from_epoch: Epoch(1),
                to,
                lease: 1000,
                handover: false,
            },
            OwnerMove {
                sa: SaId(99),
                from_epoch: Epoch(1),
                to,
                lease: 1000,
                handover: false,
            },
        ]),
    );
    assert_eq!(
        moved,
        Applied::Moves(vec![Ok(Epoch(2)), Err(Rejection::UnknownSa(SaId(99)))])
    );
    assert_eq!(state.sa(SaId(1)).unwrap().owner, to);
    // The new owner's range starts above the old mark, with a first lease granted in the move.
    let child = state.child(100).unwrap().1;
    assert_eq!((child.out_start, child.out_hwm), (1, 1000));
    let lease = SaUpdate::SeqLease {
        in_spi: 100,
        out_hwm: 1500,
        in_checkpoint: None,
    };
    assert_eq!(
        refused(&mut state, update(1, 1, vec![lease.clone()])),
        Rejection::StaleEpoch {
            sa: SaId(1),
            current: Epoch(2),
            given: Epoch(1)
        }
    );
    accepted(&mut state, update(1, 2, vec![lease]));
    // A second move decided on the old epoch is refused too.
    assert_eq!(
        accepted(
            &mut state,
            Command::AssignOwners(vec![OwnerMove {
                sa: SaId(1),
                from_epoch: Epoch(1),
                to: owner,
                lease: 1000,
                handover: false,
            }])
        ),
        Applied::Moves(vec![Err(Rejection::StaleEpoch {
            sa: SaId(1),
            current: Epoch(2),
            given: Epoch(1)
        })])
    );
}

#[test]
fn updates_are_all_or_nothing() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    let rejection = refused(
        &mut state,
        update(
            1,
            1,
            vec![
                SaUpdate::ChildCreated(Box::new(child(200, true))),
                SaUpdate::SeqLease {
                    in_spi: 100,
                    out_hwm: 0,
                    in_checkpoint: None,
                },
            ],
        ),
    );
    assert!(matches!(rejection, Rejection::HwmRegression { .. }));
    assert!(state.child(200).is_none());
    assert_eq!(
        refused(&mut state, update(1, 1, vec![])),
        Rejection::EmptyUpdate
    );
}

#[test]
fn child_rekey_generations_only_grow() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    let mut same_generation = child(101, false);
    same_generation.rekey_generation = 0;
    assert_eq!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::ChildRekeyed {
                    old_in_spi: 100,
                    new: Box::new(same_generation)
                }]
            )
        ),
        Rejection::RekeyGenerationRegression {
            current: 0,
            proposed: 0
        }
    );
    let mut next = child(101, false);
    next.rekey_generation = 1;
    accepted(
        &mut state,
        update(
            1,
            1,
            vec![
                SaUpdate::ChildRekeyed {
                    old_in_spi: 100,
                    new: Box::new(next),
                },
                SaUpdate::ChildDeleted { in_spi: 100 },
            ],
        ),
    );
    assert!(state.child(100).is_none());
    assert_eq!(state.child(101).unwrap().1.rekey_generation, 1);
    assert_eq!(
        refused(
            &mut state,
            update(1, 1, vec![SaUpdate::ChildDeleted { in_spi: 100 }])
        ),
        Rejection::UnknownChild {
            sa: SaId(1),
            in_spi: 100
        }
    );
}

#[test]
fn an_ike_rekey_in_place_keeps_children_and_takes_only_free_spis() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    create(&mut state, 2, 1, &[200]);
    let rekey = |spi_r: u64, generation| {
        update(
            1,
            1,
            vec![SaUpdate::IkeRekeyedInPlace {
                spi_i: 0x77,
                spi_r,
                rekey_generation: generation,
            }],
        )
    };
    assert!(matches!(
        refused(&mut state, rekey(0x5000, 0)),
        Rejection::RekeyGenerationRegression { .. }
    ));
    // Another SA's id (its SPI) cannot become ours: the gateway routes by SPI.
    assert_eq!(
        refused(&mut state, rekey(2, 1)),
        Rejection::IkeSpiInUse {
            spi: 2,
            by: SaId(2)
        }
    );
    assert_eq!(refused(&mut state, rekey(0, 1)), Rejection::ReservedSpi);
    accepted(&mut state, rekey(0x5000, 1));
    assert_eq!(state.sa_by_ike_spi(0x5000), Some(SaId(1)));
    assert_eq!(state.sa_by_ike_spi(1), Some(SaId(1)), "the id stays taken");
    assert_eq!(state.sa(SaId(1)).unwrap().children.len(), 1);
    // The next rekey frees the intermediate SPI.
    accepted(&mut state, rekey(0x6000, 2));
    assert_eq!(state.sa_by_ike_spi(0x5000), None);
    // A new SA cannot take an SPI in use, nor the id of a live SA.
    let mut clash = sa(&state, 0x6000, 2, &[300]);
    clash.owner = state.slots().owner(2).unwrap();
    assert_eq!(
        refused(&mut state, Command::CreateSa(Box::new(clash))),
        Rejection::IkeSpiInUse {
            spi: 0x6000,
            by: SaId(1)
        }
    );
}

#[test]
fn an_address_is_never_held_twice_and_narrows_the_selectors() {
    let mut state = cluster(3);
    let addr = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 9));
    let with_address = |state: &State, id: u64, slot: u16, spi: u32| {
        let mut sa = sa(state, id, slot, &[spi]);
        sa.virtual_ip = Some(addr);
        sa.children.get_mut(&spi).unwrap().ts_remote = vec![common::host(addr)];
        sa
    };
    let first = with_address(&state, 1, 0, 100);
    accepted(&mut state, Command::CreateSa(Box::new(first)));
    let second = with_address(&state, 2, 1, 200);
    assert_eq!(
        refused(&mut state, Command::CreateSa(Box::new(second.clone()))),
        Rejection::AddressInUse {
            addr,
            holder: SaId(1)
        }
    );
    // A child of an SA with an inner address may not claim more than that address.
    let mut wide = sa(&state, 3, 1, &[300]);
    wide.virtual_ip = Some(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 10)));
    assert!(matches!(
        refused(&mut state, Command::CreateSa(Box::new(wide))),
        Rejection::SelectorOutsideAddress { in_spi: 300, .. }
    ));
    let mut wider_child = child(101, false);
    wider_child.ts_remote = vec![common::host(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 11)))];
    assert!(matches!(
        refused(
            &mut state,
            update(1, 1, vec![SaUpdate::ChildCreated(Box::new(wider_child))])
        ),
        Rejection::SelectorOutsideAddress { in_spi: 101, .. }
    ));
    // Deleting the SA frees its address.
    remove(&mut state, 1);
    assert_eq!(state.address_holder(addr), None);
    accepted(&mut state, Command::CreateSa(Box::new(second)));
}

#[test]
fn remote_selectors_of_different_peers_never_overlap() {
    let mut state = cluster(3);
    let site = |first: [u8; 4], last: [u8; 4]| evpc_raft_store::TrafficSelector {
        protocol: 0,
        start_port: 0,
        end_port: 65535,
        start_addr: IpAddr::V4(Ipv4Addr::from(first)),
        end_addr: IpAddr::V4(Ipv4Addr::from(last)),
    };
    let mut a = sa(&state, 1, 0, &[100]);
    a.children.get_mut(&100).unwrap().ts_remote = vec![site([10, 20, 0, 0], [10, 20, 255, 255])];
    accepted(&mut state, Command::CreateSa(Box::new(a)));
    // Another peer reaching into that range, at creation or with a new child, is refused.
    let mut b = sa(&state, 2, 1, &[200]);
    b.children.get_mut(&200).unwrap().ts_remote = vec![site([10, 20, 7, 0], [10, 20, 7, 255])];
    assert!(matches!(
        refused(&mut state, Command::CreateSa(Box::new(b))),
        Rejection::SelectorOverlap { in_spi: 200, .. }
    ));
    create(&mut state, 2, 1, &[200]);
    let mut grab = child(201, false);
    grab.ts_remote = vec![site([10, 0, 0, 0], [10, 255, 255, 255])];
    assert!(matches!(
        refused(
            &mut state,
            update(2, 1, vec![SaUpdate::ChildCreated(Box::new(grab))])
        ),
        Rejection::SelectorOverlap { in_spi: 201, .. }
    ));
    // The same peer rekeying its child keeps the same selectors: fine.
    let mut next = child(101, false);
    next.ts_remote = vec![site([10, 20, 0, 0], [10, 20, 255, 255])];
    next.rekey_generation = 1;
    accepted(
        &mut state,
        update(
            1,
            1,
            vec![SaUpdate::ChildRekeyed {
                old_in_spi: 100,
                new: Box::new(next),
            }],
        ),
    );
    // Malformed selectors are refused outright.
    let mut bad = child(202, false);
    bad.ts_remote = vec![site([10, 9, 0, 9], [10, 9, 0, 1])];
    assert_eq!(
        refused(
            &mut state,
            update(2, 1, vec![SaUpdate::ChildCreated(Box::new(bad))])
        ),
        Rejection::BadSelector { in_spi: 202 }
    );
    // Once the first peer is gone, its range is free.
    remove(&mut state, 1);
    assert_eq!(
        state.selector_conflict(
            &evpc_raft_store::Identity::fqdn("someone.example"),
            &[site([10, 20, 7, 0], [10, 20, 7, 255])]
        ),
        None
    );
}

fn import(sa: evpc_raft_store::IkeSa, now_ms: u64) -> Command {
    Command::ImportSa {
        sa: Box::new(sa),
        lease: 500,
        now_ms,
    }
}

#[test]
fn an_import_starts_above_everything_and_only_once() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    lease(&mut state, 1, 1, 100, 320);
    // Export --remove: one entry deletes and reads the SA.
    let exported = remove(&mut state, 1);
    assert_eq!(state.tombstones().sa(SaId(1)).unwrap().epoch, Epoch(1));
    assert_eq!(state.tombstones().spi(100).unwrap().out_hwm, 320);
    // A deleted SA cannot be created again, nor its child's SPI reused.
    let again = create_command(&state, 1, 0, &[100]);
    assert!(matches!(
        refused(&mut state, again),
        Rejection::SaTombstoned { .. }
    ));
    let reuse = create_command(&state, 5, 0, &[100]);
    assert!(matches!(
        refused(&mut state, reuse),
        Rejection::ChildSpiTombstoned { in_spi: 100, .. }
    ));
    // Another cluster imports the context: the child starts above 320, with a lease, in epoch 2.
    let mut back = exported.clone();
    back.owner = 0;
    let mut other = cluster(3);
    let Applied::Placed { epoch, .. } = accepted(&mut other, import(back.clone(), 10)) else {
        panic!()
    };
    assert_eq!(epoch, Epoch(2));
    let child = other.child(100).unwrap().1.clone();
    assert_eq!((child.out_start, child.out_hwm), (321, 820));
    // ... and only once.
    assert_eq!(
        refused(&mut other, import(back.clone(), 10)),
        Rejection::SaExists(SaId(1))
    );
    let again = remove(&mut other, 1);
    assert_eq!(
        refused(&mut other, import(back.clone(), 10)),
        Rejection::StaleContext {
            sa: SaId(1),
            context_epoch: Epoch(1),
            tombstone_epoch: Epoch(2)
        }
    );
    // It comes back home from there: accepted, above both clusters' marks.
    let mut home = again.clone();
    home.owner = 0;
    accepted(&mut state, import(home, 10));
    let child = state.child(100).unwrap().1.clone();
    assert_eq!(child.out_start, 821);
    assert_eq!(state.sa(SaId(1)).unwrap().epoch, Epoch(3));
    assert!(state.tombstones().sa(SaId(1)).is_none(), "alive again");
    // The first context, in the cluster that exported it, is older than what it now had.
    remove(&mut state, 1);
    assert!(matches!(
        refused(&mut state, import(back, 10)),
        Rejection::StaleContext { .. }
    ));
}

#[test]
fn an_export_imported_back_resumes_above_and_only_once() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    lease(&mut state, 1, 1, 100, 320);
    let exported = remove(&mut state, 1);
    let mut back = exported.clone();
    back.owner = 0;
    accepted(&mut state, import(back.clone(), 10));
    assert_eq!(state.child(100).unwrap().1.out_start, 321);
    assert_eq!(
        refused(&mut state, import(back.clone(), 10)),
        Rejection::SaExists(SaId(1))
    );
    remove(&mut state, 1);
    assert!(matches!(
        refused(&mut state, import(back, 10)),
        Rejection::StaleContext { .. }
    ));
}

#[test]
fn an_import_never_starts_below_a_tombstone_or_with_expired_keys() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    lease(&mut state, 1, 1, 100, 9_000);
    remove(&mut state, 1);
    // A context of a later incarnation that claims a lower mark (crafted, or from a cluster
    // that lost track): the tombstone's mark wins.
    let mut low = sa(&state, 1, 0, &[100]);
    low.epoch = Epoch(4);
    low.owner = 0;
    accepted(&mut state, import(low, 10));
    assert_eq!(state.child(100).unwrap().1.out_start, 9_001);
    // A child SPI buried by another SA cannot come in with an import.
    remove(&mut state, 1);
    let mut thief = sa(&state, 2, 0, &[100]);
    thief.owner = 0;
    assert!(matches!(
        refused(&mut state, import(thief, 10)),
        Rejection::ChildSpiTombstoned {
            in_spi: 100,
            sa: SaId(1)
        }
    ));
    // Expired keys are never used again.
    let mut old = sa(&state, 3, 0, &[300]);
    old.owner = 0;
    old.times.expire_at_ms = 50;
    assert_eq!(
        refused(&mut state, import(old.clone(), 51)),
        Rejection::ContextExpired {
            sa: SaId(3),
            expired_at_ms: 50
        }
    );
    accepted(&mut state, import(old, 49));
    // Epochs near the end of their space are refused rather than wrapped.
    let mut far = sa(&state, 4, 0, &[400]);
    far.owner = 0;
    far.epoch = Epoch(u64::MAX);
    assert_eq!(
        refused(&mut state, import(far, 10)),
        Rejection::EpochTooHigh(Epoch(u64::MAX))
    );
}

#[test]
fn tombstones_expire_with_their_keys() {
    let mut state = cluster(3);
    let mut dated = sa(&state, 1, 0, &[100]);
    dated.times.expire_at_ms = 5_000;
    accepted(&mut state, Command::CreateSa(Box::new(dated)));
    create(&mut state, 2, 1, &[200]);
    for id in [1, 2] {
        accepted(
            &mut state,
            Command::DeleteSa {
                sa: SaId(id),
                epoch: None,
            },
        );
    }
    assert_eq!(state.tombstones().len(), 4);
    assert_eq!(state.tombstones().next_expiry(), Some(5_000));
    assert_eq!(
        accepted(&mut state, Command::PruneTombstones { now_ms: 5_000 }),
        Applied::Pruned(0)
    );
    assert_eq!(
        accepted(&mut state, Command::PruneTombstones { now_ms: 5_001 }),
        Applied::Pruned(2)
    );
    // SA 2 had no lifetime: its tombstones stay.
    assert!(state.tombstones().sa(SaId(2)).is_some());
    assert_eq!(state.tombstones().next_expiry(), None);
    create(&mut state, 1, 0, &[100]);
}

#[test]
fn a_deleted_child_spi_is_never_reused() {
    let mut state = cluster(3);
    create(&mut state, 1, 0, &[100]);
    // Deleting and re-creating a SPI in the same update: refused (its keys may be the old ones).
    assert!(matches!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![
                    SaUpdate::ChildDeleted { in_spi: 100 },
                    SaUpdate::ChildCreated(Box::new(child(100, false))),
                ]
            )
        ),
        Rejection::ChildSpiInUse { in_spi: 100, .. }
    ));
    accepted(
        &mut state,
        update(1, 1, vec![SaUpdate::ChildDeleted { in_spi: 100 }]),
    );
    assert_eq!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::ChildCreated(Box::new(child(100, false)))]
            )
        ),
        Rejection::ChildSpiTombstoned {
            in_spi: 100,
            sa: SaId(1)
        }
    );
}

#[test]
fn epochs_and_ranges_never_wrap() {
    let mut state = cluster(3);
    let mut near_end = sa(&state, 1, 0, &[100]);
    near_end.children.get_mut(&100).unwrap().suite.esn = true;
    near_end.owner = 0;
    near_end.epoch = Epoch(limits::MAX_IMPORTED_EPOCH);
    accepted(&mut state, import(near_end, 0));
    // A lease up to the very end of the 64-bit space, then a move: exhausted, not wrapped.
    let epoch = state.sa(SaId(1)).unwrap().epoch.0;
    accepted(
        &mut state,
        update(
            1,
            epoch,
            vec![SaUpdate::SeqLease {
                in_spi: 100,
                out_hwm: limits::MAX_SEQ_ESN,
                in_checkpoint: None,
            }],
        ),
    );
    assert!(matches!(
        refused(
            &mut state,
            update(
                1,
                epoch,
                vec![SaUpdate::SeqLease {
                    in_spi: 100,
                    out_hwm: u64::MAX,
                    in_checkpoint: None,
                }]
            )
        ),
        Rejection::HwmBeyondCounterSpace { .. }
    ));
    let moved = accepted(
        &mut state,
        Command::AssignOwners(vec![OwnerMove {
            sa: SaId(1),
            from_epoch: Epoch(epoch),
            to: 2,
            lease: 100,
            handover: false,
        }]),
    );
    assert_eq!(moved, Applied::Moves(vec![Ok(Epoch(epoch + 1))]));
    let child = state.child(100).unwrap().1;
    assert!(
        child.out_start > child.out_hwm,
        "exhausted: must be rekeyed"
    );
    assert_eq!(child.out_hwm, limits::MAX_SEQ_ESN);
}

#[test]
fn what_a_command_carries_is_bounded() {
    let mut state = cluster(3);
    let spis: Vec<u32> = (1000..1000 + limits::MAX_CHILDREN_PER_SA as u32 + 1).collect();
    let crowded = create_command(&state, 1, 0, &spis);
    assert!(matches!(
        refused(&mut state, crowded),
        Rejection::TooLarge { .. }
    ));
    create(&mut state, 1, 0, &[100]);
    assert!(matches!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::PeerRequestAnswered {
                    msg_id: 2,
                    response: vec![vec![0; limits::MAX_DATAGRAM_BYTES + 1]],
                }]
            )
        ),
        Rejection::TooLarge { .. }
    ));
    assert!(matches!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::Keys(evpc_raft_store::SealedKeys(vec![
                    0;
                    limits::MAX_SEALED_BYTES
                        + 1
                ]))]
            )
        ),
        Rejection::TooLarge { .. }
    ));
    let mut many = child(101, false);
    many.ts_local = vec![many.ts_local[0]; limits::MAX_SELECTORS_PER_CHILD + 1];
    assert!(matches!(
        refused(
            &mut state,
            update(1, 1, vec![SaUpdate::ChildCreated(Box::new(many))])
        ),
        Rejection::TooLarge { .. }
    ));
    let mut bad_range = child(102, false);
    bad_range.out_start = 5;
    bad_range.out_hwm = 2;
    assert!(matches!(
        refused(
            &mut state,
            update(1, 1, vec![SaUpdate::ChildCreated(Box::new(bad_range))])
        ),
        Rejection::BadRange { in_spi: 102, .. }
    ));
    assert_eq!(
        refused(
            &mut state,
            Command::SetNodeState {
                node: 0,
                state: NodeState::Active,
                at_ms: 0
            }
        ),
        Rejection::UnknownNode(0)
    );
}

#[test]
fn the_cluster_id_is_set_once_and_acks_only_grow() {
    let mut state = cluster(3);
    let id = evpc_raft_store::ClusterId([1; 16]);
    accepted(&mut state, Command::SetClusterId(id));
    accepted(&mut state, Command::SetClusterId(id));
    assert!(matches!(
        refused(
            &mut state,
            Command::SetClusterId(evpc_raft_store::ClusterId([2; 16]))
        ),
        Rejection::ClusterIdMismatch { .. }
    ));
    assert_eq!(state.cluster_id(), Some(id));
    let ack = |node, index| evpc_raft_store::NodeAck { node, index };
    accepted(
        &mut state,
        Command::RecordAcks(vec![ack(1, 50), ack(2, 40)]),
    );
    accepted(&mut state, Command::RecordAcks(vec![ack(1, 30)]));
    assert_eq!(state.acknowledged(1), 50);
    assert_eq!(state.acknowledged(2), 40);
    assert_eq!(
        refused(&mut state, Command::RecordAcks(vec![ack(9, 1)])),
        Rejection::UnknownNode(9)
    );
}

#[test]
fn deleting_what_does_not_exist_is_a_typed_error() {
    let mut state = cluster(3);
    assert_eq!(
        refused(
            &mut state,
            Command::DeleteSa {
                sa: SaId(42),
                epoch: None
            }
        ),
        Rejection::UnknownSa(SaId(42))
    );
}

#[test]
fn a_node_leaving_active_gives_up_its_slots() {
    let mut state = cluster(3);
    assert!(state.slots().count_for(2) > 0);
    accepted(
        &mut state,
        Command::SetNodeState {
            node: 2,
            state: NodeState::Down,
            at_ms: 5,
        },
    );
    assert_eq!(state.slots().count_for(2), 0);
    assert!(matches!(
        refused(
            &mut state,
            Command::SetSlots(vec![SlotAssignment {
                slot: 0,
                node: Some(2)
            }])
        ),
        Rejection::NodeNotActive { node: 2, .. }
    ));
    assert_eq!(
        refused(
            &mut state,
            Command::SetSlots(vec![SlotAssignment {
                slot: 0,
                node: Some(9)
            }])
        ),
        Rejection::UnknownNode(9)
    );
}

#[test]
fn batches_apply_each_command_and_do_not_nest() {
    let mut state = cluster(3);
    let batch = Command::Batch(vec![
        create_command(&state, 1, 0, &[]),
        Command::DeleteSa {
            sa: SaId(7),
            epoch: None,
        },
        Command::Batch(vec![]),
    ]);
    let applied = accepted(&mut state, batch);
    assert_eq!(
        applied,
        Applied::Batch(vec![
            Ok(Applied::Placed {
                owner: state.sa(SaId(1)).unwrap().owner,
                epoch: Epoch::FIRST,
            }),
            Err(Rejection::UnknownSa(SaId(7))),
            Err(Rejection::NestedBatch)
        ])
    );
    assert_eq!(state.sa_count(), 1);
}
