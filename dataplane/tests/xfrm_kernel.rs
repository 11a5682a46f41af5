//! What this kernel's XFRM allows, in a fresh network namespace (root): policies, ALLOCSPI
//! larval states, GETSA, GETAE, flush — and the kernel backend either runs a child end to end
//! (a kernel with ESP and GCM) or refuses to start with a typed reason (a kernel without,
//! like CI's).
//!
//! Ownership and priorities need no ESP, so they run everywhere: `flush_owned` removes only
//! what carries the node's reqids (policies, ALLOCSPI states tagged with a reqid), installing
//! a policy of ours twice replaces it, someone else's is left alone, the driver flushes its
//! leftovers even where it then refuses to start, and the kernel picks a /32 policy over a /24
//! installed before it (seen through the larval state its ACQUIRE makes for the chosen
//! template, with `ip xfrm monitor acquire` as the listening key manager).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use evpc_dataplane::netns::{NetNs, root_or_skip};
use evpc_dataplane::selector::prefix_selector;
use evpc_dataplane::userspace::ENCR_AES_GCM_16;
use evpc_dataplane::xfrm::{
    Direction, PolicyDir, ReqidRange, SaParams, Sel, XfrmConfig, XfrmDriver, XfrmNetlink,
    XfrmUnavailable, alloc_spi_message, flush_owned, get_ae, install_policy, null_esp_message,
    parse_ae, policy_id_message, policy_message, policy_priority, prefix_sel, probe, sa_id_message,
    sa_message,
};
use evpc_dataplane::{ChildKeymat, ChildStart, FenceGate, SaDriver};
use evpc_raft_store::{ChildSuite, Epoch, SaId};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_xfrm::policy::ModifyMessage as PolicyModifyMessage;
use netlink_packet_xfrm::state::ModifyMessage as StateModifyMessage;
use netlink_packet_xfrm::{Mark, XfrmAttrs, XfrmMessage};

const ADD: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// `"10.0.0.0/24"` → (address, prefix length).
fn cidr(s: &str) -> (IpAddr, u8) {
    let (addr, len) = s.split_once('/').unwrap();
    (ip(addr), len.parse().unwrap())
}

/// The XFRM selector of `src` → `dst` traffic (both whole prefixes).
fn sel(src: &str, dst: &str) -> Sel {
    prefix_sel(cidr(src), cidr(dst))[0]
}

/// Runs `work` on a thread inside a fresh network namespace (deleted afterwards), so the
/// host's XFRM tables are never touched; without root, skips loudly (fails under CI=true).
fn in_fresh_namespace(tag: &str, what: &str, work: fn(&NetNs)) {
    if !root_or_skip(what) {
        return;
    }
    let ns = Arc::new(NetNs::create(tag).expect("namespace"));
    let inside = Arc::clone(&ns);
    // `work` may set the namespace up with `ip -n`, so it gets the handle; its netlink
    // sockets are opened on the namespace's thread
    ns.run(move || work(&inside))
        .expect("thread in the namespace");
}

/// The policy for `sel` in `dir` (with `mark`), if the kernel has one.
fn get_policy(
    nl: &XfrmNetlink,
    sel: Sel,
    dir: PolicyDir,
    mark: Option<Mark>,
) -> Option<PolicyModifyMessage> {
    let mut id = policy_id_message(sel, dir);
    id.nlas.extend(mark.map(XfrmAttrs::Mark));
    match nl.request("GETPOLICY", XfrmMessage::GetPolicy(id), NLM_F_REQUEST) {
        Ok(answers) => answers.into_iter().find_map(|m| match m {
            XfrmMessage::AddPolicy(p) => Some(p),
            _ => None,
        }),
        Err(e) if e.errno == libc::ENOENT => None,
        Err(e) => panic!("GETPOLICY: {e}"),
    }
}

/// The reqids of a policy's templates.
fn template_reqids(policy: &PolicyModifyMessage) -> Vec<u32> {
    evpc_dataplane::xfrm::template_reqids(policy).collect()
}

/// Every state in the namespace (GETSA dump).
fn all_states(nl: &XfrmNetlink) -> Vec<StateModifyMessage> {
    nl.dump_states().expect("GETSA dump")
}

/// A larval state reserving an SPI in `spis` for peer → gw, tagged with `reqid`; its SPI.
fn larval_state(nl: &XfrmNetlink, spis: (u32, u32), reqid: u32) -> u32 {
    let mut message = alloc_spi_message(ip("198.18.0.2"), ip("198.18.0.1"), spis.0, spis.1);
    message.spi_info.info.reqid = reqid;
    let answer = nl
        .request("ALLOCSPI", XfrmMessage::AllocSpi(message), NLM_F_REQUEST)
        .expect("ALLOCSPI");
    match answer.first() {
        Some(XfrmMessage::AddSa(sa)) => {
            assert_eq!(sa.user_sa_info.reqid, reqid, "ALLOCSPI keeps the reqid");
            sa.user_sa_info.id.spi
        }
        other => panic!("ALLOCSPI answered {other:?}"),
    }
}

