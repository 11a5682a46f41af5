//! One IKE SA on its owner: a thin async task around the pure [`SaMachine`]. It owns the SA's
//! queue, sleeps until the machine's next deadline, and runs the machine's actions: reads the
//! state, commits through [`commit`] (the gated datagrams leave only after the commit
//! succeeded), sends, routes SPIs, hands out pool addresses, stops.
//!
//! ```text
//!  Input::Datagram ─► on_datagram ─┐                ┌─ Send ───────────────────────► socket
//!  sleep(next_timeout) ─► on_timeout ┼─► SaMachine ─┼─ Commit ─► commit::commit_* ─► Raft
//!  Input::Reconcile ─► on_state ───┘      ▲         │     Ok ─► gated ─► socket
//!                                         │         │     └─► on_committed ─┐
//!                                         └─────────┼─ ReadState / NeedAddress / ...─┘
//!                                                   └─ Routes / HalfOpenDone / Stop ─► registry
//! ```

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evpc_dataplane::ike::IkeDatagram;
use evpc_ike::{Accepted, Datagram, IkeSa, IkeSaSnapshot, Outcome, PendingInit};
use evpc_raft_store::{Command, Epoch, Identity, IkeSa as Record, SaId};
use rand::RngCore;
use tokio::sync::mpsc;

use super::commit::{self, CommitError, Committed};
use super::machine::{self, Action, Params, Proposal, SaKeys, SaMachine};
use super::mapping::{MappingError, open_snapshot};
use super::{Handle, Input, Shared};
use crate::node::now_ms;
use crate::sealing::{ClusterKey, SealError};

/// How the task starts.
#[derive(Debug)]
pub(crate) enum Start {
    /// A half-open SA `Endpoint::accept` just made; `outcome` holds its IKE_SA_INIT answer.
    HalfOpen {
        sa: Box<IkeSa>,
        outcome: Outcome,
        key: (SocketAddr, u64),
    },
    /// An IKE_SA_INIT the router screened and admitted (already routed to this task): the
    /// task computes the Diffie-Hellman (`PendingInit::complete`) and answers, off the
    /// dispatcher.
    Pending {
        pending: Box<PendingInit>,
        key: (SocketAddr, u64),
    },
    /// An SA this node owns in the committed state: restore it, then handle `first`.
    Restore { first: Option<IkeDatagram> },
}

fn rng() -> impl FnMut(&mut [u8]) {
    |buf: &mut [u8]| rand::rng().fill_bytes(buf)
}

fn datagram(d: IkeDatagram) -> Datagram {
    Datagram {
        local: d.local,
        remote: d.remote,
        payload: d.message,
    }
}

/// The node's cluster key, as the machine needs it.
struct NodeKeys(Arc<Shared>);

impl SaKeys for NodeKeys {
    fn sealer(&self) -> Result<Arc<ClusterKey>, SealError> {
        self.0.sealer()
    }

    fn open(&self, record: &Record) -> Result<IkeSaSnapshot, MappingError> {
        open_snapshot(self.0.key(), record)
    }
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    handle: Arc<Handle>,
    rx: mpsc::Receiver<Input>,
    machine: SaMachine,
    /// The SPIs the registry routes to this task.
    spis: BTreeSet<u64>,
    half_open: Option<(SocketAddr, u64)>,
    done: bool,
}

