//! The router: every kind of dispatch, admission (cookies, per-source budget,
//! hard cap) and what frees it, cookie rotation, half-open expiry, SPIs
//! followed across an IKE rekey, and hostile input.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use common::{
    Faults, Rng, START_MS, Sim, client_addr, client_config, connect_options, gateway_config,
    gw_addr,
};
use evpc_ike::wire::{
    self, ExchangeType, HEADER_LEN, Header, NotifyType, Payload, PayloadType, PayloadsExt,
};
use evpc_ike::{
    Accepted, CloseReason, Datagram, Dispatch, DropReason, Endpoint, Event, HalfOpenKey, Identity,
    IkeSa, Outcome, Router, RouterError, RouterLimits, Screened, Secret,
};

/// Every datagram an outcome lets out (clients commit at once).
fn datagrams(o: Outcome) -> Vec<Datagram> {
    let mut v = o.send;
    if let Some(c) = o.commit {
        v.extend(c.into_datagrams_after_durable());
    }
    v
}

fn router_with(limits: RouterLimits, cookie_threshold: usize) -> Router<u32> {
    let mut config = gateway_config(4);
    config.cookie_threshold = cookie_threshold;
    let endpoint = Endpoint::new(Arc::new(config), Secret::from_slice(&[7; 32]));
    Router::new(endpoint, limits, START_MS).expect("valid limits")
}

/// A client at `addr` and its first IKE_SA_INIT request.
fn client(addr: SocketAddr, rng: &mut Rng) -> (IkeSa, Vec<u8>) {
    let (sa, o) = IkeSa::connect(
        Arc::new(client_config(0)),
        addr,
        gw_addr(),
        connect_options(),
        START_MS,
        rng,
    );
    let request = datagrams(o).remove(0).payload;
    (sa, request)
}

/// route, screen, insert_half_open and complete, as a gateway does; the
/// half-open SA's IKE_SA_INIT response on success, else what stopped it.
fn open(
    r: &mut Router<u32>,
    h: u32,
    from: SocketAddr,
    request: &[u8],
    now: u64,
    rng: &mut Rng,
) -> Result<(Box<IkeSa>, Datagram), String> {
    match r.route(from, request) {
        Dispatch::NewSa { .. } => {}
        other => return Err(format!("routed {other:?}")),
    }
    let pending = match r.screen(rng, gw_addr(), from, request) {
        Screened::Admit(p) => p,
        Screened::Reply(_, why) => return Err(format!("replied: {why}")),
        Screened::Dropped(why) => return Err(format!("dropped: {why}")),
    };
    r.insert_half_open(h, pending.key(), [pending.local_spi()], now)
        .map_err(|e| e.to_string())?;
    match pending.complete(now, rng) {
        Accepted::NewSa(sa, o) => Ok((sa, datagrams(o).remove(0))),
        other => Err(format!("complete: {other:?}")),
    }
}

/// A header-only request from the original initiator to our `local_spi`.
fn request_to(local_spi: u64, peer_spi: u64) -> Vec<u8> {
    wire::emit_plain_message(
        Header {
            spi_i: peer_spi,
            spi_r: local_spi,
            next_payload: PayloadType::NONE,
            major_version: 2,
            minor_version: 0,
            exchange: ExchangeType::INFORMATIONAL,
            initiator: true,
            response: false,
            message_id: 1,
            length: 0,
        },
        &[],
    )
}

