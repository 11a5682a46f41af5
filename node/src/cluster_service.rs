//! The server side of cluster.v1: Raft RPCs from other members and forwarded proposals.
//!
//! Every call is checked against the certificate of its connection ([`Caller`]): it must be a
//! node's, that node must be a member (or this node knows no membership yet, as while it is
//! being added), and it must be the node the message says sent it — the vote's candidate, the
//! append's or snapshot's leader, the ping's sender. Anything else is refused with
//! PERMISSION_DENIED and logged; nothing reaches Raft.

use std::io::Cursor;
use std::sync::Arc;

use evpc_proto::cluster::v1::cluster_server::Cluster;
use evpc_proto::cluster::v1::{
    CheckInRequest, CheckInResponse, HandoverRequest, HandoverResponse, InstallKeyRequest,
    InstallKeyResponse, PingMessage, Proposal, ProposalResult, RaftMessage, ReadIndexRequest,
    ReadIndexResponse, SnapshotChunk,
};
use evpc_raft_store::raft::{Snapshot, SnapshotMeta, Vote};
use evpc_raft_store::{Command, KeyId, TypeConfig};
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use zeroize::Zeroizing;

use crate::node::Node;
use crate::tls::Caller;
use crate::wire;

/// The node a vote is for: a candidate's own, or the leader that holds it.
fn vote_node(vote: &Vote) -> u64 {
    vote.leader_id().node_id
}

/// cluster.v1 served by one node.
#[derive(Debug, Clone)]
pub struct ClusterService {
    node: Arc<Node>,
}

impl ClusterService {
    /// Serves for `node`.
    pub fn new(node: Arc<Node>) -> Self {
        ClusterService { node }
    }
}

impl ClusterService {
    /// Raft traffic is refused until this node checked in, and after its Raft core stopped.
    fn require_in_service(&self) -> Result<(), Status> {
        if self.node.in_service() {
            Ok(())
        } else if !self.node.raft_running() {
            Err(Status::unavailable(format!(
                "node {}: its Raft core has stopped",
                self.node.id
            )))
        } else {
            Err(Status::unavailable(format!(
                "node {} is starting: it has not checked its data directory in with its peers yet",
                self.node.id
            )))
        }
    }

    /// Whether `node` is a member (voter or learner) in this node's view. A node that has not
    /// learned any membership yet (a cluster being bootstrapped) cannot tell, and says yes.
    fn is_member(&self, node: u64) -> bool {
        let metrics = self.node.raft.metrics();
        let m = openraft::rt::WatchReceiver::borrow_watched(&metrics);
        let membership = m.membership_config.membership();
        membership.nodes().next().is_none() || membership.get_node(&node).is_some()
    }

    /// The member node that sent `request`, which must be `claimed` (what the message says),
    /// or PERMISSION_DENIED, logged.
    fn sender<T>(&self, request: &Request<T>, claimed: u64, call: &str) -> Result<u64, Status> {
        let checked = self.certified(request, claimed, call).and_then(|id| {
            if self.is_member(id) {
                Ok(id)
            } else {
                Err(Status::permission_denied(format!(
                    "{call}: node {id} is not a member of this cluster"
                )))
            }
        });
        checked.inspect_err(|status| self.refused(request, call, status))
    }

    /// The node that sent `request`, which must be `claimed`, member or not, or
    /// PERMISSION_DENIED, logged. For CheckIn (a node being added checks in too) and the
    /// leader's replication (AppendEntries, StreamAppend, InstallSnapshot): there the sender
    /// need not be a member in this node's view, because that view may be older than the
    /// leader: a learner being caught up from a snapshot taken before the leader joined, or a
    /// voter cut off while it was added, knows no membership with the leader in it, and would
    /// refuse the very entries that add it, forever. Raft's own vote check turns away a stale
    /// leader (a lower term). Votes, pings, proposals and the rest keep the membership check
    /// (a removed node must not disrupt elections: Raft dissertation §4.2.3).
    fn any_node<T>(&self, request: &Request<T>, claimed: u64, call: &str) -> Result<u64, Status> {
        self.certified(request, claimed, call)
            .inspect_err(|status| self.refused(request, call, status))
    }

