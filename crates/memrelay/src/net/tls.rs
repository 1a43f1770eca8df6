//! TLS on a TCP connection, behind the same readiness-based [`Stream`]
//! trait as a plain socket: towards clients (`--tls-cert`, a rustls server
//! session), so the client sessions do not know which one they serve, and
//! towards memcached servers (`--server-tls-ca`, a client session), so the
//! server connections, probes and resyncs do not either.
//!
//! rustls does no I/O itself: ciphertext read from the socket is handed to
//! it (`read_tls`), it decrypts into its own plaintext buffer, and what it
//! has to send (handshake messages, alerts, encrypted replies) waits in its
//! outgoing buffer until written to the socket (`write_tls`). Two things
//! follow that a plain socket does not have, and this module owns both:
//!
//! - Plaintext can be waiting inside rustls while the socket has nothing
//!   more: a session that stopped reading (pipeline full) and then waits
//!   for the socket to be readable would wait forever. [`Stream::ready`]
//!   therefore answers "readable" at once while rustls holds plaintext, a
//!   close, or an error.
//! - Ciphertext can be waiting while the session only waits to read (the
//!   handshake, or the tail of a reply rustls took whole). `ready` also
//!   waits for the socket to be writable while rustls wants to write, and
//!   flushes then, so the connection always makes progress.
//!
//! A connection to a server finishes its handshake before it is used
//! ([`TlsStream::connect`]), within the connect timeout: after it, rustls
//! encrypts what it is given at once, as for a client session (which writes
//! only after it read), so a writer never has plaintext waiting on a
//! handshake that only a read would advance.
//!
//! Nothing here touches the plain TCP path: a listener without TLS hands
//! its sockets to the sessions as they are, and a server without TLS gets
//! a plain socket.

