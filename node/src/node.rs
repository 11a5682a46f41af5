//! One gateway node: its Raft member, its view of the replicated state, and the way it gets a
//! command committed from wherever it runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use evpc_proto::cluster::v1::Proposal;
use evpc_raft_store::raft::Raft;
use evpc_raft_store::{Command, Member, NodeId, Response, StateReader};
use openraft::ServerState;
use openraft::error::{ClientWriteError, RaftError};
use openraft::rt::WatchReceiver;

use crate::config::NodeConfig;
use crate::ownership::liveness::{FenceReason, Liveness};
use crate::peers::Peers;
use crate::raft_network::NetworkFactory;
use crate::sealing::Keyring;
use crate::wire;
use evpc_dataplane::FenceGate;

/// How long `propose` keeps trying to find a leader before it gives up.
const PROPOSE_PATIENCE: Duration = Duration::from_secs(5);

/// A committed command: where it landed in the log and what `apply` answered.
#[derive(Clone, Debug)]
pub struct Proposed {
    /// The log index of the entry.
    pub log_index: u64,
    /// `apply`'s answer.
    pub response: Response,
}

/// Why a command was not committed (or may not have been).
#[derive(Debug, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader (only from [`Node::propose_local`]).
    #[error("node {this} is not the leader (leader: {leader:?})")]
    NotLeader {
        /// This node.
        this: NodeId,
        /// The leader, if known.
        leader: Option<NodeId>,
    },
    /// No leader emerged in time (no quorum, or an election in progress).
    #[error("no Raft leader within {0:?}; is a quorum of nodes up?")]
    NoLeader(Duration),
    /// The leader changed while the entry was in flight: it may or may not have been committed.
    /// Read the state before retrying.
    #[error(
        "leadership changed before the outcome was known; the command may or may not have been applied"
    )]
    OutcomeUnknown,
    /// Forwarding to the leader failed.
    #[error("forwarding to leader {leader} failed: {status}")]
    Forward {
        /// The leader.
        leader: NodeId,
        /// What the transport or the leader said.
        status: tonic::Status,
    },
    /// The local Raft stopped or refused for another reason.
    #[error("raft: {0}")]
    Raft(String),
}

impl ProposeError {
    /// Whether the command surely did not reach a leader's log, so retrying cannot apply it twice
    /// (and if it did, the invariants refuse the duplicate rather than apply it again).
    fn is_retriable(&self) -> bool {
        match self {
            ProposeError::NotLeader { .. } => true,
            ProposeError::Forward { status, .. } => matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::Unavailable
            ),
            _ => false,
        }
    }
}

impl From<ProposeError> for tonic::Status {
    fn from(e: ProposeError) -> Self {
        match &e {
            ProposeError::NotLeader { leader, .. } => {
                let mut status = tonic::Status::failed_precondition(e.to_string());
                if let Some(leader) = leader
                    && let Ok(value) = leader.to_string().parse()
                {
                    status.metadata_mut().insert(LEADER_HINT, value);
                }
                status
            }
            ProposeError::NoLeader(_) => tonic::Status::unavailable(e.to_string()),
            ProposeError::OutcomeUnknown => tonic::Status::aborted(e.to_string()),
            ProposeError::Forward { status, .. } => {
                tonic::Status::new(status.code(), e.to_string())
            }
            ProposeError::Raft(_) => tonic::Status::internal(e.to_string()),
        }
    }
}

/// Metadata key carrying the leader's node id on a not-leader answer.
pub const LEADER_HINT: &str = "evpc-leader-id";

