//! A virtual-clock network of one gateway (responder, committing every state
//! change to an in-memory "replicated log") and one or more clients
//! (initiators), with seeded loss, duplication and reordering.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use evpc_ike::snapshot::IkeSaSnapshot;
use evpc_ike::{
    Accepted, Config, ConnectOptions, Datagram, Dispatch, Endpoint, Event, Identity, IkeSa,
    InnerAddress, Outcome, Router, RouterLimits, Screened, Secret, StateChange, TrafficSelector,
    wire,
};

/// SplitMix64: small, seedable, good enough for simulations.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }

    pub fn source(&mut self) -> &mut Self {
        self
    }
}

impl evpc_ike::Random for Rng {
    fn fill(&mut self, dest: &mut [u8]) {
        Rng::fill(self, dest)
    }
}

pub const GW_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const PSK: &[u8] = b"s3cret-psk-value";

pub fn gw_addr() -> SocketAddr {
    SocketAddr::from((GW_IP, 500))
}

pub fn client_addr(i: u8) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(198, 51, 100, 10 + i), 500))
}

pub fn gw_identity() -> Identity {
    Identity::fqdn("gw.example")
}

pub fn client_identity(i: u8) -> Identity {
    Identity::fqdn(&format!("client{i}.example"))
}

pub fn gateway_config(clients: u8) -> Config {
    let mut c = Config::new(gw_identity());
    for i in 0..clients {
        c = c.with_psk(client_identity(i), PSK);
    }
    c.local_ts = vec![TrafficSelector::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)];
    // With 10% loss each way, 11 tries make a lost exchange (0.19^11) negligible
    // even in soak runs over thousands of seeds.
    c.retransmit.max_retransmits = 10;
    c
}

pub fn client_config(i: u8) -> Config {
    let mut c = Config::new(client_identity(i)).with_psk(gw_identity(), PSK);
    c.remote_ts = vec![TrafficSelector::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)];
    c.retransmit.max_retransmits = 10;
    c
}

pub fn connect_options() -> ConnectOptions {
    ConnectOptions {
        remote_identity: gw_identity(),
        request_inner_address: true,
        ts_i: vec![TrafficSelector::any_v4()],
        ts_r: vec![TrafficSelector::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24)],
        force_udp_encap: false,
    }
}

/// A NAT in front of the clients: their source address becomes `public`
/// with port `port_base` (for 500) or `port_base + 1` (for 4500).
#[derive(Clone, Copy, Debug)]
pub struct Nat {
    pub public: Ipv4Addr,
    pub port_base: u16,
}

#[derive(Clone, Copy, Debug)]
pub struct Faults {
    pub loss: f64,
    pub duplicate: f64,
    pub max_jitter_ms: u64,
}

impl Faults {
    pub const NONE: Faults = Faults {
        loss: 0.0,
        duplicate: 0.0,
        max_jitter_ms: 0,
    };
    /// 10% loss keeps the chance that all 7 tries of one exchange are lost
    /// (0.19^7 per exchange) negligible over hundreds of seeds.
    pub const LOSSY: Faults = Faults {
        loss: 0.1,
        duplicate: 0.1,
        max_jitter_ms: 1500,
    };
}

#[derive(Debug)]
struct InFlight {
    at: u64,
    seq: u64,
    d: Datagram,
}

/// The gateway: a `Router` (around the `Endpoint`) plus SAs, routed like the
/// real node would. SA handles are slot indices into `sas`.
pub struct Gateway {
    pub router: Router<usize>,
    pub sas: Vec<Option<IkeSa>>,
    /// The durable log: one sealed (here: just serialized) snapshot per SA slot.
    pub log: HashMap<usize, Vec<u8>>,
    pub events: Vec<Event>,
    pub commits: usize,
    next_address: u8,
    /// Probability of crashing right after a commit became durable, before the
    /// gated datagrams left.
    pub crash_after_commit: f64,
    pub crashes: usize,
    pub assign_addresses: bool,
}

pub struct Client {
    pub sa: IkeSa,
    pub addr: SocketAddr,
    pub events: Vec<Event>,
}

pub struct Sim {
    pub now: u64,
    pub rng: Rng,
    net_rng: Rng,
    pub faults: Faults,
    in_flight: Vec<InFlight>,
    seq: u64,
    pub gw: Gateway,
    pub clients: Vec<Client>,
    pub seed: u64,
    pub delivered: usize,
    pub nat: Option<Nat>,
    nat_private: Option<std::net::IpAddr>,
}