use std::cell::{Cell, RefCell};
use std::io::{self, BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use tokio::io::{Interest, Ready};
use tokio::net::TcpStream;

use super::Stream;

/// Ciphertext rustls may hold for one client before a write is refused
/// (`WouldBlock`) until the socket takes some: what bounds a TLS client's
/// memory beyond the session's own reply queue. Four full records: enough
/// to keep a socket busy, small next to `--max-client-buffer`.
const CIPHERTEXT_LIMIT: usize = 64 * 1024;

/// How long a closing connection may take to send what rustls still holds
/// (the tail of the last reply, the closing alert). A plain socket leaves
/// that to the kernel; here it is ours to write, and a client that reads
/// nothing must not keep the task alive.
const FLUSH_AT_CLOSE: Duration = Duration::from_secs(5);

/// A connection over TLS: from a client, or to a server.
#[derive(Debug)]
pub(crate) struct TlsStream {
    tcp: TcpStream,
    /// The TLS session. Borrowed only inside a call, never across an
    /// await: the task that owns the stream is the only user.
    conn: RefCell<Connection>,
    /// The socket reached end of input: reads end once rustls is drained.
    eof: Cell<bool>,
    /// The peer broke the protocol (not TLS, a bad certificate, a bad
    /// record): the connection is over, reads say so.
    failed: Cell<bool>,
}

impl TlsStream {
    /// Starts the server side of a handshake on an accepted socket. The
    /// handshake itself happens as the session reads.
    pub(crate) fn accept(
        tcp: TcpStream,
        config: Arc<ServerConfig>,
    ) -> Result<TlsStream, rustls::Error> {
        let conn = ServerConnection::new(config)?;
        Ok(TlsStream::over(tcp, conn.into()))
    }

    /// The client side, on a socket connected to a server: the whole
    /// handshake, the server's certificate checked against `name`. The
    /// caller bounds the time it takes. A certificate the configuration
    /// does not trust (or a server that does not speak TLS) is an
    /// `InvalidData` error saying why.
    pub(crate) async fn connect(
        tcp: TcpStream,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> io::Result<TlsStream> {
        let conn = ClientConnection::new(config, name)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let stream = TlsStream::over(tcp, conn.into());
        loop {
            // Send what the handshake queued, then read the server's answer
            // until rustls has nothing more to ask.
            while stream.conn.borrow().wants_write() {
                stream.tcp.writable().await?;
                flush(&mut stream.conn.borrow_mut(), &stream.tcp)?;
            }
            if !stream.conn.borrow().is_handshaking() {
                // Every write is taken whole, so that write boundaries are
                // record boundaries (`backend::records`): the callers bound
                // what they hand over instead (one batch at a time, and
                // only once the socket took the last: `backlogged`).
                stream.conn.borrow_mut().set_buffer_limit(None);
                return Ok(stream);
            }
            stream.tcp.readable().await?;
            let mut conn = stream.conn.borrow_mut();
            match conn.read_tls(&mut Socket(&stream.tcp)) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = conn.process_new_packets() {
                // The alert saying why goes to the server, best effort.
                let _ = flush(&mut conn, &stream.tcp);
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
        }
    }

    fn over(tcp: TcpStream, mut conn: Connection) -> TlsStream {
        conn.set_buffer_limit(Some(CIPHERTEXT_LIMIT));
        TlsStream {
            tcp,
            conn: RefCell::new(conn),
            eof: Cell::new(false),
            failed: Cell::new(false),
        }
    }

    /// Whether a read would return something now without the socket:
    /// plaintext already decrypted, the end of input, or an error.
    fn readable_now(&self, conn: &mut Connection) -> bool {
        if self.failed.get() || self.eof.get() {
            return true;
        }
        match conn.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            Err(_) => true,
        }
    }

    /// Hands plaintext to `take` (which says how much it took), reading
    /// and decrypting more from the socket when rustls has none. `Ok(0)`
    /// is the end of input, clean (`close_notify`) or not (memcached's
    /// protocol frames its own messages, so a cut-off request is seen as
    /// incomplete anyway).
    fn pull(&self, take: &mut dyn FnMut(&[u8]) -> usize) -> io::Result<usize> {
        let mut conn = self.conn.borrow_mut();
        loop {
            let mut reader = conn.reader();
            match reader.fill_buf() {
                Ok([]) => return Ok(0),
                Ok(chunk) => {
                    let n = take(chunk);
                    reader.consume(n);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            if self.failed.get() {
                return Err(io::ErrorKind::InvalidData.into());
            }
            if self.eof.get() {
                return Ok(0);
            }
            match conn.read_tls(&mut Socket(&self.tcp)) {
                Ok(0) => self.eof.set(true),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Whatever the handshake queued goes out now, so the
                    // peer is not left waiting for it.
                    flush(&mut conn, &self.tcp)?;
                    return Err(e);
                }
                Err(e) => return Err(e),
            }
            if let Err(e) = conn.process_new_packets() {
                self.failed.set(true);
                // rustls queued an alert telling the peer why: send it,
                // best effort.
                let _ = flush(&mut conn, &self.tcp);
                tracing::debug!(error = %e, "TLS error, closing the connection");
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            flush(&mut conn, &self.tcp)?;
        }
    }
}

/// Writes what rustls wants to send until the socket is full. `WouldBlock`
/// is not an error here: the rest waits for the socket to be writable.
fn flush(conn: &mut Connection, tcp: &TcpStream) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(&mut Socket(tcp)) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The socket as rustls reads and writes it: tokio's non-blocking calls,
/// which clear the readiness they consumed when they meet `WouldBlock`.
struct Socket<'a>(&'a TcpStream);

impl io::Read for Socket<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl io::Write for Socket<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for TlsStream {
    fn abort(&self) {
        self.tcp.abort();
    }
    async fn ready(&self, interest: Interest) -> io::Result<Ready> {
        loop {
            let wants_write = {
                let mut conn = self.conn.borrow_mut();
                let mut now = Ready::EMPTY;
                if interest.is_readable() && self.readable_now(&mut conn) {
                    now |= Ready::READABLE;
                }
                // Room for more replies once rustls has sent what it holds.
                // (A session writes only replies, so only after it read a
                // request: after the handshake, when rustls encrypts what
                // it takes at once instead of holding it as plaintext.)
                let wants_write = conn.wants_write();
                if interest.is_writable() && !wants_write {
                    now |= Ready::WRITABLE;
                }
                if !now.is_empty() {
                    return Ok(now);
                }
                wants_write
            };
            let socket_interest = match (interest.is_readable(), wants_write) {
                (true, true) => Interest::READABLE | Interest::WRITABLE,
                (true, false) => Interest::READABLE,
                (false, true) => Interest::WRITABLE,
                (false, false) => interest,
            };
            let r = self.tcp.ready(socket_interest).await?;
            if r.is_writable() && wants_write {
                flush(&mut self.conn.borrow_mut(), &self.tcp)?;
            }
            if interest.is_readable() && (r.is_readable() || r.is_read_closed()) {
                // Ciphertext (or the end) is there: the session's read
                // decrypts it. It may turn out to be only handshake, and
                // the read says WouldBlock: the session then waits again.
                return Ok(Ready::READABLE);
            }
        }
    }

    fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let mut conn = self.conn.borrow_mut();
        flush(&mut conn, &self.tcp)?;
        // rustls takes what fits under CIPHERTEXT_LIMIT and encrypts it
        // into as few records as the slices allow.
        let n = conn.writer().write_vectored(bufs)?;
        flush(&mut conn, &self.tcp)?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // Full: ready(WRITABLE) returns once the socket took it all.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        self.pull(&mut |chunk| {
            let n = chunk.len().min(buf.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            n
        })
    }

    fn read_drained(&self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        // Up to the buffer's spare room (at least one small read: rustls
        // hands out records, and a copy grows the buffer if it must).
        let room = (buf.capacity() - buf.len()).max(4096);
        let mut got = 0;
        while got < room {
            let r = self.pull(&mut |chunk| {
                let n = chunk.len().min(room - got);
                buf.extend_from_slice(&chunk[..n]);
                n
            });
            match r {
                Ok(0) if got == 0 => return Ok(0),
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if got > 0 && e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    fn handshaking(&self) -> bool {
        self.conn.borrow().is_handshaking()
    }

    fn backlogged(&self) -> bool {
        let mut conn = self.conn.borrow_mut();
        // Whatever the socket takes now does not count.
        let _ = flush(&mut conn, &self.tcp);
        conn.wants_write()
    }

    async fn finish(&self) {
        if !self.failed.get() {
            self.conn.borrow_mut().send_close_notify();
        }
        let _ = tokio::time::timeout(FLUSH_AT_CLOSE, async {
            while self.conn.borrow().wants_write() {
                self.tcp.ready(Interest::WRITABLE).await?;
                flush(&mut self.conn.borrow_mut(), &self.tcp)?;
            }
            Ok::<_, io::Error>(())
        })
        .await;
    }
}
