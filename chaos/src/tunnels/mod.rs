//! `evpc-chaos tunnels`: real tunnels under fire, measured where the end-users are (needs root).
//!
//! ```text
//!  ns server ── trusted segment (shared MAC, flooded) ── nodes 1..N (evpc-node, userspace ESP)
//!   voice: 50 pkt/s × 172 B each way per client          │ cluster segment (ClusterIP)
//!   TCP bulk to some clients                              │
//!                                      capture (tcpdump) ─ e0 ─ ns edge (router)
//!                                                               │ clients' segment
//!          strongSwan (charon, kernel-libipsec) / evpc-client ── ns c0 … cK+M
//! ```
//!
//! In order: the lab (N nodes, the trusted side, the edge) → the capture on the edge's cluster
//! port (every ESP packet the cluster sends its clients, streamed: repeats found as they pass,
//! packets counted per node per 10 ms) → K strongSwan and M `evpc-client` road warriors, each
//! with its own identity, host and inner address → voice both ways in every tunnel, TCP bulk to
//! some → `--rounds` rounds of every `--faults` kind, shuffled per round, each waited out,
//! healed and rebalanced → a 2-minute call with one owner killed in its middle beside one
//! without → the clients stopped and read → the checks and the report (JSON, and one HTML file
//! with plots).
//!
//! What is checked, at the clients and on the wire: no (SPI, sequence number) twice (nonce
//! reuse, with both packets' times and senders); no packet dropped by a client's anti-replay;
//! no IKE SA re-established (one IKE_AUTH per client, the same SPIs at the end); no DPD failed;
//! every inner address kept; every affected client flowing again. What is measured per fault
//! kind and protocol: the interruption (longest gap beyond the stream's 20 ms spacing) of each
//! affected client, TCP stalls, packets lost, and the call's E-model MOS.

pub mod clients;
pub mod faults;
pub mod traffic;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use evpc_dataplane::netns::is_root;
use evpc_node::ike_gateway::{IkeSettings, PskSecret, PskSetting};
use evpc_testkit::lab::{CLUSTER, Lab, LabSpec, TRUSTED_NET};
use evpc_testkit::wire::{Capture, EspPacket, RepeatFinder, format_mac};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::Serialize;

use self::clients::{Client, GATEWAY_ID, Kind, Seen, Setup};
pub use self::faults::FaultKind;
use self::faults::Injected;
use self::traffic::{ClientEnd, Measured, SPACING_MS, Traffic, now_ms};
use crate::report::CallQuality;
use crate::stats::Percentiles;

pub use evpc_testkit::lab::SERVER;

