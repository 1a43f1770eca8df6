//! Start-up and the process's threads.
//!
//! Order matters and is the one operators expect from memcached: bind every
//! listener or take them over (so a port in use fails before anything else
//! happens, with exit code 69), detach if asked, write the pid file, start
//! the hand-off thread (threads do not survive `daemon()`'s fork, so none
//! may start before it), drop privileges, raise the file limit (those
//! steps are types, in [`start`]), then start one worker thread per core. Each worker runs a single-threaded runtime that owns its client
//! sessions and its own connections to every server, so the request path
//! takes no locks and crosses no threads. The main thread watches signals,
//! probes servers, resyncs them, and reloads the configuration on SIGHUP or
//! `memrelay reload` (`crate::topology`).

mod start;

use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use self::start::{HandedOff, Sockets, Started};
use crate::config::{Config, Listen};
use crate::net::BoundListener;
use crate::proxy::accept::{accept_loop, Stop};
use crate::proxy::{ThreadContext, WorkerThread};
use crate::stats::http::MetricsAuth;
use crate::stats::StatsRegistry;
use crate::topology::{Control, ReloadRequest, WorkerEvent, WorkerLinks};

/// How often each worker asks its idle sessions to give their buffers back.
const IDLE_SWEEP: Duration = Duration::from_secs(2);
/// Sessions released in one sweep that make it worth returning memory.
const TRIM_AFTER: usize = 64;
/// Least time from the end of one `memrelay reload` to the start of the
/// next: a client sending a thousand a second once cut other clients' get
/// rate by two thirds (each reload pauses new requests and resolves every
/// server) and wrote a log line for each. The commands that come in the
/// meantime wait, and the next reload answers them all.
const RELOAD_SPACING: Duration = Duration::from_secs(1);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("{0}")]
    Privileges(String),
    #[error("cannot detach: {0}")]
    Daemon(std::io::Error),
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
    #[error("hand-off: {0}")]
    Handoff(String),
    #[error("cannot write the pid file {0}: {1}")]
    Pidfile(String, std::io::Error),
}

/// `EX_UNAVAILABLE` from sysexits.h: a listening address cannot be had (in
/// use, not local, not permitted). Usage errors exit with 64 before this.
pub const EXIT_CANNOT_LISTEN: i32 = 69;

impl StartError {
    /// The process's exit code for this failure: 69 when a listener cannot
    /// be bound, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Bind(..) => EXIT_CANNOT_LISTEN,
            _ => 1,
        }
    }
}

/// Runs the proxy until SIGTERM or SIGINT. `reread` reads the
/// configuration again for a reload (the same file and flags as `cfg`).
pub fn run(cfg: Config, reread: crate::topology::Reread) -> Result<(), StartError> {
    let started = Sockets::bind_or_take_over(&cfg)?
        .detach(&cfg)?
        .start(&cfg)?;
    serve(cfg, reread, started)
}

