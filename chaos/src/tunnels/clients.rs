//! The end-users: unmodified strongSwan road warriors and `evpc-client` processes, one per
//! client host behind the lab's edge router, and what each of them reports.
//!
//! ```text
//!  ClientHost c (ns) ── strongSwan: charon (kernel-libipsec) ── swanctl --initiate
//!                    └─ ours: ip netns exec NS evpc-client … ── JSON lines on stdout
//!                                                             ─► reader thread ─► Seen
//!  at the end: strongSwan ── swanctl --list-sas (SPIs, inner address) + charon.log
//!              ours      ── SIGTERM ─► final "counters" and "stopped" lines
//! ```
//!
//! What the runner checks per client comes from here: how many IKE_AUTH exchanges it ran (one:
//! never re-authenticated), whether its IKE SA closed or a DPD failed, its inner address and
//! IKE SPIs at the start and at the end, and (ours) the data plane's anti-replay drops and
//! authentication failures.

use std::io::BufRead;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use evpc_testkit::lab::{CLUSTER, ClientHost, TRUSTED_NET};
use evpc_testkit::swan::{self, Charon, RoadWarrior};
use serde::Serialize;

/// The gateway's identity, as every client expects it.
pub const GATEWAY_ID: &str = "gw.example";

/// Which software a client runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// charon with kernel-libipsec, unmodified.
    Strongswan,
    /// `evpc-client`: the `evpc-ike` initiator and the userspace ESP data plane.
    Evpc,
}

/// A client's identity: `swan-N.example` or `client-N.example`.
pub fn identity(kind: Kind, index: usize) -> String {
    match kind {
        Kind::Strongswan => format!("swan-{index}.example"),
        Kind::Evpc => format!("client-{index}.example"),
    }
}

/// What a client reported, as far as the checks go.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Seen {
    pub established: bool,
    /// Its data plane carries the tunnel (ours: the first child started, the TUN configured;
    /// traffic sent before then would pick the outer address as its source).
    pub ready: bool,
    pub inner: Option<Ipv4Addr>,
    /// IKE SPIs (initiator, responder) when established, and at the end.
    pub spis: Option<(String, String)>,
    pub spis_at_end: Option<(String, String)>,
    pub inner_at_end: Option<Ipv4Addr>,
    /// IKE_AUTH exchanges it started.
    pub ike_auths: u32,
    /// DPDs: the gateway's it answered, its own answered, its own that failed.
    pub dpds_answered: u32,
    pub dpds_failed: u32,
    pub closed: Option<String>,
    /// Data-plane counters, last report (ours only).
    pub replay_drops: u64,
    pub auth_failures: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub errors: Vec<String>,
}

/// One running client.
#[derive(Debug)]
pub struct Client {
    pub id: String,
    seen: Arc<Mutex<Seen>>,
    process: Option<Child>,
    reader: Option<std::thread::JoinHandle<()>>,
    charon: Option<Charon>,
    /// Where charon's log stood once its tunnel was up.
    charon_log_at_start: usize,
}

/// What starting a client needs.
#[derive(Debug)]
pub struct Setup<'a> {
    pub dir: &'a Path,
    pub psk: &'a str,
    pub client_bin: &'a Path,
}

