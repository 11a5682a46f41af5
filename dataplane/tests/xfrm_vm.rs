//! The kernel data plane's whole lifecycle against real ESP traffic, in a VM whose kernel has
//! ESP (`evpc_testkit::vm`: the host kernel has XFRM netlink but no ESP, so nothing flows
//! through states there). Each test re-executes itself inside the VM; its body runs as root
//! on Debian's kernel 6.1 with `esp4`.
//!
//! ```text
//!   namespace "gw"                                          namespace "peer"
//!  ┌────────────────────────────────────┐                 ┌──────────────────────────────────┐
//!  │ XfrmDriver (reqids of node 1)      │                 │ kernel ESP set up with `ip xfrm` │
//!  │   cluster 198.51.100.1 on gw0      │   veth          │   (the mirror image of the child)│
//!  │   UDP 4500 (UDP_ENCAP), 500        │ gw0 ═══════ peer0   198.51.100.2, UDP 4500 encap  │
//!  │ inner 10.10.0.1 on lo, UDP :7000   │    ESP / ESP-in-UDP │ inner 10.10.0.2 on lo, :7000  │
//!  └────────────────────────────────────┘                 │ AF_PACKET capture: (SPI, seq) of │
//!                                                          │ every ESP packet on the wire     │
//!                                                          └──────────────────────────────────┘
//! ```
//!
//! What is checked, for plain ESP (IP protocol 50) and ESP in UDP (RFC 3948) alike
//! ([`plain_esp_lifecycle_on_the_wire`], [`esp_in_udp_lifecycle_on_the_wire`]):
//! 1. a child started with `next_seq = N` sends N first, then N+1, …; traffic flows both ways;
//!    `counters()` (highest_out, out_packets, highest_in, in_packets) match the wire;
//! 2. the replay floor: of what the peer sends from floor-9 on, numbers at or below the floor
//!    are dropped (the kernel's `XfrmInStateSeqError`, `replay_drops`), the rest delivered;
//! 3. the lease: extending before it runs out changes the kernel state in place (same state:
//!    its packet count goes on, only the hard limit moves); past the limit nothing more is
//!    sent (nothing above the limit on the wire, `lease_waits`), and the next extend installs
//!    the state again starting right above the old limit;
//! 4. the fence: with traffic offered all along, closing the gate stops ESP from the gw within
//!    a fraction of a second; reopening it resumes strictly above every number used before;
//! 5. stop: no state or policy of the child is left, no ESP is sent;
//! 6. ESN: a child starting at 2^32 - 5 crosses the 32-bit boundary; the peer's kernel (`flag
//!    esn`) accepts every packet (its replay state reaches 2^32 + 4, no ICV or sequence error);
//! 7. over the whole run no (SPI, sequence number) from the gw appears on the wire twice.
//!
//! [`a_killed_driver_is_flushed_by_its_successor`]: the driver runs in a child process that is
//! SIGKILLed while traffic flows; its states stay in the kernel and keep encrypting; a new
//! driver with the same reqid range flushes them before anything else, and the child started
//! again above the old lease never repeats an (SPI, sequence number) across the crash.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evpc_dataplane::ike::IkeReceiver;
use evpc_dataplane::netns::{NetNs, veth_pair};
use evpc_dataplane::selector::prefix_selector;
use evpc_dataplane::userspace::ENCR_AES_GCM_16;
use evpc_dataplane::xfrm::{
    ReqidRange, UDP_ENCAP_ESPINUDP, UdpEncap, XfrmConfig, XfrmDriver, XfrmNetlink, get_ae,
    parse_ae, template_reqids,
};
use evpc_dataplane::{ChildCounters, ChildKeymat, ChildStart, FenceGate, SaDriver};
use evpc_raft_store::{ChildSuite, Epoch, SaId};
use evpc_testkit::vm::{self, VmOptions};
use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_xfrm::XfrmMessage;
use netlink_packet_xfrm::policy::{
    DelGetMessage as PolicyDelGetMessage, ModifyMessage as PolicyModifyMessage,
};
use netlink_packet_xfrm::state::ModifyMessage as StateModifyMessage;
use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, recv, setsockopt, socket, sockopt,
};
use nix::sys::time::{TimeVal, TimeValLike};

const GW_OUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PEER_OUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const GW_INNER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const PEER_INNER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
const APP_PORT: u16 = 7000;
const NATT: u16 = 4500;
/// The peer's reqids (its own kernel, nothing to do with the gw's range).
const PEER_REQID_OUT: u32 = 1;
const PEER_REQID_IN: u32 = 2;
/// AES-128 key and 4-byte salt of each direction (RFC 4106).
const KEY_IN: [u8; 20] = [0x11; 20];
const KEY_OUT: [u8; 20] = [0x22; 20];
/// Set in the environment of the crash test's driver process.
const DRIVER_PROCESS: &str = "EVPC_XFRM_VM_DRIVER_PROCESS";
const READY: &str = "evpc-xfrm-vm: driver process ready";

fn vm_options() -> VmOptions {
    VmOptions {
        timeout: Duration::from_secs(240),
        ..VmOptions::default()
    }
}

fn reqids() -> ReqidRange {
    ReqidRange::for_node(1)
}

// ─────────────────────────────────────────── tests ───────────────────────────────────────────

#[test]
fn plain_esp_lifecycle_on_the_wire() {
    if !vm::inside() {
        vm::run_test("plain_esp_lifecycle_on_the_wire", &vm_options());
        return;
    }
    lifecycle(Encap::Plain);
}

