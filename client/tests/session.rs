//! The client's session against a gateway of our parts, in memory (no root, no sockets): the
//! datagrams move between the two engines through a recording data plane, on a made-up clock,
//! so losses, rekeys, DPDs and deletes happen exactly when the test says.
//!
//! ```text
//!  Session (client) ── FakePlane.sent ──► Net::deliver ──► Gateway (evpc_ike responder)
//!        ▲                                                        │
//!        └──────────────── IkeDatagram ◄── Net::deliver ◄─────────┘
//! ```

mod support;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};

use evpc_client::metrics::DriverTotals;
use evpc_client::report::{Reporter, Spi32};
use evpc_client::run::OsRandom;
use evpc_client::{ClientError, DataPlane, Now, Prefix, Psk, Session, Settings};
use evpc_dataplane::ike::{IkeDatagram, IkePort};
use evpc_dataplane::{ChildCounters, ChildStart, DriverError};
use evpc_ike::{Datagram, Identity};
use serde_json::Value;
use support::*;

const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
const GATEWAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);

/// Records what the session asks of the data plane.
#[derive(Debug, Default)]
struct FakePlane {
    sent: RefCell<Vec<(IkePort, SocketAddr, Vec<u8>)>>,
    started: RefCell<Vec<ChildStart>>,
    running: RefCell<BTreeMap<u32, ChildCounters>>,
    stopped: RefCell<Vec<u32>>,
    configured: RefCell<Vec<(Option<Ipv4Addr>, Vec<Prefix>)>>,
}

impl DataPlane for FakePlane {
    fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> io::Result<()> {
        self.sent
            .borrow_mut()
            .push((port, remote, message.to_vec()));
        Ok(())
    }

    fn start_child(&self, child: ChildStart) -> Result<(), DriverError> {
        let mut running = self.running.borrow_mut();
        if running.contains_key(&child.in_spi) {
            return Err(DriverError::AlreadyRunning(child.in_spi));
        }
        // a child that carried some traffic, so the totals have something to add
        running.insert(
            child.in_spi,
            ChildCounters {
                out_packets: 3,
                in_packets: 2,
                highest_out: 3,
                highest_in: 2,
                ..ChildCounters::default()
            },
        );
        self.started.borrow_mut().push(child);
        Ok(())
    }

    fn stop_child(&self, in_spi: u32) -> Option<ChildCounters> {
        self.stopped.borrow_mut().push(in_spi);
        self.running.borrow_mut().remove(&in_spi)
    }

    fn child_counters(&self, in_spi: u32) -> Option<ChildCounters> {
        self.running.borrow().get(&in_spi).copied()
    }

    fn configure_inner(
        &self,
        inner: Option<Ipv4Addr>,
        routes: &[Prefix],
    ) -> Result<(), ClientError> {
        self.configured.borrow_mut().push((inner, routes.to_vec()));
        Ok(())
    }

    fn totals(&self) -> DriverTotals {
        DriverTotals {
            packets_in: 2,
            ..DriverTotals::default()
        }
    }
}

fn settings() -> Settings {
    Settings {
        local: CLIENT,
        gateway: GATEWAY,
        local_id: Identity::from_config(CLIENT_ID),
        remote_id: Identity::from_config(GW_ID),
        psk: Psk::from_bytes(PSK).unwrap(),
        tun: "evpcc0".into(),
        routes: vec![Prefix {
            network: BEHIND,
            len: BEHIND_LEN,
        }],
        dpd: None,
        counters: std::time::Duration::from_secs(1),
        replay_window: 1024,
        delete_on_exit: false,
    }
}

/// The client, the gateway, and the wire between them.
struct Net {
    client: Session<FakePlane, Vec<u8>>,
    gw: Gateway,
    now: Now,
}

impl Net {
    fn new() -> Net {
        let now = Now {
            unix_us: 1_760_000_000_000_000,
            mono_us: 5_000_000,
        };
        let client = Session::connect(
            &settings(),
            FakePlane::default(),
            Reporter::new(Vec::new()),
            Box::new(OsRandom),
            now,
        )
        .unwrap();
        Net {
            client,
            gw: Gateway::new(),
            now,
        }
    }

