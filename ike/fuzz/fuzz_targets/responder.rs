//! Fuzzes the responder: the wire parser, `Endpoint::accept`, and
//! `IkeSa::handle_datagram` of half-open and established SAs, including
//! authentic (correctly sealed) messages whose inner payloads are arbitrary,
//! so that fuzzing reaches the exchange logic behind the ICV check.
//!
//! Input: byte 0 picks the mode, byte 1 the exchange/flags, the rest is data.

#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use evpc_ike::crypto::{DhGroup, DhPrivate, EncrAlg, IkeKeys, IkeSuite, PrfAlg, sk};
use evpc_ike::snapshot::IkeSaSnapshot;
use evpc_ike::wire::{self, ExchangeType, Header, KePayload, NotifyPayload, NotifyType, Payload, PayloadType, Proposal, ProtocolId, SaPayload};
use evpc_ike::{Accepted, Config, ConnectOptions, Endpoint, IkeSa, Identity, InnerAddress, Outcome, Random, Secret, TrafficSelector};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_700_000_000_000;

/// Deterministic xorshift: every iteration sees the same SPIs and keys.
struct Xs(u64);

impl Random for Xs {
    fn fill(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            *b = self.0 as u8;
        }
    }
}

struct Fixture {
    gw_config: Arc<Config>,
    endpoint: Endpoint,
    gw: SocketAddr,
    client: SocketAddr,
    /// Established gateway SAs: idle, with a child rekey pending, with an IKE rekey pending.
    established: Vec<IkeSaSnapshot>,
    /// The client's view, for its keys and message IDs.
    client_snapshot: IkeSaSnapshot,
    /// An IKE_SA_INIT request and the keys the half-open SA derives from it.
    init_request: Vec<u8>,
    half_open_keys: IkeKeys,
    half_open_spis: (u64, u64),
}

fn drain(o: Outcome) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = o.send.into_iter().map(|d| d.payload).collect();
    if let Some(c) = o.commit {
        out.extend(c.into_datagrams_after_durable().into_iter().map(|d| d.payload));
    }
    out
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let gw: SocketAddr = "192.0.2.1:500".parse().unwrap();
        let client: SocketAddr = "198.51.100.10:500".parse().unwrap();
        let psk = b"fuzz-psk";
        let gw_config = Arc::new(Config::new(Identity::fqdn("gw")).with_psk(Identity::fqdn("client"), psk));
        let client_config = Arc::new(Config::new(Identity::fqdn("client")).with_psk(Identity::fqdn("gw"), psk));
        let endpoint = Endpoint::new(gw_config.clone(), Secret::from_slice(&[9; 32]));
        let mut rng = Xs(0x1234_5678);
        // A full handshake in memory.
        let options = ConnectOptions {
            remote_identity: Identity::fqdn("gw"),
            request_inner_address: true,
            ts_i: vec![TrafficSelector::any_v4()],
            ts_r: vec![TrafficSelector::any_v4()],
            force_udp_encap: false,
        };
        let (mut c, o) = IkeSa::connect(client_config, client, gw, options, NOW, &mut rng);
        let init = drain(o).remove(0);
        let Accepted::NewSa(mut g, o) = endpoint.accept(NOW, &mut rng, gw, client, &init, 0) else { panic!("accept") };
        let resp = drain(o).remove(0);
        let auth = drain(c.handle_datagram(NOW, &mut rng, client, gw, &resp)).remove(0);
        let o = g.handle_datagram(NOW, &mut rng, gw, client, &auth);
        assert!(drain(o).is_empty());
        let o = g.assign_inner_address(Some(InnerAddress::new("10.0.0.2".parse().unwrap())), NOW, &mut rng).unwrap();
        let auth_resp = drain(o).remove(0);
        let _ = drain(c.handle_datagram(NOW, &mut rng, client, gw, &auth_resp));
        assert!(g.is_established() && c.is_established());
        let idle = g.snapshot().unwrap();
        let spi = g.children()[0].inbound_spi;
        let mut pending_child = IkeSa::restore(gw_config.clone(), idle.clone()).unwrap();
        let _ = drain(pending_child.rekey_child(spi, NOW, &mut rng).unwrap());
        let mut pending_ike = IkeSa::restore(gw_config.clone(), idle.clone()).unwrap();
        let _ = drain(pending_ike.rekey_ike(NOW, &mut rng).unwrap());

        // An IKE_SA_INIT whose DH private value we know.
        let suite = IkeSuite { encr: EncrAlg::AES128_GCM16, prf: PrfAlg::HmacSha256, dh: DhGroup::Curve25519 };
        let dh = DhPrivate::generate(DhGroup::Curve25519, &mut rng);
        let ni = vec![7u8; 32];
        let spi_i = 0x0bad_cafe_0000_0001;
        let payloads = vec![
            Payload::Sa(SaPayload {
                proposals: vec![Proposal {
                    number: 1,
                    protocol: ProtocolId::IKE,
                    spi: vec![],
                    transforms: vec![suite.encr.transform(), suite.prf.transform(), suite.dh.transform()],
                }],
            }),
            Payload::Ke(KePayload { group: suite.dh.id(), data: dh.public() }),
            Payload::Nonce(ni.clone()),
            Payload::Notify(NotifyPayload::new(NotifyType::NAT_DETECTION_SOURCE_IP, vec![0; 20])),
        ];
        let init_request = wire::emit_plain_message(header(spi_i, 0, ExchangeType::IKE_SA_INIT, 0, false), &payloads);
        let Accepted::NewSa(_, o) = endpoint.accept(NOW, &mut Xs(42), gw, client, &init_request, 0) else { panic!("accept 2") };
        let resp = drain(o).remove(0);
        let (h, chain) = wire::parse_message(&resp).unwrap();
        let ke = chain.payloads.iter().find_map(|p| if let Payload::Ke(k) = p { Some(k.clone()) } else { None }).unwrap();
        let nr = chain.payloads.iter().find_map(|p| if let Payload::Nonce(n) = p { Some(n.clone()) } else { None }).unwrap();
        let shared = dh.agree(&ke.data).unwrap();
        let half_open_keys = IkeKeys::derive_initial(&suite, &shared, &ni, &nr, spi_i, h.spi_r);
        Fixture {
            gw_config,
            endpoint,
            gw,
            client,
            established: vec![idle, pending_child.snapshot().unwrap(), pending_ike.snapshot().unwrap()],
            client_snapshot: c.snapshot().unwrap(),
            init_request,
            half_open_keys,
            half_open_spis: (spi_i, h.spi_r),
        }
    })
}

