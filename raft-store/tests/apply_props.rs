//! Property tests: random command sequences never break an invariant, counters never move
//! backwards, refused commands change nothing, the blob counts per cluster key always equal a
//! recount, the change feed names every SA a command changed, and applying the same log twice
//! gives byte-identical state.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use evpc_raft_store::{
    Applied, BlobRef, ChangeKinds, ClusterId, Command, Epoch, IkeSa, KeyId, NodeAck, NodeState,
    OwnerMove, Reseal, SaId, SaUpdate, SealedHeader, SealedKeys, SlotAssignment, State,
    StoredMessage, apply, changes,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const SAS: u64 = 6;

fn sa_id() -> impl Strategy<Value = u64> {
    1..=SAS
}

fn spi() -> impl Strategy<Value = u32> {
    100u32..112
}

fn epoch() -> impl Strategy<Value = u64> {
    1u64..4
}

fn node() -> impl Strategy<Value = u64> {
    1u64..5
}

fn addr() -> impl Strategy<Value = IpAddr> {
    (1u8..5).prop_map(|h| IpAddr::V4(Ipv4Addr::new(10, 10, 0, h)))
}

fn node_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![
        3 => Just(NodeState::Active),
        1 => Just(NodeState::Draining),
        1 => Just(NodeState::Down),
    ]
}

/// A blob with a key header (the store reads only the header; the rest is opaque to it).
fn keyed(key: u32, generation: u32, epoch: u64) -> SealedKeys {
    let mut blob = SealedHeader {
        key: KeyId(key),
        generation,
        epoch: Epoch(epoch),
    }
    .to_bytes()
    .to_vec();
    blob.extend_from_slice(&[0x5a; 28]);
    SealedKeys(blob)
}

/// Any blob: opaque, empty, or under key 0 (not a key) to 4 (some never activated).
fn blob() -> impl Strategy<Value = SealedKeys> {
    prop_oneof![
        1 => Just(SealedKeys(vec![7; 60])),
        1 => Just(SealedKeys(vec![])),
        4 => (0u32..5).prop_map(|k| keyed(k, 0, 1)),
    ]
}

fn sa_update() -> impl Strategy<Value = SaUpdate> {
    prop_oneof![
        blob().prop_map(SaUpdate::Keys),
        (spi(), blob()).prop_map(|(spi, keys)| {
            let mut child = common::child(spi, false);
            child.keys = keys;
            SaUpdate::ChildCreated(Box::new(child))
        }),
        (0u32..6).prop_map(|msg_id| SaUpdate::PeerRequestAnswered {
            msg_id,
            response: vec![vec![msg_id as u8; 16]],
        }),
        (0u32..4).prop_map(|msg_id| SaUpdate::LocalRequestStarted(StoredMessage {
            msg_id,
            datagrams: vec![vec![0xaa; 8]],
        })),
        (0u32..4).prop_map(|msg_id| SaUpdate::LocalRequestCompleted { msg_id }),
        (spi(), any::<bool>())
            .prop_map(|(spi, esn)| SaUpdate::ChildCreated(Box::new(common::child(spi, esn)))),
        (spi(), spi(), 0u32..3).prop_map(|(old, new, generation)| {
            let mut child = common::child(new, false);
            child.rekey_generation = generation;
            SaUpdate::ChildRekeyed {
                old_in_spi: old,
                new: Box::new(child),
            }
        }),
        spi().prop_map(|in_spi| SaUpdate::ChildDeleted { in_spi }),
        (spi(), 0u64..3000, proptest::option::of(0u64..3000)).prop_map(
            |(in_spi, out_hwm, in_checkpoint)| SaUpdate::SeqLease {
                in_spi,
                out_hwm,
                in_checkpoint,
            }
        ),
        (spi(), prop_oneof![0u64..3000, Just(1u64 << 33)]).prop_map(|(in_spi, out_hwm)| {
            SaUpdate::SeqLease {
                in_spi,
                out_hwm,
                in_checkpoint: None,
            }
        }),
        (spi(), 0u64..3000)
            .prop_map(|(in_spi, in_seq)| SaUpdate::ReplayCheckpoint { in_spi, in_seq }),
        (0u64..10_000).prop_map(|at_ms| SaUpdate::PeerSeen { at_ms }),
        (1u64..4, 1u64..4, 0u32..3).prop_map(|(spi_i, spi_r, rekey_generation)| {
            SaUpdate::IkeRekeyedInPlace {
                spi_i,
                spi_r: spi_r * 0x100,
                rekey_generation,
            }
        }),
        (spi(), 0u64..5, 0u64..5).prop_map(|(spi, out_start, out_hwm)| {
            // A crafted child: any range, maybe not a valid one.
            let mut child = common::child(spi, false);
            child.out_start = out_start;
            child.out_hwm = out_hwm;
            SaUpdate::ChildCreated(Box::new(child))
        }),
    ]
}

