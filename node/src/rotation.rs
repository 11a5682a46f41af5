//! `evpcctl cluster rotate-key` on the leader: a new cluster key becomes the sealing key only
//! once every member holds it durably.
//!
//! ```text
//! leader                                     every other member
//! ──────                                     ──────────────────
//! id = max(highest id in the state, in its own keyring) + 1; 32 random bytes
//! write it to its own keyring file (fsync)
//! cluster.v1 InstallKey(id, key) ──────────► write it to the keyring file (fsync), answer
//!                         ◄────────────────── its fingerprint
//! all answered, same fingerprint?
//!   no  ─► error naming the members that did not; nothing is activated (sealing stays on the
//!          old key; the stray key is dropped once a later key is active)
//!   yes ─► commit ActivateKey(id, fingerprint): new seals use it on every node as it applies
//!          the entry; the resealer ([`crate::resealer`]) moves the old blobs and retires the
//!          old key when none is left.
//! ```
//!
//! The id is above anything the leader has seen, also keys a failed attempt installed, so a
//! retry never hands out other material under an id some member already holds (a member refuses
//! that). A member that is down cannot take the key: the rotation fails until it is back or
//! removed from the cluster.

use std::sync::Arc;
use std::time::Duration;

use evpc_proto::admin::v1 as pb;
use evpc_proto::cluster::v1::InstallKeyRequest;
use evpc_raft_store::{Applied, Command, KeyId, NodeId};
use openraft::rt::WatchReceiver;
use tonic::Status;
use zeroize::Zeroizing;

use crate::node::Node;
use crate::sealing::ClusterKey;

/// How long the leader waits for each member to install the key.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Hands `key` to member `peer` and checks the fingerprint it answers with.
async fn install_on(
    node: &Node,
    peer: NodeId,
    addr: String,
    key: &ClusterKey,
) -> Result<(), String> {
    let mut client = node
        .peers
        .client(peer, &addr)
        .map_err(|s| s.message().to_owned())?;
    let request = InstallKeyRequest {
        from: node.id,
        key_id: key.id().0,
        key: key.secret().to_vec(),
    };
    let reply = match tokio::time::timeout(INSTALL_TIMEOUT, client.install_key(request)).await {
        Err(_) => return Err(format!("no answer within {INSTALL_TIMEOUT:?}")),
        Ok(Err(status)) => {
            if crate::peers::is_transport_error(&status) {
                node.peers.reset(peer);
            }
            return Err(status.message().to_owned());
        }
        Ok(Ok(reply)) => reply.into_inner(),
    };
    if reply.from != peer || reply.key_id != key.id().0 {
        return Err(format!(
            "answered as node {} for key {}",
            reply.from, reply.key_id
        ));
    }
    if reply.fingerprint != key.fingerprint() {
        return Err("holds other material under that key id".into());
    }
    Ok(())
}

/// Rotates the cluster key (this node must lead). See the module docs.
pub async fn rotate_key(node: &Arc<Node>) -> Result<pb::RotateKeyResponse, Status> {
    let Some(keyring) = node.keyring.as_ref() else {
        return Err(Status::failed_precondition(
            "this node has no cluster_key_file: there is no cluster key to rotate",
        ));
    };
    let (previous, highest) = {
        let state = node.state.read();
        (state.keys().active(), state.keys().highest())
    };
    let held = keyring.highest().unwrap_or(KeyId(0));
    let id = highest
        .0
        .max(held.0)
        .checked_add(1)
        .map(KeyId)
        .ok_or_else(|| Status::resource_exhausted("cluster key ids are used up"))?;
    let key = Arc::new(ClusterKey::random(id));
    let fingerprint = key.fingerprint();

    // This node first: it seals with the key the moment the activation applies.
    let worker = node.clone();
    let mine = ClusterKey::from_bytes(id, &Zeroizing::new(*key.secret()));
    tokio::task::spawn_blocking(move || match worker.keyring.as_ref() {
        Some(keyring) => keyring.install(mine),
        None => Ok(()),
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| Status::failed_precondition(format!("installing key {id} here: {e}")))?;

    let members: Vec<(NodeId, String)> = {
        let metrics = node.raft.metrics();
        let m = metrics.borrow_watched();
        m.membership_config
            .membership()
            .nodes()
            .filter(|(peer, _)| **peer != node.id)
            .map(|(peer, member)| (*peer, member.raft_addr.clone()))
            .collect()
    };
    let answers = futures::future::join_all(members.iter().map(|(peer, addr)| {
        let key = key.clone();
        async move { (*peer, install_on(node, *peer, addr.clone(), &key).await) }
    }))
    .await;
    let failed: Vec<String> = answers
        .iter()
        .filter_map(|(peer, r)| r.as_ref().err().map(|e| format!("node {peer}: {e}")))
        .collect();
    if !failed.is_empty() {
        tracing::warn!(key = %id, ?failed, "cluster key rotation stopped: not every member took the key");
        // Not UNAVAILABLE: clients retry that elsewhere, and a retry draws another key.
        return Err(Status::failed_precondition(format!(
            "cluster key {id} did not reach every member, so it was not activated and sealing \
             stays on key {previous} ({}). Bring those members back (or remove them from the \
             cluster) and run rotate-key again",
            failed.join("; ")
        )));
    }
    let mut installed_on: Vec<NodeId> = members.iter().map(|(peer, _)| *peer).collect();
    installed_on.push(node.id);
    installed_on.sort_unstable();

    let proposed = node
        .propose_local(Command::ActivateKey {
            key: id,
            fingerprint,
        })
        .await?;
    match proposed.response {
        Ok(Applied::Done) => {}
        Ok(other) => return Err(Status::internal(format!("activation answered {other:?}"))),
        Err(rejection) => return Err(crate::admin_service::rejection_status(rejection)),
    }
    let blobs_to_reseal = {
        let state = node.state.read();
        state
            .keys()
            .blob_counts()
            .iter()
            .filter(|(k, _)| **k != id)
            .map(|(_, n)| *n)
            .sum()
    };
    tracing::info!(
        key = %id,
        previous = %previous,
        members = ?installed_on,
        log_index = proposed.log_index,
        blobs_to_reseal,
        "cluster key rotated: new blobs are sealed under the new key, old ones are resealed in the background"
    );
    Ok(pb::RotateKeyResponse {
        key_id: id.0,
        previous_key_id: previous.0,
        installed_on,
        log_index: proposed.log_index,
        blobs_to_reseal,
    })
}
