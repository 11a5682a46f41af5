//! `evpc-chaos esp-bench --traffic iperf3`: iperf3 TCP and UDP through evpc, strongSwan
//! (kernel-libipsec) and wireguard-go, in the same run, the same two namespaces and over the same
//! veth, one tunnel at a time.
//!
//! ```text
//!  ns A: iperf3 -c                                                   ns B: iperf3 -s
//!  evpc          198.19.1.1  TUN evpcA ─ ESP-in-UDP :4500 ═ veth ═► TUN evpcB   198.19.2.1
//!  strongSwan    198.19.11.1 TUN ipsec0 (charon) ─ ESP-in-UDP :4500 ═► ipsec0  198.19.12.1
//!  wireguard-go  198.19.21.1 TUN wgA (wireguard-go) ─ UDP :51820 ═► wgB        198.19.22.1
//!                    outer: a0 198.18.0.1/24 ═══ veth ═══ b0 198.18.0.2/24
//! ```
//!
//! For each tunnel in `--tunnels` order: bring it up → wait until B's inner address answers
//! through it (a TCP connect to a closed port is refused) → iperf3 server on B's inner address →
//! TCP (`-t --seconds -O --warmup`) → UDP at an unlimited rate (`-b 0`) → a search for the
//! highest offered rate whose loss stays within `--udp-max-loss` (`--udp-probes` runs of
//! `--udp-probe-seconds`, bisecting geometrically between a rate that kept it and one that did
//! not) → the reported UDP run at that rate (`-t --seconds`; if it loses more, 10% less, twice at
//! most) → tear the tunnel down. Between runs it waits until the tunnel's processes are idle
//! again (a userspace queue may still be draining). Every tunnel's device gets the same MTU
//! (`--inner-mtu`) and transmit queue ([`TXQUEUELEN`], as evpc's); UDP datagrams fill the MTU,
//! and iperf3's UDP sockets get `--udp-buffer` (4 MiB), so that iperf3's own receive buffer is
//! not what loses packets. iperf3 counts payload bytes (goodput). Each UDP run records where its
//! packets were lost: the tunnel device's queue in A, the tunnel's socket in B, or any UDP
//! receive buffer in B (iperf3's).
//!
//! The ESP processes' CPU is sampled around each reported run: evpc's worker threads in this
//! process, the two charon or wireguard-go processes otherwise (all their threads).
//!
//! Every process started here is its own child through `ip netns exec … exec setpriv
//! --pdeathsig KILL …`, so it dies with this thread even on SIGKILL; charon and wireguard-go get a
//! private tmpfs on `/run` (their pid file and UAPI socket); namespaces and the work directory
//! left by a killed run are removed by the next one.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use evpc_dataplane::SaDriver;
use evpc_dataplane::netns::{NetNs, is_root, veth_pair};
use evpc_dataplane::userspace::ENCR_AES_GCM_16;
use evpc_raft_store::ChildSuite;
use rand::RngCore;
use serde::Serialize;
use serde_json::Value;

use super::{
    A_INNER, A_OUTER, Args, B_INNER, B_OUTER, CpuSample, EvpcTunnel, SPI_A_TO_B, SPI_B_TO_A,
    TICKS_PER_SECOND, TUN_MTU, Tunnel, round, utc_now,
};

/// Inner addresses (A, B) of strongSwan's tunnel.
const SWAN_INNER: (Ipv4Addr, Ipv4Addr) =
    (Ipv4Addr::new(198, 19, 11, 1), Ipv4Addr::new(198, 19, 12, 1));
/// Inner addresses (A, B) of wireguard-go's tunnel.
const WG_INNER: (Ipv4Addr, Ipv4Addr) =
    (Ipv4Addr::new(198, 19, 21, 1), Ipv4Addr::new(198, 19, 22, 1));
/// iperf3's port on B's inner address.
const IPERF_PORT: u16 = 5201;
/// A port nothing listens on: a connect to it is refused once the tunnel carries packets.
const CLOSED_PORT: u16 = 9;
/// wireguard-go's UDP port on both sides.
const WG_PORT: u16 = 51820;
/// Transmit queue of every tunnel device (evpc's `make_driver` sets the same).
const TXQUEUELEN: u32 = 4096;
/// IPv4 + UDP headers of an iperf3 datagram.
const UDP_HEADERS: u32 = 28;
const CHARON: &str = "/usr/lib/ipsec/charon";
/// strongSwan's plugins, in load order: openssl first, so that AES-GCM is OpenSSL's (AES-NI,
/// PCLMULQDQ) and not the generic `gcm` over `aes`.
const SWAN_LOAD: &str = "random nonce openssl aesni aes gcm sha1 sha2 hmac kdf curve25519 pem \
                         pkcs1 x509 revocation constraints pubkey socket-default kernel-libipsec \
                         kernel-netlink vici updown";

/// The whole run.
#[derive(Debug, Serialize)]
struct Report {
    command: &'static str,
    traffic: &'static str,
    date: String,
    cores: usize,
    iperf3: String,
    /// Length of every reported run (TCP, UDP, UDP unlimited).
    seconds: u32,
    /// Seconds at the start of each TCP run that iperf3 leaves out (`-O`).
    tcp_omit_seconds: u32,
    inner_mtu: u32,
    /// Bytes of each iperf3 UDP datagram's payload (the inner packet fills the MTU).
    udp_payload: u32,
    /// iperf3's socket buffers in the UDP runs (`-w`; 0: its default).
    udp_socket_buffer: u64,
    txqueuelen: u32,
    udp_max_loss_pct: f64,
    /// `/proc/loadavg` (1, 5, 15 minutes) before the first tunnel and after the last.
    loadavg_before: [f64; 3],
    loadavg_after: [f64; 3],
    /// Keyed `evpc`, `strongswan`, `wireguard_go`.
    implementations: BTreeMap<&'static str, TunnelResult>,
    ratios: Ratios,
    min_tcp_ratio: f64,
    checks_passed: bool,
    failures: Vec<String>,
}

/// One tunnel's figures; `None` where it did not get that far (see `error`).
#[derive(Debug, Serialize)]
struct TunnelResult {
    #[serde(skip)]
    tunnel: Tunnel,
    name: &'static str,
    version: Option<String>,
    /// How it was set up.
    setup: String,
    /// The child SA's suite as negotiated (evpc: as installed).
    suite: Option<String>,
    /// Inner addresses: client → server.
    inner: String,
    /// TCP receiver goodput.
    tcp_bits_per_sec: Option<f64>,
    /// TCP retransmissions counted by the sender.
    tcp_retransmits: Option<u64>,
    tcp_sender_bits_per_sec: Option<f64>,
    tcp_cpu: Option<CpuUse>,
    /// UDP receiver goodput at `udp_offered_bits_per_sec`.
    udp_bits_per_sec: Option<f64>,
    udp_loss_pct: Option<f64>,
    /// What the reported UDP run's sender sent …
    udp_offered_bits_per_sec: Option<f64>,
    /// … asked to send `-b` (the search's result; 0: unlimited, the tunnel outran iperf3).
    udp_target_bits_per_sec: Option<u64>,
    udp_cpu: Option<CpuUse>,
    /// UDP as fast as iperf3 sends (`-b 0`): what gets through an overloaded tunnel.
    udp_unlimited: Option<UdpRun>,
    /// The search's probes, in order.
    udp_probes: Vec<UdpRun>,
    /// evpc's child counters over its whole run (both directions).
    #[serde(skip_serializing_if = "Option::is_none")]
    evpc_counters: Option<EvpcCounters>,
    error: Option<String>,
}

