//! The configuration the workers run, and how a reload replaces it.
//!
//! A [`Topology`] is one configuration as the main thread built it: the
//! settings, the routing table, and every server's shared health. It is
//! immutable; a reload (SIGHUP, `memrelay reload`) builds a new one, reusing
//! the health (down state, missed keys) of every server it keeps, by name.
//! Each worker thread turns it into its own `proxy::Worker` (its connection
//! pools, reused for the servers that stay) and swaps it in.
//!
//! The swap is a barrier in two phases, so that the reload is one point in
//! the order of requests, the same on every thread:
//! 1. *prepare*: every worker builds its new `Worker`, then stops starting
//!    new requests (sessions keep reading replies, and requests already
//!    started keep going), and says so;
//! 2. *commit*: once every worker is paused, each installs its new `Worker`
//!    and resumes. Requests started before use the old configuration to
//!    the end (their `Slot` holds its `Worker`); requests after, the new.
//!
//! Without the barrier, a thread still on the old configuration could write
//! a key to its old primary after another thread had written it, through
//! the new configuration, to its new one: the new primary would then serve
//! the older value. The pause lasts two messages between threads.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::backend::connect::Dial;
use crate::backend::probe::ProbeTimeouts;
use crate::config::{Config, ConfigError, Tier};
use crate::fleet::epoch::Stage;
use crate::ha::replica::{FlushGate, Replica};
use crate::ha::resync::{Node, Request, Requests, Resync};
use crate::ha::transition::Transition;
use crate::ha::upkeep::Upkeep;
use crate::router::{Moves, Router};
use crate::stats::{ServerEntry, StatsRegistry};

/// One configuration, as the workers run it.
#[derive(Debug)]
pub(crate) struct Topology {
    /// 1 at start, one more at each reload.
    pub generation: u64,
    pub config: Arc<Config>,
    pub router: Router,
    /// Every server's health, in `config.servers()` order.
    pub health: Vec<Arc<Replica>>,
    /// A fleet reload under way: the routing the other members may use.
    pub transition: Option<Arc<Transition>>,
}

/// `memrelay reload` from a client: the main thread reloads and answers
/// through `reply` (the reason, if the new configuration was refused).
#[derive(Debug)]
pub(crate) struct ReloadRequest {
    pub reply: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Where workers send reload requests (to the main thread).
pub(crate) type ReloadRequests = tokio::sync::mpsc::UnboundedSender<ReloadRequest>;

/// What a worker thread tells the main thread during and after a swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WorkerEvent {
    /// Phase one done: the new configuration is built and the worker
    /// starts no new request.
    Prepared { worker: usize, generation: u64 },
    /// Phase two done, or the worker started: it runs this configuration.
    Installed { worker: usize, generation: u64 },
    /// The last request of an older configuration finished on one worker:
    /// nothing there uses it any more (its dropped connections close).
    Retired { generation: u64 },
}

/// Where workers send those events.
pub(crate) type WorkerEvents = tokio::sync::mpsc::UnboundedSender<WorkerEvent>;

/// How long the main thread waits for every worker at each phase of a swap.
/// A worker answers as soon as its thread gets to run; this bound only
/// matters if one is stuck, and then the swap goes on without it (logged).
const PHASE_DEADLINE: Duration = Duration::from_secs(2);

/// How often a member whose fleet reload waits for peers says which.
const RELOAD_WAIT_LOG: Duration = Duration::from_secs(10);

/// How often a member of a fleet with no fleet reload under way looks at
/// its peers' stages (`Control::catch_up`): as often as they tell them
/// (every ping, `fleet::link`).
pub(crate) const CATCH_UP_EVERY: Duration = Duration::from_millis(500);

/// How long after a member finished a fleet reload a peer may still be
/// heard aware of it, by a report it sent before it switched: each peer's
/// stage comes on two connections, and the older report (the answer to
/// a dial's `routing`) is read within that dial, well within this.
const CROSSED_REPORTS: Duration = Duration::from_secs(5);

/// One configured server as the main thread keeps it.
#[derive(Debug)]
struct Running {
    name: String,
    addr: SocketAddr,
    role: Tier,
    health: Arc<Replica>,
    /// How its prober reaches it (a reload reads the TLS files again).
    dial: watch::Sender<Dial>,
    /// Its prober, aborted when a reload removes the server (or changes
    /// its address, and starts another).
    prober: JoinHandle<()>,
}

impl Running {
    /// A server's entry, its prober started.
    fn start(
        name: String,
        dial: Dial,
        role: Tier,
        health: Arc<Replica>,
        timeouts: &watch::Sender<ProbeTimeouts>,
        resync: &Requests,
    ) -> Running {
        let addr = dial.addr;
        let (dial, dial_rx) = watch::channel(dial);
        let prober = tokio::task::spawn_local(crate::backend::probe::probe_loop(
            health.live().clone(),
            dial_rx,
            timeouts.subscribe(),
            Upkeep::new(health.clone(), resync.clone()),
        ));
        Running {
            name,
            addr,
            role,
            health,
            dial,
            prober,
        }
    }
}

/// The ends of the channels a worker thread needs.
#[derive(Debug, Clone)]
pub(crate) struct WorkerLinks {
    pub topology: watch::Receiver<Arc<Topology>>,
    pub commit: watch::Receiver<u64>,
    pub events: WorkerEvents,
    pub reload: ReloadRequests,
    pub resync: Requests,
}

