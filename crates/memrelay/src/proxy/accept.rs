//! Accepting clients: each worker accepts on its own copy of every
//! listening socket (bound by `net`, before privileges are dropped) within
//! the connection limit (`-n`), and starts a session for each client.

use std::io;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{park, session, WorkerThread};
use crate::net::tls::TlsStream;
use crate::net::{BoundListener, ParkedSocket, Stream};

/// The stop signal workers watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    Running,
    /// SIGTERM: stop accepting, serve the clients already queued.
    Terminate,
    /// The listening sockets were handed to a new process, which accepts
    /// what is queued on them.
    HandedOff,
}

/// memcached's words when it is over its connection limit.
const TOO_MANY: &[u8] = b"ERROR Too many open connections\r\n";

/// Accepts clients on the current worker until the process exits.
/// Every worker accepts on its own copy of the socket; whichever is idle
/// takes the next client.
/// Stops when `stop` fires (SIGTERM): the clients already queued on the
/// socket are accepted and served first, then the listener is closed.
/// With `tls`, TCP clients are served over TLS (and only TLS), with
/// the certificates of the configuration current when they connect;
/// unix socket clients are not, whoever can open the socket is local.
pub(crate) async fn accept_loop(
    listener: BoundListener,
    worker: Rc<WorkerThread>,
    conns: Arc<AtomicUsize>,
    tls: bool,
    mut stop: tokio::sync::watch::Receiver<Stop>,
) {
    match listener {
        BoundListener::Tcp(l) => {
            let l = match tokio::net::TcpListener::from_std(l) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "cannot register listener"),
            };
            loop {
                tokio::select! {
                    r = l.accept() => match r {
                        Ok((s, _)) => {
                            admit_tcp(s, &worker, &conns, tls);
                        }
                        Err(e) => backoff_on_accept_error(e).await,
                    },
                    _ = stop.changed() => {
                        if *stop.borrow() == Stop::HandedOff {
                            // The socket lives on in the new process,
                            // which accepts what is queued.
                            return;
                        }
                        // Our own socket is about to close: take what
                        // already waits in its backlog (bounded: the
                        // queue may refill as fast as we empty it).
                        for _ in 0..1024 {
                            let next = std::future::poll_fn(|cx| match l.poll_accept(cx) {
                                std::task::Poll::Ready(r) => std::task::Poll::Ready(Some(r)),
                                std::task::Poll::Pending => std::task::Poll::Ready(None),
                            })
                            .await;
                            let Some(Ok((s, _))) = next else { break };
                            admit_tcp(s, &worker, &conns, tls);
                        }
                        return;
                    }
                }
            }
        }
        BoundListener::Unix(l) => {
            let l = match tokio::net::UnixListener::from_std(l) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "cannot register listener"),
            };
            loop {
                tokio::select! {
                    r = l.accept() => match r {
                        Ok((s, _)) => admit(s, &worker, &conns),
                        Err(e) => backoff_on_accept_error(e).await,
                    },
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// Out of file descriptors (or similar): wait a little instead of spinning.
async fn backoff_on_accept_error(e: io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(20)).await;
}

/// A TCP client, over TLS when it is configured.
fn admit_tcp(
    s: tokio::net::TcpStream,
    worker: &Rc<WorkerThread>,
    conns: &Arc<AtomicUsize>,
    tls: bool,
) {
    let _ = s.set_nodelay(true);
    // A reload cannot turn TLS on or off (see `Config::keep_restart_only`).
    let config = if tls {
        worker.current().tls.clone()
    } else {
        None
    };
    let Some(config) = config else {
        return admit(s, worker, conns);
    };
    // Over the limit, a TLS client is closed before anything is spent on
    // it: memcached's error line would have to follow a whole handshake.
    if !reserve(worker, conns) {
        return;
    }
    match TlsStream::accept(s, config) {
        Ok(s) => start(s, worker, conns, false),
        Err(e) => {
            release(worker, conns);
            tracing::debug!(error = %e, "cannot start a TLS session");
        }
    }
}

/// Starts a session for a new client, or turns it away over the limit.
fn admit<S>(s: S, worker: &Rc<WorkerThread>, conns: &Arc<AtomicUsize>)
where
    S: Stream + 'static,
{
    if reserve(worker, conns) {
        start(s, worker, conns, false);
    } else {
        // Best effort, like memcached: one write, then close.
        let _ = s.try_write_vectored(&[io::IoSlice::new(TOO_MANY)]);
    }
}

/// Counts a new client in, unless that would pass `-n` (of the
/// configuration current now): then counts it as rejected.
fn reserve(worker: &WorkerThread, conns: &AtomicUsize) -> bool {
    let stats = &worker.ctx.stats;
    if conns.fetch_add(1, Ordering::AcqRel) >= worker.current().max_conns {
        conns.fetch_sub(1, Ordering::AcqRel);
        stats.rejected_connections.incr();
        return false;
    }
    stats.curr_connections.incr();
    stats.total_connections.incr();
    true
}

/// Counts a client out (see `reserve`).
fn release(worker: &WorkerThread, conns: &AtomicUsize) {
    worker.ctx.stats.curr_connections.sub(1);
    conns.fetch_sub(1, Ordering::AcqRel);
}

/// Serves a client counted in by `reserve` until it leaves or is parked
/// (`authenticated`: a parked client that had, see [`park`]).
fn start<S>(s: S, worker: &Rc<WorkerThread>, conns: &Arc<AtomicUsize>, authenticated: bool)
where
    S: Stream + 'static,
{
    let conns = conns.clone();
    // The session's own future is the task's: wrapping it in another async
    // block would keep a second copy of the stream in every task.
    tokio::task::spawn_local(session::serve(
        s,
        worker.clone(),
        authenticated,
        move |thread, ending| match ending {
            park::Ending::Closed => release(thread, &conns),
            park::Ending::Parked {
                socket,
                authenticated,
            } => park::park(socket, authenticated, thread, &conns),
        },
    ));
}

/// A parked client sent something (or closed): its session starts again.
pub(super) fn resume(
    socket: ParkedSocket,
    authenticated: bool,
    worker: &Rc<WorkerThread>,
    conns: &Arc<AtomicUsize>,
) {
    let registered = match socket {
        ParkedSocket::Tcp(s) => {
            tokio::net::TcpStream::from_std(s).map(|s| start(s, worker, conns, authenticated))
        }
        ParkedSocket::Unix(s) => {
            tokio::net::UnixStream::from_std(s).map(|s| start(s, worker, conns, authenticated))
        }
    };
    if let Err(e) = registered {
        tracing::debug!(error = %e, "cannot resume a parked connection");
        release(worker, conns);
    }
}
