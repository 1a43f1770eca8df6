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
//!
//! A member that starts takes its stage from its peers' ([`joining`]); one
//! that its peers wait for while it is steady at the routing they move to
//! (it reached none of them at start) joins them later ([`catching_up`]),
//! so that it never holds a reload by being where the reload goes.

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

    /// Whether a member at this stage serves or records by `routing`.
    pub(crate) fn routes_by(self, routing: u64) -> bool {
        match self {
            Stage::Steady { routing: r } => r == routing,
            Stage::Aware { from, to } | Stage::Switched { from, to } => {
                from == routing || to == routing
            }
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
    // Its furthest stage: a peer switched only once every member was
    // aware, this one's former process too (a restart, a hand-off), and
    // that process may have switched since. Joining as aware would take
    // this member a stage back, and a peer that heard the former process
    // switched may already have finished the reload and stopped writing
    // for the old routing while this member reads by it again.
    let reload = |switched: bool| {
        peers.iter().flatten().find(|p| {
            matches!(p, Stage::Switched { .. }) == switched && !matches!(p, Stage::Steady { .. })
        })
    };
    if let Some(p) = reload(true).or_else(|| reload(false)) {
        return *p;
    }
    match peers.iter().flatten().find(|p| p.serving() != routing) {
        Some(p) => Stage::Aware {
            from: p.serving(),
            to: routing,
        },
        None => Stage::Steady { routing },
    }
}

/// The stage a member steady at `routing` takes, after start, from what
/// its peers said, or None to stay as it is.
///
/// A peer aware of a reload from X to `routing` waits for this member to
/// be aware of it too (`next`), which a member steady at the new routing
/// never becomes by itself (it started with the new file while it reached
/// no peer, say): it joins, as switched. It goes on serving `routing` and
/// now records what it changes on the replicas only X gives a key, as a
/// switched member does: neighbouring every member aware of the reload,
/// and no further than it was from one still steady at X (closer: it
/// records for it). Joining as aware would make it serve X, a routing
/// it knows only from a peer's lines.
///
/// `finished`: a reload this member finished a moment ago (from, to). A
/// peer heard aware of it said so before it switched, and the two reports
/// crossed (each peer's stage comes on two connections): a member
/// finishes a reload only once no peer is aware of it any more.
///
/// Nothing else moves it: a peer switched to `routing` does not wait for
/// it, and a member does not follow a routing that is not its own once it
/// serves (its peers hold their reload for it, or it serves apart from
/// them, and says so).
pub(crate) fn catching_up(
    routing: u64,
    peers: &[Option<Stage>],
    finished: Option<(u64, u64)>,
) -> Option<Stage> {
    peers.iter().flatten().find_map(|p| match *p {
        Stage::Aware { from, to }
            if to == routing && from != routing && finished != Some((from, to)) =>
        {
            Some(Stage::Switched { from, to })
        }
        _ => None,
    })
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
        // Mid-way, the furthest stage: a peer may have heard this
        // member's former process switched (seed 20261270, 462.4 s).
        assert_eq!(joining(Y, &[Some(aware), Some(switched)]), switched);
        assert_eq!(joining(Y, &[Some(switched), Some(aware)]), switched);
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

    #[test]
    fn a_stage_routes_by_the_routings_it_serves_and_records_by() {
        let steady = Stage::Steady { routing: X };
        let aware = Stage::Aware { from: X, to: Y };
        let switched = Stage::Switched { from: Y, to: X };
        assert!(steady.routes_by(X) && !steady.routes_by(Y));
        for s in [aware, switched] {
            assert!(
                s.routes_by(X) && s.routes_by(Y) && !s.routes_by(0xc),
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_steady_member_that_peers_wait_for_joins_their_reload_to_its_routing() {
        let aware = Some(Stage::Aware { from: X, to: Y });
        let joins = Some(Stage::Switched { from: X, to: Y });
        // Whatever the others are at: it goes on serving Y, now recording.
        for other in [
            aware,
            Some(Stage::Switched { from: X, to: Y }),
            Some(Stage::Steady { routing: Y }),
            Some(Stage::Steady { routing: X }),
            None,
        ] {
            assert_eq!(catching_up(Y, &[aware, other], None), joins, "{other:?}");
            assert_eq!(catching_up(Y, &[other, aware], None), joins, "{other:?}");
        }
        // Another reload it finished long ago does not count.
        assert_eq!(catching_up(Y, &[aware, aware], Some((0xc, Y))), joins);
    }

    #[test]
    fn nothing_else_moves_a_steady_member() {
        let steady_x = Some(Stage::Steady { routing: X });
        for peers in [
            // Switched peers wait for no member steady at Y.
            vec![
                Some(Stage::Switched { from: X, to: Y }),
                Some(Stage::Steady { routing: Y }),
            ],
            // Peers on another file: it serves apart, it does not follow.
            vec![steady_x, steady_x],
            // Reloads to other routings than Y.
            vec![Some(Stage::Aware { from: X, to: 0xc }), steady_x],
            vec![Some(Stage::Aware { from: Y, to: X }), None],
            vec![None, None],
        ] {
            assert_eq!(catching_up(Y, &peers, None), None, "{peers:?}");
        }
    }

    #[test]
    fn a_member_that_finished_a_reload_is_not_moved_by_a_peer_still_said_aware_of_it() {
        // It heard every peer switched, then an older report crossed it.
        let aware = Some(Stage::Aware { from: X, to: Y });
        let steady_y = Some(Stage::Steady { routing: Y });
        assert_eq!(catching_up(Y, &[aware, steady_y], Some((X, Y))), None);
        assert_eq!(catching_up(Y, &[aware, None], Some((X, Y))), None);
    }

    /// Steps a fleet in rounds, each member from what the others were at
    /// the round's start: a member in a reload by `next`, a steady one by
    /// `catching_up`. Returns the stages once nobody moves (at most 10
    /// rounds), and whether every round after the first had only stages
    /// neighbouring in the reload from routing `old` (`neighbours`).
    fn settle(old: u64, routings: &[u64], mut fleet: Vec<Stage>) -> (Vec<Stage>, bool) {
        let mut neighbouring = true;
        for round in 0..10 {
            let before = fleet.clone();
            for (i, me) in fleet.iter_mut().enumerate() {
                let others: Vec<Option<Stage>> = before
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, s)| Some(*s))
                    .collect();
                let step = match *me {
                    Stage::Steady { .. } => catching_up(routings[i], &others, None),
                    _ => next(*me, &others),
                };
                *me = step.unwrap_or(*me);
            }
            if round > 0 {
                neighbouring &= fleet
                    .iter()
                    .all(|a| fleet.iter().all(|b| neighbours(old, *a, *b)));
            }
            if fleet == before {
                break;
            }
        }
        (fleet, neighbouring)
    }

    /// Whether two members may be at these stages of a reload from `old`
    /// at once (docs/ha.md, "Why it holds").
    fn neighbours(old: u64, a: Stage, b: Stage) -> bool {
        let rank = |s: Stage| -> u8 {
            match s {
                Stage::Steady { routing } if routing == old => 0,
                Stage::Aware { .. } => 1,
                Stage::Switched { .. } => 2,
                Stage::Steady { .. } => 3,
            }
        };
        rank(a).abs_diff(rank(b)) <= 1
    }

    #[test]
    fn a_fleet_waiting_for_a_member_steady_at_the_new_routing_finishes_the_reload() {
        let aware = Stage::Aware { from: X, to: Y };
        let steady_x = Stage::Steady { routing: X };
        let steady_y = Stage::Steady { routing: Y };
        for fleet in [
            vec![aware, aware, steady_y],
            vec![aware, steady_y, steady_y],
            vec![aware, Stage::Switched { from: X, to: Y }, steady_y],
        ] {
            let (end, neighbouring) = settle(X, &[Y, Y, Y], fleet.clone());
            assert_eq!(end, vec![steady_y; 3], "{fleet:?}");
            assert!(neighbouring, "{fleet:?}");
        }
        // A member not reloaded yet holds the others at aware; the late
        // one, two stages from it already, joins and now records for it.
        // Reloaded, the fleet finishes.
        let switched = Stage::Switched { from: X, to: Y };
        let (held, _) = settle(X, &[Y, X, Y], vec![aware, steady_x, steady_y]);
        assert_eq!(held, vec![aware, steady_x, switched]);
        let (end, neighbouring) = settle(X, &[Y, Y, Y], vec![aware, aware, switched]);
        assert_eq!(end, vec![steady_y; 3]);
        assert!(neighbouring);
    }

    #[test]
    fn members_steady_at_a_reloads_new_routing_join_it_whoever_began_it() {
        // A member serving Y apart from the others (steady at X) is
        // reloaded to X: they join its reload, and it comes back.
        let back = Stage::Aware { from: Y, to: X };
        let steady_x = Stage::Steady { routing: X };
        let (end, neighbouring) = settle(Y, &[X, X, X], vec![steady_x, steady_x, back]);
        assert_eq!(end, vec![steady_x; 3]);
        assert!(neighbouring);
    }
}
