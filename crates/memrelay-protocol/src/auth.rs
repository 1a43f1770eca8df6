//! memcached's ASCII authentication (`memcached -Y <file>`), as a client
//! speaks it.
//!
//! Until a connection has authenticated, memcached reads every request as
//! `set <key> <flags> <exptime> <bytes>` followed by a data block holding
//! `<user> <password>`: the key, flags and exptime are ignored, nothing is
//! stored, and the answer is `STORED` when the credentials match a line of
//! the file, `CLIENT_ERROR authentication failure` when they do not.
//! Anything else gets `CLIENT_ERROR unauthenticated` and the connection
//! stays open. This module frames that input exactly as memcached 1.6 does
//! (`try_read_command_asciiauth` in proto_text.c): its tokenizer, its
//! number rules, its error lines. Deciding whether credentials match is the
//! caller's business.

use crate::number::parse_u32_wrapping;

/// memcached closes an unauthenticated connection that sends more than this
/// without a newline.
pub const AUTH_MAX_LINE: usize = 2048;

/// The most data an authentication `set` may announce. memcached has no
/// bound here (it waits for whatever length is announced); credentials are
/// short, and an unauthenticated client must not make the proxy buffer
/// much, so a longer announcement fails the attempt and closes the
/// connection. Auth files with longer lines are refused at start.
pub const AUTH_MAX_DATA: usize = 4096;

/// The reply to credentials that match.
pub const AUTH_OK: &[u8] = b"STORED\r\n";
/// The reply to credentials that do not match.
pub const AUTH_FAILED: &[u8] = b"CLIENT_ERROR authentication failure\r\n";

/// One unit of input from a client that has not authenticated yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthInput<'a> {
    /// Credentials to check.
    Credentials { user: &'a [u8], password: &'a [u8] },
    /// Anything but an authentication `set` (a line of fewer than five
    /// tokens, another command, a length memcached does not accept).
    Unauthenticated,
    /// The data block does not end with `\r\n`.
    BadTermination,
    /// The data block holds fewer than two tokens.
    BadFormat,
}

impl AuthInput<'_> {
    /// memcached's reply, for everything but credentials.
    pub fn reply(&self) -> &'static [u8] {
        match self {
            AuthInput::Credentials { .. } => AUTH_FAILED,
            AuthInput::Unauthenticated => b"CLIENT_ERROR unauthenticated\r\n",
            AuthInput::BadTermination => b"CLIENT_ERROR bad command line termination\r\n",
            AuthInput::BadFormat => b"CLIENT_ERROR bad authentication token format\r\n",
        }
    }
}

/// Input after which the connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// More than [`AUTH_MAX_LINE`] bytes without a newline (memcached
    /// closes without a word).
    #[error("line too long before authentication")]
    LineTooLong,
    /// A `set` announcing more than [`AUTH_MAX_DATA`] bytes of credentials
    /// (memrelay's own bound).
    #[error("credentials too long")]
    DataTooLong,
}

impl AuthError {
    /// What the client gets before the connection is closed.
    pub fn reply(&self) -> &'static [u8] {
        match self {
            AuthError::LineTooLong => b"",
            AuthError::DataTooLong => AUTH_FAILED,
        }
    }
}

/// Frames the input at the start of `buf` of a client that has not
/// authenticated. `Ok(None)`: incomplete; `Ok(Some((input, n)))`: the
/// input is `buf[..n]`.
pub fn parse_auth(buf: &[u8]) -> Result<Option<(AuthInput<'_>, usize)>, AuthError> {
    // memcached waits for two bytes before it looks for a line.
    if buf.len() < 2 {
        return Ok(None);
    }
    let Some(nl) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > AUTH_MAX_LINE {
            Err(AuthError::LineTooLong)
        } else {
            Ok(None)
        };
    };
    // The line keeps its `\r`: memcached leaves it on the last token,
    // where its number parser takes it for trailing white space.
    let mut tokens = c_tokens(&buf[..nl]);
    let line_end = nl + 1;
    let (Some(command), Some(_key), Some(_flags), Some(_exptime), Some(len)) = (
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
    ) else {
        return Ok(Some((AuthInput::Unauthenticated, line_end)));
    };
    let len = match parse_u32_wrapping(len) {
        Some(len) if command == b"set" => len as usize,
        _ => return Ok(Some((AuthInput::Unauthenticated, line_end))),
    };
    if len > AUTH_MAX_DATA {
        return Err(AuthError::DataTooLong);
    }
    let end = line_end + len + 2;
    let Some(data) = buf.get(line_end..end) else {
        return Ok(None);
    };
    let (payload, terminator) = data.split_at(len);
    if terminator != b"\r\n" {
        return Ok(Some((AuthInput::BadTermination, end)));
    }
    let mut tokens = c_tokens(payload);
    let input = match (tokens.next(), tokens.next()) {
        (Some(user), Some(password)) => AuthInput::Credentials { user, password },
        _ => AuthInput::BadFormat,
    };
    Ok(Some((input, end)))
}

