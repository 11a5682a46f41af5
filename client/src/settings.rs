//! The command line and what it must say before anything starts.
//!
//! ```text
//!  argv ─► Args (clap: syntax, types) ─► Settings::from_args (meaning: families, overlaps,
//!          ranges, the PSK read and checked) ─► Settings ─► run
//! ```
//!
//! Every refusal names the argument and says what to change; the binary prints it and exits
//! with status 2.

use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::{ArgGroup, Parser};
use evpc_ike::Identity;
use zeroize::Zeroizing;

use crate::error::ClientError;

/// An evpc road warrior: IKEv2 (PSK) and ESP-in-UDP to an evpc gateway cluster, reporting what
/// it sees as JSON lines on stdout. Exits 0 on SIGTERM/SIGINT, 3 when the IKE SA ends.
#[derive(Debug, Clone, Parser)]
#[command(name = "evpc-client", version)]
#[command(group(ArgGroup::new("secret").required(true).args(["psk_file", "psk_env"])))]
pub struct Args {
    /// This client's outer IPv4 address: the data plane binds UDP 500 and 4500 on it.
    #[arg(long, value_name = "IP")]
    pub local: IpAddr,
    /// The gateway's (cluster's) IPv4 address.
    #[arg(long, value_name = "IP")]
    pub gateway: IpAddr,
    /// Our IKE identity: an IPv4 address, user@domain, or an FQDN (`@fqdn` forces an FQDN).
    #[arg(long, value_name = "IDENTITY")]
    pub id: String,
    /// The identity the gateway must prove (its PSK entry names ours).
    #[arg(long, value_name = "IDENTITY")]
    pub remote_id: String,
    /// File whose first line is the pre-shared key; must be owner-only (chmod 600).
    #[arg(long, value_name = "FILE")]
    pub psk_file: Option<PathBuf>,
    /// Environment variable that holds the pre-shared key.
    #[arg(long, value_name = "VAR")]
    pub psk_env: Option<String>,
    /// The TUN device of the inner traffic (created in this network namespace).
    #[arg(long, value_name = "NAME", default_value = "evpcc0")]
    pub tun: String,
    /// A network behind the gateway, routed into the tunnel (repeat for several).
    #[arg(long = "route", value_name = "CIDR", required = true)]
    pub routes: Vec<String>,
    /// Send a DPD of our own every this many seconds and report its round trip (0: never).
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub dpd_s: u64,
    /// Report every child's counters this often, in milliseconds (and once more at exit).
    #[arg(long, value_name = "MS", default_value_t = 1000)]
    pub counters_ms: u64,
    /// Inbound anti-replay window in packets (1 to 4096).
    #[arg(long, value_name = "PACKETS", default_value_t = 1024)]
    pub replay_window: u32,
    /// On SIGTERM/SIGINT, delete the IKE SA at the gateway first. By default the client exits
    /// without a word to the gateway, so stopping it leaves the cluster's state alone.
    #[arg(long)]
    pub delete_on_exit: bool,
}

/// The pre-shared key, wiped when dropped; `Debug` shows only its length.
#[derive(Clone)]
pub struct Psk(Zeroizing<Vec<u8>>);

impl Psk {
    /// The key's bytes (for the engine's configuration only).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// A key given in memory (tests).
    pub fn from_bytes(bytes: &[u8]) -> Result<Psk, ClientError> {
        if bytes.is_empty() {
            return Err(ClientError::Psk("the key is empty".into()));
        }
        Ok(Psk(Zeroizing::new(bytes.to_vec())))
    }

    /// The first line of `path` (without its line ending), refusing a file that group or
    /// others may read, as the node refuses such key files.
    pub fn from_file(path: &Path) -> Result<Psk, ClientError> {
        evpc_api::tls::check_private_file(path).map_err(|e| ClientError::Psk(e.to_string()))?;
        let contents = Zeroizing::new(
            std::fs::read(path)
                .map_err(|e| ClientError::Psk(format!("reading {}: {e}", path.display())))?,
        );
        let line = contents.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        Psk::from_bytes(line)
            .map_err(|_| ClientError::Psk(format!("the first line of {} is empty", path.display())))
    }

