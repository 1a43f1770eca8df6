//! Missed-key knowledge that outlives the process (`--state-file`).
//!
//! A server's missed-key list says which keys it may hold stale copies of;
//! a memrelay that restarts with empty lists would serve them. So:
//!
//! - **while running**, the file names the servers whose lists (or resync
//!   copy sets) are not empty: a server is marked *dirty*, and the file
//!   rewritten, the moment its list stops being empty, before the write
//!   that went past it is acknowledged (a rare event: failure episodes).
//!   It is marked clean again, lazily, once its lists are empty;
//! - **on a clean exit** (SIGTERM, SIGINT, after the drain), the file gets
//!   every server's listed keys and the word `clean`;
//! - **at start**, a clean file gives each server its keys back (invalidated
//!   by the prober before the server serves them); a file that still says
//!   `running` means the last process died without saving: every server
//!   it marked dirty may hold stale copies of keys nobody remembers, so it
//!   is treated as overflowed (flushed before it serves; with backups its
//!   keys are read from them and repaired). No file: nothing is known, as
//!   without `--state-file`.
//!
//! - **across a hand-off** (`--handoff`), the two processes serve at once
//!   (the old one until the new one serves, then through its drain), so
//!   what either records must reach the other
//!   before it answers the write that caused it: a client that wrote
//!   through the new process may still read through the old one (a
//!   pipelining client keeps its old connection for up to a second), and
//!   the reverse. The new process listens on `<state-file>.records` (a
//!   unix socket) and waits (up to `HANDOFF_WAIT`) for the old one's lists
//!   in `<state-file>.handoff` before it serves. The old process opens two
//!   connections to the socket, one for each direction, then writes that
//!   file; from then on every key either process records is sent to the
//!   other, and the record (so the write's answer) waits for the other to
//!   have it. The file is written again while the old one drains and a
//!   last time, marked final, when it exits: what the socket could not
//!   carry is merged from it. Only the new process writes the state file
//!   from then on. While both serve, neither starts a resync
//!   ([`Persist::shared`]): a resync checks its copies against the client
//!   writes of its own process only.
//!
//! The file is text, one record a line: `memrelay-state 1`, a status
//! (`clean`, `running`, `handoff`, `handoff-final`), then per server
//! `server <name> clean|learnt|dirty|overflowed` followed by `key <base64>`
//! lines. `learnt`: while running, the server's list held only keys peers
//! of a fleet recorded, or records of this process's own that a peer
//! took or is being asked to take (their writes wait for the answer);
//! after a crash it is flushed only if the peers cannot say them again
//! (`Persist::settle`). `dirty`: it held an own record no peer took
//! (written before the write that made it is answered).
//! It is replaced atomically (written beside, synced, renamed).

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

// Named Health here, as before replica state left backend::health, to
// keep this change to persist.rs to this line.
use super::missed::Source;
use super::replica::Replica as Health;

const MAGIC: &str = "memrelay-state 1";

/// How long a process that took the sockets over waits for the old one's
/// lists before it serves; past it, it serves with what the state file
/// says (a crash's rules: servers marked dirty are flushed first).
const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Keys written per server at a clean exit, at most (the lists' own cap
/// bounds it too).
const MAX_KEYS: usize = 1_000_000;

/// What the file says of one server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mark {
    Clean,
    /// Its list holds only keys peers of the fleet recorded: after a
    /// crash, the peers are asked again instead (`Persist::settle`).
    Learnt,
    Dirty,
    Overflowed,
}

/// The state file of one memrelay process.
#[derive(Debug)]
pub(crate) struct Persist {
    path: PathBuf,
    /// Each server's mark as last written while running.
    marks: Mutex<BTreeMap<String, Mark>>,
    /// Another process owns the file now (the sockets were handed over).
    disowned: std::sync::atomic::AtomicBool,
    /// Hand-off bookkeeping (see the module comment).
    handoff: Mutex<HandoffState>,
    /// During a hand-off, the other process's record socket: every record
    /// is sent there, and waits for it to be taken.
    peers: Mutex<Vec<std::os::unix::net::UnixStream>>,
    /// Another memrelay serves the same servers: this one is draining
    /// after a hand-off, or the one it took over from still is.
    shared: tokio::sync::watch::Sender<bool>,
    /// This process started from the old one's hand-off file: its deletes
    /// came after every record of the old one's it was handed, so the old
    /// one may forget what it deletes (`relay_clears`).
    took_lists: std::sync::atomic::AtomicBool,
    /// One writer at a time (worker threads mark servers dirty while the
    /// main thread marks them clean): the text is made and written under
    /// it, so a later write never carries older marks.
    writing: Mutex<()>,
    /// The servers the crashed process's file marked `learnt`, until
    /// `settle` decides.
    learnt: Mutex<Vec<String>>,
    /// Per server: records of it sent to the other process of a hand-off
    /// (see `MissedKeys::forget_if_covered`). Taken under `peers`, so
    /// they number the records in the order they are sent.
    sent: Mutex<HashMap<String, u64>>,
    /// This memrelay tells a fleet of each record before the write is
    /// answered: a server whose own records a peer took is marked
    /// `learnt`, not `dirty` (see `mark_of`).
    in_fleet: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default)]
struct HandoffState {
    /// New side: keys already taken from the old process's file.
    merged: std::collections::HashSet<(String, Vec<u8>)>,
    /// New side: servers whose overflow was already taken from it. The old
    /// process deletes and flushes nothing once it handed off, so its
    /// files keep saying "overflowed" after this one flushed the server;
    /// taking that again would make the server stale for every key once
    /// more, and unserved until its next flush, a minute later. (An
    /// overflow the old one records after the hand-off comes over the
    /// record socket.)
    overflows: std::collections::HashSet<String>,
    /// New side: still merging, until this deadline.
    until: Option<std::time::Instant>,
    /// Old side: the lists' counters when last written.
    written: u64,
    /// Old side: each server's mark (`MissedKeys::mark`) when the lists
    /// were handed over. Later files carry only what the new process may
    /// not have from the record socket (`MissedKeys::snapshot_untold`).
    marks: Option<Vec<u64>>,
}

/// Who wrote a state file, and when.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// At a clean exit: the lists are complete.
    #[default]
    Clean,
    /// While running: only which servers were dirty.
    Running,
    /// A draining process after a hand-off; more may come.
    Handoff,
    /// A drained process after a hand-off: its last word.
    HandoffFinal,
}