fn header(spi_i: u64, spi_r: u64, exchange: ExchangeType, message_id: u32, response: bool) -> Header {
    Header {
        spi_i,
        spi_r,
        next_payload: PayloadType::NONE,
        major_version: 2,
        minor_version: 0,
        exchange,
        initiator: true,
        response,
        message_id,
        length: 0,
    }
}

fn exchange(b: u8) -> ExchangeType {
    [ExchangeType::IKE_AUTH, ExchangeType::CREATE_CHILD_SA, ExchangeType::INFORMATIONAL, ExchangeType(b)][(b & 3) as usize]
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let [mode, flags, rest @ ..] = data else { return };
    let _ = wire::parse_message(rest);
    let mut rng = Xs(0xfeed);
    match mode % 4 {
        // A new SA from arbitrary bytes, with and without cookies required.
        0 => {
            let _ = f.endpoint.accept(NOW, &mut rng, f.gw, f.client, rest, (*flags as usize) * 4);
        }
        // Arbitrary bytes to established SAs, then their timers.
        1 => {
            let snap = f.established[(*flags % 3) as usize].clone();
            let mut sa = IkeSa::restore(f.gw_config.clone(), snap).unwrap();
            let _ = drain(sa.handle_datagram(NOW, &mut rng, f.gw, f.client, rest));
            let _ = drain(sa.handle_timeout(NOW + 3_600_000, &mut rng));
        }
        // Authentic messages with arbitrary inner payloads to established SAs.
        2 => {
            let Some((&first, chain)) = rest.split_first() else { return };
            let snap = f.established[(*flags % 3) as usize].clone();
            let response = flags & 0x04 != 0;
            let g = &snap.current;
            let c = &f.client_snapshot.current;
            let id = match (response, flags & 0x08 != 0) {
                (true, _) => g.pending.as_ref().map_or(0, |p| p.message.message_id),
                (false, false) => c.next_request_id,
                (false, true) => c.next_request_id.wrapping_sub(1),
            };
            let h = header(g.spi_i, g.spi_r, exchange(flags >> 4), id, response);
            let msg = sk::seal_chain_bytes(h, PayloadType(first), chain, g.suite.encr, c.keys.sk_ei.expose(), [3; 8]);
            let mut sa = IkeSa::restore(f.gw_config.clone(), snap.clone()).unwrap();
            let _ = drain(sa.handle_datagram(NOW, &mut rng, f.gw, f.client, &msg));
            let _ = drain(sa.handle_timeout(NOW + 3_600_000, &mut rng));
        }
        // Authentic IKE_AUTH (or other) with arbitrary inner payloads to a half-open SA.
        _ => {
            let Some((&first, chain)) = rest.split_first() else { return };
            let Accepted::NewSa(mut sa, _) = f.endpoint.accept(NOW, &mut Xs(42), f.gw, f.client, &f.init_request, 0) else { return };
            let (spi_i, spi_r) = f.half_open_spis;
            let h = header(spi_i, spi_r, exchange(flags >> 4), u32::from(flags & 1) + 1, flags & 2 != 0);
            let msg = sk::seal_chain_bytes(h, PayloadType(first), chain, EncrAlg::AES128_GCM16, f.half_open_keys.sk_ei.expose(), [3; 8]);
            let o = sa.handle_datagram(NOW, &mut rng, f.gw, f.client, &msg);
            let asked = o.events.iter().any(|e| matches!(e, evpc_ike::Event::InnerAddressNeeded { .. }));
            let _ = drain(o);
            if asked {
                let addr = (flags & 8 != 0).then(|| InnerAddress::new("10.0.0.9".parse().unwrap()));
                if let Ok(o) = sa.assign_inner_address(addr, NOW, &mut rng) {
                    let _ = drain(o);
                }
            }
        }
    }
});
