//! The connection this memrelay dials to one peer, and the thread that
//! keeps it: reached again, the peer is sent every listed key before any
//! new hint; while up, it is pinged so a dead peer is noticed without a
//! hint waiting on it.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{wire, Fleet};

/// How often a reached peer is pinged, and an unreached one dialled.
const EVERY: Duration = Duration::from_millis(500);

/// Lines sent before their answers are read, when a peer reached again is
/// sent what the lists hold.
const BATCH: usize = 256;

/// One peer's connection (None while it is not reached).
#[derive(Debug)]
pub(super) struct Link {
    index: usize,
    pub(super) addr: SocketAddr,
    conn: Mutex<Option<Conn>>,
    /// The peer's process as its own connection to this one last named
    /// it: a connection to another (older) process is stale.
    current: Mutex<Option<String>>,
    /// Wakes the keeper before its next turn.
    kick: (Mutex<bool>, Condvar),
    /// The address reaches this process (its own entry in the peer list,
    /// under another address than `--peer-listen`): not a peer.
    pub(super) myself: std::sync::atomic::AtomicBool,
    /// Where the peer says it listens, when that is not `addr` (a NAT, a
    /// forwarder): learnt from the process this link reaches, so that
    /// its next process (a restart, a hand-off) is known by it too.
    listens: Mutex<Option<SocketAddr>>,
}

#[derive(Debug)]
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The peer process this connection reaches.
    instance: String,
    /// How long each answer may take.
    each: Duration,
    /// When the whole exchange under way must be over, if it must: a
    /// peer dialled again while a client's reply waits (`again`) gets
    /// what is left of the batch's `--peer-timeout`, however many lines
    /// its lists hold and however slow its link.
    deadline: Option<Instant>,
}

/// Why a dial did not give a connection.
enum Refused {
    /// The address is this process's own listener.
    Myself,
    Failed(String),
}

impl Link {
    pub(super) fn new(index: usize, addr: SocketAddr) -> Link {
        Link {
            index,
            addr,
            conn: Mutex::new(None),
            current: Mutex::new(None),
            kick: (Mutex::new(false), Condvar::new()),
            myself: std::sync::atomic::AtomicBool::new(false),
            listens: Mutex::new(None),
        }
    }

    /// Whether the peer listens on `listen`: this link's address, or the
    /// one the process it reaches said it listens on.
    pub(super) fn listens_on(&self, listen: SocketAddr) -> bool {
        self.addr == listen
            || *self.listens.lock().unwrap_or_else(|p| p.into_inner()) == Some(listen)
    }

    /// The process this link reaches says it listens on `listen`.
    pub(super) fn heard_listen(&self, listen: SocketAddr) {
        *self.listens.lock().unwrap_or_else(|p| p.into_inner()) = Some(listen);
    }

    /// The peer's process `instance` connected to this one: if this
    /// link reaches another process (the peer restarted), or none, its
    /// keeper dials the new one now.
    pub(super) fn peer_is(&self, instance: &str) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(instance.to_string());
        self.kick();
    }

    /// Makes the keeper take its turn now (to tell the peer this
    /// member's new stage).
    pub(super) fn kick(&self) {
        let (lock, cv) = &self.kick;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
    }

    /// Waits for the keeper's next turn: `EVERY`, or a kick.
    fn wait_turn(&self) {
        let (lock, cv) = &self.kick;
        let kicked = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (mut kicked, _) = cv
            .wait_timeout_while(kicked, EVERY, |k| !*k)
            .unwrap_or_else(|p| p.into_inner());
        *kicked = false;
    }

    /// Whether the peer's process is `instance`, as this link last
    /// reached it.
    pub(super) fn reaches(&self, instance: &str) -> bool {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            == Some(instance)
    }

    /// Whether `conn` reaches a process the peer replaced.
    fn stale(&self, conn: &Conn) -> bool {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|c| *c != conn.instance)
    }

    fn lock(&self) -> MutexGuard<'_, Option<Conn>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Conn {
    /// Sets the socket's timeouts for the next read or write: `each`, or
    /// what is left before the deadline if that is less.
    fn arm(&mut self) -> std::io::Result<()> {
        let mut t = self.each;
        if let Some(d) = self.deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the peer took longer than --peer-timeout to be reached again",
                ));
            }
            t = t.min(left);
        }
        self.writer.set_read_timeout(Some(t))?;
        self.writer.set_write_timeout(Some(t))
    }

    /// Arms the socket before a read that must wait (answers already
    /// read in take no wait, and no system call).
    fn arm_read(&mut self) -> std::io::Result<()> {
        if self.reader.buffer().is_empty() {
            self.arm()?;
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        if self.deadline.is_some() {
            self.arm()?;
        }
        self.writer.write_all(bytes)
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        if self.deadline.is_some() {
            self.arm_read()?;
        }
        read_line(&mut self.reader)
    }

    /// Sends `lines` and reads one `k` per line.
    fn exchange(&mut self, lines: &[u8], count: usize) -> std::io::Result<()> {
        self.write(lines)?;
        for _ in 0..count {
            if self.deadline.is_some() {
                self.arm_read()?;
            }
            read_ack(&mut self.reader)?;
        }
        Ok(())
    }

    /// The exchange that had a deadline is over: each answer gets its own
    /// timeout again.
    fn undeadline(&mut self) {
        self.deadline = None;
        let t = Some(self.each);
        let _ = self.writer.set_read_timeout(t);
        let _ = self.writer.set_write_timeout(t);
    }
}

