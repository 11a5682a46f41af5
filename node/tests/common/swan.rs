//! An unmodified strongSwan road warrior for the cluster tests: charon (kernel-libipsec) in
//! the lab's client namespace, UDP traffic through its tunnel, and readers of its log and of
//! `swanctl --list-sas`. Shared by the userspace cluster test and the kernel-data-plane one.
#![allow(dead_code)] // each test uses its own part

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evpc_api::AdminClient;
use evpc_node::ike_gateway::{IkeSettings, PskSecret, PskSetting};
use evpc_testkit::lab::{CLUSTER, Lab};

pub const CHARON: &str = "/usr/lib/ipsec/charon";
pub const GW_INNER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const ECHO_PORT: u16 = 7777;
pub const PSK: &str = "s3cret-psk-value-for-the-cluster";

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

/// Why the test cannot run here, if it cannot.
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

/// Skips (loudly) or, under `CI=true`, fails when the test cannot run here.
pub fn can_run(test: &str) -> bool {
    let Some(why) = missing_prerequisite() else {
        return true;
    };
    evpc_testkit::vm::skip_or_fail(
        test,
        &why,
        "run as root with strongswan-charon, strongswan-swanctl, libcharon-extra-plugins, \
         libstrongswan-extra-plugins",
    );
    false
}

/// charon in the client namespace; killed on drop. On a failing test it prints its log and
/// the nodes' logs (through `lab_logs`, filled by the test).
pub struct Charon {
    dir: PathBuf,
    ns: String,
    pid: Option<u32>,
    lab_logs: Arc<Mutex<Vec<(u64, PathBuf)>>>,
}

impl Charon {
    pub fn start(dir: &Path, ns: &str) -> Charon {
        fs::create_dir_all(dir.join("swanctl")).expect("mkdir");
        fs::create_dir_all(dir.join("run")).expect("mkdir");
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
        fs::write(dir.join("strongswan.conf"), conf).expect("strongswan.conf");
        let swanctl = format!(
            r#"connections {{
  home {{
    remote_addrs = {CLUSTER}
    vips = 0.0.0.0
    proposals = aes128gcm16-prfsha256-x25519
    encap = yes
    dpd_delay = 2s
    local  {{ auth = psk
             id = client.example }}
    remote {{ auth = psk
             id = gw.example }}
    children {{ home {{ remote_ts = 10.10.0.0/24
                      esp_proposals = aes128gcm16-x25519 }} }}
  }}
}}
secrets {{ ike-1 {{ id-1 = gw.example
                  id-2 = client.example
                  secret = "{PSK}" }} }}
"#
        );
        fs::write(dir.join("swanctl/swanctl.conf"), swanctl).expect("swanctl.conf");
        // A private /run keeps this charon's pid file away from any other one.
        let script = format!(
            "mount -t tmpfs none /run && mkdir -p /run/strongswan && \
             STRONGSWAN_CONF={d}/strongswan.conf setsid {CHARON} >{d}/charon.stdout 2>&1 & echo $! > {d}/charon.pid"
        );
        let (ok, out) = output(
            "ip",
            &["netns", "exec", ns, "unshare", "-m", "sh", "-c", &script],
        );
        assert!(ok, "starting charon: {out}");
        let pid = fs::read_to_string(dir.join("charon.pid")).expect("charon pid");
        let charon = Charon {
            dir: dir.to_owned(),
            ns: ns.to_owned(),
            pid: pid.trim().parse().ok(),
            lab_logs: Arc::new(Mutex::new(Vec::new())),
        };
        let vici = dir.join("run/charon.vici");
        wait_until(10, || vici.exists(), "charon's vici socket");
        let file = dir.join("swanctl/swanctl.conf").display().to_string();
        let (ok, out) = charon.swanctl(&["--load-all", "--file", &file]);
        assert!(ok, "swanctl --load-all: {out}");
        charon
    }

    /// On a failing test, also print the logs of `lab`'s nodes.
    pub fn follow_lab_logs(&self, lab: &Lab) {
        let mut logs = self.lab_logs.lock().unwrap();
        for id in 1..=lab.spec.nodes {
            logs.push((id, lab.dir().join(format!("node{id}/node.log"))));
        }
    }

    pub fn swanctl(&self, args: &[&str]) -> (bool, String) {
        let uri = format!("unix://{}", self.dir.join("run/charon.vici").display());
        let mut all = vec!["netns", "exec", &self.ns, "swanctl"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--uri", &uri]);
        output("ip", &all)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    pub fn list_sas(&self) -> String {
        let (ok, out) = self.swanctl(&["--list-sas"]);
        assert!(ok, "swanctl --list-sas: {out}");
        out
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
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
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("---- charon.log (last 200 lines) ----");
            for line in &lines[lines.len().saturating_sub(200)..] {
                eprintln!("{line}");
            }
            for (id, path) in self.lab_logs.lock().unwrap().iter() {
                let log = fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("---- node {id} log (last 120 lines) ----");
                for line in &lines[lines.len().saturating_sub(120)..] {
                    eprintln!("{line}");
                }
            }
        }
    }
}

