//! # A throwaway VM whose kernel has ESP
//!
//! The machines evpc is developed and tested on run a kernel with XFRM netlink but without
//! ESP, so the kernel data plane (`backend = "xfrm"`) cannot carry a packet there. The
//! distribution's own kernel can: this module boots it under QEMU (software emulation, TCG:
//! the nested `/dev/kvm` here cannot boot a stock kernel) with the host's root file system
//! mounted read-only plus a writable tmpfs overlay, so a test binary built on the host runs
//! inside unchanged, as root, with its own network namespaces and the kernel's ESP.
//!
//! ```text
//!  host                                             guest (microvm, 2 vCPUs, TCG)
//!  Image::prepare ─ /boot/vmlinuz-V (a kernel whose /lib/modules/V has esp4.ko)
//!     │             └ vmlinux extracted once (boots directly, PVH: skips decompression)
//!     │             initrd: busybox-static + virtio/9p/overlay modules + INIT ──► /init
//!  Vm::run(script) ─ qemu-system-x86_64 ─ 9p "host" = / (read-only) ────────► lower of /
//!     │                                   tmpfs overlay ──────────────────► upper of /
//!     │                                   9p "out" = a temporary directory ► /out
//!     │                                                                      switch_root
//!     │                                                                      /bin/sh /out/cmd.sh
//!     │                                                                        > /out/output
//!     ◄── Outcome { status (/out/rc), output, console } ◄───────────────────  poweroff
//!
//!  a test:  #[test] fn t() { if vm::inside() { body() } else { vm::run_test("t", opts) } }
//!           run_test re-executes this very test binary in the VM with EVPC_IN_VM=1
//! ```
//!
//! A run takes about 4 s of boot plus the command, which runs several times slower than on
//! the host (every instruction is emulated): tests written for the VM use generous timeouts.
//! VMs of one process run one at a time (two would share two cores).
//!
//! What the host needs (`.ci/run` installs it): root, `qemu-system-x86` (with qboot), a
//! kernel with ESP modules in `/boot` (`linux-image-amd64`), `busybox-static`, `python3`
//! (to unpack the kernel), `modinfo`. Without them [`run_test`] skips with a loud message,
//! and under `CI=true` it fails instead.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The environment variable that tells a test binary it runs inside the VM.
pub const INSIDE: &str = "EVPC_IN_VM";

/// Modules the initramfs loads before it can mount the host's root: virtio transport, 9p,
/// overlayfs (dependency order; ones built into the kernel are skipped).
const INITRD_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
    "overlay",
];

/// The initramfs's `/init` (busybox sh). It mounts the host root read-only over 9p with a
/// tmpfs overlay, moves /proc /sys /dev there, mounts a fresh /run, /dev/pts, /dev/shm and
/// the read-write share at /out (not over /tmp: a checkout or build there must stay visible;
/// writes to it land in the overlay), then `switch_root`s — not `chroot`: the kernel's module
/// autoload (`request_module` → /sbin/modprobe, e.g. for `rfc4106(gcm(aes))`) must see the
/// real root, not the initramfs.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m.ko 2>/dev/null; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /lower || { echo "evpc-vm: 9p mount of the host root failed"; poweroff -f; }
mount -t tmpfs -o mode=0755 rw /rw; mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || { echo "evpc-vm: overlay failed"; poweroff -f; }
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mount -t tmpfs -o mode=0755 tmpfs /newroot/run
mkdir -p /newroot/dev/pts /newroot/dev/shm /newroot/run/lock /newroot/run/netns
mount -t devpts devpts /newroot/dev/pts; mount -t tmpfs tmpfs /newroot/dev/shm
mkdir -p /newroot/out; mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out /newroot/out || { echo "evpc-vm: 9p mount of /out failed"; poweroff -f; }
cat > /newroot/run/vm-stage2 <<'EOT'
#!/bin/sh
cd /; export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=dumb
echo "evpc-vm: running /out/cmd.sh at uptime $(cut -d' ' -f1 /proc/uptime)"
/bin/sh /out/cmd.sh > /out/output 2>&1
rc=$?
echo "evpc-vm: exit=$rc"; echo $rc > /out/rc; sync
busybox poweroff -f 2>/dev/null; echo o > /proc/sysrq-trigger; while :; do :; done
EOT
exec switch_root /newroot /bin/sh /run/vm-stage2
"#;

/// How to run a VM.
#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Killed after this long (boot included).
    pub timeout: Duration,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
}

impl Default for VmOptions {
    fn default() -> VmOptions {
        VmOptions {
            timeout: Duration::from_secs(180),
            memory_mib: 1024,
            cpus: 2,
        }
    }
}