/// A command description; SAs are built against the state at the time they are applied so
/// that creations have a fair chance of naming the right slot owner.
#[derive(Clone, Debug)]
enum Op {
    Create {
        id: u64,
        slot: u16,
        children: Vec<u32>,
        addr: Option<IpAddr>,
        owner_guess: Option<u64>,
        expire_at_ms: u64,
        /// Every blob of the SA under this key (none: opaque blobs).
        key: Option<u32>,
    },
    Activate(u32),
    Retire(u32),
    /// Reseal one blob of an SA (its engine state or a child) under `key`, with the digest of
    /// the blob as it is now (`fresh`) or a stale one.
    Reseal {
        id: u64,
        child: Option<u32>,
        key: u32,
        fresh: bool,
    },
    /// A context built here (as if from another cluster), crafted freely.
    Import {
        id: u64,
        owner: u64,
        epoch: u64,
        children: Vec<(u32, u64)>,
        now_ms: u64,
    },
    /// Re-import one of the SAs this run exported (deleted), maybe with a later epoch.
    Reimport {
        which: usize,
        epoch_bump: u64,
        /// Claim lower marks than the export had (a crafted or confused context).
        forget_marks: bool,
    },
    Update {
        id: u64,
        epoch: u64,
        updates: Vec<SaUpdate>,
    },
    Delete {
        id: u64,
        epoch: Option<u64>,
    },
    Move {
        id: u64,
        from: u64,
        to: u64,
    },
    Slots(Vec<(u16, Option<u64>)>),
    NodeState(u64, NodeState),
    ClusterId(u8),
    Acks(Vec<(u64, u64)>),
    Prune(u64),
    Batch(Vec<Op>),
}

fn leaf_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (sa_id(), 0u16..4, proptest::collection::vec(spi(), 0..3),
              proptest::option::of(addr()), proptest::option::of(node()),
              prop_oneof![Just(0u64), 1u64..5_000], proptest::option::of(0u32..4))
            .prop_map(|(id, slot, children, addr, owner_guess, expire_at_ms, key)| Op::Create {
                id, slot, children, addr, owner_guess, expire_at_ms, key
            }),
        1 => (0u32..5).prop_map(Op::Activate),
        1 => (0u32..5).prop_map(Op::Retire),
        3 => (sa_id(), proptest::option::of(spi()), 0u32..5, prop_oneof![4 => Just(true), 1 => Just(false)])
            .prop_map(|(id, child, key, fresh)| Op::Reseal { id, child, key, fresh }),
        1 => (sa_id(), prop_oneof![Just(0u64), node()],
              prop_oneof![epoch(), Just(u64::MAX), Just(1u64 << 48)],
              proptest::collection::vec((spi(), 0u64..3000), 0..3), 0u64..6_000)
            .prop_map(|(id, owner, epoch, children, now_ms)| Op::Import { id, owner, epoch, children, now_ms }),
        3 => (0usize..8, 0u64..3, any::<bool>()).prop_map(|(which, epoch_bump, forget_marks)| {
            Op::Reimport { which, epoch_bump, forget_marks }
        }),
        8 => (sa_id(), epoch(), proptest::collection::vec(sa_update(), 0..4))
            .prop_map(|(id, epoch, updates)| Op::Update { id, epoch, updates }),
        2 => (sa_id(), proptest::option::of(epoch())).prop_map(|(id, epoch)| Op::Delete { id, epoch }),
        2 => (sa_id(), epoch(), node()).prop_map(|(id, from, to)| Op::Move { id, from, to }),
        1 => proptest::collection::vec((0u16..1030, proptest::option::of(node())), 1..5).prop_map(Op::Slots),
        1 => (prop_oneof![Just(0u64), node()], node_state()).prop_map(|(n, s)| Op::NodeState(n, s)),
        1 => (1u8..3).prop_map(Op::ClusterId),
        1 => proptest::collection::vec((0u64..6, 0u64..100), 0..4).prop_map(Op::Acks),
        1 => (0u64..6_000).prop_map(Op::Prune),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => leaf_op(),
        1 => proptest::collection::vec(leaf_op(), 0..4).prop_map(Op::Batch),
    ]
}

