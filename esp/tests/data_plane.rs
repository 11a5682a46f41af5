//! The crate driven the way the node's userspace data plane and the cluster's
//! lease manager drive it: TUN-style buffers with headroom, sealing in place,
//! UDP/4500 classification, opening in place, leases, and a failover.

use evpc_esp::{
    Datagram, InboundConfig, InboundSa, Keymat, MAX_SEAL_TAILROOM, NextHeader, OpenError, Opened,
    OutboundConfig, OutboundSa, Packet, SEAL_HEADROOM, SealError, Suite, classify_mut,
};

const SPI: u32 = 0x8000_0001;
const KEYMAT: [u8; 36] = [0x3c; 36];
const LEASE: u64 = 100;
const MTU: usize = 1500;

/// Stand-in for the replicated lease state: the committed `out_hwm`.
struct LeaseManager {
    committed_hwm: u64,
}

impl LeaseManager {
    fn grant_more(&mut self) -> u64 {
        self.committed_hwm += LEASE;
        self.committed_hwm
    }
}

fn outbound(first_seq: u64, limit: u64) -> OutboundSa {
    OutboundSa::new(OutboundConfig {
        spi: SPI,
        keymat: Keymat::new(Suite::AesGcm256, &KEYMAT).unwrap(),
        esn: true,
        first_seq,
        limit,
    })
    .unwrap()
}

fn inner_packet(n: u64) -> Vec<u8> {
    let len = 40 + (n as usize * 13) % 1200;
    let mut packet = vec![0u8; len];
    packet[0] = 0x45;
    packet[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    packet[4..12].copy_from_slice(&n.to_be_bytes());
    packet
}

/// One node's send path: "read from TUN" into the headroom buffer, seal in
/// place, extend the lease when told to, and return the UDP payload.
fn send(
    tx: &mut OutboundSa,
    leases: &mut LeaseManager,
    buffer: &mut [u8],
    inner: &[u8],
) -> Vec<u8> {
    buffer[SEAL_HEADROOM..SEAL_HEADROOM + inner.len()].copy_from_slice(inner);
    let len = match tx.seal_in_place(buffer, inner.len(), NextHeader::IPV4) {
        Ok(len) => len,
        Err(SealError::LeaseExhausted { next_seq, limit }) => {
            assert_eq!(next_seq, limit + 1);
            assert_eq!(tx.highest_used(), limit);
            tx.extend_limit(leases.grant_more());
            tx.seal_in_place(buffer, inner.len(), NextHeader::IPV4)
                .expect("sealing after a lease extension")
        }
        Err(error) => panic!("seal: {error}"),
    };
    assert!(tx.highest_used() <= tx.limit());
    buffer[..len].to_vec()
}

/// The receive path: classify the UDP payload, open in place, "write to TUN".
fn receive(rx: &mut InboundSa, datagram: &mut [u8]) -> Result<Vec<u8>, OpenError> {
    let Ok(Datagram::Esp(esp)) = classify_mut(datagram) else {
        panic!("not ESP");
    };
    assert_eq!(
        Packet::new_checked(&*esp).unwrap().spi(),
        rx.spi(),
        "SPI demux"
    );
    match rx.open(esp)? {
        Opened::Packet {
            next_header,
            payload,
            ..
        } => {
            assert_eq!(next_header, NextHeader::IPV4);
            Ok(payload.to_vec())
        }
        Opened::Dummy { .. } => panic!("no dummies were sent"),
    }
}

#[test]
fn tun_to_udp_and_back_across_leases_and_a_failover() {
    let mut leases = LeaseManager { committed_hwm: 0 };
    let first_limit = leases.grant_more();
    let mut tx = outbound(1, first_limit);
    let mut rx = InboundSa::new(InboundConfig {
        spi: SPI,
        keymat: Keymat::new(Suite::AesGcm256, &KEYMAT).unwrap(),
        esn: true,
        window_size: 1024,
        checkpoint: 0,
    })
    .unwrap();

    // one buffer for the whole run: no per-packet allocation on the hot path
    let mut buffer = vec![0u8; SEAL_HEADROOM + MTU + MAX_SEAL_TAILROOM];
    for n in 1..=250 {
        let inner = inner_packet(n);
        let mut datagram = send(&mut tx, &mut leases, &mut buffer, &inner);
        assert_eq!(receive(&mut rx, &mut datagram).unwrap(), inner);
    }
    assert_eq!(tx.highest_used(), 250);
    assert_eq!(leases.committed_hwm, 300);
    let checkpoint = rx.highest_authenticated();
    assert_eq!(checkpoint, 250);

    // Failover: the old owner's lease (up to 300) may have been used in full,
    // so the new owner starts after it with a fresh lease. The peer's
    // receiver just sees a gap in the sequence numbers.
    let resume_at = leases.committed_hwm + 1;
    let mut new_owner = outbound(resume_at, leases.grant_more());
    for n in 251..=260 {
        let inner = inner_packet(n);
        let mut datagram = send(&mut new_owner, &mut leases, &mut buffer, &inner);
        assert_eq!(receive(&mut rx, &mut datagram).unwrap(), inner);
    }
    assert_eq!(rx.highest_authenticated(), resume_at + 9);

    // The inbound side of a failover: a new owner resumes from the checkpoint
    // and refuses anything the checkpoint covers.
    let mut resumed_rx = InboundSa::new(InboundConfig {
        spi: SPI,
        keymat: Keymat::new(Suite::AesGcm256, &KEYMAT).unwrap(),
        esn: true,
        window_size: 1024,
        checkpoint,
    })
    .unwrap();
    let mut replayed = outbound(checkpoint, checkpoint);
    let mut old_datagram = send(&mut replayed, &mut leases, &mut buffer, &inner_packet(1));
    assert_eq!(
        receive(&mut resumed_rx, &mut old_datagram),
        Err(OpenError::Replay { seq: checkpoint })
    );
}
