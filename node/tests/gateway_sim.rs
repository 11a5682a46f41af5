//! Deterministic simulation of the IKE gateway's per-SA machines on virtual time.
//!
//! The real [`SaMachine`] runs on several nodes, the real `evpc_ike` initiator engines set up
//! SAs, send DPDs and rekey children and IKE SAs, through a network that delays, reorders,
//! duplicates and drops datagrams. The replicated log is `evpc_raft_store::apply` on one
//! `State`; a commit takes virtual time and may be lost (`NotCommitted`) or be applied but
//! reported lost. Faults: takeover (`AssignOwners`, a new epoch; the old owner is told late,
//! so it runs until its first refused commit). Address races come from nodes picking the
//! lowest free address of a small pool concurrently.
//!
//! Checked after every step (and at every send):
//! (a) nothing gated leaves before its commit is applied;
//! (b) a request of ours that leaves is byte for byte the committed pending request;
//! (c) a fenced owner stops at its first refused commit;
//! (d) inner addresses stay distinct, and one refused with `AddressInUse` is not offered again
//!     while another SA holds it;
//! (e) message IDs (the record's and each current owner's engine) never regress.
//!
//! `EVPC_SIM_SEEDS=N` runs N seeds (default 16); `EVPC_SIM_SEED=S` runs one. A failing run
//! prints its seed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use evpc_ike::wire::{self, ExchangeType, Header, Route};
use evpc_ike::{Accepted, Config, ConnectOptions, Datagram, Endpoint, IkeSa, Secret};
use evpc_ike::{IkeSaSnapshot, TrafficSelector as Ts};
use evpc_node::ike_gateway::commit::{CommitError, Committed};
use evpc_node::ike_gateway::machine::{Action, Params, SaKeys, SaMachine, Sabotage, Start};
use evpc_node::ike_gateway::mapping::{MappingError, open_snapshot};
use evpc_node::node::ProposeError;
use evpc_node::sealing::{ClusterKey, Keyring, SealError};
use evpc_raft_store::{
    Command, IkeSa as Record, KeyId, NodeId, NodeState, OwnerMove, Rejection, SaId, SlotAssignment,
    State, apply, slot_for_initiator_spi,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

const STEP_MS: u64 = 5;
const NODES: u64 = 3;
const CLIENTS: usize = 3;
const GW: &str = "192.0.2.1:4500";
const POOL: [u8; 6] = [1, 2, 3, 4, 5, 6];

/// A rule broken on purpose, so the checks must catch it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Broken {
    Nothing,
    GatedBeforeCommit,
    FreshResend,
    FencedKeepsGoing,
    AddressNotRepicked,
    LowerMessageId,
}

impl Broken {
    fn sabotage(self) -> Sabotage {
        match self {
            Broken::Nothing => Sabotage::Nothing,
            Broken::GatedBeforeCommit => Sabotage::GatedBeforeCommit,
            Broken::FreshResend => Sabotage::FreshResendAfterRestore,
            Broken::FencedKeepsGoing => Sabotage::IgnoreFence,
            Broken::AddressNotRepicked => Sabotage::KeepAddressAfterInUse,
            Broken::LowerMessageId => Sabotage::LowerMessageIdAfterRestore,
        }
    }
}

struct Keys(Keyring);
impl SaKeys for Keys {
    fn sealer(&self) -> Result<Arc<ClusterKey>, SealError> {
        Ok(self.0.get(KeyId(1)).expect("key 1"))
    }
    fn open(&self, record: &Record) -> Result<IkeSaSnapshot, MappingError> {
        open_snapshot(&self.0, record)
    }
}

fn identity(i: usize) -> evpc_ike::Identity {
    evpc_ike::Identity::fqdn(&format!("client{i}.example"))
}

fn gw_config() -> Arc<Config> {
    let mut c = Config::new(evpc_ike::Identity::fqdn("gw.example"));
    for i in 0..CLIENTS {
        c = c.with_psk(identity(i), b"psk");
    }
    c.local_ts = vec![Ts::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)];
    c.lifetimes.dpd_interval_ms = Some(400);
    Arc::new(c)
}

