//! The TUN device that carries the inner traffic of the userspace backend.
//!
//! ```text
//!  open /dev/net/tun ─► ioctl(TUNSETIFF, IFF_TUN | IFF_NO_PI) ─► ip link set NAME addrgenmode none
//!                                                              ─► ip link set NAME mtu M up
//!                                                              ─► ip addr replace A/P dev NAME
//!                                                              ─► ip route replace P dev NAME
//! ```
//!
//! With `IFF_NO_PI` every `read` returns exactly one bare IP packet and every `write` injects
//! one (Linux `Documentation/networking/tuntap.rst`). The device is not persistent: it, its
//! addresses and its routes disappear when the last descriptor closes (when the driver is
//! dropped). It lives in the network namespace of the thread that creates it, as do the `ip`
//! commands run from that thread.

use crate::netns::ip;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

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

/// Opens (creating if needed) the TUN device `name` in the calling thread's network namespace.
/// The returned file is non-blocking.
pub(crate) fn open(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/', ' ']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid TUN device name {name:?} (1 to 15 bytes, no '/', space or NUL)"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
    let mut request = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
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
            let err = open(name).unwrap_err();
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
