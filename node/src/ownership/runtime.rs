//! The owner runtime: which child SAs this node drives, from which sequence number, and when to
//! commit the next lease or replay checkpoint. Sans-IO: it reads the applied state and the
//! data plane's counters and returns [`Action`]s; the caller runs them.
//!
//! Call order:
//! 1. [`OwnerRuntime::on_state`] after the applied state changed (at most every few
//!    milliseconds): starts children this node now owns, stops those it no longer owns, and
//!    raises limits when a lease was committed;
//! 2. [`OwnerRuntime::on_tick`] periodically with each running child's counters: proposes
//!    leases when half of the current one is used, and checkpoints;
//! 3. [`OwnerRuntime::on_proposal_failed`] when a proposal could not be committed;
//! 4. [`OwnerRuntime::on_handover`] when the old owner of a planned move sent its final state.
//!
//! A planned move (`OwnerMove::handover`, seen as [`ChangeKinds::HANDOVER`] in the change feed)
//! is handed over rather than cut: the new owner starts its children in standby (they hold
//! packets, send nothing) until the old owner's state arrives ([`OwnerRuntime::on_handover`])
//! or the wait ends ([`OwnerRuntime::on_expired`]); the old owner puts its children on hold,
//! and once the new owner confirms it holds too, sends what it held and hands them off (node
//! to node: `ownership::handover`). Nothing is lost, nothing sent twice, never two senders at
//! once, and the counter rule is untouched: the old owner never goes beyond its committed
//! lease, the new one starts above it.
//!
//! The rules that keep outbound sequence numbers unique across owners:
//! - a child is only ever started with `limit` = the committed `out_hwm`, and its limit only
//!   rises through `Extend` from a *committed* `out_hwm`;
//! - a child is started at `out_start` (the first number of this owner's range) only if this
//!   process saw the range granted — it took the SA over, or the SA is new — and at
//!   `out_hwm + 1` otherwise (after a restart this node may already have used part of its own
//!   range);
//! - on any change of epoch the child is stopped and started again in the new range.

use std::collections::{BTreeMap, BTreeSet};

use evpc_dataplane::{ChildCounters, ChildKeymat, ChildStart, HandoverState};
use evpc_raft_store::{ChildSa, Command, Epoch, IkeSa, NodeId, SaId, SaUpdate, State};

/// How the replay window of a child taken over from another node starts.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "policy")]
pub enum ReplayGapPolicy {
    /// Start at the checkpoint: packets the old owner accepted after its last checkpoint can be
    /// accepted once more (a bounded exposure: at most one checkpoint interval).
    Accept,
    /// Start `margin` above the checkpoint: no replay, but that many fresh packets are dropped.
    Jump {
        /// Sequence numbers skipped.
        margin: u64,
    },
}

/// Lease and checkpoint policy.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnerConfig {
    /// Smallest lease, in sequence numbers.
    pub lease_min: u64,
    /// Largest lease.
    pub lease_max: u64,
    /// The lease is sized so a busy SA commits about once per this many milliseconds.
    pub lease_interval_ms: u64,
    /// Checkpoint after this many inbound packets...
    pub checkpoint_packets: u64,
    /// ...or this many milliseconds, whichever comes first.
    pub checkpoint_ms: u64,
    /// Where a taken-over child's replay window starts.
    pub replay_gap: ReplayGapPolicy,
    /// Re-propose a lease that was not committed after this long.
    pub retry_ms: u64,
}

impl Default for OwnerConfig {
    fn default() -> Self {
        OwnerConfig {
            lease_min: 1024,
            lease_max: 1 << 24,
            lease_interval_ms: 1_000,
            checkpoint_packets: 4_096,
            checkpoint_ms: 1_000,
            replay_gap: ReplayGapPolicy::Accept,
            retry_ms: 500,
        }
    }
}

/// What the caller must do.
#[derive(Debug)]
pub enum Action {
    /// Start driving a child.
    Start(Box<ChildStart>),
    /// A lease was committed: raise a running child's limit.
    Extend {
        /// The child.
        in_spi: u32,
        /// The committed `out_hwm`.
        limit: u64,
    },
    /// Stop driving a child at once.
    Stop {
        /// The child.
        in_spi: u32,
    },
    /// Start a child in standby: it holds packets until [`Action::TakeOver`].
    StartStandby(Box<ChildStart>),
    /// Hand an SA's children over to their new owner (a planned move away from this node): hold
    /// them, ask `to` whether it holds them too; if so send what was held, then hand them off
    /// and send their final state to `to` (if not, hand them off at once: `to` already runs
    /// them, or cannot).
    HandOff {
        /// The SA.
        sa: SaId,
        /// The epoch it moved into.
        epoch: Epoch,
        /// Its new owner.
        to: NodeId,
        /// Its children running here.
        in_spis: Vec<u32>,
    },
    /// End a standby child's wait, with the old owner's state or without.
    TakeOver {
        /// The SA and the epoch it moved into.
        sa: SaId,
        epoch: Epoch,
        /// The child.
        in_spi: u32,
        /// What the old owner handed over.
        previous: Option<Box<HandoverState>>,
    },
    /// Commit this (leases and checkpoints, batched).
    Propose(Command),
}

