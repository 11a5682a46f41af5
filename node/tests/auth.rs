//! Who gets in: real node processes on mutual TLS, attacked with the wrong certificates, the
//! wrong roles and forged messages. Each attempt must be refused with the right status, be
//! logged, and change nothing in the replicated state.

use std::path::PathBuf;
use std::time::Duration;

use evpc_api::{AdminClient, ClientTls, Security};
use evpc_node::pki::{PkiDir, Role};
use evpc_node::sealing::Keyring;
use evpc_node::tls::TlsMaterial;
use evpc_proto::admin::v1 as pb;
use evpc_proto::cluster::v1::cluster_client::ClusterClient;
use evpc_proto::cluster::v1::{InstallKeyRequest, PingMessage, Proposal, RaftMessage};
use evpc_raft_store::raft::Vote;
use evpc_raft_store::{Command, SaContext, SaId, TypeConfig};
use evpc_testkit::local::{LOCAL_OPERATOR, LocalCluster, ProcessCluster};
use tonic::transport::Channel;

fn exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_evpc-node"))
}

fn security(pki: &PkiDir, name: &str) -> Security {
    let files = pki.client(name);
    Security::Tls(ClientTls::load(&files.ca_file, &files.cert_file, &files.key_file).unwrap())
}

fn admin(cluster: &ProcessCluster, security: Security) -> AdminClient {
    AdminClient::new(
        &cluster.spec.admin_endpoints(),
        Duration::from_secs(3),
        security,
    )
    .unwrap()
}

/// A cluster.v1 client to node `to` presenting `files` (a node certificate of some CA).
fn cluster_client(
    cluster: &ProcessCluster,
    to: u64,
    files: &evpc_node::pki::TlsFiles,
    trust: &PkiDir,
) -> ClusterClient<Channel> {
    let mut files = files.clone();
    // Trust the real cluster's CA, whatever CA issued the certificate shown.
    files.ca_file = trust.ca_cert();
    let tls = TlsMaterial::load(&files).unwrap();
    let addr = cluster.spec.node_config(to).raft_addr.to_string();
    let channel = evpc_node::peers::endpoint(&addr, Duration::from_secs(2), Some(&tls), to)
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    ClusterClient::new(channel)
}

fn code<T: std::fmt::Debug>(result: Result<T, evpc_api::ClientError>) -> Option<tonic::Code> {
    match result {
        Ok(answer) => panic!("expected a refusal, got {answer:?}"),
        Err(e) => e.code(),
    }
}

fn logs(cluster: &ProcessCluster) -> String {
    cluster.ids().map(|id| cluster.log_of(id)).collect()
}

