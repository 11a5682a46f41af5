//! The cluster-address UDP sockets and batched datagram I/O (`recvmmsg`/`sendmmsg`), public
//! for tools (the `esp-bench` load generator uses the same batching as the data plane).
//!
//! ```text
//!  bind_udp: socket ─► IP_FREEBIND (bind the cluster address even where it is not local)
//!                   ─► SO_RCVBUF(FORCE) / SO_SNDBUF(FORCE) ─► SO_RCVTIMEO (workers look up)
//!                   ─► bind(cluster:port)
//!  recv_batch: recvmmsg(MSG_WAITFORONE): blocks for the first datagram, then takes what is queued
//!  send_batch: sendmmsg, resumed after partial sends; a message that fails is counted and skipped
//! ```

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
};

/// Datagrams moved per system call.
pub const BATCH: usize = 64;

/// How long a blocked worker waits before it looks at the shutdown flag.
pub const WAKE_INTERVAL: Duration = Duration::from_millis(100);

/// Binds a UDP socket on `addr` for the data plane: `IP_FREEBIND` if asked, send and receive
/// buffers of `buffer_bytes` (0: the system default), a read timeout of [`WAKE_INTERVAL`].
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize, freebind: bool) -> io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let context = |what: &str, e: Errno| {
        io::Error::new(io::Error::from(e).kind(), format!("{what} for {addr}: {e}"))
    };
    let fd: OwnedFd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| context("socket", e))?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(|e| context("IPV6_V6ONLY", e))?;
    }
    if freebind {
        setsockopt(&fd, sockopt::IpFreebind, &true).map_err(|e| context("IP_FREEBIND", e))?;
    }
    if buffer_bytes > 0 {
        // The FORCE variants ignore net.core.{r,w}mem_max but need CAP_NET_ADMIN.
        if setsockopt(&fd, sockopt::RcvBufForce, &buffer_bytes).is_err() {
            setsockopt(&fd, sockopt::RcvBuf, &buffer_bytes).map_err(|e| context("SO_RCVBUF", e))?;
        }
        if setsockopt(&fd, sockopt::SndBufForce, &buffer_bytes).is_err() {
            setsockopt(&fd, sockopt::SndBuf, &buffer_bytes).map_err(|e| context("SO_SNDBUF", e))?;
        }
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr)).map_err(|e| context("bind", e))?;
    let socket = UdpSocket::from(fd);
    socket.set_read_timeout(Some(WAKE_INTERVAL))?;
    Ok(socket)
}

/// A set of [`BATCH`] equally sized datagram buffers in one allocation.
#[derive(Debug)]
pub struct Buffers {
    bytes: Vec<u8>,
    size: usize,
}

impl Buffers {
    /// `BATCH` buffers of `size` bytes each.
    pub fn new(size: usize) -> Buffers {
        Buffers {
            bytes: vec![0; size * BATCH],
            size,
        }
    }

    /// Buffer `index`.
    pub fn get(&self, index: usize) -> &[u8] {
        &self.bytes[index * self.size..(index + 1) * self.size]
    }

    /// Buffer `index`, to fill or to open in place.
    pub fn get_mut(&mut self, index: usize) -> &mut [u8] {
        &mut self.bytes[index * self.size..(index + 1) * self.size]
    }
}

/// Batched receiving: after each [`Receiver::recv`], the received datagrams' lengths, senders
/// and UDP GRO segment sizes.
#[derive(Debug)]
pub struct Receiver {
    names: Box<[sys::Name; BATCH]>,
    controls: Box<[sys::Control; BATCH]>,
    pub(crate) lens: [usize; BATCH],
    pub(crate) from: [Option<SocketAddr>; BATCH],
    pub(crate) truncated: [bool; BATCH],
    /// UDP GRO segment size of each datagram (0: a single datagram).
    pub(crate) segment: [usize; BATCH],
}

impl Default for Receiver {
    fn default() -> Receiver {
        Receiver::new()
    }
}

impl Receiver {
    /// Room for [`BATCH`] datagrams' addresses and control messages.
    pub fn new() -> Receiver {
        Receiver {
            names: Box::new([sys::Name::default(); BATCH]),
            controls: Box::new([sys::Control::default(); BATCH]),
            lens: [0; BATCH],
            from: [None; BATCH],
            truncated: [false; BATCH],
            segment: [0; BATCH],
        }
    }