/// What a VM run produced.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The command's exit status (`None`: the VM ended without reporting one — a timeout, a
    /// kernel panic, a failed boot; see `console`).
    pub status: Option<i32>,
    /// The command's stdout and stderr.
    pub output: String,
    /// The VM's serial console (boot messages, kernel oopses).
    pub console: String,
    /// Boot to poweroff.
    pub elapsed: Duration,
    /// The run was killed at the timeout.
    pub timed_out: bool,
}

impl Outcome {
    /// Exit status 0.
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// A kernel with ESP and an initramfs for it, ready to boot.
#[derive(Debug)]
pub struct Image {
    /// The kernel's release (`uname -r` inside).
    pub release: String,
    kernel: PathBuf,
    initrd: PathBuf,
    _dir: tempfile::TempDir,
}

/// True inside the VM (the test binary was started by [`run_test`]).
pub fn inside() -> bool {
    std::env::var(INSIDE).as_deref() == Ok("1")
}

/// Why no VM can run on this host, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("python3", "python3"),
        ("modinfo", "kmod"),
    ] {
        if Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return Some(format!("{tool} missing (apt-get install {package})"));
        }
    }
    if !Path::new(QBOOT).exists() {
        return Some(format!("{QBOOT} missing (apt-get install qemu-system-x86)"));
    }
    if let Err(e) = busybox() {
        return Some(e.to_string());
    }
    if let Err(e) = find_kernel() {
        return Some(e.to_string());
    }
    None
}

/// The firmware: QEMU's default one resets early in a few boots of a microvm.
const QBOOT: &str = "/usr/share/qemu/qboot.rom";

fn busybox() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from("/bin/busybox");
    let bytes = fs::read(&path)
        .map_err(|_| anyhow::anyhow!("/bin/busybox missing (apt-get install busybox-static)"))?;
    // A dynamically linked busybox cannot run from the initramfs, which has no libc.
    if has_interpreter(&bytes) {
        bail!("/bin/busybox is dynamically linked (apt-get install busybox-static)");
    }
    Ok(path)
}

/// Whether an ELF64 executable names a program interpreter (PT_INTERP): dynamically linked.
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return true;
    };
    (0..usize::from(phnum)).any(|i| {
        let at = phoff as usize + i * usize::from(phentsize);
        elf.get(at..at + 4) == Some(&PT_INTERP.to_le_bytes()[..])
    })
}

/// The newest kernel in /boot whose modules include ESP (`esp4.ko`), as (release, vmlinuz).
fn find_kernel() -> anyhow::Result<(String, PathBuf)> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/boot").context("reading /boot")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(release) = name.strip_prefix("vmlinuz-") else {
            continue;
        };
        let esp = Path::new("/lib/modules")
            .join(release)
            .join("kernel/net/ipv4/esp4.ko");
        if esp.exists() {
            found.push((release.to_string(), entry.path()));
        }
    }
    found.sort_by_key(|(release, _)| version_key(release));
    found.pop().ok_or_else(|| {
        anyhow::anyhow!("no kernel with ESP modules in /boot (apt-get install linux-image-amd64)")
    })
}

fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

