//! The data plane's metrics, through the `metrics` facade; the node installs the exporter.
//!
//! Every counter carries a `backend` label (`userspace`, `xfrm`) and, where it applies, a
//! `direction` label (`in`: peer → TUN, `out`: TUN → peer). Workers take their handles once,
//! when they start, and add to them once per batch, so the cost per packet is an add to a local
//! variable: **install the recorder before constructing a driver**, or the handles are no-ops.
//!
//! | name | labels | what |
//! |---|---|---|
//! | `evpc_dataplane_packets_total` | backend, direction | ESP packets sent / inner packets delivered |
//! | `evpc_dataplane_bytes_total` | backend, direction | inner bytes of those packets |
//! | `evpc_dataplane_replay_drops_total` | backend | inbound ESP refused by the anti-replay window |
//! | `evpc_dataplane_auth_failures_total` | backend | inbound ESP whose ICV did not verify |
//! | `evpc_dataplane_lease_waits_total` | backend | outbound packets dropped: the sequence lease was used up |
//! | `evpc_dataplane_unknown_spi_total` | backend | inbound ESP for an SPI not started on this node |
//! | `evpc_dataplane_fenced_drops_total` | backend, direction | packets dropped while the fence gate was closed |
//! | `evpc_dataplane_no_child_total` | backend | TUN packets no child SA's selectors cover |
//! | `evpc_dataplane_policy_drops_total` | backend | decrypted packets outside the child's selectors |
//! | `evpc_dataplane_malformed_total` | backend, direction | undecodable datagrams or inner packets |
//! | `evpc_dataplane_io_errors_total` | backend, direction | failed sends to the peer or writes to TUN |
//! | `evpc_dataplane_keepalives_total` | backend | NAT-keepalives received (RFC 3948 §2.3) |
//! | `evpc_dataplane_ike_datagrams_total` | backend, direction | IKE datagrams handed to / sent for the node |
//! | `evpc_dataplane_ike_dropped_total` | backend | IKE datagrams dropped: the node's queue was full |

use metrics::{Counter, counter};

/// Metric names, for dashboards and tests.
pub mod names {
    /// Packets sent (out) / delivered (in).
    pub const PACKETS: &str = "evpc_dataplane_packets_total";
    /// Inner bytes sent / delivered.
    pub const BYTES: &str = "evpc_dataplane_bytes_total";
    /// Inbound replays dropped.
    pub const REPLAY_DROPS: &str = "evpc_dataplane_replay_drops_total";
    /// Inbound ICV failures.
    pub const AUTH_FAILURES: &str = "evpc_dataplane_auth_failures_total";
    /// Outbound packets dropped because the lease was used up.
    pub const LEASE_WAITS: &str = "evpc_dataplane_lease_waits_total";
    /// Inbound ESP for an SPI this node does not drive.
    pub const UNKNOWN_SPI: &str = "evpc_dataplane_unknown_spi_total";
    /// Packets dropped while fenced.
    pub const FENCED_DROPS: &str = "evpc_dataplane_fenced_drops_total";
    /// TUN packets that no child covers.
    pub const NO_CHILD: &str = "evpc_dataplane_no_child_total";
    /// Decrypted packets outside the child's selectors.
    pub const POLICY_DROPS: &str = "evpc_dataplane_policy_drops_total";
    /// Undecodable datagrams or inner packets.
    pub const MALFORMED: &str = "evpc_dataplane_malformed_total";
    /// Send or TUN-write errors.
    pub const IO_ERRORS: &str = "evpc_dataplane_io_errors_total";
    /// NAT-keepalives received.
    pub const KEEPALIVES: &str = "evpc_dataplane_keepalives_total";
    /// IKE datagrams in / out.
    pub const IKE_DATAGRAMS: &str = "evpc_dataplane_ike_datagrams_total";
    /// IKE datagrams dropped for a full queue.
    pub const IKE_DROPPED: &str = "evpc_dataplane_ike_dropped_total";
}

/// Counters a worker that moves packets from the peer to TUN adds to.
#[derive(Debug)]
pub(crate) struct InboundMetrics {
    pub packets: Counter,
    pub bytes: Counter,
    pub replay_drops: Counter,
    pub auth_failures: Counter,
    pub unknown_spi: Counter,
    pub fenced_drops: Counter,
    pub policy_drops: Counter,
    pub malformed: Counter,
    pub io_errors: Counter,
    pub keepalives: Counter,
    pub ike: Counter,
    pub ike_dropped: Counter,
}

