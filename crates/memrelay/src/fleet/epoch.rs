//! A fleet's configuration epoch: where each member stands in a reload
//! that changes where keys go, and when a member may take the next step.
//! Pure: `topology` runs the steps, the links carry the stages.
//!
//! A reload from routing X to routing Y goes through three stages, and a
//! member takes a step only once every peer has reached its stage (and
//! finished the requests it started before reaching it):
//!
//! 1. [`Stage::Aware`]: serve by X; a key changed is recorded as missed on
//!    the replicas Y gives it that X does not (`ha::transition`);
//! 2. [`Stage::Switched`]: serve by Y; a key changed is recorded as missed
//!    on the replicas X gives it that Y does not;
//! 3. [`Stage::Steady`] at Y: serve by Y, record nothing.
//!
//! So at any moment the members are in at most two neighbouring stages,
//! and each pair is safe together: a member reading by one routing skips
//! every copy the other routing's writes went past (docs/ha.md, "Reloading
//! a fleet"). Routings are named by a fingerprint of what decides where
//! keys go (`Config::routing_fingerprint`).

/// Where a member stands, as it tells its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Serving `routing`; no reload under way.
    Steady { routing: u64 },
    /// Serving `from`; moved keys recorded as missed on `to`'s replicas.
    Aware { from: u64, to: u64 },
    /// Serving `to`; moved keys recorded as missed on `from`'s replicas.
    Switched { from: u64, to: u64 },
}

impl Stage {
    /// The routing this member serves by.
    pub(crate) fn serving(self) -> u64 {
        match self {
            Stage::Steady { routing } => routing,
            Stage::Aware { from, .. } => from,
            Stage::Switched { to, .. } => to,
        }
    }

    /// 0 steady, 1 aware, 2 switched (`stats`).
    pub(crate) fn number(self) -> u8 {
        match self {
            Stage::Steady { .. } => 0,
            Stage::Aware { .. } => 1,
            Stage::Switched { .. } => 2,
        }
    }

    /// The stage's line: `epoch steady <fp>`, `epoch aware <from> <to>`,
    /// `epoch switched <from> <to>` (fingerprints in hex).
    pub(crate) fn line(self) -> String {
        match self {
            Stage::Steady { routing } => format!("epoch steady {routing:016x}\n"),
            Stage::Aware { from, to } => format!("epoch aware {from:016x} {to:016x}\n"),
            Stage::Switched { from, to } => format!("epoch switched {from:016x} {to:016x}\n"),
        }
    }

    /// Parses what follows `epoch `.
    pub(crate) fn parse(rest: &str) -> Option<Stage> {
        let mut t = rest.split(' ');
        let fp = |s: Option<&str>| s.and_then(|s| u64::from_str_radix(s, 16).ok());
        let stage = match t.next()? {
            "steady" => Stage::Steady {
                routing: fp(t.next())?,
            },
            "aware" => Stage::Aware {
                from: fp(t.next())?,
                to: fp(t.next())?,
            },
            "switched" => Stage::Switched {
                from: fp(t.next())?,
                to: fp(t.next())?,
            },
            _ => return None,
        };
        t.next().is_none().then_some(stage)
    }
}

/// The next stage a member at `mine` may take, given what every peer last
/// said (`None`: not heard from since this member started), or None to
/// wait. `mine` is what this member has told its peers: the requests it
/// started before are done.
pub(crate) fn next(mine: Stage, peers: &[Option<Stage>]) -> Option<Stage> {
    match mine {
        Stage::Steady { .. } => None,
        Stage::Aware { from, to } => {
            let ready = |p: &Option<Stage>| {
                matches!(p, Some(Stage::Aware { from: f, to: t } | Stage::Switched { from: f, to: t })
                    if (*f, *t) == (from, to))
            };
            peers
                .iter()
                .all(ready)
                .then_some(Stage::Switched { from, to })
        }
        Stage::Switched { from, to } => {
            let ready = |p: &Option<Stage>| match p {
                Some(Stage::Switched { from: f, to: t }) => (*f, *t) == (from, to),
                Some(Stage::Steady { routing }) => *routing == to,
                _ => false,
            };
            peers
                .iter()
                .all(ready)
                .then_some(Stage::Steady { routing: to })
        }
    }
}

