//! `evpc-chaos local`: a whole cluster of `evpc-node` child processes on loopback, for trying
//! evpc out and for tests. Each node gets its own directory (config, data, log) under `--dir`.
//!
//! Secure by default: the first start creates a PKI in `--dir/pki` (a CA, a certificate per
//! node, and the operator certificate `local-admin` with the admin role), every node serves
//! mutual TLS, and the `evpcctl` line it prints uses that operator certificate.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use evpc_api::{AdminClient, ClientTls, Security};
use evpc_proto::admin::v1 as pb;
use evpc_proto::cluster::v1::cluster_client::ClusterClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tonic::transport::Channel;

use evpc_node::config::{
    DataplaneConfig, NodeConfig, OwnershipConfig, PeerConfig, RaftTuning, Timeouts,
};

/// What `local` runs.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    /// Number of nodes.
    pub nodes: u64,
    /// Directory holding one subdirectory per node.
    pub dir: PathBuf,
    /// Node `i` listens on `base_port + i` (Raft) and `base_port + 100 + i` (admin).
    pub base_port: u16,
    /// Timing for every node.
    pub timeouts: Timeouts,
    /// Raft tuning for every node.
    pub raft: RaftTuning,
    /// Ownership settings for every node.
    pub ownership: OwnershipConfig,
    /// Data plane for every node.
    pub dataplane: DataplaneConfig,
    /// The cluster key file every node uses; `None`: `dir/pki/cluster.key`, created (0600) with a
    /// fresh random key if it does not exist.
    pub cluster_key_file: Option<PathBuf>,
    /// Give node `i` its own loopback address `127.0.0.(10+i)` instead of sharing 127.0.0.1, so
    /// a firewall rule can cut one node off (the chaos runner's partitions).
    pub address_per_node: bool,
    /// Run without TLS (`insecure_plaintext = true` on every node): benchmarks measure what
    /// TLS costs with it.
    pub insecure_plaintext: bool,
    /// `[limits]` of every node.
    pub limits: evpc_node::config::Limits,
}

/// The operator certificate `local` creates and prints an `evpcctl` line for.
pub const LOCAL_OPERATOR: &str = "local-admin";

impl LocalCluster {
    /// `nodes` nodes under `dir` with default timing and tuning.
    pub fn new(nodes: u64, dir: PathBuf, base_port: u16) -> LocalCluster {
        LocalCluster {
            nodes,
            dir,
            base_port,
            timeouts: Timeouts::default(),
            raft: RaftTuning::default(),
            ownership: OwnershipConfig::default(),
            dataplane: DataplaneConfig::default(),
            cluster_key_file: None,
            address_per_node: false,
            insecure_plaintext: false,
            limits: Default::default(),
        }
    }

    /// The loopback address of node `id`.
    pub fn host(&self, id: u64) -> std::net::Ipv4Addr {
        if self.address_per_node {
            std::net::Ipv4Addr::new(127, 0, 0, 10 + id as u8)
        } else {
            std::net::Ipv4Addr::LOCALHOST
        }
    }
}

/// One started child.
#[derive(Debug)]
pub struct LocalNode {
    /// Its configuration.
    pub config: NodeConfig,
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
}

impl LocalCluster {
    /// The configuration of node `id` (1-based).
    pub fn node_config(&self, id: u64) -> NodeConfig {
        let addr = |offset: u64, id: u64| -> std::net::SocketAddr {
            let port = u64::from(self.base_port) + offset + id;
            std::net::SocketAddr::new(self.host(id).into(), port as u16)
        };
        NodeConfig {
            id,
            raft_addr: addr(0, id),
            admin_addr: addr(100, id),
            data_dir: self.dir.join(format!("node{id}")).join("data"),
            peers: (1..=self.nodes)
                .filter(|p| *p != id)
                .map(|p| PeerConfig {
                    id: p,
                    raft_addr: addr(0, p),
                    admin_addr: addr(100, p),
                })
                .collect(),
            timeouts: self.timeouts.clone(),
            raft: self.raft.clone(),
            ownership: self.ownership.clone(),
            dataplane: self.dataplane.clone(),
            cluster_key_file: Some(self.cluster_key_path()),
            metrics_addr: None,
            ike: None,
            tls: (!self.insecure_plaintext).then(|| self.pki().node(id)),
            insecure_plaintext: self.insecure_plaintext,
            limits: self.limits.clone(),
        }
    }