fn read_ack(reader: &mut BufReader<TcpStream>) -> std::io::Result<()> {
    let mut ack = String::new();
    std::io::Read::take(&mut *reader, 16).read_line(&mut ack)?;
    if ack == "k\n" {
        Ok(())
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the peer answered {ack:?}"),
        ))
    }
}

/// How long a read of answers already due waits: they have arrived, or
/// they are late.
const LAST_LOOK: Duration = Duration::from_millis(1);

/// Reads `count` answers, all due by `deadline`: a peer that answers each
/// hint of a batch just within the socket's timeout must not hold the
/// batch's writes for `count` times `--peer-timeout`. The socket's
/// timeout is left as `deadline` set it: the caller restores it.
fn read_acks(
    reader: &mut BufReader<TcpStream>,
    count: usize,
    deadline: Instant,
) -> std::io::Result<()> {
    for _ in 0..count {
        // Answers already read in take no wait (and no system call).
        if reader.buffer().is_empty() {
            // Past the deadline (another peer's answers took the time),
            // answers that have arrived still count: one last look.
            let left = deadline
                .saturating_duration_since(Instant::now())
                .max(LAST_LOOK);
            reader.get_ref().set_read_timeout(Some(left))?;
        }
        read_ack(reader).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the peer took longer than --peer-timeout to take a batch of hints",
            ),
            _ => e,
        })?;
    }
    Ok(())
}

/// Sends `lines` (`count` hints) to every peer reached, then reads their
/// answers, all due within `--peer-timeout`; returns how many peers took
/// them all. A peer that fails is counted down (its keeper dials it
/// again, and sends it the lists).
pub(super) fn send_to_all(fleet: &Fleet, lines: &[u8], count: usize) -> usize {
    // Locked in index order, by every caller: no two wait on each other.
    let mut held: Vec<(&Link, MutexGuard<'_, Option<Conn>>)> = fleet
        .links
        .iter()
        .map(|l| (l, l.lock()))
        .filter(|(_, g)| g.is_some())
        .collect();
    // One deadline for the batch, from its first write to its last
    // answer, a peer dialled again included.
    let deadline = Instant::now() + fleet.cfg.timeout;
    // Peers dialled again after a failed write: the lists they took
    // carried these hints.
    let mut retaken: Vec<usize> = Vec::new();
    for (link, guard) in &mut held {
        if let Some(c) = guard.as_mut() {
            if let Err(e) = c.writer.write_all(lines) {
                if again(fleet, link, guard, &e.to_string(), deadline) {
                    retaken.push(link.index);
                }
            }
        }
    }
    let mut taken = 0;
    for (link, guard) in &mut held {
        if retaken.contains(&link.index) {
            taken += 1;
            continue;
        }
        if let Some(c) = guard.as_mut() {
            let read = read_acks(&mut c.reader, count, deadline);
            // Each later answer (a ping's) is due within --peer-timeout.
            let _ = c.reader.get_ref().set_read_timeout(Some(fleet.cfg.timeout));
            match read {
                Ok(()) => {
                    taken += 1;
                    let f = &fleet.figures.peers[link.index];
                    f.hints_taken.fetch_add(count as u64, Ordering::Relaxed);
                    f.answered();
                }
                Err(e) => {
                    if again(fleet, link, guard, &e.to_string(), deadline) {
                        taken += 1;
                    }
                }
            }
        }
    }
    taken
}

fn down(fleet: &Fleet, link: &Link, guard: &mut Option<Conn>, why: &str) {
    *guard = None;
    let f = &fleet.figures.peers[link.index];
    if f.up.swap(false, Ordering::Relaxed) {
        f.failures.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = %link.addr, error = why, "fleet: peer counted down until reached again");
    }
}

