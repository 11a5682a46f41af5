//! admin.v1 served by one node: status, membership, SA inspection and movement.
//!
//! Reads answer from this node's applied state. Membership and leadership changes need the
//! leader: elsewhere they fail with FAILED_PRECONDITION and the leader's admin address in the
//! `evpc-leader-admin` metadata, which `evpcctl` follows. SA writes go through
//! [`Node::propose`], which forwards to the leader by itself.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use evpc_proto::admin::v1 as pb;
use evpc_proto::admin::v1::admin_server::Admin;
use evpc_raft_store::{
    Applied, ChildSa, Command, IkeSa, Member, NodeId, NodeState, OwnerMove, Rejection, Role,
    SaContext, SaId, SnapshotRecord, TrafficSelector, slot_for_initiator_spi,
};
use openraft::ServerState;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::rt::WatchReceiver;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::sealing::{ClusterKey, ContextError, Keyring};

use evpc_api::{LEADER_ADMIN_HINT, NO_LEADER};

/// admin.v1 for one node.
#[derive(Debug, Clone)]
pub struct AdminService {
    node: Arc<Node>,
    /// One key rotation at a time on this node.
    rotation: Arc<tokio::sync::Mutex<()>>,
    /// The state digest at an applied index: hashing the whole state is the dearest read
    /// (and it holds the state's lock), so a client polling `status --digest` on an idle
    /// cluster pays for it once per index.
    digest: Arc<std::sync::Mutex<Option<(u64, String)>>>,
}

impl AdminService {
    /// Serves for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        AdminService {
            node,
            rotation: Arc::new(tokio::sync::Mutex::new(())),
            digest: Arc::default(),
        }
    }

    /// The digest of the state under `state` if the cache has it for its applied index; else a
    /// copy of the state (O(1): persistent maps) for [`AdminService::digest_of`] to hash once
    /// the guard is let go — hashing 100,000 SAs takes a few hundred milliseconds, which
    /// `apply` must not wait for.
    fn cached_digest(
        &self,
        state: &evpc_raft_store::StateGuard<'_>,
    ) -> Result<String, Box<(u64, evpc_raft_store::State)>> {
        let index = state.applied_index();
        match &*self.digest.lock().unwrap_or_else(|e| e.into_inner()) {
            Some((at, digest)) if *at == index => Ok(digest.clone()),
            _ => Err(Box::new((index, (**state).clone()))),
        }
    }

    /// Hashes a copy from [`AdminService::cached_digest`] off the runtime, and caches it.
    async fn digest_of(&self, index: u64, copy: evpc_raft_store::State) -> Result<String, Status> {
        let digest = tokio::task::spawn_blocking(move || copy.digest())
            .await
            .map_err(|e| Status::internal(format!("computing the digest: {e}")))?;
        *self.digest.lock().unwrap_or_else(|e| e.into_inner()) = Some((index, digest.clone()));
        Ok(digest)
    }

    /// The node served.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Fails unless this node leads: FAILED_PRECONDITION pointing at the leader when it is
    /// known, UNAVAILABLE marked [`NO_LEADER`] while there is none (an election), which a
    /// client may retry (nothing was proposed).
    fn require_leader(&self) -> Result<(), Status> {
        if self.node.is_leader() {
            return Ok(());
        }
        let Some((_, leader)) = self.node.leader() else {
            let mut status = Status::unavailable(format!(
                "node {} knows no Raft leader (an election is under way); try again",
                self.node.id
            ));
            status
                .metadata_mut()
                .insert(NO_LEADER, tonic::metadata::MetadataValue::from_static("1"));
            return Err(status);
        };
        let mut status = Status::failed_precondition(format!(
            "node {} is not the Raft leader; send this to the leader",
            self.node.id
        ));
        if let Ok(value) = leader.admin_addr.parse() {
            status.metadata_mut().insert(LEADER_ADMIN_HINT, value);
        }
        Err(status)
    }

    /// Commits a membership change (joint consensus) and answers with the new membership.
    async fn change_membership(
        &self,
        change: openraft::ChangeMembers<NodeId, Member>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let changed = self
            .node
            .raft
            .change_membership(change, false)
            .await
            .map_err(membership_status)?;
        Ok(Response::new(membership_response(
            changed.log_id.index,
            changed.membership,
        )))
    }

    async fn set_gateway_state(
        &self,
        id: NodeId,
        state: NodeState,
    ) -> Result<Response<pb::NodeStateResponse>, Status> {
        if !self.node.voters().contains(&id) {
            return Err(Status::not_found(format!("node {id} is not a voter")));
        }
        let (log_index, _) = self
            .propose(Command::SetNodeState {
                node: id,
                state,
                at_ms: crate::node::now_ms(),
            })
            .await?;
        tracing::info!(node = id, %state, "gateway state set by an operator");
        let owned_sas = self.node.state.read().owned_count(id) as u64;
        Ok(Response::new(pb::NodeStateResponse {
            id,
            gateway_state: state.to_string(),
            owned_sas,
            log_index,
        }))
    }

    /// The keys SA contexts are sealed with: the cluster keys, which both clusters of a
    /// transfer share.
    fn context_keys(&self) -> Result<&Keyring, Status> {
        self.node.keyring.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "SA contexts are sealed under the cluster key: set cluster_key_file on this node",
            )
        })
    }

    /// The key a context is sealed with now: the active cluster key.
    fn context_sealer(&self) -> Result<Arc<ClusterKey>, Status> {
        let keyring = self.context_keys()?;
        keyring
            .sealer(&self.node.state.read())
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }

    async fn propose(&self, command: Command) -> Result<(u64, Applied), Status> {
        let proposed = self.node.propose(command).await?;
        let applied = proposed.response.map_err(rejection_status)?;
        Ok((proposed.log_index, applied))
    }
}

