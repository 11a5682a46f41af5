//! gRPC channels to the other members, replaced when they die.
//!
//! A tonic channel to a peer that was killed and restarted can stay wedged on the dead HTTP/2
//! connection. Every RPC error that is not an answer from the peer drops the cached channel, so
//! the next call dials afresh. HTTP/2 keep-alives find a silently dead connection (a paused or
//! partitioned peer) within about a second.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use evpc_proto::cluster::v1::cluster_client::ClusterClient;
use evpc_raft_store::NodeId;
use tonic::transport::{Channel, Endpoint};

use crate::tls::TlsMaterial;

/// The largest message a node accepts from another (append batches, snapshot chunks).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A peer's address and the client dialing it.
type CachedClient = (String, ClusterClient<Channel>);

/// Cached cluster.v1 clients by peer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Peers {
    inner: Arc<Mutex<HashMap<NodeId, CachedClient>>>,
    connect_timeout: Duration,
    local_ip: Option<std::net::IpAddr>,
    tls: Option<TlsMaterial>,
}

impl Peers {
    /// An empty cache; `connect_timeout` bounds dialing. Connections leave from `local_ip`
    /// when given (this node's own address, so a firewall rule on it isolates the node both
    /// ways).
    /// With `tls`, every peer is dialed over mutual TLS and must show the certificate of the
    /// node it is dialed as; without, in plaintext (`insecure_plaintext`).
    pub fn new(
        connect_timeout: Duration,
        local_ip: Option<std::net::IpAddr>,
        tls: Option<TlsMaterial>,
    ) -> Peers {
        Peers {
            inner: Arc::default(),
            connect_timeout,
            local_ip,
            tls,
        }
    }

    /// A client for `node` at `addr` (`host:port`), reusing a live channel.
    pub fn client(
        &self,
        node: NodeId,
        addr: &str,
    ) -> Result<ClusterClient<Channel>, tonic::Status> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((cached_addr, client)) = map.get(&node)
            && cached_addr == addr
        {
            return Ok(client.clone());
        }
        let channel = endpoint(addr, self.connect_timeout, self.tls.as_ref(), node)?
            .local_address(self.local_ip)
            .connect_lazy();
        let client = ClusterClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        map.insert(node, (addr.to_owned(), client.clone()));
        Ok(client)
    }

    /// Forget the channel to `node` after a transport failure.
    pub fn reset(&self, node: NodeId) {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if map.remove(&node).is_some() {
            tracing::debug!(peer = node, "dropped channel after a transport error");
        }
    }
}

/// An endpoint for node `node` at `addr`, tuned for a LAN cluster: no Nagle delay, fast
/// dead-peer detection. With `tls`, the server must prove it is `node`.
pub fn endpoint(
    addr: &str,
    connect_timeout: Duration,
    tls: Option<&TlsMaterial>,
    node: NodeId,
) -> Result<Endpoint, tonic::Status> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| tonic::Status::invalid_argument(format!("bad peer address {addr}: {e}")))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        // A peer that does not answer a ping within the RPC deadline is gone; scaled with it,
        // so a cluster tuned for a slow network (or an emulated one) does not drop
        // connections that are merely slow.
        .http2_keep_alive_interval((connect_timeout / 2).max(Duration::from_millis(500)))
        .keep_alive_timeout(connect_timeout.max(Duration::from_millis(1000)))
        .keep_alive_while_idle(true);
    match tls {
        None => Ok(endpoint),
        Some(tls) => endpoint
            .tls_config(tls.client_config(&crate::pki::node_name(node)))
            .map_err(|e| tonic::Status::internal(format!("TLS for node {node}: {e}"))),
    }
}

/// Whether an RPC error came from the transport (no answer from the peer's service) rather than
/// from the peer itself; such errors invalidate the channel.
pub fn is_transport_error(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
    )
}