impl InboundMetrics {
    pub(crate) fn new(backend: &'static str) -> InboundMetrics {
        let dir = "in";
        InboundMetrics {
            packets: counter!(names::PACKETS, "backend" => backend, "direction" => dir),
            bytes: counter!(names::BYTES, "backend" => backend, "direction" => dir),
            replay_drops: counter!(names::REPLAY_DROPS, "backend" => backend),
            auth_failures: counter!(names::AUTH_FAILURES, "backend" => backend),
            unknown_spi: counter!(names::UNKNOWN_SPI, "backend" => backend),
            fenced_drops: counter!(names::FENCED_DROPS, "backend" => backend, "direction" => dir),
            policy_drops: counter!(names::POLICY_DROPS, "backend" => backend),
            malformed: counter!(names::MALFORMED, "backend" => backend, "direction" => dir),
            io_errors: counter!(names::IO_ERRORS, "backend" => backend, "direction" => dir),
            keepalives: counter!(names::KEEPALIVES, "backend" => backend),
            ike: counter!(names::IKE_DATAGRAMS, "backend" => backend, "direction" => dir),
            ike_dropped: counter!(names::IKE_DROPPED, "backend" => backend),
        }
    }
}

/// Counters a worker that moves packets from TUN to the peer adds to.
#[derive(Debug)]
pub(crate) struct OutboundMetrics {
    pub packets: Counter,
    pub bytes: Counter,
    pub lease_waits: Counter,
    pub fenced_drops: Counter,
    pub no_child: Counter,
    pub malformed: Counter,
    pub io_errors: Counter,
    pub ike: Counter,
}

impl OutboundMetrics {
    pub(crate) fn new(backend: &'static str) -> OutboundMetrics {
        let dir = "out";
        OutboundMetrics {
            packets: counter!(names::PACKETS, "backend" => backend, "direction" => dir),
            bytes: counter!(names::BYTES, "backend" => backend, "direction" => dir),
            lease_waits: counter!(names::LEASE_WAITS, "backend" => backend),
            fenced_drops: counter!(names::FENCED_DROPS, "backend" => backend, "direction" => dir),
            no_child: counter!(names::NO_CHILD, "backend" => backend),
            malformed: counter!(names::MALFORMED, "backend" => backend, "direction" => dir),
            io_errors: counter!(names::IO_ERRORS, "backend" => backend, "direction" => dir),
            ike: counter!(names::IKE_DATAGRAMS, "backend" => backend, "direction" => dir),
        }
    }
}

/// Per-batch tallies, added to the [`metrics`] handles once at the end of a batch.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Tally {
    pub packets: u64,
    pub bytes: u64,
    pub replay_drops: u64,
    pub auth_failures: u64,
    pub unknown_spi: u64,
    pub fenced_drops: u64,
    pub policy_drops: u64,
    pub malformed: u64,
    pub io_errors: u64,
    pub keepalives: u64,
    pub ike: u64,
    pub ike_dropped: u64,
    pub lease_waits: u64,
    pub no_child: u64,
}

impl Tally {
    pub(crate) fn flush_inbound(&mut self, m: &InboundMetrics) {
        add(&m.packets, self.packets);
        add(&m.bytes, self.bytes);
        add(&m.replay_drops, self.replay_drops);
        add(&m.auth_failures, self.auth_failures);
        add(&m.unknown_spi, self.unknown_spi);
        add(&m.fenced_drops, self.fenced_drops);
        add(&m.policy_drops, self.policy_drops);
        add(&m.malformed, self.malformed);
        add(&m.io_errors, self.io_errors);
        add(&m.keepalives, self.keepalives);
        add(&m.ike, self.ike);
        add(&m.ike_dropped, self.ike_dropped);
        *self = Tally::default();
    }

    pub(crate) fn flush_outbound(&mut self, m: &OutboundMetrics) {
        add(&m.packets, self.packets);
        add(&m.bytes, self.bytes);
        add(&m.lease_waits, self.lease_waits);
        add(&m.fenced_drops, self.fenced_drops);
        add(&m.no_child, self.no_child);
        add(&m.malformed, self.malformed);
        add(&m.io_errors, self.io_errors);
        add(&m.ike, self.ike);
        *self = Tally::default();
    }
}

fn add(counter: &Counter, n: u64) {
    if n != 0 {
        counter.increment(n);
    }
}
