//! The data plane's own counters, kept in the process for the `counters` line.
//!
//! `evpc-dataplane` counts through the `metrics` facade (`evpc_dataplane_*`, see
//! [`evpc_dataplane::metrics`]); a gateway exports them to Prometheus. A client has no exporter:
//! [`DriverMetrics`] is a recorder that keeps just those counters in atomics, so the report
//! shows what only the driver knows in total — inner bytes, unknown SPIs, packets no child
//! covers, malformed datagrams — beside the per-child [`ChildCounters`](evpc_dataplane::ChildCounters).
//!
//! ```text
//!  driver workers ──counter!(name, direction)──► DriverMetrics (one AtomicU64 per counter)
//!                                                       │ totals()
//!                                                       ▼
//!                                          DriverTotals in every "counters" line
//! ```
//!
//! Install it before the driver is built: the workers take their counter handles when they
//! start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use evpc_dataplane::metrics::names;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use serde::Serialize;

/// The data plane's counters over the life of the process (every child, every SPI).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DriverTotals {
    /// ESP packets received, opened and delivered to the TUN device.
    pub packets_in: u64,
    /// ESP packets sealed and sent.
    pub packets_out: u64,
    /// Inner bytes delivered.
    pub bytes_in: u64,
    /// Inner bytes sent.
    pub bytes_out: u64,
    /// Inbound ESP refused by the anti-replay window.
    pub replay_drops: u64,
    /// Inbound ESP whose ICV did not verify.
    pub auth_failures: u64,
    /// Inbound ESP for an SPI no running child has.
    pub unknown_spi: u64,
    /// Decrypted packets outside their child's selectors.
    pub policy_drops: u64,
    /// TUN packets no child covers.
    pub no_child: u64,
    /// Outbound packets dropped for an exhausted sequence space.
    pub lease_waits: u64,
    /// Packets dropped while fenced (a client is never fenced: always 0).
    pub fenced_drops: u64,
    /// Undecodable datagrams (in) or inner packets (out).
    pub malformed_in: u64,
    /// See `malformed_in`.
    pub malformed_out: u64,
    /// Failed writes to TUN.
    pub io_errors_in: u64,
    /// Failed sends to the gateway.
    pub io_errors_out: u64,
    /// NAT-keepalives received.
    pub keepalives: u64,
    /// IKE datagrams handed to the engine.
    pub ike_in: u64,
    /// IKE datagrams sent.
    pub ike_out: u64,
    /// IKE datagrams dropped for a full queue.
    pub ike_dropped: u64,
}

/// One atomic per counter of [`DriverTotals`], in the same order.
#[derive(Debug, Default)]
pub struct DriverMetrics {
    cells: [Arc<AtomicU64>; 19],
}

/// Which cell of [`DriverMetrics`] a counter of the data plane adds to.
fn cell(name: &str, direction: Option<&str>) -> Option<usize> {
    let inbound = direction != Some("out");
    Some(match name {
        names::PACKETS if inbound => 0,
        names::PACKETS => 1,
        names::BYTES if inbound => 2,
        names::BYTES => 3,
        names::REPLAY_DROPS => 4,
        names::AUTH_FAILURES => 5,
        names::UNKNOWN_SPI => 6,
        names::POLICY_DROPS => 7,
        names::NO_CHILD => 8,
        names::LEASE_WAITS => 9,
        names::FENCED_DROPS => 10,
        names::MALFORMED if inbound => 11,
        names::MALFORMED => 12,
        names::IO_ERRORS if inbound => 13,
        names::IO_ERRORS => 14,
        names::KEEPALIVES => 15,
        names::IKE_DATAGRAMS if inbound => 16,
        names::IKE_DATAGRAMS => 17,
        names::IKE_DROPPED => 18,
        _ => return None,
    })
}

impl DriverMetrics {
    /// Makes a fresh recorder the process-wide one, once; later calls return the same.
    /// `None` if another recorder was installed first.
    pub fn install() -> Option<&'static DriverMetrics> {
        static INSTALLED: OnceLock<Option<&'static DriverMetrics>> = OnceLock::new();
        *INSTALLED.get_or_init(|| {
            let recorder: &'static DriverMetrics = Box::leak(Box::default());
            metrics::set_global_recorder(recorder)
                .ok()
                .map(|()| recorder)
        })
    }

    /// The counters now.
    pub fn totals(&self) -> DriverTotals {
        let c = |i: usize| self.cells[i].load(Ordering::Relaxed);
        DriverTotals {
            packets_in: c(0),
            packets_out: c(1),
            bytes_in: c(2),
            bytes_out: c(3),
            replay_drops: c(4),
            auth_failures: c(5),
            unknown_spi: c(6),
            policy_drops: c(7),
            no_child: c(8),
            lease_waits: c(9),
            fenced_drops: c(10),
            malformed_in: c(11),
            malformed_out: c(12),
            io_errors_in: c(13),
            io_errors_out: c(14),
            keepalives: c(15),
            ike_in: c(16),
            ike_out: c(17),
            ike_dropped: c(18),
        }
    }
}

impl Recorder for DriverMetrics {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let direction = key
            .labels()
            .find(|label| label.key() == "direction")
            .map(|label| label.value());
        match cell(key.name(), direction) {
            Some(i) => Counter::from_arc(Arc::clone(&self.cells[i])),
            None => Counter::noop(),
        }
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_plane_counter_lands_in_its_own_field() {
        let recorder = DriverMetrics::default();
        metrics::with_local_recorder(&recorder, || {
            let add =
                |name: &'static str, direction: Option<&'static str>, n: u64| match direction {
                    Some(d) => metrics::counter!(name, "backend" => "userspace", "direction" => d)
                        .increment(n),
                    None => metrics::counter!(name, "backend" => "userspace").increment(n),
                };
            add(names::PACKETS, Some("in"), 1);
            add(names::PACKETS, Some("out"), 2);
            add(names::BYTES, Some("in"), 3);
            add(names::BYTES, Some("out"), 4);
            add(names::REPLAY_DROPS, None, 5);
            add(names::AUTH_FAILURES, None, 6);
            add(names::UNKNOWN_SPI, None, 7);
            add(names::POLICY_DROPS, None, 8);
            add(names::NO_CHILD, None, 9);
            add(names::LEASE_WAITS, None, 10);
            add(names::FENCED_DROPS, Some("in"), 5);
            add(names::FENCED_DROPS, Some("out"), 6);
            add(names::MALFORMED, Some("in"), 12);
            add(names::MALFORMED, Some("out"), 13);
            add(names::IO_ERRORS, Some("in"), 14);
            add(names::IO_ERRORS, Some("out"), 15);
            add(names::KEEPALIVES, None, 16);
            add(names::IKE_DATAGRAMS, Some("in"), 17);
            add(names::IKE_DATAGRAMS, Some("out"), 18);
            add(names::IKE_DROPPED, None, 19);
            add("something_else_total", None, 100);
        });
        assert_eq!(
            recorder.totals(),
            DriverTotals {
                packets_in: 1,
                packets_out: 2,
                bytes_in: 3,
                bytes_out: 4,
                replay_drops: 5,
                auth_failures: 6,
                unknown_spi: 7,
                policy_drops: 8,
                no_child: 9,
                lease_waits: 10,
                fenced_drops: 11,
                malformed_in: 12,
                malformed_out: 13,
                io_errors_in: 14,
                io_errors_out: 15,
                keepalives: 16,
                ike_in: 17,
                ike_out: 18,
                ike_dropped: 19,
            }
        );
    }
}