/// What a start found in the file.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Loaded {
    status: Status,
    /// Per server: overflowed, and the keys it missed.
    pub servers: BTreeMap<String, (bool, Vec<Vec<u8>>)>,
    /// After a crash: the servers whose lists held only what peers of the
    /// fleet recorded (see `Persist::settle`).
    pub learnt: Vec<String>,
}

/// Whether the fleet's lists can stand for what a process that crashed
/// knew of a server (`Persist::settle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Vouch {
    /// Every peer was reached and gave its lists.
    Yes,
    /// A peer is not reached yet.
    NotYet,
    /// A peer lost its own list for the server in a crash of its own: no
    /// one can say again what this process knew.
    Never,
}

impl Persist {
    pub(crate) fn new(path: PathBuf) -> Arc<Persist> {
        Arc::new(Persist {
            path,
            marks: Mutex::new(BTreeMap::new()),
            disowned: std::sync::atomic::AtomicBool::new(false),
            handoff: Mutex::new(HandoffState::default()),
            peers: Mutex::new(Vec::new()),
            shared: tokio::sync::watch::channel(false).0,
            took_lists: std::sync::atomic::AtomicBool::new(false),
            writing: Mutex::new(()),
            learnt: Mutex::new(Vec::new()),
            sent: Mutex::new(HashMap::new()),
            in_fleet: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Mark>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies what the file says to the servers about to run, then marks
    /// the file `running`. Returns the names of servers treated as stale
    /// for every key because the last process did not exit cleanly.
    pub(crate) fn start(self: &Arc<Self>, health: &[Arc<Health>], took_over: bool) -> Vec<String> {
        if took_over {
            if let Some(stale) = self.start_from_handoff(health) {
                return stale;
            }
        } else {
            // Left by a hand-off whose new process died before it read
            // it: it must not pass for the next hand-off's.
            let _ = std::fs::remove_file(self.handoff_path());
        }
        let loaded = match std::fs::read_to_string(&self.path) {
            Ok(text) => parse(&text).unwrap_or_else(|why| {
                tracing::warn!(file = %self.path.display(), %why, "state file unreadable: treating every server it may name as stale");
                Loaded {
                    status: Status::Running,
                    servers: health
                        .iter()
                        .map(|h| (h.name.clone(), (true, Vec::new())))
                        .collect(),
                    learnt: Vec::new(),
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Loaded::default(),
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot read the state file: treating every server as stale");
                Loaded {
                    status: Status::Running,
                    servers: health
                        .iter()
                        .map(|h| (h.name.clone(), (true, Vec::new())))
                        .collect(),
                    learnt: Vec::new(),
                }
            }
        };
        let stale = apply(&loaded, health);
        *self.learnt.lock().unwrap_or_else(|p| p.into_inner()) = loaded.learnt;
        self.own(health);
        stale
    }

    /// Whether the file left servers marked `learnt` after a crash, which
    /// `settle` keeps only if the whole fleet vouches for them.
    pub(crate) fn awaits_vouching(&self) -> bool {
        !self
            .learnt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// After a crash, each server whose list held only keys peers of the
    /// fleet recorded (`learnt`): if `vouched` says the peers' lists, as
    /// learnt while joining, stand for it, nothing more is done (what the
    /// peers recorded, they still list, or deleted on the server).
    /// Otherwise it serves nothing for now (`MissedKeys::hold_unvouched`)
    /// and is returned: the caller ends each hold with `end_hold` once
    /// the fleet vouches for it, or gives up on that (then it is flushed
    /// before it serves, like a `dirty` one). A flush here would erase
    /// what only that server holds now: writes the peers sent past its
    /// other replica, which may be marked down here but not there.
    pub(crate) fn settle(
        &self,
        health: &[Arc<Health>],
        vouched: impl Fn(&Health) -> Vouch,
    ) -> Vec<Arc<Health>> {
        let learnt = std::mem::take(&mut *self.learnt.lock().unwrap_or_else(|p| p.into_inner()));
        let (mut kept, mut held) = (Vec::new(), Vec::new());
        for h in health.iter().filter(|h| learnt.contains(&h.name)) {
            match vouched(h) {
                Vouch::Yes => kept.push(h.name.clone()),
                Vouch::NotYet => {
                    h.missed.hold_unvouched();
                    // A crash meanwhile must find it `learnt` again.
                    self.mark(&h.name, Mark::Learnt);
                    held.push(h.clone());
                }
                Vouch::Never => Self::end_hold(h, false),
            }
        }
        if !kept.is_empty() {
            tracing::info!(servers = %kept.join(","), "after a crash: what these servers missed was learnt again from the fleet");
        }
        if !held.is_empty() {
            let names: Vec<&str> = held.iter().map(|h| h.name.as_str()).collect();
            tracing::warn!(servers = %names.join(","), "after a crash: the fleet could not say again yet what these servers missed: each serves nothing until every peer is reached");
        }
        held
    }

    /// Ends the hold `settle` put on `h` (if any): it serves by its list
    /// if the fleet `vouched` for it, else it is flushed before it serves.
    pub(crate) fn end_hold(h: &Health, vouched: bool) {
        if vouched {
            tracing::info!(server = %h.name, "after a crash: what this server missed was learnt again from the fleet");
        } else {
            h.missed.learn(None, Source::Handoff);
            tracing::warn!(server = %h.name, "after a crash: the fleet could not say again what this server missed: it is flushed before it serves");
        }
        h.missed.vouched();
    }

    /// The process owns the file from now on.
    fn own(self: &Arc<Self>, health: &[Arc<Health>]) {
        for h in health {
            self.watch(h);
        }
        self.write_running();
    }

    fn handoff_path(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".handoff");
        PathBuf::from(p)
    }

    /// A start that took the sockets over: the old process's lists, once
    /// its file appears. None if it never did (then the state file rules).
    fn start_from_handoff(self: &Arc<Self>, health: &[Arc<Health>]) -> Option<Vec<String>> {
        let deadline = std::time::Instant::now() + HANDOFF_WAIT;
        // The old process serves until its drain ends (said when its
        // record connection closes, or by its final file).
        self.shared.send_replace(true);
        self.receive_records(health);
        let loaded = loop {
            match std::fs::read_to_string(self.handoff_path()).map(|t| parse(&t)) {
                Ok(Ok(l)) if matches!(l.status, Status::Handoff | Status::HandoffFinal) => break l,
                _ if std::time::Instant::now() >= deadline => {
                    tracing::warn!(file = %self.handoff_path().display(), "the old memrelay never said what servers missed: using the state file");
                    self.shared.send_replace(false);
                    return None;
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(20)),
            }
        };
        let stale = apply(&loaded, health);
        self.took_lists
            .store(true, std::sync::atomic::Ordering::Release);
        let final_ = loaded.status == Status::HandoffFinal;
        {
            let mut h = self.handoff_state();
            for (name, (overflowed, keys)) in &loaded.servers {
                for k in keys {
                    h.merged.insert((name.clone(), k.clone()));
                }
                if *overflowed || loaded.status == Status::Running {
                    h.overflows.insert(name.clone());
                }
            }
            // The old process drains for at most its shutdown timeout;
            // its last word comes then.
            h.until =
                (!final_).then(|| std::time::Instant::now() + std::time::Duration::from_secs(120));
        }
        if final_ {
            let _ = std::fs::remove_file(self.handoff_path());
        }
        tracing::info!(
            servers = loaded.servers.len(),
            "took over what the old memrelay knew servers missed"
        );
        self.own(health);
        Some(stale)
    }

    fn handoff_state(&self) -> std::sync::MutexGuard<'_, HandoffState> {
        self.handoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called periodically on the main thread: marks servers clean, and
    /// carries a hand-off's late records either way.
    pub(crate) fn tick(&self, health: &[Arc<Health>]) {
        if self.disowned.load(std::sync::atomic::Ordering::Acquire) {
            let count = changes(health);
            let mut h = self.handoff_state();
            if h.written != count {
                h.written = count;
                drop(h);
                self.write_lists(&self.handoff_path(), Status::Handoff, health);
            }
            return;
        }
        self.merge_handoff(health);
        self.refresh(health);
    }

    /// New side: takes up what the draining process recorded since.
    fn merge_handoff(&self, health: &[Arc<Health>]) {
        let Some(until) = self.handoff_state().until else {
            return;
        };
        let loaded = match std::fs::read_to_string(self.handoff_path()).map(|t| parse(&t)) {
            Ok(Ok(l)) => l,
            _ => return,
        };
        let mut h = self.handoff_state();
        for server in health {
            let Some((overflowed, keys)) = loaded.servers.get(&server.name) else {
                continue;
            };
            if *overflowed && h.overflows.insert(server.name.clone()) {
                server.missed.learn(None, Source::Handoff);
            }
            for k in keys {
                if h.merged.insert((server.name.clone(), k.clone())) {
                    server.missed.learn(Some(k), Source::Handoff);
                }
            }
        }
        if loaded.status == Status::HandoffFinal {
            h.until = None;
            h.merged.clear();
            h.overflows.clear();
            let _ = std::fs::remove_file(self.handoff_path());
            self.shared.send_replace(false);
        } else if std::time::Instant::now() >= until {
            tracing::warn!("the old memrelay never finished its hand-off: what it recorded last may be missing");
            h.until = None;
            self.shared.send_replace(false);
        }
    }

    /// Old side: the sockets are the new process's now; so is the state
    /// file. From now on every record goes to the new process first (if it
    /// listens), and what it records comes here; then what this one knows
    /// goes to the hand-off file, which the new one waits for to serve.
    ///
    /// Returns whether the new process takes records (it listens for
    /// them): then it reads this one's lists too, and deletes their keys.
    pub(crate) fn hand_off(self: &Arc<Self>, health: &[Arc<Health>]) -> bool {
        // Taken before the lists are written: every record made before
        // it is in the first hand-off file.
        let marks: Vec<u64> = health.iter().map(|h| h.missed.mark()).collect();
        self.disown();
        self.shared.send_replace(true);
        let takes_records = match self.connect_records(Direction::ToNew) {
            Some(s) => {
                self.peers().push(s);
                true
            }
            None => {
                tracing::warn!(socket = %self.records_path().display(), "the new memrelay takes no records: it learns them from the hand-off file, a little later");
                false
            }
        };
        match self.connect_records(Direction::ToOld) {
            Some(s) => {
                // What the new process deleted, it tells with `clear`
                // lines: each key recorded here before now is forgotten
                // then (its delete came after the records it was handed).
                take_records_on_a_thread(s, health.to_vec(), None, Some(marks.clone()))
            }
            None => {
                tracing::warn!(socket = %self.records_path().display(), "the new memrelay sends no records: while this one drains, it may serve a key the new one saw a server miss")
            }
        }
        self.handoff_state().written = changes(health);
        self.write_lists(&self.handoff_path(), Status::Handoff, health);
        // The new process has these lists from now on (`merged`): later
        // files add only what the record socket did not carry.
        self.handoff_state().marks = Some(marks);
        takes_records
    }

    /// Old side: one connection to the new process's record socket, which
    /// said it took it (within a second).
    fn connect_records(&self, dir: Direction) -> Option<std::os::unix::net::UnixStream> {
        use std::io::{Read, Write};
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut s = loop {
            match std::os::unix::net::UnixStream::connect(self.records_path()) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() >= deadline => return None,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(FORWARD_TIMEOUT)).ok()?;
        s.set_write_timeout(Some(FORWARD_TIMEOUT)).ok()?;
        let mut ack = [0u8; 2];
        s.write_all(dir.hello()).ok()?;
        s.read_exact(&mut ack).ok()?;
        (&ack == b"k\n").then_some(s)
    }

    fn records_path(&self) -> PathBuf {
        let mut p = self.path.as_os_str().to_owned();
        p.push(".records");
        PathBuf::from(p)
    }

    fn peers(&self) -> std::sync::MutexGuard<'_, Vec<std::os::unix::net::UnixStream>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether another memrelay serves the same servers now (a hand-off
    /// under way), as a watch: resyncs wait while it says so.
    pub(crate) fn shared(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shared.subscribe()
    }

    /// Tells the other process of a hand-off, if there is one, that
    /// `server` missed `key` (None: every key), and waits for it to have
    /// it. Records are rare (failure episodes); without a peer this is one
    /// uncontended lock.
    /// Returns the record's number among those of `server` sent, if the
    /// other process took it.
    fn relay(&self, server: &str, key: Option<&[u8]>) -> Option<u64> {
        let mut line = Vec::with_capacity(server.len() + 64);
        super::missed::write_record(&mut line, server, key);
        line.push(b'\n');
        self.tell(&line, 1, Some(server))
    }

    /// Tells the other process of a hand-off, if there is one, that this
    /// one deleted `keys` on `server` and forgot them, having learnt the
    /// first `seen` records of that server the other one sent (`clear`
    /// lines, each acknowledged like a record). Only the new process
    /// sends them: the old one deletes nothing.
    fn relay_clears(&self, server: &str, keys: &[Box<[u8]>], seen: u64) {
        if !self.took_lists.load(std::sync::atomic::Ordering::Acquire) {
            // Started without the old one's lists (it never wrote them in
            // time): a delete here may predate one of its records.
            return;
        }
        let mut lines = Vec::with_capacity(keys.len() * (server.len() + 64));
        for k in keys {
            lines.extend_from_slice(CLEAR);
            super::missed::write_record(&mut lines, server, Some(k));
            // Last, so a release that reads `clear <server> <key>` finds
            // no server by that name and ignores the line.
            lines.extend_from_slice(format!(" {seen}\n").as_bytes());
        }
        self.tell(&lines, keys.len(), None);
    }

    /// Sends `lines` (`count` of them) to the other process of a
    /// hand-off, if there is one, and waits for an acknowledgement of
    /// each. Without a peer this is one uncontended lock. A stream that
    /// fails is out of step and goes: what it did not take, the other
    /// process learns from the hand-off file. `record_of`: the line is a
    /// record of that server; returns its number among that server's
    /// records sent, if every stream took it.
    fn tell(&self, lines: &[u8], count: usize, record_of: Option<&str>) -> Option<u64> {
        use std::io::{Read, Write};
        let mut peers = self.peers();
        if peers.is_empty() {
            return None;
        }
        let seq = record_of.map(|server| {
            let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            match sent.get_mut(server) {
                Some(n) => {
                    *n += 1;
                    *n
                }
                None => {
                    sent.insert(server.to_string(), 1);
                    1
                }
            }
        });
        let streams = peers.len();
        peers.retain_mut(|stream| {
            let sent = stream.write_all(lines).and_then(|()| {
                let mut ack = [0u8; 2];
                for _ in 0..count {
                    stream.read_exact(&mut ack)?;
                    if &ack != b"k\n" {
                        return Err(std::io::ErrorKind::InvalidData.into());
                    }
                }
                Ok(())
            });
            match sent {
                Ok(()) => true,
                // The other process exited: its drain is over, or it is
                // the old one's file that carries the rest.
                Err(e) if is_gone(&e) => {
                    tracing::debug!("the other memrelay of the hand-off is gone");
                    false
                }
                Err(_) => {
                    tracing::warn!("the other memrelay stopped taking records: what it did not take, it learns from the hand-off file");
                    false
                }
            }
        });
        seq.filter(|_| peers.len() == streams)
    }

    /// New side: takes the old process's two connections (records from it,
    /// and the one this process's records go to), until it is gone.
    fn receive_records(self: &Arc<Self>, health: &[Arc<Health>]) {
        let path = self.records_path();
        let _ = std::fs::remove_file(&path);
        let listener = match std::os::unix::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(socket = %path.display(), error = %e, "cannot take the old memrelay's records: it learns them from the hand-off file");
                return;
            }
        };
        let health: Vec<Arc<Health>> = health.to_vec();
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("memrelay-records".into())
            .spawn(move || {
                me.accept_records(&listener, health);
                let _ = std::fs::remove_file(&path);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot take the old memrelay's records");
        }
    }

    /// New side: accepts the old process's connections (waiting at most
    /// `HANDOFF_WAIT`) and sets each to its work.
    fn accept_records(
        self: &Arc<Self>,
        listener: &std::os::unix::net::UnixListener,
        health: Vec<Arc<Health>>,
    ) {
        use std::io::{BufRead, Write};
        let _ = listener.set_nonblocking(true);
        let deadline = std::time::Instant::now() + HANDOFF_WAIT;
        let (mut to_new, mut to_old) = (false, false);
        while !(to_new && to_old) {
            let mut stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(_) if std::time::Instant::now() >= deadline => break,
                Err(_) => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                    continue;
                }
            };
            // Only this user's (or root's) processes may tell this one
            // what servers missed, or be told: as for the hand-off itself.
            if let Err(e) = crate::net::handoff::check_peer(&stream) {
                tracing::warn!(error = %e, "refused a connection to the record socket");
                continue;
            }
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(FORWARD_TIMEOUT));
            let mut hello = String::new();
            // A hello is one short line: a longer one is no hello.
            let read =
                std::io::Read::take(std::io::BufReader::new(&stream), 64).read_line(&mut hello);
            let ok = read.is_ok() && stream.write_all(b"k\n").is_ok();
            if !ok {
                continue;
            }
            if hello.as_bytes() == Direction::ToOld.hello() {
                let _ = stream.set_write_timeout(Some(FORWARD_TIMEOUT));
                self.peers().push(stream);
                to_old = true;
            } else if hello.as_bytes() == Direction::ToNew.hello() && !to_new {
                to_new = true;
                let _ = stream.set_read_timeout(None);
                take_records_on_a_thread(stream, health.clone(), Some(self.clone()), None);
            }
        }
        if !to_new {
            // No records will come: the hand-off file says the rest.
            self.shared.send_replace(false);
        }
    }

    /// Marks `health`'s server dirty in the file whenever its lists stop
    /// being empty (a server added by a reload is watched from then on).
    /// Every record of it is also told to the other process of a
    /// hand-off, while there is one (keys being copied by a resync count
    /// as missed there).
    pub(crate) fn watch(self: &Arc<Self>, health: &Arc<Health>) {
        for set in [&health.missed, &health.copying] {
            let me = Arc::downgrade(self);
            let name = health.name.clone();
            set.on_dirty(Box::new(move |alone| {
                if let Some(me) = me.upgrade() {
                    me.mark(&name, if alone { Mark::Dirty } else { Mark::Learnt });
                }
            }));
            let me = Arc::downgrade(self);
            let name = health.name.clone();
            // What the other process of the hand-off sent is not sent
            // back; what a peer of the fleet sent is, for the other
            // process is not the peer's peer.
            // A record of the missed-key list the other process took is
            // noted with its number, for the `clear` lines it sends back.
            let list = std::ptr::eq(set, &health.missed).then(|| Arc::downgrade(health));
            set.on_record(Box::new(move |key, from, gen, _| {
                if from == Source::Handoff {
                    return;
                }
                let Some(me) = me.upgrade() else { return };
                if from == Source::Here {
                    // Before the write is answered. In a fleet, the
                    // record's hint is on its way to the peers and the
                    // write waits for it: `learnt` holds, unless a
                    // record no peer took is listed, until none takes
                    // this one (`MissedKeys::untaken` marks it `dirty`
                    // then, before the write is answered). A copy under
                    // way is this process's alone.
                    let shared = me.shares_with_fleet()
                        && list
                            .as_ref()
                            .and_then(|l| l.upgrade())
                            .is_some_and(|h| !h.missed.alone());
                    me.mark(&name, if shared { Mark::Learnt } else { Mark::Dirty });
                }
                let seq = me.relay(&name, key);
                if let (Some(seq), Some(key), Some(h)) =
                    (seq, key, list.as_ref().and_then(|l| l.upgrade()))
                {
                    h.missed.note_relayed(key, gen, seq);
                }
            }));
        }
        // The old process of a hand-off deletes nothing: it forgets what
        // this one deleted (see `take_records`).
        let me = Arc::downgrade(self);
        let name = health.name.clone();
        health.missed.on_clear(Box::new(move |keys, seen| {
            if let Some(me) = me.upgrade() {
                me.relay_clears(&name, keys, seen);
            }
        }));
        let mark = mark_of(health, self.shares_with_fleet());
        self.marks().insert(health.name.clone(), mark);
    }

    /// From now on, a server whose own records a peer of the fleet took
    /// is marked `learnt` (see `mark_of`).
    pub(crate) fn join_fleet(&self) {
        self.in_fleet
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn shares_with_fleet(&self) -> bool {
        self.in_fleet.load(std::sync::atomic::Ordering::Acquire)
    }

    fn mark(&self, name: &str, mark: Mark) {
        {
            let mut marks = self.marks();
            let was = marks.get(name);
            // A peer's record does not take back what one of this
            // process's own made it (`refresh` does, once it is gone).
            if was == Some(&mark)
                || mark == Mark::Learnt && matches!(was, Some(Mark::Dirty | Mark::Overflowed))
                || mark == Mark::Dirty && was == Some(&Mark::Overflowed)
            {
                return;
            }
            tracing::debug!(server = name, ?mark, "state file: server marked");
            marks.insert(name.to_string(), mark);
        }
        self.write_running();
    }

    /// Marks clean the servers whose lists emptied (called periodically;
    /// a late clean mark only costs a needless flush after a crash).
    pub(crate) fn refresh(&self, health: &[Arc<Health>]) {
        let changed = {
            let mut marks = self.marks();
            let mut changed = false;
            for h in health {
                let now = mark_of(h, self.shares_with_fleet());
                if marks.get(&h.name) != Some(&now) {
                    tracing::debug!(server = %h.name, mark = ?now, "state file: server marked");
                    marks.insert(h.name.clone(), now);
                    changed = true;
                }
            }
            let names: Vec<&String> = health.iter().map(|h| &h.name).collect();
            let before = marks.len();
            marks.retain(|n, _| names.contains(&n));
            changed || marks.len() != before
        };
        if changed {
            self.write_running();
        }
    }

    /// The sockets went to another process, which owns the file from now on.
    pub(crate) fn disown(&self) {
        self.disowned
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn write_running(&self) {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let text = {
            let marks = self.marks();
            let mut out = format!("{MAGIC}\nstatus running\n");
            for (name, mark) in marks.iter() {
                let word = match mark {
                    Mark::Clean => "clean",
                    Mark::Learnt => "learnt",
                    Mark::Dirty => "dirty",
                    Mark::Overflowed => "overflowed",
                };
                out.push_str(&format!("server {name} {word}\n"));
            }
            out
        };
        self.write(&text);
    }

    /// A clean exit: every server's listed keys, in the state file, or
    /// after a hand-off in the hand-off file, as the last word.
    pub(crate) fn save(&self, health: &[Arc<Health>]) {
        if self.disowned.load(std::sync::atomic::Ordering::Acquire) {
            self.write_lists(&self.handoff_path(), Status::HandoffFinal, health);
        } else {
            self.write_lists(&self.path, Status::Clean, health);
        }
    }

    fn write_lists(&self, path: &Path, status: Status, health: &[Arc<Health>]) {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let word = match status {
            Status::Clean => "clean",
            Status::Running => "running",
            Status::Handoff => "handoff",
            Status::HandoffFinal => "handoff-final",
        };
        let mut out = format!("{MAGIC}\nstatus {word}\n");
        let untold = match status {
            Status::Handoff | Status::HandoffFinal => self.handoff_state().marks.clone(),
            Status::Clean | Status::Running => None,
        };
        for (i, h) in health.iter().enumerate() {
            // A list held for the fleet's word is not whole (`settle`).
            let overflowed =
                h.missed.is_overflowed() || h.copying.is_overflowed() || h.missed.is_unvouched();
            let word = if overflowed { "overflowed" } else { "clean" };
            out.push_str(&format!("server {} {word}\n", h.name));
            if overflowed {
                continue;
            }
            let mut keys = match &untold {
                Some(marks) => h.missed.snapshot_untold(marks[i]),
                None => h.missed.snapshot(),
            };
            // Keys being copied by a resync count as missed: the copy may
            // not have been checked against a client's write. (The old
            // process of a hand-off cancelled its resyncs before it wrote
            // its first file.)
            if untold.is_none() {
                keys.extend(h.copying.snapshot());
            }
            for k in keys.iter().take(MAX_KEYS) {
                let mut enc = Vec::with_capacity(k.len() * 4 / 3 + 4);
                memrelay_protocol::base64::encode(k, &mut enc);
                out.push_str("key ");
                out.push_str(&String::from_utf8_lossy(&enc));
                out.push('\n');
            }
        }
        if let Err(e) = write_atomically(path, out.as_bytes()) {
            tracing::error!(file = %path.display(), error = %e, "cannot write what servers missed: a restart of memrelay may forget it");
        }
    }

    fn write(&self, text: &str) {
        if self.disowned.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        if let Err(e) = write_atomically(&self.path, text.as_bytes()) {
            tracing::error!(file = %self.path.display(), error = %e, "cannot write the state file: a restart of memrelay may forget what servers missed");
        }
    }
}

/// Applies a loaded file to the servers; returns those made stale for
/// every key (overflowed, or dirty in a file a crashed process left).
fn apply(loaded: &Loaded, health: &[Arc<Health>]) -> Vec<String> {
    let mut stale = Vec::new();
    for h in health {
        let Some((overflowed, keys)) = loaded.servers.get(&h.name) else {
            continue;
        };
        if *overflowed || loaded.status == Status::Running {
            h.missed.learn(None, Source::Handoff);
            stale.push(h.name.clone());
        } else {
            for k in keys {
                h.missed.learn(Some(k), Source::Handoff);
            }
        }
    }
    if !stale.is_empty() {
        tracing::warn!(
            servers = %stale.join(","),
            "the last memrelay did not save what these servers missed: each is flushed before it serves"
        );
    }
    stale
}

/// Moves whenever a server's lists may have changed.
fn changes(health: &[Arc<Health>]) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    health
        .iter()
        .map(|h| {
            h.missed.recorded.load(Relaxed)
                + h.missed.invalidated.load(Relaxed)
                + h.copying.recorded.load(Relaxed)
                + h.missed.flushes.load(Relaxed)
        })
        .fold(0u64, u64::wrapping_add)
}

/// How long the old process waits for the new one to take a record.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Which way the records on one connection of a hand-off travel; the old
/// process opens both and names each in its first line.
#[derive(Debug, Clone, Copy)]
enum Direction {
    /// The old process's records, to the new one.
    ToNew,
    /// The new process's records, to the old one while it drains.
    ToOld,
}

impl Direction {
    fn hello(self) -> &'static [u8] {
        match self {
            Direction::ToNew => b"records to-new\n",
            Direction::ToOld => b"records to-old\n",
        }
    }
}

/// Whether an error says the other end of a socket is gone.
fn is_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | BrokenPipe | ConnectionReset | ConnectionAborted
    )
}

