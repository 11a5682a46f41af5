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
//! 3. [`OwnerRuntime::on_proposal_failed`] when a proposal could not be committed.
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

use evpc_dataplane::{ChildCounters, ChildKeymat, ChildStart};
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
}

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
        }
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
            self.reconcile_sa(sa.id, Some(sa), now_ms, keys, &mut actions);
            known.insert(sa.id, sa.epoch);
        }
        let gone: Vec<SaId> = self
            .by_sa
            .keys()
            .copied()
            .filter(|id| state.sa(*id).is_none_or(|sa| sa.owner != self.me))
            .collect();
        for id in gone {
            self.reconcile_sa(id, None, now_ms, keys, &mut actions);
        }
        self.known = Some(known);
        actions
    }

    /// Reconciles the running children of the SAs `changed` (from the change feed) with the
    /// applied state: O(changed SAs and their children), whatever the number of SAs. Before the
    /// first [`OwnerRuntime::on_state`] it does nothing (that first look decides which ranges
    /// this process saw granted).
    pub fn on_changes(
        &mut self,
        state: &State,
        changed: &[SaId],
        now_ms: u64,
        keys: &dyn KeyOpener,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.known.is_none() {
            return actions;
        }
        for id in changed {
            let sa = state.sa(*id).filter(|sa| sa.owner == self.me);
            self.reconcile_sa(*id, sa, now_ms, keys, &mut actions);
            let known = self.known.get_or_insert_with(BTreeMap::new);
            match sa {
                Some(sa) => known.insert(sa.id, sa.epoch),
                None => known.remove(id),
            };
        }
        actions
    }

    /// One SA: `owned` is its record if this node owns it now, `None` if it is gone or another
    /// node's. Starts, extends and stops its children to match.
    fn reconcile_sa(
        &mut self,
        id: SaId,
        owned: Option<&IkeSa>,
        now_ms: u64,
        keys: &dyn KeyOpener,
        actions: &mut Vec<Action>,
    ) {
        let was_running = self.by_sa.get(&id).cloned().unwrap_or_default();
        let Some(sa) = owned else {
            for in_spi in was_running {
                self.stop(in_spi, actions);
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
            self.start(sa, child, fresh, now_ms, keys, actions);
        }
    }

    fn stop(&mut self, in_spi: u32, actions: &mut Vec<Action>) {
        if let Some(run) = self.running.remove(&in_spi) {
            self.watch.remove(&in_spi);
            if let Some(spis) = self.by_sa.get_mut(&run.ike) {
                spis.remove(&in_spi);
                if spis.is_empty() {
                    self.by_sa.remove(&run.ike);
                }
            }
            actions.push(Action::Stop { in_spi });
        }
    }

    fn start(
        &mut self,
        sa: &IkeSa,
        child: &ChildSa,
        fresh: bool,
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
        actions.push(Action::Start(Box::new(ChildStart {
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
        })));
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
        for node in [1, 2] {
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
