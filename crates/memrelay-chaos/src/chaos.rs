//! The chaos thread, and the record of what it did to each server (which
//! the checks read to know which replicas were left alone).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use memrelay_testkit::{Memcached, Rng};

const UP: u8 = 0;
const STOPPED: u8 = 1;
const KILLED: u8 = 2;

/// What the chaos thread did to one server, readable by every client.
#[derive(Debug, Default)]
pub struct ServerWatch {
    /// 1 + milliseconds since the start of the last event (the instant an
    /// action began and the instant it ended both count); 0: none yet.
    last_event: AtomicU64,
    state: AtomicU8,
}

/// The servers' watches: primaries 0..n, then the backup.
#[derive(Debug)]
pub struct Watch {
    pub start: Instant,
    pub settle: Duration,
    pub servers: Vec<ServerWatch>,
}

impl Watch {
    pub fn new(start: Instant, settle: Duration, n: usize) -> Watch {
        Watch {
            start,
            settle,
            servers: (0..n).map(|_| ServerWatch::default()).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn event(&self, i: usize, state: u8) {
        let s = &self.servers[i];
        s.last_event.store(self.now_ms() + 1, Ordering::SeqCst);
        s.state.store(state, Ordering::SeqCst);
    }

    /// Server `i` is up now and nothing happened to it from `settle` before
    /// `since` until now.
    pub fn untouched_since(&self, i: usize, since: Instant) -> bool {
        let s = &self.servers[i];
        if s.state.load(Ordering::SeqCst) != UP {
            return false;
        }
        let last = s.last_event.load(Ordering::SeqCst);
        if last == 0 {
            return true;
        }
        let from = since.saturating_duration_since(self.start).as_millis() as i64
            - self.settle.as_millis() as i64;
        ((last - 1) as i64) < from
    }

    /// A memrelay's link to server `i` was cut, reset or slowed (or healed):
    /// writes through it may have gone past the server, so for the loss
    /// check the server counts as disturbed, as after any event. It stays
    /// up: nothing on it was lost.
    pub fn link_fault(&self, i: usize) {
        self.servers[i]
            .last_event
            .store(self.now_ms() + 1, Ordering::SeqCst);
    }

    /// memrelay itself crashed: the next one flushes the servers it had
    /// marked dirty, so every server counts as disturbed from now on (a
    /// planned restart or a hand-off passes the lists on and does not).
    pub fn relay_crashed(&self) {
        let now = self.now_ms() + 1;
        for s in &self.servers {
            s.last_event.store(now, Ordering::SeqCst);
        }
    }

    /// One replica of a key with primary `p` (the primary, or the backup,
    /// the last server) untouched since `since`.
    pub fn live_replica(&self, p: usize, since: Instant) -> bool {
        self.untouched_since(p, since) || self.untouched_since(self.servers.len() - 1, since)
    }
}

/// How the chaos thread may act.
#[derive(Debug, Clone, Copy)]
pub struct ChaosCfg {
    /// Also take the backup out (only while every primary is up, unless
    /// `overlap`).
    pub backup: bool,
    /// Allow a key's primary and backup to be out at the same time.
    pub overlap: bool,
    /// Pause between actions: uniformly in this range (ms).
    pub pause_ms: (u64, u64),
}

/// Counts of what the chaos thread did.
#[derive(Debug, Default, Clone)]
pub struct ChaosTally {
    pub kills: u64,
    pub restarts: u64,
    pub stops: u64,
    pub conts: u64,
    pub backup_events: u64,
    pub log: Vec<String>,
    pub error: Option<String>,
}

impl ChaosTally {
    pub fn events(&self) -> u64 {
        self.kills + self.restarts + self.stops + self.conts
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Kill,
    Restart,
    Stop,
    Cont,
}

/// Applies `act` to server `i` (recording it before and after), logs it.
fn act(
    servers: &mut [Memcached],
    watch: &Watch,
    tally: &mut ChaosTally,
    i: usize,
    act: Act,
) -> Result<(), String> {
    let backup = i == servers.len() - 1;
    let name = if backup {
        "backup".to_string()
    } else {
        format!("primary {i}")
    };
    let (during, after) = match act {
        Act::Kill => (KILLED, KILLED),
        Act::Restart => (KILLED, UP),
        Act::Stop => (STOPPED, STOPPED),
        Act::Cont => (STOPPED, UP),
    };
    watch.event(i, during);
    let began = Instant::now();
    let r = match act {
        Act::Kill => {
            servers[i].kill();
            tally.kills += 1;
            Ok(())
        }
        Act::Restart => {
            tally.restarts += 1;
            servers[i].try_restart()
        }
        Act::Stop => {
            tally.stops += 1;
            servers[i].try_stop()
        }
        Act::Cont => {
            tally.conts += 1;
            servers[i].try_cont()
        }
    };
    watch.event(i, after);
    if backup {
        tally.backup_events += 1;
    }
    tally.log.push(format!(
        "[{:>7}ms] {act:?} {name} ({}), took {} ms",
        began.saturating_duration_since(watch.start).as_millis(),
        servers[i].addr(),
        began.elapsed().as_millis()
    ));
    r
}

/// Takes servers (primaries, then the backup last) out and brings them back
/// until `stop`; then brings every server back.
pub fn run(
    servers: &mut [Memcached],
    watch: &Watch,
    cfg: ChaosCfg,
    seed: u64,
    stop: &AtomicBool,
) -> ChaosTally {
    let mut rng = Rng::new(seed);
    let mut tally = ChaosTally::default();
    let n = servers.len();
    let b = n - 1;
    let mut state = vec![Act::Restart; n]; // Restart/Cont: up
    let is_up = |a: Act| matches!(a, Act::Restart | Act::Cont);
    let result = (|| -> Result<(), String> {
        while !stop.load(Ordering::Relaxed) {
            // Pacing only: the checks never depend on these sleeps.
            let (lo, hi) = cfg.pause_ms;
            thread::sleep(Duration::from_millis(lo + rng.below(hi - lo + 1)));
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let primaries_up = state[..b].iter().all(|a| is_up(*a));
            let backup_up = is_up(state[b]);
            // The backup is out: bring it back (unless overlapping, when it
            // is just one more server to pick from).
            let mut candidates: Vec<usize> = Vec::new();
            if cfg.overlap {
                candidates.extend(0..b);
                if cfg.backup {
                    candidates.push(b);
                }
            } else if !backup_up {
                candidates.push(b);
            } else {
                candidates.extend(0..b);
                if cfg.backup && primaries_up && rng.below(100) < 25 {
                    candidates = vec![b];
                }
            }
            let i = candidates[rng.below(candidates.len() as u64) as usize];
            // Without overlap a primary is only touched while the backup
            // is up (guaranteed above), and the backup only while every
            // primary is up, so no key ever has both replicas out.
            if !cfg.overlap && i != b && !backup_up {
                continue;
            }
            let roll = rng.below(100);
            let next = match state[i] {
                Act::Restart | Act::Cont if roll < 50 => Act::Kill,
                Act::Restart | Act::Cont => Act::Stop,
                Act::Stop if roll < 20 => Act::Kill,
                Act::Stop => Act::Cont,
                Act::Kill => Act::Restart,
            };
            act(servers, watch, &mut tally, i, next)?;
            state[i] = next;
            if i == b && !cfg.overlap {
                // Bring the backup back after a short outage (nothing else
                // is touched meanwhile).
                thread::sleep(Duration::from_millis(200 + rng.below(600)));
                let back = if next == Act::Kill {
                    Act::Restart
                } else {
                    // A stopped backup may be killed while stopped.
                    if rng.below(100) < 20 {
                        act(servers, watch, &mut tally, i, Act::Kill)?;
                        Act::Restart
                    } else {
                        Act::Cont
                    }
                };
                act(servers, watch, &mut tally, i, back)?;
                state[i] = back;
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        tally.error = Some(e);
    }
    // Everything back.
    for (i, s) in state.clone().iter().enumerate() {
        let r = match s {
            Act::Restart | Act::Cont => Ok(()),
            Act::Stop => act(servers, watch, &mut tally, i, Act::Cont),
            Act::Kill => act(servers, watch, &mut tally, i, Act::Restart),
        };
        if let Err(e) = r {
            tally.error.get_or_insert(e);
        }
    }
    tally.log.push(format!(
        "[{:>7}ms] all servers back",
        watch.start.elapsed().as_millis()
    ));
    tally
}