/// A refused command as a gRPC status an operator can read.
pub fn rejection_status(rejection: Rejection) -> Status {
    let message = rejection.to_string();
    match rejection {
        Rejection::UnknownSa(_) | Rejection::UnknownChild { .. } | Rejection::UnknownNode(_) => {
            Status::not_found(message)
        }
        Rejection::SaExists(_)
        | Rejection::ChildSpiInUse { .. }
        | Rejection::AddressInUse { .. } => Status::already_exists(message),
        _ => Status::failed_precondition(message),
    }
}

fn parse_sa_id(text: &str) -> Result<SaId, Status> {
    text.parse()
        .map_err(|e: evpc_raft_store::ParseSaIdError| Status::invalid_argument(e.to_string()))
}

fn membership_status(
    e: RaftError<evpc_raft_store::TypeConfig, ClientWriteError<evpc_raft_store::TypeConfig>>,
) -> Status {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            Status::failed_precondition("leadership moved during the change; retry on the leader")
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            Status::failed_precondition(e.to_string())
        }
        other => Status::unavailable(other.to_string()),
    }
}

fn role_name(state: ServerState, voter: bool) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Candidate => "candidate",
        ServerState::Follower if voter => "follower",
        ServerState::Follower | ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

fn state_name(state: Option<NodeState>) -> String {
    state.map_or_else(|| "unregistered".into(), |s| s.to_string())
}

fn selector(ts: &TrafficSelector) -> pb::TrafficSelector {
    pb::TrafficSelector {
        protocol: u32::from(ts.protocol),
        start_port: u32::from(ts.start_port),
        end_port: u32::from(ts.end_port),
        start_addr: ts.start_addr.to_string(),
        end_addr: ts.end_addr.to_string(),
    }
}

fn child_info(child: &ChildSa) -> pb::ChildSaInfo {
    pb::ChildSaInfo {
        in_spi: format!("{:08x}", child.in_spi),
        out_spi: format!("{:08x}", child.out_spi),
        suite: child.suite.to_string(),
        esn: child.suite.esn,
        out_hwm: child.out_hwm,
        in_checkpoint: child.in_checkpoint,
        rekey_generation: child.rekey_generation,
        ts_local: child.ts_local.iter().map(selector).collect(),
        ts_remote: child.ts_remote.iter().map(selector).collect(),
        rekey_at_ms: child.times.rekey_at_ms,
        expire_at_ms: child.times.expire_at_ms,
    }
}

/// An SA as operators see it: everything but key material.
/// How long `Snapshot` waits for the build it asked for.
const SNAPSHOT_WAIT: Duration = Duration::from_secs(120);

fn snapshot_info(s: SnapshotRecord) -> pb::SnapshotInfo {
    pb::SnapshotInfo {
        index: s.index,
        ike_sas: s.sas,
        bytes: s.bytes,
        ms: s.ms,
        lock_ms: s.lock_ms,
    }
}