/// memcached's `tokenize_command` as far as authentication uses it: the
/// string ends at its first NUL (it is a C string), tokens are separated by
/// spaces only, empty tokens are skipped.
fn c_tokens(s: &[u8]) -> impl Iterator<Item = &[u8]> {
    let s = match memchr::memchr(0, s) {
        Some(nul) => &s[..nul],
        None => s,
    };
    s.split(|&b| b == b' ').filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(input: &[u8]) -> Result<Option<(AuthInput<'_>, usize)>, AuthError> {
        parse_auth(input)
    }

    #[test]
    fn credentials() {
        let input = b"set any 0 0 10\r\nuser pass1\r\nget k\r\n";
        assert_eq!(
            parse(input),
            Ok(Some((
                AuthInput::Credentials {
                    user: b"user",
                    password: b"pass1"
                },
                28
            )))
        );
        // Extra tokens and spaces are ignored, as memcached ignores them;
        // so are noreply and a line ending in a bare \n.
        assert_eq!(
            parse(b"set k 1 2 13 noreply\n  u  p  extra\r\n"),
            Ok(Some((
                AuthInput::Credentials {
                    user: b"u",
                    password: b"p"
                },
                36
            )))
        );
    }

    #[test]
    fn everything_else() {
        let cases: &[(&[u8], AuthInput<'_>, usize)] = &[
            (b"get foo\r\n", AuthInput::Unauthenticated, 9),
            (b"\r\n", AuthInput::Unauthenticated, 2),
            (b"quit\r\nmore", AuthInput::Unauthenticated, 6),
            (b"add k 0 0 3\r\nabc\r\n", AuthInput::Unauthenticated, 13),
            (b"set k 0 0\r\n", AuthInput::Unauthenticated, 11),
            (b"set k 0 0 x\r\n", AuthInput::Unauthenticated, 13),
            (b"set k 0 0 -1\r\n", AuthInput::Unauthenticated, 14),
            (b"set\0k 0 0 3\r\n", AuthInput::Unauthenticated, 13),
            (b"set k 0 0 3\r\nabcd\r\n", AuthInput::BadTermination, 18),
            (b"set k 0 0 4\r\nuser\r\n", AuthInput::BadFormat, 19),
            (b"set k 0 0 0\r\n\r\n", AuthInput::BadFormat, 15),
            (b"set k 0 0 4\r\nu\0 p\r\n", AuthInput::BadFormat, 19),
        ];
        for (input, want, n) in cases {
            assert_eq!(
                parse(input),
                Ok(Some((*want, *n))),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn incomplete_and_closing() {
        assert_eq!(parse(b"s"), Ok(None));
        assert_eq!(parse(b"set k 0 0 5"), Ok(None));
        assert_eq!(parse(b"set k 0 0 5\r\nuser "), Ok(None));
        assert_eq!(parse(b"set k 0 0 5\r\nu p\r"), Ok(None));
        assert_eq!(parse(&[b'x'; AUTH_MAX_LINE]), Ok(None));
        assert_eq!(
            parse(&[b'x'; AUTH_MAX_LINE + 1]),
            Err(AuthError::LineTooLong)
        );
        let long = format!("set k 0 0 {}\r\n", AUTH_MAX_DATA + 1);
        assert_eq!(parse(long.as_bytes()), Err(AuthError::DataTooLong));
        let most = format!("set k 0 0 {AUTH_MAX_DATA}\r\n");
        assert_eq!(parse(most.as_bytes()), Ok(None));
    }
}
