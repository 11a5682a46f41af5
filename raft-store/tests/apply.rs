//! `apply` enforces each invariant and answers a refused command with a typed rejection,
//! leaving the state untouched.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{child, cluster, sa};
use evpc_raft_store::{
    Applied, Command, Epoch, NodeState, OwnerMove, Rejection, SaId, SaUpdate, SlotAssignment,
    State, StoredMessage, apply,
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
            },
            OwnerMove {
                sa: SaId(99),
                from_epoch: Epoch(1),
                to,
                lease: 1000,
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
fn ike_rekey_moves_children_and_address_to_the_successor() {
    let mut state = cluster(3);
    let mut first = sa(&state, 1, 0, &[100, 101]);
    first.virtual_ip = Some(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 2)));
    accepted(&mut state, Command::CreateSa(Box::new(first)));
    let mut successor = sa(&state, 2, 0, &[]);
    successor.rekey_generation = 0;
    assert!(matches!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::IkeRekeyed(Box::new(successor.clone()))]
            )
        ),
        Rejection::RekeyGenerationRegression { .. }
    ));
    successor.rekey_generation = 1;
    successor.children.insert(300, child(300, false));
    assert_eq!(
        refused(
            &mut state,
            update(
                1,
                1,
                vec![SaUpdate::IkeRekeyed(Box::new(successor.clone()))]
            )
        ),
        Rejection::RekeyWithChildren
    );
    successor.children.clear();
    accepted(
        &mut state,
        update(1, 1, vec![SaUpdate::IkeRekeyed(Box::new(successor))]),
    );
    let (old, new) = (state.sa(SaId(1)).unwrap(), state.sa(SaId(2)).unwrap());
    assert!(old.children.is_empty() && old.virtual_ip.is_none());
    assert_eq!(new.children.len(), 2);
    assert_eq!(state.child(100).unwrap().0.id, SaId(2));
    assert_eq!(
        state.address_holder(IpAddr::V4(Ipv4Addr::new(10, 10, 0, 2))),
        Some(SaId(2))
    );
    accepted(
        &mut state,
        Command::DeleteSa {
            sa: SaId(1),
            epoch: Some(Epoch(1)),
        },
    );
    assert_eq!(state.sa_count(), 1);
}

#[test]
fn an_address_is_never_allocated_twice() {
    let mut state = cluster(3);
    let addr = IpAddr::V4(Ipv4Addr::new(10, 10, 0, 9));
    let mut first = sa(&state, 1, 0, &[]);
    first.virtual_ip = Some(addr);
    accepted(&mut state, Command::CreateSa(Box::new(first)));
    let mut second = sa(&state, 2, 1, &[]);
    second.virtual_ip = Some(addr);
    assert_eq!(
        refused(&mut state, Command::CreateSa(Box::new(second))),
        Rejection::AddressInUse {
            addr,
            holder: SaId(1)
        }
    );
    create(&mut state, 2, 1, &[]);
    assert_eq!(
        refused(
            &mut state,
            Command::AllocateAddress {
                sa: SaId(2),
                epoch: Epoch(1),
                addr
            }
        ),
        Rejection::AddressInUse {
            addr,
            holder: SaId(1)
        }
    );
    accepted(&mut state, Command::ReleaseAddress { addr });
    assert_eq!(
        refused(&mut state, Command::ReleaseAddress { addr }),
        Rejection::AddressNotAllocated(addr)
    );
    accepted(
        &mut state,
        Command::AllocateAddress {
            sa: SaId(2),
            epoch: Epoch(1),
            addr,
        },
    );
    // Deleting the SA frees its address.
    accepted(
        &mut state,
        Command::DeleteSa {
            sa: SaId(2),
            epoch: None,
        },
    );
    assert_eq!(state.address_holder(addr), None);
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
                owner: state.sa(SaId(1)).unwrap().owner
            }),
            Err(Rejection::UnknownSa(SaId(7))),
            Err(Rejection::NestedBatch)
        ])
    );
    assert_eq!(state.sa_count(), 1);
}
