//! The IKE gateway: the sans-IO `evpc-ike` engine on the cluster address, wired to the cluster —
//! commit before respond, the replicated address pool, takeover of SAs from the committed state.
//!
//! # Data flow
//!
//! ```text
//!  UDP 500 / 4500 on the cluster address (the data plane's sockets; every node sees every packet)
//!        │ IkeReceiver (IkeDatagram: port, local, remote, message without the non-ESP marker)
//!        ▼
//!  dispatcher (one task)        evpc_ike::Router::route(remote, message)
//!    ├─ Sa(task):      an SPI routed here, or a retransmitted IKE_SA_INIT ─► its task, at once
//!    ├─ NewSa{spi_i}:  (within the half-open cap and the source's budget) ─► the INIT queue
//!    │                 (bounded); screened in batches when the datagrams waiting are routed:
//!    │                 does this node own slot_for_initiator_spi(spi_i), unfenced?
//!    │                       no ─► silence (another node answers)
//!    │                       yes ─► Router::screen (cookie, proposal, KE group; no DH)
//!    │                              ─► stateless reply (COOKIE, ...) or insert_half_open
//!    │                              ─► new task: PendingInit::complete (the DH) and answer
//!    ├─ Unknown{spi}:  does this node own the SA in the committed state, and is the
//!    │                 SPI its current generation's? ─► start a task that restores it
//!    │                 (the engine answers a byte-identical retransmission from the
//!    │                 peer's address with the committed response)
//!    │                 else silence (another node's SA, or nobody's: no task, no answer)
//!    ├─ Drop:          unroutable, half-open cap or source budget reached ─► counted, silence
//!    ├─ tick (50 ms):  Router::handle_timeout (cookie secret rotation, half-open expiry)
//!    └─ state changed (applied index): reconcile, at most every 50 ms, the SAs the change
//!       feed lists ─► restore the SAs this node now owns (eagerly), tell tasks whose SA
//!       moved, was deleted or changed epoch
//!
//!  one task per IKE SA (actor.rs), one call into the engine at a time:
//!    engine.handle_datagram / handle_timeout / assign_inner_address ─► Outcome
//!      1. outcome.send                          ─► socket at once (retransmissions, half-open)
//!      2. outcome.commit: snapshot ─► mapping ─► commit::commit_new_sa (IKE_AUTH done:
//!         record + first child + inner address, one entry) / commit_changes (Update with
//!         message IDs, exact datagrams, children, times, sealed engine) / commit_delete
//!         ─► durable on a quorum ─► commit.into_datagrams_after_durable() ─► socket
//!      3. events: inner address needed (pool ─► assign_inner_address ─► back to 1), rekeyed
//!         SPIs routed here, INITIAL_CONTACT (older SAs of the peer deleted), closed
//!      4. sleep until engine.next_timeout() (retransmissions, DPD, rekeys, expiry)
//!
//!  committed children ─► owner runtime (ownership::runtime) starts them on the data plane of
//!  whichever node owns the SA, with their leases; this module never touches the data plane.
//! ```
//!
//! # Call order and guarantees
//!
//! - Nothing a state change gates leaves before `Node::propose` returned it committed; a
//!   refused or failed commit drops the engine, which is restored from the committed record
//!   (so the peer's retransmission, or our own retransmission timer, redoes the exchange).
//! - A new SA is created by the node that owns its slot (`Command::CreateSa` is refused
//!   otherwise), in epoch 1, with its first child SA (lease `ownership.move_lease`) and its
//!   inner address in the same entry. If another node took that address meanwhile, the engine
//!   copy taken before the address was assigned answers the same IKE_AUTH with another one.
//! - Half-open SAs (IKE_SA_INIT answered, IKE_AUTH not yet) are node-local by design: a client
//!   whose half-open SA died with its node times out and starts again.
//! - Takeover: when the committed state says this node owns an SA it does not run, the task
//!   opens the sealed engine snapshot in `IkeSa.keys` and calls `IkeSa::restore`. A request of
//!   ours that was in flight is resent byte for byte at once; the peer's retransmissions are
//!   answered from the committed response; DPD and rekey timers continue from the committed
//!   (wall-clock) times. A command from the old owner is refused by its stale epoch, so the old
//!   owner stops (`CommitError::Fenced`) the first time it tries to act.
//! - The replicated record follows the current IKE SA generation in place
//!   (`SaUpdate::IkeRekeyedInPlace`): same id and children across IKE rekeys (see `mapping`).
//!
//! The engine snapshot holds key material: it is sealed (AES-256-GCM under the cluster key,
//! bound to the SA id) before it leaves the process, never logged, and zeroized when dropped.

