//! # What went over the wire: ESP packets captured with tcpdump, and the nonce-reuse check
//!
//! ```text
//!  Capture::start(ns, iface) ── ip netns exec NS tcpdump -i IFACE -U -w FILE 'esp or udp port 4500'
//!        │                      (waits until tcpdump listens)
//!  Capture::stop() ── SIGTERM, then parse_pcap(FILE) ──► Vec<EspPacket>
//!                                                          │
//!  repeats(&packets) ── per (destination, SPI): every sequence number once? ──► Vec<Repeat>
//!
//!  Capture::stream(ns, iface, sink) ── tcpdump -w - ── a reader thread parses the pcap stream
//!        and hands every ESP packet to `sink` as it arrives (nothing kept on disk: long
//!        campaigns capture millions of packets) ── RepeatFinder: the same check in memory that
//!        grows with the runs of consecutive numbers, not with the packets
//! ```
//!
//! With AES-GCM a sequence number sent twice under one SPI is a nonce sent twice (RFC 4106
//! §3.1: the IV is the sequence number in evpc and in the kernel's `seqiv`), so a test that
//! sees a repeat has seen the one thing a failover must never do. Only the low 32 bits are on
//! the wire (with ESN the high half is implicit, RFC 4303 §2.2.1): a capture would need 2^32
//! packets of one SPI to mistake a wrap for a repeat.

use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};

/// One ESP packet seen on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EspPacket {
    /// When the capture saw it (since the Unix epoch).
    pub at: Duration,
    /// The sending interface's link-layer address (which node sent it).
    pub src_mac: [u8; 6],
    /// Outer source.
    pub src: Ipv4Addr,
    /// Outer destination.
    pub dst: Ipv4Addr,
    /// In UDP (RFC 3948, port 4500) rather than IP protocol 50.
    pub udp_encap: bool,
    /// The SPI.
    pub spi: u32,
    /// The sequence number's low 32 bits.
    pub seq: u32,
}

impl EspPacket {
    /// The sender's link-layer address as `aa:bb:cc:dd:ee:ff`.
    pub fn mac(&self) -> String {
        format_mac(&self.src_mac)
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A (SPI, sequence number) seen twice: a nonce reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Repeat {
    /// The first packet with the number.
    pub first: EspPacket,
    /// A later one with the same destination, SPI and number.
    pub again: EspPacket,
}

impl fmt::Display for Repeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = |p: &EspPacket| {
            let t = p.at.as_secs_f64();
            format!("{t:.6} from {} ({})", p.src, p.mac())
        };
        write!(
            f,
            "SPI {:08x} sequence number {} to {} sent twice: at {} and at {}",
            self.first.spi,
            self.first.seq,
            self.first.dst,
            at(&self.first),
            at(&self.again)
        )
    }
}

/// Every (destination, SPI, sequence number) that occurs more than once, in capture order.
pub fn repeats(packets: &[EspPacket]) -> Vec<Repeat> {
    let mut seen = std::collections::HashMap::new();
    let mut found = Vec::new();
    for packet in packets {
        match seen.entry((packet.dst, packet.spi, packet.seq)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(*packet);
            }
            std::collections::hash_map::Entry::Occupied(o) => found.push(Repeat {
                first: *o.get(),
                again: *packet,
            }),
        }
    }
    found
}

/// Finds every (destination, SPI, sequence number) seen twice, packet by packet, keeping per
/// (destination, SPI) only the runs of consecutive numbers with who sent them and when — so a
/// campaign of millions of packets needs memory for its SA moves, not its packets.
#[derive(Debug, Default)]
pub struct RepeatFinder {
    runs: std::collections::HashMap<(Ipv4Addr, u32), std::collections::BTreeMap<u32, Run>>,
    repeats: Vec<Repeat>,
    packets: u64,
}

/// Consecutive sequence numbers `start..=end` of one SPI, the first and last packet of them.
#[derive(Clone, Copy, Debug)]
struct Run {
    end: u32,
    first: EspPacket,
    last: EspPacket,
}