    /// Receives up to `BATCH` datagrams into `buffers` (`recvmmsg` with `MSG_WAITFORONE`):
    /// blocks (up to the socket's read timeout) for the first, then takes whatever else is
    /// queued. Returns how many arrived; `Ok(0)` on timeout or interruption.
    pub fn recv(&mut self, socket: &UdpSocket, buffers: &mut Buffers) -> io::Result<usize> {
        let mut results = [sys::Received::default(); BATCH];
        let count = match sys::recvmmsg(
            socket,
            buffers,
            &mut self.names,
            &mut self.controls,
            &mut results,
        ) {
            Ok(count) => count,
            Err(Errno::EAGAIN | Errno::EINTR) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        for (index, result) in results[..count].iter().enumerate() {
            self.lens[index] = result.len;
            self.from[index] = self.names[index].address(result.name_len);
            self.truncated[index] = result.flags & libc::MSG_TRUNC != 0;
            self.segment[index] = self.controls[index].gro_segment(result.control_len);
        }
        Ok(count)
    }

    /// Length of received datagram `index` (in buffer `index`).
    pub fn len(&self, index: usize) -> usize {
        self.lens[index]
    }

    /// Sender of received datagram `index`.
    pub fn from(&self, index: usize) -> Option<SocketAddr> {
        self.from[index]
    }

    /// The datagrams in buffer `index`: one, or several of the GRO segment size (the last may
    /// be shorter) when the socket has UDP GRO on ([`enable_gro`]).
    pub fn segments<'b>(
        &self,
        index: usize,
        buffer: &'b mut [u8],
    ) -> std::slice::ChunksMut<'b, u8> {
        let len = self.lens[index].min(buffer.len());
        let size = match self.segment[index] {
            0 => len.max(1),
            size => size,
        };
        buffer[..len].chunks_mut(size)
    }
}

/// Asks the kernel to coalesce consecutive datagrams of one flow into one receive (`UDP_GRO`,
/// Linux 5.0): fewer trips through the stack per packet. Returns whether it is on.
pub fn enable_gro(socket: &UdpSocket) -> bool {
    setsockopt(socket, sockopt::UdpGroSegment, &true).is_ok()
}

/// The most segments one UDP GSO send may carry (`UDP_MAX_SEGMENTS` in Linux before 6.x).
const GSO_MAX_SEGMENTS: usize = 64;
/// The most payload bytes one UDP GSO send may carry (an IP packet's 65,535 bytes, less the
/// IPv6 and UDP headers).
const GSO_MAX_BYTES: usize = 65_535 - 40 - 8;

/// Sends `messages` like [`send_batch`], but hands runs of equally sized datagrams for the same
/// peer to the kernel as one UDP GSO send (`UDP_SEGMENT`, Linux 4.18): the kernel builds and
/// routes one large packet and cuts it into datagrams at the device or in the NIC. `gso` says
/// whether to try; it is cleared (and the batch sent datagram by datagram) if the kernel or the
/// route refuses.
pub fn send_batch_gso(
    socket: &UdpSocket,
    buffers: &Buffers,
    messages: &[Outgoing],
    gso: &mut bool,
) -> (usize, usize) {
    if !*gso {
        return send_batch(socket, buffers, messages);
    }
    // runs: [start, end) of `messages` sent as one GSO datagram
    let mut runs = [(0usize, 0usize); BATCH];
    let mut count = 0;
    let mut at = 0;
    // at most BATCH datagrams per call: one iovec each
    let limit = messages.len().min(BATCH);
    while at < limit {
        let first = &messages[at];
        let mut end = at + 1;
        let mut bytes = first.len;
        while end < limit
            && end - at < GSO_MAX_SEGMENTS
            && messages[end].to == first.to
            && messages[end].len <= first.len
            && bytes + messages[end].len <= GSO_MAX_BYTES
        {
            bytes += messages[end].len;
            end += 1;
            if messages[end - 1].len < first.len {
                break; // only the last segment may be shorter
            }
        }
        runs[count] = (at, end);
        count += 1;
        at = end;
    }
    let mut sent = 0;
    let mut failed = 0;
    let mut done = 0;
    while done < count {
        match sys::sendmmsg_gso(socket, buffers, messages, &runs[done..count]) {
            Ok(n) if n > 0 => {
                for &(start, end) in &runs[done..done + n] {
                    sent += end - start;
                }
                done += n;
            }
            Err(Errno::EINTR) => {}
            Ok(_) | Err(Errno::EIO | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT) => {
                // no GSO on this kernel or route: from now on, one datagram at a time
                *gso = false;
                let (start, _) = runs[done];
                let (s, f) = send_batch(socket, buffers, &messages[start..]);
                return (sent + s, failed + f);
            }
            Err(_) => {
                let (start, end) = runs[done];
                failed += end - start;
                done += 1;
            }
        }
    }
    if at < messages.len() {
        let (s, f) = send_batch_gso(socket, buffers, &messages[at..], gso);
        sent += s;
        failed += f;
    }
    (sent, failed)
}