mod actor;
pub mod commit;
#[doc(hidden)]
pub mod machine;
pub mod mapping;
pub mod pool;
pub mod selector_guard;
pub mod settings;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use evpc_dataplane::ike::{IkeDatagram, IkePort, IkeReceiver, IkeSocket};
use evpc_ike::{
    Config, Datagram, Dispatch, DropReason, Endpoint, Random, Router, Screened, Secret,
};
use evpc_raft_store::{ChangeKinds, Feed, SaChange, SaId, slot_for_initiator_spi};
use rand::RngCore;
use tokio::sync::{mpsc, watch};

use self::actor::{Actor, Start};
use self::pool::Pool;
pub use self::settings::{IkeSettings, PskSecret, PskSetting};
use crate::node::{Node, now_ms};
use crate::sealing::{ClusterKey, Keyring, SealError};

/// Depth of each SA task's queue; beyond it datagrams are dropped (the peer retransmits).
const SA_QUEUE: usize = 64;
/// State changes closer together than this are reconciled together.
const RECONCILE_EVERY: Duration = Duration::from_millis(50);
/// SAs looked at under one hold of the state's read lock while reconciling.
const RECONCILE_PAGE: usize = 1024;
/// Datagrams taken off the data plane's queue at once, before any waiting IKE_SA_INIT is
/// screened: established SAs are served first.
const DISPATCH_BATCH: usize = 256;
/// IKE_SA_INITs waiting to be screened; beyond, the newest are dropped (the peer retransmits,
/// RFC 7296 §2.1). Bounds what a flood can queue.
const INIT_QUEUE: usize = 1024;
/// IKE_SA_INITs screened before the dispatcher looks at its queue again.
const INIT_BATCH: usize = 32;

/// What an SA task is told.
#[derive(Debug)]
enum Input {
    /// A datagram for this SA.
    Datagram(IkeDatagram),
    /// The committed state of this SA changed under the task (moved, deleted, new epoch).
    Reconcile,
}

/// How the dispatcher reaches one SA task.
#[derive(Debug)]
struct Handle {
    /// The router's handle for this task: unique per task, so that a task that ends never
    /// unroutes the task that replaced it for the same SA.
    task: u64,
    id: SaId,
    tx: mpsc::Sender<Input>,
    /// The epoch the task acts in; 0 while the SA is half-open (not committed).
    epoch: AtomicU64,
}

/// Which task handles which datagram: `evpc_ike::Router` (SPIs, half-open SAs with their cap
/// and per-source budget, cookie rotation) plus the tasks behind its handles.
#[derive(Debug)]
struct Registry {
    router: Router<u64>,
    tasks: HashMap<u64, Arc<Handle>>,
    by_id: HashMap<SaId, Arc<Handle>>,
    next_task: u64,
}

impl Registry {
    fn handle(&self, task: u64) -> Option<Arc<Handle>> {
        self.tasks.get(&task).cloned()
    }
}

/// What every task of the gateway shares.
struct Shared {
    node: Arc<Node>,
    socket: Arc<dyn IkeSocket>,
    config: Arc<Config>,
    pool: Option<Pool>,
    dns: Vec<Ipv4Addr>,
    initial_lease: u64,
    registry: Mutex<Registry>,
    /// Which IkePort a local port is (learned from received datagrams).
    ports: Mutex<HashMap<u16, IkePort>>,
    natt_port: u16,
    shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("node", &self.node.id)
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn key(&self) -> &Keyring {
        self.node
            .keyring
            .as_ref()
            .expect("checked when the gateway started")
    }

