//! `evpc-chaos ike-bench`: IKE SA setups per second against a real evpc cluster, and the latency
//! commit-before-respond adds to an exchange (needs root).
//!
//! Setup: the ClusterIP lab of `evpc_testkit::lab` — node processes each in a network
//! namespace on one bridge, every node receiving every packet for the cluster address, only the
//! owner answering — and, in the client namespace, one thread running many initiators of the
//! `evpc-ike` crate over two UDP sockets (ports 500 and 4500; NAT-T forced, as a road warrior
//! behind a NAT would), each SA asking for an inner address from the replicated pool.
//!
//! ```text
//!  client ns: initiators (one thread, one tokio runtime)        node ns ×N: evpc-node
//!    IkeSa::connect ×concurrency ─► UDP 500/4500 ══ bridge ══► IKE gateway ─► Raft commit
//!    (keeps `--concurrency` setups in flight)      (flooded)     (slot owner answers)
//! ```
//!
//! Phases, in one run:
//! 1. `--nodes` nodes (3): `--sas` setups (IKE_SA_INIT + IKE_AUTH with an inner address and a
//!    child SA, i.e. one `CreateSa` commit each) with `--concurrency` in flight → setups/s,
//!    setup latency, CPU per process. Then `--dpd-samples` DPDs (empty INFORMATIONAL from the
//!    client, answered by the owner after committing the message-ID advance and the exact
//!    response) one at a time over `--dpd-sas` SAs → round-trip percentiles.
//! 2. The same against a 1-node cluster (commits are local: no replication round trip).
//!
//!    On the main cluster, with all those SAs established: the same DPDs while an
//!    IKE_SA_INIT flood hits the cluster address from another namespace (`ike_flood`): first
//!    `--flood-rate` a second from spoofed sources, then from cookie-answering ones
//!    (`--flood-answering-rate`) → DPD percentiles under flood beside the idle ones.
//!    Then, still on the main cluster with those SAs in the state, snapshots: every node
//!    builds one at once (admin.v1 `Snapshot`) while DPDs go on; a follower is SIGKILLed while
//!    `--lag-setups` more SAs are set up and the leader snapshots, compacting its log past it,
//!    then started again: the time it takes to install the leader's snapshot and catch up;
//!    and the other follower is SIGKILLed and started again: the time until it is ready to
//!    serve (the commit index of the kill applied, unfenced).
//! 3. The same DPDs against the bare engine in a namespace on the same bridge, answering
//!    without committing anything: the baseline. "Added by commit" is each cluster's
//!    percentiles minus the baseline's.
//!
//! Setups/s are also reported per window of established SAs (0–5,000, 5,000–10,000, …):
//! the rate must not fall as the state fills (`--min-rate-ratio` of the first window's).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use evpc_dataplane::netns::{NetNs, is_root};
use evpc_ike::wire::{self, Header, Route};
use evpc_ike::{
    Accepted, Config, ConnectOptions, Datagram, Endpoint, Event, IkeSa, InnerAddress, Outcome,
    Secret, TrafficSelector,
};
use evpc_node::ike_gateway::{IkeSettings, PskSecret, PskSetting};
use evpc_testkit::lab::{CLIENT, CLUSTER, Lab, LabSpec};
use rand::RngCore;
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::ike_flood::{self, FloodKind, FloodStats};
use crate::stats::Percentiles;

const GW_ID: &str = "gw.example";
const CLIENT_ID: &str = "bench.example";
const PSK: &str = "ike-bench-pre-shared-key";
/// The bare engine's address on the segment.
const BASELINE: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 50);
const USER_HZ: f64 = 100.0;
/// The inner-address pool.
const POOL: &str = "10.64.0.0/12";

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Gateway nodes of the main cluster.
    #[arg(long, default_value_t = 3)]
    nodes: u64,
    /// IKE SAs to set up per cluster.
    #[arg(long, default_value_t = 5_000)]
    sas: u64,
    /// Setups in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// DPD round trips measured per configuration.
    #[arg(long, default_value_t = 1_000)]
    dpd_samples: usize,
    /// SAs the DPDs go round over.
    #[arg(long, default_value_t = 16)]
    dpd_sas: usize,
    /// `RUST_LOG` of the node processes.
    #[arg(long, default_value = "warn")]
    node_log: String,
    /// Exit with status 2 if the main cluster sets up fewer SAs per second than this.
    #[arg(long, default_value_t = 0.0)]
    min_setups_per_sec: f64,
    /// Exit with status 2 if commit-before-respond adds more than this to the DPD p99 (ms) on
    /// the main cluster.
    #[arg(long)]
    max_added_p99_ms: Option<f64>,
    /// Keep each lab's directory (node configs, data, logs) for inspection.
    #[arg(long)]
    keep_logs: bool,
    /// Where the nodes' data directories go (default: the system's temporary directory); its
    /// file system decides what a durable Raft append costs (e.g. /dev/shm to leave out the
    /// disk).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Run the nodes without TLS (insecure_plaintext), to see what TLS costs.
    #[arg(long)]
    insecure_plaintext: bool,
    /// IKE_SA_INITs per second of the spoofed-source flood on the main cluster (0: no flood
    /// phase).
    #[arg(long, default_value_t = 2_000)]
    flood_rate: u64,
    /// IKE_SA_INITs per second of the cookie-answering flood (0: none).
    #[arg(long, default_value_t = 300)]
    flood_answering_rate: u64,
    /// Fail if a flood raises the DPD p99 above this multiple of the same lab's idle p99.
    #[arg(long, default_value_t = 2.0)]
    max_flood_dpd_ratio: f64,
    /// Fail if the main cluster's setups/s over the whole run falls below this fraction of
    /// its rate over the first 5,000 SAs.
    #[arg(long, default_value_t = 0.7)]
    min_rate_ratio: f64,
    /// Skip the snapshot phase (every node snapshots under DPDs, a paused follower installs the
    /// leader's snapshot, a node restarts).
    #[arg(long)]
    no_snapshots: bool,
    /// Fail if the lagging follower takes longer than this (ms) to install the leader's
    /// snapshot (receive it whole, decode, check, swap in, write).
    #[arg(long, default_value_t = 2_000)]
    max_install_ms: u64,
    /// Fail if the restarted node takes longer than this (ms) to be ready.
    #[arg(long, default_value_t = 5_000)]
    max_restart_ms: u64,
    /// SAs set up while a follower is down in the snapshot phase (more than the leader keeps
    /// behind a snapshot, so it must send one).
    #[arg(long, default_value_t = 8_000)]
    lag_setups: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The whole run.
