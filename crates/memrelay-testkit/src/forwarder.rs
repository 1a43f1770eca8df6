//! A fault-injecting TCP forwarder: a fake link, named as such, for what a
//! real network cannot be told to do on loopback. Put between one memrelay
//! and one server, it makes a *partial* partition: that memrelay loses the
//! server while the others still reach it.
//!
//! Faults, switched at any time:
//! - `Pass`: bytes flow both ways;
//! - `Blackhole`: nothing moves, connections stay open (a silent network:
//!   the peer waits for its timeout). As over TCP, nothing is lost either:
//!   what was sent meanwhile moves on, in order, once the link is healed,
//!   unless the sender reset its connection (then it is discarded, as a
//!   reset discards a socket's unsent data);
//! - `Reset`: every connection is closed with a reset, new ones too;
//! - `Delay(d)`: each chunk is held `d` before it is passed on.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::process::join_host_port;

/// What the forwarder does to the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Blackhole,
    Reset,
    Delay(Duration),
}

impl Fault {
    fn encode(self) -> u64 {
        match self {
            Fault::Pass => 0,
            Fault::Blackhole => 1,
            Fault::Reset => 2,
            // Stored in microseconds, above the three codes.
            Fault::Delay(d) => 3 + d.as_micros() as u64,
        }
    }

    fn decode(v: u64) -> Fault {
        match v {
            0 => Fault::Pass,
            1 => Fault::Blackhole,
            2 => Fault::Reset,
            n => Fault::Delay(Duration::from_micros(n - 3)),
        }
    }
}

/// How often a pump looks at the fault while no bytes come.
const TICK: Duration = Duration::from_millis(20);

/// A forwarder from a loopback port to `target`; stopped when dropped.
#[derive(Debug)]
pub struct Forwarder {
    port: u16,
    link: Arc<Link>,
}

/// What the forwarder's threads share.
#[derive(Debug, Default)]
struct Link {
    fault: AtomicU64,
    stop: AtomicBool,
    /// Directions of connections holding bytes for a silent link.
    holding: AtomicUsize,
    /// Bytes read from senders while the link was silent, not passed on
    /// or discarded yet.
    held_bytes: AtomicUsize,
    /// Connections reset as they came, while the fault was `Reset`.
    resets: AtomicUsize,
}

impl Link {
    fn fault(&self) -> Fault {
        Fault::decode(self.fault.load(Ordering::SeqCst))
    }
}

impl Forwarder {
    /// Listens on a free 127.0.0.1 port and forwards to `target`.
    pub fn start(target: &str) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking forwarder");
        let link = Arc::new(Link::default());
        let (l, target) = (link.clone(), target.to_string());
        thread::spawn(move || accept(listener, &target, &l));
        Forwarder { port, link }
    }

    pub fn addr(&self) -> String {
        join_host_port("127.0.0.1", self.port)
    }

    /// From now on, do this to the bytes (and connections).
    pub fn set(&self, fault: Fault) {
        self.link.fault.store(fault.encode(), Ordering::SeqCst);
    }

    pub fn fault(&self) -> Fault {
        self.link.fault()
    }

    /// Connections (each direction counted) still holding bytes from a
    /// blackhole: once the link is healed and this is 0, what was held
    /// has been passed on, or discarded because its sender reset.
    pub fn holding(&self) -> usize {
        self.link.holding.load(Ordering::SeqCst)
    }

    /// Bytes senders sent into the silent link that it has not passed on
    /// or discarded yet (what a test waits for before it heals the link,
    /// to know a request is held there).
    pub fn held_bytes(&self) -> usize {
        self.link.held_bytes.load(Ordering::SeqCst)
    }

    /// Connections reset as they came (under `Reset`): what a test waits
    /// for to know that a dial through the link was tried and failed.
    pub fn resets(&self) -> usize {
        self.link.resets.load(Ordering::SeqCst)
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.link.stop.store(true, Ordering::SeqCst);
    }
}

fn accept(listener: TcpListener, target: &str, link: &Arc<Link>) {
    while !link.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                thread::sleep(TICK);
                continue;
            }
        };
        let _ = client.set_nonblocking(false);
        // A link forwards bytes as they come: with Nagle's algorithm on
        // its two sockets, each small write after another would wait for
        // an acknowledgement (up to 40 ms of delayed ACK on loopback),
        // slowing every request-and-answer exchange through it.
        let _ = client.set_nodelay(true);
        if link.fault() == Fault::Reset {
            reset(&client);
            link.resets.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        // Blackholed: the connection is taken and nothing reaches the
        // server (a connect that succeeds into silence).
        let server = match TcpStream::connect(target) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                s
            }
            Err(_) => {
                reset(&client);
                continue;
            }
        };
        for (from, to) in [
            (client.try_clone(), server.try_clone()),
            (server.try_clone(), client.try_clone()),
        ] {
            let (Ok(from), Ok(to)) = (from, to) else {
                continue;
            };
            let link = link.clone();
            thread::spawn(move || pump(from, to, &link));
        }
    }
}

