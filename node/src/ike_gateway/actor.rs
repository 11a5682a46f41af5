//! One IKE SA on its owner: a task that holds the engine ([`IkeSa`]), feeds it datagrams and
//! timers one at a time, commits each state change before anything it gates leaves, and
//! restores the engine from the committed record when it has to (takeover, failed commit).
//!
//! ```text
//!  Input::Datagram ─┐                     ┌─ outcome.send ──────────────────────► socket
//!  timer (engine) ──┼─► engine ─► Outcome ┼─ outcome.commit ─► Raft (commit_new_sa /
//!  Input::Reconcile ┘                     │                   commit_changes / commit_delete)
//!                                         │        └─ committed ─► gated datagrams ─► socket
//!                                         └─ events ─► routes (rekeyed SPIs), pool, close
//! ```

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evpc_dataplane::ike::IkeDatagram;
use evpc_ike::wire::Header;
use evpc_ike::{Accepted, Datagram, Event, IkeSa, InnerAddress, Outcome, PendingInit, StateChange};
use evpc_raft_store::{Command, Epoch, IkeSa as Record, Rejection};
use rand::RngCore;
use tokio::sync::mpsc;

use super::mapping::{Mapper, MappingError, open_snapshot};
use super::{Handle, Input, Shared};
use crate::exchange::{self, CommitError, Committed};
use crate::node::now_ms;

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

/// Why an outcome could not be completed. Nothing it gated was sent.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

/// Tries to commit a new SA again after a failure this many times.
const CREATE_ATTEMPTS: u32 = 8;
/// After a failed commit, restore from the committed record after this long.
const RESTORE_RETRY_MS: u64 = 300;

fn rng() -> impl FnMut(&mut [u8]) {
    |buf: &mut [u8]| rand::rng().fill_bytes(buf)
}

fn describe(message: &[u8]) -> String {
    match Header::peek(message) {
        Some(h) => format!(
            "{:?} {} {}",
            h.exchange,
            if h.response { "response" } else { "request" },
            h.message_id
        ),
        None => "unparsable".into(),
    }
}

pub(crate) struct Actor {
    shared: Arc<Shared>,
    handle: Arc<Handle>,
    rx: mpsc::Receiver<Input>,
    engine: Option<IkeSa>,
    /// The record as committed (`None` while half-open).
    committed: Option<Record>,
    epoch: Epoch,
    spis: BTreeSet<u64>,
    half_open: Option<(SocketAddr, u64)>,
    /// Restore from the committed record at this wall-clock time (after a failed commit).
    restore_at: Option<u64>,
    /// The peer sent INITIAL_CONTACT: older SAs of its identity are stale.
    initial_contact: bool,
    /// The committed snapshot cannot be opened; wait for the state to change.
    broken: bool,
    done: bool,
}

impl Actor {
    pub(crate) fn new(
        shared: Arc<Shared>,
        handle: Arc<Handle>,
        rx: mpsc::Receiver<Input>,
        spis: BTreeSet<u64>,
    ) -> Actor {
        Actor {
            shared,
            handle,
            rx,
            engine: None,
            committed: None,
            epoch: Epoch(0),
            spis,
            half_open: None,
            restore_at: None,
            initial_contact: false,
            broken: false,
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
        match start {
            Start::Pending { .. } => unreachable!("completed above"),
            Start::HalfOpen { sa, outcome, key } => {
                self.engine = Some(*sa);
                self.half_open = Some(key);
                self.process(outcome).await;
            }
            Start::Restore { first } => {
                if self.restore("taken over") {
                    if let Some(d) = first {
                        self.on_datagram(d).await;
                    }
                    // A request of ours that was in flight is due at once: resend it.
                    self.on_timeout().await;
                }
            }
        }
        let mut shutdown = self.shared.shutdown.clone();
        let mut last_timeout: Option<u64> = None;
        while !self.done {
            let now = now_ms();
            let deadline = match (&self.engine, self.restore_at) {
                (Some(engine), _) => engine.next_timeout().map(|t| {
                    // An engine whose timer does not move must not spin.
                    if last_timeout.is_some_and(|last| t <= last) {
                        t.max(now + 10)
                    } else {
                        t
                    }
                }),
                (None, at) => at,
            };
            let wait = deadline.map(|t| Duration::from_millis(t.saturating_sub(now)));
            tokio::select! {
                biased;
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
                input = self.rx.recv() => match input {
                    None => break,
                    Some(Input::Datagram(d)) => self.on_datagram(d).await,
                    Some(Input::Reconcile) => self.on_reconcile(),
                },
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                    if self.engine.is_none() {
                        self.restore_at = None;
                        if self.restore("retrying after a failed commit") {
                            self.on_timeout().await;
                        }
                    } else {
                        last_timeout = Some(now_ms());
                        self.on_timeout().await;
                        continue;
                    }
                }
            }
            last_timeout = None;
        }
        self.unregister();
    }

