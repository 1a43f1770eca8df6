//! `--auth-file`: the `user:password` lines clients must authenticate with,
//! the same file memcached takes with `-Y`.
//!
//! Read once at start (before privileges are dropped, so it can be readable
//! by root only). A file that cannot be read, holds no entry, or holds a
//! line that could never match is refused with the line's number, so a
//! typo does not leave a proxy that no client can use, or one that is open.
//! Differences from memcached: it reads every line (memcached reads 8 and
//! ignores the rest, and cuts lines at 255 bytes), skips empty lines
//! (memcached refuses the file), and refuses entries no client could send
//! (an empty user or password, a space or NUL in one).

use std::fmt;
use std::path::Path;

use memrelay_protocol::auth::AUTH_MAX_DATA;

/// The accepted credentials.
pub struct Credentials {
    entries: Vec<Entry>,
}

struct Entry {
    user: Vec<u8>,
    password: Vec<u8>,
}

/// Never prints a password.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({} users)", self.entries.len())
    }
}

impl Credentials {
    /// Reads and checks the file. `Ok` carries a warning to log when the
    /// file is readable by others than its owner.
    pub fn load(path: &Path) -> Result<(Credentials, Option<String>), String> {
        let shown = path.display();
        let data = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
        let creds = Credentials::parse(&data).map_err(|e| format!("{shown}: {e}"))?;
        Ok((creds, super::readable_by_others(path)))
    }

    /// Parses `user:password` lines (a password may hold `:`).
    pub fn parse(data: &[u8]) -> Result<Credentials, String> {
        let mut entries = Vec::new();
        for (i, line) in data.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let n = i + 1;
            let Some(colon) = line.iter().position(|&b| b == b':') else {
                return Err(format!("line {n} is not user:password"));
            };
            let (user, password) = (&line[..colon], &line[colon + 1..]);
            if user.is_empty() || password.is_empty() {
                return Err(format!("line {n} has an empty user or password"));
            }
            // Clients send `<user> <password>`, split at spaces, and
            // memcached reads them as C strings: such an entry could never
            // match.
            if line.iter().any(|&b| b == b' ' || b == 0) {
                return Err(format!("line {n} holds a space or a NUL byte"));
            }
            if line.len() > AUTH_MAX_DATA {
                return Err(format!("line {n} is longer than {AUTH_MAX_DATA} bytes"));
            }
            entries.push(Entry {
                user: user.to_vec(),
                password: password.to_vec(),
            });
        }
        if entries.is_empty() {
            return Err("no user:password line".to_string());
        }
        Ok(Credentials { entries })
    }

    /// Whether the credentials match an entry. Every entry is compared in
    /// full whatever the outcome, and each comparison takes a time that
    /// depends only on the length of what the client sent, so timing tells
    /// a client neither how much of a secret it guessed nor which entry.
    pub fn check(&self, user: &[u8], password: &[u8]) -> bool {
        let mut found = 0u8;
        for e in &self.entries {
            found |= same(user, &e.user) & same(password, &e.password);
        }
        found == 1
    }
}

/// 1 if `given` equals `secret`, else 0, without an early exit: every byte
/// of `given` is compared (against `secret` repeated, so a length mismatch
/// costs the same as a byte mismatch).
fn same(given: &[u8], secret: &[u8]) -> u8 {
    let mut diff = u8::from(given.len() != secret.len());
    for (g, s) in given.iter().zip(secret.iter().cycle()) {
        diff |= g ^ s;
    }
    u8::from(std::hint::black_box(diff) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_exactly() {
        let c = Credentials::parse(b"alice:s3cret\r\n\nbob:pa:ss\n").expect("a valid file");
        assert!(c.check(b"alice", b"s3cret"));
        assert!(c.check(b"bob", b"pa:ss"));
        for (u, p) in [
            (&b"alice"[..], &b"s3cre"[..]),
            (b"alice", b"s3crett"),
            (b"alice", b"s3cres"),
            (b"alic", b"s3cret"),
            (b"bob", b"s3cret"),
            (b"", b""),
            (b"alice", b"s3crets3cret"),
        ] {
            assert!(!c.check(u, p), "{u:?} {p:?}");
        }
    }

    #[test]
    fn refuses_bad_files() {
        for (data, why) in [
            (&b""[..], "no user"),
            (b"\n\r\n", "no user"),
            (b"alice\n", "line 1 is not"),
            (b"ok:1\nbob\n", "line 2 is not"),
            (b":pass\n", "line 1 has an empty"),
            (b"alice:\n", "line 1 has an empty"),
            (b"al ice:pass\n", "line 1 holds a space"),
            (b"alice:pa\0ss\n", "line 1 holds a space or a NUL"),
        ] {
            let e = Credentials::parse(data).err();
            assert!(
                e.as_deref().is_some_and(|e| e.contains(why)),
                "{data:?}: {e:?}"
            );
        }
        let long = format!("u:{}", "p".repeat(AUTH_MAX_DATA));
        assert!(Credentials::parse(long.as_bytes()).is_err());
    }
}
