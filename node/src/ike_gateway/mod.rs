//! The IKE gateway: the sans-IO `evpc-ike` engine on the cluster address, wired to the cluster —
//! commit before respond, the replicated address pool, takeover of SAs from the committed state.
//!
//! # Data flow
//!
//! ```text
//!  UDP 500 / 4500 on the cluster address (the data plane's sockets; every node sees every packet)
//!        │ IkeReceiver (IkeDatagram: port, local, remote, message without the non-ESP marker)
//!        ▼
//!  dispatcher (one task)        wire::route(message)
//!    ├─ NewSa{spi_i}:  half-open SA for (remote, spi_i) here? ─► its task
//!    │                 else: does this node own slot_for_initiator_spi(spi_i), unfenced?
//!    │                       no ─► silence (another node answers)
//!    │                       yes ─► Endpoint::accept ─► new task (half-open, node-local)
//!    ├─ Existing{spi}: a task routes this SPI here? ─► its task
//!    │                 else: does this node own the SA in the committed state, and is the
//!    │                       SPI its current generation's? ─► start a task that restores it
//!    │                       (the engine answers a byte-identical retransmission from the
//!    │                       peer's address with the committed response)
//!    │                 else silence (another node's SA, or nobody's: no task, no answer)
//!    └─ state changed (applied index): reconcile, at most every 50 ms, the SAs the change
//!       feed lists ─► restore the SAs this node now owns (eagerly), tell tasks whose SA
//!       moved, was deleted or changed epoch
//!
//!  one task per IKE SA (actor.rs), one call into the engine at a time:
//!    engine.handle_datagram / handle_timeout / assign_inner_address ─► Outcome
//!      1. outcome.send                          ─► socket at once (retransmissions, half-open)
//!      2. outcome.commit: snapshot ─► mapping ─► exchange::commit_new_sa (IKE_AUTH done:
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
pub mod lab;
#[doc(hidden)]
pub mod machine;
pub mod mapping;
pub mod pool;
pub mod selector_guard;
pub mod settings;

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use evpc_dataplane::ike::{IkeDatagram, IkePort, IkeReceiver, IkeSocket};
use evpc_ike::wire::{self, Route};
use evpc_ike::{Accepted, Config, Datagram, Endpoint, Random, Secret};
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
    id: SaId,
    tx: mpsc::Sender<Input>,
    /// The epoch the task acts in; 0 while the SA is half-open (not committed).
    epoch: AtomicU64,
}

/// Which task handles which SPI.
#[derive(Debug, Default)]
struct Registry {
    by_spi: HashMap<u64, Arc<Handle>>,
    by_id: HashMap<SaId, Arc<Handle>>,
    /// Half-open SAs by (peer address, initiator SPI), for retransmitted IKE_SA_INITs.
    half_open: HashMap<(SocketAddr, u64), Arc<Handle>>,
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
            tracing::warn!(to = %d.remote, %error, "sending an IKE message");
        }
    }
}

fn random() -> impl Random {
    |buf: &mut [u8]| rand::rng().fill_bytes(buf)
}

/// The dispatcher's side.
struct Gateway {
    shared: Arc<Shared>,
    endpoint: Endpoint,
    /// The change feed's cursor: placement changes up to here were reconciled.
    cursor: u64,
    /// Scratch space for the feed's changes.
    changed: Vec<SaChange>,
}

impl Gateway {
    fn me(&self) -> u64 {
        self.shared.node.id
    }

    fn spawn(
        &self,
        id: SaId,
        spis: BTreeSet<u64>,
        half_open: Option<(SocketAddr, u64)>,
        start: Start,
    ) {
        let (tx, rx) = mpsc::channel(SA_QUEUE);
        let handle = Arc::new(Handle {
            id,
            tx,
            epoch: AtomicU64::new(0),
        });
        {
            let mut registry = self.shared.registry();
            registry.by_id.insert(id, handle.clone());
            for spi in &spis {
                registry.by_spi.insert(*spi, handle.clone());
            }
            if let Some(key) = half_open {
                registry.half_open.insert(key, handle.clone());
            }
        }
        let actor = Actor::new(self.shared.clone(), handle, rx, spis);
        tokio::spawn(actor.run(start));
    }