struct Node {
    id: NodeId,
    endpoint: Endpoint,
    machines: BTreeMap<SaId, SaMachine>,
    by_spi: HashMap<u64, SaId>,
    half_open: HashMap<(SocketAddr, u64), SaId>,
    reserved: BTreeSet<Ipv4Addr>,
}

struct Client {
    addr: SocketAddr,
    config: Arc<Config>,
    engine: Option<IkeSa>,
    next_try: u64,
    next_op: u64,
}

#[derive(Copy, Clone)]
enum To {
    Gateway,
    Client(usize),
}

struct Packet {
    at: u64,
    to: To,
    d: Datagram,
}

#[derive(PartialEq)]
enum Fate {
    Ok,
    Lost,
    AppliedButReportedLost,
}

struct Flight {
    at: u64,
    node: usize,
    sa: SaId,
    command: Command,
    gated: Vec<Datagram>,
    fate: Fate,
}

struct Sim {
    seed: u64,
    now: u64,
    rng: StdRng,
    broken: Broken,
    state: State,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    packets: Vec<Packet>,
    flights: Vec<Flight>,
    params: Params,
    refused: HashMap<SaId, IpAddr>,
    /// Highest message IDs seen per (SA, rekey generation) in the record.
    ids: HashMap<(SaId, u32), (u32, u32)>,
    stats: BTreeMap<&'static str, u64>,
}

impl Sim {
    fn fail(&self, what: String) -> ! {
        panic!("seed {}: at {} ms: {what}", self.seed, self.now);
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn engine_rng(&mut self) -> impl FnMut(&mut [u8]) + use<> {
        let mut r = StdRng::seed_from_u64(self.rng.next_u64());
        move |b: &mut [u8]| r.fill_bytes(b)
    }

    fn new(seed: u64, broken: Broken) -> Sim {
        let mut state = State::default();
        for n in 1..=NODES {
            apply(
                &mut state,
                &Command::SetNodeState {
                    node: n,
                    state: NodeState::Active,
                    at_ms: 0,
                },
            )
            .expect("node");
        }
        let slots = (0..evpc_raft_store::SLOT_COUNT)
            .map(|slot| SlotAssignment {
                slot,
                node: Some(u64::from(slot) % NODES + 1),
            })
            .collect();
        apply(&mut state, &Command::SetSlots(slots)).expect("slots");
        let config = gw_config();
        let params = Params {
            me: 0,
            config: config.clone(),
            initial_lease: 4096,
            dns: Vec::new(),
            keys: Arc::new(Keys(Keyring::in_memory([ClusterKey::from_bytes(
                KeyId(1),
                &[5; 32],
            )]))),
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let nodes = (1..=NODES)
            .map(|id| Node {
                id,
                endpoint: Endpoint::new(config.clone(), Secret::from_slice(&[id as u8; 32])),
                machines: BTreeMap::new(),
                by_spi: HashMap::new(),
                half_open: HashMap::new(),
                reserved: BTreeSet::new(),
            })
            .collect();
        let clients = (0..CLIENTS)
            .map(|i| {
                let gw: evpc_ike::Identity = evpc_ike::Identity::fqdn("gw.example");
                Client {
                    addr: SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::new(198, 51, 100, i as u8 + 1)),
                        4500,
                    ),
                    config: Arc::new(Config::new(identity(i)).with_psk(gw, b"psk")),
                    engine: None,
                    next_try: rng.random_range(0..50),
                    next_op: 0,
                }
            })
            .collect();
        Sim {
            seed,
            now: 0,
            rng,
            broken,
            state,
            nodes,
            clients,
            packets: Vec::new(),
            flights: Vec::new(),
            params,
            refused: HashMap::new(),
            ids: HashMap::new(),
            stats: BTreeMap::new(),
        }
    }

    /// The network: delay, reorder, duplicate, drop.
    fn transmit(&mut self, to: To, d: Datagram) {
        if self.rng.random_bool(0.03) {
            return;
        }
        let copies = if self.rng.random_bool(0.03) { 2 } else { 1 };
        for _ in 0..copies {
            let at = self.now + self.rng.random_range(1..25);
            self.packets.push(Packet {
                at,
                to,
                d: d.clone(),
            });
        }
    }

