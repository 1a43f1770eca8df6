//! Sockets: the streams memrelay talks over (plain, or TLS: [`tls`]),
//! binding listeners, and the byte-queue and wake-up helpers the sessions
//! and backends share. Accepting clients is the proxy's (`proxy::accept`):
//! this layer knows no sessions.

pub(crate) mod handoff;
pub(crate) mod notify;
pub(crate) mod outqueue;
pub(crate) mod tls;

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::task::{Context, Poll};

use crate::config::Listen;

/// The byte streams memrelay talks over (TCP, unix sockets, TLS over TCP:
/// [`tls::TlsStream`]), through tokio's readiness API: no futures per read or write, and no system call
/// that is known in advance to return `EAGAIN`.
pub(crate) trait Stream {
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
    /// Closes with a reset once dropped (`SO_LINGER` 0): what the kernel
    /// has not sent yet is discarded rather than delivered late. For a
    /// server connection given up on (a timeout), whose requests were
    /// answered from other replicas and recorded as missed there: a write
    /// delivered after that could land after the key's invalidation.
    fn abort(&self) {}
    /// Whether an idle session on this stream may hand its socket to the
    /// worker's parking lot (`proxy::park`): a plain socket may, TLS may not.
    fn parkable(&self) -> bool {
        false
    }
    /// The socket, out of tokio's hands, for the parking lot (only called
    /// when `parkable`).
    fn into_parked(self) -> io::Result<ParkedSocket>
    where
        Self: Sized,
    {
        Err(io::ErrorKind::Unsupported.into())
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
pub(crate) enum Woken<T> {
    /// The stream is ready (or failed).
    Stream(io::Result<tokio::io::Ready>),
    /// The other source is.
    Other(T),
}

/// Writes all of `bytes`, waiting for room as needed (for the connections
/// that send one request and wait for its reply: probes, resync).
pub(crate) async fn write_all(s: &impl Stream, mut bytes: &[u8]) -> io::Result<()> {
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
pub(crate) async fn read_some(s: &impl Stream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.try_read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                s.ready(tokio::io::Interest::READABLE).await?;
            }
            r => return r,
        }
    }
}

/// A client's socket out of tokio's hands, parked while its client is idle
/// (`proxy::park`).
#[derive(Debug)]
pub(crate) enum ParkedSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl ParkedSocket {
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            ParkedSocket::Tcp(s) => s.as_raw_fd(),
            ParkedSocket::Unix(s) => s.as_raw_fd(),
        }
    }
}

macro_rules! stream_impl {
    ($t:ty, $parked:path) => {
        impl Stream for $t {
            fn parkable(&self) -> bool {
                true
            }
            fn abort(&self) {
                let _ = socket2::SockRef::from(self).set_linger(Some(std::time::Duration::ZERO));
            }
            fn into_parked(self) -> io::Result<ParkedSocket> {
                self.into_std().map($parked)
            }
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
                    let room = buf.capacity() - buf.len();
                    let n = crate::sys::recv_into_spare(&socket2::SockRef::from(self), buf)?;
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
stream_impl!(tokio::net::TcpStream, ParkedSocket::Tcp);
stream_impl!(tokio::net::UnixStream, ParkedSocket::Unix);

/// Connections queued on a listening socket before memrelay accepts them.
const LISTEN_BACKLOG: i32 = 1024;

/// A bound listening socket, not yet attached to any runtime, so that each
/// worker thread can register its own copy.
#[derive(Debug)]
pub(crate) enum BoundListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

impl BoundListener {
    /// Binds (before privileges are dropped).
    pub(crate) fn bind(listen: &Listen) -> io::Result<BoundListener> {
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
                // Not listening yet (`listen`): the port is ours, and a
                // client that connects before memrelay serves is refused
                // at once instead of waiting in the queue.
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
                // Bound, not listening yet, as for TCP above.
                let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
                s.bind(&socket2::SockAddr::unix(path)?)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))?;
                s.set_nonblocking(true)?;
                Ok(BoundListener::Unix(std::os::fd::OwnedFd::from(s).into()))
            }
        }
    }

    /// Starts accepting connections, once memrelay can serve them: it
    /// bound the socket at start (a port in use fails the start), but a
    /// start can take seconds (the state file, the fleet's peers, the
    /// servers' identities). A socket handed over is listening already;
    /// listening again only sets its queue's length.
    pub(crate) fn listen(&self) -> io::Result<()> {
        match self {
            BoundListener::Tcp(l) => socket2::SockRef::from(l).listen(LISTEN_BACKLOG),
            BoundListener::Unix(l) => socket2::SockRef::from(l).listen(LISTEN_BACKLOG),
        }
    }

    /// A listener handed over by another memrelay (see `handoff`).
    pub(crate) fn from_fd(listen: &Listen, fd: std::os::fd::OwnedFd) -> io::Result<BoundListener> {
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

    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            BoundListener::Tcp(l) => l.as_raw_fd(),
            BoundListener::Unix(l) => l.as_raw_fd(),
        }
    }

    pub(crate) fn try_clone(&self) -> io::Result<BoundListener> {
        Ok(match self {
            BoundListener::Tcp(l) => BoundListener::Tcp(l.try_clone()?),
            BoundListener::Unix(l) => BoundListener::Unix(l.try_clone()?),
        })
    }
}
