//! # evpc-api — talking to an evpc cluster as an operator
//!
//! [`AdminClient`] wraps admin.v1 for a list of node endpoints: it tries each in turn when one
//! is down and follows the leader when a node answers that only the leader can do something.
//! `evpcctl` (this crate's binary) and `evpc-chaos` are built on it.
//!
//! ```text
//!  AdminClient ──admin.v1──► endpoint k ──(FAILED_PRECONDITION + evpc-leader-admin)──┐
//!       ▲                                                                            │
//!       └───────────────────────── retry on the leader ◄─────────────────────────────┘
//! ```

pub mod cli;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use evpc_proto::admin::v1 as pb;
use evpc_proto::admin::v1::admin_client::AdminClient as Grpc;
use tonic::transport::{Channel, Endpoint};

pub use tls::{ClientTls, Security};

/// The metadata key in which a node names the leader's admin address.
pub const LEADER_ADMIN_HINT: &str = "evpc-leader-admin";
/// The metadata key that marks a write refused because the node knows no leader (an election
/// is under way): nothing was proposed, so [`AdminClient::call`] tries again, for up to
/// [`ELECTION_WAIT`].
pub const NO_LEADER: &str = "evpc-no-leader";
/// How long [`AdminClient::call`] waits out an election: several election timeouts.
pub const ELECTION_WAIT: Duration = Duration::from_secs(10);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No endpoints were given.
    #[error("no endpoints given")]
    NoEndpoints,
    /// An endpoint is not a valid URL.
    #[error("bad endpoint {endpoint:?}: {reason}")]
    BadEndpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// No endpoint answered.
    #[error("no endpoint answered: {}", .0.iter().map(|(e, m)| format!("{e}: {m}")).collect::<Vec<_>>().join("; "))]
    Unreachable(Vec<(String, String)>),
    /// A node answered with an error.
    #[error("{} ({}): {}", .endpoint, .status.code(), .status.message())]
    Status {
        /// The node that answered.
        endpoint: String,
        /// Its answer.
        status: tonic::Status,
    },
}

impl ClientError {
    /// The gRPC status code, if a node answered.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Status { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// Normalizes `host:port` or a URL to an `https://` URL (`http://` for plaintext).
pub fn normalize_endpoint(endpoint: &str, security: &Security) -> String {
    let endpoint = endpoint.trim();
    let hostport = endpoint
        .split_once("://")
        .map_or(endpoint, |(_, hostport)| hostport);
    match security {
        Security::Tls(_) => format!("https://{hostport}"),
        Security::Plaintext => format!("http://{hostport}"),
    }
}

/// An admin.v1 client over several endpoints that follows the leader.
#[derive(Debug, Clone)]
pub struct AdminClient {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    current: usize,
    timeout: Duration,
    security: Security,
}

fn connect(endpoint: &str, timeout: Duration, security: &Security) -> Result<Channel, ClientError> {
    let bad = |reason: String| ClientError::BadEndpoint {
        endpoint: endpoint.to_owned(),
        reason,
    };
    let mut e = Endpoint::from_shared(endpoint.to_owned())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(timeout.min(Duration::from_secs(2)))
        .timeout(timeout)
        .tcp_nodelay(true);
    if let Security::Tls(tls) = security {
        e = e.tls_config(tls.config()).map_err(|e| bad(e.to_string()))?;
    }
    Ok(e.connect_lazy())
}

/// Transport-level failures: the node did not answer, so another endpoint may.
fn is_unreachable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    ) && status.metadata().get(LEADER_ADMIN_HINT).is_none()
}