/// The clients' inner addresses.
const POOL: &str = "10.64.0.0/16";
/// Every client's pre-shared key (each has its own identity; one key keeps the config short).
const PSK: &str = "tunnels-campaign-pre-shared-key";
/// Packets counted per node in bins of this many milliseconds, for the timelines.
const BIN_MS: f64 = 10.0;

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Gateway nodes (3 to 7).
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Unmodified strongSwan clients (charon, kernel-libipsec); default: 4 when charon is
    /// installed, else 0.
    #[arg(long)]
    pub swan_clients: Option<usize>,
    /// Clients of our own (`evpc-client` processes).
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Clients that also receive TCP bulk from the server (strongSwan ones first).
    #[arg(long, default_value_t = 16)]
    pub bulk: usize,
    /// Fault kinds, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = FaultKind::ALL.to_vec())]
    pub faults: Vec<FaultKind>,
    /// Rounds: every fault kind this many times (shuffled within a round).
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Length of the call-quality experiment in seconds (a call with one owner killed in its
    /// middle, beside one without); 0 skips it.
    #[arg(long, default_value_t = 120)]
    pub call_s: u64,
    /// Seed of the fault order and targets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The `evpc-client` binary (default: next to this one).
    #[arg(long)]
    pub client_bin: Option<PathBuf>,
    /// Where the HTML report goes.
    #[arg(long, default_value = "tunnels-report.html")]
    pub report: PathBuf,
    /// `RUST_LOG` of the node processes.
    #[arg(long, default_value = "warn")]
    pub node_log: String,
    /// Keep the lab's directory (node configs, logs, client logs).
    #[arg(long)]
    pub keep_logs: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also print every affected client's gaps (when, how long) per fault.
    #[arg(long)]
    pub verbose: bool,
    /// Run each round's faults in the order given instead of shuffled.
    #[arg(long)]
    pub in_order: bool,
    /// Fail above this kill-owner interruption p99 (ms, over every affected client).
    #[arg(long, default_value_t = 500.0)]
    pub max_kill_owner_p99_ms: f64,
    /// Fail above this kill-leader interruption p99 (ms).
    #[arg(long, default_value_t = 800.0)]
    pub max_kill_leader_p99_ms: f64,
    /// Fail above this planned-transfer interruption p99 (ms).
    #[arg(long, default_value_t = 20.0)]
    pub max_transfer_p99_ms: f64,
    /// Fail if fewer transfers than this share lost nothing.
    #[arg(long, default_value_t = 0.99)]
    pub min_lossless_transfers: f64,
    /// Fail if the call with a failover scores more than this below the one without.
    #[arg(long, default_value_t = 0.1)]
    pub max_mos_drop: f64,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct Report {
    pub command: &'static str,
    pub date: String,
    pub cores: usize,
    pub nodes: u64,
    pub clients: BTreeMap<String, usize>,
    pub faults: Vec<Injected>,
    /// Per fault kind: interruption of every affected client, per protocol.
    pub by_kind: BTreeMap<String, KindFigures>,
    pub invariants: Invariants,
    pub call: Option<CallFigures>,
    pub checks_passed: bool,
    pub failures: Vec<String>,
    /// Where the HTML report was written.
    pub html: Option<PathBuf>,
}

/// The figures of one fault kind.
#[derive(Debug, Default, Serialize)]
pub struct KindFigures {
    pub faults: usize,
    /// Voice interruption per affected client, ms: the worse of its two directions (what the
    /// checks use).
    pub udp_ms: Percentiles,
    /// Downstream voice alone (server → client, sealed by the cluster), and upstream alone, ms.
    pub udp_down_ms: Percentiles,
    pub udp_up_ms: Percentiles,
    /// TCP bulk: longest time without progress, ms, for the affected flows.
    pub tcp_stall_ms: Percentiles,
    /// Voice packets lost (both ways) by the affected clients in the faults' windows.
    pub packets_lost: u64,
    /// Affected clients that lost nothing / all affected.
    pub lossless: usize,
    pub affected: usize,
    #[serde(skip)]
    pub udp_samples: Vec<f64>,
    #[serde(skip)]
    pub udp_down_samples: Vec<f64>,
    #[serde(skip)]
    pub udp_up_samples: Vec<f64>,
    #[serde(skip)]
    pub tcp_samples: Vec<f64>,
}

/// The invariants, over the whole run.
#[derive(Debug, Default, Serialize)]
pub struct Invariants {
    /// ESP packets the capture saw, and the (destination, SPI) pairs.
    pub esp_packets: u64,
    pub spis: usize,
    /// ESP packets the cluster sent its clients, as captured, against the voice packets the
    /// clients received from the server: fewer captured than delivered means the capture
    /// missed packets (and the nonce-reuse check saw less than everything).
    pub esp_from_cluster: u64,
    pub voice_delivered_down: u64,
    /// (SPI, sequence number) seen twice: nonce reuse. Each with both packets' times and
    /// senders.
    pub nonce_reuse: Vec<String>,
    /// Packets the clients' anti-replay dropped (ours: the data plane's counter).
    pub client_replay_drops: u64,
    /// Voice packets a client received twice (what anti-replay must stop).
    pub duplicates_delivered: u64,
    /// Clients that ran more than one IKE_AUTH, or whose IKE SPIs changed.
    pub reauthenticated: Vec<String>,
    /// Clients whose IKE SA closed, or a DPD failed.
    pub failed_dpds: Vec<String>,
    /// Clients whose inner address changed.
    pub inner_address_changed: Vec<String>,
    /// Affected clients whose traffic never flowed again after a fault.
    pub not_resumed: Vec<String>,
}

/// The call-quality experiment.
#[derive(Debug, Serialize)]
pub struct CallFigures {
    pub seconds: u64,
    /// With the owner of its SA SIGKILLed in the middle.
    pub with_failover: CallQuality,
    /// Another client's call over the same time, untouched.
    pub without: CallQuality,
    pub mos_drop: f64,
    pub interruption_ms: f64,
}

/// The call experiment as it ran: the client whose SA's owner was killed mid-call, the one
/// beside it, and the call's time.
#[derive(Clone, Copy, Debug)]
struct CallRun {
    with: usize,
    without: usize,
    start_ms: f64,
    end_ms: f64,
}

/// What the capture counts while it runs.
#[derive(Debug, Default)]
struct Wire {
    repeats: RepeatFinder,
    /// Downstream ESP packets per (sender MAC, 10 ms bin).
    bins: BTreeMap<([u8; 6], u64), u32>,
}

impl Wire {
    fn see(&mut self, packet: EspPacket) {
        if packet.src == CLUSTER {
            let bin = (packet.at.as_secs_f64() * 1e3 / BIN_MS) as u64;
            *self.bins.entry((packet.src_mac, bin)).or_default() += 1;
        }
        self.repeats.see(packet);
    }
}

fn ike_settings(identities: &[String]) -> IkeSettings {
    let (net, len) = TRUSTED_NET;
    IkeSettings {
        local_id: GATEWAY_ID.into(),
        psk: identities
            .iter()
            .map(|id| PskSetting {
                peer: id.clone(),
                secret: PskSecret::new(PSK),
                remote_ts: None,
            })
            .collect(),
        pool: Some(POOL.into()),
        local_ts: vec![format!("{net}/{len}")],
        // The cluster checks its clients while their ESP flows.
        dpd_s: 5,
        ..IkeSettings::default()
    }
}

/// Finds a binary next to this one, or takes the one given.
fn binary(
    explicit: Option<&std::path::Path>,
    name: &str,
    package: &str,
) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has no directory")?
            .join(name),
    };
    anyhow::ensure!(
        path.is_file(),
        "no {name} binary at {}; build it (cargo build --release -p {package})",
        path.display()
    );
    Ok(path)
}

