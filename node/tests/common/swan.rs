//! An unmodified strongSwan road warrior for the cluster tests: charon (kernel-libipsec) in
//! the lab's client namespace, UDP traffic through its tunnel, and readers of its log and of
//! `swanctl --list-sas`. Shared by the userspace cluster test and the kernel-data-plane one.
#![allow(dead_code)] // each test uses its own part

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use evpc_api::AdminClient;
use evpc_node::ike_gateway::{IkeSettings, PskSecret, PskSetting};
use evpc_testkit::lab::{CLUSTER, Lab};

#[allow(unused_imports)] // each test uses its own part
pub use evpc_testkit::swan::{
    answered_requests, child_spis, ids_after, ike_spis, output, since, virtual_ip,
};

pub const GW_INNER: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 1);
pub const ECHO_PORT: u16 = 7777;
pub const PSK: &str = "s3cret-psk-value-for-the-cluster";

/// Skips (loudly) or, under `CI=true`, fails when the test cannot run here.
pub fn can_run(test: &str) -> bool {
    let Some(why) = evpc_testkit::swan::missing_prerequisite() else {
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

/// The test kit's charon as `client.example` with a 2 s DPD, panicking on failure; on a
/// failing test it prints its log and the nodes' logs (through `lab_logs`, filled by the test).
pub struct Charon {
    inner: evpc_testkit::swan::Charon,
    lab_logs: Arc<Mutex<Vec<(u64, PathBuf)>>>,
}

impl Charon {
    pub fn start(dir: &Path, ns: &str) -> Charon {
        let road_warrior = evpc_testkit::swan::RoadWarrior {
            id: "client.example".into(),
            gateway: CLUSTER,
            gateway_id: "gw.example".into(),
            psk: PSK.into(),
            remote_ts: "10.10.0.0/24".into(),
            dpd_delay_s: 2,
        };
        Charon {
            inner: evpc_testkit::swan::Charon::start(dir, ns, &road_warrior)
                .expect("starting charon"),
            lab_logs: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// On a failing test, also print the logs of `lab`'s nodes.
    pub fn follow_lab_logs(&self, lab: &Lab) {
        let mut logs = self.lab_logs.lock().unwrap();
        for id in 1..=lab.spec.nodes {
            logs.push((id, lab.dir().join(format!("node{id}/node.log"))));
        }
    }

    pub fn swanctl(&self, args: &[&str]) -> (bool, String) {
        self.inner.swanctl(args)
    }

    pub fn log(&self) -> String {
        self.inner.log()
    }

    pub fn list_sas(&self) -> String {
        self.inner.list_sas().expect("swanctl --list-sas")
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
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
