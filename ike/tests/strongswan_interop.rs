//! Interop smoke tests against an unmodified strongSwan (charon + swanctl).
//!
//! Needs root: each test creates two network namespaces joined by a veth
//! pair, runs charon in one (recipe: shared/notes/strongswan-in-netns.md) and
//! the `node` example of this crate in the other.
//!
//! 1. strongSwan road warrior → our responder: IKE and CHILD SA with the inner
//!    address we gave, DPD, child and IKE rekeys in both directions, with
//!    Curve25519 and with ECP-256, and a gateway-initiated delete.
//! 2. Our initiator → strongSwan responder with an address pool: the same
//!    exchanges with the roles swapped.
//!
//! Skips with a loud message when not root or strongSwan is missing, except
//! under `CI=true`, where that is a failure. Namespaces and processes are
//! removed on every exit path (the `Lab` guard's `Drop`).
//!
//! No libtest harness (`harness = false`): this executable is also the node
//! (`<exe> node --listen ...`), started with `ip netns exec`, so the node under
//! test is always built from the same sources as the test.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

const CHARON: &str = "/usr/lib/ipsec/charon";
const GW_IP: &str = "192.0.2.1";
const RW_IP: &str = "192.0.2.2";

fn command_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

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
    let (_, uid) = output("id", &["-u"]);
    if uid.trim() != "0" {
        return Some("not running as root".into());
    }
    if !Path::new(CHARON).exists() {
        return Some(format!(
            "{CHARON} missing (apt-get install strongswan-charon)"
        ));
    }
    if !command_ok("swanctl", &["--help"]) {
        return Some("swanctl missing (apt-get install strongswan-swanctl)".into());
    }
    if !command_ok("ip", &["-V"]) {
        return Some("iproute2 missing".into());
    }
    None
}

#[path = "support/node.rs"]
mod node;

fn node_binary() -> PathBuf {
    std::env::current_exe().expect("current exe")
}

/// Namespaces, processes and files of one run; torn down on drop.
struct Lab {
    gw_ns: String,
    rw_ns: String,
    dir: PathBuf,
    /// The namespace charon runs in.
    charon_ns: String,
    responder: Option<Child>,
    responder_stdin: Option<ChildStdin>,
    charon_pid: Option<u32>,
}