    /// The value of environment variable `name`, as read by the caller (`None`: unset).
    pub fn from_env_value(name: &str, value: Option<OsString>) -> Result<Psk, ClientError> {
        let value = value.ok_or_else(|| ClientError::Psk(format!("${name} is not set")))?;
        let value = Zeroizing::new(value.into_encoded_bytes());
        Psk::from_bytes(&value).map_err(|_| ClientError::Psk(format!("${name} is empty")))
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Psk(<{} bytes redacted>)", self.0.len())
    }
}

/// An IPv4 network, `a.b.c.d/len` with no host bits set.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length, 0 to 32.
    pub len: u8,
}

impl Prefix {
    fn mask(len: u8) -> u32 {
        if len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(len))
        }
    }

    /// Whether `addr` is inside.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & Self::mask(self.len) == u32::from(self.network)
    }

    /// The traffic selector covering it (any protocol and port).
    pub fn selector(&self) -> evpc_ike::TrafficSelector {
        evpc_ike::TrafficSelector::v4_prefix(self.network, self.len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;

    fn from_str(text: &str) -> Result<Prefix, String> {
        let (addr, len) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR (like 10.20.0.0/16)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{text:?}: {addr:?} is not an IPv4 address"))?;
        let len: u8 = len
            .parse()
            .ok()
            .filter(|len| *len <= 32)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to 32"))?;
        let network = Ipv4Addr::from(u32::from(addr) & Prefix::mask(len));
        if network != addr {
            return Err(format!(
                "{text:?} has host bits set; did you mean {network}/{len}?"
            ));
        }
        Ok(Prefix { network, len })
    }
}

/// Everything the client runs with, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Our outer address.
    pub local: Ipv4Addr,
    /// The gateway's address.
    pub gateway: Ipv4Addr,
    /// Our identity.
    pub local_id: Identity,
    /// The gateway's identity.
    pub remote_id: Identity,
    /// The pre-shared key.
    pub psk: Psk,
    /// The TUN device's name.
    pub tun: String,
    /// The networks behind the gateway.
    pub routes: Vec<Prefix>,
    /// Our own DPD interval, if any.
    pub dpd: Option<Duration>,
    /// How often the counters are reported.
    pub counters: Duration,
    /// The inbound anti-replay window.
    pub replay_window: u32,
    /// Delete the IKE SA on SIGTERM/SIGINT.
    pub delete_on_exit: bool,
}

fn bad(message: String) -> ClientError {
    ClientError::BadArgument(message)
}

/// A usable outer IPv4 address, or why not.
fn outer_v4(what: &str, addr: IpAddr) -> Result<Ipv4Addr, ClientError> {
    let IpAddr::V4(v4) = addr else {
        return Err(bad(format!(
            "--{what} {addr}: only IPv4 outer addresses are supported"
        )));
    };
    if v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast() {
        return Err(bad(format!(
            "--{what} {addr}: must be a unicast address of a host"
        )));
    }
    Ok(v4)
}