    /// What leaves a node, checked against the log as it is now.
    fn outgoing(&mut self, d: Datagram) {
        let Some(h) = Header::peek(&d.payload) else {
            self.fail("an unparsable datagram left".into());
        };
        if h.exchange != ExchangeType::IKE_SA_INIT
            && let Some(record) = self
                .state
                .sa_by_ike_spi(h.spi_r)
                .and_then(|id| self.state.sa(id))
                .filter(|r| (r.spi_i, r.spi_r) == (h.spi_i, h.spi_r))
        {
            if h.response && h.message_id >= record.msg.next_peer_request {
                self.fail(format!(
                    "(a) a gated datagram left before its commit: response {} of {}, committed up to {}",
                    h.message_id, record.id, record.msg.next_peer_request
                ));
            }
            if !h.response {
                let pending = record.pending_request.as_ref().map(|p| p.msg_id);
                if h.message_id >= record.msg.next_local_request && pending != Some(h.message_id) {
                    self.fail(format!(
                        "(a) a gated datagram left before its commit: request {} of {}",
                        h.message_id, record.id
                    ));
                }
                if let Some(p) = &record.pending_request
                    && p.msg_id == h.message_id
                    && !p.datagrams.contains(&d.payload)
                {
                    self.fail(format!(
                        "(b) request {} of {} is not the committed pending request",
                        h.message_id, record.id
                    ));
                }
            }
        }
        let to = self
            .clients
            .iter()
            .position(|c| c.addr == d.remote)
            .unwrap_or_else(|| self.fail(format!("datagram to an unknown peer {}", d.remote)));
        self.count("gateway datagrams");
        self.transmit(To::Client(to), d);
    }

    fn spawn(&mut self, node: usize, id: SaId, spis: BTreeSet<u64>, start: Start) {
        let mut params = self.params.clone();
        params.me = self.nodes[node].id;
        let mut m = SaMachine::new(id, params, spis.clone());
        m.sabotage(self.broken.sabotage());
        for spi in spis {
            self.nodes[node].by_spi.insert(spi, id);
        }
        let mut r = self.engine_rng();
        let actions = m.start(self.now, &mut r, start);
        self.nodes[node].machines.insert(id, m);
        self.run(node, id, actions);
    }