pub const START_MS: u64 = 1_700_000_000_000;

impl Sim {
    pub fn new(seed: u64, faults: Faults, gw_config: Config) -> Self {
        let mut rng = Rng(seed);
        let mut cookie = [0u8; 32];
        rng.fill(&mut cookie);
        Sim {
            now: START_MS,
            rng,
            net_rng: Rng(seed ^ 0x5eed),
            faults,
            in_flight: Vec::new(),
            seq: 0,
            gw: Gateway {
                router: Router::new(
                    Endpoint::new(Arc::new(gw_config), Secret::from_slice(&cookie)),
                    RouterLimits::default(),
                    START_MS,
                )
                .expect("router limits fit the gateway config"),
                sas: Vec::new(),
                log: HashMap::new(),
                events: Vec::new(),
                commits: 0,
                next_address: 2,
                crash_after_commit: 0.0,
                crashes: 0,
                assign_addresses: true,
            },
            clients: Vec::new(),
            seed,
            delivered: 0,
            nat: None,
            nat_private: None,
        }
    }

    pub fn add_client(&mut self, config: Config, options: ConnectOptions) -> usize {
        let i = self.clients.len();
        let addr = client_addr(i as u8);
        let src = &mut self.rng;
        let (sa, outcome) =
            IkeSa::connect(Arc::new(config), addr, gw_addr(), options, self.now, src);

        self.clients.push(Client {
            sa,
            addr,
            events: Vec::new(),
        });
        self.client_outcome(i, outcome);
        i
    }

    fn transmit(&mut self, mut d: Datagram) {
        if let Some(nat) = self.nat
            && self.clients.iter().any(|c| c.addr.ip() == d.local.ip())
        {
            let port = if d.local.port() == 4500 {
                nat.port_base + 1
            } else {
                nat.port_base
            };
            // Remember the private side in the (single-client) mapping.
            self.nat_private = Some(d.local.ip());
            d.local = SocketAddr::from((nat.public, port));
        }
        if std::env::var_os("IKE_SIM_TRACE").is_some()
            && let Some(h) = wire::Header::peek(&d.payload)
        {
            eprintln!(
                "{:>8} send {} -> {} {:?} id={} resp={}",
                self.now - START_MS,
                d.local,
                d.remote,
                h.exchange,
                h.message_id,
                h.response
            );
        }
        if self.net_rng.chance(self.faults.loss) {
            return;
        }
        let copies = if self.net_rng.chance(self.faults.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = self.net_rng.below(self.faults.max_jitter_ms + 1);
            self.seq += 1;
            self.in_flight.push(InFlight {
                at: self.now + 5 + jitter,
                seq: self.seq,
                d: d.clone(),
            });
        }
    }

    pub fn client_outcome(&mut self, i: usize, o: Outcome) {
        for d in o.send {
            self.transmit(d);
        }
        if let Some(c) = o.commit {
            // Clients are not replicated; their commits are durable at once.
            for d in c.into_datagrams_after_durable() {
                self.transmit(d);
            }
        }
        self.clients[i].events.extend(o.events);
    }

    fn gw_outcome(&mut self, slot: usize, o: Outcome) {
        for d in o.send {
            self.transmit(d);
        }
        let mut crashed = false;
        if let Some(c) = o.commit {
            self.gw.commits += 1;
            match &c.change {
                StateChange::Upsert(s) => {
                    let bytes = postcard::to_allocvec(&**s).expect("snapshot serializes");
                    self.gw.log.insert(slot, bytes);
                }
                StateChange::Remove { .. } => {
                    self.gw.log.remove(&slot);
                }
            }
            if self.rng.chance(self.gw.crash_after_commit) {
                crashed = true;
            } else {
                for d in c.into_datagrams_after_durable() {
                    self.transmit(d);
                }
            }
        }
        let mut follow_ups = Vec::new();
        for e in o.events {
            self.gw
                .router
                .on_event(slot, &e)
                .expect("the router knows every live SA");
            match &e {
                Event::InnerAddressNeeded { .. } if self.gw.assign_addresses => follow_ups.push(()),
                Event::Closed { .. } => {
                    self.gw.sas[slot] = None;
                }
                _ => {}
            }
            self.gw.events.push(e);
        }
        if crashed {
            self.crash_gateway();
            return;
        }
        for () in follow_ups {
            let addr = InnerAddress::new(Ipv4Addr::new(10, 10, 0, self.gw.next_address))
                .with_dns(Ipv4Addr::new(10, 10, 0, 1));
            self.gw.next_address += 1;
            let src = &mut self.rng;
            let out = self.gw.sas[slot].as_mut().map(|sa| {
                sa.assign_inner_address(Some(addr), self.now, src)
                    .expect("address was asked for")
            });

            if let Some(out) = out {
                self.gw_outcome(slot, out);
            }
        }
    }

