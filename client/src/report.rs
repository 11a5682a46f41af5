//! The report: one JSON object per line on stdout, flushed line by line, each with `"t"`
//! (Unix time in milliseconds, a float with microsecond precision) and `"event"`.
//!
//! ```text
//!  {"t":1760000000123.456,"event":"started","pid":4242,"local":"198.51.100.100",...}
//!  {"t":...,"event":"ike_sa_init","n":1,"retransmit":false,"spi_i":"8f0c...","to":"198.51.100.1:500"}
//!  {"t":...,"event":"ike_auth","n":1,"spi_i":"8f0c...","spi_r":"51aa...","message_id":1,"to":"198.51.100.1:4500"}
//!  {"t":...,"event":"established",...} {"t":...,"event":"child_started",...}
//!  {"t":...,"event":"counters",...}  ...  {"t":...,"event":"stopped","signal":"SIGTERM",...}
//! ```
//!
//! SPIs are lowercase hex strings (16 digits for IKE, 8 for ESP); addresses are strings
//! (`"a.b.c.d"`, with `":port"` for sockets); absent values are `null`. [`Report`] is the
//! exact schema: each variant is one `"event"`, each field one key. Key material never appears
//! here (nothing in these types holds any).

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr};

use evpc_dataplane::ChildCounters;
use serde::{Serialize, Serializer};

use crate::clock::Now;
use crate::metrics::DriverTotals;

/// An IKE SPI, shown as 16 hex digits.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Spi64(pub u64);

impl Serialize for Spi64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:016x}", self.0))
    }
}

/// An ESP SPI, shown as 8 hex digits.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Spi32(pub u32);

impl Serialize for Spi32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:08x}", self.0))
    }
}

/// Who started an exchange.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum By {
    /// This client.
    Client,
    /// The gateway.
    Gateway,
}

/// Why a child stopped.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Replaced by a rekey (its successor was started first).
    Rekeyed,
    /// Deleted on its own (a DELETE for it alone, or its hard lifetime).
    Deleted,
    /// Its IKE SA ended.
    IkeClosed,
}

/// A child's counters with its SPIs, as the data plane reports them.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChildLine {
    /// SPI of the ESP packets the gateway sends us.
    pub in_spi: Spi32,
    /// SPI of the ESP packets we send.
    pub out_spi: Spi32,
    /// `highest_out`, `highest_in`, `out_packets`, `in_packets`, `lease_waits`,
    /// `replay_drops`, `auth_failures`.
    #[serde(flatten)]
    pub counters: ChildCounters,
}

/// Sums over every child this process ran, stopped ones included.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ChildTotals {
    /// Packets sent.
    pub out_packets: u64,
    /// Packets received and delivered.
    pub in_packets: u64,
    /// Outbound packets dropped for an exhausted sequence space.
    pub lease_waits: u64,
    /// Inbound packets dropped as replays.
    pub replay_drops: u64,
    /// Inbound packets that failed authentication.
    pub auth_failures: u64,
}

impl ChildTotals {
    /// Adds one child's counters.
    pub fn add(&mut self, c: &ChildCounters) {
        self.out_packets += c.out_packets;
        self.in_packets += c.in_packets;
        self.lease_waits += c.lease_waits;
        self.replay_drops += c.replay_drops;
        self.auth_failures += c.auth_failures;
    }
}

