//! A configuration's routing (its tiers of servers and its hash) as the
//! members of a fleet compare and exchange it (`fleet::epoch`): a
//! fingerprint, and lines a member that starts during a fleet reload
//! rebuilds the other routing from.
//!
//! ```text
//! route <fingerprint> <hash>
//! server <fingerprint> <tier> <host:port> <address> <weight> <name or ->
//! ```

use std::net::SocketAddr;

use super::{split_host_port, Config, HashKind, ServerAddr};

impl Config {
    /// What decides where keys go, as one number: the hash, and each
    /// tier's servers in order, by the name the fleet knows them by (their
    /// twemproxy name, else `host:port`) and weight. Members of a fleet
    /// compare it to tell whether they route alike; a server's address is
    /// left out, as members may reach it by different ones. FNV-1a:
    /// stable across builds and machines.
    pub(crate) fn routing_fingerprint(&self) -> u64 {
        let mut text = format!("{}\n", self.hash);
        for tier in self.tiers() {
            text.push_str("tier\n");
            for s in tier {
                let name = s.label.as_deref().unwrap_or(&s.name);
                text.push_str(&format!("{name} {}\n", s.weight));
            }
        }
        text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// This configuration with `other`'s routing: its servers and hash
    /// (a fleet reload's first stage serves by the old routing with the
    /// new settings).
    pub(crate) fn with_routing_of(mut self, other: &Config) -> Config {
        self.primaries = other.primaries.clone();
        self.backups = other.backups.clone();
        self.more_tiers = other.more_tiers.clone();
        self.hash = other.hash;
        self
    }

    /// The routing's lines (see the module comment).
    pub(crate) fn routing_lines(&self) -> String {
        let fp = self.routing_fingerprint();
        let mut out = format!("route {fp:016x} {}\n", self.hash);
        for (tier, servers) in self.tiers().enumerate() {
            for s in servers {
                out.push_str(&format!(
                    "server {fp:016x} {tier} {} {} {} {}\n",
                    s.name,
                    s.addr,
                    s.weight,
                    s.label.as_deref().unwrap_or("-")
                ));
            }
        }
        out
    }

    /// This configuration with the routing `lines` describe (those of
    /// routing `fp`, among others'). A server this configuration also has
    /// (by the fleet's name for it) is reached at this configuration's
    /// address. None if the lines do not make routing `fp`.
    pub(crate) fn with_routing_lines(&self, fp: u64, lines: &str) -> Option<Config> {
        let mut hash = None;
        let mut tiers: Vec<Vec<ServerAddr>> = Vec::new();
        let ours = format!("{fp:016x}");
        for line in lines.lines() {
            let mut t = line.split(' ');
            match (t.next(), t.next()) {
                (Some("route"), Some(f)) if f == ours => hash = HashKind::parse(t.next()?),
                (Some("server"), Some(f)) if f == ours => {
                    let tier: usize = t.next()?.parse().ok()?;
                    let s = self.server_from(&mut t)?;
                    if tier > tiers.len() || tier > 3 {
                        return None;
                    }
                    if tier == tiers.len() {
                        tiers.push(Vec::new());
                    }
                    tiers[tier].push(s);
                }
                _ => {}
            }
        }
        let mut tiers = tiers.into_iter();
        let mut cfg = self.clone();
        cfg.hash = hash?;
        cfg.primaries = tiers.next().filter(|t| !t.is_empty())?;
        cfg.backups = tiers.next().unwrap_or_default();
        cfg.more_tiers = tiers.collect();
        (cfg.routing_fingerprint() == fp).then_some(cfg)
    }

    /// A server of a `server` line (from its `host:port` on), this
    /// configuration's own if it has one of that name.
    fn server_from<'a>(&self, t: &mut impl Iterator<Item = &'a str>) -> Option<ServerAddr> {
        let (name, addr, weight, label) = (t.next()?, t.next()?, t.next()?, t.next()?);
        let addr: SocketAddr = addr.parse().ok()?;
        let weight: u32 = weight.parse().ok().filter(|w| (1..=10_000).contains(w))?;
        let label = (label != "-").then(|| label.to_string());
        let fleet_name = label.as_deref().unwrap_or(name);
        if let Some(mine) = self
            .servers()
            .find(|s| s.label.as_deref().unwrap_or(&s.name) == fleet_name)
        {
            return Some(ServerAddr {
                weight,
                ..mine.clone()
            });
        }
        let (host, port) = split_host_port(name)?;
        Some(ServerAddr {
            name: name.to_string(),
            host: host.to_string(),
            port: port.parse().ok()?,
            addr,
            weight,
            label,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::config::cli::{parse_args, Action};
    use crate::config::Config;

    fn cfg(args: &[&str]) -> Config {
        let Ok(Action::Run(cfg)) = parse_args(args.iter().copied()) else {
            panic!("not a configuration: {args:?}");
        };
        *cfg
    }

    #[test]
    fn the_fingerprint_follows_where_keys_go_and_not_addresses() {
        let a = cfg(&["-s", "127.0.0.1:1:1 p0", "-b", "127.0.0.1:3"]);
        let moved = cfg(&["-s", "127.0.0.2:9:1 p0", "-b", "127.0.0.1:3"]);
        assert_eq!(a.routing_fingerprint(), moved.routing_fingerprint());
        for other in [
            cfg(&["-s", "127.0.0.1:1:2 p0", "-b", "127.0.0.1:3"]),
            cfg(&["-s", "127.0.0.1:1:1 p1", "-b", "127.0.0.1:3"]),
            cfg(&["-s", "127.0.0.1:1:1 p0", "-b", "127.0.0.1:4"]),
            cfg(&[
                "-s",
                "127.0.0.1:1:1 p0",
                "-s",
                "127.0.0.1:2",
                "-b",
                "127.0.0.1:3",
            ]),
            cfg(&[
                "-s",
                "127.0.0.1:1:1 p0",
                "-b",
                "127.0.0.1:3",
                "--hash",
                "modula",
            ]),
        ] {
            assert_ne!(a.routing_fingerprint(), other.routing_fingerprint());
        }
    }

    #[test]
    fn a_routing_is_rebuilt_from_its_lines_with_this_members_addresses() {
        let old = cfg(&[
            "-s",
            "127.0.0.1:1",
            "-s",
            "127.0.0.1:2:3 p2",
            "-b",
            "127.0.0.1:3",
            "--hash",
            "modula",
        ]);
        // This member reaches p2 elsewhere, and has no 127.0.0.1:1.
        let mine = cfg(&["-s", "127.0.0.9:7:1 p2", "-b", "127.0.0.1:3"]);
        let fp = old.routing_fingerprint();
        let lines = format!("route 00000000000000ff ketama\n{}", old.routing_lines());
        let rebuilt = mine.with_routing_lines(fp, &lines).unwrap();
        assert_eq!(rebuilt.routing_fingerprint(), fp);
        assert_eq!(rebuilt.primaries.len(), 2);
        assert_eq!(rebuilt.primaries[0].addr.to_string(), "127.0.0.1:1");
        assert_eq!(rebuilt.primaries[1].addr.to_string(), "127.0.0.9:7");
        assert_eq!(rebuilt.primaries[1].weight, 3);
        assert_eq!(rebuilt.backups.len(), 1);
        assert_eq!(rebuilt.hash, old.hash);
        // Another routing's fingerprint, or garbage, rebuilds nothing.
        assert!(mine.with_routing_lines(fp ^ 1, &lines).is_none());
        assert!(mine
            .with_routing_lines(fp, &lines.replace("server", "server x"))
            .is_none());
    }
}
