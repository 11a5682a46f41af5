//! openraft's storage conformance suite, snapshots of 10k SAs, and recovery from the data
//! directory.

mod common;

use std::io::Cursor;

use evpc_raft_store::raft::{Entry, LogId, SnapshotMeta, StoredMembership};
use evpc_raft_store::{Command, LogStore, SaId, SaUpdate, StateMachineStore, TypeConfig};
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::{EntryPayload, RaftSnapshotBuilder, StorageError};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for SledBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<TypeConfig>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = evpc_raft_store::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_suite_passes() -> Result<(), StorageError<TypeConfig>> {
    Suite::test_all(SledBuilder).await?;
    Ok(())
}

fn log_id(term: u64, index: u64) -> LogId {
    use openraft::vote::RaftLeaderId;
    openraft::LogId::new(openraft::vote::leader_id_adv::LeaderId::new(term, 1), index)
}

fn entry(index: u64, command: Command) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(command),
    }
}

/// The commands that build a 3-node cluster with `n` SAs, each with one child.
fn workload(n: u64) -> Vec<Command> {
    let state = common::cluster(3);
    let mut commands = vec![];
    for node in 1..=3 {
        commands.push(Command::SetNodeState {
            node,
            state: evpc_raft_store::NodeState::Active,
            at_ms: 1,
        });
    }
    commands.push(Command::SetSlots(
        state
            .slots()
            .iter()
            .map(|(slot, node)| evpc_raft_store::SlotAssignment { slot, node })
            .collect(),
    ));
    for id in 1..=n {
        let slot = (id % 1024) as u16;
        commands.push(Command::CreateSa(Box::new(common::sa(
            &state,
            id,
            slot,
            &[id as u32],
        ))));
    }
    for id in 1..=n {
        commands.push(Command::Update {
            sa: SaId(id),
            epoch: evpc_raft_store::Epoch(1),
            updates: vec![
                SaUpdate::PeerRequestAnswered {
                    msg_id: 2,
                    response: vec![vec![id as u8; 200]],
                },
                SaUpdate::SeqLease {
                    in_spi: id as u32,
                    out_hwm: 1000 + id,
                    in_checkpoint: Some(id),
                },
            ],
        });
    }
    commands
}

/// Opens a store again in the same process. Its flusher and purger threads let go of the
/// database just after the last handle is dropped; a restarted process never sees that, an
/// in-process reopen may, so it retries briefly.
async fn reopen(dir: &std::path::Path) -> std::io::Result<(LogStore, StateMachineStore)> {
    let mut reopened = evpc_raft_store::open(dir);
    for _ in 0..100 {
        if reopened.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        reopened = evpc_raft_store::open(dir);
    }
    reopened
}

async fn apply_all(sm: &mut StateMachineStore, commands: Vec<Command>) {
    let entries: Vec<_> = commands
        .into_iter()
        .enumerate()
        .map(|(i, c)| Ok((entry(i as u64 + 1, c), None)))
        .collect();
    sm.apply(futures::stream::iter(entries))
        .await
        .expect("apply");
}

#[tokio::test]
async fn snapshot_of_10k_sas_builds_and_installs_elsewhere() -> anyhow::Result<()> {
    let source_dir = tempfile::tempdir()?;
    let (_, mut source) = evpc_raft_store::open(source_dir.path())?;
    apply_all(&mut source, workload(10_000)).await;
    let digest = source.reader().read().digest();
    assert_eq!(source.reader().read().sa_count(), 10_000);

    let mut builder = source.get_snapshot_builder().await;
    let snapshot = builder.build_snapshot().await?;
    assert_eq!(
        snapshot.meta.last_log_id.as_ref().map(|l| l.index),
        Some(20_004)
    );
    assert!(snapshot.snapshot.get_ref().len() > 10_000 * 200);

    let target_dir = tempfile::tempdir()?;
    let (_, mut target) = evpc_raft_store::open(target_dir.path())?;
    target
        .install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await?;
    assert_eq!(target.reader().read().digest(), digest);
    let (applied, _) = target.applied_state().await?;
    assert_eq!(applied.map(|l| l.index), Some(20_004));

    // The installed snapshot survives a restart of the target.
    drop(target);
    let (_, mut reopened) = reopen(target_dir.path()).await?;
    assert_eq!(reopened.reader().read().digest(), digest);
    let current = reopened
        .get_current_snapshot()
        .await?
        .expect("snapshot kept");
    assert_eq!(current.meta.last_log_id, snapshot.meta.last_log_id);
    Ok(())
}

#[tokio::test]
async fn a_corrupt_snapshot_is_refused_not_installed() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_, mut sm) = evpc_raft_store::open(dir.path())?;
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(1, 5)),
        last_membership: StoredMembership::default(),
    };
    let err = sm
        .install_snapshot(&meta, Cursor::new(vec![0xff; 64]))
        .await
        .expect_err("garbage must be refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData);
    assert_eq!(sm.applied_state().await?.0, None);
    Ok(())
}

#[tokio::test]
async fn log_vote_and_committed_survive_reopening() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let commands = workload(10);
    {
        let (mut log, _) = evpc_raft_store::open(dir.path())?;
        let entries: Vec<_> = commands
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, c)| entry(i as u64 + 1, c))
            .collect();
        // `append` returns once the entries are written; the callback fires once they are
        // durable.
        use openraft::type_config::TypeConfigExt;
        let (tx, rx) = TypeConfig::oneshot();
        log.append(entries, openraft::storage::IOFlushed::signal(tx))
            .await?;
        rx.await??;
        log.save_committed(Some(log_id(1, 7))).await?;
        log.save_vote(&openraft::Vote::new_committed(1, 1)).await?;
    }
    let (mut log, _) = reopen(dir.path()).await?;
    let state = log.get_log_state().await?;
    assert_eq!(state.last_log_id, Some(log_id(1, commands.len() as u64)));
    assert_eq!(log.read_committed().await?, Some(log_id(1, 7)));
    let mut reader = log.get_log_reader().await;
    use openraft::storage::RaftLogReader;
    assert_eq!(
        reader.read_vote().await?,
        Some(openraft::Vote::new_committed(1, 1))
    );
    let read = reader.try_get_log_entries(3..6).await?;
    assert_eq!(read.len(), 3);
    assert_eq!(read[0].payload, EntryPayload::Normal(commands[2].clone()));
    Ok(())
}
