//! End to end (root): the built `evpc-client` binary in one network namespace, a gateway made
//! of our parts in another — the `evpc_ike` responder of `support` over the userspace data
//! plane of `evpc-dataplane`, the same driver the node runs — joined by a veth pair; UDP
//! through the tunnel both ways, the gateway's child and IKE rekeys and DPDs, then SIGTERM
//! (or the gateway's delete, or `--delete-on-exit`), each checked in the client's JSON lines.
//!
//! ```text
//!  ns cli                                                  ns gw
//!  app 10.10.1.2 ─► route 10.20.0.0/24 dev evpcc0          app 10.20.0.1:7000 (on evpcg0)
//!  evpc-client: UserspaceDriver + IkeSa initiator           UserspaceDriver + Gateway (responder)
//!  198.51.100.100 (cl0) ═══════════ veth ═══════════════════ 198.51.100.1 (gw0)
//!                    IKE 500 → 4500, ESP in UDP 4500
//! ```

mod support;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evpc_client::child::child_start;
use evpc_dataplane::ike::{IkePort, IkeReceiver};
use evpc_dataplane::netns::{NetNs, root_or_skip, veth_pair};
use evpc_dataplane::userspace::{TunConfig, UserspaceConfig, UserspaceDriver};
use evpc_dataplane::{FenceGate, SaDriver};
use evpc_ike::Event;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use support::*;

const CLIENT_OUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const GW_OUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const GW_APP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 20, 0, 1)), 7000);
/// The whole test must stay well under this.
const PATIENCE: Duration = Duration::from_secs(10);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

// ---------------------------------------------------------------- the gateway

/// What the test asks the gateway to do.
#[derive(Debug)]
enum Order {
    RekeyChild,
    RekeyIke,
    Dpd,
    Delete,
    Stop,
}

/// What the gateway thread shows the test.
#[derive(Debug, Default, Clone)]
struct GwStatus {
    init_requests: u32,
    auth_requests: u32,
    sas_accepted: u32,
    sa_alive: bool,
    running: Vec<u32>,
    closed: Vec<String>,
}

/// The gateway's data plane and IKE loop, in its namespace.
struct Gw {
    commands: tokio::sync::mpsc::UnboundedSender<Order>,
    status: Arc<Mutex<GwStatus>>,
    thread: Option<JoinHandle<()>>,
    driver: Arc<UserspaceDriver>,
}

impl Gw {
    fn start(ns: &NetNs) -> Gw {
        let config = UserspaceConfig::new(
            IpAddr::V4(GW_OUTER),
            TunConfig {
                addresses: vec![(GW_APP.ip(), 24)],
                routes: vec![(IpAddr::V4(Ipv4Addr::new(10, 10, 1, 0)), 24)],
                ..TunConfig::named("evpcg0")
            },
        );
        let (driver, ike) = ns
            .run(move || UserspaceDriver::new(config, Arc::new(FenceGate::always_open())))
            .expect("a thread in the gateway namespace")
            .expect("the gateway's data plane");
        let driver = Arc::new(driver);
        let (commands, rx) = tokio::sync::mpsc::unbounded_channel();
        let status = Arc::new(Mutex::new(GwStatus::default()));
        let thread = {
            let driver = Arc::clone(&driver);
            let status = Arc::clone(&status);
            std::thread::Builder::new()
                .name("gw-ike".into())
                .spawn(move || {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(gateway_loop(driver, ike, rx, status))
                })
                .unwrap()
        };
        Gw {
            commands,
            status,
            thread: Some(thread),
            driver,
        }
    }

    fn order(&self, command: Order) {
        self.commands.send(command).expect("the gateway loop runs");
    }

    fn status(&self) -> GwStatus {
        self.status.lock().unwrap().clone()
    }

