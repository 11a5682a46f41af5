//! The server side of cluster.v1: Raft RPCs from other members and forwarded proposals.

use std::io::Cursor;
use std::sync::Arc;

use evpc_proto::cluster::v1::cluster_server::Cluster;
use evpc_proto::cluster::v1::{PingMessage, Proposal, ProposalResult, RaftMessage, SnapshotChunk};
use evpc_raft_store::Command;
use evpc_raft_store::raft::{Snapshot, SnapshotMeta, Vote};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

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
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.vote(rpc).await)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.pre_vote(rpc).await)
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc = wire::decode(&request.into_inner().payload)?;
        reply(&self.node.raft.handle_transfer_leader(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
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

    async fn ping(&self, request: Request<PingMessage>) -> Result<Response<PingMessage>, Status> {
        let message = request.into_inner();
        if message.from == 0 {
            return Err(Status::invalid_argument("ping from node 0"));
        }
        crate::pinger::heard(&self.node, &message);
        Ok(Response::new(crate::pinger::message(&self.node)))
    }

    async fn propose(
        &self,
        request: Request<Proposal>,
    ) -> Result<Response<ProposalResult>, Status> {
        let command: Command = wire::decode(&request.into_inner().command)?;
        // Only the leader commits a forwarded command; forwarding again could loop.
        let proposed = self.node.propose_local(command).await?;
        Ok(Response::new(ProposalResult {
            log_index: proposed.log_index,
            response: wire::encode(&proposed.response)?,
        }))
    }
}