impl Lab {
    fn new(tag: char) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            gw_ns: format!("evpcike-gw-{pid}{tag}"),
            rw_ns: format!("evpcike-rw-{pid}{tag}"),
            dir: std::env::temp_dir().join(format!("evpc-ike-interop-{pid}{tag}")),
            charon_ns: String::new(),
            responder: None,
            responder_stdin: None,
            charon_pid: None,
        };
        let _ = fs::remove_dir_all(&lab.dir);
        fs::create_dir_all(lab.dir.join("swanctl")).expect("mkdir");
        fs::create_dir_all(lab.dir.join("run")).expect("mkdir");
        let veth_gw = format!("vg{pid}{tag}");
        let veth_rw = format!("vr{pid}{tag}");
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &lab.gw_ns],
            vec!["netns", "add", &lab.rw_ns],
            vec![
                "link", "add", &veth_gw, "type", "veth", "peer", "name", &veth_rw,
            ],
            vec!["link", "set", &veth_gw, "netns", &lab.gw_ns],
            vec!["link", "set", &veth_rw, "netns", &lab.rw_ns],
        ];
        for s in steps {
            let (ok, out) = output("ip", &s);
            assert!(ok, "ip {s:?}: {out}");
        }
        let gw_addr = format!("{GW_IP}/24");
        let rw_addr = format!("{RW_IP}/24");
        for (ns, dev, addr) in [
            (&lab.gw_ns, &veth_gw, &gw_addr),
            (&lab.rw_ns, &veth_rw, &rw_addr),
        ] {
            for s in [
                vec![
                    "-n",
                    ns.as_str(),
                    "addr",
                    "add",
                    addr.as_str(),
                    "dev",
                    dev.as_str(),
                ],
                vec!["-n", ns.as_str(), "link", "set", dev.as_str(), "up"],
                vec!["-n", ns.as_str(), "link", "set", "lo", "up"],
            ] {
                let (ok, out) = output("ip", &s);
                assert!(ok, "ip {s:?}: {out}");
            }
        }
        lab
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn uri(&self) -> String {
        format!("unix://{}", self.path("run/charon.vici"))
    }

    /// Starts the `node` example in `ns` with `args`; its output goes to node.log.
    fn start_node(&mut self, ns: &str, args: &[&str]) {
        let log = fs::File::create(self.path("node.log")).expect("log file");
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(node_binary())
            .arg("node")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log.try_clone().expect("dup")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn node");
        self.responder_stdin = child.stdin.take();
        self.responder = Some(child);
        self.wait_log("node.log", "listening on", 10);
    }

    /// Starts charon in `ns` and loads `swanctl_conf`.
    /// `extra` goes into the `charon { }` section of strongswan.conf.
    fn start_charon(&mut self, ns: &str, swanctl_conf: &str, extra: &str) {
        self.charon_ns = ns.to_string();
        let dir = self.dir.display().to_string();
        let conf = format!(
            r#"charon {{
  {extra}
  load = random nonce aes sha1 sha2 hmac gcm curve25519 openssl pem pkcs1 x509 revocation constraints pubkey kdf socket-default kernel-libipsec kernel-netlink vici updown
  filelog {{ log {{ path = {dir}/charon.log
      default = 1
      ike = 2
      enc = 1 }} }}
  plugins {{
    vici {{ socket = unix://{dir}/run/charon.vici }}
    kernel-libipsec {{ allow_peer_ts = yes }}
  }}
}}
"#
        );
        fs::write(self.path("strongswan.conf"), conf).expect("write strongswan.conf");
        fs::write(self.path("swanctl/swanctl.conf"), swanctl_conf).expect("write swanctl.conf");
        // A private /run keeps this charon's pid file away from any other one.
        let script = format!(
            "mount -t tmpfs none /run && mkdir -p /run/strongswan && \
             STRONGSWAN_CONF={dir}/strongswan.conf setsid {CHARON} >{dir}/charon.stdout 2>&1 & echo $! > {dir}/charon.pid"
        );
        let (ok, out) = output(
            "ip",
            &["netns", "exec", ns, "unshare", "-m", "sh", "-c", &script],
        );
        assert!(ok, "starting charon: {out}");
        let pid = fs::read_to_string(self.path("charon.pid")).expect("charon pid");
        self.charon_pid = pid.trim().parse().ok();
        let vici = self.path("run/charon.vici");
        wait_until(10, || Path::new(&vici).exists(), "charon's vici socket");
        let (ok, out) = self.swanctl(&["--load-all", "--file", &self.path("swanctl/swanctl.conf")]);
        assert!(ok, "swanctl --load-all: {out}");
    }

    fn swanctl(&self, args: &[&str]) -> (bool, String) {
        let uri = self.uri();
        let mut all = vec!["netns", "exec", &self.charon_ns, "swanctl"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--uri", &uri]);
        output("ip", &all)
    }

    fn gateway(&mut self, command: &str) {
        let stdin = self.responder_stdin.as_mut().expect("responder stdin");
        writeln!(stdin, "{command}").expect("write command");
        stdin.flush().expect("flush");
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn count(&self, name: &str, needle: &str) -> usize {
        self.log(name).matches(needle).count()
    }

    fn wait_log(&self, name: &str, needle: &str, secs: u64) {
        wait_until(
            secs,
            || self.log(name).contains(needle),
            &format!("{needle:?} in {name}"),
        );
    }

    /// Waits until `needle` occurs more than `before` times in the log.
    fn wait_more(&self, name: &str, needle: &str, before: usize, secs: u64) {
        wait_until(
            secs,
            || self.count(name, needle) > before,
            &format!("another {needle:?} in {name}"),
        );
    }

    fn list_sas(&self) -> String {
        let (ok, out) = self.swanctl(&["--list-sas"]);
        assert!(ok, "swanctl --list-sas: {out}");
        println!("---- swanctl --list-sas ----\n{out}");
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(pid) = self.charon_pid {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        if let Some(mut c) = self.responder.take() {
            // `ip netns exec` execs the responder, so this is its own pid.
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- node.log ----\n{}", self.log("node.log"));
            eprintln!("---- charon.log (tail) ----");
            let log = self.log("charon.log");
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(80)..] {
                eprintln!("{l}");
            }
        }
        // Give charon a moment to exit before its namespace goes away.
        std::thread::sleep(Duration::from_millis(300));
        let _ = output("ip", &["netns", "del", &self.gw_ns]);
        let _ = output("ip", &["netns", "del", &self.rw_ns]);
        let _ = fs::remove_dir_all(&self.dir);
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
    panic!("timed out waiting for {what}");
}

fn child_spis(list: &str, conn: &str) -> Vec<String> {
    let mut in_conn = false;
    let mut out = Vec::new();
    for line in list.lines() {
        if !line.starts_with(' ') {
            in_conn = line.starts_with(&format!("{conn}:"));
        } else if in_conn && line.trim_start().starts_with("in ") {
            out.push(
                line.split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .trim_end_matches(',')
                    .to_string(),
            );
        }
    }
    out
}

fn ike_spis(list: &str, conn: &str) -> Option<String> {
    list.lines()
        .find(|l| l.starts_with(&format!("{conn}:")))
        .map(|l| l.split(", ").last().unwrap_or("").to_string())
}

/// Skips (loudly) or, under `CI=true`, fails when the lab cannot run here.
fn lab_available(test: &str) -> bool {
    let Some(why) = missing_prerequisite() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("strongSwan interop test {test} cannot run under CI=true: {why}");
    }
    eprintln!("\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! SKIPPED {test}: {why}");
    eprintln!("!!! (run as root with strongswan-charon, strongswan-swanctl,");
    eprintln!("!!!  libcharon-extra-plugins, libstrongswan-extra-plugins installed)");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n");
    false
}

const PSK_SECRETS: &str = r#"secrets { ike-1 { id-1 = gw.example
                  id-2 = client.example
                  secret = "s3cret-psk-value" } }