    /// The cluster's PKI directory.
    pub fn pki(&self) -> evpc_node::pki::PkiDir {
        evpc_node::pki::PkiDir::new(self.dir.join("pki"))
    }

    /// How an operator reaches the nodes: with the `local-admin` certificate, or in plaintext.
    pub fn security(&self) -> anyhow::Result<Security> {
        self.security_as(LOCAL_OPERATOR)
    }

    /// How operator `name` (whose certificate is in the PKI directory) reaches the nodes.
    pub fn security_as(&self, name: &str) -> anyhow::Result<Security> {
        if self.insecure_plaintext {
            return Ok(Security::Plaintext);
        }
        let files = self.pki().client(name);
        Ok(Security::Tls(ClientTls::load(
            &files.ca_file,
            &files.cert_file,
            &files.key_file,
        )?))
    }

    /// The `evpcctl` options that reach this cluster as the local operator.
    pub fn evpcctl_args(&self) -> String {
        let mut args = format!("--endpoints {}", self.admin_endpoints().join(","));
        if self.insecure_plaintext {
            args.push_str(" --insecure-plaintext");
        } else {
            let files = self.pki().client(LOCAL_OPERATOR);
            args.push_str(&format!(
                " --cacert {} --cert {} --key {}",
                files.ca_file.display(),
                files.cert_file.display(),
                files.key_file.display()
            ));
        }
        args
    }

    /// The cluster key file the nodes use.
    pub fn cluster_key_path(&self) -> PathBuf {
        self.cluster_key_file
            .clone()
            .unwrap_or_else(|| self.pki().cluster_key())
    }

    /// Creates the cluster key file (owner-only) with a fresh random key, unless it exists.
    fn ensure_cluster_key(&self) -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.cluster_key_path();
        if path.exists() {
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let key = zeroize::Zeroizing::new(hex::encode(rand::random::<[u8; 32]>()));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        file.write_all(key.as_bytes())?;
        file.sync_all()?;
        Ok(())
    }

    /// Admin endpoints of all nodes.
    pub fn admin_endpoints(&self) -> Vec<String> {
        (1..=self.nodes)
            .map(|id| self.node_config(id).admin_addr.to_string())
            .collect()
    }

    /// Writes each node's config and starts `exe run --config ...` for each.
    pub fn spawn(&self, exe: &Path) -> anyhow::Result<Vec<LocalNode>> {
        anyhow::ensure!(
            (1..=7).contains(&self.nodes),
            "--nodes must be between 1 and 7 (Raft voters), not {}",
            self.nodes
        );
        anyhow::ensure!(
            u64::from(self.base_port) + 100 + self.nodes <= 65_535,
            "--base-port {} leaves no room for {} nodes",
            self.base_port,
            self.nodes
        );
        self.ensure_cluster_key()?;
        if !self.insecure_plaintext {
            let ids: Vec<u64> = (1..=self.nodes).collect();
            self.pki().ensure_local(&ids, LOCAL_OPERATOR)?;
        }
        (1..=self.nodes)
            .map(|id| {
                let config = self.node_config(id);
                let node_dir = self.dir.join(format!("node{id}"));
                std::fs::create_dir_all(&node_dir)
                    .with_context(|| format!("creating {}", node_dir.display()))?;
                let config_path = node_dir.join("node.toml");
                std::fs::write(&config_path, toml::to_string(&config)?)
                    .with_context(|| format!("writing {}", config_path.display()))?;
                let log = node_dir.join("node.log");
                let child = spawn_node(exe, &config_path, &log)?;
                Ok(LocalNode { config, child, log })
            })
            .collect()
    }

    /// Initializes the cluster through node 1 if it is new, then waits until every node is a
    /// voter, a leader is elected and every placement slot has an owner.
    pub async fn bootstrap(&self, timeout: Duration) -> anyhow::Result<pb::StatusResponse> {
        bootstrap_cluster(
            &self.admin_endpoints(),
            self.nodes,
            timeout,
            &self.security()?,
        )
        .await
        .with_context(|| format!("see the node logs under {}", self.dir.display()))
    }
}