/// The main thread's side: the configuration running now, each server's
/// prober, and reloads.
pub(crate) struct Control {
    cfg: Arc<Config>,
    generation: u64,
    router: Router,
    servers: Vec<Running>,
    registry: Arc<StatsRegistry>,
    workers: usize,
    topology: watch::Sender<Arc<Topology>>,
    commit: watch::Sender<u64>,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    /// Per generation, how many worker threads still run requests under it.
    live: BTreeMap<u64, usize>,
    probe_timeouts: watch::Sender<ProbeTimeouts>,
    resync: watch::Sender<Arc<Resync>>,
    resync_requests: Requests,
    /// Reads the configuration again (the file and the command line).
    reread: Reread,
    /// `--state-file`: the missed-key lists across restarts of memrelay.
    persist: Option<Arc<crate::ha::persist::Persist>>,
    /// `--peer-listen`: the other memrelays of the fleet, told of the keys
    /// servers missed.
    fleet: Option<Arc<crate::fleet::Fleet>>,
    /// Every server's health now, for the flush gates (`gate_flushes`).
    all_health: Arc<std::sync::RwLock<Vec<(Tier, Arc<Replica>)>>>,
    /// A fleet reload under way (`fleet::epoch`).
    reloading: Option<Reloading>,
    /// The stage the peers were last told.
    shown: Option<Stage>,
    /// A stage to tell the peers once the hand-off's other process is gone
    /// (`tend_reload`).
    untold: Option<Stage>,
    /// What `catch_up` watches for while no fleet reload is under way.
    catching_up: CatchUp,
    /// The missed-key lists went to a new memrelay (`hand_off_state`).
    handed_over: bool,
}

/// A fleet member's watch on its peers' stages between fleet reloads.
#[derive(Debug, Default)]
struct CatchUp {
    /// The fleet reload it last finished (from, to), and when: a peer
    /// heard aware of it within `CROSSED_REPORTS` is an older report
    /// (`epoch::catching_up`).
    finished: Option<((u64, u64), std::time::Instant)>,
    /// Since when it should join its peers' reload but has no routing of
    /// theirs it can rebuild (logged every `RELOAD_WAIT_LOG`).
    unbuilt: Option<std::time::Instant>,
    /// Since when peers that route by none of its routings were heard
    /// (`warn_if_apart`, logged every `RELOAD_WAIT_LOG`).
    apart: Option<std::time::Instant>,
}

/// Whether a condition seen since `since` (set now if it was not) has
/// lasted `RELOAD_WAIT_LOG` since it was first seen or last logged: a
/// condition that a moment resolves is not logged.
fn log_due(since: &mut Option<std::time::Instant>) -> bool {
    let now = std::time::Instant::now();
    let first = *since.get_or_insert(now);
    let due = now.duration_since(first) >= RELOAD_WAIT_LOG;
    if due {
        *since = Some(now);
    }
    due
}

/// Whether the servers a configuration adds are flushed before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Added {
    /// A reload adds them: they may hold copies from before, when they
    /// were not in the list.
    Flushed,
    /// A member joins its peers' reload: they are servers the fleet serves
    /// by, or ones a stage 1 flushed. As at start, it takes their copies
    /// to be no older than what it routes to them; flushed, the fleet
    /// would lose every key they hold.
    Kept,
}

/// A fleet reload under way: the configurations on either side, and this
/// member's stage. `servers` holds the servers of both.
#[derive(Debug)]
struct Reloading {
    /// The configuration before (routing X).
    from: Arc<Config>,
    /// The configuration read (routing Y).
    to: Arc<Config>,
    /// The stage the workers run; the peers are told it once the requests
    /// started before it are done.
    stage: Stage,
    /// When this member last logged that it waits for its peers.
    waited: std::time::Instant,
}

/// Reads the configuration again for a reload. It reads files and
/// resolves server names, so it runs on a blocking thread: the probers,
/// resyncs and `/metrics` share the main thread and must not wait on DNS.
pub(crate) type Reread = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("generation", &self.generation)
            .field("servers", &self.servers)
            .finish_non_exhaustive()
    }
}

/// Every configured server's entry at start, each with a fresh replica
/// state and its prober started.
fn start_servers(
    cfg: &Config,
    probe_timeouts: &watch::Sender<ProbeTimeouts>,
    resync_requests: &Requests,
) -> Vec<Running> {
    cfg.servers()
        .zip(cfg.roles())
        .map(|(s, role)| {
            let health = Arc::new(Replica::new(
                s.name.clone(),
                cfg.missed_keys_cap,
                cfg.threads,
            ));
            Running::start(
                s.name.clone(),
                Dial::to(s, cfg.server_tls.as_ref()),
                role,
                health,
                probe_timeouts,
                resync_requests,
            )
        })
        .collect()
}

impl Control {
    /// Generation 1: `cfg` as the process starts with it. Probers and the
    /// resync manager start on the current runtime (the main thread's).
    /// Returns the channels for the workers and for reload requests.
    /// `took_over`: the listening sockets came from a running memrelay
    /// (`--handoff`), which hands over its missed-key lists too.
    pub(crate) fn start(
        cfg: Config,
        registry: Arc<StatsRegistry>,
        reread: Reread,
        took_over: bool,
    ) -> (Control, WorkerLinks, mpsc::UnboundedReceiver<ReloadRequest>) {
        let cfg = Arc::new(cfg);
        let router = Router::new(&cfg);
        let (resync_requests, resync_rx) = mpsc::unbounded_channel();
        let (probe_timeouts, _) = watch::channel(probe_timeouts(&cfg));
        let servers = start_servers(&cfg, &probe_timeouts, &resync_requests);
        let health: Vec<Arc<Replica>> = servers.iter().map(|s| s.health.clone()).collect();
        let all_health = Arc::new(std::sync::RwLock::new(
            servers.iter().map(|s| (s.role, s.health.clone())).collect(),
        ));
        for h in &health {
            gate_flushes(h, &all_health);
        }
        // Before any worker serves: what the servers missed while this
        // process was not running (or was another one).
        let persist = cfg.state_file.clone().map(|path| {
            let p = crate::ha::persist::Persist::new(path);
            p.start(&health, took_over);
            p
        });
        let fleet = cfg.fleet.as_ref().map(|f| {
            let vouching = persist.as_ref().is_some_and(|p| p.awaits_vouching());
            join_fleet(f, &cfg, &health, &registry, vouching)
        });
        if let Some(p) = &persist {
            settle_with_fleet(p, fleet.as_ref(), &cfg, &health);
        }
        registry.set_servers(entries(&servers, &cfg));
        registry.set_config(&cfg);
        let (resync, resync_current) = watch::channel(Arc::new(new_resync(&cfg, &router, &health)));
        tokio::task::spawn_local(crate::ha::resync::serve(
            resync_current,
            resync_rx,
            resync_requests.clone(),
            persist.as_ref().map(|p| p.shared()),
        ));
        let (topology, topology_rx) = watch::channel(Arc::new(Topology {
            generation: 1,
            config: cfg.clone(),
            router: router.clone(),
            health,
            transition: None,
        }));
        if let Some(p) = &persist {
            tokio::task::spawn_local(keep_state(p.clone(), topology.subscribe()));
        }
        let (commit, commit_rx) = watch::channel(1);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        let workers = cfg.threads;
        let mut control = Control {
            cfg,
            generation: 1,
            router,
            servers,
            registry,
            workers,
            topology,
            commit,
            events,
            live: BTreeMap::from([(1, workers)]),
            probe_timeouts,
            resync,
            resync_requests: resync_requests.clone(),
            reread,
            persist,
            fleet,
            all_health,
            reloading: None,
            shown: None,
            untold: None,
            catching_up: CatchUp::default(),
            handed_over: false,
        };
        let links = WorkerLinks {
            topology: topology_rx,
            commit: commit_rx,
            events: events_tx,
            reload: reload_tx,
            resync: resync_requests,
        };
        control.join_fleet_reload();
        (control, links, reload_rx)
    }