/// A running gateway node.
#[derive(Debug)]
pub struct Node {
    /// This node's id.
    pub id: NodeId,
    /// Its configuration.
    pub config: NodeConfig,
    /// Its Raft member.
    pub raft: Raft,
    /// Its applied state.
    pub state: StateReader,
    /// Channels to the other members.
    pub peers: Peers,
    /// Whether the data plane may run; also this node's monotonic clock (`gate.now_ms()`).
    pub gate: Arc<FenceGate>,
    /// Who this node hears, kept by the pinger.
    pub liveness: Mutex<Liveness>,
    /// Why the data plane is fenced, if it is.
    pub fence: Mutex<Option<FenceReason>>,
    /// The cluster keys: seal and open SA keys; `None` without `cluster_key_file`.
    pub keyring: Option<Keyring>,
    /// This node's TLS material; `None` with `insecure_plaintext`.
    pub tls: Option<crate::tls::TlsMaterial>,
    /// An operator asked for a rebalance (the leader's reconciler works it off).
    pub rebalance_requested: AtomicBool,
    /// Child SAs the data plane drives now.
    pub running_children: AtomicU64,
    /// Planned hand-offs under way on this node: their children still count as driven here
    /// until the new owner has their state (a drained node is idle only when this is 0 too).
    pub handoffs_in_flight: AtomicU64,
    /// Leases committed by this node since it started.
    pub lease_commits: AtomicU64,
    /// The applied index the owner runtime last acted on (what the data plane reflects).
    pub reconciled_index: AtomicU64,
    /// The applied index and state digest this node recovered from its data directory.
    pub recovered: Recovered,
    /// What the data directory says about itself (node id, cluster id).
    pub identity: Mutex<crate::data_dir::Identity>,
    /// Whether this node checked its data directory in with its peers and takes part in Raft;
    /// until then its Raft RPCs and pings are refused both ways.
    pub joined: Arc<AtomicBool>,
    /// When this process started opening its data directory: what `Status.uptime_ms` counts
    /// from (how long a restart took to serve again).
    pub started: std::time::Instant,
    /// Planned handovers in flight (cluster.v1 `Handover` and the owner task share it).
    pub handovers: crate::ownership::handover::HandoverBoard,
}

/// What a node found in its data directory at start: a restart after SIGKILL must reproduce the
/// state it had at this index byte for byte.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The last applied index after the log was replayed.
    pub applied_index: u64,
    /// The state digest at that index.
    pub digest: String,
    /// The last index in the log on disk (applied or not).
    pub last_log_index: u64,
    /// The cluster the recovered state belongs to.
    pub cluster: Option<evpc_raft_store::ClusterId>,
}

/// Whether a command changes who owns an SA.
fn moves_owners(command: &Command) -> bool {
    match command {
        Command::AssignOwners(_) | Command::DeleteSa { .. } => true,
        Command::Batch(commands) => commands.iter().any(moves_owners),
        _ => false,
    }
}

