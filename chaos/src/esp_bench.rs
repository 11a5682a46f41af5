//! `evpc-chaos esp-bench`: userspace ESP throughput through TUN across two network namespaces.
//!
//! Two userspace backends with mirrored child SAs, one in each namespace, joined by a veth
//! pair; a load generator sends UDP into one TUN device and a receiver counts what comes out of
//! the other:
//!
//! ```text
//!  ns A                                                       ns B
//!  sender ─► 198.19.2.1:9000                                  receiver 198.19.2.1:9000
//!  (sendmmsg)  │ route 198.19.2.0/24 dev evpcA                   ▲ (recvmmsg)
//!              ▼                                                 │
//!  TUN evpcA ─► A out: seal ─► UDP 198.18.0.1:4500 ═ veth ═► 198.18.0.2:4500 ─► B in: open ─► TUN evpcB
//! ```
//!
//! Order: namespaces and veth → both drivers (TUN devices, sockets) → children started with a
//! lease of `--lease` sequence numbers, which a keeper thread extends at half use like the
//! node's lease manager → for each `--size`: sender and receiver threads, `--warmup` seconds,
//! then `--seconds` measured (receiver counts, per-thread CPU from `/proc/self/task`, the
//! machine's CPU from `/proc/stat`) → the sender stops, in-flight packets drain, drops are
//! counted → JSON.
//!
//! The sender is closed-loop: it keeps at most `--window` packets between itself and the
//! receiver (forgiving packets that stay missing for 2 ms), so the figure is what the path
//! sustains, not how fast a queue overflows. `--size` is the inner IP packet size (IPv4 + UDP
//! headers included); Gbit/s counts those inner bytes.
//!
//! `--traffic iperf3` ([`iperf`]) compares instead: iperf3 TCP and UDP through the evpc tunnel,
//! then through strongSwan's kernel-libipsec and through wireguard-go, in the same two
//! namespaces over the same veth, one tunnel at a time.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use evpc_dataplane::netns::{NetNs, is_root, veth_pair};
use evpc_dataplane::selector::prefix_selector;
use evpc_dataplane::userspace::udp::{self, BATCH, Buffers, Outgoing, Receiver};
use evpc_dataplane::userspace::{ENCR_AES_GCM_16, TunConfig, UserspaceConfig, UserspaceDriver};
use evpc_dataplane::{ChildKeymat, ChildStart, FenceGate, SaDriver};
use evpc_raft_store::{ChildSuite, Epoch, SaId};
use rand::RngCore;
use serde::Serialize;

mod iperf;

const A_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const B_OUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const A_INNER: Ipv4Addr = Ipv4Addr::new(198, 19, 1, 1);
const B_INNER: Ipv4Addr = Ipv4Addr::new(198, 19, 2, 1);
const SINK_PORT: u16 = 9000;
/// SPI of A → B packets (B's inbound).
const SPI_A_TO_B: u32 = 0x0000_2001;
/// SPI of B → A packets (A's inbound).
const SPI_B_TO_A: u32 = 0x0000_1001;
/// Inner MTU of both TUN devices: 1500 on the veth minus ESP-in-UDP over IPv4 (at most 65).
const TUN_MTU: u32 = 1432;
/// IPv4 + UDP headers of the generated packets.
const HEADERS: usize = 28;
/// Linux USER_HZ: the unit of /proc CPU times.
const TICKS_PER_SECOND: f64 = 100.0;

/// What `esp-bench` sends through the tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Traffic {
    /// The closed-loop UDP generator of this process, through evpc only.
    Generator,
    /// iperf3 TCP and UDP through evpc, strongSwan kernel-libipsec and wireguard-go.
    Iperf3,
}

