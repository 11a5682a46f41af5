//! The `evpcctl` command line: parsing and every command, writing to any output so it can be
//! tested in-process.
//!
//! Every command prints a human-readable answer, or JSON with `--json`. Endpoints come from
//! `--endpoints` or `EVPC_ENDPOINTS`; the client tries each and follows the leader.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use crate::AdminClient;
use anyhow::Context;
use clap::{Parser, Subcommand};
use evpc_proto::admin::v1 as pb;

/// Operate an evpc cluster.
#[derive(Debug, Parser)]
#[command(name = "evpcctl", version)]
pub struct Cli {
    /// Admin endpoints of the cluster's nodes, comma-separated (`host:port` or URLs).
    #[arg(
        long,
        global = true,
        env = "EVPC_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203"
    )]
    pub endpoints: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Per-request timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    pub timeout_ms: u64,
    /// The cluster CA's certificate (PEM), e.g. the `ca.pem` of `evpc-node pki init`.
    #[arg(long, global = true, env = "EVPC_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Your operator certificate (PEM), from `evpc-node pki issue-client`.
    #[arg(long, global = true, env = "EVPC_CERT")]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM, owner-only).
    #[arg(long, global = true, env = "EVPC_KEY")]
    pub key: Option<PathBuf>,
    /// Talk plaintext HTTP/2, to a cluster that runs `insecure_plaintext = true`.
    #[arg(long, global = true, env = "EVPC_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Leader, term, members and counts, as the leader sees them.
    Status {
        /// Also show the state digest (hash of the applied state).
        #[arg(long)]
        digest: bool,
    },
    /// Cluster-wide operations.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Raft membership.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Raft leadership.
    #[command(subcommand)]
    Leader(LeaderCommand),
    /// IKE SAs.
    #[command(subcommand)]
    Sa(SaCommand),
    /// Gateway nodes' data-plane state.
    #[command(subcommand)]
    Node(NodeCommand),
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Move every SA off a node (at a bounded rate) and stop placing new SAs there.
    Drain {
        /// Node id.
        id: u64,
    },
    /// Make a drained or down node active again.
    Activate {
        /// Node id.
        id: u64,
    },
    /// Each endpoint's node builds a snapshot of its applied state now (and compacts its log
    /// behind it), e.g. before maintenance; prints what it cost.
    Snapshot,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Even out SA ownership over the active nodes (at a bounded rate).
    Rebalance,
    /// Which node answers new SAs in each placement slot.
    Slots,
    /// Draw a new cluster key, install it on every member, and make it the sealing key; blobs
    /// under older keys are resealed in the background and old keys retired (see `status`).
    RotateKey,
    /// Bootstrap a new cluster through the first endpoint.
    Init {
        /// Initial voters as ID=RAFT_ADDR,ADMIN_ADDR (repeat); none: the node's configured peers.
        #[arg(long = "member", value_parser = parse_member)]
        members: Vec<pb::NodeAddress>,
    },
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Add a node: learner first, voter once it has caught up.
    Add {
        /// Node id.
        #[arg(long)]
        id: u64,
        /// Its cluster.v1 address.
        #[arg(long)]
        raft_addr: String,
        /// Its admin.v1 address.
        #[arg(long)]
        admin_addr: String,
        /// Keep it a learner.
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster.
    Remove {
        /// Node id.
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum LeaderCommand {
    /// Hand leadership to another voter.
    Transfer {
        /// The new leader's node id.
        to: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum SaCommand {
    /// List SAs.
    List {
        /// Only SAs owned by this node.
        #[arg(long)]
        owner: Option<u64>,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one SA and its children.
    Get {
        /// SA id (16 hex digits).
        id: String,
    },
    /// Move an SA to another node now (planned transfer): the new owner resumes above every
    /// sequence number the old one could have used.
    Transfer {
        /// SA id.
        id: String,
        /// The new owner.
        #[arg(long)]
        to: u64,
    },
    /// Delete an SA.
    Delete {
        /// SA id.
        id: String,
    },
    /// Export an SA context to a file (to import it into another cluster).
    Export {
        /// SA id.
        id: String,
        /// Remove it from this cluster in the same step (a move).
        #[arg(long)]
        remove: bool,
        /// Where to write the context.
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Import an SA context exported by another cluster.
    Import {
        /// The context file.
        file: PathBuf,
        /// Owner node; default: the owner of its placement slot.
        #[arg(long)]
        owner: Option<u64>,
    },
}

fn parse_member(text: &str) -> Result<pb::NodeAddress, String> {
    let (id, addrs) = text
        .split_once('=')
        .ok_or("expected ID=RAFT_ADDR,ADMIN_ADDR")?;
    let (raft_addr, admin_addr) = addrs
        .split_once(',')
        .ok_or("expected ID=RAFT_ADDR,ADMIN_ADDR")?;
    Ok(pb::NodeAddress {
        id: id.parse().map_err(|_| format!("bad node id {id:?}"))?,
        raft_addr: raft_addr.into(),
        admin_addr: admin_addr.into(),
    })
}

/// Prints rows as aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn print_json<T: serde::Serialize>(out: &mut dyn Write, value: &T) -> anyhow::Result<()> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn print_status(out: &mut dyn Write, s: &pb::StatusResponse) -> std::io::Result<()> {
    let leader = s
        .leader_id
        .map_or_else(|| "none".to_owned(), |l| l.to_string());
    writeln!(
        out,
        "node {} ({})  leader {}  term {}  log {}  committed {}  applied {}  snapshot {}",
        s.node_id,
        s.role,
        leader,
        s.term,
        s.last_log_index,
        s.committed_index,
        s.last_applied_index,
        s.snapshot_index
    )?;
    writeln!(
        out,
        "IKE SAs {}  child SAs {}  inner addresses {}",
        s.ike_sas, s.child_sas, s.addresses
    )?;
    writeln!(
        out,
        "data plane {}  running child SAs {}  {}",
        s.dataplane,
        s.running_children,
        if s.fenced {
            format!("FENCED ({})", s.fence_reason)
        } else {
            "not fenced".to_owned()
        }
    )?;
    let per_key: Vec<String> = s
        .key_blobs
        .iter()
        .map(|k| format!("{}: {} blobs in {} SAs", k.key_id, k.blobs, k.sas))
        .collect();
    let ids = |ids: &[u32]| {
        if ids.is_empty() {
            "none".to_owned()
        } else {
            ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
        }
    };
    writeln!(
        out,
        "cluster key {} active  blobs per key [{}]{}  retired {}  this node holds {}",
        s.active_key_id,
        per_key.join(", "),
        if s.unkeyed_blobs > 0 {
            format!("  without key id {}", s.unkeyed_blobs)
        } else {
            String::new()
        },
        ids(&s.retired_key_ids),
        ids(&s.keyring_key_ids),
    )?;
    if !s.state_digest.is_empty() {
        writeln!(
            out,
            "state digest {} at index {}",
            s.state_digest, s.last_applied_index
        )?;
    }
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.role.clone(),
                m.gateway_state.clone(),
                m.raft_addr.clone(),
                m.admin_addr.clone(),
                m.matched_index
                    .map_or_else(|| "-".into(), |i| i.to_string()),
                m.slots.to_string(),
                m.owned_sas.to_string(),
                m.silence_ms
                    .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
            ]
        })
        .collect();
    writeln!(
        out,
        "{}",
        table(
            &[
                "ID", "ROLE", "GATEWAY", "RAFT", "ADMIN", "MATCHED", "SLOTS", "SAS"
            ],
            &rows
        )
    )?;
    Ok(())
}

fn print_sa(out: &mut dyn Write, sa: &pb::SaInfo) -> std::io::Result<()> {
    writeln!(out, "IKE SA {}  ({}, {})", sa.id, sa.role, sa.suite)?;
    writeln!(out, "  SPIs        i {}  r {}", sa.spi_i, sa.spi_r)?;
    writeln!(
        out,
        "  peer        {} ({})  local {} ({})",
        sa.peer, sa.peer_id, sa.local, sa.local_id
    )?;
    writeln!(
        out,
        "  owner       node {}  epoch {}  slot {}",
        sa.owner, sa.epoch, sa.slot
    )?;
    writeln!(
        out,
        "  message IDs next from peer {}  next of ours {}  stored response {}  pending request {}",
        sa.next_peer_request,
        sa.next_local_request,
        sa.last_response_msg_id
            .map_or_else(|| "-".into(), |m| m.to_string()),
        sa.pending_request_msg_id
            .map_or_else(|| "-".into(), |m| m.to_string()),
    )?;
    if !sa.virtual_ip.is_empty() {
        writeln!(out, "  inner addr  {}", sa.virtual_ip)?;
    }
    writeln!(
        out,
        "  times       established {}  rekey at {}  expires {}  peer seen {}",
        sa.established_ms, sa.rekey_at_ms, sa.expire_at_ms, sa.last_peer_activity_ms
    )?;
    let rows: Vec<Vec<String>> = sa
        .children
        .iter()
        .map(|c| {
            vec![
                c.in_spi.clone(),
                c.out_spi.clone(),
                c.suite.clone(),
                c.out_hwm.to_string(),
                c.in_checkpoint.to_string(),
                c.rekey_generation.to_string(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        writeln!(
            out,
            "{}",
            table(
                &[
                    "IN SPI",
                    "OUT SPI",
                    "SUITE",
                    "OUT HWM",
                    "IN CHECKPOINT",
                    "GEN"
                ],
                &rows
            )
        )?;
    }
    Ok(())
}

/// Runs one parsed command, writing its answer to `out`.
/// How to reach the cluster: mutual TLS unless plaintext is asked for.
fn security(cli: &Cli) -> anyhow::Result<crate::Security> {
    match (&cli.cacert, &cli.cert, &cli.key, cli.insecure_plaintext) {
        (None, None, None, true) => Ok(crate::Security::Plaintext),
        (Some(ca), Some(cert), Some(key), false) => {
            Ok(crate::Security::Tls(crate::ClientTls::load(ca, cert, key)?))
        }
        (_, _, _, true) => anyhow::bail!("--insecure-plaintext with certificates: choose one"),
        _ => anyhow::bail!(
            "the cluster's admin API runs mutual TLS: give --cacert, --cert and --key (or \
             EVPC_CACERT, EVPC_CERT, EVPC_KEY), as `evpc-chaos local` prints them; \
             --insecure-plaintext only for a cluster with insecure_plaintext = true"
        ),
    }
}

pub async fn run(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut client = AdminClient::new(
        &cli.endpoints,
        Duration::from_millis(cli.timeout_ms),
        security(&cli)?,
    )?;
    let json = cli.json;
    match cli.command {
        Command::Status { digest } => {
            client.follow_leader().await?;
            let status = client.status(digest).await?;
            if json {
                print_json(out, &status)?;
            } else {
                print_status(out, &status)?;
            }
        }
        Command::Cluster(ClusterCommand::Init { members }) => {
            client.initialize(members).await?;
            if json {
                print_json(out, &serde_json::json!({ "initialized": true }))?;
            } else {
                writeln!(
                    out,
                    "cluster initialized through {}",
                    client.current_endpoint()
                )?;
            }
        }
        Command::Member(MemberCommand::Add {
            id,
            raft_addr,
            admin_addr,
            learner,
        }) => {
            client.follow_leader().await?;
            let node = pb::NodeAddress {
                id,
                raft_addr,
                admin_addr,
            };
            let r = client.add_member(node, learner).await?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(
                    out,
                    "node {id} added as {}; voters {:?} learners {:?} (log index {})",
                    if learner { "learner" } else { "voter" },
                    r.voters,
                    r.learners,
                    r.log_index
                )?;
            }
        }
        Command::Member(MemberCommand::Remove { id }) => {
            client.follow_leader().await?;
            let r = client.remove_member(id).await?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(
                    out,
                    "node {id} removed; voters {:?} learners {:?} (log index {})",
                    r.voters, r.learners, r.log_index
                )?;
            }
        }
        Command::Leader(LeaderCommand::Transfer { to }) => {
            client.follow_leader().await?;
            let r = client.transfer_leader(to).await?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(out, "leader is now node {}", r.leader_id.unwrap_or(0))?;
            }
        }
        Command::Sa(SaCommand::List { owner, limit }) => {
            client.follow_leader().await?;
            let mut sas = client.all_sas(owner).await?;
            if limit > 0 {
                sas.truncate(limit);
            }
            if json {
                print_json(out, &sas)?;
            } else {
                let rows: Vec<Vec<String>> = sas
                    .iter()
                    .map(|sa| {
                        vec![
                            sa.id.clone(),
                            sa.peer.clone(),
                            sa.peer_id.clone(),
                            sa.owner.to_string(),
                            sa.epoch.to_string(),
                            sa.children.len().to_string(),
                            sa.next_peer_request.to_string(),
                            if sa.virtual_ip.is_empty() {
                                "-".into()
                            } else {
                                sa.virtual_ip.clone()
                            },
                        ]
                    })
                    .collect();
                writeln!(
                    out,
                    "{}",
                    table(
                        &[
                            "ID",
                            "PEER",
                            "PEER ID",
                            "OWNER",
                            "EPOCH",
                            "CHILDREN",
                            "NEXT MSGID",
                            "INNER"
                        ],
                        &rows
                    )
                )?;
            }
        }
        Command::Sa(SaCommand::Get { id }) => {
            client.follow_leader().await?;
            let sa = client.get_sa(&id).await?;
            if json {
                print_json(out, &sa)?;
            } else {
                print_sa(out, &sa)?;
            }
        }
        Command::Sa(SaCommand::Transfer { id, to }) => {
            client.follow_leader().await?;
            let r = client.transfer_sa(&id, to).await?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(
                    out,
                    "SA {} moved from node {} to node {} (epoch {}, log index {})",
                    r.id, r.from, r.to, r.epoch, r.log_index
                )?;
            }
        }
        Command::Node(NodeCommand::Drain { id }) | Command::Node(NodeCommand::Activate { id }) => {
            client.follow_leader().await?;
            let drain = matches!(cli.command, Command::Node(NodeCommand::Drain { .. }));
            let r = if drain {
                client.drain_node(id).await?
            } else {
                client.activate_node(id).await?
            };
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(
                    out,
                    "node {} is {}; it owns {} SAs{}",
                    r.id,
                    r.gateway_state,
                    r.owned_sas,
                    if drain && r.owned_sas > 0 {
                        " (they move away at the configured rate: see `sa list --owner`; it is \
                         idle once `status` on it shows 0 running child SAs)"
                    } else {
                        ""
                    }
                )?;
            }
        }
        Command::Node(NodeCommand::Snapshot) => {
            let mut answers = Vec::new();
            for endpoint in &cli.endpoints {
                let mut one = AdminClient::new(
                    std::slice::from_ref(endpoint),
                    Duration::from_millis(cli.timeout_ms),
                    security(&cli)?,
                )?;
                answers.push(one.snapshot().await?);
            }
            if json {
                print_json(out, &answers)?;
            } else {
                for r in answers {
                    let s = r.snapshot.unwrap_or_default();
                    writeln!(
                        out,
                        "node {}: snapshot at index {} ({} IKE SAs, {} bytes) built in {} ms, \
                         the state locked {} ms",
                        r.node_id, s.index, s.ike_sas, s.bytes, s.ms, s.lock_ms
                    )?;
                }
            }
        }
        Command::Cluster(ClusterCommand::Rebalance) => {
            client.follow_leader().await?;
            let r = client.rebalance().await?;
            if json {
                print_json(out, &r)?;
            } else {
                let mut before: Vec<_> = r.owned_before.iter().collect();
                before.sort();
                let shown: Vec<String> = before
                    .iter()
                    .map(|(n, c)| format!("node {n}: {c}"))
                    .collect();
                writeln!(
                    out,
                    "rebalancing {} SAs ({}): about {} moves",
                    r.owned_before.values().sum::<u64>(),
                    shown.join(", "),
                    r.moves_planned
                )?;
            }
        }
        Command::Cluster(ClusterCommand::RotateKey) => {
            client.follow_leader().await?;
            let r = client.rotate_key().await?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(
                    out,
                    "cluster key {} is active (was {}), installed on nodes {:?} (log index {}); \
                     {} blobs under older keys are being resealed: see `evpcctl status`",
                    r.key_id, r.previous_key_id, r.installed_on, r.log_index, r.blobs_to_reseal
                )?;
            }
        }
        Command::Cluster(ClusterCommand::Slots) => {
            client.follow_leader().await?;
            let r = client.list_slots().await?;
            if json {
                print_json(out, &r)?;
            } else {
                // Ranges of consecutive slots with the same owner.
                let mut rows = Vec::new();
                let mut start = 0usize;
                for i in 1..=r.owners.len() {
                    if i == r.owners.len() || r.owners[i] != r.owners[start] {
                        let owner = r.owners[start];
                        rows.push(vec![
                            format!("{start}-{}", i - 1),
                            if owner == 0 {
                                "-".into()
                            } else {
                                owner.to_string()
                            },
                        ]);
                        start = i;
                    }
                }
                writeln!(out, "{}", table(&["SLOTS", "NODE"], &rows))?;
            }
        }
        Command::Sa(SaCommand::Delete { id }) => {
            let r = client.delete_sa(&id).await?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(out, "SA {id} deleted (log index {})", r.log_index)?;
            }
        }
        Command::Sa(SaCommand::Export {
            id,
            remove,
            out: file,
        }) => {
            let r = client.export_sa(&id, remove).await?;
            std::fs::write(&file, &r.context)
                .with_context(|| format!("writing {}", file.display()))?;
            if json {
                print_json(
                    out,
                    &serde_json::json!({
                        "id": r.id, "removed": r.removed, "log_index": r.log_index,
                        "file": file, "bytes": r.context.len(),
                    }),
                )?;
            } else {
                writeln!(
                    out,
                    "SA {} exported to {} ({} bytes){}",
                    r.id,
                    file.display(),
                    r.context.len(),
                    if r.removed {
                        ", removed from this cluster"
                    } else {
                        ""
                    }
                )?;
            }
        }
        Command::Sa(SaCommand::Import { file, owner }) => {
            let context =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = client.import_sa(context, owner).await?;
            if json {
                print_json(out, &r)?;
            } else {
                writeln!(
                    out,
                    "SA {} imported, owned by node {} (log index {})",
                    r.id, r.owner, r.log_index
                )?;
            }
        }
    }
    Ok(())
}