impl RepeatFinder {
    /// Looks at one packet; a repeat is recorded with the packet of the run it fell into that
    /// is nearest to it (the run's first or last: the exact earlier packet is not kept).
    pub fn see(&mut self, packet: EspPacket) {
        self.packets += 1;
        let runs = self.runs.entry((packet.dst, packet.spi)).or_default();
        let seq = packet.seq;
        // the run starting at or below seq
        if let Some((&start, run)) = runs.range_mut(..=seq).next_back() {
            if seq <= run.end {
                let earlier = if seq - start <= run.end - seq {
                    run.first
                } else {
                    run.last
                };
                self.repeats.push(Repeat {
                    first: earlier,
                    again: packet,
                });
                return;
            }
            if seq == run.end.wrapping_add(1) && run.first.src_mac == packet.src_mac {
                run.end = seq;
                run.last = packet;
                // joins the next run?
                if let Some(next) = runs.get(&(seq.wrapping_add(1))).copied()
                    && next.first.src_mac == packet.src_mac
                {
                    runs.remove(&(seq.wrapping_add(1)));
                    let run = runs.get_mut(&start).expect("just read");
                    run.end = next.end;
                    run.last = next.last;
                }
                return;
            }
        }
        runs.insert(
            seq,
            Run {
                end: seq,
                first: packet,
                last: packet,
            },
        );
    }

    /// The repeats found so far, in the order they were seen.
    pub fn repeats(&self) -> &[Repeat] {
        &self.repeats
    }

    /// Packets looked at.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// (destination, SPI) pairs seen.
    pub fn spis(&self) -> usize {
        self.runs.len()
    }
}

