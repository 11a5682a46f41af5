//! A minimal single-node IKEv2 responder around `evpc-ike`, for interop tests
//! with an unmodified strongSwan: UDP 500 and 4500 (non-ESP marker handled
//! here), PSK, inner addresses from a small pool, commits "made durable" by
//! serializing the snapshot. Prints one line per event on stdout.
//!
//! ```text
//! responder --listen 192.0.2.1 --id gw.example --peer client.example \
//!           --psk s3cret-psk-value --pool 10.10.0.2 [--local-ts 10.10.0.0/24]
//! ```

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evpc_ike::{
    Accepted, Config, ConnectOptions, Datagram, Dispatch, Endpoint, Event, Identity, IkeSa,
    InnerAddress, Outcome, Random, Router, RouterLimits, Screened, Secret, StateChange,
    TrafficSelector, wire,
};
use tokio::net::UdpSocket;

struct UrandomRng(std::fs::File);

impl Random for UrandomRng {
    fn fill(&mut self, dest: &mut [u8]) {
        self.0.read_exact(dest).expect("read /dev/urandom");
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn parse_prefix(s: &str) -> TrafficSelector {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    TrafficSelector::v4_prefix(
        ip.parse().expect("IPv4 prefix"),
        len.parse().expect("prefix length"),
    )
}

struct Node {
    /// SA handles are indices into `sas`.
    router: Router<usize>,
    sas: Vec<Option<IkeSa>>,
    next_address: Ipv4Addr,
    rng: UrandomRng,
    sock500: Arc<UdpSocket>,
    sock4500: Arc<UdpSocket>,
}

impl Node {
    async fn send(&self, d: &Datagram) {
        let result = if d.local.port() == 4500 {
            let mut buf = vec![0u8; 4];
            buf.extend_from_slice(&d.payload);
            self.sock4500.send_to(&buf, d.remote).await
        } else {
            self.sock500.send_to(&d.payload, d.remote).await
        };
        if let Err(e) = result {
            println!("send error {e}");
        }
        if let Some(h) = wire::Header::peek(&d.payload) {
            println!(
                "tx {:?} {} id={} to {}",
                h.exchange,
                if h.response { "response" } else { "request" },
                h.message_id,
                d.remote
            );
        }
    }

    async fn apply(&mut self, slot: usize, o: Outcome) {
        for d in &o.send {
            self.send(d).await;
        }
        if let Some(c) = o.commit {
            // A real node appends this to its replicated log and waits.
            match &c.change {
                StateChange::Upsert(s) => {
                    let bytes = postcard::to_allocvec(&**s).expect("serialize snapshot");
                    println!("commit upsert {} bytes", bytes.len());
                }
                StateChange::Remove { local_spis } => println!("commit remove {local_spis:x?}"),
            }
            for d in c.into_datagrams_after_durable() {
                self.send(&d).await;
            }
        }
        let mut need_address = false;
        for e in o.events {
            if let Err(why) = self.router.on_event(slot, &e) {
                println!("router: {why}");
            }
            match &e {
                Event::InnerAddressNeeded { peer_identity, .. } => {
                    println!("event InnerAddressNeeded {peer_identity}");
                    need_address = true;
                }
                Event::IkeSaEstablished {
                    local_spi,
                    peer_identity,
                } => {
                    println!("event IkeSaEstablished spi={local_spi:016x} peer={peer_identity}")
                }
                Event::ChildSaInstalled(info) => println!(
                    "event ChildSaInstalled in={:08x} out={:08x} rekey_of={:x?} esn={} pfs={:?} encr={:?} remote_ts={:?}",
                    info.inbound_spi,
                    info.outbound_spi,
                    info.rekey_of,
                    info.suite.esn,
                    info.suite.dh,
                    info.suite.encr,
                    info.remote_ts
                ),
                Event::ChildSaDeleted {
                    inbound_spi,
                    outbound_spi,
                } => {
                    println!("event ChildSaDeleted in={inbound_spi:08x} out={outbound_spi:08x}")
                }
                Event::IkeSaRekeyed {
                    old_local_spi,
                    new_local_spi,
                } => {
                    println!(
                        "event IkeSaRekeyed old={old_local_spi:016x} new={new_local_spi:016x}"
                    );
                }
                Event::LocalSpiReleased { local_spi } => {
                    println!("event LocalSpiReleased {local_spi:016x}");
                }
                Event::Closed { reason } => {
                    println!("event Closed {reason:?}");
                    self.sas[slot] = None;
                }
                Event::PeerAlive => println!("event PeerAlive"),
                other => println!("event {other:?}"),
            }
        }
        if need_address {
            let addr = InnerAddress::new(self.next_address).with_dns(Ipv4Addr::new(10, 10, 0, 1));
            println!("assign {}", addr.ipv4);
            self.next_address = Ipv4Addr::from(u32::from(self.next_address) + 1);
            let now = now_ms();
            let o = self.sas[slot]
                .as_mut()
                .map(|sa| sa.assign_inner_address(Some(addr), now, &mut self.rng));
            if let Some(Ok(o)) = o {
                Box::pin(self.apply(slot, o)).await;
            }
        }
    }

    async fn receive(&mut self, local: SocketAddr, remote: SocketAddr, bytes: &[u8]) {
        if let Some(h) = wire::Header::peek(bytes) {
            println!(
                "rx {:?} {} id={} from {}",
                h.exchange,
                if h.response { "response" } else { "request" },
                h.message_id,
                remote
            );
        }
        let now = now_ms();
        match self.router.route(remote, bytes) {
            Dispatch::Sa(slot) => {
                if let Some(sa) = self.sas[slot].as_mut() {
                    let o = sa.handle_datagram(now, &mut self.rng, local, remote, bytes);
                    self.apply(slot, o).await;
                }
            }
            Dispatch::NewSa { .. } => {
                match self.router.screen(&mut self.rng, local, remote, bytes) {
                    Screened::Admit(pending) => {
                        let slot = self.sas.len();
                        let key = pending.key();
                        if let Err(why) =
                            self.router
                                .insert_half_open(slot, key, [pending.local_spi()], now)
                        {
                            println!("dropped: {why}");
                            return;
                        }
                        match pending.complete(now, &mut self.rng) {
                            Accepted::NewSa(sa, o) => {
                                self.sas.push(Some(*sa));
                                self.apply(slot, o).await;
                            }
                            Accepted::Reply(d, why) => {
                                self.router.remove(slot);
                                println!("stateless reply: {why}");
                                self.send(&d).await;
                            }
                            Accepted::Dropped(why) => {
                                self.router.remove(slot);
                                println!("dropped: {why}");
                            }
                        }
                    }
                    Screened::Reply(d, why) => {
                        println!("stateless reply: {why}");
                        self.send(&d).await;
                    }
                    Screened::Dropped(why) => println!("dropped: {why}"),
                }
            }
            Dispatch::Unknown { local_spi } => println!("unknown SPI {local_spi:016x}"),
            Dispatch::Drop(why) => println!("dropped: {why}"),
        }
    }

    async fn command(&mut self, cmd: &str) {
        let Some(slot) = self
            .sas
            .iter()
            .rposition(|s| s.as_ref().is_some_and(IkeSa::is_established))
        else {
            println!("command {cmd}: no established SA");
            return;
        };
        let now = now_ms();
        let Some(sa) = self.sas[slot].as_mut() else {
            return;
        };
        let child = sa
            .children()
            .iter()
            .rev()
            .find(|c| !c.replaced)
            .map(|c| c.inbound_spi);
        let result = match (cmd, child) {
            ("dpd", _) => sa.send_dpd(now, &mut self.rng),
            ("rekey-child", Some(spi)) => sa.rekey_child(spi, now, &mut self.rng),
            ("delete-child", Some(spi)) => sa.delete_child(spi, now, &mut self.rng),
            ("rekey-ike", _) => sa.rekey_ike(now, &mut self.rng),
            ("close", _) => sa.close(now, &mut self.rng),
            _ => {
                println!("command {cmd}: not understood");
                return;
            }
        };
        println!("command {cmd}");
        match result {
            Ok(o) => self.apply(slot, o).await,
            Err(e) => println!("command {cmd} failed: {e}"),
        }
    }

    async fn timers(&mut self) {
        let now = now_ms();
        if self.router.poll_timeout() <= now {
            for slot in self.router.handle_timeout(now, &mut self.rng) {
                println!("half-open SA expired");
                self.sas[slot] = None;
            }
        }
        for slot in 0..self.sas.len() {
            let due = self.sas[slot]
                .as_ref()
                .and_then(IkeSa::next_timeout)
                .is_some_and(|t| t <= now);
            if due {
                let o = self.sas[slot]
                    .as_mut()
                    .map(|sa| sa.handle_timeout(now, &mut self.rng));
                if let Some(o) = o {
                    self.apply(slot, o).await;
                }
            }
        }
    }
}

/// Runs the node until killed. `args` are the command-line arguments after
/// the program name.
pub fn main(args: Vec<String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(args));
}

async fn run(args: Vec<String>) {
    let listen: Ipv4Addr = arg(&args, "--listen")
        .unwrap_or("0.0.0.0".into())
        .parse()
        .expect("--listen IPv4");
    let id = arg(&args, "--id").unwrap_or("gw.example".into());
    let peer_id = arg(&args, "--peer").unwrap_or("client.example".into());
    let psk = arg(&args, "--psk").unwrap_or("s3cret-psk-value".into());
    let pool: Ipv4Addr = arg(&args, "--pool")
        .unwrap_or("10.10.0.2".into())
        .parse()
        .expect("--pool IPv4");
    let local_ts = arg(&args, "--local-ts").unwrap_or("10.10.0.0/24".into());

    let mut config =
        Config::new(Identity::fqdn(&id)).with_psk(Identity::fqdn(&peer_id), psk.as_bytes());
    config.local_ts = vec![parse_prefix(&local_ts)];
    config.remote_ts = vec![parse_prefix(
        &arg(&args, "--remote-ts").unwrap_or("0.0.0.0/0".into()),
    )];
    let mut rng = UrandomRng(std::fs::File::open("/dev/urandom").expect("/dev/urandom"));
    let mut cookie = [0u8; 32];
    rng.fill(&mut cookie);

    let sock500 = Arc::new(UdpSocket::bind((listen, 500)).await.expect("bind 500"));
    let sock4500 = Arc::new(UdpSocket::bind((listen, 4500)).await.expect("bind 4500"));
    let endpoint = Endpoint::new(Arc::new(config), Secret::from_slice(&cookie));
    let mut node = Node {
        router: Router::new(endpoint, RouterLimits::default(), now_ms()).expect("router limits"),
        sas: Vec::new(),
        next_address: pool,
        rng,
        sock500: sock500.clone(),
        sock4500: sock4500.clone(),
    };
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    println!("listening on {listen}:500 and {listen}:4500");
    if let Some(peer) = arg(&args, "--connect") {
        let peer: Ipv4Addr = peer.parse().expect("--connect IPv4");
        let mut options = ConnectOptions::road_warrior(
            Identity::fqdn(&peer_id),
            node.router.endpoint().config().remote_ts.clone(),
        );
        options.force_udp_encap = args.iter().any(|a| a == "--encap");
        let config = node.router.endpoint().config().clone();
        let (sa, o) = IkeSa::connect(
            config,
            SocketAddr::from((listen, 500)),
            SocketAddr::from((peer, 500)),
            options,
            now_ms(),
            &mut node.rng,
        );
        // Our own SA: routed by its initiator SPI, never half-open here.
        node.router
            .insert(0, sa.local_spis())
            .expect("the first SA's SPI is free");
        node.sas.push(Some(sa));
        node.apply(0, o).await;
    }
    let mut buf500 = vec![0u8; 65536];
    let mut buf4500 = vec![0u8; 65536];
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            r = sock500.recv_from(&mut buf500) => {
                let Ok((n, from)) = r else { continue };
                let local = SocketAddr::from((listen, 500));
                let bytes = buf500[..n].to_vec();
                node.receive(local, from, &bytes).await;
            }
            r = sock4500.recv_from(&mut buf4500) => {
                let Ok((n, from)) = r else { continue };
                // RFC 3948 §2.2: IKE on 4500 carries a four-zero-octet marker;
                // anything else is ESP (not ours) or a NAT-keepalive (one 0xff).
                if n < 4 || buf4500[..4] != [0, 0, 0, 0] {
                    continue;
                }
                let local = SocketAddr::from((listen, 4500));
                let bytes = buf4500[4..n].to_vec();
                node.receive(local, from, &bytes).await;
            }
            Some(cmd) = cmd_rx.recv() => node.command(&cmd).await,
            _ = tick.tick() => node.timers().await,
        }
    }
}
