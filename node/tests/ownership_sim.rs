//! Deterministic cluster simulation of SA ownership on virtual time.
//!
//! The real ownership code runs here — `apply`, the leader's planner, each node's contact table
//! and fence, each node's owner runtime — wired together by a simulated network and a simulated
//! consensus log instead of tonic and openraft, so a whole cluster runs in one thread, in
//! virtual 5 ms steps, from a seed. The node's start-up and fence rules are modelled as the
//! daemon implements them: contact is a round trip; coming back from a fence, a node waits for
//! the leader's read index; after a restart, its owner runtime scans nothing before it has
//! applied a read barrier taken after the restart. A fake data plane sends every packet it may
//! and records each (SPI, sequence number) in a ledger.
//!
//! Faults: crash (its committed index not yet on disk: the restarted node recovers an older
//! state), leader crash, quick bounce (back before the failover timeout), whole-cluster crash,
//! pause, partition, asymmetric partition (one direction cut), export (`--remove`) and import
//! of an SA, and a planned transfer whose old owner's runtime stalls (it applies the move late
//! while its data plane keeps sending). Traffic may burst far beyond what its leases were sized
//! for.
//!
//! Checked after every step:
//! 1. no (SPI, sequence number) sent twice, by any nodes;
//! 2. per SPI, sequence numbers only rise across owners (every number of epoch e is below
//!    every number of epoch e' > e);
//! 3. message IDs never go backwards on any node's view;
//! 4. no SA stays without a working owner longer than the failover bound while a quorum is up;
//! 5. never two owners sending for one SA: once a newer epoch has sent, an older one never sends
//!    again (a client's anti-replay window would drop it, and both would deliver the same
//!    inner packets).
//!
//! Each rule the daemon relies on is broken on purpose in one test, which must be caught.
//!
//! `EVPC_SIM_SEEDS=N` runs N seeds (default 16); `EVPC_SIM_SEED=S` runs one; `EVPC_SIM_TRACE`
//! prints the faults. A failing run prints its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use evpc_dataplane::{ChildCounters, ChildKeymat, HandoverState};
use evpc_node::ownership::handover::nobody_else_sends;
use evpc_node::ownership::liveness::{Liveness, PeerView};
use evpc_node::ownership::planner::{PlanInput, PlannerConfig, plan};
use evpc_node::ownership::runtime::{Action, KeyOpener, OwnerConfig, OwnerRuntime};
use evpc_raft_store::{
    Applied, ChangeKinds, ChildSa, Command, Epoch, IkeSa, NodeId, Response, SaId, SaUpdate, State,
    apply, changes, fixture, slot_for_initiator_spi,
};

/// What the real node's change feed would list for the owner runtime after `command`.
fn note_changes(
    into: &mut Vec<SaId>,
    handed_over: &mut BTreeSet<SaId>,
    command: &Command,
    response: &Response,
) {
    let mut listed = Vec::new();
    changes(command, response, &mut listed);
    for (sa, kinds) in listed {
        if kinds.intersects(ChangeKinds::DATA_PLANE) {
            into.push(sa);
        }
        if kinds.intersects(ChangeKinds::HANDOVER) {
            handed_over.insert(sa);
        }
    }
}
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const STEP_MS: u64 = 5;
const HEARTBEAT_MS: u64 = 50;
const FENCE_MS: u64 = 200;
const FAILOVER_MS: u64 = 300;
const TICK_MS: u64 = 20;
/// Each child's handover state, by inbound SPI.
type ChildStates = Vec<(u32, HandoverState)>;

/// How long a new owner holds for a planned handover (`ownership::handover::HANDOVER_WAIT`).
const HANDOVER_WAIT_MS: u64 = 200;
/// When it takes over regardless (`ownership::handover::HANDOVER_CAP`).
const HANDOVER_CAP_MS: u64 = 3_000;
/// Packets per SA per step (400 packets per second).
const PACKETS_PER_STEP: u64 = 2;
/// Packets per SA per step during a burst (8,000 per second): far beyond what a lease sized
/// for the usual rate covers.
const BURST_PACKETS_PER_STEP: u64 = 40;
/// Longest an SA may go without a working owner while a quorum is up: failure detection,
/// plus an election when the leader went with it, plus scheduling slack.
const ORPHAN_BOUND_MS: u64 = FAILOVER_MS + 400 + 200 + 200;
/// The first lease that comes with a move or an import.
const MOVE_LEASE: u64 = 4_096;

/// A rule of the daemon, broken on purpose so the checks must catch it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Broken {
    /// Everything as the daemon does it.
    Nothing,
    /// A restarted owner resumes at the start of its range, as if none of it had been used.
    LeaseRule,
    /// A restarted owner picks its first numbers from the state it recovered from disk, without
    /// waiting for a read barrier.
    StartBeforeBarrier,
    /// A ping received counts as contact (not only a round trip).
    OneWayContact,
    /// An imported child starts where the exported context's range started.
    ImportAtContextStart,
    /// A new owner standing by for a planned handover takes over when its wait ends, whether
    /// or not the old owner has acted on the move yet.
    TakeOverOnTimer,
}

/// Which faults a run draws from.
#[derive(Copy, Clone, Debug)]
enum Mix {
    /// Every kind.
    All,
    /// Restarts only (crash, bounce, whole-cluster crash), with bursts.
    Restarts,
    /// Asymmetric partitions only.
    Asymmetric,
    /// Exports and imports only.
    ExportImport,
    /// Planned transfers whose old owner's runtime stalls.
    SlowTransfers,
}

/// An SA held in standby for a planned handover (the real node's `HandoverBoard` entry).
#[derive(Debug, Clone, Copy)]
struct Standby {
    deadline: u64,
    cap: u64,
    /// The log length by which the node had applied the move.
    moved_at: u64,
}

