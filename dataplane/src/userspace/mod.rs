//! # The userspace backend: ESP-in-UDP (RFC 3948) on the cluster address ↔ a TUN device
//!
//! [`UserspaceDriver`] runs every child SA the node `start`s in this process, with the sans-IO
//! ESP engine of `evpc-esp` (AES-GCM-16, RFC 4106; ESN, RFC 4303 §2.2.1; anti-replay,
//! RFC 4303 §3.4.3). It needs no kernel IPsec at all, only a TUN device and UDP sockets.
//!
//! ```text
//!                 peer ⇄ UDP 4500 on the cluster address (one socket, RFC 3948)
//!                        │                                          ▲
//!   ┌── inbound worker ──▼──────────────────────┐     ┌── outbound worker ──┴─────────────────┐
//!   │ recvmmsg (≤ 64 datagrams, UDP GRO)        │     │ read TUN (≤ 64 packets, non-blocking) │
//!   │ fence gate open? (else count, drop ESP)   │     │   a TCP super-packet (TSO, ≤ 64 KiB)? │
//!   │ classify (RFC 3948 §2):                   │     │   cut into segments, one a buffer     │
//!   │   0xff → NAT-keepalive, ignored           │     │ fence gate open? (else count, drop)   │
//!   │   0x00000000 → IKE → node's channel       │     │ Flow::parse → child whose ts_remote   │
//!   │   else ESP: SPI → child (else count       │     │   holds dst and ts_local holds src    │
//!   │     unknown_spi: another node's SA)       │     │   most specific; none: no_child, drop │
//!   │   open: replay window, ICV, trailer       │     │ seal_in_place under the lease         │
//!   │   inner packet inside the selectors?      │     │   (used up: count lease_waits, drop)  │
//!   │ coalesce consecutive TCP segments of a    │     │ sendmmsg to each child's peer (runs   │
//!   │   flow into one GSO packet (GRO)          │     │   of equal sizes as one UDP GSO send) │
//!   │ write to TUN                              │     └───────────────────────────────────────┘
//!   └──────────────────────┬────────────────────┘                       ▲
//!                          ▼                                            │
//!        TUN device (IFF_TUN | IFF_NO_PI | IFF_VNET_HDR, TSO4/6 + CSUM) ── kernel routing
//!   UDP 500 (optional) ── IKE worker ── node's channel
//! ```
//!
//! ## Call order
//!
//! 1. The node installs its `metrics` recorder, then calls
//!    [`UserspaceDriver::new`]`(config, gate)`, which binds the sockets, creates and configures
//!    the TUN device in the calling thread's network namespace, starts the workers, and returns
//!    the driver and the [`IkeReceiver`] on which every IKE datagram arrives.
//! 2. The owner runtime calls [`SaDriver::start`] for each child it owns (refused with
//!    [`DriverError::Unsupported`] without keys, with a suite other than AES-GCM-16 128/256, or
//!    for plain ESP — `udp_encap: false` — since it only carries ESP in UDP),
//!    [`SaDriver::extend`] when it commits a higher `out_hwm`, [`SaDriver::counters`] to
//!    commit leases and replay checkpoints, and [`SaDriver::stop`] when the child moves away.
//! 3. The IKE engine answers with [`UserspaceDriver::send_ike`] on the port the request came in
//!    on.
//! 4. Dropping the driver (or [`UserspaceDriver::shutdown`]) stops the workers; the TUN device
//!    disappears with its routes.
//!
//! ## Guarantees
//!
//! - **Lease.** A packet is sealed only with a sequence number at or below the limit in force.
//!   When the lease is used up, the outbound packet is *dropped* and counted in `lease_waits`
//!   (per child and in the metric): it is not queued, as the node extends the lease at half use
//!   and a held packet would be stale by the time a lease that was not granted in time arrives.
//!   The next packet after `extend` goes out with the next number.
//! - **Fence.** Each batch checks [`FenceGate::is_open`] (and the driver's own
//!   [`SaDriver::set_fenced`] flag) before it seals or delivers anything; while closed, the
//!   workers keep draining the socket and the device and count `fenced_drops`, so nothing stale
//!   is left queued when the gate reopens. `set_fenced(true)` and `stop` return only after any
//!   batch already in flight has finished, so once they return nothing more is sent for the
//!   child (or at all).
//! - **Ownership.** Only started children are processed; ESP for any other SPI is dropped and
//!   counted (`unknown_spi`), since every node may see every packet for the cluster address.
//! - **No per-packet allocation** on the ESP paths: fixed buffers sealed and opened in place,
//!   one table snapshot and one lock per run of packets of the same child per batch.
//!
//! ## Performance
//!
//! One thread per direction with blocking I/O and batches of up to 64 packets. The kernel
//! batches on both sides ([`UserspaceConfig::offload`]). Outer datagrams: a run of equally
//! sized ESP packets to one peer leaves as one UDP GSO send (`UDP_SEGMENT`), and the receive
//! side asks for UDP GRO, so a train of datagrams from a peer arrives in one buffer that the
//! worker cuts at the segment size. Inner packets: the TUN device carries a `virtio_net_hdr`
//! (`IFF_VNET_HDR`) with checksum and TCP segmentation offloads, so the kernel's TCP stack
//! hands out super-packets of up to 64 KiB that the outbound worker cuts into MTU-sized
//! segments (each sealed as its own ESP packet, with its own sequence number), and the inbound
//! worker coalesces the opened TCP segments of a flow into one GSO write, so that the receiving
//! stack runs once per up to 64 KiB, not once per segment (`offload.rs`, as wireguard-go
//! does). UDP inner traffic still costs one TUN read and write per packet (no UDP segmentation
//! offload is asked for). See `evpc-chaos esp-bench` and `BENCHMARKS.md` for figures.

