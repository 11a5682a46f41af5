//! Commit before respond: how the IKE engine's state changes reach the replicated log before
//! anything leaves the node.
//!
//! ```text
//!  request ─► owner's IKE engine ─► (response bytes, state change)
//!                                       │
//!        commit_new_sa / commit_changes / commit_delete   (CreateSa, Update, DeleteSa; owner's epoch)
//!                                       │ committed            │ refused (stale epoch, ...)
//!                                       ▼                      ▼
//!                                 send the response      drop it: another node owns the SA
//! ```
//!
//! A retransmitted request reaches whichever node owns the SA now; its engine, restored from the
//! committed record, answers with the stored bytes.
//!
//! Every function here returns only once the command is committed (durable on a quorum) and
//! applied; an error means the response must not be sent. A command from a stale epoch is
//! refused by the state machine, so an owner that lost the SA cannot commit — and so cannot
//! answer — anything for it.

use evpc_raft_store::{Applied, Command, Epoch, IkeSa, Rejection, Response, SaId, SaUpdate};

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

#[cfg(test)]
mod tests {
    use super::*;

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
