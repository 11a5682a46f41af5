//! An unmodified strongSwan road warrior against a 3-node evpc cluster, through the owner's
//! death (needs root and strongSwan; `.ci/run` installs it).
//!
//! Topology (`evpc_testkit::lab`): a client namespace running charon with
//! kernel-libipsec (TUN `ipsec0`, ESP in UDP 4500) and three node namespaces on one bridge; the
//! client maps the cluster address 198.51.100.1 to a multicast MAC, so every node receives
//! every packet for it and only the SA's owner answers. Each node's TUN `evpc0` holds
//! 10.10.0.1/24, where a UDP echo server answers; the inner-address pool is 10.10.0.0/24.
//!
//! What is checked:
//! 1. strongSwan (PSK, aes128gcm16-prfsha256-x25519, `vips = 0.0.0.0`, `remote_ts =
//!    10.10.0.0/24`, `dpd_delay = 2s`) connects; the SA is in the replicated state with the
//!    inner address strongSwan got; UDP echoes through the tunnel; the gateway's DPD is
//!    answered.
//! 2. The node owning the SA is SIGKILLed while traffic flows. Another node takes the SA over:
//!    strongSwan's DPD is answered by it, the gateway's own DPD comes from it, traffic resumes
//!    (the outage is printed), and strongSwan's IKE SA is the same one (same SPIs in `swanctl
//!    --list-sas`; exactly one IKE_SA_INIT and one IKE_AUTH in charon.log).
//! 3. After the failover, a child rekey and an IKE rekey (both from strongSwan, with PFS)
//!    succeed on the new owner, traffic flows on the new child, and the replicated record
//!    follows the new IKE SPIs in place (same id, rekey generation 1).
//!
//! Skips loudly when not root or strongSwan is missing; under `CI=true` that is a failure.
//! Every namespace and process is removed on every exit path (guards' `Drop`), and on failure
//! charon's log and the nodes' logs are printed.

