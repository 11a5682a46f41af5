//! `evpc-node run`: serve one node until SIGTERM or SIGINT.

use std::sync::Arc;

use evpc_proto::admin::v1::admin_server::AdminServer;
use evpc_proto::cluster::v1::cluster_server::ClusterServer;
use tokio::sync::watch;

use crate::admin_guard::GuardedAdmin;
use crate::admin_service::AdminService;
use crate::cluster_service::ClusterService;
use crate::config::NodeConfig;
use crate::node::Node;
use crate::ownership::{owner_task, pinger_task, reconciler_task};
use crate::peers::MAX_MESSAGE_BYTES;
use crate::{backend, ike_gateway};

/// A node with its servers running.
pub struct RunningNode {
    /// The node.
    pub node: Arc<Node>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    raft_watch: Option<tokio::task::JoinHandle<anyhow::Error>>,
}

/// How long a starting node waits for its peers to answer its check-in before it assumes the
/// whole cluster is starting.
const CHECK_IN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

impl std::fmt::Debug for RunningNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningNode")
            .field("node", &self.node.id)
            .finish()
    }
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

        let acceptor = node.tls.as_ref().map(|t| t.acceptor()).transpose()?;
        let limits = node.config.limits.clone();
        let cluster = ClusterServer::new(ClusterService::new(node.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let admin = AdminServer::new(GuardedAdmin::new(AdminService::new(node.clone())))
            .max_decoding_message_size(limits.admin_max_message_bytes)
            .max_encoding_message_size(limits.admin_max_message_bytes);
        let mut cluster_server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(Some(limits.cluster_max_streams));
        let mut admin_server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .timeout(std::time::Duration::from_millis(limits.admin_timeout_ms))
            .concurrency_limit_per_connection(limits.admin_concurrency_per_connection)
            .max_concurrent_streams(Some(limits.admin_concurrency_per_connection as u32));
        let mut tasks = vec![
            tokio::spawn(serve(
                "cluster.v1",
                raft_listener,
                acceptor.clone(),
                shutdown.subscribe(),
                cluster_server.add_service(cluster),
            )),
            serve_apart(
                "admin.v1",
                admin_listener,
                acceptor,
                shutdown.subscribe(),
                move || admin_server.add_service(admin),
            )?,
            tokio::spawn(reconciler_task::run(node.clone(), shutdown.subscribe())),
            tokio::spawn(pinger_task::run(node.clone(), shutdown.subscribe())),
        ];
        if let Some(addr) = node.config.metrics_addr {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| anyhow::anyhow!("serving metrics on {addr}: {e}"))?;
            tracing::info!(%addr, "Prometheus metrics at /metrics");
        }
        let mut ike_io = None;
        match backend::start(&node)? {
            Some(backend) => {
                tracing::info!(backend = backend.driver.name(), "data plane running");
                tasks.push(tokio::spawn(owner_task::run(
                    node.clone(),
                    backend.driver.clone(),
                    shutdown.subscribe(),
                )));
                ike_io = backend.ike;
            }
            None => {
                tracing::info!("no data plane (dataplane.backend = \"none\"): control plane only")
            }
        }
        if node.config.ike.is_some()
            && let Some((socket, datagrams)) = ike_io
        {
            tasks.push(spawn_gateway(
                node.clone(),
                socket,
                datagrams,
                shutdown.subscribe(),
            )?);
        }
        tasks.push(tokio::spawn(log_leader_changes(
            node.clone(),
            shutdown.subscribe(),
        )));
        let raft_watch = Some(tokio::spawn(watch_raft(node.clone())));
        let running = RunningNode {
            node,
            shutdown,
            tasks,
            raft_watch,
        };
        // cluster.v1 serves CheckIn already; Raft RPCs wait until this node checked in.
        if let Err(e) = running.node.check_in(CHECK_IN_PATIENCE).await {
            let _ = running.stop().await;
            return Err(e.into());
        }
        Ok(running)
    }

    /// Resolves when the Raft core stopped on its own (a storage error, disk full): the node
    /// can no longer commit anything and must go, so the cluster fails its SAs over and a
    /// supervisor restarts it.
    pub async fn fatal(&mut self) -> anyhow::Error {
        match self.raft_watch.as_mut() {
            Some(watch) => {
                let error = watch
                    .await
                    .unwrap_or_else(|e| anyhow::anyhow!("the Raft watchdog failed: {e}"));
                self.raft_watch = None;
                error
            }
            None => std::future::pending().await,
        }
    }

    /// Stops serving, then stops Raft. Entries already acknowledged are on disk.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        if let Some(watch) = self.raft_watch {
            watch.abort();
        }
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

