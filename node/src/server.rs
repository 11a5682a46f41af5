//! `evpc-node run`: serve one node until SIGTERM or SIGINT.

use std::sync::Arc;

use evpc_proto::admin::v1::admin_server::AdminServer;
use evpc_proto::cluster::v1::cluster_server::ClusterServer;
use tokio::sync::watch;

use crate::admin_service::AdminService;
use crate::cluster_service::ClusterService;
use crate::config::NodeConfig;
use crate::node::Node;
use crate::peers::MAX_MESSAGE_BYTES;
use crate::reconciler;

/// A node with its servers running.
#[derive(Debug)]
pub struct RunningNode {
    /// The node.
    pub node: Arc<Node>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningNode {
    /// Starts the Raft member, both gRPC servers and the reconciler.
    pub async fn start(config: NodeConfig) -> anyhow::Result<RunningNode> {
        // Bind before starting Raft so a port clash is reported before anything else happens.
        let raft_listener = tokio::net::TcpListener::bind(config.raft_addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on raft_addr {}: {e}", config.raft_addr))?;
        let admin_listener = tokio::net::TcpListener::bind(config.admin_addr)
            .await
            .map_err(|e| {
                anyhow::anyhow!("cannot listen on admin_addr {}: {e}", config.admin_addr)
            })?;
        let node = Node::start(config).await?;
        let (shutdown, _) = watch::channel(false);

        let cluster = ClusterServer::new(ClusterService::new(node.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let admin = AdminServer::new(AdminService::new(node.clone()));
        let mut tasks = Vec::new();
        tasks.push(serve(
            raft_listener,
            shutdown.subscribe(),
            move |mut server| server.add_service(cluster),
        ));
        tasks.push(serve(
            admin_listener,
            shutdown.subscribe(),
            move |mut server| server.add_service(admin),
        ));
        let reconcile = reconciler::run(node.clone(), shutdown.subscribe());
        tasks.push(tokio::spawn(async move {
            reconcile.await;
            Ok(())
        }));
        Ok(RunningNode {
            node,
            shutdown,
            tasks,
        })
    }

    /// Stops serving, then stops Raft. Entries already acknowledged are on disk.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            task.await??;
        }
        self.node
            .raft
            .shutdown()
            .await
            .map_err(|e| anyhow::anyhow!("raft shutdown: {e}"))?;
        tracing::info!(node = self.node.id, "stopped");
        Ok(())
    }
}

fn serve<F>(
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
    services: F,
) -> tokio::task::JoinHandle<anyhow::Result<()>>
where
    F: FnOnce(tonic::transport::Server) -> tonic::transport::server::Router,
{
    let router = services(tonic::transport::Server::builder().tcp_nodelay(true));
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        router
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await?;
        Ok(())
    })
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let running = RunningNode::start(config).await?;
    wait_for_signal().await?;
    tracing::info!("signal received, shutting down");
    running.stop().await
}

/// Waits for SIGTERM or SIGINT.
pub async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