/// One iperf3 UDP run.
#[derive(Debug, Serialize)]
struct UdpRun {
    /// `-b`: 0 is unlimited.
    target_bits_per_sec: u64,
    sender_bits_per_sec: f64,
    receiver_bits_per_sec: f64,
    loss_pct: f64,
    packets: u64,
    lost_packets: u64,
    seconds: f64,
    /// Where packets were lost: drops of the tunnel's device in A (its queue was full: the
    /// tunnel did not read them in time) …
    a_device_tx_drops: u64,
    /// … and UDP receive-buffer overflows in B: all of them (the tunnel's socket or iperf3's) …
    b_udp_rcvbuf_errors: u64,
    /// … and those of the tunnel's own UDP socket(s) (the rest are iperf3's).
    b_tunnel_socket_drops: u64,
}

/// CPU during one reported iperf3 run, over the client's whole lifetime.
#[derive(Debug, Serialize)]
struct CpuUse {
    /// The tunnel's processes (evpc: its worker threads), in cores (1.0 = one core busy).
    esp_cores: f64,
    /// The same by process or thread.
    esp: BTreeMap<String, f64>,
    /// Busy share of the whole machine, 0..1.
    machine_busy: f64,
    /// iperf3's own figures (% of one core).
    iperf3_client_pct: Option<f64>,
    iperf3_server_pct: Option<f64>,
}

#[derive(Debug, Serialize)]
struct EvpcCounters {
    lease_waits: u64,
    lease_extends: u64,
    replay_drops: u64,
    auth_failures: u64,
}

#[derive(Debug, Default, Serialize)]
struct Ratios {
    evpc_over_strongswan_tcp: Option<f64>,
    evpc_over_strongswan_udp: Option<f64>,
    evpc_over_wireguard_go_tcp: Option<f64>,
    evpc_over_wireguard_go_udp: Option<f64>,
}

impl Tunnel {
    /// The key in `implementations` and `ratios`.
    fn key(self) -> &'static str {
        match self {
            Tunnel::Evpc => "evpc",
            Tunnel::Strongswan => "strongswan",
            Tunnel::WireguardGo => "wireguard_go",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Tunnel::Evpc => "evpc",
            Tunnel::Strongswan => "strongSwan kernel-libipsec",
            Tunnel::WireguardGo => "wireguard-go",
        }
    }

    /// The UDP port the tunnel's packets arrive on.
    fn outer_port(self) -> u16 {
        match self {
            Tunnel::Evpc | Tunnel::Strongswan => 4500,
            Tunnel::WireguardGo => WG_PORT,
        }
    }

    /// The tunnel's device in A.
    fn device_a(self) -> &'static str {
        match self {
            Tunnel::Evpc => "evpcA",
            Tunnel::Strongswan => "ipsec0",
            Tunnel::WireguardGo => "wgA",
        }
    }

    fn inner(self) -> (Ipv4Addr, Ipv4Addr) {
        match self {
            Tunnel::Evpc => (A_INNER, B_INNER),
            Tunnel::Strongswan => SWAN_INNER,
            Tunnel::WireguardGo => WG_INNER,
        }
    }
}

/// Runs the comparison; `Ok(false)` if a check failed.
pub(super) async fn run(args: Args) -> anyhow::Result<bool> {
    let json = args.json;
    let report = tokio::task::spawn_blocking(move || bench(&args)).await??;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(report.checks_passed)
}

fn bench(args: &Args) -> anyhow::Result<Report> {
    if !is_root() {
        bail!(
            "esp-bench --traffic iperf3 needs root: it creates network namespaces, a veth pair \
             and TUN devices and runs charon and wireguard-go in them (run it as root, e.g. \
             with sudo)"
        );
    }
    let mut tunnels = Vec::new();
    for &tunnel in &args.tunnels {
        if !tunnels.contains(&tunnel) {
            tunnels.push(tunnel);
        }
    }
    let missing = missing_programs(&tunnels);
    if !missing.is_empty() {
        bail!(
            "esp-bench --traffic iperf3 cannot run here; missing:\n  {}",
            missing.join("\n  ")
        );
    }
    if args.key_bits != 128 && args.key_bits != 256 {
        bail!("--key-bits must be 128 or 256");
    }
    if !(576..=TUN_MTU).contains(&args.inner_mtu) {
        bail!(
            "--inner-mtu {} is outside 576..={TUN_MTU} (ESP-in-UDP must fit the veth's 1500)",
            args.inner_mtu
        );
    }
    let work = WorkDir::create()?;
    let bench = Bench {
        a: NetNs::create("bench-a")?,
        b: NetNs::create("bench-b")?,
        work,
        args,
        seconds: args.seconds.ceil().max(1.0) as u32,
        omit: args.warmup.ceil().max(0.0) as u32,
        udp_payload: args.inner_mtu - UDP_HEADERS,
        udp_buffer: args.udp_buffer.unwrap_or_else(|| {
            let max = |name| {
                fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            (4 << 20).min(max("rmem_max")).min(max("wmem_max"))
        }),
        runs: std::cell::Cell::new(0),
    };
    veth_pair(
        &bench.a,
        "a0",
        (A_OUTER.into(), 24),
        &bench.b,
        "b0",
        (B_OUTER.into(), 24),
    )?;
    let loadavg_before = loadavg();

    let mut implementations = BTreeMap::new();
    let mut failures = Vec::new();
    for &tunnel in &tunnels {
        let (a_inner, b_inner) = tunnel.inner();
        let mut result = TunnelResult {
            tunnel,
            name: tunnel.label(),
            version: None,
            setup: String::new(),
            suite: None,
            inner: format!("{a_inner} -> {b_inner}"),
            tcp_bits_per_sec: None,
            tcp_retransmits: None,
            tcp_sender_bits_per_sec: None,
            tcp_cpu: None,
            udp_bits_per_sec: None,
            udp_loss_pct: None,
            udp_offered_bits_per_sec: None,
            udp_target_bits_per_sec: None,
            udp_cpu: None,
            udp_unlimited: None,
            udp_probes: Vec::new(),
            evpc_counters: None,
            error: None,
        };
        let outcome = match tunnel {
            Tunnel::Evpc => bench.evpc(&mut result),
            Tunnel::Strongswan => bench.strongswan(&mut result),
            Tunnel::WireguardGo => bench.wireguard_go(&mut result),
        };
        if let Err(e) = outcome {
            failures.push(format!("{}: {e:#}", tunnel.label()));
            result.error = Some(format!("{e:#}"));
        }
        if let Some(counters) = &result.evpc_counters {
            if counters.auth_failures > 0 {
                failures.push(format!(
                    "evpc: {} packets failed authentication",
                    counters.auth_failures
                ));
            }
            if counters.lease_waits > 0 {
                failures.push(format!(
                    "evpc: {} packets waited for a lease the keeper should have granted",
                    counters.lease_waits
                ));
            }
        }
        implementations.insert(tunnel.key(), result);
    }
    let loadavg_after = loadavg();

    let ratio = |other: &str, tcp: bool| {
        let pick = |r: &TunnelResult| {
            if tcp {
                r.tcp_bits_per_sec
            } else {
                r.udp_bits_per_sec
            }
        };
        let evpc = pick(implementations.get("evpc")?)?;
        let other = pick(implementations.get(other)?)?;
        (other > 0.0).then(|| round(evpc / other, 2))
    };
    let ratios = Ratios {
        evpc_over_strongswan_tcp: ratio("strongswan", true),
        evpc_over_strongswan_udp: ratio("strongswan", false),
        evpc_over_wireguard_go_tcp: ratio("wireguard_go", true),
        evpc_over_wireguard_go_udp: ratio("wireguard_go", false),
    };
    if tunnels.contains(&Tunnel::Evpc) && tunnels.contains(&Tunnel::Strongswan) {
        match ratios.evpc_over_strongswan_tcp {
            Some(r) if r >= args.min_tcp_ratio => {}
            Some(r) => failures.push(format!(
                "evpc's TCP throughput is {r:.2} times strongSwan kernel-libipsec's, below \
                 --min-tcp-ratio {}",
                args.min_tcp_ratio
            )),
            None => failures.push(
                "evpc's TCP throughput could not be compared with strongSwan's (see above)".into(),
            ),
        }
    }
    Ok(Report {
        command: "esp-bench",
        traffic: "iperf3",
        date: utc_now(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        iperf3: first_line(&output("iperf3", &["--version"]).1),
        seconds: bench.seconds,
        tcp_omit_seconds: bench.omit,
        inner_mtu: args.inner_mtu,
        udp_payload: bench.udp_payload,
        udp_socket_buffer: bench.udp_buffer,
        txqueuelen: TXQUEUELEN,
        udp_max_loss_pct: args.udp_max_loss,
        loadavg_before,
        loadavg_after,
        implementations,
        ratios,
        min_tcp_ratio: args.min_tcp_ratio,
        checks_passed: failures.is_empty(),
        failures,
    })
}

/// What every tunnel shares. Each tunnel's processes are gone when its method returns; then the
/// namespaces go, then the work directory (fields drop in order).
struct Bench<'a> {
    a: NetNs,
    b: NetNs,
    work: WorkDir,
    args: &'a Args,
    seconds: u32,
    omit: u32,
    udp_payload: u32,
    udp_buffer: u64,
    /// iperf3 runs so far (names their output files).
    runs: std::cell::Cell<u32>,
}

/// Whose CPU a tunnel's ESP costs.
enum Esp {
    /// Threads of this process whose names start with one of these.
    Threads(&'static [&'static str]),
    /// Processes: (name, pid).
    Processes(Vec<(String, u32)>),
}