    /// Waits (at most `PHASE_DEADLINE`) until every worker thread runs
    /// the configuration it started with. A swap sent before a worker
    /// first looks would be that worker's first configuration: it would
    /// answer neither phase of it, and never run (nor retire) the one
    /// before, so a fleet reload, which steps only once older
    /// configurations are retired, would wait for it for good.
    pub(crate) async fn workers_started(&mut self) {
        let started = self.wait_for(self.generation, Phase::Installed).await;
        if started < self.workers {
            tracing::warn!(
                started,
                workers = self.workers,
                "not every worker started in time; reloads may wait for it"
            );
        }
    }

    /// The configuration running now.
    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.cfg
    }

    /// Waits (at most `within`) until the prober has read every reachable
    /// server's identity: the CAS tokens handed out from the first request
    /// on then carry the server process's stamp (`ha::cas`).
    pub(crate) async fn identified(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline
            && !self.servers.iter().all(|s| s.health.identified())
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn health(&self) -> Vec<Arc<Replica>> {
        self.servers.iter().map(|s| s.health.clone()).collect()
    }

    /// Whether the missed-key lists went to a new memrelay: this one then
    /// takes no reload step of its own (the new one does).
    pub(crate) fn handed_over(&self) -> bool {
        self.handed_over
    }

    /// The listening sockets went to a new memrelay: so do the missed-key
    /// lists, from now on through the hand-off file. Done once.
    pub(crate) fn hand_off_state(&mut self) {
        if std::mem::replace(&mut self.handed_over, true) {
            return;
        }
        // Where the lists reach the new process (it takes this one's
        // records, or asks the peers), it deletes their keys and this one
        // stops at once, before the new one serves. Otherwise this one is
        // the only one that knows them, and goes on.
        let handed = |on: bool| {
            for r in self.health() {
                r.handed_off.store(on, Ordering::Release);
            }
        };
        handed(self.persist.is_some() || self.fleet.is_some());
        if let Some(f) = &self.fleet {
            f.hand_off();
        }
        if let Some(p) = &self.persist {
            if !p.hand_off(&self.health()) && self.fleet.is_none() {
                handed(false);
            }
            // The resyncs under way stop at their next batch, and wait
            // (with any new one) for a process that no longer shares its
            // servers: this one never will again.
            self.resync.borrow().cancel();
        }
    }

    /// The process is exiting after its drain: what servers still missed
    /// is written for the next one.
    pub(crate) fn save_state(&self) {
        if let Some(p) = &self.persist {
            p.save(&self.health());
        }
    }

    /// Reads the configuration again and, if it is valid, makes every
    /// worker run it. Refused: the running configuration is kept, and the
    /// reason logged (one line) and returned. `trigger` says who asked.
    ///
    /// In a fleet, a configuration that changes where keys go starts a
    /// fleet reload (`fleet::epoch`): this member serves by the old routing
    /// until every peer has the new one, then the fleet switches in step.
    pub(crate) async fn reload(&mut self, trigger: &str) -> Result<(), String> {
        let cfg = self.read_again(trigger).await?;
        if let Some(r) = &self.reloading {
            if cfg.routing_fingerprint() == r.to.routing_fingerprint() {
                tracing::info!(
                    trigger,
                    stage = r.stage.number(),
                    "fleet reload to this configuration's routing already under way; \
                     other settings changed since it began apply at a reload once it is done"
                );
                return Ok(());
            }
            let why = format!(
                "a fleet reload is under way (stage {}): reload again once every member has finished it",
                r.stage.number()
            );
            tracing::error!(trigger, error = %why, "reload refused; the running configuration is kept");
            self.registry
                .reload_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(why);
        }
        if self.fleet.is_some() && Router::new(&cfg) != self.router {
            self.begin_fleet_reload(Arc::new(cfg), trigger).await;
            return Ok(());
        }
        let cfg = Arc::new(cfg);
        let moves = self.moves_to(&cfg);
        self.install(cfg.clone(), None, &moves, Added::Flushed)
            .await;
        self.registry.reloads.fetch_add(1, Ordering::Relaxed);
        self.log_reload(trigger, &cfg, &moves, "configuration reloaded");
        Ok(())
    }

    /// Which servers gain and lose keys going from the running routing to
    /// `cfg`'s.
    fn moves_to(&self, cfg: &Config) -> Moves {
        let old_names: Vec<String> = self.cfg.servers().map(|s| s.name.clone()).collect();
        let new_names: Vec<String> = cfg.servers().map(|s| s.name.clone()).collect();
        crate::router::moves(&self.router, &old_names, &Router::new(cfg), &new_names)
    }

    /// Logs a reload to `cfg` (the new list, also while a fleet reload
    /// still serves by the old one).
    fn log_reload(&self, trigger: &str, cfg: &Config, moves: &Moves, what: &'static str) {
        tracing::info!(
            trigger,
            generation = self.generation,
            primaries = %names(&cfg.primaries),
            backups = %names(&cfg.backups),
            hash = %cfg.hash,
            keys_moved = %format!("{:.1}%", moves.primaries_moved * 100.0),
            "{what}"
        );
    }

    /// Stage 1 of a fleet reload: `to`'s settings now, its servers running
    /// (those it gives keys they may hold stale copies of flushed, before
    /// any member serves by it), the running routing kept, and every key
    /// changed recorded as missed where `to` would put it.
    async fn begin_fleet_reload(&mut self, to: Arc<Config>, trigger: &str) {
        let from = self.cfg.clone();
        let moves = self.moves_to(&to);
        let stage = Stage::Aware {
            from: from.routing_fingerprint(),
            to: to.routing_fingerprint(),
        };
        let (serving, other) = stage_configs(stage, &from, &to);
        self.install(serving, other, &moves, Added::Flushed).await;
        self.registry.reloads.fetch_add(1, Ordering::Relaxed);
        self.log_reload(trigger, &to, &moves, "configuration read; fleet reload stage 1: serving by the old routing until every member has the new one");
        self.reloading = Some(Reloading {
            from,
            to,
            stage,
            waited: std::time::Instant::now(),
        });
    }

    /// Whether the other process of a hand-off still serves: it runs the
    /// stage it had, which the peers still hear from it, so this one
    /// neither tells its own nor takes a step until it is gone (the two
    /// could otherwise be two stages apart).
    fn sharing(&self) -> bool {
        self.persist.as_ref().is_some_and(|p| *p.shared().borrow())
    }

    /// Tells the peers this member's stage, with the routings it serves
    /// and records by, if it changed; once the hand-off's other process
    /// is gone, if there is one.
    fn tell(&mut self, stage: Stage) {
        let Some(fleet) = &self.fleet else {
            return;
        };
        if self.sharing() {
            self.untold = Some(stage);
            return;
        }
        self.untold = None;
        if self.shown == Some(stage) {
            return;
        }
        let routings = match (&self.reloading, stage) {
            (Some(r), Stage::Aware { .. } | Stage::Switched { .. }) => {
                r.from.routing_lines() + &r.to.routing_lines()
            }
            _ => self.cfg.routing_lines(),
        };
        fleet.show(stage, routings);
        self.shown = Some(stage);
    }

    /// At start, before any worker serves: a member that finds its peers
    /// in a fleet reload joins it at their stage, and one that finds them
    /// serving another routing starts a reload to its own (its peers
    /// follow once each is reloaded to it). The routing it does not have
    /// is rebuilt from a peer's lines. One that reaches no peer serves by
    /// its own file, and joins a reload to it that its peers wait for
    /// once it reaches them (`catch_up`).
    fn join_fleet_reload(&mut self) {
        let Some(fleet) = self.fleet.clone() else {
            return;
        };
        let routing = self.cfg.routing_fingerprint();
        let heard = fleet.heard();
        if !heard.is_empty() && heard.iter().all(Option::is_none) {
            tracing::info!("fleet: reached no peer at start: serving by this configuration (it joins a fleet reload to it that waits for it once it reaches them)");
        }
        let joins = crate::fleet::epoch::joining(routing, &heard);
        if let Stage::Steady { .. } = joins {
            return self.tell(joins);
        }
        let Some((from_cfg, to_cfg)) = self.reload_configs(&fleet, joins) else {
            tracing::error!(stage = ?joins, "fleet: the peers route keys otherwise than this configuration, and gave no routing this member can rebuild; serving by its own");
            return self.tell(Stage::Steady { routing });
        };
        let (serving, other) = stage_configs(joins, &from_cfg, &to_cfg);
        // No flush: a member assumes at start that servers hold no copies
        // older than what it routes to them.
        let _ = self.replace_servers(
            &serving,
            other.as_deref(),
            &Moves::default(),
            false,
            Added::Kept,
        );
        let health = self.health_of(&serving);
        let router = Router::new(&serving);
        self.topology.send_replace(Arc::new(Topology {
            generation: self.generation,
            config: serving.clone(),
            router: router.clone(),
            health: health.clone(),
            transition: other.map(|o| self.transition_to(&o)),
        }));
        self.resync
            .send_replace(Arc::new(new_resync(&serving, &router, &health)));
        self.registry.set_servers(entries(&self.servers, &serving));
        self.cfg = serving;
        self.router = router;
        self.reloading = Some(Reloading {
            from: from_cfg,
            to: to_cfg,
            stage: joins,
            waited: std::time::Instant::now(),
        });
        tracing::info!(
            stage = joins.number(),
            "fleet: joined the fleet's reload at its stage"
        );
        self.tell(joins);
    }

    /// The configurations either side of the fleet reload `stage` is in:
    /// the running one where its routing is one of them, else rebuilt from
    /// a peer's lines (`Fleet::routing_of`), reaching the servers this one
    /// also names at its own addresses. None if no peer gave lines it can
    /// rebuild (or `stage` is steady). Warns if the reload is to another
    /// routing than the running one.
    fn reload_configs(
        &self,
        fleet: &crate::fleet::Fleet,
        stage: Stage,
    ) -> Option<(Arc<Config>, Arc<Config>)> {
        let (Stage::Aware { from, to } | Stage::Switched { from, to }) = stage else {
            return None;
        };
        let routing = self.cfg.routing_fingerprint();
        let config = |fp: u64| {
            if fp == routing {
                return Some(self.cfg.clone());
            }
            let lines = fleet.routing_of(fp)?;
            self.cfg.with_routing_lines(fp, &lines).map(Arc::new)
        };
        let configs = (config(from)?, config(to)?);
        if to != routing {
            tracing::warn!("fleet: joining the fleet's reload to a routing that is not this configuration's; reload this member to it");
        }
        Some(configs)
    }

    /// Whether this memrelay is a member of a fleet (`catch_up` has work
    /// whenever no fleet reload is under way).
    pub(crate) fn in_fleet(&self) -> bool {
        self.fleet.is_some()
    }

    /// While no fleet reload is under way (every `CATCH_UP_EVERY`): a
    /// member that its peers wait for in a reload to the routing it
    /// already serves joins it (`epoch::catching_up`), then goes on as any
    /// member in a reload (`tend_reload`), telling its stage once the
    /// requests started before it are done. Peers it is apart from are
    /// only named (`warn_if_apart`).
    pub(crate) async fn catch_up(&mut self) {
        let Some(fleet) = self.fleet.clone() else {
            return;
        };
        if self.reloading() || self.sharing() {
            return;
        }
        let routing = self.cfg.routing_fingerprint();
        let heard = fleet.heard();
        let finished = self
            .catching_up
            .finished
            .filter(|(_, at)| at.elapsed() < CROSSED_REPORTS)
            .map(|(reload, _)| reload);
        let Some(stage) = crate::fleet::epoch::catching_up(routing, &heard, finished) else {
            self.catching_up.unbuilt = None;
            self.warn_if_apart(&fleet, routing, &heard);
            return;
        };
        let Some((from, to)) = self.reload_configs(&fleet, stage) else {
            if log_due(&mut self.catching_up.unbuilt) {
                tracing::error!(stage = ?stage, "fleet: the peers wait for this member in a fleet reload, and gave no routing it can rebuild; serving by its own");
            }
            return;
        };
        let (serving, other) = stage_configs(stage, &from, &to);
        self.install(serving, other, &Moves::default(), Added::Kept)
            .await;
        self.reloading = Some(Reloading {
            from,
            to,
            stage,
            waited: std::time::Instant::now(),
        });
        self.catching_up = CatchUp::default();
        tracing::info!(
            generation = self.generation,
            stage = stage.number(),
            "fleet: joined the fleet's reload once its peers were reached"
        );
    }

    /// Warns, while it lasts, that peers were heard that serve and record
    /// by no routing of this member's: no fleet reload can bring them
    /// together (members given other files that reached no peer, or only
    /// each other, at start), and each may serve stale what the other
    /// writes. A member not yet reloaded while others are in a reload
    /// from its routing is not apart.
    fn warn_if_apart(
        &mut self,
        fleet: &crate::fleet::Fleet,
        routing: u64,
        heard: &[Option<Stage>],
    ) {
        let apart = |h: &Option<Stage>| h.is_some_and(|s| !s.routes_by(routing));
        if !heard.iter().any(apart) {
            self.catching_up.apart = None;
            return;
        }
        if log_due(&mut self.catching_up.apart) {
            let peers: Vec<&str> = fleet
                .peer_names()
                .zip(heard)
                .filter(|(_, h)| apart(h))
                .map(|(n, _)| n)
                .collect();
            tracing::warn!(peers = %peers.join(","), "fleet: these peers route keys by another configuration than this member, with no fleet reload that joins the two: reload the members of one side to the other side's file (the other side joins that reload)");
        }
    }

    /// Whether a fleet reload is under way, or a stage is still to be
    /// told (`tend_reload` has work).
    pub(crate) fn reloading(&self) -> bool {
        self.reloading.is_some() || self.untold.is_some()
    }

    /// A fleet reload's next step, when the fleet allows it: tells the
    /// peers this member's stage once the requests started before it are
    /// done, then switches to the new routing (stage 2) or stops
    /// recording for the old one (done) once every peer has caught up.
    pub(crate) async fn tend_reload(&mut self) {
        let Some(fleet) = self.fleet.clone() else {
            return;
        };
        self.take_events();
        if self.sharing() {
            return;
        }
        if let Some(stage) = self.untold {
            self.tell(stage);
        }
        let Some(r) = self.reloading.as_mut() else {
            return;
        };
        if self.live.keys().any(|&g| g < self.generation) {
            return;
        }
        let stage = r.stage;
        self.tell(stage);
        let Some(r) = self.reloading.as_mut() else {
            return;
        };
        let heard = fleet.heard();
        let Some(next) = crate::fleet::epoch::next(r.stage, &heard) else {
            if let Stage::Steady { .. } = r.stage {
                let done = (r.from.routing_fingerprint(), r.to.routing_fingerprint());
                self.catching_up.finished = Some((done, std::time::Instant::now()));
                self.reloading = None;
                fleet.figures().reloads_done.fetch_add(1, Ordering::Relaxed);
                tracing::info!("fleet reload done: every member serves by the new routing");
            } else if r.waited.elapsed() >= RELOAD_WAIT_LOG {
                r.waited = std::time::Instant::now();
                let behind: Vec<&str> = fleet
                    .peer_names()
                    .zip(&heard)
                    .filter(|(_, h)| crate::fleet::epoch::next(r.stage, &[**h]).is_none())
                    .map(|(n, _)| n)
                    .collect();
                tracing::warn!(stage = r.stage.number(), peers = %behind.join(","), "fleet reload waits for these peers to reach this stage");
            }
            return;
        };
        let (serving, other) = stage_configs(next, &r.from, &r.to);
        r.stage = next;
        r.waited = std::time::Instant::now();
        self.install(serving, other, &Moves::default(), Added::Flushed)
            .await;
        if let Stage::Switched { .. } = next {
            tracing::info!(
                generation = self.generation,
                "fleet reload stage 2: every member has the new routing; serving by it"
            );
        } else {
            tracing::info!(
                generation = self.generation,
                "fleet reload stage 3: no member serves by the old routing; its servers left"
            );
        }
    }

    /// Makes the workers run `cfg`, with `other`'s routing as a fleet
    /// reload's other one, once the servers `moves` says may hold stale
    /// copies (and those `added`, if so) are flushed. The servers of both
    /// stay running.
    async fn install(
        &mut self,
        cfg: Arc<Config>,
        other: Option<Arc<Config>>,
        moves: &Moves,
        added: Added,
    ) {
        let generation = self.generation + 1;
        self.take_events();
        let router = Router::new(&cfg);
        // Requests of configurations older than the running one may still
        // land copies of keys that moved away before it.
        let older_live = self.live.keys().any(|&g| g < self.generation);
        self.probe_timeouts.send_replace(probe_timeouts(&cfg));

        let flushes = self.replace_servers(&cfg, other.as_deref(), moves, older_live, added);
        let flushed = self.flush(&flushes, probe_timeouts(&cfg)).await;

        let health = self.health_of(&cfg);
        let transition = other.map(|o| self.transition_to(&o));
        let topology = Arc::new(Topology {
            generation,
            config: cfg.clone(),
            router: router.clone(),
            health: health.clone(),
            transition,
        });
        self.swap(topology).await;

        // Resyncs under the old routing stop, and start again under this
        // one (if no key changed servers, they go on: a reload that changes
        // nothing restarts nothing); servers just emptied are warmed from
        // the other tier.
        let resync = Arc::new(new_resync(&cfg, &router, &health));
        let old = self.resync.send_replace(resync);
        if !(moves.gains.is_empty() && moves.loses.is_empty() && flushed.is_empty())
            || router != self.router
        {
            old.cancel();
        }
        for server in flushed {
            let _ = self.resync_requests.send(Request::whole(server, true));
        }
        self.registry.set_servers(entries(&self.servers, &cfg));
        self.registry.set_config(&cfg);
        self.registry
            .max_conns
            .store(cfg.max_conns, Ordering::Relaxed);
        crate::privileges::raise_nofile(cfg.fds_needed());
        self.cfg = cfg;
        self.router = router;
        self.generation = generation;
    }

    /// A fleet reload's other routing, over the running servers' state.
    fn transition_to(&self, other: &Config) -> Arc<Transition> {
        Arc::new(Transition {
            other: Router::new(other),
            other_health: self.health_of(other),
        })
    }

    /// The running servers' state for `cfg`'s servers, in its order.
    fn health_of(&self, cfg: &Config) -> Vec<Arc<Replica>> {
        cfg.servers()
            .filter_map(|s| self.servers.iter().find(|r| r.name == s.name))
            .map(|r| r.health.clone())
            .collect()
    }

    /// The configuration read again, with what only a restart can change
    /// kept as it runs. Refused: counted and logged, and the reason.
    async fn read_again(&self, trigger: &str) -> Result<Config, String> {
        let reread = self.reread.clone();
        let read = tokio::task::spawn_blocking(move || reread().map_err(|e| e.to_string()))
            .await
            .unwrap_or_else(|e| Err(format!("memrelay: reading the configuration failed: {e}")));
        let new = match read {
            Ok(cfg) => cfg,
            Err(e) => {
                self.registry
                    .reload_failures
                    .fetch_add(1, Ordering::Relaxed);
                let why = e.strip_prefix("memrelay: ").unwrap_or(&e).to_string();
                tracing::error!(trigger, error = %why, "reload failed; the running configuration is kept");
                return Err(why);
            }
        };
        for w in &new.warnings {
            tracing::warn!("{w}");
        }
        let (cfg, ignored) = self.cfg.keep_restart_only(new);
        if !ignored.is_empty() {
            tracing::warn!(
                settings = %ignored.join(", "),
                "restart to apply: these settings changed but only take effect at a restart"
            );
        }
        Ok(cfg)
    }

    /// The running servers for `cfg`: those that stay keep their state
    /// (and their prober), the others are started or stopped. Returns the
    /// servers to flush before the new configuration runs, and why.
    fn replace_servers(
        &mut self,
        cfg: &Config,
        other: Option<&Config>,
        moves: &Moves,
        older_live: bool,
        added: Added,
    ) -> Vec<(Arc<Replica>, Dial, &'static str)> {
        let mut old: Vec<Option<Running>> = std::mem::take(&mut self.servers)
            .into_iter()
            .map(Some)
            .collect();
        let mut servers: Vec<Running> = Vec::with_capacity(cfg.servers().count());
        let mut flushes: Vec<(Arc<Replica>, Dial, &'static str)> = Vec::new();
        // `cfg`'s servers, then those only `other` has (a fleet reload's).
        let wanted = cfg.servers().zip(cfg.roles()).map(|(s, r)| (s, r, cfg));
        let others = other
            .into_iter()
            .flat_map(|o| o.servers().zip(o.roles()).map(move |(s, r)| (s, r, o)))
            .filter(|(s, _, _)| cfg.servers().all(|c| c.name != s.name));
        for (s, role, cfg) in wanted.chain(others) {
            let kept = old
                .iter_mut()
                .find(|r| r.as_ref().is_some_and(|r| r.name == s.name))
                .and_then(Option::take);
            let dial = Dial::to(s, cfg.server_tls.as_ref());
            let running = match kept {
                Some(r) if r.addr == s.addr => {
                    let moved_away = r.health.keys_moved_away.load(Ordering::Relaxed);
                    let loses = moves.loses.contains(&s.name);
                    let flush = moved_away && moves.gains.contains(&s.name);
                    if flush {
                        flushes.push((r.health.clone(), dial.clone(), FLUSH_RETURNING));
                    }
                    r.dial.send_replace(dial);
                    // A flush removes the copies of keys that moved away
                    // before, unless older requests may still write some.
                    let still = loses || (moved_away && (!flush || older_live));
                    r.health.keys_moved_away.store(still, Ordering::Relaxed);
                    Running { role, ..r }
                }
                Some(r) => {
                    r.prober.abort();
                    tracing::info!(server = %s.name, from = %r.addr, to = %s.addr, "server address changed");
                    flushes.push((r.health.clone(), dial.clone(), FLUSH_READDRESSED));
                    r.health.keys_moved_away.store(false, Ordering::Relaxed);
                    self.running(s.name.clone(), dial, role, r.health)
                }
                None => {
                    tracing::info!(server = %s.name, role = %role, "server added");
                    let health = Arc::new(Replica::new(
                        s.name.clone(),
                        cfg.missed_keys_cap,
                        cfg.threads,
                    ));
                    if let Some(p) = &self.persist {
                        p.watch(&health);
                    }
                    if let Some(f) = &self.fleet {
                        f.watch(fleet_name(s), &health);
                    }
                    if added == Added::Flushed {
                        flushes.push((health.clone(), dial.clone(), FLUSH_ADDED));
                    }
                    self.running(s.name.clone(), dial, role, health)
                }
            };
            servers.push(running);
        }
        for r in old.into_iter().flatten() {
            tracing::info!(server = %r.name, "server removed");
            r.prober.abort();
        }
        self.servers = servers;
        {
            let now: Vec<(Tier, Arc<Replica>)> = self
                .servers
                .iter()
                .map(|s| (s.role, s.health.clone()))
                .collect();
            for (_, h) in &now {
                gate_flushes(h, &self.all_health);
            }
            *self.all_health.write().unwrap_or_else(|p| p.into_inner()) = now;
        }
        flushes
    }

    /// A server's entry, its prober started.
    fn running(&self, name: String, dial: Dial, role: Tier, health: Arc<Replica>) -> Running {
        Running::start(
            name,
            dial,
            role,
            health,
            &self.probe_timeouts,
            &self.resync_requests,
        )
    }

    /// Empties servers before they are given keys they may hold stale
    /// copies of, all at once. One that cannot be flushed now serves no key
    /// until its prober has flushed it. Returns the servers' names.
    async fn flush(
        &self,
        flushes: &[(Arc<Replica>, Dial, &'static str)],
        t: ProbeTimeouts,
    ) -> Vec<String> {
        let tasks: Vec<_> = flushes
            .iter()
            .map(|(_, dial, _)| {
                tokio::task::spawn_local(crate::backend::probe::flush(dial.clone(), t))
            })
            .collect();
        let mut names = Vec::with_capacity(flushes.len());
        for ((health, _, why), task) in flushes.iter().zip(tasks) {
            if task.await.unwrap_or(false) {
                health.missed.flushes.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(server = %health.name, reason = why, "flushed");
            } else {
                health.flush_owed.store(true, Ordering::Relaxed);
                health.missed.record_all();
                tracing::warn!(server = %health.name, reason = why, "cannot flush it now: it serves nothing until it is flushed");
            }
            names.push(health.name.clone());
        }
        names
    }

    /// The two-phase swap (see the module comment).
    async fn swap(&mut self, topology: Arc<Topology>) {
        let generation = topology.generation;
        self.live.insert(generation, self.workers);
        self.topology.send_replace(topology);
        let prepared = self.wait_for(generation, Phase::Prepared).await;
        if prepared < self.workers {
            tracing::warn!(
                generation,
                paused = prepared,
                workers = self.workers,
                "not every worker paused in time; switching anyway"
            );
        }
        self.commit.send_replace(generation);
        let installed = self.wait_for(generation, Phase::Installed).await;
        if installed < self.workers {
            tracing::warn!(
                generation,
                installed,
                workers = self.workers,
                "not every worker took the configuration in time"
            );
        }
    }

    /// Counts the workers that report `phase` done for `generation`, until
    /// all have or `PHASE_DEADLINE` passes.
    async fn wait_for(&mut self, generation: u64, phase: Phase) -> usize {
        let deadline = tokio::time::Instant::now() + PHASE_DEADLINE;
        let mut seen = 0;
        while seen < self.workers {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => match (e, phase) {
                    (WorkerEvent::Prepared { generation: g, .. }, Phase::Prepared)
                    | (WorkerEvent::Installed { generation: g, .. }, Phase::Installed)
                        if g == generation =>
                    {
                        seen += 1
                    }
                    _ => self.note(e),
                },
                Ok(None) | Err(_) => break,
            }
        }
        seen
    }

    /// Takes in what the workers said since the last reload.
    fn take_events(&mut self) {
        while let Ok(e) = self.events.try_recv() {
            self.note(e);
        }
    }

    fn note(&mut self, e: WorkerEvent) {
        if let WorkerEvent::Retired { generation } = e {
            if let Some(n) = self.live.get_mut(&generation) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.live.remove(&generation);
                    tracing::debug!(
                        generation,
                        "configuration retired: its dropped connections close"
                    );
                }
            }
        }
    }
}

