//! What a change of configuration does to keys: which servers it gives keys
//! to, which it takes keys from, and how many keys change primary. Computed
//! over the whole hash space, exactly, without looking at a single key: a
//! reload uses it to find the servers that may hold stale copies of keys
//! coming back to them (docs/ha.md, "Reloading the configuration").
//!
//! A server *holds* a key when it is one of the key's replicas, primary or
//! backup: either way its copy is kept equal to the primary's (or recorded
//! as missed). Keys are compared by hash, so the hash space is cut where any
//! of the rings changes hands, and each piece is looked at once:
//! - ketama: a key goes to the first point at or after its hash, so between
//!   two consecutive points of the union of every ring's points, old and
//!   new, each ring gives every hash the same server: one look per point;
//! - modula, magent: `hash % n` per tier, so the residues modulo the least
//!   common multiple of every tier's size cover every case.

use std::collections::BTreeSet;

use super::{Ring, Router};

/// Beyond this many residues (servers counts with a huge least common
/// multiple) the change is not computed: every server is taken to gain and
/// lose keys, which is always safe.
const MAX_RESIDUES: u64 = 1 << 20;

/// A change of configuration, per server name.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Moves {
    /// Servers that hold keys under the new configuration that they did not
    /// hold under the old one (every new server that holds any).
    pub gains: BTreeSet<String>,
    /// Servers that held keys under the old configuration that they no
    /// longer hold (every removed server).
    pub loses: BTreeSet<String>,
    /// The share of keys whose primary changed, from 0 to 1.
    pub primaries_moved: f64,
}

/// Compares two configurations' routing. `*_names` name the servers by
/// their global index (primaries then backups, as `Config::servers`).
pub(crate) fn moves(
    old: &Router,
    old_names: &[String],
    new: &Router,
    new_names: &[String],
) -> Moves {
    if old == new && old_names == new_names {
        // The same servers, weights and hash: every key stays where it is
        // (and a reload that changes nothing else must not be taken for one
        // that moves everything, below).
        return Moves::default();
    }
    let mut m = Moves::default();
    let Some(pieces) = pieces(old, new) else {
        // Another hash, or too many residues: assume the worst.
        m.gains = new_names.iter().cloned().collect();
        m.loses = old_names.iter().cloned().collect();
        m.primaries_moved = 1.0;
        return m;
    };
    // Servers by new index; an old one's new index, if it stays. Pieces
    // can be a million: compared by index, flagged, named once at the end.
    let to_new: Vec<Option<usize>> = old_names
        .iter()
        .map(|n| new_names.iter().position(|x| x == n))
        .collect();
    let mut gains = vec![false; new_names.len()];
    let mut loses = vec![false; old_names.len()];
    for (hash, share) in pieces {
        let before = old.replicas_of_hash(hash);
        let after = new.replicas_of_hash(hash);
        let renamed = |b: usize| to_new.get(b).copied().flatten();
        for a in after.iter() {
            if !before.iter().any(|b| renamed(b) == Some(a)) {
                gains[a] = true;
            }
        }
        for b in before.iter() {
            if !renamed(b).is_some_and(|n| after.iter().any(|a| a == n)) {
                loses[b] = true;
            }
        }
        let old_primary = before.iter().next().map(renamed);
        let new_primary = after.iter().next().map(Some);
        if old_primary != new_primary {
            m.primaries_moved += share;
        }
    }
    let named = |flags: Vec<bool>, all: &[String]| -> BTreeSet<String> {
        flags
            .iter()
            .zip(all)
            .filter(|(f, _)| **f)
            .map(|(_, n)| n.clone())
            .collect()
    };
    m.gains = named(gains, new_names);
    m.loses = named(loses, old_names);
    m
}

