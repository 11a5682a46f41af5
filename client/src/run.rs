//! The shell around [`Session`]: the real data plane, the TUN device's addresses, the timers
//! and the signals, on the calling thread (a current-thread runtime is all a client needs).
//!
//! ```text
//!  UserspaceDriver::new (sockets on local:500 and local:4500, TUN, 3 worker threads)
//!  Session::connect ──► loop {
//!     select (biased) {
//!        SIGTERM / SIGINT  ─► [--delete-on-exit: delete, wait ≤ 3 s for the answer]
//!                             final "counters", "stopped"  ─► Exit::Stopped (status 0)
//!        IKE datagram      ─► Session::on_ike
//!        engine deadline   ─► Session::on_timeout
//!        --dpd-s tick      ─► Session::send_dpd
//!        --counters-ms tick─► Session::report_counters
//!     }
//!     IKE SA closed ─► final "counters" ─► Exit::Closed (status 3)
//!  }
//! ```

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use evpc_dataplane::ike::{IkePort, IkeReceiver};
use evpc_dataplane::userspace::{IKE_PORT, NATT_PORT, TunConfig, UserspaceConfig, UserspaceDriver};
use evpc_dataplane::{ChildCounters, ChildStart, DriverError, FenceGate, SaDriver};
use evpc_ike::Random;
use rand::RngCore;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, MissedTickBehavior, interval_at, sleep_until};

use crate::clock::Clock;
use crate::error::ClientError;
use crate::metrics::{DriverMetrics, DriverTotals};
use crate::report::{Report, Reporter};
use crate::session::{Closed, DataPlane, Session};
use crate::settings::{Prefix, Settings};

/// How long `--delete-on-exit` waits for the gateway to answer the delete.
const DELETE_WAIT: Duration = Duration::from_secs(3);

/// Depth of the data plane's IKE queue: a client has one SA, a handful of messages in flight.
const IKE_QUEUE: usize = 64;

/// How the client ended, when it did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal (exit status 0).
    Stopped {
        /// `SIGTERM` or `SIGINT`.
        signal: &'static str,
    },
    /// The IKE SA ended, or never came up (exit status 3).
    Closed(Closed),
}

impl Exit {
    /// The process exit status.
    pub fn status(&self) -> u8 {
        match self {
            Exit::Stopped { .. } => 0,
            Exit::Closed(_) => 3,
        }
    }
}

/// Randomness from the operating system's generator (through `rand`'s thread-local CSPRNG).
#[derive(Debug, Default)]
pub struct OsRandom;

impl Random for OsRandom {
    fn fill(&mut self, dest: &mut [u8]) {
        rand::rng().fill_bytes(dest);
    }
}

/// The real data plane: the userspace driver and its TUN device.
#[derive(Debug)]
pub struct Plane {
    driver: UserspaceDriver,
    metrics: Option<&'static DriverMetrics>,
}

impl Plane {
    /// Brings up the userspace data plane on `settings.local` (UDP 4500 and 500, the TUN
    /// device), never fenced: a client has no cluster to lose. Small socket buffers (the
    /// system's default) and a short IKE queue: a client moves tens of packets a second, and
    /// hundreds of them share a host. `metrics` must have been installed before this call.
    pub fn new(
        settings: &Settings,
        metrics: Option<&'static DriverMetrics>,
    ) -> Result<(Plane, IkeReceiver), ClientError> {
        let config = UserspaceConfig {
            natt_port: NATT_PORT,
            ike_port: Some(IKE_PORT),
            // Our own address is on an interface of this namespace: nothing to bind ahead of it.
            freebind: false,
            replay_window: settings.replay_window,
            socket_buffer: 0,
            ike_queue: IKE_QUEUE,
            ..UserspaceConfig::new(settings.local.into(), TunConfig::named(&settings.tun))
        };
        let gate = Arc::new(FenceGate::always_open());
        let (driver, ike) = UserspaceDriver::new(config, gate).map_err(ClientError::DataPlane)?;
        Ok((Plane { driver, metrics }, ike))
    }
}