struct NoKeys;
impl KeyOpener for NoKeys {
    fn open(&self, _: &IkeSa, _: &ChildSa) -> Option<ChildKeymat> {
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Up,
    Crashed,
    Paused { until: u64 },
}

/// The fake data plane of one node: what the runtime started, sent strictly within limits.
#[derive(Debug, Default)]
struct FakeDriver {
    children: BTreeMap<u32, FakeChild>,
    /// Children that sent or waited for a lease since the runtime last asked (what
    /// `SaDriver::take_active` reports), so the simulation checks the watch-list tick.
    active: Vec<u32>,
}

#[derive(Debug)]
struct FakeChild {
    epoch: Epoch,
    next: u64,
    limit: u64,
    counters: ChildCounters,
    /// Holding for a planned handover: sends nothing until taken over.
    standby: bool,
}

struct SimNode {
    id: NodeId,
    health: Health,
    /// Entries of the committed log this node has applied.
    applied: usize,
    /// The committed index on its disk: saved without a flush, so it lags `applied`; a
    /// restarted node re-applies only up to here before it hears the leader.
    persisted: usize,
    view: State,
    liveness: Liveness,
    runtime: OwnerRuntime,
    driver: FakeDriver,
    fenced: bool,
    known_leader: Option<NodeId>,
    last_leader_contact: u64,
    election_timeout: u64,
    view_changed: bool,
    /// The SAs the change feed listed since the runtime last looked (what the real owner task
    /// reads from `StateReader::changes_since`), and whether it has had its first full look:
    /// after that it reconciles only the listed SAs, as the real one does.
    changed: Vec<SaId>,
    /// Among them, those the feed said moved by a planned handover.
    handed_over: BTreeSet<SaId>,
    /// SAs held in standby for a planned handover (the real node's `HandoverBoard`).
    board: BTreeMap<(SaId, Epoch), Standby>,
    /// The log length its owner runtime last acted on (what its pings say).
    reconciled: u64,
    /// Its owner runtime does not run before this (starved, or busy), while the data plane and
    /// the pings go on.
    stalled_until: u64,
    looked: bool,
    /// Coming back from a fence: the log length the view must reach (and the runtime act on)
    /// before the data plane resumes, as the real node's pinger does.
    barrier: Option<usize>,
    /// After a restart: whether the owner runtime may scan, and the read barrier it waits for.
    scanning: bool,
    start_barrier: Option<usize>,
    /// The fence gate's deadline: the data plane sends only before it.
    open_until: u64,
    /// Highest message ID seen per SA in this node's view.
    msgids: HashMap<SaId, u32>,
}

impl SimNode {
    fn new(id: NodeId, now: u64, rng: &mut StdRng) -> SimNode {
        SimNode {
            id,
            health: Health::Up,
            applied: 0,
            persisted: 0,
            view: State::default(),
            liveness: Liveness::new(id, now),
            runtime: OwnerRuntime::new(id, OwnerConfig::default()),
            driver: FakeDriver::default(),
            fenced: true,
            known_leader: None,
            last_leader_contact: now,
            election_timeout: rng.random_range(200..400),
            view_changed: true,
            changed: Vec::new(),
            handed_over: BTreeSet::new(),
            board: BTreeMap::new(),
            reconciled: 0,
            stalled_until: 0,
            looked: false,
            barrier: None,
            scanning: true,
            start_barrier: None,
            open_until: 0,
            msgids: HashMap::new(),
        }
    }

    fn runs(&self, now: u64) -> bool {
        match self.health {
            Health::Up => true,
            Health::Paused { until } => now >= until,
            Health::Crashed => false,
        }
    }
}

/// A used range, keyed by its first number: (last, epoch, node, time sent).
type UsedBy = (u64, u64, NodeId, u64);

#[derive(Debug, Default)]
struct Ledger {
    /// Per SPI: used ranges.
    used: HashMap<u32, BTreeMap<u64, UsedBy>>,
    /// Per SPI and epoch: first time seen.
    epoch_start: HashMap<(u32, u64), u64>,
    /// Per SPI: epoch -> (lowest, highest) number sent in it.
    epochs: HashMap<u32, BTreeMap<u64, (u64, u64)>>,
}

struct Sim {
    seed: u64,
    now: u64,
    rng: StdRng,
    nodes: Vec<SimNode>,
    /// Node i + 1 cannot send to anyone / receive from anyone.
    cut_out: Vec<bool>,
    cut_in: Vec<bool>,
    log: Vec<Command>,
    truth: State,
    leader: Option<NodeId>,
    pending: Vec<(NodeId, Command)>,
    /// Planned handovers under way: (when the old owner hands off, from, to, SA, epoch, the
    /// children), and the states on their way to the new owner (when, to, SA, epoch, states).
    handoffs: Vec<(u64, NodeId, NodeId, SaId, Epoch, Vec<u32>)>,
    /// Children being handed off, per node: a start or stop of the same child meanwhile claims
    /// it back (as the real owner task's `HandingOff`), and the hand-off leaves it alone.
    handing_off: BTreeSet<(NodeId, u32)>,
    handover_states: Vec<(u64, NodeId, SaId, Epoch, ChildStates)>,
    ledger: Ledger,
    /// Per SA: since when it has had no working owner (while a quorum is up).
    orphaned_since: HashMap<SaId, u64>,
    planner: PlannerConfig,
    broken: Broken,
    bursts: bool,
    /// Exported SAs waiting to be imported again, and when.
    exported: Vec<(u64, IkeSa)>,
    /// SAs the operator exported, whose delete is in flight.
    exporting: HashSet<SaId>,
    /// Per imported SA: the first number of its range in the exported context.
    imported_from: HashMap<SaId, BTreeMap<u32, u64>>,
    imports: u64,
    trace: bool,
}

impl Sim {
    fn fail(&self, what: String) -> ! {
        panic!("seed {}: at {} ms: {what}", self.seed, self.now);
    }