impl Esp {
    /// CPU ticks so far, by thread name or process.
    fn ticks(&self) -> BTreeMap<String, u64> {
        let mut ticks = BTreeMap::new();
        match self {
            Esp::Threads(prefixes) => {
                for (name, used) in CpuSample::take().threads.into_values() {
                    if prefixes.iter().any(|p| name.starts_with(p)) {
                        *ticks.entry(name).or_default() += used;
                    }
                }
            }
            Esp::Processes(processes) => {
                for (name, pid) in processes {
                    let used = fs::read_to_string(format!("/proc/{pid}/stat"))
                        .ok()
                        .and_then(|stat| super::parse_task_stat(&stat))
                        .map_or(0, |(_, t)| t);
                    ticks.insert(name.clone(), used);
                }
            }
        }
        ticks
    }

    /// Waits (up to 10 s) until the tunnel's processes are nearly idle: what an overloaded
    /// userspace queue still holds has been processed.
    fn settle(&self) {
        std::thread::sleep(Duration::from_millis(300));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let before: u64 = self.ticks().values().sum();
            std::thread::sleep(Duration::from_millis(300));
            let after: u64 = self.ticks().values().sum();
            // below 0.1 of a core
            if after.saturating_sub(before) <= 3 {
                return;
            }
        }
    }
}

