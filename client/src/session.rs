//! The client's heart, sans-IO: one [`IkeSa`] initiator, the [`DataPlane`] it drives, and the
//! [`Reporter`] that says what happened.
//!
//! ```text
//!  IkeDatagram ──► on_ike ─────┐
//!  deadline ─────► on_timeout ─┼─► IkeSa ─► Outcome ─► apply:
//!  --dpd-s tick ─► send_dpd ───┤              1. send, then the commit's datagrams at once (a
//!  SIGTERM with  ─► delete ────┘                 client keeps its state in memory: nothing
//!                                                to wait for); every request and its
//!                                                retransmissions reported (ike_sa_init,
//!                                                ike_auth, retransmit)
//!                                             2. events, in this order:
//!                                                established ─► "established", TUN address
//!                                                              and routes
//!                                                child installed ─► DataPlane::start_child,
//!                                                              "child_started" (+ "rekeyed")
//!  --delete-on-exit                              IKE rekeyed ─► "rekeyed"
//!                                                child deleted ─► DataPlane::stop_child,
//!                                                              "child_stopped" with its counters
//!                                                peer alive ─► "dpd" with our round trip
//!                                                closed ─► ("dpd" failed, if ours was out)
//!                                                          "closed"; the caller exits 3
//! ```
//!
//! A new child is always started before an old one is stopped, so a rekey never leaves a gap
//! in the data plane: the driver keeps routing to the older child until it is gone.
//!
//! The session never calls [`IkeSa::connect`] again: a client whose IKE SA ended reports it
//! and stops, so the runner can check that no IKE SA was ever set up twice.

use std::collections::{BTreeMap, VecDeque};
use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use evpc_dataplane::ike::{IkeDatagram, IkePort};
use evpc_dataplane::userspace::{IKE_PORT, NATT_PORT};
use evpc_dataplane::{ChildCounters, ChildStart, DriverError};
use evpc_ike::wire::{ExchangeType, Header};
use evpc_ike::{
    ChildSaInfo, CloseReason, Config, ConnectOptions, Datagram, Event, IkeSa, InnerAddress,
    Outcome, Random,
};

use crate::child::{child_start, highest_seq, selector_text, suite_name};
use crate::clock::Now;
use crate::error::ClientError;
use crate::metrics::DriverTotals;
use crate::report::{
    By, ChildLine, ChildTotals, IkeStats, Rekey, Report, Reporter, Spi32, Spi64, StopReason,
};
use crate::settings::{Prefix, Settings};

/// What the session needs from the data plane (the real one is
/// [`UserspaceDriver`](evpc_dataplane::userspace::UserspaceDriver) plus the TUN device; tests
/// use a recording fake).
pub trait DataPlane {
    /// Sends an IKE message from our port `port` (behind the non-ESP marker on 4500).
    fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> io::Result<()>;
    /// Starts a child SA.
    fn start_child(&self, child: ChildStart) -> Result<(), DriverError>;
    /// Stops a child SA and returns its final counters.
    fn stop_child(&self, in_spi: u32) -> Option<ChildCounters>;
    /// A running child's counters.
    fn child_counters(&self, in_spi: u32) -> Option<ChildCounters>;
    /// Puts the inner address (/32) on the TUN device and routes `routes` into it.
    fn configure_inner(
        &self,
        inner: Option<Ipv4Addr>,
        routes: &[Prefix],
    ) -> Result<(), ClientError>;
    /// The data plane's own counters.
    fn totals(&self) -> DriverTotals;
}

/// How many recent requests we remember to tell a retransmission from a new request (a window
/// of one per IKE SA generation, and at most two generations at a time during an IKE rekey).
const RECENT_REQUESTS: usize = 8;

/// A request of ours, as its header names it.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct RequestKey {
    spi_i: u64,
    spi_r: u64,
    exchange: ExchangeType,
    message_id: u32,
}

/// A child the data plane runs.
#[derive(Copy, Clone, Debug)]
struct Running {
    out_spi: u32,
    /// Its successor, once a rekey started one.
    replaced_by: Option<u32>,
}

/// Our DPD in flight.
#[derive(Copy, Clone, Debug)]
struct Dpd {
    sent: Now,
    message_id: Option<u32>,
}

/// How the IKE SA ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// The reason, as the `closed` line names it.
    pub reason: &'static str,
    /// What more the engine said.
    pub detail: Option<String>,
    /// Whether it had been established.
    pub established: bool,
}