"#;

fn road_warrior_conf() -> String {
    format!(
        r#"connections {{
  home {{
    remote_addrs = {GW_IP}
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
  home256 {{
    remote_addrs = {GW_IP}
    vips = 0.0.0.0
    proposals = aes256gcm16-prfsha384-ecp256
    encap = yes
    local  {{ auth = psk
             id = client.example }}
    remote {{ auth = psk
             id = gw.example }}
    children {{ home256 {{ remote_ts = 10.10.0.0/25
                         esp_proposals = aes256gcm16-ecp256-esn-noesn }} }}
  }}
  home2048 {{
    remote_addrs = {GW_IP}
    vips = 0.0.0.0
    proposals = aes128gcm16-prfsha512-modp2048
    encap = yes
    local  {{ auth = psk
             id = client.example }}
    remote {{ auth = psk
             id = gw.example }}
    children {{ home2048 {{ remote_ts = 10.10.0.128/25
                          esp_proposals = aes128gcm16-modp2048 }} }}
  }}
}}
{PSK_SECRETS}"#
    )
}

fn gateway_conf() -> String {
    format!(
        r#"connections {{
  rw {{
    local_addrs = {GW_IP}
    pools = pool4
    proposals = aes128gcm16-prfsha256-x25519
    dpd_delay = 2s
    local  {{ auth = psk
             id = gw.example }}
    remote {{ auth = psk
             id = client.example }}
    children {{ rw {{ local_ts = 10.10.0.0/24
                    esp_proposals = aes128gcm16-x25519 }} }}
  }}
}}
pools {{ pool4 {{ addrs = 10.10.1.1-10.10.1.20 }} }}
{PSK_SECRETS}"#
    )
}