mod child;
mod offload;
mod tun;
pub mod udp;
mod worker;

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use metrics::Counter;

use self::child::{Activity, Child, Table};
pub use self::child::{ENCR_AES_GCM_16, esp_suite};
use self::tun::Tun;
pub use self::tun::{DEFAULT_MTU, TunConfig};
use crate::ike::{self, IkePort, IkeReceiver, IkeSender};
use crate::metrics::names;
use crate::{ChildCounters, ChildStart, DriverError, FenceGate, HandoverState, SaDriver};

/// The UDP port of ESP-in-UDP and NAT-T IKE (RFC 3948 §2, RFC 7296 §2.23).
pub const NATT_PORT: u16 = evpc_esp::udp_encap::PORT;
/// The UDP port of IKE (RFC 7296 §2).
pub const IKE_PORT: u16 = 500;

/// How the userspace backend is set up.
#[derive(Clone, Debug)]
pub struct UserspaceConfig {
    /// The cluster address the sockets bind to.
    pub cluster: IpAddr,
    /// Port of ESP-in-UDP and NAT-T IKE; [`NATT_PORT`] (0 picks a free port, for tests).
    pub natt_port: u16,
    /// Port of plain IKE, [`IKE_PORT`]; `None` to not listen for it.
    pub ike_port: Option<u16>,
    /// Bind the cluster address even if no interface of this host has it (`IP_FREEBIND`): the
    /// address may be moved onto this node later, or be delivered to it by a shared L2.
    pub freebind: bool,
    /// The TUN device of the inner traffic.
    pub tun: TunConfig,
    /// Inbound anti-replay window in packets (1 to 4096; RFC 4303 §3.4.3 asks for at least 32,
    /// 64 by default; reordering at high rates calls for more).
    pub replay_window: u32,
    /// `SO_RCVBUF` / `SO_SNDBUF` of the cluster socket in bytes (0: the system default).
    pub socket_buffer: usize,
    /// Depth of the IKE channel; datagrams beyond it are dropped (peers retransmit).
    pub ike_queue: usize,
    /// Let the kernel batch packets. The outer datagrams: UDP GSO when sending runs of
    /// equal-sized ESP packets to one peer (`UDP_SEGMENT`), UDP GRO when receiving (`UDP_GRO`).
    /// The inner packets: TUN segmentation offloads (`IFF_VNET_HDR`, `TUNSETOFFLOAD` with
    /// checksum and TCP segmentation offload): TCP super-packets of up to 64 KiB read from the
    /// device and cut here, consecutive TCP segments from a peer coalesced into one write. Each
    /// falls back to one packet at a time where the kernel or route does not support it.
    pub offload: bool,
}

impl UserspaceConfig {
    /// Defaults: ports 4500 and 500, `IP_FREEBIND`, a 1024-packet replay window, 4 MiB socket
    /// buffers.
    pub fn new(cluster: IpAddr, tun: TunConfig) -> UserspaceConfig {
        UserspaceConfig {
            cluster,
            natt_port: NATT_PORT,
            ike_port: Some(IKE_PORT),
            freebind: true,
            tun,
            replay_window: 1024,
            socket_buffer: 4 << 20,
            ike_queue: ike::DEFAULT_IKE_QUEUE,
            offload: true,
        }
    }
}