    /// Drops every gateway SA object and restores them from the log, as the
    /// surviving node of a cluster would. Half-open SAs are lost.
    pub fn crash_gateway(&mut self) {
        self.gw.crashes += 1;
        if std::env::var_os("IKE_SIM_TRACE").is_some() {
            eprintln!("{:>8} CRASH", self.now - START_MS);
        }
        for slot in 0..self.gw.sas.len() {
            self.gw.sas[slot] = None;
            self.gw.router.remove(slot);
        }
        assert!(self.gw.router.is_empty(), "every SA was forgotten");
        let config = self.gw.router.endpoint().config().clone();
        let log: Vec<(usize, Vec<u8>)> = self.gw.log.iter().map(|(k, v)| (*k, v.clone())).collect();
        for (slot, bytes) in log {
            let snap: IkeSaSnapshot = postcard::from_bytes(&bytes).expect("snapshot deserializes");
            let sa = IkeSa::restore(config.clone(), snap).expect("restore");
            self.gw
                .router
                .insert(slot, sa.local_spis())
                .expect("restored SPIs are unique");
            self.gw.sas[slot] = Some(sa);
        }
    }

    fn deliver(&mut self, mut d: Datagram) {
        if let (Some(nat), Some(private)) = (self.nat, self.nat_private)
            && d.remote.ip() == std::net::IpAddr::V4(nat.public)
        {
            // Only the current mapping is open; a stale port is dropped.
            let port = match d.remote.port() {
                p if p == nat.port_base => 500,
                p if p == nat.port_base + 1 => 4500,
                _ => return,
            };
            d.remote = SocketAddr::new(private, port);
        }
        self.delivered += 1;
        if std::env::var_os("IKE_SIM_TRACE").is_some()
            && let Some(h) = wire::Header::peek(&d.payload)
        {
            eprintln!(
                "{:>8} {} -> {} {:?} id={} resp={} spis={:x}/{:x}",
                self.now - START_MS,
                d.local,
                d.remote,
                h.exchange,
                h.message_id,
                h.response,
                h.spi_i,
                h.spi_r
            );
        }
        let src = &mut self.rng;
        if d.remote.ip() == gw_addr().ip() {
            // To the gateway; d.local is the sender.
            let (local, remote) = (d.remote, d.local);
            match self.gw.router.route(remote, &d.payload) {
                Dispatch::Sa(slot) => {
                    let Some(sa) = self.gw.sas[slot].as_mut() else {
                        return;
                    };
                    let o = sa.handle_datagram(self.now, src, local, remote, &d.payload);
                    self.gw_outcome(slot, o);
                }
                Dispatch::NewSa { .. } => {
                    match self.gw.router.screen(src, local, remote, &d.payload) {
                        Screened::Admit(pending) => {
                            let slot = self.gw.sas.len();
                            if self
                                .gw
                                .router
                                .insert_half_open(
                                    slot,
                                    pending.key(),
                                    [pending.local_spi()],
                                    self.now,
                                )
                                .is_err()
                            {
                                return;
                            }
                            match pending.complete(self.now, src) {
                                Accepted::NewSa(sa, o) => {
                                    self.gw.sas.push(Some(*sa));
                                    self.gw_outcome(slot, o);
                                }
                                Accepted::Reply(r, _) => {
                                    self.gw.router.remove(slot);
                                    self.transmit(r);
                                }
                                Accepted::Dropped(_) => {
                                    self.gw.router.remove(slot);
                                }
                            }
                        }
                        Screened::Reply(r, _) => self.transmit(r),
                        Screened::Dropped(_) => {}
                    }
                }
                // A single gateway restores nothing on demand: every
                // committed SA is already in the router.
                Dispatch::Unknown { .. } | Dispatch::Drop(_) => {}
            }
        } else if let Some(i) = self
            .clients
            .iter()
            .position(|c| c.addr.ip() == d.remote.ip())
        {
            let (local, remote) = (d.remote, d.local);
            let o = self.clients[i]
                .sa
                .handle_datagram(self.now, src, local, remote, &d.payload);

            self.client_outcome(i, o);
        }
    }