impl AdminClient {
    /// A client for `endpoints` (`host:port` or URLs); each request times out after `timeout`.
    pub fn new<S: AsRef<str>>(
        endpoints: &[S],
        timeout: Duration,
        security: Security,
    ) -> Result<AdminClient, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| normalize_endpoint(e.as_ref(), &security))
            .collect();
        let channels = endpoints
            .iter()
            .map(|e| connect(e, timeout, &security))
            .collect::<Result<_, _>>()?;
        Ok(AdminClient {
            endpoints,
            channels,
            current: 0,
            timeout,
            security,
        })
    }

    /// The endpoint requests go to first.
    pub fn current_endpoint(&self) -> &str {
        &self.endpoints[self.current]
    }

    fn switch_to(&mut self, endpoint: &str) -> Result<(), ClientError> {
        let endpoint = normalize_endpoint(endpoint, &self.security);
        match self.endpoints.iter().position(|e| *e == endpoint) {
            Some(i) => self.current = i,
            None => {
                self.channels
                    .push(connect(&endpoint, self.timeout, &self.security)?);
                self.endpoints.push(endpoint);
                self.current = self.endpoints.len() - 1;
            }
        }
        Ok(())
    }

    /// Sends a request, trying each endpoint and following leader hints.
    pub async fn call<T, F, Fut>(&mut self, mut request: F) -> Result<T, ClientError>
    where
        F: FnMut(Grpc<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut failures = Vec::new();
        let mut hops = 0;
        let election_deadline = tokio::time::Instant::now() + ELECTION_WAIT;
        let mut no_leader = false;
        // Each endpoint once, plus a few leader hops (a leader can move while we follow it);
        // all over again while no node knows a leader, until an election should be over.
        loop {
            if failures.len() >= self.endpoints.len() || hops >= 5 {
                if !no_leader || tokio::time::Instant::now() >= election_deadline {
                    break;
                }
                (failures, hops, no_leader) = (Vec::new(), 0, false);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let endpoint = self.endpoints[self.current].clone();
            let client =
                Grpc::new(self.channels[self.current].clone()).max_decoding_message_size(64 << 20);
            match request(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => {
                    if let Some(leader) = status
                        .metadata()
                        .get(LEADER_ADMIN_HINT)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                        && normalize_endpoint(&leader, &self.security) != endpoint
                    {
                        hops += 1;
                        self.switch_to(&leader)?;
                        continue;
                    }
                    if is_unreachable(&status) {
                        no_leader |= status.metadata().get(NO_LEADER).is_some();
                        failures.push((endpoint, status.message().to_owned()));
                        self.current = (self.current + 1) % self.endpoints.len();
                        continue;
                    }
                    return Err(ClientError::Status { endpoint, status });
                }
            }
        }
        Err(ClientError::Unreachable(failures))
    }

    /// Points the client at the leader, if the current node knows one.
    pub async fn follow_leader(&mut self) -> Result<pb::StatusResponse, ClientError> {
        let status = self.status(false).await?;
        if !status.leader_admin_addr.is_empty()
            && normalize_endpoint(&status.leader_admin_addr, &self.security)
                != self.endpoints[self.current]
        {
            self.switch_to(&status.leader_admin_addr.clone())?;
            return self.status(false).await;
        }
        Ok(status)
    }

    /// admin.v1 Status from the current endpoint (or the next that answers).
    pub async fn status(
        &mut self,
        include_digest: bool,
    ) -> Result<pb::StatusResponse, ClientError> {
        self.call(|mut c| async move { c.status(pb::StatusRequest { include_digest }).await })
            .await
    }

    /// admin.v1 Initialize.
    pub async fn initialize(&mut self, members: Vec<pb::NodeAddress>) -> Result<(), ClientError> {
        self.call(|mut c| {
            let members = members.clone();
            async move { c.initialize(pb::InitializeRequest { members }).await }
        })
        .await
        .map(|_| ())
    }

    /// admin.v1 AddMember.
    pub async fn add_member(
        &mut self,
        node: pb::NodeAddress,
        learner_only: bool,
    ) -> Result<pb::MembershipResponse, ClientError> {
        self.call(|mut c| {
            let node = node.clone();
            async move {
                c.add_member(pb::AddMemberRequest {
                    node: Some(node),
                    learner_only,
                })
                .await
            }
        })
        .await
    }

    /// admin.v1 RemoveMember.
    pub async fn remove_member(&mut self, id: u64) -> Result<pb::MembershipResponse, ClientError> {
        self.call(|mut c| async move { c.remove_member(pb::RemoveMemberRequest { id }).await })
            .await
    }

    /// admin.v1 TransferLeader.
    pub async fn transfer_leader(
        &mut self,
        to: u64,
    ) -> Result<pb::TransferLeaderResponse, ClientError> {
        self.call(|mut c| async move { c.transfer_leader(pb::TransferLeaderRequest { to }).await })
            .await
    }

    /// admin.v1 TransferSa.
    pub async fn transfer_sa(
        &mut self,
        id: &str,
        to: u64,
    ) -> Result<pb::TransferSaResponse, ClientError> {
        self.call(|mut c| {
            let id = id.to_owned();
            async move { c.transfer_sa(pb::TransferSaRequest { id, to }).await }
        })
        .await
    }

    /// admin.v1 DrainNode.
    pub async fn drain_node(&mut self, id: u64) -> Result<pb::NodeStateResponse, ClientError> {
        self.call(|mut c| async move { c.drain_node(pb::NodeRequest { id }).await })
            .await
    }

    /// admin.v1 ActivateNode.
    pub async fn activate_node(&mut self, id: u64) -> Result<pb::NodeStateResponse, ClientError> {
        self.call(|mut c| async move { c.activate_node(pb::NodeRequest { id }).await })
            .await
    }

    /// admin.v1 Rebalance.
    pub async fn rebalance(&mut self) -> Result<pb::RebalanceResponse, ClientError> {
        self.call(|mut c| async move { c.rebalance(pb::RebalanceRequest {}).await })
            .await
    }

    /// admin.v1 RotateKey (on the leader): a new cluster key, installed on every member, then
    /// activated; old blobs are resealed in the background.
    pub async fn rotate_key(&mut self) -> Result<pb::RotateKeyResponse, ClientError> {
        self.call(|mut c| async move { c.rotate_key(pb::RotateKeyRequest {}).await })
            .await
    }

    /// admin.v1 Snapshot: the node at the current endpoint builds a snapshot now; answers once
    /// it is on disk.
    pub async fn snapshot(&mut self) -> Result<pb::SnapshotResponse, ClientError> {
        self.call(|mut c| async move { c.snapshot(pb::SnapshotRequest {}).await })
            .await
    }

    /// admin.v1 ListSlots: `owners[slot]`, 0 for none.
    pub async fn list_slots(&mut self) -> Result<pb::ListSlotsResponse, ClientError> {
        self.call(|mut c| async move { c.list_slots(pb::ListSlotsRequest {}).await })
            .await
    }

    /// admin.v1 ListSas (one page).
    pub async fn list_sas(
        &mut self,
        request: pb::ListSasRequest,
    ) -> Result<pb::ListSasResponse, ClientError> {
        self.call(|mut c| {
            let request = request.clone();
            async move { c.list_sas(request).await }
        })
        .await
    }

    /// Every SA, following pages.
    pub async fn all_sas(&mut self, owner: Option<u64>) -> Result<Vec<pb::SaInfo>, ClientError> {
        let mut sas = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .list_sas(pb::ListSasRequest {
                    owner,
                    page_token,
                    page_size: 5_000,
                })
                .await?;
            sas.extend(page.sas);
            if page.next_page_token.is_empty() {
                return Ok(sas);
            }
            page_token = page.next_page_token;
        }
    }

    /// admin.v1 GetSa.
    pub async fn get_sa(&mut self, id: &str) -> Result<pb::SaInfo, ClientError> {
        self.call(|mut c| {
            let id = id.to_owned();
            async move { c.get_sa(pb::GetSaRequest { id }).await }
        })
        .await
    }

    /// admin.v1 DeleteSa.
    pub async fn delete_sa(&mut self, id: &str) -> Result<pb::DeleteSaResponse, ClientError> {
        self.call(|mut c| {
            let id = id.to_owned();
            async move { c.delete_sa(pb::DeleteSaRequest { id }).await }
        })
        .await
    }

    /// admin.v1 ExportSa.
    pub async fn export_sa(
        &mut self,
        id: &str,
        remove: bool,
    ) -> Result<pb::ExportSaResponse, ClientError> {
        self.call(|mut c| {
            let id = id.to_owned();
            async move { c.export_sa(pb::ExportSaRequest { id, remove }).await }
        })
        .await
    }

    /// admin.v1 ImportSa.
    pub async fn import_sa(
        &mut self,
        context: Vec<u8>,
        owner: Option<u64>,
    ) -> Result<pb::ImportSaResponse, ClientError> {
        self.call(|mut c| {
            let context = context.clone();
            async move { c.import_sa(pb::ImportSaRequest { context, owner }).await }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        let p = Security::Plaintext;
        assert_eq!(
            normalize_endpoint("127.0.0.1:7201", &p),
            "http://127.0.0.1:7201"
        );
        assert_eq!(normalize_endpoint(" http://a:1 ", &p), "http://a:1");
        assert_eq!(normalize_endpoint("https://a:1", &p), "http://a:1");
    }

    #[tokio::test]
    async fn an_empty_endpoint_list_is_refused() {
        let none: [&str; 0] = [];
        assert!(matches!(
            AdminClient::new(&none, Duration::from_secs(1), Security::Plaintext),
            Err(ClientError::NoEndpoints)
        ));
    }

    #[tokio::test]
    async fn no_node_answering_names_every_endpoint_tried() {
        // Ports 1 and 2 on loopback refuse connections.
        let mut client = AdminClient::new(
            &["127.0.0.1:1", "127.0.0.1:2"],
            Duration::from_millis(500),
            Security::Plaintext,
        )
        .unwrap();
        match client.status(false).await {
            Err(ClientError::Unreachable(tried)) => {
                assert_eq!(tried.len(), 2);
                assert!(tried[0].0.ends_with(":1") && tried[1].0.ends_with(":2"));
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }
}
