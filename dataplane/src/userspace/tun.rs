//! The TUN device that carries the inner traffic of the userspace backend.
//!
//! ```text
//!  open /dev/net/tun ─► ioctl(TUNSETIFF, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
//!                    ─► ioctl(TUNSETVNETHDRSZ, 10) ─► ioctl(TUNSETOFFLOAD, TUN_F_CSUM | TSO4 | TSO6)
//!                       (refused: warn once, reopen with IFF_TUN | IFF_NO_PI, no offloads)
//!                    ─► ip link set NAME addrgenmode none ─► ip link set NAME mtu M up
//!                    ─► ip addr replace A/P dev NAME ─► ip route replace P dev NAME
//! ```
//!
//! With `IFF_NO_PI` every `read` returns exactly one bare IP packet and every `write` injects
//! one (Linux `Documentation/networking/tuntap.rst`). With the offloads (the default,
//! [`super::UserspaceConfig::offload`]) every read and write starts with a 10-byte
//! `virtio_net_hdr` ([`super::offload`]), and the kernel may hand out a TCP super-packet of up to
//! 64 KiB with a segment size (TSO) or a packet whose checksum is left to us (`TUN_F_CSUM`), and
//! accepts the same from us: one read and one write, and one pass through its TCP stack, per
//! up to 64 KiB instead of per 1400 bytes.
//!
//! ```text
//!  read:  [vnet hdr | IP packet or TCP super-packet]   (Tun::read)
//!  write: [vnet hdr] [IP packet]                       (Tun::write_packet: an all-zero header)
//!         [vnet hdr GSO] [head packet] [payload] …     (Tun::write_vectored: a coalesced write)
//! ```
//!
//! The device is not persistent: it, its addresses and its routes disappear when the last
//! descriptor closes (when the driver is dropped). It lives in the network namespace of the
//! thread that creates it, as do the `ip` commands run from that thread.

use crate::netns::ip;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Read, Write};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

use super::offload::VNET_HDR_LEN;

/// How the TUN device is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunConfig {
    /// Interface name, at most 15 bytes (`IFNAMSIZ - 1`).
    pub name: String,
    /// MTU of the inner traffic: leave room for the outer IP (20/40), UDP (8) and ESP
    /// (8 header + 8 IV + 2..5 trailer + 16 ICV) headers, about 65 bytes for IPv4 outer.
    pub mtu: u32,
    /// Addresses to put on the device, with their prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    /// Routes into the device (e.g. the virtual-IP pool of the road warriors).
    pub routes: Vec<(IpAddr, u8)>,
}

impl TunConfig {
    /// A device `name` with the default MTU and nothing else configured.
    pub fn named(name: &str) -> TunConfig {
        TunConfig {
            name: name.to_owned(),
            mtu: DEFAULT_MTU,
            addresses: Vec::new(),
            routes: Vec::new(),
        }
    }
}

/// Default inner MTU: 1500 minus the worst-case ESP-in-UDP overhead over IPv6 (40 + 8 + 37),
/// rounded down to a multiple of 4.
pub const DEFAULT_MTU: u32 = 1412;

/// `struct ifreq` as TUNSETIFF reads and writes it: the name, then the flags in the union
/// (`include/uapi/linux/if.h`). 40 bytes on 64-bit Linux.
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _union_rest: [u8; 22],
}

nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, IfReqFlags);
nix::ioctl_write_ptr_bad!(tun_set_vnet_hdr_sz, libc::TUNSETVNETHDRSZ, libc::c_int);

/// The offloads asked for: the kernel may leave checksums to us and hand out TCP super-packets
/// (IPv4 and IPv6). No UDP segmentation (`TUN_F_USO4/6`): UDP comes one datagram at a time.
const OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// An open TUN device, with or without the `virtio_net_hdr` offloads.
#[derive(Debug)]
pub(crate) struct Tun {
    file: File,
    offload: bool,
}

/// The header of a plain packet: no GSO, no checksum to complete.
const PLAIN: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

impl Tun {
    /// Whether reads and writes carry a `virtio_net_hdr` (the offloads are on).
    pub(crate) fn offload(&self) -> bool {
        self.offload
    }

    /// Reads one packet (behind its header when [`Tun::offload`]). Non-blocking.
    pub(crate) fn read(&self, buffer: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buffer)
    }

    /// Writes one bare IP packet, behind an all-zero header when the offloads are on.
    pub(crate) fn write_packet(&self, packet: &[u8]) -> io::Result<usize> {
        if self.offload {
            (&self.file).write_vectored(&[IoSlice::new(&PLAIN), IoSlice::new(packet)])
        } else {
            (&self.file).write(packet)
        }
    }

    /// Writes one packet given in pieces, its header first (`writev`: the kernel reads the
    /// header, then builds one packet of the rest). Only with the offloads on.
    pub(crate) fn write_vectored(&self, pieces: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.file).write_vectored(pieces)
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Opens (creating if needed) the TUN device `name` in the calling thread's network namespace,
/// non-blocking; with the segmentation offloads if `offload` and the kernel agrees, else (after
/// one warning) without, exactly as a device opened without them.
pub(crate) fn open(name: &str, offload: bool) -> io::Result<Tun> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid TUN device name {name:?} (1 to 15 bytes, no '/', space or NUL)"),
        ));
    }
    if offload {
        match open_with(name, libc::IFF_VNET_HDR).and_then(|file| enable_offloads(name, file)) {
            Ok(file) => {
                return Ok(Tun {
                    file,
                    offload: true,
                });
            }
            Err(error) => tracing::warn!(
                device = name,
                %error,
                "no TUN segmentation offloads: one read and one write per packet"
            ),
        }
        // The refused descriptor is closed: the non-persistent device is gone with it, and is
        // created again below.
    }
    Ok(Tun {
        file: open_with(name, 0)?,
        offload: false,
    })
}