/// Starts the thread that keeps peer `i` reached.
pub(super) fn keep(fleet: &Arc<Fleet>, i: usize) {
    let me = Arc::downgrade(fleet);
    let spawned = std::thread::Builder::new()
        .name(format!("memrelay-peer-{i}"))
        .spawn(move || loop {
            let Some(fleet) = me.upgrade() else {
                return;
            };
            let reached = tend(&fleet, &fleet.links[i]);
            fleet.tried(i, reached == Some(true));
            if reached.is_none() {
                return;
            }
            drop(fleet);
            me_link_wait(&me, i);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "fleet: cannot start a peer's thread: that peer is never told");
    }
}

/// Waits for peer `i`'s keeper's next turn (without holding the fleet).
fn me_link_wait(fleet: &std::sync::Weak<Fleet>, i: usize) {
    let Some(f) = fleet.upgrade() else {
        return;
    };
    // The wait holds the fleet alive for at most one turn.
    f.links[i].wait_turn();
}

/// One turn of a keeper: ping a reached peer, dial an unreached one (or
/// one whose process was replaced). Whether the peer is reached after it;
/// None: the peer is this process, stop.
fn tend(fleet: &Fleet, link: &Link) -> Option<bool> {
    let mut guard = link.lock();
    // The peer's process was replaced (a restart, a hand-off): the new one
    // is dialled below, while the old connection keeps taking hints if it
    // still can. After a hand-off the old process serves clients until the
    // new one does, and passes what it learns on to it; letting go of it
    // first left a moment in which this member's hints reached neither,
    // and the old one served a value older than a write acknowledged
    // here (a chaos run saw it).
    let replaced = guard.as_ref().is_some_and(|c| link.stale(c));
    if !replaced && guard.is_some() {
        return Some(ping(fleet, link, &mut guard));
    }
    // Dialled, and sent the lists, without the lock: hints skip this peer
    // meanwhile (they are sent under the lock, with what was recorded
    // after the lists were read). A peer on a slow link takes a round
    // trip per batch of its lists, and every hint of this member would
    // wait for the lock that long.
    drop(guard);
    // The new process not reached (yet: during a hand-off its peer port
    // may not be bound for a moment): the old one is kept while it
    // answers, and drops out when it exits.
    let let_go = || replaced && ping(fleet, link, &mut link.lock());
    match reach(fleet, link, dial_wait(fleet), None) {
        Ok((mut conn, pulled)) => {
            let marks = fleet.marks();
            let listed =
                tell_stage(fleet, &mut conn).and_then(|()| send_listed(&mut conn, fleet.known()));
            let attached = match listed {
                // Replaces the old process's connection, if any.
                Ok(sent) => attach(
                    fleet,
                    link,
                    &mut link.lock(),
                    conn,
                    pulled,
                    Some((marks, sent)),
                ),
                Err(e) => {
                    tracing::warn!(peer = %link.addr, error = %e, "fleet: peer reached but did not take the lists");
                    false
                }
            };
            Some(attached || let_go())
        }
        Err(Refused::Myself) => {
            down(fleet, link, &mut link.lock(), "the peer is this memrelay");
            tracing::info!(peer = %link.addr, "fleet: this peer is this memrelay; not dialled");
            link.myself.store(true, Ordering::Relaxed);
            None
        }
        Err(Refused::Failed(why)) => {
            tracing::debug!(peer = %link.addr, error = why, "fleet: peer not reached");
            Some(let_go())
        }
    }
}