#[derive(Clone, Debug)]
struct Running {
    ike: SaId,
    epoch: Epoch,
    limit: u64,
    /// First sequence number this run may use (what was started).
    first: u64,
    /// A proposed lease not yet committed: the mark it asked for and when.
    pending: Option<(u64, u64)>,
    last_checkpoint: u64,
    last_checkpoint_ms: u64,
    last_in_packets: u64,
    /// Rate estimate (packets per second, smoothed) and the sample it was last updated from.
    rate: f64,
    sample: Option<(u64, u64)>,
}

/// Opens a child's sealed keys (the node holds the cluster key).
pub trait KeyOpener {
    /// The child's keys, or `None` if there are none this node can open.
    fn open(&self, sa: &IkeSa, child: &ChildSa) -> Option<ChildKeymat>;
}

/// The owner runtime of one node.
#[derive(Debug)]
pub struct OwnerRuntime {
    me: NodeId,
    config: OwnerConfig,
    running: BTreeMap<u32, Running>,
    /// The running children of each SA (an index of `running`).
    by_sa: BTreeMap<SaId, BTreeSet<u32>>,
    /// The running children `on_tick` looks at: those started or extended since, those with
    /// traffic (the data plane's activity list), and those with a lease or checkpoint still
    /// to commit. An idle child leaves it, so a tick costs O(busy children), not O(children).
    watch: BTreeSet<u32>,
    /// The epoch of every SA this node owned at the last look; `None` before the first full
    /// [`OwnerRuntime::on_state`]. An owned SA absent here (or in another epoch) had its range
    /// granted while this process watched.
    known: Option<BTreeMap<SaId, Epoch>>,
    /// Children started in standby, waiting for their old owner's state.
    waiting: BTreeMap<u32, (SaId, Epoch)>,
    /// Old owners' states that came before this node applied the move (its owner task lagged):
    /// the standby they are for takes over with them the moment it starts. At most
    /// [`EARLY_MAX`], the oldest forgotten first (one for a stale epoch never matches).
    early: BTreeMap<(SaId, Epoch), Vec<(u32, HandoverState)>>,
    early_order: std::collections::VecDeque<(SaId, Epoch)>,
}

/// Handover states kept for moves this node has not applied yet.
const EARLY_MAX: usize = 1024;

impl OwnerRuntime {
    /// A runtime for node `me`.
    pub fn new(me: NodeId, config: OwnerConfig) -> OwnerRuntime {
        OwnerRuntime {
            me,
            config,
            running: BTreeMap::new(),
            by_sa: BTreeMap::new(),
            watch: BTreeSet::new(),
            known: None,
            waiting: BTreeMap::new(),
            early: BTreeMap::new(),
            early_order: std::collections::VecDeque::new(),
        }
    }

    /// Children in standby, waiting for a handover.
    pub fn waiting_count(&self) -> usize {
        self.waiting.len()
    }

