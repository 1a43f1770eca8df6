//! Start-up and the process's threads.
//!
//! Order matters and is the one operators expect from memcached: bind every
//! listener or take them over (so a port in use fails before anything else
//! happens, with exit code 69), detach if asked, write the pid file, start
//! the hand-off thread (threads do not survive `daemon()`'s fork, so none
//! may start before it), drop privileges, raise the file limit, then start
//! one worker thread per core. Each worker runs a single-threaded runtime that owns its client
//! sessions and its own connections to every server, so the request path
//! takes no locks and crosses no threads. The main thread watches signals,
//! probes servers, resyncs them, and reloads the configuration on SIGHUP or
//! `memrelay reload` (`crate::topology`).

use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Listen};
use crate::net::BoundListener;
use crate::proxy::accept::{accept_loop, Stop};
use crate::proxy::{Discard, ThreadContext, WorkerThread};
use crate::stats::StatsRegistry;
use crate::topology::{Control, WorkerEvent, WorkerLinks};

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
    // A running memrelay on the hand-off path gives us its sockets;
    // otherwise bind them.
    // The /metrics listener travels with the others, last: the old
    // process holds its port until it exits.
    let expected = cfg.listen.len() + usize::from(cfg.metrics.is_some());
    let mut taken = match &cfg.handoff {
        Some(path) => crate::net::handoff::take_over(path, expected)
            .map_err(|e| StartError::Handoff(format!("{}: {e}", path.display())))?,
        None => None,
    };
    let took_over = taken.is_some();
    let taken_metrics = match (&mut taken, cfg.metrics) {
        (Some(fds), Some(_)) => fds.pop(),
        _ => None,
    };
    let listeners: Vec<BoundListener> = match taken {
        Some(fds) => cfg
            .listen
            .iter()
            .zip(fds)
            .map(|(l, fd)| {
                BoundListener::from_fd(l, fd).map_err(|e| StartError::Bind(l.to_string(), e))
            })
            .collect::<Result<_, _>>()?,
        None => cfg
            .listen
            .iter()
            .map(|l| BoundListener::bind(l).map_err(|e| StartError::Bind(l.to_string(), e)))
            .collect::<Result<_, _>>()?,
    };
    for w in &cfg.warnings {
        tracing::warn!("{w}");
    }
    if took_over {
        tracing::info!("took over the listening sockets of the running memrelay");
    }
    let metrics_listener = match (cfg.metrics, taken_metrics) {
        (Some(addr), Some(fd)) => {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)
                .map_err(|e| StartError::Bind(format!("--metrics {addr}"), e))?;
            Some(l)
        }
        (Some(addr), None) => Some(
            crate::stats::http::bind(addr)
                .map_err(|e| StartError::Bind(format!("--metrics {addr}"), e))?,
        ),
        (None, _) => None,
    };
    // The hand-off socket is bound now, while we may still write its
    // directory; it is served only after `daemon()`, by a thread of the
    // process that stays (threads do not survive a fork).
    let handoff = match &cfg.handoff {
        Some(path) => Some(bind_handoff(path)?),
        None => None,
    };
    if cfg.daemonize {
        if cfg.log_file.is_none() {
            tracing::warn!("detaching without --log-file: logs are discarded from now on");
        }
        // SAFETY: no thread has been started yet (the hand-off thread and
        // the workers start below); daemon(3) forks and the parent exits,
        // which is sound in a single-threaded process.
        if unsafe { libc::daemon(0, 0) } != 0 {
            return Err(StartError::Daemon(std::io::Error::last_os_error()));
        }
    }
    // The pid is the final one only now, after the fork.
    let pidfile = match &cfg.pidfile {
        Some(path) => Some(Pidfile::write(path)?),
        None => None,
    };
    let handed_off = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(l) = handoff {
        let metrics = match &metrics_listener {
            Some(m) => Some(m.try_clone().map_err(StartError::Thread)?),
            None => None,
        };
        serve_handoff(l, &listeners, metrics, handed_off.clone())?;
    }
    crate::privileges::drop_to(cfg.group.as_deref(), cfg.user.as_deref())
        .map_err(StartError::Privileges)?;
    crate::privileges::raise_nofile(cfg.fds_needed());

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

    for id in 0..threads {
        let mine: Vec<BoundListener> = listeners
            .iter()
            .map(|l| l.try_clone())
            .collect::<Result<_, _>>()
            .map_err(StartError::Thread)?;
        let registry = registry.clone();
        let conns = conns.clone();
        let links = links.clone();
        let stop = stop_rx.clone();
        std::thread::Builder::new()
            .name(format!("memrelay-w{id}"))
            .spawn(move || worker_main(id, registry, links, mine, conns, stop))
            .map_err(StartError::Thread)?;
    }
    drop(listeners);
    drop(links);

    // /metrics asks for --auth-file's credentials, as renewed by reloads.
    let metrics_auth: crate::stats::http::MetricsAuth =
        Arc::new(std::sync::RwLock::new(control.config().auth.clone()));
    let renew_metrics_auth = |control: &Control| {
        *metrics_auth.write().unwrap_or_else(|p| p.into_inner()) = control.config().auth.clone();
    };
    rt.block_on(local.run_until(async {
        if let (Some(addr), Some(l)) = (metrics, metrics_listener) {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(crate::stats::http::serve(
                        l,
                        registry.clone(),
                        metrics_auth.clone(),
                    ));
                }
                Err(e) => tracing::error!(error = %e, %addr, "cannot serve metrics"),
            }
        }
        let mut last_reload: Option<std::time::Instant> = None;
        let signal = loop {
            tokio::select! {
                sig = signals.next() => match sig {
                    Signal::Hangup => {
                        tracing::info!("SIGHUP: reloading the configuration");
                        let _ = control.reload("SIGHUP").await;
                        renew_metrics_auth(&control);
                    }
                    Signal::ReopenLog => crate::logging::reopen(),
                    other => break other,
                },
                Some(req) = reloads.recv() => {
                    if let Some(wait) = last_reload.map(|t| RELOAD_SPACING.saturating_sub(t.elapsed())) {
                        tokio::time::sleep(wait).await;
                    }
                    // Every request queued by now was made before the file
                    // is read: one reload answers them all, so clients
                    // pipelining `memrelay reload` cannot queue up work.
                    // Those whose client left get nothing done for them.
                    let mut waiting = vec![req];
                    while let Ok(more) = reloads.try_recv() {
                        waiting.push(more);
                    }
                    waiting.retain(|r| !r.reply.is_closed());
                    if waiting.is_empty() {
                        continue;
                    }
                    tracing::info!(requests = waiting.len(), "memrelay reload: reloading the configuration");
                    let result = control.reload("memrelay reload").await;
                    last_reload = Some(std::time::Instant::now());
                    renew_metrics_auth(&control);
                    for r in waiting {
                        let _ = r.reply.send(result.clone());
                    }
                }
            }
        };
        if handed_off.load(std::sync::atomic::Ordering::Acquire) {
            control.hand_off_state();
        }
        if signal == Signal::Terminate {
            // Graceful: stop accepting, finish requests in flight, close.
            let how = if handed_off.load(std::sync::atomic::Ordering::Acquire) {
                Stop::HandedOff
            } else {
                Stop::Terminate
            };
            let _ = stop_tx.send(how);
            let deadline = tokio::time::Instant::now() + control.config().shutdown_timeout;
            while conns.load(std::sync::atomic::Ordering::Acquire) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let left = conns.load(std::sync::atomic::Ordering::Acquire);
            if left > 0 {
                tracing::warn!(
                    connections = left,
                    "shutdown deadline passed; closing the rest"
                );
            }
        }
        control.save_state();
    }));
    if !handed_off.load(std::sync::atomic::Ordering::Acquire) {
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
        p.owned = !handed_off.load(std::sync::atomic::Ordering::Acquire);
    }
    tracing::info!("memrelay stopped");
    Ok(())
}