/// `/dev/net/tun` attached to device `name` with `IFF_TUN | IFF_NO_PI | extra`.
fn open_with(name: &str, extra: libc::c_int) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
    let mut request = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI | extra) as libc::c_short,
        _union_rest: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    #[allow(unsafe_code)]
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq` (40 bytes) at the pointer; `request`
    // is a live, exclusively borrowed #[repr(C)] value of that size and layout, and `file` is
    // an open /dev/net/tun descriptor for the duration of the call.
    let result = unsafe { tun_set_iff(file.as_raw_fd(), &mut request) };
    result.map_err(|errno| {
        io::Error::from(errno).with_context(format!("TUNSETIFF {name} (needs CAP_NET_ADMIN)"))
    })?;
    Ok(file)
}

/// Sets the header size to the 10 bytes of `struct virtio_net_hdr` (a persistent device may
/// have been left with another) and asks for [`OFFLOADS`].
fn enable_offloads(name: &str, file: File) -> io::Result<File> {
    let size = VNET_HDR_LEN as libc::c_int;
    #[allow(unsafe_code)]
    // SAFETY: TUNSETVNETHDRSZ reads one `int` at the pointer; `size` is a live `c_int` for the
    // duration of the call, and `file` an open, attached /dev/net/tun descriptor.
    let result = unsafe { tun_set_vnet_hdr_sz(file.as_raw_fd(), &size) };
    result
        .map_err(|errno| io::Error::from(errno).with_context(format!("TUNSETVNETHDRSZ {name}")))?;
    // TUNSETOFFLOAD takes the flags by value as the ioctl's `unsigned long` argument (not a
    // pointer): passed as a full `c_ulong`, so that no stray upper bits reach the kernel, which
    // refuses unknown flags.
    #[allow(unsafe_code)]
    // SAFETY: the call passes no pointer; `file` is an open, attached /dev/net/tun descriptor
    // for the duration of the call.
    let result = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(OFFLOADS),
        )
    };
    nix::errno::Errno::result(result)
        .map_err(|errno| io::Error::from(errno).with_context(format!("TUNSETOFFLOAD {name}")))?;
    Ok(file)
}

/// Brings the device up with its MTU, addresses and routes, with `ip` (iproute2).
pub(crate) fn configure(config: &TunConfig) -> io::Result<()> {
    let name = config.name.as_str();
    let mtu = config.mtu.to_string();
    // No IPv6 link-local address: the kernel would otherwise send router solicitations and
    // MLD reports into the tunnel on its own, which no child carries (each counted as a drop,
    // and while fenced as a fenced drop). A kernel without IPv6 refuses the setting; that
    // kernel sends nothing of the kind either.
    if let Err(error) = ip(&["link", "set", "dev", name, "addrgenmode", "none"]) {
        tracing::debug!(%error, device = name, "addrgenmode none refused (no IPv6?)");
    }
    ip(&["link", "set", "dev", name, "mtu", &mtu, "up"])?;
    for (addr, len) in &config.addresses {
        let cidr = format!("{addr}/{len}");
        match addr {
            IpAddr::V4(_) => ip(&["addr", "replace", &cidr, "dev", name])?,
            // no duplicate address detection on a point-to-point device
            IpAddr::V6(_) => ip(&["-6", "addr", "replace", &cidr, "dev", name, "nodad"])?,
        }
    }
    for (addr, len) in &config.routes {
        // `ip route` wants the network address: clear the host bits
        let network = crate::selector::prefix_selector(*addr, *len).start_addr;
        let cidr = format!("{network}/{len}");
        ip(&["route", "replace", &cidr, "dev", name])?;
    }
    Ok(())
}

trait WithContext {
    fn with_context(self, context: String) -> io::Error;
}

impl WithContext for io::Error {
    fn with_context(self, context: String) -> io::Error {
        io::Error::new(self.kind(), format!("{context}: {self}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn the_ifreq_has_the_kernel_layout() {
        assert_eq!(size_of::<IfReqFlags>(), 40);
        assert_eq!(std::mem::offset_of!(IfReqFlags, flags), 16);
    }

    #[test]
    fn bad_names_are_refused_before_any_syscall() {
        for name in ["", "a-name-that-is-too-long", "a/b", "a b"] {
            let err = open(name, true).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{name:?}");
        }
    }

    #[test]
    fn failing_ip_commands_report_their_stderr() {
        if Command::new("ip").arg("-V").output().is_err() {
            eprintln!("SKIPPED: `ip` (iproute2) is not installed");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must have iproute2"
            );
            return;
        }
        let err = ip(&["link", "show", "dev", "evpc-no-such"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("evpc-no-such"), "{err}");
    }
}
