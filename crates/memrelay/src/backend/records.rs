//! How pipelined requests are cut into TLS records for a memcached server.
//!
//! memcached 1.6 (1.6.18, Debian 12's, measured; see docs/security.md)
//! stalls on a TLS connection when a record it has begun to read holds the
//! start of a request it does not need yet: it reads with `SSL_read` into
//! a 16 KiB buffer, or straight into an item for the rest of a large
//! value, and OpenSSL keeps the rest of the record; once the requests in
//! hand are done memcached waits for the *socket* to be readable, and the
//! bytes OpenSSL holds are never looked at until the client sends more.
//! A pipelining client (memrelay) then sees its last requests time out.
//! Pipelined sets of 100-byte values, 1,000 deep, stall that way; so does
//! any request written after a value of more than 16 KiB in one write.
//!
//! A record memcached reads into its empty buffer whole, or that holds
//! nothing but the rest of the one request it is reading, never strands
//! bytes. So each write to a TLS server (which rustls encrypts as records
//! of up to 16 KiB, the first starting where the write starts) is either
//! whole requests making up one record at most, or one request alone,
//! whatever its size ([`next_write`]); and a write is handed over only
//! whole, which the TLS stream to a server guarantees (no buffer limit in
//! rustls; the callers bound what they queue instead).

/// A TLS record's largest plaintext, and memcached's read buffer.
pub(crate) const RECORD: usize = 16 * 1024;

/// The length of the next write, given where the requests queued end
/// (offsets from the first unwritten byte, increasing) and how many bytes
/// one write can carry: whole requests up to one record, or the first
/// request alone when it is larger. 0 when nothing can go yet.
pub(crate) fn next_write(ends: impl IntoIterator<Item = usize>, available: usize) -> usize {
    let mut len = 0;
    for end in ends {
        if end > available {
            break;
        }
        if end > RECORD {
            // The first request alone, or nothing more after the others.
            return if len == 0 { end } else { len };
        }
        len = end;
    }
    len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_requests_share_a_record_and_a_large_one_goes_alone() {
        // 100-byte requests: as many as fit in one record.
        let ends: Vec<usize> = (1..=1000).map(|i| i * 100).collect();
        assert_eq!(next_write(ends.iter().copied(), usize::MAX), 16_300);
        // A large request first: alone.
        assert_eq!(next_write([300_000, 300_100], usize::MAX), 300_000);
        // A large request after small ones: they go first, without it.
        assert_eq!(next_write([100, 200, 300_200], usize::MAX), 200);
        // Exactly one record.
        assert_eq!(next_write([RECORD, RECORD + 1], usize::MAX), RECORD);
    }

    #[test]
    fn never_more_than_one_write_can_carry() {
        assert_eq!(next_write([100, 200, 300], 250), 200);
        assert_eq!(next_write([100_000], 50_000), 0);
        assert_eq!(next_write([], usize::MAX), 0);
    }
}