impl Image {
    /// Finds the kernel, unpacks it and builds the initramfs (once per process).
    pub fn get() -> anyhow::Result<&'static Image> {
        static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
        IMAGE
            .get_or_init(|| Image::prepare().map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow::anyhow!("preparing the VM image: {e}"))
    }

    fn prepare() -> anyhow::Result<Image> {
        let (release, vmlinuz) = find_kernel()?;
        let dir = tempfile::Builder::new()
            .prefix("evpc-vm-image-")
            .tempdir()
            .context("creating the VM image directory")?;
        let kernel = dir.path().join("vmlinux");
        extract_vmlinux(&vmlinuz, &kernel)?;
        let initrd = dir.path().join("initrd.cpio");
        build_initrd(&release, &initrd)?;
        Ok(Image {
            release,
            kernel,
            initrd,
            _dir: dir,
        })
    }

    /// Boots the VM and runs `script` (POSIX sh, as root, from `/`) inside.
    pub fn run(&self, script: &str, options: &VmOptions) -> anyhow::Result<Outcome> {
        // One VM at a time on this machine (each takes both cores, and a guest starved of
        // CPU misses its own timers): within the process, then across processes.
        static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
        let _machine_turn = machine_lock()?;
        let out = tempfile::Builder::new()
            .prefix("evpc-vm-out-")
            .tempdir()
            .context("creating the VM's /out")?;
        fs::write(out.path().join("cmd.sh"), script).context("writing /out/cmd.sh")?;
        let console_path = out.path().join("console");
        let console = fs::File::create(&console_path).context("creating the console log")?;
        let tsc_khz = tsc_khz();
        let append = format!(
            "console=ttyS0 quiet loglevel=1 panic=-1 tsc_early_khz={tsc_khz} \
             transparent_hugepage=never"
        );
        let started = Instant::now();
        let mut qemu = Command::new("qemu-system-x86_64")
            .args(["-M", "microvm,pit=on,pic=on,rtc=on", "-bios", QBOOT])
            .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .args(["-smp", &options.cpus.to_string()])
            .args(["-m", &format!("{}M", options.memory_mib)])
            .args([
                "-nographic",
                "-no-reboot",
                "-nodefaults",
                "-serial",
                "stdio",
            ])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &append])
            .args([
                "-fsdev",
                "local,id=r,path=/,security_model=none,readonly=on,multidevs=remap",
                "-device",
                "virtio-9p-device,fsdev=r,mount_tag=host",
            ])
            .arg("-fsdev")
            .arg(format!(
                "local,id=o,path={},security_model=none",
                out.path().display()
            ))
            .args(["-device", "virtio-9p-device,fsdev=o,mount_tag=out"])
            .stdin(Stdio::null())
            .stdout(console.try_clone().context("console log")?)
            .stderr(console)
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let mut timed_out = false;
        loop {
            if qemu.try_wait().context("waiting for qemu")?.is_some() {
                break;
            }
            if started.elapsed() > options.timeout {
                timed_out = true;
                let _ = qemu.kill();
                let _ = qemu.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let read = |name: &str| {
            fs::read(out.path().join(name))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        Ok(Outcome {
            status: read("rc").trim().parse().ok(),
            output: read("output"),
            console: read("console"),
            elapsed: started.elapsed(),
            timed_out,
        })
    }
}

/// An exclusive lock on `/tmp/evpc-vm.lock`, held while a VM runs (released on drop, or
/// by the kernel when the holder dies).
fn machine_lock() -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/evpc-vm.lock")
        .context("opening /tmp/evpc-vm.lock")?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking /tmp/evpc-vm.lock: {e}"))
}

/// The host's TSC rate: without `tsc_early_khz` about one boot in ten hangs calibrating the
/// TSC against the PIT (a microvm has no HPET); under TCG the guest's TSC runs at the host's.
fn tsc_khz() -> u64 {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(2_000_000)
}

/// Unpacks the ELF kernel from an xz-compressed bzImage: it boots directly (PVH) and skips
/// the decompression, which takes seconds under TCG. Other compressions boot as they are.
fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> anyhow::Result<()> {
    const UNPACK: &str = r#"
import lzma, sys
d = open(sys.argv[1], 'rb').read()
off = d.find(b'\xfd7zXZ\x00')
if off < 0:
    sys.exit(3)
o = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(d[off:])
if o[:4] != b'\x7fELF':
    sys.exit(3)
open(sys.argv[2], 'wb').write(o)
"#;
    let status = Command::new("python3")
        .args(["-c", UNPACK])
        .arg(vmlinuz)
        .arg(out)
        .status()
        .context("running python3 to unpack the kernel")?;
    match status.code() {
        Some(0) => Ok(()),
        Some(3) => {
            fs::copy(vmlinuz, out).with_context(|| format!("copying {}", vmlinuz.display()))?;
            Ok(())
        }
        _ => bail!("unpacking {} failed: {status}", vmlinuz.display()),
    }
}

/// The initramfs as an uncompressed cpio (newc) archive: busybox, the modules, `/init`.
fn build_initrd(release: &str, out: &Path) -> anyhow::Result<()> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin", "mods", "proc", "sys", "dev", "lower", "rw", "newroot",
    ] {
        cpio.dir(dir);
    }
    cpio.file("bin/busybox", 0o755, &fs::read(busybox()?)?);
    let mut order = String::new();
    for module in INITRD_MODULES {
        let found = Command::new("modinfo")
            .args(["-k", release, "-n", module])
            .output()
            .context("running modinfo")?;
        let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
        if !found.status.success() || !path.ends_with(".ko") {
            // built in (modinfo prints "(builtin)"), or not needed by this kernel
            continue;
        }
        let bytes = fs::read(&path).with_context(|| format!("reading {path}"))?;
        cpio.file(&format!("mods/{module}.ko"), 0o644, &bytes);
        order.push_str(module);
        order.push('\n');
    }
    cpio.file("mods/order", 0o644, order.as_bytes());
    cpio.file("init", 0o755, INIT.as_bytes());
    let mut file = fs::File::create(out).context("creating the initramfs")?;
    file.write_all(&cpio.finish())
        .context("writing the initramfs")?;
    Ok(())
}