#[test]
fn what_the_kernel_allows_and_how_the_backend_answers() {
    if !root_or_skip("xfrm_kernel (a network namespace, XFRM netlink)") {
        return;
    }
    let ns = NetNs::create("xfrm").expect("namespace");
    ns.run(exercise).expect("thread in the namespace");
}

fn exercise() {
    let nl = XfrmNetlink::open().expect("NETLINK_XFRM");
    let (gw, peer) = (ip("198.18.0.1"), ip("198.18.0.2"));

    // policies for a child's selectors: out, in, fwd
    let out_sel = prefix_sel((ip("198.19.1.0"), 24), (ip("198.19.2.5"), 32))[0];
    let in_sel = prefix_sel((ip("198.19.2.5"), 32), (ip("198.19.1.0"), 24))[0];
    for (sel, dir, src, dst) in [
        (out_sel, PolicyDir::Out, gw, peer),
        (in_sel, PolicyDir::In, peer, gw),
        (in_sel, PolicyDir::Fwd, peer, gw),
    ] {
        nl.request(
            "NEWPOLICY",
            XfrmMessage::AddPolicy(policy_message(sel, dir, src, dst, 7, 1000)),
            ADD,
        )
        .unwrap_or_else(|e| panic!("adding a {dir:?} policy: {e}"));
        let got = nl
            .request(
                "GETPOLICY",
                XfrmMessage::GetPolicy(policy_id_message(sel, dir)),
                NLM_F_REQUEST,
            )
            .expect("GETPOLICY");
        assert!(
            matches!(got.first(), Some(XfrmMessage::AddPolicy(p)) if p.user_policy_info.priority == 1000),
            "{got:?}"
        );
    }
    let duplicate = nl
        .request(
            "NEWPOLICY",
            XfrmMessage::AddPolicy(policy_message(out_sel, PolicyDir::Out, gw, peer, 7, 1000)),
            ADD,
        )
        .unwrap_err();
    assert_eq!(duplicate.errno, libc::EEXIST, "{duplicate}");
    nl.request(
        "DELPOLICY",
        XfrmMessage::DeletePolicy(policy_id_message(out_sel, PolicyDir::Out)),
        ACK,
    )
    .expect("DELPOLICY");
    let gone = nl
        .request(
            "GETPOLICY",
            XfrmMessage::GetPolicy(policy_id_message(out_sel, PolicyDir::Out)),
            NLM_F_REQUEST,
        )
        .unwrap_err();
    assert_eq!(gone.errno, libc::ENOENT, "{gone}");

    // ALLOCSPI: a larval state, found by GETSA and GETAE, removed by DELSA
    let answer = nl
        .request(
            "ALLOCSPI",
            XfrmMessage::AllocSpi(alloc_spi_message(peer, gw, 0x1000, 0x1fff)),
            NLM_F_REQUEST,
        )
        .expect("ALLOCSPI");
    let Some(XfrmMessage::AddSa(larval)) = answer.first() else {
        panic!("ALLOCSPI answered {answer:?}");
    };
    let spi = larval.user_sa_info.id.spi;
    assert!(
        (0x1000..=0x1fff).contains(&spi),
        "SPI {spi:#x} outside the range asked for"
    );
    let got = nl
        .request(
            "GETSA",
            XfrmMessage::GetSa(sa_id_message(gw, spi, peer)),
            NLM_F_REQUEST,
        )
        .expect("GETSA of the larval state");
    assert!(matches!(got.first(), Some(XfrmMessage::AddSa(sa)) if sa.user_sa_info.id.spi == spi));
    let ae = nl
        .request(
            "GETAE",
            XfrmMessage::GetAsyncEvent(get_ae(gw, spi, peer, 0)),
            NLM_F_REQUEST,
        )
        .expect("GETAE of the larval state");
    let Some(XfrmMessage::NewAsyncEvent(ae)) = ae.first() else {
        panic!("GETAE answered {ae:?}");
    };
    let values = parse_ae(ae);
    assert_eq!((values.oseq, values.seq, values.packets), (0, 0, 0));
    eprintln!(
        "xfrm: ALLOCSPI gave larval SPI {spi:#x}; GETSA and GETAE see it (replay 0/0, 0 packets)"
    );
    nl.request(
        "DELSA",
        XfrmMessage::DeleteSa(sa_id_message(gw, spi, peer)),
        ACK,
    )
    .expect("DELSA of the larval state");
    let gone = nl
        .request(
            "GETSA",
            XfrmMessage::GetSa(sa_id_message(gw, spi, peer)),
            NLM_F_REQUEST,
        )
        .unwrap_err();
    assert_eq!(gone.errno, libc::ESRCH, "{gone}");

    // flush: another larval state and the remaining policies go
    let answer = nl
        .request(
            "ALLOCSPI",
            XfrmMessage::AllocSpi(alloc_spi_message(peer, gw, 0x2000, 0x2fff)),
            NLM_F_REQUEST,
        )
        .expect("ALLOCSPI");
    let Some(XfrmMessage::AddSa(larval)) = answer.first() else {
        panic!("{answer:?}");
    };
    let spi = larval.user_sa_info.id.spi;
    nl.request(
        "FLUSHSA",
        XfrmMessage::FlushSa(netlink_packet_xfrm::state::FlushMessage { protocol: 50 }),
        ACK,
    )
    .expect("FLUSHSA");
    nl.request(
        "FLUSHPOLICY",
        XfrmMessage::FlushPolicy(netlink_packet_xfrm::policy::FlushMessage::default()),
        ACK,
    )
    .expect("FLUSHPOLICY");
    assert_eq!(
        nl.request(
            "GETSA",
            XfrmMessage::GetSa(sa_id_message(gw, spi, peer)),
            NLM_F_REQUEST
        )
        .unwrap_err()
        .errno,
        libc::ESRCH
    );
    assert_eq!(
        nl.request(
            "GETPOLICY",
            XfrmMessage::GetPolicy(policy_id_message(in_sel, PolicyDir::In)),
            NLM_F_REQUEST
        )
        .unwrap_err()
        .errno,
        libc::ENOENT
    );

    // ESP itself: the probe's two states, tried here directly to show the kernel's answers
    let null_esp = nl.request(
        "NEWSA (ESP, null cipher)",
        XfrmMessage::AddSa(null_esp_message(gw, peer, 0x3001)),
        ADD,
    );
    let keymat = [7u8; 20];
    let gcm = nl.request(
        "NEWSA (ESP, rfc4106(gcm(aes)))",
        XfrmMessage::AddSa(sa_message(&SaParams {
            direction: Direction::Out,
            src: gw,
            dst: peer,
            spi: 0x3002,
            reqid: 9,
            keymat: &keymat,
            esn: true,
            encap: Some((4500, 4500)),
            replay_window: 64,
            seq: 99,
            packet_limit: Some(100),
        })),
        ADD,
    );
    eprintln!("xfrm: ESP with the null cipher: {null_esp:?}");
    eprintln!("xfrm: ESP with AES-GCM-16, ESN, ESP-in-UDP: {gcm:?}");
    let _ = nl.request(
        "FLUSHSA",
        XfrmMessage::FlushSa(netlink_packet_xfrm::state::FlushMessage { protocol: 50 }),
        ACK,
    );
    let gate = Arc::new(FenceGate::always_open());
    let config = XfrmConfig {
        natt_port: 4500,
        ike_port: None,
        ..XfrmConfig::new(gw)
    };
    match probe() {
        Err(reason) => {
            assert!(
                null_esp.is_err() || gcm.is_err(),
                "the probe failed where both states were added"
            );
            eprintln!("xfrm: this kernel cannot run the kernel data plane: {reason}");
            let refused =
                XfrmDriver::new(config, gate).expect_err("the backend must refuse to start");
            assert_eq!(refused, reason);
            assert!(
                refused.to_string().contains("userspace data plane"),
                "{refused}"
            );
            assert!(
                matches!(
                    refused,
                    XfrmUnavailable::NoEsp(_) | XfrmUnavailable::NoAead(_)
                ),
                "as root in a fresh namespace only a missing ESP or GCM may stop it: {refused}"
            );
        }
        Ok(()) => {
            assert!(null_esp.is_ok() && gcm.is_ok());
            lifecycle(config, gate, &nl);
        }
    }
}

