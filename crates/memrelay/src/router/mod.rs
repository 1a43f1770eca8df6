//! Routing: key -> the servers that hold it. Pure computation, no I/O.
//!
//! Each tier (the primaries, the backups) has its own ring built with the
//! same hash kind, so a key's primary is chosen over the `-s` servers and its
//! backup over the `-b` servers, as magent does. Server indexes returned here
//! are global: primaries first, then backups (see `Config::servers`).

pub mod ketama;
mod moves;

pub(crate) use moves::{moves, Moves};

use crate::config::{Config, HashKind, ServerAddr};

/// One tier of servers and how keys are spread over it.
#[derive(Debug, Clone, PartialEq)]
enum Ring {
    Ketama(ketama::Continuum),
    /// twemproxy's modula: each server index repeated `weight` times, the
    /// key's hash modulo their number picks one.
    Modula(Vec<u32>),
    Magent(usize),
}

impl Ring {
    fn new(kind: HashKind, servers: &[ServerAddr]) -> Ring {
        match kind {
            HashKind::Ketama => {
                let names: Vec<String> = servers.iter().map(ServerAddr::ketama_name).collect();
                let weighted: Vec<(&str, u32)> = names
                    .iter()
                    .zip(servers)
                    .map(|(n, s)| (n.as_str(), s.weight))
                    .collect();
                Ring::Ketama(ketama::Continuum::weighted(&weighted))
            }
            HashKind::Modula => Ring::Modula(
                servers
                    .iter()
                    .enumerate()
                    .flat_map(|(i, s)| std::iter::repeat_n(i as u32, s.weight as usize))
                    .collect(),
            ),
            // magent's hash has no weights (refused in the configuration).
            HashKind::Magent => Ring::Magent(servers.len()),
        }
    }

    /// Picks a server from the key's hash (see [`key_hash`]).
    fn pick(&self, hash: u32) -> usize {
        match self {
            Ring::Ketama(c) => c.lookup(hash),
            Ring::Modula(c) => c[hash as usize % c.len()] as usize,
            Ring::Magent(n) => hash as usize % n,
        }
    }
}

/// The hash every tier's ring picks from: computed once per key.
fn key_hash(kind: HashKind, key: &[u8]) -> u32 {
    match kind {
        HashKind::Ketama | HashKind::Modula => ketama::key_hash(key),
        HashKind::Magent => magent_hash(key),
    }
}

/// magent's default key hash (`hashme` in magent.c): djb2 over *signed*
/// chars, as x86 compilers treat `char`, masked to 31 bits.
pub fn magent_hash(key: &[u8]) -> u32 {
    let mut h: u32 = 5381;
    for &b in key {
        h = h.wrapping_mul(33).wrapping_add(b as i8 as i32 as u32);
    }
    h & 0x7fff_ffff
}

/// Most tiers a key can have: the primary and up to three backup tiers.
pub(crate) const MAX_TIERS: usize = 4;

/// Where a key lives, in order of preference: its primary, then its backup
/// in each backup tier. Small and `Copy`: computed once per request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    servers: [u16; MAX_TIERS],
    len: u8,
}

impl Replicas {
    pub fn primary(&self) -> usize {
        self.servers[0] as usize
    }

    /// The server at tier `i` (0 is the primary).
    pub fn get(&self, i: usize) -> Option<usize> {
        (i < self.len as usize).then(|| self.servers[i] as usize)
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.servers[..self.len as usize]
            .iter()
            .map(|&s| s as usize)
    }
}

/// Routes keys to replica sets. Immutable once built.
#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    /// Tier 0 is the primaries; each tier's ring picks within its servers,
    /// and `offset` turns that into a global server index.
    tiers: Vec<(Ring, usize)>,
    kind: HashKind,
}

impl Router {
    pub fn new(cfg: &Config) -> Router {
        let mut tiers = Vec::new();
        let mut offset = 0;
        for tier in cfg.tiers().take(MAX_TIERS) {
            tiers.push((Ring::new(cfg.hash, tier), offset));
            offset += tier.len();
        }
        Router {
            tiers,
            kind: cfg.hash,
        }
    }

    /// The primary's index for a key (hot path: one hash).
    pub fn primary(&self, key: &[u8]) -> usize {
        self.tiers[0].0.pick(key_hash(self.kind, key))
    }

    pub fn replicas(&self, key: &[u8]) -> Replicas {
        self.replicas_of_hash(key_hash(self.kind, key))
    }

    /// The replicas of every key whose hash is `hash`.
    fn replicas_of_hash(&self, hash: u32) -> Replicas {
        let mut r = Replicas {
            servers: [0; MAX_TIERS],
            len: 0,
        };
        for (ring, offset) in &self.tiers {
            r.servers[r.len as usize] = (offset + ring.pick(hash)) as u16;
            r.len += 1;
        }
        r
    }

    /// With `--auto-eject` (no backups): the server that takes `key` while
    /// its primary cannot, among the primaries `usable` accepts. Ketama walks
    /// on along the circle; modula and magent probe the next servers in
    /// order.
    pub(crate) fn ejected_primary(
        &self,
        key: &[u8],
        usable: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let hash = key_hash(self.kind, key);
        match &self.tiers[0].0 {
            Ring::Ketama(c) => c.lookup_where(hash, usable),
            Ring::Modula(c) => {
                let first = hash as usize % c.len();
                (1..c.len())
                    .map(|i| c[(first + i) % c.len()] as usize)
                    .find(|&s| usable(s))
            }
            Ring::Magent(n) => {
                let first = hash as usize % n;
                (1..*n).map(|i| (first + i) % n).find(|&s| usable(s))
            }
        }
    }

    /// The tier of server `index` (0: a primary).
    pub(crate) fn tier_of(&self, index: usize) -> usize {
        self.tiers
            .iter()
            .rposition(|(_, offset)| *offset <= index)
            .unwrap_or(0)
    }

    /// Whether keys have backups at all.
    pub(crate) fn has_backups(&self) -> bool {
        self.tiers.len() > 1
    }
}