/// One hash for each piece of the hash space within which neither router
/// changes its mind, with the share of the space the piece covers. `None`
/// when the routers hash differently or the pieces would be too many.
fn pieces(old: &Router, new: &Router) -> Option<Vec<(u32, f64)>> {
    if old.kind != new.kind {
        return None;
    }
    let rings = || old.tiers.iter().chain(new.tiers.iter()).map(|(r, _)| r);
    let mut points = Vec::new();
    let mut residues = 1u64;
    for ring in rings() {
        match ring {
            Ring::Ketama(c) => points.extend(c.points()),
            Ring::Modula(c) => {
                residues = lcm(residues, c.len() as u64);
                if residues > MAX_RESIDUES {
                    return None;
                }
            }
            Ring::Magent(n) => {
                residues = lcm(residues, *n as u64);
                if residues > MAX_RESIDUES {
                    return None;
                }
            }
        }
    }
    if !points.is_empty() {
        // Each point stands for the arc that ends at it; the first one
        // also for the arc that wraps around past the last point.
        points.sort_unstable();
        points.dedup();
        const SPACE: f64 = 4_294_967_296.0;
        let last = u64::from(*points.last()?);
        let mut prev = None;
        let arcs = points
            .iter()
            .map(|&p| {
                let len = match prev {
                    Some(q) => u64::from(p) - q,
                    None => u64::from(p) + (1 << 32) - last,
                };
                prev = Some(u64::from(p));
                (p, len as f64 / SPACE)
            })
            .collect();
        return Some(arcs);
    }
    let share = 1.0 / residues as f64;
    Some((0..residues).map(|r| (r as u32, share)).collect())
}

