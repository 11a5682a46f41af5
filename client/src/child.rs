//! An engine child SA as the data plane runs it.
//!
//! ```text
//!  evpc_ike::ChildSaInfo ──child_start──► evpc_dataplane::ChildStart
//!    inbound/outbound SPI                   in_spi / out_spi
//!    suite (AES-GCM-16, ESN)                suite (ENCR 20, key bits, ESN)
//!    inbound/outbound key ‖ salt            keys (copied into wiped buffers)
//!    local_ts / remote_ts                   ts_local / ts_remote
//!    local / peer, udp_encap                local / peer, udp_encap
//!                                           next_seq 1, limit = the whole counter space,
//!                                           replay_floor 0
//! ```
//!
//! A gateway runs a child within committed leases so another node can resume it above every
//! number it used; a client is the only holder of its SA, so its lease is the whole sequence
//! space of the suite (what `raft-store` allows as `out_hwm`): `2^32 - 1` without ESN,
//! `2^64 - 2` with (so that `limit + 1` still exists). It never needs an `extend`.

use evpc_dataplane::userspace::ENCR_AES_GCM_16;
use evpc_dataplane::{ChildKeymat, ChildStart};
use evpc_ike::{ChildSaInfo, EncrAlg, EspSuite};
use evpc_raft_store::{ChildSuite, Epoch, SaId};

/// The highest outbound sequence number a suite allows: `2^32 - 1` without ESN, `2^64 - 2`
/// with.
pub const fn highest_seq(esn: bool) -> u64 {
    if esn { u64::MAX - 1 } else { u32::MAX as u64 }
}

/// The suite in the data plane's (and the replicated record's) terms.
pub fn child_suite(suite: &EspSuite) -> ChildSuite {
    let EncrAlg::AesGcm16 { key_bits } = suite.encr;
    ChildSuite {
        encryption: ENCR_AES_GCM_16,
        key_bits,
        esn: suite.esn,
    }
}

/// The suite as strongSwan names it (`aes128gcm16`), for the report.
pub fn suite_name(suite: &EspSuite) -> String {
    let EncrAlg::AesGcm16 { key_bits } = suite.encr;
    format!("aes{key_bits}gcm16")
}

/// A traffic selector in the data plane's terms.
pub fn selector(ts: &evpc_ike::TrafficSelector) -> evpc_raft_store::TrafficSelector {
    evpc_raft_store::TrafficSelector {
        protocol: ts.ip_protocol,
        start_port: ts.start_port,
        end_port: ts.end_port,
        start_addr: ts.start,
        end_addr: ts.end,
    }
}

/// A selector for the report: `10.20.0.0/16` when it is a prefix of every protocol and port,
/// else `start-end`, with `proto N` and `ports a-b` when they narrow it.
pub fn selector_text(ts: &evpc_ike::TrafficSelector) -> String {
    let range = match (ts.start, ts.end) {
        (std::net::IpAddr::V4(start), std::net::IpAddr::V4(end)) => {
            let (s, e) = (u32::from(start), u32::from(end));
            let size = e.wrapping_sub(s).wrapping_add(1);
            if s <= e && (size == 0 || (size.is_power_of_two() && s % size == 0)) {
                let len = if size == 0 {
                    0
                } else {
                    32 - size.trailing_zeros()
                };
                format!("{start}/{len}")
            } else {
                format!("{start}-{end}")
            }
        }
        (start, end) => format!("{start}-{end}"),
    };
    let mut text = range;
    if ts.ip_protocol != 0 {
        text.push_str(&format!(" proto {}", ts.ip_protocol));
    }
    if (ts.start_port, ts.end_port) != (0, u16::MAX) {
        text.push_str(&format!(" ports {}-{}", ts.start_port, ts.end_port));
    }
    text
}

