//! openraft's network over cluster.v1: the client side of node-to-node Raft.

use std::future::Future;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use evpc_proto::cluster::v1::{RaftMessage, SnapshotChunk};
use evpc_raft_store::raft::{Snapshot, Vote};
use evpc_raft_store::{Member, NodeId, TypeConfig};
use futures::StreamExt;
use openraft::base::{BoxFuture, BoxStream};
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory};
use openraft::raft::StreamAppendResult;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{AnyError, RaftNetworkV2};

use crate::peers::{Peers, is_transport_error};
use crate::wire;

/// Bytes per snapshot chunk on the wire.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Creates a [`PeerNetwork`] per replication target.
#[derive(Clone, Debug)]
pub struct NetworkFactory {
    peers: Peers,
    joined: Arc<AtomicBool>,
    snapshot_stall: Duration,
}

impl NetworkFactory {
    /// A factory sharing `peers`' channels. Nothing is sent until `joined` turns true: a node
    /// that has not checked its data directory in with its peers must not vote or replicate.
    /// A snapshot transfer that moves no chunk for `snapshot_stall` is abandoned.
    pub fn new(peers: Peers, joined: Arc<AtomicBool>, snapshot_stall: Duration) -> Self {
        NetworkFactory {
            peers,
            joined,
            snapshot_stall,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> PeerNetwork {
        PeerNetwork {
            peers: self.peers.clone(),
            joined: self.joined.clone(),
            snapshot_stall: self.snapshot_stall,
            target,
            addr: node.raft_addr.clone(),
        }
    }
}

/// The connection to one peer, as openraft's replication stream for it uses it.
#[derive(Debug)]
pub struct PeerNetwork {
    peers: Peers,
    joined: Arc<AtomicBool>,
    snapshot_stall: Duration,
    target: NodeId,
    addr: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct WireError(String);

impl WireError {
    fn into_status(self) -> tonic::Status {
        tonic::Status::deadline_exceeded(self.0)
    }
}

impl PeerNetwork {
    /// The client to the target, once this node may take part in Raft.
    fn client(
        &self,
    ) -> Result<
        evpc_proto::cluster::v1::cluster_client::ClusterClient<tonic::transport::Channel>,
        tonic::Status,
    > {
        if !self.joined.load(Ordering::Acquire) {
            return Err(tonic::Status::unavailable(
                "this node has not checked its data directory in with its peers yet",
            ));
        }
        self.peers.client(self.target, &self.addr)
    }

    /// Sends one unary Raft RPC and decodes the peer's `Result<Resp, E>`.
    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        request: &Req,
        option: &RPCOption,
        send: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: serde::de::DeserializeOwned + std::fmt::Display,
        F: FnOnce(
            evpc_proto::cluster::v1::cluster_client::ClusterClient<tonic::transport::Channel>,
            RaftMessage,
        ) -> Fut,
        Fut: Future<Output = Result<tonic::Response<RaftMessage>, tonic::Status>>,
    {
        let payload = wire::encode(request).map_err(|e| network(&e))?;
        let client = self.client().map_err(|e| unreachable(&e))?;
        let deadline = option.hard_ttl().max(Duration::from_millis(50));
        let reply =
            match tokio::time::timeout(deadline, send(client, RaftMessage { payload })).await {
                // Slow is not broken: the channel stays. Dropping it here would cut a TLS
                // handshake that takes longer than a heartbeat (a loaded or emulated machine)
                // and start the next one from scratch, forever; a dead connection is found by
                // the HTTP/2 keepalive and reported as a transport error instead.
                Err(_) => {
                    return Err(unreachable(&WireError(format!(
                        "no answer from node {} within {deadline:?}",
                        self.target
                    ))));
                }
                Ok(Err(status)) => {
                    if is_transport_error(&status) {
                        self.peers.reset(self.target);
                    }
                    return Err(unreachable(&status));
                }
                Ok(Ok(reply)) => reply.into_inner(),
            };
        let result: Result<Resp, E> = wire::decode(&reply.payload).map_err(|e| network(&e))?;
        // The peer's Raft answered with an error (it is shutting down): treat it as unreachable
        // so replication backs off instead of spinning.
        result.map_err(|e| unreachable(&WireError(format!("node {}: {e}", self.target))))
    }
}

fn unreachable(e: &(impl std::error::Error + 'static)) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::new(e))
}

fn network(e: &(impl std::error::Error + 'static)) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(e))
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = Cursor<Vec<u8>>;

    /// Pipelined replication over one bidirectional gRPC stream: openraft keeps feeding batches
    /// while the follower's acknowledgements come back in order, so a batch does not wait for
    /// the previous one's round trip and flush.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + openraft::OptionalSend
            + Unpin
            + 'static,
    {
        Box::pin(async move {
            let target = self.target;
            let mut client = self.client().map_err(|e| unreachable(&e))?;
            let requests = input.filter_map(|rpc| {
                std::future::ready(match wire::encode(&rpc) {
                    Ok(payload) => Some(RaftMessage { payload }),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot encode an append request");
                        None
                    }
                })
            });
            let deadline = option.hard_ttl().max(Duration::from_millis(50));
            let opened = match tokio::time::timeout(deadline, client.stream_append(requests)).await
            {
                // slow, not broken: keep the channel (see `call`)
                Err(_) => {
                    return Err(unreachable(
                        &WireError(format!("node {target}: no answer within {deadline:?}"))
                            .into_status(),
                    ));
                }
                Ok(result) => result,
            };
            let replies = match opened {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    if is_transport_error(&status) {
                        self.peers.reset(target);
                    }
                    return Err(unreachable(&status));
                }
            };
            let peers = self.peers.clone();
            let results = replies.map(move |reply| {
                let reply = reply.map_err(|status| {
                    if is_transport_error(&status) {
                        peers.reset(target);
                    }
                    unreachable(&status)
                })?;
                let result: Result<
                    StreamAppendResult<TypeConfig>,
                    openraft::error::Fatal<TypeConfig>,
                > = wire::decode(&reply.payload).map_err(|e| network(&e))?;
                result.map_err(|e| unreachable(&WireError(format!("node {target}: {e}"))))
            });
            Ok(Box::pin(results) as BoxStream<'s, _>)
        })
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call::<_, _, openraft::error::RaftError<TypeConfig>, _, _>(
            &rpc,
            &option,
            |mut c, m| async move { c.append_entries(m).await },
        )
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call::<_, _, openraft::error::RaftError<TypeConfig>, _, _>(
            &rpc,
            &option,
            |mut c, m| async move { c.vote(m).await },
        )
        .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call::<_, _, openraft::error::RaftError<TypeConfig>, _, _>(
            &rpc,
            &option,
            |mut c, m| async move { c.pre_vote(m).await },
        )
        .await
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call::<_, _, openraft::error::Fatal<TypeConfig>, _, _>(
            &req,
            &option,
            |mut c, m| async move { c.transfer_leader(m).await },
        )
        .await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let header = wire::encode(&(&vote, &snapshot.meta))
            .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        let data = snapshot.snapshot.into_inner();
        let total = data.len();
        // Chunks are cut as the transport pulls them (no second copy of the snapshot), and
        // each pull is progress: the transfer may take as long as it needs while it moves.
        let started = tokio::time::Instant::now();
        let progress = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let pulled = progress.clone();
        let finished = Arc::new(AtomicBool::new(false));
        let sent_all = finished.clone();
        let chunks = futures::stream::unfold((0usize, Some(header)), move |(at, header)| {
            let pulled = pulled.clone();
            let sent_all = sent_all.clone();
            let end = (at + SNAPSHOT_CHUNK_BYTES).min(total);
            let chunk = (header.is_some() || at < total).then(|| SnapshotChunk {
                header: header.unwrap_or_default(),
                data: data[at..end].to_vec(),
            });
            pulled.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            if chunk.is_none() {
                sent_all.store(true, Ordering::Relaxed);
            }
            async move { chunk.map(|chunk| (chunk, (end, None))) }
        });

        let mut client = self
            .client()
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))?;
        let send = client.install_snapshot(chunks);
        tokio::pin!(send);
        tokio::pin!(cancel);
        let stall = self.snapshot_stall;
        let reply = loop {
            tokio::select! {
                closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                reply = &mut send => break Ok(reply),
                _ = tokio::time::sleep(stall / 4) => {
                    let last = Duration::from_millis(progress.load(Ordering::Relaxed));
                    // The receiver installs the snapshot after the last chunk: allow it more.
                    let allowed = if finished.load(Ordering::Relaxed) { stall * 3 } else { stall };
                    if started.elapsed().saturating_sub(last) > allowed {
                        break Err(());
                    }
                }
            }
        };
        let reply = match reply {
            Err(_) => {
                self.peers.reset(self.target);
                return Err(StreamingError::Unreachable(Unreachable::new(&WireError(
                    format!("snapshot transfer to node {} stalled", self.target),
                ))));
            }
            Ok(Err(status)) => {
                if is_transport_error(&status) {
                    self.peers.reset(self.target);
                }
                return Err(StreamingError::Unreachable(Unreachable::new(&status)));
            }
            Ok(Ok(reply)) => reply.into_inner(),
        };
        let result: Result<SnapshotResponse<TypeConfig>, openraft::error::Fatal<TypeConfig>> =
            wire::decode(&reply.payload)
                .map_err(|e| StreamingError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| {
            StreamingError::Unreachable(Unreachable::new(&AnyError::error(format!(
                "node {}: {e}",
                self.target
            ))))
        })
    }
}
