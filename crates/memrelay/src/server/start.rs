//! Start-up, as typed steps that can only be taken in order, each
//! consuming the one before:
//!
//! 1. [`Sockets::bind_or_take_over`]: every listener bound, or taken over
//!    from a running memrelay (`--handoff`), so that a port in use fails
//!    before anything else happens (exit code 69);
//! 2. [`Sockets::detach`]: `daemon()` if `-d`, then the pid file (the pid
//!    is final only after the fork);
//! 3. [`Detached::start`]: the hand-off thread, then privileges dropped
//!    and the file limit raised.
//!
//! `daemon()` forks, and threads do not survive a fork: only `Sockets`,
//! which never starts a thread, can detach, and the hand-off thread is
//! started only from a `Detached`. Starting a thread before the fork
//! cannot be written.

use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::StartError;
use crate::config::Config;
use crate::net::BoundListener;

/// Step 1: the process's sockets, and nothing else done yet.
#[derive(Debug)]
pub(super) struct Sockets {
    listeners: Vec<BoundListener>,
    metrics: Option<std::net::TcpListener>,
    /// The hand-off path, bound now while we may still write its
    /// directory; served only after `daemon()`.
    handoff: Option<UnixListener>,
    /// The memrelay whose sockets these are, told once this one serves.
    old: Option<UnixStream>,
}

/// Step 2: the process as it stays (detached if asked), its pid file
/// written.
#[derive(Debug)]
pub(super) struct Detached {
    sockets: Sockets,
    pidfile: Option<Pidfile>,
}

/// Step 3: ready for the runtime and the worker threads.
#[derive(Debug)]
pub(super) struct Started {
    pub(super) listeners: Vec<BoundListener>,
    pub(super) metrics: Option<std::net::TcpListener>,
    /// The running memrelay the sockets came from, to be told once this
    /// one serves them (`handoff::tell_serving`).
    pub(super) old: Option<UnixStream>,
    /// Set by the hand-off thread once a new process has our sockets.
    pub(super) handed_off: Arc<HandedOff>,
    pub(super) pidfile: Option<Pidfile>,
}

impl Sockets {
    /// Takes the sockets of a running memrelay on the hand-off path, or
    /// binds them. The /metrics listener travels with the others, last:
    /// the old process holds its port until it exits.
    pub(super) fn bind_or_take_over(cfg: &Config) -> Result<Sockets, StartError> {
        let expected = cfg.listen.len() + usize::from(cfg.metrics.is_some());
        let taken = match &cfg.handoff {
            Some(path) => crate::net::handoff::take_over(path, expected)
                .map_err(|e| StartError::Handoff(format!("{}: {e}", path.display())))?,
            None => None,
        };
        let took_over = taken.is_some();
        let (mut taken, old) = match taken {
            Some(t) => (Some(t.fds), Some(t.old)),
            None => (None, None),
        };
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
        let metrics = metrics_listener(cfg, taken_metrics)?;
        let handoff = match &cfg.handoff {
            Some(path) => Some(bind_handoff(path)?),
            None => None,
        };
        Ok(Sockets {
            listeners,
            metrics,
            handoff,
            old,
        })
    }

    /// Detaches if `-d` (no thread has been started: `Sockets` starts
    /// none), then writes the pid file, whose pid is now final.
    pub(super) fn detach(self, cfg: &Config) -> Result<Detached, StartError> {
        if cfg.daemonize {
            if cfg.log_file.is_none() {
                tracing::warn!("detaching without --log-file: logs are discarded from now on");
            }
            // No thread has been started yet (the hand-off thread and the
            // workers start from a `Detached`): daemon(3) forks, and only
            // a single-threaded process may.
            crate::sys::daemon().map_err(StartError::Daemon)?;
        }
        let pidfile = match &cfg.pidfile {
            Some(path) => Some(Pidfile::write(path)?),
            None => None,
        };
        Ok(Detached {
            sockets: self,
            pidfile,
        })
    }
}

impl Detached {
    /// Serves the hand-off path on a thread of its own, then drops
    /// privileges (`-g`, then `-u`) and raises the open file limit.
    pub(super) fn start(self, cfg: &Config) -> Result<Started, StartError> {
        let Sockets {
            listeners,
            metrics,
            handoff,
            old,
        } = self.sockets;
        let handed_off = Arc::new(HandedOff::default());
        if let Some(l) = handoff {
            let metrics = match &metrics {
                Some(m) => Some(m.try_clone().map_err(StartError::Thread)?),
                None => None,
            };
            serve_handoff(l, &listeners, metrics, handed_off.clone())?;
        }
        crate::privileges::drop_to(cfg.group.as_deref(), cfg.user.as_deref())
            .map_err(StartError::Privileges)?;
        crate::privileges::raise_nofile(cfg.fds_needed());
        Ok(Started {
            listeners,
            metrics,
            old,
            handed_off,
            pidfile: self.pidfile,
        })
    }
}

/// The /metrics listener: handed over with the others, or bound.
fn metrics_listener(
    cfg: &Config,
    taken: Option<std::os::fd::OwnedFd>,
) -> Result<Option<std::net::TcpListener>, StartError> {
    Ok(match (cfg.metrics, taken) {
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
    })
}

/// Binds the hand-off path, replacing a socket file left by an earlier run.
fn bind_handoff(path: &std::path::Path) -> Result<UnixListener, StartError> {
    crate::net::handoff::bind(path)
        .map_err(|e| StartError::Handoff(format!("{}: {e}", path.display())))
}

/// A hand-off to a new memrelay, as the old one sees it.
#[derive(Debug, Default)]
pub(super) struct HandedOff {
    /// A new process has our sockets (and gets our state).
    done: AtomicBool,
    /// Wakes the main loop to hand the state over.
    pub(super) wake: tokio::sync::Notify,
}

impl HandedOff {
    pub(super) fn done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
}

/// Serves the hand-off path for the next memrelay, on a thread of its own:
/// once a new process has our listening sockets, the main loop hands it
/// our state; once it serves, we drain as on SIGTERM.
fn serve_handoff(
    l: UnixListener,
    listeners: &[BoundListener],
    metrics: Option<std::net::TcpListener>,
    handed: Arc<HandedOff>,
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
                Ok(new) => {
                    tracing::info!("listening sockets handed to a new memrelay; serving until it does");
                    handed.done.store(true, Ordering::Release);
                    handed.wake.notify_one();
                    use crate::net::handoff::{wait_serving, NewProcess, SERVING_WAIT};
                    match wait_serving(new, SERVING_WAIT) {
                        NewProcess::Serving => tracing::info!("the new memrelay serves; draining"),
                        NewProcess::Gone => tracing::warn!("the new memrelay left without saying it serves; draining"),
                        NewProcess::Silent => tracing::warn!(waited = ?SERVING_WAIT, "the new memrelay never said it serves; draining"),
                    }
                    // Drain exactly as on SIGTERM.
                    crate::sys::terminate_self();
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
pub(super) struct Pidfile {
    path: std::path::PathBuf,
    pid: u32,
    /// Removed at exit (false once a new process took over).
    pub(super) owned: bool,
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
