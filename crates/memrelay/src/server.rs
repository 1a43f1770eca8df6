//! Start-up and the process's threads.
//!
//! Order matters and is the one operators expect from memcached: bind every
//! listener (so a port in use fails before anything else happens), detach if
//! asked, drop privileges, raise the file limit, then start one worker thread
//! per core. Each worker runs a single-threaded runtime that owns its client
//! sessions and its own connections to every server, so the request path
//! takes no locks and crosses no threads. The main thread watches signals
//! and probes servers that are marked down.

use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::health::Health;
use crate::backend::{BackendSettings, ServerPool};
use crate::config::{Config, Listen};
use crate::ha::mirror::Mirror;
use crate::ha::resync::{Node, Resync};
use crate::net::BoundListener;
use crate::proxy::{Discard, Worker};
use crate::router::Router;
use crate::stats::StatsRegistry;

/// How often each worker asks its idle sessions to give their buffers back.
const IDLE_SWEEP: Duration = Duration::from_secs(2);
/// Sessions released in one sweep that make it worth returning memory.
const TRIM_AFTER: usize = 64;

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
}

pub fn run(cfg: Config) -> Result<(), StartError> {
    // A running memrelay on the hand-off path gives us its sockets;
    // otherwise bind them.
    let taken = match &cfg.handoff {
        Some(path) => crate::net::handoff::take_over(path, cfg.listen.len())
            .map_err(|e| StartError::Handoff(format!("{}: {e}", path.display())))?,
        None => None,
    };
    let took_over = taken.is_some();
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
    let metrics_listener = match cfg.metrics {
        Some(addr) => Some(
            crate::stats::metrics::bind(addr)
                .map_err(|e| StartError::Bind(format!("--metrics {addr}"), e))?,
        ),
        None => None,
    };
    // Serve the hand-off path for the next memrelay.
    let handed_off = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(path) = &cfg.handoff {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path)
            .map_err(|e| StartError::Handoff(format!("{}: {e}", path.display())))?;
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let mine: Vec<BoundListener> = listeners
            .iter()
            .map(|l| l.try_clone())
            .collect::<Result<_, _>>()
            .map_err(StartError::Thread)?;
        let flag = handed_off.clone();
        std::thread::Builder::new()
            .name("memrelay-handoff".into())
            .spawn(move || {
                let fds: Vec<std::os::fd::RawFd> = mine.iter().map(BoundListener::raw_fd).collect();
                match crate::net::handoff::serve_once(&l, &fds) {
                    Ok(()) => {
                        tracing::warn!("listening sockets handed to a new memrelay; draining");
                        flag.store(true, std::sync::atomic::Ordering::Release);
                        // Drain exactly as on SIGTERM.
                        // SAFETY: kill(2) on our own pid.
                        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
                    }
                    Err(e) => tracing::error!(error = %e, "hand-off failed"),
                }
                drop(mine);
            })
            .map_err(StartError::Thread)?;
    }
    if cfg.daemonize {
        // SAFETY: called before any thread is started; daemon(3) forks and
        // the parent exits, which is sound in a single-threaded process.
        if unsafe { libc::daemon(0, 0) } != 0 {
            return Err(StartError::Daemon(std::io::Error::last_os_error()));
        }
    }
    crate::privileges::drop_to(cfg.group.as_deref(), cfg.user.as_deref())
        .map_err(StartError::Privileges)?;
    let per_thread_backend = cfg.servers().count() * cfg.backend_conns;
    crate::privileges::raise_nofile(cfg.max_conns + per_thread_backend * cfg.threads + 64);

    let health: Vec<Arc<Health>> = cfg
        .servers()
        .map(|s| Arc::new(Health::new(s.name.clone(), cfg.missed_keys_cap)))
        .collect();
    let roles = cfg
        .primaries
        .iter()
        .map(|_| "primary")
        .chain(cfg.backups.iter().map(|_| "backup"));
    let registry = Arc::new(StatsRegistry::new(
        cfg.threads,
        cfg.max_conns,
        cfg.servers()
            .zip(roles)
            .zip(&health)
            .map(|((s, r), h)| (s.name.clone(), r, h.clone()))
            .collect(),
    ));
    let conns = Arc::new(AtomicUsize::new(0));
    let router = Router::new(&cfg);
    // Resync requests: from the probers (a restart) and any worker (the
    // admin command), to the manager on this thread.
    let (resync_tx, resync_rx) = tokio::sync::mpsc::unbounded_channel();
    // SIGTERM reaches every worker through this.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(crate::net::STOP_RUNNING);
    let cfg = Arc::new(cfg);

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

    for id in 0..cfg.threads {
        let mine: Vec<BoundListener> = listeners
            .iter()
            .map(|l| l.try_clone())
            .collect::<Result<_, _>>()
            .map_err(StartError::Thread)?;
        let cfg = cfg.clone();
        let health = health.clone();
        let registry = registry.clone();
        let conns = conns.clone();
        let router = router.clone();
        let resync = (!cfg.backups.is_empty()).then(|| resync_tx.clone());
        let stop = stop_rx.clone();
        std::thread::Builder::new()
            .name(format!("memrelay-w{id}"))
            .spawn(move || {
                worker_main(id, cfg, router, health, registry, mine, conns, resync, stop)
            })
            .map_err(StartError::Thread)?;
    }
    drop(listeners);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Thread)?;
    rt.block_on(async {
        let resync = Arc::new(Resync {
            router: router.clone(),
            nodes: cfg
                .servers()
                .zip(&health)
                .map(|(s, h)| Node {
                    addr: s.addr,
                    name: s.name.clone(),
                    health: h.clone(),
                })
                .collect(),
            nprimaries: cfg.primaries.len(),
            rate: cfg.resync_rate,
            connect_timeout: cfg.connect_timeout,
            max_value_len: cfg.limits.max_value_len,
            write_life: crate::ha::resync::write_life(cfg.connect_timeout, cfg.timeout),
        });
        tokio::spawn(resync.serve(resync_rx));
        if let Some(l) = metrics_listener {
            match tokio::net::TcpListener::from_std(l) {
                Ok(l) => {
                    tokio::spawn(crate::stats::metrics::serve(l, registry.clone()));
                }
                Err(e) => tracing::error!(error = %e, "cannot serve metrics"),
            }
        }
        let automatic = cfg.resync && !cfg.backups.is_empty();
        for (i, (s, h)) in cfg.servers().zip(&health).enumerate() {
            tokio::spawn(crate::backend::probe::probe_loop(
                h.clone(),
                s.addr,
                cfg.connect_timeout,
                cfg.timeout,
                automatic.then(|| (resync_tx.clone(), i)),
            ));
        }
        if wait_for_signal().await == Signal::Terminate {
            // Graceful: stop accepting, finish requests in flight, close.
            let how = if handed_off.load(std::sync::atomic::Ordering::Acquire) {
                crate::net::STOP_HANDED_OFF
            } else {
                crate::net::STOP_TERMINATE
            };
            let _ = stop_tx.send(how);
            let deadline = tokio::time::Instant::now() + cfg.shutdown_timeout;
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
    });
    if !handed_off.load(std::sync::atomic::Ordering::Acquire) {
        // The socket files are ours to remove, unless a new memrelay now
        // serves them.
        for l in &cfg.listen {
            if let Listen::Unix { path, .. } = l {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    tracing::info!("memrelay stopped");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn worker_main(
    id: usize,
    cfg: Arc<Config>,
    router: Router,
    health: Vec<Arc<Health>>,
    registry: Arc<StatsRegistry>,
    listeners: Vec<BoundListener>,
    conns: Arc<AtomicUsize>,
    resync: Option<crate::ha::resync::Requests>,
    stop: tokio::sync::watch::Receiver<u8>,
) {
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
        let settings = Rc::new(BackendSettings {
            connect_timeout: cfg.connect_timeout,
            timeout: cfg.timeout,
            failure_limit: cfg.failure_limit,
            max_value_len: cfg.limits.max_value_len + 1024,
            max_reply_len: cfg.max_reply_size,
            max_inflight: 100_000,
        });
        let servers: Rc<[ServerPool]> = cfg
            .servers()
            .enumerate()
            .map(|(i, s)| {
                ServerPool::new(
                    i,
                    s.name.clone(),
                    s.addr,
                    cfg.backend_conns,
                    health[i].clone(),
                    settings.clone(),
                )
            })
            .collect();
        let stats = registry.workers[id].clone();
        let worker = Rc::new(Worker {
            id,
            router,
            mirror: Mirror::new(servers.clone(), stats.clone()),
            servers,
            limits: cfg.limits.clone(),
            miss_fallback: cfg.miss_fallback,
            auto_eject: cfg.auto_eject,
            flush_enabled: cfg.flush_enabled,
            auth: cfg.auth.clone(),
            client_limits: crate::proxy::ClientLimits {
                max_pipeline: cfg.max_pipeline,
                max_buffer: cfg.max_client_buffer,
                max_reply: cfg.max_reply_size,
                idle_timeout: cfg.idle_timeout,
            },
            resync,
            draining: std::cell::Cell::new(None),
            sessions: std::cell::RefCell::new(Vec::new()),
            stats,
            registry: registry.clone(),
            discard: Rc::new(Discard),
        });
        for l in listeners {
            tokio::task::spawn_local(l.accept_loop(
                worker.clone(),
                conns.clone(),
                cfg.max_conns,
                cfg.tls.as_ref().map(|t| t.server.clone()),
                stop.clone(),
            ));
        }
        // Idle sessions give their buffers back: a session idle for one to
        // two sweeps costs its task and socket only.
        let sweeper = worker.clone();
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
        // SIGTERM: stop accepting and let every session finish.
        let mut stop = stop;
        let _ = stop.changed().await;
        worker.drain();
        std::future::pending::<()>().await;
    });
}

#[derive(Debug, PartialEq, Eq)]
enum Signal {
    Terminate,
    Interrupt,
}

/// Waits for SIGTERM (graceful) or SIGINT (fast).
async fn wait_for_signal() -> Signal {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot watch signals; stop memrelay with SIGKILL");
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
    }
}