/// Pings the peer on its connection (the stage, when there is one, is the
/// ping); counts it down if it does not answer. Whether it is reached.
fn ping(fleet: &Fleet, link: &Link, guard: &mut Option<Conn>) -> bool {
    let Some(c) = guard.as_mut() else {
        return false;
    };
    let line = fleet.stage_line();
    match c.exchange(line.as_deref().unwrap_or(b"ping\n"), 1) {
        Ok(()) => fleet.figures.peers[link.index].answered(),
        Err(e) => down(fleet, link, guard, &e.to_string()),
    }
    guard.is_some()
}

/// Dials the peer and learns its lists (`sync`); returns the connection
/// and how many keys were learnt. All of it by `deadline`, if given.
fn reach(
    fleet: &Fleet,
    link: &Link,
    wait: Duration,
    deadline: Option<Instant>,
) -> Result<(Conn, usize), Refused> {
    let mut conn = dial(fleet, link.addr, wait, deadline)?;
    let n = pull_lists(fleet, &mut conn)
        .map_err(|e| Refused::Failed(format!("did not give its lists: {e}")))?;
    pull_routings(fleet, link, &mut conn)
        .map_err(|e| Refused::Failed(format!("did not give its routings: {e}")))?;
    Ok((conn, n))
}

/// Most lines a peer's answer to `routing` may have: two routings of 511
/// servers each (with `wire::MAX_LINE`, at most 4 MiB kept per answer).
const MAX_ROUTING_LINES: usize = 1024;

/// Asks the peer where it stands in a fleet reload and by which routings
/// (`routing`): a member that starts during one joins it
/// (`Fleet::joining`).
fn pull_routings(fleet: &Fleet, link: &Link, conn: &mut Conn) -> std::io::Result<()> {
    conn.write(b"routing\n")?;
    let mut lines = String::new();
    for _ in 0..MAX_ROUTING_LINES {
        let line = conn.read_line()?;
        if line == "end\n" {
            fleet.learn_routings(&lines);
            return Ok(());
        }
        match wire::parse_line(&line) {
            Ok(wire::Line::Epoch(stage)) => fleet.heard_from(link.index, stage),
            _ if line.starts_with("route ") || line.starts_with("server ") => lines.push_str(&line),
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the peer's routings hold a line that is not one",
                ))
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        "the peer's routings do not end",
    ))
}

/// Tells a peer just reached this member's stage in a fleet reload, if
/// any: before the lists (which may name that stage's servers), and
/// again before `joined` (a starting peer has it once it sees that:
/// `Fleet::join`).
fn tell_stage(fleet: &Fleet, conn: &mut Conn) -> std::io::Result<()> {
    match fleet.stage_line() {
        Some(line) => conn.exchange(&line, 1),
        None => Ok(()),
    }
}

/// Sends a peer just reached every listed key, then `joined`, under its
/// lock (a key recorded from then on waits for it, so it is in the lists
/// or sent after them), and keeps the connection; false if the peer did
/// not take them. `early`: the lists were sent already, without the
/// lock, as they stood at those marks (that many keys): only what was
/// recorded since is sent now.
fn attach(
    fleet: &Fleet,
    link: &Link,
    guard: &mut Option<Conn>,
    mut conn: Conn,
    pulled: usize,
    early: Option<(Vec<super::Mark>, usize)>,
) -> bool {
    let sent = tell_stage(fleet, &mut conn)
        .and_then(|()| match early {
            None => send_listed(&mut conn, fleet.known()),
            Some((marks, sent)) => {
                send_listed(&mut conn, fleet.known_since(&marks)).map(|n| n + sent)
            }
        })
        // From here on (the caller holds the link's lock) every hint
        // comes on this connection: the peer may serve.
        .and_then(|n| conn.exchange(b"joined\n", 1).map(|()| n));
    match sent {
        Ok(sent) => {
            conn.undeadline();
            let f = &fleet.figures.peers[link.index];
            f.up.store(true, Ordering::Relaxed);
            f.answered();
            tracing::info!(peer = %link.addr, sent, learnt = pulled, "fleet: peer reached; lists exchanged");
            // The process that listens there now is the peer: a draining
            // predecessor that dials in later (a hand-off) must not make
            // this link look stale and redial it at every turn.
            *link.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.instance.clone());
            fleet.matched(link.index, &conn.instance);
            *guard = Some(conn);
            true
        }
        Err(e) => {
            tracing::warn!(peer = %link.addr, error = %e, "fleet: peer reached but did not take the lists");
            false
        }
    }
}

