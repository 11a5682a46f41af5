//! An unmodified strongSwan road warrior: charon with `kernel-libipsec` (ESP in userspace
//! through a TUN, so it runs on kernels without ESP) in a network namespace, configured and
//! driven with swanctl, and readers of what it logged and lists.
//!
//! ```text
//!  Charon::start(dir, ns, &RoadWarrior)
//!    dir/strongswan.conf, dir/swanctl/swanctl.conf (PSK, a virtual IP asked for, NAT-T forced)
//!    ip netns exec NS unshare -m sh -c 'mount -t tmpfs none /run; charon &'   (a private /run:
//!    its pid file and vici socket apart from any other charon)
//!    swanctl --load-all ─► initiate() ─► list_sas() / log()
//!  drop: SIGTERM, then SIGKILL
//! ```
//!
//! The recipe (packages, plugins, the private /run) was verified on this machine kind:
//! `shared/notes/strongswan-in-netns.md`.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// charon, as Debian installs it.
pub const CHARON: &str = "/usr/lib/ipsec/charon";

/// Runs `cmd args`, returning whether it succeeded and what it printed (stdout, then stderr).
pub fn output(cmd: &str, args: &[&str]) -> (bool, String) {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stderr));
            (o.status.success(), s)
        }
        Err(e) => (false, e.to_string()),
    }
}

/// Why strongSwan cannot run here, if it cannot.
pub fn missing_prerequisite() -> Option<String> {
    if !evpc_dataplane::netns::is_root() {
        return Some("not running as root".into());
    }
    if !Path::new(CHARON).exists() {
        return Some(format!(
            "{CHARON} missing (apt-get install strongswan-charon)"
        ));
    }
    let swanctl = Command::new("swanctl")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if swanctl.is_err() {
        return Some("swanctl missing (apt-get install strongswan-swanctl)".into());
    }
    if !output("ip", &["-V"]).0 {
        return Some("iproute2 missing".into());
    }
    None
}

/// What one road warrior is configured with.
#[derive(Clone, Debug)]
pub struct RoadWarrior {
    /// Its IKE identity (an FQDN).
    pub id: String,
    /// The gateway's address and identity.
    pub gateway: Ipv4Addr,
    pub gateway_id: String,
    /// The pre-shared key (never logged by this module).
    pub psk: String,
    /// What it routes into the tunnel (`10.10.0.0/24`).
    pub remote_ts: String,
    /// strongSwan's DPD interval (it probes only when nothing arrives).
    pub dpd_delay_s: u32,
}

/// A running charon in a namespace; stopped on drop.
#[derive(Debug)]
pub struct Charon {
    dir: PathBuf,
    ns: String,
    pid: Option<u32>,
}