    fn wait_until(&self, what: &str, done: impl Fn(&GwStatus) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        while !done(&self.status()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", self.status());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.commands.send(Order::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.driver.shutdown();
    }
}

/// The gateway's IKE: datagrams from its data plane into the responder, answers back out
/// through it, its children started and stopped in it.
async fn gateway_loop(
    driver: Arc<UserspaceDriver>,
    mut ike: IkeReceiver,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<Order>,
    status: Arc<Mutex<GwStatus>>,
) {
    let mut gw = Gateway::new();
    loop {
        let deadline = gw.next_timeout().map(|at| {
            tokio::time::Instant::now() + Duration::from_millis(at.saturating_sub(now_ms()) + 1)
        });
        let out = tokio::select! {
            datagram = ike.recv() => match datagram {
                Some(d) => gw.on_datagram(now_ms(), d.local, d.remote, &d.message),
                None => return,
            },
            command = commands.recv() => match command {
                Some(Order::RekeyChild) => gw.rekey_child(now_ms()),
                Some(Order::RekeyIke) => gw.rekey_ike(now_ms()),
                Some(Order::Dpd) => gw.dpd(now_ms()),
                Some(Order::Delete) => gw.delete(now_ms()),
                Some(Order::Stop) | None => return,
            },
            () = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => {
                gw.on_timeout(now_ms())
            }
        };
        // A new child runs before anything that completes its exchange leaves: once the client
        // sees the rekey done, it sends on the new child only.
        for event in &out.events {
            if let Event::ChildSaInstalled(info) = event {
                let ike_spi = gw.sa.as_ref().and_then(|sa| sa.local_spi()).unwrap();
                driver
                    .start(child_start(ike_spi, info))
                    .expect("the gateway runs its child");
            }
        }
        for d in &out.datagrams {
            let port = if d.local.port() == 4500 {
                IkePort::NatT
            } else {
                IkePort::Ike
            };
            driver
                .send_ike(port, d.remote, &d.payload)
                .expect("the gateway sends IKE");
        }
        for event in &out.events {
            if let Event::ChildSaDeleted { inbound_spi, .. } = event {
                driver.stop(*inbound_spi);
            }
        }
        *status.lock().unwrap() = GwStatus {
            init_requests: gw.init_requests,
            auth_requests: gw.auth_requests,
            sas_accepted: gw.sas_accepted,
            sa_alive: gw.sa.is_some(),
            running: driver.running(),
            closed: gw.closed.clone(),
        };
    }
}

// ---------------------------------------------------------------- the client process

/// The client process and its report, killed (SIGKILL) and reaped on drop if still running.
struct ClientProc {
    child: Child,
    lines: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    reader: Option<JoinHandle<()>>,
}

impl ClientProc {
    fn start(ns: &NetNs, psk_file: &std::path::Path, extra: &[&str]) -> ClientProc {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns.name(),
                env!("CARGO_BIN_EXE_evpc-client"),
            ])
            .args([
                "--local",
                &CLIENT_OUTER.to_string(),
                "--gateway",
                &GW_OUTER.to_string(),
                "--id",
                CLIENT_ID,
                "--remote-id",
                GW_ID,
                "--psk-file",
                psk_file.to_str().unwrap(),
                "--tun",
                "evpcc0",
                "--route",
                "10.20.0.0/24",
                "--counters-ms",
                "200",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting evpc-client under ip netns exec");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON line: {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        ClientProc {
            child,
            lines,
            seen: Vec::new(),
            reader: Some(reader),
        }
    }

    /// Waits for the first line (after those already seen) that `want` accepts.
    fn wait_for(&mut self, what: &str, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if want(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no {what} within {PATIENCE:?}; the client said:\n{}",
                    self.seen
                        .iter()
                        .map(Value::to_string)
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    fn wait_event(&mut self, event: &str) -> Value {
        self.wait_for(event, |l| l["event"] == event)
    }

    /// Every line up to the end of the output.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            self.seen.push(line);
        }
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signalling the client");
    }