    /// The shell: runs a machine's actions in order, with their answers' after them.
    fn run(&mut self, node: usize, sa: SaId, actions: Vec<Action>) {
        let Some(mut m) = self.nodes[node].machines.remove(&sa) else {
            return;
        };
        let mut queue: VecDeque<Action> = actions.into();
        let mut stopped = false;
        let mut r = self.engine_rng();
        while let Some(action) = queue.pop_front() {
            if stopped {
                self.fail(format!("(c) {sa} acted after Stop: {action:?}"));
            }
            let more = match action {
                Action::Send(d) => {
                    self.outgoing(d);
                    Vec::new()
                }
                Action::Commit { proposal, gated } => {
                    let command = proposal.command();
                    if let Command::CreateSa(record) = &command
                        && let (Some(addr), Some(refused)) =
                            (record.virtual_ip, self.refused.get(&sa))
                        && addr == *refused
                        && self.state.address_holder(addr).is_some()
                    {
                        self.fail(format!(
                            "(d) {sa} offered {addr} again after AddressInUse, while another SA holds it"
                        ));
                    }
                    let roll: f64 = self.rng.random();
                    let fate = if roll < 0.08 {
                        Fate::Lost
                    } else if roll < 0.12 {
                        Fate::AppliedButReportedLost
                    } else {
                        Fate::Ok
                    };
                    let at = self.now + self.rng.random_range(2..40);
                    self.flights.push(Flight {
                        at,
                        node,
                        sa,
                        command,
                        gated,
                        fate,
                    });
                    Vec::new()
                }
                Action::Routes(spis) => {
                    let n = &mut self.nodes[node];
                    n.by_spi.retain(|_, id| *id != sa);
                    for spi in spis {
                        n.by_spi.insert(spi, sa);
                    }
                    Vec::new()
                }
                Action::HalfOpenDone => {
                    self.nodes[node].half_open.retain(|_, id| *id != sa);
                    Vec::new()
                }
                Action::NeedAddress(_) => {
                    let n = &mut self.nodes[node];
                    let pick = POOL.iter().map(|i| Ipv4Addr::new(10, 10, 0, *i)).find(|a| {
                        !n.reserved.contains(a)
                            && self.state.address_holder(IpAddr::V4(*a)).is_none()
                    });
                    if let Some(a) = pick {
                        n.reserved.insert(a);
                    }
                    m.on_address(self.now, &mut r, pick)
                }
                Action::ReleaseAddress(a) => {
                    self.nodes[node].reserved.remove(&a);
                    Vec::new()
                }
                Action::DeleteStale {
                    sa: me,
                    peer,
                    local,
                    established_ms,
                } => {
                    let stale: Vec<_> = self
                        .state
                        .sas_of_peer(&peer)
                        .filter(|s| {
                            s.id != me
                                && s.local_id == local
                                && s.times.established_ms <= established_ms
                        })
                        .map(|s| (s.id, s.epoch))
                        .collect();
                    for (id, epoch) in stale {
                        self.count("stale SAs deleted");
                        let _ = apply(
                            &mut self.state,
                            &Command::DeleteSa {
                                sa: id,
                                epoch: Some(epoch),
                            },
                        );
                    }
                    Vec::new()
                }
                Action::ReadState => {
                    let record = self.state.sa(sa).cloned();
                    m.on_state(self.now, &mut r, record.as_ref())
                }
                Action::Stop => {
                    stopped = true;
                    Vec::new()
                }
            };
            queue.extend(more);
        }
        if stopped {
            let n = &mut self.nodes[node];
            n.by_spi.retain(|_, id| *id != sa);
            n.half_open.retain(|_, id| *id != sa);
        } else {
            self.nodes[node].machines.insert(sa, m);
        }
    }

    fn land(&mut self, f: Flight) {
        self.count("commits");
        let applied = if f.fate == Fate::Lost {
            None
        } else {
            Some(apply(&mut self.state, &f.command))
        };
        let lost = || CommitError::NotCommitted(ProposeError::NoLeader(Default::default()));
        let result = match applied {
            None => Err(lost()),
            Some(Ok(_)) if f.fate == Fate::AppliedButReportedLost => Err(lost()),
            Some(Ok(_)) => Ok(Committed { log_index: 0 }),
            Some(Err(Rejection::StaleEpoch { sa, current, given })) => {
                Err(CommitError::Fenced { sa, current, given })
            }
            Some(Err(r)) => Err(CommitError::Refused(r)),
        };
        if let Err(e) = &result {
            self.count(match e {
                CommitError::Fenced { .. } => "fenced",
                CommitError::Refused(_) => "refused",
                CommitError::NotCommitted(_) => "not committed",
            });
        }
        if let Err(CommitError::Refused(Rejection::AddressInUse { addr, .. })) = &result {
            self.refused.insert(f.sa, *addr);
        }
        if result.is_ok() {
            for d in f.gated {
                self.outgoing(d);
            }
        }
        let fenced = matches!(result, Err(CommitError::Fenced { .. }));
        let Some(m) = self.nodes[f.node].machines.get_mut(&f.sa) else {
            return;
        };
        let mut r = StdRng::seed_from_u64(self.rng.next_u64());
        let mut r = move |b: &mut [u8]| r.fill_bytes(b);
        let actions = m.on_committed(self.now, &mut r, result);
        if fenced && !matches!(actions[..], [Action::Stop]) {
            self.fail(format!(
                "(c) a fenced owner kept going: {} answered {actions:?}",
                f.sa
            ));
        }
        self.run(f.node, f.sa, actions);
    }