/// What a run remembers: the SAs it exported (deleted), for re-imports.
#[derive(Default)]
struct Harness {
    exported: Vec<IkeSa>,
}

fn to_command(state: &State, harness: &Harness, op: &Op) -> Command {
    match op {
        Op::Create {
            id,
            slot,
            children,
            addr,
            owner_guess,
            expire_at_ms,
            key,
        } => {
            let mut sa = common::sa(&common::cluster(1), *id, *slot, children);
            if let Some(key) = key {
                sa.keys = keyed(*key, sa.rekey_generation, sa.epoch.0);
                for child in sa.children.values_mut() {
                    child.keys = keyed(*key, child.rekey_generation, 1);
                }
            }
            sa.owner = owner_guess.or(state.slots().owner(*slot)).unwrap_or(1);
            sa.virtual_ip = *addr;
            sa.times.expire_at_ms = *expire_at_ms;
            if let Some(a) = addr {
                for child in sa.children.values_mut() {
                    child.ts_remote = vec![common::host(*a)];
                }
            }
            Command::CreateSa(Box::new(sa))
        }
        Op::Import {
            id,
            owner,
            epoch,
            children,
            now_ms,
        } => {
            let spis: Vec<u32> = children.iter().map(|(spi, _)| *spi).collect();
            let mut sa = common::sa(&common::cluster(1), *id, 0, &spis);
            for (spi, hwm) in children {
                if let Some(c) = sa.children.get_mut(spi) {
                    c.out_hwm = *hwm;
                }
            }
            sa.owner = *owner;
            sa.epoch = Epoch(*epoch);
            sa.times.expire_at_ms = 3_000;
            Command::ImportSa {
                sa: Box::new(sa),
                lease: 700,
                now_ms: *now_ms,
            }
        }
        Op::Reimport {
            which,
            epoch_bump,
            forget_marks,
        } => match harness.exported.get(*which) {
            Some(sa) => {
                let mut sa = sa.clone();
                sa.owner = 0;
                sa.epoch = Epoch(sa.epoch.0 + epoch_bump);
                if *forget_marks {
                    for child in sa.children.values_mut() {
                        child.out_start = 1;
                        child.out_hwm = 0;
                    }
                }
                Command::ImportSa {
                    sa: Box::new(sa),
                    lease: 700,
                    now_ms: 0,
                }
            }
            None => Command::PruneTombstones { now_ms: 0 },
        },
        Op::Update { id, epoch, updates } => Command::Update {
            sa: SaId(*id),
            epoch: Epoch(*epoch),
            updates: updates.clone(),
        },
        Op::Delete { id, epoch } => Command::DeleteSa {
            sa: SaId(*id),
            epoch: epoch.map(Epoch),
        },
        Op::Move { id, from, to } => Command::AssignOwners(vec![OwnerMove {
            sa: SaId(*id),
            from_epoch: Epoch(*from),
            to: *to,
            lease: 700,
            handover: false,
        }]),
        Op::Slots(slots) => Command::SetSlots(
            slots
                .iter()
                .map(|(slot, node)| SlotAssignment {
                    slot: *slot,
                    node: *node,
                })
                .collect(),
        ),
        Op::NodeState(node, s) => Command::SetNodeState {
            node: *node,
            state: *s,
            at_ms: 0,
        },
        Op::ClusterId(b) => Command::SetClusterId(ClusterId([*b; 16])),
        Op::Acks(acks) => Command::RecordAcks(
            acks.iter()
                .map(|(node, index)| NodeAck {
                    node: *node,
                    index: *index,
                })
                .collect(),
        ),
        Op::Prune(now_ms) => Command::PruneTombstones { now_ms: *now_ms },
        Op::Activate(key) => Command::ActivateKey {
            key: KeyId(*key),
            fingerprint: [*key as u8; 16],
        },
        Op::Retire(key) => Command::RetireKey(KeyId(*key)),
        Op::Reseal {
            id,
            child,
            key,
            fresh,
        } => {
            let sa = state.sa(SaId(*id));
            // A child of the SA if it has one (the generated SPI is rarely one of them).
            let child = child.and_then(|spi| {
                sa.and_then(|sa| sa.children.keys().find(|c| **c % 2 == spi % 2).copied())
            });
            let (current, generation) = match (sa, child) {
                (Some(sa), Some(spi)) => (
                    sa.children[&spi].keys.clone(),
                    sa.children[&spi].rekey_generation,
                ),
                (Some(sa), None) => (sa.keys.clone(), sa.rekey_generation),
                (None, _) => (SealedKeys::default(), 0),
            };
            let expect_sha256 = if *fresh {
                Sha256::digest(&current.0).into()
            } else {
                [0; 32]
            };
            Command::ResealKeys(vec![Reseal {
                sa: SaId(*id),
                blob: child.map_or(BlobRef::Ike, BlobRef::Child),
                expect_sha256,
                sealed: keyed(*key, generation, 1),
            }])
        }
        Op::Batch(ops) => {
            Command::Batch(ops.iter().map(|o| to_command(state, harness, o)).collect())
        }
    }
}

