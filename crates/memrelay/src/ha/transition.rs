//! A fleet reload under way: the routing the other members may still use
//! (or already use) beside the one this member serves with.
//!
//! While the members of a fleet switch from one server list to another,
//! some route a moved key to its old replicas and some to its new ones.
//! Each member that knows both routings records every key it changes as
//! missed on the replicas the *other* routing gives the key and its own
//! does not: a member reading through the other routing then skips those
//! copies (they may be older) and reads the replicas both routings share,
//! or misses. The records travel as hints, like any missed key, and are
//! cleared as usual, by deleting the key on the server.
//! `topology` moves the fleet through the stages (docs/ha.md, "Reloading
//! a fleet"); a member that is not reloading has no `Transition` and pays
//! one branch per request.

use std::sync::Arc;

use memrelay_protocol::{Command, Request};

use super::replica::Replica;
use super::{Cluster, Pool};
use crate::router::Router;

/// The other routing of a fleet reload, with its servers' state.
#[derive(Debug)]
pub(crate) struct Transition {
    pub other: Router,
    /// Its servers, in its own index order (primaries, then backups).
    pub other_health: Vec<Arc<Replica>>,
}

impl Transition {
    /// Records `key` as missed on every server the other routing gives it
    /// that `w`'s routing does not.
    pub(crate) fn note(&self, w: &Cluster<impl Pool>, key: &[u8]) {
        let mine = w.router.replicas(key);
        for s in self.other.replicas(key).iter() {
            let Some(h) = self.other_health.get(s) else {
                continue;
            };
            if !mine.iter().any(|m| Arc::ptr_eq(w.servers[m].health(), h)) {
                h.missed.record(key);
            }
        }
    }
}

/// Whether a request may change what a replica holds for its keys:
/// every write, a TTL-changing read, and an `mg` that creates its item.
pub(crate) fn changes_items(req: &Request) -> bool {
    req.command.is_write()
        || super::read::changes_ttl(req)
        || (req.command == Command::MetaGet && req.meta.vivify)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::cli::{parse_args, Action};
    use crate::ha::fake::cluster;

    /// P0 and P1 primaries, K backup, magent's hash: a key whose hash is
    /// odd is P1's under both primaries and P0's under P0 alone.
    const P0: &str = "127.0.0.1:21001";
    const P1: &str = "127.0.0.1:21002";
    const K: &str = "127.0.0.1:21003";

    /// A key on P1 under [P0, P1] (`odd`), or on P0 under both.
    fn key(odd: u32) -> String {
        (0..)
            .map(|i| format!("k{i}"))
            .find(|k| crate::router::magent_hash(k.as_bytes()) % 2 == odd)
            .unwrap_or_default()
    }

    fn router(args: &[&str]) -> Router {
        let Ok(Action::Run(cfg)) = parse_args(args.iter().copied()) else {
            panic!("not a configuration: {args:?}");
        };
        Router::new(&cfg)
    }

    #[test]
    fn a_changed_key_is_recorded_missed_where_the_other_routing_puts_it_and_only_there() {
        // Serving by [P0, P1] (the new list); the other routing is [P0].
        let (mut w, _) = cluster(&["-s", P0, "-s", P1, "-b", K, "--hash", "magent"]);
        let health = |i: usize| w.servers[i].health().clone();
        let (p0, p1, k) = (health(0), health(1), health(2));
        w.transition = Some(Arc::new(Transition {
            other: router(&["-s", P0, "-b", K, "--hash", "magent"]),
            other_health: vec![p0.clone(), k.clone()],
        }));
        let t = w.transition.clone().unwrap_or_else(|| unreachable!());
        let key = key(1);
        t.note(&w, key.as_bytes());
        // The old routing would read P0 for it: P0 must not serve it.
        assert!(p0.missed.contains(key.as_bytes()));
        assert!(!p1.missed.contains(key.as_bytes()));
        assert!(!k.missed.contains(key.as_bytes()), "the backup is shared");
        // A key that stays on P0 under both is left alone.
        let stays = &self::key(0);
        t.note(&w, stays.as_bytes());
        assert!(!p0.missed.contains(stays.as_bytes()));
    }

    #[test]
    fn requests_that_change_items_are_the_writes_and_the_ttl_changes() {
        let changes = |line: &str| changes_items(&crate::ha::fake::request(line).1);
        assert!(changes("set k 0 0 1\r\nv\r\n"));
        assert!(changes("delete k\r\n"));
        assert!(changes("gat 10 k\r\n"));
        assert!(changes("mg k T10 v\r\n"));
        assert!(changes("mg k N30 v\r\n"));
        assert!(!changes("get k\r\n"));
        assert!(!changes("mg k v\r\n"));
    }
}