    fn at_gateway(&mut self, sent: Datagram) {
        // As the gateway sees it: local is its address.
        let d = Datagram {
            local: sent.remote,
            remote: sent.local,
            payload: sent.payload,
        };
        for node in 0..self.nodes.len() {
            self.dispatch(node, d.clone());
        }
    }

    /// The dispatcher of one node (every node sees every packet).
    fn dispatch(&mut self, node: usize, d: Datagram) {
        let me = self.nodes[node].id;
        match wire::route(&d.payload) {
            Route::NewSa { initiator_spi } => {
                if let Some(id) = self.nodes[node].half_open.get(&(d.remote, initiator_spi)) {
                    let id = *id;
                    self.deliver(node, id, d);
                    return;
                }
                if self
                    .state
                    .slots()
                    .owner(slot_for_initiator_spi(initiator_spi))
                    != Some(me)
                {
                    return;
                }
                let mut r = self.engine_rng();
                let n = &self.nodes[node];
                match n.endpoint.accept(
                    self.now,
                    &mut r,
                    d.local,
                    d.remote,
                    &d.payload,
                    n.half_open.len(),
                ) {
                    Accepted::NewSa(engine, outcome) => {
                        let Some(spi) = engine.local_spi() else {
                            return;
                        };
                        let spis = engine.local_spis().into_iter().collect();
                        self.nodes[node]
                            .half_open
                            .insert((d.remote, initiator_spi), SaId(spi));
                        self.spawn(node, SaId(spi), spis, Start::HalfOpen { engine, outcome });
                    }
                    Accepted::Reply(reply, _) => self.outgoing(reply),
                    Accepted::Dropped(_) => {}
                }
            }
            Route::Existing { local_spi } => {
                if let Some(id) = self.nodes[node].by_spi.get(&local_spi) {
                    let id = *id;
                    self.deliver(node, id, d);
                    return;
                }
                let Some(id) = self
                    .state
                    .sa_by_ike_spi(local_spi)
                    .and_then(|id| self.state.sa(id))
                    .filter(|sa| sa.owner == me && sa.local_spi() == local_spi)
                    .map(|sa| sa.id)
                else {
                    return;
                };
                if self.nodes[node].machines.contains_key(&id) {
                    self.deliver(node, id, d);
                } else {
                    self.count("restores on a datagram");
                    self.spawn(node, id, BTreeSet::new(), Start::Restore { first: Some(d) });
                }
            }
            Route::Drop => {}
        }
    }

    fn deliver(&mut self, node: usize, id: SaId, d: Datagram) {
        let mut r = self.engine_rng();
        let Some(m) = self.nodes[node].machines.get_mut(&id) else {
            return;
        };
        let actions = m.on_datagram(self.now, &mut r, d);
        self.run(node, id, actions);
    }

    fn client_outcome(&mut self, i: usize, o: evpc_ike::Outcome) {
        let mut out = o.send;
        if let Some(c) = o.commit {
            out.extend(c.into_datagrams_after_durable());
        }
        for d in out {
            self.transmit(To::Gateway, d);
        }
        if o.events
            .iter()
            .any(|e| matches!(e, evpc_ike::Event::Closed { .. }))
        {
            self.count("client SAs closed");
            self.clients[i].engine = None;
            self.clients[i].next_try = self.now + 300;
        }
        if o.events
            .iter()
            .any(|e| matches!(e, evpc_ike::Event::IkeSaEstablished { .. }))
        {
            self.count("client SAs established");
        }
    }