/// A cpio archive in the "newc" format the kernel unpacks as its initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.inode += 1;
        let fields = [
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

/// Quotes `s` for POSIX sh.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A test that cannot run here because of `why`: under `CI=true` it panics (CI installs
/// everything, so a missing prerequisite is a failure); otherwise it prints a banner that
/// nobody misses, with `hint` saying what to install, and the test returns.
pub fn skip_or_fail(test: &str, why: &str, hint: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} cannot run under CI=true: {why}"
    );
    eprintln!(
        "\n################################################################\n\
         ### SKIPPED {test}: {why}\n\
         ### ({hint})\n\
         ################################################################\n"
    );
}

/// Skips (loudly) or, under `CI=true`, panics when no VM can run on this host. Returns true
/// when one can.
pub fn can_run(test: &str) -> bool {
    let Some(why) = unavailable() else {
        return true;
    };
    skip_or_fail(
        test,
        &format!("no VM with a kernel that has ESP: {why}"),
        "run as root with qemu-system-x86, linux-image-amd64, busybox-static and kmod \
         installed; .ci/run installs them",
    );
    false
}

/// Inside the VM: loads `modules` and creates (then deletes) one AES-GCM ESP state, in the
/// calling thread's network namespace. Under emulation the first `rfc4106(gcm(aes))` (module
/// loads, the crypto self-tests) takes seconds — longer than a data plane waits for the
/// kernel's answer; `ip` waits as long as it takes. Returns how long it took.
pub fn warm_up_esp(modules: &[&str]) -> Duration {
    let started = Instant::now();
    if !modules.is_empty() {
        let _ = Command::new("modprobe").arg("-a").args(modules).status();
    }
    let key = format!("0x{}", "11".repeat(20));
    let id = [
        "src",
        "192.0.2.1",
        "dst",
        "192.0.2.2",
        "proto",
        "esp",
        "spi",
        "0x1",
    ];
    let ip = |args: Vec<&str>| {
        let out = Command::new("ip").args(&args).output().expect("running ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mut add = vec!["xfrm", "state", "add"];
    add.extend(id);
    add.extend(["mode", "tunnel", "aead", "rfc4106(gcm(aes))", &key, "128"]);
    ip(add);
    let mut delete = vec!["xfrm", "state", "delete"];
    delete.extend(id);
    ip(delete);
    started.elapsed()
}

/// On the host: runs the test `name` of the running test binary inside a VM (with
/// [`INSIDE`] set, so the test runs its body there) and panics with its output if it fails.
/// Skips loudly when no VM can run here (see [`can_run`]). Returns the run's outcome.
///
/// Environment variables starting with `EVPC_` or `RUST_` pass into the VM.
pub fn run_test(name: &str, options: &VmOptions) -> Option<Outcome> {
    if !can_run(name) {
        return None;
    }
    let image = Image::get().unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let exe = std::env::current_exe().expect("the test binary's path");
    let cwd = std::env::current_dir().expect("the working directory");
    let mut script = String::from("set -e\n");
    script.push_str(&format!("cd {}\n", sh_quote(&cwd.to_string_lossy())));
    for (key, value) in std::env::vars() {
        if (key.starts_with("EVPC_") || key.starts_with("RUST_") || key == "CI")
            && key != INSIDE
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            script.push_str(&format!("export {key}={}\n", sh_quote(&value)));
        }
    }
    script.push_str(&format!("export {INSIDE}=1\n"));
    script.push_str("echo \"kernel $(uname -r), $(nproc) CPUs\"\n");
    script.push_str(&format!(
        "exec {} --exact {} --include-ignored --nocapture --test-threads=1\n",
        sh_quote(&exe.to_string_lossy()),
        sh_quote(name)
    ));
    let outcome = image
        .run(&script, options)
        .unwrap_or_else(|e| panic!("{name}: running the VM: {e:#}"));
    eprintln!(
        "---- {name} in a VM (kernel {}), {:.1} s ----\n{}",
        image.release,
        outcome.elapsed.as_secs_f64(),
        outcome.output
    );
    if !outcome.success() {
        panic!(
            "{name} failed in the VM (status {:?}{}); console:\n{}",
            outcome.status,
            if outcome.timed_out {
                format!(", killed after {:?}", options.timeout)
            } else {
                String::new()
            },
            outcome.console
        );
    }
    Some(outcome)
}