#[derive(Debug, Serialize)]
struct Report {
    command: &'static str,
    date: String,
    cores: usize,
    topology: String,
    /// Whether cluster.v1 and admin.v1 ran mutual TLS (not `--insecure-plaintext`).
    tls: bool,
    clusters: Vec<ClusterResult>,
    baseline_dpd_rtt_ms: Percentiles,
    /// Cluster DPD round-trip percentile minus the bare engine's, per cluster size.
    added_by_commit_ms: BTreeMap<String, Added>,
    checks_passed: bool,
    failures: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Added {
    p50: f64,
    p99: f64,
    /// The same with `--sas` more SAs in the replicated state.
    p50_after_setups: f64,
    p99_after_setups: f64,
}

#[derive(Debug, Serialize)]
struct ClusterResult {
    nodes: u64,
    setup: SetupResult,
    /// DPD round trips with only the `--dpd-sas` SAs in the cluster.
    dpd_rtt_ms: Percentiles,
    /// The same after the setups, with `--sas` more SAs in the replicated state.
    dpd_rtt_ms_after_setups: Percentiles,
    dpd_failed: usize,
    /// DPDs while an IKE_SA_INIT flood hits the cluster (main cluster only).
    flood: Vec<FloodResult>,
    /// Snapshot build, install and restart with the SAs in the state (main cluster only).
    snapshots: Option<SnapshotPhase>,
    /// From the first setup until the snapshot phase's kills, as the nodes logged them: times
    /// the leader declared a node down and took its SAs over, and times a node fenced itself.
    /// A busy but healthy cluster must do neither.
    takeovers_logged: usize,
    fences_logged: usize,
    /// SAs in the replicated state at the end, by owner.
    sas_by_owner: BTreeMap<u64, u64>,
}

/// What a snapshot cost a node (admin.v1 `SnapshotInfo`).
#[derive(Debug, Default, Serialize)]
struct SnapshotFigures {
    index: u64,
    ike_sas: u64,
    bytes: u64,
    /// End to end: built, installed or loaded.
    ms: u64,
    /// The state's lock held for it (the copy, the swap): what commits waited.
    lock_ms: u64,
}

impl From<evpc_proto::admin::v1::SnapshotInfo> for SnapshotFigures {
    fn from(s: evpc_proto::admin::v1::SnapshotInfo) -> Self {
        SnapshotFigures {
            index: s.index,
            ike_sas: s.ike_sas,
            bytes: s.bytes,
            ms: s.ms,
            lock_ms: s.lock_ms,
        }
    }
}

/// Snapshots and restarts with every SA of the setups in the state (main cluster).
#[derive(Debug, Default, Serialize)]
struct SnapshotPhase {
    /// Every node builds a snapshot at once (admin.v1 Snapshot), by node.
    built: BTreeMap<String, SnapshotFigures>,
    /// DPDs (each a commit) while those snapshots were built, and how many went unanswered.
    dpd_during_build_ms: Percentiles,
    dpd_failed_during_build: usize,
    lagging_follower: Option<LaggingFollower>,
    restart: Option<Restart>,
}

/// A follower down (SIGKILLed) while more SAs were set up and the leader snapshotted and
/// compacted its log past it; then started again: the leader sends it the snapshot.
#[derive(Debug, Default, Serialize)]
struct LaggingFollower {
    node: u64,
    /// SAs set up while it was down.
    setups_while_down: u64,
    /// The leader's snapshot after them, and the log index it compacted up to.
    leader_snapshot: SnapshotFigures,
    leader_purged_index: u64,
    /// What the follower reported installing (none: it caught up from the log after all).
    installed: Option<SnapshotFigures>,
    /// From its restart until it had applied the leader's commit index of that moment (its
    /// own start, the check-in, the transfer and install of the snapshot, the log after it).
    restart_to_caught_up_ms: u64,
}

/// A node SIGKILLed and started again on its data directory.
#[derive(Debug, Default, Serialize)]
struct Restart {
    node: u64,
    /// SAs in the state it restarted with.
    ike_sas: u64,
    /// The snapshot it loaded from its data directory (then it replayed the log after it).
    loaded: Option<SnapshotFigures>,
    /// From the new process's start until it answered with the cluster's commit index of the
    /// kill applied and its data plane open (unfenced): ready to serve any SA it owns.
    restart_to_ready_ms: u64,
}

#[derive(Debug, Serialize)]
struct FloodResult {
    kind: FloodKind,
    rate: u64,
    attacker: FloodStats,
    dpd_rtt_ms: Percentiles,
    dpd_failed: usize,
    /// This DPD p99 over the idle one after the setups (`dpd_rtt_ms_after_setups`).
    p99_ratio_to_idle: f64,
}

#[derive(Debug, Default, Serialize)]
struct SetupResult {
    attempted: u64,
    established: u64,
    failed: BTreeMap<String, u64>,
    concurrency: usize,
    seconds: f64,
    setups_per_sec: f64,
    /// Setups per second while the state grew through each range of established SAs (the
    /// first from 0 to 5,000): whether the rate falls as the cluster fills.
    rate_windows: Vec<RateWindow>,
    /// `setups_per_sec` over the first window's rate (0 to 5,000 SAs) of the same run.
    rate_ratio_to_first_window: f64,
    /// IKE_SA_INIT sent → IKE_AUTH answer processed.
    latency_ms: Percentiles,
    /// CPU used during the setup phase, in cores (1.0 = one core busy the whole time).
    cpu_cores: BTreeMap<String, f64>,
    machine_busy: f64,
    /// UDP datagrams dropped for a full receive buffer during the setups, in the client's
    /// namespace and in the nodes' (summed).
    client_rcvbuf_drops: u64,
    nodes_rcvbuf_drops: u64,
    /// Each node process's resident memory after the setups (VmRSS), in bytes.
    rss_bytes: BTreeMap<String, u64>,
    /// The largest node's resident memory divided by the SAs in the cluster: what one more SA
    /// costs a node (every node holds every SA's record; the owner also runs it).
    bytes_per_sa_per_node: u64,
}

/// Setups per second from the `from`-th to the `to`-th established SA of a phase.
#[derive(Debug, Serialize)]
struct RateWindow {
    from: usize,
    to: usize,
    setups_per_sec: f64,
}

/// Where the rate windows end (SAs established in the phase), up to the phase's total.
const RATE_WINDOW_ENDS: [usize; 7] = [5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000];

/// Rates over [0, 5k), [5k, 10k), … of the completion times `at` (in order) of a phase that
/// began at `started`; a last partial window only if it holds at least 1,000 setups.
fn rate_windows(started: Instant, at: &[Instant]) -> Vec<RateWindow> {
    let mut windows = Vec::new();
    let mut from = 0;
    let mut since = started;
    for end in RATE_WINDOW_ENDS
        .iter()
        .copied()
        .chain(std::iter::once(at.len()))
    {
        let to = end.min(at.len());
        if to <= from || (to < end && to - from < 1_000) {
            break;
        }
        let until = at[to - 1];
        let seconds = until.duration_since(since).as_secs_f64().max(1e-9);
        windows.push(RateWindow {
            from,
            to,
            setups_per_sec: ((to - from) as f64 / seconds).round(),
        });
        from = to;
        since = until;
    }
    windows
}

/// A process's resident set (VmRSS of /proc/<pid>/status), in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn random() -> impl FnMut(&mut [u8]) {
    |buf: &mut [u8]| rand::rng().fill_bytes(buf)
}