    fn me(&self) -> u64 {
        self.shared.node.id
    }

    /// Restores the engine from the committed record. `false` if this node does not own the SA
    /// (the task ends) or the record cannot be opened.
    fn restore(&mut self, why: &str) -> bool {
        let record = {
            let state = self.shared.node.state.read();
            state.sa(self.handle.id).cloned()
        };
        let Some(record) = record else {
            self.done = true;
            return false;
        };
        if record.owner != self.me() {
            self.done = true;
            return false;
        }
        let engine = open_snapshot(self.shared.key(), &record)
            .map_err(|e| e.to_string())
            .and_then(|snapshot| {
                IkeSa::restore(self.shared.config.clone(), snapshot).map_err(|e| e.to_string())
            });
        let engine = match engine {
            Ok(engine) => engine,
            Err(error) => {
                if !self.broken {
                    tracing::error!(sa = %record.id, %error, "cannot restore the IKE SA from its committed state");
                }
                self.broken = true;
                self.engine = None;
                self.handle.epoch.store(record.epoch.0, Ordering::Release);
                self.epoch = record.epoch;
                return false;
            }
        };
        self.broken = false;
        tracing::info!(
            sa = %record.id,
            epoch = %record.epoch,
            peer = %record.peer,
            next_peer_request = record.msg.next_peer_request,
            pending_request = ?record.pending_request.as_ref().map(|p| p.msg_id),
            children = record.children.len(),
            why,
            "IKE SA restored from the committed state"
        );
        self.epoch = record.epoch;
        self.handle.epoch.store(record.epoch.0, Ordering::Release);
        let spis: BTreeSet<u64> = engine.local_spis().into_iter().collect();
        self.set_routes(spis);
        self.committed = Some(record);
        self.engine = Some(engine);
        true
    }

    /// The committed state of this SA changed under this task (moved, deleted, new epoch).
    fn on_reconcile(&mut self) {
        let current = {
            let state = self.shared.node.state.read();
            state.sa(self.handle.id).map(|r| (r.owner, r.epoch))
        };
        match current {
            Some((owner, epoch)) if owner == self.me() && (epoch != self.epoch || self.broken) => {
                self.engine = None;
                self.restore("ownership epoch changed");
            }
            Some((owner, _)) if owner == self.me() => {}
            Some((owner, _)) => {
                tracing::info!(sa = %self.handle.id, owner, "IKE SA moved to another node; stopping here");
                self.done = true;
            }
            None if self.committed.is_some() => {
                tracing::info!(sa = %self.handle.id, "IKE SA deleted from the cluster; stopping here");
                self.done = true;
            }
            None => {}
        }
    }

    async fn on_datagram(&mut self, d: IkeDatagram) {
        if self.engine.is_none() && (self.broken || !self.restore("datagram for it")) {
            return;
        }
        tracing::debug!(sa = %self.handle.id, from = %d.remote, "rx {}", describe(&d.message));
        let now = now_ms();
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let outcome = engine.handle_datagram(now, &mut rng(), d.local, d.remote, &d.message);
        self.process(outcome).await;
    }

    async fn on_timeout(&mut self) {
        let now = now_ms();
        let Some(engine) = self.engine.as_mut() else {
            return;
        };
        let outcome = engine.handle_timeout(now, &mut rng());
        self.process(outcome).await;
    }

    /// Completes an outcome, then allocates an inner address if the engine asked for one.
    async fn process(&mut self, outcome: Outcome) {
        match self.complete(outcome).await {
            Ok(Some(requested)) => self.assign_address(requested).await,
            Ok(None) => {}
            Err(failure) => self.on_failure(failure),
        }
    }

    /// A commit of an established SA failed: nothing it gated was sent. Stop if the SA moved;
    /// otherwise drop the engine (it is ahead of the cluster) and restore from the record.
    fn on_failure(&mut self, failure: Failure) {
        self.engine = None;
        if self.committed.is_none() {
            tracing::warn!(sa = %self.handle.id, error = %failure, "half-open IKE SA dropped");
            self.done = true;
            return;
        }
        match failure {
            Failure::Commit(CommitError::Fenced { current, .. }) => {
                tracing::info!(sa = %self.handle.id, epoch = %current, "IKE SA fenced: another node owns it now");
                self.done = true;
            }
            Failure::Commit(CommitError::Refused(Rejection::UnknownSa(_))) => {
                tracing::info!(sa = %self.handle.id, "IKE SA no longer in the cluster");
                self.done = true;
            }
            other => {
                tracing::warn!(sa = %self.handle.id, error = %other, "IKE state change not committed; restoring from the committed state");
                self.restore_at = Some(now_ms() + RESTORE_RETRY_MS);
            }
        }
    }