/// The child the ESP lifecycle runs: 198.19.1.0/24 ⇄ a road warrior's 198.19.2.5.
fn child_template() -> ChildStart {
    ChildStart {
        ike: SaId(1),
        epoch: Epoch::FIRST,
        in_spi: 0xc001,
        out_spi: 0xd001,
        suite: ChildSuite {
            encryption: ENCR_AES_GCM_16,
            key_bits: 128,
            esn: true,
        },
        keys: Some(ChildKeymat::new(vec![1; 20], vec![2; 20])),
        ts_local: vec![prefix_selector(ip("198.19.1.0"), 24)],
        ts_remote: vec![prefix_selector(ip("198.19.2.5"), 32)],
        local: SocketAddr::new(ip("198.18.0.1"), 4500),
        peer: SocketAddr::new(ip("198.18.0.2"), 4500),
        udp_encap: true,
        next_seq: 101,
        limit: 200,
        replay_floor: 50,
    }
}

/// A kernel with ESP and GCM: start, counters, extend, shared policies, leftovers, stop.
fn lifecycle(config: XfrmConfig, gate: Arc<FenceGate>, nl: &XfrmNetlink) {
    eprintln!("xfrm: this kernel has ESP and rfc4106(gcm(aes)): running a child");
    let reqids = config.reqids;
    let (driver, _ike) = XfrmDriver::new(config, gate).expect("kernel backend");
    let child = child_template();
    driver.start(child.clone()).expect("start");
    assert!(driver.start(child).is_err(), "already running");
    // the outbound state starts at oseq 100 with a lease of 100 packets
    let answer = nl
        .request(
            "GETAE",
            XfrmMessage::GetAsyncEvent(get_ae(ip("198.18.0.2"), 0xd001, ip("198.18.0.1"), 0xc001)),
            NLM_F_REQUEST,
        )
        .expect("GETAE");
    let Some(XfrmMessage::NewAsyncEvent(ae)) = answer.first() else {
        panic!("{answer:?}");
    };
    assert_eq!(parse_ae(ae).oseq, 100);
    let counters = driver.counters(0xc001).expect("counters");
    assert_eq!((counters.highest_out, counters.highest_in), (0, 0));
    driver.extend(0xc001, 500);
    let sa = nl
        .request(
            "GETSA",
            XfrmMessage::GetSa(sa_id_message(ip("198.18.0.2"), 0xd001, ip("198.18.0.1"))),
            NLM_F_REQUEST,
        )
        .expect("GETSA");
    let Some(XfrmMessage::AddSa(sa)) = sa.first() else {
        panic!()
    };
    assert_eq!(sa.user_sa_info.lifetime_cfg.hard_packet_limit, 400);
    let reqid = sa.user_sa_info.reqid;
    assert!(
        reqids.contains(reqid) && reqid != reqids.base,
        "{reqid:#x}: a child's reqid from the node's range, not the probe's"
    );
    assert!(driver.stop(0xc001).is_some());
    assert_eq!(
        nl.request(
            "GETSA",
            XfrmMessage::GetSa(sa_id_message(ip("198.18.0.2"), 0xd001, ip("198.18.0.1"))),
            NLM_F_REQUEST
        )
        .unwrap_err()
        .errno,
        libc::ESRCH
    );
    shared_policies_and_leftovers(&driver, nl, reqids);
}