/// What the data plane needs to run `info`, a child of the IKE SA whose local SPI is
/// `ike_spi`: all of the counter space, no replay floor (nobody ran this SA before us).
pub fn child_start(ike_spi: u64, info: &ChildSaInfo) -> ChildStart {
    ChildStart {
        ike: SaId(ike_spi),
        // Epochs order the owners of a replicated SA; a client's SA has one owner, for good.
        epoch: Epoch::FIRST,
        in_spi: info.inbound_spi,
        out_spi: info.outbound_spi,
        suite: child_suite(&info.suite),
        keys: Some(ChildKeymat::new(
            info.inbound_key.expose().to_vec(),
            info.outbound_key.expose().to_vec(),
        )),
        ts_local: info.local_ts.iter().map(selector).collect(),
        ts_remote: info.remote_ts.iter().map(selector).collect(),
        local: info.local,
        peer: info.peer,
        udp_encap: info.udp_encap,
        next_seq: 1,
        limit: highest_seq(info.suite.esn),
        replay_floor: 0,
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use evpc_ike::{Secret, TrafficSelector};

    use super::*;

    fn info(esn: bool, key_bits: u16) -> ChildSaInfo {
        let key_len = usize::from(key_bits / 8) + 4;
        ChildSaInfo {
            inbound_spi: 0xc000_0001,
            outbound_spi: 0xd000_0002,
            suite: EspSuite {
                encr: EncrAlg::AesGcm16 { key_bits },
                esn,
                dh: None,
            },
            inbound_key: Secret::new(vec![0x11; key_len]),
            outbound_key: Secret::new(vec![0x22; key_len]),
            local_ts: vec![TrafficSelector::v4_host(Ipv4Addr::new(10, 10, 1, 2))],
            remote_ts: vec![TrafficSelector::v4_prefix(Ipv4Addr::new(10, 20, 0, 0), 16)],
            local: SocketAddr::from(([198, 51, 100, 100], 4500)),
            peer: SocketAddr::from(([198, 51, 100, 1], 4500)),
            udp_encap: true,
            rekey_of: None,
            rekey_generation: 0,
            rekey_at_ms: None,
            expire_at_ms: None,
        }
    }

    #[test]
    fn an_engine_child_becomes_a_child_start_with_the_whole_counter_space() {
        let start = child_start(0x1234, &info(false, 128));
        assert_eq!(start.ike, SaId(0x1234));
        assert_eq!(start.epoch, Epoch::FIRST);
        assert_eq!((start.in_spi, start.out_spi), (0xc000_0001, 0xd000_0002));
        assert_eq!(
            start.suite,
            ChildSuite {
                encryption: 20,
                key_bits: 128,
                esn: false
            }
        );
        let keys = start.keys.as_ref().unwrap();
        assert_eq!(
            &keys.inbound[..],
            &[0x11; 20][..],
            "inbound = the engine's inbound"
        );
        assert_eq!(&keys.outbound[..], &[0x22; 20][..]);
        assert_eq!(start.ts_local.len(), 1);
        assert_eq!(
            start.ts_local[0].start_addr,
            std::net::IpAddr::V4(Ipv4Addr::new(10, 10, 1, 2))
        );
        assert_eq!(start.ts_local[0].end_addr, start.ts_local[0].start_addr);
        assert_eq!(
            (start.ts_remote[0].start_port, start.ts_remote[0].end_port),
            (0, 65535)
        );
        assert_eq!(start.local, SocketAddr::from(([198, 51, 100, 100], 4500)));
        assert_eq!(start.peer, SocketAddr::from(([198, 51, 100, 1], 4500)));
        assert!(start.udp_encap);
        assert_eq!((start.next_seq, start.replay_floor), (1, 0));
        assert_eq!(start.limit, 0xffff_ffff, "2^32 - 1 without ESN");
        // the data plane accepts it as it is
        evpc_dataplane::userspace::esp_suite(&start.suite).unwrap();
    }

    #[test]
    fn with_esn_the_limit_is_two_to_the_64_minus_2() {
        let start = child_start(1, &info(true, 256));
        assert_eq!(start.limit, u64::MAX - 1);
        assert_eq!(start.suite.key_bits, 256);
        assert!(start.suite.esn);
        assert_eq!(suite_name(&info(true, 256).suite), "aes256gcm16");
    }

    #[test]
    fn keys_stay_out_of_debug() {
        let start = child_start(1, &info(false, 128));
        let text = format!("{start:?}");
        assert!(!text.contains("17, 17") && !text.contains("0x11"), "{text}");
    }

    #[test]
    fn selectors_read_like_routes() {
        assert_eq!(
            selector_text(&TrafficSelector::v4_prefix(Ipv4Addr::new(10, 20, 0, 0), 16)),
            "10.20.0.0/16"
        );
        assert_eq!(
            selector_text(&TrafficSelector::v4_host(Ipv4Addr::new(10, 10, 1, 2))),
            "10.10.1.2/32"
        );
        assert_eq!(selector_text(&TrafficSelector::any_v4()), "0.0.0.0/0");
        let mut odd =
            TrafficSelector::v4_range(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 6));
        odd.ip_protocol = 17;
        odd.start_port = 53;
        odd.end_port = 53;
        assert_eq!(
            selector_text(&odd),
            "10.0.0.1-10.0.0.6 proto 17 ports 53-53"
        );
    }
}
