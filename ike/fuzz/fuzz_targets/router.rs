//! Fuzzes the `Router`: `route` and `screen` on arbitrary datagrams and on a
//! real IKE_SA_INIT with fuzzed SPI and source (so admission, the per-source
//! budget and the cap are reached), interleaved with `insert_half_open`,
//! `established`, `remove`, `on_event` and `handle_timeout`. After every
//! operation the limits must hold and a known handle must still be routed.
//!
//! Input: a sequence of operations, each an opcode byte and its arguments.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use evpc_ike::{
    Accepted, Config, ConnectOptions, Dispatch, Endpoint, Event, Identity, IkeSa, Random, Router,
    RouterLimits, Screened, Secret, TrafficSelector,
};
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
    config: Arc<Config>,
    gw: SocketAddr,
    /// A client's IKE_SA_INIT request.
    init_request: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let gw_id = Identity::fqdn("gw.example");
        let client_id = Identity::fqdn("client.example");
        let mut config = Config::new(gw_id.clone()).with_psk(client_id.clone(), b"psk");
        // Small numbers, so the fuzzer reaches the cookie threshold and the cap.
        config.cookie_threshold = 4;
        let gw = SocketAddr::from((Ipv4Addr::new(192, 0, 2, 1), 500));
        let client = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 1), 500));
        let client_config = Arc::new(Config::new(client_id).with_psk(gw_id.clone(), b"psk"));
        let options = ConnectOptions::road_warrior(gw_id, vec![TrafficSelector::any_v4()]);
        let (_, o) = IkeSa::connect(client_config, client, gw, options, NOW, &mut Xs(7));
        Fixture {
            config: Arc::new(config),
            gw,
            init_request: o.send[0].payload.clone(),
        }
    })
}

fn limits() -> RouterLimits {
    RouterLimits {
        max_half_open: 8,
        max_half_open_per_source: 3,
        cookie_rotation_ms: 1_000,
        max_expired_per_call: 2,
    }
}

/// Reads operation arguments, yielding zeros once the input runs out.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |v, _| (v << 8) | u64::from(self.u8()))
    }

    fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.u8()).min(self.0.len());
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        b
    }

    fn source(&mut self) -> SocketAddr {
        // Few addresses and ports, so budgets fill up.
        let ip = Ipv4Addr::new(198, 51, 100, self.u8() % 4);
        SocketAddr::new(IpAddr::V4(ip), 500 + u16::from(self.u8() % 4))
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let endpoint = Endpoint::new(f.config.clone(), Secret::from_slice(&[1; 32]));
    let Ok(mut router) = Router::<u8>::new(endpoint, limits(), NOW) else {
        return;
    };
    let mut rng = Xs(0xfeed);
    let mut now = NOW;
    let mut input = Input(data);
    while !input.0.is_empty() {
        let op = input.u8();
        let h = input.u8() % 16;
        match op % 7 {
            // Arbitrary bytes, as from the network.
            0 => {
                let from = input.source();
                let d = input.bytes();
                if let Dispatch::NewSa { .. } = router.route(from, d) {
                    let _ = router.screen(&mut rng, f.gw, from, d);
                }
            }
            // A real IKE_SA_INIT with a fuzzed initiator SPI from a fuzzed
            // source, admitted as a gateway would.
            1 => {
                let from = input.source();
                let mut d = f.init_request.clone();
                d[..8].copy_from_slice(&(input.u64() | 1).to_be_bytes());
                match router.route(from, &d) {
                    Dispatch::NewSa { .. } => {
                        if let Screened::Admit(p) = router.screen(&mut rng, f.gw, from, &d) {
                            let inserted = router
                                .insert_half_open(h, p.key(), [p.local_spi()], now)
                                .is_ok();
                            // The Diffie-Hellman step only now and then: it is slow.
                            if inserted && input.u8() == 0 {
                                if !matches!(p.complete(now, &mut rng), Accepted::NewSa(..)) {
                                    router.remove(h);
                                }
                            }
                        }
                    }
                    Dispatch::Sa(known) => assert!(router.contains(known)),
                    Dispatch::Unknown { .. } | Dispatch::Drop(_) => {}
                }
            }
            2 => {
                router.established(h);
            }
            3 => {
                router.remove(h);
            }
            4 => {
                let spis = [input.u64(), input.u64()];
                let _ = router.insert(h, spis);
            }
            5 => {
                let spi = input.u64();
                let event = match input.u8() % 3 {
                    0 => Event::IkeSaRekeyed {
                        old_local_spi: 0,
                        new_local_spi: spi,
                    },
                    1 => Event::LocalSpiReleased { local_spi: spi },
                    _ => Event::PeerAlive,
                };
                let _ = router.on_event(h, &event);
            }
            _ => {
                now = now.saturating_add(u64::from(input.u8()) * 1_000);
                for expired in router.handle_timeout(now, &mut rng) {
                    assert!(!router.contains(expired));
                }
            }
        }
        assert!(router.half_open_len() <= limits().max_half_open);
        for last in 0..4 {
            let ip = IpAddr::V4(Ipv4Addr::new(198, 51, 100, last));
            assert!(router.half_open_from(ip) <= limits().max_half_open_per_source);
        }
    }
});
