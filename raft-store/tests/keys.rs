//! Cluster keys in the replicated state: activation, retirement and resealing, including
//! commands no code path produces (retiring the active key or one still in use, reseals under
//! another key), each refused with its typed rejection and leaving the state untouched.

mod common;

use evpc_raft_store::{
    Applied, BlobRef, Command, Epoch, KeyId, Rejection, Reseal, SaId, SaUpdate, SealedHeader,
    SealedKeys, State, apply, limits,
};
use sha2::{Digest, Sha256};

fn keyed(key: u32, generation: u32, epoch: u64, filler: u8) -> SealedKeys {
    let mut blob = SealedHeader {
        key: KeyId(key),
        generation,
        epoch: Epoch(epoch),
    }
    .to_bytes()
    .to_vec();
    blob.extend_from_slice(&[filler; 28]);
    SealedKeys(blob)
}

fn sha(blob: &SealedKeys) -> [u8; 32] {
    Sha256::digest(&blob.0).into()
}

fn activate(key: u32) -> Command {
    Command::ActivateKey {
        key: KeyId(key),
        fingerprint: [key as u8; 16],
    }
}

/// A cluster with SAs 1..=count, each with an engine state and one child sealed under key 1.
fn with_sas(count: u64) -> State {
    let mut state = common::cluster(3);
    for id in 1..=count {
        let mut sa = common::sa(&state, id, id as u16, &[0x1000 + id as u32]);
        sa.keys = keyed(1, 0, 1, id as u8);
        for child in sa.children.values_mut() {
            child.keys = keyed(1, 0, 1, id as u8);
        }
        let r = apply(&mut state, &Command::CreateSa(Box::new(sa)));
        assert!(r.is_ok(), "{r:?}");
    }
    state
}

/// Applies `command`, which must be refused with `expected`, and checks nothing changed.
fn refused(state: &mut State, command: &Command, expected: Rejection) {
    let before = state.clone();
    assert_eq!(apply(state, command), Err(expected), "{command}");
    assert_eq!(*state, before, "a refusal changed the state");
}

#[test]
fn a_new_cluster_seals_under_key_1_and_counts_every_blob() {
    let state = with_sas(3);
    assert_eq!(state.keys().active(), KeyId(1));
    assert_eq!(state.keys().blobs_under(KeyId(1)), 6);
    assert_eq!(state.keys().sas_with(KeyId(1)), 3);
    assert_eq!(
        state
            .keys()
            .sas_under(KeyId(1), SaId(2))
            .collect::<Vec<_>>(),
        [SaId(2), SaId(3)]
    );
    state.check_invariants().unwrap();
}

#[test]
fn key_ids_only_grow_and_activation_is_idempotent() {
    let mut state = with_sas(1);
    refused(
        &mut state,
        &activate(1),
        Rejection::KeyIdNotNew {
            key: KeyId(1),
            highest: KeyId(1),
        },
    );
    refused(
        &mut state,
        &activate(0),
        Rejection::KeyIdNotNew {
            key: KeyId(0),
            highest: KeyId(1),
        },
    );
    assert_eq!(apply(&mut state, &activate(3)), Ok(Applied::Done));
    assert_eq!(state.keys().active(), KeyId(3));
    assert_eq!(state.keys().fingerprint(KeyId(3)), Some([3; 16]));
    // A retried proposal (the outcome was unknown) is a no-op; other material is not.
    let before = state.clone();
    assert_eq!(apply(&mut state, &activate(3)), Ok(Applied::Done));
    assert_eq!(state, before);
    refused(
        &mut state,
        &Command::ActivateKey {
            key: KeyId(3),
            fingerprint: [9; 16],
        },
        Rejection::KeyIdNotNew {
            key: KeyId(3),
            highest: KeyId(3),
        },
    );
    refused(
        &mut state,
        &activate(2),
        Rejection::KeyIdNotNew {
            key: KeyId(2),
            highest: KeyId(3),
        },
    );
    state.check_invariants().unwrap();
}

#[test]
fn live_keys_are_bounded() {
    let mut state = State::default();
    for key in 2..=limits::MAX_LIVE_KEYS as u32 {
        assert!(apply(&mut state, &activate(key)).is_ok());
    }
    let command = activate(limits::MAX_LIVE_KEYS as u32 + 1);
    let before = state.clone();
    assert!(matches!(
        apply(&mut state, &command),
        Err(Rejection::TooLarge { .. })
    ));
    assert_eq!(state, before);
    // Retiring an empty old key makes room.
    assert!(apply(&mut state, &Command::RetireKey(KeyId(1))).is_ok());
    assert!(apply(&mut state, &command).is_ok());
    state.check_invariants().unwrap();
}