/// The phases of a swap, as the main thread waits for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prepared,
    Installed,
}

/// Why a reload flushes a server (logged).
const FLUSH_ADDED: &str =
    "added by a reload: it may hold copies from before, when it was not in the list";
const FLUSH_READDRESSED: &str = "its address changed: it may be another server, with old copies";
const FLUSH_RETURNING: &str =
    "keys that an earlier reload moved away from it come back: its copies may be stale";

/// A server whose missed-key list overflowed is flushed only while every
/// server of the other tiers is up (and not held for the fleet's word
/// after a crash, `MissedKeys::hold_unvouched`): it may hold the only live copy of keys
/// it is not stale for, whose other copies are there (a server of its own
/// tier holds other keys). A server of another tier that waits for its
/// own flush does not hold it back if its name sorts after this one's:
/// two that each waited for the other would both stay down for good
/// (installed once per server; a reload's new servers get theirs).
fn gate_flushes(health: &Arc<Replica>, all: &Arc<std::sync::RwLock<Vec<(Tier, Arc<Replica>)>>>) {
    let all = Arc::downgrade(all);
    let name = health.name.clone();
    let _ = health.flush_gate.set(FlushGate(Box::new(move || {
        let Some(all) = all.upgrade() else {
            return true;
        };
        let all = all.read().unwrap_or_else(|p| p.into_inner());
        let Some(tier) = all.iter().find(|(_, h)| h.name == name).map(|(t, _)| *t) else {
            return true;
        };
        all.iter()
            .filter(|(t, h)| *t != tier && h.name != name)
            .all(|(_, h)| {
                if h.missed.is_overflowed() {
                    h.name > name
                } else {
                    // A server held for the fleet's word after a crash
                    // may miss keys only this one holds now.
                    !h.is_down() && !h.missed.is_unvouched()
                }
            })
    })));
}

