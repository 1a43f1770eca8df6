//! `--fleet N`: N memrelays that are peers of each other (`--peer`), each
//! reaching every server through its own fault-injecting forwarder (a fake
//! network link: the test kit's `Forwarder`), and, with `--partitions`, a
//! thread that cuts, resets and slows single links at random: partial
//! partitions, where one memrelay loses a server the others still reach.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use memrelay_testkit::process::try_free_port;
use memrelay_testkit::{Fault, Forwarder, Memcached, Rng};

use crate::chaos::Watch;

/// The fleet's links and peer ports.
#[derive(Debug)]
pub struct Fleet {
    /// `links[m][s]`: member m's link to server s (primaries, then the
    /// backup).
    pub links: Vec<Vec<Forwarder>>,
    /// With `--peer-cuts`, `peer_links[m][j]`: member m's link to member
    /// j's peer port (None for j = m); members then reach each other at
    /// other addresses than they listen on.
    peer_links: Vec<Vec<Option<Forwarder>>>,
    peer_ports: Vec<u16>,
    secret: String,
}

impl Fleet {
    pub fn new(
        members: usize,
        servers: &[Memcached],
        dir: &Path,
        peer_cuts: bool,
    ) -> Result<Fleet, String> {
        let links = (0..members)
            .map(|_| {
                servers
                    .iter()
                    .map(|s| Forwarder::start(&s.addr()))
                    .collect()
            })
            .collect();
        let peer_ports: Vec<u16> = (0..members)
            .map(|_| try_free_port("127.0.0.1"))
            .collect::<Result<_, _>>()?;
        let secret = dir.join("fleet.secret");
        std::fs::write(&secret, "the chaos fleet's shared secret\n")
            .map_err(|e| format!("{}: {e}", secret.display()))?;
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&secret, private).map_err(|e| e.to_string())?;
        let peer_links = if peer_cuts {
            (0..members)
                .map(|m| {
                    peer_ports
                        .iter()
                        .enumerate()
                        .map(|(j, p)| (j != m).then(|| Forwarder::start(&format!("127.0.0.1:{p}"))))
                        .collect()
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Fleet {
            links,
            peer_links,
            peer_ports,
            secret: secret.display().to_string(),
        })
    }

    /// Member m's server and fleet flags: every server through m's own
    /// link, under a name (so the members route and hint alike).
    pub fn args(&self, m: usize) -> Vec<String> {
        let links = &self.links[m];
        let b = links.len() - 1;
        let mut args = Vec::new();
        for (i, l) in links[..b].iter().enumerate() {
            args.extend(["-s".to_string(), format!("{}:1 p{i}", l.addr())]);
        }
        args.extend(["-b".to_string(), format!("{}:1 backup", links[b].addr())]);
        args.extend(self.peer_args(m));
        args
    }

    /// Member m's fleet flags alone (its servers come from a file:
    /// `--reloads`).
    pub fn peer_args(&self, m: usize) -> Vec<String> {
        let mut args = Vec::new();
        args.extend([
            "--peer-listen".to_string(),
            format!("127.0.0.1:{}", self.peer_ports[m]),
            "--peer-secret-file".to_string(),
            self.secret.clone(),
        ]);
        for (j, p) in self.peer_ports.iter().enumerate() {
            let at = match self.peer_links.get(m).and_then(|l| l[j].as_ref()) {
                Some(link) => link.addr(),
                None => format!("127.0.0.1:{p}"),
            };
            args.extend(["--peer".to_string(), at]);
        }
        args
    }
}

/// What the partition thread did.
#[derive(Debug, Default)]
pub struct PartitionTally {
    /// Of the faults, those of a link between two members.
    pub peer_cuts: u64,
    pub blackholes: u64,
    pub resets: u64,
    pub delays: u64,
    pub log: Vec<String>,
}

/// Faults one link at a time, each for 0.3..3 s, until `stop`; then heals
/// every link. A faulted link counts as a disturbance of its server for
/// the loss check (a write the member sent past it lives on the backup
/// only), never for the stale check.
/// The longest delay `partitions` puts on a link: what a write already
/// sent may still take to reach its server after its sender gave it up,
/// or died (`model::Ctx::in_flight`).
pub fn longest_delay(timeout: Duration) -> Duration {
    Duration::from_millis((timeout.as_millis() as u64 / 4).max(2))
}

pub fn partitions(
    fleet: &Fleet,
    watch: &Watch,
    timeout: Duration,
    pause_ms: (u64, u64),
    seed: u64,
    stop: &AtomicBool,
) -> PartitionTally {
    let mut rng = Rng::new(seed ^ 0x7061_7274);
    let mut tally = PartitionTally::default();
    let members = fleet.links.len();
    let servers = fleet.links[0].len();
    while !stop.load(Ordering::Relaxed) {
        // Pacing only: the checks never depend on these sleeps.
        let (lo, hi) = pause_ms;
        thread::sleep(Duration::from_millis(lo + rng.below(hi - lo + 1)));
        let (m, s) = (
            rng.below(members as u64) as usize,
            rng.below(servers as u64) as usize,
        );
        // With --peer-cuts, a quarter of the faults are of a link from
        // member m to another member (to member s % members, or the next).
        let peer = (!fleet.peer_links.is_empty() && rng.below(4) == 0)
            .then(|| (m + 1 + s % (members - 1)) % members);
        let fault = match rng.below(10) {
            0..=3 => Fault::Blackhole,
            4..=6 => Fault::Reset,
            // Slower, never past the timeout: a link that delays past it
            // delivers writes memrelay gave up on, which no network is
            // promised not to do and no proxy can undo (docs/chaos.md).
            _ => Fault::Delay(Duration::from_millis(
                1 + rng.below(longest_delay(timeout).as_millis() as u64),
            )),
        };
        match fault {
            Fault::Blackhole => tally.blackholes += 1,
            Fault::Reset => tally.resets += 1,
            _ => tally.delays += 1,
        }
        let began = Instant::now();
        // A link between members is no event on a server: what a member
        // cannot tell the others is for `--peer-confirm` to refuse.
        let (link, to) = match peer {
            Some(j) => match &fleet.peer_links[m][j] {
                Some(l) => (l, format!("memrelay {j}")),
                None => continue,
            },
            None => {
                watch.link_fault(s);
                (&fleet.links[m][s], format!("server {s}"))
            }
        };
        if peer.is_some() {
            tally.peer_cuts += 1;
        }
        link.set(fault);
        let hold = Instant::now() + Duration::from_millis(300 + rng.below(2700));
        while Instant::now() < hold && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(20));
        }
        link.set(Fault::Pass);
        if peer.is_none() {
            watch.link_fault(s);
        }
        tally.log.push(format!(
            "[{:>7}ms] link memrelay {m} -> {to}: {fault:?} for {} ms",
            began.saturating_duration_since(watch.start).as_millis(),
            began.elapsed().as_millis()
        ));
    }
    for l in fleet
        .links
        .iter()
        .flatten()
        .chain(fleet.peer_links.iter().flatten().flatten())
    {
        l.set(Fault::Pass);
    }
    tally
}