/// After the start-up steps: the main thread's runtime and signals, the
/// servers' state and probers, the worker threads; then signals and
/// reloads until the process is told to stop.
fn serve(cfg: Config, reread: crate::topology::Reread, started: Started) -> Result<(), StartError> {
    let Started {
        listeners,
        metrics: metrics_listener,
        old,
        handed_off,
        pidfile,
    } = started;
    let took_over = old.is_some();
    // The main thread's runtime, and the signals, before any worker runs:
    // a SIGHUP must never find the default action (exit) in place once
    // clients can be served.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Thread)?;
    let mut signals = rt.block_on(async { Signals::new() });
    let registry = Arc::new(StatsRegistry::new(cfg.threads, cfg.max_conns, Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    // SIGTERM reaches every worker through this.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(Stop::Running);
    log_start(&cfg);
    let threads = cfg.threads;
    let metrics = cfg.metrics;
    // The probers and resyncs run on this thread, in a LocalSet: their
    // connections (TLS ones included) are the thread's own, as on the
    // workers, and need not be shareable across threads.
    let local = tokio::task::LocalSet::new();
    let (mut control, links, mut reloads) = {
        let _main = rt.enter();
        let _local = local.enter();
        Control::start(cfg, registry.clone(), reread, took_over)
    };
    // Before any client is served: who each server process is.
    rt.block_on(local.run_until(control.identified(Duration::from_millis(500))));
    let workers = Workers {
        registry: registry.clone(),
        links,
        conns: conns.clone(),
        stop: stop_rx,
    };
    for (l, addr) in listeners.iter().zip(&control.config().listen) {
        l.listen()
            .map_err(|e| StartError::Bind(addr.to_string(), e))?;
    }
    workers.spawn(threads, &listeners)?;
    drop(listeners);
    // Before any reload: every worker runs the first configuration, so
    // each answers every swap and retires every configuration it ran.
    rt.block_on(local.run_until(control.workers_started()));
    // Serving now: a memrelay whose sockets we took stops accepting.
    if let Some(old) = old {
        crate::net::handoff::tell_serving(old);
    }

    // /metrics asks for --auth-file's credentials, as renewed by reloads.
    let metrics_auth: MetricsAuth = Arc::new(std::sync::RwLock::new(control.config().auth.clone()));
    rt.block_on(local.run_until(async {
        if let (Some(addr), Some(l)) = (metrics, metrics_listener) {
            serve_metrics(addr, l, &registry, &metrics_auth);
        }
        let signal = main_loop(
            &mut control,
            &mut signals,
            &mut reloads,
            &metrics_auth,
            &handed_off,
        )
        .await;
        if handed_off.done() {
            control.hand_off_state();
        }
        if signal == Signal::Terminate {
            drain(&control, &stop_tx, &conns, &handed_off).await;
        }
        control.save_state();
    }));
    finish(&control, pidfile, handed_off.done());
    tracing::info!("memrelay stopped");
    Ok(())
}

fn log_start(cfg: &Config) {
    tracing::info!(
        version = crate::VERSION,
        listen = %cfg.listen.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
        primaries = %cfg.primaries.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
        backups = %cfg.backups.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
        hash = %cfg.hash,
        threads = cfg.threads,
        config = %cfg.config_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        "memrelay started"
    );
}

/// What every worker thread starts from.
struct Workers {
    registry: Arc<StatsRegistry>,
    links: WorkerLinks,
    conns: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Receiver<Stop>,
}

impl Workers {
    /// Starts `threads` workers, each with its own copy of the listeners.
    fn spawn(self, threads: usize, listeners: &[BoundListener]) -> Result<(), StartError> {
        for id in 0..threads {
            let mine: Vec<BoundListener> = listeners
                .iter()
                .map(|l| l.try_clone())
                .collect::<Result<_, _>>()
                .map_err(StartError::Thread)?;
            let registry = self.registry.clone();
            let conns = self.conns.clone();
            let links = self.links.clone();
            let stop = self.stop.clone();
            std::thread::Builder::new()
                .name(format!("memrelay-w{id}"))
                .spawn(move || worker_main(id, registry, links, mine, conns, stop))
                .map_err(StartError::Thread)?;
        }
        Ok(())
    }
}

/// Serves /metrics on the main thread's runtime.
fn serve_metrics(
    addr: std::net::SocketAddr,
    l: std::net::TcpListener,
    registry: &Arc<StatsRegistry>,
    auth: &MetricsAuth,
) {
    match tokio::net::TcpListener::from_std(l) {
        Ok(l) => {
            tokio::spawn(crate::stats::http::serve(l, registry.clone(), auth.clone()));
        }
        Err(e) => tracing::error!(error = %e, %addr, "cannot serve metrics"),
    }
}

/// /metrics asks for the credentials of the configuration running now.
fn renew_metrics_auth(auth: &MetricsAuth, control: &Control) {
    *auth.write().unwrap_or_else(|p| p.into_inner()) = control.config().auth.clone();
}

/// Signals and `memrelay reload` requests, until a signal to stop, which
/// it returns.
async fn main_loop(
    control: &mut Control,
    signals: &mut Signals,
    reloads: &mut mpsc::UnboundedReceiver<ReloadRequest>,
    auth: &MetricsAuth,
    handed: &HandedOff,
) -> Signal {
    let mut last_reload: Option<std::time::Instant> = None;
    // A fleet reload's steps wait on the peers: looked at this often.
    let mut fleet_reload = tokio::time::interval(Duration::from_millis(20));
    fleet_reload.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Between them, a member looks at its peers' stages as often as they
    // are told (a member they wait for joins them); without peers, never.
    let mut fleet_watch = tokio::time::interval(crate::topology::CATCH_UP_EVERY);
    fleet_watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Once a new memrelay took the sockets, it runs the configuration
        // and the fleet's reload steps; this one serves until it drains.
        let mine = !control.handed_over();
        tokio::select! {
            () = handed.wake.notified(), if mine => control.hand_off_state(),
            _ = fleet_reload.tick(), if mine && control.reloading() => {
                control.tend_reload().await;
                if !control.reloading() {
                    renew_metrics_auth(auth, control);
                }
            }
            _ = fleet_watch.tick(), if mine && control.in_fleet() && !control.reloading() => {
                control.catch_up().await;
            }
            sig = signals.next() => match sig {
                Signal::Hangup if !mine => {
                    tracing::warn!("SIGHUP ignored: the new memrelay that took the sockets over reads the configuration");
                }
                Signal::Hangup => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    let _ = control.reload("SIGHUP").await;
                    renew_metrics_auth(auth, control);
                }
                Signal::ReopenLog => crate::logging::reopen(),
                other => return other,
            },
            Some(req) = reloads.recv() => {
                if !mine {
                    let _ = req.reply.send(Err("handing off to a new memrelay: reload that one".into()));
                    continue;
                }
                if let Some(wait) = last_reload.map(|t| RELOAD_SPACING.saturating_sub(t.elapsed())) {
                    tokio::time::sleep(wait).await;
                }
                if answer_reloads(control, req, reloads).await {
                    last_reload = Some(std::time::Instant::now());
                    renew_metrics_auth(auth, control);
                }
            }
        }
    }
}