    fn advance_ms(&mut self, ms: u64) {
        self.now.unix_us += ms * 1000;
        self.now.mono_us += ms * 1000;
    }

    /// What the client sent since the last call.
    fn take_client(&mut self) -> Vec<(IkePort, SocketAddr, Vec<u8>)> {
        std::mem::take(&mut *self.client.plane().sent.borrow_mut())
    }

    /// Delivers the client's datagrams to the gateway; returns the gateway's answers.
    fn deliver_to_gateway(&mut self) -> Vec<Datagram> {
        let mut answers = Vec::new();
        for (port, to, message) in self.take_client() {
            assert_eq!(to.ip(), GATEWAY);
            let client_port = match port {
                IkePort::NatT => 4500,
                IkePort::Ike => 500,
            };
            assert_eq!(to.port(), client_port, "IKE goes port to port");
            let out = self.gw.on_datagram(
                self.now.engine_ms(),
                to,
                SocketAddr::from((CLIENT, client_port)),
                &message,
            );
            answers.extend(out.datagrams);
        }
        answers
    }

    /// Delivers the gateway's datagrams to the client.
    fn deliver_to_client(&mut self, datagrams: Vec<Datagram>) {
        for d in datagrams {
            assert_eq!(d.remote.ip(), std::net::IpAddr::V4(CLIENT));
            let port = if d.remote.port() == 4500 {
                IkePort::NatT
            } else {
                IkePort::Ike
            };
            self.client
                .on_ike(
                    IkeDatagram {
                        port,
                        local: d.remote,
                        remote: d.local,
                        message: d.payload,
                    },
                    self.now,
                )
                .unwrap();
        }
    }

    /// Moves datagrams both ways until both sides are quiet.
    fn settle(&mut self) {
        for _ in 0..20 {
            let answers = self.deliver_to_gateway();
            if answers.is_empty() && self.client.plane().sent.borrow().is_empty() {
                return;
            }
            self.deliver_to_client(answers);
        }
        panic!("the exchange never settled");
    }

    fn lines(&self) -> Vec<Value> {
        lines(self.client.output())
    }

    fn established() -> Net {
        let mut net = Net::new();
        net.settle();
        assert!(net.client.is_established(), "{:#?}", net.lines());
        net
    }
}

fn spi_hex(spi: u32) -> String {
    format!("{spi:08x}")
}

#[test]
fn it_sets_up_once_with_an_inner_address_and_the_gateways_child() {
    let net = Net::established();
    let lines = net.lines();
    let names: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "started",
            "ike_sa_init",
            "ike_auth",
            "established",
            "child_started"
        ]
    );
    for line in &lines {
        assert!(line["t"].as_f64().unwrap() > 1.7e12, "{line}");
    }
    assert_eq!(lines[0]["local"], "198.51.100.100");
    assert_eq!(lines[0]["pid"], std::process::id());
    assert_eq!(lines[1]["n"], 1);
    assert_eq!(lines[1]["retransmit"], false);
    assert_eq!(lines[1]["to"], "198.51.100.1:500");
    assert_eq!(lines[2]["n"], 1);
    assert_eq!(lines[2]["message_id"], 1);
    assert_eq!(
        lines[2]["to"], "198.51.100.1:4500",
        "NAT-T forced: IKE_AUTH on 4500"
    );

    // the child mirrors the gateway's: our inbound is its outbound, with the same keys
    let gw_child = &net.gw.installed[0];
    let started = net.client.plane().started.borrow();
    assert_eq!(started.len(), 1);
    let child = &started[0];
    assert_eq!(child.in_spi, gw_child.outbound_spi);
    assert_eq!(child.out_spi, gw_child.inbound_spi);
    let keys = child.keys.as_ref().unwrap();
    assert_eq!(&keys.inbound[..], gw_child.outbound_key.expose());
    assert_eq!(&keys.outbound[..], gw_child.inbound_key.expose());
    assert!(child.udp_encap, "NAT-T forced: ESP in UDP");
    assert_eq!(child.local, SocketAddr::from((CLIENT, 4500)));
    assert_eq!(child.peer, SocketAddr::from((GATEWAY, 4500)));
    assert_eq!((child.next_seq, child.replay_floor), (1, 0));
    assert_eq!(
        child.limit,
        evpc_client::child::highest_seq(child.suite.esn)
    );
    assert_eq!(
        child.ts_local[0].start_addr,
        std::net::IpAddr::V4(FIRST_INNER),
        "our side narrowed to the inner address"
    );

    let est = &lines[3];
    assert_eq!(est["inner"], FIRST_INNER.to_string());
    assert_eq!(est["dns"][0], "10.20.0.1");
    assert_eq!(est["child_in_spi"], spi_hex(child.in_spi));
    assert_eq!(est["child_out_spi"], spi_hex(child.out_spi));
    assert_eq!(est["gateway"], "198.51.100.1:4500");
    assert!(est["suite"].as_str().unwrap().starts_with("aes"));
    assert_eq!(est["spi_i"], lines[1]["spi_i"]);
    assert_eq!(est["spi_r"], lines[2]["spi_r"]);
    assert_eq!(lines[4]["rekey_of"], Value::Null);
    assert_eq!(lines[4]["ts_local"][0], "10.10.1.2/32");
    assert_eq!(lines[4]["ts_remote"][0], "10.20.0.0/24");

    // the TUN gets the address and the route
    assert_eq!(
        *net.client.plane().configured.borrow(),
        [(Some(FIRST_INNER), settings().routes)]
    );
    assert_eq!(net.gw.auth_requests, 1);
    assert_eq!(net.gw.sas_accepted, 1);
}