    /// The key to seal with now: the active key of the state this node applied.
    fn sealer(&self) -> Result<Arc<ClusterKey>, SealError> {
        let state = self.node.state.read();
        self.key().sealer(&state)
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, d: &Datagram) {
        let local = d.local.port();
        let port = self
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&local)
            .copied()
            .unwrap_or(if local == self.natt_port {
                IkePort::NatT
            } else {
                IkePort::Ike
            });
        if let Err(error) = self.socket.send_ike(port, d.remote, &d.payload) {
            // Per datagram and caused by the peer's address (a spoofed source is often
            // unreachable): counted, not logged above debug.
            metrics::counter!("evpc_ike_send_errors_total").increment(1);
            tracing::debug!(to = %d.remote, %error, "sending an IKE message");
        }
    }
}

fn random() -> impl Random {
    |buf: &mut [u8]| rand::rng().fill_bytes(buf)
}

/// The dispatcher's side.
struct Gateway {
    shared: Arc<Shared>,
    /// IKE_SA_INITs waiting to be screened, after every datagram for an established SA.
    inits: VecDeque<(u64, IkeDatagram)>,
    /// The change feed's cursor: placement changes up to here were reconciled.
    cursor: u64,
    /// Scratch space for the feed's changes.
    changed: Vec<SaChange>,
}

impl Gateway {
    fn me(&self) -> u64 {
        self.shared.node.id
    }

    /// Starts the task for SA `id` under router handle `task` (already routed, for a half-open
    /// SA; routed by the task itself once restored).
    fn spawn(
        &self,
        registry: &mut Registry,
        task: u64,
        id: SaId,
        spis: BTreeSet<u64>,
        start: Start,
    ) {
        let (tx, rx) = mpsc::channel(SA_QUEUE);
        let handle = Arc::new(Handle {
            task,
            id,
            tx,
            epoch: AtomicU64::new(0),
        });
        registry.by_id.insert(id, handle.clone());
        registry.tasks.insert(task, handle.clone());
        let actor = Actor::new(self.shared.clone(), handle, rx, spis);
        tokio::spawn(actor.run(start));
    }

    fn new_task(registry: &mut Registry) -> u64 {
        registry.next_task += 1;
        registry.next_task
    }

    fn deliver(handle: &Handle, d: IkeDatagram) {
        if handle.tx.try_send(Input::Datagram(d)).is_err() {
            tracing::debug!(sa = %handle.id, "SA queue full; datagram dropped");
        }
    }

    /// Routes one datagram: to its SA's task at once, or — a new IKE_SA_INIT — into the queue
    /// [`Gateway::screen_inits`] works through once no other datagram waits.
    fn dispatch(&mut self, d: IkeDatagram) {
        {
            let mut ports = self.shared.ports.lock().unwrap_or_else(|e| e.into_inner());
            if ports.get(&d.local.port()) != Some(&d.port) {
                ports.insert(d.local.port(), d.port);
            }
        }
        let route = {
            let registry = self.shared.registry();
            match registry.router.route(d.remote, &d.message) {
                Dispatch::Sa(task) => Ok(registry.handle(task)),
                other => Err(other),
            }
        };
        match route {
            Ok(Some(handle)) => Self::deliver(&handle, d),
            Ok(None) => {}
            Err(Dispatch::NewSa { initiator_spi }) => {
                if self.inits.len() >= INIT_QUEUE {
                    metrics::counter!("evpc_ike_init_dropped_total", "reason" => "queue_full")
                        .increment(1);
                    return;
                }
                self.inits.push_back((initiator_spi, d));
            }
            Err(Dispatch::Unknown { local_spi }) => self.existing(local_spi, d),
            Err(Dispatch::Drop(reason)) => {
                let reason = match reason {
                    DropReason::Unroutable => "unroutable",
                    DropReason::HalfOpenCap => "half_open_cap",
                    DropReason::SourceBudget => "source_budget",
                };
                metrics::counter!("evpc_ike_init_dropped_total", "reason" => reason).increment(1);
            }
            Err(Dispatch::Sa(_)) => unreachable!("matched above"),
        }
    }