/// Learns the other process's records as they come on `stream`, each
/// acknowledged once learnt, until it closes; then, on the new side
/// (`new`), the old process is gone and no longer shares the servers.
/// `marks`: on the old side, each server's `MissedKeys::mark` at the
/// hand-off, for the `clear` lines the new process sends.
fn take_records_on_a_thread(
    stream: std::os::unix::net::UnixStream,
    health: Vec<Arc<Health>>,
    new: Option<Arc<Persist>>,
    marks: Option<Vec<u64>>,
) {
    let spawned = std::thread::Builder::new()
        .name("memrelay-records".into())
        .spawn(move || {
            take_records(stream, &health, marks.as_deref());
            if let Some(p) = new {
                p.shared.send_replace(false);
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot take the other memrelay's records");
    }
}

fn take_records(
    stream: std::os::unix::net::UnixStream,
    health: &[Arc<Health>],
    marks: Option<&[u64]>,
) {
    use std::io::{BufRead, Write};
    // A quiet peer is a peer with nothing to say: no read timeout.
    let _ = stream.set_read_timeout(None);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        // A record is a server name and a key in base64: a line of a few
        // hundred bytes. One past 4 KiB ends the connection.
        match std::io::Read::take(&mut reader, 4096).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if !line.ends_with('\n') => return,
            Ok(_) => {}
        }
        let text = line.trim_end();
        // A record of a server named "clear" has one space, a clear line
        // two or three.
        let (clear, text) = match text.as_bytes().strip_prefix(CLEAR) {
            Some(rest) if rest.contains(&b' ') => (true, &text[CLEAR.len()..]),
            _ => (false, text),
        };
        let (text, seen) = if clear { split_seen(text) } else { (text, 0) };
        let Some((name, key)) = super::missed::read_record(text) else {
            return;
        };
        if let Some(i) = health.iter().position(|h| h.name == name) {
            let h = &health[i];
            match (clear, key, marks.and_then(|m| m.get(i))) {
                (false, key, mark) => {
                    let gen = h.missed.learn(key.as_deref(), Source::Handoff);
                    h.missed.streamed();
                    // Old side: the new process has this record (it sent
                    // it): its clear covers it, and no file sends it back.
                    if let (Some(k), Some(_)) = (&key, mark) {
                        h.missed.note_relayed(k, gen, 0);
                    }
                }
                (true, Some(key), Some(&mark)) => {
                    h.missed.forget_if_covered(&key, mark, seen);
                    tracing::debug!(server = %h.name, "the new memrelay deleted a key listed here");
                }
                // Not ours to take (this side sends them), or not of one key.
                (true, _, _) => {}
            }
        }
        if out.write_all(b"k\n").is_err() {
            return;
        }
    }
}