#[test]
fn a_lost_ike_sa_init_is_sent_again_and_counted() {
    let mut net = Net::new();
    assert_eq!(net.take_client().len(), 1, "the first IKE_SA_INIT, lost");
    let due = net.client.next_timeout().expect("a retransmission timer");
    net.advance_ms(due - net.now.engine_ms());
    net.client.on_timeout(net.now).unwrap();
    net.settle();
    assert!(net.client.is_established());
    let lines = net.lines();
    let inits = events(&lines, "ike_sa_init");
    assert_eq!(inits.len(), 2);
    assert_eq!(
        (inits[0]["n"].as_u64(), inits[0]["retransmit"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(
        (inits[1]["n"].as_u64(), inits[1]["retransmit"].as_bool()),
        (Some(2), Some(true))
    );
    assert_eq!(events(&lines, "ike_auth").len(), 1);
    let est = events(&lines, "established")[0];
    assert!(est["setup_ms"].as_f64().unwrap() >= 1000.0, "{est}");
}

#[test]
fn a_lost_ike_auth_answer_is_a_retransmission_not_a_second_ike_auth() {
    let mut net = Net::new();
    let init_answer = net.deliver_to_gateway();
    net.deliver_to_client(init_answer);
    let auth_answer = net.deliver_to_gateway();
    assert!(!auth_answer.is_empty());
    drop(auth_answer); // lost on the way back
    let due = net.client.next_timeout().unwrap();
    net.advance_ms(due - net.now.engine_ms());
    net.client.on_timeout(net.now).unwrap();
    net.settle();
    assert!(net.client.is_established());
    let lines = net.lines();
    assert_eq!(events(&lines, "ike_auth").len(), 1);
    let again = events(&lines, "retransmit");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0]["exchange"], "IKE_AUTH");
    assert_eq!(again[0]["n"], 1);
    assert_eq!(net.gw.auth_requests, 2, "the gateway saw it twice");
    assert_eq!(net.gw.sas_accepted, 1);
}

#[test]
fn gateway_rekeys_and_dpds_are_followed_and_reported() {
    let mut net = Net::established();
    let first = net.client.running_children();
    assert_eq!(first.len(), 1);

    // child rekey: the new child starts, then the old one stops
    net.advance_ms(10);
    let out = net.gw.rekey_child(net.now.engine_ms());
    net.deliver_to_client(out.datagrams);
    net.settle();
    let second = net.client.running_children();
    assert_eq!(second.len(), 1);
    assert_ne!(second, first);
    assert_eq!(*net.client.plane().stopped.borrow(), first);
    let lines = net.lines();
    let rekeyed = events(&lines, "rekeyed");
    assert_eq!(rekeyed.len(), 1);
    assert_eq!(rekeyed[0]["kind"], "child");
    assert_eq!(rekeyed[0]["by"], "gateway");
    assert_eq!(rekeyed[0]["old_in_spi"], spi_hex(first[0]));
    assert_eq!(rekeyed[0]["new_in_spi"], spi_hex(second[0]));
    let started = events(&lines, "child_started");
    assert_eq!(started[1]["rekey_of"], spi_hex(first[0]));
    let stopped = events(&lines, "child_stopped");
    assert_eq!(stopped.len(), 1);
    assert_eq!(stopped[0]["reason"], "rekeyed");
    assert_eq!(stopped[0]["in_spi"], spi_hex(first[0]));
    assert_eq!(
        stopped[0]["counters"]["out_packets"], 3,
        "its final counters"
    );

    // IKE rekey: new SPIs, the child stays
    net.advance_ms(10);
    let before = events(&lines, "established")[0].clone();
    let out = net.gw.rekey_ike(net.now.engine_ms());
    net.deliver_to_client(out.datagrams);
    net.settle();
    let lines = net.lines();
    let rekeyed = events(&lines, "rekeyed");
    assert_eq!(rekeyed.len(), 2);
    assert_eq!(rekeyed[1]["kind"], "ike");
    assert_eq!(rekeyed[1]["by"], "gateway");
    assert_eq!(rekeyed[1]["old_spi_i"], before["spi_i"]);
    assert_eq!(rekeyed[1]["old_spi_r"], before["spi_r"]);
    assert_ne!(rekeyed[1]["new_spi_i"], before["spi_i"]);
    assert_eq!(
        net.client.running_children(),
        second,
        "an IKE rekey leaves the children"
    );
    assert!(net.client.is_established());

    // the gateway's DPD, answered by the engine
    net.advance_ms(10);
    let out = net.gw.dpd(net.now.engine_ms());
    net.deliver_to_client(out.datagrams);
    let answers = net.deliver_to_gateway();
    assert!(answers.is_empty(), "the answer completes the gateway's DPD");
    let lines = net.lines();
    let dpds = events(&lines, "dpd");
    assert_eq!(dpds.len(), 1, "{lines:#?}");
    assert_eq!(dpds[0]["by"], "gateway");
    assert_eq!(dpds[0]["rtt_ms"], Value::Null);

    // ours, with its round trip
    net.client.send_dpd(net.now).unwrap();
    net.client.send_dpd(net.now).unwrap(); // one at a time
    let answers = net.deliver_to_gateway();
    assert_eq!(answers.len(), 1);
    net.advance_ms(7);
    net.deliver_to_client(answers);
    let lines = net.lines();
    let dpds = events(&lines, "dpd");
    assert_eq!(dpds.len(), 2);
    assert_eq!(dpds[1]["by"], "client");
    assert_eq!(dpds[1]["rtt_ms"], 7.0);
    assert_eq!(dpds[1]["failed"], false);
    assert!(dpds[1]["message_id"].is_u64());

    // through all of it: one IKE_SA_INIT, one IKE_AUTH, nothing closed
    assert_eq!(events(&lines, "ike_sa_init").len(), 1);
    assert_eq!(events(&lines, "ike_auth").len(), 1);
    assert!(events(&lines, "closed").is_empty());
    assert_eq!(net.gw.sas_accepted, 1);
}

#[test]
fn a_gateway_delete_closes_the_client_for_good() {
    let mut net = Net::established();
    let child = net.client.running_children()[0];
    let out = net.gw.delete(net.now.engine_ms());
    net.deliver_to_client(out.datagrams);
    net.settle();
    let closed = net.client.closed().expect("closed").clone();
    assert_eq!(closed.reason, "deleted_by_peer");
    assert!(closed.established);
    assert!(net.client.running_children().is_empty());
    assert_eq!(*net.client.plane().stopped.borrow(), [child]);
    let lines = net.lines();
    let stopped = events(&lines, "child_stopped");
    assert_eq!(stopped[0]["reason"], "ike_closed");
    let closed_line = events(&lines, "closed");
    assert_eq!(closed_line.len(), 1);
    assert_eq!(closed_line[0]["reason"], "deleted_by_peer");
    assert_eq!(closed_line[0]["established"], true);
    // nothing more is ever sent: no new IKE_SA_INIT, no IKE_AUTH
    assert_eq!(net.client.next_timeout(), None);
    net.advance_ms(120_000);
    net.client.on_timeout(net.now).unwrap();
    assert!(net.take_client().is_empty());
    assert_eq!(events(&net.lines(), "ike_sa_init").len(), 1);
}

#[test]
fn an_unreachable_gateway_ends_in_peer_unreachable_after_the_retransmissions() {
    let mut net = Net::new();
    while net.client.closed().is_none() {
        net.take_client(); // all lost
        let due = net.client.next_timeout().expect("a timer while connecting");
        net.advance_ms(due.saturating_sub(net.now.engine_ms()));
        net.client.on_timeout(net.now).unwrap();
        assert!(
            net.now.engine_ms() < 1_760_000_000_000 + 600_000,
            "gave up in time"
        );
    }
    let lines = net.lines();
    let inits = events(&lines, "ike_sa_init");
    assert_eq!(inits.len(), 7, "the first and 6 retransmissions");
    assert!(inits[1..].iter().all(|l| l["retransmit"] == true));
    let closed = events(&lines, "closed");
    assert_eq!(closed[0]["reason"], "peer_unreachable");
    assert_eq!(closed[0]["established"], false);
    assert!(events(&lines, "ike_auth").is_empty());
}

#[test]
fn delete_on_exit_deletes_the_sa_at_the_gateway() {
    let mut net = Net::established();
    assert!(net.client.delete(net.now).unwrap());
    net.settle();
    assert_eq!(net.client.closed().unwrap().reason, "deleted_locally");
    assert_eq!(net.gw.closed, ["DeletedByPeer"]);
    assert!(net.gw.sa.is_none());
    assert!(net.client.running_children().is_empty());
}

#[test]
fn counters_cover_running_and_stopped_children() {
    let mut net = Net::established();
    let out = net.gw.rekey_child(net.now.engine_ms());
    net.deliver_to_client(out.datagrams);
    net.settle();
    net.client.report_counters(net.now, true).unwrap();
    let lines = net.lines();
    let counters = events(&lines, "counters");
    let last = counters.last().unwrap();
    assert_eq!(last["final"], true);
    let children = last["children"].as_array().unwrap();
    assert_eq!(children.len(), 1);
    assert_eq!(
        children[0]["in_spi"],
        serde_json::to_value(Spi32(net.client.running_children()[0])).unwrap()
    );
    assert_eq!(children[0]["out_packets"], 3);
    // one stopped child and one running, 3 packets out each
    assert_eq!(last["total"]["out_packets"], 6);
    assert_eq!(last["total"]["replay_drops"], 0);
    assert_eq!(last["driver"]["packets_in"], 2);
    assert!(last["ike"]["datagrams_out"].as_u64().unwrap() >= 4);
    assert_eq!(last["ike"]["retransmits"], 0);
}

#[test]
fn an_unanswered_dpd_of_ours_fails_and_closes_the_sa() {
    let mut net = Net::established();
    net.client.send_dpd(net.now).unwrap();
    while net.client.closed().is_none() {
        net.take_client(); // the gateway is gone
        let due = net
            .client
            .next_timeout()
            .expect("the DPD's retransmission timer");
        net.advance_ms(due.saturating_sub(net.now.engine_ms()));
        net.client.on_timeout(net.now).unwrap();
    }
    let lines = net.lines();
    let again = events(&lines, "retransmit");
    assert_eq!(again.len(), 6, "{lines:#?}");
    assert!(again.iter().all(|l| l["exchange"] == "INFORMATIONAL"));
    let dpd = events(&lines, "dpd");
    assert_eq!(dpd.len(), 1);
    assert_eq!(dpd[0]["by"], "client");
    assert_eq!(dpd[0]["failed"], true);
    assert_eq!(dpd[0]["rtt_ms"], Value::Null);
    assert_eq!(dpd[0]["message_id"], again[0]["message_id"]);
    let closed = events(&lines, "closed");
    assert_eq!(closed[0]["reason"], "peer_unreachable");
    assert_eq!(closed[0]["established"], true);
    assert_eq!(events(&lines, "child_stopped")[0]["reason"], "ike_closed");
    assert!(net.client.running_children().is_empty());
}