/// State shared by the driver's control calls and its workers.
#[derive(Debug)]
struct Shared {
    table: RwLock<Arc<Table>>,
    gate: Arc<FenceGate>,
    fenced: AtomicBool,
    shutdown: AtomicBool,
    /// Held by the inbound worker while it processes one batch.
    inbound_batch: Mutex<()>,
    /// Held by the outbound worker while it processes and sends one batch.
    outbound_batch: Mutex<()>,
    natt: UdpSocket,
    natt_local: SocketAddr,
    ike: Option<(UdpSocket, SocketAddr)>,
    tun: Tun,
    tun_name: String,
    ike_tx: IkeSender,
    ike_out: Counter,
    window_size: u32,
    offload: bool,
    offload_counters: OffloadCounters,
    activity: Arc<Activity>,
}

/// What the TUN offloads did, updated by the workers once per batch.
#[derive(Debug, Default)]
struct OffloadCounters {
    super_packets: AtomicU64,
    segments: AtomicU64,
    coalesced_writes: AtomicU64,
    coalesced_segments: AtomicU64,
}

/// What the TUN segmentation offloads have done since the driver started
/// ([`UserspaceDriver::tun_offloads`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunOffloads {
    /// TCP super-packets read from the device (GSO, up to 64 KiB each).
    pub super_packets: u64,
    /// The segments they were cut into (each sealed as one ESP packet).
    pub segments: u64,
    /// Coalesced writes: several TCP segments from a peer written as one GSO packet.
    pub coalesced_writes: u64,
    /// The segments those writes carried.
    pub coalesced_segments: u64,
}

impl Shared {
    fn snapshot(&self) -> Arc<Table> {
        Arc::clone(&self.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn is_open(&self) -> bool {
        !self.fenced.load(Ordering::Acquire) && self.gate.is_open()
    }

    /// Returns once neither worker is inside a batch it began before this call.
    fn wait_for_batches(&self) {
        drop(
            self.inbound_batch
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        drop(
            self.outbound_batch
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
    }
}

/// The userspace data plane. See the [module documentation](self).
#[derive(Debug)]
pub struct UserspaceDriver {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl UserspaceDriver {
    /// Binds the cluster sockets, creates the TUN device, starts the workers. Everything lives
    /// in the calling thread's network namespace. Needs `CAP_NET_ADMIN` (TUN) and, for ports
    /// below 1024, `CAP_NET_BIND_SERVICE`.
    pub fn new(
        config: UserspaceConfig,
        gate: Arc<FenceGate>,
    ) -> io::Result<(UserspaceDriver, IkeReceiver)> {
        if !(1..=evpc_esp::MAX_WINDOW_SIZE).contains(&config.replay_window) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "replay window {} is outside 1..={}",
                    config.replay_window,
                    evpc_esp::MAX_WINDOW_SIZE
                ),
            ));
        }
        let natt = udp::bind_udp(
            SocketAddr::new(config.cluster, config.natt_port),
            config.socket_buffer,
            config.freebind,
        )?;
        let natt_local = natt.local_addr()?;
        if config.offload && !udp::enable_gro(&natt) {
            tracing::info!("no UDP GRO on this kernel: receiving one datagram at a time");
        }
        let ike = match config.ike_port {
            Some(port) => {
                let socket =
                    udp::bind_udp(SocketAddr::new(config.cluster, port), 0, config.freebind)?;
                let local = socket.local_addr()?;
                Some((socket, local))
            }
            None => None,
        };
        let tun = tun::open(&config.tun.name, config.offload)?;
        tun::configure(&config.tun)?;
        let (ike_tx, ike_rx) = tokio::sync::mpsc::channel(config.ike_queue.max(1));
        let shared = Arc::new(Shared {
            table: RwLock::new(Arc::new(Table::default())),
            gate,
            fenced: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            inbound_batch: Mutex::new(()),
            outbound_batch: Mutex::new(()),
            natt,
            natt_local,
            ike,
            tun,
            tun_name: config.tun.name.clone(),
            ike_tx,
            ike_out: metrics::counter!(names::IKE_DATAGRAMS, "backend" => "userspace", "direction" => "out"),
            window_size: config.replay_window,
            offload: config.offload,
            offload_counters: OffloadCounters::default(),
            activity: Arc::default(),
        });
        let driver = UserspaceDriver {
            shared,
            workers: Mutex::new(Vec::new()),
        };
        // On an early return the driver is dropped, which stops what was already spawned.
        driver.spawn("in", worker::inbound)?;
        driver.spawn("out", worker::outbound)?;
        if driver.shared.ike.is_some() {
            driver.spawn("ike", worker::ike)?;
        }
        tracing::info!(
            natt = %driver.natt_addr(),
            ike = ?driver.ike_addr(),
            tun = %config.tun.name,
            tun_offloads = driver.shared.tun.offload(),
            "userspace data plane running"
        );
        Ok((driver, ike_rx))
    }

    /// Starts a worker thread named `<tun>-<role>` (what `top -H` shows, up to 15 bytes).
    fn spawn(&self, role: &str, work: fn(&Shared)) -> io::Result<()> {
        let shared = Arc::clone(&self.shared);
        let mut name = format!("{}-{role}", self.shared.tun_name);
        while name.len() > 15 {
            name.pop();
        }
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || work(&shared))?;
        self.workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
        Ok(())
    }