/// SAs removed by a command's response (export --remove and deletes), to re-import later.
fn removed_by(response: &evpc_raft_store::Response, out: &mut Vec<IkeSa>) {
    match response {
        Ok(Applied::Removed(sa)) => out.push((**sa).clone()),
        Ok(Applied::Batch(responses)) => responses.iter().for_each(|r| removed_by(r, out)),
        _ => {}
    }
}

/// Per inbound SPI, across the whole run: the highest `out_hwm` ever committed, and the
/// (SA, epoch) it last ran in.
#[derive(Default)]
struct Ledger {
    highest: HashMap<u32, u64>,
    running: HashMap<u32, (SaId, Epoch)>,
}

impl Ledger {
    /// The counter rule, across every way a child starts (creation, move, import, re-import):
    /// a child that starts (appears, or runs in a new epoch) starts above every mark its SPI
    /// ever had, unless its keys expired and its tombstone was pruned (a new child may then
    /// take the SPI with new keys).
    fn check(
        &mut self,
        before: &State,
        state: &State,
        command: &Command,
    ) -> Result<(), TestCaseError> {
        // A tombstone the command could prune (its keys expired by the command's clock) frees
        // its SPI for new keys, even if the same batch takes the SPI again at once.
        if let Some(now_ms) = prune_time(command) {
            self.highest.retain(|spi, _| {
                !before.tombstones().spi(*spi).is_some_and(|t| {
                    t.expires_ms < now_ms && state.tombstones().spi(*spi).is_none()
                })
            });
        }
        let mut live = BTreeMap::new();
        for sa in state.sas() {
            for (spi, child) in &sa.children {
                live.insert(*spi, ());
                let now = (sa.id, sa.epoch);
                if self.running.get(spi) != Some(&now)
                    && let Some(highest) = self.highest.get(spi)
                {
                    prop_assert!(
                        child.out_start > *highest,
                        "child {spi:08x} starts at {} in {now:?}, but {highest} was committed before",
                        child.out_start
                    );
                }
                self.running.insert(*spi, now);
                let h = self.highest.entry(*spi).or_default();
                *h = (*h).max(child.out_hwm);
            }
        }
        // A SPI that is neither live nor tombstoned may be taken afresh.
        self.highest
            .retain(|spi, _| live.contains_key(spi) || state.tombstones().spi(*spi).is_some());
        self.running.retain(|spi, _| live.contains_key(spi));
        Ok(())
    }
}

/// The latest clock of a `PruneTombstones` in the command, if it has one.
fn prune_time(command: &Command) -> Option<u64> {
    match command {
        Command::PruneTombstones { now_ms } => Some(*now_ms),
        Command::Batch(commands) => commands.iter().filter_map(prune_time).max(),
        _ => None,
    }
}

