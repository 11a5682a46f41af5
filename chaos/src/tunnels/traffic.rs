//! Real traffic in every tunnel, measured where the end-users are: a voice-like UDP stream both
//! ways per client, and paced TCP bulk from the server to some clients.
//!
//! ```text
//!  sender thread (1 ms slots)                     receiver thread (tokio, one task per socket)
//!   ├─ server socket ─► client inner:5004 (down)    ├─ client socket: down stream c ─► gaps, loss
//!   └─ client socket ─► server:5004 (up)            └─ server socket: up stream of every client
//!  every socket is created in its host's namespace (server, client c) and stays there, so one
//!  process — one clock — sees both ends of every stream
//!
//!  TCP bulk: server ns listener :5001 ─ paced writes (2.5 KB / 10 ms) ─► client ns reader
//!            (the time between two reads that made progress is the stall)
//! ```
//!
//! A voice stream is G.711 over RTP in shape: 50 packets a second of 172 bytes (160 bytes of
//! audio + 12 of RTP header), each carrying its stream, sequence number and send time. The
//! receiver keeps, per stream, the gaps longer than [`GAP_THRESHOLD_MS`], the sequence numbers
//! lost and seen twice; the interruption a fault caused to a stream is its longest gap in the
//! fault's window minus the 20 ms spacing. Nothing is kept per packet except for the streams
//! named as calls (for the E-model).
//!
//! A gap is what the network did to the stream, not what the measuring process did: arrivals
//! are stamped by the kernel when they reach the socket (`SO_TIMESTAMPNS`), not when a busy
//! receiver task gets to them, and the gap between two packets in sequence order is the
//! schedule they span (20 ms per sequence number, so lost packets count) plus the rise in
//! one-way delay (send stamp to kernel arrival stamp), so a sender thread that woke late and
//! caught up does not count either. Lost packets are counted from the sequence numbers.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use evpc_dataplane::netns::NetNs;
use serde::Serialize;

/// UDP port of the voice streams, on the server and on every client.
pub const VOICE_PORT: u16 = 5004;
/// TCP port of the bulk transfers on the server.
pub const BULK_PORT: u16 = 5001;
/// Milliseconds between two packets of a voice stream (50 a second).
pub const SPACING_MS: f64 = 20.0;
/// UDP payload of a voice packet: 160 bytes of G.711 audio (20 ms at 8 kHz) + 12 of RTP.
pub const VOICE_PAYLOAD: usize = 172;
/// Gaps between arrivals longer than this are kept (twice the spacing: one late packet is
/// jitter, not an interruption).
pub const GAP_THRESHOLD_MS: f64 = 2.0 * SPACING_MS;
/// Bytes a bulk sender writes per [`BULK_TICK`]: 2 Mbit/s per flow, so a few hundred flows do
/// not take the two cores the cluster is measured on.
const BULK_CHUNK: usize = 2_500;
const BULK_TICK: Duration = Duration::from_millis(10);
/// Gaps between reads that made progress longer than this are kept.
const BULK_GAP_THRESHOLD_MS: f64 = 50.0;
const MAGIC: [u8; 4] = *b"EVPV";

/// Wall-clock milliseconds since the Unix epoch, with sub-millisecond precision: the same
/// clock as the wire capture's timestamps.
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// A time without packets (or without progress) longer than the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Gap {
    /// The last arrival before it.
    pub from_ms: f64,
    /// The first arrival after it (or when the measurement stopped).
    pub to_ms: f64,
}

impl Gap {
    /// Its length.
    pub fn ms(&self) -> f64 {
        self.to_ms - self.from_ms
    }
}

/// Packets a stream lost at a moment: sequence numbers skipped when a later one arrived
/// (positive), or one of them arriving late after all (-1).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Loss {
    /// When it was noticed (the arrival that skipped or filled in).
    pub at_ms: f64,
    /// How many.
    pub count: i64,
}

