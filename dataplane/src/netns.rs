//! Network namespaces for tests and benchmarks: private hosts on one machine (needs root).
//!
//! ```text
//!   NetNs::create("evpc-<pid>-gw") ── ip netns add ── /run/netns/<name> (a handle to the ns)
//!       │
//!       ├─ ns.ip(["addr", ...])      `ip -n <name> ...`
//!       ├─ ns.spawn(name, f)         a thread that setns(CLONE_NEWNET)s into it, then runs f:
//!       │                            sockets, TUN devices, `ip` commands and threads it creates
//!       │                            belong to the namespace, and stay there afterwards
//!       ├─ ns.run(f)                 the same, waiting for the result
//!       └─ drop                      ip netns del (its veths and TUNs go with it)
//!   veth_pair(&a, "a0", addr, &b, "b0", addr)  a cable between two namespaces
//! ```
//!
//! A namespace name starts with `evpc-<pid>-`; [`NetNs::create`] first deletes leftovers of
//! processes that no longer exist (a test killed before its drop guard ran).

use std::fs::File;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::process::Command;
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    handle: File,
}

impl NetNs {
    /// Creates `evpc-<pid>-<tag>`, with its loopback up.
    pub fn create(tag: &str) -> io::Result<NetNs> {
        cleanup_stale();
        let name = format!("evpc-{}-{tag}", std::process::id());
        // a leftover of this very process (a test that was re-run in-process)
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let handle = match File::open(format!("/run/netns/{name}")) {
            Ok(handle) => handle,
            Err(e) => {
                let _ = ip(&["netns", "del", &name]);
                return Err(io::Error::new(
                    e.kind(),
                    format!("opening /run/netns/{name}: {e}"),
                ));
            }
        };
        let ns = NetNs { name, handle };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip netns exec`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <name> ARGS`.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Moves the calling thread into the namespace. Sockets it opens from then on, and threads
    /// and processes it starts, are in the namespace.
    pub fn enter(&self) -> io::Result<()> {
        setns(self.handle.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("setns into {}: {e}", self.name),
            )
        })
    }

    /// Runs `work` on a new thread inside the namespace.
    pub fn spawn<T, F>(&self, thread_name: &str, work: F) -> io::Result<JoinHandle<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let handle = self.handle.try_clone()?;
        let name = self.name.clone();
        std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || {
                if let Err(e) = setns(handle.as_fd(), CloneFlags::CLONE_NEWNET) {
                    panic!("setns into {name}: {e}");
                }
                work()
            })
    }

    /// Runs `work` inside the namespace and returns its result (a panic in it is resumed).
    pub fn run<T, F>(&self, work: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let thread = self.spawn("evpc-netns-run", work)?;
        thread
            .join()
            .map_err(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!(
                "evpc-dataplane: could not delete network namespace {}: {e}",
                self.name
            );
        }
    }
}

/// A veth pair joining `a` and `b`, both ends up, with the given addresses.
pub fn veth_pair(
    a: &NetNs,
    a_name: &str,
    a_addr: (IpAddr, u8),
    b: &NetNs,
    b_name: &str,
    b_addr: (IpAddr, u8),
) -> io::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_name,
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ])?;
    for (ns, name, (addr, len)) in [(a, a_name, a_addr), (b, b_name, b_addr)] {
        let cidr = format!("{addr}/{len}");
        let family = if addr.is_ipv6() { "-6" } else { "-4" };
        let mut args = vec![family, "addr", "add", cidr.as_str(), "dev", name];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ns.ip(&args)?;
        ns.ip(&["link", "set", name, "up"])?;
    }
    Ok(())
}

/// Whether this process runs as root (namespaces, veth and TUN devices need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether this process may create namespaces and TUN devices. When it may not, prints a loud
/// notice that `what` is skipped — or, under `CI=true`, panics: CI runs as root, and a test
/// that silently skipped there would prove nothing.
pub fn root_or_skip(what: &str) -> bool {
    if is_root() {
        return true;
    }
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    assert!(!ci, "{what} needs root, and CI=true: refusing to skip");
    // Straight to the process's stderr: the test harness captures `eprintln!` of tests that
    // pass, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n################################################################\n\
         ### SKIPPED: {what}\n\
         ### needs root (network namespaces, veth, TUN); run as root\n\
         ################################################################\n"
    );
    false
}

/// Runs `ip ARGS`, failing with its standard error.
pub(crate) fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running `ip` (iproute2): {e}")))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Deletes `evpc-<pid>-*` namespaces whose process is gone.
fn cleanup_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("evpc-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}
