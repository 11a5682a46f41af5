//! # The kernel backend: child SAs programmed into Linux XFRM over netlink
//!
//! [`XfrmDriver`] installs each child SA the node starts as a pair of kernel states and the
//! policies of its traffic selectors (`netlink-packet-xfrm` messages sent through
//! `xfrmnetlink`), and reads the kernel's counters back to drive leases and checkpoints. The
//! kernel then does ESP itself (RFC 4303 tunnel mode, `rfc4106(gcm(aes))`), in UDP or not as
//! the child says ([`ChildStart::udp_encap`], see [ESP in UDP or plain
//! ESP](#esp-in-udp-or-plain-esp)).
//!
//! ```text
//!  XfrmDriver::new ── flush_owned(reqids): DELSA / DELPOLICY what carries this node's reqids
//!        │            (left by a killed predecessor; everyone else's stays)
//!        ├─ probe: NEWSA of a throwaway ESP state ── refused? ──► XfrmUnavailable
//!        │                                                     (the node falls back to userspace)
//!        ├─ UDP 4500 with UDP_ENCAP_ESPINUDP: the kernel takes ESP, IKE (marker) reaches us ─┐
//!        ├─ UDP 500 ──────────────────────────────────────────────────── IKE reader ─────────┴► IkeReceiver
//!        └─ watchdog: fence gate closed → remove the states (policies stay: traffic is dropped)
//!
//!  start:    reqid: the next free one in the node's range (XfrmConfig::reqids)
//!            NEWSA out (oseq = next_seq - 1, hard packet limit = the lease)
//!            NEWSA in  (replay seq = replay_floor, bitmap all ones)
//!              └ EEXIST from a state of ours: DELSA, NEWSA again (install_sa)
//!            NEWPOLICY out (ts_local → ts_remote), in + fwd (ts_remote → ts_local), template ESP
//!            tunnel local ⇄ peer, the child's reqid, priority by specificity
//!              └ EEXIST from a policy of ours: UPDPOLICY (install_policy); a selector another
//!                running child already has: shared, no kernel change
//!  counters: GETAE out (oseq, packets), GETAE in (seq, packets), GETSA in (replay / ICV stats)
//!  extend:   UPDSA out with the larger hard packet limit (or NEWSA again if it expired)
//!  fence:    counters, UPDSA out freezing it (hard limit ≤ 1024 above), GETAE, DELSA ×2;
//!            unfence: NEWSA ×2 above every number the frozen state could use
//!  stop:     counters, DELPOLICY ×n (or UPDPOLICY to hand a shared one over), DELSA ×2
//! ```
//!
//! ## Whose kernel objects these are
//!
//! Everything the driver installs carries a reqid from [`XfrmConfig::reqids`], a range that
//! belongs to this node ([`ReqidRange::for_node`]). [`XfrmDriver::new`] first removes every
//! state and policy with a reqid in that range ([`flush_owned`]): a process killed with
//! SIGKILL leaves its states encrypting (unfenced, within their last lease) and its policies
//! in place, where the next start would fail on EEXIST. Nothing outside the range (a key
//! manager's, the operator's) is touched, then or later; see [`owned`](self::owned).
//!
//! ## Which policy the kernel picks
//!
//! The kernel uses the matching policy with the lowest priority value. Each policy gets
//! [`policy_priority`]: `policy_priority` of the config (the base) plus 17 per remote address
//! bit its prefix leaves free plus one per free remote port bit. A child's `/32` is thus
//! chosen over another's `/24` however they were installed — the same choice as the userspace
//! backend's routing, so one user cannot take another's return traffic. Policies of equal
//! priority go to the older one.
//!
//! The kernel holds one policy per selector and direction. Children with the same selectors
//! (a rekey's old and new child) share it: it carries the first started child's reqid and
//! tunnel, and passes to the next when that child stops. Until then the newer child's
//! inbound packets fail the policy's template check (`XfrmInTmplMismatch`), which ends when
//! the old child is stopped at the end of the rekey.
//!
//! ## How the lease is enforced in the kernel
//!
//! The kernel numbers packets itself and cannot be asked before each one. It does enforce a
//! *hard packet limit* per state (`xfrm_lifetime_cfg.hard_packet_limit`): the state is checked
//! before every packet it protects (`xfrm_state_check_expire`) and expires — stops
//! protecting — once it has protected that many. A state installed with replay `oseq =
//! next_seq - 1` and a hard limit of `limit - (next_seq - 1)` packets therefore sends sequence
//! numbers `next_seq ..= limit` and nothing above (`curlft.packets` and `oseq` advance
//! together, one per packet). The soft limit at three quarters makes the kernel announce the
//! approaching end (`XFRM_MSG_EXPIRE`, soft) to key managers; the node, which extends leases at
//! half use from the counters, normally raises the hard limit long before with `extend`
//! (XFRM_MSG_UPDSA, which replaces the state's lifetime and keeps its replay state).
//!
//! If the lease does run out, the kernel deletes the state; packets matching the policy are
//! then dropped (the policy's template is required, so nothing leaves in the clear). That is
//! counted as one `lease_waits` event, `highest_out` is reported as the limit (every number up
//! to it may have been used), and the next `extend` installs the state again starting above
//! the old limit. Fencing works the same way: closing the gate removes both states and
//! reopening it installs them again above what was used, so no sequence number is ever sent
//! twice. The kernel keeps sending while the driver reads the counters and deletes the state,
//! so before the delete the outbound state is *frozen*: UPDSA lowers its hard limit to at
//! most `FENCE_MARGIN` (1024) numbers above what the counters said, the counters are read
//! again, and `highest_out` becomes that bound (every number up to it may have been used). A
//! fence therefore skips up to 1024 numbers; reading then deleting alone re-sent the numbers
//! used in between (seen in the VM test `xfrm_vm`).
//!
//! The kernel counts packets per state, so `out_packets` / `in_packets` add up every state a
//! child has had (each one's last count; an expired one's is its hard limit). Packets sent or
//! received between a fence's last read and the delete are not counted.
//!
//! ## ESP in UDP or plain ESP
//!
//! A child with `udp_encap` (NAT was detected between us and the peer) gets states with an
//! `XFRMA_ENCAP` template (`UDP_ENCAP_ESPINUDP`, our NAT-T port ⇄ the peer's port as IKE saw
//! it): the kernel sends ESP in UDP from the cluster's port 4500, and takes ESP arriving on the
//! cluster's NAT-T socket, which has `UDP_ENCAP` set (datagrams starting with the non-ESP
//! marker reach the IKE reader). A child without it gets states with no encapsulation: ESP as
//! IP protocol 50 both ways, the peer's port unused; the NAT-T socket stays open for IKE and
//! for the children behind NAT, and plain ESP never reaches it. Both kinds can run side by
//! side. (The userspace data plane only carries ESP in UDP and refuses the other kind.)
//!
//! ## ESP support
//!
//! Some kernels (including this project's CI) have XFRM netlink but no ESP (`CONFIG_INET_ESP`
//! off) or no GCM (`CONFIG_CRYPTO_GCM` off). [`probe`] tries a throwaway state and reports
//! which with [`XfrmUnavailable`]; [`XfrmDriver::new`] runs it first and refuses to start, so
//! the node can say "falling back to the userspace data plane" instead of failing at the
//! first child.

