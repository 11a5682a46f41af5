//! One IKE SA on its owner, as a pure state machine: the engine ([`IkeSa`]), the record the
//! cluster holds for it, and the rules that tie them together — commit before the datagrams a
//! state change gates leave, restore from the committed record when the engine is ahead of the
//! cluster, answer IKE_AUTH again with another inner address when the cluster refuses the one
//! picked. No IO, no clock (`now` is an input, in ms), no randomness but the one passed in,
//! no lock: the shell (`actor.rs`, or a simulation) runs the [`Action`]s and feeds the results
//! back.
//!
//! ```text
//!  on_datagram(now, rng, d) ─┐                      ┌─ Send(d) ───────────────────────► socket
//!  on_timeout(now, rng) ─────┼─► engine ─► Outcome ─┼─ Commit { proposal, gated } ─► Raft
//!  on_address(now, rng, ip) ─┘   (mapping::Mapper)  │        └─ on_committed(result) ─┐
//!                                                   │   Ok: the shell sends `gated` ◄─┘
//!                                                   ├─ Routes / HalfOpenDone / DeleteStale
//!                                                   ├─ NeedAddress ─► pool ─► on_address
//!                                                   └─ ReadState ─► on_state(record)
//!  on_state(record) ─► restore (takeover, retry, epoch change) or reconcile (moved, deleted)
//! ```
//!
//! # Call order
//!
//! 1. [`SaMachine::start`] once, with [`Start`];
//! 2. then, one at a time, any of [`SaMachine::on_datagram`], [`SaMachine::on_timeout`] (when
//!    [`SaMachine::next_timeout`] is reached) and [`SaMachine::on_state`] (the state of this SA
//!    changed under it);
//! 3. the shell runs the actions of each call in order. [`Action::Commit`] is always the last
//!    of its batch: the shell commits, sends `gated` only if the commit succeeded, and calls
//!    [`SaMachine::on_committed`] with the result before anything else; [`Action::ReadState`]
//!    is answered with [`SaMachine::on_state`] and [`Action::NeedAddress`] with
//!    [`SaMachine::on_address`], at once (their answers' actions are run next, in order);
//! 4. after [`Action::Stop`] the machine does nothing more: the shell drops it.
//!
//! Inputs that arrive while a commit, an address or a read of the state is awaited are queued
//! (at most [`QUEUE`]; beyond that dropped, the peer retransmits) and handled once the machine
//! runs again, as the task's channel did before.

use std::collections::{BTreeSet, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;

use evpc_ike::wire::Header;
use evpc_ike::{Config, Datagram, Event, IkeSa, IkeSaSnapshot, InnerAddress, Outcome, StateChange};
use evpc_raft_store::{
    Command, Epoch, Identity, IkeSa as Record, NodeId, Rejection, SaId, SaUpdate,
};

use super::commit::{CommitError, Committed};
use super::mapping::{Mapper, MappingError};
use crate::sealing::{ClusterKey, SealError};

/// Tries to commit a new SA again after a failure this many times.
pub const CREATE_ATTEMPTS: u32 = 8;
/// After a failed commit, restore from the committed record after this long.
pub const RESTORE_RETRY_MS: u64 = 300;
/// Inputs held while the machine waits (a commit, an address, the state).
pub const QUEUE: usize = 64;
/// An engine whose timer does not move after it fired is looked at again this much later, so
/// the shell does not spin.
const STUCK_TIMER_MS: u64 = 10;

/// The keys the machine seals with and opens with (the node holds the cluster key).
pub trait SaKeys: Send + Sync {
    /// The key to seal with now: the active key of the applied state.
    fn sealer(&self) -> Result<Arc<ClusterKey>, SealError>;
    /// The sealed engine snapshot of `record`, opened.
    fn open(&self, record: &Record) -> Result<IkeSaSnapshot, MappingError>;
}

/// What the machine is built with.
#[derive(Clone)]
pub struct Params {
    /// This node.
    pub me: NodeId,
    /// The engine's configuration (restores use it too).
    pub config: Arc<Config>,
    /// `out_hwm` of a new child: the first lease.
    pub initial_lease: u64,
    /// DNS servers handed out with an inner address.
    pub dns: Vec<Ipv4Addr>,
    /// Seals and opens snapshots.
    pub keys: Arc<dyn SaKeys>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Params")
            .field("me", &self.me)
            .field("initial_lease", &self.initial_lease)
            .finish_non_exhaustive()
    }
}

/// How the machine starts.
#[derive(Debug)]
pub enum Start {
    /// A half-open SA `Endpoint::accept` just made; `outcome` holds its IKE_SA_INIT answer.
    HalfOpen {
        /// The engine.
        engine: Box<IkeSa>,
        /// Its first outcome.
        outcome: Outcome,
    },
    /// An SA this node owns in the committed state: restore it, handle `first`, then resend a
    /// request of ours that was in flight.
    Restore {
        /// The datagram that made the dispatcher start it.
        first: Option<Datagram>,
    },
}

/// What the cluster is asked to commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proposal {
    /// A new SA (IKE_AUTH done): `commit::commit_new_sa`.
    New(Box<Record>),
    /// Changes of an SA in `epoch`: `commit::commit_changes`.
    Changes {
        /// The SA.
        sa: SaId,
        /// The epoch this node acts in.
        epoch: Epoch,
        /// The changes, in order.
        updates: Vec<SaUpdate>,
    },
    /// The SA is gone: `commit::commit_delete`.
    Delete {
        /// The SA.
        sa: SaId,
        /// The epoch this node acts in.
        epoch: Epoch,
    },
}