impl Client {
    /// Starts client `index` (of all the run's clients), a `kind` one with identity `id`, on
    /// `host` (not waiting for its tunnel).
    pub fn start(
        index: usize,
        kind: Kind,
        id: &str,
        host: &ClientHost,
        setup: &Setup<'_>,
    ) -> anyhow::Result<Client> {
        let id = id.to_owned();
        let dir = setup.dir.join(&id);
        std::fs::create_dir_all(&dir)?;
        let (net, len) = TRUSTED_NET;
        let route = format!("{net}/{len}");
        let seen = Arc::new(Mutex::new(Seen::default()));
        match kind {
            Kind::Strongswan => {
                let charon = Charon::start(
                    &dir,
                    host.ns.name(),
                    &RoadWarrior {
                        id: id.clone(),
                        gateway: CLUSTER,
                        gateway_id: GATEWAY_ID.into(),
                        psk: setup.psk.into(),
                        remote_ts: route,
                        dpd_delay_s: 2,
                    },
                )?;
                Ok(Client {
                    id,
                    seen,
                    process: None,
                    reader: None,
                    charon_log_at_start: 0,
                    charon: Some(charon),
                })
            }
            Kind::Evpc => {
                let psk_file = dir.join("psk");
                write_private(&psk_file, setup.psk)?;
                let mut child = Command::new("ip")
                    .args(["netns", "exec", host.ns.name()])
                    .arg(setup.client_bin)
                    .args(["--local", &host.addr.to_string()])
                    .args(["--gateway", &CLUSTER.to_string()])
                    .args(["--id", &id, "--remote-id", GATEWAY_ID])
                    .arg("--psk-file")
                    .arg(&psk_file)
                    .args(["--tun", "evpcc0", "--route", &route])
                    .args(["--counters-ms", "1000"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(std::fs::File::create(dir.join("stderr.log"))?)
                    .spawn()
                    .with_context(|| format!("starting {}", setup.client_bin.display()))?;
                let stdout = child.stdout.take().expect("piped");
                let (s, log) = (seen.clone(), dir.join("events.jsonl"));
                let reader = std::thread::Builder::new()
                    .name(format!("client-{index}"))
                    .spawn(move || read_events(stdout, &s, &log))?;
                Ok(Client {
                    id,
                    seen,
                    process: Some(child),
                    reader: Some(reader),
                    charon: None,
                    charon_log_at_start: 0,
                })
            }
        }
    }

    /// strongSwan: brings the tunnel up (waits up to `timeout`) and reads its SPIs and inner
    /// address. Ours come up on their own ([`Client::wait_established`]).
    pub fn initiate(&mut self, timeout: Duration) -> anyhow::Result<()> {
        if let Some(charon) = &self.charon {
            charon.initiate(timeout)?;
            // What it logs from here on is what the checks read.
            self.charon_log_at_start = charon.log().len();
            let list = charon.list_sas()?;
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.established = true;
            seen.ready = true;
            seen.spis = swan::ike_spis(&list);
            seen.inner = swan::virtual_ip(&list).and_then(|v| v.parse().ok());
        }
        Ok(())
    }

    /// Waits until the client's tunnel is up (its inner address known).
    pub fn wait_established(&self, deadline: Instant) -> anyhow::Result<Ipv4Addr> {
        loop {
            {
                let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                if let (true, Some(inner)) = (seen.ready, seen.inner) {
                    return Ok(inner);
                }
                if let Some(reason) = &seen.closed {
                    bail!("{}: its IKE SA closed before it was up: {reason}", self.id);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{}: no tunnel in time; what it said: {:?}",
                    self.id,
                    self.seen()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it reported so far.
    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops it and completes what it reported: ours get SIGTERM and write their final
    /// counters; strongSwan's SA list and log are read before charon stops.
    pub fn finish(mut self) -> Seen {
        if let Some(charon) = self.charon.take() {
            let mut seen = self.seen();
            match charon.list_sas() {
                Ok(list) => {
                    seen.spis_at_end = swan::ike_spis(&list);
                    seen.inner_at_end = swan::virtual_ip(&list).and_then(|v| v.parse().ok());
                }
                Err(e) => seen.errors.push(e.to_string()),
            }
            let log = charon.log();
            let since = swan::since(&log, self.charon_log_at_start);
            read_charon_log(since, &mut seen);
            return seen;
        }
        if let Some(child) = &self.process
            && let Ok(pid) = i32::try_from(child.id())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if let Some(mut child) = self.process.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let mut seen = self.seen();
        seen.spis_at_end.clone_from(&seen.spis);
        seen.inner_at_end = seen.inner;
        seen
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(mut child) = self.process.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes `secret` to `path`, owner-only (the client refuses a key file others can read).
fn write_private(path: &PathBuf, secret: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{secret}")?;
    Ok(())
}

/// Reads an `evpc-client`'s JSON lines into `seen` (and a copy into `log`) until it exits.
fn read_events(stdout: std::process::ChildStdout, seen: &Mutex<Seen>, log: &Path) {
    use std::io::Write;
    let mut copy = std::fs::File::create(log).ok();
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        if let Some(f) = copy.as_mut() {
            let _ = writeln!(f, "{line}");
        }
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        apply_event(&event, &mut seen);
    }
}

fn spi_pair(event: &serde_json::Value) -> Option<(String, String)> {
    Some((
        event["spi_i"].as_str()?.to_owned(),
        event["spi_r"].as_str()?.to_owned(),
    ))
}

/// What one line of an `evpc-client` means for the checks.
fn apply_event(event: &serde_json::Value, seen: &mut Seen) {
    match event["event"].as_str().unwrap_or_default() {
        "ike_auth" => seen.ike_auths += 1,
        "established" => {
            seen.established = true;
            seen.inner = event["inner"].as_str().and_then(|a| a.parse().ok());
            seen.spis = spi_pair(event);
        }
        "child_started" => seen.ready = true,
        "rekeyed" if event["kind"] == "ike" => {
            // an IKE rekey keeps the tunnel: the SA's new SPIs are its SPIs from now on
            if let (Some(i), Some(r)) = (event["new_spi_i"].as_str(), event["new_spi_r"].as_str()) {
                seen.spis = Some((i.to_owned(), r.to_owned()));
            }
        }
        "dpd" => {
            if event["failed"].as_bool() == Some(true) {
                seen.dpds_failed += 1;
            } else {
                seen.dpds_answered += 1;
            }
        }
        "counters" => {
            let total = &event["total"];
            let get = |k: &str| total[k].as_u64().unwrap_or(0);
            seen.replay_drops = get("replay_drops");
            seen.auth_failures = get("auth_failures");
            seen.packets_in = get("in_packets");
            seen.packets_out = get("out_packets");
        }
        "closed" => {
            seen.closed = Some(
                event["reason"]
                    .as_str()
                    .map_or_else(|| event["reason"].to_string(), str::to_owned),
            );
        }
        "error" => seen
            .errors
            .push(event["message"].as_str().unwrap_or_default().to_owned()),
        _ => {}
    }
}

/// What a strongSwan client's log says for the checks: IKE_AUTH exchanges it ran, DPDs it
/// sent and had answered, and whether it gave up on its IKE SA.
fn read_charon_log(log: &str, seen: &mut Seen) {
    seen.ike_auths += log.matches("generating IKE_AUTH request").count() as u32;
    // one IKE_AUTH made the tunnel before the log mark was taken
    seen.ike_auths += 1;
    seen.dpds_answered += swan::answered_requests(log, "INFORMATIONAL").len() as u32;
    if log.contains("giving up after") {
        seen.dpds_failed += 1;
        seen.closed = Some("charon gave up retransmitting".into());
    }
    if log.contains("deleting IKE_SA") {
        seen.closed
            .get_or_insert_with(|| "charon deleted its IKE SA".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_events_feed_the_checks() {
        let mut seen = Seen::default();
        for line in [
            r#"{"t":1.0,"event":"ike_auth","n":1,"spi_i":"aa","spi_r":"bb","message_id":1,"to":"198.51.100.1:4500"}"#,
            r#"{"t":2.0,"event":"established","spi_i":"aa","spi_r":"bb","inner":"10.64.0.7","dns":[],"child_in_spi":"c1","child_out_spi":"c2","suite":"aes128gcm16","esn":true,"gateway":"198.51.100.1:4500","setup_ms":3.0}"#,
            r#"{"t":3.0,"event":"dpd","by":"gateway","message_id":2,"rtt_ms":null}"#,
            r#"{"t":4.0,"event":"counters","total":{"replay_drops":2,"auth_failures":0,"in_packets":50,"out_packets":49}}"#,
        ] {
            apply_event(&serde_json::from_str(line).unwrap(), &mut seen);
        }
        assert!(seen.established);
        assert_eq!(seen.inner, Some(Ipv4Addr::new(10, 64, 0, 7)));
        assert_eq!(seen.spis, Some(("aa".into(), "bb".into())));
        assert_eq!((seen.ike_auths, seen.dpds_answered), (1, 1));
        assert_eq!((seen.replay_drops, seen.packets_in), (2, 50));
        apply_event(
            &serde_json::from_str(r#"{"t":5.0,"event":"closed","reason":"dpd failed"}"#).unwrap(),
            &mut seen,
        );
        assert_eq!(seen.closed.as_deref(), Some("dpd failed"));
    }

    #[test]
    fn a_charon_log_shows_reauthentication_and_giving_up() {
        let mut seen = Seen::default();
        read_charon_log(
            "generating INFORMATIONAL request 2 [ ]\nparsed INFORMATIONAL response 2 [ ]\n",
            &mut seen,
        );
        assert_eq!(
            (seen.ike_auths, seen.dpds_answered, seen.closed),
            (1, 1, None)
        );
        let mut again = Seen::default();
        read_charon_log(
            "generating IKE_AUTH request 1 [ ]\ngiving up after 5 retransmits\n",
            &mut again,
        );
        assert_eq!(again.ike_auths, 2);
        assert!(again.closed.is_some());
    }
}