/// The stage a member starting with `routing` (its file's) joins a fleet
/// in, from what the peers it reached said: the fleet's reload if one is
/// under way, a reload to its own routing if the fleet serves another,
/// else steady. Returns the stage and the routing it must serve first,
/// which it must then get from a peer if it is not its own.
pub(crate) fn joining(routing: u64, peers: &[Option<Stage>]) -> Stage {
    // A reload under way wins: its stages are what the others wait on.
    for p in peers.iter().flatten() {
        match *p {
            Stage::Aware { from, to } => return Stage::Aware { from, to },
            Stage::Switched { from, to } => return Stage::Switched { from, to },
            Stage::Steady { .. } => {}
        }
    }
    match peers.iter().flatten().find(|p| p.serving() != routing) {
        Some(p) => Stage::Aware {
            from: p.serving(),
            to: routing,
        },
        None => Stage::Steady { routing },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const X: u64 = 0xa;
    const Y: u64 = 0xb;

    #[test]
    fn stages_round_trip_and_garbage_does_not_parse() {
        for s in [
            Stage::Steady { routing: X },
            Stage::Aware { from: X, to: Y },
            Stage::Switched {
                from: u64::MAX,
                to: 0,
            },
        ] {
            let line = s.line();
            let rest = line.trim_end().strip_prefix("epoch ").unwrap();
            assert_eq!(Stage::parse(rest), Some(s));
        }
        for bad in [
            "",
            "steady",
            "aware 1",
            "switched 1 2 3",
            "steady zz",
            "ready 1",
        ] {
            assert_eq!(Stage::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_member_switches_only_once_every_peer_knows_both_routings() {
        let aware = Stage::Aware { from: X, to: Y };
        let switched = Stage::Switched { from: X, to: Y };
        // A peer still on X, or not heard from, or one that started with
        // Y alone (it would serve Y while this one serves X): wait.
        for waiting in [
            Some(Stage::Steady { routing: X }),
            None,
            Some(Stage::Steady { routing: Y }),
            Some(Stage::Aware { from: X, to: 0xc }),
        ] {
            assert_eq!(next(aware, &[Some(aware), waiting]), None);
        }
        assert_eq!(next(aware, &[Some(aware), Some(switched)]), Some(switched));
        assert_eq!(next(aware, &[]), Some(switched));
    }

    #[test]
    fn a_member_settles_only_once_no_peer_serves_the_old_routing() {
        let aware = Stage::Aware { from: X, to: Y };
        let switched = Stage::Switched { from: X, to: Y };
        let steady = Stage::Steady { routing: Y };
        assert_eq!(next(switched, &[Some(switched), Some(aware)]), None);
        assert_eq!(next(switched, &[Some(switched), None]), None);
        assert_eq!(
            next(switched, &[Some(steady), Some(switched)]),
            Some(steady)
        );
        assert_eq!(next(steady, &[Some(aware)]), None);
    }

    #[test]
    fn a_starting_member_joins_the_fleets_reload_or_starts_one() {
        let aware = Stage::Aware { from: X, to: Y };
        let switched = Stage::Switched { from: X, to: Y };
        assert_eq!(
            joining(Y, &[Some(Stage::Steady { routing: X }), Some(aware)]),
            aware
        );
        assert_eq!(joining(Y, &[Some(switched), None]), switched);
        assert_eq!(
            joining(Y, &[Some(Stage::Steady { routing: X }), None]),
            aware
        );
        assert_eq!(
            joining(Y, &[Some(Stage::Steady { routing: Y }), None]),
            Stage::Steady { routing: Y }
        );
        assert_eq!(joining(Y, &[None, None]), Stage::Steady { routing: Y });
    }
}