fn strongswan_road_warrior_against_engine_responder() {
    if !lab_available("strongswan_road_warrior_against_engine_responder") {
        return;
    }
    let mut lab = Lab::new('a');
    let gw_ns = lab.gw_ns.clone();
    let rw_ns = lab.rw_ns.clone();
    lab.start_node(
        &gw_ns,
        &[
            "--listen",
            GW_IP,
            "--id",
            "gw.example",
            "--peer",
            "client.example",
            "--psk",
            "s3cret-psk-value",
        ],
    );
    lab.start_charon(&rw_ns, &road_warrior_conf(), "");

    // 1. Road warrior with Curve25519: IKE SA + CHILD SA + inner address.
    let (ok, out) = lab.swanctl(&["--initiate", "--child", "home", "--timeout", "30"]);
    assert!(
        ok && out.contains("initiate completed successfully"),
        "initiate: {out}"
    );
    let list = lab.list_sas();
    assert!(list.contains("ESTABLISHED"), "{list}");
    assert!(list.contains("INSTALLED"), "{list}");
    assert!(
        list.contains("[10.10.0.2]"),
        "virtual IP we assigned: {list}"
    );
    assert!(
        list.contains("AES_GCM_16-128/PRF_HMAC_SHA2_256/CURVE_25519"),
        "{list}"
    );
    assert!(list.contains("local  10.10.0.2/32"), "narrowed TSi: {list}");
    let first_child = child_spis(&list, "home");
    let first_ike = ike_spis(&list, "home");

    // 2. strongSwan's DPD (dpd_delay = 2s) is answered.
    lab.wait_log("node.log", "rx INFORMATIONAL request", 15);
    lab.wait_log("node.log", "tx INFORMATIONAL response", 5);

    // 3. Child rekey from strongSwan (with PFS, Curve25519).
    let (ok, out) = lab.swanctl(&["--rekey", "--child", "home"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "rekey child: {out}"
    );
    lab.wait_log("node.log", "pfs=Some(Curve25519)", 10);
    lab.wait_log("node.log", "event ChildSaDeleted", 10);
    let list = lab.list_sas();
    let second_child = child_spis(&list, "home");
    assert!(
        list.contains("INSTALLED") && second_child != first_child,
        "new child SA: {list}"
    );

    // 4. IKE rekey from strongSwan.
    let (ok, out) = lab.swanctl(&["--rekey", "--ike", "home"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "rekey IKE: {out}"
    );
    lab.wait_log("node.log", "event IkeSaRekeyed", 10);
    lab.wait_log("node.log", "event LocalSpiReleased", 10);
    let list = lab.list_sas();
    assert!(
        list.contains("ESTABLISHED") && ike_spis(&list, "home") != first_ike,
        "new IKE SA: {list}"
    );
    // DPD on the rekeyed IKE SA is still answered.
    let before = lab.count("node.log", "tx INFORMATIONAL response");
    lab.wait_more("node.log", "tx INFORMATIONAL response", before, 15);

    // 5. Gateway-initiated exchanges, answered by strongSwan.
    let alive = lab.count("node.log", "event PeerAlive");
    lab.gateway("dpd");
    lab.wait_more("node.log", "event PeerAlive", alive, 15);
    let rekeys = lab.count("node.log", "rekey_of=Some");
    lab.gateway("rekey-child");
    lab.wait_more("node.log", "rekey_of=Some", rekeys, 15);
    let deleted = lab.count("node.log", "event ChildSaDeleted");
    lab.wait_more("node.log", "event ChildSaDeleted", deleted - 1, 15);
    let ike_rekeys = lab.count("node.log", "event IkeSaRekeyed");
    lab.gateway("rekey-ike");
    lab.wait_more("node.log", "event IkeSaRekeyed", ike_rekeys, 15);
    let released = lab.count("node.log", "event LocalSpiReleased");
    lab.wait_more("node.log", "event LocalSpiReleased", released - 1, 15);
    let alive = lab.count("node.log", "event PeerAlive");
    lab.gateway("dpd");
    lab.wait_more("node.log", "event PeerAlive", alive, 15);
    let list = lab.list_sas();
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );

    // 6. A second IKE SA with ECP-256, AES-256, SHA-384. strongSwan offers ESN
    //    and no ESN; kernel-libipsec cannot do ESN, so we must pick "no ESN"
    //    (our policy order) for the child to install.
    let (ok, out) = lab.swanctl(&["--initiate", "--child", "home256", "--timeout", "30"]);
    assert!(
        ok && out.contains("initiate completed successfully"),
        "initiate ecp256: {out}"
    );
    let list = lab.list_sas();
    assert!(
        list.contains("AES_GCM_16-256/PRF_HMAC_SHA2_384/ECP_256"),
        "{list}"
    );
    assert!(list.contains("ESP:AES_GCM_16-256"), "{list}");
    assert!(
        lab.log("node.log")
            .contains("esn=false pfs=None encr=AesGcm16 { key_bits: 256 }")
    );
    let (ok, out) = lab.swanctl(&["--rekey", "--child", "home256"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "rekey ecp256 child: {out}"
    );
    lab.wait_log("node.log", "pfs=Some(Ecp256)", 10);

    // 7. A third IKE SA with MODP-2048 and HMAC-SHA2-512, PFS with MODP-2048.
    let (ok, out) = lab.swanctl(&["--initiate", "--child", "home2048", "--timeout", "30"]);
    assert!(
        ok && out.contains("initiate completed successfully"),
        "initiate modp2048: {out}"
    );
    let list = lab.list_sas();
    assert!(
        list.contains("AES_GCM_16-128/PRF_HMAC_SHA2_512/MODP_2048"),
        "{list}"
    );
    let (ok, out) = lab.swanctl(&["--rekey", "--child", "home2048"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "rekey modp2048 child: {out}"
    );
    lab.wait_log("node.log", "pfs=Some(Modp2048)", 10);
    let (ok, out) = lab.swanctl(&["--rekey", "--ike", "home2048"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "rekey modp2048 IKE SA: {out}"
    );

    // 8. The gateway deletes the newest IKE SA; strongSwan drops it. First let strongSwan
    // finish the rekey (its DELETE of the replaced IKE SA answered): a DELETE arriving on the
    // replaced generation after the gateway closed the SA goes unanswered, and strongSwan then
    // keeps the old SA in DELETING until its retransmissions give up.
    wait_until(
        10,
        || {
            // IKE SAs are the unindented lines; their child SAs are listed indented below.
            let list = lab.list_sas();
            list.lines()
                .filter(|l| l.starts_with("home2048: #"))
                .count()
                == 1
        },
        "strongSwan to delete the IKE SA its rekey replaced",
    );
    lab.gateway("close");
    lab.wait_log("node.log", "event Closed DeletedLocally", 15);
    wait_until(
        10,
        || !lab.list_sas().contains("home2048:"),
        "strongSwan to drop home2048",
    );
    let list = lab.list_sas();
    assert!(
        list.contains("home:") && list.contains("ESTABLISHED"),
        "the other SA is untouched: {list}"
    );
}

fn engine_initiator_against_strongswan_responder() {
    if !lab_available("engine_initiator_against_strongswan_responder") {
        return;
    }
    let mut lab = Lab::new('b');
    let gw_ns = lab.gw_ns.clone();
    let rw_ns = lab.rw_ns.clone();
    // kernel-libipsec routes the pool address through its TUN device with a
    // source address from local_ts, so the gateway needs one.
    let (ok, out) = output(
        "ip",
        &["-n", &gw_ns, "addr", "add", "10.10.0.1/24", "dev", "lo"],
    );
    assert!(ok, "address for local_ts: {out}");
    lab.start_charon(&gw_ns, &gateway_conf(), "");
    // --encap: kernel-libipsec only does UDP-encapsulated ESP.
    lab.start_node(
        &rw_ns,
        &[
            "--listen",
            RW_IP,
            "--id",
            "client.example",
            "--peer",
            "gw.example",
            "--psk",
            "s3cret-psk-value",
            "--connect",
            GW_IP,
            "--remote-ts",
            "10.10.0.0/24",
            "--encap",
        ],
    );

    // 1. IKE SA, CHILD SA, and an inner address from strongSwan's pool.
    lab.wait_log("node.log", "event IkeSaEstablished", 15);
    lab.wait_log(
        "node.log",
        "event InnerAddressAssigned(InnerAddress { ipv4: 10.10.1.1",
        5,
    );
    lab.wait_log("node.log", "event ChildSaInstalled", 5);
    let list = lab.list_sas();
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );
    assert!(list.contains("[10.10.1.1]"), "pool address: {list}");
    assert!(list.contains("remote 10.10.1.1/32"), "narrowed TS: {list}");
    let first_ike = ike_spis(&list, "rw");

    // 2. strongSwan's DPD reaches our initiator, which answers as responder.
    lab.wait_log("node.log", "rx INFORMATIONAL request", 15);
    lab.wait_log("node.log", "tx INFORMATIONAL response", 5);

    // 3. Our exchanges: DPD, child rekey (PFS), IKE rekey.
    let alive = lab.count("node.log", "event PeerAlive");
    lab.gateway("dpd");
    lab.wait_more("node.log", "event PeerAlive", alive, 15);
    let rekeys = lab.count("node.log", "rekey_of=Some");
    lab.gateway("rekey-child");
    lab.wait_more("node.log", "rekey_of=Some", rekeys, 15);
    lab.wait_log("node.log", "event ChildSaDeleted", 15);
    lab.gateway("rekey-ike");
    lab.wait_log("node.log", "event IkeSaRekeyed", 15);
    lab.wait_log("node.log", "event LocalSpiReleased", 15);
    let list = lab.list_sas();
    assert!(
        list.contains("ESTABLISHED") && ike_spis(&list, "rw") != first_ike,
        "{list}"
    );
    assert!(
        list.contains("ESP:AES_GCM_16-128/CURVE_25519"),
        "rekeyed child with PFS: {list}"
    );

    // 4. strongSwan's exchanges: child rekey and IKE rekey, we answer.
    let rekeys = lab.count("node.log", "rekey_of=Some");
    let (ok, out) = lab.swanctl(&["--rekey", "--child", "rw"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "rekey child: {out}"
    );
    lab.wait_more("node.log", "rekey_of=Some", rekeys, 15);
    let ike_rekeys = lab.count("node.log", "event IkeSaRekeyed");
    let (ok, out) = lab.swanctl(&["--rekey", "--ike", "rw"]);
    assert!(
        ok && out.contains("rekey completed successfully"),
        "rekey IKE: {out}"
    );
    lab.wait_more("node.log", "event IkeSaRekeyed", ike_rekeys, 15);
    let alive = lab.count("node.log", "event PeerAlive");
    lab.gateway("dpd");
    lab.wait_more("node.log", "event PeerAlive", alive, 15);
    let list = lab.list_sas();
    assert!(
        list.contains("ESTABLISHED") && list.contains("INSTALLED"),
        "{list}"
    );

    // 5. We delete the IKE SA; strongSwan forgets it.
    lab.gateway("close");
    lab.wait_log("node.log", "event Closed DeletedLocally", 15);
    wait_until(
        10,
        || !lab.list_sas().contains("rw:"),
        "strongSwan to drop the IKE SA",
    );
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "node") {
        node::main(args[1..].to_vec());
        return;
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let tests: [(&str, fn()); 2] = [
        (
            "strongswan_road_warrior_against_engine_responder",
            strongswan_road_warrior_against_engine_responder,
        ),
        (
            "engine_initiator_against_strongswan_responder",
            engine_initiator_against_strongswan_responder,
        ),
    ];
    let selected: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", selected.len());
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in selected {
        match std::panic::catch_unwind(test) {
            Ok(()) => {
                println!("test {name} ... ok");
                passed += 1;
            }
            Err(_) => {
                println!("test {name} ... FAILED");
                failed += 1;
            }
        }
    }
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out\n"
    );
    if failed > 0 {
        std::process::exit(101);
    }
}