/// The inbound state (peer → us) with this SPI: its reqid and replay `seq`, if there is one.
fn inbound_state(nl: &XfrmNetlink, spi: u32) -> Option<(u32, u64)> {
    let (gw, peer) = (ip("198.18.0.1"), ip("198.18.0.2"));
    let reqid = match nl.request(
        "GETSA",
        XfrmMessage::GetSa(sa_id_message(gw, spi, peer)),
        NLM_F_REQUEST,
    ) {
        Ok(answers) => match answers.first() {
            Some(XfrmMessage::AddSa(sa)) => sa.user_sa_info.reqid,
            other => panic!("GETSA answered {other:?}"),
        },
        Err(e) if e.errno == libc::ESRCH => return None,
        Err(e) => panic!("GETSA: {e}"),
    };
    let answer = nl
        .request(
            "GETAE",
            XfrmMessage::GetAsyncEvent(get_ae(gw, spi, peer, reqid)),
            NLM_F_REQUEST,
        )
        .expect("GETAE");
    let Some(XfrmMessage::NewAsyncEvent(ae)) = answer.first() else {
        panic!("GETAE answered {answer:?}");
    };
    Some((reqid, parse_ae(ae).seq))
}

/// An inbound ESP state not installed by the driver (a leftover, or someone else's).
fn foreign_inbound_state(nl: &XfrmNetlink, spi: u32, reqid: u32) {
    let keymat = [9u8; 20];
    nl.request(
        "NEWSA (not the driver's)",
        XfrmMessage::AddSa(sa_message(&SaParams {
            direction: Direction::In,
            src: ip("198.18.0.2"),
            dst: ip("198.18.0.1"),
            spi,
            reqid,
            keymat: &keymat,
            esn: true,
            encap: Some((4500, 4500)),
            replay_window: 64,
            seq: 0,
            packet_limit: None,
        })),
        ADD,
    )
    .expect("NEWSA");
}