#[test]
fn esp_in_udp_lifecycle_on_the_wire() {
    if !vm::inside() {
        vm::run_test("esp_in_udp_lifecycle_on_the_wire", &vm_options());
        return;
    }
    lifecycle(Encap::Udp);
}

#[test]
fn a_killed_driver_is_flushed_by_its_successor() {
    if std::env::var_os(DRIVER_PROCESS).is_some() {
        driver_process(); // never returns
    }
    if !vm::inside() {
        vm::run_test("a_killed_driver_is_flushed_by_its_successor", &vm_options());
        return;
    }
    crash();
}

// ───────────────────────────────────────── lifecycle ─────────────────────────────────────────

/// The first child: floor-9.. from the peer, N.. from the gw, a lease of 21 numbers.
const SA_A: Sa = Sa {
    in_spi: 0xa000_0001,
    out_spi: 0xa000_1001,
    esn: false,
};
/// The ESN child.
const SA_B: Sa = Sa {
    in_spi: 0xb000_0001,
    out_spi: 0xb000_1001,
    esn: true,
};
const N: u64 = 5000;
const FLOOR: u64 = 1000;

fn lifecycle(encap: Encap) {
    let started = Instant::now();
    let lab = Lab::new(encap);
    let gate = Arc::new(FenceGate::always_open());
    let (driver, _ike) = lab.driver(Arc::clone(&gate));

    first_traffic_and_replay_floor(&lab, &driver);
    lease(&lab, &driver);
    fence(&lab, &driver, &gate);
    stop(&lab, &driver, SA_A);
    esn(&lab, &driver);
    stop(&lab, &driver, SA_B);

    let all = lab.capture.gw_since(0);
    assert_unique(&all);
    assert!(
        all.iter().all(|p| p.udp == (encap == Encap::Udp)),
        "{encap:?}: every ESP packet of the gw is {}",
        encap.describe()
    );
    println!(
        "{encap:?}: {} ESP packets of the gw checked on the wire, none repeated, all {}; \
         {:.1} s in the VM",
        all.len(),
        encap.describe(),
        started.elapsed().as_secs_f64()
    );
    driver.shutdown();
}

/// Checks 1 and 2: numbering from `next_seq`, both directions, counters, the replay floor.
fn first_traffic_and_replay_floor(lab: &Lab, driver: &XfrmDriver) {
    lab.configure_peer(SA_A, FLOOR - 10, 0);
    driver
        .start(child(SA_A, lab.encap, N, N + 20, FLOOR))
        .expect("start");
    let seq_errors = lab.gw.xfrm_stat("XfrmInStateSeqError");

    let mark = lab.capture.mark();
    lab.gw_send(10);
    assert_eq!(
        lab.peer_receive(10),
        10,
        "the peer got the gw's 10 datagrams"
    );
    let wire = lab.capture.wait_from_gw(mark, 10);
    assert_eq!(
        seqs(&wire, SA_A.out_spi),
        (N..N + 10).collect::<Vec<_>>(),
        "the gw's first ESP packet carries next_seq, then one more each: {wire:?}"
    );

    let mark = lab.capture.mark();
    lab.peer_send(20);
    assert_eq!(
        lab.gw_receive(10),
        10,
        "of the peer's 20 packets (floor-9 ..= floor+10) the 10 above the floor arrive"
    );
    let from_peer: Vec<u64> = lab
        .capture
        .since(mark)
        .iter()
        .filter(|p| !p.from_gw && p.spi == SA_A.in_spi)
        .map(|p| u64::from(p.seq))
        .collect();
    assert_eq!(from_peer, (FLOOR - 9..=FLOOR + 10).collect::<Vec<_>>());
    let dropped = lab.gw.xfrm_stat("XfrmInStateSeqError") - seq_errors;
    assert_eq!(
        dropped, 10,
        "the gw's kernel drops the 10 at or below the floor"
    );

    let expect = ChildCounters {
        highest_out: N + 9,
        out_packets: 10,
        highest_in: FLOOR + 10,
        in_packets: 10,
        replay_drops: 10,
        ..ChildCounters::default()
    };
    let got = wait_for("the counters to match the wire", || {
        let c = driver.counters(SA_A.in_spi).expect("running");
        (c == expect).then_some(c)
    })
    .unwrap_or_else(|| {
        panic!(
            "counters {:?}, expected {expect:?}",
            driver.counters(SA_A.in_spi)
        )
    });
    println!(
        "{:?} check 1+2: first seq on the wire {N}, 10 out / 10 in, {dropped} replays at or \
         below floor {FLOOR} dropped; counters {got:?}",
        lab.encap
    );
}

