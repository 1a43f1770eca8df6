//! Ketama consistent hashing, byte-for-byte twemproxy's `distribution:
//! ketama` with `hash: md5` (tested against a table recorded from a real
//! nutcracker: tests/data/ketama.tsv).
//!
//! Each server of weight 1 gets 160 points on a 32-bit circle: for i in
//! 0..40, MD5("name-i") yields four little-endian u32 points. A key goes to
//! the first point at or after the first four bytes (little-endian) of
//! MD5(key), wrapping around. The number of points is computed in f32, as
//! twemproxy does, which matters for large pools (25 servers get 156 each).

use md5::{Digest, Md5};

const POINTS_PER_SERVER: f32 = 160.0;
const POINTS_PER_HASH: usize = 4;

/// A sorted continuum of (point, server index).
#[derive(Debug, Clone, PartialEq)]
pub struct Continuum {
    points: Vec<(u32, u32)>,
}

impl Continuum {
    /// Builds the continuum for servers named as ketama names them, each of
    /// weight 1.
    pub fn new<S: AsRef<str>>(names: &[S]) -> Continuum {
        let weighted: Vec<(&str, u32)> = names.iter().map(|n| (n.as_ref(), 1)).collect();
        Continuum::weighted(&weighted)
    }

    /// The same with weights: a server's share of the points is its weight
    /// over the total, computed as twemproxy computes it.
    pub(crate) fn weighted(servers: &[(&str, u32)]) -> Continuum {
        let n = servers.len();
        let total_weight = servers.iter().map(|s| s.1 as f32).sum::<f32>();
        // Weights share out the same budget: about 160 points per server
        // whatever the weights (a weight of 10,000 must not reserve 1.6
        // million).
        let mut points = Vec::with_capacity(n * 160 + n * 4);
        for (index, (name, weight)) in servers.iter().enumerate() {
            let pct = *weight as f32 / total_weight;
            // Mirrors twemproxy: the product in f32, the epsilon added in f64,
            // the result cast back to f32 and floored.
            let v = pct * POINTS_PER_SERVER / 4.0 * n as f32;
            let per_server = ((v as f64 + 0.000_000_000_1) as f32).floor() as u32 * 4;
            for p in 0..per_server as usize / POINTS_PER_HASH {
                let digest = Md5::digest(format!("{name}-{p}").as_bytes());
                for a in 0..POINTS_PER_HASH {
                    let b = &digest[a * 4..a * 4 + 4];
                    let value = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    points.push((value, index as u32));
                }
            }
        }
        points.sort_by_key(|p| p.0);
        Continuum { points }
    }

    /// The first server at or after the key's point, walking the circle,
    /// that `usable` accepts: the server that takes a key while its own
    /// server is ejected. Every other key keeps its server.
    pub(crate) fn lookup_where(&self, hash: u32, usable: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        let start = self.points.partition_point(|p| p.0 < hash) % n.max(1);
        let mut tried = 0u64; // servers already refused (bitmap of the first 64)
        for i in 0..n {
            let s = self.points[(start + i) % n].1 as usize;
            if s < 64 && tried & (1 << s) != 0 {
                continue;
            }
            if usable(s) {
                return Some(s);
            }
            if s < 64 {
                tried |= 1 << s;
            }
        }
        None
    }

    /// Every point on the circle, in order (a point is where an arc of
    /// hashes ends; see `router::moves`).
    pub(crate) fn points(&self) -> impl Iterator<Item = u32> + '_ {
        self.points.iter().map(|p| p.0)
    }

    /// The server index for a key hash.
    pub fn lookup(&self, hash: u32) -> usize {
        let i = self.points.partition_point(|p| p.0 < hash);
        let i = if i == self.points.len() { 0 } else { i };
        self.points.get(i).map(|p| p.1 as usize).unwrap_or(0)
    }
}

/// The ketama key hash: the first four bytes of MD5(key), little-endian.
pub fn key_hash(key: &[u8]) -> u32 {
    let d = Md5::digest(key);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}