/// ESP only: a rekey's child with the same selectors shares the kernel policies (the first
/// started keeps them until it stops); a leftover state of ours in the way is replaced, with
/// the new child's replay floor; someone else's refuses the start and stays.
fn shared_policies_and_leftovers(driver: &XfrmDriver, nl: &XfrmNetlink, reqids: ReqidRange) {
    let out_sel = sel("198.19.1.0/24", "198.19.2.5/32");
    let in_sel = sel("198.19.2.5/32", "198.19.1.0/24");
    let policy_reqids = |sel, dir| get_policy(nl, sel, dir, None).map(|p| template_reqids(&p));
    let old = child_template();
    driver.start(old.clone()).expect("start");
    let (old_reqid, _) = inbound_state(nl, old.in_spi).expect("inbound state");
    let out_policy = get_policy(nl, out_sel, PolicyDir::Out, None).expect("out policy");
    assert_eq!(
        out_policy.user_policy_info.priority, 1016,
        "a /32, any port"
    );

    // a leftover of ours sits on the rekeyed child's inbound SPI
    foreign_inbound_state(nl, 0xc002, reqids.last());
    let rekeyed = ChildStart {
        in_spi: 0xc002,
        out_spi: 0xd002,
        ..old.clone()
    };
    driver
        .start(rekeyed.clone())
        .expect("a rekey's child: same selectors, over a leftover state of ours");
    let (new_reqid, seq) = inbound_state(nl, 0xc002).expect("the rekeyed child's state");
    assert!(reqids.contains(new_reqid) && new_reqid != reqids.last() && new_reqid != old_reqid);
    assert_eq!(
        seq, rekeyed.replay_floor,
        "re-added with the child's floor, not updated"
    );
    for (sel, dir) in [
        (out_sel, PolicyDir::Out),
        (in_sel, PolicyDir::In),
        (in_sel, PolicyDir::Fwd),
    ] {
        assert_eq!(policy_reqids(sel, dir), Some(vec![old_reqid]), "{dir:?}");
    }

    // someone else's state on a third child's inbound SPI
    foreign_inbound_state(nl, 0xc003, 1);
    let blocked = ChildStart {
        in_spi: 0xc003,
        out_spi: 0xd003,
        ts_remote: vec![prefix_selector(ip("198.19.2.6"), 32)],
        ..old.clone()
    };
    let refused = driver.start(blocked).unwrap_err().to_string();
    assert!(refused.contains("not this node's"), "{refused}");
    assert_eq!(
        inbound_state(nl, 0xc003).map(|(r, _)| r),
        Some(1),
        "left alone"
    );
    assert!(
        get_policy(
            nl,
            sel("198.19.1.0/24", "198.19.2.6/32"),
            PolicyDir::Out,
            None
        )
        .is_none(),
        "nothing of the refused child stays"
    );
    assert_eq!(
        nl.request(
            "GETSA",
            XfrmMessage::GetSa(sa_id_message(ip("198.18.0.2"), 0xd003, ip("198.18.0.1"))),
            NLM_F_REQUEST
        )
        .unwrap_err()
        .errno,
        libc::ESRCH,
        "its outbound state was removed again"
    );

    // the old child stops: its policies pass to the rekeyed one; then they go with it
    assert!(driver.stop(old.in_spi).is_some());
    for (sel, dir) in [
        (out_sel, PolicyDir::Out),
        (in_sel, PolicyDir::In),
        (in_sel, PolicyDir::Fwd),
    ] {
        assert_eq!(policy_reqids(sel, dir), Some(vec![new_reqid]), "{dir:?}");
    }
    assert!(driver.stop(rekeyed.in_spi).is_some());
    assert_eq!(policy_reqids(out_sel, PolicyDir::Out), None);
    assert_eq!(policy_reqids(in_sel, PolicyDir::In), None);
    eprintln!("xfrm: shared policies and leftover states behave on this kernel");
}

#[test]
fn flush_owned_removes_only_what_carries_this_nodes_reqids() {
    in_fresh_namespace(
        "xfrm-flush",
        "xfrm_kernel flush_owned (a network namespace, XFRM netlink)",
        |_| flush_only_ours(),
    );
}