    fn clients(&mut self) {
        let gw: SocketAddr = GW.parse().expect("address");
        for i in 0..self.clients.len() {
            let mut r = self.engine_rng();
            let c = &mut self.clients[i];
            let o = match &mut c.engine {
                None if self.now >= c.next_try => {
                    let (engine, o) = IkeSa::connect(
                        c.config.clone(),
                        c.addr,
                        gw,
                        ConnectOptions::road_warrior(
                            evpc_ike::Identity::fqdn("gw.example"),
                            vec![Ts::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)],
                        ),
                        self.now,
                        &mut r,
                    );
                    c.engine = Some(engine);
                    c.next_op = self.now + 300;
                    Some(o)
                }
                None => None,
                Some(e) if e.next_timeout().is_some_and(|t| t <= self.now) => {
                    Some(e.handle_timeout(self.now, &mut r))
                }
                Some(e) if e.is_established() && self.now >= c.next_op => {
                    c.next_op = self.now + self.rng.random_range(100..600);
                    let op = self.rng.random_range(0..10);
                    let o = match op {
                        0..6 => e.send_dpd(self.now, &mut r),
                        6..9 => match e.children().first().map(|c| c.inbound_spi) {
                            Some(spi) => e.rekey_child(spi, self.now, &mut r),
                            None => e.send_dpd(self.now, &mut r),
                        },
                        _ => e.rekey_ike(self.now, &mut r),
                    };
                    if o.is_ok() {
                        *self
                            .stats
                            .entry(
                                ["client DPDs", "client child rekeys", "client IKE rekeys"]
                                    [usize::from(op >= 6) + usize::from(op >= 9)],
                            )
                            .or_default() += 1;
                    }
                    o.ok()
                }
                Some(_) => None,
            };
            if let Some(o) = o {
                self.client_outcome(i, o);
            }
        }
    }

    fn takeover(&mut self) {
        let sas: Vec<(SaId, NodeId, evpc_raft_store::Epoch)> =
            self.state.sas().map(|s| (s.id, s.owner, s.epoch)).collect();
        if sas.is_empty() {
            return;
        }
        let (sa, owner, epoch) = sas[self.rng.random_range(0..sas.len())];
        let to = (owner + self.rng.random_range(0..NODES - 1)) % NODES + 1;
        let moved = apply(
            &mut self.state,
            &Command::AssignOwners(vec![OwnerMove {
                sa,
                from_epoch: epoch,
                to,
                lease: 4096,
                handover: false,
            }]),
        );
        if moved.is_ok() {
            self.count("takeovers");
        }
    }

    fn step(&mut self) {
        self.now += STEP_MS;
        // Packets due, in a random order among those due.
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.packets.len() {
            if self.packets[i].at <= self.now {
                due.push(self.packets.swap_remove(i));
            } else {
                i += 1;
            }
        }
        for p in due {
            match p.to {
                To::Gateway => self.at_gateway(p.d),
                To::Client(c) => {
                    let mut r = self.engine_rng();
                    let client = &mut self.clients[c];
                    if let Some(e) = &mut client.engine {
                        let o = e.handle_datagram(
                            self.now,
                            &mut r,
                            p.d.remote,
                            p.d.local,
                            &p.d.payload,
                        );
                        self.client_outcome(c, o);
                    }
                }
            }
        }
        // Commits that land.
        let mut i = 0;
        while i < self.flights.len() {
            if self.flights[i].at <= self.now {
                let f = self.flights.remove(i);
                self.land(f);
            } else {
                i += 1;
            }
        }
        // Machines' timers.
        for node in 0..self.nodes.len() {
            let due: Vec<SaId> = self.nodes[node]
                .machines
                .iter()
                .filter(|(_, m)| m.next_timeout().is_some_and(|t| t <= self.now))
                .map(|(id, _)| *id)
                .collect();
            for id in due {
                let mut r = self.engine_rng();
                if let Some(m) = self.nodes[node].machines.get_mut(&id) {
                    let actions = m.on_timeout(self.now, &mut r);
                    self.run(node, id, actions);
                }
            }
        }
        self.clients();
        if self.rng.random_bool(0.004) {
            self.takeover();
        }
        self.reconcile();
        self.check();
    }

    /// The new owner restores at once; an old owner hears of the move late (it may run until
    /// its first refused commit).
    fn reconcile(&mut self) {
        for node in 0..self.nodes.len() {
            let me = self.nodes[node].id;
            let owned: Vec<SaId> = self
                .state
                .sas()
                .filter(|s| s.owner == me && !self.nodes[node].machines.contains_key(&s.id))
                .map(|s| s.id)
                .collect();
            for id in owned {
                self.count("restores on takeover");
                self.spawn(node, id, BTreeSet::new(), Start::Restore { first: None });
            }
            let changed: Vec<SaId> = self.nodes[node]
                .machines
                .values()
                .filter(|m| {
                    m.epoch().0 != 0
                        && self.state.sa(m.id()).map(|s| (s.owner, s.epoch))
                            != Some((me, m.epoch()))
                })
                .map(|m| m.id())
                .collect();
            for id in changed {
                if !self.rng.random_bool(0.01) {
                    continue;
                }
                let record = self.state.sa(id).cloned();
                let mut r = self.engine_rng();
                if let Some(m) = self.nodes[node].machines.get_mut(&id) {
                    let actions = m.on_state(self.now, &mut r, record.as_ref());
                    self.run(node, id, actions);
                }
            }
        }
    }

    fn check(&mut self) {
        let mut addresses = BTreeSet::new();
        let records: Vec<Record> = self.state.sas().cloned().collect();
        for r in &records {
            if let Some(a) = r.virtual_ip
                && !addresses.insert(a)
            {
                self.fail(format!("(d) inner address {a} held by two SAs"));
            }
            let key = (r.id, r.rekey_generation);
            let now = (r.msg.next_peer_request, r.msg.next_local_request);
            if let Some(seen) = self.ids.get(&key)
                && (now.0 < seen.0 || now.1 < seen.1)
            {
                self.fail(format!(
                    "(e) message IDs regressed in the record of {}: {seen:?} -> {now:?}",
                    r.id
                ));
            }
            self.ids.insert(key, now);
            let owner = (r.owner - 1) as usize;
            if let Some(m) = self.nodes.get(owner).and_then(|n| n.machines.get(&r.id))
                && m.epoch() == r.epoch
                && let Some(ids) = m.engine_ids()
                && ids.spis == (r.spi_i, r.spi_r)
                && (ids.next_peer_request < r.msg.next_peer_request
                    || ids.next_local_request < r.msg.next_local_request)
            {
                self.fail(format!(
                    "(e) message IDs regressed on the owner of {}: engine {ids:?}, record {:?}",
                    r.id, r.msg
                ));
            }
        }
    }
}