/// SAs a command deletes (a batch may delete an SA and create another with the same id).
fn deleted_by(command: &Command) -> Vec<SaId> {
    match command {
        Command::DeleteSa { sa, .. } => vec![*sa],
        Command::Batch(commands) => commands.iter().flat_map(deleted_by).collect(),
        _ => vec![],
    }
}

/// The blob counts per key (kept incrementally by `apply`) equal a recount over every record,
/// and the index of SAs per key names exactly the SAs with a blob under that key.
fn check_key_counts(state: &State) -> Result<(), TestCaseError> {
    let mut counts: BTreeMap<KeyId, u64> = BTreeMap::new();
    let mut users: BTreeMap<KeyId, Vec<SaId>> = BTreeMap::new();
    for sa in state.sas() {
        let blobs = std::iter::once(&sa.keys).chain(sa.children.values().map(|c| &c.keys));
        for key in blobs.filter_map(SealedKeys::key_id) {
            *counts.entry(key).or_default() += 1;
            let list = users.entry(key).or_default();
            if list.last() != Some(&sa.id) {
                list.push(sa.id);
            }
        }
    }
    prop_assert_eq!(&counts, state.keys().blob_counts());
    for (key, sas) in &users {
        let indexed: Vec<SaId> = state.keys().sas_under(*key, SaId(0)).collect();
        prop_assert_eq!(&indexed, sas);
        prop_assert_eq!(state.keys().sas_with(*key), sas.len() as u64);
        prop_assert!(
            state.keys().is_live(*key),
            "blobs under key {} which is not live",
            key
        );
    }
    prop_assert!(state.keys().is_live(state.keys().active()));
    Ok(())
}

/// Counters of one SA that must never move backwards while the SA exists.
fn check_monotonic(before: &State, after: &State, command: &Command) -> Result<(), TestCaseError> {
    let deleted = deleted_by(command);
    for old in before.sas() {
        if deleted.contains(&old.id) {
            continue;
        }
        let Some(new) = after.sa(old.id) else {
            continue;
        };
        prop_assert!(new.epoch >= old.epoch, "epoch regressed on {}", old.id);
        prop_assert!(new.rekey_generation >= old.rekey_generation);
        // An IKE rekey in place starts the new IKE SA's message IDs at 0 (RFC 7296 §2.8).
        if new.rekey_generation == old.rekey_generation {
            prop_assert!(
                new.msg.next_peer_request >= old.msg.next_peer_request,
                "peer message ID regressed on {}",
                old.id
            );
            prop_assert!(
                new.msg.next_local_request >= old.msg.next_local_request,
                "local message ID regressed on {}",
                old.id
            );
        }
        for (spi, child) in &old.children {
            // A child keeps its counters wherever it lives (it may move to a rekeyed IKE SA).
            if let Some((sa, now)) = after.child(*spi) {
                if deleted.contains(&sa.id) {
                    continue;
                }
                prop_assert!(
                    now.out_hwm >= child.out_hwm,
                    "out_hwm regressed on {spi:08x}"
                );
                // A change of owner starts the new range above the old mark.
                if sa.epoch != old.epoch && sa.id == old.id {
                    prop_assert!(
                        now.out_start > child.out_hwm,
                        "the new owner's range overlaps the old one on {spi:08x}"
                    );
                }
                prop_assert!(now.in_checkpoint >= child.in_checkpoint);
                prop_assert!(now.rekey_generation >= child.rekey_generation);
                if !child.suite.esn {
                    prop_assert!(now.out_hwm <= u64::from(u32::MAX));
                }
            }
        }
    }
    Ok(())
}