    /// Sends what may leave now, commits, sends what the commit released, then acts on the
    /// events. Returns the address the peer asked for when it needs one.
    async fn complete(&mut self, outcome: Outcome) -> Result<Option<Option<Ipv4Addr>>, Failure> {
        for d in &outcome.send {
            self.send(d);
        }
        let events = outcome.events;
        if let Some(commit) = outcome.commit {
            let committed = self.commit(&commit.change, &events).await?;
            tracing::trace!(sa = %self.handle.id, log_index = ?committed.map(|c| c.log_index), "state change committed");
            for d in commit.into_datagrams_after_durable() {
                self.send(&d);
            }
        }
        Ok(self.on_events(events))
    }

    /// Makes the engine's state change durable in the cluster. `None`: nothing to commit (a
    /// removal of an SA that was never committed).
    async fn commit(
        &mut self,
        change: &StateChange,
        events: &[Event],
    ) -> Result<Option<Committed>, Failure> {
        let shared = self.shared.clone();
        let sealer = shared.sealer().map_err(MappingError::Seal)?;
        let mapper = Mapper {
            key: &sealer,
            lifetimes: &shared.config.lifetimes,
            initial_lease: shared.initial_lease,
        };
        match change {
            StateChange::Upsert(snapshot) => match &self.committed {
                None => {
                    let record = mapper.new_record(snapshot, self.me());
                    let committed = exchange::commit_new_sa(&shared.node, record.clone()).await?;
                    self.epoch = record.epoch;
                    self.handle.epoch.store(record.epoch.0, Ordering::Release);
                    self.committed = Some(record);
                    Ok(Some(committed))
                }
                Some(prev) => {
                    let (updates, expected) = mapper.updates(prev, snapshot, events)?;
                    let committed =
                        exchange::commit_changes(&shared.node, self.handle.id, self.epoch, updates)
                            .await?;
                    self.committed = Some(expected);
                    Ok(Some(committed))
                }
            },
            StateChange::Remove { .. } => {
                if self.committed.is_none() {
                    return Ok(None);
                }
                let committed =
                    exchange::commit_delete(&shared.node, self.handle.id, self.epoch).await?;
                self.committed = None;
                Ok(Some(committed))
            }
        }
    }

    fn on_events(&mut self, events: Vec<Event>) -> Option<Option<Ipv4Addr>> {
        let id = self.handle.id;
        let mut address = None;
        for event in events {
            match event {
                Event::InnerAddressNeeded {
                    peer_identity,
                    requested,
                } => {
                    tracing::debug!(sa = %id, peer = %peer_identity, ?requested, "inner address needed");
                    address = Some(requested);
                }
                Event::IkeSaEstablished {
                    local_spi,
                    peer_identity,
                } => {
                    let record = self.committed.as_ref();
                    tracing::info!(
                        sa = %id,
                        local_spi = format_args!("{local_spi:016x}"),
                        peer = %peer_identity,
                        addr = ?record.map(|r| r.peer),
                        inner = ?record.and_then(|r| r.virtual_ip),
                        "IKE SA established and committed"
                    );
                    self.forget_half_open();
                    if std::mem::take(&mut self.initial_contact) {
                        self.drop_stale_sas();
                    }
                }
                Event::InitialContact { .. } => self.initial_contact = true,
                Event::ChildSaInstalled(info) => {
                    if !info.udp_encap {
                        tracing::warn!(sa = %id, in_spi = format_args!("{:08x}", info.inbound_spi), "child SA without NAT traversal: the userspace data plane only carries UDP-encapsulated ESP (the peer should force encapsulation)");
                    }
                    tracing::info!(
                        sa = %id,
                        in_spi = format_args!("{:08x}", info.inbound_spi),
                        out_spi = format_args!("{:08x}", info.outbound_spi),
                        rekey_of = ?info.rekey_of.map(|s| format!("{s:08x}")),
                        local_ts = ?info.local_ts,
                        remote_ts = ?info.remote_ts,
                        "child SA committed"
                    );
                }
                Event::ChildSaDeleted {
                    inbound_spi,
                    outbound_spi,
                } => tracing::info!(
                    sa = %id,
                    in_spi = format_args!("{inbound_spi:08x}"),
                    out_spi = format_args!("{outbound_spi:08x}"),
                    "child SA deleted"
                ),
                Event::ChildSaFailed { rekey_of, error } => {
                    tracing::warn!(sa = %id, ?rekey_of, %error, "child SA negotiation failed")
                }
                Event::IkeSaRekeyed {
                    old_local_spi,
                    new_local_spi,
                } => {
                    tracing::info!(
                        sa = %id,
                        old = format_args!("{old_local_spi:016x}"),
                        new = format_args!("{new_local_spi:016x}"),
                        "IKE SA rekeyed"
                    );
                    let mut spis = self.spis.clone();
                    spis.insert(new_local_spi);
                    self.set_routes(spis);
                }
                Event::LocalSpiReleased { local_spi } => {
                    let mut spis = self.spis.clone();
                    spis.remove(&local_spi);
                    self.set_routes(spis);
                }
                Event::PeerAlive => tracing::debug!(sa = %id, "peer answered our liveness check"),
                Event::Closed { reason } => {
                    tracing::info!(sa = %id, ?reason, "IKE SA closed");
                    self.done = true;
                }
                Event::PeerMisbehaved(error) => {
                    tracing::debug!(sa = %id, %error, "message dropped or refused")
                }
                Event::InnerAddressAssigned(_) => {}
            }
        }
        address
    }