#[test]
fn the_active_key_a_key_in_use_and_an_unknown_key_are_never_retired() {
    let mut state = with_sas(2);
    refused(
        &mut state,
        &Command::RetireKey(KeyId(1)),
        Rejection::KeyIsActive(KeyId(1)),
    );
    refused(
        &mut state,
        &Command::RetireKey(KeyId(7)),
        Rejection::UnknownKey(KeyId(7)),
    );
    apply(&mut state, &activate(2)).unwrap();
    refused(
        &mut state,
        &Command::RetireKey(KeyId(1)),
        Rejection::KeyInUse {
            key: KeyId(1),
            blobs: 4,
        },
    );
    // In a batch, each command stands alone: the refusal is reported, the rest applies.
    let batch = apply(
        &mut state,
        &Command::Batch(vec![Command::RetireKey(KeyId(2)), activate(3)]),
    );
    assert_eq!(
        batch,
        Ok(Applied::Batch(vec![
            Err(Rejection::KeyIsActive(KeyId(2))),
            Ok(Applied::Done)
        ]))
    );
    // Once the last blob is gone the key can go; twice is a no-op.
    for id in [1, 2] {
        apply(
            &mut state,
            &Command::DeleteSa {
                sa: SaId(id),
                epoch: None,
            },
        )
        .unwrap();
    }
    assert_eq!(state.keys().blobs_under(KeyId(1)), 0);
    assert_eq!(
        apply(&mut state, &Command::RetireKey(KeyId(1))),
        Ok(Applied::Done)
    );
    assert_eq!(
        apply(&mut state, &Command::RetireKey(KeyId(1))),
        Ok(Applied::Done)
    );
    assert!(state.keys().retired().contains(&KeyId(1)));
    assert!(!state.keys().is_live(KeyId(1)));
    // A retired id never comes back.
    refused(
        &mut state,
        &activate(1),
        Rejection::KeyIdNotNew {
            key: KeyId(1),
            highest: KeyId(3),
        },
    );
    state.check_invariants().unwrap();
}

#[test]
fn blobs_under_a_retired_or_unknown_key_are_refused_everywhere() {
    let mut state = with_sas(1);
    apply(&mut state, &activate(2)).unwrap();
    apply(
        &mut state,
        &Command::DeleteSa {
            sa: SaId(1),
            epoch: None,
        },
    )
    .unwrap();
    apply(&mut state, &Command::RetireKey(KeyId(1))).unwrap();
    let mut fresh = common::sa(&state, 5, 5, &[0x5000]);
    fresh.keys = keyed(2, 0, 1, 0);
    for (bad, expected) in [
        (keyed(1, 0, 1, 0), Rejection::KeyRetired(KeyId(1))),
        (keyed(9, 0, 1, 0), Rejection::UnknownKey(KeyId(9))),
    ] {
        // A new SA with a bad engine state, or a bad child.
        let mut sa = fresh.clone();
        sa.keys = bad.clone();
        refused(
            &mut state,
            &Command::CreateSa(Box::new(sa.clone())),
            expected.clone(),
        );
        let mut sa = fresh.clone();
        sa.children.get_mut(&0x5000).unwrap().keys = bad.clone();
        refused(
            &mut state,
            &Command::CreateSa(Box::new(sa.clone())),
            expected.clone(),
        );
        refused(
            &mut state,
            &Command::ImportSa {
                sa: Box::new(sa),
                lease: 100,
                now_ms: 0,
            },
            expected.clone(),
        );
    }
    apply(&mut state, &Command::CreateSa(Box::new(fresh.clone()))).unwrap();
    // An owner's update naming a retired key (a node that lags behind the retirement).
    refused(
        &mut state,
        &Command::Update {
            sa: fresh.id,
            epoch: fresh.epoch,
            updates: vec![SaUpdate::Keys(keyed(1, 0, 1, 3))],
        },
        Rejection::KeyRetired(KeyId(1)),
    );
    let mut child = common::child(0x5001, false);
    child.keys = keyed(9, 0, 1, 0);
    refused(
        &mut state,
        &Command::Update {
            sa: fresh.id,
            epoch: fresh.epoch,
            updates: vec![SaUpdate::ChildCreated(Box::new(child))],
        },
        Rejection::UnknownKey(KeyId(9)),
    );
    // Opaque and empty blobs carry no key id and stay accepted (synthetic SAs).
    for blob in [SealedKeys(vec![7; 60]), SealedKeys::default()] {
        assert!(
            apply(
                &mut state,
                &Command::Update {
                    sa: fresh.id,
                    epoch: fresh.epoch,
                    updates: vec![SaUpdate::Keys(blob)],
                },
            )
            .is_ok()
        );
    }
    state.check_invariants().unwrap();
}