fn ike_settings(prefix: &str) -> IkeSettings {
    IkeSettings {
        local_id: GW_ID.into(),
        psk: vec![PskSetting {
            peer: CLIENT_ID.into(),
            secret: PskSecret::new(PSK),
            remote_ts: None,
        }],
        // A /12 (about a million addresses): a pool a quarter full or less hands out an address
        // at the first or second try, whatever the number of SAs.
        pool: Some(POOL.into()),
        local_ts: vec![format!("{prefix}/16")],
        dpd_s: 0,
        // Every initiator of the bench shares one address (as clients behind one NAT would),
        // with `--concurrency` of them half-open at once: the default budget of 16 per source
        // would hold them back (they would get in on their retransmissions, seconds later).
        max_half_open_per_source: 4_096,
        ..IkeSettings::default()
    }
}

fn client_config() -> Arc<Config> {
    Arc::new(
        Config::new(evpc_ike::Identity::fqdn(CLIENT_ID))
            .with_psk(evpc_ike::Identity::fqdn(GW_ID), PSK.as_bytes()),
    )
}

// ---------------------------------------------------------------- CPU accounting

/// utime + stime of a process (or thread), in clock ticks.
fn cpu_ticks(stat_path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// (busy, total) jiffies of the whole machine.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().sum();
    let idle = cpu.get(3)? + cpu.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// CPU meters of the node processes and of this process.
struct Meter {
    started: Instant,
    procs: Vec<(String, String, u64)>,
    machine: (u64, u64),
}

impl Meter {
    /// Starts metering the node processes `pids` (node id, pid) and this process.
    fn start(pids: &[(u64, u32)]) -> Meter {
        let mut procs = Vec::new();
        for (id, pid) in pids {
            let path = format!("/proc/{pid}/stat");
            let ticks = cpu_ticks(&path).unwrap_or(0);
            procs.push((format!("node{id}"), path, ticks));
        }
        let own = "/proc/self/stat".to_string();
        let ticks = cpu_ticks(&own).unwrap_or(0);
        procs.push(("bench (initiators)".into(), own, ticks));
        Meter {
            started: Instant::now(),
            procs,
            machine: machine_ticks().unwrap_or((0, 0)),
        }
    }

    fn stop(&self) -> (BTreeMap<String, f64>, f64) {
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let cores = self
            .procs
            .iter()
            .map(|(name, path, before)| {
                let used = cpu_ticks(path).unwrap_or(*before).saturating_sub(*before);
                let cores = used as f64 / USER_HZ / seconds;
                (name.clone(), (cores * 100.0).round() / 100.0)
            })
            .collect();
        let (busy, total) = machine_ticks().unwrap_or(self.machine);
        let busy_share = (busy - self.machine.0) as f64 / (total - self.machine.1).max(1) as f64;
        (cores, (busy_share * 100.0).round() / 100.0)
    }
}

// ---------------------------------------------------------------- the initiators

struct Entry {
    sa: IkeSa,
    /// Part of the current setup phase's figures.
    counted: bool,
    started: Instant,
    established: Option<Instant>,
    closed: Option<String>,
    dpd_started: Option<Instant>,
}

/// Many initiators behind two sockets, in one thread.
struct Initiators {
    config: Arc<Config>,
    target: Ipv4Addr,
    s500: Sock,
    s4500: Sock,
    sas: HashMap<u64, Entry>,
    in_flight: usize,
    setup_latency: Vec<Duration>,
    dpd_rtts: Vec<Duration>,
    last_timers: Instant,
    /// When each SA's engine wants `handle_timeout` next, earliest first, with the deadline
    /// last scheduled per SA (older heap entries are stale): the bench's own cost per tick must
    /// not grow with the SAs it holds, or it takes the CPU the nodes are measured on.
    deadlines: BinaryHeap<Reverse<(u64, u64)>>,
    scheduled: HashMap<u64, u64>,
    /// When each setup of the current phase completed, in order.
    established_at: Vec<Instant>,
}

/// A UDP socket with 4 MiB buffers (hundreds of answers arrive in bursts): the tokio side
/// receives, a blocking clone sends (tokio's `try_send_to` refuses until the reactor has seen
/// the socket writable, which would drop a first burst).
fn socket(addr: SocketAddr) -> anyhow::Result<Sock> {
    let socket = evpc_dataplane::userspace::udp::bind_udp(addr, 4 << 20, false)
        .with_context(|| format!("binding {addr}"))?;
    let send = socket.try_clone()?;
    send.set_write_timeout(Some(Duration::from_millis(100)))?;
    socket.set_nonblocking(true)?;
    Ok(Sock {
        recv: UdpSocket::from_std(socket)?,
        send,
    })
}

/// One bound UDP port.
struct Sock {
    recv: UdpSocket,
    send: std::net::UdpSocket,
}

/// The UDP counters (`Udp:` of a /proc/…/net/snmp).
fn udp_counters(path: &str) -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return BTreeMap::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_owned(), v.parse().ok()?)))
        .collect()
}

/// UDP datagrams dropped for a full receive buffer so far, in the network namespace of
/// process `pid` (`None`: the calling thread's).
fn rcvbuf_errors(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/net/snmp"),
        None => "/proc/thread-self/net/snmp".into(),
    };
    udp_counters(&path)
        .get("RcvbufErrors")
        .copied()
        .unwrap_or(0)
}

impl Initiators {
    async fn new(target: Ipv4Addr) -> anyhow::Result<Initiators> {
        Ok(Initiators {
            config: client_config(),
            target,
            s500: socket(SocketAddr::from((CLIENT, 500)))?,
            s4500: socket(SocketAddr::from((CLIENT, 4500)))?,
            sas: HashMap::new(),
            in_flight: 0,
            setup_latency: Vec::new(),
            dpd_rtts: Vec::new(),
            last_timers: Instant::now(),
            deadlines: BinaryHeap::new(),
            scheduled: HashMap::new(),
            established_at: Vec::new(),
        })
    }

    /// Records when SA `spi`'s engine wants its next timeout.
    fn schedule(&mut self, spi: u64) {
        let Some(entry) = self.sas.get(&spi) else {
            return;
        };
        match entry.sa.next_timeout() {
            Some(at) if self.scheduled.get(&spi) != Some(&at) => {
                self.scheduled.insert(spi, at);
                self.deadlines.push(Reverse((at, spi)));
            }
            Some(_) => {}
            None => {
                self.scheduled.remove(&spi);
            }
        }
    }