fn from_ip(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

#[test]
fn every_kind_of_dispatch() {
    let mut rng = Rng(1);
    let mut r = router_with(RouterLimits::default(), 1_000);
    let addr = client_addr(0);
    let (mut c, init) = client(addr, &mut rng);
    let spi_i = c.local_spi().unwrap();

    // Too short for a header, a zero initiator SPI: nothing to route.
    assert_eq!(
        r.route(addr, &init[..HEADER_LEN - 1]),
        Dispatch::Drop(DropReason::Unroutable)
    );
    assert_eq!(
        r.route(addr, &request_to(5, 0)),
        Dispatch::Drop(DropReason::Unroutable)
    );
    // An IKE_SA_INIT nobody holds.
    assert_eq!(
        r.route(addr, &init),
        Dispatch::NewSa {
            initiator_spi: spi_i
        }
    );
    // A message for an SPI nobody holds: the caller's to decide.
    assert_eq!(
        r.route(addr, &request_to(0x1234, spi_i)),
        Dispatch::Unknown { local_spi: 0x1234 }
    );

    let (gw_sa, response) = open(&mut r, 7, addr, &init, START_MS, &mut rng).unwrap();
    let local_spi = gw_sa.local_spi().unwrap();
    assert_eq!(r.half_open_len(), 1);
    // A retransmitted IKE_SA_INIT reaches the same half-open SA, and only
    // from the same address: another port is another initiator.
    assert_eq!(r.route(addr, &init), Dispatch::Sa(7));
    let other_port = SocketAddr::new(addr.ip(), 4500);
    assert_eq!(
        r.route(other_port, &init),
        Dispatch::NewSa {
            initiator_spi: spi_i
        }
    );
    // The peer's IKE_AUTH carries our SPI: routed to the half-open SA.
    let auth = datagrams(c.handle_datagram(START_MS, &mut rng, addr, gw_addr(), &response.payload));
    assert_eq!(auth.len(), 1, "the client sends IKE_AUTH");
    let h = Header::peek(&auth[0].payload).unwrap();
    assert_eq!((h.exchange, h.spi_r), (ExchangeType::IKE_AUTH, local_spi));
    assert_eq!(r.route(auth[0].local, &auth[0].payload), Dispatch::Sa(7));
    // A response to an SA we initiated carries our SPI as the initiator SPI.
    r.insert(8, [0xabcd]).unwrap();
    let mut resp = request_to(0x9999, 0xabcd);
    resp[19] = 0x20; // Flags: Response, not Initiator (we are the original initiator).
    assert_eq!(r.route(addr, &resp), Dispatch::Sa(8));
}

#[test]
fn per_source_budget_is_enforced_and_freed() {
    let mut rng = Rng(2);
    let limits = RouterLimits {
        max_half_open_per_source: 3,
        ..RouterLimits::default()
    };
    let mut r = router_with(limits, 1_000);
    let ip = Ipv4Addr::new(198, 51, 100, 7);
    let mut requests = Vec::new();
    for port in 0..5u16 {
        let addr = from_ip(ip, 10_000 + port);
        requests.push((addr, client(addr, &mut rng).1));
    }
    // Exactly the budget is admitted, from one address on several ports.
    for (h, (addr, req)) in requests.iter().take(3).enumerate() {
        open(&mut r, h as u32, *addr, req, START_MS, &mut rng).unwrap();
    }
    assert_eq!(r.half_open_from(IpAddr::V4(ip)), 3);
    let (addr3, req3) = &requests[3];
    assert_eq!(
        r.route(*addr3, req3),
        Dispatch::Drop(DropReason::SourceBudget)
    );
    // Even a caller that skips `route` cannot go over it.
    let Screened::Admit(p) = r.screen(&mut rng, gw_addr(), *addr3, req3) else {
        panic!("screening knows nothing of budgets");
    };
    assert_eq!(
        r.insert_half_open(99, p.key(), [p.local_spi()], START_MS),
        Err(RouterError::Admission(DropReason::SourceBudget))
    );
    assert!(!r.contains(99));
    // Another source is not affected.
    let elsewhere = from_ip(Ipv4Addr::new(198, 51, 100, 8), 500);
    assert!(matches!(r.route(elsewhere, req3), Dispatch::NewSa { .. }));

    // Established frees one slot of the budget, and only one.
    assert!(r.established(0));
    assert!(!r.established(0), "already established");
    open(&mut r, 3, *addr3, req3, START_MS, &mut rng).unwrap();
    let (addr4, req4) = &requests[4];
    assert_eq!(
        r.route(*addr4, req4),
        Dispatch::Drop(DropReason::SourceBudget)
    );
    // Removal frees one.
    assert!(r.remove(1));
    open(&mut r, 4, *addr4, req4, START_MS, &mut rng).unwrap();
    assert_eq!(r.half_open_from(IpAddr::V4(ip)), 3);
    // Expiry frees the rest (the established SA 0 does not expire).
    let timeout = gateway_config(1).lifetimes.half_open_timeout_ms;
    let mut expired = r.handle_timeout(START_MS + timeout, &mut rng);
    expired.sort();
    assert_eq!(expired, vec![2, 3, 4]);
    assert_eq!(r.half_open_from(IpAddr::V4(ip)), 0);
    assert!(r.contains(0) && r.len() == 1);
}

#[test]
fn ipv6_sources_share_a_budget_per_64() {
    let mut rng = Rng(3);
    let limits = RouterLimits {
        max_half_open_per_source: 1,
        ..RouterLimits::default()
    };
    let mut r = router_with(limits, 1_000);
    let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
    let same_64: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let other_64: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
    let (_, req) = client(SocketAddr::new(a.into(), 500), &mut rng);
    open(
        &mut r,
        0,
        SocketAddr::new(a.into(), 500),
        &req,
        START_MS,
        &mut rng,
    )
    .unwrap();
    assert_eq!(
        r.route(SocketAddr::new(same_64.into(), 500), &req),
        Dispatch::Drop(DropReason::SourceBudget)
    );
    assert!(matches!(
        r.route(SocketAddr::new(other_64.into(), 500), &req),
        Dispatch::NewSa { .. }
    ));
    // An IPv4-mapped address counts as the IPv4 address it maps.
    let v4 = Ipv4Addr::new(203, 0, 113, 5);
    open(&mut r, 1, from_ip(v4, 500), &req, START_MS, &mut rng).unwrap();
    let mapped = SocketAddr::new(v4.to_ipv6_mapped().into(), 501);
    assert_eq!(
        r.route(mapped, &req),
        Dispatch::Drop(DropReason::SourceBudget)
    );
}

#[test]
fn hard_cap_is_enforced_and_freed() {
    let mut rng = Rng(4);
    let limits = RouterLimits {
        max_half_open: 4,
        ..RouterLimits::default()
    };
    // Cookies from 4 on: never reached below the cap, so the cap alone decides.
    let mut r = router_with(limits, 4);
    let mut requests = Vec::new();
    for i in 0..6u8 {
        let addr = from_ip(Ipv4Addr::new(198, 51, 100, 20 + i), 500);
        requests.push((addr, client(addr, &mut rng).1));
    }
    for (h, (addr, req)) in requests.iter().take(4).enumerate() {
        open(&mut r, h as u32, *addr, req, START_MS + h as u64, &mut rng).unwrap();
    }
    assert_eq!(r.half_open_len(), 4);
    let (addr4, req4) = &requests[4];
    assert_eq!(
        r.route(*addr4, req4),
        Dispatch::Drop(DropReason::HalfOpenCap)
    );
    // A retransmission of an admitted SA still gets through at the cap.
    assert_eq!(r.route(requests[0].0, &requests[0].1), Dispatch::Sa(0));
    // Each way out frees exactly one place.
    r.remove(0);
    open(&mut r, 4, *addr4, req4, START_MS, &mut rng).unwrap();
    let (addr5, req5) = &requests[5];
    assert_eq!(
        r.route(*addr5, req5),
        Dispatch::Drop(DropReason::HalfOpenCap)
    );
    assert!(r.on_event(1, &established_event()).is_ok());
    open(&mut r, 5, *addr5, req5, START_MS, &mut rng).unwrap();
    assert_eq!(r.route(*addr4, req4), Dispatch::Sa(4));
    // Expiry frees places too: 4 and 5 were opened at START_MS, 2 at +2,
    // 3 at +3; 1 is established and never expires.
    let timeout = gateway_config(1).lifetimes.half_open_timeout_ms;
    let mut expired = r.handle_timeout(START_MS + timeout, &mut rng);
    expired.sort();
    assert_eq!(expired, vec![4, 5]);
    assert!(
        r.handle_timeout(START_MS + timeout + 1, &mut rng)
            .is_empty()
    );
    assert_eq!(r.handle_timeout(START_MS + timeout + 2, &mut rng), vec![2]);
    assert_eq!(r.half_open_len(), 1);
    assert!(r.contains(1) && r.contains(3));
}

fn established_event() -> Event {
    Event::IkeSaEstablished {
        local_spi: 0,
        peer_identity: Identity::fqdn("client0.example"),
    }
}

/// Sends a cookie reply to the client; returns its retried request.
fn retry_with_cookie(c: &mut IkeSa, addr: SocketAddr, reply: &Datagram, rng: &mut Rng) -> Vec<u8> {
    let retry = datagrams(c.handle_datagram(START_MS, rng, addr, gw_addr(), &reply.payload));
    assert_eq!(retry.len(), 1, "the client retries with the cookie");
    retry[0].payload.clone()
}

fn cookie_of(d: &Datagram) -> Option<Vec<u8>> {
    let (_, chain) = wire::parse_message(&d.payload).ok()?;
    chain
        .payloads
        .notify(NotifyType::COOKIE)
        .map(|n| n.data.clone())
}

#[test]
fn cookie_demanded_at_the_threshold_and_accepted_on_retry() {
    let mut rng = Rng(5);
    let mut r = router_with(RouterLimits::default(), 2);
    let addrs: Vec<SocketAddr> = (0..3).map(client_addr).collect();
    let (_, req0) = client(addrs[0], &mut rng);
    let (_, req1) = client(addrs[1], &mut rng);
    let (mut c2, req2) = client(addrs[2], &mut rng);
    // Below the threshold (0 and 1 half-open): no cookie.
    open(&mut r, 0, addrs[0], &req0, START_MS, &mut rng).unwrap();
    open(&mut r, 1, addrs[1], &req1, START_MS, &mut rng).unwrap();
    // At the threshold: a stateless COOKIE reply, nothing registered.
    let Screened::Reply(reply, _) = r.screen(&mut rng, gw_addr(), addrs[2], &req2) else {
        panic!("a cookie is demanded at the threshold");
    };
    assert!(cookie_of(&reply).is_some());
    assert_eq!(r.half_open_len(), 2);
    let retried = retry_with_cookie(&mut c2, addrs[2], &reply, &mut rng);
    open(&mut r, 2, addrs[2], &retried, START_MS, &mut rng).expect("the cookie is accepted");
    // The same request with one bit of its cookie flipped is not.
    let (h, chain) = wire::parse_message(&retried).unwrap();
    let payloads: Vec<Payload> = chain
        .payloads
        .into_iter()
        .map(|p| match p {
            Payload::Notify(mut n) if n.ty == NotifyType::COOKIE => {
                n.data[5] ^= 1;
                Payload::Notify(n)
            }
            other => other,
        })
        .collect();
    let forged = wire::emit_plain_message(h, &payloads);
    assert_ne!(forged, retried);
    assert!(matches!(
        r.screen(&mut rng, gw_addr(), addrs[2], &forged),
        Screened::Reply(..)
    ));
    let (_, req3) = client(client_addr(3), &mut rng);
    // Below the threshold again, no cookie is needed.
    r.remove(0);
    r.remove(1);
    assert!(matches!(
        r.screen(&mut rng, gw_addr(), client_addr(3), &req3),
        Screened::Admit(_)
    ));
}

#[test]
fn a_cookie_survives_one_rotation_not_two() {
    let mut rng = Rng(6);
    let limits = RouterLimits {
        cookie_rotation_ms: 60_000,
        ..RouterLimits::default()
    };
    // Cookies always.
    let mut r = router_with(limits, 0);
    let addr = client_addr(0);
    let (mut c, req) = client(addr, &mut rng);
    let Screened::Reply(reply, _) = r.screen(&mut rng, gw_addr(), addr, &req) else {
        panic!("cookie demanded");
    };
    let retried = retry_with_cookie(&mut c, addr, &reply, &mut rng);
    let admitted = |r: &Router<u32>, rng: &mut Rng| {
        matches!(r.screen(rng, gw_addr(), addr, &retried), Screened::Admit(_))
    };
    let current_cookie = |r: &Router<u32>, rng: &mut Rng| match r.screen(rng, gw_addr(), addr, &req)
    {
        Screened::Reply(d, _) => cookie_of(&d).unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(admitted(&r, &mut rng));

    assert_eq!(r.poll_timeout(), START_MS + 60_000);
    assert!(r.handle_timeout(START_MS + 59_999, &mut rng).is_empty());
    assert_eq!(
        current_cookie(&r, &mut rng),
        cookie_of(&reply).unwrap(),
        "not rotated early"
    );
    r.handle_timeout(START_MS + 60_000, &mut rng);
    assert_ne!(
        current_cookie(&r, &mut rng),
        cookie_of(&reply).unwrap(),
        "rotated"
    );
    assert!(admitted(&r, &mut rng), "valid for one rotation");
    assert_eq!(r.poll_timeout(), START_MS + 120_000);

    r.handle_timeout(START_MS + 119_999, &mut rng);
    assert!(admitted(&r, &mut rng), "still before the second rotation");
    r.handle_timeout(START_MS + 120_000, &mut rng);
    assert!(!admitted(&r, &mut rng), "invalid after two rotations");
}

#[test]
fn half_open_expiry_is_ordered_and_bounded() {
    let mut rng = Rng(7);
    let limits = RouterLimits {
        max_expired_per_call: 2,
        ..RouterLimits::default()
    };
    let mut r = router_with(limits, 1_000);
    let timeout = gateway_config(1).lifetimes.half_open_timeout_ms;
    // Opened out of order in time: 3 at +30, 1 at +10, 0 at +0, 2 at +20, 4 at +40.
    for (h, at) in [(3u32, 30u64), (1, 10), (0, 0), (2, 20), (4, 40)] {
        let addr = from_ip(Ipv4Addr::new(198, 51, 100, 40 + h as u8), 500);
        let (_, req) = client(addr, &mut rng);
        open(&mut r, h, addr, &req, START_MS + at, &mut rng).unwrap();
    }
    r.established(1);
    assert_eq!(r.poll_timeout(), START_MS + timeout);
    let now = START_MS + timeout + 30;
    // Due: 0, 2, 3 (1 is established). At most two per call, earliest first.
    assert_eq!(r.handle_timeout(now, &mut rng), vec![0, 2]);
    assert!(r.poll_timeout() <= now, "more are due");
    assert_eq!(r.handle_timeout(now, &mut rng), vec![3]);
    assert_eq!(r.poll_timeout(), START_MS + timeout + 40);
    assert!(r.handle_timeout(now, &mut rng).is_empty());
    assert!(r.contains(1) && r.contains(4) && r.len() == 2);
}

#[test]
fn on_event_follows_spis_and_refuses_what_it_cannot_do() {
    let mut r = router_with(RouterLimits::default(), 1_000);
    r.insert(1, [0xa1]).unwrap();
    r.insert(2, [0xb1]).unwrap();
    let rekeyed = |old, new| Event::IkeSaRekeyed {
        old_local_spi: old,
        new_local_spi: new,
    };
    r.on_event(1, &rekeyed(0xa1, 0xa2)).unwrap();
    assert_eq!(
        r.route(client_addr(0), &request_to(0xa2, 9)),
        Dispatch::Sa(1)
    );
    assert_eq!(
        r.route(client_addr(0), &request_to(0xa1, 9)),
        Dispatch::Sa(1)
    );
    r.on_event(1, &Event::LocalSpiReleased { local_spi: 0xa1 })
        .unwrap();
    assert_eq!(
        r.route(client_addr(0), &request_to(0xa1, 9)),
        Dispatch::Unknown { local_spi: 0xa1 }
    );
    // Another SA's SPI is neither taken nor released.
    assert_eq!(
        r.on_event(1, &rekeyed(0xa2, 0xb1)),
        Err(RouterError::SpiInUse(0xb1))
    );
    r.on_event(1, &Event::LocalSpiReleased { local_spi: 0xb1 })
        .unwrap();
    assert_eq!(
        r.route(client_addr(0), &request_to(0xb1, 9)),
        Dispatch::Sa(2)
    );
    // Events that change nothing.
    r.on_event(2, &Event::PeerAlive).unwrap();
    // Closed forgets the SA, and only it.
    r.on_event(
        1,
        &Event::Closed {
            reason: CloseReason::DeletedByPeer,
        },
    )
    .unwrap();
    assert!(!r.contains(1));
    assert_eq!(
        r.route(client_addr(0), &request_to(0xa2, 9)),
        Dispatch::Unknown { local_spi: 0xa2 }
    );
    assert_eq!(
        r.route(client_addr(0), &request_to(0xb1, 9)),
        Dispatch::Sa(2)
    );
    // A forgotten (e.g. expired) SA's rekey does not bring it back.
    assert_eq!(
        r.on_event(1, &rekeyed(0xa2, 0xa3)),
        Err(RouterError::UnknownHandle)
    );
    assert!(!r.contains(1));
    assert_eq!(
        r.route(client_addr(0), &request_to(0xa3, 9)),
        Dispatch::Unknown { local_spi: 0xa3 }
    );
}

#[test]
fn insert_half_open_refuses_conflicts_without_changing_anything() {
    let mut r = router_with(RouterLimits::default(), 1_000);
    let addr = client_addr(0);
    let key = HalfOpenKey {
        peer: addr,
        initiator_spi: 42,
    };
    r.insert(9, [0x77]).unwrap();
    r.insert_half_open(1, key, [0x11], START_MS).unwrap();
    let other_key = HalfOpenKey {
        peer: client_addr(1),
        initiator_spi: 43,
    };
    assert_eq!(
        r.insert_half_open(1, other_key, [0x12], START_MS),
        Err(RouterError::HandleInUse)
    );
    assert_eq!(
        r.insert_half_open(2, key, [0x12], START_MS),
        Err(RouterError::HalfOpenKeyInUse)
    );
    assert_eq!(
        r.insert_half_open(2, other_key, [0x13, 0x77], START_MS),
        Err(RouterError::SpiInUse(0x77))
    );
    assert_eq!(r.half_open_len(), 1);
    assert!(!r.contains(2));
    assert_eq!(r.half_open_from(client_addr(1).ip()), 0);
    assert_eq!(
        r.route(addr, &request_to(0x13, 9)),
        Dispatch::Unknown { local_spi: 0x13 },
        "no SPI of a refused insert is routed"
    );
    assert_eq!(r.route(addr, &request_to(0x77, 9)), Dispatch::Sa(9));
}

#[test]
fn limits_are_validated() {
    let config = gateway_config(1);
    assert!(RouterLimits::default().validate(&config).is_ok());
    let bad = [
        RouterLimits {
            max_half_open: 0,
            ..RouterLimits::default()
        },
        RouterLimits {
            max_half_open_per_source: 0,
            ..RouterLimits::default()
        },
        RouterLimits {
            cookie_rotation_ms: 0,
            ..RouterLimits::default()
        },
        RouterLimits {
            max_expired_per_call: 0,
            ..RouterLimits::default()
        },
        // Below the default cookie threshold (1,000): cookies never asked for.
        RouterLimits {
            max_half_open: 999,
            ..RouterLimits::default()
        },
    ];
    for limits in bad {
        assert!(
            matches!(limits.validate(&config), Err(RouterError::InvalidLimits(_))),
            "{limits:?}"
        );
        let endpoint = Endpoint::new(Arc::new(config.clone()), Secret::from_slice(&[1; 32]));
        assert!(Router::<u32>::new(endpoint, limits, START_MS).is_err());
    }
    let at_threshold = RouterLimits {
        max_half_open: 1_000,
        ..RouterLimits::default()
    };
    assert!(at_threshold.validate(&config).is_ok());
}

#[test]
fn spis_followed_across_an_ike_rekey_and_forgotten_on_close() {
    let mut sim = Sim::new(21, Faults::NONE, gateway_config(1));
    sim.add_client(client_config(0), connect_options());
    assert!(sim.run_until(60_000, |s| s.gw_slot_established().is_some()
        && s.clients[0].sa.is_established()));
    let slot = sim.gw_slot_established().unwrap();
    let addr = client_addr(0);
    let old = sim.gw_sa(slot).unwrap().local_spi().unwrap();
    assert_eq!(
        sim.gw.router.route(addr, &request_to(old, 9)),
        Dispatch::Sa(slot)
    );
    assert_eq!(
        sim.gw.router.half_open_len(),
        0,
        "established frees the half-open entry"
    );

    sim.gw_call(slot, |sa, now, rng| sa.rekey_ike(now, rng).unwrap());
    assert!(
        sim.run_until(60_000, |s| s.gw_sa(slot).is_some_and(|g| g
            .local_spis()
            .len()
            == 1
            && g.local_spi() != Some(old)))
    );
    let new = sim.gw_sa(slot).unwrap().local_spi().unwrap();
    assert_eq!(
        sim.gw.router.route(addr, &request_to(new, 9)),
        Dispatch::Sa(slot)
    );
    assert_eq!(
        sim.gw.router.route(addr, &request_to(old, 9)),
        Dispatch::Unknown { local_spi: old },
        "the released SPI is no longer routed"
    );
    // The SA keeps working on the new SPI through the router.
    sim.client_call(0, |sa, now, rng| sa.send_dpd(now, rng).unwrap());
    assert!(sim.run_until(30_000, |s| {
        s.clients[0]
            .events
            .iter()
            .any(|e| matches!(e, Event::PeerAlive))
    }));

    sim.gw_call(slot, |sa, now, rng| sa.close(now, rng).unwrap());
    assert!(sim.run_until(30_000, |s| s.gw_sa(slot).is_none()));
    assert!(sim.gw.router.is_empty());
    assert_eq!(
        sim.gw.router.route(addr, &request_to(new, 9)),
        Dispatch::Unknown { local_spi: new }
    );
}

#[test]
fn screening_then_completing_splits_the_diffie_hellman_off() {
    let mut rng = Rng(9);
    let r = router_with(RouterLimits::default(), 1_000);
    let addr = client_addr(0);
    let (_, req) = client(addr, &mut rng);
    let (h, chain) = wire::parse_message(&req).unwrap();
    let with_ke = |data: Vec<u8>| {
        let payloads: Vec<Payload> = chain
            .payloads
            .iter()
            .cloned()
            .map(|p| match p {
                Payload::Ke(mut ke) => {
                    ke.data = data.clone();
                    Payload::Ke(ke)
                }
                other => other,
            })
            .collect();
        wire::emit_plain_message(h, &payloads)
    };
    // A KE value of the wrong length is answered by the screening.
    assert!(matches!(
        r.screen(&mut rng, gw_addr(), addr, &with_ke(vec![9; 31])),
        Screened::Reply(_, evpc_ike::PeerError::InvalidKePublicValue)
    ));
    // An all-zero Curve25519 value has the right length: only the
    // Diffie-Hellman computation (in `complete`) finds it degenerate.
    let Screened::Admit(pending) = r.screen(&mut rng, gw_addr(), addr, &with_ke(vec![0; 32]))
    else {
        panic!("the screening does no Diffie-Hellman");
    };
    assert_eq!(
        pending.key(),
        HalfOpenKey {
            peer: addr,
            initiator_spi: h.spi_i
        }
    );
    assert_ne!(pending.local_spi(), 0);
    let debug = format!("{pending:?}");
    assert!(
        debug.contains("PendingInit") && !debug.contains("psk"),
        "{debug}"
    );
    assert!(matches!(
        pending.complete(START_MS, &mut rng),
        Accepted::Reply(_, evpc_ike::PeerError::InvalidKePublicValue)
    ));
}

/// Hostile input: random bytes and every prefix of a real IKE_SA_INIT never
/// panic, never reach an SA, and are never admitted.
#[test]
fn garbage_and_truncated_datagrams_are_dropped() {
    let mut rng = Rng(10);
    let mut r = router_with(RouterLimits::default(), 1_000);
    let addr = client_addr(0);
    let (_, req) = client(addr, &mut rng);
    let (_, known) = client(client_addr(1), &mut rng);
    open(&mut r, 1, client_addr(1), &known, START_MS, &mut rng).unwrap();
    let check = |r: &Router<u32>, rng: &mut Rng, d: &[u8]| match r.route(addr, d) {
        Dispatch::NewSa { .. } => {
            let s = r.screen(rng, gw_addr(), addr, d);
            assert!(
                !matches!(s, Screened::Admit(_)),
                "admitted {} bytes",
                d.len()
            );
        }
        Dispatch::Sa(h) => panic!("garbage routed to {h}"),
        Dispatch::Unknown { .. } | Dispatch::Drop(_) => {}
    };
    for cut in 0..req.len() {
        check(&r, &mut rng, &req[..cut]);
        if cut < HEADER_LEN {
            assert_eq!(
                r.route(addr, &req[..cut]),
                Dispatch::Drop(DropReason::Unroutable)
            );
        }
    }
    let mut data = vec![0u8; 512];
    for len in [0, 1, 27, 28, 29, 64, 200, 512] {
        for _ in 0..200 {
            rng.fill(&mut data[..len]);
            check(&r, &mut rng, &data[..len]);
        }
    }
    // The real request still is admitted: the checks above are not vacuous.
    assert!(matches!(
        r.screen(&mut rng, gw_addr(), addr, &req),
        Screened::Admit(_)
    ));
}