    fn node(&self, id: NodeId) -> &SimNode {
        &self.nodes[(id - 1) as usize]
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    fn majority(&self) -> usize {
        self.nodes.len() / 2 + 1
    }

    /// Whether a message from `a` reaches `b` now.
    fn can_send(&self, a: NodeId, b: NodeId) -> bool {
        let (na, nb) = (self.node(a), self.node(b));
        (a == b || (!self.cut_out[(a - 1) as usize] && !self.cut_in[(b - 1) as usize]))
            && na.runs(self.now)
            && nb.runs(self.now)
    }

    /// Whether `a` and `b` can exchange a request and its answer.
    fn round_trip(&self, a: NodeId, b: NodeId) -> bool {
        self.can_send(a, b) && self.can_send(b, a)
    }

    fn reach(&self, from: NodeId) -> usize {
        self.nodes
            .iter()
            .filter(|n| self.round_trip(from, n.id))
            .count()
    }

    /// The leader can commit: it runs and reaches a majority.
    fn leader_can_commit(&self) -> Option<NodeId> {
        self.leader.filter(|l| self.reach(*l) >= self.majority())
    }

    fn bootstrap(&mut self, sas: u64) {
        // Registry and slots through the real planner, as the first leader would.
        let voters = self.voters();
        let mut liveness = Liveness::new(1, 0);
        for n in 2..=self.nodes.len() as u64 {
            liveness.heard(n, 0, PeerView::default());
        }
        let first = plan(
            &PlanInput {
                state: &self.truth,
                voters: &voters,
                liveness: &liveness,
                now_ms: 0,
                wall_ms: 0,
                rebalance: false,
                leader: 1,
            },
            &self.planner,
        );
        let placed = self.commit(first.command.expect("initial placement"));
        assert!(!has_rejection(&placed), "{placed:?}");
        for id in 1..=sas {
            let spi_i = id.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let slot = slot_for_initiator_spi(spi_i);
            let owner = self.truth.slots().owner(slot).expect("slot owned");
            let child_spi = 0x1000 + id as u32;
            let sa =
                fixture::without_keys(fixture::ike_sa(SaId(id), spi_i, slot, owner, child_spi));
            let created = self.commit(Command::CreateSa(Box::new(sa)));
            assert!(!has_rejection(&created), "{created:?}");
        }
        self.leader = Some(1);
    }

    fn commit(&mut self, command: Command) -> Response {
        let response = apply(&mut self.truth, &command);
        self.log.push(command);
        response
    }

    /// Packets a child wants to send this step.
    fn rate(&self, spi: u32) -> u64 {
        // A burst of 200 ms every few seconds, at a time of its own per SA.
        let phase = (self.now / 1_000 + u64::from(spi)) % 4;
        if self.bursts && phase == 0 && self.now % 1_000 < 200 {
            BURST_PACKETS_PER_STEP
        } else {
            PACKETS_PER_STEP
        }
    }

    /// One virtual step.
    fn step(&mut self) {
        self.now += STEP_MS;
        let now = self.now;
        self.run_handovers();
        for i in 0..self.nodes.len() {
            if let Health::Paused { until } = self.nodes[i].health
                && now >= until
            {
                self.nodes[i].health = Health::Up;
            }
        }

        // Elections: a node that has not heard a leader able to commit for its timeout, and
        // reaches a majority, takes over.
        let current = self.leader_can_commit();
        for i in 0..self.nodes.len() {
            let id = self.nodes[i].id;
            if current.is_some_and(|l| self.can_send(l, id)) {
                self.nodes[i].last_leader_contact = now;
                self.nodes[i].known_leader = current;
            }
        }
        if current.is_none() {
            let candidate = self
                .nodes
                .iter()
                .filter(|n| n.runs(now) && now - n.last_leader_contact > n.election_timeout)
                .map(|n| n.id)
                .find(|id| self.reach(*id) >= self.majority());
            if let Some(new) = candidate {
                if self.trace {
                    eprintln!("{now} ms: node {new} elected leader");
                }
                self.leader = Some(new);
                for i in 0..self.nodes.len() {
                    let id = self.nodes[i].id;
                    if self.can_send(new, id) {
                        self.nodes[i].known_leader = Some(new);
                        self.nodes[i].last_leader_contact = now;
                    }
                }
            }
        }

        // Proposals made last step.
        let pending = std::mem::take(&mut self.pending);
        let mut refused_to: BTreeSet<NodeId> = BTreeSet::new();
        for (proposer, command) in pending {
            let ok = match self.leader_can_commit() {
                Some(l) => self.round_trip(proposer, l),
                None => false,
            };
            let response = if ok { Some(self.commit(command)) } else { None };
            match &response {
                Some(r) if !has_rejection(r) => self.on_committed(r),
                _ => {
                    refused_to.insert(proposer);
                }
            }
        }
        for id in refused_to {
            self.nodes[(id - 1) as usize].runtime.on_proposal_failed();
        }
        // Exported SAs come back in their turn.
        self.import_due();

        // Replication: nodes the committing leader replicates to catch up with the log (a
        // follower whose acknowledgements are lost stops getting new entries once the leader's
        // window of unacknowledged appends is full: modelled as needing a round trip); the
        // committed index reaches their disk now and then (it is saved without a flush).
        if let Some(l) = self.leader_can_commit() {
            for i in 0..self.nodes.len() {
                let id = self.nodes[i].id;
                if self.round_trip(l, id) && self.nodes[i].applied < self.log.len() {
                    let node = &mut self.nodes[i];
                    for command in &self.log[node.applied..] {
                        let response = apply(&mut node.view, command);
                        note_changes(&mut node.changed, &mut node.handed_over, command, &response);
                    }
                    node.applied = self.log.len();
                    node.view_changed = true;
                }
            }
        }
        for i in 0..self.nodes.len() {
            if self.nodes[i].runs(now) && self.rng.random_ratio(1, 8) {
                self.nodes[i].persisted = self.nodes[i].applied;
            }
        }

        // Liveness: every heartbeat each node pings every other; an answer is contact.
        if now.is_multiple_of(HEARTBEAT_MS) {
            let ids: Vec<NodeId> = self.nodes.iter().map(|n| n.id).collect();
            for &a in &ids {
                for &b in &ids {
                    let heard = if self.broken == Broken::OneWayContact {
                        // The bug: b's ping reaching a counts as contact.
                        a != b && (self.round_trip(a, b) || self.can_send(b, a))
                    } else {
                        a != b && self.round_trip(a, b)
                    };
                    if heard {
                        let view = {
                            let nb = self.node(b);
                            if self.leader == Some(b) && current == Some(b) {
                                PeerView {
                                    leader: Some(b),
                                    leader_contact_age_ms: Some(0),
                                    serving: !nb.fenced,
                                    reconciled: nb.reconciled,
                                }
                            } else {
                                nb.liveness
                                    .view(nb.known_leader, now, !nb.fenced, nb.reconciled)
                            }
                        };
                        self.nodes[(a - 1) as usize].liveness.heard(b, now, view);
                    }
                }
            }
        }

        // Each node that runs: fence, data plane, runtime, planner, IKE commits.
        let voters = self.voters();
        for i in 0..self.nodes.len() {
            if !self.nodes[i].runs(now) {
                continue;
            }
            let id = self.nodes[i].id;
            // A read index answers only over a round trip with a leader that can commit.
            let read_index = self
                .leader_can_commit()
                .filter(|l| self.round_trip(*l, id))
                .map(|_| self.log.len());
            let node = &mut self.nodes[i];
            // After a restart, the owner runtime waits for a read barrier and for the view to
            // reach it before it scans anything (see `evpc_node::ownership::owner_task`).
            if !node.scanning {
                if node.start_barrier.is_none() {
                    node.start_barrier = read_index;
                }
                if let Some(target) = node.start_barrier
                    && node.applied >= target
                {
                    node.scanning = true;
                    node.view_changed = true;
                }
            }
            // As the real pinger: a gate that ran out counts as a fence; coming back, wait
            // for the view to reach the leader's read index.
            let was_fenced = node.fenced || now >= node.open_until;
            if node.liveness.fence(&voters, now, FENCE_MS).is_some() {
                node.fenced = true;
                node.barrier = None;
            } else if was_fenced {
                node.fenced = true;
                if node.barrier.is_none() {
                    node.barrier = read_index;
                }
                if let Some(target) = node.barrier
                    && node.applied >= target
                    && node.scanning
                    && !node.view_changed
                {
                    node.fenced = false;
                    node.barrier = None;
                }
            }
            if !node.fenced {
                node.open_until = node
                    .liveness
                    .open_until(&voters, now, FENCE_MS)
                    .unwrap_or(0);
            }
            if !node.fenced && now < node.open_until {
                let spis: Vec<u32> = node
                    .driver
                    .children
                    .iter()
                    .filter(|(_, c)| !c.standby)
                    .map(|(spi, _)| *spi)
                    .collect();
                let rates: Vec<u64> = spis.iter().map(|s| self.rate(*s)).collect();
                let node = &mut self.nodes[i];
                let mut sent = Vec::new();
                for (spi, wanted) in spis.iter().zip(rates) {
                    let child = node.driver.children.get_mut(spi).expect("listed");
                    let room = (child.limit + 1).saturating_sub(child.next);
                    let n = wanted.min(room);
                    child.counters.lease_waits += wanted - n;
                    if wanted > 0 {
                        node.driver.active.push(*spi);
                    }
                    if n > 0 {
                        sent.push((*spi, child.epoch.0, child.next, child.next + n - 1, id));
                        child.next += n;
                        child.counters.highest_out = child.next - 1;
                        child.counters.out_packets += n;
                    }
                }
                for (spi, epoch, first, last, id) in sent {
                    self.record(spi, epoch, first, last, id);
                }
            }
            let node = &mut self.nodes[i];
            let mut actions = Vec::new();
            let stalled = now < node.stalled_until;
            let mut acted_on = None;
            if node.view_changed && node.scanning && !stalled {
                if node.looked {
                    node.changed.sort_unstable();
                    node.changed.dedup();
                    actions.extend(node.runtime.on_changes(
                        &node.view,
                        &node.changed,
                        &node.handed_over,
                        now,
                        &NoKeys,
                    ));
                } else {
                    actions.extend(node.runtime.on_state(&node.view, now, &NoKeys));
                    node.looked = true;
                }
                node.changed.clear();
                node.handed_over.clear();
                node.view_changed = false;
                acted_on = Some(node.applied as u64);
            }
            if now.is_multiple_of(TICK_MS) && !stalled {
                let active = std::mem::take(&mut node.driver.active);
                let driver = &node.driver;
                actions.extend(node.runtime.on_tick(
                    now,
                    &|spi| driver.children.get(&spi).map(|c| c.counters),
                    Some(&active),
                ));
            }
            for action in actions {
                self.run_action(i, action, id);
            }
            // As the real owner task: the index is published once the actions ran (a hand-off
            // has held its children by then).
            if let Some(index) = acted_on {
                self.nodes[i].reconciled = index;
            }
            // The IKE engine on the owner: now and then a message-ID advance for an SA it owns.
            let node = &self.nodes[i];
            if !node.fenced && self.rng.random_ratio(1, 20) {
                let owned: Vec<&IkeSa> = node.view.sas().filter(|sa| sa.owner == id).collect();
                if !owned.is_empty() {
                    let sa = owned[self.rng.random_range(0..owned.len())];
                    let command = Command::Update {
                        sa: sa.id,
                        epoch: sa.epoch,
                        updates: vec![SaUpdate::PeerRequestAnswered {
                            msg_id: sa.msg.next_peer_request,
                            response: vec![vec![7; 40]],
                        }],
                    };
                    self.pending.push((id, command));
                }
            }
        }

        // The leader's planner, every heartbeat.
        if now.is_multiple_of(HEARTBEAT_MS)
            && let Some(l) = self.leader
            && self.node(l).runs(now)
        {
            let node = self.node(l);
            let decided = plan(
                &PlanInput {
                    state: &node.view,
                    voters: &voters,
                    liveness: &node.liveness,
                    now_ms: now,
                    wall_ms: now,
                    rebalance: true,
                    leader: l,
                },
                &self.planner,
            );
            if let Some(command) = decided.command {
                if self.trace && (decided.takeovers > 0 || !decided.declared_down.is_empty()) {
                    eprintln!(
                        "{now} ms: leader {l} declares {:?} down, {} takeovers",
                        decided.declared_down, decided.takeovers
                    );
                }
                self.pending.push((l, command));
            }
        }
        self.check();
    }

    /// An operator's export that was committed: the SA comes back by import a little later.
    fn on_committed(&mut self, response: &Response) {
        let mut removed = Vec::new();
        collect_removed(response, &mut removed);
        for sa in removed {
            if self.exporting.remove(&sa.id) {
                let at = self.now + self.rng.random_range(100..800);
                self.exported.push((at, sa));
            }
        }
    }

    /// Imports the exported SAs that are due, through the leader (an operator's `sa import`).
    fn import_due(&mut self) {
        let now = self.now;
        let Some(leader) = self.leader_can_commit() else {
            return;
        };
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.exported)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.exported = later;
        for (_, sa) in due {
            let starts: BTreeMap<u32, u64> = sa
                .children
                .values()
                .map(|c| (c.in_spi, c.out_start))
                .collect();
            let mut context = sa.clone();
            context.owner = 0;
            let response = self.commit(Command::ImportSa {
                sa: Box::new(context),
                lease: MOVE_LEASE,
                now_ms: now,
            });
            match response {
                // No node owns the slot right now (its owner just went down): again later.
                Err(
                    evpc_raft_store::Rejection::NotSlotOwner { .. }
                    | evpc_raft_store::Rejection::NodeNotActive { .. },
                ) => self.exported.push((now + 100, sa)),
                Ok(Applied::Placed { owner, epoch }) => {
                    if self.trace {
                        eprintln!(
                            "{now} ms: SA {} imported by node {owner} in epoch {epoch} (leader {leader})",
                            sa.id
                        );
                    }
                    self.imports += 1;
                    self.imported_from.insert(sa.id, starts);
                }
                other => self.fail(format!("import of SA {} refused: {other:?}", sa.id)),
            }
        }
    }