impl Bench<'_> {
    fn evpc(&self, result: &mut TunnelResult) -> anyhow::Result<()> {
        let suite = ChildSuite {
            encryption: ENCR_AES_GCM_16,
            key_bits: self.args.key_bits,
            esn: !self.args.no_esn,
        };
        result.version = Some(env!("CARGO_PKG_VERSION").into());
        result.suite = Some(suite.to_string());
        result.setup = format!(
            "userspace backend in both namespaces with mirrored child SAs {suite} (static keys, \
             no IKE), ESP-in-UDP on 4500, TUN evpcA/evpcB mtu {} txqueuelen {TXQUEUELEN}, \
             leases of {} sequence numbers extended at half use",
            self.args.inner_mtu, self.args.lease
        );
        let inner = Tunnel::Evpc.inner();
        let mut tunnel = EvpcTunnel::start(
            &self.a,
            &self.b,
            suite,
            self.args.lease,
            inner,
            self.args.inner_mtu,
        )?;
        let totals = |tunnel: &EvpcTunnel| -> anyhow::Result<[u64; 3]> {
            let a = tunnel.a.counters(SPI_B_TO_A).context("child A")?;
            let b = tunnel.b.counters(SPI_A_TO_B).context("child B")?;
            Ok([
                a.lease_waits + b.lease_waits,
                a.replay_drops + b.replay_drops,
                a.auth_failures + b.auth_failures,
            ])
        };
        let before = totals(&tunnel)?;
        let measured = self.measure(Tunnel::Evpc, &Esp::Threads(&["evpcA-", "evpcB-"]), result);
        let after = totals(&tunnel)?;
        result.evpc_counters = Some(EvpcCounters {
            lease_waits: after[0] - before[0],
            lease_extends: tunnel.extends.load(std::sync::atomic::Ordering::Relaxed),
            replay_drops: after[1] - before[1],
            auth_failures: after[2] - before[2],
        });
        tunnel.stop();
        measured
    }

    fn strongswan(&self, result: &mut TunnelResult) -> anyhow::Result<()> {
        let (a_inner, b_inner) = SWAN_INNER;
        result.setup = format!(
            "charon (kernel-libipsec: ESP in userspace through TUN ipsec0, always ESP-in-UDP on \
             4500) in each namespace, PSK, IKE aes128gcm16-prfsha256-x25519, ESP aes128gcm16, \
             site-to-site {a_inner}/24 === {b_inner}/24 (inner addresses /32 on the veth), \
             ipsec0 mtu {} txqueuelen {TXQUEUELEN}; plugins: {SWAN_LOAD}",
            self.args.inner_mtu
        );
        // The selectors' addresses must be on an interface of each side: charon routes
        // remote_ts through ipsec0 with that source.
        let _a_addr = Address::add(&self.a, a_inner, "a0")?;
        let _b_addr = Address::add(&self.b, b_inner, "b0")?;
        let mut secret = [0u8; 24];
        rand::rng().fill_bytes(&mut secret);
        let secret = hex::encode(secret);
        let a = Charon::start(
            &self.a,
            &self.work.0.join("swan-a"),
            &SwanSide {
                me: A_OUTER,
                peer: B_OUTER,
                local_ts: a_inner,
                remote_ts: b_inner,
                id: "a.bench",
                peer_id: "b.bench",
                secret: &secret,
                mtu: self.args.inner_mtu,
            },
        )?;
        let b = Charon::start(
            &self.b,
            &self.work.0.join("swan-b"),
            &SwanSide {
                me: B_OUTER,
                peer: A_OUTER,
                local_ts: b_inner,
                remote_ts: a_inner,
                id: "b.bench",
                peer_id: "a.bench",
                secret: &secret,
                mtu: self.args.inner_mtu,
            },
        )?;
        // "Linux strongSwan 5.9.8"
        let version = first_line(&output(CHARON, &["--version"]).1);
        result.version = Some(version.trim_start_matches("Linux ").to_owned());
        let initiated = a.swanctl(&["--initiate", "--child", "bench", "--timeout", "30"]);
        let initiated = match initiated {
            Ok(out) => out,
            Err(e) => bail!(
                "{e:#}\ncharon A's log ends:\n{}\ncharon B's log ends:\n{}",
                a.log_tail(15),
                b.log_tail(15)
            ),
        };
        result.suite = initiated
            .lines()
            .find_map(|l| l.split("selected proposal: ESP:").nth(1))
            .map(|s| s.trim().to_owned());
        for ns in [&self.a, &self.b] {
            ns.ip(&[
                "link",
                "set",
                "dev",
                "ipsec0",
                "txqueuelen",
                &TXQUEUELEN.to_string(),
            ])?;
        }
        let esp = Esp::Processes(vec![
            ("charon-a".into(), a.daemon.pid()),
            ("charon-b".into(), b.daemon.pid()),
        ]);
        self.measure(Tunnel::Strongswan, &esp, result)
            .map_err(|e| e.context(format!("charon A's log ends:\n{}", a.log_tail(10))))
    }

    fn wireguard_go(&self, result: &mut TunnelResult) -> anyhow::Result<()> {
        let (a_inner, b_inner) = WG_INNER;
        result.version = Some(first_line(&output("wireguard-go", &["--version"]).1));
        result.suite = Some("WireGuard (Noise_IKpsk2, ChaCha20-Poly1305)".into());
        result.setup = format!(
            "wireguard-go -f in each namespace (interfaces wgA/wgB), keys from wg genkey, wg set \
             listen-port {WG_PORT}, one peer with endpoint over the veth and allowed-ips the \
             other side's /24, {a_inner}/24 and {b_inner}/24, mtu {} txqueuelen {TXQUEUELEN}",
            self.args.inner_mtu
        );
        let key_a = wg_key(None)?;
        let key_b = wg_key(None)?;
        let public_a = wg_key(Some(&key_a))?;
        let public_b = wg_key(Some(&key_b))?;
        let a = self.wg_side(
            &self.a,
            "wgA",
            &key_a,
            &public_b,
            B_OUTER,
            (a_inner, b_inner),
        )?;
        let b = self.wg_side(
            &self.b,
            "wgB",
            &key_b,
            &public_a,
            A_OUTER,
            (b_inner, a_inner),
        )?;
        let esp = Esp::Processes(vec![
            ("wireguard-go-a".into(), a.pid()),
            ("wireguard-go-b".into(), b.pid()),
        ]);
        self.measure(Tunnel::WireguardGo, &esp, result)
    }

    /// wireguard-go for interface `name` in `ns`, configured with `key` and one peer.
    fn wg_side(
        &self,
        ns: &NetNs,
        name: &str,
        key: &str,
        peer_key: &str,
        peer: Ipv4Addr,
        (inner, remote): (Ipv4Addr, Ipv4Addr),
    ) -> anyhow::Result<Daemon> {
        // a private /run: its UAPI socket (/run/wireguard/NAME.sock) goes with it
        let script = format!(
            "mount -t tmpfs none /run && exec setpriv --pdeathsig KILL wireguard-go -f {name}"
        );
        let command = with_private_run(ns, &script);
        let mut daemon = Daemon::spawn(
            &format!("wireguard-go {name}"),
            command,
            self.work.0.join(format!("{name}.log")),
        )?;
        let socket = PathBuf::from(format!(
            "/proc/{}/root/run/wireguard/{name}.sock",
            daemon.pid()
        ));
        daemon.wait_for(Duration::from_secs(10), "its UAPI socket", || {
            socket.exists()
        })?;
        let pid = daemon.pid().to_string();
        let [x, y, z, _] = remote.octets();
        let allowed = format!("{}/24", Ipv4Addr::new(x, y, z, 0));
        let endpoint = SocketAddr::from((peer, WG_PORT)).to_string();
        let port = WG_PORT.to_string();
        // `wg` in its namespaces, to find the socket; the private key through stdin
        let mut wg = Command::new("nsenter");
        wg.args(["-t", &pid, "-m", "-n", "wg", "set", name])
            .args(["listen-port", &port, "private-key", "/dev/stdin"])
            .args(["peer", peer_key, "endpoint", &endpoint])
            .args(["allowed-ips", &allowed]);
        run_with_stdin(wg, Some(key)).with_context(|| format!("wg set {name}"))?;
        let mtu = self.args.inner_mtu.to_string();
        let txqueuelen = TXQUEUELEN.to_string();
        ns.ip(&["addr", "add", &format!("{inner}/24"), "dev", name])?;
        ns.ip(&[
            "link",
            "set",
            "dev",
            name,
            "mtu",
            &mtu,
            "txqueuelen",
            &txqueuelen,
            "up",
        ])?;
        ns.ip(&["route", "add", &allowed, "dev", name])?;
        Ok(daemon)
    }

    /// The runs through `tunnel`, which is up: TCP, UDP unlimited, the UDP search, UDP at the
    /// rate found.
    fn measure(&self, tunnel: Tunnel, esp: &Esp, result: &mut TunnelResult) -> anyhow::Result<()> {
        let (a_inner, b_inner) = tunnel.inner();
        wait_reachable(&self.a, b_inner)?;
        let mut server = {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", self.b.name()])
                .args(["setpriv", "--pdeathsig", "KILL", "iperf3", "-s"])
                .args(["-B", &b_inner.to_string(), "-p", &IPERF_PORT.to_string()]);
            Daemon::spawn(
                "iperf3 -s",
                command,
                self.work.0.join(format!("iperf3-server-{b_inner}.log")),
            )?
        };
        let pid = server.pid();
        server.wait_for(Duration::from_secs(10), "it to listen", || {
            listening(pid, IPERF_PORT)
        })?;

        let seconds = self.seconds.to_string();
        let omit = self.omit.to_string();
        let (tcp, cpu) = self.client((a_inner, b_inner), &["-t", &seconds, "-O", &omit], esp)?;
        let (received, sent, retransmits) = parse_tcp(&tcp)?;
        result.tcp_bits_per_sec = Some(received);
        result.tcp_sender_bits_per_sec = Some(sent);
        result.tcp_retransmits = retransmits;
        result.tcp_cpu = Some(cpu);
        esp.settle();

        let (unlimited, _) = self.udp((a_inner, b_inner), 0, self.seconds, esp, tunnel, false)?;
        esp.settle();
        let max_loss = self.args.udp_max_loss;
        // the rate to report: the highest probed rate whose loss stayed within max_loss
        let rate = if unlimited.loss_pct <= max_loss {
            None // the tunnel outruns iperf3's sender
        } else {
            let mut bad = unlimited.sender_bits_per_sec.max(1e6);
            let mut good: Option<f64> = None;
            // what got through under overload is a fair first guess
            let mut next = unlimited.receiver_bits_per_sec.max(bad / 64.0);
            for _ in 0..self.args.udp_probes {
                let target = next.round() as u64;
                let (probe, _) = self.udp(
                    (a_inner, b_inner),
                    target,
                    self.args.udp_probe_seconds.max(1),
                    esp,
                    tunnel,
                    false,
                )?;
                esp.settle();
                if probe.loss_pct <= max_loss {
                    good = Some(next);
                } else {
                    bad = next;
                }
                result.udp_probes.push(probe);
                next = match good {
                    Some(good) => (good * bad).sqrt(),
                    None => next / 2.0,
                };
                if good.is_some_and(|good| bad / good < 1.03) {
                    break;
                }
            }
            Some(good.unwrap_or(bad).round() as u64)
        };
        result.udp_unlimited = Some(unlimited);
        match rate {
            None => {
                let unlimited = result.udp_unlimited.as_ref().expect("just set");
                result.udp_bits_per_sec = Some(unlimited.receiver_bits_per_sec);
                result.udp_loss_pct = Some(unlimited.loss_pct);
                result.udp_offered_bits_per_sec = Some(unlimited.sender_bits_per_sec);
                result.udp_target_bits_per_sec = Some(0);
            }
            Some(mut rate) => {
                // A full-length run must keep the loss too; if it does not, 10% less, twice at
                // most (the runs that lost too much are listed with the probes).
                for attempt in 0..3 {
                    let (udp, cpu) =
                        self.udp((a_inner, b_inner), rate, self.seconds, esp, tunnel, true)?;
                    esp.settle();
                    if udp.loss_pct > max_loss && attempt < 2 {
                        result.udp_probes.push(udp);
                        rate = rate * 9 / 10;
                        continue;
                    }
                    result.udp_bits_per_sec = Some(udp.receiver_bits_per_sec);
                    result.udp_loss_pct = Some(udp.loss_pct);
                    result.udp_offered_bits_per_sec = Some(udp.sender_bits_per_sec);
                    result.udp_target_bits_per_sec = Some(rate);
                    result.udp_cpu = cpu;
                    break;
                }
            }
        }
        server.stop();
        Ok(())
    }

    /// One UDP run at `target` bits/s (0: unlimited); the CPU too if `with_cpu`.
    #[allow(clippy::too_many_arguments)]
    fn udp(
        &self,
        inner: (Ipv4Addr, Ipv4Addr),
        target: u64,
        seconds: u32,
        esp: &Esp,
        tunnel: Tunnel,
        with_cpu: bool,
    ) -> anyhow::Result<(UdpRun, Option<CpuUse>)> {
        let drops_before = tx_drops(&self.a, tunnel.device_a());
        let rcvbuf_before = udp_rcvbuf_errors(&self.b);
        let socket_before = socket_drops(&self.b, tunnel.outer_port());
        let target_arg = target.to_string();
        let payload = self.udp_payload.to_string();
        let seconds = seconds.to_string();
        let buffer = self.udp_buffer.to_string();
        let mut extra = vec!["-u", "-b", &target_arg, "-l", &payload, "-t", &seconds];
        if self.udp_buffer > 0 {
            extra.extend(["-w", &buffer]);
        }
        let (json, cpu) = self.client(inner, &extra, esp)?;
        let mut run = parse_udp(&json, target)?;
        run.a_device_tx_drops = tx_drops(&self.a, tunnel.device_a()).saturating_sub(drops_before);
        run.b_udp_rcvbuf_errors = udp_rcvbuf_errors(&self.b).saturating_sub(rcvbuf_before);
        run.b_tunnel_socket_drops =
            socket_drops(&self.b, tunnel.outer_port()).saturating_sub(socket_before);
        Ok((run, with_cpu.then_some(cpu)))
    }

    /// Runs `iperf3 -c` in A against B's server with `extra` arguments; its JSON, and the CPU
    /// over its lifetime.
    fn client(
        &self,
        (a_inner, b_inner): (Ipv4Addr, Ipv4Addr),
        extra: &[&str],
        esp: &Esp,
    ) -> anyhow::Result<(Value, CpuUse)> {
        let run = self.runs.get() + 1;
        self.runs.set(run);
        let out = self.work.0.join(format!("iperf3-{run}.json"));
        let err = self.work.0.join(format!("iperf3-{run}.err"));
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", self.a.name()])
            .args(["setpriv", "--pdeathsig", "KILL", "iperf3", "-c"])
            .arg(b_inner.to_string())
            .args(["-B", &a_inner.to_string(), "-p", &IPERF_PORT.to_string()])
            .args(["-J", "--connect-timeout", "5000"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(File::create(&out)?)
            .stderr(File::create(&err)?);
        let esp_before = esp.ticks();
        let machine_before = CpuSample::take().machine;
        let started = Instant::now();
        let mut child = command.spawn().context("starting iperf3 -c")?;
        // the run, its omitted seconds, connecting and the results exchange
        let limit = Duration::from_secs(u64::from(self.seconds + self.omit) + 30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!("iperf3 -c {} ran for more than {limit:?}", extra.join(" "));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let wall = started.elapsed().as_secs_f64();
        let esp_after = esp.ticks();
        let machine_after = CpuSample::take().machine;
        let text = fs::read_to_string(&out).unwrap_or_default();
        let json: Value = match serde_json::from_str(&text) {
            Ok(json) => json,
            Err(e) => bail!(
                "iperf3 -c {} ({status}): no JSON ({e}); stderr: {}",
                extra.join(" "),
                fs::read_to_string(&err).unwrap_or_default().trim()
            ),
        };
        if let Some(error) = json["error"].as_str() {
            bail!("iperf3 -c {}: {error}", extra.join(" "));
        }
        let mut cores = BTreeMap::new();
        for (name, ticks) in &esp_after {
            let used = ticks.saturating_sub(esp_before.get(name).copied().unwrap_or(0));
            cores.insert(
                name.clone(),
                round(used as f64 / TICKS_PER_SECOND / wall, 3),
            );
        }
        let (busy0, _, total0) = machine_before;
        let (busy1, _, total1) = machine_after;
        let cpu = CpuUse {
            esp_cores: round(cores.values().sum(), 3),
            esp: cores,
            machine_busy: round(
                busy1.saturating_sub(busy0) as f64 / total1.saturating_sub(total0).max(1) as f64,
                3,
            ),
            iperf3_client_pct: json["end"]["cpu_utilization_percent"]["host_total"]
                .as_f64()
                .map(|v| round(v, 1)),
            iperf3_server_pct: json["end"]["cpu_utilization_percent"]["remote_total"]
                .as_f64()
                .map(|v| round(v, 1)),
        };
        Ok((json, cpu))
    }
}

/// (receiver bits/s, sender bits/s, retransmits) of an `iperf3 -J` TCP run.
fn parse_tcp(json: &Value) -> anyhow::Result<(f64, f64, Option<u64>)> {
    let end = &json["end"];
    Ok((
        number(&end["sum_received"]["bits_per_second"])?.round(),
        number(&end["sum_sent"]["bits_per_second"])?.round(),
        end["sum_sent"]["retransmits"].as_u64(),
    ))
}

/// The figures of an `iperf3 -J -u` run at `target` (the drop counters left at 0).
fn parse_udp(json: &Value, target: u64) -> anyhow::Result<UdpRun> {
    let end = &json["end"];
    // iperf3 before 3.10 has only `sum` (the sender's bits/s, the receiver's losses)
    let received = if end["sum_received"].is_object() {
        &end["sum_received"]
    } else {
        &end["sum"]
    };
    Ok(UdpRun {
        target_bits_per_sec: target,
        sender_bits_per_sec: number(&end["sum_sent"]["bits_per_second"])
            .or_else(|_| number(&end["sum"]["bits_per_second"]))?
            .round(),
        receiver_bits_per_sec: number(&received["bits_per_second"])?.round(),
        loss_pct: round(number(&received["lost_percent"])?, 3),
        packets: received["packets"].as_u64().unwrap_or(0),
        lost_packets: received["lost_packets"].as_u64().unwrap_or(0),
        seconds: round(number(&received["seconds"]).unwrap_or(0.0), 3),
        a_device_tx_drops: 0,
        b_udp_rcvbuf_errors: 0,
        b_tunnel_socket_drops: 0,
    })
}

fn number(value: &Value) -> anyhow::Result<f64> {
    value
        .as_f64()
        .with_context(|| format!("iperf3's JSON lacks a number (found {value})"))
}

/// Waits until B's `inner` address answers through the tunnel: a connect to a closed port is
/// refused only once packets go both ways.
fn wait_reachable(a: &NetNs, inner: Ipv4Addr) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let target = SocketAddr::from((inner, CLOSED_PORT));
        let answer = a.run(move || TcpStream::connect_timeout(&target, Duration::from_secs(1)))?;
        match answer {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                bail!("{inner} does not answer through the tunnel after 20 s: {e}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `/proc/thread-self/net/<file>` as seen in `ns` (empty if unreadable).
fn proc_net(ns: &NetNs, file: &'static str) -> String {
    ns.run(move || fs::read_to_string(format!("/proc/thread-self/net/{file}")))
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// Transmit drops of `device` in `ns` (0 if unknown).
fn tx_drops(ns: &NetNs, device: &str) -> u64 {
    parse_tx_drops(&proc_net(ns, "dev"), device)
}

/// Transmit drops of `device` in a `/proc/net/dev` table.
fn parse_tx_drops(table: &str, device: &str) -> u64 {
    let prefix = format!("{device}:");
    table
        .lines()
        .find_map(|line| line.trim_start().strip_prefix(&prefix))
        // receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes
        // packets errs drop …
        .and_then(|counters| counters.split_whitespace().nth(11)?.parse().ok())
        .unwrap_or(0)
}

/// Drops of the UDP sockets bound to `port` in `ns`.
fn socket_drops(ns: &NetNs, port: u16) -> u64 {
    parse_socket_drops(&proc_net(ns, "udp"), port)
}

/// Drops (the last column) of the sockets bound to `port` in a `/proc/net/udp` table.
fn parse_socket_drops(table: &str, port: u16) -> u64 {
    let port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if !fields.get(1)?.ends_with(&port) {
                return None;
            }
            fields.last()?.parse::<u64>().ok()
        })
        .sum()
}

/// `Udp: RcvbufErrors` of `ns` (0 if unknown).
fn udp_rcvbuf_errors(ns: &NetNs) -> u64 {
    parse_rcvbuf_errors(&proc_net(ns, "snmp"))
}

/// `Udp: RcvbufErrors` of a `/proc/net/snmp` table.
fn parse_rcvbuf_errors(snmp: &str) -> u64 {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "RcvbufErrors")
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(0)
}

/// Whether process `pid` has a TCP socket listening on `port` in its namespace.
fn listening(pid: u32, port: u16) -> bool {
    fs::read_to_string(format!("/proc/{pid}/net/tcp"))
        .is_ok_and(|table| parse_listening(&table, port))
}

/// Whether a `/proc/net/tcp` table has a socket listening on `port`.
fn parse_listening(table: &str, port: u16) -> bool {
    let port = format!(":{port:04X}");
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1).is_some_and(|local| local.ends_with(&port)) && fields.get(3) == Some(&"0A")
    })
}

