//! The leader's resealer: after a key rotation ([`crate::rotation`]) it moves every blob still
//! sealed under an older cluster key to the active one, a bounded number of SAs per round, and
//! retires an old key once no blob is left under it; every node then deletes retired keys from
//! its keyring file ([`drop_obsolete_keys`]).
//!
//! - **Finding the work** costs no walk over the SAs: the state keeps, incrementally in
//!   `apply`, the SAs with a blob under each key (`KeyRegistry::sas_under`) and the number of
//!   blobs per key. A round looks at the old keys (a handful at most), and at most `budget` SAs.
//! - **Never racing the owner.** Each replaced blob is a compare-and-swap on the SHA-256 of the
//!   blob that was read (`Command::ResealKeys`): if the owner's IKE gateway committed a newer
//!   engine state meanwhile (sealed under whichever key it had applied), the reseal of that blob
//!   is skipped and the newer blob stays; if it is still under an old key, a later round
//!   picks it up again.
//! - **Retiring.** A key with no blob left is retired only after it stayed empty for
//!   [`RETIRE_GRACE_MS`]: a node that has not yet applied the activation may still seal one
//!   more blob under the old key, and that blob must still be accepted (and resealed) rather
//!   than refused for naming a retired key.
//! - **A blob that does not open** (a key this node lacks, a corrupt blob) is skipped and
//!   reported, never retried in a tight loop ahead of the others: a cursor per key goes round
//!   the index. Its key is then never retired, which `evpcctl status` shows.
//!
//! [`Resealer::plan`] is sans-IO (state, keyring, clock and nonces are inputs). [`round`] runs
//! its two halves on the node — [`Resealer::select`] under the state's read lock (index lookups
//! and copies of at most `budget` records), [`Resealer::reseal`] (the crypto) without it, so
//! `apply` never waits for AES — and proposes the result.

use std::collections::{BTreeMap, BTreeSet};

use evpc_raft_store::{
    BlobRef, Command, Fingerprint, IkeSa, KeyId, Reseal, SaId, SealedKeys, State,
    limits::MAX_RESEALS_PER_COMMAND,
};
use sha2::{Digest, Sha256};

use crate::node::Node;
use crate::sealing::{Binding, ClusterKey, Keyring, SealError};

/// How long an old key must have had no blob before the leader retires it.
pub const RETIRE_GRACE_MS: u64 = 2_000;

/// At most this many unopenable blobs are remembered, so each is reported once.
const MAX_REPORTED: usize = 1024;

/// The resealer's memory between rounds (lost with leadership; nothing depends on it).
#[derive(Debug, Default)]
pub struct Resealer {
    /// Per old key, the SA id to continue from.
    cursors: BTreeMap<KeyId, SaId>,
    /// Per old key, since when (monotonic ms) it has had no blob.
    empty_since: BTreeMap<KeyId, u64>,
    /// Blobs already reported as unopenable.
    reported: BTreeSet<(KeyId, SaId)>,
}

/// One round's plan.
#[derive(Debug, Default)]
pub struct Round {
    /// What to propose (reseals and retirements), if anything.
    pub command: Option<Command>,
    /// Blobs that could not be opened (or no sealing key), newly seen.
    pub failures: Vec<(Option<SaId>, KeyId, SealError)>,
    /// SAs whose blobs the command reseals.
    pub sas: usize,
}

fn sha256(blob: &SealedKeys) -> [u8; 32] {
    Sha256::digest(&blob.0).into()
}

/// The reseals that move `sa`'s blobs under `old` to `sealer`, or why one does not open.
fn reseal_sa(
    sa: &IkeSa,
    old: KeyId,
    keyring: &Keyring,
    sealer: &ClusterKey,
    nonce: &mut dyn FnMut() -> [u8; 12],
) -> Result<Vec<Reseal>, SealError> {
    let mut out = Vec::new();
    let mut one = |blob_ref: BlobRef, binding: Binding, blob: &SealedKeys| {
        if blob.key_id() != Some(old) {
            return Ok(());
        }
        let plain = keyring.open(&binding, sa.epoch, blob)?;
        out.push(Reseal {
            sa: sa.id,
            blob: blob_ref,
            expect_sha256: sha256(blob),
            sealed: sealer.seal(&binding, sa.epoch, &plain, nonce()),
        });
        Ok::<(), SealError>(())
    };
    one(
        BlobRef::Ike,
        Binding::ike(sa.id, sa.rekey_generation),
        &sa.keys,
    )?;
    for child in sa.children.values() {
        one(
            BlobRef::Child(child.in_spi),
            Binding::child(sa.id, child),
            &child.keys,
        )?;
    }
    Ok(out)
}