pub fn wait_until(secs: u64, mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {secs} s waiting for {what}");
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

// ---------------------------------------------------------------- traffic through the tunnel

/// A UDP echo server on every node, and a client sending a numbered probe every 20 ms.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    probing: Arc<AtomicBool>,
    /// (sequence, sent, received) of every answered probe.
    replies: Arc<Mutex<Vec<(u64, Instant, Instant)>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    pub fn start(lab: &Lab) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let probing = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        for id in 1..=lab.spec.nodes {
            let stop = stop.clone();
            threads.push(
                lab.node_ns(id)
                    .spawn("udp-echo", move || echo(&stop))
                    .expect("echo thread"),
            );
        }
        let (s, p, r) = (stop.clone(), probing.clone(), replies.clone());
        threads.push(
            lab.client_ns()
                .spawn("udp-probe", move || probe(&s, &p, &r))
                .expect("probe thread"),
        );
        Traffic {
            stop,
            probing,
            replies,
            threads,
        }
    }

    pub fn set_probing(&self, on: bool) {
        self.probing.store(on, Ordering::Release);
    }

    /// Replies received after `t`.
    pub fn replies_after(&self, t: Instant) -> Vec<(u64, Instant, Instant)> {
        self.replies
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, received)| *received > t)
            .copied()
            .collect()
    }

    pub fn wait_flowing(&self, after: Instant, secs: u64, what: &str) {
        wait_until(secs, || self.replies_after(after).len() >= 10, what);
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

pub fn echo(stop: &AtomicBool) {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, ECHO_PORT)).expect("bind echo");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::Acquire) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

pub fn probe(
    stop: &AtomicBool,
    probing: &AtomicBool,
    replies: &Mutex<Vec<(u64, Instant, Instant)>>,
) {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind probe");
    socket
        .set_read_timeout(Some(Duration::from_millis(5)))
        .expect("timeout");
    let target = SocketAddr::from((GW_INNER, ECHO_PORT));
    let started = Instant::now();
    let mut sent_at: Vec<Instant> = Vec::new();
    let mut next = Instant::now();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Acquire) {
        if Instant::now() >= next {
            next += Duration::from_millis(20);
            if probing.load(Ordering::Acquire) {
                let seq = sent_at.len() as u64;
                sent_at.push(Instant::now());
                let _ = socket.send_to(&seq.to_be_bytes(), target);
            }
        }
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && n == 8
        {
            let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
            if let Some(sent) = sent_at.get(seq as usize) {
                replies.lock().unwrap().push((seq, *sent, Instant::now()));
            }
        }
        if started.elapsed() > Duration::from_secs(600) {
            break;
        }
    }
}

// ---------------------------------------------------------------- the test

pub fn settings(psk_file: PathBuf) -> IkeSettings {
    IkeSettings {
        local_id: "gw.example".into(),
        psk_file: Some(psk_file),
        psk: vec![PskSetting {
            peer: "other.example".into(),
            secret: PskSecret::new("an-inline-key-for-another-peer"),
            remote_ts: None,
        }],
        pool: Some("10.10.0.0/24".into()),
        dns: vec![GW_INNER],
        local_ts: vec!["10.10.0.0/24".into()],
        // Our DPD runs while ESP flows (strongSwan's only when nothing comes in at all).
        dpd_s: 3,
        ..IkeSettings::default()
    }
}

pub async fn the_sa(admin: &mut AdminClient) -> evpc_proto::admin::v1::SaInfo {
    let sas = admin.all_sas(None).await.expect("list SAs");
    assert_eq!(sas.len(), 1, "one IKE SA in the cluster: {sas:?}");
    sas.into_iter().next().expect("one")
}