/// A tunnel `--traffic iperf3` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
enum Tunnel {
    /// evpc's userspace data plane (the setup of the generator mode).
    Evpc,
    /// Two charon instances with the kernel-libipsec plugin (ESP in userspace through TUN).
    Strongswan,
    /// Two wireguard-go instances.
    WireguardGo,
}

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `generator`: the closed-loop UDP generator through evpc. `iperf3`: iperf3 TCP and UDP
    /// through evpc, strongSwan kernel-libipsec and wireguard-go, side by side.
    #[arg(long, value_enum, default_value_t = Traffic::Generator)]
    traffic: Traffic,
    /// Inner IP packet sizes in bytes (IPv4 + UDP headers included), comma-separated; each is
    /// measured in turn. Between 29 and 1432.
    #[arg(long, value_delimiter = ',', default_value = "1400,64")]
    size: Vec<usize>,
    /// Measured seconds per size (iperf3: per run, rounded up to whole seconds).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of traffic before measuring (iperf3: omitted seconds of each TCP run, rounded
    /// up).
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Packets the sender keeps in flight.
    #[arg(long, default_value_t = 2048)]
    window: u64,
    /// AES-GCM key size: 128 or 256.
    #[arg(long, default_value_t = 128)]
    key_bits: u16,
    /// Use 32-bit sequence numbers (no ESN).
    #[arg(long)]
    no_esn: bool,
    /// Sequence numbers per lease; the keeper extends at half use.
    #[arg(long, default_value_t = 1 << 20)]
    lease: u64,
    /// Fail (exit status 2) if the largest size moves fewer Gbit/s than this.
    #[arg(long, default_value_t = 0.0)]
    min_gbit: f64,
    /// iperf3: the tunnels to measure, in this order, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "evpc,strongswan,wireguard-go"
    )]
    tunnels: Vec<Tunnel>,
    /// iperf3: the inner MTU of every tunnel's device (1400 is strongSwan kernel-libipsec's
    /// default); UDP datagrams fill it.
    #[arg(long, default_value_t = 1400)]
    inner_mtu: u32,
    /// iperf3: fail (exit status 2) unless evpc's TCP throughput is at least this many times
    /// strongSwan's.
    #[arg(long, default_value_t = 4.0)]
    min_tcp_ratio: f64,
    /// iperf3: the UDP figure is taken at the highest offered rate whose loss stays at or below
    /// this many percent.
    #[arg(long, default_value_t = 1.0)]
    udp_max_loss: f64,
    /// iperf3: probes of the search for that rate.
    #[arg(long, default_value_t = 6)]
    udp_probes: u32,
    /// iperf3: seconds of each probe.
    #[arg(long, default_value_t = 2)]
    udp_probe_seconds: u32,
    /// iperf3: socket buffers of the UDP runs in bytes (`-w`; 0: iperf3's default). Default:
    /// 4 MiB or `net.core.rmem_max`/`wmem_max` if lower, so that iperf3's own receive buffer
    /// is not what loses packets.
    #[arg(long)]
    udp_buffer: Option<u64>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The whole run.
#[derive(Debug, Serialize)]
struct Report {
    command: &'static str,
    date: String,
    suite: String,
    window: u64,
    lease: u64,
    cores: usize,
    results: Vec<SizeResult>,
    checks_passed: bool,
    failures: Vec<String>,
}

/// One packet size.
#[derive(Debug, Serialize)]
struct SizeResult {
    size: usize,
    seconds: f64,
    packets: u64,
    packets_per_sec: f64,
    /// Inner bytes × 8 per second.
    gbit_per_sec: f64,
    /// UDP payload bytes on the veth (ESP-in-UDP) × 8 per second.
    outer_gbit_per_sec: f64,
    sent: u64,
    received: u64,
    dropped: u64,
    lease_waits: u64,
    lease_extends: u64,
    replay_drops: u64,
    auth_failures: u64,
    cpu: CpuReport,
}

