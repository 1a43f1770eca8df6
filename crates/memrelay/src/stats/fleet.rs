//! What `stats` and `/metrics` show of a fleet: its peers, whether each is
//! reached, how long since it last answered, and the hints exchanged.
//!
//! The `fleet` module is the only writer; the figures are atomics because
//! the writers are worker threads (a hint is sent by the thread whose write
//! went past a server) and the peer threads.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The fleet's figures.
#[derive(Debug)]
pub(crate) struct FleetFigures {
    /// Hints this memrelay sent (one per key and server, to every peer).
    pub hints_sent: AtomicU64,
    /// Hints taken from peers.
    pub hints_received: AtomicU64,
    /// Of those sent and taken, hints marked held: the record of a write
    /// given up on after it was sent, which may still land
    /// (`settle::Held`).
    pub hints_held_sent: AtomicU64,
    pub hints_held_received: AtomicU64,
    /// Hints that no peer took before the write they were for was
    /// answered: the knowledge lived in this process only.
    pub hints_unacked: AtomicU64,
    /// Hints fewer peers took than `--peer-confirm` requires.
    pub hints_unconfirmed: AtomicU64,
    /// Writes answered `SERVER_ERROR` because their hints were not
    /// confirmed.
    pub writes_refused: AtomicU64,
    /// Hints from peers that named a server this memrelay does not have
    /// (a fleet configured unalike).
    pub hints_unknown: AtomicU64,
    /// This member's stage in a fleet reload: 0 steady, 1 aware of the
    /// new routing, 2 switched to it (`fleet::epoch`).
    pub stage: AtomicU8,
    /// Fleet reloads this member finished (its stage back to steady).
    pub reloads_done: AtomicU64,
    pub peers: Vec<PeerFigures>,
}

/// One peer's figures.
#[derive(Debug)]
pub(crate) struct PeerFigures {
    /// As configured (`--peer`).
    pub name: String,
    pub up: AtomicBool,
    /// When it last answered (a hint or a ping).
    pub last_answer: Mutex<Option<Instant>>,
    /// When this memrelay started: a peer never reached lags since then.
    since: Instant,
    /// Hints it took.
    pub hints_taken: AtomicU64,
    /// Times it was counted down.
    pub failures: AtomicU64,
    /// Its stage in a fleet reload, as it last said.
    pub stage: AtomicU8,
}

impl FleetFigures {
    pub(crate) fn new(peers: impl Iterator<Item = String>) -> FleetFigures {
        FleetFigures {
            hints_sent: AtomicU64::new(0),
            hints_received: AtomicU64::new(0),
            hints_held_sent: AtomicU64::new(0),
            hints_held_received: AtomicU64::new(0),
            hints_unacked: AtomicU64::new(0),
            hints_unconfirmed: AtomicU64::new(0),
            writes_refused: AtomicU64::new(0),
            hints_unknown: AtomicU64::new(0),
            stage: AtomicU8::new(0),
            reloads_done: AtomicU64::new(0),
            peers: peers
                .map(|name| PeerFigures {
                    name,
                    up: AtomicBool::new(false),
                    last_answer: Mutex::new(None),
                    since: Instant::now(),
                    hints_taken: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    stage: AtomicU8::new(0),
                })
                .collect(),
        }
    }

    pub(crate) fn peers_up(&self) -> usize {
        self.peers
            .iter()
            .filter(|p| p.up.load(Ordering::Relaxed))
            .count()
    }

    /// The fleet's counters, each once for both views: `stats` line
    /// `peer_<name>`, `/metrics` series `memrelay_peer_<name>_total`.
    fn counters(&self) -> [(&'static str, &AtomicU64, &'static str); 8] {
        [
            (
                "hints_sent",
                &self.hints_sent,
                "Hints (a key a server missed) this memrelay sent its peers.",
            ),
            ("hints_received", &self.hints_received, "Hints taken from peers."),
            (
                "hints_held_sent",
                &self.hints_held_sent,
                "Hints sent marked held: a write given up on after it was sent may still land.",
            ),
            (
                "hints_held_received",
                &self.hints_held_received,
                "Hints taken from peers marked held (kept until the server settles for this memrelay).",
            ),
            (
                "hints_unacked",
                &self.hints_unacked,
                "Hints no peer took before their write was answered.",
            ),
            (
                "hints_unconfirmed",
                &self.hints_unconfirmed,
                "Hints fewer peers took than --peer-confirm requires.",
            ),
            (
                "writes_refused",
                &self.writes_refused,
                "Writes answered SERVER_ERROR because too few peers took their hints.",
            ),
            (
                "hints_unknown",
                &self.hints_unknown,
                "Hints naming a server this memrelay does not have (members configured unalike, or a fleet reload under way).",
            ),
        ]
    }

