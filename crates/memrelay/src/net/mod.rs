//! Sockets: listening, accepting within the connection limit (over TLS
//! when configured, [`tls`]), and the byte-queue and wake-up helpers the
//! sessions and backends share.

pub mod handoff;
pub mod notify;
pub mod outqueue;
pub mod tls;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::config::Listen;
use crate::proxy::{session, WorkerThread};

/// The byte streams memrelay talks over (TCP, unix sockets, TLS over TCP:
/// [`tls::TlsStream`]), through tokio's readiness API: no futures per read or write, and no system call
/// that is known in advance to return `EAGAIN`.
pub trait Stream {
    fn ready(
        &self,
        interest: tokio::io::Interest,
    ) -> impl std::future::Future<Output = io::Result<tokio::io::Ready>>;
    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize>;
    /// Reads into `buf` (a plain `try_read`).
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Reads into the spare capacity of `buf`. `Ok(0)` is end of input;
    /// `WouldBlock` means nothing was there.
    ///
    /// A read that returns less than it had room for has drained the
    /// socket, so it tells tokio so (by reporting `WouldBlock` from inside
    /// `try_io`, which clears readiness unless a new event came in
    /// meanwhile) instead of paying one more `recv` just to see `EAGAIN`.
    /// twemproxy does the same with its `recv_ready` flag.
    fn read_drained(&self, buf: &mut bytes::BytesMut) -> io::Result<usize>;
    /// Whether the stream holds bytes of its own that the socket has not
    /// taken yet (TLS records); a plain socket holds none.
    fn backlogged(&self) -> bool {
        false
    }
    /// Whether the stream is still setting up (a TLS handshake): its
    /// session is then held to `--handshake-timeout`.
    fn handshaking(&self) -> bool {
        false
    }
    /// Called once the session is over, before the stream is dropped: a
    /// stream that holds bytes of its own (TLS) sends them here. A plain
    /// socket has nothing to do: the kernel sends what it was given.
    fn finish(&self) -> impl std::future::Future<Output = ()> {
        async {}
    }
    /// Waits until the stream is ready for `interest` (never, with `None`)
    /// or `other` is ready, checking `other` first: the one wait of an
    /// idle client session, which lasts as long as the client stays
    /// connected, so what this future holds is paid per connection.
    ///
    /// This default holds the `ready` future. Plain sockets override it
    /// with tokio's `poll_read_ready`/`poll_write_ready`, which keep their
    /// waker in the socket's registration instead: no waiter node in the
    /// future, a few words in all. (Those polls count against tokio's
    /// cooperative budget, as any tokio I/O does: a session that finds its
    /// socket ready over and over in one poll yields now and then.)
    fn ready_or<T, F>(
        &self,
        interest: Option<tokio::io::Interest>,
        mut other: F,
    ) -> impl std::future::Future<Output = Woken<T>>
    where
        F: FnMut(&mut Context<'_>) -> Poll<T>,
    {
        async move {
            let ready = async {
                match interest {
                    Some(i) => self.ready(i).await,
                    None => std::future::pending().await,
                }
            };
            let mut ready = std::pin::pin!(ready);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(t) = other(cx) {
                    return Poll::Ready(Woken::Other(t));
                }
                std::future::Future::poll(ready.as_mut(), cx).map(Woken::Stream)
            })
            .await
        }
    }
}

/// What ended a [`Stream::ready_or`] wait.
#[derive(Debug)]
pub enum Woken<T> {
    /// The stream is ready (or failed).
    Stream(io::Result<tokio::io::Ready>),
    /// The other source is.
    Other(T),
}

/// Writes all of `bytes`, waiting for room as needed (for the connections
/// that send one request and wait for its reply: probes, resync).
pub async fn write_all(s: &impl Stream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match s.try_write_vectored(&[io::IoSlice::new(bytes)]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready(tokio::io::Interest::WRITABLE).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what is there, waiting until something is; `Ok(0)` is the end.
pub async fn read_some(s: &impl Stream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready(tokio::io::Interest::READABLE).await?;
            }
            r => return r,
        }
    }
}