    /// The node that sent `request` if its certificate names `claimed` (what the message
    /// says), member or not. Not logged.
    fn certified<T>(&self, request: &Request<T>, claimed: u64, call: &str) -> Result<u64, Status> {
        let id = self.identify(request, call)?.node(claimed)?;
        if id == claimed {
            Ok(id)
        } else {
            Err(Status::permission_denied(format!(
                "{call}: the certificate is node {id}'s but the message claims node {claimed}"
            )))
        }
    }

    /// The caller of `request`, which must be a node (member or not).
    fn identify<T>(&self, request: &Request<T>, call: &str) -> Result<Caller, Status> {
        let caller = Caller::of(request, self.node.tls.is_some())?;
        if let Caller::Operator { name, .. } = &caller {
            return Err(Status::permission_denied(format!(
                "{call}: {name} has an operator certificate; cluster.v1 is for nodes"
            )));
        }
        Ok(caller)
    }

    /// The member node that sent `request`, whoever the message says sent it.
    fn member<T>(&self, request: &Request<T>, call: &str) -> Result<Caller, Status> {
        let checked = self
            .identify(request, call)
            .and_then(|caller| match caller {
                Caller::Node(id) if !self.is_member(id) => Err(Status::permission_denied(format!(
                    "{call}: node {id} is not a member of this cluster"
                ))),
                caller => Ok(caller),
            });
        checked.inspect_err(|status| self.refused(request, call, status))
    }

    /// Receives the rest of a snapshot into a file in the data directory, so a slow transfer
    /// holds no memory while it arrives: at most `limits.max_snapshot_bytes` in all, and no
    /// more than `stall` between chunks (a large snapshot takes as long as it needs while it
    /// moves). The file goes when this returns.
    async fn receive_snapshot(
        &self,
        first: Vec<u8>,
        mut chunks: Streaming<SnapshotChunk>,
        stall: std::time::Duration,
    ) -> Result<Vec<u8>, Status> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
        let cap = self.node.config.limits.max_snapshot_bytes;
        let internal = |e: std::io::Error| Status::internal(format!("receiving a snapshot: {e}"));
        let spool = tempfile::Builder::new()
            .prefix("incoming-snapshot.")
            .tempfile_in(&self.node.config.data_dir)
            .map_err(internal)?;
        let mut file = tokio::fs::File::from_std(spool.reopen().map_err(internal)?);
        let mut total = 0u64;
        let mut next = Some(first);
        loop {
            let data = match next.take() {
                Some(data) => data,
                None => match tokio::time::timeout(stall, chunks.next()).await {
                    Err(_) => {
                        tracing::warn!(bytes = total, "snapshot transfer stalled; abandoned");
                        return Err(Status::deadline_exceeded(format!(
                            "no snapshot chunk for {} ms after {total} bytes",
                            stall.as_millis()
                        )));
                    }
                    Ok(None) => break,
                    Ok(Some(chunk)) => {
                        let chunk = chunk?;
                        if !chunk.header.is_empty() {
                            return Err(Status::invalid_argument(
                                "snapshot header repeated after the first chunk",
                            ));
                        }
                        chunk.data
                    }
                },
            };
            total += data.len() as u64;
            if total > cap {
                tracing::warn!(
                    cap,
                    "snapshot larger than limits.max_snapshot_bytes; refused"
                );
                return Err(Status::resource_exhausted(format!(
                    "snapshot larger than limits.max_snapshot_bytes ({cap} bytes)"
                )));
            }
            file.write_all(&data).await.map_err(internal)?;
        }
        file.flush().await.map_err(internal)?;
        file.rewind().await.map_err(internal)?;
        let mut data = Vec::with_capacity(total as usize);
        file.read_to_end(&mut data).await.map_err(internal)?;
        drop(spool);
        Ok(data)
    }

    fn refused<T>(&self, request: &Request<T>, call: &str, status: &Status) {
        let peer = request.remote_addr();
        tracing::warn!(call, peer = ?peer, reason = status.message(), "cluster.v1 call refused");
    }
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage {
        payload: wire::encode(value)?,
    }))
}

