//! A gateway made of our parts for the client's tests: an `evpc_ike` responder ([`Endpoint`]
//! for IKE_SA_INIT, then the [`IkeSa`]) with a PSK for the test client, inner addresses from
//! 10.10.1.2 up, the network 10.20.0.0/24 behind it, and the gateway-initiated work a cluster
//! does (child and IKE rekeys, DPD, delete). Sans-IO like the engine: the tests move its
//! datagrams (in memory, or through a real data plane in `e2e.rs`).

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use evpc_client::run::OsRandom;
use evpc_ike::wire::{self, ExchangeType, Header, Route};
use evpc_ike::{
    Accepted, ChildSaInfo, Config, Datagram, Endpoint, Event, Identity, IkeSa, InnerAddress,
    Outcome, Secret, TrafficSelector,
};

pub const GW_ID: &str = "gw.example";
pub const CLIENT_ID: &str = "client-17.example";
pub const PSK: &[u8] = b"a-test-psk-of-some-length";
/// The first inner address the gateway hands out.
pub const FIRST_INNER: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 2);
/// The network behind the gateway (what the client routes into its tunnel).
pub const BEHIND: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 0);
pub const BEHIND_LEN: u8 = 24;

/// What one call into the gateway produced.
#[derive(Debug, Default)]
pub struct Output {
    /// To send (the non-ESP marker goes on port 4500).
    pub datagrams: Vec<Datagram>,
    /// The engine's events (children to install and remove, closing).
    pub events: Vec<Event>,
}

/// One responder with (at most) one IKE SA.
pub struct Gateway {
    endpoint: Endpoint,
    pub sa: Option<IkeSa>,
    initiator_spi: Option<u64>,
    next_inner: Ipv4Addr,
    rng: OsRandom,
    /// IKE_SA_INIT requests received (retransmissions included).
    pub init_requests: u32,
    /// IKE_AUTH requests received (retransmissions included).
    pub auth_requests: u32,
    /// IKE SAs the gateway accepted (half-open ones included).
    pub sas_accepted: u32,
    /// Every child the gateway installed, in order.
    pub installed: Vec<ChildSaInfo>,
    /// Every child it removed (inbound SPI on the gateway's side).
    pub removed: Vec<u32>,
    /// The closing reasons it saw.
    pub closed: Vec<String>,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway::new()
    }
}

impl Gateway {
    pub fn new() -> Gateway {
        let mut config =
            Config::new(Identity::fqdn(GW_ID)).with_psk(Identity::fqdn(CLIENT_ID), PSK);
        config.local_ts = vec![TrafficSelector::v4_prefix(BEHIND, BEHIND_LEN)];
        // as a gateway with a pool does: a road warrior gets a child only with its address
        config.require_inner_address = true;
        Gateway {
            endpoint: Endpoint::new(Arc::new(config), Secret::from_slice(&[7; 32])),
            sa: None,
            initiator_spi: None,
            next_inner: FIRST_INNER,
            rng: OsRandom,
            init_requests: 0,
            auth_requests: 0,
            sas_accepted: 0,
            installed: Vec::new(),
            removed: Vec::new(),
            closed: Vec::new(),
        }
    }

    /// One IKE message (marker already stripped) that arrived on `local` from `remote`.
    pub fn on_datagram(
        &mut self,
        now_ms: u64,
        local: SocketAddr,
        remote: SocketAddr,
        message: &[u8],
    ) -> Output {
        if let Some(h) = Header::peek(message)
            && !h.response
        {
            match h.exchange {
                ExchangeType::IKE_SA_INIT => self.init_requests += 1,
                ExchangeType::IKE_AUTH => self.auth_requests += 1,
                _ => {}
            }
        }
        let outcome = match wire::route(message) {
            Route::NewSa { initiator_spi } if self.initiator_spi == Some(initiator_spi) => {
                match self.sa.as_mut() {
                    Some(sa) => sa.handle_datagram(now_ms, &mut self.rng, local, remote, message),
                    None => return Output::default(),
                }
            }
            Route::NewSa { initiator_spi } => {
                match self
                    .endpoint
                    .accept(now_ms, &mut self.rng, local, remote, message, 0)
                {
                    Accepted::NewSa(sa, outcome) => {
                        self.sas_accepted += 1;
                        self.initiator_spi = Some(initiator_spi);
                        self.sa = Some(*sa);
                        outcome
                    }
                    Accepted::Reply(d, _) => {
                        return Output {
                            datagrams: vec![d],
                            events: Vec::new(),
                        };
                    }
                    Accepted::Dropped(_) => return Output::default(),
                }
            }
            // One SA: every other message is for it (whatever generation its SPIs name).
            Route::Existing { .. } => match self.sa.as_mut() {
                Some(sa) => sa.handle_datagram(now_ms, &mut self.rng, local, remote, message),
                None => return Output::default(),
            },
            Route::Drop => return Output::default(),
        };
        self.finish(outcome, now_ms)
    }

