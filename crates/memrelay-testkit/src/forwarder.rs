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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    fault: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    /// Listens on a free 127.0.0.1 port and forwards to `target`.
    pub fn start(target: &str) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a forwarder");
        let port = listener.local_addr().expect("forwarder address").port();
        listener
            .set_nonblocking(true)
            .expect("nonblocking forwarder");
        let fault = Arc::new(AtomicU64::new(Fault::Pass.encode()));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, s, target) = (fault.clone(), stop.clone(), target.to_string());
        thread::spawn(move || accept(listener, &target, &f, &s));
        Forwarder { port, fault, stop }
    }

    pub fn addr(&self) -> String {
        join_host_port("127.0.0.1", self.port)
    }

    /// From now on, do this to the bytes (and connections).
    pub fn set(&self, fault: Fault) {
        self.fault.store(fault.encode(), Ordering::SeqCst);
    }

    pub fn fault(&self) -> Fault {
        Fault::decode(self.fault.load(Ordering::SeqCst))
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn accept(listener: TcpListener, target: &str, fault: &Arc<AtomicU64>, stop: &Arc<AtomicBool>) {
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((c, _)) => c,
            Err(_) => {
                thread::sleep(TICK);
                continue;
            }
        };
        let _ = client.set_nonblocking(false);
        if Fault::decode(fault.load(Ordering::SeqCst)) == Fault::Reset {
            reset(&client);
            continue;
        }
        // Blackholed: the connection is taken and nothing reaches the
        // server (a connect that succeeds into silence).
        let server = match TcpStream::connect(target) {
            Ok(s) => s,
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
            let (fault, stop) = (fault.clone(), stop.clone());
            thread::spawn(move || pump(from, to, &fault, &stop));
        }
    }
}

/// Copies `from` to `to` as the fault says, until either end closes.
fn pump(mut from: TcpStream, mut to: TcpStream, fault: &AtomicU64, stop: &AtomicBool) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let f = Fault::decode(fault.load(Ordering::SeqCst));
        if f == Fault::Reset {
            reset(&from);
            reset(&to);
            return;
        }
        if f == Fault::Blackhole {
            // Held in the sockets' buffers until the link heals.
            thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        // Bytes read as the link went silent wait for it to heal.
        loop {
            match Fault::decode(fault.load(Ordering::SeqCst)) {
                Fault::Reset => {
                    reset(&from);
                    reset(&to);
                    return;
                }
                Fault::Blackhole if !stop.load(Ordering::SeqCst) => thread::sleep(TICK),
                Fault::Blackhole => return,
                Fault::Delay(d) => {
                    thread::sleep(d);
                    break;
                }
                Fault::Pass => break,
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Closes with a reset (SO_LINGER 0), as a router that refuses would.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
    let _ = s.shutdown(Shutdown::Both);
}
