//! `--peer`, `--peer-listen`, `--peer-secret-file`, `--peer-timeout`: the
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
}

impl fmt::Debug for Fleet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fleet")
            .field("listen", &self.listen)
            .field("peers", &self.peers)
            .field("timeout", &self.timeout)
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
}