pub fn sa_info(sa: &IkeSa) -> pb::SaInfo {
    let response_hash = sa.last_response.as_ref().map(|r| {
        let mut hash = Sha256::new();
        for datagram in &r.datagrams {
            hash.update(datagram);
        }
        hex::encode(hash.finalize())
    });
    pb::SaInfo {
        id: sa.id.to_string(),
        spi_i: format!("{:016x}", sa.spi_i),
        spi_r: format!("{:016x}", sa.spi_r),
        role: match sa.role {
            Role::Responder => "responder".into(),
            Role::Initiator => "initiator".into(),
        },
        local: sa.local.to_string(),
        peer: sa.peer.to_string(),
        local_id: sa.local_id.to_string(),
        peer_id: sa.peer_id.to_string(),
        suite: sa.suite.to_string(),
        owner: sa.owner,
        epoch: sa.epoch.0,
        slot: u32::from(sa.slot),
        next_peer_request: sa.msg.next_peer_request,
        next_local_request: sa.msg.next_local_request,
        last_response_msg_id: sa.last_response.as_ref().map(|r| r.msg_id),
        last_response_sha256: response_hash.unwrap_or_default(),
        pending_request_msg_id: sa.pending_request.as_ref().map(|r| r.msg_id),
        virtual_ip: sa.virtual_ip.map(|a| a.to_string()).unwrap_or_default(),
        established_ms: sa.times.established_ms,
        rekey_at_ms: sa.times.rekey_at_ms,
        expire_at_ms: sa.times.expire_at_ms,
        last_peer_activity_ms: sa.last_peer_activity_ms,
        rekey_generation: sa.rekey_generation,
        children: sa.children.values().map(child_info).collect(),
    }
}