    fn run_action(&mut self, i: usize, action: Action, id: NodeId) {
        match action {
            Action::StartStandby(child) => {
                let (in_spi, sa, epoch) = (child.in_spi, child.ike, child.epoch);
                self.run_action(i, Action::Start(child), id);
                let node = &mut self.nodes[i];
                if let Some(c) = node.driver.children.get_mut(&in_spi) {
                    c.standby = true;
                    node.board.insert(
                        (sa, epoch),
                        Standby {
                            deadline: self.now + HANDOVER_WAIT_MS,
                            cap: self.now + HANDOVER_CAP_MS,
                            moved_at: node.applied as u64,
                        },
                    );
                }
            }
            Action::HandOff {
                sa,
                epoch,
                to,
                in_spis,
            } => {
                // The old owner holds them at once, and asks the new one (a round trip or two)
                // whether it holds too; then it hands them off and sends their state.
                for spi in &in_spis {
                    if let Some(c) = self.nodes[i].driver.children.get_mut(spi) {
                        c.standby = true;
                    }
                }
                let delay = STEP_MS * self.rng.random_range(0..4);
                self.handing_off
                    .extend(in_spis.iter().map(|spi| (id, *spi)));
                self.handoffs
                    .push((self.now + delay, id, to, sa, epoch, in_spis));
            }
            Action::TakeOver {
                sa, epoch, in_spi, ..
            } => {
                let node = &mut self.nodes[i];
                if let Some(c) = node.driver.children.get_mut(&in_spi) {
                    c.standby = false;
                }
                node.board.remove(&(sa, epoch));
            }
            Action::Start(child) => {
                self.handing_off.remove(&(id, child.in_spi));
                if self.trace && child.in_spi == 0x1001 {
                    eprintln!(
                        "{} ms: node {id} starts {:08x} epoch {} at {} limit {}",
                        self.now, child.in_spi, child.epoch, child.next_seq, child.limit
                    );
                }
                let broken = self.broken;
                let context_start = self
                    .imported_from
                    .get(&child.ike)
                    .and_then(|starts| starts.get(&child.in_spi))
                    .copied();
                let node = &mut self.nodes[i];
                let mut next = child.next_seq;
                match broken {
                    // Resuming at the start of the owner's range after a restart, as if none
                    // of it had been used.
                    Broken::LeaseRule => {
                        if let Some(sa) = node.view.sa(child.ike)
                            && let Some(c) = sa.children.get(&child.in_spi)
                        {
                            next = c.out_start;
                        }
                    }
                    // An imported child at the exported context's own range start.
                    Broken::ImportAtContextStart => {
                        if let Some(start) = context_start {
                            next = start;
                        }
                    }
                    _ => {}
                }
                node.driver.children.insert(
                    child.in_spi,
                    FakeChild {
                        epoch: child.epoch,
                        next,
                        limit: child.limit,
                        counters: ChildCounters {
                            highest_out: next.saturating_sub(1),
                            ..ChildCounters::default()
                        },
                        standby: false,
                    },
                );
            }
            Action::Extend { in_spi, limit } => {
                if let Some(c) = self.nodes[i].driver.children.get_mut(&in_spi) {
                    c.limit = c.limit.max(limit);
                }
            }
            Action::Stop { in_spi } => {
                self.handing_off.remove(&(id, in_spi));
                if self.trace && in_spi == 0x1001 {
                    eprintln!("{} ms: node {id} stops {in_spi:08x}", self.now);
                }
                self.nodes[i].driver.children.remove(&in_spi);
            }
            Action::Propose(command) => self.pending.push((id, command)),
        }
    }