fn run(seed: u64, seconds: u64, broken: Broken) -> BTreeMap<&'static str, u64> {
    let mut sim = Sim::new(seed, broken);
    while sim.now < seconds * 1_000 {
        sim.step();
    }
    sim.stats
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
fn the_gateway_keeps_its_rules_under_faults() {
    let mut total: BTreeMap<&str, u64> = BTreeMap::new();
    for seed in seeds() {
        let stats = run(seed, 6, Broken::Nothing);
        assert!(
            stats.get("client SAs established").copied().unwrap_or(0) > 0,
            "seed {seed}: no SA was set up: {stats:?}"
        );
        for (k, v) in stats {
            *total.entry(k).or_default() += v;
        }
    }
    eprintln!("{total:?}");
}

fn caught(broken: Broken, expected: &str) {
    for seed in 1..=16u64 {
        let outcome = std::panic::catch_unwind(|| run(seed, 6, broken));
        if let Err(payload) = outcome {
            let failure = payload
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "non-string panic".into());
            assert!(
                failure.contains(expected),
                "{broken:?} broke the run in an unexpected way: {failure}"
            );
            eprintln!("{broken:?} caught: {failure}");
            return;
        }
    }
    panic!("no seed caught {broken:?}");
}

#[test]
fn gated_datagrams_before_the_commit_are_caught() {
    caught(Broken::GatedBeforeCommit, "(a)");
}

#[test]
fn a_freshly_built_resend_is_caught() {
    caught(Broken::FreshResend, "(b)");
}

#[test]
fn a_fenced_owner_that_keeps_going_is_caught() {
    caught(Broken::FencedKeepsGoing, "(c)");
}

#[test]
fn an_address_not_picked_again_is_caught() {
    caught(Broken::AddressNotRepicked, "(d)");
}

#[test]
fn a_lower_message_id_after_restore_is_caught() {
    caught(Broken::LowerMessageId, "(e)");
}