mod msg;
mod netlink;
pub mod owned;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_xfrm::XfrmMessage;
use nix::{setsockopt_impl, sockopt_impl};
use zeroize::Zeroizing;

pub use self::msg::{
    AEAD_RFC4106, AeValues, Direction, NULL_CIPHER, PRIORITY_PER_ADDRESS_BIT, PolicyDir, SaParams,
    Sel, alloc_spi_message, get_ae, null_esp_message, parse_ae, policy_id_message, policy_message,
    policy_priority, port_range_to_masks, prefix_sel, range_to_prefixes, sa_id_message, sa_message,
    selectors,
};
pub use self::netlink::{NetlinkError, XfrmNetlink};
use self::owned::ReqidAllocator;
pub use self::owned::{
    FlushReport, FlushedPolicy, FlushedState, ReqidRange, flush_owned, install_policy, install_sa,
    template_reqids,
};
use crate::ike::{self, IkePort, IkeReceiver, IkeSender};
use crate::userspace::esp_suite;
use crate::userspace::udp::bind_udp;
use crate::{ChildCounters, ChildStart, DriverError, FenceGate, SaDriver};

/// Why the kernel backend cannot run on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XfrmUnavailable {
    /// XFRM netlink works, but the kernel has no ESP (`CONFIG_INET_ESP`).
    #[error(
        "the kernel has XFRM but no ESP (CONFIG_INET_ESP is off): adding an ESP state failed \
         with {0}; the kernel data plane cannot run here, use the userspace data plane"
    )]
    NoEsp(NetlinkError),
    /// ESP is there but not AES-GCM for it.
    #[error(
        "the kernel has no rfc4106(gcm(aes)) for ESP (CONFIG_CRYPTO_GCM is off): adding an \
         AES-GCM state failed with {0}; use the userspace data plane"
    )]
    NoAead(NetlinkError),
    /// Not allowed (the process lacks CAP_NET_ADMIN).
    #[error("XFRM needs CAP_NET_ADMIN: {0}")]
    NotPermitted(NetlinkError),
    /// No XFRM netlink at all, or another failure.
    #[error("XFRM netlink is unusable: {0}")]
    Unusable(String),
    /// The configuration cannot work (e.g. an unusable reqid range).
    #[error("the kernel data plane is misconfigured: {0}")]
    BadConfig(String),
}

/// Checks, with a throwaway state that is removed at once, that this kernel can do ESP with
/// AES-GCM-16 (in the calling thread's network namespace).
pub fn probe() -> Result<(), XfrmUnavailable> {
    let netlink = XfrmNetlink::open().map_err(|e| XfrmUnavailable::Unusable(e.to_string()))?;
    probe_with(&netlink, 0)
}

