//! Wire codec: round trips, truncation at every offset, arbitrary bytes, and
//! the critical-bit rules of RFC 7296 §2.5.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use common::*;
use evpc_ike::crypto::sk;
use evpc_ike::wire::{
    self, AuthMethod, AuthPayload, CfgAttributeType, CfgType, CpAttribute, CpPayload,
    DeletePayload, ExchangeType, HEADER_LEN, Header, IdType, KePayload, NotifyPayload, NotifyType,
    Payload, PayloadType, Proposal, ProtocolId, SaPayload, Transform, TransformType, WireError,
};
use evpc_ike::{Event, Identity, PeerError, Reaction, TrafficSelector};
use proptest::prelude::*;

fn header(next: PayloadType) -> Header {
    Header {
        spi_i: 0x0102_0304_0506_0708,
        spi_r: 0x1112_1314_1516_1718,
        next_payload: next,
        major_version: 2,
        minor_version: 0,
        exchange: ExchangeType::IKE_AUTH,
        initiator: true,
        response: false,
        message_id: 7,
        length: 0,
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn transform() -> impl Strategy<Value = Transform> {
    (1u8..6, any::<u16>(), prop::option::of(any::<u16>())).prop_map(|(ty, id, key_length)| {
        Transform {
            ty: TransformType(ty),
            id,
            key_length,
            has_unknown_attribute: false,
        }
    })
}

fn proposal() -> impl Strategy<Value = Proposal> {
    (
        1u8..10,
        1u8..4,
        prop::sample::select(vec![0usize, 4, 8]),
        prop::collection::vec(transform(), 1..8),
    )
        .prop_flat_map(|(number, protocol, spi_len, transforms)| {
            prop::collection::vec(any::<u8>(), spi_len).prop_map(move |spi| Proposal {
                number,
                protocol: ProtocolId(protocol),
                spi,
                transforms: transforms.clone(),
            })
        })
}

fn selector() -> impl Strategy<Value = TrafficSelector> {
    prop_oneof![
        (
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(|(p, sp, ep, a, b)| {
                TrafficSelector {
                    ip_protocol: p,
                    start_port: sp,
                    end_port: ep,
                    start: IpAddr::V4(Ipv4Addr::from(a)),
                    end: IpAddr::V4(Ipv4Addr::from(b)),
                }
            }),
        (any::<u8>(), any::<u128>(), any::<u128>()).prop_map(|(p, a, b)| TrafficSelector {
            ip_protocol: p,
            start_port: 0,
            end_port: 65535,
            start: IpAddr::V6(Ipv6Addr::from(a)),
            end: IpAddr::V6(Ipv6Addr::from(b)),
        }),
    ]
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        prop::collection::vec(proposal(), 1..4)
            .prop_map(|proposals| Payload::Sa(SaPayload { proposals })),
        (any::<u16>(), bytes(300)).prop_map(|(group, data)| Payload::Ke(KePayload { group, data })),
        (1u8..12, bytes(64)).prop_map(|(k, data)| Payload::IdI(Identity {
            kind: IdType(k),
            data
        })),
        (1u8..12, bytes(64)).prop_map(|(k, data)| Payload::IdR(Identity {
            kind: IdType(k),
            data
        })),
        (any::<u8>(), bytes(64)).prop_map(|(m, data)| Payload::Auth(AuthPayload {
            method: AuthMethod(m),
            data
        })),
        bytes(256).prop_map(Payload::Nonce),
        (any::<u8>(), bytes(16), any::<u16>(), bytes(64)).prop_map(|(p, spi, ty, data)| {
            Payload::Notify(NotifyPayload {
                protocol: ProtocolId(p),
                spi,
                ty: NotifyType(ty),
                data,
            })
        }),
        prop::collection::vec(any::<u32>(), 0..8).prop_map(|spis| Payload::Delete(DeletePayload {
            protocol: ProtocolId::ESP,
            spis
        })),
        Just(Payload::Delete(DeletePayload {
            protocol: ProtocolId::IKE,
            spis: vec![]
        })),
        bytes(32).prop_map(Payload::VendorId),
        prop::collection::vec(selector(), 0..4).prop_map(Payload::TsI),
        prop::collection::vec(selector(), 0..4).prop_map(Payload::TsR),
        (
            1u8..5,
            prop::collection::vec((any::<u16>(), bytes(16)), 0..5)
        )
            .prop_map(|(t, attrs)| Payload::Cp(CpPayload {
                cfg_type: CfgType(t),
                attributes: attrs
                    .into_iter()
                    .map(|(ty, value)| CpAttribute {
                        ty: CfgAttributeType(ty & 0x7fff),
                        value
                    })
                    .collect(),
            })),
    ]
}

proptest! {
    /// §2.9: narrowing yields selectors within both the proposal and the policy.
    #[test]
    fn narrowing_stays_within_both_sides(
        proposed in prop::collection::vec(selector(), 0..4),
        allowed in prop::collection::vec(selector(), 0..4),
    ) {
        for n in wire::ts::narrow(&proposed, &allowed) {
            prop_assert!(proposed.iter().any(|p| n.is_subset_of(p)));
            prop_assert!(allowed.iter().any(|a| n.is_subset_of(a)));
        }
    }

    #[test]
    fn payload_chains_round_trip(payloads in prop::collection::vec(payload(), 0..8)) {
        let msg = wire::emit_plain_message(header(PayloadType::NONE), &payloads);
        let (h, chain) = wire::parse_message(&msg).expect("own output parses");
        prop_assert_eq!(h.length as usize, msg.len());
        prop_assert_eq!(chain.payloads, payloads);
        prop_assert!(chain.encrypted.is_none());
    }

    #[test]
    fn header_round_trips(spi_i in any::<u64>(), spi_r in any::<u64>(), ex in any::<u8>(), i in any::<bool>(), r in any::<bool>(), id in any::<u32>()) {
        let mut h = header(PayloadType::NONE);
        (h.spi_i, h.spi_r, h.exchange, h.initiator, h.response, h.message_id) = (spi_i, spi_r, ExchangeType(ex), i, r, id);
        let msg = wire::emit_plain_message(h, &[]);
        h.length = HEADER_LEN as u32;
        prop_assert_eq!(Header::parse(&msg).unwrap(), h);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in bytes(600)) {
        let _ = wire::parse_message(&data);
        let _ = wire::parse_chain(PayloadType::SA, &data, 0, true);
        let _ = wire::route(&data);
    }

    #[test]
    fn valid_header_with_arbitrary_body_never_panics(next in 0u8..60, body in bytes(400)) {
        let mut h = header(PayloadType(next));
        h.length = (HEADER_LEN + body.len()) as u32;
        let mut msg = Vec::new();
        h.emit(&mut msg);
        msg.extend_from_slice(&body);
        let _ = wire::parse_message(&msg);
    }

    #[test]
    fn sealed_messages_open_and_tampering_is_detected(payloads in prop::collection::vec(payload(), 0..5), flip in any::<prop::sample::Index>(), key_bits in prop::sample::select(vec![128u16, 256])) {
        let encr = evpc_ike::EncrAlg::AesGcm16 { key_bits };
        let key = vec![0x42u8; encr.keymat_len()];
        let msg = sk::seal_message(header(PayloadType::NONE), &payloads, encr, &key, [7u8; 8]);
        let (_, chain) = wire::parse_message(&msg).unwrap();
        let part = chain.encrypted.expect("SK payload");
        prop_assert_eq!(sk::open_message(&msg, part, encr, &key).unwrap().payloads, payloads);
        let mut bad = msg.clone();
        let i = flip.index(bad.len());
        bad[i] ^= 0x01;
        // A flip anywhere is caught: in the header it breaks parsing or the AAD.
        let verdict = wire::parse_message(&bad).ok().and_then(|(_, c)| c.encrypted).map(|p| sk::open_message(&bad, p, encr, &key));
        prop_assert!(!matches!(verdict, Some(Ok(_))));
    }
}

/// Real messages from a full exchange, cut at every offset: never a panic,
/// never accepted, and an established SA changes no state.
#[test]
fn truncation_at_every_offset() {
    let mut sim = Sim::new(77, Faults::NONE, gateway_config(1));
    let mut captured = Vec::new();
    let (_, o) = evpc_ike::IkeSa::connect(
        std::sync::Arc::new(client_config(0)),
        client_addr(0),
        gw_addr(),
        connect_options(),
        sim.now,
        &mut sim.rng,
    );
    captured.push(o.send[0].payload.clone());
    sim.add_client(client_config(0), connect_options());
    assert!(sim.run_until(60_000, |s| s.clients[0].sa.is_established()));
    let slot = sim.gw_slot_established().unwrap();
    let mut rng = Rng(3);
    let o = sim.clients[0].sa.send_dpd(sim.now, &mut rng).unwrap();
    let dpd = o.commit.unwrap().into_datagrams_after_durable().remove(0);
    captured.push(dpd.payload.clone());
    for msg in &captured {
        for cut in HEADER_LEN..msg.len() {
            // Cut the body but keep the length field consistent, so parsing
            // gets past the header into the payloads.
            let mut m = msg[..cut].to_vec();
            m[24..28].copy_from_slice(&(cut as u32).to_be_bytes());
            let _ = wire::parse_message(&m);
            let gw = sim.gw.sas[slot].as_mut().unwrap();
            let o = gw.handle_datagram(sim.now, &mut rng, dpd.remote, dpd.local, &m);
            assert!(o.commit.is_none(), "a cut message changed state");
        }
        for cut in 0..msg.len() {
            let prefix = &msg[..cut];
            assert!(
                wire::parse_message(prefix).is_err(),
                "prefix of {cut} bytes accepted"
            );
            let gw = sim.gw.sas[slot].as_mut().unwrap();
            let o = gw.handle_datagram(sim.now, &mut rng, dpd.remote, dpd.local, prefix);
            assert!(
                o.commit.is_none() && o.send.is_empty(),
                "truncated input changed state"
            );
            let _ = sim.gw.router.endpoint().accept(
                sim.now,
                &mut rng,
                gw_addr(),
                client_addr(0),
                prefix,
                0,
            );
        }
    }
    // The untruncated DPD is still processed normally afterwards.
    let gw = sim.gw.sas[slot].as_mut().unwrap();
    let o = gw.handle_datagram(sim.now, &mut rng, dpd.remote, dpd.local, &dpd.payload);
    assert!(o.commit.is_some());
}

#[test]
fn arbitrary_datagrams_to_an_established_sa_change_nothing() {
    let (mut sim, slot) = {
        let mut sim = Sim::new(78, Faults::NONE, gateway_config(1));
        sim.add_client(client_config(0), connect_options());
        assert!(sim.run_until(60_000, |s| s.gw_slot_established().is_some()));
        let slot = sim.gw_slot_established().unwrap();
        (sim, slot)
    };
    let snap = sim.gw_sa(slot).unwrap().snapshot().unwrap();
    let mut rng = Rng(4);
    let mut data = vec![0u8; 200];
    for i in 0..2000 {
        rng.fill(&mut data);
        // Half of them carry the right SPIs so they get as far as the SK check.
        if i % 2 == 0 {
            data[..8].copy_from_slice(&snap.current.spi_i.to_be_bytes());
            data[8..16].copy_from_slice(&snap.current.spi_r.to_be_bytes());
            data[17] = 0x20;
            data[24..28].copy_from_slice(&200u32.to_be_bytes());
        }
        let gw = sim.gw.sas[slot].as_mut().unwrap();
        let o = gw.handle_datagram(sim.now, &mut rng, gw_addr(), client_addr(0), &data);
        assert!(o.commit.is_none() && o.send.is_empty());
    }
}

#[test]
fn unknown_payloads_skipped_unless_critical() {
    let mut body = Vec::new();
    // Unknown type 200, not critical, then a Nonce.
    body.extend_from_slice(&[PayloadType::NONCE.0, 0x00, 0, 8, 1, 2, 3, 4]);
    body.extend_from_slice(&[0, 0, 0, 6, 9, 9]);
    let mut h = header(PayloadType(200));
    h.length = (HEADER_LEN + body.len()) as u32;
    let mut msg = Vec::new();
    h.emit(&mut msg);
    msg.extend_from_slice(&body);
    let (_, chain) = wire::parse_message(&msg).unwrap();
    assert_eq!(chain.payloads, vec![Payload::Nonce(vec![9, 9])]);
    // The same with the Critical bit: refused, naming the type (§2.5).
    msg[HEADER_LEN + 1] = 0x80;
    assert_eq!(
        wire::parse_message(&msg).unwrap_err(),
        WireError::UnsupportedCritical(200)
    );
    let err = PeerError::from(WireError::UnsupportedCritical(200));
    assert_eq!(
        err.reaction(),
        Reaction::Notify(NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD)
    );
    assert_eq!(err.notify_data(), vec![200]);
    // The Critical bit on a known payload is ignored.
    msg[HEADER_LEN + 1] = 0;
    msg[HEADER_LEN + 8 + 1] = 0x80;
    assert!(wire::parse_message(&msg).is_ok());
}

#[test]
fn unknown_critical_payload_inside_sk_gets_unsupported_critical_payload() {
    let mut sim = Sim::new(79, Faults::NONE, gateway_config(1));
    sim.add_client(client_config(0), connect_options());
    assert!(sim.run_until(60_000, |s| s.gw_slot_established().is_some()
        && s.clients[0].sa.is_established()));
    let slot = sim.gw_slot_established().unwrap();
    let c = sim.clients[0].sa.snapshot().unwrap();
    let g = &c.current;
    let mut h = header(PayloadType::NONE);
    (h.spi_i, h.spi_r, h.exchange, h.message_id) = (
        g.spi_i,
        g.spi_r,
        ExchangeType::INFORMATIONAL,
        g.next_request_id,
    );
    // Inner chain: one unknown payload (type 222) with the Critical bit.
    let inner = [0u8, 0x80, 0, 7, 1, 2, 3];
    let msg = sk::seal_chain_bytes(
        h,
        PayloadType(222),
        &inner,
        g.suite.encr,
        g.keys.sk_ei.expose(),
        [5; 8],
    );
    let gw = sim.gw.sas[slot].as_mut().unwrap();
    let mut rng = Rng(1);
    let o = gw.handle_datagram(sim.now, &mut rng, gw_addr(), client_addr(0), &msg);
    assert!(o.events.iter().any(|e| matches!(
        e,
        Event::PeerMisbehaved(PeerError::MalformedInner(WireError::UnsupportedCritical(
            222
        )))
    )));
    let answer = o
        .commit
        .expect("the answer consumes the message ID")
        .into_datagrams_after_durable()
        .remove(0);
    let (_, chain) = wire::parse_message(&answer.payload).unwrap();
    let inner = sk::open_message(
        &answer.payload,
        chain.encrypted.unwrap(),
        g.suite.encr,
        g.keys.sk_er.expose(),
    )
    .unwrap();
    assert_eq!(
        inner.payloads,
        vec![Payload::Notify(NotifyPayload::new(
            NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD,
            vec![222]
        ))]
    );
}

#[test]
fn traffic_selector_narrowing() {
    let any = TrafficSelector::any_v4();
    let net = TrafficSelector::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 24);
    let host = TrafficSelector::v4_host(Ipv4Addr::new(10, 10, 0, 7));
    assert_eq!(wire::ts::narrow(&[any], &[net]), vec![net]);
    assert_eq!(wire::ts::narrow(&[net], &[host]), vec![host]);
    assert!(
        wire::ts::narrow(
            &[host],
            &[TrafficSelector::v4_host(Ipv4Addr::new(10, 10, 1, 7))]
        )
        .is_empty()
    );
    let mut tcp = net;
    tcp.ip_protocol = 6;
    let mut udp = net;
    udp.ip_protocol = 17;
    assert!(tcp.intersect(&udp).is_none());
    assert_eq!(tcp.intersect(&any), Some(tcp));
    assert!(host.is_subset_of(&net));
}

#[test]
fn ike_sa_init_with_unknown_critical_payload_is_refused() {
    let sim = Sim::new(80, Faults::NONE, gateway_config(1));
    let mut h = header(PayloadType(210));
    (h.exchange, h.spi_r, h.message_id) = (ExchangeType::IKE_SA_INIT, 0, 0);
    let body = [0u8, 0x80, 0, 5, 42];
    h.length = (HEADER_LEN + body.len()) as u32;
    let mut msg = Vec::new();
    h.emit(&mut msg);
    msg.extend_from_slice(&body);
    let mut rng = Rng(2);
    match sim
        .gw
        .router
        .endpoint()
        .accept(sim.now, &mut rng, gw_addr(), client_addr(0), &msg, 0)
    {
        evpc_ike::Accepted::Reply(d, PeerError::UnsupportedCriticalPayload(210)) => {
            let (rh, chain) = wire::parse_message(&d.payload).unwrap();
            assert!(rh.response && rh.spi_i == h.spi_i && rh.spi_r == 0);
            assert_eq!(
                chain.payloads,
                vec![Payload::Notify(NotifyPayload::new(
                    NotifyType::UNSUPPORTED_CRITICAL_PAYLOAD,
                    vec![210]
                ))]
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Major version 3: INVALID_MAJOR_VERSION.
    msg[17] = 0x30;
    assert!(matches!(
        sim.gw
            .router
            .endpoint()
            .accept(sim.now, &mut rng, gw_addr(), client_addr(0), &msg, 0),
        evpc_ike::Accepted::Reply(_, PeerError::UnsupportedVersion(3))
    ));
}

/// An IKE_SA_INIT without its SA, KE or Nonce payload is answered with
/// INVALID_SYNTAX, and the error names the payload that is missing.
#[test]
fn ike_sa_init_missing_a_payload_names_it() {
    let sim = Sim::new(81, Faults::NONE, gateway_config(1));
    let mut rng = Rng(3);
    let (_, o) = evpc_ike::IkeSa::connect(
        std::sync::Arc::new(client_config(0)),
        client_addr(0),
        gw_addr(),
        connect_options(),
        sim.now,
        &mut rng,
    );
    let (h, chain) = wire::parse_message(&o.send[0].payload).unwrap();
    for missing in [PayloadType::SA, PayloadType::KE, PayloadType::NONCE] {
        let payloads: Vec<Payload> = chain
            .payloads
            .iter()
            .filter(|p| p.payload_type() != missing)
            .cloned()
            .collect();
        assert_eq!(payloads.len() + 1, chain.payloads.len());
        let msg = wire::emit_plain_message(h, &payloads);
        let endpoint = sim.gw.router.endpoint();
        match endpoint.screen(&mut rng, gw_addr(), client_addr(0), &msg, 0) {
            evpc_ike::Screened::Reply(d, PeerError::MissingPayload(p)) => {
                assert_eq!(p, missing);
                let (_, reply) = wire::parse_message(&d.payload).unwrap();
                assert_eq!(
                    reply.payloads,
                    vec![Payload::Notify(NotifyPayload::new(
                        NotifyType::INVALID_SYNTAX,
                        vec![]
                    ))]
                );
            }
            other => panic!("without {missing:?}: {other:?}"),
        }
        assert!(matches!(
            endpoint.accept(sim.now, &mut rng, gw_addr(), client_addr(0), &msg, 0),
            evpc_ike::Accepted::Reply(_, PeerError::MissingPayload(p)) if p == missing
        ));
    }
}