fn lcm(a: u64, b: u64) -> u64 {
    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    if a == 0 || b == 0 {
        return a.max(b);
    }
    a / gcd(a, b) * b
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{Config, HashKind, ServerAddr};

    /// A router and its servers' names.
    type Routing = (Router, Vec<String>);

    fn config(hash: HashKind, primaries: &[u16], backups: &[u16]) -> Routing {
        let addr = |p: &u16| ServerAddr::parse(&format!("127.0.0.1:{p}")).unwrap();
        let cfg = Config {
            hash,
            primaries: primaries.iter().map(addr).collect(),
            backups: backups.iter().map(addr).collect(),
            ..Config::default()
        };
        let names = cfg.servers().map(|s| s.name.clone()).collect();
        (Router::new(&cfg), names)
    }

    fn set(names: &[u16]) -> BTreeSet<String> {
        names.iter().map(|p| format!("127.0.0.1:{p}")).collect()
    }

    fn between(
        hash: HashKind,
        before: (&[u16], &[u16]),
        after: (&[u16], &[u16]),
    ) -> (Moves, Routing, Routing) {
        let old = config(hash, before.0, before.1);
        let new = config(hash, after.0, after.1);
        (moves(&old.0, &old.1, &new.0, &new.1), old, new)
    }

    /// What the moves say agrees with where sample keys actually go.
    fn check_keys(m: &Moves, old: &Routing, new: &Routing) {
        let mut moved = 0;
        for i in 0..20_000 {
            let key = format!("key:{i}");
            let before: Vec<&String> = old
                .0
                .replicas(key.as_bytes())
                .iter()
                .map(|s| &old.1[s])
                .collect();
            let after: Vec<&String> = new
                .0
                .replicas(key.as_bytes())
                .iter()
                .map(|s| &new.1[s])
                .collect();
            for n in after.iter().filter(|n| !before.contains(n)) {
                assert!(m.gains.contains(*n), "{key} moved to {n}, not in {m:?}");
            }
            for n in before.iter().filter(|n| !after.contains(n)) {
                assert!(m.loses.contains(*n), "{key} left {n}, not in {m:?}");
            }
            moved += usize::from(before[0] != after[0]);
        }
        // The share is over the hash space; sample keys' hashes are only
        // roughly uniform (magent's djb2 least of all on similar keys).
        let sampled = moved as f64 / 20_000.0;
        assert!(
            (sampled - m.primaries_moved).abs() < 0.05,
            "{sampled} of sample keys changed primary, computed {}",
            m.primaries_moved
        );
    }

    #[test]
    fn nothing_changes_nothing_moves() {
        for hash in [HashKind::Ketama, HashKind::Modula, HashKind::Magent] {
            let (m, _, _) = between(hash, (&[1, 2], &[3]), (&[1, 2], &[3]));
            assert_eq!(m, Moves::default(), "{hash}");
        }
    }

    #[test]
    fn an_unchanged_configuration_moves_nothing_even_past_the_residue_bound() {
        // Modula tiers of 1,031 and 1,033 weight units: their least common
        // multiple is past MAX_RESIDUES, where a real change is assumed to
        // move everything. An unchanged one must not be (a reload that only
        // renews certificates would flush every server).
        let addr = |s: &str| ServerAddr::parse(s).unwrap();
        let cfg = Config {
            hash: HashKind::Modula,
            primaries: vec![addr("127.0.0.1:1:1000"), addr("127.0.0.1:2:31")],
            backups: vec![addr("127.0.0.1:3:1033")],
            ..Config::default()
        };
        let names: Vec<String> = cfg.servers().map(|s| s.name.clone()).collect();
        let (a, b) = (Router::new(&cfg), Router::new(&cfg));
        assert!(pieces(&a, &b).is_none());
        assert_eq!(moves(&a, &names, &b, &names), Moves::default());
    }

    #[test]
    fn ketama_adding_a_primary_takes_keys_from_the_others_only() {
        let (m, old, new) = between(HashKind::Ketama, (&[1, 2], &[9]), (&[1, 2, 3], &[9]));
        assert_eq!(m.gains, set(&[3]));
        assert_eq!(m.loses, set(&[1, 2]));
        assert!((0.2..0.5).contains(&m.primaries_moved), "{m:?}");
        check_keys(&m, &old, &new);
    }

    #[test]
    fn ketama_removing_a_primary_gives_its_keys_to_the_others() {
        let (m, old, new) = between(HashKind::Ketama, (&[1, 2, 3], &[9]), (&[1, 2], &[9]));
        assert_eq!(m.gains, set(&[1, 2]));
        assert_eq!(m.loses, set(&[3]));
        check_keys(&m, &old, &new);
    }

    #[test]
    fn a_backup_tier_change_leaves_the_primaries_alone() {
        let (m, old, new) = between(HashKind::Ketama, (&[1, 2], &[8]), (&[1, 2], &[8, 9]));
        assert_eq!(m.gains, set(&[9]));
        assert_eq!(m.loses, set(&[8]));
        assert_eq!(m.primaries_moved, 0.0);
        check_keys(&m, &old, &new);
    }

    #[test]
    fn a_backup_promoted_to_sole_primary_holds_the_same_keys() {
        // With one server per tier, every key is on both: promoting the
        // backup gives it nothing it did not hold.
        let (m, _, _) = between(HashKind::Ketama, (&[1], &[2]), (&[2], &[]));
        assert!(m.gains.is_empty(), "{m:?}");
        assert_eq!(m.loses, set(&[1]));
    }

    #[test]
    fn modula_and_magent_reordering_swaps_keys() {
        for hash in [HashKind::Modula, HashKind::Magent] {
            let (m, old, new) = between(hash, (&[1, 2, 3], &[]), (&[2, 1, 3], &[]));
            assert_eq!(m.gains, set(&[1, 2]), "{hash}");
            assert_eq!(m.loses, set(&[1, 2]), "{hash}");
            check_keys(&m, &old, &new);
            let (m, old, new) = between(hash, (&[1, 2, 3], &[7, 8]), (&[1, 2], &[7, 8]));
            check_keys(&m, &old, &new);
        }
    }

    #[test]
    fn another_hash_moves_everything() {
        let (m, _, _) = between(HashKind::Ketama, (&[1, 2], &[]), (&[1, 2], &[]));
        assert_eq!(m.primaries_moved, 0.0);
        let old = config(HashKind::Ketama, &[1, 2], &[]);
        let new = config(HashKind::Modula, &[1, 2], &[]);
        let m = moves(&old.0, &old.1, &new.0, &new.1);
        assert_eq!(m.gains, set(&[1, 2]));
        assert_eq!(m.loses, set(&[1, 2]));
        assert_eq!(m.primaries_moved, 1.0);
    }
}