/// The probe, its AES-GCM state tagged with `reqid` (the driver's: the first of its range, so
/// that a probe state left by a crash is flushed with the rest at the next start).
fn probe_with(netlink: &XfrmNetlink, reqid: u32) -> Result<(), XfrmUnavailable> {
    let src = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
    let dst = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    // a SPI nobody else picks: high, and different per process
    let spi = 0xfff0_0000 | (std::process::id() & 0xfffff);
    let classify = |e: NetlinkError, cipher_step: bool| match e.errno {
        libc::EPROTONOSUPPORT => XfrmUnavailable::NoEsp(e),
        libc::ENOSYS | libc::ENOENT if cipher_step => XfrmUnavailable::NoAead(e),
        libc::EPERM | libc::EACCES => XfrmUnavailable::NotPermitted(e),
        _ => XfrmUnavailable::Unusable(e.to_string()),
    };
    let remove = || {
        let _ = netlink.request(
            "DELSA (probe)",
            XfrmMessage::DeleteSa(sa_id_message(dst, spi, src)),
            NLM_F_REQUEST | NLM_F_ACK,
        );
    };
    // 1. ESP at all (null cipher: present wherever XFRM is)
    netlink
        .request(
            "NEWSA (probe: ESP, null cipher)",
            XfrmMessage::AddSa(null_esp_message(src, dst, spi)),
            ADD,
        )
        .map_err(|e| classify(e, false))?;
    remove();
    // 2. AES-GCM-16 for ESP
    let keymat = Zeroizing::new(vec![0u8; 20]);
    let params = SaParams {
        direction: Direction::In,
        src,
        dst,
        spi,
        reqid,
        keymat: &keymat,
        esn: false,
        encap: None,
        replay_window: 32,
        seq: 0,
        packet_limit: None,
    };
    netlink
        .request(
            "NEWSA (probe: ESP, rfc4106(gcm(aes)))",
            XfrmMessage::AddSa(sa_message(&params)),
            ADD,
        )
        .map_err(|e| classify(e, true))?;
    remove();
    Ok(())
}

/// How the kernel backend is set up.
#[derive(Clone, Debug)]
pub struct XfrmConfig {
    /// The cluster address.
    pub cluster: IpAddr,
    /// ESP-in-UDP / NAT-T port (4500).
    pub natt_port: u16,
    /// Plain IKE port (500), or `None`.
    pub ike_port: Option<u16>,
    /// Bind the cluster address even where it is not local.
    pub freebind: bool,
    /// Inbound anti-replay window (32 to 4096 packets).
    pub replay_window: u32,
    /// Base priority of the installed policies (lower wins): each gets this plus how
    /// unspecific its remote selector is ([`policy_priority`]), 0 to 2192 more.
    pub policy_priority: u32,
    /// The reqids this node tags its states and policies with, and flushes at start: derive
    /// it from the node id with [`ReqidRange::for_node`], unique among the nodes (and other
    /// users of the range) that share this kernel's XFRM tables.
    pub reqids: ReqidRange,
    /// Depth of the IKE channel.
    pub ike_queue: usize,
    /// How often the fence gate is checked: the kernel processes packets by itself, so a
    /// closed gate takes effect within this period.
    pub watchdog: Duration,
}

impl XfrmConfig {
    /// Defaults: ports 4500 and 500, a 1024-packet window, base policy priority 1000, the
    /// reqids of node 0 ([`ReqidRange::for_node`]`(0)`: set the node's own), a 20 ms watchdog.
    pub fn new(cluster: IpAddr) -> XfrmConfig {
        XfrmConfig {
            cluster,
            natt_port: crate::userspace::NATT_PORT,
            ike_port: Some(crate::userspace::IKE_PORT),
            freebind: true,
            replay_window: 1024,
            policy_priority: 1000,
            reqids: ReqidRange::for_node(0),
            ike_queue: ike::DEFAULT_IKE_QUEUE,
            watchdog: Duration::from_millis(20),
        }
    }
}

sockopt_impl!(
    /// `UDP_ENCAP`: hand ESP arriving on this socket to XFRM (RFC 3948).
    UdpEncap,
    SetOnly,
    libc::IPPROTO_UDP,
    libc::UDP_ENCAP,
    libc::c_int
);

/// `UDP_ENCAP_ESPINUDP` (`include/uapi/linux/udp.h`).
pub const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// One child as the kernel runs it.
#[derive(Debug)]
struct KChild {
    start: ChildStart,
    /// From the node's range; tags the child's states and policy templates.
    reqid: u32,
    /// The kernel policies the child needs, without duplicates: `Out` for each selector of
    /// ts_local → ts_remote, `In` and `Fwd` for each of ts_remote → ts_local.
    policy_keys: Vec<(Sel, PolicyDir)>,
    /// `oseq` the outbound state was (last) installed with.
    install_base: u64,
    /// Lease limit in force.
    limit: u64,
    /// Replay floor the inbound state was (last) installed with.
    in_floor: u64,
    out_installed: bool,
    in_installed: bool,
    /// Packets of the outbound / inbound states installed before the current one (a lease
    /// that ran out, a fence): the kernel counts per state.
    out_done: u64,
    in_done: u64,
    /// Packets of the current states, as last read.
    out_now: u64,
    in_now: u64,
    /// Last counters read.
    last: ChildCounters,
}