impl Charon {
    /// Writes the configuration into `dir`, starts charon in namespace `ns` and loads the
    /// connection `home` (not initiated yet: [`Charon::initiate`]).
    pub fn start(dir: &Path, ns: &str, rw: &RoadWarrior) -> anyhow::Result<Charon> {
        fs::create_dir_all(dir.join("swanctl"))?;
        fs::create_dir_all(dir.join("run"))?;
        let d = dir.display();
        let conf = format!(
            r#"charon {{
  retransmit_timeout = 2.0
  retransmit_base = 1.4
  load = random nonce aes sha1 sha2 hmac gcm curve25519 openssl pem pkcs1 x509 revocation constraints pubkey kdf socket-default kernel-libipsec kernel-netlink vici updown
  filelog {{ log {{ path = {d}/charon.log
      time_format = %H:%M:%S
      flush_line = yes
      default = 1
      ike = 2
      enc = 1 }} }}
  plugins {{
    vici {{ socket = unix://{d}/run/charon.vici }}
    kernel-libipsec {{ allow_peer_ts = yes }}
  }}
}}
"#
        );
        fs::write(dir.join("strongswan.conf"), conf)?;
        let RoadWarrior {
            id,
            gateway,
            gateway_id,
            psk,
            remote_ts,
            dpd_delay_s,
        } = rw;
        let swanctl = format!(
            r#"connections {{
  home {{
    remote_addrs = {gateway}
    vips = 0.0.0.0
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    dpd_delay = {dpd_delay_s}s
    local  {{ auth = psk
             id = {id} }}
    remote {{ auth = psk
             id = {gateway_id} }}
    children {{ home {{ remote_ts = {remote_ts}
                      esp_proposals = aes128gcm16-x25519 }} }}
  }}
}}
secrets {{ ike-1 {{ id-1 = {gateway_id}
                  id-2 = {id}
                  secret = "{psk}" }} }}
"#
        );
        let conf_file = dir.join("swanctl/swanctl.conf");
        fs::write(&conf_file, swanctl)?;
        // The PSK is in it: owner-only.
        fs::set_permissions(
            &conf_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        let script = format!(
            "mount -t tmpfs none /run && mkdir -p /run/strongswan && \
             STRONGSWAN_CONF={d}/strongswan.conf setsid {CHARON} >{d}/charon.stdout 2>&1 & echo $! > {d}/charon.pid"
        );
        let (ok, out) = output(
            "ip",
            &["netns", "exec", ns, "unshare", "-m", "sh", "-c", &script],
        );
        if !ok {
            bail!("starting charon in {ns}: {out}");
        }
        let pid = fs::read_to_string(dir.join("charon.pid")).context("charon's pid")?;
        let charon = Charon {
            dir: dir.to_owned(),
            ns: ns.to_owned(),
            pid: pid.trim().parse().ok(),
        };
        let vici = dir.join("run/charon.vici");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vici.exists() {
            if Instant::now() > deadline {
                bail!(
                    "charon in {ns} opened no vici socket within 10 s: {}",
                    charon.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let file = conf_file.display().to_string();
        let (ok, out) = charon.swanctl(&["--load-all", "--file", &file]);
        if !ok {
            bail!("swanctl --load-all in {ns}: {out}");
        }
        Ok(charon)
    }

    /// swanctl against this charon.
    pub fn swanctl(&self, args: &[&str]) -> (bool, String) {
        let uri = format!("unix://{}", self.dir.join("run/charon.vici").display());
        let mut all = vec!["netns", "exec", &self.ns, "swanctl"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--uri", &uri]);
        output("ip", &all)
    }

    /// Brings the tunnel up (IKE_SA_INIT, IKE_AUTH with the child), waiting up to `timeout`.
    pub fn initiate(&self, timeout: Duration) -> anyhow::Result<()> {
        let secs = timeout.as_secs().max(1).to_string();
        let (ok, out) = self.swanctl(&["--initiate", "--child", "home", "--timeout", &secs]);
        if !ok {
            bail!("swanctl --initiate in {}: {out}", self.ns);
        }
        Ok(())
    }

    /// Everything charon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    /// `swanctl --list-sas`.
    pub fn list_sas(&self) -> anyhow::Result<String> {
        let (ok, out) = self.swanctl(&["--list-sas"]);
        if !ok {
            bail!("swanctl --list-sas in {}: {out}", self.ns);
        }
        Ok(out)
    }

    /// charon's process id.
    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// The directory of its configuration and log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        let Some(pid) = self.pid else { return };
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let gone = || {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |s| s.split_whitespace().nth(2) == Some("Z"))
        };
        let deadline = Instant::now() + Duration::from_secs(3);
        while !gone() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !gone() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    }
}

/// The IKE SA's SPIs as swanctl prints them ("<spi_i>_i* <spi_r>_r").
pub fn ike_spis(list: &str) -> Option<(String, String)> {
    let line = list.lines().find(|l| l.starts_with("home: #"))?;
    let spis = line.split(", ").last()?;
    let mut it = spis.split_whitespace();
    let spi_i = it.next()?.split('_').next()?.to_owned();
    let spi_r = it.next()?.split('_').next()?.to_owned();
    Some((spi_i, spi_r))
}

/// Inbound SPIs of the installed child SAs.
pub fn child_spis(list: &str) -> Vec<String> {
    list.lines()
        .filter(|l| l.trim_start().starts_with("in "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|s| s.trim_end_matches(',').to_owned())
        .collect()
}

/// The inner address strongSwan got ("... [10.10.0.x]" on the local line).
pub fn virtual_ip(list: &str) -> Option<String> {
    let line = list
        .lines()
        .find(|l| l.trim_start().starts_with("local  '"))?;
    let start = line.rfind('[')?;
    Some(line[start + 1..].trim_end_matches(']').to_owned())
}

/// The log after byte `from`.
pub fn since(log: &str, from: usize) -> &str {
    log.get(from..).unwrap_or("")
}

/// Message IDs of exchanges strongSwan started and got answered (`generating X request N` then
/// `parsed X response N`) in `log`.
pub fn answered_requests(log: &str, exchange: &str) -> Vec<u32> {
    let sent: Vec<u32> = ids_after(log, &format!("generating {exchange} request "));
    let answered: Vec<u32> = ids_after(log, &format!("parsed {exchange} response "));
    sent.into_iter()
        .filter(|id| answered.contains(id))
        .collect()
}

/// The numbers right after each occurrence of `needle` in `log`.
pub fn ids_after(log: &str, needle: &str) -> Vec<u32> {
    log.match_indices(needle)
        .filter_map(|(at, _)| {
            log[at + needle.len()..]
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = "home: #1, ESTABLISHED, IKEv2, 8a1f2e3d4c5b6a79_i* 1122334455667788_r
  local  'client.example' @ 198.51.100.100[4500] [10.10.0.2]
  remote 'gw.example' @ 198.51.100.1[4500]
  home: #1, reqid 1, INSTALLED, TUNNEL-in-UDP, ESP:AES_GCM_16-128
    in  c1a2b3c4,    120 bytes,     2 packets
    out 0a0b0c0d,    120 bytes,     2 packets
";

    #[test]
    fn swanctl_lists_are_read() {
        assert_eq!(
            ike_spis(LIST),
            Some(("8a1f2e3d4c5b6a79".into(), "1122334455667788".into()))
        );
        assert_eq!(child_spis(LIST), vec!["c1a2b3c4".to_string()]);
        assert_eq!(virtual_ip(LIST).as_deref(), Some("10.10.0.2"));
        assert_eq!(ike_spis("nothing"), None);
    }

    #[test]
    fn answered_requests_need_both_lines() {
        let log = "generating INFORMATIONAL request 2 [ ]\nparsed INFORMATIONAL response 2 [ ]\n\
                   generating INFORMATIONAL request 3 [ ]\n";
        assert_eq!(answered_requests(log, "INFORMATIONAL"), vec![2]);
        assert_eq!(ids_after(log, "request "), vec![2, 3]);
        assert_eq!(since(log, 10_000), "");
    }
}