/// What the receiver saw of one voice stream.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamStats {
    pub sent: u64,
    pub received: u64,
    /// Sequence numbers seen twice (a replay the client's anti-replay should have dropped).
    pub duplicates: u64,
    /// Packets that arrived after a later one.
    pub reordered: u64,
    pub first_ms: Option<f64>,
    pub last_ms: Option<f64>,
    pub gaps: Vec<Gap>,
    /// Sequence numbers skipped (and filled in late), as they were noticed.
    pub losses: Vec<Loss>,
    #[serde(skip)]
    highest: Option<u64>,
    /// One-way delay of the highest sequence number so far.
    #[serde(skip)]
    delay_ms: Option<f64>,
    #[serde(skip)]
    seen: SeqWindow,
    /// (sequence, sent, received) of every packet, for the streams kept as calls.
    #[serde(skip)]
    pub samples: Option<Vec<(u64, f64, f64)>>,
}

/// The sequence numbers seen recently (for duplicates), bounded.
#[derive(Clone, Debug, Default)]
struct SeqWindow(BTreeSet<u64>);

impl SeqWindow {
    const KEEP: u64 = 4_096;

    /// Whether `seq` is new; remembers it.
    fn insert(&mut self, seq: u64, highest: u64) -> bool {
        let fresh = self.0.insert(seq);
        while let Some(&oldest) = self.0.first() {
            if oldest + Self::KEEP >= highest {
                break;
            }
            self.0.pop_first();
        }
        fresh
    }
}

impl StreamStats {
    fn arrived(&mut self, seq: u64, sent_ms: f64, at_ms: f64) {
        let highest = self.highest.map_or(seq, |h| h.max(seq));
        if !self.seen.insert(seq, highest) {
            self.duplicates += 1;
            return;
        }
        self.received += 1;
        let delay = at_ms - sent_ms;
        match self.highest {
            Some(h) if seq < h => {
                // counted as lost when a later one came first
                self.reordered += 1;
                self.losses.push(Loss { at_ms, count: -1 });
            }
            Some(h) => {
                let skipped = seq - h - 1;
                if skipped > 0 {
                    self.losses.push(Loss {
                        at_ms,
                        count: i64::try_from(skipped).unwrap_or(i64::MAX),
                    });
                }
                let gap = (seq - h) as f64 * SPACING_MS + (delay - self.delay_ms.unwrap_or(delay));
                if gap > GAP_THRESHOLD_MS {
                    self.gaps.push(Gap {
                        from_ms: at_ms - gap,
                        to_ms: at_ms,
                    });
                }
                self.delay_ms = Some(delay);
            }
            None => self.delay_ms = Some(delay),
        }
        self.highest = Some(highest);
        self.first_ms.get_or_insert(at_ms);
        self.last_ms = Some(at_ms);
        if let Some(samples) = &mut self.samples {
            samples.push((seq, sent_ms, at_ms));
        }
    }

    /// Packets lost (and not arrived late after all) noticed in `[from, to]`.
    pub fn lost_in(&self, from_ms: f64, to_ms: f64) -> u64 {
        let lost: i64 = self
            .losses
            .iter()
            .filter(|l| l.at_ms >= from_ms && l.at_ms <= to_ms)
            .map(|l| l.count)
            .sum();
        lost.max(0).unsigned_abs()
    }

    /// The longest gap overlapping `[from, to]` minus the stream's spacing: the interruption
    /// the stream saw in that window (0 if none).
    pub fn interruption_ms(&self, from_ms: f64, to_ms: f64) -> f64 {
        self.gaps
            .iter()
            .filter(|g| g.to_ms >= from_ms && g.from_ms <= to_ms)
            .map(|g| (g.ms() - SPACING_MS).max(0.0))
            .fold(0.0, f64::max)
    }
}

/// What the receiver saw of one TCP bulk flow.
#[derive(Clone, Debug, Default, Serialize)]
pub struct BulkStats {
    pub bytes: u64,
    pub first_ms: Option<f64>,
    pub last_ms: Option<f64>,
    pub stalls: Vec<Gap>,
    /// Why the flow ended before the measurement did, if it did.
    pub error: Option<String>,
}

impl BulkStats {
    /// The longest time without progress overlapping `[from, to]` (0 if none).
    pub fn stall_ms(&self, from_ms: f64, to_ms: f64) -> f64 {
        self.stalls
            .iter()
            .filter(|g| g.to_ms >= from_ms && g.from_ms <= to_ms)
            .map(Gap::ms)
            .fold(0.0, f64::max)
    }
}

