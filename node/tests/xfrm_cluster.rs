//! A 3-node cluster on the kernel data plane (`backend = "xfrm"`) with an unmodified
//! strongSwan road warrior, through the owner's death and a planned transfer, checked on the
//! wire. Runs inside a VM whose kernel has ESP (`evpc_testkit::vm`: the development and CI
//! kernel has none), as root; `.ci/run` installs what it needs.
//!
//! ```text
//!   host: cargo test ── vm::run_test ── qemu (Debian kernel, host / read-only + overlay)
//!                                          └─ this test binary, EVPC_IN_VM=1:
//!   ns client: charon (kernel-libipsec), UDP probes to 10.10.0.1:7777, tcpdump on c0
//!        │ 198.51.100.1 → multicast MAC: every node gets every frame
//!   ns lan: br0 ── ns node1 / node2 / node3: evpc-node, backend = "xfrm"
//!                   lo 198.51.100.1/32, dummy evpc0 10.10.0.1/24, UDP echo on 7777
//!                   the owner's kernel holds the child's two states and its policies;
//!                   the others' kernels drop the SA's ESP (no state for the SPI)
//! ```
//!
//! What is checked:
//! 1. strongSwan connects; the owner's kernel holds states for the child's SPIs and no other
//!    node's does; UDP echoes through the tunnel.
//! 2. The owner is SIGKILLed while traffic flows: another node takes the SA over, its kernel
//!    gets the states, traffic resumes (the outage is printed), strongSwan keeps its IKE SA
//!    (same SPIs, one IKE_AUTH).
//! 3. A planned transfer to the third node: its kernel gets the states, the previous owner's
//!    kernel loses them, traffic goes on (the gap is printed).
//! 4. The capture of every ESP packet on the client's link: no (SPI, sequence number) twice,
//!    and per SPI every owner's numbers lie above all of its predecessors' — including
//!    those of the killed node, whose kernel states outlive its process within their lease.

#[path = "common/swan.rs"]
mod swan;

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use evpc_node::config::Timeouts;
use evpc_testkit::lab::{CLUSTER, Lab, LabDataplane, LabSpec};
use evpc_testkit::vm::{self, VmOptions};
use evpc_testkit::wire::{Capture, EspPacket, format_mac, repeats, wall_now};
use swan::*;

const TEST: &str =
    "strongswan_through_a_kernel_data_plane_cluster_survives_an_owner_kill_and_a_transfer";

#[test]
fn strongswan_through_a_kernel_data_plane_cluster_survives_an_owner_kill_and_a_transfer() {
    if !vm::inside() {
        vm::run_test(
            TEST,
            &VmOptions {
                timeout: Duration::from_secs(600),
                memory_mib: 2048,
                cpus: 2,
            },
        );
        return;
    }
    if !can_run(TEST) {
        return;
    }
    let took = vm::warm_up_esp(&["esp4", "xfrm_user", "dummy", "veth", "bridge", "tun"]);
    println!(
        "kernel ESP with AES-GCM ready after {:.1} s",
        took.as_secs_f64()
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(scenario());
}

/// The link-layer address of `dev` in namespace `ns`.
fn mac(ns: &str, dev: &str) -> String {
    let (ok, out) = output("ip", &["-n", ns, "-o", "link", "show", dev]);
    assert!(ok, "ip link show {dev}: {out}");
    out.split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("a MAC")
        .to_owned()
}

/// SPIs of the XFRM states in namespace `ns`.
fn kernel_spis(ns: &str) -> Vec<u32> {
    let (ok, out) = output("ip", &["-n", ns, "xfrm", "state"]);
    assert!(ok, "ip xfrm state: {out}");
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "spi")
        .filter_map(|w| u32::from_str_radix(w[1].trim_start_matches("0x"), 16).ok())
        .collect()
}

fn spi(hex: &str) -> u32 {
    u32::from_str_radix(hex, 16).expect("a hex SPI")
}

/// Waits until exactly `owner`'s kernel holds both SPIs of the child.
fn wait_states_on(lab: &Lab, owner: u64, spis: (u32, u32), secs: u64, alive: &[u64]) {
    wait_until(
        secs,
        || {
            alive.iter().all(|id| {
                let have = kernel_spis(lab.node_ns(*id).name());
                let holds = have.contains(&spis.0) && have.contains(&spis.1);
                holds == (*id == owner)
            })
        },
        &format!("the child's kernel states on node {owner} only"),
    );
}