/// The IKE side's counters.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IkeStats {
    /// IKE datagrams received (from the data plane's IKE channel).
    pub datagrams_in: u64,
    /// IKE datagrams handed to the data plane to send.
    pub datagrams_out: u64,
    /// Requests we started (every exchange's first send, IKE_SA_INIT included).
    pub requests: u64,
    /// Retransmissions of our requests.
    pub retransmits: u64,
    /// Answers to the gateway's requests (a repeated answer to a retransmission included).
    pub responses: u64,
    /// Messages the engine refused or dropped (bad SPI, failed integrity, out of window...).
    pub peer_errors: u64,
    /// Datagrams the socket refused to send.
    pub send_errors: u64,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Report {
    /// The data plane is up and the first IKE_SA_INIT is about to leave.
    Started {
        /// This process.
        pid: u32,
        /// Our outer address.
        local: Ipv4Addr,
        /// The gateway's address.
        gateway: Ipv4Addr,
        /// The TUN device.
        tun: String,
        /// Our identity.
        id: String,
        /// The gateway's identity.
        remote_id: String,
        /// The client's version.
        version: &'static str,
    },
    /// An IKE_SA_INIT request left, the first or a retransmission.
    IkeSaInit {
        /// How many IKE_SA_INIT requests have left so far, this one included.
        n: u32,
        /// The same bytes as the previous one (a retransmission, not a restart with a cookie
        /// or another DH group).
        retransmit: bool,
        /// Our SPI.
        spi_i: Spi64,
        /// Where to.
        to: SocketAddr,
    },
    /// An IKE_AUTH exchange started (its first request left; retransmissions are
    /// `retransmit` lines). A client that never re-authenticates shows exactly one.
    IkeAuth {
        /// How many IKE_AUTH exchanges have started so far, this one included.
        n: u32,
        /// The IKE SA's SPIs.
        spi_i: Spi64,
        /// See `spi_i`.
        spi_r: Spi64,
        /// The request's message ID.
        message_id: u32,
        /// Where to.
        to: SocketAddr,
    },
    /// A request of ours other than IKE_SA_INIT was sent again.
    Retransmit {
        /// `IKE_AUTH`, `CREATE_CHILD_SA` or `INFORMATIONAL`.
        exchange: String,
        /// The request's message ID.
        message_id: u32,
        /// How many times this request has been retransmitted, this time included.
        n: u32,
        /// Where to.
        to: SocketAddr,
    },
    /// The IKE SA is authenticated; the TUN device is being configured.
    Established {
        /// The IKE SA's SPIs.
        spi_i: Spi64,
        /// See `spi_i`.
        spi_r: Spi64,
        /// The inner address the gateway assigned (null: none).
        inner: Option<Ipv4Addr>,
        /// DNS servers it named.
        dns: Vec<Ipv4Addr>,
        /// The first child SA's inbound SPI (null: the gateway refused the child).
        child_in_spi: Option<Spi32>,
        /// Its outbound SPI.
        child_out_spi: Option<Spi32>,
        /// Its suite (`aes128gcm16`, `aes256gcm16`).
        suite: Option<String>,
        /// Whether it uses extended sequence numbers.
        esn: Option<bool>,
        /// The gateway's IKE and ESP address and port (port 4500 after NAT-T).
        gateway: SocketAddr,
        /// Milliseconds from the first IKE_SA_INIT to here.
        setup_ms: f64,
    },
    /// A child SA runs in the data plane.
    ChildStarted {
        /// Inbound SPI.
        in_spi: Spi32,
        /// Outbound SPI.
        out_spi: Spi32,
        /// Suite.
        suite: String,
        /// Extended sequence numbers.
        esn: bool,
        /// Our selectors.
        ts_local: Vec<String>,
        /// The gateway's selectors.
        ts_remote: Vec<String>,
        /// The inbound SPI of the child this one replaces (null: a first child).
        rekey_of: Option<Spi32>,
        /// The highest outbound sequence number it may use.
        limit: u64,
    },
    /// A child SA stopped in the data plane.
    ChildStopped {
        /// Inbound SPI.
        in_spi: Spi32,
        /// Outbound SPI.
        out_spi: Spi32,
        /// Why.
        reason: StopReason,
        /// Its final counters (null if the data plane no longer knew it).
        counters: Option<ChildCounters>,
    },
    /// The gateway refused a child SA or its rekey; the IKE SA stays.
    ChildFailed {
        /// The child being rekeyed (null: a new child).
        rekey_of: Option<Spi32>,
        /// What the gateway said.
        error: String,
    },
    /// An IKE SA or child SA rekey completed.
    Rekeyed {
        /// Which, with its old and new SPIs.
        #[serde(flatten)]
        what: Rekey,
        /// Who started it.
        by: By,
    },
    /// A liveness check: ours answered, or the gateway's answered by us.
    Dpd {
        /// Who sent it.
        by: By,
        /// Its message ID.
        message_id: Option<u32>,
        /// Round trip in milliseconds (ours only, when answered; null otherwise).
        rtt_ms: Option<f64>,
        /// Ours went unanswered through every retransmission (the `closed` line with
        /// `peer_unreachable` follows).
        failed: bool,
    },
    /// Counters, every `--counters-ms` and once more at exit (`final`).
    Counters {
        /// Every running child.
        children: Vec<ChildLine>,
        /// Sums over every child this process ran, stopped ones included.
        total: ChildTotals,
        /// The data plane's counters.
        driver: DriverTotals,
        /// The IKE side's.
        ike: IkeStats,
        /// The last counters line of this process.
        #[serde(rename = "final")]
        last: bool,
    },
    /// The IKE SA ended; the client exits with status 3 (and never re-authenticates).
    Closed {
        /// `deleted_by_peer`, `deleted_locally`, `peer_unreachable`, `half_open_timeout`,
        /// `authentication_failed`, `negotiation_failed`.
        reason: &'static str,
        /// More, where the engine says more (what the peer notified).
        detail: Option<String>,
        /// Whether the IKE SA had been established.
        established: bool,
    },
    /// Something failed; also written to stderr in words.
    Error {
        /// What.
        message: String,
    },
    /// The last line after SIGTERM/SIGINT.
    Stopped {
        /// `SIGTERM` or `SIGINT`.
        signal: &'static str,
        /// Whether an IKE delete was sent (`--delete-on-exit`) and answered.
        deleted: bool,
    },
}