/// A running tcpdump in a network namespace.
#[derive(Debug)]
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    /// Starts capturing ESP (plain and in UDP 4500) on `iface` of namespace `netns` (`None`:
    /// the caller's), and returns once tcpdump listens.
    pub fn start(netns: Option<&str>, iface: &str) -> anyhow::Result<Capture> {
        let dir = tempfile::Builder::new()
            .prefix("evpc-capture-")
            .tempdir()
            .context("capture directory")?;
        let file = dir.path().join("esp.pcap");
        let log = dir.path().join("tcpdump.log");
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tcpdump"]);
                c
            }
            None => Command::new("tcpdump"),
        };
        let stderr = fs::File::create(&log).context("tcpdump log")?;
        let child = command
            .args(["-i", iface, "-n", "-U", "-s", "128", "-w"])
            .arg(&file)
            .args(["ip proto 50 or udp port 4500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting tcpdump (apt-get install tcpdump)")?;
        let mut capture = Capture {
            child: Some(child),
            file,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let said = fs::read_to_string(&log).unwrap_or_default();
            if said.contains("listening on") {
                return Ok(capture);
            }
            if let Some(child) = capture.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("tcpdump exited ({status}): {said}");
            }
            if Instant::now() > deadline {
                bail!("tcpdump did not start listening on {iface}: {said}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The ESP packets captured so far (tcpdump writes each one at once, `-U`).
    pub fn packets(&self) -> anyhow::Result<Vec<EspPacket>> {
        parse_pcap(&fs::read(&self.file).context("reading the capture")?)
    }

    /// Stops tcpdump and returns every ESP packet it saw.
    pub fn stop(mut self) -> anyhow::Result<Vec<EspPacket>> {
        self.terminate();
        self.packets()
    }

    fn terminate(&mut self) {
        if let Some(child) = self.child.take() {
            stop_tcpdump(child);
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// A tcpdump whose ESP packets go to a callback as they are captured ([`Capture::stream`]).
#[derive(Debug)]
pub struct StreamingCapture {
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<anyhow::Result<u64>>>,
}

impl Capture {
    /// Starts capturing ESP (plain and in UDP 4500) on `iface` of namespace `netns`, handing
    /// each packet to `sink` on a thread of its own; returns once tcpdump listens.
    pub fn stream(
        netns: Option<&str>,
        iface: &str,
        mut sink: impl FnMut(EspPacket) + Send + 'static,
    ) -> anyhow::Result<StreamingCapture> {
        let mut command = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tcpdump"]);
                c
            }
            None => Command::new("tcpdump"),
        };
        let mut child = command
            // -B: a 16 MiB buffer in the kernel, so a burst while the reader is busy is not lost
            .args([
                "-i", iface, "-n", "-U", "-s", "96", "-B", "16384", "-w", "-",
            ])
            .args(["ip proto 50 or udp port 4500"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting tcpdump (apt-get install tcpdump)")?;
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        // tcpdump says it listens on stderr; wait for that before the caller goes on.
        let (said, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut said = Some(said);
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(s) = said.take_if(|_| line.contains("listening on")) {
                    let _ = s.send(Ok(()));
                } else if line.contains("dropped by kernel") && !line.starts_with('0') {
                    eprintln!("tcpdump: {line}");
                } else if let Some(s) = said.take() {
                    let _ = s.send(Err(line));
                }
            }
        });
        let reader = std::thread::Builder::new()
            .name("esp-capture".into())
            .spawn(move || {
                let mut stream = PcapStream::new(std::io::BufReader::new(stdout));
                let mut seen = 0;
                while let Some(packet) = stream.next_packet()? {
                    seen += 1;
                    sink(packet);
                }
                Ok(seen)
            })?;
        let mut capture = StreamingCapture {
            child: Some(child),
            reader: Some(reader),
        };
        match listening.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(capture),
            Ok(Err(line)) => {
                capture.terminate();
                bail!("tcpdump did not start on {iface}: {line}")
            }
            Err(_) => {
                capture.terminate();
                bail!("tcpdump did not start listening on {iface} within 30 s")
            }
        }
    }
}

impl StreamingCapture {
    /// Stops tcpdump once the packets it buffered are read; returns how many ESP packets the
    /// sink got.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        // Let the last packets in flight reach the capture first.
        std::thread::sleep(Duration::from_millis(200));
        self.terminate();
        match self.reader.take() {
            Some(reader) => reader
                .join()
                .map_err(|_| anyhow::anyhow!("the capture reader panicked"))?,
            None => Ok(0),
        }
    }

    fn terminate(&mut self) {
        if let Some(child) = self.child.take() {
            stop_tcpdump(child);
        }
    }
}

impl Drop for StreamingCapture {
    fn drop(&mut self) {
        self.terminate();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// A pcap stream read record by record (what `tcpdump -w -` writes).
struct PcapStream<R> {
    input: R,
    header: Option<(bool, bool)>,
}

impl<R: std::io::Read> PcapStream<R> {
    fn new(input: R) -> Self {
        PcapStream {
            input,
            header: None,
        }
    }

    /// Fills `buf` whole, or says the stream ended (cleanly, or mid-record: the same here).
    fn read_exact_or_end(&mut self, buf: &mut [u8]) -> anyhow::Result<bool> {
        match self.input.read_exact(buf) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The next ESP packet, `None` at the end of the stream.
    fn next_packet(&mut self) -> anyhow::Result<Option<EspPacket>> {
        let (little, nanos) = match self.header {
            Some(h) => h,
            None => {
                let mut header = [0u8; 24];
                if !self.read_exact_or_end(&mut header)? {
                    return Ok(None);
                }
                let h = pcap_header(&header)?;
                self.header = Some(h);
                h
            }
        };
        let u32_of = |b: &[u8]| -> u32 {
            let b: [u8; 4] = b.try_into().expect("4 bytes");
            if little {
                u32::from_le_bytes(b)
            } else {
                u32::from_be_bytes(b)
            }
        };
        let mut frame = Vec::new();
        loop {
            let mut record = [0u8; 16];
            if !self.read_exact_or_end(&mut record)? {
                return Ok(None);
            }
            let (sec, frac, len) = (
                u32_of(&record[0..4]),
                u32_of(&record[4..8]),
                u32_of(&record[8..12]) as usize,
            );
            anyhow::ensure!(
                len <= 1 << 18,
                "a pcap record of {len} bytes: not a pcap stream"
            );
            frame.resize(len, 0);
            if !self.read_exact_or_end(&mut frame)? {
                return Ok(None);
            }
            let when = Duration::from_secs(u64::from(sec))
                + if nanos {
                    Duration::from_nanos(u64::from(frac))
                } else {
                    Duration::from_micros(u64::from(frac))
                };
            if let Some(packet) = esp_in_frame(&frame, when) {
                return Ok(Some(packet));
            }
        }
    }
}

/// (little-endian, nanosecond timestamps) of a pcap file header, or why it is not one.
fn pcap_header(bytes: &[u8]) -> anyhow::Result<(bool, bool)> {
    const LINKTYPE_ETHERNET: u32 = 1;
    let magic = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    let (little, nanos) = match magic {
        0xa1b2_c3d4 => (true, false),
        0xa1b2_3c4d => (true, true),
        0xd4c3_b2a1 => (false, false),
        0x4d3c_b2a1 => (false, true),
        other => bail!("not a pcap file (magic {other:08x})"),
    };
    let link: [u8; 4] = bytes[20..24].try_into().expect("4 bytes");
    let link = if little {
        u32::from_le_bytes(link)
    } else {
        u32::from_be_bytes(link)
    };
    if link != LINKTYPE_ETHERNET {
        bail!("pcap link type {link}, expected Ethernet (capture on an interface, not `any`)");
    }
    Ok((little, nanos))
}

/// The ESP packets (IPv4 over Ethernet, plain or in UDP 4500) of a pcap file. IKE on 4500
/// (the non-ESP marker) and NAT-T keepalives are skipped; a truncated last record (a capture
/// stopped mid-write) ends the list.
pub fn parse_pcap(bytes: &[u8]) -> anyhow::Result<Vec<EspPacket>> {
    if bytes.len() < 24 {
        return Ok(Vec::new()); // nothing written yet
    }
    let (little, nanos) = pcap_header(&bytes[..24])?;
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let mut packets = Vec::new();
    let mut at = 24;
    while let (Some(sec), Some(frac), Some(len)) = (u32_at(at), u32_at(at + 4), u32_at(at + 8)) {
        let start = at + 16;
        let Some(frame) = bytes.get(start..start + len as usize) else {
            break;
        };
        let when = Duration::from_secs(u64::from(sec))
            + if nanos {
                Duration::from_nanos(u64::from(frac))
            } else {
                Duration::from_micros(u64::from(frac))
            };
        if let Some(packet) = esp_in_frame(frame, when) {
            packets.push(packet);
        }
        at = start + len as usize;
    }
    Ok(packets)
}

fn esp_in_frame(frame: &[u8], at: Duration) -> Option<EspPacket> {
    const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
    const PROTO_UDP: u8 = 17;
    const PROTO_ESP: u8 = 50;
    if frame.get(12..14)? != ETHERTYPE_IPV4 {
        return None;
    }
    let src_mac: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let ip = frame.get(14..)?;
    if ip.first()? >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let addr = |at: usize| -> Option<Ipv4Addr> {
        let b: [u8; 4] = ip.get(at..at + 4)?.try_into().ok()?;
        Some(Ipv4Addr::from(b))
    };
    let (src, dst) = (addr(12)?, addr(16)?);
    let (udp_encap, esp) = match *ip.get(9)? {
        PROTO_ESP => (false, ip.get(ihl..)?),
        PROTO_UDP => {
            let esp = ip.get(ihl + 8..)?;
            // RFC 3948 §2.2: a zero "SPI" is the non-ESP marker (IKE); a one-byte 0xff is a
            // NAT-keepalive.
            if esp.len() < 8 || esp[0..4] == [0, 0, 0, 0] {
                return None;
            }
            (true, esp)
        }
        _ => return None,
    };
    Some(EspPacket {
        at,
        src_mac,
        src,
        dst,
        udp_encap,
        spi: u32::from_be_bytes(esp.get(0..4)?.try_into().ok()?),
        seq: u32::from_be_bytes(esp.get(4..8)?.try_into().ok()?),
    })
}

/// Now, as the capture's clock counts (since the Unix epoch).
pub fn wall_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Stops tcpdump the way that makes it flush what it captured: SIGTERM, then up to 5 s to exit,
/// then SIGKILL.
fn stop_tcpdump(mut child: std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[2, 0, 0, 0, 0, 7]);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        ip.extend_from_slice(&[198, 51, 100, 1, 198, 51, 100, 100]);
        f.extend_from_slice(&ip);
        f.extend_from_slice(payload);
        f
    }

    fn pcap(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut p = Vec::new();
        for v in [0xa1b2_c3d4u32, 0x0004_0002, 0, 0, 65535, 1] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        for (i, f) in frames.iter().enumerate() {
            for v in [i as u32, 0, f.len() as u32, f.len() as u32] {
                p.extend_from_slice(&v.to_le_bytes());
            }
            p.extend_from_slice(f);
        }
        p
    }

    fn esp(spi: u32, seq: u32) -> Vec<u8> {
        let mut e = spi.to_be_bytes().to_vec();
        e.extend_from_slice(&seq.to_be_bytes());
        e.extend_from_slice(&[0xaa; 24]);
        e
    }

    fn in_udp(payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0x11, 0x94, 0x11, 0x94, 0, 0, 0, 0];
        u.extend_from_slice(payload);
        u
    }

    #[test]
    fn plain_and_udp_esp_are_read_ike_and_keepalives_are_not() {
        let mut ike = vec![0, 0, 0, 0];
        ike.extend_from_slice(&[0x11; 28]);
        let frames = vec![
            frame(50, &esp(0x1000, 7)),
            frame(17, &in_udp(&esp(0x2000, 8))),
            frame(17, &in_udp(&ike)),
            frame(17, &in_udp(&[0xff])),
            frame(6, &[0; 20]),
        ];
        let mut bytes = pcap(&frames);
        bytes.truncate(bytes.len() - 3); // a record cut off at the end
        let got = parse_pcap(&bytes).expect("pcap");
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            (got[0].udp_encap, got[0].spi, got[0].seq),
            (false, 0x1000, 7)
        );
        assert_eq!(
            (got[1].udp_encap, got[1].spi, got[1].seq),
            (true, 0x2000, 8)
        );
        assert_eq!(got[1].mac(), "02:00:00:00:00:07");
        assert_eq!(got[1].at, Duration::from_secs(1));
    }

    #[test]
    fn a_sequence_number_sent_twice_under_one_spi_is_a_repeat() {
        let bytes = pcap(&[
            frame(50, &esp(1, 1)),
            frame(50, &esp(1, 2)),
            frame(50, &esp(2, 1)),
            frame(50, &esp(1, 2)),
        ]);
        let got = parse_pcap(&bytes).expect("pcap");
        let found = repeats(&got);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].first.spi, found[0].first.seq), (1, 2));
        assert!(found[0].to_string().contains("sequence number 2"));
        assert!(repeats(&got[..3]).is_empty());
    }

    #[test]
    fn a_pcap_stream_gives_the_same_packets_as_the_file() {
        let frames = vec![
            frame(50, &esp(0x1000, 7)),
            frame(17, &in_udp(&esp(0x2000, 8))),
            frame(6, &[0; 20]),
            frame(50, &esp(0x1000, 9)),
        ];
        let bytes = pcap(&frames);
        let mut stream = PcapStream::new(&bytes[..]);
        let mut got = Vec::new();
        while let Some(p) = stream.next_packet().unwrap() {
            got.push(p);
        }
        assert_eq!(got, parse_pcap(&bytes).unwrap());
        // cut anywhere: the packets before the cut, never a panic
        for cut in 0..bytes.len() {
            let mut stream = PcapStream::new(&bytes[..cut]);
            while let Ok(Some(_)) = stream.next_packet() {}
        }
    }

    #[test]
    fn the_repeat_finder_agrees_with_repeats_and_keeps_runs_not_packets() {
        let packets: Vec<EspPacket> = parse_pcap(&pcap(&[
            frame(50, &esp(1, 1)),
            frame(50, &esp(1, 2)),
            frame(50, &esp(1, 3)),
            frame(50, &esp(2, 1)),
            frame(50, &esp(1, 5)),
            frame(50, &esp(1, 4)), // fills the hole: runs 1..=3 and 5 join
            frame(50, &esp(1, 2)), // a repeat
            frame(50, &esp(1, 5)), // another
        ]))
        .unwrap();
        let mut finder = RepeatFinder::default();
        for p in &packets {
            finder.see(*p);
        }
        let expected = repeats(&packets);
        assert_eq!(finder.repeats().len(), expected.len());
        for (got, want) in finder.repeats().iter().zip(&expected) {
            assert_eq!(got.again, want.again);
            assert_eq!(
                (got.first.spi, got.first.dst),
                (want.first.spi, want.first.dst)
            );
        }
        assert_eq!(finder.packets(), 8);
        assert_eq!(finder.spis(), 2);
        let runs = &finder.runs[&(packets[0].dst, 1)];
        assert_eq!(runs.len(), 1, "{runs:?}");
        // a million consecutive numbers are one run
        let mut big = RepeatFinder::default();
        let mut p = packets[0];
        for seq in 1..1_000_000 {
            p.seq = seq;
            big.see(p);
        }
        assert_eq!(big.runs[&(p.dst, 1)].len(), 1);
        assert!(big.repeats().is_empty());
    }

    #[test]
    fn garbage_is_an_error_or_nothing_never_a_panic() {
        assert!(parse_pcap(b"not a pcap file at all, no").is_err());
        assert!(parse_pcap(&[]).expect("empty").is_empty());
        let mut bytes = pcap(&[frame(50, &esp(1, 1))]);
        for cut in 0..bytes.len() {
            let _ = parse_pcap(&bytes[..cut]);
        }
        bytes[24 + 8] = 0xff; // a record longer than the file
        assert!(parse_pcap(&bytes).expect("pcap").is_empty());
    }
}
