//! TUN segmentation offloads, pure: the `virtio_net_hdr` in front of every packet of an
//! `IFF_VNET_HDR` TUN device, TCP segmentation of the GSO super-packets the kernel reads out
//! (TSO done here instead of by a NIC), and coalescing of consecutive TCP segments into one GSO
//! packet to write (GRO done here instead of by a NIC). No I/O, no allocation, no panic on any
//! input: every length comes from the bytes and is checked before use.
//!
//! ```text
//!  read:  [virtio_net_hdr | IP | TCP | 64 KiB of payload]   gso_type TCPV4/TCPV6, gso_size S
//!            Segmenter ─► [IP | TCP | S bytes] [IP | TCP | S bytes] … [IP | TCP | ≤ S bytes]
//!            each: IPv4 total length, ID + i, header checksum / IPv6 payload length; TCP
//!            sequence number + i·S; FIN and PSH only on the last, CWR only on the first;
//!            the full TCP checksum (pseudo-header, header, payload)
//!
//!  write: [IP | TCP | a] [IP | TCP | b] [IP | TCP | c]      one flow, contiguous sequence numbers
//!            Merge ─► [virtio_net_hdr | IP | TCP | a b c]   gso_type TCPV4/TCPV6, gso_size |a|,
//!            NEEDS_CSUM at the TCP checksum, which holds the pseudo-header sum
//! ```
//!
//! The header is `struct virtio_net_hdr` of Linux `include/uapi/linux/virtio_net.h` (the
//! virtio 1.x specification, §5.1.6 "Device Operation", legacy layout without `num_buffers`):
//! ten bytes in the host's byte order, which is what a TUN device uses unless `TUNSETVNETLE`
//! or `TUNSETVNETBE` say otherwise (`tun_vnet_is_little_endian` in `drivers/net/tun_vnet.h`).
//!
//! What the kernel accepts on a write (`tun_get_user` → `virtio_net_hdr_to_skb` in
//! `include/linux/virtio_net.h`): a GSO packet needs `gso_size > 0` and, with `NEEDS_CSUM`,
//! `csum_start` at the transport header (at least an IP header in) and `csum_offset` at the TCP
//! checksum (16); the checksum field then holds the folded, uncomplemented pseudo-header sum
//! (`CHECKSUM_PARTIAL`), and the stack **does not verify** the checksum of such a packet. So a
//! [`Merge`] verifies the TCP checksum of every segment it merges, and a segment whose checksum
//! is wrong is written on its own, for the kernel to drop as it always did. Everything else is
//! written behind an all-zero header and checked by the kernel as before. `DATA_VALID` is not
//! used, although the packets were authenticated by AES-GCM (which says they are what the peer
//! sealed, not that the peer's sender checksummed them right): a TUN write ignores it
//! (`virtio_net_hdr_to_skb` never reads it; only the virtio-net driver's receive path does).
//! Checked on Linux 6.18: a UDP datagram with a wrong checksum written with `DATA_VALID` is
//! dropped like one without.