/// A rekey's old and new SPIs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Rekey {
    /// The IKE SA: a new SPI pair, the children stay.
    Ike {
        /// The replaced SA's SPIs.
        old_spi_i: Spi64,
        /// See `old_spi_i`.
        old_spi_r: Spi64,
        /// The new SA's SPIs.
        new_spi_i: Spi64,
        /// See `new_spi_i`.
        new_spi_r: Spi64,
    },
    /// A child SA: the new pair runs beside the old until the old is deleted.
    Child {
        /// The replaced child's SPIs.
        old_in_spi: Spi32,
        /// See `old_in_spi`.
        old_out_spi: Option<Spi32>,
        /// The new child's SPIs.
        new_in_spi: Spi32,
        /// See `new_in_spi`.
        new_out_spi: Spi32,
    },
}

#[derive(Serialize)]
struct Line<'a> {
    t: f64,
    #[serde(flatten)]
    report: &'a Report,
}

/// Writes report lines to `out`, one `write` and one flush per line, so a runner reading a
/// pipe sees each line as it happens and lines from one process never interleave.
#[derive(Debug)]
pub struct Reporter<W: Write> {
    out: W,
    line: Vec<u8>,
}

impl<W: Write> Reporter<W> {
    /// A reporter writing to `out`.
    pub fn new(out: W) -> Reporter<W> {
        Reporter {
            out,
            line: Vec::with_capacity(512),
        }
    }

