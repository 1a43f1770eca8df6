//! What the servers say about themselves: their `stats`, `stats items` and
//! `stats slabs` replies, as last read by each server's prober.
//!
//! memrelay's `stats` (capacity figures such as `curr_items` and
//! `limit_maxbytes`), `stats items`, `stats slabs` and `/metrics` are built
//! from these copies: a client's `stats` or a Prometheus scrape never sends
//! a request to a server, however often it comes. The figures are at most
//! a probe interval old (`backend::probe`), and dropped while a server
//! cannot be reached, so a sum never mixes in a dead server's last word.
//!
//! A reply is kept as the bytes read, and parsed when someone asks: the
//! prober runs every second for every server, and keeping its reply costs
//! one allocation, not one per line (tests/alloc.rs counts them).

use std::sync::{Arc, RwLock};

/// `STAT name value` pairs, in the server's order.
pub(crate) type Stats = Arc<[(String, String)]>;

/// Most `STAT` lines kept from one reply: memcached sends about 100 for
/// `stats` and 30 per slab class (64 classes at most) for `stats items`.
const MAX_LINES: usize = 8192;

/// The figures the general `stats` reply sums over the primaries, and
/// `/metrics` shows per server: what fills, and what is lost.
pub(crate) const CAPACITY: [&str; 10] = [
    "curr_items",
    "total_items",
    "bytes",
    "limit_maxbytes",
    "evictions",
    "get_expired",
    "get_flushed",
    "expired_unfetched",
    "evicted_unfetched",
    "reclaimed",
];

/// A reply as read from the server.
type Raw = Arc<Vec<u8>>;

/// One server's latest replies (empty until first read, and while the
/// server cannot be reached).
#[derive(Debug, Default)]
pub(crate) struct ServerFigures {
    stats: RwLock<Option<Raw>>,
    items: RwLock<Option<Raw>>,
    slabs: RwLock<Option<Raw>>,
}

/// Which reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Group {
    General,
    Items,
    Slabs,
}

impl ServerFigures {
    fn slot(&self, g: Group) -> &RwLock<Option<Raw>> {
        match g {
            Group::General => &self.stats,
            Group::Items => &self.items,
            Group::Slabs => &self.slabs,
        }
    }

    fn raw(&self, g: Group) -> Option<Raw> {
        // A write is one assignment: a poisoned lock holds a whole value.
        self.slot(g)
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last `g` reply read, if the server is reachable.
    pub(crate) fn get(&self, g: Group) -> Option<Stats> {
        self.raw(g).map(|r| parse(&r))
    }

    /// A `g` reply just read from the server.
    pub(crate) fn store(&self, g: Group, reply: Vec<u8>) {
        *self.slot(g).write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(reply));
    }

    /// The server cannot be reached: what it said last no longer counts.
    pub(crate) fn clear(&self) {
        for g in [Group::General, Group::Items, Group::Slabs] {
            *self.slot(g).write().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// One number of the general `stats` reply.
    pub(crate) fn number(&self, name: &str) -> Option<u64> {
        let raw = self.raw(Group::General)?;
        raw.split(|&b| b == b'\n').find_map(|line| {
            let rest = line.strip_prefix(b"STAT ")?.strip_prefix(name.as_bytes())?;
            let value = rest.strip_prefix(b" ")?;
            std::str::from_utf8(value).ok()?.trim_end().parse().ok()
        })
    }
}

/// The `STAT name value` lines of a reply; anything else is skipped.
fn parse(reply: &[u8]) -> Stats {
    String::from_utf8_lossy(reply)
        .lines()
        .filter_map(|l| {
            let (name, value) = l.strip_prefix("STAT ")?.split_once(' ')?;
            Some((name.to_string(), value.trim_end().to_string()))
        })
        .take(MAX_LINES)
        .collect()
}

/// How two servers' values of one `stats items`/`stats slabs` field
/// combine: sizes and ages are not added up.
fn combine(field: &str, a: u64, b: u64) -> u64 {
    let largest = field.starts_with("age")
        || field.ends_with("_time")
        || matches!(field, "chunk_size" | "chunks_per_page");
    if largest {
        a.max(b)
    } else {
        a.saturating_add(b)
    }
}

/// The numeric lines of several servers' replies of one group, combined
/// name by name in first-seen order: `items:1:number` of each summed,
/// `items:1:age` the oldest. Lines whose value is not a number are left
/// out (they have no sum).
pub(crate) fn combined(replies: &[Stats]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for reply in replies {
        for (name, value) in reply.iter() {
            let Ok(v) = value.parse::<u64>() else {
                continue;
            };
            let field = name.rsplit(':').next().unwrap_or(name);
            match at.get(name) {
                Some(&i) => out[i].1 = combine(field, out[i].1, v),
                None => {
                    at.insert(name.clone(), out.len());
                    out.push((name.clone(), v));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_parsed_and_combined_by_field() {
        let a = parse(
            b"STAT items:1:number 2\r\nSTAT items:1:age 10\r\nSTAT 1:chunk_size 96\r\nEND\r\n",
        );
        let b = parse(b"STAT items:1:number 3\r\nSTAT items:1:age 4\r\nSTAT 1:chunk_size 96\r\nSTAT items:2:number 1\r\nEND\r\n");
        assert_eq!(
            combined(&[a, b]),
            vec![
                ("items:1:number".to_string(), 5),
                ("items:1:age".to_string(), 10),
                ("1:chunk_size".to_string(), 96),
                ("items:2:number".to_string(), 1),
            ]
        );
    }

    #[test]
    fn a_server_out_of_reach_has_no_figures() {
        let f = ServerFigures::default();
        f.store(
            Group::General,
            b"STAT curr_items_x 9\r\nSTAT curr_items 7\r\nSTAT version 1.6.18\r\nEND\r\n".to_vec(),
        );
        assert_eq!(f.number("curr_items"), Some(7));
        assert_eq!(f.number("version"), None);
        f.clear();
        assert_eq!(f.number("curr_items"), None);
    }
}