/// Copies `from` to `to` as the fault says, until either end closes.
fn pump(mut from: TcpStream, mut to: TcpStream, link: &Link) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 * 1024];
    // Bytes read but not passed on yet (read as the link went silent).
    let mut unsent: Option<usize> = None;
    // Whether this pump is holding bytes (or its socket's) for a silent link.
    let mut held = false;
    // The sender closed, or reset, while the link was silent.
    let (mut ended, mut was_reset) = (false, false);
    let release = |held: &mut bool| {
        if std::mem::take(held) {
            link.holding.fetch_sub(1, Ordering::SeqCst);
        }
    };
    while !link.stop.load(Ordering::SeqCst) {
        let fault = link.fault();
        if fault == Fault::Reset {
            reset(&from);
            reset(&to);
            release(&mut held);
            return;
        }
        if fault == Fault::Blackhole {
            if !held {
                held = true;
                link.holding.fetch_add(1, Ordering::SeqCst);
            }
            // Taken in (up to one buffer), so `held_bytes` shows it; the
            // sender's end of the connection is still looked at on heal.
            if unsent.is_none() && !ended {
                match from.read(&mut buf) {
                    Ok(0) => ended = true,
                    Ok(n) => {
                        unsent = Some(n);
                        link.held_bytes.fetch_add(n, Ordering::SeqCst);
                    }
                    Err(e) if is_quiet(&e) => {}
                    Err(_) => (ended, was_reset) = (true, true),
                }
            } else {
                thread::sleep(TICK);
            }
            continue;
        }
        // Healed. A sender that reset its connection meanwhile never got
        // its bytes across (the silent link acknowledged nothing), and a
        // reset discards what a socket has not sent.
        if held && (was_reset || is_reset(&from)) {
            if let Some(n) = unsent.take() {
                link.held_bytes.fetch_sub(n, Ordering::SeqCst);
            }
            reset(&to);
            release(&mut held);
            return;
        }
        if ended && unsent.is_none() {
            break;
        }
        let n = match unsent.take() {
            Some(n) => {
                link.held_bytes.fetch_sub(n, Ordering::SeqCst);
                n
            }
            None => match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if is_quiet(&e) => {
                    // Nothing was held after all.
                    release(&mut held);
                    continue;
                }
                Err(_) => {
                    reset(&to);
                    release(&mut held);
                    return;
                }
            },
        };
        // The fault when the bytes came decides their fate.
        match link.fault() {
            Fault::Blackhole => {
                unsent = Some(n);
                link.held_bytes.fetch_add(n, Ordering::SeqCst);
                continue;
            }
            Fault::Reset => continue,
            Fault::Delay(d) => thread::sleep(d),
            Fault::Pass => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        release(&mut held);
    }
    release(&mut held);
    let _ = to.shutdown(Shutdown::Write);
}

/// Whether the peer reset the connection: the socket is closed (a reset
/// moves it straight to CLOSE; a peer's FIN leaves it in CLOSE_WAIT). Asked
/// of the socket's state, not of its pending error: the other direction's
/// pump, writing to this socket, takes that error first (a write to a
/// reset socket returns it and clears it), and held bytes would then pass.
fn is_reset(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: an all-zero tcp_info is valid plain data; getsockopt writes
    // at most `len` bytes into it and touches nothing else.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: as above; the fd is open for the call (borrowed from `s`).
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    const TCP_CLOSE: u8 = 7;
    rc == 0 && info.tcpi_state == TCP_CLOSE
}

/// A read that found nothing yet (the pump's read timeout).
fn is_quiet(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Closes with a reset (SO_LINGER 0), as a router that refuses would.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    let _ = s.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_is_seen_after_a_write_took_the_sockets_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut ours, _) = l.accept().unwrap();
        assert!(!is_reset(&ours), "a live connection");
        reset(&client);
        drop(client);
        // The other pump writes to the reset socket: the write fails (at
        // once or at the next) and takes the pending error with it.
        let took = crate::process::wait_until(Duration::from_secs(5), || {
            ours.write_all(b"reply\r\n").is_err()
        });
        assert!(took, "a write to a reset socket fails");
        assert!(matches!(ours.take_error(), Ok(None)), "the error is gone");
        assert!(is_reset(&ours), "the state still says reset");
        // A sender that closes gracefully did not reset: what it sent
        // before its FIN is delivered.
        let client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (ours, _) = l.accept().unwrap();
        drop(client);
        let mut buf = [0u8; 8];
        assert_eq!((&ours).read(&mut buf).unwrap(), 0, "the FIN came");
        assert!(!is_reset(&ours), "a FIN is no reset");
    }
}