fn flush_only_ours() {
    let nl = XfrmNetlink::open().expect("NETLINK_XFRM");
    let ours = ReqidRange::for_node(3);
    let other_node = ReqidRange::for_node(4);
    let (gw, peer) = (ip("198.18.0.1"), ip("198.18.0.2"));
    let (gw6, peer6) = (ip("2001:db8::1"), ip("2001:db8::2"));
    let marked = Mark {
        value: 7,
        mask: 0xff,
    };
    // (selector, direction, reqid, mark, ours?)
    let policies = [
        (
            sel("198.19.1.0/24", "198.19.2.5/32"),
            PolicyDir::Out,
            ours.base + 1,
            None,
            true,
        ),
        (
            sel("198.19.2.5/32", "198.19.1.0/24"),
            PolicyDir::In,
            ours.base + 1,
            None,
            true,
        ),
        (
            sel("198.19.2.5/32", "198.19.1.0/24"),
            PolicyDir::Fwd,
            ours.base + 1,
            None,
            true,
        ),
        (
            sel("2001:db8:1::/64", "2001:db8:2::7/128"),
            PolicyDir::Out,
            ours.last(),
            None,
            true,
        ),
        (
            sel("198.19.1.0/24", "198.19.3.0/24"),
            PolicyDir::Out,
            ours.base + 2,
            Some(marked),
            true,
        ),
        // a key manager's (strongSwan counts reqids from 1), another node's, the reqids
        // right outside our range
        (
            sel("198.19.1.0/24", "198.19.4.0/24"),
            PolicyDir::Out,
            1,
            None,
            false,
        ),
        (
            sel("198.19.1.0/24", "198.19.5.0/24"),
            PolicyDir::Out,
            other_node.base + 1,
            None,
            false,
        ),
        (
            sel("198.19.1.0/24", "198.19.6.0/24"),
            PolicyDir::Out,
            ours.base - 1,
            None,
            false,
        ),
        (
            sel("198.19.1.0/24", "198.19.7.0/24"),
            PolicyDir::Out,
            ours.last() + 1,
            None,
            false,
        ),
    ];
    for (sel, dir, reqid, mark, _) in policies {
        let (src, dst) = match (sel.src.0.is_ipv6(), dir) {
            (true, PolicyDir::Out) => (gw6, peer6),
            (true, _) => (peer6, gw6),
            (false, PolicyDir::Out) => (gw, peer),
            (false, _) => (peer, gw),
        };
        let mut message = policy_message(sel, dir, src, dst, reqid, 1000);
        message.nlas.extend(mark.map(XfrmAttrs::Mark));
        nl.request("NEWPOLICY", XfrmMessage::AddPolicy(message), ADD)
            .unwrap_or_else(|e| panic!("adding {sel:?} {dir:?}: {e}"));
    }
    let our_spi = larval_state(&nl, (0x1000, 0x1fff), ours.base + 1);
    let swan_spi = larval_state(&nl, (0x2000, 0x2fff), 1);
    let other_spi = larval_state(&nl, (0x3000, 0x3fff), other_node.base);

    let report = flush_owned(&nl, ours).expect("flush_owned");
    eprintln!("xfrm: flush_owned({ours}) removed:");
    for state in &report.states {
        eprintln!("xfrm:   {state}");
    }
    for policy in &report.policies {
        eprintln!("xfrm:   {policy}");
    }
    assert_eq!(report.states.len(), 1, "{report:?}");
    assert_eq!(
        (
            report.states[0].spi,
            report.states[0].reqid,
            report.states[0].dst
        ),
        (our_spi, ours.base + 1, gw)
    );
    assert_eq!(report.policies.len(), 5, "{report:?}");
    assert_eq!((report.states_kept, report.policies_kept), (2, 4));
    assert!(
        report
            .policies
            .iter()
            .any(|p| p.dst == cidr("2001:db8:2::7/128") && p.reqid == ours.last()),
        "IPv6 addresses are read as IPv6: {report:?}"
    );

    for (sel, dir, reqid, mark, owned) in policies {
        let found = get_policy(&nl, sel, dir, mark);
        if owned {
            assert!(found.is_none(), "ours is gone: {sel:?} {dir:?}");
        } else {
            let found = found.unwrap_or_else(|| panic!("someone else's must stay: {sel:?}"));
            assert_eq!(template_reqids(&found), vec![reqid]);
        }
    }
    let spis: Vec<(u32, u32)> = all_states(&nl)
        .iter()
        .map(|sa| (sa.user_sa_info.id.spi, sa.user_sa_info.reqid))
        .collect();
    assert!(!spis.iter().any(|&(spi, _)| spi == our_spi), "{spis:x?}");
    assert!(spis.contains(&(swan_spi, 1)), "{spis:x?}");
    assert!(spis.contains(&(other_spi, other_node.base)), "{spis:x?}");

    let again = flush_owned(&nl, ours).expect("flush_owned again");
    assert!(again.is_empty(), "nothing of ours is left: {again:?}");
    assert_eq!((again.states_kept, again.policies_kept), (2, 4));
}

#[test]
fn installing_a_policy_again_replaces_ours_and_refuses_someone_elses() {
    in_fresh_namespace(
        "xfrm-install",
        "xfrm_kernel install_policy (a network namespace, XFRM netlink)",
        |_| install_twice(),
    );
}

