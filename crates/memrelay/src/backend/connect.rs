//! Reaching a server: a TCP connection, and with `--server-tls-ca` a TLS
//! handshake on it, both within the connect timeout.
//!
//! Every connection memrelay makes to a memcached server goes through
//! [`Dial::connect`]: the pipelined request connections ([`super::conn`]),
//! the probes ([`super::probe`]) and the resync's reads and copies
//! (`ha::resync`). So a server behind TLS is probed, flushed and resynced
//! over TLS too, and no path sends plaintext to it by mistake.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;

use crate::config::tls::ServerTls;
use crate::config::ServerAddr;
use crate::net::tls::TlsStream;
use crate::net::Stream;

/// How to reach one server: its address and, over TLS, the configuration
/// and the name its certificate is checked against. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct Dial {
    pub addr: SocketAddr,
    tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

impl Dial {
    /// How the configuration says to reach `server`.
    pub(crate) fn to(server: &ServerAddr, tls: Option<&ServerTls>) -> Dial {
        Dial {
            addr: server.addr,
            // The configuration refused a host without a checkable name.
            tls: tls.and_then(|t| Some((t.client.clone(), t.name_for(&server.host)?))),
        }
    }

    pub(crate) fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Connects (and shakes hands) within `timeout`. A server whose
    /// certificate is not trusted, or that does not speak TLS, fails here
    /// like one that refuses the connection; the error says which.
    pub(crate) async fn connect(&self, timeout: Duration) -> io::Result<ServerStream> {
        let run = async {
            let tcp = TcpStream::connect(self.addr).await?;
            let _ = tcp.set_nodelay(true);
            // Closed with a reset, never gracefully: the kernel then drops
            // what the server has not acknowledged, instead of sending it
            // on after the close. This process closes a connection with a
            // request in flight only when it gave the request up (answered
            // elsewhere), or when it dies (SIGKILL included: the kernel
            // closes its sockets); a write sent that way must not land
            // after newer ones once a partition heals (docs/ha.md).
            let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            match &self.tls {
                None => Ok(ServerStream::Plain(tcp)),
                Some((config, name)) => {
                    let tls = TlsStream::connect(tcp, config.clone(), name.clone()).await?;
                    Ok(ServerStream::Tls(Box::new(tls)))
                }
            }
        };
        match tokio::time::timeout(timeout, run).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                if self.is_tls() {
                    "connect or TLS handshake timed out"
                } else {
                    "connect timed out"
                },
            )),
        }
    }
}

/// A connection to a server, plain or TLS. The request connections
/// ([`super::conn`]) take the two apart and run a loop for each, so the
/// plain path has no branch per call; the probes and the resync, which are
/// not on any request's path, use this as a [`Stream`].
#[derive(Debug)]
pub(crate) enum ServerStream {
    Plain(TcpStream),
    // Boxed: rustls's session is a few KiB, a socket a few words.
    Tls(Box<TlsStream>),
}

impl Stream for ServerStream {
    async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        match self {
            ServerStream::Plain(s) => Stream::ready(s, interest).await,
            ServerStream::Tls(s) => s.ready(interest).await,
        }
    }

    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => Stream::try_write_vectored(s, bufs),
            ServerStream::Tls(s) => s.try_write_vectored(bufs),
        }
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => Stream::try_read(s, buf),
            ServerStream::Tls(s) => s.try_read(buf),
        }
    }

    fn read_drained(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        match self {
            ServerStream::Plain(s) => Stream::read_drained(s, buf),
            ServerStream::Tls(s) => s.read_drained(buf),
        }
    }

    fn backlogged(&self) -> bool {
        match self {
            ServerStream::Plain(_) => false,
            ServerStream::Tls(s) => s.backlogged(),
        }
    }
}

impl ServerStream {
    /// Writes a batch of pipelined requests, `ends` saying where each ends
    /// in `bytes`. Over TLS, in writes memcached reads without stalling
    /// ([`super::records`]), each once the last was sent; plain, at once.
    pub(crate) async fn write_requests(&self, bytes: &[u8], ends: &[usize]) -> io::Result<()> {
        let ServerStream::Tls(tls) = self else {
            return crate::net::write_all(self, bytes).await;
        };
        let mut done = 0;
        let mut next = 0;
        while done < bytes.len() {
            while tls.backlogged() {
                tls.ready(Interest::WRITABLE).await?;
            }
            while ends.get(next).is_some_and(|&e| e <= done) {
                next += 1;
            }
            let len = match super::records::next_write(
                ends[next..].iter().map(|&e| e - done),
                bytes.len() - done,
            ) {
                // Bytes after the last end: one more request.
                0 => bytes.len() - done,
                n => n,
            };
            let n = tls.try_write_vectored(&[io::IoSlice::new(&bytes[done..done + len])])?;
            done += n;
        }
        Ok(())
    }
}
