//! Commit before respond: how the IKE engine's state changes reach the replicated log before
//! anything leaves the node.
//!
//! ```text
//!  request ─► owner's IKE engine ─► (response bytes, state change)
//!                                       │
//!                         commit_response / commit_request   (Command::Update, owner's epoch)
//!                                       │ committed            │ refused (stale epoch, ...)
//!                                       ▼                      ▼
//!                                 send the response      drop it: another node owns the SA
//!
//!  retransmitted request (any node that owns the SA now) ─► retransmission(state) ─► stored bytes
//! ```
//!
//! Every function here returns only once the command is committed (durable on a quorum) and
//! applied; an error means the response must not be sent. A command from a stale epoch is
//! refused by the state machine, so an owner that lost the SA cannot commit — and so cannot
//! answer — anything for it.

use evpc_raft_store::{
    Applied, Command, Epoch, IkeSa, Rejection, Response, SaId, SaUpdate, State, StoredMessage,
};

use crate::node::{Node, ProposeError};

/// Proof that a state change is committed: the log index that carries it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[must_use = "the response may only be sent once its state change is committed"]
pub struct Committed {
    /// The log index of the entry.
    pub log_index: u64,
}

/// Why a state change was not committed. The response must not be sent.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The SA moved to another owner (or epoch) meanwhile: this node must stop serving it.
    #[error("IKE SA {sa} moved on: epoch {current}, this node acted in {given}")]
    Fenced {
        /// The SA.
        sa: SaId,
        /// Its epoch now.
        current: Epoch,
        /// The epoch this node acted in.
        given: Epoch,
    },
    /// The state machine refused the change for another reason.
    #[error("refused by the replicated state: {0}")]
    Refused(Rejection),
    /// No leader, or the outcome is unknown: retry (the peer retransmits) after re-reading.
    #[error("not committed: {0}")]
    NotCommitted(#[from] ProposeError),
}

fn first_rejection(response: Response) -> Result<Applied, Rejection> {
    match response? {
        Applied::Batch(results) => {
            for result in results {
                first_rejection(result)?;
            }
            Ok(Applied::Done)
        }
        applied => Ok(applied),
    }
}

async fn commit(node: &Node, command: Command) -> Result<Committed, CommitError> {
    let proposed = node.propose(command).await?;
    match first_rejection(proposed.response) {
        Ok(_) => Ok(Committed {
            log_index: proposed.log_index,
        }),
        Err(Rejection::StaleEpoch { sa, current, given }) => {
            Err(CommitError::Fenced { sa, current, given })
        }
        Err(rejection) => Err(CommitError::Refused(rejection)),
    }
}

/// Commits an SA the engine has just established (after IKE_AUTH), with its first child SAs
/// and inner address, before the IKE_AUTH response leaves.
pub async fn commit_new_sa(node: &Node, sa: IkeSa) -> Result<Committed, CommitError> {
    commit(node, Command::CreateSa(Box::new(sa))).await
}

/// Commits the answer to the peer's request `msg_id` — the exact response datagrams — together
/// with the state change it makes (`changes`: children created, rekeyed or deleted, new keys,
/// times), atomically.
pub async fn commit_response(
    node: &Node,
    sa: SaId,
    epoch: Epoch,
    msg_id: u32,
    response: Vec<Vec<u8>>,
    changes: Vec<SaUpdate>,
) -> Result<Committed, CommitError> {
    let mut updates = vec![SaUpdate::PeerRequestAnswered { msg_id, response }];
    updates.extend(changes);
    commit(node, Command::Update { sa, epoch, updates }).await
}

/// Commits a request of our own (DPD, rekey, delete) before it is sent, so a new owner can
/// resend exactly these bytes.
pub async fn commit_request(
    node: &Node,
    sa: SaId,
    epoch: Epoch,
    request: StoredMessage,
    changes: Vec<SaUpdate>,
) -> Result<Committed, CommitError> {
    let mut updates = vec![SaUpdate::LocalRequestStarted(request)];
    updates.extend(changes);
    commit(node, Command::Update { sa, epoch, updates }).await
}