/// How long a keeper's dial (and handshake) may take: a second at least,
/// so a peer that answers slowly is still reached.
fn dial_wait(fleet: &Fleet) -> Duration {
    fleet.cfg.timeout.max(Duration::from_secs(1))
}

/// A peer that was reached failed a hint: its process may have been
/// replaced (a hand-off gives the peer port to a new process, and the
/// old one exits once drained), so it is dialled again at once and sent
/// the lists, which hold what the failed hints said, all by `deadline`
/// (the batch's: a client's reply waits, and every link's lock is held).
/// A peer that cannot be reached again that fast (a slow link, long
/// lists) is counted down, and its keeper reaches it in the background.
/// True if it took them.
fn again(
    fleet: &Fleet,
    link: &Link,
    guard: &mut Option<Conn>,
    why: &str,
    deadline: Instant,
) -> bool {
    *guard = None;
    let retried = match reach(fleet, link, fleet.cfg.timeout, Some(deadline)) {
        Ok((conn, pulled)) => attach(fleet, link, guard, conn, pulled, None),
        Err(_) => false,
    };
    if !retried {
        down(fleet, link, guard, why);
    }
    retried
}

/// Every key of `lists` (`Fleet::known`), in batches; returns how many.
fn send_listed(conn: &mut Conn, lists: Vec<(String, super::Listed)>) -> std::io::Result<usize> {
    let mut sent = 0;
    let mut batch = Vec::new();
    for (server, keys) in lists {
        let chunks: Vec<Option<&[Box<[u8]>]>> = match &keys {
            None => vec![None],
            Some(keys) => keys.chunks(BATCH).map(Some).collect(),
        };
        for chunk in chunks {
            batch.clear();
            super::push_hints(&mut batch, &server, chunk);
            let n = chunk.map_or(1, <[_]>::len);
            conn.exchange(&batch, n)?;
            sent += n;
        }
    }
    Ok(sent)
}

/// Asks the peer for every key its lists hold (`sync`) and learns them:
/// a memrelay that starts, or a peer reached again, may have missed the
/// hints sent meanwhile. Returns how many.
fn pull_lists(fleet: &Fleet, conn: &mut Conn) -> std::io::Result<usize> {
    conn.write(b"sync\n")?;
    let mut n = 0;
    loop {
        let line = conn.read_line()?;
        if line == "end\n" {
            return Ok(n);
        }
        match wire::parse_line(&line) {
            Ok(wire::Line::Hint(h)) => fleet.learn(h.server, h.key.as_deref(), h.held),
            Ok(wire::Line::Forgot(server)) => fleet.peer_forgot(server),
            _ => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the peer's lists hold a line that is not a hint",
                ))
            }
        }
        n += 1;
    }
}