fn install_twice() {
    let nl = XfrmNetlink::open().expect("NETLINK_XFRM");
    let ours = ReqidRange::for_node(5);
    let (gw, peer) = (ip("198.18.0.1"), ip("198.18.0.2"));
    let road_warrior = sel("198.19.1.0/24", "198.19.2.5/32");
    let message = |sel: Sel, reqid| {
        let priority = policy_priority(1000, &sel, PolicyDir::Out);
        policy_message(sel, PolicyDir::Out, gw, peer, reqid, priority)
    };
    install_policy(&nl, message(road_warrior, ours.base + 1), ours).expect("first install");
    // what a restart after a crash used to run into
    let plain = nl
        .request(
            "NEWPOLICY",
            XfrmMessage::AddPolicy(message(road_warrior, ours.base + 1)),
            ADD,
        )
        .unwrap_err();
    assert_eq!(plain.errno, libc::EEXIST, "{plain}");
    install_policy(&nl, message(road_warrior, ours.base + 2), ours)
        .expect("installing again must not fail on EEXIST");
    let policy = get_policy(&nl, road_warrior, PolicyDir::Out, None).expect("installed");
    assert_eq!(
        template_reqids(&policy),
        vec![ours.base + 2],
        "replaced (UPDPOLICY), not kept"
    );
    assert_eq!(policy.user_policy_info.priority, 1016);

    // a key manager's policy for a selector: not ours to replace
    let site = sel("198.19.1.0/24", "198.19.8.0/24");
    nl.request(
        "NEWPOLICY",
        XfrmMessage::AddPolicy(policy_message(site, PolicyDir::Out, gw, peer, 1, 2000)),
        ADD,
    )
    .expect("someone else's policy");
    let refused = install_policy(&nl, message(site, ours.base + 3), ours).unwrap_err();
    assert_eq!(refused.errno, libc::EEXIST, "{refused}");
    assert!(refused.detail.contains("not this node's"), "{refused}");
    let theirs = get_policy(&nl, site, PolicyDir::Out, None).expect("still there");
    assert_eq!(template_reqids(&theirs), vec![1]);
    assert_eq!(theirs.user_policy_info.priority, 2000);
}

#[test]
fn the_driver_flushes_its_leftovers_before_it_starts() {
    in_fresh_namespace(
        "xfrm-restart",
        "xfrm_kernel XfrmDriver::new flush (a network namespace, XFRM netlink)",
        |_| restart_after_a_crash(),
    );
}

fn restart_after_a_crash() {
    let nl = XfrmNetlink::open().expect("NETLINK_XFRM");
    let (gw, peer) = (ip("198.18.0.1"), ip("198.18.0.2"));
    let config = XfrmConfig {
        natt_port: 4500,
        ike_port: None,
        reqids: ReqidRange::for_node(9),
        ..XfrmConfig::new(gw)
    };
    // what a SIGKILLed predecessor left, next to a key manager's policy
    let leftover = sel("198.19.1.0/24", "198.19.2.5/32");
    let swan = sel("198.19.1.0/24", "198.19.9.0/24");
    for (sel, reqid) in [(leftover, config.reqids.base + 7), (swan, 1)] {
        nl.request(
            "NEWPOLICY",
            XfrmMessage::AddPolicy(policy_message(sel, PolicyDir::Out, gw, peer, reqid, 1000)),
            ADD,
        )
        .expect("NEWPOLICY");
    }
    let leftover_spi = larval_state(&nl, (0x4000, 0x4fff), config.reqids.base + 7);
    let gate = Arc::new(FenceGate::always_open());
    match XfrmDriver::new(config.clone(), gate) {
        Ok((driver, _ike)) => {
            eprintln!("xfrm: the kernel backend started (this kernel has ESP)");
            driver.shutdown();
        }
        Err(reason) => {
            eprintln!("xfrm: the kernel backend refused to start: {reason}");
            assert!(
                matches!(
                    reason,
                    XfrmUnavailable::NoEsp(_) | XfrmUnavailable::NoAead(_)
                ),
                "{reason}"
            );
        }
    }
    assert!(
        get_policy(&nl, leftover, PolicyDir::Out, None).is_none(),
        "flushed before the probe, even where the backend then refuses"
    );
    assert!(
        !all_states(&nl)
            .iter()
            .any(|sa| sa.user_sa_info.id.spi == leftover_spi),
        "the leftover state is gone"
    );
    let kept = get_policy(&nl, swan, PolicyDir::Out, None).expect("the key manager's stays");
    assert_eq!(template_reqids(&kept), vec![1]);
    let bad = XfrmConfig {
        reqids: ReqidRange { base: 0, len: 100 },
        ..config
    };
    assert!(matches!(
        XfrmDriver::new(bad, Arc::new(FenceGate::always_open())),
        Err(XfrmUnavailable::BadConfig(_))
    ));
}