    fn send(&self, d: &Datagram) {
        let result = if d.local.port() == 4500 {
            let mut framed = Vec::with_capacity(d.payload.len() + 4);
            framed.extend_from_slice(&[0; 4]);
            framed.extend_from_slice(&d.payload);
            self.s4500.send.send_to(&framed, d.remote)
        } else {
            self.s500.send.send_to(&d.payload, d.remote)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "initiator send");
        }
    }

    /// Handles an outcome completely (an initiator keeps its state in memory: gated datagrams
    /// go at once).
    fn apply(&mut self, spi: u64, outcome: Outcome) {
        for d in &outcome.send {
            self.send(d);
        }
        if let Some(commit) = outcome.commit {
            for d in commit.into_datagrams_after_durable() {
                self.send(&d);
            }
        }
        let now = Instant::now();
        self.schedule(spi);
        for event in outcome.events {
            let Some(entry) = self.sas.get_mut(&spi) else {
                return;
            };
            match event {
                Event::IkeSaEstablished { .. }
                    if entry.established.is_none() && entry.closed.is_none() =>
                {
                    entry.established = Some(now);
                    self.setup_latency.push(now - entry.started);
                    if entry.counted {
                        self.established_at.push(now);
                    }
                    self.in_flight -= 1;
                }
                Event::PeerAlive => {
                    if let Some(t) = entry.dpd_started.take() {
                        self.dpd_rtts.push(now - t);
                    }
                }
                Event::Closed { reason } => {
                    if entry.established.is_none() && entry.closed.is_none() {
                        self.in_flight -= 1;
                    }
                    entry.closed = Some(format!("{reason:?}"));
                }
                _ => {}
            }
        }
    }

    fn connect(&mut self) {
        let mut options = ConnectOptions::road_warrior(
            evpc_ike::Identity::fqdn(GW_ID),
            vec![TrafficSelector::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 16)],
        );
        options.force_udp_encap = true;
        let (sa, outcome) = IkeSa::connect(
            self.config.clone(),
            SocketAddr::from((CLIENT, 500)),
            SocketAddr::from((self.target, 500)),
            options,
            now_ms(),
            &mut random(),
        );
        let Some(spi) = sa.local_spi() else {
            return;
        };
        self.sas.insert(
            spi,
            Entry {
                sa,
                counted: true,
                started: Instant::now(),
                established: None,
                closed: None,
                dpd_started: None,
            },
        );
        self.in_flight += 1;
        self.apply(spi, outcome);
    }

    fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr, port: u16) {
        let message = if port == 4500 {
            match bytes.split_first_chunk::<4>() {
                Some(([0, 0, 0, 0], rest)) => rest,
                _ => return,
            }
        } else {
            bytes
        };
        // We initiated every SA: our SPI is the initiator SPI.
        let Some(h) = Header::peek(message) else {
            return;
        };
        let spi = h.spi_i;
        let Some(entry) = self.sas.get_mut(&spi) else {
            return;
        };
        let outcome = entry.sa.handle_datagram(
            now_ms(),
            &mut random(),
            SocketAddr::from((CLIENT, port)),
            from,
            message,
        );
        self.apply(spi, outcome);
    }

    fn timers(&mut self) {
        if self.last_timers.elapsed() < Duration::from_millis(20) {
            return;
        }
        self.last_timers = Instant::now();
        let now = now_ms();
        while let Some(Reverse((at, spi))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            if self.scheduled.get(&spi) != Some(&at) {
                continue; // rescheduled since
            }
            self.scheduled.remove(&spi);
            if let Some(entry) = self.sas.get_mut(&spi) {
                let outcome = entry.sa.handle_timeout(now, &mut random());
                self.apply(spi, outcome);
            }
        }
    }

    /// Receives and handles datagrams for up to `wait`, then runs due timers.
    async fn pump(&mut self, wait: Duration) {
        let mut b500 = [0u8; 4096];
        let mut b4500 = [0u8; 4096];
        let got = tokio::select! {
            r = self.s500.recv.recv_from(&mut b500) => r.ok().map(|(n, from)| (b500[..n].to_vec(), from, 500)),
            r = self.s4500.recv.recv_from(&mut b4500) => r.ok().map(|(n, from)| (b4500[..n].to_vec(), from, 4500)),
            _ = tokio::time::sleep(wait) => None,
        };
        if let Some((bytes, from, port)) = got {
            self.on_datagram(&bytes, from, port);
        }
        self.timers();
    }

    /// Forgets the SAs set up so far for the next [`Initiators::setup`]'s figures (they stay
    /// established).
    fn reset_setup_stats(&mut self) {
        self.setup_latency.clear();
        self.established_at.clear();
        for e in self.sas.values_mut() {
            e.counted = false;
        }
    }

    /// Sets up `n` SAs with `concurrency` in flight.
    async fn setup(&mut self, n: u64, concurrency: usize, deadline: Duration) -> SetupResult {
        let started = Instant::now();
        let mut attempted = 0;
        while started.elapsed() < deadline {
            while self.in_flight < concurrency && attempted < n {
                self.connect();
                attempted += 1;
            }
            if attempted == n && self.in_flight == 0 {
                break;
            }
            self.pump(Duration::from_millis(10)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        let established = self
            .sas
            .values()
            .filter(|e| e.counted && e.established.is_some())
            .count() as u64;
        let mut failed = BTreeMap::new();
        for e in self.sas.values().filter(|e| e.counted) {
            match (&e.established, &e.closed) {
                (None, Some(reason)) => *failed.entry(reason.clone()).or_default() += 1,
                (None, None) => *failed.entry("timed out".to_string()).or_default() += 1,
                _ => {}
            }
        }
        let setups_per_sec = (established as f64 / seconds).round();
        let rate_windows = rate_windows(started, &self.established_at);
        let rate_ratio_to_first_window = rate_windows
            .first()
            .filter(|w| w.setups_per_sec > 0.0)
            .map_or(1.0, |w| {
                (setups_per_sec / w.setups_per_sec * 100.0).round() / 100.0
            });
        SetupResult {
            attempted,
            established,
            failed,
            concurrency,
            seconds: (seconds * 1000.0).round() / 1000.0,
            setups_per_sec,
            rate_windows,
            rate_ratio_to_first_window,
            latency_ms: Percentiles::of(&self.setup_latency),
            ..SetupResult::default()
        }
    }

    /// The first `over` established SAs, by SPI: the ones DPDs go round.
    fn dpd_sas(&self, over: usize) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .sas
            .iter()
            .filter(|(_, e)| e.established.is_some() && e.closed.is_none())
            .map(|(spi, _)| *spi)
            .collect();
        ids.sort_unstable();
        ids.truncate(over.max(1));
        ids
    }

    /// One DPD on SA `spi`, waiting up to 5 s for the answer; whether it came.
    async fn dpd_once(&mut self, spi: u64) -> bool {
        let before = self.dpd_rtts.len();
        let Some(entry) = self.sas.get_mut(&spi) else {
            return false;
        };
        entry.dpd_started = Some(Instant::now());
        let outcome = match entry.sa.send_dpd(now_ms(), &mut random()) {
            Ok(o) => o,
            Err(_) => return false,
        };
        self.apply(spi, outcome);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.dpd_rtts.len() == before && Instant::now() < deadline {
            self.pump(Duration::from_millis(5)).await;
        }
        self.dpd_rtts.len() > before
    }

    /// `samples` DPDs, one at a time, over `over` established SAs.
    async fn dpd(&mut self, samples: usize, over: usize) -> (Percentiles, usize) {
        let ids = self.dpd_sas(over);
        self.dpd_rtts.clear();
        if ids.is_empty() {
            return (Percentiles::default(), samples);
        }
        let mut failed = 0;
        for i in 0..samples {
            if !self.dpd_once(ids[i % ids.len()]).await {
                failed += 1;
            }
        }
        (Percentiles::of(&self.dpd_rtts), failed)
    }

    /// DPDs one at a time over `over` established SAs until `done` says so (and at least
    /// `min_samples`).
    async fn dpd_while(
        &mut self,
        over: usize,
        min_samples: usize,
        mut done: impl FnMut() -> bool,
    ) -> (Percentiles, usize) {
        let ids = self.dpd_sas(over);
        self.dpd_rtts.clear();
        let mut failed = 0;
        let mut i = 0;
        while !ids.is_empty() && (i < min_samples || !done()) {
            if !self.dpd_once(ids[i % ids.len()]).await {
                failed += 1;
            }
            i += 1;
        }
        (Percentiles::of(&self.dpd_rtts), failed)
    }
}