    /// Screens up to [`INIT_BATCH`] queued IKE_SA_INITs. Returns whether more wait.
    fn screen_inits(&mut self) -> bool {
        for _ in 0..INIT_BATCH {
            let Some((initiator_spi, d)) = self.inits.pop_front() else {
                break;
            };
            self.new_sa(initiator_spi, d);
        }
        metrics::gauge!("evpc_ike_half_open")
            .set(self.shared.registry().router.half_open_len() as f64);
        !self.inits.is_empty()
    }

    /// An IKE_SA_INIT no half-open SA holds: screened (cookie, proposal, KE group; no
    /// Diffie-Hellman) by the node that owns its slot, then a task of its own computes the
    /// Diffie-Hellman and answers.
    fn new_sa(&mut self, initiator_spi: u64, d: IkeDatagram) {
        let slot = slot_for_initiator_spi(initiator_spi);
        let owner = self.shared.node.state.read().slots().owner(slot);
        if owner != Some(self.me()) || self.shared.node.fence_reason().is_some() {
            return;
        }
        let mut rng = random();
        let mut registry = self.shared.registry();
        // A retransmission that was queued behind its original: the original's task has it.
        if let Dispatch::Sa(task) = registry.router.route(d.remote, &d.message) {
            if let Some(handle) = registry.handle(task) {
                Self::deliver(&handle, d);
            }
            return;
        }
        match registry
            .router
            .screen(&mut rng, d.local, d.remote, &d.message)
        {
            Screened::Admit(pending) => {
                let task = Self::new_task(&mut registry);
                let local_spi = pending.local_spi();
                if let Err(error) =
                    registry
                        .router
                        .insert_half_open(task, pending.key(), [local_spi], now_ms())
                {
                    tracing::debug!(from = %d.remote, %error, "IKE_SA_INIT not admitted");
                    return;
                }
                let spis = BTreeSet::from([local_spi]);
                self.spawn(
                    &mut registry,
                    task,
                    SaId(local_spi),
                    spis,
                    Start::Pending {
                        pending,
                        key: (d.remote, initiator_spi),
                    },
                );
            }
            Screened::Reply(reply, why) => {
                drop(registry);
                tracing::debug!(from = %d.remote, %why, "IKE_SA_INIT answered statelessly");
                metrics::counter!("evpc_ike_init_stateless_replies_total").increment(1);
                self.shared.send(&reply);
            }
            Screened::Dropped(why) => {
                tracing::debug!(from = %d.remote, %why, "IKE_SA_INIT dropped");
            }
        }
    }

    /// Rotates the cookie secret and forgets expired half-open SAs when due (their engines
    /// close themselves at the same deadline).
    fn on_tick(&mut self) {
        let now = now_ms();
        let mut registry = self.shared.registry();
        if now >= registry.router.poll_timeout() {
            let expired = registry.router.handle_timeout(now, &mut random());
            if !expired.is_empty() {
                tracing::debug!(expired = expired.len(), "half-open IKE SAs expired");
            }
        }
    }

    fn existing(&mut self, local_spi: u64, d: IkeDatagram) {
        // Not running here: an SA this node owns in the committed state but has not restored
        // yet (it just took it over)? Only for the current generation's SPI: a datagram with
        // any other SPI — an unknown one, or a replaced generation's — costs a table lookup
        // and nothing else, never a task.
        let me = self.me();
        let id = {
            let state = self.shared.node.state.read();
            match state
                .sa_by_ike_spi(local_spi)
                .and_then(|id| state.sa(id))
                .filter(|sa| sa.owner == me && sa.local_spi() == local_spi)
            {
                Some(sa) => sa.id,
                None => return,
            }
        };
        if self.shared.node.fence_reason().is_some() {
            return;
        }
        // A restore already under way (its task has no SPIs routed yet): queue it there.
        let mut registry = self.shared.registry();
        if let Some(handle) = registry.by_id.get(&id).cloned() {
            drop(registry);
            Self::deliver(&handle, d);
            return;
        }
        // The restored engine answers a retransmission from its committed response — only a
        // byte-identical request from the peer's address (`evpc_ike`), so nothing is sent
        // where a forger chooses. (Answering from the replicated record here, before the
        // restore, saved a millisecond and trusted the message ID alone.)
        self.spawn_restore(&mut registry, id, Some(d));
    }