/// One reload for `first` and every request queued by now; false when
/// every client asking had left (nothing was done).
async fn answer_reloads(
    control: &mut Control,
    first: ReloadRequest,
    reloads: &mut mpsc::UnboundedReceiver<ReloadRequest>,
) -> bool {
    // Every request queued by now was made before the file is read: one
    // reload answers them all, so clients pipelining `memrelay reload`
    // cannot queue up work. Those whose client left get nothing done for
    // them.
    let mut waiting = vec![first];
    while let Ok(more) = reloads.try_recv() {
        waiting.push(more);
    }
    waiting.retain(|r| !r.reply.is_closed());
    if waiting.is_empty() {
        return false;
    }
    tracing::info!(
        requests = waiting.len(),
        "memrelay reload: reloading the configuration"
    );
    let result = control.reload("memrelay reload").await;
    for r in waiting {
        let _ = r.reply.send(result.clone());
    }
    true
}

/// SIGTERM, graceful: stop accepting, finish requests in flight, close
/// (within the shutdown timeout).
async fn drain(
    control: &Control,
    stop: &tokio::sync::watch::Sender<Stop>,
    conns: &AtomicUsize,
    handed_off: &HandedOff,
) {
    let how = if handed_off.done() {
        Stop::HandedOff
    } else {
        Stop::Terminate
    };
    let _ = stop.send(how);
    let deadline = tokio::time::Instant::now() + control.config().shutdown_timeout;
    while conns.load(Ordering::Acquire) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = conns.load(Ordering::Acquire);
    if left > 0 {
        tracing::warn!(
            connections = left,
            "shutdown deadline passed; closing the rest"
        );
    }
}