/// Where the CPU went during the measured interval, in cores (1.0 = one core busy).
#[derive(Debug, Serialize)]
struct CpuReport {
    /// Busy share of the whole machine (all cores), 0..1.
    machine_busy: f64,
    /// Share of the machine spent in softirq (the veth and TUN receive paths, when not
    /// charged to a thread).
    machine_softirq: f64,
    /// This process's threads, by name, in cores.
    threads: BTreeMap<String, f64>,
}

/// Runs the benchmark; `Ok(false)` if a check failed.
pub async fn run(args: Args) -> anyhow::Result<bool> {
    if args.traffic == Traffic::Iperf3 {
        return iperf::run(args).await;
    }
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
            "esp-bench needs root: it creates network namespaces, a veth pair and TUN devices \
             (run it as root, e.g. with sudo)"
        );
    }
    for &size in &args.size {
        if !(HEADERS + 1..=TUN_MTU as usize).contains(&size) {
            bail!("--size {size} is outside {}..={TUN_MTU}", HEADERS + 1);
        }
    }
    if args.key_bits != 128 && args.key_bits != 256 {
        bail!("--key-bits must be 128 or 256");
    }
    let esn = !args.no_esn;
    let suite = ChildSuite {
        encryption: ENCR_AES_GCM_16,
        key_bits: args.key_bits,
        esn,
    };

    let a = NetNs::create("bench-a")?;
    let b = NetNs::create("bench-b")?;
    veth_pair(
        &a,
        "a0",
        (IpAddr::V4(A_OUTER), 24),
        &b,
        "b0",
        (IpAddr::V4(B_OUTER), 24),
    )?;
    let mut tunnel = EvpcTunnel::start(&a, &b, suite, args.lease, (A_INNER, B_INNER), TUN_MTU)?;
    let (driver_a, driver_b, extends) = (&tunnel.a, &tunnel.b, &tunnel.extends);

    let mut results = Vec::new();
    let mut failures = Vec::new();
    for &size in &args.size {
        let before_a = driver_a.counters(SPI_B_TO_A).context("child A")?;
        let before_b = driver_b.counters(SPI_A_TO_B).context("child B")?;
        let extends_before = extends.load(Ordering::Relaxed);
        let mut result = measure(args, &a, &b, size)?;
        let after_a = driver_a.counters(SPI_B_TO_A).context("child A")?;
        let after_b = driver_b.counters(SPI_A_TO_B).context("child B")?;
        result.lease_waits = after_a.lease_waits - before_a.lease_waits;
        result.lease_extends = extends.load(Ordering::Relaxed) - extends_before;
        result.replay_drops = after_b.replay_drops - before_b.replay_drops;
        result.auth_failures = after_b.auth_failures - before_b.auth_failures;
        if result.received == 0 {
            failures.push(format!("{size} B: nothing arrived"));
        }
        if result.auth_failures > 0 {
            failures.push(format!(
                "{size} B: {} packets failed authentication",
                result.auth_failures
            ));
        }
        if result.lease_waits > 0 {
            failures.push(format!(
                "{size} B: {} packets waited for a lease the keeper should have granted",
                result.lease_waits
            ));
        }
        results.push(result);
    }
    tunnel.stop();
    if let Some(largest) = results.iter().max_by_key(|r| r.size)
        && largest.gbit_per_sec < args.min_gbit
    {
        failures.push(format!(
            "{} B: {:.3} Gbit/s is below --min-gbit {}",
            largest.size, largest.gbit_per_sec, args.min_gbit
        ));
    }
    Ok(Report {
        command: "esp-bench",
        date: utc_now(),
        suite: suite.to_string(),
        window: args.window,
        lease: args.lease,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        results,
        checks_passed: failures.is_empty(),
        failures,
    })
}

/// The evpc tunnel of both modes: a userspace driver in each namespace (TUN `evpcA`, `evpcB`)
/// with mirrored children, and a keeper thread extending their leases. Stopped on drop.
struct EvpcTunnel {
    a: Arc<UserspaceDriver>,
    b: Arc<UserspaceDriver>,
    /// Lease extensions so far.
    extends: Arc<AtomicU64>,
    stop_keeper: Arc<AtomicBool>,
    keeper: Option<JoinHandle<()>>,
}