/// What the snapshot builds need from the lab, taken before the client thread starts.
struct SnapshotInputs {
    /// An admin client for each node alone.
    admins: Vec<(u64, evpc_api::AdminClient)>,
}

/// In the client's namespace, with the SAs of the setups in the state: every node builds a
/// snapshot at once while DPDs (commits) go on.
async fn snapshot_builds(
    initiators: &mut Initiators,
    input: &SnapshotInputs,
    over: usize,
    min_samples: usize,
) -> anyhow::Result<SnapshotPhase> {
    let mut phase = SnapshotPhase::default();
    let mut builds = tokio::task::JoinSet::new();
    for (id, admin) in &input.admins {
        let (id, mut admin) = (*id, admin.clone());
        builds.spawn(async move { (id, admin.snapshot().await) });
    }
    let building = builds.len();
    let finished = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = {
        let finished = finished.clone();
        tokio::spawn(async move {
            let mut results = Vec::new();
            while let Some(joined) = builds.join_next().await {
                results.push(joined);
                finished.fetch_add(1, Ordering::AcqRel);
            }
            results
        })
    };
    let (dpd, failed) = initiators
        .dpd_while(over, min_samples, || {
            finished.load(Ordering::Acquire) >= building
        })
        .await;
    phase.dpd_during_build_ms = dpd;
    phase.dpd_failed_during_build = failed;
    for joined in results.await? {
        let (id, answer) = joined?;
        let built = answer.with_context(|| format!("snapshot on node {id}"))?;
        phase.built.insert(
            format!("node{id}"),
            built.snapshot.unwrap_or_default().into(),
        );
    }

    Ok(phase)
}