/// What caused the outcome being applied.
#[derive(Copy, Clone, Debug)]
enum Cause {
    /// A request from the gateway, first seen (not one answered again from the stored reply).
    PeerRequest {
        exchange: ExchangeType,
        message_id: u32,
    },
    /// Anything else: an answer to us, a timer, our own call.
    Local,
}

/// One road warrior's IKE SA and what it drives. See the [module docs](self).
pub struct Session<P: DataPlane, W: Write> {
    engine: IkeSa,
    plane: P,
    report: Reporter<W>,
    rng: Box<dyn Random>,
    routes: Vec<Prefix>,
    first_init: Option<Now>,
    init_sent: u32,
    last_init: Option<Vec<u8>>,
    auth_started: u32,
    recent: VecDeque<(RequestKey, u32)>,
    established: bool,
    ike_spis: Option<(u64, u64)>,
    inner: Option<InnerAddress>,
    children: BTreeMap<u32, Running>,
    stopped_totals: ChildTotals,
    stats: IkeStats,
    dpd: Option<Dpd>,
    closed: Option<Closed>,
}

impl<P: DataPlane, W: Write> std::fmt::Debug for Session<P, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The engine holds keys: only what identifies the SA.
        f.debug_struct("Session")
            .field("ike_spis", &self.ike_spis)
            .field("established", &self.established)
            .field("children", &self.children.keys().collect::<Vec<_>>())
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

/// The engine's policy for a client: our identity, the gateway's PSK, the default proposals
/// (AES-GCM-16 128/256, HMAC-SHA2, Curve25519 / P-256 / MODP-2048). No lifetimes of our own:
/// the gateway rekeys, and its DPDs are answered; our DPDs are sent on `--dpd-s`'s schedule
/// through [`Session::send_dpd`], not the engine's silence timer.
pub fn engine_config(settings: &Settings) -> Config {
    Config::new(settings.local_id.clone())
        .with_psk(settings.remote_id.clone(), settings.psk.expose())
}

fn close_reason(reason: &CloseReason) -> (&'static str, Option<String>) {
    match reason {
        CloseReason::DeletedByPeer => ("deleted_by_peer", None),
        CloseReason::DeletedLocally => ("deleted_locally", None),
        CloseReason::PeerUnreachable => ("peer_unreachable", None),
        CloseReason::HalfOpenTimeout => ("half_open_timeout", None),
        CloseReason::AuthenticationFailed => ("authentication_failed", None),
        CloseReason::NegotiationFailed(error) => ("negotiation_failed", Some(error.to_string())),
    }
}

fn exchange_name(exchange: ExchangeType) -> String {
    exchange.to_string()
}

impl<P: DataPlane, W: Write> Session<P, W> {
    /// Reports `started` and sends the first IKE_SA_INIT: from our port 500 to the gateway's,
    /// asking for an inner address and a child for `settings.routes`, NAT-T forced so ESP goes
    /// in UDP on 4500 (the userspace data plane carries nothing else).
    pub fn connect(
        settings: &Settings,
        plane: P,
        report: Reporter<W>,
        rng: Box<dyn Random>,
        now: Now,
    ) -> Result<Session<P, W>, ClientError> {
        let mut options = ConnectOptions::road_warrior(
            settings.remote_id.clone(),
            settings.routes.iter().map(Prefix::selector).collect(),
        );
        options.force_udp_encap = true;
        let mut rng = rng;
        let (engine, outcome) = IkeSa::connect(
            Arc::new(engine_config(settings)),
            SocketAddr::from((settings.local, IKE_PORT)),
            SocketAddr::from((settings.gateway, IKE_PORT)),
            options,
            now.engine_ms(),
            &mut *rng,
        );
        let mut session = Session {
            engine,
            plane,
            report,
            rng,
            routes: settings.routes.clone(),
            first_init: None,
            init_sent: 0,
            last_init: None,
            auth_started: 0,
            recent: VecDeque::with_capacity(RECENT_REQUESTS),
            established: false,
            ike_spis: None,
            inner: None,
            children: BTreeMap::new(),
            stopped_totals: ChildTotals::default(),
            stats: IkeStats::default(),
            dpd: None,
            closed: None,
        };
        session.emit(
            now,
            &Report::Started {
                pid: std::process::id(),
                local: settings.local,
                gateway: settings.gateway,
                tun: settings.tun.clone(),
                id: settings.local_id.to_string(),
                remote_id: settings.remote_id.to_string(),
                version: env!("CARGO_PKG_VERSION"),
            },
        )?;
        session.apply(outcome, now, Cause::Local)?;
        Ok(session)
    }