/// What a member at `stage` of the fleet reload from `from` to `to` serves
/// by (with `to`'s other settings), and the other routing it records moved
/// keys for (`ha::transition`): aware, the old routing and the new; switched,
/// the new and the old; done, the new alone.
fn stage_configs(
    stage: Stage,
    from: &Arc<Config>,
    to: &Arc<Config>,
) -> (Arc<Config>, Option<Arc<Config>>) {
    match stage {
        Stage::Aware { .. } => (
            Arc::new(to.as_ref().clone().with_routing_of(from)),
            Some(to.clone()),
        ),
        Stage::Switched { .. } => (to.clone(), Some(from.clone())),
        Stage::Steady { .. } => (to.clone(), None),
    }
}

/// The state file, once the fleet is joined: in a fleet, servers whose
/// own records the peers took are marked `learnt`; and after a crash,
/// servers marked `learnt` are left to what the peers said while joining.
fn settle_with_fleet(
    p: &crate::ha::persist::Persist,
    fleet: Option<&Arc<crate::fleet::Fleet>>,
    cfg: &Config,
    health: &[Arc<Replica>],
) {
    if fleet.is_some() {
        p.join_fleet();
    }
    let names: std::collections::HashMap<&str, &str> = cfg
        .servers()
        .zip(health)
        .map(|(s, h)| (h.name.as_str(), fleet_name(s)))
        .collect();
    let held = p.settle(health, |h| {
        use crate::ha::persist::Vouch;
        match fleet.zip(names.get(h.name.as_str())) {
            Some((f, name)) if f.vouches(name) => Vouch::Yes,
            Some((f, name)) if !f.peer_forgot_list(name) => Vouch::NotYet,
            _ => Vouch::Never,
        }
    });
    let mut waiting = Vec::new();
    for h in held {
        match (fleet, names.get(h.name.as_str())) {
            (Some(_), Some(name)) => waiting.push((h, name.to_string())),
            // Not reached: `Vouch::NotYet` needs both.
            _ => crate::ha::persist::Persist::end_hold(&h, false),
        }
    }
    if let Some(f) = fleet {
        vouch_later(Arc::downgrade(f), waiting);
    }
}