/// A running child's claim on a kernel policy.
#[derive(Copy, Clone, Debug)]
struct PolicyUser {
    in_spi: u32,
    reqid: u32,
    peer: IpAddr,
}

#[derive(Debug)]
struct State {
    children: HashMap<u32, KChild>,
    /// The kernel keeps one policy per selector and direction, so children with the same
    /// selectors share it: its users in start order; the installed policy is the first one's.
    policies: HashMap<(Sel, PolicyDir), Vec<PolicyUser>>,
    reqids: ReqidAllocator,
    node_fenced: bool,
    applied_fence: bool,
}

#[derive(Debug)]
struct Inner {
    netlink: XfrmNetlink,
    config: XfrmConfig,
    gate: Arc<FenceGate>,
    state: Mutex<State>,
    shutdown: AtomicBool,
    natt: UdpSocket,
    ike: Option<UdpSocket>,
    ike_tx: IkeSender,
}

/// The kernel data plane. See the [module documentation](self).
#[derive(Debug)]
pub struct XfrmDriver {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl XfrmDriver {
    /// Probes the kernel, opens the cluster sockets and starts the IKE readers and the fence
    /// watchdog. Refuses with [`XfrmUnavailable`] where the kernel cannot do ESP.
    pub fn new(
        config: XfrmConfig,
        gate: Arc<FenceGate>,
    ) -> Result<(XfrmDriver, IkeReceiver), XfrmUnavailable> {
        config
            .reqids
            .check()
            .map_err(|e| XfrmUnavailable::BadConfig(format!("XfrmConfig::reqids: {e}")))?;
        let netlink = XfrmNetlink::open().map_err(|e| XfrmUnavailable::Unusable(e.to_string()))?;
        // before anything else, even on a kernel without ESP: leftover policies of ours would
        // drop the traffic of the userspace data plane the node falls back to
        let flushed = flush_owned(&netlink, config.reqids).map_err(|e| match e.errno {
            libc::EPERM | libc::EACCES => XfrmUnavailable::NotPermitted(e),
            _ => XfrmUnavailable::Unusable(format!("flushing this node's XFRM objects: {e}")),
        })?;
        log_flush(&flushed, config.reqids);
        probe_with(&netlink, config.reqids.base)?;
        let io = |e: io::Error| XfrmUnavailable::Unusable(e.to_string());
        let natt = bind_udp(
            SocketAddr::new(config.cluster, config.natt_port),
            0,
            config.freebind,
        )
        .map_err(io)?;
        nix::sys::socket::setsockopt(&natt.as_fd(), UdpEncap, &UDP_ENCAP_ESPINUDP).map_err(
            |e| XfrmUnavailable::Unusable(format!("UDP_ENCAP on {}: {e}", config.cluster)),
        )?;
        let ike = match config.ike_port {
            Some(port) => Some(
                bind_udp(SocketAddr::new(config.cluster, port), 0, config.freebind).map_err(io)?,
            ),
            None => None,
        };
        let (ike_tx, ike_rx) = tokio::sync::mpsc::channel(config.ike_queue.max(1));
        let reqids = ReqidAllocator::new(config.reqids);
        let inner = Arc::new(Inner {
            netlink,
            config,
            gate,
            state: Mutex::new(State {
                children: HashMap::new(),
                policies: HashMap::new(),
                reqids,
                node_fenced: false,
                applied_fence: false,
            }),
            shutdown: AtomicBool::new(false),
            natt,
            ike,
            ike_tx,
        });
        let driver = XfrmDriver {
            inner,
            threads: Mutex::new(Vec::new()),
        };
        driver
            .spawn("evpc-xfrm-natt", |inner| {
                ike::read_loop(
                    &inner.natt,
                    IkePort::NatT,
                    &inner.shutdown,
                    &inner.ike_tx,
                    "xfrm",
                );
            })
            .map_err(io)?;
        if driver.inner.ike.is_some() {
            driver
                .spawn("evpc-xfrm-ike", |inner| {
                    if let Some(socket) = &inner.ike {
                        ike::read_loop(
                            socket,
                            IkePort::Ike,
                            &inner.shutdown,
                            &inner.ike_tx,
                            "xfrm",
                        );
                    }
                })
                .map_err(io)?;
        }
        driver.spawn("evpc-xfrm-fence", watchdog).map_err(io)?;
        tracing::info!(cluster = %driver.inner.config.cluster, "kernel (XFRM) data plane running");
        Ok((driver, ike_rx))
    }