/// Runs `ip ARGS` (iproute2), failing with its standard error.
fn ip(args: &[&str]) -> Result<(), ClientError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| ClientError::Tun(format!("running `ip` (iproute2): {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(ClientError::Tun(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl DataPlane for Plane {
    fn send_ike(&self, port: IkePort, remote: SocketAddr, message: &[u8]) -> io::Result<()> {
        self.driver.send_ike(port, remote, message)
    }

    fn start_child(&self, child: ChildStart) -> Result<(), DriverError> {
        self.driver.start(child)
    }

    fn stop_child(&self, in_spi: u32) -> Option<ChildCounters> {
        self.driver.stop(in_spi)
    }

    fn child_counters(&self, in_spi: u32) -> Option<ChildCounters> {
        self.driver.counters(in_spi)
    }

    fn configure_inner(
        &self,
        inner: Option<Ipv4Addr>,
        routes: &[Prefix],
    ) -> Result<(), ClientError> {
        let tun = self.driver.tun_name();
        let inner_text = inner.map(|a| a.to_string());
        if let Some(inner) = &inner_text {
            ip(&["addr", "replace", &format!("{inner}/32"), "dev", tun])?;
        }
        for route in routes {
            let cidr = route.to_string();
            let mut args = vec!["route", "replace", cidr.as_str(), "dev", tun];
            // Unbound sockets then pick the inner address, the only source the child carries.
            if let Some(inner) = &inner_text {
                args.extend(["src", inner.as_str()]);
            }
            ip(&args)?;
        }
        Ok(())
    }

    fn totals(&self) -> DriverTotals {
        self.metrics.map(DriverMetrics::totals).unwrap_or_default()
    }
}

/// Runs one client until a signal or the end of its IKE SA, reporting to `out`. `metrics`
/// (installed before this call) feeds the data plane's totals into the `counters` lines.
///
/// An error is reported before it is returned: an `error` line (and the words on stderr),
/// then, once the session exists, a final `counters` line; only a [`ClientError::Report`]
/// (stdout itself failed) cannot be, and is left to the caller.
pub async fn run<W: Write>(
    settings: Settings,
    metrics: Option<&'static DriverMetrics>,
    out: W,
) -> Result<Exit, ClientError> {
    let clock = Clock::new();
    let mut report = Reporter::new(out);
    let setup = (|| {
        let sigterm = signal(SignalKind::terminate()).map_err(ClientError::Signals)?;
        let sigint = signal(SignalKind::interrupt()).map_err(ClientError::Signals)?;
        let (plane, ike) = Plane::new(&settings, metrics)?;
        Ok::<_, ClientError>((Signals { sigterm, sigint }, plane, ike))
    })();
    let (mut signals, plane, mut ike) = match setup {
        Ok(parts) => parts,
        Err(error) => {
            eprintln!("evpc-client: {error}");
            report
                .emit(
                    clock.now(),
                    &Report::Error {
                        message: error.to_string(),
                    },
                )
                .map_err(ClientError::Report)?;
            return Err(error);
        }
    };
    let mut session = Session::connect(&settings, plane, report, Box::new(OsRandom), clock.now())?;
    match drive(&mut session, &mut ike, &mut signals, &clock, &settings).await {
        Ok(exit) => Ok(exit),
        Err(error @ ClientError::Report(_)) => Err(error),
        Err(error) => {
            let now = clock.now();
            session.report_error(now, error.to_string())?;
            session.report_counters(now, true)?;
            Err(error)
        }
    }
}

/// The signals that stop the client.
#[derive(Debug)]
struct Signals {
    sigterm: tokio::signal::unix::Signal,
    sigint: tokio::signal::unix::Signal,
}

/// The event loop of [`run`].
async fn drive<P: DataPlane, W: Write>(
    session: &mut Session<P, W>,
    ike: &mut IkeReceiver,
    signals: &mut Signals,
    clock: &Clock,
    settings: &Settings,
) -> Result<Exit, ClientError> {
    let start = Instant::now();
    let mut counters = interval_at(start + settings.counters, settings.counters);
    counters.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let dpd_period = settings.dpd.unwrap_or(Duration::from_secs(3600));
    let mut dpd = interval_at(start + dpd_period, dpd_period);
    dpd.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        if let Some(closed) = session.closed().cloned() {
            session.report_counters(clock.now(), true)?;
            return Ok(Exit::Closed(closed));
        }
        let now = clock.now();
        // One millisecond late: the engine's clock has millisecond steps, and a wake-up in the
        // millisecond before its deadline would find nothing due and spin until it is.
        let deadline = session
            .next_timeout()
            .map(|at| Instant::from_std(clock.instant_of(now, at.saturating_add(1))));
        tokio::select! {
            biased;
            _ = signals.sigterm.recv() => return stop(session, ike, clock, settings, "SIGTERM").await,
            _ = signals.sigint.recv() => return stop(session, ike, clock, settings, "SIGINT").await,
            datagram = ike.recv() => match datagram {
                Some(datagram) => session.on_ike(datagram, clock.now())?,
                None => return Err(ClientError::IkeChannelClosed),
            },
            () = sleep_until(deadline.unwrap_or(start)), if deadline.is_some() => {
                session.on_timeout(clock.now())?;
            }
            _ = dpd.tick(), if settings.dpd.is_some() => session.send_dpd(clock.now())?,
            _ = counters.tick() => session.report_counters(clock.now(), false)?,
        }
    }
}

/// After a signal: the delete if asked for, the final counters, `stopped`.
async fn stop<P: DataPlane, W: Write>(
    session: &mut Session<P, W>,
    ike: &mut IkeReceiver,
    clock: &Clock,
    settings: &Settings,
    signal: &'static str,
) -> Result<Exit, ClientError> {
    let mut deleted = false;
    if settings.delete_on_exit && session.delete(clock.now())? {
        let give_up = Instant::now() + DELETE_WAIT;
        while session.closed().is_none() && Instant::now() < give_up {
            let now = clock.now();
            let deadline = session
                .next_timeout()
                .map_or(give_up, |at| {
                    Instant::from_std(clock.instant_of(now, at.saturating_add(1)))
                })
                .min(give_up);
            tokio::select! {
                datagram = ike.recv() => match datagram {
                    Some(datagram) => session.on_ike(datagram, clock.now())?,
                    None => break,
                },
                () = sleep_until(deadline) => session.on_timeout(clock.now())?,
            }
        }
        deleted = session
            .closed()
            .is_some_and(|c| c.reason == "deleted_locally");
    }
    let now = clock.now();
    session.report_counters(now, true)?;
    session.report_stopped(now, signal, deleted)?;
    Ok(Exit::Stopped { signal })
}