    /// The bound ESP-in-UDP / NAT-T address (useful with `natt_port: 0`).
    pub fn natt_addr(&self) -> SocketAddr {
        self.shared.natt_local
    }

    /// The bound plain-IKE address, if listening.
    pub fn ike_addr(&self) -> Option<SocketAddr> {
        self.shared.ike.as_ref().map(|(_, local)| *local)
    }

    /// The TUN device's name.
    pub fn tun_name(&self) -> &str {
        &self.shared.tun_name
    }

    /// What the TUN segmentation offloads did so far; `None` if they are off (not asked for,
    /// or refused by the kernel).
    pub fn tun_offloads(&self) -> Option<TunOffloads> {
        if !self.shared.tun.offload() {
            return None;
        }
        let c = &self.shared.offload_counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Some(TunOffloads {
            super_packets: get(&c.super_packets),
            segments: get(&c.segments),
            coalesced_writes: get(&c.coalesced_writes),
            coalesced_segments: get(&c.coalesced_segments),
        })
    }

    /// Sends an IKE message to `remote` from the cluster socket of `port`, behind the non-ESP
    /// marker on the NAT-T port (RFC 3948 §2.2). Not gated by the fence (see [`crate::ike`]).
    pub fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> io::Result<()> {
        let socket = match port {
            IkePort::NatT => &self.shared.natt,
            IkePort::Ike => match &self.shared.ike {
                Some((socket, _)) => socket,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotConnected,
                        "not listening on the IKE port (ike_port: None)",
                    ));
                }
            },
        };
        socket.send_to(&ike::frame(port, message), remote)?;
        self.shared.ike_out.increment(1);
        Ok(())
    }

    /// Stops the workers and waits for them. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        let workers =
            std::mem::take(&mut *self.workers.lock().unwrap_or_else(PoisonError::into_inner));
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a userspace data-plane worker panicked");
            }
        }
    }

    /// Children currently running.
    pub fn running(&self) -> Vec<u32> {
        self.shared.snapshot().spis().collect()
    }
}

impl Drop for UserspaceDriver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl UserspaceDriver {
    fn start_child(&self, child: ChildStart, standby: bool) -> Result<(), DriverError> {
        if child.peer.is_ipv4() != self.shared.natt_local.is_ipv4() {
            return Err(DriverError::Unsupported {
                in_spi: child.in_spi,
                reason: format!(
                    "peer {} and cluster socket {} are of different address families",
                    child.peer, self.shared.natt_local
                ),
            });
        }
        let new = Arc::new(Child::new(
            &child,
            self.shared.window_size,
            self.shared.activity.clone(),
            standby,
        )?);
        let mut table = self
            .shared
            .table
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if table.get(child.in_spi).is_some() {
            return Err(DriverError::AlreadyRunning(child.in_spi));
        }
        *table = Arc::new(table.with(new));
        tracing::debug!(
            in_spi = format_args!("{:08x}", child.in_spi),
            next_seq = child.next_seq,
            limit = child.limit,
            standby,
            "child started"
        );
        Ok(())
    }

    /// Takes child `in_spi` out of the table and returns it once no batch uses it any more:
    /// nothing of it is sent after this returns.
    fn remove(&self, in_spi: u32) -> Option<Arc<Child>> {
        let removed = {
            let mut table = self
                .shared
                .table
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let (next, removed) = table.without(in_spi)?;
            *table = Arc::new(next);
            removed
        };
        // A batch that took its snapshot before the swap may still be using the child.
        self.shared.wait_for_batches();
        Some(removed)
    }
}