macro_rules! stream_impl {
    ($t:ty) => {
        impl Stream for $t {
            fn ready(
                &self,
                interest: tokio::io::Interest,
            ) -> impl std::future::Future<Output = io::Result<tokio::io::Ready>> {
                <$t>::ready(self, interest)
            }
            fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
                <$t>::try_write_vectored(self, bufs)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn read_drained(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
                let mut got = 0;
                let r = self.try_io(tokio::io::Interest::READABLE, || {
                    let spare = buf.spare_capacity_mut();
                    let room = spare.len();
                    let n = socket2::SockRef::from(self).recv(spare)?;
                    // SAFETY: recv initialised the first n bytes of the spare capacity.
                    unsafe { buf.set_len(buf.len() + n) };
                    got = n;
                    if n > 0 && n < room {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(n)
                    }
                });
                match r {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
                    other => other,
                }
            }
            fn ready_or<T, F>(
                &self,
                interest: Option<tokio::io::Interest>,
                mut other: F,
            ) -> impl std::future::Future<Output = Woken<T>>
            where
                F: FnMut(&mut Context<'_>) -> Poll<T>,
            {
                // Two flags rather than the word-sized Interest: the
                // future lives in every idle session's task.
                let (read, write) =
                    interest.map_or((false, false), |i| (i.is_readable(), i.is_writable()));
                std::future::poll_fn(move |cx| {
                    if let Poll::Ready(t) = other(cx) {
                        return Poll::Ready(Woken::Other(t));
                    }
                    let mut ready = tokio::io::Ready::EMPTY;
                    if read {
                        match self.poll_read_ready(cx) {
                            Poll::Ready(Ok(())) => ready |= tokio::io::Ready::READABLE,
                            Poll::Ready(Err(e)) => return Poll::Ready(Woken::Stream(Err(e))),
                            Poll::Pending => {}
                        }
                    }
                    if write {
                        match self.poll_write_ready(cx) {
                            Poll::Ready(Ok(())) => ready |= tokio::io::Ready::WRITABLE,
                            Poll::Ready(Err(e)) => return Poll::Ready(Woken::Stream(Err(e))),
                            Poll::Pending => {}
                        }
                    }
                    if ready.is_empty() {
                        Poll::Pending
                    } else {
                        Poll::Ready(Woken::Stream(Ok(ready)))
                    }
                })
            }
        }
    };
}
stream_impl!(tokio::net::TcpStream);
stream_impl!(tokio::net::UnixStream);

/// Values of the stop signal workers watch: running, SIGTERM, or listening
/// sockets handed to a new process.
pub const STOP_RUNNING: u8 = 0;
pub const STOP_TERMINATE: u8 = 1;
pub const STOP_HANDED_OFF: u8 = 2;

/// memcached's words when it is over its connection limit.
const TOO_MANY: &[u8] = b"ERROR Too many open connections\r\n";

/// A bound listening socket, not yet attached to any runtime, so that each
/// worker thread can register its own copy.
#[derive(Debug)]
pub enum BoundListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl BoundListener {
    /// Binds (before privileges are dropped).
    pub fn bind(listen: &Listen) -> io::Result<BoundListener> {
        match listen {
            Listen::Tcp(addr) => {
                let domain = socket2::Domain::for_address(*addr);
                let s = socket2::Socket::new(
                    domain,
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                // SO_REUSEADDR only lets a restart bind past connections in
                // TIME_WAIT. No SO_REUSEPORT: with it a second memrelay
                // started on the same port (a `-d` run twice) would bind
                // too, and clients would be split silently between two
                // proxies. A port in use fails the start, as in memcached;
                // a restart that keeps the port uses `--handoff`.
                s.set_reuse_address(true)?;
                if addr.is_ipv6() {
                    s.set_only_v6(false).ok();
                }
                s.bind(&(*addr).into())?;
                s.listen(1024)?;
                s.set_nonblocking(true)?;
                Ok(BoundListener::Tcp(s.into()))
            }
            Listen::Unix { path, mode } => {
                // Replace a stale socket file, but never anything else.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    } else {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ));
                    }
                }
                let l = std::os::unix::net::UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))?;
                l.set_nonblocking(true)?;
                Ok(BoundListener::Unix(l))
            }
        }
    }

    /// A listener handed over by another memrelay (see `handoff`).
    pub fn from_fd(listen: &Listen, fd: std::os::fd::OwnedFd) -> io::Result<BoundListener> {
        Ok(match listen {
            Listen::Tcp(_) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                BoundListener::Tcp(l)
            }
            Listen::Unix { .. } => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                BoundListener::Unix(l)
            }
        })
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            BoundListener::Tcp(l) => l.as_raw_fd(),
            BoundListener::Unix(l) => l.as_raw_fd(),
        }
    }

    pub fn try_clone(&self) -> io::Result<BoundListener> {
        Ok(match self {
            BoundListener::Tcp(l) => BoundListener::Tcp(l.try_clone()?),
            BoundListener::Unix(l) => BoundListener::Unix(l.try_clone()?),
        })
    }

    /// Accepts clients on the current worker until the process exits.
    /// Every worker accepts on its own copy of the socket; whichever is idle
    /// takes the next client.
    /// Stops when `stop` fires (SIGTERM): the clients already queued on the
    /// socket are accepted and served first, then the listener is closed.
    /// With `tls`, TCP clients are served over TLS (and only TLS), with
    /// the certificates of the configuration current when they connect;
    /// unix socket clients are not, whoever can open the socket is local.
    pub async fn accept_loop(
        self,
        worker: Rc<WorkerThread>,
        conns: Arc<AtomicUsize>,
        tls: bool,
        mut stop: tokio::sync::watch::Receiver<u8>,
    ) {
        match self {
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
                            if *stop.borrow() == STOP_HANDED_OFF {
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
    match tls::TlsStream::accept(s, config) {
        Ok(s) => start(s, worker, conns),
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
        start(s, worker, conns);
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

/// Serves a client counted in by `reserve` until it leaves.
fn start<S>(s: S, worker: &Rc<WorkerThread>, conns: &Arc<AtomicUsize>)
where
    S: Stream + 'static,
{
    let conns = conns.clone();
    // The session's own future is the task's: wrapping it in another async
    // block would keep a second copy of the stream in every task.
    tokio::task::spawn_local(session::serve(s, worker.clone(), move |thread| {
        release(thread, &conns)
    }));
}