async fn wait_owner(lab: &Lab, not: u64, secs: u64) -> evpc_proto::admin::v1::SaInfo {
    let mut admin = lab.admin().expect("admin client");
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(sas) = admin.all_sas(None).await
            && let Some(sa) = sas.first()
            && sa.owner != not
            && sa.owner != 0
        {
            return sa.clone();
        }
        assert!(Instant::now() < deadline, "nobody took the SA over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The longest time without an echo reply in `(from, to)`.
fn longest_gap(traffic: &Traffic, from: Instant, to: Instant) -> Duration {
    let mut times: Vec<Instant> = traffic
        .replies_after(from)
        .into_iter()
        .map(|(_, _, r)| r)
        .filter(|r| *r <= to)
        .collect();
    times.sort();
    let mut gap = Duration::ZERO;
    let mut last = from;
    for t in times {
        gap = gap.max(t.duration_since(last));
        last = t;
    }
    gap
}

async fn scenario() {
    let t0 = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("evpc-xfrm-swan-")
        .tempdir()
        .expect("tempdir");
    let psk_file = scratch.path().join("psk.toml");
    fs::write(
        &psk_file,
        format!("[[psk]]\npeer = \"client.example\"\nsecret = \"{PSK}\"\n"),
    )
    .expect("psk file");
    let mut spec = LabSpec::new(
        3,
        "kx",
        PathBuf::from(env!("CARGO_BIN_EXE_evpc-node")),
        settings(psk_file),
    );
    spec.dataplane = LabDataplane::Xfrm;
    // Every instruction is emulated: timing five times as lax as the defaults, so that a
    // busy but healthy node is not voted out or declared down.
    spec.timeouts = Timeouts {
        heartbeat_ms: 250,
        election_min_ms: 1_500,
        election_max_ms: 3_000,
        rpc_ms: 5_000,
    };
    spec.ownership.failover_ms = 2_500;
    spec.ownership.fence_ms = 2_000;
    // The SA visits all three nodes (an owner, its successor, a third by transfer): the
    // leader must be able to take it.
    spec.ownership.leader_serves = true;
    spec.log_filter =
        "info,evpc_dataplane=debug,openraft=error,sled=warn,h2=warn,tower=warn".into();
    let mut lab = Lab::start(spec)
        .await
        .expect("3-node ClusterIP lab on XFRM");
    println!(
        "lab up after {:.1} s (backend xfrm, kernel {})",
        t0.elapsed().as_secs_f64(),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    for id in 1..=3 {
        assert!(
            lab.log(id).contains("kernel (XFRM) data plane running"),
            "node {id} runs the kernel data plane:\n{}",
            lab.log(id)
        );
    }
    let senders: BTreeMap<String, String> = (1..=3)
        .map(|id| (mac(lab.node_ns(id).name(), "n0"), format!("node {id}")))
        .chain([(mac(lab.client_ns().name(), "c0"), "the client".to_string())])
        .collect();
    let capture = Capture::start(Some(lab.client_ns().name()), "c0").expect("tcpdump on c0");
    let charon = Charon::start(&scratch.path().join("charon"), lab.client_ns().name());
    charon.follow_lab_logs(&lab);
    let traffic = Traffic::start(&lab);
    let mut admin = lab.admin().expect("admin client");

    // ---- 1. connect
    let (ok, out) = charon.swanctl(&["--initiate", "--child", "home", "--timeout", "60"]);
    assert!(
        ok && out.contains("initiate completed successfully"),
        "initiate: {out}"
    );
    let list = charon.list_sas();
    let (spi_i, spi_r) = ike_spis(&list).expect("IKE SPIs");
    let sa = the_sa(&mut admin).await;
    assert_eq!(sa.children.len(), 1);
    let child = (spi(&sa.children[0].in_spi), spi(&sa.children[0].out_spi));
    let first_owner = sa.owner;
    println!(
        "IKE SA {} owned by node {first_owner}; child in {:08x} out {:08x}",
        sa.id, child.0, child.1
    );
    wait_states_on(&lab, first_owner, child, 30, &[1, 2, 3]);
    traffic.set_probing(true);
    let t_flow = Instant::now();
    traffic.wait_flowing(t_flow, 60, "UDP echoes through the kernel's ESP");
    println!("traffic flows through node {first_owner}'s kernel");

    // ---- 2. SIGKILL the owner while traffic flows
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let killed_wall = wall_now();
    lab.sigkill(first_owner).await.expect("SIGKILL the owner");
    let taken = wait_owner(&lab, first_owner, 60).await;
    println!(
        "SIGKILLed node {first_owner}; node {} took the SA over (epoch {}) {:.0} ms later",
        taken.owner,
        taken.epoch,
        killed_at.elapsed().as_secs_f64() * 1000.0
    );
    let alive: Vec<u64> = lab.alive_ids();
    wait_states_on(&lab, taken.owner, child, 30, &alive);
    traffic.wait_flowing(killed_at, 60, "traffic through the new owner");
    // replies from the new owner: the dead node's kernel may still answer within its lease
    let settle = Instant::now() + Duration::from_secs(3);
    tokio::time::sleep_until(settle.into()).await;
    println!(
        "longest gap in the echoes around the kill: {:.0} ms",
        longest_gap(
            &traffic,
            killed_at - Duration::from_millis(500),
            Instant::now()
        )
        .as_secs_f64()
            * 1000.0
    );

    // ---- 3. a planned transfer to the third node
    let third = *alive
        .iter()
        .find(|id| **id != taken.owner)
        .expect("a third node");
    let transfer_at = Instant::now();
    let reply = admin
        .transfer_sa(&sa.id, third)
        .await
        .expect("TransferSa to the third node");
    println!("TransferSa to node {third}: {reply:?}");
    let moved = wait_owner(&lab, taken.owner, 60).await;
    assert_eq!(moved.owner, third);
    wait_states_on(&lab, third, child, 30, &alive);
    traffic.wait_flowing(transfer_at, 60, "traffic after the transfer");
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!(
        "longest gap in the echoes around the transfer: {:.0} ms",
        longest_gap(
            &traffic,
            transfer_at - Duration::from_millis(500),
            Instant::now()
        )
        .as_secs_f64()
            * 1000.0
    );

    // ---- strongSwan kept its IKE SA throughout
    let list = charon.list_sas();
    println!("---- swanctl --list-sas at the end ----\n{list}");
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    assert_eq!(
        ike_spis(&list),
        Some((spi_i, spi_r)),
        "strongSwan kept its IKE SA"
    );
    let log = charon.log();
    assert_eq!(
        log.matches("generating IKE_AUTH request").count(),
        1,
        "no re-authentication"
    );

    // ---- 4. the wire
    traffic.set_probing(false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let packets = capture.stop().expect("the capture");
    check_wire(&packets, child, &senders, killed_wall, first_owner);
    println!("test took {:.1} s", t0.elapsed().as_secs_f64());
    drop(traffic);
    drop(charon);
    drop(lab);
}

/// No (SPI, sequence number) twice; per SPI, each sender's numbers above all earlier
/// senders'.
fn check_wire(
    packets: &[EspPacket],
    child: (u32, u32),
    senders: &BTreeMap<String, String>,
    killed_at: Duration,
    killed: u64,
) {
    let repeated = repeats(packets);
    for r in repeated.iter().take(20) {
        println!("NONCE REUSE: {r}");
    }
    assert!(
        repeated.is_empty(),
        "{} (SPI, sequence number) pairs went out twice",
        repeated.len()
    );
    let name = |p: &EspPacket| {
        senders
            .get(&p.mac())
            .cloned()
            .unwrap_or_else(|| format_mac(&p.src_mac))
    };
    let from_cluster: Vec<&EspPacket> = packets
        .iter()
        .filter(|p| p.src == CLUSTER && p.spi == child.1)
        .collect();
    let to_cluster = packets.iter().filter(|p| p.dst == CLUSTER).count();
    assert!(
        from_cluster.len() >= 30,
        "too few ESP packets from the cluster on the wire: {}",
        from_cluster.len()
    );
    // senders in order of appearance, with their sequence-number ranges
    let mut order: Vec<(String, u32, u32, usize)> = Vec::new();
    for p in &from_cluster {
        let who = name(p);
        match order.iter_mut().find(|(w, ..)| *w == who) {
            Some((_, lo, hi, n)) => {
                *lo = (*lo).min(p.seq);
                *hi = (*hi).max(p.seq);
                *n += 1;
            }
            None => order.push((who, p.seq, p.seq, 1)),
        }
    }
    println!(
        "on the wire: {} ESP packets checked ({} from the cluster on SPI {:08x}, {} to it), no (SPI, sequence number) twice",
        packets.len(),
        from_cluster.len(),
        child.1,
        to_cluster
    );
    for (who, lo, hi, n) in &order {
        println!("  {who}: {n} packets, sequence numbers {lo}..={hi}");
    }
    let zombie = from_cluster
        .iter()
        .filter(|p| p.at > killed_at && name(p) == format!("node {killed}"))
        .count();
    println!(
        "  after its SIGKILL, node {killed}'s kernel sent {zombie} packets (its states outlive the process, within their lease)"
    );
    assert!(
        order.len() >= 3,
        "three owners in turn sent on the SPI: {order:?}"
    );
    for pair in order.windows(2) {
        assert!(
            pair[0].2 < pair[1].1,
            "{} sent up to {}, but {} then started at {}: a later owner must start above",
            pair[0].0,
            pair[0].2,
            pair[1].0,
            pair[1].1
        );
    }
}