/// Check 3: extend in place, run out, extend after expiry.
fn lease(lab: &Lab, driver: &XfrmDriver) {
    let before = lab.gw.state(SA_A.out_spi).expect("the outbound state");
    let info = &before.user_sa_info;
    // installed with oseq N-1: 21 packets allowed (N ..= N+20), 10 used
    assert_eq!(info.lifetime_cfg.hard_packet_limit, 21);
    assert_eq!(info.lifetime_cur.packets, 10);

    // a) extend while the state still has room: UPDSA, the very same state
    driver.extend(SA_A.in_spi, N + 40);
    let after = lab.gw.state(SA_A.out_spi).expect("the outbound state");
    assert_eq!(
        after.user_sa_info.lifetime_cfg.hard_packet_limit, 41,
        "extend moved the hard limit to N+40"
    );
    assert_eq!(
        (
            after.user_sa_info.lifetime_cur.packets,
            after.user_sa_info.lifetime_cur.add_time
        ),
        (10, info.lifetime_cur.add_time),
        "extend before expiry keeps the state (its packet count and add time go on)"
    );

    // b) offer 40 more: only N+10 ..= N+40 may leave
    let mark = lab.capture.mark();
    lab.gw_send(40);
    let got = lab.peer_receive(31);
    let wire = lab.capture.wait_from_gw(mark, 31);
    assert_eq!(
        seqs(&wire, SA_A.out_spi),
        (N + 10..=N + 40).collect::<Vec<_>>(),
        "nothing above the lease on the wire"
    );
    assert_eq!(got, 31);
    let c = wait_for("the lease wait to be counted", || {
        let c = driver.counters(SA_A.in_spi).expect("running");
        (c.lease_waits >= 1).then_some(c)
    })
    .expect("lease_waits counts the expired lease");
    assert_eq!(c.highest_out, N + 40);
    assert!(
        lab.gw.state(SA_A.out_spi).is_none(),
        "the kernel removed the state at its hard limit"
    );

    // c) extend after expiry: installed again, numbering right above the old limit
    driver.extend(SA_A.in_spi, N + 100);
    let again = lab.gw.state(SA_A.out_spi).expect("installed again");
    assert_eq!(again.user_sa_info.lifetime_cur.packets, 0, "a new state");
    assert_eq!(again.user_sa_info.lifetime_cfg.hard_packet_limit, 60);
    let mark = lab.capture.mark();
    lab.gw_send(10);
    assert_eq!(lab.peer_receive(10), 10);
    let wire = lab.capture.wait_from_gw(mark, 10);
    assert_eq!(
        seqs(&wire, SA_A.out_spi),
        (N + 41..=N + 50).collect::<Vec<_>>()
    );
    let c = driver.counters(SA_A.in_spi).expect("running");
    assert_eq!(
        (c.highest_out, c.lease_waits, c.out_packets),
        (N + 50, 1, 10 + 31 + 10),
        "out_packets counts the expired state's packets too: {c:?}"
    );
    println!(
        "{:?} check 3: extend in place (same state, 10 packets on), 31 of 40 sent up to the \
         limit {}, lease_waits {}, re-installed from {}",
        lab.encap,
        N + 40,
        c.lease_waits,
        N + 41
    );
}

/// Check 4: the fence gate, with traffic offered all along.
fn fence(lab: &Lab, driver: &XfrmDriver, gate: &FenceGate) {
    driver.extend(SA_A.in_spi, N + 1_000_000);
    let mark = lab.capture.mark();
    let sender = lab.gw_sender(Duration::from_millis(4));
    lab.capture.wait_at_least(mark, 20);

    let closed = Instant::now();
    gate.close();
    wait_for("the fence to remove the states", || {
        (lab.gw.state(SA_A.out_spi).is_none() && lab.gw.state(SA_A.in_spi).is_none()).then_some(())
    })
    .expect("the fenced states are removed");
    let removed = closed.elapsed();
    // what was already on its way has arrived by now; from here on, nothing may come
    std::thread::sleep(Duration::from_millis(200));
    let fenced = lab.capture.mark();
    let offered_before = sender.sent();
    std::thread::sleep(Duration::from_millis(1000));
    let late = lab.capture.gw_since(fenced);
    assert!(late.is_empty(), "ESP left the gw while fenced: {late:?}");
    let offered = sender.sent() - offered_before;
    assert!(offered > 50, "traffic was offered while fenced ({offered})");
    let highest_before = lab
        .capture
        .gw_since(0)
        .iter()
        .filter(|p| p.spi == SA_A.out_spi)
        .map(|p| u64::from(p.seq))
        .max()
        .expect("packets before the fence");

    let reopen = lab.capture.mark();
    gate.renew_until(u64::MAX);
    let resumed = lab.capture.wait_at_least(reopen, 20);
    let sent_total = sender.stop();
    let resumed_seqs = seqs(&resumed, SA_A.out_spi);
    let first = resumed_seqs[0];
    assert!(
        resumed_seqs.iter().all(|&s| s > highest_before),
        "after the fence, numbering resumes strictly above {highest_before}: {resumed_seqs:?}"
    );
    assert!(
        resumed_seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "{resumed_seqs:?}"
    );
    assert_unique(&lab.capture.gw_since(0));
    let c = wait_for("the counters to catch up", || {
        let c = driver.counters(SA_A.in_spi).expect("running");
        let wire_max = lab
            .capture
            .gw_since(reopen)
            .iter()
            .map(|p| u64::from(p.seq))
            .max();
        (Some(c.highest_out) == wire_max).then_some(c)
    })
    .expect("highest_out matches the wire after the fence");
    let on_wire = lab
        .capture
        .gw_since(0)
        .iter()
        .filter(|p| p.spi == SA_A.out_spi)
        .count() as u64;
    // the packets sent between the fence's last read and its delete are not counted
    assert!(
        c.out_packets <= on_wire && c.out_packets + 5 >= on_wire,
        "out_packets {} across the fence, {on_wire} on the wire",
        c.out_packets
    );
    lab.peer_drain();
    println!(
        "{:?} check 4: states gone {:.0} ms after the gate closed, then no ESP for 1 s while \
         {offered} datagrams were offered; resumed at {first} (highest before \
         {highest_before}), highest_out {}, out_packets {} ({on_wire} on the wire), \
         {sent_total} offered in all",
        lab.encap,
        removed.as_secs_f64() * 1e3,
        c.highest_out,
        c.out_packets
    );
}