    /// Handles one IKE datagram from the data plane.
    pub fn on_ike(&mut self, datagram: IkeDatagram, now: Now) -> Result<(), ClientError> {
        self.stats.datagrams_in += 1;
        let cause = match Header::peek(&datagram.message) {
            Some(h) if !h.response => Cause::PeerRequest {
                exchange: h.exchange,
                message_id: h.message_id,
            },
            _ => Cause::Local,
        };
        let outcome = self.engine.handle_datagram(
            now.engine_ms(),
            &mut *self.rng,
            datagram.local,
            datagram.remote,
            &datagram.message,
        );
        self.apply(outcome, now, cause)
    }

    /// Runs the engine's due timers (retransmissions, the half-open limit, rekeys of ours if
    /// any). Call at [`Session::next_timeout`].
    pub fn on_timeout(&mut self, now: Now) -> Result<(), ClientError> {
        let outcome = self.engine.handle_timeout(now.engine_ms(), &mut *self.rng);
        self.apply(outcome, now, Cause::Local)
    }

    /// When the engine wants [`Session::on_timeout`] next (Unix ms), if ever.
    pub fn next_timeout(&self) -> Option<u64> {
        self.engine.next_timeout()
    }

    /// Sends a DPD of ours, unless one is still out or the SA is not up; its round trip is
    /// reported when the answer comes.
    pub fn send_dpd(&mut self, now: Now) -> Result<(), ClientError> {
        if self.dpd.is_some() || !self.engine.is_established() {
            return Ok(());
        }
        match self.engine.send_dpd(now.engine_ms(), &mut *self.rng) {
            Ok(outcome) => {
                self.dpd = Some(Dpd {
                    sent: now,
                    message_id: None,
                });
                self.apply(outcome, now, Cause::Local)
            }
            Err(error) => {
                tracing::debug!(%error, "no DPD sent");
                Ok(())
            }
        }
    }