    /// Waits for the process to end; its exit status.
    fn wait_exit(&mut self) -> Option<i32> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("waitpid") {
                self.drain();
                if let Some(reader) = self.reader.take() {
                    reader.join().expect("the reader thread");
                }
                return status.code();
            }
            assert!(Instant::now() < deadline, "the client did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn count(&self, event: &str) -> usize {
        self.seen.iter().filter(|l| l["event"] == event).count()
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---------------------------------------------------------------- the bed

/// Both namespaces, the gateway, the PSK file. Fields drop in order: the gateway's threads
/// before the namespaces, the directory last.
struct Bed {
    gw: Gw,
    gw_ns: NetNs,
    cli_ns: NetNs,
    psk_dir: tempfile::TempDir,
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let gw_ns = NetNs::create(&format!("{tag}-gw")).expect("the gateway's namespace");
        let cli_ns = NetNs::create(&format!("{tag}-cli")).expect("the client's namespace");
        veth_pair(
            &gw_ns,
            "gw0",
            (IpAddr::V4(GW_OUTER), 24),
            &cli_ns,
            "cl0",
            (IpAddr::V4(CLIENT_OUTER), 24),
        )
        .expect("the veth pair");
        let gw = Gw::start(&gw_ns);
        let psk_dir = tempfile::tempdir().unwrap();
        let path = psk_dir.path().join("psk");
        std::fs::write(&path, [PSK, b"\n"].concat()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Bed {
            gw,
            gw_ns,
            cli_ns,
            psk_dir,
        }
    }

    fn client(&self, extra: &[&str]) -> ClientProc {
        ClientProc::start(&self.cli_ns, &self.psk_dir.path().join("psk"), extra)
    }

    /// A UDP socket bound in a namespace.
    fn socket(ns: &NetNs, addr: SocketAddr) -> UdpSocket {
        let socket = ns
            .run(move || UdpSocket::bind(addr))
            .unwrap()
            .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket
    }
}

/// Threads and private resident memory (KiB) of process `pid`.
fn footprint(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("Threads:"), field("RssAnon:"))
}

/// `count` datagrams from the client's app to the gateway's and back, each answered.
fn round_trips(client_app: &UdpSocket, gw_app: &UdpSocket, count: usize, tag: &str) {
    let mut buffer = [0u8; 256];
    for i in 0..count {
        let ping = format!("{tag} ping {i}");
        client_app.send_to(ping.as_bytes(), GW_APP).unwrap();
        let (len, from) = gw_app
            .recv_from(&mut buffer)
            .unwrap_or_else(|e| panic!("{tag}: ping {i} did not cross the tunnel: {e}"));
        assert_eq!(&buffer[..len], ping.as_bytes());
        assert_eq!(from.ip(), IpAddr::V4(FIRST_INNER), "from the inner address");
        let pong = format!("{tag} pong {i}");
        gw_app.send_to(pong.as_bytes(), from).unwrap();
        let (len, from) = client_app
            .recv_from(&mut buffer)
            .unwrap_or_else(|e| panic!("{tag}: pong {i} did not come back: {e}"));
        assert_eq!(&buffer[..len], pong.as_bytes());
        assert_eq!(from, GW_APP);
    }
}

#[test]
fn traffic_rekeys_and_dpds_then_sigterm_leaves_the_gateway_alone() {
    if !root_or_skip("evpc-client e2e (network namespaces, TUN)") {
        return;
    }
    let bed = Bed::new("rw");
    let mut client = bed.client(&["--dpd-s", "1"]);
    let started = client.wait_event("started");
    assert_eq!(started["local"], CLIENT_OUTER.to_string());
    let est = client.wait_event("established");
    assert_eq!(est["inner"], FIRST_INNER.to_string());
    assert_eq!(est["gateway"], format!("{GW_OUTER}:4500"));
    // the child runs and the TUN is configured once child_started is out
    let child = client.wait_event("child_started");
    assert_eq!(child["in_spi"], est["child_in_spi"]);
    assert_eq!(client.count("ike_auth"), 1);

    let client_app = Bed::socket(&bed.cli_ns, SocketAddr::from((FIRST_INNER, 0)));
    let gw_app = Bed::socket(&bed.gw_ns, GW_APP);
    round_trips(&client_app, &gw_app, 20, "first child");
    // Hundreds of clients share a host: the main thread plus the data plane's three workers,
    // and little private memory (the binary's pages are shared between them).
    let (threads, private_kib) = footprint(client.child.id());
    assert!(threads <= 4, "{threads} threads");
    assert!(
        private_kib < 16 * 1024,
        "{private_kib} KiB of private memory"
    );

    // the gateway rekeys the child: a new one starts, the old one stops, traffic goes on
    bed.gw.order(Order::RekeyChild);
    let rekeyed = client.wait_event("rekeyed");
    assert_eq!(rekeyed["kind"], "child");
    assert_eq!(rekeyed["by"], "gateway");
    assert_eq!(rekeyed["old_in_spi"], child["in_spi"]);
    let stopped = client.wait_event("child_stopped");
    assert_eq!(stopped["reason"], "rekeyed");
    assert_eq!(stopped["in_spi"], child["in_spi"]);
    assert_eq!(stopped["counters"]["in_packets"], 20, "{stopped}");
    assert_eq!(stopped["counters"]["out_packets"], 20, "{stopped}");
    // The rekey is over when the gateway has the answer to its delete too: until then its data
    // plane still sends on the old child (the earliest started), which the client has dropped.
    // (The gateway's inbound SPI of a child is the client's outbound one.)
    let old_at_gw = u32::from_str_radix(stopped["out_spi"].as_str().unwrap(), 16).unwrap();
    bed.gw.wait_until("the gateway stops the old child", |s| {
        s.running.len() == 1 && !s.running.contains(&old_at_gw)
    });
    round_trips(&client_app, &gw_app, 10, "second child");

    // an IKE rekey keeps the child; the gateway's DPD is answered
    bed.gw.order(Order::RekeyIke);
    let rekeyed = client.wait_event("rekeyed");
    assert_eq!(rekeyed["kind"], "ike");
    assert_eq!(rekeyed["old_spi_i"], est["spi_i"]);
    bed.gw.order(Order::Dpd);
    client.wait_for("the gateway's DPD", |l| {
        l["event"] == "dpd" && l["by"] == "gateway"
    });
    // ours, every second
    let ours = client.wait_for("our DPD", |l| l["event"] == "dpd" && l["by"] == "client");
    assert!(ours["rtt_ms"].as_f64().unwrap() < 1000.0, "{ours}");
    round_trips(&client_app, &gw_app, 10, "after the IKE rekey");

    let counters = client.wait_for("counters with all the traffic", |l| {
        l["event"] == "counters" && l["total"]["in_packets"].as_u64() >= Some(40)
    });
    assert_eq!(counters["total"]["out_packets"], 40, "{counters}");
    assert_eq!(counters["total"]["replay_drops"], 0);
    assert_eq!(counters["total"]["auth_failures"], 0);
    assert_eq!(counters["children"].as_array().unwrap().len(), 1);
    assert_eq!(counters["children"][0]["in_packets"], 20);
    assert_eq!(counters["children"][0]["replay_drops"], 0);
    assert_eq!(counters["children"][0]["auth_failures"], 0);
    assert_eq!(counters["driver"]["packets_in"], 40);
    assert_eq!(counters["driver"]["packets_out"], 40);
    assert!(counters["driver"]["bytes_in"].as_u64() > Some(40 * 28));
    assert_eq!(counters["driver"]["replay_drops"], 0);
    assert_eq!(counters["driver"]["auth_failures"], 0);
    assert_eq!(counters["final"], false);

    client.signal(Signal::SIGTERM);
    assert_eq!(client.wait_exit(), Some(0), "SIGTERM is a clean stop");
    let n = client.seen.len();
    let (last_counters, stopped) = (&client.seen[n - 2], &client.seen[n - 1]);
    assert_eq!(last_counters["event"], "counters");
    assert_eq!(last_counters["final"], true);
    assert_eq!(last_counters["total"]["in_packets"], 40);
    assert_eq!(stopped["event"], "stopped");
    assert_eq!(stopped["signal"], "SIGTERM");
    assert_eq!(stopped["deleted"], false);
    assert_eq!(client.count("ike_auth"), 1, "never a second IKE_AUTH");
    assert_eq!(client.count("closed"), 0);
    assert_eq!(client.count("error"), 0);
    // the client left without a word: the gateway's SA is still there
    std::thread::sleep(Duration::from_millis(200));
    let status = bed.gw.status();
    assert!(status.sa_alive && status.closed.is_empty(), "{status:?}");
    assert_eq!(
        (status.sas_accepted, status.auth_requests),
        (1, 1),
        "{status:?}"
    );
}

#[test]
fn a_gateway_delete_ends_the_client_with_status_3_and_no_new_sa() {
    if !root_or_skip("evpc-client e2e (network namespaces, TUN)") {
        return;
    }
    let bed = Bed::new("rwdel");
    let mut client = bed.client(&[]);
    client.wait_event("child_started");
    bed.gw.order(Order::Delete);
    let closed = client.wait_event("closed");
    assert_eq!(closed["reason"], "deleted_by_peer");
    assert_eq!(closed["established"], true);
    assert_eq!(client.wait_exit(), Some(3));
    let last = client.seen.last().unwrap();
    assert_eq!(last["event"], "counters");
    assert_eq!(last["final"], true);
    let stopped = client
        .seen
        .iter()
        .find(|l| l["event"] == "child_stopped")
        .expect("the child stopped");
    assert_eq!(stopped["reason"], "ike_closed");
    // no new IKE_SA_INIT ever reached the gateway
    std::thread::sleep(Duration::from_millis(300));
    let status = bed.gw.status();
    assert_eq!(
        (status.init_requests, status.sas_accepted),
        (1, 1),
        "{status:?}"
    );
    assert!(!status.sa_alive);
    assert!(status.running.is_empty(), "the gateway stopped its child");
}

#[test]
fn delete_on_exit_deletes_the_sa_before_stopping() {
    if !root_or_skip("evpc-client e2e (network namespaces, TUN)") {
        return;
    }
    let bed = Bed::new("rwexit");
    let mut client = bed.client(&["--delete-on-exit"]);
    client.wait_event("child_started");
    client.signal(Signal::SIGINT);
    assert_eq!(client.wait_exit(), Some(0));
    let closed = client
        .seen
        .iter()
        .find(|l| l["event"] == "closed")
        .expect("closed");
    assert_eq!(closed["reason"], "deleted_locally");
    let stopped = client.seen.last().unwrap();
    assert_eq!(stopped["event"], "stopped");
    assert_eq!(stopped["signal"], "SIGINT");
    assert_eq!(stopped["deleted"], true);
    // the gateway answered before it noted the end of its SA
    bed.gw
        .wait_until("the gateway forgets the SA", |s| !s.sa_alive);
    assert_eq!(bed.gw.status().closed, ["DeletedByPeer"]);
}