    /// Hand-offs and handover states that are due: the old owner stops the children (if it still
    /// runs: a crash took them already) and sends their state; the new owner, if it runs, takes
    /// them over with it.
    fn run_handovers(&mut self) {
        let now = self.now;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.handoffs)
            .into_iter()
            .partition(|h| h.0 <= now);
        self.handoffs = later;
        for (_, from, to, sa, epoch, in_spis) in due {
            // The prepare: the new owner, if it runs and still holds, moves its deadline ahead.
            let target = &mut self.nodes[(to - 1) as usize];
            if target.health == Health::Up
                && let Some(standby) = target.board.get_mut(&(sa, epoch))
            {
                standby.deadline = standby.deadline.max(now + HANDOVER_WAIT_MS);
            }
            let node = &mut self.nodes[(from - 1) as usize];
            if node.health == Health::Crashed {
                continue;
            }
            let handing_off = &mut self.handing_off;
            let states = in_spis
                .iter()
                .filter(|spi| handing_off.remove(&(from, **spi)))
                .filter_map(|spi| {
                    let child = node.driver.children.remove(spi)?;
                    Some((
                        *spi,
                        HandoverState {
                            highest_out: child.counters.highest_out,
                            ..HandoverState::default()
                        },
                    ))
                })
                .collect();
            self.handover_states
                .push((now + STEP_MS, to, sa, epoch, states));
        }
        // Waits that ended without the old owner's state: past the deadline, and nobody else
        // can still be sending (as the real owner task asks `HandoverBoard::expired`).
        let on_timer = self.broken == Broken::TakeOverOnTimer;
        for i in 0..self.nodes.len() {
            if self.nodes[i].health != Health::Up || now < self.nodes[i].stalled_until {
                continue;
            }
            let node = &self.nodes[i];
            let expired: Vec<(SaId, Epoch)> = node
                .board
                .iter()
                .filter(|(_, s)| {
                    s.deadline <= now
                        && (on_timer
                            || s.cap <= now
                            || nobody_else_sends(&node.view, &node.liveness, node.id, s.moved_at))
                })
                .map(|(key, _)| *key)
                .collect();
            let id = self.nodes[i].id;
            for (sa, epoch) in expired {
                if self.trace {
                    eprintln!(
                        "{now} ms: node {id} takes SA {sa} (epoch {epoch}) over without state"
                    );
                }
                self.nodes[i].board.remove(&(sa, epoch));
                let actions = self.nodes[i].runtime.on_expired(sa, epoch);
                for action in actions {
                    self.run_action(i, action, id);
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.handover_states)
            .into_iter()
            .partition(|h| h.0 <= now);
        self.handover_states = later;
        for (_, to, sa, epoch, states) in due {
            let i = (to - 1) as usize;
            if self.nodes[i].health != Health::Up {
                continue;
            }
            if self.trace {
                eprintln!("{now} ms: node {to} receives SA {sa}'s state (epoch {epoch})");
            }
            let actions = self.nodes[i].runtime.on_handover(sa, epoch, states);
            for action in actions {
                self.run_action(i, action, to);
            }
        }
    }

    fn record(&mut self, spi: u32, epoch: u64, first: u64, last: u64, node: NodeId) {
        let now = self.now;
        let used = self.ledger.used.entry(spi).or_default();
        // 1. No sequence number twice.
        if let Some((f, (l, e, n, t))) = used.range(..=last).next_back()
            && *l >= first
        {
            let what = format!(
                "SPI {spi:08x}: node {node} (epoch {epoch}) sent {first}..={last}, overlapping \
                 {f}..={l} sent by node {n} (epoch {e}) at {t} ms"
            );
            self.fail(what);
        }
        used.insert(first, (last, epoch, node, now));
        // 2. Numbers rise across owners.
        let epochs = self.ledger.epochs.entry(spi).or_default();
        let seen = epochs.entry(epoch).or_insert((first, last));
        seen.0 = seen.0.min(first);
        seen.1 = seen.1.max(last);
        let newer_below = epochs.range(epoch + 1..).any(|(_, (lo, _))| *lo <= last);
        let older_above = epochs.range(..epoch).any(|(_, (_, hi))| *hi >= first);
        if newer_below || older_above {
            self.fail(format!("SPI {spi:08x}: epoch {epoch} numbers {first}..={last} out of order with another epoch"));
        }
        // 5. No two owners after the fence timeout.
        self.ledger.epoch_start.entry((spi, epoch)).or_insert(now);
        let newer_started = self
            .ledger
            .epochs
            .get(&spi)
            .into_iter()
            .flat_map(|epochs| epochs.range(epoch + 1..).map(|(e, _)| *e))
            .filter_map(|e| self.ledger.epoch_start.get(&(spi, e)).copied())
            .min();
        if let Some(t) = newer_started
            && now >= t
        {
            self.fail(format!(
                "SPI {spi:08x}: node {node} still sends in epoch {epoch}, {} ms after a newer owner started",
                now - t
            ));
        }
    }

    fn check(&mut self) {
        let now = self.now;
        // 3. Message IDs never move backwards in any node's view.
        for i in 0..self.nodes.len() {
            let node = &mut self.nodes[i];
            let views: Vec<(SaId, u32)> = node
                .view
                .sas()
                .map(|sa| (sa.id, sa.msg.next_peer_request))
                .collect();
            for (sa, next) in views {
                let seen = node.msgids.entry(sa).or_insert(next);
                if next < *seen {
                    let what = format!(
                        "node {}: SA {sa} message ID went back from {seen} to {next}",
                        node.id
                    );
                    self.fail(what);
                }
                *seen = next;
            }
        }
        // 4. An SA without a working owner (down, paused, cut off or fenced) for too long, while
        //    a leader can commit.
        let quorum = self.leader_can_commit().is_some();
        let mut violation = None;
        let status: Vec<(SaId, NodeId, bool, Health, bool)> = self
            .truth
            .sas()
            .map(|sa| {
                let owner = self.node(sa.owner);
                let working = owner.runs(now)
                    && !owner.fenced
                    && owner.driver.children.values().any(|c| c.epoch == sa.epoch);
                (sa.id, sa.owner, working, owner.health, owner.fenced)
            })
            .collect();
        // An SA that left the state (deleted, exported) starts afresh if it comes back.
        let truth = &self.truth;
        self.orphaned_since.retain(|sa, _| truth.sa(*sa).is_some());
        for (sa, owner, working, health, fenced) in status {
            if working || !quorum {
                self.orphaned_since.remove(&sa);
                continue;
            }
            let since = *self.orphaned_since.entry(sa).or_insert(now);
            if now - since > ORPHAN_BOUND_MS && violation.is_none() {
                violation = Some(format!(
                    "SA {sa} has had no working owner for {} ms (owner {owner} {health:?}, fenced {fenced})",
                    now - since
                ));
            }
        }
        if let Some(what) = violation {
            self.fail(what);
        }
    }

    /// Planned moves of up to three SAs of one owner to other serving nodes, through the
    /// leader, with the owner's runtime stalled for up to 900 ms from now.
    fn slow_transfer(&mut self) {
        let Some(l) = self.leader_can_commit() else {
            return;
        };
        let sas: Vec<(SaId, Epoch, NodeId)> = self
            .truth
            .sas()
            .map(|sa| (sa.id, sa.epoch, sa.owner))
            .collect();
        let (_, _, owner) = sas[self.rng.random_range(0..sas.len())];
        let targets: Vec<NodeId> = self
            .truth
            .nodes()
            .iter()
            .filter(|(id, r)| {
                **id != owner && **id != l && r.state == evpc_raft_store::NodeState::Active
            })
            .map(|(id, _)| *id)
            .collect();
        if targets.is_empty() {
            return;
        }
        let moves: Vec<evpc_raft_store::OwnerMove> = sas
            .iter()
            .filter(|(_, _, o)| *o == owner)
            .take(3)
            .map(|(sa, epoch, _)| evpc_raft_store::OwnerMove {
                sa: *sa,
                from_epoch: *epoch,
                to: targets[self.rng.random_range(0..targets.len())],
                lease: MOVE_LEASE,
                handover: true,
            })
            .collect();
        let stall = self.rng.random_range(50..900);
        if self.trace {
            eprintln!(
                "{} ms: {} SAs of node {owner} transferred, its runtime stalled for {stall} ms",
                self.now,
                moves.len()
            );
        }
        self.pending.push((l, Command::AssignOwners(moves)));
        self.nodes[(owner - 1) as usize].stalled_until = self.now + stall;
    }

    fn crash(&mut self, id: NodeId) {
        let n = &mut self.nodes[(id - 1) as usize];
        n.health = Health::Crashed;
        n.driver = FakeDriver::default();
    }

    fn restart(&mut self, id: NodeId) {
        let now = self.now;
        let timeout = self.rng.random_range(200..400);
        let broken = self.broken;
        let n = &mut self.nodes[(id - 1) as usize];
        if n.health != Health::Crashed {
            return;
        }
        // A new process: the durable log survives, but it re-applies only up to the committed
        // index that reached the disk; nothing else survives.
        n.health = Health::Up;
        n.view = State::default();
        for command in &self.log[..n.persisted] {
            let _ = apply(&mut n.view, command);
        }
        n.changed.clear();
        n.handed_over.clear();
        n.board.clear();
        n.reconciled = 0;
        n.stalled_until = 0;
        self.handing_off.retain(|(node, _)| *node != id);
        n.looked = false;
        n.applied = n.persisted;
        n.liveness = Liveness::new(id, now);
        n.runtime = OwnerRuntime::new(id, OwnerConfig::default());
        n.driver = FakeDriver::default();
        n.fenced = true;
        n.barrier = None;
        n.scanning = broken == Broken::StartBeforeBarrier;
        n.start_barrier = None;
        n.open_until = 0;
        n.known_leader = None;
        n.last_leader_contact = now;
        n.election_timeout = timeout;
        n.view_changed = true;
        n.msgids.clear();
        if self.leader == Some(id) {
            self.leader = None;
        }
    }
}

fn has_rejection(response: &Response) -> bool {
    match response {
        Err(_) => true,
        Ok(Applied::Batch(results)) => results.iter().any(has_rejection),
        Ok(_) => false,
    }
}

fn collect_removed(response: &Response, out: &mut Vec<IkeSa>) {
    match response {
        Ok(Applied::Removed(sa)) => out.push((**sa).clone()),
        Ok(Applied::Batch(results)) => results.iter().for_each(|r| collect_removed(r, out)),
        _ => {}
    }
}

/// What a run did, for the tests' sanity checks.
#[derive(Debug, Default)]
struct Summary {
    faults: BTreeMap<&'static str, u32>,
    imports: u64,
    sent: u64,
}

/// Runs one seeded scenario: faults every 0.5–2 s for `seconds` virtual seconds, then heals
/// and checks that every SA runs again.
fn run(seed: u64, seconds: u64, broken: Broken, mix: Mix) -> Summary {
    let mut rng = StdRng::seed_from_u64(seed);
    let n_nodes = 3 + u64::from(seed.is_multiple_of(3)) * 2;
    let nodes = (1..=n_nodes)
        .map(|id| SimNode::new(id, 0, &mut rng))
        .collect();
    let bursts = matches!(mix, Mix::Restarts) || seed.is_multiple_of(2);
    let mut sim = Sim {
        seed,
        now: 0,
        rng,
        nodes,
        cut_out: vec![false; n_nodes as usize],
        cut_in: vec![false; n_nodes as usize],
        log: Vec::new(),
        truth: State::default(),
        leader: None,
        pending: Vec::new(),
        handoffs: Vec::new(),
        handing_off: BTreeSet::new(),
        handover_states: Vec::new(),
        ledger: Ledger::default(),
        orphaned_since: HashMap::new(),
        planner: PlannerConfig {
            failover_ms: FAILOVER_MS,
            move_lease: MOVE_LEASE,
            moves_per_round: 10,
            leader_serves: false,
        },
        broken,
        bursts,
        exported: Vec::new(),
        exporting: HashSet::new(),
        imported_from: HashMap::new(),
        imports: 0,
        trace: std::env::var("EVPC_SIM_TRACE").is_ok(),
    };
    sim.bootstrap(24);
    let mut summary = Summary::default();
    let end = seconds * 1000;
    let mut next_fault = 500;
    let mut heal_at: Vec<(u64, NodeId, &'static str)> = Vec::new();
    while sim.now < end {
        sim.step();
        let now = sim.now;
        heal_at.retain(|(at, id, kind)| {
            if *at > now {
                return true;
            }
            match *kind {
                "restart" => sim.restart(*id),
                "heal" => {
                    sim.cut_out[(*id - 1) as usize] = false;
                    sim.cut_in[(*id - 1) as usize] = false;
                }
                _ => {}
            }
            false
        });
        if now >= next_fault
            && heal_at.is_empty()
            && sim.nodes.iter().all(|n| n.stalled_until <= now)
        {
            let victim = sim.rng.random_range(1..=n_nodes);
            let kinds: &[&'static str] = match mix {
                Mix::All => &[
                    "crash",
                    "kill-leader",
                    "bounce",
                    "pause",
                    "partition",
                    "asym-partition",
                    "cluster-crash",
                    "export-import",
                    "slow-transfer",
                ],
                Mix::Restarts => &["crash", "bounce", "cluster-crash", "kill-leader"],
                Mix::Asymmetric => &["asym-partition"],
                Mix::ExportImport => &["export-import"],
                Mix::SlowTransfers => &["slow-transfer"],
            };
            let kind = kinds[sim.rng.random_range(0..kinds.len())];
            *summary.faults.entry(kind).or_default() += 1;
            if sim.trace {
                eprintln!(
                    "{now} ms: {kind} on node {victim} (leader {:?})",
                    sim.leader
                );
            }
            match kind {
                "crash" => {
                    sim.crash(victim);
                    heal_at.push((now + sim.rng.random_range(400..1500), victim, "restart"));
                }
                "kill-leader" => {
                    if let Some(l) = sim.leader {
                        sim.crash(l);
                        heal_at.push((now + sim.rng.random_range(400..1500), l, "restart"));
                    }
                }
                // Back before anyone noticed.
                "bounce" => {
                    sim.crash(victim);
                    heal_at.push((now + sim.rng.random_range(20..150), victim, "restart"));
                }
                "cluster-crash" => {
                    let back = now + sim.rng.random_range(20..1500);
                    for id in 1..=n_nodes {
                        sim.crash(id);
                        heal_at.push((back + sim.rng.random_range(0..100), id, "restart"));
                    }
                }
                // Longer or shorter than the failover timeout.
                "pause" => {
                    let until = now + sim.rng.random_range(100..1200);
                    sim.nodes[(victim - 1) as usize].health = Health::Paused { until };
                }
                "partition" => {
                    sim.cut_out[(victim - 1) as usize] = true;
                    sim.cut_in[(victim - 1) as usize] = true;
                    heal_at.push((now + sim.rng.random_range(200..1500), victim, "heal"));
                }
                // One direction only: it hears the others, they do not hear it (or the
                // reverse).
                "asym-partition" => {
                    if sim.rng.random_bool(0.5) {
                        sim.cut_out[(victim - 1) as usize] = true;
                    } else {
                        sim.cut_in[(victim - 1) as usize] = true;
                    }
                    heal_at.push((now + sim.rng.random_range(400..1500), victim, "heal"));
                }
                // An operator transfers a few SAs (planned moves) while their owner's runtime is
                // starved: it applies the moves late, its data plane sending meanwhile.
                "slow-transfer" => sim.slow_transfer(),
                // An operator exports (--remove) a few SAs through the leader and imports them
                // again a little later.
                _ => {
                    if let Some(l) = sim.leader {
                        let ids: Vec<SaId> = sim.truth.sas().map(|sa| sa.id).collect();
                        for _ in 0..3 {
                            let sa = ids[sim.rng.random_range(0..ids.len())];
                            if sim.exporting.insert(sa) {
                                sim.pending.push((l, Command::DeleteSa { sa, epoch: None }));
                            }
                        }
                    }
                }
            }
            next_fault = now + sim.rng.random_range(500..2000);
        }
    }
    // Heal everything and let it settle: every SA must run again.
    for id in 1..=n_nodes {
        sim.cut_out[(id - 1) as usize] = false;
        sim.cut_in[(id - 1) as usize] = false;
        sim.restart(id);
        if let Health::Paused { .. } = sim.node(id).health {
            sim.nodes[(id - 1) as usize].health = Health::Up;
        }
    }
    sim.exporting.clear();
    for _ in 0..(3_000 / STEP_MS) {
        sim.step();
    }
    assert!(
        sim.exported.is_empty(),
        "seed {seed}: exported SAs never imported"
    );
    for sa in sim.truth.sas() {
        let owner = sim.node(sa.owner);
        assert!(
            owner.driver.children.values().any(|c| c.epoch == sa.epoch),
            "seed {seed}: SA {} not running on its owner {} after healing",
            sa.id,
            sa.owner
        );
    }
    summary.imports = sim.imports;
    summary.sent = sim
        .ledger
        .used
        .values()
        .flat_map(|m| m.iter().map(|(f, (l, ..))| l - f + 1))
        .sum();
    assert!(
        summary.sent > 24 * 1000,
        "seed {seed}: the data plane barely ran ({} packets)",
        summary.sent
    );
    summary
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("EVPC_SIM_SEED") {
        return vec![seed.parse().expect("EVPC_SIM_SEED is a number")];
    }
    let count = std::env::var("EVPC_SIM_SEEDS")
        .map_or(16, |n| n.parse().expect("EVPC_SIM_SEEDS is a number"));
    (1..=count).collect()
}

#[test]
fn faults_never_reuse_a_sequence_number_or_leave_sas_unowned() {
    let mut total = Summary::default();
    for seed in seeds() {
        let summary = run(seed, 20, Broken::Nothing, Mix::All);
        for (kind, n) in summary.faults {
            *total.faults.entry(kind).or_default() += n;
        }
        total.imports += summary.imports;
        total.sent += summary.sent;
    }
    eprintln!(
        "faults {:?}, {} imports, {} sequence numbers, none reused",
        total.faults, total.imports, total.sent
    );
}

/// Runs seeds with `broken` until one fails; the failure must be of the expected kind.
fn caught(broken: Broken, mix: Mix, expected: &[&str]) {
    for seed in 1..=16u64 {
        let outcome = std::panic::catch_unwind(|| run(seed, 12, broken, mix));
        if let Err(payload) = outcome {
            let failure = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "non-string panic".into());
            assert!(
                expected.iter().any(|e| failure.contains(e)),
                "{broken:?} broke the run in an unexpected way: {failure}"
            );
            eprintln!("{broken:?} caught: {failure}");
            return;
        }
    }
    panic!("no seed caught {broken:?}");
}

/// A restarted owner resuming at the start of its range, as if it had not used any of it:
/// the checks must catch a reused sequence number.
#[test]
fn breaking_the_lease_rule_is_caught() {
    caught(Broken::LeaseRule, Mix::Restarts, &["overlapping"]);
}

/// Picking first numbers from the recovered state (its committed index lagging) instead of
/// after a read barrier: a restarted owner sends numbers it had used before the crash.
#[test]
fn starting_before_the_read_barrier_is_caught() {
    caught(Broken::StartBeforeBarrier, Mix::Restarts, &["overlapping"]);
}

/// Counting a received ping as contact: in an asymmetric partition the cut-off node keeps
/// running beside the owner that took its SAs over.
#[test]
fn one_way_contact_is_caught() {
    caught(
        Broken::OneWayContact,
        Mix::Asymmetric,
        &["after a newer owner started", "no working owner"],
    );
}

/// Taking a planned handover over on a bare timer: the old owner, late to apply the move,
/// still sends beside its successor.
#[test]
fn taking_over_on_a_timer_is_caught() {
    caught(
        Broken::TakeOverOnTimer,
        Mix::SlowTransfers,
        &["after a newer owner started"],
    );
}

/// Starting an imported child where the exported context's range started: numbers used
/// before the export are sent again.
#[test]
fn importing_at_the_context_start_is_caught() {
    caught(
        Broken::ImportAtContextStart,
        Mix::ExportImport,
        &["overlapping", "out of order"],
    );
}