    /// Starts deleting the IKE SA (`--delete-on-exit`); `closed` follows with the answer (or
    /// when the retransmissions give up). `false` if there was nothing to delete.
    pub fn delete(&mut self, now: Now) -> Result<bool, ClientError> {
        if !self.engine.is_established() {
            return Ok(false);
        }
        match self.engine.close(now.engine_ms(), &mut *self.rng) {
            Ok(outcome) => {
                self.apply(outcome, now, Cause::Local)?;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    /// Whether the IKE SA is established (and not closed).
    pub fn is_established(&self) -> bool {
        self.engine.is_established()
    }

    /// How the IKE SA ended, once it has.
    pub fn closed(&self) -> Option<&Closed> {
        self.closed.as_ref()
    }

    /// The inner address the gateway assigned, once established.
    pub fn inner_address(&self) -> Option<Ipv4Addr> {
        self.inner.as_ref().map(|a| a.ipv4)
    }

    /// Inbound SPIs of the children the data plane runs now.
    pub fn running_children(&self) -> Vec<u32> {
        self.children.keys().copied().collect()
    }

    /// The data plane (tests look at what it was asked to do).
    pub fn plane(&self) -> &P {
        &self.plane
    }

    /// The report's writer (tests read what was written).
    pub fn output(&self) -> &W {
        self.report.get_ref()
    }

    /// Reports every running child's counters, the totals and the data plane's; `last` marks
    /// the final line of the process.
    pub fn report_counters(&mut self, now: Now, last: bool) -> Result<(), ClientError> {
        let mut totals = self.stopped_totals;
        let mut children = Vec::with_capacity(self.children.len());
        for (&in_spi, running) in &self.children {
            if let Some(counters) = self.plane.child_counters(in_spi) {
                totals.add(&counters);
                children.push(ChildLine {
                    in_spi: Spi32(in_spi),
                    out_spi: Spi32(running.out_spi),
                    counters,
                });
            }
        }
        let report = Report::Counters {
            children,
            total: totals,
            driver: self.plane.totals(),
            ike: self.stats,
            last,
        };
        self.emit(now, &report)
    }

    /// Reports an error (also on stderr, in words).
    pub fn report_error(&mut self, now: Now, message: String) -> Result<(), ClientError> {
        eprintln!("evpc-client: {message}");
        self.emit(now, &Report::Error { message })
    }

    /// The last line after a signal.
    pub fn report_stopped(
        &mut self,
        now: Now,
        signal: &'static str,
        deleted: bool,
    ) -> Result<(), ClientError> {
        self.emit(now, &Report::Stopped { signal, deleted })
    }

    fn emit(&mut self, now: Now, report: &Report) -> Result<(), ClientError> {
        self.report.emit(now, report).map_err(ClientError::Report)
    }

    /// Handles an outcome completely: datagrams first (ours is the only copy of the state, so
    /// "durable" is now), then the events.
    fn apply(&mut self, outcome: Outcome, now: Now, cause: Cause) -> Result<(), ClientError> {
        let Outcome {
            send,
            commit,
            events,
            next_timeout: _,
        } = outcome;
        let committed = commit.is_some();
        // The SPIs and peer the committed state names (after an IKE rekey: the new ones).
        let current = commit.as_ref().and_then(|c| c.snapshot()).map(|s| {
            (
                (s.current.spi_i, s.current.spi_r),
                s.peer,
                s.local_inner_address.clone(),
            )
        });
        for datagram in &send {
            self.transmit(datagram, now)?;
        }
        if let Some(commit) = commit {
            for datagram in commit.into_datagrams_after_durable() {
                self.transmit(&datagram, now)?;
            }
        }
        // A DPD from the gateway: an empty INFORMATIONAL request changes nothing but the
        // message ID (so it commits) and raises no event. A retransmitted one is answered from
        // the stored reply without a commit and is not counted twice.
        if let Cause::PeerRequest {
            exchange: ExchangeType::INFORMATIONAL,
            message_id,
        } = cause
            && committed
            && events.is_empty()
        {
            self.emit(
                now,
                &Report::Dpd {
                    by: By::Gateway,
                    message_id: Some(message_id),
                    rtt_ms: None,
                    failed: false,
                },
            )?;
        }
        let by = match cause {
            Cause::PeerRequest { .. } => By::Gateway,
            Cause::Local => By::Client,
        };
        self.on_events(events, current, now, by)
    }

    /// Sends one datagram through the data plane and reports what it is.
    fn transmit(&mut self, datagram: &Datagram, now: Now) -> Result<(), ClientError> {
        let port = if datagram.local.port() == NATT_PORT {
            IkePort::NatT
        } else {
            IkePort::Ike
        };
        if let Some(h) = Header::peek(&datagram.payload) {
            if h.response {
                self.stats.responses += 1;
            } else {
                self.observe_request(&h, datagram, now)?;
            }
        }
        self.stats.datagrams_out += 1;
        if let Err(error) = self
            .plane
            .send_ike(port, datagram.remote, &datagram.payload)
        {
            // IKE retransmits; the count shows a socket that keeps refusing.
            self.stats.send_errors += 1;
            tracing::debug!(%error, to = %datagram.remote, "IKE send failed");
        }
        Ok(())
    }

    /// Reports a request of ours: IKE_SA_INIT every time, IKE_AUTH when it starts, any other
    /// request's retransmissions.
    fn observe_request(
        &mut self,
        h: &Header,
        datagram: &Datagram,
        now: Now,
    ) -> Result<(), ClientError> {
        if h.exchange == ExchangeType::IKE_SA_INIT {
            self.init_sent += 1;
            let retransmit = self.last_init.as_deref() == Some(&datagram.payload[..]);
            if retransmit {
                self.stats.retransmits += 1;
            } else {
                self.stats.requests += 1;
                self.last_init = Some(datagram.payload.clone());
            }
            self.first_init.get_or_insert(now);
            return self.emit(
                now,
                &Report::IkeSaInit {
                    n: self.init_sent,
                    retransmit,
                    spi_i: Spi64(h.spi_i),
                    to: datagram.remote,
                },
            );
        }
        let key = RequestKey {
            spi_i: h.spi_i,
            spi_r: h.spi_r,
            exchange: h.exchange,
            message_id: h.message_id,
        };
        if let Some((_, count)) = self.recent.iter_mut().find(|(k, _)| *k == key) {
            *count += 1;
            let n = *count;
            self.stats.retransmits += 1;
            return self.emit(
                now,
                &Report::Retransmit {
                    exchange: exchange_name(h.exchange),
                    message_id: h.message_id,
                    n,
                    to: datagram.remote,
                },
            );
        }
        if self.recent.len() == RECENT_REQUESTS {
            self.recent.pop_front();
        }
        self.recent.push_back((key, 0));
        self.stats.requests += 1;
        if h.exchange == ExchangeType::INFORMATIONAL
            && let Some(dpd) = self.dpd.as_mut()
            && dpd.message_id.is_none()
        {
            dpd.message_id = Some(h.message_id);
        }
        if h.exchange == ExchangeType::IKE_AUTH {
            self.last_init = None;
            self.auth_started += 1;
            return self.emit(
                now,
                &Report::IkeAuth {
                    n: self.auth_started,
                    spi_i: Spi64(h.spi_i),
                    spi_r: Spi64(h.spi_r),
                    message_id: h.message_id,
                    to: datagram.remote,
                },
            );
        }
        Ok(())
    }

    fn on_events(
        &mut self,
        events: Vec<Event>,
        current: Option<((u64, u64), SocketAddr, Option<InnerAddress>)>,
        now: Now,
        by: By,
    ) -> Result<(), ClientError> {
        let mut established = false;
        let mut installed: Vec<ChildSaInfo> = Vec::new();
        let mut ike_rekeyed = false;
        let mut deleted: Vec<(u32, u32)> = Vec::new();
        let mut failed = Vec::new();
        let mut alive = false;
        let mut closed = None;
        for event in events {
            match event {
                Event::IkeSaEstablished { .. } => established = true,
                Event::InnerAddressAssigned(address) => self.inner = Some(address),
                Event::ChildSaInstalled(info) => installed.push(*info),
                Event::IkeSaRekeyed { .. } => ike_rekeyed = true,
                Event::ChildSaDeleted {
                    inbound_spi,
                    outbound_spi,
                } => deleted.push((inbound_spi, outbound_spi)),
                Event::ChildSaFailed { rekey_of, error } => failed.push((rekey_of, error)),
                Event::PeerAlive => alive = true,
                Event::Closed { reason } => closed = Some(reason),
                Event::PeerMisbehaved(error) => {
                    self.stats.peer_errors += 1;
                    tracing::debug!(%error, "IKE message refused");
                }
                // The initiator is never asked for addresses nor told about other SAs; released
                // SPIs of a retired generation need no routing here (one SA, one engine).
                Event::InnerAddressNeeded { .. }
                | Event::InitialContact { .. }
                | Event::LocalSpiReleased { .. } => {}
            }
        }
        if established && !self.established {
            self.on_established(current.as_ref(), installed.first(), now)?;
        }
        for info in &installed {
            self.start_child(info, now, by)?;
        }
        if ike_rekeyed && let Some((new, _, _)) = &current {
            let old = self.ike_spis.replace(*new);
            if let Some(old) = old {
                self.emit(
                    now,
                    &Report::Rekeyed {
                        what: Rekey::Ike {
                            old_spi_i: Spi64(old.0),
                            old_spi_r: Spi64(old.1),
                            new_spi_i: Spi64(new.0),
                            new_spi_r: Spi64(new.1),
                        },
                        by,
                    },
                )?;
            }
        }
        for (in_spi, out_spi) in deleted {
            self.stop_child(in_spi, out_spi, closed.is_some(), now)?;
        }
        for (rekey_of, error) in failed {
            self.emit(
                now,
                &Report::ChildFailed {
                    rekey_of: rekey_of.map(Spi32),
                    error: error.to_string(),
                },
            )?;
        }
        if alive && let Some(dpd) = self.dpd.take() {
            self.emit(
                now,
                &Report::Dpd {
                    by: By::Client,
                    message_id: dpd.message_id,
                    rtt_ms: Some(now.ms_since(dpd.sent)),
                    failed: false,
                },
            )?;
        }
        if let Some(reason) = closed {
            if reason == CloseReason::PeerUnreachable
                && let Some(dpd) = self.dpd.take()
            {
                // The engine gave up on the exchange in flight; ours was it, or waited behind it.
                self.emit(
                    now,
                    &Report::Dpd {
                        by: By::Client,
                        message_id: dpd.message_id,
                        rtt_ms: None,
                        failed: true,
                    },
                )?;
            }
            let (reason, detail) = close_reason(&reason);
            let closed = Closed {
                reason,
                detail: detail.clone(),
                established: self.established,
            };
            self.emit(
                now,
                &Report::Closed {
                    reason,
                    detail,
                    established: self.established,
                },
            )?;
            self.closed = Some(closed);
        }
        Ok(())
    }

    /// Reports the new SA and configures the TUN device for it.
    fn on_established(
        &mut self,
        current: Option<&((u64, u64), SocketAddr, Option<InnerAddress>)>,
        first_child: Option<&ChildSaInfo>,
        now: Now,
    ) -> Result<(), ClientError> {
        self.established = true;
        let Some(((spi_i, spi_r), peer, inner)) = current else {
            // The engine commits the SA it reports established; nothing to configure without it.
            return self.report_error(now, "established without a committed state".into());
        };
        self.ike_spis = Some((*spi_i, *spi_r));
        if self.inner.is_none() {
            self.inner.clone_from(inner);
        }
        let setup_ms = self.first_init.map_or(0.0, |first| now.ms_since(first));
        let report = Report::Established {
            spi_i: Spi64(*spi_i),
            spi_r: Spi64(*spi_r),
            inner: self.inner.as_ref().map(|a| a.ipv4),
            dns: self
                .inner
                .as_ref()
                .map(|a| a.dns.clone())
                .unwrap_or_default(),
            child_in_spi: first_child.map(|c| Spi32(c.inbound_spi)),
            child_out_spi: first_child.map(|c| Spi32(c.outbound_spi)),
            suite: first_child.map(|c| suite_name(&c.suite)),
            esn: first_child.map(|c| c.suite.esn),
            gateway: *peer,
            setup_ms,
        };
        self.emit(now, &report)?;
        if self.inner.is_none() {
            // Without an address of our own nothing we send matches the child's selectors.
            self.report_error(
                now,
                "the gateway assigned no inner address; the tunnel cannot carry our traffic".into(),
            )?;
        }
        let inner = self.inner_address();
        self.plane.configure_inner(inner, &self.routes)
    }

    fn start_child(&mut self, info: &ChildSaInfo, now: Now, by: By) -> Result<(), ClientError> {
        let ike_spi = self.engine.local_spi().unwrap_or_default();
        self.plane.start_child(child_start(ike_spi, info))?;
        self.children.insert(
            info.inbound_spi,
            Running {
                out_spi: info.outbound_spi,
                replaced_by: None,
            },
        );
        self.emit(
            now,
            &Report::ChildStarted {
                in_spi: Spi32(info.inbound_spi),
                out_spi: Spi32(info.outbound_spi),
                suite: suite_name(&info.suite),
                esn: info.suite.esn,
                ts_local: info.local_ts.iter().map(selector_text).collect(),
                ts_remote: info.remote_ts.iter().map(selector_text).collect(),
                rekey_of: info.rekey_of.map(Spi32),
                limit: highest_seq(info.suite.esn),
            },
        )?;
        if let Some(old) = info.rekey_of {
            let old_out = self.children.get_mut(&old).map(|running| {
                running.replaced_by = Some(info.inbound_spi);
                running.out_spi
            });
            self.emit(
                now,
                &Report::Rekeyed {
                    what: Rekey::Child {
                        old_in_spi: Spi32(old),
                        old_out_spi: old_out.map(Spi32),
                        new_in_spi: Spi32(info.inbound_spi),
                        new_out_spi: Spi32(info.outbound_spi),
                    },
                    by,
                },
            )?;
        }
        Ok(())
    }

    fn stop_child(
        &mut self,
        in_spi: u32,
        out_spi: u32,
        ike_closed: bool,
        now: Now,
    ) -> Result<(), ClientError> {
        let running = self.children.remove(&in_spi);
        let counters = self.plane.stop_child(in_spi);
        if let Some(counters) = &counters {
            self.stopped_totals.add(counters);
        }
        let reason = if ike_closed {
            StopReason::IkeClosed
        } else if running.is_some_and(|r| r.replaced_by.is_some()) {
            StopReason::Rekeyed
        } else {
            StopReason::Deleted
        };
        self.emit(
            now,
            &Report::ChildStopped {
                in_spi: Spi32(in_spi),
                out_spi: Spi32(out_spi),
                reason,
                counters,
            },
        )
    }
}
