//! An unmodified strongSwan road warrior against a 3-node evpc cluster, through the owner's
//! death (needs root and strongSwan; `.ci/run` installs it).
//!
//! Topology (`evpc_node::ike_gateway::lab`): a client namespace running charon with
//! kernel-libipsec (TUN `ipsec0`, ESP in UDP 4500) and three node namespaces on one bridge; the
//! client maps the cluster address 198.51.100.1 to a multicast MAC, so every node receives
//! every packet for it and only the SA's owner answers. Each node's TUN `evpc0` holds
//! 10.10.0.1/24, where a UDP echo server answers; the inner-address pool is 10.10.0.0/24.
//!
//! What is checked:
//! 1. strongSwan (PSK, aes128gcm16-prfsha256-x25519, `vips = 0.0.0.0`, `remote_ts =
//!    10.10.0.0/24`, `dpd_delay = 2s`) connects; the SA is in the replicated state with the
//!    inner address strongSwan got; UDP echoes through the tunnel; the gateway's DPD is
//!    answered.
//! 2. The node owning the SA is SIGKILLed while traffic flows. Another node takes the SA over:
//!    strongSwan's DPD is answered by it, the gateway's own DPD comes from it, traffic resumes
//!    (the outage is printed), and strongSwan's IKE SA is the same one (same SPIs in `swanctl
//!    --list-sas`; exactly one IKE_SA_INIT and one IKE_AUTH in charon.log).
//! 3. After the failover, a child rekey and an IKE rekey (both from strongSwan, with PFS)
//!    succeed on the new owner, traffic flows on the new child, and the replicated record
//!    follows the new IKE SPIs in place (same id, rekey generation 1).
//!
//! Skips loudly when not root or strongSwan is missing; under `CI=true` that is a failure.
//! Every namespace and process is removed on every exit path (guards' `Drop`), and on failure
//! charon's log and the nodes' logs are printed.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evpc_api::AdminClient;
use evpc_node::ike_gateway::lab::{CLUSTER, Lab, LabSpec};
use evpc_node::ike_gateway::{IkeSettings, PskSecret, PskSetting};

const CHARON: &str = "/usr/lib/ipsec/charon";
const GW_INNER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
const ECHO_PORT: u16 = 7777;
const PSK: &str = "s3cret-psk-value-for-the-cluster";