impl SaDriver for UserspaceDriver {
    fn name(&self) -> &'static str {
        "userspace"
    }

    fn start(&self, child: ChildStart) -> Result<(), DriverError> {
        self.start_child(child, false)
    }

    fn start_standby(&self, child: ChildStart) -> Result<(), DriverError> {
        self.start_child(child, true)
    }

    fn hand_off(&self, in_spi: u32) -> Option<HandoverState> {
        let removed = self.remove(in_spi)?;
        let out = removed
            .outbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let inbound = removed
            .inbound
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        Some(HandoverState {
            highest_out: out.sa.highest_used(),
            inbound_accepted: inbound.accepted_in_window(),
            recent_out: out.recent(),
        })
    }

    fn hold(&self, in_spi: u32) -> bool {
        let table = self.shared.snapshot();
        let Some(child) = table.get(in_spi) else {
            return false;
        };
        let held = child.held.lock().unwrap_or_else(PoisonError::into_inner);
        child.standby.store(true, Ordering::Release);
        drop(held);
        // A batch that read the child as running before may still be sealing for it: once
        // it is through, nothing more leaves.
        self.shared.wait_for_batches();
        true
    }

    fn take_over(&self, in_spi: u32, previous: Option<&HandoverState>) -> bool {
        let table = self.shared.snapshot();
        let Some(child) = table.get(in_spi) else {
            return false;
        };
        // Held while the held packets go out: a worker that finds the child in standby waits
        // here, then processes its packet normally, after them — nothing overtakes.
        let mut held = child.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !child.standby.load(Ordering::Acquire) {
            return false;
        }
        let open = self.shared.is_open();
        let from_peer: Vec<Vec<u8>> = held.inbound.drain(..).collect();
        let to_peer: Vec<(Vec<u8>, evpc_esp::NextHeader)> = held.outbound.drain(..).collect();
        {
            let mut sa = child.inbound.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(previous) = previous {
                sa.absorb_accepted(&previous.inbound_accepted);
            }
            for mut esp in from_peer.into_iter().filter(|_| open) {
                if let child::OpenedPacket::Deliver(packet) = child.open(&mut sa, &mut esp) {
                    // one by one, behind an all-zero virtio-net header if offloads are on
                    let _ = self.shared.tun.write_packet(packet);
                }
            }
        }
        let skip = previous.map_or(0, |p| child::already_sealed(&to_peer, &p.recent_out));
        {
            let mut out = child
                .outbound
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (inner, next_header) in to_peer.into_iter().skip(skip).filter(|_| open) {
                let mut buffer =
                    vec![0u8; evpc_esp::SEAL_HEADROOM + inner.len() + evpc_esp::MAX_SEAL_TAILROOM];
                buffer[evpc_esp::SEAL_HEADROOM..evpc_esp::SEAL_HEADROOM + inner.len()]
                    .copy_from_slice(&inner);
                if let child::Sealed::Packet(len) =
                    child.seal(&mut out, &mut buffer, inner.len(), next_header)
                {
                    let _ = self.shared.natt.send_to(&buffer[..len], child.peer);
                }
            }
        }
        if held.overflow > 0 {
            tracing::warn!(
                in_spi = format_args!("{:08x}", in_spi),
                dropped = held.overflow,
                "a standby child held more than it could; the oldest were dropped"
            );
        }
        child.standby.store(false, Ordering::Release);
        tracing::debug!(
            in_spi = format_args!("{:08x}", in_spi),
            with_state = previous.is_some(),
            already_sealed = skip,
            "standby child took over"
        );
        true
    }

    fn extend(&self, in_spi: u32, limit: u64) {
        if let Some(child) = self.shared.snapshot().get(in_spi) {
            child.extend(limit);
        }
    }

    fn stop(&self, in_spi: u32) -> Option<ChildCounters> {
        Some(self.remove(in_spi)?.stats.snapshot())
    }

    fn counters(&self, in_spi: u32) -> Option<ChildCounters> {
        self.shared
            .snapshot()
            .get(in_spi)
            .map(|child| child.stats.snapshot())
    }

    fn take_active(&self, out: &mut Vec<u32>) -> bool {
        let from = out.len();
        self.shared.activity.take(out);
        // Cleared after taking: a packet from here on puts the child on the list again.
        let table = self.shared.snapshot();
        for spi in &out[from..] {
            if let Some(child) = table.get(*spi) {
                child.active.store(false, Ordering::Release);
            }
        }
        true
    }

    fn set_fenced(&self, fenced: bool) {
        self.shared.fenced.store(fenced, Ordering::Release);
        if fenced {
            self.shared.wait_for_batches();
        }
    }
}