    fn spawn(&self, name: &str, work: fn(&Inner)) -> io::Result<()> {
        let inner = Arc::clone(&self.inner);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || work(&inner))?;
        self.threads
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle);
        Ok(())
    }

    /// Sends an IKE message from the cluster socket of `port` (behind the non-ESP marker on
    /// the NAT-T port).
    pub fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> io::Result<()> {
        let socket = match port {
            IkePort::NatT => &self.inner.natt,
            IkePort::Ike => self.inner.ike.as_ref().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotConnected, "not listening on the IKE port")
            })?,
        };
        socket.send_to(&ike::frame(port, message), remote).map(drop)
    }

    /// Stops every child (removing its states and policies) and the threads.
    pub fn shutdown(&self) {
        let spis: Vec<u32> = self.inner.lock().children.keys().copied().collect();
        for spi in spis {
            self.stop(spi);
        }
        self.inner.shutdown.store(true, Ordering::Release);
        for thread in
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner))
        {
            let _ = thread.join();
        }
    }
}

/// Says what [`flush_owned`] removed at start: a summary, and each object at debug level.
fn log_flush(report: &FlushReport, reqids: ReqidRange) {
    if report.is_empty() {
        tracing::debug!(
            %reqids,
            kept_states = report.states_kept,
            kept_policies = report.policies_kept,
            "no XFRM states or policies of this node's to flush"
        );
        return;
    }
    tracing::warn!(
        %reqids,
        states = report.states.len(),
        policies = report.policies.len(),
        kept_states = report.states_kept,
        kept_policies = report.policies_kept,
        "removed XFRM states and policies a previous run of this node left in the kernel"
    );
    for state in &report.states {
        tracing::debug!("flushed {state}");
    }
    for policy in &report.policies {
        tracing::debug!("flushed {policy}");
    }
}

impl Drop for XfrmDriver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Fences or unfences as the gate and the node's flag say.
fn watchdog(inner: &Inner) {
    while !inner.shutdown.load(Ordering::Acquire) {
        {
            let mut state = inner.lock();
            let want = state.node_fenced || !inner.gate.is_open();
            if want != state.applied_fence {
                inner.apply_fence(&mut state, want);
            }
        }
        std::thread::sleep(inner.config.watchdog);
    }
}

const ADD: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;