fn output(cmd: &str, args: &[&str]) -> (bool, String) {
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
fn missing_prerequisite() -> Option<String> {
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
fn can_run(test: &str) -> bool {
    let Some(why) = missing_prerequisite() else {
        return true;
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} cannot run under CI=true: {why}"
    );
    eprintln!(
        "\n################################################################\n\
         ### SKIPPED {test}: {why}\n\
         ### (run as root with strongswan-charon, strongswan-swanctl,\n\
         ###  libcharon-extra-plugins, libstrongswan-extra-plugins)\n\
         ################################################################\n"
    );
    false
}

/// charon in the client namespace; killed on drop. On a failing test it prints its log and
/// the nodes' logs (through `lab_logs`, filled by the test).
struct Charon {
    dir: PathBuf,
    ns: String,
    pid: Option<u32>,
    lab_logs: Arc<Mutex<Vec<(u64, PathBuf)>>>,
}

impl Charon {
    fn start(dir: &Path, ns: &str) -> Charon {
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

    fn swanctl(&self, args: &[&str]) -> (bool, String) {
        let uri = format!("unix://{}", self.dir.join("run/charon.vici").display());
        let mut all = vec!["netns", "exec", &self.ns, "swanctl"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--uri", &uri]);
        output("ip", &all)
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("charon.log")).unwrap_or_default()
    }

    fn list_sas(&self) -> String {
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

fn wait_until(secs: u64, mut cond: impl FnMut() -> bool, what: &str) {
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
fn ike_spis(list: &str) -> Option<(String, String)> {
    let line = list.lines().find(|l| l.starts_with("home: #"))?;
    let spis = line.split(", ").last()?;
    let mut it = spis.split_whitespace();
    let spi_i = it.next()?.split('_').next()?.to_owned();
    let spi_r = it.next()?.split('_').next()?.to_owned();
    Some((spi_i, spi_r))
}

/// Inbound SPIs of the installed child SAs.
fn child_spis(list: &str) -> Vec<String> {
    list.lines()
        .filter(|l| l.trim_start().starts_with("in "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|s| s.trim_end_matches(',').to_owned())
        .collect()
}

/// The inner address strongSwan got ("... [10.10.0.x]" on the local line).
fn virtual_ip(list: &str) -> Option<String> {
    let line = list
        .lines()
        .find(|l| l.trim_start().starts_with("local  '"))?;
    let start = line.rfind('[')?;
    Some(line[start + 1..].trim_end_matches(']').to_owned())
}

/// The log after byte `from`.
fn since(log: &str, from: usize) -> &str {
    log.get(from..).unwrap_or("")
}

/// Message IDs of exchanges strongSwan started and got answered (`generating X request N` then
/// `parsed X response N`) in `log`.
fn answered_requests(log: &str, exchange: &str) -> Vec<u32> {
    let sent: Vec<u32> = ids_after(log, &format!("generating {exchange} request "));
    let answered: Vec<u32> = ids_after(log, &format!("parsed {exchange} response "));
    sent.into_iter()
        .filter(|id| answered.contains(id))
        .collect()
}

fn ids_after(log: &str, needle: &str) -> Vec<u32> {
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
struct Traffic {
    stop: Arc<AtomicBool>,
    probing: Arc<AtomicBool>,
    /// (sequence, sent, received) of every answered probe.
    replies: Arc<Mutex<Vec<(u64, Instant, Instant)>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    fn start(lab: &Lab) -> Traffic {
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

    fn set_probing(&self, on: bool) {
        self.probing.store(on, Ordering::Release);
    }

    /// Replies received after `t`.
    fn replies_after(&self, t: Instant) -> Vec<(u64, Instant, Instant)> {
        self.replies
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, _, received)| *received > t)
            .copied()
            .collect()
    }

    fn wait_flowing(&self, after: Instant, secs: u64, what: &str) {
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

fn echo(stop: &AtomicBool) {
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

fn probe(stop: &AtomicBool, probing: &AtomicBool, replies: &Mutex<Vec<(u64, Instant, Instant)>>) {
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

fn settings(psk_file: PathBuf) -> IkeSettings {
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

async fn the_sa(admin: &mut AdminClient) -> evpc_proto::admin::v1::SaInfo {
    let sas = admin.all_sas(None).await.expect("list SAs");
    assert_eq!(sas.len(), 1, "one IKE SA in the cluster: {sas:?}");
    sas.into_iter().next().expect("one")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strongswan_keeps_its_ike_sa_when_the_owning_node_dies() {
    const TEST: &str = "strongswan_keeps_its_ike_sa_when_the_owning_node_dies";
    if !can_run(TEST) {
        return;
    }
    let t0 = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix("evpc-swan-")
        .tempdir()
        .expect("tempdir");
    let psk_file = scratch.path().join("psk.toml");
    fs::write(
        &psk_file,
        format!("[[psk]]\npeer = \"client.example\"\nsecret = \"{PSK}\"\n"),
    )
    .expect("psk file");
    let mut spec = LabSpec::new(
        3,
        "swan",
        PathBuf::from(env!("CARGO_BIN_EXE_evpc-node")),
        settings(psk_file),
    );
    spec.log_filter =
        "info,evpc_node::ike_gateway=debug,openraft=error,sled=warn,h2=warn,tower=warn".into();
    let mut lab = Lab::start(spec).await.expect("3-node ClusterIP lab");
    println!(
        "lab up after {:.1} s in {}",
        t0.elapsed().as_secs_f64(),
        lab.dir().display()
    );
    // Declared after the lab: dropped (killed) before it, so charon never outlives its namespace.
    let charon = Charon::start(&scratch.path().join("charon"), lab.client_ns().name());
    {
        let mut logs = charon.lab_logs.lock().unwrap();
        for id in 1..=3 {
            logs.push((id, lab.dir().join(format!("node{id}/node.log"))));
        }
    }
    let traffic = Traffic::start(&lab);
    let mut admin = lab.admin().expect("admin client");

    // ---- 1. connect
    let (ok, out) = charon.swanctl(&["--initiate", "--child", "home", "--timeout", "30"]);
    assert!(
        ok && out.contains("initiate completed successfully"),
        "initiate: {out}"
    );
    let list = charon.list_sas();
    println!("---- swanctl --list-sas after connecting ----\n{list}");
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    let vip = virtual_ip(&list).expect("strongSwan got an inner address");
    let (spi_i, spi_r) = ike_spis(&list).expect("IKE SPIs");
    let sa = the_sa(&mut admin).await;
    assert_eq!(
        sa.virtual_ip, vip,
        "the replicated pool holds strongSwan's address"
    );
    assert_eq!(
        (sa.spi_i.clone(), sa.spi_r.clone()),
        (spi_i.clone(), spi_r.clone())
    );
    assert_eq!(sa.epoch, 1);
    assert_eq!(sa.children.len(), 1);
    assert_eq!(sa.peer_id, "client.example");
    let owner = sa.owner;
    println!(
        "IKE SA {} owned by node {owner}, inner address {vip}",
        sa.id
    );

    traffic.set_probing(true);
    let t_flow = Instant::now();
    traffic.wait_flowing(t_flow, 20, "UDP echoes through the tunnel");
    // The gateway's own DPD (every 3 s of IKE silence) is answered by strongSwan.
    let log_len = charon.log().len();
    wait_until(
        15,
        || since(&charon.log(), log_len).contains("parsed INFORMATIONAL request"),
        "a gateway DPD at strongSwan",
    );

    // ---- 2. SIGKILL the owner while traffic flows
    let log_at_kill = charon.log().len();
    let killed_at = Instant::now();
    lab.sigkill(owner).await.expect("SIGKILL the owner");
    println!("SIGKILLed node {owner} (the SA's owner)");
    let mut admin = lab.admin().expect("admin client");
    let deadline = Instant::now() + Duration::from_secs(20);
    let taken = loop {
        if let Ok(sas) = admin.all_sas(None).await
            && let Some(sa) = sas.first()
            && sa.owner != owner
        {
            break sa.clone();
        }
        assert!(Instant::now() < deadline, "nobody took the SA over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "node {} took the SA over (epoch {}) {:.0} ms after the kill",
        taken.owner,
        taken.epoch,
        killed_at.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(taken.epoch, 2);
    traffic.wait_flowing(killed_at, 30, "traffic through the new owner");
    let after = traffic.replies_after(killed_at);
    let first = after.iter().map(|(_, _, r)| *r).min().expect("replies");
    println!(
        "traffic resumed {:.0} ms after the kill",
        first.duration_since(killed_at).as_secs_f64() * 1000.0
    );
    // The new owner runs the gateway's DPD from the committed times...
    wait_until(
        20,
        || since(&charon.log(), log_at_kill).contains("parsed INFORMATIONAL request"),
        "the new owner's DPD at strongSwan",
    );
    // ...and answers strongSwan's DPD, which strongSwan sends once nothing at all (ESP or IKE)
    // came in for 2 s: pause the traffic for that.
    traffic.set_probing(false);
    wait_until(
        30,
        || !answered_requests(since(&charon.log(), log_at_kill), "INFORMATIONAL").is_empty(),
        "strongSwan's DPD answered after the failover",
    );
    let dpd_ids = answered_requests(since(&charon.log(), log_at_kill), "INFORMATIONAL");
    println!("strongSwan DPD requests answered after the failover: message IDs {dpd_ids:?}");
    traffic.set_probing(true);
    let new_owner_log = lab.log(taken.owner);
    assert!(
        new_owner_log.contains("IKE SA restored from the committed state"),
        "the new owner restored the engine"
    );
    let list = charon.list_sas();
    println!("---- swanctl --list-sas after the failover ----\n{list}");
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    assert_eq!(
        ike_spis(&list),
        Some((spi_i.clone(), spi_r.clone())),
        "strongSwan kept its IKE SA"
    );
    let log = charon.log();
    assert_eq!(
        log.matches("generating IKE_SA_INIT request").count(),
        1,
        "no new IKE_SA_INIT"
    );
    assert_eq!(
        log.matches("generating IKE_AUTH request").count(),
        1,
        "no re-authentication"
    );
    assert!(
        !since(&log, log_at_kill).contains("deleting IKE_SA"),
        "{}",
        since(&log, log_at_kill)
    );

    // ---- 3. rekeys on the new owner
    let children_before = child_spis(&list);
    let (ok, out) = charon.swanctl(&["--rekey", "--child", "home"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "child rekey: {out}"
    );
    let t_rekey = Instant::now();
    wait_until(
        10,
        || {
            let l = charon.list_sas();
            let now = child_spis(&l);
            now.len() == 1 && now != children_before
        },
        "the old child SA to go",
    );
    traffic.wait_flowing(t_rekey, 20, "traffic on the rekeyed child SA");
    let sa = the_sa(&mut admin).await;
    assert_eq!(sa.children.len(), 1);
    assert_eq!(sa.children[0].rekey_generation, 1);
    assert_eq!(
        format!(
            "{:08x}",
            u32::from_str_radix(&child_spis(&charon.list_sas())[0], 16).unwrap()
        ),
        sa.children[0].out_spi,
        "strongSwan's inbound SPI is the gateway's outbound one"
    );

    let (ok, out) = charon.swanctl(&["--rekey", "--ike", "home"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "IKE rekey: {out}"
    );
    let t_ike = Instant::now();
    let list = charon.list_sas();
    let (new_i, new_r) = ike_spis(&list).expect("IKE SPIs");
    assert_ne!(
        (new_i.clone(), new_r.clone()),
        (spi_i.clone(), spi_r.clone())
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let sa = loop {
        let sa = the_sa(&mut admin).await;
        if (sa.spi_i.clone(), sa.spi_r.clone()) == (new_i.clone(), new_r.clone()) {
            break sa;
        }
        assert!(
            Instant::now() < deadline,
            "the record did not follow the IKE rekey: {sa:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(sa.id, taken.id, "the same record, in place");
    assert_eq!(sa.rekey_generation, 1);
    assert_eq!(sa.owner, taken.owner);
    assert_eq!(sa.virtual_ip, vip);
    traffic.wait_flowing(t_ike, 20, "traffic after the IKE rekey");
    // An exchange on the rekeyed IKE SA: strongSwan's DPD once the traffic stops.
    traffic.set_probing(false);
    let log_len = charon.log().len();
    wait_until(
        20,
        || !answered_requests(since(&charon.log(), log_len), "INFORMATIONAL").is_empty(),
        "a DPD on the rekeyed IKE SA",
    );
    let list = charon.list_sas();
    println!("---- swanctl --list-sas at the end ----\n{list}");
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    let log = charon.log();
    assert_eq!(
        log.matches("generating IKE_AUTH request").count(),
        1,
        "no re-authentication"
    );
    println!("---- charon.log after the kill (excerpt) ----");
    for line in since(&log, log_at_kill)
        .lines()
        .filter(|l| l.contains("[ENC]") || l.contains("DPD") || l.contains("rekey"))
        .take(40)
    {
        println!("{line}");
    }
    println!("test took {:.1} s", t0.elapsed().as_secs_f64());
    drop(traffic);
    drop(charon);
    drop(lab);
    drop(scratch);
}