/// What no refused call may change, as every node sees it: the term, the members and their
/// gateway states, every SA with its owner, epoch and message IDs. (Not the state digest:
/// the leader's housekeeping commits acknowledgement marks on its own.)
async fn fingerprint(cluster: &ProcessCluster) -> Vec<String> {
    cluster.converged(Duration::from_secs(10)).await.unwrap();
    let mut seen = Vec::new();
    for id in cluster.alive_ids() {
        let mut node = cluster.admin_of(id).unwrap();
        let status = node.status(false).await.unwrap();
        let members: Vec<_> = status
            .members
            .iter()
            .map(|m| (m.id, m.voter, m.gateway_state.clone()))
            .collect();
        let sas: Vec<_> = node
            .list_sas(pb::ListSasRequest::default())
            .await
            .unwrap()
            .sas
            .into_iter()
            .map(|sa| (sa.id, sa.owner, sa.epoch, sa.next_peer_request))
            .collect();
        seen.push(format!(
            "term {} members {members:?} SAs {sas:?}",
            status.term
        ));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_members_and_operators_get_in() {
    let spec = LocalCluster::new(3, PathBuf::new(), 18_100);
    let cluster = ProcessCluster::launch(spec, exe()).await.unwrap();
    let pki = cluster.spec.pki();
    pki.issue_client("rita", Role::Reader, 30).unwrap();
    pki.issue_client("otto", Role::Operator, 30).unwrap();
    pki.issue_node(9, 30).unwrap();
    let expired_at = time::OffsetDateTime::now_utc() - time::Duration::days(30);
    pki.issue_client_at("old", Role::Admin, expired_at, 1)
        .unwrap();
    // Another cluster's CA under the same name (its certificates' issuer names match ours) and
    // one under another name.
    let elsewhere = tempfile::tempdir().unwrap();
    let twin = PkiDir::new(elsewhere.path().join("twin"));
    twin.ensure_local(&[1, 2, 3], LOCAL_OPERATOR).unwrap();
    let other = PkiDir::new(elsewhere.path().join("other"));
    other.init("elsewhere").unwrap();
    other.issue_client("mallory", Role::Admin, 30).unwrap();

    // One SA, imported by the admin, for the operator to move.
    let key = Keyring::load(&cluster.spec.cluster_key_path())
        .unwrap()
        .get(evpc_raft_store::KeyId(1))
        .unwrap();
    let sa = evpc_raft_store::fixture::ike_sa(SaId(0x7001), 0x7001_0001, 0, 0, 0x7001);
    let context = key.seal_context(&SaContext::new(sa, true, None, 1), rand::random());
    let mut root = cluster.admin().unwrap();
    root.import_sa(context, None).await.unwrap();
    let before = fingerprint(&cluster).await;

    // A reader reads, and may not write.
    let mut reader = admin(&cluster, security(&pki, "rita"));
    let listed = reader
        .list_sas(pb::ListSasRequest::default())
        .await
        .unwrap();
    assert_eq!(listed.sas.len(), 1);
    assert_eq!(
        code(reader.delete_sa("0000000000007001").await),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        code(reader.transfer_sa("0000000000007001", 2).await),
        Some(tonic::Code::PermissionDenied)
    );
    // An operator may not change membership or leadership.
    let mut operator = admin(&cluster, security(&pki, "otto"));
    let newcomer = pb::NodeAddress {
        id: 9,
        raft_addr: "127.0.0.1:18109".into(),
        admin_addr: "127.0.0.1:18209".into(),
    };
    assert_eq!(
        code(operator.add_member(newcomer.clone(), false).await),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        code(operator.transfer_leader(2).await),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        code(reader.add_member(newcomer, false).await),
        Some(tonic::Code::PermissionDenied)
    );

    // Certificates the handshake refuses: another CA's, an expired one, none at all; and a
    // node's certificate, which has no role on admin.v1.
    // (The foreign client trusts our CA, so it is the server that refuses it.)
    let mallory = other.client("mallory");
    let foreign = Security::Tls(
        ClientTls::load(&pki.ca_cert(), &mallory.cert_file, &mallory.key_file).unwrap(),
    );
    let foreign = admin(&cluster, foreign).status(false).await;
    assert!(
        foreign.is_err(),
        "another CA's operator got in: {foreign:?}"
    );
    let expired = admin(&cluster, security(&pki, "old")).status(false).await;
    assert!(
        expired.is_err(),
        "an expired certificate got in: {expired:?}"
    );
    let plaintext = admin(&cluster, Security::Plaintext).status(false).await;
    assert!(plaintext.is_err(), "plaintext got in: {plaintext:?}");
    let ca = std::fs::read(pki.ca_cert()).unwrap();
    let anonymous = tonic::transport::Endpoint::from_shared(format!(
        "https://{}",
        cluster.spec.node_config(1).admin_addr
    ))
    .unwrap()
    .tls_config(
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca))
            .domain_name(evpc_api::tls::NODE_SERVER_NAME),
    )
    .unwrap()
    .timeout(Duration::from_secs(3))
    .connect_lazy();
    let anonymous = evpc_proto::admin::v1::admin_client::AdminClient::new(anonymous)
        .status(pb::StatusRequest::default())
        .await;
    assert!(anonymous.is_err(), "no certificate got in: {anonymous:?}");

    // cluster.v1: a node of this CA that is not a member; a member forging another's ping, or
    // a vote for another candidate; another CA's node; an operator.
    let stranger = cluster_client(&cluster, 1, &pki.node(9), &pki);
    let ping = |from| PingMessage {
        from,
        ..Default::default()
    };
    let status = stranger.clone().ping(ping(9)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let noop = evpc_node::wire::encode(&Command::Batch(Vec::new())).unwrap();
    let status = stranger
        .clone()
        .propose(Proposal {
            command: noop.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let member3 = cluster_client(&cluster, 1, &pki.node(3), &pki);
    let status = member3.clone().ping(ping(2)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let forged_vote = openraft::raft::VoteRequest::<TypeConfig>::new(Vote::new(1_000, 2), None);
    let status = member3
        .clone()
        .vote(RaftMessage {
            payload: evpc_node::wire::encode(&forged_vote).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let forged_append = openraft::raft::AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1_000, 2),
        prev_log_id: None,
        entries: Vec::new(),
        leader_commit: None,
    };
    let status = member3
        .clone()
        .append_entries(RaftMessage {
            payload: evpc_node::wire::encode(&forged_append).unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    // Cluster keys: a member handing out a key in the leader's name, one in its own name
    // without leading, and an operator rotating the key (the admin role's).
    let leader = cluster.leader(Duration::from_secs(5)).await.unwrap();
    let install = |from| InstallKeyRequest {
        from,
        key_id: 99,
        key: vec![7; 32],
    };
    let claimed = if leader == 3 { 2 } else { leader };
    let status = member3
        .clone()
        .install_key(install(claimed))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let status = cluster_client(&cluster, 1, &pki.node(follower), &pki)
        .install_key(install(follower))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("only the leader"), "{status:?}");
    assert_eq!(
        operator.rotate_key().await.unwrap_err().code(),
        Some(tonic::Code::PermissionDenied)
    );
    assert_eq!(
        Keyring::load(&cluster.spec.cluster_key_path())
            .unwrap()
            .ids(),
        [evpc_raft_store::KeyId(1)],
        "no key was installed"
    );
    let impostor = cluster_client(&cluster, 1, &twin.node(2), &pki);
    assert!(impostor.clone().ping(ping(2)).await.is_err());
    let operator_on_cluster = cluster_client(&cluster, 1, &pki.client("otto"), &pki);
    let status = operator_on_cluster
        .clone()
        .propose(Proposal { command: noop })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Nothing changed: the same state on every node, the same term.
    assert_eq!(fingerprint(&cluster).await, before);

    // And what the right roles may do still works: an operator moves the SA.
    let owner = root.get_sa("0000000000007001").await.unwrap().owner;
    // (not to the leader: it takes no SAs)
    let leader = root.follow_leader().await.unwrap().leader_id.unwrap();
    let to = (1..=3).find(|n| *n != owner && *n != leader).unwrap();
    operator.transfer_sa("0000000000007001", to).await.unwrap();
    assert_eq!(root.get_sa("0000000000007001").await.unwrap().owner, to);

    // Every refusal was logged with why; every write is in the audit log with who.
    let log = logs(&cluster);
    for needle in [
        "DeleteSa needs the operator role; rita (reader) may not",
        "AddMember needs the admin role; otto (operator) may not",
        "RotateKey needs the admin role; otto (operator) may not",
        "node 9 is not a member of this cluster",
        "the certificate is node 3's but the message claims node 2",
        "otto has an operator certificate; cluster.v1 is for nodes",
        "TLS connection refused",
        "certificate expired",
        "peer sent no certificates",
        "UnknownIssuer",
        "BadSignature",
        "who=otto (operator) call=\"TransferSa\"",
        "who=local-admin (admin) call=\"ImportSa\"",
    ] {
        assert!(
            log.contains(needle),
            "no {needle:?} in the node logs:\n{log}"
        );
    }
    let mut cluster = cluster;
    cluster.stop().await;
}