    /// The `stats` lines.
    pub(crate) fn stats(&self, stat: &mut dyn FnMut(&str, &dyn std::fmt::Display)) {
        stat("peers", &self.peers.len());
        stat("peers_up", &self.peers_up());
        for (name, v, _) in self.counters() {
            stat(&format!("peer_{name}"), &v.load(Ordering::Relaxed));
        }
        stat("fleet_reload_stage", &self.stage.load(Ordering::Relaxed));
        stat(
            "fleet_reloads_done",
            &self.reloads_done.load(Ordering::Relaxed),
        );
        for (i, p) in self.peers.iter().enumerate() {
            let up = p.up.load(Ordering::Relaxed);
            stat(&format!("peer:{i}:address"), &p.name);
            stat(&format!("peer:{i}:state"), &if up { "up" } else { "down" });
            stat(&format!("peer:{i}:lag_ms"), &p.lag_ms());
            stat(
                &format!("peer:{i}:hints_taken"),
                &p.hints_taken.load(Ordering::Relaxed),
            );
            stat(
                &format!("peer:{i}:failures"),
                &p.failures.load(Ordering::Relaxed),
            );
            stat(
                &format!("peer:{i}:reload_stage"),
                &p.stage.load(Ordering::Relaxed),
            );
        }
    }

    /// The `/metrics` series.
    pub(crate) fn metrics(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(
                out,
                "# HELP memrelay_{name} {help}\n# TYPE memrelay_{name} {kind}"
            );
        };
        metric("peers_up", "gauge", "Peers of the fleet reached now.");
        metric(
            "peer_up",
            "gauge",
            "1 if the peer is reached, 0 if counted down.",
        );
        metric(
            "peer_lag_seconds",
            "gauge",
            "Seconds since the peer last answered (a hint or a ping).",
        );
        metric(
            "peer_hints_taken_total",
            "counter",
            "Hints the peer took from this memrelay.",
        );
        for (name, _, help) in self.counters() {
            metric(&format!("peer_{name}_total"), "counter", help);
        }
        let _ = writeln!(out, "memrelay_peers_up {}", self.peers_up());
        for p in &self.peers {
            // A peer's name is an address the configuration resolved: no
            // quote or backslash to escape.
            let name = &p.name;
            let up = u8::from(p.up.load(Ordering::Relaxed));
            let _ = writeln!(out, "memrelay_peer_up{{peer=\"{name}\"}} {up}");
            let _ = writeln!(
                out,
                "memrelay_peer_lag_seconds{{peer=\"{name}\"}} {}",
                p.lag_ms() as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "memrelay_peer_hints_taken_total{{peer=\"{name}\"}} {}",
                p.hints_taken.load(Ordering::Relaxed)
            );
        }
        for (name, v, _) in self.counters() {
            let _ = writeln!(
                out,
                "memrelay_peer_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
        self.reload_metrics(out);
    }

    /// The `/metrics` series of fleet reloads.
    fn reload_metrics(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP memrelay_fleet_reload_stage This member's stage in a fleet reload: \
             0 steady, 1 aware of the new routing, 2 switched to it.\n\
             # TYPE memrelay_fleet_reload_stage gauge\n\
             memrelay_fleet_reload_stage {}",
            self.stage.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP memrelay_fleet_reloads_done_total Fleet reloads this member finished.\n\
             # TYPE memrelay_fleet_reloads_done_total counter\n\
             memrelay_fleet_reloads_done_total {}",
            self.reloads_done.load(Ordering::Relaxed)
        );
    }
}

impl PeerFigures {
    /// Milliseconds since the peer last answered; for one never reached,
    /// since memrelay started (`u64::MAX` would read as a bug).
    pub(crate) fn lag_ms(&self) -> u64 {
        let last = *self.last_answer.lock().unwrap_or_else(|p| p.into_inner());
        last.unwrap_or(self.since).elapsed().as_millis() as u64
    }

    pub(crate) fn answered(&self) {
        *self.last_answer.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }
}