/// Sequence numbers a fenced outbound state may still use after its counters were read
/// ([`Inner::freeze_out`]): the numbers skipped when the fence lifts.
const FENCE_MARGIN: u64 = 1024;
const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn local(&self) -> IpAddr {
        self.config.cluster
    }

    /// NEWSA/UPDSA body of the outbound state: numbers after `oseq` up to `limit`.
    fn out_message(
        &self,
        child: &KChild,
        oseq: u64,
        limit: u64,
    ) -> netlink_packet_xfrm::state::ModifyMessage {
        let empty = Zeroizing::new(Vec::new());
        let keymat = child.start.keys.as_ref().map_or(&empty, |k| &k.outbound);
        sa_message(&SaParams {
            direction: Direction::Out,
            src: self.local(),
            dst: child.start.peer.ip(),
            spi: child.start.out_spi,
            reqid: child.reqid,
            keymat,
            esn: child.start.suite.esn,
            encap: child
                .start
                .udp_encap
                .then_some((self.config.natt_port, child.start.peer.port())),
            replay_window: self.config.replay_window,
            seq: oseq,
            packet_limit: Some(limit.saturating_sub(oseq)),
        })
    }

    /// NEWSA body of the inbound state, refusing numbers at or below `floor`.
    fn in_message(&self, child: &KChild, floor: u64) -> netlink_packet_xfrm::state::ModifyMessage {
        let empty = Zeroizing::new(Vec::new());
        let keymat = child.start.keys.as_ref().map_or(&empty, |k| &k.inbound);
        sa_message(&SaParams {
            direction: Direction::In,
            src: child.start.peer.ip(),
            dst: self.local(),
            spi: child.start.in_spi,
            reqid: child.reqid,
            keymat,
            esn: child.start.suite.esn,
            encap: child
                .start
                .udp_encap
                .then_some((child.start.peer.port(), self.config.natt_port)),
            replay_window: self.config.replay_window,
            seq: floor,
            packet_limit: None,
        })
    }

    fn install_out(&self, child: &mut KChild, oseq: u64) -> Result<(), NetlinkError> {
        let message = self.out_message(child, oseq, child.limit);
        install_sa(
            &self.netlink,
            "NEWSA (outbound)",
            message,
            self.config.reqids,
        )?;
        child.install_base = oseq;
        child.out_installed = true;
        child.out_done += std::mem::take(&mut child.out_now);
        Ok(())
    }

    fn install_in(&self, child: &mut KChild, floor: u64) -> Result<(), NetlinkError> {
        let message = self.in_message(child, floor);
        install_sa(
            &self.netlink,
            "NEWSA (inbound)",
            message,
            self.config.reqids,
        )?;
        child.in_floor = floor;
        child.in_installed = true;
        child.in_done += std::mem::take(&mut child.in_now);
        Ok(())
    }

    fn delete_sa(&self, dst: IpAddr, spi: u32, src: IpAddr) -> Result<(), NetlinkError> {
        match self.netlink.request(
            "DELSA",
            XfrmMessage::DeleteSa(sa_id_message(dst, spi, src)),
            ACK,
        ) {
            Err(e) if e.errno != libc::ESRCH => Err(e),
            _ => Ok(()),
        }
    }

    /// The policy for `sel` in `dir` as `user` (its reqid and tunnel) holds it.
    fn policy_for(
        &self,
        (sel, dir): (Sel, PolicyDir),
        user: &PolicyUser,
    ) -> netlink_packet_xfrm::policy::ModifyMessage {
        let local = self.local();
        let (src, dst) = if dir == PolicyDir::Out {
            (local, user.peer)
        } else {
            (user.peer, local)
        };
        let priority = policy_priority(self.config.policy_priority, &sel, dir);
        policy_message(sel, dir, src, dst, user.reqid, priority)
    }

    /// Installs the child's policies, or joins those another running child already holds
    /// for the same selector and direction. On failure, what was done stays registered:
    /// [`Inner::release_policies`] undoes it.
    fn install_policies(
        &self,
        policies: &mut HashMap<(Sel, PolicyDir), Vec<PolicyUser>>,
        child: &KChild,
    ) -> Result<(), NetlinkError> {
        let user = PolicyUser {
            in_spi: child.start.in_spi,
            reqid: child.reqid,
            peer: child.start.peer.ip(),
        };
        for &key in &child.policy_keys {
            let shared = policies.get(&key).is_some_and(|users| !users.is_empty());
            if !shared {
                install_policy(
                    &self.netlink,
                    self.policy_for(key, &user),
                    self.config.reqids,
                )?;
            }
            policies.entry(key).or_default().push(user);
        }
        Ok(())
    }

    /// Gives up the child's claims: a policy it held passes to the next child using it
    /// (UPDPOLICY), or is deleted when none is left.
    fn release_policies(
        &self,
        policies: &mut HashMap<(Sel, PolicyDir), Vec<PolicyUser>>,
        child: &KChild,
    ) {
        for &key in &child.policy_keys {
            let Some(users) = policies.get_mut(&key) else {
                continue;
            };
            let Some(at) = users.iter().position(|u| u.in_spi == child.start.in_spi) else {
                continue;
            };
            users.remove(at);
            if at != 0 {
                continue; // the kernel's policy is another child's
            }
            if let Some(next) = users.first() {
                let message = self.policy_for(key, next);
                if let Err(e) = self.netlink.request(
                    "UPDPOLICY (hand over)",
                    XfrmMessage::UpdatePolicy(message),
                    ACK,
                ) {
                    // the policy still names the stopped child's reqid: its traffic is dropped,
                    // not sent in the clear
                    tracing::error!(error = %e, "handing a shared policy to the next child");
                }
            } else {
                policies.remove(&key);
                let _ = self.netlink.request(
                    "DELPOLICY",
                    XfrmMessage::DeletePolicy(policy_id_message(key.0, key.1)),
                    ACK,
                );
            }
        }
    }

    fn ae(&self, dst: IpAddr, spi: u32, src: IpAddr, reqid: u32) -> Result<AeValues, NetlinkError> {
        let answers = self.netlink.request(
            "GETAE",
            XfrmMessage::GetAsyncEvent(get_ae(dst, spi, src, reqid)),
            NLM_F_REQUEST,
        )?;
        answers
            .iter()
            .find_map(|m| match m {
                XfrmMessage::NewAsyncEvent(ae) => Some(parse_ae(ae)),
                _ => None,
            })
            .ok_or_else(|| NetlinkError {
                op: "GETAE",
                errno: 0,
                detail: "no NEWAE in the answer".into(),
            })
    }

    /// Reads the kernel's counters into `child.last`.
    fn refresh(&self, child: &mut KChild) {
        let local = self.local();
        let peer = child.start.peer.ip();
        if child.out_installed {
            match self.ae(peer, child.start.out_spi, local, child.reqid) {
                Ok(out) => {
                    if out.oseq > child.install_base {
                        child.last.highest_out = child.last.highest_out.max(out.oseq);
                    }
                    child.out_now = child.out_now.max(out.packets);
                    child.last.out_packets = child.out_done + child.out_now;
                }
                Err(e) if e.errno == libc::ESRCH => {
                    // hard-expired at the lease mark: every number up to it may be used
                    child.out_installed = false;
                    child.last.lease_waits += 1;
                    child.last.highest_out = child.last.highest_out.max(child.limit);
                    // it sent up to its hard limit
                    child.out_now = child.out_now.max(child.limit - child.install_base);
                    child.last.out_packets = child.out_done + child.out_now;
                    tracing::info!(
                        in_spi = format_args!("{:08x}", child.start.in_spi),
                        limit = child.limit,
                        "outbound state expired at its lease"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "reading the outbound state's counters"),
            }
        }
        if child.in_installed {
            match self.ae(local, child.start.in_spi, peer, child.reqid) {
                Ok(inbound) => {
                    if inbound.seq > child.in_floor {
                        child.last.highest_in = child.last.highest_in.max(inbound.seq);
                    }
                    child.in_now = child.in_now.max(inbound.packets);
                    child.last.in_packets = child.in_done + child.in_now;
                }
                Err(e) => tracing::warn!(error = %e, "reading the inbound state's counters"),
            }
            if let Ok(answers) = self.netlink.request(
                "GETSA",
                XfrmMessage::GetSa(sa_id_message(local, child.start.in_spi, peer)),
                NLM_F_REQUEST,
            ) && let Some(XfrmMessage::AddSa(sa)) = answers.first()
            {
                let stats = &sa.user_sa_info.stats;
                child.last.replay_drops = child.last.replay_drops.max(u64::from(stats.replay));
                child.last.auth_failures = child
                    .last
                    .auth_failures
                    .max(u64::from(stats.integrity_failed));
            }
        }
    }

    /// Before a fence removes the outbound state: stops it from sending more than
    /// [`FENCE_MARGIN`] numbers past what the counters last said, and returns the highest
    /// number it can have used (or will use before it is deleted).
    ///
    /// Reading the counters and then deleting the state is not enough: the kernel goes on
    /// sending in between, and the numbers it used there would be sent again when the fence
    /// lifts (with AES-GCM, a repeated nonce). So the hard packet limit is lowered first
    /// (UPDSA: from then on the kernel sends at most up to `freeze`), and the counters read
    /// again: their `oseq` is final if the state already reached the new limit.
    fn freeze_out(&self, child: &mut KChild) -> u64 {
        let local = self.local();
        let peer = child.start.peer.ip();
        let used = child.last.highest_out.max(child.install_base);
        let freeze = child.limit.min(used.saturating_add(FENCE_MARGIN));
        let message = self.out_message(child, child.install_base, freeze);
        if let Err(e) = self
            .netlink
            .request("UPDSA (fence)", XfrmMessage::UpdateSa(message), ACK)
        {
            // ESRCH: expired and deleted; EINVAL: expired, not deleted yet
            if e.errno != libc::ESRCH && e.errno != libc::EINVAL {
                tracing::error!(error = %e, "fencing: freezing an outbound state");
            }
            // gone (expired at the lease) or unknown: any number of the lease may be used
            return child.limit;
        }
        match self.ae(peer, child.start.out_spi, local, child.reqid) {
            // more than FENCE_MARGIN were sent between the two reads: the state expired at
            // once and `oseq` is final; otherwise it can still send up to `freeze`
            Ok(ae) => {
                child.out_now = child.out_now.max(ae.packets);
                child.last.out_packets = child.out_done + child.out_now;
                ae.oseq.max(freeze)
            }
            // it reached the new limit and the kernel deleted it: exactly at `freeze` if at
            // most FENCE_MARGIN packets came between the reads, but that cannot be told here
            Err(_) => child.limit,
        }
    }

    fn apply_fence(&self, state: &mut State, fenced: bool) {
        for child in state.children.values_mut() {
            let local = self.local();
            let peer = child.start.peer.ip();
            if fenced {
                self.refresh(child);
                if child.out_installed {
                    let bound = self.freeze_out(child);
                    child.last.highest_out = child.last.highest_out.max(bound);
                }
                if let Err(e) = self.delete_sa(peer, child.start.out_spi, local) {
                    tracing::error!(error = %e, "fencing: removing an outbound state");
                }
                child.out_installed = false;
                let _ = self.delete_sa(local, child.start.in_spi, peer);
                child.in_installed = false;
            } else {
                let resume = child.last.highest_out.max(child.install_base);
                if resume < child.limit
                    && let Err(e) = self.install_out(child, resume)
                {
                    tracing::error!(error = %e, "unfencing: reinstalling an outbound state");
                }
                let floor = child.last.highest_in.max(child.start.replay_floor);
                if let Err(e) = self.install_in(child, floor) {
                    tracing::error!(error = %e, "unfencing: reinstalling an inbound state");
                }
            }
        }
        state.applied_fence = fenced;
    }
}