    /// Starts a task that restores SA `id` from the committed state, then handles `first`.
    fn spawn_restore(&self, registry: &mut Registry, id: SaId, first: Option<IkeDatagram>) {
        let task = Self::new_task(registry);
        self.spawn(
            registry,
            task,
            id,
            BTreeSet::new(),
            Start::Restore { first },
        );
    }

    /// Restores SAs this node owns but does not run; tells tasks whose SA changed hands. Looks
    /// only at the SAs whose placement changed since the last call (the change feed), so a
    /// commit costs the same with 100 SAs as with 100,000; walks everything, a page at a time,
    /// only when the feed cannot say (first run, a snapshot installed, this node unfenced).
    fn reconcile(&mut self, full: bool) {
        let mut changed = std::mem::take(&mut self.changed);
        changed.clear();
        let feed =
            self.shared
                .node
                .state
                .changes_since(self.cursor, ChangeKinds::PLACEMENT, &mut changed);
        let (upto, walk) = match feed {
            Feed::Changes { upto } => (upto, full),
            Feed::Resync { upto } => (upto, true),
        };
        if walk {
            self.reconcile_all();
        } else {
            let mut ids: Vec<SaId> = changed.iter().map(|c| c.sa).collect();
            ids.sort_unstable();
            ids.dedup();
            for page in ids.chunks(RECONCILE_PAGE) {
                self.reconcile_ids(page);
            }
        }
        self.cursor = upto;
        self.changed = changed;
    }

    /// The SAs `ids`: restore those this node owns and does not run, nudge tasks whose SA is
    /// gone, moved or in another epoch.
    fn reconcile_ids(&mut self, ids: &[SaId]) {
        let me = self.me();
        let fenced = self.shared.node.fence_reason().is_some();
        let mut restore = Vec::new();
        let mut nudge = Vec::new();
        {
            let state = self.shared.node.state.read();
            let registry = self.shared.registry();
            for id in ids {
                let committed = state.sa(*id).map(|sa| (sa.owner, sa.epoch.0));
                match (registry.by_id.get(id), committed) {
                    (None, Some((owner, _))) if owner == me && !fenced => restore.push(*id),
                    (None, _) => {}
                    (Some(h), committed) => {
                        let epoch = h.epoch.load(Ordering::Acquire);
                        if epoch != 0 && committed != Some((me, epoch)) {
                            nudge.push(h.clone());
                        }
                    }
                }
            }
        }
        for h in nudge {
            let _ = h.tx.try_send(Input::Reconcile);
        }
        if !restore.is_empty() {
            let mut registry = self.shared.registry();
            for id in restore {
                if registry.by_id.contains_key(&id) {
                    continue;
                }
                self.spawn_restore(&mut registry, id, None);
            }
        }
    }

    /// Every SA in the state and every task, a page at a time (the state's lock is let go
    /// between pages, so `apply` never waits for more than one page).
    fn reconcile_all(&mut self) {
        let mut start = SaId(0);
        loop {
            let page: Vec<SaId> = {
                let state = self.shared.node.state.read();
                state
                    .sas_from(start)
                    .take(RECONCILE_PAGE)
                    .map(|sa| sa.id)
                    .collect()
            };
            self.reconcile_ids(&page);
            match page.last() {
                Some(last) if page.len() == RECONCILE_PAGE => start = SaId(last.0 + 1),
                _ => break,
            }
            if start.0 == 0 {
                break;
            }
        }
        // Tasks whose SA is no longer in the state at all.
        let running: Vec<SaId> = self.shared.registry().by_id.keys().copied().collect();
        for page in running.chunks(RECONCILE_PAGE) {
            self.reconcile_ids(page);
        }
    }
}