/// What one round works on, copied out of the state so that the crypto runs without the
/// state's lock held (`apply` waits for it).
#[derive(Debug)]
pub struct Selection {
    active: KeyId,
    fingerprint: Option<Fingerprint>,
    retire: Vec<KeyId>,
    work: Vec<(KeyId, IkeSa)>,
}

impl Resealer {
    /// Plans one round: reseal the blobs of at most `budget` SAs still on old keys, and retire
    /// the old keys that have been empty for [`RETIRE_GRACE_MS`] by `now_ms` (monotonic).
    pub fn plan(
        &mut self,
        state: &State,
        keyring: &Keyring,
        budget: usize,
        now_ms: u64,
        nonce: &mut dyn FnMut() -> [u8; 12],
    ) -> Round {
        let selection = self.select(state, budget, now_ms);
        self.reseal(selection, keyring, nonce)
    }

    /// The first half of [`Resealer::plan`], under the state's lock: O(old keys + budget · log
    /// n), copying at most `budget` records.
    pub fn select(&mut self, state: &State, budget: usize, now_ms: u64) -> Selection {
        let keys = state.keys();
        let active = keys.active();
        let old: Vec<KeyId> = keys.live().filter(|k| *k != active).collect();
        self.cursors.retain(|k, _| old.contains(k));
        self.empty_since.retain(|k, _| old.contains(k));
        let mut selection = Selection {
            active,
            fingerprint: keys.fingerprint(active),
            retire: Vec::new(),
            work: Vec::new(),
        };
        let (mut budget, mut blobs) = (budget, 0);
        for key in old {
            if keys.blobs_under(key) == 0 {
                let since = *self.empty_since.entry(key).or_insert(now_ms);
                if now_ms.saturating_sub(since) >= RETIRE_GRACE_MS {
                    selection.retire.push(key);
                }
                continue;
            }
            self.empty_since.remove(&key);
            let from = self.cursors.get(&key).copied().unwrap_or(SaId(0));
            // From the cursor to the end, then from the start: each SA at most once a round.
            let ids: Vec<SaId> = keys
                .sas_under(key, from)
                .chain(keys.sas_under(key, SaId(0)).take_while(|id| *id < from))
                .take(budget)
                .collect();
            for id in ids {
                let Some(sa) = state.sa(id) else { continue };
                if blobs + 1 + sa.children.len() > MAX_RESEALS_PER_COMMAND {
                    break;
                }
                blobs += 1 + sa.children.len();
                budget -= 1;
                self.cursors.insert(key, SaId(id.0.wrapping_add(1)));
                selection.work.push((key, sa.clone()));
            }
        }
        selection
    }

