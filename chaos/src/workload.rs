//! What every chaos run needs: proposing commands to the leader, and creating SAs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use evpc_proto::cluster::v1::Proposal;
use evpc_proto::cluster::v1::cluster_client::ClusterClient;
use evpc_raft_store::{Command, Response, SaId, slot_for_initiator_spi};
use tonic::transport::Channel;

use crate::cluster::ProcessCluster;

/// Proposes a command through cluster.v1 `Propose` on the node `client` talks to (which must
/// be the leader: it does not forward).
pub async fn propose(
    client: &mut ClusterClient<Channel>,
    command: &Command,
) -> Result<Response, tonic::Status> {
    let command =
        postcard::to_stdvec(command).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let reply = client.propose(Proposal { command }).await?.into_inner();
    postcard::from_bytes(&reply.response).map_err(|e| tonic::Status::internal(e.to_string()))
}

/// Creates `count` SAs (ids 1..=count, one child each with inbound SPI = id) with
/// `concurrency` parallel proposals, each on the node owning its slot, with a first lease of
/// `lease` sequence numbers. Returns (SA id, child SPI) pairs.
pub async fn create_sas(
    cluster: &ProcessCluster,
    count: u64,
    concurrency: usize,
    lease: u64,
) -> anyhow::Result<Vec<(SaId, u32)>> {
    let leader = cluster.leader(Duration::from_secs(10)).await?;
    let owners = cluster.admin_of(leader)?.list_slots().await?.owners;
    let client = cluster.cluster_client(leader)?;
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (next, owners, mut client) = (next.clone(), owners.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n > count {
                    return Ok::<_, anyhow::Error>(made);
                }
                let spi_i = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let slot = slot_for_initiator_spi(spi_i);
                let owner = owners[usize::from(slot)];
                anyhow::ensure!(owner != 0, "slot {slot} has no owner");
                let child = n as u32 + 0x1000;
                // No key material: the probe data plane needs none, and placeholder keys would
                // not open under the cluster key.
                let mut sa = evpc_raft_store::fixture::without_keys(
                    evpc_raft_store::fixture::ike_sa(SaId(n), spi_i, slot, owner, child),
                );
                for c in sa.children.values_mut() {
                    c.out_hwm = lease;
                }
                // Slots can still be moving when the cluster has just come up (a node that
                // joined late gets its share): follow the slot to its owner, as a gateway would.
                let mut tries = 0;
                loop {
                    match propose(&mut client, &Command::CreateSa(Box::new(sa.clone()))).await? {
                        Ok(_) => break made.push((SaId(n), child)),
                        Err(evpc_raft_store::Rejection::NotSlotOwner {
                            owner: Some(owner),
                            ..
                        }) if tries < 5 => {
                            tries += 1;
                            sa.owner = owner;
                        }
                        Err(rejection) => anyhow::bail!("creating SA {n}: {rejection}"),
                    }
                }
            }
        }));
    }
    let mut created = Vec::new();
    for task in tasks {
        created.extend(task.await??);
    }
    created.sort();
    Ok(created)
}