impl Proposal {
    /// The command the `exchange` function proposes for it.
    pub fn command(&self) -> Command {
        match self {
            Proposal::New(record) => Command::CreateSa(record.clone()),
            Proposal::Changes { sa, epoch, updates } => Command::Update {
                sa: *sa,
                epoch: *epoch,
                updates: updates.clone(),
            },
            Proposal::Delete { sa, epoch } => Command::DeleteSa {
                sa: *sa,
                epoch: Some(*epoch),
            },
        }
    }
}

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Send this datagram now.
    Send(Datagram),
    /// Commit `proposal`; only once it is committed send `gated`, then call `on_committed`.
    Commit {
        /// What to commit.
        proposal: Proposal,
        /// The datagrams the commit gates.
        gated: Vec<Datagram>,
    },
    /// The local IKE SPIs this SA answers to now (all of them: replace the previous set).
    Routes(BTreeSet<u64>),
    /// IKE_AUTH is committed: the half-open entry may go.
    HalfOpenDone,
    /// Pick an inner address from the pool (`requested` if free) and call `on_address`.
    NeedAddress(Option<Ipv4Addr>),
    /// The pick's commit is over (either way): release its reservation.
    ReleaseAddress(Ipv4Addr),
    /// INITIAL_CONTACT: delete the older SAs of `peer` with the same local identity,
    /// established no later than `established_ms`, other than `sa`.
    DeleteStale {
        /// The SA that replaces them.
        sa: SaId,
        /// The peer's identity.
        peer: Identity,
        /// Our identity towards it.
        local: Identity,
        /// When `sa` was established.
        established_ms: u64,
    },
    /// Read the committed record of this SA and call `on_state` with it.
    ReadState,
    /// The machine is finished; drop it.
    Stop,
}

/// Rules broken on purpose, for the gateway simulation only.
#[doc(hidden)]
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Sabotage {
    /// Everything as it should be.
    #[default]
    Nothing,
    /// Gated datagrams go out with `Send`, before the commit.
    GatedBeforeCommit,
    /// A restore drops the committed pending request and builds a new one with its ID.
    FreshResendAfterRestore,
    /// A fenced commit is treated as a failure to retry.
    IgnoreFence,
    /// After `AddressInUse`, the same address is offered again.
    KeepAddressAfterInUse,
    /// A restore accepts the peer's previous message ID again.
    LowerMessageIdAfterRestore,
}

/// Why an outcome could not be completed. Nothing it gated was sent.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error(transparent)]
    Commit(#[from] CommitError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

/// What becomes of the record once the commit in flight lands.
#[derive(Debug)]
enum Expect {
    /// The record as the cluster will hold it (a new SA, or the replay of the updates).
    Record(Box<Record>),
    /// The SA is deleted.
    Gone,
}

/// An inner address being handed out.
#[derive(Debug)]
struct Assign {
    /// The engine before the address was assigned: answers the same IKE_AUTH again.
    before: Box<IkeSa>,
    requested: Option<Ipv4Addr>,
    attempt: u32,
    pick: Option<Ipv4Addr>,
}

/// A commit in flight.
#[derive(Debug)]
struct InFlight {
    engine: Box<IkeSa>,
    expect: Expect,
    events: Vec<Event>,
    assign: Option<Assign>,
}

/// What to do once the record is read and the engine restored.
#[derive(Debug)]
struct Resume {
    why: &'static str,
    first: Option<Datagram>,
    timeout: bool,
}

/// Where the machine is. Each phase holds what only it needs, so e.g. an engine and a pending
/// restore cannot coexist.
#[derive(Debug)]
enum Phase {
    /// Waiting for the record (`ReadState` asked) to restore the engine from.
    Restoring(Resume),
    /// IKE_SA_INIT answered; not committed. Invariant: `committed` is `None`.
    HalfOpen(Box<IkeSa>),
    /// The engine runs in step with the committed record. Invariant: `committed` is `Some`.
    Running(Box<IkeSa>),
    /// `NeedAddress` asked; `on_address` is next.
    AwaitingAddress {
        engine: Box<IkeSa>,
        requested: Option<Ipv4Addr>,
        attempt: u32,
    },
    /// A commit is in flight (the engine is ahead of the cluster until it lands).
    /// Invariant: at most one; `Action::Commit` is the last action of its batch, and nothing
    /// it gates is in an `Action::Send`.
    Committing(Box<InFlight>),
    /// The new SA's commit had an unknown outcome: look at the state at `at` (`reading` once
    /// `ReadState` is asked) — maybe it was committed after all.
    CreateUnknown {
        at: u64,
        reading: bool,
        attempt: u32,
        before: Box<IkeSa>,
        requested: Option<Ipv4Addr>,
        failure: String,
    },
    /// A commit failed: the engine was dropped; restore from the record at `at`.
    RetryAfterFailure { at: u64 },
    /// The committed snapshot cannot be opened: wait for the state to change.
    Broken,
    /// Finished (`Stop` emitted).
    Done,
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Restoring(_) => "restoring",
            Phase::HalfOpen(_) => "half-open",
            Phase::Running(_) => "running",
            Phase::AwaitingAddress { .. } => "awaiting-address",
            Phase::Committing(_) => "committing",
            Phase::CreateUnknown { .. } => "create-unknown",
            Phase::RetryAfterFailure { .. } => "retry-after-failure",
            Phase::Broken => "broken",
            Phase::Done => "done",
        }
    }
}

/// Message IDs of the engine's current IKE SA generation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct EngineIds {
    /// The generation's SPIs.
    pub spis: (u64, u64),
    /// The next request ID the engine accepts from the peer.
    pub next_peer_request: u32,
    /// The ID of the engine's next own request.
    pub next_local_request: u32,
}