    /// Picks an address and lets the engine answer IKE_AUTH with it. If the cluster refuses the
    /// new SA because another node took the address meanwhile, answers again with another one
    /// from the copy of the engine taken before.
    async fn assign_address(&mut self, requested: Option<Ipv4Addr>) {
        let shared = self.shared.clone();
        for attempt in 1..=CREATE_ATTEMPTS {
            let Some(engine) = self.engine.as_mut() else {
                return;
            };
            let before = engine.clone();
            let pick = shared.pool.as_ref().and_then(|pool| {
                let state = shared.node.state.read();
                pool.pick(&state, requested)
            });
            if pick.is_none() {
                tracing::warn!(sa = %self.handle.id, "inner address pool exhausted (or no pool): answering INTERNAL_ADDRESS_FAILURE");
            }
            let address = pick.map(|ipv4| InnerAddress {
                ipv4,
                netmask: None,
                dns: shared.dns.clone(),
            });
            let outcome = match engine.assign_inner_address(address, now_ms(), &mut rng()) {
                Ok(outcome) => outcome,
                Err(error) => {
                    tracing::warn!(sa = %self.handle.id, %error, "cannot assign an inner address");
                    return;
                }
            };
            let result = self.complete(outcome).await;
            if let (Some(pool), Some(addr)) = (&shared.pool, pick) {
                pool.release(addr);
            }
            let failure = match result {
                Ok(_) => return,
                Err(failure) => failure,
            };
            let retry = match &failure {
                Failure::Commit(CommitError::Refused(Rejection::AddressInUse { addr, .. })) => {
                    tracing::info!(sa = %self.handle.id, %addr, "address taken by another node meanwhile; answering with another one");
                    true
                }
                Failure::Commit(CommitError::NotCommitted(_))
                | Failure::Commit(CommitError::Refused(Rejection::SaExists(_))) => {
                    // Maybe committed after all: then the record is the truth.
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt))).await;
                    let mine = {
                        let state = shared.node.state.read();
                        state.sa(self.handle.id).map(|r| r.owner == self.me())
                    };
                    match mine {
                        Some(true) => {
                            self.engine = None;
                            self.restore("its creation's outcome was unknown");
                            return;
                        }
                        Some(false) => false,
                        None => true,
                    }
                }
                _ => false,
            };
            if !retry || attempt == CREATE_ATTEMPTS {
                self.on_failure(failure);
                return;
            }
            self.engine = Some(before);
        }
    }

    /// INITIAL_CONTACT (RFC 7296 §2.4): the peer lost its older SAs; delete them in the cluster
    /// (their owners stop them when they apply the delete).
    fn drop_stale_sas(&self) {
        let Some(me) = self.committed.as_ref() else {
            return;
        };
        let stale: Vec<(evpc_raft_store::SaId, Epoch)> = {
            let state = self.shared.node.state.read();
            state
                .sas_of_peer(&me.peer_id)
                .filter(|sa| {
                    sa.id != me.id
                        && sa.local_id == me.local_id
                        && sa.times.established_ms <= me.times.established_ms
                })
                .map(|sa| (sa.id, sa.epoch))
                .collect()
        };
        for (sa, epoch) in stale {
            tracing::info!(sa = %sa, replaced_by = %me.id, peer = %me.peer_id, "INITIAL_CONTACT: deleting the peer's older IKE SA");
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
        tracing::debug!(sa = %self.handle.id, to = %d.remote, "tx {}", describe(&d.payload));
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