    /// Writes one line stamped with `now`.
    pub fn emit(&mut self, now: Now, report: &Report) -> io::Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, &Line { t: now.t(), report })
            .map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.out.flush()
    }

    /// What was written (tests write into a `Vec`).
    pub fn get_ref(&self) -> &W {
        &self.out
    }

    /// The writer, to read what was written.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    const NOW: Now = Now {
        unix_us: 1_760_000_000_123_456,
        mono_us: 0,
    };

    fn line(report: &Report) -> Value {
        let mut reporter = Reporter::new(Vec::new());
        reporter.emit(NOW, report).unwrap();
        let text = String::from_utf8(reporter.get_ref().clone()).unwrap();
        assert!(
            text.ends_with('\n') && text.matches('\n').count() == 1,
            "{text:?}"
        );
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn every_line_has_t_and_event() {
        let v = line(&Report::Started {
            pid: 42,
            local: Ipv4Addr::new(198, 51, 100, 100),
            gateway: Ipv4Addr::new(198, 51, 100, 1),
            tun: "evpcc0".into(),
            id: "client-17.example".into(),
            remote_id: "gw.example".into(),
            version: "0.1.0",
        });
        assert_eq!(
            v,
            json!({"t": 1_760_000_000_123.456, "event": "started", "pid": 42,
                   "local": "198.51.100.100", "gateway": "198.51.100.1", "tun": "evpcc0",
                   "id": "client-17.example", "remote_id": "gw.example", "version": "0.1.0"})
        );
    }

    #[test]
    fn spis_are_fixed_width_hex_and_addresses_strings() {
        let v = line(&Report::Established {
            spi_i: Spi64(0xab),
            spi_r: Spi64(0x0123_4567_89ab_cdef),
            inner: Some(Ipv4Addr::new(10, 10, 1, 2)),
            dns: vec![Ipv4Addr::new(10, 10, 0, 1)],
            child_in_spi: Some(Spi32(0x1ff)),
            child_out_spi: Some(Spi32(0xc0ffee01)),
            suite: Some("aes128gcm16".into()),
            esn: Some(false),
            gateway: SocketAddr::from(([198, 51, 100, 1], 4500)),
            setup_ms: 12.5,
        });
        assert_eq!(
            v,
            json!({"t": 1_760_000_000_123.456, "event": "established",
                   "spi_i": "00000000000000ab", "spi_r": "0123456789abcdef",
                   "inner": "10.10.1.2", "dns": ["10.10.0.1"],
                   "child_in_spi": "000001ff", "child_out_spi": "c0ffee01",
                   "suite": "aes128gcm16", "esn": false,
                   "gateway": "198.51.100.1:4500", "setup_ms": 12.5})
        );
    }

    #[test]
    fn counters_flatten_the_data_plane_counters() {
        let counters = ChildCounters {
            highest_out: 7,
            highest_in: 9,
            out_packets: 7,
            in_packets: 8,
            lease_waits: 0,
            replay_drops: 1,
            auth_failures: 2,
        };
        let v = line(&Report::Counters {
            children: vec![ChildLine {
                in_spi: Spi32(1),
                out_spi: Spi32(2),
                counters,
            }],
            total: ChildTotals::default(),
            driver: DriverTotals::default(),
            ike: IkeStats::default(),
            last: true,
        });
        assert_eq!(v["event"], "counters");
        assert_eq!(v["final"], true);
        assert_eq!(
            v["children"][0],
            json!({"in_spi": "00000001", "out_spi": "00000002", "highest_out": 7,
                   "highest_in": 9, "out_packets": 7, "in_packets": 8, "lease_waits": 0,
                   "replay_drops": 1, "auth_failures": 2})
        );
        assert_eq!(v["total"]["replay_drops"], 0);
        assert_eq!(v["driver"]["bytes_in"], 0);
        assert_eq!(v["ike"]["retransmits"], 0);
    }

    #[test]
    fn rekeys_say_what_kind() {
        let v = line(&Report::Rekeyed {
            what: Rekey::Ike {
                old_spi_i: Spi64(1),
                old_spi_r: Spi64(2),
                new_spi_i: Spi64(3),
                new_spi_r: Spi64(4),
            },
            by: By::Gateway,
        });
        assert_eq!(
            v,
            json!({"t": 1_760_000_000_123.456, "event": "rekeyed", "kind": "ike",
                   "old_spi_i": "0000000000000001", "old_spi_r": "0000000000000002",
                   "new_spi_i": "0000000000000003", "new_spi_r": "0000000000000004",
                   "by": "gateway"})
        );
        let v = line(&Report::Rekeyed {
            what: Rekey::Child {
                old_in_spi: Spi32(1),
                old_out_spi: Some(Spi32(2)),
                new_in_spi: Spi32(3),
                new_out_spi: Spi32(4),
            },
            by: By::Client,
        });
        assert_eq!(v["kind"], "child");
        assert_eq!(v["old_out_spi"], "00000002");
        assert_eq!(v["by"], "client");
    }

    #[test]
    fn the_other_events_keep_their_names() {
        let names = [
            (
                Report::IkeSaInit {
                    n: 2,
                    retransmit: true,
                    spi_i: Spi64(5),
                    to: SocketAddr::from(([192, 0, 2, 1], 500)),
                },
                "ike_sa_init",
            ),
            (
                Report::IkeAuth {
                    n: 1,
                    spi_i: Spi64(5),
                    spi_r: Spi64(6),
                    message_id: 1,
                    to: SocketAddr::from(([192, 0, 2, 1], 4500)),
                },
                "ike_auth",
            ),
            (
                Report::Retransmit {
                    exchange: "IKE_AUTH".into(),
                    message_id: 1,
                    n: 1,
                    to: SocketAddr::from(([192, 0, 2, 1], 4500)),
                },
                "retransmit",
            ),
            (
                Report::ChildStopped {
                    in_spi: Spi32(1),
                    out_spi: Spi32(2),
                    reason: StopReason::IkeClosed,
                    counters: None,
                },
                "child_stopped",
            ),
            (
                Report::ChildFailed {
                    rekey_of: None,
                    error: "TS_UNACCEPTABLE".into(),
                },
                "child_failed",
            ),
            (
                Report::Dpd {
                    by: By::Gateway,
                    message_id: Some(3),
                    rtt_ms: None,
                    failed: false,
                },
                "dpd",
            ),
            (
                Report::Closed {
                    reason: "deleted_by_peer",
                    detail: None,
                    established: true,
                },
                "closed",
            ),
            (
                Report::Error {
                    message: "x".into(),
                },
                "error",
            ),
            (
                Report::Stopped {
                    signal: "SIGTERM",
                    deleted: false,
                },
                "stopped",
            ),
        ];
        for (report, name) in names {
            let v = line(&report);
            assert_eq!(v["event"], name, "{v}");
            assert!(v["t"].is_f64(), "{v}");
        }
        let v = line(&Report::ChildStopped {
            in_spi: Spi32(1),
            out_spi: Spi32(2),
            reason: StopReason::IkeClosed,
            counters: None,
        });
        assert_eq!(v["reason"], "ike_closed");
        assert_eq!(v["counters"], Value::Null);
    }
}