/// An IKE message's exchange, direction and message ID, for debug logs.
pub(crate) fn describe(message: &[u8]) -> String {
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

/// The per-SA machine; see the module docs for the call order.
pub struct SaMachine {
    id: SaId,
    params: Params,
    phase: Phase,
    /// The record as committed (`None` while half-open, or before the first restore).
    committed: Option<Record>,
    /// The epoch this node acts in; 0 before anything was committed or read.
    epoch: Epoch,
    spis: BTreeSet<u64>,
    /// Started half-open: `HalfOpenDone` is due once IKE_AUTH is committed.
    half_open: bool,
    /// The peer sent INITIAL_CONTACT: older SAs of its identity are stale.
    initial_contact: bool,
    /// When the engine timer last fired, until another input: the non-moving timer guard.
    last_fired: Option<u64>,
    queue: VecDeque<Datagram>,
    /// The state changed while the machine waited: read it again when it runs.
    reread: bool,
    /// `Stop` was emitted.
    stopped: bool,
    /// Call the engine's timer as soon as it runs again (after a takeover's restore).
    kick: bool,
    sabotage: Sabotage,
}

impl std::fmt::Debug for SaMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaMachine")
            .field("id", &self.id)
            .field("phase", &self.phase.name())
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

type Rng<'a> = &'a mut dyn evpc_ike::Random;

impl SaMachine {
    /// A machine for SA `id`, routed by `spis` so far.
    pub fn new(id: SaId, params: Params, spis: BTreeSet<u64>) -> SaMachine {
        SaMachine {
            id,
            params,
            phase: Phase::Done,
            committed: None,
            epoch: Epoch(0),
            spis,
            half_open: false,
            initial_contact: false,
            last_fired: None,
            queue: VecDeque::new(),
            reread: false,
            stopped: false,
            kick: false,
            sabotage: Sabotage::Nothing,
        }
    }

    /// Breaks a rule on purpose (the gateway simulation's checks must catch it).
    #[doc(hidden)]
    pub fn sabotage(&mut self, sabotage: Sabotage) {
        self.sabotage = sabotage;
    }

    /// The SA.
    pub fn id(&self) -> SaId {
        self.id
    }

    /// The epoch this machine acts in (0 while half-open).
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The record as this machine believes the cluster holds it.
    pub fn committed(&self) -> Option<&Record> {
        self.committed.as_ref()
    }

    /// The SPIs routed to it.
    pub fn spis(&self) -> &BTreeSet<u64> {
        &self.spis
    }

    /// The phase, for logs and tests.
    pub fn phase(&self) -> &'static str {
        self.phase.name()
    }

    /// Whether it stopped.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    fn engine(&self) -> Option<&IkeSa> {
        match &self.phase {
            Phase::HalfOpen(e) | Phase::Running(e) => Some(e),
            Phase::AwaitingAddress { engine, .. } => Some(engine),
            Phase::Committing(f) => Some(&f.engine),
            _ => None,
        }
    }

    /// The engine's message IDs (established engines only). Clones the snapshot: for tests.
    pub fn engine_ids(&self) -> Option<EngineIds> {
        let s = self.engine()?.snapshot()?;
        Some(EngineIds {
            spis: (s.current.spi_i, s.current.spi_r),
            next_peer_request: s.current.next_peer_request_id,
            next_local_request: s.current.next_request_id,
        })
    }

    /// When to call `on_timeout` next (absolute ms), if ever.
    pub fn next_timeout(&self) -> Option<u64> {
        match &self.phase {
            Phase::HalfOpen(engine) | Phase::Running(engine) => {
                engine.next_timeout().map(|t| match self.last_fired {
                    Some(last) if t <= last => t.max(last + STUCK_TIMER_MS),
                    _ => t,
                })
            }
            Phase::RetryAfterFailure { at } => Some(*at),
            Phase::CreateUnknown {
                at, reading: false, ..
            } => Some(*at),
            _ => None,
        }
    }

    /// Starts the machine.
    pub fn start(&mut self, now: u64, rng: Rng<'_>, start: Start) -> Vec<Action> {
        let mut out = Vec::new();
        match start {
            Start::HalfOpen { engine, outcome } => {
                self.half_open = true;
                self.process(now, rng, engine, outcome, None, &mut out);
            }
            Start::Restore { first } => {
                self.phase = Phase::Restoring(Resume {
                    why: "taken over",
                    first,
                    timeout: true,
                });
                out.push(Action::ReadState);
            }
        }
        self.drain(now, rng, &mut out);
        out
    }

    /// A datagram for this SA.
    pub fn on_datagram(&mut self, now: u64, rng: Rng<'_>, d: Datagram) -> Vec<Action> {
        let mut out = Vec::new();
        self.last_fired = None;
        self.datagram(now, rng, d, &mut out);
        self.drain(now, rng, &mut out);
        out
    }

    /// The deadline of [`SaMachine::next_timeout`] passed.
    pub fn on_timeout(&mut self, now: u64, rng: Rng<'_>) -> Vec<Action> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::HalfOpen(mut engine) | Phase::Running(mut engine) => {
                self.last_fired = Some(now);
                let outcome = engine.handle_timeout(now, rng);
                self.process(now, rng, engine, outcome, None, &mut out);
            }
            Phase::RetryAfterFailure { at } if now >= at => {
                self.phase = Phase::Restoring(Resume {
                    why: "retrying after a failed commit",
                    first: None,
                    timeout: true,
                });
                out.push(Action::ReadState);
            }
            Phase::CreateUnknown {
                at,
                reading: false,
                attempt,
                before,
                requested,
                failure,
            } if now >= at => {
                self.phase = Phase::CreateUnknown {
                    at,
                    reading: true,
                    attempt,
                    before,
                    requested,
                    failure,
                };
                out.push(Action::ReadState);
            }
            other => self.phase = other,
        }
        self.drain(now, rng, &mut out);
        out
    }

    /// The committed record of this SA as the shell read it: the answer to `ReadState`, or
    /// news that the state changed under the machine.
    pub fn on_state(&mut self, now: u64, rng: Rng<'_>, record: Option<&Record>) -> Vec<Action> {
        let mut out = Vec::new();
        self.last_fired = None;
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Done => {}
            Phase::Restoring(resume) => {
                if self.restore(now, rng, record, resume.why, &mut out) {
                    if let Some(d) = resume.first {
                        self.datagram(now, rng, d, &mut out);
                    }
                    // A request of ours that was in flight is due at once: resend it (after the
                    // first datagram's commit, if it made one).
                    if resume.timeout {
                        self.kick = true;
                    }
                }
            }
            Phase::CreateUnknown {
                reading: true,
                attempt,
                before,
                requested,
                failure,
                ..
            } => match record.map(|r| r.owner == self.params.me) {
                Some(true) => {
                    self.restore(
                        now,
                        rng,
                        record,
                        "its creation's outcome was unknown",
                        &mut out,
                    );
                }
                Some(false) => self.half_open_dropped(&failure, &mut out),
                None if attempt < CREATE_ATTEMPTS => {
                    self.phase = Phase::AwaitingAddress {
                        engine: before,
                        requested,
                        attempt: attempt + 1,
                    };
                    out.push(Action::NeedAddress(requested));
                }
                None => self.half_open_dropped(&failure, &mut out),
            },
            phase @ (Phase::Committing(_)
            | Phase::AwaitingAddress { .. }
            | Phase::CreateUnknown { .. }) => {
                self.phase = phase;
                self.reread = true;
            }
            phase => {
                self.phase = phase;
                self.reconcile(now, rng, record, &mut out);
            }
        }
        self.drain(now, rng, &mut out);
        out
    }

    /// The address the shell picked from the pool, after `NeedAddress`.
    pub fn on_address(&mut self, now: u64, rng: Rng<'_>, pick: Option<Ipv4Addr>) -> Vec<Action> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::AwaitingAddress {
                engine,
                requested,
                attempt,
            } => self.assign(now, rng, engine, requested, attempt, pick, &mut out),
            other => {
                // Not asked for (any more): give the reservation back.
                self.phase = other;
                out.extend(pick.map(Action::ReleaseAddress));
                return out;
            }
        }
        self.drain(now, rng, &mut out);
        out
    }

    /// The outcome of the commit the machine asked for.
    pub fn on_committed(
        &mut self,
        now: u64,
        rng: Rng<'_>,
        result: Result<Committed, CommitError>,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let flight = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Committing(flight) => flight,
            other => {
                self.phase = other;
                return out;
            }
        };
        let InFlight {
            engine,
            expect,
            events,
            assign,
        } = *flight;
        match result {
            Ok(committed) => {
                tracing::trace!(sa = %self.id, log_index = committed.log_index, "state change committed");
                match expect {
                    Expect::Record(record) => {
                        self.epoch = record.epoch;
                        self.committed = Some(*record);
                    }
                    Expect::Gone => self.committed = None,
                }
                self.after_commit(engine, events, assign, &mut out);
            }
            Err(error) => self.commit_failed(now, rng, engine, assign, error, &mut out),
        }
        self.drain(now, rng, &mut out);
        out
    }

    fn datagram(&mut self, now: u64, rng: Rng<'_>, d: Datagram, out: &mut Vec<Action>) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::HalfOpen(mut engine) | Phase::Running(mut engine) => {
                tracing::debug!(sa = %self.id, from = %d.remote, "rx {}", describe(&d.payload));
                let outcome = engine.handle_datagram(now, rng, d.local, d.remote, &d.payload);
                self.process(now, rng, engine, outcome, None, out);
            }
            Phase::RetryAfterFailure { .. } => {
                self.phase = Phase::Restoring(Resume {
                    why: "datagram for it",
                    first: Some(d),
                    timeout: false,
                });
                out.push(Action::ReadState);
            }
            phase @ (Phase::Broken | Phase::Done) => self.phase = phase,
            phase => {
                self.phase = phase;
                if self.queue.len() < QUEUE {
                    self.queue.push_back(d);
                } else {
                    tracing::debug!(sa = %self.id, "SA queue full; datagram dropped");
                }
            }
        }
    }

    fn timeout_now(&mut self, now: u64, rng: Rng<'_>, out: &mut Vec<Action>) {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::HalfOpen(mut engine) | Phase::Running(mut engine) => {
                let outcome = engine.handle_timeout(now, rng);
                self.process(now, rng, engine, outcome, None, out);
            }
            other => self.phase = other,
        }
    }

    /// Handles what was queued while the machine waited, as long as it runs.
    fn drain(&mut self, now: u64, rng: Rng<'_>, out: &mut Vec<Action>) {
        while matches!(self.phase, Phase::HalfOpen(_) | Phase::Running(_)) {
            if std::mem::take(&mut self.kick) {
                self.timeout_now(now, rng, out);
                continue;
            }
            let Some(d) = self.queue.pop_front() else {
                break;
            };
            self.datagram(now, rng, d, out);
        }
        if !matches!(
            self.phase,
            Phase::Committing(_) | Phase::AwaitingAddress { .. }
        ) {
            // Anything else (stopped, broken, waiting to retry) has no timer to kick.
            self.kick = false;
        }
        if self.reread
            && matches!(
                self.phase,
                Phase::HalfOpen(_)
                    | Phase::Running(_)
                    | Phase::RetryAfterFailure { .. }
                    | Phase::Broken
            )
        {
            self.reread = false;
            out.push(Action::ReadState);
        }
    }

    fn finish(&mut self, out: &mut Vec<Action>) {
        if !std::mem::replace(&mut self.stopped, true) {
            out.push(Action::Stop);
        }
        self.phase = Phase::Done;
        self.queue.clear();
    }

    fn set_routes(&mut self, spis: BTreeSet<u64>, out: &mut Vec<Action>) {
        self.spis = spis.clone();
        out.push(Action::Routes(spis));
    }

    /// Restores the engine from the committed record. `false` if this node does not own the SA
    /// (the machine stops) or the record cannot be opened (it waits, broken).
    fn restore(
        &mut self,
        now: u64,
        rng: Rng<'_>,
        record: Option<&Record>,
        why: &str,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(record) = record.filter(|r| r.owner == self.params.me) else {
            self.finish(out);
            return false;
        };
        let mut fresh_request = false;
        let engine = self
            .params
            .keys
            .open(record)
            .map_err(|e| e.to_string())
            .and_then(|mut snapshot| {
                match self.sabotage {
                    Sabotage::LowerMessageIdAfterRestore => {
                        let g = &mut snapshot.current;
                        g.next_peer_request_id = g.next_peer_request_id.saturating_sub(1);
                    }
                    Sabotage::FreshResendAfterRestore => {
                        let g = &mut snapshot.current;
                        if let Some(p) = g.pending.take() {
                            g.next_request_id = p.message.message_id;
                            fresh_request = true;
                        }
                    }
                    _ => {}
                }
                IkeSa::restore(self.params.config.clone(), snapshot).map_err(|e| e.to_string())
            });
        self.epoch = record.epoch;
        let mut engine = match engine {
            Ok(engine) => Box::new(engine),
            Err(error) => {
                if !matches!(self.phase, Phase::Broken) {
                    tracing::error!(sa = %record.id, %error, "cannot restore the IKE SA from its committed state");
                }
                self.phase = Phase::Broken;
                return false;
            }
        };
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
        self.set_routes(engine.local_spis().into_iter().collect(), out);
        self.committed = Some(record.clone());
        if fresh_request && let Ok(outcome) = engine.send_dpd(now, rng) {
            self.process(now, rng, engine, outcome, None, out);
            return matches!(self.phase, Phase::Running(_));
        }
        self.phase = Phase::Running(engine);
        true
    }

    /// The committed state of this SA changed under the machine (moved, deleted, new epoch).
    fn reconcile(
        &mut self,
        now: u64,
        rng: Rng<'_>,
        record: Option<&Record>,
        out: &mut Vec<Action>,
    ) {
        let me = self.params.me;
        let broken = matches!(self.phase, Phase::Broken);
        match record {
            Some(r) if r.owner == me && (r.epoch != self.epoch || broken) => {
                self.restore(now, rng, record, "ownership epoch changed", out);
            }
            Some(r) if r.owner == me => {}
            Some(r) => {
                tracing::info!(sa = %self.id, owner = r.owner, "IKE SA moved to another node; stopping here");
                self.finish(out);
            }
            None if self.committed.is_some() || broken => {
                tracing::info!(sa = %self.id, "IKE SA deleted from the cluster; stopping here");
                self.finish(out);
            }
            None => {}
        }
    }

    /// Sends what may leave now; asks to commit what the outcome gates, or acts on its events
    /// at once when there is nothing to commit.
    fn process(
        &mut self,
        now: u64,
        rng: Rng<'_>,
        engine: Box<IkeSa>,
        outcome: Outcome,
        assign: Option<Assign>,
        out: &mut Vec<Action>,
    ) {
        for d in outcome.send {
            tracing::debug!(sa = %self.id, to = %d.remote, "tx {}", describe(&d.payload));
            out.push(Action::Send(d));
        }
        let events = outcome.events;
        let Some(commit) = outcome.commit else {
            self.after_commit(engine, events, assign, out);
            return;
        };
        let proposal = match self.propose(&commit.change, &events) {
            Ok(Some(proposal)) => proposal,
            Ok(None) => {
                // A removal of an SA that was never committed: nothing to wait for.
                out.extend(
                    commit
                        .into_datagrams_after_durable()
                        .into_iter()
                        .map(Action::Send),
                );
                self.after_commit(engine, events, assign, out);
                return;
            }
            Err(error) => {
                if let Some(pick) = assign.and_then(|a| a.pick) {
                    out.push(Action::ReleaseAddress(pick));
                }
                self.on_failure(now, rng, Failure::Mapping(error), out);
                return;
            }
        };
        let (proposal, expect) = proposal;
        let gated = commit.into_datagrams_after_durable();
        if self.sabotage == Sabotage::GatedBeforeCommit {
            out.extend(gated.iter().cloned().map(Action::Send));
        }
        out.push(Action::Commit { proposal, gated });
        self.phase = Phase::Committing(Box::new(InFlight {
            engine,
            expect,
            events,
            assign,
        }));
    }

    /// What to commit for the engine's state change. `None`: nothing (a removal of an SA that
    /// was never committed).
    fn propose(
        &self,
        change: &StateChange,
        events: &[Event],
    ) -> Result<Option<(Proposal, Expect)>, MappingError> {
        match change {
            StateChange::Upsert(snapshot) => {
                let sealer = self.params.keys.sealer().map_err(MappingError::Seal)?;
                let mapper = Mapper {
                    key: &sealer,
                    lifetimes: &self.params.config.lifetimes,
                    initial_lease: self.params.initial_lease,
                };
                Ok(Some(match &self.committed {
                    None => {
                        let record = Box::new(mapper.new_record(snapshot, self.params.me));
                        (Proposal::New(record.clone()), Expect::Record(record))
                    }
                    Some(prev) => {
                        let (updates, expected) = mapper.updates(prev, snapshot, events)?;
                        (
                            Proposal::Changes {
                                sa: self.id,
                                epoch: self.epoch,
                                updates,
                            },
                            Expect::Record(Box::new(expected)),
                        )
                    }
                }))
            }
            StateChange::Remove { .. } => Ok(self.committed.as_ref().map(|_| {
                (
                    Proposal::Delete {
                        sa: self.id,
                        epoch: self.epoch,
                    },
                    Expect::Gone,
                )
            })),
        }
    }

    /// The outcome is complete (committed, or nothing to commit): act on its events.
    fn after_commit(
        &mut self,
        engine: Box<IkeSa>,
        events: Vec<Event>,
        assign: Option<Assign>,
        out: &mut Vec<Action>,
    ) {
        let assigning = assign.is_some();
        if let Some(pick) = assign.and_then(|a| a.pick) {
            out.push(Action::ReleaseAddress(pick));
        }
        let (needed, closed) = self.on_events(events, out);
        if closed {
            self.finish(out);
            return;
        }
        self.phase = match (needed, assigning) {
            // An answer with an address does not ask for another one.
            (Some(requested), false) => {
                out.push(Action::NeedAddress(requested));
                Phase::AwaitingAddress {
                    engine,
                    requested,
                    attempt: 1,
                }
            }
            _ if self.committed.is_some() => Phase::Running(engine),
            _ => Phase::HalfOpen(engine),
        };
    }

    /// A commit failed: nothing it gated was sent. A new SA refused its address answers again
    /// with another one; one whose outcome is unknown looks at the state first.
    fn commit_failed(
        &mut self,
        now: u64,
        rng: Rng<'_>,
        engine: Box<IkeSa>,
        assign: Option<Assign>,
        error: CommitError,
        out: &mut Vec<Action>,
    ) {
        drop(engine);
        let Some(assign) = assign else {
            self.on_failure(now, rng, Failure::Commit(error), out);
            return;
        };
        if let Some(pick) = assign.pick {
            out.push(Action::ReleaseAddress(pick));
        }
        let Assign {
            before,
            requested,
            attempt,
            pick,
        } = assign;
        match &error {
            CommitError::Refused(Rejection::AddressInUse { addr, .. })
                if attempt < CREATE_ATTEMPTS =>
            {
                tracing::info!(sa = %self.id, %addr, "address taken by another node meanwhile; answering with another one");
                if self.sabotage == Sabotage::KeepAddressAfterInUse {
                    self.assign(now, rng, before, requested, attempt + 1, pick, out);
                    return;
                }
                self.phase = Phase::AwaitingAddress {
                    engine: before,
                    requested,
                    attempt: attempt + 1,
                };
                out.push(Action::NeedAddress(requested));
            }
            CommitError::NotCommitted(_) | CommitError::Refused(Rejection::SaExists(_)) => {
                // Maybe committed after all: then the record is the truth.
                self.phase = Phase::CreateUnknown {
                    at: now + 100 * u64::from(attempt),
                    reading: false,
                    attempt,
                    before,
                    requested,
                    failure: error.to_string(),
                };
            }
            _ => self.on_failure(now, rng, Failure::Commit(error), out),
        }
    }

    /// Answers IKE_AUTH with `pick` (or INTERNAL_ADDRESS_FAILURE without one), from a copy of
    /// the engine taken before, so a refused address can be replaced.
    #[allow(clippy::too_many_arguments)]
    fn assign(
        &mut self,
        now: u64,
        rng: Rng<'_>,
        mut engine: Box<IkeSa>,
        requested: Option<Ipv4Addr>,
        attempt: u32,
        pick: Option<Ipv4Addr>,
        out: &mut Vec<Action>,
    ) {
        if pick.is_none() {
            tracing::warn!(sa = %self.id, "inner address pool exhausted (or no pool): answering INTERNAL_ADDRESS_FAILURE");
        }
        let before = engine.clone();
        let address = pick.map(|ipv4| InnerAddress {
            ipv4,
            netmask: None,
            dns: self.params.dns.clone(),
        });
        match engine.assign_inner_address(address, now, rng) {
            Ok(outcome) => {
                let assign = Assign {
                    before,
                    requested,
                    attempt,
                    pick,
                };
                self.process(now, rng, engine, outcome, Some(assign), out);
            }
            Err(error) => {
                tracing::warn!(sa = %self.id, %error, "cannot assign an inner address");
                out.extend(pick.map(Action::ReleaseAddress));
                self.phase = if self.committed.is_some() {
                    Phase::Running(engine)
                } else {
                    Phase::HalfOpen(engine)
                };
            }
        }
    }

    fn half_open_dropped(&mut self, error: &dyn std::fmt::Display, out: &mut Vec<Action>) {
        tracing::warn!(sa = %self.id, error = %error, "half-open IKE SA dropped");
        self.finish(out);
    }

    /// A commit of an established SA failed. Stop if the SA moved; otherwise the engine (ahead
    /// of the cluster) is gone, and the machine restores from the record later.
    fn on_failure(&mut self, now: u64, _rng: Rng<'_>, failure: Failure, out: &mut Vec<Action>) {
        if self.committed.is_none() {
            self.half_open_dropped(&failure, out);
            return;
        }
        match failure {
            Failure::Commit(CommitError::Fenced { current, .. })
                if self.sabotage != Sabotage::IgnoreFence =>
            {
                tracing::info!(sa = %self.id, epoch = %current, "IKE SA fenced: another node owns it now");
                self.finish(out);
            }
            Failure::Commit(CommitError::Refused(Rejection::UnknownSa(_))) => {
                tracing::info!(sa = %self.id, "IKE SA no longer in the cluster");
                self.finish(out);
            }
            other => {
                tracing::warn!(sa = %self.id, error = %other, "IKE state change not committed; restoring from the committed state");
                self.phase = Phase::RetryAfterFailure {
                    at: now + RESTORE_RETRY_MS,
                };
            }
        }
    }

    /// Logs the engine's events and acts on them. Returns the address the peer asked for when
    /// it needs one, and whether the SA closed.
    fn on_events(
        &mut self,
        events: Vec<Event>,
        out: &mut Vec<Action>,
    ) -> (Option<Option<Ipv4Addr>>, bool) {
        let id = self.id;
        let mut address = None;
        let mut closed = false;
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
                    if std::mem::take(&mut self.half_open) {
                        out.push(Action::HalfOpenDone);
                    }
                    if std::mem::take(&mut self.initial_contact)
                        && let Some(me) = &self.committed
                    {
                        out.push(Action::DeleteStale {
                            sa: me.id,
                            peer: me.peer_id.clone(),
                            local: me.local_id.clone(),
                            established_ms: me.times.established_ms,
                        });
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
                    self.set_routes(spis, out);
                }
                Event::LocalSpiReleased { local_spi } => {
                    let mut spis = self.spis.clone();
                    spis.remove(&local_spi);
                    self.set_routes(spis, out);
                }
                Event::PeerAlive => tracing::debug!(sa = %id, "peer answered our liveness check"),
                Event::Closed { reason } => {
                    tracing::info!(sa = %id, ?reason, "IKE SA closed");
                    closed = true;
                }
                Event::PeerMisbehaved(error) => {
                    tracing::debug!(sa = %id, %error, "message dropped or refused")
                }
                Event::InnerAddressAssigned(_) => {}
            }
        }
        (address, closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    use evpc_ike::{Accepted, ConnectOptions, Endpoint, Secret, TrafficSelector as Ts};
    use evpc_raft_store::KeyId;

    use crate::node::ProposeError;
    use crate::sealing::Keyring;

    fn rng(seed: u8) -> impl FnMut(&mut [u8]) {
        let mut counter = u64::from(seed) << 56;
        move |buf: &mut [u8]| {
            for chunk in buf.chunks_mut(8) {
                counter = counter
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                chunk.copy_from_slice(&counter.to_be_bytes()[..chunk.len()]);
            }
        }
    }

    struct TestKeys(Keyring);
    impl SaKeys for TestKeys {
        fn sealer(&self) -> Result<Arc<ClusterKey>, SealError> {
            Ok(self.0.get(KeyId(1)).expect("key 1"))
        }
        fn open(&self, record: &Record) -> Result<IkeSaSnapshot, MappingError> {
            super::super::mapping::open_snapshot(&self.0, record)
        }
    }

    const GW: &str = "192.0.2.1:500";
    const RW: &str = "192.0.2.2:500";

    fn params(me: NodeId) -> Params {
        let gw_id = evpc_ike::Identity::fqdn("gw.example");
        let rw_id = evpc_ike::Identity::fqdn("client.example");
        let mut gw = Config::new(gw_id).with_psk(rw_id, b"psk");
        gw.local_ts = vec![Ts::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)];
        Params {
            me,
            config: Arc::new(gw),
            initial_lease: 4096,
            dns: Vec::new(),
            keys: Arc::new(TestKeys(Keyring::in_memory([ClusterKey::from_bytes(
                KeyId(1),
                &[5; 32],
            )]))),
        }
    }

    fn client_config() -> Arc<Config> {
        Arc::new(
            Config::new(evpc_ike::Identity::fqdn("client.example"))
                .with_psk(evpc_ike::Identity::fqdn("gw.example"), b"psk"),
        )
    }

    fn sends(actions: &[Action]) -> Vec<Vec<u8>> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(d) => Some(d.payload.clone()),
                _ => None,
            })
            .collect()
    }

    fn commit_of(actions: &[Action]) -> Option<(&Proposal, &Vec<Datagram>)> {
        actions.iter().find_map(|a| match a {
            Action::Commit { proposal, gated } => Some((proposal, gated)),
            _ => None,
        })
    }

    fn dgram(payload: Vec<u8>) -> Datagram {
        Datagram {
            local: GW.parse().unwrap(),
            remote: RW.parse().unwrap(),
            payload,
        }
    }

    /// A client, and a machine that answered its IKE_SA_INIT and got its IKE_AUTH: it asks
    /// for an address.
    fn awaiting_address() -> (IkeSa, SaMachine, impl FnMut(&mut [u8])) {
        let (gw, rw): (SocketAddr, SocketAddr) = (GW.parse().unwrap(), RW.parse().unwrap());
        let mut rw_rng = rng(2);
        let mut gw_rng = rng(1);
        let (mut client, o) = IkeSa::connect(
            client_config(),
            rw,
            gw,
            ConnectOptions::road_warrior(
                evpc_ike::Identity::fqdn("gw.example"),
                vec![Ts::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)],
            ),
            1_000,
            &mut rw_rng,
        );
        let init = o.send[0].payload.clone();
        let p = params(1);
        let endpoint = Endpoint::new(p.config.clone(), Secret::from_slice(&[9; 32]));
        let Accepted::NewSa(engine, outcome) =
            endpoint.accept(1_000, &mut gw_rng, gw, rw, &init, 0)
        else {
            panic!("IKE_SA_INIT refused");
        };
        let id = SaId(engine.local_spi().unwrap());
        let mut m = SaMachine::new(id, p, engine.local_spis().into_iter().collect());
        let actions = m.start(1_000, &mut gw_rng, Start::HalfOpen { engine, outcome });
        assert_eq!(m.phase(), "half-open");
        let mut auth = Vec::new();
        for d in sends(&actions) {
            let o = client.handle_datagram(1_000, &mut rw_rng, rw, gw, &d);
            auth.extend(o.send.into_iter().map(|d| d.payload));
        }
        let actions = m.on_datagram(1_000, &mut gw_rng, dgram(auth.remove(0)));
        assert!(
            actions.iter().any(|a| matches!(a, Action::NeedAddress(_))),
            "{actions:?}"
        );
        assert_eq!(m.phase(), "awaiting-address");
        (client, m, gw_rng)
    }

    fn not_committed() -> CommitError {
        CommitError::NotCommitted(ProposeError::NoLeader(std::time::Duration::from_secs(1)))
    }

    /// Half-open, address, commit in flight (nothing gated sent), committed: running.
    fn established() -> (IkeSa, SaMachine, impl FnMut(&mut [u8]), Record) {
        let (mut client, mut m, mut r) = awaiting_address();
        let a = m.on_address(1_000, &mut r, Some(Ipv4Addr::new(10, 10, 0, 7)));
        assert_eq!(m.phase(), "committing");
        assert!(sends(&a).is_empty(), "the IKE_AUTH answer is gated");
        let (proposal, gated) = commit_of(&a).expect("a commit");
        let Proposal::New(record) = proposal.clone() else {
            panic!("a new SA");
        };
        assert_eq!(
            record.virtual_ip,
            Some(std::net::IpAddr::V4(Ipv4Addr::new(10, 10, 0, 7)))
        );
        for d in gated.clone() {
            let _ = client.handle_datagram(
                1_000,
                &mut rng(3),
                RW.parse().unwrap(),
                GW.parse().unwrap(),
                &d.payload,
            );
        }
        assert!(client.is_established());
        let a = m.on_committed(1_000, &mut r, Ok(Committed { log_index: 7 }));
        assert!(a.iter().any(|a| matches!(a, Action::HalfOpenDone)));
        assert!(
            a.iter().any(
                |a| matches!(a, Action::ReleaseAddress(x) if *x == Ipv4Addr::new(10, 10, 0, 7))
            )
        );
        assert_eq!(m.phase(), "running");
        assert_eq!(m.epoch(), Epoch::FIRST);
        (client, m, r, *record)
    }

    #[test]
    fn a_new_sa_is_committed_before_its_answer_leaves() {
        let (_, m, _, record) = established();
        assert_eq!(m.committed(), Some(&record));
    }

    #[test]
    fn an_address_in_use_is_picked_again_from_the_engine_before() {
        let (_, mut m, mut r) = awaiting_address();
        let _ = m.on_address(1_000, &mut r, Some(Ipv4Addr::new(10, 10, 0, 7)));
        let a = m.on_committed(
            1_000,
            &mut r,
            Err(CommitError::Refused(Rejection::AddressInUse {
                addr: std::net::IpAddr::V4(Ipv4Addr::new(10, 10, 0, 7)),
                holder: SaId(1),
            })),
        );
        assert!(matches!(a[0], Action::ReleaseAddress(_)), "{a:?}");
        assert!(matches!(a[1], Action::NeedAddress(_)), "{a:?}");
        let a = m.on_address(1_000, &mut r, Some(Ipv4Addr::new(10, 10, 0, 8)));
        let Some((Proposal::New(record), _)) = commit_of(&a) else {
            panic!("{a:?}");
        };
        assert_eq!(
            record.virtual_ip,
            Some(std::net::IpAddr::V4(Ipv4Addr::new(10, 10, 0, 8)))
        );
    }

    #[test]
    fn an_unknown_creation_outcome_looks_at_the_state_first() {
        let (_, mut m, mut r) = awaiting_address();
        let a = m.on_address(1_000, &mut r, Some(Ipv4Addr::new(10, 10, 0, 7)));
        let Some((Proposal::New(record), _)) = commit_of(&a) else {
            panic!("{a:?}");
        };
        let record = (**record).clone();
        let _ = m.on_committed(1_000, &mut r, Err(not_committed()));
        assert_eq!(m.phase(), "create-unknown");
        assert_eq!(m.next_timeout(), Some(1_100));
        assert!(m.on_timeout(1_050, &mut r).is_empty(), "not yet");
        let a = m.on_timeout(1_100, &mut r);
        assert!(matches!(a[..], [Action::ReadState]), "{a:?}");
        // Not in the state: answer again with a fresh pick.
        let a = m.on_state(1_100, &mut r, None);
        assert!(matches!(a[..], [Action::NeedAddress(_)]), "{a:?}");
        let _ = m.on_address(1_100, &mut r, Some(Ipv4Addr::new(10, 10, 0, 9)));
        let _ = m.on_committed(1_100, &mut r, Err(not_committed()));
        let _ = m.on_timeout(1_300, &mut r);
        // Committed after all: the record is the truth.
        let a = m.on_state(1_300, &mut r, Some(&record));
        assert!(a.iter().any(|a| matches!(a, Action::Routes(_))), "{a:?}");
        assert_eq!(m.phase(), "running");
        assert_eq!(m.committed(), Some(&record));
    }

    #[test]
    fn a_half_open_sa_whose_commit_is_refused_stops() {
        let (_, mut m, mut r) = awaiting_address();
        let _ = m.on_address(1_000, &mut r, Some(Ipv4Addr::new(10, 10, 0, 7)));
        let a = m.on_committed(
            1_000,
            &mut r,
            Err(CommitError::Refused(Rejection::UnknownSa(SaId(1)))),
        );
        assert!(a.iter().any(|a| matches!(a, Action::Stop)), "{a:?}");
        assert!(m.is_done());
    }

    /// A DPD of ours: committed first, sent after.
    fn dpd(m: &mut SaMachine, r: &mut dyn evpc_ike::Random, now: u64) -> Vec<Action> {
        let Phase::Running(engine) = &mut m.phase else {
            panic!("running");
        };
        let outcome = engine.send_dpd(now, r).unwrap();
        let Phase::Running(engine) = std::mem::replace(&mut m.phase, Phase::Done) else {
            unreachable!()
        };
        let mut out = Vec::new();
        m.process(now, r, engine, outcome, None, &mut out);
        out
    }

    #[test]
    fn a_fenced_owner_stops_at_its_first_refused_commit() {
        let (_, mut m, mut r, _) = established();
        let a = dpd(&mut m, &mut r, 2_000);
        assert!(sends(&a).is_empty());
        assert!(matches!(commit_of(&a), Some((Proposal::Changes { .. }, g)) if g.len() == 1));
        let a = m.on_committed(
            2_000,
            &mut r,
            Err(CommitError::Fenced {
                sa: m.id(),
                current: Epoch(2),
                given: Epoch(1),
            }),
        );
        assert!(matches!(a[..], [Action::Stop]), "{a:?}");
        assert!(m.is_done());
        assert!(m.on_timeout(10_000, &mut r).is_empty());
    }

    #[test]
    fn a_failed_commit_restores_from_the_record_and_resends_nothing_uncommitted() {
        let (_, mut m, mut r, record) = established();
        let _ = dpd(&mut m, &mut r, 2_000);
        let a = m.on_committed(2_000, &mut r, Err(not_committed()));
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(m.phase(), "retry-after-failure");
        assert_eq!(m.next_timeout(), Some(2_000 + RESTORE_RETRY_MS));
        let a = m.on_timeout(2_000 + RESTORE_RETRY_MS, &mut r);
        assert!(matches!(a[..], [Action::ReadState]));
        let _ = m.on_state(2_300, &mut r, Some(&record));
        assert_eq!(m.phase(), "running");
        assert_eq!(m.committed(), Some(&record));
    }

    #[test]
    fn a_takeover_resends_the_committed_request_byte_for_byte() {
        let (_, mut m, mut r, record) = established();
        let a = dpd(&mut m, &mut r, 2_000);
        let Some((Proposal::Changes { updates, .. }, gated)) = commit_of(&a) else {
            panic!("{a:?}");
        };
        let sent = gated[0].payload.clone();
        let mut moved = record.with_updates(updates).unwrap();
        let _ = m.on_committed(2_000, &mut r, Ok(Committed { log_index: 8 }));
        moved.owner = 2;
        moved.epoch = Epoch(2);
        // The old owner learns it moved.
        let a = m.on_state(2_010, &mut r, Some(&moved));
        assert!(matches!(a[..], [Action::Stop]), "{a:?}");
        // The new one restores and resends at once.
        let mut other = SaMachine::new(record.id, params(2), BTreeSet::new());
        let a = other.start(2_010, &mut r, Start::Restore { first: None });
        assert!(matches!(a[..], [Action::ReadState]));
        let a = other.on_state(2_020, &mut r, Some(&moved));
        assert_eq!(sends(&a), vec![sent]);
        assert_eq!(other.epoch(), Epoch(2));
    }

    #[test]
    fn a_record_that_cannot_be_opened_waits_broken() {
        let (_, _, mut r, mut record) = established();
        record.keys = Default::default();
        let mut m = SaMachine::new(record.id, params(1), BTreeSet::new());
        let _ = m.start(1, &mut r, Start::Restore { first: None });
        let a = m.on_state(1, &mut r, Some(&record));
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(m.phase(), "broken");
        assert!(m.on_datagram(2, &mut r, dgram(vec![0; 40])).is_empty());
        let a = m.on_state(3, &mut r, None);
        assert!(matches!(a[..], [Action::Stop]), "{a:?}");
    }
}