/// Initializes a cluster of `nodes` through `endpoints[0]` (node 1's admin address) if it has
/// no members yet, then waits until every endpoint sees a leader, `nodes` voters and every
/// placement slot owned — so new SAs can be created at once, through any node. Returns node 1's
/// status.
pub async fn bootstrap_cluster(
    endpoints: &[String],
    nodes: u64,
    timeout: Duration,
    security: &Security,
) -> anyhow::Result<pb::StatusResponse> {
    let deadline = tokio::time::Instant::now() + timeout;
    let first = endpoints.first().context("no endpoints")?;
    let mut node1 = AdminClient::new(
        std::slice::from_ref(first),
        Duration::from_secs(2),
        security.clone(),
    )?;
    let status = loop {
        match node1.status(false).await {
            Ok(status) => break status,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "waiting for node 1");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("node 1 never answered"),
        }
    };
    if status.members.is_empty() {
        node1.initialize(Vec::new()).await?;
    }
    loop {
        let mut ready = None;
        for endpoint in endpoints {
            let mut node = AdminClient::new(
                std::slice::from_ref(endpoint),
                Duration::from_secs(2),
                security.clone(),
            )?;
            match node.status(false).await {
                Ok(status)
                    if status.leader_id.is_some()
                        && status.members.iter().filter(|m| m.voter).count() as u64 == nodes
                        && status.members.iter().map(|m| m.slots).sum::<u32>()
                            == u32::from(evpc_raft_store::SLOT_COUNT) =>
                {
                    ready.get_or_insert(status);
                }
                _ => {
                    ready = None;
                    break;
                }
            }
        }
        if let Some(status) = ready {
            return Ok(status);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no leader with {nodes} voters and every slot owned after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts one node process with its output appended to `log`.
pub fn spawn_node(exe: &Path, config: &Path, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

/// Sends SIGTERM to each child and waits for it; SIGKILL after `grace`.
pub async fn stop_all(nodes: &mut [LocalNode], grace: Duration) {
    for node in nodes.iter() {
        if let Some(pid) = node.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    for node in nodes.iter_mut() {
        match tokio::time::timeout(grace, node.child.wait()).await {
            Ok(Ok(status)) => {
                tracing::info!(node = node.config.id, %status, "node stopped");
            }
            _ => {
                tracing::warn!(
                    node = node.config.id,
                    "node did not stop in time; killing it"
                );
                let _ = node.child.kill().await;
            }
        }
    }
}

/// The text table `local` prints.
pub fn table(nodes: &[LocalNode], status: &pb::StatusResponse) -> String {
    let mut out = format!(
        "{:<4} {:<8} {:<9} {:<21} {:<21}\n",
        "ID", "PID", "ROLE", "RAFT", "ADMIN"
    );
    for node in nodes {
        let role = if status.leader_id == Some(node.config.id) {
            "leader"
        } else {
            "follower"
        };
        out.push_str(&format!(
            "{:<4} {:<8} {:<9} {:<21} {:<21}\n",
            node.config.id,
            node.child
                .id()
                .map_or_else(|| "-".into(), |p| p.to_string()),
            role,
            node.config.raft_addr,
            node.config.admin_addr
        ));
    }
    out
}

/// Running node processes, by id (1-based).
#[derive(Debug)]
pub struct ProcessCluster {
    /// Layout (ports, directories).
    pub spec: LocalCluster,
    nodes: Vec<LocalNode>,
    alive: Vec<bool>,
    exe: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl ProcessCluster {
    /// Starts the nodes `spec` describes and bootstraps them. With `spec.dir` empty, the nodes
    /// live in a fresh temporary directory that is removed when the cluster is dropped.
    pub async fn launch(mut spec: LocalCluster, exe: PathBuf) -> anyhow::Result<ProcessCluster> {
        let temp = if spec.dir.as_os_str().is_empty() {
            let temp = tempfile::Builder::new().prefix("evpc-").tempdir()?;
            spec.dir = temp.path().to_owned();
            Some(temp)
        } else {
            None
        };
        let nodes = spec.spawn(&exe)?;
        let mut cluster = ProcessCluster {
            spec,
            alive: vec![true; nodes.len()],
            nodes,
            exe,
            _dir: temp,
        };
        if let Err(e) = cluster.spec.bootstrap(Duration::from_secs(30)).await {
            cluster.stop().await;
            return Err(e);
        }
        Ok(cluster)
    }

    /// Node ids.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.nodes.iter().map(|n| n.config.id)
    }

    /// Ids of nodes whose process runs.
    pub fn alive_ids(&self) -> Vec<u64> {
        self.ids().filter(|id| self.is_alive(*id)).collect()
    }

    /// Whether node `id`'s process runs (as far as the runner knows).
    pub fn is_alive(&self, id: u64) -> bool {
        self.alive[(id - 1) as usize]
    }

    fn node(&self, id: u64) -> &LocalNode {
        &self.nodes[(id - 1) as usize]
    }

    /// An admin client for node `id` only (reads its own applied state).
    pub fn admin_of(&self, id: u64) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(
            &[self.node(id).config.admin_addr.to_string()],
            Duration::from_secs(5),
            self.spec.security()?,
        )?)
    }

    /// A cluster.v1 client for node `id` (to propose to it directly), presenting the
    /// certificate of another member (cluster.v1 is for members only).
    pub fn cluster_client(&self, id: u64) -> anyhow::Result<ClusterClient<Channel>> {
        let addr = self.node(id).config.raft_addr.to_string();
        let as_member = id % self.spec.nodes + 1;
        let tls = match &self.node(as_member).config.tls {
            Some(files) => Some(evpc_node::tls::TlsMaterial::load(files)?),
            None => None,
        };
        let channel = evpc_node::peers::endpoint(&addr, Duration::from_secs(1), tls.as_ref(), id)?
            .timeout(Duration::from_secs(3))
            .connect_lazy();
        Ok(ClusterClient::new(channel).max_decoding_message_size(64 << 20))
    }

    /// The leader, as a live node reports it, once one is elected (waits up to `timeout`).
    pub async fn leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for id in self.alive_ids() {
                let Ok(mut admin) = self.admin_of(id) else {
                    continue;
                };
                if let Ok(status) = admin.status(false).await
                    && let Some(leader) = status.leader_id
                    && self.is_alive(leader)
                {
                    return Ok(leader);
                }
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no leader among live nodes {:?} within {timeout:?}",
                self.alive_ids()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs node `id` and reaps it.
    pub async fn sigkill(&mut self, id: u64) -> anyhow::Result<()> {
        let node = &mut self.nodes[(id - 1) as usize];
        node.child.kill().await.context("SIGKILL")?;
        self.alive[(id - 1) as usize] = false;
        Ok(())
    }

    /// Sends `signal` to node `id` (SIGSTOP / SIGCONT for pauses).
    pub fn signal(&self, id: u64, signal: Signal) -> anyhow::Result<()> {
        let pid = self.nodes[(id - 1) as usize]
            .child
            .id()
            .context("the node has exited")?;
        kill(Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Waits (up to `timeout`) for node `id`'s process to exit by itself; its exit status.
    pub async fn wait_exit(
        &mut self,
        id: u64,
        timeout: Duration,
    ) -> anyhow::Result<std::process::ExitStatus> {
        let node = &mut self.nodes[(id - 1) as usize];
        let status = tokio::time::timeout(timeout, node.child.wait())
            .await
            .with_context(|| format!("node {id} did not exit within {timeout:?}"))??;
        self.alive[(id - 1) as usize] = false;
        Ok(status)
    }

    /// What node `id` logged so far.
    pub fn log_of(&self, id: u64) -> String {
        std::fs::read_to_string(&self.nodes[(id - 1) as usize].log).unwrap_or_default()
    }

    /// Starts node `id` again on its data directory.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let dir = self.spec.dir.join(format!("node{id}"));
        let node = &mut self.nodes[(id - 1) as usize];
        node.child = spawn_node(&self.exe, &dir.join("node.toml"), &node.log)?;
        self.alive[(id - 1) as usize] = true;
        Ok(())
    }

    /// Waits until every live node agrees on the leader and has applied the leader's whole log
    /// (a restarted node may resume below what was committed before the crash until the leader
    /// re-commits it). Returns that index.
    pub async fn converged(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut seen = Vec::new();
            for id in self.alive_ids() {
                if let Ok(mut admin) = self.admin_of(id)
                    && let Ok(status) = admin.status(false).await
                {
                    seen.push(status);
                }
            }
            let leader = seen.first().and_then(|s| s.leader_id);
            let leader_log = seen
                .iter()
                .find(|s| Some(s.node_id) == leader)
                .map(|s| s.last_log_index);
            if seen.len() == self.alive_ids().len()
                && let Some(log) = leader_log
                && seen
                    .iter()
                    .all(|s| s.leader_id == leader && s.last_applied_index == log)
            {
                return Ok(log);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "live nodes did not converge within {timeout:?}: {:?}",
                seen.iter()
                    .map(|s| (
                        s.node_id,
                        s.leader_id,
                        s.last_log_index,
                        s.last_applied_index
                    ))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `(node, applied index, state digest)` of every live replica, taken at one applied index.
    pub async fn digests(&self) -> anyhow::Result<Vec<(u64, u64, String)>> {
        for _ in 0..20 {
            let index = self.converged(Duration::from_secs(60)).await?;
            let mut all = Vec::new();
            for id in self.alive_ids() {
                let status = self.admin_of(id)?.status(true).await?;
                all.push((id, status.last_applied_index, status.state_digest));
            }
            if all.iter().all(|(_, i, _)| *i == index) {
                return Ok(all);
            }
        }
        anyhow::bail!("replicas kept applying while digests were taken")
    }

    /// Waits until the replicas agree and nothing has been committed for `quiet_for` (the
    /// leader's housekeeping commits on its own now and then), and returns that applied index
    /// and state digest: the state a SIGKILL of every node must leave on their disks. A node
    /// recovers up to the committed index it persisted; followers learn the last commit index
    /// from heartbeats, which sled makes durable within its 500 ms background flush, so
    /// `quiet_for` should be well over that.
    pub async fn quiet(
        &self,
        quiet_for: Duration,
        timeout: Duration,
    ) -> anyhow::Result<(u64, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last: Option<(u64, String)> = None;
        let mut since = tokio::time::Instant::now();
        let mut seen = Vec::new();
        loop {
            let now = self.digests().await?;
            anyhow::ensure!(
                now.iter().all(|(_, _, d)| *d == now[0].2),
                "replicas differ: {now:?}"
            );
            let state = (now[0].1, now[0].2.clone());
            seen.push(state.0);
            if last.as_ref() != Some(&state) {
                last = Some(state);
                since = tokio::time::Instant::now();
            } else if since.elapsed() >= quiet_for {
                return Ok(last.expect("set above"));
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the cluster kept committing: applied indexes {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `(node, applied index, digest)` each live node recovered from its data directory when
    /// it last started: what a restart must reproduce, whatever the cluster committed since (a
    /// restarted cluster may commit at once, e.g. mark a node that is slow to come back down).
    pub async fn recovered(&self) -> anyhow::Result<Vec<(u64, u64, String)>> {
        let mut all = Vec::new();
        for id in self.alive_ids() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let status = loop {
                match self.admin_of(id)?.status(true).await {
                    Ok(status) => break status,
                    Err(e) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(node = id, error = %e, "waiting for a restarted node");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            all.push((id, status.recovered_applied_index, status.recovered_digest));
        }
        Ok(all)
    }

    /// An admin client over every node's endpoint.
    pub fn admin(&self) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(
            &self.spec.admin_endpoints(),
            Duration::from_secs(5),
            self.spec.security()?,
        )?)
    }

    /// Stops every live node with SIGTERM (SIGKILL after a grace period).
    pub async fn stop(&mut self) {
        stop_all(&mut self.nodes, Duration::from_secs(10)).await;
        self.alive.iter_mut().for_each(|a| *a = false);
    }
}

/// `evpc-chaos local`: start the `evpc-node` executable `exe` as each node, bootstrap, print,
/// wait for a signal, stop.
pub async fn run(spec: LocalCluster, exe: PathBuf) -> anyhow::Result<()> {
    std::fs::create_dir_all(&spec.dir)
        .with_context(|| format!("creating {}", spec.dir.display()))?;
    let mut cluster = ProcessCluster::launch(spec.clone(), exe).await?;
    let status = cluster.admin_of(1)?.follow_leader().await?;
    println!(
        "evpc cluster of {} nodes in {}",
        spec.nodes,
        spec.dir.display()
    );
    print!("{}", table(&cluster.nodes, &status));
    if spec.insecure_plaintext {
        println!("WARNING: insecure_plaintext: the cluster's APIs authenticate nobody");
    }
    println!(
        "\ntry: evpcctl {} status\nlogs: {}/node*/node.log — Ctrl-C stops the cluster",
        spec.evpcctl_args(),
        spec.dir.display()
    );

    let signal = evpc_node::server::wait_for_signal();
    tokio::pin!(signal);
    let mut exited = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            result = &mut signal => {
                result?;
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for node in cluster.nodes.iter_mut() {
                    if let Ok(Some(status)) = node.child.try_wait()
                        && exited.insert(node.config.id)
                    {
                        eprintln!(
                            "node {} exited ({status}); see {}",
                            node.config.id,
                            node.log.display()
                        );
                    }
                }
            }
        }
    }
    println!("stopping the cluster");
    cluster.stop().await;
    Ok(())
}