/// Ends each hold `Persist::settle` put on a server once the fleet vouches
/// for it (every peer reached since this process started), or after
/// `VOUCH_WAIT` without that (then the server is flushed before it serves).
/// Polled: this runs only after a crash, while a peer is out.
fn vouch_later(fleet: std::sync::Weak<crate::fleet::Fleet>, held: Vec<(Arc<Replica>, String)>) {
    if held.is_empty() {
        return;
    }
    let servers: Vec<Arc<Replica>> = held.iter().map(|(h, _)| h.clone()).collect();
    let mut held = held;
    let spawned = std::thread::Builder::new()
        .name("memrelay-vouch".into())
        .spawn(move || {
            let deadline = std::time::Instant::now() + crate::fleet::VOUCH_WAIT;
            while !held.is_empty() {
                // A fleet gone (the process exits) vouches for nothing.
                let fleet = fleet.upgrade();
                let late = fleet.is_none() || std::time::Instant::now() >= deadline;
                held.retain(|(h, name)| {
                    let vouched = fleet.as_ref().is_some_and(|f| f.vouches(name));
                    let never = fleet.as_ref().is_some_and(|f| f.peer_forgot_list(name));
                    let ends = vouched || never || late;
                    if ends {
                        crate::ha::persist::Persist::end_hold(h, vouched);
                    }
                    !ends
                });
                drop(fleet);
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the thread that waits for the fleet to vouch: the held servers are flushed instead");
        for h in servers {
            crate::ha::persist::Persist::end_hold(&h, false);
        }
    }
}

/// Starts this member's part in the fleet: its servers' lists watched, its
/// stage shown, the peers' lists learnt (`Fleet::join`; `vouching`: the
/// state file left servers only the whole fleet can vouch for).
fn join_fleet(
    f: &crate::config::fleet::Fleet,
    cfg: &Config,
    health: &[Arc<Replica>],
    registry: &StatsRegistry,
    vouching: bool,
) -> Arc<crate::fleet::Fleet> {
    let fleet = crate::fleet::Fleet::start(f, &registry.fleet);
    for (s, h) in cfg.servers().zip(health) {
        fleet.watch(fleet_name(s), h);
    }
    fleet.join(vouching);
    fleet
}

/// Keeps the state file current: servers marked clean once their lists
/// empty, a hand-off's late records carried (`ha::persist`).
async fn keep_state(
    persist: Arc<crate::ha::persist::Persist>,
    topology: watch::Receiver<Arc<Topology>>,
) {
    let mut every = tokio::time::interval(Duration::from_millis(200));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let health = topology.borrow().health.clone();
        persist.tick(&health);
    }
}

fn probe_timeouts(cfg: &Config) -> ProbeTimeouts {
    ProbeTimeouts {
        connect: cfg.connect_timeout,
        request: cfg.timeout,
    }
}

fn new_resync(cfg: &Config, router: &Router, health: &[Arc<Replica>]) -> Resync {
    Resync::new(
        router.clone(),
        cfg.servers()
            .zip(health)
            .map(|(s, h)| Node {
                dial: Dial::to(s, cfg.server_tls.as_ref()),
                name: s.name.clone(),
                health: h.clone(),
            })
            .collect(),
        cfg.primaries.len(),
        crate::ha::resync::Settings {
            rate: cfg.resync_rate,
            connect_timeout: cfg.connect_timeout,
            max_value_len: cfg.limits.max_value_len,
            write_life: crate::ha::resync::write_life(cfg.connect_timeout, cfg.timeout),
            automatic: cfg.resync && !cfg.backups.is_empty(),
        },
    )
}

fn entries(servers: &[Running], cfg: &Config) -> Vec<ServerEntry> {
    servers
        .iter()
        .map(|s| ServerEntry {
            name: s.name.clone(),
            label: cfg
                .servers()
                .find(|c| c.name == s.name)
                .and_then(|c| c.label.clone()),
            tier: s.role,
            view: s.health.clone(),
        })
        .collect()
}

/// What the fleet calls a server: its twemproxy name, else its address
/// (members that reach it by different addresses must name it).
fn fleet_name(s: &crate::config::ServerAddr) -> &str {
    s.label.as_deref().unwrap_or(&s.name)
}

fn names(servers: &[crate::config::ServerAddr]) -> String {
    let names: Vec<&str> = servers.iter().map(|s| s.name.as_str()).collect();
    names.join(",")
}
