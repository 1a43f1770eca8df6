//! `--peer`, `--peer-listen`, `--peer-secret-file`, `--peer-timeout`,
//! `--peer-confirm`: the
//! other memrelays of a fleet (several proxies behind one VIP), which are
//! told of every key a server missed (`fleet`, docs/ha.md "A fleet of
//! memrelays").
//!
//! A fleet is configured alike on every member: the same peer list (each
//! member may list itself too; it is recognised by its `--peer-listen`
//! address and left out), the same secret. The secret authenticates peers
//! to each other; it is read once at start, before privileges are dropped.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Shortest secret accepted: a guessable one would let anyone on the
/// network tell the fleet that servers missed keys (costing misses) or
/// learn which keys they missed.
const MIN_SECRET: usize = 16;

/// The fleet as configured.
#[derive(Clone, PartialEq, Eq)]
pub struct Fleet {
    /// Where this memrelay takes its peers' connections.
    pub listen: SocketAddr,
    /// The other members (this one left out), each as given and resolved.
    pub peers: Vec<(String, SocketAddr)>,
    /// Shared by every member.
    pub secret: Secret,
    /// Longest wait for a peer to take a hint; past it the peer is
    /// counted down until it is reached again.
    pub timeout: Duration,
    /// Which peers must take a write's hints before the write is
    /// acknowledged.
    pub confirm: Confirm,
}

/// `--peer-confirm`: which peers must have taken the hints a write made
/// (the keys it went past a server with) before the write is
/// acknowledged. A write that made no hint (every replica took it) waits
/// for nobody, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Confirm {
    /// The peers reached at that moment, each within `--peer-timeout`; a
    /// peer that is not reached is skipped, and the write is acknowledged
    /// even if none took them (the fleet is told later, when it is
    /// reached).
    #[default]
    Reached,
    /// More than half the fleet, this member included; else the write is
    /// answered `SERVER_ERROR`.
    Majority,
    /// Every other member; else `SERVER_ERROR`.
    All,
}

impl Confirm {
    pub(crate) fn parse(text: &str) -> Result<Confirm, String> {
        match text {
            "reached" => Ok(Confirm::Reached),
            "majority" => Ok(Confirm::Majority),
            "all" => Ok(Confirm::All),
            _ => Err(format!("{text:?} is not one of reached, majority, all")),
        }
    }

    /// Whether `took` peers taking a write's hints, out of `peers`, is
    /// enough to acknowledge it.
    pub(crate) fn enough(self, took: usize, peers: usize) -> bool {
        match self {
            Confirm::Reached => true,
            // This member and `took` of the `peers + 1`.
            Confirm::Majority => 2 * (took + 1) > peers + 1,
            Confirm::All => took >= peers,
        }
    }
}

impl fmt::Display for Confirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Confirm::Reached => "reached",
            Confirm::Majority => "majority",
            Confirm::All => "all",
        })
    }
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("timeout", &self.timeout)
            .field("confirm", &self.confirm)
            .finish_non_exhaustive()
    }
}

/// The shared secret: never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The file's first line, trimmed (so `echo` and editors that add a
    /// newline make the same secret).
    pub(crate) fn load(path: &std::path::Path) -> Result<(Secret, Option<String>), String> {
        let shown = path.display();
        let data = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let secret = Secret::parse(&data).map_err(|e| format!("{shown}: {e}"))?;
        Ok((secret, super::readable_by_others(path)))
    }

    pub(crate) fn parse(data: &[u8]) -> Result<Secret, String> {
        let line = data.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = line.trim_ascii();
        if line.len() < MIN_SECRET {
            return Err(format!(
                "the secret is {} bytes: at least {MIN_SECRET} are needed",
                line.len()
            ));
        }
        Ok(Secret(line.to_vec()))
    }
}

/// Default `--peer-timeout`: a peer on the same network answers in well
/// under a millisecond; one that takes this long is treated as down.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_millis(200);

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_its_first_line_and_long_enough() {
        assert_eq!(
            Secret::parse(b"  0123456789abcdef \nrest").unwrap().bytes(),
            b"0123456789abcdef"
        );
        assert!(Secret::parse(b"short\n")
            .unwrap_err()
            .contains("at least 16"));
        assert!(Secret::parse(b"").is_err());
    }

    #[test]
    fn confirm_counts_this_member_in_a_majority() {
        // A fleet of three: this one and one peer are a majority.
        assert!(!Confirm::Majority.enough(0, 2));
        assert!(Confirm::Majority.enough(1, 2));
        // Of four, two peers are needed (3 of 4).
        assert!(!Confirm::Majority.enough(1, 3));
        assert!(Confirm::Majority.enough(2, 3));
        // Of two, the one peer.
        assert!(!Confirm::Majority.enough(0, 1));
        assert!(Confirm::All.enough(2, 2) && !Confirm::All.enough(1, 2));
        assert!(Confirm::Reached.enough(0, 2));
        assert_eq!(Confirm::parse("majority"), Ok(Confirm::Majority));
        assert!(Confirm::parse("most").is_err());
    }
}
