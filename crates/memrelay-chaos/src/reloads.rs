//! `--reloads`: rolling reloads of the memrelays, as an operator makes
//! them. A spare memcached (never killed) is added to the primaries, then
//! removed again, over and over: each time every member's configuration
//! file is rewritten and the member sent SIGHUP, one after another, a
//! random 0..1.5 s apart, so that members run the old and the new server
//! list at once (in a fleet, `fleet::epoch` must keep that safe). About a
//! quarter of the keys move to the spare and back.
//!
//! For the loss check every server counts as disturbed at each member's
//! reload: a reload may flush servers (keys that return to a server that
//! lost them), and the model knows each key's first primary only. The
//! stale check is untouched.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memrelay_testkit::conn::Conn;
use memrelay_testkit::{Forwarder, Memcached, Memrelay, Rng};

use crate::chaos::Watch;
use crate::fleet::Fleet;

/// The spare, each member's file, and where the rolling reload stands.
pub struct Reloads {
    _spare: Memcached,
    /// In a fleet, each member's link to the spare (never faulted).
    _spare_links: Vec<Forwarder>,
    /// Per member: its file, its primaries' and backup's entries, and
    /// the spare's, as that member reaches them.
    members: Vec<Member>,
    /// Whether the list being rolled out has the spare.
    spare_in: bool,
    /// Members still to reload to it, next last.
    pending: Vec<usize>,
    next_at: Instant,
    pub count: u64,
}

struct Member {
    file: PathBuf,
    primaries: Vec<String>,
    backup: String,
    spare: String,
}

impl Member {
    fn text(&self, spare_in: bool) -> String {
        let mut primaries: Vec<String> = self.primaries.iter().map(|p| format!("{p:?}")).collect();
        if spare_in {
            primaries.push(format!("{:?}", self.spare));
        }
        format!(
            "[pools]\nprimaries = [{}]\nbackups = [{:?}]\n",
            primaries.join(", "),
            self.backup
        )
    }
}

impl Reloads {
    /// The spare started, and each member's file written with the list
    /// without it. `servers`: the primaries, then the backup.
    pub fn new(
        memcached: &str,
        members: usize,
        servers: &[Memcached],
        fleet: Option<&Fleet>,
        dir: &Path,
        seed: u64,
    ) -> Result<Reloads, String> {
        let spare = Memcached::launch(memcached, "127.0.0.1", &[])?;
        let b = servers.len() - 1;
        let spare_links: Vec<Forwarder> = match fleet {
            Some(_) => (0..members)
                .map(|_| Forwarder::start(&spare.addr()))
                .collect(),
            None => Vec::new(),
        };
        let members = (0..members)
            .map(|m| {
                let addr = |s: usize| match fleet {
                    Some(f) => f.links[m][s].addr(),
                    None => servers[s].addr(),
                };
                Member {
                    file: dir.join(format!("member{m}.toml")),
                    primaries: (0..b).map(|i| format!("{}:1 p{i}", addr(i))).collect(),
                    backup: format!("{}:1 backup", addr(b)),
                    spare: format!(
                        "{}:1 spare",
                        spare_links.get(m).map_or(spare.addr(), Forwarder::addr)
                    ),
                }
            })
            .collect::<Vec<_>>();
        for m in &members {
            std::fs::write(&m.file, m.text(false))
                .map_err(|e| format!("{}: {e}", m.file.display()))?;
        }
        let mut rng = Rng::new(seed ^ 0x7265_6c6f_6164);
        Ok(Reloads {
            _spare: spare,
            _spare_links: spare_links,
            members,
            spare_in: false,
            pending: Vec::new(),
            next_at: Instant::now() + Duration::from_millis(2000 + rng.below(3000)),
            count: 0,
        })
    }

    /// Member m's `--config` flag.
    pub fn args(&self, m: usize) -> Vec<String> {
        vec![
            "--config".to_string(),
            self.members[m].file.display().to_string(),
        ]
    }

    /// When due, the next member's reload (the first one of a rolling
    /// reload picks the members' order); a line for the chaos log.
    pub fn step(&mut self, relays: &[Memrelay], rng: &mut Rng, watch: &Watch) -> Option<String> {
        if Instant::now() < self.next_at {
            return None;
        }
        if self.pending.is_empty() {
            self.spare_in = !self.spare_in;
            self.pending = (0..relays.len()).collect();
            // Fisher-Yates, from the run's seed.
            for i in (1..self.pending.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                self.pending.swap(i, j);
            }
        }
        let m = *self.pending.last()?;
        // SIGHUP ends a memrelay that does not handle it yet: one just
        // restarted must answer first.
        if !answers(&relays[m].addr()) {
            self.next_at = Instant::now() + Duration::from_millis(100);
            return None;
        }
        self.pending.pop();
        let member = &self.members[m];
        if let Err(e) = std::fs::write(&member.file, member.text(self.spare_in)) {
            return Some(format!("member {m}: cannot write its file: {e}"));
        }
        watch.relay_crashed();
        relays[m].hangup();
        self.count += 1;
        self.next_at = Instant::now()
            + if self.pending.is_empty() {
                Duration::from_millis(4000 + rng.below(5000))
            } else {
                Duration::from_millis(rng.below(1500))
            };
        Some(format!(
            "[{:>7}ms] member {m} reloaded to the list {} the spare",
            watch.start.elapsed().as_millis(),
            if self.spare_in { "with" } else { "without" }
        ))
    }
}

impl Reloads {
    /// Reloads the members a rolling reload has not reached yet, and waits
    /// (at most 20 s) until no member is in a fleet reload.
    pub fn finish(&mut self, relays: &[Memrelay], watch: &Watch) -> Result<(), String> {
        let mut rng = Rng::new(0);
        while !self.pending.is_empty() {
            self.next_at = Instant::now();
            if self.step(relays, &mut rng, watch).is_none() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let steady = |r: &Memrelay| {
            crate::stats(&r.addr())
                .get("fleet_reload_stage")
                .is_none_or(|s| s == "0")
        };
        if memrelay_testkit::process::wait_until(Duration::from_secs(20), || {
            relays.iter().all(steady)
        }) {
            Ok(())
        } else {
            Err("the members did not finish their fleet reload within 20 s of the last".into())
        }
    }
}

/// Whether the memrelay at `addr` answers `version` within a second.
fn answers(addr: &str) -> bool {
    let Ok(mut c) = Conn::connect(addr) else {
        return false;
    };
    c.send(b"version\r\n").is_ok()
        && c.line(Instant::now() + Duration::from_secs(1))
            .is_ok_and(|l| l.starts_with("VERSION"))
}