impl EvpcTunnel {
    /// Drivers in `a` and `b` (outer addresses [`A_OUTER`], [`B_OUTER`]; `inner` on their TUN
    /// devices, of `mtu`), children of `suite` with leases of `lease` sequence numbers.
    fn start(
        a: &NetNs,
        b: &NetNs,
        suite: ChildSuite,
        lease: u64,
        inner: (Ipv4Addr, Ipv4Addr),
        mtu: u32,
    ) -> anyhow::Result<EvpcTunnel> {
        let (a_inner, b_inner) = inner;
        let gate = Arc::new(FenceGate::always_open());
        let driver_a = make_driver(a, "evpcA", A_OUTER, a_inner, b_inner, mtu, &gate)?;
        let driver_b = make_driver(b, "evpcB", B_OUTER, b_inner, a_inner, mtu, &gate)?;

        // mirrored children: A's outbound keys are B's inbound keys and the other way round
        let keymat_len = usize::from(suite.key_bits / 8) + 4;
        let mut a_to_b = vec![0u8; keymat_len];
        let mut b_to_a = vec![0u8; keymat_len];
        rand::rng().fill_bytes(&mut a_to_b);
        rand::rng().fill_bytes(&mut b_to_a);
        let child = |in_spi, out_spi, inbound: &[u8], outbound: &[u8], local, remote, me, peer| {
            ChildStart {
                ike: SaId(0xbe7c),
                epoch: Epoch::FIRST,
                in_spi,
                out_spi,
                suite,
                keys: Some(ChildKeymat::new(inbound.to_vec(), outbound.to_vec())),
                ts_local: vec![prefix_selector(IpAddr::V4(local), 24)],
                ts_remote: vec![prefix_selector(IpAddr::V4(remote), 24)],
                local: SocketAddr::from((me, 4500)),
                peer: SocketAddr::from((peer, 4500)),
                udp_encap: true,
                next_seq: 1,
                limit: lease,
                replay_floor: 0,
            }
        };
        driver_a.start(child(
            SPI_B_TO_A, SPI_A_TO_B, &b_to_a, &a_to_b, a_inner, b_inner, A_OUTER, B_OUTER,
        ))?;
        driver_b.start(child(
            SPI_A_TO_B, SPI_B_TO_A, &a_to_b, &b_to_a, b_inner, a_inner, B_OUTER, A_OUTER,
        ))?;

        let stop_keeper = Arc::new(AtomicBool::new(false));
        let extends = Arc::new(AtomicU64::new(0));
        let keeper = {
            let drivers = [
                (Arc::clone(&driver_a), SPI_B_TO_A),
                (Arc::clone(&driver_b), SPI_A_TO_B),
            ];
            let stop = Arc::clone(&stop_keeper);
            let extends = Arc::clone(&extends);
            std::thread::Builder::new()
                .name("lease-keeper".into())
                .spawn(move || keep_leases(&drivers, lease, &stop, &extends))?
        };
        Ok(EvpcTunnel {
            a: driver_a,
            b: driver_b,
            extends,
            stop_keeper,
            keeper: Some(keeper),
        })
    }

    /// Stops the keeper and both drivers' workers (idempotent). The TUN devices and sockets go
    /// when the tunnel is dropped.
    fn stop(&mut self) {
        self.stop_keeper.store(true, Ordering::Relaxed);
        if let Some(keeper) = self.keeper.take() {
            let _ = keeper.join();
        }
        self.a.shutdown();
        self.b.shutdown();
    }
}