/// One datagram to send: `buffers.get(buffer)[..len]` to `to`.
#[derive(Copy, Clone, Debug)]
pub struct Outgoing {
    pub(crate) buffer: usize,
    pub(crate) len: usize,
    pub(crate) to: SockaddrStorage,
}

impl Outgoing {
    /// The first `len` bytes of buffer `buffer`, to `to`.
    pub fn new(buffer: usize, len: usize, to: SocketAddr) -> Outgoing {
        Outgoing {
            buffer,
            len,
            to: SockaddrStorage::from(to),
        }
    }
}

/// Sends `messages` with as few `sendmmsg` calls as the kernel allows. Returns how many went
/// out and how many failed (each failure is skipped, so one unreachable peer does not block
/// the others).
pub fn send_batch(socket: &UdpSocket, buffers: &Buffers, messages: &[Outgoing]) -> (usize, usize) {
    let mut sent = 0;
    let mut failed = 0;
    let mut at = 0;
    while at < messages.len() {
        match sys::sendmmsg(socket, buffers, &messages[at..]) {
            Ok(0) => {
                failed += 1;
                at += 1;
            }
            Ok(n) => {
                sent += n;
                at += n;
            }
            Err(Errno::EINTR) => {}
            Err(_) => {
                // sendmmsg reports an error only when the first message failed
                failed += 1;
                at += 1;
            }
        }
    }
    (sent, failed)
}

mod sys {
    //! The `sendmmsg(2)` and `recvmmsg(2)` calls. (nix's wrappers are not used: reading their
    //! `sendmmsg` results back touches never-initialized address slots, and its `recvmmsg`
    //! leaves `msg_controllen` at whatever the previous call returned, so after one datagram
    //! without a control message no UDP GRO segment size would ever be seen again.)

    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;
    use nix::sys::socket::SockaddrLike;

    use super::{BATCH, Buffers, Outgoing};

    /// Room for one `struct sockaddr_storage`.
    #[repr(C, align(8))]
    #[derive(Copy, Clone, Debug)]
    pub(super) struct Name([u8; 128]);

    impl Default for Name {
        fn default() -> Name {
            Name([0; 128])
        }
    }

