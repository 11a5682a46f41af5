//! The server side of cluster.v1: Raft RPCs from other members and forwarded proposals.

use std::io::Cursor;
use std::sync::Arc;

use evpc_proto::cluster::v1::cluster_server::Cluster;
use evpc_proto::cluster::v1::{
    CheckInRequest, CheckInResponse, InstallKeyRequest, InstallKeyResponse, PingMessage, Proposal,
    ProposalResult, RaftMessage, ReadIndexRequest, ReadIndexResponse, SnapshotChunk,
};
use evpc_raft_store::raft::{Snapshot, SnapshotMeta, Vote};
use evpc_raft_store::{Command, KeyId};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use zeroize::Zeroizing;

use crate::node::Node;
use crate::wire;

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
        // A request that does not decode ends the input; the leader sees the stream close and
        // falls back to a fresh one.
        let requests = request.into_inner().map_while(|message| {
            let message = message.ok()?;
            match wire::decode(&message.payload) {
                Ok(rpc) => Some(rpc),
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
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.vote(rpc).await)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.pre_vote(rpc).await)
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.handle_transfer_leader(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        self.require_in_service()?;
        let mut chunks = request.into_inner();
        let first = chunks
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = wire::decode(&first.header)?;
        let mut data = first.data;
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if !chunk.header.is_empty() {
                return Err(Status::invalid_argument(
                    "snapshot header repeated after the first chunk",
                ));
            }
            data.extend_from_slice(&chunk.data);
        }
        tracing::info!(bytes = data.len(), last_log_id = ?meta.last_log_id, "received snapshot");
        let snapshot = Snapshot {
            meta,
            snapshot: Cursor::new(data),
        };
        reply(&self.node.raft.install_full_snapshot(vote, snapshot).await)
    }

    /// Answers a peer's ping. Being pinged is not contact (only a round trip of this node's own
    /// pings is, see [`crate::pinger`]); the answer lets the peer count the round trip. A node
    /// that is starting or whose Raft core stopped does not answer, so it is failed over.
    async fn ping(&self, request: Request<PingMessage>) -> Result<Response<PingMessage>, Status> {
        self.require_in_service()?;
        let message = request.into_inner();
        if message.from == 0 || message.from == self.node.id {
            return Err(Status::invalid_argument(format!(
                "ping from node {}",
                message.from
            )));
        }
        if !self.is_member(message.from) {
            tracing::warn!(from = message.from, "ping from a node that is not a member");
            return Err(Status::permission_denied(format!(
                "node {} is not a member of this cluster",
                message.from
            )));
        }
        Ok(Response::new(crate::pinger::message(&self.node)))
    }

    async fn read_index(
        &self,
        request: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        self.require_in_service()?;
        let from = request.into_inner().from;
        if !self.is_member(from) {
            return Err(Status::permission_denied(format!(
                "node {from} is not a member of this cluster"
            )));
        }
        let (index, term) = self.node.local_read_index().await?;
        Ok(Response::new(ReadIndexResponse { index, term }))
    }

    /// Answered from the applied state whatever this node's own state: members that restart
    /// together must be able to check each other in.
    async fn check_in(
        &self,
        request: Request<CheckInRequest>,
    ) -> Result<Response<CheckInResponse>, Status> {
        let request = request.into_inner();
        if request.node == 0 {
            return Err(Status::invalid_argument("check-in from node 0"));
        }
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

    /// Installs a new cluster key handed out by the leader: durably in the keyring file first,
    /// so an acknowledged key survives a crash (the leader activates it only once every member
    /// acknowledged it).
    async fn install_key(
        &self,
        request: Request<InstallKeyRequest>,
    ) -> Result<Response<InstallKeyResponse>, Status> {
        self.require_in_service()?;
        let mut request = request.into_inner();
        let secret = Zeroizing::new(std::mem::take(&mut request.key));
        if !self.is_member(request.from) {
            return Err(Status::permission_denied(format!(
                "node {} is not a member of this cluster",
                request.from
            )));
        }
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
        let command: Command = wire::decode(&request.into_inner().command)?;
        // Only the leader commits a forwarded command; forwarding again could loop.
        let proposed = self.node.propose_local(command).await?;
        Ok(Response::new(ProposalResult {
            log_index: proposed.log_index,
            response: wire::encode(&proposed.response)?,
        }))
    }
}