    /// Timers: retransmissions of the gateway's own requests.
    pub fn on_timeout(&mut self, now_ms: u64) -> Output {
        match self.sa.as_mut() {
            Some(sa) => {
                let outcome = sa.handle_timeout(now_ms, &mut self.rng);
                self.finish(outcome, now_ms)
            }
            None => Output::default(),
        }
    }

    pub fn next_timeout(&self) -> Option<u64> {
        self.sa.as_ref().and_then(IkeSa::next_timeout)
    }

    /// The gateway's inbound SPIs of its live children.
    pub fn children(&self) -> Vec<u32> {
        self.sa
            .as_ref()
            .map(|sa| {
                sa.children()
                    .iter()
                    .filter(|c| !c.replaced)
                    .map(|c| c.inbound_spi)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Rekeys the (first live) child, as a gateway does at its child lifetime.
    pub fn rekey_child(&mut self, now_ms: u64) -> Output {
        let spi = self.children()[0];
        let outcome = self
            .sa
            .as_mut()
            .expect("an SA")
            .rekey_child(spi, now_ms, &mut self.rng)
            .expect("rekey_child");
        self.finish(outcome, now_ms)
    }

    /// Rekeys the IKE SA.
    pub fn rekey_ike(&mut self, now_ms: u64) -> Output {
        let outcome = self
            .sa
            .as_mut()
            .expect("an SA")
            .rekey_ike(now_ms, &mut self.rng)
            .expect("rekey_ike");
        self.finish(outcome, now_ms)
    }

    /// A liveness check of the gateway's.
    pub fn dpd(&mut self, now_ms: u64) -> Output {
        let outcome = self
            .sa
            .as_mut()
            .expect("an SA")
            .send_dpd(now_ms, &mut self.rng)
            .expect("send_dpd");
        self.finish(outcome, now_ms)
    }

    /// Deletes the IKE SA (an operator's `evpcctl sa delete`).
    pub fn delete(&mut self, now_ms: u64) -> Output {
        let outcome = self
            .sa
            .as_mut()
            .expect("an SA")
            .close(now_ms, &mut self.rng)
            .expect("close");
        self.finish(outcome, now_ms)
    }

    /// Handles an outcome completely: an inner address when asked (the IKE_AUTH answer is only
    /// built then), commits "durable" at once.
    fn finish(&mut self, outcome: Outcome, now_ms: u64) -> Output {
        let mut output = Output::default();
        let mut outcome = outcome;
        loop {
            output.datagrams.extend(outcome.send);
            if let Some(commit) = outcome.commit {
                output
                    .datagrams
                    .extend(commit.into_datagrams_after_durable());
            }
            let mut wants_address = false;
            for event in outcome.events {
                match &event {
                    Event::InnerAddressNeeded { .. } => wants_address = true,
                    Event::ChildSaInstalled(info) => self.installed.push((**info).clone()),
                    Event::ChildSaDeleted { inbound_spi, .. } => self.removed.push(*inbound_spi),
                    Event::Closed { reason } => self.closed.push(format!("{reason:?}")),
                    _ => {}
                }
                output.events.push(event);
            }
            if !wants_address {
                break;
            }
            let address = InnerAddress::new(self.next_inner).with_dns(Ipv4Addr::new(10, 20, 0, 1));
            self.next_inner = Ipv4Addr::from(u32::from(self.next_inner) + 1);
            let Some(sa) = self.sa.as_mut() else { break };
            match sa.assign_inner_address(Some(address), now_ms, &mut self.rng) {
                Ok(next) => outcome = next,
                Err(_) => break,
            }
        }
        if self.sa.as_ref().is_some_and(IkeSa::is_closed) {
            self.sa = None;
        }
        output
    }
}

/// The report lines a client wrote, parsed.
pub fn lines(output: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

/// The lines of one event.
pub fn events<'a>(lines: &'a [serde_json::Value], event: &str) -> Vec<&'a serde_json::Value> {
    lines.iter().filter(|l| l["event"] == event).collect()
}
