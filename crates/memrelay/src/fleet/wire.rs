//! The lines peers exchange: pure functions, no I/O.
//!
//! ```text
//! dialer:   memrelay-peer 4 <nonce> <instance> <its --peer-listen>
//! listener: challenge <nonce> <proof> <instance>   (or: error <why>)
//! dialer:   auth <proof>
//! listener: ok                                  (or: error <why>)
//! then, from the dialer, each answered with `k`:
//!           hint <server> <key in base64, or *>
//!           held <server> <key in base64>   (a hint whose key a write the
//!                        sender gave up on may still reach: `settle::Held`)
//!           ping
//!           epoch <stage> <routing> [<routing>]  (see `epoch`; also a ping)
//! and, once per connection, after `sync`:
//!           routing
//! answered with the listener's `epoch` line (once it has a stage), the
//! routings it serves and records by (`config::routing`'s lines), `end`.
//! and first, once per connection:
//!           sync
//! answered with every key the listener's lists hold, as `hint` lines,
//! and each server whose list it lost in a crash of its own (it flushes
//! that server before it serves it), as
//!           forgot <server>
//! then `end`; then the dialer's own lists, as hints, then
//!           joined
//! after which every hint the dialer makes comes on this connection.
//! ```
//!
//! Each side proves it knows the fleet's secret with an HMAC-SHA256 over
//! both nonces and its role, so neither a replay nor a reflection of the
//! other side's proof passes. The instance ids (random per process) let a
//! memrelay that dialled itself (a peer list naming one of its own
//! addresses) notice and stop, and let a memrelay see that a peer was
//! replaced by a new process (a restart, a hand-off): the new one is
//! dialled at once, and the connection to the old one dropped once the
//! new one took the lists.
//! Lines are short: one longer than [`MAX_LINE`] ends the connection.

use std::net::SocketAddr;

use ring::hmac;

/// Longest line either side accepts: a server name and a key of 250 bytes
/// in base64 fit many times over.
pub(crate) const MAX_LINE: u64 = 4096;

/// 4: `held` lines (3: `epoch` lines; 2: `forgot` lines in the answer to
/// `sync`). Members
/// of other versions refuse each other's connections (and say so), rather
/// than misread each other.
const VERSION: &str = "4";

/// A random 128-bit value, in hex.
pub(crate) fn nonce() -> String {
    let mut b = [0u8; 16];
    // SystemRandom reads the kernel's generator; it fails only where there
    // is none, and then a time-based value still differs per connection.
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b = t.to_le_bytes();
    }
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Which side a proof is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Dialer,
    Listener,
}

/// `role`'s proof that it knows `secret`, for this pair of nonces.
pub(crate) fn proof(secret: &[u8], role: Role, dialer: &str, listener: &str) -> String {
    hex(hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        &message(role, dialer, listener),
    )
    .as_ref())
}

/// Whether `given` is `role`'s proof (compared in constant time).
pub(crate) fn verify(secret: &[u8], role: Role, dialer: &str, listener: &str, given: &str) -> bool {
    let Some(tag) = unhex(given) else {
        return false;
    };
    hmac::verify(
        &hmac::Key::new(hmac::HMAC_SHA256, secret),
        &message(role, dialer, listener),
        &tag,
    )
    .is_ok()
}

fn message(role: Role, dialer: &str, listener: &str) -> Vec<u8> {
    let role = match role {
        Role::Dialer => "dialer",
        Role::Listener => "listener",
    };
    format!("memrelay-peer {VERSION} {role} {dialer} {listener}").into_bytes()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The dialer's first line.
pub(crate) fn hello(nonce: &str, instance: &str, listen: &SocketAddr) -> String {
    format!("memrelay-peer {VERSION} {nonce} {instance} {listen}\n")
}

/// What the dialer's first line says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Hello<'a> {
    pub nonce: &'a str,
    pub instance: &'a str,
    /// Where the dialer takes its peers' connections.
    pub listen: SocketAddr,
}

pub(crate) fn parse_hello(line: &str) -> Result<Hello<'_>, &'static str> {
    let mut w = line.split_ascii_whitespace();
    match (w.next(), w.next(), w.next(), w.next(), w.next(), w.next()) {
        (Some("memrelay-peer"), Some(VERSION), Some(n), Some(i), Some(l), None)
            if is_token(n) && is_token(i) =>
        {
            let listen = l.parse().map_err(|_| "not a memrelay peer")?;
            Ok(Hello {
                nonce: n,
                instance: i,
                listen,
            })
        }
        (Some("memrelay-peer"), Some(v), ..) if v != VERSION => Err("unsupported version"),
        _ => Err("not a memrelay peer"),
    }
}

/// The listener's challenge line.
pub(crate) fn challenge(nonce: &str, proof: &str, instance: &str) -> String {
    format!("challenge {nonce} {proof} {instance}\n")
}

/// The listener's challenge: its nonce, proof and instance.
pub(crate) fn parse_challenge(line: &str) -> Option<(&str, &str, &str)> {
    let mut w = line.split_ascii_whitespace();
    match (w.next(), w.next(), w.next(), w.next(), w.next()) {
        (Some("challenge"), Some(n), Some(p), Some(i), None) if is_token(n) && is_token(i) => {
            Some((n, p, i))
        }
        _ => None,
    }
}

/// The dialer's proof.
pub(crate) fn parse_auth(line: &str) -> Option<&str> {
    line.trim_end().strip_prefix("auth ")
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// What a hint says: `server` missed `key` (None: every key); `held`: a
/// write the sender gave up on may still reach the server.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Hint<'a> {
    pub server: &'a str,
    pub key: Option<Vec<u8>>,
    pub held: bool,
}

