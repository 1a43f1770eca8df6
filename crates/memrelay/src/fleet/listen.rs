//! The peers' connections to this memrelay: each proves the fleet's secret,
//! then sends hints, each answered once learnt.

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::link::read_line;
use super::{wire, Fleet};

/// Time a peer has to prove the secret.
const HANDSHAKE: Duration = Duration::from_secs(2);

/// A peer pings every half second: one silent this long is gone.
const SILENT: Duration = Duration::from_secs(10);

/// How often a listener that cannot bind (the port still held, as during
/// a hand-off) tries again.
const BIND_AGAIN: Duration = Duration::from_millis(100);

/// Connections served at once: each peer needs one; the rest is room for
/// a peer's reconnect before its old connection is seen closed.
fn most_connections(peers: usize) -> usize {
    2 * peers + 4
}

/// Starts the thread that takes the peers' connections.
pub(super) fn start(fleet: &Arc<Fleet>) {
    let me = Arc::downgrade(fleet);
    let addr = fleet.cfg.listen;
    let spawned = std::thread::Builder::new()
        .name("memrelay-fleet".into())
        .spawn(move || {
            let Some(listener) = bind(&me, addr) else {
                return;
            };
            let open = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming() {
                let Some(fleet) = me.upgrade() else {
                    return;
                };
                if !fleet.listening.load(Ordering::Acquire) {
                    tracing::info!(listen = %addr, "fleet: the new memrelay takes the peers' connections");
                    return;
                }
                let Ok(stream) = stream else {
                    continue;
                };
                if open.load(Ordering::Acquire) >= most_connections(fleet.links.len()) {
                    tracing::warn!(listen = %addr, "fleet: too many peer connections; one refused");
                    continue;
                }
                serve_on_a_thread(fleet, stream, open.clone());
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "fleet: cannot take the peers' connections");
    }
}

/// Binds `addr`, trying again while the port is held (by the process
/// this one took over from, which frees it at the hand-off).
fn bind(fleet: &std::sync::Weak<Fleet>, addr: SocketAddr) -> Option<TcpListener> {
    let mut warned = false;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => {
                if warned {
                    tracing::info!(listen = %addr, "fleet: listening for peers");
                }
                return Some(l);
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(listen = %addr, error = %e, "fleet: cannot listen for peers yet; trying again");
                    warned = true;
                }
            }
        }
        fleet
            .upgrade()
            .filter(|f| f.listening.load(Ordering::Acquire))?;
        std::thread::sleep(BIND_AGAIN);
    }
}

/// Wakes a listener blocked in accept, so it sees it must stop.
pub(super) fn wake(addr: &SocketAddr) {
    let mut to = *addr;
    if to.ip().is_unspecified() {
        to.set_ip(match to {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let _ = TcpStream::connect_timeout(&to, Duration::from_millis(200));
}

fn serve_on_a_thread(fleet: Arc<Fleet>, stream: TcpStream, open: Arc<AtomicUsize>) {
    open.fetch_add(1, Ordering::AcqRel);
    let peer = stream.peer_addr().ok();
    let spawned = std::thread::Builder::new()
        .name("memrelay-fleet-peer".into())
        .spawn(move || {
            if let Err(why) = serve(&fleet, stream) {
                tracing::debug!(peer = ?peer, error = why, "fleet: a peer's connection ended");
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "fleet: cannot serve a peer's connection");
    }
}

/// Serves one peer's connection until it closes or misbehaves.
fn serve(fleet: &Fleet, stream: TcpStream) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(HANDSHAKE))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(HANDSHAKE))
        .map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let (listen, instance) = handshake(fleet, &mut reader, &mut writer)?;
    reader
        .get_ref()
        .set_read_timeout(Some(SILENT))
        .map_err(|e| e.to_string())?;
    loop {
        let line = match read_line(&mut reader) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        match wire::parse_line(&line) {
            Ok(wire::Line::Ping) => {}
            Ok(wire::Line::Epoch(stage)) => fleet.peer_said(listen, &instance, stage),
            Ok(wire::Line::Joined) => fleet.peer_connected(listen, &instance),
            Ok(wire::Line::Hint(h)) => fleet.learn(h.server, h.key.as_deref(), h.held),
            // Only in an answer to `sync`, which this side does not ask.
            Ok(wire::Line::Forgot(_)) => {}
            Ok(wire::Line::Routing) => {
                let mut out = fleet.stage_line().unwrap_or_default();
                out.extend_from_slice(fleet.routings().as_bytes());
                out.extend_from_slice(b"end\n");
                writer.write_all(&out).map_err(|e| e.to_string())?;
                continue;
            }
            Ok(wire::Line::Sync) => {
                // Every listed key, then `end` (instead of `k`).
                let mut out = Vec::new();
                for (server, keys) in fleet.known() {
                    super::push_hints(&mut out, &server, keys.as_deref());
                }
                for server in fleet.forgotten() {
                    out.extend_from_slice(&wire::forgot(&server));
                }
                out.extend_from_slice(b"end\n");
                writer.write_all(&out).map_err(|e| e.to_string())?;
                continue;
            }
            Err(why) => {
                let _ = writer.write_all(format!("error {why}\n").as_bytes());
                return Err(why.to_string());
            }
        }
        writer.write_all(b"k\n").map_err(|e| e.to_string())?;
    }
}

/// The listener's side of the proof (see `wire`).
/// Returns where the peer listens and its process's instance.
fn handshake(
    fleet: &Fleet,
    reader: &mut BufReader<TcpStream>,
    writer: &mut TcpStream,
) -> Result<(SocketAddr, String), String> {
    let hello = read_line(reader).map_err(|e| e.to_string())?;
    let hello = wire::parse_hello(&hello).map_err(|why| {
        let _ = writer.write_all(format!("error {why}\n").as_bytes());
        if why == "unsupported version" {
            tracing::warn!(peer = ?writer.peer_addr().ok(), "fleet: refused a member of another release: a fleet's members run the same release");
        }
        why.to_string()
    })?;
    let (theirs, instance) = (hello.nonce, hello.instance);
    if instance == fleet.instance {
        let _ = writer.write_all(b"error self\n");
        return Err("this memrelay dialled itself".into());
    }
    let secret = fleet.cfg.secret.bytes();
    let mine = wire::nonce();
    let challenge = wire::challenge(
        &mine,
        &wire::proof(secret, wire::Role::Listener, theirs, &mine),
        &fleet.instance,
    );
    writer
        .write_all(challenge.as_bytes())
        .map_err(|e| e.to_string())?;
    let auth = read_line(reader).map_err(|e| e.to_string())?;
    let proof = wire::parse_auth(&auth).unwrap_or("");
    if !wire::verify(secret, wire::Role::Dialer, theirs, &mine, proof) {
        let _ = writer.write_all(b"error not a member of this fleet\n");
        tracing::warn!(peer = ?writer.peer_addr().ok(), "fleet: refused a connection that does not know the fleet's secret");
        return Err("wrong secret".into());
    }
    writer.write_all(b"ok\n").map_err(|e| e.to_string())?;
    // Its link to this process is dialled now if it reaches an older one.
    fleet.peer_dialled(hello.listen, instance);
    Ok((hello.listen, instance.to_string()))
}