impl Drop for EvpcTunnel {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A userspace driver in `ns`: TUN `tun` of `mtu` with `inner`/24, a route to `remote`/24.
fn make_driver(
    ns: &NetNs,
    tun: &str,
    outer: Ipv4Addr,
    inner: Ipv4Addr,
    remote: Ipv4Addr,
    mtu: u32,
    gate: &Arc<FenceGate>,
) -> anyhow::Result<Arc<UserspaceDriver>> {
    let config = UserspaceConfig {
        ike_port: None,
        socket_buffer: 8 << 20,
        ..UserspaceConfig::new(
            IpAddr::V4(outer),
            TunConfig {
                mtu,
                addresses: vec![(IpAddr::V4(inner), 24)],
                routes: vec![(IpAddr::V4(remote), 24)],
                ..TunConfig::named(tun)
            },
        )
    };
    let gate = Arc::clone(gate);
    let (driver, _ike) = ns
        .run(move || UserspaceDriver::new(config, gate))?
        .with_context(|| format!("userspace driver {tun}"))?;
    // room for the closed-loop window in the device's queue
    ns.ip(&["link", "set", "dev", tun, "txqueuelen", "4096"])?;
    Ok(Arc::new(driver))
}

/// Extends each child's lease by `lease` whenever less than half of it is left, as the node's
/// lease manager does.
fn keep_leases(
    drivers: &[(Arc<UserspaceDriver>, u32)],
    lease: u64,
    stop: &AtomicBool,
    extends: &AtomicU64,
) {
    let mut limits: Vec<u64> = drivers.iter().map(|_| lease).collect();
    while !stop.load(Ordering::Relaxed) {
        for ((driver, spi), limit) in drivers.iter().zip(&mut limits) {
            if let Some(counters) = driver.counters(*spi)
                && counters.highest_out + lease / 2 >= *limit
            {
                *limit += lease;
                driver.extend(*spi, *limit);
                extends.fetch_add(1, Ordering::Relaxed);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Counters shared by the sender and the receiver of one size.
#[derive(Debug, Default)]
struct Flow {
    /// Datagrams sent; each carries its number (from 1) in its first 8 bytes.
    sent: AtomicU64,
    /// Tells the receiver to stop (after the sender, once what is in flight has arrived).
    stop_receiver: AtomicBool,
    /// Datagrams received.
    received: AtomicU64,
    /// Highest datagram number received: the path keeps order, so everything below it has
    /// arrived or is lost, and only what is above it is in flight.
    highest: AtomicU64,
    stop: AtomicBool,
}

fn measure(args: &Args, a: &NetNs, b: &NetNs, size: usize) -> anyhow::Result<SizeResult> {
    let flow = Arc::new(Flow::default());
    let sink = SocketAddr::from((B_INNER, SINK_PORT));
    let receiver_socket = b.run(move || udp::bind_udp(sink, 16 << 20, false))??;
    // The sink polls: a real gateway hands the inner traffic to a NIC, not to a thread that
    // the kernel wakes (and that preempts the data plane) for every few packets.
    receiver_socket.set_nonblocking(true)?;
    let receiver = {
        let flow = Arc::clone(&flow);
        b.spawn("bench-recv", move || {
            let mut batch = Receiver::new();
            let mut buffers = Buffers::new(2048);
            while !flow.stop_receiver.load(Ordering::Relaxed) {
                let n = match batch.recv(&receiver_socket, &mut buffers) {
                    Ok(0) | Err(_) => {
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    Ok(n) => n,
                };
                let mut highest = 0;
                for index in 0..n {
                    if let Some(number) = buffers.get(index).get(..8) {
                        highest =
                            highest.max(u64::from_be_bytes(number.try_into().unwrap_or_default()));
                    }
                }
                flow.received.fetch_add(n as u64, Ordering::Relaxed);
                flow.highest.fetch_max(highest, Ordering::Relaxed);
            }
        })?
    };
    let sender_socket =
        a.run(move || udp::bind_udp(SocketAddr::from((A_INNER, 0)), 4 << 20, false))??;
    let sender = {
        let flow = Arc::clone(&flow);
        let window = args.window.max(BATCH as u64);
        a.spawn("bench-send", move || {
            send_loop(&sender_socket, sink, size - HEADERS, window, &flow)
        })?
    };

    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    let cpu_before = CpuSample::take();
    let received_before = flow.received.load(Ordering::Relaxed);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(args.seconds));
    let received_after = flow.received.load(Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_after = CpuSample::take();

    flow.stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    // what is still in flight arrives or is lost within a few milliseconds
    std::thread::sleep(Duration::from_millis(300));
    flow.stop_receiver.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    let received_total = flow.received.load(Ordering::Relaxed);
    let sent = flow.sent.load(Ordering::Relaxed);

    let packets = received_after - received_before;
    let pps = packets as f64 / elapsed;
    let outer = evpc_esp::sealed_len(size).unwrap_or(size) as f64;
    Ok(SizeResult {
        size,
        seconds: round(elapsed, 3),
        packets,
        packets_per_sec: pps.round(),
        gbit_per_sec: round(pps * size as f64 * 8.0 / 1e9, 3),
        outer_gbit_per_sec: round(pps * outer * 8.0 / 1e9, 3),
        sent,
        received: received_total,
        dropped: sent.saturating_sub(received_total),
        lease_waits: 0,
        lease_extends: 0,
        replay_drops: 0,
        auth_failures: 0,
        cpu: CpuSample::report(&cpu_before, &cpu_after),
    })
}

/// Sends `payload`-byte datagrams to `sink` in batches, keeping at most `window` in flight.
fn send_loop(
    socket: &std::net::UdpSocket,
    sink: SocketAddr,
    payload: usize,
    window: u64,
    flow: &Flow,
) {
    let mut buffers = Buffers::new(payload);
    for index in 0..BATCH {
        buffers.get_mut(index).fill(index as u8);
    }
    let batch: Vec<Outgoing> = (0..BATCH)
        .map(|i| Outgoing::new(i, payload, sink))
        .collect();
    // After a tail loss nothing above `highest` ever arrives: give up on what is in flight
    // once the receiver has made no progress for a while.
    let mut given_up_to = 0u64;
    let mut stalled: Option<(Instant, u64)> = None;
    let mut next = 1u64;
    while !flow.stop.load(Ordering::Relaxed) {
        let highest = flow.highest.load(Ordering::Relaxed).max(given_up_to);
        if (next - 1).saturating_sub(highest) + BATCH as u64 > window {
            match stalled {
                Some((since, at))
                    if at == highest && since.elapsed() > Duration::from_millis(50) =>
                {
                    given_up_to = next - 1;
                    stalled = None;
                }
                Some((_, at)) if at == highest => {}
                _ => stalled = Some((Instant::now(), highest)),
            }
            std::thread::sleep(Duration::from_micros(20));
            continue;
        }
        stalled = None;
        for index in 0..BATCH {
            let number = next + index as u64;
            if payload >= 8 {
                buffers.get_mut(index)[..8].copy_from_slice(&number.to_be_bytes());
            }
        }
        let (ok, failed) = udp::send_batch(socket, &buffers, &batch);
        next += (ok + failed) as u64;
        flow.sent.fetch_add(ok as u64, Ordering::Relaxed);
    }
}

/// CPU time counters at one instant.
#[derive(Debug)]
struct CpuSample {
    /// tid → (name, utime + stime ticks)
    threads: BTreeMap<u32, (String, u64)>,
    /// /proc/stat "cpu" line: (busy ticks, softirq ticks, total ticks)
    machine: (u64, u64, u64),
}

impl CpuSample {
    fn take() -> CpuSample {
        let mut threads = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir("/proc/self/task") {
            for entry in entries.flatten() {
                let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                if let Some(sample) = std::fs::read_to_string(entry.path().join("stat"))
                    .ok()
                    .and_then(|stat| parse_task_stat(&stat))
                {
                    threads.insert(tid, sample);
                }
            }
        }
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| parse_proc_stat(&stat))
            .unwrap_or_default();
        CpuSample { threads, machine }
    }

    fn report(before: &CpuSample, after: &CpuSample) -> CpuReport {
        let (busy0, soft0, total0) = before.machine;
        let (busy1, soft1, total1) = after.machine;
        let total = (total1.saturating_sub(total0)).max(1) as f64;
        let mut threads: BTreeMap<String, f64> = BTreeMap::new();
        for (tid, (name, ticks)) in &after.threads {
            let start = before.threads.get(tid).map_or(0, |(_, t)| *t);
            let used = ticks.saturating_sub(start) as f64 / TICKS_PER_SECOND;
            if used > 0.0 {
                *threads.entry(name.clone()).or_default() += used;
            }
        }
        // cores = CPU seconds / wall seconds; the wall time is the machine's total ticks / cores
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let wall = total / TICKS_PER_SECOND / cores;
        CpuReport {
            machine_busy: round((busy1.saturating_sub(busy0)) as f64 / total, 3),
            machine_softirq: round((soft1.saturating_sub(soft0)) as f64 / total, 3),
            threads: threads
                .into_iter()
                .map(|(name, used)| (name, round(used / wall, 3)))
                .filter(|(_, cores)| *cores >= 0.005)
                .collect(),
        }
    }
}

/// (name, utime + stime) from `/proc/<pid>/task/<tid>/stat`.
fn parse_task_stat(stat: &str) -> Option<(String, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat[open + 1..close].to_owned();
    // after the name: state (field 3) ... utime is field 14, stime field 15
    let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

/// (busy, softirq, total) ticks from the `cpu` line of `/proc/stat`.
fn parse_proc_stat(stat: &str) -> Option<(u64, u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let total: u64 = values.iter().take(8).sum();
    let idle = values.get(3)? + values.get(4).copied().unwrap_or(0);
    Some((total - idle, *values.get(6)?, total))
}

fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // civil-from-days (H. Hinnant)
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

fn print_human(report: &Report) {
    println!(
        "esp-bench {} ({}), window {} packets, {} cores",
        report.date, report.suite, report.window, report.cores
    );
    for r in &report.results {
        println!(
            "{:>5} B: {:>9.0} packets/s  {:>6.3} Gbit/s inner ({:.3} outer)  sent {} received {} dropped {}  \
             lease waits {} (extends {})  replay drops {}  auth failures {}",
            r.size,
            r.packets_per_sec,
            r.gbit_per_sec,
            r.outer_gbit_per_sec,
            r.sent,
            r.received,
            r.dropped,
            r.lease_waits,
            r.lease_extends,
            r.replay_drops,
            r.auth_failures
        );
        let threads: Vec<String> = r
            .cpu
            .threads
            .iter()
            .map(|(n, c)| format!("{n} {c:.2}"))
            .collect();
        println!(
            "        CPU: machine {:.0}% busy ({:.0}% softirq); threads (cores): {}",
            r.cpu.machine_busy * 100.0,
            r.cpu.machine_softirq * 100.0,
            threads.join(", ")
        );
    }
    for failure in &report.failures {
        println!("FAILED: {failure}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_lines_parse() {
        let task = "1234 (evpcA-out) R 1 2 3 4 5 6 7 8 9 10 250 75 0 0 20 0 1 0 100 0 0";
        assert_eq!(parse_task_stat(task), Some(("evpcA-out".into(), 325)));
        let stat = "cpu  100 0 50 800 10 0 40 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat(stat), Some((190, 40, 1000)));
    }

    #[test]
    fn dates_are_civil() {
        let date = utc_now();
        assert_eq!(date.len(), 20, "{date}");
        assert!(date.starts_with("20"), "{date}");
    }
}