impl Settings {
    /// Checks `args` and reads the PSK (from the file, or from the environment through `env`).
    pub fn from_args(
        args: Args,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Settings, ClientError> {
        let local = outer_v4("local", args.local)?;
        let gateway = outer_v4("gateway", args.gateway)?;
        if local == gateway {
            return Err(bad(format!(
                "--local and --gateway are both {local}: the client needs its own address"
            )));
        }
        for (what, id) in [("id", &args.id), ("remote-id", &args.remote_id)] {
            if id.trim().is_empty() || id == "@" {
                return Err(bad(format!("--{what} is empty")));
            }
        }
        let tun = args.tun;
        if tun.is_empty() || tun.len() > 15 || tun.contains(['/', ' ', '\0']) {
            return Err(bad(format!(
                "--tun {tun:?}: a device name is 1 to 15 bytes with no '/', space or NUL"
            )));
        }
        let mut routes = Vec::with_capacity(args.routes.len());
        for text in &args.routes {
            let prefix: Prefix = text.parse().map_err(|e| bad(format!("--route {e}")))?;
            if prefix.contains(gateway) {
                // The outer ESP and IKE datagrams would be routed into the tunnel itself.
                return Err(bad(format!(
                    "--route {prefix} contains the gateway {gateway}; route the networks behind it"
                )));
            }
            if prefix.contains(local) {
                return Err(bad(format!(
                    "--route {prefix} contains our own address {local}"
                )));
            }
            if !routes.contains(&prefix) {
                routes.push(prefix);
            }
        }
        if !(1..=4096).contains(&args.replay_window) {
            return Err(bad(format!(
                "--replay-window {}: must be 1 to 4096 packets",
                args.replay_window
            )));
        }
        if args.counters_ms < 10 {
            return Err(bad(format!(
                "--counters-ms {}: at least 10 ms",
                args.counters_ms
            )));
        }
        let psk = match (&args.psk_file, &args.psk_env) {
            (Some(path), None) => Psk::from_file(path)?,
            (None, Some(name)) => Psk::from_env_value(name, env(name))?,
            // clap's group makes these two impossible; say so rather than panic
            _ => {
                return Err(bad(
                    "give exactly one of --psk-file and --psk-env".to_string()
                ));
            }
        };
        Ok(Settings {
            local,
            gateway,
            local_id: Identity::from_config(&args.id),
            remote_id: Identity::from_config(&args.remote_id),
            psk,
            tun,
            routes,
            dpd: (args.dpd_s > 0).then(|| Duration::from_secs(args.dpd_s)),
            counters: Duration::from_millis(args.counters_ms),
            replay_window: args.replay_window,
            delete_on_exit: args.delete_on_exit,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn args(extra: &[&str]) -> Result<Args, clap::Error> {
        let mut argv = vec![
            "evpc-client",
            "--local",
            "198.51.100.100",
            "--gateway",
            "198.51.100.1",
            "--id",
            "client-17.example",
            "--remote-id",
            "gw.example",
            "--psk-env",
            "EVPC_TEST_PSK",
            "--route",
            "10.20.0.0/16",
        ];
        argv.extend_from_slice(extra);
        Args::try_parse_from(argv)
    }

    fn env(name: &str) -> Option<OsString> {
        (name == "EVPC_TEST_PSK").then(|| OsString::from("s3cret"))
    }

    fn refused(extra: &[&str]) -> String {
        match Settings::from_args(args(extra).expect("parses"), env) {
            Ok(s) => panic!("accepted {extra:?}: {s:?}"),
            Err(e) => {
                assert_eq!(e.exit_status(), 2, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn good_arguments_become_settings() {
        let s = Settings::from_args(
            args(&["--route", "10.30.0.0/24", "--dpd-s", "5", "--tun", "rw17"]).unwrap(),
            env,
        )
        .unwrap();
        assert_eq!(s.local, Ipv4Addr::new(198, 51, 100, 100));
        assert_eq!(s.gateway, Ipv4Addr::new(198, 51, 100, 1));
        assert_eq!(s.local_id, Identity::fqdn("client-17.example"));
        assert_eq!(s.remote_id, Identity::fqdn("gw.example"));
        assert_eq!(s.psk.expose(), b"s3cret");
        assert_eq!(s.tun, "rw17");
        assert_eq!(
            s.routes.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["10.20.0.0/16", "10.30.0.0/24"]
        );
        assert_eq!(s.dpd, Some(Duration::from_secs(5)));
        assert_eq!(s.counters, Duration::from_millis(1000));
        assert_eq!(s.replay_window, 1024);
        assert!(!s.delete_on_exit);
        // the defaults: no DPD of our own
        let s = Settings::from_args(args(&[]).unwrap(), env).unwrap();
        assert_eq!(s.dpd, None);
        assert_eq!(s.tun, "evpcc0");
    }

    #[test]
    fn bad_values_are_refused_with_what_to_change() {
        for (extra, says) in [
            (
                &["--route", "10.20.0.1/16"][..],
                "did you mean 10.20.0.0/16",
            ),
            (&["--route", "10.20.0.0"], "not a CIDR"),
            (&["--route", "10.20.0.0/33"], "0 to 32"),
            (&["--route", "fd00::/8"], "not an IPv4 address"),
            (&["--route", "198.51.100.0/24"], "contains the gateway"),
            (&["--route", "0.0.0.0/0"], "contains the gateway"),
            (&["--replay-window", "0"], "1 to 4096"),
            (&["--replay-window", "5000"], "1 to 4096"),
            (&["--counters-ms", "0"], "at least 10 ms"),
            (&["--tun", "a-name-that-is-too-long"], "1 to 15 bytes"),
            (&["--tun", "a/b"], "1 to 15 bytes"),
        ] {
            let error = refused(extra);
            assert!(error.contains(says), "{extra:?}: {error}");
        }
    }

    #[test]
    fn addresses_and_identities_are_checked() {
        let parse = |argv: &[&str]| Args::try_parse_from(argv).unwrap();
        let base = |local: &'static str, gateway: &'static str, id: &'static str| {
            vec![
                "evpc-client",
                "--local",
                local,
                "--gateway",
                gateway,
                "--id",
                id,
                "--remote-id",
                "gw.example",
                "--psk-env",
                "EVPC_TEST_PSK",
                "--route",
                "10.20.0.0/16",
            ]
        };
        for (argv, says) in [
            (
                base("198.51.100.1", "198.51.100.1", "c"),
                "both 198.51.100.1",
            ),
            (base("2001:db8::1", "198.51.100.1", "c"), "only IPv4"),
            (base("0.0.0.0", "198.51.100.1", "c"), "unicast"),
            (base("198.51.100.100", "224.0.0.1", "c"), "unicast"),
            (base("198.51.100.100", "198.51.100.1", " "), "--id is empty"),
        ] {
            let error = Settings::from_args(parse(&argv), env)
                .unwrap_err()
                .to_string();
            assert!(error.contains(says), "{argv:?}: {error}");
        }
        // identities the way strongSwan writes them
        assert_eq!(
            Identity::from_config("10.0.0.1"),
            Identity::ipv4(Ipv4Addr::new(10, 0, 0, 1))
        );
        assert_eq!(
            Identity::from_config("@10.0.0.1"),
            Identity::fqdn("10.0.0.1")
        );
        assert_eq!(
            Identity::from_config("alice@example"),
            Identity::email("alice@example")
        );
        assert_eq!(
            Identity::from_config("gw.example"),
            Identity::fqdn("gw.example")
        );
    }

    #[test]
    fn clap_refuses_a_missing_or_doubled_secret_and_a_missing_route() {
        let without = |drop: &str| {
            let mut argv = vec![
                "evpc-client",
                "--local",
                "198.51.100.100",
                "--gateway",
                "198.51.100.1",
                "--id",
                "c",
                "--remote-id",
                "g",
                "--psk-env",
                "X",
                "--route",
                "10.20.0.0/16",
            ];
            let at = argv.iter().position(|a| *a == drop).unwrap();
            argv.drain(at..at + 2);
            Args::try_parse_from(argv)
        };
        assert!(without("--psk-env").is_err());
        assert!(without("--route").is_err());
        assert!(args(&["--psk-file", "/x"]).is_err(), "both secrets at once");
        assert!(args(&["--local", "not-an-ip"]).is_err());
    }

    #[test]
    fn the_psk_file_must_be_owner_only_and_its_first_line_is_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("psk");
        std::fs::write(&path, "first line key\r\nsecond line\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Psk::from_file(&path).unwrap_err().to_string();
        assert!(error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Psk::from_file(&path).unwrap().expose(), b"first line key");
        std::fs::write(&path, "\nkey on the second line\n").unwrap();
        assert!(
            Psk::from_file(&path)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );
        assert!(
            Psk::from_file(&dir.path().join("missing"))
                .unwrap_err()
                .to_string()
                .contains("missing")
        );
    }

    #[test]
    fn the_psk_from_the_environment_must_be_set_and_not_empty() {
        assert_eq!(
            Psk::from_env_value("K", Some("v".into())).unwrap().expose(),
            b"v"
        );
        assert!(
            Psk::from_env_value("K", None)
                .unwrap_err()
                .to_string()
                .contains("$K is not set")
        );
        assert!(
            Psk::from_env_value("K", Some("".into()))
                .unwrap_err()
                .to_string()
                .contains("$K is empty")
        );
    }

    #[test]
    fn the_psk_never_shows_in_debug() {
        let psk = Psk::from_bytes(b"hunter2-secret").unwrap();
        let text = format!("{psk:?}");
        assert!(!text.contains("hunter2"), "{text}");
        let settings =
            Settings::from_args(args(&[]).unwrap(), |_| Some("topsecret".into())).unwrap();
        assert!(!format!("{settings:?}").contains("topsecret"));
    }
}