/// Binds the hand-off path, replacing a socket file left by an earlier run.
fn bind_handoff(path: &std::path::Path) -> Result<std::os::unix::net::UnixListener, StartError> {
    crate::net::handoff::bind(path)
        .map_err(|e| StartError::Handoff(format!("{}: {e}", path.display())))
}

/// Serves the hand-off path for the next memrelay, on a thread of its own:
/// once a new process has our listening sockets, we drain as on SIGTERM.
fn serve_handoff(
    l: std::os::unix::net::UnixListener,
    listeners: &[BoundListener],
    metrics: Option<std::net::TcpListener>,
    flag: Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), StartError> {
    let mine: Vec<BoundListener> = listeners
        .iter()
        .map(|l| l.try_clone())
        .collect::<Result<_, _>>()
        .map_err(StartError::Thread)?;
    std::thread::Builder::new()
        .name("memrelay-handoff".into())
        .spawn(move || {
            let mut fds: Vec<std::os::fd::RawFd> = mine.iter().map(BoundListener::raw_fd).collect();
            if let Some(m) = &metrics {
                fds.push(std::os::fd::AsRawFd::as_raw_fd(m));
            }
            match crate::net::handoff::serve_once(&l, &fds) {
                Ok(()) => {
                    tracing::info!("listening sockets handed to a new memrelay; draining");
                    flag.store(true, std::sync::atomic::Ordering::Release);
                    // Drain exactly as on SIGTERM.
                    // SAFETY: kill(2) on our own pid.
                    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                }
                Err(e) => tracing::error!(error = %e, "hand-off failed"),
            }
            drop(mine);
            drop(metrics);
        })
        .map_err(StartError::Thread)?;
    Ok(())
}

