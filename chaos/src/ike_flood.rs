//! An IKE_SA_INIT flood against the cluster address, for `ike-bench`'s flood phase.
//!
//! Two kinds of attacker, each from many source addresses of its own namespace (a whole
//! /16 made local with `ip route add local …`, so every address can send and receive):
//!
//! - **spoofed**: one IKE_SA_INIT template with a fresh initiator SPI per datagram, sent
//!   round-robin from [`SPOOFED_SOURCES`] addresses whose answers nobody reads — what a
//!   flood with forged sources costs the gateway (it sees, parses and answers them; the
//!   answers, COOKIE ones included, go nowhere);
//! - **answering**: a real initiator per attempt (`IkeSa::connect`, [`ANSWERING_SOURCES`]
//!   addresses) that resends its IKE_SA_INIT with the cookie the gateway asks for and, once
//!   the gateway answered it (a half-open SA exists, its Diffie-Hellman done), walks away
//!   without IKE_AUTH — the flood cookies do not stop.
//!
//! ```text
//!  flood ns: 100.64.0.0/16 local ── UDP 500 ══ bridge ══► every node (slot owner screens)
//!            (nodes route 100.64.0.0/16 back via the flood ns)
//! ```

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use evpc_ike::wire::Header;
use evpc_ike::{Config, ConnectOptions, IkeSa, TrafficSelector};
use serde::Serialize;

/// The attacker's own address on the lab segment.
pub const FLOODER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 60);
/// The block the attacker sends from; the nodes route it back via [`FLOODER`].
pub const SOURCES: &str = "100.64.0.0/16";
/// Distinct spoofed sources (far more than the per-source budget would let one hold).
pub const SPOOFED_SOURCES: u16 = 2048;
/// Distinct sources of the cookie-answering attacker.
pub const ANSWERING_SOURCES: u16 = 256;
/// An answering attempt not answered within this long is forgotten.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Sending happens in bursts this far apart.
const BURST_EVERY: Duration = Duration::from_millis(10);

/// Which attacker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FloodKind {
    Spoofed,
    Answering,
}

/// What the attacker did and saw.
#[derive(Debug, Default, Serialize)]
pub struct FloodStats {
    /// IKE_SA_INIT requests sent (resends with a cookie included).
    pub inits_sent: u64,
    pub seconds: f64,
    pub inits_per_sec: f64,
    /// Answers that came back: COOKIE (and other stateless) replies.
    pub stateless_replies: u64,
    /// IKE_SA_INIT answers with the gateway's SA and KE: half-open SAs made on the cluster.
    pub half_open_made: u64,
}

fn source(i: u16) -> Ipv4Addr {
    // 100.64.0.0/16 without .0 and .255 host parts, from .1.1 upwards.
    Ipv4Addr::new(100, 64, 1 + (i / 250) as u8, 1 + (i % 250) as u8)
}

fn bind(i: u16) -> std::io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddr::from((source(i), 500)))?;
    s.set_nonblocking(true)?;
    Ok(s)
}

fn connect(
    config: &Arc<Config>,
    gateway_id: &str,
    local: SocketAddr,
    target: Ipv4Addr,
) -> (IkeSa, Vec<Vec<u8>>) {
    let options = ConnectOptions::road_warrior(
        evpc_ike::Identity::fqdn(gateway_id),
        vec![TrafficSelector::v4_prefix(Ipv4Addr::new(10, 10, 0, 0), 16)],
    );
    let (sa, outcome) = IkeSa::connect(
        config.clone(),
        local,
        SocketAddr::from((target, 500)),
        options,
        crate::ike_bench::now_ms(),
        &mut crate::ike_bench::random(),
    );
    let sent = outcome.send.into_iter().map(|d| d.payload).collect();
    (sa, sent)
}

/// Floods `target` at `rate` IKE_SA_INITs per second until `stop`; runs on the calling thread
/// (which must be in the flood namespace).
pub fn run(
    kind: FloodKind,
    rate: u64,
    config: Arc<Config>,
    gateway_id: &str,
    target: Ipv4Addr,
    stop: &AtomicBool,
) -> anyhow::Result<FloodStats> {
    let count = match kind {
        FloodKind::Spoofed => SPOOFED_SOURCES,
        FloodKind::Answering => ANSWERING_SOURCES,
    };
    let sockets: Vec<UdpSocket> = (0..count).map(bind).collect::<std::io::Result<_>>()?;
    let to = SocketAddr::from((target, 500));
    let template = connect(
        &config,
        gateway_id,
        SocketAddr::from((source(0), 500)),
        target,
    )
    .1
    .into_iter()
    .next()
    .ok_or_else(|| anyhow::anyhow!("the initiator sent no IKE_SA_INIT"))?;
    let mut stats = FloodStats::default();
    // Answering attempts by initiator SPI: the SA, its socket, when it started.
    let mut attempts: HashMap<u64, (IkeSa, usize, Instant)> = HashMap::new();
    let started = Instant::now();
    let mut next = 0usize;
    let mut buf = [0u8; 4096];
    let mut spi = [0u8; 8];
    while !stop.load(Ordering::Acquire) {
        let burst_start = Instant::now();
        let due = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
        while stats.inits_sent < due {
            let i = next % sockets.len();
            next += 1;
            match kind {
                FloodKind::Spoofed => {
                    let mut message = template.clone();
                    crate::ike_bench::random()(&mut spi);
                    message[..8].copy_from_slice(&spi);
                    let _ = sockets[i].send_to(&message, to);
                }
                FloodKind::Answering => {
                    let local = SocketAddr::from((source(i as u16), 500));
                    let (sa, sent) = connect(&config, gateway_id, local, target);
                    if let Some(spi) = sa.local_spi() {
                        attempts.insert(spi, (sa, i, Instant::now()));
                    }
                    for m in sent {
                        let _ = sockets[i].send_to(&m, to);
                    }
                }
            }
            stats.inits_sent += 1;
        }
        if kind == FloodKind::Answering {
            for (i, socket) in sockets.iter().enumerate() {
                while let Ok((n, from)) = socket.recv_from(&mut buf) {
                    let message = &buf[..n];
                    let Some(h) = Header::peek(message) else {
                        continue;
                    };
                    let Some((sa, _, _)) = attempts.get_mut(&h.spi_i) else {
                        continue;
                    };
                    let local = SocketAddr::from((source(i as u16), 500));
                    if h.spi_r == 0 {
                        stats.stateless_replies += 1;
                    }
                    let outcome = sa.handle_datagram(
                        crate::ike_bench::now_ms(),
                        &mut crate::ike_bench::random(),
                        local,
                        from,
                        message,
                    );
                    if h.spi_r != 0 {
                        // The gateway holds a half-open SA for us now; never send IKE_AUTH.
                        stats.half_open_made += 1;
                        attempts.remove(&h.spi_i);
                        continue;
                    }
                    for d in outcome.send {
                        let _ = socket.send_to(&d.payload, to);
                        stats.inits_sent += 1;
                    }
                }
            }
            attempts.retain(|_, (_, _, at)| at.elapsed() < ATTEMPT_TIMEOUT);
        }
        if let Some(rest) = BURST_EVERY.checked_sub(burst_start.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    stats.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
    stats.inits_per_sec = (stats.inits_sent as f64 / stats.seconds.max(0.001)).round();
    Ok(stats)
}
