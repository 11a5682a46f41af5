//! `evpc-node local`: a whole cluster of child processes on loopback, for trying evpc out and
//! for tests. Each node gets its own directory (config, data, log) under `--dir`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use evpc_api::AdminClient;
use evpc_proto::admin::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::config::{NodeConfig, PeerConfig, RaftTuning, Timeouts};

/// What `local` runs.
#[derive(Clone, Debug)]
pub struct LocalCluster {
    /// Number of nodes.
    pub nodes: u64,
    /// Directory holding one subdirectory per node.
    pub dir: PathBuf,
    /// Node `i` listens on `base_port + i` (Raft) and `base_port + 100 + i` (admin).
    pub base_port: u16,
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
            format!("127.0.0.1:{port}").parse().expect("loopback address")
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
            timeouts: Timeouts::default(),
            raft: RaftTuning::default(),
        }
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
    /// voter and a leader is elected.
    pub async fn bootstrap(&self, timeout: Duration) -> anyhow::Result<pb::StatusResponse> {
        let deadline = tokio::time::Instant::now() + timeout;
        let first = self.node_config(1).admin_addr.to_string();
        let mut node1 = AdminClient::new(&[first.clone()], Duration::from_secs(2))?;
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
        let mut client = AdminClient::new(&self.admin_endpoints(), Duration::from_secs(2))?;
        loop {
            if let Ok(status) = client.status(false).await
                && status.leader_id.is_some()
                && status.members.iter().filter(|m| m.voter).count() as u64 == self.nodes
            {
                return Ok(status);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no leader with {} voters after {timeout:?}; see the node logs under {}",
                self.nodes,
                self.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
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
                tracing::warn!(node = node.config.id, "node did not stop in time; killing it");
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
            node.child.id().map_or_else(|| "-".into(), |p| p.to_string()),
            role,
            node.config.raft_addr,
            node.config.admin_addr
        ));
    }
    out
}

/// `evpc-node local`: start, bootstrap, print, wait for a signal, stop.
pub async fn run(cluster: LocalCluster) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the evpc-node executable")?;
    std::fs::create_dir_all(&cluster.dir)
        .with_context(|| format!("creating {}", cluster.dir.display()))?;
    let mut nodes = cluster.spawn(&exe)?;
    let status = match cluster.bootstrap(Duration::from_secs(20)).await {
        Ok(status) => status,
        Err(e) => {
            stop_all(&mut nodes, Duration::from_secs(5)).await;
            return Err(e);
        }
    };
    println!("evpc cluster of {} nodes in {}", cluster.nodes, cluster.dir.display());
    print!("{}", table(&nodes, &status));
    println!(
        "\ntry: evpcctl --endpoints {} status\nlogs: {}/node*/node.log — Ctrl-C stops the cluster",
        cluster.admin_endpoints().join(","),
        cluster.dir.display()
    );

    let signal = crate::server::wait_for_signal();
    tokio::pin!(signal);
    let mut exited = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            result = &mut signal => {
                result?;
                break;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                for node in nodes.iter_mut() {
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
    stop_all(&mut nodes, Duration::from_secs(10)).await;
    Ok(())
}