/// Commits the peer's answer to our request `msg_id` and what it changed.
pub async fn commit_request_completed(
    node: &Node,
    sa: SaId,
    epoch: Epoch,
    msg_id: u32,
    changes: Vec<SaUpdate>,
) -> Result<Committed, CommitError> {
    let mut updates = vec![SaUpdate::LocalRequestCompleted { msg_id }];
    updates.extend(changes);
    commit(node, Command::Update { sa, epoch, updates }).await
}

/// Commits other changes of an SA (timers, peer activity, keys) that need no message.
pub async fn commit_changes(
    node: &Node,
    sa: SaId,
    epoch: Epoch,
    changes: Vec<SaUpdate>,
) -> Result<Committed, CommitError> {
    commit(
        node,
        Command::Update {
            sa,
            epoch,
            updates: changes,
        },
    )
    .await
}

/// Commits the removal of an SA (after a delete exchange, or expiry).
pub async fn commit_delete(node: &Node, sa: SaId, epoch: Epoch) -> Result<Committed, CommitError> {
    commit(
        node,
        Command::DeleteSa {
            sa,
            epoch: Some(epoch),
        },
    )
    .await
}

/// The committed response to resend when the peer retransmits request `msg_id` of `sa`: the
/// identical datagrams, whichever node committed them. `None` if `msg_id` is not the last
/// request answered.
pub fn retransmission(state: &State, sa: SaId, msg_id: u32) -> Option<Vec<Vec<u8>>> {
    let stored = state.sa(sa)?.last_response.as_ref()?;
    (stored.msg_id == msg_id).then(|| stored.datagrams.clone())
}

/// The committed request of ours still waiting for an answer, to resend after a takeover.
pub fn pending_request(state: &State, sa: SaId) -> Option<StoredMessage> {
    state.sa(sa)?.pending_request.clone()
}

#[cfg(test)]
mod tests {
    use super::*;
    use evpc_raft_store::apply;

    #[test]
    fn retransmissions_come_from_the_committed_response_only() {
        let mut sa = crate::ownership::test_support::sa(9, 0x2000);
        sa.owner = 1;
        sa.msg.next_peer_request = 5;
        let mut state = crate::ownership::test_support::state_with_sa(&sa);
        assert_eq!(
            retransmission(&state, SaId(9), 4),
            None,
            "nothing answered yet"
        );
        apply(
            &mut state,
            &Command::Update {
                sa: SaId(9),
                epoch: Epoch::FIRST,
                updates: vec![SaUpdate::PeerRequestAnswered {
                    msg_id: 5,
                    response: vec![vec![1, 2, 3], vec![4]],
                }],
            },
        )
        .unwrap();
        assert_eq!(
            retransmission(&state, SaId(9), 5),
            Some(vec![vec![1, 2, 3], vec![4]])
        );
        assert_eq!(
            retransmission(&state, SaId(9), 4),
            None,
            "only the last one"
        );
        assert_eq!(retransmission(&state, SaId(8), 5), None);
        assert_eq!(pending_request(&state, SaId(9)), None);
    }

    #[test]
    fn stale_epochs_surface_as_fenced() {
        let refused: Response = Err(Rejection::StaleEpoch {
            sa: SaId(1),
            current: Epoch(3),
            given: Epoch(2),
        });
        assert!(matches!(
            first_rejection(refused),
            Err(Rejection::StaleEpoch { .. })
        ));
        let batch: Response = Ok(Applied::Batch(vec![
            Ok(Applied::Done),
            Err(Rejection::UnknownSa(SaId(2))),
        ]));
        assert_eq!(first_rejection(batch), Err(Rejection::UnknownSa(SaId(2))));
    }
}