    fn deliver(handle: &Handle, d: IkeDatagram) {
        if handle.tx.try_send(Input::Datagram(d)).is_err() {
            tracing::debug!(sa = %handle.id, "SA queue full; datagram dropped");
        }
    }

    fn dispatch(&mut self, d: IkeDatagram) {
        self.shared
            .ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(d.local.port(), d.port);
        match wire::route(&d.message) {
            Route::NewSa { initiator_spi } => self.new_sa(initiator_spi, d),
            Route::Existing { local_spi } => self.existing(local_spi, d),
            Route::Drop => {}
        }
    }

    fn new_sa(&mut self, initiator_spi: u64, d: IkeDatagram) {
        let (known, half_open) = {
            let registry = self.shared.registry();
            (
                registry.half_open.get(&(d.remote, initiator_spi)).cloned(),
                registry.half_open.len(),
            )
        };
        if let Some(handle) = known {
            Self::deliver(&handle, d);
            return;
        }
        let slot = slot_for_initiator_spi(initiator_spi);
        let owner = self.shared.node.state.read().slots().owner(slot);
        if owner != Some(self.me()) || self.shared.node.fence_reason().is_some() {
            return;
        }
        let mut rng = random();
        match self
            .endpoint
            .accept(now_ms(), &mut rng, d.local, d.remote, &d.message, half_open)
        {
            Accepted::NewSa(sa, outcome) => {
                let Some(local_spi) = sa.local_spi() else {
                    return;
                };
                let spis = sa.local_spis().into_iter().collect();
                let key = (d.remote, initiator_spi);
                self.spawn(
                    SaId(local_spi),
                    spis,
                    Some(key),
                    Start::HalfOpen { sa, outcome, key },
                );
            }
            Accepted::Reply(reply, why) => {
                tracing::debug!(from = %d.remote, %why, "IKE_SA_INIT answered statelessly");
                self.shared.send(&reply);
            }
            Accepted::Dropped(why) => {
                tracing::debug!(from = %d.remote, %why, "IKE_SA_INIT dropped");
            }
        }
    }

    fn existing(&mut self, local_spi: u64, d: IkeDatagram) {
        let handle = self.shared.registry().by_spi.get(&local_spi).cloned();
        if let Some(handle) = handle {
            Self::deliver(&handle, d);
            return;
        }
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
        let restoring = self.shared.registry().by_id.get(&id).cloned();
        if let Some(handle) = restoring {
            Self::deliver(&handle, d);
            return;
        }
        // The restored engine answers a retransmission from its committed response — only a
        // byte-identical request from the peer's address (`evpc_ike`), so nothing is sent
        // where a forger chooses. (Answering from the replicated record here, before the
        // restore, saved a millisecond and trusted the message ID alone.)
        self.spawn(id, BTreeSet::new(), None, Start::Restore { first: Some(d) });
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
        for id in restore {
            self.spawn(id, BTreeSet::new(), None, Start::Restore { first: None });
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
    // owner that issued the cookie.
    let mut cookie = zeroize::Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(cookie.as_mut());
    let shared = Arc::new(Shared {
        socket,
        config: config.clone(),
        pool,
        dns: settings.dns.clone(),
        initial_lease: node.config.ownership.move_lease,
        registry: Mutex::new(Registry::default()),
        ports: Mutex::new(HashMap::new()),
        natt_port: node.config.dataplane.natt_port.unwrap_or(4500),
        shutdown: shutdown.clone(),
        node: node.clone(),
    });
    let mut gateway = Gateway {
        shared,
        endpoint: Endpoint::new(config, Secret::from_slice(cookie.as_ref())),
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
                Some(d) => gateway.dispatch(d),
                None => break,
            },
            changed = applied.changed() => {
                if changed.is_err() {
                    break;
                }
                dirty = true;
            }
            _ = tick.tick() => {
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