/// A process started here (through `ip netns exec`), stopped on drop: SIGTERM, then SIGKILL
/// after 3 s.
#[derive(Debug)]
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Daemon> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = command
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Daemon {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits until `ready`, failing if the process exits first or `limit` passes.
    fn wait_for(
        &mut self,
        limit: Duration,
        what: &str,
        mut ready: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while !ready() {
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited ({status}) before {what}; its output ends:\n{}",
                    self.name,
                    tail(&self.log, 10)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not get to {what} within {limit:?}; its output ends:\n{}",
                    self.name,
                    tail(&self.log, 10)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        // the child is not reaped until `wait`, so the pid cannot be anyone else's
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One side of the strongSwan tunnel.
struct SwanSide<'a> {
    me: Ipv4Addr,
    peer: Ipv4Addr,
    local_ts: Ipv4Addr,
    remote_ts: Ipv4Addr,
    id: &'a str,
    peer_id: &'a str,
    secret: &'a str,
    mtu: u32,
}

/// charon in a namespace, with its configuration, log and vici socket in `dir`.
struct Charon {
    daemon: Daemon,
    dir: PathBuf,
}

impl Charon {
    /// Starts charon and loads its connection (`swanctl --load-all`).
    fn start(ns: &NetNs, dir: &Path, side: &SwanSide<'_>) -> anyhow::Result<Charon> {
        fs::create_dir_all(dir.join("swanctl"))?;
        fs::create_dir_all(dir.join("run"))?;
        let d = dir.display();
        let mtu = side.mtu;
        fs::write(
            dir.join("strongswan.conf"),
            format!(
                "charon {{
  load = {SWAN_LOAD}
  filelog {{ log {{ path = {d}/charon.log
      time_format = %H:%M:%S
      default = 1 }} }}
  plugins {{
    vici {{ socket = unix://{d}/run/charon.vici }}
    kernel-libipsec {{ mtu = {mtu} }}
  }}
}}
"
            ),
        )?;
        let SwanSide {
            me,
            peer,
            local_ts,
            remote_ts,
            id,
            peer_id,
            secret,
            ..
        } = side;
        fs::write(
            dir.join("swanctl/swanctl.conf"),
            format!(
                "connections {{
  bench {{
    local_addrs = {me}
    remote_addrs = {peer}
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    local  {{ auth = psk
             id = {id} }}
    remote {{ auth = psk
             id = {peer_id} }}
    children {{ bench {{ local_ts = {local_ts}/24
                       remote_ts = {remote_ts}/24
                       esp_proposals = aes128gcm16 }} }}
  }}
}}
secrets {{ ike-1 {{ id-1 = {id}
                  id-2 = {peer_id}
                  secret = \"{secret}\" }} }}
"
            ),
        )?;
        // a private /run keeps this charon's pid file away from any other one
        let script = format!(
            "mount -t tmpfs none /run && mkdir -p /run/strongswan && \
             exec setpriv --pdeathsig KILL {CHARON}"
        );
        let mut command = with_private_run(ns, &script);
        command.env("STRONGSWAN_CONF", dir.join("strongswan.conf"));
        let mut daemon = Daemon::spawn(
            &format!("charon in {}", ns.name()),
            command,
            dir.join("charon.stdout"),
        )?;
        let vici = dir.join("run/charon.vici");
        daemon.wait_for(Duration::from_secs(10), "its vici socket", || vici.exists())?;
        let charon = Charon {
            daemon,
            dir: dir.to_owned(),
        };
        let file = dir.join("swanctl/swanctl.conf").display().to_string();
        charon
            .swanctl(&["--load-all", "--file", &file])
            .map_err(|e| e.context(format!("charon's log ends:\n{}", charon.log_tail(10))))?;
        Ok(charon)
    }

    /// `swanctl ARGS` against this charon; its output.
    fn swanctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let uri = format!("unix://{}", self.dir.join("run/charon.vici").display());
        let mut all = args.to_vec();
        all.extend_from_slice(&["--uri", &uri]);
        let (ok, out) = output("swanctl", &all);
        if !ok {
            bail!("swanctl {} failed: {}", args.join(" "), out.trim());
        }
        Ok(out)
    }

    fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.join("charon.log"), lines)
    }
}

/// An address on an interface, removed on drop.
struct Address<'a> {
    ns: &'a NetNs,
    cidr: String,
    device: &'a str,
}

