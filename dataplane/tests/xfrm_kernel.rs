//! What this kernel's XFRM allows, in a fresh network namespace (root): policies, ALLOCSPI
//! larval states, GETSA, GETAE, flush — and the kernel backend either runs a child end to end
//! (a kernel with ESP and GCM) or refuses to start with a typed reason (a kernel without,
//! like CI's).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use evpc_dataplane::netns::{NetNs, root_or_skip};
use evpc_dataplane::selector::prefix_selector;
use evpc_dataplane::userspace::ENCR_AES_GCM_16;
use evpc_dataplane::xfrm::{
    Direction, PolicyDir, SaParams, XfrmConfig, XfrmDriver, XfrmNetlink, XfrmUnavailable,
    alloc_spi_message, get_ae, null_esp_message, parse_ae, policy_id_message, policy_message,
    prefix_sel, probe, sa_id_message, sa_message,
};
use evpc_dataplane::{ChildKeymat, ChildStart, FenceGate, SaDriver};
use evpc_raft_store::{ChildSuite, Epoch, SaId};
use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_xfrm::XfrmMessage;

const ADD: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
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

/// A kernel with ESP and GCM: start, counters, extend, stop.
fn lifecycle(config: XfrmConfig, gate: Arc<FenceGate>, nl: &XfrmNetlink) {
    eprintln!("xfrm: this kernel has ESP and rfc4106(gcm(aes)): running a child");
    let (driver, _ike) = XfrmDriver::new(config, gate).expect("kernel backend");
    let child = ChildStart {
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
        next_seq: 101,
        limit: 200,
        replay_floor: 50,
    };
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
}