    impl Name {
        /// The IPv4 or IPv6 socket address the kernel wrote (`sockaddr_in`, `sockaddr_in6`).
        pub(super) fn address(&self, len: usize) -> Option<SocketAddr> {
            let b = &self.0;
            let family = i32::from(u16::from_ne_bytes([b[0], b[1]]));
            let port = u16::from_be_bytes([b[2], b[3]]);
            if family == libc::AF_INET && len >= 16 {
                Some(SocketAddr::from((
                    Ipv4Addr::new(b[4], b[5], b[6], b[7]),
                    port,
                )))
            } else if family == libc::AF_INET6 && len >= 28 {
                let mut addr = [0u8; 16];
                addr.copy_from_slice(&b[8..24]);
                let flow = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                let scope = u32::from_ne_bytes([b[24], b[25], b[26], b[27]]);
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(addr),
                    port,
                    flow,
                    scope,
                )))
            } else {
                None
            }
        }
    }

    /// Room for the control messages of one datagram (UDP_GRO's is `CMSG_SPACE(4)` = 24).
    #[repr(C, align(8))]
    #[derive(Copy, Clone, Debug)]
    pub(super) struct Control([u8; 64]);

    impl Default for Control {
        fn default() -> Control {
            Control([0; 64])
        }
    }

    impl Control {
        /// The segment size of a `UDP_GRO` control message among the first `len` bytes.
        pub(super) fn gro_segment(&self, len: usize) -> usize {
            let header = size_of::<libc::cmsghdr>();
            let mut at = 0;
            let bytes = &self.0[..len.min(self.0.len())];
            while at + header <= bytes.len() {
                let cmsg_len =
                    usize::from_ne_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
                let level =
                    i32::from_ne_bytes(bytes[at + 8..at + 12].try_into().unwrap_or_default());
                let kind =
                    i32::from_ne_bytes(bytes[at + 12..at + 16].try_into().unwrap_or_default());
                if cmsg_len < header || at + cmsg_len > bytes.len() {
                    break;
                }
                if level == libc::SOL_UDP && kind == libc::UDP_GRO && cmsg_len >= header + 4 {
                    let data = &bytes[at + header..at + header + 4];
                    return usize::try_from(i32::from_ne_bytes(
                        data.try_into().unwrap_or_default(),
                    ))
                    .unwrap_or(0);
                }
                at += cmsg_len.div_ceil(8) * 8;
            }
            0
        }
    }

    /// What the kernel reported for one received datagram.
    #[derive(Copy, Clone, Debug, Default)]
    pub(super) struct Received {
        pub len: usize,
        pub name_len: usize,
        pub control_len: usize,
        pub flags: i32,
    }

    /// `recvmmsg(MSG_WAITFORONE)` into `buffers`, the senders into `names`, control messages
    /// into `controls`.
    pub(super) fn recvmmsg(
        socket: &UdpSocket,
        buffers: &mut Buffers,
        names: &mut [Name; BATCH],
        controls: &mut [Control; BATCH],
        results: &mut [Received; BATCH],
    ) -> Result<usize, Errno> {
        let size = buffers.size;
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        for (iovec, chunk) in iovecs.iter_mut().zip(buffers.bytes.chunks_exact_mut(size)) {
            *iovec = libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            };
        }
        let mut headers = [libc::mmsghdr {
            msg_hdr: libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: std::ptr::null_mut(),
                msg_iovlen: 0,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            },
            msg_len: 0,
        }; BATCH];
        for (index, header) in headers.iter_mut().enumerate() {
            let h = &mut header.msg_hdr;
            h.msg_name = names[index].0.as_mut_ptr().cast();
            h.msg_namelen = names[index].0.len() as libc::socklen_t;
            h.msg_iov = &mut iovecs[index];
            h.msg_iovlen = 1;
            h.msg_control = controls[index].0.as_mut_ptr().cast();
            h.msg_controllen = controls[index].0.len();
        }
        #[allow(unsafe_code)]
        // SAFETY: each of the BATCH `mmsghdr`s points to one `iovec` describing a distinct,
        // exclusively borrowed chunk of `buffers`, to a 128-byte (sockaddr_storage-sized) name
        // buffer and a 64-byte control buffer of its own, all 8-byte aligned and alive for the
        // call; the kernel writes at most the stated lengths into them and the lengths back
        // into the headers. No timeout pointer is passed.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let count = Errno::result(received)? as usize;
        for (result, header) in results.iter_mut().zip(&headers[..count]) {
            *result = Received {
                len: header.msg_len as usize,
                name_len: header.msg_hdr.msg_namelen as usize,
                control_len: header.msg_hdr.msg_controllen,
                flags: header.msg_hdr.msg_flags,
            };
        }
        Ok(count)
    }

    /// `struct cmsghdr` followed by one `u16`, padded to `CMSG_SPACE(2)` (24 bytes on 64-bit
    /// Linux): the `UDP_SEGMENT` control message.
    #[repr(C)]
    #[derive(Copy, Clone)]
    struct SegmentCmsg {
        header: libc::cmsghdr,
        size: u16,
        _pad: [u8; 6],
    }

    /// `CMSG_LEN(sizeof(u16))`.
    const SEGMENT_CMSG_LEN: usize = size_of::<libc::cmsghdr>() + size_of::<u16>();

    /// Sends each run `messages[start..end]` as one datagram of concatenated payloads, cut by
    /// the kernel into segments of the run's first length (UDP_SEGMENT). Returns how many runs
    /// the kernel took.
    pub(super) fn sendmmsg_gso(
        socket: &UdpSocket,
        buffers: &Buffers,
        messages: &[Outgoing],
        runs: &[(usize, usize)],
    ) -> Result<usize, Errno> {
        let count = runs.len().min(BATCH);
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; BATCH];
        let mut cmsgs = [SegmentCmsg {
            header: libc::cmsghdr {
                cmsg_len: SEGMENT_CMSG_LEN,
                cmsg_level: libc::SOL_UDP,
                cmsg_type: libc::UDP_SEGMENT,
            },
            size: 0,
            _pad: [0; 6],
        }; BATCH];
        let mut headers = [libc::mmsghdr {
            msg_hdr: libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: std::ptr::null_mut(),
                msg_iovlen: 0,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            },
            msg_len: 0,
        }; BATCH];
        // one iovec per datagram; the runs never hold more than BATCH datagrams together
        let mut next_iovec = 0;
        for (run, &(start, end)) in runs[..count].iter().enumerate() {
            let first_iovec = next_iovec;
            for message in &messages[start..end] {
                let bytes = &buffers.get(message.buffer)[..message.len];
                iovecs[next_iovec] = libc::iovec {
                    iov_base: bytes.as_ptr().cast_mut().cast(),
                    iov_len: bytes.len(),
                };
                next_iovec += 1;
            }
            cmsgs[run].size = messages[start].len as u16;
            let header = &mut headers[run].msg_hdr;
            header.msg_name = messages[start].to.as_ptr().cast_mut().cast();
            header.msg_namelen = messages[start].to.len();
            header.msg_iov = &mut iovecs[first_iovec];
            header.msg_iovlen = end - start;
            if end - start > 1 {
                header.msg_control = (&mut cmsgs[run] as *mut SegmentCmsg).cast();
                header.msg_controllen = size_of::<SegmentCmsg>();
            }
        }
        #[allow(unsafe_code)]
        // SAFETY: `headers[..count]` are initialized `mmsghdr`s; each `msg_name` points to a
        // socket address in `messages` of the stated length, each `msg_iov` to `msg_iovlen`
        // consecutive `iovec`s in `iovecs` describing slices of `buffers`, each `msg_control`
        // (if set) to a `SegmentCmsg` in `cmsgs` of the stated length whose header says
        // `CMSG_LEN(2)`. All outlive the call; the kernel reads them and writes only `msg_len`.
        let sent = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                headers.as_mut_ptr(),
                count as libc::c_uint,
                0,
            )
        };
        Errno::result(sent).map(|n| n as usize)
    }

    /// Sends up to `BATCH` of `messages` in one call, one datagram each (runs of one carry no
    /// segment size); returns how many the kernel took.
    pub(super) fn sendmmsg(
        socket: &UdpSocket,
        buffers: &Buffers,
        messages: &[Outgoing],
    ) -> Result<usize, Errno> {
        let mut runs = [(0usize, 0usize); BATCH];
        let count = messages.len().min(BATCH);
        for (index, run) in runs[..count].iter_mut().enumerate() {
            *run = (index, index + 1);
        }
        sendmmsg_gso(socket, buffers, messages, &runs[..count])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cross_loopback_in_both_directions() {
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), 1 << 20, false).unwrap();
        let b = bind_udp("127.0.0.1:0".parse().unwrap(), 0, true).unwrap();
        let b_addr = SockaddrStorage::from(b.local_addr().unwrap());
        let mut out = Buffers::new(128);
        let mut messages = Vec::new();
        for i in 0..BATCH {
            out.get_mut(i)[..4].copy_from_slice(&(i as u32).to_be_bytes());
            messages.push(Outgoing {
                buffer: i,
                len: 4 + (i % 7),
                to: b_addr,
            });
        }
        let (sent, failed) = send_batch(&a, &out, &messages);
        assert_eq!((sent, failed), (BATCH, 0));
        let mut receiver = Receiver::new();
        let mut inbox = Buffers::new(2048);
        let mut got = 0;
        while got < BATCH {
            let n = receiver.recv(&b, &mut inbox).unwrap();
            assert!(n > 0, "timed out after {got}");
            for k in 0..n {
                let i = got + k;
                assert_eq!(receiver.lens[k], 4 + (i % 7));
                assert_eq!(&inbox.get(k)[..4], &(i as u32).to_be_bytes());
                assert_eq!(receiver.from[k], Some(a.local_addr().unwrap()));
                assert!(!receiver.truncated[k]);
            }
            got += n;
        }
        // nothing more: the timeout returns 0
        assert_eq!(receiver.recv(&b, &mut inbox).unwrap(), 0);
    }

    #[test]
    fn gso_runs_arrive_as_the_same_datagrams_with_or_without_gro() {
        for gro in [true, false] {
            let a = bind_udp("127.0.0.1:0".parse().unwrap(), 1 << 20, false).unwrap();
            let b = bind_udp("127.0.0.1:0".parse().unwrap(), 1 << 20, false).unwrap();
            let c = bind_udp("127.0.0.1:0".parse().unwrap(), 1 << 20, false).unwrap();
            if gro {
                assert!(enable_gro(&b), "UDP GRO (Linux 5.0)");
            }
            let mut out = Buffers::new(1500);
            // 20 × 1000 bytes to b, 1 × 300 to b (ends the run), 5 × 1000 to c, 3 × 1000 to b
            let mut messages = Vec::new();
            let lens: Vec<(usize, &UdpSocket)> = (0..20)
                .map(|_| (1000, &b))
                .chain([(300, &b)])
                .chain((0..5).map(|_| (1000, &c)))
                .chain((0..3).map(|_| (1000, &b)))
                .collect();
            for (i, (len, to)) in lens.iter().enumerate() {
                out.get_mut(i)[..4].copy_from_slice(&(i as u32).to_be_bytes());
                messages.push(Outgoing::new(i, *len, to.local_addr().unwrap()));
            }
            let mut gso = true;
            assert_eq!(send_batch_gso(&a, &out, &messages, &mut gso), (29, 0));
            assert!(gso, "loopback takes UDP GSO");
            let mut receiver = Receiver::new();
            let mut inbox = Buffers::new(65_536);
            let mut got = Vec::new();
            while got.len() < 24 {
                let n = receiver.recv(&b, &mut inbox).unwrap();
                assert!(n > 0, "timed out after {}", got.len());
                for k in 0..n {
                    for datagram in receiver.segments(k, inbox.get_mut(k)) {
                        got.push((
                            u32::from_be_bytes(datagram[..4].try_into().unwrap()),
                            datagram.len(),
                        ));
                    }
                }
            }
            let expected: Vec<(u32, usize)> = (0..21)
                .chain(26..29)
                .map(|i| (i as u32, lens[i].0))
                .collect();
            assert_eq!(got, expected, "gro {gro}");
            let mut got_c = 0;
            while got_c < 5 {
                let n = receiver.recv(&c, &mut inbox).unwrap();
                assert!(n > 0);
                for k in 0..n {
                    got_c += receiver.segments(k, inbox.get_mut(k)).count();
                }
            }
        }
    }

    #[test]
    fn a_failing_message_is_skipped_not_fatal() {
        let a = bind_udp("127.0.0.1:0".parse().unwrap(), 0, false).unwrap();
        let b = bind_udp("127.0.0.1:0".parse().unwrap(), 0, false).unwrap();
        let buffers = Buffers::new(64);
        let v6 = SockaddrStorage::from("[::1]:9".parse::<SocketAddr>().unwrap());
        let good = SockaddrStorage::from(b.local_addr().unwrap());
        let messages = [
            Outgoing {
                buffer: 0,
                len: 8,
                to: good,
            },
            Outgoing {
                buffer: 1,
                len: 8,
                to: v6,
            },
            Outgoing {
                buffer: 2,
                len: 8,
                to: good,
            },
        ];
        assert_eq!(send_batch(&a, &buffers, &messages), (2, 1));
    }
}