/// Check 5: stop leaves nothing behind and sends nothing.
fn stop(lab: &Lab, driver: &XfrmDriver, sa: Sa) {
    let counters = driver.stop(sa.in_spi).expect("running");
    let states = lab.gw.states();
    assert!(
        !states
            .iter()
            .any(|s| [sa.in_spi, sa.out_spi].contains(&s.user_sa_info.id.spi)),
        "a state of the stopped child is left"
    );
    assert!(
        !states
            .iter()
            .any(|s| reqids().contains(s.user_sa_info.reqid)),
        "no child runs, so no state of ours is left"
    );
    let policies = lab.gw.policies();
    assert!(
        !policies
            .iter()
            .any(|p| template_reqids(p).any(|r| reqids().contains(r))),
        "no child runs, so no policy of ours is left"
    );
    let mark = lab.capture.mark();
    lab.gw_send(5);
    std::thread::sleep(Duration::from_millis(500));
    let after: Vec<Esp> = lab.capture.gw_since(mark);
    assert!(after.is_empty(), "ESP sent after stop: {after:?}");
    lab.peer_drain(); // the 5 went out in the clear: no policy is left
    println!(
        "{:?} check 5: {:08x} stopped ({counters:?}), no state or policy left, no ESP sent",
        lab.encap, sa.in_spi
    );
}

/// Check 6: ESN across the 32-bit boundary, the peer's kernel as the judge.
fn esn(lab: &Lab, driver: &XfrmDriver) {
    const START: u64 = (1 << 32) - 5;
    // the peer's inbound replay state near the gw's first number, or it would guess the
    // wrong high half (RFC 4303 appendix A)
    lab.configure_peer(SA_B, 0, START - 16);
    driver
        .start(child(SA_B, lab.encap, START, START + 1000, 0))
        .expect("start the ESN child");
    let errors: Vec<u64> = PEER_ERRORS.iter().map(|e| lab.peer.xfrm_stat(e)).collect();

    let mark = lab.capture.mark();
    lab.gw_send(10);
    assert_eq!(
        lab.peer_receive(10),
        10,
        "the peer's kernel accepts all ten"
    );
    let wire = lab.capture.wait_from_gw(mark, 10);
    let low: Vec<u64> = seqs(&wire, SA_B.out_spi);
    let expect: Vec<u64> = (START..START + 10).map(|s| s & 0xffff_ffff).collect();
    assert_eq!(
        low, expect,
        "the wire carries the low 32 bits, wrapping to 0"
    );
    let peer_nl = lab.peer.netlink();
    let ae = ae_of(&peer_nl, PEER_OUTER, SA_B.out_spi, GW_OUTER, PEER_REQID_IN);
    assert_eq!(
        (ae.seq, ae.packets),
        (START + 9, 10),
        "the peer's ESN replay state is past 2^32"
    );
    for (name, before) in PEER_ERRORS.iter().zip(&errors) {
        assert_eq!(lab.peer.xfrm_stat(name), *before, "the peer counted {name}");
    }

    lab.peer_send(5);
    assert_eq!(lab.gw_receive(5), 5);
    let expect = ChildCounters {
        highest_out: START + 9,
        out_packets: 10,
        highest_in: 5,
        in_packets: 5,
        ..ChildCounters::default()
    };
    let got = wait_for("the ESN counters", || {
        let c = driver.counters(SA_B.in_spi).expect("running");
        (c == expect).then_some(c)
    })
    .unwrap_or_else(|| panic!("{:?}, expected {expect:?}", driver.counters(SA_B.in_spi)));
    println!(
        "{:?} check 6: ESN {START:#x} ..= {:#x} on the wire as {:#x} .. {:#x}, the peer's \
         replay state at {:#x}, no errors; counters {got:?}",
        lab.encap,
        START + 9,
        low[0],
        low[9],
        ae.seq
    );
}

/// What the peer's kernel counts when it refuses an ESP packet.
const PEER_ERRORS: [&str; 4] = [
    "XfrmInStateSeqError",
    "XfrmInStateProtoError",
    "XfrmInNoStates",
    "XfrmInStateInvalid",
];

// ─────────────────────────────────────────── crash ───────────────────────────────────────────

const SA_C: Sa = Sa {
    in_spi: 0xc000_0001,
    out_spi: 0xc000_1001,
    esn: true,
};
/// The lease of the driver process that gets killed.
const OLD_LEASE: u64 = 100_000;