/// Length of `struct virtio_net_hdr` (without `num_buffers`), the default `TUNSETVNETHDRSZ`.
pub(crate) const VNET_HDR_LEN: usize = 10;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum from `csum_start` to the end goes at
/// `csum_start + csum_offset`, where the pseudo-header sum already is.
pub(crate) const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub(crate) const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub(crate) const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub(crate) const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_ECN`: the flow uses ECN (RFC 3168), so CWR goes on the first segment.
pub(crate) const GSO_ECN: u8 = 0x80;

/// The most segments one coalesced write carries (as Linux GRO, `MAX_GRO_SKBS` aside).
pub(crate) const MAX_MERGED_SEGMENTS: usize = 64;
/// The longest packet a coalesced write makes: an IPv4 total length (and what fits a 16-bit
/// IPv6 payload length with room to spare).
pub(crate) const MAX_MERGED_LEN: usize = 65_535;

const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Offset of the TCP checksum in the TCP header (RFC 9293 §3.1).
const TCP_CHECKSUM: usize = 16;
/// IPv4 flags and fragment offset: More Fragments, and the offset.
const IPV4_MF_OFFSET: u16 = 0x3fff;
/// IPv4 Don't Fragment.
const IPV4_DF: u8 = 0x40;

/// `struct virtio_net_hdr`: what the kernel says about a packet it reads out, or what we say
/// about one we write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct VnetHeader {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (a hint; the kernel's value is not trusted on reads).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Reads the header at the start of `bytes`; `None` if there are fewer than ten bytes.
    pub(crate) fn parse(bytes: &[u8]) -> Option<VnetHeader> {
        let b = bytes.get(..VNET_HDR_LEN)?;
        let u16_at = |at: usize| u16::from_ne_bytes([b[at], b[at + 1]]);
        Some(VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        })
    }

    /// The ten bytes of this header.
    pub(crate) fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }

    /// Whether the packet behind this header is a GSO super-packet to cut.
    pub(crate) fn is_gso(&self) -> bool {
        self.gso_type != GSO_NONE
    }
}

// ---------------------------------------------------------------- the Internet checksum

/// A running Internet checksum (RFC 1071): a ones'-complement sum kept 64 bits wide. Bytes are
/// read in the host's order and the result swapped at the end (RFC 1071 §2(B): the sum is
/// byte-order independent), which lets it add eight bytes at a time.
#[derive(Clone, Copy, Debug, Default)]
struct Checksum(u64);

impl Checksum {
    fn add_word(self, word: u64) -> Checksum {
        let (sum, carry) = self.0.overflowing_add(word);
        Checksum(sum + u64::from(carry))
    }

    /// Adds `bytes`. Every piece but the last of one checksum must have an even length (a
    /// piece starts on a 16-bit boundary of the checksummed data); an odd last byte is padded
    /// with a zero, as RFC 1071 says.
    fn add(mut self, bytes: &[u8]) -> Checksum {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self = self.add_word(u64::from_ne_bytes(word));
        }
        let rest = chunks.remainder();
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        self.add_word(u64::from_ne_bytes(word))
    }

    /// Adds a 16-bit field given by value.
    fn add_u16(self, value: u16) -> Checksum {
        self.add_word(u64::from(u16::from_ne_bytes(value.to_be_bytes())))
    }

    /// The folded 16-bit sum, as a number in network order (not complemented).
    fn fold(self) -> u16 {
        let mut sum = self.0;
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        u16::from_be_bytes((sum as u16).to_ne_bytes())
    }

    /// The checksum to store: the complement of the folded sum.
    fn finish(self) -> u16 {
        !self.fold()
    }
}

// ---------------------------------------------------------------- IP/TCP framing

/// IP version of a [`TcpPacket`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V4,
    V6,
}

/// An IPv4 or IPv6 packet carrying TCP with its header lengths checked against the bytes
/// (smoltcp style: [`TcpPacket::new_checked`] is the only constructor, and every accessor stays
/// within what it checked).
#[derive(Clone, Copy, Debug)]
struct TcpPacket<T> {
    buffer: T,
    version: Version,
    /// IP header length: IPv4 IHL·4, IPv6 40 (no extension headers).
    ip_len: usize,
    /// TCP header length: data offset·4.
    tcp_len: usize,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// `buffer` as a TCP packet: IPv4 (IHL ≥ 5, protocol 6, not a fragment) or IPv6 (next
    /// header 6) whose length field covers exactly `buffer`, with a TCP header (data offset ≥
    /// 5) inside it.
    fn new_checked(buffer: T) -> Option<TcpPacket<T>> {
        let b = buffer.as_ref();
        let (version, ip_len) = match b.first()? >> 4 {
            4 => {
                let ip_len = usize::from(b[0] & 0x0f) * 4;
                if ip_len < 20 || b.len() < ip_len || b[9] != IPPROTO_TCP {
                    return None;
                }
                let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
                let fragment = u16::from_be_bytes([b[6], b[7]]) & IPV4_MF_OFFSET;
                if total != b.len() || fragment != 0 {
                    return None;
                }
                (Version::V4, ip_len)
            }
            6 => {
                if b.len() < 40 || b[6] != IPPROTO_TCP {
                    return None;
                }
                let payload = usize::from(u16::from_be_bytes([b[4], b[5]]));
                if payload + 40 != b.len() {
                    return None;
                }
                (Version::V6, 40)
            }
            _ => return None,
        };
        let tcp_len = usize::from(b.get(ip_len + 12)? >> 4) * 4;
        if tcp_len < 20 || ip_len + tcp_len > b.len() {
            return None;
        }
        Some(TcpPacket {
            buffer,
            version,
            ip_len,
            tcp_len,
        })
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    fn header_len(&self) -> usize {
        self.ip_len + self.tcp_len
    }

    fn payload_len(&self) -> usize {
        self.bytes().len() - self.header_len()
    }

    fn tcp(&self) -> &[u8] {
        &self.bytes()[self.ip_len..]
    }

    fn seq(&self) -> u32 {
        let t = self.tcp();
        u32::from_be_bytes([t[4], t[5], t[6], t[7]])
    }

    fn flags(&self) -> u8 {
        self.tcp()[13]
    }

    /// Source and destination addresses.
    fn addresses(&self) -> &[u8] {
        match self.version {
            Version::V4 => &self.bytes()[12..20],
            Version::V6 => &self.bytes()[8..40],
        }
    }

    /// The pseudo-header sum (RFC 9293 §3.1, RFC 8200 §8.1) for a TCP length of `tcp_bytes`.
    fn pseudo_header(&self, tcp_bytes: usize) -> Checksum {
        Checksum::default()
            .add(self.addresses())
            .add_u16(u16::from(IPPROTO_TCP))
            .add_u16((tcp_bytes >> 16) as u16)
            .add_u16(tcp_bytes as u16)
    }

    /// Whether the TCP checksum verifies.
    fn checksum_ok(&self) -> bool {
        self.pseudo_header(self.bytes().len() - self.ip_len)
            .add(self.tcp())
            .fold()
            == 0xffff
    }
}

/// Recomputes the IPv4 header checksum of `header` (RFC 791).
fn set_ipv4_checksum(header: &mut [u8]) {
    if header.len() < 20 {
        return;
    }
    header[10..12].fill(0);
    let sum = Checksum::default().add(header).finish();
    header[10..12].copy_from_slice(&sum.to_be_bytes());
}

// ---------------------------------------------------------------- reads: checksums, segmentation

/// Completes the checksum of a packet the kernel read out with `NEEDS_CSUM` and no GSO
/// (`CHECKSUM_PARTIAL`: the field at `csum_start + csum_offset` holds the pseudo-header sum).
/// Returns `false` if the offsets do not fit the packet (drop it). A computed zero is stored as
/// `0xffff`, as Linux's `skb_checksum_help` does (required for UDP, RFC 768; the same value for
/// TCP).
pub(crate) fn complete_checksum(header: &VnetHeader, packet: &mut [u8]) -> bool {
    if header.flags & F_NEEDS_CSUM == 0 {
        return true;
    }
    let start = usize::from(header.csum_start);
    let at = start + usize::from(header.csum_offset);
    if at + 2 > packet.len() {
        return false;
    }
    let Some(covered) = packet.get(start..) else {
        return false;
    };
    let sum = match Checksum::default().add(covered).finish() {
        0 => 0xffff,
        sum => sum,
    };
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

/// Why a packet read out of the TUN device cannot be cut into segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SegmentError {
    /// A GSO type other than TCPV4/TCPV6 (we do not ask for UDP segmentation offload).
    UnsupportedGso(u8),
    /// `gso_size` is 0.
    ZeroGsoSize,
    /// Not a TCP packet of the IP version the GSO type says, or its headers do not fit.
    Malformed,
}

/// Cuts a TCP GSO super-packet into segments of `gso_size` payload bytes, one at a time, into
/// the caller's buffers (see the [module docs](self)). Holds only offsets: the packet is passed
/// to each [`Segmenter::next_into`] call again.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Segmenter {
    version: Version,
    ip_len: usize,
    header_len: usize,
    gso_size: usize,
    len: usize,
    /// Where the next segment's payload starts in the packet.
    next: usize,
    /// The next segment's index.
    index: u32,
    first_seq: u32,
    first_id: u16,
    done: bool,
}

impl Segmenter {
    /// Checks super-packet `packet` (after its header `header`) and prepares to cut it. Trusts
    /// neither `hdr_len` nor `csum_start` (the kernel may set `hdr_len` to a whole forwarded
    /// packet): the headers are parsed from the bytes.
    pub(crate) fn new(header: &VnetHeader, packet: &[u8]) -> Result<Segmenter, SegmentError> {
        let version = match header.gso_type & !GSO_ECN {
            GSO_TCPV4 => Version::V4,
            GSO_TCPV6 => Version::V6,
            other => return Err(SegmentError::UnsupportedGso(other)),
        };
        if header.gso_size == 0 {
            return Err(SegmentError::ZeroGsoSize);
        }
        let tcp = TcpPacket::new_checked(packet).ok_or(SegmentError::Malformed)?;
        if tcp.version != version {
            return Err(SegmentError::Malformed);
        }
        let first_id = match version {
            Version::V4 => u16::from_be_bytes([packet[4], packet[5]]),
            Version::V6 => 0,
        };
        Ok(Segmenter {
            version,
            ip_len: tcp.ip_len,
            header_len: tcp.header_len(),
            gso_size: usize::from(header.gso_size),
            len: packet.len(),
            next: tcp.header_len(),
            index: 0,
            first_seq: tcp.seq(),
            first_id,
            done: false,
        })
    }

    /// Segments not yet written.
    pub(crate) fn remaining(&self) -> usize {
        if self.done {
            0
        } else {
            (self.len - self.next).div_ceil(self.gso_size).max(1)
        }
    }

    /// Writes the next segment of `packet` (the one given to [`Segmenter::new`]) at the start
    /// of `out` and returns its length; `None` once all are out (or if `out` is too short for
    /// a segment, or `packet` is not the packet this segmenter was made for).
    pub(crate) fn next_into(&mut self, packet: &[u8], out: &mut [u8]) -> Option<usize> {
        if self.done || packet.len() != self.len {
            self.done = true;
            return None;
        }
        let end = self.len.min(self.next + self.gso_size);
        let last = end == self.len;
        let payload = end - self.next;
        let seg_len = self.header_len + payload;
        let (Some(headers), Some(data), Some(seg)) = (
            packet.get(..self.header_len),
            packet.get(self.next..end),
            out.get_mut(..seg_len),
        ) else {
            self.done = true;
            return None;
        };
        seg[..self.header_len].copy_from_slice(headers);
        seg[self.header_len..].copy_from_slice(data);
        match self.version {
            Version::V4 => {
                seg[2..4].copy_from_slice(&(seg_len as u16).to_be_bytes());
                let id = self.first_id.wrapping_add(self.index as u16);
                seg[4..6].copy_from_slice(&id.to_be_bytes());
                set_ipv4_checksum(&mut seg[..self.ip_len]);
            }
            Version::V6 => {
                seg[4..6].copy_from_slice(&((seg_len - 40) as u16).to_be_bytes());
            }
        }
        let offset = (self.next - self.header_len) as u32;
        let tcp = self.ip_len;
        let seq = self.first_seq.wrapping_add(offset);
        seg[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
        if !last {
            seg[tcp + 13] &= !(TCP_FIN | TCP_PSH);
        }
        if self.index > 0 {
            seg[tcp + 13] &= !TCP_CWR;
        }
        seg[tcp + TCP_CHECKSUM..tcp + TCP_CHECKSUM + 2].fill(0);
        let sum = TcpPacket {
            buffer: &*seg,
            version: self.version,
            ip_len: self.ip_len,
            tcp_len: self.header_len - self.ip_len,
        }
        .pseudo_header(seg_len - tcp)
        .add(&seg[tcp..])
        .finish();
        seg[tcp + TCP_CHECKSUM..tcp + TCP_CHECKSUM + 2].copy_from_slice(&sum.to_be_bytes());
        self.next = end;
        self.index += 1;
        self.done = last;
        Some(seg_len)
    }
}

// ---------------------------------------------------------------- writes: coalescing

/// A run of consecutive TCP segments of one flow that can be written as one GSO packet: the
/// first packet's headers, then every segment's payload in order.
///
/// A segment joins the run when it has the same addresses, ports, IP version and header
/// lengths; IPv4: no options, the same TOS, TTL and DF bit, not a fragment, and (without DF) the
/// next IP ID; IPv6: the same first word (traffic class, flow label) and hop limit, no extension
/// headers; TCP: the next sequence number, the same acknowledgment number, window and option
/// bytes, ACK as its only flag but for PSH (which ends the run), a payload no longer than the
/// first segment's (a shorter one ends the run), and a TCP checksum that verifies (as the first
/// segment's must). At most [`MAX_MERGED_SEGMENTS`] segments and [`MAX_MERGED_LEN`] bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Merge {
    /// Packets in the run.
    segments: usize,
    version: Version,
    ip_len: usize,
    tcp_len: usize,
    /// The first segment's payload length: `gso_size`.
    gso_size: usize,
    /// Length of the merged packet.
    len: usize,
    next_seq: u32,
    last_id: u16,
    /// The last segment has PSH (the merged packet gets it).
    psh: bool,
    /// Nothing more may join (PSH, a short segment, a full run, or a failed checksum).
    closed: bool,
    head_verified: bool,
}

impl Merge {
    /// A run starting with `packet`, if it is a TCP segment that may be coalesced at all.
    pub(crate) fn start(packet: &[u8]) -> Option<Merge> {
        let tcp = candidate(packet)?;
        let id = match tcp.version {
            Version::V4 => u16::from_be_bytes([packet[4], packet[5]]),
            Version::V6 => 0,
        };
        let psh = tcp.flags() & TCP_PSH != 0;
        Some(Merge {
            segments: 1,
            version: tcp.version,
            ip_len: tcp.ip_len,
            tcp_len: tcp.tcp_len,
            gso_size: tcp.payload_len(),
            len: packet.len(),
            next_seq: tcp.seq().wrapping_add(tcp.payload_len() as u32),
            last_id: id,
            psh,
            closed: psh,
            head_verified: false,
        })
    }

    /// Packets in the run.
    pub(crate) fn segments(&self) -> usize {
        self.segments
    }

    /// Where the payload starts in every packet of the run: the merged packet is the first
    /// packet, then `packet[header_len()..]` of each of the others.
    pub(crate) fn header_len(&self) -> usize {
        self.ip_len + self.tcp_len
    }

    /// Length of the merged packet.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends `packet` to the run whose first packet is `head` (as given to
    /// [`Merge::start`], unchanged) if it continues it; says whether it did.
    pub(crate) fn append(&mut self, head: &[u8], packet: &[u8]) -> bool {
        if self.closed || self.segments >= MAX_MERGED_SEGMENTS {
            return false;
        }
        let (Some(tcp), Some(first)) = (candidate(packet), candidate(head)) else {
            return false;
        };
        let payload = tcp.payload_len();
        if tcp.version != self.version
            || first.version != self.version
            || tcp.ip_len != self.ip_len
            || tcp.tcp_len != self.tcp_len
            || first.ip_len != self.ip_len
            || first.tcp_len != self.tcp_len
            || payload > self.gso_size
            || self.len + payload > MAX_MERGED_LEN
            || tcp.seq() != self.next_seq
            || tcp.addresses() != first.addresses()
        {
            return false;
        }
        let (p, h) = (tcp.bytes(), first.bytes());
        let same_ip = match self.version {
            Version::V4 => {
                let id = u16::from_be_bytes([p[4], p[5]]);
                p[1] == h[1]
                    && p[8] == h[8]
                    && p[6] & IPV4_DF == h[6] & IPV4_DF
                    && (p[6] & IPV4_DF != 0 || id == self.last_id.wrapping_add(1))
            }
            Version::V6 => p[..4] == h[..4] && p[7] == h[7],
        };
        let (pt, ht) = (tcp.tcp(), first.tcp());
        let same_tcp = pt[..4] == ht[..4] // ports
            && pt[8..12] == ht[8..12] // acknowledgment number
            && pt[14..16] == ht[14..16] // window
            && pt[20..self.tcp_len] == ht[20..self.tcp_len]; // options
        if !same_ip || !same_tcp {
            return false;
        }
        if !self.head_verified {
            if !first.checksum_ok() {
                self.closed = true;
                return false;
            }
            self.head_verified = true;
        }
        if !tcp.checksum_ok() {
            return false;
        }
        self.segments += 1;
        self.len += payload;
        self.next_seq = self.next_seq.wrapping_add(payload as u32);
        if self.version == Version::V4 {
            self.last_id = u16::from_be_bytes([p[4], p[5]]);
        }
        self.psh = tcp.flags() & TCP_PSH != 0;
        self.closed = self.psh || payload < self.gso_size || self.segments >= MAX_MERGED_SEGMENTS;
        true
    }

    /// Rewrites the first packet `head` into the head of the merged packet (total or payload
    /// length, IPv4 header checksum, PSH if the last segment had it, the pseudo-header sum in
    /// the TCP checksum) and returns the header to write in front of it. A run of one packet is
    /// left as it is, with an all-zero header (the kernel checks it as any packet).
    pub(crate) fn finish(&self, head: &mut [u8]) -> VnetHeader {
        if self.segments < 2 || head.len() < self.header_len() {
            return VnetHeader::default();
        }
        let (ip, tcp_len) = (self.ip_len, self.len - self.ip_len);
        match self.version {
            Version::V4 => {
                head[2..4].copy_from_slice(&(self.len as u16).to_be_bytes());
                set_ipv4_checksum(&mut head[..ip]);
            }
            Version::V6 => head[4..6].copy_from_slice(&((self.len - 40) as u16).to_be_bytes()),
        }
        if self.psh {
            head[ip + 13] |= TCP_PSH;
        }
        let addresses = match self.version {
            Version::V4 => &head[12..20],
            Version::V6 => &head[8..40],
        };
        let pseudo = Checksum::default()
            .add(addresses)
            .add_u16(u16::from(IPPROTO_TCP))
            .add_u16((tcp_len >> 16) as u16)
            .add_u16(tcp_len as u16)
            .fold();
        head[ip + TCP_CHECKSUM..ip + TCP_CHECKSUM + 2].copy_from_slice(&pseudo.to_be_bytes());
        VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: match self.version {
                Version::V4 => GSO_TCPV4,
                Version::V6 => GSO_TCPV6,
            },
            hdr_len: self.header_len() as u16,
            gso_size: self.gso_size as u16,
            csum_start: ip as u16,
            csum_offset: TCP_CHECKSUM as u16,
        }
    }
}

/// `packet` as a TCP segment that may be coalesced: no IPv4 options and a valid IPv4 header
/// checksum (the merged packet gets a new one), a payload, ACK with at most PSH besides, no
/// reserved bits or AccECN AE bit.
fn candidate(packet: &[u8]) -> Option<TcpPacket<&[u8]>> {
    let tcp = TcpPacket::new_checked(packet)?;
    let flags = tcp.flags();
    let reserved = tcp.tcp()[12] & 0x0f;
    if (tcp.version == Version::V4
        && (tcp.ip_len != 20 || Checksum::default().add(&packet[..20]).fold() != 0xffff))
        || reserved != 0
        || (flags != TCP_ACK && flags != TCP_ACK | TCP_PSH)
        || tcp.payload_len() == 0
    {
        return None;
    }
    Some(tcp)
}

/// One write of a batch: packets `start..end` (consecutive in the batch), merged when `merge`
/// says so and holds more than one segment, else each on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: usize,
    pub end: usize,
    pub merge: Option<Merge>,
}

/// Groups the `count` packets `packet(0..count)` of a batch, in order, into [`Run`]s appended to
/// `runs`: consecutive segments of one flow that a [`Merge`] accepts share a run; anything else
/// is a run of one.
pub(crate) fn plan<'a>(count: usize, packet: impl Fn(usize) -> &'a [u8], runs: &mut Vec<Run>) {
    let mut current: Option<Run> = None;
    for index in 0..count {
        let bytes = packet(index);
        if let Some(run) = current.as_mut()
            && let Some(merge) = run.merge.as_mut()
            && merge.append(packet(run.start), bytes)
        {
            run.end = index + 1;
            continue;
        }
        if let Some(run) = current.take() {
            runs.push(run);
        }
        current = Some(Run {
            start: index,
            end: index + 1,
            merge: Merge::start(bytes),
        });
    }
    runs.extend(current);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What the kernel would write for `packets`: a virtio header and the bytes, per write.
    fn coalesce(packets: &[Vec<u8>]) -> Vec<(VnetHeader, Vec<u8>)> {
        let mut runs = Vec::new();
        plan(packets.len(), |i| &packets[i][..], &mut runs);
        let mut writes = Vec::new();
        for run in runs {
            match run.merge {
                Some(merge) if merge.segments() > 1 => {
                    let mut head = packets[run.start].clone();
                    let header = merge.finish(&mut head);
                    for packet in &packets[run.start + 1..run.end] {
                        head.extend_from_slice(&packet[merge.header_len()..]);
                    }
                    assert_eq!(head.len(), merge.len());
                    writes.push((header, head));
                }
                _ => {
                    for packet in &packets[run.start..run.end] {
                        writes.push((VnetHeader::default(), packet.clone()));
                    }
                }
            }
        }
        writes
    }

    /// Cuts `packet` as a kernel read with `header` would be cut.
    fn segment(header: &VnetHeader, packet: &[u8]) -> Result<Vec<Vec<u8>>, SegmentError> {
        let mut segmenter = Segmenter::new(header, packet)?;
        let expected = segmenter.remaining();
        let mut out = vec![0u8; 65_536];
        let mut segments = Vec::new();
        while let Some(len) = segmenter.next_into(packet, &mut out) {
            segments.push(out[..len].to_vec());
        }
        assert_eq!(segments.len(), expected);
        assert_eq!(segmenter.remaining(), 0);
        Ok(segments)
    }

    /// A TCP packet with correct checksums: IPv4 `id`, `flags`, `options` (a multiple of 4).
    fn tcp_packet(
        v6: bool,
        seq: u32,
        flags: u8,
        id: u16,
        options: &[u8],
        payload: &[u8],
    ) -> Vec<u8> {
        let tcp_len = 20 + options.len();
        let mut p = Vec::new();
        if v6 {
            p.extend_from_slice(&[0x60, 0x01, 0x23, 0x45]);
            p.extend_from_slice(&((tcp_len + payload.len()) as u16).to_be_bytes());
            p.extend_from_slice(&[IPPROTO_TCP, 64]);
            p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&((20 + tcp_len + payload.len()) as u16).to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&[0x40, 0, 64, IPPROTO_TCP, 0, 0]);
            p.extend_from_slice(&[198, 19, 2, 5, 198, 19, 1, 1]);
            set_ipv4_checksum(&mut p[..20]);
        }
        let ip = p.len();
        p.extend_from_slice(&40000u16.to_be_bytes());
        p.extend_from_slice(&5201u16.to_be_bytes());
        p.extend_from_slice(&seq.to_be_bytes());
        p.extend_from_slice(&0x1122_3344u32.to_be_bytes());
        p.push(((tcp_len / 4) as u8) << 4);
        p.push(flags);
        p.extend_from_slice(&[0x01, 0xf5, 0, 0, 0, 0]);
        p.extend_from_slice(options);
        p.extend_from_slice(payload);
        let sum = TcpPacket::new_checked(&p[..])
            .unwrap()
            .pseudo_header(p.len() - ip)
            .add(&p[ip..])
            .finish();
        p[ip + 16..ip + 18].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn payload(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Whether every checksum of `packet` verifies.
    fn verifies(packet: &[u8]) -> bool {
        let tcp = TcpPacket::new_checked(packet).expect("a TCP packet");
        let ip_ok = tcp.version == Version::V6
            || Checksum::default().add(&packet[..tcp.ip_len]).fold() == 0xffff;
        ip_ok && tcp.checksum_ok()
    }

    /// The checksum of a merged packet as the kernel completes it (`CHECKSUM_PARTIAL`).
    fn completed(header: &VnetHeader, mut packet: Vec<u8>) -> Vec<u8> {
        assert!(complete_checksum(header, &mut packet));
        packet
    }

    /// A super-packet as the kernel hands it out: full-length headers, `CHECKSUM_PARTIAL`.
    fn super_packet(
        v6: bool,
        flags: u8,
        options: &[u8],
        data: &[u8],
        mss: u16,
    ) -> (VnetHeader, Vec<u8>) {
        let mut packet = tcp_packet(v6, 1_000_000, flags, 7, options, data);
        let ip = if v6 { 40 } else { 20 };
        let pseudo = TcpPacket::new_checked(&packet[..])
            .unwrap()
            .pseudo_header(packet.len() - ip)
            .fold();
        packet[ip + 16..ip + 18].copy_from_slice(&pseudo.to_be_bytes());
        let header = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
            hdr_len: (ip + 20 + options.len()) as u16,
            gso_size: mss,
            csum_start: ip as u16,
            csum_offset: 16,
        };
        (header, packet)
    }

    #[test]
    fn the_header_has_the_kernel_layout() {
        let header = VnetHeader {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV6,
            hdr_len: 0x0102,
            gso_size: 1380,
            csum_start: 40,
            csum_offset: 16,
        };
        let bytes = header.to_bytes();
        assert_eq!(bytes[..2], [1, 4]);
        assert_eq!(bytes[4..6], 1380u16.to_ne_bytes());
        assert_eq!(VnetHeader::parse(&bytes), Some(header));
        assert_eq!(VnetHeader::parse(&bytes[..9]), None);
        assert_eq!(VnetHeader::default().to_bytes(), [0; VNET_HDR_LEN]);
    }

    #[test]
    fn the_checksum_matches_rfc_1071() {
        // RFC 1071 §3's example: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(Checksum::default().add(&data).fold(), 0xddf2);
        // split in even pieces, and with an odd tail
        let c = Checksum::default().add(&data[..2]).add(&data[2..]);
        assert_eq!(c.fold(), 0xddf2);
        assert_eq!(Checksum::default().add(&[0xab]).fold(), 0xab00);
        assert_eq!(Checksum::default().add_u16(0x1234).fold(), 0x1234);
        // a long buffer against the 16-bit textbook loop
        let long = payload(1001, 9);
        let mut slow: u32 = 0;
        for pair in long.chunks(2) {
            slow += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while slow > 0xffff {
            slow = (slow & 0xffff) + (slow >> 16);
        }
        assert_eq!(Checksum::default().add(&long).fold(), slow as u16);
    }

    #[test]
    fn a_super_packet_becomes_segments_that_verify_ipv4_and_ipv6() {
        for v6 in [false, true] {
            let data = payload(5000, 3);
            let options = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]; // NOP NOP timestamps
            let (header, packet) =
                super_packet(v6, TCP_ACK | TCP_PSH | TCP_FIN, &options, &data, 1388);
            let segments = segment(&header, &packet).unwrap();
            assert_eq!(segments.len(), 4, "5000 bytes at 1388: 3 full, 1 of 836");
            let mut joined = Vec::new();
            for (i, s) in segments.iter().enumerate() {
                assert!(verifies(s), "segment {i} v6 {v6}");
                let tcp = TcpPacket::new_checked(&s[..]).unwrap();
                assert_eq!(tcp.seq(), 1_000_000 + 1388 * i as u32);
                assert_eq!(&tcp.tcp()[20..32], &options);
                let last = i == 3;
                assert_eq!(
                    tcp.flags(),
                    if last {
                        TCP_ACK | TCP_PSH | TCP_FIN
                    } else {
                        TCP_ACK
                    }
                );
                if !v6 {
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]), 7 + i as u16, "IP ID");
                    assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                }
                joined.extend_from_slice(&s[tcp.header_len()..]);
            }
            assert_eq!(joined, data);
            assert_eq!(segments[3].len(), (if v6 { 40 } else { 20 }) + 32 + 836);
        }
    }

    #[test]
    fn cwr_stays_on_the_first_segment_only() {
        let data = payload(3000, 1);
        let (mut header, packet) = super_packet(false, TCP_ACK | TCP_CWR, &[], &data, 1000);
        header.gso_type |= GSO_ECN;
        let segments = segment(&header, &packet).unwrap();
        let flags: Vec<u8> = segments.iter().map(|s| s[20 + 13]).collect();
        assert_eq!(flags, [TCP_ACK | TCP_CWR, TCP_ACK, TCP_ACK]);
        assert!(segments.iter().all(|s| verifies(s)));
    }

    #[test]
    fn what_is_not_a_tcp_super_packet_is_refused() {
        let data = payload(3000, 1);
        let (header, packet) = super_packet(false, TCP_ACK, &[], &data, 1000);
        let udp = VnetHeader {
            gso_type: 5,
            ..header
        };
        assert_eq!(
            Segmenter::new(&udp, &packet).err(),
            Some(SegmentError::UnsupportedGso(5))
        );
        let zero = VnetHeader {
            gso_size: 0,
            ..header
        };
        assert_eq!(
            Segmenter::new(&zero, &packet).err(),
            Some(SegmentError::ZeroGsoSize)
        );
        let v6 = VnetHeader {
            gso_type: GSO_TCPV6,
            ..header
        };
        assert_eq!(
            Segmenter::new(&v6, &packet).err(),
            Some(SegmentError::Malformed)
        );
        assert_eq!(
            Segmenter::new(&header, &packet[..packet.len() - 1]).err(),
            Some(SegmentError::Malformed),
            "the IP length must cover exactly what was read"
        );
        // a segmenter fed another packet, or too small a buffer, stops
        let mut s = Segmenter::new(&header, &packet).unwrap();
        assert_eq!(s.next_into(&packet[1..], &mut [0u8; 2000]), None);
        let mut s = Segmenter::new(&header, &packet).unwrap();
        assert_eq!(s.next_into(&packet, &mut [0u8; 100]), None);
        assert_eq!(s.remaining(), 0);
    }

    #[test]
    fn a_partial_checksum_is_completed() {
        let packet = tcp_packet(false, 5, TCP_ACK, 1, &[], b"hello");
        let (header, mut partial) = super_packet(false, TCP_ACK, &[], b"hello", 1400);
        partial[4..6].copy_from_slice(&1u16.to_be_bytes());
        set_ipv4_checksum(&mut partial[..20]);
        partial[24..28].copy_from_slice(&5u32.to_be_bytes());
        let pseudo = TcpPacket::new_checked(&partial[..])
            .unwrap()
            .pseudo_header(25)
            .fold();
        partial[36..38].copy_from_slice(&pseudo.to_be_bytes());
        let header = VnetHeader {
            gso_type: GSO_NONE,
            gso_size: 0,
            ..header
        };
        assert!(complete_checksum(&header, &mut partial));
        assert_eq!(partial, packet);
        let bad = VnetHeader {
            csum_offset: 40,
            ..header
        };
        assert!(!complete_checksum(&bad, &mut partial));
        let none = VnetHeader::default();
        assert!(complete_checksum(&none, &mut partial), "nothing to do");
    }

    #[test]
    fn segments_coalesce_back_into_the_super_packet() {
        for v6 in [false, true] {
            let data = payload(20_000, 7);
            let options = [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 8];
            let (header, packet) = super_packet(v6, TCP_ACK | TCP_PSH, &options, &data, 1368);
            let segments = segment(&header, &packet).unwrap();
            let writes = coalesce(&segments);
            assert_eq!(writes.len(), 1, "v6 {v6}");
            let (merged_header, merged) = &writes[0];
            assert_eq!(
                *merged_header,
                VnetHeader {
                    flags: F_NEEDS_CSUM,
                    gso_type: header.gso_type,
                    hdr_len: header.hdr_len,
                    gso_size: 1368,
                    csum_start: header.csum_start,
                    csum_offset: 16,
                }
            );
            assert_eq!(
                merged, &packet,
                "the same bytes, pseudo-header sum included"
            );
            // and what the kernel computes from it verifies
            let full = completed(
                &VnetHeader {
                    gso_type: GSO_NONE,
                    ..*merged_header
                },
                merged.clone(),
            );
            assert!(verifies(&full));
        }
    }

    #[test]
    fn runs_end_at_psh_a_short_segment_a_gap_or_another_flow() {
        let seg = |seq: u32, flags: u8, id: u16, len: usize| {
            tcp_packet(false, seq, flags, id, &[], &payload(len, seq as u8))
        };
        let packets = vec![
            seg(0, TCP_ACK, 1, 100),
            seg(100, TCP_ACK | TCP_PSH, 2, 100), // PSH: last of the run
            seg(200, TCP_ACK, 3, 100),
            seg(300, TCP_ACK, 4, 50), // short: last of the run
            seg(350, TCP_ACK, 5, 50),
            seg(500, TCP_ACK, 6, 50), // a gap in the sequence numbers
            seg(550, TCP_ACK | TCP_FIN, 7, 50), // FIN: never coalesced
            seg(600, TCP_ACK, 8, 60),
            seg(660, TCP_ACK, 9, 61), // longer than the first: not appended
        ];
        let mut runs = Vec::new();
        plan(packets.len(), |i| &packets[i][..], &mut runs);
        let spans: Vec<(usize, usize)> = runs.iter().map(|r| (r.start, r.end)).collect();
        assert_eq!(
            spans,
            [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
        );
        assert_eq!(runs[4].merge, None, "FIN is not a candidate");
        let writes = coalesce(&packets);
        assert_eq!(writes.len(), 7);
        assert_eq!(
            writes[0].1[20 + 13],
            TCP_ACK | TCP_PSH,
            "the merged packet keeps PSH"
        );
        for (header, bytes) in &writes {
            let bytes = completed(
                &VnetHeader {
                    gso_type: GSO_NONE,
                    ..*header
                },
                bytes.clone(),
            );
            assert!(verifies(&bytes));
        }
    }

    #[test]
    fn segments_that_differ_are_not_coalesced() {
        let base = tcp_packet(false, 0, TCP_ACK, 1, &[], &payload(100, 0));
        let next = || tcp_packet(false, 100, TCP_ACK, 2, &[], &payload(100, 1));
        let refit = |mut p: Vec<u8>| {
            set_ipv4_checksum(&mut p[..20]);
            p[36..38].fill(0);
            let sum = TcpPacket::new_checked(&p[..])
                .unwrap()
                .pseudo_header(p.len() - 20)
                .add(&p[20..])
                .finish();
            p[36..38].copy_from_slice(&sum.to_be_bytes());
            p
        };
        let mut variants: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut p = next();
        p[1] = 2; // ECN CE
        variants.push(("TOS", refit(p)));
        let mut p = next();
        p[8] = 63;
        variants.push(("TTL", refit(p)));
        let mut p = next();
        p[6] = 0; // DF cleared
        variants.push(("DF", refit(p)));
        let mut p = next();
        p[19] = 9;
        variants.push(("destination", refit(p)));
        let mut p = next();
        p[22] = 0;
        variants.push(("destination port", refit(p)));
        let mut p = next();
        p[31] ^= 1;
        variants.push(("acknowledgment", refit(p)));
        let mut p = next();
        p[34] ^= 1;
        variants.push(("window", refit(p)));
        let mut p = next();
        p[33] = TCP_ACK | 0x40;
        variants.push(("ECE", refit(p)));
        let mut p = next();
        p[33] = TCP_ACK | 0x20;
        variants.push(("URG", refit(p)));
        let mut p = next();
        p[32] |= 1;
        variants.push(("AE", refit(p)));
        let mut p = next();
        p[60] ^= 0xff;
        variants.push(("TCP checksum", p));
        for (what, variant) in variants {
            let packets = vec![base.clone(), variant];
            let writes = coalesce(&packets);
            assert_eq!(writes.len(), 2, "{what}");
            assert_eq!(
                writes[0],
                (VnetHeader::default(), packets[0].clone()),
                "{what}"
            );
        }
        // a first segment with a bad checksum takes nobody along
        let mut bad = base.clone();
        bad[50] ^= 1;
        assert_eq!(coalesce(&[bad, next()]).len(), 2);
        // without DF, IP IDs must count up
        let no_df = |seq: u32, id: u16| {
            let mut p = tcp_packet(false, seq, TCP_ACK, id, &[], &payload(10, 0));
            p[6] = 0;
            refit(p)
        };
        assert_eq!(coalesce(&[no_df(0, 5), no_df(10, 6)]).len(), 1);
        assert_eq!(coalesce(&[no_df(0, 5), no_df(10, 9)]).len(), 2);
        // with DF they may be anything
        let df = |seq: u32, id: u16| tcp_packet(false, seq, TCP_ACK, id, &[], &payload(10, 0));
        assert_eq!(coalesce(&[df(0, 5), df(10, 900)]).len(), 1);
    }

    #[test]
    fn runs_stop_at_64_segments_and_64_kib() {
        let packets: Vec<Vec<u8>> = (0..70u32)
            .map(|i| tcp_packet(false, i * 10, TCP_ACK, i as u16, &[], &payload(10, 0)))
            .collect();
        let writes = coalesce(&packets);
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].1.len(), 40 + 64 * 10);
        let big: Vec<Vec<u8>> = (0..50u32)
            .map(|i| tcp_packet(true, i * 1400, TCP_ACK, 0, &[], &payload(1400, 0)))
            .collect();
        let writes = coalesce(&big);
        assert!(writes.iter().all(|(_, p)| p.len() <= MAX_MERGED_LEN));
        assert_eq!(
            writes[0].1.len(),
            60 + 46 * 1400,
            "46 segments fit in 64 KiB"
        );
        assert_eq!(writes.len(), 2);
    }

    fn arbitrary_header() -> impl Strategy<Value = VnetHeader> {
        (
            any::<u8>(),
            prop_oneof![
                Just(GSO_TCPV4),
                Just(GSO_TCPV6),
                Just(GSO_TCPV4 | GSO_ECN),
                any::<u8>()
            ],
            any::<u16>(),
            0..3000u16,
            0..80u16,
            0..40u16,
        )
            .prop_map(
                |(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)| VnetHeader {
                    flags,
                    gso_type,
                    hdr_len,
                    gso_size,
                    csum_start,
                    csum_offset,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(
            header in arbitrary_header(),
            bytes in proptest::collection::vec(any::<u8>(), 0..200),
            more in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..120), 0..6),
        ) {
            let _ = VnetHeader::parse(&bytes);
            let mut copy = bytes.clone();
            let _ = complete_checksum(&header, &mut copy);
            if let Ok(mut s) = Segmenter::new(&header, &bytes) {
                let mut out = vec![0u8; 256];
                let mut n = 0;
                while s.next_into(&bytes, &mut out).is_some() {
                    n += 1;
                    prop_assert!(n <= bytes.len() + 1);
                }
            }
            let mut packets = vec![bytes];
            packets.extend(more);
            let mut runs = Vec::new();
            plan(packets.len(), |i| &packets[i][..], &mut runs);
            prop_assert_eq!(runs.iter().map(|r| r.end - r.start).sum::<usize>(), packets.len());
            let writes = coalesce(&packets);
            prop_assert!(writes.len() <= packets.len());
        }

        #[test]
        fn mutated_tcp_packets_never_panic_and_merge_only_when_valid(
            v6 in any::<bool>(),
            lens in proptest::collection::vec(1..200usize, 1..8),
            flips in proptest::collection::vec((0..400usize, any::<u8>()), 0..4),
        ) {
            let mut seq = 77u32;
            let mut packets: Vec<Vec<u8>> = lens.iter().enumerate().map(|(i, &len)| {
                let p = tcp_packet(v6, seq, TCP_ACK, i as u16, &[], &payload(len, i as u8));
                seq = seq.wrapping_add(len as u32);
                p
            }).collect();
            for (at, value) in flips {
                let n = packets.len();
                let p = &mut packets[at % n];
                let i = at % p.len();
                p[i] ^= value;
            }
            // only segments whose checksums verify are merged …
            let mut runs = Vec::new();
            plan(packets.len(), |i| &packets[i][..], &mut runs);
            for run in &runs {
                if run.merge.is_some_and(|m| m.segments() > 1) {
                    for packet in &packets[run.start..run.end] {
                        prop_assert!(verifies(packet));
                    }
                }
            }
            // … into packets whose completed checksums verify
            for (header, bytes) in coalesce(&packets) {
                if header.is_gso() {
                    let full = completed(&VnetHeader { gso_type: GSO_NONE, ..header }, bytes);
                    prop_assert!(verifies(&full));
                }
            }
        }

        #[test]
        fn mutated_super_packets_never_panic(
            v6 in any::<bool>(),
            len in 0..4000usize,
            header in arbitrary_header(),
            flips in proptest::collection::vec((0..80usize, any::<u8>()), 0..4),
            out_len in 0..2000usize,
        ) {
            let (_, mut packet) = super_packet(v6, TCP_ACK, &[], &payload(len, 1), 1000);
            for (at, value) in flips {
                let i = at % packet.len();
                packet[i] ^= value;
            }
            if let Ok(mut s) = Segmenter::new(&header, &packet) {
                let mut out = vec![0u8; out_len];
                let mut total = 0;
                while let Some(n) = s.next_into(&packet, &mut out) {
                    prop_assert!(n <= out_len);
                    total += 1;
                    prop_assert!(total <= packet.len() + 1);
                }
            }
            let mut copy = packet.clone();
            let _ = complete_checksum(&header, &mut copy);
        }

        #[test]
        fn segmenting_then_coalescing_round_trips(
            v6 in any::<bool>(),
            len in 0..20_000usize,
            mss in 1..3000u16,
            psh in any::<bool>(),
            seed in any::<u8>(),
        ) {
            let data = payload(len, seed);
            let flags = if psh { TCP_ACK | TCP_PSH } else { TCP_ACK };
            let (header, packet) = super_packet(v6, flags, &[], &data, mss);
            let segments = segment(&header, &packet).unwrap();
            prop_assert_eq!(segments.len(), len.div_ceil(usize::from(mss)).max(1));
            let mut joined = Vec::new();
            for s in &segments {
                prop_assert!(verifies(s));
                joined.extend_from_slice(&s[if v6 { 60 } else { 40 }..]);
            }
            prop_assert_eq!(&joined, &data);
            let writes = coalesce(&segments);
            let mut again = Vec::new();
            for (header, bytes) in &writes {
                let full = completed(&VnetHeader { gso_type: GSO_NONE, ..*header }, bytes.clone());
                prop_assert!(verifies(&full));
                if header.is_gso() {
                    prop_assert_eq!(usize::from(header.gso_size), usize::from(mss).min(len));
                }
                again.extend_from_slice(&bytes[if v6 { 60 } else { 40 }..]);
            }
            prop_assert_eq!(&again, &data);
            if len > 0 && writes.len() == 1 && segments.len() > 1 {
                prop_assert_eq!(&writes[0].1, &packet);
            }
        }
    }
}