/// A hint's line (`held` only with a key: every key is flushed, not
/// deleted key by key).
pub(crate) fn hint(server: &str, key: Option<&[u8]>, held: bool) -> Vec<u8> {
    let mut line = Vec::with_capacity(server.len() + 64);
    line.extend_from_slice(if held && key.is_some() {
        b"held "
    } else {
        b"hint "
    });
    crate::ha::missed::write_record(&mut line, server, key);
    line.push(b'\n');
    line
}

/// A `forgot` line: the sender lost its list for `server` in a crash.
pub(crate) fn forgot(server: &str) -> Vec<u8> {
    format!("forgot {server}\n").into_bytes()
}

/// A line after the handshake.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line<'a> {
    Hint(Hint<'a>),
    Forgot(&'a str),
    Ping,
    /// Asks for the listener's stage and routings.
    Routing,
    /// Where the sender stands in a fleet reload (also a ping).
    Epoch(super::epoch::Stage),
    Sync,
    Joined,
}

pub(crate) fn parse_line(line: &str) -> Result<Line<'_>, &'static str> {
    let line = line.trim_end_matches(['\r', '\n']);
    match line {
        "ping" => return Ok(Line::Ping),
        "sync" => return Ok(Line::Sync),
        "joined" => return Ok(Line::Joined),
        "routing" => return Ok(Line::Routing),
        _ => {}
    }
    if let Some(rest) = line.strip_prefix("epoch ") {
        return super::epoch::Stage::parse(rest)
            .map(Line::Epoch)
            .ok_or("an epoch line names a stage and its routings");
    }
    if let Some(server) = line.strip_prefix("forgot ").filter(|s| !s.is_empty()) {
        return Ok(Line::Forgot(server));
    }
    let (rest, held) = match line.strip_prefix("held ") {
        Some(rest) => (rest, true),
        None => (line.strip_prefix("hint ").ok_or("unknown line")?, false),
    };
    let (server, key) =
        crate::ha::missed::read_record(rest).ok_or("a hint names a server and a key in base64")?;
    if held && key.is_none() {
        return Err("a held hint names a key");
    }
    Ok(Line::Hint(Hint { server, key, held }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_side_proves_the_secret_and_no_proof_passes_for_the_other_side() {
        let (s, d, l) = (b"0123456789abcdef".as_slice(), nonce(), nonce());
        assert_ne!(d, l);
        let p = proof(s, Role::Listener, &d, &l);
        assert!(verify(s, Role::Listener, &d, &l, &p));
        // Reflected to the other role, replayed with another nonce, or
        // made with another secret: refused.
        assert!(!verify(s, Role::Dialer, &d, &l, &p));
        assert!(!verify(s, Role::Listener, &nonce(), &l, &p));
        assert!(!verify(b"another secret!!", Role::Listener, &d, &l, &p));
        assert!(!verify(s, Role::Listener, &d, &l, "zz"));
        assert!(!verify(s, Role::Listener, &d, &l, ""));
    }

    #[test]
    fn hellos_and_challenges_parse_and_garbage_does_not() {
        let at: SocketAddr = "127.0.0.1:12100".parse().unwrap();
        let h = hello("ab12", "cd34", &at);
        assert_eq!(
            parse_hello(&h),
            Ok(Hello {
                nonce: "ab12",
                instance: "cd34",
                listen: at
            })
        );
        assert_eq!(
            parse_hello("memrelay-peer 4 ab cd not-an-address"),
            Err("not a memrelay peer")
        );
        // The releases before `held` lines, and one after.
        for other in [
            "memrelay-peer 1 a b 127.0.0.1:1",
            "memrelay-peer 2 a b 127.0.0.1:1",
            "memrelay-peer 3 a b 127.0.0.1:1",
            "memrelay-peer 5 a b",
        ] {
            assert_eq!(parse_hello(other), Err("unsupported version"));
        }
        assert_eq!(parse_hello("GET / HTTP/1.1"), Err("not a memrelay peer"));
        assert_eq!(
            parse_hello("memrelay-peer 4 a b 127.0.0.1:1 more"),
            Err("not a memrelay peer")
        );
        assert_eq!(
            parse_challenge(&challenge("ab", "cd", "ef")),
            Some(("ab", "cd", "ef"))
        );
        assert_eq!(parse_challenge("challenge ab cd\n"), None);
        assert_eq!(parse_auth("auth ff00\n"), Some("ff00"));
    }

    #[test]
    fn a_forgot_line_names_a_server() {
        let line = String::from_utf8(forgot("cache-a")).unwrap();
        assert_eq!(parse_line(&line), Ok(Line::Forgot("cache-a")));
        assert!(parse_line("forgot \n").is_err());
    }

    #[test]
    fn a_hint_round_trips_any_key_and_every_key() {
        for key in [Some(&b"user:1"[..]), Some(&[0u8, 255, 32, 10][..]), None] {
            for held in [false, true] {
                let line = String::from_utf8(hint("cache-a", key, held)).unwrap();
                assert_eq!(
                    parse_line(&line),
                    Ok(Line::Hint(Hint {
                        server: "cache-a",
                        key: key.map(<[u8]>::to_vec),
                        // Every key is never held.
                        held: held && key.is_some(),
                    }))
                );
            }
        }
        assert!(parse_line("held s *\n").is_err());
        assert_eq!(parse_line("ping\n"), Ok(Line::Ping));
        assert_eq!(parse_line("sync\n"), Ok(Line::Sync));
        assert_eq!(parse_line("routing\n"), Ok(Line::Routing));
        assert!(parse_line("hint nokey\n").is_err());
        assert!(parse_line("hint s !!!\n").is_err());
        assert!(parse_line("hint  a\n").is_err());
        assert!(parse_line("flush_all\n").is_err());
    }
}