#[test]
fn reseals_swap_only_unchanged_blobs_and_keep_the_counts() {
    let mut state = with_sas(3);
    apply(&mut state, &activate(2)).unwrap();
    let sa1 = state.sa(SaId(1)).unwrap().clone();
    let sa2 = state.sa(SaId(2)).unwrap().clone();
    let reseal = |sa: &evpc_raft_store::IkeSa, blob: BlobRef, expect: [u8; 32]| Reseal {
        sa: sa.id,
        blob,
        expect_sha256: expect,
        sealed: keyed(2, 0, sa.epoch.0, 0xee),
    };
    let command = Command::ResealKeys(vec![
        reseal(&sa1, BlobRef::Ike, sha(&sa1.keys)),
        reseal(
            &sa1,
            BlobRef::Child(0x1001),
            sha(&sa1.children[&0x1001].keys),
        ),
        // Changed since it was read: skipped.
        reseal(&sa2, BlobRef::Ike, [0; 32]),
        // Gone: skipped.
        reseal(&sa2, BlobRef::Child(0x9999), [0; 32]),
        Reseal {
            sa: SaId(77),
            ..reseal(&sa2, BlobRef::Ike, sha(&sa2.keys))
        },
        // Bound to another generation: skipped (it would never open).
        Reseal {
            sealed: keyed(2, 5, 1, 0xee),
            ..reseal(
                &sa2,
                BlobRef::Child(0x1002),
                sha(&sa2.children[&0x1002].keys),
            )
        },
    ]);
    assert_eq!(
        apply(&mut state, &command),
        Ok(Applied::Resealed {
            replaced: 2,
            stale: 4
        })
    );
    assert_eq!(state.keys().blobs_under(KeyId(1)), 4);
    assert_eq!(state.keys().blobs_under(KeyId(2)), 2);
    assert_eq!(
        state
            .keys()
            .sas_under(KeyId(1), SaId(0))
            .collect::<Vec<_>>(),
        [SaId(2), SaId(3)]
    );
    assert_eq!(
        state
            .keys()
            .sas_under(KeyId(2), SaId(0))
            .collect::<Vec<_>>(),
        [SaId(1)]
    );
    // The same command again changes nothing: the blobs are no longer the ones it read.
    let before = state.clone();
    assert_eq!(
        apply(&mut state, &command),
        Ok(Applied::Resealed {
            replaced: 0,
            stale: 6
        })
    );
    assert_eq!(state, before);
    state.check_invariants().unwrap();
}

#[test]
fn a_reseal_not_under_the_active_key_is_refused_whole() {
    let mut state = with_sas(1);
    apply(&mut state, &activate(2)).unwrap();
    let sa = state.sa(SaId(1)).unwrap().clone();
    let good = Reseal {
        sa: sa.id,
        blob: BlobRef::Ike,
        expect_sha256: sha(&sa.keys),
        sealed: keyed(2, 0, 1, 0),
    };
    for (sealed, given) in [
        (keyed(1, 0, 1, 0), Some(KeyId(1))),
        (keyed(3, 0, 1, 0), Some(KeyId(3))),
        (SealedKeys(vec![7; 60]), None),
    ] {
        refused(
            &mut state,
            &Command::ResealKeys(vec![
                good.clone(),
                Reseal {
                    sealed,
                    ..good.clone()
                },
            ]),
            Rejection::NotActiveKey {
                given,
                active: KeyId(2),
            },
        );
    }
    let too_many = Command::ResealKeys(vec![good.clone(); limits::MAX_RESEALS_PER_COMMAND + 1]);
    let before = state.clone();
    assert!(matches!(
        apply(&mut state, &too_many),
        Err(Rejection::TooLarge { .. })
    ));
    assert_eq!(state, before);
    let huge = Reseal {
        sealed: SealedKeys([keyed(2, 0, 1, 0).0, vec![0; limits::MAX_SEALED_BYTES]].concat()),
        ..good
    };
    assert!(matches!(
        apply(&mut state, &Command::ResealKeys(vec![huge])),
        Err(Rejection::TooLarge { .. })
    ));
    assert_eq!(state, before);
}

#[test]
fn a_snapshot_of_the_key_registry_round_trips_and_is_checked() {
    let mut state = with_sas(2);
    apply(&mut state, &activate(2)).unwrap();
    let decoded: State = postcard::from_bytes(&state.canonical_bytes()).unwrap();
    assert_eq!(decoded, state);
    decoded.check_invariants().unwrap();
}