/// Starts a line of the record socket that says a key was deleted on its
/// server and forgotten: `clear <server> <key> <seen>`, where `seen` is
/// how many records of that server the sender had learnt from this
/// process (an older release sends no `seen`: 0).
const CLEAR: &[u8] = b"clear ";

/// A clear line's text after `clear `: the record, and its `seen`.
fn split_seen(text: &str) -> (&str, u64) {
    match text.rsplit_once(' ') {
        Some((record, seen)) if record.contains(' ') => match seen.parse() {
            Ok(n) => (record, n),
            Err(_) => (text, 0),
        },
        _ => (text, 0),
    }
}

/// What the state file says of `h`'s server. `in_fleet`: a record of this
/// process's own that a peer took is one the peers give back to a restart
/// after a crash (`Persist::settle`), as they give back their own: a
/// server whose own records all went that far is `learnt`. So is one
/// whose records' hints are on their way: their writes are not answered
/// yet, and the file says `dirty` before they are if no peer takes them.
fn mark_of(h: &Health, in_fleet: bool) -> Mark {
    let own = h.missed.has_own();
    let shared = in_fleet && !h.missed.alone();
    if (h.missed.is_overflowed() && own) || h.copying.is_overflowed() {
        Mark::Overflowed
    } else if own && !shared || !h.copying.is_empty() {
        Mark::Dirty
    } else if !h.missed.is_empty() || h.missed.is_unvouched() {
        Mark::Learnt
    } else {
        Mark::Clean
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    // Named for this process: the old and the new memrelay of a hand-off
    // never share one.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Reads a state file's text.
fn parse(text: &str) -> Result<Loaded, String> {
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err("not a memrelay state file".into());
    }
    let status = match lines.next() {
        Some("status clean") => Status::Clean,
        Some("status running") => Status::Running,
        Some("status handoff") => Status::Handoff,
        Some("status handoff-final") => Status::HandoffFinal,
        other => return Err(format!("bad status line {other:?}")),
    };
    let mut loaded = Loaded {
        status,
        ..Loaded::default()
    };
    let mut current: Option<String> = None;
    for line in lines {
        if let Some(rest) = line.strip_prefix("server ") {
            let (name, word) = rest
                .rsplit_once(' ')
                .ok_or_else(|| format!("bad server line {line:?}"))?;
            let overflowed = match word {
                "clean" => false,
                "dirty" => {
                    // Only a running process writes dirty: its keys are
                    // not in the file.
                    true
                }
                "overflowed" => true,
                "learnt" => {
                    loaded.learnt.push(name.to_string());
                    false
                }
                _ => return Err(format!("bad server line {line:?}")),
            };
            let stale = overflowed;
            loaded.servers.insert(name.to_string(), (stale, Vec::new()));
            current = Some(name.to_string());
        } else if let Some(enc) = line.strip_prefix("key ") {
            let name = current
                .as_ref()
                .ok_or_else(|| "a key before any server".to_string())?;
            let key = memrelay_protocol::base64::decode(enc.as_bytes())
                .ok_or_else(|| format!("bad key line {line:?}"))?;
            if let Some((_, keys)) = loaded.servers.get_mut(name) {
                keys.push(key);
            }
        } else if !line.is_empty() {
            return Err(format!("unknown line {line:?}"));
        }
    }
    if status == Status::Running {
        // A crash: only the servers marked dirty (or overflowed) are
        // stale; a clean mark while running is trustworthy.
        loaded.servers.retain(|_, (stale, _)| *stale);
    } else {
        // Only a running process writes `learnt`.
        loaded.learnt.clear();
    }
    Ok(loaded)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn health(name: &str) -> Arc<Health> {
        Arc::new(Health::new(name.into(), 16, 1))
    }

    /// A new process takes over from `old` (as `--handoff` does): it starts
    /// while `old` hands its lists over. Returns the new process's state.
    fn take_over(
        path: &Path,
        old: &Arc<Persist>,
        old_servers: &[Arc<Health>],
        new_servers: &[Arc<Health>],
    ) -> Arc<Persist> {
        let new = Persist::new(path.to_path_buf());
        let starting = {
            let (new, servers) = (new.clone(), new_servers.to_vec());
            std::thread::spawn(move || new.start(&servers, true))
        };
        assert!(old.hand_off(old_servers), "the new one takes records");
        starting.join().unwrap();
        new
    }

    /// A process with one server, `a:1`, started on a fresh state file.
    fn started_alone(test: &str) -> (PathBuf, Arc<Health>, Arc<Persist>) {
        let path = temp(test);
        let a = health("a:1");
        let p = Persist::new(path.clone());
        p.start(std::slice::from_ref(&a), false);
        (path, a, p)
    }

    /// Removes the directory `temp` made for `path`.
    fn forget(path: &Path) {
        if let Some(dir) = path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("memrelay-persist-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir.join("state")
    }

    #[test]
    fn a_clean_exit_gives_the_next_start_its_keys() {
        let path = temp("clean");
        let (a, b) = (health("a:1"), health("b:2"));
        let p = Persist::new(path.clone());
        assert!(p.start(&[a.clone(), b.clone()], false).is_empty());
        a.missed.record(b"k1");
        a.missed.record(&[0, 159, 32]);
        p.save(&[a.clone(), b.clone()]);
        let (a2, b2) = (health("a:1"), health("b:2"));
        let p2 = Persist::new(path.clone());
        assert!(p2.start(&[a2.clone(), b2.clone()], false).is_empty());
        assert!(a2.missed.contains(b"k1"));
        assert!(a2.missed.contains(&[0, 159, 32]));
        assert!(!a2.missed.is_overflowed());
        assert!(b2.missed.is_empty());
        forget(&path);
    }

    #[test]
    fn after_a_crash_the_servers_marked_dirty_are_stale_for_every_key() {
        let path = temp("crash");
        let (a, b) = (health("a:1"), health("b:2"));
        let p = Persist::new(path.clone());
        p.start(&[a.clone(), b.clone()], false);
        // The first record marks the file before the write is answered.
        a.missed.record(b"k1");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("server a:1 dirty"), "{text}");
        assert!(text.contains("status running"), "{text}");
        // No save: the process dies.
        drop(p);
        let (a2, b2) = (health("a:1"), health("b:2"));
        let stale = Persist::new(path.clone()).start(&[a2.clone(), b2.clone()], false);
        assert_eq!(stale, vec!["a:1".to_string()]);
        assert!(a2.missed.is_overflowed());
        assert!(b2.missed.is_empty());
        forget(&path);
    }

    #[test]
    fn in_a_fleet_a_server_is_marked_dirty_only_once_no_peer_took_a_record() {
        let (path, a, p) = started_alone("fleet-marks");
        a.missed.track_shares();
        p.join_fleet();
        let file = || std::fs::read_to_string(&path).unwrap();
        let gens = Arc::new(Mutex::new(Vec::new()));
        let g = gens.clone();
        a.missed
            .on_record(Box::new(move |_, _, gen, _| g.lock().unwrap().push(gen)));
        // The record's hint is on its way (its write waits for it): a
        // crash now loses no answered write, and the peers are asked.
        a.missed.record(b"k1");
        assert!(file().contains("server a:1 learnt"), "{}", file());
        p.refresh(std::slice::from_ref(&a));
        assert!(file().contains("server a:1 learnt"), "{}", file());
        // No peer took it: dirty before the write is answered, and until
        // the record is gone.
        let gen = *gens.lock().unwrap().last().unwrap();
        a.missed.untaken(b"k1", gen);
        assert!(file().contains("server a:1 dirty"), "{}", file());
        a.missed.record(b"k2");
        p.refresh(std::slice::from_ref(&a));
        assert!(file().contains("server a:1 dirty"), "{}", file());
        a.missed.confirm_quietly(&[Box::from(&b"k1"[..])]);
        p.refresh(std::slice::from_ref(&a));
        assert!(file().contains("server a:1 learnt"), "{}", file());
        forget(&path);
    }

    #[test]
    fn a_server_whose_list_emptied_is_marked_clean_again() {
        let (path, a, p) = started_alone("refresh");
        a.missed.record(b"k1");
        let batch = a.missed.peek_batch(10);
        a.missed.confirm(&batch);
        p.refresh(std::slice::from_ref(&a));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("server a:1 clean"), "{text}");
        let a2 = health("a:1");
        assert!(Persist::new(path.clone())
            .start(std::slice::from_ref(&a2), false)
            .is_empty());
        forget(&path);
    }

    #[test]
    fn a_hand_off_carries_the_lists_and_what_the_draining_process_adds() {
        let path = temp("handoff");
        let old_a = health("a:1");
        let old = Persist::new(path.clone());
        old.start(std::slice::from_ref(&old_a), false);
        old_a.missed.record(b"before");
        // The new process has the sockets and waits for the old one's
        // lists; the old one hands over.
        let new_a = health("a:1");
        let new = Persist::new(path.clone());
        let starting = {
            let (new, new_a) = (new.clone(), new_a.clone());
            std::thread::spawn(move || new.start(std::slice::from_ref(&new_a), true))
        };
        old.hand_off(std::slice::from_ref(&old_a));
        assert!(starting.join().unwrap().is_empty());
        assert!(new_a.missed.contains(b"before"));
        // While it drains, the old process records one more: the new one
        // has it by the time the record returns.
        old_a.missed.record(b"during");
        assert!(new_a.missed.contains(b"during"));
        old_a.missed.record(&[0, 1, 255]);
        assert!(new_a.missed.contains(&[0, 1, 255]));
        // And the reverse: the old one still serves the clients it had, so
        // it learns what the new one records, also before the record
        // returns (and does not send it back).
        new_a.missed.record(b"seen by the new one");
        assert!(old_a.missed.contains(b"seen by the new one"));
        new_a.copying.record(b"being copied");
        assert!(old_a.missed.contains(b"being copied"));
        assert_eq!(
            new_a
                .missed
                .recorded
                .load(std::sync::atomic::Ordering::Relaxed),
            4,
            "before, during, [0 1 255], and its own"
        );
        assert!(*old.shared().borrow(), "the old one shares the servers");
        assert!(
            *new.shared().borrow(),
            "so does the new one, while the old one drains"
        );
        old_a.missed.record(b"last");
        old.save(std::slice::from_ref(&old_a));
        new.tick(std::slice::from_ref(&new_a));
        assert!(new_a.missed.contains(b"last"));
        assert!(
            !new.handoff_path().exists(),
            "the final hand-off file is consumed"
        );
        // The old process never wrote the state file after handing off.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("status running"), "{text}");
        // After its last word, the new one has the servers to itself
        // (resyncs may start).
        assert!(!*new.shared().borrow(), "no longer shared");
        forget(&path);
    }

    /// What the new process of a hand-off already dealt with stays dealt
    /// with: an overflow it took and flushed is not taken again from the
    /// old one's later files (the old one flushes nothing any more), and
    /// a key it deleted is forgotten by the old one.
    #[test]
    fn a_hand_off_takes_an_overflow_once_and_tells_what_was_deleted() {
        let path = temp("handoff-once");
        let (old_a, old_b) = (health("a:1"), health("b:1"));
        let old_both = [old_a.clone(), old_b.clone()];
        let old = Persist::new(path.clone());
        old.start(&old_both, false);
        old_a.missed.record_all();
        old_b.missed.record(b"k");
        let (new_a, new_b) = (health("a:1"), health("b:1"));
        let new_both = [new_a.clone(), new_b.clone()];
        let new = take_over(&path, &old, &old_both, &new_both);
        assert!(new_a.missed.is_overflowed());
        assert!(new_b.missed.contains(b"k"));
        // The old one, draining, records a key after the hand-off: the
        // new one learns it over the record socket.
        old_b.missed.record(b"late");
        assert!(new_b.missed.contains(b"late"));
        // The new one flushes a and deletes k and late on b.
        new_a.missed.clear();
        let batch = new_b.missed.peek_batch(10);
        let seen = new_b.missed.streamed_count();
        new_b.missed.confirm(&batch);
        // Meanwhile the old one records another key, sent after `seen`.
        old_b.missed.record(b"after");
        let keys: Vec<Box<[u8]>> = [&b"k"[..], b"late", b"after"].map(Box::from).into();
        new_b.missed.cleared(&keys, seen);
        assert!(!old_b.missed.contains(b"k"), "the old one forgot k");
        assert!(
            !old_b.missed.contains(b"late"),
            "a record the new one had when it deleted is forgotten too"
        );
        assert!(
            old_b.missed.contains(b"after"),
            "a record the delete may not cover stays"
        );
        assert!(old_a.missed.is_overflowed(), "a flush is not told");
        // The old one's last file still says a overflowed.
        old.save(&old_both);
        new.tick(&new_both);
        assert!(
            !new_a.missed.is_overflowed(),
            "the overflow was taken again after the flush"
        );
        forget(&path);
    }

    #[test]
    fn the_old_process_never_gives_back_a_record_the_new_one_had() {
        let path = temp("handoff-no-echo");
        let old_b = health("b:1");
        let old_both = [old_b.clone()];
        let old = Persist::new(path.clone());
        old.start(&old_both, false);
        let new_b = health("b:1");
        let new_both = [new_b.clone()];
        let new = take_over(&path, &old, &old_both, &new_both);
        // One record each side makes after the hand-off, each sent over.
        new_b.missed.record(b"new's");
        old_b.missed.record(b"old's");
        assert!(old_b.missed.contains(b"new's") && new_b.missed.contains(b"old's"));
        // The new one deletes both. Its clear covers its own record; the
        // old one's it had not learnt by the count it sends (as when the
        // clear overtakes the old one's note that the record was sent).
        let batch = new_b.missed.peek_batch(10);
        new_b.missed.confirm(&batch);
        let keys: Vec<Box<[u8]>> = [&b"new's"[..], b"old's"].map(Box::from).into();
        new_b.missed.cleared(&keys, 0);
        assert!(
            !old_b.missed.contains(b"new's"),
            "a record the new one sent is forgotten at its clear"
        );
        assert!(old_b.missed.contains(b"old's"), "not covered: it stays");
        // Later writes put the keys' only copies on b; the old one's next
        // files must not make the new one delete them again.
        old.tick(&old_both);
        new.tick(&new_both);
        old.save(&old_both);
        new.tick(&new_both);
        assert!(
            !new_b.missed.contains(b"old's") && !new_b.missed.contains(b"new's"),
            "a file gave back a record the new one had, and deleted"
        );
        forget(&path);
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse("hello\n").is_err());
        assert!(parse(&format!("{MAGIC}\nstatus maybe\n")).is_err());
        assert!(parse(&format!("{MAGIC}\nstatus clean\nkey aGk=\n")).is_err());
        assert!(parse(&format!(
            "{MAGIC}\nstatus clean\nserver a:1 clean\nkey !!\n"
        ))
        .is_err());
    }
}