/// The crash test's driver process (in the gw namespace by `ip netns exec`): runs a child
/// until it is killed.
fn driver_process() -> ! {
    let gate = Arc::new(FenceGate::always_open());
    let mut config = XfrmConfig::new(IpAddr::V4(GW_OUTER));
    config.reqids = reqids();
    let (driver, _ike) = XfrmDriver::new(config, gate).expect("the driver process's driver");
    driver
        .start(child(SA_C, Encap::Udp, 1, OLD_LEASE, 0))
        .expect("the driver process's child");
    println!("{READY}");
    std::io::stdout().flush().expect("stdout");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn crash() {
    let started = Instant::now();
    let lab = Lab::new(Encap::Udp);
    lab.configure_peer(SA_C, 0, 0);
    let exe = std::env::current_exe().expect("the test binary");
    let mut process = Command::new("ip")
        .args(["netns", "exec", lab.gw.ns.name()])
        .arg(&exe)
        .args([
            "--exact",
            "a_killed_driver_is_flushed_by_its_successor",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DRIVER_PROCESS, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("the driver process");
    let (ready_tx, ready_rx) = mpsc::channel();
    let stdout = process.stdout.take().expect("its stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains(READY) {
                let _ = ready_tx.send(());
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the driver process starts its child");

    // traffic through the process's states, then SIGKILL while it flows
    let mark = lab.capture.mark();
    lab.gw_send(20);
    assert_eq!(lab.peer_receive(20), 20);
    let wire = lab.capture.wait_from_gw(mark, 20);
    assert_eq!(seqs(&wire, SA_C.out_spi), (1..=20).collect::<Vec<_>>());
    let sender = lab.gw_sender(Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(300));
    let pid = nix::unistd::Pid::from_raw(process.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let status = process.wait().expect("the killed process");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9),
        "{status}"
    );
    std::thread::sleep(Duration::from_millis(100));
    let dead = lab.capture.mark();
    std::thread::sleep(Duration::from_millis(500));
    let offered = sender.stop();
    let after_kill = lab.capture.gw_since(dead).len();
    assert!(
        after_kill > 0,
        "the killed process's states went on encrypting"
    );
    let left: Vec<u32> = lab
        .gw
        .states()
        .iter()
        .filter(|s| reqids().contains(s.user_sa_info.reqid))
        .map(|s| s.user_sa_info.id.spi)
        .collect();
    let mut sorted = left.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        vec![SA_C.in_spi, SA_C.out_spi],
        "the killed process left its two states"
    );
    let left_policies = lab
        .gw
        .policies()
        .iter()
        .filter(|p| template_reqids(p).any(|r| reqids().contains(r)))
        .count();
    assert_eq!(left_policies, 3, "and its policies (out, in, fwd)");
    let old_highest = lab
        .capture
        .gw_since(0)
        .iter()
        .map(|p| u64::from(p.seq))
        .max()
        .expect("ESP before the crash");
    assert!(old_highest <= OLD_LEASE);
    lab.peer_drain();

    // the successor: flush first, nothing of the old process left before any start
    let gate = Arc::new(FenceGate::always_open());
    let (driver, _ike) = lab.driver(gate);
    let states = lab.gw.states();
    let policies = lab.gw.policies();
    assert!(
        !states
            .iter()
            .any(|s| reqids().contains(s.user_sa_info.reqid)
                || [SA_C.in_spi, SA_C.out_spi].contains(&s.user_sa_info.id.spi)),
        "the new driver flushed the old states"
    );
    assert!(
        !policies
            .iter()
            .any(|p| template_reqids(p).any(|r| reqids().contains(r))),
        "the new driver flushed the old policies"
    );

    // the owner runtime starts the child again above the old lease
    driver
        .start(child(SA_C, Encap::Udp, OLD_LEASE + 1, OLD_LEASE + 1000, 0))
        .expect("the successor's child");
    let mark = lab.capture.mark();
    lab.gw_send(20);
    assert_eq!(lab.peer_receive(20), 20, "the peer accepts the successor's");
    let wire = lab.capture.wait_from_gw(mark, 20);
    assert_eq!(
        seqs(&wire, SA_C.out_spi),
        (OLD_LEASE + 1..=OLD_LEASE + 20).collect::<Vec<_>>()
    );
    let all = lab.capture.gw_since(0);
    assert_unique(&all);
    driver.shutdown();
    println!(
        "crash: the killed driver's {} states and {left_policies} policies were left (and \
         sent {after_kill} packets after the kill, {offered} offered), the successor flushed \
         them; numbering {} ..= {old_highest} before, {} .. after; {} ESP packets on the wire, \
         none repeated; {:.1} s in the VM",
        left.len(),
        1,
        OLD_LEASE + 1,
        all.len(),
        started.elapsed().as_secs_f64()
    );
}

// ───────────────────────────────────────── the lab ──────────────────────────────────────────

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Encap {
    /// IP protocol 50.
    Plain,
    /// ESP in UDP, port 4500.
    Udp,
}

impl Encap {
    fn describe(self) -> &'static str {
        match self {
            Encap::Plain => "plain ESP (protocol 50)",
            Encap::Udp => "ESP in UDP (port 4500)",
        }
    }
}

/// A child's SPIs (in: peer → gw) and whether it uses ESN.
#[derive(Copy, Clone, Debug)]
struct Sa {
    in_spi: u32,
    out_spi: u32,
    esn: bool,
}

fn child(sa: Sa, encap: Encap, next_seq: u64, limit: u64, replay_floor: u64) -> ChildStart {
    ChildStart {
        ike: SaId(1),
        epoch: Epoch::FIRST,
        in_spi: sa.in_spi,
        out_spi: sa.out_spi,
        suite: ChildSuite {
            encryption: ENCR_AES_GCM_16,
            key_bits: 128,
            esn: sa.esn,
        },
        keys: Some(ChildKeymat::new(KEY_IN.to_vec(), KEY_OUT.to_vec())),
        ts_local: vec![prefix_selector(IpAddr::V4(GW_INNER), 32)],
        ts_remote: vec![prefix_selector(IpAddr::V4(PEER_INNER), 32)],
        local: SocketAddr::from((GW_OUTER, NATT)),
        peer: SocketAddr::from((PEER_OUTER, NATT)),
        udp_encap: encap == Encap::Udp,
        next_seq,
        limit,
        replay_floor,
    }
}

/// One end: its namespace, a netlink socket in it, its application socket.
struct Host {
    ns: Arc<NetNs>,
    netlink: XfrmNetlink,
    app: UdpSocket,
}

impl Host {
    fn new(tag: &str, inner: Ipv4Addr) -> Host {
        let ns = Arc::new(NetNs::create(tag).expect("namespace"));
        ns.ip(&["addr", "add", &format!("{inner}/32"), "dev", "lo"])
            .expect("inner address");
        let netlink = ns
            .run(XfrmNetlink::open)
            .expect("thread in the namespace")
            .expect("NETLINK_XFRM");
        let app = ns
            .run(move || UdpSocket::bind((inner, APP_PORT)))
            .expect("thread in the namespace")
            .expect("application socket");
        Host { ns, netlink, app }
    }

    fn netlink(&self) -> XfrmNetlink {
        self.ns
            .run(XfrmNetlink::open)
            .expect("thread in the namespace")
            .expect("NETLINK_XFRM")
    }

    fn states(&self) -> Vec<StateModifyMessage> {
        self.netlink.dump_states().expect("GETSA dump")
    }

    /// The (non-larval) state with this SPI.
    fn state(&self, spi: u32) -> Option<StateModifyMessage> {
        self.states()
            .into_iter()
            .find(|s| s.user_sa_info.id.spi == spi)
    }

    fn policies(&self) -> Vec<PolicyModifyMessage> {
        self.netlink
            .request(
                "GETPOLICY (dump)",
                XfrmMessage::GetPolicy(PolicyDelGetMessage::default()),
                NLM_F_REQUEST | NLM_F_DUMP,
            )
            .expect("GETPOLICY dump")
            .into_iter()
            .filter_map(|m| match m {
                XfrmMessage::AddPolicy(p) => Some(p),
                _ => None,
            })
            .collect()
    }

    /// A counter of the namespace's `/proc/net/xfrm_stat`.
    fn xfrm_stat(&self, name: &'static str) -> u64 {
        self.ns
            .run(move || {
                // thread-self: /proc/net is the main thread's namespace
                let text =
                    std::fs::read_to_string("/proc/thread-self/net/xfrm_stat").expect("xfrm_stat");
                text.lines()
                    .find_map(|l| {
                        let (key, value) = l.split_once(char::is_whitespace)?;
                        (key == name).then(|| value.trim().parse().expect("a number"))
                    })
                    .unwrap_or_else(|| panic!("no {name} in xfrm_stat"))
            })
            .expect("thread in the namespace")
    }
}

struct Lab {
    encap: Encap,
    gw: Host,
    peer: Host,
    capture: Capture,
    /// The peer's ESP-in-UDP socket (`UDP_ENCAP_ESPINUDP`).
    _peer_natt: Option<UdpSocket>,
}

impl Lab {
    fn new(encap: Encap) -> Lab {
        let modprobe = Command::new("modprobe")
            .args(["-a", "esp4", "xfrm_user", "veth"])
            .status()
            .expect("modprobe");
        assert!(
            modprobe.success(),
            "modprobe esp4 xfrm_user veth: {modprobe}"
        );
        let gw = Host::new("gw", GW_INNER);
        let peer = Host::new("peer", PEER_INNER);
        let took = gw
            .ns
            .run(|| evpc_testkit::vm::warm_up_esp(&[]))
            .expect("thread in the namespace");
        println!("rfc4106(gcm(aes)) ready after {:.1} s", took.as_secs_f64());
        veth_pair(
            &gw.ns,
            "gw0",
            (IpAddr::V4(GW_OUTER), 24),
            &peer.ns,
            "peer0",
            (IpAddr::V4(PEER_OUTER), 24),
        )
        .expect("veth");
        for (host, via, inner, dst) in [
            (&gw, PEER_OUTER, GW_INNER, PEER_INNER),
            (&peer, GW_OUTER, PEER_INNER, GW_INNER),
        ] {
            host.ns
                .ip(&[
                    "route",
                    "add",
                    &format!("{dst}/32"),
                    "via",
                    &via.to_string(),
                    "src",
                    &inner.to_string(),
                ])
                .expect("route to the other inner address");
        }
        let peer_natt = (encap == Encap::Udp).then(|| {
            peer.ns
                .run(|| {
                    let socket = UdpSocket::bind((PEER_OUTER, NATT)).expect("peer UDP 4500");
                    setsockopt(&socket.as_fd(), UdpEncap, &UDP_ENCAP_ESPINUDP)
                        .expect("UDP_ENCAP_ESPINUDP");
                    socket
                })
                .expect("thread in the namespace")
        });
        let capture = Capture::start(&peer.ns);
        Lab {
            encap,
            gw,
            peer,
            capture,
            _peer_natt: peer_natt,
        }
    }

    fn driver(&self, gate: Arc<FenceGate>) -> (XfrmDriver, IkeReceiver) {
        self.gw
            .ns
            .run(move || {
                let mut config = XfrmConfig::new(IpAddr::V4(GW_OUTER));
                config.reqids = reqids();
                XfrmDriver::new(config, gate)
            })
            .expect("thread in the namespace")
            .expect("the kernel data plane (this kernel has ESP)")
    }

    /// The peer's side of a child, replacing the last one: its outbound state numbers from
    /// `oseq + 1`, its inbound one takes numbers above `seq`.
    fn configure_peer(&self, sa: Sa, oseq: u64, seq: u64) {
        let peer = &self.peer.ns;
        peer.ip(&["xfrm", "state", "flush"]).expect("flush");
        peer.ip(&["xfrm", "policy", "flush"]).expect("flush");
        let hex = |key: &[u8]| {
            let digits: String = key.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{digits}")
        };
        let state = |src: Ipv4Addr,
                     dst: Ipv4Addr,
                     spi: u32,
                     reqid: u32,
                     key: &[u8],
                     replay: [String; 4]| {
            let mut args: Vec<String> = [
                "xfrm",
                "state",
                "add",
                "src",
                &src.to_string(),
                "dst",
                &dst.to_string(),
                "proto",
                "esp",
                "spi",
                &format!("{spi:#x}"),
                "reqid",
                &reqid.to_string(),
                "mode",
                "tunnel",
                "aead",
                "rfc4106(gcm(aes))",
                &hex(key),
                "128",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            if sa.esn {
                args.extend(["flag", "esn", "replay-window", "128"].map(String::from));
                args.extend(replay);
            } else {
                args.extend(["replay-window", "32"].map(String::from));
                args.extend(replay.into_iter().take(2));
            }
            if self.encap == Encap::Udp {
                args.extend(["encap", "espinudp", "4500", "4500", "0.0.0.0"].map(String::from));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            peer.ip(&args).expect("the peer's state");
        };
        state(
            PEER_OUTER,
            GW_OUTER,
            sa.in_spi,
            PEER_REQID_OUT,
            &KEY_IN,
            [
                "replay-oseq".into(),
                format!("{:#x}", oseq & 0xffff_ffff),
                "replay-oseq-hi".into(),
                format!("{:#x}", oseq >> 32),
            ],
        );
        state(
            GW_OUTER,
            PEER_OUTER,
            sa.out_spi,
            PEER_REQID_IN,
            &KEY_OUT,
            [
                "replay-seq".into(),
                format!("{:#x}", seq & 0xffff_ffff),
                "replay-seq-hi".into(),
                format!("{:#x}", seq >> 32),
            ],
        );
        for (src, dst, dir, tsrc, tdst, reqid) in [
            (
                PEER_INNER,
                GW_INNER,
                "out",
                PEER_OUTER,
                GW_OUTER,
                PEER_REQID_OUT,
            ),
            (
                GW_INNER,
                PEER_INNER,
                "in",
                GW_OUTER,
                PEER_OUTER,
                PEER_REQID_IN,
            ),
        ] {
            peer.ip(&[
                "xfrm",
                "policy",
                "add",
                "src",
                &format!("{src}/32"),
                "dst",
                &format!("{dst}/32"),
                "dir",
                dir,
                "tmpl",
                "src",
                &tsrc.to_string(),
                "dst",
                &tdst.to_string(),
                "proto",
                "esp",
                "reqid",
                &reqid.to_string(),
                "mode",
                "tunnel",
            ])
            .expect("the peer's policy");
        }
    }

    fn gw_send(&self, n: usize) {
        send(&self.gw.app, PEER_INNER, n);
    }

    fn peer_send(&self, n: usize) {
        send(&self.peer.app, GW_INNER, n);
    }

    fn gw_receive(&self, want: usize) -> usize {
        receive(&self.gw.app, want)
    }

    fn peer_receive(&self, want: usize) -> usize {
        receive(&self.peer.app, want)
    }

    fn peer_drain(&self) {
        receive(&self.peer.app, 0);
    }

    /// Offers gw → peer datagrams every `every` until stopped.
    fn gw_sender(&self, every: Duration) -> Sender {
        let socket = self.gw.app.try_clone().expect("socket");
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let _ = socket.send_to(b"offered", (PEER_INNER, APP_PORT));
                    sent.fetch_add(1, Ordering::AcqRel);
                    std::thread::sleep(every);
                }
            })
        };
        Sender {
            stop,
            sent,
            thread: Some(thread),
        }
    }
}

struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("sender");
        }
        self.sent()
    }
}

/// `n` datagrams to `to`'s application port, paced a little (send errors — a state past its
/// lease, a fenced child — are what some checks provoke).
fn send(socket: &UdpSocket, to: Ipv4Addr, n: usize) {
    for i in 0..n {
        let _ = socket.send_to(format!("datagram {i}").as_bytes(), (to, APP_PORT));
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Counts datagrams until `want` arrived (or 10 s passed), then 300 ms more for extras.
fn receive(socket: &UdpSocket, want: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = 0;
    let mut buf = [0u8; 2048];
    loop {
        let now = Instant::now();
        let wait = if got < want && now < deadline {
            deadline - now
        } else {
            Duration::from_millis(300)
        };
        socket.set_read_timeout(Some(wait)).expect("timeout");
        match socket.recv(&mut buf) {
            Ok(_) => got += 1,
            Err(_) if got < want && Instant::now() < deadline => continue,
            Err(_) => return got,
        }
    }
}

/// Polls `check` (every 20 ms, for up to 10 s).
fn wait_for<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() > deadline {
            eprintln!("gave up waiting for {what}");
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ae_of(
    nl: &XfrmNetlink,
    dst: Ipv4Addr,
    spi: u32,
    src: Ipv4Addr,
    reqid: u32,
) -> evpc_dataplane::xfrm::AeValues {
    let answers = nl
        .request(
            "GETAE",
            XfrmMessage::GetAsyncEvent(get_ae(IpAddr::V4(dst), spi, IpAddr::V4(src), reqid)),
            NLM_F_REQUEST,
        )
        .expect("GETAE");
    answers
        .iter()
        .find_map(|m| match m {
            XfrmMessage::NewAsyncEvent(ae) => Some(parse_ae(ae)),
            _ => None,
        })
        .expect("a NEWAE answer")
}

// ───────────────────────────────────────── the capture ───────────────────────────────────────

/// An ESP packet seen on the peer's side of the wire.
#[derive(Copy, Clone, Debug)]
struct Esp {
    /// Sent by the gw (else by the peer).
    from_gw: bool,
    /// In UDP (else IP protocol 50).
    udp: bool,
    spi: u32,
    seq: u32,
}

/// Every ESP packet in the peer's namespace (both directions), from an `AF_PACKET` socket.
struct Capture {
    seen: Arc<Mutex<Vec<Esp>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    fn start(ns: &NetNs) -> Capture {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (seen, stop) = (Arc::clone(&seen), Arc::clone(&stop));
            ns.spawn("capture", move || {
                let fd = socket(
                    AddressFamily::Packet,
                    SockType::Datagram,
                    SockFlag::empty(),
                    SockProtocol::EthAll,
                )
                .expect("AF_PACKET socket");
                setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::milliseconds(50))
                    .expect("SO_RCVTIMEO");
                setsockopt(&fd, sockopt::RcvBuf, &(4 << 20)).expect("SO_RCVBUF");
                ready_tx.send(()).expect("ready");
                let mut buf = [0u8; 4096];
                while !stop.load(Ordering::Acquire) {
                    match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                        Ok(len) => {
                            if let Some(esp) = parse_esp(&buf[..len]) {
                                seen.lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .push(esp);
                            }
                        }
                        Err(Errno::EAGAIN | Errno::EINTR) => {}
                        Err(e) => panic!("capture: {e}"),
                    }
                }
            })
            .expect("capture thread")
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the capture starts");
        Capture {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Esp>> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn mark(&self) -> usize {
        self.lock().len()
    }

    fn since(&self, mark: usize) -> Vec<Esp> {
        self.lock()[mark..].to_vec()
    }

    fn gw_since(&self, mark: usize) -> Vec<Esp> {
        self.lock()[mark..]
            .iter()
            .filter(|p| p.from_gw)
            .copied()
            .collect()
    }

    /// Waits (10 s at most) until the gw sent at least `n` ESP packets since `mark` (traffic
    /// that goes on).
    fn wait_at_least(&self, mark: usize, n: usize) -> Vec<Esp> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.gw_since(mark);
            if seen.len() >= n || Instant::now() > deadline {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The gw's ESP packets since `mark`, once there are at least `n` (10 s at most) and no
    /// more came for 300 ms.
    fn wait_from_gw(&self, mark: usize, n: usize) -> Vec<Esp> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.gw_since(mark).len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        loop {
            let count = self.gw_since(mark).len();
            std::thread::sleep(Duration::from_millis(300));
            if self.gw_since(mark).len() == count {
                return self.gw_since(mark);
            }
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An IPv4 packet (no link header: a `SOCK_DGRAM` packet socket) → the ESP header it carries,
/// plain or in UDP on port 4500 (not IKE behind the non-ESP marker, not a keepalive).
fn parse_esp(packet: &[u8]) -> Option<Esp> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let from_gw = match src {
        GW_OUTER => true,
        PEER_OUTER => false,
        _ => return None,
    };
    let be32 = |at: usize| -> Option<u32> {
        Some(u32::from_be_bytes(packet.get(at..at + 4)?.try_into().ok()?))
    };
    let (udp, esp_at) = match packet[9] {
        50 => (false, ihl),
        17 => {
            let dport = u16::from_be_bytes(packet.get(ihl + 2..ihl + 4)?.try_into().ok()?);
            if dport != NATT {
                return None;
            }
            (true, ihl + 8)
        }
        _ => return None,
    };
    let spi = be32(esp_at)?;
    if spi == 0 {
        return None; // the non-ESP marker: IKE
    }
    Some(Esp {
        from_gw,
        udp,
        spi,
        seq: be32(esp_at + 4)?,
    })
}

/// The sequence numbers of `spi`'s packets, in wire order.
fn seqs(packets: &[Esp], spi: u32) -> Vec<u64> {
    assert!(
        packets.iter().all(|p| p.spi == spi),
        "only {spi:08x} should be sending: {packets:?}"
    );
    packets.iter().map(|p| u64::from(p.seq)).collect()
}

/// No (SPI, sequence number) twice among the gw's packets.
fn assert_unique(packets: &[Esp]) {
    let mut keys: Vec<(u32, u32)> = packets.iter().map(|p| (p.spi, p.seq)).collect();
    keys.sort_unstable();
    let repeated: Vec<&[(u32, u32)]> = keys.windows(2).filter(|w| w[0] == w[1]).collect();
    assert!(repeated.is_empty(), "(SPI, seq) sent twice: {repeated:x?}");
}