impl Actor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        handle: Arc<Handle>,
        rx: mpsc::Receiver<Input>,
        spis: BTreeSet<u64>,
    ) -> Actor {
        let params = Params {
            me: shared.node.id,
            config: shared.config.clone(),
            initial_lease: shared.initial_lease,
            dns: shared.dns.clone(),
            keys: Arc::new(NodeKeys(shared.clone())),
        };
        Actor {
            machine: SaMachine::new(handle.id, params, spis.clone()),
            shared,
            handle,
            rx,
            spis,
            half_open: None,
            done: false,
        }
    }

    /// Runs until the SA closes, moves to another node, or the node shuts down.
    pub(crate) async fn run(mut self, start: Start) {
        let start = match start {
            Start::Pending { pending, key } => match pending.complete(now_ms(), &mut rng()) {
                Accepted::NewSa(sa, outcome) => Start::HalfOpen { sa, outcome, key },
                Accepted::Reply(reply, why) => {
                    tracing::debug!(from = %key.0, %why, "IKE_SA_INIT refused");
                    self.send(&reply);
                    self.unregister();
                    return;
                }
                Accepted::Dropped(why) => {
                    tracing::debug!(from = %key.0, %why, "IKE_SA_INIT dropped");
                    self.unregister();
                    return;
                }
            },
            start => start,
        };
        let start = match start {
            Start::Pending { .. } => unreachable!("completed above"),
            Start::HalfOpen { sa, outcome, key } => {
                self.half_open = Some(key);
                machine::Start::HalfOpen {
                    engine: sa,
                    outcome,
                }
            }
            Start::Restore { first } => machine::Start::Restore {
                first: first.map(datagram),
            },
        };
        let actions = self.machine.start(now_ms(), &mut rng(), start);
        self.execute(actions).await;
        let mut shutdown = self.shared.shutdown.clone();
        while !self.done {
            let wait = self
                .machine
                .next_timeout()
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms())));
            let actions = tokio::select! {
                biased;
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                input = self.rx.recv() => match input {
                    None => break,
                    Some(Input::Datagram(d)) => self.machine.on_datagram(now_ms(), &mut rng(), datagram(d)),
                    Some(Input::Reconcile) => {
                        let record = self.read_state();
                        self.machine.on_state(now_ms(), &mut rng(), record.as_ref())
                    }
                },
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                    self.machine.on_timeout(now_ms(), &mut rng())
                }
            };
            self.execute(actions).await;
        }
        self.unregister();
    }

    fn read_state(&self) -> Option<Record> {
        let state = self.shared.node.state.read();
        state.sa(self.handle.id).cloned()
    }

    /// Runs the machine's actions in order, and those of its answers after them.
    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let more = match action {
                Action::Send(d) => {
                    self.send(&d);
                    Vec::new()
                }
                Action::Commit { proposal, gated } => {
                    let result = self.commit(proposal).await;
                    if result.is_ok() {
                        for d in &gated {
                            self.send(d);
                        }
                    }
                    self.machine.on_committed(now_ms(), &mut rng(), result)
                }
                Action::Routes(spis) => {
                    self.set_routes(spis);
                    Vec::new()
                }
                Action::HalfOpenDone => {
                    self.forget_half_open();
                    Vec::new()
                }
                Action::NeedAddress(requested) => {
                    let pick = self.shared.pool.as_ref().and_then(|pool| {
                        let state = self.shared.node.state.read();
                        pool.pick(&state, requested)
                    });
                    self.machine.on_address(now_ms(), &mut rng(), pick)
                }
                Action::ReleaseAddress(addr) => {
                    if let Some(pool) = &self.shared.pool {
                        pool.release(addr);
                    }
                    Vec::new()
                }
                Action::DeleteStale {
                    sa,
                    peer,
                    local,
                    established_ms,
                } => {
                    self.drop_stale_sas(sa, &peer, &local, established_ms);
                    Vec::new()
                }
                Action::ReadState => {
                    let record = self.read_state();
                    self.machine.on_state(now_ms(), &mut rng(), record.as_ref())
                }
                Action::Stop => {
                    self.done = true;
                    Vec::new()
                }
            };
            queue.extend(more);
        }
        // The dispatcher fences its nudges by the epoch the machine acts in.
        self.handle
            .epoch
            .store(self.machine.epoch().0, Ordering::Release);
    }

    async fn commit(&self, proposal: Proposal) -> Result<Committed, CommitError> {
        let node = &self.shared.node;
        match proposal {
            Proposal::New(record) => commit::commit_new_sa(node, *record).await,
            Proposal::Changes { sa, epoch, updates } => {
                commit::commit_changes(node, sa, epoch, updates).await
            }
            Proposal::Delete { sa, epoch } => commit::commit_delete(node, sa, epoch).await,
        }
    }

    /// INITIAL_CONTACT (RFC 7296 §2.4): the peer lost its older SAs; delete them in the cluster
    /// (their owners stop them when they apply the delete).
    fn drop_stale_sas(&self, me: SaId, peer: &Identity, local: &Identity, established_ms: u64) {
        let stale: Vec<(SaId, Epoch)> = {
            let state = self.shared.node.state.read();
            state
                .sas_of_peer(peer)
                .filter(|sa| {
                    sa.id != me
                        && &sa.local_id == local
                        && sa.times.established_ms <= established_ms
                })
                .map(|sa| (sa.id, sa.epoch))
                .collect()
        };
        for (sa, epoch) in stale {
            tracing::info!(sa = %sa, replaced_by = %me, peer = %peer, "INITIAL_CONTACT: deleting the peer's older IKE SA");
            let node = self.shared.node.clone();
            tokio::spawn(async move {
                if let Err(e) = node
                    .propose(Command::DeleteSa {
                        sa,
                        epoch: Some(epoch),
                    })
                    .await
                {
                    tracing::warn!(%sa, error = %e, "could not delete a stale IKE SA");
                }
            });
        }
    }

    fn send(&self, d: &Datagram) {
        tracing::debug!(sa = %self.handle.id, to = %d.remote, "tx {}", machine::describe(&d.payload));
        self.shared.send(d);
    }

    /// Routes exactly `spis` to this task.
    fn set_routes(&mut self, spis: BTreeSet<u64>) {
        let task = self.handle.task;
        let mut registry = self.shared.registry();
        for spi in self.spis.difference(&spis) {
            let _ = registry.router.release(task, *spi);
        }
        let added: Vec<u64> = spis.difference(&self.spis).copied().collect();
        if !added.is_empty()
            && let Err(error) = registry.router.insert(task, added)
        {
            // A 64-bit SPI another SA holds: that SA keeps it; this one is not reachable
            // under it (its peer's next exchange fails and it starts again).
            tracing::warn!(sa = %self.handle.id, %error, "IKE SPI not routed");
        }
        drop(registry);
        self.spis = spis;
    }

    /// IKE_AUTH is committed: the SA no longer counts as half-open (cap, source budget).
    fn forget_half_open(&mut self) {
        if self.half_open.take().is_some() {
            self.shared.registry().router.established(self.handle.task);
        }
    }

    fn unregister(&mut self) {
        self.half_open = None;
        self.spis.clear();
        let mut registry = self.shared.registry();
        registry.router.remove(self.handle.task);
        registry.tasks.remove(&self.handle.task);
        if registry
            .by_id
            .get(&self.handle.id)
            .is_some_and(|h| Arc::ptr_eq(h, &self.handle))
        {
            registry.by_id.remove(&self.handle.id);
        }
    }
}