#[path = "common/swan.rs"]
mod swan;

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use evpc_testkit::lab::{Lab, LabSpec};
use swan::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strongswan_keeps_its_ike_sa_when_the_owning_node_dies() {
    const TEST: &str = "strongswan_keeps_its_ike_sa_when_the_owning_node_dies";
    if !can_run(TEST) {
        return;
    }
    let t0 = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("evpc-swan-")
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
        "swan",
        PathBuf::from(env!("CARGO_BIN_EXE_evpc-node")),
        settings(psk_file),
    );
    spec.log_filter =
        "info,evpc_node::ike_gateway=debug,openraft=error,sled=warn,h2=warn,tower=warn".into();
    let mut lab = Lab::start(spec).await.expect("3-node ClusterIP lab");
    println!(
        "lab up after {:.1} s in {}",
        t0.elapsed().as_secs_f64(),
        lab.dir().display()
    );
    // Declared after the lab: dropped (killed) before it, so charon never outlives its namespace.
    let charon = Charon::start(&scratch.path().join("charon"), lab.client_ns().name());
    charon.follow_lab_logs(&lab);
    let traffic = Traffic::start(&lab);
    let mut admin = lab.admin().expect("admin client");

    // ---- 1. connect
    let (ok, out) = charon.swanctl(&["--initiate", "--child", "home", "--timeout", "30"]);
    assert!(
        ok && out.contains("initiate completed successfully"),
        "initiate: {out}"
    );
    let list = charon.list_sas();
    println!("---- swanctl --list-sas after connecting ----\n{list}");
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    let vip = virtual_ip(&list).expect("strongSwan got an inner address");
    let (spi_i, spi_r) = ike_spis(&list).expect("IKE SPIs");
    let sa = the_sa(&mut admin).await;
    assert_eq!(
        sa.virtual_ip, vip,
        "the replicated pool holds strongSwan's address"
    );
    assert_eq!(
        (sa.spi_i.clone(), sa.spi_r.clone()),
        (spi_i.clone(), spi_r.clone())
    );
    assert_eq!(sa.epoch, 1);
    assert_eq!(sa.children.len(), 1);
    assert_eq!(sa.peer_id, "client.example");
    let owner = sa.owner;
    println!(
        "IKE SA {} owned by node {owner}, inner address {vip}",
        sa.id
    );

    traffic.set_probing(true);
    let t_flow = Instant::now();
    traffic.wait_flowing(t_flow, 20, "UDP echoes through the tunnel");
    // The gateway's own DPD (every 3 s of IKE silence) is answered by strongSwan.
    let log_len = charon.log().len();
    wait_until(
        15,
        || since(&charon.log(), log_len).contains("parsed INFORMATIONAL request"),
        "a gateway DPD at strongSwan",
    );

    // ---- 2. SIGKILL the owner while traffic flows
    let log_at_kill = charon.log().len();
    let killed_at = Instant::now();
    lab.sigkill(owner).await.expect("SIGKILL the owner");
    println!("SIGKILLed node {owner} (the SA's owner)");
    let mut admin = lab.admin().expect("admin client");
    let deadline = Instant::now() + Duration::from_secs(20);
    let taken = loop {
        if let Ok(sas) = admin.all_sas(None).await
            && let Some(sa) = sas.first()
            && sa.owner != owner
        {
            break sa.clone();
        }
        assert!(Instant::now() < deadline, "nobody took the SA over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "node {} took the SA over (epoch {}) {:.0} ms after the kill",
        taken.owner,
        taken.epoch,
        killed_at.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(taken.epoch, 2);
    traffic.wait_flowing(killed_at, 30, "traffic through the new owner");
    let after = traffic.replies_after(killed_at);
    let first = after.iter().map(|(_, _, r)| *r).min().expect("replies");
    println!(
        "traffic resumed {:.0} ms after the kill",
        first.duration_since(killed_at).as_secs_f64() * 1000.0
    );
    // The new owner runs the gateway's DPD from the committed times...
    wait_until(
        20,
        || since(&charon.log(), log_at_kill).contains("parsed INFORMATIONAL request"),
        "the new owner's DPD at strongSwan",
    );
    // ...and answers strongSwan's DPD, which strongSwan sends once nothing at all (ESP or IKE)
    // came in for 2 s: pause the traffic for that.
    traffic.set_probing(false);
    wait_until(
        30,
        || !answered_requests(since(&charon.log(), log_at_kill), "INFORMATIONAL").is_empty(),
        "strongSwan's DPD answered after the failover",
    );
    let dpd_ids = answered_requests(since(&charon.log(), log_at_kill), "INFORMATIONAL");
    println!("strongSwan DPD requests answered after the failover: message IDs {dpd_ids:?}");
    traffic.set_probing(true);
    let new_owner_log = lab.log(taken.owner);
    assert!(
        new_owner_log.contains("IKE SA restored from the committed state"),
        "the new owner restored the engine"
    );
    let list = charon.list_sas();
    println!("---- swanctl --list-sas after the failover ----\n{list}");
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    assert_eq!(
        ike_spis(&list),
        Some((spi_i.clone(), spi_r.clone())),
        "strongSwan kept its IKE SA"
    );
    let log = charon.log();
    assert_eq!(
        log.matches("generating IKE_SA_INIT request").count(),
        1,
        "no new IKE_SA_INIT"
    );
    assert_eq!(
        log.matches("generating IKE_AUTH request").count(),
        1,
        "no re-authentication"
    );
    assert!(
        !since(&log, log_at_kill).contains("deleting IKE_SA"),
        "{}",
        since(&log, log_at_kill)
    );

    // ---- 3. rekeys on the new owner
    let children_before = child_spis(&list);
    let (ok, out) = charon.swanctl(&["--rekey", "--child", "home"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "child rekey: {out}"
    );
    let t_rekey = Instant::now();
    wait_until(
        10,
        || {
            let l = charon.list_sas();
            let now = child_spis(&l);
            now.len() == 1 && now != children_before
        },
        "the old child SA to go",
    );
    traffic.wait_flowing(t_rekey, 20, "traffic on the rekeyed child SA");
    let sa = the_sa(&mut admin).await;
    assert_eq!(sa.children.len(), 1);
    assert_eq!(sa.children[0].rekey_generation, 1);
    assert_eq!(
        format!(
            "{:08x}",
            u32::from_str_radix(&child_spis(&charon.list_sas())[0], 16).unwrap()
        ),
        sa.children[0].out_spi,
        "strongSwan's inbound SPI is the gateway's outbound one"
    );

    let (ok, out) = charon.swanctl(&["--rekey", "--ike", "home"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "IKE rekey: {out}"
    );
    let t_ike = Instant::now();
    // swanctl returns once charon took the rekey on; the exchange (a commit on the gateway
    // first) may still be under way, and the old IKE SA is listed until it is deleted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (new_i, new_r) = loop {
        let list = charon.list_sas();
        let spis = ike_spis(&list).expect("IKE SPIs");
        if spis != (spi_i.clone(), spi_r.clone()) {
            break spis;
        }
        assert!(
            Instant::now() < deadline,
            "strongSwan still lists only the old IKE SA 10 s after the rekey:\n{list}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let sa = loop {
        let sa = the_sa(&mut admin).await;
        if (sa.spi_i.clone(), sa.spi_r.clone()) == (new_i.clone(), new_r.clone()) {
            break sa;
        }
        assert!(
            Instant::now() < deadline,
            "the record did not follow the IKE rekey: {sa:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sa.id, taken.id, "the same record, in place");
    assert_eq!(sa.rekey_generation, 1);
    assert_eq!(sa.owner, taken.owner);
    assert_eq!(sa.virtual_ip, vip);
    traffic.wait_flowing(t_ike, 20, "traffic after the IKE rekey");
    // An exchange on the rekeyed IKE SA: strongSwan's DPD once the traffic stops.
    traffic.set_probing(false);
    let log_len = charon.log().len();
    wait_until(
        20,
        || !answered_requests(since(&charon.log(), log_len), "INFORMATIONAL").is_empty(),
        "a DPD on the rekeyed IKE SA",
    );
    let list = charon.list_sas();
    println!("---- swanctl --list-sas at the end ----\n{list}");
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    let log = charon.log();
    assert_eq!(
        log.matches("generating IKE_AUTH request").count(),
        1,
        "no re-authentication"
    );
    println!("---- charon.log after the kill (excerpt) ----");
    for line in since(&log, log_at_kill)
        .lines()
        .filter(|l| l.contains("[ENC]") || l.contains("DPD") || l.contains("rekey"))
        .take(40)
    {
        println!("{line}");
    }
    println!("test took {:.1} s", t0.elapsed().as_secs_f64());
    drop(traffic);
    drop(charon);
    drop(lab);
    drop(scratch);
}