    /// The second half of [`Resealer::plan`], without the state's lock: open and seal.
    pub fn reseal(
        &mut self,
        selection: Selection,
        keyring: &Keyring,
        nonce: &mut dyn FnMut() -> [u8; 12],
    ) -> Round {
        let mut round = Round::default();
        let mut reseals = Vec::new();
        if !selection.work.is_empty() {
            match keyring.sealer_for(selection.active, selection.fingerprint) {
                Ok(sealer) => {
                    for (key, sa) in &selection.work {
                        match reseal_sa(sa, *key, keyring, &sealer, nonce) {
                            Ok(mut r) => {
                                round.sas += 1;
                                reseals.append(&mut r);
                            }
                            Err(e) => {
                                if self.reported.len() < MAX_REPORTED
                                    && self.reported.insert((*key, sa.id))
                                {
                                    round.failures.push((Some(sa.id), *key, e));
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    if self.reported.insert((selection.active, SaId(0))) {
                        round.failures.push((None, selection.active, e));
                    }
                }
            }
        }
        let mut commands: Vec<Command> = selection
            .retire
            .into_iter()
            .map(Command::RetireKey)
            .collect();
        if !reseals.is_empty() {
            commands.insert(0, Command::ResealKeys(reseals));
        }
        round.command = match commands.len() {
            0 => None,
            1 => commands.pop(),
            _ => Some(Command::Batch(commands)),
        };
        round
    }
}

/// One round on the leader: select under the state's read lock, reseal outside it, propose.
pub async fn round(node: &Node, resealer: &mut Resealer, budget: usize) {
    let Some(keyring) = node.keyring.as_ref() else {
        return;
    };
    let selection = {
        let state = node.state.read();
        resealer.select(&state, budget, node.gate.now_ms())
    };
    let planned = resealer.reseal(selection, keyring, &mut rand::random);
    for (sa, key, error) in &planned.failures {
        match sa {
            Some(sa) => tracing::error!(
                %sa, %key, %error,
                "cannot reseal a blob still under an old cluster key; the key stays live until it is resealed or the SA is gone"
            ),
            None => tracing::error!(%key, %error, "cannot reseal: no usable active cluster key"),
        }
    }
    let Some(command) = planned.command else {
        return;
    };
    tracing::debug!(%command, sas = planned.sas, "resealing under the active cluster key");
    match node.propose_local(command).await {
        Ok(p) => {
            tracing::debug!(log_index = p.log_index, response = ?p.response, "reseal round committed")
        }
        Err(e) => tracing::debug!(error = %e, "reseal round not committed"),
    }
}

/// Deletes from this node's keyring (file and memory) the keys the cluster retired, and keys a
/// rotation installed but never activated. Runs on every node, cheaply: it compares a handful of
/// ids with the state.
pub async fn drop_obsolete_keys(node: &std::sync::Arc<Node>) {
    let Some(keyring) = node.keyring.as_ref() else {
        return;
    };
    let obsolete = {
        let state = node.state.read();
        keyring.obsolete(&state)
    };
    if obsolete.is_empty() {
        return;
    }
    let worker = node.clone();
    let ids = obsolete.clone();
    let removed = tokio::task::spawn_blocking(move || match worker.keyring.as_ref() {
        Some(keyring) => keyring.remove(&ids),
        None => Ok(()),
    })
    .await;
    match removed {
        Ok(Ok(())) => tracing::info!(
            keys = ?obsolete,
            "retired cluster keys deleted from the keyring file"
        ),
        Ok(Err(e)) => {
            tracing::warn!(keys = ?obsolete, error = %e, "cannot delete retired cluster keys")
        }
        Err(e) => tracing::warn!(error = %e, "the keyring task failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ownership::test_support::{sa, state_with_sa};
    use evpc_raft_store::{Applied, Epoch, apply};

    fn nonce() -> impl FnMut() -> [u8; 12] {
        let mut n = 0u64;
        move || {
            n += 1;
            let mut out = [0u8; 12];
            out[4..].copy_from_slice(&n.to_be_bytes());
            out
        }
    }

    /// A state with `count` SAs whose blobs are sealed under key 1, and a keyring with keys 1
    /// and 2 where 2 is active.
    fn rotated(count: u64) -> (State, Keyring) {
        let ring = Keyring::in_memory([
            ClusterKey::from_bytes(KeyId(1), &[1; 32]),
            ClusterKey::from_bytes(KeyId(2), &[2; 32]),
        ]);
        let k1 = ring.get(KeyId(1)).unwrap();
        let mut n = nonce();
        let sealed = |mut record: evpc_raft_store::IkeSa, n: &mut dyn FnMut() -> [u8; 12]| {
            record.keys = k1.seal(
                &Binding::ike(record.id, record.rekey_generation),
                record.epoch,
                b"engine",
                n(),
            );
            for child in record.children.values_mut() {
                let binding = Binding::child(record.id, child);
                child.keys = k1.seal(&binding, record.epoch, b"child", n());
            }
            record
        };
        let mut first = sa(1, 0x100);
        first.owner = 1;
        let mut state = state_with_sa(&sealed(first, &mut n));
        for i in 2..=count {
            let mut record = sa(i, 0x100 + i as u32);
            record.owner = 1;
            record.slot = state.sa(evpc_raft_store::SaId(1)).unwrap().slot;
            let record = sealed(record, &mut n);
            assert!(apply(&mut state, &Command::CreateSa(Box::new(record))).is_ok());
        }
        let fingerprint = ring.get(KeyId(2)).unwrap().fingerprint();
        apply(
            &mut state,
            &Command::ActivateKey {
                key: KeyId(2),
                fingerprint,
            },
        )
        .unwrap();
        (state, ring)
    }

    #[test]
    fn old_blobs_move_at_the_budget_and_the_empty_key_is_retired_after_the_grace() {
        let (mut state, ring) = rotated(5);
        assert_eq!(state.keys().blobs_under(KeyId(1)), 10);
        let mut resealer = Resealer::default();
        let mut n = nonce();
        let mut now = 0;
        let mut rounds = 0;
        while state.keys().blobs_under(KeyId(1)) > 0 {
            let planned = resealer.plan(&state, &ring, 2, now, &mut n);
            assert!(planned.failures.is_empty(), "{:?}", planned.failures);
            assert!(planned.sas <= 2);
            let command = planned.command.expect("work left");
            assert!(matches!(
                apply(&mut state, &command),
                Ok(Applied::Resealed { stale: 0, .. })
            ));
            state.check_invariants().unwrap();
            rounds += 1;
            now += 50;
        }
        assert_eq!(rounds, 3, "5 SAs, 2 a round");
        assert_eq!(state.keys().blobs_under(KeyId(2)), 10);
        // Every resealed blob opens under key 2 only.
        let only2 = Keyring::in_memory([ClusterKey::from_bytes(KeyId(2), &[2; 32])]);
        for record in state.sas() {
            let plain = only2
                .open(
                    &Binding::ike(record.id, record.rekey_generation),
                    record.epoch,
                    &record.keys,
                )
                .unwrap();
            assert_eq!(&*plain, b"engine");
            for child in record.children.values() {
                let plain = only2
                    .open(&Binding::child(record.id, child), record.epoch, &child.keys)
                    .unwrap();
                assert_eq!(&*plain, b"child");
            }
        }
        // Empty now, but retired only after the grace.
        assert!(
            resealer
                .plan(&state, &ring, 2, now, &mut n)
                .command
                .is_none()
        );
        assert!(
            resealer
                .plan(&state, &ring, 2, now + RETIRE_GRACE_MS - 1, &mut n)
                .command
                .is_none()
        );
        let retire = resealer
            .plan(&state, &ring, 2, now + RETIRE_GRACE_MS, &mut n)
            .command
            .unwrap();
        assert_eq!(retire, Command::RetireKey(KeyId(1)));
        apply(&mut state, &retire).unwrap();
        assert_eq!(ring.obsolete(&state), vec![KeyId(1)]);
        assert!(
            resealer
                .plan(&state, &ring, 2, now + 10_000, &mut n)
                .command
                .is_none()
        );
    }

    #[test]
    fn a_second_rotation_before_the_first_drained_moves_both_old_keys() {
        let (mut state, _) = rotated(4);
        let ring = Keyring::in_memory([
            ClusterKey::from_bytes(KeyId(1), &[1; 32]),
            ClusterKey::from_bytes(KeyId(2), &[2; 32]),
            ClusterKey::from_bytes(KeyId(3), &[3; 32]),
        ]);
        let mut resealer = Resealer::default();
        let mut n = nonce();
        // Half the SAs move to key 2, then key 3 is activated.
        let command = resealer.plan(&state, &ring, 2, 0, &mut n).command.unwrap();
        apply(&mut state, &command).unwrap();
        assert_eq!(state.keys().blobs_under(KeyId(2)), 4);
        let fingerprint = ring.get(KeyId(3)).unwrap().fingerprint();
        apply(
            &mut state,
            &Command::ActivateKey {
                key: KeyId(3),
                fingerprint,
            },
        )
        .unwrap();
        let mut now = 50;
        while state.keys().live().count() > 1 {
            if let Some(command) = resealer.plan(&state, &ring, 2, now, &mut n).command {
                apply(&mut state, &command).unwrap();
                state.check_invariants().unwrap();
            }
            now += 500;
            assert!(now < 60_000, "does not settle: {:?}", state.keys());
        }
        assert_eq!(state.keys().blobs_under(KeyId(3)), 8);
        assert_eq!(
            state.keys().retired().iter().copied().collect::<Vec<_>>(),
            [KeyId(1), KeyId(2)]
        );
    }

    #[test]
    fn an_owner_update_in_between_wins_over_the_reseal() {
        let (mut state, ring) = rotated(1);
        let mut resealer = Resealer::default();
        let command = resealer
            .plan(&state, &ring, 10, 0, &mut nonce())
            .command
            .unwrap();
        // The owner commits a newer engine state (still under key 1: it had not applied the
        // activation yet) before the reseal lands.
        let record = state.sa(SaId(1)).unwrap().clone();
        let newer = ring.get(KeyId(1)).unwrap().seal(
            &Binding::ike(record.id, record.rekey_generation),
            record.epoch,
            b"newer engine",
            [9; 12],
        );
        apply(
            &mut state,
            &Command::Update {
                sa: record.id,
                epoch: record.epoch,
                updates: vec![evpc_raft_store::SaUpdate::Keys(newer.clone())],
            },
        )
        .unwrap();
        assert_eq!(
            apply(&mut state, &command),
            Ok(Applied::Resealed {
                replaced: 1,
                stale: 1
            }),
            "the child is resealed, the engine state is not"
        );
        assert_eq!(state.sa(SaId(1)).unwrap().keys, newer);
        // The next round reseals the newer blob.
        let again = resealer
            .plan(&state, &ring, 10, 50, &mut nonce())
            .command
            .unwrap();
        apply(&mut state, &again).unwrap();
        let record = state.sa(SaId(1)).unwrap();
        assert_eq!(record.keys.key_id(), Some(KeyId(2)));
        let plain = ring
            .open(
                &Binding::ike(record.id, record.rekey_generation),
                record.epoch,
                &record.keys,
            )
            .unwrap();
        assert_eq!(&*plain, b"newer engine");
        assert_eq!(record.epoch, Epoch::FIRST);
    }

    #[test]
    fn a_blob_that_does_not_open_is_reported_once_and_does_not_block_the_others() {
        let (mut state, _) = rotated(3);
        // This leader lost key 1's material for SA 1's blobs: a keyring with another key 1.
        let ring = Keyring::in_memory([
            ClusterKey::from_bytes(KeyId(1), &[1; 32]),
            ClusterKey::from_bytes(KeyId(2), &[2; 32]),
        ]);
        let mut record = state.sa(SaId(1)).unwrap().clone();
        record.keys = ClusterKey::from_bytes(KeyId(1), &[7; 32]).seal(
            &Binding::ike(record.id, record.rekey_generation),
            record.epoch,
            b"x",
            [1; 12],
        );
        apply(
            &mut state,
            &Command::Update {
                sa: record.id,
                epoch: record.epoch,
                updates: vec![evpc_raft_store::SaUpdate::Keys(record.keys.clone())],
            },
        )
        .unwrap();
        let mut resealer = Resealer::default();
        let mut failures = 0;
        for round in 0..6 {
            let planned = resealer.plan(&state, &ring, 1, round * 50, &mut nonce());
            failures += planned.failures.len();
            if let Some(command) = planned.command {
                apply(&mut state, &command).unwrap();
            }
        }
        assert_eq!(failures, 1, "reported once");
        assert_eq!(
            state.keys().blobs_under(KeyId(1)),
            2,
            "only the broken SA's blobs are left"
        );
        assert!(
            state.keys().sas_under(KeyId(1), SaId(0)).eq([SaId(1)]),
            "and the index says which SA it is"
        );
    }
}