/// `--pidfile`: written once the pid is final, removed at exit if it still
/// names this process (a new memrelay taking over may have rewritten it).
#[derive(Debug)]
struct Pidfile {
    path: std::path::PathBuf,
    pid: u32,
    /// Removed at exit (false once a new process took over).
    owned: bool,
}

impl Pidfile {
    fn write(path: &std::path::Path) -> Result<Pidfile, StartError> {
        let pid = std::process::id();
        std::fs::write(path, format!("{pid}\n"))
            .map_err(|e| StartError::Pidfile(path.display().to_string(), e))?;
        Ok(Pidfile {
            path: path.to_path_buf(),
            pid,
            owned: true,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let ours = self.owned
            && std::fs::read_to_string(&self.path)
                .is_ok_and(|text| text.trim() == self.pid.to_string());
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
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
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "worker runtime failed to start");
            std::process::exit(1);
        }
    };
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
            id,
            stats: registry.workers[id].clone(),
            registry: registry.clone(),
            resync,
            reload: Some(reload),
            events: Some(events.clone()),
            discard: Rc::new(Discard),
            backend: Rc::new(std::cell::Cell::new(crate::backend::BackendSettings::of(
                &first.config,
            ))),
        };
        let thread = Rc::new(WorkerThread::new(ctx, &first));
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
        // Idle sessions give their buffers back: a session idle for one to
        // two sweeps costs its task and socket only.
        let sweeper = thread.clone();
        tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval(IDLE_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if sweeper.sweep_idle() >= TRIM_AFTER {
                    // Let the sessions give their buffers back, then hand
                    // the free pages to the kernel: glibc keeps freed
                    // memory in the middle of its heap otherwise, and the
                    // process would stay at its busiest size.
                    tokio::task::yield_now().await;
                    crate::alloc::trim();
                }
            }
        });
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
        std::future::pending::<()>().await;
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