    /// The children being driven, by inbound SPI, with their epoch.
    pub fn running(&self) -> impl Iterator<Item = (u32, SaId, Epoch)> + '_ {
        self.running.iter().map(|(spi, r)| (*spi, r.ike, r.epoch))
    }

    /// How many children are being driven.
    pub fn running_count(&self) -> usize {
        self.running.len()
    }

    /// Whether this process saw `sa`'s current range granted: the SA changed owner or epoch
    /// since the last look, or appeared after the first.
    fn range_is_fresh(&self, sa: &IkeSa) -> bool {
        match &self.known {
            None => false,
            Some(known) => known.get(&sa.id) != Some(&sa.epoch),
        }
    }

    /// Reconciles the running children with the whole applied state: at start, and whenever the
    /// change feed cannot say what changed. O(SAs this node owns).
    pub fn on_state(&mut self, state: &State, now_ms: u64, keys: &dyn KeyOpener) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut known = BTreeMap::new();
        let me = self.me;
        for sa in state.sas_owned_by(me) {
            self.reconcile_sa(sa.id, Some(sa), None, now_ms, keys, &mut actions);
            known.insert(sa.id, sa.epoch);
        }
        let gone: Vec<SaId> = self
            .by_sa
            .keys()
            .copied()
            .filter(|id| state.sa(*id).is_none_or(|sa| sa.owner != self.me))
            .collect();
        for id in gone {
            self.reconcile_sa(id, None, None, now_ms, keys, &mut actions);
        }
        self.known = Some(known);
        actions
    }

    /// Reconciles the running children of the SAs `changed` (from the change feed) with the
    /// applied state: O(changed SAs and their children), whatever the number of SAs. Before the
    /// first [`OwnerRuntime::on_state`] it does nothing (that first look decides which ranges
    /// this process saw granted). `handed_over` are those among them the feed says moved by a
    /// planned handover.
    pub fn on_changes(
        &mut self,
        state: &State,
        changed: &[SaId],
        handed_over: &BTreeSet<SaId>,
        now_ms: u64,
        keys: &dyn KeyOpener,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.known.is_none() {
            return actions;
        }
        for id in changed {
            let record = state.sa(*id);
            let sa = record.filter(|sa| sa.owner == self.me);
            // A planned move: where it went (to hand it off) or that it came (to stand by).
            let handover = handed_over
                .contains(id)
                .then(|| record.map(|r| (r.owner, r.epoch)))
                .flatten();
            self.reconcile_sa(*id, sa, handover, now_ms, keys, &mut actions);
            let known = self.known.get_or_insert_with(BTreeMap::new);
            match sa {
                Some(sa) => known.insert(sa.id, sa.epoch),
                None => known.remove(id),
            };
        }
        actions
    }

    /// One SA: `owned` is its record if this node owns it now, `None` if it is gone or another
    /// node's. Starts, extends and stops its children to match. `handover`: the SA just moved
    /// by a planned handover, to this owner in this epoch.
    fn reconcile_sa(
        &mut self,
        id: SaId,
        owned: Option<&IkeSa>,
        handover: Option<(NodeId, Epoch)>,
        now_ms: u64,
        keys: &dyn KeyOpener,
        actions: &mut Vec<Action>,
    ) {
        let was_running = self.by_sa.get(&id).cloned().unwrap_or_default();
        let Some(sa) = owned else {
            match handover {
                // Moved away by plan, to a live node: handed off, not cut — by the owner of the
                // epoch the move left, only. A child of an older epoch (this node was cut off
                // while the SA moved on) or still in standby (it never sent, and its own old
                // owner may still be sending) has nothing to hand off: it is stopped, and its
                // successor, with no state coming, waits out the real old owner as any standby
                // does. Handing either off would let the successor start beside that owner.
                Some((to, epoch)) if to != self.me && !was_running.is_empty() => {
                    let mut handed = Vec::new();
                    for in_spi in was_running {
                        let left_epoch = self
                            .running
                            .get(&in_spi)
                            .is_some_and(|run| run.epoch.checked_next() == Some(epoch));
                        if !left_epoch || self.waiting.contains_key(&in_spi) {
                            self.stop(in_spi, actions);
                        } else {
                            self.forget(in_spi);
                            handed.push(in_spi);
                        }
                    }
                    if !handed.is_empty() {
                        actions.push(Action::HandOff {
                            sa: id,
                            epoch,
                            to,
                            in_spis: handed,
                        });
                    }
                }
                _ => {
                    for in_spi in was_running {
                        self.stop(in_spi, actions);
                    }
                }
            }
            return;
        };
        let fresh = self.range_is_fresh(sa);
        for in_spi in was_running {
            if !sa.children.contains_key(&in_spi) {
                self.stop(in_spi, actions);
            }
        }
        for child in sa.children.values() {
            match self.running.get_mut(&child.in_spi) {
                Some(run) if run.ike == sa.id && run.epoch == sa.epoch => {
                    if child.out_hwm > run.limit {
                        run.limit = child.out_hwm;
                        if run.pending.is_some_and(|(mark, _)| mark <= child.out_hwm) {
                            run.pending = None;
                        }
                        actions.push(Action::Extend {
                            in_spi: child.in_spi,
                            limit: child.out_hwm,
                        });
                        self.watch.insert(child.in_spi);
                    }
                    continue;
                }
                // Same SPI, another epoch (or IKE SA): the old run ends first.
                Some(_) => self.stop(child.in_spi, actions),
                None => {}
            }
            let standby = handover.is_some_and(|(to, epoch)| to == self.me && epoch == sa.epoch);
            self.start(sa, child, fresh, standby, now_ms, keys, actions);
        }
    }

    fn stop(&mut self, in_spi: u32, actions: &mut Vec<Action>) {
        if self.forget(in_spi) {
            actions.push(Action::Stop { in_spi });
        }
    }

    /// Drops child `in_spi` from the books; whether it was running.
    fn forget(&mut self, in_spi: u32) -> bool {
        self.waiting.remove(&in_spi);
        let Some(run) = self.running.remove(&in_spi) else {
            return false;
        };
        self.watch.remove(&in_spi);
        if let Some(spis) = self.by_sa.get_mut(&run.ike) {
            spis.remove(&in_spi);
            if spis.is_empty() {
                self.by_sa.remove(&run.ike);
            }
        }
        true
    }

    /// The old owner of a planned move sent its children's final state: the standby children
    /// of `sa` in `epoch` take over with it. States for children not started here yet are kept
    /// (this node has not applied the move: its owner task lags) and used when they start in
    /// standby; others (a move that was overtaken) are ignored.
    pub fn on_handover(
        &mut self,
        sa: SaId,
        epoch: Epoch,
        states: Vec<(u32, HandoverState)>,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut early = Vec::new();
        for (in_spi, state) in states {
            if self.waiting.get(&in_spi) == Some(&(sa, epoch)) {
                self.waiting.remove(&in_spi);
                actions.push(Action::TakeOver {
                    sa,
                    epoch,
                    in_spi,
                    previous: Some(Box::new(state)),
                });
            } else if !self.running.contains_key(&in_spi) {
                early.push((in_spi, state));
            }
        }
        if !early.is_empty() && !self.early.contains_key(&(sa, epoch)) {
            if self.early_order.len() >= EARLY_MAX
                && let Some(oldest) = self.early_order.pop_front()
            {
                self.early.remove(&oldest);
            }
            self.early_order.push_back((sa, epoch));
            self.early.insert((sa, epoch), early);
        }
        actions
    }

    /// The old owner's state of child `in_spi` of `sa` in `epoch`, if it came early.
    fn take_early(&mut self, sa: SaId, epoch: Epoch, in_spi: u32) -> Option<HandoverState> {
        let states = self.early.get_mut(&(sa, epoch))?;
        let at = states.iter().position(|(spi, _)| *spi == in_spi)?;
        let (_, state) = states.swap_remove(at);
        if states.is_empty() {
            self.early.remove(&(sa, epoch));
            self.early_order.retain(|key| *key != (sa, epoch));
        }
        Some(state)
    }

    /// The wait for the old owner's state of `sa` in `epoch` ended without it: its standby
    /// children take over with what they held.
    pub fn on_expired(&mut self, sa: SaId, epoch: Epoch) -> Vec<Action> {
        let spis: Vec<u32> = self
            .waiting
            .iter()
            .filter(|(_, w)| **w == (sa, epoch))
            .map(|(spi, _)| *spi)
            .collect();
        spis.into_iter()
            .map(|in_spi| {
                self.waiting.remove(&in_spi);
                tracing::warn!(
                    %sa,
                    in_spi = format_args!("{in_spi:08x}"),
                    "no handover state from the old owner in time: taking over without it"
                );
                Action::TakeOver {
                    sa,
                    epoch,
                    in_spi,
                    previous: None,
                }
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        sa: &IkeSa,
        child: &ChildSa,
        fresh: bool,
        standby: bool,
        now_ms: u64,
        keys: &dyn KeyOpener,
        actions: &mut Vec<Action>,
    ) {
        let first = if fresh {
            child.out_start
        } else {
            child.out_hwm.saturating_add(1)
        };
        let replay_floor = match self.config.replay_gap {
            ReplayGapPolicy::Accept => child.in_checkpoint,
            ReplayGapPolicy::Jump { margin } => child.in_checkpoint.saturating_add(margin),
        };
        tracing::info!(
            sa = %sa.id,
            in_spi = format_args!("{:08x}", child.in_spi),
            epoch = %sa.epoch,
            first,
            limit = child.out_hwm,
            replay_floor,
            fresh_range = fresh,
            standby,
            "starting child SA"
        );
        self.running.insert(
            child.in_spi,
            Running {
                ike: sa.id,
                epoch: sa.epoch,
                limit: child.out_hwm,
                first,
                pending: None,
                last_checkpoint: child.in_checkpoint,
                last_checkpoint_ms: now_ms,
                last_in_packets: 0,
                rate: 0.0,
                sample: None,
            },
        );
        self.by_sa.entry(sa.id).or_default().insert(child.in_spi);
        // A child started at `out_hwm + 1` (after a restart) needs a lease before its first
        // packet: the first tick looks at every new child.
        self.watch.insert(child.in_spi);
        let early = if standby {
            self.take_early(sa.id, sa.epoch, child.in_spi)
        } else {
            None
        };
        if standby && early.is_none() {
            self.waiting.insert(child.in_spi, (sa.id, sa.epoch));
        }
        let start = Box::new(ChildStart {
            ike: sa.id,
            epoch: sa.epoch,
            in_spi: child.in_spi,
            out_spi: child.out_spi,
            suite: child.suite,
            keys: keys.open(sa, child),
            ts_local: child.ts_local.clone(),
            ts_remote: child.ts_remote.clone(),
            local: sa.local,
            peer: sa.peer,
            udp_encap: child.udp_encap,
            next_seq: first,
            limit: child.out_hwm,
            replay_floor,
        });
        actions.push(if standby {
            Action::StartStandby(start)
        } else {
            Action::Start(start)
        });
        // The old owner handed off before this node applied the move: it has stopped, and its
        // state is here.
        if let Some(state) = early {
            actions.push(Action::TakeOver {
                sa: sa.id,
                epoch: sa.epoch,
                in_spi: child.in_spi,
                previous: Some(Box::new(state)),
            });
        }
    }

    /// The lease size for a child sending `rate` packets per second: about one commit per
    /// `lease_interval_ms` (a lease is renewed when half of it is used, hence the factor 2).
    fn lease_size(&self, rate: f64) -> u64 {
        let wanted = 2.0 * rate * self.config.lease_interval_ms as f64 / 1000.0;
        (wanted as u64).clamp(self.config.lease_min, self.config.lease_max)
    }

    /// Looks at the counters of the children that need it and proposes what is due, in one
    /// command. `active` lists the children the data plane saw traffic on since the last tick
    /// (`SaDriver::take_active`); `None` if it cannot tell, and then every running child is
    /// looked at.
    pub fn on_tick(
        &mut self,
        now_ms: u64,
        counters: &dyn Fn(u32) -> Option<ChildCounters>,
        active: Option<&[u32]>,
    ) -> Vec<Action> {
        let mut by_sa: BTreeMap<(SaId, Epoch), Vec<SaUpdate>> = BTreeMap::new();
        let retry_ms = self.config.retry_ms;
        let spis: Vec<u32> = match active {
            None => self.running.keys().copied().collect(),
            Some(active) => {
                self.watch.extend(
                    active
                        .iter()
                        .copied()
                        .filter(|spi| self.running.contains_key(spi)),
                );
                self.watch.iter().copied().collect()
            }
        };
        for in_spi in spis {
            let Some(c) = counters(in_spi) else {
                self.watch.remove(&in_spi);
                continue;
            };
            // Traffic since the last look (a first look has nothing to compare with: a child
            // that keeps sending is brought back by the activity list anyway).
            let moved = self.running.get(&in_spi).is_some_and(|run| {
                run.sample
                    .is_some_and(|(_, used)| c.highest_out.max(run.first.saturating_sub(1)) != used)
                    || c.in_packets != run.last_in_packets
            });
            let lease_size = {
                let run = self.running.get_mut(&in_spi).expect("listed above");
                let used = c.highest_out.max(run.first.saturating_sub(1));
                if let Some((at, used_then)) = run.sample
                    && now_ms > at
                {
                    let instant =
                        (used.saturating_sub(used_then)) as f64 * 1000.0 / (now_ms - at) as f64;
                    run.rate = 0.7 * run.rate + 0.3 * instant;
                }
                run.sample = Some((now_ms, used));
                run.rate
            };
            let lease_size = self.lease_size(lease_size);
            let run = self.running.get_mut(&in_spi).expect("listed above");
            let used = c.highest_out.max(run.first.saturating_sub(1));
            let remaining = run.limit.saturating_sub(used);
            let pending_fresh = run
                .pending
                .is_some_and(|(_, at)| now_ms.saturating_sub(at) < retry_ms);
            let mut checkpoint = None;
            let checkpoint_due = c.highest_in > run.last_checkpoint
                && (c.in_packets.saturating_sub(run.last_in_packets)
                    >= self.config.checkpoint_packets
                    || now_ms.saturating_sub(run.last_checkpoint_ms) >= self.config.checkpoint_ms);
            let lease_due = remaining <= lease_size / 2 && !pending_fresh;
            // Checkpoints ride on leases, or go alone when due.
            if (lease_due || checkpoint_due) && c.highest_in > run.last_checkpoint {
                checkpoint = Some(c.highest_in);
                run.last_checkpoint = c.highest_in;
                run.last_checkpoint_ms = now_ms;
                run.last_in_packets = c.in_packets;
            }
            let update = if lease_due {
                let mark = run.limit.max(used).saturating_add(lease_size);
                run.pending = Some((mark, now_ms));
                Some(SaUpdate::SeqLease {
                    in_spi,
                    out_hwm: mark,
                    in_checkpoint: checkpoint,
                })
            } else {
                checkpoint.map(|in_seq| SaUpdate::ReplayCheckpoint { in_spi, in_seq })
            };
            // Still something to watch for: a lease or checkpoint not committed yet, or traffic
            // since the last look (the rate estimate follows it). Otherwise the activity list
            // brings the child back when it next sends or receives.
            let keep = run.pending.is_some() || c.highest_in > run.last_checkpoint || moved;
            if let Some(update) = update {
                by_sa.entry((run.ike, run.epoch)).or_default().push(update);
            }
            if !keep {
                self.watch.remove(&in_spi);
            }
        }
        let commands: Vec<Command> = by_sa
            .into_iter()
            .map(|((sa, epoch), updates)| Command::Update { sa, epoch, updates })
            .collect();
        match commands.len() {
            0 => Vec::new(),
            1 => commands.into_iter().map(Action::Propose).collect(),
            _ => vec![Action::Propose(Command::Batch(commands))],
        }
    }

    /// A proposal failed: clear pending leases so the next tick asks again.
    pub fn on_proposal_failed(&mut self) {
        // Only watched children can have a pending lease (they stay watched while it is).
        for spi in &self.watch {
            if let Some(run) = self.running.get_mut(spi) {
                run.pending = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use evpc_raft_store::{NodeState, OwnerMove, SlotAssignment, apply};

    struct NoKeys;
    impl KeyOpener for NoKeys {
        fn open(&self, _: &IkeSa, _: &ChildSa) -> Option<ChildKeymat> {
            None
        }
    }

    fn state_with_sa(owner: NodeId, out_hwm: u64) -> State {
        let mut state = State::default();
        for node in [1, 2, 3] {
            apply(
                &mut state,
                &Command::SetNodeState {
                    node,
                    state: NodeState::Active,
                    at_ms: 0,
                },
            )
            .unwrap();
        }
        apply(
            &mut state,
            &Command::SetSlots(vec![SlotAssignment {
                slot: 0,
                node: Some(owner),
            }]),
        )
        .unwrap();
        let mut sa = crate::ownership::test_support::sa(7, 0x1000);
        sa.owner = owner;
        let child = sa.children.get_mut(&0x1000).unwrap();
        child.out_hwm = out_hwm;
        child.in_checkpoint = 50;
        apply(&mut state, &Command::CreateSa(Box::new(sa))).unwrap();
        state
    }

    /// SA 7 moved from `from_epoch` to node `to`, planned (`handover`) or not.
    fn mv(from_epoch: u64, to: NodeId, handover: bool) -> Command {
        Command::AssignOwners(vec![OwnerMove {
            sa: SaId(7),
            from_epoch: Epoch(from_epoch),
            to,
            lease: 4_096,
            handover,
        }])
    }

    fn started(actions: &[Action]) -> Vec<(u64, u64, u64)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Start(c) => Some((c.next_seq, c.limit, c.replay_floor)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_tick_looks_only_at_new_busy_or_unsettled_children() {
        use std::cell::Cell;
        let state = state_with_sa(1, 100_000);
        let mut rt = OwnerRuntime::new(1, OwnerConfig::default());
        rt.known = Some(BTreeMap::new()); // the SA appeared after start: a fresh range
        assert_eq!(started(&rt.on_state(&state, 0, &NoKeys)).len(), 1);
        let looked = Cell::new(0);
        let used = Cell::new(0u64);
        let counters = |_: u32| {
            looked.set(looked.get() + 1);
            Some(ChildCounters {
                highest_out: used.get(),
                // checkpointed already (`in_checkpoint` 50): nothing inbound to commit
                highest_in: 50,
                ..ChildCounters::default()
            })
        };
        // A new child is looked at once; idle and with its lease, it then drops out.
        assert!(rt.on_tick(10, &counters, Some(&[])).is_empty());
        assert_eq!(looked.get(), 1);
        assert!(rt.on_tick(20, &counters, Some(&[])).is_empty());
        assert_eq!(looked.get(), 1, "an idle child costs a tick nothing");
        // Traffic brings it back, and keeps it while it moves.
        used.set(10);
        rt.on_tick(30, &counters, Some(&[0x1000]));
        assert_eq!(looked.get(), 2);
        used.set(20);
        rt.on_tick(40, &counters, Some(&[]));
        assert_eq!(looked.get(), 3, "still moving: still watched");
        rt.on_tick(50, &counters, Some(&[]));
        rt.on_tick(60, &counters, Some(&[]));
        assert_eq!(
            looked.get(),
            4,
            "settled again: dropped after one quiet look"
        );
        // Without an activity list every child is looked at, every tick.
        rt.on_tick(70, &counters, None);
        rt.on_tick(80, &counters, None);
        assert_eq!(looked.get(), 6);
    }

    #[test]
    fn after_a_restart_the_owner_starts_above_its_whole_lease() {
        let state = state_with_sa(1, 1_000);
        let mut rt = OwnerRuntime::new(1, OwnerConfig::default());
        // First state seen by this process: part of [1, 1000] may have been used before.
        assert_eq!(
            started(&rt.on_state(&state, 0, &NoKeys)),
            vec![(1_001, 1_000, 50)]
        );
        // With no room, the first tick asks for a lease at once.
        let actions = rt.on_tick(10, &|_| Some(ChildCounters::default()), None);
        let [Action::Propose(Command::Update { updates, .. })] = &actions[..] else {
            panic!("expected one lease proposal, got {actions:?}");
        };
        assert!(
            matches!(updates[0], SaUpdate::SeqLease { out_hwm, .. } if out_hwm >= 1_000 + 1_024)
        );
    }

    #[test]
    fn a_taken_over_child_starts_at_its_granted_range() {
        let mut state = state_with_sa(2, 1_000);
        let mut rt = OwnerRuntime::new(1, OwnerConfig::default());
        assert!(
            started(&rt.on_state(&state, 0, &NoKeys)).is_empty(),
            "node 2 owns it"
        );
        apply(
            &mut state,
            &Command::AssignOwners(vec![OwnerMove {
                sa: SaId(7),
                from_epoch: Epoch::FIRST,
                to: 1,
                lease: 4_096,
                handover: false,
            }]),
        )
        .unwrap();
        // Seen in-process: the range [1001, 5096] was granted to us and never used.
        assert_eq!(
            started(&rt.on_state(&state, 5, &NoKeys)),
            vec![(1_001, 5_096, 50)]
        );
        // Moving it away stops it.
        apply(
            &mut state,
            &Command::AssignOwners(vec![OwnerMove {
                sa: SaId(7),
                from_epoch: Epoch(2),
                to: 2,
                lease: 4_096,
                handover: false,
            }]),
        )
        .unwrap();
        let actions = rt.on_state(&state, 9, &NoKeys);
        assert!(
            matches!(actions[..], [Action::Stop { in_spi: 0x1000 }]),
            "{actions:?}"
        );
    }

    #[test]
    fn a_planned_move_is_handed_over_and_an_unplanned_one_cut() {
        let planned = BTreeSet::from([SaId(7)]);
        let none = BTreeSet::new();
        // Node 1 owns it and runs it; node 2 watches.
        let mut state = state_with_sa(1, 1_000);
        let (mut one, mut two) = (
            OwnerRuntime::new(1, OwnerConfig::default()),
            OwnerRuntime::new(2, OwnerConfig::default()),
        );
        assert_eq!(started(&one.on_state(&state, 0, &NoKeys)).len(), 1);
        assert!(two.on_state(&state, 0, &NoKeys).is_empty());
        // Planned to node 2: node 1 hands it off, node 2 stands by above the old range.
        apply(&mut state, &mv(1, 2, true)).unwrap();
        let a = one.on_changes(&state, &[SaId(7)], &planned, 5, &NoKeys);
        assert!(
            matches!(&a[..], [Action::HandOff { sa: SaId(7), epoch: Epoch(2), to: 2, in_spis }]
                if in_spis == &[0x1000]),
            "{a:?}"
        );
        assert_eq!(one.running_count(), 0);
        let b = two.on_changes(&state, &[SaId(7)], &planned, 5, &NoKeys);
        assert!(
            matches!(&b[..], [Action::StartStandby(c)] if c.next_seq == 1_001 && c.limit == 5_096),
            "{b:?}"
        );
        assert_eq!(two.waiting_count(), 1);
        // The old owner's state: taken over with it; a second, or another epoch's, changes
        // nothing.
        let state_of = || vec![(0x1000, HandoverState::default())];
        assert!(two.on_handover(SaId(7), Epoch(3), state_of()).is_empty());
        let t = two.on_handover(SaId(7), Epoch(2), state_of());
        assert!(
            matches!(
                &t[..],
                [Action::TakeOver {
                    in_spi: 0x1000,
                    previous: Some(_),
                    ..
                }]
            ),
            "{t:?}"
        );
        assert!(two.on_handover(SaId(7), Epoch(2), state_of()).is_empty());
        assert!(
            two.on_expired(SaId(7), Epoch(2)).is_empty(),
            "no longer waiting"
        );
        // Planned back to node 1, which never hears from node 2: it goes on without.
        apply(&mut state, &mv(2, 1, true)).unwrap();
        let b = two.on_changes(&state, &[SaId(7)], &planned, 9, &NoKeys);
        assert!(matches!(&b[..], [Action::HandOff { to: 1, .. }]), "{b:?}");
        let a = one.on_changes(&state, &[SaId(7)], &planned, 9, &NoKeys);
        assert!(matches!(&a[..], [Action::StartStandby(_)]), "{a:?}");
        let e = one.on_expired(SaId(7), Epoch(3));
        assert!(
            matches!(
                &e[..],
                [Action::TakeOver {
                    in_spi: 0x1000,
                    previous: None,
                    ..
                }]
            ),
            "{e:?}"
        );
        // Taken over from a failed node (not planned): cut and started at once.
        apply(&mut state, &mv(3, 2, false)).unwrap();
        let a = one.on_changes(&state, &[SaId(7)], &none, 12, &NoKeys);
        assert!(matches!(&a[..], [Action::Stop { in_spi: 0x1000 }]), "{a:?}");
        let b = two.on_changes(&state, &[SaId(7)], &none, 12, &NoKeys);
        assert_eq!(started(&b).len(), 1, "{b:?}");
    }

    #[test]
    fn only_the_owner_of_the_epoch_a_move_left_hands_off_and_an_early_state_waits() {
        let planned = BTreeSet::from([SaId(7)]);
        let mut state = state_with_sa(1, 1_000);
        let mut rt: Vec<OwnerRuntime> = (1..=3)
            .map(|id| OwnerRuntime::new(id, OwnerConfig::default()))
            .collect();
        for r in &mut rt {
            r.on_state(&state, 0, &NoKeys);
        }
        // 1 → 2 by plan. Node 1 hands off before node 2 has applied the move (its owner task
        // lags): the state waits, and node 2 takes over with it as soon as it stands by.
        apply(&mut state, &mv(1, 2, true)).unwrap();
        let a = rt[0].on_changes(&state, &[SaId(7)], &planned, 5, &NoKeys);
        assert!(matches!(&a[..], [Action::HandOff { to: 2, .. }]), "{a:?}");
        let early = vec![(0x1000, HandoverState::default())];
        assert!(rt[1].on_handover(SaId(7), Epoch(2), early).is_empty());
        let b = rt[1].on_changes(&state, &[SaId(7)], &planned, 9, &NoKeys);
        assert!(
            matches!(
                &b[..],
                [
                    Action::StartStandby(_),
                    Action::TakeOver {
                        in_spi: 0x1000,
                        previous: Some(_),
                        ..
                    }
                ]
            ),
            "{b:?}"
        );
        assert_eq!(rt[1].waiting_count(), 0);
        // 2 → 3 by plan, then 3 → 2 by plan before node 3 heard from node 2: node 3's child,
        // still in standby, never sent, so it is stopped, not handed off (node 2 must wait out
        // whoever really sent last, not take a state from a node that never did).
        apply(&mut state, &mv(2, 3, true)).unwrap();
        let c = rt[2].on_changes(&state, &[SaId(7)], &planned, 12, &NoKeys);
        assert!(matches!(&c[..], [Action::StartStandby(_)]), "{c:?}");
        apply(&mut state, &mv(3, 2, true)).unwrap();
        let c = rt[2].on_changes(&state, &[SaId(7)], &planned, 14, &NoKeys);
        assert!(matches!(&c[..], [Action::Stop { in_spi: 0x1000 }]), "{c:?}");
        // Node 2 applies both moves at once: its epoch-2 child is stopped and started again in
        // standby for epoch 4.
        let b = rt[1].on_changes(&state, &[SaId(7)], &planned, 15, &NoKeys);
        assert!(
            matches!(&b[..], [Action::Stop { .. }, Action::StartStandby(_)]),
            "{b:?}"
        );
        // A node cut off in an older epoch sees a later planned move away: it stops its child,
        // it does not hand off an epoch the move did not leave.
        let mut stale = OwnerRuntime::new(2, OwnerConfig::default());
        let mut old = state_with_sa(2, 1_000);
        stale.on_state(&old, 0, &NoKeys);
        apply(&mut old, &mv(1, 3, false)).unwrap();
        apply(&mut old, &mv(2, 1, true)).unwrap();
        let s = stale.on_changes(&old, &[SaId(7)], &planned, 20, &NoKeys);
        assert!(matches!(&s[..], [Action::Stop { in_spi: 0x1000 }]), "{s:?}");
    }

    #[test]
    fn leases_are_proposed_at_half_and_extend_only_when_committed() {
        let mut state = state_with_sa(1, 0);
        let mut rt = OwnerRuntime::new(1, OwnerConfig::default());
        rt.known = Some(BTreeMap::new()); // as if the SA appeared after start: fresh range
        assert_eq!(started(&rt.on_state(&state, 0, &NoKeys)), vec![(1, 0, 50)]);
        let counters = |used: u64| {
            move |_| {
                Some(ChildCounters {
                    highest_out: used,
                    ..ChildCounters::default()
                })
            }
        };
        let mark = match &rt.on_tick(10, &counters(0), None)[..] {
            [Action::Propose(Command::Update { updates, .. })] => match updates[0] {
                SaUpdate::SeqLease { out_hwm, .. } => out_hwm,
                _ => panic!(),
            },
            other => panic!("{other:?}"),
        };
        // Not again while pending.
        assert!(rt.on_tick(20, &counters(0), None).is_empty());
        // Commit it: the runtime raises the limit.
        apply(
            &mut state,
            &Command::Update {
                sa: SaId(7),
                epoch: Epoch::FIRST,
                updates: vec![SaUpdate::SeqLease {
                    in_spi: 0x1000,
                    out_hwm: mark,
                    in_checkpoint: None,
                }],
            },
        )
        .unwrap();
        assert!(
            matches!(rt.on_state(&state, 30, &NoKeys)[..], [Action::Extend { limit, .. }] if limit == mark)
        );
        // At a low rate the lease stays at its minimum. Less than half used: nothing; more
        // than half: the next lease.
        assert!(rt.on_tick(40_000, &counters(mark / 4), None).is_empty());
        assert!(
            !rt.on_tick(80_000, &counters(mark - mark / 4), None)
                .is_empty()
        );
    }

    #[test]
    fn lease_size_follows_the_packet_rate() {
        let rt = OwnerRuntime::new(1, OwnerConfig::default());
        assert_eq!(rt.lease_size(0.0), 1_024);
        assert_eq!(rt.lease_size(100_000.0), 200_000);
        assert_eq!(rt.lease_size(1e12), 1 << 24);
    }
}