/// Runs the gateway until `shutdown`: IKE on the cluster sockets of this node's data plane.
pub async fn run(
    node: Arc<Node>,
    socket: Arc<dyn IkeSocket>,
    datagrams: IkeReceiver,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let result = serve(node, socket, datagrams, shutdown).await;
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "the IKE gateway stopped");
    }
    result
}

async fn serve(
    node: Arc<Node>,
    socket: Arc<dyn IkeSocket>,
    mut datagrams: IkeReceiver,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let settings = node
        .config
        .ike
        .clone()
        .context("the IKE gateway runs only with an [ike] section")?;
    let mut config = settings.engine_config().map_err(anyhow::Error::msg)?;
    config.child_policy = Some(Arc::new(selector_guard::SelectorGuard::new(
        node.state.clone(),
    )));
    let config = Arc::new(config);
    anyhow::ensure!(
        node.keyring.is_some(),
        "[ike] needs cluster_key_file: the IKE state is sealed with the cluster key before it is committed"
    );
    let tun_addresses: Vec<_> = node
        .config
        .dataplane
        .tun
        .addresses
        .iter()
        .filter_map(|p| crate::config::parse_prefix(p).ok().map(|(a, _)| a))
        .collect();
    let pool = settings
        .pool_prefix()
        .map_err(anyhow::Error::msg)?
        .map(|prefix| Pool::new(prefix, settings.excluded_addresses(&tun_addresses)));
    // Node-local: a cookie retry carries the same initiator SPI, so it reaches the same slot
    // owner that issued the cookie. The router rotates it (RFC 7296 §2.6).
    let mut cookie = zeroize::Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(cookie.as_mut());
    let router = Router::new(
        Endpoint::new(config.clone(), Secret::from_slice(cookie.as_ref())),
        settings.router_limits(),
        now_ms(),
    )
    .map_err(|e| anyhow::anyhow!("[ike] limits: {e}"))?;
    let shared = Arc::new(Shared {
        socket,
        config: config.clone(),
        pool,
        dns: settings.dns.clone(),
        initial_lease: node.config.ownership.move_lease,
        registry: Mutex::new(Registry {
            router,
            tasks: HashMap::new(),
            by_id: HashMap::new(),
            next_task: 0,
        }),
        ports: Mutex::new(HashMap::new()),
        natt_port: node.config.dataplane.natt_port.unwrap_or(4500),
        shutdown: shutdown.clone(),
        node: node.clone(),
    });
    let mut gateway = Gateway {
        shared,
        inits: VecDeque::new(),
        cursor: 0,
        changed: Vec::new(),
    };
    tracing::info!(
        local_id = %settings.local_id,
        pool = ?settings.pool,
        "IKE gateway running"
    );
    let mut applied = node.state.applied_index();
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dirty = true;
    let mut was_fenced = true;
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
            d = datagrams.recv() => match d {
                // A datagram for an established SA goes to its task here, at once; an
                // IKE_SA_INIT only joins the queue, screened a batch at a time below, so a
                // flood of them delays the others by one batch at most.
                Some(d) => {
                    gateway.dispatch(d);
                    for _ in 1..DISPATCH_BATCH {
                        match datagrams.try_recv() {
                            Ok(d) => gateway.dispatch(d),
                            Err(_) => break,
                        }
                    }
                }
                None => break,
            },
            changed = applied.changed() => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            _ = std::future::ready(()), if !gateway.inits.is_empty() => {
                gateway.screen_inits();
            }
            _ = tick.tick() => {
                gateway.on_tick();
                // Coming back from a fence does not move the applied index: look again then.
                let fenced = gateway.shared.node.fence_reason().is_some();
                if dirty || (was_fenced && !fenced) {
                    // Restores are skipped while fenced: coming back, look at every SA.
                    gateway.reconcile(was_fenced && !fenced);
                    dirty = false;
                }
                was_fenced = fenced;
            }
        }
    }
    tracing::info!("IKE gateway stopped");
    Ok(())
}