fn driver_error(in_spi: u32, e: NetlinkError) -> DriverError {
    DriverError::Io(format!("child SA {in_spi:08x}: {e}"))
}

impl SaDriver for XfrmDriver {
    fn name(&self) -> &'static str {
        "xfrm"
    }

    fn start(&self, child: ChildStart) -> Result<(), DriverError> {
        let in_spi = child.in_spi;
        let unsupported = |reason: String| DriverError::Unsupported { in_spi, reason };
        if child.keys.is_none() {
            return Err(unsupported("no keys: the kernel must encrypt".into()));
        }
        esp_suite(&child.suite).map_err(unsupported)?;
        if child.peer.is_ipv4() != self.inner.config.cluster.is_ipv4() {
            return Err(unsupported(format!(
                "peer {} and cluster address {} are of different families",
                child.peer, self.inner.config.cluster
            )));
        }
        let out_sels = selectors(&child.ts_local, &child.ts_remote);
        let in_sels = selectors(&child.ts_remote, &child.ts_local);
        if out_sels.is_empty() || in_sels.is_empty() || out_sels.len() + in_sels.len() > 256 {
            return Err(unsupported(format!(
                "traffic selectors need {} + {} kernel policies (1 to 256)",
                out_sels.len(),
                in_sels.len()
            )));
        }
        let mut policy_keys: Vec<(Sel, PolicyDir)> = Vec::new();
        let wanted = out_sels.iter().map(|s| (*s, PolicyDir::Out)).chain(
            in_sels
                .iter()
                .flat_map(|s| [(*s, PolicyDir::In), (*s, PolicyDir::Fwd)]),
        );
        for key in wanted {
            // overlapping traffic selectors can yield one kernel selector twice
            if !policy_keys.contains(&key) {
                policy_keys.push(key);
            }
        }
        let mut state = self.inner.lock();
        if state.children.contains_key(&in_spi) {
            return Err(DriverError::AlreadyRunning(in_spi));
        }
        let Some(reqid) = state.reqids.allocate() else {
            return Err(DriverError::Io(format!(
                "child SA {in_spi:08x}: no free reqid left in {} ({} children running)",
                self.inner.config.reqids,
                state.children.len()
            )));
        };
        let mut kchild = KChild {
            reqid,
            policy_keys,
            install_base: child.next_seq.max(1) - 1,
            limit: child.limit,
            in_floor: child.replay_floor,
            out_installed: false,
            in_installed: false,
            out_done: 0,
            in_done: 0,
            out_now: 0,
            in_now: 0,
            last: ChildCounters::default(),
            start: child,
        };
        let fenced = state.applied_fence;
        let result = (|| {
            if !fenced {
                let (base, floor) = (kchild.install_base, kchild.start.replay_floor);
                self.inner.install_out(&mut kchild, base)?;
                self.inner.install_in(&mut kchild, floor)?;
            }
            self.inner.install_policies(&mut state.policies, &kchild)
        })();
        if let Err(e) = result {
            // undo only what this start did: a state or policy found in the way is someone
            // else's, or another child's
            let local = self.inner.local();
            let peer = kchild.start.peer.ip();
            self.inner.release_policies(&mut state.policies, &kchild);
            if kchild.out_installed {
                let _ = self.inner.delete_sa(peer, kchild.start.out_spi, local);
            }
            if kchild.in_installed {
                let _ = self.inner.delete_sa(local, in_spi, peer);
            }
            state.reqids.release(reqid);
            return Err(driver_error(in_spi, e));
        }
        state.children.insert(in_spi, kchild);
        Ok(())
    }

    fn extend(&self, in_spi: u32, limit: u64) {
        let mut state = self.inner.lock();
        let fenced = state.applied_fence;
        let Some(child) = state.children.get_mut(&in_spi) else {
            return;
        };
        if limit <= child.limit {
            return;
        }
        let old_limit = child.limit;
        child.limit = limit;
        if fenced {
            return; // reinstalled with the new limit when the fence lifts
        }
        if child.out_installed {
            let message = self.inner.out_message(child, child.install_base, limit);
            match self
                .inner
                .netlink
                .request("UPDSA (lease)", XfrmMessage::UpdateSa(message), ACK)
            {
                Ok(_) => return,
                // ESRCH: expired and deleted; EINVAL: expired, not deleted yet (the kernel
                // updates only valid states; install_sa replaces it)
                Err(e) if e.errno == libc::ESRCH || e.errno == libc::EINVAL => {
                    child.out_installed = false;
                    child.last.lease_waits += 1;
                    child.last.highest_out = child.last.highest_out.max(old_limit);
                    child.out_now = child.out_now.max(old_limit - child.install_base);
                    child.last.out_packets = child.out_done + child.out_now;
                }
                Err(e) => {
                    tracing::error!(error = %e, "extending the outbound lease");
                    return;
                }
            }
        }
        // expired at the old mark: start again above it
        let resume = child
            .last
            .highest_out
            .max(old_limit)
            .max(child.install_base);
        if let Err(e) = self.inner.install_out(child, resume) {
            tracing::error!(error = %e, "reinstalling the outbound state after its lease ran out");
        }
    }

    fn stop(&self, in_spi: u32) -> Option<ChildCounters> {
        let mut state = self.inner.lock();
        let mut child = state.children.remove(&in_spi)?;
        self.inner.refresh(&mut child);
        let local = self.inner.local();
        let peer = child.start.peer.ip();
        self.inner.release_policies(&mut state.policies, &child);
        state.reqids.release(child.reqid);
        if let Err(e) = self.inner.delete_sa(peer, child.start.out_spi, local) {
            tracing::error!(error = %e, "stop: removing the outbound state");
        }
        if let Err(e) = self.inner.delete_sa(local, in_spi, peer) {
            tracing::error!(error = %e, "stop: removing the inbound state");
        }
        Some(child.last)
    }

    fn counters(&self, in_spi: u32) -> Option<ChildCounters> {
        let mut state = self.inner.lock();
        let child = state.children.get_mut(&in_spi)?;
        self.inner.refresh(child);
        Some(child.last)
    }

    fn set_fenced(&self, fenced: bool) {
        let mut state = self.inner.lock();
        state.node_fenced = fenced;
        let want = fenced || !self.inner.gate.is_open();
        if want != state.applied_fence {
            self.inner.apply_fence(&mut state, want);
        }
    }
}