/// The change feed's rule: every SA whose record differs after a command is named, with the
/// kinds of what differs (owner or epoch, children and their leases, the peer, existence); the
/// node's services act on the feed alone, so a missed change is a child that never stops.
fn check_change_feed(
    before: &State,
    after: &State,
    command: &Command,
    response: &evpc_raft_store::Response,
) -> Result<(), TestCaseError> {
    let mut named: Vec<(SaId, ChangeKinds)> = Vec::new();
    changes(command, response, &mut named);
    let kinds_of = |id: SaId| {
        named
            .iter()
            .filter(|(sa, _)| *sa == id)
            .fold(ChangeKinds::NONE, |k, (_, kinds)| k | *kinds)
    };
    let ids: std::collections::BTreeSet<SaId> =
        before.sas().chain(after.sas()).map(|sa| sa.id).collect();
    for id in ids {
        let (old, new) = (before.sa(id), after.sa(id));
        if old == new {
            continue;
        }
        let kinds = kinds_of(id);
        let need = |kind: ChangeKinds, what: &str| -> Result<(), TestCaseError> {
            if kinds.intersects(kind) {
                Ok(())
            } else {
                Err(TestCaseError::fail(format!(
                    "{command}: SA {id} {what}, but the change feed says {kinds:?}"
                )))
            }
        };
        match (old, new) {
            (None, Some(_)) => need(ChangeKinds::CREATED, "appeared")?,
            (Some(_), None) => need(ChangeKinds::REMOVED, "went")?,
            (Some(old), Some(new)) => {
                if (old.owner, old.epoch) != (new.owner, new.epoch) {
                    need(ChangeKinds::OWNER, "changed owner or epoch")?;
                }
                if old.children.keys().ne(new.children.keys()) {
                    need(ChangeKinds::CHILDREN, "changed children")?;
                }
                let lease_moved = old.children.values().any(|c| {
                    new.children.get(&c.in_spi).is_some_and(|n| {
                        (n.out_start, n.out_hwm, n.in_checkpoint)
                            != (c.out_start, c.out_hwm, c.in_checkpoint)
                    })
                });
                if lease_moved {
                    need(ChangeKinds::LEASE, "moved a child's lease or checkpoint")?;
                }
                if old.peer != new.peer {
                    need(ChangeKinds::PEER, "changed peer")?;
                }
                if kinds.is_empty() {
                    need(ChangeKinds::NONE, "changed")?;
                }
            }
            (None, None) => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_never_break_an_invariant(ops in proptest::collection::vec(op(), 1..60)) {
        let mut state = common::cluster(3);
        let mut harness = Harness::default();
        let mut ledger = Ledger::default();
        ledger.check(&state, &state, &Command::Batch(vec![]))?;
        let mut accepted = 0;
        for op in &ops {
            let command = to_command(&state, &harness, op);
            let before = state.clone();
            let response = apply(&mut state, &command);
            if let Err(rejection) = &response {
                prop_assert_eq!(&state, &before, "refused ({}) but changed the state", rejection);
            } else {
                accepted += 1;
            }
            // Every invariant after every command: a bad entry must never reach a snapshot.
            if let Err(broken) = state.check_invariants() {
                return Err(TestCaseError::fail(format!("after {command}: {broken}")));
            }
            check_monotonic(&before, &state, &command)?;
            check_change_feed(&before, &state, &command, &response)?;
            check_key_counts(&state)?;
            ledger.check(&before, &state, &command)?;
            removed_by(&response, &mut harness.exported);
        }
        // Not a vacuous run: the generators must reach accepted commands.
        prop_assume!(accepted > 0);
    }

    #[test]
    fn applying_the_same_log_twice_gives_identical_bytes(ops in proptest::collection::vec(op(), 1..60)) {
        let mut first = common::cluster(3);
        let mut harness = Harness::default();
        let mut log = Vec::new();
        let mut responses = Vec::new();
        for op in &ops {
            let command = to_command(&first, &harness, op);
            let response = apply(&mut first, &command);
            removed_by(&response, &mut harness.exported);
            responses.push(response);
            log.push(command);
        }
        let mut second = common::cluster(3);
        for (command, response) in log.iter().zip(&responses) {
            prop_assert_eq!(&apply(&mut second, command), response);
        }
        prop_assert_eq!(first.canonical_bytes(), second.canonical_bytes());
        prop_assert_eq!(first.digest(), second.digest());
        // And the canonical bytes decode to the same state (snapshots round-trip).
        let decoded: State = postcard::from_bytes(&first.canonical_bytes()).unwrap();
        prop_assert_eq!(decoded, first);
    }
}