fn membership_response(
    log_index: u64,
    membership: Option<openraft::Membership<NodeId, Member>>,
) -> pb::MembershipResponse {
    let (voters, learners) = membership.map_or_else(Default::default, |m| {
        (m.voter_ids().collect(), m.learner_ids().collect())
    });
    pb::MembershipResponse {
        voters,
        learners,
        log_index,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(
        &self,
        request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let include_digest = request.into_inner().include_digest;
        let fence = self.node.fence_reason();
        let metrics = self.node.raft.metrics().borrow_watched().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let replication = metrics.replication.clone().unwrap_or_default();

        // Everything under one short hold of the state's lock; the digest (if not cached) is
        // hashed from a copy after it.
        let (mut response, digest) = {
            let state = self.node.state.read();
            let members = membership
                .nodes()
                .map(|(id, member)| {
                    let voter = voters.contains(id);
                    pb::Member {
                        id: *id,
                        raft_addr: member.raft_addr.clone(),
                        admin_addr: member.admin_addr.clone(),
                        voter,
                        role: if metrics.current_leader == Some(*id) {
                            "leader".into()
                        } else if voter {
                            "follower".into()
                        } else {
                            "learner".into()
                        },
                        gateway_state: state_name(state.nodes().get(id).map(|r| r.state)),
                        matched_index: replication
                            .get(id)
                            .map(|m| m.as_ref().map_or(0, |l| l.index)),
                        owned_sas: state.owned_count(*id) as u64,
                        slots: state.slots().count_for(*id) as u32,
                        silence_ms: Some(
                            self.node
                                .liveness
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .silence_ms(*id, self.node.gate.now_ms()),
                        ),
                    }
                })
                .collect();
            let leader_admin_addr = metrics
                .current_leader
                .and_then(|l| membership.get_node(&l))
                .map(|m| m.admin_addr.clone())
                .unwrap_or_default();
            let snapshots = self.node.state.snapshot_stats();
            let response = pb::StatusResponse {
                node_id: self.node.id,
                role: role_name(metrics.state, voters.contains(&self.node.id)).into(),
                leader_id: metrics.current_leader,
                leader_admin_addr,
                term: metrics.current_term,
                members,
                last_log_index: metrics.last_log_index.unwrap_or(0),
                committed_index: metrics.local_committed.as_ref().map_or(0, |l| l.index),
                last_applied_index: state.applied_index(),
                snapshot_index: metrics.snapshot.as_ref().map_or(0, |l| l.index),
                purged_index: metrics.purged.as_ref().map_or(0, |l| l.index),
                ike_sas: state.sa_count() as u64,
                child_sas: state.child_count() as u64,
                // filled in below, once the guard is let go
                state_digest: String::new(),
                recovered_applied_index: self.node.recovered.applied_index,
                recovered_digest: if include_digest {
                    self.node.recovered.digest.clone()
                } else {
                    String::new()
                },
                addresses: state.addresses().len() as u64,
                fenced: fence.is_some(),
                fence_reason: fence.map(|r| format!("{r:?}")).unwrap_or_default(),
                dataplane: if self.node.config.dataplane.backend.is_empty() {
                    "none".into()
                } else {
                    self.node.config.dataplane.backend.clone()
                },
                running_children: self.node.running_children.load(Ordering::Relaxed)
                    + self.node.handoffs_in_flight.load(Ordering::Relaxed),
                lease_commits: self.node.lease_commits.load(Ordering::Relaxed),
                active_key_id: state.keys().active().0,
                // O(live keys): the per-key counts are kept by `apply`.
                key_blobs: state
                    .keys()
                    .live()
                    .map(|key| pb::KeyBlobs {
                        key_id: key.0,
                        blobs: state.keys().blobs_under(key),
                        sas: state.keys().sas_with(key),
                    })
                    .collect(),
                unkeyed_blobs: state.keys().opaque_blobs(),
                retired_key_ids: state.keys().retired().iter().map(|k| k.0).collect(),
                keyring_key_ids: self
                    .node
                    .keyring
                    .as_ref()
                    .map(|k| k.ids().into_iter().map(|id| id.0).collect())
                    .unwrap_or_default(),
                snapshot_loaded: snapshots.loaded.map(snapshot_info),
                snapshot_built: snapshots.built.map(snapshot_info),
                snapshot_installed: snapshots.installed.map(snapshot_info),
                uptime_ms: self.node.started.elapsed().as_millis() as u64,
            };
            let digest = include_digest.then(|| self.cached_digest(&state));
            (response, digest)
        };
        response.state_digest = match digest {
            None => String::new(),
            Some(Ok(cached)) => cached,
            Some(Err(copy)) => {
                let (index, copy) = *copy;
                self.digest_of(index, copy).await?
            }
        };
        Ok(Response::new(response))
    }

    async fn snapshot(
        &self,
        _request: Request<pb::SnapshotRequest>,
    ) -> Result<Response<pb::SnapshotResponse>, Status> {
        let before = self.node.state.snapshot_stats().built;
        let applied = self.node.state.read().applied_index();
        let done = |built: Option<SnapshotRecord>| {
            built.filter(|b| b.index >= applied && Some(*b) != before)
        };
        if let Some(b) = before.filter(|b| b.index >= applied) {
            // Nothing applied since the last one.
            return Ok(Response::new(pb::SnapshotResponse {
                node_id: self.node.id,
                snapshot: Some(snapshot_info(b)),
            }));
        }
        self.node
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::internal(format!("Raft refused to build a snapshot: {e}")))?;
        let deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT;
        loop {
            if let Some(built) = done(self.node.state.snapshot_stats().built) {
                tracing::info!(
                    index = built.index,
                    ms = built.ms,
                    "snapshot built on request"
                );
                return Ok(Response::new(pb::SnapshotResponse {
                    node_id: self.node.id,
                    snapshot: Some(snapshot_info(built)),
                }));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "no snapshot at index {applied} or later after {} s (see the node's log)",
                    SNAPSHOT_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn rotate_key(
        &self,
        _request: Request<pb::RotateKeyRequest>,
    ) -> Result<Response<pb::RotateKeyResponse>, Status> {
        self.require_leader()?;
        let _one_at_a_time = self.rotation.try_lock().map_err(|_| {
            Status::aborted("a key rotation is already running on this node; retry when it ends")
        })?;
        tracing::info!("cluster key rotation requested by an operator");
        Ok(Response::new(
            crate::rotation::rotate_key(&self.node).await?,
        ))
    }

    async fn initialize(
        &self,
        request: Request<pb::InitializeRequest>,
    ) -> Result<Response<pb::InitializeResponse>, Status> {
        let requested = request.into_inner().members;
        let members: BTreeMap<NodeId, Member> = if requested.is_empty() {
            self.node.configured_members()
        } else {
            let mut members = BTreeMap::new();
            for m in requested {
                if m.id == 0 || m.raft_addr.is_empty() || m.admin_addr.is_empty() {
                    return Err(Status::invalid_argument(
                        "each member needs a positive id, a raft_addr and an admin_addr",
                    ));
                }
                let member = Member {
                    raft_addr: m.raft_addr,
                    admin_addr: m.admin_addr,
                };
                if members.insert(m.id, member).is_some() {
                    return Err(Status::invalid_argument(format!(
                        "member {} listed twice",
                        m.id
                    )));
                }
            }
            if !members.contains_key(&self.node.id) {
                return Err(Status::invalid_argument(format!(
                    "the members must include this node ({})",
                    self.node.id
                )));
            }
            members
        };
        tracing::info!(members = ?members.keys().collect::<Vec<_>>(), "initializing the cluster");
        match self.node.raft.initialize(members).await {
            Ok(()) => Ok(Response::new(pb::InitializeResponse {})),
            Err(RaftError::APIError(InitializeError::NotAllowed(e))) => Err(
                Status::failed_precondition(format!("the cluster is already initialized: {e}")),
            ),
            Err(RaftError::APIError(e)) => Err(Status::invalid_argument(e.to_string())),
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.require_leader()?;
        let request = request.into_inner();
        let node = request
            .node
            .ok_or_else(|| Status::invalid_argument("node is required"))?;
        if node.id == 0 || node.raft_addr.is_empty() || node.admin_addr.is_empty() {
            return Err(Status::invalid_argument(
                "node needs a positive id, a raft_addr and an admin_addr",
            ));
        }
        let member = Member {
            raft_addr: node.raft_addr,
            admin_addr: node.admin_addr,
        };
        tracing::info!(node = node.id, %member, "adding a learner");
        let added = self
            .node
            .raft
            .add_learner(node.id, member, true)
            .await
            .map_err(membership_status)?;
        if request.learner_only {
            return Ok(Response::new(membership_response(
                added.log_id.index,
                added.membership,
            )));
        }
        tracing::info!(node = node.id, "promoting to voter");
        self.change_membership(openraft::ChangeMembers::AddVoterIds(BTreeSet::from([
            node.id
        ])))
        .await
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        self.require_leader()?;
        let id = request.into_inner().id;
        let known = self
            .node
            .raft
            .metrics()
            .borrow_watched()
            .membership_config
            .get_node(&id)
            .is_some();
        if !known {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        tracing::info!(node = id, "removing a member");
        self.change_membership(openraft::ChangeMembers::RemoveVoters(BTreeSet::from([id])))
            .await
    }

    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        self.require_leader()?;
        let to = request.into_inner().to;
        if !self.node.voters().contains(&to) {
            return Err(Status::invalid_argument(format!(
                "node {to} is not a voter"
            )));
        }
        self.node
            .raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let mut metrics = self.node.raft.metrics();
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let leader = metrics.borrow_watched().current_leader;
                if leader == Some(to) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        let leader_id = self.node.raft.metrics().borrow_watched().current_leader;
        if waited.is_err() {
            return Err(Status::deadline_exceeded(format!(
                "node {to} did not take over within 5 s (leader now: {leader_id:?})"
            )));
        }
        Ok(Response::new(pb::TransferLeaderResponse { leader_id }))
    }

    async fn transfer_sa(
        &self,
        request: Request<pb::TransferSaRequest>,
    ) -> Result<Response<pb::TransferSaResponse>, Status> {
        let request = request.into_inner();
        let id = parse_sa_id(&request.id)?;
        // The epoch is read from this node's applied state, which may trail the leader's (a
        // follower, or a move the reconciler just committed): a stale read is refused by
        // `apply`, and read again once the state caught up.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (from, epoch) = {
                let state = self.node.state.read();
                let sa = state
                    .sa(id)
                    .ok_or_else(|| Status::not_found(format!("no IKE SA {id}")))?;
                (sa.owner, sa.epoch)
            };
            if from == request.to {
                return Err(Status::failed_precondition(format!(
                    "IKE SA {id} is already owned by node {from}"
                )));
            }
            if !self.node.config.ownership.leader_serves
                && self
                    .node
                    .leader()
                    .is_some_and(|(leader, _)| leader == request.to)
            {
                return Err(Status::failed_precondition(format!(
                    "node {} is the Raft leader, which hands its SAs to the others \
                     (ownership.leader_serves = false): transfer to another node",
                    request.to
                )));
            }
            let command = Command::AssignOwners(vec![OwnerMove {
                sa: id,
                from_epoch: epoch,
                to: request.to,
                lease: self.node.config.ownership.move_lease,
                // an operator's transfer: both nodes alive, the SA handed over
                handover: true,
            }]);
            match self.propose(command).await? {
                (log_index, Applied::Moves(results)) => match results.into_iter().next() {
                    Some(Ok(epoch)) => {
                        tracing::info!(sa = %id, from, to = request.to, %epoch, "SA transferred");
                        return Ok(Response::new(pb::TransferSaResponse {
                            id: id.to_string(),
                            from,
                            to: request.to,
                            epoch: epoch.0,
                            log_index,
                        }));
                    }
                    Some(Err(Rejection::StaleEpoch { .. })) if attempts < 5 => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Some(Err(rejection)) => return Err(rejection_status(rejection)),
                    None => return Err(Status::internal("the move answered nothing")),
                },
                (_, other) => {
                    return Err(Status::internal(format!("the move answered {other:?}")));
                }
            }
        }
    }

    async fn drain_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::NodeStateResponse>, Status> {
        self.set_gateway_state(request.into_inner().id, NodeState::Draining)
            .await
    }

    async fn activate_node(
        &self,
        request: Request<pb::NodeRequest>,
    ) -> Result<Response<pb::NodeStateResponse>, Status> {
        self.set_gateway_state(request.into_inner().id, NodeState::Active)
            .await
    }

    async fn rebalance(
        &self,
        _request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceResponse>, Status> {
        // The leader's reconciler works it off at the configured rate.
        self.require_leader()?;
        let state = self.node.state.read();
        let active: Vec<NodeId> = state
            .nodes()
            .iter()
            .filter(|(_, r)| r.state == NodeState::Active)
            .map(|(id, _)| *id)
            .collect();
        let owned_before: std::collections::HashMap<u64, u64> = active
            .iter()
            .map(|n| (*n, state.owned_count(*n) as u64))
            .collect();
        // The SAs spread over the nodes that serve: not this one (the leader) unless it is
        // alone or configured to (the planner's rule).
        let me = self.node.id;
        let spare_me = !self.node.config.ownership.leader_serves && active.iter().any(|n| *n != me);
        let servers = active.len() - usize::from(spare_me && active.contains(&me));
        let total: u64 = owned_before.values().sum();
        let share = total / (servers.max(1) as u64);
        let moves_planned = owned_before
            .iter()
            .map(|(node, c)| match spare_me && *node == me {
                true => *c,
                false => c.saturating_sub(share + 1),
            })
            .sum();
        drop(state);
        self.node.rebalance_requested.store(true, Ordering::Relaxed);
        Ok(Response::new(pb::RebalanceResponse {
            owned_before,
            moves_planned,
        }))
    }

    async fn list_slots(
        &self,
        _request: Request<pb::ListSlotsRequest>,
    ) -> Result<Response<pb::ListSlotsResponse>, Status> {
        let state = self.node.state.read();
        Ok(Response::new(pb::ListSlotsResponse {
            owners: state.slots().iter().map(|(_, o)| o.unwrap_or(0)).collect(),
            applied_index: state.applied_index(),
        }))
    }

    async fn list_sas(
        &self,
        request: Request<pb::ListSasRequest>,
    ) -> Result<Response<pb::ListSasResponse>, Status> {
        let request = request.into_inner();
        let page_size = match request.page_size {
            0 => 100,
            n if n > 10_000 => {
                return Err(Status::invalid_argument("page_size is at most 10000"));
            }
            n => n as usize,
        };
        let start = if request.page_token.is_empty() {
            SaId(0)
        } else {
            parse_sa_id(&request.page_token)?
        };
        // One page under the lock, whatever the number of SAs: an owner's SAs come from the
        // owner index, not from a filtered walk over everyone's.
        let state = self.node.state.read();
        let (mut selected, total): (Box<dyn Iterator<Item = &IkeSa>>, u64) = match request.owner {
            None => (Box::new(state.sas_from(start)), state.sa_count() as u64),
            Some(owner) => (
                Box::new(state.sas_owned_by_from(owner, start)),
                state.owned_count(owner) as u64,
            ),
        };
        let sas: Vec<pb::SaInfo> = selected.by_ref().take(page_size).map(sa_info).collect();
        let next_page_token = selected
            .next()
            .map(|sa| sa.id.to_string())
            .unwrap_or_default();
        drop(selected);
        Ok(Response::new(pb::ListSasResponse {
            sas,
            next_page_token,
            total,
            applied_index: state.applied_index(),
            node_id: self.node.id,
        }))
    }

    async fn get_sa(
        &self,
        request: Request<pb::GetSaRequest>,
    ) -> Result<Response<pb::SaInfo>, Status> {
        let id = parse_sa_id(&request.into_inner().id)?;
        let state = self.node.state.read();
        let sa = state
            .sa(id)
            .ok_or_else(|| Status::not_found(format!("no IKE SA {id}")))?;
        Ok(Response::new(sa_info(sa)))
    }

    async fn delete_sa(
        &self,
        request: Request<pb::DeleteSaRequest>,
    ) -> Result<Response<pb::DeleteSaResponse>, Status> {
        let sa = parse_sa_id(&request.into_inner().id)?;
        let (log_index, _) = self.propose(Command::DeleteSa { sa, epoch: None }).await?;
        tracing::info!(%sa, log_index, "SA deleted by an operator");
        Ok(Response::new(pb::DeleteSaResponse { log_index }))
    }

    async fn export_sa(
        &self,
        request: Request<pb::ExportSaRequest>,
    ) -> Result<Response<pb::ExportSaResponse>, Status> {
        let request = request.into_inner();
        let id = parse_sa_id(&request.id)?;
        let key = self.context_sealer()?;
        let (sa, log_index) = if request.remove {
            // Remove and read in one log entry: whatever the owner committed before is in the
            // export, and it can commit nothing after (the SA is gone, its epoch with it). The
            // entry also leaves tombstones, so this context cannot come back here unchanged.
            match self
                .propose(Command::DeleteSa {
                    sa: id,
                    epoch: None,
                })
                .await?
            {
                (log_index, Applied::Removed(sa)) => (*sa, log_index),
                (_, other) => {
                    return Err(Status::internal(format!(
                        "delete answered {other:?} instead of the removed SA"
                    )));
                }
            }
        } else {
            let state = self.node.state.read();
            let sa = state
                .sa(id)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no IKE SA {id}")))?;
            (sa, state.applied_index())
        };
        let origin = self.node.state.read().cluster_id();
        let context = SaContext::new(sa, request.remove, origin, log_index);
        tracing::info!(sa = %id, removed = request.remove, log_index, "SA exported");
        Ok(Response::new(pb::ExportSaResponse {
            context: key.seal_context(&context, rand::random()),
            id: id.to_string(),
            removed: request.remove,
            log_index,
        }))
    }

    async fn import_sa(
        &self,
        request: Request<pb::ImportSaRequest>,
    ) -> Result<Response<pb::ImportSaResponse>, Status> {
        let request = request.into_inner();
        let keys = self.context_keys()?;
        let context = keys.open_context(&request.context).map_err(|e| match e {
            ContextError::Body(_) | ContextError::NotAContext => {
                Status::invalid_argument(e.to_string())
            }
            ContextError::NotAuthentic(_) => Status::permission_denied(e.to_string()),
        })?;
        let origin = context.origin;
        let mut sa = context
            .importable()
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        // Placement is this cluster's own; the epoch is the context's (apply bumps it, and
        // refuses a context not newer than what this cluster last had of the SA).
        sa.slot = slot_for_initiator_spi(sa.spi_i);
        // Owner 0: the slot's owner as the leader applies it, not this node's possibly stale view.
        sa.owner = request.owner.unwrap_or(0);
        let id = sa.id;
        let command = Command::ImportSa {
            sa: Box::new(sa),
            lease: self.node.config.ownership.move_lease,
            now_ms: crate::node::now_ms(),
        };
        let (owner, epoch, log_index) = match self.propose(command).await? {
            (log_index, Applied::Placed { owner, epoch }) => (owner, epoch, log_index),
            (_, other) => {
                return Err(Status::internal(format!(
                    "import answered {other:?} instead of the placement"
                )));
            }
        };
        tracing::info!(sa = %id, owner, %epoch, ?origin, log_index, "SA imported");
        Ok(Response::new(pb::ImportSaResponse {
            id: id.to_string(),
            owner,
            log_index,
        }))
    }
}