/// The files a stopping process removes, unless a new memrelay took them.
fn finish(control: &Control, pidfile: Option<start::Pidfile>, handed_off: bool) {
    if !handed_off {
        // The socket files are ours to remove, unless a new memrelay now
        // serves them.
        for l in &control.config().listen {
            if let Listen::Unix { path, .. } = l {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    if let Some(mut p) = pidfile {
        // After a hand-off the new process names itself there: checking
        // the file, then removing it, would race with its write.
        p.owned = !handed_off;
    }
}

fn worker_main(
    id: usize,
    registry: Arc<StatsRegistry>,
    links: WorkerLinks,
    listeners: Vec<BoundListener>,
    conns: Arc<AtomicUsize>,
    stop: tokio::sync::watch::Receiver<Stop>,
) {
    crate::stats::set_worker_index(id);
    // The fleet's hints wait for this thread's next write to a client.
    crate::fleet::defer_hints_on_this_thread();
    let rt = worker_runtime();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let WorkerLinks {
            topology: mut topology_rx,
            commit: mut commit_rx,
            events,
            reload,
            resync,
        } = links;
        let first = topology_rx.borrow_and_update().clone();
        // Whether the TCP listeners speak TLS is fixed at start; with
        // which certificates, a reload may change.
        let tls = first.config.tls.is_some();
        let ctx = ThreadContext {
            stats: registry.workers[id].clone(),
            registry: registry.clone(),
            resync,
            reload: Some(reload),
            events: Some(events.clone()),
            backend: Rc::new(std::cell::Cell::new(crate::backend::BackendSettings::of(
                &first.config,
            ))),
        };
        let thread = Rc::new(WorkerThread::new(ctx, &first));
        let _ = events.send(WorkerEvent::Installed {
            worker: id,
            generation: first.generation,
        });
        drop(first);
        for l in listeners {
            tokio::task::spawn_local(accept_loop(
                l,
                thread.clone(),
                conns.clone(),
                tls,
                stop.clone(),
            ));
        }
        spawn_sweeper(thread.clone());
        let mut stop = stop;
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                changed = topology_rx.changed() => {
                    if changed.is_err() {
                        // The main thread is gone: so is the process.
                        std::future::pending::<()>().await;
                    }
                    // A reload: phase one, then wait for phase two (see
                    // `crate::topology`).
                    let topology = topology_rx.borrow_and_update().clone();
                    let generation = topology.generation;
                    let next = thread.prepare(&topology);
                    drop(topology);
                    let _ = events.send(WorkerEvent::Prepared { worker: id, generation });
                    let _ = commit_rx.wait_for(|&g| g >= generation).await;
                    thread.install(next);
                    let _ = events.send(WorkerEvent::Installed { worker: id, generation });
                }
            }
        }
        // SIGTERM: stop accepting and let every session finish.
        thread.drain();
        // Parked idle clients get their sessions back, to be closed as
        // quiet clients are.
        crate::proxy::park::unpark_all();
        std::future::pending::<()>().await;
    });
}

/// A worker's single-threaded runtime. Without it the worker cannot
/// serve, and the process would run short of a thread it counts on: exit.
fn worker_runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "worker runtime failed to start");
            std::process::exit(1);
        }
    }
}

/// Idle sessions give their buffers back: a session idle for one to two
/// sweeps costs its task and socket only.
fn spawn_sweeper(sweeper: Rc<WorkerThread>) {
    tokio::task::spawn_local(async move {
        let mut tick = tokio::time::interval(IDLE_SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Sessions parked since the last sweep freed their tasks (and
            // this sweep forgets them): worth a trim as well.
            let parked = crate::proxy::park::parked_since_last_asked();
            if sweeper.sweep_idle() + parked >= TRIM_AFTER {
                // Let the sessions give their buffers back, then hand
                // the free pages to the kernel: glibc keeps freed
                // memory in the middle of its heap otherwise, and the
                // process would stay at its busiest size.
                tokio::task::yield_now().await;
                crate::alloc::trim();
            }
        }
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Terminate,
    Interrupt,
    Hangup,
    ReopenLog,
}

/// The signals memrelay acts on: SIGTERM (drain), SIGINT (stop at once),
/// SIGHUP (reload the configuration), SIGUSR1 (reopen the log file).
struct Signals {
    /// None if they could not be watched (then only SIGKILL stops it).
    watched: Option<[tokio::signal::unix::Signal; 4]>,
}

impl Signals {
    /// Installs the handlers; needs the runtime it is awaited on.
    fn new() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let watched = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) {
            (Ok(term), Ok(int), Ok(hup), Ok(usr1)) => Some([term, int, hup, usr1]),
            _ => {
                tracing::error!("cannot watch signals; stop memrelay with SIGKILL");
                None
            }
        };
        Signals { watched }
    }

    /// The next signal.
    async fn next(&mut self) -> Signal {
        let Some([term, int, hup, usr1]) = &mut self.watched else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: draining");
                Signal::Terminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping");
                Signal::Interrupt
            }
            _ = hup.recv() => Signal::Hangup,
            _ = usr1.recv() => Signal::ReopenLog,
        }
    }
}