/// Logs each change of leader or term as this node sees it: operators read elections off the
/// log. Polls the metrics (cheap) rather than waking on each of their many updates under load.
async fn log_leader_changes(
    node: Arc<Node>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use openraft::rt::WatchReceiver;
    let mut seen = (None, 0);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = {
            let m = node.raft.metrics();
            let m = m.borrow_watched();
            (m.current_leader, m.current_term)
        };
        if now != seen {
            match now.0 {
                Some(leader) => tracing::info!(leader, term = now.1, "leader elected"),
                None => tracing::info!(term = now.1, "no leader"),
            }
            seen = now;
        }
    }
}

/// Serves `router` on `listener` until `shutdown`: over mutual TLS with `acceptor`, or in
/// plaintext without one (`insecure_plaintext`).
async fn serve(
    service: &'static str,
    listener: tokio::net::TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    router: tonic::transport::server::Router,
) -> anyhow::Result<()> {
    let stop = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    match acceptor {
        Some(acceptor) => {
            let incoming = crate::tls::accept_tls(listener, acceptor, service);
            router.serve_with_incoming_shutdown(incoming, stop).await?;
        }
        None => {
            // tonic's tcp_nodelay only applies to listeners it binds itself.
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |stream| {
                    if let Ok(stream) = &stream {
                        crate::tls::set_nodelay(stream);
                    }
                    stream
                },
            );
            router.serve_with_incoming_shutdown(incoming, stop).await?;
        }
    }
    Ok(())
}

/// [`serve`] on a runtime of its own (one thread): however hard an operator's client hammers
/// admin.v1, the tasks that send heartbeats and pings never queue behind its calls.
fn serve_apart<F>(
    service: &'static str,
    listener: tokio::net::TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shutdown: watch::Receiver<bool>,
    router: F,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>>
where
    F: FnOnce() -> tonic::transport::server::Router + Send + 'static,
{
    // A listener belongs to the runtime that registered it: hand it over as a std socket.
    let listener = listener.into_std()?;
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(format!("evpc-{service}"))
        .spawn(move || {
            let result = (|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    serve(service, listener, acceptor, shutdown, router()).await
                })
            })();
            let _ = done.send(result);
        })?;
    Ok(tokio::spawn(async move {
        finished
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the {service} thread died")))
    }))
}

/// Runs the IKE gateway on a runtime of its own, whose threads the kernel schedules after the
/// node's others: a flood of IKE work (Diffie-Hellman, setups by the thousand) then slows IKE
/// setups down, never the Raft heartbeats, the liveness pings and the commits that keep the
/// cluster together. On one shared runtime, a busy but healthy cluster missed heartbeats
/// and fenced itself (measured: `evpc-chaos ike-bench --sas 100000`).
fn spawn_gateway(
    node: Arc<Node>,
    socket: Arc<dyn evpc_dataplane::ike::IkeSocket>,
    datagrams: evpc_dataplane::ike::IkeReceiver,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (done, finished) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("evpc-ike".into())
        .spawn(move || {
            let result = (|| {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("evpc-ike-worker")
                    .on_thread_start(|| crate::priority::lower_this_thread("IKE gateway"))
                    .enable_all()
                    .build()?;
                crate::priority::lower_this_thread("IKE gateway");
                runtime.block_on(ike_gateway::run(node, socket, datagrams, shutdown))
            })();
            let _ = done.send(result);
        })?;
    Ok(tokio::spawn(async move {
        finished
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the IKE gateway thread died")))
    }))
}

/// Waits until the Raft core stops by itself and says why.
async fn watch_raft(node: Arc<Node>) -> anyhow::Error {
    use openraft::rt::WatchReceiver;
    let mut metrics = node.raft.metrics();
    loop {
        let stopped = {
            let m = metrics.borrow_watched();
            match &m.running_state {
                Err(fatal) => Some(fatal.to_string()),
                Ok(()) if m.state == openraft::ServerState::Shutdown => {
                    Some("the Raft core shut down".to_owned())
                }
                Ok(()) => None,
            }
        };
        if let Some(why) = stopped {
            return anyhow::anyhow!(
                "node {}: the Raft core stopped ({why}); this node can commit nothing more, so \
                 it stops answering and exits for its SAs to fail over — check the data \
                 directory's disk, then restart it",
                node.id
            );
        }
        if metrics.changed().await.is_err() {
            return anyhow::anyhow!("node {}: the Raft core is gone", node.id);
        }
    }
}

/// Runs a node until SIGTERM or SIGINT, or until its Raft core stops by itself (then it exits
/// with an error, so a supervisor restarts it and the cluster fails its SAs over).
pub async fn run(config: NodeConfig) -> anyhow::Result<()> {
    let mut running = RunningNode::start(config).await?;
    tokio::select! {
        signal = wait_for_signal() => {
            signal?;
            tracing::info!("signal received, shutting down");
            running.stop().await
        }
        fatal = running.fatal() => {
            tracing::error!("{fatal:#}");
            // The core is gone: stop the data plane and the services, skip Raft's shutdown.
            let _ = running.shutdown.send(true);
            for task in running.tasks {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(2), task).await;
            }
            Err(fatal)
        }
    }
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