impl<'a> Address<'a> {
    fn add(ns: &'a NetNs, address: Ipv4Addr, device: &'a str) -> anyhow::Result<Address<'a>> {
        let cidr = format!("{address}/32");
        ns.ip(&["addr", "add", &cidr, "dev", device])?;
        Ok(Address { ns, cidr, device })
    }
}

impl Drop for Address<'_> {
    fn drop(&mut self) {
        let _ = self.ns.ip(&["addr", "del", &self.cidr, "dev", self.device]);
    }
}

/// This run's directory for configurations, logs and iperf3 output; removed on drop. Those of
/// runs that no longer exist are removed first.
#[derive(Debug)]
struct WorkDir(PathBuf);

const WORK_PREFIX: &str = "evpc-esp-bench-";

impl WorkDir {
    fn create() -> anyhow::Result<WorkDir> {
        let base = PathBuf::from("/tmp");
        if let Ok(entries) = fs::read_dir(&base) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix(WORK_PREFIX)
                    && pid.parse::<u32>().is_ok()
                    && !Path::new(&format!("/proc/{pid}")).exists()
                {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
        let dir = base.join(format!("{WORK_PREFIX}{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(WorkDir(dir))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `wg genkey` (no input) or `wg pubkey` (of `private`).
fn wg_key(private: Option<&str>) -> anyhow::Result<String> {
    let mut command = Command::new("wg");
    match private {
        None => {
            command.arg("genkey");
            run_with_stdin(command, None)
        }
        Some(key) => {
            command.arg("pubkey");
            run_with_stdin(command, Some(key))
        }
    }
    .map(|key| key.trim().to_owned())
}

/// Runs `command` with `input` (and a newline) on its stdin; its stdout, or an error with its
/// stderr.
fn run_with_stdin(mut command: Command, input: Option<&str>) -> anyhow::Result<String> {
    let mut child = command
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {command:?}"))?;
    if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
        stdin.write_all(input.as_bytes())?;
        stdin.write_all(b"\n")?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{command:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// (success, stdout + stderr) of a command.
fn output(program: &str, args: &[&str]) -> (bool, String) {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), s)
        }
        Err(e) => (false, format!("{program}: {e}")),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").trim().to_owned()
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn loadavg() -> [f64; 3] {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut values = text.split_whitespace().map(|v| v.parse().unwrap_or(-1.0));
    [(); 3].map(|()| values.next().unwrap_or(-1.0))
}

/// What the selected tunnels need and this machine lacks, with the package to install.
fn missing_programs(tunnels: &[Tunnel]) -> Vec<String> {
    let mut needed = vec![
        ("ip", "iproute2"),
        ("iperf3", "iperf3"),
        ("setpriv", "util-linux"),
        ("unshare", "util-linux"),
        ("/dev/net/tun", "(the kernel's TUN driver)"),
    ];
    if tunnels.contains(&Tunnel::Strongswan) {
        needed.extend([
            (CHARON, "strongswan-charon"),
            ("swanctl", "strongswan-swanctl"),
            (
                "/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so",
                "libcharon-extra-plugins",
            ),
            (
                "/usr/lib/ipsec/plugins/libstrongswan-curve25519.so",
                "libstrongswan-extra-plugins",
            ),
            (
                "/usr/lib/ipsec/plugins/libstrongswan-openssl.so",
                "libstrongswan-standard-plugins",
            ),
        ]);
    }
    if tunnels.contains(&Tunnel::WireguardGo) {
        needed.extend([
            ("wireguard-go", "wireguard-go"),
            ("wg", "wireguard-tools"),
            ("nsenter", "util-linux"),
        ]);
    }
    needed
        .into_iter()
        .filter(|(program, _)| !installed(program))
        .map(|(program, package)| {
            if package.starts_with('(') {
                format!("{program} {package}")
            } else {
                format!("{program} (apt-get install {package})")
            }
        })
        .collect()
}

/// Whether `program` (a path, or a name looked up in `PATH`) exists.
fn installed(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn mbit(bits: Option<f64>) -> String {
    bits.map_or("-".into(), |b| format!("{:.1}", b / 1e6))
}

fn opt<T>(value: Option<T>, f: impl Fn(T) -> String) -> String {
    value.map_or("-".into(), f)
}

fn print_human(report: &Report) {
    println!(
        "esp-bench --traffic iperf3 {} ({} cores, {}): {} s per run (TCP after {} s omitted), \
         inner MTU {} (UDP payload {} B, socket buffers {} B), txqueuelen {}",
        report.date,
        report.cores,
        report.iperf3,
        report.seconds,
        report.tcp_omit_seconds,
        report.inner_mtu,
        report.udp_payload,
        report.udp_socket_buffer,
        report.txqueuelen
    );
    let [b1, b5, b15] = report.loadavg_before;
    let [a1, a5, a15] = report.loadavg_after;
    println!("load average before {b1:.2} {b5:.2} {b15:.2}, after {a1:.2} {a5:.2} {a15:.2}");
    println!(
        "{:<27} {:>10} {:>8} {:>6} | {:>10} {:>7} {:>9} {:>6} | {:>12} {:>7}",
        "Mbit/s (iperf3 goodput)",
        "TCP",
        "retrans",
        "cores",
        "UDP",
        "loss %",
        "offered",
        "cores",
        "UDP -b 0 rx",
        "loss %"
    );
    for r in report.implementations.values() {
        let unlimited = r.udp_unlimited.as_ref();
        println!(
            "{:<27} {:>10} {:>8} {:>6} | {:>10} {:>7} {:>9} {:>6} | {:>12} {:>7}",
            r.name,
            mbit(r.tcp_bits_per_sec),
            opt(r.tcp_retransmits, |v| v.to_string()),
            opt(r.tcp_cpu.as_ref(), |c| format!("{:.2}", c.esp_cores)),
            mbit(r.udp_bits_per_sec),
            opt(r.udp_loss_pct, |v| format!("{v:.2}")),
            mbit(r.udp_offered_bits_per_sec),
            opt(r.udp_cpu.as_ref(), |c| format!("{:.2}", c.esp_cores)),
            mbit(unlimited.map(|u| u.receiver_bits_per_sec)),
            opt(unlimited, |u| format!("{:.1}", u.loss_pct)),
        );
    }
    for r in report.implementations.values() {
        let losses = r.udp_unlimited.as_ref().map_or(String::new(), |u| {
            format!(
                "; at -b 0 ({} Mbit/s sent) A's {} dropped {} packets, B's UDP receive buffers {} \
                 (the tunnel's socket {})",
                mbit(Some(u.sender_bits_per_sec)),
                r.tunnel.device_a(),
                u.a_device_tx_drops,
                u.b_udp_rcvbuf_errors,
                u.b_tunnel_socket_drops
            )
        });
        println!(
            "  {}: {} {}{losses}{}",
            r.name,
            r.version.as_deref().unwrap_or("?"),
            r.suite.as_deref().unwrap_or("?"),
            r.error
                .as_deref()
                .map_or(String::new(), |e| format!(" — ERROR: {e}"))
        );
    }
    let x = |v: Option<f64>| opt(v, |v| format!("{v:.2}x"));
    println!(
        "evpc / strongSwan: TCP {}, UDP {};  evpc / wireguard-go: TCP {}, UDP {}",
        x(report.ratios.evpc_over_strongswan_tcp),
        x(report.ratios.evpc_over_strongswan_udp),
        x(report.ratios.evpc_over_wireguard_go_tcp),
        x(report.ratios.evpc_over_wireguard_go_udp)
    );
    let check = match report.ratios.evpc_over_strongswan_tcp {
        Some(r) if r >= report.min_tcp_ratio => "passed",
        Some(_) => "FAILED",
        None if report.implementations.contains_key("strongswan") => "FAILED (no figure)",
        None => "not run",
    };
    println!(
        "check: evpc TCP >= {} x strongSwan's: {check}",
        report.min_tcp_ratio
    );
    for failure in &report.failures {
        println!("FAILED: {failure}");
    }
}

/// `script` run by `sh` in namespace `ns` with a mount namespace of its own, so that the
/// tmpfs it mounts on /run (a daemon's control socket) is private to it.
fn with_private_run(ns: &NetNs, script: &str) -> Command {
    let mut command = Command::new("ip");
    command.args([
        "netns",
        "exec",
        ns.name(),
        "unshare",
        "-m",
        "sh",
        "-c",
        script,
    ]);
    command
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tables_parse() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0102C6C6:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0102C6C6:0009 0101C6C6:D431 06 00000000:00000000 03:00000F9E 00000000     0        0 0 3 0";
        assert!(parse_listening(tcp, IPERF_PORT));
        assert!(!parse_listening(tcp, 9));
        assert!(!listening(u32::MAX, IPERF_PORT));

        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 020012C6:1194 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 21902
  101: 00000000:1194 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 2 2 0 5
  102: 0102C6C6:1451 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0 900";
        assert_eq!(parse_socket_drops(udp, 4500), 21907);
        assert_eq!(parse_socket_drops(udp, WG_PORT), 0);

        let dev = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
 evpcA: 100 2 0 0 0 0 0 0 5000 40 0 61746 0 0 0 0
    a0: 1 1 0 7 0 0 0 0 1 1 0 0 0 0 0 0";
        assert_eq!(parse_tx_drops(dev, "evpcA"), 61746);
        assert_eq!(parse_tx_drops(dev, "a0"), 0);
        assert_eq!(parse_tx_drops(dev, "wgA"), 0);

        let snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
Udp: 10 0 35940 20 35940 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
UdpLite: 0 0 0 0 0 0";
        assert_eq!(parse_rcvbuf_errors(snmp), 35940);
        assert_eq!(parse_rcvbuf_errors(""), 0);
    }

    #[test]
    fn iperf3_json_parses() {
        // trimmed from iperf 3.12 -J output
        let tcp: Value = serde_json::from_str(
            r#"{"end": {"sum_sent": {"seconds": 3.0, "bytes": 230686720,
                "bits_per_second": 615174224.39, "retransmits": 17476, "sender": true},
              "sum_received": {"seconds": 3.0, "bytes": 230375896,
                "bits_per_second": 612512884.32, "sender": true},
              "cpu_utilization_percent": {"host_total": 0.68, "remote_total": 8.08}}}"#,
        )
        .unwrap();
        assert_eq!(
            parse_tcp(&tcp).unwrap(),
            (612_512_884.0, 615_174_224.0, Some(17476))
        );
        let udp: Value = serde_json::from_str(
            r#"{"end": {
              "sum": {"seconds": 5.59, "bits_per_second": 3791051067.02, "lost_packets": 938398,
                "packets": 1036190, "lost_percent": 90.56, "sender": true},
              "sum_sent": {"seconds": 3.0, "bits_per_second": 3791051067.02, "lost_packets": 0,
                "packets": 1036190, "lost_percent": 0, "sender": true},
              "sum_received": {"seconds": 5.593579, "bits_per_second": 189156968.73,
                "lost_packets": 938398, "packets": 1034796, "lost_percent": 90.5623486,
                "sender": false}}}"#,
        )
        .unwrap();
        let run = parse_udp(&udp, 0).unwrap();
        assert_eq!(run.sender_bits_per_sec, 3_791_051_067.0);
        assert_eq!(run.receiver_bits_per_sec, 189_156_969.0);
        assert_eq!(run.loss_pct, 90.562);
        assert_eq!((run.packets, run.lost_packets), (1_034_796, 938_398));
        assert_eq!(run.seconds, 5.594);
        let error: Value = serde_json::from_str(r#"{"end": {}, "error": "x"}"#).unwrap();
        assert!(parse_tcp(&error).is_err());
    }

    #[test]
    fn loadavg_has_three_values() {
        let load = loadavg();
        assert!(load.iter().all(|v| *v >= 0.0), "{load:?}");
    }
}