/// Connects to a peer and proves, each to the other, the fleet's secret.
fn dial(
    fleet: &Fleet,
    addr: SocketAddr,
    wait: Duration,
    deadline: Option<Instant>,
) -> Result<Conn, Refused> {
    let failed = |e: std::io::Error| Refused::Failed(e.to_string());
    let connect = deadline.map_or(wait, |d| {
        wait.min(d.saturating_duration_since(Instant::now()))
    });
    if connect.is_zero() {
        return Err(Refused::Failed("no time left to dial the peer".into()));
    }
    let stream = TcpStream::connect_timeout(&addr, connect).map_err(failed)?;
    let _ = stream.set_nodelay(true);
    let writer = stream.try_clone().map_err(failed)?;
    // Each step of the handshake within `wait` (and the deadline).
    let mut conn = Conn {
        reader: BufReader::new(stream),
        writer,
        instance: String::new(),
        each: wait,
        deadline,
    };
    conn.arm().map_err(failed)?;
    let secret = fleet.cfg.secret.bytes();
    let mine = wire::nonce();
    conn.write(wire::hello(&mine, &fleet.instance, &fleet.cfg.listen).as_bytes())
        .map_err(failed)?;
    let line = conn.read_line().map_err(failed)?;
    if line.trim_end() == "error self" {
        return Err(Refused::Myself);
    }
    let Some((theirs, proof, instance)) = wire::parse_challenge(&line) else {
        return Err(Refused::Failed(format!(
            "not a memrelay peer: {:?}",
            line.trim_end()
        )));
    };
    if !wire::verify(secret, wire::Role::Listener, &mine, theirs, proof) {
        return Err(Refused::Failed(
            "the peer does not know the fleet's secret".into(),
        ));
    }
    let auth = format!(
        "auth {}\n",
        wire::proof(secret, wire::Role::Dialer, &mine, theirs)
    );
    conn.instance = instance.to_string();
    conn.write(auth.as_bytes()).map_err(failed)?;
    let line = conn.read_line().map_err(failed)?;
    if line != "ok\n" {
        return Err(Refused::Failed(format!("refused: {:?}", line.trim_end())));
    }
    // From now on each answer is due within --peer-timeout.
    conn.each = fleet.cfg.timeout;
    conn.arm().map_err(failed)?;
    Ok(conn)
}

/// One line of at most `wire::MAX_LINE` bytes.
pub(super) fn read_line(reader: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut line = String::new();
    if std::io::Read::take(&mut *reader, wire::MAX_LINE).read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if !line.ends_with('\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a line cut short or too long",
        ));
    }
    Ok(line)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A peer on loopback that writes `acks`, each after `gap`.
    fn trickling_peer(acks: usize, gap: Duration) -> (TcpStream, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for _ in 0..acks {
                std::thread::sleep(gap);
                if s.write_all(b"k\n").is_err() {
                    return;
                }
            }
        });
        (TcpStream::connect(addr).unwrap(), peer)
    }

    #[test]
    fn a_batch_s_answers_are_all_due_by_one_deadline() {
        // Each answer comes within the socket's timeout, the five of them
        // well past the batch's deadline.
        let (stream, peer) = trickling_peer(5, Duration::from_millis(100));
        stream
            .set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        let mut reader = BufReader::new(stream);
        let deadline = Instant::now() + Duration::from_millis(250);
        assert!(read_acks(&mut reader, 5, deadline).is_err());
        drop(reader);
        peer.join().unwrap();
        // Answers in time: the batch was taken.
        let (stream, peer) = trickling_peer(3, Duration::ZERO);
        let mut reader = BufReader::new(stream);
        let deadline = Instant::now() + Duration::from_secs(10);
        read_acks(&mut reader, 3, deadline).unwrap();
        peer.join().unwrap();
    }

    #[test]
    fn an_exchange_with_a_deadline_ends_by_it_however_the_peer_trickles() {
        // A line every 100 ms, each well within the connection's own
        // timeout, for ever: a long list over a slow link.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            while s.write_all(b"hint s *\n").is_ok() {
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let stream = TcpStream::connect(addr).unwrap();
        let writer = stream.try_clone().unwrap();
        let asked = Instant::now();
        let mut conn = Conn {
            reader: BufReader::new(stream),
            writer,
            instance: String::new(),
            each: Duration::from_secs(1),
            deadline: Some(asked + Duration::from_millis(350)),
        };
        let mut lines = 0;
        let e = loop {
            match conn.read_line() {
                Ok(_) => lines += 1,
                Err(e) => break e,
            }
        };
        // Timed out by the socket, or found past the deadline.
        let late = [std::io::ErrorKind::WouldBlock, std::io::ErrorKind::TimedOut];
        assert!(late.contains(&e.kind()), "{e}");
        assert!(lines >= 1, "the lines that came in time were read");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        drop(conn);
        peer.join().unwrap();
    }

    #[test]
    fn answers_that_arrived_count_though_another_peer_spent_the_deadline() {
        let (stream, peer) = trickling_peer(3, Duration::ZERO);
        peer.join().unwrap();
        let mut reader = BufReader::new(stream);
        let spent = Instant::now() - Duration::from_millis(1);
        read_acks(&mut reader, 3, spent).unwrap();
    }
}