impl Args {
    /// The options `evpc-chaos tunnels` runs with when given none.
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: Args,
        }
        <Wrapper as clap::Parser>::parse_from(["tunnels"]).args
    }
}

/// Runs the campaign and prints its report; `Ok(false)` if a check failed.
pub async fn run(args: Args, node_bin: PathBuf) -> anyhow::Result<bool> {
    let report = campaign(&args, node_bin).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(report.checks_passed)
}

/// Runs the campaign `args` describe and returns its report (the HTML one written).
pub async fn campaign(args: &Args, node_bin: PathBuf) -> anyhow::Result<Report> {
    anyhow::ensure!(
        is_root(),
        "tunnels needs root (network namespaces, TUN devices, tcpdump, nftables)"
    );
    anyhow::ensure!((3..=7).contains(&args.nodes), "--nodes 3 to 7");
    let client_bin = match args.clients {
        0 => PathBuf::new(),
        _ => binary(args.client_bin.as_deref(), "evpc-client", "evpc-client")?,
    };
    let swan_clients =
        args.swan_clients
            .unwrap_or(if evpc_testkit::swan::missing_prerequisite().is_none() {
                4
            } else {
                0
            });
    if swan_clients > 0
        && let Some(why) = evpc_testkit::swan::missing_prerequisite()
    {
        anyhow::bail!("strongSwan clients asked for, but {why}");
    }
    let kinds: Vec<(Kind, usize)> = (0..swan_clients)
        .map(|i| (Kind::Strongswan, i))
        .chain((0..args.clients).map(|i| (Kind::Evpc, i)))
        .collect();
    let identities: Vec<String> = kinds
        .iter()
        .map(|(k, i)| clients::identity(*k, *i))
        .collect();
    let by_identity: BTreeMap<String, usize> = identities
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();

    // 1. The lab.
    let mut spec = LabSpec::new(args.nodes, "tun", node_bin, ike_settings(&identities));
    spec.trusted = true;
    spec.edge = true;
    spec.log_filter = args.node_log.clone();
    spec.keep_dir = args.keep_logs;
    let mut lab = Lab::start(spec).await?;
    let progress = Progress::new(args.json);
    progress.say(format!(
        "lab: {} nodes, {} strongSwan and {} evpc clients",
        args.nodes, swan_clients, args.clients
    ));

    // 2. The capture on the edge's cluster port.
    let wire = Arc::new(Mutex::new(Wire::default()));
    let capture = {
        let wire = wire.clone();
        let edge = lab
            .edge_ns()
            .context("the lab has an edge")?
            .name()
            .to_owned();
        Capture::stream(Some(&edge), "e0", move |p| {
            wire.lock().unwrap_or_else(|e| e.into_inner()).see(p)
        })?
    };
    let mut macs = node_macs(&lab)?;

    // 3. The clients.
    let dir = lab.dir().join("clients");
    std::fs::create_dir_all(&dir)?;
    let setup = Setup {
        dir: &dir,
        psk: PSK,
        client_bin: &client_bin,
    };
    let mut running = Vec::new();
    for (index, (kind, _)) in kinds.iter().enumerate() {
        let host = lab.add_client()?;
        debug_assert_eq!(host, index);
        running.push(Client::start(
            index,
            *kind,
            &identities[index],
            lab.client_host(host),
            &setup,
        )?);
    }
    let deadline = Instant::now() + Duration::from_secs(60 + kinds.len() as u64 / 4);
    let mut inner = Vec::with_capacity(running.len());
    for client in &mut running {
        client.initiate(Duration::from_secs(30))?;
        match client.wait_established(deadline) {
            Ok(addr) => inner.push(addr),
            // A tunnel that never came up is a bug to chase: what the nodes and the client said
            // goes with the error (the lab and its logs go when this returns).
            Err(e) => return Err(e.context(setup_logs(&lab, args.nodes, &dir.join(&client.id)))),
        }
    }
    progress.say(format!("{} tunnels up", running.len()));

    // 4. Traffic in every tunnel.
    let call_clients = pick_call_clients(&lab, &by_identity, running.len()).await?;
    let ends: Vec<ClientEnd<'_>> = inner
        .iter()
        .enumerate()
        .map(|(i, addr)| ClientEnd {
            ns: &lab.client_host(i).ns,
            inner: *addr,
            bulk: i < args.bulk,
            call: call_clients.is_some_and(|(a, b)| i == a || i == b),
        })
        .collect();
    let server = lab.server_ns().context("the lab has a server")?;
    let traffic = Traffic::start(server, &ends)?;
    drop(ends);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // 5. The faults.
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut plan = Vec::new();
    for _ in 0..args.rounds {
        let mut round = args.faults.clone();
        if !args.in_order {
            round.shuffle(&mut rng);
        }
        plan.extend(round);
    }
    let bar = progress.bar(plan.len() as u64, "faults");
    let faults_view = faults::Clients {
        by_identity: &by_identity,
    };
    let mut injected = Vec::new();
    for kind in plan {
        if let Some(bar) = &bar {
            bar.set_message(kind.name());
        }
        let fault = faults::inject(&mut lab, kind, &faults_view, &traffic, &mut rng)
            .await
            .with_context(|| format!("fault {}", kind.name()))?;
        injected.push(fault);
        // A node an add-node fault started sends too: name its packets.
        for id in lab.alive_ids() {
            if !macs.values().any(|known| *known == id) {
                macs.insert(node_mac(&lab, id)?, id);
            }
        }
        if let Some(bar) = &bar {
            bar.inc(1);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // 6. The call with one failover in its middle.
    let call_window = match (call_clients, args.call_s) {
        (Some((with, _)), s) if s > 0 => {
            progress.say(format!("a {s} s call with its owner killed in the middle"));
            let start = now_ms();
            tokio::time::sleep(Duration::from_secs(s / 2)).await;
            let view = faults::Clients {
                by_identity: &by_identity,
            };
            let killed = call_failover(&mut lab, &view, with, &traffic).await?;
            progress.say(format!("killed node {killed} mid-call"));
            let elapsed = Duration::from_secs_f64(((now_ms() - start) / 1e3).max(0.0));
            tokio::time::sleep(Duration::from_secs(s).saturating_sub(elapsed)).await;
            Some((start, now_ms()))
        }
        _ => None,
    };

    // 7. Stop, read everything.
    let measured = traffic.stop();
    let seen: Vec<Seen> = running.into_iter().map(Client::finish).collect();
    capture.stop()?;
    let wire = std::mem::take(&mut *wire.lock().unwrap_or_else(|e| e.into_inner()));
    let report = evaluate(
        args,
        swan_clients,
        &identities,
        &inner,
        &seen,
        &measured,
        injected,
        call_clients
            .zip(call_window)
            .map(|((with, without), (start_ms, end_ms))| CallRun {
                with,
                without,
                start_ms,
                end_ms,
            }),
        &wire,
        &macs,
    )?;
    let report = write_report(report, args, &wire, &macs, &measured)?;
    drop(lab);
    Ok(report)
}

/// Each node's MAC on the cluster segment: who sent a captured packet.
fn node_macs(lab: &Lab) -> anyhow::Result<BTreeMap<[u8; 6], u64>> {
    let mut macs = BTreeMap::new();
    for id in lab.alive_ids() {
        macs.insert(node_mac(lab, id)?, id);
    }
    Ok(macs)
}

/// Node `id`'s MAC on the cluster segment (`ip -br link`: name, state, address).
fn node_mac(lab: &Lab, id: u64) -> anyhow::Result<[u8; 6]> {
    let ns = lab.node_ns(id).name();
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-br", "link", "show", "dev", "n0"])
        .output()
        .context("ip link show")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = text
        .split_whitespace()
        .nth(2)
        .with_context(|| format!("no MAC for node {id}'s n0 in `{text}`"))?;
    let mut mac = [0u8; 6];
    for (i, part) in field.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(part, 16)?;
    }
    Ok(mac)
}

/// Two clients for the call experiment: SAs on two different nodes, neither the leader.
async fn pick_call_clients(
    lab: &Lab,
    by_identity: &BTreeMap<String, usize>,
    clients: usize,
) -> anyhow::Result<Option<(usize, usize)>> {
    if clients < 2 {
        return Ok(None);
    }
    let mut admin = lab.admin()?;
    let leader = admin.follow_leader().await?.leader_id;
    let mut first: Option<(usize, u64)> = None;
    for sa in admin.all_sas(None).await? {
        let Some(&c) = by_identity.get(&sa.peer_id) else {
            continue;
        };
        if Some(sa.owner) == leader {
            continue;
        }
        match first {
            None => first = Some((c, sa.owner)),
            Some((a, owner)) if owner != sa.owner => return Ok(Some((a, c))),
            Some(_) => {}
        }
    }
    Ok(None)
}

/// Kills the node owning client `with`'s SA (mid-call), waits for its stream, restarts it.
async fn call_failover(
    lab: &mut Lab,
    clients: &faults::Clients<'_>,
    with: usize,
    traffic: &Traffic,
) -> anyhow::Result<u64> {
    let mut admin = lab.admin()?;
    admin.follow_leader().await?;
    let owner = admin
        .all_sas(None)
        .await?
        .into_iter()
        .find(|sa| clients.by_identity.get(&sa.peer_id) == Some(&with))
        .map(|sa| sa.owner)
        .context("the call's SA is gone")?;
    let at = now_ms();
    lab.sigkill(owner).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !traffic.down(with).last_ms.is_some_and(|l| l > at + 50.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lab.restart(owner)?;
    faults::wait_whole(lab, Duration::from_secs(60)).await?;
    Ok(owner)
}

/// The E-model's rating of the call a stream carried between `start` and `end`: every packet
/// sent in the window, with its arrival or none (numbers missing between those received were
/// sent on the stream's clock, 20 ms apart).
fn call_quality(stream: &traffic::StreamStats, start: f64, end: f64) -> CallQuality {
    use crate::report::emodel::{CallSample, EmodelInput, assess};
    let received: BTreeMap<u64, (f64, f64)> = stream
        .samples
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|(_, sent, _)| *sent >= start && *sent <= end)
        .map(|(seq, sent, at)| (*seq, (*sent, *at)))
        .collect();
    let (Some((&first, &(first_sent, _))), Some(&last)) =
        (received.first_key_value(), received.keys().next_back())
    else {
        return assess(&EmodelInput::g711(Vec::new()));
    };
    let samples = (first..=last)
        .map(|seq| match received.get(&seq) {
            Some(&(sent, at)) => CallSample {
                sent_at_ms: sent,
                received_at_ms: Some(at),
            },
            None => CallSample {
                sent_at_ms: first_sent + (seq - first) as f64 * SPACING_MS,
                received_at_ms: None,
            },
        })
        .collect();
    assess(&EmodelInput::g711(samples))
}

/// The window in which a fault's effect on a client is measured.
fn window(f: &Injected) -> (f64, f64) {
    if f.kind.planned() {
        (f.at_ms, f.healed_ms)
    } else {
        (f.at_ms, f.recovered_ms + 500.0)
    }
}

#[allow(clippy::too_many_arguments)]
fn evaluate(
    args: &Args,
    swan_clients: usize,
    identities: &[String],
    inner: &[Ipv4Addr],
    seen: &[Seen],
    measured: &Measured,
    faults: Vec<Injected>,
    call: Option<CallRun>,
    wire: &Wire,
    _macs: &BTreeMap<[u8; 6], u64>,
) -> anyhow::Result<Report> {
    let mut by_kind: BTreeMap<String, KindFigures> = BTreeMap::new();
    for f in &faults {
        let figures = by_kind.entry(f.kind.name().into()).or_default();
        figures.faults += 1;
        let (from, to) = window(f);
        for &c in &f.affected {
            let down = measured.down[c].interruption_ms(from, to);
            let up = measured.up[c].interruption_ms(from, to);
            if args.verbose && (down > 0.0 || up > 0.0) {
                let gaps = |s: &traffic::StreamStats| -> Vec<(f64, f64)> {
                    s.gaps
                        .iter()
                        .filter(|g| g.to_ms >= from && g.from_ms <= to)
                        .map(|g| (g.from_ms - f.at_ms, g.ms()))
                        .collect()
                };
                eprintln!(
                    "tunnels: {} at {:.0}: {}: down {:?} up {:?} (gap start after the fault, length, ms)",
                    f.kind.name(),
                    f.at_ms,
                    identities[c],
                    gaps(&measured.down[c]),
                    gaps(&measured.up[c])
                );
            }
            figures.udp_samples.push(down.max(up));
            figures.udp_down_samples.push(down);
            figures.udp_up_samples.push(up);
            let lost = measured.down[c].lost_in(from, to) + measured.up[c].lost_in(from, to);
            figures.packets_lost += lost;
            figures.affected += 1;
            if lost == 0 {
                figures.lossless += 1;
            }
            if let Some(Some(bulk)) = measured.bulk.get(c) {
                figures.tcp_samples.push(bulk.stall_ms(from, to));
            }
        }
    }
    for figures in by_kind.values_mut() {
        let ms = |v: &[f64]| {
            let mut v = v.to_vec();
            Percentiles::of_ms(&mut v)
        };
        figures.udp_ms = ms(&figures.udp_samples);
        figures.udp_down_ms = ms(&figures.udp_down_samples);
        figures.udp_up_ms = ms(&figures.udp_up_samples);
        figures.tcp_stall_ms = ms(&figures.tcp_samples);
    }

    let mut inv = Invariants {
        esp_packets: wire.repeats.packets(),
        spis: wire.repeats.spis(),
        esp_from_cluster: wire.bins.values().map(|c| u64::from(*c)).sum(),
        voice_delivered_down: measured.down.iter().map(|s| s.received).sum(),
        nonce_reuse: wire
            .repeats
            .repeats()
            .iter()
            .map(ToString::to_string)
            .collect(),
        ..Invariants::default()
    };
    for (i, s) in seen.iter().enumerate() {
        let who = &identities[i];
        inv.client_replay_drops += s.replay_drops;
        if s.ike_auths != 1
            || s.spis_at_end
                .as_ref()
                .is_some_and(|e| Some(e) != s.spis.as_ref())
        {
            inv.reauthenticated.push(format!(
                "{who}: {} IKE_AUTH, SPIs {:?} then {:?}",
                s.ike_auths, s.spis, s.spis_at_end
            ));
        }
        if s.dpds_failed > 0 || s.closed.is_some() {
            inv.failed_dpds.push(format!(
                "{who}: {} DPDs failed, closed: {:?}",
                s.dpds_failed, s.closed
            ));
        }
        if s.inner_at_end.is_some_and(|a| a != inner[i]) {
            inv.inner_address_changed
                .push(format!("{who}: {} then {:?}", inner[i], s.inner_at_end));
        }
    }
    inv.duplicates_delivered = measured.down.iter().map(|s| s.duplicates).sum();
    for f in &faults {
        for c in &f.not_resumed {
            inv.not_resumed.push(format!(
                "{} after {} at {:.0}",
                identities[*c],
                f.kind.name(),
                f.at_ms
            ));
        }
    }

    let call = match call {
        Some(CallRun {
            with,
            without,
            start_ms: start,
            end_ms: end,
        }) => {
            let with_failover = call_quality(&measured.down[with], start, end);
            let without_q = call_quality(&measured.down[without], start, end);
            Some(CallFigures {
                seconds: args.call_s,
                mos_drop: ((without_q.mos - with_failover.mos) * 1000.0).round() / 1000.0,
                interruption_ms: measured.down[with].interruption_ms(start, end),
                with_failover,
                without: without_q,
            })
        }
        None => None,
    };

    let mut failures = Vec::new();
    let mut fail_if = |bad: bool, what: String| {
        if bad {
            failures.push(what);
        }
    };
    fail_if(
        inv.esp_from_cluster < inv.voice_delivered_down,
        format!(
            "the capture saw {} ESP packets from the cluster, fewer than the {} voice packets \
             the clients received: it missed some",
            inv.esp_from_cluster, inv.voice_delivered_down
        ),
    );
    fail_if(
        !inv.nonce_reuse.is_empty(),
        format!(
            "{} (SPI, sequence number) sent twice",
            inv.nonce_reuse.len()
        ),
    );
    fail_if(
        inv.client_replay_drops > 0,
        format!(
            "{} packets dropped by clients' anti-replay",
            inv.client_replay_drops
        ),
    );
    fail_if(
        !inv.reauthenticated.is_empty(),
        format!("{} clients re-authenticated", inv.reauthenticated.len()),
    );
    fail_if(
        !inv.failed_dpds.is_empty(),
        format!(
            "{} clients with a failed DPD or a closed IKE SA",
            inv.failed_dpds.len()
        ),
    );
    fail_if(
        !inv.inner_address_changed.is_empty(),
        format!(
            "{} clients changed inner address",
            inv.inner_address_changed.len()
        ),
    );
    fail_if(
        !inv.not_resumed.is_empty(),
        format!(
            "{} affected clients never flowed again",
            inv.not_resumed.len()
        ),
    );
    let p99 = |k: FaultKind| by_kind.get(k.name()).map(|f| f.udp_ms.p99);
    if let Some(p) = p99(FaultKind::KillOwner) {
        fail_if(
            p > args.max_kill_owner_p99_ms,
            format!(
                "kill-owner interruption p99 {p} ms > {} ms",
                args.max_kill_owner_p99_ms
            ),
        );
    }
    if let Some(p) = p99(FaultKind::KillLeader) {
        fail_if(
            p > args.max_kill_leader_p99_ms,
            format!(
                "kill-leader interruption p99 {p} ms > {} ms",
                args.max_kill_leader_p99_ms
            ),
        );
    }
    if let Some(f) = by_kind.get(FaultKind::Transfer.name()) {
        fail_if(
            f.udp_ms.p99 > args.max_transfer_p99_ms,
            format!(
                "transfer interruption p99 {} ms > {} ms",
                f.udp_ms.p99, args.max_transfer_p99_ms
            ),
        );
        let share = f.lossless as f64 / f.affected.max(1) as f64;
        fail_if(
            share < args.min_lossless_transfers,
            format!(
                "{:.1}% of transfers lost nothing (at least {:.0}%)",
                share * 100.0,
                args.min_lossless_transfers * 100.0
            ),
        );
    }
    if let Some(c) = &call {
        fail_if(
            c.mos_drop > args.max_mos_drop,
            format!(
                "the call with a failover lost {} MOS (at most {})",
                c.mos_drop, args.max_mos_drop
            ),
        );
    }
    Ok(Report {
        command: "tunnels",
        date: crate::ike_bench::utc_now(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        nodes: args.nodes,
        clients: BTreeMap::from([
            ("strongswan".to_string(), swan_clients),
            ("evpc".to_string(), args.clients),
        ]),
        faults,
        by_kind,
        invariants: inv,
        call,
        checks_passed: failures.is_empty(),
        failures,
        html: None,
    })
}

/// Writes the HTML report next to the JSON one; returns the report with its path.
fn write_report(
    mut report: Report,
    args: &Args,
    wire: &Wire,
    macs: &BTreeMap<[u8; 6], u64>,
    _measured: &Measured,
) -> anyhow::Result<Report> {
    let html = crate::report::html::render_html(&to_html_model(&report, args, wire, macs));
    std::fs::write(&args.report, html)
        .with_context(|| format!("writing {}", args.report.display()))?;
    report.html = Some(args.report.clone());
    Ok(report)
}

fn to_html_model(
    report: &Report,
    args: &Args,
    wire: &Wire,
    macs: &BTreeMap<[u8; 6], u64>,
) -> crate::report::TunnelsReport {
    use crate::report::{
        CallRow, FaultSeries, FaultTableRow, InvariantRow, NodeSeries, PaperFigure, Protocol,
        Spread, SummaryRow, Timeline, TunnelsReport,
    };
    let row = |label: &str, value: String| SummaryRow {
        label: label.into(),
        value,
    };
    let inv = &report.invariants;
    let invariant = |name: &str, list: &[String]| InvariantRow {
        name: name.into(),
        value: list.len().to_string(),
        passed: list.is_empty(),
        detail: list.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
    };
    let target = |kind: &str| match kind {
        "kill-owner" => Some(args.max_kill_owner_p99_ms),
        "kill-leader" => Some(args.max_kill_leader_p99_ms),
        "transfer" => Some(args.max_transfer_p99_ms),
        _ => None,
    };
    let mut interruptions = Vec::new();
    let mut per_fault = Vec::new();
    for (kind, f) in &report.by_kind {
        interruptions.push(FaultSeries {
            kind: kind.clone(),
            protocol: Protocol::Udp,
            samples_ms: f.udp_samples.clone(),
            target_p99_ms: target(kind),
        });
        interruptions.push(FaultSeries {
            kind: kind.clone(),
            protocol: Protocol::Tcp,
            samples_ms: f.tcp_samples.clone(),
            target_p99_ms: None,
        });
        per_fault.push(FaultTableRow {
            kind: kind.clone(),
            count: f.faults,
            udp: Spread::of(&f.udp_samples),
            tcp: Spread::of(&f.tcp_samples),
            packets_lost: f.packets_lost,
            zero_loss_pct: (f.affected > 0).then(|| 100.0 * f.lossless as f64 / f.affected as f64),
        });
    }
    let paper = [
        ("transfer", Protocol::Udp, 1_330.0, "paper TM"),
        ("transfer", Protocol::Tcp, 1_700.0, "paper TM"),
        ("kill-owner", Protocol::Udp, 1_510.0, "paper HA"),
        ("kill-owner", Protocol::Tcp, 2_370.0, "paper HA"),
    ]
    .into_iter()
    .map(|(kind, protocol, ms, label)| PaperFigure {
        kind: kind.into(),
        protocol,
        ms,
        label: label.into(),
    })
    .collect();
    // One fault of each kind: packets the cluster sent its clients per node per 10 ms.
    let mut timelines = Vec::new();
    let mut drawn = std::collections::BTreeSet::new();
    for f in &report.faults {
        if !drawn.insert(f.kind) {
            continue;
        }
        let start = f.at_ms - 300.0;
        let end = (f.recovered_ms + 700.0)
            .min(f.at_ms + 5_000.0)
            .max(f.at_ms + 1_000.0);
        let (first_bin, last_bin) = ((start / BIN_MS) as u64, (end / BIN_MS) as u64);
        let mut nodes: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for ((mac, bin), count) in wire.bins.range(([0; 6], first_bin)..) {
            if *bin < first_bin || *bin > last_bin {
                continue;
            }
            let series = nodes
                .entry(mac_label(mac, macs))
                .or_insert_with(|| vec![0; (last_bin - first_bin + 1) as usize]);
            series[(bin - first_bin) as usize] += count;
        }
        timelines.push(Timeline {
            label: format!(
                "{}{}",
                f.kind.name(),
                f.node.map(|n| format!(" (node {n})")).unwrap_or_default()
            ),
            kind: f.kind.name().into(),
            bin_ms: BIN_MS,
            start_ms: 0.0,
            fault_at_ms: f.at_ms - first_bin as f64 * BIN_MS,
            recovered_at_ms: Some(f.recovered_ms - first_bin as f64 * BIN_MS),
            nodes: nodes
                .into_iter()
                .map(|(node, packets)| NodeSeries { node, packets })
                .collect(),
            streams: Vec::new(),
        });
    }
    let calls = report
        .call
        .iter()
        .flat_map(|c| {
            [
                CallRow {
                    label: format!("{} s call, no fault", c.seconds),
                    fault: None,
                    quality: c.without,
                },
                CallRow {
                    label: format!(
                        "{} s call, its owner SIGKILLed halfway ({:.0} ms interruption)",
                        c.seconds, c.interruption_ms
                    ),
                    fault: Some("kill-owner".into()),
                    quality: c.with_failover,
                },
            ]
        })
        .collect();
    TunnelsReport {
        title: "evpc: real tunnels under fire".into(),
        date: report.date.clone(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: format!("{} cores", report.cores),
        topology: format!(
            "{} evpc nodes (ClusterIP, userspace ESP) between a server on the trusted side and \
             {} strongSwan + {} evpc clients behind an edge router, each client in its own \
             network namespace; voice (50 × 172 B/s) both ways in every tunnel, TCP bulk to {}",
            report.nodes,
            report.clients.get("strongswan").copied().unwrap_or(0),
            report.clients.get("evpc").copied().unwrap_or(0),
            args.bulk
        ),
        summary: vec![
            row("nodes", report.nodes.to_string()),
            row(
                "clients (strongSwan / evpc)",
                format!(
                    "{} / {}",
                    report.clients.get("strongswan").copied().unwrap_or(0),
                    report.clients.get("evpc").copied().unwrap_or(0)
                ),
            ),
            row("faults", report.faults.len().to_string()),
            row(
                "ESP packets checked on the wire",
                format!(
                    "{} over {} SPIs ({} from the cluster; its clients received {} voice packets)",
                    inv.esp_packets, inv.spis, inv.esp_from_cluster, inv.voice_delivered_down
                ),
            ),
            row(
                "result",
                if report.checks_passed {
                    "every check passed".into()
                } else {
                    report.failures.join("; ")
                },
            ),
        ],
        invariants: vec![
            invariant(
                "(SPI, sequence number) sent twice (nonce reuse)",
                &inv.nonce_reuse,
            ),
            InvariantRow {
                name: "packets dropped by a client's anti-replay".into(),
                value: inv.client_replay_drops.to_string(),
                passed: inv.client_replay_drops == 0,
                detail: String::new(),
            },
            InvariantRow {
                name: "voice packets delivered twice".into(),
                value: inv.duplicates_delivered.to_string(),
                passed: inv.duplicates_delivered == 0,
                detail: String::new(),
            },
            invariant("IKE SAs re-established", &inv.reauthenticated),
            invariant("failed DPDs, closed IKE SAs", &inv.failed_dpds),
            invariant("inner addresses changed", &inv.inner_address_changed),
            invariant("affected clients that never flowed again", &inv.not_resumed),
        ],
        interruptions,
        paper,
        timelines,
        calls,
        per_fault,
    }
}

fn print_table(report: &Report) {
    println!(
        "{:<16} {:>6} {:>9} {:>10} {:>10} {:>10} {:>10} {:>8} {:>10}",
        "fault",
        "faults",
        "affected",
        "UDP p50",
        "UDP p99",
        "UDP max",
        "TCP p99",
        "lost",
        "lossless"
    );
    for (kind, f) in &report.by_kind {
        println!(
            "{:<16} {:>6} {:>9} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8} {:>10}",
            kind,
            f.faults,
            f.affected,
            f.udp_ms.p50,
            f.udp_ms.p99,
            f.udp_ms.max,
            f.tcp_stall_ms.p99,
            f.packets_lost,
            format!("{}/{}", f.lossless, f.affected)
        );
    }
    let inv = &report.invariants;
    println!(
        "wire: {} ESP packets over {} SPIs ({} from the cluster, {} voice delivered), {} sent twice; client anti-replay drops {}; re-authenticated {}; failed DPDs {}; inner address changed {}; not resumed {}",
        inv.esp_packets,
        inv.spis,
        inv.esp_from_cluster,
        inv.voice_delivered_down,
        inv.nonce_reuse.len(),
        inv.client_replay_drops,
        inv.reauthenticated.len(),
        inv.failed_dpds.len(),
        inv.inner_address_changed.len(),
        inv.not_resumed.len()
    );
    if let Some(c) = &report.call {
        println!(
            "call: {} s, MOS {:.2} with a failover ({:.0} ms interruption) vs {:.2} without: drop {:.3}",
            c.seconds, c.with_failover.mos, c.interruption_ms, c.without.mos, c.mos_drop
        );
    }
    if let Some(html) = &report.html {
        println!("report: {}", html.display());
    }
    for f in &report.failures {
        println!("FAILED: {f}");
    }
}

/// Prints progress lines, or a bar on a terminal (nothing with `--json`).
struct Progress {
    quiet: bool,
}

impl Progress {
    fn new(quiet: bool) -> Progress {
        Progress { quiet }
    }

    fn say(&self, line: String) {
        if !self.quiet {
            eprintln!("tunnels: {line}");
        }
    }

    fn bar(&self, len: u64, what: &str) -> Option<indicatif::ProgressBar> {
        if self.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            self.say(format!("{len} {what}"));
            return None;
        }
        let bar = indicatif::ProgressBar::new(len);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} {pos}/{len} {wide_bar} {elapsed_precise} {msg}",
        ) {
            bar.set_style(style);
        }
        Some(bar)
    }
}

fn mac_label(mac: &[u8; 6], macs: &BTreeMap<[u8; 6], u64>) -> String {
    macs.get(mac)
        .map_or_else(|| format_mac(mac), |id| format!("node {id}"))
}

/// The last lines of every node's log and of a client's, for a setup that failed.
fn setup_logs(lab: &Lab, nodes: u64, client_dir: &Path) -> String {
    const LINES: usize = 40;
    let tail = |text: &str| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LINES)..].join("\n")
    };
    let mut out = String::from("the tunnel did not come up; the logs' last lines follow");
    for id in 1..=nodes {
        out.push_str(&format!("\n--- node {id}:\n{}", tail(&lab.log(id))));
    }
    for file in ["stderr.log", "events.jsonl"] {
        let text = std::fs::read_to_string(client_dir.join(file)).unwrap_or_default();
        out.push_str(&format!("\n--- client {file}:\n{}", tail(&text)));
    }
    out
}