#[test]
fn the_kernel_picks_a_host_policy_over_a_network_installed_before_it() {
    in_fresh_namespace(
        "xfrm-prio",
        "xfrm_kernel policy priorities (a network namespace, veth, XFRM netlink)",
        host_beats_network,
    );
}

/// `ip xfrm monitor acquire`, killed when dropped: with a listener on the ACQUIRE group, the
/// kernel answers a packet that matches a policy without states by making a larval state
/// from the chosen policy's template (its reqid and tunnel destination).
struct AcquireListener(Child);

impl Drop for AcquireListener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn host_beats_network(ns: &NetNs) {
    // a link to send the inner packets on (one namespace, both ends)
    ns.ip(&["link", "add", "x0", "type", "veth", "peer", "name", "x1"])
        .expect("veth");
    ns.ip(&["addr", "add", "10.0.0.1/24", "dev", "x0"])
        .expect("address");
    ns.ip(&["link", "set", "x0", "up"]).expect("x0 up");
    ns.ip(&["link", "set", "x1", "up"]).expect("x1 up");
    ns.ip(&[
        "route",
        "add",
        "10.9.0.0/16",
        "dev",
        "x0",
        "src",
        "10.0.0.1",
    ])
    .expect("route");
    let nl = XfrmNetlink::open().expect("NETLINK_XFRM");
    let ours = ReqidRange::for_node(6);
    let gw = ip("198.18.0.1");
    let (site_reqid, host_reqid) = (ours.base + 1, ours.base + 2);
    // the /24 first: install order must not matter
    let site = sel("10.0.0.0/24", "10.9.0.0/24");
    let host = sel("10.0.0.0/24", "10.9.0.7/32");
    for (sel, reqid, tunnel_peer) in [
        (site, site_reqid, ip("198.18.0.2")),
        (host, host_reqid, ip("198.18.0.3")),
    ] {
        let priority = policy_priority(1000, &sel, PolicyDir::Out);
        install_policy(
            &nl,
            policy_message(sel, PolicyDir::Out, gw, tunnel_peer, reqid, priority),
            ours,
        )
        .expect("install_policy");
    }
    let priority = |sel| {
        get_policy(&nl, sel, PolicyDir::Out, None)
            .expect("installed")
            .user_policy_info
            .priority
    };
    let (site_priority, host_priority) = (priority(site), priority(host));
    assert!(
        host_priority < site_priority,
        "{host_priority} vs {site_priority}"
    );
    assert_eq!((host_priority, site_priority), (1016, 1000 + 8 * 17 + 16));

    let _listener = AcquireListener(
        Command::new("ip")
            .args(["-n", ns.name(), "xfrm", "monitor", "acquire"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip xfrm monitor acquire"),
    );
    let socket = UdpSocket::bind("10.0.0.1:0").expect("UDP socket");
    // until the listener has subscribed, packets are dropped without an ACQUIRE
    let deadline = Instant::now() + Duration::from_secs(10);
    let chosen = loop {
        for dst in ["10.9.0.7:9", "10.9.0.8:9"] {
            // refused or dropped: only the ACQUIRE matters
            let _ = socket.send_to(b"which policy?", dst);
        }
        let larval: Vec<(IpAddr, u32, IpAddr)> = all_states(&nl)
            .iter()
            .map(|sa| {
                let info = &sa.user_sa_info;
                (
                    IpAddr::V4(info.selector.daddr.to_ipv4()),
                    info.reqid,
                    IpAddr::V4(info.id.daddr.to_ipv4()),
                )
            })
            .collect();
        if larval.len() >= 2 || Instant::now() > deadline {
            break larval;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("xfrm: ACQUIREs (inner destination, reqid, tunnel peer): {chosen:?}");
    assert!(
        chosen.contains(&(ip("10.9.0.7"), host_reqid, ip("198.18.0.3"))),
        "10.9.0.7 must use the /32 policy: {chosen:?}"
    );
    assert!(
        chosen.contains(&(ip("10.9.0.8"), site_reqid, ip("198.18.0.2"))),
        "10.9.0.8 only matches the /24: {chosen:?}"
    );
    // the larval states carry our reqids but cannot be deleted by SPI: the flush skips them
    let report = flush_owned(&nl, ours).expect("flush_owned");
    assert_eq!(report.policies.len(), 2, "{report:?}");
    assert_eq!(report.larval_left, 2, "{report:?}");
}