/// The answers of a pipelined append stream.
type AppendReplies =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<RaftMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    type StreamAppendStream = AppendReplies;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<AppendReplies>, Status> {
        self.require_in_service()?;
        // (not `member`: see `leader`; each request's claimed leader is checked below)
        let caller = self
            .identify(&request, "StreamAppend")
            .inspect_err(|status| self.refused(&request, "StreamAppend", status))?;
        // A request that does not decode, or that claims another leader than the certificate
        // names, ends the input; the leader sees the stream close and falls back to a fresh one.
        let requests = request.into_inner().map_while(move |message| {
            let message = message.ok()?;
            match wire::decode::<AppendEntriesRequest<TypeConfig>>(&message.payload) {
                Ok(rpc) => match caller.node(vote_node(&rpc.vote)) {
                    Ok(id) if id == vote_node(&rpc.vote) => Some(rpc),
                    _ => {
                        tracing::warn!(
                            caller = %caller,
                            claimed = vote_node(&rpc.vote),
                            "append from a leader other than the certificate names; closing the stream"
                        );
                        None
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "undecodable append request; closing the stream");
                    None
                }
            }
        });
        let replies = self.node.raft.stream_append(requests).map(|result| {
            Ok(RaftMessage {
                payload: wire::encode(&result)?,
            })
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let rpc: AppendEntriesRequest<TypeConfig> = wire::decode(&request.get_ref().payload)?;
        self.any_node(&request, vote_node(&rpc.vote), "AppendEntries")?;
        reply(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let rpc: VoteRequest<TypeConfig> = wire::decode(&request.get_ref().payload)?;
        self.sender(&request, vote_node(&rpc.vote), "Vote")?;
        reply(&self.node.raft.vote(rpc).await)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let rpc: VoteRequest<TypeConfig> = wire::decode(&request.get_ref().payload)?;
        self.sender(&request, vote_node(&rpc.vote), "PreVote")?;
        reply(&self.node.raft.pre_vote(rpc).await)
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let rpc: TransferLeaderRequest<TypeConfig> = wire::decode(&request.get_ref().payload)?;
        self.sender(&request, vote_node(rpc.from_leader()), "TransferLeader")?;
        reply(&self.node.raft.handle_transfer_leader(rpc).await)
    }

    async fn install_snapshot(
        &self,
        mut request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let stall = std::time::Duration::from_millis(self.node.config.limits.snapshot_stall_ms);
        let first = match tokio::time::timeout(stall, request.get_mut().next()).await {
            Err(_) => return Err(Status::deadline_exceeded("no snapshot header in time")),
            Ok(None) => return Err(Status::invalid_argument("empty snapshot stream")),
            Ok(Some(chunk)) => chunk?,
        };
        let (vote, meta): (Vote, SnapshotMeta) = wire::decode(&first.header)?;
        // Who sends it is checked before a byte of it is kept.
        self.any_node(&request, vote_node(&vote), "InstallSnapshot")?;
        let data = self
            .receive_snapshot(first.data, request.into_inner(), stall)
            .await?;
        tracing::info!(bytes = data.len(), last_log_id = ?meta.last_log_id, "received snapshot");
        let snapshot = Snapshot {
            meta,
            snapshot: Cursor::new(data),
        };
        reply(&self.node.raft.install_full_snapshot(vote, snapshot).await)
    }

    /// Answers a peer's ping. Being pinged is not contact (only a round trip of this node's own
    /// pings is, see [`crate::ownership::pinger_task`]); the answer lets the peer count the round trip. A node
    /// that is starting or whose Raft core stopped does not answer, so it is failed over.
    async fn ping(&self, request: Request<PingMessage>) -> Result<Response<PingMessage>, Status> {
        self.require_in_service()?;
        let from = request.get_ref().from;
        if from == 0 || from == self.node.id {
            return Err(Status::invalid_argument(format!("ping from node {from}")));
        }
        self.sender(&request, from, "Ping")?;
        Ok(Response::new(crate::ownership::pinger_task::message(
            &self.node,
        )))
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.require_in_service()?;
        self.sender(&request, request.get_ref().from, "ReadIndex")?;
        let (index, term) = self.node.local_read_index().await?;
        Ok(Response::new(ReadIndexResponse { index, term }))
    }

    /// Answered from the applied state whatever this node's own state: members that restart
    /// together must be able to check each other in.
    async fn check_in(
        &self,
        request: Request<CheckInRequest>,
    ) -> Result<Response<CheckInResponse>, Status> {
        if request.get_ref().node == 0 {
            return Err(Status::invalid_argument("check-in from node 0"));
        }
        // A node checks in before anything else, members or not (one being added does too);
        // it learns no more than a node of this CA may know.
        let claimed = request.get_ref().node;
        self.any_node(&request, claimed, "CheckIn")?;
        let request = request.into_inner();
        let state = self.node.state.read();
        Ok(Response::new(CheckInResponse {
            from: self.node.id,
            cluster_id: state
                .cluster_id()
                .map(|c| c.to_string())
                .unwrap_or_default(),
            acknowledged: state.acknowledged(request.node),
            applied_index: state.applied_index(),
        }))
    }

    /// A planned handover from the SA's old owner (see `ownership::handover`). Only members may
    /// ask; what they send can only change which held packets this node delivers or sends, never
    /// who owns what or which sequence numbers anyone may use.
    async fn handover(
        &self,
        request: Request<HandoverRequest>,
    ) -> Result<Response<HandoverResponse>, Status> {
        self.require_in_service()?;
        let from = request.get_ref().from;
        self.sender(&request, from, "Handover")?;
        let request = request.into_inner();
        let (sa, epoch) = (
            evpc_raft_store::SaId(request.sa),
            evpc_raft_store::Epoch(request.epoch),
        );
        let board = &self.node.handovers;
        match request.states {
            None => Ok(Response::new(HandoverResponse {
                ready: board
                    .prepare(sa, epoch, crate::ownership::handover::PREPARE_WAIT)
                    .await,
            })),
            Some(bytes) => {
                let states =
                    crate::ownership::handover::decode_states(&bytes).ok_or_else(|| {
                        Status::invalid_argument("Handover: states that do not decode")
                    })?;
                if !board.complete(crate::ownership::handover::Completed { sa, epoch, states }) {
                    tracing::warn!(%sa, from, "handover queue full: state dropped");
                }
                Ok(Response::new(HandoverResponse { ready: true }))
            }
        }
    }

    /// Installs a new cluster key handed out by the leader: durably in the keyring file first,
    /// so an acknowledged key survives a crash (the leader activates it only once every member
    /// acknowledged it).
    async fn install_key(
        &self,
        request: Request<InstallKeyRequest>,
    ) -> Result<Response<InstallKeyResponse>, Status> {
        self.require_in_service()?;
        // The sender is the node its certificate names, and a member.
        let from = request.get_ref().from;
        self.sender(&request, from, "InstallKey")?;
        let mut request = request.into_inner();
        let secret = Zeroizing::new(std::mem::take(&mut request.key));
        if self.node.leader().map(|(id, _)| id) != Some(request.from) {
            return Err(Status::failed_precondition(format!(
                "node {} is not the leader this node follows; only the leader hands out keys",
                request.from
            )));
        }
        let node = self.node.clone();
        if node.keyring.is_none() {
            return Err(Status::failed_precondition(format!(
                "node {} has no cluster_key_file to keep the key in",
                node.id
            )));
        }
        let id = KeyId(request.key_id);
        let highest = node.state.read().keys().highest();
        if id <= highest {
            return Err(Status::failed_precondition(format!(
                "cluster key id {id} is not new (the cluster has used up to {highest})"
            )));
        }
        let secret: Zeroizing<[u8; 32]> = Zeroizing::new(
            secret[..]
                .try_into()
                .map_err(|_| Status::invalid_argument("a cluster key is 32 bytes"))?,
        );
        let key = crate::sealing::ClusterKey::from_bytes(id, &secret);
        let fingerprint = key.fingerprint();
        let installed = tokio::task::spawn_blocking(move || match node.keyring.as_ref() {
            Some(keyring) => keyring.install(key),
            None => Ok(()),
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        if let Err(e) = installed {
            tracing::error!(key = %id, error = %e, "cannot install the new cluster key");
            return Err(Status::failed_precondition(e.to_string()));
        }
        tracing::info!(key = %id, from = request.from, "new cluster key installed in the keyring file");
        Ok(Response::new(InstallKeyResponse {
            from: self.node.id,
            key_id: id.0,
            fingerprint: fingerprint.to_vec(),
        }))
    }

    async fn propose(
        &self,
        request: Request<Proposal>,
    ) -> Result<Response<ProposalResult>, Status> {
        self.require_in_service()?;
        self.member(&request, "Propose")?;
        let command: Command = wire::decode(&request.into_inner().command)?;
        // Only the leader commits a forwarded command; forwarding again could loop.
        let proposed = self.node.propose_local(command).await?;
        Ok(Response::new(ProposalResult {
            log_index: proposed.log_index,
            response: wire::encode(&proposed.response)?,
        }))
    }
}