/// One client's end of the traffic.
#[derive(Debug)]
pub struct ClientEnd<'a> {
    /// Its host's namespace.
    pub ns: &'a NetNs,
    /// Its inner address (from the cluster's pool).
    pub inner: Ipv4Addr,
    /// Also run a TCP bulk flow from the server to it.
    pub bulk: bool,
    /// Keep every packet of its downstream voice stream (for the E-model).
    pub call: bool,
}

/// Shared between the threads.
#[derive(Debug, Default)]
struct Books {
    /// Indexed by `2 × client + (0 down | 1 up)`.
    streams: Vec<StreamStats>,
    bulk: Vec<Option<BulkStats>>,
}

/// The running traffic; [`Traffic::stop`] ends it and hands over what was measured.
#[derive(Debug)]
pub struct Traffic {
    books: Arc<Mutex<Books>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    clients: usize,
}

/// Everything measured, per client.
#[derive(Debug, Serialize)]
pub struct Measured {
    pub down: Vec<StreamStats>,
    pub up: Vec<StreamStats>,
    pub bulk: Vec<Option<BulkStats>>,
}

fn voice_packet(stream: u32, seq: u64, buf: &mut [u8; VOICE_PAYLOAD]) {
    buf[..4].copy_from_slice(&MAGIC);
    buf[4..8].copy_from_slice(&stream.to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    buf[16..24].copy_from_slice(&now_ms().to_bits().to_be_bytes());
}

fn parse_voice(bytes: &[u8]) -> Option<(u32, u64, f64)> {
    if bytes.len() != VOICE_PAYLOAD || bytes[..4] != MAGIC {
        return None;
    }
    let stream = u32::from_be_bytes(bytes[4..8].try_into().ok()?);
    let seq = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
    let sent = f64::from_bits(u64::from_be_bytes(bytes[16..24].try_into().ok()?));
    Some((stream, seq, sent))
}

/// A UDP socket bound in `ns` to `addr`.
fn udp_in(ns: &NetNs, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = ns
        .run(move || UdpSocket::bind(addr))?
        .with_context(|| format!("binding UDP {addr} in {}", ns.name()))?;
    Ok(socket)
}

impl Traffic {
    /// Starts the voice streams of every client (and the bulk flows of those that ask) against
    /// the server in `server`.
    pub fn start(server: &NetNs, clients: &[ClientEnd<'_>]) -> anyhow::Result<Traffic> {
        let n = clients.len();
        let books = Arc::new(Mutex::new(Books {
            streams: (0..2 * n)
                .map(|i| StreamStats {
                    samples: (i % 2 == 0 && clients[i / 2].call).then(Vec::new),
                    ..StreamStats::default()
                })
                .collect(),
            bulk: vec![None; n],
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let server_socket = udp_in(
            server,
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, VOICE_PORT)),
        )?;
        let mut client_sockets = Vec::with_capacity(n);
        for c in clients {
            client_sockets.push(udp_in(
                c.ns,
                SocketAddr::from((Ipv4Addr::UNSPECIFIED, VOICE_PORT)),
            )?);
        }
        let listener = server
            .run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, BULK_PORT)))?
            .context("binding the bulk listener in the server's namespace")?;
        let mut bulk_streams = Vec::new();
        for (i, c) in clients.iter().enumerate().filter(|(_, c)| c.bulk) {
            let target = SocketAddr::from((super::SERVER, BULK_PORT));
            // As an application would: a few tries. (The first connection through a tunnel set
            // up a moment before sometimes gets no answer for its whole first try; not yet
            // understood, see the issue notes.)
            let stream = c
                .ns
                .run(move || {
                    let mut last = None;
                    for _ in 0..3 {
                        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                            Ok(stream) => return Ok(stream),
                            Err(e) => {
                                tracing::info!(client = i, error = %e, "bulk flow: connecting again");
                                last = Some(e)
                            }
                        }
                    }
                    Err(last.expect("tried"))
                })?
                .with_context(|| format!("client {i}: connecting the bulk flow"))?;
            bulk_streams.push((i, stream));
        }

        let mut threads = Vec::new();
        // The sender: every stream once per 20 ms, spread over 1 ms slots.
        {
            let (stop, books) = (stop.clone(), books.clone());
            let server_send = server_socket.try_clone()?;
            let client_send: Vec<UdpSocket> = client_sockets
                .iter()
                .map(UdpSocket::try_clone)
                .collect::<Result<_, _>>()?;
            let targets: Vec<SocketAddr> = clients
                .iter()
                .map(|c| SocketAddr::from((c.inner, VOICE_PORT)))
                .collect();
            threads.push(
                std::thread::Builder::new()
                    .name("voice-send".into())
                    .spawn(move || {
                        send_voice(&stop, &books, &server_send, &client_send, &targets)
                    })?,
            );
        }
        // The receivers and the bulk flows, on one runtime.
        {
            let (stop, books) = (stop.clone(), books.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("traffic-recv".into())
                    .spawn(move || {
                        let runtime = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(r) => r,
                            Err(e) => {
                                eprintln!("tunnels: no runtime for the receivers: {e}");
                                return;
                            }
                        };
                        runtime.block_on(receive_all(
                            stop,
                            books,
                            server_socket,
                            client_sockets,
                            listener,
                            bulk_streams,
                        ));
                    })?,
            );
        }
        Ok(Traffic {
            books,
            stop,
            threads,
            clients: n,
        })
    }

    /// A copy of one client's downstream stream as measured so far.
    pub fn down(&self, client: usize) -> StreamStats {
        let books = self.books.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = books.streams[2 * client].clone();
        s.samples = None;
        s
    }

    /// Stops the traffic, waits for the last packets in flight, and returns the books.
    pub fn stop(mut self) -> Measured {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let end = now_ms();
        let mut books = std::mem::take(&mut *self.books.lock().unwrap_or_else(|e| e.into_inner()));
        // A stream that stopped for good has a last gap up to the end.
        for s in &mut books.streams {
            if let Some(last) = s.last_ms
                && end - last > GAP_THRESHOLD_MS + 250.0
            {
                s.gaps.push(Gap {
                    from_ms: last,
                    to_ms: end,
                });
            }
        }
        for b in books.bulk.iter_mut().flatten() {
            if let Some(last) = b.last_ms
                && end - last > BULK_GAP_THRESHOLD_MS + 250.0
            {
                b.stalls.push(Gap {
                    from_ms: last,
                    to_ms: end,
                });
            }
        }
        let mut down = Vec::with_capacity(self.clients);
        let mut up = Vec::with_capacity(self.clients);
        for (i, s) in books.streams.into_iter().enumerate() {
            if i % 2 == 0 {
                down.push(s);
            } else {
                up.push(s);
            }
        }
        Measured {
            down,
            up,
            bulk: books.bulk,
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn send_voice(
    stop: &AtomicBool,
    books: &Mutex<Books>,
    server: &UdpSocket,
    clients: &[UdpSocket],
    targets: &[SocketAddr],
) {
    let upstream = SocketAddr::from((super::SERVER, VOICE_PORT));
    let slots = SPACING_MS as usize;
    let mut seq = 0u64;
    let mut buf = [0u8; VOICE_PAYLOAD];
    let started = std::time::Instant::now();
    let mut tick = 0u64;
    while !stop.load(Ordering::Acquire) {
        let slot = (tick % slots as u64) as usize;
        if slot == 0 && tick > 0 {
            seq += 1;
        }
        let mut sent = 0u64;
        for (i, target) in targets.iter().enumerate().skip(slot).step_by(slots) {
            voice_packet((2 * i) as u32, seq, &mut buf);
            if server.send_to(&buf, target).is_ok() {
                sent += 1;
            }
            voice_packet((2 * i + 1) as u32, seq, &mut buf);
            if clients[i].send_to(&buf, upstream).is_ok() {
                sent += 1;
            }
        }
        if sent > 0 {
            let mut books = books.lock().unwrap_or_else(|e| e.into_inner());
            for i in (slot..targets.len()).step_by(slots) {
                books.streams[2 * i].sent = seq + 1;
                books.streams[2 * i + 1].sent = seq + 1;
            }
        }
        tick += 1;
        let next = started + Duration::from_millis(tick);
        if let Some(wait) = next.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}

/// Reads one datagram without blocking, with the kernel's arrival stamp (`SO_TIMESTAMPNS`,
/// wall clock, ms) if `stamped`.
fn recv_stamped(
    socket: &tokio::net::UdpSocket,
    buf: &mut [u8],
    stamped: bool,
) -> std::io::Result<(usize, Option<f64>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::AsRawFd;
    if !stamped {
        return socket.try_recv(buf).map(|n| (n, None));
    }
    let mut space = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let message = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let at = message.cmsgs().ok().and_then(|mut cmsgs| {
        cmsgs.find_map(|c| match c {
            ControlMessageOwned::ScmTimestampns(t) => {
                Some(t.tv_sec() as f64 * 1e3 + t.tv_nsec() as f64 / 1e6)
            }
            _ => None,
        })
    });
    Ok((message.bytes, at))
}

async fn receive_all(
    stop: Arc<AtomicBool>,
    books: Arc<Mutex<Books>>,
    server: UdpSocket,
    clients: Vec<UdpSocket>,
    listener: TcpListener,
    bulk: Vec<(usize, TcpStream)>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let mut sockets = vec![server];
    sockets.extend(clients);
    for socket in sockets {
        let books = books.clone();
        tasks.spawn(async move {
            let Ok(()) = socket.set_nonblocking(true) else {
                return;
            };
            // (without kernel stamps, the time the task read it)
            let stamped = nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::ReceiveTimestampns,
                &true,
            )
            .is_ok();
            let Ok(socket) = tokio::net::UdpSocket::from_std(socket) else {
                return;
            };
            let mut buf = [0u8; 2048];
            loop {
                let received = socket
                    .async_io(tokio::io::Interest::READABLE, || {
                        recv_stamped(&socket, &mut buf, stamped)
                    })
                    .await;
                let Ok((n, at)) = received else { break };
                let at = at.unwrap_or_else(now_ms);
                if let Some((stream, seq, sent)) = parse_voice(&buf[..n]) {
                    let mut books = books.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(s) = books.streams.get_mut(stream as usize) {
                        s.arrived(seq, sent, at);
                    }
                }
            }
        });
    }
    // The server side of the bulk flows: accept each, write paced chunks until stopped.
    {
        let stop = stop.clone();
        let wanted = bulk.len();
        tasks.spawn(async move {
            let Ok(()) = listener.set_nonblocking(true) else {
                return;
            };
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            let mut writers = tokio::task::JoinSet::new();
            for _ in 0..wanted {
                let Ok((stream, _)) = listener.accept().await else {
                    break;
                };
                let stop = stop.clone();
                writers.spawn(async move {
                    use tokio::io::AsyncWriteExt;
                    let mut stream = stream;
                    let chunk = vec![0x5au8; BULK_CHUNK];
                    let mut ticks = tokio::time::interval(BULK_TICK);
                    while !stop.load(Ordering::Acquire) {
                        ticks.tick().await;
                        if stream.write_all(&chunk).await.is_err() {
                            break;
                        }
                    }
                });
            }
            while writers.join_next().await.is_some() {}
        });
    }
    for (client, stream) in bulk {
        let books = books.clone();
        tasks.spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut stats = BulkStats::default();
            let result: std::io::Result<()> = async {
                stream.set_nonblocking(true)?;
                let mut stream = tokio::net::TcpStream::from_std(stream)?;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = stream.read(&mut buf).await?;
                    if n == 0 {
                        return Err(std::io::Error::other("the server closed the flow"));
                    }
                    let at = now_ms();
                    if let Some(last) = stats.last_ms
                        && at - last > BULK_GAP_THRESHOLD_MS
                    {
                        stats.stalls.push(Gap {
                            from_ms: last,
                            to_ms: at,
                        });
                    }
                    stats.first_ms.get_or_insert(at);
                    stats.last_ms = Some(at);
                    stats.bytes += n as u64;
                    // Published as it goes, so a reader mid-run sees progress.
                    books.lock().unwrap_or_else(|e| e.into_inner()).bulk[client] =
                        Some(stats.clone());
                }
            }
            .await;
            if let Err(e) = result {
                stats.error = Some(e.to_string());
            }
            books.lock().unwrap_or_else(|e| e.into_inner()).bulk[client] = Some(stats);
        });
    }
    while !stop.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The last packets in flight.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tasks.abort_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_voice_packet_round_trips() {
        let mut buf = [0u8; VOICE_PAYLOAD];
        voice_packet(7, 42, &mut buf);
        let (stream, seq, sent) = parse_voice(&buf).unwrap();
        assert_eq!((stream, seq), (7, 42));
        assert!((now_ms() - sent).abs() < 1_000.0);
        assert_eq!(parse_voice(&buf[..100]), None);
        let mut other = buf;
        other[0] = b'X';
        assert_eq!(parse_voice(&other), None);
    }

    #[test]
    fn gaps_duplicates_and_reordering_are_counted_and_interruptions_measured() {
        let mut s = StreamStats::default();
        let mut t = 1_000.0;
        for seq in 0..10 {
            s.arrived(seq, t, t);
            t += 20.0;
        }
        // 400 ms without packets, then the stream goes on
        t += 400.0;
        for seq in 30..35 {
            s.arrived(seq, t, t);
            t += 20.0;
        }
        s.arrived(33, t, t); // seen twice
        s.arrived(29, t, t); // late
        assert_eq!(s.duplicates, 1);
        assert_eq!(s.reordered, 1);
        assert_eq!(s.received, 16);
        assert_eq!(s.gaps.len(), 1);
        let gap = s.gaps[0];
        assert!((gap.ms() - 420.0).abs() < 1e-9, "{gap:?}");
        assert!((s.interruption_ms(1_100.0, 1_300.0) - 400.0).abs() < 1e-9);
        assert_eq!(s.interruption_ms(2_000.0, 3_000.0), 0.0);
        // 20 skipped (10..30), one of them late after all
        assert_eq!(s.lost_in(0.0, 10_000.0), 19);
        assert_eq!(s.lost_in(0.0, 1_000.0), 0);
    }

    #[test]
    fn packets_held_then_delivered_are_an_interruption_a_late_sender_is_not() {
        // A network that holds the stream 150 ms and then delivers it all: one gap, no loss.
        let mut s = StreamStats::default();
        let mut sent = 1_000.0;
        for seq in 0..10 {
            s.arrived(seq, sent, sent + 1.0);
            sent += 20.0;
        }
        let released = sent + 150.0;
        for seq in 10..18 {
            s.arrived(seq, sent, released.max(sent + 1.0));
            sent += 20.0;
        }
        assert_eq!(s.gaps.len(), 1, "{:?}", s.gaps);
        // seq 9 arrived at 1,181, seq 10 at 1,350: 169 ms apart, 149 beyond the spacing
        let interruption = s.interruption_ms(0.0, 10_000.0);
        assert!((interruption - 149.0).abs() < 1e-9, "{interruption}");
        assert_eq!(s.lost_in(0.0, 10_000.0), 0);

        // A sender thread that wakes 200 ms late and sends what it owes at once: no gap.
        let mut s = StreamStats::default();
        let mut at = 1_000.0;
        for seq in 0..10 {
            s.arrived(seq, at, at + 1.0);
            at += 20.0;
        }
        at += 200.0;
        for seq in 10..20 {
            s.arrived(seq, at, at + 1.0);
            at += 0.01;
        }
        assert!(s.gaps.is_empty(), "{:?}", s.gaps);
        assert_eq!(s.lost_in(0.0, 10_000.0), 0);
    }

    #[test]
    fn the_duplicate_window_stays_bounded() {
        let mut s = StreamStats::default();
        for seq in 0..20_000 {
            s.arrived(seq, 0.0, seq as f64 * 20.0);
        }
        assert!(s.seen.0.len() <= SeqWindow::KEEP as usize + 1);
        assert_eq!(s.duplicates, 0);
    }
}
