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
}

pub fn run(cfg: Config) -> Result<(), StartError> {
    let listeners: Vec<BoundListener> = cfg
        .listen
        .iter()
        .map(|l| BoundListener::bind(l).map_err(|e| StartError::Bind(l.to_string(), e)))
        .collect::<Result<_, _>>()?;
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
    let cfg = Arc::new(cfg);

    tracing::info!(
        version = crate::VERSION,
        listen = %cfg.listen.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(","),
        primaries = %cfg.primaries.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
        backups = %cfg.backups.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
        hash = %cfg.hash,
        threads = cfg.threads,
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
        std::thread::Builder::new()
            .name(format!("memrelay-w{id}"))
            .spawn(move || worker_main(id, cfg, router, health, registry, mine, conns, resync))
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
        });
        tokio::spawn(resync.serve(resync_rx));
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
        wait_for_signal().await;
    });
    for l in &cfg.listen {
        if let Listen::Unix { path, .. } = l {
            let _ = std::fs::remove_file(path);
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
            resync,
            stats,
            registry: registry.clone(),
            discard: Rc::new(Discard),
        });
        for l in listeners {
            tokio::task::spawn_local(l.accept_loop(worker.clone(), conns.clone(), cfg.max_conns));
        }
        std::future::pending::<()>().await;
    });
}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    let mut int = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    // Give in-flight replies a moment to leave (graceful drain comes with
    // the operations work).
    tokio::time::sleep(Duration::from_millis(10)).await;
}