    fn next_event_time(&self) -> Option<u64> {
        let mut t: Option<u64> = None;
        let mut at = |v: Option<u64>| {
            if let Some(v) = v {
                t = Some(t.map_or(v, |t: u64| t.min(v)));
            }
        };
        at(self.in_flight.iter().map(|f| f.at).min());
        for c in &self.clients {
            at(c.sa.next_timeout());
        }
        for s in self.gw.sas.iter().flatten() {
            at(s.next_timeout());
        }
        at(Some(self.gw.router.poll_timeout()));
        t
    }

    /// Runs until `done` holds or virtual time passes `limit_ms` from now.
    pub fn run_until(&mut self, limit_ms: u64, mut done: impl FnMut(&Sim) -> bool) -> bool {
        let deadline = self.now + limit_ms;
        loop {
            if done(self) {
                return true;
            }
            let Some(t) = self.next_event_time() else {
                return done(self);
            };
            if t > deadline {
                self.now = deadline;
                return done(self);
            }
            self.now = self.now.max(t);
            self.step();
        }
    }

    /// Advances virtual time by `ms`, processing everything on the way.
    pub fn run_for(&mut self, ms: u64) {
        self.run_until(ms, |_| false);
    }

    fn step(&mut self) {
        let now = self.now;
        let mut due: Vec<InFlight> = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].at <= now {
                due.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        due.sort_by_key(|f| (f.at, f.seq));
        for f in due {
            self.deliver(f.d);
        }
        for i in 0..self.clients.len() {
            if self.clients[i].sa.next_timeout().is_some_and(|t| t <= now) {
                let src = &mut self.rng;
                let o = self.clients[i].sa.handle_timeout(now, src);

                self.client_outcome(i, o);
            }
        }
        for slot in 0..self.gw.sas.len() {
            let due = self.gw.sas[slot]
                .as_ref()
                .and_then(|s| s.next_timeout())
                .is_some_and(|t| t <= now);
            if due {
                let src = &mut self.rng;
                let o = self.gw.sas[slot]
                    .as_mut()
                    .map(|s| s.handle_timeout(now, src));

                if let Some(o) = o {
                    self.gw_outcome(slot, o);
                }
            }
        }
        // After the SAs' own timers: a half-open SA closes itself at the same
        // deadline, so this only catches one that did not.
        if self.gw.router.poll_timeout() <= now {
            for slot in self.gw.router.handle_timeout(now, &mut self.rng) {
                self.gw.sas[slot] = None;
            }
        }
    }

    /// Calls `f` on the gateway SA in `slot` and processes the outcome.
    pub fn gw_call(
        &mut self,
        slot: usize,
        f: impl FnOnce(&mut IkeSa, u64, &mut dyn evpc_ike::Random) -> Outcome,
    ) {
        let src = &mut self.rng;
        let now = self.now;
        let o = self.gw.sas[slot].as_mut().map(|sa| f(sa, now, src));

        if let Some(o) = o {
            self.gw_outcome(slot, o);
        }
    }

    pub fn client_call(
        &mut self,
        i: usize,
        f: impl FnOnce(&mut IkeSa, u64, &mut dyn evpc_ike::Random) -> Outcome,
    ) {
        let src = &mut self.rng;
        let now = self.now;
        let o = f(&mut self.clients[i].sa, now, src);

        self.client_outcome(i, o);
    }

    pub fn gw_sa(&self, slot: usize) -> Option<&IkeSa> {
        self.gw.sas.get(slot).and_then(|s| s.as_ref())
    }

    /// The established gateway SA of client `i` (slot of the latest SA from its address).
    pub fn gw_slot_established(&self) -> Option<usize> {
        self.gw
            .sas
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.is_established()))
    }

    /// Gateway and client agree on the set of child SAs and their keys.
    pub fn children_agree(&self, i: usize, slot: usize) -> bool {
        let Some(gw) = self.gw_sa(slot) else {
            return false;
        };
        let c = &self.clients[i].sa;
        let mut a: Vec<_> = c
            .children()
            .iter()
            .map(|c| {
                (
                    c.inbound_spi,
                    c.outbound_spi,
                    c.inbound_key.clone(),
                    c.outbound_key.clone(),
                )
            })
            .collect();
        let mut b: Vec<_> = gw
            .children()
            .iter()
            .map(|c| {
                (
                    c.outbound_spi,
                    c.inbound_spi,
                    c.outbound_key.clone(),
                    c.inbound_key.clone(),
                )
            })
            .collect();
        a.sort_by_key(|x| x.0);
        b.sort_by_key(|x| x.0);
        !a.is_empty() && a == b
    }
}