/// Creates `dir` (and its parents) readable by the owner only: it holds the replicated log.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Wall-clock milliseconds since the Unix epoch: the times proposers put into commands.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Node {
    /// Opens the data directory and starts the Raft member (not yet serving RPCs).
    pub async fn start(config: NodeConfig) -> anyhow::Result<Arc<Node>> {
        let started = std::time::Instant::now();
        create_private_dir(&config.data_dir).map_err(|e| {
            anyhow::anyhow!("cannot create data_dir {}: {e}", config.data_dir.display())
        })?;
        let identity = crate::data_dir::load_or_create(&config.data_dir, config.id)?;
        let keyring = config
            .cluster_key_file
            .as_deref()
            .map(Keyring::load)
            .transpose()?;
        let (mut log_store, mut state_machine) =
            evpc_raft_store::open(&config.data_dir.join("raft"))?;
        state_machine
            .set_background_hook(Arc::new(|| crate::priority::lower_this_thread("snapshot")));
        let last_log_index = {
            use openraft::storage::RaftLogStorage;
            log_store
                .get_log_state()
                .await?
                .last_log_id
                .map_or(0, |l| l.index)
        };
        let state = state_machine.reader();
        let tls = match &config.tls {
            Some(files) => Some(crate::tls::TlsMaterial::load(files)?),
            None => {
                tracing::warn!(
                    node = config.id,
                    "insecure_plaintext = true: cluster.v1 and admin.v1 run without TLS and \
                     authenticate nobody; anyone who reaches {} or {} controls this cluster",
                    config.raft_addr,
                    config.admin_addr
                );
                None
            }
        };
        let own_ip = config.raft_addr.ip();
        let peers = Peers::new(
            Duration::from_millis(config.timeouts.rpc_ms),
            (!own_ip.is_unspecified()).then_some(own_ip),
            tls.clone(),
        );
        let joined = Arc::new(AtomicBool::new(false));
        let raft = Raft::new(
            config.id,
            Arc::new(config.raft_config()?),
            NetworkFactory::new(
                peers.clone(),
                joined.clone(),
                Duration::from_millis(config.limits.snapshot_stall_ms),
            ),
            log_store,
            state_machine,
        )
        .await?;
        // openraft has replayed the log up to the persisted committed index by now; nothing new
        // can be applied before this node takes part in Raft (its RPCs are refused until it
        // checked in with its peers).
        let recovered = {
            let guard = state.read();
            Recovered {
                applied_index: guard.applied_index(),
                digest: guard.digest(),
                last_log_index,
                cluster: guard.cluster_id(),
            }
        };
        crate::data_dir::check_state(&config.data_dir, config.id, &identity, recovered.cluster)?;
        if let Some(keyring) = &keyring {
            // Not fatal: the node may be far behind and the key it misses retired since; but
            // the operator must know before the blobs fail to open one by one.
            let guard = state.read();
            let missing: Vec<_> = guard
                .keys()
                .live()
                .filter(|id| keyring.get(*id).is_err())
                .collect();
            if !missing.is_empty() {
                tracing::error!(
                    ?missing,
                    held = ?keyring.ids(),
                    "this node's keyring lacks cluster keys the replicated state (as recovered \
                     from disk) still uses: SAs sealed under them will not open here; copy the \
                     keyring file from a node that has them (if this state is behind and the \
                     keys were retired since, this resolves itself as the node catches up)"
                );
            }
        }
        tracing::info!(
            node = config.id,
            raft_addr = %config.raft_addr,
            admin_addr = %config.admin_addr,
            data_dir = %config.data_dir.display(),
            applied = recovered.applied_index,
            "raft member started"
        );
        let gate = Arc::new(FenceGate::new());
        let liveness = Mutex::new(Liveness::new(config.id, gate.now_ms()));
        Ok(Arc::new(Node {
            id: config.id,
            config,
            raft,
            state,
            peers,
            gate,
            liveness,
            fence: Mutex::new(Some(FenceReason::NoQuorum {
                heard: 1,
                needed: 1,
            })),
            keyring,
            tls,
            rebalance_requested: AtomicBool::new(false),
            running_children: AtomicU64::new(0),
            handoffs_in_flight: AtomicU64::new(0),
            lease_commits: AtomicU64::new(0),
            reconciled_index: AtomicU64::new(0),
            recovered,
            identity: Mutex::new(identity),
            joined,
            started,
            handovers: Default::default(),
        }))
    }

    /// Checks the data directory in with the peers (see [`crate::data_dir`]) and, if it is
    /// current and this cluster's, joins Raft. Peers that do not answer within `patience` are
    /// taken to be starting too (a whole-cluster restart): the node then joins with a warning.
    pub async fn check_in(&self, patience: Duration) -> Result<(), crate::data_dir::DataDirError> {
        let ours = self
            .identity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cluster_id()
            .or(self.recovered.cluster);
        let mut targets: BTreeMap<NodeId, String> = self
            .config
            .peers
            .iter()
            .map(|p| (p.id, p.raft_addr.to_string()))
            .collect();
        {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            for (id, member) in m.membership_config.membership().nodes() {
                targets.insert(*id, member.raft_addr.clone());
            }
        }
        targets.remove(&self.id);
        let started = tokio::time::Instant::now();
        let mut answers = Vec::new();
        while !targets.is_empty() {
            let asked = targets
                .iter()
                .map(|(peer, addr)| self.ask_check_in(*peer, addr.clone()));
            answers = futures::future::join_all(asked)
                .await
                .into_iter()
                .flatten()
                .collect();
            if !answers.is_empty() || started.elapsed() >= patience {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        crate::data_dir::judge(
            &self.config.data_dir,
            self.id,
            ours,
            self.recovered.last_log_index,
            &answers,
        )?;
        if answers.is_empty() && !targets.is_empty() {
            tracing::warn!(
                peers = ?targets.keys().collect::<Vec<_>>(),
                "no peer answered the check-in: joining without verifying the data directory \
                 (every member is starting, as after a whole-cluster restart)"
            );
        } else {
            tracing::info!(
                answers = answers.len(),
                last_log_index = self.recovered.last_log_index,
                "data directory checked in with the peers"
            );
        }
        self.joined
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    async fn ask_check_in(
        &self,
        peer: NodeId,
        addr: String,
    ) -> Option<crate::data_dir::CheckInAnswer> {
        let mut client = self.peers.client(peer, &addr).ok()?;
        let request = evpc_proto::cluster::v1::CheckInRequest {
            node: self.id,
            cluster_id: self
                .recovered
                .cluster
                .map(|c| c.to_string())
                .unwrap_or_default(),
            last_log_index: self.recovered.last_log_index,
        };
        match tokio::time::timeout(Duration::from_millis(500), client.check_in(request)).await {
            Ok(Ok(reply)) => {
                let reply = reply.into_inner();
                (reply.from == peer).then(|| crate::data_dir::CheckInAnswer {
                    from: peer,
                    cluster: reply.cluster_id.parse().ok(),
                    acknowledged: reply.acknowledged,
                })
            }
            Ok(Err(status)) => {
                if crate::peers::is_transport_error(&status) {
                    self.peers.reset(peer);
                }
                None
            }
            Err(_) => None,
        }
    }

    /// Whether this node takes part in Raft: it checked in, and its Raft core still runs (a
    /// storage error stops the core; the node must then look dead to everyone).
    pub fn in_service(&self) -> bool {
        self.joined.load(std::sync::atomic::Ordering::Acquire) && self.raft_running()
    }

    /// Whether the Raft core runs (no fatal storage or internal error).
    pub fn raft_running(&self) -> bool {
        let metrics = self.raft.metrics();
        let m = metrics.borrow_watched();
        m.running_state.is_ok() && m.state != ServerState::Shutdown
    }

    /// A read barrier: the leader's linearizable read index (Raft §6.4), asked for now. Every
    /// entry committed before this call is at or below it, so a node that has applied up to it
    /// has seen everything the cluster committed when it asked — including what this node
    /// itself committed before a crash, even if its own committed index was not yet on disk.
    /// Retries (through elections) until `patience` runs out.
    pub async fn read_barrier(&self, patience: Duration) -> Result<u64, ProposeError> {
        let started = tokio::time::Instant::now();
        loop {
            if let Some(index) = self.try_read_barrier().await {
                return Ok(index);
            }
            if started.elapsed() > patience {
                return Err(ProposeError::NoLeader(patience));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn try_read_barrier(&self) -> Option<u64> {
        if self.is_leader() {
            return self.local_read_index().await.ok().map(|(index, _)| index);
        }
        let (leader, member) = self.leader()?;
        if leader == self.id {
            return None;
        }
        let mut client = self.peers.client(leader, &member.raft_addr).ok()?;
        let request = evpc_proto::cluster::v1::ReadIndexRequest { from: self.id };
        // A live leader answers within a heartbeat round trip. Waiting the full RPC timeout on
        // a leader that was just paused or cut off would hold a node fenced for a second after
        // an election elsewhere already succeeded: ask briefly, then look again who leads.
        let timeout = Duration::from_millis(2 * self.config.timeouts.heartbeat_ms.max(25));
        match tokio::time::timeout(timeout, client.read_index(request)).await {
            Ok(Ok(reply)) => Some(reply.into_inner().index),
            Ok(Err(status)) => {
                if crate::peers::is_transport_error(&status) {
                    self.peers.reset(leader);
                }
                None
            }
            Err(_) => None,
        }
    }

    /// This node's read index as the leader: (index, term), once a quorum confirmed that it
    /// still leads.
    pub async fn local_read_index(&self) -> Result<(u64, u64), ProposeError> {
        let linearizer = self
            .raft
            .get_read_linearizer(openraft::raft::ReadPolicy::ReadIndex)
            .await
            .map_err(|e| ProposeError::Raft(e.to_string()))?;
        let term = self.raft.metrics().borrow_watched().current_term;
        Ok((linearizer.read_log_id().index(), term))
    }

    /// This node's member record (its advertised addresses).
    pub fn member(&self) -> Member {
        Member {
            raft_addr: self.config.raft_addr.to_string(),
            admin_addr: self.config.admin_addr.to_string(),
        }
    }

    /// The members named in the configuration (this node and its peers), for bootstrap.
    pub fn configured_members(&self) -> BTreeMap<NodeId, Member> {
        let mut members = BTreeMap::from([(self.id, self.member())]);
        for peer in &self.config.peers {
            members.insert(
                peer.id,
                Member {
                    raft_addr: peer.raft_addr.to_string(),
                    admin_addr: peer.admin_addr.to_string(),
                },
            );
        }
        members
    }

    /// The current leader and its addresses, as this node knows them.
    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let metrics = self.raft.metrics().borrow_watched().clone();
        let leader = metrics.current_leader?;
        let member = metrics.membership_config.get_node(&leader)?.clone();
        Some((leader, member))
    }

    /// The Raft voters as this node knows them.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Why the data plane is fenced now, if it is.
    pub fn fence_reason(&self) -> Option<FenceReason> {
        self.fence.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether this node is the leader right now.
    pub fn is_leader(&self) -> bool {
        self.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// Commits `command` through this node's Raft, which must be the leader.
    pub async fn propose_local(&self, command: Command) -> Result<Proposed, ProposeError> {
        let moves_owners = moves_owners(&command);
        match self.raft.client_write(command).await {
            Ok(written) => {
                if moves_owners {
                    // Followers learn a commit index with the next append or heartbeat; an SA
                    // changing hands should not wait for that: the old owner stops and the new
                    // one starts as soon as each applies the move.
                    if let Err(e) = self.raft.trigger().heartbeat().await {
                        tracing::debug!(error = %e, "could not trigger a heartbeat");
                    }
                }
                Ok(Proposed {
                    log_index: written.log_id.index,
                    response: written.data,
                })
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ProposeError::NotLeader {
                    this: self.id,
                    leader: f.leader_id,
                })
            }
            Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_))) => {
                Err(ProposeError::OutcomeUnknown)
            }
            Err(e) => Err(ProposeError::Raft(e.to_string())),
        }
    }

    /// Commits `command` from any node: locally on the leader, otherwise forwarded to it. Waits
    /// (up to a few seconds) for a leader during an election.
    pub async fn propose(&self, command: Command) -> Result<Proposed, ProposeError> {
        let started = tokio::time::Instant::now();
        loop {
            let outcome = match self.propose_local(command.clone()).await {
                Err(ProposeError::NotLeader {
                    leader: Some(leader),
                    ..
                }) if leader != self.id => self.forward(leader, &command).await,
                other => other,
            };
            match outcome {
                Err(e) if e.is_retriable() => {}
                done => return done,
            }
            if started.elapsed() > PROPOSE_PATIENCE {
                return Err(ProposeError::NoLeader(PROPOSE_PATIENCE));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn forward(&self, leader: NodeId, command: &Command) -> Result<Proposed, ProposeError> {
        let member = self
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .get_node(&leader)
            .cloned()
            .ok_or(ProposeError::NotLeader {
                this: self.id,
                leader: None,
            })?;
        let forward_err = |status| ProposeError::Forward { leader, status };
        let mut client = self
            .peers
            .client(leader, &member.raft_addr)
            .map_err(forward_err)?;
        let proposal = Proposal {
            command: wire::encode(command).map_err(|e| forward_err(e.into()))?,
        };
        let reply = match client.propose(proposal).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => {
                if crate::peers::is_transport_error(&status) {
                    self.peers.reset(leader);
                }
                return Err(forward_err(status));
            }
        };
        Ok(Proposed {
            log_index: reply.log_index,
            response: wire::decode(&reply.response).map_err(|e| forward_err(e.into()))?,
        })
    }
}