/// SIGKILLs follower `id`, sets up `setups` more SAs (more entries than the leader keeps
/// behind a snapshot, `raft.keep_behind_snapshot`), has the leader snapshot and compact its log
/// past the follower, and starts the follower again: the leader must send it the snapshot.
async fn lagging_follower(
    lab: &mut Lab,
    leader: u64,
    id: u64,
    setups: u64,
    concurrency: usize,
) -> anyhow::Result<LaggingFollower> {
    let last = lab.admin_of(id)?.status(false).await?.last_log_index;
    lab.sigkill(id).await?;
    let lag = in_namespace(lab.client_ns(), move || async move {
        let mut initiators = Initiators::new(CLUSTER).await?;
        Ok(initiators
            .setup(setups, concurrency, Duration::from_secs(60 + setups / 50))
            .await)
    })
    .await?;
    let mut admin = lab.admin_of(leader)?;
    let snapshot = admin.snapshot().await?.snapshot.unwrap_or_default();
    // The leader compacts once no replication reads the entries (a retry towards the dead
    // follower may, for a moment).
    let waiting = Instant::now();
    let purged = loop {
        let purged = admin.status(false).await?.purged_index;
        if purged > last {
            break purged;
        }
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(30),
            "the leader kept its log up to {purged}, not past node {id}'s last entry {last}: \
             raise --lag-setups above raft.keep_behind_snapshot"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let target = admin.status(false).await?.committed_index;
    lab.restart(id)?;
    let started = Instant::now();
    let mut follower = lab.admin_of(id)?;
    // Caught up once it applied `target`; its install is recorded a moment after the state is
    // swapped in (the snapshot is written to its disk first), so wait for that record too.
    let mut caught_up_ms = None;
    let installed = loop {
        if let Ok(status) = follower.status(false).await
            && status.last_applied_index >= target
        {
            let since_restart = started.elapsed();
            let at = *caught_up_ms.get_or_insert(since_restart.as_millis() as u64);
            let installed = status
                .snapshot_installed
                .filter(|s| s.index >= snapshot.index);
            if installed.is_some() || since_restart.as_millis() as u64 > at + 5_000 {
                break installed;
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "node {id} did not catch up with index {target} within 120 s of its restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok(LaggingFollower {
        node: id,
        setups_while_down: lag.established,
        installed: installed.map(Into::into),
        leader_snapshot: snapshot.into(),
        leader_purged_index: purged,
        restart_to_caught_up_ms: caught_up_ms.unwrap_or_default(),
    })
}

/// SIGKILLs node `id` of `lab` and starts it again on its data directory: how long until it is
/// ready to serve (the cluster's commit index of the kill applied, unfenced).
async fn restart_node(lab: &mut Lab, id: u64) -> anyhow::Result<Restart> {
    let committed = lab.admin()?.follow_leader().await?.committed_index;
    lab.sigkill(id).await?;
    lab.restart(id)?;
    let started = Instant::now();
    let mut admin = lab.admin_of(id)?;
    let status = loop {
        if let Ok(status) = admin.status(false).await
            && status.last_applied_index >= committed
            && !status.fenced
        {
            break status;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "node {id} not ready within 120 s of its restart"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok(Restart {
        node: id,
        ike_sas: status.ike_sas,
        loaded: status.snapshot_loaded.map(Into::into),
        restart_to_ready_ms: started.elapsed().as_millis() as u64,
    })
}

/// Runs `work` on a thread inside `ns` with its own runtime, and waits for it.
async fn in_namespace<T, F, Fut>(ns: &NetNs, work: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let thread = ns.spawn("ike-bench", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(work())
    })?;
    tokio::task::spawn_blocking(move || thread.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the initiator thread panicked"))?
}

// ---------------------------------------------------------------- the bare engine

/// The engine answering without commits: the baseline of the latency comparison.
async fn bare_responder(stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let settings = ike_settings("10.10.0.0");
    let config = Arc::new(settings.engine_config().map_err(anyhow::Error::msg)?);
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let endpoint = Endpoint::new(config, Secret::from_slice(&secret));
    let s500 = socket(SocketAddr::from((BASELINE, 500)))?;
    let s4500 = socket(SocketAddr::from((BASELINE, 4500)))?;
    let mut sas: HashMap<u64, IkeSa> = HashMap::new();
    let mut half_open: HashMap<(SocketAddr, u64), u64> = HashMap::new();
    let mut next_address = u32::from(Ipv4Addr::new(10, 10, 0, 2));
    let send = |d: &Datagram| {
        let result = if d.local.port() == 4500 {
            let mut framed = vec![0u8; 4];
            framed.extend_from_slice(&d.payload);
            s4500.send.send_to(&framed, d.remote)
        } else {
            s500.send.send_to(&d.payload, d.remote)
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "baseline send");
        }
    };
    let mut b500 = [0u8; 4096];
    let mut b4500 = [0u8; 4096];
    while !stop.load(Ordering::Acquire) {
        let got = tokio::select! {
            r = s500.recv.recv_from(&mut b500) => r.ok().map(|(n, from)| (b500[..n].to_vec(), from, 500u16)),
            r = s4500.recv.recv_from(&mut b4500) => r.ok().and_then(|(n, from)| {
                (n >= 4 && b4500[..4] == [0; 4]).then(|| (b4500[4..n].to_vec(), from, 4500u16))
            }),
            _ = tokio::time::sleep(Duration::from_millis(50)) => None,
        };
        let Some((message, remote, port)) = got else {
            continue;
        };
        let local = SocketAddr::from((BASELINE, port));
        let now = now_ms();
        let (spi, mut outcome) = match wire::route(&message) {
            Route::NewSa { initiator_spi } => {
                if let Some(spi) = half_open.get(&(remote, initiator_spi)).copied()
                    && let Some(sa) = sas.get_mut(&spi)
                {
                    (
                        spi,
                        sa.handle_datagram(now, &mut random(), local, remote, &message),
                    )
                } else {
                    match endpoint.accept(now, &mut random(), local, remote, &message, 0) {
                        Accepted::NewSa(sa, outcome) => {
                            let Some(spi) = sa.local_spi() else { continue };
                            half_open.insert((remote, initiator_spi), spi);
                            sas.insert(spi, *sa);
                            (spi, outcome)
                        }
                        Accepted::Reply(d, _) => {
                            send(&d);
                            continue;
                        }
                        Accepted::Dropped(_) => continue,
                    }
                }
            }
            Route::Existing { local_spi } => match sas.get_mut(&local_spi) {
                Some(sa) => (
                    local_spi,
                    sa.handle_datagram(now, &mut random(), local, remote, &message),
                ),
                None => continue,
            },
            Route::Drop => continue,
        };
        loop {
            for d in &outcome.send {
                send(d);
            }
            if let Some(commit) = outcome.commit.take() {
                for d in commit.into_datagrams_after_durable() {
                    send(&d);
                }
            }
            let wants_address = outcome
                .events
                .iter()
                .any(|e| matches!(e, Event::InnerAddressNeeded { .. }));
            if !wants_address {
                break;
            }
            let address = InnerAddress::new(Ipv4Addr::from(next_address));
            next_address += 1;
            let Some(sa) = sas.get_mut(&spi) else { break };
            match sa.assign_inner_address(Some(address), now_ms(), &mut random()) {
                Ok(o) => outcome = o,
                Err(_) => break,
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- the run

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ` (from `date`), or seconds since the epoch.
pub(crate) fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| format!("unix {}", now_ms() / 1000))
}

/// The attacker's namespace on `lab`'s segment, with the nodes routing its source block back
/// to it.
fn flood_namespace(lab: &Lab) -> anyhow::Result<NetNs> {
    let ns = lab.attach("flood", ike_flood::FLOODER)?;
    ns.ip(&["route", "add", "local", ike_flood::SOURCES, "dev", "lo"])?;
    // As the client does: every node sees every datagram for the cluster address.
    ns.ip(&[
        "neigh",
        "replace",
        &CLUSTER.to_string(),
        "lladdr",
        evpc_testkit::lab::CLUSTER_MAC,
        "dev",
        "e0",
        "nud",
        "permanent",
    ])?;
    for id in lab.alive_ids() {
        lab.node_ns(id).ip(&[
            "route",
            "add",
            ike_flood::SOURCES,
            "via",
            &ike_flood::FLOODER.to_string(),
        ])?;
    }
    Ok(ns)
}

async fn measure_cluster(
    args: &Args,
    node_bin: &std::path::Path,
    nodes: u64,
    baseline: bool,
    main: bool,
) -> anyhow::Result<(ClusterResult, Option<Percentiles>)> {
    let mut spec = LabSpec::new(
        nodes,
        &format!("ikeb{nodes}"),
        node_bin.to_owned(),
        ike_settings("10.10.0.0"),
    );
    spec.inner = (Ipv4Addr::new(10, 10, 0, 1), 16);
    spec.log_filter = args.node_log.clone();
    spec.keep_dir = args.keep_logs;
    spec.base_dir = args.data_dir.clone();
    spec.insecure_plaintext = args.insecure_plaintext;
    let mut lab = Lab::start(spec).await?;
    let pids: Vec<(u64, u32)> = lab
        .alive_ids()
        .into_iter()
        .filter_map(|id| Some((id, lab.pid(id)?)))
        .collect();
    let (sas, concurrency, samples, over) =
        (args.sas, args.concurrency, args.dpd_samples, args.dpd_sas);
    let deadline = Duration::from_secs(60 + args.sas / 50);
    let floods: Vec<(FloodKind, u64)> = [
        (FloodKind::Spoofed, args.flood_rate),
        (FloodKind::Answering, args.flood_answering_rate),
    ]
    .into_iter()
    .filter(|(_, rate)| main && *rate > 0)
    .collect();
    let snapshot_inputs = if main && !args.no_snapshots && nodes > 1 {
        Some(SnapshotInputs {
            admins: lab
                .alive_ids()
                .into_iter()
                .map(|id| Ok((id, lab.admin_of(id)?)))
                .collect::<anyhow::Result<_>>()?,
        })
    } else {
        None
    };
    let flood_ns = if floods.is_empty() {
        None
    } else {
        Some(Arc::new(flood_namespace(&lab)?))
    };
    let flood_in = flood_ns.clone();
    let log_marks: Vec<(u64, usize)> = lab
        .alive_ids()
        .into_iter()
        .map(|id| (id, lab.log(id).len()))
        .collect();
    let (setup, dpd_idle, dpd_loaded, dpd_failed, flood_results, mut snapshots) =
        in_namespace(lab.client_ns(), move || async move {
            let mut initiators = Initiators::new(CLUSTER).await?;
            // 1. A few SAs, and DPDs on them while the replicated state is small.
            let warm = initiators
                .setup(over as u64, over, Duration::from_secs(30))
                .await;
            anyhow::ensure!(
                warm.established as usize == over,
                "only {} of {over} SAs for the DPDs: {:?}",
                warm.established,
                warm.failed
            );
            let (dpd_idle, failed_idle) = initiators.dpd(samples, over).await;
            // 2. The setups, metered.
            initiators.reset_setup_stats();
            let client_drops = rcvbuf_errors(None);
            let node_drops: u64 = pids.iter().map(|(_, pid)| rcvbuf_errors(Some(*pid))).sum();
            let meter = Meter::start(&pids);
            let mut setup = initiators.setup(sas, concurrency, deadline).await;
            (setup.cpu_cores, setup.machine_busy) = meter.stop();
            setup.client_rcvbuf_drops = rcvbuf_errors(None) - client_drops;
            setup.nodes_rcvbuf_drops = pids
                .iter()
                .map(|(_, pid)| rcvbuf_errors(Some(*pid)))
                .sum::<u64>()
                - node_drops;
            setup.rss_bytes = pids
                .iter()
                .filter_map(|(id, pid)| Some((format!("node{id}"), rss_bytes(*pid)?)))
                .collect();
            let in_state = over as u64 + setup.established;
            setup.bytes_per_sa_per_node =
                setup.rss_bytes.values().max().copied().unwrap_or(0) / in_state.max(1);
            // 3. DPDs again, with all those SAs in the replicated state, once the burst's
            // aftermath (data planes starting the new children, followers catching up) is over.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (dpd_loaded, failed_loaded) = initiators.dpd(samples, over).await;
            // 4. DPDs under each flood, the attacker in its own namespace and thread.
            let mut flood_results = Vec::new();
            for (kind, rate) in floods {
                let Some(ns) = &flood_in else { break };
                let stop = Arc::new(AtomicBool::new(false));
                let s = stop.clone();
                let attacker = ns.spawn("ike-flood", move || {
                    ike_flood::run(kind, rate, client_config(), GW_ID, CLUSTER, &s)
                })?;
                // Let the half-open tables fill and the cookies start first.
                let warm_until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < warm_until {
                    initiators.pump(Duration::from_millis(10)).await;
                }
                let (dpd, failed) = initiators.dpd(samples, over).await;
                stop.store(true, Ordering::Release);
                let attacker = tokio::task::spawn_blocking(move || attacker.join())
                    .await?
                    .map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
                let ratio = if dpd_loaded.p99 > 0.0 {
                    (dpd.p99 / dpd_loaded.p99 * 100.0).round() / 100.0
                } else {
                    0.0
                };
                flood_results.push(FloodResult {
                    kind,
                    rate,
                    attacker,
                    dpd_rtt_ms: dpd,
                    dpd_failed: failed,
                    p99_ratio_to_idle: ratio,
                });
            }
            // 5. Snapshots with all those SAs in the state.
            let snapshots = match &snapshot_inputs {
                Some(input) => {
                    Some(snapshot_builds(&mut initiators, input, over, samples / 4).await?)
                }
                None => None,
            };
            Ok((
                setup,
                dpd_idle,
                dpd_loaded,
                failed_idle + failed_loaded,
                flood_results,
                snapshots,
            ))
        })
        .await?;
    drop(flood_ns);
    let (mut takeovers_logged, mut fences_logged) = (0, 0);
    for (id, mark) in &log_marks {
        let log = lab.log(*id);
        let since = log.get(*mark..).unwrap_or("");
        takeovers_logged += since.matches("taking over the SAs of silent nodes").count();
        fences_logged += since.matches("data plane fenced").count();
    }
    // 6. A follower that lags past the leader's log, and a plain restart of the other one.
    if let Some(phase) = &mut snapshots {
        let leader = lab.admin()?.follow_leader().await?.leader_id;
        let followers: Vec<u64> = lab
            .alive_ids()
            .into_iter()
            .filter(|id| Some(*id) != leader)
            .collect();
        if let (Some(leader), Some(&lagging)) = (leader, followers.first()) {
            phase.lagging_follower = Some(
                lagging_follower(&mut lab, leader, lagging, args.lag_setups, concurrency).await?,
            );
        }
        if let Some(&other) = followers.get(1) {
            phase.restart = Some(restart_node(&mut lab, other).await?);
        }
    }
    let mut sas_by_owner = BTreeMap::new();
    for sa in lab.admin()?.all_sas(None).await? {
        *sas_by_owner.entry(sa.owner).or_default() += 1;
    }
    let baseline = if baseline {
        if !args.json {
            eprintln!("ike-bench: bare engine: {} DPDs", args.dpd_samples);
        }
        Some(measure_baseline(args, &lab).await?)
    } else {
        None
    };
    let result = ClusterResult {
        nodes,
        setup,
        dpd_rtt_ms: dpd_idle,
        dpd_rtt_ms_after_setups: dpd_loaded,
        dpd_failed,
        flood: flood_results,
        snapshots,
        takeovers_logged,
        fences_logged,
        sas_by_owner,
    };
    Ok((result, baseline))
}

/// DPDs against the bare engine, in a namespace of its own on `lab`'s segment.
async fn measure_baseline(args: &Args, lab: &Lab) -> anyhow::Result<Percentiles> {
    let base = lab.attach("bare", BASELINE)?;
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let responder = base.spawn("bare-engine", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(bare_responder(s))
    })?;
    let (samples, over) = (args.dpd_samples, args.dpd_sas);
    let result = in_namespace(lab.client_ns(), move || async move {
        let mut initiators = Initiators::new(BASELINE).await?;
        let setup = initiators
            .setup(over as u64, over, Duration::from_secs(30))
            .await;
        anyhow::ensure!(
            setup.established as usize == over,
            "the bare engine set up {} of {over} SAs",
            setup.established
        );
        Ok(initiators.dpd(samples, over).await.0)
    })
    .await;
    stop.store(true, Ordering::Release);
    tokio::task::spawn_blocking(move || responder.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the bare engine panicked"))??;
    drop(base);
    result
}

/// Runs the benchmark; `Ok(false)` if a check failed.
pub async fn run(args: Args, node_bin: PathBuf) -> anyhow::Result<bool> {
    anyhow::ensure!(
        is_root(),
        "ike-bench needs root (network namespaces, veth, TUN devices)"
    );
    let mut clusters = Vec::new();
    let mut sizes = vec![args.nodes];
    if args.nodes != 1 {
        sizes.push(1);
    }
    let mut baseline = Percentiles::default();
    let last = sizes.len() - 1;
    for (i, nodes) in sizes.into_iter().enumerate() {
        if !args.json {
            eprintln!(
                "ike-bench: {nodes}-node cluster: {} setups, then {} DPDs",
                args.sas, args.dpd_samples
            );
        }
        let (result, bare) = measure_cluster(&args, &node_bin, nodes, i == last, i == 0).await?;
        clusters.push(result);
        if let Some(bare) = bare {
            baseline = bare;
        }
    }
    let mut added = BTreeMap::new();
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    for c in &clusters {
        added.insert(
            format!("{}_nodes", c.nodes),
            Added {
                p50: round(c.dpd_rtt_ms.p50 - baseline.p50),
                p99: round(c.dpd_rtt_ms.p99 - baseline.p99),
                p50_after_setups: round(c.dpd_rtt_ms_after_setups.p50 - baseline.p50),
                p99_after_setups: round(c.dpd_rtt_ms_after_setups.p99 - baseline.p99),
            },
        );
    }
    let mut failures = Vec::new();
    let main = &clusters[0];
    if main.setup.established < main.setup.attempted {
        failures.push(format!(
            "{} of {} setups failed: {:?}",
            main.setup.attempted - main.setup.established,
            main.setup.attempted,
            main.setup.failed
        ));
    }
    if main.setup.setups_per_sec < args.min_setups_per_sec {
        failures.push(format!(
            "{} setups/s, below --min-setups-per-sec {}",
            main.setup.setups_per_sec, args.min_setups_per_sec
        ));
    }
    for c in &clusters {
        if c.dpd_failed > 0 {
            failures.push(format!(
                "{} DPDs unanswered on {} nodes",
                c.dpd_failed, c.nodes
            ));
        }
    }
    for f in &main.flood {
        if f.dpd_failed > 0 {
            failures.push(format!(
                "{} DPDs unanswered under the {:?} flood",
                f.dpd_failed, f.kind
            ));
        }
        if f.p99_ratio_to_idle > args.max_flood_dpd_ratio {
            failures.push(format!(
                "the {:?} flood ({} IKE_SA_INIT/s) raised the DPD p99 to {} ms, {}x the idle {} ms (limit {}x)",
                f.kind,
                f.attacker.inits_per_sec,
                f.dpd_rtt_ms.p99,
                f.p99_ratio_to_idle,
                main.dpd_rtt_ms_after_setups.p99,
                args.max_flood_dpd_ratio
            ));
        }
    }
    if main.takeovers_logged > 0 || main.fences_logged > 0 {
        failures.push(format!(
            "a busy cluster failed itself: {} takeovers of silent nodes and {} fences logged \
             during the setups, DPDs and floods",
            main.takeovers_logged, main.fences_logged
        ));
    }
    if main.setup.rate_ratio_to_first_window < args.min_rate_ratio {
        failures.push(format!(
            "{} setups/s over the run, {}x the rate over its first 5,000 SAs (limit {}x)",
            main.setup.setups_per_sec, main.setup.rate_ratio_to_first_window, args.min_rate_ratio
        ));
    }
    if let Some(phase) = &main.snapshots {
        if phase.dpd_failed_during_build > 0 {
            failures.push(format!(
                "{} DPDs unanswered while every node built a snapshot",
                phase.dpd_failed_during_build
            ));
        }
        if let Some(lag) = &phase.lagging_follower {
            if lag.installed.is_none() {
                failures.push(format!(
                    "node {} caught up from the log, not the leader's snapshot: the install was \
                     not measured",
                    lag.node
                ));
            }
            if let Some(installed) = &lag.installed
                && installed.ms > args.max_install_ms
            {
                failures.push(format!(
                    "node {} took {} ms to install the leader's snapshot of {} SAs (limit {} ms)",
                    lag.node, installed.ms, installed.ike_sas, args.max_install_ms
                ));
            }
        }
        if let Some(restart) = &phase.restart
            && restart.restart_to_ready_ms > args.max_restart_ms
        {
            failures.push(format!(
                "node {} took {} ms to serve again after a restart with {} SAs (limit {} ms)",
                restart.node, restart.restart_to_ready_ms, restart.ike_sas, args.max_restart_ms
            ));
        }
    }
    if let Some(max) = args.max_added_p99_ms
        && let Some(a) = added.get(&format!("{}_nodes", main.nodes))
        && a.p99 > max
    {
        failures.push(format!(
            "commit-before-respond adds {} ms to the DPD p99, above {max}",
            a.p99
        ));
    }
    let report = Report {
        command: "ike-bench",
        date: utc_now(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        tls: !args.insecure_plaintext,
        topology: format!(
            "ClusterIP lab: node namespaces on one bridge, cluster address {CLUSTER} flooded to all (multicast MAC); initiators in one thread in the client namespace ({CLIENT}, UDP 500/4500, NAT-T forced, inner address requested); bare engine at {BASELINE}"
        ),
        clusters,
        baseline_dpd_rtt_ms: baseline,
        added_by_commit_ms: added,
        checks_passed: failures.is_empty(),
        failures,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report.clusters {
            println!(
                "{} node(s): {} of {} SAs in {:.2} s = {:.0} setups/s (p50 {:.1} ms, p99 {:.1} ms); DPD RTT p50 {:.3} ms p99 {:.3} ms, after the setups p50 {:.3} ms p99 {:.3} ms; CPU {:?}, machine busy {:.0}%; receive-buffer drops client {} nodes {}",
                c.nodes,
                c.setup.established,
                c.setup.attempted,
                c.setup.seconds,
                c.setup.setups_per_sec,
                c.setup.latency_ms.p50,
                c.setup.latency_ms.p99,
                c.dpd_rtt_ms.p50,
                c.dpd_rtt_ms.p99,
                c.dpd_rtt_ms_after_setups.p50,
                c.dpd_rtt_ms_after_setups.p99,
                c.setup.cpu_cores,
                c.setup.machine_busy * 100.0,
                c.setup.client_rcvbuf_drops,
                c.setup.nodes_rcvbuf_drops
            );
        }
        println!(
            "bare engine: DPD RTT p50 {:.3} ms p99 {:.3} ms; added by commit: {:?}",
            report.baseline_dpd_rtt_ms.p50,
            report.baseline_dpd_rtt_ms.p99,
            report.added_by_commit_ms
        );
        for f in report.clusters.iter().flat_map(|c| &c.flood) {
            println!(
                "{:?} flood: {} IKE_SA_INIT/s ({} stateless replies, {} half-open SAs made): DPD RTT p50 {:.3} ms p99 {:.3} ms ({}x idle p99), {} failed",
                f.kind,
                f.attacker.inits_per_sec,
                f.attacker.stateless_replies,
                f.attacker.half_open_made,
                f.dpd_rtt_ms.p50,
                f.dpd_rtt_ms.p99,
                f.p99_ratio_to_idle,
                f.dpd_failed
            );
        }
        for phase in report.clusters.iter().filter_map(|c| c.snapshots.as_ref()) {
            for (node, b) in &phase.built {
                println!(
                    "snapshot built on {node}: index {}, {} SAs, {} bytes in {} ms (lock {} ms)",
                    b.index, b.ike_sas, b.bytes, b.ms, b.lock_ms
                );
            }
            println!(
                "DPD RTT while they were built: p50 {:.3} ms p99 {:.3} ms, {} failed",
                phase.dpd_during_build_ms.p50,
                phase.dpd_during_build_ms.p99,
                phase.dpd_failed_during_build
            );
            if let Some(lag) = &phase.lagging_follower {
                println!(
                    "lagging follower {} ({} setups while it was down): leader's snapshot at {}, log compacted to {}; installed {:?}; restart to caught up {} ms",
                    lag.node,
                    lag.setups_while_down,
                    lag.leader_snapshot.index,
                    lag.leader_purged_index,
                    lag.installed,
                    lag.restart_to_caught_up_ms
                );
            }
            if let Some(r) = &phase.restart {
                println!(
                    "node {} restarted with {} SAs: ready in {} ms (loaded {:?})",
                    r.node, r.ike_sas, r.restart_to_ready_ms, r.loaded
                );
            }
        }
        for f in &report.failures {
            println!("FAILED: {f}");
        }
    }
    Ok(report.checks_passed)
}
