//! Seal and open throughput at typical packet sizes, next to the raw AES-GCM
//! primitive at 64 and 1400 bytes so that the ESP overhead is measured in one
//! run.
//!
//! `cargo bench -p evpc-esp --bench esp`

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes128Gcm, KeyInit};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use evpc_esp::{
    InboundConfig, InboundSa, Keymat, NextHeader, OutboundConfig, OutboundSa, Suite, sealed_len,
};

const SIZES: [usize; 3] = [64, 512, 1400];
const SPI: u32 = 0x0001_0000;
const KEYMAT: [u8; 20] = [0x42; 20];

fn outbound() -> OutboundSa {
    OutboundSa::new(OutboundConfig {
        spi: SPI,
        keymat: Keymat::new(Suite::AesGcm128, &KEYMAT).unwrap(),
        esn: true,
        first_seq: 1,
        limit: u64::MAX,
    })
    .unwrap()
}

fn inbound() -> InboundSa {
    InboundSa::new(InboundConfig {
        spi: SPI,
        keymat: Keymat::new(Suite::AesGcm128, &KEYMAT).unwrap(),
        esn: true,
        window_size: 64,
        checkpoint: 0,
    })
    .unwrap()
}

fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(
            BenchmarkId::new("aes128gcm_esn", size),
            &size,
            |b, &size| {
                let mut sa = outbound();
                let mut buffer = vec![0xa5u8; sealed_len(size).unwrap()];
                // Sealing in place over last round's output is fine: only the
                // lengths matter for the cost, and the headroom is rewritten.
                b.iter(|| {
                    sa.seal_in_place(black_box(&mut buffer), size, NextHeader::IPV4)
                        .unwrap()
                });
            },
        );
    }
    group.finish();
}

/// Packets must carry fresh sequence numbers or the replay window refuses
/// them, so a batch of packets is sealed once and each timed batch opens
/// fresh copies with a fresh SA; copying and SA setup are not timed.
fn open(c: &mut Criterion) {
    const BATCH: usize = 1024;
    let mut group = c.benchmark_group("open");
    for size in SIZES {
        let mut tx = outbound();
        let sealed: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| {
                let mut packet = vec![0x5au8; sealed_len(size).unwrap()];
                let len = tx
                    .seal_in_place(&mut packet, size, NextHeader::IPV4)
                    .unwrap();
                packet.truncate(len);
                packet
            })
            .collect();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("aes128gcm_esn", size), &size, |b, _| {
            let mut work = sealed.clone();
            b.iter_custom(|iterations| {
                let mut elapsed = Duration::ZERO;
                let mut left = iterations;
                while left > 0 {
                    let batch = left.min(BATCH as u64) as usize;
                    let mut sa = inbound();
                    for (copy, original) in work.iter_mut().zip(&sealed).take(batch) {
                        copy.copy_from_slice(original);
                    }
                    let start = Instant::now();
                    for packet in work.iter_mut().take(batch) {
                        black_box(sa.open(black_box(packet)).unwrap());
                    }
                    elapsed += start.elapsed();
                    left -= batch as u64;
                }
                elapsed
            });
        });
    }
    group.finish();
}

/// The AEAD alone, on the same bytes ESP encrypts (payload plus 2 bytes of
/// padding and the 2-byte trailer) with the 12-byte AAD that ESN uses: the
/// reference that seal is compared with. 64 bytes shows the fixed per-call
/// cost of the aes-gcm crate itself.
///
/// `encrypt_inout_detached` is what aes-gcm 0.11's deprecated
/// `encrypt_in_place_detached` forwards to.
fn raw_aes_gcm(c: &mut Criterion) {
    let cipher = Aes128Gcm::new_from_slice(&KEYMAT[..16]).unwrap();
    let aad = [0x11u8; 12];
    let mut group = c.benchmark_group("raw");
    for size in [64, 1400] {
        let mut buffer = vec![0xa5u8; size + 4];
        let mut counter = 0u64;
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(
            BenchmarkId::new("aes128gcm_encrypt_inout_detached", size),
            |b| {
                b.iter(|| {
                    counter += 1;
                    let mut nonce = [0u8; 12];
                    nonce[4..].copy_from_slice(&counter.to_be_bytes());
                    cipher
                        .encrypt_inout_detached(
                            &nonce.into(),
                            &aad,
                            black_box(&mut buffer[..]).into(),
                        )
                        .unwrap()
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, seal, open, raw_aes_gcm);
criterion_main!(benches);
