//! Routing: key -> the servers that hold it. Pure computation, no I/O.
//!
//! Each tier (the primaries, the backups) has its own ring built with the
//! same hash kind, so a key's primary is chosen over the `-s` servers and its
//! backup over the `-b` servers, as magent does. Server indexes returned here
//! are global: primaries first, then backups (see `Config::servers`).

pub mod ketama;

use crate::config::{Config, HashKind, ServerAddr};

/// One tier of servers and how keys are spread over it.
#[derive(Debug, Clone)]
enum Ring {
    Ketama(ketama::Continuum),
    Modula(usize),
    Magent(usize),
}

impl Ring {
    fn new(kind: HashKind, servers: &[ServerAddr]) -> Ring {
        match kind {
            HashKind::Ketama => {
                let names: Vec<String> = servers.iter().map(ServerAddr::ketama_name).collect();
                Ring::Ketama(ketama::Continuum::new(&names))
            }
            HashKind::Modula => Ring::Modula(servers.len()),
            HashKind::Magent => Ring::Magent(servers.len()),
        }
    }

    fn pick(&self, key: &[u8]) -> usize {
        match self {
            Ring::Ketama(c) => c.lookup(ketama::key_hash(key)),
            Ring::Modula(n) => ketama::key_hash(key) as usize % n,
            Ring::Magent(n) => magent_hash(key) as usize % n,
        }
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

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    pub primary: usize,
    pub backup: Option<usize>,
}

/// Routes keys to replica sets. Immutable once built.
#[derive(Debug, Clone)]
pub struct Router {
    primaries: Ring,
    backups: Option<Ring>,
    nprimaries: usize,
}

impl Router {
    pub fn new(cfg: &Config) -> Router {
        Router {
            primaries: Ring::new(cfg.hash, &cfg.primaries),
            backups: (!cfg.backups.is_empty()).then(|| Ring::new(cfg.hash, &cfg.backups)),
            nprimaries: cfg.primaries.len(),
        }
    }

    /// The primary's index for a key (hot path: one hash).
    pub fn primary(&self, key: &[u8]) -> usize {
        self.primaries.pick(key)
    }

    pub fn replicas(&self, key: &[u8]) -> Replicas {
        Replicas {
            primary: self.primaries.pick(key),
            backup: self.backups.as_ref().map(|r| self.nprimaries + r.pick(key)),
        }
    }

    pub fn nprimaries(&self) -> usize {
        self.nprimaries
    }
}
